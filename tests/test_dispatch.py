"""The per-layer dispatcher: one local path whether or not nodes are configured, remote and
local work in the same layer merged in the router's order."""

from __future__ import annotations

import os
import signal

import mlx.core as mx
import numpy as np
import pytest
from conftest import PROMPT, encode, mlx_lm_tokens
from nodes import NodeProcess, coordinator, wait_for_placement

from edgemoe.coordinator.counters import snapshot
from edgemoe.coordinator.dispatch import LayerDispatch
from edgemoe.coordinator.generate import generate
from edgemoe.coordinator.loader import load_streaming_model
from edgemoe.node.credentials import ClusterCredentials, format_token, new_secret
from edgemoe.node.manifest import read_manifest

MAX_TOKENS = 12


@pytest.fixture
def calls(monkeypatch):
    """How often each of the dispatcher's paths ran, and the (local, remote) split of each split layer."""
    seen = {"_as_read": 0, "_chunked": 0, "splits": []}
    for name in ("_as_read", "_chunked"):
        original = getattr(LayerDispatch, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            seen[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(LayerDispatch, name, counting)
    original_pairs = LayerDispatch._pairs

    def split_local(self, hidden, rows, experts, sort):
        seen["splits"].append(len(rows))
        return original_pairs(self, hidden, rows, experts, sort)

    monkeypatch.setattr(LayerDispatch, "_pairs", split_local)
    return seen


def _run(packed, prompt, budget, peers=None, credentials=None):
    sm = load_streaming_model(packed, cache_bytes=budget, io_mode="direct", prefetch=True, peers=peers,
                              credentials=credentials, node_timeout_s=0.5)
    try:
        before = snapshot(sm)
        result = generate(sm, prompt, max_tokens=MAX_TOKENS)
        return result.token_ids, snapshot(sm) - before
    finally:
        sm.close()


def test_a_dead_peer_leaves_the_single_machine_path_as_it_is(models, large, calls):
    """With every node down, each layer runs the path of `--peers none`: the same reads,
    hits, prefetches and misses computed as they land, nothing sent, nothing split."""
    src, packed = large
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, max_tokens=MAX_TOKENS, models=models)
    budget = 3 * read_manifest(packed).expert_bytes
    alone_tokens, alone = _run(packed, prompt, budget)
    alone_paths = dict(calls)
    calls.update(_as_read=0, _chunked=0)
    # Nothing listens on port 9 of loopback.
    creds = ClusterCredentials.create(new_secret(), "coordinator")
    dead_tokens, dead = _run(packed, prompt, budget, peers=["127.0.0.1:9"], credentials=creds)
    assert alone_tokens == dead_tokens == expected
    # Direct I/O: misses were computed as they landed (on the CPU; on a GPU that path is off).
    assert (alone_paths["_as_read"] > 0) == (mx.default_device() == mx.cpu)
    assert (calls["_as_read"], calls["_chunked"]) == (alone_paths["_as_read"], alone_paths["_chunked"])
    assert calls["splits"] == []
    for field in ("experts_from_cache", "experts_from_ssd", "ssd_bytes_read", "experts_prefetched",
                  "experts_prefetch_used", "prefetch_guessed", "prefetch_guessed_right", "cache_hits"):
        assert getattr(dead, field) == getattr(alone, field), field
    # --prefetch into slots (direct I/O) runs on the CPU only (the loader turns it off elsewhere).
    assert (alone.experts_prefetched > 0) == (mx.default_device() == mx.cpu)
    assert dead.peer_calls == dead.experts_from_peers == dead.fallbacks == 0


def test_layers_split_between_a_node_and_this_machine_keep_mlx_lms_tokens(models, tmp_path, calls):
    src, packed = models.src("qwen3_moe", True), models.packed("qwen3_moe", True)
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, max_tokens=MAX_TOKENS, models=models)
    manifest = read_manifest(packed)
    token = format_token(new_secret())
    # The node holds half the experts, this machine caches a few: most layers have both kinds of work.
    node = NodeProcess(token, tmp_path / "node", cache_mb=manifest.total_expert_bytes / 2 / 2**20)
    try:
        sm = coordinator(packed, token, [node.address], 4 * manifest.expert_bytes)
        try:
            wait_for_placement(sm)
            result = generate(sm, prompt, max_tokens=MAX_TOKENS)
            stats = sm.cluster.stats
        finally:
            sm.close()
    finally:
        node.stop(signal.SIGKILL)
    assert result.token_ids == expected
    assert stats.experts_from_peers > 0 and stats.fallbacks == 0
    # Layers that sent work to the node also computed pairs here, in the same layer call.
    assert len(calls["splits"]) > 0 and all(n > 0 for n in calls["splits"])
    assert stats.peer_layers > 0



def test_every_reply_of_an_honest_node_audited_is_bit_for_bit_this_machines(models, tmp_path):
    """A real edge-node on this machine's backend: its held-checksums digest is the manifest's
    (it is used at all), and with `--audit 1` every reply recomputed here is the same bits."""
    src, packed = models.src("qwen3_moe", True), models.packed("qwen3_moe", True)
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, max_tokens=MAX_TOKENS, models=models)
    manifest = read_manifest(packed)
    token = format_token(new_secret())
    node = NodeProcess(token, tmp_path / "node", cache_mb=manifest.total_expert_bytes / 2**20)
    try:
        sm = coordinator(packed, token, [node.address], manifest.expert_bytes, audit_rate=1.0)
        try:
            wait_for_placement(sm)
            result = generate(sm, prompt, max_tokens=MAX_TOKENS)
            stats, peer = sm.cluster.stats, sm.cluster.peers[0]
            snap = sm.cluster.snapshot()
        finally:
            sm.close()
    finally:
        node.stop(signal.SIGKILL)
    assert result.token_ids == expected
    assert peer.distrusted == "" and stats.fallbacks == 0
    assert stats.audits == stats.peer_calls > 0 and stats.audit_failures == 0
    assert (snap["audits"], snap["audit_failures"]) == (stats.audits, 0)


