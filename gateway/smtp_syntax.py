"""
SMTP syntax (RFC 5321, 1870, 1652, 6531, 3461 xtext): pure functions, bytes in, values out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


class SmtpSyntaxError(Exception):
    """A command or reply does not follow the grammar; the message is a fixed text."""


@dataclass(frozen=True)
class Reply:
    """
    A complete (possibly multi-line) SMTP reply.

    :ivar code: the three-digit reply code.
    :ivar lines: the text of each line, without code and separator.
    """

    code: int
    lines: tuple[bytes, ...] = field(default=())

    def encode(self) -> bytes:
        """The reply in wire form."""
        lines = self.lines or (b"",)
        code = b"%d" % self.code
        return b"".join(code + (b" " if i == len(lines) - 1 else b"-") + line + b"\r\n" for i, line in enumerate(lines))


# RFC 5321 4.2: the last line may be the bare code, without a space or text.
_REPLY_LINE = re.compile(rb"^([2-5][0-9][0-9])(?:([ -])(.*))?$", re.DOTALL)


class ReplyReader:
    """Collects the lines of multi-line replies into L{Reply} values."""

    def __init__(self) -> None:
        self._code: bytes | None = None
        self._lines: list[bytes] = []

    def feed(self, line: bytes) -> Reply | None:
        """
        Take one line (without its line ending).

        :returns: the reply once its last line has arrived, else None.
        :raises SmtpSyntaxError: for a line that is not a reply line, or a code that changes mid-reply.
        """
        match = _REPLY_LINE.match(line)
        if match is None or (self._code is not None and match.group(1) != self._code):
            raise SmtpSyntaxError("malformed reply")
        self._code = match.group(1)
        self._lines.append(match.group(3) or b"")
        if match.group(2) == b"-":
            if len(self._lines) > 100:
                raise SmtpSyntaxError("reply too long")
            return None
        reply = Reply(int(self._code), tuple(self._lines))
        self._code, self._lines = None, []
        return reply


def ehlo_keywords(reply: Reply) -> dict[bytes, bytes]:
    """The extensions of an EHLO reply: upper-case keyword -> its parameters (the first line is the greeting)."""
    keywords = {}
    for line in reply.lines[1:]:
        keyword, _, parameters = line.partition(b" ")
        keywords[keyword.upper()] = parameters
    return keywords


def split_command(line: bytes) -> tuple[bytes, bytes]:
    """
    A command line as (upper-case verb, argument), the argument without trailing spaces: RFC 5321
    has none, but clients send them, and Postfix takes them (C{RSET  } is a RSET).
    """
    verb, _, argument = line.partition(b" ")
    return verb.upper(), argument.rstrip(b" ")


@dataclass(frozen=True)
class PathCommand:
    """
    MAIL FROM or RCPT TO, parsed.

    :ivar address: the address between the angle brackets (empty for the null path).
    :ivar parameters: ESMTP parameters in order, keyword upper-cased, value None when absent.
    """

    address: bytes
    parameters: tuple[tuple[bytes, bytes | None], ...]

    def parameter(self, keyword: bytes) -> bytes | None:
        """The value of one parameter (b"" when it has no value), or None when not given."""
        for key, value in self.parameters:
            if key == keyword:
                return b"" if value is None else value
        return None

    def encode(self, verb: bytes) -> bytes:
        """The command again, e.g. C{encode(b"MAIL FROM")}."""
        parameters = b"".join(b" " + key + (b"=" + value if value is not None else b"")
                              for key, value in self.parameters)
        return verb + b":<" + self.address + b">" + parameters


_ESMTP_KEYWORD = re.compile(rb"^[A-Za-z0-9][A-Za-z0-9-]*$")

# RFC 5321 4.1.2 Mailbox, with RFC 6531's UTF-8 in atoms, quoted strings and labels. Nothing else
# may pass: an MTA reads what is outside the grammar its own way, e.g. Postfix takes
# "a(@allowed.example" for the local part "a" and a comment.
_ATOM = rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\xff-]+"
_QUOTED_STRING = rb'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\x20-\x7e])*"'
_LABEL = rb"[A-Za-z0-9\x80-\xff](?:[A-Za-z0-9\x80-\xff-]*[A-Za-z0-9\x80-\xff])?"
# An IPv4 address, or a tagged one ("IPv6:..."); what is inside is the MTA's to check.
_ADDRESS_LITERAL = rb"\[(?:[0-9]{1,3}(?:\.[0-9]{1,3}){3}|[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+)\]"
# A path in angle brackets; a ">" in a quoted local part is no end of it.
_BRACKETED = re.compile(rb'<((?:"(?:[^"\\]|\\.)*"|[^">])*)>', re.DOTALL)
_MAILBOX = re.compile(rb"(?:%s(?:\.%s)*|%s)@(?:%s(?:\.%s)*|%s)" % (
    _ATOM, _ATOM, _QUOTED_STRING, _LABEL, _LABEL, _ADDRESS_LITERAL))


def parse_path(argument: bytes, keyword: bytes) -> PathCommand:
    """
    Parse the argument of MAIL (C{keyword} b"FROM") or RCPT (b"TO").

    Accepts a space after the colon, as common clients send it, and more spaces than one before
    a parameter and after the last, as Postfix takes them. The address must be in angle brackets
    and be a mailbox (RFC 5321 4.1.2), the null path, or for RCPT the bare "Postmaster"; a
    source route is refused.

    :raises SmtpSyntaxError: with a fixed text.
    """
    prefix = keyword + b":"
    if argument[: len(prefix)].upper() != prefix:
        raise SmtpSyntaxError("Syntax: " + keyword.decode() + ":<address>")
    rest = argument[len(prefix):].lstrip(b" ")
    bracketed = _BRACKETED.match(rest)
    if bracketed is None:
        raise SmtpSyntaxError("Syntax: " + keyword.decode() + ":<address>")
    address, rest = bracketed[1], rest[bracketed.end():]
    if not _valid_path(address, keyword):
        raise SmtpSyntaxError("Bad address syntax")
    parameters = []
    rest = rest.rstrip(b" ")
    if rest:
        if not rest.startswith(b" "):
            raise SmtpSyntaxError("Syntax error in parameters")
        keywords: set[bytes] = set()
        for item in filter(None, rest.split(b" ")):
            key, equals, value = item.partition(b"=")
            if not _ESMTP_KEYWORD.match(key) or (equals and not value) or not _valid_value(value):
                raise SmtpSyntaxError("Syntax error in parameters")
            key = key.upper()
            if key in keywords:  # the gateway reads the first SIZE or BODY; an MTA might read the last
                raise SmtpSyntaxError("Duplicate parameter")
            keywords.add(key)
            parameters.append((key, value if equals else None))
    return PathCommand(address, tuple(parameters))


def _valid_path(address: bytes, keyword: bytes) -> bool:
    """A mailbox; or the null path for MAIL; or "Postmaster" alone for RCPT (RFC 5321 4.1.1.3)."""
    if keyword == b"TO" and address.lower() == b"postmaster":
        return True
    if not address:
        return keyword == b"FROM"
    return _MAILBOX.fullmatch(address) is not None


def _valid_value(value: bytes) -> bool:
    """esmtp-value (RFC 5321 4.1.2): bytes 33-60 and 62-126, plus UTF-8 (RFC 6531)."""
    return all(0x21 <= byte <= 0x7E and byte != 0x3D or byte >= 0x80 for byte in value)


def xtext(value: bytes) -> bytes:
    """Encode as xtext (RFC 3461 4): "+", "=" and bytes outside 0x21-0x7e become "+XX"."""
    return b"".join(bytes([byte]) if 0x21 <= byte <= 0x7E and byte not in b"+=" else b"+%02X" % byte
                    for byte in value)
