"""
Wiring: builds the gateway's service tree from validated settings.

This is the only module that knows how the pieces fit together: the hashing thread pool, the
authenticator, the TLS contexts, the backend connectors and one listener per configured
endpoint. With several workers it builds two trees: the supervisor's (the listening sockets,
the shared gatekeeper, the worker processes, web and metrics) and each worker's (the mail
front ends, accepting on the sockets the supervisor holds).
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import fields, is_dataclass, replace
from functools import partial
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.internet.interfaces import IProtocolFactory, IReactorFromThreads
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
    clear_text_backends,
    load_settings,
    mail_endpoints,
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
from gateway.proxy_protocol import TrustedProxyFactory
from gateway.senders import SenderPolicy, SendersFileError
from gateway.smtp_backend import RefusedEhloNames, SmtpBackend
from gateway.submission import AUTH_LINE_LIMIT, SubmissionFrontEnd
from gateway.shutdown import STOP_MARGIN, OpenConnections
from gateway.systemd_notify import ReadyNotice, StopNotice, notify, notify_status
from gateway.tls import (
    ListenerTLS,
    ServerTLS,
    TLSError,
    TLSFiles,
    ensure_self_signed,
    self_signed_paths,
    warn_of_validity,
)
from gateway.userdb import UserDatabase, UserFileError, self_test
from gateway.web import WebState, build_web_service
from gateway.workers import WorkerPool

log = Logger()


class CapabilityProbe(Service):
    """
    Asks a backend what it offers before login, once at start: the first POP3 and submission
    clients are promised only what the backend does (CAPA and EHLO list it before login; every
    later login refreshes what is known), and a backend that does not answer is said at start
    (C{backend_unavailable}), not first by a client's temporary error.
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


def certificate_files(settings: Settings, renew: bool = True) -> tuple[str, str]:
    """
    The default certificate chain and key: the configured ones, or the self-signed ones, made
    (anew, near their end) unless C{renew} is false: a worker uses the pair its supervisor made,
    since two processes writing the pair at once could leave a certificate and key that do not match.
    """
    if not settings.tls.self_signed:
        assert settings.tls.certificate is not None and settings.tls.private_key is not None
        return settings.tls.certificate, settings.tls.private_key
    if not renew:
        return self_signed_paths(settings.state_dir, settings.hostname)
    try:
        return ensure_self_signed(settings.state_dir, settings.hostname)
    except (TLSError, OSError) as e:
        raise ConfigError(f"{settings.path}: [tls] self_signed: cannot create a certificate in "
                          f"[gateway] state_dir: {e}") from None


def check_tls(files: TLSFiles) -> None:
    """
    Build the TLS the listeners would build from C{files}, and throw it away: for a process that
    serves none itself (a supervisor of workers).

    :raises TLSError: when a file cannot be used.
    """
    ServerTLS(files.certificate, files.private_key, b"imap", files.sni)


def tls_files(settings: Settings, renew: bool = True) -> TLSFiles:
    """The TLS files a configuration names: see L{certificate_files} for the default ones."""
    certificate, key = certificate_files(settings, renew)
    return TLSFiles(certificate, key, settings.tls.sni)


def warn_of_certificates(settings: Settings, files: TLSFiles) -> None:
    """Log the certificates served from C{files} that are expired, not valid yet, or near their end."""
    paths = [entry.certificate for entry in files.sni]
    if not settings.tls.self_signed:  # the self-signed one is made anew well before its end (certificate_files)
        paths.insert(0, files.certificate)
    warn_of_validity(paths)


_RELOADED_AUTH = ("failure_delay", "failure_delay_max", "ip_failure_budget", "user_failures_free",
                  "failure_window", "ipv6_prefix")
"""The C{[auth]} keys a reload applies: those of the login penalty and connection rules (L{penalty_rules})."""

_RELOADED_WEB = ("public_host", "hsts_max_age", "upstream", "autoconfig_username", "acme_webroot")
"""The C{[web]} keys a reload applies: what L{WebState} serves, from the next request on."""

_LISTENER_KEYS = ("implicit_tls", "starttls", "https", "http", "listen")
"""The keys of listeners (mail, web, metrics), which a reload failure names as such."""

_KEY_NAMES = {"master_password": "master_password_file", "workers_setting": "workers"}
"""The configuration keys of the settings that are not named as their key."""


