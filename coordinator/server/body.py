"""A request's body: read with a cap and a deadline, and parsed as strict JSON (finite numbers, bounded nesting)."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

from starlette.requests import ClientDisconnect, Request

from .schema import ApiError

# Errors after which the rest of the body is not read: the connection must close, or its
# unread bytes would be taken for the next request.
CLOSE = {"Connection": "close"}


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The whole body, or 413 as soon as it is known to pass `max_bytes` (from Content-Length, or
    while it streams in), or 408 if it has not all come within `timeout_s`."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise _too_large(int(length), max_bytes)
    try:
        return await asyncio.wait_for(_read(request, max_bytes), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"The request body did not arrive within {timeout_s:g} s", code="request_timeout",
                       headers=CLOSE) from None
    except ClientDisconnect:
        raise ApiError(400, "The client closed the connection before sending the whole body",
                       code="invalid_json", headers=CLOSE) from None


async def _read(request: Request, max_bytes: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(None, max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(length: int | None, max_bytes: int) -> ApiError:
    size = f"{length} bytes" if length is not None else f"over {max_bytes} bytes"
    return ApiError(413, f"The request body is {size}; this server accepts at most {max_bytes} "
                    "(edgemoe serve --max-body-mb)", code="request_too_large", headers=CLOSE)


class _Refused(ValueError):
    """A JSON value this server does not take (JSONDecodeError's own messages are its parent's)."""


def _refuse_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as inf
        raise _Refused(f"{text} is out of range for a number")
    return value


def parse_json(raw: bytes, max_depth: int) -> Any:
    """The body as JSON: NaN, Infinity and numbers out of float range are refused (Python's json
    takes them), and so is nesting deeper than `max_depth`."""
    try:
        value = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:  # json's own recursion guard, far deeper than max_depth
        raise _too_deep(max_depth) from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, _Refused, ints over 4300 digits
        raise ApiError(400, f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    if _depth_over(value, max_depth):
        raise _too_deep(max_depth)
    return value


def _too_deep(max_depth: int) -> ApiError:
    return ApiError(400, f"The request body nests deeper than {max_depth} levels (edgemoe serve --max-json-depth)",
                    code="invalid_json")


def _depth_over(value: Any, max_depth: int) -> bool:
    """Whether `value` nests deeper than `max_depth` (a walk with its own stack, not recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > max_depth:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False
