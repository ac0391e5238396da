"""
Wiring: builds the gateway's service tree from validated settings.

This is the only module that knows how the pieces fit together: the hashing thread pool, the
authenticator, the TLS contexts, the backend connectors and one listener per configured
endpoint. With several workers it builds two trees: the supervisor's (the listening sockets,
the shared gatekeeper, the worker processes, web and metrics) and each worker's (the mail
front ends, accepting on the sockets the supervisor holds).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial

from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from gateway.auth import Authenticator, HashingPool
from gateway.backend import BackendConnector, LoginFactory
from gateway.config import (
    ConfigError,
    Limits,
    ProtocolSettings,
    Settings,
    SubmissionSettings,
    load_settings,
)
from gateway.connection_limits import ConnectionLimits, ConnectionRules
from gateway.descriptors import descriptors_needed, raise_descriptor_limit
from gateway.frontend import FrontEndContext, FrontEndFactory, LoginFrontEnd
from gateway.gatekeeper import Gatekeeper, LocalGatekeeper
from gateway.idle import IdleSessions
from gateway.imap import ImapFrontEnd
from gateway.listener import Listener, listener
from gateway.metrics import GatewayMetrics, build_metrics_service, certificates_to_watch
from gateway.imap_backend import ImapBackendLogin
from gateway.penalties import LoginPenalties, PenaltyRules
from gateway.pop3 import Pop3FrontEnd
from gateway.pop3_backend import Pop3BackendLogin
from gateway.senders import SenderPolicy, SendersFileError
from gateway.smtp_backend import SmtpBackend
from gateway.submission import AUTH_LINE_LIMIT, SubmissionFrontEnd
from gateway.tls import ServerTLS, TLSError, ensure_self_signed
from gateway.userdb import UserDatabase, UserFileError, self_test
from gateway.web import WebState, build_web_service
from gateway.workers import WorkerPool

log = Logger()


class CapabilityProbe(Service):
    """
    Asks a backend what it offers before login, once at start, so that the first clients are
    promised only what the backend does. Every later login refreshes what is known.
    """

    def __init__(self, backend: BackendConnector, protocol: str) -> None:
        self._backend = backend
        self._protocol = protocol
        self._probing: Deferred[tuple[bytes, ...]] | None = None

    def startService(self) -> None:
        super().startService()
        self._probing = self._backend.probe()
        self._probing.addCallbacks(self._learned, self._failed)

    def stopService(self) -> None:
        super().stopService()
        if self._probing is not None:
            self._probing.cancel()

    def _learned(self, capabilities: tuple[bytes, ...]) -> None:
        log.info("backend_capabilities protocol={protocol} backend={backend} capabilities={capabilities}",
                 protocol=self._protocol, backend=self._backend.address,
                 capabilities=" ".join(c.decode("ascii", "replace") for c in capabilities))

    def _failed(self, failure: Failure) -> None:
        if not failure.check(CancelledError):
            log.warn("backend_unavailable protocol={protocol} backend={backend} reason={reason}",
                     protocol=self._protocol, backend=self._backend.address, reason=failure.getErrorMessage())


def penalty_rules(settings: Settings) -> PenaltyRules:
    """The login penalty rules a configuration asks for."""
    auth, limits = settings.auth, settings.limits
    return PenaltyRules(base_delay=auth.failure_delay, max_delay=auth.failure_delay_max,
                        ip_budget=auth.ip_failure_budget, user_free=auth.user_failures_free,
                        window=auth.failure_window, ipv6_prefix=auth.ipv6_prefix, trusted=limits.trusted_networks)


def connection_rules(settings: Settings) -> ConnectionRules:
    """The connection limits a configuration asks for."""
    limits = settings.limits
    return ConnectionRules(max_connections=limits.max_connections, max_per_address=limits.max_connections_per_ip,
                           max_sessions_per_user=limits.max_sessions_per_user, trusted=limits.trusted_networks,
                           ipv6_prefix=settings.auth.ipv6_prefix)


def protocol_limits(settings: Settings, protocol: str) -> Limits:
    """The pre-login limits of one protocol: submission's AUTH lines may be longer (RFC 4954)."""
    if protocol == "submission":
        return replace(settings.limits, line_length=AUTH_LINE_LIMIT)
    return settings.limits


