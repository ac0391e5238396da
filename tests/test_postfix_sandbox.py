"""Tests for the Postfix sandbox: a private Postfix that the submission tests relay to."""

from __future__ import annotations

import os
import pwd
import shutil
import smtplib
import socket
import tempfile
import threading
import time

from twisted.trial.unittest import SynchronousTestCase

from gateway.testing import postfix as postfix_module
from gateway.testing.host import free_ports
from gateway.testing.postfix import PostfixNotInstalled, PostfixSandbox, body_as_sent

SENDER = "sender@example.net"
RECIPIENT = "alice@example.org"

# CRLF line endings, 8-bit bytes, and lines starting with dots, which SMTP
# stuffs on the wire and Postfix must unstuff before storing.
MESSAGE = (
    b"From: sender@example.net\r\n"
    b"To: alice@example.org\r\n"
    b"Subject: sandbox\r\n"
    b"Content-Type: text/plain; charset=latin-1\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"caf\xe9 cr\xe8me br\xfbl\xe9e\r\n"
    b".leading dot\r\n"
    b"..two leading dots\r\n"
    b".\r\n"
    b"last line\r\n"
)

SIXTY_MEGABYTES = 60 * 1024 * 1024


def _temporary_directory(case: SynchronousTestCase) -> str:
    """Create a directory that ``case`` removes at cleanup.

    It lives in the temporary directory rather than trial's working directory, which
    is not necessarily searchable by Postfix's unprivileged processes.
    """
    directory = tempfile.mkdtemp(prefix="mailgateway-test-")
    case.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    return directory


def _started(case: SynchronousTestCase, sandbox: PostfixSandbox) -> PostfixSandbox:
    """Start ``sandbox``, have ``case`` stop it at cleanup, and return it."""
    # Registered after the directory's removal, so it runs before it.
    case.addCleanup(sandbox.stop)
    sandbox.start()
    return sandbox


def _client(
    case: SynchronousTestCase, sandbox: PostfixSandbox, host: str = "127.0.0.1"
) -> smtplib.SMTP:
    """Return an SMTP client connected to ``sandbox`` that has sent EHLO."""
    client = smtplib.SMTP(host, sandbox.smtp_port, timeout=30)
    case.addCleanup(client.close)
    client.ehlo()
    return client


def _wait_for_log(path: str, needle: str, timeout: float = 10.0) -> str:
    """Return the contents of ``path`` once it contains ``needle``, or the last contents read.

    Postfix's postlogd writes asynchronously, so a line may appear shortly after the event.
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


def _wait_for_empty_queue(sandbox: PostfixSandbox, timeout: float = 10.0) -> bool:
    """Return whether the sandbox's queue becomes empty within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not sandbox.queue_is_empty():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _split_first_header(data: bytes) -> tuple[bytes, bytes]:
    """Split CRLF-terminated ``data`` after its first header, continuation lines included."""
    end = data.index(b"\r\n") + 2
    while data[end : end + 1] in (b" ", b"\t"):
        end = data.index(b"\r\n", end) + 2
    return data[:end], data[end:]


