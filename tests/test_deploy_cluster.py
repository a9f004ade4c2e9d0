"""`deploy/netns-cluster.sh` as a user runs it: `up 2 --model DST` starts two `edge-node`s and
`edgemoe serve` in network namespaces of their own; the server answers with mlx-lm's tokens
while using the nodes; `status` shows what runs where; `down` leaves nothing behind. Bad input
and a node that fails to start give one line on stderr and leave nothing behind either.

Every namespace here is named with this file's own prefixes (emdt-, emdb-) on subnets of its own
(10.213.7, 10.213.8: tests/netns.py uses 10.213.0, the script's default is 10.213.1), so no
packet reaches the machine's real interfaces; each test's cluster is taken down by a finalizer
that then checks no namespace and no process it started is left.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import netns
import pytest
from conftest import PROMPT, REPO, cli_env, encode, mlx_lm_tokens
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.netns, pytest.mark.slow]

SCRIPT = REPO / "deploy" / "netns-cluster.sh"
PREFIX, SUBNET = "emdt-", "10.213.7"
BAD_PREFIX, BAD_SUBNET = "emdb-", "10.213.8"
COORD_ADDR = f"{SUBNET}.1"
PORT = 8080
NODES = [f"{SUBNET}.11:50051", f"{SUBNET}.12:50051"]
MAX_TOKENS = 8
SCRIPT_TIMEOUT = 240
USE_NODES_TIMEOUT = 45.0

# Run inside the coordinator's namespace: one HTTP request, the body on stdout.
HTTP = r"""
import sys, urllib.request as u
data = sys.argv[2].encode() if len(sys.argv) > 2 else None
req = u.Request(sys.argv[1], data=data, headers={"Content-Type": "application/json"})
with u.build_opener(u.ProxyHandler({})).open(req, timeout=120) as r:
    sys.stdout.write(r.read().decode())
