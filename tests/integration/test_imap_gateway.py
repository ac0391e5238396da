"""
The IMAP gateway end to end: a private plaintext Dovecot, the gateway as a real process with
TLS listeners and a test CA, and real clients (imaplib, curl, mbsync, raw sockets).
"""

from __future__ import annotations

import base64
import hashlib
import imaplib
import os
import poplib
import random
import re
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time
import warnings
import zlib

from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from gateway.imap_syntax import login_command
from gateway.relay import CLOSE_GRACE
from gateway.testing.dovecot import DovecotSandbox
from gateway.testing.gateway import SESSION_NAME, GatewayProcess

from .stack import Stack, require_tool
from .wire import Wire

USER = "alice"
PASSWORD = 'pa ss"wo\\rd'  # spaces, a quote and a backslash: quoting and literals must be right
OTHER = ("bob", "bobs-password")

MESSAGE = (b"From: Bob <bob@example.org>\r\nTo: alice@example.org\r\nSubject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
           b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln.\r\n.\r\n..leading dots stay\r\n"
           b"trailing spaces   \r\n\tand a tab\r\n")

# Dovecot answers the gateway's ID with a literal for a value that is not ASCII: every login
# through the fixture's gateway (which forwards the client's address by ID) meets one.
BACKEND_ID = 'imap_id_send = name "D\u00f6vecot" vendor Debian\n'


