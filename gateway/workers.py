"""
The supervisor's worker processes: started, watched, restarted, signalled and stopped.

Like nginx's master process, the supervisor binds every mail listener (before twistd drops
privileges) and never accepts on them; each worker inherits the sockets and accepts on all of
them, so the kernel spreads the clients over the workers and over the CPUs. Each worker has a
channel back (L{gateway.worker_channel}) for the shared limits and penalties and its log.

While no worker is ready the kernel still completes connections into the listeners' backlog and
nobody greets them; when that lasts L{UNSERVED_LIMIT} the supervisor gives up and exits with
L{EXIT_UNSERVED}, so that the service manager restarts it and shows the failure.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
from collections.abc import Callable, Sequence
from functools import partial

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ReactorNotRunning
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorCore, IReactorProcess, IReactorTime
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import ILogObserver, Logger, globalLogPublisher
from twisted.python.failure import Failure

from gateway.config import Settings
from gateway.gatekeeper import LocalGatekeeper
from gateway.listener import Listener
from gateway.shutdown import STOP_MARGIN
from gateway.worker_channel import SupervisorChannel

log = Logger()

CONTROL_FD = 3
"""
The worker's descriptor of its channel. The listening sockets follow it, in order, then the
supervisor's standard output, where a worker whose supervisor has gone logs what it still does.
"""

RESTART_DELAYS = (1.0, 2.0, 5.0, 15.0, 30.0)
"""
Seconds before restarting a worker that exited: the shortest after one that served (as nginx
respawns one at once: its clients wait in the backlog meanwhile), growing while it keeps failing
before it serves (a users file it cannot read, a crash at its first clients), when restarting
sooner would only fail again.
"""

SERVED_AFTER = 10.0
"""Seconds a worker must have been ready to count as having served: one that dies sooner failed."""

# A bound in time rather than in failed starts: it means the same however long a worker takes to
# fail (an import, a users file to check, a fork refused) and however many workers there are. By
# RESTART_DELAYS, 60 s is about six failed starts in a row of every worker, the last after the
# longest delay: long enough for a passing cause (fork refused under load, a certificate or users
# file caught while being replaced) to have passed, and short enough that clients stuck in the
# backlog are let go within about a minute rather than never.
UNSERVED_LIMIT = 60.0
"""Seconds the gateway may go without any ready worker before the supervisor exits with L{EXIT_UNSERVED}."""

EXIT_UNSERVED = os.EX_UNAVAILABLE
"""The supervisor's exit status when no worker could serve: 69, which systemd shows as C{status=69/UNAVAILABLE}."""


def stop_within(settings: Settings) -> float:
    """Seconds a worker has to stop after SIGTERM before it is killed: time to end its connections."""
    return settings.limits.stop_grace + STOP_MARGIN


