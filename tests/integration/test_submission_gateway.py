"""
The submission gateway end to end: a private Postfix that delivers into its Maildir, the gateway
as a real process with implicit TLS and STARTTLS listeners and a test CA, and real clients
(smtplib, swaks, curl, raw sockets).

Every message that arrives is compared with what the client sent, through
L{body_as_sent}, by SHA-256: the gateway relays message data untouched. Each test sends to
recipients of its own, so what one test finds in the Maildir is its own mail.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import random
import re
import smtplib
import ssl
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gateway.backend import BackendConnector, ClientAddress, LoginRequest
from gateway.smtp_backend import SmtpBackend
from gateway.testing.fakes import BACKEND_SETTINGS

from gateway.testing.dovecot import DovecotSandbox
from gateway.testing.gateway import GatewayProcess
from gateway.testing.host import free_ports
from gateway.testing.pki import TestCA
from gateway.testing.postfix import PostfixSandbox, body_as_sent

from .stack import Stack, require_tool
from .wire import Wire

USER = "alice@example.org"
PASSWORD = 'pa ss"wo\\rd'  # spaces, a quote and a backslash: SASL carries them verbatim
ALIAS = "a.smith@example.org"  # alice may send as this address through the senders file
LISTS = "lists.example.org"  # and as any plain address of this domain
OTHER = ("bob@example.org", "bobs pass word")
USERS = dict([(USER, PASSWORD), OTHER])

MAX_MESSAGE_SIZE = 32 * 1024 * 1024
MAX_RECIPIENTS = 3
# How long a test waits for a reply the gateway owes; a missing reply fails the test, not the run.
REPLY_TIMEOUT = 10.0

LOAD_SENDERS = 50
LOAD_MESSAGES = 20


def sha256(data: bytes) -> str:
    """The SHA-256 of C{data}, in hex."""
    return hashlib.sha256(data).hexdigest()


def crlf(data: bytes) -> bytes:
    """C{data} with every bare LF turned into CRLF."""
    return re.sub(rb"(?<!\r)\n", b"\r\n", data)


def text_message(recipient: str, subject: str) -> bytes:
    """
    A CRLF message with an 8-bit UTF-8 body and the lines that dot-stuffing must get right:
    ".", "..", ".x", and a line that looks like the end of the data once stuffed wrongly.
    """
    return (b"From: Alice <alice@example.org>\r\nTo: " + recipient.encode() + b"\r\nSubject: " + subject.encode()
            + b"\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n"
            b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln \xe2\x82\xac\r\n.\r\n..\r\n.x\r\n...three\r\n"
            b"From the start of a line\r\ntrailing blanks \t \r\n\r\n\tand a tab\r\nlast line\r\n")


def attachment_message(recipient: str, size: int, seed: int) -> bytes:
    """A CRLF multipart message with a base64 attachment of C{size} random (incompressible) bytes."""
    payload = base64.encodebytes(random.Random(seed).randbytes(size)).replace(b"\n", b"\r\n")
    return (b"From: alice@example.org\r\nTo: " + recipient.encode() + b"\r\nSubject: attachment %d\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b0undary\"\r\n\r\n"
            b"--b0undary\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nSee the attachment.\r\n"
            b"--b0undary\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
            b"Content-Disposition: attachment; filename=\"random.bin\"\r\n\r\n" % seed
            + payload + b"--b0undary--\r\n")


def maildir_files(postfix: PostfixSandbox) -> set[str]:
    """The names of every message file in the sandbox's Maildir (new and cur)."""
    names: set[str] = set()
    for sub in ("new", "cur"):
        path = os.path.join(postfix.maildir, sub)
        if os.path.isdir(path):
            names.update(os.listdir(path))
    return names


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll C{predicate} until it is true; fail the test naming C{what} after C{timeout} seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:g} s")
        time.sleep(0.05)


def wait_for_file(path: str, pattern: str, timeout: float = 10.0) -> re.Match[str]:
    """Wait until the text of the file at C{path} matches the regular expression C{pattern}."""
    deadline = time.monotonic() + timeout
    text = ""
    while True:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            text = ""
        found = re.search(pattern, text)
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no line of {path} matches {pattern!r}; it ends with:\n{text[-2000:]}")
        time.sleep(0.05)


def plain_token(user: str, password: str) -> str:
    """The AUTH PLAIN initial response for C{user} and C{password}."""
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")


# An OAuth token as a password, for a backend that decides (Dovecot's oauth2 passdb).
TOKEN_USER = ("carol@example.org", "t" * 3000)


