"""Host-to-device bandwidth of the path a missed expert takes into its slot.

- On the CPU backend the device is the host: a host write into an array's memory.
- On CUDA misses are staged (node/staging.py): a DMA copy from pinned host memory into the
  array, then a device pass over it. Without a DMA engine (pinning refused, no driver API),
  the host write then a device pass, under MLX's managed memory a first-touch figure.
"""

from __future__ import annotations

import logging
import mmap
import time

import mlx.core as mx
import numpy as np

from edgemoe.node.dtypes import address_of
from edgemoe.node.staging import CudaDmaError, Dma

log = logging.getLogger(__name__)

TRANSFER_BYTES = 256 * 2**20
# Copied in pieces the size of a large expert, as misses are.
COPY_BYTES = 8 * 2**20
REPEATS = 3


def host_to_device_gbps(dma: Dma | None = None, nbytes: int = TRANSFER_BYTES, repeats: int = REPEATS) -> float:
    """The best of `repeats` transfers of `nbytes` into an MLX array: by `dma` from pinned
    memory if given, else written by the host; off the CPU, plus a device pass over every byte."""
    assert nbytes % 4 == 0
    target = mx.zeros((nbytes // 4,), dtype=mx.uint32)
    mx.eval(target)
    view = memoryview(target).cast("B")  # type: ignore[arg-type]  # mlx's stubs omit the buffer protocol
    pinned = mmap.mmap(-1, nbytes)
    source = memoryview(pinned)
    source[:] = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8).data
    src, dst = address_of(source), address_of(view)
    if dma is not None:
        try:
            dma.register(src, nbytes)
        except CudaDmaError as exc:
            # As the staging itself does when pinning is refused: the unstaged path is the one taken.
            log.warning("pinning %d MiB for the host-to-device figure failed (%s): timing host writes",
                        nbytes >> 20, exc)
            dma = None
    on_device = mx.default_device() != mx.cpu
    best = float("inf")
    try:
        for _ in range(repeats):
            began = time.perf_counter()
            if dma is not None:
                for offset in range(0, nbytes, COPY_BYTES):
                    dma.copy(dst + offset, src + offset, min(COPY_BYTES, nbytes - offset))
                dma.sync()
            else:
                view[:] = source
            if on_device:
                mx.eval(target.sum())
            best = min(best, time.perf_counter() - began)
    finally:
        if dma is not None:
            try:
                dma.sync()  # nothing may still be copying out of the buffer when it is unpinned
            finally:
                dma.unregister(src)
    del source, view
    return nbytes / best / 1e9
