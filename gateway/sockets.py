"""
The TCP connections under both legs of a session, tuned for small request-reply exchanges.

:func:`tune` is applied to each connection once it is made:

- Nagle's algorithm is turned off, because login dialogues and relayed commands are small
  requests each waiting for a reply, and delayed ACKs would add 40 ms to each.
- A write goes to the socket at once when nothing is waiting in the transport's buffer.
  Twisted's TCP transport would instead register for writability and send on the reactor's
  next turn (Twisted ticket #5303): two ``epoll_ctl`` calls and one reactor turn more for every
  reply, and for every flight of the TLS handshake. What the socket does not take is buffered
  and sent by the reactor, with Twisted's flow control, exactly as before; a socket error is
  left for the reactor to meet at its own next write, so that a connection is never lost from
  inside a ``write`` call.

:func:`write_transient` sends a buffer that its writer reuses, copying only what the socket does
not take at once (the records of a relayed read, see :func:`gateway.tls.write_tls_now`).

This works with the internals of Twisted's ``FileDescriptor`` (its buffer, ``_aborting``,
``_writeDisconnected``) and of its STARTTLS (``twisted.internet._newtls``), as of Twisted 26.10;
``tests/test_sockets.py`` exercises each of them on real sockets and fails if they change.
Connections over UNIX sockets and in-memory test transports are left as they are.
"""

from __future__ import annotations

import fcntl
import struct
import termios
from collections.abc import Iterable

from twisted.internet import _newtls, tcp
from twisted.internet.abstract import FileDescriptor
from twisted.protocols.policies import ProtocolWrapper

from gateway.slots import SLOTTED_CONNECTIONS

__all__ = ["stream_connection", "tune", "undelivered", "write_backlog", "write_transient"]


def tune(transport: object) -> None:
    """Turn off Nagle's algorithm and send writes at once on the TCP connection under ``transport``."""
    connection = stream_connection(transport)
    if connection is None:
        return
    connection.setTcpNoDelay(True)
    writing_through = _WRITING_THROUGH.get(type(connection))
    if writing_through is not None:
        # The subclasses add behaviour and no state, so the running connection can take it on.
        connection.__class__ = writing_through


def stream_connection(transport: object) -> tcp.Connection | None:
    """The TCP or UNIX connection under a transport and its wrappers (TLS, PROXY), or None."""
    layer = transport
    while isinstance(layer, ProtocolWrapper):
        layer = layer.transport
    return layer if isinstance(layer, tcp.Connection) else None


def write_backlog(transport: object) -> int:
    """Bytes written to the TCP or UNIX connection under ``transport`` that its socket has not taken yet (0 for others)."""
    connection = stream_connection(transport)
    if connection is None:
        return 0
    return _buffered(connection)


def _buffered(connection: tcp.Connection) -> int:
    """Bytes in Twisted's write buffer of ``connection``."""
    return connection._tempDataLen + len(connection.dataBuffer) - connection.offset


def undelivered(transport: object) -> int:
    """
    Bytes written to the TCP or UNIX connection under ``transport`` that its peer has not taken
    yet: those in Twisted's buffer, and those in the socket's send queue (0 for other transports).
    """
    connection = stream_connection(transport)
    if connection is None:
        return 0
    sock = getattr(connection, "socket", None)  # Twisted deletes it once the connection is lost
    try:
        queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0] if sock else 0
    except (OSError, ValueError):  # closed meanwhile
        queued = 0
    return _buffered(connection) + queued


def write_transient(transport: object, data: memoryview) -> None:
    """
    Write ``data``, a view of a buffer that the caller reuses once this returns.

    On a connection :func:`tune` changed, written to directly (as Twisted's TLS layer writes its
    records, whether under implicit TLS or after STARTTLS), the view goes to the socket as it is,
    and only what the socket does not take at once, or what must wait behind earlier writes, is
    copied. Any other transport is given a copy.
    """
    if isinstance(transport, _newtls._BypassTLS):
        connection = transport._connection if transport._base is _SocketWrites else None
    else:
        connection = transport if isinstance(transport, _WritingThrough) and not transport.TLS else None
    if connection is None:
        transport.write(bytes(data))  # type: ignore[attr-defined]
    else:
        _SocketWrites.write(connection, data)


class _SocketWrites(FileDescriptor):
    """
    Writes that reach the socket at once. Never instantiated: its methods serve the connections
    below, and the STARTTLS layer's bypass, which sends the records TLS makes.
    """

    def write(self, data: bytes | memoryview) -> None:
        kind = type(data)
        if ((kind is bytes or kind is memoryview) and data and self.connected and not self.disconnecting
                and not self._aborting and not self._writeDisconnected  # type: ignore[attr-defined]
                and not self._tempDataLen and self.offset == len(self.dataBuffer)):
            sent = self.writeSomeData(data)
            if isinstance(sent, int):  # anything else is the connection's loss, for the reactor to find
                if sent == len(data):
                    return
                data = data[sent:]
        FileDescriptor.write(self, bytes(data) if kind is memoryview else data)

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        _SocketWrites.write(self, b"".join(iovec))


class _WritingThrough:
    """Mixed into Twisted's TCP server and client: plain writes and STARTTLS's records go out at once."""

    TLS: bool

    def write(self, data: bytes) -> None:
        if self.TLS:
            super().write(data)  # type: ignore[misc]  # into the TLS layer, whose records come back below
        else:
            _SocketWrites.write(self, data)  # type: ignore[arg-type]

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        self.write(b"".join(iovec))

    def startTLS(self, ctx: object, normal: bool = True) -> None:
        _newtls.startTLS(self, ctx, normal, _SocketWrites)


def _writing_through(connection: type) -> type:
    """A subclass of a TCP connection class whose writes go out at once."""
    return type(f"_{connection.__name__}", (_WritingThrough, connection), {"__slots__": ()})


# Twisted's own connections, and the slotted ones of the gateway's reactor (gateway.slots).
_WRITING_THROUGH: dict[type, type] = {
    connection: _writing_through(connection) for connection in (tcp.Server, tcp.Client, *SLOTTED_CONNECTIONS)}
