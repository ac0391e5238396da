"""Client addresses: one form per client, and membership of configured networks."""

from __future__ import annotations

import functools
import ipaddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Each connection's address is looked at about ten times (limits, penalties, trusted networks);
# parsing it each time was about 1.5% of a login. The caches hold the most recent clients only.
# A cached spelling is also one string for all of a client's sessions, rather than one each.
_CACHED = 4096


@functools.lru_cache(maxsize=_CACHED)
def parse_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """C{host} as an IP address, or None when it is not one (a UNIX socket's peer, say)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@functools.lru_cache(maxsize=_CACHED)
def plain_address(host: str) -> str:
    """
    One spelling per client, so logs, fail2ban, limits and the backend agree: an IPv4 client on
    an IPv6 socket (C{::ffff:192.0.2.7}) as the IPv4 address it is, and IPv6 addresses in their
    compressed form (a PROXY v2 header gives them uncompressed), without the zone of a
    link-local one (C{fe80::1%eth0}): it names the gateway's own interface, not the client, and
    an address with it is no address to a backend (Postfix's XCLIENT) or to fail2ban.
    """
    address = parse_ip(host)
    if address is None:
        return host
    if address.version == 6 and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address).partition("%")[0]


def address_host(address: object) -> str:
    """
    The host of a Twisted address as L{plain_address} spells it; an address without one (a UNIX
    socket's) as its text.
    """
    return plain_address(getattr(address, "host", str(address)))


def host_port(host: str, port: int) -> str:
    """C{host:port} as URLs write it: an IPv6 address in brackets (C{[::1]:993}), so that the port stands apart."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def in_networks(host: str, networks: tuple[Network, ...]) -> bool:
    """True when C{host} is an IP address inside one of C{networks}."""
    if not networks:
        return False
    address = parse_ip(host)
    return address is not None and any(address in network for network in networks)


@functools.lru_cache(maxsize=_CACHED)
def client_key(host: str, ipv6_prefix: int) -> str:
    """
    What one client is counted as: its IPv4 address, or its IPv6 network of C{ipv6_prefix} bits
    (a single IPv6 host usually owns a whole /64, so counting addresses would be no limit at all).
    """
    address = parse_ip(host)
    if address is None:
        return host
    if address.version == 6 and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)  # an IPv4 client, however it is spelt, is no IPv6 network
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/{ipv6_prefix}", strict=False))
    return str(address)