def certificate_files(settings: Settings) -> tuple[str, str]:
    """The default certificate chain and key: the configured ones, or the self-signed ones."""
    if not settings.tls.self_signed:
        assert settings.tls.certificate is not None and settings.tls.private_key is not None
        return settings.tls.certificate, settings.tls.private_key
    try:
        return ensure_self_signed(settings.state_dir, settings.hostname)
    except (TLSError, OSError) as e:
        raise ConfigError(f"{settings.path}: [tls] self_signed: cannot create a certificate in "
                          f"[gateway] state_dir: {e}") from None


TICKET_KEY_LIFETIME = 12 * 3600.0
"""Seconds between rebuilds of the TLS contexts, which gives them new session ticket keys."""


class Reloader(Service):
    """
    On SIGHUP (systemctl reload) re-reads the configuration: certificates (default and SNI),
    limits and login penalty rules. New connections get them; established sessions go on
    undisturbed. A broken file or configuration changes nothing and is logged as an error.
    (The users and senders files are re-read by themselves whenever they change.)

    Every L{TICKET_KEY_LIFETIME} it also rebuilds the TLS contexts from the files in use: OpenSSL
    makes new session ticket keys with each context, so a stolen ticket key opens only a few
    hours of recorded sessions, while clients still resume within that time.
    """

    def __init__(self, reactor: IReactorFromThreads, settings: Settings, metrics: GatewayMetrics | None = None) -> None:
        """:param settings: the running configuration: its file is re-read, and its listeners must stay."""
        self._reactor = reactor
        self._metrics = metrics
        self._path = settings.path
        self._listeners = mail_endpoints(settings)
        self._served: list[tuple[ServerTLS, FrontEndFactory]] = []
        self._web: list[tuple[ServerTLS, WebState]] = []
        self._followers: list[Callable[[Settings], object]] = []
        self._previous_handler: object = None
        self._rotation = LoopingCall(self.rotate_ticket_keys)
        self._rotation.clock = reactor  # type: ignore[assignment]

    def serve(self, server_tls: ServerTLS, factory: FrontEndFactory) -> None:
        """Keep a listener's TLS and factory up to date on reload."""
        self._served.append((server_tls, factory))

    def serve_web(self, server_tls: ServerTLS, state: WebState) -> None:
        """Keep the web listeners' TLS and documents up to date on reload."""
        self._web.append((server_tls, state))

    def follow(self, apply: Callable[[Settings], object]) -> None:
        """Call C{apply} with every configuration that reloads well (the gatekeeper's rules, the workers)."""
        self._followers.append(apply)

    def _contexts(self) -> list[ServerTLS]:
        return [tls for tls, _ in self._served] + [tls for tls, _ in self._web]

    def startService(self) -> None:
        super().startService()
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGHUP, self._hangup)
        self._rotation.start(TICKET_KEY_LIFETIME, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._rotation.running:
            self._rotation.stop()
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)  # type: ignore[arg-type]

    def _hangup(self, signum: int, frame: object) -> None:
        # A signal handler may not touch the reactor's state; this hands the work to it.
        self._reactor.callFromThread(self.reload)

    def rotate_ticket_keys(self) -> None:
        """Rebuild every TLS context from the files in use (new ticket keys)."""
        for server_tls in self._contexts():
            try:
                server_tls.reload()
            except TLSError as e:
                log.error("ticket_key_rotation_failed reason={reason}: keeping the running contexts", reason=str(e))
                return
        log.info("ticket_keys_rotated contexts={count}", count=len(self._contexts()))

    def reload(self) -> None:
        """Re-read the configuration and apply what can change without a restart."""
        try:
            settings = load_settings(self._path)
            if mail_endpoints(settings) != self._listeners:
                raise ConfigError(f"{self._path}: [imap], [pop3] and [submission] listeners: expected the running "
                                  "ones (restart to change listeners)")
            if self._web and settings.web is None:
                raise ConfigError(f"{self._path}: [web]: expected the section while the web listeners run "
                                  "(restart to remove them)")
            certificate, key = certificate_files(settings)
            for server_tls in self._contexts():
                server_tls.reload(certificate, key, settings.tls.sni)
        except (ConfigError, TLSError) as e:
            log.error("reload_failed reason={reason}: keeping the running configuration", reason=str(e))
            return
        for apply in self._followers:
            apply(settings)
        for _, state in self._web:
            state.update(settings)
        if self._metrics is not None:
            self._metrics.watch_certificates(certificates_to_watch(settings.tls, certificate))
        for _, factory in self._served:
            factory.context = replace(factory.context, limits=protocol_limits(settings, factory.context.protocol))
        log.info("reloaded path={path} certificates={count}", path=self._path,
                 count=1 + sum(len(entry.names) for entry in settings.tls.sni))