class WorkerPool(Service):
    """
    Runs C{count} workers serving the mail listeners held by C{listeners}.

    :param reactor: spawns the processes and adopts their channels.
    :param settings: the configuration the supervisor started with; workers start from its
        text, or from that of the latest L{reload}, never from an unchecked file.
    :param gatekeeper: the shared limits and penalties the workers consult.
    :param listeners: the supervisor's non-accepting listeners, in L{gateway.config.mail_endpoints} order.
    :param publisher: where the workers' log events go.
    :ivar stop_within: seconds a worker has after SIGTERM before it is killed: the longest grace
        (and margin) since the start, since a worker may not have applied a shorter one yet.
    """

    def __init__(self, reactor: IReactorProcess, settings: Settings, gatekeeper: LocalGatekeeper,
                 listeners: Sequence[Listener], publisher: ILogObserver = globalLogPublisher,
                 serving: Callable[[], object] = lambda: None) -> None:
        """:param serving: called once, when a worker first serves (systemd's C{READY=1})."""
        self._reactor = reactor
        self._serving: Callable[[], object] | None = serving
        self._config_path = settings.path
        self._text = settings.text
        self._generation = 0  # of the text; a worker that started from an older one is told to reload
        self._count = settings.workers
        self.stop_within = stop_within(settings)
        self._gatekeeper = gatekeeper
        self._listeners = listeners
        self._publisher = publisher
        self._workers: dict[int, _Worker] = {}
        self._restarts: dict[int, IDelayedCall] = {}
        self._failures: dict[int, int] = {}
        self._unserved: IDelayedCall | None = None  # armed while no worker is ready
        self._last_failure = "none"

    def startService(self) -> None:
        super().startService()
        self._watch_unserved()
        for number in range(self._count):
            self._spawn(number)

    def stopService(self) -> Deferred[object]:
        super().stopService()
        if self._unserved is not None:
            self._unserved.cancel()
            self._unserved = None
        for pending in self._restarts.values():
            pending.cancel()
        self._restarts.clear()
        stopping = [worker.stop(self.stop_within) for worker in self._workers.values()]
        return DeferredList(stopping)  # type: ignore[return-value]

    def reload(self, settings: Settings) -> None:
        """
        Have every worker apply C{settings}, which the supervisor has checked and adopted: each is
        sent SIGHUP and asks its channel for this text (a worker never reads the file itself).
        Workers started from now on start from it too.
        """
        self._text = settings.text
        # The longest yet: a worker that has not applied a shorter grace still waits the longer one.
        self.stop_within = max(self.stop_within, stop_within(settings))
        self._generation += 1
        for worker in self._workers.values():
            self._update(worker)

    def _update(self, worker: _Worker) -> None:
        # Before it is ready a worker ignores SIGHUP (the reload would be lost); it is told once ready.
        if worker.ready and worker.generation != self._generation:
            worker.generation = self._generation
            worker.signal("HUP")

    def _ready(self, worker: _Worker) -> None:
        worker.ready = True
        worker.ready_at = self._reactor.seconds()  # type: ignore[attr-defined]
        serving, self._serving = self._serving, None
        if serving is not None:
            serving()
        self._update(worker)
        if self._unserved is not None and self._workers.get(worker.number) is worker:
            self._unserved.cancel()
            self._unserved = None

    def _watch_unserved(self) -> None:
        """Give up in L{UNSERVED_LIMIT} seconds unless a worker is ready by then (or one is now)."""
        if self._unserved is None and not any(worker.ready for worker in self._workers.values()):
            clock: IReactorTime = self._reactor  # type: ignore[assignment]
            self._unserved = clock.callLater(UNSERVED_LIMIT, self._unserved_too_long)

    def _unserved_too_long(self) -> None:
        self._unserved = None
        log.critical("no_ready_worker seconds={seconds:g} workers={workers} last_failure={last_failure}: "
                     "exiting with status {status} for the service manager to restart the gateway",
                     seconds=UNSERVED_LIMIT, workers=self._count, last_failure=self._last_failure,
                     status=EXIT_UNSERVED)
        exit_after_stop(self._reactor, EXIT_UNSERVED)  # type: ignore[arg-type]

    def pids(self) -> dict[int, int]:
        """The running workers' process ids, by worker number."""
        return {number: worker.pid for number, worker in self._workers.items() if worker.pid is not None}

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
            descriptors[CONTROL_FD + 1 + len(self._listeners)] = _standard_output()
            worker = _Worker(number, self._reactor, self._ended, self._generation)  # type: ignore[arg-type]
            arguments = [sys.executable, "-m", "gateway.worker", "--config", self._config_path,
                         "--number", str(number), "--listeners", str(len(self._listeners))]
            # Only the supervisor talks to systemd (NotifyAccess=main): a worker is not told its socket.
            environment = {name: value for name, value in os.environ.items() if name != "NOTIFY_SOCKET"}
            process = self._reactor.spawnProcess(worker, sys.executable, arguments, env=environment,
                                                 childFDs=descriptors)
            channel = SupervisorChannel(self._gatekeeper, self._publisher, process.pid, lambda: self._text,
                                        partial(self._ready, worker))
            self._reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX,  # type: ignore[attr-defined]
                                                SingleProtocolFactory(channel))
        self._workers[number] = worker
        log.info("worker_started worker={worker} pid={pid}", worker=number, pid=worker.pid)

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        if self._workers.get(worker.number) is not worker:
            return  # its start failed after the spawn, which has already scheduled the restart
        del self._workers[worker.number]
        if not self.running:
            return
        clock: IReactorTime = self._reactor  # type: ignore[assignment]
        if worker.ready_at is not None and clock.seconds() - worker.ready_at >= SERVED_AFTER:
            self._failures[worker.number] = 0
        self._schedule(worker.number, f"pid {worker.pid} exited: {reason.getErrorMessage()}")
        if not worker.ready and worker.last_output is not None:
            self._last_failure = worker.last_output  # what a worker that cannot start prints is why
        self._watch_unserved()

    def _schedule(self, number: int, reason: str) -> None:
        """Start worker C{number} again later: the later the more often it has failed in a row."""
        failures = self._failures.get(number, 0)
        self._failures[number] = failures + 1
        delay = RESTART_DELAYS[min(failures, len(RESTART_DELAYS) - 1)]
        self._last_failure = reason
        log.error("worker_exited worker={worker} reason={reason} restart_in={delay:g}",
                  worker=number, reason=reason, delay=delay)
        clock: IReactorTime = self._reactor  # type: ignore[assignment]
        self._restarts[number] = clock.callLater(delay, self._spawn, number)


