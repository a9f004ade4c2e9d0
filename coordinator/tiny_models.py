"""Tiny, deterministic mlx-lm Mixture-of-Experts checkpoints for tests.

Everything is built offline: the tokenizer is a byte-level BPE trained on an
embedded corpus, and the model is mlx-lm's own ``Model`` class for the
architecture, randomly initialised from a seed and saved the way
``mlx_lm.convert`` saves it.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import _get_classes, quantize_model, save_config, save_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SUPPORTED_ARCHS: tuple[str, ...] = (
    "qwen3_moe",
    "mixtral",
    "deepseek_v3",
    "gpt_oss",
    "glm4_moe",
    "qwen3_5_moe",
    "minimax",
    "kimi_k25",
)

QUANT_GROUP_SIZE = 32
QUANT_BITS = 4

_MAX_POSITIONS = 4096
_NUM_HEADS = 4
_NUM_KV_HEADS = 2
_HEAD_DIM = 16

_BOS_TOKEN = "<|endoftext|>"
_IM_START = "<|im_start|>"
_EOS_TOKEN = "<|im_end|>"
# BpeTrainer gives special tokens the first ids, in this order
_SPECIAL_TOKENS = (_BOS_TOKEN, _IM_START, _EOS_TOKEN)
_TOKENIZER_VOCAB_SIZE = 512

_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Embedded rather than read from the stdlib so the tokenizer is identical on
# every Python version.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A lazy dog sleeps in the sun.
Pack my box with five dozen liquor jugs. How vexingly quick daft zebras jump!
Sphinx of black quartz, judge my vow. The five boxing wizards jump quickly.
Once upon a time there was a small model that streamed its experts from disk.
Each expert lived in its own file, and the router chose which ones to read.
When a token arrived, the router looked at it and picked the best experts.
The experts were loaded into memory, did their work, and were put away again.
Memory is precious on small devices, so only the hot experts stay resident.
A cache keeps recently used experts close at hand; cold ones are evicted.
Reading from a solid state drive is fast, but reading from memory is faster.
The coordinator schedules layers, the nodes hold weights, and tokens flow.
Hello, world! Hello there. How are you today? I am fine, thank you very much.
What is the capital of France? Paris is the capital of France.
What is two plus two? Two plus two is four. Three times three is nine.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 32 64 128 256 512 1024.
Symbols: ( ) [ ] { } < > = + - * / % & | ^ ~ ! ? @ # $ _ . , ; : ' " ` \\
def forward(self, x):
    h = self.embed(x)
    for layer in self.layers:
        h = layer(h)
    return self.norm(h)

class Expert:
    def __init__(self, index, weight):
        self.index = index
        self.weight = weight

if __name__ == "__main__":
    print("hello world")
    for i in range(10):
        print(i, i * i)

The system user assistant conversation begins here and ends there.
user: Please write a short poem about the sea.
assistant: The sea is wide, the sea is deep, it rocks the ships and sings to sleep.
user: Thanks! Now tell me a story about a robot.
assistant: A little robot learned to paint the sky in colours no one had seen.
Mixture of experts models have many experts but use only a few per token.
Sparse activation means the compute per token is small even if the model is large.
Quantization shrinks the weights to four bits, with scales and biases per group.
"""


@dataclass(frozen=True)
class _Dims:
    num_layers: int
    num_experts: int
    hidden_size: int
    moe_intermediate_size: int
    num_experts_per_tok: int
    vocab_size: int

    @property
    def dense_intermediate_size(self) -> int:
        return 2 * self.hidden_size


