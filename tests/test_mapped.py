"""Host-mapped experts (node/mapped.py): every expert in the pools, the most-routed on the
GPU and the rest in host memory, mapped for it. Here a host fake stands in for the CUDA
driver and records where each range was placed; the real one runs in `.ci/gpu-check`
(`edgemoe bench` on CUDA has a mapped case, and .ci/gpu-probe-mapped.py checks its bits)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import PROMPT, encode, mlx_lm_tokens
from test_staging import HostDma

from edgemoe.coordinator import loader
from edgemoe.coordinator.generate import generate
from edgemoe.coordinator.loader import load_streaming_model
from edgemoe.node import mapped
from edgemoe.node.credentials import ClusterCredentials, format_token, new_secret
from edgemoe.node.dtypes import address_of
from edgemoe.node.local import LocalExperts
from edgemoe.node.manifest import read_manifest
from edgemoe.node.mapped import MappedExperts, MappedExpertsError, open_mapped
from edgemoe.node.store import ExpertStore

MAX_TOKENS = 12
ON_CUDA = mx.default_device() == mx.gpu and mx.cuda.is_available()


class PlacingDma(HostDma):
    def __init__(self, can_place: bool = True):
        super().__init__()
        self.can_place = can_place
        self.placed: list[tuple[int, int, bool]] = []  # (address, bytes, whether on the GPU), in order

    def place(self, address: int, nbytes: int, on_gpu: bool) -> None:
        self.placed.append((address, nbytes, on_gpu))

    def on_gpu(self, view: memoryview) -> bool | None:
        """Where the last placement covering the whole of `view` put it (None: left to MLX)."""
        start = address_of(view)
        for address, nbytes, on_gpu in reversed(self.placed):
            if address <= start and start + len(view) <= address + nbytes:
                return on_gpu
        raise AssertionError("never placed")


def _load(monkeypatch, packed, budget):
    dma = PlacingDma()
    monkeypatch.setattr(loader, "open_dma", lambda: dma)
    sm = load_streaming_model(packed, cache_bytes=budget, map_experts=True)
    assert isinstance(sm.local, MappedExperts)
    return sm, dma


def _placed_on_gpu(local: MappedExperts, dma: PlacingDma) -> set[tuple[int, int]]:
    """The experts whose every tensor range the fake last placed on the GPU."""
    placed = set()
    for spec in local.manifest.layers:
        group = local._group_of[spec.layer]
        for e in range(spec.num_experts):
            views = group.pool.views(group.slot_of[(spec.layer, e)])
            if all(dma.on_gpu(v) for v in views):
                placed.add((spec.layer, e))
    return placed


@pytest.mark.parametrize("arch,quantized", [("qwen3_moe", True), ("mixtral", False)])
def test_mapped_experts_keep_mlx_lms_tokens_with_no_reads_and_no_round_trip(models, monkeypatch, arch, quantized):
    src, packed = models.src(arch, quantized), models.packed(arch, quantized)
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, max_tokens=MAX_TOKENS, models=models)
    sm, _ = _load(monkeypatch, packed, read_manifest(packed).total_expert_bytes // 4)
    looked_up = []
    original = LocalExperts.start_slots
    monkeypatch.setattr(LocalExperts, "start_slots", lambda self, layer, experts: looked_up.append(layer)
                        or original(self, layer, experts))
    try:
        read_before = sm.local.store.stats.bytes_read
        assert generate(sm, prompt, max_tokens=MAX_TOKENS).token_ids == expected
        assert looked_up == [] and sm.local.store.stats.bytes_read == read_before
        assert all(sm.local.resident_arrays(spec.layer) is not None for spec in sm.manifest.layers)
    finally:
        sm.close()


def test_the_most_routed_experts_are_placed_on_the_gpu_within_the_budget(models, monkeypatch):
    packed = models.packed("qwen3_moe", True)
    manifest = read_manifest(packed)
    budget = manifest.total_expert_bytes // 4
    sm, dma = _load(monkeypatch, packed, budget)
    try:
        local = sm.local
        # Every byte of every pool was placed in host memory: the fill is no routing, so it
        # counts nothing (no misses either) and puts nothing on the GPU.
        assert _placed_on_gpu(local, dma) == local.on_gpu == set()
        assert local.routing_counts() == {} and local.cache_stats.misses == 0 and local.stats.experts_from_ssd == 0
        first = set(local.on_gpu)
        # A text that routes to some experts again and again: those go to the GPU.
        for _ in range(3):
            generate(sm, encode(models, models.src("qwen3_moe", True), PROMPT), max_tokens=MAX_TOKENS)
        counts = local.routing_counts()
        ranked = sorted(counts, key=lambda key: (-counts[key], key))
        wanted = set(ranked[: budget // manifest.expert_bytes])
        assert local.on_gpu == wanted and _placed_on_gpu(local, dma) == wanted
        assert wanted and wanted != first  # the placement moved with the routing
        assert len(wanted) * manifest.expert_bytes <= budget < (len(wanted) + 1) * manifest.expert_bytes
        # The rest is back in host memory, range by range.
        others = {(s.layer, e) for s in manifest.layers for e in range(s.num_experts)} - wanted
        for key in others:
            group = local._group_of[key[0]]
            assert all(dma.on_gpu(v) is False for v in group.pool.views(group.slot_of[key]))
    finally:
        sm.close()


def test_mapped_bytes_are_the_routed_experts_not_on_the_gpu(models, monkeypatch):
    """What crossed the bus: each routed expert placed in host memory, once per token (and
    once per layer call of the prompt), times its bytes."""
    src, packed = models.src("qwen3_moe", True), models.packed("qwen3_moe", True)
    manifest = read_manifest(packed)
    sm, _ = _load(monkeypatch, packed, manifest.total_expert_bytes // 4)
    routed = []
    original = LocalExperts.defer_hits
    monkeypatch.setattr(LocalExperts, "defer_hits", lambda self, layer, indices: routed.append((layer, indices))
                        or original(self, layer, indices))
    try:
        generate(sm, encode(models, src, "Another text, which the placement follows."), max_tokens=MAX_TOKENS)
        routed.clear()
        on_gpu = set(sm.local.on_gpu)
        assert on_gpu
        before = (sm.local.mapped_bytes, sm.local.decoded_mapped_bytes, sm.local.decoded_layer_calls)
        generate(sm, encode(models, src, PROMPT), max_tokens=MAX_TOKENS)
        expected = decoded = decoded_calls = 0
        for layer, indices in routed:
            flat = np.array(indices).reshape(-1)
            one_token = indices.size == indices.shape[-1]
            experts = flat if one_token else np.unique(flat)
            crossed = sum(manifest.expert_bytes for e in experts.tolist() if (layer, e) not in on_gpu)
            expected += crossed
            decoded += crossed if one_token else 0
            decoded_calls += one_token
        assert routed and 0 < sm.local.mapped_bytes - before[0] == expected
        assert 0 < sm.local.decoded_mapped_bytes - before[1] == decoded < expected
        assert sm.local.decoded_layer_calls - before[2] == decoded_calls >= (MAX_TOKENS - 1) * len(manifest.layers)
    finally:
        sm.close()


def test_mapping_needs_cuda_or_the_cpu_the_ram_for_every_expert_and_routing_counts(models, monkeypatch):
    packed = models.packed("qwen3_moe", True)
    manifest = read_manifest(packed)
    store = ExpertStore(packed, manifest)
    try:
        monkeypatch.setattr(mapped, "compute_backend", lambda: "metal")
        with pytest.raises(MappedExpertsError, match="needs MLX's CUDA backend, or its CPU backend on Linux, and "
                                                     "this machine computes on metal; drop --map-experts"):
            open_mapped(store, manifest.expert_bytes, None)
        monkeypatch.setattr(mapped, "compute_backend", lambda: "cpu")
        monkeypatch.setattr(mapped.filemap, "can_map_files", lambda: False)
        with pytest.raises(MappedExpertsError,
                           match="computes on cpu, with an MLX built for a GPU; drop --map-experts"):
            open_mapped(store, manifest.expert_bytes, None)
        with pytest.raises(MappedExpertsError, match="--cache-policy lru does not keep; drop"):
            open_mapped(store, manifest.expert_bytes, PlacingDma(), policy="lru")
        monkeypatch.setattr(mapped, "ram_bytes", lambda: manifest.total_expert_bytes)
        with pytest.raises(MappedExpertsError, match="keeps every expert in host memory.*drop --map-experts"):
            open_mapped(store, manifest.expert_bytes, PlacingDma())
    finally:
        store.close()


def test_pools_are_left_to_mlx_again_when_rebuilt_or_closed(models, monkeypatch):
    """MLX reuses a freed pool's memory for other arrays: none of it may stay pinned to the
    host (it would slow whatever lands there), after a cache reset or a close."""
    packed = models.packed("qwen3_moe", True)
    budget = read_manifest(packed).total_expert_bytes // 4
    sm, dma = _load(monkeypatch, packed, budget)
    try:
        old = [v for g in sm.local._groups for v in g.pool.byte_views().values()]
        assert all(dma.on_gpu(v) is False for v in old)
        sm.local.reset_cache(budget)
        assert all(dma.on_gpu(v) is None for v in old)
        new = [v for g in sm.local._groups for v in g.pool.byte_views().values()]
        assert all(dma.on_gpu(v) is not None for v in new)
    finally:
        sm.close()
    assert all(dma.on_gpu(v) is None for v in new)


@pytest.mark.skipif(not ON_CUDA, reason="needs MLX's CUDA backend (run by .ci/gpu-check)")
@pytest.mark.parametrize("arch,quantized", [("qwen3_moe", True), ("mixtral", False)])
def test_mapped_experts_on_a_real_gpu_keep_mlx_lms_tokens(models, arch, quantized):
    """The CUDA driver's placement, for real: mlx-lm's tokens with most experts in host
    memory, and again once the placement has followed the routing."""
    src, packed = models.src(arch, quantized), models.packed(arch, quantized)
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, max_tokens=MAX_TOKENS, models=models)
    sm = load_streaming_model(packed, cache_bytes=read_manifest(packed).total_expert_bytes // 4, map_experts=True)
    try:
        first = set(sm.local.on_gpu)
        assert generate(sm, prompt, max_tokens=MAX_TOKENS).token_ids == expected
        assert sm.local.on_gpu != first
        assert generate(sm, prompt, max_tokens=MAX_TOKENS).token_ids == expected
    finally:
        sm.close()


def test_nodes_are_not_used_with_mapped_experts(models, monkeypatch, caplog):
    """Every expert is here: a node would get no work, and its layers would lose the resident
    path. The nodes given are left out, with a warning, and the tokens are mlx-lm's."""
    src, packed = models.src("qwen3_moe", True), models.packed("qwen3_moe", True)
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, max_tokens=MAX_TOKENS, models=models)
    monkeypatch.setattr(loader, "open_dma", PlacingDma)
    with caplog.at_level("WARNING"):
        sm = load_streaming_model(packed, cache_bytes=read_manifest(packed).total_expert_bytes // 4,
                                  map_experts=True, peers=["127.0.0.1:9"], keep_cluster=True)
    try:
        assert sm.cluster is None
        assert any("--map-experts on keeps every expert" in r.getMessage() and "127.0.0.1:9" in r.getMessage()
                   for r in caplog.records)
        assert generate(sm, prompt, max_tokens=MAX_TOKENS).token_ids == expected
    finally:
        sm.close()


