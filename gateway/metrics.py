"""
Prometheus metrics, derived from the gateway's log events and served on their own HTTP listener.

The protocol modules know nothing about metrics. L{GatewayMetrics.observe} is a
C{twisted.logger} observer. It reads the same stable events, with the same named fields, that
sysadmins and fail2ban read (C{connect}, C{login}, C{login_failed}, C{disconnect}, ...) and
counts them. If an event's shape changes, the tests here fail, just as the fail2ban test does.
The expiry time of each certificate is read from its chain file at every scrape, so a renewed
certificate shows at once, without a restart or a reload.

L{build_metrics_service} serves C{GET /metrics} in the Prometheus text format over plain HTTP,
on loopback by default: the numbers tell who logs in how often. Every other path is a 404.
A request with a body gets a 413 before any of the body is read, and the connection closes.
As on the web listeners (L{gateway.web.RequestDeadlineChannel}), a request must arrive within
L{gateway.web.REQUEST_DEADLINE} of its first byte or get a 408, and a connection silent for
L{gateway.web.REQUEST_TIMEOUT} closes. Responses name no server software.
"""

from __future__ import annotations

import collections
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import cast

from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.application.service import MultiService, Service
from twisted.logger import ILogObserver, LogEvent, Logger, LogPublisher, globalLogPublisher
from twisted.web.pages import errorPage, notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from gateway import __version__
from gateway.addresses import address_host
from gateway.config import MetricsSettings, TLSSettings
from gateway.connection_limits import ConnectionLimits
from gateway.listener import AdmittingFactory, listener
from gateway.web import REQUEST_TIMEOUT, RequestDeadlineChannel

log = Logger()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The content type of a scrape: the Prometheus text exposition format 0.0.4."""

BACKEND_LOGIN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Histogram buckets (seconds) for the backend login: a local Dovecot answers in milliseconds,
and a backend timeout lasts seconds."""

DEFAULT_CERTIFICATE = "default"
"""The C{certificate} label of the default certificate (the one served without a matching SNI name)."""

WORKER_PROTOCOLS = frozenset({"imap", "pop3", "submission"})
"""
The protocols a worker process serves (L{gateway.service.build_worker_service}: the mail
listeners only). An event from a worker naming another is not counted: each label value makes a
series the registry keeps for good, and a worker's events are not the supervisor's own.
"""

_Handler = Callable[[LogEvent], None]


