"""Tests for gateway.sasl: SASL PLAIN and LOGIN exchanges."""

from __future__ import annotations

import base64
from collections.abc import Callable

from twisted.trial.unittest import SynchronousTestCase

from gateway.sasl import (
    MAX_RESPONSE_SIZE,
    MECHANISMS,
    Challenge,
    Credentials,
    SaslCancelled,
    SaslError,
    SaslExchange,
    SaslRefused,
    begin,
    decode_response,
    encode_challenge,
)

SECRET = b"s3cr3t-Pa55"


def b64(data: bytes) -> bytes:
    """
    Encode test data as a client would.

    :param data: raw bytes.
    :returns: their base64 text.
    """
    return base64.b64encode(data)


def assert_rejected(
    test: SynchronousTestCase, call: Callable[[bytes], object], value: bytes, error: type[Exception] = SaslError
) -> None:
    """
    Fail the test unless a call raises the expected error, naming the value.

    :param test: the running test.
    :param call: the function under test.
    :param value: its argument.
    :param error: the exception type it must raise.
    """
    try:
        call(value)
    except error:
        return
    test.fail(f"{value!r} was accepted")


class DecodeResponseTests(SynchronousTestCase):
    """Tests for decode_response and encode_challenge."""

    def test_valid(self) -> None:
        """Canonical base64 decodes to its bytes, and "=" to the empty string."""
        cases = [
            (b"=", b""),
            (b"", b""),
            (b"YQ==", b"a"),
            (b"YWI=", b"ab"),
            (b"YWJj", b"abc"),
            (b"AHVzZXIAcGFzcw==", b"\0user\0pass"),
            (b"+/+/", b"\xfb\xff\xbf"),
        ]
        for text, expected in cases:
            self.assertEqual(decode_response(text), expected, text)

    def test_invalid(self) -> None:
        """Anything but canonical, padded base64 without whitespace is a SaslError."""
        cases = [
            b"YQ",  # missing padding
            b"YQ=",  # short padding
            b"YQ===",  # excess padding
            b"YWJjZA",  # missing padding
            b"YWJ",  # length not a multiple of four
            b"YR==",  # non-zero trailing bits
            b"YWI=YWI=",  # data after padding
            b"=YWI",  # leading padding
            b"==",
            b"YW Jj",  # inner space
            b" YWJj",
            b"YWJj ",
            b"YWJj\r\n",
            b"YWJj\t",
            b"YW-j",  # URL-safe alphabet
            b"YW_j",
            b"YW\x00j",
            b"*",
            b"\xc3\xa4\xc3\xa4",
        ]
        for text in cases:
            assert_rejected(self, decode_response, text)

    def test_size_bound(self) -> None:
        """A response decoding to more than MAX_RESPONSE_SIZE bytes is a SaslError."""
        self.assertEqual(len(decode_response(b64(b"x" * MAX_RESPONSE_SIZE))), MAX_RESPONSE_SIZE)
        for size in (MAX_RESPONSE_SIZE + 1, MAX_RESPONSE_SIZE + 2, MAX_RESPONSE_SIZE + 3, 10**6):
            assert_rejected(self, decode_response, b64(b"x" * size))

    def test_encode_challenge(self) -> None:
        """Challenges are base64 encoded, and an empty one is empty text."""
        self.assertEqual(encode_challenge(b""), b"")
        self.assertEqual(encode_challenge(b"Username:"), b"VXNlcm5hbWU6")
        self.assertEqual(encode_challenge(b"Password:"), b"UGFzc3dvcmQ6")
        self.assertEqual(decode_response(encode_challenge(b"\0\xff")), b"\0\xff")


class BeginTests(SynchronousTestCase):
    """Tests for begin and MECHANISMS."""

    def test_mechanisms(self) -> None:
        """PLAIN and LOGIN are offered, in that order."""
        self.assertEqual(MECHANISMS, (b"PLAIN", b"LOGIN"))

    def test_case_insensitive(self) -> None:
        """Mechanism names are matched without regard to case."""
        for name in (b"PLAIN", b"plain", b"Plain", b"LOGIN", b"login", b"LoGiN"):
            exchange = begin(name)
            self.assertIsInstance(exchange, SaslExchange)
            self.assertEqual(exchange.mechanism, name.upper())

    def test_every_advertised_mechanism_begins(self) -> None:
        """Every name in MECHANISMS starts an exchange for that mechanism."""
        for name in MECHANISMS:
            self.assertEqual(begin(name).mechanism, name)

    def test_unknown(self) -> None:
        """An unknown mechanism is a SaslError whose message does not echo it."""
        for name in (b"CRAM-MD5", b"GSSAPI", b"XOAUTH2", b"PLAIN ", b"", b"PLAIN\0"):
            assert_rejected(self, begin, name)
            caught = self.assertRaises(SaslError, begin, name)
            if name.strip():
                self.assertNotIn(name.strip().decode(), str(caught))


