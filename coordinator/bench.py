"""`edgemoe bench`: disk, expert reads and tok/s, against DESIGN.md's SSD bound and plain mlx-lm.

One run on one packed model measures, in order:

1. the disk's raw read bandwidth over the packed expert files (our own pread
   loop with the page cache bypassed or dropped, and `fio` when installed);
2. cold decode on the streaming model: expert files dropped from the page
   cache, a fresh expert cache of the given budget; then again with the page
   cache dropped before every token, so that every miss reads the disk, as for
   a model much larger than RAM;
3. the SSD bound and how close decode and expert reads come to it;
4. plain mlx-lm on the same weights (rebuilt in RAM from the packed model);
5. the warm case the design targets: a cache of 1/8 of the expert bytes, page
   cache warm;
6. optionally, the same cold decode on an --in-place pack of the source.

Decode figures count the tokens after the first one, between the first and the
last token's arrival: prefill and first-token costs stay out of them, and
mlx-lm is timed the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

from edgemoe.node.compute import record_to_arrays
from edgemoe.node.errors import EdgemoeError
from edgemoe.node.manifest import DENSE_NAME, Manifest, align, read_manifest, resolve_file
from edgemoe.node.store import ExpertStore, PendingReads

from edgemoe.node.architecture import build_model, routed_experts_per_token
from .generate import build_prompt, generate
from .streaming import StreamingModel, load_streaming_model

log = logging.getLogger(__name__)

MiB = 2**20
RAW_BLOCK_BYTES = 8 * MiB
RAW_THREADS = 4
# Enough passes over small files to time them; a cap so a 500 GB model is sampled, not read.
RAW_MIN_SECONDS = 1.0
RAW_MAX_BYTES = 2 * 2**30
RAW_MAX_PASSES = 64
DIRECT_ALIGNMENT = 4096
FIO_RUNTIME_S = 2
MLX_LM_RAM_FRACTION = 0.5
WARMUP_TOKENS = 4
# Each timed decode runs this often and the fastest counts: on a small shared
# machine (the 2-core dev VM) tok/s moves by 20% from one run to the next.
REPEATS = 3
# Not the bench prompt, so the warm case's expert cache is filled by other text.
WARMUP_PROMPT = "The coordinator schedules layers, the nodes hold weights, and tokens flow."


# --- page cache ---------------------------------------------------------------


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
    buf = bytearray(RAW_BLOCK_BYTES)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def resident_fraction(paths: list[Path]) -> float | None:
    """Fraction of the files' pages in the page cache (mincore), or None if it cannot tell."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mincore = libc.mincore
        mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        total = resident = 0
        for path in paths:
            size = os.path.getsize(path)
            if size == 0:
                continue
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
            resident += int((np.frombuffer(vec, dtype=np.uint8) & 1).sum())
            total += pages
        return resident / total if total else None
    except (OSError, AttributeError, ValueError, TypeError):
        return None


# --- raw disk bandwidth ---------------------------------------------------------


@dataclass
class RawRead:
    gbps: float
    method: str
    bytes: int
    seconds: float
    threads: int
    block_bytes: int


@dataclass
class _Job:
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


def _buffers(jobs: list[_Job], threads: int) -> list[mmap.mmap]:
    """Page-aligned (mmap) buffers, one a thread, touched now so page faults stay out of the timing."""
    size = align(max(j.length for j in jobs), mmap.PAGESIZE)
    buffers = [mmap.mmap(-1, size) for _ in range(threads)]
    for buf in buffers:
        buf.write(bytes(size))
    return buffers


def _read_jobs(fds: list[int], jobs: list[_Job], buffers: list[mmap.mmap]) -> tuple[int, float]:
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


def _sequential_jobs(paths: list[Path], block: int, max_bytes: int) -> list[_Job]:
    jobs, total = [], 0
    for i, path in enumerate(paths):
        size = os.path.getsize(path)
        for offset in range(0, size, block):
            if total >= max_bytes:
                return jobs
            jobs.append(_Job(i, offset, block))
            total += min(block, size - offset)
    return jobs