def test_a_few_pairs_of_a_call_mlx_lm_sorts_are_computed_on_its_sorted_path(models, monkeypatch):
    """Padded with a spare slot's rows to mlx-lm's sort threshold, a part of a sorted call
    sorts too, and gives the bits of those pairs in the whole call."""
    from mlx_lm.models import switch_layers

    from edgemoe.coordinator.bench.decode import cache_everything
    from edgemoe.coordinator.loader import load_streaming_model
    from edgemoe.node.compute import SORT_MIN_PAIRS, input_dims
    from edgemoe.node.manifest import read_manifest

    sorts = []
    original = switch_layers._gather_sort
    monkeypatch.setattr(switch_layers, "_gather_sort", lambda x, i: sorts.append(i.size) or original(x, i))
    packed = models.packed("qwen3_moe", False)
    sm = load_streaming_model(packed, cache_bytes=read_manifest(packed).total_expert_bytes)
    try:
        cache_everything(sm)
        dispatch = sm.dispatchers[0]
        table = np.array([sm.local._group_of[dispatch.layer].slot_of[(dispatch.layer, e)]
                          for e in range(dispatch.kernel.spec.num_experts)])
        n = SORT_MIN_PAIRS + 16
        x = mx.random.normal((n, input_dims(dispatch.kernel)), key=mx.random.key(0))
        slots = table[np.arange(n) % table.size][:, None].astype(np.uint32)
        whole = dispatch.kernel(x, slots)
        part = dispatch.kernel(x[:10], slots[:10], sort=True)
        assert sorts == [n, SORT_MIN_PAIRS]
        assert part.shape == (10, *whole.shape[1:])
        assert np.array_equal(np.array(part), np.array(whole[:10]))
        dispatch.kernel(x[:10], slots[:10])
        assert len(sorts) == 2  # unasked, a small call does not sort (mlx-lm's own rule)
    finally:
        sm.close()


def test_the_prefetch_guess_is_the_next_routers_top_experts_on_this_layers_input(models, monkeypatch):
    """Each decode layer has the kernel read ahead the next layer's experts that its router
    ranks highest on this layer's input, 2K of them (buffered files). The guess is made with
    this layer's routing, before its experts are queued: made after them, reading it back
    waited for their compute."""
    from edgemoe.coordinator import dispatch

    src, packed = models.src("qwen3_moe", True), models.packed("qwen3_moe", True)
    prompt = encode(models, src, PROMPT)
    budget = 2 * read_manifest(packed).expert_bytes
    calls, inputs, events, current = [], {}, [], []
    original_call, original_prefetch = LayerDispatch.__call__, LayerDispatch._prefetch_next

    def recording_call(self, x, indices):
        inputs[self.layer] = x
        current.append(self.layer)
        try:
            return original_call(self, x, indices)
        finally:
            current.pop()

    def recording_prefetch(self, guess):
        if guess is not None:
            calls.append((self.layer, self.prefetch.next_layer.layer, sorted(guess), inputs[self.layer]))
        return original_prefetch(self, guess)

    class QueueRecordingMx:
        """mlx.core, noting which layer's call each `async_eval` (a layer's experts queued) is in."""

        def __getattr__(self, name):
            return getattr(mx, name)

        @staticmethod
        def async_eval(*arrays):
            events.append(("queued", current[-1]))
            return mx.async_eval(*arrays)

    monkeypatch.setattr(LayerDispatch, "__call__", recording_call)
    monkeypatch.setattr(LayerDispatch, "_prefetch_next", recording_prefetch)
    monkeypatch.setattr(dispatch, "mx", QueueRecordingMx())
    sm = load_streaming_model(packed, cache_bytes=budget, io_mode="buffered", prefetch=True)
    for d in sm.dispatchers:
        if d.prefetch is not None:
            d.prefetch.logits = _recording_guess(d.prefetch.logits, d.layer, events)
    try:
        calls.clear()  # the loader's warm-up decodes too
        events.clear()
        generate(sm, prompt, max_tokens=4)
        layers = sm.model.model.layers
        # Readahead guesses 2K; without posix_fadvise (macOS) K go into spare slots.
        width = (2 if sm.local.store.can_advise else 1) * sm.config["num_experts_per_tok"]
        assert sm.local.prefetch_width == width
        assert sm.local.store.can_advise == hasattr(os, "posix_fadvise")
        # Decode steps only (one row), each guessing into every layer but the first.
        assert calls and len(calls) % (len(layers) - 1) == 0
        for layer, following, guess, x in calls:
            logits = np.array(layers[following].mlp.gate(x.reshape(-1, x.shape[-1])[-1:])[0].astype(mx.float32))
            assert guess == sorted(np.argsort(-logits)[:width].tolist()), (layer, following)
        for layer in {layer for layer, *_ in calls}:
            mine = [kind for kind, at in events if at == layer]
            # The prompt's pass guesses nothing; each decode step guesses, then queues its experts.
            assert mine[0] == "queued" and mine[1:] == ["guess", "queued"] * ((len(mine) - 1) // 2), layer
    finally:
        sm.close()


def _recording_guess(logits, layer, events):
    def recorded(x):
        events.append(("guess", layer))
        return logits(x)
    return recorded
