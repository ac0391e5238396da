"""
Connecting to the plaintext store and logging in there on the client's behalf.

L{BackendConnector} is protocol-neutral: it opens the connection (with TLS when configured),
runs a protocol-specific L{BackendLogin} dialogue under one deadline, and hands back the
logged-in protocol, ready to be spliced to the client. Every way the backend can fail ends in
L{BackendUnavailable}, except a refusal of the credentials, which is L{BackendRejected}.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectError, ConnectionClosed
from twisted.internet.interfaces import (
    IConnector,
    IOpenSSLClientConnectionCreator,
    IProtocolFactory,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway import slots
from gateway.addresses import host_port, parse_ip
from gateway.config import BackendSettings
from gateway.relay import GracePeriod, Splice, close_with_grace, hand_over
from gateway.sockets import tune
from gateway.tls import ITLSEndListener, client_tls


log = Logger()


class BackendUnavailable(Exception):
    """The backend could not be reached, timed out or failed; the message is for the log only."""


class BackendRejected(Exception):
    """The backend refused the credentials; the message is for the log only."""


class BackendRefused(Exception):
    """
    The backend, which is up, accepted the credentials but refused the session: POP3
    C{[IN-USE]} or C{[LOGIN-DELAY]}, which the client must see as the backend said it, or IMAP
    C{NO [LIMIT]} and its like, which the client is told as unavailability.

    :ivar reply: the backend's reply, printable ASCII, safe to relay and to log (POP3: its text; IMAP:
        its status and code alone).
    """

    def __init__(self, reply: bytes) -> None:
        super().__init__("backend refused the session")
        self.reply = reply


def printable(text: bytes) -> bytes:
    """A backend's reply text made safe to relay to a client or to log: printable ASCII, at most 200 bytes."""
    return bytes(byte if 0x20 <= byte < 0x7F else 0x3F for byte in text[:200])


def login_answer(status: bytes, code: bytes | None) -> str:
    """
    A backend's answer to a login as the log shows it: its status and response code (C{NO
    [AUTHENTICATIONFAILED]}, C{-ERR [AUTH]}), not its text, which a backend might build from what
    it was sent (as for an MTA's answer to AUTH).
    """
    shown = printable(status).decode("ascii")
    return f"{shown} [{printable(code).decode('ascii')}]" if code else shown


@dataclass(frozen=True, slots=True)
class ClientAddress:
    """
    Where a client connected from and to, and the name of its session, for logs and for
    forwarding to the backend.

    :ivar session: names every log line of one connection; Dovecot logs it too, as C{session=<...>},
        when the gateway forwards the client's address.
    """

    host: str
    port: int
    local_host: str
    local_port: int
    session: str


def new_session_id() -> str:
    """A session's name: 72 random bits in 12 characters of base64url; in practice no two are alike."""
    return secrets.token_urlsafe(9)


@dataclass(frozen=True)
class LoginRequest:
    """
    One login to perform on the backend.

    :ivar user: the user to log in as (the client's user; with a master login, the one to impersonate).
    :ivar password: the client's password, or the master password.
    :ivar master_user: set for a master login: the account that logs in on behalf of C{user}.
    :ivar client_helo: the name the client gave in SMTP's EHLO, for an MTA told that the session
        is the client's (XCLIENT): its Received header names the client's EHLO, not the gateway's.
        None in the other protocols.
    """

    user: str
    password: bytes = field(repr=False)
    client: ClientAddress
    master_user: str | None = None
    client_helo: bytes | None = None


