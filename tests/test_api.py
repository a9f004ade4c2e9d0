"""The Python API: `edgemoe.load` gives a model mlx-lm's own generate runs, with mlx-lm's tokens."""

from __future__ import annotations

import mlx.core as mx
import pytest
from conftest import MAX_TOKENS, PROMPT, encode, mlx_lm_tokens
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

import edgemoe
from edgemoe.node.manifest import read_manifest


def test_load_runs_under_mlx_lm_stream_generate_with_mlx_lm_tokens(models):
    src, packed = models.src("qwen3_moe", True), models.packed("qwen3_moe", True)
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, models=models)
    one_expert = read_manifest(packed).expert_bytes
    model, tokenizer = edgemoe.load(packed, cache_mb=4 * one_expert / 2**20)
    try:
        before = edgemoe.stats(model)
        tokens = [r.token for r in stream_generate(model, tokenizer, mx.array(prompt), max_tokens=MAX_TOKENS,
                                                    sampler=make_sampler(temp=0.0))]
        after = edgemoe.stats(model)
    finally:
        edgemoe.close(model)
    assert tokens == expected
    # A cache of 4 experts cannot hold a layer's routing: the SSD served some, the cache some.
    assert after["experts_from_ssd"] > before["experts_from_ssd"]
    assert after["cache_hits"] > before["cache_hits"]
    assert after["ssd_bytes_read"] == before["ssd_bytes_read"] + one_expert * (
        after["experts_from_ssd"] - before["experts_from_ssd"])
    assert after["cache_bytes_used"] <= after["cache_budget_bytes"] <= 4 * one_expert
    assert "cluster" not in after


def test_load_with_mlx_lm_generate_and_a_dead_peer_keeps_the_tokens(models, tmp_path):
    from mlx_lm import generate

    from edgemoe.node.credentials import init_cluster

    src, packed = models.src("mixtral", True), models.packed("mixtral", True)
    prompt = encode(models, src, PROMPT)
    expected, text = mlx_lm_tokens(src, prompt, models=models)
    init_cluster(tmp_path)
    # Nothing listens on port 9 of loopback: the peer is configured but down.
    model, tokenizer = edgemoe.load(packed, peers=["127.0.0.1:9"], cluster_dir=tmp_path, node_timeout_s=0.5)
    try:
        out = generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS, sampler=make_sampler(temp=0.0))
        stats = edgemoe.stats(model)
    finally:
        edgemoe.close(model)
    assert out == text
    assert stats["cluster"]["nodes"][0]["healthy"] is False
    assert stats["peer_calls"] == 0 and stats["experts_from_peers"] == 0


def test_stats_of_another_model_is_a_clear_error(models):
    model, _ = models.mlx_lm_model(models.src("qwen3_moe", True))
    with pytest.raises(TypeError, match="edgemoe.load"):
        edgemoe.stats(model)
