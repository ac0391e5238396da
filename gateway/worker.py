"""
A worker process: C{python -m gateway.worker}, started by the supervisor (L{gateway.workers}).

It inherits its channel to the supervisor and the listening sockets as descriptors, runs with
the configuration text the supervisor checked (at start and at each reload, never the file as
it is now), and serves the mail listeners. It logs through the channel and stops when the
channel closes, so no worker outlives its supervisor; what it logs while it stops then goes to
the supervisor's standard output (systemd's journal), in the same text format.
"""

from __future__ import annotations

import argparse
import base64
import signal
import socket
import sys
from collections.abc import Callable
from functools import partial
from typing import cast

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorCore
from twisted.logger import ILogObserver, LogEvent, Logger, globalLogBeginner
from twisted.python.failure import Failure

from gateway.config import ConfigError, Settings, load_settings
from gateway.event_loop import streamline
from gateway.service import build_worker_service
from gateway.shutdown import sigterm_once
from gateway.text_log import text_file_observer
from gateway.worker_channel import RemoteGatekeeper, WorkerChannel
from gateway.workers import CONTROL_FD, SingleProtocolFactory

log = Logger(namespace="gateway.worker")  # run as "python -m gateway.worker", whose __name__ is __main__


def main(argv: list[str] | None = None) -> int:
    """Run one worker until the supervisor ends it; the exit status is 0 after a clean stop."""
    # SIGHUP's default action ends the process. The supervisor sends it only once a worker is ready
    # (and again then if it reloaded meanwhile), but "systemctl kill -s HUP" reaches every process
    # of the unit: ignored until the Reloader's handler takes it (Reloader.startService).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Ctrl-C on a terminal is for the supervisor, which stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parser = argparse.ArgumentParser(prog="python -m gateway.worker", description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--number", type=int, required=True)
    parser.add_argument("--listeners", type=int, required=True)
    options = parser.parse_args(argv)
    from twisted.internet import reactor

    streamline(reactor)

    def lost() -> None:
        if reactor.running:
            reactor.stop()

    channel = WorkerChannel(lost=lost, orphaned=orphaned_log(CONTROL_FD + 1 + options.listeners))
    with socket.socket(fileno=CONTROL_FD) as control:  # the reactor keeps its own copy
        reactor.adoptStreamConnection(control.fileno(), socket.AF_UNIX, SingleProtocolFactory(channel))  # type: ignore[attr-defined]
    globalLogBeginner.beginLoggingTo([cast(ILogObserver, channel.emit)], redirectStandardIO=False)
    status: list[int] = [0]
    configuration = partial(supervisor_configuration, channel, options.config)
    hello: Deferred[str] = channel.call("hello")
    hello.addCallback(_start, configuration, options, reactor, channel)
    hello.addErrback(_failed, reactor, status)
    reactor.callWhenRunning(sigterm_once, reactor)
    reactor.run()
    return status[0]


def orphaned_log(descriptor: int) -> Callable[[LogEvent], object]:
    """Where the worker logs once its supervisor has gone: text lines to C{descriptor}, if it has one."""
    try:
        # Line-buffered: each line is out before the next event, however the stop ends.
        return text_file_observer(open(descriptor, "w", buffering=1, encoding="utf-8", errors="replace"))
    except OSError:  # started by a supervisor of an earlier release, which passes none
        return lambda event: None


def supervisor_configuration(channel: WorkerChannel, path: str) -> Deferred[Settings]:
    """
    The configuration the supervisor checked and runs with now, from its text: not the file at
    C{path} as it is now, which may hold an edit the supervisor has not checked yet, or refused.

    :returns: a Deferred that fails with L{ConfigError} when this process cannot use it, or with
        C{ConnectionError} when the supervisor has gone.
    """
    asking: Deferred[str] = channel.call("configuration")
    return asking.addCallback(partial(load_settings, path))


def _start(key: str, configuration: Callable[[], Deferred[Settings]], options: argparse.Namespace,
           reactor: IReactorCore, channel: WorkerChannel) -> Deferred[None]:
    return configuration().addCallback(_serve, key, configuration, options, reactor, channel)


def _serve(settings: Settings, key: str, configuration: Callable[[], Deferred[Settings]],
           options: argparse.Namespace, reactor: IReactorCore, channel: WorkerChannel) -> None:
    first = CONTROL_FD + 1
    service = build_worker_service(settings, reactor, RemoteGatekeeper(channel, base64.b64decode(key)),
                                   list(range(first, first + options.listeners)), configuration, options.number)
    service.privilegedStartService()
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", _stop, service, channel)
    channel.tell("ready")  # the Reloader has its SIGHUP handler now
    log.info("worker_ready worker={worker} listeners={listeners}", worker=options.number, listeners=options.listeners)


def _stop(service: MultiService, channel: WorkerChannel) -> Deferred[None]:
    """Stop serving (the connections end first: gateway.shutdown), then close the channel once its last lines are sent."""
    return maybeDeferred(service.stopService).addBoth(lambda _: channel.close())


def _failed(failure: Failure, reactor: IReactorCore, status: list[int]) -> None:
    # A ConfigError: a file the configuration names (users, certificate) cannot be used by this process.
    message = failure.getErrorMessage() if failure.check(ConfigError, SystemExit) else failure.getTraceback()
    print(f"mailgateway worker: cannot start: {message}", file=sys.stderr, flush=True)
    status[0] = 1
    reactor.stop()


if __name__ == "__main__":
    sys.exit(main())
