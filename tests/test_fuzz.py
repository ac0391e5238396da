"""
Fuzz regression tests: bad input gets a protocol error or a disconnect, never an exception, a
logged failure, a malformed reply, or a session left open after its timeouts.

Deterministic: every parser loop draws from C{random.Random(SEED)}, and every front-end session or
proxied connection from its own C{random.Random("<class>/<SEED>/<n>")} (a backend login dialogue:
C{"<class>/<SEED>/<kind>/<n>"}), so that what one is fed does not depend on the others. A failure
names the input, or the session and the transcript of what it was fed.
"""

from __future__ import annotations

import base64
import ipaddress
import random
import re
import socket
import struct
import traceback
import unicodedata
from collections import deque
from collections.abc import Callable

from frontend_harness import PASSWORD, FrontEndTestBase, b64
from test_imap import ImapTestBase
from test_pop3 import Pop3TestBase
from test_submission import AUTH_BOB, SubmissionTestBase
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from gateway import imap_syntax, sasl, smtp_syntax
from gateway.backend import BackendLogin, BackendRefused, BackendRejected, BackendUnavailable
from gateway.frontend import FrontEndFactory
from gateway.proxy_protocol import HEADER_TIMEOUT, TrustedProxyFactory
from gateway.smtp_backend import SmtpBackend
from gateway.testing.fakes import TLSStringTransport

SEED = 20
PARSER_INPUTS = 3000
SESSIONS = 400
PROXIED_CONNECTIONS = 600

# -- the mutator and the generators

TOKENS = (b"\0", b"\r", b"\n", b"\r\n", b" ", b" 1", b'"', b"\\", b"(", b")", b"{", b"}", b"{0}", b"{5}", b"{5+}",
          b"~{5}", b"{4294967296}", b"{99999999999+}", b"+", b"*", b"=", b"<", b">", b"@", b":", b"NIL",
          b"\x7f", b"\x80", b"\xff", b"\xc3\xa9", b"\r\n.\r\n", b"\n.\n")


def mutate(rng: random.Random, data: bytes, tokens: tuple[bytes, ...] = TOKENS) -> bytes:
    """C{data} with one to four random edits: bytes deleted, replaced or inserted, tokens spliced in, runs repeated."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        # Half the edits at a token boundary, where an argument, literal or line end can be added or cut.
        boundaries = [i for i, c in enumerate(b[:300]) if c in b" \r\n"] + [len(b)]
        at = rng.choice(boundaries) if rng.random() < 0.5 else rng.randint(0, len(b))
        op = rng.randrange(7)
        if op == 0 and b:
            del b[rng.randrange(len(b))]
        elif op == 1 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 2:
            b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and b:
            del b[at:at + rng.randint(1, 16)]
        elif op == 4 and b:
            # Long runs reach the line, literal and SASL size limits (8192 and about).
            i = rng.randrange(len(b))
            b[i:i + 1] = b[i:i + 1] * rng.choice((2, 9, 100, 8193))
        else:
            b[at:at] = rng.choice(tokens)
    return bytes(b)


def word(rng: random.Random, size: int = 8) -> bytes:
    """A short value from letters, digits and the characters the grammars treat specially."""
    return bytes(rng.choice(b"abXY09%*!#&'-._/+=@\\\"]") for _ in range(rng.randint(0, size)))


def imap_argument(rng: random.Random, depth: int = 0) -> bytes:
    """An atom, quoted string, literal ({n} or {n+}), NIL or (up to 3 deep) a list."""
    value = word(rng)
    kind = rng.randrange(5 if depth < 3 else 4)
    if kind == 0:
        return value or b"x"
    if kind == 1:
        return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    if kind == 2:
        return b"{%d%s}\r\n" % (len(value), rng.choice((b"", b"+"))) + value
    if kind == 3:
        return rng.choice((b"NIL", b"nil"))
    return b"(" + b" ".join(imap_argument(rng, depth + 1) for _ in range(rng.randint(0, 3))) + b")"


def imap_command(rng: random.Random) -> bytes:
    """A command in wire form without its final CRLF, literals embedded."""
    tag = rng.choice((b"a1", b"A001", b"x.y", b"t]", b"a1", b"A001", b"a1", b"*", b"+"))
    name = rng.choice((b"LOGIN", b"AUTHENTICATE", b"ID", b"CAPABILITY", b"NOOP", b"STARTTLS", b"login"))
    return tag + b" " + name + b"".join(b" " + imap_argument(rng) for _ in range(rng.randint(0, 3)))


IMAP_RESPONSES = (b"* OK [CAPABILITY IMAP4rev1 IDLE] hi", b"a1 OK done", b"+ abc", b"+", b"* BYE x",
                  b"a1 NO [AUTHENTICATIONFAILED] no", b"* CAPABILITY IMAP4rev1 AUTH=PLAIN", b"* PREAUTH [X] y")
SMTP_ADDRESSES = (b"bob@example.org", b"", b"Postmaster", b'"a b"@x.org', b"a@[192.0.2.1]", b"a@[IPv6:::1]",
                  b"\xc3\xa9@\xc3\xa9.org", b"a.b.c@d-e.f")
SMTP_PARAMETERS = (b"SIZE=100", b"BODY=8BITMIME", b"SMTPUTF8", b"AUTH=<>", b"AUTH=a+2Bb", b"NOTIFY=NEVER", b"X")
SMTP_REPLIES = (b"250-mta", b"250-SIZE 1000", b"250 8BITMIME", b"220 mta ESMTP", b"354 go", b"421", b"550 5.1.1 no")
SASL_MESSAGES = (b"\0bob\0secret", b"bob", b"secret", b"bob\0bob\0secret", b"\0\xff\0x", b"", b"\0\0", b"\0\x85\0p")


def sasl_response(rng: random.Random) -> bytes:
    """A client's SASL response: the base64 of a (mutated) message, or that base64 mutated."""
    message = rng.choice(SASL_MESSAGES)
    message = base64.b64encode(mutate(rng, message) if rng.random() < 0.7 else message)
    return mutate(rng, message) if rng.random() < 0.3 else message


