"""
Tests for gateway.service in memory: the service tree build_service makes from a configuration,
listeners, backend probes, and the reloader (SIGHUP and ticket-key rotation).
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from twisted.application.service import MultiService
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocolFactory,
    IReactorFromThreads,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

import gateway.tls
from gateway.auth import HashingPool
from gateway.backend import BackendConnector, BackendUnavailable
from gateway.config import ConfigError, load_settings, mail_endpoints
from gateway.connection_limits import ConnectionLimits, ConnectionRules
from gateway.frontend import FrontEndFactory
from gateway.gatekeeper import LocalGatekeeper
from gateway.penalties import LoginPenalties, PenaltyRules
from gateway.proxy_protocol import TrustedProxyFactory
from gateway.listener import Listener
from gateway.listener import listener as make_listener
from gateway.service import (
    TICKET_KEY_LIFETIME,
    CapabilityProbe,
    Reloader,
    build_service,
    build_worker_service,
    check_service,
    restart_needed,
)
from gateway.testing.pki import IssuedCertificate, TestCA
from gateway.shutdown import STOP_MARGIN, OpenConnections
from gateway.systemd_notify import ReadyNotice, StopNotice
from gateway.tls import ServerTLS, ensure_self_signed
from gateway.userdb import hash_password
from gateway.worker import supervisor_configuration
from gateway.worker_channel import SupervisorChannel, WorkerChannel
from gateway.workers import CONTROL_FD

LOCAL = "tcp:0:interface=127.0.0.1"
PROTOCOLS = ("imap", "pop3", "submission")
BACKEND_PORTS = {"imap": 1143, "pop3": 1110, "submission": 1587}
SUBMISSION_LINE_LENGTH = 12288


@functools.cache
def users_line() -> str:
    """One users file line for alice with an argon2id hash (hashed once: it is slow on purpose)."""
    return f"alice:{hash_password(b'correct horse battery staple')}\n"


@implementer(IReactorFromThreads)
class ThreadCallReactor(MemoryReactorClock):
    """
    A memory reactor and clock that records C{callFromThread} calls instead of running them.

    :ivar from_threads: the calls handed over, in order, as (function, args, kwargs).
    """

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: list[tuple[Callable[..., object], tuple[object, ...], dict[str, object]]] = []

    def callFromThread(self, f: Callable[..., object], *args: object, **kwargs: object) -> None:
        self.from_threads.append((f, args, kwargs))


def messages(logged: EventLoggingObserver) -> list[str]:
    """The log lines an observer has seen so far."""
    return [formatEvent(event) for event in logged]


def serial_served(server_tls: ServerTLS) -> int:
    """The serial number of the default certificate a new connection would present."""
    certificate = server_tls.serverConnectionForTLS(None).get_certificate()  # type: ignore[arg-type]
    assert certificate is not None
    return int(certificate.to_cryptography().serial_number)


def serial_of(path: str) -> int:
    """The serial number of the first certificate in a PEM file."""
    with open(path, "rb") as f:
        return int(x509.load_pem_x509_certificate(f.read()).serial_number)


def break_key_after_first_context(case: SynchronousTestCase, key_path: str) -> None:
    """
    Have the key file turn unreadable once one TLS context has been built from it, as when
    certbot writes the files while a reload or a rotation reads them.
    """
    make = gateway.tls._make_server_context

    def make_then_break(*args: Any) -> Any:
        context = make(*args)
        with open(key_path, "w", encoding="ascii") as f:
            f.write("being written\n")
        return context

    case.patch(gateway.tls, "_make_server_context", make_then_break)


def front_end_factory(factory: IProtocolFactory) -> FrontEndFactory:
    """The front-end factory inside the TLS and PROXY wrappers of a listener's factory."""
    while not isinstance(factory, FrontEndFactory):
        factory = factory.wrappedFactory  # type: ignore[attr-defined]
    return factory


class GatewayFiles:
    """
    A temporary directory with a CA, a default certificate at fixed paths, a users file and a
    configuration that names them.

    :ivar chain: the certificate chain path the configuration names; renewals replace its contents.
    :ivar key: the private key path the configuration names.
    """

    def __init__(self, case: SynchronousTestCase) -> None:
        self.directory = tempfile.mkdtemp(prefix="mailgateway-service-")
        case.addCleanup(shutil.rmtree, self.directory, True)
        self.ca = TestCA(os.path.join(self.directory, "ca"))
        self.chain = os.path.join(self.directory, "fullchain.pem")
        self.key = os.path.join(self.directory, "privkey.pem")
        self.install(self.ca.issue("mail.example.org"))
        self.users = os.path.join(self.directory, "users")
        with open(self.users, "w", encoding="utf-8") as f:
            f.write(users_line())
        self.state_dir = os.path.join(self.directory, "state")
        self.path = os.path.join(self.directory, "mailgateway.toml")

    def install(self, issued: IssuedCertificate) -> None:
        """Put a certificate chain and key at the configured paths, as a renewal does."""
        shutil.copyfile(issued.chain_path, self.chain)
        shutil.copyfile(issued.key_path, self.key)

    def renew_certificate_only(self) -> None:
        """
        Replace the certificate chain but not the key (a half-done renewal): both are ECDSA
        P-256, so the new certificate and the old key are of one type and do not match.
        """
        shutil.copyfile(self.ca.issue("mail.example.org").chain_path, self.chain)

    def write(self, *, limits: str = "", failure_delay: float = 2.0, self_signed: bool = False,
              imap_implicit: str = LOCAL, backend_ports: dict[str, int] | None = None, gateway: str = "",
              extra: str = "") -> str:
        """
        Write the configuration: imap, pop3 and submission, each with one implicit-TLS and one
        STARTTLS listener.

        :param limits: lines for the C{[limits]} table.
        :param imap_implicit: the endpoint description of IMAP's implicit-TLS listener.
        :param backend_ports: backend ports by protocol, instead of L{BACKEND_PORTS}.
        :param gateway: further lines for the C{[gateway]} table.
        :param extra: text appended verbatim (further tables, or to break the file).
        :returns: the configuration's path.
        """
        tls = "self_signed = true" if self_signed else f'certificate = "{self.chain}"\nprivate_key = "{self.key}"'
        ports = BACKEND_PORTS | (backend_ports or {})
        protocols = ""
        for name in PROTOCOLS:
            implicit = imap_implicit if name == "imap" else LOCAL
            protocols += (f'[{name}]\nimplicit_tls = ["{implicit}"]\nstarttls = ["{LOCAL}"]\n'
                          f'[{name}.backend]\nhost = "127.0.0.1"\nport = {ports[name]}\n\n')
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(f"""\
[gateway]
hostname = "mail.example.org"
state_dir = "{self.state_dir}"
{gateway}

[tls]
{tls}

[auth]
users_file = "{self.users}"
failure_delay = {failure_delay}

[limits]
{limits}

{protocols}
{extra}
""")
        return self.path


def children(top: MultiService, kind: type) -> list[Any]:
    """The direct children of C{top} that are instances of C{kind}."""
    return [service for service in top if isinstance(service, kind)]


