"""`edgemoe bench`: every figure is reported, and the figures agree with each other.

Wall-clock speeds are never asserted: only that ratios are their parts' ratios
and byte counts add up.
"""

import contextlib
import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import unavailable

from edgemoe.coordinator.bench import format_report
from edgemoe.coordinator.bench.decode import Mark, decode_figures
from edgemoe.coordinator.bench.disk import run_fio
from edgemoe.coordinator.counters import Counters
from edgemoe.coordinator.pack import pack
from edgemoe.coordinator.tiny_models import write_tiny_model
from edgemoe.node.manifest import DENSE_NAME, read_manifest

TOKENS = 8
# Holds 4 of the tiny model's 32 experts (4.5 KiB each): decode both hits and misses.
CACHE_MB = 0.02

REQUIRED_KEYS = [
    "raw_read_gbps", "raw_read_method", "fio_read_gbps",
    "tokens_per_s", "prompt_tokens_per_s", "cache_hit_rate", "ssd_bytes_read", "ssd_bytes_per_token",
    "expert_read_gbps",
    "ssd_bound_tokens_per_s", "read_efficiency", "bound_efficiency",
    "mlx_lm_tokens_per_s", "relative_to_mlx_lm", "same_tokens_as_mlx_lm", "mlx_lm_model",
    "dead_peer_tokens_per_s", "no_peers_tokens_per_s", "dead_peer_relative_to_no_peers",
    "dead_peer_same_tokens_as_no_peers",
    "warm_eighth_tokens_per_s", "warm_eighth_relative_to_mlx_lm", "warm_eighth_mlx_lm_tokens_per_s",
    "in_place_tokens_per_s", "in_place_expert_read_gbps", "repack_tokens_per_s_gain", "repack_read_gbps_gain",
    "decode_tokens", "prefill_ssd_bytes_read", "ssd_read_seconds", "expert_reads", "notes",
    "every_token_cold_predicted_tok_s", "warm_eighth_predicted_tok_s",
    "warm_eighth_predicted_from_cache_fraction_tok_s",
    "predict_hit_step_ms", "predict_disk_miss_gbps", "predict_page_cache_miss_gbps",
]


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def bench(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "edgemoe.coordinator.cli", "bench", *args, "--json"],
        capture_output=True, text=True, check=True, timeout=120,
    )
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bench")
    write_tiny_model(root / "src", arch="qwen3_moe", num_layers=2)
    pack(root / "src", root / "packed")
    return root / "src", root / "packed"


@pytest.fixture(scope="module")
def report(model) -> dict:
    src, packed = model
    return bench("--model", str(packed), "--cache-mb", str(CACHE_MB), "--tokens", str(TOKENS), "--in-place", str(src))


def test_every_figure_is_reported(report):
    missing = [k for k in REQUIRED_KEYS if k not in report]
    assert not missing
    for key in REQUIRED_KEYS:
        if key not in ("fio_read_gbps", "notes"):
            assert report[key] is not None, key
    if report["fio_read_gbps"] is None:
        assert any("fio" in note for note in report["notes"])


def test_same_tokens_everywhere(report, model):
    src, _ = model
    # With the source known, the reference is mlx-lm's own load of it, not our rebuild.
    assert report["mlx_lm_model"] == f"mlx_lm.load({src})"
    assert report["same_tokens_as_mlx_lm"] is True and report["same_tokens_as_rebuilt_model"] is None
    assert report["warm_eighth_same_tokens_as_cold_run"] is True
    assert report["in_place_same_tokens_as_cold_run"] is True
    assert report["dead_peer_same_tokens_as_no_peers"] is True


def test_a_packing_fault_is_caught_by_mlx_lms_own_load(model, tmp_path):
    """A dense part the packer got wrong is shared by the streaming model and a model rebuilt
    from the packed files: only mlx_lm.load(SRC) can tell."""
    src, packed = model
    broken = tmp_path / "broken"
    shutil.copytree(packed, broken)
    dense = mx.load(str(broken / DENSE_NAME))
    dense["model.norm.weight"] = -dense["model.norm.weight"]  # every logit negated: greedy picks another token
    mx.save_safetensors(str(broken / DENSE_NAME), dense)
    args = ("--model", str(broken), "--cache-mb", str(CACHE_MB), "--tokens", "4")
    rebuilt = bench(*args)
    assert rebuilt["mlx_lm_model"] == "rebuilt from the packed files"
    assert rebuilt["same_tokens_as_rebuilt_model"] is True and rebuilt["same_tokens_as_mlx_lm"] is None
    assert any("--in-place SRC" in note for note in rebuilt["notes"])
    own = bench(*args, "--in-place", str(src))
    assert own["mlx_lm_model"] == f"mlx_lm.load({src})"
    assert own["same_tokens_as_mlx_lm"] is False


