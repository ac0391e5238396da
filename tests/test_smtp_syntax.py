"""Tests for gateway.smtp_syntax: replies, EHLO keywords, command lines, MAIL/RCPT paths and xtext."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from gateway.smtp_syntax import (
    PathCommand,
    Reply,
    ReplyReader,
    SmtpSyntaxError,
    ehlo_keywords,
    parse_path,
    split_command,
    xtext,
)

PATH_ERRORS = {"Syntax: FROM:<address>", "Syntax: TO:<address>", "Bad address syntax", "Duplicate parameter",
               "Syntax error in parameters"}


def read_replies(reader: ReplyReader, wire: bytes) -> list[Reply]:
    """
    Feed the CRLF-separated lines of C{wire} to C{reader}.

    :returns: every reply completed, in order.
    """
    replies = []
    for line in wire.split(b"\r\n")[:-1]:
        reply = reader.feed(line)
        if reply is not None:
            replies.append(reply)
    return replies


def xtext_decode(encoded: bytes) -> bytes:
    """
    Decode xtext (RFC 3461 4), refusing anything outside its grammar.

    :raises ValueError: for a byte that is not an xchar or a "+" not followed by two upper-case hex digits.
    """
    decoded = bytearray()
    i = 0
    while i < len(encoded):
        byte = encoded[i]
        if byte == ord("+"):
            digits = encoded[i + 1:i + 3]
            if len(digits) != 2 or any(d not in b"0123456789ABCDEF" for d in digits):
                raise ValueError(f"bad hexchar at {i}")
            decoded.append(int(digits, 16))
            i += 3
        elif 0x21 <= byte <= 0x7E and byte != ord("="):
            decoded.append(byte)
            i += 1
        else:
            raise ValueError(f"not an xchar at {i}")
    return bytes(decoded)


class ReplyEncodeTests(SynchronousTestCase):
    """Replies in wire form."""

    def test_single_line(self) -> None:
        """A one-line reply is the code, a space, the text and CRLF."""
        self.assertEqual(Reply(250, (b"2.1.0 Ok",)).encode(), b"250 2.1.0 Ok\r\n")

    def test_multi_line(self) -> None:
        """Every line but the last carries a hyphen after the code; the last one a space."""
        reply = Reply(250, (b"mx.example.org", b"PIPELINING", b"SIZE 10240000"))
        self.assertEqual(reply.encode(), b"250-mx.example.org\r\n250-PIPELINING\r\n250 SIZE 10240000\r\n")

    def test_no_text(self) -> None:
        """A reply without lines is sent as the code and a space."""
        self.assertEqual(Reply(354).encode(), b"354 \r\n")

    def test_round_trip(self) -> None:
        """An encoded reply reads back as the same reply."""
        reply = Reply(550, (b"5.1.1 first", b"", b"5.1.1 last line"))
        self.assertEqual(read_replies(ReplyReader(), reply.encode()), [reply])


class ReplyReaderTests(SynchronousTestCase):
    """Collecting reply lines into replies."""

    def setUp(self) -> None:
        self.reader = ReplyReader()

    def test_single_line(self) -> None:
        """A line with a space after the code is a whole reply; the text keeps its spaces."""
        self.assertEqual(self.reader.feed(b"250 2.0.0  Ok "), Reply(250, (b"2.0.0  Ok ",)))

    def test_empty_text(self) -> None:
        """A code followed by a space alone is a reply with one empty line."""
        self.assertEqual(self.reader.feed(b"221 "), Reply(221, (b"",)))

    def test_bare_code(self) -> None:
        """
        A code without a space or text is a whole reply (RFC 5321 4.2: "Reply-code [ SP textstring ]
        CRLF", and clients should process the code alone without complaint).
        """
        self.assertEqual(self.reader.feed(b"250"), Reply(250, (b"",)))

    def test_multi_line(self) -> None:
        """Hyphen lines are collected until the line with a space, which completes the reply."""
        self.assertIsNone(self.reader.feed(b"250-mx.example.org"))
        self.assertIsNone(self.reader.feed(b"250-PIPELINING"))
        self.assertEqual(self.reader.feed(b"250 8BITMIME"),
                         Reply(250, (b"mx.example.org", b"PIPELINING", b"8BITMIME")))

    def test_consecutive_replies(self) -> None:
        """After one reply completes, the next starts afresh, with its own code."""
        replies = read_replies(self.reader, b"220-one\r\n220 two\r\n250 three\r\n354-a\r\n354 b\r\n")
        self.assertEqual(replies, [Reply(220, (b"one", b"two")), Reply(250, (b"three",)),
                                   Reply(354, (b"a", b"b"))])

    def test_code_change_mid_reply(self) -> None:
        """A continuation line with a different code is malformed."""
        self.reader.feed(b"250-mx.example.org")
        self.assertRaises(SmtpSyntaxError, self.reader.feed, b"251 PIPELINING")

    def test_code_change_on_hyphen_line(self) -> None:
        """A code change is refused on a hyphen line as well as on the last line."""
        self.reader.feed(b"250-mx.example.org")
        self.assertRaises(SmtpSyntaxError, self.reader.feed, b"550-PIPELINING")

    def test_malformed_lines(self) -> None:
        """Lines that do not start with a code from 200 to 599 and a separator are malformed."""
        for line in (b"", b"25", b"25 ok", b"2500 ok", b"250_ok", b"250\tok", b"abc ok", b" 250 ok",
                     b"150 ok", b"650 ok", b"099 ok", b"+OK ready", b"* OK IMAP"):
            self.assertRaises(SmtpSyntaxError, ReplyReader().feed, line)

    def test_malformed_message_is_fixed(self) -> None:
        """The error text does not echo the line."""
        error = self.assertRaises(SmtpSyntaxError, self.reader.feed, b"secret-token")
        self.assertEqual(str(error), "malformed reply")

    def test_hundred_lines(self) -> None:
        """A reply of 100 lines is read whole."""
        for number in range(99):
            self.assertIsNone(self.reader.feed(b"250-line %d" % number))
        reply = self.reader.feed(b"250 last")
        assert reply is not None
        self.assertEqual(len(reply.lines), 100)
        self.assertEqual(reply.lines[0], b"line 0")
        self.assertEqual(reply.lines[-1], b"last")

    def test_too_many_lines(self) -> None:
        """A reply that goes on past 100 lines is refused by its 101st hyphen line."""
        for number in range(100):
            self.assertIsNone(self.reader.feed(b"250-line %d" % number))
        error = self.assertRaises(SmtpSyntaxError, self.reader.feed, b"250-line 100")
        self.assertEqual(str(error), "reply too long")


class EhloKeywordsTests(SynchronousTestCase):
    """The extensions of an EHLO reply."""

    def test_keywords(self) -> None:
        """The first line is the greeting; each further line is an upper-cased keyword and its parameters."""
        reply = Reply(250, (b"mx.example.org Hello", b"PIPELINING", b"size 10240000", b"Auth PLAIN login",
                            b"8BITMIME", b"XCLIENT NAME ADDR PROTO HELO"))
        self.assertEqual(ehlo_keywords(reply), {
            b"PIPELINING": b"",
            b"SIZE": b"10240000",
            b"AUTH": b"PLAIN login",
            b"8BITMIME": b"",
            b"XCLIENT": b"NAME ADDR PROTO HELO",
        })

    def test_greeting_only(self) -> None:
        """An EHLO reply of a single line offers no extensions, even if the greeting names one."""
        self.assertEqual(ehlo_keywords(Reply(250, (b"STARTTLS",))), {})

    def test_parameters_keep_spaces(self) -> None:
        """Only the first space separates the keyword; the parameters are kept as they are."""
        self.assertEqual(ehlo_keywords(Reply(250, (b"x", b"AUTH  PLAIN  LOGIN"))), {b"AUTH": b" PLAIN  LOGIN"})


class SplitCommandTests(SynchronousTestCase):
    """Command lines split into verb and argument."""

    def test_verb_upper_cased(self) -> None:
        """The verb is upper-cased and the argument is kept as sent."""
        self.assertEqual(split_command(b"mail FROM:<Alice@Example.org>"), (b"MAIL", b"FROM:<Alice@Example.org>"))

    def test_no_argument(self) -> None:
        """A verb alone has an empty argument."""
        self.assertEqual(split_command(b"quit"), (b"QUIT", b""))

    def test_only_first_space(self) -> None:
        """Only the first space separates the verb; the rest is the argument."""
        self.assertEqual(split_command(b"EHLO  client example"), (b"EHLO", b" client example"))

    def test_trailing_spaces_dropped(self) -> None:
        """Spaces at the end of the line are not part of the argument."""
        self.assertEqual(split_command(b"RSET  "), (b"RSET", b""))
        self.assertEqual(split_command(b"VRFY bob  "), (b"VRFY", b"bob"))


class ParsePathTests(SynchronousTestCase):
    """MAIL FROM and RCPT TO arguments."""

    def assert_refused(self, argument: bytes, keyword: bytes = b"FROM") -> str:
        """Assert C{argument} is refused with one of the fixed texts; return the text."""
        try:
            parse_path(argument, keyword)
        except SmtpSyntaxError as error:
            self.assertIn(str(error), PATH_ERRORS)
            return str(error)
        self.fail(f"{argument!r} was accepted")

    def test_mail_from(self) -> None:
        """FROM:<address> gives the address without brackets and no parameters."""
        self.assertEqual(parse_path(b"FROM:<alice@example.org>", b"FROM"), PathCommand(b"alice@example.org", ()))

    def test_rcpt_to(self) -> None:
        """TO:<address> is parsed with the keyword TO."""
        self.assertEqual(parse_path(b"TO:<bob@example.net>", b"TO").address, b"bob@example.net")

    def test_keyword_case(self) -> None:
        """The keyword before the colon is matched without regard to case."""
        self.assertEqual(parse_path(b"from:<a@b.example>", b"FROM").address, b"a@b.example")

    def test_space_after_colon(self) -> None:
        """Spaces after the colon, as common clients send them, are accepted."""
        self.assertEqual(parse_path(b"FROM: <a@b.example>", b"FROM").address, b"a@b.example")
        self.assertEqual(parse_path(b"FROM:  <a@b.example> SIZE=1", b"FROM"),
                         PathCommand(b"a@b.example", ((b"SIZE", b"1"),)))

    def test_spaces_around_parameters(self) -> None:
        """More spaces than one before a parameter, and spaces after the last, are taken, as Postfix takes them."""
        self.assertEqual(parse_path(b"FROM:<a@b.example> ", b"FROM"), PathCommand(b"a@b.example", ()))
        self.assertEqual(parse_path(b"FROM:<a@b.example>  SIZE=1   BODY=8BITMIME  ", b"FROM"),
                         PathCommand(b"a@b.example", ((b"SIZE", b"1"), (b"BODY", b"8BITMIME"))))
        self.assertEqual(self.assert_refused(b"FROM:<a@b.example>SIZE=1"), "Syntax error in parameters")

    def test_address_case_kept(self) -> None:
        """The address keeps its case."""
        self.assertEqual(parse_path(b"FROM:<Alice@Example.ORG>", b"FROM").address, b"Alice@Example.ORG")

    def test_utf8_address(self) -> None:
        """An address with UTF-8 bytes (SMTPUTF8) is accepted as it is."""
        address = "jörg@bücher.example".encode()
        self.assertEqual(parse_path(b"FROM:<" + address + b"> SMTPUTF8", b"FROM").address, address)

    def test_null_path(self) -> None:
        """<> is the null path: an empty address."""
        self.assertEqual(parse_path(b"FROM:<>", b"FROM"), PathCommand(b"", ()))

    def test_parameters(self) -> None:
        """Parameters keep their order; keywords are upper-cased, values keep their case; no value is None."""
        path = parse_path(b"FROM:<a@b.example> size=1000 BODY=8bitMIME smtputf8 ENVID=QQ+2B314", b"FROM")
        self.assertEqual(path.parameters, ((b"SIZE", b"1000"), (b"BODY", b"8bitMIME"), (b"SMTPUTF8", None),
                                           (b"ENVID", b"QQ+2B314")))

    def test_parameter_lookup(self) -> None:
        """parameter() gives a value, b"" for a parameter without one, and None for one not given."""
        path = parse_path(b"FROM:<a@b.example> SIZE=1000 SMTPUTF8", b"FROM")
        self.assertEqual(path.parameter(b"SIZE"), b"1000")
        self.assertEqual(path.parameter(b"SMTPUTF8"), b"")
        self.assertIsNone(path.parameter(b"BODY"))

    def test_parameters_on_null_path(self) -> None:
        """The null path takes parameters too."""
        self.assertEqual(parse_path(b"FROM:<> BODY=7BIT", b"FROM"), PathCommand(b"", ((b"BODY", b"7BIT"),)))

    def test_wrong_keyword(self) -> None:
        """A missing or different keyword is refused with the usage text for the expected one."""
        self.assertEqual(self.assert_refused(b"TO:<a@b.example>"), "Syntax: FROM:<address>")
        self.assertEqual(self.assert_refused(b"<a@b.example>"), "Syntax: FROM:<address>")
        self.assertEqual(self.assert_refused(b"FROM <a@b.example>"), "Syntax: FROM:<address>")
        self.assertEqual(self.assert_refused(b"FROM:<a@b.example>", b"TO"), "Syntax: TO:<address>")

    def test_no_brackets(self) -> None:
        """An address without angle brackets, or without the closing one, is refused."""
        for argument in (b"FROM:a@b.example", b"FROM:<a@b.example", b"FROM:a@b.example>", b"FROM:", b"FROM: "):
            self.assertEqual(self.assert_refused(argument), "Syntax: FROM:<address>")

    def test_source_route(self) -> None:
        """A source route is refused."""
        self.assertEqual(self.assert_refused(b"FROM:<@relay.example:a@b.example>"), "Bad address syntax")
        self.assertEqual(self.assert_refused(b"TO:<@x,@y:a@b.example>", b"TO"), "Bad address syntax")

    def test_control_characters(self) -> None:
        """Control characters, DEL, spaces and a second "<" in the address are refused."""
        for address in (b"a\x00@b.example", b"a\x01@b.example", b"a\t@b.example", b"a b@b.example",
                        b"a\x7f@b.example", b"a\x1b[0m@b.example", b"<a@b.example"):
            self.assertEqual(self.assert_refused(b"FROM:<" + address + b">"), "Bad address syntax")

    def test_outside_the_mailbox_grammar(self) -> None:
        """
        What is not an RFC 5321 mailbox is refused: an MTA reads it its own way (Postfix takes
        "ceo(@lists.example" for "ceo" and a comment, and appends its own domain).
        """
        for address in (b"ceo(@lists.example", b"ceo%gmail.com(@lists.example", b"ceo(x)@lists.example",
                        b"a,b@lists.example", b"a:b@lists.example", b"a\\b@lists.example",
                        b"ceo", b"@lists.example", b"ceo@", b".ceo@lists.example", b"ceo.@lists.example",
                        b"c..eo@lists.example", b"ceo@lists.example.", b"ceo@lists..example", b"ceo@-lists.example",
                        b"ceo@lists-.example", b"ceo@lists.example(x)", b"ceo@lists_x.example", b"a@b@c.example",
                        b"ceo@[1.2.3.4", b"ceo@[x]", b"ceo@[1.2.3]", b"ceo@[:x]"):
            self.assertEqual(self.assert_refused(b"FROM:<" + address + b">"), "Bad address syntax", address)
            self.assertEqual(self.assert_refused(b"TO:<" + address + b">", b"TO"), "Bad address syntax", address)

    def test_inside_the_mailbox_grammar(self) -> None:
        """Atoms with any atext, quoted local parts, address literals and hyphenated labels pass unchanged."""
        for address in (b"a.b+tag@x-y.example", b"o'brien@example.org", b"!#$%&'*+/=?^_`{|}~-@example.org",
                        b'"a(b"@example.org', b'"a\\"b"@example.org', b'"john smith"@example.org',
                        b"a@[192.0.2.1]", b"a@[IPv6:2001:db8::1]",
                        b"a@x", b"A@EXAMPLE.ORG"):
            self.assertEqual(parse_path(b"FROM:<" + address + b">", b"FROM").address, address)

    def test_closing_bracket_in_quotes(self) -> None:
        """A ">" inside a quoted local part does not end the path; an unclosed quote leaves it open."""
        self.assertEqual(parse_path(b'TO:<"a>b"@example.org> NOTIFY=NEVER', b"TO"),
                         PathCommand(b'"a>b"@example.org', ((b"NOTIFY", b"NEVER"),)))
        self.assertEqual(parse_path(b'TO:<"a\\">b"@example.org>', b"TO").address, b'"a\\">b"@example.org')
        for unclosed in (b'TO:<"a>b@example.org>', b'TO:<a"b@example.org>'):
            self.assertEqual(self.assert_refused(unclosed, b"TO"), "Syntax: TO:<address>")

    def test_postmaster_and_null_path(self) -> None:
        """RCPT takes a bare Postmaster (any case) but not the null path; MAIL the other way round."""
        self.assertEqual(parse_path(b"TO:<PostMaster>", b"TO").address, b"PostMaster")
        self.assertEqual(self.assert_refused(b"TO:<>", b"TO"), "Bad address syntax")
        self.assertEqual(self.assert_refused(b"FROM:<postmaster>"), "Bad address syntax")

    def test_bad_parameter_keyword(self) -> None:
        """A keyword that is empty, starts with "-" or holds other than letters, digits and "-" is refused."""
        for parameters in (b"-SIZE=1", b"SI_ZE=1", b"SIZE:1", b"=1", b"X.Y", b"SIZ\xc3\x89=1"):
            self.assertEqual(self.assert_refused(b"FROM:<a@b.example> " + parameters), "Syntax error in parameters")

    def test_duplicate_parameter(self) -> None:
        """A parameter given twice, in any case, is refused: which of the two counts would be a guess."""
        for parameters in (b"SIZE=10 SIZE=20", b"BODY=8BITMIME body=7BIT", b"SMTPUTF8 SIZE=1 SMTPUTF8"):
            self.assertEqual(self.assert_refused(b"FROM:<a@b.example> " + parameters), "Duplicate parameter")

    def test_empty_value(self) -> None:
        """A "=" without a value is refused."""
        self.assertEqual(self.assert_refused(b"FROM:<a@b.example> SIZE="), "Syntax error in parameters")

    def test_no_space_before_parameters(self) -> None:
        """Parameters must be separated from the path by a space."""
        self.assertEqual(self.assert_refused(b"FROM:<a@b.example>SIZE=1"), "Syntax error in parameters")

    def test_empty_parameter(self) -> None:
        """A parameter of "=" alone, or a keyword with "=" and no value, is refused."""
        for argument in (b"FROM:<a@b.example> =", b"FROM:<a@b.example> SIZE=1 BODY="):
            self.assertEqual(self.assert_refused(argument), "Syntax error in parameters")

    def test_parameter_value_outside_grammar(self) -> None:
        """
        A value holding a control character, DEL or "=" is refused (RFC 5321 4.1.2: esmtp-value is
        1*(%d33-60 / %d62-126); RFC 6531 adds only non-ASCII UTF-8).
        """
        for value in (b"a\x01b", b"a\tb", b"a\x7fb", b"a=b"):
            self.assertEqual(self.assert_refused(b"FROM:<a@b.example> ENVID=" + value), "Syntax error in parameters")

    def test_utf8_value(self) -> None:
        """A value with UTF-8 bytes (RFC 6531) is accepted."""
        value = "jörg".encode()
        self.assertEqual(parse_path(b"TO:<a@b.example> ORCPT=utf-8;" + value, b"TO").parameter(b"ORCPT"),
                         b"utf-8;" + value)

    def test_message_does_not_echo(self) -> None:
        """No error text repeats the argument."""
        for argument in (b"FROM:secret@example", b"FROM:<secret\x01@example>", b"FROM:<a@b> SECRET="):
            self.assertNotIn("secret", self.assert_refused(argument).lower())


class PathEncodeTests(SynchronousTestCase):
    """Parsed paths written out again."""

    def test_round_trip(self) -> None:
        """A path parsed and encoded gives back the command in canonical form."""
        line = b"MAIL FROM:<alice@example.org> SIZE=1000 BODY=8BITMIME SMTPUTF8"
        verb, argument = split_command(line)
        self.assertEqual(verb, b"MAIL")
        self.assertEqual(parse_path(argument, b"FROM").encode(b"MAIL FROM"), line)

    def test_canonical_form(self) -> None:
        """Encoding drops the space after the colon and writes keywords upper-cased, values as given."""
        path = parse_path(b"from: <Alice@Example.org> size=10 body=8bitmime", b"FROM")
        self.assertEqual(path.encode(b"MAIL FROM"), b"MAIL FROM:<Alice@Example.org> SIZE=10 BODY=8bitmime")

    def test_null_path(self) -> None:
        """The null path encodes as <>."""
        self.assertEqual(parse_path(b"FROM:<>", b"FROM").encode(b"MAIL FROM"), b"MAIL FROM:<>")

    def test_encoded_parses_the_same(self) -> None:
        """Parsing an encoded path gives the same path."""
        path = PathCommand(b"bob@example.net", ((b"NOTIFY", b"SUCCESS,FAILURE"), (b"ORCPT", b"rfc822;bob@example.net"),
                                                (b"X-FLAG", None)))
        self.assertEqual(parse_path(path.encode(b"RCPT TO")[5:], b"TO"), path)


class XtextTests(SynchronousTestCase):
    """xtext encoding (RFC 3461 4)."""

    def test_plus(self) -> None:
        """"+" becomes "+2B"."""
        self.assertEqual(xtext(b"a+b"), b"a+2Bb")

    def test_equals(self) -> None:
        """"=" becomes "+3D"."""
        self.assertEqual(xtext(b"a=b"), b"a+3Db")

    def test_space_and_controls(self) -> None:
        """Space, controls and DEL become "+XX"."""
        self.assertEqual(xtext(b"a b\x00\r\n\x7f"), b"a+20b+00+0D+0A+7F")

    def test_eight_bit(self) -> None:
        """Bytes above 0x7e become "+XX" with upper-case hex digits."""
        self.assertEqual(xtext("jörg".encode()), b"j+C3+B6rg")
        self.assertEqual(xtext(b"\xff\xab"), b"+FF+AB")

    def test_printable_pass_through(self) -> None:
        """Every byte from "!" to "~" except "+" and "=" is kept as it is."""
        printable = bytes(b for b in range(0x21, 0x7F) if b not in b"+=")
        self.assertEqual(xtext(printable), printable)

    def test_orcpt_address(self) -> None:
        """An ORCPT value (RFC 3461 4.2) keeps its ";" and "@" and encodes only "+" and "="."""
        self.assertEqual(xtext(b"rfc822;bob+mail=list@example.com"), b"rfc822;bob+2Bmail+3Dlist@example.com")

    def test_empty(self) -> None:
        """The empty string stays empty."""
        self.assertEqual(xtext(b""), b"")

    def test_every_byte_round_trips(self) -> None:
        """Every byte value encodes to valid xtext that decodes back to it."""
        everything = bytes(range(256))
        encoded = xtext(everything)
        self.assertEqual(xtext_decode(encoded), everything)
