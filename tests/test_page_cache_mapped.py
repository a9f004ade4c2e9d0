"""Experts mapped from the page cache on the CPU backend (node/mapped.py without a driver,
node/filemap.py): the expert files' pages mapped over the slot pools, so every layer is
resident and computes on the page cache's own pages. What is checked against the kernel's
own account of this process's memory (/proc/self/maps), and the tokens against mlx-lm."""

from __future__ import annotations

import errno
import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import PROMPT, encode, mlx_lm_tokens, run_cli

from edgemoe.coordinator.generate import generate
from edgemoe.coordinator.loader import load_streaming_model
from edgemoe.coordinator.pack import pack
from edgemoe.coordinator.tiny_models import write_tiny_model
from edgemoe.node import filemap
from edgemoe.node.dtypes import address_of
from edgemoe.node.errors import ChecksumError
from edgemoe.node.local import LocalExperts
from edgemoe.node.manifest import read_manifest, resolve_file
from edgemoe.node.mapped import MappedExperts

pytestmark = pytest.mark.skipif(
    mx.default_device() != mx.cpu or not sys.platform.startswith("linux"),
    reason="page-cache mapping is for MLX's CPU backend on Linux (CUDA maps host memory instead: test_mapped.py)")

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def aligned(tmp_path_factory) -> tuple[Path, Path]:
    """A 4-bit qwen3_moe whose every expert tensor is whole pages (as real models' are)."""
    root = tmp_path_factory.mktemp("aligned")
    src = write_tiny_model(root / "src", arch="qwen3_moe", quantized=True, hidden_size=256,
                           moe_intermediate_size=128, num_experts_per_tok=4)
    pack(src, root / "packed")
    return src, root / "packed"


