"""`edgemoe serve` against hostile and greedy clients: every limit refuses with the right status, and the
server keeps serving. Real server processes on loopback, raw sockets where a client would not misbehave."""

from __future__ import annotations

import json
import os
import resource
import select
import socket
import subprocess
import sys
import time

import httpx
import pytest
from conftest import PROMPT, REPO, cli_env, run_cli, unavailable
from test_server import KEY, Server, start_server, stop_server, wait_for

AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = ("--api-key", KEY, "--max-queue", "1", "--max-tokens-limit", "3000", "--max-body-mb", "1",
          "--max-prompt-chars", "2000", "--max-json-depth", "8", "--header-timeout", "1", "--keep-alive-timeout", "1",
          "--max-header-kb", "4", "--max-dashboards", "1")


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    srv = start_server(models.packed("qwen3_moe", True), tmp_path_factory.mktemp("limits") / "server.log", *LIMITS)
    try:
        yield srv
    finally:
        stop_server(srv.proc)


def post(server: Server, body: dict | bytes, path: str = "/v1/completions") -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}{path}", content=content, timeout=60,
                      headers={**AUTH, "Content-Type": "application/json"})


def completion(server: Server, **kw) -> dict:
    return {"model": server.model_id, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, **kw}


def error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> str:
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert code is None or e["code"] == code, e
    assert param is None or e["param"] == param, e
    return e["message"]


def still_serving(server: Server) -> None:
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    r = post(server, completion(server))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def connect(server: Server) -> socket.socket:
    url = httpx.URL(server.url)
    return socket.create_connection((url.host, url.port), timeout=10)


def request_head(server: Server, length: int | None, path: str = "/v1/completions", key: str = KEY) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\n{framing}\r\n\r\n").encode()


def read_response(sock: socket.socket) -> bytes:
    """What the server sent until it closed the connection (a reset after its answer counts as closed)."""
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


# -- the body


def test_body_over_the_limit_is_413_before_it_is_read(server):
    # announced too large: refused on the headers alone, and the connection closed
    with connect(server) as sock:
        sock.sendall(request_head(server, 256 * 2**20))
        response = read_response(sock)
    assert status_of(response) == 413 and b"--max-body-mb" in response
    # streamed (chunked, no length) past the cap: refused as it passes, not read whole
    before = peak_rss(server.proc.pid)
    sent, answer = 0, b""
    with connect(server) as sock:
        sock.sendall(request_head(server, None))
        chunk = b"%x\r\n" % (256 * 2**10) + b" " * (256 * 2**10) + b"\r\n"
        try:
            while sent < 64 * 2**20 and not answer:
                sock.sendall(chunk)
                sent += 256 * 2**10
                if select.select([sock], [], [], 0)[0]:
                    answer = read_response(sock)
        except (BrokenPipeError, ConnectionResetError):
            pass
    assert sent < 8 * 2**20  # the server closed the connection soon after the cap (1 MiB)
    assert not answer or status_of(answer) == 413
    assert peak_rss(server.proc.pid) - before < 32 * 2**20
    still_serving(server)


def test_slow_body_is_408(server):
    body = json.dumps(completion(server)).encode()
    with connect(server) as sock:
        sock.sendall(request_head(server, len(body)) + body[:10])
        response = read_response(sock)  # the rest never comes: --header-timeout 1 for the body too
    assert status_of(response) == 408
    with connect(server) as sock:  # answered before its body (401): trickling the rest does not hold it open
        sock.sendall(request_head(server, len(body), key="wrong") + body[:10])
        assert status_of(sock.recv(65536)) == 401
        closed = False
        for i in range(50):  # 10 s at most; --header-timeout is 1
            try:
                sock.sendall(body[10 + i : 11 + i])
                closed = select.select([sock], [], [], 0.2)[0] != [] and sock.recv(65536) == b""
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            if closed:
                break
        assert closed


# -- what the body says


def test_prompt_over_the_character_cap_is_refused(server):
    message = error(post(server, completion(server, prompt="x" * 2001)), 400, "context_length_exceeded", "prompt")
    assert "--max-prompt-chars" in message
    flood = [{"role": "user", "content": ""}] * 300  # empty messages count too: 300 x (4 + 8) > 2000
    error(post(server, {"model": server.model_id, "messages": flood}, "/v1/chat/completions"), 400,
          "context_length_exceeded", "messages")
    assert post(server, completion(server, prompt="x " * 900)).status_code == 200


