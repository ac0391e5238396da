"""
The gateway with two worker processes, end to end: a private Dovecot, the gateway as a real
process tree, and imaplib and raw sockets as clients. Connection limits and login penalties
hold across the workers, a dead worker is replaced and gives back what it held, a reload
reaches every worker (which applies the configuration the supervisor checked, not the file),
and no worker outlives its supervisor.
"""

from __future__ import annotations

import imaplib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from gateway.testing.dovecot import DovecotSandbox
from gateway.testing.gateway import SOURCE_TREE, GatewayProcess
from gateway.config import Limits
from gateway.workers import EXIT_UNSERVED

from .stack import Stack

USERS = {"alice": "alice-password", "bob": "bob-password"}
METRICS = '[metrics]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
PER_ADDRESS = 3


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(condition: object, timeout: float = 15.0) -> None:
    """Poll C{condition} until it holds; fail after C{timeout} seconds."""
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


def add_listener(gateway: GatewayProcess) -> None:
    """Edit the configuration file: a second IMAP implicit-TLS listener, a change only a restart applies."""
    with open(gateway.config_path, encoding="utf-8") as f:
        text = f.read()
    one = 'implicit_tls = ["tcp:0:interface=127.0.0.1"]'
    assert one in text
    with open(gateway.config_path, "w", encoding="utf-8") as f:
        f.write(text.replace(one, 'implicit_tls = ["tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"]', 1))


def scrape(gateway: GatewayProcess, name: str, **labels: str) -> list[float]:
    """The values of the samples C{name} with C{labels} on the gateway's metrics listener."""
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.port('metrics', 'none')}/metrics", timeout=10) as response:
        text = response.read().decode("utf-8")
    return [sample.value for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()]


def settled(gateway: GatewayProcess, name: str, expected: float, timeout: float = 5.0, **labels: str) -> list[float]:
    """Scrape until the samples of C{name} are [C{expected}] or C{timeout} passes; the last scrape's values."""
    deadline = time.monotonic() + timeout
    while (values := scrape(gateway, name, **labels)) != [expected] and time.monotonic() < deadline:
        time.sleep(0.1)
    return values


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
        pids = self.gateway.worker_pids()
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
        """SIGHUP to the supervisor reloads it and both workers, each of which names itself."""
        events = ["reloaded path=", "reloaded worker=0 path=", "reloaded worker=1 path="]
        before = [self.gateway.log().count(event) for event in events]
        assert self.gateway.pid is not None
        os.kill(self.gateway.pid, signal.SIGHUP)
        for event, count in zip(events, before):
            self.gateway.wait_for_log(event, 15, count=count + 1)

    def test_dead_workers_are_replaced_and_release(self) -> None:
        """Workers killed while holding every allowed connection are restarted; the limit counts afresh."""
        held = [self.connect("127.0.0.23") for _ in range(PER_ADDRESS)]
        for connection in held:
            connection.recv(200)
        old = self.gateway.worker_pids()
        ready = self.gateway.log().count("worker_ready")
        for pid in old.values():
            os.kill(pid, signal.SIGKILL)
        self.gateway.wait_for_log("worker_ready", 15, count=ready + 2)
        self.assertEqual(len(re.findall(r"worker_exited worker=\d+", self.gateway.log())), 2)
        # Named by module, as every other line: a worker runs as "python -m gateway.worker".
        self.assertEqual(len(re.findall(r"\[gateway\.worker#info\] worker_ready", self.gateway.log())), ready + 2)
        new = self.gateway.worker_pids()
        self.assertEqual(sorted(new), [0, 1])
        self.assertFalse(set(new.values()) & set(old.values()))
        fresh = [self.connect("127.0.0.23") for _ in range(PER_ADDRESS)]
        try:
            for connection in fresh:
                self.assertTrue(connection.recv(200).startswith(b"* OK"))
        finally:
            for connection in held + fresh:
                connection.close()


# twistd as the unit runs it, with the pool's bound cut from 60 s to UNSERVED so that the test is quick.
UNSERVED = 3.0
# twistd with a short bound, and a supervisor that does not load the users file itself: as one
# that reads it as root while its workers, after twistd's --uid, cannot.
TWISTD = ("import sys; import gateway.workers; gateway.workers.UNSERVED_LIMIT = float(sys.argv.pop(1)); "
          "import gateway.service; gateway.service._local_users = lambda settings: None; "
          "from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()")


def end(process: subprocess.Popen[bytes]) -> None:
    """Kill C{process} if it still runs, and reap it."""
    if process.poll() is None:
        process.kill()
        process.wait()