class BuildServiceTests(SynchronousTestCase):
    """build_service turns a configuration into listeners, probes, a hashing pool and a reloader."""

    def setUp(self) -> None:
        self.files = GatewayFiles(self)
        self.reactor = ThreadCallReactor()

    def build(self, **config: Any) -> MultiService:
        """Build the service tree for a configuration written with C{config}."""
        return build_service(load_settings(self.files.write(**config)), self.reactor)

    def test_tree(self) -> None:
        """
        The tree holds one listener per endpoint, a probe per backend, a pool, a reloader, the
        open connections (ended at a stop), the notice that tells systemd the gateway stops, and
        last the one that tells it the gateway serves.
        """
        top = self.build(self_signed=True)
        self.assertIsInstance(top, MultiService)
        labels = sorted(listener.label for listener in children(top, Listener))
        self.assertEqual(labels, sorted(f"protocol={name} tls={kind} endpoint={LOCAL}"
                                        for name in PROTOCOLS for kind in ("implicit_tls", "starttls")))
        self.assertEqual(len(children(top, CapabilityProbe)), 3)
        self.assertEqual(len(children(top, HashingPool)), 1)
        self.assertEqual(len(children(top, Reloader)), 1)
        self.assertEqual(len(children(top, OpenConnections)), 1)
        self.assertEqual(len(children(top, StopNotice)), 1)
        self.assertIsInstance(list(top)[-1], ReadyNotice)
        self.assertEqual(len(list(top)), 6 + 3 + 1 + 1 + 1 + 1 + 1)

    def test_descriptor_limit_short(self) -> None:
        """
        Start-up raises the limit on open descriptors, and says so when the hard limit (or the
        kernel's ceiling) is below what max_connections needs.
        """
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        limits = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, limits)
        self.build(self_signed=True, limits="max_connections = 1000000")
        self.assertIn(f"descriptor_limit limit={resource.getrlimit(resource.RLIMIT_NOFILE)[0]} needed=2000128 "
                      "max_connections=1000000: raise LimitNOFILE (systemd) or ulimit -n, or lower max_connections",
                      messages(logged))

    def test_self_signed_certificate_in_state_dir(self) -> None:
        """With self_signed, the certificate and key are created in the state directory."""
        self.build(self_signed=True)
        self.assertEqual(sorted(os.listdir(self.files.state_dir)),
                         ["selfsigned-mail.example.org.crt", "selfsigned-mail.example.org.key"])

    def test_probes_every_backend(self) -> None:
        """The probes, once started, connect to every backend (IMAP's too), and stop cleanly."""
        probes = children(self.build(self_signed=True), CapabilityProbe)
        for probe in probes:
            probe.startService()
        self.assertEqual(sorted((host, port) for host, port, *_ in self.reactor.tcpClients),
                         sorted(("127.0.0.1", BACKEND_PORTS[name]) for name in ("imap", "pop3", "submission")))
        for probe in probes:
            probe.stopService()

    def test_listener_factories(self) -> None:
        """Implicit-TLS listeners bind TLS around the front end, STARTTLS listeners the front end itself."""
        top = self.build(self_signed=True)
        for listener in children(top, Listener):
            listener.privilegedStartService()
            port, factory, _, interface = self.reactor.tcpServers[-1]
            self.assertEqual((port, interface), (0, "127.0.0.1"))
            front = front_end_factory(factory)
            self.assertIn(f"protocol={front.context.protocol} ", listener.label)
            implicit = "tls=implicit_tls" in listener.label
            self.assertEqual(front.context.implicit_tls, implicit)
            self.assertEqual(isinstance(factory, TLSMemoryBIOFactory), implicit)
            self.assertEqual(factory is front, not implicit)

    def test_submission_line_length(self) -> None:
        """Submission listeners allow AUTH lines of 12288 bytes; the others the configured line length."""
        top = self.build(self_signed=True, limits="line_length = 4096")
        for listener in children(top, Listener):
            listener.privilegedStartService()
        lengths = {(front.context.protocol, front.context.limits.line_length)
                   for front in (front_end_factory(factory) for _, factory, _, _ in self.reactor.tcpServers)}
        self.assertEqual(lengths, {("imap", 4096), ("pop3", 4096), ("submission", SUBMISSION_LINE_LENGTH)})

    def test_mismatched_key(self) -> None:
        """A certificate and key of one type that do not match are a ConfigError naming the key."""
        self.files.renew_certificate_only()
        with self.assertRaises(ConfigError) as raised:
            self.build()
        self.assertIn(self.files.key, str(raised.exception))

    def test_unusable_endpoint(self) -> None:
        """An endpoint description Twisted cannot use is a ConfigError naming the section, key and value."""
        with self.assertRaises(ConfigError) as raised:
            self.build(self_signed=True, imap_implicit="tcp:abc")
        message = str(raised.exception)
        self.assertIn("[imap] implicit_tls", message)
        self.assertIn("'tcp:abc'", message)
        self.assertNotIn("\n", message)

    def test_haproxy_listener(self) -> None:
        """A haproxy: listener binds the endpoint behind the prefix and wraps its factory for the PROXY header."""
        top = self.build(self_signed=True, imap_implicit=f"haproxy:{LOCAL}", limits='proxy_sources = ["127.0.0.2/32"]')
        proxied = 0
        for listener in children(top, Listener):
            listener.privilegedStartService()
            port, factory, _, interface = self.reactor.tcpServers[-1]
            self.assertEqual((port, interface), (0, "127.0.0.1"))
            if listener.label == f"protocol=imap tls=implicit_tls endpoint=haproxy:{LOCAL}":
                proxied += 1
                self.assertIsInstance(factory, TrustedProxyFactory)
                self.assertIsInstance(factory.wrappedFactory, TLSMemoryBIOFactory)
                self.assertEqual(factory.sources, (ipaddress.ip_network("127.0.0.2/32"),))
                self.assertIs(factory.clock, self.reactor)
            else:
                self.assertNotIsInstance(factory, TrustedProxyFactory)
        self.assertEqual(proxied, 1)


    def test_supervisor_checks_files_at_start(self) -> None:
        """
        With workers, a key that does not match, or a users file that does not load, ends the
        start at once as with one process: the supervisor checks what its workers would load.
        """
        self.files.renew_certificate_only()
        with self.assertRaises(ConfigError) as raised:
            self.build(gateway="workers = 2")
        self.assertIn(self.files.key, str(raised.exception))
        self.files.install(self.files.ca.issue("mail.example.org"))
        with open(self.files.users, "w", encoding="utf-8") as f:
            f.write("alice:{PLAIN}secret\n")
        with self.assertRaises(ConfigError) as raised:
            self.build(gateway="workers = 2")
        self.assertIn("[auth] users_file", str(raised.exception))

    def test_clear_text_backend_warned(self) -> None:
        """A backend sent passwords in clear off this machine is named in a warning at start."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.build(self_signed=True, backend_ports={"imap": 143})
        self.assertEqual([m for m in messages(logged) if m.startswith("clear_text_backend ")], [])
        with open(self.files.write(self_signed=True), encoding="utf-8") as f:
            config = f.read()
        with open(self.files.path, "w", encoding="utf-8") as f:
            f.write(config.replace('[imap.backend]\nhost = "127.0.0.1"', '[imap.backend]\nhost = "192.0.2.7"'))
        build_service(load_settings(self.files.path), self.reactor)
        [warning] = [m for m in messages(logged) if m.startswith("clear_text_backend ")]
        self.assertIn("[imap.backend] tls", warning)
        self.assertIn("192.0.2.7", warning)


class ReloaderTestCase(SynchronousTestCase):
    """A built gateway with bound (in-memory) listeners, its reloader and its front-end factories."""

    def setUp(self) -> None:
        self.files = GatewayFiles(self)
        self.reactor = ThreadCallReactor()
        self.top = build_service(load_settings(self.files.write(limits="max_connections_per_ip = 50")), self.reactor)
        [self.reloader] = children(self.top, Reloader)
        for listener in children(self.top, Listener):
            listener.privilegedStartService()
        self.fronts = [front_end_factory(factory) for _, factory, _, _ in self.reactor.tcpServers]
        self.tls = list({id(front.context.tls): front.context.tls for front in self.fronts}.values())
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        # The reloader may install a SIGHUP handler; whatever happens, the test's own comes back.
        self.addCleanup(signal.signal, signal.SIGHUP, signal.getsignal(signal.SIGHUP))

    def snapshot(self) -> tuple[object, ...]:
        """Everything a reload may change: rules, every factory's limits, every served certificate."""
        context = self.fronts[0].context
        return (context.gatekeeper.penalties.rules, context.gatekeeper.connections.rules,
                tuple(front.context.limits for front in self.fronts),
                tuple(serial_served(server_tls) for server_tls in self.tls))

    def contexts(self) -> list[object]:
        """The default OpenSSL context each ServerTLS gives new connections."""
        return [server_tls.serverConnectionForTLS(None).get_context()  # type: ignore[arg-type]
                for server_tls in self.tls]


