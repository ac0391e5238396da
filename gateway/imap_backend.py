"""
The IMAP login dialogue with the backend store.

Greeting, optional STARTTLS, CAPABILITY when the greeting did not carry it, optional ID with
the client's address (Dovecot honours it from C{login_trusted_networks}), then LOGIN, or
AUTHENTICATE PLAIN for a master login (the user as authorization identity) and for credentials
too long for Dovecot's LOGIN (L{_LOGIN_COMMAND_LIMIT}). The
capabilities the backend announces after login are kept for the client's tagged OK, and its
ALERTs for untagged lines before it.

Untagged data the dialogue does not need may carry literals: Dovecot answers ID with one for a
value of its C{imap_id_send} that is not plain ASCII. Such a response is skipped whole.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

from gateway.addresses import parse_ip
from gateway.backend import (
    BackendLogin,
    BackendRefused,
    BackendRejected,
    BackendUnavailable,
    LoginRequest,
    login_answer,
    printable,
)
from gateway.config import BackendSettings
from gateway.imap_syntax import (
    ParseError,
    Response,
    literal_at_end,
    login_command,
    parse_capabilities,
    parse_response_line,
)
from gateway.sasl import plain_message

# Backend NO codes that mean "these credentials are wrong"; any other NO is the backend failing.
_REJECTION_CODES = frozenset((b"AUTHENTICATIONFAILED", b"AUTHORIZATIONFAILED", b"EXPIRED"))
# RFC 5530 codes by which a backend that is up refuses this one session (Dovecot's NO [LIMIT] for a
# user past mail_max_userip_connections): not an outage. The client is told UNAVAILABLE (see
# ImapFrontEnd.reply_login), the log names the code.
_SESSION_REFUSAL_CODES = frozenset((b"LIMIT", b"INUSE", b"CONTACTADMIN", b"OVERQUOTA"))
# ALERTs kept for the user from one login (RFC 9051 7.1: the client must show them); more are dropped.
_MAX_ALERTS = 8
# Dovecot's login process reads at most 1 KiB of a command's arguments and drops a longer LOGIN
# with "BYE Input buffer full", which would read as the backend being down; it reads a SASL
# response into a larger buffer, so a longer LOGIN goes as AUTHENTICATE PLAIN.
_LOGIN_COMMAND_LIMIT = 1000

_Handler = Callable[[Response], None]


class ImapBackendLogin(BackendLogin):
    """Logs in to an IMAP backend for one client."""

    # See BackendLogin.
    __slots__ = ("_known_capabilities", "_tag_number", "_greeted_yet", "_waiting", "_login_chunks", "_skipping")

    def __init__(self, request: LoginRequest | None, settings: BackendSettings,
                 tls: IOpenSSLClientConnectionCreator | None) -> None:
        super().__init__(request, settings, tls)
        self._known_capabilities: tuple[bytes, ...] | None = None
        self._tag_number = 0
        self._greeted_yet = False
        self._waiting: tuple[bytes, _Handler] | None = None
        self._login_chunks: list[bytes] = []
        # Within an untagged response being skipped: the bytes of its literal still to come, or 0
        # once they have, when the next line goes on with the response. None between responses.
        self._skipping: int | None = None

    def lineReceived(self, line: bytes) -> None:
        if self.login_over:
            return
        line = line.rstrip(b"\r")
        if self._skipping is not None:
            self._skipping = None
            self._skip_literal(line)  # the rest of a response being skipped
            return
        try:
            response = parse_response_line(line)
        except ParseError:
            self.fail(BackendUnavailable("backend sent a malformed line"))
            return
        if response.continuation:
            self._continue_login()
        elif response.tag is None:
            # Only data responses carry literals: a status response's text may end in "{8}".
            if response.status is None and self._skip_literal(line):
                return
            self._untagged(response)
        elif self._waiting is not None and response.tag == self._waiting[0]:
            handler = self._waiting[1]
            self._waiting = None
            handler(response)
        else:
            self.fail(BackendUnavailable("backend answered an unknown tag"))

    def _skip_literal(self, line: bytes) -> bool:
        """If C{line} announces a literal, skip its bytes and the rest of the response; say whether it did."""
        try:
            literal = literal_at_end(line)
        except ParseError:
            self.fail(BackendUnavailable("backend sent a malformed literal"))
            return True
        if literal is None:
            return False
        self._skipping = literal.size
        self.setRawMode()
        return True

    def rawDataReceived(self, data: bytes) -> None:
        if self._skipping is None:
            super().rawDataReceived(data)  # relaying
            return
        taken = min(self._skipping, len(data))
        self._skipping -= taken
        if not self._skipping:
            self.setLineMode(data[taken:])

    def _untagged(self, response: Response) -> None:
        if response.status == b"BYE":
            # Once the credentials are sent (announced is set then), a backend may quote them back
            # ("Bad command: gw1 LOGIN alice ..."): the log gets the status and code only.
            said = _text(response) if self.announced is None else _verdict(response)
            self.fail(BackendUnavailable(f"backend said BYE: {said}"))
        elif response.status is None and response.text[:11].upper() == b"CAPABILITY ":
            self._capabilities_from(response.text[11:])
        else:
            self._take_code(response)
        if not self._greeted_yet and response.status is not None and not self.login_over:
            self._greeted_yet = True
            self._greeted(response)

    def _take_code(self, response: Response) -> None:
        """What a status response's code tells the dialogue: the capabilities, or an alert for the user."""
        if response.code is None:
            return
        if response.code.name == b"CAPABILITY":
            self._capabilities_from(response.code.args)
        elif response.code.name == b"ALERT":
            self._alert(response)

    def _capabilities_from(self, text: bytes) -> None:
        try:
            self._known_capabilities = parse_capabilities(text)
        except ParseError:
            self.fail(BackendUnavailable("backend sent malformed capabilities"))

    def _has(self, capability: bytes) -> bool:
        return capability.upper() in (c.upper() for c in self._known_capabilities or ())

    def _send(self, command: bytes, handler: _Handler) -> None:
        if self.login_over:
            return  # the login has already failed
        tag = self._next_tag()
        self._waiting = (tag, handler)
        assert self.transport is not None
        self.transport.write(tag + b" " + command + b"\r\n")

    def _next_tag(self) -> bytes:
        self._tag_number += 1
        return b"gw%d" % self._tag_number

    # -- the dialogue, in order

    def _greeted(self, greeting: Response) -> None:
        if greeting.status != b"OK":
            self.fail(BackendUnavailable(f"backend greeting was {greeting.status!r}"))
        elif self.settings.tls == "starttls":
            self._with_capabilities(self._starttls)
        else:
            self._with_capabilities(self._identify)

    def _with_capabilities(self, then: Callable[[], None]) -> None:
        if self._known_capabilities is not None:
            then()
            return

        def done(response: Response) -> None:
            if response.status != b"OK" or self._known_capabilities is None:
                self.fail(BackendUnavailable("backend CAPABILITY failed"))
            else:
                then()

        self._send(b"CAPABILITY", done)

    def _starttls(self) -> None:
        if not self._has(b"STARTTLS"):
            self.fail(BackendUnavailable("backend does not offer STARTTLS"))
            return

        def done(response: Response) -> None:
            if response.status != b"OK":
                self.fail(BackendUnavailable("backend refused STARTTLS"))
                return
            self.start_tls()
            # Capabilities announced in clear are not to be trusted after TLS (RFC 9051 7.1).
            self._known_capabilities = None
            self._with_capabilities(self._identify)

        self._send(b"STARTTLS", done)

    def _identify(self) -> None:
        if self.request is None:
            # A probe at start: the backend answers, and this is what it offers before login.
            self.announced = self._known_capabilities
            self.probed(self._next_tag() + b" LOGOUT\r\n")
            return
        if not (self.settings.forward_client_ip and self._has(b"ID")):
            self._login()
            return
        client = self.request.client
        # Dovecot logs the session's name as its own (session=<...>), from a trusted network.
        fields: tuple[tuple[bytes, str], ...] = ((b"x-session-id", client.session),)
        if parse_ip(client.host) is not None:  # a client of a UNIX socket listener has no address to forward
            fields = ((b"x-originating-ip", client.host), (b"x-originating-port", str(client.port)),
                      (b"x-connected-ip", client.local_host), (b"x-connected-port", str(client.local_port)), *fields)
        pairs = b" ".join(b'"%s" "%s"' % (key, value.encode("ascii")) for key, value in fields)
        # The answer does not matter: a backend that ignores ID still takes the login.
        self._send(b"ID (" + pairs + b")", lambda response: self._login())

    def _login(self) -> None:
        request = self.request
        assert request is not None
        if request.master_user is not None:
            # As Dovecot's own proxy does: SASL PLAIN with the user as the authorization identity.
            # Dovecot needs no auth_master_user_separator for it, and any user name goes through.
            if not self._has(b"AUTH=PLAIN"):
                # Dovecot drops it where it would refuse a clear-text password, as it adds LOGINDISABLED.
                self.fail(BackendUnavailable("backend does not offer AUTH=PLAIN for the master login: "
                                             "use backend TLS or the backend's login_trusted_networks"))
                return
            self._plain_login(request.master_user, authzid=request.user)
            return
        if self._has(b"LOGINDISABLED"):
            self.fail(BackendUnavailable("backend refuses LOGIN (LOGINDISABLED): use backend TLS"))
            return
        tag = self._next_tag()
        try:
            chunks = login_command(tag, request.user.encode("utf-8", "surrogateescape"), request.password,
                                   self._has(b"LITERAL+"))
        except ValueError:
            self.fail(BackendRejected("credentials cannot be sent in an IMAP login"))
            return
        if sum(len(chunk) for chunk in chunks) > _LOGIN_COMMAND_LIMIT and self._has(b"AUTH=PLAIN"):
            self._plain_login(request.user)
            return
        self._send_credentials(tag, chunks)

    def _plain_login(self, authcid: str, authzid: str = "") -> None:
        """AUTHENTICATE PLAIN (RFC 4959's initial response where the backend offers SASL-IR)."""
        assert self.request is not None
        try:
            message = plain_message(authcid, self.request.password, authzid=authzid)
        except ValueError:
            self.fail(BackendRejected("credentials cannot be sent in an IMAP login"))
            return
        tag = self._next_tag()
        if self._has(b"SASL-IR"):
            self._send_credentials(tag, [tag + b" AUTHENTICATE PLAIN " + message + b"\r\n"])
        else:
            self._send_credentials(tag, [tag + b" AUTHENTICATE PLAIN\r\n", message + b"\r\n"])

    def _send_credentials(self, tag: bytes, chunks: list[bytes]) -> None:
        """
        Send a login command whose later chunks wait for the backend's continuations. What the backend
        offered is what it announces before login (kept by the connector, see BackendConnector._learn);
        after login it says anew.
        """
        self.announced = self._known_capabilities
        self._known_capabilities = None
        self._waiting = (tag, self._logged_in)
        self._login_chunks = chunks
        self._continue_login()

    def _continue_login(self) -> None:
        if not self._login_chunks:
            self.fail(BackendUnavailable("backend sent an unexpected continuation"))
            return
        assert self.transport is not None
        self.transport.write(self._login_chunks.pop(0))

    def _logged_in(self, response: Response) -> None:
        unsent, self._login_chunks = self._login_chunks, []
        if unsent:
            # Answered before the credentials were all sent (a literal refused): no verdict on them.
            self.fail(BackendUnavailable(f"backend answered before the credentials were sent: {_verdict(response)}"))
        elif response.status == b"OK":
            self._take_code(response)  # an alert on it: the gateway's tagged OK carries its own code
            self._with_capabilities(self._done)
        elif response.status == b"NO" and (response.code is None or response.code.name in _REJECTION_CODES):
            self.fail(BackendRejected(f"backend refused the login: {_verdict(response)}"))
        elif response.status == b"NO" and response.code is not None and response.code.name in _SESSION_REFUSAL_CODES:
            self.fail(BackendRefused(_verdict(response).encode("ascii")))
        else:
            self.fail(BackendUnavailable(f"backend login failed: {_verdict(response)}"))

    def _alert(self, response: Response) -> None:
        # Always as an untagged OK, whatever carried it (an untagged NO, the tagged OK): only the text is the user's.
        if len(self.notices) < _MAX_ALERTS:
            self.notices += (b"* OK [ALERT] " + response.text + b"\r\n",)

    def _done(self) -> None:
        self.capabilities = self._known_capabilities or ()
        self.succeed()


def _text(response: Response) -> str:
    code = f"[{response.code.name.decode('ascii', 'replace')}] " if response.code else ""
    return code + printable(response.text).decode("ascii")


def _verdict(response: Response) -> str:
    assert response.status is not None  # a tagged response always has one
    return login_answer(response.status, response.code.name if response.code else None)
