"""A cluster on one machine: a coordinator and two `edge-node`s, each in a network namespace
of its own on a private bridge (tests/netns.py), found by real mDNS between the namespaces.

Every packet stays inside the namespaces made here; every process and namespace is
removed at the end, whatever happened.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import netns
import pytest
from conftest import REPO, cli_env, encode, mlx_lm_tokens

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PROMPT = "The quick brown fox jumps over the lazy dog."
MAX_TOKENS = 16
# The node killed mid-generation sits behind a relay that holds each way for KILL_DELAY_S, so
# the coordinator waits on it most of the time: it dies KILL_AFTER_S into the generation, with a
# call in flight. KILL_TOKENS at 4 MoE layers a token outlast that by far.
KILL_DELAY_S = 0.1
KILL_AFTER_S = 1.0
KILL_TOKENS = 24
NODE_PORT = 7070
RELAY_DELAY_S = 0.004
TIMEOUT = 30.0
CLI_TIMEOUT = 120.0


@dataclass
class Node:
    ns: netns.Namespace
    name: str
    data_dir: Path
    proc: netns.Proc | None = None

    @property
    def address(self) -> str:
        return f"{self.ns.address}:{NODE_PORT}"


@dataclass
class NetnsCluster:
    coordinator: netns.Namespace
    nodes: list[Node]
    cluster_dir: Path
    token: str
    packed: Path
    prompt_ids: list[int]
    expected: list[int]


def start_nodes(nodes: list[Node], token: str) -> None:
    """Starts `edge-node` in each node's namespace (all at once) and waits until each listens."""
    for node in nodes:
        node.proc = netns.run_in(node.ns, [
            sys.executable, "-m", "edgemoe.node.daemon", "--join", token, "--listen", node.address, "--interface",
            node.ns.address, "--data-dir", str(node.data_dir), "--cache-mb", "1", "--name", node.name,
        ], env=cli_env())
    for node in nodes:
        node.proc.wait_for_line(lambda line: "listening" in line, TIMEOUT)


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.fixture(scope="module")
def cluster(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("netns-cluster")
    cluster_dir = root / "cluster"
    init = subprocess.run([sys.executable, "-m", "edgemoe.coordinator.cli", "cluster", "init",
                           "--dir", str(cluster_dir)],
                          capture_output=True, text=True, timeout=60, env=cli_env(), cwd=REPO)
    assert init.returncode == 0, init.stderr
    token = init.stdout.strip().splitlines()[-1]
    src, packed = models.src("qwen3_moe", True), models.packed("qwen3_moe", True)
    prompt_ids = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt_ids, max_tokens=MAX_TOKENS, models=models)
    with netns.Lan(3) as lan:
        names = {ns.name for ns in [lan.hub, *lan.hosts]}
        coordinator, *node_hosts = lan.hosts
        nodes = [Node(ns, f"netns-node{i}", root / f"node{i}") for i, ns in enumerate(node_hosts)]
        start_nodes(nodes, token)
        yield NetnsCluster(coordinator, nodes, cluster_dir, token, packed, prompt_ids, expected)
    left = names & netns_names()
    assert not left, f"namespaces left behind: {left}"


@pytest.fixture(autouse=True)
def nodes_up(cluster) -> None:
    """Every node running before each test: one an earlier test killed is started again
    (on its data dir, so it keeps the experts it was pushed)."""
    start_nodes([n for n in cluster.nodes if n.proc.popen.poll() is not None], cluster.token)