class PlainTests(SynchronousTestCase):
    """Tests for the PLAIN mechanism."""

    def test_initial_response(self) -> None:
        """A valid initial response completes PLAIN at once."""
        result = begin(b"PLAIN").start(b64(b"\0alice\0" + SECRET))
        self.assertEqual(result, Credentials("alice", SECRET, ""))

    def test_two_step(self) -> None:
        """Without an initial response PLAIN sends an empty challenge, then takes the message."""
        exchange = begin(b"PLAIN")
        self.assertEqual(exchange.start(None), Challenge(b""))
        self.assertEqual(exchange.respond(b64(b"\0alice\0" + SECRET)), Credentials("alice", SECRET))

    def test_authzid(self) -> None:
        """The authorization identity is returned as given."""
        for authzid in ("alice", "admin", "bob@example.org", "jürgen"):
            message = authzid.encode() + b"\0alice\0" + SECRET
            result = begin(b"PLAIN").start(b64(message))
            self.assertEqual(result, Credentials("alice", SECRET, authzid), authzid)

    def test_valid_messages(self) -> None:
        """Well-formed messages yield the user, password and authzid they carry."""
        cases = [
            (b"\0u\0p", Credentials("u", b"p")),
            (b"\0alice@example.org\0" + SECRET, Credentials("alice@example.org", SECRET)),
            ("\0jürgen\0pässwörd".encode(), Credentials("jürgen", "pässwörd".encode())),
            # Passwords are bytes: spaces, quotes, 8-bit and control bytes other than NUL survive.
            (b'\0u\0 a "b" \\c ', Credentials("u", b' a "b" \\c ')),
            (b"\0u\0\xff\xfe\x01\r\n\x7f", Credentials("u", b"\xff\xfe\x01\r\n\x7f")),
            (b"\0user name\0p", Credentials("user name", b"p")),
        ]
        for message, expected in cases:
            self.assertEqual(begin(b"PLAIN").start(b64(message)), expected, message)
            exchange = begin(b"PLAIN")
            exchange.start(None)
            self.assertEqual(exchange.respond(b64(message)), expected, message)

    def test_not_plain_messages(self) -> None:
        """Messages without exactly two NULs are no PLAIN message: SaslRefused, the authentication fails."""
        cases = [
            b"",  # empty response
            b"alice",  # no NUL
            b"\0alice",  # one NUL
            b"alice\0" + SECRET,  # one NUL
            b"\0alice\0pass\0",  # three NULs
            b"\0\0alice\0pass",
            b"\0alice\0pa\0ss",  # NUL in the password
        ]
        for message in cases:
            assert_rejected(self, begin(b"PLAIN").start, b64(message) if message else b"=", SaslRefused)
            exchange = begin(b"PLAIN")
            exchange.start(None)
            assert_rejected(self, exchange.respond, b64(message), SaslRefused)

    def test_empty_fields(self) -> None:
        """An empty user name or password is a wrong one, as in an IMAP LOGIN: the credentials go to be checked."""
        for message, expected in ((b"\0\0" + SECRET, Credentials("", SECRET)), (b"\0alice\0", Credentials("alice", b"")),
                                  (b"\0\0", Credentials("", b""))):
            self.assertEqual(begin(b"PLAIN").start(b64(message)), expected)

    def test_malformed_identities(self) -> None:
        """A user name or authorization identity that is not UTF-8 or holds a control character is a SaslError."""
        cases = [
            b"\0al\xffice\0pass",  # user not UTF-8
            b"\0al\xc3ice\0pass",  # truncated UTF-8
            b"\0\xed\xa0\x80\0pass",  # encoded surrogate
            b"\0al\tice\0pass",  # control characters in the user
            b"\0alice\r\n\0pass",
            b"\0alice\x7f\0pass",
            "\0al\u0085ice\0pass".encode(),  # C1 control
            b"\xff\0alice\0pass",  # authzid not UTF-8
            b"ad\nmin\0alice\0pass",  # control character in the authzid
        ]
        for message in cases:
            assert_rejected(self, begin(b"PLAIN").start, b64(message))
            exchange = begin(b"PLAIN")
            exchange.start(None)
            assert_rejected(self, exchange.respond, b64(message))

    def test_empty_initial_response(self) -> None:
        """An initial response of "=", or of no text at all, is an empty PLAIN message, which is none."""
        for empty in (b"=", b""):
            self.assertRaises(SaslRefused, begin(b"PLAIN").start, empty)

    def test_bad_base64(self) -> None:
        """Invalid base64 is a SaslError, in the initial response or in a response."""
        with self.assertRaises(SaslError):
            begin(b"PLAIN").start(b"AGFsaWNlAHBhc3M")
        exchange = begin(b"PLAIN")
        exchange.start(None)
        with self.assertRaises(SaslError):
            exchange.respond(b"AGFsaWNlAHBhc3M=\r\n")

    def test_cancel(self) -> None:
        """A "*" response cancels PLAIN."""
        exchange = begin(b"PLAIN")
        exchange.start(None)
        self.assertRaises(SaslCancelled, exchange.respond, b"*")

    def test_star_initial_response(self) -> None:
        """An initial response of "*" is not base64 and so a SaslError, not a cancel."""
        self.assertRaises(SaslError, begin(b"PLAIN").start, b"*")

    def test_size_bound(self) -> None:
        """A PLAIN message over MAX_RESPONSE_SIZE bytes is a SaslError; one at the bound is not."""
        head = b"\0alice\0"
        fits = head + b"p" * (MAX_RESPONSE_SIZE - len(head))
        result = begin(b"PLAIN").start(b64(fits))
        assert isinstance(result, Credentials)
        self.assertEqual(len(result.password), MAX_RESPONSE_SIZE - len(head))
        with self.assertRaises(SaslError):
            begin(b"PLAIN").start(b64(fits + b"p"))