def _as_reloaded(settings: Settings, running: Settings) -> Settings:
    """
    C{settings} with all that a reload applies taken from C{running}: the certificates (and the
    state directory of self-signed ones), every C{[limits]} key (the front ends' limits, the
    connection rules, C{proxy_sources}), the login penalty rules and what the web sites serve.

    Everything else takes a restart, a setting added to L{Settings} included until it is listed
    here: a reload that cannot apply it refuses it rather than ignore it.
    """
    web = settings.web
    if web is not None and running.web is not None:
        web = replace(web, **{key: getattr(running.web, key) for key in _RELOADED_WEB})
    auth = replace(settings.auth, **{key: getattr(running.auth, key) for key in _RELOADED_AUTH})
    return replace(settings, state_dir=running.state_dir, tls=running.tls, limits=running.limits, auth=auth, web=web)


def restart_needed(running: Settings, settings: Settings) -> list[str]:
    """
    What C{settings} changes that a reload cannot apply, as C{[section] key} (C{[gateway] workers},
    C{[imap.backend] port}), or C{[section] (added)} or C{(removed)}; empty if nothing.
    """
    return _differences(running, _as_reloaded(settings, running), "gateway")


def _differences(running: Any, new: Any, section: str) -> list[str]:
    """The keys of two settings of one dataclass that differ, in C{section} and the tables below it."""
    found = []
    for each in fields(running):
        before, after = getattr(running, each.name), getattr(new, each.name)
        if not each.compare or before == after:
            continue
        table = each.name if section == "gateway" else f"{section}.{each.name}"
        if is_dataclass(before) and is_dataclass(after):
            found += _differences(before, after, table)
        elif is_dataclass(before) or is_dataclass(after):
            found.append(f"[{table}] ({'removed' if after is None else 'added'})")
        else:
            found.append(f"[{section}] {_KEY_NAMES.get(each.name, each.name)}")
    return found


def _restart_message(path: str, changed: list[str]) -> str:
    """The reason a reload that found C{changed} fails: those keys, and that they change only with a restart."""
    what = ("listeners" if all(key.rpartition(" ")[2] in _LISTENER_KEYS for key in changed)
            else "it" if len(changed) == 1 else "them")
    return (f"{path}: {', '.join(changed)}: expected the running {'value' if len(changed) == 1 else 'values'} "
            f"(restart to change {what})")


TICKET_KEY_LIFETIME = 12 * 3600.0
"""Seconds between rebuilds of the TLS contexts, which gives them new session ticket keys."""


