"""Property-based fuzzing (hypothesis) of what a cluster member or an HTTP client can send:
every RPC of a real `edge-node` over mutual TLS, and the JSON bodies of `edgemoe serve`.
Whatever arrives: no crash, no hang (each call has a timeout), a clear error (a gRPC status
the node chose, an error reply, or a 4xx JSON error), and the service still serves.

Examples per property: `EXAMPLES` by default, `SOAK_EXAMPLES` under `make soak`
(EDGEMOE_SOAK=1). Derandomized: the same examples every run."""

from __future__ import annotations

import json
import os
import signal

import grpc
import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from nodes import NodeProcess, coordinator, wait_for_placement
from test_server import KEY, start_server, stop_server

from edgemoe.node.credentials import CHANNEL_OPTIONS, ClusterCredentials, channel_credentials, format_token, new_secret
from edgemoe.node.dtypes import WIRE_DTYPES
from edgemoe.node.manifest import read_manifest
from edgemoe.protos import edgemoe_node_pb2 as pb
from edgemoe.protos import edgemoe_node_pb2_grpc as pb_grpc

SOAK = os.environ.get("EDGEMOE_SOAK", "") not in ("", "0")
EXAMPLES = 50
SOAK_EXAMPLES = 500
RPC_TIMEOUT_S = 20.0
HTTP_TIMEOUT_S = 60.0
HIDDEN_SIZE = 64
# Statuses a node sends on purpose for a request it refuses; anything else (UNKNOWN, INTERNAL
# from an uncaught exception, UNAVAILABLE from a crash, DEADLINE_EXCEEDED from a hang) is a bug.
CLEAR_STATUSES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                  grpc.StatusCode.RESOURCE_EXHAUSTED}

FUZZ = settings(max_examples=SOAK_EXAMPLES if SOAK else EXAMPLES, deadline=None, derandomize=True,
                database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                      HealthCheck.data_too_large])

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
small = st.integers(0, 80)


class Target:
    """A real node holding experts of the tiny model, a stub to it, and a request it must answer."""

    def __init__(self, node: NodeProcess, channel: grpc.Channel, fingerprint: str, layer: int, expert: int,
                 num_layers: int, spec: pb.ModelSpec):
        self.node, self.channel, self.stub = node, channel, pb_grpc.EdgeNodeStub(channel)
        self.fingerprint = fingerprint
        self.layer, self.expert, self.num_layers, self.spec = layer, expert, num_layers, spec
        self.held_experts = [expert]

    def valid_compute(self) -> pb.ComputeRequest:
        hidden = np.ones((1, HIDDEN_SIZE), np.float32)
        return pb.ComputeRequest(request_id=7, fingerprint=self.fingerprint, layer=self.layer, rows=[0],
                                 experts=[self.expert],
                                 hidden=pb.Tensor(dtype="float32", shape=[1, HIDDEN_SIZE], data=hidden.tobytes()))

    def still_serving(self) -> None:
        assert self.node.proc.poll() is None, "the node died"
        info = self.stub.Info(pb.InfoRequest(), timeout=RPC_TIMEOUT_S)
        assert any(m.fingerprint == self.fingerprint for m in info.models)
        (reply,) = list(self.stub.Compute(iter([self.valid_compute()]), timeout=RPC_TIMEOUT_S))
        assert not reply.error and list(reply.output.shape) == [1, HIDDEN_SIZE], reply.error


@pytest.fixture(scope="module")
def target(models, tmp_path_factory):
    from edgemoe.node.holdings import layer_specs_to_json

    packed = models.packed("qwen3_moe", True)
    manifest = read_manifest(packed)
    token = format_token(new_secret())
    node = NodeProcess(token, tmp_path_factory.mktemp("fuzz-node"), args=("--max-models", "2"))
    channel = None
    try:
        sm = coordinator(packed, token, [node.address], manifest.expert_bytes)
        try:
            wait_for_placement(sm)
            held = set(sm.cluster.peers[0].held)
            layer, expert = sorted(held)[0]
        finally:
            sm.close()
        channel = grpc.secure_channel(node.address, channel_credentials(ClusterCredentials.from_token(token, "fuzz")),
                                      options=CHANNEL_OPTIONS)
        spec = pb.ModelSpec(fingerprint=manifest.fingerprint, config_json=(packed / "config.json").read_bytes(),
                            layers_json=layer_specs_to_json(manifest))
        t = Target(node, channel, manifest.fingerprint, layer, expert, len(manifest.layers), spec)
        t.held_experts = sorted(e for l, e in held if l == layer)
        t.still_serving()
        yield t
        t.still_serving()
    finally:
        if channel is not None:
            channel.close()
        node.stop(signal.SIGKILL)


