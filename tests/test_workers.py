"""Tests for gateway.workers: the supervisor's pool keeps its workers running."""

from __future__ import annotations

import errno
import os
from dataclasses import replace

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from gateway.config import Limits, Settings
from gateway.connection_limits import ConnectionLimits, ConnectionRules
from gateway.gatekeeper import LocalGatekeeper
from gateway.penalties import LoginPenalties, PenaltyRules
from gateway.workers import WorkerPool

# Only what the pool reads: where the configuration is, its text, how many workers.
SETTINGS = Settings("/nonexistent.toml", "localhost", "/nonexistent", None, None, Limits(), None, None, None,  # type: ignore[arg-type]
                    workers=1, text="[gateway]\n")


class _Process:
    """The process transport a fake spawn hands to the worker's protocol."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        """Signals are recorded, not delivered: the tests end processes themselves."""
        self.signals.append(name)


class _SpawningClock(Clock):
    """A clock that spawns processes in memory; C{refusals} spawns fail as fork does under pressure."""

    def __init__(self) -> None:
        super().__init__()
        self.refusals = 0
        self.spawned: list[ProcessProtocol] = []
        self.channels: list[Protocol] = []

    def spawnProcess(self, protocol: ProcessProtocol, executable: str, args: list[str], env: dict[str, str],
                     childFDs: dict[int, object]) -> _Process:
        if self.refusals:
            self.refusals -= 1
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        process = _Process(1000 + len(self.spawned))
        protocol.makeConnection(process)  # type: ignore[arg-type]
        self.spawned.append(protocol)
        return process

    def adoptStreamConnection(self, fileno: int, family: int, factory: Factory) -> None:
        """The supervisor's end of each channel is kept, unconnected, for the tests to feed."""
        self.channels.append(factory.buildProtocol(None))


class WorkerPoolTests(SynchronousTestCase):
    """The pool keeps its number of workers, and tells each of reloads when it can take them."""

    def setUp(self) -> None:
        self.clock = _SpawningClock()
        gatekeeper = LocalGatekeeper(ConnectionLimits(ConnectionRules()), LoginPenalties(self.clock, PenaltyRules()))
        self.pool = WorkerPool(self.clock, SETTINGS, gatekeeper, [], publisher=lambda event: None)  # type: ignore[arg-type]

    def test_reload_waits_for_ready(self) -> None:
        """
        A worker still starting gets no SIGHUP (it would die of it); once ready it gets one if a
        reload happened meanwhile, and a ready worker gets one per reload.
        """
        pool, clock = self.pool, self.clock
        pool.startService()
        process = clock.spawned[0].transport
        pool.reload(replace(SETTINGS, text="[gateway]\nworkers = 1\n"))
        self.assertEqual(process.signals, [])  # type: ignore[union-attr]
        clock.channels[0].lineReceived(b'[0, "ready"]')  # type: ignore[attr-defined]
        self.assertEqual(process.signals, ["HUP"])  # type: ignore[union-attr]
        pool.reload(SETTINGS)
        self.assertEqual(process.signals, ["HUP", "HUP"])  # type: ignore[union-attr]
        clock.spawned[0].processEnded(Failure(ProcessTerminated(signal=9)))
        pool.stopService()

    def test_ready_without_reload(self) -> None:
        """A worker that started from the latest configuration is not told to reload."""
        self.pool.startService()
        self.clock.channels[0].lineReceived(b'[0, "ready"]')  # type: ignore[attr-defined]
        self.assertEqual(self.clock.spawned[0].transport.signals, [])  # type: ignore[union-attr]
        self.pool.stopService()

    def test_failed_respawn_is_retried(self) -> None:
        """A worker whose restart cannot be spawned (fork: EAGAIN) is tried again until it runs."""
        clock, pool = self.clock, self.pool
        pool.startService()
        self.assertEqual(len(pool.pids()), 1)
        clock.refusals = 1
        clock.spawned[0].processEnded(Failure(ProcessTerminated(signal=9)))
        for _ in range(10):
            try:
                clock.advance(30)
            except OSError:
                pass  # the reactor logs what a timed call raises and goes on
        self.assertEqual(len(pool.pids()), 1)
        pool.stopService()


class _AdoptRefusingClock(_SpawningClock):
    """Spawns as L{_SpawningClock}; C{adopt_refusals} adoptions of a channel fail as dup does at EMFILE."""

    def __init__(self) -> None:
        super().__init__()
        self.adopt_refusals = 0

    def adoptStreamConnection(self, fileno: int, family: int, factory: Factory) -> None:
        if self.adopt_refusals:
            self.adopt_refusals -= 1
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        super().adoptStreamConnection(fileno, family, factory)


class HalfStartedWorkerTests(SynchronousTestCase):
    """A worker whose channel could not be adopted is replaced once, not twice."""

    def test_unadopted_worker_replaced_once(self) -> None:
        """
        When the channel of a just-spawned worker cannot be adopted, the pool runs its number of
        workers once that worker has exited (it has no channel) and the restart has run, and
        every running worker is stopped with the pool.
        """
        clock = _AdoptRefusingClock()
        gatekeeper = LocalGatekeeper(ConnectionLimits(ConnectionRules()), LoginPenalties(clock, PenaltyRules()))
        pool = WorkerPool(clock, SETTINGS, gatekeeper, [], publisher=lambda event: None)  # type: ignore[arg-type]
        clock.adopt_refusals = 1
        pool.startService()
        [unadopted] = clock.spawned
        unadopted.processEnded(Failure(ProcessDone(0)))  # its end of the channel has no peer
        for _ in range(5):
            clock.advance(30)
        running = [worker for worker in clock.spawned if worker is not unadopted]
        stopping = pool.stopService()
        terminated = [worker for worker in running if worker.transport.signals == ["TERM"]]  # type: ignore[union-attr]
        for worker in running:
            worker.processEnded(Failure(ProcessDone(0)))
        self.successResultOf(stopping)
        self.assertEqual(len(running), 1, f"{len(running)} workers run for workers = 1")
        self.assertEqual(len(terminated), len(running), "a running worker is not stopped with the pool")
