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
API key 401); the server keeps serving after each.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import queue
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edgemoe.node.errors import EdgemoeError

from .metrics import CONTENT_TYPE, ServerMetrics

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 512
MAX_STOP_SEQUENCES = 4


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# ---------------------------------------------------------------------------
# Generation: one worker thread owns the model.


@dataclass
class Params:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


class StopText:
    """Cuts the output at the first stop string, holding back text that may be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0

    def feed(self, piece: str) -> tuple[str, bool]:
        """The text that is safe to send now, and whether a stop string was reached."""
        self.text += piece
        found = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if found:
            end = min(found)
            out, self.sent = self.text[self.sent:end], end
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text) - self.sent), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        end = len(self.text) - hold
        out, self.sent = self.text[self.sent:end], end
        return out, False

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


class Job:
    """One request's generation; events go from the worker thread to the request's event loop."""

    def __init__(self, params: Params, loop: asyncio.AbstractEventLoop):
        self.params = params
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def emit(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    """Owns the streaming model in one worker thread and runs queued jobs one at a time, in order."""

    def __init__(self, load: Callable[[], Any], metrics: ServerMetrics):
        self._load = load
        self.metrics = metrics
        self.sm = None
        self._jobs: queue.Queue = queue.Queue()
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="edgemoe-generate", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    def submit(self, job: Job) -> None:
        self.metrics.queue_depth.inc()
        self._jobs.put(job)

    def close(self, timeout: float = 10.0) -> None:
        self._closing = True
        self._jobs.put(None)
        self._thread.join(timeout)
        if self.sm is not None and not self._thread.is_alive():
            self.sm.close()

    def _run(self) -> None:
        try:
            self.sm = self._load()
            self.metrics.attach(self.sm)
        except BaseException as exc:  # reported by start()
            self._load_error = exc
            self._ready.set()
            return
        self._ready.set()
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                if job.cancelled.is_set() or self._closing:
                    self.metrics.requests.labels(endpoint="any", outcome="cancelled").inc()
                    continue
                self._generate(job)
            except Exception as exc:  # a generation failure fails its request, not the server
                log.exception("generation failed")
                job.emit(("error", f"generation failed: {exc}"))
            finally:
                self.metrics.queue_depth.dec()

    def _generate(self, job: Job) -> None:
        import mlx.core as mx
        from mlx_lm.generate import stream_generate
        from mlx_lm.sample_utils import make_sampler

        p, sm, metrics = job.params, self.sm, self.metrics
        if p.seed is not None:
            mx.random.seed(p.seed)
        sampler = make_sampler(temp=p.temperature, top_p=p.top_p)
        stop = StopText(p.stop)
        tokens: list[int] = []
        finish, last = "length", None
        metrics.prompt_tokens.inc(len(p.prompt_ids))
        for response in stream_generate(sm.model, sm.tokenizer, mx.array(p.prompt_ids), max_tokens=p.max_tokens,
                                        sampler=sampler):
            if job.cancelled.is_set() or self._closing:
                finish = "cancelled"
                break
            last = response
            tokens.append(response.token)
            metrics.tokens_generated.inc()
            out, stopped = stop.feed(response.text)
            if out:
                job.emit(("text", out))
            if stopped:
                finish = "stop"
                break
            if response.finish_reason:
                finish = response.finish_reason
        else:
            out = stop.flush()
            if out:
                job.emit(("text", out))
        if last is not None:
            metrics.last_tokens_per_s.set(last.generation_tps)
            metrics.last_prompt_tokens_per_s.set(last.prompt_tps)
        job.emit(("done", finish, tokens))


# ---------------------------------------------------------------------------
# Request parsing.


def _number(body: dict, name: str, default, lo: float, hi: float, lo_open: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"'{name}' must be a number, got {json.dumps(value)}", param=name, code="invalid_type")
    if value < lo or (lo_open and value == lo) or value > hi:
        bound = f"{'>' if lo_open else '>='} {lo} and <= {hi}"
        raise ApiError(400, f"'{name}' is {value}; it must be {bound}", param=name, code="invalid_value")
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOP_SEQUENCES:
            raise ApiError(400, f"'stop' has {len(stop)} sequences; at most {MAX_STOP_SEQUENCES} are allowed",
                           param="stop", code="invalid_value")
        return stop
    raise ApiError(400, "'stop' must be a string or a list of strings", param="stop", code="invalid_type")


def _message_text(content: Any, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", param=f"messages[{i}].content",
                               code="invalid_value")
        return "".join(parts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                   param=f"messages[{i}].content", code="invalid_type")


class Service:
    """The HTTP side: parses requests, queues jobs on the engine, shapes the answers like OpenAI's."""

    def __init__(self, engine: Engine, model_id: str, aliases: set[str], api_key: str | None = None,
                 default_max_tokens: int = DEFAULT_MAX_TOKENS):
        self.engine = engine
        self.model_id = model_id
        self.aliases = aliases | {model_id}
        self.api_key = api_key
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        config = engine.sm.config
        self.context_length = config.get("max_position_embeddings") or (config.get("text_config") or {}).get(
            "max_position_embeddings")

    @property
    def tokenizer(self):
        return self.engine.sm.tokenizer

    # -- checks

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "You didn't provide an API key: pass it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")

    async def body(self, request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"The request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object", code="invalid_json")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' is required: a string", param="model", code="missing_required_parameter")
        if model not in self.aliases:
            raise ApiError(404, f"The model '{model}' does not exist; this server serves '{self.model_id}'",
                           param="model", code="model_not_found")
        if body.get("n", 1) != 1:
            raise ApiError(400, "Only n=1 is supported", param="n", code="invalid_value")
        if not isinstance(body.get("stream", False), bool):
            raise ApiError(400, "'stream' must be a boolean", param="stream", code="invalid_type")
        return body

    def params(self, body: dict, prompt_ids: list[int], prompt_param: str) -> Params:
        n = len(prompt_ids)
        if n == 0:
            raise ApiError(400, "The prompt encodes to no tokens", param=prompt_param, code="invalid_value")
        ctx = self.context_length
        if ctx and n >= ctx:
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, your prompt is {n} "
                           "tokens. Please shorten the prompt.", param=prompt_param, code="context_length_exceeded")
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = body.get(name)
        if max_tokens is None:
            max_tokens = min(self.default_max_tokens, ctx - n) if ctx else self.default_max_tokens
        elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise ApiError(400, f"'{name}' must be an integer, got {json.dumps(max_tokens)}", param=name,
                           code="invalid_type")
        elif max_tokens < 1:
            raise ApiError(400, f"'{name}' is {max_tokens}; it must be at least 1", param=name, code="invalid_value")
        elif ctx and n + max_tokens > ctx:
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                           f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} in the completion). Please "
                           "reduce the prompt or the completion length.", param=name, code="context_length_exceeded")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ApiError(400, "'seed' must be an integer", param="seed", code="invalid_type")
        return Params(
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
            top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)),
            seed=seed,
            stop=_stop(body),
        )

    def chat_prompt(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' is required: a non-empty list", param="messages",
                           code="missing_required_parameter")
        chat = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, f"messages[{i}] must be an object with a 'role'", param=f"messages[{i}]",
                               code="invalid_value")
            chat.append({"role": m["role"], "content": _message_text(m.get("content"), i)})
        tokenizer = self.tokenizer
        if getattr(tokenizer, "chat_template", None):
            try:
                ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True)
            except Exception as exc:  # the template's own checks (roles, order)
                raise ApiError(400, f"The model's chat template refused the messages: {exc}", param="messages",
                               code="invalid_value") from None
            return list(ids)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in chat) + "assistant: "
        return list(tokenizer.encode(text))

    def completion_prompt(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = self.engine.sm.config.get("vocab_size") or (self.engine.sm.config.get("text_config") or {}).get(
                "vocab_size")
            if vocab and any(t < 0 or t >= vocab for t in prompt):
                raise ApiError(400, f"'prompt' holds token ids outside [0, {vocab})", param="prompt",
                               code="invalid_value")
            return prompt
        raise ApiError(400, "'prompt' is required: a string, a list of one string, or a list of token ids",
                       param="prompt", code="invalid_value")

    # -- endpoints

    async def chat_completions(self, request: Request) -> Response:
        self.check_key(request)
        body = await self.body(request)
        prompt_ids = await run_in_threadpool(self.chat_prompt, body)
        return await self._complete(request, body, self.params(body, prompt_ids, "messages"), chat=True)

    async def completions(self, request: Request) -> Response:
        self.check_key(request)
        body = await self.body(request)
        prompt_ids = await run_in_threadpool(self.completion_prompt, body)
        return await self._complete(request, body, self.params(body, prompt_ids, "prompt"), chat=False)

    async def _complete(self, request: Request, body: dict, params: Params, chat: bool) -> Response:
        job = Job(params, asyncio.get_running_loop())
        self.engine.submit(job)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        endpoint = "chat" if chat else "completions"
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(self._stream(job, rid, chat, include_usage, endpoint),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        try:
            text, finish, tokens = [], None, []
            while True:
                event = await job.events.get()
                if event[0] == "text":
                    text.append(event[1])
                elif event[0] == "error":
                    self.engine.metrics.requests.labels(endpoint=endpoint, outcome="error").inc()
                    return error_response(500, event[1], type="server_error", code="generation_failed")
                else:
                    finish, tokens = event[1], event[2]
                    break
        finally:
            watcher.cancel()
            job.cancel()  # no-op once done; stops a generation whose handler was cancelled
        self.engine.metrics.requests.labels(endpoint=endpoint, outcome=finish).inc()
        content = "".join(text)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": content}
        else:
            choice["text"] = content
        if body.get("return_token_ids"):  # an extension (as in vLLM): the generated token ids
            choice["token_ids"] = tokens
        return JSONResponse({
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_id,
            "system_fingerprint": None,
            "choices": [choice],
            "usage": _usage(len(params.prompt_ids), len(tokens)),
        })

    async def _stream(self, job: Job, rid: str, chat: bool, include_usage: bool, endpoint: str):
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta_or_text, finish=None, extra: dict | None = None) -> str:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
            if chat:
                choice["delta"] = delta_or_text
            else:
                choice["text"] = delta_or_text
            data = {"id": rid, "object": obj, "created": created, "model": self.model_id, "choices": [choice]}
            if extra:
                data.update(extra)
            return f"data: {json.dumps(data)}\n\n"

        finished = False
        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            while True:
                event = await job.events.get()
                if event[0] == "text":
                    yield chunk({"content": event[1]} if chat else event[1])
                elif event[0] == "error":
                    self.engine.metrics.requests.labels(endpoint=endpoint, outcome="error").inc()
                    error = {"message": event[1], "type": "server_error", "param": None, "code": "generation_failed"}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    break
                else:
                    finish, tokens = event[1], event[2]
                    self.engine.metrics.requests.labels(endpoint=endpoint, outcome=finish).inc()
                    yield chunk({} if chat else "", finish)
                    if include_usage:
                        data = {"id": rid, "object": obj, "created": created, "model": self.model_id, "choices": [],
                                "usage": _usage(len(job.params.prompt_ids), len(tokens))}
                        yield f"data: {json.dumps(data)}\n\n"
                    break
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:  # the client went away (the response task was cancelled): stop generating
                job.cancel()
                self.engine.metrics.requests.labels(endpoint=endpoint, outcome="disconnected").inc()

    async def models(self, request: Request) -> Response:
        self.check_key(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        self.check_key(request)
        if request.path_params["model"] not in self.aliases:
            raise ApiError(404, f"The model '{request.path_params['model']}' does not exist", param="model",
                           code="model_not_found")
        return JSONResponse(self._model_card())

    def _model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "edgemoe",
                "context_length": self.context_length}

    async def health(self, request: Request) -> Response:
        sm = self.engine.sm
        return JSONResponse({"status": "ok", "model": self.model_id,
                             "nodes": len(sm.cluster.peers) if sm.cluster is not None else 0})

    async def metrics(self, request: Request) -> Response:
        self.check_key(request)
        return Response(self.engine.metrics.render(), media_type=CONTENT_TYPE)


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Waits (after the body is read) for the client to go away, and cancels its job if it does."""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancel()
                return
    except (asyncio.CancelledError, Exception):
        return


def create_app(service: Service) -> Starlette:
    async def api_error(request: Request, exc: ApiError) -> Response:
        service.engine.metrics.errors.labels(status=str(exc.status)).inc()
        return exc.response()

    async def http_error(request: Request, exc: HTTPException) -> Response:
        service.engine.metrics.errors.labels(status=str(exc.status_code)).inc()
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code,
                              headers=getattr(exc, "headers", None))

    routes = [
        Route("/v1/chat/completions", service.chat_completions, methods=["POST"]),
        Route("/v1/completions", service.completions, methods=["POST"]),
        Route("/v1/models", service.models, methods=["GET"]),
        Route("/v1/models/{model:path}", service.model, methods=["GET"]),
        Route("/health", service.health, methods=["GET"]),
        Route("/metrics", service.metrics, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={ApiError: api_error, HTTPException: http_error})


# ---------------------------------------------------------------------------
# The command.


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise EdgemoeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(model_dir: Path, host: str, port: int, load: Callable[[], Any], api_key: str | None = None,
          default_max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
    """Loads the model, listens on host:port and serves until SIGINT/SIGTERM."""
    import uvicorn

    if api_key is not None and not api_key.strip():
        raise EdgemoeError("--api-key must not be empty")
    sock = bind(host, port)
    if api_key is None and not _loopback(host):
        log.warning("serving on %s without --api-key: anyone who can reach this address can use the model", host)
    metrics = ServerMetrics()
    engine = Engine(load, metrics)
    try:
        engine.start()
    except BaseException:
        sock.close()
        raise
    try:
        resolved = model_dir.resolve()
        service = Service(engine, resolved.name, {str(model_dir), str(resolved)}, api_key, default_max_tokens)
        app = create_app(service)
        bound_host, bound_port = sock.getsockname()[:2]
        url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        print(f"edgemoe: serving {service.model_id} at http://{url_host}:{bound_port}/v1"
              f"{' (API key required)' if api_key else ''}", file=sys.stderr, flush=True)
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        engine.close()
