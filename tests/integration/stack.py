"""
What every end-to-end test class sets up: a directory the servers' unprivileged processes can
reach, a throwaway CA with a certificate for the gateway, and servers started in order and
stopped in reverse order, even when a later one fails to start.
"""

from __future__ import annotations

import os
import shutil
import ssl
import tempfile
from typing import Protocol, TypeVar

from gateway.testing.pki import IssuedCertificate, TestCA


class Server(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


S = TypeVar("S", bound=Server)


class Stack:
    """A test class's servers and files; L{stop} undoes everything."""

    def __init__(self, prefix: str) -> None:
        self.directory = tempfile.mkdtemp(prefix=prefix)
        os.chmod(self.directory, 0o755)
        self.ca = TestCA(self.path("ca"))
        self.certificate: IssuedCertificate = self.ca.issue()
        self._started: list[Server] = []

    def path(self, name: str) -> str:
        """A path inside the stack's directory."""
        return os.path.join(self.directory, name)

    def start(self, server: S) -> S:
        """Start C{server}; if it fails, stop everything started before and clean up."""
        try:
            server.start()
        except BaseException:
            self.stop()
            raise
        self._started.append(server)
        return server

    def stop(self) -> None:
        """Stop every started server, newest first, and remove the directory."""
        while self._started:
            self._started.pop().stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def tls(self) -> ssl.SSLContext:
        """A client context that trusts only the test CA."""
        return ssl.create_default_context(cafile=self.ca.ca_path)


def require_tool(name: str, package: str) -> str:
    """The path of the program C{name}; fails the test naming the Debian package when it is missing."""
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"{name} is not installed: apt-get install {package}")
    return path
