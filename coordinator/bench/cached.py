"""Every expert cached: decode with resident layers (a device-side expert -> slot table,
no host round trip per layer) against the same decode reading each layer's routing back on
the host and against plain mlx-lm, alternating runs, with each one's per-layer time
breakdown. Alternating matters on a GPU: its speed drifts between sittings of a few
seconds (an H200 gave plain mlx-lm 511 tok/s in one, and edgemoe 0.79 of that, where runs
alternated with mlx-lm's gave 0.95)."""

from __future__ import annotations

import logging
import statistics
from typing import Any

from edgemoe.node.limits import array_memory_bytes, array_memory_kind

from ..streaming import StreamingModel
from .decode import REPEATS, DecodeRun, cache_everything, fresh_cache, timed_generate
from .reference import MlxLmRun, PlainMlxLm
from .report import Notes

log = logging.getLogger(__name__)

PER_LAYER = ("layer_us", "routing_wait_us", "dispatch_us")
WARMUP_ROUNDS = 1


def all_cached_figures(sm: StreamingModel, prompt_tokens: list[int], tokens: int, mlx_lm: MlxLmRun | None,
                       plain: PlainMlxLm | None, notes: Notes) -> dict[str, Any]:
    """Loads every expert into a cache that holds them all (its budget is restored after),
    if they fit in half the memory arrays live in; `plain` (plain mlx-lm, loaded) runs
    between the two if it fits beside them, else it is freed and `mlx_lm` (its fastest run,
    timed earlier) is the reference."""
    budget = sm.local.budget_bytes
    everything = sm.manifest.total_expert_bytes
    # The old pools stay referenced until each layer's next call: both are held at once.
    need = everything + budget + sm.dense_bytes
    if need > array_memory_bytes() // 2:
        notes.add(f"every-expert-cached case skipped: {everything / 2**30:.1f} GiB of experts do not fit "
                  f"in half of {array_memory_kind()}")
        return {"all_cached_budget_bytes": everything, "all_cached_tokens_per_s": None}
    if plain is not None and not plain.fits_beside(need, 0):
        plain.close()
        plain = None
        notes.add("every expert cached: plain mlx-lm does not fit beside it, so its runs did not alternate "
                  "with edgemoe's; the ratio is to its fastest run, timed before")
    log.info("every expert cached (%.1f MiB): resident tables against host routing%s, %d runs each",
             everything / 2**20, " and plain mlx-lm" if plain else "", REPEATS)
    runs: dict[str, list[DecodeRun]] = {"resident": [], "host_routing": []}
    plain_runs: list[MlxLmRun] = []
    try:
        fresh_cache(sm, everything)
        cache_everything(sm)
        # A first round, not kept: on an H200 every variant's first run after the cache was
        # filled ran at about 0.6 of its later ones (mlx-lm 551 then 965 and 987 tok/s).
        for round_ in range(WARMUP_ROUNDS + REPEATS):
            kept = round_ >= WARMUP_ROUNDS
            if plain is not None:
                plain_run = plain.time(prompt_tokens, tokens)
                if kept:
                    plain_runs.append(plain_run)
            for name in runs:
                sm.local.resident_tables = name == "resident"
                run = timed_generate(sm, prompt_tokens, tokens)
                if kept:
                    runs[name].append(run)
    finally:
        sm.local.resident_tables = True
        fresh_cache(sm, budget)
    out: dict[str, Any] = {"all_cached_budget_bytes": everything, "all_cached_warmup_rounds": WARMUP_ROUNDS}
    plain_speeds = [r.tokens_per_s or 0.0 for r in plain_runs]
    out["all_cached_mlx_lm_tokens_per_s"] = statistics.median(plain_speeds) if plain_runs else None
    out["all_cached_mlx_lm_tokens_per_s_runs"] = plain_speeds or None
    reference = (out["all_cached_mlx_lm_tokens_per_s"] if plain_runs
                 else mlx_lm.tokens_per_s if mlx_lm else None)
    reference_ids = mlx_lm.token_ids if mlx_lm else None
    for name, done in runs.items():
        prefix = "all_cached_" if name == "resident" else "all_cached_host_routing_"
        speeds = [r.tokens_per_s or 0.0 for r in done]
        median = sorted(done, key=lambda r: r.tokens_per_s or 0.0)[len(done) // 2]
        out[f"{prefix}tokens_per_s"] = statistics.median(speeds)
        out[f"{prefix}tokens_per_s_runs"] = speeds
        out[f"{prefix}cache_hit_rate"] = median.cache_hit_rate
        for field in PER_LAYER:
            out[f"{prefix}{field}"] = getattr(median, field)
        ids = [r.token_ids for r in done] + [r.token_ids for r in plain_runs]
        out[f"{prefix}same_tokens_as_mlx_lm"] = (all(i == reference_ids for i in ids)
                                                 if reference_ids is not None else None)
        out[f"{prefix}relative_to_mlx_lm"] = out[f"{prefix}tokens_per_s"] / reference if reference else None
    return out