def _record_jobs(manifest: Manifest, max_bytes: int) -> list[_Job]:
    """One job per expert segment, widened to direct-I/O alignment, in a fixed shuffled order."""
    jobs, total = [], 0
    segments = (seg for spec in manifest.layers for entry in spec.experts for seg in entry.segments)
    for seg in segments:
        if total >= max_bytes:
            break
        start = seg.offset // DIRECT_ALIGNMENT * DIRECT_ALIGNMENT
        end = align(seg.offset + seg.length, DIRECT_ALIGNMENT)
        jobs.append(_Job(seg.file, start, end - start))
        total += end - start
    # Decode reads whichever experts the router picks: not in file order.
    order = sorted(range(len(jobs)), key=lambda i: (i * 2654435761) % 2**32)
    return [jobs[i] for i in order]


def measure_reads(paths: list[Path], jobs: list[_Job], threads: int, uncached: bool = True) -> RawRead:
    """Times `jobs` over repeated passes, each with the page cache bypassed (or dropped before it)."""
    try:
        return _measure_reads(paths, jobs, threads, uncached)
    except OSError as exc:
        if not uncached:
            raise
        # Some file systems accept O_DIRECT at open and refuse the reads.
        log.info("uncached reads failed (%s); dropping the page cache instead", exc)
        return _measure_reads(paths, jobs, threads, uncached=False)


def _measure_reads(paths: list[Path], jobs: list[_Job], threads: int, uncached: bool) -> RawRead:
    opened = [_open_uncached(p) for p in paths] if uncached else [None] * len(paths)
    method = opened[0][1] if all(opened) else None
    if method is None:
        for o in opened:
            if o:
                os.close(o[0])
        drop = drop_page_cache(paths)
        method = f"{drop}+buffered" if drop else "buffered (page cache not dropped)"
        fds = [os.open(p, os.O_RDONLY) for p in paths]
    else:
        fds = [o[0] for o in opened]
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


# --- decode on the streaming model ----------------------------------------------


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
        store.start_reads = self._tracked

    def _tracked(self, layer: int, targets: dict[int, list[memoryview]]) -> PendingReads:
        pending = self._start_reads(layer, targets)
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


@dataclass
class Mark:
    """Counters at one instant: the bench snapshots them at every token."""

    t: float
    bytes_read: int = 0
    read_seconds: float = 0.0
    reads: int = 0
    verified: int = 0
    hits: int = 0
    misses: int = 0
    first_reads: int = 0
    first_read_bytes: int = 0
    disk_bytes: int | None = None


@dataclass
class DecodeRun:
    token_ids: list[int]
    prompt_tokens: int
    decode_tokens: int
    tokens_per_s: float | None
    prompt_tokens_per_s: float
    cache_hit_rate: float | None
    ssd_bytes_read: int
    prefill_ssd_bytes_read: int
    ssd_read_seconds: float
    ssd_bytes_per_token: float | None
    expert_read_gbps: float | None
    expert_reads: int
    verified_reads: int
    first_reads: int
    first_read_bytes: int
    disk_bytes_read: int | None
    page_cache_resident: float | None = None


def mark(sm: StreamingModel | None = None, first: FirstReads | None = None) -> Mark:
    t = time.perf_counter()
    if sm is None:
        return Mark(t)
    store, cache = sm.local.store.stats, sm.local.cache_stats
    m = Mark(t, store.bytes_read, store.read_seconds, store.reads, store.verified, cache.hits, cache.misses,
             disk_bytes=disk_read_bytes())
    if first is not None:
        m.first_reads, m.first_read_bytes = first.reads, first.bytes
    return m


