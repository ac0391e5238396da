"""
The submission backend: the login dialogue with the MTA, then an ordered command channel.

Login: greeting, EHLO, optional STARTTLS (then EHLO again), then one of AUTH PLAIN with the
client's credentials (C{replay}), AUTH PLAIN with the gateway's relay account (C{master}), or
Postfix XCLIENT naming the client and its login (C{xclient}; Postfix then logs the real client
and treats the session as authenticated). After XCLIENT the EHLO is the client's own, as nginx
sends it: Postfix takes the last EHLO's name for its Received header and its HELO checks.
Afterwards the submission front end sends commands and message data, and receives each reply in
order.
"""

from __future__ import annotations

import re
from collections import OrderedDict, deque
from collections.abc import Generator
from typing import Any

from twisted.internet.defer import Deferred, fail, inlineCallbacks
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.addresses import parse_ip
from gateway.backend import BackendLogin, BackendRejected, BackendUnavailable, LoginRequest, printable
from gateway.config import BackendSettings
from gateway.sasl import plain_message
from gateway.smtp_syntax import Reply, ReplyReader, SmtpSyntaxError, ehlo_keywords, xtext
from gateway.text_log import loggable_text


log = Logger()

# RFC 5321 4.5.3.1.4: a command line of at most 512 octets, CRLF included.
_COMMAND_LINE = 512
# What of a client's EHLO name is passed on: printable ASCII, one token, no longer than a domain.
_EHLO_NAME = re.compile(rb"[\x21-\x7e]{1,255}")


class RefusedEhloNames:
    """
    The client EHLO names the MTA has refused for good (5xx), each then replaced by the gateway's
    own name: kept (the newest L{LIMIT}, until the gateway reloads or restarts) so that each is
    sent once.
    Every refusal is a line in the MTA's log naming the client's address, which fail2ban's postfix
    filter counts against it.
    """

    LIMIT = 10_000

    __slots__ = ("_names",)

    def __init__(self) -> None:
        self._names: OrderedDict[bytes, None] = OrderedDict()

    def __contains__(self, name: bytes) -> bool:
        return name in self._names

    def clear(self) -> None:
        """Forget every name: each is tried again."""
        self._names.clear()

    def add(self, name: bytes) -> None:
        """Remember a refused name, forgetting the oldest past L{LIMIT}."""
        self._names[name] = None
        if len(self._names) > self.LIMIT:
            self._names.popitem(last=False)


