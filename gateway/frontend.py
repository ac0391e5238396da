"""
The protocol-neutral core of every front end: what a client may do before it has logged in.

L{LoginFrontEnd} owns the pre-authentication rules that IMAP, POP3 and submission share: the
line length limit, the idle timeout and the absolute login deadline, the consecutive-error
limit, the switch to TLS (dropping whatever was pipelined in clear), the login itself
(verification, uniform failure pacing, the backend login) and the hand-over to the byte relay
(forwarding whatever was pipelined after the login). A protocol subclass parses its commands
and words the replies; it never touches timers, TLS or the backend directly.

The log events here have stable formats with named fields; C{login_failed} is the interface
for fail2ban, and tests pin its shape.
"""

from __future__ import annotations

import enum
import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.task import deferLater
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IOpenSSLServerConnectionCreator, IReactorTime
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway import slots
from gateway.addresses import address_host
from gateway.auth import IAuthenticator
from gateway.backend import (
    BackendConnector,
    BackendLogin,
    BackendRefused,
    BackendRejected,
    BackendUnavailable,
    ClientAddress,
    LoginRequest,
    new_session_id,
)
from gateway.config import Limits
from gateway.gatekeeper import FailureCount, Gatekeeper, LoginCheck
from gateway.idle import IdleSessions
from gateway.proxy_protocol import balancers_own
from gateway.relay import GracePeriod, Splice, close_with_grace, hand_over
from gateway.shutdown import OpenConnections
from gateway.sasl import (
    Challenge,
    Credentials,
    SaslCancelled,
    SaslError,
    SaslExchange,
    SaslRefused,
    begin,
    encode_challenge,
)
from gateway.sockets import tune, write_backlog
from gateway.text_log import loggable_text
from gateway.tls import ITLSEndListener, describe_tls, tls_failure

log = Logger()

MAX_UNREAD_REPLIES = 64 * 1024
"""
Bytes of replies waiting to be sent past which a client that keeps sending commands is cut off:
it is not reading them, and answering more would only pile them up here. No mail client's
commands before login, or SMTP's, have more than a few KiB of replies in flight.
"""


@dataclass(frozen=True)
class FrontEndContext:
    """
    Everything a front-end connection needs, shared by all connections of one listener.

    :ivar protocol: the protocol's name in logs (C{imap}, C{pop3}, C{submission}).
    :ivar tls: the server TLS for STARTTLS; on an implicit-TLS listener the connection is
        already secure and this is not used.
    :ivar implicit_tls: True on a listener that speaks TLS from the first byte.
    :ivar backend: logs in to the store behind this protocol.
    :ivar idle: the relayed sessions' idle timeouts, shared by every listener.
    :ivar connections: the process's open client connections, ended when it stops; shared too.
    """

    protocol: str
    clock: IReactorTime
    limits: Limits
    tls: IOpenSSLServerConnectionCreator  # a ListenerTLS
    implicit_tls: bool
    authenticator: IAuthenticator
    backend: BackendConnector
    hostname: str
    gatekeeper: Gatekeeper
    idle: IdleSessions
    connections: OpenConnections


class LoginOutcome(enum.Enum):
    """How a login ended, for the protocol subclass to word its reply."""

    REJECTED = "rejected"        # bad credentials, whatever the cause; reply after the failure pause
    UNAVAILABLE = "unavailable"  # the backend failed; a temporary error, never an auth failure
    REFUSED = "refused"          # the backend, up, refused the session (POP3 [IN-USE], relayed; IMAP NO [LIMIT])
    THROTTLED = "throttled"      # the client's address used up its failed logins; the connection closes
    OVERLOADED = "overloaded"    # the user has too many sessions; the connection closes
    LOGGED_IN = "logged-in"      # the backend session is ready; after the reply the connection relays


class SaslFailure(enum.Enum):
    """Why a SASL exchange ended without credentials."""

    UNKNOWN_MECHANISM = "unknown-mechanism"
    CANCELLED = "cancelled"
    MALFORMED = "malformed"  # a response that does not decode: a protocol error
    REFUSED = "refused"  # decoded, but no credentials: failed as wrong ones are, with nothing checked


class _Phase(enum.Enum):
    COMMANDS = "commands"
    LOGGING_IN = "logging-in"
    LOGGING_IN_LATE = "logging-in-late"  # past the login deadline: closes once answered
    RELAYING = "relaying"  # a blind byte relay (IMAP, POP3)
    SESSION = "session"    # logged in, commands still parsed (submission)
    CLOSED = "closed"


# A browser's request line, whole: an IMAP command may have the tag GET or POST.
_HTTP_REQUEST = re.compile(rb"^((GET|POST|HEAD|PUT|DELETE|OPTIONS|CONNECT|PATCH|TRACE) \S+ HTTP/|[Hh][Oo][Ss][Tt]:)")


