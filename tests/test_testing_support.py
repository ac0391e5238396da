"""Tests for the test-support modules: the throwaway PKI, the Dovecot sandbox and the gateway process."""

from __future__ import annotations

import datetime
import imaplib
import ipaddress
import os
import poplib
import pwd
import random
import shutil
import socket
import ssl
import stat
import subprocess
import tempfile
import threading
import time
import zlib
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.trial.unittest import SynchronousTestCase

from gateway.testing import dovecot as dovecot_module
from gateway.testing.dovecot import DovecotNotInstalled, DovecotSandbox
from gateway.testing.gateway import GatewayProcess
from gateway.testing.host import free_ports
from gateway.testing.pki import IssuedCertificate, TestCA

USER = "alice"
PASSWORD = "alice-secret"
OTHER_USER = "bob"
OTHER_PASSWORD = "bob-secret"

# CRLF line endings and 8-bit bytes: what IMAP returns must match the file exactly.
MESSAGE = (
    b"From: sender@example.test\r\n"
    b"To: alice@example.test\r\n"
    b"Subject: sandbox\r\n"
    b"Content-Type: text/plain; charset=latin-1\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"caf\xe9 cr\xe8me br\xfbl\xe9e\r\n"
    b".leading dot\r\n"
)


def _temporary_directory(case: SynchronousTestCase) -> str:
    """Create a directory that ``case`` removes at cleanup.

    It lives in the temporary directory rather than trial's working directory, whose
    long path could push Dovecot's unix socket paths past their length limit.
    """
    directory = tempfile.mkdtemp(prefix="mailgateway-test-")
    case.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    return directory


