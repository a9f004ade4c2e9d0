"""`edgemoe bench --cluster N`: the figures exist, agree with each other, and every process is gone;
the cluster bound on hand-worked examples.

Wall-clock speeds are never asserted; round-trip times only from below (the relay adds at least its delay).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import run_cli

from edgemoe.coordinator.bench import format_cluster_report
from edgemoe.coordinator.bench.cluster import Decode, cluster_bound, run_figures
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
    "added_rtt_ms", "through_relay", "tokens_per_s", "decode_tokens", "rtt_ms", "node_rtt_ms",
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


def test_cluster_bound_by_hand():
    # 8 MoE layers, local work 1 ms a layer; a quarter of the layers wait 3 ms for a node:
    # 2 layers x 3 ms + 6 layers x 1 ms = 12 ms a token, 83.3 tok/s.
    assert close(cluster_bound(8, 0.25, 3.0, 1.0), 1000 / 12)
    # Nodes answering within the local work cost nothing: 8 layers x 2 ms = 16 ms, 62.5 tok/s.
    assert close(cluster_bound(8, 0.5, 0.5, 2.0), 62.5)
    # No layer sent work to a node: local work alone.
    assert close(cluster_bound(4, 0.0, None, 2.5), 100.0)


def test_run_figures_by_hand():
    # 5 tokens over 8 MoE layers (40 layer calls), 10 of which sent work to a node and
    # waited 30 ms in all for their slowest replies: 3 ms a peer layer, a quarter of the layers.
    # Node A: 6 replies summing 15 ms, node B: 4 summing 14 ms: 2.9 ms a call.
    run = Decode(token_ids=[1, 2, 3, 4, 5, 6], decode_tokens=5, tokens_per_s=50.0, node_rtts=[(6, 15.0), (4, 14.0)],
                 peer_calls=10, experts_from_peers=12, experts_from_ssd=3, fallbacks=0, layers=40, peer_layers=10,
                 answered_layers=10, slowest_rtt_ms_total=30.0)
    baseline = Decode(token_ids=[1, 2, 3, 4, 5, 6], decode_tokens=5, tokens_per_s=100.0, node_rtts=[], peer_calls=0,
                      experts_from_peers=0, experts_from_ssd=20, fallbacks=0, layers=0, peer_layers=0,
                      answered_layers=0, slowest_rtt_ms_total=0.0)
    f = run_figures(run, baseline, added_rtt_ms=0.5, relayed=True, moe_layers=8, local_layer_ms=1.0)
    assert close(f["layer_rtt_ms"], 3.0) and close(f["peer_layer_fraction"], 0.25)
    assert close(f["peer_layers_per_token"], 2.0) and close(f["peer_calls_per_token"], 2.0)
    assert close(f["rtt_ms"], 2.9) and f["node_rtt_ms"] == [2.5, 3.5]
    # 2 x 3 ms + 6 x 1 ms = 12 ms a token.
    assert close(f["cluster_bound_tokens_per_s"], 1000 / 12)
    assert close(f["bound_efficiency"], 0.6) and close(f["relative_to_no_peers"], 0.5)
    assert f["same_tokens"] is True


def test_figures_agree_with_each_other(report):
    layers = report["moe_layers"]
    no_peers = report["no_peer_tokens_per_s"]
    local = report["local_layer_ms"]
    assert close(local, 1e3 / (no_peers * layers))
    for run in report["runs"]:
        fraction = run["peer_layer_fraction"]
        assert 0 < fraction <= 1
        assert close(run["peer_layers_per_token"], fraction * layers)
        # Waiting for a node never makes a layer faster than its local work.
        assert run["cluster_bound_tokens_per_s"] <= 1e3 / (layers * local) * (1 + 1e-9)
        assert close(run["bound_efficiency"], run["tokens_per_s"] / run["cluster_bound_tokens_per_s"])
        assert close(run["relative_to_no_peers"], run["tokens_per_s"] / no_peers)
        # The mean call lies between the nodes' means.
        assert min(run["node_rtt_ms"]) - 1e-9 <= run["rtt_ms"] <= max(run["node_rtt_ms"]) + 1e-9
        assert run["through_relay"] == (run["added_rtt_ms"] > 0)
        assert run["predicted_tok_s"] > 0
        assert close(run["measured_over_predicted"], run["tokens_per_s"] / run["predicted_tok_s"])


def test_added_delay_shows_in_the_measured_round_trip(report):
    slow = next(run for run in report["runs"] if run["added_rtt_ms"] == 5.0)
    assert slow["rtt_ms"] >= 5.0 and slow["layer_rtt_ms"] >= 5.0
    assert all(rtt >= 5.0 for rtt in slow["node_rtt_ms"])
    half = next(run for run in report["runs"] if run["added_rtt_ms"] == 0.5)
    assert all(rtt >= 0.5 for rtt in half["node_rtt_ms"]) and half["layer_rtt_ms"] >= 0.5


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