"""


@pytest.fixture(scope="module", autouse=True)
def need_namespaces():
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(reason)


def namespaces(prefix: str) -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=20).stdout
    return {line.split()[0] for line in out.splitlines() if line.split() and line.split()[0].startswith(prefix)}


def namespace_pids(prefix: str) -> set[int]:
    pids = set()
    for ns in namespaces(prefix):
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=20).stdout
        pids |= {int(p) for p in out.split()}
    return pids


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def netns_of(pid: int) -> str:
    return subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True,
                          timeout=20).stdout.strip()


def script_env(prefix: str, subnet: str, state: Path, **extra: str) -> dict[str, str]:
    env = cli_env()
    env.update(EDGEMOE_NETNS_PREFIX=prefix, EDGEMOE_NETNS_SUBNET=subnet, EDGEMOE_NETNS_STATE=str(state), **extra)
    # The coordinator's API key would come from here; these tests serve without one.
    env.pop("EDGEMOE_API_KEY", None)
    if "EDGEMOE_BIN_DIR" not in extra and (Path(sys.executable).parent / "edgemoe").exists():
        env["EDGEMOE_BIN_DIR"] = str(Path(sys.executable).parent)
    return env


def run_script(*args: str, env: dict[str, str], timeout: float = SCRIPT_TIMEOUT,
               argv: list[str] | None = None, cwd: Path | str = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([*(argv or ["bash", str(SCRIPT)]), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=cwd)


def pid_files(state: Path) -> dict[str, int]:
    return {p.stem: int(p.read_text()) for p in state.glob("*.pid") if p.read_text().strip().isdigit()}


@dataclass
class Cluster:
    state: Path
    env: dict[str, str]
    packed: Path
    up: subprocess.CompletedProcess
    pids: dict[str, int] = field(default_factory=dict)

    def in_coord(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", f"{PREFIX}coord", *argv], capture_output=True, text=True,
                              env=self.env, timeout=timeout)

    def http(self, path: str, body: dict | None = None) -> str:
        out = self.in_coord(sys.executable, "-c", HTTP, f"http://{COORD_ADDR}:{PORT}{path}",
                            *([json.dumps(body)] if body is not None else []))
        assert out.returncode == 0, out.stderr
        return out.stdout

    def edgemoe(self, *args: str) -> subprocess.CompletedProcess:
        return self.in_coord("env", f"EDGEMOE_HOME={self.state}", str(Path(self.env["EDGEMOE_BIN_DIR"]) / "edgemoe")
                             if "EDGEMOE_BIN_DIR" in self.env else "edgemoe", *args)


def take_down(prefix: str, env: dict[str, str], started: set[int]) -> subprocess.CompletedProcess:
    """`down`, then: no namespace with the prefix, and none of `started` (nor what ran in them) alive."""
    started = started | namespace_pids(prefix)
    down = run_script("down", env=env)
    assert down.returncode == 0, down.stderr
    assert not namespaces(prefix), f"namespaces left behind: {namespaces(prefix)}"
    deadline = time.monotonic() + 5
    while any(alive(p) for p in started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in started if alive(p)], f"processes left running: {[p for p in started if alive(p)]}"
    return down


@pytest.fixture(scope="module")
def cluster(models, tmp_path_factory):
    state = tmp_path_factory.mktemp("deploy-cluster") / "state"
    env = script_env(PREFIX, SUBNET, state)
    if namespaces(PREFIX):  # left by a run that was killed: this prefix is this file's alone
        run_script("down", env=env)
    packed = models.packed("qwen3_moe", True)
    started: set[int] = set()
    try:
        # A tiny coordinator cache, so the experts are placed on the nodes and computed there.
        up = run_script("up", "2", "--model", str(packed), "--cache-mb", "0.01", "--node-cache-mb", "1", env=env)
        pids = pid_files(state) if state.is_dir() else {}
        started |= set(pids.values()) | namespace_pids(PREFIX)
        assert up.returncode == 0, f"up failed: {up.stderr}\n{up.stdout}"
        yield Cluster(state, env, packed, up, pids)
    finally:
        take_down(PREFIX, env, started)


def test_up_starts_two_nodes_and_the_coordinator(cluster):
    assert set(cluster.pids) == {"node1", "node2", "coordinator"}
    assert namespaces(PREFIX) == {f"{PREFIX}{n}" for n in ("hub", "coord", "node1", "node2")}
    for name, pid in cluster.pids.items():
        assert alive(pid), name
        assert netns_of(pid) == (f"{PREFIX}coord" if name == "coordinator" else f"{PREFIX}{name}")
    for node in ("node1", "node2"):
        assert " listening on " in (cluster.state / f"{node}.log").read_text()
    # The token reaches the nodes through their environment, never their command line.
    token = (cluster.state / "cluster" / "join-token").read_text().strip()
    for name, pid in cluster.pids.items():
        assert token not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"), name
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert (f"EDGEMOE_JOIN_TOKEN={token}".encode() in environ) == name.startswith("node"), name
    coordinator = Path(f"/proc/{cluster.pids['coordinator']}/cmdline").read_bytes().split(b"\0")
    assert coordinator[-9:-1] == [b"--host", COORD_ADDR.encode(), b"--port", str(PORT).encode(), b"--peers",
                                  ",".join(NODES).encode(), b"--cache-mb", b"0.01"]
    # It says what runs where and how to use it.
    out = cluster.up.stdout
    for text in (f"http://{COORD_ADDR}:{PORT}/v1", f"{PREFIX}node1", f"{PREFIX}node2", *NODES,
                 f"ip netns exec {PREFIX}coord curl -s http://{COORD_ADDR}:{PORT}/v1/models", "peers --peers",
                 "chat --model", " status", " down"):
        assert text in out, text
    assert json.loads(cluster.http("/v1/models"))["data"][0]["id"] == cluster.packed.resolve().name


def node_metrics(cluster) -> dict[str, dict[str, float]]:
    """Per node address: its calls, experts computed and health, from GET /metrics."""
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(cluster.http("/metrics")):
        for s in family.samples:
            if s.name in ("edgemoe_node_calls_total", "edgemoe_node_experts_total", "edgemoe_node_healthy"):
                out.setdefault(s.labels["node"], {})[s.name] = s.value
    return out


def test_completions_equal_mlx_lm_and_use_the_nodes(cluster, models):
    src = models.src("qwen3_moe", True)
    expected, expected_text = mlx_lm_tokens(src, encode(models, src, PROMPT), max_tokens=MAX_TOKENS, models=models)
    body = {"model": cluster.packed.resolve().name, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
            "return_token_ids": True}
    deadline = time.monotonic() + USE_NODES_TIMEOUT
    while True:
        choice = json.loads(cluster.http("/v1/completions", body))["choices"][0]
        assert choice["token_ids"] == expected
        assert choice["text"] == expected_text
        metrics = node_metrics(cluster)
        assert set(metrics) == set(NODES)
        assert all(m["edgemoe_node_healthy"] == 1 for m in metrics.values()), metrics
        if any(m["edgemoe_node_calls_total"] > 0 and m["edgemoe_node_experts_total"] > 0 for m in metrics.values()):
            break
        # The experts are pushed in the background while it generates: the next request uses them.
        assert time.monotonic() < deadline, f"no node was used within {USE_NODES_TIMEOUT}s: {metrics}"
    # The printed `peers` command sees both nodes, healthy and holding experts.
    peers = cluster.edgemoe("peers", "--json", "--peers", ",".join(NODES))
    assert peers.returncode == 0, peers.stderr
    rows = json.loads(peers.stdout)
    assert {(r["address"], r["name"]) for r in rows} == {(NODES[0], "node1"), (NODES[1], "node2")}
    assert all(r["healthy"] for r in rows), rows
    assert any(r["experts_held"] for r in rows), rows


def test_status_shows_what_runs_where(cluster):
    out = run_script("status", env=cluster.env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for name, ns, addr in (("coordinator", "coord", COORD_ADDR), ("node1", "node1", NODES[0].split(":")[0]),
                           ("node2", "node2", NODES[1].split(":")[0])):
        line = next(line for line in lines if line.split() and line.split()[0] == f"{PREFIX}{ns}")
        assert addr in line and f"running (pid {cluster.pids[name]})" in line, line
    assert any(line.split()[0] == f"{PREFIX}hub" for line in lines if line.split())


def test_second_up_is_refused_and_leaves_the_cluster_alone(cluster):
    before = namespaces(PREFIX)
    out = run_script("up", "1", env=cluster.env)
    assert out.returncode != 0
    assert len(out.stderr.strip().splitlines()) == 1 and "already up" in out.stderr, out.stderr
    assert namespaces(PREFIX) == before
    assert all(alive(pid) for pid in cluster.pids.values())


def test_down_stops_everything_and_is_idempotent(cluster):
    take_down(PREFIX, cluster.env, set(cluster.pids.values()))
    assert not list(cluster.state.glob("*.pid"))
    assert (cluster.state / "coordinator.log").exists() and (cluster.state / "node1.log").exists()
    again = run_script("down", env=cluster.env)
    assert again.returncode == 0 and "no cluster was up" in again.stdout, again.stderr
    status = run_script("status", env=cluster.env)
    assert status.returncode == 0 and "no cluster is up" in status.stdout
    purge = run_script("down", "--purge", env=cluster.env)
    assert purge.returncode == 0, purge.stderr
    assert not cluster.state.exists()


# ---------------------------------------------------------------------------
# Bad input, and nodes that fail to start: one line, non-zero, nothing left behind.


@pytest.fixture
def bad(tmp_path):
    """The bad-input tests' env (a prefix, subnet and state dir of their own); takes down whatever they made."""
    env = script_env(BAD_PREFIX, BAD_SUBNET, tmp_path / "state")
    started: set[int] = set()
    yield env, started
    take_down(BAD_PREFIX, env, started)