class UnreadableFilesTests(ReloaderTestCase):
    """A gateway that cannot read its files once running (twistd --uid after a start as root) says so."""

    def test_warned_after_privileges_dropped(self) -> None:
        """
        Started, the reloader names each file it could read at start but not as the user it now
        runs as; without that drop, it names none.
        """
        self.reloader.startService()
        self.addCleanup(self.reloader.stopService)
        self.assertEqual([m for m in messages(self.logged) if m.startswith("file_unreadable ")], [])
        reader, writer = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - the child reports through the pipe
            try:
                os.close(reader)
                if os.getuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)  # as twistd --uid nobody does after the start
                else:
                    os.chmod(self.files.key, 0)
                before = len(self.logged)
                self.reloader._check_readable()
                os.write(writer, "\n".join(messages(self.logged)[before:]).encode("utf-8"))
            finally:
                os._exit(0)
        os.close(writer)
        with os.fdopen(reader, "rb") as pipe:
            lines = pipe.read().decode("utf-8").splitlines()
        os.waitpid(child, 0)
        warned = [line for line in lines if line.startswith("file_unreadable ")]
        self.assertIn(self.files.key, " ".join(warned))
        self.assertTrue(all("reloads and session ticket key rotation will fail" in line for line in warned), warned)


class ReloadTests(ReloaderTestCase):
    """Reloader.reload applies a new configuration, or nothing of a broken one."""

    def test_fixture(self) -> None:
        """Three protocols with two listeners each share one ServerTLS per protocol."""
        self.assertEqual(sorted((f.context.protocol, f.context.implicit_tls) for f in self.fronts),
                         sorted((name, implicit) for name in PROTOCOLS for implicit in (False, True)))
        self.assertEqual(len(self.tls), 3)

    def test_new_limits_and_rules(self) -> None:
        """After a reload the penalty rules, connection rules and every listener's limits are the new ones."""
        self.files.write(limits="max_connections_per_ip = 7\nline_length = 4096", failure_delay=0.5)
        self.reloader.reload()
        for front in self.fronts:
            context = front.context
            self.assertEqual(context.limits.max_connections_per_ip, 7)
            expected = SUBMISSION_LINE_LENGTH if context.protocol == "submission" else 4096
            self.assertEqual(context.limits.line_length, expected, context.protocol)
            self.assertEqual(context.gatekeeper.penalties.rules.base_delay, 0.5)
            self.assertEqual(context.gatekeeper.connections.rules.max_per_address, 7)
        self.assertEqual(len({id(front.context.gatekeeper) for front in self.fronts}), 1)
        self.assertIn(f"reloaded path={self.files.path} certificates=1", messages(self.logged))

    def test_descriptor_limit_follows(self) -> None:
        """A reload that raises max_connections raises the limit on open descriptors too, or says it cannot."""
        limits = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, limits)
        self.files.write(limits="max_connections = 1000000")
        self.reloader.reload()
        self.assertTrue(any(message.startswith("descriptor_limit ") and "needed=2000128 " in message
                            for message in messages(self.logged)))

    def test_renewed_certificate(self) -> None:
        """A renewed certificate at the configured paths is served after a reload, not before."""
        before = serial_of(self.files.chain)
        renewed = self.files.ca.issue("mail.example.org")
        self.files.install(renewed)
        self.assertEqual({serial_served(server_tls) for server_tls in self.tls}, {before})
        self.reloader.reload()
        self.assertEqual({serial_served(server_tls) for server_tls in self.tls}, {serial_of(renewed.cert_path)})

    def test_status_for_systemd(self) -> None:
        """
        Each reload's outcome becomes the status line systemctl status shows (systemctl reload
        returns once the signal is sent, so it cannot tell a refused reload).
        """
        directory = tempfile.mkdtemp(prefix="gw-notify-")
        self.addCleanup(shutil.rmtree, directory)
        systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(systemd.close)
        systemd.bind(os.path.join(directory, "notify"))
        systemd.settimeout(0)
        self.patch(os, "environ", {**os.environ, "NOTIFY_SOCKET": os.path.join(directory, "notify")})
        self.files.write(limits="max_connections_per_ip = 7", backend_ports={"imap": 2143})
        self.reloader.reload()
        [failed] = [line for line in messages(self.logged) if line.startswith("reload_failed ")]
        reason = failed.removeprefix("reload_failed reason=").removesuffix(": keeping the running configuration")
        self.assertIn("[imap.backend] port", reason)
        self.assertEqual(systemd.recv(4096).decode(), "STATUS=Reload failed, running the previous configuration: " + reason)
        self.files.write(limits="max_connections_per_ip = 7")
        self.reloader.reload()
        self.assertEqual(systemd.recv(4096), f"STATUS=Reloaded {self.files.path}".encode())
        self.assertRaises(BlockingIOError, systemd.recv, 4096)

    def assert_unchanged(self, before: tuple[object, ...], reason: str) -> None:
        """Nothing changed since C{before}, and a reload_failed line mentioning C{reason} was logged."""
        self.assertEqual(self.snapshot(), before)
        failures = [line for line in messages(self.logged) if line.startswith("reload_failed ")]
        self.assertEqual(len(failures), 1, messages(self.logged))
        self.assertIn(reason, failures[0])
        self.assertFalse([line for line in messages(self.logged) if line.startswith("reloaded ")])

    def test_invalid_value(self) -> None:
        """A configuration with an invalid value changes nothing, not even the certificate, and is logged."""
        before = self.snapshot()
        self.files.install(self.files.ca.issue("mail.example.org"))
        self.files.write(limits="max_connections_per_ip = 0", failure_delay=0.5)
        self.reloader.reload()
        self.assert_unchanged(before, "max_connections_per_ip")

    def test_changed_listeners(self) -> None:
        """A configuration with other mail listeners changes nothing: listeners change only with a restart."""
        before = self.snapshot()
        self.files.write(limits="max_connections_per_ip = 7", imap_implicit="tcp:0:interface=127.0.0.2")
        self.reloader.reload()
        self.assert_unchanged(before, "restart to change listeners")

    def test_invalid_toml(self) -> None:
        """A configuration that is not TOML changes nothing and is logged."""
        before = self.snapshot()
        self.files.write(limits="max_connections_per_ip = 7", extra="[limits\n")
        self.reloader.reload()
        self.assert_unchanged(before, "not valid TOML")

    def test_broken_certificate(self) -> None:
        """A key that does not match the new certificate keeps the old certificate and the old limits."""
        before = self.snapshot()
        self.files.renew_certificate_only()
        self.files.write(limits="max_connections_per_ip = 7", failure_delay=0.5)
        self.reloader.reload()
        self.assert_unchanged(before, self.files.key)

    def test_unreadable_key(self) -> None:
        """A key file that is not PEM keeps the old certificate and the old limits."""
        before = self.snapshot()
        with open(self.files.key, "w", encoding="ascii") as f:
            f.write("not a key\n")
        self.files.write(limits="max_connections_per_ip = 7")
        self.reloader.reload()
        self.assert_unchanged(before, "not a PEM private key")

    def test_certificates_switch_together(self) -> None:
        """
        A reload whose second certificate context cannot be built (the files changed under it)
        leaves every listener on the running certificate, the first one included.
        """
        before = self.snapshot()
        self.files.install(self.files.ca.issue("mail.example.org"))
        self.files.write(limits="max_connections_per_ip = 7")
        break_key_after_first_context(self, self.files.key)
        self.reloader.reload()
        self.assert_unchanged(before, "not a PEM private key")

    def test_backend_needs_restart(self) -> None:
        """A changed backend port is refused, naming the section and key; nothing else is applied either."""
        before = self.snapshot()
        self.files.install(self.files.ca.issue("mail.example.org"))
        self.files.write(limits="max_connections_per_ip = 7", backend_ports={"imap": 2143})
        self.reloader.reload()
        self.assert_unchanged(before, "[imap.backend] port: expected the running value (restart to change it)")
        self.assertEqual({front.context.backend.address for front in self.fronts if front.context.protocol == "imap"},
                         {"127.0.0.1:1143"})

    def test_restart_only_settings_named(self) -> None:
        """Every change that takes a restart is named in the one reload_failed line."""
        before = self.snapshot()
        with open(self.files.users, "r", encoding="utf-8") as f:
            users = f.read()
        other_users = os.path.join(self.files.directory, "other-users")
        with open(other_users, "w", encoding="utf-8") as f:
            f.write(users)
        self.files.write(limits="max_connections_per_ip = 7", gateway="workers = 2",
                         extra=f'[metrics]\nlisten = ["{LOCAL}"]\n')
        with open(self.files.path, "r", encoding="utf-8") as f:
            text = f.read().replace(f'users_file = "{self.files.users}"',
                                    f'users_file = "{other_users}"\nhash_threads = 3')
        with open(self.files.path, "w", encoding="utf-8") as f:
            f.write(text)
        self.reloader.reload()
        self.assert_unchanged(before, f"{self.files.path}: [auth] users_file, [auth] hash_threads, [metrics] (added), "
                                      "[gateway] workers: expected the running values (restart to change them)")

    def test_auto_workers_with_other_cpus(self) -> None:
        """
        workers = "auto" unchanged is no change, though the CPUs online changed since the start
        (hot-plugged): the reload applies. Written as a count, it takes a restart.
        """
        running = load_settings(self.files.write(gateway='workers = "auto"'))
        self.patch(os, "cpu_count", lambda: running.workers + 1)
        reloaded = load_settings(self.files.write(gateway='workers = "auto"', limits="max_connections_per_ip = 7"))
        self.assertNotEqual(reloaded.workers, running.workers)
        self.assertEqual(restart_needed(running, reloaded), [])
        counted = load_settings(self.files.write(gateway=f"workers = {running.workers}"))
        self.assertEqual(restart_needed(running, counted), ["[gateway] workers"])

    def test_refused_ehlo_names_forgotten(self) -> None:
        """
        The client EHLO names the MTA refused, one memory for every submission listener, are
        tried again after a reload: the sysadmin may have changed the MTA's HELO rules.
        """
        memories = [front.context.backend._login_protocol.keywords["refused_names"]  # type: ignore[attr-defined]
                    for front in self.fronts if front.context.protocol == "submission"]
        self.assertEqual(len(memories), 2)
        self.assertIs(memories[0], memories[1])
        memories[0].add(b"DESKTOP-ABC")
        self.files.write(limits="max_connections_per_ip = 7")
        self.reloader.reload()
        self.assertNotIn(b"DESKTOP-ABC", memories[0])

    def test_reloadable_change_after_refused_one(self) -> None:
        """Once the file is back to what runs, with only reloadable changes, the reload applies them."""
        self.files.write(backend_ports={"pop3": 2110})
        self.reloader.reload()
        self.files.write(limits="max_connections_per_ip = 7")
        self.reloader.reload()
        self.assertEqual({front.context.limits.max_connections_per_ip for front in self.fronts}, {7})
        self.assertIn(f"reloaded path={self.files.path} certificates=1", messages(self.logged))


