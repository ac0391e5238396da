"""Transcript tests of the POP3 front end with StringTransport and Clock."""

from __future__ import annotations

from frontend_harness import PASSWORD, TLS_OPTIONS, FrontEndTestBase, b64, unslotted

from gateway.backend import BackendRefused, BackendUnavailable
from gateway.pop3 import Pop3FrontEnd

CAPA_AFTER_TLS = (b"+OK Capability list follows.\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n"
                  b"USER\r\nSASL PLAIN LOGIN\r\n.\r\n")


class Pop3TestBase(FrontEndTestBase):
    """A POP3 front end whose backend announced TOP, UIDL and more."""

    front_end = Pop3FrontEnd
    protocol = "pop3"

    def setUp(self) -> None:
        super().setUp()
        self.backend.announced = (b"CAPA", b"TOP", b"UIDL", b"RESP-CODES", b"PIPELINING", b"SASL PLAIN LOGIN", b"XCLIENT")

    def log_in(self) -> bytes:
        return self.say(b"USER bob\r\nPASS secret\r\n")


class PlainListenerTests(Pop3TestBase):
    """The STLS listener before TLS."""

    implicit_tls = False

    def test_greeting(self) -> None:
        """The greeting is +OK."""
        self.assertEqual(self.greeting, b"+OK Mail gateway ready.\r\n")

    def test_capa_before_tls(self) -> None:
        """CAPA before TLS lists STLS and neither USER nor SASL."""
        self.assertEqual(self.say(b"CAPA\r\n"), b"+OK Capability list follows.\r\nTOP\r\nUIDL\r\nRESP-CODES\r\n"
                                                b"AUTH-RESP-CODE\r\nPIPELINING\r\nSTLS\r\n.\r\n")

    def test_login_commands_refused_before_tls(self) -> None:
        """USER, PASS and AUTH before STLS get -ERR saying TLS is required; nothing is checked."""
        for line in (b"USER bob\r\n", b"PASS secret\r\n", b"AUTH PLAIN " + b64(b"\0bob\0secret") + b"\r\n", b"AUTH\r\n"):
            self.assertEqual(self.say(line), b"-ERR TLS required: use STLS first.\r\n")
        self.assertEqual(self.auth.checked, [])

    def test_stls_discards_pipelined(self) -> None:
        """Commands pipelined after STLS in the same segment are discarded, never run."""
        self.assertEqual(self.say(b"STLS\r\nUSER bob\r\n"), b"+OK Begin TLS negotiation now.\r\n")
        self.assertIs(self.transport.tls_options, TLS_OPTIONS)
        self.assertEqual(self.say(b"PASS secret\r\n"), b"-ERR Send USER first.\r\n")
        self.assertEqual(self.auth.checked, [])

    def test_after_stls(self) -> None:
        """After STLS, CAPA offers USER and SASL, not STLS, and a second STLS is refused."""
        self.say(b"STLS\r\n")
        self.assertEqual(self.say(b"CAPA\r\n"), CAPA_AFTER_TLS)
        self.assertEqual(self.say(b"STLS\r\n"), b"-ERR Command not permitted when TLS active.\r\n")
        self.assertTrue(self.log_in().endswith(b"+OK Logged in.\r\n"))


class ShutdownTests(Pop3TestBase):
    """The process stopping."""

    def test_before_login(self) -> None:
        """A client not logged in is told, as Dovecot tells it, and closed."""
        self.context.connections.stopService()
        self.assertEqual(self.read(), b"-ERR [SYS/TEMP] Server shutting down.\r\n")
        self.assertTrue(self.front.closed)


