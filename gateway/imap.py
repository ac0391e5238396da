"""
The IMAP front end (RFC 9051 / RFC 3501): the commands a client may use before it has logged in.

CAPABILITY, NOOP, LOGOUT, STARTTLS, ID, LOGIN and AUTHENTICATE (PLAIN and LOGIN, with SASL-IR).
Commands are assembled across literals (C{{n}} and C{{n+}}, bounded in size) and then parsed
whole. Everything else before login is a tagged BAD. Once the backend has accepted the login the
connection becomes a byte relay (see L{gateway.frontend}).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from gateway.frontend import FrontEndContext, LoginFrontEnd, LoginOutcome, SaslFailure
from gateway.imap_syntax import Arg, Command, Nil, ParseError, format_capabilities, literal_at_end, parse_command, split_tag
from gateway.sasl import user_name

# Capabilities that describe the pre-login state of the backend and mean nothing to the client.
_PRE_LOGIN_ONLY = (b"STARTTLS", b"LOGINDISABLED")

_ID_REPLY = b'* ID ("name" "mailgateway")\r\n'

_REJECTED = b" NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
_SASL_FAILURES = {
    SaslFailure.UNKNOWN_MECHANISM: b" NO Unsupported authentication mechanism.\r\n",
    SaslFailure.CANCELLED: b" BAD Authentication cancelled.\r\n",
    SaslFailure.MALFORMED: b" BAD Invalid SASL response.\r\n",
    SaslFailure.REFUSED: _REJECTED,
}

# The commands that carry credentials.
_LOGIN_COMMANDS = frozenset((b"LOGIN", b"AUTHENTICATE"))

# What a connection offers before login (see _before_login): STARTTLS and LOGINDISABLED until TLS, AUTH= after.
_SECURE_CAPABILITIES = (b"AUTH=PLAIN", b"AUTH=LOGIN")
_CLEAR_CAPABILITIES = (b"STARTTLS", b"LOGINDISABLED")
# LITERAL-, not LITERAL+: a client's non-synchronizing literals stay within 4096 bytes (RFC 7888 4);
# offered when the literal limit allows that much.
_LITERAL_MINUS = 4096
# The backend's, offered before login when it offers them, as Dovecot does: they serve only after
# login, but some clients keep the list they got before (Python's imaplib refuses ENABLE, and from
# 3.14 IDLE, unless the server listed it then).
_BACKEND_CAPABILITIES = (b"ENABLE", b"IDLE")


class ImapFrontEnd(LoginFrontEnd):
    """One IMAP client connection."""

    # See LoginFrontEnd.
    __slots__ = ("_command", "_tag", "_literal_left")

    def __init__(self, context: FrontEndContext) -> None:
        super().__init__(context)
        self._command = bytearray()
        self._tag: bytes | None = None
        self._literal_left = 0

    def capabilities(self) -> bytes:
        """
        What this connection offers before login: STARTTLS and LOGINDISABLED until TLS, AUTH=
        after, and the backend's ENABLE and IDLE when it announced them.
        """
        literal_minus = self.context.limits.literal_size >= _LITERAL_MINUS
        return _before_login(self.secure, self.context.backend.announced or (), literal_minus)

    # -- hooks of LoginFrontEnd

    def greet(self) -> None:
        self.send(b"* OK [CAPABILITY " + self.capabilities() + b"] Mail gateway ready.\r\n")

    def reply_line_too_long(self, line: bytes) -> None:
        self.send(b"* BYE Command line too long.\r\n")

    def reply_timeout(self) -> None:
        self.send(b"* BYE Disconnected for inactivity.\r\n")

    def reply_too_many_errors(self) -> None:
        self.send(b"* BYE Too many invalid IMAP commands.\r\n")

    def reply_overloaded(self) -> None:
        self.send(b"* BYE [UNAVAILABLE] Too many connections, try again later.\r\n")

    def reply_shutting_down(self) -> None:
        self.send(b"* BYE Server shutting down.\r\n")  # Dovecot's words

    def command_line(self, line: bytes) -> None:
        if not self._command:
            self._tag = split_tag(line)
        self._command += line
        try:
            literal = literal_at_end(line)
        except ParseError as e:
            if line.endswith(b"+}"):
                # A non-synchronizing literal of unknown size: its bytes are on their way and must
                # never be read as commands (RFC 7888 4).
                self.send(b"* BYE [TOOBIG] Invalid literal.\r\n")
                self.close()
                return
            self._bad(str(e).encode("ascii"))
            return
        if literal is None:
            data = bytes(self._command)
            self._command.clear()
            self._run(data)
            return
        budget = self.context.limits.line_length + self.context.limits.literal_size
        if literal.size > self.context.limits.literal_size or len(self._command) + literal.size > budget:
            if not literal.synchronizing:
                # The literal's bytes are already on their way; there is no way to skip them safely.
                self.send(b"* BYE [TOOBIG] Literal too large.\r\n")
                self.close()
                return
            self._bad(b"[TOOBIG] Literal too large.")
            return
        self._command += b"\r\n"
        if literal.synchronizing:
            if self._refused_before_literal():
                return
            self.send(b"+ Ready for literal data.\r\n")
        if literal.size:
            self._literal_left = literal.size
            self.setRawMode()

    def rawDataReceived(self, data: bytes) -> None:
        if not self._literal_left:
            super().rawDataReceived(data)
            return
        chunk, rest = data[: self._literal_left], data[self._literal_left :]
        self._command += chunk
        self._literal_left -= len(chunk)
        if not self._literal_left:
            self.back_to_lines(rest)

    def _refused_before_literal(self) -> bool:
        """
        Refuse a command that could not run instead of asking for its literal (a client sends a
        synchronizing literal only once asked, RFC 9051 7.5): one unknown before login, and LOGIN
        or AUTHENTICATE before TLS, whose literal would carry credentials in clear; and one whose
        tag is invalid, which can never run (its literal might be a password, sent in clear).
        """
        if self._tag is None:
            self._bad(b"Invalid tag")
            return True
        name = bytes(self._command[len(self._tag) + 1 :]).partition(b" ")[0].upper()
        if name not in _COMMANDS:
            self._bad(b"Unknown command or not allowed before login.")
            return True
        if name in _LOGIN_COMMANDS and not self._may_log_in():
            self._command.clear()
            return True
        return False

    # -- commands

    def _run(self, data: bytes) -> None:
        try:
            command = parse_command(data)
        except ParseError as e:
            self._bad(str(e).encode("ascii"))
            return
        handler = _COMMANDS.get(command.name)
        if handler is None:
            self._bad(b"Unknown command or not allowed before login.")
            return
        handler(self, command)

    def do_CAPABILITY(self, command: Command) -> None:
        if self._no_args(command):
            self.send(b"* CAPABILITY " + self.capabilities() + b"\r\n")
            self._ok(b"Capability completed.")

    def do_NOOP(self, command: Command) -> None:
        if self._no_args(command):
            self._ok(b"NOOP completed.")

    def do_LOGOUT(self, command: Command) -> None:
        if self._no_args(command):
            self.send(b"* BYE Logging out.\r\n")
            self._ok(b"Logout completed.")
            self.close()

    def do_STARTTLS(self, command: Command) -> None:
        if not self._no_args(command):
            return
        if self.secure:
            self._bad(b"TLS is already active.")
            return
        self._ok(b"Begin TLS negotiation now.")
        self.start_tls()

    def do_ID(self, command: Command) -> None:
        if not _valid_id(command.args):
            self._bad(b"Invalid ID parameters.")
            return
        self.send(_ID_REPLY)
        self._ok(b"ID completed.")

    def do_LOGIN(self, command: Command) -> None:
        if not self._may_log_in():
            return
        if len(command.args) != 2 or not all(isinstance(a, bytes) for a in command.args):
            self._bad(b"LOGIN expects a user name and a password.")
            return
        user, password = command.args
        assert isinstance(user, bytes) and isinstance(password, bytes)
        name = user_name(user)
        if name is None:
            # No user's name: refused as AUTHENTICATE refuses it, before any hash or backend is asked.
            self._bad(b"LOGIN expects a user name and a password.")
            return
        self.log_in(name, password)

    def do_AUTHENTICATE(self, command: Command) -> None:
        if not self._may_log_in():
            return
        if not 1 <= len(command.args) <= 2 or not all(isinstance(a, bytes) for a in command.args):
            self._bad(b"AUTHENTICATE expects a mechanism and an optional initial response.")
            return
        mechanism = command.args[0]
        initial = command.args[1] if len(command.args) == 2 else None
        assert isinstance(mechanism, bytes) and (initial is None or isinstance(initial, bytes))
        self.start_sasl(mechanism, initial)

    def _may_log_in(self) -> bool:
        if self.may_log_in:
            return True
        assert self._tag is not None
        self.send(self._tag + b" NO [PRIVACYREQUIRED] Login is only allowed over TLS: use STARTTLS first.\r\n")
        self.command_failed()
        return False

    # -- SASL and login replies (the tag is the AUTHENTICATE or LOGIN command's; commands wait meanwhile)

    def reply_challenge(self, challenge: bytes) -> None:
        self.send(b"+ " + challenge + b"\r\n")

    def reply_sasl_failed(self, reason: SaslFailure) -> None:
        assert self._tag is not None
        self.send(self._tag + _SASL_FAILURES[reason])

    def reply_login(self, outcome: LoginOutcome) -> None:
        assert self._tag is not None
        if outcome is LoginOutcome.LOGGED_IN:
            session = self.backend_session()
            for notice in session.notices:
                self.send(notice)
            session.notices = ()
            self.send(self._tag + b" OK " + _logged_in_code(session.capabilities) + b"Logged in.\r\n")
        elif outcome is LoginOutcome.REJECTED:
            self.send(self._tag + _REJECTED)
            if self.attempts_exhausted:
                self.send(b"* BYE Too many failed login attempts.\r\n")
        elif outcome is LoginOutcome.THROTTLED:
            self.send(self._tag + b" NO [UNAVAILABLE] Too many failed logins from your address, try again later.\r\n")
            self.send(b"* BYE [UNAVAILABLE] Closing.\r\n")  # the connection closes after this reply
        elif outcome is LoginOutcome.OVERLOADED:
            self.send(self._tag + b" NO [UNAVAILABLE] Too many sessions for this user, try again later.\r\n")
            self.send(b"* BYE [UNAVAILABLE] Closing.\r\n")
        else:
            # A backend's refusal of the session (NO [LIMIT]) too: clients know UNAVAILABLE as
            # temporary, where some might take another code for a wrong password and ask for it
            # again. The log names the backend's code (backend_refused).
            self.send(self._tag + b" NO [UNAVAILABLE] Service temporarily unavailable, try again later.\r\n")

    # -- replies

    def _no_args(self, command: Command) -> bool:
        if command.args:
            self._bad(command.name + b" takes no arguments.")
            return False
        return True

    def _ok(self, text: bytes) -> None:
        assert self._tag is not None
        self.send(self._tag + b" OK " + text + b"\r\n")
        self.command_succeeded()

    def _bad(self, text: bytes) -> None:
        self._command.clear()
        self.send((self._tag or b"*") + b" BAD " + text + b"\r\n")
        self.command_failed()


# One table for every connection: a table of bound methods in each would cost about 2 KiB of
# every idle session and tie each connection into a reference cycle.
_COMMANDS: dict[bytes, Callable[[ImapFrontEnd, Command], None]] = {
    b"CAPABILITY": ImapFrontEnd.do_CAPABILITY,
    b"NOOP": ImapFrontEnd.do_NOOP,
    b"LOGOUT": ImapFrontEnd.do_LOGOUT,
    b"STARTTLS": ImapFrontEnd.do_STARTTLS,
    b"ID": ImapFrontEnd.do_ID,
    b"LOGIN": ImapFrontEnd.do_LOGIN,
    b"AUTHENTICATE": ImapFrontEnd.do_AUTHENTICATE,
}


@functools.lru_cache(maxsize=64)
def _before_login(secure: bool, backend_capabilities: tuple[bytes, ...], literal_minus: bool) -> bytes:
    """What a connection offers before login; worked out once per backend's list, not per connection."""
    offered = {c.upper() for c in backend_capabilities}
    caps = [b"IMAP4rev1", b"SASL-IR"] + ([b"LITERAL-"] if literal_minus else []) + [b"ID"]
    caps += [c for c in _BACKEND_CAPABILITIES if c in offered]
    return format_capabilities(caps + list(_SECURE_CAPABILITIES if secure else _CLEAR_CAPABILITIES))


@functools.lru_cache(maxsize=64)
def _logged_in_code(backend_capabilities: tuple[bytes, ...]) -> bytes:
    """
    The C{[CAPABILITY ...]} code of the tagged OK to a login: what the backend offers after login,
    less what only meant something before it. Worked out once per backend's list, not per login.
    """
    caps = [c for c in backend_capabilities if c.upper() not in _PRE_LOGIN_ONLY and not c.upper().startswith(b"AUTH=")]
    return b"[CAPABILITY " + format_capabilities(caps) + b"] " if caps else b""


def _valid_id(args: tuple[Arg, ...]) -> bool:
    """ID takes NIL or a list of at most 30 field/value pairs of strings (RFC 2971)."""
    if len(args) == 1 and isinstance(args[0], Nil):
        return True
    if len(args) != 1 or not isinstance(args[0], tuple):
        return False
    fields = args[0]
    return (len(fields) % 2 == 0 and len(fields) <= 60
            and all(isinstance(f, bytes) and not isinstance(f, Nil) and len(f) <= 30 for f in fields[0::2])
            and all(isinstance(v, bytes) and len(v) <= 1024 for v in fields[1::2]))