class GatewayMetrics:
    """
    The gateway's metrics, in a registry of their own (never prometheus_client's global one,
    so that two gateways in one process, or two tests, never share counts).

    Feed it events with L{observe}, and say which certificates to watch with
    L{watch_certificates} and which processes with L{watch_processes}.

    :ivar registry: everything to expose; hand it to L{metrics_site}.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        # Which release answers: after an upgrade, has the running gateway been restarted?
        Info("mailgateway_build", "The running gateway's version.", registry=registry).info({"version": __version__})
        self._connections_open = Gauge(
            "mailgateway_connections_open", "Client connections open now (admitted ones; refused ones are never open).",
            ["protocol"], registry=registry)
        self._connections = Counter(
            "mailgateway_connections", "Client connections admitted, per listening port.",
            ["protocol", "listener"], registry=registry)
        self._logins = Counter(
            "mailgateway_logins",
            "Login attempts by outcome: ok, failed (bad credentials), refused (by the backend, e.g. POP3 IN-USE), "
            "unavailable (the backend failed).",
            ["protocol", "result"], registry=registry)
        self._limit_refusals = Counter(
            "mailgateway_limit_refusals",
            "Connections and logins refused by a limit: max_connections, max_connections_per_ip, max_sessions_per_user.",
            ["protocol", "limit"], registry=registry)
        self._throttle_windows = Counter(
            "mailgateway_throttle_windows",
            "Times a client address used up its failed logins and had its logins refused for the rest of the window.",
            registry=registry)
        self._backend_failures = Counter(
            "mailgateway_backend_failures",
            "Times the backend could not be reached or failed: at login, during a submission session, or at start.",
            ["protocol"], registry=registry)
        self._backend_login = Histogram(
            "mailgateway_backend_login_seconds", "Time from a verified login to the backend's session being ready.",
            ["protocol"], buckets=BACKEND_LOGIN_BUCKETS, registry=registry)
        self._bytes = Counter(
            "mailgateway_relayed_bytes",
            "Bytes to and from clients over ended connections: in from the client, out to the client.",
            ["protocol", "direction"], registry=registry)
        self._tls_handshakes = Counter(
            "mailgateway_tls_handshakes", "Completed TLS handshakes with clients, by version and cipher.",
            ["protocol", "version", "cipher"], registry=registry)
        self._timeouts = Counter(
            "mailgateway_timeouts",
            "Connections closed for taking too long: idle, login-deadline, relay-idle, transaction.",
            ["protocol", "reason"], registry=registry)
        self._http_probes = Counter(
            "mailgateway_http_probes", "Connections closed because the client spoke HTTP to a mail port.",
            ["protocol"], registry=registry)
        self._messages = Counter(
            "mailgateway_messages", "Messages submitted, by the class of the MTA's final reply (2xx, 4xx, 5xx).",
            ["result"], registry=registry)
        self._sender_rejections = Counter(
            "mailgateway_sender_rejections", "MAIL FROM addresses refused because the user may not send as them.",
            registry=registry)
        self._proxy_refusals = Counter(
            "mailgateway_proxy_refusals",
            "Connections refused on a PROXY protocol listener: untrusted source or no valid header.",
            ["reason"], registry=registry)
        self._reloads = Counter(
            "mailgateway_reloads", "Configuration reloads (SIGHUP): ok, or failed and kept the running one.",
            ["result"], registry=registry)
        self._event_errors = Counter(
            "mailgateway_metrics_event_errors",
            "Gateway log events the metrics could not read (a field missing or of an unexpected type).",
            registry=registry)
        self._certificates = _CertificateCollector()
        registry.register(self._certificates)
        self._processes = _ProcessesCollector()
        registry.register(self._processes)
        self._handlers: dict[tuple[str, str], _Handler] = {
            ("gateway.frontend", "connect"): self._connect,
            ("gateway.frontend", "disconnect"): self._disconnect,
            ("gateway.frontend", "tls"): self._tls,
            ("gateway.frontend", "login"): self._login,
            ("gateway.frontend", "login_failed"): self._result("failed"),
            ("gateway.frontend", "backend_refused"): self._result("refused"),
            ("gateway.frontend", "backend_unavailable"): self._login_unavailable,
            ("gateway.frontend", "connection_refused"): self._connection_refused,
            ("gateway.listener", "connection_refused"): self._connection_refused,
            ("gateway.frontend", "too_many_sessions"): self._too_many_sessions,
            ("gateway.frontend", "timeout"): self._timeout,
            ("gateway.frontend", "http_on_mail_port"): self._http_probe,
            ("gateway.penalties", "login_throttled"): self._throttled,
            ("gateway.submission", "message"): self._message,
            ("gateway.submission", "sender_rejected"): self._sender_rejected,
            ("gateway.submission", "backend_unavailable"): self._backend_failed,
            ("gateway.submission", "timeout"): self._timeout,
            ("gateway.service", "backend_unavailable"): self._backend_failed,
            ("gateway.service", "reloaded"): self._reload("ok"),
            ("gateway.service", "reload_failed"): self._reload("failed"),
            ("gateway.proxy_protocol", "proxy_refused"): self._proxy_refused,
            ("gateway.worker_channel", "worker_channel_closed"): self._worker_gone,
        }
        # Connections open per (worker process, protocol): what a worker that dies had open is
        # dropped, since it never logs those disconnects. None is the process itself.
        self._open: collections.Counter[tuple[int | None, str]] = collections.Counter()

    def observe(self, event: LogEvent) -> None:
        """
        Update the metrics from one log event; an C{ILogObserver}. Events that are not the
        gateway's are ignored. It never raises: an event it cannot read counts in
        C{mailgateway_metrics_event_errors_total}.
        """
        try:
            namespace, log_format = event.get("log_namespace"), event.get("log_format")
            if not isinstance(namespace, str) or not isinstance(log_format, str):
                return
            handler = self._handlers.get((namespace, log_format.split(" ", 1)[0]))
            if handler is None:
                return
            if "log_worker" in event:
                _check_worker_event(event)
            handler(event)
        except Exception:
            # An observer that raises would disturb logging itself; count the problem instead.
            self._event_errors.inc()

    def watch_certificates(self, paths: Iterable[tuple[str, str]]) -> None:
        """
        Expose the expiry time of these certificates from now on, instead of the ones watched
        before. Each chain file is read at every scrape. While a file cannot be read or parsed,
        its series is absent and C{mailgateway_certificate_read_errors_total} counts up.

        :param paths: (name for the C{certificate} label, path of the PEM chain, leaf first).
        """
        self._certificates.watched = tuple(dict.fromkeys(paths))

    def watch_processes(self, processes: Callable[[], Iterable[tuple[str, int]]]) -> None:
        """
        Expose the C{process_*} metrics of these processes, in place of this one's alone (as
        C{process="gateway"}): with workers, the supervisor's and each worker's.

        :param processes: called at each scrape: (name for the C{process} label, process id).
        """
        self._processes.processes = processes

    # -- event handlers; a missing field raises, and observe counts it

    def _connect(self, event: LogEvent) -> None:
        protocol = event_value(event, "protocol")
        self._connections.labels(protocol, event_value(event, "listener")).inc()
        self._connections_open.labels(protocol).inc()
        self._open[(event.get("log_worker"), protocol)] += 1

    def _disconnect(self, event: LogEvent) -> None:
        protocol = event_value(event, "protocol")
        bytes_in, bytes_out = int(event["bytes_in"]), int(event["bytes_out"])
        key = (event.get("log_worker"), protocol)
        if self._open[key] > 0:
            self._open[key] -= 1
            self._connections_open.labels(protocol).dec()
        self._bytes.labels(protocol, "in").inc(bytes_in)
        self._bytes.labels(protocol, "out").inc(bytes_out)

    def _tls(self, event: LogEvent) -> None:
        labels = (event_value(event, name) for name in ("protocol", "version", "cipher"))
        self._tls_handshakes.labels(*labels).inc()

    def _login(self, event: LogEvent) -> None:
        protocol, seconds = event_value(event, "protocol"), float(event["backend_ms"]) / 1000
        self._logins.labels(protocol, "ok").inc()
        self._backend_login.labels(protocol).observe(seconds)

    def _result(self, result: str) -> _Handler:
        def count(event: LogEvent) -> None:
            self._logins.labels(event_value(event, "protocol"), result).inc()
        return count

    def _login_unavailable(self, event: LogEvent) -> None:
        protocol = event_value(event, "protocol")
        self._logins.labels(protocol, "unavailable").inc()
        self._backend_failures.labels(protocol).inc()

    def _backend_failed(self, event: LogEvent) -> None:
        self._backend_failures.labels(event_value(event, "protocol")).inc()

    def _connection_refused(self, event: LogEvent) -> None:
        self._limit_refusals.labels(event_value(event, "protocol"), event_value(event, "limit")).inc()

    def _too_many_sessions(self, event: LogEvent) -> None:
        self._limit_refusals.labels(event_value(event, "protocol"), "max_sessions_per_user").inc()

    def _timeout(self, event: LogEvent) -> None:
        self._timeouts.labels(event_value(event, "protocol"), event_value(event, "reason")).inc()

    def _http_probe(self, event: LogEvent) -> None:
        self._http_probes.labels(event_value(event, "protocol")).inc()

    def _throttled(self, event: LogEvent) -> None:
        self._throttle_windows.inc()

    def _message(self, event: LogEvent) -> None:
        self._messages.labels(f"{int(event['code']) // 100}xx").inc()

    def _sender_rejected(self, event: LogEvent) -> None:
        self._sender_rejections.inc()

    def _proxy_refused(self, event: LogEvent) -> None:
        self._proxy_refusals.labels(event_value(event, "reason")).inc()

    def _reload(self, result: str) -> _Handler:
        def count(event: LogEvent) -> None:
            if "log_worker" not in event:  # one reload of the gateway, however many workers follow it
                self._reloads.labels(result).inc()
        return count

    def _worker_gone(self, event: LogEvent) -> None:
        if "log_worker" in event:
            return  # only the supervisor says a worker has gone (its channel drops such events too)
        worker = int(event["pid"])  # the worker's process, which its events' log_worker names
        for key in [key for key in self._open if key[0] == worker]:
            self._connections_open.labels(key[1]).dec(self._open.pop(key))


def _check_worker_event(event: LogEvent) -> None:
    """
    Check an event from a worker before it is counted.

    :raises ValueError: when it names a protocol no worker serves (L{WORKER_PROTOCOLS}).
    """
    try:
        protocol = event_value(event, "protocol")
    except KeyError:
        return  # the handler decides whether it needs one
    if protocol not in WORKER_PROTOCOLS:
        raise ValueError(f"a worker's event for protocol {protocol[:64]!r}")


_LITERAL = re.compile(r"(?:^| )(\w+)=([^{\s][^\s]*)")


def event_value(event: LogEvent, name: str) -> str:
    """
    One named value of a gateway log event, as text: its field, or else the value written into
    its format (C{protocol=submission}, C{reason=login-deadline} are literal in some formats).

    :raises KeyError: when the event has neither.
    """
    if name in event:
        return str(event[name])
    for key, value in _LITERAL.findall(event.get("log_format", "")):
        if key == name:
            return value
    raise KeyError(name)


class _CertificateCollector(Collector):
    """Reads the watched certificate chains at each scrape."""

    def __init__(self) -> None:
        self.watched: tuple[tuple[str, str], ...] = ()
        self._errors: dict[tuple[str, str], int] = {}

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        expiry, errors = self._families()
        for name, path in self.watched:
            try:
                expiry.add_metric([name, path], certificate_expiry(path))
            except (OSError, ValueError):
                self._errors[name, path] = self._errors.get((name, path), 0) + 1
        for name, path in self.watched:
            errors.add_metric([name, path], self._errors.get((name, path), 0))
        yield expiry
        yield errors

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, CounterMetricFamily]:
        labels = ["certificate", "path"]
        return (GaugeMetricFamily("mailgateway_certificate_expiry_timestamp_seconds",
                                  "When the leaf certificate of a served chain expires (Unix time).", labels=labels),
                CounterMetricFamily("mailgateway_certificate_read_errors",
                                    "Scrapes at which a certificate chain file could not be read or parsed.",
                                    labels=labels))


class _ProcessesCollector(Collector):
    """
    The standard C{process_*} metrics (CPU time, memory, open descriptors and their limit, start
    time), read from C{/proc} at each scrape by prometheus_client's own collector, for each of the
    gateway's processes: a worker holds sessions, and runs out of descriptors, on its own.
    """

    def __init__(self) -> None:
        self.processes: Callable[[], Iterable[tuple[str, int]]] = lambda: (("gateway", os.getpid()),)

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for name, pid in self.processes():
            for family in _process_families(pid):
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for found in family.samples:
                    merged.add_sample(found.name, {**found.labels, "process": name}, found.value)
        yield from families.values()


def _process_families(pid: int, proc: str = "/proc") -> Iterable[Metric]:
    """One process's C{process_*} families; a process gone since it was listed has none (or only some)."""
    return _BootTimeFromClock(pid=lambda: pid, proc=proc, registry=None).collect()