def test_dead_peer_case(report):
    r = report
    assert r["dead_peer_runs"] == 3
    assert len(r["dead_peer_tokens_per_s_runs"]) == len(r["no_peers_tokens_per_s_runs"]) == 3
    assert close(r["dead_peer_tokens_per_s"], statistics.median(r["dead_peer_tokens_per_s_runs"]))
    assert close(r["no_peers_tokens_per_s"], statistics.median(r["no_peers_tokens_per_s_runs"]))
    assert close(r["dead_peer_relative_to_no_peers"], r["dead_peer_tokens_per_s"] / r["no_peers_tokens_per_s"])
    # Nothing listens there: no call ever went out, so none fell back either.
    assert r["dead_peer_address"].startswith("127.0.0.1:")
    assert r["dead_peer_peer_calls"] == 0 and r["dead_peer_fallbacks"] == 0


def test_ratios_are_their_parts(report):
    r = report
    assert close(r["ssd_bound_tokens_per_s"], r["raw_read_gbps"] * 1e9 / r["ssd_bound_bytes_per_token"])
    assert close(r["bound_efficiency"], r["tokens_per_s"] / r["ssd_bound_tokens_per_s"])
    assert close(r["read_efficiency"], r["expert_read_gbps"] / r["raw_read_gbps"])
    assert close(r["relative_to_mlx_lm"], r["tokens_per_s"] / r["mlx_lm_tokens_per_s"])
    # The warm case against plain mlx-lm's runs alternated with its own, fastest to fastest.
    assert r["warm_eighth_mlx_lm_alternated"] is True
    assert close(r["warm_eighth_relative_to_mlx_lm"],
                 r["warm_eighth_tokens_per_s"] / r["warm_eighth_mlx_lm_tokens_per_s"])
    assert close(r["warm_eighth_bound_tokens_per_s"],
                 min(r["warm_eighth_mlx_lm_tokens_per_s"], r["warm_eighth_transfer_bound_tokens_per_s"]))
    assert close(r["every_token_cold_min_bound_tokens_per_s"],
                 min(r["warm_eighth_mlx_lm_tokens_per_s"], r["every_token_cold_ssd_bound_tokens_per_s"]))
    assert close(r["every_token_cold_relative_to_min_bound"],
                 r["every_token_cold_tokens_per_s"] / r["every_token_cold_min_bound_tokens_per_s"])
    assert close(r["repack_tokens_per_s_gain"], r["tokens_per_s"] / r["in_place_tokens_per_s"])
    assert close(r["repack_read_gbps_gain"], r["expert_read_gbps"] / r["in_place_expert_read_gbps"])
    assert 0.0 <= r["cache_hit_rate"] <= 1.0
    # Every token cold: each run against the raw read timed just before it; the run reported
    # is the median of those shares.
    if r["every_token_cold_tokens_per_s"] is not None:
        runs = r["every_token_cold_bound_efficiency_runs"]
        assert len(runs) == 3 and r["every_token_cold_bound_efficiency"] == sorted(runs)[1]
        assert close(r["every_token_cold_ssd_bound_tokens_per_s"],
                     r["every_token_cold_raw_read_gbps"] * 1e9 / r["every_token_cold_bound_bytes_per_token"])
        assert close(r["every_token_cold_bound_efficiency"],
                     r["every_token_cold_tokens_per_s"] / r["every_token_cold_ssd_bound_tokens_per_s"])
        assert close(r["every_token_cold_read_efficiency"],
                     r["every_token_cold_expert_read_gbps"] / r["every_token_cold_raw_read_gbps"])
    for case in ("every_token_cold", "warm_eighth"):
        assert close(r[f"{case}_measured_over_predicted"], r[f"{case}_tokens_per_s"] / r[f"{case}_predicted_tok_s"])
    # Every expert cached: against plain mlx-lm's runs alternated with edgemoe's, median to median.
    assert len(r["all_cached_mlx_lm_tokens_per_s_runs"]) == len(r["all_cached_tokens_per_s_runs"]) == 3
    assert close(r["all_cached_mlx_lm_tokens_per_s"], statistics.median(r["all_cached_mlx_lm_tokens_per_s_runs"]))
    for prefix in ("all_cached_", "all_cached_host_routing_"):
        assert close(r[f"{prefix}relative_to_mlx_lm"], r[f"{prefix}tokens_per_s"] / r["all_cached_mlx_lm_tokens_per_s"])
        assert r[f"{prefix}same_tokens_as_mlx_lm"] is True