class ImplicitTLSTests(Pop3TestBase):
    """The POP3S listener."""

    def test_freed_without_collector(self) -> None:
        """A closed connection is freed at once, not at the cycle collector's next run."""
        self.assert_freed_without_collector(b"CAPA\r\n")

    def test_capa(self) -> None:
        """CAPA offers the backend's TOP and UIDL, USER and SASL PLAIN LOGIN."""
        self.assertEqual(self.say(b"capa\r\n"), CAPA_AFTER_TLS)

    def test_capa_without_backend_knowledge(self) -> None:
        """Before anything is known of the backend, TOP and UIDL are not promised."""
        self.backend.announced = None
        self.assertNotIn(b"TOP", self.say(b"CAPA\r\n"))

    def test_stls_refused(self) -> None:
        """STLS on the implicit-TLS listener is refused."""
        self.assertEqual(self.say(b"STLS\r\n"), b"-ERR Command not permitted when TLS active.\r\n")

    def test_user_pass_relays(self) -> None:
        """USER and PASS log in; commands pipelined after PASS go to the backend."""
        self.assertEqual(self.say(b"USER alice\r\nPASS " + PASSWORD + b"\r\nSTAT\r\nLIST\r\n"),
                         b"+OK Send your password.\r\n+OK Logged in.\r\n")
        [request] = self.backend.requests
        self.assertEqual((request.user, request.password), ("alice", PASSWORD))
        session = self.backend.sessions[0]
        self.assertEqual(session.transport.value(), b"STAT\r\nLIST\r\n")
        session.dataReceived(b"+OK 2 320\r\n")
        self.assertEqual(self.read(), b"+OK 2 320\r\n")

    def test_attributes_in_slots(self) -> None:
        """A relaying session's front end keeps its attributes and Twisted's in slots: it has no dict."""
        self.say(b"USER alice\r\nPASS " + PASSWORD + b"\r\nSTAT\r\n")
        self.backend.sessions[0].dataReceived(b"+OK 2 320\r\n")
        self.assertEqual(unslotted(self.front), set())

    def test_pass_without_user(self) -> None:
        """PASS without USER is an error."""
        self.assertEqual(self.say(b"PASS secret\r\n"), b"-ERR Send USER first.\r\n")

    def test_names_refused_as_sasl_refuses_them(self) -> None:
        """
        USER with a name that is not UTF-8 or holds a control character is refused as AUTH refuses
        it: no hash is computed, no backend asked. It also forgets the USER before it, since PASS
        follows a successful USER only (RFC 1939 7).
        """
        self.assertEqual(self.say(b"USER alice\r\n"), b"+OK Send your password.\r\n")
        for line in (b"USER b\xe9b\r\n", b"USER al\x1bice\r\n", b"USER al\x7fice\r\n"):
            self.assertEqual(self.say(line), b"-ERR USER expects a user name.\r\n")
        self.assertEqual(self.say(b"PASS " + PASSWORD + b"\r\n"), b"-ERR Send USER first.\r\n")
        self.assertEqual(self.auth.checked, [])
        self.assertEqual(self.say(b"USER alice\r\nPASS " + PASSWORD + b"\r\n"),
                         b"+OK Send your password.\r\n+OK Logged in.\r\n")

    def test_wrong_password_paced(self) -> None:
        """A wrong password gets -ERR [AUTH] only after the failure delay; an unknown user alike."""
        for user in (b"bob", b"nobody"):
            self.assertEqual(self.say(b"USER " + user + b"\r\nPASS wrong\r\n"), b"+OK Send your password.\r\n")
            self.clock.advance(1.99)
            self.assertEqual(self.read(), b"")
            self.clock.advance(0.01)
            self.assertEqual(self.read(), b"-ERR [AUTH] Authentication failed.\r\n")

    def test_attempts_limited(self) -> None:
        """After the allowed number of failed logins the connection closes."""
        for _ in range(3):
            self.say(b"USER bob\r\nPASS wrong\r\n")
            self.clock.advance(2)
        self.assertTrue(self.transport.disconnecting)

    def test_backend_unavailable(self) -> None:
        """A backend that is down gives -ERR [SYS/TEMP], never [AUTH]."""
        self.backend.error = BackendUnavailable("refused")
        self.assertEqual(self.log_in(), b"+OK Send your password.\r\n"
                                        b"-ERR [SYS/TEMP] Service temporarily unavailable, try again later.\r\n")

    def test_backend_refusal_passed_through(self) -> None:
        """The backend's [IN-USE] reaches the client as the backend worded it, without delay."""
        self.backend.error = BackendRefused(b"[IN-USE] Mailbox is locked by another POP3 session")
        self.assertTrue(self.log_in().endswith(b"-ERR [IN-USE] Mailbox is locked by another POP3 session\r\n"))
        self.assertFalse(self.transport.disconnecting)

    def test_auth_lists_mechanisms(self) -> None:
        """AUTH without arguments lists the mechanisms."""
        self.assertEqual(self.say(b"AUTH\r\n"), b"+OK Mechanisms follow.\r\nPLAIN\r\nLOGIN\r\n.\r\n")

    def test_auth_plain_initial_response(self) -> None:
        """AUTH PLAIN with an initial response logs in."""
        self.assertEqual(self.say(b"AUTH PLAIN " + b64(b"\0alice\0" + PASSWORD) + b"\r\n"), b"+OK Logged in.\r\n")

    def test_auth_spaces_around_initial_response(self) -> None:
        """Spaces after the mechanism or the initial response are no part of the response, as in Dovecot."""
        self.assertEqual(self.say(b"AUTH PLAIN  " + b64(b"\0alice\0" + PASSWORD) + b" \r\n"), b"+OK Logged in.\r\n")

    def test_auth_not_plain_message(self) -> None:
        """A response that decodes but is no PLAIN message fails with -ERR [AUTH], as Dovecot fails it."""
        self.assertEqual(self.say(b"AUTH PLAIN " + b64(b"alice") + b"\r\n"), b"-ERR [AUTH] Authentication failed.\r\n")
        self.assertEqual(self.say(b"AUTH PLAIN =\r\n"), b"-ERR [AUTH] Authentication failed.\r\n")

    def test_auth_trailing_space_prompts(self) -> None:
        """AUTH PLAIN followed by a space alone has no initial response: it prompts."""
        self.assertEqual(self.say(b"AUTH PLAIN \r\n"), b"+ \r\n")

    def test_auth_plain_two_steps(self) -> None:
        """AUTH PLAIN without an initial response asks with an empty challenge."""
        self.assertEqual(self.say(b"AUTH PLAIN\r\n"), b"+ \r\n")
        self.assertEqual(self.say(b64(b"\0bob\0secret") + b"\r\n"), b"+OK Logged in.\r\n")

    def test_auth_login(self) -> None:
        """AUTH LOGIN with the user name as initial response asks for the password."""
        self.assertEqual(self.say(b"AUTH LOGIN " + b64(b"bob") + b"\r\n"), b"+ " + b64(b"Password:") + b"\r\n")
        self.assertEqual(self.say(b64(b"secret") + b"\r\n"), b"+OK Logged in.\r\n")

    def test_auth_cancel_and_bad_base64(self) -> None:
        """"*" cancels AUTH and bad base64 ends it, both with -ERR; the session goes on."""
        self.say(b"AUTH PLAIN\r\n")
        self.assertEqual(self.say(b"*\r\n"), b"-ERR Authentication cancelled.\r\n")
        self.say(b"AUTH LOGIN\r\n")
        self.assertEqual(self.say(b"%%%\r\n"), b"-ERR Invalid SASL response.\r\n")
        self.assertEqual(self.say(b"NOOP\r\n"), b"+OK\r\n")

    def test_unknown_mechanism(self) -> None:
        """An unsupported mechanism is refused."""
        self.assertEqual(self.say(b"AUTH CRAM-MD5\r\n"), b"-ERR Unsupported authentication mechanism.\r\n")

    def test_quit(self) -> None:
        """QUIT answers +OK and closes."""
        self.assertEqual(self.say(b"QUIT\r\n"), b"+OK Logging out.\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_unknown_and_post_login_commands(self) -> None:
        """Commands of the transaction state are refused before login."""
        for line in (b"STAT\r\n", b"RETR 1\r\n", b"XYZZY\r\n"):
            self.assertEqual(self.say(line), b"-ERR Unknown command.\r\n")

    def test_nul_refused(self) -> None:
        """A line with a NUL byte is refused."""
        self.assertEqual(self.say(b"USER b\0b\r\n"), b"-ERR Unknown command.\r\n")

    def test_too_many_errors(self) -> None:
        """Five consecutive errors close the connection; the last still gets its one reply (RFC 1939 3)."""
        for _ in range(4):
            self.say(b"XYZZY\r\n")
        self.assertEqual(self.say(b"XYZZY\r\n"), b"-ERR Unknown command.\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_long_line(self) -> None:
        """A line over the limit closes the connection."""
        self.assertEqual(self.say(b"USER " + b"x" * 9000), b"-ERR Line too long.\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_idle_timeout_and_deadline(self) -> None:
        """A silent client is dropped at the idle timeout."""
        self.clock.advance(60)
        self.assertEqual(self.read(), b"-ERR Disconnected for inactivity.\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_login_deadline(self) -> None:
        """A client that keeps talking but never logs in is dropped at the login deadline."""
        for _ in range(4):
            self.clock.advance(30)
            self.say(b"NOOP\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_login_deadline_waits_for_a_login_in_flight(self) -> None:
        """
        A login the backend keeps waiting past the deadline gets -ERR [SYS/TEMP], then the connection
        closes with no second reply: POP3 answers each command once.
        """
        self.backend.hold = True
        self.clock.advance(30)
        self.say(b"USER bob\r\n")
        self.clock.advance(30)
        self.say(b"NOOP\r\n")
        self.clock.advance(30)
        self.say(b"PASS secret\r\n")
        self.clock.advance(30)
        self.assertEqual(self.read(), b"")
        self.assertFalse(self.transport.disconnecting)
        self.backend.held[0].errback(BackendUnavailable("no answer within 30 s"))
        self.assertEqual(self.read(), b"-ERR [SYS/TEMP] Service temporarily unavailable, try again later.\r\n")
        self.assertTrue(self.transport.disconnecting)
