"""
The gateway's configuration: one TOML file, validated once at start into frozen settings.

Every check lives here. A wrong key, value or unreadable file raises L{ConfigError}, whose
message is one line naming the file, the key and the expected form. Nothing else in the
gateway parses configuration.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import pwd
import re
import socket
import stat
import tomllib
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar, cast

from gateway.addresses import Network, parse_ip, plain_address

BackendTLS = Literal["none", "starttls", "implicit"]
BackendLogin = Literal["replay", "master", "xclient"]
AuthMode = Literal["local", "backend"]

# Listeners carry plain streams: the gateway adds TLS itself, so "ssl:" endpoints are refused.
_ENDPOINT_TYPES = ("tcp", "tcp6", "unix", "systemd")
PROXY_PREFIX = "haproxy:"
MAX_WORKERS = 64
"""A listener description starting with this takes a PROXY header from [limits] proxy_sources."""

T = TypeVar("T")

_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
_HOST_NAME_FORM = "a host name such as mail.example.org"
_UPSTREAM = re.compile(r"http://(?:[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:]+\])(?::(\d{1,5}))?/?")


def is_host_name(name: str) -> bool:
    """
    Whether C{name} is a DNS host name: letters, digits and inner hyphens in labels of at most
    63 characters, at most 253 in all, and no trailing dot (the configuration drops one).
    """
    return _HOSTNAME.fullmatch(name) is not None


class ConfigError(Exception):
    """The configuration cannot be used; the message is one line for the operator."""


@dataclass(frozen=True)
class NamedCertificate:
    """
    A certificate for the clients that ask for one of C{names} by SNI.

    :ivar names: host names, lower-case; C{*.example.org} matches one label below example.org.
    """

    names: tuple[str, ...]
    certificate: str
    private_key: str


@dataclass(frozen=True)
class TLSSettings:
    """
    The certificate the listeners present.

    :ivar certificate: PEM file with the leaf certificate followed by its intermediates.
    :ivar private_key: PEM file with the private key.
    :ivar self_signed: generate (once) and use a self-signed certificate instead; for trials and tests.
    :ivar sni: further certificates, each for the clients that ask for one of its names.
    """

    certificate: str | None
    private_key: str | None
    self_signed: bool
    sni: tuple[NamedCertificate, ...] = ()


@dataclass(frozen=True)
class BackendSettings:
    """
    How to reach and log in to the plaintext store behind one protocol.

    :ivar tls: C{none}, C{starttls} or C{implicit}; with TLS the certificate and the host name
        (C{server_name}) are verified against C{ca_file}, or the system's trust store.
    :ivar timeout: seconds allowed to connect and log in, after which the backend counts as down.
    :ivar login: C{replay} logs in with the client's credentials; C{master} logs in with the
        gateway's own account: IMAP and POP3 as C{master_user} on behalf of the user (SASL PLAIN's
        authorization identity, for Dovecot master users),
        submission as C{master_user} (a relay account); C{xclient} (submission only) tells
        Postfix who the client is with XCLIENT instead of logging in.
    :ivar forward_client_ip: tell the backend the client's address (IMAP C{ID x-originating-ip},
        POP3 and SMTP C{XCLIENT ADDR=... PORT=...}).
    """

    host: str
    port: int
    tls: BackendTLS
    ca_file: str | None
    server_name: str
    timeout: float
    login: BackendLogin
    master_user: str | None
    master_password: bytes | None = field(repr=False)
    forward_client_ip: bool


@dataclass(frozen=True)
class ProtocolSettings:
    """
    The listeners of one protocol and its backend.

    :ivar implicit_tls: endpoint descriptions of the listeners that speak TLS from the first byte.
    :ivar starttls: endpoint descriptions of the listeners that start in clear and upgrade.
    """

    implicit_tls: tuple[str, ...]
    starttls: tuple[str, ...]
    backend: BackendSettings


@dataclass(frozen=True)
class SubmissionSettings:
    """
    Submission listeners, their backend MTA and the rules for relayed mail.

    :ivar senders_file: optional map of the sender addresses each user may use besides its
        login name (when that is an address).
    :ivar max_message_size: largest message in bytes, announced as SIZE and enforced.
    :ivar max_recipients: recipients per message.
    :ivar idle_timeout: seconds of silence after login before the connection is closed.
    :ivar transaction_timeout: seconds a MAIL transaction may take from MAIL to DATA's 354; the
        upload after it is bounded only by C{idle_timeout} between reads.
    """

    implicit_tls: tuple[str, ...]
    starttls: tuple[str, ...]
    backend: BackendSettings
    senders_file: str | None
    max_message_size: int
    max_recipients: int
    idle_timeout: float
    transaction_timeout: float


@dataclass(frozen=True)
class WebSettings:
    """
    HTTPS: client autoconfiguration, an optional webmail reverse proxy, and an HTTP redirector.

    :ivar https: endpoint descriptions of the HTTPS listeners.
    :ivar http: endpoint descriptions of plain HTTP listeners: they redirect to HTTPS (301;
        Outlook's Autodiscover, 302), except the autoconfig paths, which Thunderbird also asks over HTTP.
    :ivar public_host: the host name clients are told to use (default: [gateway] hostname).
    :ivar hsts_max_age: seconds for the Strict-Transport-Security header (0: browsers forget the policy).
    :ivar upstream: C{http://host:port} of a plaintext webmail that every other path goes to.
    :ivar autoconfig_username: C{%EMAILADDRESS%} or C{%EMAILLOCALPART%}: what users log in with.
    :ivar acme_webroot: the directory certbot's C{--webroot} writes challenges under; the plain
        HTTP listeners serve C{/.well-known/acme-challenge/TOKEN} from it. None: redirected as the rest.
    """

    https: tuple[str, ...]
    http: tuple[str, ...]
    public_host: str
    hsts_max_age: int
    upstream: str | None
    autoconfig_username: str
    acme_webroot: str | None = None


@dataclass(frozen=True)
class MetricsSettings:
    """
    :ivar listen: endpoint descriptions of the plain HTTP listeners serving C{/metrics}
        (loopback by default: the metrics tell who logs in how often).
    """

    listen: tuple[str, ...]


@dataclass(frozen=True)
class AuthSettings:
    """
    Who decides whether a login is good.

    :ivar mode: C{local} checks the users file; C{backend} lets the backend's answer decide.
    :ivar failure_delay: seconds from a first failed login command to its reply, for every cause
        alike; it doubles with each earlier failure of the user, the client or the pair, up to
        C{failure_delay_max}.
    :ivar hash_threads: size of the thread pool that verifies password hashes, in each worker process.
    :ivar ip_failure_budget: failures from one client address in C{failure_window} after which
        its logins are refused before any password is checked.
    :ivar user_failures_free: failures of one user, from any address, before they slow that user.
    :ivar failure_window: seconds over which failures are counted.
    :ivar ipv6_prefix: IPv6 clients are counted per network of this prefix length.
    """

    mode: AuthMode
    users_file: str | None
    failure_delay: float
    hash_threads: int
    failure_delay_max: float = 15.0
    ip_failure_budget: int = 20
    user_failures_free: int = 5
    failure_window: float = 600.0
    ipv6_prefix: int = 64


@dataclass(frozen=True)
class Limits:
    """
    Bounds on what an unauthenticated client may do.

    :ivar line_length: longest command line in bytes, without CRLF.
    :ivar literal_size: largest IMAP literal before login.
    :ivar idle_timeout: seconds of silence before a client that has not logged in is dropped.
    :ivar login_timeout: seconds from connect by which the client must have logged in; a login the gateway
        is still working on then gets its answer first.
    :ivar login_attempts: failed logins allowed on one connection.
    :ivar errors: consecutive protocol errors before the connection is closed.
    :ivar max_connections: connections the whole gateway holds at once.
    :ivar max_connections_per_ip: connections one client address holds at once.
    :ivar max_sessions_per_user: logged-in sessions one user holds at once.
    :ivar relay_idle_timeout: seconds without a byte either way after which a relayed IMAP or
        POP3 session is closed (IMAP IDLE clients renew within 29 minutes).
    :ivar trusted_networks: client networks exempt from the per-address limits and penalties.
    :ivar proxy_sources: load balancers allowed to connect to C{haproxy:} listeners.
    :ivar stop_grace: seconds a stopping gateway waits for its connections to end (an MTA's
        verdict on a message, a relayed session's last bytes) before it drops those left.
    """

    line_length: int = 8192
    literal_size: int = 8192
    # Dovecot's login processes give a client three minutes to log in (CLIENT_LOGIN_TIMEOUT_MSECS): a
    # user at a mail client's password prompt must not be cut off sooner through the gateway.
    idle_timeout: float = 180.0
    login_timeout: float = 180.0
    login_attempts: int = 3
    errors: int = 5
    max_connections: int = 10_000
    max_connections_per_ip: int = 50
    max_sessions_per_user: int = 50
    relay_idle_timeout: float = 1860.0
    trusted_networks: tuple[Network, ...] = ()
    proxy_sources: tuple[Network, ...] = ()
    stop_grace: float = 8.0


@dataclass(frozen=True)
class Settings:
    """
    The whole validated configuration.

    :ivar workers: processes that serve the mail listeners; above 1 a supervisor process holds
        the listening sockets, the web and metrics listeners, and the shared limits and penalties.
    :ivar workers_setting: C{workers} as written (a count or C{"auto"}), which a reload compares:
        C{"auto"} counts the CPUs online, which may change while the gateway runs.
    :ivar text: the TOML text the settings were read from.
    """

    path: str
    hostname: str
    state_dir: str
    tls: TLSSettings
    auth: AuthSettings
    limits: Limits
    imap: ProtocolSettings | None
    pop3: ProtocolSettings | None
    submission: SubmissionSettings | None
    web: WebSettings | None = None
    metrics: MetricsSettings | None = None
    workers: int = field(default=1, compare=False)
    workers_setting: int | str = 1
    text: str = field(default="", compare=False, repr=False)


class _Table:
    """
    One TOML table being read: typed getters that name the key on error, and a final check
    that no key was left unread (a misspelt key must not be silently ignored).
    """

    def __init__(self, path: str, name: str, data: object) -> None:
        self._path = path
        self.name = name
        if not isinstance(data, dict):
            raise self.error(None, "a table", data)
        self._data: dict[str, Any] = data
        self._read: set[str] = set()

    def error(self, key: str | None, expected: str, got: object = None) -> ConfigError:
        where = f"[{self.name}]" + (f" {key}" if key else "")
        shown = "" if got is None else f", got {_show(got)}"
        return ConfigError(f"{self._path}: {where}: expected {expected}{shown}")

    def has(self, key: str) -> bool:
        """Whether C{key} is set; asking makes it a known key, so that the unknown-key message lists it."""
        self._read.add(key)
        return key in self._data

    def _get(self, key: str, default: T, kind: type | tuple[type, ...], expected: str) -> T:
        self._read.add(key)
        if key not in self._data:
            return default
        value = self._data[key]
        # bool is an int in Python; never accept true where a number is expected.
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            raise self.error(key, expected, value)
        return cast(T, value)  # checked above against kind

    def string(self, key: str, default: str | None = None, *, expected: str = "a string") -> str | None:
        value = self._get(key, default, str, expected)
        if value is not None and not value.strip():
            raise self.error(key, expected, value)
        return value

    def boolean(self, key: str, default: bool) -> bool:
        return self._get(key, default, bool, "true or false")

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        expected = f"an integer from {low} to {high}"
        value = self._get(key, default, int, expected)
        if not low <= value <= high:
            raise self.error(key, expected, value)
        return value

    def seconds(self, key: str, default: float, low: float, high: float) -> float:
        expected = f"a number of seconds from {low:g} to {high:g}"
        value = self._get(key, default, (int, float), expected)
        if not low <= value <= high:
            raise self.error(key, expected, value)
        return float(value)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        expected = "one of " + ", ".join(f'"{c}"' for c in choices)
        value = self._get(key, default, str, expected)
        if value not in choices:
            raise self.error(key, expected, value)
        return value

    def path(self, key: str, default: str | None = None, *, expected: str) -> str | None:
        """A file or directory path; every path key is read here, so none holds a NUL byte, which os calls refuse."""
        path = self.string(key, default, expected=expected)
        if path is not None and "\0" in path:
            raise self.error(key, expected, path)
        return path

    def readable_file(self, key: str) -> str | None:
        expected = "the path of a readable file"
        path = self.path(key, expected=expected)
        problem = None if path is None else _unreadable(path)
        if problem is not None:
            raise ConfigError(f"{self.error(key, expected, path)} ({problem})")
        return path

    def endpoints(self, key: str, proxy: bool = True) -> tuple[str, ...]:
        """Listener descriptions; C{proxy} allows the C{haproxy:} prefix (the mail listeners take it)."""
        expected = ('a list of endpoint descriptions such as ["tcp:993"] (' + "/".join(_ENDPOINT_TYPES) +
                    (', optionally behind "haproxy:")' if proxy else ")"))
        value: list[Any] = self._get(key, [], list, expected)
        for item in value:
            if not isinstance(item, str) or (not proxy and item.startswith(PROXY_PREFIX)):
                raise self.error(key, expected, item)
            if item.removeprefix(PROXY_PREFIX).split(":", 1)[0] not in _ENDPOINT_TYPES:
                raise self.error(key, expected, item)
        return tuple(value)

    def networks(self, key: str) -> tuple[Network, ...]:
        """
        A list of networks. An IPv4-mapped IPv6 network (C{::ffff:192.0.2.0/120}) is taken as the
        IPv4 network it maps (C{192.0.2.0/24}), since a client's address is compared in its IPv4
        form (L{gateway.addresses.plain_address}); as written it would never match. A bare address
        is a network of that one address. An address with bits set past its prefix
        (C{10.0.0.5/24}, as C{ip addr} shows an interface) is refused: whether it means the one host
        or the whole network is a guess, and guessing the network trusts hosts nobody listed.
        """
        expected = 'a list of networks such as ["192.0.2.0/24", "2001:db8::/48"]'
        value: list[Any] = self._get(key, [], list, expected)
        networks = []
        for item in value:
            if not isinstance(item, str):  # ip_network takes 1 or true as the address 0.0.0.1
                raise self.error(key, expected, item)
            try:
                written = ipaddress.ip_interface(item)
                network = written.network
            except (TypeError, ValueError):
                raise self.error(key, expected, item) from None
            host: ipaddress.IPv4Address | ipaddress.IPv6Address = written.ip
            if isinstance(written, ipaddress.IPv6Interface) and written.ip.ipv4_mapped is not None:
                if network.prefixlen < 96:  # beyond the mapped addresses: no IPv4 network says it
                    raise self.error(key, "an IPv4 network in its IPv4 form (::ffff:a.b.c.d/n is a.b.c.d/(n-96), "
                                     "for n of 96 or more)", item)
                mapped = written.network.network_address.ipv4_mapped
                network = ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - 96}")
                host = written.ip.ipv4_mapped
            if isinstance(written, ipaddress.IPv6Interface) and written.scope_id:
                # Clients are matched by address alone: fe80::1%eth1 would pass as well.
                raise self.error(key, "a network without an interface (%zone): clients are matched by "
                                      "address alone", item)
            if host != network.network_address:
                raise ConfigError(f"{self.error(key, 'a network address, with no bits set past its prefix', item)}: "
                                  f"did you mean {network} (or {host} for that host alone)?")
            networks.append(network)
        return tuple(networks)

    def host_name(self, key: str, name: str, *, address: bool = False) -> str:
        """
        Check C{name}, read from C{key}, as a host name (or with C{address}, an IP address too).

        :returns: the name without a trailing dot: an absolute name, as written in DNS zone files,
            names the same host, and certificates, SNI and clients know it without the dot.
        """
        expected = _HOST_NAME_FORM + (" or an IP address" if address else "")
        relative = name.removesuffix(".")
        if not is_host_name(relative) and not (address and parse_ip(name) is not None):
            raise self.error(key, expected, name)
        return relative

    def tables(self, key: str) -> list[_Table]:
        """An array of tables (C{[[name.key]]}), each read like a table."""
        items: list[Any] = self._get(key, [], list, f"[[{self.name}.{key}]] tables")
        return [_Table(self._path, f"{self.name}.{key}#{number}", item) for number, item in enumerate(items, 1)]

    def table(self, key: str) -> _Table:
        self._read.add(key)
        return _Table(self._path, f"{self.name}.{key}" if self.name else key, self._data.get(key, {}))

    def finish(self) -> None:
        unknown = sorted(set(self._data) - self._read)
        if unknown:
            where = f"[{self.name}] " if self.name else ""
            known = ", ".join(sorted(self._read)) or "none"
            key = unknown[0] if unknown[0].isidentifier() else _show(unknown[0])
            raise ConfigError(f"{self._path}: {where}{key}: unknown key (known here: {known})")


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _unreadable(path: str) -> str | None:
    """Why C{path} is not a regular file this process can read (for the operator), or None."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return "not a regular file"  # a FIFO or device would block or never end
        with open(path, "rb"):
            return None
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            # The usual cause: a file only root may read, checked or run as the service user.
            return f"{e.strerror} for {_user_name()}"
        return e.strerror or type(e).__name__


def _user_name() -> str:
    """This process's user, as the operator knows it."""
    uid = os.geteuid()
    try:
        return f"user {pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"uid {uid}"


def _split_endpoint(description: str) -> tuple[str, list[tuple[str | None, str]]]:
    """
    Split an endpoint description as Twisted does: fields on unescaped C{:}, a field's name
    from its value on the first unescaped C{=}, and a backslash escaping the next character.

    :param description: e.g. C{tcp6:993:interface=\\:\\:}.
    :returns: the endpoint type, and C{(name or None, value)} for each further field.
    """
    fields: list[list[str]] = [[""]]
    escaped = False
    for character in description:
        if escaped:
            fields[-1][-1] += character
            escaped = False
        elif character == "\\":
            escaped = True
        elif character == ":":
            fields.append([""])
        elif character == "=" and len(fields[-1]) == 1:
            fields[-1].append("")
        else:
            fields[-1][-1] += character
    rest: list[tuple[str | None, str]] = [
        (None, field[0]) if len(field) == 1 else (field[0], field[1]) for field in fields[1:]]
    return fields[0][0], rest


def tcp_endpoint(description: str) -> tuple[str, str, int] | None:
    """
    What a C{tcp:} or C{tcp6:} endpoint description binds: its kind, its interface (C{""} for
    all) and its port; None for any other kind, or a port that is no number.
    """
    kind, fields = _split_endpoint(description)
    if kind not in ("tcp", "tcp6"):
        return None
    positional = [value for key, value in fields if key is None]
    named = {key: value for key, value in fields if key is not None}
    port = named.get("port", positional[0] if positional else "")
    if not (port.isascii() and port.isdigit()):
        return None
    return kind, named.get("interface", ""), int(port)


def _binds(endpoint: tuple[str, str, int], host: str, port: int) -> bool:
    """Whether a connection to C{host}:C{port} (a loopback or an exact address) reaches this listener."""
    kind, interface, bound_port = endpoint
    bound = parse_ip(interface or ("0.0.0.0" if kind == "tcp" else "::"))
    if port != bound_port or bound is None:
        return False
    for address in [parse_ip(name) for name in (("127.0.0.1", "::1") if host == "localhost" else (host,))]:
        if address is None:
            continue
        if bound.is_unspecified:  # all of the host's addresses; "::" takes IPv4 too, unless bindv6only
            if address.is_loopback and (bound.version == address.version or (bound.version == 6 and not _v6_only())):
                return True
        elif bound == address:
            return True
    return False


def _v6_only() -> bool:
    """Whether an IPv6 socket bound to "::" takes IPv6 alone here (Twisted leaves IPV6_V6ONLY to the system)."""
    try:
        with open("/proc/sys/net/ipv6/bindv6only", "rb") as f:
            return f.read().strip() == b"1"
    except OSError:
        return False


def load_settings(path: str, text: str | None = None) -> Settings:
    """
    Read and validate the configuration file.

    :param path: the TOML file.
    :param text: the file's contents as read before (a worker gets the text its supervisor
        runs with), instead of reading the file now.
    :returns: the frozen settings, with the text they came from.
    :raises ConfigError: for anything wrong, with a one-line message.
    """
    try:
        if text is None:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        data = tomllib.loads(text)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration file ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML (not UTF-8)") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    return replace(parse_settings(path, data), text=text)


def parse_settings(path: str, data: dict[str, Any]) -> Settings:
    """
    Validate already-decoded TOML data; C{path} is only used in messages and to resolve nothing.

    :raises ConfigError: for anything wrong, with a one-line message.
    """
    root = _Table(path, "", data)
    gateway = root.table("gateway")
    hostname = gateway.string("hostname", expected=_HOST_NAME_FORM) or socket.gethostname()
    hostname = gateway.host_name("hostname", hostname)
    state_dir = gateway.path("state_dir", "/var/lib/mailgateway", expected="the path of a directory")
    assert state_dir is not None
    workers_setting = gateway._get("workers", 1, (int, str), _WORKERS_FORM)
    workers = _workers(gateway, workers_setting)
    gateway.finish()

    tls = _tls_settings(root.table("tls"))
    auth = _auth_settings(root.table("auth"))
    limits = _limits(root.table("limits"))
    imap = _protocol_settings(root, "imap", default_backend_port=143) if root.has("imap") else None
    pop3 = _protocol_settings(root, "pop3", default_backend_port=110) if root.has("pop3") else None
    submission = _submission_settings(root.table("submission")) if root.has("submission") else None
    web = _web_settings(root.table("web"), hostname) if root.has("web") else None
    metrics = _metrics_settings(root.table("metrics")) if root.has("metrics") else None
    root.finish()

    protocols = {name: protocol for name, protocol in (("imap", imap), ("pop3", pop3), ("submission", submission))
                 if protocol is not None}
    if not protocols:
        raise ConfigError(f"{path}: [imap], [pop3] or [submission]: expected at least one protocol section "
                          "with a listener")
    listeners = _endpoints_of(protocols)
    for name, protocol in protocols.items():
        for other, kind, description in listeners:
            endpoint = tcp_endpoint(description.removeprefix(PROXY_PREFIX))
            if endpoint is not None and _binds(endpoint, protocol.backend.host, protocol.backend.port):
                # A backend left at its default port on a host where the gateway took that port:
                # every login would go round to the gateway, and fail as if the store were down.
                raise ConfigError(f"{path}: [{name}.backend] port: expected the mail store's port, got "
                                  f"{protocol.backend.port}, where the gateway itself listens "
                                  f"([{other}] {kind} {description!r})")
        if workers > 1:
            unix = [d for d in protocol.implicit_tls + protocol.starttls if _is_unix(d)]
            if unix:
                raise ConfigError(f"{path}: [gateway] workers: expected 1 while [{name}] listens on the UNIX socket "
                                  f"{unix[0]!r} (workers share TCP listeners only)")
        proxied = [d for d in protocol.implicit_tls + protocol.starttls if d.startswith(PROXY_PREFIX)]
        if proxied and not limits.proxy_sources:
            raise ConfigError(f"{path}: [limits] proxy_sources: expected the load balancers' networks, "
                              f"since [{name}] listens on {proxied[0]!r}")
        if auth.mode == "backend" and protocol.backend.login != "replay":
            raise ConfigError(
                f'{path}: [{name}.backend] login: expected "replay" when [auth] mode is "backend"'
                " (the backend must see the client's password to decide)"
            )
    return Settings(path, hostname, state_dir, tls, auth, limits, imap, pop3, submission, web, metrics, workers,
                    workers_setting)


def mail_endpoints(settings: Settings) -> list[tuple[str, str, str]]:
    """Every mail listener as (protocol, C{implicit_tls} or C{starttls}, description), in a fixed order."""
    return _endpoints_of({name: protocol for name, protocol in
                          (("imap", settings.imap), ("pop3", settings.pop3), ("submission", settings.submission))
                          if protocol is not None})


def _endpoints_of(protocols: dict[str, ProtocolSettings | SubmissionSettings]) -> list[tuple[str, str, str]]:
    """L{mail_endpoints} of the protocols configured, in their order."""
    return [(name, kind, description) for name, protocol in protocols.items()
            for kind, descriptions in (("implicit_tls", protocol.implicit_tls), ("starttls", protocol.starttls))
            for description in descriptions]


def clear_text_backends(settings: Settings) -> list[str]:
    """
    Warnings for the backends that are sent a password in clear across a network: C{tls = "none"}
    with a host that is not loopback, and a login that sends one (C{replay}: the client's own,
    C{master}: the gateway's). A private link is a fair use of this, so it is said, not refused.

    :returns: one line per such backend, naming the file, the key and what crosses in clear.
    """
    warnings = []
    for name, protocol in (("imap", settings.imap), ("pop3", settings.pop3), ("submission", settings.submission)):
        if protocol is None:
            continue
        backend = protocol.backend
        if backend.tls != "none" or backend.login == "xclient" or _is_loopback(backend.host):
            continue
        secret = "the master password" if backend.login == "master" else "the clients' passwords"
        warnings.append(f'{settings.path}: [{name}.backend] tls: "none" with host {backend.host!r}, which is not '
                        f"loopback: {secret} cross the network unencrypted")
    return warnings


def _is_loopback(host: str) -> bool:
    """Whether a backend host is this machine: a loopback address, or C{localhost} (RFC 6761)."""
    name = host.lower().removesuffix(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    address = parse_ip(plain_address(host))
    return address is not None and address.is_loopback


def _is_unix(description: str) -> bool:
    """Whether a listener description is a UNIX socket (its own, or one systemd passes)."""
    endpoint = description.removeprefix(PROXY_PREFIX)
    return endpoint.startswith("unix:") or (endpoint.startswith("systemd:") and "domain=UNIX" in endpoint)


def _tls_settings(table: _Table) -> TLSSettings:
    self_signed = table.boolean("self_signed", False)
    certificate = table.readable_file("certificate")
    private_key = table.readable_file("private_key")
    entries = table.tables("sni")
    sni = tuple(_named_certificate(entry) for entry in entries)
    seen: dict[str, int] = {}
    for number, (entry, named) in enumerate(zip(entries, sni), 1):
        for name in named.names:
            if name in seen:  # one would silently win: the operator meant one of them
                where = "twice in this table" if seen[name] == number else f"in table {seen[name]} too"
                raise entry.error("names", f"each name once, in one [[tls.sni]] table ({name!r} is {where})")
            seen[name] = number
    table.finish()
    if self_signed and (certificate or private_key):
        raise table.error("self_signed", "either self_signed = true or certificate and private_key, not both")
    if not self_signed and not (certificate and private_key):
        missing = "private_key" if certificate else "certificate"
        raise table.error(missing, "the path of a PEM file (or self_signed = true for a trial)")
    return TLSSettings(certificate, private_key, self_signed, sni)


def _named_certificate(table: _Table) -> NamedCertificate:
    expected = 'a list of host names such as ["mail.example.org", "*.example.net"]'
    names: list[Any] = table._get("names", [], list, expected)
    if not names or not all(isinstance(n, str) and is_host_name(n.removeprefix("*.").removesuffix(".")) for n in names):
        raise table.error("names", expected, names)
    certificate = table.readable_file("certificate")
    private_key = table.readable_file("private_key")
    table.finish()
    if certificate is None or private_key is None:
        raise table.error("certificate" if certificate is None else "private_key", "the path of a PEM file")
    return NamedCertificate(tuple(n.lower().rstrip(".") for n in names), certificate, private_key)


def _auth_settings(table: _Table) -> AuthSettings:
    mode = table.choice("mode", "local", ("local", "backend"))
    users_file = table.readable_file("users_file")
    failure_delay = table.seconds("failure_delay", 2.0, 0.0, 60.0)
    hash_threads = table.integer("hash_threads", 2, 1, 64)
    failure_delay_max = table.seconds("failure_delay_max", max(15.0, failure_delay), 0.0, 300.0)
    ip_failure_budget = table.integer("ip_failure_budget", 20, 1, 100_000)
    user_failures_free = table.integer("user_failures_free", 5, 0, 100_000)
    failure_window = table.seconds("failure_window", 600.0, 1, 86400)
    ipv6_prefix = table.integer("ipv6_prefix", 64, 32, 128)
    table.finish()
    if failure_delay_max < failure_delay:
        raise table.error("failure_delay_max", f"at least failure_delay ({failure_delay:g})", failure_delay_max)
    if mode == "local" and users_file is None:
        raise table.error("users_file", 'the path of a users file when mode is "local"')
    if mode == "backend" and users_file is not None:
        raise table.error("users_file", 'nothing when mode is "backend" (the backend decides)')
    return AuthSettings(mode, users_file, failure_delay, hash_threads,  # type: ignore[arg-type]
                        failure_delay_max, ip_failure_budget, user_failures_free, failure_window, ipv6_prefix)


_WORKERS_FORM = f'an integer from 1 to {MAX_WORKERS} or "auto"'


def _workers(table: _Table, value: int | str) -> int:
    """The count C{workers} (C{value}) asks for: "auto" is one per CPU (as nginx's worker_processes auto)."""
    if value == "auto":
        return min(os.cpu_count() or 1, MAX_WORKERS)
    if isinstance(value, str) or not 1 <= value <= MAX_WORKERS:
        raise table.error("workers", _WORKERS_FORM, value)
    return value


def _limits(table: _Table) -> Limits:
    d = Limits()
    limits = Limits(
        line_length=table.integer("line_length", d.line_length, 512, 65536),
        literal_size=table.integer("literal_size", d.literal_size, 512, 65536),
        idle_timeout=table.seconds("idle_timeout", d.idle_timeout, 1, 3600),
        login_timeout=table.seconds("login_timeout", d.login_timeout, 1, 3600),
        login_attempts=table.integer("login_attempts", d.login_attempts, 1, 100),
        errors=table.integer("errors", d.errors, 1, 100),
        max_connections=table.integer("max_connections", d.max_connections, 1, 1_000_000),
        max_connections_per_ip=table.integer("max_connections_per_ip", d.max_connections_per_ip, 1, 1_000_000),
        max_sessions_per_user=table.integer("max_sessions_per_user", d.max_sessions_per_user, 1, 1_000_000),
        relay_idle_timeout=table.seconds("relay_idle_timeout", d.relay_idle_timeout, 10, 86400),
        trusted_networks=table.networks("trusted_networks"),
        proxy_sources=table.networks("proxy_sources"),
        stop_grace=table.seconds("stop_grace", d.stop_grace, 1, 3600),
    )
    table.finish()
    return limits


def _protocol_settings(root: _Table, name: str, default_backend_port: int) -> ProtocolSettings:
    table = root.table(name)
    implicit_tls, starttls = _listeners(table)
    backend = _backend_settings(table.table("backend"), default_backend_port, ("replay", "master"))
    table.finish()
    return ProtocolSettings(implicit_tls, starttls, backend)


def _listeners(table: _Table) -> tuple[tuple[str, ...], tuple[str, ...]]:
    implicit_tls = table.endpoints("implicit_tls")
    starttls = table.endpoints("starttls")
    if not implicit_tls and not starttls:
        raise table.error("implicit_tls", "at least one listener in implicit_tls or starttls")
    return implicit_tls, starttls


def _submission_settings(table: _Table) -> SubmissionSettings:
    implicit_tls, starttls = _listeners(table)
    backend = _backend_settings(table.table("backend"), 587, ("replay", "master", "xclient"))
    senders_file = table.readable_file("senders_file")
    max_message_size = table.integer("max_message_size", 50 * 1024 * 1024, 1024, 2**40)
    max_recipients = table.integer("max_recipients", 100, 1, 10000)
    idle_timeout = table.seconds("idle_timeout", 300.0, 1, 3600)
    transaction_timeout = table.seconds("transaction_timeout", 600.0, 1, 86400)
    table.finish()
    return SubmissionSettings(implicit_tls, starttls, backend, senders_file, max_message_size, max_recipients,
                              idle_timeout, transaction_timeout)


def _web_settings(table: _Table, hostname: str) -> WebSettings:
    https = table.endpoints("https", proxy=False)
    http = table.endpoints("http", proxy=False)
    public_host = table.host_name("public_host", table.string("public_host", expected=_HOST_NAME_FORM) or hostname)
    hsts_max_age = table.integer("hsts_max_age", 31536000, 0, 10 * 31536000)
    expected = 'an address such as "http://127.0.0.1:8080" (a port from 1 to 65535)'
    upstream = table.string("upstream", expected=expected)
    if upstream is not None:
        match = _UPSTREAM.fullmatch(upstream)
        if match is None or (match[1] is not None and not 1 <= int(match[1]) <= 65535):
            raise table.error("upstream", expected, upstream)
    username = table.choice("autoconfig_username", "%EMAILADDRESS%", ("%EMAILADDRESS%", "%EMAILLOCALPART%"))
    expected = "the path of a directory (certbot's --webroot)"
    acme_webroot = table.path("acme_webroot", expected=expected)
    if acme_webroot is not None and not os.path.isdir(acme_webroot):
        # Found out at start, not at the first renewal two months on.
        raise table.error("acme_webroot", expected, acme_webroot)
    table.finish()
    if not https:
        raise table.error("https", "at least one HTTPS listener")
    if acme_webroot is not None and not http:
        raise table.error("http", "a plain HTTP listener, where ACME's HTTP-01 challenges come (acme_webroot is set)")
    return WebSettings(https, http, public_host, hsts_max_age, upstream, username, acme_webroot)


def _metrics_settings(table: _Table) -> MetricsSettings:
    listen = table.endpoints("listen", proxy=False) or ("tcp:9101:interface=127.0.0.1",)
    table.finish()
    return MetricsSettings(listen)


def _backend_settings(table: _Table, default_port: int, logins: tuple[str, ...]) -> BackendSettings:
    host = table.string("host", "127.0.0.1", expected="a host name or address")
    assert host is not None
    port = table.integer("port", default_port, 1, 65535)
    tls = table.choice("tls", "none", ("none", "starttls", "implicit"))
    ca_file = table.readable_file("ca_file")
    server_name = table.string("server_name", host, expected="a host name") or host
    # 30 s: a black-holed backend is rare, while Dovecot's POP3 lock wait alone takes 10 s.
    timeout = table.seconds("timeout", 30.0, 0.1, 300)
    login = table.choice("login", "replay", logins)
    master_user = table.string("master_user", expected="a user name")
    password_file = table.readable_file("master_password_file")
    forward_client_ip = table.boolean("forward_client_ip", False)
    table.finish()
    master_password = None
    if login != "master":
        for key, value in (("master_user", master_user), ("master_password_file", password_file)):
            if value is not None:
                raise table.error(key, 'nothing unless login is "master"')
    if login == "master":
        if master_user is None:
            raise table.error("master_user", 'a user name when login is "master"')
        if password_file is None:
            raise table.error("master_password_file", 'a readable file when login is "master"')
        master_password = _read_secret(password_file, table)
    if tls == "none":
        for key in ("ca_file", "server_name"):
            if table.has(key):
                raise table.error(key, 'nothing unless tls is "starttls" or "implicit"')
    else:  # the name the backend's certificate must match: TLS cannot even ask for anything else
        server_name = table.host_name("server_name" if table.has("server_name") else "host", server_name, address=True)
    return BackendSettings(
        host, port, tls, ca_file, server_name, timeout, login,  # type: ignore[arg-type]
        master_user, master_password, forward_client_ip,
    )


def _read_secret(path: str, table: _Table) -> bytes:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_mode & 0o077:
            raise table.error("master_password_file", "a file readable by its owner only (chmod 600)")
        secret = f.read(4097).rstrip(b"\r\n")
    # A NUL would shift the fields of the SASL PLAIN message that carries it.
    if not secret or b"\n" in secret or b"\0" in secret or len(secret) > 4096:
        raise table.error("master_password_file", "a file holding the password on one line, without NUL")
    return secret
