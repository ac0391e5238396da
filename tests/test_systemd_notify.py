"""gateway.systemd_notify: READY=1 to systemd's notification socket, over a real datagram socket."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

from twisted.logger import globalLogPublisher
from twisted.internet.testing import EventLoggingObserver
from twisted.trial.unittest import SynchronousTestCase

from gateway.systemd_notify import ReadyNotice, StopNotice, notify, notify_status


class NotifyTests(SynchronousTestCase):
    """What systemd would receive."""

    def listening(self, abstract: bool = False) -> tuple[socket.socket, str]:
        """A datagram socket as systemd binds it; its C{NOTIFY_SOCKET} value."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.settimeout(5)
        if abstract:
            name = f"mailgateway-test-{os.getpid()}-{id(self)}"
            sock.bind("\0" + name)
            return sock, "@" + name
        directory = tempfile.mkdtemp(prefix="gw-notify-")
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "notify")
        sock.bind(path)
        return sock, path

    def test_path_and_abstract(self) -> None:
        """The state goes to a socket named by path, or in the abstract namespace ("@name")."""
        for abstract in (False, True):
            sock, address = self.listening(abstract)
            self.assertTrue(notify(b"READY=1", {"NOTIFY_SOCKET": address}))
            self.assertEqual(sock.recv(4096), b"READY=1")

    def test_not_under_systemd(self) -> None:
        """Without NOTIFY_SOCKET nothing is sent."""
        self.assertFalse(notify(b"READY=1", {}))
        self.assertFalse(notify(b"READY=1", {"NOTIFY_SOCKET": ""}))

    def test_failure_logged(self) -> None:
        """A socket that is not there is a warning, never an exception: the gateway serves all the same."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.assertFalse(notify(b"READY=1", {"NOTIFY_SOCKET": "/nonexistent/notify"}))
        [event] = logged
        self.assertTrue(event["log_format"].startswith("notify_failed "))

    def test_ready_notice(self) -> None:
        """ReadyNotice says READY=1 when started, not before."""
        sock, address = self.listening()
        sock.settimeout(0)
        self.patch(os, "environ", {**os.environ, "NOTIFY_SOCKET": address})
        notice = ReadyNotice()
        self.assertRaises(BlockingIOError, sock.recv, 4096)
        notice.startService()
        self.assertEqual(sock.recv(4096), b"READY=1")

    def test_stop_notice(self) -> None:
        """StopNotice says STOPPING=1 when stopped, with the seconds it is told then, in microseconds."""
        sock, address = self.listening()
        sock.settimeout(0)
        self.patch(os, "environ", {**os.environ, "NOTIFY_SOCKET": address})
        seconds = [12.0]
        notice = StopNotice(lambda: seconds[0])
        notice.startService()
        seconds[0] = 34.5
        self.assertRaises(BlockingIOError, sock.recv, 4096)
        notice.stopService()
        self.assertEqual(sock.recv(4096), b"STOPPING=1\nEXTEND_TIMEOUT_USEC=34500000")

    def test_status_one_line_and_short(self) -> None:
        """A status is one line, and cut to 1,000 bytes (systemd drops a message over its limit whole)."""
        sock, address = self.listening()
        self.assertTrue(notify_status("Reload failed:\nline two", {"NOTIFY_SOCKET": address}))
        self.assertEqual(sock.recv(4096), b"STATUS=Reload failed: line two")
        notify_status("x" * 5000, {"NOTIFY_SOCKET": address})
        self.assertEqual(sock.recv(8192), b"STATUS=" + b"x" * 997 + b"...")
