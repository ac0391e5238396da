"""
SASL PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login) for the front ends, and the PLAIN
message the backend logins send (L{plain_message}).

IMAP AUTHENTICATE, POP3 AUTH and SMTP AUTH share this module. The front ends
frame the exchange ("+ <base64>" or "334 <base64>") and hand over the client's
base64 response lines unchanged; this module decodes them, decides what each
step means and yields either the next challenge or the credentials. It does no
I/O and never puts a password, or any other client input, into an exception
message.
"""

from __future__ import annotations

import base64
import binascii
import unicodedata
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

MECHANISMS: tuple[bytes, ...] = (b"PLAIN", b"LOGIN")
"""The mechanism names ``begin`` accepts, in the order front ends advertise them."""

MAX_RESPONSE_SIZE = 8192
"""The largest decoded client response, in bytes, that an exchange accepts."""

# Base64 text longer than this cannot decode to MAX_RESPONSE_SIZE bytes or fewer,
# so it is refused before decoding.
_MAX_ENCODED_SIZE = 4 * -(-MAX_RESPONSE_SIZE // 3)

_CANCEL = b"*"
_EMPTY = b"="


class SaslError(Exception):
    """
    A client response is malformed or the mechanism is unknown.

    The message is a short fixed text that never contains client input.
    """


class SaslCancelled(Exception):
    """The client cancelled the exchange by answering a challenge with "*"."""


class SaslRefused(Exception):
    """
    A client response decodes, but is no message its mechanism defines (PLAIN without exactly
    two NULs, a NUL in a LOGIN password): the authentication fails (RFC 4616 2), as Dovecot
    fails it, where a response that does not decode is a protocol error (L{SaslError}).
    """


@dataclass(frozen=True)
class Credentials:
    """
    What a completed exchange yields.

    :ivar user: the authentication identity (PLAIN authcid, LOGIN user name), without
        control characters; empty is a wrong one, as in an IMAP LOGIN.
    :ivar password: the password bytes, without NUL; empty is a wrong one. Hidden from repr.
    :ivar authzid: the PLAIN authorization identity as sent, or "" when absent.
        The front end refuses a non-empty authzid that differs from ``user``.
    """

    user: str
    password: bytes = field(repr=False)
    authzid: str = ""


@dataclass(frozen=True)
class Challenge:
    """
    The next challenge to send to the client.

    :ivar data: the raw challenge; the front end sends ``encode_challenge(data)``
        (an empty line payload when ``data`` is empty).
    """

    data: bytes


def decode_response(text: bytes) -> bytes:
    """
    Decode one base64 client response strictly.

    Only canonical base64 is accepted: padding is required, and whitespace,
    characters outside the alphabet and non-zero trailing bits are refused.

    :param text: the response text without line ending; ``b"="`` stands for an
        empty response.
    :returns: the decoded bytes, at most ``MAX_RESPONSE_SIZE`` of them.
    :raises SaslError: if the text is not canonical base64 or decodes to more
        than ``MAX_RESPONSE_SIZE`` bytes.
    """
    if text == _EMPTY:
        return b""
    if len(text) > _MAX_ENCODED_SIZE:
        raise SaslError("response too long")
    try:
        decoded = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise SaslError("invalid base64") from None
    # The round trip rejects missing padding and non-canonical trailing bits,
    # which b64decode tolerates.
    if base64.b64encode(decoded) != text:
        raise SaslError("invalid base64")
    if len(decoded) > MAX_RESPONSE_SIZE:
        raise SaslError("response too long")
    return decoded


def encode_challenge(data: bytes) -> bytes:
    """
    Encode a challenge for the wire.

    :param data: the raw challenge bytes.
    :returns: their base64 encoding, ``b""`` for an empty challenge.
    """
    return base64.b64encode(data)


def plain_message(authcid: str, password: bytes, authzid: str = "") -> bytes:
    """
    A PLAIN client message for a backend, base64-encoded: log in as C{authcid} with C{password},
    acting as C{authzid} when one is given.

    :raises ValueError: if a field holds a NUL, which would shift the fields after it.
    """
    fields = (authzid.encode("utf-8", "surrogateescape"), authcid.encode("utf-8", "surrogateescape"), password)
    if any(b"\0" in field for field in fields):
        raise ValueError("a NUL in a PLAIN field")
    return base64.b64encode(b"\0".join(fields))


def user_name(data: bytes) -> str | None:
    """
    Decode a user name or authorization identity: the one check, for IMAP LOGIN and POP3 USER too.

    :param data: the raw identity bytes.
    :returns: the identity as text; None if it is not valid UTF-8 or holds a control character.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    # Category Cc covers NUL, C0, DEL and C1; none belongs in a user name, and
    # refusing them keeps user names safe to log.
    if any(unicodedata.category(char) == "Cc" for char in text):
        return None
    return text


def _identity(data: bytes) -> str:
    """
    Decode a user name or authorization identity (see L{user_name}).

    :raises SaslError: if it is not valid UTF-8 or contains a control character.
    """
    text = user_name(data)
    if text is None:
        raise SaslError("identity is not valid UTF-8 or holds a control character")
    return text


class SaslExchange(ABC):
    """
    One authentication attempt with one mechanism.

    Call ``start`` once, then ``respond`` once for every ``Challenge`` returned,
    until a ``Credentials`` comes back or an exception is raised. An exception
    ends the exchange.

    :ivar mechanism: the upper-case mechanism name.
    """

    mechanism: bytes

    def __init__(self) -> None:
        """Create an exchange that has not started."""
        self._started = False
        self._awaiting = False

    def start(self, initial_response: bytes | None) -> Challenge | Credentials:
        """
        Begin the exchange.

        :param initial_response: the raw base64 text of the initial response
            from the command line (IMAP SASL-IR, POP3 and SMTP AUTH); ``b"="``
            is an empty initial response and ``None`` means there was none.
        :returns: the first challenge, or the credentials if the initial
            response completes the exchange.
        :raises SaslError: if the initial response is malformed.
        :raises RuntimeError: if the exchange has already started.
        """
        if self._started:
            raise RuntimeError("SASL exchange already started")
        self._started = True
        data = None if initial_response is None else decode_response(initial_response)
        return self._expect_more(self._first(data))

    def respond(self, line: bytes) -> Challenge | Credentials:
        """
        Process the client's answer to the last challenge.

        :param line: the response line without its line ending: base64 text,
            or ``b"*"`` to cancel.
        :returns: the next challenge, or the credentials.
        :raises SaslCancelled: if the client sent ``b"*"``.
        :raises SaslError: if the response is malformed.
        :raises RuntimeError: if no challenge is outstanding.
        """
        if not self._awaiting:
            raise RuntimeError("no SASL challenge is outstanding")
        self._awaiting = False
        if line == _CANCEL:
            raise SaslCancelled()
        return self._expect_more(self._next(decode_response(line)))

    def _expect_more(self, result: Challenge | Credentials) -> Challenge | Credentials:
        """
        Note whether a response must follow, and pass the step's result on.

        :param result: what the mechanism step produced.
        :returns: ``result``.
        """
        self._awaiting = isinstance(result, Challenge)
        return result

    @abstractmethod
    def _first(self, data: bytes | None) -> Challenge | Credentials:
        """
        Run the mechanism's first step.

        :param data: the decoded initial response, or ``None`` if absent.
        :returns: the next challenge or the credentials.
        :raises SaslError: if ``data`` is malformed.
        """

    @abstractmethod
    def _next(self, data: bytes) -> Challenge | Credentials:
        """
        Run the mechanism's next step.

        :param data: the decoded client response.
        :returns: the next challenge or the credentials.
        :raises SaslError: if ``data`` is malformed.
        """


class _PlainExchange(SaslExchange):
    """PLAIN: a single message ``[authzid] NUL authcid NUL passwd``."""

    mechanism = b"PLAIN"

    def _first(self, data: bytes | None) -> Challenge | Credentials:
        """
        Parse the initial response, or ask for the message with an empty challenge.

        :param data: the decoded initial response, or ``None``.
        :returns: an empty challenge if ``data`` is ``None``, else the credentials.
        :raises SaslError: if the message is malformed.
        """
        if data is None:
            return Challenge(b"")
        return self._next(data)

    def _next(self, data: bytes) -> Credentials:
        """
        Parse a PLAIN message.

        :param data: the decoded message.
        :returns: the credentials it carries.
        :raises SaslRefused: unless it has exactly two NULs.
        :raises SaslError: unless the authcid and authzid are valid.
        """
        parts = data.split(b"\0")
        if len(parts) != 3:
            raise SaslRefused("malformed PLAIN message")
        authzid, authcid, password = parts
        return Credentials(_identity(authcid), password, _identity(authzid))


class _LoginExchange(SaslExchange):
    """LOGIN: the user name and the password, each answering a prompt."""

    mechanism = b"LOGIN"

    def __init__(self) -> None:
        """Create an exchange that has no user name yet."""
        super().__init__()
        self._user: str | None = None

    def _first(self, data: bytes | None) -> Challenge | Credentials:
        """
        Take an initial response as the user name, or prompt for one.

        :param data: the decoded initial response, or ``None``.
        :returns: the "Username:" challenge without an initial response, else
            the "Password:" challenge.
        :raises SaslError: if the user name is invalid.
        """
        if data is None:
            return Challenge(b"Username:")
        return self._next(data)

    def _next(self, data: bytes) -> Challenge | Credentials:
        """
        Take the user name, then the password.

        :param data: the decoded response.
        :returns: the "Password:" challenge after the user name, the
            credentials after the password.
        :raises SaslError: if the user name is invalid.
        :raises SaslRefused: if the password contains NUL.
        """
        if self._user is None:
            self._user = _identity(data)
            return Challenge(b"Password:")
        # PLAIN cannot carry a NUL in a password and the backend LOGIN command
        # cannot either, so LOGIN refuses it too.
        if b"\0" in data:
            raise SaslRefused("NUL in password")
        return Credentials(self._user, data)


_EXCHANGES: dict[bytes, type[SaslExchange]] = {
    b"PLAIN": _PlainExchange,
    b"LOGIN": _LoginExchange,
}


def begin(mechanism: bytes) -> SaslExchange:
    """
    Start an exchange for a mechanism named by the client.

    :param mechanism: the mechanism name, in any case.
    :returns: a new exchange that has not started.
    :raises SaslError: if the mechanism is not one of ``MECHANISMS``.
    """
    exchange = _EXCHANGES.get(mechanism.upper())
    if exchange is None:
        raise SaslError("unsupported mechanism")
    return exchange()