def decode_figures(start: Mark, marks: list[Mark], token_ids: list[int], prompt_tokens: int) -> DecodeRun:
    """Prefill is everything up to the first token; decode is the first to the last token."""
    first, last = marks[0], marks[-1]
    decode_tokens = len(marks) - 1
    seconds = last.t - first.t
    read_bytes = last.bytes_read - first.bytes_read
    read_seconds = last.read_seconds - first.read_seconds
    lookups = (last.hits - first.hits) + (last.misses - first.misses)
    return DecodeRun(
        token_ids=token_ids,
        prompt_tokens=prompt_tokens,
        decode_tokens=decode_tokens,
        tokens_per_s=decode_tokens / seconds if decode_tokens and seconds > 0 else None,
        prompt_tokens_per_s=prompt_tokens / (first.t - start.t),
        cache_hit_rate=(last.hits - first.hits) / lookups if lookups else None,
        ssd_bytes_read=read_bytes,
        prefill_ssd_bytes_read=first.bytes_read - start.bytes_read,
        ssd_read_seconds=read_seconds,
        ssd_bytes_per_token=read_bytes / decode_tokens if decode_tokens else None,
        expert_read_gbps=read_bytes / read_seconds / 1e9 if read_seconds > 0 else None,
        expert_reads=last.reads - first.reads,
        verified_reads=last.verified - first.verified,
        first_reads=last.first_reads - first.first_reads,
        first_read_bytes=last.first_read_bytes - first.first_read_bytes,
        disk_bytes_read=last.disk_bytes - first.disk_bytes if None not in (first.disk_bytes, last.disk_bytes) else None,
    )


@contextlib.contextmanager
def ignore_eos(tokenizer: Any) -> Iterator[None]:
    """Every run decodes exactly the requested tokens, so runs compare token for token."""
    saved = set(tokenizer.eos_token_ids)
    tokenizer.eos_token_ids = []
    try:
        yield
    finally:
        tokenizer.eos_token_ids = saved


def fresh_cache(sm: StreamingModel, budget_bytes: int) -> None:
    """An empty expert cache, so one loaded model serves runs of several budgets."""
    sm.local.reset_cache(budget_bytes)


def timed_generate(
    sm: StreamingModel,
    prompt_tokens: list[int],
    tokens: int,
    first: FirstReads | None = None,
    drop_every_token: list[Path] | None = None,
) -> DecodeRun:
    """Generates `tokens` tokens, snapshotting the counters at each; with `drop_every_token`,
    evicts those files from the page cache after each token, off the clock."""
    marks: list[Mark] = []
    excluded = 0.0

    def on_token(_: int) -> None:
        nonlocal excluded
        m = mark(sm, first)
        m.t -= excluded
        marks.append(m)
        if drop_every_token:
            t = time.perf_counter()
            drop_page_cache(drop_every_token)
            if first is not None:
                first.forget()
            excluded += time.perf_counter() - t

    with ignore_eos(sm.tokenizer):
        start = mark(sm, first)
        result = generate(sm, prompt_tokens, max_tokens=tokens, on_token=on_token)
    return decode_figures(start, marks, result.token_ids, len(prompt_tokens))


def cold_run(
    sm: StreamingModel, paths: list[Path], prompt_tokens: list[int], tokens: int, budget: int, every_token: bool = False
) -> DecodeRun:
    fresh_cache(sm, budget)
    drop_page_cache(paths)
    resident = resident_fraction(paths)
    first = FirstReads(sm.local.store)
    try:
        run = timed_generate(sm, prompt_tokens, tokens, first, paths if every_token else None)
    finally:
        first.close()
    run.page_cache_resident = resident
    return run


T = TypeVar("T")


def best_of(run: Callable[[], T], repeats: int = REPEATS) -> T:
    """The fastest of `repeats` runs (runs are deterministic but for their timing)."""
    runs = [run() for _ in range(repeats)]
    return max(runs, key=lambda r: r.tokens_per_s or 0.0)


def expert_paths(model_dir: Path, manifest: Manifest) -> list[Path]:
    return [resolve_file(model_dir, name) for name in manifest.files]


# --- plain mlx-lm -----------------------------------------------------------------


def build_reference_model(model_dir: Path, config: dict, manifest: Manifest) -> nn.Module:
    """mlx-lm's model with every expert in RAM, rebuilt from the packed files."""
    model = build_model(config)
    quantization = dict(manifest.dense_quantization)
    for spec in manifest.layers:
        for child, params in spec.quantization.items():
            quantization[f"{spec.module_path}.{child}"] = params
    nn.quantize(model, class_predicate=lambda path, _: quantization.get(path, False))
    weights = mx.load(str(Path(model_dir) / DENSE_NAME))
    with ExpertStore(model_dir, manifest) as store:
        for spec in manifest.layers:
            experts = [record_to_arrays(spec, store.read(spec.layer, e)) for e in range(spec.num_experts)]
            for t in spec.tensors:
                stacked = mx.stack([arrays[t.name] for arrays in experts])
                mx.eval(stacked)
                weights[f"{spec.module_path}.{t.name}"] = stacked
            del experts
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    mx.eval(model.parameters())
    return model