class _LMTPServer:
    """A minimal LMTP server in a thread that accepts every message and records it.

    :ivar messages: ``(MAIL FROM line, RCPT TO lines, unstuffed data)`` per message.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.messages: list[tuple[bytes, list[bytes], bytes]] = []
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen()
        # accept() wakes up regularly to notice close().
        self._listener.settimeout(0.1)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop accepting connections and wait for the server thread."""
        self._closed.set()
        self._thread.join(10)
        self._listener.close()

    def wait_for_messages(
        self, count: int, timeout: float = 15.0
    ) -> list[tuple[bytes, list[bytes], bytes]]:
        """Return the recorded messages once there are ``count``, or those there are by then."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.messages)

    def _serve(self) -> None:
        """Serve one connection after another until closed."""
        while not self._closed.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(30)
                self._session(connection)

    def _session(self, connection: socket.socket) -> None:
        """Answer one LMTP session, replying to each command in turn (which allows pipelining)."""
        reader = connection.makefile("rb")
        connection.sendall(b"220 lmtp.test LMTP ready\r\n")
        sender = b""
        recipients: list[bytes] = []
        while True:
            line = reader.readline()
            verb = line[:4].upper()
            if not line or verb == b"QUIT":
                connection.sendall(b"221 2.0.0 bye\r\n")
                return
            if verb == b"LHLO":
                connection.sendall(b"250-lmtp.test\r\n250-8BITMIME\r\n250 PIPELINING\r\n")
            elif verb == b"MAIL":
                sender, recipients = line.rstrip(b"\r\n"), []
                connection.sendall(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                recipients.append(line.rstrip(b"\r\n"))
                connection.sendall(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                connection.sendall(b"354 go ahead\r\n")
                data: list[bytes] = []
                for data_line in iter(reader.readline, b".\r\n"):
                    data.append(data_line[1:] if data_line.startswith(b".") else data_line)
                self.messages.append((sender, recipients, b"".join(data)))
                connection.sendall(b"250 2.0.0 Ok\r\n" * len(recipients))
            elif verb == b"RSET":
                connection.sendall(b"250 2.0.0 Ok\r\n")
            else:
                connection.sendall(b"502 5.5.2 unknown command\r\n")


class PostfixSandboxTests(SynchronousTestCase):
    """A running PostfixSandbox accepts SMTP for example.org and delivers into its Maildir."""

    def setUp(self) -> None:
        self.sandbox = _started(self, PostfixSandbox(_temporary_directory(self)))

    def test_port_is_real_and_greets(self) -> None:
        """A port given as 0 is replaced by a real one that greets as mail.example.org."""
        self.assertNotEqual(self.sandbox.smtp_port, 0)
        with socket.create_connection(("127.0.0.1", self.sandbox.smtp_port), timeout=10) as s:
            self.assertTrue(s.recv(100).startswith(b"220 mail.example.org ESMTP"))

    def test_message_is_delivered_byte_for_byte(self) -> None:
        """An 8-bit message with dot lines is stored as sent, below the headers Postfix prepends."""
        client = _client(self, self.sandbox)
        self.assertEqual(
            client.sendmail(SENDER, [RECIPIENT], MESSAGE, mail_options=["BODY=8BITMIME"]), {}
        )
        client.quit()

        (delivered,) = self.sandbox.wait_for_delivered("alice", 1)
        self.assertTrue(
            delivered.startswith(
                b"Return-Path: <sender@example.net>\n"
                b"X-Original-To: alice@example.org\n"
                b"Delivered-To: alice@example.org\n"
                b"Received: from "
            ),
            delivered[:200],
        )
        self.assertNotIn(b"\r\n", delivered)
        self.assertEqual(body_as_sent(delivered), MESSAGE)
        self.assertIn(b"\n.leading dot\n..two leading dots\n.\n", delivered)
        self.assertEqual(self.sandbox.delivered("bob"), [])

        (path,) = os.listdir(os.path.join(self.sandbox.maildir, "new"))
        owner = os.stat(os.path.join(self.sandbox.maildir, "new", path)).st_uid
        self.assertEqual(owner, pwd.getpwnam("mail").pw_uid)

    def test_each_recipient_gets_a_copy_in_order(self) -> None:
        """Every recipient gets its own copy, matched regardless of case, oldest first."""
        client = _client(self, self.sandbox)
        first = MESSAGE.replace(b"Subject: sandbox", b"Subject: first")
        second = MESSAGE.replace(b"Subject: sandbox", b"Subject: second")
        client.sendmail(SENDER, [RECIPIENT, "Bob@Example.ORG"], first)
        self.sandbox.wait_for_delivered("bob", 1)
        client.sendmail(SENDER, [RECIPIENT], second)

        alice = self.sandbox.wait_for_delivered("alice", 2)
        self.assertEqual([body_as_sent(m) for m in alice], [first, second])
        self.assertEqual([body_as_sent(m) for m in self.sandbox.delivered("BOB")], [first])

    def test_other_domains_are_refused(self) -> None:
        """A recipient outside example.org is refused at RCPT TO: the sandbox relays nowhere."""
        client = _client(self, self.sandbox)
        client.mail(SENDER)
        code, reply = client.rcpt("someone@example.net")
        self.assertEqual(code, 554)
        self.assertIn(b"5.7.1", reply)

    def test_xclient_sets_client_and_login(self) -> None:
        """XCLIENT from 127.0.0.1 names the client and the login, and the session is ESMTPA."""
        client = _client(self, self.sandbox)
        code, greeting = client.docmd(
            "XCLIENT", "ADDR=192.0.2.7 PORT=4242 PROTO=ESMTP LOGIN=alice"
        )
        self.assertEqual((code, greeting), (220, b"mail.example.org ESMTP"))
        self.assertEqual(client.ehlo()[0], 250)
        self.assertEqual(client.sendmail(SENDER, [RECIPIENT], MESSAGE), {})

        (delivered,) = self.sandbox.wait_for_delivered("alice", 1)
        self.assertIn(b"[192.0.2.7]", delivered.split(b"\n\t")[0])
        self.assertIn(b"with ESMTPA", delivered)
        self.assertEqual(body_as_sent(delivered), MESSAGE)
        needle = "client=unknown[192.0.2.7], sasl_method=XCLIENT, sasl_username=alice"
        self.assertIn(needle, _wait_for_log(self.sandbox.log_path, needle))

    def test_xclient_without_login_is_not_authorized(self) -> None:
        """After XCLIENT to an outside address without LOGIN, the client may not send mail."""
        client = _client(self, self.sandbox)
        self.assertEqual(client.docmd("XCLIENT", "ADDR=192.0.2.7 PROTO=ESMTP")[0], 220)
        client.ehlo()
        client.mail(SENDER)
        code, reply = client.rcpt(RECIPIENT)
        self.assertEqual(code, 554)
        self.assertIn(b"Client host rejected", reply)

    def test_auth_is_not_offered(self) -> None:
        """The sandbox neither advertises nor accepts AUTH: the gateway authenticates."""
        client = _client(self, self.sandbox)
        self.assertNotIn("auth", client.esmtp_features)
        self.assertEqual(client.docmd("AUTH", "PLAIN AGFsaWNlAHNlY3JldA==")[0], 503)

    def test_xclient_proto_esmtpa_is_refused(self) -> None:
        """XCLIENT PROTO takes only SMTP or ESMTP; LOGIN= alone makes a session ESMTPA."""
        client = _client(self, self.sandbox)
        code, reply = client.docmd(
            "XCLIENT", "ADDR=192.0.2.7 PORT=4242 PROTO=ESMTPA LOGIN=alice"
        )
        self.assertEqual((code, reply), (501, b"5.5.4 Bad PROTO syntax: ESMTPA"))

    def test_declared_size_over_limit_is_refused(self) -> None:
        """A MAIL FROM declaring 60 MB is refused with 552 5.3.4."""
        client = _client(self, self.sandbox)
        self.assertIn("size", client.esmtp_features)
        self.assertEqual(int(client.esmtp_features["size"]), 50 * 1024 * 1024)
        code, reply = client.mail(SENDER, [f"SIZE={SIXTY_MEGABYTES}"])
        self.assertEqual(code, 552)
        self.assertTrue(reply.startswith(b"5.3.4 "), reply)

    def test_undeclared_size_over_limit_is_refused(self) -> None:
        """60 MB of data without a declared size are refused with 552 5.3.4 after DATA."""
        line = b"x" * 998 + b"\r\n"
        big = MESSAGE + line * (SIXTY_MEGABYTES // len(line) + 1)
        client = _client(self, self.sandbox)
        # smtplib.sendmail would declare the size; MAIL FROM without options does not.
        self.assertEqual(client.mail(SENDER)[0], 250)
        self.assertEqual(client.rcpt(RECIPIENT)[0], 250)
        code, reply = client.data(big)
        self.assertEqual(code, 552)
        self.assertTrue(reply.startswith(b"5.3.4 "), reply)
        self.assertTrue(_wait_for_empty_queue(self.sandbox))
        self.assertEqual(self.sandbox.delivered("alice"), [])

    def test_queue_is_empty_after_delivery(self) -> None:
        """Once a message is delivered, the queue becomes empty."""
        self.assertTrue(self.sandbox.queue_is_empty())
        _client(self, self.sandbox).sendmail(SENDER, [RECIPIENT], MESSAGE)
        self.sandbox.wait_for_delivered("alice", 1)
        self.assertTrue(_wait_for_empty_queue(self.sandbox))

    def test_stop_closes_port_and_start_reopens_it(self) -> None:
        """stop() closes the port; start() listens on the same port and delivers again."""
        port = self.sandbox.smtp_port
        self.sandbox.stop()
        self.assertRaises(ConnectionRefusedError, socket.create_connection, ("127.0.0.1", port))
        self.sandbox.stop()

        self.sandbox.start()
        self.assertEqual(self.sandbox.smtp_port, port)
        _client(self, self.sandbox).sendmail(SENDER, [RECIPIENT], MESSAGE)
        (delivered,) = self.sandbox.wait_for_delivered("alice", 1)
        self.assertEqual(body_as_sent(delivered), MESSAGE)

    def test_start_twice_is_refused(self) -> None:
        """Starting a running sandbox again is an error and leaves it running."""
        error = self.assertRaises(RuntimeError, self.sandbox.start)
        self.assertIn("already running", str(error))
        socket.create_connection(("127.0.0.1", self.sandbox.smtp_port), timeout=10).close()

    def test_log_lines_name_the_instance(self) -> None:
        """Every line Postfix logs carries the sandbox's own syslog_name."""
        _client(self, self.sandbox).sendmail(SENDER, [RECIPIENT], MESSAGE)
        self.sandbox.wait_for_delivered("alice", 1)
        needle = "status=sent (delivered to maildir)"
        lines = _wait_for_log(self.sandbox.log_path, needle).splitlines()
        # Lines such as "Terminated" come from the postfix-script shell, not from Postfix.
        postfix_lines = [line for line in lines if "]: " in line]
        self.assertTrue(any(needle in line for line in postfix_lines), lines)
        for line in postfix_lines:
            self.assertIn(f" {self.sandbox.syslog_name}/", line)

    def test_xclient_is_refused_from_other_hosts(self) -> None:
        """A client outside xclient_hosts may not use XCLIENT."""
        other = _started(
            self, PostfixSandbox(_temporary_directory(self), xclient_hosts="192.0.2.0/24")
        )
        client = _client(self, other)
        self.assertNotIn("xclient", client.esmtp_features)
        code, _ = client.docmd("XCLIENT", "ADDR=192.0.2.7 LOGIN=alice")
        self.assertEqual(code, 550)

    def test_ipv6_loopback(self) -> None:
        """A sandbox on ::1 accepts mail from ::1 and delivers it."""
        other = _started(self, PostfixSandbox(_temporary_directory(self), host="::1"))
        _client(self, other, "::1").sendmail(SENDER, [RECIPIENT], MESSAGE)
        (delivered,) = other.wait_for_delivered("alice", 1)
        self.assertEqual(body_as_sent(delivered), MESSAGE)
        self.assertEqual(self.sandbox.delivered("alice"), [])

    def test_context_manager(self) -> None:
        """Entering a sandbox starts it and leaving it stops it."""
        other = PostfixSandbox(_temporary_directory(self))
        self.addCleanup(other.stop)
        with other as entered:
            self.assertIs(entered, other)
            socket.create_connection(("127.0.0.1", other.smtp_port), timeout=10).close()
        self.assertRaises(
            ConnectionRefusedError, socket.create_connection, ("127.0.0.1", other.smtp_port)
        )


