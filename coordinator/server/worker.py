"""The MLX worker: one thread owns the streaming model and generates for queued requests, one at a time, in order.

MLX generation is single-threaded, so the server queues rather than running
requests side by side: each waits its turn and gets exactly the answer it would
have got alone. A job cancelled while queued is skipped; one cancelled while it
runs stops between two tokens.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from ..generate import generate
from .metrics import ServerMetrics
from .schema import Params, StopText

log = logging.getLogger(__name__)


class Job:
    """One request's generation; events go from the worker thread to the request's event loop:
    ("text", piece), then ("done", finish_reason, token_ids) or ("error", message)."""

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
        self.sm: Any = None
        self._jobs: queue.Queue = queue.Queue()
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="edgemoe-generate", daemon=True)

    def start(self) -> None:
        """Loads the model in the worker thread; raises what loading raised."""
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
        p, metrics = job.params, self.metrics
        stop_text = StopText(p.stop)

        def on_text(piece: str) -> None:
            out = stop_text.feed(piece)
            if out:
                job.emit(("text", out))

        metrics.prompt_tokens.inc(len(p.prompt_ids))
        result = generate(self.sm, p.prompt_ids, p.max_tokens, temp=p.temperature, top_p=p.top_p, seed=p.seed,
                          on_text=on_text, on_token=lambda _: metrics.tokens_generated.inc(),
                          stop=lambda: stop_text.stopped or job.cancelled.is_set() or self._closing)
        finish = result.finish_reason
        if stop_text.stopped:
            finish = "stop"
        elif finish != "cancelled":
            out = stop_text.flush()
            if out:
                job.emit(("text", out))
        if result.token_ids:
            metrics.last_tokens_per_s.set(result.stats.tokens_per_s)
            metrics.last_prompt_tokens_per_s.set(result.stats.prompt_tokens_per_s)
        job.emit(("done", finish, result.token_ids))
