"""
The slotted TCP connections of gateway.slots, on real loopback sockets: they behave as Twisted's
own (defaults, connecting, a refused connection or a failed bind, closing), and a session's
worth of use leaves all their attributes but ``fileno`` in slots.

If these fail after a Twisted upgrade, gateway.slots must follow Twisted's TCP classes again.
"""

from __future__ import annotations

import gc
import inspect
import socket

from frontend_harness import unslotted
from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.error import ConnectBindError, ConnectionRefusedError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from gateway.relay import _Outlet
from gateway.slots import SlottedClient, SlottedConnector, SlottedServer, TwistedDefaults
from gateway.sockets import tune


class _Peer(Protocol):
    """One side of the test connection: records what it reads, and tells the test when it is made and lost."""

    def __init__(self) -> None:
        self.made: Deferred[_Peer] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.received = b""
        self.expected = 0
        self.complete: Deferred[None] | None = None

    def connectionMade(self) -> None:
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.complete is not None and len(self.received) >= self.expected:
            complete, self.complete = self.complete, None
            complete.callback(None)

    def receive(self, size: int) -> Deferred[None]:
        """Fires once ``size`` bytes in all have been read."""
        self.expected, self.complete = size, Deferred()
        if len(self.received) >= size:
            self.dataReceived(b"")
        return self.complete

    def connectionLost(self, reason: Failure) -> None:
        self.lost.callback(None)


def _in_slots(connection: object) -> bool:
    """
    Whether a connection keeps its attributes in slots: all it keeps outside them is the
    socket's ``fileno``. (Asking makes the connection's dict, if it had none.)
    """
    return unslotted(connection) <= {"fileno"}


def _has_dict(connection: object) -> bool:
    """Whether Python has made the connection's dict (as CPython 3.11 to 3.13 report it to the garbage collector)."""
    return dict in [type(referent) for referent in gc.get_referents(connection)]


@implementer(IPushProducer)
class _Producer:
    """A streaming producer that records whether it was asked to pause."""

    def __init__(self) -> None:
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


