"""
Tests for gateway.listener: the admission of connections that have no protocol refusal of their own
(the web listeners), in memory: counted while they last, closed at once over a limit; and the line a
listener that cannot bind stops the start with.
"""

from __future__ import annotations

import io
import sys

from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, RaisingMemoryReactor, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from test_proxy_protocol import BALANCER, LISTENER, PROXY_SOURCES, RecorderFactory, v2_tcp4

from gateway.connection_limits import ConnectionLimits, ConnectionRules
from gateway.listener import AdmittingFactory, listener
from gateway.metrics import GatewayMetrics
from gateway.proxy_protocol import TrustedProxyFactory

CLIENT = IPv4Address("TCP", "192.0.2.7", 50000)


class AdmissionTests(SynchronousTestCase):
    """An admitting factory around a recorder, with room for two connections per address."""

    def setUp(self) -> None:
        self.limits = ConnectionLimits(ConnectionRules(max_per_address=2))
        self.wrapped = RecorderFactory()
        self.factory = AdmittingFactory(self.wrapped, self.limits, "https")
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def connect(self, peer: IPv4Address = CLIENT) -> tuple[object, StringTransport]:
        protocol = self.factory.buildProtocol(peer)
        transport = StringTransport(hostAddress=LISTENER, peerAddress=peer)
        protocol.makeConnection(transport)
        return protocol, transport

    def test_admitted_while_connected(self) -> None:
        """An admitted connection starts its protocol, counts while it lasts, and is released once."""
        protocol, transport = self.connect()
        self.assertEqual(self.wrapped.built[0].events[0], ("made", CLIENT, LISTENER))
        self.assertEqual(self.limits.connections, 1)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.limits.connections, 0)
        self.assertEqual(self.wrapped.built[0].events[-1][0], "lost")

    def test_over_the_limit(self) -> None:
        """
        A connection over the per-address limit is aborted before its protocol starts, logged with
        the limit and counted in the metrics; its end releases nothing. Other addresses go on.
        """
        held = [self.connect()[0] for _ in range(2)]
        protocol, transport = self.connect()
        self.assertTrue(transport.disconnected, "the connection is not aborted")
        self.assertEqual((self.wrapped.built[-1].events, transport.value()), ([], b""))
        refusals = [event for event in self.logged if event["log_format"].startswith("connection_refused")]
        self.assertEqual([formatEvent(event) for event in refusals],
                         ["connection_refused protocol=https client=192.0.2.7 limit=max_connections_per_ip"])
        metrics = GatewayMetrics()
        metrics.observe(refusals[0])
        self.assertEqual(metrics.registry.get_sample_value(
            "mailgateway_limit_refusals_total", {"protocol": "https", "limit": "max_connections_per_ip"}), 1)

        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.limits.connections, 2)
        other, _ = self.connect(IPv4Address("TCP", "192.0.2.8", 50000))
        self.assertEqual(self.limits.connections, 3)
        for each in (*held, other):
            each.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.limits.connections, 0)

    def test_behind_proxy_header(self) -> None:
        """Behind a load balancer, the client the PROXY header names is counted, not the balancer."""
        factory = TrustedProxyFactory(self.factory, PROXY_SOURCES, Clock())
        protocol = factory.buildProtocol(BALANCER)
        assert protocol is not None
        protocol.makeConnection(StringTransport(hostAddress=LISTENER, peerAddress=BALANCER))
        self.assertEqual(self.limits.connections, 0)
        protocol.dataReceived(v2_tcp4("192.0.2.9", 40000, "127.0.0.1", 443))
        self.limits.rules = ConnectionRules(max_per_address=1)
        self.assertEqual(self.limits.admit("192.0.2.9"), "max_connections_per_ip")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.limits.connections, 0)

    def test_refused_behind_proxy_header(self) -> None:
        """
        Behind a load balancer, a refused connection's protocol gets none of the bytes that came
        with the PROXY header: it never started.
        """
        self.limits.rules = ConnectionRules(max_per_address=0)
        factory = TrustedProxyFactory(self.factory, PROXY_SOURCES, Clock())
        protocol = factory.buildProtocol(BALANCER)
        assert protocol is not None
        transport = StringTransport(hostAddress=LISTENER, peerAddress=BALANCER)
        protocol.makeConnection(transport)
        protocol.dataReceived(v2_tcp4("192.0.2.9", 40000, "127.0.0.1", 443) + b"\x16\x03\x01\x00\x05hello")
        self.assertTrue(transport.disconnected, "the connection is not aborted")
        self.assertEqual(self.wrapped.built[0].events, [])
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.limits.connections, 0)


class BindFailureTests(SynchronousTestCase):
    """A listener that cannot bind stops the start with one line naming the file and the key."""

    def test_names_the_key(self) -> None:
        """The line starts with the configuration file and key, then the endpoint and the reason."""
        reactor = RaisingMemoryReactor(listenException=CannotListenError("::", 143, OSError(98, "Address in use")))
        made = listener(reactor, r"tcp6:143:interface=\:\:", Factory(), label="protocol=imap tls=starttls",
                        key="[imap] starttls", config_path="/etc/mailgateway/mailgateway.toml", proxy_sources=())
        with self.assertRaises(SystemExit) as raised:
            made.privilegedStartService()
        message = str(raised.exception.code)
        self.assertTrue(message.startswith("mailgateway: /etc/mailgateway/mailgateway.toml: [imap] starttls: "
                                           r"protocol=imap tls=starttls endpoint=tcp6:143:interface=\:\:: "
                                           "cannot listen: "), message)
        self.assertIn("Address in use", message)
        self.assertNotIn("\n", message)

    def test_not_permitted_is_a_configuration_error(self) -> None:
        """
        A port the process may not bind ends the start with the status of a configuration error
        (78, which the unit does not restart every 5 s), and the line says what is missing.
        """
        reactor = RaisingMemoryReactor(listenException=CannotListenError("::", 993, OSError(13, "Permission denied")))
        made = listener(reactor, "tcp6:993", Factory(), label="protocol=imap tls=implicit_tls",
                        key="[imap] implicit_tls", config_path="/etc/mailgateway/mailgateway.toml", proxy_sources=())
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as raised:
            made.privilegedStartService()
        self.assertEqual(raised.exception.code, 78)
        [line] = stderr.getvalue().splitlines()
        self.assertTrue(line.startswith("mailgateway: /etc/mailgateway/mailgateway.toml: [imap] implicit_tls: "), line)
        self.assertIn("Permission denied", line)
        self.assertIn("CAP_NET_BIND_SERVICE", line)