class ProxySourcesReloadTests(SynchronousTestCase):
    """[limits] proxy_sources follows a reload: the load balancers named are the ones trusted."""

    def test_removed_source_refused(self) -> None:
        """A balancer taken out of proxy_sources is refused from the reload on; one put in is trusted."""
        files = GatewayFiles(self)
        reactor = ThreadCallReactor()
        top = build_service(load_settings(files.write(imap_implicit=f"haproxy:{LOCAL}",
                                                      limits='proxy_sources = ["127.0.0.2/32"]')), reactor)
        [reloader] = children(top, Reloader)
        for listener in children(top, Listener):
            listener.privilegedStartService()
        [proxy] = [factory for _, factory, _, _ in reactor.tcpServers if isinstance(factory, TrustedProxyFactory)]
        balancer, replacement = IPv4Address("TCP", "127.0.0.2", 40000), IPv4Address("TCP", "127.0.0.3", 40000)
        self.assertIsNotNone(proxy.buildProtocol(balancer))
        self.assertIsNone(proxy.buildProtocol(replacement))
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        files.write(imap_implicit=f"haproxy:{LOCAL}", limits='proxy_sources = ["127.0.0.3/32"]')
        reloader.reload()
        self.assertIn(f"reloaded path={files.path} certificates=1", messages(logged))
        self.assertIsNone(proxy.buildProtocol(balancer))
        self.assertIn("proxy_refused source=127.0.0.2 reason=untrusted", messages(logged))
        self.assertIsNotNone(proxy.buildProtocol(replacement))


class StopGraceReloadTests(SynchronousTestCase):
    """[limits] stop_grace follows a reload: a stop waits, and tells systemd it may take, the grace in force."""

    def told_systemd(self, notice: StopNotice) -> bytes:
        """What C{notice} tells systemd as a stop begins."""
        directory = tempfile.mkdtemp(prefix="gw-notify-")
        self.addCleanup(shutil.rmtree, directory)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(os.path.join(directory, "notify"))
            self.patch(os, "environ", {**os.environ, "NOTIFY_SOCKET": os.path.join(directory, "notify")})
            notice.stopService()
            return sock.recv(4096)

    def test_follows_reload(self) -> None:
        """
        In one process the connections' grace follows, and systemd is told it and a margin; with
        workers, systemd is told the supervisor's kill delay (the longest grace and a margin) and a margin.
        """
        for workers, margins, longest in ((1, 1, False), (2, 2, True)):
            files = GatewayFiles(self)
            top = build_service(load_settings(files.write(gateway=f"workers = {workers}", limits="stop_grace = 5")),
                                ThreadCallReactor())
            [reloader] = children(top, Reloader)
            [notice] = children(top, StopNotice)
            connections = children(top, OpenConnections)
            self.assertEqual(len(connections), workers == 1)
            for grace, expected in ((5, 5), (30, 30), (3, 30 if longest else 3)):
                files.write(gateway=f"workers = {workers}", limits=f"stop_grace = {grace}")
                reloader.reload()
                self.assertEqual([each.grace for each in connections], [grace] * (workers == 1))
                self.assertEqual(self.told_systemd(notice), b"STOPPING=1\nEXTEND_TIMEOUT_USEC=%d"
                                 % ((expected + margins * STOP_MARGIN) * 1_000_000), f"workers={workers} grace={grace}")


class SupervisorReloadTests(SynchronousTestCase):
    """The supervisor of workers, which serves no TLS itself, checks the certificates a reload names."""

    def test_broken_certificate_refused(self) -> None:
        """With workers and no [web], a certificate that does not match its key fails the reload."""
        files = GatewayFiles(self)
        top = build_service(load_settings(files.write(gateway="workers = 2")), ThreadCallReactor())
        [reloader] = children(top, Reloader)
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        files.renew_certificate_only()
        files.write(gateway="workers = 2", limits="max_connections_per_ip = 7")
        reloader.reload()
        failures = [line for line in messages(logged) if line.startswith("reload_failed ")]
        self.assertEqual(len(failures), 1, messages(logged))
        self.assertIn(files.key, failures[0])
        self.assertFalse([line for line in messages(logged) if line.startswith("reloaded ")])


