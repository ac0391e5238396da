"""
The POP3 gateway end to end: a private plaintext Dovecot, the gateway as a real process with
POP3S and STLS listeners and a test CA, and real clients (poplib, curl, fetchmail, raw sockets).

Dovecot serves UIDs as Maildir file names here (C{pop3_uidl_format = %f}), so each message
number maps to exactly one stored file and every comparison is against the bytes on the store.
"""

from __future__ import annotations

import base64
import hashlib
import os
import poplib
import random
import re
import ssl
import subprocess
import tempfile
import threading
import time
from collections import Counter

from twisted.trial.unittest import SynchronousTestCase

from gateway.testing.dovecot import DovecotSandbox
from gateway.testing.gateway import GatewayProcess

from .stack import Stack, require_tool
from .wire import Wire

USER = "alice"
PASSWORD = 'pa ss"wo\\rd'  # spaces, a quote and a backslash: PASS takes the rest of the line
XCLIENT_USER = ("bob", "bobs password")
FETCH_USER = ("fetch", "fetch pass word")
CURL_USER = ("carol", "carols pass word")
DELETE_USER = ("dave", "daves pass word")
DROP_USER = ("erin", "erins pass word")
BIG_USER = ("frank", "franks pass word")
RAW_USER = ("grace", "graces pass word")
USERS = dict([(USER, PASSWORD), XCLIENT_USER, FETCH_USER, CURL_USER, DELETE_USER, DROP_USER, BIG_USER, RAW_USER])

MESSAGE = (b"From: Bob <bob@example.org>\r\nTo: alice@example.org\r\nSubject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
           b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln.\r\n.\r\n..leading dots stay\r\n.one dot\r\n"
           b"From the start of a line\r\ntrailing spaces   \r\n\tand a tab\r\n")

TEN_MB = 10 * 1024 * 1024


