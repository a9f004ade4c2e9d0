"""The packed, streaming model generates exactly what mlx-lm generates from the source model."""

from __future__ import annotations

import json
import os

import mlx.core as mx
import pytest
from conftest import (
    LONG_PROMPT,
    MAX_TOKENS,
    PROMPT,
    SUPPORTED_ARCHS,
    encode,
    mlx_lm_experts_per_token_config,
    mlx_lm_tokens,
    run_cli,
)

from edgemoe.coordinator.generate import generate
from edgemoe.coordinator.loader import load_streaming_model

QUANT = [pytest.param(True, id="q4"), pytest.param(False, id="f32")]
BUDGETS = ("one", "middle", "all")
STATS_KEYS = (
    "prompt_tokens",
    "generated_tokens",
    "tokens_per_s",
    "cache_hit_rate",
    "ssd_bytes_read",
    "ssd_read_gbps",
    "peak_rss_bytes",
)


def budget_bytes(manifest, which: str) -> int:
    return {
        "one": manifest.expert_bytes,
        "middle": manifest.total_expert_bytes // 4,
        "all": manifest.total_expert_bytes,
    }[which]


def stream(packed, prompt_ids, which="all", policy="lfu", experts_per_token=None, max_inflight=None,
           io_mode="auto", prefetch=False, **kw):
    """Generates on the packed model; returns (result, the streaming model's cache/store counters)."""
    from edgemoe.node.manifest import read_manifest

    cache_bytes = budget_bytes(read_manifest(packed), which)
    extra = {} if max_inflight is None else {"max_inflight_experts": max_inflight}
    sm = load_streaming_model(packed, cache_bytes=cache_bytes, cache_policy=policy,
                              experts_per_token=experts_per_token, io_mode=io_mode, prefetch=prefetch,
                              **extra)
    try:
        result = generate(sm, prompt_ids, max_tokens=kw.pop("max_tokens", MAX_TOKENS), **kw)
        return result, sm
    finally:
        sm.close()


@pytest.fixture
def chunked_calls(monkeypatch):
    """Counts calls of the streaming layer's path that fetches a layer's experts in groups."""
    from edgemoe.coordinator.dispatch import LayerDispatch

    calls = {"n": 0}
    original = LayerDispatch._chunked

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LayerDispatch, "_chunked", counting)
    return calls


# (cache policy, experts fetched at once: None is the default, larger than a tiny model's 16)
RUNS = [("lfu", None), ("lru", None), ("lfu", 3), ("lru", 1)]


@pytest.mark.parametrize("quantized", QUANT)
@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_same_tokens_as_mlx_lm_for_every_cache_budget(models, arch, quantized, chunked_calls):
    src = models.src(arch, quantized)
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, models=models)
    assert len(expected) > 1
    packed = models.packed(arch, quantized)
    for which in BUDGETS:
        for policy, inflight in RUNS:
            chunked_calls["n"] = 0
            result, sm = stream(packed, prompt, which, policy, max_inflight=inflight)
            assert result.token_ids == expected, f"budget {which}, policy {policy}, max inflight {inflight}"
            # K=4 experts per token: a group of 3 or 1 splits every layer call.
            assert (chunked_calls["n"] > 0) == (inflight is not None)
            local, store = sm.local, sm.local.store
            assert local.cache_bytes_used <= local.budget_bytes
            asked = local.stats.experts_from_cache + local.stats.experts_from_ssd
            assert local.cache_stats.hits + local.cache_stats.misses == asked
            assert store.stats.reads == sm.local.stats.experts_from_ssd
            if which == "all":
                # Everything fits: every expert comes off the SSD at most once.
                assert store.stats.reads == store.stats.verified
                assert result.stats.ssd_bytes_read <= sm.manifest.total_expert_bytes
            if which == "one":
                # One expert of cache cannot hold a layer's K experts: experts are re-read.
                assert store.stats.reads > store.stats.verified
                assert local.cached_experts <= 1


