"""The HTTP app of `edgemoe serve`: Starlette routes, the API key, and binding and serving on uvicorn.

Parsing, tokenizing and streaming the text back run on the event loop while the
worker generates; a client that disconnects cancels its request.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edgemoe.node.errors import EdgemoeError

from . import schema
from .body import parse_json, read_body
from .connections import HeaderCap, protocol_class
from .dashboard import HEADERS, Dashboard, page
from .limits import DEFAULT_LIMITS, ServeLimits, raise_open_file_limit
from .metrics import CONTENT_TYPE, ServerMetrics
from .schema import DEFAULT_MAX_TOKENS, ApiError, Chunks, Params, error_response
from .worker import Engine, Job, QueueFull

log = logging.getLogger(__name__)


class Service:
    """The endpoints: checks the key, parses requests, queues jobs on the engine, shapes the answers like OpenAI's."""

    def __init__(self, engine: Engine, model_id: str, aliases: set[str], api_key: str | None = None,
                 default_max_tokens: int = DEFAULT_MAX_TOKENS, limits: ServeLimits = DEFAULT_LIMITS):
        self.engine = engine
        self.limits = limits
        self.metrics: ServerMetrics = engine.metrics
        self.model_id = model_id
        self.aliases = aliases | {model_id}
        self.api_key = api_key
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        config = engine.sm.config
        self.context_length = schema.config_value(config, "max_position_embeddings")
        self.vocab_size = schema.config_value(config, "vocab_size")
        self.max_prompt_chars = limits.prompt_chars(self.context_length)
        self.dashboard = Dashboard(engine)

    @property
    def tokenizer(self) -> Any:
        return self.engine.sm.tokenizer

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

    async def _body(self, request: Request) -> dict:
        self.check_key(request)
        raw = await read_body(request, self.limits.max_body_bytes, self.limits.header_timeout_s)
        # a large body takes a while to parse: off the event loop, which must keep serving /health
        parsed = await run_in_threadpool(parse_json, raw, self.limits.max_json_depth)
        return schema.check_body(parsed, self.model_id, self.aliases)

    def _params(self, body: dict, prompt_ids: list[int], prompt_param: str) -> Params:
        return schema.params(body, prompt_ids, prompt_param, self.context_length, self.default_max_tokens,
                             self.limits.max_tokens)

    # -- endpoints

    async def chat_completions(self, request: Request) -> Response:
        body = await self._body(request)
        prompt_ids = await run_in_threadpool(schema.chat_prompt, self.tokenizer, body, self.max_prompt_chars)
        return await self._complete(request, body, self._params(body, prompt_ids, "messages"), chat=True)

    async def completions(self, request: Request) -> Response:
        body = await self._body(request)
        prompt_ids = await run_in_threadpool(schema.completion_prompt, self.tokenizer, body, self.vocab_size,
                                             self.max_prompt_chars)
        return await self._complete(request, body, self._params(body, prompt_ids, "prompt"), chat=False)

    async def _complete(self, request: Request, body: dict, params: Params, chat: bool) -> Response:
        job = Job(params, asyncio.get_running_loop())
        try:
            self.engine.submit(job)
        except QueueFull as full:
            raise ApiError(429, f"The server is busy: {self.engine.max_jobs} requests are queued or running "
                           "(edgemoe serve --max-queue); retry later", type="server_busy", code="queue_full",
                           headers={"Retry-After": str(full.retry_after_s)}) from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        endpoint = "chat" if chat else "completions"
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(self._stream(job, Chunks(rid, chat, self.model_id), include_usage, endpoint),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        try:
            text, finish, tokens = [], "", []
            while True:
                event = await job.events.get()
                if event[0] == "text":
                    text.append(event[1])
                elif event[0] == "error":
                    self.metrics.requests.labels(endpoint=endpoint, outcome="error").inc()
                    return error_response(500, event[1], type="server_error", code="generation_failed")
                else:
                    finish, tokens = event[1], event[2]
                    break
        finally:
            watcher.cancel()
            job.cancel()  # no-op once done; stops a generation whose handler was cancelled
        self.metrics.requests.labels(endpoint=endpoint, outcome=finish).inc()
        return JSONResponse(schema.completion(rid, chat, self.model_id, "".join(text), finish, tokens,
                                              len(params.prompt_ids), bool(body.get("return_token_ids"))))

    async def _stream(self, job: Job, chunks: Chunks, include_usage: bool, endpoint: str) -> AsyncIterator[str]:
        finished = False
        try:
            for start in chunks.start():
                yield start
            while True:
                event = await job.events.get()
                if event[0] == "text":
                    yield chunks.text(event[1])
                elif event[0] == "error":
                    self.metrics.requests.labels(endpoint=endpoint, outcome="error").inc()
                    yield chunks.error(event[1])
                    break
                else:
                    finish, tokens = event[1], event[2]
                    self.metrics.requests.labels(endpoint=endpoint, outcome=finish).inc()
                    yield chunks.finish(finish)
                    if include_usage:
                        yield chunks.usage(len(job.params.prompt_ids), len(tokens))
                    break
            yield schema.DONE
            finished = True
        finally:
            if not finished:  # the client went away (the response task was cancelled): stop generating
                job.cancel()
                self.metrics.requests.labels(endpoint=endpoint, outcome="disconnected").inc()

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
        """200 and "ok", or 503 and "degraded" with the reason once generation failed on the expert store:
        that failure stays until the files are repaired and the server restarted, so a monitor must see it."""
        sm, failure = self.engine.sm, self.engine.failure
        body = {"status": "degraded" if failure else "ok", "model": self.model_id,
                "nodes": len(sm.cluster.peers) if sm.cluster is not None else 0}
        if failure:
            body["reason"] = failure
        return JSONResponse(body, status_code=503 if failure else 200)

    async def dashboard_page(self, request: Request) -> Response:
        """The page holds no data: it asks for the key (URL fragment or prompt) and reads the events with it."""
        return HTMLResponse(page(), headers=HEADERS)

    async def dashboard_events(self, request: Request) -> Response:
        self.check_key(request)
        if self.dashboard.streams >= self.limits.max_dashboards:
            raise ApiError(429, f"{self.limits.max_dashboards} dashboards are open already; close one (or raise "
                           "--max-dashboards)", type="server_busy", code="too_many_dashboards")
        return StreamingResponse(self.dashboard.events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def render_metrics(self, request: Request) -> Response:
        self.check_key(request)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)


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
        service.metrics.errors.labels(status=str(exc.status)).inc()
        return exc.response()

    async def http_error(request: Request, exc: HTTPException) -> Response:
        service.metrics.errors.labels(status=str(exc.status_code)).inc()
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code,
                              headers=getattr(exc, "headers", None))

    routes = [
        Route("/v1/chat/completions", service.chat_completions, methods=["POST"]),
        Route("/v1/completions", service.completions, methods=["POST"]),
        Route("/v1/models", service.models, methods=["GET"]),
        Route("/v1/models/{model:path}", service.model, methods=["GET"]),
        Route("/health", service.health, methods=["GET"]),
        Route("/metrics", service.render_metrics, methods=["GET"]),
        Route("/", service.dashboard_page, methods=["GET"]),
        Route("/v1/dashboard/events", service.dashboard_events, methods=["GET"]),
    ]
    # The ignore: starlette types every handler as taking a plain Exception, though it calls
    # each with the exception class it is registered for.
    handlers = {ApiError: api_error, HTTPException: http_error}
    return Starlette(routes=routes, exception_handlers=handlers)  # type: ignore[arg-type]


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
          default_max_tokens: int = DEFAULT_MAX_TOKENS, limits: ServeLimits = DEFAULT_LIMITS) -> None:
    """Loads the model, listens on host:port and serves until SIGINT/SIGTERM."""
    import uvicorn

    if api_key is not None and not api_key.strip():
        raise EdgemoeError("--api-key must not be empty")
    max_connections = raise_open_file_limit(limits.max_connections)
    sock = bind(host, port)
    if api_key is None and not _loopback(host):
        log.warning("serving on %s without --api-key: anyone who can reach this address can use the model", host)
    metrics = ServerMetrics()
    engine = Engine(load, metrics, limits.max_queue)
    try:
        engine.start()
    except BaseException:
        sock.close()
        raise
    try:
        resolved = model_dir.resolve()
        service = Service(engine, resolved.name, {str(model_dir), str(resolved)}, api_key, default_max_tokens,
                          limits)
        app = create_app(service)
        bound_host, bound_port = sock.getsockname()[:2]
        url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        print(f"edgemoe: serving {service.model_id} at http://{url_host}:{bound_port}/v1"
              f"{' (API key required)' if api_key else ''}", file=sys.stderr, flush=True)
        # uvicorn's limit_concurrency is left off: it would answer 503 to /health once idle
        # connections fill it; the protocol's own cap closes idle ones instead.
        config = uvicorn.Config(HeaderCap(app, limits.max_header_bytes), log_level="warning", access_log=False,
                                timeout_graceful_shutdown=3,
                                http=protocol_class(max_connections, limits.header_timeout_s), ws="none",
                                timeout_keep_alive=limits.keep_alive_timeout_s,
                                h11_max_incomplete_event_size=limits.max_header_bytes)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        engine.close()
