"""Edge nodes on loopback for the tests: real `edge-node` processes and a coordinator that uses them."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from edgemoe.coordinator.loader import load_streaming_model
from edgemoe.node.credentials import ClusterCredentials


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NodeProcess:
    """`edge-node` on 127.0.0.1, started and listening once constructed."""

    def __init__(self, token: str, data_dir: Path, cache_mb: float = 1, port: int | None = None,
                 args: tuple[str, ...] = ()):
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgemoe.node.daemon", "--join", token, "--listen", self.address, "--data-dir",
             str(data_dir), "--cache-mb", str(cache_mb), "--no-advertise", "--name", data_dir.name, *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        line = self.proc.stdout.readline()
        assert "listening" in line, self.proc.stderr.read()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=20)


def coordinator(packed: Path, token: str, addresses: list[str], cache_bytes: int, **kwargs):
    """The streaming model with these nodes as its peers."""
    creds = ClusterCredentials.from_token(token, "coordinator")
    return load_streaming_model(packed, cache_bytes=cache_bytes, peers=addresses, credentials=creds, **kwargs)


def wait_for_placement(sm, timeout: float = 60.0) -> None:
    """Until every healthy node holds all the experts placement gave it."""
    deadline = time.monotonic() + timeout
    while not sm.cluster.placement_complete():
        assert time.monotonic() < deadline, (
            f"experts never reached the nodes: {[len(p.held) for p in sm.cluster.peers]}")
        time.sleep(0.1)