def _refused_clearly(err: grpc.RpcError) -> None:
    assert err.code() in CLEAR_STATUSES, f"{err.code()}: {err.details()}"
    details = err.details() or ""
    assert details and "\n" not in details and "Traceback" not in details, details


# --- gRPC: Info, PushExperts, Compute ---


def _raw_info(target: Target, raw: bytes):
    """Info called with `raw` as the request's bytes, not a serialized message."""
    call = target.channel.unary_unary("/edgemoe.node.v1.EdgeNode/Info", request_serializer=None,
                                      response_deserializer=pb.NodeInfo.FromString)
    return call(raw, timeout=RPC_TIMEOUT_S)


def _parses(raw: bytes) -> bool:
    try:
        pb.InfoRequest.FromString(raw)
        return True
    except Exception:  # noqa: BLE001 - protobuf's DecodeError, whose module depends on the backend
        return False


@FUZZ
@given(raw=st.binary(max_size=256))
def test_fuzzed_info_requests(target, raw):
    """Info takes no fields: any bytes that parse as an InfoRequest (unknown fields are skipped)
    get the node's info; bytes that do not parse are refused with INVALID_ARGUMENT, and the
    node serves on."""
    parses = _parses(raw)
    try:
        info = _raw_info(target, raw)
        assert parses and info.protocol_version > 0
    except grpc.RpcError as err:
        assert not parses and err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert target.node.proc.poll() is None


def test_an_undecodable_request_is_invalid_argument(target):
    assert not _parses(b"\x00")
    with pytest.raises(grpc.RpcError) as err:
        _raw_info(target, b"\x00")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value