@pytest.mark.parametrize("quantized", QUANT)
@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_in_place_pack_same_tokens_as_mlx_lm(models, arch, quantized):
    src = models.src(arch, quantized)
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, models=models)
    packed = models.packed(arch, quantized, in_place=True)
    for which in BUDGETS:
        result, _ = stream(packed, prompt, which)
        assert result.token_ids == expected, f"budget {which}"


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_prefetch_same_tokens_as_mlx_lm(models, arch):
    """Prefetch asks the kernel to read guessed experts ahead (buffered files), or reads them
    early into spare slots (direct I/O); a wrong guess must cost only time."""
    src = models.src(arch, True)
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, models=models)
    # Slots on qwen3_moe alone: the way a guess is read is the same for every architecture.
    for io_mode in ("buffered", "direct") if arch == "qwen3_moe" else ("buffered",):
        for which in BUDGETS:
            result, sm = stream(models.packed(arch, True), prompt, which, io_mode=io_mode, prefetch=True)
            assert result.token_ids == expected, f"budget {which}, {io_mode} I/O"
            assert sm.local.store.can_advise == (io_mode == "buffered" and hasattr(os, "posix_fadvise"))
            s = result.stats
            if mx.default_device() != mx.cpu and io_mode == "direct":
                # Off the CPU the loader runs without prefetch into slots (not exact there, see README).
                assert s.experts_prefetched == 0
                continue
            # With every expert cached for good, layers compute from their resident table
            # (no host round trip) and guess nothing: the tokens are all that must hold there.
            assert which == "all" or s.prefetch_accuracy is not None
            if which == "one":
                assert s.experts_prefetched > 0 and s.experts_prefetch_used > 0
            assert 0 <= s.experts_prefetch_used <= s.experts_prefetched
            # Every expert a layer asked for came from exactly one place.
            asked = sm.local.stats.experts_from_cache + sm.local.stats.experts_from_ssd + sm.local.stats.prefetch_used
            assert asked == sm.local.cache_stats.hits + sm.local.cache_stats.misses


@pytest.mark.parametrize("in_place", [False, True], ids=["packed", "in-place"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_direct_io_same_tokens_as_mlx_lm(models, arch, in_place):
    """Direct I/O reads aligned windows through a bounce buffer; in place the tensors sit at unaligned offsets."""
    src = models.src(arch, True)
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, models=models)
    for which in ("one", "all"):
        result, sm = stream(models.packed(arch, True, in_place=in_place), prompt, which, io_mode="direct")
        assert sm.local.store.direct
        assert result.stats.direct_io
        # This machine's file system takes O_DIRECT: every file is really read around the page cache.
        assert set(result.stats.io_modes.values()) == {"direct"}, result.stats.io_modes
        assert sm.local.store.any_direct  # what the prefetch goes by (its guesses on the I/O threads)
        assert len(result.stats.io_modes) == len(sm.manifest.files)
        assert result.token_ids == expected, f"budget {which}"


@pytest.mark.parametrize("refuses", ["open", "read"])
def test_direct_io_refused_by_the_file_system_reads_buffered_and_says_so(models, monkeypatch, caplog, refuses):
    """A file system without O_DIRECT (refused at open, or accepted at open and refused on read,
    as some network and FUSE file systems do) falls back to the page cache, visibly.

    tmpfs refused O_DIRECT before Linux 6.6 and takes it since, so the refusal is simulated."""
    import errno
    import fcntl
    import os

    from edgemoe.node import direct_io, store

    real_open, real_preadv = os.open, os.preadv

    def refusing_open(path, flags, *args, **kwargs):
        if flags & direct_io.O_DIRECT and refuses == "open":
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    def refusing_preadv(fd, buffers, offset, *args):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & direct_io.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset, *args)

    monkeypatch.setattr(store.os, "open", refusing_open)
    monkeypatch.setattr(store.os, "preadv", refusing_preadv)
    src = models.src("qwen3_moe", True)
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, models=models)
    caplog.set_level("WARNING", logger="edgemoe.node.direct_io")
    result, sm = stream(models.packed("qwen3_moe", True), prompt, "one", io_mode="direct")
    assert result.stats.direct_io  # asked for
    assert set(result.stats.io_modes.values()) == {"buffered"}, result.stats.io_modes  # in effect
    assert not sm.local.store.any_direct
    assert any("through the page cache" in r.getMessage() for r in caplog.records)
    assert result.token_ids == expected