class WorkerReloadTests(SynchronousTestCase):
    """
    A worker's reloader applies the configuration text its supervisor checked and runs with,
    asked over its channel (pumped by hand here), never the file as it is.
    """

    def setUp(self) -> None:
        self.files = GatewayFiles(self)
        running = load_settings(self.files.write(limits="max_connections_per_ip = 50"))
        self.reactor = ThreadCallReactor()
        gatekeeper = LocalGatekeeper(ConnectionLimits(ConnectionRules()),
                                     LoginPenalties(self.reactor, PenaltyRules()))  # type: ignore[arg-type]
        self.supervisor_text = running.text
        self.asked = 0
        supervisor = SupervisorChannel(gatekeeper, lambda event: None, 1, self.configuration, int)  # type: ignore[arg-type]
        self.channel = WorkerChannel(lambda: None)
        self.pump = iosim.connect(supervisor, iosim.FakeTransport(supervisor, True),
                                  self.channel, iosim.FakeTransport(self.channel, False))
        # Sockets as the supervisor passes them down; the worker's listeners take them over.
        inherited = [socket.socket().detach() for _ in mail_endpoints(running)]
        top = build_worker_service(running, self.reactor, gatekeeper, inherited,
                                   functools.partial(supervisor_configuration, self.channel, running.path), 1)
        [self.reloader] = children(top, Reloader)
        for listener in children(top, Listener):
            listener.privilegedStartService()
        self.fronts = [front_end_factory(factory) for _, _, factory in self.reactor.adoptedPorts]
        self.assertEqual(len(self.fronts), len(inherited))
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def configuration(self) -> str:
        """The supervisor's answer to the question: the text it runs with now."""
        self.asked += 1
        return self.supervisor_text

    def supervisor_reloads(self, limits: str) -> None:
        """The supervisor checks and adopts a configuration with the C{[limits]} lines C{limits}."""
        self.supervisor_text = load_settings(self.files.write(limits=limits)).text

    def per_ip_limits(self) -> set[int]:
        """The per-address connection limits of the worker's front ends."""
        return {front.context.limits.max_connections_per_ip for front in self.fronts}

    def lines(self, event: str) -> list[str]:
        """The log lines of C{event} so far."""
        return [line for line in messages(self.logged) if line.startswith(event + " ")]

    def test_supervisors_text_not_file(self) -> None:
        """A reload applies the supervisor's text, while the file holds an edit the supervisor has not checked."""
        self.supervisor_reloads("max_connections_per_ip = 7")
        self.files.write(limits="max_connections_per_ip = 9")
        self.reloader.reload()
        self.pump.flush()
        self.assertEqual(self.per_ip_limits(), {7})
        self.assertEqual(self.lines("reloaded"), [f"reloaded worker=1 path={self.files.path} certificates=1"])
        self.assertEqual(self.lines("reload_failed"), [])

    def test_supervisor_gone(self) -> None:
        """
        A reload whose question the channel loses (the supervisor has gone) fails, logged as
        reload_failed, and changes nothing; so does one asked for after that.
        """
        self.supervisor_reloads("max_connections_per_ip = 7")
        self.reloader.reload()
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.reloader.reload()
        self.assertEqual(self.per_ip_limits(), {50})
        self.assertEqual(self.lines("reload_failed"),
                         ["reload_failed worker=1 reason=the supervisor has gone: keeping the running configuration"] * 2)
        self.assertEqual(self.lines("reloaded"), [])

    def test_hangups_while_asking(self) -> None:
        """
        SIGHUPs that come while the worker waits for the supervisor's answer make one more reload
        once that answer is applied, which applies the supervisor's text as it is by then.
        """
        self.supervisor_reloads("max_connections_per_ip = 7")
        self.reloader.reload()
        self.pump.pump()  # the supervisor has answered; the answer is on its way
        self.supervisor_reloads("max_connections_per_ip = 8")
        self.reloader.reload()
        self.reloader.reload()
        self.assertEqual((self.asked, self.per_ip_limits()), (1, {50}))
        self.pump.pump()
        self.assertEqual(self.per_ip_limits(), {7})
        self.pump.flush()
        self.assertEqual((self.asked, self.per_ip_limits()), (2, {8}))
        self.assertEqual(len(self.lines("reloaded")), 2)


class RotationTests(ReloaderTestCase):
    """Every TICKET_KEY_LIFETIME the TLS contexts are rebuilt, giving new session ticket keys."""

    def test_rotation(self) -> None:
        """After TICKET_KEY_LIFETIME every default context is a new one, and the rotation is logged."""
        self.reloader.startService()
        self.addCleanup(self.reloader.stopService)
        before = self.contexts()
        self.reactor.advance(TICKET_KEY_LIFETIME - 1)
        self.assertEqual(self.contexts(), before)
        self.reactor.advance(1)
        after = self.contexts()
        for old, new in zip(before, after):
            self.assertIsNot(old, new)
        self.assertIn(f"ticket_keys_rotated contexts={len(self.tls)}", messages(self.logged))
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)

    def test_rotation_keeps_certificate(self) -> None:
        """Rotation rebuilds from the files in use: the served certificate is the same."""
        self.reloader.startService()
        self.addCleanup(self.reloader.stopService)
        served = [serial_served(server_tls) for server_tls in self.tls]
        self.reactor.advance(TICKET_KEY_LIFETIME)
        self.assertEqual([serial_served(server_tls) for server_tls in self.tls], served)

    def test_stop_ends_rotation(self) -> None:
        """stopService leaves no delayed call, and no rotation happens afterwards."""
        self.reloader.startService()
        self.reloader.stopService()
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        before = self.contexts()
        self.reactor.advance(TICKET_KEY_LIFETIME * 2)
        self.assertEqual(self.contexts(), before)

    def test_broken_files_keep_contexts(self) -> None:
        """A rotation that cannot read the files keeps the running contexts, logs it, and the next one works."""
        self.reloader.startService()
        self.addCleanup(self.reloader.stopService)
        with open(self.files.key, "rb") as f:
            good_key = f.read()
        with open(self.files.key, "w", encoding="ascii") as f:
            f.write("not a key\n")
        before = self.contexts()
        self.reactor.advance(TICKET_KEY_LIFETIME)
        self.assertEqual(self.contexts(), before)
        self.assertTrue([line for line in messages(self.logged) if line.startswith("ticket_key_rotation_failed ")])
        with open(self.files.key, "wb") as f:
            f.write(good_key)
        self.reactor.advance(TICKET_KEY_LIFETIME)
        for old, new in zip(before, self.contexts()):
            self.assertIsNot(old, new)


    def test_rotation_switches_together(self) -> None:
        """A rotation whose second context cannot be built keeps every running context, the first one included."""
        self.reloader.startService()
        self.addCleanup(self.reloader.stopService)
        before = self.contexts()
        break_key_after_first_context(self, self.files.key)
        self.reactor.advance(TICKET_KEY_LIFETIME)
        self.assertEqual(self.contexts(), before)
        self.assertTrue([line for line in messages(self.logged) if line.startswith("ticket_key_rotation_failed ")])

    def test_mismatched_key_keeps_rotating(self) -> None:
        """A rotation that finds a certificate and key that do not match is logged and the rotation goes on."""
        self.reloader.startService()
        self.addCleanup(self.reloader.stopService)
        with open(self.files.chain, "rb") as f:
            good_chain = f.read()
        self.files.renew_certificate_only()
        before = self.contexts()
        self.reactor.advance(TICKET_KEY_LIFETIME)
        self.assertEqual(self.contexts(), before)
        self.assertTrue([line for line in messages(self.logged) if line.startswith("ticket_key_rotation_failed ")])
        with open(self.files.chain, "wb") as f:
            f.write(good_chain)
        self.reactor.advance(TICKET_KEY_LIFETIME)
        for old, new in zip(before, self.contexts()):
            self.assertIsNot(old, new)


def expiring_in(days: int, cert_path: str, key_path: str) -> int:
    """Replace the certificate at C{cert_path} with one like it, signed by the same key, that ends in C{days}; its serial."""
    with open(key_path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    with open(cert_path, "rb") as f:
        original = x509.load_pem_x509_certificate(f.read())
    not_after = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=days)
    replacement = x509.CertificateBuilder(
        issuer_name=original.issuer, subject_name=original.subject, public_key=original.public_key(),
        serial_number=x509.random_serial_number(), not_valid_before=not_after - datetime.timedelta(days=365),
        not_valid_after=not_after, extensions=list(original.extensions),
    ).sign(key, hashes.SHA256())  # type: ignore[arg-type]
    with open(cert_path, "wb") as f:
        f.write(replacement.public_bytes(serialization.Encoding.PEM))
    return int(replacement.serial_number)


