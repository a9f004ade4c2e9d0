"""File pages mapped over memory MLX owns (the CPU backend on Linux): an expert's tensors
then live in the page cache's own pages, with no copy (node/mapped.py).

`mmap(MAP_FIXED | MAP_PRIVATE)` replaces the pages of a range of a slot pool with the file's:
reading them reads the page cache, a write would copy the page first (so nothing can reach
the file), and the pool's arrays see the file's bytes at the same addresses. Before MLX gets
the memory back, `FileMappings.restore_all` puts fresh anonymous pages there again: an
allocator may assume that memory it once had the kernel zero still reads as zero, which a
file page does not.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import sys
from pathlib import Path

import mlx.core as mx

from .dtypes import address_of

PAGE = mmap.PAGESIZE
_MAP_FIXED = 0x10
_MAP_PRIVATE = 0x02
_MAP_ANONYMOUS = 0x20
_MADV_DONTNEED = 4


class _Libc:
    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.mmap = libc.mmap
        self.mmap.restype = ctypes.c_void_p
        self.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        self.madvise = libc.madvise
        self.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.mincore = libc.mincore
        self.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def _open_libc() -> _Libc | None:
    # The flag values above are Linux's. An MLX built for a GPU allocates even its CPU arrays
    # from the GPU's memory (CUDA managed memory, Metal buffers), which file pages must not replace.
    if (not sys.platform.startswith("linux") or mx.metal.is_available()
            or (hasattr(mx, "cuda") and mx.cuda.is_available())):
        return None
    try:
        return _Libc()
    except (OSError, AttributeError):
        return None


_libc = _open_libc()


def can_map_files() -> bool:
    return _libc is not None


def max_map_count() -> int:
    """How many mappings the kernel lets a process have (Linux's vm.max_map_count)."""
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return 65530  # Linux's default


def mapped_count() -> int:
    """How many mappings this process has now."""
    try:
        return len(Path("/proc/self/maps").read_text().splitlines())
    except OSError:
        return 0


def mappable(view: memoryview, file_offset: int) -> bool:
    """Whether `view` is whole pages, and `file_offset` starts a page, so the file can be
    mapped over it exactly."""
    return len(view) > 0 and len(view) % PAGE == 0 and address_of(view) % PAGE == 0 and file_offset % PAGE == 0


def discard(view: memoryview) -> None:
    """Gives the kernel back the pages wholly inside `view` (anonymous memory: they read as
    zeros again, and take no RAM until written)."""
    start, length = _whole_pages(view)
    if length:
        assert _libc is not None, "can_map_files() is False here"
        _libc.madvise(start, length, _MADV_DONTNEED)


class FileMappings:
    """The ranges of pool memory a file is mapped over, to give back as anonymous pages.

    A map in the middle of a pool splits its memory's mapping: at most two more of the
    process's `max_map_count` (about one as slots fill in order). Maps stop with ENOMEM where
    the next could leave fewer than `KEEP_FREE` of them, counted again from the kernel's own
    account before stopping: at the limit every mmap of the process fails, thread stacks and
    large allocations included. After a failure `failed` is set, and the caller reads the
    rest, until the pools are given back (`restore_all`)."""

    KEEP_FREE = 1024

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []
        self.failed = False
        self._room = 0

    def map(self, view: memoryview, fd: int, file_offset: int) -> None:
        """Maps `len(view)` bytes of the file at `file_offset` over `view`'s memory (`mappable`).
        On OSError the range holds what it held, or, where the failed call unmapped it, fresh
        anonymous pages; if even those cannot be had, a second OSError."""
        if self._room < 2:
            self._room = max_map_count() - mapped_count() - self.KEEP_FREE
            if self._room < 2:
                self.failed = True
                raise OSError(errno.ENOMEM, f"mapping more could pass vm.max_map_count ({max_map_count()})")
        self._room -= 2
        address = address_of(view)
        try:
            _fixed(address, len(view), _MAP_PRIVATE | _MAP_FIXED, fd, file_offset)
        except OSError:
            self.failed = True
            # Linux checks its limits before it unmaps anything, but a failed MAP_FIXED may unmap.
            if not _is_mapped(address, len(view)):
                _fixed(address, len(view), _MAP_PRIVATE | _MAP_FIXED | _MAP_ANONYMOUS, -1, 0)
            raise
        self.ranges.append((address, len(view)))

    def restore_all(self) -> None:
        """Fresh anonymous pages over every mapped range, adjacent ones together: each run of
        them covers whole mappings, so none is split (at the kernel's limit a split fails).
        Every run is tried; the first failure is raised after, and its run kept for a retry."""
        runs: list[list[int]] = []
        for start, length in sorted(self.ranges):
            if runs and runs[-1][0] + runs[-1][1] == start:
                runs[-1][1] += length
            else:
                runs.append([start, length])
        self.ranges, self.failed, self._room = [], False, 0  # the room is counted again at the next map
        error: OSError | None = None
        for start, length in runs:
            try:
                _fixed(start, length, _MAP_PRIVATE | _MAP_FIXED | _MAP_ANONYMOUS, -1, 0)
            except OSError as exc:
                self.ranges.append((start, length))
                error = error or exc
        if error is not None:
            raise error


def _whole_pages(view: memoryview) -> tuple[int, int]:
    start = address_of(view)
    first = -(-start // PAGE) * PAGE
    return first, max(0, (start + len(view) - first) // PAGE * PAGE)


def _is_mapped(address: int, length: int) -> bool:
    assert _libc is not None
    vec = (ctypes.c_ubyte * (-(-length // PAGE)))()
    return _libc.mincore(address, length, vec) == 0  # ENOMEM: some page is not mapped


def _fixed(address: int, length: int, flags: int, fd: int, offset: int) -> None:
    assert _libc is not None, "can_map_files() is False here"
    got = _libc.mmap(address, length, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, offset)
    if got != address:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap over {length} bytes at {address:#x} failed")