@dataclass
class MlxLmRun:
    token_ids: list[int]
    tokens_per_s: float | None
    prompt_tokens_per_s: float


def time_mlx_lm(model: nn.Module, tokenizer: Any, prompt_tokens: list[int], tokens: int) -> MlxLmRun:
    marks: list[Mark] = []
    ids: list[int] = []
    with ignore_eos(tokenizer):
        start = mark()
        for response in stream_generate(
            model, tokenizer, mx.array(prompt_tokens), max_tokens=tokens, sampler=make_sampler(temp=0.0)
        ):
            ids.append(response.token)
            marks.append(mark())
    run = decode_figures(start, marks, ids, len(prompt_tokens))
    return MlxLmRun(ids, run.tokens_per_s, run.prompt_tokens_per_s)


def ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# --- the bench --------------------------------------------------------------------


@dataclass
class _Notes:
    items: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        log.info("note: %s", text)
        self.items.append(text)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _run_keys(prefix: str, run: DecodeRun | None) -> dict[str, Any]:
    names = ("tokens_per_s", "prompt_tokens_per_s", "cache_hit_rate", "ssd_bytes_read", "ssd_bytes_per_token",
             "expert_read_gbps", "decode_tokens")
    return {f"{prefix}{n}": (getattr(run, n) if run else None) for n in names}


def run_bench(
    model_dir: Path,
    cache_bytes: int | None = None,
    tokens: int = 64,
    prompt: str = "Write a short story about a robot who learns to paint.",
    experts_per_token: int | None = None,
    compare_mlx_lm: bool = True,
    in_place_source: Path | None = None,
    io_mode: str = "auto",
    prefetch: bool = False,
) -> dict[str, Any]:
    if tokens < 2:
        raise EdgemoeError(f"--tokens {tokens} must be at least 2: decode is timed from the first token to the last")
    began = time.perf_counter()
    model_dir = Path(model_dir)
    notes = _Notes()
    manifest = read_manifest(model_dir)
    paths = expert_paths(model_dir, manifest)
    report: dict[str, Any] = {"model": str(model_dir), "model_type": manifest.model_type, "in_place_pack": manifest.in_place}

    # Loaded first so a bad budget or model fails before the disk is timed.
    sm = load_streaming_model(model_dir, cache_bytes=cache_bytes, experts_per_token=experts_per_token, io_mode=io_mode,
                              prefetch=prefetch)
    try:
        report.update(_disk_figures(manifest, paths, notes))
        budget = sm.local.budget_bytes
        prompt_tokens = build_prompt(sm.tokenizer, prompt)
        if not prompt_tokens:
            raise EdgemoeError(f"--prompt {prompt!r} encodes to no tokens; pass some text")
        report.update(
            layers=len(manifest.layers),
            experts_per_token=routed_experts_per_token(sm.config),
            expert_record_bytes=manifest.expert_bytes,
            total_expert_bytes=manifest.total_expert_bytes,
            dense_bytes=sm.dense_bytes,
            cache_budget_bytes=budget,
            direct_io=sm.local.store.direct,
            prefetch=prefetch,
            tokens=tokens,
            prompt_tokens=len(prompt_tokens),
            repeats=REPEATS,
        )
        log.info("warming up MLX")
        with ignore_eos(sm.tokenizer):
            generate(sm, build_prompt(sm.tokenizer, WARMUP_PROMPT), max_tokens=WARMUP_TOKENS)

        log.info("cold decode, cache budget %.1f MiB", budget / MiB)
        cold = best_of(lambda: cold_run(sm, paths, prompt_tokens, tokens, budget))
        report.update(_cold_figures(cold, report, manifest, notes))
        report.update(_every_token_cold_figures(sm, paths, prompt_tokens, tokens, budget, report, notes))

        mlx_lm = _mlx_lm_figures(model_dir, sm, manifest, prompt_tokens, tokens, compare_mlx_lm, notes)
        report.update(
            mlx_lm_tokens_per_s=mlx_lm.tokens_per_s if mlx_lm else None,
            mlx_lm_prompt_tokens_per_s=mlx_lm.prompt_tokens_per_s if mlx_lm else None,
            relative_to_mlx_lm=_ratio(cold.tokens_per_s, mlx_lm.tokens_per_s) if mlx_lm else None,
            same_tokens_as_mlx_lm=(cold.token_ids == mlx_lm.token_ids) if mlx_lm else None,
        )

        warm = _warm_eighth_run(sm, paths, prompt_tokens, tokens)
        report["warm_eighth_cache_budget_bytes"] = sm.local.budget_bytes
        report.update(_run_keys("warm_eighth_", warm))
        report["warm_eighth_relative_to_mlx_lm"] = _ratio(warm.tokens_per_s, mlx_lm.tokens_per_s) if mlx_lm else None
        report["warm_eighth_same_tokens"] = warm.token_ids == cold.token_ids
    finally:
        sm.close()

    report.update(_in_place_figures(in_place_source, cold, budget, prompt_tokens, tokens, experts_per_token, manifest, notes,
                                     {"io_mode": io_mode, "prefetch": prefetch}))
    report["notes"] = notes.items
    report["bench_seconds"] = time.perf_counter() - began
    return report