def build_service(settings: Settings, reactor: object) -> MultiService:
    """
    Build everything the configuration asks for: one process, or the supervisor of
    C{settings.workers} worker processes.

    :param reactor: the running reactor (twistd's); every part gets it injected.
    :raises ConfigError: when a file named by the configuration cannot be used.
    """
    provide_descriptors(settings)  # before the workers start: they inherit the limit
    top = MultiService()
    gatekeeper = LocalGatekeeper(ConnectionLimits(connection_rules(settings)),
                                 LoginPenalties(reactor, penalty_rules(settings)))  # type: ignore[arg-type]
    certificate, key = certificate_files(settings)
    metrics = None
    if settings.metrics is not None:
        metrics = GatewayMetrics()
        metrics.watch_certificates(certificates_to_watch(settings.tls, certificate))
        build_metrics_service(settings.metrics, reactor, metrics, gatekeeper.connections,
                              config_path=settings.path).setServiceParent(top)
    reloader = Reloader(reactor, settings, metrics)  # type: ignore[arg-type]
    reloader.setServiceParent(top)
    reloader.follow(provide_descriptors)
    reloader.follow(partial(_new_rules, gatekeeper))
    if settings.workers == 1:
        _build_mail(settings, reactor, gatekeeper, reloader, top)
    else:
        idle = Factory()
        idle.noisy = False
        held = _mail_listeners(settings, reactor, lambda name, kind: idle, held=True)
        for each in held:
            each.setServiceParent(top)
        pool = WorkerPool(reactor, settings, gatekeeper, held)  # type: ignore[arg-type]
        pool.setServiceParent(top)
        reloader.follow(pool.reload)
    if settings.web is not None:
        try:
            web_tls = ServerTLS(certificate, key, b"http/1.1", settings.tls.sni)
        except TLSError as e:
            raise ConfigError(f"{settings.path}: [tls]: {e}") from None
        web_state = WebState(settings)
        build_web_service(settings.web, reactor, web_tls, web_state, gatekeeper.connections).setServiceParent(top)
        reloader.serve_web(web_tls, web_state)
    return top


def build_worker_service(settings: Settings, reactor: object, gatekeeper: Gatekeeper,
                         inherited: list[int]) -> MultiService:
    """
    Build one worker process: the mail front ends, accepting on the listening sockets the
    supervisor passed down (in the order of L{mail_endpoints}).

    :raises ConfigError: when a file named by the configuration cannot be used.
    """
    provide_descriptors(settings)
    top = MultiService()
    reloader = Reloader(reactor, settings)  # type: ignore[arg-type]
    reloader.setServiceParent(top)
    reloader.follow(provide_descriptors)
    _build_mail(settings, reactor, gatekeeper, reloader, top, inherited)
    return top


def provide_descriptors(settings: Settings) -> None:
    """
    Raise the limit on open descriptors to what C{max_connections} needs; if the hard limit is
    lower, say so, since connections past it would fail.
    """
    needed = descriptors_needed(settings.limits.max_connections)
    limit = raise_descriptor_limit(needed)
    if limit < needed:
        log.warn("descriptor_limit limit={limit} needed={needed} max_connections={max_connections}: "
                 "raise LimitNOFILE (systemd) or ulimit -n, or lower max_connections",
                 limit=limit, needed=needed, max_connections=settings.limits.max_connections)


def _new_rules(gatekeeper: LocalGatekeeper, settings: Settings) -> None:
    gatekeeper.penalties.rules = penalty_rules(settings)
    gatekeeper.connections.rules = connection_rules(settings)


