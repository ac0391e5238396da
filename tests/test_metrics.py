"""
The metrics: counted from the real modules' log events (the front end, submission, penalties,
PROXY protocol, service), the certificate expiry read at scrape time, and the /metrics page and
its listener, all in memory.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import resource
import shutil
import subprocess
import tempfile
from dataclasses import replace

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from frontend_harness import FrontEndTestBase
from prometheus_client import ProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.application.service import MultiService
from twisted.internet.defer import fail
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import Logger, LogPublisher, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from gateway import __version__
from gateway.backend import BackendRefused, BackendUnavailable, LoginRequest
from gateway.config import ConfigError, MetricsSettings, NamedCertificate, SubmissionSettings, TLSSettings
from gateway.connection_limits import ConnectionLimits, ConnectionRules
from gateway.listener import Listener
from gateway.config import load_settings
from gateway.frontend import FrontEndFactory
from gateway.metrics import (
    CONTENT_TYPE,
    GatewayMetrics,
    LogObservation,
    build_metrics_service,
    certificate_expiry,
    certificates_to_watch,
    _process_families,
    event_value,
    metrics_site,
)
from gateway.penalties import LoginPenalties, PenaltyRules
from gateway.pop3 import Pop3FrontEnd
from gateway.proxy_protocol import TrustedProxyFactory
from gateway.senders import SenderPolicy
from gateway.service import CapabilityProbe, Reloader
from gateway.smtp_backend import SmtpBackend
from gateway.submission import SubmissionFrontEnd
from gateway.testing.fakes import BACKEND_SETTINGS
from gateway.testing.pki import TestCA


def sample(metrics: GatewayMetrics, name: str, **labels: str) -> float | None:
    """One sample's value, or None when the series does not exist."""
    return metrics.registry.get_sample_value(name, labels)


def observe_globally(test: SynchronousTestCase) -> GatewayMetrics:
    """Metrics fed by every event the real modules log, for the rest of the test."""
    metrics = GatewayMetrics()
    globalLogPublisher.addObserver(metrics.observe)
    test.addCleanup(globalLogPublisher.removeObserver, metrics.observe)
    return metrics


