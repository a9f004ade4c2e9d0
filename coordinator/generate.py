"""Generation on the streaming model, with the figures users judge it by."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

from .streaming import StreamingModel, guesses


@dataclass
class GenerationStats:
    prompt_tokens: int
    generated_tokens: int
    prompt_tokens_per_s: float
    tokens_per_s: float
    cache_hit_rate: float
    cache_hits: int
    cache_misses: int
    cache_bytes_used: int
    cache_budget_bytes: int
    experts_from_cache: int
    experts_from_ssd: int
    ssd_bytes_read: int
    ssd_read_seconds: float
    ssd_read_gbps: float
    ssd_bytes_per_token: float
    peak_rss_bytes: int
    seconds: float
    direct_io: bool
    experts_prefetched: int
    experts_prefetch_used: int
    prefetch_accuracy: float | None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"{self.generated_tokens} tokens at {self.tokens_per_s:.2f} tok/s "
            f"(prompt {self.prompt_tokens} at {self.prompt_tokens_per_s:.1f} tok/s) | "
            f"cache hit rate {self.cache_hit_rate:.1%} | SSD {self.ssd_bytes_read / 2**20:.1f} MiB "
            f"at {self.ssd_read_gbps:.2f} GB/s | peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB"
        )


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: GenerationStats


def _accuracy(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    guessed, right = after[0] - before[0], after[1] - before[1]
    return right / guessed if guessed else None


def peak_rss_bytes() -> int:
    # ru_maxrss on Linux carries over the parent's peak across fork+exec, so a
    # small process started by a big one would report the parent's figure.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def build_prompt(sm: StreamingModel, prompt: str, chat_template: bool = True) -> list[int]:
    tokenizer = sm.tokenizer
    if chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return tokenizer.encode(prompt)


def generate(
    sm: StreamingModel,
    prompt_tokens: list[int],
    max_tokens: int = 100,
    temp: float = 0.0,
    seed: int | None = None,
    on_text: Callable[[str], None] | None = None,
    on_token: Callable[[int], None] | None = None,
) -> GenerationResult:
    if seed is not None:
        mx.random.seed(seed)
    store, local = sm.local.store, sm.local
    before = (local.cache_stats.hits, local.cache_stats.misses, store.stats.bytes_read, store.stats.read_seconds,
              local.stats.experts_from_cache, local.stats.experts_from_ssd,
              local.stats.prefetched, local.stats.prefetch_used, guesses(sm.model))
    start = time.perf_counter()
    text, tokens, last = [], [], None
    responses: Iterator = stream_generate(
        sm.model, sm.tokenizer, mx.array(prompt_tokens), max_tokens=max_tokens, sampler=make_sampler(temp=temp)
    )
    for response in responses:
        last = response
        tokens.append(response.token)
        text.append(response.text)
        if on_text is not None and response.text:
            on_text(response.text)
        if on_token is not None:
            on_token(response.token)
    seconds = time.perf_counter() - start
    hits = local.cache_stats.hits - before[0]
    misses = local.cache_stats.misses - before[1]
    read_bytes = store.stats.bytes_read - before[2]
    read_seconds = store.stats.read_seconds - before[3]
    generated = len(tokens)
    stats = GenerationStats(
        prompt_tokens=len(prompt_tokens),
        generated_tokens=generated,
        prompt_tokens_per_s=last.prompt_tps if last else 0.0,
        tokens_per_s=last.generation_tps if last else 0.0,
        cache_hit_rate=hits / (hits + misses) if hits + misses else 0.0,
        cache_hits=hits,
        cache_misses=misses,
        cache_bytes_used=local.cache_bytes_used,
        cache_budget_bytes=local.budget_bytes,
        experts_from_cache=local.stats.experts_from_cache - before[4],
        experts_from_ssd=local.stats.experts_from_ssd - before[5],
        ssd_bytes_read=read_bytes,
        ssd_read_seconds=read_seconds,
        ssd_read_gbps=read_bytes / read_seconds / 1e9 if read_seconds else 0.0,
        ssd_bytes_per_token=read_bytes / generated if generated else 0.0,
        peak_rss_bytes=peak_rss_bytes(),
        seconds=seconds,
        direct_io=store.direct,
        experts_prefetched=local.stats.prefetched - before[6],
        experts_prefetch_used=local.stats.prefetch_used - before[7],
        prefetch_accuracy=_accuracy(before[8], guesses(sm.model)),
    )
    return GenerationResult("".join(text), tokens, stats)