class PostfixLMTPTests(SynchronousTestCase):
    """With ``lmtp`` set, the sandbox hands every message to that LMTP server."""

    def setUp(self) -> None:
        self.lmtp_port = free_ports("127.0.0.1", 1)[0]
        self.sandbox = _started(
            self, PostfixSandbox(_temporary_directory(self), lmtp=("127.0.0.1", self.lmtp_port))
        )

    def _lmtp_server(self) -> _LMTPServer:
        """Start the LMTP server on the port the sandbox delivers to; close it at cleanup."""
        server = _LMTPServer(self.lmtp_port)
        self.addCleanup(server.close)
        return server

    def test_delivers_over_lmtp(self) -> None:
        """The LMTP server gets the envelope and the message below Postfix's Received: header."""
        server = self._lmtp_server()
        _client(self, self.sandbox).sendmail(SENDER, [RECIPIENT], MESSAGE)
        (message,) = server.wait_for_messages(1)
        sender, recipients, data = message
        self.assertTrue(sender.startswith(b"MAIL FROM:<sender@example.net>"), sender)
        self.assertEqual(len(recipients), 1)
        self.assertTrue(recipients[0].startswith(b"RCPT TO:<alice@example.org>"), recipients)
        received, rest = _split_first_header(data)
        self.assertTrue(received.startswith(b"Received: from "), received)
        self.assertIn(b"\tby mail.example.org (Postfix) with ESMTP id ", received)
        self.assertEqual(rest, MESSAGE)
        self.assertTrue(_wait_for_empty_queue(self.sandbox))
        self.assertRaises(ValueError, self.sandbox.delivered, "alice")

    def test_mail_waits_for_lmtp_server(self) -> None:
        """While the LMTP server is down the message stays queued; it is delivered once it is up."""
        _client(self, self.sandbox).sendmail(SENDER, [RECIPIENT], MESSAGE)
        needle = "status=deferred"
        self.assertIn(needle, _wait_for_log(self.sandbox.log_path, needle))
        self.assertFalse(self.sandbox.queue_is_empty())

        server = self._lmtp_server()
        (message,) = server.wait_for_messages(1)
        self.assertEqual(_split_first_header(message[2])[1], MESSAGE)
        self.assertTrue(_wait_for_empty_queue(self.sandbox))


