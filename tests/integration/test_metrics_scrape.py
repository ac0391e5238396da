"""
The metrics endpoint of the real gateway process, scraped over HTTP after real sessions: IMAP
and POP3 logins through the gateway to a private Dovecot, and a submission through it to a
private Postfix. The counters must match the sessions that ran. The gateway runs two worker
processes, so the counters also show that every worker's events reach the supervisor's metrics.
"""

from __future__ import annotations

import base64
import imaplib
import importlib.metadata
import os
import poplib
import re
import shutil
import smtplib
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from email.message import EmailMessage

from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from gateway.testing.dovecot import DovecotSandbox
from gateway.testing.gateway import GatewayProcess
from gateway.testing.pki import TestCA
from gateway.testing.postfix import PostfixSandbox

USER = "alice@example.org"
PASSWORD = "alices pass word"
USERS = {USER: PASSWORD}
MESSAGE = (b"From: bob@example.org\r\nTo: alice@example.org\r\nSubject: counted\r\n\r\n"
           + b"a line of the message body, relayed and counted\r\n" * 200)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape: (name, labels) to value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; a series that does not exist yet counts 0."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def _start_time(pid: int) -> float:
    """When a process started (Unix time), from /proc: the machine's boot time plus the process's start in ticks."""
    with open("/proc/stat", encoding="ascii") as f:
        boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, counted from the state (3)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of C{name} whose labels include C{labels}."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


