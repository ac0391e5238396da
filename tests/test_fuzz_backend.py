"""
Fuzz regression tests of the gateway's side of the login dialogues with a backend: a misbehaving
backend (or whoever sits between the gateway and a plaintext one) ends a login as unavailable,
rejected or refused, never with an exception, a logged failure, unbounded buffers or a login that
waits for ever. Deterministic, as L{test_fuzz}, whose mutator, chunking and transcripts it uses.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections import Counter, deque
from collections.abc import Callable

from test_fuzz import MESSAGE, SEED, ScriptedMta, Transcribed, chunked, garbage, mutate
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from gateway.backend import (
    BackendLogin,
    BackendRefused,
    BackendRejected,
    BackendUnavailable,
    ClientAddress,
    LoginRequest,
)
from gateway.imap_backend import ImapBackendLogin
from gateway.pop3_backend import Pop3BackendLogin
from gateway.relay import CLOSE_GRACE, Splice
from gateway.smtp_backend import SmtpBackend
from gateway.smtp_syntax import Reply
from gateway.testing.fakes import BACKEND_SETTINGS, TLSStringTransport

BACKEND_DIALOGUES = 500  # of each kind
BACKEND_TLS = object()  # stands for the TLS client creator: the transport only records startTLS
BACKEND_CLIENTS = (ClientAddress("192.0.2.7", 50123, "198.51.100.1", 993, "fUzZsEsSiOn1"),
                   ClientAddress("2001:db8::7", 4000, "2001:db8::1", 587, "fUzZsEsSiOn2"))
PLAINTEXT_DISALLOWED = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.\r\n"
CREDENTIAL_ALPHABETS = (b"alice", b'ab "\\%*(){}', bytes(range(0x20, 0x7F)), bytes(range(1, 256)), bytes(range(256)))


def credential(rng: random.Random) -> bytes:
    """
    A user name or password, short or long (past a POP3 command line), with quotes, backslashes,
    spaces and 8-bit bytes; now and then a NUL, CR or LF, which no login can send.
    """
    alphabet = rng.choice(CREDENTIAL_ALPHABETS)
    return bytes(rng.choice(alphabet) for _ in range(rng.choice((1, 5, 5, 12, 12, 40, 200, 300))))


def held(protocol: BackendLogin) -> int:
    """
    The bytes a dialogue holds between reads: LineReceiver's buffer, and a POP3 CAPA answer or
    a multi-line SMTP reply being collected.
    """
    collecting = getattr(protocol, "_capa", None) or getattr(getattr(protocol, "_reader", None), "_lines", ())
    return len(protocol._buffer) + sum(len(line) for line in collecting)


class ScriptedBackend:
    """
    A backend's side of a login dialogue: a greeting, a plausible answer to each command the
    gateway writes, and things it may say at any time (L{noise}), which the fuzzer sends unasked
    or early (before the gateway asked). Its random choices lean to what lets the login go on.
    """

    MAX_LENGTH = BackendLogin.MAX_LENGTH

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.unread = b""

    def greeting(self) -> bytes:
        raise NotImplementedError

    def noise(self) -> bytes:
        raise NotImplementedError

    def answers(self, written: bytes) -> list[bytes]:
        """The answers to the complete command lines in what was written so far, C{written} the latest."""
        self.unread += written
        answers: list[bytes] = []
        while b"\r\n" in self.unread:
            line, _, self.unread = self.unread.partition(b"\r\n")
            answers.append(self.answer(line))
        return answers

    def answer(self, line: bytes) -> bytes:
        raise NotImplementedError

    def pick(self, *weighted: tuple[float, bytes]) -> bytes:
        """One of C{weighted}, by weight."""
        return self.rng.choices([choice for _, choice in weighted], [weight for weight, _ in weighted])[0]

    def offers(self, *weighted: tuple[float, bytes]) -> list[bytes]:
        """Each of C{weighted} with its probability."""
        return [offer for chance, offer in weighted if self.rng.random() < chance]


class ScriptedImapBackend(ScriptedBackend):
    """A Dovecot-like IMAP server: capabilities, STARTTLS, ID, LOGIN, AUTHENTICATE PLAIN, literals both ways."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.capabilities = self.offer(tls=False)
        self.literal = 0  # bytes of a literal still to come in the command being read
        self.command = b""  # the first line of the command being read
        self.sasl_tag: bytes | None = None  # an AUTHENTICATE waiting for its response
        self.tags = 0

    def offer(self, tls: bool) -> bytes:
        return b" ".join([b"IMAP4rev1", *self.offers(
            (0.5, b"LITERAL+"), (0.5, b"SASL-IR"), (0.6, b"ID"), (0.1 if tls else 0.85, b"STARTTLS"),
            (0.85, b"AUTH=PLAIN"), (0.03 if tls else 0.1, b"LOGINDISABLED"), (0.3, b"IDLE"), (0.1, b"LITERAL-"))])

    def greeting(self) -> bytes:
        return self.pick((5, b"* OK [CAPABILITY %s] Dovecot ready.\r\n" % self.capabilities),
                         (4, b"* OK Dovecot ready.\r\n"), (0.3, b"* PREAUTH [CAPABILITY IMAP4rev1] ready\r\n"),
                         (0.3, b"* BYE Too many connections\r\n"), (0.2, b"* NO not now\r\n"))

    def noise(self) -> bytes:
        return self.pick(
            (1, b"* 1 EXISTS\r\n"), (1, b"* OK [ALERT] maintenance at 5\r\n"), (1, b"* BYE shutting down\r\n"),
            (1, b"* CAPABILITY %s\r\n" % self.offer(tls=False)), (1, b'* ID ("name" {7}\r\nDovecot)\r\n'),
            (1, b"* X {3}\r\nabc {0}\r\n\r\n"), (1, b"* X {99999999999}\r\n"), (1, b"+ Ready for literal data\r\n"),
            (1, b"+\r\n"),
            (2, b"gw%d OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] done\r\n" % (self.tags + 1)),
            (1, b"gw%d NO [AUTHENTICATIONFAILED] no\r\n" % (self.tags + 1)), (0.5, b"gw%d OK x\r\n" % self.tags))

    def answers(self, written: bytes) -> list[bytes]:
        self.unread += written
        answers: list[bytes] = []
        while True:
            if self.literal:
                taken = min(self.literal, len(self.unread))
                self.unread, self.literal = self.unread[taken:], self.literal - taken
                if self.literal:
                    return answers
            line, crlf, rest = self.unread.partition(b"\r\n")
            if not crlf:
                return answers
            self.unread = rest
            if self.sasl_tag is not None:  # the SASL response
                answers.append(self.verdict(self.sasl_tag))
                self.sasl_tag = None
                continue
            self.command = self.command or line
            tag = self.command.partition(b" ")[0]
            marker = re.search(rb"\{([0-9]+)(\+?)\}\Z", line)
            if marker:
                self.literal = int(marker[1])
                if not marker[2]:
                    answers.append(self.pick((9, b"+ Ready for literal data\r\n"), (1, b"%s NO too big\r\n" % tag)))
                continue
            command, self.command = self.command, b""
            self.tags += 1
            answers.append(self.answer(command))

    def answer(self, line: bytes) -> bytes:
        tag, _, rest = line.partition(b" ")
        words = rest.split(b" ")
        name = words[0].upper()
        if name == b"CAPABILITY":
            return self.pick((9, b"* CAPABILITY %s\r\n%s OK Capability completed.\r\n" % (self.capabilities, tag)),
                             (0.3, b"%s OK done\r\n" % tag), (0.3, b"%s NO no\r\n" % tag))
        if name == b"STARTTLS":
            self.capabilities = self.offer(tls=True)
            return self.pick((9, b"%s OK Begin TLS negotiation now.\r\n" % tag), (1, b"%s BAD no TLS\r\n" % tag))
        if name == b"ID":
            done = b"%s OK ID completed.\r\n" % tag
            return self.pick((3, b'* ID ("name" "Dovecot")\r\n' + done), (1, b"* ID NIL\r\n" + done),
                             (2, b'* ID ("name" {7}\r\nDovecot "os" {3+}\r\nn\xc3\xa9)\r\n' + done),
                             (1, b"%s BAD unknown\r\n" % tag))
        if name == b"AUTHENTICATE" and len(words) == 2:
            self.sasl_tag = tag
            return self.pick((5, b"+ \r\n"), (1, b"+\r\n"), (1, b"+ AAAA\r\n"), (0.5, b"%s NO no PLAIN\r\n" % tag))
        if name in (b"LOGIN", b"AUTHENTICATE"):
            return self.verdict(tag)
        return b"%s BAD Error in IMAP command\r\n" % tag

    def verdict(self, tag: bytes) -> bytes:
        """The answer to the credentials."""
        return self.pick(
            (5, b"%s OK [CAPABILITY IMAP4rev1 IDLE %s] Logged in\r\n" % (tag, self.capabilities)),
            (2, b"%s OK Logged in\r\n" % tag), (0.3, b"%s OK [CAPABILITY IMAP4rev1  X] in\r\n" % tag),
            (1, b"* CAPABILITY IMAP4rev1 X\r\n%s OK Logged in\r\n" % tag),
            (1, b"%s NO [AUTHENTICATIONFAILED] Authentication failed.\r\n" % tag),
            (0.5, b"%s NO [UNAVAILABLE] Temporary failure\r\n" % tag), (0.3, b"%s NO [EXPIRED] old\r\n" % tag),
            (0.3, b"%s NO [AUTHORIZATIONFAILED] no\r\n" % tag), (0.3, b"%s NO no code\r\n" % tag),
            (0.3, b"%s BAD what\r\n" % tag), (0.3, b"* BYE going\r\n"))


