"""File pages mapped over memory MLX owns (the CPU backend on Linux): an expert's tensors
then live in the page cache's own pages, with no copy (node/mapped.py).

`mmap(MAP_FIXED | MAP_PRIVATE)` replaces the pages of a range of a slot pool with the file's:
reading them reads the page cache, a write would copy the page first (so nothing can reach
the file), and the pool's arrays see the file's bytes at the same addresses. Before MLX gets
the memory back, `restore` puts fresh anonymous pages there again: an allocator may assume
that memory it once had the kernel zero still reads as zero, which a file page does not.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

from .dtypes import address_of

PAGE = mmap.PAGESIZE
_MAP_FIXED = 0x10
_MAP_PRIVATE = 0x02
_MAP_ANONYMOUS = 0x20


def _libc_mmap() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):  # the flag values above are Linux's
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).mmap
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_void_p
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    return fn


_mmap = _libc_mmap()


def can_map_files() -> bool:
    return _mmap is not None


def max_map_count() -> int:
    """How many mappings the kernel lets a process have (Linux's vm.max_map_count)."""
    try:
        return int(open("/proc/sys/vm/max_map_count").read())
    except (OSError, ValueError):
        return 65530  # Linux's default


def mappable(view: memoryview, file_offset: int) -> bool:
    """Whether `view` is whole pages, and `file_offset` starts a page, so the file can be
    mapped over it exactly."""
    return len(view) > 0 and len(view) % PAGE == 0 and address_of(view) % PAGE == 0 and file_offset % PAGE == 0


def map_file(view: memoryview, fd: int, file_offset: int) -> None:
    """Maps `len(view)` bytes of the file at `file_offset` over `view`'s memory (`mappable`)."""
    _fixed(view, mmap.MAP_PRIVATE | _MAP_FIXED, fd, file_offset)


def restore(view: memoryview) -> None:
    """Fresh anonymous pages over every whole page of `view` (a pool about to go back to MLX)."""
    start = address_of(view)
    first = -(-start // PAGE) * PAGE
    pages = (start + len(view) - first) // PAGE
    if pages > 0:
        whole = (ctypes.c_char * (pages * PAGE)).from_address(first)
        _fixed(memoryview(whole).cast("B"), _MAP_PRIVATE | _MAP_FIXED | _MAP_ANONYMOUS, -1, 0)


def _fixed(view: memoryview, flags: int, fd: int, offset: int) -> None:
    assert _mmap is not None, "can_map_files() is False here"
    address = address_of(view)
    got = _mmap(address, len(view), mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, offset)
    if got != address:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap over {len(view)} bytes failed")
