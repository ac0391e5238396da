"""
The byte relay: what one read brings in is encrypted in the same reactor turn, and bulk data
still leaves in full-sized TLS records.
"""

from __future__ import annotations

import shutil
import sys
import tempfile

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import LineReceiver
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.trial.unittest import SynchronousTestCase

from gateway import relay
from gateway.relay import CLOSE_GRACE, Splice, _Outlet, hand_over
from gateway.testing.pki import TestCA
from gateway.testing.tls_pair import TLSPair, memory_bios, tls_pair
from gateway.tls import _Relaying, describe_tls, switch_to_relaying

_APPLICATION_DATA = 23
_MAX_RECORD_PAYLOAD = 2**14


def _records(wire: bytes) -> list[tuple[int, int]]:
    """Split TLS records: (content type, length) of each."""
    records = []
    while wire:
        length = int.from_bytes(wire[3:5], "big")
        records.append((wire[0], length))
        wire = wire[5 + length:]
    return records


def _handshaken_pair(test: SynchronousTestCase) -> TLSPair:
    """
    A TLS server protocol (Twisted's, as under implicit TLS) and a TLS client connected in memory,
    handshake done, with certificates from a test CA in a directory removed after C{test}.
    """
    directory = tempfile.mkdtemp(prefix="test_relay-")
    test.addCleanup(shutil.rmtree, directory)
    ca = TestCA(directory)
    issued = ca.issue()
    pair = tls_pair(issued.chain_path, issued.key_path, ca.ca_path)
    test.assertIsNotNone(describe_tls(pair.server), "the in-memory TLS handshake did not complete")
    return pair


class InMemoryTests(SynchronousTestCase):
    """Both ways through the splice, over in-memory transports."""

    def test_in_memory_transports(self) -> None:
        """Transports without a socket (in-memory ones) just get the bytes written."""
        client, backend = StringTransport(), StringTransport()
        splice = Splice(client, backend, Clock())
        splice.from_client(b"a1 NOOP\r\n")
        splice.from_backend(b"a1 OK\r\n")
        self.assertEqual((backend.value(), client.value()), (b"a1 NOOP\r\n", b"a1 OK\r\n"))