class SubmissionFixture(SynchronousTestCase):
    """
    One Postfix and one submission gateway for a test class; torn down after its last test.

    The gateway checks passwords itself (auth mode "local") and names the client to Postfix with
    XCLIENT, unless a subclass says otherwise.
    """

    backend_config = 'login = "xclient"\ntimeout = 5'
    gateway_users: dict[str, str] | None = USERS
    gateway_settings = ""
    postfix_main_cf = ""

    stack: Stack
    ca: TestCA
    ca_path: str
    postfix: PostfixSandbox
    gateway: GatewayProcess

    @classmethod
    def setUpClass(cls) -> None:
        cls.stack = stack = Stack("gw-smtp-")
        cls.ca, cls.ca_path = stack.ca, stack.ca.ca_path
        senders_path = stack.path("senders")
        with open(senders_path, "w", encoding="utf-8") as f:
            f.write(f"# who may send as whom, besides the login address\n{USER}: {ALIAS}, @{LISTS}\n")
        cls.start_backends()
        cls.postfix = stack.start(PostfixSandbox(stack.path("postfix"), extra_main_cf=cls.postfix_main_cf))
        cls.gateway = stack.start(GatewayProcess(
            stack.path("gateway"), imap_backend_port=None, users=cls.gateway_users,
            certificate=stack.certificate.chain_path, private_key=stack.certificate.key_path,
            settings=cls.gateway_settings,
            submission_backend_port=cls.postfix.smtp_port, submission_backend=cls.backend_config,
            submission=f'senders_file = "{senders_path}"\nmax_message_size = {MAX_MESSAGE_SIZE}\n'
                       f"max_recipients = {MAX_RECIPIENTS}",
        ))
        try:
            # The gateway offers 8BITMIME once its start-up probe has seen Postfix offer it.
            cls.gateway.wait_for_log(r"backend_capabilities protocol=submission .*\b8BITMIME\b")
        except BaseException:
            stack.stop()
            raise

    @classmethod
    def start_backends(cls) -> None:
        """Start whatever Postfix needs besides itself, with C{cls.stack.start} (nothing here)."""

    @classmethod
    def tearDownClass(cls) -> None:
        cls.stack.stop()

    def tls(self) -> ssl.SSLContext:
        """A client context that trusts only the test CA."""
        return self.stack.tls()

    def smtps(self, source: str | None = None, timeout: float = REPLY_TIMEOUT) -> smtplib.SMTP_SSL:
        """An smtplib client on the implicit TLS listener, greeted with EHLO, not logged in."""
        client = smtplib.SMTP_SSL("127.0.0.1", self.gateway.port("submission", "implicit_tls"),
                                  context=self.tls(), timeout=timeout,
                                  source_address=(source, 0) if source else None)
        client.ehlo("client.example.net")
        return client

    def starttls(self) -> smtplib.SMTP:
        """An smtplib client on the STARTTLS listener, after STARTTLS and a second EHLO, not logged in."""
        client = smtplib.SMTP("127.0.0.1", self.gateway.port("submission", "starttls"), timeout=REPLY_TIMEOUT)
        client.ehlo("client.example.net")
        client.starttls(context=self.tls())
        client.ehlo("client.example.net")
        return client

    def logged_in(self, user: str = USER, password: str = PASSWORD,
                  timeout: float = REPLY_TIMEOUT) -> smtplib.SMTP_SSL:
        """An smtplib client on the implicit TLS listener, logged in."""
        client = self.smtps(timeout=timeout)
        client.login(user, password)
        return client

    def wire(self) -> Wire:
        """A raw client on the implicit TLS listener, after the greeting."""
        wire = Wire(self.gateway.port("submission", "implicit_tls"), tls=self.tls(), timeout=REPLY_TIMEOUT)
        self.assertTrue(wire.line().startswith(b"220 "))
        return wire

    def assert_arrives_intact(self, localpart: str, sent: bytes) -> bytes:
        """
        Wait for the one message to C{localpart}@example.org and check that it is C{sent}, byte
        for byte; returns the delivered Maildir file.
        """
        delivered = self.postfix.wait_for_delivered(localpart, 1)
        self.assertEqual(len(delivered), 1)
        self.assertEqual(sha256(body_as_sent(delivered[0])), sha256(sent))
        return delivered[0]

    def reply_within(self, what: str, action: Callable[[], tuple[int, bytes]]) -> tuple[int, bytes]:
        """
        Run an smtplib call that reads a reply; a reply that does not come within REPLY_TIMEOUT
        fails the test naming C{what}, rather than erroring out of smtplib.
        """
        try:
            return action()
        except smtplib.SMTPServerDisconnected as e:
            raise self.failureException(f"no reply to {what} within {REPLY_TIMEOUT:g} s: {e}") from None

    def wait_for_empty_queue(self) -> None:
        """Wait until Postfix has delivered or dropped everything it accepted."""
        wait_until(self.postfix.queue_is_empty, 20, "the Postfix queue did not empty")


