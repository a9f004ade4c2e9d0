"""`edgemoe plan`: measures, places and predicts, and writes nothing (issue 11, part 3)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import run_cli
from nodes import NodeProcess

from edgemoe.coordinator.bench.predict import layer_shares, placement
from edgemoe.coordinator.hotset import save_counts
from edgemoe.coordinator.perf_model import LayerShares, Machine, predict, uniform
from edgemoe.node.credentials import init_cluster
from edgemoe.node.manifest import read_manifest

FRACTIONS = ["1/1", "1/2", "1/4", "1/8"]


def tree_state(*roots: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under the roots: mtime, size and digest."""
    state = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                st = path.stat()
                state[str(path)] = (st.st_mtime_ns, st.st_size, hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                state[str(path)] = (path.stat().st_mtime_ns, 0, "dir")
    return state


def plan_json(*args) -> dict:
    out = run_cli("plan", *args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An EDGEMOE_HOME of the test's own: no learned hot set of another test's runs."""
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("EDGEMOE_HOME", str(path))
    return path


def test_plan_json_is_consistent_and_writes_nothing(models, tmp_path, home):
    packed = models.copy_packed(tmp_path / "packed")
    manifest = read_manifest(packed)
    before = tree_state(packed, home)
    r = plan_json("--model", packed, "--peers", "none", "--cache-mb", "0.07")
    assert tree_state(packed, home) == before
    assert r["routing"].startswith("uniform")
    assert r["maps_experts"] is False  # the tiny 4-bit model's tensors are not whole pages

    total = sum(s.num_experts for s in manifest.layers)
    assert r["moe_layers"] == len(manifest.layers) and r["total_expert_bytes"] == manifest.total_expert_bytes
    assert r["disk_raw_read_gbps"] > 0 and r["disk_miss_gbps"] > 0 and r["page_cache_miss_gbps"] > 0
    assert r["hit_step_ms"] > 0 and r["expert_ms"] >= 0
    assert r["nodes"] == [] and r["placement"]["nodes"] == {}
    assert r["placement"]["local_experts"] + r["placement"]["ssd_only_experts"] == total
    assert r["placement"]["local_experts"] * manifest.expert_bytes <= 0.07 * 2**20 < manifest.total_expert_bytes
    rows = {row["cache"]: row for row in r["predictions"]}
    assert [c for c in rows if c in FRACTIONS] == FRACTIONS[::-1]
    per_token = r["experts_per_token"] * sum(s.record_bytes for s in manifest.layers)
    for label in FRACTIONS:
        alone = rows[label]["no_nodes"]
        # uniform routing: the hit rate is the cache fraction, and every miss is read
        assert alone["hit_rate"] == pytest.approx(rows[label]["cache_fraction"])
        assert alone["ssd_bytes_per_token"] == pytest.approx(per_token * (1 - alone["hit_rate"]))
        assert rows[label]["with_nodes"] is None
    speeds = [rows[label]["no_nodes"]["tokens_per_s"] for label in FRACTIONS]
    assert speeds == sorted(speeds, reverse=True) and speeds[0] > speeds[-1]
    assert rows["1/1"]["no_nodes"]["ssd_bound_tokens_per_s"] is None  # nothing read
    assert rows["1/1"]["no_nodes"]["tokens_per_s"] == pytest.approx(1e3 / r["hit_step_ms"])


def test_learned_hot_set_drives_hit_rate_and_placement(models, tmp_path, home):
    packed = models.packed()
    manifest = read_manifest(packed)
    # every routing went to experts 0 and 1 of each layer: 1/8 of the experts
    save_counts(manifest, {(s.layer, e): 100 for s in manifest.layers for e in (0, 1)})
    before = tree_state(home)
    r = plan_json("--model", packed, "--peers", "none", "--cache-mb", "0.07")
    assert tree_state(home) == before
    assert r["routing"].startswith("learned hot set")
    rows = {row["cache"]: row for row in r["predictions"]}
    assert rows["1/8"]["no_nodes"]["hit_rate"] == pytest.approx(1.0)  # the hot eighth is what is cached
    assert rows["1/8"]["no_nodes"]["ssd_bytes_per_token"] == pytest.approx(0.0)


@pytest.mark.skipif(mx.default_device() != mx.cpu or not sys.platform.startswith("linux"),
                    reason="the CPU's page-cache mapping (Linux)")
def test_plan_says_that_generate_maps_where_it_would(models, home):
    """Where RAM holds the experts and they can be mapped (the float32 model's tensors are whole
    pages), `generate`'s default maps them: the plan says so, with the speed to expect."""
    out = run_cli("plan", "--model", models.packed("mixtral", False), "--peers", "none", "--cache-mb", "0.05")
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if "map every expert here" in x)
    assert "--map-experts off" in line and "tok/s" in line
    out = run_cli("plan", "--model", models.packed("mixtral", False), "--peers", "none", "--cache-mb", "0.05",
                  "--json")
    assert json.loads(out.stdout)["maps_experts"] is True


def test_plan_text(models, home):
    out = run_cli("plan", "--model", models.packed(), "--peers", "none")
    assert out.returncode == 0, out.stderr
    assert "placement with a" in out.stdout and "predicted tok/s" in out.stdout
    for label in FRACTIONS:
        assert f"  {label} (" in out.stdout


@pytest.mark.parametrize("args", [("--model", "/nonexistent/model"), ("--cache-mb", "-1")])
def test_bad_input_is_one_line(models, args, home):
    argv = ["plan", "--model", models.packed(), "--peers", "none", *args]
    out = run_cli(*argv)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgemoe: error:"), out.stderr


@pytest.mark.slow
def test_plan_reports_a_loopback_node(models, tmp_path, home):
    packed = models.packed()
    cluster = init_cluster(tmp_path / "cluster")
    (tmp_path / "node").mkdir()
    node = NodeProcess(cluster.token, tmp_path / "node", cache_mb=2)
    try:
        r = plan_json("--model", packed, "--peers", node.address, "--cluster-dir", tmp_path / "cluster",
                      "--cache-mb", "0.07")
    finally:
        node.stop()
    [n] = r["nodes"]
    assert n["usable"] and n["address"] == node.address and n["rtt_ms"] > 0
    assert n["capacity_bytes"] == 2 * 2**20 and n["experts_held"] == 0
    placed = r["placement"]["nodes"][node.address]
    assert 0 < placed and placed * r["expert_record_bytes"] <= n["capacity_bytes"]
    for row in r["predictions"]:
        assert row["with_nodes"] is not None
        if row["cache_fraction"] < 1:
            assert row["with_nodes"]["node_share"] > 0


class FakeSpec:
    def __init__(self, layer: int, experts: int, record: int):
        self.layer, self.num_experts, self.record_bytes = layer, experts, record


class FakeManifest:
    def __init__(self, layers: int, experts: int, record: int):
        self.layers = [FakeSpec(i, experts, record) for i in range(layers)]
        self.total_expert_bytes = layers * experts * record


def test_placement_puts_each_expert_in_one_place_within_budgets():
    m = FakeManifest(layers=4, experts=16, record=100)
    nodes = [{"usable": True, "capacity_bytes": 1000, "held": [[1, 1]]},
             {"usable": False, "capacity_bytes": 10**6, "held": []},
             {"usable": True, "capacity_bytes": 2050, "held": []}]
    local, plan = placement(m, 1600, nodes)  # type: ignore[arg-type]
    assert len(plan) == 2  # the unusable node gets nothing
    assert len(local) * 100 <= 1600 and all(len(keys) * 100 <= cap for keys, cap in zip(plan, (1000, 2050)))
    places = [*local, *plan[0], *plan[1]]
    assert len(places) == len(set(places))
    assert (1, 1) in plan[0]  # what a node holds stays there
    shares = layer_shares(m, local, plan, [0.001, 0.002])  # type: ignore[arg-type]
    assert shares[0] == LayerShares(1.0, 0.0, 0.0)  # uniform: the cache keeps whole layers
    assert sum(s.on_nodes * 16 for s in shares) == pytest.approx(len(plan[0]) + len(plan[1]))
    assert all(s.cached + s.on_nodes <= 1 for s in shares)


def test_model_terms():
    m = Machine(record_bytes=[10**6] * 4, experts=[8] * 4, k=2, hit_step_s=0.01, expert_s=0.001, read_gbps=1.0)
    alone = predict(m, uniform(0.5, 4))
    # no nodes: the hit step plus the misses' bytes at the read bandwidth
    assert alone.seconds_per_token == pytest.approx(0.01 + 4 * 2 * 0.5 * 10**6 / 1e9)
    assert alone.ssd_bound_tokens_per_s == pytest.approx(1e9 / (4 * 2 * 0.5 * 10**6))
    assert alone.cluster_bound_tokens_per_s is None
    near = predict(m, [LayerShares(0.5, 0.5, 0.0001)] * 4)
    far = predict(m, [LayerShares(0.5, 0.5, 0.05)] * 4)
    assert near.tokens_per_s > alone.tokens_per_s > far.tokens_per_s
    assert far.seconds_per_token > 4 * (1 - 0.5**2) * 0.05  # a layer calling a node waits its round trip


def test_a_node_holding_experts_is_timed_by_decode_like_compute_calls(models):
    """A compute call costs a node's own work and the wire format on top of an Info round
    trip: a node holding experts of the model is timed by calls like decode's (one row, K
    experts of one layer it holds); one holding nothing, by Info."""
    from concurrent.futures import Future

    from edgemoe.coordinator.bench.predict import RTT_SAMPLES, node_rtts_s

    manifest = read_manifest(models.packed("qwen3_moe", True))

    class FakePeer:
        def __init__(self, held):
            self.held, self.requests, self.refreshes = held, [], 0

        def compute(self, request):
            self.requests.append(request)
            done: Future = Future()
            done.set_result((None, 0.0))
            return done

        def refresh(self, fingerprint):
            self.refreshes += 1

    holder, empty = FakePeer({(2, 5), (1, 7), (1, 3), (1, 9)}), FakePeer(set())
    assert len(node_rtts_s([holder, empty], manifest, hidden_size=16, k=2)) == 2
    assert len(holder.requests) == RTT_SAMPLES and holder.refreshes == 0
    request = holder.requests[0]
    assert (request.layer, list(request.experts), list(request.rows)) == (1, [3, 7], [0, 0])
    assert list(request.hidden.shape) == [1, 16] and request.fingerprint == manifest.fingerprint
    assert empty.refreshes == RTT_SAMPLES and empty.requests == []
