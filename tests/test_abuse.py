"""
Transcript tests of the front ends under abuse, on StringTransports with a Clock: password
guessing (escalating delays, the per-address budget, honest users unaffected), connection and
session floods, slow clients, HTTP sent to a mail port, and silent relayed sessions. On real
sockets: a client that sends commands and never reads the replies.
"""

from __future__ import annotations

import re
import socket
from dataclasses import replace

from frontend_harness import PASSWORD, TLS_OPTIONS, FrontEndTestBase, b64
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from gateway.config import Limits, SubmissionSettings
from gateway.gatekeeper import LocalGatekeeper
from gateway.connection_limits import ConnectionLimits, ConnectionRules
from gateway.frontend import MAX_UNREAD_REPLIES, FrontEndContext, FrontEndFactory, LoginFrontEnd
from gateway.idle import IdleSessions
from gateway.imap import ImapFrontEnd
from gateway.penalties import LoginPenalties, PenaltyRules
from gateway.relay import Splice
from gateway.pop3 import Pop3FrontEnd
from gateway.senders import SenderPolicy
from gateway.shutdown import OpenConnections
from gateway.submission import SubmissionFrontEnd
from gateway.testing.fakes import BACKEND_SETTINGS, MemoryAuthenticator, MemoryBackend, TLSStringTransport
from gateway.testing.gateway import SESSION_NAME

HOME = "192.168.1.1"  # the harness's first client
ATTACKER = "203.0.113.9"
HONEST = "198.51.100.7"
CONSTANT_DELAY = PenaltyRules(base_delay=2.0, max_delay=2.0)

IMAP_THROTTLED = (b" NO [UNAVAILABLE] Too many failed logins from your address, try again later.\r\n"
                  b"* BYE [UNAVAILABLE] Closing.\r\n")
IMAP_REJECTED = b" NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
IMAP_GREETING = b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL- ID AUTH=PLAIN AUTH=LOGIN] Mail gateway ready.\r\n"
IMAP_TOO_MANY_CONNECTIONS = b"* BYE [UNAVAILABLE] Too many connections, try again later.\r\n"
IMAP_TOO_MANY_SESSIONS = (b"a1 NO [UNAVAILABLE] Too many sessions for this user, try again later.\r\n"
                          b"* BYE [UNAVAILABLE] Closing.\r\n")
HTTP_LINES = (b"GET / HTTP/1.1", b"POST /x HTTP/1.1", b"Host: example.org")
_SESSION = re.compile(rf" session={SESSION_NAME}$")

SUBMISSION_RULES = SubmissionSettings(implicit_tls=(), starttls=(), backend=BACKEND_SETTINGS, senders_file=None,
                                      max_message_size=1000, max_recipients=3, idle_timeout=300.0,
                                      transaction_timeout=600.0)


class Client:
    """One client connection of a transcript: what it is sent, what it reads back, and its end."""

    def __init__(self, front: LoginFrontEnd, transport: TLSStringTransport) -> None:
        self.front = front
        self.transport = transport
        self.lost = False

    def read(self) -> bytes:
        """What the gateway wrote since the last read."""
        data = self.transport.value()
        self.transport.clear()
        return data

    def say(self, data: bytes) -> bytes:
        """Send C{data}; what the gateway wrote at once."""
        self.front.dataReceived(data)
        return self.read()

    def lose(self) -> None:
        """The connection ends as Twisted reports it: once, after the socket has gone."""
        if not self.lost:
            self.lost = True
            self.transport.connected = False
            self.front.connectionLost(Failure(ConnectionDone()))

    @property
    def closing(self) -> bool:
        """True once the gateway has asked for the connection to close."""
        return bool(self.transport.disconnecting)