class LoginTests(SynchronousTestCase):
    """Tests for the LOGIN mechanism."""

    def test_without_initial_response(self) -> None:
        """LOGIN prompts for the user name, then the password."""
        exchange = begin(b"LOGIN")
        self.assertEqual(exchange.start(None), Challenge(b"Username:"))
        self.assertEqual(exchange.respond(b64(b"alice")), Challenge(b"Password:"))
        self.assertEqual(exchange.respond(b64(SECRET)), Credentials("alice", SECRET))

    def test_with_initial_response(self) -> None:
        """An initial response is the user name, so only the password prompt follows."""
        exchange = begin(b"LOGIN")
        self.assertEqual(exchange.start(b64("jürgen".encode())), Challenge(b"Password:"))
        self.assertEqual(exchange.respond(b64(b'p w "\xff')), Credentials("jürgen", b'p w "\xff'))

    def test_empty_fields(self) -> None:
        """
        An empty user name ("=", or no text at all) and an empty password are wrong ones, as in
        an IMAP LOGIN: the credentials go to be checked.
        """
        for empty in (b"=", b""):
            exchange = begin(b"LOGIN")
            self.assertEqual(exchange.start(empty), Challenge(b"Password:"))
            self.assertEqual(exchange.respond(empty), Credentials("", b""))

    def test_invalid_user(self) -> None:
        """A non-UTF-8 or control-character user name is a SaslError."""
        for user in (b"\xff", b"al\0ice", b"al\tice", b"alice\r\n"):
            exchange = begin(b"LOGIN")
            exchange.start(None)
            assert_rejected(self, exchange.respond, b64(user))

    def test_invalid_password(self) -> None:
        """A password containing NUL, which PLAIN could not carry, is SaslRefused."""
        for password in (b"pa\0ss", b"\0"):
            exchange = begin(b"LOGIN")
            exchange.start(b64(b"alice"))
            assert_rejected(self, exchange.respond, b64(password), SaslRefused)

    def test_cancel(self) -> None:
        """A "*" response cancels LOGIN at either prompt."""
        exchange = begin(b"LOGIN")
        exchange.start(None)
        self.assertRaises(SaslCancelled, exchange.respond, b"*")
        exchange = begin(b"LOGIN")
        exchange.start(b64(b"alice"))
        self.assertRaises(SaslCancelled, exchange.respond, b"*")

    def test_bad_base64(self) -> None:
        """Invalid base64 is a SaslError at either prompt."""
        with self.assertRaises(SaslError):
            begin(b"LOGIN").start(b"YWxpY2U")
        exchange = begin(b"LOGIN")
        exchange.start(None)
        with self.assertRaises(SaslError):
            exchange.respond(b"YWxpY2U")
        exchange = begin(b"LOGIN")
        exchange.start(None)
        exchange.respond(b64(b"alice"))
        with self.assertRaises(SaslError):
            exchange.respond(b64(SECRET) + b" ")

    def test_size_bound(self) -> None:
        """A LOGIN password over MAX_RESPONSE_SIZE bytes is a SaslError."""
        exchange = begin(b"LOGIN")
        exchange.start(b64(b"alice"))
        with self.assertRaises(SaslError):
            exchange.respond(b64(b"p" * (MAX_RESPONSE_SIZE + 1)))


