"""The POP3 login dialogue with the backend, driven line by line over a StringTransport."""

from __future__ import annotations

import base64
import dataclasses

from frontend_harness import unslotted
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from gateway.backend import BackendRefused, BackendRejected, BackendUnavailable, ClientAddress, LoginRequest
from gateway.config import BackendSettings
from gateway.pop3_backend import Pop3BackendLogin
from gateway.relay import Splice
from gateway.testing.fakes import BACKEND_SETTINGS, TLSStringTransport

CLIENT = ClientAddress("192.0.2.7", 50123, "198.51.100.1", 995, "pOp3sEsSiOn1")
TLS_CREATOR = object()
SETTINGS = dataclasses.replace(BACKEND_SETTINGS, port=110)
FORWARDING = dataclasses.replace(SETTINGS, forward_client_ip=True)
STLS = dataclasses.replace(SETTINGS, tls="starttls")
GREETING = b"+OK Dovecot ready.\r\n"
CAPA = b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nUSER\r\nSASL PLAIN\r\n.\r\n"
CAPABILITIES = (b"CAPA", b"TOP", b"UIDL", b"RESP-CODES", b"PIPELINING", b"USER", b"SASL PLAIN")
# Dovecot 2.3's CAPA where it refuses a clear-text password (disable_plaintext_auth, not a trusted
# network, no TLS): no USER and no SASL mechanism; and its answer to USER there.
CLEAR_REFUSED_CAPA = b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\nSASL\r\n.\r\n"
PLAINTEXT_DISALLOWED = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.\r\n"


class Pop3LoginTestBase(SynchronousTestCase):
    """One POP3 login dialogue on a transport that records STARTTLS."""

    settings: BackendSettings = SETTINGS

    def setUp(self) -> None:
        self.start()

    def start(self, user: str = "alice", password: bytes = b"secret", master_user: str | None = None,
              settings: BackendSettings | None = None, probe: bool = False, client: ClientAddress = CLIENT) -> None:
        """Begin a fresh dialogue (a capability probe with C{probe}), replacing any earlier one."""
        request = None if probe else LoginRequest(user, password, client, master_user)
        self.protocol = Pop3BackendLogin(request, settings or self.settings, TLS_CREATOR)  # type: ignore[arg-type]
        self.transport = TLSStringTransport()
        self.protocol.makeConnection(self.transport)

    def say(self, data: bytes) -> bytes:
        """Feed the backend's bytes and return what the dialogue wrote in reply."""
        self.protocol.dataReceived(data)
        written = self.transport.value()
        self.transport.clear()
        return written

    def reach_user(self, capa: bytes = CAPA) -> None:
        """Run the greeting and CAPA and check that USER follows."""
        self.assertEqual(self.say(GREETING), b"CAPA\r\n")
        self.assertEqual(self.say(capa), b"USER alice\r\n")

    def failed_with(self, kind: type[Exception]) -> Exception:
        """Assert the login failed with C{kind} and dropped the connection; return the exception."""
        failure = self.failureResultOf(self.protocol.result, kind)
        self.assertTrue(self.transport.disconnecting)
        return failure.value  # type: ignore[return-value]

    def refusal(self) -> bytes:
        """Assert the backend refused the session and dropped the connection; return its reply."""
        error = self.failed_with(BackendRefused)
        assert isinstance(error, BackendRefused)
        return error.reply

    def logged_in(self) -> Pop3BackendLogin:
        """Assert the login succeeded and the backend is no longer read; return the protocol."""
        self.assertIs(self.successResultOf(self.protocol.result), self.protocol)
        self.assertEqual(self.transport.producerState, "paused")
        self.assertFalse(self.transport.disconnecting)
        return self.protocol


