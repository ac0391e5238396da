"""
Ending the client connections when the process stops (C{systemctl stop} or restart, a worker
told to stop), as Dovecot and Postfix end theirs, instead of dropping them.

Left to Twisted, every connection is torn down at once as the reactor stops: replies still
buffered are lost, TLS ends without close_notify, the last log lines of the connections are never
written, and a submission client whose message the MTA has just accepted never hears so, and
sends it again. L{OpenConnections} knows the open front-end connections; when it is stopped it
asks each to end (L{Ending.shut_down}: a goodbye where the protocol allows one, a relayed session
closed both ways once what is under way is written, a message's verdict passed on first), and
holds the stop until they are gone or L{SHUTDOWN_GRACE} has passed.
"""

from __future__ import annotations

from typing import Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = ["SHUTDOWN_GRACE", "Ending", "OpenConnections"]

log = Logger()

SHUTDOWN_GRACE = 8.0
"""
Seconds a stopping process waits for its connections to end (an MTA's verdict on a message, a
relayed session's last buffered bytes) before Twisted drops those left. A supervisor gives its
workers more (L{gateway.workers.STOP_GRACE}), and systemd far more (C{TimeoutStopSec}, 90 s).
"""


class Ending(Protocol):
    """A connection that can be asked to end."""

    def shut_down(self) -> None:
        """End as soon as nothing under way would be lost by it; the process is stopping."""


class OpenConnections(Service):
    """The client connections open in this process, ended when the service stops."""

    def __init__(self, clock: IReactorTime, grace: float = SHUTDOWN_GRACE) -> None:
        self._clock = clock
        self._grace = grace
        self._open: set[Ending] = set()
        self._all_gone: Deferred[None] | None = None
        self._timer: IDelayedCall | None = None
        self._stopping_since = 0.0

    def add(self, connection: Ending) -> None:
        self._open.add(connection)

    def discard(self, connection: Ending) -> None:
        self._open.discard(connection)
        if not self._open and self._all_gone is not None:
            self._done()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if not self._open:
            return None
        log.info("draining connections={count} grace={grace:g}", count=len(self._open), grace=self._grace)
        self._stopping_since = self._clock.seconds()
        self._all_gone = all_gone = Deferred[None]()
        self._timer = self._clock.callLater(self._grace, self._done)
        for connection in list(self._open):  # a copy: a connection may end, and be discarded, at once
            try:
                connection.shut_down()
            except Exception:
                log.failure("shut_down_failed")  # one connection must not keep the others open
        return all_gone

    def _done(self) -> None:
        all_gone, self._all_gone = self._all_gone, None
        if all_gone is None:
            return
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        log.info("drained left={left} seconds={seconds:.3f}", left=len(self._open),
                 seconds=self._clock.seconds() - self._stopping_since)
        all_gone.callback(None)
