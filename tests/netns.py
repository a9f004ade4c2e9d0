"""Test hosts on one machine: network namespaces on a private bridge, and a delaying TCP relay
(DelayRelay, which lives in coordinator/relay.py and is re-exported here).

Everything here lives inside namespaces the tests create: the bridge sits in a
"hub" namespace of its own and every address (10.213.0.0/24) is assigned
inside a namespace, so the root namespace's interfaces never see test traffic.
Cleanup stops the processes started in a namespace and deletes the namespaces,
which destroys their veths and the bridge with them.

A relay inside a namespace runs as `python -m edgemoe.coordinator.relay` (see `run_relay_in`).
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgemoe.coordinator.relay import DelayRelay  # noqa: F401  (re-exported for the tests)

log = logging.getLogger(__name__)

PREFIX = "edgemoe-test-"
SUBNET = "10.213.0"
NETNS_DIR = Path("/run/netns")
# A namespace left by a test run that was killed (SIGKILL, power loss) is
# removed by a later run once its creator is gone and it is this old.
STALE_AFTER_S = 600


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


@functools.cache
def unavailable_reason() -> str | None:
    """Why namespace tests cannot run here (for pytest.skip), or None when they can."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (run the tests as root)"
    sweep_stale()
    name = _new_name()
    try:
        _ip("netns", "add", name)
        _ip("-n", name, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1")
        _ip("-n", name, "link", "add", "probebr", "type", "bridge")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        return f"`ip netns` / veth / bridge do not work here: {getattr(e, 'stderr', '') or e}".strip()
    finally:
        _ip("netns", "del", name, check=False)
    return None


def _new_name() -> str:
    return f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Delete test namespaces whose creating process is gone and that are old; returns their names."""
    removed = []
    if not NETNS_DIR.is_dir():
        return removed
    for path in NETNS_DIR.glob(f"{PREFIX}*"):
        try:
            pid = int(path.name[len(PREFIX):].split("-")[0])
            age = time.time() - path.stat().st_mtime
        except (ValueError, OSError):
            continue
        if _pid_alive(pid) or age < STALE_AFTER_S:
            continue
        _kill_namespace_pids(path.name)
        _ip("netns", "del", path.name, check=False)
        removed.append(path.name)
        log.warning("removed stale test namespace %s", path.name)
    return removed


def _kill_namespace_pids(name: str) -> None:
    out = _ip("netns", "pids", name, check=False).stdout
    for pid in (int(p) for p in out.split() if p.isdigit()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Proc:
    """A process started in a namespace; its stdout lines are collected by a thread."""

    def __init__(self, argv: list[str], popen: subprocess.Popen, stderr_file) -> None:
        self.argv = argv
        self.popen = popen
        self._stderr = stderr_file
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stderr(self) -> str:
        self._stderr.flush()
        return Path(self._stderr.name).read_text(errors="replace")

    def wait_for_line(self, predicate: Callable[[str], bool], timeout: float) -> str:
        """The first new stdout line that matches; TimeoutError (with the process's stderr) otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=max(remaining, 0)) if remaining > 0 else self._lines.get_nowait()
            except queue.Empty:
                raise TimeoutError(
                    f"no matching line from {self.argv} within {timeout:.1f} s; "
                    f"stdout so far {self.lines[-5:]!r}; stderr:\n{self.stderr()[-2000:]}"
                ) from None
            if line is None:
                raise RuntimeError(
                    f"{self.argv} exited ({self.popen.wait()}) before a matching line; "
                    f"stdout {self.lines[-5:]!r}; stderr:\n{self.stderr()[-2000:]}"
                )
            self.lines.append(line)
            if predicate(line):
                return line

    def stop(self, timeout: float = 3.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._stderr.close()
        return self.popen.returncode


@dataclass
class Namespace:
    """`ip netns add edgemoe-test-<pid>-<random>` with `lo` up; deleted (processes killed) on exit."""

    name: str = field(default_factory=_new_name)
    address: str | None = None
    procs: list[Proc] = field(default_factory=list)

    def __enter__(self) -> Namespace:
        self.create()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def create(self) -> None:
        _ip("netns", "add", self.name)
        try:
            _ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.cleanup()
            raise

    def ip(self, *args: str) -> subprocess.CompletedProcess:
        """`ip -n NAME ARGS`: configure this namespace."""
        return _ip("-n", self.name, *args)

    def run(self, argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess:
        """Run a short command inside the namespace and wait for it."""
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            capture_output=True, text=True, timeout=timeout,
        )

    def cleanup(self) -> None:
        for proc in self.procs:
            try:
                proc.stop()
            except Exception:  # noqa: BLE001 - cleanup must reach the namespace delete
                log.exception("could not stop %s", proc.argv)
        self.procs.clear()
        _kill_namespace_pids(self.name)
        _ip("netns", "del", self.name, check=False)


def run_in(ns: Namespace, argv: list[str], env: dict[str, str] | None = None) -> Proc:
    """Start `argv` inside `ns` (`ip netns exec`); the namespace's cleanup stops it."""
    stderr_file = tempfile.NamedTemporaryFile("w+", prefix="edgemoe-netns-", suffix=".err", delete=True)
    popen = subprocess.Popen(
        ["ip", "netns", "exec", ns.name, *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr_file,
        text=True,
        env=env,
    )
    proc = Proc(argv, popen, stderr_file)
    ns.procs.append(proc)
    return proc


class Lan:
    """`n` namespaces joined by a bridge that lives in a hub namespace of its own.

    Host i (0-based) gets `eth0` with address 10.213.0.(i+1)/24.
    """

    def __init__(self, n: int) -> None:
        if not 1 <= n <= 200:
            raise ValueError("a Lan has 1 to 200 hosts")
        self.n = n
        self.hub = Namespace()
        self.hosts: list[Namespace] = []

    def __enter__(self) -> Lan:
        try:
            self._create()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def _create(self) -> None:
        self.hub.create()
        self.hub.ip("link", "add", "br0", "type", "bridge")
        self.hub.ip("link", "set", "br0", "up")
        for i in range(self.n):
            host = Namespace(address=f"{SUBNET}.{i + 1}")
            self.hosts.append(host)
            host.create()
            # Both veth ends are created directly inside namespaces, never in the root one.
            self.hub.ip("link", "add", f"h{i}", "type", "veth", "peer", "name", "eth0", "netns", host.name)
            self.hub.ip("link", "set", f"h{i}", "master", "br0", "up")
            host.ip("addr", "add", f"{host.address}/24", "dev", "eth0")
            host.ip("link", "set", "eth0", "up")

    def cleanup(self) -> None:
        for ns in [*self.hosts, self.hub]:
            ns.cleanup()
        self.hosts.clear()


def run_relay_in(
    ns: Namespace, target: tuple[str, int], delay_s: float, listen_host: str, timeout: float = 10
) -> tuple[Proc, int]:
    """A DelayRelay inside `ns` on `listen_host` (port chosen by the kernel); returns (proc, port).

    The relay process is stopped with the namespace, or earlier with `proc.stop()`.
    """
    proc = run_in(ns, [
        sys.executable, "-m", "edgemoe.coordinator.relay",
        "--listen", f"{listen_host}:0", "--target", f"{target[0]}:{target[1]}",
        "--delay-ms", str(delay_s * 1000),
    ])
    line = proc.wait_for_line(lambda s: s.startswith("LISTENING "), timeout)
    return proc, int(line.split()[2])
