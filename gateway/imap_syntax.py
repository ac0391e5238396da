"""
IMAP4rev1 and IMAP4rev2 syntax (RFC 3501 and RFC 9051, section 9) for the gateway.

The pre-auth front end uses ``literal_at_end``, ``split_tag`` and
``parse_command`` to read client commands; the backend login client uses
``login_command``, ``parse_response_line`` and ``parse_capabilities`` to talk to
the store. Everything here is pure: bytes in, values out, no I/O.

Every ``ParseError`` carries a short fixed text that is safe to send to a
client after "BAD": it never contains client input.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeAlias

MAX_LIST_DEPTH = 8
"""How deeply parenthesized lists may nest in a command."""

MAX_LITERAL_DIGITS = 10
"""The most digits a literal's size may have."""

_MAX_NUMBER = 4294967295  # RFC 3501 "number" is an unsigned 32-bit integer.

_SP = 0x20
_SPACE = frozenset((_SP,))
_DQUOTE = 0x22
_BACKSLASH = 0x5C
_OPEN = 0x28
_CLOSE = 0x29
_OPEN_BRACE = 0x7B
_CR = 0x0D
_LF = 0x0A

# atom-specials: "(" ")" "{" SP CTL list-wildcards quoted-specials resp-specials
_ATOM_SPECIALS = frozenset(b'(){ %*"\\]') | frozenset(range(0x20)) | {0x7F}
_ATOM_CHARS = frozenset(range(0x01, 0x80)) - _ATOM_SPECIALS
_ASTRING_CHARS = _ATOM_CHARS | {ord("]")}
_TAG_CHARS = _ASTRING_CHARS - {ord("+")}
# What a client's atom argument may hold: list-wildcards too, as Dovecot reads them (they are
# atoms in LIST patterns), since Python's imaplib sends a LOGIN user name such as "user%domain"
# unquoted. What the gateway sends (astring) stays strict.
_ARGUMENT_CHARS = _ASTRING_CHARS | {ord("%"), ord("*")}
# The same sets as bytes, for checking whole values at C speed (see _made_of).
_ATOM_BYTES = bytes(sorted(_ATOM_CHARS))
_ASTRING_BYTES = bytes(sorted(_ASTRING_CHARS))
_TAG_BYTES = bytes(sorted(_TAG_CHARS))
_QUOTED_SPECIALS = frozenset(b'"\\')
_QUOTABLE = frozenset(range(0x01, 0x80)) - {_CR, _LF}
_STATUSES = frozenset((b"OK", b"NO", b"BAD", b"BYE", b"PREAUTH"))
_TAGGED_STATUSES = frozenset((b"OK", b"NO", b"BAD"))


class ParseError(Exception):
    """
    Input does not follow the IMAP grammar.

    The message is a short fixed text, safe to send to a client after "BAD".
    """


@dataclass(frozen=True)
class Literal:
    """
    A literal announced at the end of a line.

    :ivar size: how many bytes follow the line's CRLF.
    :ivar synchronizing: ``True`` for ``{n}``, where the client waits for a "+"
        continuation before sending the bytes; ``False`` for ``{n+}``.
    """

    size: int
    synchronizing: bool


class Nil(bytes):
    """
    The atom NIL, as the client spelled it. Where the grammar takes an nstring (ID's values)
    it means nil; where it takes an astring (LOGIN's user name) it is simply that string: a
    user called "nil" logs in with ``LOGIN nil secret``.
    """


Arg: TypeAlias = "bytes | tuple[Arg, ...]"
"""
A command argument: an atom, quoted string or literal is its value as bytes (the atom NIL is a
L{Nil}), and a parenthesized list is a tuple of arguments.
"""


@dataclass(frozen=True)
class Command:
    """
    A parsed client command.

    :ivar tag: the command tag.
    :ivar name: the command name, upper-cased.
    :ivar args: the arguments after the name, in order.
    """

    tag: bytes
    name: bytes
    args: tuple[Arg, ...]


@dataclass(frozen=True)
class ResponseCode:
    """
    A response code, the bracketed part at the start of a response text.

    :ivar name: the code's atom, upper-cased (``b"CAPABILITY"``).
    :ivar args: the raw text after the name and its space, ``b""`` if none.
    """

    name: bytes
    args: bytes


@dataclass(frozen=True)
class Response:
    """
    A parsed server response line.

    :ivar tag: the tag of a tagged response; ``None`` for untagged responses
        and continuation requests.
    :ivar continuation: ``True`` for a continuation request ("+").
    :ivar status: ``OK``, ``NO``, ``BAD``, ``BYE`` or ``PREAUTH``, upper-cased, for
        status responses; ``None`` for untagged data responses (such as
        "* CAPABILITY ...") and continuation requests.
    :ivar code: the response code of a status response, if it has one.
    :ivar text: the human-readable text of a status response; everything after
        "* " for a data response; everything after "+ " for a continuation
        request (a base64 challenge or free text).
    """

    tag: bytes | None
    continuation: bool
    status: bytes | None
    code: ResponseCode | None
    text: bytes


