"""The SMTP login dialogue with the MTA and the command channel after it, driven over a StringTransport."""

from __future__ import annotations

import base64
import dataclasses

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from gateway.backend import BackendRejected, BackendUnavailable, ClientAddress, LoginRequest
from gateway.config import BackendSettings
from gateway.smtp_backend import RefusedEhloNames, SmtpBackend
from gateway.smtp_syntax import Reply
from gateway.testing.fakes import BACKEND_SETTINGS, TLSStringTransport

CLIENT = ClientAddress("192.0.2.7", 50123, "198.51.100.1", 587, "sMtPsEsSiOn1")
IPV6_CLIENT = ClientAddress("2001:db8::7", 4000, "2001:db8::1", 587, "sMtPsEsSiOn2")
TLS_CREATOR = object()
SETTINGS = dataclasses.replace(BACKEND_SETTINGS, port=587)
MASTER = dataclasses.replace(SETTINGS, login="master", master_user="relay", master_password=b"relaypw")
XCLIENT = dataclasses.replace(SETTINGS, login="xclient")
FORWARDING = dataclasses.replace(SETTINGS, forward_client_ip=True)
STARTTLS = dataclasses.replace(SETTINGS, tls="starttls")

GREETING = b"220 mx.example.org ESMTP Postfix\r\n"
EXTENSIONS = (b"PIPELINING", b"SIZE 10240000", b"AUTH PLAIN LOGIN", b"ENHANCEDSTATUSCODES", b"8BITMIME",
              b"SMTPUTF8")
KEYWORDS = {b"PIPELINING": b"", b"SIZE": b"10240000", b"AUTH": b"PLAIN LOGIN", b"ENHANCEDSTATUSCODES": b"",
            b"8BITMIME": b"", b"SMTPUTF8": b""}
# base64 of "\0alice\0secret" (RFC 4616: empty authzid, authcid, password).
TOKEN = b"AGFsaWNlAHNlY3JldA=="
# base64 of "\0relay\0relaypw".
RELAY_TOKEN = b"AHJlbGF5AHJlbGF5cHc="
AUTHENTICATED = b"235 2.7.0 Authentication successful\r\n"


def ehlo_reply(*extensions: bytes) -> bytes:
    """An EHLO reply from mx.example.org offering C{extensions}, in wire form."""
    return Reply(250, (b"mx.example.org",) + extensions).encode()


EHLO = ehlo_reply(*EXTENSIONS)


class SmtpBackendTestBase(SynchronousTestCase):
    """One SMTP login dialogue on a transport that records STARTTLS."""

    settings: BackendSettings = SETTINGS

    def setUp(self) -> None:
        self.start()

    def start(self, user: str = "alice", password: bytes = b"secret", master_user: str | None = None,
              settings: BackendSettings | None = None, probe: bool = False, client: ClientAddress = CLIENT,
              ehlo_name: str = "localhost", client_helo: bytes | None = b"client.example.net",
              refused_names: RefusedEhloNames | None = None) -> None:
        """Begin a fresh dialogue (a capability probe with C{probe}), replacing any earlier one."""
        request = None if probe else LoginRequest(user, password, client, master_user, client_helo)
        self.protocol = SmtpBackend(request, settings or self.settings, TLS_CREATOR,  # type: ignore[arg-type]
                                    ehlo_name=ehlo_name, refused_names=refused_names)
        self.transport = TLSStringTransport()
        self.written = b""
        self.protocol.makeConnection(self.transport)

    def say(self, data: bytes) -> bytes:
        """Feed the MTA's bytes and return what the dialogue wrote in reply."""
        self.protocol.dataReceived(data)
        written = self.transport.value()
        self.transport.clear()
        self.written += written
        return written

    def reach_auth(self, ehlo: bytes = EHLO) -> bytes:
        """Run the greeting and EHLO; return what was written after the EHLO reply."""
        self.assertEqual(self.say(GREETING), b"EHLO localhost\r\n")
        return self.say(ehlo)

    def failed_with(self, kind: type[Exception]) -> Exception:
        """Assert the login failed with C{kind} and dropped the connection; return the exception."""
        failure = self.failureResultOf(self.protocol.result, kind)
        self.assertTrue(self.transport.disconnecting)
        return failure.value  # type: ignore[return-value]

    def logged_in(self) -> SmtpBackend:
        """Assert the login succeeded and the MTA is no longer read; return the protocol."""
        self.assertIs(self.successResultOf(self.protocol.result), self.protocol)
        self.assertEqual(self.transport.producerState, "paused")
        self.assertFalse(self.transport.disconnecting)
        return self.protocol


