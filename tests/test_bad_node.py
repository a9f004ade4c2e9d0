"""A misbehaving edge node, in process: it passes the cluster's mutual TLS, claims every
expert of the model, and then answers badly. The coordinator must read those experts
from its SSD, give mlx-lm's tokens, set the node aside, and never crash or hang."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from conftest import LONG_PROMPT, encode, mlx_lm_tokens

from edgemoe.coordinator import peers as peers_module
from edgemoe.coordinator.dispatch import LayerDispatch
from edgemoe.coordinator.generate import generate
from edgemoe.coordinator.loader import load_streaming_model
from edgemoe.node.credentials import ClusterCredentials, format_token, new_secret, server_credentials
from edgemoe.node.holdings import held_checksums_sha256
from edgemoe.node.limits import compute_backend
from edgemoe.node.manifest import read_manifest
from edgemoe.node.version import PROTOCOL_VERSION
from edgemoe.protos import edgemoe_node_pb2 as pb
from edgemoe.protos import edgemoe_node_pb2_grpc as pb_grpc

PROMPT = "The quick brown fox jumps over the lazy dog."
MAX_TOKENS = 16
# Long enough for a node set aside for 50 ms to be tried again several times.
LONG_TOKENS = 96
DEADLINE_S = 0.3
# A generation that takes longer than this has hung.
GENERATION_TIMEOUT_S = 60.0

CLOSE = object()  # end the stream without answering


def _rows_and_width(request: pb.ComputeRequest) -> tuple[int, int]:
    return len(request.rows), request.hidden.shape[1]


def _tensor(dtype: str, shape: list[int], itemsize: int) -> pb.Tensor:
    n = 1
    for d in shape:
        n *= d
    return pb.Tensor(dtype=dtype, shape=shape, data=bytes(n * itemsize))


def wrong_width(request):
    n, h = _rows_and_width(request)
    return pb.ComputeReply(request_id=request.request_id, output=_tensor("float32", [n, h + 1], 4))


def extra_rows(request):
    n, h = _rows_and_width(request)
    return pb.ComputeReply(request_id=request.request_id, output=_tensor("float32", [n + 1, h], 4))


def three_dims(request):
    n, h = _rows_and_width(request)
    return pb.ComputeReply(request_id=request.request_id, output=_tensor("float32", [n, 1, h], 4))


def other_dtype(request):
    n, h = _rows_and_width(request)
    other = "float16" if request.hidden.dtype != "float16" else "float32"
    return pb.ComputeReply(request_id=request.request_id, output=_tensor(other, [n, h], 2 if other == "float16" else 4))


def unknown_dtype(request):
    n, h = _rows_and_width(request)
    return pb.ComputeReply(request_id=request.request_id, output=_tensor("int32", [n, h], 4))


def garbage_bytes(request):
    n, h = _rows_and_width(request)
    return pb.ComputeReply(request_id=request.request_id,
                           output=pb.Tensor(dtype="float32", shape=[n, h], data=b"\xde\xad\xbe\xef" * 3 + b"\x01"))


def empty_reply(request):
    return pb.ComputeReply(request_id=request.request_id)


def error_string(request):
    return pb.ComputeReply(request_id=request.request_id, error="out of memory")


def wrong_request_id(request):
    n, h = _rows_and_width(request)
    return pb.ComputeReply(request_id=request.request_id + 1_000_000, output=_tensor("float32", [n, h], 4))


def hang(request):
    return None


def close_stream(request):
    return CLOSE


def abort_stream(request):
    return grpc.StatusCode.INTERNAL


BEHAVIOURS = {
    "wrong-width": (wrong_width, "answered shape"),
    "extra-rows": (extra_rows, "shape"),
    "three-dims": (three_dims, "answered shape"),
    "other-dtype": (other_dtype, "answered shape"),
    "unknown-dtype": (unknown_dtype, "dtype"),
    "garbage-bytes": (garbage_bytes, "bytes"),
    "empty-reply": (empty_reply, "dtype"),
    "error-string": (error_string, "out of memory"),
    "wrong-request-id": (wrong_request_id, "did not answer within"),
    "hang": (hang, "did not answer within"),
    "close-stream": (close_stream, "closed its stream"),
    "abort-stream": (abort_stream, "INTERNAL"),
}


class FakeNode(pb_grpc.EdgeNodeServicer):
    """Holds nothing, claims `holdings`; answers every compute with `behaviour(request)`:
    a reply, None (never answer), CLOSE (end the stream) or a status code (abort the stream)."""

    def __init__(self, name: str, holdings: list[pb.ModelHoldings], behaviour,
                 protocol_version: int = PROTOCOL_VERSION):
        self.name = name
        self.holdings = holdings
        self.behaviour = behaviour
        self.protocol_version = protocol_version
        self.compute_requests = 0
        self.stopped = threading.Event()

    def Info(self, request, context):
        return pb.NodeInfo(node_id=f"fake-{self.name}", name=self.name, version="0",
                           protocol_version=self.protocol_version, models=self.holdings, cache_budget_bytes=2**30,
                           backend=compute_backend())

    def PushExperts(self, request_iterator, context):
        for _ in request_iterator:
            pass
        return pb.PushReply(errors=["this node keeps nothing"])

    def Compute(self, request_iterator, context):
        for request in request_iterator:
            self.compute_requests += 1
            reply = self.behaviour(request)
            if reply is None:
                self.stopped.wait(GENERATION_TIMEOUT_S)
                return
            if reply is CLOSE:
                return
            if isinstance(reply, grpc.StatusCode):
                context.abort(reply, "the fake node gave up")
            yield reply


@pytest.fixture
def token() -> str:
    return format_token(new_secret())


@pytest.fixture
def serve_fake(token):
    """Starts FakeNodes on 127.0.0.1 with the cluster's mutual TLS; all stopped at the end."""
    servers: list[tuple[grpc.Server, FakeNode]] = []

    def start(fake: FakeNode) -> str:
        server = grpc.server(ThreadPoolExecutor(max_workers=16), options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_EdgeNodeServicer_to_server(fake, server)
        port = server.add_secure_port("127.0.0.1:0", server_credentials(ClusterCredentials.from_token(token, "fake")))
        server.start()
        servers.append((server, fake))
        return f"127.0.0.1:{port}"

    yield start
    for server, fake in servers:
        fake.stopped.set()
        server.stop(grace=None).wait(10)


@pytest.fixture
def qwen(models):
    src, packed = models.src("qwen3_moe", True), models.packed("qwen3_moe", True)
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, max_tokens=MAX_TOKENS, models=models)
    return packed, prompt, expected


