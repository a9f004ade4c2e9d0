"""Experts large enough to be read on the I/O threads: each miss is computed as soon as its
read lands, while the others are still read. Same tokens as mlx-lm; a corrupted expert is
still never computed with."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import encode, mlx_lm_tokens, unavailable
from test_bad_input import assert_corrupted_expert_never_computed, corrupt_expert

from edgemoe.coordinator.dispatch import LayerDispatch
from edgemoe.coordinator.generate import generate
from edgemoe.coordinator.loader import load_streaming_model
from edgemoe.node.errors import ChecksumError
from edgemoe.node.local import LocalExperts
from edgemoe.node.manifest import read_manifest
from edgemoe.node.store import INLINE_READ_BYTES, ExpertStore

PROMPT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture
def as_read_calls(monkeypatch):
    calls = {"n": 0}
    original = LayerDispatch._as_read

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LayerDispatch, "_as_read", counting)
    return calls


@pytest.mark.parametrize("io_mode", ["buffered", "direct"])
def test_same_tokens_as_mlx_lm_computed_as_read_or_not(models, large, as_read_calls, io_mode):
    src, packed = large
    manifest = read_manifest(packed)
    assert 2 * manifest.expert_bytes > INLINE_READ_BYTES
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, max_tokens=12, models=models)
    # A one-expert cache: nearly every expert of every token is a miss.
    sm = load_streaming_model(packed, cache_bytes=manifest.expert_bytes, io_mode=io_mode)
    try:
        result = generate(sm, prompt, max_tokens=12)
    finally:
        sm.close()
    assert result.token_ids == expected
    assert result.stats.experts_from_ssd > 12
    assert set(result.stats.io_modes.values()) == {io_mode}
    # computed as read only when reads bypass the page cache
    # only there, and only on the CPU: in other batch shapes a GPU rounds differently
    assert (as_read_calls["n"] > 0) == (io_mode == "direct" and mx.default_device() == mx.cpu)


def test_a_corrupted_large_expert_is_never_computed_with(models, large, tmp_path, monkeypatch, as_read_calls):
    src, packed = large
    packed = shutil.copytree(packed, tmp_path / "packed")
    prompt = encode(models, src, PROMPT)
    assert_corrupted_expert_never_computed(packed, prompt, monkeypatch,
                                           cache_bytes=read_manifest(packed).expert_bytes, io_mode="direct")
    assert (as_read_calls["n"] > 0) == (mx.default_device() == mx.cpu)


def test_auto_prefetch_of_large_experts_read_directly_keeps_mlx_lms_tokens(models, large):
    """`--prefetch auto` guesses each next layer's likeliest expert into a spare slot (on the
    CPU: the loader keeps slots off a GPU), and the layer takes it while it is still read."""
    src, packed = large
    manifest = read_manifest(packed)
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, max_tokens=12, models=models)
    sm = load_streaming_model(packed, cache_bytes=manifest.expert_bytes, io_mode="direct", prefetch=None)
    try:
        result = generate(sm, prompt, max_tokens=12)
        width = sm.local.prefetch_width
        guessed, _ = sm.guesses()
    finally:
        sm.close()
    assert result.token_ids == expected
    if mx.default_device() == mx.cpu and set(result.stats.io_modes.values()) == {"direct"}:
        assert width == 1
        # One read per guess at most (a guess already cached is not read).
        assert 0 < result.stats.experts_prefetch_used <= result.stats.experts_prefetched <= guessed


def _gated_reads(monkeypatch, gated: tuple[int, int]) -> threading.Event:
    """Reads of the `gated` (layer, expert) wait for the returned event."""
    gate = threading.Event()
    original = ExpertStore._read_chunk

    def read_chunk(self, layer, expert, *args):
        if (layer, expert) == gated:
            gate.wait()
        return original(self, layer, expert, *args)

    monkeypatch.setattr(ExpertStore, "_read_chunk", read_chunk)
    return gate


def _direct_local(packed: Path) -> LocalExperts:
    manifest = read_manifest(packed)
    store = ExpertStore(packed, manifest, io_mode="direct")
    if not store.any_direct:
        store.close()
        unavailable("this file system refuses direct I/O: the prefetch into slots reads inline there")
    # The layer's two routed experts, plus one more: a cache of three.
    return LocalExperts(store, 3 * manifest.expert_bytes, prefetch_experts=2)


def _record(packed: Path, layer: int, expert: int) -> list[bytes]:
    """An expert's tensors as read by a store of its own."""
    reference = ExpertStore(packed, read_manifest(packed), io_mode="buffered")
    try:
        record = reference.read(layer, expert)
        return [record[t.offset : t.offset + t.nbytes].tobytes() for t in reference.manifest.layer(layer).tensors]
    finally:
        reference.close()


def _in_slot(local: LocalExperts, layer: int, slot: int) -> list[bytes]:
    return [bytes(v) for v in local._group_of[layer].pool.views(slot)]