class ScriptedPop3Backend(ScriptedBackend):
    """A Dovecot-like POP3 server: CAPA, STLS, XCLIENT, USER and PASS, AUTH PLAIN with or without initial response."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.tls = False
        self.sasl = False  # an AUTH PLAIN waiting for its response

    def greeting(self) -> bytes:
        return self.pick((8, b"+OK Dovecot ready.\r\n"), (2, b"+OK [XCLIENT] Dovecot ready.\r\n"),
                         (1, b"+OK <1896.697170952@dbc.mtview.ca.us>\r\n"), (0.5, b"-ERR [SYS/TEMP] Too many\r\n"))

    def capa(self) -> bytes:
        lines = [b"CAPA", b"TOP", b"UIDL", b"RESP-CODES", *self.offers(
            (0.85, b"USER"), (0.8, b"SASL PLAIN LOGIN"), (0.1, b"SASL"), (0.1 if self.tls else 0.85, b"STLS"),
            (0.4, b"XCLIENT"), (0.2, b"..X-DOT"), (0.2, b"PIPELINING"), (0.2, b"AUTH-RESP-CODE"))]
        lines = self.pick((20, lines), (0.3, [b"X"] * 70), (0.3, [b"USER", b"X" * 1001]))  # type: ignore[arg-type]
        return b"+OK\r\n" + b"".join(line + b"\r\n" for line in lines) + b".\r\n"

    def noise(self) -> bytes:
        return self.pick((3, b"+OK\r\n"), (1, b"-ERR x\r\n"), (1, b"+ \r\n"), (1, b".\r\n"), (1, b"USER\r\n"),
                         (1, self.capa()), (1, b"-ERR [IN-USE] locked\r\n"))

    def answer(self, line: bytes) -> bytes:
        if self.sasl:
            self.sasl = False
            return self.verdict()
        words = line.split(b" ")
        name = words[0].upper()
        if name == b"CAPA":
            return self.pick((9, self.capa()), (1, b"-ERR Unknown command\r\n"))
        if name == b"STLS":
            self.tls = True
            return self.pick((9, b"+OK Begin TLS negotiation now.\r\n"), (1, b"-ERR no\r\n"))
        if name == b"XCLIENT":
            return self.pick((3, b"+OK\r\n"), (1, b"-ERR [XCLIENT] no\r\n"))
        if name == b"USER":
            return self.pick((9, b"+OK\r\n"), (1, PLAINTEXT_DISALLOWED), (1, b"-ERR no\r\n"))
        if name == b"AUTH" and len(words) == 2:
            self.sasl = True
            return self.pick((9, b"+ \r\n"), (1, b"+\r\n"), (0.5, b"-ERR no\r\n"))
        if name in (b"PASS", b"AUTH"):
            return self.verdict()
        if name == b"QUIT":
            return b"+OK Logging out.\r\n"
        return b"-ERR Unknown command.\r\n"

    def verdict(self) -> bytes:
        """The answer to the credentials."""
        return self.pick((8, b"+OK Logged in.\r\n"), (2, b"-ERR [AUTH] Authentication failed.\r\n"),
                         (1, b"-ERR [IN-USE] Mailbox locked\r\n"), (1, b"-ERR [LOGIN-DELAY] Wait\r\n"),
                         (1, b"-ERR [SYS/TEMP] x\r\n"), (1, b"-ERR no\r\n"),
                         (0.5, PLAINTEXT_DISALLOWED), (0.3, b"-ERR [in-use] \x1b\xff\r\n"))


class ScriptedSubmissionBackend(ScriptedBackend):
    """A Postfix-like MTA before login: EHLO, STARTTLS, XCLIENT, AUTH PLAIN, QUIT."""

    MAX_LENGTH = SmtpBackend.MAX_LENGTH

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.tls = False

    def greeting(self) -> bytes:
        return self.pick((8, b"220 mx.example.org ESMTP Postfix\r\n"), (1, b"220-mx.example.org\r\n220 welcome\r\n"),
                         (0.3, b"554 5.3.2 No service\r\n"), (0.3, b"421-4.3.2 Service\r\n421 shutting down\r\n"))

    def ehlo(self) -> bytes:
        extensions = self.offers(
            (0.5, b"PIPELINING"), (0.5, b"SIZE 10240000"), (0.1 if self.tls else 0.85, b"STARTTLS"),
            (0.8, b"AUTH PLAIN LOGIN"), (0.1, b"auth login plain"), (0.1, b"AUTH LOGIN"),
            (0.5, b"XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN"), (0.5, b"8BITMIME"), (0.3, b"SMTPUTF8"))
        extensions = self.pick((30, extensions), (1, [b"X"] * 120), (1, [b"Y" * 4000] * 3))  # type: ignore[arg-type]
        return Reply(250, (b"mx.example.org", *extensions)).encode()

    def noise(self) -> bytes:
        return self.pick((3, b"250 2.0.0 Ok\r\n"), (1, b"220 mx ESMTP\r\n"), (1, b"235 2.7.0 ok\r\n"),
                         (1, b"421 4.3.2 bye\r\n"), (1, b"250-a\r\n250 b\r\n"), (1, b"334 \r\n"), (1, self.ehlo()))

    def answer(self, line: bytes) -> bytes:
        name = line.partition(b" ")[0].upper()
        if name == b"EHLO":
            return self.pick((20, self.ehlo()), (1, b"502 5.5.2 Error: command not recognized\r\n"))
        if name == b"STARTTLS":
            self.tls = True
            return self.pick((9, b"220 2.0.0 Ready to start TLS\r\n"), (1, b"454 4.7.0 TLS not available\r\n"))
        if name == b"XCLIENT":
            return self.pick((8, b"220 mx.example.org ESMTP Postfix\r\n"), (1, b"501 5.5.4 Bad ADDR syntax\r\n"),
                             (1, b"550 5.7.0 Error: insufficient authorization\r\n"))
        if name == b"AUTH":
            return self.pick((7, b"235 2.7.0 Authentication successful\r\n"),
                             (2, b"535 5.7.8 Error: authentication failed\r\n"),
                             (1, b"454 4.7.0 Temporary authentication failure\r\n"), (0.5, b"334 \r\n"))
        if name == b"QUIT":
            return b"221 2.0.0 Bye\r\n"
        return b"502 5.5.2 Error: command not recognized\r\n"


class ScriptedSession(ScriptedBackend):
    """The MTA of a logged-in submission session: L{ScriptedMta}'s replies."""

    MAX_LENGTH = SmtpBackend.MAX_LENGTH

    def __init__(self, rng: random.Random, session: SmtpBackend) -> None:
        super().__init__(rng)
        self.mta = ScriptedMta(session)

    def noise(self) -> bytes:
        return self.rng.choice((*ScriptedMta.COMMAND_REPLIES[-3:], *ScriptedMta.DATA_REPLIES[-2:], b"221 bye\r\n"))

    def answers(self, written: bytes) -> list[bytes]:
        replies = self.mta.replies_to(self.rng, written)
        return [replies] if replies else []