USER_KEY_LENGTH = 64
"""
Longer user names are counted by a digest (128 bits): no client grows the tables or messages with
its names. The penalty tables hold up to 100,000 keys each, which names of 256 characters made
about 200 MB.
"""


def user_key(user: str) -> str:
    """
    What a user is counted as (penalties, sessions): case-insensitive, since stores such as
    Dovecot (%Lu) take every spelling of a name for the same account.
    """
    key = user.casefold()
    if len(key) > USER_KEY_LENGTH:
        return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return key


@implementer(IHandshakeListener, ITLSEndListener)
class LoginFrontEnd(slots.TwistedDefaults, LineReceiver, TimeoutMixin):
    """
    One client connection before and after login; subclassed once per protocol.

    Subclasses implement L{greet}, L{command_line} and the C{reply_*} hooks, and call
    L{send}, L{close}, L{command_succeeded}, L{command_failed}, L{start_tls}, L{start_sasl}
    and L{log_in}.
    """

    # One per connection, for as long as it lasts: its attributes in slots, not a dict (about 1 KiB less
    # per session), and Twisted's too (see gateway.slots).
    __slots__ = (
        *slots.LINE_RECEIVER, *slots.TIMEOUT_MIXIN,
        "context", "clock", "callLater", "MAX_LENGTH", "secure", "user", "login_failures", "_errors",
        "_phase", "_deadline", "_pending", "_session", "_closing", "_admitted", "_lost",
        "_backend_started", "_session_user", "_sasl", "backend_refusal", "_splice", "idle_deadline",
        "idle_slot", "_started", "_bytes_in", "_bytes_out", "_tls_from", "client"
    )

    # Lines end in LF; a CR before it is dropped, so clients that send bare LF still work.
    delimiter = b"\n"

    def __init__(self, context: FrontEndContext) -> None:
        self.context = context
        self.clock = context.clock
        self.callLater = context.clock.callLater  # type: ignore[method-assign,assignment]  # TimeoutMixin's timer source
        self.MAX_LENGTH = context.limits.line_length + 1  # room for the CR
        self.secure = context.implicit_tls
        self.user: str | None = None
        self.login_failures = 0
        self._errors = 0
        self._phase = _Phase.COMMANDS
        self._deadline: IDelayedCall | None = None
        self._pending: Deferred[Any] | None = None  # whatever is in flight, to cancel
        self._session: BackendLogin | None = None
        self._closing: GracePeriod | None = None
        self._admitted = False
        self._lost = False
        self._backend_started = 0.0
        self._session_user: str | None = None  # counted against the user's session limit
        self._sasl: SaslExchange | None = None
        self.backend_refusal = b""
        self._splice: Splice | None = None
        self.idle_deadline = 0.0  # while relaying: closed if silent until then (see gateway.idle)
        self.idle_slot: int | None = None
        self._started = 0.0
        self._bytes_in = 0
        self._bytes_out = 0
        # What had been written when a TLS handshake still to complete began (None: none is pending).
        self._tls_from: int | None = 0 if context.implicit_tls else None
        self.client = ClientAddress("", 0, "", 0, "")

    # -- connection lifecycle

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.context.connections.add(self)
        peer, host = self.transport.getPeer(), self.transport.getHost()
        self.client = ClientAddress(address_host(peer), getattr(peer, "port", 0),
                                    address_host(host), getattr(host, "port", 0), new_session_id())
        self._started = time.monotonic()
        tune(self.transport)
        admitting = self.context.gatekeeper.admit(self.client.host)
        waiting = not admitting.called
        if waiting:
            # Nothing is read until the gatekeeper has answered: a worker asks its supervisor. A
            # supervisor that does not answer must not leave the connection held for ever.
            self.transport.pauseProducing()  # type: ignore[attr-defined]
            self.setTimeout(self.context.limits.idle_timeout)
        admitted = admitting.addCallback(self._admission)
        if waiting:
            # Only once greeted: a resume may hand over bytes at once (those a PROXY header brought).
            admitted.addCallback(self._resume_admitted)
        admitted.addErrback(self._gatekeeper_failed)

    def _admission(self, refused: str | None) -> None:
        if self._lost or self.closed:
            if refused is None:  # the client left, or was timed out, while the answer was on its way
                self.context.gatekeeper.release(self.client.host)
            return
        if refused is not None:
            self.log_event(log.warn, "connection_refused", "limit={limit}", limit=refused)
            self.reply_overloaded()
            self.close()
            return
        self._admitted = True
        self.setTimeout(self.context.limits.idle_timeout)
        self._deadline = self.clock.callLater(self.context.limits.login_timeout, self._deadline_passed)
        if not self._unheard_balancer():
            self._log_connect()
        if self.context.connections.stopping:
            self.shut_down()  # accepted before the stop began, but its PROXY header came after
            return
        self.greet()

    def _unheard_balancer(self) -> bool:
        """
        Whether this is the load balancer's own connection (L{balancers_own}: a health check) that
        has not sent a byte: served, but not logged or counted as a client's. HAProxy also sends
        its LOCAL header for a client it cannot name (one on a UNIX socket), so one that speaks
        is logged from then on, as a client at the balancer's address.
        """
        return not self._bytes_in and balancers_own(self.transport)

    def _log_connect(self) -> None:
        self.log_event(log.info, "connect", "port={client_port} listener={listener} tls={tls}",
                       client_port=self.client.port, listener=self.client.local_port,
                       tls="implicit" if self.secure else "none")

    def _log_tls(self) -> None:
        described = describe_tls(self.transport)
        if described is not None:
            self.log_event(log.info, "tls", "version={version} cipher={cipher}", version=described[0],
                           cipher=described[1])

    def _resume_admitted(self, _: None) -> None:
        if self._admitted and not (self._lost or self.closed):
            assert self.transport is not None
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def _gatekeeper_failed(self, failure: Failure) -> None:
        # Only a worker whose supervisor is gone gets here; it is about to stop.
        self.log_event(log.critical, "gatekeeper_failed", log_failure=failure)
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def handshakeCompleted(self) -> None:
        self._tls_from = None
        if not self._unheard_balancer():
            self._log_tls()

    def tlsEnded(self) -> None:
        """
        The client ended TLS while relayed: the relay ends, and the client has the grace period
        (L{close}) to take what it was sent, not the relay's idle timeout.
        """
        if self._splice is not None:
            self._splice.close()

    def connectionLost(self, reason: Failure = Failure(CancelledError())) -> None:
        if self._lost:
            return  # counted and logged once, however often a transport reports it
        self._lost = True
        try:
            self._wind_up(reason)
        finally:
            self.context.connections.discard(self)  # last: a stop waiting for it ends after its lines

    def _wind_up(self, reason: Failure) -> None:
        """Once the connection is lost: cancel what was under way, give back what was counted, log its end."""
        phase, self._phase = self._phase, _Phase.CLOSED
        self.setTimeout(None)
        self._cancel_deadline()
        if self._closing is not None:
            self._closing.cancel()
        if self._pending is not None:
            self._pending.cancel()  # a login still running
        self.context.idle.forget(self)
        if self._session_user is not None:
            self.context.gatekeeper.close_session(self._session_user)
            self._session_user = None
        if not self._admitted:
            return  # refused at connect, or not yet answered: counted nowhere, logged already
        self.context.gatekeeper.release(self.client.host)
        # What was written for a handshake that never completed (a greeting, say) was never delivered.
        bytes_in, bytes_out = self._bytes_in, self._bytes_out if self._tls_from is None else self._tls_from
        if self._splice is not None:
            self._splice.client_lost()
            bytes_in += self._splice.from_client_bytes
            bytes_out += self._splice.from_backend_bytes
        failed = tls_failure(reason)
        if failed is not None:  # a client refusing the certificate or the TLS versions says so only here
            self.log_event(log.info, "tls_failed", "error={error}", error=loggable_text(failed))
        if self._unheard_balancer():
            # A health check: a line for each (every 2 s per server and balancer) would drown the
            # clients' lines.
            return
        self.log_event(log.info, "disconnect",
                       "user={user} state={state} in={bytes_in} out={bytes_out} duration={duration:.3f}",
                       user=loggable_text(self.user or ""),
                       # A relayed session is logged as one, however the relay ended (close() marks it CLOSED).
                       state=_Phase.RELAYING.value if self._splice is not None else phase.value,
                       bytes_in=bytes_in, bytes_out=bytes_out, duration=time.monotonic() - self._started)

    def log_event(self, emit: Callable[..., None], event: str, details: str = "", **fields: object) -> None:
        """Log a line about this connection (see L{_log_client_event}); C{emit} is a module's C{log.info}, say."""
        _log_client_event(emit, self.context.protocol, self.client, event, details, **fields)

    # -- reading

    def dataReceived(self, data: bytes) -> None:
        if self._phase is _Phase.CLOSED:
            return  # closing: whatever still arrives is not answered
        if self._splice is not None:
            # Relaying: straight to the splice, which counts them (LineReceiver's resumeProducing
            # feeds an empty read, which has nothing to relay).
            if data:
                self._splice.from_client(data)
            return
        if data and self._admitted and self._unheard_balancer():
            self._log_connect()  # late, as its TLS line: the balancer's connection relays a client after all
            self._log_tls()
        self._bytes_in += len(data)
        self.resetTimeout()
        if self.paused and not self._reads_ahead(len(data)):
            # A backpressure resume must not undo a pause that waits for a login or a reply.
            assert self.transport is not None
            self.transport.pauseProducing()  # type: ignore[attr-defined]
        super().dataReceived(data)

    def _reads_ahead(self, arriving: int) -> bool:
        """
        Whether the transport keeps reading while lines wait: during a login whose password the
        gateway checks itself, until a line's worth is buffered, so that a client hanging up is
        noticed and cancels its login (a hash still queued, the backend login) instead of leaving
        them to run for nobody. Where the backend decides, the login runs on to its answer: cut
        short, it would have to count as a failure (L{_abandoned_guess}), even for a right password.
        """
        return (self._phase in (_Phase.LOGGING_IN, _Phase.LOGGING_IN_LATE)
                and not self.context.authenticator.backend_decides
                and len(self._buffer) + arriving <= self.context.limits.line_length)

    def lineReceived(self, line: bytes) -> None:
        if write_backlog(self.transport) > MAX_UNREAD_REPLIES:
            self.log_event(log.warn, "replies_unread")
            self.close()
            return
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self.context.limits.line_length:
            self.lineLengthExceeded(line)
            return
        if self._phase is _Phase.COMMANDS and _HTTP_REQUEST.match(line):
            # ALPACA: a browser tricked into talking HTTP to a mail port gets nothing back.
            self.log_event(log.warn, "http_on_mail_port")
            self.close()
            return
        if self._sasl is not None:
            exchange, self._sasl = self._sasl, None
            self._sasl_step(exchange, lambda: exchange.respond(line))
        else:
            self.command_line(line)

    def rawDataReceived(self, data: bytes) -> None:
        assert self._splice is not None, "raw mode before the relay belongs to the subclass"
        self._splice.from_client(data)

    def back_to_lines(self, rest: bytes) -> None:
        """
        Leave a subclass's raw mode (an IMAP literal) and parse C{rest} as lines again.
        C{rest} was already counted and timed when it arrived, so it bypasses L{dataReceived}.
        """
        self.setLineMode()
        if rest:
            LineReceiver.dataReceived(self, rest)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.reply_line_too_long(line)
        self.close()

    def timeoutConnection(self) -> None:
        if not self._admitted:
            # The gatekeeper (a worker's supervisor) has not answered: the gateway is the slow one.
            self.log_event(log.warn, "timeout", "reason=admission")
            self.reply_overloaded()
        else:
            self.log_event(log.info, "timeout", "reason=idle")
            self.reply_timeout()
        self.close()

    def shut_down(self) -> None:
        """
        The process is stopping: a relayed session is closed both ways, with what the gateway holds
        for the client written and nothing injected; any other connection is told why, and closed.
        """
        if self.closed:
            return  # closing already
        if self._splice is not None:
            self._splice.close()
            return
        self.reply_shutting_down()
        self.close()

    def drop(self) -> None:
        """The stop's grace period is over: the connection goes now, whatever it still holds."""
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def idle_expired(self) -> None:
        """The relay has been silent both ways for its idle timeout (called by L{IdleSessions})."""
        self.log_event(log.info, "timeout", "reason=relay-idle")
        # Nothing may be injected into a relayed stream: just close both sides.
        assert self._splice is not None
        try:
            self._splice.close()
        except BaseException:
            # The wheel no longer watches this session: left open, it would stay open for ever.
            self._splice.abort()
            raise

    def _relay_active(self) -> None:
        self.idle_deadline = self.clock.seconds() + self.context.limits.relay_idle_timeout

    def _deadline_passed(self) -> None:
        if self._phase is _Phase.LOGGING_IN:
            # The gateway is the slow one (the hash, the backend, the failure pause): the login in
            # flight gets its answer, such as NO [UNAVAILABLE] for a backend that never answered,
            # and the connection then closes unless it logged in (see _login_finished). For as long
            # as the backend may take and then an idle timeout, not more: a hash queued behind a
            # flood, or a supervisor that does not answer, must not hold the connection for ever.
            self._phase = _Phase.LOGGING_IN_LATE
            late = self.context.backend.settings.timeout + self.context.limits.idle_timeout
            self._deadline = self.clock.callLater(late, self._deadline_passed)
            return
        self._deadline = None
        self._login_timed_out(self.reply_timeout)

    def _login_timed_out(self, notify: Callable[[], None]) -> None:
        self.log_event(log.info, "timeout", "reason=login-deadline")
        notify()
        self.close()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    # -- for subclasses: writing and closing

    def send(self, data: bytes) -> None:
        """Write protocol bytes to the client."""
        self._bytes_out += len(data)
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        """
        Close the connection after what was written has been sent; nothing more is answered.
        Reading goes on (and is discarded), since a TLS close waits for the client's own
        close_notify; a client that never sends it is cut off after L{gateway.relay.CLOSE_GRACE} seconds.
        """
        if self._lost or (self._phase is _Phase.CLOSED and self._closing is not None):
            return  # gone, or closing already
        self._phase = _Phase.CLOSED
        self.setTimeout(None)
        self._cancel_deadline()
        self.context.idle.forget(self)  # a relay closing (its backend gone) is not timed out as well
        if self._pending is not None:
            self._pending.cancel()  # a login still running must not answer on a closed connection
        self.paused = True  # LineReceiver: deliver no more lines, but keep the transport reading
        self.clearLineBuffer()
        assert self.transport is not None
        self.transport.resumeProducing()  # type: ignore[attr-defined]
        self._closing = close_with_grace(self.transport, self.clock)

    def command_succeeded(self) -> None:
        """A command was valid: the run of consecutive errors is broken."""
        self._errors = 0

    def command_failed(self) -> None:
        """A command was malformed or not allowed; too many in a row close the connection."""
        self._errors += 1
        if self._errors >= self.context.limits.errors:
            self.log_event(log.info, "too_many_errors")
            self.reply_too_many_errors()
            self.close()

    @property
    def closed(self) -> bool:
        """True once the connection is closing; nothing more is read or answered."""
        return self._phase is _Phase.CLOSED

    @property
    def in_sasl_exchange(self) -> bool:
        """True while the client's lines are SASL responses (see L{start_sasl})."""
        return self._sasl is not None

    # -- for subclasses: STARTTLS

    def start_tls(self) -> None:
        """
        Switch to TLS after the protocol's positive reply has been written. Bytes the client
        pipelined after the STARTTLS command arrived in clear: they are dropped, never run.
        """
        dropped = self.clearLineBuffer()
        if dropped:
            self.log_event(log.info, "starttls_discarded", "bytes={count}", count=len(dropped))
        self.secure = True
        self._tls_from = self._bytes_out
        assert self.transport is not None
        self.transport.startTLS(self.context.tls)  # type: ignore[attr-defined]

    # -- for subclasses: logging in

    @property
    def may_log_in(self) -> bool:
        """True when the connection is secure; logins in clear are refused."""
        return self.secure

    def start_sasl(self, mechanism: bytes, initial_response: bytes | None) -> None:
        """
        Begin a SASL exchange (IMAP AUTHENTICATE, POP3 AUTH, SMTP AUTH). Until it ends, lines from
        the client are SASL responses; it ends in L{reply_sasl_failed} or in a login.

        :param initial_response: the base64 text given on the command line, if any.
        """
        try:
            exchange = begin(mechanism)
        except SaslError:
            self.reply_sasl_failed(SaslFailure.UNKNOWN_MECHANISM)
            self.command_failed()
            return
        self._sasl_step(exchange, lambda: exchange.start(initial_response))

    def start_auth(self, argument: bytes) -> None:
        """
        L{start_sasl} from the argument of a POP3 or SMTP AUTH: a mechanism, then maybe a space
        and an initial response. Spaces around the response, which Dovecot and Postfix take, are
        no part of it.
        """
        mechanism, _, initial = argument.partition(b" ")
        self.start_sasl(mechanism, initial.strip(b" ") or None)

    def _sasl_step(self, exchange: SaslExchange, step: Callable[[], Challenge | Credentials]) -> None:
        try:
            result = step()
        except SaslCancelled:
            self.reply_sasl_failed(SaslFailure.CANCELLED)
            self.command_failed()
            return
        except SaslError:
            self.reply_sasl_failed(SaslFailure.MALFORMED)
            self.command_failed()
            return
        except SaslRefused:
            self.reply_sasl_failed(SaslFailure.REFUSED)
            self.command_failed()
            return
        if isinstance(result, Challenge):
            self._sasl = exchange
            self.reply_challenge(encode_challenge(result.data))
        else:
            self.log_in(result.user, result.password, result.authzid)

    def log_in(self, user: str, password: bytes, authzid: str = "") -> None:
        """
        Check the credentials, then log in to the backend, then word the outcome with
        L{reply_login}: relay after L{LoginOutcome.LOGGED_IN}, otherwise read the next command
        (or close once the failed attempts are used up). Commands the client pipelined meanwhile
        wait. Every kind of rejection is reported after the same failure pause.

        :param authzid: a SASL authorization identity; any other than the user itself is refused.
        """
        assert self.may_log_in and self._phase is _Phase.COMMANDS
        self.command_succeeded()
        self._phase = _Phase.LOGGING_IN
        self.paused = True  # LineReceiver: what follows waits
        if not self._reads_ahead(0):
            assert self.transport is not None
            self.transport.pauseProducing()  # type: ignore[attr-defined]
        # The server is the slow one now (hashing, the backend): no idle timeout, and a deadline that
        # passes meanwhile waits for this login's answer.
        self.setTimeout(None)
        started = self.clock.seconds()
        checking = self.context.gatekeeper.check_login(user_key(user), self.client.host)
        self._pending = checking  # first: the callbacks below may all run at once, and clear it
        # Twisted's types cannot say that an errback's Deferred is waited for, as a callback's is.
        (checking.addCallback(self._verify, user, password, authzid)
         .addCallback(self._logged_in, user)
         .addErrback(self._not_logged_in, user, password, started)
         .addCallback(self._login_finished)  # type: ignore[call-overload]
         .addErrback(self._login_broken))

    def _login_finished(self, outcome: LoginOutcome) -> None:
        self._pending = None  # nothing left to cancel; not kept for the rest of a session
        if self.closed:
            return
        self.setTimeout(self.context.limits.idle_timeout)
        self.reply_login(outcome)
        if outcome is LoginOutcome.LOGGED_IN:
            assert self._session is not None
            self.logged_in(self._session)
        elif outcome in (LoginOutcome.THROTTLED, LoginOutcome.OVERLOADED) or self.attempts_exhausted:
            self.close()  # its reply said so
        elif self._phase is _Phase.LOGGING_IN_LATE:
            self._cancel_deadline()
            self._login_timed_out(self.reply_closing_after_login)  # the deadline passed while it was in flight
        else:
            self._phase = _Phase.COMMANDS
            self.resumeProducing()

    def _login_broken(self, failure: Failure) -> None:
        if failure.check(CancelledError):
            return  # the client went away; connectionLost has cleaned up
        self.log_event(log.critical, "login_handling_failed", log_failure=failure)
        self.close()

    def _verify(self, check: LoginCheck, user: str, password: bytes, authzid: str) -> Deferred[BackendLogin]:
        if check.throttled:
            raise _Throttled()
        # Only what counting needs: a check queued behind others must not keep the connection alive.
        context, client = self.context, self.client
        verifying = context.authenticator.verify(user, password,
                                                 lambda: _wrong_unanswered(context, client, user, password))
        return verifying.addCallback(self._verified, user, password, authzid, check.sessions_full)

    def _verified(self, good: bool, user: str, password: bytes, authzid: str,
                  sessions_full: bool) -> Deferred[BackendLogin]:
        if not good or (authzid and authzid != user):
            raise _BadCredentials("credentials")
        if self.context.authenticator.backend_decides:
            # Counted only once the backend has accepted: guesses must not take the user's slots,
            # nor learn that the user is at the limit, which only the right password may tell.
            logging_in = self._backend_login(user, password)
            # A backend answers a failure only after its own pause (Dovecot's auth_failure_delay),
            # and success at once: a guesser that hangs up before the answer has learned enough.
            logging_in.addErrback(_abandoned_guess, self.context, self.client, user, password)
            return logging_in
        if sessions_full:
            raise _TooManySessions()
        opening = self.context.gatekeeper.open_session(user_key(user))
        return (opening.addCallback(self._session_opened, user)
                .addCallback(lambda _: self._backend_login(user, password)))

    def _backend_login(self, user: str, password: bytes) -> Deferred[BackendLogin]:
        backend = self.context.backend.settings
        if backend.login != "replay" and not user:
            # The gateway's own account would speak for itself (a master login with no authorization
            # identity, XCLIENT LOGIN= empty). The users file holds no empty name: never reached.
            return fail(BackendUnavailable("an empty user name for a master or XCLIENT login"))
        helo = self.client_helo()
        if backend.login == "master":
            assert backend.master_user is not None and backend.master_password is not None
            request = LoginRequest(user, backend.master_password, self.client, backend.master_user, helo)
        elif backend.login == "xclient":
            # The MTA trusts the gateway's word: no password kept.
            request = LoginRequest(user, b"", self.client, client_helo=helo)
        else:
            request = LoginRequest(user, password, self.client, client_helo=helo)
        self._backend_started = self.clock.seconds()
        return self.context.backend.login(request)

    def _session_opened(self, opened: bool, user: str) -> None:
        if not opened:
            raise _TooManySessions()
        self._session_user = user_key(user)

    def _logged_in(self, session: BackendLogin, user: str) -> Deferred[LoginOutcome] | LoginOutcome:
        if not self.context.authenticator.backend_decides:
            return self._accepted(session, user)
        opening = self.context.gatekeeper.open_session(user_key(user))
        return (opening.addCallback(self._session_opened, user)
                .addCallbacks(lambda _: self._accepted(session, user), self._session_refused,
                              errbackArgs=(session, user)))

    def _session_refused(self, failure: Failure, session: BackendLogin, user: str) -> LoginOutcome:
        assert session.transport is not None
        session.transport.abortConnection()  # type: ignore[attr-defined]
        failure.trap(_TooManySessions)
        self.log_event(log.warn, "too_many_sessions", "user={user}", user=loggable_text(user))
        return LoginOutcome.OVERLOADED

    def _accepted(self, session: BackendLogin, user: str) -> LoginOutcome:
        if session.lost:
            # Gone while the session was counted: telling the client OK would relay to nothing.
            raise BackendUnavailable("connection lost before the relay began")
        self.user = user
        self._session = session
        self.context.gatekeeper.succeeded(user_key(user), self.client.host)
        self.log_event(log.info, "login", "user={user} backend_ms={backend_ms:.1f}", user=loggable_text(user),
                       backend_ms=1000 * (self.clock.seconds() - self._backend_started))
        return LoginOutcome.LOGGED_IN

    def _not_logged_in(self, failure: Failure, user: str, password: bytes,
                       started: float) -> Deferred[LoginOutcome] | LoginOutcome:
        failure.trap(_BadCredentials, BackendRejected, BackendUnavailable, BackendRefused, _TooManySessions,
                     _Throttled)
        if self._session_user is not None:
            self.context.gatekeeper.close_session(self._session_user)
            self._session_user = None
        auth = self.context.authenticator
        if failure.check(_Throttled):
            self.log_event(log.info, "login_refused", "user={user} reason=throttled", user=loggable_text(user))
            return LoginOutcome.THROTTLED
        if failure.check(_TooManySessions):
            self.log_event(log.warn, "too_many_sessions", "user={user}", user=loggable_text(user))
            return LoginOutcome.OVERLOADED
        if failure.check(BackendRefused):
            self.backend_refusal = failure.value.reply
            self.log_event(log.info, "backend_refused", "user={user} reply={reply}", user=loggable_text(user),
                           reply=self.backend_refusal.decode("ascii", "replace"))
            return LoginOutcome.REFUSED
        # With a local database a backend refusal is the backend's fault, never the client's.
        if failure.check(BackendUnavailable) or (failure.check(BackendRejected) and not auth.backend_decides):
            self.log_event(log.warn, "backend_unavailable", "user={user} backend={backend} reason={reason}",
                           user=loggable_text(user), backend=self.context.backend.address,
                           reason=failure.getErrorMessage())
            return LoginOutcome.UNAVAILABLE
        self.login_failures += 1
        counting = _count_failure(self.context, self.client, user, password,
                                  "backend-refused" if failure.check(BackendRejected) else "credentials")
        return (counting.addCallback(lambda count: deferLater(self.clock, max(0.0, started + count.delay - self.clock.seconds())))
                .addCallback(lambda _: LoginOutcome.REJECTED))

    def backend_session(self) -> BackendLogin:
        """The logged-in backend session; valid from L{LoginOutcome.LOGGED_IN} on."""
        assert self._session is not None
        return self._session

    @property
    def attempts_exhausted(self) -> bool:
        """True when the client has used up its failed logins on this connection."""
        return self.login_failures >= self.context.limits.login_attempts

    def logged_in(self, session: BackendLogin) -> None:
        """
        The backend session is ready and the client has its reply. By default the connection
        becomes a blind byte relay; a protocol that keeps parsing commands overrides this and
        calls L{begin_session}.
        """
        self._phase = _Phase.RELAYING
        self._cancel_deadline()
        # The relay has its own, longer idle timeout, kept by one timer for all sessions; bytes
        # either way keep the session alive.
        self.setTimeout(None)
        self._relay_active()
        self.context.idle.watch(self)
        assert self.transport is not None and session.transport is not None
        self._splice = Splice(self.transport, session.transport, self.clock, self._relay_active, self.close)
        session.attach(self._splice)
        # What the client pipelined after its login belongs to the backend; counted when it was
        # read, it is counted again by the splice.
        self._bytes_in -= hand_over(self, self._splice.from_client)

    def begin_session(self, idle_timeout: float) -> None:
        """Logged in, commands still parsed: the login deadline ends, a post-login idle timeout starts."""
        self._phase = _Phase.SESSION
        self._cancel_deadline()
        self.setTimeout(idle_timeout)
        self.resumeProducing()

    # -- hooks for the protocol subclass

    def greet(self) -> None:
        """Write the greeting."""
        raise NotImplementedError

    def command_line(self, line: bytes) -> None:
        """Handle one line (without its line ending and never longer than the limit) from the client."""
        raise NotImplementedError

    def reply_line_too_long(self, line: bytes) -> None:
        """Tell the client its line was too long; the connection closes after.

        :param line: what was read of the line (at least the limit), its command first.
        """
        raise NotImplementedError

    def reply_timeout(self) -> None:
        """Tell the client it took too long; the connection closes after."""
        raise NotImplementedError

    def reply_overloaded(self) -> None:
        """Tell a connecting client that a limit refuses it (instead of the greeting); it closes after."""
        raise NotImplementedError

    def reply_shutting_down(self) -> None:
        """Tell the client that the gateway is stopping (L{shut_down}); it closes after."""
        raise NotImplementedError

    def reply_closing_after_login(self) -> None:
        """
        Tell the client, whose login was answered past the login deadline, that the connection now
        closes. By default the timeout's own notice; a protocol without unsolicited replies overrides it.
        """
        self.reply_timeout()

    def client_helo(self) -> bytes | None:
        """The name the client gave in SMTP's EHLO, for the backend login (L{LoginRequest.client_helo}); else None."""
        return None

    def reply_too_many_errors(self) -> None:
        """Tell the client it made too many errors; the connection closes after."""
        raise NotImplementedError

    def reply_challenge(self, challenge: bytes) -> None:
        """Send a SASL challenge, already base64-encoded."""
        raise NotImplementedError

    def reply_sasl_failed(self, reason: SaslFailure) -> None:
        """Tell the client its SASL exchange failed (not a login failure: no credentials came)."""
        raise NotImplementedError

    def reply_login(self, outcome: LoginOutcome) -> None:
        """
        Word the outcome of a login. For L{LoginOutcome.REFUSED} the backend's reason is in
        C{backend_refusal}; when L{attempts_exhausted} the connection closes after this reply.
        """
        raise NotImplementedError


