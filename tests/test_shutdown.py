"""The open connections are ended when the process stops, within the grace period."""

from __future__ import annotations

import signal

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from gateway import shutdown
from gateway.config import Limits
from gateway.shutdown import STOP_MARGIN, OpenConnections, sigterm_once

SHUTDOWN_GRACE = Limits().stop_grace


class Connection:
    """Ends when asked, or later (L{end}), or fails to."""

    def __init__(self, connections: OpenConnections, at_once: bool = False, fails: bool = False) -> None:
        self.connections = connections
        self.at_once = at_once
        self.fails = fails
        self.asked = 0
        self.dropped = False
        connections.add(self)

    def shut_down(self) -> None:
        self.asked += 1
        if self.fails:
            raise RuntimeError("cannot end")
        if self.at_once:
            self.end()

    def end(self) -> None:
        self.connections.discard(self)

    def drop(self) -> None:
        self.dropped = True
        self.end()


class OpenConnectionsTests(SynchronousTestCase):

    def setUp(self) -> None:
        self.clock = Clock()
        self.connections = OpenConnections(self.clock, SHUTDOWN_GRACE)
        self.connections.startService()
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def test_nothing_open(self) -> None:
        """With no connection open the stop does not wait."""
        self.assertIsNone(self.connections.stopService())

    def test_waits_until_all_ended(self) -> None:
        """Each connection is asked to end once; the stop waits for the last of them."""
        quick = Connection(self.connections, at_once=True)
        slow = [Connection(self.connections), Connection(self.connections)]
        stopped = self.connections.stopService()
        self.assertEqual([quick.asked, slow[0].asked, slow[1].asked], [1, 1, 1])
        self.clock.advance(1)
        slow[0].end()
        self.assertNoResult(stopped)
        self.clock.advance(1)
        slow[1].end()
        self.successResultOf(stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual([formatEvent(e) for e in self.logged],
                         [f"draining connections=3 grace={SHUTDOWN_GRACE:g}", "drained left=0 seconds=2.000"])

    def test_grace_bounds_the_wait(self) -> None:
        """Connections that have not ended when the grace period is over are dropped, and counted as left."""
        ended, stuck = Connection(self.connections), Connection(self.connections)
        stopped = self.connections.stopService()
        self.assertTrue(self.connections.stopping)
        ended.end()
        self.clock.advance(SHUTDOWN_GRACE - 0.1)
        self.assertNoResult(stopped)
        self.clock.advance(0.1)
        self.successResultOf(stopped)
        self.assertEqual((ended.dropped, stuck.dropped), (False, True))
        self.assertEqual(formatEvent(self.logged[-1]), f"drained left=1 seconds={SHUTDOWN_GRACE:.3f}")

    def test_dropped_connections_seen_gone(self) -> None:
        """
        The stop waits for the losses of the connections it dropped, which Twisted reports a turn of
        the reactor later: ended before, the reactor's stop would never let their lines be logged.
        """
        order: list[str] = []
        stuck = Connection(self.connections)

        def lost() -> None:
            order.append("lost")
            stuck.end()

        stuck.drop = lambda: self.clock.callLater(0, lost)  # type: ignore[method-assign]
        stopped = self.connections.stopService()
        assert stopped is not None
        stopped.addCallback(lambda _: order.append("stopped"))
        self.clock.advance(SHUTDOWN_GRACE)
        self.assertEqual(order, ["lost", "stopped"])
        self.assertEqual(formatEvent(self.logged[-1]), f"drained left=1 seconds={SHUTDOWN_GRACE:.3f}")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_dropped_connection_never_seen_gone(self) -> None:
        """A dropped connection whose loss never comes holds the stop a second more, no longer."""
        Connection(self.connections).drop = lambda: None  # type: ignore[method-assign]
        stopped = self.connections.stopService()
        self.clock.advance(SHUTDOWN_GRACE)
        self.clock.advance(0.9)
        self.assertNoResult(stopped)
        self.clock.advance(0.1)
        self.successResultOf(stopped)

    def test_stopped_twice(self) -> None:
        """A second stop does not wait, nor disturb the first."""
        Connection(self.connections)
        stopped = self.connections.stopService()
        self.assertIsNone(self.connections.stopService())
        self.clock.advance(SHUTDOWN_GRACE)
        self.successResultOf(stopped)

    def test_sigterm_once(self) -> None:
        """
        The reactor's SIGTERM handler is called for the first SIGTERM only; later ones are ignored,
        as they are once a stop has begun some other way.
        """
        self.addCleanup(signal.signal, signal.SIGTERM, signal.getsignal(signal.SIGTERM))
        received: list[int] = []
        signal.signal(signal.SIGTERM, lambda number, frame: received.append(number))
        reactor = MemoryReactor()
        sigterm_once(reactor)
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)
        self.assertEqual(received, [signal.SIGTERM])
        self.assertEqual(signal.getsignal(signal.SIGTERM), signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda number, frame: received.append(number))
        [(trigger, args, _)] = reactor.triggers["before"]["shutdown"]  # a stop begun otherwise
        trigger(*args)
        self.assertEqual(signal.getsignal(signal.SIGTERM), signal.SIG_IGN)

    def test_one_failing_connection(self) -> None:
        """A connection that fails to end is logged; the others are still asked, and the stop still ends."""
        failing = Connection(self.connections, fails=True)
        other = Connection(self.connections, at_once=True)
        stopped = self.connections.stopService()
        self.assertEqual((failing.asked, other.asked), (1, 1))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.clock.advance(SHUTDOWN_GRACE)
        self.successResultOf(stopped)

    def test_grace_changed(self) -> None:
        """The grace in force when the stop begins is the one it waits (a reload may have changed it)."""
        Connection(self.connections)
        self.connections.grace = 20
        stopped = self.connections.stopService()
        self.clock.advance(19.9)
        self.assertNoResult(stopped)
        self.clock.advance(0.1)
        self.clock.advance(1)  # the wait for the dropped connections' losses
        self.successResultOf(stopped)
        self.assertEqual(formatEvent(self.logged[0]), "draining connections=1 grace=20")

    def test_workers_given_longer(self) -> None:
        """A supervisor waits longer for its workers than they wait for their connections and their losses."""
        self.assertGreater(STOP_MARGIN, shutdown._DROPPED_LOSS_WAIT)