class GreetingAndCapaTests(Pop3LoginTestBase):
    """The greeting and CAPA."""

    def test_greeting_err(self) -> None:
        """A -ERR greeting makes the backend unavailable without any command sent."""
        self.assertEqual(self.say(b"-ERR [SYS/TEMP] Too many connections\r\n"), b"")
        self.failed_with(BackendUnavailable)

    def test_capa_parsed(self) -> None:
        """The CAPA lines become C{announced}, in order, before USER is sent."""
        self.assertIsNone(self.protocol.announced)
        self.reach_user()
        self.assertEqual(self.protocol.announced, CAPABILITIES)

    def test_capa_dot_stuffed(self) -> None:
        """A dot-stuffed CAPA line loses its leading dot."""
        self.reach_user(b"+OK Capability list follows\r\nTOP\r\n..X-DOT\r\nUSER\r\n.\r\n")
        self.assertEqual(self.protocol.announced, (b"TOP", b".X-DOT", b"USER"))

    def test_capa_in_pieces(self) -> None:
        """A CAPA answer split across reads is collected whole."""
        self.say(GREETING)
        self.assertEqual(self.say(b"+OK\r\nTOP\r\nUS"), b"")
        self.assertEqual(self.say(b"ER\r\n"), b"")
        self.assertEqual(self.say(b".\r\n"), b"USER alice\r\n")
        self.assertEqual(self.protocol.announced, (b"TOP", b"USER"))

    def test_capa_bounded(self) -> None:
        """A CAPA answer of too many lines, or of too long a line, makes the backend unavailable."""
        for capa in (b"+OK\r\n" + b"X\r\n" * 65, b"+OK\r\nTOP\r\n" + b"X" * 1001 + b"\r\n"):
            self.start()
            self.say(GREETING)
            self.assertEqual(self.say(capa), b"")
            self.failed_with(BackendUnavailable)
        self.start()
        self.reach_user(b"+OK\r\nUSER\r\n" + b"X\r\n" * 62 + b"X" * 1000 + b"\r\n.\r\n")  # at the limits: taken
        self.assertEqual(len(self.protocol.announced), 64)

    def test_capa_err(self) -> None:
        """A backend that answers CAPA with -ERR announces nothing, and the login goes on."""
        self.reach_user(b"-ERR Unknown command\r\n")
        self.assertEqual(self.protocol.announced, ())

    def test_malformed_line(self) -> None:
        """A line that is neither +OK nor -ERR makes the backend unavailable."""
        self.say(GREETING)
        self.say(b"* OK this is IMAP\r\n")
        self.failed_with(BackendUnavailable)

    def test_over_long_line(self) -> None:
        """A line longer than the limit makes the backend unavailable."""
        self.say(b"+OK " + b"x" * Pop3BackendLogin.MAX_LENGTH + b"\r\n")
        self.failed_with(BackendUnavailable)

    def test_connection_lost(self) -> None:
        """The connection closing during the login makes the backend unavailable."""
        self.reach_user()
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(self.protocol.result, BackendUnavailable)