class BodyAsSentTests(SynchronousTestCase):
    """body_as_sent removes exactly the headers Postfix prepends and restores CRLF."""

    PREPENDED = (
        b"Return-Path: <sender@example.net>\n",
        b"X-Original-To: alice@example.org\n",
        b"Delivered-To: alice@example.org\n",
        b"Received: from client.test (unknown [192.0.2.7])\n"
        b"\tby mail.example.org (Postfix) with ESMTPA id 4ABCDEF;\n"
        b"\tSat, 28 Nov 2026 20:18:25 +0000 (UTC)\n",
    )

    def test_strips_prepended_headers(self) -> None:
        """The client's own Received: and Return-Path: headers are kept; LF becomes CRLF."""
        sent = b"Received: by client.test\r\nReturn-Path: <x@y>\r\n\r\nbody\r\n"
        stored = b"".join(self.PREPENDED) + sent.replace(b"\r\n", b"\n")
        self.assertEqual(body_as_sent(stored), sent)

    def test_requires_every_header(self) -> None:
        """A message that lacks one of the prepended headers is an error."""
        for index in range(len(self.PREPENDED)):
            headers = self.PREPENDED[:index] + self.PREPENDED[index + 1 :]
            self.assertRaises(ValueError, body_as_sent, b"".join(headers) + b"\nbody\n")

    def test_requires_headers_in_order(self) -> None:
        """Prepended headers in another order are an error."""
        return_path, original_to, delivered_to, received = self.PREPENDED
        stored = return_path + delivered_to + original_to + received
        self.assertRaises(ValueError, body_as_sent, stored + b"\nbody\n")

    def test_requires_own_received_header(self) -> None:
        """A first Received: header from another host is an error."""
        stored = b"".join(self.PREPENDED).replace(b"by mail.example.org", b"by mx.example.net")
        self.assertRaises(ValueError, body_as_sent, stored + b"\nbody\n")