class Reloader(Service):
    """
    On SIGHUP (systemctl reload) gets the configuration again from its source (the file, read
    again; a worker's is its supervisor) and applies it: certificates (default and SNI), limits
    (C{proxy_sources} included), login penalty rules and what the web serves. New connections get
    them; established sessions go on undisturbed. A reload is whole or nothing: a broken file, or a
    change only a restart applies (listeners, backends, C{[auth]} mode, workers...; see
    L{restart_needed}), changes nothing and is logged as an error naming what it found.
    (The users and senders files are re-read by themselves whenever they change.)

    Every L{TICKET_KEY_LIFETIME} it also rebuilds the TLS contexts from the files in use: OpenSSL
    makes new session ticket keys with each context, so a stolen ticket key opens only a few
    hours of recorded sessions, while clients still resume within that time.
    """

    def __init__(self, reactor: IReactorFromThreads, settings: Settings, metrics: GatewayMetrics | None = None,
                 source: Callable[[], Deferred[Settings]] | None = None, worker: int | None = None) -> None:
        """
        :param settings: the running configuration: what a reload cannot apply must stay.
        :param source: gives a Deferred of the configuration a reload applies, which fails with
            L{ConfigError} when that is broken, or with C{ConnectionError} when it cannot be had. By
            default it reads C{settings}' file again (and has fired on return).
        :param worker: the number of the worker process this runs in, which its log lines name
            (every worker reloads after its supervisor); None in the supervisor or the one process.
        """
        self._reactor = reactor
        self._metrics = metrics
        self._path = settings.path
        self._settings = settings
        self._source = source or partial(maybeDeferred, load_settings, settings.path)
        # Whoever reads the file makes a self-signed certificate anew (see certificate_files); a
        # worker serves it from its next rotation. It also warns of certificates near their end,
        # once for the gateway rather than once per worker.
        self._renews = source is None
        self._worker = worker
        # Its lines' field after the event's name (which the metrics read as the first word).
        self._worker_field = "" if worker is None else " worker={worker}"
        self._fetching = False  # while the source has not answered
        self._again = False  # a reload was asked for meanwhile
        self._tls: list[ListenerTLS] = []
        self._served: list[FrontEndFactory] = []
        self._proxies: list[TrustedProxyFactory] = []
        self._web: list[WebState] = []
        self._followers: list[Callable[[Settings], object]] = []
        self._previous_handler: object = None
        self._rotation = LoopingCall(self.rotate_ticket_keys)
        self._rotation.clock = reactor  # type: ignore[assignment]

    def serve(self, tls: ListenerTLS, factory: FrontEndFactory) -> None:
        """Keep a listener's TLS and factory up to date on reload."""
        self._keep_tls(tls)
        self._served.append(factory)

    def serve_web(self, tls: ListenerTLS, state: WebState) -> None:
        """Keep the web listeners' TLS and documents up to date on reload."""
        self._keep_tls(tls)
        self._web.append(state)

    def serve_proxy(self, proxy: TrustedProxyFactory) -> None:
        """Keep a C{haproxy:} listener's trusted sources up to date on reload."""
        self._proxies.append(proxy)

    def follow(self, apply: Callable[[Settings], object]) -> None:
        """Call C{apply} with every configuration that reloads well (the gatekeeper's rules, the workers)."""
        self._followers.append(apply)

    def _keep_tls(self, tls: ListenerTLS) -> None:
        if all(tls is not kept for kept in self._tls):  # the implicit and STARTTLS listeners share one
            self._tls.append(tls)

    def _switch_tls(self, files: TLSFiles | None = None) -> None:
        """
        Build new TLS for every listener, from C{files} or else from the files each uses; only once
        all are built, put them in use.

        :raises TLSError: when a file cannot be used (certbot may be writing them); nothing changes then.
        """
        switches = [tls.prepare(files) for tls in self._tls]
        for switch in switches:
            switch()

    def startService(self) -> None:
        super().startService()
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGHUP, self._hangup)
            # gateway.tap blocks SIGHUP from the plugin's start until now: one that came meanwhile
            # is delivered here, to the handler, and the reload it asked for happens.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        self._rotation.start(TICKET_KEY_LIFETIME, now=False)
        self._check_readable()

    def _check_readable(self) -> None:
        """
        Warn of the files this process read at start but cannot read now: twistd's --uid drops
        privileges after the start, and a reload, the ticket key rotation and the users file's
        reloads would then fail, each time.
        """
        paths = [path for tls in self._tls for path in (tls.files.certificate, tls.files.private_key)]
        paths += [path for tls in self._tls for entry in tls.files.sni
                  for path in (entry.certificate, entry.private_key)]
        if self._settings.auth.users_file is not None:
            paths.append(self._settings.auth.users_file)
        for path in dict.fromkeys(paths):
            if not os.access(path, os.R_OK):
                log.warn("file_unreadable path={path} uid={uid}: reloads and session ticket key rotation will "
                         "fail; make it readable by this user (see etc/mailgateway.service)",
                         path=path, uid=os.getuid())

    def stopService(self) -> None:
        super().stopService()
        if self._rotation.running:
            self._rotation.stop()
        if self._previous_handler is not None:
            # Ignored, not the default action, which would end a process still ending its connections.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def _hangup(self, signum: int, frame: object) -> None:
        # A signal handler may not touch the reactor's state; this hands the work to it.
        self._reactor.callFromThread(self.reload)

    def rotate_ticket_keys(self) -> None:
        """
        Rebuild every TLS context from the files in use (new ticket keys), after making a
        self-signed certificate anew if it is near its end (L{tls_files}): a gateway may run for
        longer than a year without a restart or reload.
        """
        try:
            self._switch_tls(tls_files(self._settings, self._renews))
        except (ConfigError, TLSError) as e:
            log.error("ticket_key_rotation_failed reason={reason}: keeping the running contexts", reason=str(e))
            return
        log.info("ticket_keys_rotated contexts={count}", count=len(self._tls))

    def reload(self) -> None:
        """
        Get the configuration from the source and apply it, unless it is broken or part of it needs
        a restart. One asked for while the source has not answered yet runs once it has (once,
        however many were asked for meanwhile): that answer may be older than the request.
        """
        if self._fetching:
            self._again = True
            return
        reloading = self._source()
        self._fetching = True
        reloading.addCallback(self._apply)
        reloading.addErrback(self._failed)
        reloading.addBoth(self._fetched)

    def _fetched(self, result: object) -> object:
        self._fetching = False
        if self._again:
            self._again = False
            self.reload()
        return result  # a failure other than those of _failed (a bug) is logged as unhandled

    def _failed(self, failure: Failure) -> Failure | None:
        """Log a reload that found no configuration it could apply; any other failure (a bug) goes on."""
        if not failure.check(ConfigError, TLSError, ConnectionError):
            return failure
        log.error("reload_failed" + self._worker_field + " reason={reason}: keeping the running configuration",
                  worker=self._worker, reason=failure.getErrorMessage())
        notify_status(f"Reload failed, running the previous configuration: {failure.getErrorMessage()}")
        return None

    def _apply(self, settings: Settings) -> None:
        """
        Apply C{settings}, or nothing of them.

        :raises ConfigError: when part of them needs a restart.
        :raises TLSError: when a TLS file they name cannot be used.
        """
        changed = restart_needed(self._settings, settings)
        if changed:
            raise ConfigError(_restart_message(self._path, changed))
        files = tls_files(settings, self._renews)
        if not self._tls:
            # A supervisor of workers serves no TLS itself, but its workers load these files, and
            # a worker started later from this configuration could never serve if they were bad.
            check_tls(files)
        self._switch_tls(files)
        if self._renews:
            warn_of_certificates(settings, files)
        self._settings = settings
        for apply in self._followers:
            apply(settings)
        for state in self._web:
            state.update(settings)
        if self._metrics is not None:
            self._metrics.watch_certificates(certificates_to_watch(settings.tls, files.certificate))
        for factory in self._served:
            factory.context = replace(factory.context, limits=protocol_limits(settings, factory.context.protocol))
        for proxy in self._proxies:
            proxy.sources = settings.limits.proxy_sources
        log.info("reloaded" + self._worker_field + " path={path} certificates={count}", worker=self._worker, path=self._path,
                 count=1 + sum(len(entry.names) for entry in settings.tls.sni))
        notify_status(f"Reloaded {self._path}")


