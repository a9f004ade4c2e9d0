"""`edgemoe serve` as users drive it: a real server process on loopback, the official `openai` client, raw HTTP."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import PROMPT, REPO, cli_env, mlx_lm_tokens, run_cli
from prometheus_client.parser import text_string_to_metric_families

KEY = "test-key-0123"
MAX_TOKENS = 16


class Server:
    def __init__(self, proc: subprocess.Popen, log: Path, url: str, model_id: str):
        self.proc, self.log, self.url, self.model_id = proc, log, url, model_id

    def client(self, key: str = KEY, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60, **kw)

    def http(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60, **kw)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out


def start_server(model: Path, log: Path, *extra: str, timeout: float = 60, **popen) -> Server:
    f = open(log, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgemoe.coordinator.cli", "serve", "--model", str(model), "--port", "0",
         "--peers", "none", *extra],
        stdout=f, stderr=subprocess.STDOUT, env=cli_env(), cwd=REPO, **popen,
    )
    f.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", log.read_text())
        if match:
            url = match.group(1)
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return Server(proc, log, url, model.name)
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {log.read_text()}")
        time.sleep(0.1)
    stop_server(proc)
    raise AssertionError(f"server did not come up: {log.read_text()}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    packed = models.packed("qwen3_moe", True)
    srv = start_server(packed, tmp_path_factory.mktemp("serve") / "server.log", "--api-key", KEY)
    try:
        yield srv
    finally:
        stop_server(srv.proc)


@pytest.fixture(scope="module")
def reference(models):
    """mlx-lm's greedy tokens and text for a chat-templated prompt."""
    src = models.src("qwen3_moe", True)
    tokenizer = models.mlx_lm_model(src)[1]
    cache = {}

    def ref(content: str, max_tokens: int = MAX_TOKENS) -> tuple[list[int], str, int]:
        if (content, max_tokens) not in cache:
            ids = list(tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                     add_generation_prompt=True))
            tokens, text = mlx_lm_tokens(src, ids, max_tokens=max_tokens, models=models)
            cache[content, max_tokens] = tokens, text, len(ids)
        return cache[content, max_tokens]

    return ref


def chat(client, content: str, **kw):
    return client.chat.completions.create(
        model=kw.pop("model", None) or client._model_id, messages=[{"role": "user", "content": content}], **kw)


@pytest.fixture
def client(server):
    c = server.client()
    c._model_id = server.model_id
    return c


def test_chat_non_stream_equals_mlx_lm(client, reference):
    tokens, text, n_prompt = reference(PROMPT)
    r = chat(client, PROMPT, max_tokens=MAX_TOKENS, temperature=0, extra_body={"return_token_ids": True})
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == text
    assert choice.model_extra["token_ids"] == tokens
    assert choice.finish_reason == ("length" if len(tokens) == MAX_TOKENS else "stop")
    assert r.object == "chat.completion"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        n_prompt, len(tokens), n_prompt + len(tokens))


def test_chat_stream_equals_non_stream(client, reference):
    tokens, text, n_prompt = reference(PROMPT)
    stream = chat(client, PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True,
                  stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert len([p for p in pieces if p]) > 1  # really streamed, not one piece
    assert "".join(pieces) == text
    assert finish == ("length" if len(tokens) == MAX_TOKENS else "stop")
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        n_prompt, len(tokens), n_prompt + len(tokens))


def test_raw_sse_ends_with_done(server):
    with server.http() as http:
        with http.stream("POST", "/v1/chat/completions", json={
                "model": server.model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                "stream": True}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_completions_endpoint(client, server, models):
    src = models.src("qwen3_moe", True)
    ids = list(models.mlx_lm_model(src)[1].encode(PROMPT))
    tokens, text = mlx_lm_tokens(src, ids, max_tokens=MAX_TOKENS, models=models)
    r = client.completions.create(model=server.model_id, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text == text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        len(ids), len(tokens), len(ids) + len(tokens))
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=server.model_id, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True) if c.choices)
    assert streamed == text
    # token ids as the prompt
    r2 = client.completions.create(model=server.model_id, prompt=ids, max_tokens=MAX_TOKENS, temperature=0)
    assert r2.choices[0].text == text


