"""The learned hot set (coordinator/hotset.py): routing counts kept across runs in
EDGEMOE_HOME warm the next run's cache, without changing a token."""

from __future__ import annotations

import json
import logging
import os

import pytest
from conftest import MAX_TOKENS, PROMPT, encode, mlx_lm_tokens, run_cli

import edgemoe
from edgemoe.coordinator import hotset
from edgemoe.coordinator.generate import generate
from edgemoe.coordinator.loader import load_streaming_model
from edgemoe.node.manifest import read_manifest


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """A fresh EDGEMOE_HOME per test: no test sees another's hot sets."""
    monkeypatch.setenv("EDGEMOE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def tiny(models):
    src, packed = models.src("qwen3_moe", True), models.packed("qwen3_moe", True)
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, models=models)
    return packed, prompt, expected


def run(packed, prompt, hot_set=True):
    """One run with a cache of an eighth of the experts: its tokens, the hit rate of its decode
    tokens after the first, and the experts its load warmed the cache with."""
    manifest = read_manifest(packed)
    sm = load_streaming_model(packed, cache_bytes=max(manifest.expert_bytes, manifest.total_expert_bytes // 8),
                              hot_set=hot_set)
    marks = []
    try:
        result = generate(sm, prompt, max_tokens=MAX_TOKENS,
                          on_token=lambda _: marks.append((sm.local.cache_stats.hits, sm.local.cache_stats.misses)))
        warmed = sm.hot_set.warmed if sm.hot_set is not None else None
        counts = sm.local.routing_counts()
    finally:
        sm.close()
    (h0, m0), (h1, m1) = marks[0], marks[-1]
    return result.token_ids, (h1 - h0) / ((h1 - h0) + (m1 - m0)), warmed, counts


def test_a_second_run_starts_warm_with_mlx_lm_tokens(tiny, home):
    packed, prompt, expected = tiny
    tokens1, hit_rate1, warmed1, _ = run(packed, prompt)
    path = hotset.hot_set_path(read_manifest(packed).fingerprint)
    assert path.parent == home / "hot-sets" and path.exists()
    saved = hotset.load_counts(read_manifest(packed))
    tokens2, hit_rate2, warmed2, counts2 = run(packed, prompt)
    assert tokens1 == expected and tokens2 == expected
    assert warmed1 == 0 and warmed2 > 0
    assert hit_rate2 > hit_rate1
    # The seeded history is in the counts cluster placement reads (Cluster._replan).
    assert set(hotset.seed(saved)) <= set(counts2)


def test_without_the_hot_set_nothing_is_read_or_written(tiny, home):
    packed, prompt, expected = tiny
    run(packed, prompt)
    before = hotset.hot_set_path(read_manifest(packed).fingerprint).read_bytes()
    tokens, _, warmed, _ = run(packed, prompt, hot_set=False)
    assert tokens == expected and warmed is None
    assert hotset.hot_set_path(read_manifest(packed).fingerprint).read_bytes() == before


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other model", "wrong shape", "negative"])
def test_a_damaged_hot_set_is_ignored_with_one_warning(tiny, damage, caplog):
    packed, prompt, expected = tiny
    manifest = read_manifest(packed)
    run(packed, prompt)
    path = hotset.hot_set_path(manifest.fingerprint)
    good = path.read_bytes()
    data = json.loads(good)
    first = next(iter(data["layers"]))
    if damage == "garbage":
        path.write_bytes(os.urandom(300))
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    else:
        if damage == "other model":
            data["fingerprint"] = "0" * 64
        elif damage == "wrong shape":
            data["layers"][first].append(1)
        else:
            data["layers"][first][0] = -5
        path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="edgemoe.coordinator.hotset"):
        tokens, _, warmed, _ = run(packed, prompt)
    assert tokens == expected and warmed == 0
    assert len([r for r in caplog.records if "ignoring" in r.getMessage()]) == 1
    assert hotset.load_counts(manifest)  # rewritten whole at the end of the run


