"""Edge nodes on loopback: real `edge-node` processes, mutual TLS, the coordinator's fallback."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import encode, mlx_lm_tokens
from nodes import NodeProcess, coordinator, free_port, wait_for_placement

from edgemoe.coordinator.generate import generate
from edgemoe.coordinator.relay import DelayRelay
from edgemoe.node.credentials import CHANNEL_OPTIONS, ClusterCredentials, channel_credentials, format_token, new_secret
from edgemoe.node.manifest import read_manifest
from edgemoe.protos import edgemoe_node_pb2 as pb
from edgemoe.protos import edgemoe_node_pb2_grpc as pb_grpc

PROMPT = "The quick brown fox jumps over the lazy dog."
MAX_TOKENS = 16
# The node killed mid-generation dies right after the coordinator sends it this many calls,
# behind a relay that holds each way for KILL_DELAY_S: its reply cannot have come back.
KILL_AT_CALL = 2
KILL_DELAY_S = 0.3
KILL_TOKENS = 8


@pytest.fixture
def token() -> str:
    return format_token(new_secret())


@pytest.fixture
def nodes(token, tmp_path):
    started: list[NodeProcess] = []

    def start(n: int, **kw) -> list[NodeProcess]:
        for _ in range(n):
            started.append(NodeProcess(kw.pop("token", token), tmp_path / f"node{len(started)}", **kw))
        return started[-n:]

    yield start
    for node in started:
        node.stop(signal.SIGKILL)


@pytest.mark.parametrize("n_nodes", [1, 2, 3])
def test_same_tokens_as_mlx_lm_with_nodes(models, nodes, token, n_nodes):
    src, packed = models.src("qwen3_moe", True), models.packed("qwen3_moe", True)
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, max_tokens=MAX_TOKENS, models=models)
    started = nodes(n_nodes)
    # The coordinator caches two experts, so nearly every expert is the nodes' to compute.
    sm = coordinator(packed, token, [n.address for n in started], 2 * read_manifest(packed).expert_bytes)
    try:
        wait_for_placement(sm)
        result = generate(sm, prompt, max_tokens=MAX_TOKENS)
        assert result.token_ids == expected
        assert sm.cluster.stats.experts_from_peers > 0
        assert sm.cluster.stats.fallbacks == 0
        assert all(p.stats.calls > 0 and p.stats.mean_rtt_ms is not None for p in sm.cluster.peers)
        # One request per involved node per MoE layer per forward pass, never one per expert.
        assert sm.cluster.stats.peer_calls < sm.cluster.stats.experts_from_peers
    finally:
        sm.close()


def test_node_killed_with_a_call_in_flight_falls_back_to_mlx_lms_tokens(models, nodes, token):
    """The node dies while the coordinator waits for its answer: the pending call's experts are
    computed here instead (not waited out: the node timeout is far off), and the tokens are mlx-lm's."""
    src, packed = models.src("deepseek_v3", True), models.packed("deepseek_v3", True)
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, max_tokens=KILL_TOKENS, models=models)
    victim, survivor = nodes(2)
    with DelayRelay(("127.0.0.1", victim.port), delay_s=KILL_DELAY_S, max_lifetime_s=120) as relay:
        sm = coordinator(packed, token, [f"127.0.0.1:{relay.address[1]}", survivor.address],
                         read_manifest(packed).expert_bytes, node_timeout_s=20.0)
        try:
            wait_for_placement(sm)
            peer = sm.cluster.peers[0]
            send, pending_at_kill = peer.compute, []

            def send_then_kill(request):
                future = send(request)
                if peer.stats.calls == KILL_AT_CALL:
                    victim.stop(signal.SIGKILL)
                    pending_at_kill.append(not future.done())
                return future

            peer.compute = send_then_kill
            result = generate(sm, prompt, max_tokens=KILL_TOKENS)
            assert pending_at_kill == [True], "the node was never killed with a call of its in flight"
            assert result.token_ids == expected
            assert sm.cluster.stats.fallbacks >= 1
            assert not peer.healthy and "did not answer" not in peer.last_error, peer.last_error
            assert sm.cluster.peers[1].healthy and sm.cluster.peers[1].stats.failures == 0
        finally:
            sm.close()


