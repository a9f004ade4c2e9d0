"""Staged misses, for arrays that live in CUDA managed memory (MLX on an NVIDIA GPU).

A miss read straight into a slot the GPU has read makes the slot's pages migrate back to
the host and then, fault by fault, to the GPU again: 1.7 GB/s on an H200 (6 MiB experts,
8 at a time). Read into pinned host memory and copied into the slot by DMA, the same
bytes move at 26-30 GB/s (.ci/gpu-probe-copy.py measures both). Metal's unified memory
and the CPU backend need none of this: there a miss is read into its slot in place.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import threading
import weakref
from typing import Protocol

import mlx.core as mx

from .dtypes import address_of
from .errors import EdgemoeError
from .manifest import LayerSpec
from .pool import SlotPool

log = logging.getLogger(__name__)


class Dma(Protocol):
    """Host-to-device copies: `copy` queues one, `sync` returns once every queued one is done."""

    def register(self, address: int, nbytes: int) -> None: ...

    def unregister(self, address: int) -> None: ...

    def copy(self, dst: int, src: int, nbytes: int) -> None: ...

    def sync(self) -> None: ...

    def place(self, address: int, nbytes: int, on_gpu: bool | None) -> None: ...

    @property
    def can_place(self) -> bool: ...

    def close(self) -> None: ...


class CudaDmaError(EdgemoeError):
    pass


# cuMemAdvise's advice, and CUmemLocation's types.
_PREFERRED_LOCATION, _NO_PREFERRED_LOCATION, _ACCESSED_BY, _NOT_ACCESSED_BY = 3, 4, 5, 6
_ON_DEVICE, _ON_HOST = 1, 2


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class CudaDma:
    """Copies on a stream of their own, through the CUDA driver API (MLX exposes none), in
    the device's primary context: MLX's own, so its arrays' addresses are valid here."""

    def __init__(self, lib: ctypes.CDLL, device: int = 0):
        self._lib = lib
        lib.cuMemcpyHtoDAsync_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        lib.cuStreamSynchronize.argtypes = [ctypes.c_void_p]
        lib.cuMemHostRegister_v2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        lib.cuMemHostUnregister.argtypes = [ctypes.c_void_p]
        lib.cuCtxSetCurrent.argtypes = [ctypes.c_void_p]
        lib.cuStreamDestroy_v2.argtypes = [ctypes.c_void_p]
        # CUDA 12.2's: looked up here, needed only by `place`, so an older driver still stages.
        self._advise = getattr(lib, "cuMemAdvise_v2", None)
        self._prefetch = getattr(lib, "cuMemPrefetchAsync_v2", None)
        if self._advise is not None and self._prefetch is not None:
            self._advise.argtypes = [ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int, _Location]
            self._prefetch.argtypes = [ctypes.c_uint64, ctypes.c_size_t, _Location, ctypes.c_uint, ctypes.c_void_p]
        self._device = ctypes.c_int()
        self._context = ctypes.c_void_p()
        self._check("cuInit", lib.cuInit(0))
        self._check("cuDeviceGet", lib.cuDeviceGet(ctypes.byref(self._device), device))
        self._check("cuDevicePrimaryCtxRetain", lib.cuDevicePrimaryCtxRetain(ctypes.byref(self._context),
                                                                             self._device))
        self._current = threading.local()
        self._make_current()
        self._stream = ctypes.c_void_p()
        self._check("cuStreamCreate", lib.cuStreamCreate(ctypes.byref(self._stream), 1))  # CU_STREAM_NON_BLOCKING

    @staticmethod
    def _check(call: str, status: int) -> None:
        if status != 0:
            raise CudaDmaError(f"{call} failed with CUDA error {status}")

    def _make_current(self) -> None:
        # A context is current per thread; the node copies from its RPC threads.
        if not getattr(self._current, "set", False):
            self._check("cuCtxSetCurrent", self._lib.cuCtxSetCurrent(self._context))
            self._current.set = True

    def register(self, address: int, nbytes: int) -> None:
        self._make_current()
        self._check("cuMemHostRegister", self._lib.cuMemHostRegister_v2(address, nbytes, 0))

    def unregister(self, address: int) -> None:
        self._make_current()
        self._check("cuMemHostUnregister", self._lib.cuMemHostUnregister(address))

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        self._make_current()
        self._check("cuMemcpyHtoDAsync", self._lib.cuMemcpyHtoDAsync_v2(dst, src, nbytes, self._stream))

    def sync(self) -> None:
        self._make_current()
        self._check("cuStreamSynchronize", self._lib.cuStreamSynchronize(self._stream))

    @property
    def can_place(self) -> bool:
        return self._advise is not None and self._prefetch is not None

    def place(self, address: int, nbytes: int, on_gpu: bool | None) -> None:
        """Where a range of managed memory (an MLX array's) lives: on the GPU, or on the host,
        mapped for the GPU, whose kernels then read it over the bus with no page migrating.
        None: no say any more (before MLX reuses the memory for other arrays)."""
        if self._advise is None or self._prefetch is None:
            raise CudaDmaError("this CUDA driver has no cuMemAdvise_v2 (CUDA 12.2 or later): update the "
                               "NVIDIA driver, or use --map-experts off")
        self._make_current()
        gpu = _Location(_ON_DEVICE, self._device.value)
        if on_gpu is None:
            self._check("cuMemAdvise", self._advise(address, nbytes, _NO_PREFERRED_LOCATION, gpu))
            self._check("cuMemAdvise", self._advise(address, nbytes, _NOT_ACCESSED_BY, gpu))
            return
        where = gpu if on_gpu else _Location(_ON_HOST, 0)
        self._check("cuMemAdvise", self._advise(address, nbytes, _PREFERRED_LOCATION, where))
        self._check("cuMemAdvise", self._advise(address, nbytes, _ACCESSED_BY, gpu))
        self._check("cuMemPrefetchAsync", self._prefetch(address, nbytes, where, 0, self._stream))

    def close(self) -> None:
        """Destroys the stream and releases the context (each `LocalExperts` opens its own)."""
        if self._stream.value:
            self._make_current()
            self._lib.cuStreamDestroy_v2(self._stream)
            self._lib.cuDevicePrimaryCtxRelease_v2(self._device)
            self._stream = ctypes.c_void_p()