class SmtpBackend(BackendLogin):
    """
    One connection to the backend MTA on behalf of one client session.

    :ivar keywords: the MTA's EHLO extensions after login (upper-case keyword -> parameters).
    """

    # See BackendLogin.
    __slots__ = ("_ehlo_name", "_refused_names", "_reader", "_waiting", "keywords")

    MAX_LENGTH = 4096

    def __init__(self, request: LoginRequest | None, settings: BackendSettings,
                 tls: IOpenSSLClientConnectionCreator | None, ehlo_name: str = "localhost",
                 refused_names: RefusedEhloNames | None = None) -> None:
        """
        :param ehlo_name: the gateway's own name, for its EHLO.
        :param refused_names: the client EHLO names the MTA has refused, shared by the connections
            to one MTA; by default this connection's own.
        """
        super().__init__(request, settings, tls)
        self._ehlo_name = ehlo_name.encode("ascii")
        self._refused_names = RefusedEhloNames() if refused_names is None else refused_names
        self._reader = ReplyReader()
        self._waiting: deque[Deferred[Reply]] = deque()
        self.keywords: dict[bytes, bytes] = {}

    def connectionMade(self) -> None:
        super().connectionMade()
        dialogue = self._log_in()
        dialogue.addErrback(self._failed)

    def _failed(self, failure: Failure) -> None:
        self.fail(failure.value if failure.check(BackendRejected, BackendUnavailable)
                  else BackendUnavailable(failure.getErrorMessage()))

    # -- replies, in order

    def lineReceived(self, line: bytes) -> None:
        try:
            reply = self._reader.feed(line.rstrip(b"\r"))
        except SmtpSyntaxError:
            self._broken(BackendUnavailable("the MTA sent a malformed reply"))
            return
        if reply is None:
            return
        if not self._waiting:
            self._broken(BackendUnavailable(f"the MTA replied unasked: {reply.code}"))
            return
        self._waiting.popleft().callback(reply)

    def expect_reply(self) -> Deferred[Reply]:
        """
        Wait for the next reply (after the greeting, or after the end of message data). Fails at
        once with BackendUnavailable when the connection is already gone.
        """
        if self.lost:
            return fail(BackendUnavailable("the MTA connection was lost"))
        waiting: Deferred[Reply] = Deferred()
        self._waiting.append(waiting)
        return waiting

    def command(self, line: bytes) -> Deferred[Reply]:
        """Send one command line; fires with its reply, in order with every other command."""
        waiting = self.expect_reply()
        if not self.lost:
            assert self.transport is not None
            self.transport.write(line + b"\r\n")
        return waiting

    def write_data(self, data: bytes) -> None:
        """Send message data (between DATA's 354 and the end of the message), as it is."""
        assert self.transport is not None
        self.transport.write(data)

    def _broken(self, reason: Exception) -> None:
        self._abort()
        self._fail_waiting(reason)

    def _fail_waiting(self, reason: Exception) -> None:
        while self._waiting:
            self._waiting.popleft().errback(reason)

    def connectionLost(self, reason: Failure = Failure(BackendUnavailable("closed"))) -> None:
        self.gone()
        self.fail(BackendUnavailable(f"connection lost: {reason.getErrorMessage()}"))
        self._fail_waiting(BackendUnavailable("the MTA connection was lost"))

    # -- the login dialogue

    @inlineCallbacks
    def _log_in(self) -> Generator[Deferred[Any], Any, None]:
        greeting = yield self.expect_reply()
        if greeting.code != 220:
            raise BackendUnavailable(f"MTA greeting was {_said(greeting)}")
        yield self._ehlo()
        if self.settings.tls == "starttls":
            if b"STARTTLS" not in self.keywords:
                raise BackendUnavailable("the MTA does not offer STARTTLS")
            reply = yield self.command(b"STARTTLS")
            if reply.code != 220:
                raise BackendUnavailable(f"the MTA refused STARTTLS: {_said(reply)}")
            self.start_tls()
            yield self._ehlo()
        if self.request is None:
            # A capability probe: nothing more to learn. QUIT through command(), which awaits its reply.
            self.command(b"QUIT").addErrback(lambda f: None)
            self.probed()
            return
        if self.settings.login == "xclient":
            yield self._xclient(login=True)
        else:
            if self.settings.forward_client_ip and b"XCLIENT" in self.keywords:
                yield self._xclient(login=False)
            yield self._authenticate()
        if self._buffer:
            # Read with the login's last reply, whole or in part: nothing asked for it, and kept, it
            # would be taken for the answer to the client's first command.
            raise BackendUnavailable("the MTA sent more than its answer to the login")
        assert self.announced is not None  # by the last EHLO
        self.capabilities = self.announced
        self.succeed()

    @inlineCallbacks
    def _ehlo(self, name: bytes | None = None) -> Generator[Deferred[Any], Any, None]:
        """
        EHLO as C{name}, by default the gateway's own name. An MTA that judges the name at once
        (Postfix's smtpd_delay_reject = no with HELO restrictions) may refuse the client's: the
        gateway's own name then, as without it, rather than no session for that client.
        """
        reply = yield self.command(b"EHLO " + (name or self._ehlo_name))
        # 504, 501, or 450 for a name not in the DNS; 421 is the MTA closing.
        if reply.code not in (250, 421) and name is not None:
            if reply.code >= 500:  # a 450 (the name's DNS lookup failed) may pass another time
                self._refused_names.add(name)
            assert self.request is not None  # a client's name comes with its login
            log.info("mta_refused_client_ehlo name={name} reply={reply} client={client} session={session}: "
                     "the gateway's own name goes instead; clear smtpd_helo_restrictions on the MTA's submission "
                     "service", name=loggable_text(name.decode("ascii")), reply=_said(reply),
                     client=self.request.client.host, session=self.request.client.session)
            reply = yield self.command(b"EHLO " + self._ehlo_name)
        if reply.code != 250:
            raise BackendUnavailable(f"the MTA refused EHLO: {_said(reply)}")
        self.keywords = ehlo_keywords(reply)
        self.announced = tuple(k + (b" " + v if v else b"") for k, v in self.keywords.items())

    @inlineCallbacks
    def _authenticate(self) -> Generator[Deferred[Any], Any, None]:
        assert self.request is not None
        if b"PLAIN" not in self.keywords.get(b"AUTH", b"").upper().split():
            raise BackendUnavailable("the MTA does not offer AUTH PLAIN")
        account = self.request.master_user or self.request.user
        try:
            token = plain_message(account, self.request.password)
        except ValueError:
            raise BackendRejected("the credentials cannot be sent in AUTH PLAIN") from None
        if len(b"AUTH PLAIN " + token + b"\r\n") <= _COMMAND_LINE:
            reply = yield self.command(b"AUTH PLAIN " + token)
        else:
            # RFC 4954 4: not as an initial response where the line would pass SMTP's limit
            # (Postfix cuts lines at 2048 bytes; it reads a SASL response up to 12 KiB).
            reply = yield self.command(b"AUTH PLAIN")
            if reply.code != 334:  # no verdict on credentials it has not seen
                raise BackendUnavailable(f"the MTA answered AUTH PLAIN with {reply.code}")
            reply = yield self.command(token)
        if reply.code == 235:
            return
        if reply.code == 535 and self.request.master_user is None:
            raise BackendRejected(f"the MTA refused the login: {reply.code}")
        raise BackendUnavailable(f"the MTA refused the login: {reply.code}")

    @inlineCallbacks
    def _xclient(self, login: bool) -> Generator[Deferred[Any], Any, None]:
        """Name the client (and, with C{login}, its authenticated user) to Postfix."""
        assert self.request is not None
        if b"XCLIENT" not in self.keywords:
            raise BackendUnavailable("the MTA does not offer XCLIENT (smtpd_authorized_xclient_hosts)")
        client = self.request.client
        ip = parse_ip(client.host)
        if ip is None:  # a client of a UNIX socket listener: Postfix's word for no address (its 501 otherwise)
            address, port = b"[UNAVAILABLE]", b"[UNAVAILABLE]"
        else:
            address = xtext((("IPV6:" if ip.version == 6 else "") + client.host).encode("ascii"))
            port = b"%d" % client.port
        # Postfix takes PROTO=SMTP or ESMTP only (ESMTPA is refused with 501); with LOGIN= it
        # logs the session as authenticated and writes "with ESMTPA" into Received: itself.
        command = b"XCLIENT ADDR=%s PORT=%s PROTO=ESMTP" % (address, port)
        if login:
            command += b" LOGIN=" + xtext(self.request.user.encode("utf-8", "surrogateescape"))
        reply = yield self.command(command)
        if reply.code != 220:
            raise BackendUnavailable(f"the MTA refused XCLIENT: {_said(reply)}")
        # XCLIENT restarts the session with a new greeting: EHLO again, as the client did (a name
        # that could not be sent as one token, or that the MTA has refused, is left out: the gateway's then).
        helo = self.request.client_helo
        sendable = helo is not None and _EHLO_NAME.fullmatch(helo) and helo not in self._refused_names
        yield self._ehlo(helo if sendable else None)

    # -- the session

    def start_session(self) -> None:
        """After login: read replies again, for the front end's commands."""
        self.resumeProducing()


def _said(reply: Reply) -> str:
    """
    A refusal as the log shows it: code and text (such as Postfix's "501 5.5.4 Bad ADDR syntax"
    for an IPv6 client when it has no IPv6 itself). Not for replies to AUTH, whose text an MTA
    might build from what it was sent.
    """
    return f"{reply.code} {printable(b' '.join(reply.lines)).decode('ascii')}".rstrip()