class MetricsScrapeTests(SynchronousTestCase):
    """One Dovecot, one Postfix and one gateway with a metrics listener for the class."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.tmp = tempfile.mkdtemp(prefix="gw-metrics-")
        os.chmod(cls.tmp, 0o755)
        ca = TestCA(os.path.join(cls.tmp, "ca"))
        cls.ca_path = ca.ca_path
        cls.issued = ca.issue()
        cls.dovecot = DovecotSandbox(os.path.join(cls.tmp, "dovecot"), USERS)
        cls.postfix = PostfixSandbox(os.path.join(cls.tmp, "postfix"))
        cls.gateway = GatewayProcess(
            os.path.join(cls.tmp, "gateway"), imap_backend_port=cls.dovecot.imap_port,
            pop3_backend_port=cls.dovecot.pop3_port, users=USERS,
            certificate=cls.issued.chain_path, private_key=cls.issued.key_path,
            submission_backend_port=cls.postfix.smtp_port, submission_backend='login = "xclient"\ntimeout = 5',
            settings='[metrics]\nlisten = ["tcp:0:interface=127.0.0.1"]\n', workers=2,
        )
        try:
            cls.dovecot.start()
            cls.postfix.start()
            cls.gateway.start()
            # The start-up probes have seen the backends: they add nothing later.
            cls.gateway.wait_for_log(r"backend_capabilities protocol=imap ")
            cls.gateway.wait_for_log(r"backend_capabilities protocol=pop3 ")
            cls.gateway.wait_for_log(r"backend_capabilities protocol=submission ")
        except BaseException:
            cls.tear_down_processes()
            raise

    @classmethod
    def tear_down_processes(cls) -> None:
        """Stop the gateway, then the backends."""
        cls.gateway.stop()
        cls.postfix.stop()
        cls.dovecot.stop()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.tear_down_processes()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def metrics_port(self) -> int:
        port = self.gateway.ports.get(("metrics", "none"))
        if port is None:
            raise AssertionError("the gateway logged no 'listening protocol=metrics' line: "
                                 "is [metrics] wired into gateway/service.py (build_metrics_service)?")
        return port

    def get(self, path: str) -> tuple[int, str, str]:
        """One GET to the metrics listener: status, content type and body."""
        url = f"http://127.0.0.1:{self.metrics_port()}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, response.headers["Content-Type"], response.read().decode("utf-8")
        except urllib.error.HTTPError as e:
            return e.code, e.headers["Content-Type"], e.read().decode("utf-8", "replace")

    def scrape(self) -> Samples:
        status, _, body = self.get("/metrics")
        self.assertEqual(status, 200)
        return parse(body)

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_path)

    def wait_for_closed(self, before: Samples, sessions: dict[str, int]) -> Samples:
        """
        Scrape until every protocol has C{sessions} more connections than C{before} and none is
        open any more (the gateway counts a disconnect once it has seen the client go).
        """
        deadline = time.monotonic() + 10
        while True:
            after = self.scrape()
            done = all(
                total(after, "mailgateway_connections_total", protocol=protocol)
                - total(before, "mailgateway_connections_total", protocol=protocol) == count
                and value(after, "mailgateway_connections_open", protocol=protocol) == 0
                for protocol, count in sessions.items())
            if done:
                return after
            if time.monotonic() > deadline:
                raise AssertionError(f"the sessions did not all end within 10 s; the gateway log ends with:\n"
                                     f"{self.gateway.log()[-3000:]}")
            time.sleep(0.05)

    def imap_sessions(self) -> int:
        """A good login that fetches a message over IMAPS, a wrong password over STARTTLS; the message size."""
        client = imaplib.IMAP4_SSL("127.0.0.1", self.gateway.port("imap", "implicit_tls"), ssl_context=self.tls(),
                                   timeout=30)
        client.login(USER, PASSWORD)
        client.select("INBOX")
        _, data = client.fetch("1", "(BODY.PEEK[])")
        fetched = next(part[1] for part in data if isinstance(part, tuple))
        client.logout()
        client = imaplib.IMAP4("127.0.0.1", self.gateway.port("imap", "starttls"), timeout=30)
        client.starttls(self.tls())
        with self.assertRaises(imaplib.IMAP4.error):
            client.login(USER, "wrong")
        client.logout()
        return len(fetched)

    def pop3_sessions(self) -> int:
        """A good login that retrieves a message over POP3S, a wrong password over STLS; the message size."""
        client = poplib.POP3_SSL("127.0.0.1", self.gateway.port("pop3", "implicit_tls"), context=self.tls(),
                                 timeout=30)
        client.user(USER)
        client.pass_(PASSWORD)
        _, lines, _ = client.retr(1)
        client.quit()
        client = poplib.POP3("127.0.0.1", self.gateway.port("pop3", "starttls"), timeout=30)
        client.stls(self.tls())
        client.user(USER)
        with self.assertRaises(poplib.error_proto):
            client.pass_("wrong")
        client.quit()
        return sum(len(line) + 2 for line in lines)

    def submission_sessions(self) -> int:
        """A good login that submits a message over implicit TLS, a wrong password over STARTTLS; its size."""
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = USER, "bob@example.org", "counted"
        message.set_content("a message submitted through the gateway\n" * 50)
        client = smtplib.SMTP_SSL("127.0.0.1", self.gateway.port("submission", "implicit_tls"), context=self.tls(),
                                  timeout=30)
        client.login(USER, PASSWORD)
        client.send_message(message)
        client.quit()
        client = smtplib.SMTP("127.0.0.1", self.gateway.port("submission", "starttls"), timeout=30)
        client.starttls(context=self.tls())
        client.ehlo()
        # One AUTH: smtplib's login() would try each mechanism in turn, each a failed login.
        token = base64.b64encode(f"\0{USER}\0wrong".encode()).decode("ascii")
        self.assertEqual(client.docmd("AUTH", "PLAIN " + token)[0], 535)
        client.quit()
        return len(message.as_bytes())

    def test_counters_match_sessions(self) -> None:
        """
        After one good and one failed login per protocol, one on each listener, the counters
        show exactly these: logins by result, connections by listener, none left open, a TLS
        handshake and a backend login time each, at least the fetched and submitted messages'
        bytes relayed, one message with a 2xx reply, and nothing refused or failed.
        """
        self.dovecot.deliver(USER, MESSAGE)
        before = self.scrape()
        fetched_imap = self.imap_sessions()
        fetched_pop3 = self.pop3_sessions()
        submitted = self.submission_sessions()
        after = self.wait_for_closed(before, {"imap": 2, "pop3": 2, "submission": 2})

        def delta(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        def delta_total(name: str, **labels: str) -> float:
            return total(after, name, **labels) - total(before, name, **labels)

        for protocol, received, sent in (("imap", fetched_imap, 0), ("pop3", fetched_pop3, 0),
                                         ("submission", 0, submitted)):
            with self.subTest(protocol=protocol):
                self.assertEqual(delta("mailgateway_logins_total", protocol=protocol, result="ok"), 1)
                self.assertEqual(delta("mailgateway_logins_total", protocol=protocol, result="failed"), 1)
                self.assertEqual(delta_total("mailgateway_logins_total", protocol=protocol), 2)
                for tls in ("implicit_tls", "starttls"):
                    listener = str(self.gateway.port(protocol, tls))
                    self.assertEqual(delta("mailgateway_connections_total", protocol=protocol, listener=listener), 1)
                self.assertEqual(delta_total("mailgateway_tls_handshakes_total", protocol=protocol), 2)
                self.assertEqual(delta_total("mailgateway_tls_handshakes_total", protocol=protocol, version="TLSv1.3"),
                                 2)
                self.assertEqual(delta("mailgateway_backend_login_seconds_count", protocol=protocol), 1)
                self.assertGreater(delta("mailgateway_backend_login_seconds_sum", protocol=protocol), 0)
                self.assertGreaterEqual(delta("mailgateway_relayed_bytes_total", protocol=protocol, direction="out"),
                                        received)
                self.assertGreaterEqual(delta("mailgateway_relayed_bytes_total", protocol=protocol, direction="in"),
                                        sent)
                self.assertGreater(delta("mailgateway_relayed_bytes_total", protocol=protocol, direction="in"), 0)
                self.assertEqual(delta_total("mailgateway_backend_failures_total", protocol=protocol), 0)
                self.assertEqual(delta_total("mailgateway_limit_refusals_total", protocol=protocol), 0)
        self.assertEqual(delta("mailgateway_messages_total", result="2xx"), 1)
        self.assertEqual(delta_total("mailgateway_messages_total"), 1)
        self.assertEqual(value(after, "mailgateway_metrics_event_errors_total"), 0)

    def test_certificate_expiry(self) -> None:
        """The default certificate's expiry time is its leaf certificate's, read from the served chain."""
        with open(self.issued.cert_path, "rb") as f:
            leaf = x509.load_pem_x509_certificate(f.read())
        samples = self.scrape()
        self.assertEqual(value(samples, "mailgateway_certificate_expiry_timestamp_seconds",
                               certificate="default", path=self.issued.chain_path),
                         leaf.not_valid_after_utc.timestamp())
        self.assertEqual(value(samples, "mailgateway_certificate_read_errors_total",
                               certificate="default", path=self.issued.chain_path), 0)

    def test_version(self) -> None:
        """The running gateway says which release it is: in its first line and in a scrape."""
        installed = importlib.metadata.version("mailgateway")
        self.gateway.wait_for_log(rf"starting version={re.escape(installed)} config=")
        self.assertEqual(value(self.scrape(), "mailgateway_build_info", version=installed), 1)

    def test_processes(self) -> None:
        """
        The supervisor and each worker have process_* series of their own: a worker's start time
        is its own process's (from /proc), later than the supervisor's.
        """
        samples = self.scrape()
        workers = self.gateway.worker_pids()
        self.assertEqual(sorted(workers), [0, 1])
        supervisor = value(samples, "process_start_time_seconds", process="supervisor")
        for number, pid in workers.items():
            started = value(samples, "process_start_time_seconds", process=f"worker-{number}")
            # The gateway reads the boot time from the clocks, not as /proc/stat's whole second.
            self.assertLess(abs(started - _start_time(pid)), 1.0)
            self.assertGreater(started, supervisor)
            self.assertGreater(value(samples, "process_resident_memory_bytes", process=f"worker-{number}"), 1e6)
            self.assertGreater(value(samples, "process_max_fds", process=f"worker-{number}"), 1000)

    def test_only_metrics(self) -> None:
        """/metrics is text format 0.0.4; every other path is a 404."""
        status, content_type, body = self.get("/metrics")
        self.assertEqual((status, content_type), (200, "text/plain; version=0.0.4; charset=utf-8"))
        self.assertIn("# TYPE mailgateway_logins_total counter", body)
        for path in ("/", "/metrics/", "/other"):
            self.assertEqual(self.get(path)[0], 404, path)

    def test_no_server_header(self) -> None:
        """The running gateway's metrics responses name no server software, a scrape's or a 404's."""
        for path in ("/metrics", "/other"):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port()}{path}", timeout=10) as response:
                    headers = response.headers
            except urllib.error.HTTPError as e:
                headers = e.headers
            self.assertIsNone(headers["Server"], path)
            self.assertIsNotNone(headers["Date"], path)
