"""What edgemoe needs to know about an mlx-lm architecture: where its routed experts are."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP
from mlx_lm.utils import _get_classes, load_config

from .errors import SourceModelError, UnsupportedArchitectureError

ROUTED_EXPERT_CLASSES = (SwitchGLU, SwitchMLP)
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def read_config(model_dir: Path) -> dict:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise SourceModelError(f"{model_dir}: no such directory; pass an mlx-lm model directory")
    if not (model_dir / "config.json").exists():
        raise SourceModelError(
            f"{model_dir} has no config.json: not an mlx-lm model directory "
            "(download one with `hf download mlx-community/...`)"
        )
    try:
        config = load_config(model_dir)
    except (OSError, ValueError) as exc:
        raise SourceModelError(f"{model_dir / 'config.json'} is unreadable ({exc}); fix or re-download it") from exc
    if "model_type" not in config:
        raise SourceModelError(f"{model_dir / 'config.json'} names no model_type: not an mlx-lm model config")
    model_classes(config, model_dir / "config.json")
    return config


def model_classes(
    config: dict, config_path: Path | None = None
) -> tuple[Callable[[BaseModelArgs], nn.Module], type[BaseModelArgs]]:
    try:
        return _get_classes(config)
    except ValueError as exc:
        where = f" (in {config_path})" if config_path else ""
        raise UnsupportedArchitectureError(
            f"architecture {config.get('model_type')!r}{where} is unknown to mlx-lm; "
            "upgrade mlx-lm (`pip install -U mlx-lm`) or use a supported MoE model"
        ) from exc


def build_model(config: dict) -> nn.Module:
    """Instantiates the architecture without evaluating its (random) weights."""
    model_class, args_class = model_classes(config)
    return model_class(args_class.from_dict(config))


def routed_expert_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    found = [(path, m) for path, m in model.named_modules() if isinstance(m, ROUTED_EXPERT_CLASSES)]
    return sorted(found, key=lambda item: layer_index(item[0]))


def layer_index(module_path: str) -> int:
    match = _LAYER_RE.search(module_path)
    if match is None:
        raise UnsupportedArchitectureError(f"cannot tell the layer of routed experts at {module_path}")
    return int(match.group(1))


def module_at(model: nn.Module, path: str) -> nn.Module:
    module = model
    for part in path.split("."):
        module = module[int(part)] if isinstance(module, list) else module[part]
    return module


def replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    module_at(model, parent_path)[name] = module


ROUTER_NAMES = ("gate", "router")


def router_of(model: nn.Module, experts_path: str) -> nn.Module | None:
    """The router of the MoE block whose routed experts live at `experts_path`."""
    block = module_at(model, experts_path.rpartition(".")[0])
    for name in ROUTER_NAMES:
        if isinstance(block.get(name), nn.Module):
            return block[name]
    return None


EXPERTS_PER_TOKEN_KEYS = ("num_experts_per_tok", "experts_per_token", "moe_topk", "top_k")


def routed_experts_per_token(config: dict) -> int | None:
    for target in (config, config.get("text_config") or {}):
        for key in EXPERTS_PER_TOKEN_KEYS:
            if key in target:
                return int(target[key])
    return None


def with_experts_per_token(config: dict, k: int) -> dict:
    """A copy of the config routing each token to `k` experts instead of the model's own."""
    config = json.loads(json.dumps(config))
    targets = [config] + [config[key] for key in ("text_config",) if isinstance(config.get(key), dict)]
    changed = False
    for target in targets:
        for key in EXPERTS_PER_TOKEN_KEYS:
            if key in target:
                if not 1 <= k <= int(target[key]):
                    raise SourceModelError(
                        f"--experts-per-token {k} is out of range: the model routes to {target[key]}; "
                        f"pass 1 to {target[key]}"
                    )
                target[key] = k
                changed = True
    if not changed:
        raise UnsupportedArchitectureError(
            f"cannot set experts per token for {config.get('model_type')!r}: its config has none of "
            f"{', '.join(EXPERTS_PER_TOKEN_KEYS)}"
        )
    return config