def _is_tag(data: bytes) -> bool:
    """
    Tell whether bytes form a valid tag.

    :param data: the candidate tag.
    :returns: whether it is 1*<ASTRING-CHAR except "+">.
    """
    return _made_of(data, _TAG_BYTES)


def _is_atom(data: bytes) -> bool:
    """
    Tell whether bytes form a valid atom.

    :param data: the candidate atom.
    :returns: whether it is 1*ATOM-CHAR.
    """
    return _made_of(data, _ATOM_BYTES)


def _made_of(data: bytes, chars: bytes) -> bool:
    """Whether C{data} is not empty and holds only bytes of C{chars} (deleting those leaves nothing)."""
    return bool(data) and not data.translate(None, chars)


def _literal_marker(body: bytes) -> Literal:
    """
    Parse what lies between the braces of a literal marker.

    :param body: the bytes between "{" and "}".
    :returns: the announced literal.
    :raises ParseError: unless ``body`` is 1 to 10 digits, optionally followed
        by "+", naming a number that fits in 32 bits.
    """
    synchronizing = not body.endswith(b"+")
    digits = body if synchronizing else body[:-1]
    # bytes.isdigit only accepts ASCII digits.
    if not digits.isdigit() or len(digits) > MAX_LITERAL_DIGITS:
        raise ParseError("Invalid literal")
    size = int(digits)
    if size > _MAX_NUMBER:
        raise ParseError("Invalid literal")
    return Literal(size, synchronizing)


def literal_at_end(line: bytes) -> Literal | None:
    """
    Find a literal announced at the end of a command line.

    :param line: one line of a command, without its CRLF.
    :returns: the announced literal, or ``None`` if the line does not end with
        one (including a line ending with an atom such as ``pass}``). A line
        ending with a well-formed marker announces a literal even if what
        precedes it is invalid: if the client meant a literal, its bytes must
        never be read as a command of their own.
    :raises ParseError: if the line ends with a malformed literal marker, such
        as ``{12x}``, ``{}`` or a size over 10 digits.
    """
    if not line.endswith(b"}"):
        return None
    start = line.rfind(b"{")
    if start == -1:
        return None
    body = line[start + 1 : -1]
    # "{" appears in valid commands only in quoted strings and literal markers.
    # If the last one is inside a quoted string the closing quote lies between
    # it and the final "}", so the line ends with an atom and parse_command
    # decides on it.
    if b'"' in body:
        return None
    return _literal_marker(body)


def split_tag(line: bytes) -> bytes | None:
    """
    Extract the tag from the start of a command line.

    The front end uses it to choose between "<tag> BAD" and "* BAD".

    :param line: the command line.
    :returns: the tag if the line starts with a valid tag followed by a space,
        else ``None``.
    """
    tag, space, _ = line.partition(b" ")
    if space and _is_tag(tag):
        return tag
    return None