class GreetingAndEhloTests(SmtpBackendTestBase):
    """The greeting and EHLO."""

    def test_greeting_not_220(self) -> None:
        """
        A greeting other than 220 makes the MTA unavailable without any command sent; the log
        gets its code and text, made printable.
        """
        for greeting, said in ((b"554 5.3.2 mx.example.org No service\r\n", "554 5.3.2 mx.example.org No service"),
                               (b"421-4.3.2 Service\r\n421 shutting \x1bdown\r\n", "421 4.3.2 Service shutting ?down")):
            self.start()
            self.assertEqual(self.say(greeting), b"")
            self.assertEqual(str(self.failed_with(BackendUnavailable)), f"MTA greeting was {said}")

    def test_multi_line_greeting(self) -> None:
        """EHLO follows only the last line of a multi-line greeting."""
        self.assertEqual(self.say(b"220-mx.example.org ESMTP\r\n"), b"")
        self.assertEqual(self.say(b"220 welcome\r\n"), b"EHLO localhost\r\n")

    def test_ehlo_name(self) -> None:
        """EHLO carries the configured name."""
        self.start(ehlo_name="gw.example.org")
        self.assertEqual(self.say(GREETING), b"EHLO gw.example.org\r\n")

    def test_ehlo_refused(self) -> None:
        """An EHLO answered other than 250 makes the MTA unavailable without any further command."""
        self.say(GREETING)
        self.assertEqual(self.say(b"502 5.5.2 Error: command not recognized\r\n"), b"")
        self.assertEqual(str(self.failed_with(BackendUnavailable)),
                         "the MTA refused EHLO: 502 5.5.2 Error: command not recognized")

    def test_keywords_and_announced(self) -> None:
        """The EHLO extensions become C{keywords} and C{announced} before the login is answered."""
        self.assertIsNone(self.protocol.announced)
        self.reach_auth()
        self.assertEqual(self.protocol.keywords, KEYWORDS)
        self.assertEqual(self.protocol.announced, EXTENSIONS)
        self.assertNoResult(self.protocol.result)

    def test_reply_in_pieces(self) -> None:
        """A multi-line EHLO reply split across reads is collected whole."""
        self.say(GREETING)
        self.assertEqual(self.say(EHLO[:30]), b"")
        self.assertEqual(self.say(EHLO[30:-3]), b"")
        self.assertEqual(self.say(EHLO[-3:]), b"AUTH PLAIN " + TOKEN + b"\r\n")

    def test_malformed_reply(self) -> None:
        """A line that is not a reply line makes the MTA unavailable."""
        self.say(GREETING)
        self.say(b"+OK this is POP3\r\n")
        self.failed_with(BackendUnavailable)

    def test_code_change_mid_reply(self) -> None:
        """A reply whose code changes between lines makes the MTA unavailable."""
        self.say(GREETING)
        self.assertEqual(self.say(b"250-mx.example.org\r\n251 AUTH PLAIN\r\n"), b"")
        self.failed_with(BackendUnavailable)

    def test_over_long_line(self) -> None:
        """A line longer than the limit makes the MTA unavailable."""
        self.say(b"220 " + b"x" * SmtpBackend.MAX_LENGTH + b"\r\n")
        self.failed_with(BackendUnavailable)

    def test_connection_lost(self) -> None:
        """The connection closing during the login makes the MTA unavailable."""
        self.reach_auth()
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(self.protocol.result, BackendUnavailable)

    def test_cancel(self) -> None:
        """Cancelling the login drops the connection."""
        self.say(GREETING)
        self.protocol.result.cancel()
        self.failureResultOf(self.protocol.result, CancelledError)
        self.assertTrue(self.transport.disconnecting)