class FrontEndEventTests(FrontEndTestBase):
    """Connections and logins of a real POP3 front end, counted from its own log events."""

    front_end = Pop3FrontEnd
    protocol = "pop3"

    def setUp(self) -> None:
        self.metrics = observe_globally(self)
        super().setUp()

    def count(self, name: str, **labels: str) -> float | None:
        return sample(self.metrics, name, **labels)

    def test_connection_open_then_closed(self) -> None:
        """
        A connection counts once under its protocol and listening port and is open until it
        ends; then the bytes it sent and received count in and out.
        """
        listener = str(self.transport.getHost().port)
        self.assertEqual(self.count("mailgateway_connections_total", protocol="pop3", listener=listener), 1)
        self.assertEqual(self.count("mailgateway_connections_open", protocol="pop3"), 1)
        sent = b"CAPA\r\nNOOP\r\n"
        received = self.greeting + self.say(sent)
        self.front.connectionLost()
        self.assertEqual(self.count("mailgateway_connections_open", protocol="pop3"), 0)
        self.assertEqual(self.count("mailgateway_relayed_bytes_total", protocol="pop3", direction="in"), len(sent))
        self.assertEqual(self.count("mailgateway_relayed_bytes_total", protocol="pop3", direction="out"),
                         len(received))

    def test_balancers_own_connection_not_counted(self) -> None:
        """
        A connection a load balancer makes on its own behalf (a PROXY v2 LOCAL header, as HAProxy's
        health checks with send-proxy-v2 have it) is served, but while it says nothing it is no
        client's: neither logged nor counted as a connection. One that speaks (HAProxy sends LOCAL
        for a client it cannot name, one on a UNIX socket) is logged and counted from then on, at
        the balancer's address; one that relays a client with an address is both at once.
        """
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        factory = TrustedProxyFactory(FrontEndFactory(Pop3FrontEnd, self.context),
                                      (ipaddress.ip_network("127.0.0.0/8"),), self.clock)
        balancer, listener = IPv4Address("TCP", "127.0.0.2", 40000), IPv4Address("TCP", "127.0.0.1", 995)
        local = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"
        client = b"PROXY TCP4 203.0.113.9 127.0.0.1 55555 995\r\n"

        def connection(header: bytes, said: bytes) -> None:
            proxy = factory.buildProtocol(balancer)
            assert proxy is not None
            transport = StringTransport(hostAddress=listener, peerAddress=balancer)
            proxy.makeConnection(transport)
            proxy.dataReceived(header)
            self.assertTrue(transport.value().startswith(b"+OK "), transport.value())  # served
            if said:
                proxy.dataReceived(said)
            proxy.connectionLost(Failure(ConnectionDone()))

        def events(client: str) -> list[str]:
            lines = [formatEvent(event) for event in logged]
            return [line.split(" ")[0] for line in lines if f"client={client}" in line]

        connection(local, b"")
        self.assertEqual(events("127.0.0.2"), [])
        self.assertIsNone(self.count("mailgateway_connections_total", protocol="pop3", listener="995"))
        connection(local, b"CAPA\r\n")
        self.assertEqual(events("127.0.0.2"), ["connect", "disconnect"])
        connection(client, b"")
        self.assertEqual(events("203.0.113.9"), ["connect", "disconnect"])
        self.assertEqual(self.count("mailgateway_connections_total", protocol="pop3", listener="995"), 2)
        self.assertEqual(self.count("mailgateway_connections_open", protocol="pop3"), 1)  # the harness's own

    def test_worker_gone(self) -> None:
        """
        Connections a worker process had open stop counting when its channel closes (it never
        logs those disconnects); connections of the process itself and of other workers stay.
        """
        for worker in (11, 11, 12):
            self.metrics.observe({"log_namespace": "gateway.frontend", "log_worker": worker, "log_format":
                                  "connect protocol={protocol} client={client} port={client_port} listener={listener} tls={tls}",
                                  "protocol": "pop3", "client": "192.0.2.1", "client_port": 1, "listener": 995, "tls": "none"})
        self.assertEqual(self.count("mailgateway_connections_open", protocol="pop3"), 4)
        self.metrics.observe({"log_namespace": "gateway.worker_channel", "pid": 11,
                              "log_format": "worker_channel_closed pid={pid} connections={connections} sessions={sessions}"})
        self.assertEqual(self.count("mailgateway_connections_open", protocol="pop3"), 2)
        self.front.connectionLost()
        self.assertEqual(self.count("mailgateway_connections_open", protocol="pop3"), 1)

    def test_worker_gone_only_from_supervisor(self) -> None:
        """A worker's own event saying another worker has gone (a forgery) leaves that worker's connections counted."""
        for worker in (11, 11):
            self.metrics.observe({"log_namespace": "gateway.frontend", "log_worker": worker, "log_format":
                                  "connect protocol={protocol} client={client} port={client_port} listener={listener} tls={tls}",
                                  "protocol": "pop3", "client": "192.0.2.1", "client_port": 1, "listener": 995, "tls": "none"})
        gone = {"log_namespace": "gateway.worker_channel", "pid": 11,
                "log_format": "worker_channel_closed pid={pid} connections={connections} sessions={sessions}"}
        self.metrics.observe(dict(gone, log_worker=12))
        self.assertEqual(self.count("mailgateway_connections_open", protocol="pop3"), 3)
        self.metrics.observe(gone)
        self.assertEqual(self.count("mailgateway_connections_open", protocol="pop3"), 1)

    def test_good_login_and_backend_time(self) -> None:
        """A good login counts as ok, and the backend's login time lands in its histogram bucket, in seconds."""
        self.backend.hold = True
        self.say(b"USER bob\r\nPASS secret\r\n")
        self.clock.advance(0.2)
        self.backend.held[0].callback(self.backend.session(self.backend.requests[0]))
        self.assertEqual(self.count("mailgateway_logins_total", protocol="pop3", result="ok"), 1)
        self.assertEqual(self.count("mailgateway_backend_login_seconds_count", protocol="pop3"), 1)
        self.assertAlmostEqual(self.count("mailgateway_backend_login_seconds_sum", protocol="pop3") or 0.0, 0.2)
        self.assertEqual(self.count("mailgateway_backend_login_seconds_bucket", protocol="pop3", le="0.1"), 0)
        self.assertEqual(self.count("mailgateway_backend_login_seconds_bucket", protocol="pop3", le="0.25"), 1)

    def test_failed_login(self) -> None:
        """A wrong password counts as failed, and not as ok."""
        self.say(b"USER bob\r\nPASS wrong\r\n")
        self.clock.advance(self.penalty_rules.max_delay)
        self.assertEqual(self.count("mailgateway_logins_total", protocol="pop3", result="failed"), 1)
        self.assertIsNone(self.count("mailgateway_logins_total", protocol="pop3", result="ok"))

    def test_backend_down(self) -> None:
        """A backend that cannot be reached counts as an unavailable login and as a backend failure."""
        self.backend.error = BackendUnavailable("connection refused")
        self.say(b"USER bob\r\nPASS secret\r\n")
        self.assertEqual(self.count("mailgateway_logins_total", protocol="pop3", result="unavailable"), 1)
        self.assertEqual(self.count("mailgateway_backend_failures_total", protocol="pop3"), 1)

    def test_backend_refuses_session(self) -> None:
        """A session the backend refuses (POP3 [IN-USE]) counts as refused."""
        self.backend.error = BackendRefused(b"[IN-USE] Mailbox locked")
        self.say(b"USER bob\r\nPASS secret\r\n")
        self.assertEqual(self.count("mailgateway_logins_total", protocol="pop3", result="refused"), 1)
        self.assertIsNone(self.count("mailgateway_backend_failures_total", protocol="pop3"))

    def test_connection_limit(self) -> None:
        """A connection refused by a limit counts under that limit and is never open, not even when it ends."""
        self.connections.rules = replace(self.connections.rules, max_connections=1)
        refused, _ = self.connect()
        self.assertEqual(self.count("mailgateway_limit_refusals_total", protocol="pop3", limit="max_connections"), 1)
        refused.connectionLost()
        self.assertEqual(self.count("mailgateway_connections_open", protocol="pop3"), 1)
        self.assertEqual(self.count("mailgateway_connections_total", protocol="pop3",
                                    listener=str(self.transport.getHost().port)), 1)

    def test_session_limit(self) -> None:
        """A login beyond the user's session limit counts as a refusal by max_sessions_per_user."""
        self.connections.rules = replace(self.connections.rules, max_sessions_per_user=1)
        self.say(b"USER bob\r\nPASS secret\r\n")
        second, _ = self.connect()
        second.dataReceived(b"USER bob\r\nPASS secret\r\n")
        self.assertEqual(self.count("mailgateway_limit_refusals_total", protocol="pop3",
                                    limit="max_sessions_per_user"), 1)
        self.assertEqual(self.count("mailgateway_logins_total", protocol="pop3", result="ok"), 1)
        second.connectionLost()

    def test_http_probe(self) -> None:
        """An HTTP request line on a mail port counts as an HTTP probe."""
        self.say(b"GET / HTTP/1.1\r\n")
        self.assertEqual(self.count("mailgateway_http_probes_total", protocol="pop3"), 1)

    def test_timeouts_by_reason(self) -> None:
        """An idle client and one past the login deadline count under their reasons."""
        self.clock.advance(self.limits.idle_timeout)
        self.assertEqual(self.count("mailgateway_timeouts_total", protocol="pop3", reason="idle"), 1)
        chatty, _ = self.connect()
        for _ in range(int(self.limits.login_timeout // 30)):
            self.clock.advance(30)
            chatty.dataReceived(b"CAPA\r\n")
        self.assertEqual(self.count("mailgateway_timeouts_total", protocol="pop3", reason="login-deadline"), 1)
        chatty.connectionLost()


class ThrottleEventTests(FrontEndTestBase):
    """The penalties' throttling, counted from their own log event."""

    front_end = Pop3FrontEnd
    protocol = "pop3"
    penalty_rules = PenaltyRules(base_delay=2.0, max_delay=2.0, ip_budget=1)

    def setUp(self) -> None:
        self.metrics = observe_globally(self)
        super().setUp()

    def test_one_window_counts_once(self) -> None:
        """An address that used up its failures counts one throttle window, however often it is refused."""
        self.say(b"USER bob\r\nPASS wrong\r\n")
        self.clock.advance(2.0)
        self.say(b"USER bob\r\nPASS secret\r\n")
        again, _ = self.connect()
        again.dataReceived(b"USER bob\r\nPASS secret\r\n")
        self.assertEqual(sample(self.metrics, "mailgateway_throttle_windows_total"), 1)
        self.assertIsNone(sample(self.metrics, "mailgateway_logins_total", protocol="pop3", result="ok"))
        again.connectionLost()


RULES = SubmissionSettings(implicit_tls=(), starttls=(), backend=BACKEND_SETTINGS, senders_file=None,
                           max_message_size=1000, max_recipients=3, idle_timeout=300.0, transaction_timeout=600.0)


def logged_in_mta(request: LoginRequest) -> SmtpBackend:
    """An MTA session that has just logged in, on a StringTransport."""
    backend = SmtpBackend(request, replace(BACKEND_SETTINGS, login="xclient"), None)
    backend.makeConnection(StringTransport())
    backend.dataReceived(b"220 mta ESMTP\r\n250-mta\r\n250 XCLIENT ADDR PORT PROTO LOGIN\r\n"
                         b"220 mta ESMTP\r\n250 mta\r\n")
    return backend


class SubmissionEventTests(FrontEndTestBase):
    """Messages, sender rejections and MTA failures of a real submission front end, counted from its log events."""

    protocol = "submission"
    limits = replace(FrontEndTestBase.limits, line_length=12288)

    def front_end(self, context):  # type: ignore[no-untyped-def,override]
        return SubmissionFrontEnd(context, RULES, SenderPolicy(None))

    def setUp(self) -> None:
        self.metrics = observe_globally(self)
        super().setUp()
        self.auth.passwords["bob@example.org"] = b"secret"
        self.backend._make_session = logged_in_mta  # type: ignore[attr-defined]
        self.say(b"EHLO client.example.org\r\nAUTH PLAIN AGJvYkBleGFtcGxlLm9yZwBzZWNyZXQ=\r\n")

    def mta_replies(self, data: bytes) -> None:
        session = self.backend.sessions[-1]
        assert isinstance(session, SmtpBackend)
        session.dataReceived(data)

    def send_message(self, final_reply: bytes) -> None:
        self.say(b"MAIL FROM:<bob@example.org>\r\n")
        self.mta_replies(b"250 2.1.0 Ok\r\n")
        self.say(b"RCPT TO:<a@example.org>\r\n")
        self.mta_replies(b"250 2.1.5 Ok\r\n")
        self.say(b"DATA\r\n")
        self.mta_replies(b"354 go ahead\r\n")
        self.say(b"Subject: x\r\n\r\nhello\r\n.\r\n")
        self.mta_replies(final_reply)

    def test_login_counts_under_submission(self) -> None:
        """AUTH counts as a submission login."""
        self.assertEqual(sample(self.metrics, "mailgateway_logins_total", protocol="submission", result="ok"), 1)

    def test_messages_by_reply_class(self) -> None:
        """Each message counts under the class of the MTA's final reply."""
        self.send_message(b"250 2.0.0 Ok: queued as A\r\n")
        self.send_message(b"554 5.7.1 Rejected\r\n")
        self.send_message(b"250 2.0.0 Ok: queued as B\r\n")
        self.assertEqual(sample(self.metrics, "mailgateway_messages_total", result="2xx"), 2)
        self.assertEqual(sample(self.metrics, "mailgateway_messages_total", result="5xx"), 1)

    def test_sender_rejected(self) -> None:
        """A MAIL FROM the user may not use counts as a sender rejection."""
        self.say(b"MAIL FROM:<alice@example.org>\r\n")
        self.assertEqual(sample(self.metrics, "mailgateway_sender_rejections_total"), 1)

    def test_mta_lost(self) -> None:
        """An MTA that goes away mid-session counts as a submission backend failure."""
        self.say(b"MAIL FROM:<bob@example.org>\r\n")
        self.backend.sessions[-1].connectionLost(Failure(ConnectionLost()))
        self.assertEqual(sample(self.metrics, "mailgateway_backend_failures_total", protocol="submission"), 1)

    def test_transaction_timeout(self) -> None:
        """A transaction that takes too long counts as a timeout with the reason written into its event."""
        self.say(b"MAIL FROM:<bob@example.org>\r\n")
        self.mta_replies(b"250 2.1.0 Ok\r\n")
        for _ in range(4):
            self.clock.advance(150)
            self.say(b"NOOP\r\n")
        self.assertEqual(sample(self.metrics, "mailgateway_timeouts_total", protocol="submission",
                                reason="transaction"), 1)


class _FailingProbe:
    """A backend connector whose start-up probe fails."""

    address = "127.0.0.1:110"

    def probe(self) -> object:
        return fail(BackendUnavailable("connection refused"))


CONFIG = """\
[gateway]
hostname = "localhost"
state_dir = "{state}"

[tls]
self_signed = true

[auth]
mode = "backend"

[imap]
implicit_tls = ["tcp:0:interface=127.0.0.1"]
"""


class OtherEventTests(SynchronousTestCase):
    """Events of the PROXY protocol, the service and the penalties, logged by the real code."""

    def setUp(self) -> None:
        self.metrics = observe_globally(self)

    def test_proxy_refused(self) -> None:
        """A connection from an address that is not a configured load balancer counts as a PROXY refusal."""
        factory = TrustedProxyFactory(Factory(), (ipaddress.ip_network("10.0.0.0/8"),), Clock())
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000)))
        self.assertEqual(sample(self.metrics, "mailgateway_proxy_refusals_total", reason="untrusted"), 1)

    def test_probe_failure(self) -> None:
        """A backend down at start counts as a backend failure of its protocol."""
        probe = CapabilityProbe(_FailingProbe(), "pop3")  # type: ignore[arg-type]
        probe.startService()
        self.addCleanup(probe.stopService)
        self.assertEqual(sample(self.metrics, "mailgateway_backend_failures_total", protocol="pop3"), 1)

    def test_reloads(self) -> None:
        """A reload counts as ok; one that finds a broken configuration counts as failed."""
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "gateway.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(CONFIG.format(state=os.path.join(directory, "state")))
        reloader = Reloader(Clock(), load_settings(path))  # type: ignore[arg-type]
        reloader.reload()
        with open(path, "a", encoding="utf-8") as f:
            f.write("unknown_key = 1\n")
        reloader.reload()
        reloader.reload()
        # A worker's own reload of the same configuration is not another reload of the gateway.
        self.metrics.observe({"log_namespace": "gateway.service", "log_worker": 11,
                              "log_format": "reloaded worker={worker} path={path} certificates={count}"})
        self.assertEqual(sample(self.metrics, "mailgateway_reloads_total", result="ok"), 1)
        self.assertEqual(sample(self.metrics, "mailgateway_reloads_total", result="failed"), 2)

    def test_throttle_log_without_protocol(self) -> None:
        """The throttle event, which names no protocol, is read without error."""
        penalties = LoginPenalties(Clock(), PenaltyRules(ip_budget=1))
        penalties.failed("bob", "192.0.2.7", b"wrong")
        self.assertTrue(penalties.refused("192.0.2.7"))
        self.assertEqual(sample(self.metrics, "mailgateway_throttle_windows_total"), 1)
        self.assertEqual(sample(self.metrics, "mailgateway_metrics_event_errors_total"), 0)