def test_a_corrupted_expert_stops_the_load_with_the_checksum_error_and_leaves_no_placement(models, monkeypatch,
                                                                                         tmp_path):
    from test_bad_input import corrupt_expert

    from edgemoe.node.errors import ChecksumError

    packed = models.copy_packed(tmp_path / "packed", arch="qwen3_moe", quantized=True)
    corrupt_expert(packed, read_manifest(packed).layers[-1].layer, 3)
    dma = PlacingDma()
    monkeypatch.setattr(loader, "open_dma", lambda: dma)
    built = []
    original = MappedExperts._place_pools
    monkeypatch.setattr(MappedExperts, "_place_pools", lambda self, on_gpu: built.append(self)
                        or original(self, on_gpu))
    with pytest.raises(ChecksumError, match="checksum"):
        load_streaming_model(packed, cache_bytes=read_manifest(packed).total_expert_bytes // 4, map_experts=True)
    views = [v for g in built[-1]._groups for v in g.pool.byte_views().values()]
    assert views and all(dma.on_gpu(v) is None for v in views)
    assert dma.closed and dma.registered == {}  # no pinned staging left behind (nor made: nothing misses)


def _credentials() -> ClusterCredentials:
    return ClusterCredentials.from_token(format_token(new_secret()), "test-client")


@pytest.mark.parametrize("case", ["chosen", "cpu", "cpu, direct reads", "cpu, tensors not whole pages", "metal",
                                  "old driver", "cache holds all", "no ram", "small gpu", "lru", "nodes", "asked off",
                                  "asked on"])
def test_auto_maps_where_cuda_ram_and_a_partial_cache_make_it_pay(models, monkeypatch, case):
    """`map_experts=None` (the CLI's default `--map-experts auto`). Without a driver: the CPU
    maps the page cache (test_page_cache_mapped.py), only through it and where the tensors are
    whole pages (the tiny 4-bit model's are not; its float32 mixtral's are); Metal maps nothing."""
    no_driver = case.startswith("cpu") or case == "metal"
    if case.startswith("cpu") and mx.default_device() != mx.cpu:
        pytest.skip("the CPU's mapping, on a machine whose MLX computes on a GPU")
    packed = models.packed("mixtral", False) if no_driver and case != "cpu, tensors not whole pages" else \
        models.packed("qwen3_moe", True)
    total = read_manifest(packed).total_expert_bytes
    dma = PlacingDma(can_place=case != "old driver")
    monkeypatch.setattr(loader, "open_dma", lambda: None if no_driver else dma)
    monkeypatch.setattr(mapped, "compute_backend", lambda: "metal" if case == "metal" else "cpu")
    if case == "no ram":
        monkeypatch.setattr(mapped, "ram_bytes", lambda: total)
    monkeypatch.setattr(mapped, "array_memory_bytes", lambda: total * (1 if case == "small gpu" else 4))
    requested = {"asked off": False, "asked on": True}.get(case)
    sm = load_streaming_model(packed, cache_bytes=total if case == "cache holds all" else total // 4,
                              io_mode="direct" if case == "cpu, direct reads" else "buffered",
                              cache_policy="lru" if case == "lru" else "lfu", map_experts=requested,
                              peers=["127.0.0.1:9"] if case == "nodes" else None, keep_cluster=case == "nodes",
                              credentials=_credentials() if case == "nodes" else None, node_timeout_s=0.2)
    try:
        assert isinstance(sm.local, MappedExperts) == (case in ("chosen", "cpu", "asked on"))
        assert (sm.cluster is not None) == (case == "nodes")
        if isinstance(sm.local, MappedExperts) and not no_driver:
            assert dma.registered == {}  # pools of every expert stage nothing
    finally:
        sm.close()