class ReplayTests(SmtpBackendTestBase):
    """AUTH PLAIN with the client's credentials."""

    def test_auth_plain(self) -> None:
        """AUTH PLAIN carries base64 of NUL, the user, NUL and the password, as one line."""
        self.assertEqual(self.reach_auth(), b"AUTH PLAIN " + TOKEN + b"\r\n")

    def test_long_credentials_after_334(self) -> None:
        """
        Where AUTH PLAIN with the response would pass SMTP's 512-octet line (RFC 4954 4; Postfix
        cuts lines at 2048 bytes: an OAuth token), the response follows the MTA's 334 instead.
        """
        password = b"t" * 2000
        token = base64.b64encode(b"\0alice\0" + password)
        self.start(password=password)
        self.assertEqual(self.reach_auth(), b"AUTH PLAIN\r\n")
        self.assertEqual(self.say(b"334 \r\n"), token + b"\r\n")
        self.assertEqual(self.say(AUTHENTICATED), b"")
        self.assertEqual(self.logged_in().capabilities, EXTENSIONS)
        self.start(password=b"t" * 365)  # the longest that fits: a line of 509 octets
        written = self.reach_auth()
        self.assertEqual((written[:11], len(written)), (b"AUTH PLAIN ", 509))
        self.start(password=b"t" * 366)
        self.assertEqual(self.reach_auth(), b"AUTH PLAIN\r\n")
        # Answered before the credentials were sent: no verdict on them.
        self.assertEqual(self.say(b"535 5.7.8 Error: authentication failed\r\n"), b"")
        self.failed_with(BackendUnavailable)

    def test_utf8_credentials(self) -> None:
        """A user and password with UTF-8 and spaces are sent as their bytes, base64-encoded."""
        self.start(user="jörg", password="pä ss".encode())
        written = self.reach_auth()
        self.assertTrue(written.startswith(b"AUTH PLAIN ") and written.endswith(b"\r\n"))
        token = written[len(b"AUTH PLAIN "):-2]
        self.assertEqual(base64.b64decode(token, validate=True), b"\0j\xc3\xb6rg\0p\xc3\xa4 ss")

    def test_success(self) -> None:
        """235 logs in; the capabilities are the EHLO extensions."""
        self.reach_auth()
        self.assertEqual(self.say(AUTHENTICATED), b"")
        self.assertEqual(self.logged_in().capabilities, EXTENSIONS)

    def test_unasked_after_login(self) -> None:
        """
        What the MTA sent unasked, in the same read as its answer to AUTH (a whole reply, or part
        of one), fails the login as unavailable: kept, it would be taken for the answer to the
        client's first command, which the front end may send as soon as the login succeeds.
        """
        for unasked in (b"550 5.7.1 said before any command\r\n", b"550 5.7"):
            self.start()
            self.reach_auth()
            self.protocol.result.addCallback(lambda protocol: protocol.start_session())
            self.say(AUTHENTICATED + unasked)
            self.assertIn("more than its answer", str(self.failed_with(BackendUnavailable)))

    def test_rejected(self) -> None:
        """535 is a rejection of the client's credentials."""
        self.reach_auth()
        self.say(b"535 5.7.8 Error: authentication failed: authentication failure\r\n")
        self.failed_with(BackendRejected)

    def test_other_answers_unavailable(self) -> None:
        """
        454, 421, 534 and a 334 challenge make the MTA unavailable, not the credentials wrong. The
        log gets only the code: an MTA may build an answer to AUTH from what it was sent.
        """
        for answer in (b"454 4.7.0 Temporary authentication failure\r\n", b"421 4.4.2 timeout\r\n",
                       b"534 5.7.9 Authentication mechanism is too weak\r\n", b"334 \r\n"):
            self.start()
            self.reach_auth()
            self.say(answer)
            self.assertEqual(str(self.failed_with(BackendUnavailable)), f"the MTA refused the login: {answer[:3].decode()}")

    def test_auth_plain_not_offered(self) -> None:
        """Without PLAIN among the AUTH mechanisms the MTA is unavailable and the password is never sent."""
        for ehlo in (ehlo_reply(b"PIPELINING", b"AUTH LOGIN CRAM-MD5"), ehlo_reply(b"PIPELINING"),
                     ehlo_reply(b"AUTH PLAINTEXT")):
            self.start()
            self.assertEqual(self.reach_auth(ehlo), b"")
            self.failed_with(BackendUnavailable)
            self.assertNotIn(b"secret", self.written)
            self.assertNotIn(TOKEN, self.written)

    def test_auth_keyword_case(self) -> None:
        """The AUTH keyword and its mechanisms are matched without regard to case."""
        self.assertEqual(self.reach_auth(ehlo_reply(b"auth login plain")), b"AUTH PLAIN " + TOKEN + b"\r\n")


class MasterTests(SmtpBackendTestBase):
    """AUTH PLAIN with the gateway's relay account."""

    settings = MASTER

    def setUp(self) -> None:
        self.start(user="alice", password=b"relaypw", master_user="relay")

    def test_auth_as_relay(self) -> None:
        """AUTH PLAIN carries the relay account and its password, not the client's user."""
        self.assertEqual(self.reach_auth(), b"AUTH PLAIN " + RELAY_TOKEN + b"\r\n")

    def test_success(self) -> None:
        """235 logs in."""
        self.reach_auth()
        self.say(AUTHENTICATED)
        self.assertEqual(self.logged_in().capabilities, EXTENSIONS)

    def test_rejected_is_unavailable(self) -> None:
        """535 to the relay account makes the MTA unavailable: the client's credentials are not at fault."""
        self.reach_auth()
        self.say(b"535 5.7.8 Error: authentication failed\r\n")
        self.failed_with(BackendUnavailable)