class SelfSignedRotationTests(SynchronousTestCase):
    """A self-signed certificate near its end is made anew at the ticket key rotation, not only at start and reload."""

    def test_renewed_at_rotation(self) -> None:
        """
        A gateway that neither restarts nor reloads serves a new self-signed certificate from the
        rotation after the old one came within 30 days of its end.
        """
        files = GatewayFiles(self)
        reactor = ThreadCallReactor()
        top = build_service(load_settings(files.write(self_signed=True)), reactor)
        [reloader] = children(top, Reloader)
        for listener in children(top, Listener):
            listener.privilegedStartService()
        fronts = [front_end_factory(factory) for _, factory, _, _ in reactor.tcpServers]
        cert_path = os.path.join(files.state_dir, "selfsigned-mail.example.org.crt")
        key_path = os.path.join(files.state_dir, "selfsigned-mail.example.org.key")
        started_with = serial_of(cert_path)
        expiring = expiring_in(29, cert_path, key_path)
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        reloader.rotate_ticket_keys()
        served = {serial_served(front.context.tls) for front in fronts}
        self.assertEqual(served, {serial_of(cert_path)})
        self.assertFalse(served & {expiring, started_with}, "not made anew")
        self.assertTrue([m for m in messages(logged) if m.startswith("self_signed_renewal ")], messages(logged))


    def test_worker_leaves_the_pair_to_its_supervisor(self) -> None:
        """
        A worker uses the self-signed pair as its supervisor made it, near its end or not, at
        start, rotation and reload: two processes writing the pair at once could leave a
        certificate and key that do not match.
        """
        files = GatewayFiles(self)
        settings = load_settings(files.write(self_signed=True))
        cert_path, key_path = ensure_self_signed(settings.state_dir, settings.hostname)
        expiring = expiring_in(29, cert_path, key_path)
        reactor = ThreadCallReactor()
        gatekeeper = LocalGatekeeper(ConnectionLimits(ConnectionRules()),
                                     LoginPenalties(reactor, PenaltyRules()))  # type: ignore[arg-type]
        inherited = [socket.socket().detach() for _ in mail_endpoints(settings)]
        for descriptor in inherited:
            self.addCleanup(os.close, descriptor)
        top = build_worker_service(settings, reactor, gatekeeper, inherited, lambda: succeed(settings), 1)
        [reloader] = children(top, Reloader)
        reloader.rotate_ticket_keys()
        reloader.reload()
        self.assertEqual(serial_of(cert_path), expiring)


class HangupTests(ReloaderTestCase):
    """SIGHUP hands a reload to the reactor."""

    def install_sentinel(self) -> list[int]:
        """
        Install a Python SIGHUP handler that records signals, so that a missing handler cannot
        end the test process.

        :returns: the signals the sentinel received.
        """
        received: list[int] = []

        def sentinel(signum: int, frame: FrameType | None) -> None:
            received.append(signum)

        signal.signal(signal.SIGHUP, sentinel)
        self.sentinel = sentinel
        return received

    def test_handler_installed_and_ignored_at_stop(self) -> None:
        """
        startService on the main thread installs a SIGHUP handler; stopService leaves SIGHUP ignored:
        the default action would end a process still ending its connections (gateway.shutdown).
        """
        received = self.install_sentinel()
        self.reloader.startService()
        self.assertIsNot(signal.getsignal(signal.SIGHUP), self.sentinel)
        self.reloader.stopService()
        self.assertIs(signal.getsignal(signal.SIGHUP), signal.SIG_IGN)
        self.assertEqual(received, [])

    def test_sighup_schedules_reload(self) -> None:
        """A SIGHUP calls reload through callFromThread, not inside the signal handler."""
        received = self.install_sentinel()
        self.reloader.startService()
        self.addCleanup(self.reloader.stopService)
        self.files.write(limits="max_connections_per_ip = 7")
        signal.raise_signal(signal.SIGHUP)
        self.assertEqual(received, [])
        self.assertEqual(len(self.reactor.from_threads), 1)
        self.assertFalse([line for line in messages(self.logged) if line.startswith("reloaded ")])
        function, args, kwargs = self.reactor.from_threads[0]
        function(*args, **kwargs)
        self.assertIn(f"reloaded path={self.files.path} certificates=1", messages(self.logged))
        self.assertEqual({front.context.limits.max_connections_per_ip for front in self.fronts}, {7})

    def test_held_hangup_delivered_at_start(self) -> None:
        """A SIGHUP held (blocked) before the reloader starts, as gateway.tap holds it, is one reload once it starts."""
        received = self.install_sentinel()
        self.addCleanup(signal.pthread_sigmask, signal.SIG_SETMASK, signal.pthread_sigmask(signal.SIG_BLOCK, []))
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        signal.raise_signal(signal.SIGHUP)
        self.assertIn(signal.SIGHUP, signal.sigpending())
        self.reloader.startService()
        self.addCleanup(self.reloader.stopService)
        self.assertNotIn(signal.SIGHUP, signal.sigpending())
        self.assertNotIn(signal.SIGHUP, signal.pthread_sigmask(signal.SIG_BLOCK, []))
        self.assertEqual(received, [])
        self.assertEqual([function for function, _, _ in self.reactor.from_threads], [self.reloader.reload])

    def test_no_handler_off_main_thread(self) -> None:
        """Started from another thread, the reloader leaves the SIGHUP handler alone."""
        self.install_sentinel()
        starter = threading.Thread(target=self.reloader.startService)
        starter.start()
        starter.join()
        self.assertIs(signal.getsignal(signal.SIGHUP), self.sentinel)
        self.reloader.stopService()
        self.assertIs(signal.getsignal(signal.SIGHUP), self.sentinel)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


@implementer(IListeningPort)
class FakePort:
    """
    A listening port at a fixed address.

    :ivar stopped: True once stopListening was called.
    """

    def __init__(self, address: IAddress) -> None:
        self.address = address
        self.stopped = False

    def startListening(self) -> None:
        """Nothing to start."""

    def stopListening(self) -> None:
        self.stopped = True

    def getHost(self) -> IAddress:
        return self.address


@implementer(IStreamServerEndpoint)
class FakeEndpoint:
    """
    An endpoint whose listen returns a given Deferred.

    :ivar factories: the factories it was asked to listen with, in order.
    """

    def __init__(self, result: Deferred[IListeningPort]) -> None:
        self.result = result
        self.factories: list[IProtocolFactory] = []

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        self.factories.append(factory)
        return self.result


LABEL = "protocol=imap tls=implicit_tls endpoint=tcp:993:interface=127.0.0.1"


class ListenerTests(SynchronousTestCase):
    """A Listener binds before privileges are dropped and stops start-up with one line on failure."""

    def setUp(self) -> None:
        self.factory = Factory()
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def test_bind_failure(self) -> None:
        """A failure to listen is a SystemExit with one line naming the endpoint and the reason."""
        error = CannotListenError("127.0.0.1", 993, OSError(98, "Address already in use"))
        listener = Listener(FakeEndpoint(fail(error)), self.factory, LABEL)
        with self.assertRaises(SystemExit) as raised:
            listener.privilegedStartService()
        message = str(raised.exception.code)
        self.assertTrue(message.startswith(f"mailgateway: {LABEL}: cannot listen: "), message)
        self.assertIn("Address already in use", message)
        self.assertNotIn("\n", message)
        self.assertIsNone(listener.port)

    def test_listen_not_at_once(self) -> None:
        """An endpoint that does not listen at once is a SystemExit naming it."""
        listener = Listener(FakeEndpoint(Deferred()), self.factory, LABEL)
        with self.assertRaises(SystemExit) as raised:
            listener.privilegedStartService()
        message = str(raised.exception.code)
        self.assertTrue(message.startswith(f"mailgateway: {LABEL}: "), message)
        self.assertNotIn("\n", message)

    def test_listening(self) -> None:
        """Listening logs the label and the bound address; start does not bind twice; stop stops the port."""
        port = FakePort(IPv4Address("TCP", "127.0.0.1", 10993))
        endpoint = FakeEndpoint(succeed(port))
        listener = Listener(endpoint, self.factory, LABEL)
        listener.privilegedStartService()
        self.assertIn(f"listening {LABEL} address=127.0.0.1:10993", messages(self.logged))
        listener.startService()
        self.assertEqual(endpoint.factories, [self.factory])
        self.assertIs(listener.port, port)
        listener.stopService()
        self.assertTrue(port.stopped)
        self.assertIsNone(listener.port)

    def test_start_without_privileged_start(self) -> None:
        """startService alone binds once (a listener added to a running service)."""
        port = FakePort(IPv4Address("TCP", "127.0.0.1", 10143))
        endpoint = FakeEndpoint(succeed(port))
        listener = Listener(endpoint, self.factory, LABEL)
        listener.startService()
        self.assertEqual(endpoint.factories, [self.factory])
        self.assertTrue(listener.running)
        listener.stopService()
        self.assertTrue(port.stopped)


