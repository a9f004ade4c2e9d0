"""Finding edge-nodes: a zeroconf browser on one interface, and peers given by address.

mDNS is blocked on many networks (Wi-Fi client isolation, multi-homed hosts),
so `--peers HOST:PORT,...` is parsed here too.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
import time
from dataclasses import dataclass, field, replace

from zeroconf import ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from edgemoe.node.advertise import SERVICE_TYPE, ip_version_of, new_zeroconf
from edgemoe.node.errors import PeerAddressError

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT_MS = 3000
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?$")
PEERS_HELP = "write peers as HOST:PORT,HOST:PORT (IPv6 as [ADDR]:PORT)"


@dataclass
class DiscoveredPeer:
    """A node seen over mDNS. `last_seen` is `time.monotonic()` of its latest announcement."""

    node_id: str
    name: str
    host: str
    port: int
    protocol_version: int
    cluster_id: str
    fingerprints: list[str] = field(default_factory=list)
    last_seen: float = 0.0


def peer_from_info(info: ServiceInfo, ip_version) -> DiscoveredPeer | None:
    """The peer a resolved service describes, or None (logged) when its records are incomplete."""
    props = info.decoded_properties
    hosts = info.parsed_addresses(ip_version)
    node_id = props.get("id")
    try:
        proto = int(props.get("proto") or "")
    except ValueError:
        proto = None
    if not node_id or proto is None or not hosts or not info.port:
        log.debug("ignoring %s: incomplete records (TXT %r, addresses %r)", info.name, props, hosts)
        return None
    models = props.get("models") or ""
    return DiscoveredPeer(
        node_id=node_id,
        name=props.get("name") or node_id,
        host=hosts[0],
        port=int(info.port),
        protocol_version=proto,
        cluster_id=props.get("cluster") or "",
        fingerprints=[m for m in models.split(",") if m],
        last_seen=time.monotonic(),
    )


class PeerBrowser:
    """Browses `_edgemoe._tcp.local.` on one interface address and keeps the peers that match.

    Peers of another cluster id or protocol version are left out (logged once
    per node and reason). `cluster_id=None` or `protocol_version=None` accept any.
    """

    def __init__(
        self,
        interface_address: str,
        cluster_id: str | None = None,
        protocol_version: int | None = None,
    ) -> None:
        self.interface_address = interface_address
        self.cluster_id = cluster_id
        self.protocol_version = protocol_version
        self._ip_version = ip_version_of(interface_address)
        self._lock = threading.Lock()
        self._peers: dict[str, DiscoveredPeer] = {}
        self._logged: set[tuple[str, str]] = set()
        self._zc = new_zeroconf(interface_address)
        try:
            self._browser = ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[self._on_change])
        except BaseException:
            self._zc.close()
            raise

    def peers(self) -> list[DiscoveredPeer]:
        """The matching peers seen now, by node id (copies: safe to keep)."""
        with self._lock:
            peers = [replace(p, fingerprints=list(p.fingerprints)) for p in self._peers.values()]
        return sorted(peers, key=lambda p: p.node_id)

    def close(self) -> None:
        """Stop browsing and release the sockets; safe to call more than once."""
        browser, self._browser = self._browser, None
        if browser is None:
            return
        browser.cancel()
        self._zc.close()

    def __enter__(self) -> PeerBrowser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Runs in the ServiceBrowser's thread, where blocking on a resolve is allowed.
    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            self._drop(name, "withdrew its advertisement")
            return
        info = zeroconf.get_service_info(service_type, name, timeout=RESOLVE_TIMEOUT_MS)
        if info is None:
            log.debug("could not resolve %s", name)
            return
        peer = peer_from_info(info, self._ip_version)
        if peer is None:
            return
        reason = self._rejection(peer)
        if reason:
            where = f"{peer.name} ({peer.node_id}) at {peer.host}:{peer.port}"
            self._log_once(peer.node_id, reason, f"ignoring node {where}: {reason}")
            self._drop(name, reason)
            return
        with self._lock:
            is_new = name not in self._peers
            self._peers[name] = peer
        if is_new:
            log.info("found node %s (%s) at %s:%d", peer.name, peer.node_id, peer.host, peer.port)

    def _rejection(self, peer: DiscoveredPeer) -> str:
        if self.cluster_id is not None and peer.cluster_id != self.cluster_id:
            return f"it belongs to another cluster ({peer.cluster_id or 'none'})"
        if self.protocol_version is not None and peer.protocol_version != self.protocol_version:
            return (
                f"it speaks protocol {peer.protocol_version}, this coordinator {self.protocol_version}; "
                "run the same edgemoe version on both"
            )
        return ""

    def _drop(self, name: str, why: str) -> None:
        with self._lock:
            peer = self._peers.pop(name, None)
        if peer is not None:
            log.info("node %s (%s) is gone: %s", peer.name, peer.node_id, why)

    def _log_once(self, node_id: str, reason: str, message: str) -> None:
        with self._lock:
            if (node_id, reason) in self._logged:
                return
            self._logged.add((node_id, reason))
        log.info(message)


def parse_static_peers(spec: str) -> list[tuple[str, int]]:
    """`"host:port,[::1]:port"` -> [(host, port), ...], IPv6 hosts without brackets, duplicates dropped.

    Raises PeerAddressError with a one-line message for a malformed entry.
    """
    entries = spec.split(",")
    if not spec.strip():
        raise PeerAddressError(f"no peers given; {PEERS_HELP}")
    peers: list[tuple[str, int]] = []
    for raw in entries:
        peer = _parse_peer(raw.strip(), spec)
        if peer not in peers:
            peers.append(peer)
    return peers


def _parse_peer(entry: str, spec: str) -> tuple[str, int]:
    if not entry:
        raise PeerAddressError(f"empty entry in peers {spec!r}; {PEERS_HELP}")
    if entry.startswith("["):
        m = re.fullmatch(r"\[([^\]]*)\](?::(.*))?", entry)
        if not m or m.group(2) is None:
            raise PeerAddressError(f"peer {entry!r} has no port; {PEERS_HELP}")
        host, port_text = m.group(1), m.group(2)
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError
        except ValueError:
            raise PeerAddressError(f"peer {entry!r}: {host!r} is not an IPv6 address; {PEERS_HELP}") from None
    else:
        host, sep, port_text = entry.rpartition(":")
        if not sep:
            raise PeerAddressError(f"peer {entry!r} has no port; {PEERS_HELP}")
        if ":" in host:
            raise PeerAddressError(f"peer {entry!r}: put the IPv6 address in brackets; {PEERS_HELP}")
        if not host:
            raise PeerAddressError(f"peer {entry!r} has no host; {PEERS_HELP}")
        if not _HOSTNAME_RE.match(host):
            raise PeerAddressError(f"peer {entry!r}: {host!r} is not a host name or address; {PEERS_HELP}")
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 1 <= int(port_text) <= 65535:
        raise PeerAddressError(f"peer {entry!r}: port {port_text!r} is not a number in 1-65535; {PEERS_HELP}")
    return host, int(port_text)