def chunked(rng: random.Random, data: bytes) -> list[bytes]:
    """C{data} as a socket might deliver it: all at once, byte by byte (its first 256 bytes), or in random splits."""
    mode = rng.randrange(3)
    if mode == 0 or not data:
        return [data] if data else []
    if mode == 1:
        return [data[i:i + 1] for i in range(min(len(data), 256))] + ([data[256:]] if len(data) > 256 else [])
    chunks, i = [], 0
    while i < len(data):
        size = rng.randint(1, 2 ** rng.randint(0, 12))
        chunks.append(data[i:i + size])
        i += size
    return chunks


def garbage(rng: random.Random) -> bytes:
    """What no client sends: random bytes, NULs, bare line endings, a line past the limit, an HTTP request."""
    return rng.choice((
        lambda: bytes(rng.randrange(256) for _ in range(rng.randint(1, 100))),
        lambda: b"\0" * rng.randint(1, 20) + b"\r\n",
        lambda: rng.choice((b"\r", b"\n", b"\r\r\n", b"\n\r")) * rng.randint(1, 10),
        lambda: b"A" * rng.choice((8191, 8192, 8193, 12289)) + b"\r\n",
        lambda: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ))()


# -- what a reply must look like

_PRINTABLE = re.compile(rb"[\x20-\x7e]*")
_TAG = re.escape(bytes(c for c in range(0x21, 0x7F) if c not in b'(){%*"\\+'))
_IMAP_LINE = re.compile(rb"\* [A-Z].*|\+|\+ .*|[" + _TAG + rb"]+ (?:OK|NO|BAD) .*")
_POP3_LINE = re.compile(rb"\+OK(?: .*)?|-ERR .*|\+|\+ .*")
_POP3_MULTI_LINE = (b"+OK Capability list follows.", b"+OK Mechanisms follow.")
_SMTP_LINE = re.compile(rb"([2-5][0-9][0-9])(?:([ -]).*)?")


def _split_reply(out: bytes) -> tuple[list[bytes], str | None]:
    """The lines of what the gateway wrote, and what is wrong with their framing."""
    lines = out.split(b"\r\n")
    if lines.pop() != b"":
        return lines, "output does not end in CRLF"
    bad = next((line for line in lines if not _PRINTABLE.fullmatch(line)), None)
    return lines, None if bad is None else f"line {bad[:200]!r} is not printable ASCII"


def imap_reply_problem(out: bytes) -> str | None:
    """What is wrong with IMAP output: each line untagged (C{* }), a continuation (C{+}) or a tagged OK, NO or BAD."""
    lines, problem = _split_reply(out)
    bad = next((line for line in lines if not _IMAP_LINE.fullmatch(line)), None)
    return problem or (None if bad is None else f"not an IMAP response line: {bad[:200]!r}")


def pop3_reply_problem(out: bytes) -> str | None:
    """What is wrong with POP3 output: C{+OK}, C{-ERR} or C{+ } lines, and multi-line replies ended by C{.}."""
    lines, problem = _split_reply(out)
    multi = False
    for line in lines:
        if multi:
            multi = line != b"."
        elif not _POP3_LINE.fullmatch(line):
            return problem or f"not a POP3 reply line: {line[:200]!r}"
        else:
            multi = line in _POP3_MULTI_LINE
    return problem or ("a multi-line reply lacks its final '.'" if multi else None)