def all_experts(packed, keep=lambda layer, expert: True) -> pb.ModelHoldings:
    """Holdings of every expert (or those `keep` picks), with the manifest's checksums digest."""
    manifest = read_manifest(packed)
    pairs = [(spec.layer, e) for spec in manifest.layers for e in range(spec.num_experts) if keep(spec.layer, e)]
    return pb.ModelHoldings(fingerprint=manifest.fingerprint, layers=[l for l, _ in pairs],
                            experts=[e for _, e in pairs], checksums_sha256=held_checksums_sha256(manifest, pairs))


def generate_bounded(packed, token, address, prompt, max_tokens=MAX_TOKENS, **load):
    """Loads the coordinator with one peer (and `load`'s arguments) and generates in a thread
    that must finish in time. Returns (token ids, the cluster, seconds taken)."""
    creds = ClusterCredentials.from_token(token, "coordinator")
    # The coordinator caches one expert: every other expert is the fake node's to compute.
    sm = load_streaming_model(packed, cache_bytes=read_manifest(packed).expert_bytes, peers=[address],
                              credentials=creds, **load)
    sm.cluster.deadline_s = DEADLINE_S
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["tokens"] = generate(sm, prompt, max_tokens=max_tokens).token_ids
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True, name="bad-node-generation")
    start = time.monotonic()
    try:
        worker.start()
        worker.join(GENERATION_TIMEOUT_S)
        seconds = time.monotonic() - start
        assert not worker.is_alive(), f"generation hung for {GENERATION_TIMEOUT_S:.0f} s"
        if "error" in outcome:
            raise outcome["error"]
        return outcome["tokens"], sm.cluster, seconds
    finally:
        if not worker.is_alive():
            sm.close()


