"""The protocol-neutral backend connector: addresses, TLS, timeout, cancellation, failures, probing."""

from __future__ import annotations

import dataclasses
import gc
import socket
import shutil
import tempfile
from collections.abc import Callable, Sequence

from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IAddress, IConnector, IHostnameResolver, IHostResolution, IResolutionReceiver
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.basic import LineReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from gateway.backend import (
    BackendConnector,
    BackendLogin,
    BackendRefused,
    BackendRejected,
    BackendUnavailable,
    ClientAddress,
    LoginRequest,
)
from gateway.config import BackendSettings
from gateway.imap_backend import ImapBackendLogin
from gateway.pop3_backend import Pop3BackendLogin
from gateway.relay import CLOSE_GRACE
from gateway.testing.fakes import BACKEND_SETTINGS
from gateway.testing.pki import TestCA
from gateway.tls import ServerTLS, describe_tls

CLIENT = ClientAddress("192.0.2.7", 50123, "198.51.100.1", 993, "bAcKsEsSiOn1")
REQUEST = LoginRequest("alice", b"secret", CLIENT)
SETTINGS = dataclasses.replace(BACKEND_SETTINGS, timeout=2.5)
POP3_SETTINGS = dataclasses.replace(SETTINGS, port=110)
POP3_SETTINGS_FORWARDING = dataclasses.replace(POP3_SETTINGS, forward_client_ip=True)
POP3_CAPA = b"+OK\r\nTOP\r\nUIDL\r\nUSER\r\n.\r\n"


@dataclasses.dataclass
class _Resolution:
    name: str

    def cancel(self) -> None:
        """Resolution is synchronous: there is never anything to cancel."""


