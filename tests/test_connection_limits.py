"""Unit tests of the connection and session counts against their limits."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from twisted.trial.unittest import SynchronousTestCase

from gateway.connection_limits import ConnectionLimits, ConnectionRules

CLIENT = "192.0.2.1"
OTHER = "192.0.2.2"
TRUSTED_NETWORK = ipaddress.ip_network("10.0.0.0/8")


class ConnectionTests(SynchronousTestCase):
    """Connections per gateway and per client address."""

    def test_global_max(self) -> None:
        """Past max_connections every new connection is refused, until one ends."""
        limits = ConnectionLimits(ConnectionRules(max_connections=3, max_per_address=10))
        for n in range(3):
            self.assertIsNone(limits.admit(f"192.0.2.{n + 1}"))
        self.assertEqual(limits.admit("198.51.100.1"), "max_connections")
        self.assertEqual(limits.admit(CLIENT), "max_connections")
        self.assertEqual(limits.connections, 3)
        limits.release("192.0.2.2")
        self.assertIsNone(limits.admit("198.51.100.1"))

    def test_per_address_max_with_release(self) -> None:
        """One address holds max_per_address connections; another address is not affected; a release lets one in."""
        limits = ConnectionLimits(ConnectionRules(max_per_address=2))
        self.assertIsNone(limits.admit(CLIENT))
        self.assertIsNone(limits.admit(CLIENT))
        self.assertEqual(limits.admit(CLIENT), "max_connections_per_ip")
        self.assertIsNone(limits.admit(OTHER))
        limits.release(CLIENT)
        self.assertIsNone(limits.admit(CLIENT))
        self.assertEqual(limits.admit(CLIENT), "max_connections_per_ip")

    def test_refused_connection_not_counted(self) -> None:
        """A refused connection is counted nowhere (it is never released)."""
        limits = ConnectionLimits(ConnectionRules(max_connections=10, max_per_address=1))
        limits.admit(CLIENT)
        for _ in range(5):
            self.assertEqual(limits.admit(CLIENT), "max_connections_per_ip")
        self.assertEqual(limits.connections, 1)
        limits.release(CLIENT)
        self.assertEqual(limits.connections, 0)
        self.assertIsNone(limits.admit(CLIENT))

    def test_trusted_exempt_per_address_but_counted_globally(self) -> None:
        """A trusted address has no per-address limit, but its connections count against the global one."""
        limits = ConnectionLimits(ConnectionRules(max_connections=5, max_per_address=1, trusted=(TRUSTED_NETWORK,)))
        for _ in range(5):
            self.assertIsNone(limits.admit("10.1.2.3"))
        self.assertEqual(limits.connections, 5)
        self.assertEqual(limits.admit("10.1.2.3"), "max_connections")
        self.assertEqual(limits.admit(CLIENT), "max_connections")
        limits.release("10.1.2.3")
        self.assertIsNone(limits.admit(CLIENT))
        self.assertEqual(limits.admit("10.1.2.3"), "max_connections")


class SessionTests(SynchronousTestCase):
    """Logged-in sessions per user."""

    def test_sessions_per_user(self) -> None:
        """A user holds max_sessions_per_user sessions; another user is not affected; a close lets one in."""
        limits = ConnectionLimits(ConnectionRules(max_sessions_per_user=2))
        self.assertTrue(limits.open_session("alice"))
        self.assertTrue(limits.open_session("alice"))
        self.assertFalse(limits.open_session("alice"))
        self.assertTrue(limits.open_session("bob"))
        limits.close_session("alice")
        self.assertTrue(limits.open_session("alice"))
        # The refused session was not counted: exactly two are open again.
        self.assertFalse(limits.open_session("alice"))

    def test_sessions_independent_of_connections(self) -> None:
        """Sessions are counted apart from connections: a full session count refuses no connection."""
        limits = ConnectionLimits(ConnectionRules(max_sessions_per_user=1, max_connections=2))
        self.assertTrue(limits.open_session("alice"))
        self.assertFalse(limits.open_session("alice"))
        self.assertIsNone(limits.admit(CLIENT))
        self.assertEqual(limits.connections, 1)


class Ipv6PrefixTests(SynchronousTestCase):
    """IPv6 clients are limited per network, as one host owns a whole /64."""

    def test_one_prefix_one_client(self) -> None:
        """Addresses in one /64 share the per-address limit; another /64 has its own."""
        limits = ConnectionLimits(ConnectionRules(max_per_address=2))
        self.assertIsNone(limits.admit("2001:db8:1:1::1"))
        self.assertIsNone(limits.admit("2001:db8:1:1::2"))
        self.assertEqual(limits.admit("2001:db8:1:1:ffff::3"), "max_connections_per_ip")
        self.assertIsNone(limits.admit("2001:db8:1:2::1"))
        limits.release("2001:db8:1:1::1")
        self.assertIsNone(limits.admit("2001:db8:1:1::9"))


class ReloadTests(SynchronousTestCase):
    """New rules (a reload) count the connections already open as the new rules would."""

    def setUp(self) -> None:
        self.limits = ConnectionLimits(ConnectionRules(max_per_address=1))

    def reload(self, **changes: object) -> None:
        """What gateway.service does on SIGHUP: the rules are replaced, the counts kept."""
        self.limits.rules = replace(self.limits.rules, **changes)  # type: ignore[arg-type]

    def test_trusted_while_connected(self) -> None:
        """
        A connection counted against its address that ends after a reload trusted the address
        leaves no count behind: once the trust is withdrawn, the address is admitted again.
        """
        self.assertIsNone(self.limits.admit(CLIENT))
        self.reload(trusted=(ipaddress.ip_network("192.0.2.0/24"),))
        self.limits.release(CLIENT)
        self.reload(trusted=())
        self.assertEqual(self.limits.connections, 0)
        self.assertIsNone(self.limits.admit(CLIENT), "the address is refused with none of its connections open")

    def test_distrusted_while_connected(self) -> None:
        """
        Connections admitted while their address was trusted count against it once a reload
        withdraws the trust: no more are admitted until they have ended, and then only the limit.
        """
        self.reload(trusted=(ipaddress.ip_network("192.0.2.0/24"),))
        for _ in range(3):
            self.assertIsNone(self.limits.admit(CLIENT))
        self.reload(trusted=())
        self.assertEqual(self.limits.admit(CLIENT), "max_connections_per_ip")
        for _ in range(3):
            self.limits.release(CLIENT)
        self.assertEqual(self.limits.connections, 0)
        self.assertIsNone(self.limits.admit(CLIENT))
        self.assertEqual(self.limits.admit(CLIENT), "max_connections_per_ip")

    def test_ipv6_prefix_changed_while_connected(self) -> None:
        """A connection that ends after a reload changed the IPv6 prefix leaves no count against its network."""
        client = "2001:db8:0:1::5"
        self.assertIsNone(self.limits.admit(client))
        self.reload(ipv6_prefix=48)
        self.assertEqual(self.limits.admit("2001:db8:0:2::5"), "max_connections_per_ip", "the /48 is not counted")
        self.limits.release(client)
        self.reload(ipv6_prefix=64)
        self.assertEqual(self.limits.connections, 0)
        self.assertIsNone(self.limits.admit(client), "the network is refused with none of its connections open")