def _standard_output() -> int | str:
    """The supervisor's standard output for a worker, or a pipe the supervisor reads where it has none (closed)."""
    try:
        os.fstat(1)
    except OSError:
        return "r"
    return 1


class SingleProtocolFactory(Factory):
    """A factory for the one protocol instance an adopted connection gets."""

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> Protocol:
        return self._protocol


class _Worker(ProcessProtocol):
    """
    One worker process as the supervisor sees it: its output is logged, its end reported.

    :param exited: called with the worker and why it ended, unless it was stopped.
    :param generation: that of the configuration text it starts from.
    :ivar ready: whether it serves (and can take SIGHUP).
    :ivar ready_at: since when, if it does.
    :ivar last_output: the last line it printed, if any.
    """

    def __init__(self, number: int, clock: IReactorTime, exited: Callable[[_Worker, Failure], None],
                 generation: int) -> None:
        self.number = number
        self.generation = generation
        self.ready = False
        self.ready_at: float | None = None
        self.pid: int | None = None
        self.last_output: str | None = None
        self._exited = exited
        self._clock = clock
        self._ended: Deferred[None] | None = None
        self._kill: IDelayedCall | None = None
        self._done = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        # Workers log through their channel; this is what they print before it works, or as they die.
        for line in data.decode("utf-8", "replace").splitlines():
            if line.strip():
                self.last_output = line[:2000]
                log.warn("worker_output worker={worker} line={line}", worker=self.number, line=line[:2000])

    def signal(self, name: str) -> None:
        """Send the worker a signal (C{HUP}, C{TERM}, C{KILL}); nothing if it has already ended."""
        transport: IProcessTransport | None = self.transport
        if transport is None or self._done:
            return
        try:
            transport.signalProcess(name)
        except ProcessExitedAlready:
            pass

    def stop(self, within: float) -> Deferred[None]:
        """SIGTERM, then SIGKILL after C{within} seconds; fires once the process has ended."""
        self._ended = Deferred()
        if self._done:
            self._ended.callback(None)
            return self._ended
        self.signal("TERM")
        self._kill = self._clock.callLater(within, self.signal, "KILL")
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
        self._exited(self, reason)


def exit_after_stop(reactor: IReactorCore, status: int) -> None:
    """
    Stop the reactor, so that the runner stops the services (the pool its workers) as for
    SIGTERM, and have the process exit with C{status} once the runner is done.

    twistd and twist cannot set an exit status (Twisted issue 11335): after a clean stop they
    return 0, or re-raise the signal that stopped them. So the status is set at interpreter exit,
    after the runner has stopped its logging and removed its pid file.
    """
    try:
        reactor.stop()
    except ReactorNotRunning:
        return  # already stopping (a SIGTERM in the same turn of the loop): that stop ends the process
    atexit.register(_exit_now, status)


def _exit_now(status: int) -> None:
    # Exit handlers run newest first, so this runs before those registered earlier (today only the
    # standard logging module's, which the gateway does not log through) and skips them. The log
    # observers flush every line; standard output and error may hold what was printed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