def smtp_reply_problem(out: bytes) -> str | None:
    """What is wrong with SMTP output: whole replies of 3-digit-code lines, each continuation of the same code."""
    lines, problem = _split_reply(out)
    code = None  # the code the next line must continue
    for line in lines:
        match = _SMTP_LINE.fullmatch(line)
        if match is None or (code is not None and match[1] != code):
            return problem or f"not a line of the reply under way: {line[:200]!r}"
        code = match[1] if match[2] == b"-" else None
    return problem or (None if code is None else f"reply {code!r} ends on a continuation line")


# -- the parsers

class ParserFuzzTests(SynchronousTestCase):
    """Mutated commands, responses, paths and SASL messages raise only the parsers' declared errors."""

    def call(self, errors: tuple[type[Exception], ...], parse: Callable[..., object], *args: object) -> object:
        """C{parse(*args)}, or None if it raised one of C{errors}; any other exception fails the test."""
        try:
            return parse(*args)
        except errors:
            return None
        except Exception as e:
            self.fail(f"{parse.__qualname__}(*{args!r}) raised {e!r} (SEED {SEED}):\n{traceback.format_exc()}")

    def test_imap_syntax(self) -> None:
        """parse_command, literal_at_end and parse_response_line raise only ParseError; split_tag never raises."""
        rng = random.Random(SEED)
        for _ in range(PARSER_INPUTS):
            command = mutate(rng, imap_command(rng)) if rng.random() < 0.8 else imap_command(rng)
            self.call((imap_syntax.ParseError,), imap_syntax.parse_command, command)
            self.call((), imap_syntax.split_tag, command)
            for line in command.split(b"\r\n"):  # as the front end calls it, on each line
                self.call((imap_syntax.ParseError,), imap_syntax.literal_at_end, line)
            response = mutate(rng, rng.choice(IMAP_RESPONSES))
            self.call((imap_syntax.ParseError,), imap_syntax.parse_response_line, response)

    def test_login_command_round_trip(self) -> None:
        """login_command's output, read back by parse_command, gives the same user and password."""
        rng = random.Random(SEED)
        alphabets = (b"abc019", b'ab "\\%*(){}]', bytes(range(1, 256)), bytes(range(256)))
        for _ in range(PARSER_INPUTS):
            user, password = (bytes(rng.choice(rng.choice(alphabets)) for _ in range(rng.randint(0, 12)))
                              for _ in range(2))
            literal_plus = rng.random() < 0.5
            chunks = self.call((ValueError,), imap_syntax.login_command, b"t1", user, password, literal_plus)
            if b"\0" in user + password:
                self.assertIsNone(chunks, f"login_command accepted a NUL: {user!r} {password!r}")
                continue
            assert isinstance(chunks, list)
            command = self.call((), imap_syntax.parse_command, b"".join(chunks)[:-2])
            assert isinstance(command, imap_syntax.Command)
            self.assertEqual((command.tag, command.name, command.args), (b"t1", b"LOGIN", (user, password)),
                             f"round trip of {user!r} {password!r} (LITERAL+ {literal_plus}): {chunks!r}")

    def test_smtp_syntax(self) -> None:
        """parse_path and ReplyReader raise only SmtpSyntaxError; a parsed path encodes to one that parses the same."""
        rng = random.Random(SEED)
        for _ in range(PARSER_INPUTS):
            keyword = rng.choice((b"FROM", b"TO"))
            argument = keyword + rng.choice((b":", b": ")) + b"<" + rng.choice(SMTP_ADDRESSES) + b">" + b"".join(
                b" " + rng.choice(SMTP_PARAMETERS) for _ in range(rng.randint(0, 3)))
            argument = mutate(rng, argument) if rng.random() < 0.8 else argument
            path = self.call((smtp_syntax.SmtpSyntaxError,), smtp_syntax.parse_path, argument, keyword)
            if isinstance(path, smtp_syntax.PathCommand):
                # What the MTA is sent must read as what the gateway checked.
                self.assertEqual(self.call((), smtp_syntax.parse_path, path.encode(keyword), keyword), path, argument)
            self.call((), smtp_syntax.split_command, argument)
            reader = smtp_syntax.ReplyReader()
            for line in rng.sample(SMTP_REPLIES, 3):
                reply = self.call((smtp_syntax.SmtpSyntaxError,), reader.feed, mutate(rng, line))
                if isinstance(reply, smtp_syntax.Reply):
                    self.call((), smtp_syntax.ehlo_keywords, reply)
                    self.call((), reply.encode)
            self.call((), smtp_syntax.xtext, mutate(rng, b"a+b=c"))

    def test_sasl(self) -> None:
        """PLAIN and LOGIN exchanges raise only SaslError, SaslCancelled or SaslRefused, and yield only well-formed credentials."""
        rng = random.Random(SEED)
        for _ in range(PARSER_INPUTS):
            exchange = self.call((sasl.SaslError,), sasl.begin, rng.choice((b"PLAIN", b"login", mutate(rng, b"LOGIN"))))
            if not isinstance(exchange, sasl.SaslExchange):
                continue
            errors = (sasl.SaslError, sasl.SaslCancelled, sasl.SaslRefused)
            sent = [rng.choice((None, b"=", sasl_response(rng)))]
            result = self.call(errors, exchange.start, sent[0])
            for _ in range(2):
                if isinstance(result, sasl.Challenge):
                    sent.append(rng.choice((b"=", b"*", sasl_response(rng))))
                    result = self.call(errors, exchange.respond, sent[-1])
            if isinstance(result, sasl.Credentials):
                well_formed = (b"\0" not in result.password
                               and not any(unicodedata.category(c) == "Cc" for c in result.user))
                self.assertTrue(well_formed, f"{exchange.mechanism!r} exchange {sent!r} gave {result!r}")
            text = mutate(rng, base64.b64encode(rng.randbytes(rng.randint(0, 40))))
            decoded = self.call((sasl.SaslError,), sasl.decode_response, text)
            if isinstance(decoded, bytes) and text != b"=":
                self.assertEqual(base64.b64encode(decoded), text, "decode_response accepted non-canonical base64")


