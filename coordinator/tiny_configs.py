"""The tiny models' architectures: an mlx-lm config for each supported MoE family, at a given size."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .tiny_tokenizer import BOS_TOKEN, EOS_TOKEN, MAX_POSITIONS, SPECIAL_TOKENS

_NUM_HEADS = 4
_NUM_KV_HEADS = 2
_HEAD_DIM = 16


@dataclass(frozen=True)
class Dims:
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


def _common(d: Dims, model_type: str) -> dict[str, Any]:
    return {
        "model_type": model_type,
        "vocab_size": d.vocab_size,
        "hidden_size": d.hidden_size,
        "num_hidden_layers": d.num_layers,
        "num_attention_heads": _NUM_HEADS,
        "num_key_value_heads": _NUM_KV_HEADS,
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": SPECIAL_TOKENS.index(BOS_TOKEN),
        "eos_token_id": SPECIAL_TOKENS.index(EOS_TOKEN),
    }


def _qwen3_moe_config(d: Dims) -> dict[str, Any]:
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


def _mixtral_config(d: Dims) -> dict[str, Any]:
    return {
        **_common(d, "mixtral"),
        "architectures": ["MixtralForCausalLM"],
        "intermediate_size": d.moe_intermediate_size,
        "num_local_experts": d.num_experts,
        "num_experts_per_tok": d.num_experts_per_tok,
    }


def _deepseek_v3_config(d: Dims) -> dict[str, Any]:
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
        # 64, not 32: MLX's CUDA backend has no non-transposed quantized_matmul (MLA's
        # embed_q/unembed_out) for 32x32 4-bit blocks, so mlx-lm itself fails there.
        "q_lora_rank": 64,
        "kv_lora_rank": 64,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 64,
        "v_head_dim": 64,
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


def _kimi_k25_config(d: Dims) -> dict[str, Any]:
    # Kimi K2.5 is a DeepSeek-V3 language model ("kimi_k2") under
    # `language_model.`, next to a vision tower; mlx-lm's kimi_k25 runs text
    # only (it drops vision weights in sanitize and ignores vision_config),
    # so the tiny model is text-only.
    text_config = {**_deepseek_v3_config(d), "model_type": "kimi_k2"}
    del text_config["architectures"]
    return _multimodal_wrapper("kimi_k25", "KimiK25ForConditionalGeneration", text_config)


def _gpt_oss_config(d: Dims) -> dict[str, Any]:
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


def _glm4_moe_config(d: Dims) -> dict[str, Any]:
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


def _qwen3_5_moe_config(d: Dims) -> dict[str, Any]:
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


def _minimax_config(d: Dims) -> dict[str, Any]:
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


CONFIG_BUILDERS: dict[str, Callable[[Dims], dict[str, Any]]] = {
    "qwen3_moe": _qwen3_moe_config,
    "mixtral": _mixtral_config,
    "deepseek_v3": _deepseek_v3_config,
    "gpt_oss": _gpt_oss_config,
    "glm4_moe": _glm4_moe_config,
    "qwen3_5_moe": _qwen3_5_moe_config,
    "minimax": _minimax_config,
    "kimi_k25": _kimi_k25_config,
}

SUPPORTED_ARCHS: tuple[str, ...] = tuple(CONFIG_BUILDERS)
