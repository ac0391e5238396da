"""Transcript tests of the IMAP front end with StringTransport and Clock."""

from __future__ import annotations

from frontend_harness import PASSWORD, TLS_OPTIONS, FrontEndTestBase, b64, unslotted
from twisted.internet.error import ConnectionDone

import gc
import ipaddress
import weakref
from dataclasses import replace

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred

from gateway.connection_limits import ConnectionRules
from gateway.gatekeeper import LocalGatekeeper
from gateway.penalties import PenaltyRules
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from gateway.backend import BackendRefused, BackendUnavailable, ClientAddress
from gateway.frontend import FrontEndFactory
from gateway.imap import ImapFrontEnd
from gateway.testing.gateway import SESSION_NAME
from gateway.proxy_protocol import TrustedProxyFactory
from gateway.relay import CLOSE_GRACE

class ImapTestBase(FrontEndTestBase):
    """An IMAP front end with a memory backend that announces a few capabilities."""

    front_end = ImapFrontEnd
    protocol = "imap"
    backend_capabilities = (b"IMAP4rev1", b"STARTTLS", b"AUTH=PLAIN", b"IDLE", b"LOGINDISABLED", b"COMPRESS=DEFLATE")

    def log_in(self) -> bytes:
        return self.say(b"a1 LOGIN bob secret\r\n")


