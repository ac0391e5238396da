"""
The POP3 front end (RFC 1939, 2449, 2595, 3206, 5034): the commands a client may use before it
has logged in.

CAPA, STLS, USER and PASS, AUTH (PLAIN and LOGIN, with an initial response; bare AUTH lists the
mechanisms), NOOP and QUIT. Before TLS, CAPA offers STLS and neither USER nor SASL, and every
login command is refused. Once the backend has accepted the login the connection becomes a byte
relay (see L{gateway.frontend}).
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.frontend import FrontEndContext, LoginFrontEnd, LoginOutcome, SaslFailure
from gateway.sasl import MECHANISMS, user_name

# Backend capabilities the gateway may pass on: what the client can use once it is relayed.
_BACKEND_CAPABILITIES = (b"TOP", b"UIDL")

_REJECTED = b"-ERR [AUTH] Authentication failed.\r\n"
_SASL_FAILURES = {
    SaslFailure.UNKNOWN_MECHANISM: b"-ERR Unsupported authentication mechanism.\r\n",
    SaslFailure.CANCELLED: b"-ERR Authentication cancelled.\r\n",
    SaslFailure.MALFORMED: b"-ERR Invalid SASL response.\r\n",
    SaslFailure.REFUSED: _REJECTED,
}
_LOGIN_REPLIES = {
    LoginOutcome.LOGGED_IN: b"+OK Logged in.\r\n",
    LoginOutcome.REJECTED: _REJECTED,
    # Never [AUTH] for a backend failure: clients throw saved passwords away on [AUTH].
    LoginOutcome.UNAVAILABLE: b"-ERR [SYS/TEMP] Service temporarily unavailable, try again later.\r\n",
    LoginOutcome.THROTTLED: b"-ERR [SYS/TEMP] Too many failed logins from your address, try again later.\r\n",
    LoginOutcome.OVERLOADED: b"-ERR [SYS/TEMP] Too many sessions for this user, try again later.\r\n",
}


class Pop3FrontEnd(LoginFrontEnd):
    """One POP3 client connection."""

    # See LoginFrontEnd.
    __slots__ = ("_given_user",)

    def __init__(self, context: FrontEndContext) -> None:
        super().__init__(context)
        self._given_user: str | None = None

    def capabilities(self) -> list[bytes]:
        """
        What this connection offers before login: STLS until TLS, USER and SASL after, and the
        backend's TOP and UIDL when it announced them.
        """
        backend = self.context.backend.announced or ()
        caps = [line for line in backend if line.split(b" ", 1)[0].upper() in _BACKEND_CAPABILITIES]
        caps += [b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING"]
        caps += [b"USER", b"SASL " + b" ".join(MECHANISMS)] if self.secure else [b"STLS"]
        return caps

    # -- hooks of LoginFrontEnd

    def greet(self) -> None:
        self.send(b"+OK Mail gateway ready.\r\n")

    def reply_line_too_long(self, line: bytes) -> None:
        self.send(b"-ERR Line too long.\r\n")

    def reply_timeout(self) -> None:
        self.send(b"-ERR Disconnected for inactivity.\r\n")

    def reply_closing_after_login(self) -> None:
        pass  # POP3 has one reply per command: the login's -ERR was it, and the close says the rest

    def reply_too_many_errors(self) -> None:
        pass  # POP3 has one reply per command: the last command's -ERR was it, and the close says the rest

    def reply_overloaded(self) -> None:
        self.send(b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n")

    def reply_shutting_down(self) -> None:
        self.send(b"-ERR [SYS/TEMP] Server shutting down.\r\n")  # Dovecot's words

    def reply_challenge(self, challenge: bytes) -> None:
        self.send(b"+ " + challenge + b"\r\n")

    def reply_sasl_failed(self, reason: SaslFailure) -> None:
        self.send(_SASL_FAILURES[reason])

    def reply_login(self, outcome: LoginOutcome) -> None:
        if outcome is LoginOutcome.REFUSED:
            # [IN-USE] and [LOGIN-DELAY] reach the client as the backend worded them.
            self.send(b"-ERR " + self.backend_refusal + b"\r\n")
        else:
            self.send(_LOGIN_REPLIES[outcome])

    def command_line(self, line: bytes) -> None:
        verb, _, argument = line.partition(b" ")
        handler = _COMMANDS.get(verb.upper())
        if handler is None or b"\0" in line:
            self._error(b"Unknown command.")
            return
        handler(self, argument)

    # -- commands

    def do_CAPA(self, argument: bytes) -> None:
        if self._no_argument(argument):
            self._ok(b"Capability list follows.\r\n" + b"".join(cap + b"\r\n" for cap in self.capabilities()) + b".")

    def do_STLS(self, argument: bytes) -> None:
        if not self._no_argument(argument):
            return
        if self.secure:
            self._error(b"Command not permitted when TLS active.")
            return
        self._given_user = None
        self._ok(b"Begin TLS negotiation now.")
        self.start_tls()

    def do_USER(self, argument: bytes) -> None:
        if not self._may_log_in():
            return
        self._given_user = None  # PASS follows a successful USER only (RFC 1939 7)
        name = user_name(argument)
        # Not UTF-8 or holding a control character, refused as AUTH refuses it; or none (RFC 1939 7
        # requires one). Either is answered at once: no hash or backend is asked.
        if not name:
            self._error(b"USER expects a user name.")
            return
        self._given_user = name
        self._ok(b"Send your password.")

    def do_PASS(self, argument: bytes) -> None:
        if not self._may_log_in():
            return
        if self._given_user is None:
            self._error(b"Send USER first.")
            return
        user, self._given_user = self._given_user, None
        # The password is the rest of the line: it may hold spaces.
        self.log_in(user, argument)

    def do_AUTH(self, argument: bytes) -> None:
        if not self._may_log_in():
            return
        if not argument:
            self._ok(b"Mechanisms follow.\r\n" + b"".join(m + b"\r\n" for m in MECHANISMS) + b".")
            return
        self.start_auth(argument)

    def do_NOOP(self, argument: bytes) -> None:
        if self._no_argument(argument):
            self._ok(b"")

    def do_QUIT(self, argument: bytes) -> None:
        self.send(b"+OK Logging out.\r\n")
        self.close()

    # -- replies

    def _may_log_in(self) -> bool:
        if self.may_log_in:
            return True
        self._error(b"TLS required: use STLS first.")
        return False

    def _no_argument(self, argument: bytes) -> bool:
        if argument:
            self._error(b"This command takes no argument.")
            return False
        return True

    def _ok(self, text: bytes) -> None:
        self.send(b"+OK" + (b" " + text if text else b"") + b"\r\n")
        self.command_succeeded()

    def _error(self, text: bytes) -> None:
        self.send(b"-ERR " + text + b"\r\n")
        self.command_failed()


# One table for every connection, as in gateway.imap.
_COMMANDS: dict[bytes, Callable[[Pop3FrontEnd, bytes], None]] = {
    b"CAPA": Pop3FrontEnd.do_CAPA,
    b"STLS": Pop3FrontEnd.do_STLS,
    b"USER": Pop3FrontEnd.do_USER,
    b"PASS": Pop3FrontEnd.do_PASS,
    b"AUTH": Pop3FrontEnd.do_AUTH,
    b"NOOP": Pop3FrontEnd.do_NOOP,
    b"QUIT": Pop3FrontEnd.do_QUIT,
}