def build_service(settings: Settings, reactor: object, *, renew: bool = True) -> MultiService:
    """
    Build everything the configuration asks for: one process, or the supervisor of
    C{settings.workers} worker processes. Nothing listens or runs until the tree is started.

    :param reactor: the running reactor (twistd's); every part gets it injected.
    :param renew: whether to make the self-signed certificate (anew near its end); see L{certificate_files}.
    :raises ConfigError: when a file named by the configuration cannot be used.
    """
    provide_descriptors(settings)  # before the workers start: they inherit the limit
    for warning in clear_text_backends(settings):
        log.warn("clear_text_backend {warning}", warning=warning)
    top = MultiService()
    gatekeeper = LocalGatekeeper(ConnectionLimits(connection_rules(settings)),
                                 LoginPenalties(reactor, penalty_rules(settings)))  # type: ignore[arg-type]
    files = tls_files(settings, renew)
    metrics = None
    if settings.metrics is not None:
        metrics = GatewayMetrics()
        metrics.watch_certificates(certificates_to_watch(settings.tls, files.certificate))
        build_metrics_service(settings.metrics, reactor, metrics, gatekeeper.connections,
                              config_path=settings.path).setServiceParent(top)
    reloader = Reloader(reactor, settings, metrics)  # type: ignore[arg-type]
    reloader.setServiceParent(top)
    reloader.follow(provide_descriptors)
    reloader.follow(partial(_new_rules, gatekeeper))
    stop_time: Callable[[], float]
    if settings.workers == 1:
        connections = _build_mail(settings, files, reactor, gatekeeper, reloader, top)
        stop_time = lambda: connections.grace + STOP_MARGIN
    else:
        # The workers load these themselves. Loaded here too, a mistake ends the start at once, as
        # with one process, instead of every worker failing until the supervisor gives up.
        _local_users(settings)
        for name, _, protocol, _, backend_login in _mail_protocols(settings, RefusedEhloNames()):  # the senders file
            if protocol is not None:
                _backend(settings, name, protocol, backend_login, reactor)
        try:
            check_tls(files)
        except TLSError as e:
            raise ConfigError(f"{settings.path}: [tls]: {e}") from None
        idle = Factory()
        idle.noisy = False
        held = _mail_listeners(settings, reactor, lambda name, kind: idle, held=True)
        for each in held:
            each.setServiceParent(top)
        pool = WorkerPool(reactor, settings, gatekeeper, held, serving=partial(notify, b"READY=1"))  # type: ignore[arg-type]
        pool.setServiceParent(top)
        reloader.follow(pool.reload)
        stop_time = lambda: pool.stop_within + STOP_MARGIN
        if metrics is not None:
            metrics.watch_processes(lambda: [("supervisor", os.getpid()),
                                             *((f"worker-{n}", pid) for n, pid in sorted(pool.pids().items()))])
    # A process is gone a margin after its grace; a supervisor, a margin after it has killed its last worker.
    StopNotice(stop_time).setServiceParent(top)
    if settings.web is not None:
        try:
            web_tls = ListenerTLS(b"http/1.1", files)
        except TLSError as e:
            raise ConfigError(f"{settings.path}: [tls]: {e}") from None
        web_state = WebState(settings)
        build_web_service(settings.web, reactor, web_tls, web_state,
                          gatekeeper.connections).setServiceParent(top)
        reloader.serve_web(web_tls, web_state)
    if settings.workers == 1:
        ReadyNotice().setServiceParent(top)  # last: started once all before it are
    warn_of_certificates(settings, files)
    return top


