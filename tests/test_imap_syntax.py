"""Tests for gateway.imap_syntax: IMAP command and response syntax."""

from __future__ import annotations

from collections.abc import Callable

from twisted.trial.unittest import SynchronousTestCase

from gateway.imap_syntax import (
    MAX_LIST_DEPTH,
    Arg,
    Command,
    Nil,
    Literal,
    ParseError,
    Response,
    ResponseCode,
    astring,
    format_capabilities,
    literal_at_end,
    login_command,
    parse_capabilities,
    parse_command,
    parse_response_line,
    split_tag,
)

VALID_TAGS = [
    b"a",
    b"A1",
    b"a001",
    b"0",
    b"a.1",
    b"tag]",  # "]" is an ASTRING-CHAR, so it is allowed in a tag
    b"]",
    b"a[1",
    b"a}1",
    b"!#$&'-./:;<=>?@^_`|~",
    b"x" * 200,
]

INVALID_TAGS = [
    b"",
    b"+",
    b"a+",
    b"+a",
    b"*",
    b"a*1",
    b"a%1",
    b"a(1",
    b"a)1",
    b"a{1",
    b'a"1',
    b"a\\1",
    b"a\x01",
    b"a\t1",
    b"a\x7f",
    b"a\x80",
    b"\xc3\xa4",
]


def assert_rejected(
    test: SynchronousTestCase,
    call: Callable[[bytes], object],
    value: bytes,
    error: type[Exception] = ParseError,
) -> Exception:
    """
    Fail the test unless a call raises the expected error, naming the value.

    :param test: the running test.
    :param call: the function under test.
    :param value: its argument.
    :param error: the exception type it must raise.
    :returns: the exception raised.
    """
    try:
        call(value)
    except error as e:
        return e
    test.fail(f"{value!r} was accepted")


class TagTests(SynchronousTestCase):
    """Tests for tag syntax, through split_tag and parse_command."""

    def test_valid_tags(self) -> None:
        """Tags made of ASTRING-CHARs other than "+" are accepted."""
        for tag in VALID_TAGS:
            self.assertEqual(split_tag(tag + b" NOOP"), tag, tag)
            self.assertEqual(parse_command(tag + b" NOOP").tag, tag, tag)

    def test_invalid_tags(self) -> None:
        """Empty tags and tags with "+", atom-specials other than "]", CTLs or 8-bit bytes are refused."""
        for tag in INVALID_TAGS:
            self.assertIsNone(split_tag(tag + b" NOOP"), tag)
            assert_rejected(self, parse_command, tag + b" NOOP")

    def test_split_tag_needs_space(self) -> None:
        """split_tag finds a tag only when a space follows it."""
        cases = [
            (b"a1 LOGIN x y", b"a1"),
            (b"a1 ", b"a1"),
            (b"a1  NOOP", b"a1"),
            (b"a1", None),
            (b"", None),
            (b" a1 NOOP", None),
            (b"a1\tNOOP", None),
            (b"a1\r\n", None),
            (b"+ YWJj", None),
            (b"* OK", None),
        ]
        for line, expected in cases:
            self.assertEqual(split_tag(line), expected, line)

    def test_invalid_tag_message(self) -> None:
        """A bad tag gives a fixed message that does not echo the input."""
        error = assert_rejected(self, parse_command, b"a*secret NOOP")
        self.assertEqual(str(error), "Invalid tag")