class SequencingTests(SynchronousTestCase):
    """Tests for calling an exchange's steps in order."""

    def test_start_twice(self) -> None:
        """Starting an exchange twice is a RuntimeError."""
        for name in MECHANISMS:
            exchange = begin(name)
            exchange.start(None)
            self.assertRaises(RuntimeError, exchange.start, None)

    def test_respond_before_start(self) -> None:
        """Responding before the exchange has started is a RuntimeError."""
        for name in MECHANISMS:
            self.assertRaises(RuntimeError, begin(name).respond, b64(b"x"))

    def test_respond_after_credentials(self) -> None:
        """Responding after the credentials came back is a RuntimeError."""
        exchange = begin(b"PLAIN")
        exchange.start(b64(b"\0alice\0" + SECRET))
        self.assertRaises(RuntimeError, exchange.respond, b64(b"\0alice\0" + SECRET))
        exchange = begin(b"LOGIN")
        exchange.start(b64(b"alice"))
        exchange.respond(b64(SECRET))
        self.assertRaises(RuntimeError, exchange.respond, b64(SECRET))

    def test_error_ends_exchange(self) -> None:
        """After a SaslError or a cancel, no further response is accepted."""
        exchange = begin(b"LOGIN")
        exchange.start(None)
        self.assertRaises(SaslError, exchange.respond, b"!!")
        self.assertRaises(RuntimeError, exchange.respond, b64(b"alice"))
        exchange = begin(b"PLAIN")
        exchange.start(None)
        self.assertRaises(SaslCancelled, exchange.respond, b"*")
        self.assertRaises(RuntimeError, exchange.respond, b64(b"\0alice\0" + SECRET))


class SecrecyTests(SynchronousTestCase):
    """Tests that passwords stay out of reprs and exception messages."""

    def test_credentials_repr(self) -> None:
        """The repr of Credentials shows the user and authzid but not the password."""
        text = repr(Credentials("alice", SECRET, "admin"))
        self.assertIn("alice", text)
        self.assertIn("admin", text)
        self.assertNotIn(SECRET.decode(), text)
        self.assertNotIn("password", text)

    def test_errors_do_not_echo_input(self) -> None:
        """SaslError and SaslRefused messages contain neither the password nor the encoded response."""
        messages = [
            b"\0alice\0" + SECRET + b"\0",
            b"\xff\0alice\0" + SECRET,
            b"\0al\xffice\0" + SECRET,
            b"alice\0" + SECRET,
        ]
        for message in messages:
            encoded = b64(message)
            for step in ("start", "respond"):
                exchange = begin(b"PLAIN")
                if step == "respond":
                    exchange.start(None)
                with self.assertRaises((SaslError, SaslRefused)) as caught:
                    getattr(exchange, step)(encoded)
                text = str(caught.exception) + repr(caught.exception)
                self.assertNotIn(SECRET.decode(), text)
                self.assertNotIn(encoded.decode(), text)
        exchange = begin(b"LOGIN")
        exchange.start(b64(b"alice"))
        with self.assertRaises(SaslRefused) as caught:
            exchange.respond(b64(SECRET + b"\0"))
        self.assertNotIn(SECRET.decode(), str(caught.exception))
