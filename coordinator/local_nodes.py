"""Edge nodes and helper processes on this machine, for `edgemoe bench --cluster` and `edgemoe demo`.

Nodes listen on 127.0.0.1 only and do not advertise over mDNS, so nothing
leaves loopback; every process started here is ended by `Children.stop_all`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from edgemoe.node.addresses import format_address
from edgemoe.node.errors import EdgemoeError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0
PORT_ATTEMPTS = 3


@dataclass
class Child:
    """A process we started; its output goes to files in a work dir."""

    name: str
    popen: subprocess.Popen
    stdout: Path
    stderr: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.stdout.read_text(errors="replace") if self.stdout.exists() else ""

    def error_text(self) -> str:
        text = self.stderr.read_text(errors="replace").strip() if self.stderr.exists() else ""
        return text.splitlines()[-1] if text else f"exit code {self.popen.poll()}"


@dataclass
class Children:
    """Every process we started; `stop_all` ends them (SIGTERM, then SIGKILL)."""

    items: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None) -> Child:
        out, err = workdir / f"{name}.out", workdir / f"{name}.err"
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=env)
        child = Child(name, popen, out, err)
        self.items.append(child)
        return child

    def stop(self, children: list[Child]) -> None:
        for child in children:
            if child.popen.poll() is None:
                child.popen.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child in children:
            try:
                child.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM; killing it", child.name, child.pid)
                child.popen.kill()
                child.popen.wait()

    def stop_all(self) -> None:
        self.stop(list(reversed(self.items)))

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self.items]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for_output(child: Child, marker: str, timeout: float) -> str | None:
    """The first stdout line of `child` containing `marker`; None if it exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in child.output().splitlines():
            if marker in line:
                return line
        if child.popen.poll() is not None:
            return None
        time.sleep(0.05)
    raise EdgemoeError(f"{child.name} did not start within {timeout:.0f}s: {child.error_text()}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt meanwhile, so the cleanup still runs."""

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: nothing to install
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _spawn_node(children: Children, token: str, workdir: Path, index: int, cache_bytes: int) -> tuple[Child, str]:
    name = f"node{index}"
    address = format_address(HOST, free_port())
    # The token goes by environment, out of the process list.
    env = dict(os.environ, EDGEMOE_JOIN_TOKEN=token)
    child = children.start(name, [
        sys.executable, "-m", "edgemoe.node.daemon", "--listen", address, "--data-dir", str(workdir / name),
        "--cache-mb", repr(cache_bytes / 2**20), "--name", name, "--no-advertise",
    ], workdir, env)
    return child, address


def start_nodes(children: Children, token: str, workdir: Path, count: int, cache_bytes: int) -> list[tuple[Child, str]]:
    """`count` edge nodes (node1, node2, ...) on 127.0.0.1, started together; returns each
    running node's process and address."""
    started = [_spawn_node(children, token, workdir, i + 1, cache_bytes) for i in range(count)]
    running = []
    for index, (child, address) in enumerate(started):
        for _ in range(PORT_ATTEMPTS):
            if wait_for_output(child, "listening", START_TIMEOUT_S):
                break
            # Another process took the port between our probe and the node's bind.
            if "in use" not in child.error_text():
                raise EdgemoeError(f"edge-node {child.name} did not start: {child.error_text()}")
            child, address = _spawn_node(children, token, workdir, index + 1, cache_bytes)
        else:
            raise EdgemoeError(f"edge-node {child.name} found no free port: {child.error_text()}")
        running.append((child, address))
    return running