def test_byte_counts_add_up(report):
    r = report
    # Decode is every token after the first.
    assert r["decode_tokens"] == TOKENS - 1
    assert r["ssd_bytes_read"] > 0
    assert close(r["ssd_bytes_per_token"] * r["decode_tokens"], r["ssd_bytes_read"])
    # Every layer of the tiny model has the same record size.
    assert r["ssd_bytes_read"] == r["expert_reads"] * r["expert_record_bytes"]
    assert close(r["expert_read_gbps"], r["ssd_bytes_read"] / r["ssd_read_seconds"] / 1e9)
    assert close(r["design_ssd_bytes_per_token"], r["ssd_bytes_per_token"])
    assert r["cache_budget_bytes"] == int(CACHE_MB * 2**20)
    assert r["warm_eighth_cache_budget_bytes"] == r["total_expert_bytes"] // 8


def test_cold_run_starts_cold(report):
    if report["page_cache_drop_method"] is None or report["page_cache_resident_at_start"] is None:
        unavailable("this OS cannot drop or inspect the page cache (dropping it needs root)")
    assert report["page_cache_resident_at_start"] < 0.05
    assert report["every_token_cold_first_read_fraction"] > 0.5


def test_text_report_names_the_figures(report):
    text = format_report(report)
    for phrase in ("raw sequential read", "SSD bound", "plain mlx-lm", "1/8 of the experts", "in-place pack",
                   "peers configured but all down", "same tokens as mlx_lm.load(", "same tokens as the cold run",
                   "peak RSS", "MLX peak"):
        assert phrase in text


def test_memory_figures(report):
    # The CPU backend: MLX's peak is its own allocations, in RAM, a part of peak RSS.
    assert report["array_memory"] == "RAM"
    assert 0 < report["peak_array_bytes"] <= report["peak_rss_bytes"]
    assert report["peak_array_bytes"] >= report["dense_bytes"]


def test_skips_say_why(model):
    _, packed = model
    r = bench("--model", str(packed), "--cache-mb", str(CACHE_MB), "--tokens", "4", "--no-mlx-lm")
    assert r["mlx_lm_tokens_per_s"] is None and r["relative_to_mlx_lm"] is None
    assert r["same_tokens_as_mlx_lm"] is None and r["same_tokens_as_rebuilt_model"] is None
    assert r["mlx_lm_model"] is None and r["warm_eighth_relative_to_mlx_lm"] is None
    assert r["in_place_tokens_per_s"] is None and r["repack_tokens_per_s_gain"] is None
    assert any("--no-mlx-lm" in note for note in r["notes"])
    assert r["warm_eighth_tokens_per_s"] is not None
    assert r["all_cached_tokens_per_s"] is not None and r["all_cached_relative_to_mlx_lm"] is None
    assert r["all_cached_mlx_lm_tokens_per_s"] is None and r["all_cached_mlx_lm_tokens_per_s_runs"] is None
    assert r["warm_eighth_mlx_lm_tokens_per_s"] is None


def test_decode_figures_split_prefill_from_decode():
    start = Mark(Counters(t=0.0))
    marks = [
        Mark(Counters(t=1.0, ssd_bytes_read=100, ssd_read_seconds=0.5, ssd_reads=10, cache_hits=1, cache_misses=9),
             first_reads=4, disk_bytes=4096),
        Mark(Counters(t=1.5, ssd_bytes_read=130, ssd_read_seconds=0.6, ssd_reads=13, cache_hits=6, cache_misses=12),
             first_reads=5, disk_bytes=8192),
        Mark(Counters(t=2.0, ssd_bytes_read=150, ssd_read_seconds=0.7, ssd_reads=15, cache_hits=12, cache_misses=14),
             first_reads=7, disk_bytes=12288),
    ]
    run = decode_figures(start, marks, [1, 2, 3], prompt_tokens=20)
    assert run.decode_tokens == 2
    assert close(run.tokens_per_s, 2.0)
    assert close(run.prompt_tokens_per_s, 20.0)
    assert run.prefill_ssd_bytes_read == 100 and run.ssd_bytes_read == 50
    assert close(run.ssd_bytes_per_token, 25.0)
    assert close(run.expert_read_gbps, 50 / 0.2 / 1e9)
    assert close(run.cache_hit_rate, 11 / 16)
    assert run.expert_reads == 5 and run.first_reads == 3 and run.disk_bytes_read == 8192