def test_prompt_is_not_tokenized_past_the_cap():
    from edgemoe.coordinator.server.schema import ApiError, chat_prompt, completion_prompt

    class Tokenizer:
        chat_template = None

        def encode(self, text):
            raise AssertionError("tokenized")

        apply_chat_template = encode

    with pytest.raises(ApiError) as refused:
        completion_prompt(Tokenizer(), {"prompt": "y" * 101}, None, 100)
    assert refused.value.status == 400
    with pytest.raises(ApiError):
        chat_prompt(Tokenizer(), {"messages": [{"role": "user", "content": "y" * 90}]}, 100)


@pytest.mark.parametrize("value", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"1" * 5000])
def test_non_finite_numbers_are_400(server, value):
    body = b'{"model": "%s", "prompt": "hi", "max_tokens": 2, "temperature": %s}' % (server.model_id.encode(), value)
    error(post(server, body), 400, "invalid_json")


def test_seeds_outside_what_mlx_takes_are_400(server):
    for seed in (2**80, 2**64, -1):
        assert "2**64-1" in error(post(server, completion(server, seed=seed)), 400, "invalid_value", "seed")
    assert post(server, completion(server, seed=2**64 - 1, temperature=1.0)).status_code == 200


def test_deep_json_is_400(server):
    error(post(server, b"[" * 100_000 + b"]" * 100_000), 400, "invalid_json")
    error(post(server, b'{"a": ' * 100_000 + b"1" + b"}" * 100_000), 400, "invalid_json")

    def nested(depth: int) -> list:
        value: list = []
        for _ in range(depth - 2):  # the body object and the innermost list make two
            value = [value]
        return value

    assert "--max-json-depth" in error(post(server, completion(server, extra=nested(9))), 400, "invalid_json")
    # At the limit the JSON parses: what refuses it then is the unknown parameter.
    error(post(server, completion(server, extra=nested(8))), 400, "unknown_parameter", "extra")


def test_max_tokens_over_the_server_limit_is_400(server):
    assert "--max-tokens-limit" in error(post(server, completion(server, max_tokens=3001)), 400, "invalid_value",
                                         "max_tokens")
    assert post(server, completion(server, max_tokens=5)).status_code == 200


# -- the queue and the RNG


def test_full_queue_is_429_with_retry_after(server):
    """--max-queue 1: while one request generates, the next is refused at once, and served once it is done."""
    before = server.metrics()["edgemoe_tokens_generated_total"]
    with connect(server) as sock:
        body = json.dumps(completion(server, max_tokens=3000, stream=True)).encode()
        sock.sendall(request_head(server, len(body)) + body)
        wait_for(server, lambda m: m["edgemoe_tokens_generated_total"] > before, "generation to start")
        r = post(server, completion(server))
        assert r.headers["retry-after"].isdigit() and int(r.headers["retry-after"]) >= 1
        error(r, 429, "queue_full")
        assert r.json()["error"]["type"] == "server_busy"
    wait_for(server, lambda m: m["edgemoe_queue_depth"] == 0, "the cancelled request to leave the queue")
    still_serving(server)


def test_an_unseeded_request_does_not_follow_a_seeded_one(server):
    """MLX's random state is global: without a fresh seed of its own, an unseeded request after a
    seed=7 one samples on from seed 7's state, so it is the same every time it follows one."""
    def sample(**kw) -> list[int]:
        r = post(server, completion(server, max_tokens=24, temperature=2.0, return_token_ids=True, **kw))
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]

    seeded, first = sample(seed=7), sample()
    assert sample(seed=7) == seeded  # a seed still reproduces
    second = sample()
    assert first != second
    assert seeded not in (first, second)


# -- connections


def test_dashboards_over_the_limit_are_429(server):
    url = f"{server.url}/v1/dashboard/events"
    with httpx.Client(timeout=10, headers=AUTH) as client:
        with client.stream("GET", url) as first:
            assert first.status_code == 200
            lines = first.iter_lines()  # kept: a dropped iterator closes the stream
            assert next(lines).startswith("data: ")  # it is streaming
            with client.stream("GET", url) as second:  # never read whole: a 200 would stream on
                assert second.status_code == 429
                second.read()
                assert second.json()["error"]["code"] == "too_many_dashboards"
                assert "--max-dashboards" in second.json()["error"]["message"]
    # The stream's slot is given back once the server sees the client gone (its next tick).
    for _ in range(50):
        with httpx.Client(timeout=10, headers=AUTH) as client, client.stream("GET", url) as again:
            if again.status_code == 200:
                break
        time.sleep(0.2)
    assert again.status_code == 200
    still_serving(server)


def test_half_sent_headers_are_closed_after_the_header_timeout(server):
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
        assert read_response(sock) == b""  # closed by the server (10 s socket timeout otherwise)
    with connect(server) as sock:  # idle after a request: --keep-alive-timeout 1
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert status_of(read_response(sock)) == 200


