"""
Counting connections and sessions against their limits, for every protocol of one process.

A client address may hold only so many connections at once (trusted networks are exempt), the
whole gateway only so many, and a user only so many logged-in sessions. A refused connection
gets the protocol's temporary refusal and is closed; everyone else goes on being served.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from gateway.addresses import Network, client_key, in_networks


@dataclass(frozen=True)
class ConnectionRules:
    """
    :ivar max_connections: connections the whole gateway holds at once.
    :ivar max_per_address: connections one client address holds at once.
    :ivar max_sessions_per_user: logged-in sessions one user holds at once.
    :ivar trusted: networks exempt from the per-address limit.
    :ivar ipv6_prefix: IPv6 clients are counted per network of this prefix length.
    """

    max_connections: int = 10_000
    max_per_address: int = 50
    max_sessions_per_user: int = 50
    trusted: tuple[Network, ...] = ()
    ipv6_prefix: int = 64


class ConnectionLimits:
    """The connection and session counts of one gateway process."""

    def __init__(self, rules: ConnectionRules) -> None:
        self.connections = 0
        self._by_host: Counter[str] = Counter()
        self._by_user: Counter[str] = Counter()
        self.rules = rules

    @property
    def rules(self) -> ConnectionRules:
        """
        The limits. New ones (a reload) count the connections already open as the new ones
        would: an address trusted since is no longer counted, one no longer trusted is.
        """
        return self._rules

    @rules.setter
    def rules(self, rules: ConnectionRules) -> None:
        self._rules = rules
        # By the key the rules give each address (trusted, or its IPv6 network): rebuilt from
        # the hosts, so that a connection ends under the same rules it is counted by.
        self._by_address: Counter[str] = Counter()
        for host, count in self._by_host.items():
            key = self._key(host)
            if key is not None:
                self._by_address[key] += count

    def admit(self, host: str) -> str | None:
        """
        Count a new connection.

        :returns: None when admitted (call L{release} when it ends), else which limit refused it.
        """
        if self.connections >= self._rules.max_connections:
            return "max_connections"
        key = self._key(host)
        if key is not None:
            if self._by_address[key] >= self._rules.max_per_address:
                return "max_connections_per_ip"
            self._by_address[key] += 1
        self._by_host[host] += 1
        self.connections += 1
        return None

    def release(self, host: str) -> None:
        """An admitted connection has ended."""
        self.connections -= 1
        take_one(self._by_host, host)
        key = self._key(host)
        if key is not None:
            take_one(self._by_address, key)

    def open_session(self, user: str) -> bool:
        """Count a logged-in session; False (and nothing counted) when the user has too many."""
        if self._by_user[user] >= self.rules.max_sessions_per_user:
            return False
        self._by_user[user] += 1
        return True

    def sessions(self, user: str) -> int:
        """How many sessions the user holds now."""
        return self._by_user[user]

    def close_session(self, user: str) -> None:
        """A session counted by L{open_session} has ended."""
        take_one(self._by_user, user)

    def _key(self, host: str) -> str | None:
        """What the per-address limit counts a host under; None for a trusted one."""
        if in_networks(host, self._rules.trusted):
            return None
        return client_key(host, self._rules.ipv6_prefix)


def take_one(counts: Counter[str], key: str) -> bool:
    """Take one from C{counts[key]}, dropping keys at zero; False when there was none to take."""
    if counts[key] <= 0:
        counts.pop(key, None)
        return False
    counts[key] -= 1
    if not counts[key]:
        del counts[key]
    return True
