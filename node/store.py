"""The packed expert store: one pread per expert (several for --in-place), in parallel."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import mmap
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import filemap
from .direct_io import O_DIRECT, bypass_page_cache
from .dtypes import address_of
from .errors import ChecksumError, ExpertFileError
from .limits import DIRECT_ALIGNMENT, ram_bytes
from .manifest import Manifest, resolve_file
from .pending import PendingReads

log = logging.getLogger(__name__)

INLINE_READ_BYTES = 1 << 20
READ_CHUNK_BYTES = 1 << 20
# auto: bypass the page cache when it could not hold the experts anyway.
IO_MODES = ("auto", "direct", "buffered")
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


@dataclass
class StoreStats:
    reads: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0
    verified: int = 0
    # Experts whose tensors were mapped instead of read (`map_into`), and the bytes mapped.
    mapped: int = 0
    bytes_mapped: int = 0


class ExpertStore:
    """Reads expert records from the files named in a manifest.

    A record's checksum is verified the first time it is read, so a corrupted
    expert is never handed to compute; later reads trust the verified bytes on
    disk, which keeps the checksum off the steady-state read path.
    """

    def __init__(self, model_dir: Path, manifest: Manifest, io_threads: int = 8, io_mode: str = "auto"):
        self.model_dir = Path(model_dir)
        self.manifest = manifest
        self.stats = StoreStats()
        self._lock = threading.Lock()
        self._verified: set[tuple[int, int]] = set()
        self._bounce = threading.local()
        # Small buffered reads try the page cache first (`_read_inline`); the A/B switch.
        self._nowait = bool(_RWF_NOWAIT)
        self._paths = [resolve_file(self.model_dir, name) for name in manifest.files]
        self._fds: list[int] = []
        self._direct_fds: list[bool] = []
        self.set_io_mode(io_mode)
        self._check_sizes()
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="expert-io")

    def set_io_mode(self, io_mode: str) -> None:
        """Reopens the files for direct or buffered reads (not while reads are in flight)."""
        if io_mode not in IO_MODES:
            raise ValueError(f"unknown I/O mode {io_mode!r}; use one of {', '.join(IO_MODES)}")
        self.direct = io_mode == "direct" or (io_mode == "auto" and self.manifest.total_expert_bytes > ram_bytes() // 2)
        for fd in self._fds:
            os.close(fd)
        self._fds, self._direct_fds = [], []
        for path in self._paths:
            fd, direct = self._open(path)
            self._fds.append(fd)
            self._direct_fds.append(direct)

    @property
    def any_direct(self) -> bool:
        """Whether any expert file is read around the page cache (not only asked to be)."""
        return any(self._direct_fds)

    @property
    def can_advise(self) -> bool:
        """Whether `advise` can read ahead: every file through the page cache, and posix_fadvise."""
        return hasattr(os, "posix_fadvise") and not self.any_direct

    def advise(self, layer: int, experts: list[int]) -> None:
        """Asks the kernel to start reading these experts into the page cache (WILLNEED), and
        returns without waiting: a later read of them finds them there, or in flight."""
        spec = self.manifest.layer(layer)
        for seg in (seg for e in experts for seg in spec.experts[e].segments):
            os.posix_fadvise(self._fds[seg.file], seg.offset, seg.length, os.POSIX_FADV_WILLNEED)

    def io_modes(self) -> dict[str, str]:
        """Per expert file, the I/O in effect: "direct" (around the page cache) or "buffered".

        `direct` is what was asked for; a file system that refuses direct I/O leaves its
        files "buffered" here (with a warning in the log)."""
        return {str(p): "direct" if d else "buffered" for p, d in zip(self._paths, self._direct_fds)}

    def _open(self, path: Path) -> tuple[int, bool]:
        try:
            fd = os.open(path, os.O_RDONLY)
            # Experts are read whole and at random: kernel readahead would only
            # pull in neighbours nobody asked for.
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            if self.direct:
                return bypass_page_cache(fd, path)
            return fd, False
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
        view = record.data
        self.read_into(layer, expert, [view[t.offset : t.offset + t.nbytes] for t in spec.tensors])
        return record

    def read_into(self, layer: int, expert: int, views: list[memoryview]) -> None:
        """Reads an expert's tensors into `views` (one per tensor of the layer spec).

        On the first read of an expert its checksum is verified before this returns;
        on a mismatch the views hold bad bytes and the caller must discard them.
        """
        self.read_many_into(layer, {expert: views})

    def read_many_into(self, layer: int, targets: dict[int, list[memoryview]]) -> None:
        """Reads several experts, each into its views, and returns once all are in place."""
        self.start_reads(layer, targets).wait_all()

    def map_into(self, layer: int, expert: int, views: list[memoryview], mappings: filemap.FileMappings) -> int:
        """Like `read_into`, but each tensor that is whole pages at a page-aligned file offset
        gets the page cache's own pages mapped over its view instead of a copy (filemap.py),
        recorded in `mappings`, which the caller restores before the memory goes back to
        MLX. Returns the bytes mapped: 0 where this OS cannot map them."""
        spec = self.manifest.layer(layer)
        pieces = _record_pieces(spec, views)
        tensors = {id(v) for v in views}  # the rest are padding buffers of ours: never mapped over
        mapped = 0
        for seg in spec.experts[expert].segments:
            for offset, piece in pieces:
                lo, hi = max(seg.record_offset, offset), min(seg.record_offset + seg.length, offset + len(piece))
                if lo >= hi:
                    continue
                part, at = piece[lo - offset : hi - offset], seg.offset + lo - seg.record_offset
                if (filemap.can_map_files() and not mappings.failed and id(piece) in tensors
                        and filemap.mappable(part, at)):
                    try:
                        mappings.map(part, self._fds[seg.file], at)
                        mapped += len(part)
                        continue
                    except OSError as exc:  # e.g. vm.max_map_count reached
                        log.warning("mapping %s failed (%s): reading the experts instead", self._paths[seg.file], exc)
                        mappings.failed = True
                self._read_chunk(layer, expert, seg.file, [part], at, len(part))
        self.verify_first_read(layer, expert, pieces)
        with self._lock:
            self.stats.mapped += mapped > 0
            self.stats.bytes_mapped += mapped
            self.stats.reads += mapped < spec.record_bytes
            self.stats.bytes_read += spec.record_bytes - mapped
        return mapped

    def start_reads(self, layer: int, targets: dict[int, list[memoryview]], inline: bool = True,
                    waited: bool = True) -> PendingReads:
        """Starts reading several experts, each into its views, in chunks spread over the
        I/O threads in the order given, so the first experts are complete first.

        Large records are split so that even one or two misses keep several reads in flight;
        small batches are read inline, before this returns, where a thread hand-off would cost
        more than the read (`_read_inline`), unless `inline` is False. Of those, a record the
        page cache lacks goes to the I/O threads, unless `waited` (the caller waits for the
        batch at once) and the kernel reads ahead on request: it is then read here, after the
        others. `read_seconds` counts wall time from the start to the last chunk read.
        """
        start = time.perf_counter()
        spec = self.manifest.layer(layer)
        pieces = {e: _record_pieces(spec, views) for e, views in targets.items()}
        with self._lock:
            self.stats.reads += len(targets)
            self.stats.bytes_read += spec.record_bytes * len(targets)
        pending = PendingReads(self, layer, pieces, start)
        inline = inline and spec.record_bytes * len(targets) <= INLINE_READ_BYTES
        read_here = []
        on_disk: list[tuple[int, list]] = []
        try:
            for e in targets:
                jobs = self._chunks(spec, e, pieces[e])
                if inline and self._read_inline(layer, e, jobs):
                    read_here.append(e)
                elif inline and waited and self.can_advise:
                    on_disk.append((e, jobs))
                else:
                    chunks = pending.chunks[e] = []  # kept as they start: an interruption waits for them
                    chunks.extend(self._pool.submit(self._read_chunk, layer, e, *job) for job in jobs)
            if on_disk:
                # All asked for at once (a failed try starts no read where RWF_NOWAIT means no
                # I/O at all), then waited for here: less CPU than an I/O thread hand-off each
                # (README, "Small reads of records on the disk"). A refused hint: one by one.
                with contextlib.suppress(OSError):
                    self.advise(layer, [e for e, _ in on_disk])
            for e, jobs in on_disk:
                for job in jobs:
                    self._read_chunk(layer, e, *job)
                read_here.append(e)
        except BaseException:
            pending.settle()  # they write into the caller's buffers
            with self._lock:
                pending.finished(time.perf_counter())
            raise
        try:
            last = [f for chunks in pending.chunks.values() for f in chunks]
            remaining = [len(last)]
            if not last:
                with self._lock:
                    pending.finished(time.perf_counter())

            def done(_future: Future) -> None:
                with self._lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        pending.finished(time.perf_counter())

            for f in last:
                f.add_done_callback(done)
            for e in read_here:
                pending.wait(e)  # verifies a first read
        except BaseException:
            pending.settle()  # the reads still in flight write into the caller's buffers
            raise
        return pending

    def _read_inline(self, layer: int, expert: int, jobs: list) -> bool:
        """Reads a small record on this thread, where that is a memory copy; returns whether
        it did. On buffered files RWF_NOWAIT (Linux) reads only what the page cache holds:
        a record on the disk is left for later (`start_reads`), read in parallel with the
        others instead of waiting its own disk latency here. Direct I/O, or no RWF_NOWAIT:
        read here."""
        for file, iov, offset, length in jobs:
            if self._nowait and not self._direct_fds[file]:
                try:
                    if os.preadv(self._fds[file], iov, offset, _RWF_NOWAIT) == length:
                        continue
                    return False  # partly cached: read again, whole, later
                except BlockingIOError:
                    return False
                except (OSError, NotImplementedError) as exc:  # NotImplementedError: a Python without preadv2
                    if isinstance(exc, OSError) and exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        return False  # the later read reports it
                    self._nowait = False
                    log.info("%s: no RWF_NOWAIT reads; small records are read inline", self._paths[file])
            self._read_chunk(layer, expert, file, iov, offset, length)
        return True

    def _chunks(self, spec, expert: int, pieces) -> list[tuple[int, list[memoryview], int, int]]:
        segments = spec.experts[expert].segments
        if len(segments) == 1 and segments[0].length == spec.record_bytes <= READ_CHUNK_BYTES:
            # The whole record in one read (small experts, the common miss): no slicing.
            return [(segments[0].file, [piece for _, piece in pieces], segments[0].offset, segments[0].length)]
        out = []
        for seg in segments:
            end = seg.record_offset + seg.length
            for lo in range(seg.record_offset, end, READ_CHUNK_BYTES):
                hi = min(lo + READ_CHUNK_BYTES, end)
                out.append((seg.file, _slice_pieces(pieces, lo, hi), seg.offset + lo - seg.record_offset, hi - lo))
        return out

    def _read_chunk(self, layer: int, expert: int, file: int, iov: list[memoryview], offset: int, length: int) -> None:
        try:
            if self._direct_fds[file] and O_DIRECT:
                got = self._read_direct(self._fds[file], iov, offset, length)
            else:
                got = os.preadv(self._fds[file], iov, offset)
        except OSError as exc:
            raise ExpertFileError(f"reading layer {layer} expert {expert} from {self._paths[file]} failed "
                                  f"({exc.strerror or exc}); check the disk, or repack the model") from None
        if got != length:
            raise ExpertFileError(
                f"expert file {self._paths[file]} ended early reading layer {layer} expert {expert}; "
                "repack the model (`edgemoe pack SRC DST --force`)"
            )

    def _read_direct(self, fd: int, iov: list[memoryview], offset: int, length: int) -> int:
        """O_DIRECT wants block-aligned offsets, lengths and buffers: where the chunk and its
        destinations are (page-aligned slots and staging, packed tensors), it is read in
        place; otherwise the aligned window goes into this thread's page-aligned bounce
        buffer, then is copied out."""
        if offset % DIRECT_ALIGNMENT == 0 and all(
                len(p) % DIRECT_ALIGNMENT == 0 and address_of(p) % DIRECT_ALIGNMENT == 0 for p in iov):
            try:
                return os.preadv(fd, iov, offset)
            except OSError as exc:
                # Memory the kernel cannot read into directly (EFAULT, e.g. CUDA managed
                # memory on some drivers): through the bounce buffer instead.
                if exc.errno not in (errno.EFAULT, errno.EINVAL):
                    raise
        start = offset - offset % DIRECT_ALIGNMENT
        end = -(-(offset + length) // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT
        bounce = getattr(self._bounce, "buf", None)
        if bounce is None or len(bounce) < end - start:
            size = max(end - start, READ_CHUNK_BYTES + 2 * DIRECT_ALIGNMENT)
            self._bounce.buf = bounce = memoryview(mmap.mmap(-1, size))
        got = os.preadv(fd, [bounce[: end - start]], start) - (offset - start)
        if got < length:
            return max(got, 0)
        pos = offset - start
        for piece in iov:
            piece[:] = bounce[pos : pos + len(piece)]
            pos += len(piece)
        return length

    def verify_first_read(self, layer: int, expert: int, pieces) -> None:
        """Checks a record's checksum, unless it was verified before (then the disk is trusted)."""
        if (layer, expert) in self._verified:
            return
        entry = self.manifest.layer(layer).experts[expert]
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
            self._verified.add((layer, expert))
            self.stats.verified += 1

    def close(self) -> None:
        for fd in getattr(self, "_fds", []):
            os.close(fd)
        self._fds = []
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self) -> ExpertStore:
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
