"""uvicorn's h11 protocol with the two limits it lacks: a deadline for each request's headers,
and a cap on open connections; and a cap on the size of a request's headers.

uvicorn times out only the wait *between* requests (`timeout_keep_alive`): a client that
sends half its headers, and never the rest, holds a connection (a file descriptor) for
ever. Its `limit_concurrency` answers 503 to every request once that many connections are
open, idle ones included, so a crowd of idle connections would still lock /health out.
Here a new connection beyond the cap closes the oldest *idle* one instead (waiting for
headers or between requests): idle connections cost nothing once the cap is reached, and
a client that sends its request at once is always served.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from .schema import error_response


class LimitedH11Protocol(H11Protocol):
    max_connections = 1024
    header_timeout_s = 10.0
    # this server's connections, oldest first (a dict keeps insertion order); set per server
    opened: dict[LimitedH11Protocol, None]

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.opened[self] = None
        self._arm_header_timer()
        if len(self.opened) > self.max_connections:
            # the oldest idle connection, or this one when every other is in the middle of a request
            victim = next((c for c in self.opened if c.idle and not c.transport.is_closing()), self)
            victim.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.opened.pop(self, None)
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.idle:  # no request yet from this data (and uvicorn cancelled its keep-alive timer on it)
            self._arm_header_timer()
        else:
            self._cancel_header_timer()

    @property
    def idle(self) -> bool:
        """No response in progress: waiting for a request's headers, between two requests, or
        receiving the rest of a body that the answer did not need (after a 401, say)."""
        return self.cycle is None or self.cycle.response_complete

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.idle and not self.transport.is_closing():
            self.transport.close()


def protocol_class(max_connections: int, header_timeout_s: float) -> type[LimitedH11Protocol]:
    """The protocol class for one server: its limits, and its own list of open connections."""
    return type("LimitedH11Protocol", (LimitedH11Protocol,),
                {"max_connections": max_connections, "header_timeout_s": header_timeout_s, "opened": {}})


class HeaderCap:
    """Refuses (431) a request whose line and headers pass `max_bytes`. h11's own cap
    (h11_max_incomplete_event_size) holds only while the headers are incomplete: headers
    that arrive whole in one read pass it."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = len(scope["method"]) + len(scope["raw_path"]) + len(scope["query_string"]) + sum(
                len(name) + len(value) + 4 for name, value in scope["headers"])  # ": " and CRLF
            if size > self.max_bytes:
                response = error_response(431, f"The request's headers are {size} bytes; this server takes at most "
                                          f"{self.max_bytes} (edgemoe serve --max-header-kb)",
                                          code="headers_too_large", headers={"Connection": "close"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
