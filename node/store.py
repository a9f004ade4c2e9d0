"""The packed expert store: one pread per expert (several for --in-place), in parallel."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ChecksumError, ExpertFileError
from .manifest import Manifest, resolve_file


@dataclass
class StoreStats:
    reads: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0
    verified: int = 0


class ExpertStore:
    """Reads expert records from the files named in a manifest.

    A record's checksum is verified the first time it is read, so a corrupted
    expert is never handed to compute; later reads trust the verified bytes on
    disk, which keeps the checksum off the steady-state read path.
    """

    def __init__(self, model_dir: Path, manifest: Manifest, io_threads: int = 4):
        self.model_dir = Path(model_dir)
        self.manifest = manifest
        self.stats = StoreStats()
        self._lock = threading.Lock()
        self._verified: set[tuple[int, int]] = set()
        self._paths = [resolve_file(self.model_dir, name) for name in manifest.files]
        self._fds = [self._open(path) for path in self._paths]
        self._check_sizes()
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="expert-io")

    def _open(self, path: Path) -> int:
        try:
            return os.open(path, os.O_RDONLY)
        except FileNotFoundError as exc:
            self.close()
            if self.manifest.in_place:
                raise ExpertFileError(
                    f"source model file {path} is missing: this pack reads experts from it (--in-place); "
                    "restore the source model or repack"
                ) from exc
            raise ExpertFileError(
                f"expert file {path} is missing; repack the model (`edgemoe pack SRC DST --force`)"
            ) from exc
        except OSError as exc:
            self.close()
            raise ExpertFileError(f"cannot open expert file {path}: {exc.strerror}") from exc

    def _check_sizes(self) -> None:
        needed = [0] * len(self._paths)
        for layer in self.manifest.layers:
            for expert in layer.experts:
                for seg in expert.segments:
                    needed[seg.file] = max(needed[seg.file], seg.offset + seg.length)
        for fd, path, size in zip(self._fds, self._paths, needed):
            actual = os.fstat(fd).st_size
            if actual < size:
                self.close()
                raise ExpertFileError(
                    f"expert file {path} is truncated ({actual} of {size} bytes); "
                    "repack the model (`edgemoe pack SRC DST --force`)"
                )

    def read(self, layer: int, expert: int) -> np.ndarray:
        spec = self.manifest.layer(layer)
        entry = spec.experts[expert]
        record = np.zeros(spec.record_bytes, dtype=np.uint8)
        view = memoryview(record)
        for seg in entry.segments:
            got = os.preadv(self._fds[seg.file], [view[seg.record_offset : seg.record_offset + seg.length]], seg.offset)
            if got != seg.length:
                raise ExpertFileError(
                    f"expert file {self._paths[seg.file]} ended early reading layer {layer} expert {expert}; "
                    "repack the model (`edgemoe pack SRC DST --force`)"
                )
        key = (layer, expert)
        if key not in self._verified:
            if hashlib.sha256(record).hexdigest() != entry.checksum:
                files = sorted({str(self._paths[s.file]) for s in entry.segments})
                raise ChecksumError(
                    f"layer {layer} expert {expert} in {', '.join(files)} fails its checksum; "
                    "the file is corrupted: repack the model (`edgemoe pack SRC DST --force`)"
                )
            with self._lock:
                self._verified.add(key)
                self.stats.verified += 1
        with self._lock:
            self.stats.reads += 1
            self.stats.bytes_read += spec.record_bytes
        return record

    def read_many(self, layer: int, experts: list[int]) -> dict[int, np.ndarray]:
        """Reads the experts in parallel; `read_seconds` counts the batch's wall time."""
        start = time.perf_counter()
        try:
            if len(experts) == 1:
                return {experts[0]: self.read(layer, experts[0])}
            futures = {e: self._pool.submit(self.read, layer, e) for e in experts}
            return {e: f.result() for e, f in futures.items()}
        finally:
            with self._lock:
                self.stats.read_seconds += time.perf_counter() - start

    def close(self) -> None:
        for fd in getattr(self, "_fds", []):
            os.close(fd)
        self._fds = []
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self) -> "ExpertStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
