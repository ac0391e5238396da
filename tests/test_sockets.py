"""
Tuned TCP connections (gateway.sockets), on real loopback sockets: no Nagle, writes sent at once
when nothing is queued, and Twisted's buffering, ordering, closing and STARTTLS kept.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import struct
import tempfile

from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from gateway.slots import SlottedServer
from gateway.sockets import stream_connection, tune, undelivered, write_backlog, write_transient
from gateway.testing.pki import TestCA
from gateway.tls import ServerTLS, tls_layer, write_tls_now


@implementer(IHandshakeListener)
class _Accepted(Protocol):
    """The server's side: tuned when made, tells the test, records what it reads and its loss."""

    def __init__(self, made: Deferred[_Accepted]) -> None:
        self.made = made
        self.received = b""
        self.lost: Deferred[None] = Deferred()
        self.handshake: Deferred[None] = Deferred()

    def handshakeCompleted(self) -> None:
        self.handshake.callback(None)

    def connectionMade(self) -> None:
        tune(self.transport)
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure) -> None:
        self.lost.callback(None)


def _read(peer: socket.socket, size: int) -> bytes:
    """Read up to C{size} bytes, or until the other side closes (run in a thread)."""
    data = b""
    while len(data) < size:
        chunk = peer.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


class _Connected(TestCase):
    """
    A tuned accepted connection, with a plain blocking socket as its peer.

    :cvar accepted_as: the class the port makes the connection of: Twisted's, or the gateway's
        reactor's (``gateway.slots``).
    """

    accepted_as: type[tcp.Server] = tcp.Server

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        made: Deferred[_Accepted] = Deferred()
        port = reactor.listenTCP(0, Factory.forProtocol(lambda: _Accepted(made)), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        port.transport = self.accepted_as
        self.peer = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
        self.addCleanup(self.peer.close)
        self.accepted = yield made
        self.transport = self.accepted.transport
        self.addCleanup(self._close)

    def _close(self) -> Deferred[None] | None:
        if self.accepted.lost.called:
            return None
        self.transport.abortConnection()
        return self.accepted.lost


class WriteThroughTests(_Connected):
    """Writes on a tuned connection reach its socket at once, with Twisted's buffering kept."""

    def test_class(self) -> None:
        """The tuned connection is still of the class it was accepted as, with writes that go out at once."""
        self.assertIsInstance(self.transport, self.accepted_as)
        self.assertIsNot(type(self.transport), self.accepted_as)

    def test_no_delay(self) -> None:
        """Nagle's algorithm is off on the tuned connection."""
        option = self.transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        self.assertTrue(option)

    @inlineCallbacks
    def test_sent_at_once(self):  # type: ignore[no-untyped-def]
        """A write is on the socket before write returns: nothing is left for the reactor to send."""
        self.transport.write(b"* OK ready\r\n")
        self.assertNotIn(self.transport, reactor.getWriters())
        self.assertEqual(self.transport.dataBuffer + b"".join(self.transport._tempDataBuffer), b"")
        received = yield deferToThread(_read, self.peer, 12)
        self.assertEqual(received, b"* OK ready\r\n")

    @inlineCallbacks
    def test_write_sequence(self):  # type: ignore[no-untyped-def]
        """writeSequence goes out at once too, in order."""
        self.transport.writeSequence([b"* OK ", b"ready", b"\r\n"])
        self.assertNotIn(self.transport, reactor.getWriters())
        received = yield deferToThread(_read, self.peer, 12)
        self.assertEqual(received, b"* OK ready\r\n")

    @inlineCallbacks
    def test_rest_left_to_reactor(self):  # type: ignore[no-untyped-def]
        """
        What the socket cannot take stays buffered for the reactor, and a later write queues
        behind it instead of overtaking it.
        """
        bulk = bytes(range(256)) * (16 * 1024)  # 4 MiB: more than loopback socket buffers hold
        self.transport.write(bulk)
        self.assertIn(self.transport, reactor.getWriters())
        self.transport.write(b"END")
        received = yield deferToThread(_read, self.peer, len(bulk) + 3)
        self.assertEqual(len(received), len(bulk) + 3)
        self.assertTrue(received == bulk + b"END", "bytes were reordered or lost")

    @inlineCallbacks
    def test_producer_paused_while_buffered(self):  # type: ignore[no-untyped-def]
        """A streaming producer is still paused when the buffer grows, and resumed when it drains."""
        events = []

        class Producer:
            def pauseProducing(self) -> None:
                events.append("pause")

            def resumeProducing(self) -> None:
                events.append("resume")

            def stopProducing(self) -> None:
                events.append("stop")

        self.transport.registerProducer(Producer(), True)
        bulk = b"x" * (4 * 1024 * 1024)
        self.transport.write(bulk)
        self.assertEqual(events, ["pause"])
        yield deferToThread(_read, self.peer, len(bulk))
        while self.transport in reactor.getWriters():
            yield _turn()
        self.assertEqual(events, ["pause", "resume"])

    @inlineCallbacks
    def test_write_after_close_requested(self):  # type: ignore[no-untyped-def]
        """Once the close is asked for, later writes still go out before it, through the reactor."""
        self.transport.write(b"a1 OK\r\n")
        self.transport.loseConnection()
        self.transport.write(b"* BYE\r\n")
        received = yield deferToThread(_read, self.peer, 100)
        self.assertEqual(received, b"a1 OK\r\n* BYE\r\n")
        yield self.accepted.lost

    @inlineCallbacks
    def test_nothing_after_abort(self):  # type: ignore[no-untyped-def]
        """What is written after abortConnection never reaches the peer, as with Twisted's own transport."""
        self.transport.abortConnection()
        self.transport.write(b"a2 LOGOUT\r\n")
        self.peer.setblocking(False)
        try:
            leaked = self.peer.recv(100)
        except (BlockingIOError, ConnectionResetError):
            leaked = b""
        yield self.accepted.lost
        self.assertEqual(leaked, b"", "a write after abortConnection went out")

    @inlineCallbacks
    def test_dead_socket_left_to_reactor(self):  # type: ignore[no-untyped-def]
        """
        A write to a connection the peer has reset does not raise and does not lose the
        connection inside write; the reactor reports the loss afterwards.
        """
        self.peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.peer.close()  # on loopback the reset has arrived when close returns
        self.transport.write(b"* 1 EXISTS\r\n")
        self.assertFalse(self.accepted.lost.called, "the connection was lost inside write")
        self.assertIn(self.transport, reactor.getWriters())
        yield self.accepted.lost


class BacklogTests(_Connected):
    """write_backlog tells how much written the socket has not yet taken."""

    @inlineCallbacks
    def test_backlog(self):  # type: ignore[no-untyped-def]
        """Nothing after a write the socket took; what it did not take, until the reactor has sent it."""
        self.transport.write(b"* OK\r\n")
        self.assertEqual(write_backlog(self.transport), 0)
        bulk = b"x" * (4 * 1024 * 1024)  # more than loopback socket buffers hold
        self.transport.write(bulk)
        self.transport.write(b"END")
        self.assertGreater(write_backlog(self.transport), 3)
        received = yield deferToThread(_read, self.peer, 6 + len(bulk) + 3)
        self.assertEqual(len(received), 6 + len(bulk) + 3)
        yield _turn()
        self.assertEqual(write_backlog(self.transport), 0)

    def test_in_memory(self) -> None:
        """A transport without a socket has no backlog."""
        transport = StringTransport()
        transport.write(b"x" * 100_000)
        self.assertEqual(write_backlog(transport), 0)


class UndeliveredTests(_Connected):
    """undelivered tells how much written the peer has not taken: Twisted's buffer and the socket's."""

    @inlineCallbacks
    def test_undelivered(self):  # type: ignore[no-untyped-def]
        """What the socket took but the peer has not read counts, unlike in write_backlog, until it is read."""
        self.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.transport.write(b"x" * 65536)
        yield _turn()
        self.assertGreater(undelivered(self.transport), write_backlog(self.transport))
        received = yield deferToThread(_read, self.peer, 65536)
        self.assertEqual(len(received), 65536)
        yield _turn()
        self.assertEqual(undelivered(self.transport), 0)

    @inlineCallbacks
    def test_lost(self):  # type: ignore[no-untyped-def]
        """A connection that is gone (Twisted has dropped its socket) has nothing undelivered, and no error."""
        self.transport.abortConnection()
        yield self.accepted.lost
        self.assertEqual(undelivered(self.transport), 0)

    def test_in_memory(self) -> None:
        """A transport without a socket has nothing undelivered."""
        transport = StringTransport()
        transport.write(b"x" * 100_000)
        self.assertEqual(undelivered(transport), 0)


class TransientWriteTests(_Connected):
    """A buffer its writer reuses goes to the socket as it is; whatever has to wait is copied first."""

    @inlineCallbacks
    def test_sent_at_once(self):  # type: ignore[no-untyped-def]
        """A view is on the socket before the write returns."""
        buffer = bytearray(b"* OK ready\r\n")
        write_transient(self.transport, memoryview(buffer))
        buffer[:] = bytes(len(buffer))
        self.assertNotIn(self.transport, reactor.getWriters())
        received = yield deferToThread(_read, self.peer, 12)
        self.assertEqual(received, b"* OK ready\r\n")

    @inlineCallbacks
    def test_rest_copied(self):  # type: ignore[no-untyped-def]
        """What the socket does not take is copied before the write returns, and sent in order."""
        bulk = bytes(range(256)) * (16 * 1024)  # 4 MiB: more than loopback socket buffers hold
        buffer = bytearray(bulk)
        write_transient(self.transport, memoryview(buffer))
        self.assertIn(self.transport, reactor.getWriters())
        buffer[:] = bytes(len(buffer))  # the writer reuses its buffer
        self.transport.write(b"END")
        received = yield deferToThread(_read, self.peer, len(bulk) + 3)
        self.assertEqual(len(received), len(bulk) + 3)
        self.assertTrue(received == bulk + b"END", "bytes were changed, reordered or lost")

    def test_other_transport_copied(self) -> None:
        """A transport tune did not change is given a copy."""
        transport = StringTransport()
        buffer = bytearray(b"records")
        write_transient(transport, memoryview(buffer))
        buffer[:] = b"XXXXXXX"
        self.assertEqual(transport.value(), b"records")


def _turn() -> Deferred[None]:
    """One reactor turn."""
    d: Deferred[None] = Deferred()
    reactor.callLater(0, d.callback, None)
    return d


class StartTLSTests(_Connected):
    """After STARTTLS on a tuned connection, TLS records go out at once as well."""

    @inlineCallbacks
    def test_records_sent_at_once(self):  # type: ignore[no-untyped-def]
        directory = tempfile.mkdtemp(prefix="test_sockets-")
        self.addCleanup(shutil.rmtree, directory)
        ca = TestCA(directory)
        issued = ca.issue()
        peer, accepted, transport = self.peer, self.accepted, self.transport
        transport.startTLS(ServerTLS(issued.chain_path, issued.key_path, b"imap"))

        client = ssl.create_default_context(cafile=ca.ca_path)

        def handshake() -> ssl.SSLSocket:
            wrapped = client.wrap_socket(peer, server_hostname="localhost", do_handshake_on_connect=False)
            wrapped.do_handshake()
            return wrapped

        wrapped = yield deferToThread(handshake)
        self.addCleanup(wrapped.close)
        yield accepted.handshake
        transport.write(b"* OK over TLS\r\n")
        self.assertNotIn(transport, reactor.getWriters())
        received = yield deferToThread(_read, wrapped, 15)
        self.assertEqual(received, b"* OK over TLS\r\n")
        bulk = bytes(range(256)) * 1024  # four full records, written past Twisted's TLS layer
        write_tls_now(tls_layer(transport), bulk)
        received = yield deferToThread(_read, wrapped, len(bulk))
        self.assertTrue(received == bulk, "a bulk write after STARTTLS arrived changed")


class SlottedWriteThroughTests(WriteThroughTests):
    """The same, on a connection with its attributes in slots."""

    accepted_as = SlottedServer


class SlottedBacklogTests(BacklogTests):
    """The same, on a connection with its attributes in slots."""

    accepted_as = SlottedServer


class SlottedTransientWriteTests(TransientWriteTests):
    """The same, on a connection with its attributes in slots."""

    accepted_as = SlottedServer


class SlottedStartTLSTests(StartTLSTests):
    """The same, on a connection with its attributes in slots."""

    accepted_as = SlottedServer


class FindingTests(TestCase):
    """tune and stream_connection find the TCP connection under wrappers, and leave others alone."""

    def test_under_wrappers(self) -> None:
        """The TCP connection is found under protocol wrappers (TLS, PROXY)."""
        connection = tcp.Server.__new__(tcp.Server)
        wrapper = ProtocolWrapper(WrappingFactory(Factory.forProtocol(Protocol)), Protocol())
        wrapper.transport = connection
        self.assertIs(stream_connection(wrapper), connection)

    def test_in_memory_left_alone(self) -> None:
        """An in-memory transport is not a TCP connection: tune does nothing to it."""
        transport = StringTransport()
        self.assertIsNone(stream_connection(transport))
        tune(transport)
        self.assertIs(type(transport), StringTransport)
