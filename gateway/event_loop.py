"""
The reactor the gateway runs on: Twisted's epoll reactor, made lighter in two ways.

**The hand-over of ready connections to their handlers.** Twisted's epoll reactor hands each
ready descriptor over through ``log.callWithLogger``, which asks the descriptor for its log
prefix and installs it as the legacy log context for the length of the call: about a dozen
Python-level calls on every event, two events per relayed command and reply. The gateway logs
through ``twisted.logger``, whose events do not read that context. Only Twisted's own legacy
reports made during a hand-over read it (a handler's exception, a failed half-close, an error in
a TLS info callback): they now name the system as ``-``, and a traceback still names the
protocol. What escapes a handler is logged under the descriptor's prefix, as ``callWithLogger``
logs it. twistd's start-up line names the reactor class ``gateway.event_loop._Streamlined``.

**The TCP connections it makes**, accepted (``listenTCP``, ``adoptStreamPort``) or made
(``connectTCP``, which Twisted's client endpoints also call), keep their attributes in slots
(:mod:`gateway.slots`).

:func:`streamline` switches the installed reactor to this class. Any other reactor is left as
it is. ``tests/test_event_loop.py`` checks the dispatch on real sockets, and fails when
Twisted's ``doPoll`` or ``callWithLogger`` change, so that this is held against them again;
``tests/test_slots.py`` fails when Twisted's TCP connections keep attributes the slots do not
hold.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet import tcp
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.interfaces import Binding
from twisted.internet.protocol import ClientFactory
from twisted.python import log

from gateway.slots import SlottedConnector, SlottedServer

__all__ = ["streamline"]


class _Streamlined(EPollReactor):
    """Twisted's epoll reactor, handing ready descriptors over without a log context each time."""

    def doPoll(self, timeout: float | None) -> None:
        """Wait for events (up to ``timeout`` seconds, or without end), and handle each."""
        try:
            ready = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        handle = self._doReadOrWrite
        for fd, event in ready:
            selectable = selectables.get(fd)
            if selectable is None:
                continue  # removed by a handler earlier in this batch
            try:
                handle(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                # Raised by a handler's disconnection (reading and writing failures are reported
                # inside): reported with the descriptor's prefix, as callWithLogger would.
                log.err(system=_prefix(selectable))

    doIteration = doPoll

    def listenTCP(self, port: int, factory: object, backlog: int = 50, interface: str = "") -> tcp.Port:
        return _slotted(super().listenTCP(port, factory, backlog, interface))

    def adoptStreamPort(self, fileDescriptor: int, addressFamily: int, factory: object) -> tcp.Port:
        return _slotted(super().adoptStreamPort(fileDescriptor, addressFamily, factory))

    def connectTCP(self, host: str, port: int, factory: ClientFactory[Any], timeout: float = 30.0,
                   bindAddress: Binding | tuple[str, int] | None = None) -> SlottedConnector:
        connector = SlottedConnector(host, port, factory, timeout, bindAddress, self)
        connector.connect()
        return connector


def _slotted(listening: tcp.Port) -> tcp.Port:
    """A listening port, which makes its TCP connections slotted from now on (it has accepted none yet)."""
    if type(listening) is tcp.Port:  # not its subclasses (UNIX ports), which make connections of their own classes
        listening.transport = SlottedServer  # the class it makes each connection of
    return listening


def _prefix(selectable: object) -> str:
    """The log prefix of a descriptor, or a fixed text if it has none or it fails."""
    try:
        return str(selectable.logPrefix())  # type: ignore[attr-defined]
    except Exception:
        return "(buggy logPrefix method)"


def streamline(reactor: object) -> None:
    """Switch Twisted's epoll reactor, running or not, to the lighter hand-over; leave any other reactor alone."""
    if type(reactor) is EPollReactor:
        # The subclass adds no state, so the reactor can take it on as it is.
        reactor.__class__ = _Streamlined