def assert_refused(out: subprocess.CompletedProcess, env: dict[str, str], *words: str) -> None:
    assert out.returncode != 0, out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("netns-cluster: "), out.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not namespaces(BAD_PREFIX)


@pytest.mark.parametrize("args, words", [
    ([], ["number of nodes"]),
    (["0"], ["number of nodes"]),
    (["x"], ["number of nodes"]),
    (["201"], ["number of nodes"]),
    (["1", "--model", "/nonexistent"], ["/nonexistent", "edgemoe pack"]),
    (["1", "--model", "NOT-PACKED"], ["manifest.json", "edgemoe pack"]),
    (["1", "--model"], ["--model needs a value"]),
    (["1", "--bogus"], ["--bogus"]),
    (["1", "--port", "70000"], ["--port"]),
    (["1", "--node-cache-mb", "0"], ["--node-cache-mb"]),
])
def test_bad_input_one_line_nothing_left(bad, tmp_path, args, words):
    env, _ = bad
    args = [str(tmp_path) if a == "NOT-PACKED" else a for a in args]
    assert_refused(run_script("up", *args, env=env), env, *words)
    assert not Path(env["EDGEMOE_NETNS_STATE"]).exists()


@pytest.mark.parametrize("args", [["down", "x"], ["status", "x"], ["frob"]])
def test_bad_command_one_line(bad, args):
    env, _ = bad
    assert_refused(run_script(*args, env=env), env, args[-1])


