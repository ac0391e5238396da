"""
The submission front end (RFC 5321, 3207, 4954, 6409, 8314): mail submission over TLS only,
authenticated, relayed to the backend MTA by an SMTP-aware relay.

Before TLS (port 587) only EHLO, NOOP, STARTTLS and QUIT work; every other command gets 530
(RFC 3207 4). Before login it offers EHLO (AUTH after TLS), HELO, NOOP, RSET and QUIT, and refuses
MAIL, RCPT and DATA. After AUTH every command still passes through the gateway, one at a time
and in order (so pipelined commands get their replies in order): MAIL FROM must be an address
the user may send as, SIZE is enforced both as declared and as sent, the recipient count is
bounded, and DATA is streamed to the MTA as it arrives, with backpressure. The client's final
reply to DATA is the MTA's own, so a 250 means the MTA has the message.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.backend import BackendLogin, BackendUnavailable
from gateway.config import SubmissionSettings
from gateway.frontend import FrontEndContext, LoginFrontEnd, LoginOutcome, SaslFailure
from gateway.senders import SenderPolicy
from gateway.smtp_backend import SmtpBackend
from gateway.smtp_syntax import PathCommand, Reply, SmtpSyntaxError, parse_path, split_command
from gateway.text_log import loggable_text
from gateway.tls import release_tls_buffers, tls_layer

log = Logger()

COMMAND_LINE_LIMIT = 512   # RFC 5321 4.5.3.1.4, CRLF excluded
AUTH_LINE_LIMIT = 12288    # RFC 4954 4: AUTH and SASL responses may be longer

_END_OF_DATA = b"\r\n.\r\n"
_DOT_LINE = len(b".\r\n")  # the terminator's own line: read and counted, but not part of the message
# A line whose first dot the client doubled, after a CRLF or a bare LF, both line ends to the MTA
# (the first line follows the 354's CRLF).
_STUFFED_LINE = b"\n.."
# A line of a lone dot with a bare CR or LF on either side: an end of data to some MTA, not to the
# gateway (SMTP smuggling). Only CRLF.CRLF ends the data here.
_AMBIGUOUS_END = re.compile(rb"(?:(?<!\r)\n|\r)\.[\r\n]|\r\n\.(?:\n|\r(?!\n))")
# A lone dot then a CR, at the end of what has been read: an end of data to some MTA already, to
# the gateway only if an LF follows.
_DOT_LINE_CR = re.compile(rb"[\r\n]\.\r\Z")
_AMBIGUOUS_END_REFUSAL = (b"554 5.6.0 Message refused: a line of a lone dot must begin and end with CRLF, "
                          b"closing connection\r\n")
COMMAND_REPLY_TIMEOUT = 300.0  # RFC 5321 4.5.3.2: 5 minutes for MAIL and RCPT
FINAL_REPLY_TIMEOUT = 600.0    # RFC 5321 4.5.3.2.6: 10 minutes for the end of data
# xtext (RFC 3461 4) of printable ASCII, as AUTH=, ENVID and ORCPT carry it: no escaped control character.
_XTEXT_PATTERN = rb"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+(?:2[0-9A-F]|[3-6][0-9A-F]|7[0-9A-E]))+"
_XTEXT = re.compile(_XTEXT_PATTERN)
# DSN's parameters and their values (RFC 3461 4, 5); a "utf-8" ORCPT is RFC 6533's, "+" and "="
# left out, 8-bit only with SMTPUTF8.
_DSN_MAIL = {
    b"RET": re.compile(rb"FULL|HDRS", re.IGNORECASE),
    b"ENVID": re.compile(rb"(?=.{1,100}$)" + _XTEXT_PATTERN, re.DOTALL),
}
_DSN_RCPT = {
    b"NOTIFY": re.compile(rb"NEVER|(?:SUCCESS|FAILURE|DELAY)(?:,(?:SUCCESS|FAILURE|DELAY))*", re.IGNORECASE),
    b"ORCPT": re.compile(rb"(?=.{1,494}$)(?:(?i:utf-8);[\x21-\x2a\x2c-\x3c\x3e-\x7e\x80-\xff]+|(?!(?i:utf-8);)"
                         rb"[A-Za-z0-9-]+;" + _XTEXT_PATTERN + rb")", re.DOTALL),
}
# RFC 3461 4: DSN lengthens the longest MAIL line by 110 octets (RET, ENVID), RCPT's by 500 (NOTIFY, ORCPT).
_DSN_LINE_EXTRA = {b"MAIL": 110, b"RCPT": 500}
_NOT_IMPLEMENTED = (b"HELP", b"TURN", b"ETRN", b"ATRN")
# RFC 5321 7.3: a server that does not verify addresses says 252, which reads as neither yes nor no.
_CANNOT_VERIFY = b"252 2.5.0 Cannot VRFY or EXPN, but will accept message and attempt delivery\r\n"
_BDAT_REFUSAL = b"554 5.5.1 BDAT is not supported (no CHUNKING), closing connection\r\n"
_BEFORE_TLS = (b"EHLO", b"NOOP", b"STARTTLS", b"QUIT")  # RFC 3207 4: all else gets 530 until TLS

_REJECTED = b"535 5.7.8 Authentication credentials invalid\r\n"
_SASL_FAILURES = {
    SaslFailure.UNKNOWN_MECHANISM: b"504 5.5.4 Unrecognized authentication type\r\n",
    SaslFailure.CANCELLED: b"501 5.7.0 Authentication cancelled\r\n",
    SaslFailure.MALFORMED: b"501 5.5.2 Cannot decode response\r\n",
    SaslFailure.REFUSED: _REJECTED,
}
_LOGIN_REPLIES = {
    LoginOutcome.LOGGED_IN: b"235 2.7.0 Authentication successful\r\n",
    LoginOutcome.REJECTED: _REJECTED,
    # A 4xx: the client keeps the password and the message and tries again later.
    LoginOutcome.UNAVAILABLE: b"454 4.7.0 Temporary authentication failure, try again later\r\n",
    LoginOutcome.REFUSED: b"454 4.7.0 Temporary authentication failure, try again later\r\n",
    LoginOutcome.THROTTLED: b"421 4.7.0 Too many failed logins from your address, try again later\r\n",
    LoginOutcome.OVERLOADED: b"421 4.7.0 Too many sessions for this user, try again later\r\n",
}
_BACKEND_DOWN = b"451 4.4.1 Mail system temporarily unavailable, try again later\r\n"


class SubmissionFrontEnd(LoginFrontEnd):
    """
    One submission client connection.

    :param rules: the submission settings (size, recipients, timeouts).
    :param senders: who may send as whom.
    """

    # See LoginFrontEnd.
    __slots__ = (
        "_rules", "_senders", "_ehlo_name", "_backend", "_sender", "_recipients", "_transaction_timer",
        "_data_tail", "_data_held", "_data_size", "_data_refusal", "_smtputf8", "_shutting_down", "_mta_holding"
    )

    def __init__(self, context: FrontEndContext, rules: SubmissionSettings, senders: SenderPolicy) -> None:
        super().__init__(context)
        self._rules = rules
        self._senders = senders
        # The name of the client's last EHLO, which AUTH needs; None before one, after HELO or STARTTLS.
        self._ehlo_name: bytes | None = None
        self._backend: SmtpBackend | None = None
        self._sender: bytes | None = None
        self._recipients = 0
        self._transaction_timer: IDelayedCall | None = None
        # DATA streaming: the last bytes seen (to find CRLF.CRLF across reads), bytes read so far
        # (less doubled dots, the ".\r\n" line included, see _message_size), too big?
        self._data_tail = b""
        self._data_held = b""  # a CR after a lone dot, not yet relayed: the next byte tells what it ends
        self._data_size = 0
        self._data_refusal: bytes | None = None  # the reply owed at the end of a refused message
        self._smtputf8 = False
        self._shutting_down = False  # the process is stopping: goodbye after the reply under way
        self._mta_holding = False  # the MTA's backpressure has paused reading from the client

    # -- hooks of LoginFrontEnd

    def greet(self) -> None:
        self.send(b"220 %s ESMTP Mail gateway ready\r\n" % self.context.hostname.encode("ascii"))

    def reply_line_too_long(self, line: bytes) -> None:
        # RFC 4954 4: a SASL response too long, the initial one on the AUTH line included
        if self.in_sasl_exchange or line[:5].upper() == b"AUTH ":
            self.send(b"500 5.5.6 Authentication Exchange line is too long, closing connection\r\n")
        else:
            self.send(b"500 5.5.2 Line too long, closing connection\r\n")

    def client_helo(self) -> bytes | None:
        return self._ehlo_name

    def reply_timeout(self) -> None:
        self.send(b"421 4.4.2 %s Timeout, closing connection\r\n" % self.context.hostname.encode("ascii"))

    def reply_too_many_errors(self) -> None:
        self.send(b"421 4.7.0 Too many errors, closing connection\r\n")

    def reply_overloaded(self) -> None:
        self.send(b"421 4.7.0 Too many connections, try again later\r\n")

    def reply_shutting_down(self) -> None:
        self.send(b"421 4.3.2 %s Service shutting down, closing connection\r\n" % self.context.hostname.encode("ascii"))

    def reply_challenge(self, challenge: bytes) -> None:
        self.send(b"334 " + challenge + b"\r\n")

    def reply_sasl_failed(self, reason: SaslFailure) -> None:
        self.send(_SASL_FAILURES[reason])

    def reply_login(self, outcome: LoginOutcome) -> None:
        self.send(_LOGIN_REPLIES[outcome])
        if outcome is LoginOutcome.REJECTED and self.attempts_exhausted:
            self.send(b"421 4.7.0 Too many failed authentication attempts, closing connection\r\n")

    def logged_in(self, session: BackendLogin) -> None:
        assert isinstance(session, SmtpBackend)
        self._use_backend(session)
        self.begin_session(self._rules.idle_timeout)

    def shut_down(self) -> None:
        """
        As L{LoginFrontEnd.shut_down}, but a message still arriving, or waiting for the MTA's
        verdict, and a command the MTA has yet to answer are seen through first: the client hears
        the reply, then goodbye. Told nothing, a client whose message the MTA took would send it
        again. (A message not ended by then is dropped with the connection, never delivered.)
        """
        if self.closed:
            return
        # Reading is paused while the MTA has the turn (see _relay and the end of DATA).
        if not self.line_mode or (self.user is not None and self.paused):
            self._shutting_down = True
            return
        super().shut_down()

    def command_line(self, line: bytes) -> None:
        verb, argument = split_command(line)
        limit = (COMMAND_LINE_LIMIT + _DSN_LINE_EXTRA.get(verb, 0)
                 + (500 if verb == b"MAIL" and b" AUTH=" in line.upper() else 0))
        if len(line) > limit and verb != b"AUTH":
            self._error(b"500 5.5.2 Line too long")
            return
        handler = _COMMANDS.get(verb)
        if verb == b"BDAT":
            # CHUNKING is not offered, but the client's chunk follows the command line: read as
            # commands, a message body would run as such (RFC 3030 2). Where it ends is the
            # client's word, which nothing here parses: nothing more is read.
            self.send(_BDAT_REFUSAL)
            self.close()
        elif not self.secure and verb not in _BEFORE_TLS:
            self._error(b"530 5.7.0 Must issue a STARTTLS command first")
        elif handler is not None and b"\0" not in line:
            handler(self, argument)
        elif verb in _NOT_IMPLEMENTED:
            self._error(b"502 5.5.1 Command not implemented")
        else:
            self._error(b"500 5.5.2 Command unrecognized")

    # -- commands before and after login

    def do_EHLO(self, argument: bytes) -> None:
        if not self._hello(argument, extended=True):
            return
        extensions = [b"PIPELINING", b"SIZE %d" % self._size_limit(), b"ENHANCEDSTATUSCODES"]
        if not self.secure:
            extensions.append(b"STARTTLS")
        else:
            extensions += self._backend_extensions()
            if self.user is None:
                extensions.append(b"AUTH PLAIN LOGIN")
        self._reply(Reply(250, (self.context.hostname.encode("ascii"), *extensions)).encode())

    def do_HELO(self, argument: bytes) -> None:
        if self._hello(argument, extended=False):
            self._reply(b"250 %s\r\n" % self.context.hostname.encode("ascii"))

    def _hello(self, argument: bytes, extended: bool) -> bool:
        if not argument or b" " in argument.strip():
            self._error(b"501 5.5.4 Syntax: %s hostname" % (b"EHLO" if extended else b"HELO"))
            return False
        # AUTH is an extension: after HELO there is none (RFC 4954 3).
        self._ehlo_name = argument.strip() if extended else None
        self._end_transaction(reset_backend=True)
        return True

    def _mta_keywords(self) -> dict[bytes, bytes]:
        """The MTA's EHLO extensions: from this session's MTA connection, else from the start-up probe."""
        if self._backend is not None:
            return self._backend.keywords
        keywords = {}
        for line in self.context.backend.announced or ():
            keyword, _, parameters = line.partition(b" ")
            keywords[keyword.upper()] = parameters
        return keywords

    def _backend_extensions(self) -> list[bytes]:
        """8BITMIME, SMTPUTF8 and DSN only when the MTA offers them: they are relayed, never downgraded."""
        offered = self._mta_keywords()
        return [keyword for keyword in (b"8BITMIME", b"SMTPUTF8", b"DSN") if keyword in offered]

    def _size_limit(self) -> int:
        """The smaller of the configured limit and the MTA's own SIZE (RFC 1870), when it gives one."""
        mta = self._mta_keywords().get(b"SIZE", b"")
        if mta.isdigit() and int(mta) > 0:
            return min(self._rules.max_message_size, int(mta))
        return self._rules.max_message_size

    def do_STARTTLS(self, argument: bytes) -> None:
        if self.secure:
            self._error(b"503 5.5.1 TLS already active")
        elif argument:
            self._error(b"501 5.5.4 Syntax: STARTTLS")
        else:
            self._reply(b"220 2.0.0 Ready to start TLS\r\n")
            # RFC 3207 4.2: forget everything learned from the client before TLS.
            self._ehlo_name = None
            self.start_tls()

    def do_AUTH(self, argument: bytes) -> None:
        if self.user is not None:
            self._error(b"503 5.5.1 Already authenticated")
        elif self._ehlo_name is None:
            self._error(b"503 5.5.1 Send EHLO first")
        elif not argument:
            self._error(b"501 5.5.4 Syntax: AUTH mechanism [initial-response]")
        else:
            self.start_auth(argument)

    def do_RSET(self, argument: bytes) -> None:
        if argument:  # RFC 5321 4.1.1.5: RSET takes none; nothing is reset
            self._error(b"501 5.5.4 Syntax: RSET")
            return
        self._end_transaction(reset_backend=True)
        self._reply(b"250 2.0.0 OK\r\n")

    def do_NOOP(self, argument: bytes) -> None:
        self._reply(b"250 2.0.0 OK\r\n")

    def do_VRFY(self, argument: bytes) -> None:
        if not argument:
            self._error(b"501 5.5.4 Syntax: VRFY or EXPN takes an argument")
            return
        self._reply(_CANNOT_VERIFY)

    def do_QUIT(self, argument: bytes) -> None:
        self.send(b"221 2.0.0 Bye\r\n")
        self.close()

    def _must_be_logged_in(self) -> bool:
        if self.user is None:
            self._error(b"530 5.7.0 Authentication required")
            return False
        return True

    # -- the mail transaction

    def do_MAIL(self, argument: bytes) -> None:
        if not self._must_be_logged_in():
            return
        if self._sender is not None:
            self._error(b"503 5.5.1 Nested MAIL command")
            return
        path = self._path(argument, b"FROM")
        if path is None or not self._ascii_or_smtputf8(path, path.parameter(b"SMTPUTF8") is not None, mail=True):
            return
        assert self.user is not None
        sender = path.address.decode("utf-8", "replace")
        if not self._senders.allowed(self.user, sender):
            self.log_event(log.warn, "sender_rejected", "user={user} sender={sender}",
                           user=loggable_text(self.user), sender=loggable_text(sender))
            # The null sender is nobody's (Postfix's sender login check lets it pass; read receipts
            # that follow RFC 8098 use it): say so, since "not owned" would puzzle whoever reads it.
            self._error(b"553 5.7.1 Null sender not accepted: send as your own address" if not path.address
                        else b"553 5.7.1 Sender address rejected: not owned by the authenticated user")
            return
        size = path.parameter(b"SIZE")
        if size is not None and (not size.isdigit() or len(size) > 20):
            self._error(b"501 5.5.4 Bad SIZE parameter")
            return
        if size is not None and int(size) > self._size_limit():
            self._reply(b"552 5.3.4 Message size exceeds fixed maximum message size\r\n")
            return
        if not self._parameters_supported(path, mail=True):
            return
        # The client's AUTH= assertion (RFC 4954 5) is its own business: the MTA learns the user from the gateway.
        relayed = PathCommand(path.address, tuple(p for p in path.parameters if p[0] != b"AUTH"))
        smtputf8 = path.parameter(b"SMTPUTF8") is not None

        def accepted(reply: Reply) -> None:
            if reply.code // 100 == 2:
                self._sender = path.address
                self._smtputf8 = smtputf8
                self._recipients = 0
                self._start_transaction_timer(self._rules.transaction_timeout)

        self._relay(relayed.encode(b"MAIL FROM"), accepted)

    def do_RCPT(self, argument: bytes) -> None:
        if not self._must_be_logged_in():
            return
        if self._sender is None:
            # Expected after a refused MAIL in a pipelined group (RFC 2920): not counted as an error.
            self._reply(b"503 5.5.1 Need MAIL command\r\n")
            return
        if self._recipients >= self._rules.max_recipients:
            self._reply(b"452 4.5.3 Too many recipients\r\n")
            return
        path = self._path(argument, b"TO")
        if (path is None or not self._ascii_or_smtputf8(path, self._smtputf8, mail=False)
                or not self._parameters_supported(path, mail=False)):
            return

        def accepted(reply: Reply) -> None:
            if reply.code // 100 == 2:
                self._recipients += 1

        self._relay(path.encode(b"RCPT TO"), accepted)

    def do_DATA(self, argument: bytes) -> None:
        if not self._must_be_logged_in():
            return
        if argument:
            self._error(b"501 5.5.4 Syntax: DATA")
            return
        if self._sender is None or not self._recipients:
            self._reply(b"503 5.5.1 Need RCPT command\r\n")
            return

        def answered(reply: Reply) -> None:
            if reply.code == 354:
                self._data_tail, self._data_held, self._data_size, self._data_refusal = b"\r\n", b"", 0, None
                # From here the idle timer (reset by every read) catches a stalled upload; a slow
                # but steady one may take as long as it needs.
                self._stop_transaction_timer()
                self.setRawMode()

        self._relay(b"DATA", answered)

    def rawDataReceived(self, data: bytes) -> None:
        """
        Message data, streamed to the MTA until CRLF.CRLF; dot-stuffing and line endings travel
        untouched. Lines ending in a bare LF pass, as Postfix takes them (its default
        smtpd_forbid_bare_newline, "normalize" from 3.9 on): curl and Python's smtplib send files
        as they are. A lone dot with a bare CR or LF around it refuses the message and ends the
        connection: an MTA may end the data there where the gateway does not, and run what
        follows as commands nobody checked (SMTP smuggling); past one, where this message ends
        is ambiguous, so nothing more is read from this client.
        """
        data, self._data_held = self._data_held + data, b""
        window = self._data_tail + data
        end = window.find(_END_OF_DATA)
        checked = window[: end + len(_END_OF_DATA)] if end >= 0 else window.removesuffix(b"\r")
        # The tail was checked last time, all but a final CR whose LF had not come yet; a match
        # may need all four of its bytes again. The regular expression reads 64 KiB in about 1.6
        # ms, the two "in" tests in about 0.1: it runs only where a line may begin with a dot.
        if (b"\n." in checked or b"\r." in checked) and _AMBIGUOUS_END.search(checked):
            if self._data_refusal is None:  # else refused, and logged, already
                self._refuse_message(_AMBIGUOUS_END_REFUSAL, "ambiguous-end")
            self.send(_AMBIGUOUS_END_REFUSAL)
            self.close()
            return
        # RFC 1870: the size leaves out the dots that dot-stuffing doubled. One wholly inside the
        # tail was counted last time.
        stuffed = checked.count(_STUFFED_LINE, max(0, len(self._data_tail) - len(_STUFFED_LINE) + 1))
        if end < 0:
            if _DOT_LINE_CR.search(window[-3:]):
                # Relayed, it would give an MTA that ends the data at CRLF.CR or CR.CR the whole
                # message before the next read shows it ambiguous.
                data, window, self._data_held = data[:-1], window[:-1], b"\r"
            self._message_bytes(data, stuffed)
            self._data_tail = window[-4:]
            return
        cut = end + len(_END_OF_DATA) - len(self._data_tail)
        self._message_bytes(data[:cut], stuffed)
        self.pauseProducing()  # what follows waits for the verdict
        self.back_to_lines(data[cut:])
        if self._data_refusal is not None:
            # Refused (its size, the MTA lost) but ended where a message ends: the session goes on.
            refusal, self._data_refusal = self._data_refusal, None
            self._end_transaction(reset_backend=False)
            self._reply(refusal)
            return
        assert self._backend is not None
        self.setTimeout(None)  # the MTA's turn, as in _relay: FINAL_REPLY_TIMEOUT is its deadline
        waiting = self._backend.expect_reply()
        # Late, the verdict is unknown: the MTA may yet deliver what the client is told to retry.
        waiting.addTimeout(FINAL_REPLY_TIMEOUT, self.clock,
                           onTimeoutCancel=_mta_late("the end of the message (it may deliver it still)"))
        waiting.addCallbacks(self._message_done, self._backend_failed)
        self._pending = waiting  # cancelled if the client goes away meanwhile

    def _message_size(self) -> int:
        """
        The message's size as RFC 1870 counts it: what the client sent after the 354, every line
        with its CRLF, up to and including the last line's CRLF, less the dots that dot-stuffing
        doubled; the terminating ".\r\n" line is not counted. The bytes read so far may end with
        (part of) that line, hence at most 3 bytes too few while the message streams; exact once
        it has ended.
        """
        return self._data_size - _DOT_LINE

    def _message_bytes(self, chunk: bytes, stuffed: int) -> None:
        """Relay a chunk of the message, in which C{stuffed} lines begin with a doubled dot."""
        self._data_size += len(chunk) - stuffed
        if self._data_refusal is None and self._message_size() > self._size_limit():
            self._refuse_message(b"552 5.3.4 Message size exceeds fixed maximum message size\r\n", "size")
        if self._data_refusal is None and self._backend is not None:
            self._backend.write_data(chunk)

    def _refuse_message(self, reply: bytes, reason: str) -> None:
        """Nothing of this message may reach a mailbox: the MTA loses the connection before the final dot."""
        self.log_event(log.warn, "message_refused", "user={user} reason={reason}",
                       user=loggable_text(self.user or ""), reason=reason)
        self._data_refusal = reply
        self._drop_backend()
        # The MTA's backpressure may have paused the client; the rest must still be read (and dropped).
        assert self.transport is not None
        self.transport.resumeProducing()  # type: ignore[attr-defined]

    def _message_done(self, reply: Reply) -> None:
        assert self.user is not None
        self.log_event(log.info, "message", "user={user} size={size} recipients={recipients} reply={code}",
                       user=loggable_text(self.user), size=self._message_size(), recipients=self._recipients,
                       code=reply.code)
        self._end_transaction(reset_backend=False)
        self._mta_replied(reply)

    def _too_slow(self) -> None:
        self._transaction_timer = None
        if self.closed:
            return  # said goodbye already (QUIT, an MTA's 421), and still closing
        self.log_event(log.info, "timeout", "reason=transaction")
        self.send(b"421 4.4.2 Transaction timeout, closing connection\r\n")
        self.close()

    def _start_transaction_timer(self, seconds: float | None) -> None:
        """Give the client C{seconds} (None: no transaction is timed) to reach DATA's 354."""
        if seconds is not None and self._transaction_timer is None:
            self._transaction_timer = self.clock.callLater(seconds, self._too_slow)

    def _stop_transaction_timer(self) -> float | None:
        """Stop the transaction's clock: the seconds it had left, or None if none was running."""
        timer, self._transaction_timer = self._transaction_timer, None
        if timer is None:
            return None
        timer.cancel()
        return max(0.0, timer.getTime() - self.clock.seconds())  # due, but not yet run: none left

    def _end_transaction(self, reset_backend: bool) -> None:
        self._stop_transaction_timer()
        self._smtputf8 = False
        if reset_backend and self._sender is not None and self._backend is not None:
            self._backend.command(b"RSET").addErrback(lambda failure: None)
        self._sender = None
        self._recipients = 0
        if self._data_size:
            # A message's records grew the TLS layers' buffers, which an idle session would keep.
            self._data_size = 0
            self._release_tls_buffers()

    def _release_tls_buffers(self) -> None:
        """Give back what the client's and the MTA's TLS layers grew to (best effort: not while records wait)."""
        for transport in (self.transport, None if self._backend is None else self._backend.transport):
            release_tls_buffers(tls_layer(transport))

    # -- talking to the MTA, one command at a time

    def _relay(self, line: bytes, then: Callable[[Reply], None]) -> None:
        """
        Send a command to the MTA (connecting again at MAIL if needed); its reply goes to the
        client. While the MTA works the client's idle timer stops, and the MTA has its own deadline.
        """
        if self._sender is not None and (self._backend is None or self._backend.lost):
            # A new MTA session knows nothing of this transaction: a temporary failure, not its 503.
            self._backend_failed(Failure(BackendUnavailable("the MTA connection was lost during a transaction")))
            return
        self.pauseProducing()
        self.setTimeout(None)
        left = self._stop_transaction_timer()  # the MTA's time is not the client's
        connecting = self._connected_backend()

        def answered(reply: Reply) -> None:
            self._start_transaction_timer(left)
            then(reply)
            self._mta_replied(reply)

        def send(backend: SmtpBackend) -> Deferred[Reply]:
            reply = backend.command(line)
            reply.addTimeout(COMMAND_REPLY_TIMEOUT, self.clock,
                             onTimeoutCancel=_mta_late(line.split(b" ", 1)[0].decode("ascii", "replace")))
            return reply

        connecting.addCallback(send)
        connecting.addCallbacks(answered, self._backend_failed)
        self._pending = connecting  # cancelled if the client goes away meanwhile

    def _mta_replied(self, reply: Reply) -> None:
        """Pass the MTA's reply on to the client, and read the next command."""
        if reply.code == 421:
            # The MTA is closing this session: so does the client's, as RFC 5321 3.8 has it.
            self._drop_backend()
            self.send(reply.encode())
            self.close()
            return
        self._reply(reply.encode())

    def _connected_backend(self) -> Deferred[SmtpBackend]:
        if self._backend is not None and self._backend.lost:
            # The MTA closed it meanwhile (its idle timeout, a restart): connect again.
            self._drop_backend()
        if self._backend is not None:
            return succeed(self._backend)
        assert self._session is not None

        def connected(backend: BackendLogin) -> SmtpBackend:
            assert isinstance(backend, SmtpBackend)
            self._use_backend(backend)
            return backend

        connecting = self.context.backend.login(self._session.request).addCallback(connected)
        self._pending = connecting
        return connecting

    def _use_backend(self, backend: SmtpBackend) -> None:
        self._backend = backend
        backend.start_session()
        reads = _ClientReads(self.transport, self._mta_lost, self._mta_backpressure)  # type: ignore[arg-type]
        backend.transport.registerProducer(reads, True)  # type: ignore[union-attr]
        assert backend.result is not None  # spent only once relaying, which submission never does
        backend.result.addErrback(lambda failure: None)

    def _drop_backend(self) -> None:
        self._mta_holding = False
        backend, self._backend = self._backend, None
        if backend is not None and backend.transport is not None and not backend.lost:
            backend.transport.unregisterProducer()  # type: ignore[attr-defined]
            backend.transport.abortConnection()  # type: ignore[attr-defined]

    def _mta_lost(self) -> None:
        """
        The MTA connection is gone. A reply being waited for fails by itself (L{_backend_failed});
        a message being streamed cannot, so it is refused with the same 451 at its end, and the
        client, which the MTA's backpressure may have paused, is read again.
        """
        if not self.line_mode and self._data_refusal is None:
            self._refuse_message(_BACKEND_DOWN, "backend-lost")

    def _mta_backpressure(self, holding: bool) -> None:
        self._mta_holding = holding

    def timeoutConnection(self) -> None:
        if self._mta_holding and not self.line_mode and self._data_refusal is None:
            # The client went silent because the MTA stopped taking its message: the MTA's stall,
            # not the client's. The client, read again, hears so after its final dot, as when
            # the MTA is lost; its idle timer starts over.
            self._refuse_message(_BACKEND_DOWN, "backend-stalled")
            self.setTimeout(self._rules.idle_timeout)
            return
        super().timeoutConnection()

    def _backend_failed(self, failure: Failure) -> None:
        if self.closed:
            return
        self.log_event(log.warn, "backend_unavailable", "user={user} backend={backend} reason={reason}",
                       user=loggable_text(self.user or ""), backend=self.context.backend.address,
                       reason=failure.getErrorMessage())
        self._drop_backend()
        self._end_transaction(reset_backend=False)
        self._reply(_BACKEND_DOWN)

    # -- replies

    def _path(self, argument: bytes, keyword: bytes) -> PathCommand | None:
        try:
            return parse_path(argument, keyword)
        except SmtpSyntaxError as e:
            self._refuse_path(b"501 5.5.4 " + str(e).encode("ascii"), mail=keyword == b"FROM")
            return None

    def _refuse_path(self, reply: bytes, mail: bool) -> None:
        """
        Refuse a MAIL, a protocol error (counted), or one recipient, which is answered as the MTA's
        refusals are: not counted, since a pipelined group with many bad addresses must still
        have its other recipients and its DATA answered (RFC 2920 3.1).
        """
        if mail:
            self._error(reply)
        else:
            self._reply(reply + b"\r\n")

    def _parameters_supported(self, path: PathCommand, mail: bool) -> bool:
        """
        MAIL takes SIZE, BODY=7BIT, and BODY=8BITMIME, SMTPUTF8, and DSN's RET and ENVID when the
        MTA offers them; RCPT takes DSN's NOTIFY and ORCPT when the MTA offers DSN (RFC 3461).
        Anything else is refused rather than dropped; the MTA judges the values further.
        """
        offered = self._backend_extensions()
        dsn = _DSN_MAIL if mail else _DSN_RCPT
        for keyword, value in path.parameters:
            if b"DSN" in offered and keyword in dsn:
                if value is None or dsn[keyword].fullmatch(value) is None or not (value.isascii() or self._smtputf8):
                    # Known, but not well formed: a syntax error (RFC 5321 4.1.1.11 keeps 555 for the unknown).
                    self._refuse_path(b"501 5.5.4 Bad " + keyword + b" parameter syntax", mail)
                    return False
                continue
            if not mail:
                supported = False
            elif keyword == b"SIZE":
                supported = True
            elif keyword == b"AUTH":
                supported = value is not None and (value == b"<>" or _XTEXT.fullmatch(value) is not None)
            elif keyword == b"BODY":
                body = (value or b"").upper()
                supported = body == b"7BIT" or (body == b"8BITMIME" and b"8BITMIME" in offered)
            else:
                supported = keyword == b"SMTPUTF8" and value is None and b"SMTPUTF8" in offered
            if not supported:
                self._refuse_path(b"555 5.5.4 Unsupported parameter " + keyword, mail)
                return False
        return True

    def _ascii_or_smtputf8(self, path: PathCommand, smtputf8: bool, mail: bool) -> bool:
        """An address with non-ASCII bytes is an SMTPUTF8 address (RFC 6531 3.4), or refused."""
        if smtputf8 or path.address.isascii():
            return True
        self._refuse_path(b"553 5.6.7 Non-ASCII address without SMTPUTF8", mail)
        return False

    def _reply(self, reply: bytes) -> None:
        """Send a reply and read the next command (or, once the process is stopping, say goodbye)."""
        self.send(reply)
        if self._shutting_down and self.line_mode:  # not after a 354: the message comes, then its verdict
            self.reply_shutting_down()
            self.close()
            return
        self.command_succeeded()
        if not self.closed:
            if self.user is not None:
                self.setTimeout(self._rules.idle_timeout)  # the MTA's turn is over
            self.resumeProducing()

    def _error(self, reply: bytes) -> None:
        self.send(reply + b"\r\n")
        self.command_failed()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self._stop_transaction_timer()
        if not self.line_mode:
            # Gone mid-message: QUIT would be read as part of it. Aborted, the MTA drops the message.
            self._drop_backend()
        backend, self._backend = self._backend, None
        if backend is not None and backend.transport is not None and not backend.lost:
            _say_goodbye(backend, self.clock)
        super().connectionLost(reason)


