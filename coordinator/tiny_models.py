"""Tiny, deterministic mlx-lm Mixture-of-Experts checkpoints: the test models, and the random
models `edgemoe demo-model --size random|large` writes for benchmarks.

Everything is built offline: the tokenizer is a byte-level BPE trained on an
embedded corpus (tiny_tokenizer.py), the config is the architecture's at a small
size (tiny_configs.py), and the model is mlx-lm's own ``Model`` class for it,
randomly initialised from a seed and saved the way ``mlx_lm.convert`` saves it.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import _get_classes, quantize_model, save_config, save_model
from tokenizers import Tokenizer

from .tiny_configs import CONFIG_BUILDERS, SUPPORTED_ARCHS, Dims
from .tiny_tokenizer import write_tokenizer

QUANT_GROUP_SIZE = 32
QUANT_BITS = 4
# Float32 unless asked: mlx's CPU kernels are fast in float32 (and unquantized expert
# matmuls run only in float32 there); bfloat16 is what real checkpoints are stored in.
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}


def _norm_module_names(model: nn.Module) -> set[str]:
    return {
        name
        for name, module in model.named_modules()
        if "norm" in type(module).__name__.lower()
    }


def _init_param(name: str, p: mx.array, norm_modules: set[str]) -> mx.array:
    owner, _, leaf = name.rpartition(".")
    if owner in norm_modules:
        return mx.ones(p.shape) if leaf == "weight" else mx.zeros(p.shape)
    if leaf in ("e_score_correction_bias", "A_log"):
        return mx.zeros(p.shape)
    if leaf == "dt_bias":
        return mx.ones(p.shape)
    if p.ndim == 1:
        return 0.02 * mx.random.normal(p.shape)
    if leaf == "weight" and owner.endswith("embed_tokens"):
        # unit-scale embeddings keep the token identity visible next to the
        # layer outputs, so routing and next-token choice vary per token
        return mx.random.normal(p.shape)
    if "conv1d" in owner:
        fan_in = math.prod(p.shape[1:])
    else:
        # [.., out, in] for Linear, SwitchLinear, MultiLinear, MoEGate
        fan_in = p.shape[-1]
    return mx.random.normal(p.shape) / math.sqrt(fan_in)


def _init_weights(model: nn.Module) -> None:
    """Re-initialise every parameter in float32, in a fixed order."""
    norm_modules = _norm_module_names(model)
    params = [
        (name, _init_param(name, p, norm_modules).astype(mx.float32))
        for name, p in dict(tree_flatten(model.parameters())).items()
    ]
    model.update(tree_unflatten(params))
    _discourage_repeats(model)
    mx.eval(model.parameters())


def _discourage_repeats(model: nn.Module) -> None:
    """Point each lm_head row away from its own token's embedding.

    A random model's next token is mostly a function of the current one, so
    greedy decoding often locks onto a fixed point; this keeps outputs varied.
    """
    params = dict(tree_flatten(model.parameters()))
    head = next(k for k in params if k.endswith("lm_head.weight"))
    embed = params[next(k for k in params if k.endswith("embed_tokens.weight"))]
    unit = embed / mx.linalg.norm(embed, axis=-1, keepdims=True)
    model.update(tree_unflatten([(head, params[head] - unit)]))


def _quant_predicate(model: nn.Module) -> Callable[[str, nn.Module], Any]:
    """The model's own predicate, minus group sizes that do not divide the layer or that
    make a row one group: MLX's CUDA quantized_matmul returns garbage (or NaN) for those
    when it multiplies several rows (tests/upstream/mlx_cuda_qmm_one_group.py). Real
    models' rows hold many groups; only tiny test models meet it."""
    base = getattr(model, "quant_predicate", None)

    def predicate(path: str, module: nn.Module) -> Any:
        params = base(path, module) if base is not None else True
        if isinstance(params, dict) and (module.weight.shape[-1] % params["group_size"]
                                         or module.weight.shape[-1] == params["group_size"]):
            return True
        return params

    return predicate


def _quantize(model: nn.Module, config: dict[str, Any]) -> dict[str, Any]:
    # quantize_model reports bits-per-weight on stdout; keep library output quiet
    with contextlib.redirect_stdout(io.StringIO()):
        _, config = quantize_model(
            model,
            config,
            group_size=QUANT_GROUP_SIZE,
            bits=QUANT_BITS,
            mode="affine",
            quant_predicate=_quant_predicate(model),
        )
    return config


def _tokenizer_vocab_size(dst: Path) -> int:
    return Tokenizer.from_file(str(dst / "tokenizer.json")).get_vocab_size(with_added_tokens=True)


def write_tiny_model(
    dst: Path,
    arch: str = "qwen3_moe",
    quantized: bool = True,
    seed: int = 0,
    num_layers: int = 4,
    num_experts: int = 16,
    hidden_size: int = 64,
    moe_intermediate_size: int = 32,
    num_experts_per_tok: int = 4,
    dtype: str = "float32",
) -> Path:
    """Write a small random mlx-lm model of ``arch`` (plus tokenizer) to ``dst``.

    ``dtype`` is the weights' (and, quantized, the scales' and biases') storage type,
    as ``mlx_lm.convert --dtype`` sets it. The same arguments always produce
    byte-identical files.
    """
    if arch not in CONFIG_BUILDERS:
        raise ValueError(f"unsupported arch {arch!r}; expected one of {SUPPORTED_ARCHS}")
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {tuple(DTYPES)}")
    if num_layers < 2:
        # deepseek_v3/glm4_moe/kimi_k25 need a dense first layer plus a MoE layer;
        # gpt_oss and qwen3_5_moe need one layer of each attention kind
        raise ValueError("num_layers must be at least 2")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    write_tokenizer(dst)

    dims = Dims(
        num_layers=num_layers,
        num_experts=num_experts,
        hidden_size=hidden_size,
        moe_intermediate_size=moe_intermediate_size,
        num_experts_per_tok=num_experts_per_tok,
        vocab_size=_tokenizer_vocab_size(dst),
    )
    config = CONFIG_BUILDERS[arch](dims)

    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    _init_weights(model)
    if dtype != "float32":
        params = dict(tree_flatten(model.parameters()))
        model.update(tree_unflatten([(k, v.astype(DTYPES[dtype])) for k, v in params.items()]))
        config["torch_dtype"] = dtype
    if quantized:
        config = _quantize(model, config)

    save_model(dst, model)
    save_config(config, config_path=dst / "config.json")
    return dst