def _disk_figures(manifest: Manifest, paths: list[Path], notes: _Notes) -> dict[str, Any]:
    log.info("raw read over %d expert files", len(paths))
    seq = measure_reads(paths, _sequential_jobs(paths, RAW_BLOCK_BYTES, RAW_MAX_BYTES), RAW_THREADS)
    buffered = measure_reads(paths, _sequential_jobs(paths, RAW_BLOCK_BYTES, RAW_MAX_BYTES), RAW_THREADS, uncached=False)
    records = measure_reads(paths, _record_jobs(manifest, RAW_MAX_BYTES), RAW_THREADS)
    if "not dropped" in seq.method:
        notes.add("the page cache could be neither bypassed nor dropped: raw_read_gbps may include cached reads")
    largest = max(paths, key=os.path.getsize)
    fio, why = run_fio(largest)
    if why:
        notes.add(why)
    drop = drop_page_cache(paths)
    if drop is None:
        notes.add("this OS has no posix_fadvise: the cold runs start with whatever the page cache holds "
                  "(run `sudo purge` first on macOS)")
    return {
        "raw_read_gbps": seq.gbps,
        "raw_read_method": seq.method,
        "raw_read_bytes": seq.bytes,
        "raw_read_threads": seq.threads,
        "raw_read_block_bytes": seq.block_bytes,
        "raw_read_buffered_gbps": buffered.gbps,
        "raw_read_buffered_method": buffered.method,
        "raw_record_read_gbps": records.gbps,
        "raw_record_read_method": records.method,
        "raw_record_read_block_bytes": records.block_bytes,
        "fio_read_gbps": fio,
        "fio_file": str(largest) if fio is not None else None,
        "page_cache_drop_method": drop,
    }


def _cold_figures(cold: DecodeRun, report: dict, manifest: Manifest, notes: _Notes) -> dict[str, Any]:
    raw = report["raw_read_gbps"]
    bound = raw * 1e9 / cold.ssd_bytes_per_token if cold.ssd_bytes_per_token else None
    if bound is None:
        notes.add("decode read nothing from SSD (every expert was cached): the SSD bound does not apply")
    k = report["experts_per_token"]
    design = (
        sum(k * spec.record_bytes for spec in manifest.layers) * (1 - cold.cache_hit_rate)
        if k and cold.cache_hit_rate is not None
        else None
    )
    if cold.verified_reads:
        notes.add(f"{cold.verified_reads} of {cold.expert_reads} decode reads were first reads, "
                  "checksummed inside the read: expert_read_gbps includes that hashing")
    return {
        **_run_keys("", cold),
        "prefill_ssd_bytes_read": cold.prefill_ssd_bytes_read,
        "ssd_read_seconds": cold.ssd_read_seconds,
        "expert_reads": cold.expert_reads,
        "decode_verified_reads": cold.verified_reads,
        "decode_first_reads": cold.first_reads,
        "decode_first_read_bytes": cold.first_read_bytes,
        "decode_disk_bytes_read": cold.disk_bytes_read,
        "page_cache_resident_at_start": cold.page_cache_resident,
        "design_ssd_bytes_per_token": design,
        "ssd_bound_tokens_per_s": bound,
        "read_efficiency": _ratio(cold.expert_read_gbps, raw),
        "record_read_efficiency": _ratio(cold.expert_read_gbps, report["raw_record_read_gbps"]),
        "bound_efficiency": _ratio(cold.tokens_per_s, bound),
    }


