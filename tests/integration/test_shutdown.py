"""
A real gateway told to stop (SIGTERM, as systemctl stop sends) ends its connections first: a
client whose message the MTA is still judging hears the verdict, then goodbye.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import ssl
import tempfile
import threading
import time

from twisted.trial.unittest import SynchronousTestCase

from gateway.config import Limits
from gateway.shutdown import STOP_MARGIN
from gateway.testing.gateway import GatewayProcess

from .scripted_server import ScriptedServer
from .wire import Wire

USER, PASSWORD = "bob@example.org", "secret"
EHLO_REPLY = b"250-mta.example.org\r\n250-XCLIENT ADDR PORT PROTO LOGIN\r\n250 8BITMIME\r\n"


class SlowMta(ScriptedServer):
    """An MTA that takes any XCLIENT login and holds its verdict on each message until told to give it."""

    def __init__(self) -> None:
        self.message_in = threading.Event()
        self.verdict = threading.Event()
        super().__init__()

    def serve(self, connection: socket.socket) -> None:
        try:
            self.converse(connection)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the gateway dropped the connection while the verdict was held

    def converse(self, connection: socket.socket) -> None:
        with connection, connection.makefile("rwb", buffering=0) as f:
            f.write(b"220 mta.example.org ESMTP\r\n")
            for line in iter(f.readline, b""):
                verb = line.split(b" ", 1)[0].strip().upper()
                if verb == b"EHLO":
                    f.write(EHLO_REPLY)
                elif verb == b"XCLIENT":
                    f.write(b"220 mta.example.org ESMTP\r\n")
                elif verb == b"DATA":
                    f.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    while f.readline() != b".\r\n":
                        pass
                    self.message_in.set()
                    self.verdict.wait(30)
                    f.write(b"250 2.0.0 Ok: queued as 4F00D\r\n")
                elif verb == b"QUIT":
                    f.write(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    f.write(b"250 2.0.0 Ok\r\n")

    def close(self) -> None:
        self.verdict.set()
        super().close()


class StopTests(SynchronousTestCase):
    """One process."""

    workers = 1

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="gw-stop-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.mta = SlowMta()
        self.addCleanup(self.mta.close)
        self.tls = ssl.create_default_context()
        self.tls.check_hostname, self.tls.verify_mode = False, ssl.CERT_NONE

    def start(self, settings: str = "") -> None:
        # No IMAP store: a client that has not logged in needs none.
        self.gateway = GatewayProcess(self.directory, imap_backend_port=9, users={USER: PASSWORD},
                                      submission_backend_port=self.mta.port, submission_backend='login = "xclient"',
                                      workers=self.workers, settings=settings)
        self.gateway.start()
        self.addCleanup(self.gateway.stop)

    def stop_while_mta_judges(self) -> tuple[Wire, Wire]:
        """
        Open an IMAP connection, send a message the MTA holds its verdict on, and stop the gateway
        as systemd does; return the IMAP and submission connections, the IMAP one told BYE.
        """
        imap = Wire(self.gateway.port("imap", "implicit_tls"), tls=self.tls)
        self.assertTrue(imap.line().startswith(b"* OK "))
        smtp = Wire(self.gateway.port("submission", "implicit_tls"), tls=self.tls)
        smtp.line()
        token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
        smtp.send(b"EHLO client.example.org\r\nAUTH PLAIN " + token + b"\r\n")
        self.assertTrue(smtp.until(b"235 ")[-1].startswith(b"235 "))
        for command in (b"MAIL FROM:<bob@example.org>", b"RCPT TO:<alice@example.org>", b"DATA"):
            smtp.send(command + b"\r\n")
            self.assertIn(smtp.line()[:3], (b"250", b"354"))
        smtp.send(b"Subject: stopping\r\n\r\nsent as the gateway stops\r\n.\r\n")
        self.assertTrue(self.mta.message_in.wait(10))
        # As systemd stops the unit: SIGTERM to every process (a worker hears it from the supervisor too).
        for pid in [self.gateway.pid, *self.gateway.worker_pids().values()]:
            os.kill(pid, signal.SIGTERM)
        self.assertEqual(imap.line(), b"* BYE Server shutting down.\r\n")
        return imap, smtp

    def test_stop_ends_connections(self) -> None:
        """
        On SIGTERM an IMAP client not logged in gets Dovecot's BYE at once; a submission client
        whose message the MTA is judging gets the MTA's 250, then a 421, and only then does the
        gateway exit, with every connection's last lines logged.
        """
        self.start()
        imap, smtp = self.stop_while_mta_judges()
        self.assertEqual(imap.line(), b"")
        imap.close()
        time.sleep(0.5)
        self.assertTrue(self.gateway.running, "the gateway did not wait for the MTA's verdict")
        self.mta.verdict.set()
        self.assertEqual(smtp.line(), b"250 2.0.0 Ok: queued as 4F00D\r\n")
        self.assertEqual(smtp.line(), b"421 4.3.2 localhost Service shutting down, closing connection\r\n")
        self.assertEqual(smtp.line(), b"")
        smtp.close()
        deadline = time.monotonic() + Limits().stop_grace
        while self.gateway.running and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertFalse(self.gateway.running, "the gateway did not exit once its connections had ended")
        log = self.gateway.log()
        self.assertRegex(log, r"message protocol=submission client=127\.0\.0\.1 user=\"bob@example\.org\" "
                              r"size=\d+ recipients=1 reply=250 session=")
        self.assertEqual(log.count("disconnect protocol="), 2, log[-3000:])
        self.assertRegex(log, r"draining connections=\d grace=")
        self.assertRegex(log, r"drained left=0 seconds=")
        self.assertNotRegex(log, r"drained left=[1-9]")
        self.assertNotIn("Traceback", log)

    def test_grace_configured(self) -> None:
        """
        [limits] stop_grace bounds the wait: a verdict slower than it is cut off, the gateway then
        exits, and systemd is told at once how long it may all take.
        """
        notifications = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(notifications.close)
        notifications.bind(os.path.join(self.directory, "notify"))
        notifications.settimeout(30)
        os.environ["NOTIFY_SOCKET"] = os.path.join(self.directory, "notify")  # the gateway inherits it
        self.addCleanup(os.environ.pop, "NOTIFY_SOCKET", None)
        self.start("[limits]\nstop_grace = 2\n")
        self.assertEqual(notifications.recv(4096), b"READY=1")
        imap, smtp = self.stop_while_mta_judges()
        stopped = time.monotonic()
        self.assertEqual(imap.line(), b"")
        imap.close()
        # One process is gone a margin after its grace; a supervisor, a margin after it kills its last worker.
        margins = 1 if self.workers == 1 else 2
        self.assertEqual(notifications.recv(4096),
                         b"STOPPING=1\nEXTEND_TIMEOUT_USEC=%d" % ((2 + margins * STOP_MARGIN) * 1e6))
        self.assertEqual(smtp.line(), b"", "the client was told something")
        took = time.monotonic() - stopped
        self.assertGreater(took, 1.5, "the stop did not wait for the verdict")
        while self.gateway.running and time.monotonic() - stopped < 2 + 2 * STOP_MARGIN + 5:
            time.sleep(0.05)
        self.assertFalse(self.gateway.running, "the gateway did not exit after its grace")
        log = self.gateway.log()
        self.assertRegex(log, r"draining connections=\d grace=2\n")
        self.assertRegex(log, r"drained left=1 seconds=2\.")
        self.assertRegex(log, r"disconnect protocol=submission .*session=")
        self.assertNotIn("Traceback", log)


class WorkersStopTests(StopTests):
    """Two workers: each ends its own connections before the supervisor's stop ends."""

    workers = 2