@pytest.mark.parametrize("behaviour", list(BEHAVIOURS))
def test_bad_replies_fall_back_to_ssd_and_set_the_node_aside(qwen, token, serve_fake, monkeypatch, behaviour):
    # A long back-off: after its first failure the node stays aside for this whole generation.
    monkeypatch.setattr(peers_module, "MIN_BACKOFF_S", 600.0)
    packed, prompt, expected = qwen
    answer, says = BEHAVIOURS[behaviour]
    fake = FakeNode(f"fake-{behaviour}", [all_experts(packed)], answer)
    tokens, cluster, _ = generate_bounded(packed, token, serve_fake(fake), prompt)
    assert tokens == expected
    peer = cluster.peers[0]
    assert fake.compute_requests >= 1
    assert cluster.stats.peer_calls >= 1
    assert cluster.stats.fallbacks == 1
    assert cluster.stats.experts_from_peers == 0
    assert not peer.healthy
    assert peer.stats.failures == 1
    assert says in peer.last_error and fake.name in peer.last_error and "\n" not in peer.last_error


@pytest.mark.parametrize("behaviour", ["hang", "garbage-bytes", "close-stream"])
def test_a_bad_node_retried_again_and_again_never_stalls_generation(models, qwen, token, serve_fake, monkeypatch,
                                                                    behaviour):
    # A short back-off: the node comes back into use often, and fails each time.
    monkeypatch.setattr(peers_module, "MIN_BACKOFF_S", 0.05)
    monkeypatch.setattr(peers_module, "MAX_BACKOFF_S", 0.05)
    packed, prompt, _ = qwen
    expected, _ = mlx_lm_tokens(models.src("qwen3_moe", True), prompt, max_tokens=LONG_TOKENS, models=models)
    fake = FakeNode(f"fake-{behaviour}", [all_experts(packed)], BEHAVIOURS[behaviour][0])
    tokens, cluster, seconds = generate_bounded(packed, token, serve_fake(fake), prompt, max_tokens=LONG_TOKENS)
    assert tokens == expected
    assert cluster.stats.fallbacks >= 3 and cluster.stats.peer_calls == cluster.stats.fallbacks
    assert cluster.peers[0].stats.failures >= 3
    assert cluster.stats.experts_from_peers == 0
    # Each failure costs at most one deadline: a hang is not waited out twice per layer.
    assert seconds < cluster.stats.fallbacks * DEADLINE_S + 20


def test_nodes_of_another_model_or_protocol_change_nothing(qwen, token, serve_fake):
    packed, prompt, expected = qwen
    theirs = all_experts(packed)
    theirs.fingerprint = "0" * 64

    def refuse(request):
        return pb.ComputeReply(request_id=request.request_id, error=f"this node holds no experts of model "
                                                                    f"{request.fingerprint[:12]}")

    other_model = FakeNode("other-model", [theirs], refuse)
    other_protocol = FakeNode("other-protocol", [all_experts(packed)], refuse, protocol_version=PROTOCOL_VERSION + 1)
    creds = ClusterCredentials.from_token(token, "coordinator")
    sm = load_streaming_model(packed, cache_bytes=read_manifest(packed).expert_bytes,
                              peers=[serve_fake(other_model), serve_fake(other_protocol)], credentials=creds)
    try:
        sm.cluster.deadline_s = DEADLINE_S
        assert generate(sm, prompt, max_tokens=MAX_TOKENS).token_ids == expected
        stats = sm.cluster.stats
        assert (stats.peer_calls, stats.experts_from_peers, stats.fallbacks) == (0, 0, 0)
        assert other_model.compute_requests == other_protocol.compute_requests == 0
        model_peer, protocol_peer = sm.cluster.peers
        assert model_peer.held == set()
        assert not protocol_peer.healthy
        assert "protocol" in protocol_peer.last_error and "upgrade" in protocol_peer.last_error
    finally:
        sm.close()


