"""Transcript tests of the submission front end with StringTransport and Clock."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import replace

from frontend_harness import TLS_OPTIONS, FrontEndTestBase, b64, unslotted
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from gateway.backend import BackendUnavailable, LoginRequest
from gateway.config import SubmissionSettings
from gateway.frontend import FrontEndFactory
from gateway.relay import CLOSE_GRACE
from gateway.senders import SenderPolicy
from gateway.smtp_backend import SmtpBackend
from gateway.submission import SubmissionFrontEnd
from gateway.testing.fakes import BACKEND_SETTINGS
from gateway.testing.pki import TestCA
from gateway.testing.tls_pair import memory_bios, tls_pair

RULES = SubmissionSettings(implicit_tls=(), starttls=(), backend=BACKEND_SETTINGS, senders_file=None,
                           max_message_size=1000, max_recipients=3, idle_timeout=300.0, transaction_timeout=600.0)
AMBIGUOUS_END_REFUSAL = (b"554 5.6.0 Message refused: a line of a lone dot must begin and end with CRLF, "
                         b"closing connection\r\n")
AUTH_BOB = b"AUTH PLAIN " + b64(b"\0bob@example.org\0secret") + b"\r\n"


def logged_in_mta(request: LoginRequest, *more: bytes) -> SmtpBackend:
    """An MTA session that has just logged in (its EHLO offered 8BITMIME, and C{more}), on a StringTransport."""
    backend = SmtpBackend(request, replace(BACKEND_SETTINGS, login="xclient"), None)
    backend.makeConnection(StringTransport())
    backend.dataReceived(b"220 mta ESMTP\r\n250-mta\r\n250-8BITMIME\r\n250 XCLIENT ADDR PORT PROTO LOGIN\r\n"
                         b"220 mta ESMTP\r\n250-mta\r\n" + b"".join(b"250-%s\r\n" % keyword for keyword in more)
                         + b"250 8BITMIME\r\n")
    backend.transport.clear()
    return backend


class SubmissionTestBase(FrontEndTestBase):
    """A submission front end whose users are addresses, over a scripted MTA."""

    protocol = "submission"
    limits = replace(FrontEndTestBase.limits, line_length=12288)

    def front_end(self, context):  # type: ignore[no-untyped-def,override]
        return SubmissionFrontEnd(context, RULES, SenderPolicy(None))

    def setUp(self) -> None:
        super().setUp()
        self.auth.passwords["bob@example.org"] = b"secret"
        self.backend._make_session = logged_in_mta  # type: ignore[attr-defined]

    def mta(self, n: int = -1) -> SmtpBackend:
        session = self.backend.sessions[n]
        assert isinstance(session, SmtpBackend)
        return session

    def mta_got(self, n: int = -1) -> bytes:
        transport = self.mta(n).transport
        data = transport.value()
        transport.clear()
        return data

    def start_data(self) -> None:
        """Log in is done: MAIL, RCPT and DATA accepted by the MTA, everything read."""
        self.say(b"MAIL FROM:<bob@example.org>\r\n")
        self.mta().dataReceived(b"250 2.1.0 Ok\r\n")
        self.say(b"RCPT TO:<a@example.org>\r\n")
        self.mta().dataReceived(b"250 2.1.5 Ok\r\n")
        self.say(b"DATA\r\n")
        self.mta().dataReceived(b"354 go ahead\r\n")
        self.mta_got()
        self.read()

    def log_in(self) -> None:
        self.say(b"EHLO client.example.org\r\n")
        self.assertEqual(self.say(AUTH_BOB), b"235 2.7.0 Authentication successful\r\n")


class PlainListenerTests(SubmissionTestBase):
    """The STARTTLS listener (587) before TLS."""

    implicit_tls = False

    def test_greeting(self) -> None:
        """The greeting is a 220 with the host name."""
        self.assertEqual(self.greeting, b"220 mail.example.org ESMTP Mail gateway ready\r\n")

    def test_ehlo_before_tls(self) -> None:
        """EHLO before TLS offers STARTTLS, PIPELINING, SIZE and ENHANCEDSTATUSCODES, and no AUTH."""
        self.assertEqual(self.say(b"EHLO client\r\n"), b"250-mail.example.org\r\n250-PIPELINING\r\n250-SIZE 1000\r\n"
                                                       b"250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n")

    def test_auth_and_mail_refused_before_tls(self) -> None:
        """AUTH, MAIL, RCPT and DATA before STARTTLS get 530 5.7.0; nothing is checked."""
        self.say(b"EHLO client\r\n")
        for line in (AUTH_BOB, b"MAIL FROM:<bob@example.org>\r\n", b"RCPT TO:<x@example.org>\r\n", b"DATA\r\n"):
            self.assertEqual(self.say(line), b"530 5.7.0 Must issue a STARTTLS command first\r\n")
        self.assertEqual(self.auth.checked, [])

    def test_only_ehlo_noop_starttls_quit_before_tls(self) -> None:
        """
        Before TLS, HELO, RSET, VRFY, EXPN, HELP and unknown verbs get 530 5.7.0 (RFC 3207 4); BDAT
        closes the connection there too, before its chunk can run as commands.
        """
        for line in (b"HELO client\r\n", b"RSET\r\n", b"VRFY bob\r\n", b"EXPN list\r\n", b"HELP\r\n",
                     b"FOO\r\n"):
            self.assertEqual(self.say(line), b"530 5.7.0 Must issue a STARTTLS command first\r\n")
            self.assertEqual(self.say(b"NOOP\r\n"), b"250 2.0.0 OK\r\n")  # keeps the error count low
        self.assertEqual(self.say(b"QUIT\r\n"), b"221 2.0.0 Bye\r\n")

    def test_bdat_before_tls_closes(self) -> None:
        """BDAT before TLS closes the connection: its chunk is not read, so no STARTTLS inside it runs."""
        reply = self.say(b"BDAT 10 LAST\r\nSTARTTLS\r\n")
        self.assertEqual(reply, b"554 5.5.1 BDAT is not supported (no CHUNKING), closing connection\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_starttls_discards_and_forgets(self) -> None:
        """STARTTLS drops pipelined input and the earlier EHLO; it is not offered again."""
        self.say(b"EHLO client\r\n")
        self.assertEqual(self.say(b"STARTTLS\r\n" + AUTH_BOB), b"220 2.0.0 Ready to start TLS\r\n")
        self.assertIs(self.transport.tls_options, TLS_OPTIONS)
        self.assertEqual(self.auth.checked, [])
        self.assertEqual(self.say(AUTH_BOB), b"503 5.5.1 Send EHLO first\r\n")
        ehlo = self.say(b"EHLO client\r\n")
        self.assertNotIn(b"STARTTLS", ehlo)
        self.assertIn(b"250 AUTH PLAIN LOGIN\r\n", ehlo)
        self.assertEqual(self.say(b"STARTTLS\r\n"), b"503 5.5.1 TLS already active\r\n")


class AuthTests(SubmissionTestBase):
    """AUTH on the implicit-TLS listener (465)."""

    def test_freed_without_collector(self) -> None:
        """A closed connection is freed at once, not at the cycle collector's next run."""
        self.assert_freed_without_collector(b"EHLO client\r\n")

    def test_mail_before_auth(self) -> None:
        """MAIL before AUTH gets 530 5.7.0 Authentication required."""
        self.say(b"EHLO client\r\n")
        self.assertEqual(self.say(b"MAIL FROM:<bob@example.org>\r\n"), b"530 5.7.0 Authentication required\r\n")

    def test_auth_plain(self) -> None:
        """AUTH PLAIN with an initial response succeeds with 235 2.7.0."""
        self.log_in()

    def test_auth_login_two_steps(self) -> None:
        """AUTH LOGIN asks with 334 challenges."""
        self.say(b"EHLO client\r\n")
        self.assertEqual(self.say(b"AUTH LOGIN\r\n"), b"334 " + b64(b"Username:") + b"\r\n")
        self.assertEqual(self.say(b64(b"bob@example.org") + b"\r\n"), b"334 " + b64(b"Password:") + b"\r\n")
        self.assertEqual(self.say(b64(b"secret") + b"\r\n"), b"235 2.7.0 Authentication successful\r\n")

    def test_auth_empty_initial_response(self) -> None:
        """"=" is an empty initial response; empty is no PLAIN message: the authentication fails, at once."""
        self.say(b"EHLO client\r\n")
        self.assertEqual(self.say(b"AUTH PLAIN =\r\n"), b"535 5.7.8 Authentication credentials invalid\r\n")

    def test_auth_cancel(self) -> None:
        """"*" cancels AUTH."""
        self.say(b"EHLO client\r\n")
        self.say(b"AUTH PLAIN\r\n")
        self.assertEqual(self.say(b"*\r\n"), b"501 5.7.0 Authentication cancelled\r\n")

    def test_wrong_password_paced(self) -> None:
        """A wrong password gets 535 5.7.8 after the failure delay."""
        self.say(b"EHLO client\r\n")
        self.assertEqual(self.say(b"AUTH PLAIN " + b64(b"\0bob@example.org\0wrong") + b"\r\n"), b"")
        self.clock.advance(2)
        self.assertEqual(self.read(), b"535 5.7.8 Authentication credentials invalid\r\n")

    def test_backend_down_at_auth(self) -> None:
        """An unreachable MTA at AUTH time gives a 4xx: the client keeps its password and retries."""
        self.backend.error = BackendUnavailable("refused")
        self.say(b"EHLO client\r\n")
        self.assertEqual(self.say(AUTH_BOB), b"454 4.7.0 Temporary authentication failure, try again later\r\n")

    def test_auth_twice(self) -> None:
        """AUTH after a successful AUTH gets 503 5.5.1."""
        self.log_in()
        self.assertEqual(self.say(AUTH_BOB), b"503 5.5.1 Already authenticated\r\n")

    def test_long_auth_line(self) -> None:
        """AUTH lines may be longer than 512 octets; other commands may not."""
        self.say(b"EHLO client\r\n")
        self.assertEqual(self.say(b"AUTH PLAIN " + b64(b"\0bob@example.org\0" + b"x" * 2000) + b"\r\n"), b"")
        self.clock.advance(2)
        self.assertTrue(self.read().startswith(b"535 "))
        self.assertEqual(self.say(b"NOOP " + b"x" * 600 + b"\r\n"), b"500 5.5.2 Line too long\r\n")
        self.assertFalse(self.transport.disconnecting)

    def test_sasl_response_too_long(self) -> None:
        """A SASL response over the line limit gets RFC 4954's 500 5.5.6, and the connection closes."""
        self.say(b"EHLO client\r\n")
        self.assertEqual(self.say(b"AUTH PLAIN\r\n"), b"334 \r\n")
        self.assertEqual(self.say(b"x" * (self.limits.line_length + 1) + b"\r\n"),
                         b"500 5.5.6 Authentication Exchange line is too long, closing connection\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_hello_without_a_name(self) -> None:
        """EHLO or HELO without a host name gets 501 naming the command that was sent."""
        self.assertEqual(self.say(b"HELO\r\n"), b"501 5.5.4 Syntax: HELO hostname\r\n")
        self.assertEqual(self.say(b"EHLO \r\n"), b"501 5.5.4 Syntax: EHLO hostname\r\n")

    def test_auth_spaces_around_initial_response(self) -> None:
        """Spaces after the mechanism or the initial response are no part of the response, as Postfix takes them."""
        self.say(b"EHLO client\r\n")
        self.assertEqual(self.say(b"AUTH PLAIN  " + b64(b"\0bob@example.org\0secret") + b" \r\n"),
                         b"235 2.7.0 Authentication successful\r\n")

    def test_initial_response_too_long(self) -> None:
        """An initial response on the AUTH line is a SASL response too: over the limit, it gets 5.5.6."""
        self.say(b"EHLO client\r\n")
        self.assertEqual(self.say(b"auth PLAIN " + b"x" * self.limits.line_length + b"\r\n"),
                         b"500 5.5.6 Authentication Exchange line is too long, closing connection\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_other_command_too_long(self) -> None:
        """Any other line over the limit gets 5.5.2."""
        self.say(b"EHLO client\r\n")
        self.assertEqual(self.say(b"AUTHX " + b"x" * self.limits.line_length + b"\r\n"),
                         b"500 5.5.2 Line too long, closing connection\r\n")


class TransactionTests(SubmissionTestBase):
    """Mail transactions after AUTH, relayed command by command."""

    def setUp(self) -> None:
        super().setUp()
        self.log_in()

    def test_forged_sender(self) -> None:
        """MAIL FROM an address the user does not own gets 553 5.7.1 and never reaches the MTA."""
        self.assertEqual(self.say(b"MAIL FROM:<alice@example.org>\r\n"),
                         b"553 5.7.1 Sender address rejected: not owned by the authenticated user\r\n")
        self.assertEqual(self.mta_got(), b"")

    def test_null_sender_refused(self) -> None:
        """The null sender is not the user's address, and the refusal says what was refused."""
        self.assertEqual(self.say(b"MAIL FROM:<>\r\n"), b"553 5.7.1 Null sender not accepted: send as your own address\r\n")
        self.assertEqual(self.mta_got(), b"")

    def test_pipelined_transaction(self) -> None:
        """MAIL, RCPTs and DATA in one segment go to the MTA one at a time; replies come back in order."""
        self.front.dataReceived(b"MAIL FROM:<bob@example.org> SIZE=100\r\nRCPT TO:<a@example.org>\r\n"
                                b"RCPT TO:<b@example.org>\r\nDATA\r\n")
        self.assertEqual(self.mta_got(), b"MAIL FROM:<bob@example.org> SIZE=100\r\n")
        self.mta().dataReceived(b"250 2.1.0 Ok\r\n")
        self.assertEqual(self.mta_got(), b"RCPT TO:<a@example.org>\r\n")
        self.mta().dataReceived(b"250 2.1.5 Ok\r\n")
        self.mta().dataReceived(b"250 2.1.5 Ok\r\n")
        self.assertEqual(self.mta_got(), b"RCPT TO:<b@example.org>\r\nDATA\r\n")
        self.mta().dataReceived(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        self.assertEqual(self.read(), b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n"
                                      b"354 End data with <CR><LF>.<CR><LF>\r\n")

    def test_data_streamed_unchanged(self) -> None:
        """Message data reaches the MTA as sent, dot-stuffing included; the MTA's reply is the client's."""
        self.start_data()
        self.front.dataReceived(b"Subject: x\r\n\r\n..dots\r\n")
        self.assertEqual(self.mta_got(), b"Subject: x\r\n\r\n..dots\r\n")
        self.front.dataReceived(b"\xc3\xa4\r")
        self.front.dataReceived(b"\n.")
        self.front.dataReceived(b"\r\nQUIT\r\n")
        self.assertEqual(self.mta_got(), b"\xc3\xa4\r\n.\r\n")
        self.assertEqual(self.read(), b"")  # QUIT waits for the MTA's verdict
        self.mta().dataReceived(b"250 2.0.0 Ok: queued as ABC\r\n")
        self.assertEqual(self.read(), b"250 2.0.0 Ok: queued as ABC\r\n221 2.0.0 Bye\r\n")

    def test_attributes_in_slots(self) -> None:
        """
        After a message, the front end and its MTA session keep their attributes and Twisted's in
        slots: they have no dict.
        """
        self.start_data()
        self.front.dataReceived(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        self.mta().dataReceived(b"250 2.0.0 Ok: queued as ABC\r\n")
        self.assertEqual(self.read(), b"250 2.0.0 Ok: queued as ABC\r\n")
        self.assertEqual(unslotted(self.front), set())
        self.assertEqual(unslotted(self.mta()), set())

    def test_empty_message(self) -> None:
        """A message that is only the terminator ends at once."""
        self.start_data()
        self.front.dataReceived(b".\r\n")
        self.assertEqual(self.mta_got(), b".\r\n")

    def test_oversize_data_never_delivered(self) -> None:
        """
        A message larger than the limit gets 552 5.3.4 after its data, and the MTA connection
        is dropped before the final dot, so nothing is delivered; the next MAIL connects again.
        """
        self.start_data()
        self.front.dataReceived(b"x" * 600 + b"\r\n")
        self.front.dataReceived(b"y" * 600 + b"\r\n.\r\n")
        self.assertTrue(self.mta(0).transport.disconnecting)
        self.assertNotIn(b"\r\n.\r\n", self.mta(0).transport.value())
        self.assertEqual(self.read(), b"552 5.3.4 Message size exceeds fixed maximum message size\r\n")
        self.say(b"MAIL FROM:<bob@example.org>\r\n")
        self.assertEqual(len(self.backend.requests), 2)
        self.assertEqual(self.mta_got(1), b"MAIL FROM:<bob@example.org>\r\n")

    def test_declared_size_too_big(self) -> None:
        """A declared SIZE over the limit is refused at MAIL; a malformed one is a syntax error."""
        self.assertEqual(self.say(b"MAIL FROM:<bob@example.org> SIZE=5000\r\n"),
                         b"552 5.3.4 Message size exceeds fixed maximum message size\r\n")
        self.assertEqual(self.say(b"MAIL FROM:<bob@example.org> SIZE=big\r\n"), b"501 5.5.4 Bad SIZE parameter\r\n")

    def test_unsupported_parameters(self) -> None:
        """DSN parameters and SMTPUTF8 (not offered by this MTA) are refused, not silently dropped."""
        self.assertEqual(self.say(b"MAIL FROM:<bob@example.org> SMTPUTF8\r\n"),
                         b"555 5.5.4 Unsupported parameter SMTPUTF8\r\n")
        self.assertEqual(self.say(b"MAIL FROM:<bob@example.org> RET=HDRS\r\n"), b"555 5.5.4 Unsupported parameter RET\r\n")
        self.say(b"MAIL FROM:<bob@example.org> BODY=8BITMIME\r\n")
        self.assertEqual(self.mta_got(), b"MAIL FROM:<bob@example.org> BODY=8BITMIME\r\n")
        self.mta().dataReceived(b"250 2.1.0 Ok\r\n")
        self.read()
        self.assertEqual(self.say(b"RCPT TO:<a@example.org> NOTIFY=NEVER\r\n"), b"555 5.5.4 Unsupported parameter NOTIFY\r\n")

    def test_too_many_recipients(self) -> None:
        """Recipients beyond the limit get 452 4.5.3."""
        self.say(b"MAIL FROM:<bob@example.org>\r\n")
        self.mta().dataReceived(b"250 2.1.0 Ok\r\n")
        for n in range(3):
            self.say(b"RCPT TO:<r%d@example.org>\r\n" % n)
            self.mta().dataReceived(b"250 2.1.5 Ok\r\n")
        self.read()
        self.assertEqual(self.say(b"RCPT TO:<r4@example.org>\r\n"), b"452 4.5.3 Too many recipients\r\n")

    def test_rcpt_before_mail(self) -> None:
        """RCPT and DATA without MAIL get 503 5.5.1."""
        self.assertEqual(self.say(b"RCPT TO:<a@example.org>\r\n"), b"503 5.5.1 Need MAIL command\r\n")
        self.assertEqual(self.say(b"DATA\r\n"), b"503 5.5.1 Need RCPT command\r\n")

    def test_rset_resets_the_mta(self) -> None:
        """RSET in a transaction resets the MTA's too."""
        self.say(b"MAIL FROM:<bob@example.org>\r\n")
        self.mta().dataReceived(b"250 2.1.0 Ok\r\n")
        self.mta_got()
        self.read()
        self.assertEqual(self.say(b"RSET now\r\n"), b"501 5.5.4 Syntax: RSET\r\n")  # RFC 5321: no argument
        self.assertEqual(self.mta_got(), b"")
        self.assertTrue(self.say(b"RSET  \r\n").endswith(b"250 2.0.0 OK\r\n"))  # trailing spaces: as Postfix
        self.assertEqual(self.mta_got(), b"RSET\r\n")

    def test_mta_lost_mid_transaction(self) -> None:
        """An MTA that goes away while a command waits gives 451 4.4.1; nothing is reported delivered."""
        self.say(b"MAIL FROM:<bob@example.org>\r\n")
        self.mta().connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.read(), b"451 4.4.1 Mail system temporarily unavailable, try again later\r\n")
        self.assertFalse(self.transport.disconnecting)

    def test_transaction_timeout(self) -> None:
        """A transaction that takes longer than the limit is ended with 421."""
        self.say(b"MAIL FROM:<bob@example.org>\r\n")
        self.mta().dataReceived(b"250 2.1.0 Ok\r\n")
        for _ in range(4):
            self.clock.advance(150)
            self.say(b"NOOP\r\n")
        self.assertTrue(self.read().endswith(b"421 4.4.2 Transaction timeout, closing connection\r\n") or
                        self.transport.disconnecting)
        self.assertTrue(self.transport.disconnecting)

    def test_transaction_clock_stops_while_the_mta_answers(self) -> None:
        """
        The time the MTA takes to answer does not count against the client's transaction limit: a
        slow RCPT check is not reported to the client as its own slowness.
        """
        self.say(b"MAIL FROM:<bob@example.org>\r\n")
        self.mta().dataReceived(b"250 2.1.0 Ok\r\n")
        for _ in range(4):  # active, within the idle timeout, for 590 s of the 600
            self.clock.advance(147.5)
            self.say(b"NOOP\r\n")
        self.read()
        self.say(b"RCPT TO:<x@example.org>\r\n")
        self.clock.advance(20)  # the MTA thinks past the client's 600 s
        self.assertEqual(self.read(), b"")
        self.mta().dataReceived(b"250 2.1.5 Ok\r\n")
        self.assertEqual(self.read(), b"250 2.1.5 Ok\r\n")
        self.clock.advance(9.9)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.1)  # the 10 s the client had left
        self.assertEqual(self.read(), b"421 4.4.2 Transaction timeout, closing connection\r\n")

    def test_transaction_clock_due_when_the_mta_is_asked(self) -> None:
        """
        A transaction timer already due but not yet run when a command goes to the MTA (a long
        reactor turn) has no time left: the MTA's reply reaches the client, then the 421.
        """
        call_later = self.clock.callLater

        def as_the_reactor(delay: float, *args: object, **kwargs: object) -> object:
            assert delay >= 0, delay  # the reactor's callLater asserts this; Clock's does not
            return call_later(delay, *args, **kwargs)

        self.patch(self.clock, "callLater", as_the_reactor)
        self.say(b"MAIL FROM:<bob@example.org>\r\n")
        self.mta().dataReceived(b"250 2.1.0 Ok\r\n")
        self.read()
        self.clock.rightNow += 600.5  # past the limit, without running the timers
        self.say(b"RCPT TO:<x@example.org>\r\n")
        self.mta().dataReceived(b"250 2.1.5 Ok\r\n")
        self.assertEqual(self.read(), b"250 2.1.5 Ok\r\n")
        self.clock.advance(0)
        self.assertEqual(self.read(), b"421 4.4.2 Transaction timeout, closing connection\r\n")

    def test_no_transaction_timeout_after_goodbye(self) -> None:
        """A client that said QUIT mid-transaction, its connection still closing, is told nothing more."""
        self.say(b"MAIL FROM:<bob@example.org>\r\n")
        self.mta().dataReceived(b"250 2.1.0 Ok\r\n")
        self.assertEqual(self.say(b"QUIT\r\n"), b"250 2.1.0 Ok\r\n221 2.0.0 Bye\r\n")
        self.clock.advance(600)
        self.assertEqual(self.read(), b"")

    def test_idle_timeout_after_login(self) -> None:
        """A logged-in client silent for the idle timeout is dropped with 421."""
        self.clock.advance(299)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1)
        self.assertEqual(self.read(), b"421 4.4.2 mail.example.org Timeout, closing connection\r\n")

    def test_ehlo_after_login(self) -> None:
        """EHLO after AUTH offers what the MTA relays (8BITMIME here) and no AUTH."""
        ehlo = self.say(b"EHLO client\r\n")
        self.assertTrue(ehlo.endswith(b"250 8BITMIME\r\n"))
        self.assertNotIn(b"AUTH", ehlo)
        self.assertNotIn(b"SMTPUTF8", ehlo)

    def test_commands(self) -> None:
        """
        NOOP answers 250; VRFY and EXPN 252, neither yes nor no (RFC 5321 7.3); HELP is not
        implemented; unknown commands are 500; QUIT closes.
        """
        self.assertEqual(self.say(b"NOOP\r\n"), b"250 2.0.0 OK\r\n")
        cannot = b"252 2.5.0 Cannot VRFY or EXPN, but will accept message and attempt delivery\r\n"
        self.assertEqual(self.say(b"VRFY bob\r\n"), cannot)
        self.assertEqual(self.say(b"EXPN staff\r\n"), cannot)
        self.assertEqual(self.say(b"VRFY\r\n"), b"501 5.5.4 Syntax: VRFY or EXPN takes an argument\r\n")
        self.assertEqual(self.say(b"HELP\r\n"), b"502 5.5.1 Command not implemented\r\n")
        self.assertEqual(self.mta_got(), b"")
        self.assertEqual(self.say(b"FOO\r\n"), b"500 5.5.2 Command unrecognized\r\n")
        self.assertEqual(self.say(b"QUIT\r\n"), b"221 2.0.0 Bye\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_bdat_closes(self) -> None:
        """
        BDAT (CHUNKING is not offered) is refused and the connection closes: its chunk, which
        follows at once, is a message body and must not run as commands (RFC 3030 2).
        """
        chunk = b"RSET\r\nMAIL FROM:<bob@example.org>\r\nRCPT TO:<a@example.org>\r\nDATA\r\n"
        reply = self.say(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
        self.assertEqual(reply, b"554 5.5.1 BDAT is not supported (no CHUNKING), closing connection\r\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.mta_got(), b"")

    def test_too_many_errors(self) -> None:
        """Five consecutive errors close the connection with 421."""
        for _ in range(4):
            self.say(b"FOO\r\n")
        self.assertTrue(self.say(b"FOO\r\n").endswith(b"421 4.7.0 Too many errors, closing connection\r\n"))
        self.assertTrue(self.transport.disconnecting)


class ShutdownTests(SubmissionTestBase):
    """The process stopping: a message under way is seen through to the MTA's verdict, then goodbye."""

    GOODBYE = b"421 4.3.2 mail.example.org Service shutting down, closing connection\r\n"

    def setUp(self) -> None:
        super().setUp()
        self.log_in()

    def test_idle_session(self) -> None:
        """A session between commands is told at once, and closed."""
        self.context.connections.stopService()
        self.assertEqual(self.read(), self.GOODBYE)
        self.assertTrue(self.front.closed)

    def test_verdict_owed(self) -> None:
        """
        A message the MTA has not yet answered: the client hears the verdict, then goodbye. Cut off
        before it, the client would send again a message the MTA may have taken.
        """
        self.start_data()
        self.front.dataReceived(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        self.context.connections.stopService()
        self.assertEqual(self.read(), b"")
        self.assertFalse(self.front.closed)
        self.mta().dataReceived(b"250 2.0.0 Ok: queued as ABC\r\n")
        self.assertEqual(self.read(), b"250 2.0.0 Ok: queued as ABC\r\n" + self.GOODBYE)
        self.assertTrue(self.front.closed)

    def test_message_arriving(self) -> None:
        """A message still arriving is read to its end and handed to the MTA, whose verdict comes first."""
        self.start_data()
        self.front.dataReceived(b"Subject: x\r\n\r\nfirst half ")
        self.context.connections.stopService()
        self.front.dataReceived(b"second half\r\n.\r\n")
        self.assertEqual(self.mta_got(), b"Subject: x\r\n\r\nfirst half second half\r\n.\r\n")
        self.mta().dataReceived(b"250 2.0.0 Ok: queued as DEF\r\n")
        self.assertEqual(self.read(), b"250 2.0.0 Ok: queued as DEF\r\n" + self.GOODBYE)

    def test_data_accepted_after_the_stop_began(self) -> None:
        """A DATA the MTA had not yet answered: its 354 goes through, the message follows, its verdict, then goodbye."""
        self.say(b"MAIL FROM:<bob@example.org>\r\n")
        self.mta().dataReceived(b"250 2.1.0 Ok\r\n")
        self.say(b"RCPT TO:<a@example.org>\r\n")
        self.mta().dataReceived(b"250 2.1.5 Ok\r\n")
        self.read()
        self.say(b"DATA\r\n")
        self.context.connections.stopService()
        self.mta().dataReceived(b"354 go ahead\r\n")
        self.assertEqual(self.read(), b"354 go ahead\r\n")
        self.front.dataReceived(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        self.mta().dataReceived(b"250 2.0.0 Ok: queued as GHI\r\n")
        self.assertEqual(self.read(), b"250 2.0.0 Ok: queued as GHI\r\n" + self.GOODBYE)

    def test_command_owed(self) -> None:
        """A command the MTA has yet to answer is answered, then goodbye."""
        self.say(b"MAIL FROM:<bob@example.org>\r\n")
        self.context.connections.stopService()
        self.mta().dataReceived(b"250 2.1.0 Ok\r\n")
        self.assertEqual(self.read(), b"250 2.1.0 Ok\r\n" + self.GOODBYE)


class SenderPolicyTests(SubmissionTestBase):
    """Senders allowed by the senders file."""

    def test_alias_from_file(self) -> None:
        """An address the senders file grants the user is relayed; matching ignores case."""
        import tempfile
        with tempfile.NamedTemporaryFile("w", suffix=".senders", delete=False) as f:
            f.write("bob@example.org: Bob.Smith@Example.org, @lists.example.net\n")
        self.addCleanup(os.remove, f.name)
        policy = SenderPolicy(f.name)
        self.assertTrue(policy.allowed("bob@example.org", "bob.smith@example.org"))
        self.assertTrue(policy.allowed("bob@example.org", "any@lists.example.net"))
        self.assertFalse(policy.allowed("bob@example.org", "alice@example.org"))
        self.assertFalse(policy.allowed("alice@example.org", "bob.smith@example.org"))


class ReviewFixTests(SubmissionTestBase):
    """Behaviour pinned after an RFC review of the submission relay."""

    def setUp(self) -> None:
        super().setUp()
        self.log_in()

    def assert_smuggling_refused(self, data: bytes) -> None:
        """
        C{data}, sent after the 354, holds a lone dot with a bare line ending: the message is refused, the MTA
        connection is dropped before any terminator, and the client's connection closes without
        reading another command, since where this message ends is ambiguous.
        """
        self.front.dataReceived(data)
        mta = self.mta(0)
        self.assertTrue(mta.transport.disconnecting)
        self.assertNotIn(b"MAIL FROM", mta.transport.value())
        for end in (b"\n.\n", b"\n.\r", b"\r.\r", b"\r.\n"):  # no ambiguous end, whole or in part
            self.assertNotIn(end, mta.transport.value())
        self.assertEqual(self.read(), AMBIGUOUS_END_REFUSAL)
        self.assertTrue(self.transport.disconnecting)
        self.front.dataReceived(b"MAIL FROM:<bob@example.org>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n")
        self.assertEqual(self.read(), b"")
        self.assertEqual(len(self.backend.requests), 1, "a smuggled command reached an MTA")

    def assert_end_refused(self, end: bytes) -> None:
        """The data ends with C{end}, as an MTA may take it, and a transaction in the user's own name follows."""
        self.start_data()
        self.assert_smuggling_refused(b"Subject: hi\r\n\r\nbody" + end + b"MAIL FROM:<bob@example.org>\r\n"
                                      b"RCPT TO:<x@example.org>\r\nDATA\r\nSubject: smuggled\r\n\r\n.\r\n")

    def test_lf_dot_lf_smuggling_refused(self) -> None:
        """LF.LF does not end the data: nothing after it is run."""
        self.assert_end_refused(b"\n.\n")

    def test_crlf_dot_lf_smuggling_refused(self) -> None:
        """Nor does CRLF.LF."""
        self.assert_end_refused(b"\r\n.\n")

    def test_lf_dot_crlf_smuggling_refused(self) -> None:
        """Nor does LF.CRLF."""
        self.assert_end_refused(b"\n.\r\n")

    def test_smuggling_after_an_oversize_refusal(self) -> None:
        """A message already refused (and logged) for its size is not ended at LF.LF either, nor logged again."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.start_data()
        self.front.dataReceived(b"x" * 1200 + b"\r\n")
        self.assert_smuggling_refused(b"\n.\nMAIL FROM:<bob@example.org>\r\n")
        self.assertEqual([e["reason"] for e in events if e["log_format"].startswith("message_refused ")], ["size"])

    def test_cr_dot_smuggling_refused(self) -> None:
        """Nor do CR.CRLF, CRLF.CR or CR.CR, for MTAs that end lines at a bare CR."""
        for end in (b"\r.\r\n", b"\r\n.\rX", b"\r.\r"):
            self.setUp()
            self.assert_end_refused(end)

    def test_lone_dot_at_the_start_refused(self) -> None:
        """The data's first line follows the 354's CRLF: a lone dot there with a bare LF after it is refused."""
        self.start_data()
        self.assert_smuggling_refused(b".\nMAIL FROM:<bob@example.org>\r\n")

    def test_ambiguous_end_across_reads_refused(self) -> None:
        """
        An ambiguous end is found when its bytes come in separate reads, a byte at a time or split
        anywhere, and none of it reaches the MTA: one that ends the data at CRLF.CR would otherwise
        have the whole message when a read stops after the CR.
        """
        for end in (b"\n.\n", b"\r\n.\rX", b"\n.\r\n", b"\r.\r"):
            data = b"Subject: hi\r\n\r\nbody" + end + b"MAIL FROM:<bob@example.org>\r\n"
            for cut in range(len(b"Subject: hi\r\n\r\nbody"), len(data)):
                self.setUp()
                self.start_data()
                self.front.dataReceived(data[:cut])
                self.assert_smuggling_refused(data[cut:])
            self.setUp()
            self.start_data()
            for byte in data[:-1]:
                self.front.dataReceived(bytes([byte]))
            self.assert_smuggling_refused(data[-1:])

    def test_bare_line_endings_pass(self) -> None:
        """
        Lines ending in a bare LF or CR, dot-stuffed ones among them, reach the MTA as they came, as
        Postfix takes them (curl and Python's smtplib send files so); only CRLF.CRLF ends the data.
        """
        body = b"Subject: lf\n\nline one\n..hidden\nx\ry\n.. \n\r\n"
        self.start_data()
        for piece in (body[:20], body[20:31], body[31:], b".\r\n"):
            self.front.dataReceived(piece)
        self.assertEqual(self.mta_got(), body + b".\r\n")
        self.mta().dataReceived(b"250 2.0.0 Ok\r\n")
        self.assertEqual(self.read(), b"250 2.0.0 Ok\r\n")
        self.assertFalse(self.transport.disconnecting)

    def test_crlf_split_across_reads_is_not_bare(self) -> None:
        """A CR at the end of one read and its LF at the start of the next are a proper line end."""
        self.start_data()
        for piece in (b"line one\r", b"\nline two\r", b"\n.\r", b"\n"):
            self.front.dataReceived(piece)
        self.assertEqual(self.mta_got(), b"line one\r\nline two\r\n.\r\n")
        self.mta().dataReceived(b"250 2.0.0 Ok\r\n")
        self.assertEqual(self.read(), b"250 2.0.0 Ok\r\n")

    def test_auth_parameter_accepted_not_relayed(self) -> None:
        """MAIL's AUTH= parameter (sendmail, Exim) is accepted and not passed on to the MTA."""
        self.say(b"MAIL FROM:<bob@example.org> AUTH=<> SIZE=10\r\n")
        self.assertEqual(self.mta_got(), b"MAIL FROM:<bob@example.org> SIZE=10\r\n")
        self.mta().dataReceived(b"250 2.1.0 Ok\r\n")
        self.assertEqual(self.read(), b"250 2.1.0 Ok\r\n")
        self.say(b"RSET\r\n")
        self.mta().dataReceived(b"250 2.0.0 Ok\r\n")
        self.read()
        self.assertEqual(self.say(b"MAIL FROM:<bob@example.org> AUTH=bad\x01\r\n"),
                         b"501 5.5.4 Syntax error in parameters\r\n")
        # xtext may not hide a control character either
        self.assertEqual(self.say(b"MAIL FROM:<bob@example.org> AUTH=a+0Db@example.org\r\n"),
                         b"555 5.5.4 Unsupported parameter AUTH\r\n")

    def test_slow_steady_upload_not_cut(self) -> None:
        """A message that streams for longer than the transaction timeout is not cut while data flows."""
        self.start_data()
        for _ in range(12):
            self.clock.advance(100)
            self.front.dataReceived(b"x" * 10 + b"\r\n")
        self.assertFalse(self.transport.disconnecting)

    def test_slow_mta_is_not_client_idleness(self) -> None:
        """
        While the MTA works on a reply the client's idle timer stops; the MTA's own deadline gives
        451, and the log says what it did not answer: a command, or the end of a message, whose
        fate is then unknown.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.say(b"MAIL FROM:<bob@example.org>\r\n")
        self.clock.advance(299)
        self.assertEqual(self.read(), b"")
        self.mta().dataReceived(b"250 2.1.0 Ok\r\n")
        self.assertEqual(self.read(), b"250 2.1.0 Ok\r\n")
        self.say(b"RCPT TO:<a@example.org>\r\n")
        self.clock.advance(300)
        self.assertEqual(self.read(), b"451 4.4.1 Mail system temporarily unavailable, try again later\r\n")
        self.assertFalse(self.transport.disconnecting)
        self.start_data()
        self.front.dataReceived(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        self.clock.advance(600)
        self.assertEqual(self.read(), b"451 4.4.1 Mail system temporarily unavailable, try again later\r\n")
        self.assertEqual([event["reason"] for event in events if event["log_format"].startswith("backend_unavailable ")],
                         ["the MTA did not answer RCPT within 300 s",
                          "the MTA did not answer the end of the message (it may deliver it still) within 600 s"])

    def test_lost_mta_mid_transaction_is_temporary(self) -> None:
        """After MAIL, a lost MTA makes RCPT a 451, not a 503 from a fresh MTA session."""
        self.say(b"MAIL FROM:<bob@example.org>\r\n")
        self.mta().dataReceived(b"250 2.1.0 Ok\r\n")
        self.read()
        self.mta().connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.say(b"RCPT TO:<a@example.org>\r\n"),
                         b"451 4.4.1 Mail system temporarily unavailable, try again later\r\n")
        self.assertEqual(len(self.backend.requests), 1)

    def test_mta_421_closes_client(self) -> None:
        """An MTA 421 reaches the client, and the client's session closes too."""
        self.say(b"MAIL FROM:<bob@example.org>\r\n")
        self.mta().dataReceived(b"421 4.3.0 shutting down\r\n")
        self.assertEqual(self.read(), b"421 4.3.0 shutting down\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_no_client_timeout_while_mta_takes_the_message(self) -> None:
        """
        While the MTA works on its reply to the final dot (it may take 10 minutes) the client's idle
        timer stops; it runs again from the relayed reply.
        """
        self.start_data()
        self.front.dataReceived(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        self.clock.advance(550)
        self.assertEqual(self.read(), b"")
        self.mta().dataReceived(b"250 2.0.0 Ok: queued\r\n")
        self.assertEqual(self.read(), b"250 2.0.0 Ok: queued\r\n")
        self.clock.advance(299)
        self.assertEqual(self.read(), b"")
        self.clock.advance(1)
        self.assertEqual(self.read(), b"421 4.4.2 mail.example.org Timeout, closing connection\r\n")

    def test_mta_lost_while_its_backpressure_pauses_data(self) -> None:
        """
        An MTA lost while its full send buffer has paused the client mid-message: the client is read
        again, its message ends with 451 4.4.1, and the session goes on over a new MTA connection.
        """
        self.start_data()
        self.front.dataReceived(b"Subject: x\r\n\r\npart one\r\n")
        mta = self.mta()
        reads = mta.transport.producer
        reads.pauseProducing()
        self.assertEqual(self.transport.producerState, "paused")
        # As Twisted does when a connection is lost: stop its producer, then tell its protocol.
        reads.stopProducing()
        mta.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(self.say(b"part two\r\n.\r\n"),
                         b"451 4.4.1 Mail system temporarily unavailable, try again later\r\n")
        self.assertFalse(self.transport.disconnecting)
        self.say(b"MAIL FROM:<bob@example.org>\r\n")
        self.assertEqual(len(self.backend.requests), 2)
        self.assertEqual(self.mta_got(1), b"MAIL FROM:<bob@example.org>\r\n")

    def test_mta_stalled_mid_message(self) -> None:
        """
        An MTA that stops taking the message for the idle timeout: the MTA is blamed, not the client.
        Its connection is dropped, the client is read again, its message ends with 451 4.4.1, and the
        session goes on; a client then silent on its own is still timed out as before.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        mta = self.stall_mid_message()
        self.assertTrue(mta.transport.disconnected)
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual([e["reason"] for e in events if e["log_format"].startswith("message_refused ")],
                         ["backend-stalled"])
        self.assertEqual(self.say(b"part two\r\n.\r\n"),
                         b"451 4.4.1 Mail system temporarily unavailable, try again later\r\n")
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(RULES.idle_timeout)
        self.assertEqual(self.read(), b"421 4.4.2 mail.example.org Timeout, closing connection\r\n")

    def stall_mid_message(self) -> SmtpBackend:
        """An MTA stops taking a message for the idle timeout: nothing is said to the client yet."""
        self.start_data()
        self.front.dataReceived(b"Subject: x\r\n\r\npart one\r\n")
        mta = self.mta()
        mta.transport.producer.pauseProducing()  # as Twisted does when the MTA's send buffer is full
        self.clock.advance(RULES.idle_timeout)
        self.assertEqual(self.read(), b"")
        return mta

    def test_client_silent_after_stall_timed_out(self) -> None:
        """After the MTA was blamed, a client that never ends its message is still timed out."""
        self.stall_mid_message()
        self.clock.advance(RULES.idle_timeout)
        self.assertEqual(self.read(), b"421 4.4.2 mail.example.org Timeout, closing connection\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_stall_forgotten_with_its_mta(self) -> None:
        """
        An MTA connection dropped while it held the client (the message was too big) is not blamed
        for the next message: that client, silent, is timed out.
        """
        self.start_data()
        self.mta().transport.producer.pauseProducing()
        self.front.dataReceived(b"x" * 1200 + b"\r\n.\r\n")
        self.assertEqual(self.read(), b"552 5.3.4 Message size exceeds fixed maximum message size\r\n")
        self.start_data()  # over a new MTA connection
        self.front.dataReceived(b"Subject: y\r\n")
        self.clock.advance(RULES.idle_timeout)
        self.assertEqual(self.read(), b"421 4.4.2 mail.example.org Timeout, closing connection\r\n")

    def test_stall_after_final_dot_not_blamed_later(self) -> None:
        """An MTA that held the client as its message ended, then answered: a client silent after is timed out."""
        self.start_data()
        self.front.dataReceived(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        self.mta().transport.producer.pauseProducing()
        self.mta().dataReceived(b"250 2.0.0 Ok\r\n")
        self.assertEqual(self.read(), b"250 2.0.0 Ok\r\n")
        self.clock.advance(RULES.idle_timeout)
        self.assertEqual(self.read(), b"421 4.4.2 mail.example.org Timeout, closing connection\r\n")

    def test_client_silent_mid_message_timed_out(self) -> None:
        """A client silent mid-message while the MTA takes what it sends is the one timed out."""
        self.start_data()
        self.front.dataReceived(b"Subject: x\r\n\r\npart one\r\n")
        reads = self.mta().transport.producer
        reads.pauseProducing()
        reads.resumeProducing()  # the MTA took it all
        self.clock.advance(RULES.idle_timeout)
        self.assertEqual(self.read(), b"421 4.4.2 mail.example.org Timeout, closing connection\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_mta_421_after_data_closes_client(self) -> None:
        """An MTA 421 to the final dot reaches the client, and the client's session closes too."""
        self.start_data()
        self.front.dataReceived(b"Subject: x\r\n\r\nbody\r\n.\r\nNOOP\r\n")
        self.mta().dataReceived(b"421 4.3.0 shutting down\r\n")
        self.assertEqual(self.read(), b"421 4.3.0 shutting down\r\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue(self.mta().transport.disconnecting)

    def test_message_size_as_sent(self) -> None:
        """
        A message's size is what the client sent after the 354 up to its last CRLF, the terminating
        dot line excluded: it is logged so, and held to the limit so (1000 bytes pass, 1001 do not).
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        for body in (b"", b"x" * 998 + b"\r\n"):
            self.start_data()
            self.front.dataReceived(body + b".\r\n")
            self.mta().dataReceived(b"250 2.0.0 Ok\r\n")
            self.assertEqual(self.read(), b"250 2.0.0 Ok\r\n")
        self.assertEqual([event["size"] for event in events if event["log_format"].startswith("message ")], [0, 1000])
        self.start_data()
        self.front.dataReceived(b"x" * 999 + b"\r\n.\r\n")
        self.assertEqual(self.read(), b"552 5.3.4 Message size exceeds fixed maximum message size\r\n")

    def test_doubled_dots_not_counted(self) -> None:
        """
        The dots that dot-stuffing doubled are not part of the message's size (RFC 1870): a message
        of exactly the limit, 200 lines that begin with a dot, passes however it is cut into reads,
        byte for byte, whether its lines end in CRLF or (all but the last) in a bare LF; one byte
        more does not.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        for message in (b".xx\r\n" * 200, b".xxx\n" * 199 + b".xx\r\n"):  # 1000 bytes, sent as 1200
            stuffed = message.replace(b".", b"..")
            for step in (1, 2, 3, 5, 7, len(stuffed) + 3):
                self.start_data()
                sent = stuffed + b".\r\n"
                for start in range(0, len(sent), step):
                    self.front.dataReceived(sent[start:start + step])
                self.assertEqual(self.mta_got(), sent)
                self.mta().dataReceived(b"250 2.0.0 Ok\r\n")
                self.assertEqual(self.read(), b"250 2.0.0 Ok\r\n")
        self.assertEqual({event["size"] for event in events if event["log_format"].startswith("message ")}, {1000})
        self.start_data()
        self.front.dataReceived(b"x" + stuffed + b".\r\n")
        self.assertEqual(self.read(), b"552 5.3.4 Message size exceeds fixed maximum message size\r\n")

    def test_non_ascii_needs_smtputf8(self) -> None:
        """A look-alike address (U+212A KELVIN SIGN for K) needs SMTPUTF8 and never passes as the user's own."""
        kelvin = "\u212a".encode()
        self.assertEqual(self.say(b"MAIL FROM:<" + kelvin + b"ob@example.org>\r\n"),
                         b"553 5.6.7 Non-ASCII address without SMTPUTF8\r\n")
        self.assertFalse(SenderPolicy(None).allowed("kob@example.org", "\u212aob@example.org"))
        self.assertTrue(SenderPolicy(None).allowed("Bob@Example.org", "bob@example.ORG"))

    def test_refused_recipients_not_counted(self) -> None:
        """
        Recipients the gateway refuses (syntax, a non-ASCII address without SMTPUTF8, a parameter)
        are answered as the MTA's refusals are, without using up the error limit: a pipelined group
        with six of them still has its good recipient and its DATA answered (RFC 2920 3.1).
        """
        bad = (b"RCPT TO:<a b@example.org>\r\n", "RCPT TO:<\u00e4@example.org>\r\n".encode(),
               b"RCPT TO:<a@example.org> NOTIFY=NEVER\r\n") * 2
        self.front.dataReceived(b"MAIL FROM:<bob@example.org>\r\n" + b"".join(bad)
                                + b"RCPT TO:<a@example.org>\r\nDATA\r\n")
        self.mta().dataReceived(b"250 2.1.0 Ok\r\n")
        self.mta().dataReceived(b"250 2.1.5 Ok\r\n")
        self.mta().dataReceived(b"354 go ahead\r\n")
        replies = self.read().splitlines()
        self.assertEqual([reply[:3] for reply in replies], [b"250"] + [b"501", b"553", b"555"] * 2 + [b"250", b"354"])
        self.assertEqual(self.mta_got(), b"MAIL FROM:<bob@example.org>\r\nRCPT TO:<a@example.org>\r\nDATA\r\n")
        self.assertFalse(self.transport.disconnecting)

    def test_refused_senders_counted(self) -> None:
        """A MAIL the gateway refuses is a protocol error, still counted: five in a row close the connection."""
        for _ in range(4):
            self.assertEqual(self.say(b"MAIL FROM:<a b@example.org>\r\n")[:3], b"501")
        self.assertTrue(self.say(b"MAIL FROM:<a b@example.org>\r\n").endswith(
            b"421 4.7.0 Too many errors, closing connection\r\n"))
        self.assertTrue(self.transport.disconnecting)

    def test_pipelined_fallout_not_counted(self) -> None:
        """RCPTs behind a refused MAIL get 503 without using up the error limit (RFC 2920)."""
        reply = self.say(b"MAIL FROM:<alice@example.org>\r\n" + b"RCPT TO:<a@example.org>\r\n" * 6)
        self.assertEqual(reply.count(b"503 5.5.1 Need MAIL command"), 6)
        self.assertFalse(self.transport.disconnecting)


class MtaClosingTests(SubmissionTestBase):
    """
    The MTA connection of a client that goes away is closed after QUIT, and aborted if it has not
    closed within the grace period.
    """

    def setUp(self) -> None:
        super().setUp()
        self.log_in()
        self.mta_transport = self.mta().transport

    def client_lost(self) -> None:
        """The client goes away: the MTA is told QUIT and its connection closed."""
        self.front.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(self.mta_transport.disconnecting)
        self.assertTrue(self.mta_got().endswith(b"QUIT\r\n"))

    def assert_aborted_after_grace(self) -> None:
        """The MTA connection is aborted once the grace period is over, not before."""
        self.clock.advance(CLOSE_GRACE - 0.1)
        # StringTransport marks an abort (and only an abort) as disconnected.
        self.assertFalse(self.mta_transport.disconnected, "aborted before the grace period was over")
        self.clock.advance(0.1)
        self.assertTrue(self.mta_transport.disconnected, "an MTA that never closed was not aborted")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.mta().connectionLost(Failure(ConnectionAborted()))  # as the abort reports it

    def test_stalled_mta_aborted(self) -> None:
        """An MTA that neither answers QUIT nor closes (it stopped reading, or never ends TLS) is aborted."""
        self.client_lost()
        self.assert_aborted_after_grace()

    def test_mta_answering_but_not_closing_aborted(self) -> None:
        """An MTA that answers QUIT but does not close its connection is aborted all the same."""
        self.client_lost()
        self.mta().dataReceived(b"221 2.0.0 Bye\r\n")
        self.assert_aborted_after_grace()

    def assert_closed_in_time(self, answer: bytes) -> None:
        """
        The MTA, having said C{answer} to QUIT, closes its connection within the grace period:
        its abort, pending until then, is cancelled.
        """
        self.client_lost()
        self.mta().dataReceived(answer)
        self.clock.advance(CLOSE_GRACE - 0.1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1, "nothing would abort an MTA that never closed")
        self.assertFalse(self.mta_transport.disconnected)
        self.mta().connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [], "the abort outlived the MTA connection")

    def test_mta_closing_in_time(self) -> None:
        """An MTA that answers QUIT and then closes within the grace period is not aborted, nor timed any more."""
        self.assert_closed_in_time(b"221 2.0.0 Bye\r\n")

    def test_mta_closing_in_time_unanswered(self) -> None:
        """An MTA whose connection closes before its answer to QUIT is read is not aborted, nor timed any more."""
        self.assert_closed_in_time(b"")

    def test_client_lost_mid_message(self) -> None:
        """
        A client gone in the middle of a message: the MTA connection is aborted at once, not sent
        QUIT, which it would read as part of the message; whether or not it had stopped reading.
        """
        self.start_data()
        self.front.dataReceived(b"Subject: x\r\n\r\npartial\r\n.")
        self.mta_transport.producer.pauseProducing()  # as Twisted does when the MTA's send buffer is full
        self.mta_got()
        self.front.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.mta_got(), b"")
        self.assertTrue(self.mta_transport.disconnected)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lost_mta_not_timed(self) -> None:
        """An MTA connection already lost when the client goes is left alone: nothing is sent or timed."""
        self.mta().connectionLost(Failure(ConnectionLost()))
        self.front.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.mta_got(), b"")
        self.assertEqual(self.clock.getDelayedCalls(), [])


class HeloTests(SubmissionTestBase):
    """AUTH is an extension: not after HELO."""

    def test_auth_after_helo(self) -> None:
        """AUTH after HELO (not EHLO) gets 503."""
        self.say(b"HELO client\r\n")
        self.assertEqual(self.say(AUTH_BOB), b"503 5.5.1 Send EHLO first\r\n")

    def assert_login_carries_the_ehlo_name(self) -> None:
        self.say(b"EHLO first.example.net\r\n")
        self.say(b"EHLO  client.example.net \r\n")
        self.assertEqual(self.say(AUTH_BOB), b"235 2.7.0 Authentication successful\r\n")
        self.assertEqual([request.client_helo for request in self.backend.requests], [b"client.example.net"])

    def test_login_carries_the_ehlo_name(self) -> None:
        """The backend login is given the name of the client's last EHLO, without the spaces around it."""
        self.assert_login_carries_the_ehlo_name()

    def test_xclient_login_carries_the_ehlo_name(self) -> None:
        """So is an XCLIENT login."""
        self.backend.settings = replace(BACKEND_SETTINGS, login="xclient")
        self.assert_login_carries_the_ehlo_name()

    def test_master_login_carries_the_ehlo_name(self) -> None:
        """And a login as the relay account (with forward_client_ip, XCLIENT names the client before it)."""
        self.backend.settings = replace(BACKEND_SETTINGS, login="master", master_user="relay",
                                        master_password=b"relaypw", forward_client_ip=True)
        self.assert_login_carries_the_ehlo_name()


class DsnTests(SubmissionTestBase):
    """DSN (RFC 3461), offered and relayed when the MTA offers it."""

    def setUp(self) -> None:
        super().setUp()
        self.backend._make_session = lambda request: logged_in_mta(request, b"DSN")  # type: ignore[attr-defined]
        self.log_in()

    def accepted(self) -> None:
        self.mta().dataReceived(b"250 2.1.0 Ok\r\n")
        self.assertEqual(self.read(), b"250 2.1.0 Ok\r\n")

    def test_offered(self) -> None:
        """EHLO after AUTH offers DSN, as the MTA does."""
        self.assertIn(b"DSN", [line[4:] for line in self.say(b"EHLO client\r\n").split(b"\r\n")])

    def test_parameters_relayed(self) -> None:
        """RET and ENVID on MAIL, NOTIFY and ORCPT on RCPT reach the MTA as they came."""
        self.say(b"MAIL FROM:<bob@example.org> RET=hdrs ENVID=QQ+2B314\r\n")
        self.assertEqual(self.mta_got(), b"MAIL FROM:<bob@example.org> RET=hdrs ENVID=QQ+2B314\r\n")
        self.accepted()
        for rcpt in (b"RCPT TO:<a@example.org> NOTIFY=SUCCESS,failure ORCPT=rfc822;a@example.org",
                     b"RCPT TO:<b@example.org> NOTIFY=NEVER", b"RCPT TO:<c@example.org> ORCPT=UTF-8;c\\x{E9}@example.org"):
            self.say(rcpt + b"\r\n")
            self.assertEqual(self.mta_got(), rcpt + b"\r\n")
            self.accepted()

    def test_malformed_values_refused(self) -> None:
        """
        Values outside RFC 3461's grammar get 501, and are not passed on: a control character
        hidden in xtext, 8-bit bytes but in a "utf-8" ORCPT of an SMTPUTF8 transaction, "+" in one.
        """
        for mail in (b"RET=ALL", b"RET", b"ENVID=" + b"x" * 101, b"ENVID=a+zz", b"ENVID=a+0Db", b"ENVID=\xc3\xa9"):
            self.assertEqual(self.say(b"MAIL FROM:<bob@example.org> " + mail + b"\r\n"),
                             b"501 5.5.4 Bad " + mail.partition(b"=")[0] + b" parameter syntax\r\n")
            self.say(b"NOOP\r\n")  # a refused MAIL counts as an error: six in a row would close
        self.say(b"MAIL FROM:<bob@example.org>\r\n")
        self.mta_got()
        self.accepted()
        for rcpt in (b"NOTIFY=NEVER,SUCCESS", b"NOTIFY=SOMETIMES", b"NOTIFY", b"ORCPT=rfc822", b"ORCPT=;a@b",
                     b"ORCPT=rfc822;j+0D+0AX@example.org", b"ORCPT=rfc822;g\xc3\xa9@example.org",
                     b"ORCPT=utf-8;g\xc3\xa9@example.org", b"ORCPT=utf-8;f+40example.org"):
            self.assertEqual(self.say(b"RCPT TO:<a@example.org> " + rcpt + b"\r\n"),
                             b"501 5.5.4 Bad " + rcpt.partition(b"=")[0] + b" parameter syntax\r\n")
        self.assertEqual(self.mta_got(), b"")

    def test_long_dsn_lines(self) -> None:
        """RCPT lines are 500 octets longer with DSN, MAIL lines 110 (RFC 3461 4): a long ORCPT fits."""
        self.say(b"MAIL FROM:<bob@example.org> ENVID=" + b"e" * 100 + b"\r\n")
        self.assertTrue(self.mta_got().startswith(b"MAIL FROM:"))
        self.accepted()
        rcpt = b"RCPT TO:<" + b"a" * 300 + b"@example.org> NOTIFY=SUCCESS ORCPT=rfc822;" + b"a" * 300 + b"@example.org"
        self.assertGreater(len(rcpt), 512)
        self.say(rcpt + b"\r\n")
        self.assertEqual(self.mta_got(), rcpt + b"\r\n")


class MtaSizeTests(SubmissionTestBase):
    """The MTA's own SIZE lowers the announced and enforced limit."""

    def setUp(self) -> None:
        super().setUp()
        self.backend.announced = (b"SIZE 500", b"8BITMIME")

    def test_smaller_mta_size(self) -> None:
        """EHLO announces the smaller of the configured and the MTA's SIZE, and MAIL enforces it."""
        self.assertIn(b"250-SIZE 500\r\n", self.say(b"EHLO client\r\n"))


class TLSBufferTests(SubmissionTestBase):
    """A message through a real TLS layer (in memory) leaves no grown buffers in the idle session."""

    def front_end(self, context):  # type: ignore[no-untyped-def,override]
        return SubmissionFrontEnd(context, replace(RULES, max_message_size=1_000_000), SenderPolicy(None))

    def test_buffers_given_back_after_message(self) -> None:
        """Once the MTA has taken a 64 KiB message, the client's TLS layer has fresh buffers."""
        directory = tempfile.mkdtemp(prefix="test_submission-")
        self.addCleanup(shutil.rmtree, directory)
        ca = TestCA(directory)
        issued = ca.issue()
        front = FrontEndFactory(self.front_end, self.context).buildProtocol(None)
        pair = tls_pair(issued.chain_path, issued.key_path, ca.ca_path, server_protocol=front)
        self.addCleanup(front.connectionLost, Failure(ConnectionLost()))

        def client_says(data: bytes) -> bytes:
            TLSMemoryBIOProtocol.write(pair.collector.transport, data)  # type: ignore[arg-type]
            pair.pump.flush()
            received, pair.collector.received = pair.collector.received, b""
            return received

        pair.pump.flush()  # the greeting
        pair.collector.received = b""
        client_says(b"EHLO client.example.org\r\n")
        self.assertEqual(client_says(AUTH_BOB), b"235 2.7.0 Authentication successful\r\n")
        client_says(b"MAIL FROM:<bob@example.org>\r\n")
        self.mta().dataReceived(b"250 2.1.0 Ok\r\n")
        client_says(b"RCPT TO:<a@example.org>\r\n")
        self.mta().dataReceived(b"250 2.1.5 Ok\r\n")
        client_says(b"DATA\r\n")
        self.mta().dataReceived(b"354 go ahead\r\n")
        client_says(b"Subject: big\r\n\r\n" + (b"x" * 1022 + b"\r\n") * 64 + b".\r\n")
        grown = memory_bios(pair.server)
        self.mta().dataReceived(b"250 2.0.0 Ok: queued\r\n")
        self.assertNotEqual(memory_bios(pair.server), grown, "the buffers the message grew were kept")
        self.assertEqual(client_says(b""), b"250 2.0.0 Ok: queued\r\n")
        self.assertEqual(client_says(b"NOOP\r\n"), b"250 2.0.0 OK\r\n", "the session goes on over the fresh buffers")
