"""
The supervisor's worker processes: started, watched, restarted, signalled and stopped.

Like nginx's master process, the supervisor binds every mail listener (before twistd drops
privileges) and never accepts on them; each worker inherits the sockets and accepts on all of
them, so the kernel spreads the clients over the workers and over the CPUs. Each worker has a
channel back (L{gateway.worker_channel}) for the shared limits and penalties and its log.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Sequence
from functools import partial

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorProcess, IReactorTime
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import ILogObserver, Logger, globalLogPublisher
from twisted.python.failure import Failure

from gateway.config import Settings
from gateway.gatekeeper import LocalGatekeeper
from gateway.listener import Listener
from gateway.worker_channel import SupervisorChannel

log = Logger()

CONTROL_FD = 3
"""The worker's descriptor of its channel; the listening sockets follow it, in order."""

RESTART_DELAYS = (1.0, 2.0, 5.0, 15.0, 30.0)
"""Seconds before restarting a worker that exited, growing while it keeps failing soon after start."""

STABLE_AFTER = 60.0
"""A worker that ran this long before exiting is restarted after the shortest delay again."""

STOP_GRACE = 10.0
"""Seconds the workers have to stop after SIGTERM before they are killed."""


class WorkerPool(Service):
    """
    Runs C{count} workers serving the mail listeners held by C{listeners}.

    :param reactor: spawns the processes and adopts their channels.
    :param settings: the configuration the supervisor started with; workers start from its
        text, or from that of the latest L{reload}, never from an unchecked file.
    :param gatekeeper: the shared limits and penalties the workers consult.
    :param listeners: the supervisor's non-accepting listeners, in L{gateway.service.mail_endpoints} order.
    :param publisher: where the workers' log events go.
    """

    def __init__(self, reactor: IReactorProcess, settings: Settings, gatekeeper: LocalGatekeeper,
                 listeners: Sequence[Listener], publisher: ILogObserver = globalLogPublisher) -> None:
        self._reactor = reactor
        self._config_path = settings.path
        self._text = settings.text
        self._generation = 0  # of the text; a worker that started from an older one is told to reload
        self._count = settings.workers
        self._gatekeeper = gatekeeper
        self._listeners = listeners
        self._publisher = publisher
        self._workers: dict[int, _Worker] = {}
        self._restarts: dict[int, IDelayedCall] = {}
        self._failures: dict[int, int] = {}

    def startService(self) -> None:
        super().startService()
        for number in range(self._count):
            self._spawn(number)

    def stopService(self) -> Deferred[object]:
        super().stopService()
        for pending in self._restarts.values():
            pending.cancel()
        self._restarts.clear()
        stopping = [worker.stop() for worker in self._workers.values()]
        return DeferredList(stopping)  # type: ignore[return-value]

    def reload(self, settings: Settings) -> None:
        """
        Have every worker re-read the configuration (they take SIGHUP as the supervisor does);
        workers started from now on start from C{settings}.
        """
        self._text = settings.text
        self._generation += 1
        for worker in self._workers.values():
            self._update(worker)

    def _update(self, worker: _Worker) -> None:
        # Before it is ready a worker cannot take SIGHUP (it would die of it); it is told once ready.
        if worker.ready and worker.generation != self._generation:
            worker.generation = self._generation
            worker.signal("HUP")

    def _ready(self, worker: _Worker) -> None:
        worker.ready = True
        self._update(worker)

    def pids(self) -> list[int]:
        """The process ids of the running workers."""
        return [worker.pid for worker in self._workers.values() if worker.pid is not None]

    def _spawn(self, number: int) -> None:
        self._restarts.pop(number, None)
        try:
            self._start(number)
        except OSError as e:  # fork or socketpair refused (EAGAIN, EMFILE): try again later
            self._schedule(number, f"cannot start: {e}")

    def _start(self, number: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with ours, theirs:
            descriptors: dict[int, int | str] = {0: "w", 1: "r", 2: "r", CONTROL_FD: theirs.fileno()}
            for offset, held in enumerate(self._listeners):
                assert held.port is not None, "the listeners start before the pool"
                descriptors[CONTROL_FD + 1 + offset] = held.port.fileno()  # type: ignore[attr-defined]
            worker = _Worker(number, self._reactor, self._ended, self._generation)  # type: ignore[arg-type]
            arguments = [sys.executable, "-m", "gateway.worker", "--config", self._config_path,
                         "--number", str(number), "--listeners", str(len(self._listeners))]
            process = self._reactor.spawnProcess(worker, sys.executable, arguments, env=dict(os.environ),
                                                 childFDs=descriptors)  # type: ignore[arg-type]
            channel = SupervisorChannel(self._gatekeeper, self._publisher, process.pid, lambda: self._text,
                                        partial(self._ready, worker))
            self._reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX,  # type: ignore[attr-defined]
                                                SingleProtocolFactory(channel))
        self._workers[number] = worker
        log.info("worker_started worker={worker} pid={pid}", worker=number, pid=worker.pid)

    def _ended(self, worker: _Worker, reason: Failure, ran: float) -> None:
        if self._workers.get(worker.number) is not worker:
            return  # its start failed after the spawn, which has already scheduled the restart
        del self._workers[worker.number]
        if not self.running:
            return
        if ran >= STABLE_AFTER:
            self._failures[worker.number] = 0
        self._schedule(worker.number, f"pid {worker.pid} exited: {reason.getErrorMessage()}")

    def _schedule(self, number: int, reason: str) -> None:
        """Start worker C{number} again later: the sooner the longer it had been running well."""
        failures = self._failures.get(number, 0)
        self._failures[number] = failures + 1
        delay = RESTART_DELAYS[min(failures, len(RESTART_DELAYS) - 1)]
        log.error("worker_exited worker={worker} reason={reason} restart_in={delay:g}",
                  worker=number, reason=reason, delay=delay)
        clock: IReactorTime = self._reactor  # type: ignore[assignment]
        self._restarts[number] = clock.callLater(delay, self._spawn, number)