class XclientTests(Pop3LoginTestBase):
    """Forwarding the client's address with XCLIENT."""

    settings = FORWARDING

    def test_xclient_capability(self) -> None:
        """With forward_client_ip and an XCLIENT capability, XCLIENT carries the client's address and port."""
        self.say(GREETING)
        written = self.say(b"+OK\r\nUSER\r\nXCLIENT\r\n.\r\n")
        self.assertEqual(written, b"XCLIENT ADDR=192.0.2.7 PORT=50123 SESSION=pOp3sEsSiOn1\r\n")
        self.assertEqual(self.say(b"+OK\r\n"), b"USER alice\r\n")

    def test_xclient_greeting_code(self) -> None:
        """An [XCLIENT] greeting code offers XCLIENT even when CAPA does not list it."""
        self.say(b"+OK [XCLIENT] Dovecot ready.\r\n")
        self.assertEqual(self.say(CAPA), b"XCLIENT ADDR=192.0.2.7 PORT=50123 SESSION=pOp3sEsSiOn1\r\n")

    def test_ipv6_client(self) -> None:
        """An IPv6 client address goes into XCLIENT as it is."""
        self.start(client=ClientAddress("2001:db8::7", 4000, "2001:db8::1", 110, "pOp3sEsSiOn2"))
        self.say(b"+OK [XCLIENT] Dovecot ready.\r\n")
        self.assertEqual(self.say(CAPA), b"XCLIENT ADDR=2001:db8::7 PORT=4000 SESSION=pOp3sEsSiOn2\r\n")

    def test_xclient_refused_still_logs_in(self) -> None:
        """
        A backend that refuses XCLIENT is asked again without SESSION (not every XCLIENT has it);
        refused again, it still gets USER, and its answer is kept for the connector to log.
        """
        self.say(b"+OK [XCLIENT] Dovecot ready.\r\n")
        self.say(CAPA)
        self.assertEqual(self.say(b"-ERR Unknown field SESSION\r\n"), b"XCLIENT ADDR=192.0.2.7 PORT=50123\r\n")
        self.assertIsNone(self.protocol.address_not_forwarded)
        self.assertEqual(self.say(b"-ERR Not\x01 allowed\r\n"), b"USER alice\r\n")
        self.assertEqual(self.protocol.address_not_forwarded, "the backend refused XCLIENT: Not? allowed")
        self.assertNoResult(self.protocol.result)

    def test_xclient_without_session(self) -> None:
        """A backend that takes XCLIENT without SESSION has the address: nothing is kept as refused."""
        self.say(b"+OK [XCLIENT] ready.\r\n")
        self.say(CAPA)
        self.say(b"-ERR Bad XCLIENT attribute\r\n")
        self.assertEqual(self.say(b"+OK Updated\r\n"), b"USER alice\r\n")
        self.assertIsNone(self.protocol.address_not_forwarded)

    def test_not_offered(self) -> None:
        """
        Without an XCLIENT offer no XCLIENT is sent, even with forward_client_ip; the dialogue, and
        a probe's, says why the address is not forwarded (Dovecot offers it to trusted networks only).
        """
        self.reach_user()
        self.assertTrue(self.protocol.address_not_forwarded.startswith("the backend does not offer XCLIENT: "))
        self.start(probe=True)
        self.say(GREETING)
        self.assertEqual(self.say(CAPA), b"QUIT\r\n")
        self.assertTrue(self.protocol.address_not_forwarded.startswith("the backend does not offer XCLIENT: "))

    def test_unix_socket_client(self) -> None:
        """A client of a UNIX socket listener has no address to forward: no XCLIENT, and nothing to say of it."""
        self.start(client=ClientAddress("UNIXAddress(None)", 0, "", 0, "uNiXsEsSiOn1"))
        self.say(b"+OK [XCLIENT] Dovecot ready.\r\n")
        self.assertEqual(self.say(CAPA), b"USER alice\r\n")
        self.assertIsNone(self.protocol.address_not_forwarded)

    def test_not_forwarding(self) -> None:
        """Without forward_client_ip no XCLIENT is sent, even when the backend offers it."""
        self.start(settings=SETTINGS)
        self.say(b"+OK [XCLIENT] Dovecot ready.\r\n")
        self.assertEqual(self.say(b"+OK\r\nUSER\r\nXCLIENT\r\n.\r\n"), b"USER alice\r\n")
        self.assertIsNone(self.protocol.address_not_forwarded)
        self.start(settings=SETTINGS, probe=True)
        self.say(GREETING)
        self.assertEqual(self.say(CAPA), b"QUIT\r\n")
        self.assertIsNone(self.protocol.address_not_forwarded, "nothing to say when nothing is to be forwarded")

    def test_greeting_offer_kept_across_stls(self) -> None:
        """
        Dovecot offers XCLIENT in its greeting only, before STLS: with backend STARTTLS the offer
        still stands after TLS (the CAPA after it does not list XCLIENT), and XCLIENT is sent.
        """
        self.start(settings=dataclasses.replace(STLS, forward_client_ip=True))
        self.assertEqual(self.say(b"+OK [XCLIENT] Dovecot ready.\r\n"), b"CAPA\r\n")
        self.assertEqual(self.say(b"+OK\r\nSTLS\r\n.\r\n"), b"STLS\r\n")
        self.assertEqual(self.say(b"+OK Begin TLS negotiation now.\r\n"), b"CAPA\r\n")
        self.assertEqual(self.say(CAPA), b"XCLIENT ADDR=192.0.2.7 PORT=50123 SESSION=pOp3sEsSiOn1\r\n")
        self.assertIsNone(self.protocol.address_not_forwarded)


