"""`edgemoe serve`: an OpenAI-compatible HTTP server (Starlette on uvicorn).

Endpoints: POST /v1/chat/completions and POST /v1/completions (with
`"stream": true` as server-sent events ending in `data: [DONE]`, or one JSON
object), GET /v1/models, GET /v1/models/{id}, GET /health, GET /metrics
(Prometheus text format).

Concurrency: MLX generation is single-threaded, so the server *queues*: one
worker thread owns the model (it loads it and is the only thread that runs it)
and generates for one request at a time, in arrival order. Any number of
clients may connect at once; each waits its turn and gets exactly the answer it
would have got alone. HTTP handling (parsing, tokenizing, streaming the text
back) runs on the event loop meanwhile. A client that disconnects cancels its
request: a queued one is skipped, a running one stops between two tokens.

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`,
with a 4xx status for the caller's mistakes (malformed body 400, unknown model
404, bad `max_tokens` 400, prompt longer than the context 400, missing or wrong
API key 401) and for what passes a limit (body 413, headers 431, slow body 408,
full queue 429 with Retry-After); the server keeps serving after each.

Modules: `worker` (the MLX worker thread), `schema` (OpenAI's request and answer
shapes), `body` (the body read with a cap, strict JSON), `limits` (each limit's
default, the open-file limit), `connections` (header deadline, connection cap,
header size), `metrics` (Prometheus), `app` (routes, auth, bind and serve).
"""

from .app import create_app, serve

__all__ = ["create_app", "serve"]