class SingleProtocolFactory(Factory):
    """A factory for the one protocol instance an adopted connection gets."""

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> Protocol:
        return self._protocol


class _Worker(ProcessProtocol):
    """
    One worker process as the supervisor sees it: its output is logged, its end reported.

    :param exited: called with the worker, why it ended and how long it ran, unless it was stopped.
    :param generation: that of the configuration text it starts from.
    :ivar ready: whether it serves (and can take SIGHUP).
    """

    def __init__(self, number: int, clock: IReactorTime, exited: Callable[[_Worker, Failure, float], None],
                 generation: int) -> None:
        self.number = number
        self.generation = generation
        self.ready = False
        self.pid: int | None = None
        self._exited = exited
        self._clock = clock
        self._started = clock.seconds()
        self._ended: Deferred[None] | None = None
        self._kill: IDelayedCall | None = None
        self._done = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid  # type: ignore[attr-defined]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        # Workers log through their channel; this is what they print before it works, or as they die.
        for line in data.decode("utf-8", "replace").splitlines():
            if line.strip():
                log.warn("worker_output worker={worker} line={line}", worker=self.number, line=line[:2000])

    def signal(self, name: str) -> None:
        """Send the worker a signal (C{HUP}, C{TERM}, C{KILL}); nothing if it has already ended."""
        transport: IProcessTransport | None = self.transport  # type: ignore[assignment]
        if transport is None or self._done:
            return
        try:
            transport.signalProcess(name)
        except ProcessExitedAlready:
            pass

    def stop(self) -> Deferred[None]:
        """SIGTERM, then SIGKILL after L{STOP_GRACE}; fires once the process has ended."""
        self._ended = Deferred()
        if self._done:
            self._ended.callback(None)
            return self._ended
        self.signal("TERM")
        self._kill = self._clock.callLater(STOP_GRACE, self.signal, "KILL")
        return self._ended

    def processEnded(self, reason: Failure) -> None:
        self._done = True
        if self._kill is not None and self._kill.active():
            self._kill.cancel()
        if self._ended is not None:
            if not reason.check(ProcessDone):
                log.info("worker_stopped worker={worker} pid={pid} reason={reason}",
                         worker=self.number, pid=self.pid, reason=reason.getErrorMessage())
            self._ended.callback(None)
            return
        self._exited(self, reason, self._clock.seconds() - self._started)