@pytest.mark.parametrize("quantized", QUANT)
@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_fewer_experts_per_token_same_as_mlx_lm_with_that_k(models, arch, quantized):
    src = models.src(arch, quantized)
    prompt = encode(models, src, PROMPT)
    packed = models.packed(arch, quantized)
    full_k, _ = mlx_lm_tokens(src, prompt, models=models)
    answers = {}
    for k in (1, 2):
        expected, _ = mlx_lm_tokens(src, prompt, model_config=mlx_lm_experts_per_token_config(src, k))
        result, sm = stream(packed, prompt, "middle", experts_per_token=k)
        assert result.token_ids == expected, f"K={k}"
        answers[k] = expected
    # The override really changed the routing (else this test could not fail).
    assert answers[1] != full_k or answers[2] != full_k


@pytest.mark.parametrize("quantized", QUANT)
@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_long_prompt_takes_mlx_lms_sorted_gather_path(models, arch, quantized, monkeypatch):
    from mlx_lm.models import switch_layers

    calls = {"n": 0}
    original = switch_layers._gather_sort

    def counting(x, indices):
        calls["n"] += 1
        return original(x, indices)

    monkeypatch.setattr(switch_layers, "_gather_sort", counting)
    src = models.src(arch, quantized)
    prompt = encode(models, src, LONG_PROMPT)
    # Prefill runs prompt[:-1] in one chunk; at K=1 that is still > 64 token-expert pairs.
    assert len(prompt) - 1 > 64
    packed = models.packed(arch, quantized)
    for k in (None, 1):
        model_config = None if k is None else mlx_lm_experts_per_token_config(src, k)
        calls["n"] = 0
        expected, _ = mlx_lm_tokens(src, prompt, max_tokens=8, model_config=model_config, models=models)
        assert calls["n"] > 0, "mlx-lm did not sort: the prompt is too short to test the sorted path"
        for inflight in (None, 5):
            calls["n"] = 0
            result, _ = stream(packed, prompt, "middle", experts_per_token=k, max_tokens=8, max_inflight=inflight)
            # A group of 5 of 16 experts at K=1 gets fewer than 64 rows, and is padded to sort as
            # the whole call would (CUDA's unsorted float32 kernel rounds differently).
            assert calls["n"] > 0, "the streaming model did not take the sorted path"
            assert result.token_ids == expected, f"K={k}, max inflight {inflight}"


@pytest.mark.slow
def test_prompt_longer_than_mlx_lms_prefill_step_same_tokens(models, monkeypatch):
    """A prompt over 2048 tokens is prefilled in chunks (mlx-lm's prefill_step_size): the
    cache carries over between chunks and the streaming layers see 2048-row batches."""
    from mlx_lm.models import qwen3_moe

    calls: list[int] = []
    original = qwen3_moe.Model.__call__

    def counting(self, inputs, *args, **kwargs):
        calls.append(inputs.shape[1])
        return original(self, inputs, *args, **kwargs)

    monkeypatch.setattr(qwen3_moe.Model, "__call__", counting)
    src = models.src("qwen3_moe", True)
    prompt = encode(models, src, " ".join([LONG_PROMPT] * 40))[:2300]
    assert len(prompt) == 2300
    expected, _ = mlx_lm_tokens(src, prompt, max_tokens=8, models=models)
    assert calls[:2] == [2048, 2300 - 1 - 2048], f"mlx-lm did not prefill in chunks: {calls[:3]}"
    calls.clear()
    result, _ = stream(models.packed("qwen3_moe", True), prompt, "middle", max_tokens=8)
    assert calls[:2] == [2048, 2300 - 1 - 2048], f"the streaming model was not prefilled in chunks: {calls[:3]}"
    assert result.token_ids == expected


