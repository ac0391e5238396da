"""
The byte relay: what one read brings in leaves in the same reactor turn, through TLS and to the
socket, and bulk data still leaves in full-sized TLS records.
"""

from __future__ import annotations

import shutil
import tempfile

from twisted.internet import main
from twisted.internet.abstract import FileDescriptor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial.unittest import SynchronousTestCase

from gateway.relay import Splice
from gateway.testing.pki import TestCA
from gateway.testing.tls_pair import tls_pair
from gateway.tls import describe_tls

_APPLICATION_DATA = 23
_MAX_RECORD_PAYLOAD = 2**14


class _Socket(FileDescriptor):
    """
    A connected descriptor whose socket takes at most C{room} bytes per send, or fails.

    :ivar sent: what each send took, in order.
    :ivar failure: when set, what every send returns instead (as a dead socket's does).
    """

    connected = 1

    def __init__(self, reactor: MemoryReactor, room: int = 2**20) -> None:
        super().__init__(reactor)
        self.room = room
        self.sent: list[bytes] = []
        self.failure: Exception | None = None

    def writeSomeData(self, data: bytes) -> int | Exception:
        if self.failure is not None:
            return self.failure
        taken = bytes(data[: self.room])
        self.sent.append(taken)
        return len(taken)


def _records(wire: bytes) -> list[tuple[int, int]]:
    """Split TLS records: (content type, length) of each."""
    records = []
    while wire:
        length = int.from_bytes(wire[3:5], "big")
        records.append((wire[0], length))
        wire = wire[5 + length:]
    return records


class SocketTests(SynchronousTestCase):
    """A relayed read reaches a socket transport's socket before the reactor turn ends."""

    def setUp(self) -> None:
        self.reactor = MemoryReactor()
        self.socket = _Socket(self.reactor)
        self.client = StringTransport()
        self.splice = Splice(self.client, self.socket)

    def test_sent_at_once(self) -> None:
        """A command from the client is on the backend's socket with no write left for the reactor."""
        self.splice.from_client(b"a1 NOOP\r\n")
        self.assertEqual(self.socket.sent, [b"a1 NOOP\r\n"])
        self.assertNotIn(self.socket, self.reactor.getWriters())
        self.assertEqual(self.splice.from_client_bytes, 9)

    def test_rest_left_to_reactor(self) -> None:
        """What the socket does not take at once stays registered for the reactor to send."""
        self.socket.room = 3
        self.splice.from_client(b"a1 NOOP\r\n")
        self.assertEqual(self.socket.sent, [b"a1 "])
        self.assertIn(self.socket, self.reactor.getWriters())
        self.socket.room = 100
        self.socket.doWrite()  # as the reactor does once the socket can take more
        self.assertEqual(b"".join(self.socket.sent), b"a1 NOOP\r\n")
        self.assertNotIn(self.socket, self.reactor.getWriters())

    def test_dead_socket_left_to_reactor(self) -> None:
        """A socket whose send fails stays registered, so that the reactor sees the failure and closes it."""
        self.socket.failure = main.CONNECTION_LOST
        self.splice.from_client(b"a1 NOOP\r\n")
        self.assertIn(self.socket, self.reactor.getWriters())
        self.assertEqual(self.socket.doWrite(), main.CONNECTION_LOST)

    def test_closing_socket_left_to_reactor(self) -> None:
        """Once the transport is closing, the relay leaves the sending, and the close, to the reactor."""
        self.socket.loseConnection()
        self.splice.from_client(b"a1 LOGOUT\r\n")
        self.assertEqual(self.socket.sent, [])
        self.assertEqual(self.socket.doWrite(), main.CONNECTION_DONE)
        self.assertEqual(self.socket.sent, [b"a1 LOGOUT\r\n"])

    def test_under_wrappers(self) -> None:
        """The socket is found under protocol wrappers (such as the PROXY protocol's)."""
        socket = _Socket(self.reactor)
        wrapper = ProtocolWrapper(WrappingFactory(Factory.forProtocol(Protocol)), Protocol())
        wrapper.makeConnection(socket)
        splice = Splice(StringTransport(), wrapper)
        splice.from_client(b"a2 NOOP\r\n")
        self.assertEqual(socket.sent, [b"a2 NOOP\r\n"])

    def test_backend_to_client(self) -> None:
        """The other direction works the same way: the backend's reply is on the client's socket at once."""
        client = _Socket(self.reactor)
        splice = Splice(client, StringTransport())
        splice.from_backend(b"a1 OK NOOP completed\r\n")
        self.assertEqual(client.sent, [b"a1 OK NOOP completed\r\n"])
        self.assertEqual(splice.from_backend_bytes, 22)

    def test_in_memory_transports(self) -> None:
        """Transports without a socket (in-memory ones) just get the bytes written."""
        client, backend = StringTransport(), StringTransport()
        splice = Splice(client, backend)
        splice.from_client(b"a1 NOOP\r\n")
        splice.from_backend(b"a1 OK\r\n")
        self.assertEqual((backend.value(), client.value()), (b"a1 NOOP\r\n", b"a1 OK\r\n"))


class TLSTests(SynchronousTestCase):
    """
    A relayed backend read through Twisted's TLS layer (the client's side, as under implicit
    TLS), connected in memory to a TLS client.
    """

    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="test_relay-")
        self.addCleanup(shutil.rmtree, directory)
        ca = TestCA(directory)
        issued = ca.issue()
        pair = tls_pair(issued.chain_path, issued.key_path, ca.ca_path)
        self.tls, self.wire, self.collector, self.pump = pair.server, pair.wire, pair.collector, pair.pump
        self.assertIsNotNone(describe_tls(self.tls), "the in-memory TLS handshake did not complete")
        self.backend = StringTransport()
        self.splice = Splice(self.tls, self.backend)

    def test_reply_leaves_at_once(self) -> None:
        """A small reply from the backend is encrypted and on the wire without another reactor turn."""
        self.splice.from_backend(b"a1 OK NOOP completed\r\n")
        self.pump.pump(advanceClock=False)
        self.assertEqual(self.collector.received, b"a1 OK NOOP completed\r\n")

    def test_one_read_one_batch(self) -> None:
        """Each relayed read leaves as its own TLS record, in order."""
        self.splice.from_backend(b"* 3 EXISTS\r\n")
        self.splice.from_backend(b"a1 OK\r\n")
        records = _records(b"".join(self.wire.stream))
        self.assertEqual([kind for kind, _ in records], [_APPLICATION_DATA] * 2)
        self.pump.pump(advanceClock=False)
        self.assertEqual(self.collector.received, b"* 3 EXISTS\r\na1 OK\r\n")

    def test_bulk_in_full_records(self) -> None:
        """A 64 KiB read from the backend leaves as four full-sized (16 KiB) TLS records."""
        self.splice.from_backend(b"x" * 4 * _MAX_RECORD_PAYLOAD)
        records = _records(b"".join(self.wire.stream))
        self.assertEqual(len(records), 4)
        self.assertEqual({kind for kind, _ in records}, {_APPLICATION_DATA})
        # Each record carries a full 16 KiB payload plus the cipher's overhead (at most 256 bytes).
        self.assertEqual(len({length for _, length in records}), 1)
        self.assertTrue(_MAX_RECORD_PAYLOAD < records[0][1] <= _MAX_RECORD_PAYLOAD + 256, records)
