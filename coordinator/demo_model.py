"""The built-in demo models: small qwen3_moe models shaped like the ones users stream, made offline.

``small`` is a trained model that ships with the package (``demo_weights/``,
reproduced from a checkout by ``python -m edgemoe.coordinator.devtools.train_demo
OUT_DIR``): 4 layers of 32 4-bit experts, 4 per token, trained on the Python standard
library's sources, so it writes Python-ish text and routes tokens unevenly, as real models do.
``random`` is the random 8-layer, 64-expert model the benchmark figures use;
``large`` is random, sized so the disk matters in benchmarks.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .tiny_models import write_tiny_model

WEIGHTS_DIR = Path(__file__).resolve().parent / "demo_weights"
# what an mlx-lm model directory needs; train.json (how it was trained) stays behind
WEIGHT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json")

SHAPES: dict[str, dict[str, Any]] = {
    # Random, 8 MoE layers of 64 experts, 8 per token: the shape of the reference
    # measurements of other MLX expert-streaming packages; the README's `make bench` figures are on it.
    "random": dict(
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
    dst = Path(dst)
    if size == "small":
        dst.mkdir(parents=True, exist_ok=True)
        for name in WEIGHT_FILES:
            shutil.copyfile(WEIGHTS_DIR / name, dst / name)
        return dst
    return write_tiny_model(dst, **SHAPES[size])