def test_fio_missing_is_a_note(monkeypatch, tmp_path):
    monkeypatch.setattr("shutil.which", lambda name: None)
    gbps, why = run_fio(tmp_path / "x")
    assert gbps is None and "fio" in why


@contextlib.contextmanager
def _model_and_plain_mlx_lm(packed: Path, src: Path | None = None, cache_bytes: int = int(CACHE_MB * 2**20)):
    """The benched model with plain mlx-lm loaded beside it, a prompt, and the bench's notes."""
    from edgemoe.coordinator.bench.reference import open_plain_mlx_lm
    from edgemoe.coordinator.bench.report import Notes
    from edgemoe.coordinator.generate import build_prompt
    from edgemoe.coordinator.loader import load_streaming_model

    sm = load_streaming_model(packed, cache_bytes=cache_bytes)
    notes = Notes()
    try:
        plain = open_plain_mlx_lm(packed, sm, src, None, notes)
        assert plain is not None
        yield sm, plain, build_prompt(sm.tokenizer, "Hello"), notes
    finally:
        sm.close()


def test_plain_mlx_lm_that_does_not_fit_beside_every_expert_is_freed_first(model, monkeypatch):
    """Where plain mlx-lm and every expert do not both fit in half the memory, mlx-lm is
    freed before the experts load, and the ratio is to its fastest run, timed before."""
    from edgemoe.coordinator.bench import cached, reference
    from edgemoe.coordinator.bench.reference import MlxLmRun

    _, packed = model
    with _model_and_plain_mlx_lm(packed) as (sm, plain, prompt, notes):
        best = plain.time(prompt, 4)
        fastest = MlxLmRun(best.token_ids, 1000.0, best.prompt_tokens_per_s, best.model)
        # Room for every expert, not for mlx-lm's copy of the model beside them.
        need = sm.manifest.total_expert_bytes + sm.local.budget_bytes + sm.dense_bytes
        for name in ("array_memory_bytes", "ram_bytes"):
            monkeypatch.setattr(reference, name, lambda: 2 * (need + plain.nbytes // 2))
        r = cached.all_cached_figures(sm, prompt, 4, fastest, plain, notes)
    assert plain.model is None
    assert any("does not fit beside" in note for note in notes.items)
    assert r["all_cached_mlx_lm_tokens_per_s"] is None
    assert close(r["all_cached_relative_to_mlx_lm"], r["all_cached_tokens_per_s"] / 1000.0)
    assert r["all_cached_same_tokens_as_mlx_lm"] is True


def test_plain_mlx_lm_that_does_not_fit_beside_the_warm_page_cache_is_freed_before_it(model, monkeypatch):
    """The warm case keeps the expert files in the page cache: where plain mlx-lm does not fit
    in half the memory beside them, it is freed first, and both cached cases are compared with
    its fastest run, timed before, and say so."""
    from edgemoe.coordinator.bench import reference, run_bench
    from edgemoe.node.manifest import read_manifest

    _, packed = model
    manifest = read_manifest(packed)
    # mlx-lm's copy of the model opens (the array memory is vast), but arrays live in RAM,
    # where the page cache's copy of the experts alone fills half.
    monkeypatch.setattr(reference, "array_memory_bytes", lambda: 2**50)
    monkeypatch.setattr(reference, "array_memory_kind", lambda: "RAM")
    monkeypatch.setattr(reference, "ram_bytes", lambda: 2 * manifest.total_expert_bytes)
    r = run_bench(packed, cache_bytes=int(CACHE_MB * 2**20), tokens=4)
    assert any("freed before the warm 1/8 case" in note for note in r["notes"])
    assert r["warm_eighth_mlx_lm_alternated"] is False
    assert r["warm_eighth_mlx_lm_tokens_per_s"] == r["mlx_lm_tokens_per_s"] is not None
    assert close(r["warm_eighth_relative_to_mlx_lm"], r["warm_eighth_tokens_per_s"] / r["mlx_lm_tokens_per_s"])
    assert r["all_cached_mlx_lm_tokens_per_s"] is None
    assert close(r["all_cached_relative_to_mlx_lm"], r["all_cached_tokens_per_s"] / r["mlx_lm_tokens_per_s"])
    assert "its fastest run above" in format_report(r)


@pytest.mark.parametrize("io_mode", ["buffered", "direct"])
def test_bench_with_prefetch(model, io_mode):
    """`--prefetch` through the whole bench (its first-read counter wraps the store's reads).
    The SSD bound counts the bytes the layers asked for: with direct I/O the guesses are read
    into slots by us, and those never used are left out of it."""
    _, packed = model
    r = bench("--model", str(packed), "--cache-mb", str(CACHE_MB), "--tokens", "4", "--no-mlx-lm", "--prefetch",
              "--io", io_mode)
    assert r["prefetch"] is True
    assert r["warm_eighth_same_tokens_as_cold_run"] is True and r["dead_peer_same_tokens_as_no_peers"] is True
    unused = r["prefetch_unused_bytes"] / r["decode_tokens"]
    assert close(r["ssd_bound_bytes_per_token"], r["ssd_bytes_per_token"] - unused)
    assert close(r["ssd_bound_tokens_per_s"], r["raw_read_gbps"] * 1e9 / r["ssd_bound_bytes_per_token"])
    if r["reads_ahead"]:  # the kernel's reads: not ours, not in the bytes read
        assert r["prefetch_unused_bytes"] == 0
    if r["direct_io"]:  # guesses read into slots, records of one size here
        assert not r["reads_ahead"] and r["prefetch_unused_bytes"] > 0
        assert r["prefetch_unused_bytes"] % r["expert_record_bytes"] == 0


def test_every_expert_cached_discards_its_first_round(model, monkeypatch):
    """The first round of the alternating runs (each variant's first run after the cache was
    filled) is run and not kept: the medians are of the rounds after it."""
    import dataclasses

    from edgemoe.coordinator.bench import cached
    from edgemoe.coordinator.bench.report import Notes
    from edgemoe.coordinator.generate import build_prompt
    from edgemoe.coordinator.loader import load_streaming_model

    _, packed = model
    sm = load_streaming_model(packed, cache_bytes=int(CACHE_MB * 2**20))
    real, calls = cached.timed_generate, []

    def numbered(*args, **kwargs):
        # Each run's speed is its place in line: which were kept shows in the report.
        calls.append(sm.local.resident_tables)
        return dataclasses.replace(real(*args, **kwargs), tokens_per_s=float(len(calls) - 1))

    monkeypatch.setattr(cached, "timed_generate", numbered)
    try:
        r = cached.all_cached_figures(sm, build_prompt(sm.tokenizer, "Hello"), 4, None, None, Notes())
    finally:
        sm.close()
    assert calls == [True, False] * 4
    assert r["all_cached_warmup_rounds"] == 1
    assert r["all_cached_tokens_per_s_runs"] == [2.0, 4.0, 6.0]
    assert r["all_cached_host_routing_tokens_per_s_runs"] == [3.0, 5.0, 7.0]


def test_the_mapped_case_alternates_with_mlx_lm_and_divides_by_its_bound(model, monkeypatch):
    """On CUDA the bench adds the warm case with host-mapped experts (here the CPU, with a
    host fake for the driver): mlx-lm's tokens, its untimed first round left out, and the
    bound from the bytes each decoded token read over the bus."""
    from test_mapped import PlacingDma

    from edgemoe.coordinator import loader
    from edgemoe.coordinator.bench import mapped
    from edgemoe.coordinator.bench import report as report_lines
    from edgemoe.coordinator.bench.report import Notes

    src, packed = model
    monkeypatch.setattr(mapped, "compute_backend", lambda: "metal")
    assert mapped.mapped_figures(packed, None, [1, 2], 4, [], None, None, 40.0, Notes()) == \
        {"mapped_eighth_tokens_per_s": None}  # Metal: no case
    monkeypatch.setattr(mapped, "compute_backend", lambda: "cuda")
    monkeypatch.setattr(loader, "open_dma", PlacingDma)
    with _model_and_plain_mlx_lm(packed, src) as (sm, plain, prompt, notes):
        expected = plain.time(prompt, TOKENS).token_ids
        timed = []
        original = plain.time
        monkeypatch.setattr(plain, "time", lambda *a: timed.append(original(*a)) or timed[-1])
        per_timed_token = []  # the timed texts' own bytes over the bus per decoded token
        timed_generate = mapped.timed_generate

        def measured(sm, *args):
            local = sm.local
            before = (local.decoded_mapped_bytes, local.decoded_layer_calls)
            run = timed_generate(sm, *args)
            calls = local.decoded_layer_calls - before[1]
            per_timed_token.append((local.decoded_mapped_bytes - before[0]) / (calls / len(sm.manifest.layers)))
            return run

        monkeypatch.setattr(mapped, "timed_generate", measured)
        try:
            r = mapped.mapped_figures(packed, None, prompt, TOKENS, expected, plain, None, 40.0, notes)
        finally:
            plain.close()
    assert r["mapped_eighth_same_tokens_as_cold_run"] is True
    assert len(timed) == mapped.WARMUP_ROUNDS + len(r["mapped_eighth_tokens_per_s_runs"])
    assert r["mapped_eighth_mlx_lm_tokens_per_s"] == max(t.tokens_per_s for t in timed[mapped.WARMUP_ROUNDS:])
    assert r["mapped_eighth_tokens_per_s"] == max(r["mapped_eighth_tokens_per_s_runs"])
    assert r["mapped_eighth_ssd_bytes_per_token"] == 0  # nothing read while decoding
    per_token = r["mapped_eighth_bus_bytes_per_token"]
    runs = r["mapped_eighth_tokens_per_s_runs"]
    assert per_token == per_timed_token[mapped.WARMUP_ROUNDS + runs.index(max(runs))]
    manifest, config = read_manifest(packed), json.loads((packed / "config.json").read_text())
    # At most every routed expert of every layer, less those on the GPU.
    assert 0 < per_token < len(manifest.layers) * config["num_experts_per_tok"] * manifest.expert_bytes
    transfer = 40.0 * 1e9 / per_token
    assert close(r["mapped_eighth_transfer_bound_tokens_per_s"], transfer)
    assert close(r["mapped_eighth_bound_tokens_per_s"], min(transfer, r["mapped_eighth_mlx_lm_tokens_per_s"]))
    assert close(r["mapped_eighth_relative_to_bound"],
                 r["mapped_eighth_tokens_per_s"] / r["mapped_eighth_bound_tokens_per_s"])
    text = "\n".join(report_lines._mapped_lines({**r, "host_to_device_gbps": 40.0}))
    assert "mapped, 1/8 of the experts on the GPU" in text and "target >= 80%" in text


@pytest.mark.skipif(mx.default_device() != mx.cpu or not sys.platform.startswith("linux"),
                    reason="the CPU's mapped case (Linux)")
def test_the_cpu_mapped_case_computes_on_the_page_cache_and_is_bounded_by_mlx_lm(model, tmp_path):
    """On the CPU the mapped case maps the expert files' pages (no cache of ours, nothing over
    a bus): its bound is mlx-lm alternated with it. Skipped with a note for a model whose
    tensors are not whole pages (the tiny one)."""
    from edgemoe.coordinator.bench import mapped
    from edgemoe.coordinator.bench import report as report_lines
    from edgemoe.coordinator.bench.report import Notes

    notes = Notes()
    assert mapped.mapped_figures(model[1], None, [1, 2], 4, [], None, None, None, notes) == \
        {"mapped_eighth_tokens_per_s": None}
    assert any("whole pages" in note for note in notes.items)
    src = write_tiny_model(tmp_path / "src", arch="qwen3_moe", num_layers=2, hidden_size=256,
                           moe_intermediate_size=128)
    packed = tmp_path / "packed"
    pack(src, packed)
    with _model_and_plain_mlx_lm(packed, src, read_manifest(packed).total_expert_bytes // 8) as (sm, plain, prompt,
                                                                                                notes):
        expected = plain.time(prompt, TOKENS).token_ids
        try:
            r = mapped.mapped_figures(packed, None, prompt, TOKENS, expected, plain, None, None, notes)
        finally:
            plain.close()
    assert r["mapped_eighth_backend"] == "cpu" and r["mapped_eighth_same_tokens_as_cold_run"] is True
    assert r["mapped_eighth_ssd_bytes_per_token"] == 0 and r["mapped_eighth_bus_bytes_per_token"] == 0
    assert r["mapped_eighth_transfer_bound_tokens_per_s"] is None and r["mapped_eighth_mlx_lm_alternated"]
    assert close(r["mapped_eighth_bound_tokens_per_s"], r["mapped_eighth_mlx_lm_tokens_per_s"])
    assert close(r["mapped_eighth_relative_to_bound"],
                 r["mapped_eighth_tokens_per_s"] / r["mapped_eighth_mlx_lm_tokens_per_s"])
    text = "\n".join(report_lines._mapped_lines(r))
    assert "the page cache's own pages" in text and "target >= 90%" in text and "bus" not in text