class CheckedSmtpBackend(SmtpBackend):
    """
    An L{SmtpBackend} that keeps what its login dialogue raised other than a backend error: its
    C{_failed} turns any exception into L{BackendUnavailable}, which would hide a bug from the fuzzer.
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.unexpected: list[Failure] = []

    def _failed(self, failure: Failure) -> None:
        if not failure.check(BackendRejected, BackendUnavailable):
            self.unexpected.append(failure)
        SmtpBackend._failed(self, failure)


SESSION_COMMANDS = (b"MAIL FROM:<alice@example.org>", b"RCPT TO:<bob@example.net>", b"RSET", b"NOOP")


class BackendDialogueFuzzTests(Transcribed):
    """
    The gateway's side of the login dialogues with a misbehaving backend (or whoever sits
    between it and a plaintext one): each dialogue, from its own seed, with random settings and
    credentials, is fed a scripted backend's answers, each now and then mutated, replaced by
    garbage, repeated, cut short, a line at the length limit, with things said unasked or early,
    in random reads, the connection lost at a random point. After every step nothing raised or
    was logged as a failure and the dialogue holds at most a line and a read; a login that failed
    failed as L{BackendUnavailable}, L{BackendRejected} or L{BackendRefused} and dropped its
    connection, one that succeeded holds still until it relays (a submission session: until the
    front end's commands, each answered or failed); once the connection is lost, the login's
    result has fired. A backend that answered everything as it should got an outcome without
    the connection having to go.
    """

    merged = "backend sends"

    def dialogue(self, kind: str, n: int) -> None:
        """One dialogue of C{kind} (imap, pop3 or submission) from seed C{n}."""
        seed = f"{type(self).__name__}/{SEED}/{kind}/{n}"
        rng = random.Random(seed)
        tls = rng.choice(("none", "starttls", "starttls", "implicit"))
        login = rng.choice(("replay", "master", "xclient") if kind == "submission" else ("replay", "master"))
        master_user = credential(rng).decode("utf-8", "surrogateescape") if login == "master" else None
        settings = dataclasses.replace(BACKEND_SETTINGS, tls=tls, login=login, forward_client_ip=rng.random() < 0.5,
                                       master_user=master_user, master_password=b"pw" if master_user else None)
        user, password = credential(rng).decode("utf-8", "surrogateescape"), credential(rng)
        self.probe = rng.random() < 0.15
        request = None if self.probe else LoginRequest(user, password, rng.choice(BACKEND_CLIENTS), master_user)
        creator = None if tls == "none" else BACKEND_TLS
        self.observe(f"{kind} dialogue random.Random({seed!r}): tls {tls}, login {login}, forward_client_ip "
                     f"{settings.forward_client_ip}" + (", a probe" if self.probe else
                                                        f", user {user!r}, password {password!r}"))
        backend: ScriptedBackend
        protocol: BackendLogin
        if kind == "imap":
            backend, protocol = ScriptedImapBackend(rng), ImapBackendLogin(request, settings, creator)  # type: ignore
        elif kind == "pop3":
            backend, protocol = ScriptedPop3Backend(rng), Pop3BackendLogin(request, settings, creator)  # type: ignore
        else:
            backend, protocol = ScriptedSubmissionBackend(rng), CheckedSmtpBackend(request, settings, creator)
        self.protocol, self.backend, self.transport = protocol, backend, TLSStringTransport()
        self.outcome: list[object] = []
        assert protocol.result is not None
        protocol.result.addBoth(self.outcome.append)
        self.noisy, self.lossy = rng.choice((0.0, 0.1, 0.3, 0.6)), rng.choice((0.0, 0.02, 0.1))
        self.misbehaved, self.logged_in, self.largest_read = False, False, 0
        self.step("connected", lambda: protocol.makeConnection(self.transport))
        self.converse(rng, [backend.greeting()])
        if not (self.outcome or self.misbehaved):
            self.fail_session("the backend answered all it was asked as it should, and the login still waits")
        if not protocol.lost and self.outcome and self.outcome[0] is protocol:
            self.logged_in = True
            if self.probe:
                self.probed(rng)
            elif isinstance(protocol, SmtpBackend):
                self.submit(rng, protocol)
            else:
                self.relay(rng)
        if not protocol.lost:
            self.lose()  # the backend goes, or the login's timeout aborts the connection
        if not self.outcome:
            self.fail_session("the login's result never fired, though the connection was lost")
        outcome = self.outcome[0]
        self.ends[type(outcome.value).__name__ if isinstance(outcome, Failure) else "logged in"] += 1

    def step(self, what: str, action: Callable[[], object], data: bytes = b"") -> None:
        """Run C{action}, then check what must hold after every step: see L{check}."""
        super().step(what, action, data)
        self.check()

    def check(self) -> None:
        """The dialogue holds at most a line and a read (and an answer it collects); its outcome is as it must be."""
        protocol, transport = self.protocol, self.transport
        limit = protocol.MAX_LENGTH + 2 + self.largest_read
        if isinstance(protocol, Pop3BackendLogin):
            limit += 64 * 1000  # a CAPA answer's lines
        elif isinstance(protocol, SmtpBackend):
            limit += 101 * protocol.MAX_LENGTH  # a multi-line reply's
        if held(protocol) > limit:
            self.fail_session(f"holds {held(protocol)} bytes, over {limit}")
        unexpected = getattr(protocol, "unexpected", ())
        if unexpected:
            self.fail_session("the login dialogue raised:\n" + unexpected[0].getTraceback())
        if not self.outcome:
            return
        outcome = self.outcome[0]
        if isinstance(outcome, Failure):
            if not outcome.check(BackendUnavailable, BackendRejected, BackendRefused):
                self.fail_session(f"the login failed with {outcome.type.__name__}: {outcome.getErrorMessage()}\n"
                                  + outcome.getTraceback())
            if not transport.disconnecting:
                self.fail_session(f"the login failed ({outcome.value!r}) but its connection was not dropped")
        elif outcome is not protocol:
            self.fail_session(f"the login's result is {outcome!r}")
        elif self.probe:
            if not transport.disconnecting or protocol.announced is None:
                self.fail_session(f"a probe ended open, or without what the backend offers: {protocol.announced}")
        elif not (self.logged_in or protocol.lost) and (transport.disconnecting or transport.producerState != "paused"):
            self.fail_session(f"logged in, but the connection is {transport.producerState}"
                              + (" and dropped" if transport.disconnecting else ""))

    def converse(self, rng: random.Random, answers: list[bytes]) -> None:
        """
        The backend answers what the gateway writes, misbehaving now and then, until it has nothing
        more to say, the gateway stops reading (logged in) or closes, or the connection is lost.
        """
        pending: deque[bytes | None] = deque()  # None: the connection is lost there
        for _ in range(2000):
            written = self.transport.value()
            if written:
                self.transport.clear()
                self.transcript.append(("gateway writes", written))
                answers += self.backend.answers(written)
            for answer in answers:
                sent = self.misbehave(rng, answer)
                chunks: list[bytes | None] = list(chunked(rng, sent))
                if rng.random() < self.lossy:
                    chunks.insert(rng.randint(0, len(chunks)), None)
                self.misbehaved = self.misbehaved or sent != answer or None in chunks
                pending.extend(chunks)
            answers = []
            if not pending or self.transport.disconnecting or self.transport.producerState == "paused":
                return
            chunk = pending.popleft()
            if chunk is None:
                self.lose()
                return
            self.largest_read = max(self.largest_read, len(chunk))
            self.step("backend sends", lambda: self.protocol.dataReceived(chunk), chunk)  # type: ignore[arg-type]
        self.fail_session("the dialogue goes on and on")

    def misbehave(self, rng: random.Random, answer: bytes) -> bytes:
        """
        What the backend sends for C{answer}: mostly that, else mutated, garbage, repeated, with things
        said unasked before it or early after it (before the gateway asks), cut short, or a line at
        the length limit.
        """
        if rng.random() >= self.noisy:
            return answer
        return rng.choice((
            lambda: mutate(rng, answer), lambda: mutate(rng, answer), lambda: mutate(rng, answer), lambda: garbage(rng),
            lambda: answer * rng.randint(2, 3), lambda: self.backend.noise() + answer,
            lambda: answer + self.backend.noise(), lambda: answer + self.backend.noise(),
            lambda: answer[:rng.randrange(len(answer) + 1)],
            lambda: b"* " * (rng.random() < 0.5) + b"x" * (self.backend.MAX_LENGTH + rng.randint(-4, 2))
            + rng.choice((b"\r\n", b"")),
        ))()

    def lose(self) -> None:
        self.step("connection lost", lambda: self.protocol.connectionLost(Failure(ConnectionDone())))

    def relay(self, rng: random.Random) -> None:
        """Logged in to IMAP or POP3: attached, what came after the login's answer and what comes later is relayed."""
        client, buffered = StringTransport(), bytes(self.protocol._buffer)
        self.step("attached to a client", lambda: self.protocol.attach(Splice(client, self.transport, Clock())))
        later = rng.randbytes(rng.randint(1, 50))
        self.step("backend sends", lambda: self.protocol.dataReceived(later), later)
        if client.value() != buffered + later or self.transport.producerState != "producing":
            self.fail_session(f"relayed {client.value()!r}, not {buffered + later!r}, or not read "
                              f"({self.transport.producerState})")

    def submit(self, rng: random.Random, protocol: SmtpBackend) -> None:
        """
        Logged in to the MTA: the front end's commands, pipelined, and a message after DATA's 354;
        each gets its reply or, once the MTA goes, BackendUnavailable (at once, for one sent after).
        """
        self.backend = ScriptedSession(rng, protocol)
        replies: list[tuple[bytes, list[object]]] = []

        def wait(what: bytes, waiting: Deferred[Reply]) -> None:
            got: list[object] = []
            replies.append((what, got))
            waiting.addBoth(got.append)

        def data_reply(reply: Reply) -> Reply:
            if reply.code == 354:  # the message goes, and its reply is waited for
                protocol.write_data(MESSAGE)
                wait(b"end of data", protocol.expect_reply())
            return reply

        def send(line: bytes) -> None:
            waiting = protocol.command(line)
            if line == b"DATA":
                waiting.addCallback(data_reply)
            wait(line, waiting)

        self.step("session starts", protocol.start_session)
        for _ in range(rng.randint(1, 4)):
            lines = [rng.choice(SESSION_COMMANDS) for _ in range(rng.randint(0, 2))]
            for line in lines + [rng.choice((*SESSION_COMMANDS, b"DATA"))]:  # DATA last: its 354 is waited for
                self.step("front end sends", lambda: send(line), line)
            self.converse(rng, [])
            if protocol.lost or self.transport.disconnecting:
                break
        if not (self.misbehaved or all(got for _, got in replies)):
            self.fail_session(f"the MTA answered all it was asked as it should, and {replies} still wait")
        if not protocol.lost:
            self.lose()
        if rng.random() < 0.3:
            line = rng.choice((*SESSION_COMMANDS, b"DATA"))
            self.step("front end sends after the MTA went", lambda: send(line), line)
        for what, got in replies:
            if len(got) != 1 or not (isinstance(got[0], Reply)
                                     or isinstance(got[0], Failure) and got[0].check(BackendUnavailable)):
                self.fail_session(f"{what!r} got {got!r} once the connection was lost")

    def probed(self, rng: random.Random) -> None:
        """A probe's result taken: it is closed with grace, as BackendConnector does, and then lost in time or not."""
        clock = Clock()
        self.step("probe closed with grace", lambda: self.protocol.close_with_grace(clock))
        if rng.random() < 0.5:
            self.step(f"{CLOSE_GRACE} s pass", lambda: clock.advance(CLOSE_GRACE))
            if not self.transport.disconnected:
                self.fail_session("a probe's connection not aborted after the grace period")
        self.lose()
        if clock.getDelayedCalls():
            self.fail_session(f"timers left once a probe's connection was lost: {clock.getDelayedCalls()}")

    def run_dialogues(self, kind: str) -> None:
        """L{BACKEND_DIALOGUES} dialogues of C{kind}; together they must reach every end, and log in often enough."""
        self.ends: Counter[str] = Counter()
        for n in range(BACKEND_DIALOGUES):
            self.dialogue(kind, n)
        wanted = {"logged in", "BackendUnavailable", "BackendRejected"}
        if kind == "pop3":
            wanted.add("BackendRefused")  # [IN-USE], [LOGIN-DELAY]
        self.assertLessEqual(wanted, set(self.ends), f"{kind} dialogues ended only as {self.ends}")
        self.assertGreater(self.ends["logged in"], BACKEND_DIALOGUES // 10, f"{kind} dialogues ended as {self.ends}")

    def test_imap(self) -> None:
        """ImapBackendLogin: greeting, CAPABILITY, STARTTLS, ID, LOGIN (literals) or AUTHENTICATE PLAIN (SASL-IR)."""
        self.run_dialogues("imap")

    def test_pop3(self) -> None:
        """Pop3BackendLogin: greeting, CAPA, STLS, XCLIENT, USER and PASS or AUTH PLAIN; a probe now and then."""
        self.run_dialogues("pop3")

    def test_submission(self) -> None:
        """SmtpBackend: greeting, EHLO, STARTTLS, XCLIENT, AUTH PLAIN; a probe now and then; then the session."""
        self.run_dialogues("submission")