def test_many_undecodable_requests_leave_the_node_serving(target):
    """About 80 undecodable requests used to stop a node answering anything (grpc.aio's own
    parse-error path): a member could hang a node with them."""
    for i in range(200):
        with pytest.raises(grpc.RpcError) as err:
            _raw_info(target, b"\x00\x01" + bytes([i % 256]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert _raw_info(target, b"").protocol_version > 0


def tensors():
    return st.builds(pb.Tensor, dtype=st.one_of(st.sampled_from(sorted(WIRE_DTYPES) + ["int32", "object", ""]),
                                                st.text(max_size=12)),
                     shape=st.lists(st.one_of(st.integers(-2, 130), i64), max_size=4),
                     data=st.one_of(st.binary(max_size=1024),
                                    st.integers(0, 8).map(lambda n: bytes(n * HIDDEN_SIZE * 4))))


@st.composite
def near_valid_compute(draw, t: Target):
    """A request the node can answer (held experts, matching shapes), then maybe one field replaced."""
    n = draw(st.integers(1, 4))
    # Each (row, expert) pair once: a repeated pair is refused.
    pairs = draw(st.lists(st.tuples(st.integers(0, n - 1), st.sampled_from(t.held_experts)), min_size=1, max_size=6,
                          unique=True))
    hidden = np.asarray(draw(st.lists(st.floats(-4, 4, width=32), min_size=n * HIDDEN_SIZE,
                                      max_size=n * HIDDEN_SIZE)), np.float32).reshape(n, HIDDEN_SIZE)
    request = pb.ComputeRequest(
        request_id=draw(u64), fingerprint=t.fingerprint, layer=t.layer,
        hidden=pb.Tensor(dtype="float32", shape=[n, HIDDEN_SIZE], data=hidden.tobytes()),
        rows=[r for r, _ in pairs], experts=[e for _, e in pairs])
    field = draw(st.sampled_from([None, "layer", "hidden", "rows", "experts", "fingerprint"]))
    if field is not None:
        random = draw(compute_requests(t))
        request.ClearField(field)
        if field == "hidden":
            request.hidden.CopyFrom(random.hidden)
        elif field in ("rows", "experts"):
            getattr(request, field).extend(getattr(random, field))
        else:
            setattr(request, field, getattr(random, field))
    return request


def compute_requests(t: Target):
    return st.builds(
        pb.ComputeRequest,
        request_id=u64,
        fingerprint=st.one_of(st.just(t.fingerprint), st.text(max_size=70)),
        layer=st.one_of(st.integers(0, t.num_layers + 1), u32),
        hidden=tensors(),
        rows=st.lists(st.one_of(st.integers(0, 9), u32), max_size=12),
        experts=st.lists(st.one_of(st.integers(0, 9), u32), max_size=12),
    )


@FUZZ
@given(data=st.data())
def test_fuzzed_compute_requests(target, data):
    requests = data.draw(st.lists(st.one_of(near_valid_compute(target), compute_requests(target)), min_size=1,
                                  max_size=4))
    try:
        replies = list(target.stub.Compute(iter(requests), timeout=RPC_TIMEOUT_S))
    except grpc.RpcError as err:
        event(f"refused: {err.code().name}")
        _refused_clearly(err)
    else:
        event("answered: " + ",".join("error" if r.error else "output" for r in replies))
        assert [r.request_id for r in replies] == [r.request_id for r in requests]
        for request, reply in zip(requests, replies):
            if reply.error:
                assert not reply.HasField("output") and "\n" not in reply.error and "Traceback" not in reply.error
            else:
                assert list(reply.output.shape) == [len(request.rows), HIDDEN_SIZE]
    assert target.node.proc.poll() is None


def push_chunks(t: Target):
    specs = st.one_of(
        st.just(t.spec),
        st.builds(pb.ModelSpec, fingerprint=st.one_of(st.just(t.fingerprint), st.text(max_size=70)),
                  config_json=st.one_of(st.just(t.spec.config_json), st.binary(max_size=200)),
                  layers_json=st.one_of(st.just(t.spec.layers_json), st.binary(max_size=200),
                                        st.dictionaries(st.text(max_size=8), st.integers(), max_size=3).map(
                                            lambda d: json.dumps(d).encode()))),
    )
    records = st.builds(pb.PushChunk, layer=st.one_of(st.integers(0, t.num_layers + 1), u32),
                        expert=st.one_of(st.integers(0, 9), u32), checksum=st.text(max_size=70),
                        record_bytes=st.one_of(st.integers(0, 2**20), u64), offset=st.one_of(small, u64),
                        data=st.binary(max_size=4096))
    return st.lists(st.one_of(records, specs.map(lambda s: pb.PushChunk(model=s))), min_size=1, max_size=5)


@FUZZ
@given(data=st.data())
def test_fuzzed_pushes(target, data):
    chunks = data.draw(push_chunks(target))
    try:
        reply = target.stub.PushExperts(iter(chunks), timeout=RPC_TIMEOUT_S)
    except grpc.RpcError as err:
        event(f"refused: {err.code().name}")
        _refused_clearly(err)
    else:
        event(f"answered, {len(reply.errors)} errors")
        # Random bytes are never a record that passes its checksum.
        assert reply.experts_stored == 0
        assert all("\n" not in e for e in reply.errors)
    assert target.node.proc.poll() is None


def test_the_node_serves_after_the_fuzzing(target):
    """Runs after the properties above (file order): the valid request still succeeds."""
    target.still_serving()


# --- HTTP: the JSON bodies of `edgemoe serve` ---


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    srv = start_server(models.packed("qwen3_moe", True), tmp_path_factory.mktemp("fuzz-serve") / "server.log",
                       "--api-key", KEY)
    try:
        yield srv
    finally:
        stop_server(srv.proc)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=HTTP_TIMEOUT_S) as client:
        yield client


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                         st.text(max_size=40))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                 st.dictionaries(st.text(max_size=10), inner,
                                                                                 max_size=4)), max_leaves=12)