class BacklogTests(SynchronousTestCase):
    """Mail, web and metrics listeners ask for a long accept queue unless their description names one."""

    def _listen(self, description: str) -> MemoryReactorClock:
        reactor = MemoryReactorClock()
        made = make_listener(reactor, description, Factory(), label="test", key="[imap] implicit_tls",
                        config_path="gateway.toml", proxy_sources=())
        made.privilegedStartService()
        return reactor

    def test_tcp(self) -> None:
        """A TCP listener gets a backlog of 511, as nginx's, in place of Twisted's 50."""
        self.assertEqual(self._listen("tcp:993:interface=127.0.0.1").tcpServers[0][2], 511)

    def test_named_backlog_kept(self) -> None:
        """A backlog the description names is the one used."""
        self.assertEqual(self._listen("tcp:993:backlog=20:interface=127.0.0.1").tcpServers[0][2], 20)

    def test_haproxy(self) -> None:
        """A listener behind a PROXY-protocol balancer gets it too."""
        self.assertEqual(self._listen("haproxy:tcp:993:interface=127.0.0.1").tcpServers[0][2], 511)

    def test_unix(self) -> None:
        """A UNIX-socket listener gets it too."""
        path = os.path.join(tempfile.mkdtemp(prefix="test_service-"), "imap.sock")
        self.addCleanup(shutil.rmtree, os.path.dirname(path))
        self.assertEqual(self._listen(f"unix:{path}").unixServers[0][2], 511)


class FakeProbedBackend:
    """
    A backend whose probe waits for the test.

    :ivar probing: the Deferred the last probe returned.
    :ivar cancelled: how many probes were cancelled.
    """

    address = "127.0.0.1:110"

    def __init__(self) -> None:
        self.cancelled = 0
        self.probing: Deferred[tuple[bytes, ...]] = Deferred(self._cancel)

    def _cancel(self, probing: Deferred[tuple[bytes, ...]]) -> None:
        self.cancelled += 1

    def probe(self) -> Deferred[tuple[bytes, ...]]:
        return self.probing


class CapabilityProbeTests(SynchronousTestCase):
    """The probe logs what the backend offers, or that it is unavailable, and is quiet when cancelled."""

    def setUp(self) -> None:
        self.backend = FakeProbedBackend()
        self.probe = CapabilityProbe(cast(BackendConnector, self.backend), "pop3")
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def backend_lines(self) -> list[str]:
        """The probe's log lines."""
        return [line for line in messages(self.logged) if line.startswith("backend_")]

    def test_capabilities(self) -> None:
        """A successful probe logs the backend's capabilities."""
        self.probe.startService()
        self.backend.probing.callback((b"TOP", b"UIDL", b"SASL PLAIN"))
        self.assertEqual(self.backend_lines(),
                         ["backend_capabilities protocol=pop3 backend=127.0.0.1:110 capabilities=TOP UIDL SASL PLAIN"])
        self.probe.stopService()
        self.assertEqual(self.backend.cancelled, 0)

    def test_unavailable(self) -> None:
        """A failed probe logs the backend as unavailable, with the reason."""
        self.probe.startService()
        self.backend.probing.errback(BackendUnavailable("cannot connect: Connection refused"))
        self.assertEqual(self.backend_lines(),
                         ["backend_unavailable protocol=pop3 backend=127.0.0.1:110 "
                          "reason=cannot connect: Connection refused"])
        self.probe.stopService()

    def test_cancelled_at_stop(self) -> None:
        """Stopping during the probe cancels it and logs nothing."""
        self.probe.startService()
        self.probe.stopService()
        self.assertEqual(self.backend.cancelled, 1)
        self.assertEqual(self.backend_lines(), [])


class StartUpHangupTests(SynchronousTestCase):
    """A SIGHUP before the reload handler exists (certbot's deploy hook right after a start) ends no process."""

    def run_python(self, *arguments: str, **options: Any) -> subprocess.Popen[str]:
        """Start Python with C{arguments} in a new process, from the repository root."""
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        process = subprocess.Popen([sys.executable, *arguments], cwd=root, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, **options)
        self.addCleanup(process.communicate)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        return process

    def test_gateway(self) -> None:
        """After makeService a SIGHUP is held, and once the reloader starts it reloads."""
        files = GatewayFiles(self)
        process = self.run_python("-c", """\
import os, signal, sys
from gateway.service import Reloader
from gateway.tap import Options, makeService

options = Options()
options.parseOptions(["--config", sys.argv[1]])
top = makeService(options)
os.kill(os.getpid(), signal.SIGHUP)
print("alive", flush=True)
[reloader] = [service for service in top if isinstance(service, Reloader)]
reloader.reload = lambda: print("reload", flush=True)
reloader.startService()
from twisted.internet import reactor
reactor.callLater(0.2, reactor.stop)
reactor.run()
reloader.stopService()
""", files.write(self_signed=True))
        out, err = process.communicate(timeout=60)
        self.assertEqual((process.returncode, out), (0, "alive\nreload\n"), err)

    def test_worker(self) -> None:
        """A worker that is starting, and has not asked the supervisor for its configuration yet, outlives a SIGHUP."""
        ours, theirs = socket.socketpair()
        with theirs:
            process = self.run_python("-m", "gateway.worker", "--config", "/nonexistent.toml", "--number", "0",
                                      "--listeners", "0", close_fds=False,
                                      preexec_fn=lambda: os.dup2(theirs.fileno(), CONTROL_FD))
        with ours:
            ours.settimeout(60)
            self.assertTrue(ours.recv(4096))  # its "hello": the worker runs, and asks
            process.send_signal(signal.SIGHUP)
            time.sleep(0.5)
            self.assertIsNone(process.poll())
        process.communicate(timeout=60)  # the channel closed: the worker ends by itself
        self.assertGreaterEqual(process.returncode, 0)


def certificate_warnings(logged: EventLoggingObserver) -> list[str]:
    """The certificate validity warnings among the log lines so far, each as its event name and path."""
    return [" ".join(m.split()[:2]) for m in messages(logged) if m.startswith("certificate_")]