# -- the front ends

class Transcribed(SynchronousTestCase):
    """
    Runs of one fuzz test, each named (with its seed) and transcribed: a step that raises, or
    after which a failure or an error was logged, fails the test with the run's name and what
    happened in it.
    """

    logged: EventLoggingObserver | None = None
    merged = "client sends"  # a run of these steps shows as one transcript line

    def observe(self, about: str) -> None:
        """Begin a run named C{about}: a fresh transcript, and only what is logged from now on counts."""
        if self.logged is None:
            self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.about, self.seen = about, len(self.logged)
        self.transcript: list[tuple[str, bytes]] = []

    def fail_session(self, problem: str) -> None:
        """Fail with the run's name and seed, and what happened in it (a run of reads as one line)."""
        runs: list[tuple[str, bytes, int]] = []
        for what, data in self.transcript:
            if runs and what == runs[-1][0] == self.merged:
                runs[-1] = (what, runs[-1][1] + data, runs[-1][2] + 1)
            else:
                runs.append((what, data, 1))
        lines = [f"  {what} {data!r}" + (f" in {reads} reads" if reads > 1 else "") if data else f"  {what}"
                 for what, data, reads in runs]
        self.fail(f"{self.about}: {problem}\ntranscript:\n" + "\n".join(lines)[-8000:])

    def step(self, what: str, action: Callable[[], object], data: bytes = b"") -> None:
        """Run C{action}: it must not raise, nor log a failure or an error."""
        self.transcript.append((what, data))
        try:
            action()
        except Exception:
            self.fail_session(f"{what} raised:\n" + traceback.format_exc())
        assert self.logged is not None
        for event in self.logged[self.seen:]:
            if "log_failure" in event or event.get("log_level") in (LogLevel.error, LogLevel.critical):
                failure = event.get("log_failure")
                self.fail_session(f"logged: {formatEvent(event)}\n" + (failure.getTraceback() if failure else ""))
        self.seen = len(self.logged)


