"""`edgemoe bench`: every figure is reported, and the figures agree with each other.

Wall-clock speeds are never asserted: only that ratios are their parts' ratios
and byte counts add up.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from edgemoe.coordinator.bench import Mark, decode_figures, format_report, run_fio
from edgemoe.coordinator.pack import pack
from edgemoe.coordinator.tiny_models import write_tiny_model

TOKENS = 8
# Holds 4 of the tiny model's 32 experts (4.5 KiB each): decode both hits and misses.
CACHE_MB = 0.02

REQUIRED_KEYS = [
    "raw_read_gbps", "raw_read_method", "fio_read_gbps",
    "tokens_per_s", "prompt_tokens_per_s", "cache_hit_rate", "ssd_bytes_read", "ssd_bytes_per_token",
    "expert_read_gbps",
    "ssd_bound_tokens_per_s", "read_efficiency", "bound_efficiency",
    "mlx_lm_tokens_per_s", "relative_to_mlx_lm", "same_tokens_as_mlx_lm",
    "warm_eighth_tokens_per_s", "warm_eighth_relative_to_mlx_lm",
    "in_place_tokens_per_s", "in_place_expert_read_gbps", "repack_tokens_per_s_gain", "repack_read_gbps_gain",
    "decode_tokens", "prefill_ssd_bytes_read", "ssd_read_seconds", "expert_reads", "notes",
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


def test_same_tokens_everywhere(report):
    assert report["same_tokens_as_mlx_lm"] is True
    assert report["warm_eighth_same_tokens"] is True
    assert report["in_place_same_tokens"] is True


def test_ratios_are_their_parts(report):
    r = report
    assert close(r["ssd_bound_tokens_per_s"], r["raw_read_gbps"] * 1e9 / r["ssd_bytes_per_token"])
    assert close(r["bound_efficiency"], r["tokens_per_s"] / r["ssd_bound_tokens_per_s"])
    assert close(r["read_efficiency"], r["expert_read_gbps"] / r["raw_read_gbps"])
    assert close(r["relative_to_mlx_lm"], r["tokens_per_s"] / r["mlx_lm_tokens_per_s"])
    assert close(r["warm_eighth_relative_to_mlx_lm"], r["warm_eighth_tokens_per_s"] / r["mlx_lm_tokens_per_s"])
    assert close(r["repack_tokens_per_s_gain"], r["tokens_per_s"] / r["in_place_tokens_per_s"])
    assert close(r["repack_read_gbps_gain"], r["expert_read_gbps"] / r["in_place_expert_read_gbps"])
    assert 0.0 <= r["cache_hit_rate"] <= 1.0


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
        pytest.skip("this OS cannot drop or inspect the page cache")
    assert report["page_cache_resident_at_start"] < 0.05
    assert report["every_token_cold_first_read_fraction"] > 0.5


def test_text_report_names_the_figures(report):
    text = format_report(report)
    for phrase in ("raw sequential read", "SSD bound", "plain mlx-lm", "1/8 of the experts", "in-place pack"):
        assert phrase in text


def test_skips_say_why(model):
    _, packed = model
    r = bench("--model", str(packed), "--cache-mb", str(CACHE_MB), "--tokens", "4", "--no-mlx-lm")
    assert r["mlx_lm_tokens_per_s"] is None and r["relative_to_mlx_lm"] is None
    assert r["same_tokens_as_mlx_lm"] is None and r["warm_eighth_relative_to_mlx_lm"] is None
    assert r["in_place_tokens_per_s"] is None and r["repack_tokens_per_s_gain"] is None
    assert any("--no-mlx-lm" in note for note in r["notes"])
    assert r["warm_eighth_tokens_per_s"] is not None


def test_decode_figures_split_prefill_from_decode():
    start = Mark(t=0.0)
    marks = [
        Mark(t=1.0, bytes_read=100, read_seconds=0.5, reads=10, hits=1, misses=9),
        Mark(t=1.5, bytes_read=130, read_seconds=0.6, reads=13, hits=6, misses=12),
        Mark(t=2.0, bytes_read=150, read_seconds=0.7, reads=15, hits=12, misses=14),
    ]
    run = decode_figures(start, marks, [1, 2, 3], prompt_tokens=20)
    assert run.decode_tokens == 2
    assert close(run.tokens_per_s, 2.0)
    assert close(run.prompt_tokens_per_s, 20.0)
    assert run.prefill_ssd_bytes_read == 100 and run.ssd_bytes_read == 50
    assert close(run.ssd_bytes_per_token, 25.0)
    assert close(run.expert_read_gbps, 50 / 0.2 / 1e9)
    assert close(run.cache_hit_rate, 11 / 16)


def test_fio_missing_is_a_note(monkeypatch, tmp_path):
    monkeypatch.setattr("shutil.which", lambda name: None)
    gbps, why = run_fio(tmp_path / "x")
    assert gbps is None and "fio" in why