@implementer(IHostnameResolver)
class RecordingResolver:
    """
    Resolves every name to 127.0.0.1 at once and records the names asked for.

    :ivar names: every host name resolved, in order.
    """

    def __init__(self) -> None:
        self.names: list[str] = []

    def resolveHostName(self, resolutionReceiver: IResolutionReceiver, hostName: str, portNumber: int = 0,
                        addressTypes: Sequence[type[IAddress]] | None = None,
                        transportSemantics: str = "TCP") -> IHostResolution:
        """Record C{hostName} and resolve it to 127.0.0.1 before returning."""
        self.names.append(hostName)
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        resolutionReceiver.addressResolved(IPv4Address("TCP", "127.0.0.1", portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


class ConnectorTestBase(SynchronousTestCase):
    """A connector on a memory reactor whose connections are made by hand."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.resolver = RecordingResolver()
        self.reactor.installNameResolver(self.resolver)
        self.dialogues: list[BackendLogin] = []

    def tearDown(self) -> None:
        self.assertEqual(self.reactor.getDelayedCalls(), [])  # no timeout left behind
        # A dialogue's own result left failed and unread is logged whenever it is collected,
        # which could be during a later test; only test_no_unhandled_error_* looks for that.
        for dialogue in self.dialogues:
            dialogue.result.addErrback(lambda _: None)

    def connector(self, settings: BackendSettings = SETTINGS,
                  login_protocol: Callable[..., BackendLogin] = ImapBackendLogin) -> BackendConnector:
        """A connector whose dialogues are kept in C{dialogues}."""

        def build(request: LoginRequest, settings: BackendSettings, tls: object) -> BackendLogin:
            dialogue = login_protocol(request, settings, tls)  # type: ignore[arg-type]
            self.dialogues.append(dialogue)
            return dialogue

        return BackendConnector(self.reactor, settings, build)  # type: ignore[arg-type]

    def accept(self, index: int = 0) -> tuple[Protocol, StringTransport]:
        """Complete the connection attempt number C{index}; return the wire protocol and its transport."""
        host, port, factory = self.reactor.tcpClients[index][:3]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def refuse(self, attempt: Deferred[BackendLogin], index: int = 0) -> Failure:
        """Fail the connection attempt number C{index} as refused; return how C{attempt} failed."""
        self.reactor.tcpClients[index][2].clientConnectionFailed(self.reactor.connectors[index],
                                                                 Failure(ConnectionRefusedError()))
        return self.failureResultOf(attempt, BackendUnavailable)


class EndpointTests(ConnectorTestBase):
    """How the backend's address is reached."""

    def test_ipv4_literal(self) -> None:
        """
        An IPv4 address is connected to directly, without the resolver, and without a timer of the
        connection's own: the login's timeout covers connecting (test_timeout_connecting).
        """
        attempt = self.connector().login(REQUEST)
        self.assertEqual(self.reactor.tcpClients[0][:2], ("127.0.0.1", 143))
        self.assertIsNone(self.reactor.tcpClients[0][3])
        self.assertEqual(self.resolver.names, [])
        self.refuse(attempt)

    def test_address_without_wrappers(self) -> None:
        """
        The reactor connects an address with the login dialogue itself as the protocol, with no
        endpoint's wrapper in between to stay for the whole session, and a factory without a dict.
        """
        attempt = self.connector().login(REQUEST)
        factory = self.reactor.tcpClients[0][2]
        factory.doStart()  # as the connector does
        self.assertEqual(vars(factory), {})  # it stays with the connection: no dict
        wire, _ = self.accept()
        self.assertIs(wire, self.dialogues[0])
        wire.dataReceived(b"* OK [CAPABILITY IMAP4rev1] ready\r\ngw1 OK [CAPABILITY IMAP4rev1] in\r\n")
        self.assertIs(self.successResultOf(attempt), wire)

    def test_ipv6_literal(self) -> None:
        """An IPv6 address is connected to directly, without the resolver."""
        attempt = self.connector(dataclasses.replace(SETTINGS, host="::1")).login(REQUEST)
        self.assertEqual(self.reactor.tcpClients[0][:2], ("::1", 143))
        self.assertEqual(self.resolver.names, [])
        self.refuse(attempt)

    def test_address_refused_at_once(self) -> None:
        """
        An address the reactor refuses on the spot (an IPv6 scope naming no interface) is
        BackendUnavailable from the Deferred, not an exception out of login.
        """

        class RefusingReactor(MemoryReactorClock):
            def connectTCP(self, *args: object, **kwargs: object) -> IConnector:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

        reactor = RefusingReactor()
        connector = BackendConnector(reactor, dataclasses.replace(SETTINGS, host="fe80::1%nosuchif0"),
                                     ImapBackendLogin)  # type: ignore[arg-type]
        failure = self.failureResultOf(connector.login(REQUEST), BackendUnavailable)
        self.assertIn("Name or service not known", failure.getErrorMessage())
        self.assertEqual(reactor.getDelayedCalls(), [])  # no timeout left behind

    def test_host_name(self) -> None:
        """A host name goes through the reactor's resolver and the resolved address is connected to."""
        attempt = self.connector(dataclasses.replace(SETTINGS, host="store.example")).login(REQUEST)
        self.reactor.advance(0)
        self.assertEqual(self.resolver.names, ["store.example"])
        self.assertEqual(self.reactor.tcpClients[0][:2], ("127.0.0.1", 143))
        self.reactor.tcpClients[0][2].clientConnectionFailed(self.reactor.connectors[0],
                                                             Failure(ConnectionRefusedError()))
        self.reactor.advance(0.3)  # the endpoint reports once its next attempt finds no address left
        self.failureResultOf(attempt, BackendUnavailable)

    def test_tls_creator_given_to_login(self) -> None:
        """The login dialogue gets a TLS client creator with STARTTLS and none without TLS."""
        given: list[object] = []

        def login_protocol(request: LoginRequest, settings: BackendSettings, tls: object) -> BackendLogin:
            given.append(tls)
            return ImapBackendLogin(request, settings, tls)  # type: ignore[arg-type]

        for settings in (SETTINGS, dataclasses.replace(SETTINGS, tls="starttls")):
            attempt = self.connector(settings, login_protocol).login(REQUEST)
            self.refuse(attempt, len(given) - 1)
        self.assertIsNone(given[0])
        self.assertIsNotNone(given[1])


class LoginTests(ConnectorTestBase):
    """Outcomes of a login through the connector."""

    def test_success(self) -> None:
        """A login the backend accepts fires with the logged-in dialogue and cancels the timeout."""
        attempt = self.connector().login(REQUEST)
        wire, transport = self.accept()
        self.assertNoResult(attempt)
        wire.dataReceived(b"* OK [CAPABILITY IMAP4rev1] Dovecot ready.\r\n")
        self.assertEqual(transport.value(), b"gw1 LOGIN alice secret\r\n")
        wire.dataReceived(b"gw1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
        session = self.successResultOf(attempt)
        self.assertIsInstance(session, ImapBackendLogin)
        self.assertEqual(session.capabilities, (b"IMAP4rev1", b"IDLE"))

    def test_rejected(self) -> None:
        """A rejection of the credentials stays a BackendRejected."""
        attempt = self.connector().login(REQUEST)
        wire, _ = self.accept()
        wire.dataReceived(b"* OK [CAPABILITY IMAP4rev1] ready\r\ngw1 NO [AUTHENTICATIONFAILED] no\r\n")
        self.failureResultOf(attempt, BackendRejected)

    def test_refused(self) -> None:
        """A refusal of the session stays a BackendRefused with the backend's reply."""
        attempt = self.connector(POP3_SETTINGS, Pop3BackendLogin).login(REQUEST)
        wire, _ = self.accept()
        wire.dataReceived(b"+OK ready\r\n" + POP3_CAPA + b"+OK\r\n-ERR [IN-USE] Mailbox locked.\r\n")
        failure = self.failureResultOf(attempt, BackendRefused)
        self.assertEqual(failure.value.reply, b"[IN-USE] Mailbox locked.")  # type: ignore[union-attr]

    def test_connection_refused(self) -> None:
        """A refused connection is BackendUnavailable."""
        attempt = self.connector().login(REQUEST)
        self.assertIn("cannot connect", self.refuse(attempt).getErrorMessage())

    def test_connection_lost(self) -> None:
        """The backend closing the connection during the login is BackendUnavailable."""
        attempt = self.connector().login(REQUEST)
        wire, _ = self.accept()
        wire.dataReceived(b"* OK [CAPABILITY IMAP4rev1] ready\r\n")
        wire.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(attempt, BackendUnavailable)

    def test_unexpected_error(self) -> None:
        """An unexpected exception in the dialogue comes out as BackendUnavailable naming its type."""

        class Broken(ImapBackendLogin):
            def connectionMade(self) -> None:
                self.result.errback(ValueError("boom"))

        attempt = self.connector(login_protocol=Broken).login(REQUEST)
        self.accept()
        failure = self.failureResultOf(attempt, BackendUnavailable)
        self.assertEqual(failure.getErrorMessage(), "ValueError: boom")


class HealthTests(ConnectorTestBase):
    """An outage is logged where it begins and ends, once each, among the lines of each failed login."""

    def test_down_then_up(self) -> None:
        """The first login it fails logs backend_down; the first it answers (a wrong password too) backend_up."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        connector = self.connector()
        self.refuse(connector.login(REQUEST), 0)
        self.reactor.advance(30)
        self.refuse(connector.login(REQUEST), 1)
        self.reactor.advance(12.5)
        attempt = connector.login(REQUEST)
        wire, _ = self.accept(2)
        wire.dataReceived(b"* OK [CAPABILITY IMAP4rev1] ready\r\ngw1 NO [AUTHENTICATIONFAILED] no\r\n")
        self.failureResultOf(attempt, BackendRejected)
        self.refuse(connector.login(REQUEST), 3)
        lines = [formatEvent(event) for event in logged]
        self.assertEqual([line.split(" ", 1)[0] for line in lines], ["backend_down", "backend_up", "backend_down"])
        self.assertTrue(lines[0].startswith("backend_down backend=127.0.0.1:143 reason=cannot connect"), lines[0])
        self.assertEqual(lines[1], "backend_up backend=127.0.0.1:143 down_for=42.5")

    def test_stalled_backend_timed_from_the_first_login(self) -> None:
        """
        A backend that stalls is found out a timeout after the login began: its outage, in
        backend_up's down_for, counts from then, not from the timeout.
        """
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        connector = self.connector()
        stalled = connector.login(REQUEST)
        self.accept(0)  # connected, and never greeted
        self.reactor.advance(SETTINGS.timeout)
        self.failureResultOf(stalled, BackendUnavailable)
        self.reactor.advance(10)
        attempt = connector.login(REQUEST)
        wire, _ = self.accept(1)
        wire.dataReceived(b"* OK [CAPABILITY IMAP4rev1] ready\r\ngw1 NO [AUTHENTICATIONFAILED] no\r\n")
        self.failureResultOf(attempt, BackendRejected)
        self.assertEqual(formatEvent(logged[-1]),
                         "backend_up backend=127.0.0.1:143 down_for=%.1f" % (SETTINGS.timeout + 10))

    def test_out_of_order(self) -> None:
        """
        A login begun before the outage was logged ends it only if begun after (and one begun
        before its end does not begin another): logins end out of order.
        """
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        connector = self.connector()
        before = connector.login(REQUEST)  # 0: still connecting when the outage is seen
        self.reactor.advance(1)
        self.refuse(connector.login(REQUEST), 1)  # 1: down
        wire, _ = self.accept(0)
        wire.dataReceived(b"* OK [CAPABILITY IMAP4rev1] ready\r\ngw1 NO [AUTHENTICATIONFAILED] no\r\n")
        self.failureResultOf(before, BackendRejected)  # begun before the outage: not up
        self.reactor.advance(1)
        late = connector.login(REQUEST)  # 2: still connecting when the backend answers again
        self.reactor.advance(1)
        after = connector.login(REQUEST)  # 3
        wire, _ = self.accept(3)
        wire.dataReceived(b"* OK [CAPABILITY IMAP4rev1] ready\r\ngw1 NO [AUTHENTICATIONFAILED] no\r\n")
        self.failureResultOf(after, BackendRejected)  # up
        self.refuse(late, 2)  # begun before it answered again: not down
        self.assertEqual([formatEvent(event).split(" ", 1)[0] for event in logged], ["backend_down", "backend_up"])
        self.assertIn("down_for=2.0", formatEvent(logged[1]))

    def test_stale_timeout_says_nothing(self) -> None:
        """
        A login that times out after one begun later was answered (the backend stalled, and came
        back) does not log an outage: the later answer is the newer word.
        """
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        connector = self.connector()
        stalled = connector.login(REQUEST)
        self.accept(0)  # connected, never greeted
        self.reactor.advance(1)
        answered = connector.login(REQUEST)
        wire, _ = self.accept(1)
        wire.dataReceived(b"* OK [CAPABILITY IMAP4rev1] ready\r\ngw1 NO [AUTHENTICATIONFAILED] no\r\n")
        self.failureResultOf(answered, BackendRejected)
        self.reactor.advance(1.5)
        self.failureResultOf(stalled, BackendUnavailable)
        self.assertEqual([formatEvent(event) for event in logged], [])

    def test_newest_answer_kept(self) -> None:
        """
        What the latest-begun answered login says stands against a failure of any login begun
        before it, however the answers came in.
        """
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        connector = self.connector()
        first, second, third = (connector.login(REQUEST) for _ in range(3))
        for index, attempt in ((2, third), (0, first)):
            wire, _ = self.accept(index)
            wire.dataReceived(b"* OK [CAPABILITY IMAP4rev1] ready\r\ngw1 NO [AUTHENTICATIONFAILED] no\r\n")
            self.failureResultOf(attempt, BackendRejected)
        self.refuse(second, 1)
        self.assertEqual([formatEvent(event) for event in logged], [])

    def test_cancelled_says_nothing(self) -> None:
        """A login its client gave up tells nothing of the backend."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        attempt = self.connector().login(REQUEST)
        attempt.cancel()
        self.failureResultOf(attempt, CancelledError)
        self.assertEqual([formatEvent(event) for event in logged], [])


class ForwardingTests(ConnectorTestBase):
    """The client's address, as the backend takes it or not."""

    def test_refused_said_once(self) -> None:
        """A backend that refuses the client's address (POP3 XCLIENT) is named once, however many logins it refuses."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        connector = self.connector(POP3_SETTINGS_FORWARDING, Pop3BackendLogin)
        for index in range(2):
            attempt = connector.login(REQUEST)
            wire, _ = self.accept(index)
            wire.dataReceived(b"+OK [XCLIENT] ready\r\n" + POP3_CAPA + b"-ERR no\r\n-ERR Not allowed\r\n"
                              b"+OK\r\n+OK Logged in.\r\n")
            self.successResultOf(attempt)
        self.assertEqual([formatEvent(event) for event in logged],
                         ["client_address_not_forwarded backend=127.0.0.1:110 reason=the backend refused XCLIENT: "
                          "Not allowed (the backend sees the gateway's address)"])

    def test_not_offered_said_by_the_probe(self) -> None:
        """The probe at start names a backend that does not offer XCLIENT (Dovecot, to an untrusted gateway)."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        probing = self.connector(POP3_SETTINGS_FORWARDING, Pop3BackendLogin).probe()
        wire, _ = self.accept()
        wire.dataReceived(b"+OK ready\r\n" + POP3_CAPA)
        self.successResultOf(probing)
        wire.connectionLost(Failure(ConnectionDone()))
        self.assertEqual([formatEvent(event).split(":", 1)[0] for event in logged],
                         ["client_address_not_forwarded backend=127.0.0.1"])
        self.assertIn("reason=the backend does not offer XCLIENT: list the gateway in its login_trusted_networks",
                      formatEvent(logged[0]))


class DeadlineTests(ConnectorTestBase):
    """The timeout and cancellation."""

    def test_timeout_connecting(self) -> None:
        """A backend that does not accept the connection in time is BackendUnavailable naming the seconds."""
        attempt = self.connector().login(REQUEST)
        self.reactor.advance(2.4)
        self.assertNoResult(attempt)
        self.reactor.advance(0.1)
        failure = self.failureResultOf(attempt, BackendUnavailable)
        self.assertIn("2.5 s", failure.getErrorMessage())
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)

    def test_timeout_logging_in(self) -> None:
        """A backend that connects but does not answer in time is BackendUnavailable naming the seconds."""
        attempt = self.connector().login(REQUEST)
        self.reactor.advance(1)
        wire, transport = self.accept()
        wire.dataReceived(b"* OK [CAPABILITY IMAP4rev1] ready\r\n")
        self.reactor.advance(1.4)
        self.assertNoResult(attempt)
        self.reactor.advance(0.1)
        failure = self.failureResultOf(attempt, BackendUnavailable)
        self.assertEqual(failure.getErrorMessage(), "no answer within 2.5 s")
        self.assertTrue(transport.disconnecting)

    def test_cancel_connecting(self) -> None:
        """Cancelling while connecting stops the attempt and fails with CancelledError, not BackendUnavailable."""
        attempt = self.connector().login(REQUEST)
        attempt.cancel()
        self.failureResultOf(attempt, CancelledError)
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)

    def test_no_unhandled_error_after_connecting_stops(self) -> None:
        """A cancelled or timed-out connection attempt leaves no unhandled error to be logged."""
        for stop in (lambda attempt: attempt.cancel(), lambda attempt: self.reactor.advance(2.5)):
            attempt = BackendConnector(self.reactor, SETTINGS, ImapBackendLogin).login(REQUEST)
            stop(attempt)
            self.failureResultOf(attempt)
            del attempt
            # The connector's factory, kept by the memory reactor, is what holds the dialogue.
            self.reactor.tcpClients.clear()
            self.reactor.connectors.clear()
            gc.collect()
            self.assertEqual([error.type.__name__ for error in self.flushLoggedErrors()], [])

    def test_cancel_logging_in(self) -> None:
        """Cancelling during the login aborts the connection and fails with CancelledError."""
        attempt = self.connector().login(REQUEST)
        wire, transport = self.accept()
        wire.dataReceived(b"* OK ready\r\n")
        attempt.cancel()
        self.failureResultOf(attempt, CancelledError)
        self.assertTrue(transport.disconnecting)


class AnnouncedTests(ConnectorTestBase):
    """What the backend offers before login, as the connector learns it."""

    def test_unknown_at_first(self) -> None:
        """A connector that has not talked to its backend knows nothing of what it announces."""
        self.assertIsNone(self.connector(POP3_SETTINGS, Pop3BackendLogin).announced)

    def test_learned_from_login(self) -> None:
        """The capabilities announced during a login are kept, even when the login is rejected."""
        connector = self.connector(POP3_SETTINGS, Pop3BackendLogin)
        attempt = connector.login(REQUEST)
        wire, _ = self.accept()
        wire.dataReceived(b"+OK ready\r\n" + POP3_CAPA + b"-ERR [AUTH] no\r\n")
        self.failureResultOf(attempt, BackendRejected)
        self.assertEqual(connector.announced, (b"TOP", b"UIDL", b"USER"))

    def test_learned_from_imap_login_refused(self) -> None:
        """
        An IMAP login teaches the connector what the backend announced before it, also one the backend
        refused for its session (NO [LIMIT]): the backend answered, after the credentials.
        """
        connector = self.connector()
        attempt = connector.login(REQUEST)
        wire, _ = self.accept()
        wire.dataReceived(b"* OK [CAPABILITY IMAP4rev1 ENABLE IDLE] ready\r\ngw1 NO [LIMIT] Too many sessions\r\n")
        self.failureResultOf(attempt, BackendRefused)
        self.assertEqual(connector.announced, (b"IMAP4rev1", b"ENABLE", b"IDLE"))

    def test_not_learned_in_clear_before_a_failed_starttls(self) -> None:
        """
        With backend STARTTLS, what a login that failed before TLS saw (a CAPA without STLS, maybe
        forged in between, RFC 2595 4) is not learned: the front ends would promise it.
        """
        connector = self.connector(dataclasses.replace(POP3_SETTINGS, tls="starttls", server_name="backend.example"),
                                   Pop3BackendLogin)
        attempt = connector.login(REQUEST)
        wire, _ = self.accept()
        wire.dataReceived(b"+OK ready\r\n+OK\r\nTOP\r\nUIDL\r\nUSER\r\nX-INJECTED\r\n.\r\n")
        self.failureResultOf(attempt, BackendUnavailable)
        self.assertIsNone(connector.announced)

    def test_kept_when_not_learned(self) -> None:
        """A login that fails before CAPA leaves what was learned earlier."""
        connector = self.connector(POP3_SETTINGS, Pop3BackendLogin)
        first = connector.login(REQUEST)
        wire, _ = self.accept(0)
        wire.dataReceived(b"+OK ready\r\n" + POP3_CAPA + b"+OK\r\n+OK Logged in.\r\n")
        self.successResultOf(first)
        second = connector.login(REQUEST)
        wire, _ = self.accept(1)
        wire.dataReceived(b"-ERR [SYS/TEMP] busy\r\n")
        self.failureResultOf(second, BackendUnavailable)
        self.assertEqual(connector.announced, (b"TOP", b"UIDL", b"USER"))

    def test_probe(self) -> None:
        """probe() asks CAPA, says QUIT, closes, and fires with the capabilities, which are kept."""
        connector = self.connector(POP3_SETTINGS, Pop3BackendLogin)
        probing = connector.probe()
        wire, transport = self.accept()
        wire.dataReceived(b"+OK ready\r\n" + POP3_CAPA)
        self.assertEqual(transport.value(), b"CAPA\r\nQUIT\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.successResultOf(probing), (b"TOP", b"UIDL", b"USER"))
        self.assertEqual(connector.announced, (b"TOP", b"UIDL", b"USER"))
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1, "nothing would abort a backend that never closed")
        wire.connectionLost(Failure(ConnectionDone()))  # the backend closed in time
        self.assertEqual(self.reactor.getDelayedCalls(), [], "the abort outlived the connection")

    def test_probe_of_stalled_backend_cut_off(self) -> None:
        """
        A probed backend that never closes (over TLS: never sends its close_notify) is aborted
        after the grace period, not before: one connection a start would otherwise stay open.
        """
        connector = self.connector(POP3_SETTINGS, Pop3BackendLogin)
        probing = connector.probe()
        wire, transport = self.accept()
        wire.dataReceived(b"+OK ready\r\n" + POP3_CAPA)
        self.successResultOf(probing)
        self.reactor.advance(CLOSE_GRACE - 0.1)
        self.assertFalse(transport.disconnected)
        self.reactor.advance(0.1)
        self.assertTrue(transport.disconnected)

    def test_probe_unavailable(self) -> None:
        """A probe of a backend that cannot be reached fails with BackendUnavailable."""
        self.refuse(self.connector(POP3_SETTINGS, Pop3BackendLogin).probe())  # type: ignore[arg-type]


class RequestTests(SynchronousTestCase):
    """The login request itself."""

    def test_repr_hides_password(self) -> None:
        """A login request's repr names the user but not the password."""
        text = repr(LoginRequest("alice", b"Sup3r-s3cret", CLIENT, "admin"))
        self.assertIn("alice", text)
        self.assertNotIn("Sup3r-s3cret", text)


class RealReactorTests(TestCase):
    """The connector on the real reactor, on the loopback interface."""

    async def test_closed_port(self) -> None:
        """A port nobody listens on is BackendUnavailable."""
        from twisted.internet import reactor

        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        listening = await endpoint.listen(Factory.forProtocol(Protocol))
        port = listening.getHost().port
        await listening.stopListening()
        connector = BackendConnector(reactor, dataclasses.replace(SETTINGS, port=port),  # type: ignore[arg-type]
                                     ImapBackendLogin)
        attempt: Deferred[BackendLogin] = connector.login(REQUEST)
        with self.assertRaises(BackendUnavailable) as caught:
            await attempt
        self.assertIn("cannot connect", str(caught.exception))

    async def tls_backend(self, server_name: str, tls: str) -> tuple[Deferred[BackendLogin], Deferred[None]]:
        """
        A login through a connector on C{tls} (implicit or STARTTLS), to a scripted IMAP server
        on loopback whose certificate, for C{localhost}, comes from the connector's one trusted CA.

        :returns: the login attempt, and the server connection's loss.
        """
        from twisted.internet import reactor

        directory = tempfile.mkdtemp(prefix="test_backend-")
        self.addCleanup(shutil.rmtree, directory)
        ca = TestCA(directory)
        issued = ca.issue()
        server_tls = ServerTLS(issued.chain_path, issued.key_path, b"imap")
        gone: Deferred[None] = Deferred()

        class ScriptedImap(LineReceiver):
            secure = tls == "implicit"

            def connectionMade(self) -> None:
                self.sendLine(b"* OK [CAPABILITY IMAP4rev1%s] ready" % (b"" if self.secure else b" STARTTLS"))

            def lineReceived(self, line: bytes) -> None:
                tag, _, command = line.partition(b" ")
                if command == b"STARTTLS" and not self.secure:
                    self.sendLine(tag + b" OK Begin TLS negotiation now")
                    self.transport.startTLS(server_tls)  # type: ignore[union-attr]
                    self.secure = True
                elif command == b"CAPABILITY":
                    self.sendLine(b"* CAPABILITY IMAP4rev1\r\n" + tag + b" OK done")
                elif command == b"LOGIN alice secret" and self.secure:
                    self.sendLine(tag + b" OK [CAPABILITY IMAP4rev1 IDLE] Logged in")
                else:
                    self.sendLine(tag + b" BAD unexpected")

            def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
                gone.callback(None)

        factory: Factory = Factory.forProtocol(ScriptedImap)
        if tls == "implicit":
            factory = TLSMemoryBIOFactory(server_tls, False, factory)
        listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(listening.stopListening)
        settings = dataclasses.replace(SETTINGS, port=listening.getHost().port, tls=tls, ca_file=ca.ca_path,
                                       server_name=server_name)
        connector = BackendConnector(reactor, settings, ImapBackendLogin)  # type: ignore[arg-type]
        return connector.login(REQUEST), gone

    async def assert_verified_login(self, tls: str) -> None:
        """A login on C{tls} to a backend whose certificate names the server succeeds, over TLS."""
        attempt, gone = await self.tls_backend("localhost", tls)
        session = await attempt
        self.assertEqual(session.capabilities, (b"IMAP4rev1", b"IDLE"))
        self.assertIsNotNone(describe_tls(session.transport))
        session.transport.abortConnection()  # type: ignore[union-attr]
        await gone

    async def assert_wrong_name_refused(self, tls: str) -> None:
        """A login on C{tls} to a backend whose certificate names another server is BackendUnavailable."""
        attempt, gone = await self.tls_backend("store.example", tls)
        with self.assertRaises(BackendUnavailable):
            await attempt
        await gone

    async def test_implicit_tls(self) -> None:
        """On implicit TLS the login runs over a verified TLS connection."""
        await self.assert_verified_login("implicit")

    async def test_implicit_tls_wrong_name(self) -> None:
        """A backend certificate that does not name the configured server is BackendUnavailable."""
        await self.assert_wrong_name_refused("implicit")

    async def test_starttls(self) -> None:
        """On STARTTLS the login runs after the upgrade, over a verified TLS connection."""
        await self.assert_verified_login("starttls")

    async def test_starttls_wrong_name(self) -> None:
        """After STARTTLS, a certificate that does not name the configured server is BackendUnavailable."""
        await self.assert_wrong_name_refused("starttls")