def _file_mappings() -> list[tuple[int, int, int, str]]:
    """(start, end, file offset, path) of every file-backed range of this process."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            out.append((start, end, int(fields[2], 16), fields[5]))
    return out


def _backing(address: int, mappings) -> tuple[str, int] | None:
    """The file and file offset behind `address`, or None for anonymous memory."""
    for start, end, offset, path in mappings:
        if start <= address < end:
            return path, offset + address - start
    return None


def _expert_files(packed: Path) -> set[str]:
    return {str(resolve_file(packed, name).resolve()) for name in read_manifest(packed).files}


def _mapped_tensors(local: MappedExperts) -> tuple[int, int]:
    """How many expert tensors the kernel shows backed by their own bytes of their file, of all."""
    mappings = _file_mappings()
    right = total = 0
    for spec in local.manifest.layers:
        group = local._group_of[spec.layer]
        for e, entry in enumerate(spec.experts):
            (segment,) = entry.segments
            path = str(resolve_file(local.store.model_dir, local.manifest.files[segment.file]).resolve())
            for t, view in zip(spec.tensors, group.pool.views(group.slot_of[(spec.layer, e)])):
                total += 1
                right += _backing(address_of(view), mappings) == (path, segment.offset + t.offset)
    return right, total


def _no_round_trip(monkeypatch) -> None:
    def refuse(*_args):
        raise AssertionError("a mapped layer asked for slots")

    monkeypatch.setattr(LocalExperts, "start_slots", refuse)


@pytest.mark.parametrize("which", ["aligned 4-bit", "mixtral float32"])
def test_mapped_experts_compute_on_the_files_pages_with_mlx_lms_tokens(models, aligned, monkeypatch, which):
    src, packed = aligned if which == "aligned 4-bit" else (models.src("mixtral", False),
                                                           models.packed("mixtral", False))
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, max_tokens=MAX_TOKENS, models=models)
    manifest = read_manifest(packed)
    sm = load_streaming_model(packed, cache_bytes=manifest.total_expert_bytes // 8, map_experts=True)
    try:
        local = sm.local
        assert isinstance(local, MappedExperts)
        stats = local.store.stats
        experts = sum(s.num_experts for s in manifest.layers)
        assert (stats.mapped, stats.bytes_mapped, stats.reads) == (experts, manifest.total_expert_bytes, 0)
        right, total = _mapped_tensors(local)
        assert right == total > 0
        _no_round_trip(monkeypatch)
        assert generate(sm, prompt, max_tokens=MAX_TOKENS).token_ids == expected
        assert (stats.reads, stats.mapped) == (0, experts)  # nothing read or mapped again while decoding
    finally:
        sm.close()


def test_tensors_that_are_not_whole_pages_are_read_into_the_pools(models, monkeypatch):
    """The tiny 4-bit model's tensors are a fraction of a page: nothing can be mapped, every
    expert is read in, and every layer is resident all the same."""
    src, packed = models.src("qwen3_moe", True), models.packed("qwen3_moe", True)
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, max_tokens=MAX_TOKENS, models=models)
    manifest = read_manifest(packed)
    sm = load_streaming_model(packed, cache_bytes=manifest.total_expert_bytes // 8, map_experts=True)
    try:
        stats = sm.local.store.stats
        assert (stats.mapped, stats.reads) == (0, sum(s.num_experts for s in manifest.layers))
        assert not _expert_files(packed) & {m[3] for m in _file_mappings()}
        _no_round_trip(monkeypatch)
        assert generate(sm, prompt, max_tokens=MAX_TOKENS).token_ids == expected
    finally:
        sm.close()


def test_a_failed_mapping_is_read_instead(models, aligned, monkeypatch, caplog):
    src, packed = aligned
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, max_tokens=MAX_TOKENS, models=models)
    calls = []
    real = filemap.FileMappings.map

    def fifth_fails(self, view, fd, offset):
        calls.append(offset)
        if len(calls) == 5:  # as past vm.max_map_count (the real limit: the test after next)
            raise OSError(errno.ENOMEM, "mmap failed")
        real(self, view, fd, offset)

    monkeypatch.setattr(filemap.FileMappings, "map", fifth_fails)
    with caplog.at_level("WARNING"):
        sm = load_streaming_model(packed, cache_bytes=read_manifest(packed).total_expert_bytes // 8,
                                  map_experts=True)
    try:
        stats = sm.local.store.stats
        spec = read_manifest(packed).layers[0]
        assert len(calls) == 5 and stats.bytes_mapped == sum(t.nbytes for t in spec.tensors[:4])  # then no more tries
        assert sum("reading the experts instead" in r.getMessage() for r in caplog.records) == 1
        assert generate(sm, prompt, max_tokens=MAX_TOKENS).token_ids == expected
    finally:
        sm.close()


def test_pools_get_anonymous_pages_back_when_rebuilt_closed_or_a_load_fails(aligned, tmp_path):
    """MLX reuses a freed pool's memory, and an allocator may count on memory it had zeroed
    reading as zero: no page of a pool may stay a file's once the pool goes."""
    from test_bad_input import corrupt_expert

    packed = Path(shutil.copytree(aligned[1], tmp_path / "packed"))
    files = _expert_files(packed)
    budget = read_manifest(packed).total_expert_bytes // 8
    sm = load_streaming_model(packed, cache_bytes=budget, map_experts=True)
    try:
        old = [v for g in sm.local._groups for v in g.pool.byte_views().values()]
        assert all(_backing(address_of(v), _file_mappings()) is not None for v in old)
        sm.local.reset_cache(budget)
        right, total = _mapped_tensors(sm.local)
        assert right == total > 0
        new = {address_of(v) for g in sm.local._groups for v in g.pool.byte_views().values()}
        mappings = _file_mappings()
        assert all(_backing(address_of(v), mappings) is None for v in old if address_of(v) not in new)
    finally:
        sm.close()
    assert not files & {m[3] for m in _file_mappings()}

    # The first expert mapped, and one after others were
    for layer, expert in ((read_manifest(packed).layers[0].layer, 0), (read_manifest(packed).layers[-1].layer, 3)):
        damaged = Path(shutil.copytree(aligned[1], tmp_path / f"damaged-{layer}-{expert}"))
        corrupt_expert(damaged, layer, expert)
        with pytest.raises(ChecksumError, match="checksum"):
            load_streaming_model(damaged, cache_bytes=budget, map_experts=True)
        assert not _expert_files(damaged) & {m[3] for m in _file_mappings()}


def test_a_model_dropped_without_close_gives_its_pages_back(aligned):
    import gc

    sm = load_streaming_model(aligned[1], cache_bytes=read_manifest(aligned[1]).total_expert_bytes // 8,
                              map_experts=True)
    assert _expert_files(aligned[1]) & {m[3] for m in _file_mappings()}
    del sm
    gc.collect()
    assert not _expert_files(aligned[1]) & {m[3] for m in _file_mappings()}