class UserPassTests(Pop3LoginTestBase):
    """USER, PASS and the backend's answers."""

    def test_login(self) -> None:
        """USER then PASS with a password holding spaces; +OK logs in with the announced capabilities."""
        self.start(password=b"pass word  with spaces ")
        self.reach_user()
        self.assertEqual(self.say(b"+OK\r\n"), b"PASS pass word  with spaces \r\n")
        self.assertEqual(self.say(b"+OK Logged in.\r\n"), b"")
        self.assertEqual(self.logged_in().capabilities, CAPABILITIES)

    def test_master_user(self) -> None:
        """
        A master login is AUTH PLAIN with an initial response, the user as authorization
        identity: a user name holding Dovecot's usual separator "*" goes through as it is.
        """
        self.start(user="ops*team", password=b"masterpw", master_user="admin")
        self.say(GREETING)
        self.assertEqual(self.say(CAPA), b"AUTH PLAIN " + base64.b64encode(b"ops*team\0admin\0masterpw") + b"\r\n")
        self.say(b"+OK Logged in.\r\n")
        self.assertEqual(self.successResultOf(self.protocol.result).capabilities, CAPABILITIES)

    def test_master_user_long_credentials(self) -> None:
        """
        An AUTH line that would pass 255 octets (RFC 2449 4) sends its response after the
        server's "+ " instead (RFC 5034 4).
        """
        user = "u" * 200
        for continuation in (b"+ \r\n", b"+\r\n"):  # Dovecot's, and one without the space
            self.start(user=user, password=b"masterpw", master_user="admin")
            self.say(GREETING)
            self.assertEqual(self.say(CAPA), b"AUTH PLAIN\r\n")
            self.assertEqual(self.say(continuation),
                             base64.b64encode(user.encode() + b"\0admin\0masterpw") + b"\r\n")
            self.assertEqual(self.say(b"+OK Logged in.\r\n"), b"")
            self.assertEqual(self.successResultOf(self.protocol.result).capabilities, CAPABILITIES)

    def test_master_user_answered_before_credentials(self) -> None:
        """A backend that answers AUTH before asking for the credentials has no verdict on them: unavailable."""
        self.start(user="u" * 200, password=b"masterpw", master_user="admin")
        self.say(GREETING)
        self.say(CAPA)
        self.assertEqual(self.say(b"-ERR [AUTH] Authentication failed.\r\n"), b"")
        self.failed_with(BackendUnavailable)

    def test_unexpected_continuation(self) -> None:
        """A "+ " the dialogue did not ask for makes the backend unavailable."""
        self.reach_user()
        self.assertEqual(self.say(b"+ \r\n"), b"")
        self.failed_with(BackendUnavailable)

    def test_master_user_needs_plain(self) -> None:
        """A master login needs SASL PLAIN in the CAPA answer, USER alone does not do."""
        self.start(user="alice", password=b"masterpw", master_user="admin")
        self.say(GREETING)
        self.assertEqual(self.say(b"+OK\r\nUSER\r\nSASL LOGIN\r\n.\r\n"), b"")
        self.failed_with(BackendUnavailable)

    def test_auth_code_rejected(self) -> None:
        """-ERR [AUTH] to PASS is a rejection of the credentials."""
        self.reach_user()
        self.say(b"+OK\r\n")
        self.say(b"-ERR [AUTH] Authentication failed.\r\n")
        self.failed_with(BackendRejected)

    def test_err_without_code_rejected(self) -> None:
        """-ERR without a response code to PASS is a rejection of the credentials."""
        self.reach_user()
        self.say(b"+OK\r\n")
        self.say(b"-ERR Authentication failed.\r\n")
        self.failed_with(BackendRejected)

    def test_failure_text_not_logged(self) -> None:
        """The log gets -ERR and the response code of an answer to the login, not its text, which might repeat the password."""
        for answer, kind, logged in ((b"-ERR [AUTH] bad password secret\r\n", BackendRejected,
                                      "backend refused the login: -ERR [AUTH]"),
                                     (b"-ERR secret?\r\n", BackendRejected, "backend refused the login: -ERR"),
                                     (b"-ERR [SYS/TEMP] secret\r\n", BackendUnavailable,
                                      "backend login failed: -ERR [SYS/TEMP]")):
            self.start()
            self.reach_user()
            self.say(b"+OK\r\n")
            self.say(answer)
            self.assertEqual(str(self.failed_with(kind)), logged)

    def test_user_refused(self) -> None:
        """-ERR to USER is a rejection, and PASS is never sent."""
        self.reach_user()
        self.assertEqual(self.say(b"-ERR [AUTH] No such user\r\n"), b"")
        self.failed_with(BackendRejected)

    def test_in_use_refused(self) -> None:
        """-ERR [IN-USE] is a refusal whose reply is the backend's text."""
        self.reach_user()
        self.say(b"+OK\r\n")
        self.say(b"-ERR [IN-USE] Mailbox is locked by another POP3 session.\r\n")
        self.assertEqual(self.refusal(), b"[IN-USE] Mailbox is locked by another POP3 session.")

    def test_login_delay_refused(self) -> None:
        """-ERR [LOGIN-DELAY] is a refusal whose reply is the backend's text."""
        self.reach_user()
        self.say(b"+OK\r\n")
        self.say(b"-ERR [LOGIN-DELAY] Wait 300 seconds between logins.\r\n")
        self.assertEqual(self.refusal(), b"[LOGIN-DELAY] Wait 300 seconds between logins.")

    def test_refusal_reply_made_printable(self) -> None:
        """A refusal's reply keeps at most 200 bytes, with control and 8-bit bytes replaced by '?'."""
        self.reach_user()
        self.say(b"+OK\r\n")
        self.say(b"-ERR [IN-USE] locked \x1b[31m\xc3\xa4" + b"x" * 300 + b"\r\n")
        self.assertEqual(self.refusal(), (b"[IN-USE] locked ?[31m??" + b"x" * 300)[:200])

    def test_sys_temp_unavailable(self) -> None:
        """-ERR [SYS/TEMP] and [SYS/PERM] make the backend unavailable."""
        for code in (b"SYS/TEMP", b"SYS/PERM"):
            self.start()
            self.reach_user()
            self.say(b"+OK\r\n")
            self.say(b"-ERR [" + code + b"] Internal error occurred.\r\n")
            self.failed_with(BackendUnavailable)

    def test_plain_where_user_and_pass_cannot_carry_them(self) -> None:
        """
        A name with a space, a password with a CR or LF, or one that makes PASS longer than 255
        octets (RFC 2449 4; Dovecot drops it past 1 KiB with "Input buffer full") goes by AUTH
        PLAIN, its response after the server's "+ " where the line would pass 255 octets.
        """
        for user, password in (("alice smith", b"secret"), ("alice", b"se\r\ncret"), ("alice", b"p" * 249),
                               ("alice", b"p" * 3000)):
            message = base64.b64encode(b"\0" + user.encode() + b"\0" + password)
            self.start(user=user, password=password)
            self.say(GREETING)
            if len(message) < 240:
                self.assertEqual(self.say(CAPA), b"AUTH PLAIN " + message + b"\r\n")
            else:
                self.assertEqual(self.say(CAPA), b"AUTH PLAIN\r\n")
                self.assertEqual(self.say(b"+ \r\n"), message + b"\r\n")
            self.assertEqual(self.say(b"+OK Logged in.\r\n"), b"")
            self.assertEqual(self.logged_in().capabilities, CAPABILITIES)
        self.start(password=b"p" * 248)  # PASS's line is 255 octets
        self.reach_user()
        self.assertEqual(self.say(b"+OK\r\n"), b"PASS " + b"p" * 248 + b"\r\n")

    def test_unsendable_without_plain(self) -> None:
        """
        Without SASL PLAIN in the CAPA answer, a name or password USER and PASS cannot carry is
        rejected with nothing sent; a long password still goes by PASS (Dovecot takes 1 KiB).
        """
        capa = b"+OK\r\nUSER\r\n.\r\n"
        for user, password in (("", b"secret"), ("alice smith", b"secret"), ("ali\rce", b"secret"),
                               ("ali\nce", b"secret"), ("ali\0ce", b"secret"), ("alice", b"se\rcret"),
                               ("alice", b"se\ncret"), ("alice", b"se\0cret")):
            self.start(user=user, password=password)
            self.say(GREETING)
            self.assertEqual(self.say(capa), b"")
            self.failed_with(BackendRejected)
        self.start(password=b"p" * 500)
        self.reach_user(capa)
        self.assertEqual(self.say(b"+OK\r\n"), b"PASS " + b"p" * 500 + b"\r\n")

    def test_nul_never_sent(self) -> None:
        """A NUL would shift PLAIN's fields: such credentials are rejected with nothing sent."""
        for user, password in (("ali\0ce", b"secret"), ("alice", b"se\0cret")):
            self.start(user=user, password=password)
            self.say(GREETING)
            self.assertEqual(self.say(CAPA), b"")
            self.failed_with(BackendRejected)

    def test_lines_after_failure_ignored(self) -> None:
        """Once the login has failed, further lines are neither answered nor change the outcome."""
        self.reach_user()
        self.say(b"-ERR [AUTH] No\r\n")
        self.assertEqual(self.say(b"+OK\r\n+OK Logged in.\r\n"), b"")
        self.failed_with(BackendRejected)