class _BootTimeFromClock(ProcessCollector):
    """
    prometheus_client's collector, with the boot time (for C{process_start_time_seconds}) from the
    clocks instead of C{/proc/stat}: the unit's C{ProcSubset=pid} hides that file, and the collector
    would then report nothing at all.
    """

    def _boot_time(self) -> float:
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def certificate_expiry(path: str) -> float:
    """
    The expiry time of the first (leaf) certificate in a PEM chain file.

    :returns: seconds since the Unix epoch.
    :raises OSError: when the file cannot be read.
    :raises ValueError: when it holds no PEM certificate.
    """
    with open(path, "rb") as f:
        chain = x509.load_pem_x509_certificates(f.read())
    return chain[0].not_valid_after_utc.timestamp()


def certificates_to_watch(tls: TLSSettings, default_chain: str) -> tuple[tuple[str, str], ...]:
    """
    The certificates a configuration serves, for L{GatewayMetrics.watch_certificates}: the
    default chain as C{default}, then each SNI chain under its first host name.

    :param default_chain: the default chain's path (configured or self-signed).
    """
    return ((DEFAULT_CERTIFICATE, default_chain),) + tuple((entry.names[0], entry.certificate) for entry in tls.sni)


class _OnlyChildren(Resource):
    """A resource whose fixed children are the only paths below it; all others are 404."""

    def getChild(self, path: bytes, request: Request) -> IResource:
        return notFound()


