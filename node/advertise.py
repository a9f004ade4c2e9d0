"""Advertise an edge-node over zeroconf (mDNS) as `_edgemoe._tcp.local.` on one interface.

The service instance name is `--name (node id)`, so mDNS browsers show the name and
two nodes of one name stay apart. A second node with the same id is looked up (by
the id in its instance name) before registering, caught while probing when it also
has the same name, and reported as DuplicateNodeError.

The API is synchronous and works from any thread: zeroconf always runs its own
event-loop thread here. From asyncio code prefer `await adv.async_register()`
and `await adv.async_close()`, which do not block the caller's loop (registering
takes about 3 s: the duplicate check, then zeroconf's probes).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from zeroconf import (
    DNSQuestionType,
    IPVersion,
    NonUniqueNameException,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

from edgemoe.node.errors import DuplicateNodeError
from edgemoe.node.interfaces import InterfaceError, interface_address

log = logging.getLogger(__name__)

SERVICE_TYPE = "_edgemoe._tcp.local."
# One TXT string is at most 255 bytes (RFC 6763 6.1), "key=" included.
TXT_STRING_MAX = 255
FINGERPRINT_PREFIX_LEN = 16
# How long to listen for an existing node with our id before registering.
# zeroconf's own probes miss a twin on the same host: their answers come back
# by unicast to port 5353, which the kernel hands to one of the sockets sharing
# it (in practice the answering node's own). This lookup asks a multicast (QM)
# question instead, and the twin may hold its answer up to 1 s (mDNS rate limit
# per record), hence 2 s. It must refuse before announcing: a duplicate's
# goodbye would also withdraw the twin's identical PTR record everywhere.
DUPLICATE_CHECK_MS = 2000
RECORD_TTL_S = 120
# A DNS label, the instance name included, is at most 63 bytes (RFC 6763 4.1.1).
INSTANCE_MAX = 63
# How often a node checks that its interface still has the address it advertises on.
RECHECK_S = 5.0

_NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")


def _truncate_utf8(text: str, max_bytes: int) -> str:
    return text.encode()[:max_bytes].decode(errors="ignore")


def models_txt(fingerprints: list[str]) -> str:
    """Comma-separated fingerprint prefixes that fit one TXT string; the rest are left out (logged)."""
    budget = TXT_STRING_MAX - len("models=")
    kept: list[str] = []
    used = 0
    for fp in fingerprints:
        prefix = fp[:FINGERPRINT_PREFIX_LEN]
        cost = len(prefix.encode()) + (1 if kept else 0)
        if used + cost > budget:
            log.warning(
                "advertising %d of %d model fingerprints (TXT record limit); "
                "coordinators learn the rest from the node's info RPC",
                len(kept), len(fingerprints),
            )
            break
        kept.append(prefix)
        used += cost
    return ",".join(kept)


def build_txt(
    node_id: str, name: str, protocol_version: int, cluster_id: str, fingerprints: list[str]
) -> dict[str, str]:
    """The TXT records of a node's advertisement; every string fits in 255 bytes."""
    if len(f"cluster={cluster_id}".encode()) > TXT_STRING_MAX:
        raise ValueError(f"cluster id is longer than {TXT_STRING_MAX - len('cluster=')} bytes")
    return {
        "id": node_id,
        "name": _truncate_utf8(name, TXT_STRING_MAX - len("name=")),
        "proto": str(int(protocol_version)),
        "cluster": cluster_id,
        "models": models_txt(fingerprints),
    }


def instance_name(name: str, node_id: str) -> str:
    """`NAME (NODE_ID)`, the name cut to fit one DNS label; the node id alone without a name or room."""
    suffix = f" ({node_id})"
    room = INSTANCE_MAX - len(suffix.encode())
    short = _truncate_utf8(name.replace(".", " "), room).strip() if room > 0 else ""
    return f"{short}{suffix}" if short else node_id