class CertificateValidityTests(SynchronousTestCase):
    """
    The served certificates that are expired, not valid yet or near their end are warned about
    at start and at each reload, once for the gateway: by the process that reads the file.
    """

    def setUp(self) -> None:
        self.files = GatewayFiles(self)
        self.reactor = ThreadCallReactor()
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.addCleanup(signal.signal, signal.SIGHUP, signal.getsignal(signal.SIGHUP))

    def sni(self) -> tuple[str, str]:
        """Write an SNI certificate for mail.example.net; its chain and key paths."""
        issued = self.files.ca.issue("mail.example.net")
        chain, key = (os.path.join(self.files.directory, name) for name in ("net.pem", "net.key"))
        shutil.copyfile(issued.chain_path, chain)
        shutil.copyfile(issued.key_path, key)
        return chain, key

    def write(self, sni_chain: str, sni_key: str, **config: Any) -> str:
        return self.files.write(extra=f'[[tls.sni]]\nnames = ["mail.example.net"]\ncertificate = "{sni_chain}"\n'
                                      f'private_key = "{sni_key}"\n', **config)

    def test_start(self) -> None:
        """
        At start, a default certificate 10 days from its end and an expired SNI one are named,
        and the expired one is served all the same.
        """
        sni_chain, sni_key = self.sni()
        expiring_in(10, self.files.chain, self.files.key)
        expired = expiring_in(-1, sni_chain, sni_key)
        top = build_service(load_settings(self.write(sni_chain, sni_key)), self.reactor)
        self.assertEqual(certificate_warnings(self.logged),
                         [f"certificate_expires_soon path={self.files.chain}", f"certificate_expired path={sni_chain}"])
        [listener] = [each for each in children(top, Listener) if "protocol=imap tls=implicit_tls" in each.label]
        listener.privilegedStartService()
        tls = front_end_factory(self.reactor.tcpServers[-1][1]).context.tls
        self.assertEqual(serial_of(sni_chain), expired)
        self.assertIn(sni_chain, [entry.certificate for entry in tls.files.sni])

    def test_reload(self) -> None:
        """Each reload names the certificates it put in use that are near their end; a failed one names none."""
        sni_chain, sni_key = self.sni()
        top = build_service(load_settings(self.write(sni_chain, sni_key)), self.reactor)
        [reloader] = children(top, Reloader)
        self.assertEqual(certificate_warnings(self.logged), [])
        expiring_in(3, sni_chain, sni_key)
        reloader.reload()
        reloader.reload()
        self.assertEqual(certificate_warnings(self.logged), [f"certificate_expires_soon path={sni_chain}"] * 2)
        self.write(sni_chain, sni_key, limits="max_connections = -1")
        reloader.reload()
        self.assertEqual(len(certificate_warnings(self.logged)), 2)
        self.assertTrue([m for m in messages(self.logged) if m.startswith("reload_failed ")])

    def test_worker_leaves_warnings_to_its_supervisor(self) -> None:
        """
        A worker loads the same certificates at start and reload, and warns of none, nor of a
        descriptor limit too low for max_connections: its supervisor does.
        """
        limits = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, limits)
        expiring_in(3, self.files.chain, self.files.key)
        settings = load_settings(self.files.write(limits="max_connections = 1000000"))
        gatekeeper = LocalGatekeeper(ConnectionLimits(ConnectionRules()),
                                     LoginPenalties(self.reactor, PenaltyRules()))  # type: ignore[arg-type]
        inherited = [socket.socket().detach() for _ in mail_endpoints(settings)]
        for descriptor in inherited:
            self.addCleanup(os.close, descriptor)
        top = build_worker_service(settings, self.reactor, gatekeeper, inherited, lambda: succeed(settings), 2)
        [reloader] = children(top, Reloader)
        reloader.reload()
        self.assertEqual([m for m in messages(self.logged) if m.startswith("reloaded ")][:1],
                         [f"reloaded worker=2 path={settings.path} certificates=1"])
        self.assertEqual(certificate_warnings(self.logged), [])
        self.assertEqual([m for m in messages(self.logged) if m.startswith("descriptor_limit ")], [])


class CheckServiceTests(SynchronousTestCase):
    """check_service loads and checks what a start would, and starts and writes nothing."""

    def setUp(self) -> None:
        self.files = GatewayFiles(self)
        self.reactor = ThreadCallReactor()
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def test_nothing_started(self) -> None:
        """A good configuration passes with no port bound, connection made or timer left, with or without workers."""
        for gateway_table in ("", "workers = 2"):
            check_service(load_settings(self.files.write(gateway=gateway_table)), self.reactor)
        self.assertEqual((self.reactor.tcpServers, self.reactor.tcpClients, self.reactor.getDelayedCalls()),
                         ([], [], []))

    def test_errors_of_a_start(self) -> None:
        """What a start refuses, the check refuses with the same message."""
        self.files.renew_certificate_only()
        settings = load_settings(self.files.write())
        with self.assertRaises(ConfigError) as started:
            build_service(settings, self.reactor)
        with self.assertRaises(ConfigError) as checked:
            check_service(settings, self.reactor)
        self.assertEqual(str(checked.exception), str(started.exception))
        self.assertIn(self.files.key, str(checked.exception))

    def test_self_signed_not_made(self) -> None:
        """A self-signed certificate a start would make is made elsewhere and thrown away: state_dir stays untouched."""
        check_service(load_settings(self.files.write(self_signed=True)), self.reactor)
        self.assertFalse(os.path.exists(self.files.state_dir))

    def test_state_dir_not_writable(self) -> None:
        """A state_dir a start could not make the self-signed pair in fails the check too (here: under a file)."""
        blocker = os.path.join(os.path.dirname(self.files.state_dir), "a-file")
        with open(blocker, "w"):
            pass
        self.files.state_dir = os.path.join(blocker, "state")
        settings = load_settings(self.files.write(self_signed=True))
        with self.assertRaises(ConfigError) as started:
            build_service(settings, self.reactor)
        with self.assertRaises(ConfigError) as checked:
            check_service(settings, self.reactor)
        prefix = f"{settings.path}: [tls] self_signed: cannot create a certificate in [gateway] state_dir: "
        for error in (started.exception, checked.exception):
            self.assertTrue(str(error).startswith(prefix), str(error))

    def test_self_signed_not_renewed(self) -> None:
        """A self-signed certificate near its end is checked as it is: not renewed (a start does that), not warned about."""
        settings = load_settings(self.files.write(self_signed=True))
        cert_path, key_path = ensure_self_signed(settings.state_dir, settings.hostname)
        expiring = expiring_in(10, cert_path, key_path)
        check_service(settings, self.reactor)
        self.assertEqual(serial_of(cert_path), expiring)
        self.assertEqual(certificate_warnings(self.logged), [])

    def test_expired_certificate_warned(self) -> None:
        """An expired certificate is warned about, as at start, and is no error."""
        expiring_in(-2, self.files.chain, self.files.key)
        check_service(load_settings(self.files.write()), self.reactor)
        self.assertEqual(certificate_warnings(self.logged), [f"certificate_expired path={self.files.chain}"])


class SupervisorChecksWorkerFilesTests(SynchronousTestCase):
    """With workers, the supervisor's start (and so the check) loads the files only workers use, as one process does."""

    def setUp(self) -> None:
        self.files = GatewayFiles(self)
        self.reactor = ThreadCallReactor()

    def build_with(self, old: str, new: str) -> str:
        """Build a supervisor from the configuration with C{old} replaced by C{new}; the ConfigError's message."""
        with open(self.files.write(gateway="workers = 2"), encoding="utf-8") as f:
            config = f.read()
        self.assertIn(old, config)
        with open(self.files.path, "w", encoding="utf-8") as f:
            f.write(config.replace(old, new, 1))
        with self.assertRaises(ConfigError) as raised:
            build_service(load_settings(self.files.path), self.reactor)
        return str(raised.exception)

    def test_senders_file(self) -> None:
        """A malformed senders file ends the start, naming [submission] senders_file."""
        senders = os.path.join(self.files.directory, "senders")
        with open(senders, "w", encoding="utf-8") as f:
            f.write("alice no colon\n")
        message = self.build_with("[submission]\n", f'[submission]\nsenders_file = "{senders}"\n')
        self.assertIn("[submission] senders_file", message)

    def test_backend_ca_file(self) -> None:
        """A backend CA file without a certificate ends the start, naming the backend."""
        ca_file = os.path.join(self.files.directory, "backend-ca.pem")
        with open(ca_file, "w", encoding="utf-8") as f:
            f.write("not a certificate\n")
        message = self.build_with('[pop3.backend]\nhost = "127.0.0.1"\n',
                                  f'[pop3.backend]\nhost = "127.0.0.1"\ntls = "starttls"\nca_file = "{ca_file}"\n')
        self.assertIn(f"[pop3.backend]: {ca_file}: no valid PEM certificate found", message)