class _CommandParser:
    """A cursor over one command in wire form."""

    def __init__(self, data: bytes) -> None:
        """
        Start at the beginning of a command.

        :param data: the whole command without its final CRLF.
        """
        self._data = data
        self._pos = 0

    def parse(self) -> Command:
        """
        Parse the whole command.

        :returns: the command.
        :raises ParseError: if the command does not follow the grammar.
        """
        data = self._data
        tag_end = data.find(b" ")
        if tag_end == -1 or not _is_tag(data[:tag_end]):
            raise ParseError("Invalid tag")
        self._pos = tag_end + 1
        name = self._take_chars(_ATOM_CHARS)
        if not name or (self._pos < len(data) and data[self._pos] != _SP):
            raise ParseError("Invalid command name")
        args: list[Arg] = []
        while self._pos < len(data):
            self._expect_space()
            if self._pos < len(data):  # else spaces at the end of the line
                args.append(self._arg(0))
        return Command(data[:tag_end], name.upper(), tuple(args))

    def _take_chars(self, allowed: frozenset[int]) -> bytes:
        """
        Consume the longest run of allowed bytes.

        :param allowed: the bytes the run may contain.
        :returns: the run, possibly empty.
        """
        data, start = self._data, self._pos
        end = start
        while end < len(data) and data[end] in allowed:
            end += 1
        self._pos = end
        return data[start:end]

    def _expect_space(self) -> None:
        """
        Consume the space between two tokens: one by the grammar, more as Dovecot takes them.

        :raises ParseError: if the next byte is not a space.
        """
        if self._data[self._pos] != _SP:
            raise ParseError("Expected space")
        self._skip_spaces()

    def _skip_spaces(self) -> bool:
        """Consume any spaces; say whether there were some."""
        return bool(self._take_chars(_SPACE))

    def _arg(self, depth: int) -> Arg:
        """
        Parse one argument.

        :param depth: how many lists enclose the argument.
        :returns: the argument.
        :raises ParseError: if no valid argument starts here.
        """
        if self._pos >= len(self._data):
            raise ParseError("Missing argument")
        first = self._data[self._pos]
        if first == _OPEN:
            return self._list(depth + 1)
        if first == _DQUOTE:
            return self._quoted()
        if first == _OPEN_BRACE:
            return self._literal()
        atom = self._take_chars(_ARGUMENT_CHARS)
        if not atom:
            raise ParseError("Invalid argument")
        # A ")" ends an atom only inside a list.
        if self._pos < len(self._data) and self._data[self._pos] != _SP and (
                depth == 0 or self._data[self._pos] != _CLOSE):
            raise ParseError("Invalid characters in atom")
        if atom.upper() == b"NIL":
            return Nil(atom)
        return atom

    def _list(self, depth: int) -> tuple[Arg, ...]:
        """
        Parse a parenthesized list.

        :param depth: the nesting depth of this list, 1 for an outermost list.
        :returns: the list's elements.
        :raises ParseError: if the list is malformed, unterminated or nested
            more than ``MAX_LIST_DEPTH`` deep.
        """
        if depth > MAX_LIST_DEPTH:
            raise ParseError("Lists nested too deeply")
        data = self._data
        self._pos += 1
        self._skip_spaces()  # Dovecot takes spaces after "(" and before ")" too
        items: list[Arg] = []
        spaced = False
        while True:
            if self._pos >= len(data):
                raise ParseError("Unterminated list")
            if data[self._pos] == _CLOSE:
                self._pos += 1
                return tuple(items)
            if items and not spaced:
                raise ParseError("Expected space")
            items.append(self._arg(depth))
            spaced = self._skip_spaces()

    def _quoted(self) -> bytes:
        """
        Parse a quoted string.

        :returns: its value with escapes removed.
        :raises ParseError: if it is unterminated, contains CR or LF, or has a
            backslash not followed by a quote or backslash.
        """
        data = self._data
        pos = self._pos + 1
        value = bytearray()
        while pos < len(data):
            byte = data[pos]
            if byte == _DQUOTE:
                self._pos = pos + 1
                return bytes(value)
            if byte == _BACKSLASH:
                pos += 1
                if pos >= len(data) or data[pos] not in _QUOTED_SPECIALS:
                    raise ParseError("Invalid escape in quoted string")
                byte = data[pos]
            elif byte in (_CR, _LF):
                raise ParseError("Line break in quoted string")
            value.append(byte)
            pos += 1
        raise ParseError("Unterminated quoted string")

    def _literal(self) -> bytes:
        """
        Parse an embedded literal: marker, CRLF and exactly the announced bytes.

        :returns: the literal's bytes.
        :raises ParseError: if the marker is malformed, CRLF does not follow it
            or fewer bytes follow than announced.
        """
        data = self._data
        start = self._pos
        # The marker body is at most 11 bytes, so "}" must come soon.
        close = data.find(b"}", start + 1, start + MAX_LITERAL_DIGITS + 3)
        if close == -1:
            raise ParseError("Invalid literal")
        literal = _literal_marker(data[start + 1 : close])
        if data[close + 1 : close + 3] != b"\r\n":
            raise ParseError("Invalid literal")
        begin = close + 3
        end = begin + literal.size
        if end > len(data):
            raise ParseError("Literal shorter than announced")
        self._pos = end
        return data[begin:end]


def parse_command(data: bytes) -> Command:
    """
    Parse one complete client command.

    :param data: the command in wire form without the final CRLF, with every
        literal embedded as ``{n}`` (or ``{n+}``), CRLF and exactly n bytes.
    :returns: the command; atoms, quoted strings and literals become bytes,
        the atom NIL (in any case) a L{Nil}, and lists become tuples.
    :raises ParseError: if the command does not follow the grammar: a bad tag
        or name, tokens not separated by spaces, a bad quoted string
        or literal, lists nested more than ``MAX_LIST_DEPTH`` deep, or a NUL
        anywhere.
    """
    if b"\0" in data:
        raise ParseError("NUL in command")
    return _CommandParser(data).parse()