class AbuseTestBase(FrontEndTestBase):
    """
    The harness with connection limits from C{connection_rules}, any number of clients (each
    ended before the harness checks for leftover timers), and the log events recorded.
    """

    connection_rules = ConnectionRules()

    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        super().setUp()
        # The harness counted its first connection under the default rules: start again under ours.
        self.front.connectionLost(Failure(ConnectionDone()))
        self.connections = ConnectionLimits(self.connection_rules)
        self.context = replace(self.context, gatekeeper=LocalGatekeeper(self.connections, self.penalties))
        self.clients: list[Client] = []
        self.home = self.open(HOME)
        self.front, self.transport = self.home.front, self.home.transport
        self.greeting = self.home.read()

    def open(self, host: str) -> Client:
        """A new connection from C{host}; its greeting (or refusal) is left unread."""
        client = Client(*self.connect(host))
        self.clients.append(client)
        return client

    def tearDown(self) -> None:
        for client in self.clients:
            client.lose()
        super().tearDown()

    def logged(self, prefix: str) -> list[str]:
        """The log messages, formatted, that begin with C{prefix}; each session's name (at the end) is C{*}."""
        return [_SESSION.sub(" session=*", text) for text in (formatEvent(e) for e in self.events)
                if text.startswith(prefix)]


class ImapTestBase(AbuseTestBase):
    """An IMAP front end on the implicit-TLS listener."""

    front_end = ImapFrontEnd
    protocol = "imap"

    def login_fails(self, client: Client, tag: bytes, user: bytes, password: bytes) -> None:
        """A LOGIN with a wrong password, answered NO [AUTHENTICATIONFAILED] within 15 s."""
        client.say(tag + b" LOGIN " + user + b" " + password + b"\r\n")
        self.clock.advance(15)
        self.assertTrue(client.read().startswith(tag + IMAP_REJECTED), "wrong password not rejected")


class HonestUserTests(ImapTestBase):
    """Only failures are slowed: an attack never holds up a good login."""

    penalty_rules = PenaltyRules()

    def test_good_login_at_full_speed_during_attack(self) -> None:
        """
        While an address is guessing bob's password, bob logs in at once from another address
        and alice at once from the attacking address.
        """
        for c in range(2):
            attacker = self.open(ATTACKER)
            for n in range(3):
                self.login_fails(attacker, b"a%d" % n, b"bob", b"guess%d-%d" % (c, n))
        attacker = self.open(ATTACKER)
        attacker.say(b"a1 LOGIN bob guess-last\r\n")
        self.assertEqual(attacker.read(), b"")  # the attacker waits for its reply

        bob = self.open(HONEST)
        bob.read()
        self.assertTrue(bob.say(b"b1 LOGIN bob secret\r\n").startswith(b"b1 OK "))
        alice = self.open(ATTACKER)
        alice.read()
        self.assertTrue(alice.say(b'c1 LOGIN alice "p4ss \\"w rd\\\\"\r\n').startswith(b"c1 OK "))
        self.assertEqual([r.user for r in self.backend.requests], ["bob", "alice"])

        self.clock.advance(14.5)
        self.assertEqual(attacker.read(), b"")
        self.clock.advance(0.5)
        self.assertEqual(attacker.read(), b"a1" + IMAP_REJECTED)


class EscalationTests(ImapTestBase):
    """Under the default rules, the failure delay grows with each failure from one address."""

    penalty_rules = PenaltyRules()

    def test_delays_on_the_wire(self) -> None:
        """Successive failures from new connections of one address are answered after 2, 4, 8, 15 and 15 s."""
        for n, delay in enumerate([2.0, 4.0, 8.0, 15.0, 15.0]):
            client = self.home if n == 0 else self.open(HOME)
            client.read()
            self.assertEqual(client.say(b"a1 LOGIN bob guess%d\r\n" % n), b"")
            self.clock.advance(delay - 0.5)
            self.assertEqual(client.read(), b"", f"failure {n + 1} answered before {delay} s")
            self.clock.advance(0.5)
            self.assertEqual(client.read(), b"a1" + IMAP_REJECTED, f"failure {n + 1} not answered at {delay} s")