class ParseCommandTests(SynchronousTestCase):
    """Tests for parse_command on well-formed commands."""

    def assert_parses(self, cases: list[tuple[bytes, bytes, tuple[Arg, ...]]]) -> None:
        """
        Check that each command parses to the expected name and arguments.

        :param cases: (wire form, upper-case name, arguments) triples, all with tag "a1".
        """
        for data, name, args in cases:
            self.assertEqual(parse_command(data), Command(b"a1", name, args), data)

    def test_names(self) -> None:
        """The command name is an atom, upper-cased; a command may have no arguments."""
        self.assert_parses(
            [
                (b"a1 NOOP", b"NOOP", ()),
                (b"a1 noop", b"NOOP", ()),
                (b"a1 CaPaBiLiTy", b"CAPABILITY", ()),
                (b"a1 STARTTLS", b"STARTTLS", ()),
                (b"a1 x-custom", b"X-CUSTOM", ()),
            ]
        )

    def test_atoms(self) -> None:
        """Atoms, including "]" and base64 characters, are returned as given."""
        self.assert_parses(
            [
                (b"a1 LOGIN alice secret", b"LOGIN", (b"alice", b"secret")),
                (b"a1 LOGIN Alice@Example.ORG p]w", b"LOGIN", (b"Alice@Example.ORG", b"p]w")),
                (b"a1 AUTHENTICATE PLAIN AGFsaWNlAHB3", b"AUTHENTICATE", (b"PLAIN", b"AGFsaWNlAHB3")),
                (b"a1 AUTHENTICATE PLAIN =", b"AUTHENTICATE", (b"PLAIN", b"=")),
                (b"a1 AUTHENTICATE PLAIN a+/=", b"AUTHENTICATE", (b"PLAIN", b"a+/=")),
                (b"a1 LOGIN ~!#$&'-./ x}", b"LOGIN", (b"~!#$&'-./", b"x}")),
            ]
        )

    def test_quoted(self) -> None:
        """Quoted strings may hold spaces, specials, escaped quotes and backslashes, and 8-bit bytes."""
        self.assert_parses(
            [
                (b'a1 LOGIN "alice" "secret"', b"LOGIN", (b"alice", b"secret")),
                (b'a1 LOGIN "" ""', b"LOGIN", (b"", b"")),
                (b'a1 LOGIN "al ice" "pass word "', b"LOGIN", (b"al ice", b"pass word ")),
                (b'a1 LOGIN alice "p\\"w"', b"LOGIN", (b"alice", b'p"w')),
                (b'a1 LOGIN alice "p\\\\w"', b"LOGIN", (b"alice", b"p\\w")),
                (b'a1 LOGIN alice "\\"\\\\\\""', b"LOGIN", (b"alice", b'"\\"')),
                (b'a1 LOGIN alice "(){}%*]["', b"LOGIN", (b"alice", b"(){}%*][")),
                (b'a1 LOGIN alice "{5}"', b"LOGIN", (b"alice", b"{5}")),
                (b'a1 LOGIN alice "NIL"', b"LOGIN", (b"alice", b"NIL")),
                (b'a1 LOGIN alice "\tx\x01\x7f"', b"LOGIN", (b"alice", b"\tx\x01\x7f")),
                ('a1 LOGIN "jürgen" "pässwörd"'.encode(), b"LOGIN", ("jürgen".encode(), "pässwörd".encode())),
                (b'a1 LOGIN "\xff\xfe" x', b"LOGIN", (b"\xff\xfe", b"x")),
            ]
        )

    def test_literals(self) -> None:
        """Literals carry any bytes but NUL: spaces, quotes, CRLF, braces and 8-bit bytes."""
        self.assert_parses(
            [
                (b"a1 LOGIN {5}\r\nalice {6}\r\nsecret", b"LOGIN", (b"alice", b"secret")),
                (b"a1 LOGIN {5+}\r\nalice {6+}\r\nsecret", b"LOGIN", (b"alice", b"secret")),
                (b"a1 LOGIN alice {0}\r\n", b"LOGIN", (b"alice", b"")),
                (b"a1 LOGIN alice {007}\r\nsecret!", b"LOGIN", (b"alice", b"secret!")),
                (b'a1 LOGIN alice {9}\r\n a "b" c ', b"LOGIN", (b"alice", b' a "b" c ')),
                (b"a1 LOGIN alice {8}\r\nab\r\ncd\r\n", b"LOGIN", (b"alice", b"ab\r\ncd\r\n")),
                (b"a1 LOGIN alice {6}\r\n{3}\r\nx", b"LOGIN", (b"alice", b"{3}\r\nx")),
                (b"a1 LOGIN alice {4}\r\n\xff\x80\x01\x7f", b"LOGIN", (b"alice", b"\xff\x80\x01\x7f")),
                (b"a1 LOGIN alice {3}\r\nNIL", b"LOGIN", (b"alice", b"NIL")),
                (b"a1 LOGIN {5}\r\nalice secret", b"LOGIN", (b"alice", b"secret")),
                (b"a1 LOGIN {4}\r\n\\\"\\\" {1}\r\n\"", b"LOGIN", (b'\\"\\"', b'"')),
            ]
        )

    def test_nil(self) -> None:
        """The atom NIL, in any case, is a Nil keeping its spelling; a quoted or literal "NIL" is not."""
        for spelling in (b"NIL", b"nil", b"Nil"):
            [arg] = parse_command(b"a1 ID " + spelling).args
            self.assertIsInstance(arg, Nil)
            self.assertEqual(arg, spelling)
        for command in (b"a1 X NILS NI", b'a1 X "NIL" {3}\r\nnil'):
            self.assertFalse(any(isinstance(arg, Nil) for arg in parse_command(command).args))

    def test_lists(self) -> None:
        """Parenthesized lists become tuples, and may be empty, nested or hold literals."""
        self.assert_parses(
            [
                (
                    b'a1 ID ("name" "Thunderbird" "version" "115")',
                    b"ID",
                    ((b"name", b"Thunderbird", b"version", b"115"),),
                ),
                (b'a1 ID ("name" NIL)', b"ID", ((b"name", b"NIL"),)),
                (b"a1 ID ()", b"ID", ((),)),
                (b"a1 X (()) ((a) b)", b"X", (((),), ((b"a",), b"b"))),
                (b"a1 X ({3}\r\na b {2+}\r\n)( c)", b"X", ((b"a b", b")(", b"c"),)),
                (b'a1 X (a "b c" {1}\r\nd)', b"X", ((b"a", b"b c", b"d"),)),
                (b"a1 X a (b) c", b"X", (b"a", (b"b",), b"c")),
            ]
        )

    def test_spacing(self) -> None:
        """
        More spaces than one between arguments, after the last, and inside a list's parentheses
        are taken, as Dovecot takes them: a client built against it may send them.
        """
        self.assert_parses(
            [
                (b"a1 NOOP ", b"NOOP", ()),
                (b'a1 LOGIN  alice  "pw" ', b"LOGIN", (b"alice", b"pw")),
                (b"a1 AUTHENTICATE PLAIN ", b"AUTHENTICATE", (b"PLAIN",)),
                (b'a1 ID ( "name"  "x" )', b"ID", ((b"name", b"x"),)),
                (b"a1 X ( ) ( ( a ) )", b"X", ((), ((b"a",),))),
                (b"a1 X {1}\r\n  (a)", b"X", (b" ", (b"a",))),
            ]
        )

    def test_nesting_limit(self) -> None:
        """Lists nest up to MAX_LIST_DEPTH deep; one level more is a ParseError."""
        self.assertEqual(MAX_LIST_DEPTH, 8)
        deepest = b"(" * MAX_LIST_DEPTH + b"x" + b")" * MAX_LIST_DEPTH
        expected: Arg = b"x"
        for _ in range(MAX_LIST_DEPTH):
            expected = (expected,)
        self.assertEqual(parse_command(b"a1 X " + deepest).args, (expected,))
        self.assertEqual(parse_command(b"a1 X " + deepest + b" " + deepest).args, (expected, expected))
        too_deep = b"(" * (MAX_LIST_DEPTH + 1) + b"x" + b")" * (MAX_LIST_DEPTH + 1)
        error = assert_rejected(self, parse_command, b"a1 X " + too_deep)
        self.assertEqual(str(error), "Lists nested too deeply")
        assert_rejected(self, parse_command, b"a1 X (" + too_deep + b")")
        assert_rejected(self, parse_command, b"a1 X " + b"(" * 100_000)

    def test_real_client_commands(self) -> None:
        """Commands as real clients send them parse as expected."""
        cases = [
            (b"1 CAPABILITY", Command(b"1", b"CAPABILITY", ())),
            (
                b'A0001 LOGIN user@example.org {11}\r\nhunter2 "x"',
                Command(b"A0001", b"LOGIN", (b"user@example.org", b'hunter2 "x"')),
            ),
            (b'2 LOGIN "user@example.org" "p@ss w\\"rd"', Command(b"2", b"LOGIN", (b"user@example.org", b'p@ss w"rd'))),
            (b"3 authenticate plain", Command(b"3", b"AUTHENTICATE", (b"plain",))),
            (
                b'4 ID ("name" "Thunderbird" "version" "115.3.1" "os" "Linux")',
                Command(b"4", b"ID", ((b"name", b"Thunderbird", b"version", b"115.3.1", b"os", b"Linux"),)),
            ),
            (b"5 LOGOUT", Command(b"5", b"LOGOUT", ())),
        ]
        for data, expected in cases:
            self.assertEqual(parse_command(data), expected, data)