class MetricsPage(_OnlyChildren):
    """C{GET /metrics}: the registry in the Prometheus text format (HEAD alike; other methods get 405)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render(self, request: Request) -> object:
        # Twisted's own 405 page is deprecated; this one says the same.
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", b"GET, HEAD")
            return errorPage(405, "Method Not Allowed", "Only GET and HEAD are served here.").render(request)
        return super().render(request)

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE.encode("ascii"))
        return generate_latest(self._registry)


class _BodilessChannel(RequestDeadlineChannel):
    """
    An HTTP/1.1 connection whose requests may not have a body (nothing here reads one), and
    must arrive in time.
    """

    def allHeadersReceived(self) -> None:
        """Refuse a request with a body before any of it arrives (twisted.web hook)."""
        if self.length != 0:  # a Content-Length above 0, or chunked (None)
            # twisted.web would read the whole body (into memory or a file) before the 405.
            self.refuse(413, "body")
            return
        super().allHeadersReceived()

    def request_refused(self, code: int, reason: str) -> None:
        if reason == "deadline":
            log.info("metrics_request_timeout peer={peer}", peer=address_host(self.getPeer()))


class _MetricsSite(Site):
    """The site of a metrics listener: no request body, no access log."""

    protocol = _BodilessChannel  # type: ignore[assignment]
    noisy = False

    def log(self, request: object) -> None:
        """Write no access log line: a scrape every few seconds would bury the gateway's own events."""