class ImapBudgetTests(ImapTestBase):
    """An address that used up its failed logins is refused before any password is checked."""

    penalty_rules = replace(CONSTANT_DELAY, ip_budget=4)

    def use_up_budget(self) -> None:
        """Four failures from HOME, over two connections (a connection closes after three)."""
        for n in range(3):
            self.login_fails(self.home, b"a%d" % n, b"bob", b"wrong%d" % n)
        self.assertTrue(self.home.closing)
        self.second = self.open(HOME)
        self.second.read()
        self.login_fails(self.second, b"b1", b"bob", b"wrong3")

    def test_refused_at_once_and_closed(self) -> None:
        """
        Past the budget, LOGIN gets NO [UNAVAILABLE] at once, even with the right password,
        nothing is checked, and the connection closes.
        """
        self.use_up_budget()
        checked = list(self.auth.checked)
        self.assertEqual(self.second.say(b"b2 LOGIN bob secret\r\n"), b"b2" + IMAP_THROTTLED)
        self.assertEqual(self.auth.checked, checked)
        self.assertEqual(self.backend.requests, [])
        self.assertTrue(self.second.closing)
        self.assertEqual(self.second.say(b"b3 NOOP\r\n"), b"")

    def test_new_connection_refused_too(self) -> None:
        """A new connection from the refused address is refused at its first login; AUTHENTICATE too."""
        self.use_up_budget()
        checked = list(self.auth.checked)
        third = self.open(HOME)
        third.read()
        self.assertEqual(third.say(b"c1 AUTHENTICATE PLAIN " + b64(b"\0alice\0" + PASSWORD) + b"\r\n"),
                         b"c1" + IMAP_THROTTLED)
        self.assertEqual(self.auth.checked, checked)
        self.assertTrue(third.closing)
        self.assertEqual(len(self.logged("login_throttled ")), 1)

    def test_other_address_served(self) -> None:
        """Another address logs in while the first is refused."""
        self.use_up_budget()
        other = self.open(HONEST)
        other.read()
        self.assertTrue(other.say(b"c1 LOGIN bob secret\r\n").startswith(b"c1 OK "))

    def test_served_again_after_window(self) -> None:
        """Once the window has passed the address may log in again."""
        self.use_up_budget()
        self.clock.advance(self.penalty_rules.window)
        later = self.open(HOME)
        later.read()
        self.assertTrue(later.say(b"c1 LOGIN bob secret\r\n").startswith(b"c1 OK "))


class ImapConnectionCapTests(ImapTestBase):
    """One address holds at most max_per_address connections."""

    connection_rules = ConnectionRules(max_per_address=2)

    def test_cap(self) -> None:
        """
        The third connection from one address gets BYE [UNAVAILABLE] instead of the greeting and
        is closed; other addresses are served; when one ends a new one is let in.
        """
        self.assertEqual(self.greeting, IMAP_GREETING)
        second = self.open(HOME)
        self.assertEqual(second.read(), IMAP_GREETING)
        third = self.open(HOME)
        self.assertEqual(third.read(), IMAP_TOO_MANY_CONNECTIONS)
        self.assertTrue(third.closing)
        self.assertEqual(third.say(b"a1 LOGIN bob secret\r\n"), b"")
        self.assertEqual(self.auth.checked, [])
        self.assertEqual(self.logged("connection_refused "),
                         ["connection_refused protocol=imap client=192.168.1.1 limit=max_connections_per_ip session=*"])

        self.assertEqual(self.open(HONEST).read(), IMAP_GREETING)
        # The same client on an IPv6 socket is the same address.
        self.assertEqual(self.open("::ffff:" + HOME).read(), IMAP_TOO_MANY_CONNECTIONS)

        third.lose()
        self.assertEqual(self.open(HOME).read(), IMAP_TOO_MANY_CONNECTIONS)  # a refused one frees nothing
        second.lose()
        fourth = self.open(HOME)
        self.assertEqual(fourth.read(), IMAP_GREETING)
        self.assertTrue(fourth.say(b"a1 LOGIN bob secret\r\n").startswith(b"a1 OK "))


class SessionLimitTests(ImapTestBase):
    """One user holds at most max_sessions_per_user logged-in sessions."""

    penalty_rules = PenaltyRules()
    connection_rules = ConnectionRules(max_sessions_per_user=2)

    def test_sessions_per_user(self) -> None:
        """
        The third concurrent login of a user gets BYE [UNAVAILABLE] and closes, without a backend
        login or a failed-login penalty; another user is not affected; when a session ends bob
        may log in again.
        """
        first = self.home
        second = self.open(HONEST)
        second.read()
        self.assertTrue(first.say(b"a1 LOGIN bob secret\r\n").startswith(b"a1 OK "))
        self.assertTrue(second.say(b"a1 LOGIN bob secret\r\n").startswith(b"a1 OK "))
        third = self.open(ATTACKER)
        third.read()
        self.assertEqual(third.say(b"a1 LOGIN bob secret\r\n"), IMAP_TOO_MANY_SESSIONS)
        self.assertTrue(third.closing)
        self.assertEqual(len(self.backend.requests), 2)
        self.assertEqual(self.logged("login_failed "), [])
        self.assertEqual(self.penalties.failure_delay("bob", ATTACKER), self.penalty_rules.base_delay)

        alice = self.open(ATTACKER)
        alice.read()
        self.assertTrue(alice.say(b'a1 LOGIN alice "p4ss \\"w rd\\\\"\r\n').startswith(b"a1 OK "))

        first.lose()
        again = self.open(ATTACKER)
        again.read()
        self.assertTrue(again.say(b"a1 LOGIN bob secret\r\n").startswith(b"a1 OK "))


