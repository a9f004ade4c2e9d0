"""The MLX worker: one thread owns the streaming model and generates for queued requests, one at a time, in order.

MLX generation is single-threaded, so the server queues rather than running
requests side by side: each waits its turn and gets exactly the answer it would
have got alone. The queue is bounded: a job beyond it is refused (QueueFull). A job
cancelled while queued is skipped; one cancelled while it runs stops between two tokens.

Every job seeds MLX's random state itself (an unseeded one from os.urandom), so no
job's sampling follows from another's seed. A generation that fails on the expert
store (a corrupted or vanished expert file) marks the engine degraded, for /health.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from edgemoe.node.errors import EdgemoeError

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


class QueueFull(Exception):
    """The engine already holds its most jobs; `retry_after_s` guesses when one frees up."""

    def __init__(self, retry_after_s: int):
        super().__init__(retry_after_s)
        self.retry_after_s = retry_after_s


class Engine:
    """Owns the streaming model in one worker thread and runs queued jobs one at a time, in order."""

    def __init__(self, load: Callable[[], Any], metrics: ServerMetrics, max_jobs: int = 16):
        self._load = load
        self.metrics = metrics
        self.max_jobs = max_jobs
        self.sm: Any = None
        # the reason generation failed on the expert store, if it did: the server is degraded
        self.failure: str | None = None
        self._jobs: queue.Queue = queue.Queue()
        self._held = 0  # jobs queued or running; taken on the event loop, given back by the worker
        self._held_lock = threading.Lock()
        self._last_job_s = 1.0
        self.last_ttft_s: float | None = None  # the last request's time to first token, for the dashboard
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
        """Queues the job; raises QueueFull when `max_jobs` are queued or running."""
        with self._held_lock:
            if self._held >= self.max_jobs:
                raise QueueFull(min(3600, max(1, round(self._held * self._last_job_s))))
            self._held += 1
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
                started = time.monotonic()
                self._generate(job)
                self._last_job_s = time.monotonic() - started
            except EdgemoeError as exc:  # the expert store failed: this request, and /health, say why
                log.error("generation failed: %s", exc)
                self.failure = str(exc)
                job.emit(("error", f"generation failed: {exc}"))
            except Exception as exc:  # a generation failure fails its request, not the server
                log.exception("generation failed")
                job.emit(("error", f"generation failed: {exc}"))
            finally:
                with self._held_lock:
                    self._held -= 1
                self.metrics.queue_depth.dec()

    def _generate(self, job: Job) -> None:
        p, metrics = job.params, self.metrics
        stop_text = StopText(p.stop)

        def on_text(piece: str) -> None:
            out = stop_text.feed(piece)
            if out:
                job.emit(("text", out))

        metrics.prompt_tokens.inc(len(p.prompt_ids))
        # MLX's random state is global: without a seed of its own a job would sample on from the last one's
        seed = p.seed if p.seed is not None else int.from_bytes(os.urandom(8), "little")
        started, seen = time.monotonic(), False

        def on_token(_: int) -> None:
            nonlocal seen
            if not seen:
                seen = True
                self.last_ttft_s = time.monotonic() - started
            metrics.tokens_generated.inc()

        result = generate(self.sm, p.prompt_ids, p.max_tokens, temp=p.temperature, top_p=p.top_p, seed=seed,
                          on_text=on_text, on_token=on_token,
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