class FuzzBase(Transcribed, FrontEndTestBase):
    """
    Drives one fresh harness (clock, authenticator, backend, connection) after another, checking
    after every step that nothing raised, nothing was logged as a failure or error, and what the
    client got is well-formed.
    """

    reply_problem: Callable[[bytes], str | None]

    def begin(self, implicit_tls: bool, about: str) -> None:
        """A new harness and connection; C{about} names the session (with its seed) in failures."""
        self.implicit_tls = implicit_tls
        self.setUp()
        self.observe(about)
        self.mtas: dict[int, ScriptedMta] = {}
        problem = self.reply_problem(self.greeting)
        if problem:
            self.fail_session(f"greeting: {problem}")

    def step(self, what: str, action: Callable[[], object], data: bytes = b"", relayed: bytes | None = None) -> None:
        """Run C{action}, then check it: C{relayed}, if given, is exactly what the client must receive."""
        super().step(what, action, data)
        out = self.read()
        if relayed is not None and out != relayed:
            self.fail_session(f"relayed {relayed!r}, client got {out!r}")
        problem = None if relayed is not None else self.reply_problem(out)
        if problem:
            self.fail_session(f"{problem}; output: {out[-1000:]!r}")

    def drive(self, rng: random.Random, chunks: list[bytes], deliver: Callable[[bytes], None]) -> None:
        """Deliver C{chunks} as a socket would (nothing while paused, nothing once closed), with events between."""
        pending = deque(chunks)
        for _ in range(3 * len(chunks) + 20):
            if not pending or self.transport.disconnecting:
                return
            if self.transport.producerState == "paused":
                self.happen(rng)  # what the session waits for: a hash, the backend, the clock
                continue
            chunk = pending.popleft()
            relay = self.relay()
            if relay is not None:
                relay.clear()
            self.step("client sends", lambda: deliver(chunk), chunk)
            if relay is not None and relay.value() != chunk:
                self.fail_session(f"the backend got {relay.value()!r}, not what the client sent")
            if rng.random() < 0.3:
                self.happen(rng)

    def happen(self, rng: random.Random) -> None:
        """One thing that is not the client: hashes finish, a backend login answers, time passes, backends act."""
        roll = rng.random()
        if roll < 0.15 and self.auth.hold:
            self.step("held password checks finish", self.auth.finish)
        elif roll < 0.3 and self.backend.held:
            held, request = self.backend.held.pop(0), self.backend.requests[-1]
            if not held.called:
                if rng.random() < 0.8:
                    self.step("held backend login succeeds", lambda: held.callback(self.backend.session(request)))
                else:
                    self.step("held backend login fails", lambda: held.errback(BackendUnavailable("down")))
        elif roll < 0.36:
            # Rarely past an idle timeout (the harness's 60 s before login, 300 s in a submission session): that ends it.
            seconds = rng.choice((0.5, 1.0, 2.0, 5.0)) if rng.random() < 0.9 else rng.choice((30.0, 61.0, 301.0))
            self.step(f"{seconds} s pass", lambda: self.clock.advance(seconds))
        else:
            for session in list(self.backend.sessions):
                self.backend_acts(rng, session)

    def relay(self) -> StringTransport | None:
        """The transport of the backend the client is relayed to, while both sides are open."""
        relayed = (s.transport for s in self.backend.sessions if s.result is None and not s.lost
                   and isinstance(s.transport, StringTransport) and not s.transport.disconnecting)
        return None if self.transport.disconnecting else next(relayed, None)

    def backend_acts(self, rng: random.Random, session: BackendLogin) -> None:
        """A backend session goes (if the gateway closed it, or at random), answers (an MTA) or sends (relayed)."""
        assert session.transport is not None
        if session.lost:
            return
        if session.transport.disconnecting or rng.random() < 0.02:
            self.step("backend connection lost", lambda: session.connectionLost(Failure(ConnectionDone())))
        elif isinstance(session, SmtpBackend):
            replies = self.mtas.setdefault(id(session), ScriptedMta(session)).answer(rng)
            if replies:
                self.step("MTA replies", lambda: session.dataReceived(replies), replies)
        elif session.transport is self.relay():
            payload = rng.randbytes(rng.randint(1, 50))
            self.step("backend sends", lambda: session.dataReceived(payload), payload, relayed=payload)

    def settle(self, lose: Callable[[Failure], None]) -> None:
        """Past every timeout the connection is closed and no timer is left; then it is lost, as a transport says."""
        for _ in range(20):
            calls = self.clock.getDelayedCalls()
            if not calls:
                break
            until = max(call.getTime() for call in calls)
            self.step(f"clock advances to {until}", lambda: self.clock.advance(until - self.clock.seconds()))
        if not self.transport.disconnecting:
            self.fail_session("still open after every timeout")
        if self.clock.getDelayedCalls():
            self.fail_session(f"timers left after every timeout: {self.clock.getDelayedCalls()}")
        self.step("connection lost", lambda: lose(Failure(ConnectionDone())))
        self.step("harness tearDown (backend connections lost, no timer left)", self.tearDown)


class ScriptedMta:
    """An MTA behind a submission session: 354 to DATA and a reply at the end of the message, else mostly 250."""

    COMMAND_REPLIES = (b"250 2.0.0 ok\r\n",) * 16 + (b"550 5.1.1 no\r\n", b"421 4.3.2 bye\r\n",
                                                  b"250-mta\r\n250 ok\r\n")
    DATA_REPLIES = (b"354 go ahead\r\n",) * 9 + (b"451 4.3.0 not now\r\n",)
    FINAL_REPLIES = (b"250 2.0.0 queued\r\n",) * 8 + (b"554 5.7.1 no\r\n", b"421 4.3.2 bye\r\n")

    def __init__(self, session: SmtpBackend) -> None:
        self.session = session
        self.unread = b""
        self.in_data = False

    def answer(self, rng: random.Random) -> bytes:
        """The replies to all the complete commands and messages the gateway has sent since last time."""
        transport = self.session.transport
        written = transport.value()  # type: ignore[union-attr]
        transport.clear()  # type: ignore[union-attr]
        return self.replies_to(rng, written)

    def replies_to(self, rng: random.Random, written: bytes) -> bytes:
        """The replies to the complete commands and messages in what was written so far, C{written} the latest."""
        self.unread += written
        replies: list[bytes] = []
        while True:
            if self.in_data:
                end = (b"\r\n" + self.unread).find(b"\r\n.\r\n")
                if end < 0:
                    return b"".join(replies)
                self.unread, self.in_data = self.unread[end + 3:], False
                replies.append(rng.choice(self.FINAL_REPLIES))
                continue
            line, crlf, self.unread = self.unread.partition(b"\r\n")
            if not crlf:
                self.unread = line
                return b"".join(replies)
            if line.upper() == b"DATA":
                replies.append(rng.choice(self.DATA_REPLIES))
                self.in_data = replies[-1].startswith(b"354")
            else:
                replies.append(rng.choice(self.COMMAND_REPLIES))