def check_service(settings: Settings, reactor: object) -> None:
    """
    Load and check everything a start from C{settings} would (L{build_service} builds the tree,
    which is thrown away), with the same warnings and errors. Nothing is started (no port is
    bound, no worker or thread runs) and no file is written.

    :raises ConfigError: the error a start would end with.
    """
    if settings.tls.self_signed and not all(map(os.path.exists, self_signed_paths(settings.state_dir,
                                                                                   settings.hostname))):
        # A start makes the pair. The check makes a throwaway one: run as root beside the service,
        # it would leave a key in state_dir that the service's user cannot read. It only asks
        # whether the start could write there: in state_dir if it exists (as the user running the
        # check), or else under a directory (systemd's StateDirectory= makes it before a start).
        state_dir = existing = os.path.abspath(settings.state_dir)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing) or (existing == state_dir and not os.access(existing, os.W_OK | os.X_OK)):
            raise ConfigError(f"{settings.path}: [tls] self_signed: cannot create a certificate in "
                              f"[gateway] state_dir: {existing} cannot be written")
        with tempfile.TemporaryDirectory(prefix="mailgateway-check-") as scratch:
            build_service(replace(settings, state_dir=scratch), reactor)
        return
    build_service(settings, reactor, renew=False)


def build_worker_service(settings: Settings, reactor: object, gatekeeper: Gatekeeper, inherited: list[int],
                         configuration: Callable[[], Deferred[Settings]], number: int) -> MultiService:
    """
    Build one worker process: the mail front ends, accepting on the listening sockets the
    supervisor passed down (in the order of L{mail_endpoints}).

    :param configuration: asks the supervisor for the configuration it checked and runs with,
        which a reload applies: a worker never reads the file itself, which may hold an edit the
        supervisor has not checked, or has refused.
    :param number: the worker's number, for its log lines.
    :raises ConfigError: when a file named by the configuration cannot be used.
    """
    # The supervisor warns of a limit too low, once; a worker raises its own (inherited) limit.
    provide_descriptors(settings, warn=False)
    top = MultiService()
    reloader = Reloader(reactor, settings, source=configuration, worker=number)  # type: ignore[arg-type]
    reloader.setServiceParent(top)
    reloader.follow(partial(provide_descriptors, warn=False))
    _build_mail(settings, tls_files(settings, renew=False), reactor, gatekeeper, reloader, top, inherited)
    return top


def provide_descriptors(settings: Settings, warn: bool = True) -> None:
    """
    Raise the limit on open descriptors to what C{max_connections} needs; if the hard limit is
    lower, say so (when C{warn}), since connections past it would fail.
    """
    needed = descriptors_needed(settings.limits.max_connections)
    limit = raise_descriptor_limit(needed)
    if warn and limit < needed:
        log.warn("descriptor_limit limit={limit} needed={needed} max_connections={max_connections}: "
                 "raise LimitNOFILE (systemd) or ulimit -n, or lower max_connections",
                 limit=limit, needed=needed, max_connections=settings.limits.max_connections)


def _new_rules(gatekeeper: LocalGatekeeper, settings: Settings) -> None:
    gatekeeper.penalties.rules = penalty_rules(settings)
    gatekeeper.connections.rules = connection_rules(settings)