class ParseCommandRejectionTests(SynchronousTestCase):
    """Tests for parse_command on malformed commands."""

    def test_spacing(self) -> None:
        """
        Tokens are separated by spaces: none leading, one after the tag; arguments may have more
        between them and after them (see ParseCommandTests.test_spacing).
        """
        for data in [
            b"a1",
            b"a1 ",
            b" a1 NOOP",
            b"a1  NOOP",
            b"a1 LOGIN alice\tsecret",
            b'a1 LOGIN "alice""secret"',
            b'a1 LOGIN alice"secret"',
            b'a1 LOGIN "alice"secret',
            b"a1 LOGIN {5}\r\nalicesecret",
            b"a1 X (a)(b)",
            b"a1 X (a)b",
            b"a1 X a(b)",
            b"a1 X ({1}\r\n b)",
            b"a1 X ( a",
        ]:
            assert_rejected(self, parse_command, data)

    def test_names(self) -> None:
        """The command name must be an atom, and a bad byte in it says so."""
        for data in [b"a1 ]NOOP", b'a1 "NOOP"', b"a1 {4}\r\nNOOP", b"a1 (NOOP)", b"a1 NO*OP", b"a1 N\xc3\xa4",
                     b"a1 LOG*IN alice secret", b"a1 NOOP)", b"a1 NO%OP"]:
            self.assertEqual(str(assert_rejected(self, parse_command, data)), "Invalid command name", data)

    def test_atoms(self) -> None:
        """
        Atoms cannot contain atom-specials other than "]" and the list-wildcards, CTLs or 8-bit
        bytes, and say so rather than asking for a space.
        """
        for char in b'\\{\x01\x1f\x7f\x80\xff\t\r\n"(':
            data = b"a1 LOGIN al" + bytes([char]) + b"ice secret"
            error = assert_rejected(self, parse_command, data)
            if char not in b"\r\n":  # where the line ends, the atom ends too
                self.assertEqual(str(error), "Invalid characters in atom", data)
        assert_rejected(self, parse_command, b"a1 LOGIN alice )")
        for data in [b"a1 LOGIN alice) secret", b"a1 LOGIN alice secret)"]:
            self.assertEqual(str(assert_rejected(self, parse_command, data)), "Invalid characters in atom", data)
        self.assertEqual(parse_command(b"a1 X (a (b))").args, ((b"a", (b"b",)),))

    def test_wildcards_in_atoms(self) -> None:
        """
        "%" and "*" may stand in an atom argument, as Dovecot reads them: Python's imaplib sends
        a user name such as "user%domain" unquoted.
        """
        for user in [b"user%example.org", b"alice@example.org*admin", b"*", b"%"]:
            self.assertEqual(parse_command(b"a1 LOGIN " + user + b" secret"),
                             Command(b"a1", b"LOGIN", (user, b"secret")), user)
        self.assertEqual(parse_command(b"a1 X (a*b %)").args, ((b"a*b", b"%"),))

    def test_quoted(self) -> None:
        """Unterminated quoted strings, CR or LF inside, and escapes of anything but quote and backslash are refused."""
        for data in [
            b'a1 LOGIN alice "secret',
            b'a1 LOGIN alice "secret\\"',
            b'a1 LOGIN alice "',
            b'a1 LOGIN alice "se\\cret"',
            b'a1 LOGIN alice "se\\nret"',
            b'a1 LOGIN alice "se\\ ret"',
            b'a1 LOGIN alice "se\\\xc3\xa4ret"',
            b'a1 LOGIN alice "secret\\',
            b'a1 LOGIN alice "se\rcret"',
            b'a1 LOGIN alice "se\ncret"',
            b'a1 LOGIN alice "se\r\ncret"',
        ]:
            assert_rejected(self, parse_command, data)

    def test_literals(self) -> None:
        """Malformed markers, a missing CRLF, too few bytes and literal8 are refused."""
        for data in [
            b"a1 LOGIN alice {6}\r\nsecre",  # shorter than announced
            b"a1 LOGIN alice {6}\r\n",
            b"a1 LOGIN alice {6}",
            b"a1 LOGIN alice {6}\r\nsecrets",  # longer than announced
            b"a1 LOGIN alice {6}\nsecret",
            b"a1 LOGIN alice {6}\rsecret",
            b"a1 LOGIN alice {5}\rxhello",
            b"a1 LOGIN alice {5}\nxhello",
            b"a1 LOGIN alice {6} secret",
            b"a1 LOGIN alice {6}\r\n\r\nsecret",
            b"a1 LOGIN alice {}\r\n",
            b"a1 LOGIN alice {+}\r\n",
            b"a1 LOGIN alice {6x}\r\nsecret",
            b"a1 LOGIN alice {x6}\r\nsecret",
            b"a1 LOGIN alice {-6}\r\nsecret",
            b"a1 LOGIN alice { 6}\r\nsecret",
            b"a1 LOGIN alice {6 }\r\nsecret",
            b"a1 LOGIN alice {6++}\r\nsecret",
            b"a1 LOGIN alice {+6}\r\nsecret",
            b"a1 LOGIN alice {6-}\r\nsecret",
            b"a1 LOGIN alice {12345678901}\r\nsecret",
            b"a1 LOGIN alice {4294967296}\r\nsecret",
            b"a1 LOGIN alice {\xd9\xa6}\r\nsecret",  # a non-ASCII digit
            b"a1 LOGIN alice ~{6}\r\nsecret",  # literal8
            b"a1 LOGIN alice {6",
            b"a1 LOGIN alice {",
        ]:
            assert_rejected(self, parse_command, data)

    def test_nul(self) -> None:
        """NUL anywhere in a command, even inside a literal or quoted string, is refused."""
        for data in [
            b"\0a1 NOOP",
            b"a1\0 NOOP",
            b"a1 NO\0OP",
            b"a1 NOOP\0",
            b"a1 LOGIN al\0ice secret",
            b'a1 LOGIN alice "sec\0ret"',
            b"a1 LOGIN alice {6}\r\nsec\0et",
            b"a1 LOGIN alice {6+}\r\n\0\0\0\0\0\0",
            b"a1 ID (\0)",
        ]:
            error = assert_rejected(self, parse_command, data)
            self.assertEqual(str(error), "NUL in command")

    def test_lists(self) -> None:
        """Unterminated and unbalanced lists are refused."""
        for data in [b"a1 X (", b"a1 X (a", b"a1 X (a b", b"a1 X ((a)", b"a1 X a)", b"a1 X (a))", b"a1 X )"]:
            assert_rejected(self, parse_command, data)

    def test_messages_do_not_echo_input(self) -> None:
        """Error messages are fixed texts that never contain the client's bytes."""
        for data in [
            b'a1 LOGIN alice "hunter2',
            b'a1 LOGIN alice "hunter2\\x"',
            b"a1 LOGIN alice {99}\r\nhunter2",
            b"a1 LOGIN alice (hunter2",
            b"a1 LOGIN alice hunter2\\",
            b"a1 LOGIN alice {hunter2}\r\n",
        ]:
            error = assert_rejected(self, parse_command, data)
            self.assertNotIn("hunter2", str(error) + repr(error))
            self.assertNotIn("alice", str(error))


