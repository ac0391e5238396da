"""Tests for gateway.tls, over real TLS connections on 127.0.0.1.

Certificates and keys are generated at test time in each test's temporary
directory; the clients are Python's ``ssl`` module (in a thread), Twisted's
own TLS client, and in one place a plain Python ``ssl`` server.
"""

from __future__ import annotations

import datetime
import base64
import functools
import ipaddress
import os
import shutil
import socket
import ssl
import stat
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.bindings.openssl.binding import Binding
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.interfaces import IHandshakeListener, IListeningPort, ITLSTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import Certificate, TLSVersion, optionsForClientTLS, trustRootFromCertificates
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from gateway.testing.pki import TestCA
from gateway.testing.tls_pair import Collector, memory_bios, tls_pair
from gateway.tls import (
    ServerTLS,
    TLSError,
    client_tls,
    describe_tls,
    ensure_self_signed,
    release_tls_buffers,
    switch_to_relaying,
    tls_ended,
    tls_failure,
    tls_layer,
    warn_of_validity,
    write_tls_now,
)

_binding = Binding()

# OpenSSL's text for receiving alert 120, no_application_protocol.
_NO_APPLICATION_PROTOCOL = "tlsv1 alert no application protocol"

# --------------------------------------------------------------------------
# Throwaway PKI


@functools.cache
def _rsa_key() -> rsa.RSAPrivateKey:
    """One RSA key for the whole run: generating it is the slow part."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _temporary_directory(test: SynchronousTestCase) -> str:
    """Create a directory that is removed after ``test``.

    Unlike trial's ``mktemp``, this stays out of the working directory when the
    tests run under pytest.
    """
    directory = tempfile.mkdtemp(prefix="test_tls-")
    test.addCleanup(shutil.rmtree, directory)
    return directory


def _write(directory: str, name: str, *parts: bytes) -> str:
    """Write ``parts`` one after another to ``directory/name``; return the path."""
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(b"".join(parts))
    return path


@dataclass(frozen=True)
class _Files:
    """Paths of a test PKI's PEM files: a root, an intermediate and leaves for localhost, and an unrelated root."""

    chain: str
    key: str
    leaf: str
    root: str
    other_root: str
    rsa_chain: str
    rsa_key: str


def _files(directory: str) -> _Files:
    """Issue the test PKI into ``directory``."""
    ca = TestCA(os.path.join(directory, "ca"))
    leaf = ca.issue("localhost", "127.0.0.1")
    rsa_leaf = ca.issue("localhost", "127.0.0.1", key=_rsa_key())
    other = TestCA(os.path.join(directory, "other"), name="Unrelated Root CA")
    return _Files(chain=leaf.chain_path, key=leaf.key_path, leaf=leaf.cert_path, root=ca.ca_path,
                  other_root=other.ca_path, rsa_chain=rsa_leaf.chain_path, rsa_key=rsa_leaf.key_path)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# --------------------------------------------------------------------------
# Server side


@implementer(IHandshakeListener)
class _Greeter(Protocol):
    """Greets after the TLS handshake, echoes lines, and records what TLS negotiated."""

    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self.description: tuple[str, str] | None = None
        self.before_handshake: tuple[str, str] | None = ("not", "recorded")
        self.alpn: bytes | None = None
        self.group: str | None = None
        self.layer: TLSMemoryBIOProtocol | None = None

    def connectionMade(self) -> None:
        self.before_handshake = describe_tls(self.transport)

    def handshakeCompleted(self) -> None:
        assert self.transport is not None
        self.description = describe_tls(self.transport)
        self.layer = tls_layer(self.transport)
        handle = self.transport.getHandle()  # type: ignore[attr-defined]
        self.alpn = handle.get_alpn_proto_negotiated() or None
        # Neither pyOpenSSL nor Python 3.11's ssl reports the key exchange
        # group, so it is read from the server's connection through the binding.
        name = _binding.lib.SSL_get0_group_name(handle._ssl)
        self.group = _binding.ffi.string(name).decode() if name != _binding.ffi.NULL else None
        self.transport.write(b"hello\r\n")

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        self.lost.callback(None)


class _StartTLSServer(LineReceiver, _Greeter):
    """Plain-text greeting, then TLS with the given ServerTLS on ``STARTTLS``."""

    delimiter = b"\r\n"

    def __init__(self, server_tls: ServerTLS) -> None:
        _Greeter.__init__(self)
        self.server_tls = server_tls
        self.plain_description: tuple[str, str] | None = ("not", "recorded")
        self.plain_layer: TLSMemoryBIOProtocol | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.plain_description = describe_tls(self.transport)
        self.plain_layer = tls_layer(self.transport)
        self.sendLine(b"OK")

    def lineReceived(self, line: bytes) -> None:
        if line == b"STARTTLS":
            self.sendLine(b"GO")
            ITLSTransport(self.transport).startTLS(self.server_tls)
        else:
            self.sendLine(line)

    def dataReceived(self, data: bytes) -> None:
        LineReceiver.dataReceived(self, data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        _Greeter.connectionLost(self, reason)


class _RecordingFactory(Factory):
    """Builds protocols with ``make`` and remembers them."""

    def __init__(self, make: Callable[[], _Greeter]) -> None:
        self.make = make
        self.protocols: list[_Greeter] = []

    def buildProtocol(self, addr: Any) -> _Greeter:
        protocol = self.make()
        protocol.factory = self
        self.protocols.append(protocol)
        return protocol


# --------------------------------------------------------------------------
# Python ssl client (runs in a thread)


@dataclass
class _ClientResult:
    version: str | None
    cipher: str | None
    alpn: str | None
    greeting: bytes
    echo: bytes
    session: ssl.SSLSession | None
    session_reused: bool


def _read_line(sock: socket.socket) -> bytes:
    """Read up to and including CRLF, or until the peer closes."""
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1024)
        if not chunk:
            break
        data += chunk
    return data


def _client_context(
    cafile: str | None,
    *,
    minimum: ssl.TLSVersion | None = None,
    maximum: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
    alpn: list[str] | None = None,
    curve: str | None = None,
) -> ssl.SSLContext:
    """A client context trusting ``cafile`` (or nothing, if None) with the given limits."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(cafile)
    if minimum is not None:
        context.minimum_version = minimum
    if maximum is not None:
        context.maximum_version = maximum
    if ciphers is not None:
        context.set_ciphers(ciphers)
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    if curve is not None:
        # With OpenSSL 3 this sets the client's supported_groups to one group.
        context.set_ecdh_curve(curve)
    return context


def _allow_only_tls11(context: ssl.SSLContext) -> None:
    """Make ``context`` speak TLS 1.1 and nothing else, as an outdated peer would."""
    with warnings.catch_warnings():
        # Python deprecates these versions; using them is the point here.
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    # OpenSSL 3 refuses TLS 1.1 above security level 0.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")


def _tls_client(
    port: int,
    context: ssl.SSLContext,
    session: ssl.SSLSession | None = None,
) -> _ClientResult:
    """Connect, read the greeting, get one line echoed, close."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
            greeting = _read_line(tls)
            tls.sendall(b"ping\r\n")
            echo = _read_line(tls)
            cipher = tls.cipher()
            return _ClientResult(
                version=tls.version(),
                cipher=cipher[0] if cipher else None,
                alpn=tls.selected_alpn_protocol(),
                greeting=greeting,
                echo=echo,
                session=tls.session,
                session_reused=tls.session_reused,
            )


