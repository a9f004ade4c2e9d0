"""One snapshot of a streaming model's counters; two snapshots subtract into a run's figures."""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .streaming import StreamingModel


@dataclass(frozen=True)
class Counters:
    t: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_evictions: int = 0
    ssd_bytes_read: int = 0
    ssd_read_seconds: float = 0.0
    ssd_reads: int = 0
    verified_reads: int = 0
    experts_from_cache: int = 0
    experts_from_ssd: int = 0
    experts_prefetched: int = 0
    experts_prefetch_used: int = 0
    prefetch_read_bytes: int = 0
    prefetch_used_bytes: int = 0
    prefetch_guessed: int = 0
    prefetch_guessed_right: int = 0
    peer_calls: int = 0
    experts_from_peers: int = 0
    fallbacks: int = 0
    moe_layer_calls: int = 0
    routing_wait_s: float = 0.0
    dispatch_s: float = 0.0

    def __sub__(self, earlier: Counters) -> Counters:
        return Counters(**{f.name: getattr(self, f.name) - getattr(earlier, f.name) for f in fields(self)})

    @property
    def cache_hit_rate(self) -> float | None:
        lookups = self.cache_hits + self.cache_misses
        return self.cache_hits / lookups if lookups else None

    @property
    def ssd_read_gbps(self) -> float | None:
        return self.ssd_bytes_read / self.ssd_read_seconds / 1e9 if self.ssd_read_seconds > 0 else None

    @property
    def prefetch_accuracy(self) -> float | None:
        return self.prefetch_guessed_right / self.prefetch_guessed if self.prefetch_guessed else None


def snapshot(sm: StreamingModel) -> Counters:
    """Every counter of `sm` now (cumulative since it was loaded)."""
    local, store = sm.local, sm.local.store
    cache = local.cache_stats
    guessed, right = sm.guesses()
    cluster = sm.cluster.stats if sm.cluster is not None else None
    times = sm.layer_times()
    return Counters(
        t=time.perf_counter(),
        cache_hits=cache.hits,
        cache_misses=cache.misses,
        cache_evictions=cache.evictions,
        ssd_bytes_read=store.stats.bytes_read,
        ssd_read_seconds=store.stats.read_seconds,
        ssd_reads=store.stats.reads,
        verified_reads=store.stats.verified,
        experts_from_cache=local.stats.experts_from_cache,
        experts_from_ssd=local.stats.experts_from_ssd,
        experts_prefetched=local.stats.prefetched,
        experts_prefetch_used=local.stats.prefetch_used,
        prefetch_read_bytes=local.stats.prefetch_read_bytes,
        prefetch_used_bytes=local.stats.prefetch_used_bytes,
        prefetch_guessed=guessed,
        prefetch_guessed_right=right,
        peer_calls=cluster.peer_calls if cluster else 0,
        experts_from_peers=cluster.experts_from_peers if cluster else 0,
        fallbacks=cluster.fallbacks if cluster else 0,
        moe_layer_calls=times.calls,
        routing_wait_s=times.routing_wait_s,
        dispatch_s=times.dispatch_s,
    )
