"""`edge-node`: serves this device's experts to the cluster's coordinator."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .addresses import format_address, parse_address
from .credentials import SERVER_OPTIONS, ClusterCredentials, parse_token, server_credentials, token_expiry
from .errors import EdgemoeError
from .interfaces import resolve_interface
from .limits import default_node_cache_mb, mlx_backend_missing
from .version import PROTOCOL_VERSION

if TYPE_CHECKING:
    from .holdings import NodeHoldings
    from .service import NodeIdentity

log = logging.getLogger("edge-node")

DEFAULT_DISK_MB = 100 * 1024
DEFAULT_MAX_MODELS = 16


class ListenError(EdgemoeError):
    """The address to listen on is malformed or taken."""


def node_id(data_dir: Path) -> str:
    """A random id, made once and kept in the data dir, so a restarted node is the same node."""
    from .holdings import write_durably

    path = data_dir / "node_id"
    if path.exists():
        return path.read_text().strip()
    value = uuid.uuid4().hex[:16]
    write_durably(path, (value + "\n").encode())
    return value


def parse_listen(text: str) -> tuple[str, int]:
    """`--listen HOST:PORT`; no host means every IPv4 interface."""
    try:
        return parse_address(text, empty_host="0.0.0.0")
    except ValueError as exc:
        raise ListenError(f"--listen {text!r}: {exc}; "
                          "write HOST:PORT (e.g. 0.0.0.0:7070, IPv6 as [ADDR]:PORT)") from None


async def serve(args: argparse.Namespace) -> None:
    # Imported here: they load MLX, whose missing backend `main` reports in one line.
    from .holdings import NodeHoldings
    from .service import NodeIdentity, NodeService, add_to_server

    secret = parse_token(args.join)
    data_dir = Path(args.data_dir).expanduser()
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    if args.interface and not args.no_advertise:
        resolve_interface(args.interface)  # a wrong one stops the node now, with one line
    identity = NodeIdentity(node_id(data_dir), args.name or socket.gethostname(), int(args.cache_mb * 2**20))
    credentials = ClusterCredentials.create(secret, identity.name)
    holdings = NodeHoldings(data_dir, int(args.disk_mb * 2**20), args.max_models)
    service = NodeService(identity, holdings)
    # so_reuseport off: a second node on a taken port must fail, not share it.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *SERVER_OPTIONS])
    add_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    host, port = parse_listen(args.listen)
    try:
        port = server.add_secure_port(format_address(host, port), server_credentials(credentials))
    except RuntimeError as exc:
        raise ListenError(f"cannot listen on {args.listen} (in use?); pick another port with --listen") from exc
    if port == 0:
        raise ListenError(f"cannot listen on {args.listen} (in use?); pick another port with --listen")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    advertisement = await _advertise(args, identity, port, credentials.cluster_id, holdings)
    print(f"edge-node {identity.name} ({identity.node_id}) listening on {format_address(host, port)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    expires = token_expiry(args.join)
    if expires is not None:
        def expired() -> None:
            log.warning("the join token expired: leaving the cluster (restart with a new token)")
            stop.set()

        loop.call_later(max(0.0, expires - time.time()), expired)
    try:
        await stop.wait()
    finally:
        if advertisement is not None:
            await advertisement.async_close()
        await server.stop(grace=1.0)
        service.close()


async def _advertise(args, identity: NodeIdentity, port: int, cluster_id: str, holdings: NodeHoldings):
    host = parse_listen(args.listen)[0]
    interface = args.interface or (None if host in ("0.0.0.0", "::") else host)
    if interface is None or args.no_advertise:
        log.warning("not advertising over mDNS: pass --interface ADDR|NAME (this device's LAN address or "
                    "interface) to be found")
        return None
    from .advertise import KeptAdvertisement, NodeAdvertisement

    def advertisement(address: str) -> NodeAdvertisement:
        return NodeAdvertisement(identity.node_id, identity.name, port, address, PROTOCOL_VERSION, cluster_id,
                                 list(holdings.snapshot()))

    kept = KeptAdvertisement(interface, advertisement)
    await kept.start()
    return kept


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-node", description="Serve this device's experts to an edgemoe cluster.")
    p.add_argument("--join", default=os.environ.get("EDGEMOE_JOIN_TOKEN"), metavar="TOKEN",
                   help="the join token `edgemoe cluster init` printed (default: $EDGEMOE_JOIN_TOKEN, which keeps "
                   "it out of the process list)")
    p.add_argument("--listen", default="0.0.0.0:7070", metavar="HOST:PORT")
    p.add_argument("--cache-mb", type=float, default=None,
                   help="budget for the experts of every model this node computes, together, in MiB (default: a "
                   "quarter of the memory its arrays live in: GPU memory on CUDA, RAM on the CPU)")
    p.add_argument("--disk-mb", type=float, default=DEFAULT_DISK_MB,
                   help="disk quota for pushed experts, every model's files at full size, in MiB "
                   f"(default {DEFAULT_DISK_MB})")
    p.add_argument("--max-models", type=int, default=DEFAULT_MAX_MODELS,
                   help=f"how many models this node keeps experts of (default {DEFAULT_MAX_MODELS})")
    p.add_argument("--data-dir", default="~/.local/share/edgemoe-node", help="where pushed experts are kept")
    p.add_argument("--interface", metavar="ADDR|NAME",
                   help="LAN address or interface name (e.g. eth0) to advertise on (mDNS)")
    p.add_argument("--name", help="a name for this node (default: the host name)")
    p.add_argument("--no-advertise", action="store_true", help="do not advertise over mDNS")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, with `--cache-mb`'s default filled in (it asks MLX for the array memory)."""
    args = build_parser().parse_args(argv)
    if args.cache_mb is None:
        args.cache_mb = default_node_cache_mb()
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
        if not args.join:
            raise EdgemoeError("no join token: pass --join TOKEN or set EDGEMOE_JOIN_TOKEN "
                               "(the last line of `edgemoe cluster init` on the coordinator)")
        for flag, value in (("--cache-mb", args.cache_mb), ("--disk-mb", args.disk_mb),
                            ("--max-models", args.max_models)):
            if not value > 0:
                raise EdgemoeError(f"{flag} {value} must be positive")
        asyncio.run(serve(args))
    except EdgemoeError as exc:
        print(f"edge-node: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        if (problem := mlx_backend_missing(exc)) is None:
            raise
        print(f"edge-node: error: {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
