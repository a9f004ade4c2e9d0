"""Finding edge-nodes: a zeroconf browser on one interface, or peers given by address.

mDNS is blocked on many networks (Wi-Fi client isolation, multi-homed hosts),
so `--peers HOST:PORT,...` (parsed by edgemoe.node.addresses) is the other way.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from zeroconf import ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from edgemoe.node.addresses import format_address, parse_static_peers
from edgemoe.node.advertise import SERVICE_TYPE, ip_version_of, new_zeroconf
from edgemoe.node.credentials import TOKEN_FILE, ClusterCredentials, default_cluster_dir, load_cluster_secret
from edgemoe.node.errors import EdgemoeError
from edgemoe.node.interfaces import lan_addresses, resolve_interface
from edgemoe.node.version import PROTOCOL_VERSION

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT_MS = 3000
# How long `--peers auto` listens for announcements before generating.
DISCOVERY_SECONDS = 2.0


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
            self._browser: ServiceBrowser | None = ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[self._on_change])
        except BaseException:
            self._zc.close()
            raise

    def peers(self) -> list[DiscoveredPeer]:
        """The matching peers seen now, by node id (copies: safe to keep)."""
        with self._lock:
            peers = [replace(p, fingerprints=list(p.fingerprints)) for p in self._peers.values()]
        return sorted(peers, key=lambda p: p.node_id)

    def ignored(self) -> int:
        """How many nodes were seen and left out (another cluster or protocol)."""
        with self._lock:
            return len({node_id for node_id, _ in self._logged})

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
        # A node on this machine's loopback is heard on every interface (multicast loops back
        # to all of this host's sockets): used only when loopback is what was asked for.
        if ipaddress.ip_address(peer.host).is_loopback and not ipaddress.ip_address(self.interface_address).is_loopback:
            return "it advertises a loopback address (pass --interface lo to use nodes on this machine)"
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


def cluster_directory(cluster_dir: str | Path | None) -> Path:
    """`--cluster-dir`, else where `edgemoe cluster init` keeps the token by default."""
    return Path(cluster_dir).expanduser() if cluster_dir else default_cluster_dir()


def browse_targets(interface: str | None) -> list[tuple[str, str]]:
    """(what, address) to browse on: `--interface` (an address or a name; loopback only
    when asked for), else every private or link-local address of this machine."""
    if interface:
        address = resolve_interface(interface)  # one line if wrong
        return [(interface if interface != address else address, address)]
    return lan_addresses()


def _describe(targets: list[tuple[str, str]]) -> str:
    return ", ".join(name if name == address else f"{name} ({address})" for name, address in targets)


def resolve_peers(
    peers: str = "auto",
    interface: str | None = None,
    cluster_dir: str | Path | None = None,
    must_look: bool = False,
) -> tuple[list[str], ClusterCredentials | None]:
    """The peer addresses to use (`--peers`: auto, none, or HOST:PORT,...) and this
    coordinator's cluster credentials (None without a cluster). With `must_look` (`edgemoe
    peers`), not being able to browse is an error instead of running alone."""
    addresses, credentials, _ = discover(peers, interface, cluster_dir, must_look)
    return addresses, credentials


def discover(
    peers: str = "auto",
    interface: str | None = None,
    cluster_dir: str | Path | None = None,
    must_look: bool = False,
    keep_browsing: bool = False,
) -> tuple[list[str], ClusterCredentials | None, list[PeerBrowser]]:
    """`resolve_peers`, and with `keep_browsing` the browsers of `--peers auto`, still
    browsing (the caller closes them; see watch.NodeWatcher); else no browsers."""
    if peers == "none":
        return [], None, []
    directory = cluster_directory(cluster_dir)
    if peers != "auto":
        credentials = ClusterCredentials.create(load_cluster_secret(directory), "coordinator")
        return [format_address(h, p) for h, p in parse_static_peers(peers)], credentials, []
    if not (directory / TOKEN_FILE).exists():
        why = f"no cluster token in {directory}"
        if must_look:
            raise EdgemoeError(f"cannot look for nodes: {why}; run `edgemoe cluster init` (or pass --cluster-dir DIR), "
                               "then `edge-node --join TOKEN` on each node")
        log.info("%s: running on this machine alone", why)
        return [], None, []
    targets = browse_targets(interface)
    credentials = ClusterCredentials.create(load_cluster_secret(directory), "coordinator")
    if not targets:
        why = ("not browsing for nodes: this machine has no private or link-local address; pass --interface ADDR|NAME "
               "(127.0.0.1 or lo for nodes on this machine) or --peers HOST:PORT")
        if must_look:
            raise EdgemoeError(why)
        log.warning("%s", why)
        return [], credentials, []
    browsers: list[PeerBrowser] = []
    try:
        for name, address in targets:
            try:
                browsers.append(PeerBrowser(address, credentials.cluster_id, PROTOCOL_VERSION))
            except OSError as exc:  # an interface going down as we start; the others still count
                log.warning("cannot browse for nodes on %s (%s)", _describe([(name, address)]), exc.strerror or exc)
        if not browsers and must_look:
            raise EdgemoeError(f"cannot browse for nodes on {_describe(targets)} (see above); pass --peers HOST:PORT")
        time.sleep(DISCOVERY_SECONDS)
        found = {p.node_id: p for b in browsers for p in b.peers()}
        ignored = sum(b.ignored() for b in browsers)
    except BaseException:
        for b in browsers:
            b.close()
        raise
    if not keep_browsing:
        for b in browsers:
            b.close()
    where = f"on {_describe(targets)} for {DISCOVERY_SECONDS:.0f} s"
    if found:
        log.info("found %d nodes over mDNS %s", len(found), where)
    else:
        others = f"; {ignored} of another cluster or version left out (-v says which)" if ignored else ""
        log.warning("no nodes of cluster %s answered %s%s (is edge-node --join TOKEN running on the same LAN? "
                    "mDNS blocked? then pass --peers HOST:PORT)%s", credentials.cluster_id, where,
                    "; still looking while this runs" if keep_browsing and browsers else "", others)
    return [format_address(p.host, p.port) for p in found.values()], credentials, browsers if keep_browsing else []
