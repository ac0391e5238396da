"""
Telling systemd that the gateway serves (C{Type=notify}): one datagram C{READY=1} to the socket
in C{$NOTIFY_SOCKET}, as sd_notify(3) sends it, once every listener listens (with workers, once
one of them serves). C{systemctl start} then returns when the gateway answers, and fails when it
exits first (a configuration error: status 78). After each reload it also sets the status line
C{systemctl status} shows (C{STATUS=}), since C{systemctl reload} returns once the signal is
sent and cannot tell a reload that was refused. As it stops it says so, and how long it may take
(L{StopNotice}). Run otherwise, there is no such socket and nothing is sent.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping

from twisted.application.service import Service
from twisted.logger import Logger

__all__ = ["ReadyNotice", "StopNotice", "notify", "notify_status"]

log = Logger()


def notify(state: bytes, environ: Mapping[str, str] | None = None) -> bool:
    """
    Send C{state} (such as C{b"READY=1"}) to systemd, if it asked for word.

    :param environ: where to find C{NOTIFY_SOCKET}; the process's environment if None.
    :returns: whether it was sent; a failure is logged, never raised (the gateway serves all the same).
    """
    path = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path  # "@": the abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state)
    except OSError as e:
        log.warn("notify_failed socket={socket} problem={problem}", socket=path, problem=e.strerror or str(e))
        return False
    return True


def notify_status(text: str, environ: Mapping[str, str] | None = None) -> bool:
    """Set the one-line status C{systemctl status} shows (cut to 1,000 bytes: systemd drops a long message whole); see L{notify}."""
    line = " ".join(text.splitlines()).encode("utf-8", "replace")
    return notify(b"STATUS=" + (line if len(line) <= 1000 else line[:997] + b"..."), environ)


class ReadyNotice(Service):
    """
    Says C{READY=1} when started: the service added last to a process that serves by itself,
    whose listeners were bound before (L{gateway.listener.Listener.privilegedStartService}).
    """

    def startService(self) -> None:
        super().startService()
        notify(b"READY=1")


class StopNotice(Service):
    """
    Says C{STOPPING=1} when stopped, with how long the stop may take (C{EXTEND_TIMEOUT_USEC}):
    systemd kills what is left of the unit after its C{TimeoutStopSec} (90 s by default), which
    would cut short a longer C{[limits] stop_grace}. It extends that timeout, never shortens it.

    :param seconds: how long the stop may take, asked as it begins (a reload may have changed it).
    """

    def __init__(self, seconds: Callable[[], float]) -> None:
        self._seconds = seconds

    def stopService(self) -> None:
        super().stopService()
        notify(b"STOPPING=1\nEXTEND_TIMEOUT_USEC=%d" % round(self._seconds() * 1_000_000))
