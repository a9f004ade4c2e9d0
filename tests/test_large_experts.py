"""Experts large enough to be read on the I/O threads: each miss is computed as soon as its
read lands, while the others are still read. Same tokens as mlx-lm; a corrupted expert is
still never computed with."""

from __future__ import annotations

import shutil

import mlx.core as mx
import pytest
from conftest import encode, mlx_lm_tokens
from test_bad_input import assert_corrupted_expert_never_computed

from edgemoe.coordinator.dispatch import LayerDispatch
from edgemoe.coordinator.generate import generate
from edgemoe.coordinator.loader import load_streaming_model
from edgemoe.node.manifest import read_manifest
from edgemoe.node.store import INLINE_READ_BYTES

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