def _handshake(issued: IssuedCertificate, cafile: str, server_hostname: str) -> dict[str, Any]:
    """Run a TLS handshake over a socket pair and return the certificate the client verified.

    The server presents ``issued``'s chain; the client trusts only ``cafile``, checks the
    host name and applies OpenSSL's strict X.509 checks.

    :raises ssl.SSLCertVerificationError: if the client rejects the server's certificate.
    """
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(issued.chain_path, issued.key_path)
    client_context = ssl.create_default_context(cafile=cafile)
    client_context.verify_flags |= ssl.VERIFY_X509_STRICT

    server_sock, client_sock = socket.socketpair()
    server_sock.settimeout(10)
    client_sock.settimeout(10)

    def serve() -> None:
        # The client's verdict is what the tests check; the server side only
        # has to take part, and it sees an alert when the client refuses.
        try:
            with server_context.wrap_socket(server_sock, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            pass

    server = threading.Thread(target=serve)
    server.start()
    try:
        with client_context.wrap_socket(client_sock, server_hostname=server_hostname) as tls:
            peer = tls.getpeercert()
            assert peer is not None
            return peer
    finally:
        client_sock.close()
        server.join(10)
        server_sock.close()


class TestCATests(SynchronousTestCase):
    """Certificates from TestCA verify with OpenSSL and with Python's ssl module."""

    def setUp(self) -> None:
        self.directory = _temporary_directory(self)
        self.ca = TestCA(self.directory)

    def _openssl(self, *args: str) -> subprocess.CompletedProcess[str]:
        if shutil.which("openssl") is None:
            self.fail("openssl is not installed: apt-get install openssl")
        return subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)

    def test_openssl_verifies_leaf_through_intermediate(self) -> None:
        """openssl verify accepts the leaf strictly, as a TLS server, given ca.pem and the chain."""
        issued = self.ca.issue()
        result = self._openssl(
            "verify", "-x509_strict", "-purpose", "sslserver",
            "-CAfile", self.ca.ca_path, "-untrusted", issued.chain_path, issued.cert_path,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn(f"{issued.cert_path}: OK", result.stdout)

    def test_openssl_needs_the_intermediate(self) -> None:
        """The leaf is signed by the intermediate, so ca.pem alone does not verify it."""
        issued = self.ca.issue()
        result = self._openssl("verify", "-CAfile", self.ca.ca_path, issued.cert_path)
        self.assertNotEqual(result.returncode, 0, result.stdout)

    def test_chain_holds_leaf_then_intermediate(self) -> None:
        """The chain file is the leaf followed by a CA certificate that issued it."""
        issued = self.ca.issue()
        with open(issued.chain_path, "rb") as f:
            chain = x509.load_pem_x509_certificates(f.read())
        with open(issued.cert_path, "rb") as f:
            leaf = x509.load_pem_x509_certificate(f.read())
        self.assertEqual(len(chain), 2)
        self.assertEqual(chain[0], leaf)
        self.assertEqual(leaf.issuer, chain[1].subject)
        self.assertTrue(chain[1].extensions.get_extension_for_class(x509.BasicConstraints).value.ca)

    def test_handshake_by_name_and_address(self) -> None:
        """A client trusting only ca.pem accepts the default leaf as localhost, 127.0.0.1, ::1."""
        issued = self.ca.issue()
        for server_hostname in ("localhost", "127.0.0.1", "::1"):
            peer = _handshake(issued, self.ca.ca_path, server_hostname)
            self.assertEqual(
                peer["subjectAltName"],
                (
                    ("DNS", "localhost"),
                    ("IP Address", "127.0.0.1"),
                    ("IP Address", "0:0:0:0:0:0:0:1"),
                ),
            )

    def test_handshake_rejects_other_name(self) -> None:
        """A leaf issued for other names does not pass host name verification for localhost."""
        issued = self.ca.issue("mail.example.test", "192.0.2.1")
        self.assertEqual(
            _handshake(issued, self.ca.ca_path, "mail.example.test")["subject"],
            ((("commonName", "mail.example.test"),),),
        )
        self.assertRaises(
            ssl.SSLCertVerificationError, _handshake, issued, self.ca.ca_path, "localhost"
        )

    def test_handshake_rejects_other_ca(self) -> None:
        """A client trusting a different TestCA rejects the leaf."""
        other = TestCA(os.path.join(self.directory, "other"))
        self.assertRaises(
            ssl.SSLCertVerificationError, _handshake, self.ca.issue(), other.ca_path, "localhost"
        )

    def test_leaf_extensions_and_validity(self) -> None:
        """The leaf is a non-CA serverAuth certificate valid from a day ago to 30 days ahead."""
        now = datetime.datetime.now(datetime.timezone.utc)
        issued = self.ca.issue("localhost", "::1")
        with open(issued.chain_path, "rb") as f:
            leaf, intermediate = x509.load_pem_x509_certificates(f.read())
        extensions = leaf.extensions
        basic = extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(basic.critical)
        self.assertFalse(basic.value.ca)
        self.assertEqual(
            list(extensions.get_extension_for_class(x509.ExtendedKeyUsage).value),
            [ExtendedKeyUsageOID.SERVER_AUTH],
        )
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual(san.get_values_for_type(x509.IPAddress), [ipaddress.ip_address("::1")])
        self.assertEqual(
            extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier,
            intermediate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest,
        )
        slack = datetime.timedelta(minutes=5)
        start_error = leaf.not_valid_before_utc - (now - datetime.timedelta(days=1))
        end_error = leaf.not_valid_after_utc - (now + datetime.timedelta(days=30))
        self.assertLess(abs(start_error), slack)
        self.assertLess(abs(end_error), slack)

    def test_key_is_private(self) -> None:
        """The leaf's private key file is readable by its owner only."""
        issued = self.ca.issue()
        self.assertEqual(stat.S_IMODE(os.stat(issued.key_path).st_mode), 0o600)

    def test_each_issue_writes_new_files(self) -> None:
        """Two issued certificates do not overwrite each other."""
        first, second = self.ca.issue(), self.ca.issue("example.test")
        paths = {first.cert_path, first.key_path, second.cert_path, second.key_path}
        self.assertEqual(len(paths), 4)
        with open(first.cert_path, "rb") as f:
            self.assertIn(
                "localhost",
                x509.load_pem_x509_certificate(f.read())
                .extensions.get_extension_for_class(x509.SubjectAlternativeName)
                .value.get_values_for_type(x509.DNSName),
            )


def _wait_for_log(path: str, needle: str, timeout: float = 5.0) -> str:
    """Return the contents of ``path`` once it contains ``needle``, or the last contents read.

    Dovecot's log process writes asynchronously, so a line may appear shortly after the
    event it describes.
    """
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            text = ""
        if needle in text:
            break
        time.sleep(0.05)
    return text


def _close_imap(client: imaplib.IMAP4) -> None:
    """Close an imaplib client's connection whether or not it has logged out."""
    client.file.close()
    client.sock.close()


class _RawIMAP:
    """A minimal blocking IMAP client for commands imaplib does not know (ID, COMPRESS)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.reader = self.sock.makefile("rb")
        self.greeting = self.reader.readline()

    def command(self, tag: bytes, command: bytes) -> list[bytes]:
        """Send one command and return the response lines up to and including the tagged one."""
        self.sock.sendall(tag + b" " + command + b"\r\n")
        lines = []
        while True:
            line = self.reader.readline()
            if not line:
                raise AssertionError(f"connection closed after {lines!r}")
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines

    def expect_ok(self, tag: bytes, command: bytes) -> list[bytes]:
        """Like :meth:`command`, but raise AssertionError unless the tagged reply is OK."""
        lines = self.command(tag, command)
        if not lines[-1].startswith(tag + b" OK"):
            raise AssertionError(f"{command!r} failed: {lines!r}")
        return lines

    def close(self) -> None:
        """Close the connection."""
        self.reader.close()
        self.sock.close()


class DovecotSandboxTests(SynchronousTestCase):
    """A running DovecotSandbox serves its users over plaintext IMAP and POP3."""

    def setUp(self) -> None:
        self.directory = _temporary_directory(self)
        self.sandbox = DovecotSandbox(
            self.directory, {USER: PASSWORD, OTHER_USER: OTHER_PASSWORD}
        )
        # Registered after the directory's removal, so it runs before it.
        self.addCleanup(self.sandbox.stop)
        self.sandbox.start()

    def _imap_login(self, user: str = USER, password: str = PASSWORD) -> imaplib.IMAP4:
        client = imaplib.IMAP4("127.0.0.1", self.sandbox.imap_port, timeout=10)
        self.addCleanup(_close_imap, client)
        client.login(user, password)
        return client

    def test_ports_are_real(self) -> None:
        """Ports given as 0 are replaced by two distinct real ports."""
        ports = {self.sandbox.imap_port, self.sandbox.pop3_port}
        self.assertEqual(len(ports), 2)
        self.assertNotIn(0, ports)

    def test_imap_login_and_select(self) -> None:
        """A user logs in over IMAP with its password and selects an empty INBOX."""
        client = self._imap_login()
        self.assertEqual(client.select("INBOX"), ("OK", [b"0"]))
        client.logout()

    def test_delivered_message_is_fetched_byte_for_byte(self) -> None:
        """A delivered message comes back unchanged over IMAP and stays unchanged on disk."""
        path = self.sandbox.deliver(USER, MESSAGE)
        self.assertEqual(self.sandbox.message_files(USER), [path])
        self.assertEqual(os.path.dirname(path), os.path.join(self.sandbox.maildir(USER), "new"))
        self.assertEqual(os.stat(path).st_uid, pwd.getpwnam("mail").pw_uid)

        client = self._imap_login()
        self.assertEqual(client.select("INBOX"), ("OK", [b"1"]))
        status, data = client.fetch("1", "(BODY.PEEK[])")
        self.assertEqual(status, "OK")
        first = data[0]
        assert isinstance(first, tuple)
        self.assertEqual(first[1], MESSAGE)
        client.logout()

        # SELECT moves the file to cur/; it must still hold the same bytes.
        (stored,) = self.sandbox.message_files(USER)
        with open(stored, "rb") as f:
            self.assertEqual(f.read(), MESSAGE)
        self.assertEqual(self.sandbox.message_files(OTHER_USER), [])

    def test_wrong_password_fails(self) -> None:
        """A wrong password, or another user's password, is a failed IMAP login."""
        for password in ("wrong", OTHER_PASSWORD):
            client = imaplib.IMAP4("127.0.0.1", self.sandbox.imap_port, timeout=10)
            self.addCleanup(_close_imap, client)
            self.assertRaises(imaplib.IMAP4.error, client.login, USER, password)

    def test_pop3_login(self) -> None:
        """A user logs in over POP3 and sees its delivered message; a wrong password fails."""
        self.sandbox.deliver(USER, MESSAGE)
        client = poplib.POP3("127.0.0.1", self.sandbox.pop3_port, timeout=10)
        client.user(USER)
        client.pass_(PASSWORD)
        self.assertEqual(client.stat(), (1, len(MESSAGE)))
        client.quit()

        client = poplib.POP3("127.0.0.1", self.sandbox.pop3_port, timeout=10)
        self.addCleanup(client.close)
        client.user(USER)
        self.assertRaises(poplib.error_proto, client.pass_, "wrong")

    def test_stop_closes_ports_and_start_reopens_them(self) -> None:
        """stop() closes both ports; start() serves the same mail on the same ports again."""
        self.sandbox.deliver(USER, MESSAGE)
        imap_port, pop3_port = self.sandbox.imap_port, self.sandbox.pop3_port
        self.sandbox.stop()
        for port in (imap_port, pop3_port):
            self.assertRaises(ConnectionRefusedError, socket.create_connection, ("127.0.0.1", port))

        self.sandbox.start()
        self.assertEqual((self.sandbox.imap_port, self.sandbox.pop3_port), (imap_port, pop3_port))
        client = self._imap_login()
        self.assertEqual(client.select("INBOX"), ("OK", [b"1"]))
        client.logout()

    def test_login_is_logged(self) -> None:
        """A successful IMAP login appears in the info log with user, method and addresses."""
        self._imap_login().logout()
        line = f"imap-login: Info: Login: user=<{USER}>, method=PLAIN, rip=127.0.0.1, lip=127.0.0.1"
        self.assertIn(line, _wait_for_log(self.sandbox.info_log_path, line))
        with open(self.sandbox.info_log_path, encoding="utf-8", errors="replace") as f:
            self.assertNotIn(PASSWORD, f.read())

    def test_originating_ip_from_trusted_network(self) -> None:
        """An IMAP ID x-originating-ip from a trusted network becomes the logged remote IP."""
        client = _RawIMAP(self.sandbox.imap_port)
        self.addCleanup(client.close)
        client.expect_ok(b"a", b'ID ("x-originating-ip" "192.0.2.7")')
        client.expect_ok(b"b", f"LOGIN {USER} {PASSWORD}".encode())
        needle = f"Login: user=<{USER}>, method=PLAIN, rip=192.0.2.7,"
        self.assertIn(needle, _wait_for_log(self.sandbox.info_log_path, needle))

    def test_compress_deflate(self) -> None:
        """COMPRESS=DEFLATE is advertised after login and a deflated NOOP gets a deflated OK."""
        client = self._imap_login()
        status, data = client.capability()
        self.assertEqual(status, "OK")
        first = data[0]
        assert isinstance(first, bytes)
        self.assertIn(b"COMPRESS=DEFLATE", first.split())
        client.logout()

        raw = _RawIMAP(self.sandbox.imap_port)
        self.addCleanup(raw.close)
        raw.expect_ok(b"a", f"LOGIN {USER} {PASSWORD}".encode())
        raw.expect_ok(b"b", b"COMPRESS DEFLATE")
        compressor = zlib.compressobj(wbits=-15)
        decompressor = zlib.decompressobj(wbits=-15)
        raw.sock.sendall(compressor.compress(b"c NOOP\r\n") + compressor.flush(zlib.Z_SYNC_FLUSH))
        received = b""
        while b"c OK" not in received:
            chunk = raw.sock.recv(4096)
            self.assertTrue(chunk, f"connection closed after {received!r}")
            received += decompressor.decompress(chunk)

    def test_context_manager(self) -> None:
        """Entering a sandbox starts it and leaving it stops it."""
        other = DovecotSandbox(os.path.join(self.directory, "nested"), {USER: PASSWORD})
        self.addCleanup(other.stop)
        with other as entered:
            self.assertIs(entered, other)
            socket.create_connection(("127.0.0.1", other.imap_port), timeout=10).close()
        self.assertRaises(
            ConnectionRefusedError, socket.create_connection, ("127.0.0.1", other.imap_port)
        )


class DovecotSandboxSetupTests(SynchronousTestCase):
    """DovecotSandbox fails early and clearly when it cannot work."""

    def test_missing_dovecot(self) -> None:
        """Without a dovecot binary on PATH, the error names the Debian packages to install."""
        self.patch(dovecot_module.shutil, "which", lambda name: None)
        error = self.assertRaises(DovecotNotInstalled, DovecotSandbox, "/nonexistent", {})
        self.assertEqual(
            str(error),
            "dovecot is not installed: "
            "apt-get install dovecot-imapd dovecot-pop3d dovecot-submissiond",
        )

    def test_unstorable_password_is_not_echoed(self) -> None:
        """A password a passwd-file cannot hold is refused without repeating it."""
        password = "sec:ret-value"
        error = self.assertRaises(
            ValueError, DovecotSandbox, _temporary_directory(self), {USER: password}
        )
        self.assertNotIn(password, str(error))
        self.assertIn(USER, str(error))

    def test_bad_configuration_reports_log(self) -> None:
        """When Dovecot refuses to start, the error carries Dovecot's own complaint."""
        sandbox = DovecotSandbox(
            _temporary_directory(self), {USER: PASSWORD}, extra_config="bogus_setting = 1\n"
        )
        self.addCleanup(sandbox.stop)
        error = self.assertRaises(RuntimeError, sandbox.start)
        self.assertIn("bogus_setting", str(error))


class FreePortsTests(SynchronousTestCase):
    """free_ports picks ports that outgoing connections cannot take from under a sandbox."""

    def test_below_ephemeral_range(self) -> None:
        """Every port lies below the kernel's ephemeral range, and no port repeats."""
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
        ports = free_ports("127.0.0.1", 50)
        self.assertEqual(len(set(ports)), 50)
        for port in ports:
            self.assertLess(port, ephemeral_low)
            self.assertGreaterEqual(port, 1024)

    def test_skips_a_port_in_use(self) -> None:
        """A port something listens on is passed over for the next candidate."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = taken.getsockname()[1]
            candidates = iter([busy, busy, 20000])

            class Scripted(random.Random):
                def randrange(self, *args: object) -> int:  # type: ignore[override]
                    return next(candidates)

            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 20000))  # free iff this succeeds; closed before use
            self.assertEqual(free_ports("127.0.0.1", 1, Scripted()), [20000])


class GatewayProcessTests(SynchronousTestCase):
    """The real gateway as a child process, as the integration tests run it."""

    def test_restart_in_the_same_directory(self) -> None:
        """
        Started again in the directory of an earlier run, whose log it goes on, it returns once
        its own listeners are up, with their ports, not the earlier run's.
        """
        [backend_port] = free_ports("127.0.0.1", 1)  # nothing listens: the gateway starts all the same
        gateway = GatewayProcess(_temporary_directory(self), imap_backend_port=backend_port, users={USER: PASSWORD})
        self.addCleanup(gateway.stop)
        gateway.start()
        gateway.stop()
        gateway.start()
        for port in gateway.ports.values():
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
        self.assertEqual(gateway.listener_port("imap", "implicit_tls", "127.0.0.1"), gateway.ports[("imap", "implicit_tls")])
        self.assertEqual(gateway.log().count("Starting reactor"), 2)