class CleartextRefusedTests(Pop3LoginTestBase):
    """A backend that will not take a clear-text password is unavailable, never a rejection."""

    def assert_cleartext_refused(self) -> None:
        """Assert the login failed as unavailable with the fixed reason, which names the fixes."""
        error = self.failed_with(BackendUnavailable)
        self.assertEqual(str(error), "backend refuses clear-text login on this connection: "
                                     "use backend TLS or the backend's login_trusted_networks")

    def test_capa_without_user(self) -> None:
        """A CAPA without USER fails the login, client's or master, before USER or PASS is sent."""
        for master_user in (None, "admin"):
            self.start(master_user=master_user)
            self.say(GREETING)
            self.assertEqual(self.say(CLEAR_REFUSED_CAPA), b"")
            self.assert_cleartext_refused()

    def test_capa_without_user_after_xclient(self) -> None:
        """With XCLIENT offered and forwarding on, XCLIENT is the last command sent."""
        self.start(settings=FORWARDING)
        self.say(b"+OK [XCLIENT] Dovecot ready.\r\n")
        self.assertEqual(self.say(CLEAR_REFUSED_CAPA), b"XCLIENT ADDR=192.0.2.7 PORT=50123 SESSION=pOp3sEsSiOn1\r\n")
        self.assertEqual(self.say(b"+OK\r\n"), b"")
        self.assert_cleartext_refused()

    def test_capa_with_user_or_none_tries_user(self) -> None:
        """A CAPA that lists USER, one that lists nothing, and a -ERR to CAPA all lead to USER."""
        for capa in (b"+OK\r\nTOP\r\nUSER\r\nSASL\r\n.\r\n", b"+OK\r\n.\r\n", b"-ERR Unknown command\r\n"):
            self.start()
            self.reach_user(capa)
            self.assertEqual(self.say(b"+OK\r\n"), b"PASS secret\r\n")
            self.say(b"+OK Logged in.\r\n")
            self.logged_in()

    def test_probe_learns_capa_without_user(self) -> None:
        """A capability probe of such a backend succeeds: only a login needs USER."""
        self.start(probe=True)
        self.say(GREETING)
        self.assertEqual(self.say(CLEAR_REFUSED_CAPA), b"QUIT\r\n")
        self.assertNotIn(b"USER", self.successResultOf(self.protocol.result).announced)

    def test_plaintext_disallowed_answer(self) -> None:
        """
        Dovecot's "Plaintext authentication disallowed" answer to USER, after a CAPA that listed
        USER or no CAPA at all, makes the backend unavailable and PASS is never sent.
        """
        for capa in (CAPA, b"-ERR Unknown command\r\n"):
            self.start()
            self.reach_user(capa)
            self.assertEqual(self.say(PLAINTEXT_DISALLOWED), b"")
            self.assert_cleartext_refused()

    def test_other_auth_answer_to_user_rejected(self) -> None:
        """Any other -ERR [AUTH] text to USER is still a rejection of the credentials."""
        self.reach_user()
        self.say(b"-ERR [AUTH] Plaintext authentication disallowed for alice.\r\n")
        self.failed_with(BackendRejected)