def _log_client_event(emit: Callable[..., None], protocol: str, client: ClientAddress, event: str, details: str = "",
                      **fields: object) -> None:
    """
    Log a line about one client's connection: the event's name, the protocol and client, then
    C{details} (a format of C{fields}), then the session's name, which makes every line of one
    connection (and Dovecot's lines for it) one C{grep} away, however many clients share an address.

    :param emit: the level's method of the logger whose namespace the line takes (the metrics
        tell events apart by it), such as C{log.info}; a C{log_failure} field adds a traceback.
    """
    middle = f" {details}" if details else ""
    emit(f"{event} protocol={{protocol}} client={{client}}{middle} session={{session}}",
         protocol=protocol, client=client.host, session=client.session, **fields)


def _count_failure(context: FrontEndContext, client: ClientAddress, user: str, password: bytes,
                   reason: str) -> Deferred[FailureCount]:
    """
    Count a failed login, then log it. C{repeat=yes} marks the same wrong password again from the
    same client, which the penalties do not count (a device retrying a stale password): the
    fail2ban filter skips it too. A count that fails is logged as C{repeat=no}, and fails on.
    """
    def logged(count: FailureCount | Failure) -> FailureCount | Failure:
        repeated = isinstance(count, FailureCount) and count.repeated
        _log_client_event(log.info, context.protocol, client, "login_failed",
                          "user={user} reason={reason} repeat={repeat}",
                          user=loggable_text(user), reason=reason, repeat="yes" if repeated else "no")
        return count

    return context.gatekeeper.failed(user_key(user), client.host, password).addBoth(logged)