def astring(value: bytes) -> bytes | None:
    """
    Encode a value as an astring without a literal.

    :param value: the value to send.
    :returns: the value itself if it is an atom other than NIL, else a quoted
        string if every byte is 0x01-0x7f other than CR and LF, else ``None``:
        the value then needs a literal.
    """
    if _made_of(value, _ASTRING_BYTES) and value.upper() != b"NIL":
        return value
    if all(byte in _QUOTABLE for byte in value):
        return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return None


def login_command(tag: bytes, user: bytes, password: bytes, literal_plus: bool) -> list[bytes]:
    """
    Build a LOGIN command for the backend.

    Values that are neither atoms nor quotable go as literals: synchronizing
    ones unless the server announced LITERAL+.

    :param tag: the command tag.
    :param user: the user name.
    :param password: the password.
    :param literal_plus: whether the server supports non-synchronizing literals.
    :returns: the chunks to send, the last ending with CRLF. Send the first at
        once and each later one only after the server's "+" continuation
        request. With ``literal_plus`` there is always exactly one chunk.
    :raises ValueError: if the tag is invalid or a value contains NUL.
    """
    if not _is_tag(tag):
        raise ValueError("invalid IMAP tag")
    chunks: list[bytes] = []
    current = tag + b" LOGIN"
    for value in (user, password):
        if b"\0" in value:
            # Deliberately no detail: the value may be the password.
            raise ValueError("NUL in LOGIN argument")
        encoded = astring(value)
        if encoded is not None:
            current += b" " + encoded
        elif literal_plus:
            current += b" {%d+}\r\n" % len(value) + value
        else:
            chunks.append(current + b" {%d}\r\n" % len(value))
            current = value
    chunks.append(current + b"\r\n")
    return chunks


def _response_text(rest: bytes) -> tuple[ResponseCode | None, bytes]:
    """
    Split a resp-text into its response code and text.

    :param rest: what follows the status and its space.
    :returns: the code, if any, and the text.
    :raises ParseError: if a code is unterminated, has an invalid name or is
        not followed by a space or the end of the line.
    """
    if not rest.startswith(b"["):
        return None, rest
    close = rest.find(b"]")
    if close == -1:
        raise ParseError("Unterminated response code")
    name, _, args = rest[1:close].partition(b" ")
    if not _is_atom(name):
        raise ParseError("Invalid response code")
    text = rest[close + 1 :]
    if text and text[0] != _SP:
        raise ParseError("Invalid response code")
    return ResponseCode(name.upper(), args), text[1:]


def parse_response_line(line: bytes) -> Response:
    """
    Parse one server response line.

    :param line: the line without its CRLF.
    :returns: the response: a continuation request, a tagged status response
        (OK, NO, BAD), an untagged status response (OK, NO, BAD, BYE,
        PREAUTH) or an untagged data response.
    :raises ParseError: if the line contains CR, LF or NUL, has an invalid
        tag, lacks a status or data after the tag, has a tagged response that
        is not OK, NO or BAD, or has a malformed response code.
    """
    if any(byte in line for byte in (b"\r", b"\n", b"\0")):
        raise ParseError("Invalid response")
    if line == b"+" or line.startswith(b"+ "):
        return Response(None, True, None, None, line[2:])
    tag, space, rest = line.partition(b" ")
    if not space or not rest:
        raise ParseError("Invalid response")
    untagged = tag == b"*"
    if not untagged and not _is_tag(tag):
        raise ParseError("Invalid tag")
    word, space, after = rest.partition(b" ")
    status = word.upper()
    if status not in (_STATUSES if untagged else _TAGGED_STATUSES):
        if untagged:
            return Response(None, False, None, None, rest)
        raise ParseError("Invalid response")
    code, text = _response_text(after)
    return Response(None if untagged else tag, False, status, code, text)


@functools.lru_cache(maxsize=64)
def parse_capabilities(text: bytes) -> tuple[bytes, ...]:
    """
    Split a capability list.

    :param text: space-separated capability atoms, as in a CAPABILITY response
        code or "* CAPABILITY" data after the name.
    :returns: the atoms in order, case preserved; the same tuple for the same text, so that
        thousands of sessions with one backend share one (about 2 KiB each otherwise).
    :raises ParseError: if the text is empty, any token is not an atom, or
        tokens are not separated by exactly one space.
    """
    caps = tuple(text.split(b" "))
    if not all(_is_atom(cap) for cap in caps):
        raise ParseError("Invalid capability list")
    return caps


def format_capabilities(caps: Iterable[bytes]) -> bytes:
    """
    Join capabilities for a CAPABILITY response.

    :param caps: the capability atoms.
    :returns: the atoms separated by single spaces.
    :raises ValueError: if there are none or any is not an atom.
    """
    atoms = tuple(caps)
    if not atoms or not all(_is_atom(atom) for atom in atoms):
        raise ValueError("capabilities must be one or more atoms")
    return b" ".join(atoms)