class StlsTests(Pop3LoginTestBase):
    """Backend TLS by STLS."""

    settings = STLS

    def test_requires_stls(self) -> None:
        """A backend that does not offer STLS is unavailable and TLS is not started."""
        self.say(GREETING)
        self.assertEqual(self.say(CAPA), b"")
        self.failed_with(BackendUnavailable)
        self.assertIsNone(self.transport.tls_options)

    def test_stls_then_login(self) -> None:
        """STLS follows CAPA; on +OK TLS starts, CAPA is asked again and only its answer is kept."""
        self.say(GREETING)
        self.assertEqual(self.say(b"+OK\r\nSTLS\r\nUSER\r\nX-CLEAR\r\n.\r\n"), b"STLS\r\n")
        self.assertIsNone(self.transport.tls_options)
        self.assertEqual(self.say(b"+OK Begin TLS negotiation now.\r\n"), b"CAPA\r\n")
        self.assertIs(self.transport.tls_options, TLS_CREATOR)
        self.assertIsNone(self.protocol.announced)
        self.assertEqual(self.say(b"+OK\r\nUSER\r\nTOP\r\n.\r\n"), b"USER alice\r\n")
        self.assertEqual(self.protocol.announced, (b"USER", b"TOP"))
        self.say(b"+OK\r\n")
        self.say(b"+OK Logged in.\r\n")
        self.assertEqual(self.logged_in().capabilities, (b"USER", b"TOP"))

    def test_cleartext_xclient_offer_forgotten(self) -> None:
        """An XCLIENT capability announced before TLS is not used after it."""
        self.start(settings=dataclasses.replace(STLS, forward_client_ip=True))
        self.say(GREETING)
        self.say(b"+OK\r\nSTLS\r\nXCLIENT\r\n.\r\n")
        self.say(b"+OK Begin TLS negotiation now.\r\n")
        self.assertEqual(self.say(b"+OK\r\nUSER\r\n.\r\n"), b"USER alice\r\n")

    def test_stls_refused(self) -> None:
        """STLS answered -ERR makes the backend unavailable without starting TLS."""
        self.say(GREETING)
        self.say(b"+OK\r\nSTLS\r\n.\r\n")
        self.assertEqual(self.say(b"-ERR TLS not available\r\n"), b"")
        self.failed_with(BackendUnavailable)
        self.assertIsNone(self.transport.tls_options)

    def test_cleartext_after_stls_ok_not_acted_on(self) -> None:
        """
        Lines the backend sent in clear after its STLS +OK (a response injection) are never taken
        for answers given under TLS: USER and PASS are not sent and no login succeeds on them.
        """
        self.say(GREETING)
        self.say(b"+OK\r\nSTLS\r\n.\r\n")
        written = self.say(b"+OK Begin TLS negotiation now.\r\n"
                           b"+OK\r\nUSER\r\n.\r\n"
                           b"+OK\r\n"
                           b"+OK Logged in.\r\n")
        self.assertIs(self.transport.tls_options, TLS_CREATOR)
        self.assertNotIn(b"USER", written)
        self.assertNotIn(b"PASS", written)
        if self.protocol.result.called:
            self.failed_with(BackendUnavailable)