def test_unreachable_and_wrong_cluster_peers_change_nothing(models, nodes, token):
    src, packed = models.src("qwen3_moe", True), models.packed("qwen3_moe", True)
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, max_tokens=MAX_TOKENS, models=models)
    stranger = nodes(1, token=format_token(new_secret()))[0]
    sm = coordinator(packed, token, [f"127.0.0.1:{free_port()}", stranger.address], read_manifest(packed).expert_bytes)
    try:
        assert not any(p.healthy for p in sm.cluster.peers)
        assert all(p.last_error for p in sm.cluster.peers)
        result = generate(sm, prompt, max_tokens=MAX_TOKENS)
        assert result.token_ids == expected
        assert sm.cluster.stats.experts_from_peers == 0
    finally:
        sm.close()


def test_node_restart_keeps_pushed_experts(models, nodes, token, tmp_path):
    packed = models.packed("qwen3_moe", True)
    first = nodes(1)[0]
    sm = coordinator(packed, token, [first.address], read_manifest(packed).expert_bytes)
    try:
        wait_for_placement(sm)
        held = set(sm.cluster.peers[0].held)
    finally:
        sm.close()
    first.stop()
    again = NodeProcess(token, tmp_path / "node0")
    try:
        stub, channel = _stub(token, again.address)
        info = stub.Info(pb.InfoRequest(), timeout=5)
        channel.close()
        assert {(l, e) for m in info.models for l, e in zip(m.layers, m.experts)} == held
    finally:
        again.stop()


def _stub(token: str, address: str):
    creds = ClusterCredentials.from_token(token, "test-client")
    channel = grpc.secure_channel(address, channel_credentials(creds), options=CHANNEL_OPTIONS)
    return pb_grpc.EdgeNodeStub(channel), channel


def _tensor(arr: np.ndarray, dtype: str = "float32") -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=list(arr.shape), data=arr.tobytes())


def test_malformed_compute_requests_get_an_error_reply_and_the_node_keeps_serving(models, nodes, token):
    packed = models.packed("qwen3_moe", True)
    manifest = read_manifest(packed)
    node = nodes(1)[0]
    sm = coordinator(packed, token, [node.address], manifest.expert_bytes)
    try:
        wait_for_placement(sm)
        layer, expert = sorted(sm.cluster.peers[0].held)[0]
    finally:
        sm.close()
    hidden_size = 64
    good = np.ones((1, hidden_size), dtype=np.float32)
    fp = manifest.fingerprint
    bad = [
        pb.ComputeRequest(fingerprint="0" * 64, layer=layer, hidden=_tensor(good), rows=[0], experts=[expert]),
        pb.ComputeRequest(fingerprint=fp, layer=999, hidden=_tensor(good), rows=[0], experts=[expert]),
        pb.ComputeRequest(fingerprint=fp, layer=layer, hidden=_tensor(np.ones((1, 7), np.float32)), rows=[0],
                          experts=[expert]),
        pb.ComputeRequest(fingerprint=fp, layer=layer,
                          hidden=pb.Tensor(dtype="float32", shape=[1, hidden_size], data=b"x"),
                          rows=[0], experts=[expert]),
        pb.ComputeRequest(fingerprint=fp, layer=layer, hidden=_tensor(good.astype(np.int32), "int32"), rows=[0],
                          experts=[expert]),
        pb.ComputeRequest(fingerprint=fp, layer=layer, hidden=_tensor(good), rows=[5], experts=[expert]),
        pb.ComputeRequest(fingerprint=fp, layer=layer, hidden=_tensor(good), rows=[0], experts=[10_000]),
        pb.ComputeRequest(fingerprint=fp, layer=layer, hidden=_tensor(good), rows=[0, 0], experts=[expert]),
    ]
    ok = pb.ComputeRequest(fingerprint=fp, layer=layer, hidden=_tensor(good), rows=[0], experts=[expert])
    stub, channel = _stub(token, node.address)
    try:
        replies = list(stub.Compute(iter(bad + [ok]), timeout=30))
    finally:
        channel.close()
    assert len(replies) == len(bad) + 1
    for reply in replies[:-1]:
        assert reply.error and not reply.HasField("output")
    assert not replies[-1].error
    assert list(replies[-1].output.shape) == [1, hidden_size]
    assert node.proc.poll() is None