@implementer(ITLSEndListener)
class BackendLogin(slots.TwistedDefaults, LineReceiver):
    """
    Base of the protocol-specific login dialogues with the backend.

    A subclass talks the protocol in C{lineReceived} and ends with L{succeed} or L{fail}. After
    success the protocol holds still until L{attach} splices it to the client.

    :ivar result: fires with this protocol once logged in, or fails with L{BackendUnavailable}
        or L{BackendRejected}; None once relaying, spent (with its canceller, about 0.3 KB that
        the session would otherwise keep).
    :ivar capabilities: what the backend offers after login, as the subclass found out.
    :ivar announced: what the backend offered before login, once the subclass has asked.
    :ivar notices: lines of the client's protocol that the backend asked, during the login, to be
        shown to the user (IMAP's ALERTs), for the front end to send before its reply to a login
        that succeeded, and then to drop.
    :ivar lost: True once the connection is gone.
    :ivar address_not_forwarded: why the backend did not take the client's address (POP3
        C{XCLIENT}) though the settings forward it; None otherwise.
    :ivar request: what to log in as; None once relaying, so that the password is not kept for
        as long as the session lasts.
    """

    # One per session, for as long as it lasts: its attributes, and Twisted's, in slots (see LoginFrontEnd).
    __slots__ = (*slots.LINE_RECEIVER,
                 "request", "settings", "tls", "capabilities", "announced", "notices", "result", "_splice", "lost", "_closing",
                 "address_not_forwarded")

    MAX_LENGTH = 65536

    def __init__(self, request: LoginRequest | None, settings: BackendSettings,
                 tls: IOpenSSLClientConnectionCreator | None) -> None:
        self.request: LoginRequest | None = request
        self.settings = settings
        self.tls = tls
        self.capabilities: tuple[bytes, ...] = ()
        self.announced: tuple[bytes, ...] | None = None
        self.notices: tuple[bytes, ...] = ()
        self.result: Deferred[BackendLogin] | None = Deferred(lambda d: self._abort())
        self._splice: Splice | None = None
        self.lost = False
        self._closing: GracePeriod | None = None  # the abort of a close that takes too long
        self.address_not_forwarded: str | None = None

    def connectionMade(self) -> None:
        tune(self.transport)

    def start_tls(self) -> None:
        """
        Upgrade the backend connection (after the protocol's STARTTLS exchange). Lines that came
        after the positive reply arrived in clear, from whoever sits in between: dropped.
        """
        assert self.tls is not None
        self.clearLineBuffer()
        self.transport.startTLS(self.tls)  # type: ignore[union-attr]

    @property
    def login_over(self) -> bool:
        """Whether the login has succeeded or failed: what the backend says next is not the dialogue's."""
        return self.result is None or self.result.called

    def succeed(self) -> None:
        """Logged in: stop reading until the client is attached."""
        self.pauseProducing()
        if not self.login_over:
            self.result.callback(self)  # type: ignore[union-attr]  # not over: not yet spent

    def probed(self, goodbye: bytes = b"") -> None:
        """
        A probe (a request of None) has learnt what the backend offers: say C{goodbye} (unless the
        dialogue has sent its own), hand the protocol over, and close. The goodbye goes first: the
        prober closes the connection at once, and over TLS a write after the close is dropped.
        """
        assert self.result is not None and self.transport is not None  # relaying is not a probe's
        if goodbye:
            self.transport.write(goodbye)
        self.result.callback(self)
        self.transport.loseConnection()

    def fail(self, reason: Exception) -> None:
        """The login cannot go on: report why and drop the connection."""
        if not self.login_over:
            self.result.errback(reason)  # type: ignore[union-attr]  # not over: not yet spent
        self._abort()

    def attach(self, splice: Splice) -> None:
        """Relay everything from now on through C{splice}, starting with what is buffered."""
        self._splice = splice
        self.request = None
        self.result = None
        hand_over(self, splice.from_backend)

    def dataReceived(self, data: bytes) -> None:
        if self._splice is None:
            super().dataReceived(data)
        elif data:  # relaying: nothing is parsed any more (an empty read has nothing to relay)
            self._splice.from_backend(data)

    def rawDataReceived(self, data: bytes) -> None:
        assert self._splice is not None
        self._splice.from_backend(data)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.fail(BackendUnavailable("backend sent an over-long line"))

    def tlsEnded(self) -> None:
        """The backend ended TLS while relayed: the relay ends (both sides close, within the grace period)."""
        if self._splice is not None:
            self._splice.close()

    def close_with_grace(self, clock: IReactorTime) -> None:
        """
        Close a connection no splice relays (a probe, an MTA whose client has gone) once what
        was written has gone, or abort it after the grace period (L{gateway.relay.close_with_grace}).
        """
        if not self.lost and self._closing is None:
            assert self.transport is not None
            self._closing = close_with_grace(self.transport, clock)

    def connectionLost(self, reason: Failure = Failure(ConnectionClosed())) -> None:
        self.gone()
        if self._splice is not None:
            self._splice.backend_lost()
        else:
            self.fail(BackendUnavailable(f"connection lost during login: {reason.getErrorMessage()}"))

    def gone(self) -> None:
        """The connection is lost: note it, and cancel the abort of a close (it closed in time)."""
        self.lost = True
        if self._closing is not None:
            self._closing.cancel()
            self._closing = None

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


