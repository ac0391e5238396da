"""
Memory stays bounded when a client stops reading: a real gateway process between a client that
reads nothing and a backend that tries to send it 200 MB.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import tempfile
import threading
import time

from twisted.trial.unittest import SynchronousTestCase

from gateway.testing.gateway import GatewayProcess

from .wire import Wire

FLOOD = 200 * 1024 * 1024


def resident_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


class FloodingBackend:
    """An IMAP backend that accepts any LOGIN, then answers the next command with 200 MB (after the gateway's probe)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sent = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            connection, _ = self.listener.accept()
            connection.settimeout(0.5)
            connection.sendall(b"* OK [CAPABILITY IMAP4rev1] flood ready\r\n")
            reader = connection.makefile("rb")
            login = reader.readline()
            if b" LOGOUT" not in login.upper():
                break
            connection.close()  # the gateway's probe at start: the client's login comes next
        connection.sendall(login.split(b" ")[0] + b" OK [CAPABILITY IMAP4rev1] Logged in\r\n")
        reader.readline()  # the client's command
        chunk = b"x" * 65536
        while self.sent < FLOOD and not self.stop.is_set():
            try:
                self.sent += connection.send(chunk)
            except TimeoutError:
                continue  # blocked: the gateway stopped reading from us
            except OSError:
                break
        connection.close()

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        self.thread.join(10)


class NonReadingClientTests(SynchronousTestCase):
    """Backpressure from a client that stops reading reaches the backend."""

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="gw-flood-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.backend = FloodingBackend()
        self.addCleanup(self.backend.close)
        self.gateway = GatewayProcess(self.directory, imap_backend_port=self.backend.port, users={"alice": "secret"})
        self.gateway.start()
        self.addCleanup(self.gateway.stop)

    def test_memory_bounded(self) -> None:
        """The gateway's resident memory grows by a few MB at most while the backend has 200 MB for a stalled client."""
        tls = ssl.create_default_context()
        tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
        client = Wire(self.gateway.port("imap", "implicit_tls"), tls=tls)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        client.line()
        client.send(b"a LOGIN alice secret\r\n")
        self.assertTrue(client.line().startswith(b"a OK"))
        assert self.gateway.pid is not None
        baseline = resident_kib(self.gateway.pid)
        client.send(b"b FETCH 1 BODY[]\r\n")  # and never read again
        previous, stalled_since = -1, time.monotonic()
        while time.monotonic() - stalled_since < 2.0:
            time.sleep(0.2)
            if self.backend.sent != previous:
                previous, stalled_since = self.backend.sent, time.monotonic()
        growth = resident_kib(self.gateway.pid) - baseline
        self.assertLess(self.backend.sent, 32 * 1024 * 1024, "the backend was not slowed down")
        self.assertLess(growth, 8 * 1024, f"resident memory grew by {growth} KiB")
        client.close()
