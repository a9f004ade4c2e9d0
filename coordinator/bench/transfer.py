"""Host-to-device bandwidth of the path a missed expert takes: bytes written by the host
into an array's memory (as a read lands in a slot), then read by the device that computes.

On the CPU backend the device is the host, so this is the copy alone. On CUDA, MLX's arrays
live in managed memory: the first device access after a host write migrates the pages.
"""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np

TRANSFER_BYTES = 256 * 2**20
REPEATS = 3


def host_to_device_gbps(nbytes: int = TRANSFER_BYTES, repeats: int = REPEATS) -> float:
    """The best of `repeats` host writes of `nbytes` into an MLX array plus, off the CPU, a
    device pass over every byte."""
    target = mx.zeros((nbytes // 4,), dtype=mx.uint32)
    mx.eval(target)
    view = memoryview(target).cast("B")  # type: ignore[arg-type]  # mlx's stubs omit the buffer protocol
    source = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    on_device = mx.default_device() != mx.cpu
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        view[:] = source.data
        if on_device:
            mx.eval(target.sum())
        best = min(best, time.perf_counter() - began)
    return nbytes / best / 1e9