def _expert_groups(num_experts: int, top_k: int) -> tuple[int, int]:
    """(n_group, topk_group) valid for DeepSeek/GLM group-limited routing."""
    for n_group in (4, 2):
        per_group = num_experts // n_group
        # group scores use the top-2 experts of each group
        if num_experts % n_group or per_group < 2:
            continue
        topk_group = max(math.ceil(top_k / per_group), n_group // 2)
        if topk_group < n_group:
            return n_group, topk_group
    return 1, 1


def _common(d: _Dims, model_type: str) -> dict[str, Any]:
    return {
        "model_type": model_type,
        "vocab_size": d.vocab_size,
        "hidden_size": d.hidden_size,
        "num_hidden_layers": d.num_layers,
        "num_attention_heads": _NUM_HEADS,
        "num_key_value_heads": _NUM_KV_HEADS,
        "max_position_embeddings": _MAX_POSITIONS,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": _SPECIAL_TOKENS.index(_BOS_TOKEN),
        "eos_token_id": _SPECIAL_TOKENS.index(_EOS_TOKEN),
    }


def _qwen3_moe_config(d: _Dims) -> dict[str, Any]:
    return {
        **_common(d, "qwen3_moe"),
        "architectures": ["Qwen3MoeForCausalLM"],
        "head_dim": _HEAD_DIM,
        "intermediate_size": d.dense_intermediate_size,
        "num_experts": d.num_experts,
        "num_experts_per_tok": d.num_experts_per_tok,
        "moe_intermediate_size": d.moe_intermediate_size,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "rope_scaling": None,
    }


def _mixtral_config(d: _Dims) -> dict[str, Any]:
    return {
        **_common(d, "mixtral"),
        "architectures": ["MixtralForCausalLM"],
        "intermediate_size": d.moe_intermediate_size,
        "num_local_experts": d.num_experts,
        "num_experts_per_tok": d.num_experts_per_tok,
    }


def _deepseek_v3_config(d: _Dims) -> dict[str, Any]:
    n_group, topk_group = _expert_groups(d.num_experts, d.num_experts_per_tok)
    return {
        **_common(d, "deepseek_v3"),
        "architectures": ["DeepseekV3ForCausalLM"],
        "num_key_value_heads": _NUM_HEADS,
        "intermediate_size": d.dense_intermediate_size,
        "moe_intermediate_size": d.moe_intermediate_size,
        "n_routed_experts": d.num_experts,
        "n_shared_experts": 1,
        "num_experts_per_tok": d.num_experts_per_tok,
        "n_group": n_group,
        "topk_group": topk_group,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "q_lora_rank": 32,
        "kv_lora_rank": 32,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 32,
        "v_head_dim": 32,
        "attention_bias": False,
        "rope_scaling": None,
    }


def _multimodal_wrapper(model_type: str, architecture: str, text_config: dict[str, Any]) -> dict[str, Any]:
    """The top-level config of a model whose language part sits under `text_config`."""
    return {
        "model_type": model_type,
        "architectures": [architecture],
        "text_config": text_config,
        "tie_word_embeddings": False,
    }


def _kimi_k25_config(d: _Dims) -> dict[str, Any]:
    # Kimi K2.5 is a DeepSeek-V3 language model ("kimi_k2") under
    # `language_model.`, next to a vision tower; mlx-lm's kimi_k25 runs text
    # only (it drops vision weights in sanitize and ignores vision_config),
    # so the tiny model is text-only.
    text_config = {**_deepseek_v3_config(d), "model_type": "kimi_k2"}
    del text_config["architectures"]
    return _multimodal_wrapper("kimi_k25", "KimiK25ForConditionalGeneration", text_config)


def _gpt_oss_config(d: _Dims) -> dict[str, Any]:
    layer_types = [
        "sliding_attention" if i % 2 == 0 else "full_attention"
        for i in range(d.num_layers)
    ]
    return {
        **_common(d, "gpt_oss"),
        "architectures": ["GptOssForCausalLM"],
        "head_dim": _HEAD_DIM,
        "intermediate_size": d.moe_intermediate_size,
        "num_local_experts": d.num_experts,
        "num_experts_per_tok": d.num_experts_per_tok,
        "experts_per_token": d.num_experts_per_tok,
        # small so a short generation already wraps the rotating cache
        "sliding_window": 16,
        "layer_types": layer_types,
        "rope_scaling": None,
    }


def _glm4_moe_config(d: _Dims) -> dict[str, Any]:
    n_group, topk_group = _expert_groups(d.num_experts, d.num_experts_per_tok)
    return {
        **_common(d, "glm4_moe"),
        "architectures": ["Glm4MoeForCausalLM"],
        "head_dim": _HEAD_DIM,
        "intermediate_size": d.dense_intermediate_size,
        "moe_intermediate_size": d.moe_intermediate_size,
        "n_routed_experts": d.num_experts,
        "n_shared_experts": 1,
        "num_experts_per_tok": d.num_experts_per_tok,
        "n_group": n_group,
        "topk_group": topk_group,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 1,
        "partial_rotary_factor": 0.5,
        "use_qk_norm": True,
        "attention_bias": True,
        "rope_scaling": None,
    }


def _qwen3_5_moe_config(d: _Dims) -> dict[str, Any]:
    text_config = {
        **_common(d, "qwen3_5_moe_text"),
        "head_dim": _HEAD_DIM,
        "intermediate_size": d.dense_intermediate_size,
        "num_experts": d.num_experts,
        "num_experts_per_tok": d.num_experts_per_tok,
        "moe_intermediate_size": d.moe_intermediate_size,
        "shared_expert_intermediate_size": d.moe_intermediate_size,
        "decoder_sparse_step": 1,
        "norm_topk_prob": True,
        # every full_attention_interval-th layer is softmax attention, the
        # rest are gated-delta linear attention; keep at least one of each
        "full_attention_interval": min(4, d.num_layers),
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "attention_bias": False,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [1, 1, 0],
        },
    }
    del text_config["rope_theta"]
    return _multimodal_wrapper("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration", text_config)


