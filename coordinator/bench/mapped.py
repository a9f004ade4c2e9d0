"""The warm 1/8 case with mapped experts (`--map-experts`, node/mapped.py), against plain
mlx-lm in alternating runs:
- CUDA: 1/8 of the expert bytes on the GPU, the rest in host memory mapped for it; the bound
  is min(mlx-lm, host-to-device bytes/s / bytes each decoded token read over the bus);
- the CPU (Linux): the page cache's pages of the expert files (warm) mapped over the pools,
  and no cache of our own; the bound is mlx-lm."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from edgemoe.node.errors import EdgemoeError
from edgemoe.node.filemap import can_map_files
from edgemoe.node.limits import array_memory_bytes, compute_backend
from edgemoe.node.manifest import read_manifest
from edgemoe.node.mapped import MAPPED_MIN_SHARE, MappedExperts, page_mappable

from ..loader import load_streaming_model
from .decode import REPEATS, DecodeRun, eighth_budget, refill, timed_generate, warm_up
from .reference import MlxLmRun, PlainMlxLm
from .report import Notes

log = logging.getLogger(__name__)

WARMUP_ROUNDS = 1


def mapped_figures(model_dir: Path, experts_per_token: int | None, prompt_tokens: list[int], tokens: int,
                   cold_token_ids: list[int], plain: PlainMlxLm | None, mlx_lm: MlxLmRun | None,
                   host_to_device_gbps: float | None, notes: Notes) -> dict[str, Any]:
    out: dict[str, Any] = {"mapped_eighth_tokens_per_s": None}
    backend = compute_backend()
    if backend == "metal" or (backend == "cpu" and not can_map_files()):
        return out
    manifest = read_manifest(model_dir)
    # MLX counts managed memory as the GPU's, wherever its pages are.
    if backend == "cuda" and manifest.total_expert_bytes * 2 > array_memory_bytes() // 2:
        notes.add("mapped case skipped: twice the experts (the pools are rebuilt for each run) pass half of "
                  "the GPU's memory, which MLX counts them against")
        return out
    if backend == "cpu" and page_mappable(manifest)[0] < MAPPED_MIN_SHARE * manifest.total_expert_bytes:
        notes.add(f"mapped case skipped: under {MAPPED_MIN_SHARE:.0%} of the expert bytes are tensors of whole pages, "
                  "which the CPU maps (the rest would be copies)")
        return out
    budget = eighth_budget(manifest)
    try:
        sm = load_streaming_model(model_dir, cache_bytes=budget, experts_per_token=experts_per_token,
                                  map_experts=True)
    except EdgemoeError as exc:
        notes.add(f"mapped case skipped: {exc}")
        return out
    try:
        local = sm.local
        assert isinstance(local, MappedExperts)
        log.info("warm decode, experts mapped: %s", "1/8 of them on the GPU, the rest in host memory" if
                 backend == "cuda" else "the page cache's own pages")
        warm_up(sm)
        runs: list[DecodeRun] = []
        plain_runs: list[MlxLmRun] = []
        crossed: list[float] = []
        layers = len(sm.manifest.layers)
        for round_ in range(WARMUP_ROUNDS + REPEATS):
            plain_run = plain.time(prompt_tokens, tokens) if plain is not None else None
            refill(sm, budget, tokens)
            bytes_before, calls_before = local.decoded_mapped_bytes, local.decoded_layer_calls
            run = timed_generate(sm, prompt_tokens, tokens)
            if round_ < WARMUP_ROUNDS:
                continue
            runs.append(run)
            if plain_run is not None:
                plain_runs.append(plain_run)
            calls = local.decoded_layer_calls - calls_before
            crossed.append((local.decoded_mapped_bytes - bytes_before) / (calls / layers) if calls else 0.0)
        best = max(range(len(runs)), key=lambda i: runs[i].tokens_per_s or 0.0)
        run = runs[best]
        reference = max(plain_runs, key=lambda r: r.tokens_per_s or 0.0, default=None) or mlx_lm
        per_token = crossed[best]
        transfer = host_to_device_gbps * 1e9 / per_token if host_to_device_gbps and per_token else None
        candidates = [v for v in (transfer, reference.tokens_per_s if reference else None) if v]
        bound = min(candidates) if candidates else None
        out.update(
            mapped_eighth_backend=backend,
            mapped_eighth_gpu_budget_bytes=budget,
            mapped_eighth_tokens_per_s=run.tokens_per_s,
            mapped_eighth_tokens_per_s_runs=[r.tokens_per_s for r in runs],
            mapped_eighth_bus_bytes_per_token=per_token,
            mapped_eighth_mlx_lm_tokens_per_s=reference.tokens_per_s if reference else None,
            mapped_eighth_mlx_lm_alternated=bool(plain_runs),
            mapped_eighth_transfer_bound_tokens_per_s=transfer,
            mapped_eighth_bound_tokens_per_s=bound,
            mapped_eighth_relative_to_bound=run.tokens_per_s / bound if run.tokens_per_s and bound else None,
            mapped_eighth_ssd_bytes_per_token=run.ssd_bytes_per_token,
            mapped_eighth_same_tokens_as_cold_run=run.token_ids == cold_token_ids,
            mapped_eighth_layer_us=run.layer_us,
        )
        return out
    finally:
        sm.close()
