"""Tests for gateway.workers: the supervisor's pool keeps its workers running."""

from __future__ import annotations

import atexit
import errno
import os
from collections.abc import Callable
from dataclasses import replace

from twisted.internet.error import ProcessDone, ProcessTerminated, ReactorNotRunning
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from gateway.config import Limits, Settings
from gateway.connection_limits import ConnectionLimits, ConnectionRules
from gateway.gatekeeper import LocalGatekeeper
from gateway.penalties import LoginPenalties, PenaltyRules
from gateway.shutdown import STOP_MARGIN
from gateway.worker import orphaned_log
from gateway.workers import CONTROL_FD, EXIT_UNSERVED, RESTART_DELAYS, SERVED_AFTER, UNSERVED_LIMIT, WorkerPool, exit_after_stop

# Only what the pool reads: where the configuration is, its text, how many workers.
SETTINGS = Settings("/nonexistent.toml", "localhost", "/nonexistent", None, None, Limits(), None, None, None,  # type: ignore[arg-type]
                    workers=1, text="[gateway]\n")

READY = b'[0, "ready"]'
"""What a worker's channel says once the worker serves."""

CANNOT_START = "mailgateway worker: cannot start: /etc/mailgateway/users: [Errno 13] Permission denied"
"""What a worker that cannot start prints before it exits (L{gateway.worker})."""


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
        self.environments: list[dict[str, str]] = []
        self.descriptors: list[dict[int, object]] = []
        self.stops = 0

    def stop(self) -> None:
        """Counted: the tests stop the pool as the runner would."""
        self.stops += 1

    def spawnProcess(self, protocol: ProcessProtocol, executable: str, args: list[str], env: dict[str, str],
                     childFDs: dict[int, object]) -> _Process:
        if self.refusals:
            self.refusals -= 1
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        process = _Process(1000 + len(self.spawned))
        protocol.makeConnection(process)  # type: ignore[arg-type]
        self.spawned.append(protocol)
        self.environments.append(env)
        self.descriptors.append(childFDs)
        return process

    def adoptStreamConnection(self, fileno: int, family: int, factory: Factory) -> None:
        """The supervisor's end of each channel is kept, unconnected, for the tests to feed."""
        self.channels.append(factory.buildProtocol(None))