class SlowClientTests(ImapTestBase):
    """A client that keeps the idle timer alive is still dropped at the login deadline."""

    def test_slowloris(self) -> None:
        """One byte a second never triggers the idle timeout, but the login deadline closes the connection at 120 s."""
        self.assertEqual(self.limits.login_timeout, 120.0)
        for _ in range(119):
            self.clock.advance(1)
            self.assertEqual(self.home.say(b"x"), b"")
        self.assertFalse(self.home.closing)
        self.clock.advance(1)
        self.assertEqual(self.home.read(), b"* BYE Disconnected for inactivity.\r\n")
        self.assertTrue(self.home.closing)
        self.assertEqual(self.logged("timeout "),
                         ["timeout protocol=imap client=192.168.1.1 reason=login-deadline session=*"])


class HttpOnMailPortTests(ImapTestBase):
    """HTTP sent to a mail port (ALPACA) gets nothing back."""

    def test_http_lines_close(self) -> None:
        """An HTTP request line or Host header as the first line closes the connection, with nothing written."""
        for n, line in enumerate(HTTP_LINES):
            client = self.open(f"198.51.100.{n + 1}")
            client.read()
            self.assertEqual(client.say(line + b"\r\n"), b"", line)
            self.assertTrue(client.closing, line)
            self.assertEqual(client.say(b"a1 NOOP\r\n"), b"", line)
        self.assertEqual(self.logged("http_on_mail_port "),
                         [f"http_on_mail_port protocol=imap client=198.51.100.{n + 1} session=*" for n in range(3)])

    def test_whole_request_gets_nothing(self) -> None:
        """A browser's whole request in one segment gets nothing back and logs one event."""
        request = b"POST /x HTTP/1.1\r\nHost: mail.example.org\r\nContent-Length: 9\r\n\r\na1 LOGOUT\r\n"
        self.assertEqual(self.home.say(request), b"")
        self.assertTrue(self.home.closing)
        self.assertEqual(len(self.logged("http_on_mail_port ")), 1)

    def test_relayed_http_lines_pass(self) -> None:
        """After login, HTTP-looking lines are the client's business: they reach the backend unchanged."""
        data = b"GET / HTTP/1.1\r\nPOST /x HTTP/1.1\r\nHost: example.org\r\n"
        self.assertTrue(self.home.say(b"a1 LOGIN bob secret\r\n" + data[:16]).startswith(b"a1 OK "))
        self.assertEqual(self.home.say(data[16:]), b"")
        self.assertEqual(self.backend.sessions[0].transport.value(), data)
        self.assertFalse(self.home.closing)
        self.assertEqual(self.logged("http_on_mail_port "), [])


