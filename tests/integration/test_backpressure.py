"""
Memory stays bounded when a client stops reading: a real gateway process between a client that
reads nothing and a backend that tries to send it 200 MB.
"""

from __future__ import annotations

import select
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable

from twisted.trial.unittest import SynchronousTestCase

from gateway.testing.gateway import GatewayProcess

from .scripted_server import ScriptedServer
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


class GatewayBeforeBackend(SynchronousTestCase):
    """A real gateway process in front of the test's own IMAP backend (of C{backend_class}), with the user alice."""

    backend_class: Callable[[], FloodingBackend | ClosingBackend]

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="gw-backpressure-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.backend = type(self).backend_class()
        self.addCleanup(self.backend.close)
        self.gateway = GatewayProcess(self.directory, imap_backend_port=self.backend.port, users={"alice": "secret"})
        self.gateway.start()
        self.addCleanup(self.gateway.stop)


class NonReadingClientTests(GatewayBeforeBackend):
    """Backpressure from a client that stops reading reaches the backend."""

    backend_class = FloodingBackend
    backend: FloodingBackend

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


FINAL_ANSWER = b"* 1 FETCH (BODY[] {200000}\r\n" + b"y" * 200000 + b")\r\n* BYE Server shutting down.\r\n"


class ClosingBackend(ScriptedServer):
    """
    An IMAP backend that accepts any LOGIN; at the next command it sends L{FINAL_ANSWER}, ends its
    sending side and goes on reading (Dovecot's BYE as it shuts down, an upload under way).
    """

    def serve(self, connection: socket.socket) -> None:
        with connection:
            connection.sendall(b"* OK [CAPABILITY IMAP4rev1] ready\r\n")
            reader = connection.makefile("rb")
            while line := reader.readline():
                tag, _, command = line.partition(b" ")
                if command.upper().startswith(b"LOGOUT"):  # the gateway's probe at start
                    connection.sendall(b"* BYE\r\n" + tag + b" OK\r\n")
                    return
                if command.upper().startswith(b"LOGIN"):
                    connection.sendall(tag + b" OK [CAPABILITY IMAP4rev1] Logged in\r\n")
                    continue
                connection.sendall(FINAL_ANSWER)
                connection.shutdown(socket.SHUT_WR)
                while connection.recv(65536):
                    pass
                return


class BackendClosesTests(GatewayBeforeBackend):
    """A backend that answers and closes while its client is still sending: the answer arrives whole."""

    backend_class = ClosingBackend

    def test_last_answer_whole(self) -> None:
        """
        On either listener, a client uploading with a small receive buffer gets the backend's last
        answer to its end (over implicit TLS the client's socket was once closed under TLS, and the
        client got a reset in place of most of it).
        """
        for kind in ("implicit_tls", "starttls"):
            received = self.upload_while_answered(kind)
            self.assertTrue(received.endswith(FINAL_ANSWER),
                            f"{kind}: {len(received)} bytes received, the answer has {len(FINAL_ANSWER)}")

    def upload_while_answered(self, kind: str) -> bytes:
        """Log in, start an endless APPEND and keep sending it; what the client reads until the answer or the end."""
        raw = socket.socket()
        self.addCleanup(raw.close)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.connect(("127.0.0.1", self.gateway.port("imap", kind)))
        raw.settimeout(10)
        if kind == "starttls":
            clear = raw.makefile("rb")
            clear.readline()
            raw.sendall(b"s STARTTLS\r\n")
            while not clear.readline().startswith(b"s OK"):
                pass
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing)
        received = b""

        def exchange(until: bytes) -> None:
            """Complete the handshake, send what waits, and read until C{until} has come."""
            nonlocal received
            while True:
                try:
                    tls.do_handshake()
                    while until not in received:
                        received += tls.read(65536)
                    return
                except ssl.SSLWantReadError:
                    raw.sendall(outgoing.read())
                    incoming.write(raw.recv(65536))

        exchange(b"\r\n" if kind == "implicit_tls" else b"")
        tls.write(b"a LOGIN alice secret\r\n")
        exchange(b"a OK")
        received = b""
        tls.write(b"b APPEND INBOX {100000000+}\r\n")
        raw.setblocking(False)
        pending = outgoing.read()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not received.endswith(FINAL_ANSWER):
            if not pending:
                tls.write(b"z" * 16384)
                pending = outgoing.read()
            readable, writable, _ = select.select([raw], [raw], [], 0.05)
            if writable:
                try:
                    pending = pending[raw.send(pending):]
                except BlockingIOError:
                    pass
                except OSError:
                    pending = b""  # the gateway has stopped reading: only what comes back counts
            if readable:
                try:
                    data = raw.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    break  # reset
                if not data:
                    break
                incoming.write(data)
                try:
                    while chunk := tls.read(65536):
                        received += chunk
                except ssl.SSLWantReadError:
                    pass
                except (ssl.SSLZeroReturnError, ssl.SSLError):
                    break
        return received