def _every_token_cold_figures(sm: StreamingModel, paths: list[Path], prompt_tokens: list[int], tokens: int,
                              budget: int, report: dict, notes: _Notes) -> dict[str, Any]:
    """Cold decode with the page cache dropped before every token: each miss reads the disk,
    as for a model much larger than RAM, where a record read once is not in RAM the next time."""
    keys = ("tokens_per_s", "expert_read_gbps", "ssd_bytes_per_token", "disk_bytes_per_token", "first_read_fraction",
            "read_efficiency", "ssd_bound_tokens_per_s", "bound_efficiency")
    out = {f"every_token_cold_{k}": None for k in keys}
    if report["page_cache_drop_method"] is None:
        notes.add("every-token cold run skipped: the page cache cannot be dropped here")
        return out
    log.info("cold decode, page cache dropped before every token")
    run = best_of(lambda: cold_run(sm, paths, prompt_tokens, tokens, budget, every_token=True))
    bound = report["raw_read_gbps"] * 1e9 / run.ssd_bytes_per_token if run.ssd_bytes_per_token else None
    out.update(
        every_token_cold_tokens_per_s=run.tokens_per_s,
        every_token_cold_expert_read_gbps=run.expert_read_gbps,
        every_token_cold_ssd_bytes_per_token=run.ssd_bytes_per_token,
        every_token_cold_disk_bytes_per_token=_ratio(run.disk_bytes_read, run.decode_tokens),
        every_token_cold_first_read_fraction=_ratio(run.first_reads, run.expert_reads),
        every_token_cold_read_efficiency=_ratio(run.expert_read_gbps, report["raw_read_gbps"]),
        every_token_cold_ssd_bound_tokens_per_s=bound,
        every_token_cold_bound_efficiency=_ratio(run.tokens_per_s, bound),
    )
    return out


def _mlx_lm_figures(model_dir: Path, sm: StreamingModel, manifest: Manifest, prompt_tokens: list[int], tokens: int,
                    enabled: bool, notes: _Notes) -> MlxLmRun | None:
    if not enabled:
        notes.add("plain mlx-lm comparison skipped (--no-mlx-lm)")
        return None
    need = manifest.total_expert_bytes + sm.dense_bytes
    if need > MLX_LM_RAM_FRACTION * ram_bytes():
        notes.add(f"plain mlx-lm skipped: the full model ({need / 2**30:.1f} GiB) is over "
                  f"{MLX_LM_RAM_FRACTION:.0%} of RAM ({ram_bytes() / 2**30:.1f} GiB)")
        return None
    log.info("rebuilding the full model for plain mlx-lm")
    model = build_reference_model(model_dir, sm.config, manifest)
    try:
        time_mlx_lm(model, sm.tokenizer, build_prompt(sm.tokenizer, WARMUP_PROMPT), WARMUP_TOKENS)
        log.info("plain mlx-lm decode")
        return best_of(lambda: time_mlx_lm(model, sm.tokenizer, prompt_tokens, tokens))
    finally:
        del model
        mx.clear_cache()