def metrics_site(registry: CollectorRegistry, reactor: object) -> Site:
    """
    The HTTP site of a metrics listener: C{/metrics} and nothing else. It reads no request body,
    gives each request a deadline, and writes no access log.

    :param reactor: for the HTTP timeouts.
    """
    root = _OnlyChildren()
    root.putChild(b"metrics", MetricsPage(registry))
    return _MetricsSite(root, parsePOSTFormSubmission=False,
                        timeout=REQUEST_TIMEOUT, reactor=reactor)


class LogObservation(Service):
    """Hands every event of a log publisher to an observer while the service runs."""

    def __init__(self, publisher: LogPublisher, observer: ILogObserver) -> None:
        self._publisher = publisher
        self._observer = observer

    def startService(self) -> None:
        super().startService()
        self._publisher.addObserver(self._observer)

    def stopService(self) -> None:
        super().stopService()
        self._publisher.removeObserver(self._observer)


def build_metrics_service(settings: MetricsSettings, reactor: object, metrics: GatewayMetrics,
                          limits: ConnectionLimits, *, config_path: str,
                          publisher: LogPublisher = globalLogPublisher) -> MultiService:
    """
    The metrics listeners, and the observation of the log events that feed C{metrics}, as
    one service. Each listener's label starts with C{protocol=metrics tls=none endpoint=}.

    :param reactor: the running reactor.
    :param limits: the gateway's connection counts, which every scrape's connection joins while it lasts.
    :param config_path: the configuration file, named in errors.
    :param publisher: where the gateway's log events are published.
    :raises ConfigError: when a listener is behind C{haproxy:} or not a usable endpoint description.
    """
    top = MultiService()
    LogObservation(publisher, cast(ILogObserver, metrics.observe)).setServiceParent(top)
    site = AdmittingFactory(metrics_site(metrics.registry, reactor), limits, "metrics")
    for description in settings.listen:
        listener(reactor, description, site, label="protocol=metrics tls=none", key="[metrics] listen",
                 config_path=config_path, proxy_sources=None).setServiceParent(top)
    return top