def _mail_protocols(settings: Settings) -> list[tuple[str, bytes, ProtocolSettings | SubmissionSettings | None,
                                                      Callable[[FrontEndContext], LoginFrontEnd], LoginFactory, bool]]:
    """
    Per protocol: name, ALPN, settings, front end, backend dialogue, and whether to learn the
    backend's pre-login capabilities at start (POP3 CAPA and SMTP EHLO promise them before login).
    """
    protocols: list[tuple[str, bytes, ProtocolSettings | SubmissionSettings | None,
                          Callable[[FrontEndContext], LoginFrontEnd], LoginFactory, bool]] = [
        ("imap", b"imap", settings.imap, ImapFrontEnd, ImapBackendLogin, False),
        ("pop3", b"pop3", settings.pop3, Pop3FrontEnd, Pop3BackendLogin, True),
    ]
    if settings.submission is not None:
        rules = settings.submission
        try:
            senders = SenderPolicy(rules.senders_file)
        except SendersFileError as e:
            raise ConfigError(f"{settings.path}: [submission] senders_file: {e}") from None
        protocols.append((
            "submission", b"smtp", rules,
            lambda context: SubmissionFrontEnd(context, rules, senders),
            partial(SmtpBackend, ehlo_name=settings.hostname), True,
        ))
    return protocols


def mail_endpoints(settings: Settings) -> list[tuple[str, str, str]]:
    """Every mail listener as (protocol, C{implicit_tls} or C{starttls}, description), in a fixed order."""
    return [(name, kind, description)
            for name, protocol in (("imap", settings.imap), ("pop3", settings.pop3), ("submission", settings.submission))
            if protocol is not None
            for kind, descriptions in (("implicit_tls", protocol.implicit_tls), ("starttls", protocol.starttls))
            for description in descriptions]


def _build_mail(settings: Settings, reactor: object, gatekeeper: Gatekeeper, reloader: Reloader,
                top: MultiService, inherited: Sequence[int] | None = None) -> None:
    """The mail front ends and their listeners, listening anew or on C{inherited} sockets."""
    factories: dict[tuple[str, str], Factory] = {}
    hashing = HashingPool(settings.auth.hash_threads)
    hashing.setServiceParent(top)
    users = None
    if settings.auth.mode == "local":
        assert settings.auth.users_file is not None
        try:
            users = UserDatabase(settings.auth.users_file)
        except UserFileError as e:
            raise ConfigError(f"{settings.path}: [auth] users_file: {e}") from None
        self_test()
    authenticator = Authenticator(reactor, hashing.pool, users)  # type: ignore[arg-type]
    certificate, key = certificate_files(settings)
    idle = IdleSessions(reactor)  # type: ignore[arg-type]
    for name, alpn, protocol, front_end, backend_login, probe in _mail_protocols(settings):
        if protocol is None:
            continue
        try:
            server_tls = ServerTLS(certificate, key, alpn, settings.tls.sni)
            backend = BackendConnector(reactor, protocol.backend, backend_login)  # type: ignore[arg-type]
        except TLSError as e:
            raise ConfigError(f"{settings.path}: [tls] or [{name}.backend]: {e}") from None
        if probe:
            CapabilityProbe(backend, name).setServiceParent(top)
        for implicit in (True, False):
            context = FrontEndContext(name, reactor, protocol_limits(settings, name), server_tls,  # type: ignore[arg-type]
                                      implicit, authenticator, backend, settings.hostname, gatekeeper, idle)
            front_factory = FrontEndFactory(front_end, context)
            reloader.serve(server_tls, front_factory)
            factory: Factory = front_factory
            if implicit:
                factory = TLSMemoryBIOFactory(server_tls, False, factory)
                factory.noisy = False
            factories[(name, "implicit_tls" if implicit else "starttls")] = factory
    for each in _mail_listeners(settings, reactor, lambda name, kind: factories[(name, kind)], inherited=inherited):
        each.setServiceParent(top)


def _mail_listeners(settings: Settings, reactor: object, factory: Callable[[str, str], Factory], *,
                    inherited: Sequence[int] | None = None, held: bool = False) -> list[Listener]:
    """
    One listener per L{mail_endpoints} entry, in that order.

    :param factory: the factory for a protocol and C{implicit_tls} or C{starttls}.
    :param inherited: the descriptors a worker was given, one per entry.
    :param held: bound for workers by the supervisor, which does not accept on them.
    """
    return [listener(reactor, description, factory(name, kind),
                     label=f"protocol={name} tls={kind}" + (" held_for=workers" if held else ""),
                     key=f"[{name}] {kind}", config_path=settings.path, proxy_sources=settings.limits.proxy_sources,
                     inherited=None if inherited is None else inherited[index], accepting=not held)
            for index, (name, kind, description) in enumerate(mail_endpoints(settings))]
