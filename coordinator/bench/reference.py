"""Plain mlx-lm on the same weights, timed as the streaming model is: `mlx_lm.load(SRC)`
where the model's source is known, else mlx-lm's model with every expert in RAM, rebuilt
from the packed files (which checks our decode, not our packing)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
from mlx_lm.utils import load_config

from edgemoe.node.architecture import build_model, with_experts_per_token
from edgemoe.node.compute import record_to_arrays
from edgemoe.node.limits import array_memory_bytes, array_memory_kind, ram_bytes
from edgemoe.node.manifest import DENSE_NAME, Manifest
from edgemoe.node.store import ExpertStore

from ..generate import build_prompt, stream
from ..streaming import StreamingModel
from .decode import WARMUP_PROMPT, WARMUP_TOKENS, best_of, decode_figures, ignore_eos, mark
from .report import Notes

MLX_LM_RAM_FRACTION = 0.5
REBUILT = "rebuilt from the packed files"




def build_reference_model(model_dir: Path, config: dict, manifest: Manifest) -> nn.Module:
    """mlx-lm's model with every expert in RAM, rebuilt from the packed files."""
    model = build_model(config)
    quantization = dict(manifest.dense_quantization)
    for spec in manifest.layers:
        for child, params in spec.quantization.items():
            quantization[f"{spec.module_path}.{child}"] = params
    nn.quantize(model, class_predicate=lambda path, _: quantization.get(path, False))
    weights = mx.load(str(Path(model_dir) / DENSE_NAME))
    assert isinstance(weights, dict)  # a .safetensors file loads as a dict of arrays
    with ExpertStore(model_dir, manifest) as store:
        for spec in manifest.layers:
            experts = [record_to_arrays(spec, store.read(spec.layer, e)) for e in range(spec.num_experts)]
            for t in spec.tensors:
                stacked = mx.stack([arrays[t.name] for arrays in experts])
                mx.eval(stacked)
                weights[f"{spec.module_path}.{t.name}"] = stacked
            del experts
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    mx.eval(model.parameters())
    return model


def load_source_model(src: Path, experts_per_token: int | None) -> nn.Module:
    """mlx-lm's own load of the source, routed to the same number of experts as the bench."""
    config = None if experts_per_token is None else with_experts_per_token(load_config(Path(src)), experts_per_token)
    return mlx_lm.load(str(src), model_config=config)[0]


@dataclass
class MlxLmRun:
    token_ids: list[int]
    tokens_per_s: float | None
    prompt_tokens_per_s: float
    model: str  # which model ran: `mlx_lm.load(SRC)`, or REBUILT


def time_mlx_lm(model: nn.Module, tokenizer: Any, prompt_tokens: list[int], tokens: int, name: str) -> MlxLmRun:
    marks = []
    ids: list[int] = []
    with ignore_eos(tokenizer):
        start = mark()
        for response in stream(model, tokenizer, prompt_tokens, tokens):
            ids.append(response.token)
            marks.append(mark())
    run = decode_figures(start, marks, ids, len(prompt_tokens))
    return MlxLmRun(ids, run.tokens_per_s, run.prompt_tokens_per_s, name)


class PlainMlxLm:
    """mlx-lm's model of the same weights, loaded and warmed up once, timed as often as asked
    (the every-expert-cached case alternates it with its own runs); `close` frees it."""

    def __init__(self, model: nn.Module, tokenizer: Any, name: str, nbytes: int):
        self.model: nn.Module | None = model
        self.tokenizer = tokenizer
        self.name = name
        self.nbytes = nbytes

    def time(self, prompt_tokens: list[int], tokens: int) -> MlxLmRun:
        assert self.model is not None, "timed after close"
        return time_mlx_lm(self.model, self.tokenizer, prompt_tokens, tokens, self.name)

    def best_of(self, prompt_tokens: list[int], tokens: int) -> MlxLmRun:
        """The fastest of the bench's repeats."""
        return best_of(partial(self.time, prompt_tokens, tokens))

    def fits_beside(self, array_bytes: int, page_cache_bytes: int) -> bool:
        """Whether it fits in half the memory its arrays live in, beside `array_bytes` of other
        arrays and, where that memory is RAM, files of `page_cache_bytes` kept in the page
        cache (a card's own memory does not hold the page cache)."""
        arrays = self.nbytes + array_bytes
        if array_memory_kind() == "GPU memory":
            return arrays <= array_memory_bytes() // 2
        return arrays + page_cache_bytes <= ram_bytes() // 2

    def close(self) -> None:
        if self.model is not None:
            self.model = None
            mx.clear_cache()


def open_plain_mlx_lm(model_dir: Path, sm: StreamingModel, source: Path | None, experts_per_token: int | None,
                      notes: Notes) -> PlainMlxLm | None:
    """Plain mlx-lm, warmed up, or None (with a note) where RAM is short."""
    need = sm.manifest.total_expert_bytes + sm.dense_bytes
    if need > MLX_LM_RAM_FRACTION * array_memory_bytes():
        notes.add(f"plain mlx-lm skipped: the full model ({need / 2**30:.1f} GiB) is over "
                  f"{MLX_LM_RAM_FRACTION:.0%} of {array_memory_kind()} ({array_memory_bytes() / 2**30:.1f} GiB)")
        return None
    if source is not None:
        name = f"mlx_lm.load({source})"
        model = load_source_model(source, experts_per_token)
    else:
        name = REBUILT
        model = build_reference_model(model_dir, sm.config, sm.manifest)
    plain = PlainMlxLm(model, sm.tokenizer, name, need)
    del model  # `close` must leave no other reference to it
    try:
        plain.time(build_prompt(sm.tokenizer, WARMUP_PROMPT), WARMUP_TOKENS)
    except BaseException:
        plain.close()
        raise
    return plain
