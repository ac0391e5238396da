"""Client addresses: one form per client, and membership of configured networks."""

from __future__ import annotations

import ipaddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def plain_address(host: str) -> str:
    """
    One spelling per client, so logs, fail2ban, limits and the backend agree: an IPv4 client on
    an IPv6 socket (C{::ffff:192.0.2.7}) as the IPv4 address it is, and IPv6 addresses in their
    compressed form (a PROXY v2 header gives them uncompressed).
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 6 and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def in_networks(host: str, networks: tuple[Network, ...]) -> bool:
    """True when C{host} is an IP address inside one of C{networks}."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in networks)


def client_key(host: str, ipv6_prefix: int) -> str:
    """
    What one client is counted as: its IPv4 address, or its IPv6 network of C{ipv6_prefix} bits
    (a single IPv6 host usually owns a whole /64, so counting addresses would be no limit at all).
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/{ipv6_prefix}", strict=False))
    return str(address)