class _Dialing(ClientFactory):
    """The factory of one backend connection: it builds the login dialogue, and tells it when connecting fails."""

    # The connector keeps it for as long as the session lasts: no dict, Factory's counter included.
    __slots__ = ("_protocol", "numPorts")

    noisy = False  # one per login; the front end logs what matters

    def __init__(self, protocol: BackendLogin) -> None:
        self._protocol = protocol
        self.numPorts = 0  # Factory's class default, which the slot shadows

    def buildProtocol(self, addr: object) -> BackendLogin:
        return self._protocol

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self._protocol.fail(reason.value)


LoginFactory = Callable[[LoginRequest | None, BackendSettings, "IOpenSSLClientConnectionCreator | None"], BackendLogin]


class BackendConnector:
    """
    Logs in to one configured backend for each client that passed authentication.

    :param reactor: connects and times out.
    :param settings: where the backend is and how to talk to it.
    :param login_protocol: builds the protocol-specific login dialogue.
    :ivar announced: what the backend offered before login when last asked, or None if never
        learned; front ends use it to promise only what the backend does.
    """

    def __init__(self, reactor: IReactorTCP, settings: BackendSettings, login_protocol: LoginFactory) -> None:
        self._reactor = reactor
        self.settings = settings
        self._login_protocol = login_protocol
        self._tls = client_tls(settings.server_name, settings.ca_file) if settings.tls != "none" else None
        self.address = host_port(settings.host, settings.port)
        self._host_is_address = parse_ip(settings.host) is not None  # else a name, to resolve
        self.announced: tuple[bytes, ...] | None = None
        # The outage lines (_health) go by the order in which logins began, not by the clock.
        self._logins = 0  # begun so far: each login's number
        self._newest_answered = 0  # the number of the latest-begun login the backend answered
        self._down_by = 0  # the number of the login that logged the outage under way; 0 when none
        self._down_since = 0.0  # when the login that logged it began (the outage began by its end)
        self._not_forwarded_logged = False

    def probe(self) -> Deferred[tuple[bytes, ...]]:
        """
        Connect only to learn what the backend offers before login: each login dialogue stops
        there for a request of None, and says goodbye.
        """
        return self.login(None).addCallback(self._probed)

    def _probed(self, protocol: BackendLogin) -> tuple[bytes, ...]:
        # The probe says QUIT (LOGOUT) and closes its connection; over TLS the close waits for the backend's
        # close_notify, which a stalled backend never sends: it is cut off after the grace period.
        protocol.close_with_grace(self._reactor)  # type: ignore[arg-type]
        return protocol.announced or ()

    def login(self, request: LoginRequest | None) -> Deferred[BackendLogin]:
        """
        Connect and log in.

        :param request: None only to probe (see L{probe}).
        :returns: fires with the logged-in protocol; fails with L{BackendRejected} when the
            backend refuses the credentials and L{BackendUnavailable} for anything else,
            including taking longer than the configured timeout.
        """
        self._logins += 1
        number = self._logins
        protocol = self._login_protocol(request, self.settings, self._tls)
        factory: IProtocolFactory = _Dialing(protocol)
        if self.settings.tls == "implicit":
            assert self._tls is not None
            factory = TLSMemoryBIOFactory(self._tls, True, factory)
        stop_connecting = self._connect(factory, protocol)

        result = protocol.result
        assert result is not None

        def cancel(_: Deferred[BackendLogin]) -> None:
            connecting = protocol.transport is None
            result.cancel()  # fails it with CancelledError, and aborts a connection made
            if connecting:
                stop_connecting()

        done: Deferred[BackendLogin] = Deferred(cancel)
        result.chainDeferred(done)
        done.addBoth(self._learn, protocol)
        done.addErrback(self._unavailable)
        done.addTimeout(self.settings.timeout, self._reactor)  # type: ignore[arg-type]
        done.addErrback(self._timed_out)
        began: float = self._reactor.seconds()  # type: ignore[attr-defined]
        done.addBoth(self._health, number, began)
        return done

    def _health(self, result: BackendLogin | Failure, number: int, began: float) -> BackendLogin | Failure:
        """
        Log the backend's changes of state, once each, among the per-login lines an outage makes:
        down at a login it fails as unavailable, unless one begun later was answered; up at an
        answer to a login begun after the one that logged the outage. Logins end out of order (a
        timeout comes long after its login began), and what a login found says less of the
        backend now than what one begun after it found. The outage is timed from the beginning
        of the login that logged it: a stalled backend is found out a timeout later, and an
        outage that began during that login is overstated by at most the timeout.
        """
        if isinstance(result, Failure) and result.check(BackendUnavailable):
            if not self._down_by and number > self._newest_answered:
                self._down_by = number
                self._down_since = began
                log.warn("backend_down backend={backend} reason={reason}", backend=self.address,
                         reason=result.getErrorMessage())
        elif not isinstance(result, Failure) or result.check(BackendRejected, BackendRefused):
            self._newest_answered = max(self._newest_answered, number)
            if self._down_by and number > self._down_by:
                self._down_by = 0
                log.info("backend_up backend={backend} down_for={seconds:.1f}", backend=self.address,
                         seconds=self._reactor.seconds() - self._down_since)  # type: ignore[attr-defined]
        return result

    def _learn(self, result: object, protocol: BackendLogin) -> object:
        # Only from a login that got as far as the credentials, that is past any STARTTLS: one that
        # failed before may have been told by whoever sits in between (RFC 2595 4).
        if protocol.announced is not None and (not isinstance(result, Failure)
                                               or result.check(BackendRejected, BackendRefused)):
            self.announced = protocol.announced
        # A setting of the backend's, the same for every login: said once (by the probe at start,
        # if it can tell), or it would double the log.
        if protocol.address_not_forwarded is not None and not self._not_forwarded_logged:
            self._not_forwarded_logged = True
            log.warn("client_address_not_forwarded backend={backend} reason={reason} (the backend sees the "
                     "gateway's address)", backend=self.address, reason=protocol.address_not_forwarded)
        return result

    def _connect(self, factory: IProtocolFactory, protocol: BackendLogin) -> Callable[[], None]:
        """
        Start connecting with C{factory}; a connection that cannot be made fails C{protocol}.

        An address is connected to with the reactor itself: no resolver (whose thread hop would
        cost every login), and none of an endpoint's wrappers, which would stay with the
        connection for as long as the session lasts (about 0.6 KB), and no timer of its own: the
        login's timeout covers connecting. A host name goes through Twisted's C{HostnameEndpoint},
        which resolves it and tries each address it finds.

        :returns: stops connecting (before the connection is made).
        """
        host, port, timeout = self.settings.host, self.settings.port, self.settings.timeout
        if not self._host_is_address:
            attempt = HostnameEndpoint(self._reactor, host, port, timeout=timeout).connect(factory)
            attempt.addErrback(lambda failure: protocol.fail(failure.value))
            return attempt.cancel
        try:
            connector = self._reactor.connectTCP(host, port, factory, timeout=None)  # type: ignore[arg-type]
        except Exception as error:  # an IPv6 scope the system cannot resolve fails at once, in connectTCP
            protocol.fail(error)
            return lambda: None
        return connector.stopConnecting

    def _unavailable(self, failure: Failure) -> Failure:
        if failure.check(BackendRejected, BackendRefused, BackendUnavailable, CancelledError):
            return failure
        if failure.check(ConnectError):
            raise BackendUnavailable(f"cannot connect: {failure.getErrorMessage()}")
        raise BackendUnavailable(f"{failure.type.__name__}: {failure.getErrorMessage()}")

    def _timed_out(self, failure: Failure) -> Failure:
        if failure.check(TimeoutError):
            raise BackendUnavailable(f"no answer within {self.settings.timeout:g} s")
        return failure