def test_not_root_and_no_ip_refused(bad, tmp_path):
    env, _ = bad
    bash = shutil.which("bash")
    empty = tmp_path / "empty-path"
    empty.mkdir()
    out = run_script("up", "1", env={**env, "PATH": str(empty)}, argv=[bash, str(SCRIPT)])
    assert_refused(out, env, "the ip command")
    if shutil.which("setpriv"):
        # The script's text on the command line: nobody need not be able to read this checkout.
        out = run_script("up", "1", env=env, cwd="/", argv=[
            "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", bash, "-c", SCRIPT.read_text(),
            "netns-cluster.sh"])
        assert_refused(out, env, "root")
    assert not Path(env["EDGEMOE_NETNS_STATE"]).exists()


FAILING_NODE = """#!/bin/sh
echo $$ >> "$EDGEMOE_TEST_FAKE_PIDS"
echo "edge-node: error: this node cannot start" >&2
exit 2
"""
SILENT_NODE = """#!/bin/sh
echo $$ >> "$EDGEMOE_TEST_FAKE_PIDS"
echo "edge-node: starting, not listening yet"
exec sleep 300
"""


@pytest.mark.parametrize("node, words", [(FAILING_NODE, ["node1 exited before listening", "cannot start"]),
                                         (SILENT_NODE, ["did not listen within 2s", "not listening yet"])],
                         ids=["exits", "never-listens"])
def test_node_that_does_not_start_cleans_up(bad, tmp_path, node, words):
    env, started = bad
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "edgemoe").symlink_to(Path(env["EDGEMOE_BIN_DIR"]) / "edgemoe" if "EDGEMOE_BIN_DIR" in env
                                     else shutil.which("edgemoe"))
    (bin_dir / "edge-node").write_text(node)
    (bin_dir / "edge-node").chmod(0o755)
    fake_pids = tmp_path / "fake.pids"
    out = run_script("up", "2", env={**env, "EDGEMOE_BIN_DIR": str(bin_dir), "EDGEMOE_NETNS_TIMEOUT": "2",
                                     "EDGEMOE_TEST_FAKE_PIDS": str(fake_pids)})
    pids = {int(p) for p in fake_pids.read_text().split()} if fake_pids.exists() else set()
    started |= pids
    assert pids, f"the fake nodes did not start: {out.stderr}"
    assert_refused(out, env, *words)
    assert not [p for p in pids if alive(p)]
    assert not list(Path(env["EDGEMOE_NETNS_STATE"]).glob("*.pid"))