def test_sampling_with_temperature_top_p_and_seed_same_as_mlx_lms_sampler(models):
    """mlx-lm's own sampler (make_sampler(temp, top_p) after mx.random.seed) on the source model
    draws exactly our tokens, for each setting; and each setting changes what is drawn."""
    src = models.src("qwen3_moe", True)
    prompt = encode(models, src, PROMPT)
    packed = models.packed("qwen3_moe", True)
    greedy, _ = mlx_lm_tokens(src, prompt, models=models)
    drawn = {}
    for temp, top_p, seed in [(1.0, 1.0, 7), (1.0, 1.0, 8), (1.0, 0.3, 7)]:
        expected, _ = mlx_lm_tokens(src, prompt, temp=temp, top_p=top_p, seed=seed, models=models)
        result, _ = stream(packed, prompt, "middle", temp=temp, top_p=top_p, seed=seed)
        assert result.token_ids == expected, f"temp {temp}, top_p {top_p}, seed {seed}"
        drawn[top_p, seed] = expected
    # The seed and top_p each change the draw (else this test could not catch one ignored).
    assert drawn[1.0, 7] != greedy
    assert drawn[1.0, 7] != drawn[1.0, 8]
    assert drawn[1.0, 7] != drawn[0.3, 7]


def test_comparison_detects_a_wrong_expert(models, monkeypatch):
    """Guards the tests above: handing compute a neighbouring expert's weights changes the tokens."""
    from edgemoe.node.local import LocalExperts

    src = models.src("qwen3_moe", True)
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, models=models)
    original = LocalExperts.start_slots

    def shifted(self, layer, experts):
        num = self.manifest.layer(layer).num_experts
        return original(self, layer, [(e + 1) % num for e in experts])

    # every path to a slot goes through start_slots (slots waits on it)
    monkeypatch.setattr(LocalExperts, "start_slots", shifted)
    result, _ = stream(models.packed("qwen3_moe", True), prompt, "all")
    assert result.token_ids != expected


def test_stats_count_what_happened(models):
    src = models.src("mixtral", True)
    prompt = encode(models, src, PROMPT)
    packed = models.packed("mixtral", True)
    result, sm = stream(packed, prompt, "all")
    s = result.stats
    assert s.prompt_tokens == len(prompt)
    assert s.generated_tokens == len(result.token_ids)
    assert s.cache_hits + s.cache_misses == s.experts_from_cache + s.experts_from_ssd
    assert s.cache_hit_rate == pytest.approx(s.cache_hits / (s.cache_hits + s.cache_misses))
    assert s.experts_from_ssd == s.cache_misses
    record = sm.manifest.layers[0].record_bytes
    assert all(spec.record_bytes == record for spec in sm.manifest.layers)
    assert s.ssd_bytes_read == s.experts_from_ssd * record
    # A second generation on the same (warm, all-holding) cache reads nothing new
    # for experts it already has.
    sm2 = load_streaming_model(packed, cache_bytes=sm.manifest.total_expert_bytes)
    try:
        first = generate(sm2, prompt, max_tokens=MAX_TOKENS)
        second = generate(sm2, prompt, max_tokens=MAX_TOKENS)
    finally:
        sm2.close()
    assert second.token_ids == first.token_ids == result.token_ids
    assert second.stats.ssd_bytes_read == 0
    assert second.stats.cache_hit_rate == 1.0
    assert first.stats.cache_hit_rate < 1.0


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def cli_packed(models, tmp_path_factory):
    """A model packed by the real `edgemoe pack`."""
    src = models.src("qwen3_moe", True)
    dst = tmp_path_factory.mktemp("cli") / "packed"
    out = run_cli("pack", src, dst)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    return src, dst


@pytest.mark.parametrize("map_experts", ["off", "auto"])
def test_cli_generate_json_same_tokens_as_mlx_lm(models, cli_packed, map_experts):
    """`auto` (the default) maps the experts where it can (test_mapped.py, test_page_cache_mapped.py):
    on CUDA it does here, and then reads them all at load, none while generating."""
    src, dst = cli_packed
    out = run_cli("generate", "--model", dst, "--prompt", PROMPT, "--json", "--no-chat-template",
                  "--max-tokens", MAX_TOKENS, "--cache-mb", 0.05, "--map-experts", map_experts)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data) >= {"text", "token_ids", "stats"}
    assert set(data["stats"]) >= set(STATS_KEYS)
    prompt = encode(models, src, PROMPT)
    expected, expected_text = mlx_lm_tokens(src, prompt, models=models)
    assert data["token_ids"] == expected
    assert data["text"] == expected_text
    stats = data["stats"]
    assert stats["prompt_tokens"] == len(prompt)
    assert stats["generated_tokens"] == len(expected)
    assert 0.0 <= stats["cache_hit_rate"] <= 1.0
    assert stats["tokens_per_s"] > 0 and stats["peak_rss_bytes"] > 0
    if map_experts == "off":
        assert stats["ssd_bytes_read"] > 0 and stats["ssd_read_gbps"] > 0
        # `--prefetch auto` (the default): the kernel reads small experts ahead (test_readahead.py).
        assert (stats["experts_prefetched"] > 0) == hasattr(os, "posix_fadvise")


