"""`edgemoe bench`: one run on one packed model, each stage's figures into one report dict."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from edgemoe.node.architecture import routed_experts_per_token
from edgemoe.node.errors import EdgemoeError
from edgemoe.node.limits import array_memory_bytes, array_memory_kind, peak_array_bytes
from edgemoe.node.manifest import Manifest, read_manifest

from ..generate import build_prompt, peak_rss_bytes
from ..loader import load_streaming_model
from ..streaming import StreamingModel
from .cached import all_cached_figures
from .dead_peer import dead_peer_figures
from .decode import (
    REPEATS,
    DecodeRun,
    best_of,
    cold_run,
    eighth_budget,
    warm_eighth_run,
    warm_up,
)
from .disk import measure_reads, record_jobs, run_fio, sequential_jobs
from .mapped import mapped_figures
from .page_cache import drop_page_cache, expert_paths, resident_fraction, warm_page_cache
from .predict import bench_predictions
from .reference import MlxLmRun, PlainMlxLm, open_plain_mlx_lm
from .report import MiB, Notes
from .transfer import host_to_device_gbps

log = logging.getLogger(__name__)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _run_keys(prefix: str, run: DecodeRun | None) -> dict[str, Any]:
    names = ("tokens_per_s", "prompt_tokens_per_s", "cache_hit_rate", "ssd_bytes_read", "ssd_bytes_per_token",
             "expert_read_gbps", "decode_tokens", "layer_us", "routing_wait_us", "dispatch_us", "prefetch_unused_bytes")
    return {f"{prefix}{n}": (getattr(run, n) if run else None) for n in names}


def _memory_figures() -> dict[str, Any]:
    """Peaks so far, taken before the dead-peer case and mlx-lm load more models."""
    return {"peak_rss_bytes": peak_rss_bytes(), "peak_array_bytes": peak_array_bytes(),
            "array_memory": array_memory_kind(), "array_memory_bytes": array_memory_bytes()}


def run_bench(
    model_dir: Path,
    cache_bytes: int | None = None,
    tokens: int = 64,
    prompt: str = "Write a short story about a robot who learns to paint.",
    experts_per_token: int | None = None,
    compare_mlx_lm: bool = True,
    in_place_source: Path | None = None,
    io_mode: str = "auto",
    prefetch: bool | None = False,
) -> dict[str, Any]:
    if tokens < 2:
        raise EdgemoeError(f"--tokens {tokens} must be at least 2: decode is timed from the first token to the last")
    began = time.perf_counter()
    model_dir = Path(model_dir)
    notes = Notes()
    manifest = read_manifest(model_dir)
    paths = expert_paths(model_dir, manifest)
    report: dict[str, Any] = {"model": str(model_dir), "model_type": manifest.model_type,
                              "in_place_pack": manifest.in_place}

    # Loaded first so a bad budget or model fails before the disk is timed.
    sm = load_streaming_model(model_dir, cache_bytes=cache_bytes, experts_per_token=experts_per_token, io_mode=io_mode,
                              prefetch=prefetch)
    options = {"cache_bytes": sm.local.budget_bytes, "experts_per_token": experts_per_token, "io_mode": io_mode,
               "prefetch": prefetch}
    with tempfile.TemporaryDirectory(prefix="edgemoe-bench-") as tmp:
        try:
            in_place = _pack_in_place(in_place_source, Path(tmp) / "in-place", manifest, notes)
            report.update(_disk_figures(manifest, paths, notes))
            budget = sm.local.budget_bytes
            prompt_tokens = build_prompt(sm.tokenizer, prompt)
            if not prompt_tokens:
                raise EdgemoeError(f"--prompt {prompt!r} encodes to no tokens; pass some text")
            report.update(
                layers=len(manifest.layers),
                experts_per_token=routed_experts_per_token(sm.config),
                expert_record_bytes=manifest.expert_bytes,
                total_expert_bytes=manifest.total_expert_bytes,
                dense_bytes=sm.dense_bytes,
                cache_budget_bytes=budget,
                direct_io=sm.local.store.direct,
                prefetch=sm.local.prefetch_width > 0,
                reads_ahead=sm.local.reads_ahead,
                tokens=tokens,
                prompt_tokens=len(prompt_tokens),
                repeats=REPEATS,
            )
            log.info("warming up MLX")
            warm_up(sm)

            log.info("cold decode, cache budget %.1f MiB", budget / MiB)
            cold = best_of(lambda: cold_run(sm, paths, prompt_tokens, tokens, budget))
            report.update(_cold_figures(cold, report, manifest, notes, _asked_bytes_per_token(cold)))
            if sm.local.reads_ahead:
                notes.add("--prefetch has the kernel read guessed experts ahead, outside the timed reads: expert "
                          "read GB/s (and its share of raw) then counts copies from the page cache too")
            report.update(_every_token_cold_figures(sm, paths, prompt_tokens, tokens, budget, report, notes))
            report.update(_memory_figures())
            report.update(dead_peer_figures(sm, model_dir, options, paths, prompt_tokens, tokens, budget, notes))

            # The source is mlx-lm's own model only when it packs to the benched model.
            source = in_place_source if in_place is not None and in_place[1] else None
            plain = _plain_mlx_lm(model_dir, sm, source, experts_per_token, compare_mlx_lm, notes)
            try:
                log.info("plain mlx-lm decode")
                mlx_lm = plain.best_of(prompt_tokens, tokens) if plain else None
                report.update(_mlx_lm_figures(cold, mlx_lm))

                # (the old pools stay referenced until each layer's next call: both count)
                if plain is not None and not plain.fits_beside(
                        sm.dense_bytes + sm.local.budget_bytes + eighth_budget(manifest), manifest.total_expert_bytes):
                    plain.close()
                    plain = None
                    notes.add("plain mlx-lm was freed before the warm 1/8 case: it does not fit in half the "
                              "memory beside the expert files in the page cache, so its runs did not alternate "
                              "with edgemoe's there or with every expert cached; those ratios are to its "
                              "fastest run, timed before")
                warm, warm_mlx_lm = _warm_eighth_run(sm, paths, prompt_tokens, tokens, plain)
                report["warm_eighth_mlx_lm_alternated"] = warm_mlx_lm is not None
                warm_mlx_lm = warm_mlx_lm or mlx_lm
                report["warm_eighth_cache_budget_bytes"] = sm.local.budget_bytes
                report.update(_run_keys("warm_eighth_", warm))
                report["warm_eighth_mlx_lm_tokens_per_s"] = warm_mlx_lm.tokens_per_s if warm_mlx_lm else None
                report["warm_eighth_relative_to_mlx_lm"] = (_ratio(warm.tokens_per_s, warm_mlx_lm.tokens_per_s)
                                                            if warm_mlx_lm else None)
                report["warm_eighth_same_tokens_as_cold_run"] = warm.token_ids == cold.token_ids
                report.update(_transfer_bound(sm, report, warm_mlx_lm))
                report.update(_every_token_cold_bound(report, warm_mlx_lm))
                report.update(all_cached_figures(sm, prompt_tokens, tokens, mlx_lm, plain, notes))
                report.update(mapped_figures(model_dir, experts_per_token, prompt_tokens, tokens, cold.token_ids,
                                             plain, warm_mlx_lm, report["host_to_device_gbps"], notes))
            finally:
                if plain is not None:
                    plain.close()
            log.info("the performance model's inputs, and its predictions of the runs above")
            report.update(bench_predictions(sm, paths, report))
        finally:
            sm.close()
        report.update(_in_place_figures(in_place and in_place[0], cold, prompt_tokens, tokens, options, notes))
    report["notes"] = notes.items
    report["bench_seconds"] = time.perf_counter() - began
    return report


def _pack_in_place(src: Path | None, dst: Path, manifest: Manifest, notes: Notes) -> tuple[Path, bool] | None:
    """An --in-place pack of `src`, and whether it is the benched model (same fingerprint)."""
    if src is None:
        return None
    from ..pack import pack

    try:
        log.info("packing %s in place", src)
        pack(Path(src), dst, in_place=True)
    except EdgemoeError as exc:
        notes.add(f"in-place bench skipped: {exc}")
        return None
    same = read_manifest(dst).fingerprint == manifest.fingerprint
    if not same:
        notes.add(f"{src} is not the source of the benched model: in-place figures are of other weights")
    return dst, same


def _disk_figures(manifest: Manifest, paths: list[Path], notes: Notes) -> dict[str, Any]:
    log.info("raw read over %d expert files", len(paths))
    seq = measure_reads(paths, sequential_jobs(paths))
    buffered = measure_reads(paths, sequential_jobs(paths), uncached=False)
    records = measure_reads(paths, record_jobs(manifest))
    if "not dropped" in seq.method:
        notes.add("the page cache could be neither bypassed nor dropped: raw_read_gbps may include cached reads")
    largest = max(paths, key=os.path.getsize)
    fio, why = run_fio(largest)
    if why:
        notes.add(why)
    drop = drop_page_cache(paths)
    if drop is None:
        notes.add("this OS has no posix_fadvise: the cold runs start with whatever the page cache holds "
                  "(run `sudo purge` first on macOS)")
    return {
        "raw_read_gbps": seq.gbps,
        "raw_read_method": seq.method,
        "raw_read_bytes": seq.bytes,
        "raw_read_threads": seq.threads,
        "raw_read_block_bytes": seq.block_bytes,
        "raw_read_buffered_gbps": buffered.gbps,
        "raw_read_buffered_method": buffered.method,
        "raw_record_read_gbps": records.gbps,
        "raw_record_read_method": records.method,
        "raw_record_read_block_bytes": records.block_bytes,
        "fio_read_gbps": fio,
        "fio_file": str(largest) if fio is not None else None,
        "page_cache_drop_method": drop,
    }


def _asked_bytes_per_token(run: DecodeRun) -> float | None:
    """The expert bytes per token the layers asked for, the SSD bound's work: a guess read into
    a prefetch slot and never used is read, but is not part of it (it is the prefetch's cost)."""
    if not run.ssd_bytes_per_token or not run.decode_tokens:
        return run.ssd_bytes_per_token
    return run.ssd_bytes_per_token - run.prefetch_unused_bytes / run.decode_tokens


def _cold_figures(cold: DecodeRun, report: dict, manifest: Manifest, notes: Notes,
                  asked_bytes_per_token: float | None) -> dict[str, Any]:
    raw = report["raw_read_gbps"]
    bound = raw * 1e9 / asked_bytes_per_token if asked_bytes_per_token else None
    if bound is None:
        notes.add("decode read nothing from SSD (every expert was cached): the SSD bound does not apply")
    k = report["experts_per_token"]
    design = (
        sum(k * spec.record_bytes for spec in manifest.layers) * (1 - cold.cache_hit_rate)
        if k and cold.cache_hit_rate is not None
        else None
    )
    if cold.verified_reads:
        notes.add(f"{cold.verified_reads} of {cold.expert_reads} decode reads were first reads, "
                  "checksummed inside the read: expert_read_gbps includes that hashing")
    return {
        **_run_keys("", cold),
        "prefill_ssd_bytes_read": cold.prefill_ssd_bytes_read,
        "ssd_read_seconds": cold.ssd_read_seconds,
        "expert_reads": cold.expert_reads,
        "decode_verified_reads": cold.verified_reads,
        "decode_first_reads": cold.first_reads,
        "decode_first_read_bytes": cold.first_read_bytes,
        "decode_disk_bytes_read": cold.disk_bytes_read,
        "page_cache_resident_at_start": cold.page_cache_resident,
        "design_ssd_bytes_per_token": design,
        "ssd_bound_bytes_per_token": asked_bytes_per_token,
        "ssd_bound_tokens_per_s": bound,
        "read_efficiency": _ratio(cold.expert_read_gbps, raw),
        "record_read_efficiency": _ratio(cold.expert_read_gbps, report["raw_record_read_gbps"]),
        "bound_efficiency": _ratio(cold.tokens_per_s, bound),
    }


def _every_token_cold_figures(sm: StreamingModel, paths: list[Path], prompt_tokens: list[int], tokens: int,
                              budget: int, report: dict, notes: Notes) -> dict[str, Any]:
    """Cold decode with the page cache dropped before every token: each miss reads the disk,
    as for a model much larger than RAM, where a record read once is not in RAM the next time.

    The disk's raw read is timed again just before each run, and each run is divided by its
    own: a virtual disk's speed moves by a third from one second to the next (README), so a
    bound timed minutes earlier could flatter or sink the run. The run reported is the one
    whose share of its bound is the median."""
    keys = ("tokens_per_s", "expert_read_gbps", "ssd_bytes_per_token", "disk_bytes_per_token", "first_read_fraction",
            "read_efficiency", "raw_read_gbps", "bound_bytes_per_token", "ssd_bound_tokens_per_s", "bound_efficiency",
            "bound_efficiency_runs")
    out: dict[str, Any] = {f"every_token_cold_{k}": None for k in keys}
    if report["page_cache_drop_method"] is None:
        notes.add("every-token cold run skipped: the page cache cannot be dropped here")
        return out
    log.info("cold decode, page cache dropped before every token, each run after a raw read")
    rounds = []
    for _ in range(REPEATS):
        raw = measure_reads(paths, sequential_jobs(paths)).gbps
        run = cold_run(sm, paths, prompt_tokens, tokens, budget, every_token=True)
        asked = _asked_bytes_per_token(run)
        bound = raw * 1e9 / asked if asked else None
        rounds.append((_ratio(run.tokens_per_s, bound), raw, bound, asked, run))
    ranked = sorted(rounds, key=lambda r: r[0] or 0.0)
    efficiency, raw, bound, asked, run = ranked[len(ranked) // 2]
    out.update(
        every_token_cold_tokens_per_s=run.tokens_per_s,
        every_token_cold_expert_read_gbps=run.expert_read_gbps,
        every_token_cold_ssd_bytes_per_token=run.ssd_bytes_per_token,
        every_token_cold_disk_bytes_per_token=_ratio(run.disk_bytes_read, run.decode_tokens),
        every_token_cold_first_read_fraction=_ratio(run.first_reads, run.expert_reads),
        every_token_cold_read_efficiency=_ratio(run.expert_read_gbps, raw),
        every_token_cold_raw_read_gbps=raw,
        every_token_cold_bound_bytes_per_token=asked,
        every_token_cold_ssd_bound_tokens_per_s=bound,
        every_token_cold_bound_efficiency=efficiency,
        every_token_cold_bound_efficiency_runs=[r[0] for r in rounds],
    )
    return out


def _plain_mlx_lm(model_dir: Path, sm: StreamingModel, source: Path | None, experts_per_token: int | None,
                  enabled: bool, notes: Notes) -> PlainMlxLm | None:
    if not enabled:
        notes.add("plain mlx-lm comparison skipped (--no-mlx-lm)")
        return None
    if source is None:
        notes.add("plain mlx-lm runs the model rebuilt from the packed files (pass --in-place SRC to run "
                  "mlx_lm.load(SRC) and compare tokens with mlx-lm's own load of the source)")
    return open_plain_mlx_lm(model_dir, sm, source, experts_per_token, notes)


def _mlx_lm_figures(cold: DecodeRun, mlx_lm: MlxLmRun | None) -> dict[str, Any]:
    same = cold.token_ids == mlx_lm.token_ids if mlx_lm else None
    rebuilt = mlx_lm is not None and not mlx_lm.model.startswith("mlx_lm.load(")
    return {
        "mlx_lm_model": mlx_lm.model if mlx_lm else None,
        "mlx_lm_tokens_per_s": mlx_lm.tokens_per_s if mlx_lm else None,
        "mlx_lm_prompt_tokens_per_s": mlx_lm.prompt_tokens_per_s if mlx_lm else None,
        "relative_to_mlx_lm": _ratio(cold.tokens_per_s, mlx_lm.tokens_per_s) if mlx_lm else None,
        "same_tokens_as_mlx_lm": None if rebuilt else same,
        "same_tokens_as_rebuilt_model": same if rebuilt else None,
    }


def _transfer_bound(sm: StreamingModel, report: dict[str, Any], mlx_lm: MlxLmRun | None) -> dict[str, Any]:
    """The warm case's bound: min(mlx-lm (its runs alternated with the warm case's where it
    stayed loaded), host-to-device bytes/s / missed bytes per token)."""
    gbps = host_to_device_gbps(sm.local.dma if sm.local.staged_reads else None)
    missed = report["warm_eighth_ssd_bytes_per_token"]
    transfer = gbps * 1e9 / missed if missed else None
    candidates = [v for v in (transfer, mlx_lm.tokens_per_s if mlx_lm else None) if v]
    bound = min(candidates) if candidates else None
    return {"host_to_device_gbps": gbps, "warm_eighth_transfer_bound_tokens_per_s": transfer,
            "warm_eighth_bound_tokens_per_s": bound,
            "warm_eighth_relative_to_bound": _ratio(report["warm_eighth_tokens_per_s"], bound)}


def _every_token_cold_bound(report: dict[str, Any], mlx_lm: MlxLmRun | None) -> dict[str, Any]:
    """Every token cold against min(SSD bound, mlx-lm): the decode can beat neither."""
    candidates = [v for v in (report["every_token_cold_ssd_bound_tokens_per_s"],
                              mlx_lm.tokens_per_s if mlx_lm else None) if v]
    bound = min(candidates) if candidates else None
    return {"every_token_cold_min_bound_tokens_per_s": bound,
            "every_token_cold_relative_to_min_bound": _ratio(report["every_token_cold_tokens_per_s"], bound)}


def _warm_eighth_run(sm: StreamingModel, paths: list[Path], prompt_tokens: list[int], tokens: int,
                     plain: PlainMlxLm | None) -> tuple[DecodeRun, MlxLmRun | None]:
    """1/8 of the expert bytes cached, page cache warm: the case the design targets. Its
    fastest run, and that of plain mlx-lm's runs alternated with its own."""
    budget = eighth_budget(sm.manifest)
    log.info("warm decode, cache budget 1/8 of the experts (%.1f MiB)", budget / MiB)
    warm_page_cache(paths)
    direct = sm.local.store.direct
    sm.local.set_io_mode("buffered")  # a warm page cache is what this case is about
    runs: list[DecodeRun] = []
    plain_runs: list[MlxLmRun] = []
    try:
        for _ in range(REPEATS):
            if plain is not None:
                plain_runs.append(plain.time(prompt_tokens, tokens))
            runs.append(warm_eighth_run(sm, budget, prompt_tokens, tokens))
    finally:
        sm.local.set_io_mode("direct" if direct else "buffered")
    run = max(runs, key=lambda r: r.tokens_per_s or 0.0)
    run.page_cache_resident = resident_fraction(paths)
    return run, max(plain_runs, key=lambda r: r.tokens_per_s or 0.0, default=None)


def _in_place_figures(packed: Path | None, cold: DecodeRun, prompt_tokens: list[int], tokens: int,
                      options: dict[str, Any], notes: Notes) -> dict[str, Any]:
    out: dict[str, Any] = {
        "in_place_tokens_per_s": None,
        "in_place_expert_read_gbps": None,
        "in_place_cache_hit_rate": None,
        "in_place_ssd_bytes_per_token": None,
        "in_place_same_tokens_as_cold_run": None,
        "repack_tokens_per_s_gain": None,
        "repack_read_gbps_gain": None,
    }
    if packed is None:
        return out
    try:
        sm = load_streaming_model(packed, **options)
    except EdgemoeError as exc:
        notes.add(f"in-place bench skipped: {exc}")
        return out
    try:
        paths = expert_paths(packed, sm.manifest)
        run = best_of(lambda: cold_run(sm, paths, prompt_tokens, tokens, options["cache_bytes"]))
    finally:
        sm.close()
    out.update(
        in_place_tokens_per_s=run.tokens_per_s,
        in_place_expert_read_gbps=run.expert_read_gbps,
        in_place_cache_hit_rate=run.cache_hit_rate,
        in_place_ssd_bytes_per_token=run.ssd_bytes_per_token,
        in_place_same_tokens_as_cold_run=run.token_ids == cold.token_ids,
        repack_tokens_per_s_gain=_ratio(cold.tokens_per_s, run.tokens_per_s),
        repack_read_gbps_gain=_ratio(cold.expert_read_gbps, run.expert_read_gbps),
    )
    return out