class PostfixSandboxSetupTests(SynchronousTestCase):
    """PostfixSandbox fails early and clearly when it cannot work."""

    def test_missing_postfix(self) -> None:
        """Without a postfix binary, the error names the Debian package to install."""
        self.patch(postfix_module.shutil, "which", lambda name, path=None: None)
        error = self.assertRaises(PostfixNotInstalled, PostfixSandbox, "/nonexistent")
        self.assertEqual(str(error), "postfix is not installed: apt-get install postfix")

    def test_bad_configuration_reports_log(self) -> None:
        """When Postfix refuses to start, the error carries Postfix's own complaint."""
        sandbox = PostfixSandbox(
            _temporary_directory(self), extra_main_cf="message_size_limit = lots\n"
        )
        self.addCleanup(sandbox.stop)
        error = self.assertRaises(RuntimeError, sandbox.start)
        self.assertIn("message_size_limit", str(error))

    def test_busy_port_reports_log(self) -> None:
        """When the SMTP port is taken, start() fails with Postfix's bind error."""
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            sandbox = PostfixSandbox(_temporary_directory(self), smtp_port=busy.getsockname()[1])
            self.addCleanup(sandbox.stop)
            error = self.assertRaises(RuntimeError, sandbox.start)
        self.assertIn("Address already in use", str(error))

    def test_extra_main_cf_replaces_defaults(self) -> None:
        """A parameter set in extra_main_cf replaces the default, without Postfix's warning."""
        sandbox = _started(
            self,
            PostfixSandbox(
                _temporary_directory(self), extra_main_cf="message_size_limit = 4096\n"
            ),
        )
        client = _client(self, sandbox)
        self.assertEqual(client.esmtp_features["size"], "4096")
        code, _ = client.mail(SENDER, ["SIZE=4097"])
        self.assertEqual(code, 552)
        with open(sandbox.log_path, encoding="utf-8", errors="replace") as f:
            self.assertNotIn("overriding earlier entry", f.read())

    def test_stop_without_start(self) -> None:
        """Stopping a sandbox that never started does nothing."""
        PostfixSandbox(_temporary_directory(self)).stop()