class LiteralAtEndTests(SynchronousTestCase):
    """Tests for literal_at_end."""

    def test_literals(self) -> None:
        """A line ending with {n} or {n+} announces a literal of n bytes."""
        cases = [
            (b"a1 LOGIN {5}", Literal(5, True)),
            (b"a1 LOGIN {5+}", Literal(5, False)),
            (b"a1 LOGIN alice {0}", Literal(0, True)),
            (b"a1 LOGIN alice {0+}", Literal(0, False)),
            (b"a1 LOGIN alice {0007}", Literal(7, True)),
            (b"a1 LOGIN alice {0000000001}", Literal(1, True)),
            (b"a1 LOGIN alice {4294967295}", Literal(4294967295, True)),
            (b"a1 ID ({4}", Literal(4, True)),
            (b'a1 ID ("name" {11+}', Literal(11, False)),
            (b" {3}", Literal(3, True)),  # a continuation line after a literal
            (b"{3}", Literal(3, True)),
            (b'a1 LOGIN "x{" {3}', Literal(3, True)),
            # Invalid commands, but the client announced a literal: its bytes
            # must be read as a literal, never as a command of their own.
            (b'a1 LOGIN alice "{5}', Literal(5, True)),
            (b"a1 LOGIN alice {{5}", Literal(5, True)),
            (b"a1 LOGIN alice{5+}", Literal(5, False)),
        ]
        for line, expected in cases:
            self.assertEqual(literal_at_end(line), expected, line)

    def test_no_literal(self) -> None:
        """A line not ending with a literal marker announces nothing, even if it ends with "}"."""
        for line in [
            b"a1 NOOP",
            b"",
            b"a1 LOGIN alice secret",
            b"a1 LOGIN alice pass}",
            b"a1 LOGIN alice }",
            b'a1 LOGIN alice "{5}"',
            b"a1 LOGIN alice {5",
            b"a1 LOGIN alice {5}x",
            b"a1 LOGIN alice {5} ",
            b'a1 LOGIN "x{" pass}',
            b'a1 LOGIN "{5" 5}',
        ]:
            self.assertIsNone(literal_at_end(line), line)

    def test_malformed(self) -> None:
        """A malformed brace at the end of a line is a ParseError."""
        for line in [
            b"a1 LOGIN alice {12x}",
            b"a1 LOGIN alice {}",
            b"a1 LOGIN alice {+}",
            b"a1 LOGIN alice {5++}",
            b"a1 LOGIN alice {+5}",
            b"a1 LOGIN alice {-1}",
            b"a1 LOGIN alice { 5}",
            b"a1 LOGIN alice {5 }",
            b"a1 LOGIN alice {1 2}",
            b"a1 LOGIN alice {12345678901}",
            b"a1 LOGIN alice {4294967296}",
            b"a1 LOGIN alice {9999999999}",
            b"a1 LOGIN alice {00000000001}",
            b"a1 LOGIN alice {\xd9\xa6}",
            b"a1 LOGIN alice pass{5}}",
        ]:
            assert_rejected(self, literal_at_end, line)

    def test_reassembly(self) -> None:
        """Lines read as the front end reads them join into a command parse_command accepts."""
        wire = b'a1 LOGIN {5}\r\nalice {8+}\r\n a "b"\r\n\r\n'
        parts: list[bytes] = []
        rest = wire
        while True:
            line, _, rest = rest.partition(b"\r\n")
            parts.append(line)
            literal = literal_at_end(line)
            if literal is None:
                break
            parts.append(b"\r\n" + rest[: literal.size])
            rest = rest[literal.size :]
        self.assertEqual(rest, b"")
        self.assertEqual(parse_command(b"".join(parts)), Command(b"a1", b"LOGIN", (b"alice", b' a "b"\r\n')))