def _starttls_client(port: int, context: ssl.SSLContext) -> tuple[bytes, bytes, _ClientResult]:
    """Read the plain greeting, send STARTTLS, then talk TLS on the same socket."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        plain = _read_line(raw)
        raw.sendall(b"STARTTLS\r\n")
        go = _read_line(raw)
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            greeting = _read_line(tls)
            tls.sendall(b"ping\r\n")
            echo = _read_line(tls)
            cipher = tls.cipher()
            result = _ClientResult(
                version=tls.version(),
                cipher=cipher[0] if cipher else None,
                alpn=tls.selected_alpn_protocol(),
                greeting=greeting,
                echo=echo,
                session=None,
                session_reused=False,
            )
    return plain, go, result


def _starttls_error(port: int, context: ssl.SSLContext) -> str:
    """Like _starttls_client, for a handshake expected to fail; returns the SSL error text."""
    try:
        _starttls_client(port, context)
    except ssl.SSLError as e:
        return str(e)
    return "handshake succeeded"


# --------------------------------------------------------------------------
# Twisted client (for client_tls)


@implementer(IHandshakeListener)
class _TwistedClient(Protocol):
    """Reads the greeting and disconnects; records whether the handshake completed."""

    def __init__(self) -> None:
        self.handshake_done = False
        self.received = b""
        self.reason: Failure | None = None
        self.lost: Deferred[None] = Deferred()

    def handshakeCompleted(self) -> None:
        self.handshake_done = True

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.received += data
        if self.received.endswith(b"\r\n"):
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        self.lost.callback(None)


class _LoopbackTestCase(TestCase):
    """Starts implicit-TLS listeners on 127.0.0.1 and cleans them up."""

    timeout = 60

    def setUp(self) -> None:
        self.files = _files(_temporary_directory(self))

    @inlineCallbacks
    def listen(self, factory: Factory) -> Any:
        """Listen on an ephemeral loopback port; the port number is the result."""
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        port: IListeningPort = yield endpoint.listen(factory)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @inlineCallbacks
    def serve_tls(
        self, alpn: bytes = b"imap", chain: str | None = None, key: str | None = None
    ) -> Any:
        """Serve _Greeter behind ServerTLS; the result is (port, recording factory)."""
        server_tls = ServerTLS(chain or self.files.chain, key or self.files.key, alpn)
        factory = _RecordingFactory(_Greeter)
        port = yield self.listen(TLSMemoryBIOFactory(server_tls, False, factory))
        return port, factory

    @inlineCallbacks
    def all_closed(self, factory: _RecordingFactory) -> Any:
        """Wait until every server-side connection is gone; the result is their reasons."""
        yield gatherResults([p.lost for p in factory.protocols])
        return [p.reason for p in factory.protocols]

    @inlineCallbacks
    def client_error(self, port: int, context: ssl.SSLContext) -> Any:
        """Run a client expected to fail; the result is its ssl.SSLError."""
        try:
            yield deferToThread(_tls_client, port, context)
        except ssl.SSLError as e:
            return e
        self.fail("the TLS client connected")


# --------------------------------------------------------------------------
# ServerTLS over loopback


class ServerHandshakeTests(_LoopbackTestCase):
    """Implicit TLS with ServerTLS against Python's ssl client."""

    @inlineCallbacks
    def test_no_alpn_is_accepted(self) -> Any:
        """A client that offers no ALPN completes the handshake and gets no protocol selected."""
        port, factory = yield self.serve_tls()
        result = yield deferToThread(_tls_client, port, _client_context(self.files.root))
        yield self.all_closed(factory)
        self.assertEqual((result.greeting, result.echo), (b"hello\r\n", b"ping\r\n"))
        self.assertIsNone(result.alpn)
        self.assertIsNone(factory.protocols[0].alpn)

    @inlineCallbacks
    def test_matching_alpn_is_selected(self) -> Any:
        """A client offering the listener's protocol among others gets it selected."""
        port, factory = yield self.serve_tls(alpn=b"imap")
        context = _client_context(self.files.root, alpn=["h2", "imap"])
        result = yield deferToThread(_tls_client, port, context)
        yield self.all_closed(factory)
        self.assertEqual(result.alpn, "imap")
        self.assertEqual(factory.protocols[0].alpn, b"imap")
        self.assertEqual(result.echo, b"ping\r\n")

    @inlineCallbacks
    def test_foreign_alpn_is_refused(self) -> Any:
        """A client offering only another protocol gets alert no_application_protocol (120)."""
        port, factory = yield self.serve_tls(alpn=b"imap")
        context = _client_context(self.files.root, alpn=["http/1.1"])
        error = yield self.client_error(port, context)
        (reason,) = yield self.all_closed(factory)
        # Python 3.11's error table lacks a mnemonic for this reason, so the
        # OpenSSL text for alert 120 is checked instead.
        self.assertIn(_NO_APPLICATION_PROTOCOL, str(error))
        # An SSL.Error is what TLSMemoryBIOProtocol treats as a handshake failure.
        self.assertIsInstance(reason.value, SSL.Error)
        self.assertIn("no application protocol", str(reason.value))
        self.assertIsNone(factory.protocols[0].description)

    @inlineCallbacks
    def test_tls11_is_refused(self) -> Any:
        """A TLS 1.1 client is refused with alert protocol_version."""
        port, factory = yield self.serve_tls()
        context = _client_context(None)
        _allow_only_tls11(context)
        error = yield self.client_error(port, context)
        yield self.all_closed(factory)
        # The alert comes from the server, so the client did send a TLS 1.1 hello.
        self.assertEqual(error.reason, "TLSV1_ALERT_PROTOCOL_VERSION")

    @inlineCallbacks
    def test_tls12_uses_ecdhe_aes_gcm(self) -> Any:
        """A TLS 1.2 client negotiates an ECDHE AES-GCM suite."""
        port, factory = yield self.serve_tls()
        context = _client_context(
            self.files.root, maximum=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE+AESGCM"
        )
        result = yield deferToThread(_tls_client, port, context)
        yield self.all_closed(factory)
        self.assertEqual(result.version, "TLSv1.2")
        self.assertIn(
            result.cipher, {"ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384"}
        )

    @inlineCallbacks
    def test_tls12_server_cipher_order(self) -> Any:
        """
        The server's order decides between AES suites (a client listing AES-256 first still gets
        AES-128), but a client that lists ChaCha20 first gets ChaCha20.
        """
        port, factory = yield self.serve_tls()
        aes = _client_context(self.files.root, maximum=ssl.TLSVersion.TLSv1_2,
                              ciphers="ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256")
        result = yield deferToThread(_tls_client, port, aes)
        self.assertEqual(result.cipher, "ECDHE-ECDSA-AES128-GCM-SHA256")
        chacha = _client_context(self.files.root, maximum=ssl.TLSVersion.TLSv1_2,
                                 ciphers="ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256")
        result = yield deferToThread(_tls_client, port, chacha)
        yield self.all_closed(factory)
        self.assertEqual(result.cipher, "ECDHE-ECDSA-CHACHA20-POLY1305")

    @inlineCallbacks
    def test_tls12_cbc_suites_are_refused(self) -> Any:
        """A TLS 1.2 client offering only CBC suites finds no shared cipher."""
        port, factory = yield self.serve_tls()
        context = _client_context(
            self.files.root,
            maximum=ssl.TLSVersion.TLSv1_2,
            ciphers="ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA",
        )
        error = yield self.client_error(port, context)
        yield self.all_closed(factory)
        self.assertEqual(error.reason, "SSLV3_ALERT_HANDSHAKE_FAILURE")

    @inlineCallbacks
    def test_rsa_key(self) -> Any:
        """An RSA certificate and key serve TLS 1.2 with an ECDHE-RSA suite."""
        port, factory = yield self.serve_tls(chain=self.files.rsa_chain, key=self.files.rsa_key)
        context = _client_context(self.files.root, maximum=ssl.TLSVersion.TLSv1_2)
        result = yield deferToThread(_tls_client, port, context)
        yield self.all_closed(factory)
        assert result.cipher is not None
        self.assertTrue(result.cipher.startswith("ECDHE-RSA-"), result.cipher)

    @inlineCallbacks
    def test_chain_includes_intermediate(self) -> Any:
        """A client trusting only the root verifies the leaf, so the intermediate is served."""
        port, factory = yield self.serve_tls()
        result = yield deferToThread(_tls_client, port, _client_context(self.files.root))
        yield self.all_closed(factory)
        self.assertEqual(result.greeting, b"hello\r\n")
        # Without the intermediate in the chain file, the same client fails.
        port, factory = yield self.serve_tls(chain=self.files.leaf)
        error = yield self.client_error(port, _client_context(self.files.root))
        yield self.all_closed(factory)
        self.assertEqual(error.reason, "CERTIFICATE_VERIFY_FAILED")

    @inlineCallbacks
    def test_tls13_prefers_x25519(self) -> Any:
        """A default TLS 1.3 client negotiates X25519."""
        port, factory = yield self.serve_tls()
        result = yield deferToThread(_tls_client, port, _client_context(self.files.root))
        yield self.all_closed(factory)
        self.assertEqual(result.version, "TLSv1.3")
        self.assertEqual(factory.protocols[0].group, "x25519")

    @inlineCallbacks
    def test_p256_is_accepted(self) -> Any:
        """A client supporting only P-256 negotiates it, in TLS 1.3 and in TLS 1.2."""
        for maximum in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
            port, factory = yield self.serve_tls()
            context = _client_context(self.files.root, maximum=maximum, curve="prime256v1")
            yield deferToThread(_tls_client, port, context)
            yield self.all_closed(factory)
            self.assertEqual(factory.protocols[0].group, "secp256r1")

    @inlineCallbacks
    def test_p384_only_is_refused(self) -> Any:
        """A client supporting only P-384 shares no group with the server."""
        port, factory = yield self.serve_tls()
        error = yield self.client_error(port, _client_context(self.files.root, curve="secp384r1"))
        yield self.all_closed(factory)
        self.assertEqual(error.reason, "SSLV3_ALERT_HANDSHAKE_FAILURE")

    @inlineCallbacks
    def test_session_resumption(self) -> Any:
        """A client resumes its session on a second connection, in TLS 1.2 and in TLS 1.3."""
        for maximum in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            port, factory = yield self.serve_tls()
            context = _client_context(self.files.root, maximum=maximum)
            first = yield deferToThread(_tls_client, port, context)
            second = yield deferToThread(_tls_client, port, context, first.session)
            yield self.all_closed(factory)
            self.assertEqual(second.version, maximum.name.replace("_", "."))
            self.assertFalse(first.session_reused)
            self.assertTrue(second.session_reused, maximum)

    @inlineCallbacks
    def test_describe_tls(self) -> Any:
        """describe_tls reports the version and cipher once the handshake is done, None before."""
        port, factory = yield self.serve_tls()
        result = yield deferToThread(_tls_client, port, _client_context(self.files.root))
        yield self.all_closed(factory)
        self.assertIsNone(factory.protocols[0].before_handshake)
        self.assertEqual(factory.protocols[0].description, (result.version, result.cipher))
        self.assertEqual(result.version, "TLSv1.3")

    @inlineCallbacks
    def test_starttls(self) -> Any:
        """The same ServerTLS secures a plain connection through startTLS, ALPN rules included."""
        server_tls = ServerTLS(self.files.chain, self.files.key, b"imap")
        factory = _RecordingFactory(lambda: _StartTLSServer(server_tls))
        port = yield self.listen(factory)
        context = _client_context(self.files.root, alpn=["imap"])
        plain, go, result = yield deferToThread(_starttls_client, port, context)
        foreign = _client_context(self.files.root, alpn=["http/1.1"])
        refused = yield deferToThread(_starttls_error, port, foreign)
        yield self.all_closed(factory)
        protocol = factory.protocols[0]
        self.assertEqual((plain, go), (b"OK\r\n", b"GO\r\n"))
        self.assertEqual(
            (result.greeting, result.echo, result.alpn), (b"hello\r\n", b"ping\r\n", "imap")
        )
        self.assertIsNone(protocol.plain_description)
        self.assertEqual(protocol.description, (result.version, result.cipher))
        self.assertIn(_NO_APPLICATION_PROTOCOL, refused)


