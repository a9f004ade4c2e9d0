"""Generation on the streaming model, with the figures users judge it by."""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import GenerationResponse, stream_generate
from mlx_lm.sample_utils import make_sampler

from edgemoe.node.limits import array_memory_kind, peak_array_bytes

from .counters import snapshot
from .streaming import StreamingModel


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
    # MLX's allocator's peak in this process: GPU memory on a GPU; on the CPU backend MLX's
    # own allocations (weights, slots, activations), which are part of peak RSS.
    peak_array_bytes: int
    array_memory: str  # where arrays live: "GPU memory", "unified memory" or "RAM"
    seconds: float
    direct_io: bool
    io_modes: dict[str, str]  # per expert file: "direct" or "buffered", the I/O in effect
    experts_prefetched: int
    experts_prefetch_used: int
    prefetch_accuracy: float | None
    # --map-experts: where the experts are that every layer computes on, or None (streamed)
    experts_mapped: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"{self.generated_tokens} tokens at {self.tokens_per_s:.2f} tok/s "
            f"(prompt {self.prompt_tokens} at {self.prompt_tokens_per_s:.1f} tok/s) | "
            f"cache hit rate {self.cache_hit_rate:.1%} | SSD {self.ssd_bytes_read / 2**20:.1f} MiB "
            f"at {self.ssd_read_gbps:.2f} GB/s | peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB, "
            f"MLX peak {self.peak_array_bytes / 2**20:.0f} MiB ({self.array_memory})"
            + (f" | experts mapped ({self.experts_mapped})" if self.experts_mapped else "")
        )


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: GenerationStats
    finish_reason: str = "length"


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


def build_prompt(tokenizer: Any, prompt: str | list[dict], chat_template: bool = True) -> list[int]:
    """Token ids of a prompt: a user message, or a whole chat history (a list of
    {"role", "content"}), through the model's chat template when it has one and
    `chat_template` is set. Without a template a message is its plain text, and a
    history is "role: content" lines ending in "assistant: "."""
    templated = chat_template and getattr(tokenizer, "chat_template", None)
    if isinstance(prompt, str):
        if templated:
            return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                      add_generation_prompt=True))
        return list(tokenizer.encode(prompt))
    if templated:
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True))
    return list(tokenizer.encode("".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant: "))


def stream(
    model: nn.Module,
    tokenizer: Any,
    prompt_tokens: list[int],
    max_tokens: int = 100,
    temp: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> Iterator[GenerationResponse]:
    """mlx-lm's `stream_generate` with mlx-lm's sampler: the one place edgemoe generates, on
    the streaming model and on plain mlx-lm's (the reference the demo and bench compare with)."""
    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temp=temp, top_p=top_p if 0.0 < top_p < 1.0 else 0.0)
    yield from stream_generate(model, tokenizer, mx.array(prompt_tokens), max_tokens=max_tokens, sampler=sampler)


def generate(
    sm: StreamingModel,
    prompt_tokens: list[int],
    max_tokens: int = 100,
    temp: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    on_text: Callable[[str], None] | None = None,
    on_token: Callable[[int], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Generates, calling `on_text`/`on_token` as each token arrives, until `max_tokens`,
    an end-of-sequence token, or `stop()` returns True (checked after each token)."""
    before = snapshot(sm)
    text, tokens, last = [], [], None
    finish = "length"
    try:
        for response in stream(sm.model, sm.tokenizer, prompt_tokens, max_tokens, temp, top_p, seed):
            sm.local.settle()
            last = response
            tokens.append(response.token)
            text.append(response.text)
            if on_text is not None and response.text:
                on_text(response.text)
            if on_token is not None:
                on_token(response.token)
            if response.finish_reason:
                finish = response.finish_reason
            if response.finish_reason is None and stop is not None and stop():
                finish = "cancelled"
                break
    except BaseException:
        # A half-built token's graph may never be computed: not counted, not kept.
        sm.local.drop_unsettled()
        raise
    sm.local.settle(everything=True)
    run = snapshot(sm) - before
    generated = len(tokens)
    local = sm.local
    stats = GenerationStats(
        prompt_tokens=len(prompt_tokens),
        generated_tokens=generated,
        prompt_tokens_per_s=last.prompt_tps if last else 0.0,
        tokens_per_s=last.generation_tps if last else 0.0,
        cache_hit_rate=run.cache_hit_rate or 0.0,
        cache_hits=run.cache_hits,
        cache_misses=run.cache_misses,
        cache_bytes_used=local.cache_bytes_used,
        cache_budget_bytes=local.budget_bytes,
        experts_from_cache=run.experts_from_cache,
        experts_from_ssd=run.experts_from_ssd,
        ssd_bytes_read=run.ssd_bytes_read,
        ssd_read_seconds=run.ssd_read_seconds,
        ssd_read_gbps=run.ssd_read_gbps or 0.0,
        ssd_bytes_per_token=run.ssd_bytes_read / generated if generated else 0.0,
        peak_rss_bytes=peak_rss_bytes(),
        peak_array_bytes=peak_array_bytes(),
        array_memory=array_memory_kind(),
        seconds=run.t,
        direct_io=local.store.direct,
        io_modes=local.store.io_modes(),
        experts_prefetched=run.experts_prefetched,
        experts_prefetch_used=run.experts_prefetch_used,
        prefetch_accuracy=run.prefetch_accuracy,
        experts_mapped=local.mapped,
    )
    return GenerationResult("".join(text), tokens, stats, finish)