class XclientLoginTests(SmtpBackendTestBase):
    """Postfix XCLIENT naming the client and its login, instead of AUTH."""

    settings = XCLIENT
    OFFER = ehlo_reply(b"PIPELINING", b"XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT")

    def test_requires_xclient(self) -> None:
        """Without an XCLIENT offer the MTA is unavailable, and nothing more is sent."""
        self.assertEqual(self.reach_auth(), b"")
        self.failed_with(BackendUnavailable)

    def test_xclient_command(self) -> None:
        """XCLIENT names the client's address, port, ESMTP and the login."""
        self.assertEqual(self.reach_auth(self.OFFER),
                         b"XCLIENT ADDR=192.0.2.7 PORT=50123 PROTO=ESMTP LOGIN=alice\r\n")

    def test_login_xtext(self) -> None:
        """The login is xtext-encoded."""
        self.start(user="al+ice=x y@jörg.example")
        self.assertEqual(self.reach_auth(self.OFFER),
                         b"XCLIENT ADDR=192.0.2.7 PORT=50123 PROTO=ESMTP LOGIN=al+2Bice+3Dx+20y@j+C3+B6rg.example\r\n")

    def test_ipv6_client(self) -> None:
        """An IPv6 client address gets the IPV6: prefix."""
        self.start(client=IPV6_CLIENT)
        self.assertEqual(self.reach_auth(self.OFFER),
                         b"XCLIENT ADDR=IPV6:2001:db8::7 PORT=4000 PROTO=ESMTP LOGIN=alice\r\n")

    def test_unix_socket_client(self) -> None:
        """A client of a UNIX socket listener has no address: Postfix's [UNAVAILABLE], which it takes (not 501)."""
        self.start(client=ClientAddress("UNIXAddress(None)", 0, "", 0, "sMtPsEsSiOn3"))
        self.assertEqual(self.reach_auth(self.OFFER),
                         b"XCLIENT ADDR=[UNAVAILABLE] PORT=[UNAVAILABLE] PROTO=ESMTP LOGIN=alice\r\n")

    def test_success(self) -> None:
        """
        220 to XCLIENT is followed by EHLO again, as the client said it (Postfix's Received header
        shows that name), whose extensions become the capabilities; no AUTH is sent.
        """
        self.reach_auth(self.OFFER)
        self.assertEqual(self.say(GREETING), b"EHLO client.example.net\r\n")
        self.assertNoResult(self.protocol.result)
        self.assertEqual(self.say(ehlo_reply(b"PIPELINING", b"SIZE 1000")), b"")
        protocol = self.logged_in()
        self.assertEqual(protocol.capabilities, (b"PIPELINING", b"SIZE 1000"))
        self.assertEqual(protocol.announced, (b"PIPELINING", b"SIZE 1000"))
        self.assertNotIn(b"AUTH", self.written)
        self.assertNotIn(b"secret", self.written)

    def test_client_ehlo_not_sendable(self) -> None:
        """
        A client's EHLO name that is not one printable ASCII token of at most 255 bytes is not
        sent: the EHLO after XCLIENT is the gateway's own then.
        """
        for helo in (None, b"", b"host\rMAIL FROM:<x@example.org>", b"h\x00st", b"h\tst", b"h\x7fst",
                     b"h\xc3\xb6st.example", b"a" * 256):
            self.start(client_helo=helo)
            self.reach_auth(self.OFFER)
            self.assertEqual(self.say(GREETING), b"EHLO localhost\r\n", helo)
        for helo in (b"[IPv6:2001:db8::7]", b"a" * 255, b"!~"):
            self.start(client_helo=helo)
            self.reach_auth(self.OFFER)
            self.assertEqual(self.say(GREETING), b"EHLO " + helo + b"\r\n")

    def test_client_ehlo_refused(self) -> None:
        """
        An MTA that refuses the client's EHLO name at once (smtpd_delay_reject = no with HELO
        restrictions) gets the gateway's own name next, and the login goes on; a refusal of that
        one too makes the MTA unavailable.
        """
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        for refusal in (b"504 5.5.2 <DESKTOP-ABC>: Helo command rejected: need fully-qualified hostname\r\n",
                        b"450 4.7.1 <DESKTOP-ABC>: Helo command rejected: Host not found\r\n"):
            self.start(client_helo=b"DESKTOP-ABC")
            self.reach_auth(self.OFFER)
            self.assertEqual(self.say(GREETING), b"EHLO DESKTOP-ABC\r\n")
            self.assertEqual(self.say(refusal), b"EHLO localhost\r\n")
            self.assertEqual(self.say(ehlo_reply(b"PIPELINING")), b"")
            self.assertEqual(self.logged_in().capabilities, (b"PIPELINING",))
        lines = [event for event in logged if event["log_format"].startswith("mta_refused_client_ehlo")]
        self.assertEqual(len(lines), 2)
        self.assertEqual((lines[0]["name"], lines[0]["reply"], lines[0]["client"]),
                         ('"DESKTOP-ABC"', "504 5.5.2 <DESKTOP-ABC>: Helo command rejected: need fully-qualified hostname",
                          "192.0.2.7"))
        self.start(client_helo=b"DESKTOP-ABC")
        self.reach_auth(self.OFFER)
        self.say(GREETING)
        self.say(b"504 5.5.2 <DESKTOP-ABC>: Helo command rejected\r\n")
        self.say(b"554 5.7.1 <localhost>: Helo command rejected\r\n")
        self.assertEqual(str(self.failed_with(BackendUnavailable)),
                         "the MTA refused EHLO: 554 5.7.1 <localhost>: Helo command rejected")

    def test_refused_name_not_sent_again(self) -> None:
        """
        A name the MTA has refused for good (5xx) is not sent again by the connections that share
        the memory of refusals (each refusal is a line in the MTA's log against the client's
        address); others are, and so is one refused for now (4xx).
        """
        refused = RefusedEhloNames()
        self.start(client_helo=b"DESKTOP-ABC", refused_names=refused)
        self.reach_auth(self.OFFER)
        self.say(GREETING)
        self.assertEqual(self.say(b"504 5.5.2 <DESKTOP-ABC>: Helo command rejected\r\n"), b"EHLO localhost\r\n")
        self.start(client_helo=b"DESKTOP-DEF", refused_names=refused)
        self.reach_auth(self.OFFER)
        self.say(GREETING)
        self.assertEqual(self.say(b"450 4.7.1 <DESKTOP-DEF>: Helo command rejected: Host not found\r\n"),
                         b"EHLO localhost\r\n")
        for helo, sent in ((b"DESKTOP-ABC", b"EHLO localhost\r\n"), (b"laptop.example.net", b"EHLO laptop.example.net\r\n"),
                           (b"DESKTOP-DEF", b"EHLO DESKTOP-DEF\r\n")):  # a temporary refusal: tried again
            self.start(client_helo=helo, refused_names=refused)
            self.reach_auth(self.OFFER)
            self.assertEqual(self.say(GREETING), sent)
        self.start(client_helo=b"DESKTOP-ABC")  # a memory of its own
        self.reach_auth(self.OFFER)
        self.assertEqual(self.say(GREETING), b"EHLO DESKTOP-ABC\r\n")

    def test_refused_names_bounded(self) -> None:
        """The memory of refused names keeps the newest LIMIT."""
        self.patch(RefusedEhloNames, "LIMIT", 3)
        refused = RefusedEhloNames()
        for name in (b"a", b"b", b"c", b"d"):
            refused.add(name)
        self.assertEqual([name in refused for name in (b"a", b"b", b"c", b"d")], [False, True, True, True])

    def test_refused(self) -> None:
        """XCLIENT answered 501 or 550 makes the MTA unavailable."""
        for answer in (b"501 5.5.4 Bad PROTO syntax\r\n", b"550 5.7.0 Error: insufficient authorization\r\n"):
            self.start()
            self.reach_auth(self.OFFER)
            self.assertEqual(self.say(answer), b"")
            self.failed_with(BackendUnavailable)

    def test_second_ehlo_refused(self) -> None:
        """An EHLO refused after XCLIENT makes the MTA unavailable."""
        self.reach_auth(self.OFFER)
        self.say(GREETING)
        self.say(b"421 4.7.0 go away\r\n")
        self.failed_with(BackendUnavailable)