class ProbeTests(Pop3LoginTestBase):
    """Learning the capabilities without logging in."""

    def test_probe(self) -> None:
        """A probe asks CAPA, then says QUIT and closes; the result carries the capabilities."""
        self.start(probe=True)
        self.assertEqual(self.say(GREETING), b"CAPA\r\n")
        self.assertEqual(self.say(CAPA), b"QUIT\r\n")
        self.assertTrue(self.transport.disconnecting)
        protocol = self.successResultOf(self.protocol.result)
        self.assertEqual(protocol.announced, CAPABILITIES)
        self.assertEqual(self.say(b"+OK Logging out.\r\n"), b"")

    def test_quit_before_the_answer(self) -> None:
        """QUIT is written before the probe answers: its taker closes at once, and TLS drops a write after that."""
        self.start(probe=True)
        written_by_then: list[bytes] = []
        self.protocol.result.addCallback(lambda protocol: written_by_then.append(self.transport.value()))
        self.say(GREETING)
        self.say(CAPA)
        self.assertTrue(written_by_then[0].endswith(b"QUIT\r\n"), written_by_then)

    def test_probe_pre_capa_server(self) -> None:
        """A probe of a backend without CAPA learns that it announces nothing."""
        self.start(probe=True)
        self.say(GREETING)
        self.assertEqual(self.say(b"-ERR Unknown command\r\n"), b"QUIT\r\n")
        self.assertEqual(self.successResultOf(self.protocol.result).announced, ())

    def test_probe_over_stls(self) -> None:
        """A probe over STLS reports what the backend announces under TLS."""
        self.start(probe=True, settings=STLS)
        self.say(GREETING)
        self.say(b"+OK\r\nSTLS\r\nX-CLEAR\r\n.\r\n")
        self.say(b"+OK Begin TLS negotiation now.\r\n")
        self.assertEqual(self.say(b"+OK\r\nUSER\r\n.\r\n"), b"QUIT\r\n")
        self.assertEqual(self.successResultOf(self.protocol.result).announced, (b"USER",))

    def test_probe_greeting_err(self) -> None:
        """A probe of a backend that greets with -ERR fails as unavailable."""
        self.start(probe=True)
        self.say(b"-ERR Go away\r\n")
        self.failed_with(BackendUnavailable)