def open_dma() -> Dma | None:
    """A DMA engine when MLX computes on a CUDA GPU, else None (nothing to stage)."""
    if mx.default_device() != mx.gpu or not mx.cuda.is_available():
        return None
    try:
        return CudaDma(ctypes.CDLL("libcuda.so.1"))
    except (OSError, AttributeError, CudaDmaError) as exc:
        log.warning("no CUDA driver API for staged expert reads (%s): reading into slots directly", exc)
        return None


def stage(spec: LayerSpec, records: int, pool: SlotPool, dma: Dma) -> Staging | None:
    """Staging for a pool, or None (misses then go straight into their slots) where the
    driver refuses it, e.g. past the limit on pinned memory."""
    try:
        return Staging(spec, records, pool, dma)
    except CudaDmaError as exc:
        log.warning("staging %d experts of %.1f MB in pinned memory failed (%s): reading into slots directly",
                    records, spec.record_bytes / 2**20, exc)
        return None


class Staging:
    """`records` pinned host records of one layout, stored tensor by tensor (all the
    records' first tensor, then their second...): a miss is read into one record, then
    copied into its slot. Misses in consecutive records bound for consecutive slots (the
    scratch slots, a fresh cache's free slots) go in one copy per tensor: each copy is a
    driver call of ~9 us, and a layer of small experts missed 9 tensors x 7 experts."""

    def __init__(self, spec: LayerSpec, records: int, pool: SlotPool, dma: Dma):
        self.spec = spec
        self.dma = dma
        # Page-aligned: direct I/O reads a tensor in place where its size keeps it aligned (store.py).
        self._buffer = mmap.mmap(-1, records * spec.record_bytes)
        self._view = memoryview(self._buffer)
        self._base = address_of(self._view)
        dma.register(self._base, len(self._buffer))
        # Unpinned when closed, or when dropped unclosed (a failed build, a model never closed).
        self._unpin = weakref.finalize(self, _unregister_quietly, dma, self._base)
        self._tensor_starts = []
        start = 0
        for t in spec.tensors:
            self._tensor_starts.append(start)
            start += records * t.nbytes
        self._slot_bases = [address_of(pool.byte_views()[t.name]) for t in spec.tensors]

    def views(self, record: int) -> list[memoryview]:
        return [self._view[start + record * t.nbytes : start + (record + 1) * t.nbytes]
                for start, t in zip(self._tensor_starts, self.spec.tensors)]

    def copy(self, landing: list[tuple[int, int]]) -> None:
        """Queues the copies of (record, slot) pairs into their slots; `dma.sync()` waits for them."""
        for record, slot, run in _runs(landing):
            for start, slot_base, t in zip(self._tensor_starts, self._slot_bases, self.spec.tensors):
                self.dma.copy(slot_base + slot * t.nbytes, self._base + start + record * t.nbytes, run * t.nbytes)

    def close(self) -> None:
        self._unpin()


def _runs(pairs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(record, slot) pairs as (first record, first slot, length) runs in which both go up by one."""
    runs: list[tuple[int, int, int]] = []
    for record, slot in sorted(pairs):
        if runs and record == runs[-1][0] + runs[-1][2] and slot == runs[-1][1] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((record, slot, 1))
    return runs


def _unregister_quietly(dma: Dma, address: int) -> None:
    try:
        dma.unregister(address)
    except CudaDmaError as exc:
        log.warning("unpinning a staging buffer failed: %s", exc)