class FakeClock:
    """`time` for the peers module: monotonic() is what the test sets."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    perf_counter = staticmethod(time.perf_counter)


def test_consecutive_failures_double_the_retry_delay_up_to_the_maximum(token, monkeypatch):
    from nodes import free_port

    clock = FakeClock()
    monkeypatch.setattr(peers_module, "time", clock)
    monkeypatch.setattr(peers_module, "MIN_BACKOFF_S", 1.0)
    monkeypatch.setattr(peers_module, "MAX_BACKOFF_S", 10.0)
    # Nothing listens there: every attempt fails.
    peer = peers_module.Peer(f"127.0.0.1:{free_port()}", ClusterCredentials.from_token(token, "coordinator"))
    try:
        for delay in [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]:
            assert not peer.connect("0" * 64, timeout=5)
            failed_at = clock.now
            clock.now = failed_at + delay - 0.001
            assert not peer.due_for_retry(), f"retried before {delay} s"
            clock.now = failed_at + delay
            assert peer.due_for_retry(), f"not retried after {delay} s"
        assert peer.stats.failures == 6 and "cannot reach node" in peer.last_error
    finally:
        peer.close()



# --- A hostile member pushing to an edge node: specs and chunks it must refuse. ---

def _spec_parts(packed) -> tuple[str, bytes, dict]:
    from edgemoe.node.holdings import layer_specs_to_json

    manifest = read_manifest(packed)
    return manifest.fingerprint, (packed / "config.json").read_bytes(), json.loads(layer_specs_to_json(manifest))


def _swap_checksums(layers: dict) -> None:
    """What a poisoner's copy of the pack says: experts 0 and 1 of the first layer swapped."""
    experts = layers["layers"][0]["experts"]
    experts[0], experts[1] = experts[1], experts[0]


def _set(path: list, value):
    def mutate(layers: dict) -> None:
        target = layers
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


HOSTILE_SPECS = {
    "poisoned checksums": (_swap_checksums, "fingerprint"),
    "negative record_bytes": (_set(["layers", 0, "record_bytes"], -4608), "record_bytes"),
    "huge record_bytes": (_set(["layers", 0, "record_bytes"], 2**62), "record_bytes"),
    "small record_bytes": (_set(["layers", 0, "record_bytes"], 64), "record_bytes"),
    "huge num_experts": (_set(["layers", 0, "num_experts"], 2**40), "num_experts"),
    "one checksum short": (lambda d: d["layers"][0]["experts"].pop(), "checksum"),
    "object dtype": (_set(["layers", 0, "tensors", 0, "dtype"], "object"), "dtype"),
    "nbytes not shape x itemsize": (_set(["layers", 0, "tensors", 0, "nbytes"], 8), "nbytes"),
    "negative shape": (_set(["layers", 0, "tensors", 0, "shape"], [-64, 1]), "size"),
    "tensor beyond the record": (_set(["layers", 0, "tensors", 0, "offset"], 2**40), "offset"),
    "overlapping tensors": (_set(["layers", 0, "tensors", 1, "offset"], 0), "overlaps"),
    "no dense_sha256": (lambda d: d.pop("dense_sha256"), "dense_sha256"),
    "quantization with other bits": (lambda d: d["layers"][0]["quantization"]["gate_proj"].update(bits=8),
                                     "quantization"),
}


@pytest.fixture(scope="module")
def hostile_target(tmp_path_factory):
    """One real edge-node on loopback and a stub for it, for the hostile pushes."""
    from nodes import NodeProcess

    from edgemoe.node.credentials import CHANNEL_OPTIONS, channel_credentials

    token = format_token(new_secret())
    data_dir = tmp_path_factory.mktemp("hostile-node")
    node = NodeProcess(token, data_dir, args=("--max-models", "1"))
    channel = grpc.secure_channel(node.address, channel_credentials(ClusterCredentials.from_token(token, "member")),
                                  options=CHANNEL_OPTIONS)
    try:
        yield pb_grpc.EdgeNodeStub(channel), data_dir
    finally:
        channel.close()
        node.stop()


def _push(stub, chunks) -> pb.PushReply:
    return stub.PushExperts(iter(chunks), timeout=30)