class PlainListenerTests(ImapTestBase):
    """The STARTTLS listener before TLS."""

    implicit_tls = False

    def test_greeting_announces_starttls_and_logindisabled(self) -> None:
        """The greeting carries CAPABILITY with STARTTLS and LOGINDISABLED and no AUTH=."""
        self.assertTrue(self.greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 "))
        self.assertIn(b" STARTTLS LOGINDISABLED]", self.greeting)
        self.assertNotIn(b"AUTH=", self.greeting)

    def test_capability_before_tls(self) -> None:
        """CAPABILITY before TLS lists STARTTLS and LOGINDISABLED and no AUTH=."""
        reply = self.say(b"c1 CAPABILITY\r\n")
        self.assertEqual(reply, b"* CAPABILITY IMAP4rev1 SASL-IR LITERAL- ID STARTTLS LOGINDISABLED\r\n"
                                b"c1 OK Capability completed.\r\n")

    def test_login_before_starttls_refused(self) -> None:
        """LOGIN before STARTTLS is refused with NO [PRIVACYREQUIRED] and nothing is checked."""
        reply = self.say(b"a1 LOGIN bob secret\r\n")
        self.assertTrue(reply.startswith(b"a1 NO [PRIVACYREQUIRED] "))
        self.assertEqual(self.auth.checked, [])
        self.assertEqual(self.backend.requests, [])

    def test_authenticate_before_starttls_refused(self) -> None:
        """AUTHENTICATE before STARTTLS is refused with NO [PRIVACYREQUIRED], even with SASL-IR."""
        reply = self.say(b"a1 AUTHENTICATE PLAIN " + b64(b"\0bob\0secret") + b"\r\n")
        self.assertTrue(reply.startswith(b"a1 NO [PRIVACYREQUIRED] "))
        self.assertEqual(self.auth.checked, [])

    def test_login_literal_before_starttls_not_asked_for(self) -> None:
        """
        LOGIN or AUTHENTICATE with a synchronizing literal before STARTTLS is refused at once:
        no continuation asks the client to send credentials in clear.
        """
        for tag, command in ((b"a1", b"LOGIN bob {6}"), (b"a2", b"LOGIN {3}"), (b"a3", b"AUTHENTICATE PLAIN {16}"),
                             (b"a4", b"login bob {6}")):
            reply = self.say(tag + b" " + command + b"\r\n")
            self.assertTrue(reply.startswith(tag + b" NO [PRIVACYREQUIRED] "), reply)
            self.assertEqual(self.say(b"n NOOP\r\n"), b"n OK NOOP completed.\r\n")  # a new command, not a literal
        # After a non-synchronizing literal, the next synchronizing one is refused the same way.
        reply = self.say(b"a5 LOGIN {3+}\r\nbob {6}\r\n")
        self.assertTrue(reply.startswith(b"a5 NO [PRIVACYREQUIRED] "), reply)
        self.assertEqual(self.auth.checked, [])

    def test_literal_of_unknown_command_not_asked_for(self) -> None:
        """A command that does not exist before login gets its BAD instead of a continuation."""
        self.assertEqual(self.say(b"a1 SELECT {5}\r\n"), b"a1 BAD Unknown command or not allowed before login.\r\n")
        self.assertEqual(self.say(b"a2 NOOP\r\n"), b"a2 OK NOOP completed.\r\n")

    def test_literal_of_invalid_tag_not_asked_for(self) -> None:
        """
        A command with an invalid tag can never run: its literal, which may be a password, is not
        asked for in clear; the untagged BAD comes at once, and the next line is a new command.
        """
        for line in (b"a+1 LOGIN bob {6}\r\n", "\u00e41 AUTHENTICATE PLAIN {24}\r\n".encode()):
            self.assertEqual(self.say(line), b"* BAD Invalid tag\r\n")
            self.assertEqual(self.say(b"n NOOP\r\n"), b"n OK NOOP completed.\r\n")
        self.assertEqual(self.auth.checked, [])

    def test_literal_of_allowed_command_asked_for(self) -> None:
        """ID may take a literal before TLS: the continuation is sent, and the command runs."""
        self.assertEqual(self.say(b'a1 ID ("name" {4}\r\n'), b"+ Ready for literal data.\r\n")
        self.assertEqual(self.say(b"mutt)\r\n"), b'* ID ("name" "mailgateway")\r\na1 OK ID completed.\r\n')

    def test_starttls_discards_pipelined_commands(self) -> None:
        """Commands pipelined after STARTTLS in the same segment are discarded, never run."""
        reply = self.say(b"a1 STARTTLS\r\nb1 LOGIN bob secret\r\nb2 NOOP\r\n")
        self.assertEqual(reply, b"a1 OK Begin TLS negotiation now.\r\n")
        self.assertIs(self.transport.tls_options, TLS_OPTIONS)
        self.assertEqual(self.auth.checked, [])
        self.assertEqual(self.say(b"c1 NOOP\r\n"), b"c1 OK NOOP completed.\r\n")

    def test_after_starttls(self) -> None:
        """After STARTTLS the capabilities offer AUTH= and not STARTTLS, and login works."""
        self.say(b"a1 STARTTLS\r\n")
        caps = self.say(b"a2 CAPABILITY\r\n")
        self.assertIn(b"AUTH=PLAIN AUTH=LOGIN", caps)
        self.assertNotIn(b"STARTTLS", caps)
        self.assertNotIn(b"LOGINDISABLED", caps)
        self.assertTrue(self.say(b"a3 LOGIN bob secret\r\n").startswith(b"a3 OK "))

    def test_second_starttls_refused(self) -> None:
        """STARTTLS once TLS is active is a BAD."""
        self.say(b"a1 STARTTLS\r\n")
        self.assertEqual(self.say(b"a2 STARTTLS\r\n"), b"a2 BAD TLS is already active.\r\n")

    def test_starttls_with_arguments(self) -> None:
        """STARTTLS with an argument is a BAD and TLS does not start."""
        self.assertTrue(self.say(b"a1 STARTTLS now\r\n").startswith(b"a1 BAD "))
        self.assertIsNone(self.transport.tls_options)


class SmallLiteralLimitTests(ImapTestBase):
    """A literal limit below 4096 bytes: LITERAL- is not offered, since it would allow that much."""

    limits = replace(ImapTestBase.limits, literal_size=1024)

    def test_no_literal_minus(self) -> None:
        """The greeting offers no non-synchronizing literals; a synchronizing one past the limit gets BAD."""
        self.assertEqual(self.greeting, b"* OK [CAPABILITY IMAP4rev1 SASL-IR ID AUTH=PLAIN AUTH=LOGIN] "
                                        b"Mail gateway ready.\r\n")
        self.assertEqual(self.say(b"a1 LOGIN {2000}\r\n"), b"a1 BAD [TOOBIG] Literal too large.\r\n")


class ImplicitTLSTests(ImapTestBase):
    """The IMAPS listener: the connection is secure from the start."""

    def test_freed_without_collector(self) -> None:
        """A closed connection is freed at once, not at the cycle collector's next run."""
        self.assert_freed_without_collector(b"a1 CAPABILITY\r\n")

    def test_greeting_offers_auth(self) -> None:
        """The greeting offers AUTH=PLAIN and AUTH=LOGIN and neither STARTTLS nor LOGINDISABLED."""
        self.assertEqual(self.greeting, b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL- ID AUTH=PLAIN AUTH=LOGIN] "
                                        b"Mail gateway ready.\r\n")

    def test_backend_enable_and_idle_offered(self) -> None:
        """
        The backend's ENABLE and IDLE are offered before login when it announced them, as Dovecot
        offers them: Python's imaplib refuses enable() (and from 3.14 idle()) unless the list it
        got before login had them. Nothing else of the backend's is.
        """
        self.backend.announced = (b"IMAP4rev1", b"SASL-IR", b"LOGIN-REFERRALS", b"ID", b"enable", b"IDLE",
                                  b"LITERAL+", b"STARTTLS", b"AUTH=PLAIN", b"AUTH=CRAM-MD5")
        self.assertEqual(self.say(b"a1 CAPABILITY\r\n"),
                         b"* CAPABILITY IMAP4rev1 SASL-IR LITERAL- ID ENABLE IDLE AUTH=PLAIN AUTH=LOGIN\r\n"
                         b"a1 OK Capability completed.\r\n")
        self.backend.announced = (b"IMAP4rev1", b"IDLE")
        self.assertEqual(self.say(b"a2 CAPABILITY\r\n"),
                         b"* CAPABILITY IMAP4rev1 SASL-IR LITERAL- ID IDLE AUTH=PLAIN AUTH=LOGIN\r\n"
                         b"a2 OK Capability completed.\r\n")

    def test_http_method_as_tag(self) -> None:
        """GET and POST are valid IMAP tags: only a browser's whole request line closes the connection."""
        self.assertEqual(self.say(b"GET NOOP\r\n"), b"GET OK NOOP completed.\r\n")
        self.assertEqual(self.say(b"POST CAPABILITY\r\n")[-31:], b"POST OK Capability completed.\r\n")
        self.assertEqual(self.say(b"GET /index.html HTTP/1.1\r\n"), b"")
        self.assertTrue(self.transport.disconnecting)

    def test_starttls_refused(self) -> None:
        """STARTTLS on the implicit-TLS listener is a BAD."""
        self.assertEqual(self.say(b"a1 STARTTLS\r\n"), b"a1 BAD TLS is already active.\r\n")

    def test_noop_and_logout(self) -> None:
        """NOOP answers OK; LOGOUT answers BYE and OK and closes the connection."""
        self.assertEqual(self.say(b"a NOOP\r\n"), b"a OK NOOP completed.\r\n")
        self.assertEqual(self.say(b"b LOGOUT\r\n"), b"* BYE Logging out.\r\nb OK Logout completed.\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_close_keeps_reading_then_aborts(self) -> None:
        """
        After LOGOUT the connection keeps reading, since a TLS close waits for the client's
        close_notify; a client that never finishes closing is aborted after the grace period.
        """
        self.say(b"b LOGOUT\r\n")
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(self.say(b"c NOOP\r\n"), b"")  # nothing more is answered
        self.clock.advance(9.9)
        self.assertFalse(self.transport.disconnected)  # StringTransport marks an abort so
        self.clock.advance(0.1)
        self.assertTrue(self.transport.disconnected)

    def test_id(self) -> None:
        """ID with a field list or NIL answers with the gateway's own ID."""
        reply = self.say(b'a ID ("name" "Thunderbird" "version" "115.0")\r\n')
        self.assertEqual(reply, b'* ID ("name" "mailgateway")\r\na OK ID completed.\r\n')
        self.assertTrue(self.say(b"b ID NIL\r\n").endswith(b"b OK ID completed.\r\n"))

    def test_bad_id(self) -> None:
        """ID with an odd number of fields is a BAD."""
        self.assertEqual(self.say(b'a ID ("name")\r\n'), b"a BAD Invalid ID parameters.\r\n")

    def test_attributes_in_slots(self) -> None:
        """
        A relaying session's front end keeps its attributes and Twisted's in slots: it has no
        dict. Nor does it keep the login's spent Deferred.
        """
        self.log_in()
        self.front.dataReceived(b"a2 SELECT INBOX\r\n")
        self.assertEqual(unslotted(self.front), set())
        self.assertEqual([each for each in gc.get_referents(self.front) if isinstance(each, Deferred)], [])

    def test_login_relays(self) -> None:
        """
        A good LOGIN gets a tagged OK with the backend's capabilities minus STARTTLS,
        LOGINDISABLED and AUTH=, and the backend session receives the commands that follow.
        """
        reply = self.log_in()
        self.assertEqual(reply, b"a1 OK [CAPABILITY IMAP4rev1 IDLE COMPRESS=DEFLATE] Logged in.\r\n")
        [request] = self.backend.requests
        self.assertEqual((request.user, request.password), ("bob", b"secret"))
        self.assertEqual(request.client, ClientAddress("192.168.1.1", 54321, "10.0.0.1", 12345,
                                                       request.client.session))
        self.assertRegex(request.client.session, f"^{SESSION_NAME}$")
        self.front.dataReceived(b"a2 SELECT INBOX\r\n")
        backend_transport = self.backend.sessions[0].transport
        self.assertEqual(backend_transport.value(), b"a2 SELECT INBOX\r\n")

    def test_backend_alerts_before_ok(self) -> None:
        """The backend's ALERTs from the login reach the client before the tagged OK, once."""
        self.backend.notices = (b"* OK [ALERT] Password expires in 3 days\r\n",)
        self.assertEqual(self.log_in(), b"* OK [ALERT] Password expires in 3 days\r\n"
                                        b"a1 OK [CAPABILITY IMAP4rev1 IDLE COMPRESS=DEFLATE] Logged in.\r\n")
        self.assertEqual(self.backend.sessions[0].notices, ())

    def test_empty_user_never_speaks_for_the_gateway(self) -> None:
        """
        With a master login, an empty user name never reaches the backend, even if the users
        file let it pass: the master account, with no one to act for, would log in as itself.
        """
        self.backend.settings = replace(self.backend.settings, login="master", master_user="master",
                                        master_password=b"master-secret")
        self.auth.passwords[""] = b"pw"
        self.front.dataReceived(b'a1 LOGIN "" pw\r\n')
        self.clock.advance(2)
        self.assertEqual(self.read(), b"a1 NO [UNAVAILABLE] Service temporarily unavailable, try again later.\r\n")
        self.assertEqual(self.backend.requests, [])

    def test_pipelined_after_login_goes_to_backend(self) -> None:
        """Commands pipelined after LOGIN go to the backend, after the tagged OK."""
        reply = self.say(b"a1 LOGIN bob secret\r\na2 SELECT INBOX\r\na3 IDLE\r\n")
        self.assertTrue(reply.startswith(b"a1 OK "))
        self.assertEqual(self.backend.sessions[0].transport.value(), b"a2 SELECT INBOX\r\na3 IDLE\r\n")

    def test_backend_bytes_reach_client(self) -> None:
        """What the backend sends after login reaches the client unchanged, literals and all."""
        self.log_in()
        message = b"* 1 FETCH (BODY[] {7}\r\nx\0y\r\n\xff)\r\n"
        self.backend.sessions[0].dataReceived(message)
        self.assertEqual(self.read(), message)

    def test_relay_backpressure(self) -> None:
        """After login each transport pauses and resumes the other's reading, as a streaming producer."""
        self.log_in()
        backend_transport = self.backend.sessions[0].transport
        self.assertTrue(self.transport.streaming)
        self.assertTrue(backend_transport.streaming)
        backend_transport.producer.pauseProducing()
        self.assertEqual(self.transport.producerState, "paused")
        self.transport.producer.pauseProducing()
        self.assertEqual(backend_transport.producerState, "paused")
        backend_transport.producer.resumeProducing()
        self.assertEqual(self.transport.producerState, "producing")

    def test_backend_close_closes_client(self) -> None:
        """When the backend closes, the client connection is closed after its buffer is flushed."""
        self.log_in()
        self.backend.sessions[0].connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.transport.disconnecting)

    def test_client_close_closes_backend(self) -> None:
        """When the client goes away, the backend connection is closed."""
        self.log_in()
        self.front.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.backend.sessions[0].transport.disconnecting)

    def test_login_quoted_and_literals(self) -> None:
        """LOGIN takes quoted strings and both kinds of literal; a password with spaces and quotes works."""
        reply = self.say(b"a1 LOGIN {5}\r\n")
        self.assertEqual(reply, b"+ Ready for literal data.\r\n")
        reply = self.say(b"alice {%d+}\r\n" % len(PASSWORD) + PASSWORD + b"\r\n")
        self.assertTrue(reply.startswith(b"a1 OK "), reply)
        self.assertEqual(self.backend.requests[0].password, PASSWORD)

    def test_login_quoted(self) -> None:
        """LOGIN takes a quoted password with escaped quotes and backslashes."""
        reply = self.say(b'a1 LOGIN "alice" "p4ss \\"w rd\\\\"\r\n')
        self.assertTrue(reply.startswith(b"a1 OK "), reply)

    def test_literal_split_across_segments(self) -> None:
        """A literal may arrive a byte at a time."""
        self.say(b"a1 LOGIN bob {6}\r\n")
        for byte in b"secret\r\n":
            self.front.dataReceived(bytes([byte]))
        self.assertTrue(self.read().startswith(b"a1 OK "))

    def test_wrong_password_paced(self) -> None:
        """A wrong password gets NO [AUTHENTICATIONFAILED] only after the failure delay."""
        self.assertEqual(self.say(b"a1 LOGIN bob wrong\r\n"), b"")
        self.clock.advance(1.9)
        self.assertEqual(self.read(), b"")
        self.clock.advance(0.1)
        self.assertEqual(self.read(), b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
        self.assertEqual(self.backend.requests, [])

    def test_unknown_user_same_as_wrong_password(self) -> None:
        """An unknown user gets the same reply at the same time as a wrong password."""
        replies = []
        for line in (b"a1 LOGIN nobody secret\r\n", b"a2 LOGIN bob wrong\r\n"):
            self.front.dataReceived(line)
            self.clock.advance(1.999)
            self.assertEqual(self.read(), b"")
            self.clock.advance(0.001)
            replies.append(self.read()[3:])
        self.assertEqual(replies[0], replies[1])

    def test_login_names_refused_as_sasl_refuses_them(self) -> None:
        """
        A user name that is not UTF-8 or holds a control character is refused with BAD as
        AUTHENTICATE refuses it: no hash is computed, no backend asked. (An empty name or password
        is a wrong one: NO after the failure pause, as Dovecot answers it.)
        """
        for n, line in enumerate((b"LOGIN {7}\r\nal\r\nice secret", b"LOGIN {3}\r\nb\xe9b secret",
                                  b'LOGIN "al\x1bice" secret', b"LOGIN {5}\r\nbob\xc2\x85 secret")):
            reply = self.say(b"a%d " % n + line + b"\r\n")
            self.assertTrue(reply.endswith(b"a%d BAD LOGIN expects a user name and a password.\r\n" % n), reply)
            self.say(b"b NOOP\r\n")  # keeps the error count low
        self.assertEqual(self.auth.checked, [])
        self.assertEqual(self.backend.requests, [])
        self.assertTrue(self.say(b"c LOGIN bob secret\r\n").startswith(b"c OK "))

    def test_unquoted_wildcards_in_user_name(self) -> None:
        """
        A user name with "%" or "*", unquoted as Python's imaplib sends it, logs in like any
        other (Dovecot reads it so), rather than being refused as bad syntax.
        """
        self.auth.passwords["bob%example.org*admin"] = b"secret"
        reply = self.say(b"a1 LOGIN bob%example.org*admin secret\r\n")
        self.assertTrue(reply.startswith(b"a1 OK "), reply)
        self.assertEqual(self.backend.requests[0].user, "bob%example.org*admin")

    def test_commands_wait_during_login(self) -> None:
        """Commands pipelined behind a failing LOGIN run after its reply, in order."""
        self.front.dataReceived(b"a1 LOGIN bob wrong\r\na2 NOOP\r\n")
        self.assertEqual(self.read(), b"")
        self.clock.advance(2)
        self.assertEqual(self.read(), b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\na2 OK NOOP completed.\r\n")

    def test_login_attempts_limited(self) -> None:
        """After the allowed number of failed logins the connection is closed with BYE."""
        for n in range(3):
            self.front.dataReceived(b"a%d LOGIN bob wrong\r\n" % n)
            self.clock.advance(2)
        self.assertTrue(self.read().endswith(b"a2 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
                                             b"* BYE Too many failed login attempts.\r\n"))
        self.assertTrue(self.transport.disconnecting)

    def test_backend_unavailable(self) -> None:
        """A backend that is down gives NO [UNAVAILABLE], not an authentication failure."""
        self.backend.error = BackendUnavailable("connection refused")
        self.assertEqual(self.log_in(),
                         b"a1 NO [UNAVAILABLE] Service temporarily unavailable, try again later.\r\n")
        self.backend.error = None
        self.assertTrue(self.say(b"a2 LOGIN bob secret\r\n").startswith(b"a2 OK "))

    def test_backend_refuses_session(self) -> None:
        """A backend that refuses the session (NO [LIMIT]) is unavailable to the client, which clients know as temporary."""
        self.backend.error = BackendRefused(b"NO [LIMIT]")
        self.assertEqual(self.log_in(), b"a1 NO [UNAVAILABLE] Service temporarily unavailable, try again later.\r\n")

    def test_backend_rejects_after_local_success(self) -> None:
        """With a local database, a backend that refuses the login makes it NO [UNAVAILABLE]."""
        self.backend.passwords = {}
        self.assertTrue(self.log_in().startswith(b"a1 NO [UNAVAILABLE] "))

    def test_backend_decides(self) -> None:
        """In backend auth mode a backend refusal is an authentication failure, after the delay."""
        self.auth.backend_decides = True
        self.backend.passwords = {"bob": b"secret"}
        self.assertEqual(self.say(b"a1 LOGIN bob wrong\r\n"), b"")
        self.clock.advance(2)
        self.assertEqual(self.read(), b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
        self.assertTrue(self.say(b"a2 LOGIN bob secret\r\n").startswith(b"a2 OK "))

    def test_client_leaves_during_login(self) -> None:
        """A client that disconnects while its backend login runs cancels it; nothing is left behind."""
        self.backend.hold = True
        self.log_in()
        self.front.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.backend.cancelled, 1)

    def test_reads_on_during_login(self) -> None:
        """
        A login in flight keeps the client read, so that a hang-up is noticed and cancels it, until
        a line's worth of what the client pipelined is buffered; that then goes to the backend.
        """
        self.backend.hold = True
        self.assertEqual(self.say(b"a1 LOGIN bob secret\r\na2 SELECT INBOX\r\n"), b"")
        self.assertEqual(self.transport.producerState, "producing")
        filler = b"a3 NOOP " + b"x" * (self.limits.line_length - 10) + b"\r\n"
        self.front.dataReceived(filler)
        self.assertEqual(self.transport.producerState, "paused")
        self.backend.held[0].callback(self.backend.session(self.backend.requests[0]))
        self.assertTrue(self.read().startswith(b"a1 OK "))
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(self.backend.sessions[0].transport.value(), b"a2 SELECT INBOX\r\n" + filler)

    def test_reads_ahead_only_a_line(self) -> None:
        """A login that arrives with more than a line's worth pipelined behind it pauses the client at once."""
        self.backend.hold = True
        self.front.dataReceived(b"a1 LOGIN bob secret\r\na2 NOOP " + b"x" * self.limits.line_length + b"\r\n")
        self.assertEqual(self.transport.producerState, "paused")

    def test_backend_decides_login_not_read_ahead(self) -> None:
        """
        Where the backend decides, a login runs on to its answer: the client is not read meanwhile,
        since a hang-up would cut it short and count even a right password as a failure.
        """
        self.auth.backend_decides = True
        self.backend.hold = True
        self.front.dataReceived(b"a1 LOGIN bob secret\r\n")
        self.assertEqual(self.transport.producerState, "paused")

    def test_authenticate_plain_sasl_ir(self) -> None:
        """AUTHENTICATE PLAIN with an initial response logs in."""
        reply = self.say(b"a1 AUTHENTICATE PLAIN " + b64(b"\0alice\0" + PASSWORD) + b"\r\n")
        self.assertTrue(reply.startswith(b"a1 OK "), reply)

    def test_authenticate_plain_two_steps(self) -> None:
        """AUTHENTICATE PLAIN without an initial response asks with an empty challenge."""
        self.assertEqual(self.say(b"a1 AUTHENTICATE PLAIN\r\n"), b"+ \r\n")
        self.assertTrue(self.say(b64(b"bob\0bob\0secret") + b"\r\n").startswith(b"a1 OK "))

    def test_authenticate_login(self) -> None:
        """AUTHENTICATE LOGIN asks for the user name and the password."""
        self.assertEqual(self.say(b"a1 AUTHENTICATE LOGIN\r\n"), b"+ " + b64(b"Username:") + b"\r\n")
        self.assertEqual(self.say(b64(b"bob") + b"\r\n"), b"+ " + b64(b"Password:") + b"\r\n")
        self.assertTrue(self.say(b64(b"secret") + b"\r\n").startswith(b"a1 OK "))

    def test_authenticate_cancel(self) -> None:
        """A "*" response cancels AUTHENTICATE with a tagged BAD."""
        self.say(b"a1 AUTHENTICATE PLAIN\r\n")
        self.assertEqual(self.say(b"*\r\n"), b"a1 BAD Authentication cancelled.\r\n")
        self.assertEqual(self.say(b"a2 NOOP\r\n"), b"a2 OK NOOP completed.\r\n")

    def test_authenticate_bad_base64(self) -> None:
        """A response that is not base64 ends AUTHENTICATE with a tagged BAD."""
        self.say(b"a1 AUTHENTICATE PLAIN\r\n")
        self.assertEqual(self.say(b"not base64!\r\n"), b"a1 BAD Invalid SASL response.\r\n")

    def test_authenticate_not_plain_message(self) -> None:
        """
        A response that decodes but is no PLAIN message fails the authentication with NO, as
        Dovecot fails it (RFC 9051 keeps BAD for what does not decode), at once: nothing is checked.
        """
        for response in (b"=", b64(b"bob"), b64(b"\0bob\0sec\0ret")):
            self.assertEqual(self.say(b"a1 AUTHENTICATE PLAIN " + response + b"\r\n"),
                             b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
        self.assertEqual(self.say(b"a2 AUTHENTICATE PLAIN\r\n"), b"+ \r\n")
        self.assertEqual(self.say(b"\r\n"), b"a2 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
        self.assertEqual(self.backend.requests, [])

    def test_authenticate_login_empty_initial_response(self) -> None:
        """AUTHENTICATE LOGIN = gives an empty user name and prompts for the password, as Dovecot does."""
        self.assertEqual(self.say(b"a1 AUTHENTICATE LOGIN =\r\n"), b"+ " + b64(b"Password:") + b"\r\n")

    def test_authenticate_empty_password_is_wrong(self) -> None:
        """An empty password in PLAIN or LOGIN is a wrong one, as in LOGIN: NO after the failure pause."""
        for tag, lines in ((b"a1", [b"a1 AUTHENTICATE PLAIN " + b64(b"\0bob\0") + b"\r\n"]),
                           (b"a2", [b"a2 AUTHENTICATE LOGIN " + b64(b"bob") + b"\r\n", b"=\r\n"])):
            for line in lines:
                self.front.dataReceived(line)
            self.read()
            self.clock.advance(1.9)
            self.assertEqual(self.read(), b"")
            self.clock.advance(0.1)
            self.assertEqual(self.read(), tag + b" NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
        self.assertEqual(self.backend.requests, [])

    def test_authenticate_unknown_mechanism(self) -> None:
        """An unsupported mechanism is a NO."""
        self.assertEqual(self.say(b"a1 AUTHENTICATE CRAM-MD5\r\n"), b"a1 NO Unsupported authentication mechanism.\r\n")

    def test_authzid_for_another_user_refused(self) -> None:
        """PLAIN with an authorization identity other than the user is a failed login."""
        self.say(b"a1 AUTHENTICATE PLAIN " + b64(b"alice\0bob\0secret") + b"\r\n")
        self.clock.advance(2)
        self.assertEqual(self.read(), b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
        self.assertEqual(self.backend.requests, [])

    def test_unknown_command(self) -> None:
        """Commands other than the pre-login ones are a tagged BAD."""
        self.assertEqual(self.say(b"a1 SELECT INBOX\r\n"), b"a1 BAD Unknown command or not allowed before login.\r\n")

    def test_malformed_tag(self) -> None:
        """A line without a valid tag gets an untagged BAD."""
        self.assertTrue(self.say(b"+ NOOP\r\n").startswith(b"* BAD "))
        self.assertTrue(self.say(b"a*1 NOOP\r\n").startswith(b"* BAD "))

    def test_nul_refused(self) -> None:
        """A NUL byte in a command is a BAD."""
        self.assertTrue(self.say(b"a1 LOGIN bob se\0cret\r\n").startswith(b"a1 BAD "))

    def test_too_many_errors(self) -> None:
        """Five consecutive bad commands end the connection with BYE."""
        for _ in range(4):
            self.say(b"a1 BOGUS\r\n")
        self.assertFalse(self.transport.disconnecting)
        reply = self.say(b"a1 BOGUS\r\n")
        self.assertTrue(reply.endswith(b"* BYE Too many invalid IMAP commands.\r\n"))
        self.assertTrue(self.transport.disconnecting)

    def test_good_command_resets_errors(self) -> None:
        """A valid command between bad ones resets the count."""
        for _ in range(3):
            self.say(b"a1 BOGUS\r\n")
        self.say(b"a2 NOOP\r\n")
        for _ in range(4):
            self.say(b"a1 BOGUS\r\n")
        self.assertFalse(self.transport.disconnecting)

    def test_long_line(self) -> None:
        """A line over the limit closes the connection with BYE, even without its line end."""
        self.front.dataReceived(b"a1 LOGIN " + b"x" * 9000)
        self.assertEqual(self.read(), b"* BYE Command line too long.\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_large_synchronizing_literal(self) -> None:
        """A synchronizing literal over the limit is refused with BAD and the session goes on."""
        self.assertEqual(self.say(b"a1 LOGIN bob {9000}\r\n"), b"a1 BAD [TOOBIG] Literal too large.\r\n")
        self.assertEqual(self.say(b"a2 NOOP\r\n"), b"a2 OK NOOP completed.\r\n")

    def test_large_nonsynchronizing_literal(self) -> None:
        """A non-synchronizing literal over the limit closes the connection: its bytes are coming."""
        self.assertEqual(self.say(b"a1 LOGIN bob {9000+}\r\n"), b"* BYE [TOOBIG] Literal too large.\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_idle_timeout(self) -> None:
        """A client silent for the idle timeout is disconnected with BYE."""
        self.clock.advance(59)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1)
        self.assertEqual(self.read(), b"* BYE Disconnected for inactivity.\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_login_deadline(self) -> None:
        """A client that keeps talking but never logs in is dropped at the login deadline."""
        for _ in range(3):
            self.clock.advance(30)
            self.say(b"a NOOP\r\n")
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(30)
        self.assertEqual(self.read(), b"* BYE Disconnected for inactivity.\r\n")
        self.assertTrue(self.transport.disconnecting)

    def log_in_at_deadline(self) -> None:
        """Keep talking until a second before the login deadline, then log in to a backend that does not answer yet."""
        self.backend.hold = True
        for _ in range(3):
            self.clock.advance(30)
            self.say(b"a NOOP\r\n")
        self.clock.advance(29)
        self.assertEqual(self.say(b"a1 LOGIN bob secret\r\n"), b"")
        self.clock.advance(1)
        self.assertEqual(self.read(), b"")  # the gateway is the slow one: no BYE for the client's inactivity
        self.assertFalse(self.transport.disconnecting)

    def test_login_deadline_waits_for_a_login_in_flight(self) -> None:
        """
        A login the backend keeps waiting past the deadline gets its answer, the backend's
        unavailability, and the connection then closes as at the deadline.
        """
        self.log_in_at_deadline()
        self.backend.held[0].errback(BackendUnavailable("no answer within 30 s"))
        self.assertEqual(self.read(), b"a1 NO [UNAVAILABLE] Service temporarily unavailable, try again later.\r\n"
                                      b"* BYE Disconnected for inactivity.\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_login_past_deadline_is_bounded(self) -> None:
        """
        A login in flight waits past the deadline only as long as its backend may take and an idle
        timeout: a login that never gets an answer (a stalled supervisor, a hash queued behind a
        flood) is then cut off, and the backend login is cancelled.
        """
        self.log_in_at_deadline()
        self.clock.advance(self.backend.settings.timeout + self.limits.idle_timeout - 1)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1)
        self.assertEqual(self.read(), b"* BYE Disconnected for inactivity.\r\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.backend.cancelled, 1)

    def test_last_attempt_at_deadline_says_goodbye_once(self) -> None:
        """A login whose own reply closes the connection (the last attempt) gets no second BYE for the deadline."""
        for tag in (b"a", b"b"):
            self.say(tag + b" LOGIN bob wrong\r\n")
            self.clock.advance(2)
            self.assertTrue(self.read().startswith(tag + b" NO [AUTHENTICATIONFAILED]"))
        for _ in range(3):
            self.clock.advance(30)
            self.say(b"n NOOP\r\n")
        self.clock.advance(self.limits.login_timeout - 95)
        self.read()
        self.say(b"c LOGIN bob wrong\r\n")  # its failure pause runs past the deadline
        self.clock.advance(2)
        self.assertEqual(self.read(), b"c NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
                                      b"* BYE Too many failed login attempts.\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_login_in_flight_at_deadline_logs_in(self) -> None:
        """A login still in flight at the deadline that goes through is a session like any other."""
        self.log_in_at_deadline()
        self.backend.held[0].callback(self.backend.session(self.backend.requests[0]))
        self.assertTrue(self.read().startswith(b"a1 OK "))
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.say(b"a2 NOOP\r\n"), b"")
        self.assertEqual(self.backend.sessions[0].transport.value(), b"a2 NOOP\r\n")  # relayed

    def test_closed_session_leaves_idle_watch(self) -> None:
        """A relayed session that closes is no longer watched for its idle timeout: nothing keeps it."""
        self.log_in()
        self.assertEqual(len(self.context.idle), 1)
        self.front.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.context.idle), 0)
        self.backend.sessions[0].connectionLost(Failure(ConnectionDone()))  # the relay closed it
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_relay_idle_timeout(self) -> None:
        """
        After login the pre-login timers are gone; the relay's own idle timeout is reset by
        bytes either way and closes both sides when it runs out.
        """
        self.log_in()
        [timer] = self.clock.getDelayedCalls()
        self.assertEqual(timer.getTime(), self.limits.relay_idle_timeout)
        self.clock.advance(1000)
        self.front.dataReceived(b"a2 NOOP\r\n")
        self.clock.advance(1000)
        self.backend.sessions[0].dataReceived(b"a2 OK NOOP\r\n")
        self.clock.advance(1859)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue(self.backend.sessions[0].transport.disconnecting)
        self.assertEqual(self.read(), b"a2 OK NOOP\r\n")  # nothing injected into the relayed stream

    def test_relay_idle_timeout_aborts_stalled_backend(self) -> None:
        """After the relay's idle timeout, a backend that has not closed within the grace period is aborted."""
        self.log_in()
        self.clock.advance(self.limits.relay_idle_timeout)
        backend_transport = self.backend.sessions[0].transport
        self.assertFalse(backend_transport.disconnected)  # StringTransport marks an abort so
        self.clock.advance(CLOSE_GRACE)
        self.assertTrue(backend_transport.disconnected)


class ShutdownTests(ImapTestBase):
    """The process stopping."""

    def test_before_login(self) -> None:
        """A client not logged in is told, as Dovecot tells it, and closed."""
        self.context.connections.stopService()
        self.assertEqual(self.read(), b"* BYE Server shutting down.\r\n")
        self.assertTrue(self.front.closed)

    def test_greeted_after_the_stop_began(self) -> None:
        """A connection admitted once the stop has begun (its PROXY header came late) is told instead of greeted."""
        self.context.connections.stopService()
        front, transport = self.connect("192.168.1.2")
        self.assertEqual(transport.value(), b"* BYE Server shutting down.\r\n")
        self.assertTrue(front.closed)
        front.connectionLost(Failure(ConnectionDone()))

    def test_relayed(self) -> None:
        """A relayed session is closed both ways, nothing injected into it: the backend's answers are the client's."""
        self.log_in()
        self.read()
        backend = self.backend.sessions[0].transport
        self.context.connections.stopService()
        self.assertEqual(self.read(), b"")
        self.assertTrue(backend.disconnecting)
        self.assertTrue(self.transport.disconnecting)


class LoggingTests(ImapTestBase):
    """The log events are an interface (fail2ban) and never hold a password."""

    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        super().setUp()

    def disconnect_state(self) -> str:
        """The state in the session's disconnect line."""
        [event] = [e for e in self.events if e["log_format"].startswith("disconnect ")]
        return event["state"]

    def test_relayed_session_ended_by_client(self) -> None:
        """A relayed session the client ended is logged as relaying."""
        self.log_in()
        self.front.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.disconnect_state(), "relaying")

    def test_relayed_session_ended_by_backend(self) -> None:
        """A relayed session the backend ended is logged as relaying, though the gateway closed the client."""
        self.log_in()
        self.backend.sessions[0].connectionLost(Failure(ConnectionDone()))
        self.front.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.disconnect_state(), "relaying")

    def test_no_idle_timeout_while_closing(self) -> None:
        """A relayed session closing after its backend left (the close grace) is not also timed out."""
        self.log_in()
        self.backend.sessions[0].connectionLost(Failure(ConnectionDone()))
        self.clock.advance(self.limits.relay_idle_timeout)
        self.assertEqual([e for e in self.events if e["log_format"].startswith("timeout ")], [])

    def test_relayed_session_ended_by_idle_timeout(self) -> None:
        """A relayed session ended by the relay idle timeout is logged as relaying."""
        self.log_in()
        self.clock.advance(self.limits.relay_idle_timeout)
        self.front.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.disconnect_state(), "relaying")

    def test_pipelined_after_login_counted_once(self) -> None:
        """Commands pipelined behind LOGIN go to the backend, and count once in the disconnect line's in=."""
        sent = b"a1 LOGIN bob secret\r\n" + b"a2 NOOP\r\n" * 100
        self.say(sent)
        self.assertEqual(self.backend.sessions[0].transport.value(), b"a2 NOOP\r\n" * 100)
        self.front.connectionLost(Failure(ConnectionDone()))
        [event] = [e for e in self.events if e["log_format"].startswith("disconnect ")]
        self.assertEqual(event["bytes_in"], len(sent))

    def test_login_failed_event(self) -> None:
        """A failed login logs login_failed with protocol, client, quoted user and reason."""
        self.say(b"a1 LOGIN bob wrong\r\n")
        self.clock.advance(2)
        [event] = [e for e in self.events if e["log_format"].startswith("login_failed ")]
        self.assertEqual(event["log_format"], "login_failed protocol={protocol} client={client} user={user} "
                                              "reason={reason} repeat={repeat} session={session}")
        self.assertEqual((event["protocol"], event["client"], event["user"], event["reason"], event["repeat"],
                          event["session"]),
                         ("imap", "192.168.1.1", '"bob"', "credentials", "no", self.front.client.session))

    def test_session_names_lines(self) -> None:
        """
        Every line about a connection ends with its session's name, the one the backend is given;
        another connection's is another.
        """
        self.say(b"a1 LOGIN bob wrong\r\n")
        self.clock.advance(2)
        self.log_in()
        self.front.connectionLost(Failure(ConnectionDone()))
        session = self.front.client.session
        self.assertRegex(session, f"^{SESSION_NAME}$")
        names = [e["log_format"].split(" ", 1)[0] for e in self.events]
        self.assertEqual(names, ["connect", "login_failed", "login", "disconnect"])
        for event in self.events:
            self.assertTrue(event["log_format"].endswith(" session={session}"), event["log_format"])
            self.assertEqual(event["session"], session)
        [request] = self.backend.requests
        self.assertEqual(request.client.session, session)
        other, _ = self.connect("192.168.1.2")
        self.assertNotEqual(other.client.session, session)
        other.connectionLost(Failure(ConnectionDone()))

    def test_repeated_wrong_password_marked(self) -> None:
        """The same wrong password again from the same client is logged repeat=yes (not counted); another, no."""
        for number, password in enumerate((b"stale", b"stale", b"other"), 1):
            self.say(b"a%d LOGIN bob %s\r\n" % (number, password))
            self.clock.advance(10)
        repeats = [e["repeat"] for e in self.events if e["log_format"].startswith("login_failed ")]
        self.assertEqual(repeats, ["no", "yes", "no"])

    def test_user_name_cannot_forge_fields(self) -> None:
        """A user name with spaces and quotes stays one quoted, escaped field."""
        self.say(b'a1 LOGIN "x client=1.2.3.4 \\"" wrong\r\n')
        self.clock.advance(2)
        [event] = [e for e in self.events if e["log_format"].startswith("login_failed ")]
        self.assertEqual(event["user"], '"x client=1.2.3.4 \\""')

    def test_passwords_never_logged(self) -> None:
        """No log event holds a password, for good, bad and SASL logins."""
        self.say(b"a1 LOGIN bob wrongpassword1\r\n")
        self.clock.advance(2)
        self.say(b"a2 AUTHENTICATE PLAIN " + b64(b"\0bob\0wrongpassword2") + b"\r\n")
        self.clock.advance(2)
        self.say(b"a3 LOGIN alice {%d+}\r\n" % len(PASSWORD) + PASSWORD + b"\r\n")
        self.front.connectionLost(Failure(ConnectionDone()))
        text = repr([dict(e) for e in self.events])
        for secret in ("wrongpassword1", "wrongpassword2", "p4ss", "secret"):
            self.assertNotIn(secret, text)
        self.assertTrue(any(e["log_format"].startswith("login ") for e in self.events))


class StringTransportAddressTests(SynchronousTestCase):
    """The fixtures' addresses are what the tests above expect."""

    def test_addresses(self) -> None:
        """StringTransport's default peer and host are the ones the relay test checks."""
        transport = StringTransport()
        self.assertEqual((transport.getPeer().host, transport.getHost().host), ("192.168.1.1", "10.0.0.1"))


class ReviewFixTests(ImapTestBase):
    """Behaviour pinned after an RFC review of the IMAP front end and the shared core."""

    def test_login_finishing_after_deadline_stays_closed(self) -> None:
        """A login still running when the login deadline closes the connection answers nothing afterwards."""
        self.clock.advance(119)
        self.front.dataReceived(b"a1 LOGIN bob wrong\r\n")
        self.clock.advance(1)
        self.assertEqual(self.read(), b"* BYE Disconnected for inactivity.\r\n")
        self.clock.advance(5)
        self.assertEqual(self.read(), b"")
        self.front.dataReceived(b"b NOOP\r\n")
        self.assertEqual(self.read(), b"")

    def test_close_after_loss_does_nothing(self) -> None:
        """A close asked for once the connection is gone starts no grace period (tearDown checks no timer is left)."""
        self.front.connectionLost(Failure(ConnectionDone()))
        self.front.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_idle_timeout_while_logging_in(self) -> None:
        """While the gateway works on a login, the client is not idle: a slow backend does not time it out."""
        self.backend.hold = True
        self.front.dataReceived(b"a1 LOGIN bob secret\r\n")
        self.clock.advance(90)
        self.assertFalse(self.transport.disconnecting)
        self.backend.hold = False
        self.backend.held[0].callback(self.backend.session(self.backend.requests[0]))
        self.assertTrue(self.read().startswith(b"a1 OK "))

    def test_malformed_nonsynchronizing_literal_closes(self) -> None:
        """A {n+} marker that cannot be read closes the connection: its bytes are never run as commands."""
        self.assertEqual(self.say(b"a LOGIN bob {99999999999+}\r\nb LOGOUT\r\n"), b"* BYE [TOOBIG] Invalid literal.\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_user_case_variants_share_penalties(self) -> None:
        """Bob and BOB, guessed from two addresses, count as the same user for the per-user delay."""
        self.penalties.rules = PenaltyRules(base_delay=2.0, max_delay=15.0, user_free=0)
        for number, user in enumerate((b"Bob", b"BOB"), 1):
            other, _ = self.connect(host=f"10.1.0.{number}")
            other.dataReceived(b"a LOGIN " + user + b" wrong\r\n")
            self.clock.advance(15)
            other.connectionLost(Failure(ConnectionDone()))
        # Two earlier failures of this user from elsewhere: the delay has escalated to the cap.
        self.assertEqual(self.penalties.failure_delay("bob", "10.2.0.1"), 15.0)


class BackendDecidesSessionTests(ImapTestBase):
    """In auth mode "backend", guesses must not use up the user's session slots."""

    def test_guesses_do_not_take_session_slots(self) -> None:
        """Wrong passwords in flight at the backend leave the user's sessions free for the real one."""
        self.auth.backend_decides = True
        self.backend.hold = True
        self.connections.rules = ConnectionRules(max_sessions_per_user=1)
        guesser, _ = self.connect(host="203.0.113.9")
        guesser.dataReceived(b"g LOGIN bob wrong\r\n")
        self.assertEqual(self.connections.sessions("bob"), 0)
        self.backend.hold = False
        self.assertTrue(self.say(b"a1 LOGIN bob secret\r\n").startswith(b"a1 OK "))
        self.assertEqual(self.connections.sessions("bob"), 1)
        guesser.connectionLost(Failure(ConnectionDone()))

    def test_full_user_not_told_to_a_guesser(self) -> None:
        """
        A wrong password for a user at the session limit gets the paced authentication failure,
        as for any user: only the right password learns that the sessions are full.
        """
        self.auth.backend_decides = True
        self.backend.passwords = {"bob": b"secret"}
        self.connections.rules = ConnectionRules(max_sessions_per_user=1)
        self.assertTrue(self.say(b"a1 LOGIN bob secret\r\n").startswith(b"a1 OK "))
        guesser, guesser_transport = self.connect(host="203.0.113.9")
        guesser_transport.clear()
        guesser.dataReceived(b"g1 LOGIN bob wrong\r\n")
        self.assertEqual(guesser_transport.value(), b"")
        self.clock.advance(2)
        self.assertEqual(guesser_transport.value(), b"g1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
        guesser_transport.clear()
        guesser.dataReceived(b"g2 LOGIN bob secret\r\n")
        self.assertTrue(guesser_transport.value().startswith(b"g2 NO [UNAVAILABLE] Too many sessions"),
                        guesser_transport.value())
        guesser.connectionLost(Failure(ConnectionDone()))


class AbandonedLoginTests(ImapTestBase):
    """
    A wrong password whose client left while its hash ran counts as a failed login: a guesser that
    never waits for the answer is slowed and stopped like one that does. A right one never counts.
    """

    penalty_rules = replace(FrontEndTestBase.penalty_rules, ip_budget=2)

    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        super().setUp()
        self.auth.hold = True

    def leave_during_check(self, password: bytes) -> None:
        front, _ = self.connect()
        front.dataReceived(b"g LOGIN bob " + password + b"\r\n")
        front.connectionLost(Failure(ConnectionDone()))
        self.auth.finish()

    def failures_logged(self) -> list[dict]:
        return [e for e in self.events if e["log_format"].startswith("login_failed ")]

    def test_wrong_password_counted_once(self) -> None:
        """Each guess counts once: the address's budget of 2 is used up by the second, not the first."""
        self.leave_during_check(b"guess1")
        self.assertFalse(self.penalties.refused("192.168.1.1"))
        self.leave_during_check(b"guess2")
        self.assertTrue(self.penalties.refused("192.168.1.1"))
        self.assertEqual([(e["user"], e["reason"]) for e in self.failures_logged()], [('"bob"', "credentials")] * 2)

    def test_guesser_that_leaves_is_throttled(self) -> None:
        """Past the budget, the address's logins are refused before any check."""
        self.leave_during_check(b"guess1")
        self.leave_during_check(b"guess2")
        checked = len(self.auth.checked)
        self.auth.hold = False
        self.assertTrue(self.say(b"a1 LOGIN bob secret\r\n").startswith(b"a1 NO [UNAVAILABLE] Too many failed logins"))
        self.assertEqual(len(self.auth.checked), checked)

    def test_queued_check_does_not_keep_the_connection(self) -> None:
        """A check still waiting for a hash thread holds nothing of a connection that has gone."""
        front, _ = self.connect()
        front.dataReceived(b"g LOGIN bob guess\r\n")
        front.connectionLost(Failure(ConnectionDone()))
        gone = weakref.ref(front)
        del front
        gc.collect()
        self.assertIsNone(gone())
        self.auth.finish()
        self.assertEqual(self.penalties.sizes(), (1, 1, 1))  # still counted, the connection gone

    def test_right_password_not_counted(self) -> None:
        """A client that leaves while its right password is checked leaves nothing counted."""
        self.leave_during_check(b"secret")
        self.assertEqual(self.penalties.sizes(), (0, 0, 0))
        self.assertEqual(self.failures_logged(), [])

    def test_deadline_waits_for_a_wrong_password(self) -> None:
        """
        A deadline that passes while a wrong password's hash runs lets the login finish: it is
        counted once, answered after the failure pause, and the connection then closes.
        """
        self.say(b"a1 LOGIN bob wrong\r\n")
        self.clock.advance(self.limits.login_timeout)
        self.assertFalse(self.front.closed)
        self.auth.finish()
        self.assertEqual(len(self.failures_logged()), 1)
        self.assertEqual(self.penalties.sizes(), (1, 1, 1))
        self.clock.advance(self.penalty_rules.base_delay)
        self.assertEqual(self.read(), b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
                                      b"* BYE Disconnected for inactivity.\r\n")
        self.assertTrue(self.front.closed)


class AbandonedBackendLoginTests(ImapTestBase):
    """
    In auth mode "backend", a login whose client left before the backend answered counts as a
    failed login: the backend answers a failure only after its own pause, so a guesser that hangs
    up sooner has its answer, and must be slowed and stopped like one that waits.
    """

    penalty_rules = replace(FrontEndTestBase.penalty_rules, ip_budget=2)

    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        super().setUp()
        self.auth.backend_decides = True
        self.backend.hold = True

    def leave_before_the_backend_answers(self, password: bytes) -> None:
        front, _ = self.connect()
        front.dataReceived(b"g LOGIN bob " + password + b"\r\n")
        front.connectionLost(Failure(ConnectionDone()))

    def test_guesser_that_leaves_is_counted_and_throttled(self) -> None:
        """Two abandoned logins use up the address's budget of 2, each logged for fail2ban."""
        self.leave_before_the_backend_answers(b"guess1")
        self.assertFalse(self.penalties.refused("192.168.1.1"))
        self.leave_before_the_backend_answers(b"guess2")
        self.assertTrue(self.penalties.refused("192.168.1.1"))
        self.assertEqual(self.backend.cancelled, 2)
        failures = [e for e in self.events if e["log_format"].startswith("login_failed ")]
        self.assertEqual([(e["user"], e["reason"]) for e in failures], [('"bob"', "abandoned")] * 2)

    def test_cut_short_by_the_stop_not_counted(self) -> None:
        """A login the gateway's own stop cut short tells nothing of the client: not counted, not logged."""
        self.say(b"g LOGIN bob guess\r\n")
        self.context.connections.stopService()
        self.assertEqual(self.read(), b"* BYE Server shutting down.\r\n")
        self.front.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.backend.cancelled, 1)
        self.assertEqual(self.penalties.sizes(), (0, 0, 0))
        self.assertEqual([e for e in self.events if e["log_format"].startswith("login_failed ")], [])

    def test_answered_login_not_counted_twice(self) -> None:
        """A login the backend answered before the client left is counted as what it was, once."""
        self.backend.hold = False
        self.backend.passwords = {"bob": b"secret"}
        front, _ = self.connect()
        front.dataReceived(b"g LOGIN bob wrong\r\n")
        front.connectionLost(Failure(ConnectionDone()))  # during the failure pause
        self.assertEqual(self.penalties.sizes(), (1, 1, 1))
        failures = [e for e in self.events if e["log_format"].startswith("login_failed ")]
        self.assertEqual([e["reason"] for e in failures], ["backend-refused"])


class NilUserTests(ImapTestBase):
    """NIL is an astring in LOGIN: a user called "nil" can log in unquoted (imaplib does not quote user names)."""

    def test_nil_user(self) -> None:
        """LOGIN nil ... logs in the user "nil"; ID NIL still means no parameters."""
        self.auth.passwords["nil"] = b"pw"
        self.assertTrue(self.say(b"a1 LOGIN nil pw\r\n").startswith(b"a1 OK "))
        self.assertEqual(self.backend.requests[0].user, "nil")

    def test_id_nil(self) -> None:
        """ID NIL is valid, and a NIL field name is not."""
        self.assertTrue(self.say(b"a ID NIL\r\n").endswith(b"a OK ID completed.\r\n"))
        self.assertEqual(self.say(b'b ID (NIL "x")\r\n'), b"b BAD Invalid ID parameters.\r\n")


class _HeldGatekeeper(LocalGatekeeper):
    """A gatekeeper whose admissions and session counts wait until the test answers them, as a worker's do."""

    def __init__(self, gatekeeper: LocalGatekeeper) -> None:
        super().__init__(gatekeeper.connections, gatekeeper.penalties)
        self.held: list[tuple[Deferred[str | None], str]] = []
        self.held_sessions: list[tuple[Deferred[bool], str]] = []

    def admit(self, host: str) -> Deferred[str | None]:
        answer: Deferred[str | None] = Deferred()
        self.held.append((answer, host))
        return answer

    def open_session(self, user: str) -> Deferred[bool]:
        answer: Deferred[bool] = Deferred()
        self.held_sessions.append((answer, user))
        return answer

    def answer(self) -> None:
        held, self.held = self.held, []
        for answer, host in held:
            answer.callback(self.connections.admit(host))

    def answer_sessions(self) -> None:
        held, self.held_sessions = self.held_sessions, []
        for answer, user in held:
            answer.callback(self.connections.open_session(user))


class PendingAdmissionTests(ImapTestBase):
    """Until the gatekeeper has admitted a connection, nothing is read and nothing is said."""

    def setUp(self) -> None:
        super().setUp()
        self.gatekeeper = _HeldGatekeeper(self.context.gatekeeper)  # type: ignore[arg-type]
        self.context = replace(self.context, gatekeeper=self.gatekeeper)

    def test_greeting_waits_for_admission(self) -> None:
        """The client is paused and not greeted until admitted; then it is greeted and read."""
        front, transport = self.connect("192.0.2.30")
        self.assertEqual((transport.value(), transport.producerState), (b"", "paused"))
        self.gatekeeper.answer()
        self.assertTrue(transport.value().startswith(b"* OK "))
        self.assertEqual(transport.producerState, "producing")
        front.connectionLost(Failure(ConnectionDone()))

    def test_bytes_with_a_proxy_header_wait_for_the_greeting(self) -> None:
        """
        Behind a PROXY listener, a command that came with the header is answered after the
        greeting: the resume that follows admission hands such bytes over at once.
        """
        factory = TrustedProxyFactory(FrontEndFactory(ImapFrontEnd, self.context),
                                      (ipaddress.ip_network("127.0.0.0/8"),), self.clock)
        balancer = IPv4Address("TCP", "127.0.0.2", 40000)
        proxy = factory.buildProtocol(balancer)
        assert proxy is not None
        transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 143), peerAddress=balancer)
        proxy.makeConnection(transport)
        proxy.dataReceived(b"PROXY TCP4 203.0.113.9 192.0.2.1 55555 143\r\na1 NOOP\r\n")
        self.assertEqual(transport.value(), b"")
        self.gatekeeper.answer()
        greeting, _, rest = transport.value().partition(b"\r\n")
        self.assertTrue(greeting.startswith(b"* OK "), transport.value())
        self.assertEqual(rest, b"a1 OK NOOP completed.\r\n")
        proxy.connectionLost(Failure(ConnectionDone()))

    def test_unanswered_admission_times_out(self) -> None:
        """
        A gatekeeper that does not answer (a stalled supervisor) does not hold the connection for
        ever: at the idle timeout the client is told the gateway is busy, and a late admission is
        given back.
        """
        before = self.connections.connections
        front, transport = self.connect("192.0.2.32")
        self.clock.advance(self.limits.idle_timeout)
        self.assertEqual(transport.value(), b"* BYE [UNAVAILABLE] Too many connections, try again later.\r\n")
        self.assertTrue(transport.disconnecting)
        self.gatekeeper.answer()
        self.assertEqual(self.connections.connections, before)
        self.assertFalse(transport.value().endswith(b"ready.\r\n"))
        front.connectionLost(Failure(ConnectionDone()))

    def test_client_gone_before_admission(self) -> None:
        """A client that leaves before its admission is answered is not counted once it is."""
        before = self.connections.connections
        front, transport = self.connect("192.0.2.31")
        front.connectionLost(Failure(ConnectionDone()))
        self.gatekeeper.answer()
        self.assertEqual((self.connections.connections, transport.value()), (before, b""))


class PendingSessionTests(ImapTestBase):
    """With the backend deciding logins, the session is counted after the backend's OK, in a round trip."""

    def setUp(self) -> None:
        super().setUp()
        self.front.connectionLost(Failure(ConnectionDone()))
        self.gatekeeper = _HeldGatekeeper(self.context.gatekeeper)  # type: ignore[arg-type]
        self.context = replace(self.context, gatekeeper=self.gatekeeper)
        self.auth.backend_decides = True
        self.front, self.transport = self.connect("192.0.2.40")
        self.gatekeeper.answer()
        self.read()

    def test_backend_lost_while_counting(self) -> None:
        """
        A backend connection lost while the session is being counted is not relayed: the client
        is told the backend is unavailable, no slot stays taken, and it may log in again.
        """
        self.assertEqual(self.log_in(), b"")
        self.backend.sessions[0].connectionLost(Failure(ConnectionDone()))
        self.gatekeeper.answer_sessions()
        self.assertTrue(self.read().startswith(b"a1 NO [UNAVAILABLE] "))
        self.assertEqual(self.connections.sessions("bob"), 0)
        self.assertFalse(self.transport.disconnecting)
        self.front.dataReceived(b"a2 LOGIN bob secret\r\n")
        self.gatekeeper.answer_sessions()
        self.assertTrue(self.read().startswith(b"a2 OK "))
        self.assertEqual(self.connections.sessions("bob"), 1)

    def test_session_counted(self) -> None:
        """Once counted, the session is relayed."""
        self.assertEqual(self.log_in(), b"")
        self.gatekeeper.answer_sessions()
        self.assertTrue(self.read().startswith(b"a1 OK "))
        self.assertEqual(self.connections.sessions("bob"), 1)
