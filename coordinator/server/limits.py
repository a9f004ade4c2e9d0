"""What one client may make `edgemoe serve` spend: each limit a flag of `edgemoe serve`, with its default here."""

from __future__ import annotations

import argparse
import logging
import resource
from dataclasses import dataclass

from edgemoe.node.errors import EdgemoeError

log = logging.getLogger(__name__)

# File descriptors kept for everything but client connections: expert files (two per layer
# with direct I/O), gRPC channels to the nodes, the listening socket, MLX and Python's own.
FD_RESERVE = 512
# Below this many connections the server could not answer /health beside a few clients.
MIN_CONNECTIONS = 16
# Where raising the open-file limit stops when the hard limit is higher or unlimited.
MAX_OPEN_FILES = 65536

# Tokens of real text average 3-5 characters; 8 leaves room for long runs of spaces or digits
# while a prompt that cannot fit the context is still refused before tokenizing costs much.
PROMPT_CHARS_PER_TOKEN = 8
# For a model whose config names no context length.
DEFAULT_CONTEXT = 32768


@dataclass(frozen=True)
class ServeLimits:
    max_body_bytes: int = 8 * 2**20  # a request body; 413 beyond it, refused before it is read whole
    # characters of a prompt (a chat's roles and contents, 8 more per message), refused before
    # tokenizing; None: PROMPT_CHARS_PER_TOKEN per token of the model's context
    max_prompt_chars: int | None = None
    max_json_depth: int = 32  # nesting of the JSON body
    max_tokens: int = 4096  # the largest completion a request may ask for
    max_queue: int = 16  # requests waiting for or in generation; 429 beyond them
    max_connections: int = 1024  # open connections; the oldest idle one is closed for a new one
    header_timeout_s: float = 10.0  # to send a request's headers, and again its body
    keep_alive_timeout_s: int = 5  # an idle connection between two requests
    max_header_bytes: int = 16 * 2**10  # a request's line and headers together
    max_dashboards: int = 8  # dashboards streaming at once (they share one state a tick); 429 beyond them

    def prompt_chars(self, context_length: int | None) -> int:
        if self.max_prompt_chars is not None:
            return self.max_prompt_chars
        return PROMPT_CHARS_PER_TOKEN * (context_length or DEFAULT_CONTEXT)



DEFAULT_LIMITS = ServeLimits()


def limits_from_flags(args: argparse.Namespace) -> ServeLimits:
    """`edgemoe serve`'s limits: the flags given, each checked, over ServeLimits' defaults."""
    given = {
        "max_tokens": args.max_tokens_limit, "max_prompt_chars": args.max_prompt_chars,
        "max_json_depth": args.max_json_depth, "max_queue": args.max_queue, "max_connections": args.max_connections,
        "header_timeout_s": args.header_timeout, "keep_alive_timeout_s": args.keep_alive_timeout,
        "max_body_bytes": None if args.max_body_mb is None else int(args.max_body_mb * 2**20),
        "max_header_bytes": None if args.max_header_kb is None else int(args.max_header_kb * 2**10),
        "max_dashboards": args.max_dashboards,
    }
    flags = {"max_tokens": "--max-tokens-limit", "max_prompt_chars": "--max-prompt-chars",
             "max_json_depth": "--max-json-depth", "max_queue": "--max-queue", "max_connections": "--max-connections",
             "header_timeout_s": "--header-timeout", "keep_alive_timeout_s": "--keep-alive-timeout",
             "max_body_bytes": "--max-body-mb", "max_header_bytes": "--max-header-kb",
             "max_dashboards": "--max-dashboards"}
    for name, value in given.items():
        if value is not None and not value > 0:  # NaN too
            raise EdgemoeError(f"{flags[name]} must be positive")
    limits = ServeLimits(**{name: value for name, value in given.items() if value is not None})
    if args.max_tokens > limits.max_tokens:
        raise EdgemoeError(f"--max-tokens {args.max_tokens} is over --max-tokens-limit {limits.max_tokens}: "
                           "lower the one or raise the other")
    return limits


def raise_open_file_limit(max_connections: int) -> int:
    """Raises this process's soft open-file limit to the hard one (mlx-lm's import sets it to 2048);
    returns the connections it then allows: `max_connections`, or fewer with a warning."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, MAX_OPEN_FILES)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # macOS caps it below the hard limit (kern.maxfilesperproc)
            log.debug("cannot raise the open-file limit to %d: %s", target, exc)
    allowed = max(MIN_CONNECTIONS, min(max_connections, soft - FD_RESERVE))
    if allowed < max_connections:
        log.warning("the open-file limit (%d) allows %d connections, not --max-connections %d: raise the hard "
                    "limit (ulimit -Hn, or LimitNOFILE= in a systemd unit)", soft, allowed, max_connections)
    return allowed
