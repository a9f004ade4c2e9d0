"""Limits and facts about the machine and environment, each with one source of truth here."""

from __future__ import annotations

import os


def ram_bytes() -> int:
    """This machine's physical RAM, in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# The share of array memory an expert cache takes when no --cache-mb is given, on the
# coordinator and on a node: the rest is for the dense part, slots in flight, the KV cache
# and everything else the machine runs.
DEFAULT_CACHE_FRACTION = 0.25


def array_memory_bytes() -> int:
    """The memory MLX's arrays (dense weights, slot pools, caches) live in, in bytes: the
    card's memory on CUDA, the share of unified memory Metal lets the GPU keep resident on a
    Mac, RAM on the CPU backend. Budgets come from this, not from RAM."""
    import mlx.core as mx

    if mx.default_device().type == mx.gpu:
        info = mx.device_info()
        # Metal: max_recommended_working_set_size (below memory_size: macOS keeps the rest);
        # CUDA: total_memory (the card's, from NVML or cudaMemGetInfo).
        for key in ("max_recommended_working_set_size", "total_memory", "memory_size"):
            value = info.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return ram_bytes()


def array_memory_kind() -> str:
    """Where MLX's arrays live here, in words, for reports next to peak RSS."""
    import mlx.core as mx

    if mx.default_device().type != mx.gpu:
        return "RAM"
    return "unified memory" if mx.metal.is_available() else "GPU memory"


def compute_backend() -> str:
    """Where MLX computes here: "cpu", "cuda" or "metal". Each rounds its own way, so a
    node's results equal this machine's bit for bit only on the same backend."""
    import mlx.core as mx

    if mx.default_device().type != mx.gpu:
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda"


def peak_array_bytes() -> int:
    """The most memory MLX's allocator has held at once in this process: on a GPU the peak
    of GPU memory; on the CPU backend MLX's own allocations, a part of peak RSS."""
    import mlx.core as mx

    return int(mx.get_peak_memory())


def mlx_backend_missing(exc: ImportError) -> str | None:
    """What to do when importing MLX failed for want of a backend (a plain `pip install
    edgemoe` on Linux: MLX's backends are extras), or None for any other import error."""
    if "libmlx" not in str(exc):
        return None
    return ("MLX is installed without a backend: pip install 'edgemoe[cpu]', or 'edgemoe[cuda]' "
            "on a machine with an NVIDIA GPU (README, Install)")


def default_node_cache_mb() -> float:
    """`edge-node --cache-mb`'s default, in MiB."""
    return array_memory_bytes() * DEFAULT_CACHE_FRACTION / 2**20


# A prompt can route to every expert of a layer at once; holding them all would break
# the memory bound, so a layer's experts are brought into slots this many at a time.
MAX_INFLIGHT_EXPERTS = 32
# O_DIRECT needs offsets, lengths and buffers aligned to the device's logical block;
# 4 KiB covers the drives edgemoe runs on.
DIRECT_ALIGNMENT = 4096
# gRPC's cap on one message, each way: a push chunk or a layer's compute request.
MAX_MESSAGE_BYTES = 64 * 2**20
# What one pushed model spec may ask a node for (node/spec_check.py): each bound is far
# above today's largest MoE models (Kimi K2: 61 layers, 384 experts of ~44 MiB at 4 bits).
MAX_RECORD_BYTES = 2**30
MAX_MODEL_LAYERS = 1024
MAX_EXPERTS_PER_LAYER = 16384
MAX_TENSORS_PER_LAYER = 64
MAX_SPEC_BYTES = 32 * 2**20
# Space a node leaves free on its data dir's file system, whatever its --disk-mb.
DISK_RESERVE_BYTES = 256 * 2**20
