"""Faults injected into a running cluster on loopback: a node SIGKILLed at a random token,
a link cut and restored mid-generation, a slow node and a garbage-answering node, a node
killed while experts are pushed to it. Every generation gives mlx-lm's tokens.

`KILL_TRIALS` trials run by default; `make soak` (EDGEMOE_SOAK=1) runs `SOAK_KILL_TRIALS`.
The kill points come from a seeded RNG, so a failing trial is reproduced by its number."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from conftest import encode, mlx_lm_tokens
from nodes import NodeProcess, coordinator, wait_for_placement

from edgemoe.coordinator import peers as peers_module
from edgemoe.coordinator.cluster import Cluster
from edgemoe.coordinator.generate import generate
from edgemoe.coordinator.relay import DelayRelay
from edgemoe.node.credentials import ClusterCredentials, format_token, new_secret, server_credentials
from edgemoe.node.manifest import read_manifest
from edgemoe.protos import edgemoe_node_pb2 as pb
from edgemoe.protos import edgemoe_node_pb2_grpc as pb_grpc

PROMPT = "The quick brown fox jumps over the lazy dog."
MAX_TOKENS = 16
SOAK = os.environ.get("EDGEMOE_SOAK", "") not in ("", "0")
KILL_TRIALS = 5
SOAK_KILL_TRIALS = 25
KILL_SEED = 20261129
# A node that has not come back into use within this long after its restart is a failure.
RETURN_TIMEOUT_S = 60.0


@pytest.fixture
def token() -> str:
    return format_token(new_secret())


@pytest.fixture
def qwen(models):
    src, packed = models.src("qwen3_moe", True), models.packed("qwen3_moe", True)
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, max_tokens=MAX_TOKENS, models=models)
    return packed, prompt, expected


@pytest.fixture
def fast_retry(monkeypatch):
    """A node set aside is tried again within 0.2 s, so a returned node is back in use quickly."""
    monkeypatch.setattr(peers_module, "MIN_BACKOFF_S", 0.1)
    monkeypatch.setattr(peers_module, "MAX_BACKOFF_S", 0.2)


@pytest.fixture
def node_procs():
    """Every NodeProcess a test appends here is SIGKILLed at the end (a no-op if already gone)."""
    started: list[NodeProcess] = []
    yield started
    for node in started:
        node.stop(signal.SIGKILL)


def back_in_use(sm, prompt: list[int], expected: list[int]) -> None:
    """Generates short runs (each with mlx-lm's tokens) until the node computes experts again."""
    peer = sm.cluster.peers[0]
    before = sm.cluster.stats.experts_from_peers
    deadline = time.monotonic() + RETURN_TIMEOUT_S
    while not (peer.healthy and sm.cluster.stats.experts_from_peers > before):
        assert time.monotonic() < deadline, f"the node never came back into use: {peer.last_error}"
        assert generate(sm, prompt, max_tokens=4).token_ids == expected[:4]
        time.sleep(0.1)


def kill_points(trials: int) -> list[int]:
    """The token after which each trial's node dies: at least 3 forward passes follow it."""
    rng = random.Random(KILL_SEED)
    return [rng.randrange(1, MAX_TOKENS - 3) for _ in range(trials)]


def killer(victim: NodeProcess, after: int):
    """An on_token callback that SIGKILLs `victim` once `after` tokens have arrived."""
    seen: list[int] = []

    def on_token(token: int) -> None:
        seen.append(token)
        if len(seen) == after:
            victim.stop(signal.SIGKILL)

    return on_token


def test_a_node_sigkilled_at_a_random_token_changes_no_token(qwen, token, tmp_path, node_procs, fast_retry):
    """One coordinator, one node holding nearly every expert; each trial kills the node after a
    random token, checks the tokens, restarts the node on its port and data dir, and waits
    until the coordinator uses it again."""
    packed, prompt, expected = qwen
    data_dir = tmp_path / "node"
    node_procs.append(NodeProcess(token, data_dir))
    port = node_procs[-1].port
    sm = coordinator(packed, token, [node_procs[-1].address], read_manifest(packed).expert_bytes)
    try:
        wait_for_placement(sm)
        peer = sm.cluster.peers[0]
        for trial, kill_after in enumerate(kill_points(SOAK_KILL_TRIALS if SOAK else KILL_TRIALS)):
            victim = node_procs[-1]
            before = sm.cluster.stats.experts_from_peers
            failures = peer.stats.failures
            tokens = generate(sm, prompt, max_tokens=MAX_TOKENS,
                              on_token=killer(victim, kill_after)).token_ids
            where = f"trial {trial}, killed after token {kill_after}"
            assert victim.proc.returncode == -signal.SIGKILL, where
            assert tokens == expected, where
            # The node computed before it died, and its death was noticed.
            assert sm.cluster.stats.experts_from_peers > before, where
            assert not peer.healthy and peer.stats.failures > failures, where
            node_procs.append(NodeProcess(token, data_dir, port=port))
            back_in_use(sm, prompt, expected)
    finally:
        sm.close()


def test_a_link_cut_and_restored_mid_generation_changes_no_token(qwen, token, tmp_path, node_procs, fast_retry):
    """The node sits behind a relay; the relay is stopped after token 3 (every connection
    through it dropped, its port closed) and started again on the same port after token 8."""
    packed, prompt, expected = qwen
    node_procs.append(NodeProcess(token, tmp_path / "node"))
    target = ("127.0.0.1", node_procs[-1].port)
    relays = [DelayRelay(target, 0.0, max_lifetime_s=120).start()]
    port = relays[0].address[1]
    sm = coordinator(packed, token, [f"127.0.0.1:{port}"], read_manifest(packed).expert_bytes)
    try:
        wait_for_placement(sm)
        peer = sm.cluster.peers[0]
        seen: list[int] = []
        health_while_down: list[bool] = []

        def on_token(_token: int) -> None:
            seen.append(_token)
            if len(seen) == 3:
                relays[-1].stop()
            elif len(seen) == 8:
                health_while_down.append(peer.healthy)
                relays.append(DelayRelay(target, 0.0, listen=("127.0.0.1", port), max_lifetime_s=120).start())

        assert generate(sm, prompt, max_tokens=MAX_TOKENS, on_token=on_token).token_ids == expected
        assert health_while_down == [False], "the cut link went unnoticed"
        assert peer.stats.failures >= 1
        back_in_use(sm, prompt, expected)
        assert node_procs[-1].proc.poll() is None
    finally:
        sm.close()
        for relay in relays:
            relay.stop()


def test_a_node_slower_than_the_node_timeout_changes_no_token(qwen, token, tmp_path, node_procs):
    """0.15 s each way through the relay: every answer takes over 0.3 s, `--node-timeout` is 0.1 s."""
    packed, prompt, expected = qwen
    node_procs.append(NodeProcess(token, tmp_path / "node"))
    with DelayRelay(("127.0.0.1", node_procs[-1].port), delay_s=0.15, max_lifetime_s=120) as relay:
        sm = coordinator(packed, token, [f"127.0.0.1:{relay.address[1]}"], read_manifest(packed).expert_bytes,
                         node_timeout_s=0.1)
        try:
            wait_for_placement(sm)
            assert generate(sm, prompt, max_tokens=MAX_TOKENS).token_ids == expected
            peer = sm.cluster.peers[0]
            assert sm.cluster.stats.fallbacks >= 1 and sm.cluster.stats.experts_from_peers == 0
            assert "did not answer within 0.1s" in peer.last_error, peer.last_error
        finally:
            sm.close()


class GarbageNode(pb_grpc.EdgeNodeServicer):
    """Passes mutual TLS, claims every expert, answers each compute with bytes that are not an array."""

    def __init__(self, holdings: pb.ModelHoldings):
        self.holdings = holdings
        self.compute_requests = 0

    def Info(self, request, context):
        from edgemoe.node.limits import compute_backend

        return pb.NodeInfo(node_id="garbage", name="garbage", version="0", protocol_version=_protocol(),
                           models=[self.holdings], cache_budget_bytes=2**30, backend=compute_backend())

    def Compute(self, request_iterator, context):
        for request in request_iterator:
            self.compute_requests += 1
            yield pb.ComputeReply(request_id=request.request_id,
                                  output=pb.Tensor(dtype="float32", shape=[len(request.rows), 64], data=b"\xde\xad"))


def _protocol() -> int:
    from edgemoe.node.version import PROTOCOL_VERSION

    return PROTOCOL_VERSION


def test_a_node_answering_garbage_changes_no_token(qwen, token):
    packed, prompt, expected = qwen
    manifest = read_manifest(packed)
    pairs = [(spec.layer, e) for spec in manifest.layers for e in range(spec.num_experts)]
    from edgemoe.node.holdings import held_checksums_sha256

    fake = GarbageNode(pb.ModelHoldings(fingerprint=manifest.fingerprint, layers=[l for l, _ in pairs],
                                        experts=[e for _, e in pairs],
                                        checksums_sha256=held_checksums_sha256(manifest, pairs)))
    server = grpc.server(ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_EdgeNodeServicer_to_server(fake, server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(ClusterCredentials.from_token(token, "fake")))
    server.start()
    sm = coordinator(packed, token, [f"127.0.0.1:{port}"], manifest.expert_bytes)
    try:
        assert generate(sm, prompt, max_tokens=MAX_TOKENS).token_ids == expected
        assert fake.compute_requests >= 1 and sm.cluster.stats.fallbacks >= 1
        assert sm.cluster.stats.experts_from_peers == 0
        assert "bytes" in sm.cluster.peers[0].last_error
    finally:
        sm.close()
        server.stop(grace=None).wait(10)


def test_a_node_killed_during_a_push_restarts_consistent_and_placement_completes(qwen, token, tmp_path, node_procs,
                                                                                 monkeypatch, fast_retry):
    """The node is SIGKILLed after the coordinator has streamed it a few experts of its first
    push. Restarted on its data dir it starts clean (nothing quarantined), holds only whole,
    checked experts, placement completes, and it computes with mlx-lm's tokens."""
    packed, prompt, expected = qwen
    data_dir = tmp_path / "node"
    node_procs.append(NodeProcess(token, data_dir))
    victim, port = node_procs[-1], node_procs[-1].port
    records, killed = Cluster._records, threading.Event()

    def records_then_kill(self, keys):
        for i, record in enumerate(records(self, keys)):
            if i == 3 and not killed.is_set():
                victim.stop(signal.SIGKILL)
                killed.set()
            yield record

    monkeypatch.setattr(Cluster, "_records", records_then_kill)
    sm = coordinator(packed, token, [victim.address], read_manifest(packed).expert_bytes)
    try:
        assert killed.wait(30), "the push never started"
        assert victim.proc.returncode == -signal.SIGKILL
        node_procs.append(NodeProcess(token, data_dir, port=port))
        assert not list(data_dir.rglob(".quarantine-*")), "the killed push left a damaged store"
        back_in_use(sm, prompt, expected)
        wait_for_placement(sm)
        assert sm.cluster.placement_complete()
        fallbacks = sm.cluster.stats.fallbacks
        assert generate(sm, prompt, max_tokens=MAX_TOKENS).token_ids == expected
        # Every expert it holds it computes: none is a partial record.
        assert sm.cluster.stats.fallbacks == fallbacks and sm.cluster.stats.experts_from_peers > 0
    finally:
        sm.close()
