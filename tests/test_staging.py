"""Staged misses (node/staging.py): on CUDA a miss is read into pinned host memory and
copied into its slot by DMA. Here a host fake stands in for the DMA engine; it performs
its copies only at `sync`, so a miss used before its copy is waited for shows up as wrong
bytes. The real engine runs in `.ci/gpu-check`'s same-answer suite on the GPU."""

from __future__ import annotations

import ctypes

import mlx.core as mx
import numpy as np
import pytest
from conftest import MAX_TOKENS, PROMPT, computing_on, encode, mlx_lm_tokens

from edgemoe.coordinator import loader
from edgemoe.coordinator.generate import generate
from edgemoe.node.local import LocalExperts
from edgemoe.node.manifest import read_manifest
from edgemoe.node.staging import CudaDmaError, open_dma
from edgemoe.node.store import ExpertStore


class HostDma:
    def __init__(self, perform: bool = True, refuse_pinning: bool = False):
        self.perform = perform
        self.refuse_pinning = refuse_pinning
        self.registered: dict[int, int] = {}
        self.queued: list[tuple[int, int, int]] = []
        self.copies = 0
        self.copied_bytes = 0
        self.fail_copies = False
        self.closed = False

    def register(self, address: int, nbytes: int) -> None:
        if self.refuse_pinning:
            raise CudaDmaError("cuMemHostRegister failed with CUDA error 2")
        self.registered[address] = nbytes

    def unregister(self, address: int) -> None:
        del self.registered[address]

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        self.queued.append((dst, src, nbytes))
        self.copies += 1
        self.copied_bytes += nbytes

    def sync(self) -> None:
        if self.fail_copies:
            raise CudaDmaError("cuStreamSynchronize failed with CUDA error 700")
        queued, self.queued = self.queued, []
        if self.perform:
            for dst, src, nbytes in queued:
                ctypes.memmove(dst, src, nbytes)

    def close(self) -> None:
        self.closed = True


def _tensor_bytes(record: np.ndarray, spec) -> list[bytes]:
    return [record[t.offset : t.offset + t.nbytes].tobytes() for t in spec.tensors]


@pytest.mark.parametrize("io_mode", ["buffered", "direct"])
def test_staged_misses_land_in_their_slots_through_the_dma(models, io_mode):
    packed = models.packed("qwen3_moe", True)
    manifest = read_manifest(packed)
    spec = manifest.layers[0]
    dma = HostDma()
    local = LocalExperts(ExpertStore(packed, manifest, io_mode=io_mode), 2 * manifest.total_expert_bytes // 8,
                         scratch_slots=8, dma=dma)
    try:
        experts = [0, 3, 5, 7]
        slots = local.slots(spec.layer, experts)
        # A fresh cache's free slots are consecutive, as are the staging records: one copy per tensor.
        assert slots.tolist() == [0, 1, 2, 3]
        assert dma.copies == len(spec.tensors) and dma.queued == []
        assert dma.copied_bytes == len(experts) * sum(t.nbytes for t in spec.tensors)
        reference = ExpertStore(packed, manifest, io_mode="buffered")
        for e, slot in zip(experts, slots.tolist()):
            views = local._group_of[spec.layer].pool.views(slot)
            assert [bytes(v) for v in views] == _tensor_bytes(reference.read(spec.layer, e), spec)
        reference.close()
        # Hits are not copied again.
        local.slots(spec.layer, experts)
        assert dma.copies == len(spec.tensors)
    finally:
        local.close()
    assert dma.registered == {} and dma.closed  # every pinned buffer released, and the engine


def test_reads_go_to_staging_not_to_the_slot(models):
    """With a DMA that never copies, a miss's slot keeps its old (zero) bytes: the read
    itself never writes into slot memory, which on CUDA is what costs a page migration."""
    packed = models.packed("qwen3_moe", True)
    manifest = read_manifest(packed)
    spec = manifest.layers[0]
    local = LocalExperts(ExpertStore(packed, manifest), manifest.total_expert_bytes, dma=HostDma(perform=False))
    try:
        slots = local.slots(spec.layer, [1, 2])
        for slot in slots.tolist():
            assert all(not any(bytes(v)) for v in local._group_of[spec.layer].pool.views(slot))
    finally:
        local.close()


@pytest.mark.parametrize("arch,quantized,io_mode", [("qwen3_moe", True, "direct"), ("mixtral", False, "buffered"),
                                                    ("gpt_oss", True, "buffered")])
