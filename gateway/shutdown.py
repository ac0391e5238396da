"""
Ending the client connections when the process stops (C{systemctl stop} or restart, a worker
told to stop), as Dovecot and Postfix end theirs, instead of dropping them.

Left to Twisted, every connection is torn down at once as the reactor stops: replies still
buffered are lost, TLS ends without close_notify, the last log lines of the connections are never
written, and a submission client whose message the MTA has just accepted never hears so, and
sends it again. L{OpenConnections} knows the open front-end connections; when it is stopped it
asks each to end (L{Ending.shut_down}: a goodbye where the protocol allows one, a relayed session
closed both ways with what the gateway holds for it written, a message's verdict passed on
first), and holds the stop until they are gone or its grace (C{[limits] stop_grace}) has passed;
those left then are dropped. A client that does not read holds the stop until the close gives
it up (L{gateway.relay.CLOSE_GRACE}), or the grace ends first.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorCore, IReactorTime
from twisted.logger import Logger

__all__ = ["STOP_MARGIN", "Ending", "OpenConnections", "sigterm_once"]

log = Logger()

STOP_MARGIN = 2.0
"""
Seconds a stopping process may take beyond its grace: the wait for the losses of the connections
it dropped (L{_DROPPED_LOSS_WAIT}), and its exit. A supervisor kills a worker that takes longer;
systemd is told a process is gone a margin after its grace, and a supervisor a margin after it
has killed its last worker (L{gateway.systemd_notify.StopNotice}).
"""


class Ending(Protocol):
    """A connection that can be asked to end."""

    def shut_down(self) -> None:
        """End as soon as nothing under way would be lost by it; the process is stopping."""

    def drop(self) -> None:
        """End now: the grace period is over."""


class OpenConnections(Service):
    """
    The client connections open in this process, ended when the service stops.

    :ivar grace: seconds the stop waits for them; a reload may change it.
    """

    def __init__(self, clock: IReactorTime, grace: float) -> None:
        self._clock = clock
        self.grace = grace
        self._open: set[Ending] = set()
        self._all_gone: Deferred[None] | None = None
        self._timer: IDelayedCall | None = None
        self._stopping_since: float | None = None
        self._dropped = 0

    @property
    def stopping(self) -> bool:
        """Whether the process is stopping: a connection not yet greeted (its PROXY header came late) is refused."""
        return self._stopping_since is not None

    def add(self, connection: Ending) -> None:
        self._open.add(connection)

    def discard(self, connection: Ending) -> None:
        self._open.discard(connection)
        if not self._open and self._all_gone is not None:
            self._finish()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.stopping:
            return None  # stopping already: the first stop waits
        self._stopping_since = self._clock.seconds()
        if not self._open:
            return None
        log.info("draining connections={count} grace={grace:g}", count=len(self._open), grace=self.grace)
        self._all_gone = all_gone = Deferred[None]()
        self._timer = self._clock.callLater(self.grace, self._grace_over)
        for connection in list(self._open):  # a copy: a connection may end, and be discarded, at once
            try:
                connection.shut_down()
            except Exception:
                log.failure("shut_down_failed")  # one connection must not keep the others open
        return all_gone

    def _grace_over(self) -> None:
        # Dropped here rather than by the reactor's stop, their last lines are logged (a worker's
        # reach its supervisor, over a channel the reactor's stop would close first). Twisted
        # reports a dropped connection's loss a turn of the reactor later: the stop waits for it.
        self._dropped = len(self._open)
        self._timer = self._clock.callLater(_DROPPED_LOSS_WAIT, self._finish)
        for connection in list(self._open):
            try:
                connection.drop()
            except Exception:
                log.failure("drop_failed")

    def _finish(self) -> None:
        all_gone, self._all_gone = self._all_gone, None
        if all_gone is None:
            return  # not stopping, or finished already
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        assert self._stopping_since is not None
        log.info("drained left={left} seconds={seconds:.3f}", left=self._dropped,
                 seconds=self._clock.seconds() - self._stopping_since)
        all_gone.callback(None)


_DROPPED_LOSS_WAIT = 1.0
"""Seconds the stop waits, at most, for the losses of the connections it dropped to be reported."""


def sigterm_once(reactor: IReactorCore) -> None:
    """
    Have the SIGTERM handler the reactor installed stop it once: later SIGTERMs are ignored. A
    worker gets two at once (systemd signals every process of the unit, and so does the
    supervisor), and Twisted would answer the second, while the connections end, with a
    ReactorNotRunning traceback. A stop begun otherwise (a worker whose supervisor has gone)
    takes none either. SIGKILL still ends the process. Call it once the reactor runs.
    """
    stop = signal.getsignal(signal.SIGTERM)
    if not callable(stop):
        return  # no handler of the reactor's (not run on the main thread): nothing to change

    def once(number: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop(number, frame)

    signal.signal(signal.SIGTERM, once)
    reactor.addSystemEventTrigger("before", "shutdown", signal.signal, signal.SIGTERM, signal.SIG_IGN)
