"""The protocol-neutral front-end helpers."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from gateway.addresses import plain_address
from gateway.frontend import loggable_user


class AddressTests(SynchronousTestCase):
    """Client addresses have one form per client."""

    def test_ipv4_mapped(self) -> None:
        """An IPv4 client seen on an IPv6 socket is logged and forwarded as plain IPv4."""
        self.assertEqual(plain_address("::ffff:192.0.2.7"), "192.0.2.7")

    def test_others_unchanged(self) -> None:
        """IPv4, IPv6 and non-IP addresses stay as they are."""
        for host in ("192.0.2.7", "2001:db8::1", "::1", "/run/gw.sock"):
            self.assertEqual(plain_address(host), host)


class UserTests(SynchronousTestCase):
    """User names in log lines."""

    def test_quoted_and_bounded(self) -> None:
        """A user name is one quoted JSON string, control characters escaped, at most 64 characters kept."""
        self.assertEqual(loggable_user('a"b\nc'), '"a\\"b\\nc"')
        self.assertEqual(loggable_user("x" * 100), '"' + "x" * 64 + '"')
