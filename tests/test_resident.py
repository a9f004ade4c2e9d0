"""Layers whose every expert is cached for good compute from a device-side expert -> slot
table, with no host round trip per layer: same tokens as mlx-lm, and the same counters as
the path that reads the routing on the host."""

from __future__ import annotations

import mlx.core as mx
import pytest
from conftest import PROMPT, encode, mlx_lm_tokens

from edgemoe.coordinator.bench.decode import cache_everything
from edgemoe.coordinator.counters import snapshot
from edgemoe.coordinator.generate import generate
from edgemoe.coordinator.loader import load_streaming_model
from edgemoe.node.compute import array_bytes
from edgemoe.node.dtypes import address_of
from edgemoe.node.local import MAX_UNSETTLED, SETTLE_EVERY, LocalExperts
from edgemoe.node.manifest import read_manifest

MAX_TOKENS = 12


def _decode(packed, prompt, budget, warm=True, looked_up=None, resident_tables=True):
    sm = load_streaming_model(packed, cache_bytes=budget)
    sm.local.resident_tables = resident_tables
    try:
        if warm:
            cache_everything(sm)
        if looked_up is not None:
            looked_up.clear()
        before = snapshot(sm)
        result = generate(sm, prompt, max_tokens=MAX_TOKENS)
        return result.token_ids, snapshot(sm) - before, sm.local.routing_counts(), sm
    finally:
        sm.close()


@pytest.mark.parametrize("arch,quantized", [("qwen3_moe", True), ("mixtral", False), ("gpt_oss", True)])
def test_resident_layers_keep_mlx_lms_tokens_and_the_host_paths_counters(models, monkeypatch, arch, quantized):
    src, packed = models.src(arch, quantized), models.packed(arch, quantized)
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, max_tokens=MAX_TOKENS, models=models)
    budget = read_manifest(packed).total_expert_bytes

    looked_up = []
    original = LocalExperts.start_slots

    def counting(self, layer, experts):
        looked_up.append(layer)
        return original(self, layer, experts)

    monkeypatch.setattr(LocalExperts, "start_slots", counting)
    tokens, run, counts, sm = _decode(packed, prompt, budget, looked_up=looked_up)
    assert tokens == expected
    # Every layer was resident: no routing was read on the host, nothing read from SSD.
    assert looked_up == [] and run.ssd_bytes_read == 0
    assert all(sm.local.resident_arrays(spec.layer) is not None for spec in sm.manifest.layers)

    # The host path (tables disabled) gives the same hits and routing counts.
    host_tokens, host_run, host_counts, _ = _decode(packed, prompt, budget, looked_up=looked_up,
                                                    resident_tables=False)
    assert host_tokens == expected and looked_up != []
    for field in ("cache_hits", "cache_misses", "experts_from_cache", "experts_from_ssd"):
        assert getattr(run, field) == getattr(host_run, field), field
    assert run.experts_from_cache > 0
    assert counts == host_counts


def test_no_table_while_the_cache_can_evict(models):
    """A quarter of the experts: a miss may evict any cached expert, so no layer's slots are fixed."""
    src, packed = models.src("qwen3_moe", True), models.packed("qwen3_moe", True)
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, max_tokens=MAX_TOKENS, models=models)
    tokens, run, _, sm = _decode(packed, prompt, read_manifest(packed).total_expert_bytes // 4, warm=False)
    assert tokens == expected and run.experts_from_ssd > 0
    assert all(sm.local.resident_arrays(spec.layer) is None for spec in sm.manifest.layers)


def test_a_layer_becomes_resident_once_its_experts_are_all_read(models, monkeypatch):
    """Unwarmed, a layer takes the host path until its experts are all in; then it stops
    asking the host, and a layer still missing some keeps asking."""
    src, packed = models.src("qwen3_moe", True), models.packed("qwen3_moe", True)
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, max_tokens=MAX_TOKENS, models=models)
    sm = load_streaming_model(packed, cache_bytes=read_manifest(packed).total_expert_bytes)
    try:
        assert generate(sm, prompt, max_tokens=MAX_TOKENS).token_ids == expected
        complete = {spec.layer for spec in sm.manifest.layers
                    if all((spec.layer, e) in sm.local for e in range(spec.num_experts))}
        looked_up = set()
        original = LocalExperts.start_slots

        def counting(self, layer, experts):
            looked_up.add(layer)
            return original(self, layer, experts)

        monkeypatch.setattr(LocalExperts, "start_slots", counting)
        assert generate(sm, prompt, max_tokens=MAX_TOKENS).token_ids == expected
        assert complete and not looked_up & complete
        for spec in sm.manifest.layers:
            assert (sm.local.resident_arrays(spec.layer) is not None) == (spec.layer in complete)
    finally:
        sm.close()


