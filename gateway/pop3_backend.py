"""
The POP3 login dialogue with the backend store (RFC 1939, 2449, 2595, 3206).

Greeting, CAPA, optional STLS (then CAPA again), optional C{XCLIENT ADDR=... PORT=... SESSION=...} with the
client's address and session name (Dovecot honours it from C{login_trusted_networks}; a backend that refuses
it is asked again without SESSION), then USER and PASS. The backend's capabilities are kept so that the front
end promises only what the backend does.

The client's credentials go by USER and PASS, or by C{AUTH PLAIN} (RFC 5034) where those cannot
carry them: a space in the name, a CR or LF in the password, or a password too long for a 255-octet
command line (RFC 2449 4). A master login goes by C{AUTH PLAIN}, the master user's credentials with
the user as authorization identity, as Dovecot's own proxy logs in. AUTH PLAIN sends its response
initially, or after the server's C{+ } where the line would be too long.
A backend that will not take a clear-text password on this connection fails as unavailable,
never as a rejection, like LOGINDISABLED on the IMAP side: its CAPA leaves out USER (RFC 2449
6.2), or PLAIN from its SASL line for a master login, or, when its CAPA did not say, it answers
USER or PASS with Dovecot's fixed "Plaintext authentication disallowed" text.
"""

from __future__ import annotations

import re
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
from gateway.sasl import plain_message

# RFC 3206 / 2449 response codes: which backend refusals the client must see as they are.
_PASS_THROUGH_CODES = (b"IN-USE", b"LOGIN-DELAY")
_CODE = re.compile(rb"^\[([A-Za-z0-9/-]+)\]")

# Why a backend that refuses clear-text login is unavailable; fixed text, no backend text in it.
_CLEARTEXT_REFUSED = ("backend refuses clear-text login on this connection: "
                      "use backend TLS or the backend's login_trusted_networks")
# Dovecot's fixed answer (AUTH_PLAINTEXT_DISABLED_MSG, after the response code) when it refuses one.
_PLAINTEXT_DISABLED = b"Plaintext authentication disallowed on non-secure (SSL/TLS) connections."

_Handler = Callable[[bool, bytes], None]

# RFC 2449 4: a command line of at most 255 octets, CRLF included. An AUTH whose initial response
# would not fit sends it after the server's "+ " instead (RFC 5034 4).
_COMMAND_LINE = 255

# A CAPA answer is a few short lines (Dovecot's: 9, none over 40 bytes). One longer than this is
# a broken backend: it would be held for the login, and for the life of the gateway once probed.
_CAPA_LINES = 64
_CAPA_LINE_LENGTH = 1000