class SubmissionTests(SubmissionFixture):
    """Clients, message fidelity and the submission rules, through XCLIENT to Postfix."""

    # -- before login

    def test_ehlo_before_and_after_starttls(self) -> None:
        """
        Before TLS, EHLO offers STARTTLS, PIPELINING, SIZE and ENHANCEDSTATUSCODES and no AUTH, and
        AUTH is refused; after STARTTLS, EHLO offers AUTH PLAIN LOGIN and no STARTTLS.
        """
        client = smtplib.SMTP("127.0.0.1", self.gateway.port("submission", "starttls"), timeout=REPLY_TIMEOUT)
        code, _ = client.ehlo("client.example.net")
        self.assertEqual(code, 250)
        for keyword in ("starttls", "pipelining", "size", "enhancedstatuscodes"):
            self.assertTrue(client.has_extn(keyword), keyword)
        self.assertEqual(client.esmtp_features["size"], str(MAX_MESSAGE_SIZE))
        self.assertFalse(client.has_extn("auth"))
        self.assertEqual(client.docmd("AUTH", "PLAIN " + plain_token(USER, PASSWORD)),
                         (530, b"5.7.0 Must issue a STARTTLS command first"))
        client.starttls(context=self.tls())
        client.ehlo("client.example.net")
        self.assertIn(b"AUTH PLAIN LOGIN", (client.ehlo_resp or b"").split(b"\n"))
        self.assertFalse(client.has_extn("starttls"))
        self.assertEqual(client.login(USER, PASSWORD)[0], 235)
        client.quit()

    def test_mail_before_auth_refused(self) -> None:
        """MAIL before AUTH is refused with 530 5.7.0 on the TLS listener."""
        client = self.smtps()
        self.assertEqual(client.mail(USER), (530, b"5.7.0 Authentication required"))
        client.quit()

    def test_mail_before_starttls_refused(self) -> None:
        """MAIL before STARTTLS is refused with 530 5.7.0, asking for STARTTLS."""
        client = smtplib.SMTP("127.0.0.1", self.gateway.port("submission", "starttls"), timeout=REPLY_TIMEOUT)
        client.ehlo("client.example.net")
        self.assertEqual(client.mail(USER), (530, b"5.7.0 Must issue a STARTTLS command first"))
        client.quit()

    def test_starttls_injection_discarded(self) -> None:
        """An AUTH pipelined with STARTTLS in the same segment is never run: MAIL after TLS gets 530."""
        wire = Wire(self.gateway.port("submission", "starttls"), timeout=REPLY_TIMEOUT)
        self.assertTrue(wire.line().startswith(b"220 "))
        wire.send(b"EHLO client.example.net\r\n")
        self.assertTrue(wire.until(b"250 ")[-1].startswith(b"250 "))
        wire.send(b"STARTTLS\r\nAUTH PLAIN " + plain_token(USER, PASSWORD).encode() + b"\r\n")
        self.assertEqual(wire.line(), b"220 2.0.0 Ready to start TLS\r\n")
        wire.upgrade(self.tls())
        wire.send(b"MAIL FROM:<alice@example.org>\r\n")
        # An AUTH run after the upgrade would have answered first (235, or 503 without EHLO).
        self.assertEqual(wire.line(), b"530 5.7.0 Authentication required\r\n")
        wire.send(b"QUIT\r\n")
        self.assertTrue(wire.line().startswith(b"221 "))
        wire.close()
        self.gateway.wait_for_log(r"starttls_discarded protocol=submission client=127\.0\.0\.1 bytes=\d+")

    # -- messages arrive byte for byte

    def test_smtps_8bit_and_dots_intact(self) -> None:
        """Over implicit TLS, an 8-bit message with lines ".", ".." and ".x" arrives byte for byte."""
        message = text_message("smtps@example.org", "over smtps")
        client = self.logged_in()
        self.assertEqual(client.sendmail(USER, ["smtps@example.org"], message, mail_options=["BODY=8BITMIME"]), {})
        client.quit()
        self.assert_arrives_intact("smtps", message)

    def test_starttls_8bit_and_dots_intact(self) -> None:
        """After STARTTLS, an 8-bit message with lines ".", ".." and ".x" arrives byte for byte."""
        message = text_message("starttls@example.org", "over starttls")
        client = self.starttls()
        client.login(USER, PASSWORD)
        self.assertEqual(client.sendmail(USER, ["starttls@example.org"], message), {})
        client.quit()
        self.assert_arrives_intact("starttls", message)

    def test_smime_signed_intact(self) -> None:
        """An S/MIME signed (multipart/signed, CRLF) message arrives byte for byte and still verifies."""
        message = self.smime_message("smime@example.org")
        client = self.starttls()
        client.login(USER, PASSWORD)
        self.assertEqual(client.sendmail(USER, ["smime@example.org"], message), {})
        client.quit()
        delivered = self.assert_arrives_intact("smime", message)
        self.assert_signature_verifies(body_as_sent(delivered))

    def test_20mb_attachment_intact(self) -> None:
        """A message with a 20 MB attachment arrives byte for byte."""
        message = attachment_message("big@example.org", 20 * 1024 * 1024, seed=20)
        client = self.logged_in()
        self.assertEqual(client.sendmail(USER, ["big@example.org"], message), {})
        client.quit()
        self.assert_arrives_intact("big", message)

    def test_swaks_starttls_and_implicit_tls(self) -> None:
        """swaks sends over STARTTLS and, pipelining, over implicit TLS; both messages arrive byte for byte."""
        swaks = require_tool("swaks", "swaks")
        support = subprocess.run([swaks, "--support"], capture_output=True, timeout=30)
        if b"=== TLS supported" not in support.stdout + support.stderr:
            raise AssertionError("swaks cannot do TLS without Net::SSLeay: apt-get install libnet-ssleay-perl")
        runs = (("swaks-starttls", ["--tls", "--port", str(self.gateway.port("submission", "starttls"))]),
                ("swaks-implicit", ["--tls-on-connect", "--pipeline",
                                    "--port", str(self.gateway.port("submission", "implicit_tls"))]))
        for localpart, transport in runs:
            message = text_message(f"{localpart}@example.org", localpart)
            path = self.stack.path(f"{localpart}.eml")
            with open(path, "wb") as f:
                # swaks joins the lines of --data with CRLF and adds CRLF . CRLF itself: a final
                # CRLF in the file would become an empty last line.
                f.write(message.removesuffix(b"\r\n"))
            result = subprocess.run(
                [swaks, "--server", "127.0.0.1", *transport, "--tls-verify", "--tls-ca-path", self.ca_path,
                 "--ehlo", "client.example.net", "--auth", "PLAIN", "--auth-user", USER, "--auth-password", PASSWORD,
                 "--from", USER, "--to", f"{localpart}@example.org", "--data", "@" + path, "--timeout", "30"],
                capture_output=True, timeout=60)
            self.assertEqual(result.returncode, 0, result.stdout.decode(errors="replace")[-3000:])
            self.assert_arrives_intact(localpart, message)

    def test_curl_smtps_and_starttls(self) -> None:
        """curl uploads over smtps:// and over smtp:// with --ssl-reqd; both messages arrive byte for byte."""
        curl = require_tool("curl", "curl")
        runs = (("curl-smtps", f"smtps://127.0.0.1:{self.gateway.port('submission', 'implicit_tls')}"),
                ("curl-starttls", f"smtp://127.0.0.1:{self.gateway.port('submission', 'starttls')}"))
        for localpart, url in runs:
            message = text_message(f"{localpart}@example.org", localpart)
            path = self.stack.path(f"{localpart}.eml")
            with open(path, "wb") as f:
                f.write(message)
            result = subprocess.run(
                [curl, "-sS", "--ssl-reqd", "--cacert", self.ca_path, "-u", f"{USER}:{PASSWORD}",
                 "--mail-from", USER, "--mail-rcpt", f"{localpart}@example.org", "--upload-file", path, url],
                capture_output=True, timeout=60)
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assert_arrives_intact(localpart, message)

    # -- sender policy

    def test_forged_sender_refused(self) -> None:
        """MAIL FROM an address the user does not own is refused with 553 5.7.1 and logged as sender_rejected."""
        client = self.logged_in()
        code, text = client.mail(OTHER[0])
        self.assertEqual(code, 553)
        self.assertTrue(text.startswith(b"5.7.1 "), text)
        client.quit()
        self.gateway.wait_for_log(r'sender_rejected protocol=submission client=127\.0\.0\.1 '
                                  r'user="alice@example\.org" sender="bob@example\.org"')
        self.assertEqual(self.postfix.delivered("forged"), [])

    def test_alias_and_own_address_accepted(self) -> None:
        """An alias from the senders file and the login address itself are both accepted as senders."""
        client = self.logged_in()
        for sender, localpart in ((ALIAS, "alias"), (USER, "own")):
            message = text_message(f"{localpart}@example.org", f"from {sender}")
            self.assertEqual(client.sendmail(sender, [f"{localpart}@example.org"], message), {})
            delivered = self.assert_arrives_intact(localpart, message)
            self.assertTrue(delivered.startswith(f"Return-Path: <{sender}>\n".encode()), delivered[:80])
        client.quit()

    def test_domain_rule_not_bypassed(self) -> None:
        """
        An @domain rule allows the domain's plain addresses, but not an address Postfix would read
        as another: a comment that hides the domain (Postfix appends its own), or a "%" route.
        """
        client = self.logged_in()
        self.assertEqual(client.mail(f"news@{LISTS}")[0], 250)
        client.rset()
        # docmd: smtplib.mail would parse the address (and drop the comment) before sending it.
        for sender, code in ((f"ceo(@{LISTS}", 501), (f"ceo%gmail.com(@{LISTS}", 501),
                             (f"ceo%gmail.com@{LISTS}", 553)):
            self.assertEqual(client.docmd("MAIL", f"FROM:<{sender}>")[0], code, sender)
        client.quit()

    def test_xclient_names_user_and_client(self) -> None:
        """
        Postfix logs the gateway's client address and the login name, learned through XCLIENT, and
        its Received header names the client by its own EHLO, as if it had connected directly.
        """
        message = text_message("xclient@example.org", "xclient")
        client = self.smtps(source="127.0.0.7")
        client.login(USER, PASSWORD)
        self.assertEqual(client.sendmail(USER, ["xclient@example.org"], message), {})
        client.quit()
        delivered = self.assert_arrives_intact("xclient", message)
        self.assertIn(b"\nReceived: from client.example.net (unknown [127.0.0.7])\n", delivered)
        self.assertIn(b"with ESMTPA", delivered)
        wait_for_file(self.postfix.log_path,
                      r"client=unknown\[127\.0\.0\.7\], sasl_method=XCLIENT, sasl_username=alice@example\.org")

    # -- the transaction

    def test_pipelined_transaction(self) -> None:
        """MAIL, two RCPTs and DATA in one segment get 250, 250, 250, 354 in order; both recipients get the message."""
        message = text_message("pipe1@example.org, pipe2@example.org", "pipelined")
        wire = self.wire()
        wire.send(b"EHLO client.example.net\r\n")
        self.assertIn(b"250-PIPELINING\r\n", wire.until(b"250 "))
        wire.send(b"AUTH PLAIN " + plain_token(USER, PASSWORD).encode() + b"\r\n")
        self.assertTrue(wire.line().startswith(b"235 "))
        wire.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<pipe1@example.org>\r\n"
                  b"RCPT TO:<pipe2@example.org>\r\nDATA\r\n")
        self.assertEqual([wire.line()[:4] for _ in range(4)], [b"250 ", b"250 ", b"250 ", b"354 "])
        stuffed = re.sub(rb"(?m)^\.", b"..", message)
        wire.send(stuffed + b".\r\n")
        self.assertTrue(wire.line().startswith(b"250 "))
        wire.send(b"QUIT\r\n")
        self.assertTrue(wire.line().startswith(b"221 "))
        wire.close()
        for localpart in ("pipe1", "pipe2"):
            self.assert_arrives_intact(localpart, message)

    def test_smuggling_refused(self) -> None:
        """
        A message whose data ends at LF.LF, followed by a second transaction in the user's own
        name (SMTP smuggling), gets 554 5.6.0 and the connection closes: Postfix receives neither
        the first message nor the smuggled one.
        """
        self.wait_for_empty_queue()
        wire = self.wire()
        wire.send(b"EHLO client.example.net\r\n")
        wire.until(b"250 ")
        wire.send(b"AUTH PLAIN " + plain_token(USER, PASSWORD).encode() + b"\r\n")
        self.assertTrue(wire.line().startswith(b"235 "))
        wire.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<carrier@example.org>\r\nDATA\r\n")
        self.assertEqual([wire.line()[:4] for _ in range(3)], [b"250 ", b"250 ", b"354 "])
        wire.send(b"Subject: form\r\n\r\nhi\n.\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<smuggled@example.org>\r\n"
                  b"DATA\r\nSubject: wire money\r\n\r\nsmuggled body\r\n.\r\n")
        self.assertTrue(wire.line().startswith(b"554 5.6.0 "))
        self.assertEqual(wire.line(), b"", "the connection stayed open after a bare line ending")
        wire.close()
        time.sleep(1.5)
        self.assertTrue(self.postfix.queue_is_empty())
        self.assertEqual(self.postfix.delivered("smuggled"), [])
        self.assertEqual(self.postfix.delivered("carrier"), [])

    def test_dsn_relayed(self) -> None:
        """
        DSN is offered as Postfix offers it, and its parameters reach Postfix: a message asking for
        a report on success is delivered, and Postfix's report, naming the envelope id, comes back
        to the sender.
        """
        client = self.logged_in()
        self.assertTrue(client.has_extn("dsn"))
        envid = f"dsn-test-{time.time_ns()}"
        message = b"Subject: dsn\r\n\r\nreport this\r\n"
        self.assertEqual(client.sendmail(USER, ["dsn@example.org"], message,
                                         mail_options=["RET=HDRS", f"ENVID={envid}"],
                                         rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;dsn@example.org"]), {})
        client.quit()
        self.assert_arrives_intact("dsn", message)
        deadline = time.monotonic() + REPLY_TIMEOUT
        while not any(f"Original-Envelope-Id: {envid}".encode() in report for report in self.postfix.delivered("alice")):
            self.assertLess(time.monotonic(), deadline, "no success report came back to the sender")
            time.sleep(0.2)

    def test_bare_lf_lines_delivered(self) -> None:
        """
        A message whose lines end in bare LF, as smtplib sends a bytes message that the email
        package made, is delivered as Postfix takes it: line by line, its dots unstuffed.
        """
        message = b"Subject: unix lines\n\nline one\n.hidden\n.\nline two\r\n"
        client = self.logged_in()
        self.assertEqual(client.sendmail(USER, ["unixlines@example.org"], message), {})
        client.quit()
        self.assert_arrives_intact("unixlines", crlf(message))

    def test_declared_size_over_limit_refused(self) -> None:
        """MAIL FROM with a SIZE over max_message_size is refused with 552 5.3.4; a smaller SIZE is accepted."""
        client = self.logged_in()
        code, text = client.mail(USER, [f"SIZE={MAX_MESSAGE_SIZE + 1}"])
        self.assertEqual(code, 552)
        self.assertTrue(text.startswith(b"5.3.4 "), text)
        self.assertEqual(client.mail(USER, [f"SIZE={MAX_MESSAGE_SIZE}"])[0], 250)
        client.rset()
        client.quit()

    def test_oversized_message_refused_and_not_delivered(self) -> None:
        """
        A message larger than max_message_size, sent without SIZE, gets 552 5.3.4 after the data,
        nothing of it is delivered, and the session then sends a normal message; three times over.
        """
        self.wait_for_empty_queue()
        before = maildir_files(self.postfix)
        client = self.logged_in()
        # The MTA is usually still reading when the limit is crossed; each round crosses it anew.
        for attempt in range(3):
            self.assertEqual(client.mail(USER)[0], 250)
            self.assertEqual(client.rcpt("oversize@example.org")[0], 250)
            oversized = attachment_message("oversize@example.org", MAX_MESSAGE_SIZE * 3 // 4 + 4096, seed=attempt)
            code, text = self.reply_within(f"the end of an oversized message (attempt {attempt})",
                                           lambda: client.data(oversized))
            self.assertEqual(code, 552, f"attempt {attempt}: {text!r}")
            self.assertTrue(text.startswith(b"5.3.4 "), text)
        time.sleep(1.5)
        self.assertEqual(maildir_files(self.postfix), before)
        self.assertTrue(self.postfix.queue_is_empty())
        message = text_message("oversize@example.org", "after the refusal")
        self.assertEqual(client.mail(USER)[0], 250)
        self.assertEqual(client.rcpt("oversize@example.org")[0], 250)
        self.assertEqual(client.data(message)[0], 250)
        client.quit()
        self.assert_arrives_intact("oversize", message)

    def test_recipient_limit(self) -> None:
        """With max_recipients = 3 the fourth RCPT gets 452 4.5.3; the first three get the message."""
        client = self.logged_in()
        self.assertEqual(client.mail(USER)[0], 250)
        for number in range(1, MAX_RECIPIENTS + 1):
            self.assertEqual(client.rcpt(f"limit{number}@example.org")[0], 250)
        code, text = client.rcpt("limit4@example.org")
        self.assertEqual(code, 452)
        self.assertTrue(text.startswith(b"4.5.3 "), text)
        message = text_message("limit@example.org", "three recipients")
        self.assertEqual(client.data(message)[0], 250)
        client.quit()
        for number in range(1, MAX_RECIPIENTS + 1):
            self.assert_arrives_intact(f"limit{number}", message)
        self.wait_for_empty_queue()
        self.assertEqual(self.postfix.delivered("limit4"), [])

    # -- S/MIME

    def smime_message(self, recipient: str) -> bytes:
        """A multipart/signed message with CRLF line ends, signed with C{openssl cms -sign} by a test-CA key."""
        openssl = require_tool("openssl", "openssl")
        directory = tempfile.mkdtemp(dir=self.stack.directory)
        signer = self.ca.issue("alice@example.org")
        with open(signer.chain_path, "rb") as f:
            chain = f.read()
        with open(signer.cert_path, "rb") as f:
            leaf = f.read()
        intermediate = os.path.join(directory, "intermediate.pem")
        with open(intermediate, "wb") as f:
            f.write(chain.replace(leaf, b""))
        content = os.path.join(directory, "content.txt")
        with open(content, "wb") as f:
            f.write(b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
                    b"Signed Gr\xc3\xbc\xc3\x9fe.\r\n.\r\n..\r\n.x\r\n")
        result = subprocess.run(
            [openssl, "cms", "-sign", "-in", content, "-signer", signer.cert_path, "-inkey", signer.key_path,
             "-certfile", intermediate, "-crlfeol"], capture_output=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(b"Content-Type: multipart/signed;", result.stdout)
        # OpenSSL ends the base64 lines of the signature with a bare LF despite -crlfeol.
        return (b"From: Alice <alice@example.org>\r\nTo: " + recipient.encode() + b"\r\nSubject: signed\r\n"
                + crlf(result.stdout))

    def assert_signature_verifies(self, message: bytes) -> None:
        """C{openssl cms -verify} accepts the signature of C{message} against the test CA."""
        path = os.path.join(tempfile.mkdtemp(dir=self.stack.directory), "received.eml")
        with open(path, "wb") as f:
            f.write(message)
        result = subprocess.run(
            [require_tool("openssl", "openssl"), "cms", "-verify", "-in", path, "-CAfile", self.ca_path,
             "-purpose", "any", "-out", os.devnull], capture_output=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)


class ConcurrentSendersTests(SubmissionFixture):
    """Many clients at once, with a Postfix of their own so that its Maildir holds only their mail."""

    # All senders share one address and one user; the default limits (50 each) would count
    # sessions that have ended but whose close the gateway has not yet seen.
    gateway_settings = "[limits]\nmax_connections_per_ip = 200\nmax_sessions_per_user = 200\n"

    def test_concurrent_senders(self) -> None:
        """50 clients send 20 messages each on one connection apiece; every message arrives exactly once."""
        sent: list[str] = []
        errors: list[str] = []
        lock = threading.Lock()

        def sender(number: int) -> None:
            step = "login"
            try:
                # 50 logins at once queue for the gateway's two hash threads (argon2id, about
                # 0.2 s of CPU each): the last may wait far longer than a single reply should.
                client = self.logged_in(*OTHER, timeout=60)
                for index in range(LOAD_MESSAGES):
                    step = f"message {index}"
                    message = (b"From: bob@example.org\r\nTo: load@example.org\r\nSubject: load %d.%d\r\n\r\n"
                               % (number, index)
                               + base64.encodebytes(os.urandom(random.randint(10, 3000))).replace(b"\n", b"\r\n"))
                    refused = client.sendmail(OTHER[0], ["load@example.org"], message)
                    with lock:
                        if refused:
                            errors.append(f"sender {number} message {index}: {refused}")
                        else:
                            sent.append(sha256(message))
                client.quit()
            except (smtplib.SMTPException, OSError) as e:
                with lock:
                    errors.append(f"sender {number}, {step}: {e!r}")

        threads = [threading.Thread(target=sender, args=(number,)) for number in range(LOAD_SENDERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        self.assertEqual(errors, [])
        self.assertEqual(len(sent), LOAD_SENDERS * LOAD_MESSAGES)
        self.postfix.wait_for_delivered("load", len(sent), timeout=60)
        self.wait_for_empty_queue()
        received = Counter(sha256(body_as_sent(m)) for m in self.postfix.delivered("load"))
        self.assertEqual(received, Counter(sent))
        self.assertEqual(set(received.values()), {1})


class BackendOutageTests(SubmissionFixture):
    """Postfix stops and starts again, under a running gateway; mail is either delivered whole or refused with 4xx."""

    postfix_stopped = False

    def stop_postfix(self) -> None:
        """Stop Postfix now; it starts again by L{start_postfix}, at the latest when the test ends."""
        self.postfix.stop()
        self.postfix_stopped = True
        self.addCleanup(self.start_postfix)

    def start_postfix(self) -> None:
        """Start Postfix again if L{stop_postfix} stopped it."""
        if self.postfix_stopped:
            self.postfix.start()
            self.postfix_stopped = False

    def test_login_while_backend_down(self) -> None:
        """With Postfix stopped AUTH gets a 4xx; once it is back, a new session sends without a gateway restart."""
        self.stop_postfix()
        client = self.smtps()
        code, text = client.docmd("AUTH", "PLAIN " + plain_token(USER, PASSWORD))
        self.assertEqual(code // 100, 4, text)
        client.quit()
        self.gateway.wait_for_log(r'backend_unavailable protocol=submission client=127\.0\.0\.1 '
                                  r'user="alice@example\.org" backend=127\.0\.0\.1:\d+ reason=')
        self.start_postfix()
        message = text_message("back@example.org", "after the outage")
        client = self.logged_in()
        self.assertEqual(client.sendmail(USER, ["back@example.org"], message), {})
        client.quit()
        self.assert_arrives_intact("back", message)

    def test_mail_after_backend_lost(self) -> None:
        """
        MAIL in a session whose Postfix connection was lost (Postfix stopped) gets a 4xx; once
        Postfix is back, the same session sends.
        """
        client = self.logged_in()
        self.stop_postfix()
        code, text = self.reply_within("MAIL after the MTA connection was lost", lambda: client.mail(USER))
        self.assertEqual(code // 100, 4, text)
        self.start_postfix()
        message = text_message("samesession@example.org", "same session")
        self.assertEqual(client.sendmail(USER, ["samesession@example.org"], message), {})
        client.quit()
        self.assert_arrives_intact("samesession", message)

    def test_backend_lost_during_data(self) -> None:
        """Postfix stopping in the middle of a message's data gets the client a 4xx, and nothing is delivered."""
        client = self.logged_in()
        self.assertEqual(client.mail(USER)[0], 250)
        self.assertEqual(client.rcpt("half@example.org")[0], 250)
        self.assertEqual(client.docmd("DATA")[0], 354)
        client.send(b"From: alice@example.org\r\nTo: half@example.org\r\nSubject: half\r\n\r\nfirst half\r\n")
        time.sleep(0.2)  # the first half reaches Postfix
        self.stop_postfix()
        client.send(b"second half\r\n.\r\n")
        code, text = self.reply_within("the end of data after the MTA connection was lost", client.getreply)
        self.assertEqual(code // 100, 4, text)
        client.close()
        self.start_postfix()
        time.sleep(1.5)
        self.wait_for_empty_queue()
        self.assertEqual(self.postfix.delivered("half"), [])


class ReplayLoginTests(SubmissionFixture):
    """
    Auth mode "backend" with login = "replay": the gateway logs in to Postfix with the client's
    own credentials, which Postfix checks against Dovecot's auth service.
    """

    backend_config = 'login = "replay"\nforward_client_ip = true\ntimeout = 5'
    gateway_users = None

    auth_port: int
    dovecot: DovecotSandbox

    @classmethod
    def setUpClass(cls) -> None:
        cls.auth_port = free_ports("127.0.0.1", 1)[0]
        # The sandbox hides AUTH by default (smtpd_discard_ehlo_keywords); here Postfix offers it.
        cls.postfix_main_cf = ("smtpd_sasl_auth_enable = yes\nsmtpd_sasl_type = dovecot\n"
                               f"smtpd_sasl_path = inet:127.0.0.1:{cls.auth_port}\n"
                               "smtpd_discard_ehlo_keywords =\n")
        super().setUpClass()

    @classmethod
    def start_backends(cls) -> None:
        """Start a Dovecot whose auth service listens on TCP for Postfix."""
        cls.dovecot = cls.stack.start(DovecotSandbox(
            cls.stack.path("dovecot"), {**USERS, TOKEN_USER[0]: TOKEN_USER[1]},
            extra_config=f"service auth {{\n  inet_listener auth-inet {{\n    address = 127.0.0.1\n"
                         f"    port = {cls.auth_port}\n  }}\n}}\n"))

    def test_wrong_password_is_535(self) -> None:
        """A wrong password, as Postfix (through Dovecot) judges it, is 535 5.7.8; so is an unknown user."""
        for user, password in ((USER, "wrong"), ("nobody@example.org", PASSWORD)):
            client = self.smtps()
            self.assertEqual(client.docmd("AUTH", "PLAIN " + plain_token(user, password)),
                             (535, b"5.7.8 Authentication credentials invalid"))
            client.quit()
        wait_for_file(self.postfix.log_path, r"SASL PLAIN authentication failed: .*sasl_username=alice@example\.org")

    def test_replayed_login_sends(self) -> None:
        """
        The client's credentials log in to Postfix (sasl_method=PLAIN) after XCLIENT has named the
        client's address, and the message arrives byte for byte.
        """
        message = text_message("replay@example.org", "replayed login")
        client = self.smtps(source="127.0.0.8")
        client.login(USER, PASSWORD)
        self.assertEqual(client.sendmail(USER, ["replay@example.org"], message), {})
        client.quit()
        delivered = self.assert_arrives_intact("replay", message)
        self.assertIn(b"\nReceived: from client.example.net (unknown [127.0.0.8])\n", delivered)
        wait_for_file(self.postfix.log_path,
                      r"client=unknown\[127\.0\.0\.8\], sasl_method=PLAIN, sasl_username=alice@example\.org")
        self.assertNotIn(PASSWORD, self.gateway.log())


    def test_token_as_password(self) -> None:
        """
        A 3,000-byte password (an OAuth token) logs in and sends: Postfix cuts command lines at
        2048 bytes, so the gateway's AUTH PLAIN sends it after the 334 (RFC 4954 4).
        """
        user, password = TOKEN_USER
        message = text_message("token@example.org", "token login")
        client = self.smtps()
        client.login(user, password)
        self.assertEqual(client.sendmail(user, ["token@example.org"], message), {})
        client.quit()
        self.assert_arrives_intact("token", message)
        self.assertNotIn("login_failed", self.gateway.log())


class StrictHeloTests(SubmissionFixture):
    """A Postfix that judges HELO names at EHLO (smtpd_delay_reject = no) and refuses invalid ones."""

    postfix_main_cf = "smtpd_delay_reject = no\nsmtpd_helo_restrictions = reject_invalid_helo_hostname\n"

    def test_refused_client_name_replaced(self) -> None:
        """
        A client whose EHLO name Postfix refuses still sends: the gateway's EHLO after XCLIENT
        falls back to its own name, and the Received header shows that one.
        """
        message = text_message("strict@example.org", "strict HELO")
        client = smtplib.SMTP_SSL("127.0.0.1", self.gateway.port("submission", "implicit_tls"),
                                  context=self.tls(), timeout=REPLY_TIMEOUT, source_address=("127.0.0.9", 0))
        client.ehlo("[1.2.3.4")
        client.login(USER, PASSWORD)
        self.assertEqual(client.sendmail(USER, ["strict@example.org"], message), {})
        client.quit()
        delivered = self.assert_arrives_intact("strict", message)
        self.assertIn(b"\nReceived: from localhost (unknown [127.0.0.9])\n", delivered)
        wait_for_file(self.postfix.log_path, r"reject: EHLO from unknown\[127\.0\.0\.9\]: 501 5\.5\.2 <\[1\.2\.3\.4>: Helo command rejected")
        self.gateway.wait_for_log(r'mta_refused_client_ehlo name="\[1\.2\.3\.4" reply=501 5\.5\.2 .* client=127\.0\.0\.9 ')
        # The name refused is not sent again: the second client's login costs no second reject in Postfix's log.
        second = smtplib.SMTP_SSL("127.0.0.1", self.gateway.port("submission", "implicit_tls"),
                                  context=self.tls(), timeout=REPLY_TIMEOUT, source_address=("127.0.0.9", 0))
        second.ehlo("[1.2.3.4")
        second.login(USER, PASSWORD)
        second.quit()
        wait_for_file(self.postfix.log_path, r"disconnect from unknown\[127\.0\.0\.9\] ehlo=2 xclient=0/1 quit=1 ")
        with open(self.postfix.log_path, encoding="utf-8", errors="replace") as f:
            self.assertEqual(f.read().count("Helo command rejected"), 1)


class UnixSocketClientTests(TestCase):
    """The MTA login of a client of a UNIX socket listener, which has no IP address, against a real Postfix."""

    def setUp(self) -> None:
        self.stack = Stack("gw-smtp-unix-")
        self.addCleanup(self.stack.stop)
        self.postfix = self.stack.start(PostfixSandbox(self.stack.path("postfix")))

    @inlineCallbacks
    def test_xclient_without_address(self):  # type: ignore[no-untyped-def]
        """
        Postfix takes the gateway's XCLIENT for such a client (ADDR=[UNAVAILABLE]) and logs the
        login; the client's address text (UNIXAddress(None)) it would refuse with 501.
        """
        settings = dataclasses.replace(BACKEND_SETTINGS, port=self.postfix.smtp_port, login="xclient")
        connector = BackendConnector(reactor, settings, SmtpBackend)
        client = ClientAddress("UNIXAddress(None)", 0, "", 0, "uNiXsEsSiOn1")
        session = yield connector.login(LoginRequest(USER, b"", client))
        # Postfix names the login as it opens a queue file: at the first recipient.
        session.transport.write(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<xclient@example.org>\r\nQUIT\r\n")
        session.close_with_grace(reactor)
        while not session.lost:
            yield deferLater(reactor, 0.05)
        wait_for_file(self.postfix.log_path, r"client=unknown\[unknown\], sasl_method=XCLIENT, "
                                             r"sasl_username=alice@example\.org")