class BackendClosingTests(SynchronousTestCase):
    """A backend the relay lets go is aborted if it has not closed within the grace period."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.backend = StringTransport()
        self.splice = Splice(StringTransport(), self.backend, self.clock)

    def assert_aborted_after_grace(self) -> None:
        """The backend is closed at once, and aborted once the grace period is over, not before."""
        self.assertTrue(self.backend.disconnecting)
        self.clock.advance(CLOSE_GRACE - 0.1)
        # StringTransport marks an abort (and only an abort) as disconnected.
        self.assertFalse(self.backend.disconnected, "aborted before the grace period was over")
        self.clock.advance(0.1)
        self.assertTrue(self.backend.disconnected, "a backend that never closed was not aborted")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_client_lost_stalled_backend_aborted(self) -> None:
        """Once the client is lost, a backend that does not close (it stopped reading, or never ends TLS) is aborted."""
        self.splice.client_lost()
        self.assert_aborted_after_grace()

    def test_closed_stalled_backend_aborted(self) -> None:
        """Once the relay is ended (its idle timeout), a backend that does not close is aborted."""
        self.splice.close()
        self.assert_aborted_after_grace()

    def test_draining_peer_not_aborted(self) -> None:
        """
        A peer still taking what it was sent (a slow reader at the end of a large answer) is not
        aborted while it does: the grace period counts from its last progress.
        """
        left = iter([3_000_000, 2_000_000, 1_000_000, 1_000_000])
        self.patch(relay, "undelivered", lambda transport: next(left))
        self.splice.client_lost()
        for _ in range(2):
            self.clock.advance(CLOSE_GRACE)
            self.assertFalse(self.backend.disconnected, "aborted while it was still reading")
        self.clock.advance(CLOSE_GRACE)
        self.assertTrue(self.backend.disconnected, "not aborted once it stopped reading")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_trickling_peer_aborted(self) -> None:
        """
        A peer that takes less than CLOSE_PROGRESS in a grace period (a byte now and then, to keep
        its connection) is aborted as if it had stopped.
        """
        left = iter([65536, 65536 - 1000])
        self.patch(relay, "undelivered", lambda transport: next(left))
        self.splice.client_lost()
        self.clock.advance(CLOSE_GRACE)
        self.assertTrue(self.backend.disconnected)

    def test_backend_closed_in_time(self) -> None:
        """
        The backend's abort is pending only while it closes: its connection lost within the grace
        period cancels it, and it is not aborted.
        """
        self.assertEqual(self.clock.getDelayedCalls(), [])  # nothing timed while relaying
        self.splice.client_lost()
        self.clock.advance(CLOSE_GRACE - 0.1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1, "nothing would abort a backend that never closed")
        self.splice.backend_lost()  # its protocol reports the loss
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(CLOSE_GRACE)
        self.assertFalse(self.backend.disconnected)


class TLSTests(SynchronousTestCase):
    """
    A relayed backend read through Twisted's TLS layer (the client's side, as under implicit
    TLS), connected in memory to a TLS client.
    """

    def setUp(self) -> None:
        pair = _handshaken_pair(self)
        self.tls, self.wire, self.collector, self.pump = pair.server, pair.wire, pair.collector, pair.pump
        self.backend = StringTransport()
        self.splice = Splice(self.tls, self.backend, Clock())

    def test_switched(self) -> None:
        """The splice switches a TLS side to relaying: no write aggregation stays with the session."""
        self.assertIs(type(self.tls), _Relaying)
        self.assertNotIn("_aggregator", vars(self.tls))

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

    def client_records(self, *chunks: bytes) -> None:
        """The client sends each chunk as its own TLS record, relayed by the splice once pumped."""
        self.tls.wrappedProtocol.dataReceived = self.splice.from_client  # type: ignore[method-assign]
        for chunk in chunks:
            TLSMemoryBIOProtocol.write(self.collector.transport, chunk)  # past the client's aggregation

    def test_buffers_given_back_after_burst(self) -> None:
        """The first small read after a burst (the login counts as one) gives back the TLS layer's buffers."""
        after_login = memory_bios(self.tls)
        self.splice.from_client(b"a2 IDLE\r\n")
        idle = memory_bios(self.tls)
        self.assertNotEqual(idle, after_login, "the relay kept what the handshake and the login grew")
        self.splice.from_backend(b"+ idling\r\n")
        self.assertEqual(memory_bios(self.tls), idle, "buffers given back with no burst since")
        self.splice.from_backend(b"x" * 4 * _MAX_RECORD_PAYLOAD)
        self.assertEqual(memory_bios(self.tls), idle, "buffers given back in the middle of a burst")
        self.splice.from_backend(b"a3 OK\r\n")
        self.assertNotEqual(memory_bios(self.tls), idle, "the relay kept what the burst grew")
        self.pump.pump(advanceClock=False)
        self.assertEqual(self.collector.received, b"+ idling\r\n" + b"x" * 4 * _MAX_RECORD_PAYLOAD + b"a3 OK\r\n")
        self.assertEqual(self.backend.value(), b"a2 IDLE\r\n")

    def test_client_ending_tls_lets_go(self) -> None:
        """
        Once the client has ended TLS, its connection resuming the relay's reading (its buffer
        drained) unregisters it instead, which lets the connection close; the backend stays paused.
        """
        self.wire.producer.pauseProducing()  # the client's socket buffer is full
        self.assertEqual(self.backend.producerState, "paused")
        self.collector.transport.loseConnection()  # close_notify
        self.pump.flush()
        self.assertTrue(self.wire.disconnecting, "Twisted's TLS layer no longer closes on close_notify")
        self.wire.producer.resumeProducing()  # the buffer drained
        self.assertIsNone(self.wire.producer)
        self.assertEqual(self.backend.producerState, "paused")

    def test_resumed_while_tls_lasts(self) -> None:
        """Without a close_notify, a drained buffer resumes the backend's reading."""
        self.wire.producer.pauseProducing()
        self.wire.producer.resumeProducing()
        self.assertEqual(self.backend.producerState, "producing")

    def test_buffers_given_back_after_pipelined_commands(self) -> None:
        """Commands pipelined after a burst, several records in one read: given back once all are read."""
        self.splice.from_client(b"a2 SELECT INBOX\r\n")
        self.splice.from_backend(b"x" * 4 * _MAX_RECORD_PAYLOAD)
        grown = memory_bios(self.tls)
        self.client_records(b"a3 NOOP\r\n", b"a4 IDLE\r\n")
        self.pump.pump(advanceClock=False)
        self.assertEqual(self.backend.value(), b"a2 SELECT INBOX\r\na3 NOOP\r\na4 IDLE\r\n")
        self.assertNotEqual(memory_bios(self.tls), grown, "the buffers a burst grew were kept")

    def test_buffers_given_back_after_upload_in_small_records(self) -> None:
        """An upload in small records (64 KiB in one read, no read over 4 KiB) is a burst too."""
        self.splice.from_client(b"a2 APPEND INBOX {65536+}\r\n")
        before = memory_bios(self.tls)
        self.client_records(*[b"y" * 4096] * 16)
        self.pump.pump(advanceClock=False)
        self.assertEqual(len(self.backend.value()), len(b"a2 APPEND INBOX {65536+}\r\n") + 65536)
        self.assertNotEqual(memory_bios(self.tls), before, "the buffers the upload grew were kept")

    def test_close_ends_tls(self) -> None:
        """Ending the relay (its idle timeout) closes TLS and then the connection, and the backend."""
        self.wire.producer.pauseProducing()  # the client's socket buffer is full
        self.splice.close()
        self.pump.flush()
        self.assertTrue(self.collector.transport.disconnecting or self.collector.transport.disconnected,
                        "the client got no close_notify")
        self.assertTrue(self.wire.disconnecting, "the client's TCP connection was not closed")
        self.assertTrue(self.backend.disconnecting)

    def test_backend_lost_reads_client(self) -> None:
        """The backend gone, the client's reading (paused by the backend) resumes to finish the TLS close."""
        resumed: list[bool] = []
        self.wire.resumeProducing = lambda: resumed.append(True)  # type: ignore[method-assign]
        self.splice.backend_lost()
        self.assertEqual(resumed, [True])
        self.assertIsNone(self.wire.producer)
        self.assertTrue(self.tls.disconnecting)