# One table for every connection, as in gateway.imap.
_COMMANDS: dict[bytes, Callable[[SubmissionFrontEnd, bytes], None]] = {
    b"EHLO": SubmissionFrontEnd.do_EHLO, b"HELO": SubmissionFrontEnd.do_HELO,
    b"STARTTLS": SubmissionFrontEnd.do_STARTTLS, b"AUTH": SubmissionFrontEnd.do_AUTH,
    b"MAIL": SubmissionFrontEnd.do_MAIL, b"RCPT": SubmissionFrontEnd.do_RCPT,
    b"DATA": SubmissionFrontEnd.do_DATA, b"RSET": SubmissionFrontEnd.do_RSET,
    b"NOOP": SubmissionFrontEnd.do_NOOP, b"QUIT": SubmissionFrontEnd.do_QUIT,
    b"VRFY": SubmissionFrontEnd.do_VRFY, b"EXPN": SubmissionFrontEnd.do_VRFY,
}


def _mta_late(what: str) -> Callable[[object, float], Failure]:
    """For C{addTimeout}: a reply the MTA owes, late, as the backend being unavailable, naming C{what}."""
    def late(result: object, timeout: float) -> Failure:
        return Failure(BackendUnavailable(f"the MTA did not answer {what} within {timeout:g} s"))
    return late