def test_headers_over_the_limit_are_refused(server):
    big = {"X-Padding": "p" * 6000}  # over --max-header-kb 4
    assert "--max-header-kb" in error(httpx.get(f"{server.url}/health", headers=big, timeout=10), 431,
                                      "headers_too_large")
    with connect(server) as sock:  # trickled, never finished: refused once the buffer passes the cap
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: ")
        for _ in range(6):
            sock.sendall(b"p" * 1024)
            if select.select([sock], [], [], 0.2)[0]:
                break
        assert status_of(read_response(sock)) == 400
    assert httpx.get(f"{server.url}/health", headers={"X-Padding": "p" * 2000}, timeout=10).status_code == 200


def open_file_limits(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as f:
        line = next(line for line in f if line.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


def test_two_thousand_idle_connections_do_not_lock_out_health(models, tmp_path):
    """2,000 connections with half-sent headers: the server keeps at most --max-connections (500) open by
    closing the oldest idle ones, and /health and a real request still answer. It raised its soft
    open-file limit to the hard one (mlx-lm's import sets 2048 and 4096)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        unavailable(f"this test needs 4,096 open files (mlx-lm's import sets that hard limit), not {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2200), hard))
    srv = start_server(models.packed("qwen3_moe", True), tmp_path / "server.log", "--max-connections", "500",
                       "--header-timeout", "120",
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 4096)))
    idle: list[socket.socket] = []
    try:
        assert open_file_limits(srv.proc.pid) == (4096, 4096)
        url = httpx.URL(srv.url)
        for _ in range(2000):
            sock = socket.create_connection((url.host, url.port), timeout=10)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            idle.append(sock)
        assert httpx.get(f"{srv.url}/health", timeout=10).json()["status"] == "ok"
        r = httpx.post(f"{srv.url}/v1/completions", json=completion(srv), timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert len(os.listdir(f"/proc/{srv.proc.pid}/fd")) < 500 + 200
    finally:
        for sock in idle:
            sock.close()
        stop_server(srv.proc)


def test_open_file_limit_is_raised_and_caps_connections():
    code = ("import resource; from edgemoe.coordinator.server.limits import raise_open_file_limit; "
            "print(raise_open_file_limit(8000), resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), cwd=REPO,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096)), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3584", "4096"]  # soft raised to the hard limit; FD_RESERVE (512) kept back
    assert "raise the hard limit" in out.stderr


# -- flags and health


@pytest.mark.parametrize("flags, message", [
    (("--max-queue", "0"), "--max-queue must be positive"),
    (("--header-timeout", "nan"), "--header-timeout must be positive"),
    (("--max-tokens", "600", "--max-tokens-limit", "500"), "--max-tokens 600 is over --max-tokens-limit 500"),
])
def test_bad_limit_flags_are_one_line_errors(models, flags, message):
    r = run_cli("serve", "--model", models.packed("qwen3_moe", True), "--port", "0", "--peers", "none", *flags,
                timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("edgemoe: error: ")
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_health_is_degraded_after_a_store_failure(models, tmp_path):
    packed = models.copy_packed(tmp_path / "damaged.edgemoe")
    for path in (packed / "experts").iterdir():  # every expert fails its checksum; sizes stay right
        path.write_bytes(os.urandom(path.stat().st_size))
    srv = start_server(packed, tmp_path / "server.log")
    try:
        r = httpx.post(f"{srv.url}/v1/completions", json=completion(srv), timeout=60)
        assert r.status_code == 500 and "fails its checksum" in r.json()["error"]["message"]
        health = httpx.get(f"{srv.url}/health", timeout=10)
        assert health.status_code == 503
        assert health.json()["status"] == "degraded" and "fails its checksum" in health.json()["reason"]
    finally:
        stop_server(srv.proc)


def test_peer_stats_stay_constant_size():
    from edgemoe.coordinator.peers import RTT_BUCKETS_MS, PeerStats

    stats = PeerStats()
    samples = [(i % 997) * 0.37 for i in range(100_000)]

    def shape() -> dict:
        return {k: len(v) if isinstance(v, (list, dict, set, tuple)) else type(v) for k, v in vars(stats).items()}

    stats.observe_rtt(samples[0])
    first = shape()
    for ms in samples[1:]:
        stats.observe_rtt(ms)
    assert shape() == first
    buckets, count, total = stats.rtt_histogram()
    assert count == len(samples) and total == pytest.approx(sum(samples))
    assert (stats.rtt_min_ms, stats.rtt_max_ms) == (min(samples), max(samples))
    assert stats.mean_rtt_ms == pytest.approx(sum(samples) / len(samples))
    assert buckets == [(bound, sum(ms <= bound for ms in samples)) for bound in RTT_BUCKETS_MS]