class TLSLayerTests(_LoopbackTestCase):
    """tls_layer finds Twisted's TLS protocol under real implicit-TLS and STARTTLS connections."""

    @inlineCallbacks
    def test_implicit_tls(self) -> Any:
        """Under implicit TLS the TLS layer is the protocol's transport itself."""
        port, factory = yield self.serve_tls()
        yield deferToThread(_tls_client, port, _client_context(self.files.root))
        yield self.all_closed(factory)
        protocol = factory.protocols[0]
        self.assertIsInstance(protocol.layer, TLSMemoryBIOProtocol)
        self.assertIs(protocol.layer, protocol.transport)

    @inlineCallbacks
    def test_starttls(self) -> Any:
        """A plain connection has no TLS layer; after STARTTLS it is the TCP transport's protocol."""
        server_tls = ServerTLS(self.files.chain, self.files.key, b"imap")
        factory = _RecordingFactory(lambda: _StartTLSServer(server_tls))
        port = yield self.listen(factory)
        yield deferToThread(_starttls_client, port, _client_context(self.files.root))
        yield self.all_closed(factory)
        protocol = factory.protocols[0]
        assert isinstance(protocol, _StartTLSServer)
        self.assertIsNone(protocol.plain_layer)
        self.assertIsInstance(protocol.layer, TLSMemoryBIOProtocol)
        self.assertIsNot(protocol.layer, protocol.transport)

    def test_clear_transport(self) -> None:
        """A transport without TLS has no TLS layer."""
        self.assertIsNone(tls_layer(StringTransport()))


def _assert_sent_once(case: SynchronousTestCase, pump: IOPump, collector: Collector, expected: bytes) -> None:
    """What the server wrote reaches the client in this reactor turn, and nothing of it again in later ones."""
    pump.pump(advanceClock=False)
    case.assertEqual(collector.received, expected)
    pump.flush()
    case.assertEqual(collector.received, expected, "a held write was sent twice")


