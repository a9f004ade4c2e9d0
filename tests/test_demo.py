"""`edgemoe demo` (what `make demo` runs): the built-in model with two edge nodes on loopback,
where its experts came from, and a node killed halfway, all checked against plain mlx-lm."""

from __future__ import annotations

import json
import os

import mlx.core as mx
import pytest
from conftest import run_cli

from edgemoe.coordinator.demo import DEMO_PROMPT
from edgemoe.node.manifest import read_manifest

MAX_TOKENS = 16


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def mlx_lm_greedy(src, prompt: str, max_tokens: int) -> list[int]:
    import mlx_lm
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = mlx_lm.load(str(src))
    ids = mx.array(tokenizer.encode(prompt))
    return [r.token for r in stream_generate(model, tokenizer, ids, max_tokens=max_tokens,
                                             sampler=make_sampler(temp=0.0))]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    directory = tmp_path_factory.mktemp("demo")
    r = run_cli("demo", "--dir", directory, "--json", "--max-tokens", MAX_TOKENS, timeout=300)
    assert r.returncode == 0, r.stderr
    return directory, json.loads(r.stdout), r.stderr


def test_tokens_are_mlx_lm_s_with_nodes_and_with_a_node_killed(demo):
    directory, report, _ = demo
    reference = mlx_lm_greedy(directory / "src", DEMO_PROMPT, MAX_TOKENS)
    assert len(reference) > 4
    assert report["reference_token_ids"] == reference
    first, second = report["runs"]
    assert first["token_ids"] == reference and first["same_as_mlx_lm"]
    assert second["token_ids"] == reference and second["same_as_mlx_lm"]


def test_experts_come_from_cache_nodes_and_ssd(demo):
    directory, report, _ = demo
    first = report["runs"][0]["sources"]
    assert set(first["nodes"]) == {"node1", "node2"}
    assert all(count > 0 for count in first["nodes"].values()), first
    assert first["cache"] > 0 and first["ssd"] > 0, first
    assert first["peer_calls"] > 0 and first["fallbacks"] == 0
    # each node holds at most its RAM share: a quarter of the experts
    manifest = read_manifest(directory / "packed")
    n_experts = sum(spec.num_experts for spec in manifest.layers)
    assert all(0 < count <= n_experts // 4 for count in report["placed"].values()), report["placed"]


def test_a_killed_node_loses_nothing(demo):
    _, report, _ = demo
    first, second = (run["sources"] for run in report["runs"])
    killed = report["runs"][1]["killed_node"]
    assert killed == "node2"
    # Same tokens route to the same experts: every load is accounted for once, wherever it came from.
    total = lambda s: s["cache"] + s["ssd"] + sum(s["nodes"].values())  # noqa: E731
    assert total(first) == total(second)
    # it computed until it was killed, and nothing after
    assert 0 < second["nodes"][killed] < first["nodes"][killed]
    assert report["runs"][0]["nodes_healthy"] == {"node1": True, "node2": True}
    assert report["runs"][1]["nodes_healthy"] == {"node1": True, "node2": False}


def test_every_node_is_stopped(demo):
    _, report, _ = demo
    pids = [node["pid"] for node in report["nodes"]]
    assert len(pids) == 2
    assert not any(alive(pid) for pid in pids)


def test_text_output_says_where_experts_came_from(tmp_path):
    r = run_cli("demo", "--dir", tmp_path, "--nodes", "1", "--max-tokens", "6", "--prompt", "def main(", timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "where the experts came from" in out
    for label in ("coordinator RAM cache", "node1", "coordinator SSD"):
        assert label in out
    assert out.count("identical to mlx-lm's tokens (all experts in RAM): yes") == 2
    assert "def main(" in out and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, says", [
    (["--nodes", "0"], "--nodes 0"),
    (["--nodes", "99"], "--nodes 99"),
    (["--max-tokens", "1"], "--max-tokens 1"),
])
def test_bad_demo_options(tmp_path, args, says):
    r = run_cli("demo", "--dir", tmp_path, *args)
    assert r.returncode == 2
    assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_the_demo_never_replaces_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    r = run_cli("demo", "--dir", tmp_path)
    assert r.returncode == 2 and "holds other files (notes.txt)" in r.stderr, r.stderr
    assert (tmp_path / "src" / "config.json").read_text() == "{}"
    a_file = tmp_path / "notes.txt"
    r = run_cli("demo", "--dir", a_file)
    assert r.returncode == 2 and "is a file" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_the_demo_runs_beside_the_readmes_benchmark_models(tmp_path):
    """`make bench` and the README's large demo model live in .demo too: `make demo` after them still runs."""
    from edgemoe.coordinator.demo import _check_demo_dir

    for name in ("bench-src", "bench-packed", "large-src", "large-packed"):
        (tmp_path / name).mkdir()
    _check_demo_dir(tmp_path)
