"""The live dashboard of `edgemoe serve`: a static page at `/` and its state as server-sent events.

The page itself holds nothing secret (it is served without the key); every figure comes
from `/v1/dashboard/events`, which takes the API key like the other endpoints. The page
reads the events with fetch() and an Authorization header rather than EventSource, so the
key never travels in a URL (and so never lands in a log).

The model runs in the worker thread. The state is read from it without stopping it:
counters are plain integers, routing counts are copied under the cache's lock, and the
cluster's placement is replaced whole on each replan. One state is built per tick and
shared by every open dashboard, so more viewers cost no more reads.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from ..counters import snapshot

TICK_S = 0.5  # ~2 updates a second

# Where an expert lives, as the page colours it: this machine's RAM cache, only the SSD, or node k (k >= 1).
CACHE, SSD = 0, -1

HEADERS = {
    # inline script and style only; fetches back to this server only; never framed
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src data:; frame-ancestors 'none'; base-uri 'none'",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def page() -> str:
    return resources.files(__package__).joinpath("dashboard.html").read_text(encoding="utf-8")


class Dashboard:
    """Builds the dashboard's state at most once a tick, for every viewer, and counts open streams."""

    def __init__(self, engine: Any):
        self.engine = engine
        self._lock = threading.Lock()
        self._state: dict | None = None
        self._built = 0.0
        self._last_tokens: tuple[float, float] | None = None
        self.streams = 0

    def state(self) -> dict:
        with self._lock:
            now = time.monotonic()
            if self._state is None or now - self._built >= TICK_S * 0.8:
                self._state = self._build(now)
                self._built = now
            return self._state

    def _build(self, now: float) -> dict:
        engine = self.engine
        sm, metrics = engine.sm, engine.metrics
        tokens = metrics.registry.get_sample_value("edgemoe_tokens_generated_total") or 0.0
        rate = None
        if self._last_tokens is not None and now > self._last_tokens[0]:
            rate = (tokens - self._last_tokens[1]) / (now - self._last_tokens[0])
        self._last_tokens = (now, tokens)
        c = snapshot(sm)
        cluster = sm.cluster.snapshot() if sm.cluster is not None else None
        nodes = cluster["nodes"] if cluster is not None else []
        return {
            "tokens": int(tokens),
            "tok_s": rate,
            "last_tok_s": metrics.registry.get_sample_value("edgemoe_last_tokens_per_second"),
            "ttft_ms": engine.last_ttft_s * 1e3 if engine.last_ttft_s is not None else None,
            "queue": metrics.registry.get_sample_value("edgemoe_queue_depth"),
            "cache_hit_rate": c.cache_hit_rate,
            "ssd_bytes_read": c.ssd_bytes_read,
            "cache_bytes_used": sm.local.cache_bytes_used,
            "cache_budget_bytes": sm.local.budget_bytes,
            "sources": {"cache": c.experts_from_cache, "ssd": c.experts_from_ssd,
                        "nodes": [n["experts_computed"] for n in nodes]},
            "fallbacks": c.fallbacks,
            "nodes": [{"name": n["name"], "address": n["address"], "healthy": n["healthy"], "calls": n["calls"],
                       "failures": n["failures"], "rtt_ms": n["mean_rtt_ms"], "held": n["experts_held"],
                       "error": n["error"]} for n in nodes],
            "layers": self._grid(sm),
        }

    @staticmethod
    def _grid(sm: Any) -> list[dict]:
        """Every expert of every MoE layer: where it lives and its routing count (aged, as the cache keeps it)."""
        local, cluster = sm.local, sm.cluster
        counts = local.routing_counts()
        index = {id(p): i + 1 for i, p in enumerate(cluster.peers)} if cluster is not None else {}
        layers = []
        for spec in sm.manifest.layers:
            where, heat = [], []
            for e in range(spec.num_experts):
                key = (spec.layer, e)
                if key in local:
                    where.append(CACHE)
                else:
                    owner = cluster.owner(*key) if cluster is not None else None
                    where.append(index.get(id(owner), SSD) if owner is not None else SSD)
                heat.append(counts.get(key, 0))
            layers.append({"layer": spec.layer, "where": where, "count": heat})
        return layers

    async def events(self) -> AsyncIterator[str]:
        """The state as SSE, a tick apart, until the client goes away (starlette then cancels this)."""
        self.streams += 1
        try:
            while True:
                state = await asyncio.to_thread(self.state)
                yield f"data: {json.dumps(state, separators=(',', ':'))}\n\n"
                await asyncio.sleep(TICK_S)
        finally:
            self.streams -= 1