def test_plaintext_client_is_refused(nodes):
    node = nodes(1)[0]
    channel = grpc.insecure_channel(node.address)
    try:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.EdgeNodeStub(channel).Info(pb.InfoRequest(), timeout=3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        channel.close()


def test_port_in_use_and_bad_token_give_one_line_errors(nodes, token, tmp_path):
    busy = nodes(1)[0]
    for args, words in [
        (["--join", token, "--listen", busy.address], ["--listen", "in use"]),
        (["--join", "not-a-token", "--listen", f"127.0.0.1:{free_port()}"], ["join token"]),
        (["--join", token, "--listen", "nonsense"], ["HOST:PORT"]),
    ]:
        out = subprocess.run([sys.executable, "-m", "edgemoe.node.daemon", *args, "--data-dir", str(tmp_path / "x"),
                              "--no-advertise"], capture_output=True, text=True, timeout=60)
        assert out.returncode != 0
        assert "Traceback" not in out.stderr
        lines = [l for l in out.stderr.splitlines() if l.startswith("edge-node: error:")]
        assert len(lines) == 1 and all(w in lines[0] for w in words), out.stderr


def test_generated_protos_match_the_proto(tmp_path):
    root = Path(__file__).resolve().parent.parent
    subprocess.run(["bash", str(root / "protos/generate.sh"), sys.executable, str(tmp_path)], check=True)
    for name in ("edgemoe_node_pb2.py", "edgemoe_node_pb2_grpc.py"):
        fresh = [l for l in (tmp_path / name).read_text().splitlines() if "Protobuf Python Version" not in l]
        committed = [l for l in (root / "protos" / name).read_text().splitlines() if "Protobuf Python Version" not in l]
        assert fresh == committed, f"protos/{name} is stale: regenerate it with `make protos`"


def _init_cluster(tmp_path: Path) -> tuple[Path, str]:
    directory = tmp_path / "cluster"
    out = subprocess.run([sys.executable, "-m", "edgemoe.coordinator.cli", "cluster", "init", "--dir", str(directory)],
                         capture_output=True, text=True, check=True)
    return directory, out.stdout.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize("discovery", ["static", "mdns-loopback"])
def test_cli_generate_and_peers_through_a_node(models, tmp_path, discovery):
    """`edgemoe peers` finds the node, and `edgemoe generate` has it compute experts (pushed by
    the runs before, kept in its data dir) with mlx-lm's tokens."""
    src, packed = models.src("qwen3_moe", True), models.packed("qwen3_moe", True)
    prompt_ids = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt_ids, max_tokens=MAX_TOKENS, models=models)
    directory, token = _init_cluster(tmp_path)
    port = free_port()
    node = subprocess.Popen(
        [sys.executable, "-m", "edgemoe.node.daemon", "--join", token, "--listen", f"127.0.0.1:{port}", "--data-dir",
         str(tmp_path / "node"), "--cache-mb", "1", "--name", "loop"]
        + (["--interface", "127.0.0.1"] if discovery == "mdns-loopback" else ["--no-advertise"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert "listening" in node.stdout.readline()
        where = (["--peers", f"127.0.0.1:{port}"] if discovery == "static"
                 else ["--peers", "auto", "--interface", "127.0.0.1"])
        common = [*where, "--cluster-dir", str(directory)]
        peers = subprocess.run([sys.executable, "-m", "edgemoe.coordinator.cli", "peers", *common, "--json"],
                               capture_output=True, text=True, timeout=60)
        rows = json.loads(peers.stdout)
        assert len(rows) == 1 and rows[0]["healthy"] and rows[0]["name"] == "loop", peers.stderr
        # Experts are pushed in the background of a generation: a fresh node computes once a run
        # before has pushed it some.
        for _ in range(5):
            gen = subprocess.run(
                [sys.executable, "-m", "edgemoe.coordinator.cli", "generate", "--model", str(packed),
                 "--prompt", PROMPT, "--no-chat-template", "--max-tokens", str(MAX_TOKENS), "--json",
                 "--cache-mb", "0.01", *common],
                capture_output=True, text=True, timeout=120,
            )
            assert gen.returncode == 0, gen.stderr
            out = json.loads(gen.stdout)
            assert out["token_ids"] == expected
            stats = out["stats"]
            if stats["experts_from_peers"]:
                break
        assert stats["nodes"][0]["name"] == "loop"
        assert stats["experts_from_peers"] > 0 and stats["peer_calls"] > 0 and stats["fallbacks"] == 0, stats
        assert stats["nodes"][0]["experts_computed"] > 0 and stats["nodes"][0]["healthy"], stats
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=20)


def test_node_that_returns_comes_back_into_use(models, nodes, token, tmp_path):
    src, packed = models.src("qwen3_moe", True), models.packed("qwen3_moe", True)
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, max_tokens=MAX_TOKENS, models=models)
    node = nodes(1)[0]
    sm = coordinator(packed, token, [node.address], read_manifest(packed).expert_bytes)
    try:
        wait_for_placement(sm)
        node.stop(signal.SIGKILL)
        assert generate(sm, prompt, max_tokens=MAX_TOKENS).token_ids == expected
        peer = sm.cluster.peers[0]
        assert not peer.healthy
        back = NodeProcess(token, tmp_path / "node0", port=node.port)
        try:
            before = sm.cluster.stats.experts_from_peers
            deadline = time.monotonic() + 30
            while sm.cluster.stats.experts_from_peers == before and time.monotonic() < deadline:
                assert generate(sm, prompt, max_tokens=4).token_ids == expected[:4]
                time.sleep(0.2)
            assert peer.healthy
            assert sm.cluster.stats.experts_from_peers > before
        finally:
            back.stop()
    finally:
        sm.close()


def test_a_long_prompt_past_the_request_limits_keeps_nodes_in_use(models, nodes, token, tmp_path):
    """At 8 experts per token a long prefill routes more (row, expert) pairs to a node than one
    compute request may carry: they go in several requests, and the node stays in use."""
    from edgemoe.coordinator.pack import pack
    from edgemoe.coordinator.tiny_models import write_tiny_model
    from edgemoe.node.wire import MAX_ROWS

    src = write_tiny_model(tmp_path / "src", num_experts=16, num_experts_per_tok=8)
    packed = tmp_path / "packed"
    pack(src, packed)
    tokenizer = models.mlx_lm_model(src)[1]
    prompt = (tokenizer.encode(PROMPT + " ") * 400)[: MAX_ROWS // 8 + 200]
    assert len(prompt) * 8 > MAX_ROWS
    expected, _ = mlx_lm_tokens(src, prompt, max_tokens=4, models=models)
    # one node, holding all but the one cached expert: nearly every pair of the prefill is its own
    started = nodes(1)
    sm = coordinator(packed, token, [n.address for n in started], read_manifest(packed).expert_bytes)
    try:
        wait_for_placement(sm)
        result = generate(sm, prompt, max_tokens=4)
        assert result.token_ids == expected
        assert sm.cluster.stats.fallbacks == 0
        assert all(p.healthy and p.stats.failures == 0 for p in sm.cluster.peers)
        assert sm.cluster.stats.experts_from_peers > MAX_ROWS
    finally:
        sm.close()


@pytest.mark.slow
@pytest.mark.parametrize("node_timeout_s, waited_for", [(0.2, False), (10.0, True)])
def test_node_timeout_decides_whether_a_slow_node_is_waited_for(models, nodes, token, node_timeout_s, waited_for):
    """A node behind 0.3 s of delay each way answers in over 0.6 s: `--node-timeout` 0.2 sets it
    aside and computes its experts here; 10 waits for it. The tokens are the same either way."""
    src, packed = models.src("qwen3_moe", True), models.packed("qwen3_moe", True)
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, max_tokens=4, models=models)
    (node,) = nodes(1)
    with DelayRelay(("127.0.0.1", node.port), delay_s=0.3, max_lifetime_s=120) as relay:
        sm = coordinator(packed, token, [f"127.0.0.1:{relay.address[1]}"], read_manifest(packed).expert_bytes,
                         node_timeout_s=node_timeout_s)
        try:
            wait_for_placement(sm)
            result = generate(sm, prompt, max_tokens=4)
            peer = sm.cluster.peers[0]
            assert result.token_ids == expected
            if waited_for:
                assert sm.cluster.stats.fallbacks == 0 and sm.cluster.stats.experts_from_peers > 0
                assert peer.healthy and peer.stats.rtt_min_ms > 600
            else:
                assert sm.cluster.stats.fallbacks >= 1
                assert f"did not answer within {node_timeout_s:.1f}s" in peer.last_error
        finally:
            sm.close()


def test_a_pack_from_before_the_dense_checksum_was_recorded_still_goes_to_nodes(models, nodes, token, tmp_path):
    """Version-1 packs made before manifests carried `dense_sha256`: the coordinator hashes
    the dense file itself, so nodes can check the fingerprint and take the experts."""
    src = models.src("qwen3_moe", True)
    packed = models.copy_packed(tmp_path / "old-pack")
    manifest_path = packed / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest.pop("dense_sha256")
    manifest_path.write_text(json.dumps(manifest))
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, max_tokens=MAX_TOKENS, models=models)
    (node,) = nodes(1)
    sm = coordinator(packed, token, [node.address], 2 * read_manifest(packed).expert_bytes)
    try:
        wait_for_placement(sm)
        result = generate(sm, prompt, max_tokens=MAX_TOKENS)
        assert result.token_ids == expected
        assert sm.cluster.stats.experts_from_peers > 0 and sm.cluster.stats.fallbacks == 0
    finally:
        sm.close()
