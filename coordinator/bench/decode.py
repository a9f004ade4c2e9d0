"""Timed decode on the streaming model: the counters at every token, and the figures of a
run between its first and its last token (prefill and first-token costs stay out)."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from edgemoe.node.manifest import Manifest

from ..counters import Counters, snapshot
from ..generate import build_prompt, generate
from ..streaming import StreamingModel
from .page_cache import FirstReads, disk_read_bytes, drop_page_cache, resident_fraction

WARMUP_TOKENS = 4
# Each timed decode runs this often and the fastest counts: on a small shared
# machine (the 2-core dev VM) tok/s moves by 20% from one run to the next.
REPEATS = 3
# Not the bench prompt, so the warm case's expert cache is filled by other text.
WARMUP_PROMPT = "The coordinator schedules layers, the nodes hold weights, and tokens flow."


@dataclass(frozen=True)
class Mark:
    """The model's counters at one instant, with the bench's own extras: records read for
    the first time since the page cache was dropped, and the kernel's count of disk bytes."""

    counters: Counters
    first_reads: int = 0
    first_read_bytes: int = 0
    disk_bytes: int | None = None


@dataclass
class DecodeRun:
    token_ids: list[int]
    prompt_tokens: int
    decode_tokens: int
    tokens_per_s: float | None
    prompt_tokens_per_s: float
    cache_hit_rate: float | None
    ssd_bytes_read: int
    prefill_ssd_bytes_read: int
    ssd_read_seconds: float
    ssd_bytes_per_token: float | None
    expert_read_gbps: float | None
    expert_reads: int
    verified_reads: int
    first_reads: int
    first_read_bytes: int
    disk_bytes_read: int | None
    page_cache_resident: float | None = None
    # Per MoE layer call, in µs: the whole token's time shared out, the wait to read the
    # router's choice back, and the dispatcher's own work (`dispatch.LayerTimes`).
    layer_us: float | None = None
    routing_wait_us: float | None = None
    dispatch_us: float | None = None
    # Bytes of guesses read into prefetch slots that no layer asked for (prefetch.py;
    # readahead's reads are the kernel's, and not in ssd_bytes_read).
    prefetch_unused_bytes: int = 0


def mark(sm: StreamingModel | None = None, first: FirstReads | None = None) -> Mark:
    """Now, for `sm` (or the clock alone, for plain mlx-lm)."""
    if sm is None:
        return Mark(Counters(t=time.perf_counter()))
    return Mark(snapshot(sm), first.reads if first else 0, first.bytes if first else 0, disk_read_bytes())


def decode_figures(start: Mark, marks: list[Mark], token_ids: list[int], prompt_tokens: int) -> DecodeRun:
    """Prefill is everything up to the first token; decode is the first to the last token."""
    first, last = marks[0], marks[-1]
    decode, prefill = last.counters - first.counters, first.counters - start.counters
    n = len(marks) - 1
    disk = None if None in (first.disk_bytes, last.disk_bytes) else last.disk_bytes - first.disk_bytes  # type: ignore[operator]
    return DecodeRun(
        token_ids=token_ids,
        prompt_tokens=prompt_tokens,
        decode_tokens=n,
        tokens_per_s=n / decode.t if n and decode.t > 0 else None,
        prompt_tokens_per_s=prompt_tokens / prefill.t,
        cache_hit_rate=decode.cache_hit_rate,
        ssd_bytes_read=decode.ssd_bytes_read,
        prefill_ssd_bytes_read=prefill.ssd_bytes_read,
        ssd_read_seconds=decode.ssd_read_seconds,
        ssd_bytes_per_token=decode.ssd_bytes_read / n if n else None,
        expert_read_gbps=decode.ssd_read_gbps,
        expert_reads=decode.ssd_reads,
        verified_reads=decode.verified_reads,
        first_reads=last.first_reads - first.first_reads,
        first_read_bytes=last.first_read_bytes - first.first_read_bytes,
        disk_bytes_read=disk,
        prefetch_unused_bytes=decode.prefetch_read_bytes - decode.prefetch_used_bytes,
        **_per_layer(decode),
    )


def _per_layer(decode: Counters) -> dict[str, float | None]:
    calls = decode.moe_layer_calls
    if not calls:
        return {"layer_us": None, "routing_wait_us": None, "dispatch_us": None}
    return {"layer_us": decode.t / calls * 1e6, "routing_wait_us": decode.routing_wait_s / calls * 1e6,
            "dispatch_us": decode.dispatch_s / calls * 1e6}