class NoReadyWorkerTests(SynchronousTestCase):
    """A supervisor none of whose workers can start gives up, for systemd to restart it."""

    def test_exits_with_status(self) -> None:
        """
        With a users file no worker accepts (as one the supervisor reads as root and its workers
        cannot), twistd exits with EXIT_UNSERVED once no worker has been ready for the bound, after one
        no_ready_worker line naming the cause; no worker outlives it and the port refuses.
        """
        directory = tempfile.mkdtemp(prefix="gw-workers-unserved-")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        gateway = GatewayProcess(directory, imap_backend_port=1, users=USERS, workers=2)
        gateway.write_config()
        with open(gateway.users_path, "w", encoding="utf-8") as f:
            f.write("alice:not-a-password-hash\n")
        with open(gateway.log_path, "wb") as log:
            process = subprocess.Popen([sys.executable, "-c", TWISTD, str(UNSERVED), "--nodaemon", "--pidfile=",
                                        "mailgateway", "--config", gateway.config_path],
                                       cwd=SOURCE_TREE, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.addCleanup(end, process)
        started = time.monotonic()
        try:
            status = process.wait(UNSERVED + Limits().stop_grace + 20)
        except subprocess.TimeoutExpired:
            self.fail(f"the supervisor is still running; its log ends with:\n{gateway.log()[-2000:]}")
        took = time.monotonic() - started
        text = gateway.log()
        self.assertEqual(status, EXIT_UNSERVED, text[-2000:])
        self.assertGreaterEqual(took, UNSERVED)
        lines = re.findall(r"\[gateway\.workers#critical\] no_ready_worker .*", text)
        self.assertEqual(len(lines), 1, text[-2000:])
        self.assertIn(f"users_file: {gateway.users_path}:1", lines[0])
        workers = [int(pid) for pid in re.findall(r"worker_started worker=\d+ pid=(\d+)", text)]
        self.assertGreaterEqual(len(workers), 2)
        wait_until(lambda: not any(alive(pid) for pid in workers))
        [port] = re.findall(r"listening protocol=imap tls=implicit_tls held_for=workers \S+ address=127\.0\.0\.1:(\d+)",
                            text)
        self.assertRaises(ConnectionRefusedError, socket.create_connection, ("127.0.0.1", int(port)), 2)


class SupervisorEndTests(SynchronousTestCase):
    """No worker outlives its supervisor, however it ends."""

    def setUp(self) -> None:
        self.stack = Stack("gw-workers-end-")
        self.addCleanup(self.stack.stop)
        self.dovecot = self.stack.start(DovecotSandbox(self.stack.path("dovecot"), USERS))

    def start_gateway(self) -> tuple[GatewayProcess, list[int]]:
        gateway = self.stack.start(GatewayProcess(self.stack.path("gateway"), imap_backend_port=self.dovecot.imap_port,
                                                  users=USERS, workers=2, certificate=self.stack.certificate.chain_path,
                                                  private_key=self.stack.certificate.key_path))
        pids = list(gateway.worker_pids().values())
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
        """
        Workers whose supervisor was killed outright stop by themselves, and what they log as they
        end their sessions goes to the supervisor's standard output, here the gateway's log.
        """
        gateway, pids = self.start_gateway()
        assert gateway.pid is not None
        client = imaplib.IMAP4_SSL("127.0.0.1", gateway.port("imap", "implicit_tls"),
                                   ssl_context=self.stack.tls(), timeout=15)
        client.login("alice", USERS["alice"])
        gateway.wait_for_log(r'login protocol=imap client=127\.0\.0\.1 user="alice" ')
        os.kill(gateway.pid, signal.SIGKILL)
        wait_until(lambda: not any(alive(pid) for pid in pids))
        gateway.wait_for_log(r'disconnect protocol=imap client=127\.0\.0\.1 user="alice" ')
        client.shutdown()


class ReadyNotificationTests(SynchronousTestCase):
    """systemd's Type=notify: READY=1 once the gateway answers, in one process and with workers."""

    def test_ready_once_serving(self) -> None:
        """READY=1 reaches NOTIFY_SOCKET once, from the main process, and the IMAPS port then greets."""
        for workers in (1, 2):
            directory = tempfile.mkdtemp(prefix="gw-notify-")
            self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
            notifications = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.addCleanup(notifications.close)
            notifications.bind(os.path.join(directory, "notify"))
            notifications.settimeout(30)
            os.environ["NOTIFY_SOCKET"] = os.path.join(directory, "notify")  # the child inherits it
            self.addCleanup(os.environ.pop, "NOTIFY_SOCKET", None)
            gateway = GatewayProcess(os.path.join(directory, "gateway"), imap_backend_port=1, users=USERS,
                                     workers=workers)
            gateway.start()
            self.addCleanup(gateway.stop)
            self.assertEqual(notifications.recv(4096), b"READY=1", f"workers={workers}")
            tls = ssl.create_default_context()
            tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
            with socket.create_connection(("127.0.0.1", gateway.port("imap", "implicit_tls")), timeout=10) as raw:
                with tls.wrap_socket(raw) as client:
                    self.assertTrue(client.recv(4096).startswith(b"* OK "), f"workers={workers}")
            notifications.settimeout(1)
            self.assertRaises(TimeoutError, notifications.recv, 4096)  # once


class WorkerLifecycleTests(SynchronousTestCase):
    """One Dovecot for the class; each test starts its own two-worker gateway."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.stack = Stack("gw-workers-life-")
        cls.dovecot = cls.stack.start(DovecotSandbox(cls.stack.path("dovecot"), USERS))

    @classmethod
    def tearDownClass(cls) -> None:
        cls.stack.stop()

    def start_gateway(self, name: str, settings: str = "") -> GatewayProcess:
        gateway = GatewayProcess(self.stack.path(name), imap_backend_port=self.dovecot.imap_port, users=USERS,
                                 workers=2, settings=settings)
        gateway.start()
        self.addCleanup(gateway.stop)
        return gateway

    def test_reload_while_worker_starts(self) -> None:
        """A reload (SIGHUP) that arrives while a restarted worker is still starting does not kill it."""
        gateway = self.start_gateway("hup-race")
        old = gateway.worker_pids()[0]
        os.kill(old, signal.SIGKILL)
        gateway.wait_for_log(rf"worker_started worker=0 pid=(?!{old}\b)\d+")
        assert gateway.pid is not None
        os.kill(gateway.pid, signal.SIGHUP)
        gateway.wait_for_log("] reloaded ", 10, count=2)  # the supervisor and a worker
        time.sleep(3)  # the restarted worker reads its configuration and becomes ready
        exits = re.findall(r"worker_exited worker=0 .*", gateway.log())
        self.assertEqual(len(exits), 1, "\n".join(exits))

    def test_open_connections_after_worker_death(self) -> None:
        """Connections held by workers that were killed no longer count in mailgateway_connections_open."""
        gateway = self.start_gateway("gauge", METRICS)
        held = [socket.create_connection(("127.0.0.1", gateway.port("imap", "starttls")), timeout=10) for _ in range(2)]
        try:
            for client in held:
                self.assertTrue(client.recv(200).startswith(b"* OK "))
            self.assertEqual(settled(gateway, "mailgateway_connections_open", 2.0, protocol="imap"), [2.0])
            ready = gateway.log().count("worker_ready")
            for pid in gateway.worker_pids().values():
                os.kill(pid, signal.SIGKILL)
            gateway.wait_for_log("worker_ready", 15, count=ready + 2)
        finally:
            for client in held:
                client.close()
        self.assertEqual(settled(gateway, "mailgateway_connections_open", 0.0, protocol="imap"), [0.0])

    def test_reload_counts_once(self) -> None:
        """One SIGHUP is one reload in mailgateway_reloads_total, however many workers re-read the file."""
        gateway = self.start_gateway("metrics", METRICS)
        assert gateway.pid is not None
        os.kill(gateway.pid, signal.SIGHUP)
        gateway.wait_for_log("] reloaded ", 10, count=3)  # the supervisor and both workers
        time.sleep(0.5)  # every reloaded event has crossed its channel
        self.assertEqual(scrape(gateway, "mailgateway_reloads_total", result="ok"), [1.0])

    def test_restart_after_configuration_edit(self) -> None:
        """
        Workers restarted after the configuration file was edited (a listener added, neither
        reloaded nor restarted yet) start, and serve each inherited socket with the protocol the
        supervisor bound it for: the STARTTLS port still greets in clear.
        """
        gateway = self.start_gateway("edited")
        starttls = gateway.port("imap", "starttls")
        add_listener(gateway)
        ready = gateway.log().count("worker_ready")
        for pid in gateway.worker_pids().values():
            os.kill(pid, signal.SIGKILL)
        gateway.wait_for_log("worker_ready", 12, count=ready + 2)
        with socket.create_connection(("127.0.0.1", starttls), timeout=5) as client:
            self.assertTrue(client.recv(200).startswith(b"* OK "))
        # A reload does not apply the edit either: listeners change only with a restart, and the log says so.
        assert gateway.pid is not None
        os.kill(gateway.pid, signal.SIGHUP)
        gateway.wait_for_log(r"reload_failed reason=.*restart to change listeners")

    def test_worker_reloads_supervisors_configuration(self) -> None:
        """
        A worker sent SIGHUP itself (systemctl kill -s HUP reaches every process of the unit)
        reloads the configuration its supervisor runs with, not the file edited since: it applies
        nothing of an edit that takes a restart, which the supervisor's own reload then refuses.
        """
        gateway = self.start_gateway("worker-hup")
        add_listener(gateway)
        os.kill(gateway.worker_pids()[0], signal.SIGHUP)
        gateway.wait_for_log("] reloaded worker=0 path=", 10)
        self.assertNotIn("reload_failed", gateway.log())
        assert gateway.pid is not None
        os.kill(gateway.pid, signal.SIGHUP)
        gateway.wait_for_log(r"reload_failed reason=.*restart to change listeners")
        self.assertEqual((gateway.log().count("] reloaded "), gateway.log().count("reload_failed")), (1, 1))
