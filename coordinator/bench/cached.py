"""Every expert cached: decode with resident layers (a device-side expert -> slot table,
no host round trip per layer) against the same decode reading each layer's routing back on
the host, alternating runs, with each one's per-layer time breakdown."""

from __future__ import annotations

import logging
import statistics
from typing import Any

from edgemoe.node.limits import array_memory_bytes, array_memory_kind

from ..streaming import StreamingModel
from .decode import REPEATS, DecodeRun, cache_everything, fresh_cache, timed_generate
from .report import Notes

log = logging.getLogger(__name__)

PER_LAYER = ("layer_us", "routing_wait_us", "dispatch_us")


def all_cached_figures(sm: StreamingModel, prompt_tokens: list[int], tokens: int,
                       mlx_lm_tokens_per_s: float | None, mlx_lm_token_ids: list[int] | None,
                       notes: Notes) -> dict[str, Any]:
    """Loads every expert into a cache that holds them all (its budget is restored after),
    if they fit in half the memory arrays live in."""
    budget = sm.local.budget_bytes
    everything = sm.manifest.total_expert_bytes
    # The old pools stay referenced until each layer's next call: both are held at once.
    if everything + budget + sm.dense_bytes > array_memory_bytes() // 2:
        notes.add(f"every-expert-cached case skipped: {everything / 2**30:.1f} GiB of experts do not fit "
                  f"in half of {array_memory_kind()}")
        return {"all_cached_budget_bytes": everything, "all_cached_tokens_per_s": None}
    log.info("every expert cached (%.1f MiB): resident tables against host routing, %d runs each",
             everything / 2**20, REPEATS)
    runs: dict[str, list[DecodeRun]] = {"resident": [], "host_routing": []}
    try:
        fresh_cache(sm, everything)
        cache_everything(sm)
        for _ in range(REPEATS):
            for name in runs:
                sm.local.resident_tables = name == "resident"
                runs[name].append(timed_generate(sm, prompt_tokens, tokens))
    finally:
        sm.local.resident_tables = True
        fresh_cache(sm, budget)
    out: dict[str, Any] = {"all_cached_budget_bytes": everything}
    for name, done in runs.items():
        prefix = "all_cached_" if name == "resident" else "all_cached_host_routing_"
        speeds = [r.tokens_per_s or 0.0 for r in done]
        median = sorted(done, key=lambda r: r.tokens_per_s or 0.0)[len(done) // 2]
        out[f"{prefix}tokens_per_s"] = statistics.median(speeds)
        out[f"{prefix}tokens_per_s_runs"] = speeds
        out[f"{prefix}cache_hit_rate"] = median.cache_hit_rate
        for field in PER_LAYER:
            out[f"{prefix}{field}"] = getattr(median, field)
        out[f"{prefix}same_tokens_as_mlx_lm"] = (all(r.token_ids == mlx_lm_token_ids for r in done)
                                                 if mlx_lm_token_ids is not None else None)
        out[f"{prefix}relative_to_mlx_lm"] = (out[f"{prefix}tokens_per_s"] / mlx_lm_tokens_per_s
                                              if mlx_lm_tokens_per_s else None)
    return out