class WriteTLSNowTests(SynchronousTestCase):
    """
    write_tls_now against Twisted's own TLS protocol, connected in memory to a TLS client.

    These tests pin the Twisted behaviour that write_tls_now relies on: if one fails after a
    Twisted upgrade, gateway.tls.write_tls_now must follow Twisted's TLS layer again.
    """

    def setUp(self) -> None:
        files = _files(_temporary_directory(self))
        pair = tls_pair(files.chain, files.key, files.root)
        self.server, self.collector, self.pump, self.clock = pair.server, pair.collector, pair.pump, pair.clock
        self.wire = pair.wire
        self.assertIsNotNone(describe_tls(self.server), "the in-memory TLS handshake did not complete")

    def test_twisted_holds_small_writes(self) -> None:
        """A plain write to Twisted's TLS layer is held until the next reactor turn."""
        self.server.write(b"* OK\r\n")
        self.pump.pump(advanceClock=False)
        self.assertEqual(self.collector.received, b"",
                         "Twisted's TLS layer no longer delays small writes: write_tls_now may be "
                         "obsolete")
        self.pump.flush()
        self.assertEqual(self.collector.received, b"* OK\r\n")

    def test_sent_at_once(self) -> None:
        """What write_tls_now writes is encrypted and on the wire in the same reactor turn, with no turn scheduled."""
        write_tls_now(self.server, b"* OK ready\r\n")
        self.assertEqual(self.clock.getDelayedCalls(), [],
                         "write_tls_now no longer writes past Twisted's write aggregation: follow "
                         "twisted.protocols.tls")
        self.pump.pump(advanceClock=False)
        self.assertEqual(self.collector.received, b"* OK ready\r\n")

    def test_after_held_writes(self) -> None:
        """What Twisted's TLS layer was holding goes out first, in order."""
        self.server.write(b"* OK ")
        write_tls_now(self.server, b"still here\r\n")
        _assert_sent_once(self, self.pump, self.collector, b"* OK still here\r\n")

    def test_bulk_in_one_write(self) -> None:
        """A bulk write is encrypted whole: full 16 KiB records, handed to the transport in one write, intact."""
        data = bytes(range(256)) * 256  # 64 KiB
        self.wire.stream.clear()
        write_tls_now(self.server, data)
        self.assertEqual(len(self.wire.stream), 1, "the records of one bulk write took several transport writes")
        wire = self.wire.stream[0]
        lengths = []
        while wire:
            lengths.append(int.from_bytes(wire[3:5], "big"))
            wire = wire[5 + lengths[-1]:]
        self.assertEqual(len(lengths), 4, lengths)
        self.pump.pump(advanceClock=False)
        self.assertEqual(self.collector.received, data)

    def test_bulk_with_partial_writes(self) -> None:
        """On a context with partial writes (the backend's client TLS), a bulk write also leaves whole, in one write."""
        client = self.collector.transport
        wire = client.transport
        mode = Binding.lib.SSL_set_mode(client._tlsConnection._ssl, 0)  # adds nothing, tells the mode
        self.assertTrue(mode & Binding.lib.SSL_MODE_ENABLE_PARTIAL_WRITE, "the client's context no longer allows partial writes")
        wire.stream.clear()
        data = bytes(range(256)) * 256
        write_tls_now(client, data)
        self.assertEqual(len(wire.stream), 1, "the records of one bulk write took several transport writes")
        self.pump.pump(advanceClock=False)
        self.assertTrue(self.server.wrappedProtocol.received == data, "bytes were changed, reordered or lost")

    def test_bulk_after_held_writes(self) -> None:
        """A bulk write also goes after what Twisted's TLS layer was holding."""
        self.server.write(b"* 1 FETCH (BODY[] {65536}\r\n")
        data = b"y" * 65536
        write_tls_now(self.server, data)
        self.pump.pump(advanceClock=False)
        self.assertEqual(self.collector.received, b"* 1 FETCH (BODY[] {65536}\r\n" + data)

    def test_bulk_after_close(self) -> None:
        """A bulk write after the TLS connection started closing is dropped, as a plain write is."""
        self.server.loseConnection()
        write_tls_now(self.server, b"z" * 65536)
        self.pump.flush()
        self.assertNotIn(b"zzzz", self.collector.received)

    def test_bulk_refused_by_openssl(self) -> None:
        """
        A bulk write that OpenSSL refuses is left to Twisted's TLS layer, which ends the
        connection; nothing of it is sent, nothing is raised, and OpenSSL's error queue is left empty.
        """
        self.server._tlsConnection.shutdown()  # behind Twisted's back: SSL_write now fails
        lost: list[Failure] = []
        self.server.wrappedProtocol.connectionLost = lost.append
        write_tls_now(self.server, b"z" * 65536)
        self.assertEqual(Binding.lib.ERR_peek_error(), 0, "OpenSSL's error queue was left holding the failure")
        self.pump.flush()
        self.assertNotIn(b"zzzz", self.collector.received)
        self.assertEqual(len(lost), 1, "the connection was not ended")

    def test_after_close(self) -> None:
        """Once the TLS connection is closing, like a plain write, it is dropped."""
        self.server.loseConnection()
        write_tls_now(self.server, b"late\r\n")
        self.pump.flush()
        self.assertNotIn(b"late", self.collector.received)