# Run in a process of its own: it takes nearly all the mappings the kernel allows a process,
# leaving `room`, then loads with mapping asked for (through the CLI, or in Python with
# `open_mapped`'s check off, so that the maps themselves meet what the process keeps free).
_AT_THE_LIMIT = """
import ctypes, json, sys
from edgemoe.node import filemap, mapped
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
packed, room, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
for i in range(filemap.max_map_count() - filemap.mapped_count() - room):
    # alternate protections, so that neighbours never merge into one mapping
    assert libc.mmap(None, 4096, 1 if i % 2 else 0, 0x22, -1, 0) not in (None, 2**64 - 1)
if how == "cli":
    from edgemoe.coordinator.cli import main
    sys.exit(main(["generate", "--model", packed, "--prompt", "hi", "--max-tokens", "4", "--map-experts", "on",
                   "--no-hot-set", "--peers", "none"]))
from edgemoe.coordinator.generate import generate
from edgemoe.coordinator.loader import load_streaming_model
from edgemoe.node.manifest import read_manifest
mapped.MAP_COUNT_HEADROOM = -10**9
budget = read_manifest(packed).total_expert_bytes // 8
sm = load_streaming_model(packed, cache_bytes=budget, map_experts=True)
stats = sm.local.store.stats
tokens = generate(sm, [1, 2, 3], max_tokens=8).token_ids
sm.close()
left = [line for line in open("/proc/self/maps") if packed in line]
off = load_streaming_model(packed, cache_bytes=budget, map_experts=False)
print(json.dumps({"mapped": stats.bytes_mapped, "reads": stats.reads, "same": tokens == generate(off, [1, 2, 3],
                  max_tokens=8).token_ids, "left": len(left)}))
"""


def _at_the_limit(packed: Path, room: int, how: str):
    import subprocess

    return subprocess.run([sys.executable, "-c", _AT_THE_LIMIT, str(packed.resolve()), str(room), how],
                          capture_output=True, text=True, timeout=300)


def test_at_the_kernels_mapping_limit_the_cli_says_so_in_one_line(aligned):
    result = _at_the_limit(aligned[1], 600, "cli")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("edgemoe: error: --map-experts maps each expert tensor on its own")
    assert "vm.max_map_count" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_near_the_kernels_mapping_limit_the_rest_is_read_and_nothing_stays_mapped(aligned):
    manifest = read_manifest(aligned[1])
    mappings = sum(s.num_experts * len(s.tensors) for s in manifest.layers)
    # Room for half the mappings past what the process keeps free: about a quarter get made.
    result = _at_the_limit(aligned[1], mappings // 2 + filemap.FileMappings.KEEP_FREE + 100, "python")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert 0 < out["mapped"] < manifest.total_expert_bytes and out["reads"] > 0, out
    assert out["same"] and out["left"] == 0, out
    assert result.stderr.count("reading the experts instead") == 1


def test_the_cli_maps_by_default_where_ram_holds_the_experts(aligned, models):
    src, packed = aligned
    prompt_ids = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt_ids, max_tokens=MAX_TOKENS, models=models)
    runs = {}
    for mode in ("auto", "off"):
        result = run_cli("-v", "generate", "--model", str(packed), "--prompt", PROMPT, "--max-tokens", str(MAX_TOKENS),
                         "--cache-mb", "0.5", "--map-experts", mode, "--no-hot-set", "--peers", "none", "--json",
                         "--no-chat-template")
        assert result.returncode == 0, result.stderr
        runs[mode] = result
    assert "the page cache's own pages" in runs["auto"].stderr
    assert "the page cache's own pages" not in runs["off"].stderr
    assert all(json.loads(r.stdout)["token_ids"] == expected for r in runs.values())
    assert json.loads(runs["auto"].stdout)["stats"]["experts_mapped"] == "page cache"
    assert json.loads(runs["off"].stdout)["stats"]["experts_mapped"] is None