class AstringTests(SynchronousTestCase):
    """Tests for astring."""

    def test_encoding(self) -> None:
        """Atoms go bare, other 7-bit values quoted with escapes, and the rest need a literal."""
        cases = [
            (b"alice", b"alice"),
            (b"alice@example.org", b"alice@example.org"),
            (b"a]b", b"a]b"),
            (b"NIL", b'"NIL"'),
            (b"nil", b'"nil"'),
            (b"", b'""'),
            (b"a b", b'"a b"'),
            (b'p"w', b'"p\\"w"'),
            (b"p\\w", b'"p\\\\w"'),
            (b"(x)", b'"(x)"'),
            (b"{5}", b'"{5}"'),
            (b"a%*", b'"a%*"'),
            (b"\t\x01\x7f", b'"\t\x01\x7f"'),
            (b"p\xc3\xa4ss", None),
            (b"\xff", None),
            (b"a\rb", None),
            (b"a\nb", None),
            (b"a\0b", None),
        ]
        for value, expected in cases:
            self.assertEqual(astring(value), expected, value)

    def test_round_trip(self) -> None:
        """Every value astring encodes parses back to itself."""
        for value in [b"alice", b"", b"NIL", b'a "b" \\c\\', b"x]y", b"%*(){}", b"\x01\x7f\t"]:
            encoded = astring(value)
            assert encoded is not None, value
            self.assertEqual(parse_command(b"a1 LOGIN " + encoded + b" x").args, (value, b"x"), value)