class SwitchToRelayingTests(SynchronousTestCase):
    """
    switch_to_relaying against Twisted's own TLS protocol, connected in memory to a TLS client.

    If these fail after a Twisted or pyOpenSSL upgrade, gateway.tls._Relaying must follow
    how Twisted's TLS layer reads and writes again.
    """

    def setUp(self) -> None:
        self.files = files = _files(_temporary_directory(self))
        pair = tls_pair(files.chain, files.key, files.root)
        self.server, self.collector, self.pump = pair.server, pair.collector, pair.pump
        self.assertIsNotNone(describe_tls(self.server), "the in-memory TLS handshake did not complete")
        self.assertIs(type(self.server), BufferingTLSTransport, "Twisted's factory makes another TLS protocol")
        # Twisted lets go of both once the connection is lost.
        self.inner, self.connection = self.server.wrappedProtocol, self.server._tlsConnection
        switch_to_relaying(self.server)
        self.twisted_reads = 0  # Twisted's own reading, which the switched protocol leaves the rest to
        flush = self.server._flushReceiveBIO

        def counted() -> None:
            self.twisted_reads += 1
            flush()

        self.server._flushReceiveBIO = counted

    def client_sends(self, *writes: bytes) -> None:
        """The client writes each of ``writes`` (a record or more each), then they cross in one pump."""
        for data in writes:
            self.collector.transport.write(data)
            self.pump.clock.advance(0)  # the client's TLS layer holds small writes for a turn
        self.pump.pump(advanceClock=False)

    def test_switched(self) -> None:
        """The protocol keeps Twisted's TLS behaviour and state, less the write aggregation."""
        self.assertIsInstance(self.server, TLSMemoryBIOProtocol)
        self.assertNotIsInstance(self.server, BufferingTLSTransport)
        unswitched = tls_pair(self.files.chain, self.files.key, self.files.root).server
        self.assertEqual(self.server.__dict__.keys() - {"_flushReceiveBIO"},
                         unswitched.__dict__.keys() - {"_aggregator", "write"},
                         "the switch added or removed other state")

    def test_held_writes_first(self) -> None:
        """What the aggregation held when the protocol was switched goes out at once, once, and first."""
        pair = tls_pair(self.files.chain, self.files.key, self.files.root)
        pair.server.write(b"a1 OK ")
        switch_to_relaying(pair.server)
        self.assertEqual(pair.clock.getDelayedCalls(), [], "the aggregation's turn is still pending")
        write_tls_now(pair.server, b"logged in\r\n")
        _assert_sent_once(self, pair.pump, pair.collector, b"a1 OK logged in\r\n")

    def test_writes_not_held(self) -> None:
        """A plain write to the switched protocol goes out in the same turn."""
        self.server.write(b"* BYE\r\n")
        self.assertEqual(self.pump.clock.getDelayedCalls(), [])
        self.pump.pump(advanceClock=False)
        self.assertEqual(self.collector.received, b"* BYE\r\n")

    def test_relayed_write_asks_no_transport(self) -> None:
        """A relayed write finds all it reads on the protocol: nothing goes through ProtocolWrapper.__getattr__."""
        asked: list[str] = []
        forward = ProtocolWrapper.__getattr__

        def recorded(wrapper: ProtocolWrapper, name: str) -> Any:
            asked.append(name)
            return forward(wrapper, name)

        self.patch(ProtocolWrapper, "__getattr__", recorded)
        write_tls_now(self.server, b"* OK\r\n")
        self.assertEqual(asked, [])

    def test_writes_after_loss_dropped(self) -> None:
        """Once the connection is lost, writes are dropped without an error, as the aggregation's were."""
        self.collector.transport.loseConnection()
        self.pump.flush()
        self.assertFalse(self.server.connected)
        self.server.write(b"late\r\n")
        self.server.writeSequence([b"late", b"\r\n"])
        self.pump.flush()
        self.assertNotIn(b"late", self.collector.received)

    def test_records_in_order(self) -> None:
        """Several records arriving in one read are decrypted in one pass and delivered in order, intact."""
        bulk = bytes(range(256)) * 400  # 100 KiB: seven records
        self.client_sends(b"a1 NOOP\r\n", bulk, b"a2 LOGOUT\r\n")
        self.assertTrue(self.inner.received == b"a1 NOOP\r\n" + bulk + b"a2 LOGOUT\r\n",
                        "bytes were changed, reordered or lost")
        self.assertEqual(self.twisted_reads, 0, "data was left to Twisted's reading")

    def test_replies_still_go_out(self) -> None:
        """The server's writes are unaffected: the client receives them."""
        self.client_sends(b"a1 NOOP\r\n")
        write_tls_now(self.server, b"a1 OK\r\n")
        self.pump.pump(advanceClock=False)
        self.assertEqual(self.collector.received, b"a1 OK\r\n")

    def test_close_notify(self) -> None:
        """A client's close_notify is left to Twisted's reading: the server answers it, and the connection ends cleanly."""
        lost: list[Failure] = []
        self.inner.connectionLost = lost.append
        self.client_sends(b"a1 LOGOUT\r\n")
        self.collector.transport.loseConnection()
        self.pump.flush()
        self.assertEqual(self.inner.received, b"a1 LOGOUT\r\n")
        self.assertEqual(self.twisted_reads, 1)
        self.assertEqual(len(lost), 1, "the connection was not ended")
        self.assertIsNone(lost[0].check(SSL.Error), lost[0])
        self.assertTrue(self.connection.get_shutdown() & SSL.SENT_SHUTDOWN, "close_notify was not answered")

    def test_answer_sent_at_once(self) -> None:
        """
        What OpenSSL answers to a read goes out in the same read, as after Twisted's reading: here
        the refusal of a TLS 1.2 client's renegotiation, which the gateway does not allow.
        """
        files = self.files
        with open(files.root, "rb") as root:
            trust = trustRootFromCertificates([Certificate.loadPEM(root.read())])
        tls12 = optionsForClientTLS("localhost", trustRoot=trust,
                                    extraCertificateOptions={"lowerMaximumSecurityTo": TLSVersion.TLSv1_2})
        pair = tls_pair(files.chain, files.key, files.root, client_creator=tls12)
        self.assertEqual(describe_tls(pair.server)[0], "TLSv1.2")
        switch_to_relaying(pair.server)
        client = pair.collector.transport._tlsConnection
        client.renegotiate()
        self.assertRaises(SSL.WantReadError, client.do_handshake)
        hello = client.bio_read(65536)
        pair.wire.stream.clear()
        pair.server.dataReceived(hello)
        self.assertEqual(len(pair.wire.stream), 1, "the answer was not sent")
        self.assertEqual(pair.wire.stream[0][:1], b"\x15", "the answer is not an alert record")

    def test_data_then_close_notify(self) -> None:
        """Data and close_notify in one read: the data is delivered once, then the connection ends cleanly."""
        lost: list[Failure] = []
        self.inner.connectionLost = lost.append
        self.collector.transport.write(b"a1 LOGOUT\r\n")
        self.pump.clock.advance(0)
        self.collector.transport.loseConnection()
        self.pump.pump(advanceClock=False)  # both records reach the server in one read
        self.pump.flush()
        self.assertEqual(self.inner.received, b"a1 LOGOUT\r\n")
        self.assertEqual(len(lost), 1, "the connection was not ended")
        self.assertIsNone(lost[0].check(SSL.Error), lost[0])

    def test_nothing_after_abort(self) -> None:
        """Once the protocol aborts the connection, the rest of the read is not delivered, as Twisted's reading does."""
        delivered: list[bytes] = []

        def abort_at_first(data: bytes) -> None:
            delivered.append(data)
            self.server.abortConnection()

        self.inner.dataReceived = abort_at_first
        self.client_sends(b"a1 NOOP\r\n", b"a2 NOOP\r\n", b"a3 NOOP\r\n")  # three records, one read
        self.assertEqual(delivered, [b"a1 NOOP\r\n"])

    def test_waiting_writes(self) -> None:
        """While writes wait for OpenSSL (a renegotiation under way), a read goes Twisted's way, which sends them."""
        self.server._appSendBuffer.append(b"* waiting\r\n")
        self.client_sends(b"a1 NOOP\r\n")
        self.assertEqual(self.inner.received, b"a1 NOOP\r\n")
        self.pump.pump(advanceClock=False)
        self.assertEqual(self.collector.received, b"* waiting\r\n")

    def test_client_side(self) -> None:
        """The client side of a connection (the backend's TLS) reads at once too."""
        client = self.collector.transport
        switch_to_relaying(client)
        self.assertIsNot(type(client), BufferingTLSTransport)
        bulk = bytes(range(256)) * 400
        write_tls_now(self.server, b"* OK\r\n")
        write_tls_now(self.server, bulk)
        self.pump.pump(advanceClock=False)
        self.assertTrue(self.collector.received == b"* OK\r\n" + bulk, "bytes were changed, reordered or lost")

    def test_broken_record(self) -> None:
        """
        A record that does not decrypt is left to Twisted's reading, which ends the connection
        with OpenSSL's reason; nothing of it is delivered, and OpenSSL's error queue is left empty.
        """
        lost: list[Failure] = []
        self.inner.connectionLost = lost.append
        self.server.dataReceived(b"\x17\x03\x03\x00\x20" + b"\x55" * 32)  # application data, bad tag
        self.pump.flush()
        self.assertEqual(self.inner.received, b"")
        self.assertEqual(self.twisted_reads, 1)
        self.assertEqual(len(lost), 1, "the connection was not ended")
        self.assertIsNotNone(lost[0].check(SSL.Error), lost[0])
        self.assertEqual(Binding.lib.ERR_peek_error(), 0, "OpenSSL's error queue was left holding the failure")

    def test_clear_and_foreign(self) -> None:
        """A connection in clear, and a TLS protocol of a class Twisted did not make, are left alone."""
        switch_to_relaying(None)

        class Own(TLSMemoryBIOProtocol):
            pass

        own = Own.__new__(Own)
        switch_to_relaying(own)
        self.assertIs(type(own), Own)


class ClearConnectionTests(SynchronousTestCase):
    """What tls_layer finds for a connection in clear (None) goes straight to the functions that act on it."""

    def test_none(self) -> None:
        """A connection in clear has not ended TLS, and has no TLS buffers to give back."""
        self.assertIsNone(tls_layer(StringTransport()))
        self.assertFalse(tls_ended(None))
        self.assertTrue(release_tls_buffers(None))


class ReleaseTLSBuffersTests(SynchronousTestCase):
    """
    release_tls_buffers against Twisted's own TLS protocol, connected in memory to a TLS client.

    If these fail after a pyOpenSSL upgrade, gateway.tls.release_tls_buffers must follow how
    pyOpenSSL's Connection holds its memory BIOs again.
    """

    def setUp(self) -> None:
        files = _files(_temporary_directory(self))
        pair = tls_pair(files.chain, files.key, files.root)
        self.server, self.collector, self.pump = pair.server, pair.collector, pair.pump
        self.assertIsNotNone(describe_tls(self.server), "the in-memory TLS handshake did not complete")

    def client_sends(self, data: bytes) -> None:
        """The client writes ``data``; its TLS layer encrypts it, not yet delivered to the server."""
        self.collector.transport.write(data)
        self.pump.clock.advance(0)  # the client's TLS layer holds small writes for a turn

    def test_fresh_buffers(self) -> None:
        """After a burst, both BIOs are replaced, and traffic carries on both ways, intact."""
        write_tls_now(self.server, b"b" * 65536)
        self.pump.pump(advanceClock=False)
        before = memory_bios(self.server)
        release_tls_buffers(self.server)
        after = memory_bios(self.server)
        self.assertNotEqual(before[0], after[0], "the incoming BIO was not replaced")
        self.assertNotEqual(before[1], after[1], "the outgoing BIO was not replaced")
        write_tls_now(self.server, b"* OK still here\r\n")
        self.client_sends(b"a1 NOOP\r\n")
        self.pump.flush()
        self.assertEqual(self.collector.received, b"b" * 65536 + b"* OK still here\r\n")
        self.assertEqual(self.server.wrappedProtocol.received, b"a1 NOOP\r\n")

    def test_kept_while_holding_records(self) -> None:
        """A BIO still holding part of a record is kept, and the record is read whole afterwards."""
        self.client_sends(b"a1 NOOP\r\n")
        record = b"".join(self.pump.clientIO.stream)
        del self.pump.clientIO.stream[:]
        self.server._tlsConnection.bio_write(record[:10])  # arrived, not yet read
        before = memory_bios(self.server)
        release_tls_buffers(self.server)
        self.assertEqual(memory_bios(self.server), before)
        self.server.dataReceived(record[10:])
        self.assertEqual(self.server.wrappedProtocol.received, b"a1 NOOP\r\n")

    def test_not_while_closing(self) -> None:
        """A TLS connection that is closing keeps its BIOs (the incoming one may already carry the end)."""
        self.server.loseConnection()
        before = memory_bios(self.server)
        release_tls_buffers(self.server)
        self.assertEqual(memory_bios(self.server), before)