class RelayIdleTests(ImapTestBase):
    """A relayed session silent both ways for the relay idle timeout is closed."""

    def log_in(self) -> None:
        """The first client logs in as bob and is relayed."""
        self.assertTrue(self.home.say(b"a1 LOGIN bob secret\r\n").startswith(b"a1 OK "))

    def test_silent_session_closed(self) -> None:
        """A silent relayed session is closed at the relay idle timeout, with nothing injected, then the backend too."""
        self.log_in()
        self.clock.advance(self.limits.relay_idle_timeout - 1)
        self.assertFalse(self.home.closing)
        self.clock.advance(1)
        self.assertTrue(self.home.closing)
        self.assertEqual(self.home.read(), b"")
        self.assertEqual(self.logged("timeout "),
                         ["timeout protocol=imap client=192.168.1.1 reason=relay-idle session=*"])
        self.home.lose()
        self.assertTrue(self.backend.sessions[0].transport.disconnecting)

    def test_close_that_raises_resets_both(self) -> None:
        """
        A relay whose close raises at the idle timeout is reset both ways, and the failure logged:
        the wheel no longer watches it, so nothing else would ever end it.
        """
        self.log_in()

        def broken(splice: Splice) -> None:
            raise RuntimeError("a close went wrong")
        self.patch(Splice, "close", broken)
        self.clock.advance(self.limits.relay_idle_timeout)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(self.transport.disconnected)
        self.assertTrue(self.backend.sessions[0].transport.disconnected)

    def test_close_that_raises_halfway_leaves_no_timer(self) -> None:
        """A close that raised after it began timing the backend's close: the reset cancels that abort."""
        self.log_in()

        def broken() -> None:
            raise RuntimeError("a close went wrong")
        self.home.front._splice._close_client = broken  # type: ignore[union-attr]
        self.clock.advance(self.limits.relay_idle_timeout)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(self.backend.sessions[0].transport.disconnected)
        self.assertEqual([call for call in self.clock.getDelayedCalls() if "GracePeriod" in call.func.__qualname__], [])

    def test_traffic_either_way_resets(self) -> None:
        """Bytes from the client and bytes from the backend each restart the relay idle timeout."""
        self.log_in()
        backend = self.backend.sessions[0]
        step = self.limits.relay_idle_timeout - 60
        self.clock.advance(step)
        self.home.say(b"a2 NOOP\r\n")
        self.clock.advance(step)
        self.assertFalse(self.home.closing)
        backend.dataReceived(b"a2 OK NOOP completed.\r\n")
        self.clock.advance(step)
        self.assertFalse(self.home.closing)
        self.clock.advance(60)
        self.assertTrue(self.home.closing)
        self.assertEqual(self.home.read(), b"a2 OK NOOP completed.\r\n")