@pytest.mark.parametrize("case", sorted(HOSTILE_SPECS))
def test_a_hostile_spec_is_refused_with_invalid_argument_and_leaves_nothing(models, hostile_target, case):
    stub, data_dir = hostile_target
    mutate, says = HOSTILE_SPECS[case]
    fingerprint, config, layers = _spec_parts(models.packed("qwen3_moe", True))
    mutate(layers)
    spec = pb.ModelSpec(fingerprint=fingerprint, config_json=config, layers_json=json.dumps(layers).encode())
    with pytest.raises(grpc.RpcError) as err:
        _push(stub, [pb.PushChunk(model=spec)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert says in err.value.details() and "\n" not in err.value.details()
    assert list((data_dir / "models").iterdir()) == []
    assert not stub.Info(pb.InfoRequest(), timeout=10).models


def test_a_utf16_config_is_refused(models, hostile_target):
    stub, data_dir = hostile_target
    fingerprint, config, layers = _spec_parts(models.packed("qwen3_moe", True))
    spec = pb.ModelSpec(fingerprint=fingerprint, config_json=config.decode().encode("utf-16"),
                        layers_json=json.dumps(layers).encode())
    with pytest.raises(grpc.RpcError) as err:
        _push(stub, [pb.PushChunk(model=spec)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in err.value.details()
    assert list((data_dir / "models").iterdir()) == []


def test_chunks_are_checked_against_the_registered_spec_not_the_senders_claims(models, hostile_target):
    """A chunk claiming a 2**62-byte record is refused at once (the old node buffered it, growing
    without bound); the sender's checksum is not the one a record is checked against."""
    from edgemoe.node.store import ExpertStore

    stub, data_dir = hostile_target
    packed = models.packed("qwen3_moe", True)
    manifest = read_manifest(packed)
    fingerprint, config, layers = _spec_parts(packed)
    spec = pb.PushChunk(model=pb.ModelSpec(fingerprint=fingerprint, config_json=config,
                                           layers_json=json.dumps(layers).encode()))
    layer = manifest.layers[0]
    with pytest.raises(grpc.RpcError) as err:
        _push(stub, [spec, pb.PushChunk(layer=layer.layer, expert=0, record_bytes=2**62, offset=0, data=bytes(2**20))])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "record" in err.value.details()
    with ExpertStore(packed, manifest) as store:
        one, zero = store.read(layer.layer, 1).tobytes(), store.read(layer.layer, 0).tobytes()
    # Expert 1's bytes sent as expert 0, with expert 1's (true) checksum as the sender's claim.
    swapped = pb.PushChunk(layer=layer.layer, expert=0, checksum=layer.experts[1].checksum,
                           record_bytes=layer.record_bytes, offset=0, data=one)
    reply = _push(stub, [spec, swapped])
    assert reply.experts_stored == 0 and "checksum" in reply.errors[0]
    honest = pb.PushChunk(layer=layer.layer, expert=0, record_bytes=layer.record_bytes, offset=0, data=zero)
    assert _push(stub, [spec, honest]).experts_stored == 1
    info = stub.Info(pb.InfoRequest(), timeout=10)
    held = [(m.fingerprint, list(m.layers), list(m.experts)) for m in info.models]
    assert held == [(fingerprint, [layer.layer], [0])]
    assert info.disk_free_bytes > 0
    # --max-models 1: a second model is refused, with what to do.
    other = read_manifest(models.packed("qwen3_moe", False))
    _, other_config, other_layers = _spec_parts(models.packed("qwen3_moe", False))
    second = pb.ModelSpec(fingerprint=other.fingerprint, config_json=other_config,
                          layers_json=json.dumps(other_layers).encode())
    with pytest.raises(grpc.RpcError) as err:
        _push(stub, [pb.PushChunk(model=second)])
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-models" in err.value.details()


def test_a_failed_node_is_computed_here_without_waiting_for_the_others(qwen, token, serve_fake, monkeypatch):
    """Node A (even experts) fails at once; node B (odd experts) answers a request only
    once this machine has started computing A's pairs of that layer. Waiting for every
    node before any fallback would leave B unanswered until its deadline."""
    packed, prompt, expected = qwen
    b_waiting, release = threading.Event(), threading.Event()
    original = LayerDispatch._pairs

    def pairs(self, hidden, rows, experts, sort):
        if self.remote is not None and self.remote.stats.fallbacks and b_waiting.is_set():
            release.set()
        return original(self, hidden, rows, experts, sort)

    monkeypatch.setattr(LayerDispatch, "_pairs", pairs)

    def after_the_fallback(request):
        b_waiting.set()
        release.wait(30)
        return error_string(request)

    half = [all_experts(packed, lambda layer, e, parity=parity: e % 2 == parity) for parity in (0, 1)]
    fast = FakeNode("fails-at-once", [half[0]], error_string)
    slow = FakeNode("answers-after-the-fallback", [half[1]], after_the_fallback)
    creds = ClusterCredentials.from_token(token, "coordinator")
    sm = load_streaming_model(packed, cache_bytes=read_manifest(packed).expert_bytes,
                              peers=[serve_fake(fast), serve_fake(slow)], credentials=creds, node_timeout_s=20)
    try:
        result = generate(sm, prompt, max_tokens=4)
        peers = {p.name: p for p in sm.cluster.peers}
    finally:
        sm.close()
    assert result.token_ids == expected[:4]
    assert fast.compute_requests >= 1 and slow.compute_requests >= 1
    # B's answer (an error) came back once A's fallback had started: no timeout.
    assert release.is_set()
    assert "out of memory" in peers["answers-after-the-fallback"].last_error



# --- A member that lies: plausible but wrong results, or experts of other checksums. ---

def computing(packed, wrong):
    """A behaviour that computes the requested pairs for real (this process's own streaming
    model, no peers), then passes the output (and the experts to use) through `wrong`."""
    import mlx.core as mx
    import numpy as np

    from edgemoe.coordinator.streaming import StreamingExperts
    from edgemoe.node.wire import array_from_tensor, tensor_from_array

    honest = load_streaming_model(packed)
    layers = {m.dispatch.layer: m.dispatch for _, m in honest.model.named_modules() if isinstance(m, StreamingExperts)}
    lock = threading.Lock()

    def behaviour(request):
        hidden = array_from_tensor(request.hidden, max_rows=MAX_ROWS_SEEN)
        experts, scale = wrong(np.array(request.experts, dtype=np.int64))
        with lock:
            y = layers[request.layer]._pairs(hidden, np.array(request.rows, dtype=np.int64), experts, request.sort)
            y = (y * scale).astype(y.dtype) if scale != 1 else y
            mx.eval(y)
        return pb.ComputeReply(request_id=request.request_id, output=tensor_from_array(y))

    return behaviour, honest


MAX_ROWS_SEEN = 1 << 16


def test_a_node_is_told_when_the_layers_call_is_one_mlx_lm_sorts(models, token, serve_fake):
    """A long prompt's layers have 64 pairs or more, which mlx-lm computes on its sorted path:
    the requests say so (a node then sorts its fewer pairs too); a decoded token's do not."""
    src, packed = models.src("qwen3_moe", True), models.packed("qwen3_moe", True)
    prompt = encode(models, src, LONG_PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, max_tokens=4, models=models)
    behaviour, honest = computing(packed, LIES["honest"])
    seen: list[tuple[int, bool]] = []

    def recording(request):
        seen.append((request.hidden.shape[0], request.sort))
        return behaviour(request)

    try:
        tokens, cluster, _ = generate_bounded(packed, token, serve_fake(FakeNode("sorts", [all_experts(packed)],
                                                                                  recording)), prompt, max_tokens=4)
    finally:
        honest.close()
    assert tokens == expected and cluster.stats.experts_from_peers > 0 and cluster.stats.fallbacks == 0
    assert any(sort for _, sort in seen)
    assert all(not sort for rows, sort in seen if rows == 1)
LIES = {
    "honest": lambda experts: (experts, 1),
    "scaled by 1.01": lambda experts: (experts, 1.01),
    "another expert's output": lambda experts: (experts ^ 1, 1),
}


@pytest.mark.parametrize("lie", list(LIES))
def test_an_audited_node_that_lies_changes_no_token_and_is_never_used_again(qwen, token, serve_fake, monkeypatch,
                                                                            lie):
    # A short back-off: a node only set aside for a while would be used again within this generation.
    monkeypatch.setattr(peers_module, "MIN_BACKOFF_S", 0.05)
    monkeypatch.setattr(peers_module, "MAX_BACKOFF_S", 0.05)
    packed, prompt, expected = qwen
    behaviour, honest = computing(packed, LIES[lie])
    fake = FakeNode(f"fake-{lie}", [all_experts(packed)], behaviour)
    try:
        tokens, cluster, _ = generate_bounded(packed, token, serve_fake(fake), prompt, audit_rate=1.0)
    finally:
        honest.close()
    assert tokens == expected
    peer, stats = cluster.peers[0], cluster.stats
    if lie == "honest":
        # Bit for bit this machine's results: every reply audited, none set aside.
        assert stats.audits == stats.peer_calls == fake.compute_requests > 1
        assert stats.audit_failures == 0 and stats.fallbacks == 0 and not peer.distrusted
        return
    # The first reply was audited and differed: the node is never asked again.
    assert (stats.audits, stats.audit_failures, fake.compute_requests) == (1, 1, 1)
    assert stats.layers > 1 and stats.peer_calls == 1
    assert cluster.snapshot()["audit_failures"] == 1
    assert peer.distrusted and not peer.due_for_retry()
    assert fake.name in peer.last_error and "differ" in peer.last_error and "\n" not in peer.last_error


def test_audits_off_take_the_nodes_word(qwen, token, serve_fake):
    """`--audit 0`: no reply is recomputed, so a lying node goes unnoticed (what the audits are for)."""
    packed, prompt, expected = qwen
    behaviour, honest = computing(packed, LIES["scaled by 1.01"])
    fake = FakeNode("fake-unaudited", [all_experts(packed)], behaviour)
    try:
        tokens, cluster, _ = generate_bounded(packed, token, serve_fake(fake), prompt, audit_rate=0.0)
    finally:
        honest.close()
    assert cluster.stats.audits == 0 and cluster.peers[0].stats.failures == 0
    assert cluster.stats.experts_from_peers > 0 and tokens != expected


class InfoCountingNode(FakeNode):
    def __init__(self, *args, backend: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend
        self.info_requests = 0

    def Info(self, request, context):
        self.info_requests += 1
        info = super().Info(request, context)
        if self.backend is not None:
            info.backend = self.backend
        return info


def _poisoned_holdings(packed) -> pb.ModelHoldings:
    """What a node that took a poisoner's push would say it holds: every expert, under the real
    fingerprint, with the checksums of a pack whose experts 0 and 1 of each layer are swapped."""
    holdings = all_experts(packed)
    manifest = read_manifest(packed)
    for spec in manifest.layers:
        spec.experts[0], spec.experts[1] = spec.experts[1], spec.experts[0]
    holdings.checksums_sha256 = held_checksums_sha256(manifest, zip(holdings.layers, holdings.experts))
    return holdings


def test_a_node_whose_checksums_differ_is_never_used(qwen, token, serve_fake, monkeypatch):
    monkeypatch.setattr(peers_module, "MIN_BACKOFF_S", 0.05)
    monkeypatch.setattr(peers_module, "MAX_BACKOFF_S", 0.05)
    packed, prompt, expected = qwen
    # It would answer with the swapped experts' outputs, and no audit would catch them.
    behaviour, honest = computing(packed, LIES["another expert's output"])
    fake = InfoCountingNode("fake-poisoned", [_poisoned_holdings(packed)], behaviour)
    try:
        tokens, cluster, _ = generate_bounded(packed, token, serve_fake(fake), prompt, audit_rate=0.0)
    finally:
        honest.close()
    peer = cluster.peers[0]
    assert tokens == expected
    assert fake.compute_requests == 0 and cluster.stats.peer_calls == 0
    # Asked once what it holds, then never again: it is not retried like a node that was only down.
    assert fake.info_requests == 1 and not peer.due_for_retry()
    assert "checksums differ" in peer.distrusted and fake.name in peer.last_error and "\n" not in peer.last_error


def test_a_node_on_another_backend_is_not_used(qwen, token, serve_fake):
    packed, prompt, expected = qwen
    other = "cuda" if compute_backend() != "cuda" else "cpu"
    fake = InfoCountingNode("fake-other-backend", [all_experts(packed)], error_string, backend=other)
    tokens, cluster, _ = generate_bounded(packed, token, serve_fake(fake), prompt)
    peer = cluster.peers[0]
    assert tokens == expected and fake.compute_requests == 0 and peer.stats.failures >= 1
    assert f"computes on {other}" in peer.last_error and "\n" not in peer.last_error


@pytest.mark.parametrize("rate", ["nan", "-0.1", "1.5"])
def test_an_audit_rate_outside_0_to_1_is_one_line(models, capsys, rate):
    from edgemoe.coordinator.cli import main

    packed = models.packed("qwen3_moe", True)
    assert main(["generate", "--model", str(packed), "--prompt", "hi", "--peers", "none", "--audit", rate]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"edgemoe: error: --audit {float(rate)}") and err.count("\n") == 1