class SlottedConnectionTests(TestCase):
    """A connection accepted as a SlottedServer, made as a SlottedClient, over a session of use."""

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.server, self.client = _Peer(), _Peer()
        port = reactor.listenTCP(0, Factory.forProtocol(lambda: self.server), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        port.transport = SlottedServer  # as the gateway's reactor sets it
        factory = ClientFactory.forProtocol(lambda: self.client)
        self.connector = SlottedConnector("127.0.0.1", port.getHost().port, factory, 10, None, reactor)
        self.connector.connect()
        self.assertIs(type(self.connector.transport), SlottedClient)
        yield self.server.made
        yield self.client.made
        self.accepted, self.made = self.server.transport, self.client.transport
        self.addCleanup(self._close)

    def _close(self) -> Deferred[list[None]] | None:
        if self.server.lost.called and self.client.lost.called:
            return None
        self.made.abortConnection()
        return gatherResults([self.server.lost, self.client.lost])

    def test_classes(self) -> None:
        """The port accepts a SlottedServer; the connector makes a SlottedClient that reads as Twisted's does."""
        self.assertIs(type(self.accepted), SlottedServer)
        self.assertIs(type(self.made), SlottedClient)
        self.assertIs(self.made.doRead.__func__, tcp.Connection.doRead, "connected: the class's reading again")
        self.assertIs(self.made.doWrite.__func__, tcp.Connection.doWrite)
        self.assertEqual(self.accepted.fileno(), self.accepted.socket.fileno())
        self.assertEqual(self.made.fileno(), self.made.socket.fileno())

    @inlineCallbacks
    def test_session_in_slots(self):  # type: ignore[no-untyped-def]
        """
        Tuned as the gateway tunes them, with data both ways, a write the socket cannot take at
        once and a producer paused by it: both connections keep all but ``fileno`` in slots.
        """
        tune(self.accepted)
        tune(self.made)
        producer = _Producer()
        self.accepted.registerProducer(producer, True)
        self.made.write(b"a1 NOOP\r\n")
        yield self.server.receive(9)
        bulk = b"x" * (8 << 20)  # more than the socket takes at once: buffered by Twisted
        self.accepted.write(bulk)
        self.assertTrue(self.accepted.dataBuffer or self.accepted._tempDataLen, "nothing was buffered")
        self.assertTrue(producer.paused)
        yield self.client.receive(len(bulk))
        self.assertEqual(self.server.received, b"a1 NOOP\r\n")
        self.assertTrue(self.client.received == bulk, "the bulk write arrived changed")
        self.assertFalse(producer.paused, "resumed once the buffer was written")
        self.assertTrue(_in_slots(self.accepted), vars(self.accepted))
        self.assertTrue(_in_slots(self.made), vars(self.made))

    @inlineCallbacks
    def test_closed(self):  # type: ignore[no-untyped-def]
        """Once lost, both connections read as Twisted's do: no socket, and the class's fileno (-1), which the reactor asks for."""
        self.made.loseConnection()
        yield self.server.lost
        yield self.client.lost
        for connection in (self.accepted, self.made):
            self.assertFalse(hasattr(connection, "socket"))
            self.assertEqual(connection.fileno(), -1)
            connection.loseConnection()  # after the loss: asks the reactor to stop reading, by fileno

    def test_compact_makes_no_dict(self) -> None:
        """The relay's compaction of connections' dicts does not make one for a slotted connection."""
        self.assertFalse(_has_dict(self.accepted), "made before compaction: nothing to test")
        _Outlet(self.accepted).compact()
        self.assertFalse(_has_dict(self.accepted))


class _Refused(ClientFactory):
    """Tells the test when its connection fails."""

    def __init__(self) -> None:
        self.failed: Deferred[BaseException] = Deferred()

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        self.failed.callback(reason.value)


class RefusedTests(TestCase):
    """A SlottedClient whose connection is refused fails as Twisted's does."""

    @inlineCallbacks
    def test_refused(self):  # type: ignore[no-untyped-def]
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            port = unused.getsockname()[1]  # nothing listens there
        factory = _Refused()
        connector = SlottedConnector("127.0.0.1", port, factory, 10, None, reactor)
        connector.connect()
        client = connector.transport
        error = yield factory.failed
        self.assertIsInstance(error, ConnectionRefusedError)
        yield deferLater(reactor, 0, lambda: None)  # the factory is told before the client lets go of it all
        self.assertFalse(hasattr(client, "connector"))
        self.assertFalse(hasattr(client, "socket"))
        self.assertEqual(client.fileno(), -1)

    @inlineCallbacks
    def test_bind_fails(self):  # type: ignore[no-untyped-def]
        """A SlottedClient that cannot bind its socket fails as Twisted's does."""
        factory = _Refused()
        connector = SlottedConnector("127.0.0.1", 9, factory, 10, ("192.0.2.1", 0), reactor)  # not this host's
        connector.connect()
        client = connector.transport
        error = yield factory.failed
        self.assertIsInstance(error, ConnectBindError)
        yield deferLater(reactor, 0, lambda: None)
        self.assertFalse(hasattr(client, "connector"))
        self.assertEqual(client.fileno(), -1)


class SlottedServerTests(SynchronousTestCase):
    """A SlottedServer starts as Twisted's Server does."""

    def _server(self, kind: type[tcp.Server]) -> tcp.Server:
        """A connection of ``kind`` on one end of a socket pair, never read from."""
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        server = kind(ours, Protocol(), ("127.0.0.1", 1), None, 1, reactor)
        self.addCleanup(server.stopReading)  # it started reading when made; first, before its socket is closed
        return server

    def test_defaults(self) -> None:
        """Every value Twisted's class gives an attribute (not a method) reads the same on a new slotted connection."""
        slotted, twisted = self._server(SlottedServer), self._server(tcp.Server)
        for name, _ in _values(tcp.Server):
            self.assertEqual(getattr(slotted, name), getattr(twisted, name), name)
        self.assertTrue(_in_slots(slotted), vars(slotted))

    def test_client_defaults(self) -> None:
        """Every value Twisted's client class gives an attribute reads the same on a new SlottedClient, before it connects."""
        client = SlottedClient.__new__(SlottedClient)
        for name, value in _values(tcp.Client):
            self.assertEqual(getattr(client, name), value, name)


def _values(cls: type) -> list[tuple[str, object]]:
    """The attributes a class gives a value that is not a method or another descriptor."""
    return [(name, getattr(cls, name)) for name in dir(cls)
            if not name.startswith("__") and not hasattr(type(inspect.getattr_static(cls, name)), "__get__")]


class _Twisted:
    """Stands for a Twisted class: class-level defaults, a method and a property."""

    paused = False
    line_mode = 1

    def pauseProducing(self) -> None:
        self.paused = True

    @property
    def mode(self) -> int:
        return self.line_mode


class _Protocol(TwistedDefaults, _Twisted):
    __slots__ = ("paused", "line_mode", "pauseProducing", "mode", "own")


class _MoreSlots(_Protocol):
    __slots__ = ("more",)


class _NoMoreSlots(_Protocol):
    __slots__ = ()


class TwistedDefaultsTests(SynchronousTestCase):
    """A slot starts with the Twisted class's value for its attribute, unless that is a method or another descriptor."""

    def test_defaults(self) -> None:
        protocol = _Protocol()
        self.assertEqual((protocol.paused, protocol.line_mode), (False, 1))
        for unset in ("pauseProducing", "mode", "own"):
            self.assertFalse(hasattr(protocol, unset), unset)

    def test_without_init(self) -> None:
        """Made without its __init__ (as a copy or a test double is), an instance still starts with the defaults."""
        self.assertEqual(_Protocol.__new__(_Protocol).line_mode, 1)

    def test_subclasses(self) -> None:
        """A subclass keeps its base's defaults, whether it adds slots or not."""
        for kind in (_MoreSlots, _NoMoreSlots):
            instance = kind()
            self.assertEqual((instance.paused, instance.line_mode), (False, 1), kind)
        self.assertFalse(hasattr(_MoreSlots(), "more"))