def instance_node_id(service_name: str) -> str:
    """The node id in an instance name made by `instance_name` (with or without the service type)."""
    instance = service_name.removesuffix(f".{SERVICE_TYPE}")
    if instance.endswith(")") and " (" in instance:
        return instance[instance.rindex(" (") + 2:-1]
    return instance


def ip_version_of(address: str) -> IPVersion:
    return IPVersion.V6Only if ipaddress.ip_address(address).version == 6 else IPVersion.V4Only


def new_zeroconf(address: str) -> Zeroconf:
    """A Zeroconf bound to `address` only, running its own event-loop thread.

    Built in a thread without a running asyncio loop: created inside one (the
    edge-node daemon's), zeroconf would attach to that loop, and its blocking
    calls would then raise when made from that loop's thread.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="zeroconf-init") as pool:
        return pool.submit(Zeroconf, interfaces=[address], ip_version=ip_version_of(address)).result()


@dataclass
class NodeAdvertisement:
    """A node's mDNS advertisement, bound to one interface address only.

    `register()` raises DuplicateNodeError when another node already advertises
    `node_id`; `close()` withdraws the advertisement (sends goodbyes) and is safe
    to call more than once.
    """

    node_id: str
    name: str
    port: int
    address: str
    protocol_version: int
    cluster_id: str
    fingerprints: list[str] = field(default_factory=list)
    duplicate_check_ms: int = DUPLICATE_CHECK_MS
    _zc: Zeroconf | None = field(default=None, init=False, repr=False)
    _info: ServiceInfo | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not _NODE_ID_RE.match(self.node_id):
            raise ValueError(f"node id {self.node_id!r} must be 1-63 letters, digits or '-'")
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} is out of range 1-65535")
        ipaddress.ip_address(self.address)

    @property
    def service_name(self) -> str:
        return f"{instance_name(self.name, self.node_id)}.{SERVICE_TYPE}"

    def service_info(self) -> ServiceInfo:
        return ServiceInfo(
            SERVICE_TYPE,
            self.service_name,
            port=self.port,
            properties=build_txt(
                self.node_id, self.name, self.protocol_version, self.cluster_id, self.fingerprints
            ),
            server=f"edgemoe-{self.node_id}.local.",
            # Short TTLs so a node that dies without a goodbye leaves the
            # coordinators' view within minutes, not zeroconf's default 75.
            host_ttl=RECORD_TTL_S,
            other_ttl=RECORD_TTL_S,
            addresses=[socket.inet_pton(_family(self.address), self.address)],
        )

    def register(self) -> None:
        """Announce the node; raises DuplicateNodeError if its id is already on the network."""
        if self._zc is not None:
            return
        zc = new_zeroconf(self.address)
        try:
            self._check_not_advertised(zc)
            info = self.service_info()
            try:
                zc.register_service(info, allow_name_change=False)
            except NonUniqueNameException:
                raise self._duplicate_error(None) from None
        except BaseException:
            zc.close()
            raise
        self._zc, self._info = zc, info
        log.info(
            "advertising node %s (%s) at %s:%d as %s",
            self.node_id, self.name, self.address, self.port, SERVICE_TYPE,
        )

    def _check_not_advertised(self, zc: Zeroconf) -> None:
        names: set[str] = set()
        def seen(**kw: object) -> None:
            if kw["state_change"] is not ServiceStateChange.Removed:
                names.add(str(kw["name"]))

        browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[seen], question_type=DNSQuestionType.QM)
        try:
            time.sleep(self.duplicate_check_ms / 1000)
        finally:
            browser.cancel()
        for name in sorted(names):
            if instance_node_id(name) == self.node_id:
                other = zc.get_service_info(SERVICE_TYPE, name, timeout=self.duplicate_check_ms,
                                            question_type=DNSQuestionType.QM)
                if other is not None:  # else it withdrew meanwhile
                    raise self._duplicate_error(other)

    def _duplicate_error(self, other: ServiceInfo | None) -> DuplicateNodeError:
        where = ""
        if other is not None:
            hosts = other.parsed_addresses()
            where = f" at {hosts[0] if hosts else other.server}:{other.port}"
        return DuplicateNodeError(
            f"node id {self.node_id} is already advertised by another node{where}; "
            "stop that node, or give this one its own --data-dir (the node id is kept there)"
        )

    def update_fingerprints(self, fingerprints: list[str]) -> None:
        """Re-announce with another list of models (e.g. after the coordinator pushed one)."""
        self.fingerprints = list(fingerprints)
        if self._zc is None:
            return
        info = self.service_info()
        self._zc.update_service(info)
        self._info = info

    def unregister(self) -> None:
        """Withdraw the advertisement (goodbye packets) and release the sockets."""
        zc, info = self._zc, self._info
        self._zc = self._info = None
        if zc is None:
            return
        try:
            if info is not None:
                zc.unregister_service(info)
        finally:
            zc.close()
        log.info("withdrew advertisement of node %s", self.node_id)

    close = unregister

    async def async_register(self) -> None:
        """`register()` without blocking the running event loop."""
        await asyncio.to_thread(self.register)

    async def async_close(self) -> None:
        """`close()` without blocking the running event loop."""
        await asyncio.to_thread(self.close)

    def __enter__(self) -> NodeAdvertisement:
        self.register()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class KeptAdvertisement:
    """A node's advertisement on `--interface` (an address or an interface name), kept up
    while the interface's address comes and goes (a cable pulled, a DHCP renewal).

    Every `recheck_s` the interface is looked up again: an advertisement whose address
    is gone is dropped, and a new one registered as soon as the interface has an address
    again (the same or a new one); failures are logged and retried, never raised.
    """

    def __init__(self, interface: str, make: Callable[[str], NodeAdvertisement],
                 lookup: Callable[[str], str | None] = interface_address, recheck_s: float = RECHECK_S):
        self.interface = interface
        self._make = make
        self._lookup = lookup
        self._recheck_s = recheck_s
        self.current: NodeAdvertisement | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Advertises now; DuplicateNodeError or InterfaceError (one line) when it cannot."""
        address = await asyncio.to_thread(self._lookup, self.interface)
        if address is None:
            raise InterfaceError(f"--interface {self.interface}: this machine has no such address or interface now")
        ad = self._make(address)
        try:
            await ad.async_register()
        except OSError as exc:
            raise InterfaceError(f"--interface {self.interface}: cannot advertise on {address} ({exc.strerror}); "
                                 "pass this device's LAN address or interface name") from None
        self.current = ad
        self._task = asyncio.create_task(self._keep(), name="keep-advertised")

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self._recheck_s)
            await self.check()

    async def check(self) -> None:
        """One look at the interface: withdraw a stale advertisement, register a new one."""
        try:
            address = await asyncio.to_thread(self._lookup, self.interface)
        except Exception as exc:  # ifaddr reads the system's tables; any failure is retried
            log.warning("cannot look up interface %s (%s); trying again in %.0f s", self.interface, exc,
                        self._recheck_s)
            return
        if self.current is not None and self.current.address != address:
            log.warning("interface %s lost address %s: advertisement withdrawn until it has one again",
                        self.interface, self.current.address)
            stale, self.current = self.current, None
            try:
                await stale.async_close()
            except Exception as exc:  # goodbyes cannot leave through an address that is gone
                log.info("withdrawing the advertisement on %s: %s", stale.address, exc)
        if self.current is None and address is not None:
            ad = self._make(address)
            try:
                await ad.async_register()
            except (OSError, DuplicateNodeError) as exc:
                log.warning("cannot advertise on %s (%s); trying again in %.0f s", address, exc, self._recheck_s)
                return
            self.current = ad
            log.warning("advertising again on %s (interface %s)", address, self.interface)

    async def async_close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        ad, self.current = self.current, None
        if ad is not None:
            await ad.async_close()


def _family(address: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