def test_auto_streams_where_the_mappings_would_pass_half_the_kernels_limit(aligned, monkeypatch, caplog):
    from edgemoe.node import mapped

    manifest = read_manifest(aligned[1])
    mappings = sum(s.num_experts * len(s.tensors) for s in manifest.layers)  # every tensor is whole pages
    budget = manifest.total_expert_bytes // 8
    monkeypatch.setattr(filemap, "mapped_count", lambda: 1000)
    for limit, chosen in ((1000 + 2 * mappings, True), (1000 + 2 * mappings - 1, False)):
        monkeypatch.setattr(filemap, "max_map_count", lambda limit=limit: limit)
        with caplog.at_level("INFO"):
            assert mapped.mapping_chosen(None, manifest, budget, None, "lfu") is chosen
    assert any(f"takes {mappings} mappings" in r.getMessage() and "vm.max_map_count" in r.getMessage()
               for r in caplog.records)
    from edgemoe.node.store import ExpertStore

    monkeypatch.setattr(filemap, "max_map_count", lambda: 1000 + mapped.MAP_COUNT_HEADROOM + mappings - 1)
    with ExpertStore(aligned[1], manifest) as store, \
            pytest.raises(mapped.MappedExpertsError, match=f"{mappings} mappings.*vm.max_map_count"):
        mapped.open_mapped(store, budget, None)


def test_every_rebuild_maps_every_expert_again(aligned, monkeypatch):
    """A cache reset (the bench does one before every run) gives the pools back and maps the new
    ones: the room counted against vm.max_map_count is counted again, not used up."""
    manifest = read_manifest(aligned[1])
    mappings = sum(s.num_experts * len(s.tensors) for s in manifest.layers)
    # Room for one build's maps at two mappings each, and a little more.
    monkeypatch.setattr(filemap, "max_map_count",
                        lambda: filemap.mapped_count() + filemap.FileMappings.KEEP_FREE + 2 * mappings + 10)
    budget = manifest.total_expert_bytes // 8
    sm = load_streaming_model(aligned[1], cache_bytes=budget, map_experts=True)
    try:
        for _ in range(3):
            before = sm.local.store.stats.bytes_mapped
            sm.local.reset_cache(budget)
            assert sm.local.store.stats.bytes_mapped - before == manifest.total_expert_bytes
    finally:
        sm.close()


def test_at_the_limit_on_accepts_every_expert_is_mapped(aligned, monkeypatch):
    """`--map-experts on` checks for one mapping per tensor; the maps then count the kernel's own
    account before they stop, so a model just within that check is mapped whole."""
    from edgemoe.node import mapped

    manifest = read_manifest(aligned[1])
    mappings = sum(s.num_experts * len(s.tensors) for s in manifest.layers)
    limit = filemap.mapped_count() + mapped.MAP_COUNT_HEADROOM + mappings + 50
    monkeypatch.setattr(filemap, "max_map_count", lambda: limit)
    sm = load_streaming_model(aligned[1], cache_bytes=manifest.total_expert_bytes // 8, map_experts=True)
    try:
        assert sm.local.store.stats.bytes_mapped == manifest.total_expert_bytes
    finally:
        sm.close()


def test_after_a_failed_mapping_a_rebuild_maps_again_and_a_closed_model_refuses(aligned, monkeypatch):
    manifest = read_manifest(aligned[1])
    real = filemap.FileMappings.map
    calls = []

    def third_fails(self, view, fd, offset):
        calls.append(offset)
        if len(calls) == 3:
            raise OSError(errno.ENOMEM, "mmap failed")
        real(self, view, fd, offset)

    monkeypatch.setattr(filemap.FileMappings, "map", third_fails)
    budget = manifest.total_expert_bytes // 8
    sm = load_streaming_model(aligned[1], cache_bytes=budget, map_experts=True)
    try:
        stats = sm.local.store.stats
        assert stats.bytes_mapped < manifest.total_expert_bytes
        monkeypatch.setattr(filemap.FileMappings, "map", real)
        before = stats.bytes_mapped
        sm.local.reset_cache(budget)
        assert stats.bytes_mapped - before == manifest.total_expert_bytes
    finally:
        sm.close()
    from edgemoe.node.mapped import MappedExpertsError

    with pytest.raises(MappedExpertsError, match="closed; load it again"):
        sm.local.resident_arrays(manifest.layers[0].layer)