@pytest.mark.parametrize("prefetch", ["off", "on"])
def test_cli_prefetch_same_tokens_as_mlx_lm(models, cli_packed, prefetch):
    src, dst = cli_packed
    out = run_cli("generate", "--model", dst, "--prompt", PROMPT, "--json", "--no-chat-template", "--max-tokens",
                  MAX_TOKENS, "--cache-mb", 0.05, "--map-experts", "off", "--prefetch", prefetch)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    expected, _ = mlx_lm_tokens(src, encode(models, src, PROMPT), models=models)
    assert data["token_ids"] == expected
    assert (data["stats"]["experts_prefetched"] > 0) == (prefetch == "on")


def test_cli_generate_with_chat_template_same_as_mlx_lm(models, cli_packed):
    src, dst = cli_packed
    out = run_cli("generate", "--model", dst, "--prompt", PROMPT, "--json", "--max-tokens", MAX_TOKENS)
    assert out.returncode == 0, out.stderr
    tokenizer = models.mlx_lm_model(src)[1]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    assert prompt != encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, models=models)
    data = json.loads(out.stdout)
    assert data["token_ids"] == expected
    assert data["stats"]["prompt_tokens"] == len(prompt)


def test_cli_experts_per_token_same_as_mlx_lm(models, cli_packed):
    src, dst = cli_packed
    out = run_cli("generate", "--model", dst, "--prompt", LONG_PROMPT, "--json", "--no-chat-template",
                  "--max-tokens", 12, "--experts-per-token", 2)
    assert out.returncode == 0, out.stderr
    prompt = encode(models, src, LONG_PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, max_tokens=12, model_config={"num_experts_per_tok": 2})
    assert json.loads(out.stdout)["token_ids"] == expected


def test_cli_in_place_pack_same_tokens_as_mlx_lm(models, tmp_path):
    src = models.src("gpt_oss", False)
    dst = tmp_path / "inplace"
    out = run_cli("pack", src, dst, "--in-place")
    assert out.returncode == 0, out.stderr
    assert "in place" in out.stdout
    assert not list((dst / "experts").glob("*.bin"))
    out = run_cli("generate", "--model", dst, "--prompt", PROMPT, "--json", "--no-chat-template",
                  "--max-tokens", MAX_TOKENS)
    assert out.returncode == 0, out.stderr
    expected, _ = mlx_lm_tokens(src, encode(models, src, PROMPT), models=models)
    assert json.loads(out.stdout)["token_ids"] == expected


def test_cli_text_streaming_prints_text_and_one_summary_line(models, cli_packed):
    src, dst = cli_packed
    out = run_cli("generate", "--model", dst, "--prompt", PROMPT, "--no-chat-template", "--max-tokens", MAX_TOKENS)
    assert out.returncode == 0, out.stderr
    expected, expected_text = mlx_lm_tokens(src, encode(models, src, PROMPT), models=models)
    assert expected_text.strip()
    assert out.stdout == expected_text + "\n"
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"{len(expected)} tokens at ")
    assert "tok/s" in lines[0] and "cache hit rate" in lines[0]


def test_hugging_face_layout_source_same_tokens_as_mlx_lm(models, tmp_path):
    """A source with per-expert tensors (mlx-lm stacks them on load) packs to the same answers."""
    from conftest import write_large_moe_source

    from edgemoe.coordinator.pack import pack

    src = write_large_moe_source(tmp_path / "hf", num_layers=3, num_experts=8, hidden_size=64,
                                 moe_intermediate_size=32, stacked=False)
    header = (src / "model.safetensors").open("rb").read(1 << 16).decode("latin-1")
    assert ".switch_mlp." not in header
    pack(src, tmp_path / "packed")
    prompt = encode(models, models.src(), PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt)
    for which in BUDGETS:
        result, _ = stream(tmp_path / "packed", prompt, which)
        assert result.token_ids == expected, f"budget {which}"
