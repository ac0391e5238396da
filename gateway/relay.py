"""
The byte relay between a logged-in client and its backend session.

Once a login has gone through, the gateway stops reading the protocol and only moves bytes.
Each side's reading is registered as the streaming producer of the other side's transport, so a
slow reader stalls its writer instead of growing a buffer in the gateway (the transports keep at
most one socket read in flight each), and a client that ends TLS is let go (see :class:`_Reading`).

What one read brings in goes out in the same reactor turn: decrypted in one pass, handed
straight from the protocol that read it to the splice, encrypted at once (one read makes one
batch of TLS records, full-sized when the read is large) and handed to the socket at once (the
connections are tuned by :mod:`gateway.sockets`), instead of waiting a turn for Twisted's TLS
aggregation and another for the reactor's write notification. A small command and its reply
then cross the gateway in one turn each way.

A burst (a large FETCH, APPEND or RETR) grows the memory buffers of the TLS layer, which would
keep that size for the rest of the session. Once more than a few KiB have passed, the next small
read gives them back (as soon as they hold nothing); the handshake and the login count too.

A side the relay closes, like a client its front end closes, is aborted if it has not closed
:data:`CLOSE_GRACE` seconds in which its peer has not taken :data:`CLOSE_PROGRESS` bytes of
what it was sent (:func:`close_with_grace`): a peer that stops reading or never ends TLS must not
keep its descriptor and buffers for ever, while a slow one still reading the end of a large
answer is let finish.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from twisted.internet.interfaces import IPushProducer, IReactorTime, ITransport
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from gateway.slots import SLOTTED_CONNECTIONS
from gateway.sockets import stream_connection, undelivered
from gateway.tls import release_tls_buffers, switch_to_relaying, tls_ended, tls_layer, write_tls_now

# Once more than this has passed since the TLS buffers were last given back, each read no larger
# tries to give them back again (which works once they hold nothing).
_BURST = 4096

CLOSE_GRACE = 10.0
"""
Seconds a connection the gateway closes may go without its peer taking L{CLOSE_PROGRESS} bytes of
what it was sent (or, once all of it is taken, without the peer's close_notify) before it is aborted.
"""

CLOSE_PROGRESS = 16 * 1024
"""
What a closing connection's peer must take in each L{CLOSE_GRACE} (or all that was left), about
1.6 KB/s: a slow reader is let finish, one that takes a byte now and then to hold its
connection (and the descriptor and per-address slot with it) is not.
"""


def close_with_grace(transport: ITransport, clock: IReactorTime) -> GracePeriod:
    """
    Close C{transport} once its buffer is written (and, over TLS, the peer's close_notify has
    come), or abort it once L{CLOSE_GRACE} seconds pass in which its peer has not taken
    L{CLOSE_PROGRESS} bytes of it (see L{GracePeriod}): a peer that stops
    reading or never answers would keep the connection open for ever.

    :returns: the abort; cancel it when the connection is lost in time.
    """
    transport.loseConnection()
    return GracePeriod(transport, clock)


class GracePeriod:
    """
    The abort of a connection being closed, due once L{CLOSE_GRACE} seconds pass in which its
    peer has not taken L{CLOSE_PROGRESS} bytes from it. An abort resets the connection, and what
    the socket still held is lost: a client reading the end of a FETCH, or a RETR it sent with
    QUIT, at 100 KB/s must not be cut off when its backend has closed (nginx's send_timeout
    counts from each write that makes progress, too).
    """

    __slots__ = ("_transport", "_clock", "_left", "_call")

    def __init__(self, transport: ITransport, clock: IReactorTime) -> None:
        self._transport = transport
        self._clock = clock
        self._left = undelivered(transport)
        self._call = clock.callLater(CLOSE_GRACE, self._due)

    def _due(self) -> None:
        left = undelivered(self._transport)
        if 0 < left <= self._left - CLOSE_PROGRESS:
            self._left = left
            self._call = self._clock.callLater(CLOSE_GRACE, self._due)
        else:
            self._transport.abortConnection()  # type: ignore[attr-defined]

    def cancel(self) -> None:
        """The connection closed in time: no abort (nothing to do once it has happened)."""
        if self._call.active():
            self._call.cancel()


class Splice:
    """
    Two connected transports relaying bytes both ways.

    The protocols on either side feed it what they read and tell it when they are lost; it
    writes to the other side, and closes the other side (after its buffered data is flushed)
    when one side goes away, or both when the relay ends. A backend it closes that has not
    closed L{CLOSE_GRACE} seconds later is aborted.

    :ivar from_client_bytes: bytes relayed from the client to the backend.
    :ivar from_backend_bytes: bytes relayed from the backend to the client.
    """

    # One splice and two outlets live as long as each session: slots keep them small. _clock, one
    # pointer to the shared clock, times the close of the backend; its abort lives only while it closes.
    __slots__ = ("_client", "_backend", "_to_client", "_to_backend", "_activity", "from_client_bytes",
                 "from_backend_bytes", "_closing", "_grown", "_close_client", "_clock")

    def __init__(self, client: ITransport, backend: ITransport, clock: IReactorTime,
                 activity: Callable[[], None] = lambda: None, close_client: Callable[[], None] | None = None) -> None:
        """
        :param clock: times the abort of a backend that does not close in time.
        :param activity: called whenever bytes pass either way (to keep an idle timer from firing).
        :param close_client: closes the client's connection once its buffer is written (the front
            end's, which also cuts off a client that never finishes a TLS close); by default the
            transport's C{loseConnection}.
        """
        self._client = client
        self._backend = backend
        self._to_client = _Outlet(client)
        self._to_backend = _Outlet(backend)
        for outlet in (self._to_client, self._to_backend):
            switch_to_relaying(outlet.tls)  # first: the methods bound below are the switched class's
        self._activity = activity
        self.from_client_bytes = 0
        self.from_backend_bytes = 0
        self._clock = clock
        # False while relaying, then True; or, while the backend is closing, its pending abort.
        self._closing: GracePeriod | bool = False
        self._close_client = client.loseConnection if close_client is None else close_client
        self._grown = _BURST + 1  # the handshake and the login
        # A transport takes one producer: the relay owns both registrations from here on.
        client.registerProducer(_Reading(backend, self._to_client), True)  # type: ignore[attr-defined]
        backend.registerProducer(_Reading(client, self._to_backend), True)  # type: ignore[attr-defined]
        for outlet in (self._to_client, self._to_backend):
            outlet.compact()

    def from_client(self, data: bytes) -> None:
        """Relay bytes the client sent."""
        self.from_client_bytes += len(data)
        self._activity()
        self._to_backend.send(data)
        self._after(len(data))

    def from_backend(self, data: bytes) -> None:
        """Relay bytes the backend sent."""
        self.from_backend_bytes += len(data)
        self._activity()
        self._to_client.send(data)
        self._after(len(data))

    def _after(self, size: int) -> None:
        """Note a relayed read of ``size`` bytes, and give back the TLS buffers as ``_BURST`` says."""
        self._grown += size
        if size <= _BURST and self._grown > _BURST and \
                self._to_client.release_buffers() and self._to_backend.release_buffers():
            self._grown = 0

    def client_lost(self) -> None:
        """The client's connection is gone: close the backend once its buffer is written (see L{close_with_grace})."""
        self._end(client=False)

    def backend_lost(self) -> None:
        """The backend's connection is gone: close the client once its buffer is written."""
        self._backend_closed()  # in time
        self._end(backend=False)

    def close(self) -> None:
        """End the relay (its idle timeout): close both sides once their buffers are written."""
        self._end()

    def abort(self) -> None:
        """End the relay at once: both connections are reset, and what they still hold is lost."""
        self._backend_closed()
        self._closing = True  # their losses have nothing left to close
        self._client.abortConnection()  # type: ignore[attr-defined]
        self._backend.abortConnection()  # type: ignore[attr-defined]

    def _backend_closed(self) -> None:
        """The backend's close needs no abort any more: cancel the one pending, if any."""
        if not isinstance(self._closing, bool):
            self._closing.cancel()

    def _end(self, client: bool = True, backend: bool = True) -> None:
        """Close the sides named, which are still connected."""
        if self._closing:
            return  # a side's own loss comes back here
        self._closing = True
        if backend:
            _let_go(self._backend)
            self._closing = close_with_grace(self._backend, self._clock)
        if client:
            _let_go(self._client)
            self._close_client()


def _let_go(transport: ITransport) -> None:
    """
    Ready one side of the relay to close once its buffer is written.

    The other side is its producer: Twisted closes a TLS transport only once none is registered
    (and a TCP transport whose paused producer is left resumes it when its buffer drains, instead
    of closing). A TLS close then waits for the peer's close_notify, which a side whose reading
    the other side had paused would never read.
    """
    transport.unregisterProducer()  # type: ignore[attr-defined]
    transport.resumeProducing()  # type: ignore[attr-defined]


@implementer(IPushProducer)
class _Reading:
    """
    The reading of one side, registered as the producer of the other side's transport, which
    pauses it while its buffer is full and resumes it when the buffer has drained.

    Once the other side's peer has ended TLS (close_notify), Twisted drops what is written to it
    and closes its connection only when no producer is registered: resumed then, the reading
    would relay into nothing and the connection stay open. It unregisters instead, and the
    connection closes as a lost one does (the splice then closes this side).
    """

    __slots__ = ("_source", "_consumer")

    def __init__(self, source: ITransport, consumer: _Outlet) -> None:
        self._source = source
        self._consumer = consumer

    def pauseProducing(self) -> None:
        """The consumer's buffer is full: stop reading the source."""
        self._source.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        """The consumer's buffer has drained: read the source again, unless the consumer's TLS has ended."""
        if self._consumer.tls_ended():
            self._consumer.transport.unregisterProducer()  # type: ignore[attr-defined]
            return
        self._source.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        """
        The consumer's connection is gone: close the source's once its buffer is written (the
        splice then closes it too, with its grace period). Through the source's own
        loseConnection: a TLS layer's stopProducing is its TCP connection's, which would close the
        socket under TLS at once, and a client still sending would then get a reset in place of
        the end of what it was sent.
        """
        self._source.loseConnection()


class _Outlet:
    """
    One side's transport, written to and encrypted before the reactor turn ends.

    Twisted's TLS layer holds small writes back until the next reactor turn, to make fewer
    records of them; the relay writes what one read brought, so the splice switches the side's
    TLS layer to one without that hold, which also decrypts each read in one pass
    (:func:`gateway.tls.switch_to_relaying`). The records one write makes are handed to the
    socket in one write (see :func:`gateway.tls.write_tls_now`).
    """

    __slots__ = ("transport", "tls", "_connection")

    def __init__(self, transport: ITransport) -> None:
        self.transport = transport
        self.tls = tls_layer(transport)
        self._connection = stream_connection(transport)

    def send(self, data: bytes) -> None:
        """Write ``data`` and encrypt it now."""
        tls = self.tls
        if tls is None:
            self.transport.write(data)
        else:
            write_tls_now(tls, data)

    def tls_ended(self) -> bool:
        """Whether the peer has ended TLS (there is TLS, and it has ended): nothing written reaches it."""
        return tls_ended(self.tls)

    def release_buffers(self) -> bool:
        """Give back the memory the TLS layer's buffers grew to; False if they still hold records."""
        return release_tls_buffers(self.tls)

    def compact(self) -> None:
        """
        Rebuild the attribute dicts of Twisted's TLS protocol and TCP connection under the
        transport, once relaying has given them their attributes.

        Instances of a class share one table of attribute names only while each adds its
        attributes in the same order. Twisted's transports do not (a write was buffered once or
        not, a producer was registered sooner or later), and Python then gives each a dict of
        its own, sized for three times what it holds: about 0.8 KiB for their 12 to 16
        attributes. Rebuilt at their present size, they take about half as much, for as long as
        the session lasts. A dict still shared is smaller than that, and is kept. A connection
        the gateway's reactor made keeps its attributes in slots, and its dict holds ``fileno``
        alone: nothing to gain.
        """
        for layer in (self.tls, self._connection):
            if layer is not None and not isinstance(layer, SLOTTED_CONNECTIONS):
                attributes = vars(layer)
                rebuilt = dict(attributes)  # sized for what it holds (copy() may keep the old size)
                if sys.getsizeof(rebuilt) < sys.getsizeof(attributes):
                    layer.__dict__ = rebuilt


def hand_over(protocol: LineReceiver, forward: Callable[[bytes], None]) -> int:
    """
    Switch a line-parsing protocol to relaying: what it has buffered and everything it reads
    from now on goes to C{forward}, unparsed. The protocol must be paused (it stopped parsing
    when the login began), and from now on its C{dataReceived} (or, through LineReceiver's raw
    mode, its C{rawDataReceived}) must pass what it reads to C{forward}.

    :returns: how many buffered bytes went to C{forward}.
    """
    pending = protocol.clearLineBuffer()
    protocol.setRawMode()
    protocol.paused = False
    assert protocol.transport is not None
    # Resumed first: if what was buffered fills the other side, the relay's pause then holds.
    protocol.transport.resumeProducing()  # type: ignore[attr-defined]
    if pending:
        forward(pending)
    return len(pending)