class ForwardingTests(SmtpBackendTestBase):
    """XCLIENT ADDR and PORT before AUTH, with forward_client_ip."""

    settings = FORWARDING
    OFFER = ehlo_reply(b"AUTH PLAIN", b"XCLIENT ADDR PORT PROTO LOGIN")

    def test_xclient_then_auth(self) -> None:
        """XCLIENT without LOGIN comes first, then EHLO again as the client's, then AUTH PLAIN; 235 logs in."""
        self.assertEqual(self.reach_auth(self.OFFER), b"XCLIENT ADDR=192.0.2.7 PORT=50123 PROTO=ESMTP\r\n")
        self.assertEqual(self.say(GREETING), b"EHLO client.example.net\r\n")
        self.assertEqual(self.say(EHLO), b"AUTH PLAIN " + TOKEN + b"\r\n")
        self.say(AUTHENTICATED)
        self.assertEqual(self.logged_in().capabilities, EXTENSIONS)

    def test_ipv6_client(self) -> None:
        """An IPv6 client address gets the IPV6: prefix."""
        self.start(client=IPV6_CLIENT)
        self.assertEqual(self.reach_auth(self.OFFER), b"XCLIENT ADDR=IPV6:2001:db8::7 PORT=4000 PROTO=ESMTP\r\n")

    def test_xclient_not_offered(self) -> None:
        """Without an XCLIENT offer AUTH PLAIN follows the first EHLO."""
        self.assertEqual(self.reach_auth(), b"AUTH PLAIN " + TOKEN + b"\r\n")

    def test_not_forwarding(self) -> None:
        """Without forward_client_ip no XCLIENT is sent, even when offered."""
        self.start(settings=SETTINGS)
        self.assertEqual(self.reach_auth(self.OFFER), b"AUTH PLAIN " + TOKEN + b"\r\n")

    def test_xclient_refused(self) -> None:
        """XCLIENT answered other than 220 makes the MTA unavailable, and the password is not sent."""
        self.reach_auth(self.OFFER)
        self.assertEqual(self.say(b"501 5.5.4 Bad ADDR syntax: IPV6:::1\r\n"), b"")
        # Postfix without IPv6 of its own (inet_protocols = ipv4) refuses an IPv6 client so: the log says.
        self.assertEqual(str(self.failed_with(BackendUnavailable)),
                         "the MTA refused XCLIENT: 501 5.5.4 Bad ADDR syntax: IPV6:::1")
        self.assertNotIn(TOKEN, self.written)

    def test_auth_decided_by_new_ehlo(self) -> None:
        """AUTH depends on the EHLO after XCLIENT: without PLAIN there, the MTA is unavailable."""
        self.reach_auth(self.OFFER)
        self.say(GREETING)
        self.assertEqual(self.say(ehlo_reply(b"AUTH LOGIN")), b"")
        self.failed_with(BackendUnavailable)