def test_an_expert_leaving_its_slot_retires_the_layers_arrays(models):
    """A cached expert forgotten (a failed read) or evicted leaves its slot stale: the layer
    must not compute from its arrays until the expert is back, read into the same slot."""
    src, packed = models.src("qwen3_moe", True), models.packed("qwen3_moe", True)
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, max_tokens=MAX_TOKENS, models=models)
    sm = load_streaming_model(packed, cache_bytes=read_manifest(packed).total_expert_bytes)
    try:
        cache_everything(sm)
        local, layer = sm.local, sm.manifest.layers[0].layer
        assert local.resident_arrays(layer) is not None
        group = local._group_of[layer]
        slot = group.slot_of[(layer, 3)]
        group.cache.remove((layer, 3))
        assert local.resident_arrays(layer) is None
        local.slots(layer, [3])
        assert group.slot_of[(layer, 3)] == slot
        assert local.resident_arrays(layer) is not None
        assert generate(sm, prompt, max_tokens=MAX_TOKENS).token_ids == expected
    finally:
        sm.close()


def test_a_resident_layers_arrays_are_its_slots_in_expert_order(models):
    """Where the cache keeps every expert, expert e of a layer sits in the layer's first slot
    + e, so the layer's arrays are a slice of the pool: the same memory (no copy), holding
    each expert's record, whatever order they were read in."""
    packed = models.packed("qwen3_moe", True)
    sm = load_streaming_model(packed, cache_bytes=read_manifest(packed).total_expert_bytes)
    try:
        local = sm.local
        for spec in reversed(sm.manifest.layers):
            for e in reversed(range(spec.num_experts)):
                local.slots(spec.layer, [e])
        firsts = []
        for spec in sm.manifest.layers:
            group = local._group_of[spec.layer]
            slots = [group.slot_of[(spec.layer, e)] for e in range(spec.num_experts)]
            assert slots == list(range(slots[0], slots[0] + spec.num_experts))
            firsts.append(slots[0])
            arrays = local.resident_arrays(spec.layer)
            assert arrays is not None
            for t in spec.tensors:
                pool = group.pool.arrays[t.name]
                assert arrays[t.name].shape == (spec.num_experts, *t.shape)
                assert address_of(array_bytes(arrays[t.name])) == address_of(array_bytes(pool)) + slots[0] * t.nbytes
            record = local.store.read(spec.layer, 5)
            for t in spec.tensors:
                assert bytes(array_bytes(arrays[t.name][5])) == bytes(record[t.offset : t.offset + t.nbytes])
        assert len(set(firsts)) == len(firsts)
    finally:
        sm.close()


def test_a_failed_generation_leaves_nothing_deferred(models):
    packed = models.packed("qwen3_moe", True)
    src = models.src("qwen3_moe", True)
    sm = load_streaming_model(packed, cache_bytes=read_manifest(packed).total_expert_bytes)
    try:
        cache_everything(sm)
        before = sm.local.stats.experts_from_cache

        def fail(_token):
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            generate(sm, encode(models, src, PROMPT), max_tokens=MAX_TOKENS, on_token=fail)
        assert sm.local._unsettled == []
        # The choices of the graphs already started (the prompt's, the next token's) are counted.
        assert sm.local.stats.experts_from_cache > before
    finally:
        sm.close()


def test_deferred_choices_are_counted_once_computed_and_never_pile_up(models):
    packed = models.packed("qwen3_moe", True)
    sm = load_streaming_model(packed, cache_bytes=read_manifest(packed).total_expert_bytes)
    try:
        cache_everything(sm)
        local = sm.local
        before = local.stats.experts_from_cache
        local.defer_hits(0, mx.array([[1, 2], [2, 3]], dtype=mx.uint32))
        # The first settle after a choice leaves it (its token's graph may still be computing),
        # and choices are read back SETTLE_EVERY tokens at a time (each read-back waits).
        for _ in range(SETTLE_EVERY):
            local.settle()
            assert local.stats.experts_from_cache == before
        local.settle()
        assert local.stats.experts_from_cache == before + 3
        for _ in range(MAX_UNSETTLED + 1):
            local.defer_hits(0, mx.array([[1, 2]], dtype=mx.uint32))
        # Past the cap the oldest are counted; the newest two tokens' worth (one per MoE
        # layer each), which may still be computing, are left.
        kept = 2 * len(sm.manifest.layers)
        assert len(local._unsettled) == kept
        assert local.stats.experts_from_cache == before + 3 + 2 * (MAX_UNSETTLED + 1 - kept)
    finally:
        sm.close()


def test_the_cap_on_deferred_choices_leaves_room_for_a_deep_models_batch(models, monkeypatch):
    """With many resident layers, SETTLE_EVERY tokens of choices exceed MAX_UNSETTLED: the
    cap must not count them early (each early count waits for the graph in flight)."""
    packed = models.packed("qwen3_moe", True)
    sm = load_streaming_model(packed, cache_bytes=read_manifest(packed).total_expert_bytes)
    try:
        cache_everything(sm)
        local = sm.local
        layers = MAX_UNSETTLED // SETTLE_EVERY + 8  # more layers than the plain cap has room for
        monkeypatch.setattr(local, "_num_experts", {i: 8 for i in range(layers)})
        before = local.stats.experts_from_cache
        choice = mx.array([[1, 2]], dtype=mx.uint32)
        for _ in range(MAX_UNSETTLED + 1):
            local.defer_hits(0, choice)
        assert len(local._unsettled) == MAX_UNSETTLED + 1 and local.stats.experts_from_cache == before
    finally:
        local.drop_unsettled()
        sm.close()