def test_an_oversized_hot_set_is_ignored(tiny, monkeypatch, caplog):
    packed, prompt, _ = tiny
    manifest = read_manifest(packed)
    run(packed, prompt)
    assert hotset.load_counts(manifest)
    monkeypatch.setattr(hotset, "MAX_FILE_BYTES", 64)
    with caplog.at_level(logging.WARNING, logger="edgemoe.coordinator.hotset"):
        assert hotset.load_counts(manifest) == {}
    assert "over the 64" in caplog.text


def test_files_beyond_the_cap_are_pruned_oldest_first(tiny, home):
    packed, _, _ = tiny
    manifest = read_manifest(packed)
    folder = home / "hot-sets"
    folder.mkdir(parents=True)
    others = [folder / f"{i:064x}.json" for i in range(hotset.MAX_MODELS + 3)]
    for age, path in enumerate(others):
        path.write_text("{}")
        os.utime(path, (1000 + age, 1000 + age))
    hotset.save_counts(manifest, {(manifest.layers[0].layer, 0): 3})
    left = set(folder.glob("*.json"))
    assert len(left) == hotset.MAX_MODELS
    assert hotset.hot_set_path(manifest.fingerprint) in left
    assert left - {hotset.hot_set_path(manifest.fingerprint)} == set(others[-(hotset.MAX_MODELS - 1):])
    assert not list(folder.glob(".*"))  # no temporary file left behind


def test_seed_decays_and_bounds_the_history():
    counts = {(0, 0): 1000, (0, 1): 10, (1, 2): 1}
    seeded = hotset.seed(counts)
    assert max(seeded.values()) == hotset.SEED_MAX
    assert seeded[(0, 0)] > seeded.get((0, 1), 0) >= seeded.get((1, 2), 0)
    assert hotset.seed({(0, 0): 4, (0, 1): 2}) == {(0, 0): 2, (0, 1): 1}


def test_the_api_saves_at_close(tiny):
    packed, prompt, _ = tiny
    manifest = read_manifest(packed)
    model, tokenizer = edgemoe.load(packed, cache_mb=manifest.total_expert_bytes / 8 / 2**20)
    try:
        import mlx.core as mx
        from mlx_lm.generate import stream_generate

        for _ in stream_generate(model, tokenizer, mx.array(prompt), max_tokens=4):
            pass
    finally:
        edgemoe.close(model)
    assert hotset.load_counts(manifest)


@pytest.mark.slow
def test_cli_generate_saves_and_forget_removes(tiny):
    packed, _, _ = tiny
    path = hotset.hot_set_path(read_manifest(packed).fingerprint)
    r = run_cli("generate", "--model", packed, "--peers", "none", "--prompt", PROMPT, "--max-tokens", "4",
                "--no-hot-set")
    assert r.returncode == 0, r.stderr
    assert not path.exists()
    r = run_cli("generate", "--model", packed, "--peers", "none", "--prompt", PROMPT, "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert path.exists()
    r = run_cli("forget", "--model", packed)
    assert r.returncode == 0 and str(path) in r.stdout
    assert not path.exists()
    r = run_cli("forget", "--model", packed)
    assert r.returncode == 0 and "no learned hot set" in r.stdout


def test_a_damaged_expert_stops_the_warming_not_the_start(models, tiny, tmp_path, caplog):
    """Warming is a head start: a file failing its checksum is reported by the request that
    needs it (and serve's /health), and the model still loads."""
    from edgemoe.node.errors import EdgemoeError

    packed, prompt, _ = tiny
    run(packed, prompt)  # saves a hot set for this fingerprint
    damaged = models.copy_packed(tmp_path / "damaged")
    for path in (damaged / "experts").iterdir():
        path.write_bytes(os.urandom(path.stat().st_size))
    manifest = read_manifest(damaged)
    with caplog.at_level(logging.WARNING, logger="edgemoe"):
        sm = load_streaming_model(damaged, cache_bytes=manifest.total_expert_bytes // 8, hot_set=True)
    try:
        assert any("warming the cache stopped" in r.getMessage() and "checksum" in r.getMessage()
                   for r in caplog.records)
        with pytest.raises(EdgemoeError, match="checksum"):
            generate(sm, prompt, max_tokens=MAX_TOKENS)
    finally:
        sm.close()
