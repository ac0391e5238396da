"""The IMAP login dialogue with the backend, driven line by line over a StringTransport."""

from __future__ import annotations

import base64
import dataclasses
import gc

from frontend_harness import unslotted
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from gateway.backend import BackendRefused, BackendRejected, BackendUnavailable, ClientAddress, LoginRequest
from gateway.config import BackendSettings
from gateway.imap_backend import ImapBackendLogin
from gateway.relay import Splice
from gateway.testing.fakes import BACKEND_SETTINGS, TLSStringTransport

CLIENT = ClientAddress("192.0.2.7", 50123, "198.51.100.1", 993, "iMaPsEsSiOn1")
TLS_CREATOR = object()
FORWARDING = dataclasses.replace(BACKEND_SETTINGS, forward_client_ip=True)
STARTTLS = dataclasses.replace(BACKEND_SETTINGS, tls="starttls")


class RecordingTransport(TLSStringTransport):
    """
    A transport that records STARTTLS and each write on its own.

    :ivar writes: every chunk written, in order (C{clear} empties only the value).
    """

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


class ImapLoginTestBase(SynchronousTestCase):
    """One IMAP login dialogue on a recording transport."""

    settings: BackendSettings = BACKEND_SETTINGS

    def setUp(self) -> None:
        self.start()

    def start(self, user: str = "alice", password: bytes = b"secret", master_user: str | None = None,
              settings: BackendSettings | None = None, probe: bool = False, client: ClientAddress = CLIENT) -> None:
        """Begin a fresh dialogue (a probe's, with no request), replacing any earlier one."""
        request = None if probe else LoginRequest(user, password, client, master_user)
        self.protocol = ImapBackendLogin(request, settings or self.settings, TLS_CREATOR)  # type: ignore[arg-type]
        self.transport = RecordingTransport()
        self.protocol.makeConnection(self.transport)

    def say(self, data: bytes) -> bytes:
        """Feed the backend's bytes and return what the dialogue wrote in reply."""
        self.protocol.dataReceived(data)
        written = self.transport.value()
        self.transport.clear()
        return written

    def failed_with(self, kind: type[Exception]) -> Exception:
        """Assert the login failed with C{kind} and dropped the connection; return the exception."""
        failure = self.failureResultOf(self.protocol.result, kind)
        self.assertTrue(self.transport.disconnecting)
        return failure.value  # type: ignore[return-value]

    def logged_in(self) -> ImapBackendLogin:
        """Assert the login succeeded and the backend is no longer read; return the protocol."""
        protocol = self.successResultOf(self.protocol.result)
        self.assertIs(protocol, self.protocol)
        self.assertEqual(self.transport.producerState, "paused")
        self.assertFalse(self.transport.disconnecting)
        return self.protocol