def _wrong_unanswered(context: FrontEndContext, client: ClientAddress, user: str, password: bytes,
                      reason: str = "credentials") -> None:
    """
    A wrong password whose login ended (its client gone, its deadline passed) while the hash ran:
    counted and logged as any failed login, or a guesser that never waits for the answer would
    never be slowed or stopped. (A check cancelled before its hash started costs nothing, tells
    nothing, and is not counted.)
    """
    counting = _count_failure(context, client, user, password, reason)
    counting.addErrback(lambda failure: log.failure("counting a failed login failed", failure))


def _abandoned_guess(failure: Failure, context: FrontEndContext, client: ClientAddress, user: str,
                     password: bytes) -> Failure:
    """
    A login the backend decides, ended (its connection closed) before the backend answered:
    counted as a failure, since the client may have taken the missing answer for one. A right
    password lost this way costs its address and its user one failure for the penalty window.
    """
    # Ended by the gateway's own stop, it tells nothing of the client (fail2ban would count it).
    if failure.check(CancelledError) and not context.connections.stopping:
        _wrong_unanswered(context, client, user, password, reason="abandoned")
    return failure


class _BadCredentials(Exception):
    """The local check found the credentials wrong."""


class _TooManySessions(Exception):
    """The user holds as many sessions as allowed."""


class _Throttled(Exception):
    """The client address has used up its failed logins for now."""


class FrontEndFactory(ServerFactory):
    """
    Builds one protocol's front-end connections for one listener.

    :param front_end: makes a connection's protocol from the shared context (a front-end class,
        or a function that adds protocol-specific collaborators).
    """

    noisy = False  # connections are logged by the front end itself

    def __init__(self, front_end: Callable[[FrontEndContext], LoginFrontEnd], context: FrontEndContext) -> None:
        self._front_end = front_end
        self.context = context

    def buildProtocol(self, addr: object) -> LoginFrontEnd:
        front = self._front_end(self.context)
        front.factory = self
        return front