class Pop3AbuseTests(AbuseTestBase):
    """The POP3 wording of the same limits."""

    front_end = Pop3FrontEnd
    protocol = "pop3"
    penalty_rules = replace(CONSTANT_DELAY, ip_budget=2)
    connection_rules = ConnectionRules(max_per_address=1)

    def test_budget(self) -> None:
        """Past the budget, PASS gets -ERR [SYS/TEMP] at once, nothing is checked, and the connection closes."""
        for n in range(2):
            self.home.say(b"USER bob\r\nPASS wrong%d\r\n" % n)
            self.clock.advance(2)
            self.assertTrue(self.home.read().endswith(b"-ERR [AUTH] Authentication failed.\r\n"))
        checked = list(self.auth.checked)
        self.assertEqual(self.home.say(b"USER bob\r\nPASS secret\r\n"),
                         b"+OK Send your password.\r\n"
                         b"-ERR [SYS/TEMP] Too many failed logins from your address, try again later.\r\n")
        self.assertEqual(self.auth.checked, checked)
        self.assertTrue(self.home.closing)

    def test_connection_cap(self) -> None:
        """A connection past the per-address cap gets -ERR [SYS/TEMP] instead of the greeting and is closed."""
        refused = self.open(HOME)
        self.assertEqual(refused.read(), b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n")
        self.assertTrue(refused.closing)
        self.assertEqual(self.open(HONEST).read(), b"+OK Mail gateway ready.\r\n")

    def test_http_closes(self) -> None:
        """An HTTP request line closes a POP3 connection with nothing written."""
        self.assertEqual(self.home.say(b"GET / HTTP/1.1\r\n"), b"")
        self.assertTrue(self.home.closing)

    def test_relay_idle_timeout(self) -> None:
        """A silent relayed POP3 session is closed at the relay idle timeout."""
        self.assertTrue(self.home.say(b"USER bob\r\nPASS secret\r\n").endswith(b"+OK Logged in.\r\n"))
        self.clock.advance(self.limits.relay_idle_timeout - 1)
        self.assertFalse(self.home.closing)
        self.clock.advance(1)
        self.assertTrue(self.home.closing)


def submission_front_end(context: FrontEndContext) -> SubmissionFrontEnd:
    """A submission front end that lets each user send as itself only."""
    return SubmissionFrontEnd(context, SUBMISSION_RULES, SenderPolicy(None))


class SubmissionAbuseTests(AbuseTestBase):
    """The submission wording of the same limits."""

    front_end = staticmethod(submission_front_end)  # type: ignore[assignment]
    protocol = "submission"
    penalty_rules = replace(CONSTANT_DELAY, ip_budget=2)
    connection_rules = ConnectionRules(max_per_address=1)

    def test_budget(self) -> None:
        """Past the budget, AUTH gets 421 4.7.0 at once, nothing is checked, and the connection closes."""
        self.home.say(b"EHLO client.example.org\r\n")
        for n in range(2):
            self.home.say(b"AUTH PLAIN " + b64(b"\0bob\0wrong%d" % n) + b"\r\n")
            self.clock.advance(2)
            self.assertEqual(self.home.read(), b"535 5.7.8 Authentication credentials invalid\r\n")
        checked = list(self.auth.checked)
        self.assertEqual(self.home.say(b"AUTH PLAIN " + b64(b"\0bob\0secret") + b"\r\n"),
                         b"421 4.7.0 Too many failed logins from your address, try again later\r\n")
        self.assertEqual(self.auth.checked, checked)
        self.assertTrue(self.home.closing)

    def test_connection_cap(self) -> None:
        """A connection past the per-address cap gets 421 4.7.0 instead of the greeting and is closed."""
        refused = self.open(HOME)
        self.assertEqual(refused.read(), b"421 4.7.0 Too many connections, try again later\r\n")
        self.assertTrue(refused.closing)
        self.assertEqual(self.open(HONEST).read(), b"220 mail.example.org ESMTP Mail gateway ready\r\n")

    def test_http_closes(self) -> None:
        """A Host header line closes a submission connection with nothing written."""
        self.assertEqual(self.home.say(b"Host: example.org\r\n"), b"")
        self.assertTrue(self.home.closing)


def _flood(port: int, commands: bytes) -> None:
    """Connect, send C{commands} without reading anything, then close (run in a thread)."""
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # before connecting: a fixed window
    client.settimeout(30)
    try:
        client.connect(("127.0.0.1", port))
        client.sendall(commands)
    except OSError:
        pass  # reset by the gateway: as good as done
    finally:
        client.close()


class UnreadRepliesTests(TestCase):
    """On real sockets: a client that keeps sending commands and reads no reply is cut off."""

    @inlineCallbacks
    def test_cut_off(self):  # type: ignore[no-untyped-def]
        """
        Once more than MAX_UNREAD_REPLIES of replies wait to be sent, the connection is closed
        and the rest of the commands get no answer: what the gateway writes stays bounded.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        context = FrontEndContext("imap", reactor, Limits(), TLS_OPTIONS, True,  # type: ignore[arg-type]
                                  MemoryAuthenticator({}), MemoryBackend(),  # type: ignore[arg-type]
                                  "mail.example.org",
                                  LocalGatekeeper(ConnectionLimits(ConnectionRules()),
                                                  LoginPenalties(reactor, PenaltyRules())),
                                  IdleSessions(reactor), OpenConnections(reactor, Limits().stop_grace))
        factory = FrontEndFactory(ImapFrontEnd, context)
        lost: Deferred[None] = Deferred()
        build = factory.buildProtocol

        def building(addr: object) -> LoginFrontEnd:
            front = build(addr)
            connection_lost = front.connectionLost

            def made() -> None:
                LoginFrontEnd.connectionMade(front)
                front.handshakeCompleted()  # TLS is only pretended here: what is written counts as sent
                # A fixed send buffer, as the client's receive window is: the kernel holds little.
                front.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)

            def gone(reason: Failure) -> None:
                connection_lost(reason)
                lost.callback(None)

            front.connectionMade = made  # type: ignore[method-assign]
            front.connectionLost = gone  # type: ignore[method-assign]
            return front

        factory.buildProtocol = building  # type: ignore[method-assign]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        commands = b"a NOOP\r\n" * (512 * 1024)  # 4 MiB: 12 MiB of replies if all were answered
        yield deferToThread(_flood, port.getHost().port, commands)
        yield lost
        messages = [_SESSION.sub(" session=*", formatEvent(event)) for event in events]
        self.assertIn("replies_unread protocol=imap client=127.0.0.1 session=*", messages)
        [disconnect] = [event for event in events if formatEvent(event).startswith("disconnect ")]
        self.assertLess(disconnect["bytes_out"], 1024 * 1024 + 4 * MAX_UNREAD_REPLIES,
                        "the replies to a client that reads none were not bounded")