# --------------------------------------------------------------------------
# ServerTLS construction


class ServerTLSConfigurationTests(SynchronousTestCase):
    """ServerTLS validates its files and configures its context."""

    def setUp(self) -> None:
        self.directory = _temporary_directory(self)
        self.files = _files(self.directory)

    def assert_refused(
        self, certificate_path: str, key_path: str, named: str, problem: str
    ) -> None:
        """ServerTLS raises a one-line TLSError that names ``named`` and states ``problem``."""
        error = self.assertRaises(TLSError, ServerTLS, certificate_path, key_path, b"imap")
        message = str(error)
        self.assertIn(named, message)
        self.assertIn(problem, message)
        self.assertNotIn("\n", message)
        self.assertNotIn("PRIVATE KEY", message)

    def test_missing_certificate(self) -> None:
        """A missing certificate file is a TLSError naming it."""
        missing = os.path.join(self.directory, "missing.pem")
        self.assert_refused(missing, self.files.key, missing, "cannot read")

    def test_missing_key(self) -> None:
        """A missing key file is a TLSError naming it."""
        missing = os.path.join(self.directory, "missing.key")
        self.assert_refused(self.files.chain, missing, missing, "cannot read")

    def test_garbage_certificate(self) -> None:
        """A certificate file that is not PEM is a TLSError naming it."""
        garbage = _write(self.directory, "garbage.pem", os.urandom(64))
        self.assert_refused(garbage, self.files.key, garbage, "no PEM certificate")

    def test_empty_chain(self) -> None:
        """A certificate file holding only a key has an empty chain and is a TLSError."""
        self.assert_refused(self.files.key, self.files.key, self.files.key, "no PEM certificate")

    def test_malformed_certificate(self) -> None:
        """A PEM certificate block with a broken body is a TLSError naming the file."""
        pem = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
        broken = _write(self.directory, "broken.pem", pem)
        self.assert_refused(broken, self.files.key, broken, "malformed")

    def test_garbage_key(self) -> None:
        """A key file that is not a PEM private key is a TLSError naming it."""
        garbage = _write(self.directory, "garbage.key", b"not a key\n")
        self.assert_refused(self.files.chain, garbage, garbage, "not a PEM private key")

    def test_encrypted_key(self) -> None:
        """An encrypted key is a TLSError, not a passphrase prompt."""
        encrypted = _write(
            self.directory,
            "encrypted.key",
            serialization.load_pem_private_key(_read(self.files.key), None).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            ),
        )
        self.assert_refused(self.files.chain, encrypted, encrypted, "encrypted")

    def test_mismatched_key(self) -> None:
        """A key that does not belong to the leaf certificate is a TLSError naming both files."""
        files = self.files
        self.assert_refused(files.chain, files.rsa_key, files.rsa_key, files.chain)

    def test_unsupported_key_type(self) -> None:
        """Only RSA and ECDSA keys are accepted."""
        ed_key = ed25519.Ed25519PrivateKey.generate()
        path = _write(
            self.directory,
            "ed25519.key",
            ed_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        self.assert_refused(self.files.chain, path, path, "RSA or ECDSA")

    def test_unsupported_curve(self) -> None:
        """An EC key on a curve cryptography does not support is a TLSError, not UnsupportedAlgorithm."""
        # An RFC 5915 ECPrivateKey on secp112r1 (OID 1.3.132.0.6), as `openssl ecparam -name secp112r1
        # -genkey -noout` writes it, without the optional public key: cryptography stops at the curve.
        curve = bytes([0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x06])
        body = bytes([0x02, 0x01, 0x01, 0x04, 14]) + os.urandom(14) + bytes([0xA0, len(curve)]) + curve
        der = bytes([0x30, len(body)]) + body
        path = _write(self.directory, "secp112r1.key",
                      b"-----BEGIN EC PRIVATE KEY-----\n", base64.encodebytes(der), b"-----END EC PRIVATE KEY-----\n")
        self.assert_refused(self.files.chain, path, path, "RSA or ECDSA")

    def test_key_readable_by_others(self) -> None:
        """A key that others may read is used, and named once in a warning; 0600 and 0640 are not."""
        with capturedLogs() as events:
            for mode in (0o600, 0o640):
                os.chmod(self.files.key, mode)
                ServerTLS(self.files.chain, self.files.key, b"imap")
            self.assertEqual([e for e in events if e.get("log_namespace") == "gateway.tls"], [])
            os.chmod(self.files.key, 0o644)
            ServerTLS(self.files.chain, self.files.key, b"imap")
            ServerTLS(self.files.chain, self.files.key, b"pop3")
            ServerTLS(self.files.chain, self.files.key, b"imap")  # rebuilt, as a reload and the ticket keys do
        [event] = [e for e in events if e.get("log_namespace") == "gateway.tls"]
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual((event["path"], event["mode"]), (self.files.key, "0644"))
        text = formatEvent(event)
        self.assertTrue(text.startswith(f"private_key_readable_by_others path={self.files.key} mode=0644"), text)
        self.assertNotIn("PRIVATE KEY", text)

    def test_context_options(self) -> None:
        """The context disables compression and renegotiation and releases idle buffers."""
        context = ServerTLS(self.files.chain, self.files.key, b"imap")._context
        # set_options and set_mode return the resulting bit mask; OR-ing in 0 reads it.
        options = context.set_options(0)
        self.assertEqual(options & SSL.OP_NO_COMPRESSION, SSL.OP_NO_COMPRESSION)
        self.assertEqual(options & SSL.OP_NO_RENEGOTIATION, SSL.OP_NO_RENEGOTIATION)
        self.assertEqual(context.set_mode(0) & SSL.MODE_RELEASE_BUFFERS, SSL.MODE_RELEASE_BUFFERS)


# --------------------------------------------------------------------------
# ensure_self_signed


class EnsureSelfSignedTests(SynchronousTestCase):
    """ensure_self_signed creates a certificate once and reuses it."""

    def setUp(self) -> None:
        self.state_dir = os.path.join(_temporary_directory(self), "state")

    def test_creates_once(self) -> None:
        """The first call writes a 0600 key and logs the fingerprint; later calls reuse it."""
        with capturedLogs() as events:
            cert_path, key_path = ensure_self_signed(self.state_dir, "mail.example.org")
            with open(cert_path, "rb") as f:
                first = f.read()
            again = ensure_self_signed(self.state_dir, "mail.example.org")
        self.assertEqual(again, (cert_path, key_path))
        self.assertEqual(cert_path, os.path.join(self.state_dir, "selfsigned-mail.example.org.crt"))
        self.assertEqual(key_path, os.path.join(self.state_dir, "selfsigned-mail.example.org.key"))
        self.assertEqual(stat.S_IMODE(os.stat(key_path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.state_dir).st_mode), 0o700)
        with open(cert_path, "rb") as f:
            self.assertEqual(f.read(), first)
        self.assertEqual(len(os.listdir(self.state_dir)), 2)

        certificate = x509.load_pem_x509_certificate(first)
        generated = [e for e in events if e.get("log_namespace") == "gateway.tls"]
        self.assertEqual(len(generated), 1)
        self.assertEqual(generated[0]["path"], cert_path)
        self.assertEqual(
            generated[0]["fingerprint"].replace(":", "").lower(),
            certificate.fingerprint(hashes.SHA256()).hex(),
        )

    def test_certificate_contents(self) -> None:
        """The certificate is self-signed ECDSA P-256 for one year, naming only the host."""
        cert_path, key_path = ensure_self_signed(self.state_dir, "mail.example.org")
        with open(cert_path, "rb") as f:
            certificate = x509.load_pem_x509_certificate(f.read())
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self.assertIsInstance(key.curve, ec.SECP256R1)
        self.assertEqual(certificate.public_key(), key.public_key())
        self.assertEqual(certificate.issuer, certificate.subject)
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(list(san), [x509.DNSName("mail.example.org")])
        lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
        self.assertEqual(lifetime, datetime.timedelta(days=365))

    def test_ip_address(self) -> None:
        """For an IP address the certificate carries it as an IP SAN."""
        cert_path, _ = ensure_self_signed(self.state_dir, "192.0.2.7")
        with open(cert_path, "rb") as f:
            certificate = x509.load_pem_x509_certificate(f.read())
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(list(san), [x509.IPAddress(ipaddress.ip_address("192.0.2.7"))])

    def test_missing_key_regenerates(self) -> None:
        """If only the certificate is left, both files are generated again."""
        cert_path, key_path = ensure_self_signed(self.state_dir, "mail.example.org")
        with open(cert_path, "rb") as f:
            first = f.read()
        os.unlink(key_path)
        ensure_self_signed(self.state_dir, "mail.example.org")
        with open(cert_path, "rb") as f:
            self.assertNotEqual(f.read(), first)
        self.assertTrue(os.path.exists(key_path))

    def test_expired_regenerates(self) -> None:
        """A pair whose certificate has expired, or expires within 30 days, is replaced, and that is logged."""
        cert_path, key_path = ensure_self_signed(self.state_dir, "mail.example.org")
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        with open(cert_path, "rb") as f:
            original = x509.load_pem_x509_certificate(f.read())
        now = datetime.datetime.now(datetime.timezone.utc)
        for days_left in (-1, 29):
            not_after = now + datetime.timedelta(days=days_left)
            old = x509.CertificateBuilder(
                issuer_name=original.issuer, subject_name=original.subject, public_key=original.public_key(),
                serial_number=original.serial_number, not_valid_before=not_after - datetime.timedelta(days=365),
                not_valid_after=not_after, extensions=list(original.extensions),
            ).sign(key, hashes.SHA256())  # type: ignore[arg-type]
            _write(self.state_dir, os.path.basename(cert_path), old.public_bytes(serialization.Encoding.PEM))
            with capturedLogs() as events:
                self.assertEqual(ensure_self_signed(self.state_dir, "mail.example.org"), (cert_path, key_path))
            with open(cert_path, "rb") as f:
                renewed = x509.load_pem_x509_certificate(f.read())
            self.assertGreater(renewed.not_valid_after_utc, now + datetime.timedelta(days=364))
            renewal = [e for e in events if e.get("log_namespace") == "gateway.tls"][0]
            self.assertEqual((renewal["path"], renewal["not_after"]), (cert_path, old.not_valid_after_utc.isoformat()))
            self.assertTrue(formatEvent(renewal).startswith(f"self_signed_renewal path={cert_path} "))
        # One with more than 30 days left is kept.
        with open(cert_path, "rb") as f:
            kept = f.read()
        ensure_self_signed(self.state_dir, "mail.example.org")
        with open(cert_path, "rb") as f:
            self.assertEqual(f.read(), kept)

    def test_bad_hostname(self) -> None:
        """A host name that could escape the state directory is a TLSError."""
        self.assertRaises(TLSError, ensure_self_signed, self.state_dir, "../etc/passwd")
        self.assertFalse(os.path.exists(self.state_dir))

    def test_loads_into_server_tls(self) -> None:
        """The generated pair is accepted by ServerTLS."""
        ServerTLS(*ensure_self_signed(self.state_dir, "localhost"), b"imap")


# --------------------------------------------------------------------------
# client_tls


class ClientTLSTests(_LoopbackTestCase):
    """client_tls verifies the backend's certificate and host name."""

    @inlineCallbacks
    def connect(self, port: int, server_name: str, ca_file: str | None) -> Any:
        """Connect with client_tls; the result is (client protocol, its connectionLost reason)."""
        tcp = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        endpoint = wrapClientTLS(client_tls(server_name, ca_file), tcp)
        protocol = _TwistedClient()
        yield connectProtocol(endpoint, protocol)
        yield protocol.lost
        return protocol, protocol.reason

    @inlineCallbacks
    def test_good_server(self) -> Any:
        """A server whose chain leads to the given CA and whose name matches is accepted."""
        port, factory = yield self.serve_tls()
        protocol, _ = yield self.connect(port, "localhost", self.files.root)
        yield self.all_closed(factory)
        self.assertTrue(protocol.handshake_done)
        self.assertEqual(protocol.received, b"hello\r\n")

    @inlineCallbacks
    def test_ip_address_name(self) -> Any:
        """A server name given as an IP address is checked against the IP SAN."""
        port, factory = yield self.serve_tls()
        protocol, _ = yield self.connect(port, "127.0.0.1", self.files.root)
        yield self.all_closed(factory)
        self.assertEqual(protocol.received, b"hello\r\n")

    @inlineCallbacks
    def test_bundle_with_several_cas(self) -> Any:
        """A CA file holding several certificates trusts each of them."""
        roots = (_read(self.files.other_root), _read(self.files.root))
        bundle = _write(os.path.dirname(self.files.root), "bundle.pem", *roots)
        port, factory = yield self.serve_tls()
        protocol, _ = yield self.connect(port, "localhost", bundle)
        yield self.all_closed(factory)
        self.assertEqual(protocol.received, b"hello\r\n")

    @inlineCallbacks
    def test_wrong_host_name(self) -> Any:
        """A certificate for another name is refused."""
        port, factory = yield self.serve_tls()
        protocol, reason = yield self.connect(port, "imap.example.org", self.files.root)
        yield self.all_closed(factory)
        self.assertEqual(protocol.received, b"")
        self.assertIn("imap.example.org", str(reason.value))

    @inlineCallbacks
    def test_untrusted_ca(self) -> Any:
        """A server whose chain does not lead to the given CA is refused."""
        port, factory = yield self.serve_tls()
        protocol, reason = yield self.connect(port, "localhost", self.files.other_root)
        yield self.all_closed(factory)
        self.assertFalse(protocol.handshake_done)
        self.assertIsInstance(reason.value, SSL.Error)
        self.assertIn("certificate verify failed", str(reason.value))

    @inlineCallbacks
    def test_platform_trust_rejects_test_ca(self) -> Any:
        """Without a CA file the platform store is used, which does not know the test CA."""
        port, factory = yield self.serve_tls()
        protocol, reason = yield self.connect(port, "localhost", None)
        yield self.all_closed(factory)
        self.assertFalse(protocol.handshake_done)
        self.assertIn("certificate verify failed", str(reason.value))

    @inlineCallbacks
    def test_self_signed_backend(self) -> Any:
        """A backend with an ensure_self_signed certificate is trusted with it as the CA file."""
        state_dir = os.path.join(_temporary_directory(self), "state")
        cert_path, key_path = ensure_self_signed(state_dir, "localhost")
        port, factory = yield self.serve_tls(chain=cert_path, key=key_path)
        protocol, _ = yield self.connect(port, "localhost", cert_path)
        yield self.all_closed(factory)
        self.assertEqual(protocol.received, b"hello\r\n")

    @inlineCallbacks
    def test_tls11_server_is_refused(self) -> Any:
        """A backend that offers at most TLS 1.1 is refused."""
        server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_context.load_cert_chain(self.files.chain, self.files.key)
        _allow_only_tls11(server_context)
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        listener.settimeout(10)

        def serve_once() -> str:
            connection, _ = listener.accept()
            with connection:
                try:
                    server_context.wrap_socket(connection, server_side=True).close()
                except ssl.SSLError as e:
                    return e.reason or ""
            return "handshake succeeded"

        served = deferToThread(serve_once)
        port = listener.getsockname()[1]
        protocol, reason = yield self.connect(port, "localhost", self.files.root)
        server_error = yield served
        self.assertFalse(protocol.handshake_done)
        self.assertIsInstance(reason.value, SSL.Error)
        self.assertEqual(server_error, "UNSUPPORTED_PROTOCOL")


class ClientTLSConfigurationTests(SynchronousTestCase):
    """client_tls reports unusable CA files."""

    def setUp(self) -> None:
        self.directory = _temporary_directory(self)

    def test_missing_ca_file(self) -> None:
        """A missing CA file is a TLSError naming it."""
        path = os.path.join(self.directory, "missing.pem")
        error = self.assertRaises(TLSError, client_tls, "localhost", path)
        self.assertIn(path, str(error))

    def test_garbage_ca_file(self) -> None:
        """A CA file without a PEM certificate is a TLSError naming it."""
        path = _write(self.directory, "garbage.pem", b"garbage\n")
        error = self.assertRaises(TLSError, client_tls, "localhost", path)
        self.assertIn(path, str(error))
        self.assertIn("no valid PEM certificate", str(error))

    def test_server_name_idna_refuses(self) -> None:
        """A server name that passes for a host name but that IDNA refuses is a TLSError naming it."""
        for name in ("ab--cd.example.org", "xn--zz.example.org"):
            error = self.assertRaises(TLSError, client_tls, name, None)
            self.assertIn(repr(name), str(error))


class DescribeTLSTests(SynchronousTestCase):
    """describe_tls on transports that are not TLS."""

    def test_plain_transport(self) -> None:
        """A transport that is not TLS is described as None."""
        self.assertIsNone(describe_tls(StringTransport()))


class TLSFailureTests(SynchronousTestCase):
    """tls_failure words why TLS failed, from OpenSSL's error queue only."""

    def test_openssl_reason(self) -> None:
        """The last reason in OpenSSL's error queue is the one given."""
        error = SSL.Error([("SSL routines", "", "record layer failure"), ("SSL routines", "", "unsupported protocol")])
        self.assertEqual(tls_failure(Failure(error)), "unsupported protocol")

    def test_no_reason(self) -> None:
        """A TLS error without a usable reason is "unknown"."""
        for error in (SSL.Error(), SSL.Error([]), SSL.Error("text"), SSL.Error([("lib", "func", "")])):
            self.assertEqual(tls_failure(Failure(error)), "unknown", error)

    def test_not_tls(self) -> None:
        """A connection lost for any other reason is no TLS failure."""
        self.assertIsNone(tls_failure(connectionDone))


def _certificate_valid(directory: str, name: str, not_before: datetime.datetime,
                       not_after: datetime.datetime) -> str:
    """Write a self-signed certificate valid from C{not_before} to C{not_after}, followed by a second one; its path."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "mail.example.org")])

    def issue(start: datetime.datetime, end: datetime.datetime) -> bytes:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
                .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))

    # The second stands for an intermediate, valid all along: only the leaf is judged.
    utc = datetime.timezone.utc
    always = issue(datetime.datetime(2000, 1, 1, tzinfo=utc), datetime.datetime(2100, 1, 1, tzinfo=utc))
    return _write(directory, name, issue(not_before, not_after), always)


class WarnOfValidityTests(SynchronousTestCase):
    """warn_of_validity logs the leaf certificates that clients refuse, or soon will."""

    NOW = datetime.datetime(2030, 6, 1, 12, 0, tzinfo=datetime.timezone.utc)

    def setUp(self) -> None:
        self.directory = _temporary_directory(self)

    def warnings(self, *validities: tuple[datetime.timedelta, datetime.timedelta]) -> list[str]:
        """The warnings for certificates valid from NOW + start to NOW + end, one file each."""
        paths = [_certificate_valid(self.directory, f"{index}.pem", self.NOW + start, self.NOW + end)
                 for index, (start, end) in enumerate(validities)]
        with capturedLogs() as events:
            warn_of_validity(paths, self.NOW)
        self.assertTrue(all(event["log_level"] == LogLevel.warn for event in events))
        return [formatEvent(event) for event in events]

    def test_valid(self) -> None:
        """A certificate valid for more than 14 days more is not warned about."""
        day = datetime.timedelta(days=1)
        self.assertEqual(self.warnings((-300 * day, 15 * day)), [])

    def test_expired(self) -> None:
        """An expired certificate is warned about with its path and end."""
        day = datetime.timedelta(days=1)
        path = os.path.join(self.directory, "0.pem")
        self.assertEqual(self.warnings((-90 * day, -day)),
                         [f"certificate_expired path={path} not_after=2030-05-31T12:00:00+00:00: clients refuse it; "
                          "renew it and reload"])

    def test_not_yet_valid(self) -> None:
        """A certificate whose validity has not begun is warned about with its path and start."""
        day = datetime.timedelta(days=1)
        path = os.path.join(self.directory, "0.pem")
        self.assertEqual(self.warnings((day, 90 * day)),
                         [f"certificate_not_yet_valid path={path} not_before=2030-06-02T12:00:00+00:00: clients "
                          "refuse it until then; check the clock"])

    def test_expires_soon(self) -> None:
        """A certificate that ends within 14 days is warned about with its path, end and the days left."""
        day = datetime.timedelta(days=1)
        path = os.path.join(self.directory, "0.pem")
        self.assertEqual(self.warnings((-80 * day, 14 * day)),
                         [f"certificate_expires_soon path={path} not_after=2030-06-15T12:00:00+00:00 days=14: "
                          "renew it and reload"])

    def test_each_file_once(self) -> None:
        """Several certificates are judged each, a path named twice once, and an unreadable file is left to loading."""
        day = datetime.timedelta(days=1)
        expired = _certificate_valid(self.directory, "expired.pem", self.NOW - 90 * day, self.NOW - day)
        soon = _certificate_valid(self.directory, "soon.pem", self.NOW - 80 * day, self.NOW + 2 * day)
        garbage = _write(self.directory, "garbage.pem", b"not a certificate")
        with capturedLogs() as events:
            warn_of_validity([expired, soon, expired, garbage, os.path.join(self.directory, "missing.pem")], self.NOW)
        self.assertEqual([(event["log_format"].split()[0], event["path"]) for event in events],
                         [("certificate_expired", expired), ("certificate_expires_soon", soon)])

    def test_now_by_default(self) -> None:
        """Without a time, the current one is used."""
        now = datetime.datetime.now(datetime.timezone.utc)
        path = _certificate_valid(self.directory, "0.pem", now - datetime.timedelta(days=10),
                                  now - datetime.timedelta(days=1))
        with capturedLogs() as events:
            warn_of_validity([path])
        self.assertEqual([event["log_format"].split()[0] for event in events], ["certificate_expired"])
