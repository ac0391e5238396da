"""
The gateway with two worker processes, end to end: a private Dovecot, the gateway as a real
process tree, and imaplib and raw sockets as clients. Connection limits and login penalties
hold across the workers, a dead worker is replaced and gives back what it held, a reload
reaches every worker, and no worker outlives its supervisor.
"""

from __future__ import annotations

import imaplib
import os
import re
import signal
import socket
import ssl
import time

from twisted.trial.unittest import SynchronousTestCase

from gateway.testing.dovecot import DovecotSandbox
from gateway.testing.gateway import GatewayProcess

from .stack import Stack

USERS = {"alice": "alice-password", "bob": "bob-password"}
PER_ADDRESS = 3


def worker_pids(gateway: GatewayProcess) -> dict[int, int]:
    """Worker number -> pid of the latest start of each worker, from the supervisor's log."""
    return {int(n): int(pid) for n, pid in re.findall(r"worker_started worker=(\d+) pid=(\d+)", gateway.log())}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(condition: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def listening_inode(port: int) -> str:
    """The socket inode of the listener on 127.0.0.1:C{port}."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":
                return fields[9]
    raise AssertionError(f"nothing listens on port {port}")


def holds(pid: int, inode: str) -> bool:
    fd_dir = f"/proc/{pid}/fd"
    return any(os.readlink(os.path.join(fd_dir, fd)) == f"socket:[{inode}]" for fd in os.listdir(fd_dir))


class WorkersTests(SynchronousTestCase):
    """One Dovecot and one two-worker gateway for the class."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.stack = stack = Stack("gw-workers-")
        cls.dovecot = stack.start(DovecotSandbox(stack.path("dovecot"), USERS))
        cls.gateway = stack.start(cls.make_gateway("gateway"))

    @classmethod
    def make_gateway(cls, name: str) -> GatewayProcess:
        return GatewayProcess(
            cls.stack.path(name), imap_backend_port=cls.dovecot.imap_port, users=USERS, workers=2,
            certificate=cls.stack.certificate.chain_path, private_key=cls.stack.certificate.key_path,
            settings=f"[limits]\nmax_connections_per_ip = {PER_ADDRESS}\n", auth="ip_failure_budget = 4",
        )

    @classmethod
    def tearDownClass(cls) -> None:
        cls.stack.stop()

    def connect(self, source: str) -> ssl.SSLSocket:
        """An IMAPS connection from the loopback address C{source}; its first line is left unread."""
        raw = socket.create_connection(("127.0.0.1", self.gateway.port("imap", "implicit_tls")), timeout=15,
                                       source_address=(source, 0))
        return self.stack.tls().wrap_socket(raw, server_hostname="localhost")

    def test_workers_share_the_listeners(self) -> None:
        """Two workers run, and each holds the supervisor's listening socket, which it accepts on."""
        pids = worker_pids(self.gateway)
        self.assertEqual(sorted(pids), [0, 1])
        inode = listening_inode(self.gateway.port("imap", "implicit_tls"))
        for pid in pids.values():
            self.assertTrue(alive(pid))
            self.assertTrue(holds(pid, inode), f"worker {pid} does not hold the listener")
        client = imaplib.IMAP4_SSL("127.0.0.1", self.gateway.port("imap", "implicit_tls"),
                                   ssl_context=self.stack.tls(), timeout=15)
        self.assertEqual(client.login("alice", USERS["alice"])[0], "OK")
        client.logout()

    def test_per_address_limit_counts_all_workers(self) -> None:
        """The per-address limit refuses the connection past it, whichever workers took the others."""
        held = [self.connect("127.0.0.22") for _ in range(PER_ADDRESS)]
        try:
            for connection in held:
                self.assertTrue(connection.recv(200).startswith(b"* OK"))
            refused = self.connect("127.0.0.22")
            self.assertEqual(refused.recv(200), b"* BYE [UNAVAILABLE] Too many connections, try again later.\r\n")
            refused.close()
        finally:
            for connection in held:
                connection.close()

    def test_penalties_count_all_workers(self) -> None:
        """Failed logins from one address add up over connections on both workers, then it is throttled."""
        replies = []
        for attempt in range(6):
            connection = self.connect("127.0.0.21")
            connection.recv(200)
            connection.sendall(b"a LOGIN alice wrong-%d\r\n" % attempt)
            replies.append(connection.recv(200))
            connection.close()
        self.assertEqual([r.split(b" ")[1] for r in replies[:4]], [b"NO"] * 4)
        self.assertIn(b"Too many failed logins from your address", replies[4])
        # The failures were logged as fail2ban reads them, whichever worker saw them.
        self.assertGreaterEqual(len(re.findall(r"\[gateway\.frontend#info\] login_failed protocol=imap "
                                               r"client=127\.0\.0\.21 user=\"alice\"", self.gateway.log())), 4)

    def test_reload_reaches_workers(self) -> None:
        """SIGHUP to the supervisor reloads it and both workers."""
        before = self.gateway.log().count("reloaded path=")
        assert self.gateway.pid is not None
        os.kill(self.gateway.pid, signal.SIGHUP)
        wait_until(lambda: self.gateway.log().count("reloaded path=") >= before + 3)

    def test_dead_workers_are_replaced_and_release(self) -> None:
        """Workers killed while holding every allowed connection are restarted; the limit counts afresh."""
        held = [self.connect("127.0.0.23") for _ in range(PER_ADDRESS)]
        for connection in held:
            connection.recv(200)
        old = worker_pids(self.gateway)
        ready = self.gateway.log().count("worker_ready")
        for pid in old.values():
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: self.gateway.log().count("worker_ready") >= ready + 2)
        self.assertEqual(len(re.findall(r"worker_exited worker=\d+", self.gateway.log())), 2)
        new = worker_pids(self.gateway)
        self.assertEqual(sorted(new), [0, 1])
        self.assertFalse(set(new.values()) & set(old.values()))
        fresh = [self.connect("127.0.0.23") for _ in range(PER_ADDRESS)]
        try:
            for connection in fresh:
                self.assertTrue(connection.recv(200).startswith(b"* OK"))
        finally:
            for connection in held + fresh:
                connection.close()


class SupervisorEndTests(SynchronousTestCase):
    """No worker outlives its supervisor, however it ends."""

    def setUp(self) -> None:
        self.stack = Stack("gw-workers-end-")
        self.addCleanup(self.stack.stop)
        self.dovecot = self.stack.start(DovecotSandbox(self.stack.path("dovecot"), USERS))

    def start_gateway(self) -> tuple[GatewayProcess, list[int]]:
        gateway = self.stack.start(GatewayProcess(self.stack.path("gateway"), imap_backend_port=self.dovecot.imap_port,
                                                  users=USERS, workers=2))
        pids = list(worker_pids(gateway).values())
        self.assertEqual(len(pids), 2)
        return gateway, pids

    def test_stop(self) -> None:
        """SIGTERM to the supervisor stops both workers, and the port closes."""
        gateway, pids = self.start_gateway()
        port = gateway.port("imap", "implicit_tls")
        gateway.stop()
        wait_until(lambda: not any(alive(pid) for pid in pids))
        self.assertRaises(ConnectionRefusedError, socket.create_connection, ("127.0.0.1", port), 2)

    def test_supervisor_killed(self) -> None:
        """Workers whose supervisor was killed outright stop by themselves."""
        gateway, pids = self.start_gateway()
        assert gateway.pid is not None
        os.kill(gateway.pid, signal.SIGKILL)
        wait_until(lambda: not any(alive(pid) for pid in pids))
