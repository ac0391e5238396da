"""The protocol-neutral front-end helpers."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from gateway.addresses import client_key, host_port, plain_address
from gateway.frontend import USER_KEY_LENGTH, user_key
from gateway.text_log import loggable_text


class AddressTests(SynchronousTestCase):
    """Client addresses have one form per client."""

    def test_ipv4_mapped(self) -> None:
        """An IPv4 client seen on an IPv6 socket is logged and forwarded as plain IPv4."""
        self.assertEqual(plain_address("::ffff:192.0.2.7"), "192.0.2.7")

    def test_link_local_zone_dropped(self) -> None:
        """A link-local client is its address without the zone, which names the gateway's interface."""
        self.assertEqual(plain_address("fe80::1%eth0"), "fe80::1")
        self.assertEqual(plain_address("FE80:0:0:0:0:0:0:1%2"), "fe80::1")

    def test_others_unchanged(self) -> None:
        """IPv4, IPv6 and non-IP addresses stay as they are."""
        for host in ("192.0.2.7", "2001:db8::1", "::1", "/run/gw.sock"):
            self.assertEqual(plain_address(host), host)

    def test_client_key_of_ipv4_mapped(self) -> None:
        """An IPv4 client counts as its own address however it is spelt, not as the IPv6 network ::/64."""
        self.assertEqual(client_key("::ffff:192.0.2.7", 64), "192.0.2.7")
        self.assertEqual(client_key("2001:db8::1", 64), "2001:db8::/64")

    def test_host_port(self) -> None:
        """A listener's or a backend's address with its port: an IPv6 address in brackets, as in a URL."""
        self.assertEqual(host_port("192.0.2.7", 993), "192.0.2.7:993")
        self.assertEqual(host_port("::1", 10143), "[::1]:10143")
        self.assertEqual(host_port("::", 993), "[::]:993")
        self.assertEqual(host_port("mail.example.org", 143), "mail.example.org:143")

    def test_one_string_per_client(self) -> None:
        """A client's sessions share one string for its address rather than keeping one each."""
        first, second = plain_address("::ffff:192.0.2.8"), plain_address("::ffff:192.0.2.8")
        self.assertIs(first, second)


class UserTests(SynchronousTestCase):
    """User names in log lines."""

    def test_quoted_and_bounded(self) -> None:
        """A user name is one quoted JSON string, control characters escaped, at most 64 characters kept."""
        self.assertEqual(loggable_text('a"b\nc'), '"a\\"b\\nc"')
        self.assertEqual(loggable_text("x" * 100), '"' + "x" * 64 + '"')

    def test_key_case_insensitive_and_bounded(self) -> None:
        """Spellings of a name count as one user; a name past the bound counts by a fixed-size digest."""
        self.assertEqual(user_key("Alice@Example.ORG"), user_key("alice@example.org"))
        long_name = "\u0390" * 20_000  # case folding triples it
        self.assertEqual(len(user_key(long_name)), len("sha256:") + 32)
        self.assertEqual(user_key(long_name), user_key(long_name.upper()))
        self.assertNotEqual(user_key(long_name), user_key(long_name + "x"))
        self.assertEqual(len(user_key("x" * USER_KEY_LENGTH)), USER_KEY_LENGTH)