STATES = ("clear", "starttls", "tls", "sasl", "holding", "relayed")
"""Where a session's random stream starts: before TLS, after STARTTLS, on implicit TLS, mid-SASL, during a
held login (the memory authenticator holds it), and logged in (relayed, or for submission an MTA session)."""

BACKEND_ERRORS = (lambda: BackendUnavailable("down"), lambda: BackendRejected("no"),
                  lambda: BackendRefused(b"[IN-USE] busy"))


class SessionFuzz(FuzzBase):
    """Random sessions of one protocol: valid commands, mutations and garbage, in random chunks, through L{STATES}."""

    commands: tuple[bytes, ...]
    preludes: dict[str, tuple[bytes, ...]]  # per state but clear and tls: what brings the session there

    def run_sessions(self, count: int) -> None:
        """C{count} sessions, each from its own seed: a state, a backend that may hold or fail, a random stream."""
        for n in range(count):
            seed = f"{type(self).__name__}/{SEED}/{n}"
            rng = random.Random(seed)
            state = rng.choice(STATES)
            self.begin(state not in ("clear", "starttls"), f"session random.Random({seed!r}) in state {state}")
            self.auth.hold = state == "holding"
            self.backend.hold = rng.random() < 0.15
            if rng.random() < 0.1:
                self.backend.error = rng.choice(BACKEND_ERRORS)()
            prelude = rng.choice(self.preludes.get(state, (b"",)))
            stream = b"".join(self.part(rng) for _ in range(rng.randint(1, 20)))
            self.drive(rng, chunked(rng, prelude) + chunked(rng, stream), self.front.dataReceived)
            self.settle(self.front.connectionLost)

    def part(self, rng: random.Random) -> bytes:
        """A valid command (65%), a mutated one (25%) or garbage."""
        roll = rng.random()
        if roll < 0.65:
            return rng.choice(self.commands)
        return mutate(rng, rng.choice(self.commands)) if roll < 0.9 else garbage(rng)


PLAIN_ALICE = b64(b"\0alice\0" + PASSWORD)
IMAP_LOGINS = (b"p1 LOGIN bob secret\r\n", b"p1 AUTHENTICATE PLAIN " + PLAIN_ALICE + b"\r\n",
               b"p1 LOGIN {5}\r\nalice {11}\r\n" + PASSWORD + b"\r\n", b"p1 LOGIN {3+}\r\nbob {6+}\r\nsecret\r\n")


class ImapSessionFuzzTests(SessionFuzz, ImapTestBase):
    reply_problem = staticmethod(imap_reply_problem)
    commands = (
        b"a1 CAPABILITY\r\n", b"a2 NOOP\r\n", b"a2 NOOP x\r\n", b"a3 LOGOUT\r\n", b"a4 STARTTLS\r\n",
        b"a4 STARTTLS x\r\n", b"a5 ID NIL\r\n", b'a6 ID ("name" "x" "version" "1")\r\n',
        b'a7 LOGIN alice "p4ss \\"w rd\\\\"\r\n', b"a8 LOGIN bob wrong\r\n", *IMAP_LOGINS,
        b"a9 LOGIN ~{3}\r\nbob x\r\n", b"b1 AUTHENTICATE PLAIN\r\n" + PLAIN_ALICE + b"\r\n",
        b"b2 AUTHENTICATE PLAIN\r\n", b"*\r\n", b"=\r\n", b64(b"bob") + b"\r\n", b64(b"secret") + b"\r\n",
        b"b3 AUTHENTICATE LOGIN\r\n" + b64(b"bob") + b"\r\n" + b64(b"secret") + b"\r\n", b"b4 AUTHENTICATE X\r\n",
        b"b5 AUTHENTICATE PLAIN {%d+}\r\n" % len(PLAIN_ALICE) + PLAIN_ALICE + b"\r\n", b"b6 LOGIN {8193+}\r\n",
        b"b7 LOGIN {100}\r\n", b"b8 X {4294967295+}\r\n", b"b9 SELECT INBOX\r\n", b"c1 LOGIN " + b"(" * 12 + b"\r\n",
        b"c2 LOGIN {0}\r\n {0}\r\n\r\n", b"c3 NOOP {5+}\r\nabcde\r\n", b"c4 LOGIN alice\r\n",
    )
    preludes = {"starttls": (b"s1 STARTTLS\r\n",), "sasl": (b"s1 AUTHENTICATE PLAIN\r\n", b"s1 AUTHENTICATE LOGIN\r\n"),
                "holding": (*IMAP_LOGINS, b"p1 LOGIN bob wrong\r\n"), "relayed": IMAP_LOGINS}

    def test_random_sessions(self) -> None:
        """IMAP: random sessions in every state answer only well-formed responses, and close after their timeouts."""
        self.run_sessions(SESSIONS)


