"""The built-in demo model: a small qwen3_moe shaped like the ones users stream, made offline."""

from __future__ import annotations

from pathlib import Path

from .tiny_models import write_tiny_model

# 8 MoE layers of 64 experts, 8 per token: the shape DESIGN.md's reference
# measurements use, small enough to build in seconds.
DEMO_SHAPE = dict(
    arch="qwen3_moe",
    quantized=True,
    seed=0,
    num_layers=8,
    num_experts=64,
    hidden_size=256,
    moe_intermediate_size=128,
    num_experts_per_tok=8,
)


def write_demo_model(dst: Path, **overrides) -> Path:
    return write_tiny_model(Path(dst), **{**DEMO_SHAPE, **overrides})