class LoginCommandTests(SynchronousTestCase):
    """Tests for login_command."""

    def test_single_chunk(self) -> None:
        """Atoms and quotable values go in one chunk ending with CRLF."""
        cases = [
            (b"alice", b"secret", b"a1 LOGIN alice secret\r\n"),
            (b"alice", b'p "w" \\', b'a1 LOGIN alice "p \\"w\\" \\\\"\r\n'),
            (b"NIL", b"", b'a1 LOGIN "NIL" ""\r\n'),
        ]
        for literal_plus in (False, True):
            for user, password, expected in cases:
                self.assertEqual(login_command(b"a1", user, password, literal_plus), [expected])

    def test_synchronizing_literals(self) -> None:
        """Without LITERAL+, each literal ends a chunk; the next chunk waits for "+"."""
        self.assertEqual(
            login_command(b"a1", b"alice", b"p\xc3\xa4ss", False),
            [b"a1 LOGIN alice {5}\r\n", b"p\xc3\xa4ss\r\n"],
        )
        self.assertEqual(
            login_command(b"a1", "jürgen".encode(), b"p\xc3\xa4ss\r\n", False),
            [b"a1 LOGIN {7}\r\n", "jürgen".encode() + b" {7}\r\n", b"p\xc3\xa4ss\r\n\r\n"],
        )
        self.assertEqual(
            login_command(b"a1", "jürgen".encode(), b"secret", False),
            [b"a1 LOGIN {7}\r\n", "jürgen".encode() + b" secret\r\n"],
        )

    def test_non_synchronizing_literals(self) -> None:
        """With LITERAL+, literals use {n+} and everything goes in one chunk."""
        self.assertEqual(
            login_command(b"a1", "jürgen".encode(), b"p\xc3\xa4ss\r\n", True),
            [b"a1 LOGIN {7+}\r\n" + "jürgen".encode() + b" {7+}\r\np\xc3\xa4ss\r\n\r\n"],
        )

    def test_chunks_parse_back(self) -> None:
        """The chunks form a command that parses back to the user and password, announcing each literal."""
        values = [b"alice", b"", b"NIL", b'a "b"', "jürgen".encode(), b"\xff\r\n\x01", b"{3}\r\n"]
        for literal_plus in (False, True):
            for user in values:
                for password in values:
                    chunks = login_command(b"t", user, password, literal_plus)
                    for chunk, following in zip(chunks, chunks[1:]):
                        self.assertTrue(chunk.endswith(b"\r\n"), chunk)
                        announced = literal_at_end(chunk[:-2])
                        assert announced is not None, chunk
                        self.assertTrue(announced.synchronizing)
                        self.assertIn(following[: announced.size], (user, password))
                    wire = b"".join(chunks)
                    self.assertTrue(wire.endswith(b"\r\n"))
                    self.assertEqual(parse_command(wire[:-2]), Command(b"t", b"LOGIN", (user, password)))

    def test_invalid_input(self) -> None:
        """An invalid tag or a NUL in a value is a ValueError that does not show the password."""
        for tag in INVALID_TAGS:
            self.assertRaises(ValueError, login_command, tag, b"alice", b"secret", False)
        error = self.assertRaises(ValueError, login_command, b"a1", b"alice", b"hunt\0er2", False)
        self.assertNotIn("hunt", str(error))
        self.assertRaises(ValueError, login_command, b"a1", b"al\0ice", b"secret", True)


