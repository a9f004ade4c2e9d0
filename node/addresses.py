"""HOST:PORT: the one parser and formatter of node, peer and relay addresses.

IPv6 hosts are written in brackets (`[::1]:7070`), as gRPC targets and URLs want
them; a bare `::1:7070` is refused, since its last colon is ambiguous.
"""

from __future__ import annotations

import ipaddress
import re

from .errors import PeerAddressError

_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?$")
PEERS_HELP = "write peers as HOST:PORT,HOST:PORT (IPv6 as [ADDR]:PORT)"


def parse_address(text: str, empty_host: str | None = None, port_zero: bool = False) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port), the IPv6 host without brackets.

    `empty_host` is what a missing host means (`:7070`; refused when None), and
    `port_zero` allows port 0 (the kernel's pick). Raises ValueError saying what
    is wrong, for the caller to put in its own one-line message.
    """
    if text.startswith("["):
        m = re.fullmatch(r"\[([^\]]*)\](?::(.*))?", text)
        if not m or m.group(2) is None:
            raise ValueError("has no port")
        host, port_text = m.group(1), m.group(2)
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError("has no port")
        if ":" in host:
            raise ValueError("put the IPv6 address in brackets")
        if not host:
            if empty_host is None:
                raise ValueError("has no host")
            host = empty_host
        elif not _HOSTNAME_RE.match(host):
            raise ValueError(f"{host!r} is not a host name or address")
    lowest = 0 if port_zero else 1
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or not lowest <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} is not a number in {lowest}-65535")
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    """(host, port) -> `host:port`, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_static_peers(spec: str) -> list[tuple[str, int]]:
    """`"host:port,[::1]:port"` -> [(host, port), ...], IPv6 hosts without brackets, duplicates dropped.

    Raises PeerAddressError with a one-line message for a malformed entry.
    """
    if not spec.strip():
        raise PeerAddressError(f"no peers given; {PEERS_HELP}")
    peers: list[tuple[str, int]] = []
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            raise PeerAddressError(f"empty entry in peers {spec!r}; {PEERS_HELP}")
        try:
            peer = parse_address(entry)
        except ValueError as exc:
            raise PeerAddressError(f"peer {entry!r}: {exc}; {PEERS_HELP}") from None
        if peer not in peers:
            peers.append(peer)
    return peers