class GreetingTests(ImapLoginTestBase):
    """The greeting and the capabilities before login."""

    def test_greeting_with_capabilities(self) -> None:
        """Capabilities in the greeting are used at once: LOGIN is the first command."""
        written = self.say(b"* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN] Dovecot ready.\r\n")
        self.assertEqual(written, b"gw1 LOGIN alice secret\r\n")

    def test_greeting_without_capabilities(self) -> None:
        """Without capabilities in the greeting CAPABILITY is asked first, and LOGIN follows its OK."""
        self.assertEqual(self.say(b"* OK Dovecot ready.\r\n"), b"gw1 CAPABILITY\r\n")
        self.assertEqual(self.say(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n"), b"")
        self.assertEqual(self.say(b"gw1 OK Capability completed.\r\n"), b"gw2 LOGIN alice secret\r\n")
        self.assertNoResult(self.protocol.result)

    def test_asked_capabilities_are_used(self) -> None:
        """Capabilities learned through CAPABILITY decide how LOGIN is sent (here LITERAL+)."""
        self.start(password=b"p\xc3\xa4ss")
        self.say(b"* OK Dovecot ready.\r\n")
        written = self.say(b"* CAPABILITY IMAP4rev1 LITERAL+\r\ngw1 OK Capability completed.\r\n")
        self.assertEqual(written, b"gw2 LOGIN alice {5+}\r\np\xc3\xa4ss\r\n")

    def test_capability_refused(self) -> None:
        """A CAPABILITY that is answered NO makes the backend unavailable."""
        self.say(b"* OK Dovecot ready.\r\n")
        self.assertEqual(self.say(b"gw1 NO not now\r\n"), b"")
        self.failed_with(BackendUnavailable)

    def test_capability_without_data(self) -> None:
        """A CAPABILITY answered OK without any capability data makes the backend unavailable."""
        self.say(b"* OK Dovecot ready.\r\n")
        self.assertEqual(self.say(b"gw1 OK Capability completed.\r\n"), b"")
        self.failed_with(BackendUnavailable)

    def test_preauth_greeting(self) -> None:
        """A PREAUTH greeting makes the backend unavailable without any command sent."""
        self.assertEqual(self.say(b"* PREAUTH [CAPABILITY IMAP4rev1] logged in as nobody\r\n"), b"")
        self.failed_with(BackendUnavailable)

    def test_bye_greeting(self) -> None:
        """A BYE greeting makes the backend unavailable without any command sent."""
        self.assertEqual(self.say(b"* BYE Too many connections\r\n"), b"")
        error = self.failed_with(BackendUnavailable)
        self.assertIn("Too many connections", str(error))

    def test_malformed_capabilities(self) -> None:
        """A capability list that is not atoms separated by single spaces makes the backend unavailable."""
        self.say(b"* OK [CAPABILITY IMAP4rev1  (IDLE)] Dovecot ready.\r\n")
        self.failed_with(BackendUnavailable)


class IdTests(ImapLoginTestBase):
    """Forwarding the client's address with ID."""

    settings = FORWARDING

    def test_id_sent(self) -> None:
        """With forward_client_ip and an ID capability, ID carries the client's addresses and ports, and its session's name."""
        written = self.say(b"* OK [CAPABILITY IMAP4rev1 ID] Dovecot ready.\r\n")
        self.assertEqual(written, b'gw1 ID ("x-originating-ip" "192.0.2.7" "x-originating-port" "50123" '
                                  b'"x-connected-ip" "198.51.100.1" "x-connected-port" "993" "x-session-id" "iMaPsEsSiOn1")\r\n')
        self.assertEqual(self.say(b'* ID ("name" "Dovecot")\r\ngw1 OK ID completed.\r\n'),
                         b"gw2 LOGIN alice secret\r\n")

    def test_ipv6_client(self) -> None:
        """An IPv6 client address goes into ID as it is."""
        self.start(client=ClientAddress("2001:db8::7", 4000, "2001:db8::1", 143, "iMaPsEsSiOn2"))
        written = self.say(b"* OK [CAPABILITY IMAP4rev1 ID] Dovecot ready.\r\n")
        self.assertEqual(written, b'gw1 ID ("x-originating-ip" "2001:db8::7" "x-originating-port" "4000" '
                                  b'"x-connected-ip" "2001:db8::1" "x-connected-port" "143" "x-session-id" "iMaPsEsSiOn2")\r\n')

    def test_unix_socket_client(self) -> None:
        """A client of a UNIX socket listener has no address to forward: ID carries its session's name alone."""
        self.start(client=ClientAddress("UNIXAddress(None)", 0, "UNIXAddress('/run/imap')", 0, "iMaPsEsSiOn3"))
        written = self.say(b"* OK [CAPABILITY IMAP4rev1 ID] Dovecot ready.\r\n")
        self.assertEqual(written, b'gw1 ID ("x-session-id" "iMaPsEsSiOn3")\r\n')

    def test_id_answer_with_literals_skipped(self) -> None:
        """
        Dovecot answers ID with a literal for a value that is not ASCII (its imap_id_send): the
        response is skipped whole, literals split across reads included, and LOGIN follows.
        """
        self.say(b"* OK [CAPABILITY IMAP4rev1 ID] Dovecot ready.\r\n")
        self.assertEqual(self.say(b'* ID ("name" {8}\r\nD\xc3\xb6v'), b"")
        self.assertEqual(self.say(b'ecot "os" {12}\r\ngw1 OK x\r\n}\r\n'), b"")
        self.assertEqual(self.say(b'")\r\ngw1 OK ID completed.\r\n'), b"gw2 LOGIN alice secret\r\n")
        self.say(b"gw2 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
        self.logged_in()

    def test_empty_literal_skipped(self) -> None:
        """A literal of no bytes ends where it starts; the response goes on on the next line."""
        self.say(b"* OK [CAPABILITY IMAP4rev1 ID] Dovecot ready.\r\n")
        self.assertEqual(self.say(b'* ID ("name" {0}\r\n)\r\ngw1 OK ID completed.\r\n'),
                         b"gw2 LOGIN alice secret\r\n")

    def test_malformed_literal(self) -> None:
        """An untagged response ending in a malformed literal marker fails the login as unavailable."""
        self.say(b"* OK [CAPABILITY IMAP4rev1 ID] Dovecot ready.\r\n")
        self.say(b'* ID ("name" {12345678901}\r\n')
        self.failed_with(BackendUnavailable)

    def test_status_text_is_not_a_literal(self) -> None:
        """A status response's text ending in "{8}" is text: nothing after it is skipped."""
        self.start(settings=BACKEND_SETTINGS)
        self.assertEqual(self.say(b"* OK [CAPABILITY IMAP4rev1] Dovecot {8}\r\n"), b"gw1 LOGIN alice secret\r\n")
        self.say(b"* OK still {3}\r\ngw1 OK [CAPABILITY IMAP4rev1] Logged in\r\n")
        self.logged_in()

    def test_id_refused_still_logs_in(self) -> None:
        """A backend that answers ID with BAD still gets the LOGIN."""
        self.say(b"* OK [CAPABILITY IMAP4rev1 ID] Dovecot ready.\r\n")
        self.assertEqual(self.say(b"gw1 BAD Unknown command\r\n"), b"gw2 LOGIN alice secret\r\n")
        self.assertNoResult(self.protocol.result)

    def test_no_id_capability(self) -> None:
        """Without an ID capability no ID is sent, even with forward_client_ip."""
        written = self.say(b"* OK [CAPABILITY IMAP4rev1] Dovecot ready.\r\n")
        self.assertEqual(written, b"gw1 LOGIN alice secret\r\n")

    def test_not_forwarding(self) -> None:
        """Without forward_client_ip no ID is sent, even when the backend offers it."""
        self.start(settings=BACKEND_SETTINGS)
        written = self.say(b"* OK [CAPABILITY IMAP4rev1 ID] Dovecot ready.\r\n")
        self.assertEqual(written, b"gw1 LOGIN alice secret\r\n")


class LoginCommandTests(ImapLoginTestBase):
    """How the credentials go into LOGIN."""

    def greet(self, capabilities: bytes = b"IMAP4rev1") -> bytes:
        """Greet with C{capabilities}; return what the dialogue wrote in reply."""
        return self.say(b"* OK [CAPABILITY " + capabilities + b"] Dovecot ready.\r\n")

    def test_atoms(self) -> None:
        """A user and password that are atoms go bare."""
        self.assertEqual(self.greet(), b"gw1 LOGIN alice secret\r\n")

    def test_quoted_password(self) -> None:
        """A password with spaces, quotes and backslashes goes as a quoted string, escaped."""
        self.start(password=b'p4ss "w rd\\')
        self.assertEqual(self.greet(), b'gw1 LOGIN alice "p4ss \\"w rd\\\\"\r\n')

    def test_nil_and_empty_passwords_quoted(self) -> None:
        """The password NIL and the empty password are quoted, so they stay strings."""
        self.start(password=b"NIL")
        self.assertEqual(self.greet(), b'gw1 LOGIN alice "NIL"\r\n')
        self.start(password=b"")
        self.assertEqual(self.greet(), b'gw1 LOGIN alice ""\r\n')

    def test_literal_plus_8bit(self) -> None:
        """With LITERAL+ an 8-bit password goes as a non-synchronizing literal, in one write."""
        self.start(password=b"p\xc3\xa4ssw\xc3\xb6rd")
        self.greet(b"IMAP4rev1 LITERAL+")
        self.assertEqual(self.transport.writes, [b"gw1 LOGIN alice {10+}\r\np\xc3\xa4ssw\xc3\xb6rd\r\n"])

    def test_literal_plus_cr(self) -> None:
        """With LITERAL+ a password holding CR goes as a non-synchronizing literal, in one write."""
        self.start(password=b"pass\rword")
        self.greet(b"IMAP4rev1 LITERAL+")
        self.assertEqual(self.transport.writes, [b"gw1 LOGIN alice {9+}\r\npass\rword\r\n"])

    def test_synchronizing_literal(self) -> None:
        """Without LITERAL+ the literal's bytes wait for the backend's continuation request."""
        self.start(password=b"p\xc3\xa4ss")
        self.assertEqual(self.greet(), b"gw1 LOGIN alice {5}\r\n")
        self.assertNotIn(b"p\xc3\xa4ss", self.transport.value())
        self.assertEqual(self.say(b"+ OK\r\n"), b"p\xc3\xa4ss\r\n")
        self.assertEqual(self.transport.writes, [b"gw1 LOGIN alice {5}\r\n", b"p\xc3\xa4ss\r\n"])
        self.assertEqual(self.say(b"gw1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"), b"")
        self.assertEqual(self.logged_in().capabilities, (b"IMAP4rev1", b"IDLE"))

    def test_synchronizing_literal_refused(self) -> None:
        """
        A backend that answers NO before asking for the literal never saw the password: the login
        is unavailable, not rejected (which would count against the client).
        """
        self.start(password=b"p\xc3\xa4ss")
        self.greet()
        self.say(b"gw1 NO Literal too big\r\n")
        self.assertNotIn(b"p\xc3\xa4ss", self.transport.value())
        failure = self.failureResultOf(self.protocol.result, BackendUnavailable)
        self.assertIn("before the credentials were sent", failure.getErrorMessage())

    def test_8bit_user_with_literal_plus(self) -> None:
        """A UTF-8 user name goes as a literal too."""
        self.start(user="j\u00fcrgen")
        self.greet(b"IMAP4rev1 LITERAL+")
        self.assertEqual(self.transport.writes, [b"gw1 LOGIN {7+}\r\nj\xc3\xbcrgen secret\r\n"])

    def test_unexpected_continuation(self) -> None:
        """A continuation request when no literal is pending makes the backend unavailable."""
        self.greet()
        self.assertEqual(self.say(b"+ go ahead\r\n"), b"")
        self.failed_with(BackendUnavailable)

    def test_second_continuation(self) -> None:
        """A second continuation request after the literal was sent makes the backend unavailable."""
        self.start(password=b"p\xc3\xa4ss")
        self.greet()
        self.say(b"+ OK\r\n")
        self.assertEqual(self.say(b"+ more\r\n"), b"")
        self.failed_with(BackendUnavailable)

    def test_master_login(self) -> None:
        """
        A master login is AUTHENTICATE PLAIN with the user as authorization identity, the initial
        response inline where the backend offers SASL-IR, after its continuation where not.
        """
        message = base64.b64encode(b"ops*team\0admin\0masterpw")
        self.start(user="ops*team", password=b"masterpw", master_user="admin")
        self.assertEqual(self.greet(b"IMAP4rev1 SASL-IR AUTH=PLAIN"), b"gw1 AUTHENTICATE PLAIN " + message + b"\r\n")
        self.say(b"gw1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
        self.logged_in()
        self.start(user="ops*team", password=b"masterpw", master_user="admin")
        self.assertEqual(self.greet(b"IMAP4rev1 AUTH=PLAIN"), b"gw1 AUTHENTICATE PLAIN\r\n")
        self.assertEqual(self.say(b"+ \r\n"), message + b"\r\n")
        self.say(b"gw1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
        self.failed_with(BackendRejected)

    def test_long_credentials_by_plain(self) -> None:
        """
        Credentials that make LOGIN longer than Dovecot's login process reads (1 KiB, then "BYE
        Input buffer full") go as AUTHENTICATE PLAIN where the backend offers it; up to the
        bound, and where it does not, as LOGIN.
        """
        password = b"p" * 2000
        message = base64.b64encode(b"\0alice\0" + password)
        self.start(password=password)
        self.assertEqual(self.greet(b"IMAP4rev1 SASL-IR AUTH=PLAIN"), b"gw2 AUTHENTICATE PLAIN " + message + b"\r\n")
        self.say(b"gw2 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
        self.logged_in()
        self.start(password=password)
        self.assertEqual(self.greet(b"IMAP4rev1 AUTH=PLAIN"), b"gw2 AUTHENTICATE PLAIN\r\n")
        self.assertEqual(self.say(b"+ \r\n"), message + b"\r\n")
        self.say(b"gw2 OK [CAPABILITY IMAP4rev1] Logged in\r\n")
        self.logged_in()
        fits = b"p" * (1000 - len(b"gw1 LOGIN alice \r\n"))  # a LOGIN of exactly 1000 bytes
        self.start(password=fits)
        self.assertEqual(self.greet(b"IMAP4rev1 SASL-IR AUTH=PLAIN"), b"gw1 LOGIN alice %s\r\n" % fits)
        self.start(password=password)
        self.assertEqual(self.greet(b"IMAP4rev1 SASL-IR"), b"gw1 LOGIN alice %s\r\n" % password)

    def test_master_login_nul(self) -> None:
        """A NUL would shift the PLAIN fields: such a master login is rejected and nothing is sent."""
        self.start(user="alice\0admin", password=b"masterpw", master_user="admin")
        self.assertEqual(self.greet(b"IMAP4rev1 SASL-IR AUTH=PLAIN"), b"")
        self.failed_with(BackendRejected)

    def test_master_login_needs_plain(self) -> None:
        """
        A backend that does not offer AUTH=PLAIN (Dovecot drops it where it would refuse a
        clear-text password) is unavailable for a master login; nothing is sent.
        """
        self.start(user="alice", password=b"masterpw", master_user="admin")
        self.assertEqual(self.greet(b"IMAP4rev1 SASL-IR LOGINDISABLED"), b"")
        self.assertIn("AUTH=PLAIN", str(self.failed_with(BackendUnavailable)))

    def test_nul_in_password(self) -> None:
        """A password holding NUL cannot go into LOGIN: the login is rejected and nothing is sent."""
        self.start(password=b"se\0cret")
        self.assertEqual(self.greet(), b"")
        error = self.failed_with(BackendRejected)
        self.assertNotIn("se\0cret", str(error))

    def test_logindisabled(self) -> None:
        """LOGINDISABLED makes the backend unavailable and the password is never sent."""
        self.assertEqual(self.greet(b"IMAP4rev1 LOGINDISABLED"), b"")
        self.failed_with(BackendUnavailable)


class LoginReplyTests(ImapLoginTestBase):
    """The backend's answer to LOGIN."""

    def setUp(self) -> None:
        super().setUp()
        self.assertEqual(self.say(b"* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN] Dovecot ready.\r\n"),
                         b"gw1 LOGIN alice secret\r\n")

    def test_ok_with_capabilities(self) -> None:
        """A tagged OK with CAPABILITY logs in with those capabilities and sends nothing more."""
        self.assertEqual(self.say(b"gw1 OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n"), b"")
        self.assertEqual(self.logged_in().capabilities, (b"IMAP4rev1", b"IDLE", b"MOVE"))

    def test_ok_without_capabilities(self) -> None:
        """After a plain tagged OK the capabilities are asked again; the pre-login ones are not reused."""
        self.assertEqual(self.say(b"gw1 OK Logged in\r\n"), b"gw2 CAPABILITY\r\n")
        self.assertNoResult(self.protocol.result)
        self.say(b"* CAPABILITY IMAP4rev1 IDLE\r\ngw2 OK Capability completed.\r\n")
        self.assertEqual(self.logged_in().capabilities, (b"IMAP4rev1", b"IDLE"))

    def test_alerts_kept_for_the_user(self) -> None:
        """
        ALERTs, untagged or on the tagged OK, are kept as untagged OK [ALERT] lines for the client
        (RFC 9051 7.1: the user must see them); other untagged responses are not.
        """
        self.say(b"* OK [ALERT] Your password expires in 3 days\r\n* NO [ALERT] Mailbox nearly full\r\n"
                 b"* OK [UNSEEN 3] Not an alert\r\n* OK Plain text\r\n"
                 b"gw1 OK [ALERT] Maintenance tonight at 22:00\r\n")
        self.say(b"* CAPABILITY IMAP4rev1\r\ngw2 OK Capability completed.\r\n")
        self.assertEqual(self.logged_in().notices,
                         (b"* OK [ALERT] Your password expires in 3 days\r\n", b"* OK [ALERT] Mailbox nearly full\r\n",
                          b"* OK [ALERT] Maintenance tonight at 22:00\r\n"))

    def test_alerts_bounded(self) -> None:
        """A backend that sends alerts without end has the first eight kept."""
        self.say(b"".join(b"* OK [ALERT] number %d\r\n" % n for n in range(100)) + b"gw1 OK [CAPABILITY IMAP4rev1] Hi\r\n")
        self.assertEqual(self.logged_in().notices, tuple(b"* OK [ALERT] number %d\r\n" % n for n in range(8)))

    def test_untagged_capability_before_ok(self) -> None:
        """An untagged CAPABILITY before the tagged OK is taken as the post-login capabilities."""
        self.assertEqual(self.say(b"* CAPABILITY IMAP4rev1 SORT\r\ngw1 OK Logged in\r\n"), b"")
        self.assertEqual(self.logged_in().capabilities, (b"IMAP4rev1", b"SORT"))

    def test_authenticationfailed(self) -> None:
        """
        NO [AUTHENTICATIONFAILED] is a rejection of the credentials; the log gets the status and
        code, not the text, which might repeat the password.
        """
        self.say(b"gw1 NO [AUTHENTICATIONFAILED] Wrong password: secret\r\n")
        self.assertEqual(str(self.failed_with(BackendRejected)), "backend refused the login: NO [AUTHENTICATIONFAILED]")

    def test_failure_text_not_logged(self) -> None:
        """Neither is the text of a NO without a code, nor of a BAD, nor of a NO that says the backend is unavailable."""
        for answer, kind, logged in (
                (b"gw1 NO secret was wrong\r\n", BackendRejected, "backend refused the login: NO"),
                (b"gw1 BAD [CLIENTBUG] secret?\r\n", BackendUnavailable, "backend login failed: BAD [CLIENTBUG]"),
                (b"gw1 NO [UNAVAILABLE] secret\r\n", BackendUnavailable, "backend login failed: NO [UNAVAILABLE]")):
            self.start()
            self.say(b"* OK [CAPABILITY IMAP4rev1] ready\r\n")
            self.say(answer)
            self.assertEqual(str(self.failed_with(kind)), logged)

    def test_other_rejection_codes(self) -> None:
        """NO [AUTHORIZATIONFAILED] and NO [EXPIRED] are rejections too."""
        for code in (b"AUTHORIZATIONFAILED", b"EXPIRED"):
            self.start()
            self.say(b"* OK [CAPABILITY IMAP4rev1] ready\r\n")
            self.say(b"gw1 NO [" + code + b"] no\r\n")
            self.failed_with(BackendRejected)

    def test_no_without_code(self) -> None:
        """A NO without a response code is a rejection of the credentials."""
        self.say(b"gw1 NO Login failed.\r\n")
        self.failed_with(BackendRejected)

    def test_session_refusals(self) -> None:
        """
        NO [LIMIT] (Dovecot's, for a user past mail_max_userip_connections), [INUSE], [CONTACTADMIN]
        and [OVERQUOTA] are a backend that is up refusing this session: its status and code, not
        its text, are the refusal.
        """
        for code in (b"LIMIT", b"INUSE", b"CONTACTADMIN", b"OVERQUOTA"):
            self.start()
            self.say(b"* OK [CAPABILITY IMAP4rev1] ready\r\n")
            self.say(b"gw1 NO [" + code + b"] Too many sessions for alice with secret\r\n")
            self.assertEqual(self.failed_with(BackendRefused).reply, b"NO [" + code + b"]")  # type: ignore[attr-defined]

    def test_no_unavailable(self) -> None:
        """NO [UNAVAILABLE] is the backend failing, not a rejection."""
        self.say(b"gw1 NO [UNAVAILABLE] Internal error occurred.\r\n")
        error = self.failed_with(BackendUnavailable)
        self.assertIn("[UNAVAILABLE]", str(error))

    def test_bad(self) -> None:
        """BAD to LOGIN makes the backend unavailable."""
        self.say(b"gw1 BAD Error in IMAP command LOGIN\r\n")
        self.failed_with(BackendUnavailable)

    def test_bye_after_login(self) -> None:
        """BYE while LOGIN is pending makes the backend unavailable."""
        self.say(b"* BYE Server shutting down.\r\n")
        self.failed_with(BackendUnavailable)

    def test_bye_text_logged_only_before_credentials(self) -> None:
        """A BYE before the credentials are sent cannot quote them: its text is kept for the log."""
        self.start()
        self.say(b"* BYE Too many connections from your address\r\n")
        self.assertIn("Too many connections", str(self.failed_with(BackendUnavailable)))
        self.start()
        self.say(b"* OK [CAPABILITY IMAP4rev1] Dovecot ready.\r\n* BYE [UNAVAILABLE] Quoted back\r\n")
        self.assertEqual(str(self.failed_with(BackendUnavailable)), "backend said BYE: BYE [UNAVAILABLE]")

    def test_announced_kept_at_login(self) -> None:
        """
        What the backend offered before login is kept by each login that sends the credentials (the
        connector learns it from there, not only from its probe at start); what it says after login
        is the session's.
        """
        self.start()
        self.say(b"* OK [CAPABILITY IMAP4rev1 SASL-IR ENABLE IDLE AUTH=PLAIN] Dovecot ready.\r\n")
        self.assertEqual(self.protocol.announced, (b"IMAP4rev1", b"SASL-IR", b"ENABLE", b"IDLE", b"AUTH=PLAIN"))
        self.say(b"gw1 OK [CAPABILITY IMAP4rev1 ENABLE IDLE MOVE] Logged in\r\n")
        self.assertEqual(self.logged_in().capabilities, (b"IMAP4rev1", b"ENABLE", b"IDLE", b"MOVE"))
        self.assertEqual(self.protocol.announced, (b"IMAP4rev1", b"SASL-IR", b"ENABLE", b"IDLE", b"AUTH=PLAIN"))

    def test_bye_while_asking_capabilities(self) -> None:
        """BYE while the post-login CAPABILITY is pending makes the backend unavailable."""
        self.say(b"gw1 OK Logged in\r\n")
        self.say(b"* BYE Server shutting down.\r\n")
        self.failed_with(BackendUnavailable)

    def test_malformed_line(self) -> None:
        """A line that is not an IMAP response makes the backend unavailable."""
        self.say(b"gw1\r\n")
        self.failed_with(BackendUnavailable)

    def test_unterminated_code(self) -> None:
        """A response code without its closing bracket makes the backend unavailable."""
        self.say(b"gw1 OK [CAPABILITY IMAP4rev1 Logged in\r\n")
        self.failed_with(BackendUnavailable)

    def test_unknown_tag(self) -> None:
        """A tagged answer to a command never sent makes the backend unavailable."""
        self.say(b"gw7 OK [CAPABILITY IMAP4rev1] Logged in\r\n")
        self.failed_with(BackendUnavailable)

    def test_over_long_line(self) -> None:
        """A line longer than the limit makes the backend unavailable."""
        self.say(b"* OK " + b"x" * ImapBackendLogin.MAX_LENGTH + b"\r\n")
        self.failed_with(BackendUnavailable)

    def test_connection_lost(self) -> None:
        """The connection closing before the answer makes the backend unavailable."""
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(self.protocol.result, BackendUnavailable)

    def test_lines_after_failure_ignored(self) -> None:
        """Once the login has failed, further lines are neither answered nor change the outcome."""
        self.say(b"gw1 NO Login failed.\r\n")
        self.assertEqual(self.say(b"* OK still here\r\n+ more\r\ngw1 OK [CAPABILITY IMAP4rev1] yes\r\n"), b"")
        self.failed_with(BackendRejected)


class ProbeTests(ImapLoginTestBase):
    """What the backend offers before login, learned at start without logging in."""

    def test_probe(self) -> None:
        """The greeting's capabilities, then LOGOUT, written before the result fires, and the close."""
        self.start(probe=True)
        written_by_then: list[bytes] = []
        self.protocol.result.addCallback(lambda protocol: written_by_then.append(self.transport.value()) or protocol)
        self.assertEqual(self.say(b"* OK [CAPABILITY IMAP4rev1 ID AUTH=PLAIN] Dovecot ready.\r\n"), b"gw1 LOGOUT\r\n")
        self.assertEqual(written_by_then, [b"gw1 LOGOUT\r\n"])
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.successResultOf(self.protocol.result).announced, (b"IMAP4rev1", b"ID", b"AUTH=PLAIN"))

    def test_probe_asks_capability(self) -> None:
        """Without capabilities in the greeting, the probe asks for them."""
        self.start(probe=True)
        self.assertEqual(self.say(b"* OK Dovecot ready.\r\n"), b"gw1 CAPABILITY\r\n")
        written = self.say(b"* CAPABILITY IMAP4rev1 LOGINDISABLED\r\ngw1 OK Capability completed.\r\n")
        self.assertEqual(written, b"gw2 LOGOUT\r\n")
        self.assertEqual(self.successResultOf(self.protocol.result).announced, (b"IMAP4rev1", b"LOGINDISABLED"))

    def test_probe_over_starttls(self) -> None:
        """Over STARTTLS the probe reports what the backend offers under TLS, not what it said in clear."""
        self.start(probe=True, settings=STARTTLS)
        self.say(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] Dovecot ready.\r\n")
        self.assertEqual(self.say(b"gw1 OK Begin TLS negotiation now.\r\n"), b"gw2 CAPABILITY\r\n")
        self.assertEqual(self.say(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\ngw2 OK done\r\n"), b"gw3 LOGOUT\r\n")
        self.assertEqual(self.successResultOf(self.protocol.result).announced, (b"IMAP4rev1", b"AUTH=PLAIN"))

    def test_probe_bye(self) -> None:
        """A backend that greets with BYE is unavailable to a probe as to a login."""
        self.start(probe=True)
        self.say(b"* BYE Too many connections\r\n")
        self.failed_with(BackendUnavailable)


class StartTLSTests(ImapLoginTestBase):
    """Backend TLS by STARTTLS."""

    settings = STARTTLS

    def test_requires_starttls(self) -> None:
        """A backend without STARTTLS is unavailable; nothing is sent and TLS is not started."""
        self.assertEqual(self.say(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] Dovecot ready.\r\n"), b"")
        self.failed_with(BackendUnavailable)
        self.assertIsNone(self.transport.tls_options)

    def test_starttls_then_login(self) -> None:
        """STARTTLS is sent first; on OK TLS starts, CAPABILITY is asked again, then LOGIN follows."""
        written = self.say(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] Dovecot ready.\r\n")
        self.assertEqual(written, b"gw1 STARTTLS\r\n")
        self.assertIsNone(self.transport.tls_options)
        self.assertEqual(self.say(b"gw1 OK Begin TLS negotiation now.\r\n"), b"gw2 CAPABILITY\r\n")
        self.assertIs(self.transport.tls_options, TLS_CREATOR)
        written = self.say(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\ngw2 OK Capability completed.\r\n")
        self.assertEqual(written, b"gw3 LOGIN alice secret\r\n")
        self.say(b"gw3 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
        self.logged_in()

    def test_cleartext_capabilities_forgotten(self) -> None:
        """Capabilities announced before TLS (LITERAL+, ID) are not used after it."""
        self.start(password=b"p\xc3\xa4ss", settings=dataclasses.replace(STARTTLS, forward_client_ip=True))
        self.say(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LITERAL+ ID] Dovecot ready.\r\n")
        self.assertEqual(self.say(b"gw1 OK Begin TLS negotiation now.\r\n"), b"gw2 CAPABILITY\r\n")
        written = self.say(b"* CAPABILITY IMAP4rev1\r\ngw2 OK Capability completed.\r\n")
        self.assertEqual(written, b"gw3 LOGIN alice {5}\r\n")

    def test_capabilities_asked_before_starttls(self) -> None:
        """Without capabilities in the greeting, CAPABILITY comes before STARTTLS."""
        self.assertEqual(self.say(b"* OK Dovecot ready.\r\n"), b"gw1 CAPABILITY\r\n")
        written = self.say(b"* CAPABILITY IMAP4rev1 STARTTLS\r\ngw1 OK Capability completed.\r\n")
        self.assertEqual(written, b"gw2 STARTTLS\r\n")

    def test_starttls_refused(self) -> None:
        """STARTTLS answered NO makes the backend unavailable without starting TLS."""
        self.say(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] Dovecot ready.\r\n")
        self.assertEqual(self.say(b"gw1 NO TLS not configured\r\n"), b"")
        self.failed_with(BackendUnavailable)
        self.assertIsNone(self.transport.tls_options)

    def test_cleartext_after_starttls_ok_not_acted_on(self) -> None:
        """
        Lines the backend sent in clear after its STARTTLS OK (a response injection) are never
        taken for answers given under TLS: no LOGIN is sent and no login succeeds on them.
        """
        self.say(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] Dovecot ready.\r\n")
        written = self.say(b"gw1 OK Begin TLS negotiation now.\r\n"
                           b"* CAPABILITY IMAP4rev1\r\n"
                           b"gw2 OK Capability completed.\r\n"
                           b"gw3 OK [CAPABILITY IMAP4rev1] Logged in\r\n")
        self.assertIs(self.transport.tls_options, TLS_CREATOR)
        self.assertNotIn(b"LOGIN", written)
        if self.protocol.result.called:
            self.failed_with(BackendUnavailable)


class RelayTests(ImapLoginTestBase):
    """After the login, the protocol moves bytes only."""

    def setUp(self) -> None:
        super().setUp()
        self.say(b"* OK [CAPABILITY IMAP4rev1] Dovecot ready.\r\n")

    def test_attach_relays_buffered_and_later_bytes(self) -> None:
        """Bytes after the tagged OK, before and after attach, reach the client unparsed and in order."""
        self.say(b"gw1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n* 3 EXISTS\r\n")
        protocol = self.logged_in()
        self.say(b"* 4 EXISTS\r\n")
        client = StringTransport()
        splice = Splice(client, self.transport, Clock())
        protocol.attach(splice)
        self.assertEqual(client.value(), b"* 3 EXISTS\r\n* 4 EXISTS\r\n")
        self.assertEqual(self.transport.producerState, "producing")
        self.protocol.dataReceived(b"* 5 EXPUNGE\r\n+ idling\r\npartial")
        self.assertEqual(client.value(), b"* 3 EXISTS\r\n* 4 EXISTS\r\n* 5 EXPUNGE\r\n+ idling\r\npartial")
        self.assertEqual(splice.from_backend_bytes, len(client.value()))
        self.assertEqual(self.transport.value(), b"")

    def test_attributes_in_slots(self) -> None:
        """
        A relaying backend session keeps its attributes and Twisted's in slots: it has no dict. Nor
        does it keep its login's spent Deferred.
        """
        self.say(b"gw1 OK [CAPABILITY IMAP4rev1] Logged in\r\n")
        self.logged_in().attach(Splice(StringTransport(), self.transport, Clock()))
        self.protocol.dataReceived(b"* 4 EXISTS\r\n")
        self.assertEqual(unslotted(self.protocol), set())
        self.assertEqual([each for each in gc.get_referents(self.protocol) if isinstance(each, Deferred)], [])

    def test_password_not_kept(self) -> None:
        """Once relaying, the backend session holds the password no longer."""
        self.say(b"gw1 OK [CAPABILITY IMAP4rev1] Logged in\r\n")
        self.logged_in().attach(Splice(StringTransport(), self.transport, Clock()))
        self.assertIsNone(self.protocol.request)

    def test_backend_lost_closes_client(self) -> None:
        """The backend going away after attach closes the client connection."""
        self.say(b"gw1 OK [CAPABILITY IMAP4rev1] Logged in\r\n")
        client = StringTransport()
        self.logged_in().attach(Splice(client, self.transport, Clock()))
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(client.disconnecting)
        self.assertIsNone(self.protocol.result)  # spent once relaying: the loss is the relay's, not the login's


class SecrecyTests(ImapLoginTestBase):
    """The password stays out of every exception message."""

    PASSWORD = b"Sup3r-s3cret"

    def assert_secret(self, error: Exception) -> None:
        """Assert neither the text nor the repr of C{error} holds the password."""
        text = self.PASSWORD.decode("ascii")
        self.assertNotIn(text, str(error))
        self.assertNotIn(text, repr(error))

    def test_failure_messages(self) -> None:
        """Rejection, BAD, BYE, a lost connection, LOGINDISABLED and an unsendable password name no password."""
        for capabilities, answer, kind in (
            (b"IMAP4rev1", b"gw1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n", BackendRejected),
            (b"IMAP4rev1", b"gw1 BAD Error in IMAP command LOGIN\r\n", BackendUnavailable),
            (b"IMAP4rev1", b"* BYE Disconnected for inactivity.\r\n", BackendUnavailable),
            (b"IMAP4rev1", b"* BYE Bad command: gw1 LOGIN alice " + self.PASSWORD + b"\r\n", BackendUnavailable),
            (b"IMAP4rev1", b"* BYE [UNAVAILABLE] " + self.PASSWORD + b"\r\n", BackendUnavailable),
            (b"IMAP4rev1 LOGINDISABLED", b"", BackendUnavailable),
        ):
            self.start(password=self.PASSWORD)
            self.say(b"* OK [CAPABILITY " + capabilities + b"] Dovecot ready.\r\n" + answer)
            self.assert_secret(self.failed_with(kind))
        self.start(password=self.PASSWORD)
        self.say(b"* OK [CAPABILITY IMAP4rev1] Dovecot ready.\r\n")
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.assert_secret(self.failureResultOf(self.protocol.result, BackendUnavailable).value)
        self.start(password=self.PASSWORD + b"\0")
        self.say(b"* OK [CAPABILITY IMAP4rev1] Dovecot ready.\r\n")
        self.assert_secret(self.failed_with(BackendRejected))
