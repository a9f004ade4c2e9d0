"""A TCP relay that adds a fixed delay each way: the latency of a LAN link, on one machine.

This kernel has no `sch_netem` (docs/DESIGN.md), so the cluster bench and the tests
put a DelayRelay between the coordinator and each node instead. Also a command
line, to run one in a process of its own:

    python -m edgemoe.coordinator.relay --listen HOST:PORT --target HOST:PORT --delay-ms MS

It prints `LISTENING HOST PORT` once it accepts connections and runs until
SIGTERM or SIGINT (or its lifetime ends).
"""

from __future__ import annotations

import argparse
import logging
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

from edgemoe.node.addresses import parse_address

log = logging.getLogger(__name__)


class DelayRelay:
    """A TCP relay from a listen address to a target that delays every chunk one way by `delay_s`.

    The delay is applied per direction, so a request-reply round trip through the
    relay takes at least 2 x `delay_s` more. Chunks are pipelined (a chunk is held
    until its own due time, not behind the previous chunk's sleep), so throughput
    is not cut. The relay stops itself after `max_lifetime_s` so a forgotten one
    cannot outlive a test run for long.
    """

    def __init__(
        self,
        target: tuple[str, int],
        delay_s: float,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        max_lifetime_s: float = 300.0,
    ) -> None:
        self.target = target
        self.delay_s = delay_s
        self.max_lifetime_s = max_lifetime_s
        self._listener = socket.create_server(listen, family=_family(listen[0]))
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []

    def start(self) -> DelayRelay:
        self._spawn(self._accept_loop)
        self._spawn(self._expire)
        return self

    def stop(self) -> None:
        """Close the listener and every relayed connection; waits briefly for the threads."""
        self._stopped.set()
        self._close(self._listener)
        with self._lock:
            sockets = list(self._sockets)
        for s in sockets:
            self._close(s)
        for t in list(self._threads):
            if t is not threading.current_thread():
                t.join(timeout=2)

    def __enter__(self) -> DelayRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, target: Callable, *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def _expire(self) -> None:
        if not self._stopped.wait(self.max_lifetime_s):
            log.warning("DelayRelay on %s stopping after its %.0f s lifetime", self.address, self.max_lifetime_s)
            self.stop()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError as e:
                log.warning("DelayRelay cannot reach %s: %s", self.target, e)
                self._close(client)
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                chunks: queue.Queue[tuple[float, bytes]] = queue.Queue()
                self._spawn(self._read, src, chunks)
                self._spawn(self._write, dst, chunks)

    def _read(self, src: socket.socket, chunks: queue.Queue) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            chunks.put((time.monotonic() + self.delay_s, data))
            if not data:
                return

    def _write(self, dst: socket.socket, chunks: queue.Queue) -> None:
        while True:
            due, data = chunks.get()
            if self._stopped.wait(max(0.0, due - time.monotonic())):
                return
            try:
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
            except OSError:
                return

    def _close(self, s: socket.socket) -> None:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgemoe.coordinator.relay",
                                     description="Run a DelayRelay until SIGTERM.")
    parser.add_argument("--listen", required=True, help="HOST:PORT (port 0: any free port)")
    parser.add_argument("--target", required=True, help="HOST:PORT")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay per chunk")
    parser.add_argument("--max-lifetime-s", type=float, default=300.0)
    args = parser.parse_args(argv)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    target, listen = parse_address(args.target), parse_address(args.listen, port_zero=True)
    with DelayRelay(target, args.delay_ms / 1000, listen=listen, max_lifetime_s=args.max_lifetime_s) as relay:
        print(f"LISTENING {relay.address[0]} {relay.address[1]}", flush=True)
        done.wait(args.max_lifetime_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
