"""The long form (`make soak`, EDGEMOE_SOAK=1; skipped otherwise): `SOAK_REQUESTS` requests
through a real `edgemoe serve`, completions and chats, streamed and not, from a few clients
at once. Every request succeeds, a fixed request's answer stays mlx-lm's throughout, and
the server's resident memory after warm-up grows by less than `RSS_GROWTH_BOUND`."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import mlx_lm_tokens
from test_server import KEY, start_server, stop_server

SOAK = os.environ.get("EDGEMOE_SOAK", "") not in ("", "0")
pytestmark = [pytest.mark.soak, pytest.mark.skipif(not SOAK, reason="the long form: run `make soak`")]

WARMUP_REQUESTS = 100
SOAK_REQUESTS = 1000
CLIENTS = 4  # under serve's queue of 16: none is refused with 429
MAX_TOKENS = 4
# Resident memory may grow this much from after warm-up to the end (allocator slack, MLX's
# buffer cache); a leak of a few KiB per request over 1,000 requests shows well above it.
RSS_GROWTH_BOUND = 64 * 2**20
# Every this many requests the reference request is sent and compared with mlx-lm's answer.
CHECK_EVERY = 100
REFERENCE_PROMPT = "Once upon a time"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def request(http: httpx.Client, model: str, i: int) -> None:
    """Request number `i`: the endpoint, streaming and prompt vary with it."""
    text = f"request {i}: the node said {i * 7919 % 1000} words"
    stream = i % 3 == 0
    if i % 2:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}
    else:
        path, body = "/v1/completions", {"prompt": text}
    body.update(model=model, max_tokens=MAX_TOKENS, stream=stream, temperature=0.7 if i % 5 == 0 else 0.0, seed=i)
    response = http.post(path, json=body)
    assert response.status_code == 200, f"request {i}: {response.status_code} {response.text[:300]}"
    if stream:
        assert response.text.rstrip().endswith("data: [DONE]"), f"request {i}: {response.text[-300:]}"
    else:
        assert response.json()["usage"]["completion_tokens"] >= 1, f"request {i}: {response.text[:300]}"


@pytest.mark.slow
def test_a_thousand_requests_through_serve_keep_rss_flat(models, tmp_path, capsys):
    src, packed = models.src("qwen3_moe", True), models.packed("qwen3_moe", True)
    tokenizer = models.mlx_lm_model(src)[1]
    _, expected_text = mlx_lm_tokens(src, list(tokenizer.encode(REFERENCE_PROMPT)), max_tokens=MAX_TOKENS,
                                     models=models)
    server = start_server(packed, tmp_path / "server.log", "--api-key", KEY)
    http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                        limits=httpx.Limits(max_connections=CLIENTS))
    lock = threading.Lock()

    def reference_matches() -> None:
        response = http.post("/v1/completions", json={"model": server.model_id, "prompt": REFERENCE_PROMPT,
                                                      "temperature": 0, "max_tokens": MAX_TOKENS})
        assert response.status_code == 200 and response.json()["choices"][0]["text"] == expected_text, response.text

    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(lambda i: request(http, server.model_id, i), range(WARMUP_REQUESTS)))
            start = rss_bytes(server.proc.pid)
            peak = start
            done = 0

            def one(i: int) -> None:
                nonlocal peak, done
                request(http, server.model_id, WARMUP_REQUESTS + i)
                with lock:
                    done += 1
                    peak = max(peak, rss_bytes(server.proc.pid))
                    check = done % CHECK_EVERY == 0
                if check:
                    reference_matches()

            list(pool.map(one, range(SOAK_REQUESTS)))
        end = rss_bytes(server.proc.pid)
        assert server.proc.poll() is None
        reference_matches()
    finally:
        http.close()
        stop_server(server.proc)
    with capsys.disabled():
        print(f"\nsoak: {WARMUP_REQUESTS} warm-up + {done} requests ({CLIENTS} clients, {MAX_TOKENS} tokens each), "
              f"serve RSS after warm-up {start / 2**20:.1f} MiB, at the end {end / 2**20:.1f} MiB "
              f"(+{(end - start) / 2**20:.1f} MiB), peak {peak / 2**20:.1f} MiB")
    assert done == SOAK_REQUESTS
    assert end - start < RSS_GROWTH_BOUND, f"RSS grew {(end - start) / 2**20:.1f} MiB over {done} requests"
