"""What the A/B and profile scripts in .ci/ share: the bench's warm 1/8 case on a model loaded
for it, and the lines they print."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemoe.node.manifest import read_manifest

from ..generate import build_prompt
from ..loader import load_streaming_model
from ..streaming import StreamingModel
from .decode import DecodeRun, eighth_budget, warm_eighth_run, warm_up
from .page_cache import expert_paths, warm_page_cache

# The bench's own prompt (run_bench's default).
BENCH_PROMPT = "Write a short story about a robot who learns to paint."


@dataclass
class WarmEighth:
    """A model loaded with 1/8 of its experts' bytes as cache, its files in the page cache."""

    sm: StreamingModel
    budget: int
    prompt_tokens: list[int]
    paths: list[Path]

    def run(self, tokens: int) -> DecodeRun:
        return warm_eighth_run(self.sm, self.budget, self.prompt_tokens, tokens)


def open_warm_eighth(path: str | Path, **load_kwargs: Any) -> WarmEighth:
    """Loads (buffered reads unless `io_mode` says otherwise), fills the page cache, warms up."""
    path = Path(path)
    manifest = read_manifest(path)
    budget = eighth_budget(manifest)
    sm = load_streaming_model(path, cache_bytes=budget, **{"io_mode": "buffered", **load_kwargs})
    paths = expert_paths(path, manifest)
    warm_page_cache(paths)
    warm_up(sm)
    return WarmEighth(sm, budget, build_prompt(sm.tokenizer, BENCH_PROMPT), paths)


def run_line(name: str, run: DecodeRun) -> str:
    return (f"  {name:12s} {run.tokens_per_s or 0.0:8.2f} tok/s  layer {run.layer_us or 0.0:7.0f} us  routing "
            f"{run.routing_wait_us or 0.0:6.0f}  dispatch {run.dispatch_us or 0.0:6.0f}  "
            f"hit {run.cache_hit_rate or 0.0:.3f}  read {(run.ssd_bytes_per_token or 0.0) / 2**20:.2f} MiB/token")


def summary(runs: dict[str, list[DecodeRun]]) -> str:
    """Each variant's median and runs, and whether every run gave the same tokens."""
    lines = [f"{name}: median {statistics.median(r.tokens_per_s or 0.0 for r in done):.2f} tok/s "
             f"{[round(r.tokens_per_s or 0.0, 1) for r in done]}" for name, done in runs.items()]
    same = len({tuple(r.token_ids) for done in runs.values() for r in done}) == 1
    return "\n".join([*lines, f"same tokens: {same}"])