class RelayTests(Pop3LoginTestBase):
    """After the login, the protocol moves bytes only."""

    def setUp(self) -> None:
        super().setUp()
        self.reach_user()
        self.say(b"+OK\r\n")

    def test_attach_relays_buffered_and_later_bytes(self) -> None:
        """Bytes after the +OK to PASS, before and after attach, reach the client unparsed and in order."""
        self.say(b"+OK Logged in.\r\n+OK 2 messages\r\n")
        protocol = self.logged_in()
        self.say(b"1 120\r\n")
        client = StringTransport()
        protocol.attach(Splice(client, self.transport, Clock()))
        self.assertEqual(client.value(), b"+OK 2 messages\r\n1 120\r\n")
        self.assertEqual(self.transport.producerState, "producing")
        self.protocol.dataReceived(b"2 300\r\n.\r\n-ERR partial")
        self.assertEqual(client.value(), b"+OK 2 messages\r\n1 120\r\n2 300\r\n.\r\n-ERR partial")
        self.assertEqual(self.transport.value(), b"")

    def test_attributes_in_slots(self) -> None:
        """A relaying backend session keeps its attributes and Twisted's in slots: it has no dict."""
        self.say(b"+OK Logged in.\r\n")
        self.logged_in().attach(Splice(StringTransport(), self.transport, Clock()))
        self.protocol.dataReceived(b"+OK 2 messages\r\n")
        self.assertEqual(unslotted(self.protocol), set())

    def test_password_not_kept(self) -> None:
        """Once relaying, the backend session holds the password no longer."""
        self.say(b"+OK Logged in.\r\n")
        self.logged_in().attach(Splice(StringTransport(), self.transport, Clock()))
        self.assertIsNone(self.protocol.request)

    def test_backend_lost_closes_client(self) -> None:
        """The backend going away after attach closes the client connection."""
        self.say(b"+OK Logged in.\r\n")
        client = StringTransport()
        self.logged_in().attach(Splice(client, self.transport, Clock()))
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(client.disconnecting)


class SecrecyTests(Pop3LoginTestBase):
    """The password stays out of every exception message."""

    PASSWORD = b"Sup3r-s3cret"

    def assert_secret(self, error: Exception) -> None:
        """Assert neither the text nor the repr of C{error} holds the password."""
        text = self.PASSWORD.decode("ascii")
        self.assertNotIn(text, str(error))
        self.assertNotIn(text, repr(error))

    def test_failure_messages(self) -> None:
        """Rejection, refusal, backend failure, a lost connection and an unsendable password name no password."""
        for answer, kind in ((b"-ERR [AUTH] Authentication failed.\r\n", BackendRejected),
                             (b"-ERR [IN-USE] Mailbox locked.\r\n", BackendRefused),
                             (b"-ERR [SYS/TEMP] Internal error.\r\n", BackendUnavailable)):
            self.start(password=self.PASSWORD)
            self.reach_user()
            self.say(b"+OK\r\n" + answer)
            self.assert_secret(self.failed_with(kind))
        self.start(password=self.PASSWORD)
        self.reach_user()
        self.say(b"+OK\r\n")
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.assert_secret(self.failureResultOf(self.protocol.result, BackendUnavailable).value)
        self.start(password=self.PASSWORD + b"\0")
        self.say(GREETING + CAPA)
        self.assert_secret(self.failed_with(BackendRejected))
