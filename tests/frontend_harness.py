"""A front end on a StringTransport with a Clock, a memory authenticator and a memory backend."""

from __future__ import annotations

import base64
import gc
import re
import weakref

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from gateway.config import Limits
from gateway.connection_limits import ConnectionLimits, ConnectionRules
from gateway.frontend import FrontEndContext, FrontEndFactory, LoginFrontEnd
from gateway.gatekeeper import LocalGatekeeper
from gateway.idle import IdleSessions
from gateway.shutdown import OpenConnections
from gateway.penalties import LoginPenalties, PenaltyRules
from gateway.testing.fakes import MemoryAuthenticator, MemoryBackend, TLSStringTransport
from gateway.testing.gateway import SESSION_NAME

PASSWORD = b'p4ss "w rd\\'
TLS_OPTIONS = object()


def unslotted(protocol: object) -> set[str]:
    """
    The attributes of a protocol that live in its dict: the gateway's per-session protocols keep
    theirs and Twisted's in slots (a dict of them costs 0.3 to 1 KiB per protocol).
    """
    return set(vars(protocol))


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class FrontEndTestBase(SynchronousTestCase):
    """
    Connects one front end per test; subclasses set C{front_end}, C{protocol} and
    C{backend_capabilities}. tearDown checks that no timer is left behind.
    """

    front_end: type[LoginFrontEnd]
    protocol = "test"
    implicit_tls = True
    # Timeouts of the tests' own (the defaults are test_config's to check): 60 s of silence, 120 s to log in.
    limits = Limits(idle_timeout=60.0, login_timeout=120.0)
    # A constant failure delay (no escalation) unless a test asks for one: tests/test_penalties.py covers escalation.
    penalty_rules = PenaltyRules(base_delay=2.0, max_delay=2.0)
    backend_capabilities: tuple[bytes, ...] = ()

    def setUp(self) -> None:
        # Every line a test makes about a client's connection must name its session.
        self.unnamed_lines: list[str] = []
        globalLogPublisher.addObserver(self._check_session_named)
        self.addCleanup(globalLogPublisher.removeObserver, self._check_session_named)
        self.clock = Clock()
        self.auth = MemoryAuthenticator({"alice": PASSWORD, "bob": b"secret"})
        self.backend = MemoryBackend(capabilities=self.backend_capabilities)
        self.penalties = LoginPenalties(self.clock, self.penalty_rules)
        self.connections = ConnectionLimits(ConnectionRules())
        self.context = FrontEndContext(self.protocol, self.clock, self.limits, TLS_OPTIONS,  # type: ignore[arg-type]
                                       self.implicit_tls, self.auth, self.backend,  # type: ignore[arg-type]
                                       "mail.example.org", LocalGatekeeper(self.connections, self.penalties),
                                       IdleSessions(self.clock), OpenConnections(self.clock, self.limits.stop_grace))
        self.front, self.transport = self.connect()
        self.greeting = self.read()

    def connect(self, host: str = "192.168.1.1") -> tuple[LoginFrontEnd, TLSStringTransport]:
        """Another connection to the same listener, from C{host}."""
        front = FrontEndFactory(self.front_end, self.context).buildProtocol(None)
        transport = TLSStringTransport(peerAddress=IPv4Address("TCP", host, 54321))
        front.makeConnection(transport)
        if self.implicit_tls:
            front.handshakeCompleted()  # the TLS these transports stand for: what is written counts as sent
        return front, transport

    def tearDown(self) -> None:
        if not self.front.closed or self.transport.connected:
            self.front.connectionLost(Failure(ConnectionDone()))
        for session in self.backend.sessions:
            # Closed (not aborted) by the gateway: the connection goes, as a real one would in time.
            if session.transport.disconnecting and not session.transport.disconnected and not session.lost:
                session.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.unnamed_lines, [], "lines about a connection without its session=")

    def _check_session_named(self, event: LogEvent) -> None:
        if (event.get("log_namespace") in ("gateway.frontend", "gateway.submission") and "client" in event
                and not re.fullmatch(SESSION_NAME, str(event.get("session")))):
            self.unnamed_lines.append(formatEvent(event))

    def read(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def say(self, data: bytes) -> bytes:
        self.front.dataReceived(data)
        return self.read()

    def assert_freed_without_collector(self, command: bytes) -> None:
        """
        A connection that sent C{command} and closed is freed by reference counting alone: a
        front end in a reference cycle would hold its memory until the cycle collector ran.
        """
        front, transport = self.connect("192.168.1.2")
        front.dataReceived(command)
        front.connectionLost(Failure(ConnectionDone()))
        gone = weakref.ref(front)
        gc.disable()
        try:
            del front, transport
            self.assertIsNone(gone(), "the closed front end is still alive without the cycle collector")
        finally:
            gc.enable()
