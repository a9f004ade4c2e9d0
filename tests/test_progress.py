"""Progress bars (tqdm) for packing, loading the dense part and pushing experts to nodes:
drawn on a real terminal (a pseudo-terminal here), absent when output goes to a pipe."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest
from conftest import REPO, cli_env, run_cli

from edgemoe.coordinator.local_nodes import Children, start_nodes
from edgemoe.node.manifest import read_manifest

BAR = "%|"


def run_on_terminal(*args: str, timeout: float = 180) -> tuple[int, str, str]:
    """`edgemoe ARGS` with stderr on a pseudo-terminal; returns (exit code, stdout, what the terminal showed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "edgemoe.coordinator.cli", *map(str, args)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=cli_env(), cwd=REPO)
    os.close(slave)
    shown: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the last writer closed the terminal
                return
            if not data:
                return
            shown.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
        reader.join(10)
        os.close(master)
    return proc.returncode, stdout.decode(), b"".join(shown).decode(errors="replace")


def test_pack_draws_a_bar_on_a_terminal_only(models, tmp_path):
    src = models.src()
    code, _, shown = run_on_terminal("pack", src, tmp_path / "a")
    assert code == 0, shown
    assert "packing experts" in shown and BAR in shown and "100%" in shown
    piped = run_cli("pack", src, tmp_path / "b")
    assert piped.returncode == 0, piped.stderr
    assert "packing experts" not in piped.stderr and BAR not in piped.stderr
    forced = run_cli("pack", src, tmp_path / "c", "--progress")
    assert forced.returncode == 0, forced.stderr
    assert "packing experts" in forced.stderr


def test_loading_the_dense_part_draws_a_bar_on_a_terminal_only(models):
    packed = models.packed()
    args = ("generate", "--model", packed, "--prompt", "hello", "--max-tokens", "2", "--peers", "none")
    code, _, shown = run_on_terminal(*args)
    assert code == 0, shown
    assert "loading dense weights" in shown and BAR in shown
    piped = run_cli(*args)
    assert piped.returncode == 0, piped.stderr
    assert "loading dense weights" not in piped.stderr and BAR not in piped.stderr


@pytest.fixture
def node(tmp_path):
    """One edge node on loopback with a fresh cluster; yields (its address, the cluster dir)."""
    cluster_dir = tmp_path / "cluster"
    init = run_cli("cluster", "init", "--dir", cluster_dir)
    assert init.returncode == 0, init.stderr
    token = init.stdout.strip().splitlines()[-1]
    children = Children()
    try:
        ((_, address),) = start_nodes(children, token, tmp_path, 1, 64 * 2**20)
        yield address, cluster_dir
    finally:
        children.stop_all()
    assert all(child.popen.poll() is not None for child in children.items)


def held_by(address: str, cluster_dir: Path) -> int:
    r = run_cli("peers", "--peers", address, "--cluster-dir", cluster_dir, "--json")
    assert r.returncode == 0, r.stderr
    (peer,) = json.loads(r.stdout)
    return peer["experts_held"]


def test_push_shows_a_bar_per_node_and_the_node_holds_its_share(models, node):
    address, cluster_dir = node
    packed = models.packed()
    manifest = read_manifest(packed)
    n_experts = sum(spec.num_experts for spec in manifest.layers)
    # the coordinator caches one expert; placement gives the node the rest
    args = ("push", "--model", packed, "--peers", address, "--cluster-dir", cluster_dir,
            "--cache-mb", repr(manifest.expert_bytes / 2**20))
    code, stdout, shown = run_on_terminal(*args)
    assert code == 0, shown
    assert "pushing experts to node1" in shown and BAR in shown and "100%" in shown
    assert f"node1 ({address}): holds {n_experts - 1} of the {n_experts - 1} experts placed on it" in stdout
    assert held_by(address, cluster_dir) == n_experts - 1
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert BAR not in again.stderr and f"holds {n_experts - 1} of the {n_experts - 1}" in again.stdout


def test_push_without_nodes_is_one_line(models):
    r = run_cli("push", "--model", models.packed(), "--peers", "none")
    assert r.returncode == 2
    assert "no nodes to push to" in r.stderr and len(r.stderr.strip().splitlines()) == 1