def big_message(size: int) -> bytes:
    """A CRLF message of about C{size} bytes with varied (incompressible) lines."""
    rng = random.Random(size)
    header = b"From: bob@example.org\r\nTo: alice@example.org\r\nSubject: big\r\n\r\n"
    lines = []
    total = len(header)
    while total < size:
        line = bytes(rng.choice(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/") for _ in range(76))
        lines.append(line)
        total += 78
    return header + b"\r\n".join(lines) + b"\r\n"


class GatewayFixture(SynchronousTestCase):
    """One Dovecot and one gateway for a test class; torn down after its last test."""

    forward_client_ip = True
    dovecot_config = "mail_save_crlf = yes\n" + BACKEND_ID  # appended to the sandbox's own
    backend_down_at_start = False  # Dovecot stopped before the gateway starts: its probe learns nothing

    @classmethod
    def setUpClass(cls) -> None:
        cls.stack = stack = Stack("gw-it-")
        cls.ca_path = stack.ca.ca_path
        cls.dovecot = stack.start(DovecotSandbox(stack.path("dovecot"), {USER: PASSWORD, OTHER[0]: OTHER[1]},
                                                 extra_config=cls.dovecot_config))
        if cls.backend_down_at_start:
            cls.dovecot.stop()
        cls.gateway = stack.start(GatewayProcess(
            stack.path("gateway"), imap_backend_port=cls.dovecot.imap_port,
            users={USER: PASSWORD, OTHER[0]: OTHER[1]},
            certificate=stack.certificate.chain_path, private_key=stack.certificate.key_path,
            imap_backend=f"forward_client_ip = {'true' if cls.forward_client_ip else 'false'}\ntimeout = 3",
        ))

    @classmethod
    def tearDownClass(cls) -> None:
        cls.stack.stop()

    def tls(self) -> ssl.SSLContext:
        return self.stack.tls()

    def imaps(self) -> imaplib.IMAP4_SSL:
        return imaplib.IMAP4_SSL("127.0.0.1", self.gateway.port("imap", "implicit_tls"), ssl_context=self.tls(),
                                 timeout=30)

    def starttls(self) -> imaplib.IMAP4:
        client = imaplib.IMAP4("127.0.0.1", self.gateway.port("imap", "starttls"), timeout=30)
        client.starttls(self.tls())
        return client


class ClientFlowMixin:
    """What every client does, run over IMAPS and over STARTTLS by the two subclasses."""

    def connect(self) -> imaplib.IMAP4:
        raise NotImplementedError

    def test_login_select_fetch(self) -> None:
        """LOGIN, SELECT and FETCH return the stored message byte for byte."""
        self.dovecot.deliver(USER, MESSAGE)
        client = self.connect()
        typ, data = client.login(USER, PASSWORD)
        self.assertEqual(typ, "OK")
        self.assertNotIn(b"STARTTLS", data[0])
        typ, data = client.select("INBOX")
        self.assertEqual(typ, "OK")
        uids = client.uid("SEARCH", None, "ALL")[1][0].split()
        typ, data = client.uid("FETCH", b",".join(uids), "(BODY.PEEK[])")
        bodies = [part[1] for part in data if isinstance(part, tuple)]
        self.assertIn(MESSAGE, bodies)
        self.assertEqual(client.logout()[0], "BYE")

    def test_imaplib_enable_after_login(self) -> None:
        """
        imaplib's enable() works after login, as against Dovecot itself: imaplib checks the list
        it got before login, where the gateway offers the backend's ENABLE and IDLE (learned by
        its probe at start).
        """
        client = self.connect()
        self.assertIn("ENABLE", client.capabilities)
        self.assertIn("IDLE", client.capabilities)
        client.login(USER, PASSWORD)
        self.assertEqual(client.enable("CONDSTORE")[0], "OK")
        self.assertEqual(client.response("ENABLED"), ("ENABLED", [b"CONDSTORE"]))
        client.logout()

    def test_authenticate_plain(self) -> None:
        """AUTHENTICATE PLAIN logs in."""
        client = self.connect()
        typ, _ = client.authenticate("PLAIN", lambda _: f"\0{USER}\0{PASSWORD}".encode())
        self.assertEqual(typ, "OK")
        self.assertEqual(client.select("INBOX")[0], "OK")
        client.logout()

    def test_wrong_password(self) -> None:
        """A wrong password is refused with AUTHENTICATIONFAILED; an unknown user alike."""
        for user, password in ((USER, "wrong"), ("nobody", PASSWORD)):
            client = self.connect()
            with self.assertRaises(imaplib.IMAP4.error) as caught:
                client.login(user, password)
            self.assertIn("[AUTHENTICATIONFAILED] Authentication failed.", str(caught.exception))
            client.logout()

    def test_append_20mb_read_back(self) -> None:
        """A 20 MB APPEND is stored and read back byte for byte."""
        message = big_message(20 * 1024 * 1024)
        client = self.connect()
        client.login(OTHER[0], OTHER[1])
        typ, data = client.append("INBOX", None, None, message)
        self.assertEqual(typ, "OK", data)
        uid = re.search(rb"APPENDUID \d+ (\d+)", data[0]).group(1)
        client.select("INBOX", readonly=True)
        typ, data = client.uid("FETCH", uid, "(BODY.PEEK[])")
        self.assertEqual(hashlib.sha256(data[0][1]).hexdigest(), hashlib.sha256(message).hexdigest())
        client.logout()
        stored = [p for p in self.dovecot.message_files(OTHER[0]) if os.path.getsize(p) == len(message)]
        with open(stored[0], "rb") as f:
            self.assertEqual(hashlib.sha256(f.read()).digest(), hashlib.sha256(message).digest())


class ImapsTests(ClientFlowMixin, GatewayFixture):
    """Client flows over IMAPS (implicit TLS)."""

    def connect(self) -> imaplib.IMAP4:
        return self.imaps()


class StarttlsTests(ClientFlowMixin, GatewayFixture):
    """Client flows over IMAP with STARTTLS."""

    def connect(self) -> imaplib.IMAP4:
        return self.starttls()

    def test_login_before_starttls_refused(self) -> None:
        """LOGIN before STARTTLS is refused with PRIVACYREQUIRED; the greeting says LOGINDISABLED."""
        client = imaplib.IMAP4("127.0.0.1", self.gateway.port("imap", "starttls"), timeout=30)
        self.assertIn("LOGINDISABLED", client.capabilities)
        self.assertNotIn("AUTH=PLAIN", client.capabilities)
        with self.assertRaises(imaplib.IMAP4.error) as caught:
            client.login(USER, PASSWORD)
        self.assertIn("PRIVACYREQUIRED", str(caught.exception))
        client.logout()

    def test_starttls_injection_discarded(self) -> None:
        """A command pipelined with STARTTLS in the same segment is never run."""
        wire = Wire(self.gateway.port("imap", "starttls"))
        wire.line()
        wire.send(f'a STARTTLS\r\nb LOGIN {USER} "{PASSWORD.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"\r\n'.encode())
        self.assertEqual(wire.line(), b"a OK Begin TLS negotiation now.\r\n")
        wire.upgrade(self.tls())
        wire.send(b"c NOOP\r\n")
        self.assertEqual(wire.line(), b"c OK NOOP completed.\r\n")  # not "b OK": LOGIN never ran
        wire.close()
        self.gateway.wait_for_log(r"starttls_discarded protocol=imap client=127\.0\.0\.1 bytes=\d+")


class GatewayBehaviourTests(GatewayFixture):
    """Behaviour beyond the basic flows, over IMAPS."""

    def test_login_with_literal_password(self) -> None:
        """LOGIN with a synchronizing literal password containing spaces and quotes works."""
        wire = Wire(self.gateway.port("imap", "implicit_tls"), tls=self.tls())
        wire.line()
        secret = PASSWORD.encode()
        wire.send(b"a LOGIN " + USER.encode() + b" {%d}\r\n" % len(secret))
        self.assertTrue(wire.line().startswith(b"+ "))
        wire.send(secret + b"\r\n")
        self.assertTrue(wire.until(b"a ")[-1].startswith(b"a OK [CAPABILITY "))
        wire.send(b"b SELECT INBOX\r\n")
        self.assertTrue(wire.until(b"b ")[-1].startswith(b"b OK "))
        wire.close()

    def test_pipelined_after_login(self) -> None:
        """Commands pipelined after LOGIN in the same segment reach the backend after the login."""
        wire = Wire(self.gateway.port("imap", "implicit_tls"), tls=self.tls())
        wire.line()
        wire.send(f"a LOGIN {OTHER[0]} {OTHER[1]}\r\nb SELECT INBOX\r\nc LOGOUT\r\n".encode())
        lines = wire.until(b"c ")
        tagged = [line[:4] for line in lines if line[:1] in b"abc"]
        self.assertEqual(tagged, [b"a OK", b"b OK", b"c OK"])
        self.assertEqual(wire.line(), b"")  # the backend's close reached the client
        wire.close()

    def test_idle_sees_new_message(self) -> None:
        """A client in IDLE is told about a message that arrives meanwhile."""
        wire = Wire(self.gateway.port("imap", "implicit_tls"), tls=self.tls())
        wire.line()
        wire.send(f"a LOGIN {OTHER[0]} {OTHER[1]}\r\nb SELECT INBOX\r\nc IDLE\r\n".encode())
        wire.until(b"b ")
        self.assertTrue(wire.line().startswith(b"+ "))
        appender = self.imaps()
        appender.login(OTHER[0], OTHER[1])
        appender.append("INBOX", None, None, MESSAGE)
        appender.logout()
        self.assertRegex(wire.line(), rb"^\* \d+ EXISTS\r\n$")
        wire.send(b"DONE\r\n")
        self.assertTrue(wire.until(b"c ")[-1].startswith(b"c OK "))
        wire.close()

    def test_compress_deflate_passes_through(self) -> None:
        """COMPRESS=DEFLATE is negotiated with the backend through the relay and works."""
        wire = Wire(self.gateway.port("imap", "implicit_tls"), tls=self.tls())
        wire.line()
        wire.send(f"a LOGIN {OTHER[0]} {OTHER[1]}\r\n".encode())
        self.assertIn(b"COMPRESS=DEFLATE", wire.until(b"a ")[-1])
        wire.send(b"b COMPRESS DEFLATE\r\n")
        self.assertTrue(wire.line().startswith(b"b OK"))
        deflate = zlib.compressobj(wbits=-15)
        wire.send(deflate.compress(b"c NOOP\r\n") + deflate.flush(zlib.Z_SYNC_FLUSH))
        inflate = zlib.decompressobj(wbits=-15)
        received = b""
        while b"c OK" not in received:
            chunk = wire.sock.recv(65536)
            self.assertTrue(chunk, "connection closed")
            received += inflate.decompress(chunk)
        wire.close()

    def test_client_address_forwarded(self) -> None:
        """
        With forward_client_ip the backend logs the client's own address (IMAP ID), and the
        gateway's name of the session as its own.
        """
        wire = Wire(self.gateway.port("imap", "implicit_tls"), tls=self.tls(), source="127.0.0.5")
        wire.line()
        wire.send(f"a LOGIN {OTHER[0]} {OTHER[1]}\r\n".encode())
        self.assertTrue(wire.until(b"a ")[-1].startswith(b"a OK"))
        wire.close()
        login = self.gateway.wait_for_log(r"login protocol=imap client=127\.0\.0\.5 user=\"bob\" .* session=(\S+)")
        deadline_log = ""
        for _ in range(100):
            with open(self.dovecot.info_log_path, encoding="utf-8", errors="replace") as f:
                deadline_log = f.read()
            if "rip=127.0.0.5" in deadline_log:
                break
            threading.Event().wait(0.05)
        self.assertIn("user=<bob>, method=PLAIN, rip=127.0.0.5", deadline_log)
        self.assertRegex(deadline_log,
                         rf"user=<bob>, method=PLAIN, rip=127\.0\.0\.5, .* session=<{re.escape(login.group(1))}>\n")

    def test_tls_failures_logged(self) -> None:
        """
        A handshake that fails says why in the log: a client that refuses the gateway's certificate
        (it does not trust the CA), and one that offers only TLS 1.1, which the gateway refuses.
        Their disconnect lines count nothing sent that the failed handshake held back.
        """
        untrusting = ssl.create_default_context()  # the system's CAs, not the test CA
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is deprecated: that is the point
            old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
        for source, context in (("127.0.0.21", untrusting), ("127.0.0.22", old)):
            with self.assertRaises(ssl.SSLError):
                Wire(self.gateway.port("imap", "implicit_tls"), tls=context, source=source)
        self.gateway.wait_for_log(rf'tls_failed protocol=imap client=127\.0\.0\.21 error="[^"]*unknown ca" session={SESSION_NAME}\n')
        self.gateway.wait_for_log(rf'tls_failed protocol=imap client=127\.0\.0\.22 error="unsupported protocol" session={SESSION_NAME}\n')
        # The greeting written for them was never delivered: they were sent nothing.
        for source in ("127.0.0.21", "127.0.0.22"):
            self.gateway.wait_for_log(rf"disconnect protocol=imap client={re.escape(source)} \S+ \S+ in=0 out=0 ")
        # After STARTTLS: what went in clear, the greeting and the reply, and nothing of the failed handshake.
        with socket.create_connection(("127.0.0.1", self.gateway.port("imap", "starttls")), timeout=10,
                                      source_address=("127.0.0.23", 0)) as raw:
            wire = raw.makefile("rb")
            greeting = wire.readline()
            raw.sendall(b"a STARTTLS\r\n")
            reply = wire.readline()
            self.assertTrue(reply.startswith(b"a OK"), reply)
            with self.assertRaises(ssl.SSLError):
                untrusting.wrap_socket(raw, server_hostname="localhost")
        self.gateway.wait_for_log(r'tls_failed protocol=imap client=127\.0\.0\.23 error="[^"]*unknown ca"')
        self.gateway.wait_for_log(rf"disconnect protocol=imap client=127\.0\.0\.23 \S+ \S+ in=12 "
                                  rf"out={len(greeting) + len(reply)} ")

    def test_backend_id_answer_with_literal(self) -> None:
        """The backend's answer to ID carries a literal (the fixture's BACKEND_ID), and logins go through."""
        with socket.create_connection(("127.0.0.1", self.dovecot.imap_port), timeout=5) as backend:
            backend_wire = backend.makefile("rb")
            backend_wire.readline()
            backend.sendall(b'a ID NIL\r\n')
            self.assertRegex(backend_wire.readline(), rb'^\* ID \("name" \{8\}\r\n$')
        client = self.imaps()
        self.assertEqual(client.login(USER, PASSWORD)[0], "OK")
        client.logout()

    def test_curl_imaps_and_starttls(self) -> None:
        """curl fetches a message over imaps:// and over imap:// with --ssl-reqd, byte for byte."""
        curl = require_tool("curl", "curl")
        self.dovecot.deliver(USER, MESSAGE)
        client = self.imaps()
        client.login(USER, PASSWORD)
        client.select("INBOX", readonly=True)
        uid = client.uid("SEARCH", None, "ALL")[1][0].split()[0].decode()
        client.logout()
        urls = (f"imaps://127.0.0.1:{self.gateway.port('imap', 'implicit_tls')}/INBOX;UID={uid}",
                f"imap://127.0.0.1:{self.gateway.port('imap', 'starttls')}/INBOX;UID={uid}")
        for url in urls:
            result = subprocess.run([curl, "-sS", "--ssl-reqd", "--cacert", self.ca_path, "-u", f"{USER}:{PASSWORD}", url],
                                    capture_output=True, timeout=60)
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(result.stdout, self.first_message(uid))

    def test_mbsync_both_ways(self) -> None:
        """
        mbsync over IMAPS, checking the certificate against the test CA, copies the INBOX to a local
        Maildir as stored, then uploads a message written into that Maildir, which the store receives
        intact; but for mbsync's documented line ending conversion and X-TUID header.
        """
        mbsync = require_tool("mbsync", "isync")
        self.dovecot.deliver(USER, MESSAGE)
        home = tempfile.mkdtemp(prefix="mbsync-", dir=self.stack.directory)
        os.mkdir(os.path.join(home, "Mail"))  # mbsync creates mailboxes, not the store's Path
        inbox = os.path.join(home, "Mail", "INBOX")
        password_file = os.path.join(home, "password")
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(PASSWORD)  # PassCmd reads it: the password never goes through mbsync's config quoting
        rcfile = os.path.join(home, "mbsyncrc")
        with open(rcfile, "w", encoding="utf-8") as f:
            # "localhost" because mbsync matches the certificate against DNS names only (not IP
            # SANs); it resolves to loopback. SystemCertificates no: only the test CA is trusted.
            f.write(f'IMAPAccount gateway\nHost localhost\nPort {self.gateway.port("imap", "implicit_tls")}\n'
                    f'User {USER}\nPassCmd "cat {password_file}"\nSSLType IMAPS\n'
                    f'SystemCertificates no\nCertificateFile {self.ca_path}\n\n'
                    f'IMAPStore far\nAccount gateway\n\n'
                    f'MaildirStore near\nPath {home}/Mail/\nInbox {inbox}\n\n'
                    f'Channel both\nFar :far:\nNear :near:\nPatterns INBOX\nCreate Both\nSyncState *\n')

        def sync() -> None:
            result = subprocess.run([mbsync, "-c", rcfile, "-a"], capture_output=True, timeout=60,
                                    env={"HOME": home, "PATH": os.environ.get("PATH", "/usr/bin:/bin")})
            self.assertEqual(result.returncode, 0, (result.stdout + result.stderr).decode("utf-8", "replace"))

        def local_messages() -> list[bytes]:
            messages = []
            for sub in ("new", "cur"):
                for name in os.listdir(os.path.join(inbox, sub)):
                    with open(os.path.join(inbox, sub, name), "rb") as f:
                        messages.append(f.read())
            return messages

        def without_tuid(message: bytes, eol: bytes) -> bytes:
            # mbsync 1.4 adds one header to every message it copies, either way, to find it again:
            # "X-TUID: " and 12 characters, last in the header. It is the only addition.
            stripped, count = re.subn(re.escape(eol) + rb"X-TUID: \S{12}" + re.escape(eol * 2), eol * 2, message)
            self.assertEqual(count, 1, message)
            return stripped

        sync()
        # mbsync 1.4 stores messages in a Maildir with LF line endings: it turns IMAP's CRLF into
        # LF. Other tests of this class may deliver to USER too (test_curl_imaps_and_starttls
        # delivers MESSAGE): the local INBOX must mirror the store's INBOX, MESSAGE included.
        stored = []
        for path in self.dovecot.message_files(USER):
            with open(path, "rb") as f:
                stored.append(f.read().replace(b"\r\n", b"\n"))
        self.assertIn(MESSAGE.replace(b"\r\n", b"\n"), stored)
        self.assertEqual(sorted(without_tuid(message, b"\n") for message in local_messages()), sorted(stored))

        subject = f"from mbsync {os.getpid()} {time.time_ns()}"
        header = f"From: alice@example.org\nTo: bob@example.org\nSubject: {subject}\n".encode()
        body = b"\nUploaded by mbsync\n\twith a tab, trailing spaces   \n.\n..and dots\n"
        now = time.time()
        name = f"{int(now)}.M{int(now % 1 * 1_000_000)}P{os.getpid()}Q1.mbsync-test"
        with open(os.path.join(inbox, "tmp", name), "wb") as f:
            f.write(header + body)
        os.rename(os.path.join(inbox, "tmp", name), os.path.join(inbox, "new", name))
        sync()
        uploaded = []
        for path in self.dovecot.message_files(USER):
            with open(path, "rb") as f:
                content = f.read()
            if f"Subject: {subject}\r\n".encode() in content:
                uploaded.append(content)
        self.assertEqual(len(uploaded), 1, uploaded)
        # mbsync sends CRLF and Dovecot keeps it (mail_save_crlf = yes in the fixture).
        self.assertEqual(without_tuid(uploaded[0], b"\r\n"), (header + body).replace(b"\n", b"\r\n"))
        self.assertNotIn(PASSWORD, self.gateway.log())

    def first_message(self, uid: str) -> bytes:
        client = self.imaps()
        client.login(USER, PASSWORD)
        client.select("INBOX", readonly=True)
        body = client.uid("FETCH", uid, "(BODY.PEEK[])")[1][0][1]
        client.logout()
        return body

    def test_log_lines(self) -> None:
        """The gateway logs TLS details, logins and disconnects with byte counts; never a password."""
        client = self.imaps()
        client.login(OTHER[0], OTHER[1])
        client.logout()
        self.gateway.wait_for_log(r"tls protocol=imap client=127\.0\.0\.1 version=TLSv1\.[23] cipher=\S+")
        self.gateway.wait_for_log(r"disconnect protocol=imap client=127\.0\.0\.1 user=\"bob\" state=relaying "
                                  r"in=\d+ out=\d+ duration=\d+\.\d+")
        self.assertNotIn(OTHER[1], self.gateway.log())
        self.assertNotIn(PASSWORD, self.gateway.log())


class BackendOutageTests(GatewayFixture):
    """The backend goes away and comes back; the gateway keeps running."""

    def test_backend_down_then_back(self) -> None:
        """
        With the backend stopped a login gets NO [UNAVAILABLE]; once it is back, logins work again.
        The log says when the outage began and ended, once each.
        """
        self.dovecot.stop()
        try:
            client = self.imaps()
            with self.assertRaises(imaplib.IMAP4.error) as caught:
                client.login(USER, PASSWORD)
            self.assertIn("[UNAVAILABLE]", str(caught.exception))
            client.logout()
            self.gateway.wait_for_log(r"backend_unavailable protocol=imap client=127\.0\.0\.1 user=\"alice\" "
                                      r"backend=127\.0\.0\.1:\d+ reason=")
        finally:
            self.dovecot.start()
        client = self.imaps()
        self.assertEqual(client.login(USER, PASSWORD)[0], "OK")
        client.logout()
        self.gateway.wait_for_log(r"backend_up backend=127\.0\.0\.1:\d+ down_for=\d+\.\d")
        log = self.gateway.log()
        self.assertEqual((log.count("backend_down "), log.count("backend_up ")), (1, 1))
        self.assertLess(log.index("backend_down backend="), log.index("backend_up backend="))


class BackendDownAtStartTests(GatewayFixture):
    """The backend is down when the gateway starts, so its probe learns nothing."""

    backend_down_at_start = True

    def test_backend_capabilities_learned_at_login(self) -> None:
        """
        Until a login reaches the backend the gateway offers none of its capabilities before login;
        from the first one on it offers its ENABLE and IDLE, and imaplib's enable() works.
        """
        client = self.imaps()
        self.assertNotIn("ENABLE", client.capabilities)
        client.logout()
        self.dovecot.start()
        client = self.imaps()
        self.assertEqual(client.login(USER, PASSWORD)[0], "OK")
        client.logout()
        client = self.imaps()
        self.assertIn("ENABLE", client.capabilities)
        self.assertIn("IDLE", client.capabilities)
        client.login(USER, PASSWORD)
        self.assertEqual(client.enable("CONDSTORE")[0], "OK")
        client.logout()


class UserLimitTests(GatewayFixture):
    """Dovecot allows one session per user and address (mail_max_userip_connections = 1)."""

    dovecot_config = GatewayFixture.dovecot_config + "protocol imap {\n  mail_max_userip_connections = 1\n}\n"

    def test_second_session_refused_without_outage(self) -> None:
        """
        The user's second session is told NO [UNAVAILABLE], and the log says the backend refused it
        with NO [LIMIT]: the backend is up, so no backend_down line.
        """
        first = self.imaps()
        first.login(USER, PASSWORD)
        second = self.imaps()
        with self.assertRaises(imaplib.IMAP4.error) as caught:
            second.login(USER, PASSWORD)
        self.assertIn("[UNAVAILABLE] Service temporarily unavailable", str(caught.exception))
        self.gateway.wait_for_log(r'backend_refused protocol=imap client=127\.0\.0\.1 user="alice" reply=NO \[LIMIT\]')
        self.assertNotIn("backend_down", self.gateway.log())
        second.logout()
        first.logout()


# An OAuth token as a password (Dovecot's oauth2 passdb): over Dovecot's 1 KiB for LOGIN and USER/PASS.
TOKEN_USER = ("carol", "t" * 2000)
# Where Dovecot takes any name (auth_username_chars empty): POP3's USER cannot carry a space.
SPACED_USER = ("dave smith", "daves-password")


class BackendDecidesTests(SynchronousTestCase):
    """[auth] mode "backend": Dovecot checks the passwords the gateway passes on."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.stack = stack = Stack("gw-backend-auth-")
        cls.dovecot = stack.start(DovecotSandbox(stack.path("dovecot"), dict((OTHER, TOKEN_USER, SPACED_USER)),
                                                 extra_config="auth_username_chars =\n"))
        cls.gateway = stack.start(GatewayProcess(
            stack.path("gateway"), imap_backend_port=cls.dovecot.imap_port, pop3_backend_port=cls.dovecot.pop3_port,
            users=None, certificate=stack.certificate.chain_path, private_key=stack.certificate.key_path))

    @classmethod
    def tearDownClass(cls) -> None:
        cls.stack.stop()

    def test_over_long_credentials_are_wrong(self) -> None:
        """
        An 8,000-byte password or a 7,000-byte user name (Dovecot would drop the LOGIN with
        "BYE Input buffer full") fails as a wrong login, and is counted as one; not as the
        backend being down. The right password still logs in.
        """
        for user, password in ((OTHER[0], "p" * 8000), ("u" * 7000, OTHER[1])):
            client = imaplib.IMAP4_SSL("127.0.0.1", self.gateway.port("imap", "implicit_tls"),
                                       ssl_context=self.stack.tls(), timeout=30)
            with self.assertRaises(imaplib.IMAP4.error) as caught:
                client.login(user, password)
            self.assertIn("[AUTHENTICATIONFAILED]", str(caught.exception))
            client.logout()
        self.gateway.wait_for_log(r'login_failed protocol=imap client=\S+ user="u+" reason=credentials repeat=no')
        self.assertEqual(len(re.findall(r"login_failed .* reason=credentials repeat=no", self.gateway.log())), 2)
        self.assertNotIn("backend_unavailable", self.gateway.log())
        client = imaplib.IMAP4_SSL("127.0.0.1", self.gateway.port("imap", "implicit_tls"), ssl_context=self.stack.tls())
        self.assertEqual(client.login(*OTHER)[0], "OK")
        client.logout()

    def test_credentials_login_and_user_pass_cannot_carry(self) -> None:
        """
        A 2,000-byte password (an OAuth token: Dovecot drops a LOGIN, USER or PASS past 1 KiB) logs
        in over IMAP and POP3, and a name with a space over POP3, each to its own mailbox: the
        gateway's logins to Dovecot go as SASL PLAIN there.
        """
        for user, password in (TOKEN_USER, SPACED_USER):
            self.dovecot.deliver(user, b"Subject: for %s\r\n\r\nhello\r\n" % user.encode())
            imap = imaplib.IMAP4_SSL("127.0.0.1", self.gateway.port("imap", "implicit_tls"),
                                     ssl_context=self.stack.tls(), timeout=30)
            self.assertEqual(imap.login(f'"{user}"', password)[0], "OK", user)  # imaplib quotes the password only
            imap.select("INBOX", readonly=True)
            fetched = imap.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")[1][0]
            self.assertIn(b"for " + user.encode(), fetched[1])
            imap.logout()
            pop = poplib.POP3_SSL("127.0.0.1", self.gateway.port("pop3", "implicit_tls"), context=self.stack.tls(),
                                  timeout=30)
            plain = base64.b64encode(b"\0%s\0%s" % (user.encode(), password.encode()))
            self.assertTrue(pop._shortcmd("AUTH PLAIN " + plain.decode()).startswith(b"+OK"), user)
            self.assertIn(b"for " + user.encode(), b"\n".join(pop.top(1, 0)[1]))
            pop.quit()
        self.assertNotIn("login_failed", self.gateway.log())

    def test_client_hanging_up_does_not_cut_the_login_short(self) -> None:
        """
        Where Dovecot decides, a client that hangs up while its login runs does not cut it short:
        a login cut short would count as a failure, a right password too. Its login completes.
        """
        wire = Wire(self.gateway.port("imap", "implicit_tls"), tls=self.stack.tls(), timeout=30)
        self.assertTrue(wire.line().startswith(b"* OK "))
        wire.send(b"a1 LOGIN %s %s\r\n" % (OTHER[0].encode(), OTHER[1].encode()))
        wire.close()
        self.gateway.wait_for_log(r'login protocol=imap client=127\.0\.0\.1 user="bob" ')
        self.assertNotIn("reason=abandoned", self.gateway.log())


class HangUpDuringLoginTests(SynchronousTestCase):
    """A client hangs up while its login waits for a store too busy to answer."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.stack = stack = Stack("gw-hang-up-")
        # Listens, and never answers: the login waits for its greeting for the whole backend timeout.
        cls.store = socket.create_server(("127.0.0.1", 0))
        cls.gateway = stack.start(GatewayProcess(
            stack.path("gateway"), imap_backend_port=cls.store.getsockname()[1], users={USER: PASSWORD},
            certificate=stack.certificate.chain_path, private_key=stack.certificate.key_path,
            imap_backend="timeout = 60"))

    @classmethod
    def tearDownClass(cls) -> None:
        cls.stack.stop()
        cls.store.close()

    def test_hang_up_cancels_the_login(self) -> None:
        """
        The hang-up is noticed at once and the login cancelled, not answered after the backend's
        60 s timeout to nobody.
        """
        wire = Wire(self.gateway.port("imap", "implicit_tls"), tls=self.stack.tls(), timeout=30)
        self.assertTrue(wire.line().startswith(b"* OK "))
        wire.send(b"".join(login_command(b"a1", USER.encode(), PASSWORD.encode(), literal_plus=True)))
        wire.close()
        self.gateway.wait_for_log(r'disconnect protocol=imap client=127\.0\.0\.1 user="" state=logging-in ')
        self.assertNotIn("backend_unavailable", self.gateway.log())


class MasterLoginTests(SynchronousTestCase):
    """
    C{login = "master"}: the gateway checks the users file and logs in to Dovecot with its own
    master account, over IMAP and POP3, as the user by SASL PLAIN's authorization identity. Dovecot
    needs no C{auth_master_user_separator}, and a user name holding one logs in too.
    """

    USERS = {USER: PASSWORD, "ops*team": "team-password"}

    @classmethod
    def setUpClass(cls) -> None:
        cls.stack = stack = Stack("gw-master-")
        master_passwd = stack.path("master.passwd")
        with open(master_passwd, "w", encoding="utf-8") as f:
            f.write("gateway:{PLAIN}master-secret\n")
        os.chmod(master_passwd, 0o644)
        master_password = stack.path("master-password")
        with open(os.open(master_password, os.O_WRONLY | os.O_CREAT, 0o600), "w", encoding="utf-8") as f:
            f.write("master-secret\n")
        # The users' own passwords are unknown to Dovecot: only the master account gets in.
        cls.dovecot = stack.start(DovecotSandbox(
            stack.path("dovecot"), {user: "not-the-users-password" for user in cls.USERS},
            extra_config=("auth_username_chars =\n"
                          f"passdb {{\n  driver = passwd-file\n  master = yes\n  args = {master_passwd}\n"
                          "  result_success = continue\n}\n")))
        backend = f'login = "master"\nmaster_user = "gateway"\nmaster_password_file = "{master_password}"'
        cls.gateway = stack.start(GatewayProcess(
            stack.path("gateway"), imap_backend_port=cls.dovecot.imap_port, pop3_backend_port=cls.dovecot.pop3_port,
            users=cls.USERS, certificate=stack.certificate.chain_path, private_key=stack.certificate.key_path,
            imap_backend=backend, pop3_backend=backend))

    @classmethod
    def tearDownClass(cls) -> None:
        cls.stack.stop()

    def test_imap(self) -> None:
        """Every user logs in over IMAPS and reaches its own mailbox, whatever its name holds."""
        for user, password in self.USERS.items():
            self.dovecot.deliver(user, MESSAGE)
            client = imaplib.IMAP4_SSL("127.0.0.1", self.gateway.port("imap", "implicit_tls"),
                                       ssl_context=self.stack.tls(), timeout=30)
            self.assertEqual(client.login(user, password)[0], "OK", user)
            self.assertEqual(client.select("INBOX")[0], "OK")
            self.assertEqual(client.fetch("1", "(BODY.PEEK[])")[1][0][1], MESSAGE)
            client.logout()

    def test_pop3(self) -> None:
        """Every user logs in over POP3S and reads its own mailbox."""
        for user, password in self.USERS.items():
            self.dovecot.deliver(user, MESSAGE)
            client = poplib.POP3_SSL("127.0.0.1", self.gateway.port("pop3", "implicit_tls"),
                                     context=self.stack.tls(), timeout=30)
            client.user(user)
            self.assertTrue(client.pass_(password).startswith(b"+OK"), user)
            self.assertGreaterEqual(client.stat()[0], 1)
            client.quit()

    def test_wrong_password(self) -> None:
        """The gateway's users file decides: a wrong password never reaches Dovecot."""
        client = imaplib.IMAP4_SSL("127.0.0.1", self.gateway.port("imap", "implicit_tls"),
                                   ssl_context=self.stack.tls(), timeout=30)
        with self.assertRaises(imaplib.IMAP4.error) as caught:
            client.login(USER, "not-the-users-password")
        self.assertIn("[AUTHENTICATIONFAILED]", str(caught.exception))
        client.logout()


class ClosingOverTLSTests(SynchronousTestCase):
    """
    Relayed sessions ending over real TLS, implicit and STARTTLS. Twisted closes a TLS connection
    only once no producer is registered on it, and the relay registers one on each side.
    """

    proxy = False  # the listeners take a PROXY header, and every connection sends L{preface} first
    preface = b""

    @classmethod
    def setUpClass(cls) -> None:
        cls.stack = stack = Stack("gw-closing-")
        cls.dovecot = stack.start(DovecotSandbox(stack.path("dovecot"), {OTHER[0]: OTHER[1]}))
        cls.message = big_message(20 * 1024 * 1024)
        cls.dovecot.deliver(OTHER[0], cls.message)
        cls.megabyte = big_message(1024 * 1024)
        cls.dovecot.deliver(OTHER[0], cls.megabyte)  # message 2
        cls.gateway = stack.start(GatewayProcess(
            stack.path("gateway"), imap_backend_port=cls.dovecot.imap_port, users={OTHER[0]: OTHER[1]},
            certificate=stack.certificate.chain_path, private_key=stack.certificate.key_path, proxy=cls.proxy,
            settings="[limits]\nrelay_idle_timeout = 10\n" + ('proxy_sources = ["127.0.0.1/32"]\n' if cls.proxy else "")))

    @classmethod
    def tearDownClass(cls) -> None:
        cls.stack.stop()

    def logged_in(self, starttls: bool) -> Wire:
        """A session logged in over IMAPS or STARTTLS (Python's ssl)."""
        if starttls:
            wire = Wire(self.gateway.port("imap", "starttls"), timeout=30, preface=self.preface)
            wire.line()
            wire.send(b"s STARTTLS\r\n")
            wire.until(b"s ")
            wire.upgrade(self.stack.tls())
        else:
            wire = Wire(self.gateway.port("imap", "implicit_tls"), tls=self.stack.tls(), timeout=30,
                        preface=self.preface)
            wire.line()
        self.addCleanup(wire.close)
        wire.send(f"a LOGIN {OTHER[0]} {OTHER[1]}\r\n".encode())
        self.assertTrue(wire.until(b"a ")[-1].startswith(b"a OK "))
        return wire

    def test_relay_idle_timeout(self) -> None:
        """Relayed sessions silent for the relay idle timeout are closed, over IMAPS and over STARTTLS."""
        before = self.gateway.log().count("reason=relay-idle")
        implicit, starttls = self.logged_in(starttls=False), self.logged_in(starttls=True)
        # Silent from here on: each read ends at the gateway's close, or raises at the Wire's timeout.
        self.assertEqual((implicit.line(), starttls.line()), (b"", b""))
        self.assertEqual(self.gateway.log().count("reason=relay-idle") - before, 2)

    def test_slow_reader_gets_the_end_after_the_backend_closed(self) -> None:
        """
        A STARTTLS client that pipelines LOGOUT behind a 1 MB FETCH and reads at 64 KB/s gets all of
        it. Dovecot closes once it has written its answer, while the gateway still holds seconds
        of it for the client: the grace period counts from the client's last progress, not from
        the backend's close (an abort would reset the connection and drop what is left).
        """
        raw = socket.create_connection(("127.0.0.1", self.gateway.port("imap", "starttls")), timeout=30)
        self.addCleanup(raw.close)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        raw.sendall(self.preface)
        raw.recv(4096)
        raw.sendall(b"s STARTTLS\r\n")
        self.assertTrue(raw.recv(4096).startswith(b"s OK "))
        client = self.stack.tls().wrap_socket(raw, server_hostname="127.0.0.1")
        client.sendall(f"a LOGIN {OTHER[0]} {OTHER[1]}\r\nb SELECT INBOX\r\n".encode())
        received = b""
        while b"\r\nb OK " not in received:
            received += client.recv(4096)
        client.sendall(b"c FETCH 2 BODY.PEEK[]\r\nd LOGOUT\r\n")
        received, started, rate = b"", time.monotonic(), 64 * 1024
        while chunk := client.recv(4096):  # an abort raises ConnectionResetError
            received += chunk
            ahead = len(received) / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
        answer = b"{%d}\r\n" % len(self.megabyte) + self.megabyte + b")\r\nc OK "
        self.assertTrue(answer in received and b"\r\nd OK " in received,
                        f"{len(received):,} bytes received, of an answer of {len(answer):,} and more")
        self.assertGreater(time.monotonic() - started, CLOSE_GRACE, "read faster than the test means to")

    def test_client_ending_tls_mid_fetch(self) -> None:
        """
        A client that stops reading a 20 MB FETCH and ends TLS (close_notify, as pyOpenSSL's
        shutdown sends it) is let go: the gateway closes once its buffer has drained.
        """
        for starttls in (False, True):
            self.client_ends_tls(starttls)

    def relayed_disconnects(self) -> list[int]:
        """The bytes sent to the client, from each relayed session's disconnect line so far."""
        return [int(out) for out in re.findall(r"disconnect protocol=imap .* state=relaying in=\d+ out=(\d+)",
                                                self.gateway.log())]

    def test_client_ending_tls_without_reading(self) -> None:
        """
        A client that stops reading a 20 MB FETCH, ends TLS (close_notify over STARTTLS, a broken
        record over IMAPS) and reads nothing more is cut off within the grace period: Twisted
        would wait, without a limit, for a buffer that never drains, and the relay's idle
        timeout (here as long as the grace period) would end it instead, after its own wait.
        """
        for starttls, ending in ((True, "close_notify"), (False, "broken record")):
            ended, idle = len(self.relayed_disconnects()), self.gateway.log().count("reason=relay-idle")
            raw, client, _ = self.fetching(starttls)
            started = time.monotonic()
            if ending == "close_notify":
                client.shutdown()
            else:
                raw.sendall(b"\x17\x03\x03\x00\x20" + b"\0" * 32)  # application data that fails to decrypt
            deadline = started + CLOSE_GRACE + 5
            while len(self.relayed_disconnects()) == ended and time.monotonic() < deadline:
                time.sleep(0.05)
            self.assertEqual(len(self.relayed_disconnects()), ended + 1, f"{ending}: still relaying")
            self.assertEqual(self.gateway.log().count("reason=relay-idle"), idle, f"{ending}: ended as idle")
        self.assertNotIn("Traceback", self.gateway.log())

    def test_connection_dropped_without_ending_tls(self) -> None:
        """
        A relayed client whose connection just closes (no close_notify: a phone gone offline) is
        logged as disconnected, and its per-address count is given back, over IMAPS and STARTTLS.
        """
        for starttls in (False, True):
            ended = len(self.relayed_disconnects())
            self.logged_in(starttls).sock.close()
            deadline = time.monotonic() + 10
            while len(self.relayed_disconnects()) == ended and time.monotonic() < deadline:
                time.sleep(0.05)
            self.assertEqual(len(self.relayed_disconnects()), ended + 1, f"starttls={starttls}: no disconnect line")
        self.assertNotIn("Traceback", self.gateway.log())

    def fetching(self, starttls: bool) -> tuple[socket.socket, SSL.Connection, int]:
        """
        A session (pyOpenSSL over a small receive buffer) that has sent a FETCH of the 20 MB
        message and read 200 KB of it, and then waited for the gateway to stop reading the
        backend; with the bytes it read.
        """
        raw = socket.create_connection(("127.0.0.1", self.gateway.port("imap", "starttls" if starttls else
                                                                         "implicit_tls")), timeout=15)
        self.addCleanup(raw.close)
        raw.sendall(self.preface)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        # pyOpenSSL wants a blocking socket; a receive timeout keeps a silent gateway from hanging the test.
        raw.settimeout(None)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 15, 0))
        if starttls:
            raw.recv(4096)
            raw.sendall(b"s STARTTLS\r\n")
            self.assertTrue(raw.recv(4096).startswith(b"s OK "))
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.load_verify_locations(self.stack.ca.ca_path)
        context.set_verify(SSL.VERIFY_PEER)
        client = SSL.Connection(context, raw)
        client.set_connect_state()
        client.do_handshake()
        client.sendall(f"a LOGIN {OTHER[0]} {OTHER[1]}\r\nb SELECT INBOX\r\nc FETCH 1 BODY.PEEK[]\r\n".encode())
        received = 0
        while received < 200_000:
            received += len(client.recv(65536))
        time.sleep(1)  # the gateway's socket buffer fills; it stops reading the backend
        return raw, client, received

    def client_ends_tls(self, starttls: bool) -> None:
        ended = len(self.relayed_disconnects())
        raw, client, received = self.fetching(starttls)
        client.shutdown()  # close_notify, without waiting for the gateway's
        while chunk := raw.recv(65536):  # raises at the receive timeout if the gateway never closes
            received += len(chunk)
        self.assertLess(received, len(self.message), "the whole message was sent: nothing was held back")
        deadline = time.monotonic() + 10
        while len(self.relayed_disconnects()) == ended and time.monotonic() < deadline:
            time.sleep(0.05)
        [sent] = self.relayed_disconnects()[ended:]
        self.assertLess(sent, len(self.message))


class ClosingBehindProxyTests(ClosingOverTLSTests):
    """
    The same behind a load balancer's PROXY header. After STARTTLS the TLS layer sits under the
    PROXY wrapper, which must pass on the end of TLS (and the handshake) to the front end.
    """

    proxy = True
    preface = b"PROXY TCP4 198.51.100.9 127.0.0.1 40000 143\r\n"

    def test_tls_logged_for_the_client(self) -> None:
        """The TLS line names the header's client, after STARTTLS as after an implicit handshake."""
        line = "] tls protocol=imap client=198.51.100.9 version=TLSv1."
        before = self.gateway.log().count(line)
        for starttls in (False, True):
            self.logged_in(starttls)
        self.gateway.wait_for_log(re.escape(line), count=before + 2)
        self.assertEqual(self.gateway.log().count(line), before + 2, self.gateway.log()[-2000:])