class StartTlsTests(SmtpBackendTestBase):
    """TLS to the MTA by STARTTLS."""

    settings = STARTTLS
    OFFER = ehlo_reply(b"PIPELINING", b"STARTTLS")

    def test_requires_starttls(self) -> None:
        """Without a STARTTLS offer the MTA is unavailable and TLS is not started."""
        self.assertEqual(self.reach_auth(), b"")
        self.failed_with(BackendUnavailable)
        self.assertIsNone(self.transport.tls_options)

    def test_starttls_then_auth(self) -> None:
        """STARTTLS follows EHLO; on 220 TLS starts, EHLO is sent again and its extensions decide AUTH."""
        self.assertEqual(self.reach_auth(self.OFFER), b"STARTTLS\r\n")
        self.assertIsNone(self.transport.tls_options)
        self.assertEqual(self.say(b"220 2.0.0 Ready to start TLS\r\n"), b"EHLO localhost\r\n")
        self.assertIs(self.transport.tls_options, TLS_CREATOR)
        self.assertEqual(self.say(EHLO), b"AUTH PLAIN " + TOKEN + b"\r\n")
        self.assertEqual(self.protocol.announced, EXTENSIONS)
        self.say(AUTHENTICATED)
        self.assertEqual(self.logged_in().capabilities, EXTENSIONS)

    def test_starttls_refused(self) -> None:
        """STARTTLS answered other than 220 makes the MTA unavailable without starting TLS."""
        self.reach_auth(self.OFFER)
        self.assertEqual(self.say(b"454 4.7.0 TLS not available due to local problem\r\n"), b"")
        self.assertEqual(str(self.failed_with(BackendUnavailable)),
                         "the MTA refused STARTTLS: 454 4.7.0 TLS not available due to local problem")
        self.assertIsNone(self.transport.tls_options)

    def test_cleartext_after_220_dropped(self) -> None:
        """
        Lines that arrive in clear after the 220 to STARTTLS (a response injection) are dropped: they
        answer neither the new EHLO nor AUTH.
        """
        self.reach_auth(self.OFFER)
        written = self.say(b"220 2.0.0 Ready to start TLS\r\n" + EHLO + AUTHENTICATED)
        self.assertEqual(written, b"EHLO localhost\r\n")
        self.assertIs(self.transport.tls_options, TLS_CREATOR)
        self.assertNoResult(self.protocol.result)
        self.assertEqual(self.say(ehlo_reply(b"AUTH PLAIN")), b"AUTH PLAIN " + TOKEN + b"\r\n")
        self.assertEqual(self.protocol.keywords, {b"AUTH": b"PLAIN"})

    def test_cleartext_keywords_forgotten(self) -> None:
        """An XCLIENT offer made before TLS is not used after it."""
        self.start(settings=dataclasses.replace(STARTTLS, forward_client_ip=True))
        self.reach_auth(ehlo_reply(b"STARTTLS", b"XCLIENT ADDR PORT", b"AUTH PLAIN"))
        self.say(b"220 2.0.0 Ready to start TLS\r\n")
        self.assertEqual(self.say(ehlo_reply(b"AUTH PLAIN")), b"AUTH PLAIN " + TOKEN + b"\r\n")
        self.assertEqual(self.protocol.announced, (b"AUTH PLAIN",))