class _ExitHandlers:
    """Stands in for C{atexit.register} in a test: the handlers are kept, and run with C{os._exit} recorded."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self._case = case
        self._handlers: list[tuple[Callable[..., object], tuple[object, ...]]] = []
        case.patch(atexit, "register", self._register)

    def _register(self, handler: Callable[..., object], *args: object) -> Callable[..., object]:
        self._handlers.append((handler, args))
        return handler

    def statuses(self) -> list[int]:
        """The statuses the process would exit with: what each handler passes to C{os._exit}."""
        exited: list[int] = []
        self._case.patch(os, "_exit", exited.append)
        for handler, args in self._handlers:
            handler(*args)
        return exited


class WorkerPoolTests(SynchronousTestCase):
    """The pool keeps its number of workers, and tells each of reloads when it can take them."""

    def setUp(self) -> None:
        self.clock = _SpawningClock()
        self.exits = _ExitHandlers(self)
        self.gatekeeper = LocalGatekeeper(ConnectionLimits(ConnectionRules()),
                                          LoginPenalties(self.clock, PenaltyRules()))
        self.pool = self.pool_of(1)
        self.failed: list[ProcessProtocol] = []

    def pool_of(self, workers: int) -> WorkerPool:
        """A pool of C{workers} workers spawned by the test's clock."""
        return WorkerPool(self.clock, replace(SETTINGS, workers=workers), self.gatekeeper, [],  # type: ignore[arg-type]
                          publisher=lambda event: None)

    def fail_starts(self, until: float, spared: tuple[ProcessProtocol, ...] = ()) -> None:
        """
        Until the clock reads C{until}, every worker started (but C{spared}) prints why it cannot
        start and exits with status 1 at once, as one does whose users file it cannot read.
        """
        while True:
            for worker in self.clock.spawned:
                if worker not in self.failed and worker not in spared:
                    self.failed.append(worker)
                    worker.childDataReceived(2, CANNOT_START.encode() + b"\n")
                    worker.processEnded(Failure(ProcessTerminated(exitCode=1)))
            if self.clock.seconds() >= until:
                return
            self.clock.advance(min(0.5, until - self.clock.seconds()))

    def stop(self, pool: WorkerPool) -> None:
        """Stop C{pool} as the runner does once the reactor stops: its workers end, and nothing stays scheduled."""
        stopping = pool.stopService()
        for worker in self.clock.spawned:
            if worker.transport.signals == ["TERM"]:  # type: ignore[union-attr]
                worker.processEnded(Failure(ProcessDone(0)))
        self.successResultOf(stopping)
        self.assertEqual(self.clock.getDelayedCalls(), [])

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

    def test_serving_told_once(self) -> None:
        """The pool says it serves (systemd's READY=1) when its first worker is ready, and only then."""
        told: list[None] = []
        pool = WorkerPool(self.clock, replace(SETTINGS, workers=2), self.gatekeeper, [],  # type: ignore[arg-type]
                          publisher=lambda event: None, serving=lambda: told.append(None))
        self.patch(os, "environ", {**os.environ, "NOTIFY_SOCKET": "/run/systemd/notify"})
        pool.startService()
        self.assertEqual(told, [])
        # Only the supervisor talks to systemd: the workers are not told its socket.
        self.assertEqual([env.get("NOTIFY_SOCKET") for env in self.clock.environments], [None, None])
        self.assertEqual(self.clock.environments[0].get("PATH"), os.environ.get("PATH"))
        for channel in self.clock.channels[:2]:
            channel.lineReceived(b'[0, "ready"]')  # type: ignore[attr-defined]
        self.assertEqual(told, [None])
        for worker in self.clock.spawned:
            worker.processEnded(Failure(ProcessTerminated(signal=9)))
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


    def test_restart_after_serving_not_slowed(self) -> None:
        """
        A worker that served (ready for SERVED_AFTER seconds) and died is restarted after the
        shortest delay however often that happens (the OOM killer, a crash); one that dies
        sooner after it was ready (a crash at its first clients) has failed, and the delay grows.
        """
        pool, clock = self.pool, self.clock
        pool.startService()

        def dies(after: float, delay: float) -> None:
            clock.channels[-1].lineReceived(READY)  # type: ignore[attr-defined]
            clock.advance(after)
            started = len(clock.spawned)
            clock.spawned[-1].processEnded(Failure(ProcessTerminated(signal=9)))
            clock.advance(delay - 0.01)
            self.assertEqual(len(clock.spawned), started, f"restarted sooner than {delay} s")
            clock.advance(0.01)
            self.assertEqual(len(clock.spawned), started + 1, f"not restarted after {delay} s")

        for _ in range(len(RESTART_DELAYS) + 2):
            dies(after=SERVED_AFTER, delay=RESTART_DELAYS[0])
        for delay in RESTART_DELAYS[1:]:
            dies(after=SERVED_AFTER - 0.5, delay=delay)
        dies(after=SERVED_AFTER, delay=RESTART_DELAYS[0])
        self.stop(pool)

    def test_standard_output_for_orphans(self) -> None:
        """
        A worker gets the supervisor's standard output after its listeners (where it logs once
        its supervisor has gone), or, where the supervisor has none (closed), a pipe: it starts.
        """
        self.pool.startService()
        self.assertEqual(self.clock.descriptors[-1], {0: "w", 1: "r", 2: "r", CONTROL_FD: self.clock.descriptors[-1][3],
                                                      CONTROL_FD + 1: 1})
        real_fstat = os.fstat

        def fstat(fd: int) -> os.stat_result:
            if fd == 1:
                raise OSError(errno.EBADF, os.strerror(errno.EBADF))
            return real_fstat(fd)

        self.patch(os, "fstat", fstat)
        self.clock.spawned[-1].processEnded(Failure(ProcessTerminated(signal=9)))
        self.clock.advance(RESTART_DELAYS[0])
        self.assertEqual(len(self.clock.spawned), 2)
        self.assertEqual(self.clock.descriptors[-1][CONTROL_FD + 1], "r")
        self.stop(self.pool)

    def test_worker_of_an_earlier_supervisor(self) -> None:
        """A worker whose supervisor passed no such descriptor (an earlier release) starts, logging nowhere once orphaned."""
        read, write = os.pipe()
        os.close(write)
        os.close(read)  # a descriptor number that is closed
        orphaned = orphaned_log(read)
        orphaned({"log_format": "disconnect", "log_level": LogLevel.info, "log_namespace": "x", "log_time": 0.0})

    def test_no_ready_worker_exits(self) -> None:
        """
        When no worker has become ready for UNSERVED_LIMIT seconds, every start having failed, the
        supervisor logs one critical no_ready_worker line naming what the last worker printed,
        and stops the reactor with the exit status EXIT_UNSERVED (not 0) set for the process.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        pool = self.pool_of(2)
        pool.startService()
        self.fail_starts(until=UNSERVED_LIMIT - 0.5)
        self.assertEqual((self.clock.stops, self.exits.statuses()), (0, []))
        self.fail_starts(until=UNSERVED_LIMIT)
        self.assertEqual((self.clock.stops, self.exits.statuses()), (1, [EXIT_UNSERVED]))
        self.assertNotEqual(EXIT_UNSERVED, 0)
        [event] = [e for e in events if e["log_format"].startswith("no_ready_worker ")]
        self.assertEqual(event["log_level"], LogLevel.critical)
        self.assertEqual((event["seconds"], event["workers"], event["last_failure"], event["status"]),
                         (UNSERVED_LIMIT, 2, CANNOT_START, EXIT_UNSERVED))
        self.stop(pool)

    def test_one_serving_worker_keeps_the_gateway(self) -> None:
        """
        A worker that keeps failing to start does not end the gateway while another worker is
        ready; the bound counts from when the last ready worker is lost.
        """
        pool = self.pool_of(2)
        pool.startService()
        serving = self.clock.spawned[0]
        self.clock.channels[0].lineReceived(READY)  # type: ignore[attr-defined]
        self.fail_starts(until=10 * UNSERVED_LIMIT, spared=(serving,))
        self.assertGreater(len(self.failed), 10)
        self.assertEqual(self.clock.stops, 0)
        lost = self.clock.seconds()
        serving.processEnded(Failure(ProcessTerminated(signal=9)))
        self.fail_starts(until=lost + UNSERVED_LIMIT - 0.5)
        self.assertEqual(self.clock.stops, 0)
        self.fail_starts(until=lost + UNSERVED_LIMIT)
        self.assertEqual((self.clock.stops, self.exits.statuses()), (1, [EXIT_UNSERVED]))
        self.stop(pool)

    def test_ready_worker_resets_the_bound(self) -> None:
        """
        A worker that becomes ready before the bound resets it: the gateway gives up only once no
        worker has been ready for UNSERVED_LIMIT seconds again.
        """
        pool, clock = self.pool_of(1), self.clock
        pool.startService()
        self.fail_starts(until=UNSERVED_LIMIT - 10)
        started = len(clock.spawned)
        while len(clock.spawned) == started:  # the last restart before the bound
            clock.advance(0.5)
        self.assertLess(clock.seconds(), UNSERVED_LIMIT)
        [recovered] = clock.spawned[started:]
        clock.channels[-1].lineReceived(READY)  # type: ignore[attr-defined]
        clock.advance(2 * UNSERVED_LIMIT)
        self.assertEqual(clock.stops, 0)
        lost = clock.seconds()
        recovered.processEnded(Failure(ProcessTerminated(signal=9)))
        self.fail_starts(until=lost + UNSERVED_LIMIT - 0.5)
        self.assertEqual(clock.stops, 0)
        self.fail_starts(until=lost + UNSERVED_LIMIT)
        self.assertEqual((clock.stops, self.exits.statuses()), (1, [EXIT_UNSERVED]))
        self.stop(pool)

    def test_killed_after_grace_and_margin(self) -> None:
        """
        A worker that does not end after SIGTERM is killed its stop_grace and a margin later,
        with the longest grace a reload has given (a worker may not have applied a shorter one yet).
        """
        pool = self.pool_of(1)
        pool.startService()
        pool.reload(replace(SETTINGS, limits=Limits(stop_grace=30)))
        pool.reload(replace(SETTINGS, limits=Limits(stop_grace=5)))
        [worker] = self.clock.spawned
        stopping = pool.stopService()
        self.clock.advance(30 + STOP_MARGIN - 0.1)
        self.assertEqual(worker.transport.signals, ["TERM"])  # type: ignore[union-attr]
        self.clock.advance(0.1)
        self.assertEqual(worker.transport.signals, ["TERM", "KILL"])  # type: ignore[union-attr]
        worker.processEnded(Failure(ProcessTerminated(signal=9)))
        self.successResultOf(stopping)

    def test_hung_start_gives_up_and_stops_worker(self) -> None:
        """
        A worker that neither becomes ready nor exits does not serve either: at the bound the pool
        gives up all the same, and the runner's stop that follows ends that worker (SIGTERM).
        """
        pool = self.pool_of(1)
        pool.startService()
        self.clock.advance(UNSERVED_LIMIT)
        self.assertEqual((self.clock.stops, self.exits.statuses()), (1, [EXIT_UNSERVED]))
        [hung] = self.clock.spawned
        self.stop(pool)
        self.assertEqual(hung.transport.signals, ["TERM"])  # type: ignore[union-attr]


class ExitAfterStopTests(SynchronousTestCase):
    """exit_after_stop sets the exit status only for the stop it makes."""

    def test_already_stopping(self) -> None:
        """A reactor already stopping (SIGTERM meanwhile) stops as it was asked: no exit status is set."""
        exits = _ExitHandlers(self)

        class Stopping:
            def stop(self) -> None:
                raise ReactorNotRunning("Can't stop reactor that isn't running.")

        exit_after_stop(Stopping(), EXIT_UNSERVED)  # type: ignore[arg-type]
        self.assertEqual(exits.statuses(), [])


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
        _ExitHandlers(self)  # no worker becomes ready here: the pool gives up, which is not the point
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