def test_max_tokens_respected(client):
    for n in (1, 3, 7):
        r = chat(client, PROMPT, max_tokens=n, temperature=0)
        assert r.usage.completion_tokens <= n
        if r.choices[0].finish_reason == "length":
            assert r.usage.completion_tokens == n


def test_stop_strings(client, reference):
    tokens, text, _ = reference(PROMPT, 24)
    assert len(text) > 12
    stop = text[8:11]
    cut = text[: text.find(stop)]
    for value in (stop, [stop, "\u2603never\u2603"]):
        r = chat(client, PROMPT, max_tokens=24, temperature=0, stop=value)
        assert r.choices[0].message.content == cut
        assert r.choices[0].finish_reason == "stop"
        assert 0 < r.usage.completion_tokens <= len(tokens)
        streamed = chat(client, PROMPT, max_tokens=24, temperature=0, stop=value, stream=True)
        pieces, finish = [], None
        for chunk in streamed:
            for c in chunk.choices:
                pieces.append(c.delta.content or "")
                finish = c.finish_reason or finish
        assert "".join(pieces) == cut
        assert finish == "stop"


def test_sampling_seed_and_top_p(client):
    a = chat(client, PROMPT, max_tokens=12, temperature=1.0, top_p=0.9, seed=7).choices[0].message.content
    b = chat(client, PROMPT, max_tokens=12, temperature=1.0, top_p=0.9, seed=7).choices[0].message.content
    assert a == b
    others = {chat(client, PROMPT, max_tokens=12, temperature=1.5, seed=s).choices[0].message.content for s in range(4)}
    assert len(others) > 1  # temperature really samples


