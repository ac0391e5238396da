"""Facts about this host that the server sandboxes need: accounts, free ports, reachable paths."""

from __future__ import annotations

import grp
import os
import pwd
import random
import socket
import stat
import subprocess
import time
from types import TracebackType
from typing import Self


def end_process(process: subprocess.Popen[bytes] | None) -> None:
    """Stop a child process that may have ended already: SIGTERM, then SIGKILL after 10 s; wait for it."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def uid(account: str, package: str) -> int:
    """The uid of a system account that the Debian C{package} creates."""
    try:
        return pwd.getpwnam(account).pw_uid
    except KeyError:
        raise _missing(account, package) from None


def gid(group: str, package: str) -> int:
    """The gid of a system group that the Debian C{package} creates."""
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise _missing(group, package) from None


def _missing(name: str, package: str) -> RuntimeError:
    return RuntimeError(f"system account {name!r} is missing; Debian's {package} package creates it")


_EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
_LOWEST_PORT = 10000


def free_ports(host: str, count: int, rng: random.Random | None = None) -> list[int]:
    """
    C{count} distinct ports that were free on C{host} a moment ago, chosen at random below the
    kernel's ephemeral range: a port from C{bind(0)} can be taken at once by the local end of
    any outgoing connection (CI saw Postfix fail with "Address already in use" that way).
    """
    rng = rng or random.SystemRandom()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    ports: list[int] = []
    while len(ports) < count:
        port = rng.randrange(_LOWEST_PORT, _ephemeral_low())
        if port not in ports and _bindable(family, host, port):
            ports.append(port)
    return ports


def _ephemeral_low() -> int:
    try:
        with open(_EPHEMERAL_RANGE) as f:
            return max(int(f.read().split()[0]), _LOWEST_PORT + 1000)
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(family: int, host: str, port: int) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def accepts(host: str, port: int) -> bool:
    """Whether a TCP connection to C{host}:C{port} succeeds."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


def greets(host: str, port: int, prefix: bytes) -> bool:
    """Whether the server on C{host}:C{port} sends a greeting starting with C{prefix}."""
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            return s.recv(64).startswith(prefix)
    except OSError:
        return False


def check_searchable(path: str, who: str) -> None:
    """
    Raise RuntimeError unless C{path} and all its ancestors are searchable by other users:
    C{who} (a server's unprivileged processes) must reach it.
    """
    while True:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            raise RuntimeError(f"{path} is not searchable by other users (chmod o+x it): {who} run as "
                               "unprivileged accounts and must reach the sandbox")
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


class ServerSandbox:
    """
    A private server that tests start and stop; also a context manager that does both.

    Subclasses set C{_name}, C{_host} and C{_process} (the server's master as our child), and
    implement C{log_path} and C{_log_tail}.
    """

    _name: str
    _host: str
    _process: subprocess.Popen[bytes] | None

    @property
    def log_path(self) -> str:
        raise NotImplementedError

    def _log_tail(self) -> str:
        raise NotImplementedError

    def _await_greetings(self, greetings: dict[int, bytes], timeout: float, interval: float) -> None:
        """
        Wait until every port in C{greetings} greets with its prefix: a greeting, not just an
        accepted connection, shows the server is fully up. Raises RuntimeError with the end of
        the log if the server exits or is not up in time (after stopping it).
        """
        deadline = time.monotonic() + timeout
        while True:
            assert self._process is not None
            status = self._process.poll()
            if status is not None:
                self._process = None
                raise RuntimeError(f"{self._name} exited with status {status} while starting; "
                                   f"end of {self.log_path}:\n{self._log_tail()}")
            if all(greets(self._host, port, prefix) for port, prefix in greetings.items()):
                return
            if time.monotonic() >= deadline:
                self.stop()
                ports = " and ".join(str(port) for port in greetings)
                raise RuntimeError(f"{self._name} did not greet on {self._host} port(s) {ports} within "
                                   f"{timeout:g} s; end of {self.log_path}:\n{self._log_tail()}")
            time.sleep(interval)

    def start(self) -> None:
        """Start the server and wait until it serves."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop exactly the server this sandbox started."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()