def test_a_guess_still_being_read_is_waited_for_only_when_it_is_computed(large, monkeypatch):
    """The next layer takes a right guess as a miss still being read: its own misses start
    at once, and the guess lands in its cache slot once waited for."""
    _, packed = large
    layer = read_manifest(packed).layers[1].layer
    gate = _gated_reads(monkeypatch, (layer, 3))
    # Were start_slots to wait for the guess, only this would let it go on (and the test fail).
    released = threading.Timer(10.0, gate.set)
    local = _direct_local(packed)
    try:
        assert local.prefetch_width == 1 and local._group_of[layer].prefetch_slots == 1
        local.prefetch(layer, [3, 5])  # the top guess only
        released.start()
        slots, misses = local.start_slots(layer, [3, 4])
        assert not gate.is_set(), "start_slots waited for the guess"
        assert misses is not None and misses.experts == [3, 4]
        gate.set()
        misses.wait_all()
        assert (local.stats.prefetched, local.stats.prefetch_used, local.stats.experts_from_ssd) == (1, 1, 1)
        record_bytes = local.manifest.layer(layer).record_bytes
        assert local.stats.prefetch_read_bytes == local.stats.prefetch_used_bytes == record_bytes
        assert (layer, 3) in local and (layer, 4) in local
        for expert, slot in zip((3, 4), slots.tolist()):
            assert _in_slot(local, layer, slot) == _record(packed, layer, expert), expert
    finally:
        released.cancel()
        gate.set()
        local.close()


def test_a_corrupted_guess_taken_while_read_fails_its_layer_and_is_not_kept(large, tmp_path):
    _, packed = large
    packed = shutil.copytree(packed, tmp_path / "packed")
    layer = read_manifest(packed).layers[1].layer
    corrupt_expert(packed, layer, 3)
    local = _direct_local(packed)
    try:
        local.prefetch(layer, [3])
        slots, misses = local.start_slots(layer, [3, 4])
        assert misses is not None and 3 in misses.experts
        with pytest.raises(ChecksumError, match=f"layer {layer} expert 3"):
            misses.wait(3)
        assert (layer, 3) not in local
        local.slots(layer, [4, 5])  # the layer's other reads are waited for, and the store still serves
        assert (layer, 4) in local and (layer, 5) in local
    finally:
        local.close()


def test_a_failed_guess_left_unwaited_holds_back_the_slots_of_its_layers_reads(large, tmp_path, monkeypatch):
    """A layer whose caller failed before waiting: the next call waits for its reads before it
    hands their slots out again, even when its taken guess is the read that failed."""
    _, packed = large
    packed = shutil.copytree(packed, tmp_path / "packed")
    layer = read_manifest(packed).layers[1].layer
    corrupt_expert(packed, layer, 3)
    gate = _gated_reads(monkeypatch, (layer, 4))
    local = _direct_local(packed)
    try:
        local.prefetch(layer, [3])
        local.start_slots(layer, [3, 4])  # and never waited for
        # Only this lets expert 4's read land: the next call must wait for it, not race it.
        released = threading.Timer(0.5, gate.set)
        released.start()
        slots = local.slots(layer, [5, 6]).tolist()
        released.join()
        for expert, slot in zip((5, 6), slots):
            assert (layer, expert) in local and _in_slot(local, layer, slot) == _record(packed, layer, expert), expert
        assert (layer, 3) not in local
    finally:
        gate.set()
        local.close()


def _guessing_3(packed: Path) -> tuple[int, LocalExperts]:
    """A layer, and a direct-I/O `LocalExperts` whose cache slots hold its experts 0-2 (other
    experts' bytes, for a slot kept without its own) and whose guess for it, expert 3, is read."""
    layer = read_manifest(packed).layers[1].layer
    local = _direct_local(packed)
    local.slots(layer, [0, 1, 2])
    local.prefetch(layer, [3])
    return layer, local


def test_an_interrupted_wait_for_a_guess_keeps_no_slot_without_its_bytes(large, monkeypatch):
    from edgemoe.node.pending import PendingReads

    _, packed = large
    layer, local = _guessing_3(packed)
    try:
        _, misses = local.start_slots(layer, [3, 4])
        original = PendingReads.wait

        def interrupted(self, expert):
            if expert == 3:
                raise KeyboardInterrupt
            return original(self, expert)

        monkeypatch.setattr(PendingReads, "wait", interrupted)
        assert misses is not None
        with pytest.raises(KeyboardInterrupt):
            misses.wait(3)
        monkeypatch.setattr(PendingReads, "wait", original)
        local.slots(layer, [4])
        if (layer, 3) in local:
            assert _in_slot(local, layer, local._group_of[layer].slot_of[(layer, 3)]) == _record(packed, layer, 3)
        local.slots(layer, [3])  # read again, whole
        assert _in_slot(local, layer, local._group_of[layer].slot_of[(layer, 3)]) == _record(packed, layer, 3)
    finally:
        local.close()


def test_an_interrupt_while_starting_reads_keeps_no_slot_without_its_bytes(large, monkeypatch):
    _, packed = large
    layer, local = _guessing_3(packed)
    try:

        def interrupted(self, *args, **kwargs):
            raise KeyboardInterrupt

        original = ExpertStore.start_reads
        monkeypatch.setattr(ExpertStore, "start_reads", interrupted)
        with pytest.raises(KeyboardInterrupt):
            local.start_slots(layer, [3, 4])
        monkeypatch.setattr(ExpertStore, "start_reads", original)
        assert (layer, 3) not in local and (layer, 4) not in local
        slots = local.slots(layer, [3, 4]).tolist()
        for expert, slot in zip((3, 4), slots):
            assert _in_slot(local, layer, slot) == _record(packed, layer, expert), expert
    finally:
        local.close()