def _say_goodbye(backend: SmtpBackend, clock: IReactorTime) -> None:
    """
    Say QUIT to the MTA and close its connection once its buffer is written, or abort it once it
    has gone L{gateway.relay.CLOSE_GRACE} seconds without taking L{gateway.relay.CLOSE_PROGRESS}
    bytes of what it was sent: an MTA that stopped reading,
    or never ends TLS, would keep the connection and its buffers for ever.
    """
    transport = backend.transport
    assert transport is not None
    # The client is gone: its reading is no longer the producer, which a TLS close would wait for,
    # and a TCP close resume (when paused) instead of closing (see gateway.relay._let_go).
    transport.unregisterProducer()  # type: ignore[attr-defined]
    backend.command(b"QUIT").addErrback(lambda failure: None)  # the connection's loss fails it: expected
    backend.close_with_grace(clock)


@implementer(IPushProducer)
class _ClientReads:
    """
    Backpressure from the MTA to the client: a full MTA send buffer pauses reading from the
    client. Unlike registering the client's transport itself, the MTA connection closing (its
    idle timeout, say) does not close the client: the next MAIL simply connects again, and
    C{lost} tells the front end, which must not stay paused for good; C{holding} tells it when
    reading stops and starts again, so that a client silent meanwhile is not blamed for it.
    """

    def __init__(self, transport: IPushProducer, lost: Callable[[], None], holding: Callable[[bool], None]) -> None:
        self._transport = transport
        self._lost = lost
        self._holding = holding

    def pauseProducing(self) -> None:
        self._transport.pauseProducing()
        self._holding(True)

    def resumeProducing(self) -> None:
        self._transport.resumeProducing()
        self._holding(False)

    def stopProducing(self) -> None:
        # Twisted calls this when the MTA connection is lost, not when the front end unregisters us.
        self._lost()