def _warm_eighth_run(sm: StreamingModel, paths: list[Path], prompt_tokens: list[int], tokens: int) -> DecodeRun:
    """1/8 of the expert bytes cached, page cache warm: the case the design targets."""
    budget = max(sm.manifest.expert_bytes, sm.manifest.total_expert_bytes // 8)
    log.info("warm decode, cache budget 1/8 of the experts (%.1f MiB)", budget / MiB)
    warm_page_cache(paths)
    warmup_tokens = build_prompt(sm.tokenizer, WARMUP_PROMPT)

    def once() -> DecodeRun:
        # Filled by other text each time, so the cache never holds exactly what the timed text needs.
        fresh_cache(sm, budget)
        with ignore_eos(sm.tokenizer):
            generate(sm, warmup_tokens, max_tokens=tokens)
        return timed_generate(sm, prompt_tokens, tokens)

    direct = sm.local.store.direct
    sm.local.store.set_io_mode("buffered")  # a warm page cache is what this case is about
    try:
        run = best_of(once)
    finally:
        sm.local.store.set_io_mode("direct" if direct else "buffered")
    run.page_cache_resident = resident_fraction(paths)
    return run


def _in_place_figures(src: Path | None, cold: DecodeRun, budget: int, prompt_tokens: list[int], tokens: int,
                      experts_per_token: int | None, manifest: Manifest, notes: _Notes,
                      load_options: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "in_place_tokens_per_s": None,
        "in_place_expert_read_gbps": None,
        "in_place_cache_hit_rate": None,
        "in_place_ssd_bytes_per_token": None,
        "in_place_same_tokens": None,
        "repack_tokens_per_s_gain": None,
        "repack_read_gbps_gain": None,
    }
    if src is None:
        return out
    from .pack import pack

    with tempfile.TemporaryDirectory(prefix="edgemoe-bench-") as tmp:
        dst = Path(tmp) / "in-place"
        try:
            log.info("packing %s in place", src)
            pack(Path(src), dst, in_place=True)
            sm = load_streaming_model(dst, cache_bytes=budget, experts_per_token=experts_per_token, **load_options)
        except EdgemoeError as exc:
            notes.add(f"in-place bench skipped: {exc}")
            return out
        try:
            if sm.manifest.fingerprint != manifest.fingerprint:
                notes.add(f"{src} is not the source of the benched model: in-place figures are of other weights")
            in_place_paths = expert_paths(dst, sm.manifest)
            run = best_of(lambda: cold_run(sm, in_place_paths, prompt_tokens, tokens, budget))
        finally:
            sm.close()
    out.update(
        in_place_tokens_per_s=run.tokens_per_s,
        in_place_expert_read_gbps=run.expert_read_gbps,
        in_place_cache_hit_rate=run.cache_hit_rate,
        in_place_ssd_bytes_per_token=run.ssd_bytes_per_token,
        in_place_same_tokens=run.token_ids == cold.token_ids,
        repack_tokens_per_s_gain=_ratio(cold.tokens_per_s, run.tokens_per_s),
        repack_read_gbps_gain=_ratio(cold.expert_read_gbps, run.expert_read_gbps),
    )
    return out


# --- text report --------------------------------------------------------------------


def _f(value: Any, fmt: str = "{:.2f}", unit: str = "") -> str:
    if value is None:
        return "n/a"
    return fmt.format(value) + unit


def _mib(value: float | None) -> str:
    return _f(None if value is None else value / MiB, "{:.2f}", " MiB")


def _pct(value: float | None) -> str:
    return _f(None if value is None else 100 * value, "{:.1f}", "%")


def format_report(report: dict[str, Any]) -> str:
    r = report
    lines = [
        f"edgemoe bench: {r['model']} ({r['model_type']}, {r['layers']} MoE layers, K={r['experts_per_token']}, "
        f"experts {_mib(r['total_expert_bytes'])}, dense {_mib(r['dense_bytes'])})",
        "",
        "disk",
        f"  raw sequential read   {_f(r['raw_read_gbps'], unit=' GB/s')}  ({r['raw_read_method']}, "
        f"{r['raw_read_threads']} threads x {_mib(r['raw_read_block_bytes'])} blocks, {_mib(r['raw_read_bytes'])} read)",
        f"  buffered, cache cold  {_f(r['raw_read_buffered_gbps'], unit=' GB/s')}  ({r['raw_read_buffered_method']})",
        f"  record-sized random   {_f(r['raw_record_read_gbps'], unit=' GB/s')}  "
        f"({r['raw_record_read_method']}, {_f(r['raw_record_read_block_bytes'] / 1024, '{:.0f}', ' KiB')} reads)",
        f"  fio --direct=1        {_f(r['fio_read_gbps'], unit=' GB/s')}",
        "",
        f"cold decode ({'direct' if r['direct_io'] else 'buffered'} I/O{', prefetch' if r['prefetch'] else ''}, cache {_mib(r['cache_budget_bytes'])}, page cache dropped: {r['page_cache_drop_method'] or 'no'}, "
        f"resident at start {_pct(r['page_cache_resident_at_start'])})",
        f"  decode                {_f(r['tokens_per_s'], unit=' tok/s')}  ({r['decode_tokens']} tokens; "
        f"prompt {r['prompt_tokens']} tokens at {_f(r['prompt_tokens_per_s'], '{:.1f}', ' tok/s')})",
        f"  cache hit rate        {_pct(r['cache_hit_rate'])}",
        f"  SSD reads             {_mib(r['ssd_bytes_read'])} decode, {_mib(r['ssd_bytes_per_token'])}/token "
        f"(DESIGN formula {_mib(r['design_ssd_bytes_per_token'])}/token); prefill {_mib(r['prefill_ssd_bytes_read'])}",
        f"  first reads           {r['decode_first_reads']} of {r['expert_reads']} decode reads "
        f"({_mib(r['decode_first_read_bytes'])}) were of records not read since the drop; "
        "re-reads are served by the page cache",
        f"  from the disk         {_mib(r['decode_disk_bytes_read'])} in decode (kernel's count, readahead included)",
        f"  expert reads          {_f(r['expert_read_gbps'], unit=' GB/s')}  "
        f"= {_pct(r['read_efficiency'])} of raw, {_pct(r['record_read_efficiency'])} of record-sized raw",
        f"  SSD bound             {_f(r['ssd_bound_tokens_per_s'], '{:.1f}', ' tok/s')}  "
        f"-> decode at {_pct(r['bound_efficiency'])} of it",
        "",
        "cold decode, page cache dropped before every token (each miss reads the disk)",
        f"  decode                {_f(r['every_token_cold_tokens_per_s'], unit=' tok/s')}  "
        f"({_mib(r['every_token_cold_ssd_bytes_per_token'])}/token read, "
        f"{_mib(r['every_token_cold_disk_bytes_per_token'])}/token from the disk)",
        f"  expert reads          {_f(r['every_token_cold_expert_read_gbps'], unit=' GB/s')}  "
        f"= {_pct(r['every_token_cold_read_efficiency'])} of raw",
        f"  SSD bound             {_f(r['every_token_cold_ssd_bound_tokens_per_s'], '{:.1f}', ' tok/s')}  "
        f"-> decode at {_pct(r['every_token_cold_bound_efficiency'])} of it",
        "",
        "plain mlx-lm (all experts in RAM)",
        f"  decode                {_f(r['mlx_lm_tokens_per_s'], unit=' tok/s')}  "
        f"-> streaming cold at {_pct(r['relative_to_mlx_lm'])}; same tokens: {_f(r['same_tokens_as_mlx_lm'], '{}')}",
        "",
        f"warm, 1/8 of the experts cached ({_mib(r['warm_eighth_cache_budget_bytes'])}), page cache warm",
        f"  decode                {_f(r['warm_eighth_tokens_per_s'], unit=' tok/s')}  "
        f"-> {_pct(r['warm_eighth_relative_to_mlx_lm'])} of mlx-lm (target >= 90%); "
        f"hit rate {_pct(r['warm_eighth_cache_hit_rate'])}, {_mib(r['warm_eighth_ssd_bytes_per_token'])}/token "
        f"at {_f(r['warm_eighth_expert_read_gbps'], unit=' GB/s')}",
    ]
    if r.get("in_place_tokens_per_s") is not None:
        lines += [
            "",
            "in-place pack (experts read from the source safetensors)",
            f"  decode                {_f(r['in_place_tokens_per_s'], unit=' tok/s')}  "
            f"(expert reads {_f(r['in_place_expert_read_gbps'], unit=' GB/s')}, same tokens: {r['in_place_same_tokens']})",
            f"  full repack gains     x{_f(r['repack_tokens_per_s_gain'])} tok/s, "
            f"x{_f(r['repack_read_gbps_gain'])} expert read GB/s",
        ]
    if r["notes"]:
        lines += ["", "notes"] + [f"  - {n}" for n in r["notes"]]
    lines.append(f"\n(bench took {r['bench_seconds']:.1f} s)")
    return "\n".join(lines)