def cli_in(ns: netns.Namespace, *args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
    """`edgemoe ARGS` run inside a namespace."""
    return subprocess.run(["ip", "netns", "exec", ns.name, sys.executable, "-m", "edgemoe.coordinator.cli", *args],
                          capture_output=True, text=True, timeout=timeout, env=cli_env(), cwd=REPO)


def generate_args(c: NetnsCluster, peers: list[str], max_tokens: int = MAX_TOKENS) -> list[str]:
    return ["generate", "--model", str(c.packed), "--prompt", PROMPT, "--no-chat-template", "--max-tokens",
            str(max_tokens), "--json", "--cache-mb", "0.01", *peers, "--cluster-dir", str(c.cluster_dir)]


def generate_in(c: NetnsCluster, peers: list[str]) -> dict:
    out = cli_in(c.coordinator, *generate_args(c, peers))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def by_address(stats: dict) -> dict[str, dict]:
    return {n["address"]: n for n in stats["nodes"]}


def mdns(c: NetnsCluster) -> list[str]:
    return ["--peers", "auto", "--interface", c.coordinator.address]


@pytest.fixture(scope="module")
def placed(cluster):
    """A first generation over mDNS, which pushes experts to both nodes (kept in their data
    dirs), then `edgemoe peers` until both report experts held. Returns both outputs."""
    first = generate_in(cluster, mdns(cluster))
    deadline = time.monotonic() + TIMEOUT
    while True:
        out = cli_in(cluster.coordinator, "peers", "--json", *mdns(cluster), "--cluster-dir", str(cluster.cluster_dir))
        assert out.returncode == 0, out.stderr
        rows = json.loads(out.stdout)
        if len(rows) == len(cluster.nodes) and all(r["experts_held"] for r in rows):
            return first, rows
        assert time.monotonic() < deadline, f"the nodes never reported experts held: {rows}"
        # Pushes run in the background of a generation: another one pushes what is missing.
        generate_in(cluster, mdns(cluster))


def test_mdns_cluster_gives_mlx_lms_tokens(cluster, placed):
    first, rows = placed
    node_addresses = {n.address for n in cluster.nodes}
    # Both nodes were found over mDNS between the namespaces, by `generate` and by `peers`.
    assert first["token_ids"] == cluster.expected
    assert set(by_address(first["stats"])) == node_addresses
    assert {(r["address"], r["name"]) for r in rows} == {(n.address, n.name) for n in cluster.nodes}
    assert all(r["healthy"] and r["rtt_ms"] is not None for r in rows)

    out = generate_in(cluster, mdns(cluster))
    assert out["token_ids"] == cluster.expected
    stats = out["stats"]
    nodes = by_address(stats)
    assert set(nodes) == node_addresses
    assert {nodes[n.address]["name"] for n in cluster.nodes} == {n.name for n in cluster.nodes}
    assert stats["experts_from_peers"] > 0
    assert stats["fallbacks"] == 0
    for node in nodes.values():
        assert node["healthy"] and node["experts_held"] > 0 and node["calls"] > 0, node
        assert node["mean_rtt_ms"] is not None and node["failures"] == 0, node


def test_added_latency_same_tokens_and_rtt_at_least_the_delay(cluster, placed):
    slow, direct = cluster.nodes
    relay, port = netns.run_relay_in(cluster.coordinator, (slow.ns.address, NODE_PORT), RELAY_DELAY_S,
                                     listen_host="127.0.0.1")
    try:
        relayed = f"127.0.0.1:{port}"
        out = generate_in(cluster, ["--peers", f"{relayed},{direct.address}"])
    finally:
        relay.stop()
    assert out["token_ids"] == cluster.expected
    stats = out["stats"]
    nodes = by_address(stats)
    assert set(nodes) == {relayed, direct.address}
    assert nodes[relayed]["name"] == slow.name
    assert stats["experts_from_peers"] > 0
    assert nodes[relayed]["calls"] > 0 and nodes[relayed]["failures"] == 0
    # The relay holds each way for RELAY_DELAY_S: a round trip through it takes at least twice that.
    assert nodes[relayed]["mean_rtt_ms"] >= 2 * RELAY_DELAY_S * 1e3


def test_node_killed_with_a_call_in_flight_same_tokens(models, cluster, placed):
    """The victim dies while the coordinator waits for its answer: the call in flight falls back
    to the coordinator's own SSD (not waited out: --node-timeout is far off), with mlx-lm's tokens."""
    victim, survivor = cluster.nodes
    expected, _ = mlx_lm_tokens(models.src("qwen3_moe", True), cluster.prompt_ids, max_tokens=KILL_TOKENS,
                                models=models)
    relay, port = netns.run_relay_in(cluster.coordinator, (victim.ns.address, NODE_PORT), KILL_DELAY_S,
                                     listen_host="127.0.0.1")
    relayed = f"127.0.0.1:{port}"
    gen = netns.run_in(cluster.coordinator, [
        sys.executable, "-m", "edgemoe.coordinator.cli", "-v",
        *generate_args(cluster, ["--peers", f"{relayed},{survivor.address}"], KILL_TOKENS), "--node-timeout", "20",
    ], env=cli_env())
    try:
        # -v logs each node the coordinator connected to; generation starts right after.
        deadline = time.monotonic() + TIMEOUT
        while gen.stderr().count("experts of this model") < 2:
            assert gen.popen.poll() is None, f"generate exited early: {gen.stderr()[-2000:]}"
            assert time.monotonic() < deadline, f"generate never connected to both nodes: {gen.stderr()[-2000:]}"
            time.sleep(0.05)
        time.sleep(KILL_AFTER_S)
        assert gen.popen.poll() is None, "the generation ended before the node could be killed"
        victim.proc.popen.send_signal(signal.SIGKILL)
        victim.proc.popen.wait(TIMEOUT)
        line = gen.wait_for_line(lambda s: s.startswith("{"), CLI_TIMEOUT)
        assert gen.popen.wait(TIMEOUT) == 0, gen.stderr()[-2000:]
        out = json.loads(line)
        assert out["token_ids"] == expected
        stats = out["stats"]
        nodes = by_address(stats)
        # The victim was in use, died with a call pending, and that call was computed here.
        assert nodes[relayed]["calls"] > 0
        assert stats["fallbacks"] >= 1
        assert not nodes[relayed]["healthy"] and nodes[relayed]["failures"] >= 1
        error = nodes[relayed]["error"]
        assert error and "\n" not in error and "did not answer" not in error, error
        assert nodes[survivor.address]["healthy"] and nodes[survivor.address]["failures"] == 0
        assert stats["experts_from_peers"] > 0
    finally:
        gen.stop()
        relay.stop()
