"""
Tests for gateway.proxy_protocol in memory: the PROXY header (v1 and v2) is read before the mail
front end starts, its addresses replace the load balancer's, and anything else is refused.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from gateway.addresses import Network
from gateway.proxy_protocol import HEADER_TIMEOUT, ProxiedConnection, TrustedProxyFactory, balancers_own

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PROXY_SOURCES: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.2/32"), ipaddress.ip_network("2001:db8::/64"))
BALANCER = IPv4Address("TCP", "127.0.0.2", 40000)
LISTENER = IPv4Address("TCP", "127.0.0.1", 143)
GREETING = b"* OK ready\r\n"


def v2_tcp4(source: str, source_port: int, destination: str, destination_port: int) -> bytes:
    """
    A PROXY v2 header for a TCP connection over IPv4.

    :returns: the signature, PROXY command, TCP4 family and the addresses block.
    """
    block = (socket.inet_pton(socket.AF_INET, source) + socket.inet_pton(socket.AF_INET, destination)
             + struct.pack("!HH", source_port, destination_port))
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(block)) + block


def v2_tcp6(source: str, source_port: int, destination: str, destination_port: int) -> bytes:
    """
    A PROXY v2 header for a TCP connection over IPv6.

    :returns: the signature, PROXY command, TCP6 family and the addresses block.
    """
    block = (socket.inet_pton(socket.AF_INET6, source) + socket.inet_pton(socket.AF_INET6, destination)
             + struct.pack("!HH", source_port, destination_port))
    return V2_SIGNATURE + b"\x21\x21" + struct.pack("!H", len(block)) + block


V2_LOCAL = V2_SIGNATURE + b"\x20\x00\x00\x00"
"""A v2 LOCAL command (the load balancer's own health check): no addresses."""


LONGEST_IPV6 = b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"  # 39 characters, the longest the specification counts
EMBEDDED_IPV4 = b"ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"  # 45: valid, but two make a line too long


class Recorder(Protocol):
    """
    The wrapped protocol: records what reaches it, and greets first as a mail server does.

    :ivar events: C{("made", peer, host)}, C{("data", bytes)} and C{("lost", reason)}, in order.
    """

    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []

    pause_when_made = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.events.append(("made", self.transport.getPeer(), self.transport.getHost()))
        self.transport.write(GREETING)
        if self.pause_when_made:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.events.append(("data", data))

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.events.append(("lost", reason))


class RecorderFactory(Factory):
    """
    Builds L{Recorder}s.

    :ivar built: every protocol built, in order.
    """

    def __init__(self) -> None:
        self.built: list[Recorder] = []

    pause_when_made = False

    def buildProtocol(self, addr: IAddress) -> Recorder:
        recorder = Recorder()
        recorder.pause_when_made = self.pause_when_made
        self.built.append(recorder)
        return recorder


class ProxyTestCase(SynchronousTestCase):
    """A trusted proxy factory around a L{RecorderFactory}, and the log it writes."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.wrapped = RecorderFactory()
        self.factory = TrustedProxyFactory(self.wrapped, PROXY_SOURCES, self.clock)
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def connect(self, peer: IAddress = BALANCER) -> tuple[ProxiedConnection, StringTransport, Recorder]:
        """
        Accept one connection from C{peer} on L{LISTENER}.

        :returns: the proxy protocol, its transport and the wrapped protocol.
        """
        proxy = self.factory.buildProtocol(peer)
        assert proxy is not None
        transport = StringTransport(hostAddress=LISTENER, peerAddress=peer)
        proxy.makeConnection(transport)
        return proxy, transport, self.wrapped.built[-1]

    def messages(self) -> list[str]:
        """The log lines written so far."""
        return [formatEvent(event) for event in self.logged]

    def assert_refused(self, transport: StringTransport, recorder: Recorder, message: str) -> None:
        """
        The connection was aborted, logged with C{message}, and nothing reached the wrapped protocol.
        """
        self.assertTrue(transport.disconnected, "the connection is not aborted")
        self.assertEqual(recorder.events, [])
        self.assertEqual(transport.value(), b"")
        self.assertIn(message, self.messages())


class HeaderTests(ProxyTestCase):
    """Well-formed headers, whole or in pieces, start the wrapped protocol with the client's addresses."""

    def test_v1_header_and_data_in_one_segment(self) -> None:
        """The bytes after a v1 header in the same segment are the wrapped protocol's first data."""
        proxy, transport, recorder = self.connect()
        proxy.dataReceived(b"PROXY TCP4 203.0.113.9 192.0.2.1 55555 993\r\na1 CAPABILITY\r\n")
        self.assertEqual(recorder.events, [
            ("made", IPv4Address("TCP", "203.0.113.9", 55555), IPv4Address("TCP", "192.0.2.1", 993)),
            ("data", b"a1 CAPABILITY\r\n"),
        ])
        self.assertEqual(transport.value(), GREETING)
        self.assertFalse(transport.disconnecting)

    def test_v2_header_and_data_in_one_segment(self) -> None:
        """The bytes after a v2 header in the same segment are the wrapped protocol's first data."""
        proxy, transport, recorder = self.connect()
        proxy.dataReceived(v2_tcp4("198.51.100.7", 40001, "192.0.2.1", 143) + b"a1 NOOP\r\n")
        self.assertEqual(recorder.events, [
            ("made", IPv4Address("TCP", "198.51.100.7", 40001), IPv4Address("TCP", "192.0.2.1", 143)),
            ("data", b"a1 NOOP\r\n"),
        ])
        self.assertFalse(transport.disconnecting)

    def test_v2_header_in_single_bytes(self) -> None:
        """A v2 header arriving one byte at a time starts the wrapped protocol once its last byte is in."""
        proxy, transport, recorder = self.connect()
        header = v2_tcp4("198.51.100.7", 40002, "192.0.2.1", 110)
        for index in range(len(header) - 1):
            proxy.dataReceived(header[index:index + 1])
            self.assertFalse(transport.disconnecting, f"the connection is closed after byte {index + 1}")
        self.assertEqual(recorder.events, [])
        proxy.dataReceived(header[-1:])
        self.assertEqual(recorder.events, [
            ("made", IPv4Address("TCP", "198.51.100.7", 40002), IPv4Address("TCP", "192.0.2.1", 110)),
        ])
        proxy.dataReceived(b"CAPA\r\n")
        self.assertEqual(recorder.events[1:], [("data", b"CAPA\r\n")])

    def test_v1_header_in_single_bytes(self) -> None:
        """A v1 header arriving one byte at a time starts the wrapped protocol once its CRLF is in."""
        proxy, transport, recorder = self.connect()
        header = b"PROXY TCP4 203.0.113.9 192.0.2.1 55555 587\r\n"
        for index in range(len(header) - 1):
            proxy.dataReceived(header[index:index + 1])
        self.assertEqual(recorder.events, [])
        proxy.dataReceived(header[-1:])
        self.assertEqual([event[0] for event in recorder.events], ["made"])
        self.assertFalse(transport.disconnecting)

    def test_v2_ipv6_header(self) -> None:
        """A v2 header for TCP over IPv6 gives IPv6 addresses."""
        proxy, _, recorder = self.connect()
        proxy.dataReceived(v2_tcp6("2001:db8:1::9", 50000, "2001:db8:2::1", 993))
        self.assertEqual(recorder.events, [
            ("made", IPv6Address("TCP", "2001:db8:1:0:0:0:0:9", 50000),
             IPv6Address("TCP", "2001:db8:2:0:0:0:0:1", 993)),
        ])

    def test_wrapped_protocol_waits_for_header(self) -> None:
        """Before the header is complete the wrapped protocol has no transport, no events and sent no greeting."""
        proxy, transport, recorder = self.connect()
        proxy.dataReceived(b"PROXY TCP4 203.0.113.9 ")
        proxy.dataReceived(b"192.0.2.1 55555 143")
        self.assertIsNone(recorder.transport)
        self.assertEqual(recorder.events, [])
        self.assertEqual(transport.value(), b"")
        proxy.dataReceived(b"\r\n")
        self.assertIs(recorder.transport, proxy)
        self.assertEqual(transport.value(), GREETING)

    def test_addresses_come_from_header(self) -> None:
        """Once the header is read, getPeer and getHost return its source and destination."""
        proxy, _, recorder = self.connect()
        self.assertEqual((proxy.getPeer(), proxy.getHost()), (BALANCER, LISTENER))
        proxy.dataReceived(b"PROXY TCP4 203.0.113.9 192.0.2.1 55555 143\r\n")
        assert recorder.transport is not None
        self.assertEqual(recorder.transport.getPeer(), IPv4Address("TCP", "203.0.113.9", 55555))
        self.assertEqual(recorder.transport.getHost(), IPv4Address("TCP", "192.0.2.1", 143))

    def test_v2_local_command_uses_real_addresses(self) -> None:
        """A v2 LOCAL command (a health check) starts the wrapped protocol with the connection's own addresses."""
        proxy, transport, recorder = self.connect()
        proxy.dataReceived(V2_LOCAL + b"QUIT\r\n")
        self.assertEqual(recorder.events, [("made", BALANCER, LISTENER), ("data", b"QUIT\r\n")])
        self.assertEqual(transport.value(), GREETING)
        self.assertFalse(transport.disconnecting)

    def test_only_v2_local_is_the_balancers_own(self) -> None:
        """
        Only a v2 LOCAL header marks the connection as the balancer's own (a health check), seen
        from the wrapped protocol's transport, directly or through a TLS layer; a client relayed
        by any header is not, nor is a v1 UNKNOWN, which clients without an address get too.
        """
        headers = [
            (V2_LOCAL, True),
            (v2_tcp4("198.51.100.7", 40001, "192.0.2.1", 143), False),
            (b"PROXY TCP4 203.0.113.9 192.0.2.1 55555 143\r\n", False),
            (b"PROXY UNKNOWN\r\n", False),
            (V2_SIGNATURE + b"\x21\x00\x00\x00", False),  # PROXY command, family UNSPEC: a client
        ]
        for header, own in headers:
            proxy, _, recorder = self.connect()
            self.assertFalse(balancers_own(recorder.transport))
            proxy.dataReceived(header)
            self.assertIs(balancers_own(recorder.transport), own, header)
            tls_like = ProtocolWrapper(WrappingFactory(Factory.forProtocol(Protocol)), Protocol())
            tls_like.transport = proxy  # as implicit TLS sits between the front end and the PROXY layer
            self.assertIs(balancers_own(tls_like), own, header)
        self.assertFalse(balancers_own(StringTransport()))

    def test_v1_unknown_uses_real_addresses(self) -> None:
        """A v1 UNKNOWN header with addresses starts the wrapped protocol with the connection's own addresses."""
        proxy, _, recorder = self.connect()
        proxy.dataReceived(b"PROXY UNKNOWN 2001:db8::1 2001:db8::2 40000 143\r\n")
        self.assertEqual(recorder.events, [("made", BALANCER, LISTENER)])

    def test_v1_minimal_unknown_uses_real_addresses(self) -> None:
        """The minimal v1 UNKNOWN header, 15 bytes (the spec's smallest), starts the wrapped protocol."""
        proxy, transport, recorder = self.connect()
        proxy.dataReceived(b"PROXY UNKNOWN\r\n")
        self.assertEqual(recorder.events, [("made", BALANCER, LISTENER)])
        self.assertFalse(transport.disconnecting)

    def test_header_complete_cancels_timeout(self) -> None:
        """Once the header is read no timer is left, and the header timeout no longer applies."""
        proxy, transport, recorder = self.connect()
        proxy.dataReceived(b"PROXY TCP4 203.0.113.9 192.0.2.1 55555 143\r\n")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(HEADER_TIMEOUT * 2)
        self.assertFalse(transport.disconnecting)

    def test_connection_lost_after_header_reaches_wrapped_protocol(self) -> None:
        """After the header, the end of the connection reaches the wrapped protocol and unregisters it."""
        proxy, _, recorder = self.connect()
        proxy.dataReceived(b"PROXY TCP4 203.0.113.9 192.0.2.1 55555 143\r\n")
        proxy.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(recorder.events[-1][0], "lost")
        self.assertEqual(self.factory.protocols, {})


class PausedTests(ProxyTestCase):
    """
    A wrapped protocol that pauses its reading when it starts (a worker's front end waiting for
    its admission) gets nothing, not even what came with the header, until it resumes.
    """

    def test_data_with_the_header_waits_for_resume(self) -> None:
        """The bytes after the header wait while the wrapped protocol is paused, and come on resume."""
        self.wrapped.pause_when_made = True
        proxy, transport, recorder = self.connect()
        proxy.dataReceived(b"PROXY TCP4 203.0.113.9 192.0.2.1 55555 143\r\na1 LOGIN bob secret\r\n")
        self.assertEqual([event[0] for event in recorder.events], ["made"])
        self.assertEqual(transport.producerState, "paused")
        proxy.dataReceived(b"a2 NOOP\r\n")  # a read already under way
        self.assertEqual([event[0] for event in recorder.events], ["made"])
        proxy.resumeProducing()
        self.assertEqual(recorder.events[1:], [("data", b"a1 LOGIN bob secret\r\na2 NOOP\r\n")])
        self.assertEqual(transport.producerState, "producing")


class RefusalTests(ProxyTestCase):
    """Anything but a well-formed header from a trusted source closes the connection unheard."""

    def test_garbage_instead_of_header(self) -> None:
        """A client speaking the mail protocol directly is aborted and logged."""
        proxy, transport, recorder = self.connect()
        proxy.dataReceived(b"a1 CAPABILITY\r\n")
        self.assert_refused(transport, recorder, "proxy_refused source=127.0.0.2 reason=no PROXY header")

    def test_garbage_after_partial_signature(self) -> None:
        """Bytes that begin like a v2 signature and then differ are refused."""
        proxy, transport, recorder = self.connect()
        proxy.dataReceived(V2_SIGNATURE[:6])
        self.assertFalse(transport.disconnecting)
        proxy.dataReceived(b"GET / HTTP/1.1\r\n")
        self.assert_refused(transport, recorder, "proxy_refused source=127.0.0.2 reason=no PROXY header")

    def test_malformed_v1_protocol(self) -> None:
        """A v1 header with an unknown network protocol is aborted as malformed."""
        proxy, transport, recorder = self.connect()
        proxy.dataReceived(b"PROXY TCP9 203.0.113.9 192.0.2.1 55555 143\r\n")
        self.assert_refused(transport, recorder, "proxy_refused source=127.0.0.2 reason=malformed PROXY header")

    def test_malformed_v1_missing_addresses(self) -> None:
        """A v1 TCP4 header without its ports is aborted as malformed."""
        proxy, transport, recorder = self.connect()
        proxy.dataReceived(b"PROXY TCP4 203.0.113.9 192.0.2.1\r\n")
        self.assert_refused(transport, recorder, "proxy_refused source=127.0.0.2 reason=malformed PROXY header")

    def test_v1_without_line_end(self) -> None:
        """A v1 header longer than the protocol's 107 bytes without CRLF is aborted as malformed."""
        proxy, transport, recorder = self.connect()
        proxy.dataReceived(b"PROXY TCP4 " + b"9" * 120)
        self.assert_refused(transport, recorder, "proxy_refused source=127.0.0.2 reason=malformed PROXY header")

    def test_malformed_v1_port(self) -> None:
        """A v1 header whose port is not a number is aborted as malformed, not raised out of dataReceived."""
        proxy, transport, recorder = self.connect()
        proxy.dataReceived(b"PROXY TCP4 203.0.113.9 192.0.2.1 http 143\r\n")
        self.assert_refused(transport, recorder, "proxy_refused source=127.0.0.2 reason=malformed PROXY header")

    def test_v1_addresses_that_are_not_addresses(self) -> None:
        """A v1 header naming something other than an IP address, or a port past 65535, is aborted as malformed."""
        for header in (b'PROXY TCP4 x"y 192.0.2.1 55555 143\r\n', b"PROXY TCP4 203.0.113.9 192.0.2.1 99999 143\r\n"):
            proxy, transport, recorder = self.connect()
            proxy.dataReceived(header)
            self.assert_refused(transport, recorder, "proxy_refused source=127.0.0.2 reason=malformed PROXY header")

    def test_v1_outside_the_specification(self) -> None:
        """
        What Twisted's v1 parser takes but the specification does not is refused: ports written
        "+5555", "05555" or "5_555", an IPv6 address under TCP4 (or IPv4 under TCP6), an IPv6
        zone (which logs and fail2ban would see), extra fields, a line past 107 bytes.
        """
        for header in (b"PROXY TCP4 203.0.113.9 192.0.2.1 +5555 143\r\n",
                       b"PROXY TCP4 203.0.113.9 192.0.2.1 05555 143\r\n",
                       b"PROXY TCP4 203.0.113.9 192.0.2.1 5_555 143\r\n",
                       b"PROXY TCP4 2001:db8::7 192.0.2.1 5555 143\r\n",
                       b"PROXY TCP6 203.0.113.9 2001:db8::1 5555 143\r\n",
                       b"PROXY TCP6 2001:db8::7%eth0 2001:db8::1 5555 143\r\n",
                       b"PROXY TCP4 203.0.113.9 192.0.2.1 5555 143 extra\r\n",
                       b"PROXY TCP6 %s %s 1 2 extra\r\n" % (EMBEDDED_IPV4, EMBEDDED_IPV4),
                       b"PROXY TCP6 %s %s 65535 65535\r\n" % (EMBEDDED_IPV4, EMBEDDED_IPV4)):
            proxy, transport, recorder = self.connect()
            proxy.dataReceived(header)
            self.assertTrue(transport.disconnected, header)
            self.assertEqual(recorder.events, [], header)

    def test_v1_longest_allowed(self) -> None:
        """The longest v1 header the specification counts (104 bytes with its CRLF; 107 allowed) is taken."""
        header = b"PROXY TCP6 %s %s 65535 65535\r\n" % (LONGEST_IPV6, LONGEST_IPV6)
        self.assertEqual(len(header), 104)
        proxy, transport, recorder = self.connect()
        proxy.dataReceived(header)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(recorder.events[0][0], "made")

    def test_v2_datagram_refused(self) -> None:
        """A v2 header for a UDP client, which a TCP listener cannot have, is refused."""
        proxy, transport, recorder = self.connect()
        proxy.dataReceived(v2_tcp4("198.51.100.7", 40001, "192.0.2.1", 143).replace(b"\x21\x11", b"\x21\x12", 1))
        self.assert_refused(transport, recorder, "proxy_refused source=127.0.0.2 reason=malformed PROXY header")

    def test_source_removed_while_the_header_came(self) -> None:
        """A balancer taken out of the sources by a reload while its header was on its way is refused."""
        proxy, transport, recorder = self.connect()
        proxy.dataReceived(b"PROXY TCP4 203.0.113.9 ")
        self.factory.sources = ()
        proxy.dataReceived(b"192.0.2.1 55555 143\r\n")
        self.assert_refused(transport, recorder, "proxy_refused source=127.0.0.2 reason=untrusted")

    def test_v2_unix_uses_real_addresses(self) -> None:
        """A v2 header for a client on a UNIX socket (no address to tell) starts with the connection's own addresses."""
        proxy, transport, recorder = self.connect()
        block = b"/run/client".ljust(108, b"\0") + b"/run/haproxy".ljust(108, b"\0")
        proxy.dataReceived(V2_SIGNATURE + b"\x21\x31" + struct.pack("!H", len(block)) + block)
        self.assertEqual(recorder.events, [("made", BALANCER, LISTENER)])
        self.assertFalse(transport.disconnecting)

    def test_malformed_v2_version(self) -> None:
        """A v2 header with an unknown version is aborted as malformed."""
        proxy, transport, recorder = self.connect()
        header = bytearray(v2_tcp4("198.51.100.7", 40000, "192.0.2.1", 143))
        header[12] = 0x11
        proxy.dataReceived(bytes(header))
        self.assert_refused(transport, recorder, "proxy_refused source=127.0.0.2 reason=malformed PROXY header")

    def test_untrusted_source(self) -> None:
        """A connection from outside the proxy sources gets no protocol and is logged."""
        self.assertIsNone(self.factory.buildProtocol(IPv4Address("TCP", "198.51.100.1", 40000)))
        self.assertEqual(self.wrapped.built, [])
        self.assertIn("proxy_refused source=198.51.100.1 reason=untrusted", self.messages())

    def test_ipv4_mapped_source_matches_ipv4(self) -> None:
        """An IPv4 proxy on an IPv6 socket (::ffff:127.0.0.2) is matched against the IPv4 sources."""
        proxy = self.factory.buildProtocol(IPv6Address("TCP", "::ffff:127.0.0.2", 40000))
        self.assertIsInstance(proxy, ProxiedConnection)

    def test_ipv4_mapped_untrusted_logged_as_ipv4(self) -> None:
        """An untrusted IPv4-mapped source is refused and logged in its IPv4 form."""
        self.assertIsNone(self.factory.buildProtocol(IPv6Address("TCP", "::ffff:198.51.100.1", 40000)))
        self.assertIn("proxy_refused source=198.51.100.1 reason=untrusted", self.messages())

    def test_ipv6_source(self) -> None:
        """An IPv6 proxy inside an IPv6 source network is accepted."""
        proxy = self.factory.buildProtocol(IPv6Address("TCP", "2001:db8::5", 40000))
        self.assertIsInstance(proxy, ProxiedConnection)

    def test_wrapped_factory_refusal(self) -> None:
        """When the wrapped factory builds no protocol, neither does the proxy factory."""
        class Refusing(Factory):
            def buildProtocol(self, addr: IAddress) -> None:
                return None

        factory = TrustedProxyFactory(Refusing(), PROXY_SOURCES, self.clock)
        self.assertIsNone(factory.buildProtocol(BALANCER))


class TimeoutTests(ProxyTestCase):
    """A trusted proxy has HEADER_TIMEOUT seconds to send its header."""

    def test_header_timeout(self) -> None:
        """A header unfinished after HEADER_TIMEOUT aborts the connection; nothing reaches the wrapped protocol."""
        proxy, transport, recorder = self.connect()
        proxy.dataReceived(b"PROXY TCP4 203.0.113.9")
        self.clock.advance(HEADER_TIMEOUT - 0.001)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.001)
        self.assertTrue(transport.disconnected)
        self.assertIn("proxy_header_timeout source=127.0.0.2", self.messages())
        proxy.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(recorder.events, [])
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connection_lost_before_header(self) -> None:
        """A connection lost before its header cancels the timer and never reaches the wrapped protocol."""
        proxy, _, recorder = self.connect()
        proxy.dataReceived(b"PROXY ")
        proxy.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(recorder.events, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.factory.protocols, {})