class ProbeTests(SmtpBackendTestBase):
    """Learning the extensions without logging in."""

    def test_probe(self) -> None:
        """A probe sends EHLO, then QUIT and closes; the result carries the extensions."""
        self.start(probe=True)
        self.assertEqual(self.say(GREETING), b"EHLO localhost\r\n")
        self.assertEqual(self.say(ehlo_reply(b"PIPELINING", b"SIZE 1000")), b"QUIT\r\n")
        self.assertTrue(self.transport.disconnecting)
        protocol = self.successResultOf(self.protocol.result)
        self.assertIs(protocol, self.protocol)
        self.assertEqual(protocol.announced, (b"PIPELINING", b"SIZE 1000"))
        self.assertEqual(self.say(b"221 2.0.0 Bye\r\n"), b"")
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_quit_before_the_answer(self) -> None:
        """QUIT is written before the probe answers: its taker closes at once, and TLS drops a write after that."""
        self.start(probe=True)
        written_by_then: list[bytes] = []
        self.protocol.result.addCallback(lambda protocol: written_by_then.append(self.transport.value()))
        self.say(GREETING)
        self.say(ehlo_reply(b"PIPELINING"))
        self.assertTrue(written_by_then[0].endswith(b"QUIT\r\n"), written_by_then)
        self.say(b"221 2.0.0 Bye\r\n")

    def test_probe_lost_before_quit_answer(self) -> None:
        """The MTA closing before it answers QUIT changes nothing and logs no error."""
        self.start(probe=True)
        self.say(GREETING)
        self.say(EHLO)
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(self.protocol.result)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_probe_over_starttls(self) -> None:
        """A probe over STARTTLS reports the extensions offered under TLS."""
        self.start(probe=True, settings=STARTTLS)
        self.say(GREETING)
        self.assertEqual(self.say(ehlo_reply(b"STARTTLS", b"X-CLEAR")), b"STARTTLS\r\n")
        self.say(b"220 2.0.0 Ready to start TLS\r\n")
        self.assertEqual(self.say(ehlo_reply(b"PIPELINING")), b"QUIT\r\n")
        self.assertEqual(self.successResultOf(self.protocol.result).announced, (b"PIPELINING",))

    def test_probe_greeting_refused(self) -> None:
        """A probe of an MTA that greets with 554 fails as unavailable."""
        self.start(probe=True)
        self.say(b"554 5.3.2 No service\r\n")
        self.failed_with(BackendUnavailable)


