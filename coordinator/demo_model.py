"""The built-in demo models: small qwen3_moe models shaped like the ones users stream, made offline."""

from __future__ import annotations

from pathlib import Path

from .tiny_models import write_tiny_model

SHAPES = {
    # 8 MoE layers of 64 experts, 8 per token: the shape DESIGN.md's reference
    # measurements use, small enough to build in seconds.
    "small": dict(
        arch="qwen3_moe", quantized=True, seed=0, num_layers=8, num_experts=64,
        hidden_size=256, moe_intermediate_size=128, num_experts_per_tok=8,
    ),
    # 6 MiB float32 experts (768 MiB in all): reads big enough to measure the disk.
    "large": dict(
        arch="qwen3_moe", quantized=False, seed=0, num_layers=4, num_experts=32,
        hidden_size=1024, moe_intermediate_size=512, num_experts_per_tok=4,
    ),
}


def write_demo_model(dst: Path, size: str = "small") -> Path:
    return write_tiny_model(Path(dst), **SHAPES[size])
