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


INLINE_READ_BYTES = 1 << 20


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
        """One expert's whole record, as it is on disk."""
        spec = self.manifest.layer(layer)
        record = np.zeros(spec.record_bytes, dtype=np.uint8)
        view = memoryview(record)
        self.read_into(layer, expert, [view[t.offset : t.offset + t.nbytes] for t in spec.tensors])
        return record

    def read_into(self, layer: int, expert: int, views: list[memoryview]) -> None:
        """Reads an expert's tensors into `views` (one per tensor of the layer spec), one syscall a segment.

        On the first read of an expert its checksum is verified before this returns;
        on a mismatch the views hold bad bytes and the caller must discard them.
        """
        spec = self.manifest.layer(layer)
        entry = spec.experts[expert]
        pieces = _record_pieces(spec, views)
        for seg in entry.segments:
            iov = _slice_pieces(pieces, seg.record_offset, seg.record_offset + seg.length)
            got = os.preadv(self._fds[seg.file], iov, seg.offset)
            if got != seg.length:
                raise ExpertFileError(
                    f"expert file {self._paths[seg.file]} ended early reading layer {layer} expert {expert}; "
                    "repack the model (`edgemoe pack SRC DST --force`)"
                )
        key = (layer, expert)
        if key not in self._verified:
            digest = hashlib.sha256()
            for _, piece in pieces:
                digest.update(piece)
            if digest.hexdigest() != entry.checksum:
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

    def read_many_into(self, layer: int, targets: dict[int, list[memoryview]]) -> None:
        """Reads several experts in parallel, each into its views; `read_seconds` counts wall time."""
        start = time.perf_counter()
        try:
            spec = self.manifest.layer(layer)
            # Handing a small read to a thread costs more than the read itself.
            if len(targets) == 1 or spec.record_bytes * len(targets) <= INLINE_READ_BYTES:
                for expert, views in targets.items():
                    self.read_into(layer, expert, views)
                return
            futures = [self._pool.submit(self.read_into, layer, e, views) for e, views in targets.items()]
            for f in futures:
                f.result()
        finally:
            with self._lock:
                self.stats.read_seconds += time.perf_counter() - start

    def forget_verified(self, layer: int, expert: int) -> None:
        with self._lock:
            self._verified.discard((layer, expert))

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


def _record_pieces(spec, views: list[memoryview]) -> list[tuple[int, memoryview]]:
    """The record's byte ranges in order: the tensors' views and fresh buffers for the padding between them."""
    pieces, pos = [], 0
    for t, view in zip(spec.tensors, views):
        if t.offset > pos:
            pieces.append((pos, memoryview(bytearray(t.offset - pos))))
        pieces.append((t.offset, view))
        pos = t.offset + t.nbytes
    if spec.record_bytes > pos:
        pieces.append((pos, memoryview(bytearray(spec.record_bytes - pos))))
    return pieces


def _slice_pieces(pieces: list[tuple[int, memoryview]], start: int, end: int) -> list[memoryview]:
    out = []
    for offset, piece in pieces:
        lo, hi = max(start, offset), min(end, offset + len(piece))
        if lo < hi:
            out.append(piece[lo - offset : hi - offset])
    return out