class AttributeDictTests(SynchronousTestCase):
    """
    The attribute dicts of Twisted's objects under a relayed transport: rebuilt at their present
    size when Python gave them a larger dict of their own, left as they are when shared.
    """

    def setUp(self) -> None:
        self.tls = _handshaken_pair(self).server

    def test_unshared_dict_rebuilt(self) -> None:
        """A dict of its own, larger than its attributes need, is rebuilt at their size, with the same attributes."""
        switch_to_relaying(self.tls)  # as the splice does: the attributes it drops are not the point here
        attributes = {f"_grown{number}": None for number in range(40)} | vars(self.tls)
        for number in range(40):
            del attributes[f"_grown{number}"]
        self.tls.__dict__ = attributes  # as a transport's own history of attributes leaves it
        before = dict(attributes)
        compact = sys.getsizeof({name: value for name, value in attributes.items()})
        self.assertGreater(sys.getsizeof(attributes), compact)
        Splice(self.tls, StringTransport(), Clock())
        self.assertLessEqual(sys.getsizeof(vars(self.tls)), compact)
        self.assertEqual({name: vars(self.tls)[name] for name in before}, before)

    def test_shared_dict_kept(self) -> None:
        """A dict that still shares its keys with the class is smaller than any rebuilt one: it is kept."""
        attributes = vars(self.tls)
        self.assertLess(sys.getsizeof(attributes), sys.getsizeof({name: value for name, value in attributes.items()}),
                        "the dict does not share its keys: nothing to test")
        _Outlet(self.tls).compact()  # as the splice does once it has registered its producers
        self.assertIs(vars(self.tls), attributes)


class _LoggedInBackend(LineReceiver):
    """A backend login dialogue that has succeeded: it stopped reading, and relays once handed over.

    :ivar splice: the relay its raw data goes to, once set.
    """

    splice: Splice | None = None

    def rawDataReceived(self, data: bytes) -> None:
        """Relay what the backend sent, as the backend leg does after the hand-over."""
        assert self.splice is not None
        self.splice.from_backend(data)


def _socket_buffer_full(pair: TLSPair) -> None:
    """
    Make the client's connection behave as a TCP transport whose send buffer is over its limit:
    every write asks its streaming producer to pause, as ``FileDescriptor.write`` does.
    """
    wire = pair.wire
    write = wire.write

    def write_into_full_buffer(data: bytes) -> None:
        write(data)
        if wire.producer is not None:
            wire.producer.pauseProducing()

    wire.write = write_into_full_buffer  # type: ignore[method-assign]


class HandOverBackpressureTests(SynchronousTestCase):
    """hand_over keeps the pause that the splice's backpressure puts on the side it hands over."""

    def setUp(self) -> None:
        self.pair = _handshaken_pair(self)
        self.backend_transport = StringTransport()
        self.backend = _LoggedInBackend()
        self.backend.makeConnection(self.backend_transport)

    def test_backend_stays_paused_while_client_buffer_full(self) -> None:
        """
        When forwarding what the backend sent before the hand-over fills the client's buffer, the
        backend's reading stays paused after the hand-over and after the reads that follow.
        """
        self.backend.pauseProducing()  # the login succeeded: the backend is not read meanwhile
        self.backend.dataReceived(b"* 1 EXISTS\r\n")  # arrived in the same read as the login's OK
        splice = Splice(self.pair.server, self.backend_transport, Clock())
        self.backend.splice = splice
        _socket_buffer_full(self.pair)  # the client does not read: its buffer stays over the limit
        hand_over(self.backend, splice.from_backend)
        self.assertEqual(self.backend_transport.producerState, "paused",
                         "hand_over resumed the backend's reading that the relay's backpressure had "
                         "just paused, with the client's buffer still full")
        splice.from_backend(b"* 2 EXISTS\r\n")  # another read, again into the full buffer
        self.assertEqual(self.backend_transport.producerState, "paused",
                         "the backend's reading is no longer paused by the full client buffer")
        self.pair.pump.flush()
        self.assertEqual(self.pair.collector.received, b"* 1 EXISTS\r\n* 2 EXISTS\r\n")