def _minimax_config(d: _Dims) -> dict[str, Any]:
    return {
        **_common(d, "minimax"),
        "architectures": ["MiniMaxM2ForCausalLM"],
        "head_dim": _HEAD_DIM,
        "rotary_dim": _HEAD_DIM // 2,
        "intermediate_size": d.moe_intermediate_size,
        "shared_intermediate_size": 0,
        "num_local_experts": d.num_experts,
        "num_experts_per_tok": d.num_experts_per_tok,
        "scoring_func": "sigmoid",
        "use_qk_norm": True,
    }


_CONFIG_BUILDERS: dict[str, Callable[[_Dims], dict[str, Any]]] = {
    "qwen3_moe": _qwen3_moe_config,
    "mixtral": _mixtral_config,
    "deepseek_v3": _deepseek_v3_config,
    "gpt_oss": _gpt_oss_config,
    "glm4_moe": _glm4_moe_config,
    "qwen3_5_moe": _qwen3_5_moe_config,
    "minimax": _minimax_config,
    "kimi_k25": _kimi_k25_config,
}


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
        for name, p in tree_flatten(model.parameters())
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
    """The model's own predicate, minus group sizes that do not divide the layer."""
    base = getattr(model, "quant_predicate", None)

    def predicate(path: str, module: nn.Module) -> Any:
        params = base(path, module) if base is not None else True
        if isinstance(params, dict) and module.weight.shape[-1] % params["group_size"]:
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
    return Tokenizer.from_file(str(dst / "tokenizer.json")).get_vocab_size(
        with_added_tokens=True
    )


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
) -> Path:
    """Write a small random mlx-lm model of ``arch`` (plus tokenizer) to ``dst``.

    The same arguments always produce byte-identical files.
    """
    if arch not in _CONFIG_BUILDERS:
        raise ValueError(f"unsupported arch {arch!r}; expected one of {SUPPORTED_ARCHS}")
    if num_layers < 2:
        # deepseek_v3/glm4_moe/kimi_k25 need a dense first layer plus a MoE layer;
        # gpt_oss and qwen3_5_moe need one layer of each attention kind
        raise ValueError("num_layers must be at least 2")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    write_tokenizer(dst)

    dims = _Dims(
        num_layers=num_layers,
        num_experts=num_experts,
        hidden_size=hidden_size,
        moe_intermediate_size=moe_intermediate_size,
        num_experts_per_tok=num_experts_per_tok,
        vocab_size=_tokenizer_vocab_size(dst),
    )
    config = _CONFIG_BUILDERS[arch](dims)

    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    _init_weights(model)
    if quantized:
        config = _quantize(model, config)

    save_model(dst, model)
    save_config(config, config_path=dst / "config.json")
    return dst


def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with the chat's special tokens, trained deterministically on `texts`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _train_tokenizer() -> Tokenizer:
    return train_bpe(_CORPUS.splitlines(keepends=True), _TOKENIZER_VOCAB_SIZE)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_tokenizer(dst: Path) -> None:
    """Write a deterministic byte-level BPE tokenizer (HF fast format) to ``dst``."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    _train_tokenizer().save(str(dst / "tokenizer.json"), pretty=True)
    special_tokens = {
        "bos_token": _BOS_TOKEN,
        "eos_token": _EOS_TOKEN,
        "pad_token": _BOS_TOKEN,
        "unk_token": None,
    }
    _write_json(
        dst / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": _CHAT_TEMPLATE,
            "model_max_length": _MAX_POSITIONS,
            "add_bos_token": False,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            **special_tokens,
        },
    )
    _write_json(
        dst / "special_tokens_map.json",
        {k: v for k, v in special_tokens.items() if v is not None},
    )
