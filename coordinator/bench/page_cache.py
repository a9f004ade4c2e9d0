"""The page cache around the expert files: drop it, warm it, see what it holds, and count
which reads could have reached the disk."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import threading
from pathlib import Path

import numpy as np

from edgemoe.node.manifest import Manifest, resolve_file
from edgemoe.node.pending import PendingReads
from edgemoe.node.store import ExpertStore

WARM_BLOCK_BYTES = 8 * 2**20


def expert_paths(model_dir: Path, manifest: Manifest) -> list[Path]:
    return [resolve_file(model_dir, name) for name in manifest.files]


def drop_page_cache(paths: list[Path]) -> str | None:
    """Evicts the files' clean pages; returns the method, or None where the OS has none."""
    if not hasattr(os, "posix_fadvise"):
        return None
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            # Dirty pages cannot be dropped: write them back first.
            with contextlib.suppress(OSError):
                os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "posix_fadvise(POSIX_FADV_DONTNEED)"


def warm_page_cache(paths: list[Path]) -> None:
    buf = bytearray(WARM_BLOCK_BYTES)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def resident_fraction(paths: list[Path]) -> float | None:
    """Fraction of the files' pages in the page cache (mincore), or None if it cannot tell."""
    total = resident = 0
    for path in paths:
        pages = resident_pages(path)
        if pages is None:
            return None
        resident += int(pages.sum())
        total += pages.size
    return resident / total if total else None


def resident_pages(path: Path) -> np.ndarray | None:
    """Per page of the file, whether the page cache holds it (mincore); None if it cannot tell."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mincore = libc.mincore
        mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        size = os.path.getsize(path)
        if size == 0:
            return np.zeros(0, dtype=bool)
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mm:
            # ACCESS_COPY only to get a writable buffer ctypes can address; nothing is touched.
            view = (ctypes.c_char * size).from_buffer(mm)
            try:
                rc = mincore(ctypes.addressof(view), size, vec)
            finally:
                del view
        if rc != 0:
            return None
        return (np.frombuffer(memoryview(vec), dtype=np.uint8) & 1).astype(bool)
    except (OSError, AttributeError, ValueError, TypeError):
        return None


def disk_read_bytes() -> int | None:
    """Bytes this process had the kernel fetch from storage, readahead included (Linux only)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


class FirstReads:
    """Counts the records read for the first time since the page cache was dropped.

    Reading a record again finds it in the page cache (RAM permitting), so only
    first reads reach the disk; the store cannot tell the two apart, so the bench
    wraps its `start_reads` (which every read goes through) on this one instance.
    """

    def __init__(self, store: ExpertStore):
        self.reads = 0
        self.bytes = 0
        self._seen: set[tuple[int, int]] = set()
        self._lock = threading.Lock()
        self._store = store
        self._start_reads = store.start_reads
        store.start_reads = self._tracked  # type: ignore[method-assign]

    def _tracked(self, layer: int, targets: dict[int, list[memoryview]], inline: bool = True,
                 waited: bool = True) -> PendingReads:
        pending = self._start_reads(layer, targets, inline, waited)
        with self._lock:
            for expert in targets:
                if (layer, expert) not in self._seen:
                    self._seen.add((layer, expert))
                    self.reads += 1
                    self.bytes += self._store.manifest.layer(layer).record_bytes
        return pending

    def forget(self) -> None:
        with self._lock:
            self._seen.clear()

    def close(self) -> None:
        del self._store.start_reads