def test_staged_generation_same_tokens_as_mlx_lm(models, monkeypatch, arch, quantized, io_mode):
    src, packed = models.src(arch, quantized), models.packed(arch, quantized)
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, models=models)
    manifest = read_manifest(packed)
    dma = HostDma()
    monkeypatch.setattr(loader, "open_dma", lambda: dma)
    # A quarter of the experts: misses into cache slots, evictions, and scratch slots.
    sm = loader.load_streaming_model(packed, cache_bytes=manifest.total_expert_bytes // 4, io_mode=io_mode)
    try:
        result = generate(sm, prompt, max_tokens=MAX_TOKENS)
        ssd = sm.local.stats.experts_from_ssd
        spec = manifest.layers[0]
        assert result.token_ids == expected
        # Every missed byte copied once, runs of misses in fewer copies than one per tensor each.
        assert ssd > 0 and dma.copied_bytes == ssd * sum(t.nbytes for t in spec.tensors)
        assert dma.copies < ssd * len(spec.tensors)

        # The bench's A/B switch: straight into the slots, no copies, same tokens.
        sm.local.staged_reads = False
        sm.local.reset_cache(manifest.total_expert_bytes // 4)
        before = dma.copies
        assert generate(sm, prompt, max_tokens=MAX_TOKENS).token_ids == expected
        assert dma.copies == before
    finally:
        sm.close()
    assert dma.registered == {}


def test_refused_pinning_reads_into_the_slots_and_says_so(models, monkeypatch, caplog):
    src, packed = models.src("qwen3_moe", True), models.packed("qwen3_moe", True)
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, models=models)
    dma = HostDma(refuse_pinning=True)
    monkeypatch.setattr(loader, "open_dma", lambda: dma)
    sm = loader.load_streaming_model(packed, cache_bytes=read_manifest(packed).total_expert_bytes // 4)
    try:
        assert generate(sm, prompt, max_tokens=MAX_TOKENS).token_ids == expected
    finally:
        sm.close()
    assert dma.copies == 0
    assert "reading into slots directly" in caplog.text


def test_dma_only_on_a_cuda_gpu():
    on_cuda = mx.default_device() == mx.gpu and mx.cuda.is_available()
    assert (open_dma() is not None) == on_cuda


def test_the_benchs_host_to_device_figure_takes_the_dma_when_misses_are_staged():
    from edgemoe.coordinator.bench.transfer import COPY_BYTES, host_to_device_gbps

    dma = HostDma()
    nbytes = 3 * COPY_BYTES + 4096
    assert host_to_device_gbps(dma, nbytes=nbytes, repeats=2) > 0
    # Expert-sized pieces, every byte each time, the pinned buffer released.
    assert dma.copies == 2 * 4 and dma.copied_bytes == 2 * nbytes and dma.queued == [] and dma.registered == {}
    assert host_to_device_gbps(None, nbytes=2**20, repeats=1) > 0


def test_a_copy_that_fails_leaves_no_cached_expert_behind(models):
    """A slot whose copy never landed holds another expert's bytes: it must not serve a hit."""
    packed = models.packed("qwen3_moe", True)
    manifest = read_manifest(packed)
    layer = manifest.layers[0].layer
    dma = HostDma()
    local = LocalExperts(ExpertStore(packed, manifest), manifest.total_expert_bytes, dma=dma)
    try:
        dma.fail_copies = True
        with pytest.raises(CudaDmaError):
            local.slots(layer, [1, 2])
        assert (layer, 1) not in local and (layer, 2) not in local
        dma.fail_copies = False
        slots = local.slots(layer, [1, 2])
        reference = ExpertStore(packed, manifest)
        views = local._group_of[layer].pool.views(int(slots[0]))
        assert [bytes(v) for v in views] == _tensor_bytes(reference.read(layer, 1), manifest.layers[0])
        reference.close()
    finally:
        local.close()


def test_staged_misses_landing_one_by_one_as_they_are_read(models, large, monkeypatch):
    """Large experts are read by the I/O threads, not inline: with compute-as-read each miss is
    copied into its slot when it is waited for. Compute-as-read is on only on the CPU, so on
    the GPU machine this runs there too (reference included)."""
    src, packed = large
    manifest = read_manifest(packed)
    prompt = encode(models, src, PROMPT)
    dma = HostDma()
    monkeypatch.setattr(loader, "open_dma", lambda: dma)
    with computing_on(mx.cpu):
        expected, _ = mlx_lm_tokens(src, prompt, max_tokens=8)
        sm = loader.load_streaming_model(packed, cache_bytes=manifest.total_expert_bytes // 8, io_mode="direct")
        try:
            assert sm.local.compute_as_read and sm.local.store.direct
            assert generate(sm, prompt, max_tokens=8).token_ids == expected
            assert dma.copies == sm.local.stats.experts_from_ssd * len(manifest.layers[0].tensors) > 0
        finally:
            sm.close()


def test_copies_coalesce_only_where_records_and_slots_both_run_on():
    from edgemoe.node.staging import _runs

    assert _runs([(2, 8), (0, 5), (1, 7), (3, 9), (5, 10)]) == [(0, 5, 1), (1, 7, 3), (5, 10, 1)]
    assert _runs([(0, 3), (1, 2)]) == [(0, 3, 1), (1, 2, 1)]
    assert _runs([]) == []


def test_scratch_and_cache_misses_each_land_in_one_copy_per_tensor(models):
    """A cache miss between scratch misses does not break the scratch misses' run."""
    packed = models.packed("qwen3_moe", True)
    manifest = read_manifest(packed)
    spec = manifest.layers[0]
    layer = spec.layer
    dma = HostDma()
    local = LocalExperts(ExpertStore(packed, manifest), 2 * spec.record_bytes, scratch_slots=8, dma=dma)
    try:
        group = local._group_of[layer]
        for _ in range(3):  # two cached experts, counted three times
            local.slots(layer, [7, 8])
        local.seed_counts({(layer, 4): 10})
        before = dma.copies
        experts = [1, 2, 3, 4, 5, 6]
        slots = local.slots(layer, experts).tolist()
        # 4 is counted more than the cached ones and takes a cache slot; the rest are scratch.
        assert slots[3] < group.scratch_start
        assert [slots[i] for i in (0, 1, 2, 4, 5)] == [group.scratch_start + i for i in range(5)]
        assert dma.copies - before == 2 * len(spec.tensors)
        reference = ExpertStore(packed, manifest)
        for e, slot in zip(experts, slots):
            assert [bytes(v) for v in group.pool.views(slot)] == _tensor_bytes(reference.read(layer, e), spec)
        reference.close()
    finally:
        local.close()


def test_a_staged_miss_is_copied_while_later_reads_are_in_flight(large, monkeypatch):
    """The last expert's read is held until some copy is queued: it is let through only if
    the copies of the experts read before it start while it is still in flight."""
    import threading

    _, packed = large
    manifest = read_manifest(packed)
    spec = manifest.layers[0]
    copied = threading.Event()

    class SignallingDma(HostDma):
        def copy(self, dst: int, src: int, nbytes: int) -> None:
            super().copy(dst, src, nbytes)
            copied.set()

    store = ExpertStore(packed, manifest)
    local = LocalExperts(store, manifest.total_expert_bytes, scratch_slots=8, compute_as_read=False,
                         dma=SignallingDma())
    read_chunk = store._read_chunk
    released_by_copy = []

    def held_read(layer, expert, *job):
        if expert == 3:
            released_by_copy.append(copied.wait(timeout=10))
        read_chunk(layer, expert, *job)

    monkeypatch.setattr(store, "_read_chunk", held_read)
    try:
        slots = local.slots(spec.layer, [0, 1, 2, 3])
        assert released_by_copy and all(released_by_copy)
        reference = ExpertStore(packed, manifest)
        for e, slot in zip([0, 1, 2, 3], slots.tolist()):
            views = local._group_of[spec.layer].pool.views(slot)
            assert [bytes(v) for v in views] == _tensor_bytes(reference.read(spec.layer, e), spec)
        reference.close()
    finally:
        local.close()


def test_a_failed_checksum_returns_only_once_no_read_is_in_flight(large, monkeypatch):
    """Expert 0 fails its checksum while expert 3's read is still running. The failing call
    must not return before that read lands: the next call reads into the same staging
    records, and a late write would give expert 7 (verified earlier, so never rechecked)
    expert 3's bytes in a cached slot."""
    import threading
    import time

    from edgemoe.node.errors import ChecksumError

    _, packed = large
    manifest = read_manifest(packed)
    spec = manifest.layers[0]
    store = ExpertStore(packed, manifest)
    local = LocalExperts(store, manifest.total_expert_bytes, scratch_slots=8, compute_as_read=False,
                         dma=HostDma())
    read_chunk, verify = store._read_chunk, store.verify_first_read
    seventh_read = threading.Event()

    def read(layer, expert, *job):
        if expert == 3:
            seventh_read.wait(timeout=2)  # past the next call's read of 7, unless we are waited for
        if expert == 4:
            time.sleep(0.3)  # the next call's copies come well after 3's late write
        read_chunk(layer, expert, *job)
        if expert == 7:
            seventh_read.set()

    def checked(layer, expert, pieces):
        if expert == 0:
            raise ChecksumError("layer 0 expert 0 fails its checksum")
        verify(layer, expert, pieces)

    monkeypatch.setattr(store, "_read_chunk", read)
    monkeypatch.setattr(store, "verify_first_read", checked)
    store._verified.add((spec.layer, 7))
    try:
        with pytest.raises(ChecksumError):
            local.slots(spec.layer, [0, 1, 2, 3])
        slots = local.slots(spec.layer, [4, 5, 6, 7])
        reference = ExpertStore(packed, manifest)
        for e, slot in zip([4, 5, 6, 7], slots.tolist()):
            views = local._group_of[spec.layer].pool.views(slot)
            assert [bytes(v) for v in views] == _tensor_bytes(reference.read(spec.layer, e), spec), e
        reference.close()
    finally:
        local.close()