@contextlib.contextmanager
def ignore_eos(tokenizer: Any) -> Iterator[None]:
    """Every run decodes exactly the requested tokens, so runs compare token for token."""
    saved = set(tokenizer.eos_token_ids)
    tokenizer.eos_token_ids = []
    try:
        yield
    finally:
        tokenizer.eos_token_ids = saved


def warm_up(sm: StreamingModel) -> None:
    """A few tokens of other text, so MLX's first-use costs stay out of the timed runs."""
    with ignore_eos(sm.tokenizer):
        generate(sm, build_prompt(sm.tokenizer, WARMUP_PROMPT), max_tokens=WARMUP_TOKENS)


def fresh_cache(sm: StreamingModel, budget_bytes: int) -> None:
    """An empty expert cache, so one loaded model serves runs of several budgets."""
    sm.local.reset_cache(budget_bytes)


def eighth_budget(manifest: Manifest) -> int:
    """The warm case's cache: 1/8 of the expert bytes, at least one expert."""
    return max(manifest.expert_bytes, manifest.total_expert_bytes // 8)


def refill(sm: StreamingModel, budget_bytes: int, tokens: int) -> None:
    """A fresh cache of `budget_bytes`, filled by `tokens` tokens of other text, so that it
    never holds exactly what a timed text needs."""
    fresh_cache(sm, budget_bytes)
    with ignore_eos(sm.tokenizer):
        generate(sm, build_prompt(sm.tokenizer, WARMUP_PROMPT), max_tokens=tokens)


def warm_eighth_run(sm: StreamingModel, budget_bytes: int, prompt_tokens: list[int], tokens: int) -> DecodeRun:
    """One run of the warm case: the cache refilled by other text, then the timed text."""
    refill(sm, budget_bytes, tokens)
    return timed_generate(sm, prompt_tokens, tokens)


def timed_generate(
    sm: StreamingModel,
    prompt_tokens: list[int],
    tokens: int,
    first: FirstReads | None = None,
    drop_every_token: list[Path] | None = None,
) -> DecodeRun:
    """Generates `tokens` tokens, snapshotting the counters at each; with `drop_every_token`,
    evicts those files from the page cache after each token, off the clock."""
    marks: list[Mark] = []
    excluded = 0.0

    def on_token(_: int) -> None:
        nonlocal excluded
        m = mark(sm, first)
        marks.append(dataclasses.replace(m, counters=dataclasses.replace(m.counters, t=m.counters.t - excluded)))
        if drop_every_token:
            t = time.perf_counter()
            drop_page_cache(drop_every_token)
            if first is not None:
                first.forget()
            excluded += time.perf_counter() - t

    with ignore_eos(sm.tokenizer):
        start = mark(sm, first)
        result = generate(sm, prompt_tokens, max_tokens=tokens, on_token=on_token)
    return decode_figures(start, marks, result.token_ids, len(prompt_tokens))


def cold_run(
    sm: StreamingModel, paths: list[Path], prompt_tokens: list[int], tokens: int, budget: int, every_token: bool = False
) -> DecodeRun:
    """An empty expert cache of `budget` bytes and the expert files out of the page cache."""
    fresh_cache(sm, budget)
    drop_page_cache(paths)
    resident = resident_fraction(paths)
    first = FirstReads(sm.local.store)
    try:
        run = timed_generate(sm, prompt_tokens, tokens, first, paths if every_token else None)
    finally:
        first.close()
    run.page_cache_resident = resident
    return run


class _Timed(Protocol):
    tokens_per_s: float | None


T = TypeVar("T", bound=_Timed)


def best_of(run: Callable[[], T], repeats: int = REPEATS) -> T:
    """The fastest of `repeats` runs (runs are deterministic but for their timing)."""
    runs = [run() for _ in range(repeats)]
    return max(runs, key=lambda r: r.tokens_per_s or 0.0)


def cache_everything(sm: StreamingModel) -> None:
    """Reads every expert into the cache (whose budget must hold them all), so each layer
    computes from its resident table from the first token."""
    local = sm.local
    for spec in sm.manifest.layers:
        experts = list(range(spec.num_experts))
        for start in range(0, len(experts), local.scratch_slots):
            local.slots(spec.layer, experts[start : start + local.scratch_slots])
