"""The disk's raw read bandwidth over the packed expert files: our own pread loop with the
page cache bypassed (or dropped before each pass), and `fio` where it is installed."""

from __future__ import annotations

import json
import logging
import mmap
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edgemoe.node.limits import DIRECT_ALIGNMENT
from edgemoe.node.manifest import Manifest, align

from .page_cache import drop_page_cache

log = logging.getLogger(__name__)

RAW_BLOCK_BYTES = 8 * 2**20
RAW_THREADS = 4
# Enough passes over small files to time them; a cap so a 500 GB model is sampled, not read.
RAW_MIN_SECONDS = 1.0
RAW_MAX_BYTES = 2 * 2**30
RAW_MAX_PASSES = 64
FIO_RUNTIME_S = 2


@dataclass
class RawRead:
    gbps: float
    method: str
    bytes: int
    seconds: float
    threads: int
    block_bytes: int


@dataclass
class Job:
    path_index: int
    offset: int
    length: int


def _open_uncached(path: Path) -> tuple[int, str] | None:
    """An fd whose reads bypass the page cache, and how; None if the OS or file system refuses."""
    if hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), "O_DIRECT"
        except OSError:
            return None
    if sys.platform == "darwin":
        import fcntl

        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", 48), 1)
        except OSError:
            os.close(fd)
            return None
        return fd, "F_NOCACHE"
    return None


def _buffers(jobs: list[Job], threads: int) -> list[mmap.mmap]:
    """Page-aligned (mmap) buffers, one a thread, touched now so page faults stay out of the timing."""
    size = align(max(j.length for j in jobs), mmap.PAGESIZE)
    buffers = [mmap.mmap(-1, size) for _ in range(threads)]
    for buf in buffers:
        buf.write(bytes(size))
    return buffers


def _read_jobs(fds: list[int], jobs: list[Job], buffers: list[mmap.mmap]) -> tuple[int, float]:
    """Reads the jobs on one thread per buffer; returns bytes read and wall seconds."""
    threads = len(buffers)
    done = [0] * threads
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        view = memoryview(buffers[i])
        try:
            for job in jobs[i::threads]:
                done[i] += os.preadv(fds[job.path_index], [view[: job.length]], job.offset)
        except BaseException as exc:
            errors.append(exc)
        finally:
            view.release()

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    return sum(done), seconds


def sequential_jobs(paths: list[Path], block: int = RAW_BLOCK_BYTES, max_bytes: int = RAW_MAX_BYTES) -> list[Job]:
    jobs: list[Job] = []
    total = 0
    for i, path in enumerate(paths):
        size = os.path.getsize(path)
        for offset in range(0, size, block):
            if total >= max_bytes:
                return jobs
            jobs.append(Job(i, offset, block))
            total += min(block, size - offset)
    return jobs


def record_jobs(manifest: Manifest, max_bytes: int = RAW_MAX_BYTES) -> list[Job]:
    """One job per expert segment, widened to direct-I/O alignment, in a fixed shuffled order."""
    jobs, total = [], 0
    segments = (seg for spec in manifest.layers for entry in spec.experts for seg in entry.segments)
    for seg in segments:
        if total >= max_bytes:
            break
        start = seg.offset // DIRECT_ALIGNMENT * DIRECT_ALIGNMENT
        end = align(seg.offset + seg.length, DIRECT_ALIGNMENT)
        jobs.append(Job(seg.file, start, end - start))
        total += end - start
    # Decode reads whichever experts the router picks: not in file order.
    order = sorted(range(len(jobs)), key=lambda i: (i * 2654435761) % 2**32)
    return [jobs[i] for i in order]


def measure_reads(paths: list[Path], jobs: list[Job], threads: int = RAW_THREADS, uncached: bool = True) -> RawRead:
    """Times `jobs` over repeated passes, each with the page cache bypassed (or dropped before it)."""
    try:
        return _measure_reads(paths, jobs, threads, uncached)
    except OSError as exc:
        if not uncached:
            raise
        # Some file systems accept O_DIRECT at open and refuse the reads.
        log.info("uncached reads failed (%s); dropping the page cache instead", exc)
        return _measure_reads(paths, jobs, threads, uncached=False)


def _measure_reads(paths: list[Path], jobs: list[Job], threads: int, uncached: bool) -> RawRead:
    opened = [_open_uncached(p) for p in paths] if uncached else [None] * len(paths)
    method = opened[0][1] if all(opened) else None  # type: ignore[index]
    if method is None:
        for o in opened:
            if o:
                os.close(o[0])
        drop = drop_page_cache(paths)
        method = f"{drop}+buffered" if drop else "buffered (page cache not dropped)"
        fds = [os.open(p, os.O_RDONLY) for p in paths]
    else:
        fds = [o[0] for o in opened if o]
    buffers = _buffers(jobs, threads)
    try:
        total_bytes, total_seconds, passes = 0, 0.0, 0
        while passes < RAW_MAX_PASSES and (total_seconds < RAW_MIN_SECONDS and total_bytes < RAW_MAX_BYTES):
            if "buffered" in method and passes:
                drop_page_cache(paths)
            got, seconds = _read_jobs(fds, jobs, buffers)
            total_bytes += got
            total_seconds += seconds
            passes += 1
    finally:
        for fd in fds:
            os.close(fd)
        for buf in buffers:
            buf.close()
    block = max(j.length for j in jobs)
    return RawRead(total_bytes / total_seconds / 1e9, method, total_bytes, total_seconds, threads, block)


def run_fio(path: Path) -> tuple[float | None, str | None]:
    """fio's sequential direct read of one expert file, in GB/s, or None and why not."""
    exe = shutil.which("fio")
    if exe is None:
        return None, "fio is not on PATH: fio_read_gbps not measured (install fio to compare against it)"
    size = os.path.getsize(path)
    block = RAW_BLOCK_BYTES
    while block > DIRECT_ALIGNMENT and block > size:
        block //= 2
    cmd = [
        exe, "--name=edgemoe-bench", f"--filename={path}", "--readonly", "--rw=read", f"--bs={block}",
        "--direct=1", "--ioengine=psync", f"--size={size // block * block}", "--numjobs=1",
        f"--runtime={FIO_RUNTIME_S}", "--time_based", "--output-format=json",
    ]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60 + FIO_RUNTIME_S, check=True).stdout
        # fio may print notes before its JSON.
        read = json.loads(out[out.index("{"):])["jobs"][0]["read"]
        bw = read["bw_bytes"] if "bw_bytes" in read else read["bw"] * 1024
        return bw / 1e9, None
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, IndexError) as exc:
        return None, f"fio failed on {path} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