class ParseResponseLineTests(SynchronousTestCase):
    """Tests for parse_response_line."""

    def test_dovecot_lines(self) -> None:
        """Lines a Dovecot backend sends parse into their parts."""
        caps = b"IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN"
        logged_in_caps = (
            b"IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT SORT=DISPLAY THREAD=REFERENCES "
            b"THREAD=REFS THREAD=ORDEREDSUBJECT MULTIAPPEND URL-PARTIAL CATENATE UNSELECT CHILDREN "
            b"NAMESPACE UIDPLUS LIST-EXTENDED I18NLEVEL=1 CONDSTORE QRESYNC ESEARCH ESORT SEARCHRES "
            b"WITHIN CONTEXT=SEARCH LIST-STATUS BINARY MOVE SNIPPET=FUZZY PREVIEW=FUZZY PREVIEW "
            b"STATUS=SIZE SAVEDATE LITERAL+ NOTIFY SPECIAL-USE"
        )
        cases = [
            (
                b"* OK [CAPABILITY " + caps + b"] Dovecot ready.",
                Response(None, False, b"OK", ResponseCode(b"CAPABILITY", caps), b"Dovecot ready."),
            ),
            (
                b"a OK [CAPABILITY " + logged_in_caps + b"] Logged in",
                Response(b"a", False, b"OK", ResponseCode(b"CAPABILITY", logged_in_caps), b"Logged in"),
            ),
            (
                b"a NO [AUTHENTICATIONFAILED] Authentication failed.",
                Response(b"a", False, b"NO", ResponseCode(b"AUTHENTICATIONFAILED", b""), b"Authentication failed."),
            ),
            (
                b"a NO [UNAVAILABLE] Temporary authentication failure. [host:2024-01-01 10:00:00]",
                Response(
                    b"a",
                    False,
                    b"NO",
                    ResponseCode(b"UNAVAILABLE", b""),
                    b"Temporary authentication failure. [host:2024-01-01 10:00:00]",
                ),
            ),
            (b"+ OK", Response(None, True, None, None, b"OK")),
            (b"+ ", Response(None, True, None, None, b"")),
            (b"+", Response(None, True, None, None, b"")),
            (b"+ VXNlcm5hbWU6", Response(None, True, None, None, b"VXNlcm5hbWU6")),
            (
                b"* BYE Disconnected for inactivity.",
                Response(None, False, b"BYE", None, b"Disconnected for inactivity."),
            ),
            (
                b"* BYE [UNAVAILABLE] Server shutting down.",
                Response(None, False, b"BYE", ResponseCode(b"UNAVAILABLE", b""), b"Server shutting down."),
            ),
            (b"* PREAUTH Logged in as alice", Response(None, False, b"PREAUTH", None, b"Logged in as alice")),
            (
                b"* CAPABILITY " + caps,
                Response(None, False, None, None, b"CAPABILITY " + caps),
            ),
            (
                b"* ID (\"name\" \"Dovecot\")",
                Response(None, False, None, None, b"ID (\"name\" \"Dovecot\")"),
            ),
            (b"* 3 EXISTS", Response(None, False, None, None, b"3 EXISTS")),
            (
                b"a BAD Error in IMAP command LOGIN: Invalid arguments.",
                Response(b"a", False, b"BAD", None, b"Error in IMAP command LOGIN: Invalid arguments."),
            ),
            (
                b"a1 OK [ALERT] Password expires soon",
                Response(b"a1", False, b"OK", ResponseCode(b"ALERT", b""), b"Password expires soon"),
            ),
            (
                b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\*)] Flags permitted.",
                Response(
                    None,
                    False,
                    b"OK",
                    ResponseCode(b"PERMANENTFLAGS", b"(\\Answered \\Flagged \\*)"),
                    b"Flags permitted.",
                ),
            ),
            (b"a ok [alert] x", Response(b"a", False, b"OK", ResponseCode(b"ALERT", b""), b"x")),
            (b"a OK", Response(b"a", False, b"OK", None, b"")),
            (b"a OK [ALERT]", Response(b"a", False, b"OK", ResponseCode(b"ALERT", b""), b"")),
            (b"* OK ", Response(None, False, b"OK", None, b"")),
            (b"a OK Logged in \xc3\xa4", Response(b"a", False, b"OK", None, b"Logged in \xc3\xa4")),
            (b"t] OK done", Response(b"t]", False, b"OK", None, b"done")),
        ]
        for line, expected in cases:
            self.assertEqual(parse_response_line(line), expected, line)

    def test_capabilities_from_greeting(self) -> None:
        """The capabilities of Dovecot's greeting split into atoms, case preserved."""
        response = parse_response_line(
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN] Dovecot ready."
        )
        assert response.code is not None
        self.assertEqual(
            parse_capabilities(response.code.args),
            (b"IMAP4rev1", b"SASL-IR", b"LOGIN-REFERRALS", b"ID", b"ENABLE", b"IDLE", b"LITERAL+", b"AUTH=PLAIN"),
        )

    def test_malformed(self) -> None:
        """Lines without a valid tag and status, with a bad code, or with CR, LF or NUL are a ParseError."""
        for line in [
            b"",
            b"*",
            b"* ",
            b"a",
            b"a ",
            b"a OK\r",
            b"a OK\n",
            b"a OK x\r\ny",
            b"a OK\0",
            b"+OK",
            b"+\r\n",
            b"a*1 OK done",
            b"a+ OK done",
            b"\xff OK done",
            b" a OK done",
            b"a BYE done",
            b"a PREAUTH done",
            b"a CAPABILITY IMAP4rev1",
            b"a 3 EXISTS",
            b"a OK [ALERT done",
            b"a OK [] done",
            b"a OK [ ALERT] done",
            b"a OK [AL*ERT] done",
            b"a OK [ALERT]done",
            b"* OK [CAPABILITY IMAP4rev1",
        ]:
            assert_rejected(self, parse_response_line, line)


