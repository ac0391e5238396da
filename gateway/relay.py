"""
The byte relay between a logged-in client and its backend session.

Once a login has gone through, the gateway stops reading the protocol and only moves bytes.
Each side's reading is registered as the streaming producer of the other side's transport, so a
slow reader stalls its writer instead of growing a buffer in the gateway (the transports keep at
most one socket read in flight each), and a client that ends TLS is let go (see :class:`_Reading`).

What one read brings in goes out in the same reactor turn: encrypted at once (one read makes
one batch of TLS records, full-sized when the read is large) and handed to the socket at once
(the connections are tuned by :mod:`gateway.sockets`), instead of waiting a turn for Twisted's TLS
aggregation and another for the reactor's write notification. A small command and its reply
then cross the gateway in one turn each way.

A burst (a large FETCH, APPEND or RETR) grows the memory buffers of the TLS
layer, which would keep that size for the rest of the session. The first small exchange after a
burst gives it back; the handshake and the login count as a burst.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IPushProducer, ITransport
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from gateway.sockets import gathered_writes, stream_connection
from gateway.tls import release_tls_buffers, tls_ended, tls_layer, write_tls_now

# Reads larger than this leave TLS buffers worth giving back; one no larger ends the burst.
_BURST = 4096


class Splice:
    """
    Two connected transports relaying bytes both ways.

    The protocols on either side feed it what they read and tell it when they are lost; it
    writes to the other side, and closes the other side (after its buffered data is flushed)
    when one side goes away.

    :ivar from_client_bytes: bytes relayed from the client to the backend.
    :ivar from_backend_bytes: bytes relayed from the backend to the client.
    """

    # One splice and two outlets live as long as each session: slots keep them small.
    __slots__ = ("_client", "_backend", "_to_client", "_to_backend", "_activity", "from_client_bytes",
                 "from_backend_bytes", "_closing", "_burst")

    def __init__(self, client: ITransport, backend: ITransport,
                 activity: Callable[[], None] = lambda: None) -> None:
        """:param activity: called whenever bytes pass either way (to keep an idle timer from firing)."""
        self._client = client
        self._backend = backend
        self._to_client = _Outlet(client)
        self._to_backend = _Outlet(backend)
        self._activity = activity
        self.from_client_bytes = 0
        self.from_backend_bytes = 0
        self._closing = False
        self._burst = True  # the handshake and the login count as one: the first small read ends it
        # A transport takes one producer: the relay owns both registrations from here on.
        client.registerProducer(_Reading(backend, client), True)  # type: ignore[attr-defined]
        backend.registerProducer(_Reading(client, backend), True)  # type: ignore[attr-defined]

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
        """Note a relayed read of ``size`` bytes: a large one is a burst, the next small one ends it."""
        if size > _BURST:
            self._burst = True
        elif self._burst:
            self._burst = False
            self._to_client.release_buffers()
            self._to_backend.release_buffers()

    def client_lost(self) -> None:
        """The client's connection is gone: close the backend once its buffer is written."""
        self._close(self._backend)

    def backend_lost(self) -> None:
        """The backend's connection is gone: close the client once its buffer is written."""
        self._close(self._client)

    def _close(self, survivor: ITransport) -> None:
        if self._closing:
            return  # the survivor's own loss comes back here
        self._closing = True
        # The lost side is the survivor's producer: if it stayed registered, a flushed
        # buffer would "resume" it instead of completing the close.
        survivor.unregisterProducer()  # type: ignore[attr-defined]
        survivor.loseConnection()


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

    def __init__(self, source: ITransport, consumer: ITransport) -> None:
        self._source = source
        self._consumer = consumer

    def pauseProducing(self) -> None:
        self._source.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        if tls_ended(self._consumer):
            self._consumer.unregisterProducer()  # type: ignore[attr-defined]
            return
        self._source.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        self._source.stopProducing()  # type: ignore[attr-defined]


class _Outlet:
    """
    One side's transport, written to and encrypted before the reactor turn ends.

    Twisted's TLS layer holds small writes back until the next reactor turn, to make fewer
    records of them; the relay writes what one read brought, so it writes past that hold. The
    records one write makes are handed to the socket in one write (see :mod:`gateway.sockets`).
    """

    __slots__ = ("_transport", "_tls", "_connection")

    def __init__(self, transport: ITransport) -> None:
        self._transport = transport
        self._tls = tls_layer(transport)
        self._connection = stream_connection(transport)

    def send(self, data: bytes) -> None:
        """Write ``data`` and encrypt it now."""
        tls = self._tls
        if tls is None:
            self._transport.write(data)
            return
        with gathered_writes(self._connection):
            write_tls_now(tls, data)

    def release_buffers(self) -> None:
        """Give back the memory the TLS layer's buffers grew to, if there is one and it is idle."""
        if self._tls is not None:
            release_tls_buffers(self._tls)


def hand_over(protocol: LineReceiver, forward: Callable[[bytes], None]) -> None:
    """
    Switch a line-parsing protocol to relaying: what it has buffered and everything it reads
    from now on goes to C{forward}, unparsed. The protocol must be paused (it stopped parsing
    when the login began) and its C{rawDataReceived} must call C{forward}.
    """
    pending = protocol.clearLineBuffer()
    protocol.setRawMode()
    if pending:
        forward(pending)
    protocol.paused = False
    assert protocol.transport is not None
    protocol.transport.resumeProducing()  # type: ignore[attr-defined]