class ObserverTests(SynchronousTestCase):
    """What the observer does with events that are not the gateway's, or not as expected."""

    def setUp(self) -> None:
        self.metrics = GatewayMetrics()

    def test_tls_handshakes(self) -> None:
        """TLS handshakes count per protocol, version and cipher."""
        log = Logger(namespace="gateway.frontend", observer=self.metrics.observe)
        for version, cipher in (("TLSv1.3", "TLS_AES_256_GCM_SHA384"), ("TLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256"),
                                ("TLSv1.3", "TLS_AES_256_GCM_SHA384")):
            log.info("tls protocol={protocol} client={client} version={version} cipher={cipher}",
                     protocol="imap", client="192.0.2.7", version=version, cipher=cipher)
        self.assertEqual(sample(self.metrics, "mailgateway_tls_handshakes_total", protocol="imap", version="TLSv1.3",
                                cipher="TLS_AES_256_GCM_SHA384"), 2)
        self.assertEqual(sample(self.metrics, "mailgateway_tls_handshakes_total", protocol="imap", version="TLSv1.2",
                                cipher="ECDHE-RSA-AES128-GCM-SHA256"), 1)

    def test_other_namespaces_ignored(self) -> None:
        """An event that looks like a gateway event but comes from another module changes nothing."""
        log = Logger(namespace="twisted.something", observer=self.metrics.observe)
        log.info("connect protocol={protocol} listener={listener}", protocol="imap", listener=993)
        self.metrics.observe({"log_namespace": "gateway.frontend"})
        self.metrics.observe({"log_format": None, "log_namespace": "gateway.frontend"})
        self.assertIsNone(sample(self.metrics, "mailgateway_connections_total", protocol="imap", listener="993"))
        self.assertEqual(sample(self.metrics, "mailgateway_metrics_event_errors_total"), 0)

    def test_worker_protocols(self) -> None:
        """
        A worker's event naming a protocol no worker serves is not counted (each name would be a
        series kept for good), but as an event error; the supervisor's own protocols count.
        """
        connect = {"log_namespace": "gateway.frontend", "log_worker": 11, "log_format":
                   "connect protocol={protocol} client={client} port={client_port} listener={listener} tls={tls}",
                   "client": "192.0.2.1", "client_port": 1, "listener": 993, "tls": "none"}
        for protocol in ("imap", "p0" * 100, "p1" * 100, "metrics"):
            self.metrics.observe(dict(connect, protocol=protocol))
        self.metrics.observe({"log_namespace": "gateway.frontend", "log_worker": 11,
                              "log_format": "timeout protocol=x" + "y" * 200 + " client={client} reason=idle",
                              "client": "192.0.2.1"})
        self.metrics.observe({"log_namespace": "gateway.listener", "protocol": "metrics", "client": "192.0.2.1",
                              "limit": "max_connections", "log_format":
                              "connection_refused protocol={protocol} client={client} limit={limit}"})
        families = {family.name: family.samples for family in self.metrics.registry.collect()}
        self.assertEqual([sample.labels for sample in families["mailgateway_connections_open"]], [{"protocol": "imap"}])
        self.assertEqual(families["mailgateway_timeouts"], [])
        self.assertEqual(sample(self.metrics, "mailgateway_limit_refusals_total", protocol="metrics",
                                limit="max_connections"), 1)
        self.assertEqual(sample(self.metrics, "mailgateway_metrics_event_errors_total"), 4)

    def test_unreadable_event_counted_not_raised(self) -> None:
        """A gateway event missing a field or with a wrong value is counted as an error, never raised."""
        log = Logger(namespace="gateway.frontend", observer=self.metrics.observe)
        log.info("connect protocol={protocol} client={client}", protocol="imap", client="192.0.2.7")
        log.info("disconnect protocol={protocol} in={bytes_in} out={bytes_out}", protocol="imap",
                 bytes_in="many", bytes_out=3)
        self.assertEqual(sample(self.metrics, "mailgateway_metrics_event_errors_total"), 2)
        self.assertIsNone(sample(self.metrics, "mailgateway_connections_open", protocol="imap"))

    def test_field_from_format(self) -> None:
        """A value is read from the event's field, else from its format; a placeholder is not a value."""
        event = {"log_format": "timeout protocol=submission client={client} reason=transaction", "client": "x"}
        self.assertEqual(event_value(event, "protocol"), "submission")
        self.assertEqual(event_value(event, "reason"), "transaction")
        self.assertEqual(event_value(event, "client"), "x")
        self.assertRaises(KeyError, event_value, {"log_format": "tls version={version}"}, "version")