def test_models(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [server.model_id]
    assert client.models.retrieve(server.model_id).id == server.model_id


def test_metrics_counters_increase(client, server):
    before = server.metrics()
    chat(client, "count me", max_tokens=5, temperature=0)
    after = server.metrics()
    assert after["edgemoe_tokens_generated_total"] >= before.get("edgemoe_tokens_generated_total", 0) + 1
    assert after["edgemoe_prompt_tokens_total"] > before.get("edgemoe_prompt_tokens_total", 0)
    assert (after["edgemoe_cache_hits_total"] + after["edgemoe_cache_misses_total"]
            > before["edgemoe_cache_hits_total"] + before["edgemoe_cache_misses_total"])
    assert after["edgemoe_ssd_bytes_read_total"] > 0
    assert after["edgemoe_cache_bytes_used"] > 0
    assert after["edgemoe_last_tokens_per_second"] > 0
    assert after["edgemoe_cluster_nodes"] == 0
    assert after["edgemoe_requests_total{endpoint=chat,outcome=length}"] >= 1


def _error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return error


def test_errors_are_openai_shaped_and_server_keeps_serving(server, client):
    model = server.model_id
    msgs = [{"role": "user", "content": "hi"}]
    with server.http() as http:
        _error(http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}),
               400, "invalid_json")
        _error(http.post("/v1/chat/completions", json=[1, 2]), 400)
        assert _error(http.post("/v1/chat/completions", json={"model": "nope", "messages": msgs}), 404,
                      "model_not_found")["param"] == "model"
        for bad in (0, -5):
            assert _error(http.post("/v1/chat/completions", json={"model": model, "messages": msgs, "max_tokens": bad}),
                          400)["param"] == "max_tokens"
        _error(http.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": -1}), 400)
        _error(http.post("/v1/chat/completions", json={"model": model, "messages": msgs, "temperature": -1}), 400)
        _error(http.post("/v1/chat/completions", json={"model": model}), 400)
        long_prompt = "the quick brown fox jumps over the lazy dog " * 500  # under the character cap
        e = _error(http.post("/v1/chat/completions", json={"model": model, "messages": [
            {"role": "user", "content": long_prompt}], "max_tokens": 4}), 400, "context_length_exceeded")
        assert "4096" in e["message"]
        _error(http.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 5000}), 400,
               "context_length_exceeded")
        _error(http.get("/v1/nothing-here"), 404)
    # the openai client maps them to its exceptions
    with pytest.raises(openai.NotFoundError):
        chat(client, "hi", model="no-such-model", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        chat(client, "hi", max_tokens=-3)
    with pytest.raises(openai.AuthenticationError):
        chat(server.client(key="wrong"), "hi", model=model, max_tokens=2)
    # still serving
    assert chat(client, "hi", max_tokens=3, temperature=0).usage.completion_tokens >= 1


def test_api_key_required(server):
    body = {"model": server.model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    _error(httpx.post(f"{server.url}/v1/chat/completions", json=body), 401, "invalid_api_key")
    _error(httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"}), 401,
           "invalid_api_key")
    _error(httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Basic " + KEY}), 401)
    _error(httpx.get(f"{server.url}/metrics"), 401)
    assert httpx.get(f"{server.url}/health").status_code == 200
    ok = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200


def test_concurrent_clients_all_correct(server, reference):
    prompts = ["first question", "a second, different one", PROMPT]
    expected = {p: reference(p)[1] for p in prompts}
    got, errors = {}, []

    def ask(p: str, stream: bool) -> None:
        try:
            c = server.client()
            c._model_id = server.model_id
            if stream:
                got[p] = "".join(ch.choices[0].delta.content or "" for ch in chat(
                    c, p, max_tokens=MAX_TOKENS, temperature=0, stream=True) if ch.choices)
            else:
                got[p] = chat(c, p, max_tokens=MAX_TOKENS, temperature=0).choices[0].message.content
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(p, i % 2 == 0)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert got == expected


def wait_for(server: Server, condition, what: str, timeout: float = 60) -> dict[str, float]:
    """The server's metrics as soon as `condition(metrics)` holds; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition(metrics := server.metrics()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {metrics}"
        time.sleep(0.02)
    return metrics


def test_disconnect_mid_stream_stops_generation(server, client):
    long = 3000
    before = server.metrics()["edgemoe_tokens_generated_total"]
    url = httpx.URL(server.url)
    sock = socket.create_connection((url.host, url.port))
    body = (b'{"model": "%s", "prompt": "%s", "max_tokens": %d, "temperature": 0, "stream": true}'
            % (server.model_id.encode(), PROMPT.encode(), long))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    received = b""
    while received.count(b"data: ") < 5:
        chunk = sock.recv(65536)
        assert chunk, received
        received += chunk
    assert b" 200 " in received.split(b"\r\n", 1)[0]
    sock.close()
    # generation stops: the worker goes idle (nothing queued or running) well short of the request's max_tokens
    after = wait_for(server, lambda m: m["edgemoe_queue_depth"] == 0
                     and m.get("edgemoe_requests_total{endpoint=completions,outcome=disconnected}", 0) >= 1,
                     "the worker to go idle after the disconnect")
    assert after["edgemoe_tokens_generated_total"] - before < long / 2
    # and the next request finds the worker idle, so it is served at once
    assert chat(client, "next", max_tokens=4, temperature=0).usage.completion_tokens >= 1


def test_disconnect_while_waiting_non_stream_stops_generation(server, client):
    """A non-streaming client that gives up also stops its generation."""
    metrics = server.metrics()
    before = metrics["edgemoe_tokens_generated_total"]
    cancelled = metrics.get("edgemoe_requests_total{endpoint=completions,outcome=cancelled}", 0)
    url = httpx.URL(server.url)
    sock = socket.create_connection((url.host, url.port))
    body = (b'{"model": "%s", "prompt": "%s", "max_tokens": 3000, "temperature": 0}'
            % (server.model_id.encode(), PROMPT.encode()))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    wait_for(server, lambda m: m["edgemoe_tokens_generated_total"] >= before + 20, "generation to start", timeout=10)
    sock.close()
    after = wait_for(server, lambda m: m["edgemoe_queue_depth"] == 0
                     and m.get("edgemoe_requests_total{endpoint=completions,outcome=cancelled}", 0) > cancelled,
                     "the request to end cancelled")
    assert after["edgemoe_tokens_generated_total"] - before < 1500
    assert chat(client, "next", max_tokens=4, temperature=0).usage.completion_tokens >= 1


def test_cluster_metrics_collector():
    """Per-node calls, round trips and fallbacks, from the counters and cluster snapshots at scrape time."""
    from prometheus_client import CollectorRegistry, generate_latest

    from edgemoe.coordinator.counters import Counters
    from edgemoe.coordinator.peers import PeerStats
    from edgemoe.coordinator.server.metrics import model_families

    counters = Counters(cache_hits=3, cache_misses=2, cache_evictions=1, experts_from_cache=3, experts_from_ssd=2,
                        ssd_bytes_read=1000, ssd_read_seconds=0.01, peer_calls=99)
    node = {"address": "10.0.0.2:7070", "name": "n", "node_id": "x", "healthy": True, "calls": 4, "failures": 1,
            "experts_computed": 6, "mean_rtt_ms": 3.0, "experts_held": 2, "error": None}
    cluster = {"peer_calls": 4, "experts_from_peers": 6, "fallbacks": 1, "audits": 5, "audit_failures": 2,
               "nodes": [node]}

    stats = PeerStats()
    for ms in (2.0, 4.0, 30.0):
        stats.observe_rtt(ms)

    class Collector:
        def collect(self):
            return model_families(counters, 500, 900, cluster, {"10.0.0.2:7070": stats})

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    text = generate_latest(registry).decode()
    samples = {(s.name, s.labels.get("node")): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["edgemoe_node_calls_total", "10.0.0.2:7070"] == 4
    assert samples["edgemoe_node_failures_total", "10.0.0.2:7070"] == 1
    assert samples["edgemoe_node_experts_total", "10.0.0.2:7070"] == 6
    assert samples["edgemoe_node_experts_held", "10.0.0.2:7070"] == 2
    assert samples["edgemoe_node_healthy", "10.0.0.2:7070"] == 1
    assert samples["edgemoe_node_rtt_seconds_count", "10.0.0.2:7070"] == 3
    assert samples["edgemoe_node_rtt_seconds_sum", "10.0.0.2:7070"] == pytest.approx(0.036)
    buckets = {s.labels["le"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "edgemoe_node_rtt_seconds_bucket"}
    assert (buckets["0.001"], buckets["0.0025"], buckets["0.005"], buckets["0.025"], buckets["0.05"]) == (0, 1, 2, 2, 3)
    assert buckets["+Inf"] == 3
    assert samples["edgemoe_cluster_nodes", None] == 1
    assert samples["edgemoe_cluster_peer_calls_total", None] == 4
    assert samples["edgemoe_cluster_fallbacks_total", None] == 1
    assert samples["edgemoe_cluster_audits_total", None] == 5
    assert samples["edgemoe_cluster_audit_failures_total", None] == 2
    assert samples["edgemoe_cache_hits_total", None] == 3
    assert samples["edgemoe_cache_evictions_total", None] == 1
    assert samples["edgemoe_ssd_bytes_read_total", None] == 1000
    assert samples["edgemoe_cache_bytes_used", None] == 500


def test_port_in_use_is_a_one_line_error(models):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        r = run_cli("serve", "--model", models.packed("qwen3_moe", True), "--port", taken.getsockname()[1],
                    "--peers", "none", timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("edgemoe: error: cannot listen on 127.0.0.1:")


def test_chat_template_refusal_is_a_400():
    """A chat template that raises on the messages (roles, order) is the caller's mistake, not the server's."""
    from edgemoe.coordinator.server.schema import ApiError, chat_prompt

    class Refusing:
        chat_template = "{{ raise_exception('Conversation roles must alternate') }}"

        def apply_chat_template(self, messages, add_generation_prompt):
            raise ValueError("Conversation roles must alternate")

    with pytest.raises(ApiError) as refused:
        chat_prompt(Refusing(), {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
                    max_chars=1000)
    assert (refused.value.status, refused.value.param, refused.value.code) == (400, "messages", "invalid_value")
    assert "Conversation roles must alternate" in refused.value.message
