"""TLS configuration for the gateway's listeners and for its backend connections.

:class:`ServerTLS` is the server side: one pyOpenSSL context built from a
certificate chain and a key, configured after Mozilla's "intermediate"
recommendation, that refuses clients announcing a foreign application protocol
through ALPN (the ALPACA cross-protocol defence). The same object serves
implicit TLS (:class:`~twisted.protocols.tls.TLSMemoryBIOFactory`) and STARTTLS
(:meth:`~twisted.internet.interfaces.ITLSTransport.startTLS`).

:func:`client_tls` builds the verifying client side for the backend,
:func:`ensure_self_signed` provides a certificate when none is configured,
:func:`warn_of_validity` logs certificates outside or near the end of their validity,
:func:`describe_tls` reports what an established connection negotiated,
:func:`tls_failure` why one failed, and
:func:`tls_layer` with :func:`write_tls_now` lets the relay encrypt what it
writes without waiting for the next reactor turn, :func:`switch_to_relaying`
has a relayed connection decrypt what it reads in one pass and drop Twisted's
write aggregation, :func:`release_tls_buffers`
gives back the memory a burst of traffic left in a connection's TLS layer, and
:func:`tls_ended` tells when a peer has ended TLS under a registered producer.
"""

from __future__ import annotations

import datetime
import os
import stat
import tempfile
from collections.abc import Callable, Iterable
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.bindings.openssl.binding import Binding
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    ISSLTransport,
)
from twisted.internet.ssl import (
    Certificate,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOProtocol
from zope.interface import Interface, implementer

from gateway.addresses import parse_ip
from gateway.config import NamedCertificate, is_host_name
from gateway.sockets import write_transient

__all__ = ["TLSError", "ServerTLS", "TLSFiles", "ListenerTLS", "ensure_self_signed", "self_signed_paths",
           "warn_of_validity", "client_tls", "describe_tls", "tls_failure", "ITLSEndListener",
           "tls_layer", "write_tls_now", "switch_to_relaying", "release_tls_buffers", "tls_ended"]

log = Logger()

# Mozilla "intermediate" TLS 1.2 suites (guidelines 5.7), ECDHE only. The DHE
# suites are left out: they need a dhparam file this gateway does not manage,
# and every mail client that can do DHE-GCM can also do ECDHE-GCM.
_TLS12_CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

# X25519 first, P-256 for clients without it (FIPS builds, older Java). The
# rest of OpenSSL's default list (P-384, P-521, FFDHE, hybrid groups) is left
# out on purpose, as the gateway's policy is exactly these two.
_GROUPS = b"X25519:P-256"

# OpenSSL refuses to resume a session whose context differs from the
# server's, and requires one as soon as client certificates are verified. A
# constant shared by every context keeps resumption working across contexts.
_SESSION_ID_CONTEXT = b"mailgateway"

# SSL_OP_PRIORITIZE_CHACHA (ssl.h: SSL_OP_BIT(21) since OpenSSL 1.1.1); pyOpenSSL does not export it.
_OP_PRIORITIZE_CHACHA = 1 << 21

# pyOpenSSL has no wrapper for the key exchange group list, so the list is set
# through the OpenSSL binding that pyOpenSSL itself is built on.
_binding = Binding()
_lib, _ffi = _binding.lib, _binding.ffi

_SELF_SIGNED_VALIDITY = datetime.timedelta(days=365)
# A self-signed certificate this close to its end is replaced. It is looked at only when the
# gateway starts or reloads (SIGHUP), so the margin leaves a month for one of them to happen.
_SELF_SIGNED_RENEWAL = datetime.timedelta(days=30)

EXPIRY_WARNING = datetime.timedelta(days=14)
"""A served certificate this close to its end is warned about (L{warn_of_validity})."""

# Private keys found readable by others, as (path, device, inode, mode): each is warned about once,
# not by every context built from it (one per protocol, rebuilt every few hours for ticket keys).
_warned_keys: set[tuple[str, int, int, int]] = set()


class TLSError(Exception):
    """A certificate, key or CA file cannot be used; the message names the file and the problem."""


class _ALPNRefused(SSL.Error):
    """The client announced ALPN protocols and ours is not among them.

    Subclassing :class:`OpenSSL.SSL.Error` makes Twisted treat the refusal as
    an ordinary handshake failure: the alert is flushed, the connection is
    closed and the wrapped protocol's ``connectionLost`` receives this
    exception. Twisted reads ``args[0]`` as an OpenSSL error queue, a list of
    ``(library, function, reason)`` triples, so the exception carries one.
    """

    def __init__(self, alpn: bytes) -> None:
        """
        :param alpn: the protocol the listener wanted and the client did not offer.
        """
        wanted = alpn.decode("ascii", "replace")
        reason = f"no application protocol: client did not offer {wanted!r}"
        super().__init__([("mailgateway", "ALPN", reason)])


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """Server-side TLS, usable for implicit TLS and STARTTLS, with certificates chosen by SNI.

    The contexts are built at construction, so that a bad file is reported at
    startup rather than at the first connection. A client that names a host
    (SNI) matching a L{NamedCertificate} gets that certificate; any other gets
    the default one. It reads its files once: a reload builds a new one
    (L{ListenerTLS}).

    Clients that offer no ALPN, or whose ALPN list contains ``alpn``, are
    accepted (``alpn`` is then selected). Any other ALPN list is refused with
    the ``no_application_protocol`` alert, so that a client meant for another
    protocol cannot be tricked into talking to this one.
    """

    def __init__(self, certificate_path: str, key_path: str, alpn: bytes,
                 named: tuple[NamedCertificate, ...] = ()) -> None:
        """
        :param certificate_path: PEM file holding the default leaf certificate
            followed by its intermediates, all of which are sent to clients.
        :param key_path: PEM file with the unencrypted RSA or ECDSA private key
            of the leaf certificate.
        :param alpn: the ALPN protocol identifier this listener speaks, for
            example ``b"imap"``.
        :param named: further certificates, chosen by the client's SNI name.
        :raises TLSError: if a file is unreadable, is not PEM, holds no
            certificate, or the key does not match the leaf certificate.
        """
        self._alpn = alpn
        self._context, self._by_name = self._build(certificate_path, key_path, named)

    def _build(self, certificate_path: str, key_path: str,
               named: tuple[NamedCertificate, ...]) -> tuple[SSL.Context, dict[str, SSL.Context]]:
        default = _make_server_context(certificate_path, key_path, self._alpn)
        by_name = {}
        for entry in named:
            context = _make_server_context(entry.certificate, entry.private_key, self._alpn)
            for name in entry.names:
                by_name[name.lower().rstrip(".")] = context
        if by_name:
            default.set_tlsext_servername_callback(self._choose)
        return default, by_name

    def _choose(self, connection: SSL.Connection) -> None:
        requested = connection.get_servername()
        if not requested:
            return
        name = requested.decode("ascii", "replace").lower().rstrip(".")
        context = self._by_name.get(name) or self._by_name.get("*." + name.partition(".")[2])
        if context is not None:
            connection.set_context(context)

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """Create the OpenSSL connection for one accepted client.

        :param tlsProtocol: the Twisted TLS protocol that drives the connection.
        :returns: a new server connection on the current default context.
        """
        return SSL.Connection(self._context, None)


class TLSFiles(NamedTuple):
    """What the listeners' TLS is built from: the default chain and key, and the SNI certificates."""

    certificate: str
    private_key: str
    sni: tuple[NamedCertificate, ...]


@implementer(IOpenSSLServerConnectionCreator)
class ListenerTLS:
    """
    The TLS of one protocol's listeners (or the web's), implicit and STARTTLS alike: each new
    connection gets the L{ServerTLS} in use, which a reload or a ticket key rotation replaces
    whole. L{gateway.service.Reloader} builds the new ServerTLS of every ListenerTLS before it puts any in
    use, so that all listeners change certificates together, or none does.

    :ivar files: what the ServerTLS in use was built from.
    """

    def __init__(self, alpn: bytes, files: TLSFiles) -> None:
        """
        :param alpn: the listeners' application protocol (see L{ServerTLS}).
        :raises TLSError: when a file cannot be used.
        """
        self._alpn = alpn
        self.files = files
        self._in_use = self._build(files)

    def _build(self, files: TLSFiles) -> ServerTLS:
        return ServerTLS(files.certificate, files.private_key, self._alpn, files.sni)

    def prepare(self, files: TLSFiles | None = None) -> Callable[[], None]:
        """
        Build new TLS from C{files}, or else from the files in use (which gives new session ticket
        keys), without using it yet.

        :returns: what puts it in use, for the connections made after.
        :raises TLSError: when a file cannot be used; nothing changes then.
        """
        new_files = self.files if files is None else files
        server_tls = self._build(new_files)

        def switch() -> None:
            self.files, self._in_use = new_files, server_tls

        return switch

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """The TLS connection of one accepted client, from the ServerTLS in use."""
        return self._in_use.serverConnectionForTLS(tlsProtocol)


def _make_server_context(certificate_path: str, key_path: str, alpn: bytes) -> SSL.Context:
    """Build a fully configured server context from a chain file and a key file.

    :raises TLSError: as described for :class:`ServerTLS`.
    """
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    # The server's cipher order (testssl.sh flags its absence), except that a client preferring
    # ChaCha20 (phones without AES hardware) gets it: the reason Mozilla leaves the order to clients.
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_CIPHER_SERVER_PREFERENCE
                        | _OP_PRIORITIZE_CHACHA)
    # Idle connections then hold no read/write buffers, which is what makes
    # many thousands of idle IMAP sessions affordable.
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    # pyOpenSSL turns partial writes on: one SSL_write would then make one record. Off, a bulk
    # relayed read is encrypted whole in one call (see write_tls_now).
    _lib.SSL_CTX_clear_mode(context._context, _lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
    context.set_cipher_list(_TLS12_CIPHERS)
    if _lib.SSL_CTX_set1_curves_list(context._context, _GROUPS) != 1:
        raise TLSError(f"OpenSSL rejects the key exchange group list {_GROUPS.decode()}")
    context.set_session_id(_SESSION_ID_CONTEXT)
    context.set_alpn_select_callback(_alpn_selector(alpn))
    _load_chain(context, certificate_path)
    _load_key(context, key_path, certificate_path)
    return context


def _alpn_selector(alpn: bytes) -> Callable[[SSL.Connection, list[bytes]], bytes]:
    """Return an ALPN select callback that accepts only ``alpn``.

    OpenSSL calls it only when the client sends the ALPN extension. Raising
    makes pyOpenSSL return ``SSL_TLSEXT_ERR_ALERT_FATAL``, for which OpenSSL
    sends ``no_application_protocol``; returning pyOpenSSL's
    ``NO_OVERLAPPING_PROTOCOLS`` would instead carry on without ALPN.
    """

    def select(connection: SSL.Connection, offered: list[bytes]) -> bytes:
        if alpn in offered:
            return alpn
        raise _ALPNRefused(alpn)

    return select


def _read(path: str, what: str) -> bytes:
    """Read a whole file, turning any failure into a :class:`TLSError`."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSError(f"{path}: cannot read {what}: {e.strerror}") from e


def _load_chain(context: SSL.Context, certificate_path: str) -> None:
    """Install the leaf and intermediate certificates of ``certificate_path``."""
    data = _read(certificate_path, "certificate file")
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise TLSError(f"{certificate_path}: no PEM certificate found")
    try:
        context.use_certificate_chain_file(certificate_path)
    except SSL.Error as e:
        raise TLSError(f"{certificate_path}: malformed PEM certificate chain") from e


def _load_key(context: SSL.Context, key_path: str, certificate_path: str) -> None:
    """Install the private key of ``key_path`` and check it against the leaf."""
    data = _read(key_path, "private key file")
    _warn_if_readable_by_others(key_path)
    # The key is parsed here rather than by OpenSSL so that an encrypted key
    # fails instead of prompting for a passphrase on the terminal. Parser
    # errors are not chained: nothing derived from key bytes may reach a log.
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSError(f"{key_path}: private key is encrypted; it must be unencrypted") from None
    except ValueError:
        raise TLSError(f"{key_path}: not a PEM private key") from None
    except UnsupportedAlgorithm:  # an elliptic curve OpenSSL does not know, such as secp112r1
        raise TLSError(f"{key_path}: unsupported key algorithm or curve; RSA or ECDSA (P-256, P-384) "
                       "is required") from None
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise TLSError(f"{key_path}: unsupported key type; RSA or ECDSA is required")
    try:
        # OpenSSL may already refuse a mismatched key of the same type in use_privatekey.
        context.use_privatekey(key)
        context.check_privatekey()
    except SSL.Error:
        raise TLSError(
            f"{key_path}: private key does not match the certificate in {certificate_path}"
        ) from None


def _warn_if_readable_by_others(key_path: str) -> None:
    """Log, once per file, that a private key is readable by every local user (0600 or 0640 is expected)."""
    try:
        status = os.stat(key_path)
    except OSError:
        return  # it was just read: the key itself will say what is wrong, if anything
    if not status.st_mode & stat.S_IROTH:
        return
    seen = (key_path, status.st_dev, status.st_ino, stat.S_IMODE(status.st_mode))
    if seen in _warned_keys:
        return
    _warned_keys.add(seen)
    log.warn("private_key_readable_by_others path={path} mode={mode}: chmod o-r (0600 or 0640)",
             path=key_path, mode=f"{stat.S_IMODE(status.st_mode):04o}")


def self_signed_paths(state_dir: str, hostname: str) -> tuple[str, str]:
    """Where :func:`ensure_self_signed` keeps the certificate and key for ``hostname``."""
    return os.path.join(state_dir, f"selfsigned-{hostname}.crt"), os.path.join(state_dir, f"selfsigned-{hostname}.key")


def ensure_self_signed(state_dir: str, hostname: str) -> tuple[str, str]:
    """Return a self-signed certificate and key for ``hostname``, creating them if needed.

    The files are ``<state_dir>/selfsigned-<hostname>.crt`` and ``.key``. When
    both exist they are returned as they are, unless the certificate has
    expired or expires within 30 days, which is logged. Otherwise a new ECDSA
    P-256 key and a certificate valid for one year, naming only ``hostname``
    (as a DNS name, or as an IP address if it is one), replace them; the key
    is written atomically with mode 0600 and the generation is logged with the
    certificate's path and SHA-256 fingerprint. ``state_dir`` is created with
    mode 0700 if missing.

    :param state_dir: directory that keeps the gateway's generated files.
    :param hostname: the DNS name or IP address clients connect to.
    :returns: ``(certificate_path, key_path)``.
    :raises TLSError: if ``hostname`` is neither a DNS name nor an IP address,
        or the files cannot be written.
    """
    address = parse_ip(hostname)
    if address is None and not is_host_name(hostname):
        raise TLSError(f"{hostname!r}: not a host name or IP address")
    cert_path, key_path = self_signed_paths(state_dir, hostname)
    if os.path.exists(cert_path) and os.path.exists(key_path):
        validity = _validity(cert_path)
        if validity is None or validity[1] - datetime.datetime.now(datetime.timezone.utc) > _SELF_SIGNED_RENEWAL:
            return cert_path, key_path
        not_after = validity[1]
        log.info("self_signed_renewal path={path} not_after={not_after}: generating a new certificate",
                 path=cert_path, not_after=not_after.isoformat())

    key = ec.generate_private_key(ec.SECP256R1())
    san: x509.GeneralName = (
        x509.IPAddress(address) if address is not None else x509.DNSName(hostname)
    )
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _SELF_SIGNED_VALIDITY)
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        # The key goes first: a certificate without its key is never returned,
        # because both must exist for the files to be reused.
        _write_atomically(key_path, key_pem, 0o600)
        _write_atomically(cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    except OSError as e:
        where = e.filename or state_dir
        raise TLSError(f"{where}: cannot write self-signed certificate: {e.strerror}") from e
    fingerprint = certificate.fingerprint(hashes.SHA256()).hex(":").upper()
    log.info(
        "self-signed certificate generated path={path} sha256={fingerprint}",
        path=cert_path,
        fingerprint=fingerprint,
    )
    return cert_path, key_path


def _validity(cert_path: str) -> tuple[datetime.datetime, datetime.datetime] | None:
    """
    When the (first, leaf) certificate in ``cert_path`` starts and ends being valid; None if it
    cannot be read, which loading it then reports.
    """
    try:
        with open(cert_path, "rb") as f:
            certificate = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError):
        return None
    return certificate.not_valid_before_utc, certificate.not_valid_after_utc


def warn_of_validity(cert_paths: Iterable[str], now: datetime.datetime | None = None) -> None:
    """
    Log a warning for each leaf certificate of ``cert_paths`` that has expired
    (``certificate_expired``), is not valid yet (``certificate_not_yet_valid``) or expires within
    :data:`EXPIRY_WARNING` (``certificate_expires_soon``). It is only a warning: the certificate
    is served all the same, since refusing to start or reload would turn a late renewal into an
    outage for every client, including those that accept it (pinned, or told to trust it).

    :param now: the time to judge by; the current time if None.
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    for path in dict.fromkeys(cert_paths):
        validity = _validity(path)
        if validity is None:
            continue
        not_before, not_after = validity
        if not_after <= now:
            log.warn("certificate_expired path={path} not_after={not_after}: clients refuse it; renew it and "
                     "reload", path=path, not_after=not_after.isoformat())
        elif not_before > now:
            log.warn("certificate_not_yet_valid path={path} not_before={not_before}: clients refuse it until then; "
                     "check the clock", path=path, not_before=not_before.isoformat())
        elif not_after - now <= EXPIRY_WARNING:
            log.warn("certificate_expires_soon path={path} not_after={not_after} days={days}: renew it and reload",
                     path=path, not_after=not_after.isoformat(), days=(not_after - now).days)


def _write_atomically(path: str, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never a part."""
    directory = os.path.dirname(path) or "."
    # mkstemp creates the file with mode 0600, so a key is never readable by others.
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def client_tls(server_name: str, ca_file: str | None) -> IOpenSSLClientConnectionCreator:
    """Client-side TLS for a backend connection, verifying the server's certificate and name.

    :param server_name: the DNS name or IP address the backend's certificate
        must match (checked through service-identity).
    :param ca_file: PEM bundle of one or more trusted CA certificates, or
        None to trust the platform's CA store.
    :returns: a connection creator for ``TLSMemoryBIOFactory`` or ``startTLS``
        that refuses anything below TLS 1.2.
    :raises TLSError: if ``ca_file`` is unreadable or holds no PEM certificate,
        or ``server_name`` is not a name TLS can ask for.
    """
    if ca_file is None:
        trust_root = platformTrust()
    else:
        trust_root = trustRootFromCertificates(_load_ca_bundle(ca_file))
    try:
        return optionsForClientTLS(
            server_name,
            trustRoot=trust_root,
            extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2},
        )
    except ValueError:  # IDNA refuses it; the configuration checks the usual forms, this the rarer ones ("ab--c")
        raise TLSError(f"{server_name!r}: not a host name or IP address a TLS client can verify") from None


def _load_ca_bundle(ca_file: str) -> list[Certificate]:
    """Read every certificate of a PEM bundle."""
    data = _read(ca_file, "CA file")
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TLSError(f"{ca_file}: no valid PEM certificate found") from e
    return [Certificate(crypto.X509.from_cryptography(c)) for c in certificates]


def describe_tls(transport: object) -> tuple[str, str] | None:
    """Report the protocol version and cipher of an established TLS connection.

    Works wherever :func:`tls_layer` finds the TLS layer: behind ``TLSMemoryBIOFactory``, after
    ``startTLS``, and under a wrapper such as the PROXY protocol's, which does not provide
    ``ISSLTransport`` when its TCP transport starts TLS.

    :param transport: a protocol's transport.
    :returns: for example ``("TLSv1.3", "TLS_AES_256_GCM_SHA384")``, or None
        if the transport is not TLS or its handshake has not completed.
    """
    tls = tls_layer(transport)
    if tls is None:
        return None
    handle = tls.getHandle()
    if not isinstance(handle, SSL.Connection):
        return None
    cipher = handle.get_cipher_name()
    if cipher is None:
        return None
    return handle.get_protocol_version_name(), cipher


def tls_failure(reason: Failure) -> str | None:
    """
    OpenSSL's words for why a connection's TLS failed (C{"unsupported protocol"}, C{"no shared
    cipher"}, C{"tlsv1 alert unknown ca"} for a client that refused the certificate), or None when
    C{reason} is not a TLS error. The words are OpenSSL's own fixed texts, never the peer's.
    """
    if not reason.check(SSL.Error):
        return None
    errors = reason.value.args[0] if reason.value.args else None
    if isinstance(errors, list):
        texts = [error[2] for error in errors if isinstance(error, tuple) and len(error) == 3 and error[2]]
        if texts:
            return texts[-1]
    return "unknown"


def tls_layer(transport: object) -> TLSMemoryBIOProtocol | None:
    """Find the Twisted TLS protocol that encrypts what is written to a transport.

    Implicit TLS puts it between the protocol and the TCP transport (possibly
    under further wrappers, such as the PROXY protocol's); ``startTLS`` puts it
    behind the TCP transport itself, as that transport's protocol.

    :param transport: a protocol's transport.
    :returns: the TLS protocol, or None if what is written goes out in clear.
    """
    layer = transport
    while isinstance(layer, ProtocolWrapper):
        if isinstance(layer, TLSMemoryBIOProtocol):
            return layer
        layer = layer.transport
    behind = getattr(layer, "protocol", None)
    if ISSLTransport.providedBy(layer) and isinstance(behind, TLSMemoryBIOProtocol):
        return behind
    return None


def tls_ended(tls: TLSMemoryBIOProtocol | None) -> bool:
    """Whether a TLS connection has ended: the peer sent close_notify, or it failed.

    Twisted's TLS layer then drops whatever is written and closes its TCP
    transport, but a TCP transport whose producer is paused resumes it when
    its buffer drains instead of closing: the producer would be read to its
    end for nothing, and the connection would linger. A producer checks this
    when it is resumed and unregisters instead, which lets the connection close.

    :param tls: the TLS protocol, as :func:`tls_layer` found it; None (a
        connection in clear) has not ended TLS.
    """
    return tls is not None and tls._lostTLSConnection


def write_tls_now(tls: TLSMemoryBIOProtocol, data: bytes) -> None:
    """Encrypt ``data`` at once, after anything the TLS protocol holds back, and write it to the transport below.

    Twisted's TLS protocol (``BufferingTLSTransport``, used by every
    ``TLSMemoryBIOFactory`` and by ``startTLS``) collects small writes and
    encrypts them together one reactor turn later, through ``callLater(0)``.
    A writer that knows it has written all it has for now, such as the relay
    after one read, writes past the aggregation instead: no reactor turn is
    waited for or scheduled, and the records are as full as the data allows.

    The data is handed to OpenSSL at once, and its records to the transport
    in one write, where Twisted would make a call, a copy and a write for
    each 16 KiB record. The gateway's server contexts take it in one call; a
    context with partial writes (the backend's client TLS) takes a record per
    call. Any state but a plain open connection (handshake under way, writes
    waiting, closing) is left to Twisted's own write, which knows it, and so
    is whatever OpenSSL refuses: Twisted's write meets the same condition
    (OpenSSL keeps it, its first cause included) and handles it.

    Twisted has no public way to do this: this reaches its private aggregator
    (which :func:`switch_to_relaying` drops) and TLS state, and the unaggregated
    ``write`` beneath them, as :class:`_Relaying` reaches its reading.
    ``tests/test_tls.py`` fails if Twisted's TLS layer stops working this way.

    :param tls: the TLS protocol, as :func:`tls_layer` found it.
    """
    aggregator = getattr(tls, "_aggregator", None)
    if aggregator is not None:
        aggregator.flush()  # what was held goes first
    if not (tls._handshakeDone and not tls._lostTLSConnection and not tls._appSendBuffer and not tls.disconnecting):
        TLSMemoryBIOProtocol.write(tls, data)
        return
    connection = tls._tlsConnection
    ssl = connection._ssl
    # SSL_write itself, as pyOpenSSL's send calls it, without the checks that send makes of a
    # buffer of any type and of a result that is not an error (pyOpenSSL lets the buffer move).
    written = 0
    with _ffi.from_buffer(data) as buffer:
        while written < len(data):
            sent = _lib.SSL_write(ssl, buffer + written, len(data) - written)
            if sent <= 0:
                break
            written += sent
    # All the records are in the memory BIO now: one read of exactly that, into a buffer kept
    # for it rather than through pyOpenSSL's bio_read, which copies twice.
    pending = _lib.BIO_get_mem_data(connection._from_ssl, _ffi.NULL)
    if pending:
        records = _records.view(pending)
        read = _lib.BIO_read(connection._from_ssl, _records.pointer, pending)
        if read > 0:
            write_transient(tls.transport, records[:read])
    if written < len(data):
        TLSMemoryBIOProtocol.write(tls, data[written:])  # what OpenSSL refused: see above


class _RecordBuffer:
    """A buffer that OpenSSL reads into, kept for reuse and grown as needed."""

    __slots__ = ("_buffer", "pointer")

    def __init__(self, size: int = 0) -> None:
        self._buffer = bytearray(size)
        self.pointer = _ffi.from_buffer(self._buffer)

    def view(self, size: int) -> memoryview:
        """A view of the buffer, at least ``size`` bytes long."""
        if len(self._buffer) < size:
            # A new one rather than a resize: a view still held elsewhere keeps the old one valid.
            self._buffer = bytearray(max(size, 2 * len(self._buffer)))
            self.pointer = _ffi.from_buffer(self._buffer)
        return memoryview(self._buffer)


_records = _RecordBuffer()  # the records of a relayed write (write_tls_now)


def switch_to_relaying(tls: TLSMemoryBIOProtocol | None) -> None:
    """Switch a TLS protocol to the relay's lighter reading and writing, :class:`_Relaying`.

    What Twisted's write aggregation holds is written first, and the aggregation is dropped.

    :param tls: the TLS protocol, as :func:`tls_layer` found it; None (a connection in clear)
        is left alone, and so is a TLS protocol of a class Twisted did not make.
    """
    if type(tls) is BufferingTLSTransport:
        tls._aggregator.close()  # writes what it holds, and cancels the turn it waits for
        del tls._aggregator, tls.write  # the instance's own write: the aggregator's
        # _Relaying is TLSMemoryBIOProtocol with its own reading: with the state
        # BufferingTLSTransport adds gone, the running protocol can take it on.
        tls.__class__ = _Relaying  # type: ignore[assignment]


class ITLSEndListener(Interface):
    """A protocol told when its peer ends TLS while it is relayed (see L{_Relaying})."""

    def tlsEnded() -> None:
        """
        The peer sent close_notify, or TLS failed (a broken record, a failed write), while the
        connection is still open. Twisted then drops what is written and closes the connection
        once its buffer has gone to the peer, with no time limit: a peer that has stopped reading
        would hold it for as long as the relay's idle timeout. (Not called as the connection is lost.)
        """


class _Relaying(TLSMemoryBIOProtocol):
    """
    The TLS protocol of every ``TLSMemoryBIOFactory``, STARTTLS's included, once it is relayed:
    what a read brings is decrypted and handed on in one pass, and writes are not aggregated.

    Twisted's own reading goes through pyOpenSSL, which checks each call's result in Python and
    ends every read with an exception raised and caught (``WantReadError``), twice: once for the
    records, once for OpenSSL's answers. A relayed command costs it about 30 calls, 13 of them
    in Python. This calls OpenSSL itself, asks ``SSL_get_error`` instead of raising, and hands
    each decrypted record to the protocol: about 10 calls, one in Python. Anything but a plain
    open connection, and any result but data or "read more" (close_notify, an alert, a
    failure), is left to Twisted's own reading, which meets the same condition again (OpenSSL
    keeps it) and handles it.

    It is ``BufferingTLSTransport`` without the aggregation of small writes, which the relay
    writes past (:func:`write_tls_now`): the aggregator, its buffer and two bound methods would
    stay with each session for nothing, about half a KiB.
    """

    # None: write_tls_now reads it here, where an attribute missing would go through
    # ProtocolWrapper.__getattr__ to the transport below, and fail, on every relayed write.
    _aggregator = None
    _losing = False  # set as the connection is lost (an attribute of its own only then)

    def dataReceived(self, data: bytes) -> None:
        if not self._handshakeDone or self._appSendBuffer or self._lostTLSConnection:
            super().dataReceived(data)
            return
        connection = self._tlsConnection
        with _ffi.from_buffer(data) as buffer:
            taken = _lib.BIO_write(connection._into_ssl, buffer, len(data))
        if taken != len(data):  # the memory BIO could not grow: Twisted's reading reports it
            _lib.ERR_clear_error()
            super().dataReceived(data[max(taken, 0):])
            return
        ssl = connection._ssl
        while not self._lostTLSConnection:
            read = _lib.SSL_read(ssl, _plaintext.pointer, _PLAINTEXT)
            if read <= 0:
                if _lib.SSL_get_error(ssl, read) != _lib.SSL_ERROR_WANT_READ:
                    self._flushReceiveBIO()
                    return
                break
            if not self._aborted:
                self.wrappedProtocol.dataReceived(_ffi.unpack(_plaintext.pointer, read))
        if _lib.BIO_get_mem_data(connection._from_ssl, _ffi.NULL):  # an answer, such as refusing a renegotiation
            self._flushSendBIO()

    def _tlsShutdownFinished(self, reason: Failure | None) -> None:
        super()._tlsShutdownFinished(reason)
        if not self._losing and ITLSEndListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.tlsEnded()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # Twisted's TLS layer ends TLS as its connection is lost, too: nothing is left to hold then,
        # and a STARTTLS transport can no longer even unregister its producer. (The transport's
        # own "connected" would not say so behind a PROXY header's wrapper.)
        self._losing = True
        super().connectionLost(reason)


# What one SSL_read may return at most (a record holds 16 KiB; Twisted asks for twice as much).
_PLAINTEXT = 2**15
_plaintext = _RecordBuffer(_PLAINTEXT)  # what one SSL_read decrypts (_Relaying)


def release_tls_buffers(tls: TLSMemoryBIOProtocol | None) -> bool:
    """Give back the memory that the TLS protocol's two memory BIOs have grown to.

    Twisted's TLS protocol passes records to and from OpenSSL through memory
    BIOs, and a memory BIO keeps the largest size it ever held until it is
    freed: a handshake leaves about 3.5 KiB in them, one relayed 64 KiB read
    about 85 KiB. A session then idling for hours would hold that all along.
    (OpenSSL's own record buffers are freed when empty, by
    ``SSL_MODE_RELEASE_BUFFERS``.) Fresh BIOs take their place, which costs
    about a microsecond and a regrowth on the next burst.

    Only an open connection whose two BIOs hold nothing is touched: OpenSSL
    keeps all its state (partial records included) in the connection, so
    nothing is lost. pyOpenSSL has no way to do this: this reaches its private
    BIO handles, and ``tests/test_tls.py`` fails if they change.

    :param tls: the TLS protocol, as :func:`tls_layer` found it, or None for a
        connection in clear.
    :returns: False when the BIOs still hold records (or none could be
        allocated): the caller tries again later. True when they were replaced,
        and when there is nothing to give back: no TLS, a handshake not yet done,
        a connection closing (its BIOs go with it), a connection without memory BIOs.
    """
    if tls is None or not tls._handshakeDone or tls._lostTLSConnection or tls.disconnecting:
        return True
    connection = tls._tlsConnection
    into, out = connection._into_ssl, connection._from_ssl
    if into is None:
        return True
    if _lib.BIO_get_mem_data(into, _ffi.NULL) or _lib.BIO_get_mem_data(out, _ffi.NULL):
        return False
    fresh_into = _lib.BIO_new(_lib.BIO_s_mem())
    fresh_out = _lib.BIO_new(_lib.BIO_s_mem())
    if fresh_into == _ffi.NULL or fresh_out == _ffi.NULL:  # out of memory: keep the old ones
        for bio in (fresh_into, fresh_out):
            if bio != _ffi.NULL:
                _lib.BIO_free(bio)
        _lib.ERR_clear_error()  # or the next SSL_get_error, on any connection, would report it
        return False
    # The connection takes over both and frees the two it had.
    _lib.SSL_set_bio(connection._ssl, fresh_into, fresh_out)
    connection._into_ssl, connection._from_ssl = fresh_into, fresh_out
    return True