class CapabilityTests(SynchronousTestCase):
    """Tests for parse_capabilities and format_capabilities."""

    def test_parse(self) -> None:
        """Capability lists split on single spaces, keeping case."""
        cases = [
            (b"IMAP4rev1", (b"IMAP4rev1",)),
            (
                b"IMAP4rev1 IMAP4rev2 STARTTLS LOGINDISABLED",
                (b"IMAP4rev1", b"IMAP4rev2", b"STARTTLS", b"LOGINDISABLED"),
            ),
            (b"imap4rev1 Literal- AUTH=SCRAM-SHA-256", (b"imap4rev1", b"Literal-", b"AUTH=SCRAM-SHA-256")),
        ]
        for text, expected in cases:
            self.assertEqual(parse_capabilities(text), expected, text)

    def test_parse_malformed(self) -> None:
        """Empty lists, extra spaces and non-atoms are a ParseError."""
        for text in [
            b"",
            b" ",
            b"IMAP4rev1 ",
            b" IMAP4rev1",
            b"IMAP4rev1  IDLE",
            b"IMAP4rev1 AUTH=X]",
            b"A\tB",
            b"A*",
            b"\xc3\xa4",
        ]:
            assert_rejected(self, parse_capabilities, text)

    def test_format(self) -> None:
        """Capabilities join with single spaces and parse back to themselves."""
        caps = (b"IMAP4rev1", b"SASL-IR", b"ID", b"LITERAL+", b"AUTH=PLAIN", b"AUTH=LOGIN")
        text = format_capabilities(caps)
        self.assertEqual(text, b"IMAP4rev1 SASL-IR ID LITERAL+ AUTH=PLAIN AUTH=LOGIN")
        self.assertEqual(parse_capabilities(text), caps)
        self.assertEqual(format_capabilities(iter([b"IMAP4rev1"])), b"IMAP4rev1")

    def test_format_invalid(self) -> None:
        """Formatting no capabilities or a non-atom is a ValueError."""
        for caps in [[], [b""], [b"IMAP4rev1", b"A B"], [b"X]"], [b"\xff"]]:
            self.assertRaises(ValueError, format_capabilities, caps)


class CapabilitySharingTests(SynchronousTestCase):
    """Sessions with one backend share one capability tuple."""

    def test_same_text_same_tuple(self) -> None:
        """Parsing the same capability text twice gives the very same tuple; other text another."""
        text = b"IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+"
        self.assertIs(parse_capabilities(bytes(text)), parse_capabilities(bytes(text)))
        self.assertIsNot(parse_capabilities(text), parse_capabilities(text + b" MOVE"))