def big_message(size: int, seed: int) -> bytes:
    """A CRLF message of about C{size} bytes: base64 lines of random (incompressible) bytes."""
    rng = random.Random(seed)
    header = b"From: bob@example.org\r\nTo: alice@example.org\r\nSubject: big %d\r\n\r\n" % seed
    body = base64.encodebytes(rng.randbytes(size * 3 // 4)).replace(b"\n", b"\r\n")
    return header + body


def seed_message(index: int, rng: random.Random) -> bytes:
    """
    Message C{index} of a varied set: sizes from headers only to about 100 KB, 8-bit text (UTF-8
    and raw Latin-1), lines that start with "." or "From ", empty lines, trailing blanks, a
    folded header.
    """
    header = (b"From: Bob <bob@example.org>\r\nTo: fetch@example.org\r\nSubject: seed %d\r\n"
              b"Message-ID: <seed-%d@example.org>\r\nX-Folded: first part\r\n\tsecond part\r\n"
              b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" % (index, index))
    if index == 0:
        return header
    specials = [b".", b"..", b".leading dot", b"..two leading dots", b"From the start of a line",
                b"From: not a header", b">From quoted", b"Gr\xc3\xbc\xc3\x9fe \xe2\x82\xac", b"caf\xe9 cr\xe8me",
                b"", b"trailing blanks \t ", b"\ttab first"]
    target = rng.choice((200, 2_000, 20_000)) if index % 10 else 100_000
    lines = [specials[index % len(specials)]]
    size = len(header)
    while size < target:
        if rng.random() < 0.3:
            line = rng.choice(specials)
        else:
            line = bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz .,-0123456789") for _ in range(rng.randint(1, 200)))
        lines.append(line)
        size += len(line) + 2
    return header + b"".join(line + b"\r\n" for line in lines)


def dot_stuffed(message: bytes) -> bytes:
    """C{message} as a multi-line POP3 response carries it (RFC 1939 3): each line led by "." gets one more."""
    lines = message.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)


def joined(lines: list[bytes]) -> bytes:
    """poplib's unstuffed lines of a multi-line response, as the CRLF text they came from."""
    return b"".join(line + b"\r\n" for line in lines)


def sha256(data: bytes) -> str:
    """The SHA-256 of C{data}, in hex."""
    return hashlib.sha256(data).hexdigest()


class GatewayFixture(SynchronousTestCase):
    """One Dovecot and one POP3 gateway for a test class; torn down after its last test."""

    users: dict[str, str] = USERS
    dovecot_config = ""
    trusted_networks = "127.0.0.0/8"  # Dovecot's login_trusted_networks: the gateway is in them
    backend_config = "forward_client_ip = true\ntimeout = 3"

    @classmethod
    def setUpClass(cls) -> None:
        cls.stack = stack = Stack("gw-pop3-")
        cls.ca_path = stack.ca.ca_path
        cls.dovecot = stack.start(DovecotSandbox(stack.path("dovecot"), cls.users, trusted_networks=cls.trusted_networks,
                                                 extra_config="pop3_uidl_format = %f\n" + cls.dovecot_config))
        cls.gateway = stack.start(GatewayProcess(
            stack.path("gateway"), imap_backend_port=None, pop3_backend_port=cls.dovecot.pop3_port,
            users=cls.users, certificate=stack.certificate.chain_path, private_key=stack.certificate.key_path,
            pop3_backend=cls.backend_config,
        ))
        try:
            # The gateway offers TOP and UIDL once its start-up probe has seen the backend offer them.
            cls.gateway.wait_for_log(r"backend_capabilities protocol=pop3 .*\bTOP\b")
        except BaseException:
            stack.stop()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        cls.stack.stop()

    def tls(self) -> ssl.SSLContext:
        """A client context that trusts only the test CA."""
        return self.stack.tls()

    def pop3s(self) -> poplib.POP3_SSL:
        """A poplib client on the POP3S (implicit TLS) listener."""
        return poplib.POP3_SSL("127.0.0.1", self.gateway.port("pop3", "implicit_tls"), context=self.tls(), timeout=30)

    def stls(self) -> poplib.POP3:
        """A poplib client on the STLS listener, after STLS."""
        client = poplib.POP3("127.0.0.1", self.gateway.port("pop3", "starttls"), timeout=30)
        client.stls(self.tls())
        return client

    def stored(self, user: str) -> dict[bytes, bytes]:
        """C{user}'s INBOX on the store: Maildir base name (Dovecot's UIDL here) to the message's bytes."""
        messages: dict[bytes, bytes] = {}
        for path in self.dovecot.message_files(user):
            with open(path, "rb") as f:
                messages[os.path.basename(path).split(":", 1)[0].encode()] = f.read()
        return messages

    def log_in_from(self, source: str, user: str, password: str) -> None:
        """Log in over POP3S from the loopback address C{source}, then quit."""
        wire = Wire(self.gateway.port("pop3", "implicit_tls"), tls=self.tls(), source=source)
        wire.line()
        wire.send(f"USER {user}\r\nPASS {password}\r\n".encode())
        wire.line()
        self.assertEqual(wire.line(), b"+OK Logged in.\r\n")
        wire.send(b"QUIT\r\n")
        wire.line()
        wire.close()

    def wait_for_dovecot_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait until a line of Dovecot's info log matches the regular expression C{pattern}."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            with open(self.dovecot.info_log_path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            found = re.search(pattern, text, re.MULTILINE)
            if found is not None:
                return found
            time.sleep(0.05)
        raise AssertionError(f"no Dovecot log line matches {pattern!r}; the log ends with:\n{text[-2000:]}")


def uidl_numbers(client: poplib.POP3) -> dict[int, bytes]:
    """Message number to UIDL, from one UIDL command."""
    _, lines, _ = client.uidl()
    return {int(number): uid for number, uid in (line.split(b" ", 1) for line in lines)}


def login(client: poplib.POP3, user: str, password: str) -> None:
    """USER and PASS; raises C{poplib.error_proto} with the server's reply when refused."""
    client.user(user)
    client.pass_(password)


class ClientFlowMixin:
    """What every POP3 client does, run over POP3S and over STLS by the two subclasses."""

    def connect(self) -> poplib.POP3:
        raise NotImplementedError

    def test_user_pass_and_every_read_command(self) -> None:
        """
        USER and PASS (a password with spaces) log in; STAT, LIST, UIDL, TOP and RETR describe
        and return the store byte for byte; QUIT ends the session.
        """
        self.dovecot.deliver(USER, MESSAGE)
        self.dovecot.deliver(USER, seed_message(7, random.Random(7)))
        stored = self.stored(USER)
        client = self.connect()
        self.assertEqual(client.user(USER), b"+OK Send your password.")
        self.assertEqual(client.pass_(PASSWORD), b"+OK Logged in.")
        self.assertEqual(client.stat(), (len(stored), sum(len(m) for m in stored.values())))
        numbers = uidl_numbers(client)
        self.assertEqual(sorted(numbers.values()), sorted(stored))
        _, listing, _ = client.list()
        sizes = {int(number): int(size) for number, size in (line.split() for line in listing)}
        self.assertEqual(sizes, {number: len(stored[uid]) for number, uid in numbers.items()})
        for number, uid in numbers.items():
            head, _, body = stored[uid].partition(b"\r\n\r\n")
            body_lines = body.removesuffix(b"\r\n").split(b"\r\n") if body else []
            expected_top = head + b"\r\n\r\n" + joined(body_lines[:2])
            self.assertEqual(joined(client.top(number, 2)[1]), expected_top)
            self.assertEqual(joined(client.retr(number)[1]), stored[uid])
        self.assertTrue(client.quit().startswith(b"+OK"))

    def test_auth_plain_initial_response(self) -> None:
        """AUTH PLAIN with an initial response logs in."""
        client = self.connect()
        response = base64.b64encode(b"\0" + USER.encode() + b"\0" + PASSWORD.encode()).decode()
        self.assertEqual(client._shortcmd("AUTH PLAIN " + response), b"+OK Logged in.")
        self.assertEqual(client.stat()[0], len(self.dovecot.message_files(USER)))
        client.quit()

    def test_wrong_password(self) -> None:
        """A wrong password is refused with [AUTH] Authentication failed.; an unknown user alike."""
        for user, password in ((USER, "wrong"), ("nobody", PASSWORD)):
            client = self.connect()
            client.user(user)
            with self.assertRaises(poplib.error_proto) as caught:
                client.pass_(password)
            self.assertEqual(caught.exception.args[0], b"-ERR [AUTH] Authentication failed.")
            client.quit()


class Pop3sTests(ClientFlowMixin, GatewayFixture):
    """Client flows over POP3S (implicit TLS)."""

    def connect(self) -> poplib.POP3:
        return self.pop3s()


class StlsTests(ClientFlowMixin, GatewayFixture):
    """Client flows over POP3 with STLS, and what the STLS port allows before TLS."""

    def connect(self) -> poplib.POP3:
        return self.stls()

    def capa(self, wire: Wire) -> list[bytes]:
        """The capability lines of one CAPA, without line endings."""
        wire.send(b"CAPA\r\n")
        lines = wire.until(b".\r\n")
        self.assertTrue(lines[0].startswith(b"+OK"), lines)
        self.assertEqual(lines[-1], b".\r\n")
        return [line.rstrip(b"\r\n") for line in lines[1:-1]]

    def test_login_before_stls_refused(self) -> None:
        """
        Before STLS, CAPA offers STLS and neither USER nor SASL, and USER, PASS and AUTH are
        refused saying TLS is required; after STLS, CAPA offers USER, SASL PLAIN LOGIN, TOP and
        UIDL, not STLS, and USER and PASS log in.
        """
        wire = Wire(self.gateway.port("pop3", "starttls"))
        self.assertTrue(wire.line().startswith(b"+OK"))
        before = self.capa(wire)
        self.assertIn(b"STLS", before)
        self.assertNotIn(b"USER", before)
        self.assertEqual([cap for cap in before if cap.startswith(b"SASL")], [])
        plain = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
        for command in (f"USER {USER}".encode(), f"PASS {PASSWORD}".encode(), b"AUTH PLAIN " + plain):
            wire.send(command + b"\r\n")
            reply = wire.line()
            self.assertTrue(reply.startswith(b"-ERR ") and b"TLS required" in reply, (command.split()[0], reply))
        wire.send(b"STLS\r\n")
        self.assertEqual(wire.line(), b"+OK Begin TLS negotiation now.\r\n")
        wire.upgrade(self.tls())
        after = self.capa(wire)
        for capability in (b"USER", b"SASL PLAIN LOGIN", b"TOP", b"UIDL"):
            self.assertIn(capability, after)
        self.assertNotIn(b"STLS", after)
        wire.send(f"USER {USER}\r\nPASS {PASSWORD}\r\n".encode())
        self.assertTrue(wire.line().startswith(b"+OK"))
        self.assertEqual(wire.line(), b"+OK Logged in.\r\n")
        wire.send(b"QUIT\r\n")
        self.assertTrue(wire.line().startswith(b"+OK"))
        wire.close()

    def test_stls_injection_discarded(self) -> None:
        """A USER pipelined with STLS in the same segment is discarded: PASS after TLS needs USER first."""
        wire = Wire(self.gateway.port("pop3", "starttls"))
        wire.line()
        injected = f"USER {USER}\r\n".encode()
        wire.send(b"STLS\r\n" + injected)
        self.assertEqual(wire.line(), b"+OK Begin TLS negotiation now.\r\n")
        wire.upgrade(self.tls())
        wire.send(f"PASS {PASSWORD}\r\n".encode())
        self.assertEqual(wire.line(), b"-ERR Send USER first.\r\n")
        wire.close()
        self.gateway.wait_for_log(rf"starttls_discarded protocol=pop3 client=127\.0\.0\.1 bytes={len(injected)}\b")


class GatewayBehaviourTests(GatewayFixture):
    """Real clients and the store's side of a session, over POP3S unless a test says otherwise."""

    def test_raw_retr_is_dot_stuffed_and_terminated(self) -> None:
        """On the wire, RETR sends the stored message dot-stuffed, then exactly ".\\r\\n"."""
        self.dovecot.deliver(RAW_USER[0], MESSAGE)
        (stored,) = self.stored(RAW_USER[0]).values()
        wire = Wire(self.gateway.port("pop3", "implicit_tls"), tls=self.tls())
        wire.line()
        wire.send(f"USER {RAW_USER[0]}\r\nPASS {RAW_USER[1]}\r\n".encode())
        wire.line()
        self.assertEqual(wire.line(), b"+OK Logged in.\r\n")
        wire.send(b"RETR 1\r\n")
        self.assertTrue(wire.line().startswith(b"+OK"))
        expected = dot_stuffed(stored) + b".\r\n"
        self.assertIn(b"\r\n..\r\n...leading dots stay\r\n..one dot\r\n", expected)
        self.assertEqual(wire.exactly(len(expected)), expected)
        wire.send(b"QUIT\r\n")
        self.assertTrue(wire.line().startswith(b"+OK"))
        self.assertEqual(wire.line(), b"")  # the backend's close reached the client
        wire.close()

    def test_retr_10_mb(self) -> None:
        """A 10 MB message arrives through RETR byte for byte."""
        self.dovecot.deliver(BIG_USER[0], big_message(TEN_MB, 1))
        (stored,) = self.stored(BIG_USER[0]).values()
        client = self.pop3s()
        login(client, *BIG_USER)
        self.assertEqual(sha256(joined(client.retr(1)[1])), sha256(stored))
        client.quit()

    def test_curl_pop3s_and_stls(self) -> None:
        """curl fetches a message over pop3s:// and over pop3:// with --ssl-reqd, byte for byte."""
        curl = require_tool("curl", "curl")
        self.dovecot.deliver(CURL_USER[0], MESSAGE)
        (stored,) = self.stored(CURL_USER[0]).values()
        urls = (f"pop3s://127.0.0.1:{self.gateway.port('pop3', 'implicit_tls')}/1",
                f"pop3://127.0.0.1:{self.gateway.port('pop3', 'starttls')}/1")
        for url in urls:
            result = subprocess.run([curl, "-sS", "--ssl-reqd", "--cacert", self.ca_path,
                                     "-u", f"{CURL_USER[0]}:{CURL_USER[1]}", url], capture_output=True, timeout=60)
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(result.stdout, stored)

    def test_dele_then_quit_removes(self) -> None:
        """Messages marked with DELE are gone from the store after QUIT; the others stay."""
        user, password = DELETE_USER
        for index in range(3):
            self.dovecot.deliver(user, seed_message(index + 1, random.Random(index)))
        client = self.pop3s()
        login(client, user, password)
        numbers = uidl_numbers(client)
        client.dele(1)
        client.dele(3)
        self.assertTrue(client.quit().startswith(b"+OK"))
        self.assertEqual(sorted(self.stored(user)), [numbers[2]])

    def test_dele_then_drop_keeps(self) -> None:
        """Messages marked with DELE stay on the store when the client drops the connection without QUIT."""
        user, password = DROP_USER
        for index in range(2):
            self.dovecot.deliver(user, seed_message(index + 1, random.Random(index)))
        before = self.stored(user)
        client = self.pop3s()
        login(client, user, password)
        client.dele(1)
        client.dele(2)
        client.close()
        # Dovecot logs the end of the session once it has finished with the mailbox.
        self.wait_for_dovecot_log(rf"^.*pop3\({user}\).*Disconnected: .*del=0/2, ")
        self.assertEqual(self.stored(user), before)
        client = self.pop3s()
        login(client, user, password)
        self.assertEqual(client.stat()[0], 2)
        client.quit()

    def test_client_address_forwarded(self) -> None:
        """
        With forward_client_ip the backend logs the client's own address (XCLIENT) for the POP3
        login, and the gateway's name of the session as its own.
        """
        user, password = XCLIENT_USER
        self.log_in_from("127.0.0.5", user, password)
        login = self.gateway.wait_for_log(rf'login protocol=pop3 client=127\.0\.0\.5 user="{user}" .* session=(\S+)')
        self.wait_for_dovecot_log(rf"pop3-login: Info: Login: user=<{user}>, method=\S+, rip=127\.0\.0\.5, "
                                  rf".* session=<{re.escape(login.group(1))}>$")
        self.assertNotIn(password, self.gateway.log())
        self.assertNotIn("client_address_not_forwarded", self.gateway.log())

    def test_fetchmail_200_messages(self) -> None:
        """
        fetchmail over POP3S, checking the certificate against the test CA, delivers 200 messages
        (one of 10 MB) exactly as stored, except for its documented CRLF to LF conversion.
        """
        fetchmail = require_tool("fetchmail", "fetchmail")
        user, password = FETCH_USER
        rng = random.Random(1939)
        for index in range(199):
            self.dovecot.deliver(user, seed_message(index, rng))
        self.dovecot.deliver(user, big_message(TEN_MB, 2))
        stored = self.stored(user)
        self.assertEqual(len(stored), 200)
        home = tempfile.mkdtemp(prefix="fetchmail-", dir=self.stack.directory)
        delivered = os.path.join(home, "delivered")
        os.mkdir(delivered)
        rcfile = os.path.join(home, "fetchmailrc")
        fd = os.open(rcfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # fetchmail insists on 0600
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            # "localhost" because fetchmail matches the certificate against DNS names only (not IP
            # SANs); it resolves to loopback. "no rewrite" keeps address headers as they are;
            # "stripcr" is fetchmail's default with an MDA, spelt out because the comparison
            # below undoes it; the MDA writes each message to a file of its own.
            f.write(f'poll localhost service {self.gateway.port("pop3", "implicit_tls")} protocol pop3 timeout 60\n'
                    f'  user "{user}" password "{password}"\n'
                    f'  ssl sslcertck sslcertfile "{self.ca_path}"\n'
                    f'  fetchall keep no rewrite stripcr\n'
                    f'  mda "cat > $(mktemp {delivered}/message.XXXXXXXX)"\n')
        result = subprocess.run(
            # --invisible: no Received: header of fetchmail's own.
            [fetchmail, "--fetchmailrc", rcfile, "--nosyslog", "--invisible", "--pidfile", os.path.join(home, "pid")],
            env={"HOME": home, "FETCHMAILHOME": home, "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            capture_output=True, timeout=120,
        )
        self.assertEqual(result.returncode, 0, (result.stdout + result.stderr).decode("utf-8", "replace"))  # 0: mail was retrieved
        received: list[bytes] = []
        for name in os.listdir(delivered):
            with open(os.path.join(delivered, name), "rb") as f:
                received.append(f.read())
        # The one normalisation: fetchmail's stripcr turns every CRLF into LF (the seeds hold no
        # other CR). Everything else must arrive unchanged.
        expected = Counter(sha256(message.replace(b"\r\n", b"\n")) for message in stored.values())
        unmatched = [message for message in received if sha256(message) not in expected]
        self.assertEqual(len(unmatched), 0, f"{len(unmatched)} of {len(received)} delivered messages match "
                         f"nothing on the store; the first begins {unmatched[:1]!r:.400}")
        self.assertEqual(Counter(sha256(message) for message in received), expected)
        self.assertEqual(len(self.stored(user)), 200)  # "keep": nothing was deleted


class BackendOutageTests(GatewayFixture):
    """The backend goes away and comes back; the gateway keeps running."""

    users = {USER: PASSWORD}

    def test_backend_down_then_back(self) -> None:
        """With the backend stopped a login gets -ERR [SYS/TEMP], never [AUTH]; once it is back, logins work again."""
        self.dovecot.stop()
        try:
            client = self.pop3s()
            client.user(USER)
            with self.assertRaises(poplib.error_proto) as caught:
                client.pass_(PASSWORD)
            reply = caught.exception.args[0]
            self.assertTrue(reply.startswith(b"-ERR [SYS/TEMP] "), reply)
            self.assertNotIn(b"[AUTH]", reply)
            client.quit()
            self.gateway.wait_for_log(r"backend_unavailable protocol=pop3 client=127\.0\.0\.1 user=\"alice\" "
                                      r"backend=127\.0\.0\.1:\d+ reason=")
        finally:
            self.dovecot.start()
        client = self.pop3s()
        login(client, USER, PASSWORD)
        self.assertEqual(client.stat()[0], len(self.dovecot.message_files(USER)))
        client.quit()


class UntrustedGatewayTests(GatewayFixture):
    """A Dovecot that does not list the gateway in its login_trusted_networks, with forward_client_ip on."""

    users = {USER: PASSWORD}
    trusted_networks = "192.0.2.0/24"

    def test_not_forwarded_said_once(self) -> None:
        """
        Dovecot offers XCLIENT to trusted networks only: the probe at start says the client's
        address is not forwarded, once, and logins go on, Dovecot seeing the gateway's address.
        """
        self.gateway.wait_for_log(r"client_address_not_forwarded backend=127\.0\.0\.1:\d+ reason=the backend does "
                                  r"not offer XCLIENT: .*login_trusted_networks")
        self.log_in_from("127.0.0.5", USER, PASSWORD)
        self.wait_for_dovecot_log(rf"pop3-login: Info: Login: user=<{USER}>, method=\S+, rip=127\.0\.0\.1, ")
        self.assertEqual(self.gateway.log().count("client_address_not_forwarded"), 1)


class InUseTests(GatewayFixture):
    """Dovecot allows one POP3 session per mailbox; the gateway passes its [IN-USE] refusal on."""

    users = {USER: PASSWORD}
    dovecot_config = "pop3_lock_session = yes\n"
    # Dovecot's POP3 session lock waits a fixed 10 s before it answers [IN-USE]; the default
    # backend timeout (30 s) outlasts it, and this test keeps the default to prove it.
    backend_config = "forward_client_ip = true"

    def test_in_use_passes_through(self) -> None:
        """A second session for a locked mailbox gets Dovecot's own -ERR [IN-USE] reply, unchanged."""
        holder = self.pop3s()
        login(holder, USER, PASSWORD)
        holder.stat()
        direct: list[bytes] = []

        def log_in_directly() -> None:
            # The same login straight to Dovecot, meanwhile: both wait out the same lock.
            client = poplib.POP3("127.0.0.1", self.dovecot.pop3_port, timeout=30)
            client.user(USER)
            try:
                direct.append(client.pass_(PASSWORD))
            except poplib.error_proto as e:
                direct.append(e.args[0])
            client.close()

        thread = threading.Thread(target=log_in_directly)
        thread.start()
        try:
            second = self.pop3s()
            second.user(USER)
            with self.assertRaises(poplib.error_proto) as caught:
                second.pass_(PASSWORD)
            second.quit()
        finally:
            thread.join(60)
            holder.quit()
        self.assertEqual(len(direct), 1)
        self.assertTrue(direct[0].startswith(b"-ERR [IN-USE] "), direct[0])
        self.assertEqual(caught.exception.args[0], direct[0])
        self.gateway.wait_for_log(r'backend_refused protocol=pop3 client=127\.0\.0\.1 user="alice" reply=\[IN-USE\] ')