def write_certificates(path: str, *expiries: datetime.datetime) -> None:
    """A PEM file of self-signed certificates, one per expiry time, in that order."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mail.example.org")])
    pem = b""
    for expiry in expiries:
        certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                       .serial_number(x509.random_serial_number())
                       .not_valid_before(datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc))
                       .not_valid_after(expiry).sign(key, hashes.SHA256()))
        pem += certificate.public_bytes(serialization.Encoding.PEM)
    with open(path, "wb") as f:
        f.write(pem)


def utc(year: int) -> datetime.datetime:
    return datetime.datetime(year, 6, 1, tzinfo=datetime.timezone.utc)


class ProcessTests(SynchronousTestCase):
    """The standard process_* metrics, for each of the gateway's processes."""

    def test_this_process_by_default(self) -> None:
        """Without workers, the series are this process's, as process="gateway"."""
        metrics = GatewayMetrics()
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.assertEqual(sample(metrics, "process_max_fds", process="gateway"), soft)
        self.assertGreater(sample(metrics, "process_resident_memory_bytes", process="gateway") or 0, 1e6)
        self.assertGreater(sample(metrics, "process_open_fds", process="gateway") or 0, 2)

    def test_each_process_watched(self) -> None:
        """Each process named has series of its own; a process gone has none, and the scrape goes on."""
        child = subprocess.Popen(["sleep", "60"],
                                 preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (123, 123)))
        self.addCleanup(child.wait)
        self.addCleanup(child.kill)
        metrics = GatewayMetrics()
        gone = 2**22 + 1  # above the largest pid_max: no process has it
        metrics.watch_processes(lambda: [("supervisor", os.getpid()), ("worker-0", child.pid), ("worker-1", gone)])
        self.assertEqual(sample(metrics, "process_max_fds", process="worker-0"), 123)
        self.assertEqual(sample(metrics, "process_max_fds", process="supervisor"),
                         resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self.assertIsNone(sample(metrics, "process_max_fds", process="worker-1"))
        self.assertIsNone(sample(metrics, "process_max_fds", process="gateway"))
        self.assertEqual(sample(metrics, "mailgateway_build_info", version=__version__), 1)

    def test_without_proc_stat(self) -> None:
        """
        Where /proc/stat is hidden (the unit's ProcSubset=pid), every series is still there, with the
        start time prometheus_client reads from /proc/stat's boot time, to within its whole second.
        """
        proc = tempfile.mkdtemp(prefix="gw-proc-")
        self.addCleanup(shutil.rmtree, proc)
        os.symlink(f"/proc/{os.getpid()}", os.path.join(proc, str(os.getpid())))
        families = {family.name: family for family in _process_families(os.getpid(), proc)}
        self.assertEqual(sorted(families), ["process_cpu_seconds", "process_max_fds", "process_open_fds",
                                            "process_resident_memory_bytes", "process_start_time_seconds",
                                            "process_virtual_memory_bytes"])
        [real] = [family for family in ProcessCollector(registry=None).collect()
                  if family.name == "process_start_time_seconds"]
        self.assertLess(abs(families["process_start_time_seconds"].samples[0].value - real.samples[0].value), 1.0)


class CertificateTests(SynchronousTestCase):
    """Certificate expiry, read from the chain files at each scrape."""

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.metrics = GatewayMetrics()

    def expiry(self, name: str, path: str) -> float | None:
        return sample(self.metrics, "mailgateway_certificate_expiry_timestamp_seconds", certificate=name, path=path)

    def errors(self, name: str, path: str) -> float | None:
        return sample(self.metrics, "mailgateway_certificate_read_errors_total", certificate=name, path=path)

    def test_issued_chain(self) -> None:
        """A chain from a CA shows its leaf certificate's expiry time, and no read error."""
        issued = TestCA(os.path.join(self.directory, "ca")).issue()
        with open(issued.cert_path, "rb") as f:
            leaf = x509.load_pem_x509_certificate(f.read())
        self.metrics.watch_certificates([("default", issued.chain_path)])
        self.assertEqual(self.expiry("default", issued.chain_path), leaf.not_valid_after_utc.timestamp())
        self.assertEqual(self.errors("default", issued.chain_path), 0)

    def test_leaf_first(self) -> None:
        """The expiry is the first certificate's, not a later one's in the chain."""
        path = os.path.join(self.directory, "chain.pem")
        write_certificates(path, utc(2031), utc(2029))
        self.assertEqual(certificate_expiry(path), utc(2031).timestamp())

    def test_renewal_shows_without_restart(self) -> None:
        """A certificate replaced in place shows its new expiry at the next scrape."""
        path = os.path.join(self.directory, "chain.pem")
        write_certificates(path, utc(2031))
        self.metrics.watch_certificates([("mail.example.org", path)])
        self.assertEqual(self.expiry("mail.example.org", path), utc(2031).timestamp())
        write_certificates(path, utc(2032))
        self.assertEqual(self.expiry("mail.example.org", path), utc(2032).timestamp())

    def test_unreadable(self) -> None:
        """
        A missing file and one without a certificate have no expiry series, and count a read
        error at every scrape; a readable one beside them is unaffected.
        """
        missing = os.path.join(self.directory, "missing.pem")
        garbage = os.path.join(self.directory, "garbage.pem")
        good = os.path.join(self.directory, "good.pem")
        with open(garbage, "w", encoding="ascii") as f:
            f.write("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        write_certificates(good, utc(2030))
        self.metrics.watch_certificates([("default", missing), ("b.example", garbage), ("c.example", good)])
        self.assertIsNone(self.expiry("default", missing))
        self.assertIsNone(self.expiry("b.example", garbage))
        self.assertEqual(self.expiry("c.example", good), utc(2030).timestamp())
        # Each get_sample_value above was one scrape.
        self.assertEqual(self.errors("default", missing), 4)
        self.assertEqual(self.errors("b.example", garbage), 5)
        self.assertEqual(self.errors("c.example", good), 0)

    def test_watch_replaces(self) -> None:
        """Watching a new list of certificates drops the series of the ones no longer listed."""
        first, second = os.path.join(self.directory, "a.pem"), os.path.join(self.directory, "b.pem")
        write_certificates(first, utc(2030))
        write_certificates(second, utc(2031))
        self.metrics.watch_certificates([("default", first)])
        self.assertIsNotNone(self.expiry("default", first))
        self.metrics.watch_certificates([("default", second)])
        self.assertIsNone(self.expiry("default", first))
        self.assertEqual(self.expiry("default", second), utc(2031).timestamp())

    def test_certificates_to_watch(self) -> None:
        """The default chain is watched as "default" and each SNI chain under its first name."""
        tls = TLSSettings("/etc/default.pem", "/etc/default.key", False, (
            NamedCertificate(("mail.example.net", "*.example.net"), "/etc/net.pem", "/etc/net.key"),
            NamedCertificate(("mail.example.com",), "/etc/com.pem", "/etc/com.key"),
        ))
        self.assertEqual(certificates_to_watch(tls, "/etc/default.pem"),
                         (("default", "/etc/default.pem"), ("mail.example.net", "/etc/net.pem"),
                          ("mail.example.com", "/etc/com.pem")))


def http_get(site: Site, request: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """One HTTP/1.0 request to a site in memory: the status line, the headers (lower-case names) and the body."""
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    assert channel is not None
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(request)
    head, _, body = transport.value().partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {name.lower(): value for name, _, value in (line.partition(b": ") for line in lines)}
    channel.connectionLost(None)  # type: ignore[arg-type]
    return status, headers, body


class PageTests(SynchronousTestCase):
    """The /metrics page."""

    def setUp(self) -> None:
        self.metrics = GatewayMetrics()
        self.site = metrics_site(self.metrics.registry, Clock())

    def test_scrape(self) -> None:
        """GET /metrics answers the registry in the text format 0.0.4, which a Prometheus parser reads back."""
        log = Logger(namespace="gateway.frontend", observer=self.metrics.observe)
        log.info("login protocol={protocol} client={client} user={user} backend_ms={backend_ms:.1f}",
                 protocol="imap", client="192.0.2.7", user='"bob"', backend_ms=12.5)
        status, headers, body = http_get(self.site, b"GET /metrics HTTP/1.0\r\n\r\n")
        self.assertEqual(status, b"HTTP/1.0 200 OK")
        self.assertEqual(headers[b"content-type"], b"text/plain; version=0.0.4; charset=utf-8")
        self.assertEqual(headers[b"content-type"], CONTENT_TYPE.encode())
        values = {(s.name, tuple(sorted(s.labels.items()))): s.value
                  for family in text_string_to_metric_families(body.decode("utf-8")) for s in family.samples}
        self.assertEqual(values[("mailgateway_logins_total", (("protocol", "imap"), ("result", "ok")))], 1)
        self.assertEqual(values[("mailgateway_backend_login_seconds_sum", (("protocol", "imap"),))], 0.0125)

    def test_head(self) -> None:
        """HEAD /metrics answers the headers without a body."""
        status, headers, body = http_get(self.site, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        self.assertEqual(status, b"HTTP/1.0 200 OK")
        self.assertEqual(headers[b"content-type"], CONTENT_TYPE.encode())
        self.assertEqual(body, b"")

    def test_no_server_header(self) -> None:
        """No response names the server software: not a scrape, a 404, a 405 or an OPTIONS *."""
        for request in (b"GET /metrics HTTP/1.0\r\n\r\n", b"HEAD /metrics HTTP/1.0\r\n\r\n",
                        b"GET /other HTTP/1.0\r\n\r\n", b"DELETE /metrics HTTP/1.0\r\n\r\n",
                        b"OPTIONS * HTTP/1.0\r\n\r\n"):
            status, headers, _ = http_get(self.site, request)
            self.assertNotIn(b"server", headers, status)
            self.assertIn(b"date", headers)

    def test_other_paths(self) -> None:
        """Every other path is 404, a query string does not change /metrics, and other methods get 405."""
        for path in (b"/", b"/metrics/", b"/metrics/x", b"/metric", b"/favicon.ico", b"//metrics"):
            status, _, body = http_get(self.site, b"GET " + path + b" HTTP/1.0\r\n\r\n")
            self.assertEqual(status, b"HTTP/1.0 404 Not Found", path)
            self.assertNotIn(b"mailgateway_", body)
        self.assertEqual(http_get(self.site, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")[0], b"HTTP/1.0 200 OK")
        status, headers, _ = http_get(self.site, b"POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(status, b"HTTP/1.0 405 Method Not Allowed")
        self.assertEqual(headers[b"allow"], b"GET, HEAD")


class RequestDeadlineTests(SynchronousTestCase):
    """A request to the metrics listener must arrive in time, as on the web listeners."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.site = metrics_site(GatewayMetrics().registry, self.clock)
        peer = IPv4Address("TCP", "127.0.0.1", 40000)
        channel = self.site.buildProtocol(peer)
        assert channel is not None
        self.channel = channel
        self.transport = StringTransport(peerAddress=peer)
        channel.makeConnection(self.transport)
        self.addCleanup(lambda: self.assertEqual(self.clock.getDelayedCalls(), []))
        self.addCleanup(lambda: channel.connectionLost(Failure(ConnectionLost())))

    def test_trickled_request(self) -> None:
        """Headers sent a byte every 30 s (never idle for long) get a 408 a minute after their first byte, and a log line."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.channel.dataReceived(b"GET /metrics HTTP/1.1\r\nX-Pad: ")
        for _ in range(2):
            self.clock.advance(30)
            if not self.transport.disconnecting:
                self.channel.dataReceived(b"y")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 408 "))
        self.assertTrue(self.transport.disconnecting)
        self.channel.dataReceived(b"\r\n\r\n")
        self.assertEqual(self.transport.value().count(b"HTTP/1.1 "), 1)
        self.assertEqual([(e["log_format"], e["peer"]) for e in events if "peer" in e],
                         [("metrics_request_timeout peer={peer}", "127.0.0.1")])


class RequestBodyTests(SynchronousTestCase):
    """The metrics site reads no request body, and keeps no access log."""

    def setUp(self) -> None:
        self.site = metrics_site(GatewayMetrics().registry, Clock())
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert channel is not None
        self.channel = channel
        self.transport = StringTransport()
        channel.makeConnection(self.transport)
        self.addCleanup(lambda: channel.connectionLost(Failure(ConnectionLost())))

    def test_declared_body_refused_at_once(self) -> None:
        """A declared body gets a 413 before any of it is read, and no 100 Continue; the connection closes."""
        self.channel.dataReceived(b"POST /metrics HTTP/1.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                                  b"Content-Length: 67108864\r\nExpect: 100-continue\r\n\r\n")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertTrue(self.transport.disconnecting)
        self.channel.dataReceived(b"--x\r\n" + b"a" * 1_000_000)
        self.assertNotIn(b"100 Continue", self.transport.value())
        self.assertEqual(self.transport.value().count(b"HTTP/1.1 "), 1)
        (request,) = self.channel.requests
        self.assertIsNone(getattr(request, "content", None))

    def test_chunked_body_refused_at_once(self) -> None:
        """A chunked body gets a 413 before any of it is read."""
        self.channel.dataReceived(b"GET /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertTrue(self.transport.disconnecting)

    def test_unparsable_request_refused(self) -> None:
        """What twisted.web cannot parse gets a 400 with its length and Connection: close, and the connection closes."""
        self.channel.dataReceived(b"GET /metrics HTTP/1.1\r\nBroken header line\r\n\r\n")
        written = self.transport.value()
        self.assertTrue(written.startswith(b"HTTP/1.1 400 "), written)
        self.assertIn(b"\r\nContent-Length: 0\r\n", written)
        self.assertIn(b"\r\nConnection: close\r\n", written)
        self.assertTrue(self.transport.disconnecting)

    def test_no_access_log(self) -> None:
        """A scrape writes nothing to the log."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.site.doStart()
        self.addCleanup(self.site.doStop)
        self.channel.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 200 "))
        self.assertEqual([e.get("log_format") or e.get("message") for e in events], [])


class ServiceTests(SynchronousTestCase):
    """The metrics service: its listeners and its observation of the log."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.publisher = LogPublisher()
        self.metrics = GatewayMetrics()
        self.limits = ConnectionLimits(ConnectionRules(max_per_address=1))

    def build(self, *listen: str) -> MultiService:
        return build_metrics_service(MetricsSettings(listen), self.reactor, self.metrics, self.limits,
                                     config_path="/etc/mailgateway/mailgateway.toml", publisher=self.publisher)

    def test_listens_and_serves(self) -> None:
        """
        Each endpoint listens with a label the gateway's log and tests recognise, and serves the
        metrics site over the registry.
        """
        service = self.build("tcp:9101:interface=127.0.0.1", "tcp6:9101:interface=\\:\\:1")
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual([(port, interface) for port, _, _, interface in self.reactor.tcpServers],
                         [(9101, "127.0.0.1"), (9101, "::1")])
        labels = [child.label for child in service if isinstance(child, Listener)]
        self.assertEqual(labels, ["protocol=metrics tls=none endpoint=tcp:9101:interface=127.0.0.1",
                                  "protocol=metrics tls=none endpoint=tcp6:9101:interface=\\:\\:1"])
        factory = self.reactor.tcpServers[0][1]
        self.assertEqual(http_get(factory, b"GET /metrics HTTP/1.0\r\n\r\n")[0], b"HTTP/1.0 200 OK")

    def test_connections_limited(self) -> None:
        """
        A scrape's connection counts toward the gateway's connection limits while it lasts; one
        over them is closed unanswered.
        """
        service = self.build("tcp:9101:interface=127.0.0.1")
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        factory = self.reactor.tcpServers[0][1]
        held = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        held.makeConnection(StringTransport())
        self.assertEqual(self.limits.connections, 1)
        self.assertEqual(http_get(factory, b"GET /metrics HTTP/1.0\r\n\r\n")[0], b"")
        held.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(http_get(factory, b"GET /metrics HTTP/1.0\r\n\r\n")[0], b"HTTP/1.0 200 OK")
        self.assertEqual(self.limits.connections, 0)

    def test_observes_while_running(self) -> None:
        """Events published while the service runs are counted; before it starts and after it stops they are not."""
        service = self.build("tcp:0")
        log = Logger(namespace="gateway.frontend", observer=self.publisher)

        def http_probe() -> None:
            log.warn("http_on_mail_port protocol={protocol} client={client}", protocol="imap", client="192.0.2.7")

        http_probe()
        service.startService()
        http_probe()
        service.stopService()
        http_probe()
        self.assertEqual(sample(self.metrics, "mailgateway_http_probes_total", protocol="imap"), 1)

    def test_refused_endpoints(self) -> None:
        """A PROXY listener and an unusable description stop start-up with the file and the key named."""
        for description in ("haproxy:tcp:9101", "tcp:ninety"):
            with self.assertRaises(ConfigError) as caught:
                self.build(description)
            self.assertIn("/etc/mailgateway/mailgateway.toml: [metrics] listen: ", str(caught.exception))
            self.assertIn(repr(description), str(caught.exception))

    def test_log_observation(self) -> None:
        """LogObservation adds its observer on start and removes it on stop."""
        seen: list[dict[str, object]] = []
        observation = LogObservation(self.publisher, seen.append)
        observation.startService()
        self.publisher({"n": 1})
        observation.stopService()
        self.publisher({"n": 2})
        self.assertEqual(seen, [{"n": 1}])