class Pop3BackendLogin(BackendLogin):
    """Logs in to a POP3 backend for one client; with no request it only learns the capabilities."""

    # See BackendLogin.
    __slots__ = ("_greeting_text", "_handler", "_capa", "_initial_response")

    def __init__(self, request: LoginRequest | None, settings: BackendSettings,
                 tls: IOpenSSLClientConnectionCreator | None) -> None:
        super().__init__(request, settings, tls)
        self._greeting_text = b""
        self._handler: _Handler | None = self._greeted
        self._capa: list[bytes] | None = None  # collecting a multi-line CAPA answer
        self._initial_response: bytes | None = None  # an AUTH's response, sent at the server's "+ "

    def lineReceived(self, line: bytes) -> None:
        if self.login_over:
            return
        line = line.rstrip(b"\r")
        if self._capa is not None:
            if line == b".":
                self.announced = tuple(self._capa)
                self._capa = None
                self._next(True, b"")
            elif len(self._capa) >= _CAPA_LINES or len(line) > _CAPA_LINE_LENGTH:
                self.fail(BackendUnavailable("backend sent an oversized CAPA answer"))
            else:
                # Dot-stuffed lines lose their leading dot (RFC 1939 3).
                self._capa.append(line[1:] if line.startswith(b".") else line)
            return
        if line == b"+" or line.startswith(b"+ "):
            self._continue_auth()
        elif self._initial_response is not None:
            self.fail(BackendUnavailable("backend answered AUTH before the credentials were sent"))
        elif line.startswith(b"+OK"):
            self._next(True, line[3:].lstrip(b" "))
        elif line.startswith(b"-ERR"):
            self._next(False, line[4:].lstrip(b" "))
        else:
            self.fail(BackendUnavailable("backend sent a malformed line"))

    def _next(self, ok: bool, text: bytes) -> None:
        handler, self._handler = self._handler, None
        if handler is None:
            self.fail(BackendUnavailable("backend answered without being asked"))
        else:
            handler(ok, text)

    def _send(self, command: bytes, handler: _Handler) -> None:
        self._handler = handler
        assert self.transport is not None
        self.transport.write(command + b"\r\n")

    def _has(self, capability: bytes) -> bool:
        return any(line.split(b" ", 1)[0].upper() == capability for line in self.announced or ())

    # -- the dialogue, in order

    def _greeted(self, ok: bool, text: bytes) -> None:
        if not ok:
            self.fail(BackendUnavailable(f"backend greeting was -ERR {_show(text)}"))
            return
        self._greeting_text = text
        self._capabilities(self._secure if self.settings.tls == "starttls" else self._identify)

    def _capabilities(self, then: Callable[[], None]) -> None:
        def answered(ok: bool, text: bytes) -> None:
            if ok:
                self._capa = []
                self._handler = lambda ok, text: then()
            else:
                self.announced = ()  # a pre-CAPA server: promise nothing beyond RFC 1939
                then()

        self._send(b"CAPA", answered)

    def _secure(self) -> None:
        if not self._has(b"STLS"):
            self.fail(BackendUnavailable("backend does not offer STLS"))
            return

        def answered(ok: bool, text: bytes) -> None:
            if not ok:
                self.fail(BackendUnavailable("backend refused STLS"))
                return
            self.start_tls()
            self.announced = None  # what was announced in clear is not to be trusted after TLS
            self._capabilities(self._identify)

        self._send(b"STLS", answered)

    def _identify(self) -> None:
        offers_xclient = self._has(b"XCLIENT") or self._greeting_text.startswith(b"[XCLIENT]")
        if self.settings.forward_client_ip and not offers_xclient:
            # Dovecot offers it to its login_trusted_networks only (in the greeting, which is
            # therefore still read after STLS): the probe at start finds this out.
            self.address_not_forwarded = ("the backend does not offer XCLIENT: "
                                          "list the gateway in its login_trusted_networks")
        if self.request is None:
            self.probed(b"QUIT\r\n")  # a capability probe: nothing more to learn
            return
        client = self.request.client
        if not (self.settings.forward_client_ip and offers_xclient) or parse_ip(client.host) is None:
            self._user()  # (a client of a UNIX socket listener has no address to forward)
            return
        address = b"XCLIENT ADDR=%s PORT=%d" % (client.host.encode("ascii"), client.port)

        def answered(ok: bool, text: bytes) -> None:
            # SESSION is Dovecot's own field (it logs the name as its own session=<...>): a backend
            # that refuses it is asked for the address alone.
            if ok:
                self._user()
            else:
                self._send(address, forwarded)

        def forwarded(ok: bool, text: bytes) -> None:
            # The login goes on either way: the backend then sees the gateway's address (logged, once).
            if not ok:
                self.address_not_forwarded = "the backend refused XCLIENT: " + printable(text).decode("ascii")
            self._user()

        self._send(address + b" SESSION=" + client.session.encode("ascii"), answered)

    def _continue_auth(self) -> None:
        response, self._initial_response = self._initial_response, None
        if response is None:
            self.fail(BackendUnavailable("backend sent an unexpected continuation"))
            return
        assert self.transport is not None
        self.transport.write(response + b"\r\n")

    def _offers_plain(self) -> bool:
        for line in self.announced or ():
            words = line.upper().split()
            if words[:1] == [b"SASL"] and b"PLAIN" in words[1:]:
                return True
        return False

    def _user(self) -> None:
        request = self.request
        assert request is not None  # a probe never gets this far
        master_user = request.master_user
        if self.announced and not (self._offers_plain() if master_user is not None else self._has(b"USER")):
            # Dovecot drops USER and PLAIN from SASL where it would refuse a clear-text password.
            self.fail(BackendUnavailable(_CLEARTEXT_REFUSED))
            return
        if master_user is not None:
            self._plain_login(master_user, authzid=request.user)
            return
        encoded = request.user.encode("utf-8", "surrogateescape")
        sendable = (encoded and not any(byte in encoded for byte in b"\0\r\n ")
                    and not any(byte in request.password for byte in b"\0\r\n"))
        if not (sendable and len(b"PASS " + request.password + b"\r\n") <= _COMMAND_LINE) and self._offers_plain():
            # USER and PASS carry one word each, in a line of at most 255 octets: a space in the
            # name, a long password (Dovecot's "Input buffer full" past 1 KiB) go by PLAIN.
            self._plain_login(request.user)
            return
        if not sendable:
            self.fail(BackendRejected("the credentials cannot be sent in POP3 USER and PASS"))
            return
        self._send(b"USER " + encoded, self._password)

    def _plain_login(self, authcid: str, authzid: str = "") -> None:
        """AUTH PLAIN (RFC 5034): with an initial response where the line fits, else after the server's "+ "."""
        assert self.request is not None
        try:
            message = plain_message(authcid, self.request.password, authzid=authzid)
        except ValueError:
            self.fail(BackendRejected("the credentials cannot be sent in AUTH PLAIN"))
            return
        if len(b"AUTH PLAIN " + message + b"\r\n") <= _COMMAND_LINE:
            self._send(b"AUTH PLAIN " + message, self._logged_in)
        else:
            self._initial_response = message
            self._send(b"AUTH PLAIN", self._logged_in)

    def _password(self, ok: bool, text: bytes) -> None:
        if not ok:
            self._refused(text)
            return
        assert self.request is not None
        self._send(b"PASS " + self.request.password, self._logged_in)

    def _logged_in(self, ok: bool, text: bytes) -> None:
        if not ok:
            self._refused(text)
            return
        self.capabilities = self.announced or ()
        self.succeed()

    def _refused(self, text: bytes) -> None:
        code = _CODE.match(text)
        name = code.group(1).upper() if code else b""
        if text[code.end() if code else 0:].lstrip(b" ").startswith(_PLAINTEXT_DISABLED):
            self.fail(BackendUnavailable(_CLEARTEXT_REFUSED))
        elif name in _PASS_THROUGH_CODES:
            self.fail(BackendRefused(printable(text)))
        elif name in (b"", b"AUTH"):
            self.fail(BackendRejected(f"backend refused the login: {login_answer(b'-ERR', name)}"))
        else:
            self.fail(BackendUnavailable(f"backend login failed: {login_answer(b'-ERR', name)}"))


def _show(text: bytes) -> str:
    return printable(text).decode("ascii")