class SessionTests(SmtpBackendTestBase):
    """The command channel after login."""

    def setUp(self) -> None:
        super().setUp()
        self.reach_auth()
        self.say(AUTHENTICATED)
        self.logged_in().start_session()

    def test_start_session_reads_again(self) -> None:
        """start_session resumes reading from the MTA."""
        self.assertEqual(self.transport.producerState, "producing")

    def test_pipelined_commands(self) -> None:
        """Pipelined commands are written at once and each gets its own reply, in order."""
        mail = self.protocol.command(b"MAIL FROM:<alice@example.org>")
        rcpt = self.protocol.command(b"RCPT TO:<bob@example.net>")
        data = self.protocol.command(b"DATA")
        self.assertEqual(self.transport.value(),
                         b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n")
        self.assertNoResult(mail)
        self.say(b"250 2.1.0 Ok\r\n550-5.1.1 <bob@example.net>:\r\n550 5.1.1 unknown\r\n"
                 b"554 5.5.1 No valid recipients\r\n")
        self.assertEqual(self.successResultOf(mail), Reply(250, (b"2.1.0 Ok",)))
        self.assertEqual(self.successResultOf(rcpt), Reply(550, (b"5.1.1 <bob@example.net>:", b"5.1.1 unknown")))
        self.assertEqual(self.successResultOf(data), Reply(554, (b"5.5.1 No valid recipients",)))

    def test_replies_one_by_one(self) -> None:
        """Replies arriving one at a time, in pieces, fire only the command they answer."""
        first = self.protocol.command(b"NOOP")
        second = self.protocol.command(b"RSET")
        self.say(b"250 2.0")
        self.assertNoResult(first)
        self.say(b".0 Ok\r\n250")
        self.assertEqual(self.successResultOf(first), Reply(250, (b"2.0.0 Ok",)))
        self.assertNoResult(second)
        self.say(b" 2.0.0 Reset\r\n")
        self.assertEqual(self.successResultOf(second), Reply(250, (b"2.0.0 Reset",)))

    def test_message_data(self) -> None:
        """write_data writes message data as it is; expect_reply receives the end-of-data reply."""
        data = self.protocol.command(b"DATA")
        self.say(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        self.assertEqual(self.successResultOf(data).code, 354)
        self.transport.clear()
        self.protocol.write_data(b"Subject: hi\r\n\r\n..dot\r\nno line end")
        self.assertEqual(self.transport.value(), b"Subject: hi\r\n\r\n..dot\r\nno line end")
        self.protocol.write_data(b"\r\n.\r\n")
        queued = self.protocol.expect_reply()
        self.assertEqual(self.transport.value(), b"Subject: hi\r\n\r\n..dot\r\nno line end\r\n.\r\n")
        self.assertNoResult(queued)
        self.say(b"250 2.0.0 Ok: queued as 4XyZ\r\n")
        self.assertEqual(self.successResultOf(queued), Reply(250, (b"2.0.0 Ok: queued as 4XyZ",)))

    def test_connection_lost(self) -> None:
        """The connection closing fails every waiting command with BackendUnavailable."""
        waiting = [self.protocol.command(b"MAIL FROM:<alice@example.org>"),
                   self.protocol.command(b"RCPT TO:<b@c.example>"), self.protocol.expect_reply()]
        self.protocol.connectionLost(Failure(ConnectionDone()))
        for deferred in waiting:
            self.failureResultOf(deferred, BackendUnavailable)

    def test_malformed_reply(self) -> None:
        """A malformed reply fails every waiting command and drops the connection."""
        waiting = [self.protocol.command(b"MAIL FROM:<alice@example.org>"),
                   self.protocol.command(b"RCPT TO:<b@c.example>")]
        self.say(b"hello there\r\n")
        for deferred in waiting:
            self.failureResultOf(deferred, BackendUnavailable)
        self.assertTrue(self.transport.disconnecting)

    def test_malformed_after_answer(self) -> None:
        """Commands already answered keep their replies when a later reply is malformed."""
        answered = self.protocol.command(b"NOOP")
        pending = self.protocol.command(b"NOOP")
        self.say(b"250 Ok\r\n250-a\r\n251 b\r\n")
        self.assertEqual(self.successResultOf(answered).code, 250)
        self.failureResultOf(pending, BackendUnavailable)
        self.assertTrue(self.transport.disconnecting)

    def test_unasked_reply(self) -> None:
        """A reply when no command waits drops the connection."""
        self.say(b"421 4.4.2 mx.example.org Error: timeout exceeded\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_unasked_reply_after_answer(self) -> None:
        """A second reply to one command drops the connection; the first reply still counts."""
        noop = self.protocol.command(b"NOOP")
        self.say(b"250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n")
        self.assertEqual(self.successResultOf(noop).code, 250)
        self.assertTrue(self.transport.disconnecting)


class SecrecyTests(SmtpBackendTestBase):
    """The password stays out of every exception message."""

    PASSWORD = b"Sup3r-s3cret"

    def assert_secret(self, error: Exception, password: bytes = PASSWORD, user: str = "alice") -> None:
        """Assert neither the text nor the repr of C{error} holds the password or the AUTH token."""
        token = base64.b64encode(b"\0" + user.encode() + b"\0" + password).decode("ascii")
        for text in (str(error), repr(error)):
            self.assertNotIn(password.decode("ascii"), text)
            self.assertNotIn(token, text)

    def test_login_failures(self) -> None:
        """Rejection, temporary failure, a challenge, a malformed reply and a lost connection name no password."""
        for answer, kind in ((b"535 5.7.8 Error: authentication failed\r\n", BackendRejected),
                             (b"454 4.7.0 Temporary authentication failure\r\n", BackendUnavailable),
                             (b"334 \r\n", BackendUnavailable),
                             (b"what?\r\n", BackendUnavailable)):
            self.start(password=self.PASSWORD)
            self.reach_auth()
            self.say(answer)
            self.assert_secret(self.failed_with(kind))
        self.start(password=self.PASSWORD)
        self.reach_auth()
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.assert_secret(self.failureResultOf(self.protocol.result, BackendUnavailable).value)

    def test_auth_plain_not_offered(self) -> None:
        """The failure for a missing AUTH PLAIN names no password."""
        self.start(password=self.PASSWORD)
        self.reach_auth(ehlo_reply(b"AUTH LOGIN"))
        self.assert_secret(self.failed_with(BackendUnavailable))

    def test_master_failure(self) -> None:
        """A refused relay account login names neither the relay password nor its token."""
        self.start(password=self.PASSWORD, master_user="relay", settings=MASTER)
        self.reach_auth()
        self.say(b"535 5.7.8 Error: authentication failed\r\n")
        self.assert_secret(self.failed_with(BackendUnavailable), user="relay")

    def test_xclient_failure(self) -> None:
        """A refused XCLIENT names no password, and the password was never sent."""
        self.start(password=self.PASSWORD, settings=XCLIENT)
        self.reach_auth(ehlo_reply(b"XCLIENT ADDR PORT PROTO LOGIN"))
        self.say(b"501 5.5.4 Bad syntax\r\n")
        self.assert_secret(self.failed_with(BackendUnavailable))
        self.assertNotIn(self.PASSWORD, self.written)

    def test_session_failures(self) -> None:
        """Failures of waiting commands name no password."""
        self.start(password=self.PASSWORD)
        self.reach_auth()
        self.say(AUTHENTICATED)
        self.protocol.start_session()
        malformed = self.protocol.command(b"NOOP")
        self.say(b"junk\r\n")
        lost = self.protocol.command(b"NOOP")
        self.protocol.connectionLost(Failure(ConnectionDone()))
        waiting: list[Deferred[Reply]] = [malformed, lost]
        for deferred in waiting:
            self.assert_secret(self.failureResultOf(deferred, BackendUnavailable).value)