def _mail_protocols(settings: Settings, refused_names: RefusedEhloNames
                    ) -> list[tuple[str, bytes, ProtocolSettings | SubmissionSettings | None,
                                    Callable[[FrontEndContext], LoginFrontEnd], LoginFactory]]:
    """
    Per protocol: name, ALPN, settings, front end and backend dialogue.

    :param refused_names: the submission backend's memory of client EHLO names its MTA refused.
    """
    protocols: list[tuple[str, bytes, ProtocolSettings | SubmissionSettings | None,
                          Callable[[FrontEndContext], LoginFrontEnd], LoginFactory]] = [
        ("imap", b"imap", settings.imap, ImapFrontEnd, ImapBackendLogin),
        ("pop3", b"pop3", settings.pop3, Pop3FrontEnd, Pop3BackendLogin),
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
            partial(SmtpBackend, ehlo_name=settings.hostname, refused_names=refused_names),
        ))
    return protocols


def _build_mail(settings: Settings, files: TLSFiles, reactor: object, gatekeeper: Gatekeeper, reloader: Reloader,
                top: MultiService, inherited: Sequence[int] | None = None) -> OpenConnections:
    """
    The mail front ends and their listeners (TLS from C{files}), listening anew or on C{inherited}
    sockets.

    :returns: their open connections, ended at a stop.
    """
    factories: dict[tuple[str, str], IProtocolFactory] = {}
    hashing = HashingPool(settings.auth.hash_threads)
    hashing.setServiceParent(top)
    authenticator = Authenticator(reactor, hashing.pool, _local_users(settings))  # type: ignore[arg-type]
    idle = IdleSessions(reactor)  # type: ignore[arg-type]
    connections = OpenConnections(reactor, settings.limits.stop_grace)  # type: ignore[arg-type]
    connections.setServiceParent(top)

    def new_grace(new: Settings) -> None:
        connections.grace = new.limits.stop_grace

    refused_names = RefusedEhloNames()
    reloader.follow(new_grace)
    # A sysadmin who changed the MTA's HELO rules reloads the gateway to have the names tried again.
    reloader.follow(lambda new: refused_names.clear())
    for name, alpn, protocol, front_end, backend_login in _mail_protocols(settings, refused_names):
        if protocol is None:
            continue
        try:
            server_tls = ListenerTLS(alpn, files)
        except TLSError as e:
            raise ConfigError(f"{settings.path}: [tls]: {e}") from None
        backend = _backend(settings, name, protocol, backend_login, reactor)
        CapabilityProbe(backend, name).setServiceParent(top)
        for implicit in (True, False):
            context = FrontEndContext(name, reactor, protocol_limits(settings, name), server_tls,  # type: ignore[arg-type]
                                      implicit, authenticator, backend, settings.hostname, gatekeeper, idle,
                                      connections)
            front_factory = FrontEndFactory(front_end, context)
            reloader.serve(server_tls, front_factory)
            factory: IProtocolFactory = front_factory
            if implicit:
                factory = TLSMemoryBIOFactory(server_tls, False, factory)
                factory.noisy = False
            factories[(name, "implicit_tls" if implicit else "starttls")] = factory
    for each in _mail_listeners(settings, reactor, lambda name, kind: factories[(name, kind)], inherited=inherited):
        if each.proxy is not None:
            reloader.serve_proxy(each.proxy)
        each.setServiceParent(top)
    return connections


def _backend(settings: Settings, name: str, protocol: ProtocolSettings | SubmissionSettings,
             backend_login: LoginFactory, reactor: object) -> BackendConnector:
    """
    The connector to one protocol's backend.

    :raises ConfigError: when its TLS cannot be set up (a C{ca_file} that holds no certificate).
    """
    try:
        return BackendConnector(reactor, protocol.backend, backend_login)  # type: ignore[arg-type]
    except TLSError as e:
        raise ConfigError(f"{settings.path}: [{name}.backend]: {e}") from None


def _local_users(settings: Settings) -> UserDatabase | None:
    """
    The users file of C{[auth] mode = "local"}, loaded, with the hash schemes checked; None when the
    backend decides.

    :raises ConfigError: when the file cannot be read or is malformed.
    """
    if settings.auth.mode != "local":
        return None
    assert settings.auth.users_file is not None
    try:
        users = UserDatabase(settings.auth.users_file)
    except UserFileError as e:
        raise ConfigError(f"{settings.path}: [auth] users_file: {e}") from None
    self_test()
    return users


def _mail_listeners(settings: Settings, reactor: object, factory: Callable[[str, str], IProtocolFactory], *,
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
