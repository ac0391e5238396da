"""A front end on a StringTransport with a Clock, a memory authenticator and a memory backend."""

from __future__ import annotations

import base64

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from gateway.config import Limits
from gateway.frontend import FrontEndContext, FrontEndFactory, LoginFrontEnd
from gateway.testing.fakes import MemoryAuthenticator, MemoryBackend, TLSStringTransport

PASSWORD = b'p4ss "w rd\\'
TLS_OPTIONS = object()


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
    limits = Limits()
    backend_capabilities: tuple[bytes, ...] = ()

    def setUp(self) -> None:
        self.clock = Clock()
        self.auth = MemoryAuthenticator(self.clock, {"alice": PASSWORD, "bob": b"secret"})
        self.backend = MemoryBackend(capabilities=self.backend_capabilities)
        context = FrontEndContext(self.protocol, self.clock, self.limits, TLS_OPTIONS,  # type: ignore[arg-type]
                                  self.implicit_tls, self.auth, self.backend, "mail.example.org")  # type: ignore[arg-type]
        self.front = FrontEndFactory(self.front_end, context).buildProtocol(None)
        self.transport = TLSStringTransport()
        self.front.makeConnection(self.transport)
        self.greeting = self.read()

    def tearDown(self) -> None:
        if not self.front.closed or self.transport.connected:
            self.front.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def read(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def say(self, data: bytes) -> bytes:
        self.front.dataReceived(data)
        return self.read()