def field_values(model_id: str):
    """Values for the fields the server reads: plausible ones (so requests reach the model)
    mixed with anything JSON can hold."""
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", ""]),
                                     "content": st.one_of(st.text(max_size=40), json_values)})
    return {
        "model": st.one_of(st.just(model_id), json_values),
        "prompt": st.one_of(st.text(max_size=60), st.lists(st.integers(-5, 300), max_size=8), json_values),
        "messages": st.one_of(st.lists(message, max_size=3), json_values),
        "max_tokens": st.one_of(st.integers(-3, 6), st.integers(-(2**70), 2**70), json_values),
        "max_completion_tokens": st.one_of(st.integers(-3, 6), json_values),
        "temperature": st.one_of(st.floats(-1, 3), json_values),
        "top_p": st.one_of(st.floats(-1, 2), json_values),
        "seed": st.one_of(st.integers(-(2**70), 2**70), json_values),
        "stream": st.one_of(st.booleans(), json_values),
        "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=5), json_values),
        "n": st.one_of(st.integers(-2, 3), json_values),
    }


@st.composite
def valid_body(draw, model_id: str, endpoint: str):
    """A request the server answers."""
    body: dict = {"model": model_id, "max_tokens": draw(st.integers(1, 4))}
    if endpoint.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": draw(st.text(min_size=1, max_size=30))}]
    else:
        body["prompt"] = draw(st.text(min_size=1, max_size=30))
    optional = {"temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "seed": st.integers(0, 2**31),
                "stream": st.booleans(), "stop": st.lists(st.text(min_size=1, max_size=4), max_size=3)}
    body.update(draw(st.fixed_dictionaries({}, optional=optional)))
    return body


def bodies(model_id: str, endpoint: str):
    fields = field_values(model_id)
    known = st.fixed_dictionaries({}, optional=fields)
    with_extra = st.tuples(known, st.dictionaries(st.text(max_size=10), json_values, max_size=2)).map(
        lambda kv: {**kv[1], **kv[0]})
    return st.one_of(valid_body(model_id, endpoint), known, with_extra, json_values)


def check_answer(response: httpx.Response) -> None:
    event(f"HTTP {response.status_code}")
    assert response.status_code < 500, f"{response.status_code}: {response.text[:300]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"], error
        assert "Traceback" not in error["message"]
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]"), response.text[-300:]
    else:
        assert response.json()["choices"], response.text[:300]


ENDPOINTS = ["/v1/completions", "/v1/chat/completions"]


def _short(body):
    for field in ("max_tokens", "max_completion_tokens"):
        # A valid request for thousands of tokens would only make the run long; past the
        # server's cap (4,096) it must be refused, so those stay.
        if isinstance(body, dict) and type(body.get(field)) is int and 8 < body[field] <= 4096:
            body[field] = 8
    return body


@FUZZ
@given(data=st.data(), endpoint=st.sampled_from(ENDPOINTS))
def test_fuzzed_http_bodies(server, http, data, endpoint):
    body = _short(data.draw(bodies(server.model_id, endpoint)))
    check_answer(http.post(endpoint, content=json.dumps(body)))


@pytest.mark.parametrize("field", sorted(field_values("")))
@settings(FUZZ, max_examples=max(10, FUZZ.max_examples // 5))
@given(data=st.data(), endpoint=st.sampled_from(ENDPOINTS))
def test_fuzzed_http_field(server, http, field, data, endpoint):
    """A valid request with this one field replaced: each check past the body's shape is reached."""
    body = data.draw(valid_body(server.model_id, endpoint))
    body[field] = data.draw(field_values(server.model_id)[field])
    check_answer(http.post(endpoint, content=json.dumps(_short(body))))


@FUZZ
@given(raw=st.binary(max_size=300), endpoint=st.sampled_from(ENDPOINTS))
def test_fuzzed_http_bytes(http, raw, endpoint):
    """Bodies that are not JSON at all (or JSON by accident)."""
    check_answer(http.post(endpoint, content=raw, headers={"Content-Type": "application/json"}))


def test_the_server_serves_after_the_fuzzing(server, http):
    response = http.post("/v1/completions", json={"model": server.model_id, "prompt": "Hello", "max_tokens": 3})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3, response.text
    assert server.proc.poll() is None
