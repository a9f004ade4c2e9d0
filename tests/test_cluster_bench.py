"""`edgemoe bench --cluster N`: the figures exist, agree with each other, and every process is gone.

Wall-clock speeds are never asserted; round-trip times only from below (the relay adds at least its delay).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import run_cli
from edgemoe.coordinator.cluster_bench import format_cluster_report
from edgemoe.coordinator.pack import pack
from edgemoe.coordinator.tiny_models import write_tiny_model

NODES = 2
TOKENS = 6

TOP_KEYS = [
    "model", "nodes", "tokens", "moe_layers", "experts_per_token", "coordinator_cache_budget_bytes",
    "node_cache_budget_bytes", "no_peer_tokens_per_s", "local_layer_ms", "push_seconds", "experts_placed",
    "runs", "same_tokens", "child_pids", "notes", "bench_seconds",
]
RUN_KEYS = [
    "added_rtt_ms", "through_relay", "tokens_per_s", "decode_tokens", "rtt_ms", "min_rtt_ms", "node_rtt_ms",
    "layer_rtt_ms", "peer_layer_fraction", "peer_layers_per_token", "peer_calls", "experts_from_peers",
    "experts_from_ssd", "fallbacks", "cluster_bound_tokens_per_s", "bound_efficiency", "relative_to_no_peers",
    "same_tokens",
]


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cluster-bench")
    write_tiny_model(root / "src", arch="qwen3_moe", num_layers=2)
    pack(root / "src", root / "packed")
    out = run_cli("bench", "--model", root / "packed", "--cluster", NODES, "--tokens", TOKENS, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_every_figure_is_reported(report):
    for key in TOP_KEYS:
        assert key in report, key
    assert [run["added_rtt_ms"] for run in report["runs"]] == [0.0, 0.5, 5.0]
    for run in report["runs"]:
        for key in RUN_KEYS:
            assert run[key] is not None, key
        assert len(run["node_rtt_ms"]) == NODES
    assert report["nodes"] == NODES and len(report["experts_placed"]) == NODES


def test_the_nodes_did_the_work_and_the_tokens_are_the_same(report):
    assert report["same_tokens"] is True
    for run in report["runs"]:
        assert run["same_tokens"] is True
        assert run["experts_from_peers"] > 0
        assert run["peer_calls"] > 0
        assert run["decode_tokens"] == TOKENS - 1
    assert sum(report["experts_placed"].values()) > 0


def test_ratios_are_their_parts_ratios(report):
    layers = report["moe_layers"]
    no_peers = report["no_peer_tokens_per_s"]
    local = report["local_layer_ms"]
    assert close(local, 1e3 / (no_peers * layers))
    for run in report["runs"]:
        fraction = run["peer_layer_fraction"]
        assert 0 < fraction <= 1
        assert close(run["peer_layers_per_token"], fraction * layers)
        per_layer_ms = fraction * max(run["layer_rtt_ms"], local) + (1 - fraction) * local
        assert close(run["cluster_bound_tokens_per_s"], 1e3 / (layers * per_layer_ms))
        assert close(run["bound_efficiency"], run["tokens_per_s"] / run["cluster_bound_tokens_per_s"])
        assert close(run["relative_to_no_peers"], run["tokens_per_s"] / no_peers)
        assert run["min_rtt_ms"] <= run["rtt_ms"] <= max(run["node_rtt_ms"]) + 1e-9
        # A layer waits for its slowest call: never less than the mean call.
        assert run["layer_rtt_ms"] >= run["min_rtt_ms"]
        assert run["through_relay"] == (run["added_rtt_ms"] > 0)


def test_added_delay_shows_in_the_measured_round_trip(report):
    slow = next(run for run in report["runs"] if run["added_rtt_ms"] == 5.0)
    assert slow["min_rtt_ms"] >= 5.0
    assert slow["rtt_ms"] >= 5.0 and slow["layer_rtt_ms"] >= 5.0
    assert all(rtt >= 5.0 for rtt in slow["node_rtt_ms"])
    half = next(run for run in report["runs"] if run["added_rtt_ms"] == 0.5)
    assert half["min_rtt_ms"] >= 0.5


def test_every_process_the_bench_started_is_gone(report):
    # NODES nodes, and a relay in front of each for each of the two added delays.
    assert len(report["child_pids"]) == NODES * 3
    for pid in report["child_pids"]:
        cmdline = Path(f"/proc/{pid}/cmdline")
        if cmdline.exists():  # the pid may have been reused by an unrelated process
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            assert "node.daemon" not in text and "coordinator.relay" not in text, text


def test_text_report_shows_each_delay(report):
    text = format_cluster_report(report)
    for label in ("0 (direct)", "0.5 ms", "5 ms", "cluster bound", "no peers"):
        assert label in text


def test_bad_node_count_is_a_one_line_error(tmp_path):
    out = run_cli("bench", "--model", tmp_path, "--cluster", 0)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("edgemoe: error: --cluster 0") and "Traceback" not in out.stderr
