"""`--interface`: this machine's LAN address, given as an address or an interface name.

mDNS runs on one interface only. A name (`eth0`, `en0`) is looked up with ifaddr
(a zeroconf dependency) each time, so a node follows its interface through a DHCP
change; an address must be one this machine has. A wrong one is one clear error.
"""

from __future__ import annotations

import ipaddress

import ifaddr

from .errors import EdgemoeError


class InterfaceError(EdgemoeError):
    """`--interface` names no address or interface of this machine."""


def _addresses() -> dict[str, list[str]]:
    """Each interface's usable addresses, IPv4 first; IPv6 link-local ones are left out
    (mDNS on them needs a scope id that one address string does not carry)."""
    found: dict[str, list[str]] = {}
    for adapter in ifaddr.get_adapters():
        v4 = [ip.ip for ip in adapter.ips if isinstance(ip.ip, str)]
        v6 = [ip.ip[0] for ip in adapter.ips
              if isinstance(ip.ip, tuple) and not ipaddress.ip_address(ip.ip[0]).is_link_local]
        found[adapter.nice_name] = v4 + v6
    return found


# Where `--peers auto` looks without `--interface`: private (RFC 1918, fc00::/7) and
# IPv4 link-local networks, never loopback (asked for by name or address only) nor a
# public address (mDNS there would announce the cluster beyond the LAN).
LAN_NETWORKS = [ipaddress.ip_network(n) for n in
                ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "fc00::/7")]


def lan_addresses() -> list[tuple[str, str]]:
    """(interface, address) of each private or link-local address of this machine, in ifaddr's order."""
    return [(name, a) for name, ips in _addresses().items() for a in ips
            if any(ipaddress.ip_address(a) in net for net in LAN_NETWORKS)]


def interface_address(text: str) -> str | None:
    """The address `text` stands for now (itself if this machine has it; a named interface's
    first address), or None when it has none at the moment."""
    addresses = _addresses()
    try:
        wanted = ipaddress.ip_address(text)
    except ValueError:
        found = addresses.get(text)
        return found[0] if found else None
    mine = {ipaddress.ip_address(a) for ips in addresses.values() for a in ips}
    return str(wanted) if wanted in mine else None


def resolve_interface(text: str) -> str:
    """`--interface` as an address to bind mDNS to; InterfaceError if this machine has no such one."""
    address = interface_address(text)
    if address is not None:
        return address
    available = ", ".join(f"{name} ({', '.join(ips)})" for name, ips in _addresses().items() if ips) or "none"
    try:
        ipaddress.ip_address(text)
        what = f"this machine has no address {text}"
    except ValueError:
        what = f"this machine has no interface {text!r} with an address"
    raise InterfaceError(f"--interface {text}: {what}; pass one of: {available}")