POP3_LOGINS = (b"USER bob\r\nPASS secret\r\n", b"AUTH PLAIN " + b64(b"\0bob\0secret") + b"\r\n",
               b"AUTH LOGIN\r\n" + b64(b"bob") + b"\r\n" + b64(b"secret") + b"\r\n",
               b"USER alice\r\nPASS " + PASSWORD + b"\r\n")


class Pop3SessionFuzzTests(SessionFuzz, Pop3TestBase):
    reply_problem = staticmethod(pop3_reply_problem)
    commands = (
        b"CAPA\r\n", b"CAPA x\r\n", b"capa\r\n", b"STLS\r\n", b"STLS x\r\n", b"USER alice\r\n",
        b"PASS " + PASSWORD + b"\r\n", b"USER bob\r\n", b"PASS secret\r\n", b"PASS wrong\r\n", *POP3_LOGINS,
        b"AUTH\r\n", b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n", b64(b"bob") + b"\r\n", b64(b"secret") + b"\r\n", b"*\r\n",
        b"=\r\n", b"AUTH PLAIN =\r\n", b"AUTH X\r\n", b"NOOP\r\n", b"NOOP 1\r\n", b"QUIT\r\n", b"STAT\r\n",
        b"RETR 1\r\n", b"TOP 1 1\r\n", b"USER \xff\xfe\r\n", b"USER a\0b\r\n",
    )
    preludes = {"starttls": (b"STLS\r\n",), "sasl": (b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n"),
                "holding": (*POP3_LOGINS, b"USER bob\r\nPASS wrong\r\n"), "relayed": POP3_LOGINS}

    def test_random_sessions(self) -> None:
        """POP3: random sessions in every state answer only well-formed replies, and close after their timeouts."""
        self.run_sessions(SESSIONS)


AUTH_BAD = b"AUTH PLAIN " + b64(b"\0bob@example.org\0bad") + b"\r\n"
MAIL_TRANSACTION = b"MAIL FROM:<bob@example.org>\r\nRCPT TO:<a@example.org>\r\nDATA\r\n"
MESSAGE = b"Subject: x\r\n\r\nhi\r\n.\r\n"


class SubmissionSessionFuzzTests(SessionFuzz, SubmissionTestBase):
    reply_problem = staticmethod(smtp_reply_problem)
    commands = (
        b"EHLO client.example.org\r\n", b"HELO x\r\n", b"EHLO\r\n", b"STARTTLS\r\n", b"STARTTLS x\r\n", AUTH_BOB,
        AUTH_BAD, b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n", b64(b"bob@example.org") + b"\r\n", b64(b"secret") + b"\r\n",
        b"*\r\n", b"MAIL FROM:<bob@example.org>\r\n", b"MAIL FROM:<bob@example.org> SIZE=100 BODY=8BITMIME\r\n",
        b"MAIL FROM:<bob@example.org> SIZE=99999999999999999999999\r\n", b"MAIL FROM:<>\r\n",
        b"MAIL FROM:<bob@example.org> AUTH=<> SMTPUTF8\r\n", b"MAIL FROM:<other@example.org>\r\n",
        b"MAIL FROM:<" + b"a" * 600 + b"@x.org>\r\n", b"RCPT TO:<a@example.org>\r\n", b"RCPT TO:<Postmaster>\r\n",
        b"RCPT TO:<a@b.c> NOTIFY=NEVER\r\n", b"DATA\r\n", b"DATA x\r\n", b"Subject: x\r\n\r\nhello\r\n.\r\n",
        b"..dot\r\n", b".\r\n", b"bare\nlf\r\n.\r\n", b"x" * 900 + b"\r\n.\r\n",
        MAIL_TRANSACTION, MAIL_TRANSACTION + MESSAGE, b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n", b"VRFY x\r\n",
        b"BDAT 5 LAST\r\n",
    )
    preludes = {"starttls": (b"EHLO x\r\nSTARTTLS\r\n",),
                "sasl": (b"EHLO x\r\nAUTH LOGIN\r\n", b"EHLO x\r\nAUTH PLAIN\r\n"),
                "holding": (b"EHLO x\r\n" + AUTH_BOB, b"EHLO x\r\n" + AUTH_BAD),
                "relayed": (b"EHLO x\r\n" + AUTH_BOB, b"EHLO x\r\n" + AUTH_BOB + MAIL_TRANSACTION,
                            b"EHLO x\r\n" + AUTH_BOB + MAIL_TRANSACTION + MESSAGE)}

    def test_random_sessions(self) -> None:
        """Submission: random sessions in every state, over a scripted MTA, answer well-formed replies and close."""
        self.run_sessions(SESSIONS)


# -- the PROXY header

BALANCER = IPv4Address("TCP", "127.0.0.2", 40000)
LISTENER = IPv4Address("TCP", "127.0.0.1", 143)
PROXY_TOKENS = (b"\r\n", b" ", b"PROXY ", b"UNKNOWN", V2Parser.PREFIX[:5], V2Parser.PREFIX, b"\xff", b"\0")


def proxy_v1(rng: random.Random) -> bytes:
    """A v1 header for TCP4, TCP6 or UNKNOWN, one field of it odd a third of the time."""
    family = rng.choice((b"TCP4", b"TCP6", b"UNKNOWN"))

    def address() -> bytes:
        if family == b"TCP6":
            return rng.choice((b"::1", b"2001:db8::1", b"::ffff:192.0.2.4"))
        return b"192.0.2.%d" % rng.randrange(256)

    fields = [b"PROXY", family, address(), address(), b"%d" % rng.randrange(65536), b"143"]
    if rng.random() < 0.3:
        fields[rng.randrange(1, 6)] = rng.choice((b"TCP5", b"fe80::1%eth0", b"1.2.3.400", b"65536", b"-1", b"+5",
                                                   b"05", b"5_5", b"x", b""))
    return b" ".join(fields) + rng.choice((b"\r\n",) * 8 + (b"\n", b""))


def proxy_v2(rng: random.Random) -> bytes:
    """A v2 header: PROXY or LOCAL over TCP4, TCP6 or UNIX, its version, family or addresses odd now and then."""
    version, family = rng.choice(((0x21, 0x11), (0x21, 0x21), (0x21, 0x31), (0x20, 0x00)))
    if rng.random() < 0.3:
        version, family = rng.choice((version, 0x22, 0x11)), rng.choice((family, 0x12, 0x22, 0x13, 0x41))
    block = {0x1: lambda: socket.inet_aton("192.0.2.%d" % rng.randrange(256)) * 2 + struct.pack("!HH", 5555, 143),
             0x2: lambda: rng.randbytes(32) + struct.pack("!HH", 5555, 143),
             0x3: lambda: b"/tmp/s".ljust(108, b"\0") * 2}.get(family >> 4, bytes)()
    block = block[:rng.randint(0, len(block))] if rng.random() < 0.1 else block
    size = len(block) if rng.random() < 0.9 else rng.randrange(65536)
    return V2Parser.PREFIX + bytes((version, family)) + struct.pack("!H", size) + block


def is_ip(host: str) -> bool:
    """Whether C{host} is an IPv4 or IPv6 address, as limits, logs and XCLIENT need."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class ProxyHeaderFuzzTests(FuzzBase, ImapTestBase):
    reply_problem = staticmethod(imap_reply_problem)

    def test_mutated_headers(self) -> None:
        """
        PROXY v1 and v2 headers, mutated, whole or split, before an IMAP front end: nothing raises
        or is logged as a failure; by the header timeout the connection is served (the front end
        greeted, with an IP address for its client) or closed, and it closes after every timeout.
        """
        for n in range(PROXIED_CONNECTIONS):
            seed = f"{type(self).__name__}/{SEED}/{n}"
            rng = random.Random(seed)
            self.begin(True, f"proxied connection random.Random({seed!r})")
            self.front.connectionLost(Failure(ConnectionDone()))  # the harness's own: this one comes through the proxy
            factory = TrustedProxyFactory(FrontEndFactory(self.front_end, self.context),
                                          (ipaddress.ip_network("127.0.0.2/32"),), self.clock)
            proxy = factory.buildProtocol(BALANCER)
            assert proxy is not None
            self.transport = TLSStringTransport(peerAddress=BALANCER, hostAddress=LISTENER)
            self.front = proxy.wrappedProtocol  # type: ignore[assignment]
            proxy.makeConnection(self.transport)
            header = (proxy_v1 if rng.random() < 0.5 else proxy_v2)(rng)
            header = mutate(rng, header, PROXY_TOKENS) if rng.random() < 0.3 else header
            after = rng.choice((b"", b"a NOOP\r\n", b"a LOGIN bob secret\r\nb NOOP\r\n",
                                mutate(rng, b"a CAPABILITY\r\n")))
            self.drive(rng, chunked(rng, header + after), proxy.dataReceived)
            self.step(f"{HEADER_TIMEOUT} s pass", lambda: self.clock.advance(HEADER_TIMEOUT))
            served = self.front.transport is not None
            if not (served or self.transport.disconnecting):
                self.fail_session("neither served nor closed after the header timeout")
            if served and not is_ip(self.front.client.host):
                self.fail_session(f"served a client without an IP address: {self.front.client}")
            self.settle(proxy.connectionLost)
