"""
The channel between the supervisor and one worker process, over a socket pair.

Over it a worker gets the configuration the supervisor checked and runs with (at start and at
each reload: a worker never reads the file itself), asks the supervisor's gatekeeper what its
own front ends would otherwise ask locally (L{RemoteGatekeeper}), so that connection limits and
login penalties count every worker's clients together, and sends its log events, which the
supervisor publishes as its own: one log and one set of metrics for the whole gateway.
Passwords never cross the channel, only their keyed fingerprints.

Every message is one line of JSON: C{[serial, name, argument, ...]} from the worker (serial 0
when no answer is wanted) and C{[serial, answer]} back. A login costs a handful of messages, so
they are kept this plain (AMP cost the supervisor several times as much CPU per login).

The supervisor trusts no worker beyond its own counts: a message of the wrong shape closes that
worker's channel (which releases all it held, and stops the worker), a worker gets no session
beyond the connections it holds, it cannot publish the supervisor's own events (whose metrics
are keyed on them), and one that does not read its answers is cut off before they fill memory.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, LogEvent, LogLevel, Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from gateway.connection_limits import take_one
from gateway.gatekeeper import FailureCount, LocalGatekeeper, LoginCheck
from gateway.penalties import password_fingerprint
from gateway.sockets import write_backlog

log = Logger()
_worker_log = Logger(namespace="gateway.worker")

T = TypeVar("T")

MAX_MESSAGE = 1024 * 1024
"""Longest line either end accepts; a log event is cut to fit well within it."""

MAX_UNREAD = 4 * MAX_MESSAGE
"""
Bytes of answers the supervisor holds for a worker that does not read them; past this (checked
before each question, since one read brings thousands) the channel is cut. A worker reads its
answers as they come, and the longest (the configuration text) fits in L{MAX_MESSAGE}; but a
question of 20 bytes asks for that whole text, and without a bound a worker that only writes
would make the supervisor buffer hundreds of times what it sends.
"""

MAX_NAME = 255
"""
Longest user key or host a worker may name. A user key is at most 64 characters
(L{gateway.frontend.USER_KEY_LENGTH}: a longer name is sent as a digest of 39), a host is an IP
address (at most 45) or a UNIX socket peer's text (a path of at most 108 bytes): with room to
spare, and the supervisor's tables stay small whatever a worker sends.
"""

SESSION_SLACK = 16
"""
Sessions a worker may hold beyond its connections: a client that leaves while its session is
being opened has its connection released at once, and the session's undo (close_session) comes
a round trip later, once the answer is in; meanwhile another client's session must not be refused.
"""

_SUPERVISOR_NAMESPACES = frozenset({__name__, "gateway.workers"})
"""Log namespaces only the supervisor logs in: a worker's event in one is a forgery, and dropped."""

_MAX_FIELD = 16 * 1024
_PLAIN = (str, int, float, bool, type(None))
_DROPPED = frozenset({"log_logger", "log_source", "log_observer", "log_trace", "log_failure", "log_level"})

# Made once: json.dumps with any option, and json.loads of bytes (which it sniffs for an
# encoding), set up anew on every call, about ten times per login on each end.
_encode = json.JSONEncoder(separators=(",", ":")).encode
_decode = json.JSONDecoder().decode


class _Channel(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = MAX_MESSAGE
    _log: Logger  # set per instance: a Logger in the class would name itself after the class

    def send(self, *message: object) -> None:
        """Write one message (nothing once the channel has gone)."""
        if self.transport is not None:
            self.transport.write(_encode(message).encode("ascii") + b"\n")  # the encoder escapes all else

    def lineLengthExceeded(self, line: bytes) -> None:
        self._log.error("worker_channel_message_too_long length={length}", length=len(line))
        assert self.transport is not None
        self.transport.loseConnection()


class SupervisorChannel(_Channel):
    """
    The supervisor's end of one worker's channel. It answers from the shared gatekeeper and
    remembers what this worker holds, so that a worker that dies takes its counts with it.

    :param publisher: where the worker's log events go (the supervisor's log). Each gets the
        field C{log_worker}, the worker's process id, which no text format shows; an event in a
        namespace only the supervisor logs in is dropped.
    :param worker: the worker's process id.
    :param configuration: the configuration text the supervisor checked and runs with now: a
        worker asks for it (C{configuration}) to start and at each reload, whatever the file says
        meanwhile.
    :param ready: called when the worker serves (and can take SIGHUP).
    """

    def __init__(self, gatekeeper: LocalGatekeeper, publisher: ILogObserver, worker: int,
                 configuration: Callable[[], str], ready: Callable[[], object]) -> None:
        self._gatekeeper = gatekeeper
        self._publisher = publisher
        self._log = log
        self._worker = worker
        self._events = Logger(namespace=__name__, observer=publisher)
        self._connections: Counter[str] = Counter()
        self._sessions: Counter[str] = Counter()
        self._connection_count = 0  # the totals of the two above
        self._session_count = 0
        self._cut = False
        self._handlers: dict[str, Callable[..., object]] = {
            "hello": self._hello, "configuration": configuration, "admit": self._admit, "release": self._release,
            "check_login": self._check_login, "open_session": self._open_session,
            "close_session": self._close_session, "failed": self._failed,
            "succeeded": self._succeeded, "log": self._publish, "ready": ready,
        }

    def lineReceived(self, line: bytes) -> None:
        if self._cut:
            # Read along with the line that cut the channel: LineOnlyReceiver delivers the rest of
            # a read after abortConnection (it stops only once the transport is disconnecting).
            return
        backlog = write_backlog(self.transport)
        if backlog > MAX_UNREAD:
            log.error("worker_channel_unread pid={pid} backlog={backlog}", pid=self._worker, backlog=backlog)
            self._cut = True
            assert self.transport is not None
            self.transport.abortConnection()  # type: ignore[attr-defined]  # its answers would never be sent
            return
        try:
            serial, name, *arguments = _decode(line.decode("ascii"))
            if not isinstance(serial, int):
                raise TypeError("a serial that is not a number")
            answer = self._handlers[name](*arguments)
        except Exception:
            log.failure("worker_channel_bad_message")
            assert self.transport is not None
            self.transport.loseConnection()
            return
        if serial:
            self.send(serial, answer)

    def _hello(self) -> str:
        return base64.b64encode(self._gatekeeper.penalties.fingerprint_key).decode("ascii")

    def _admit(self, host: str) -> str | None:
        refused = self._gatekeeper.connections.admit(_name(host))
        if refused is None:
            self._connections[host] += 1
            self._connection_count += 1
        return refused

    def _release(self, host: str) -> None:
        if take_one(self._connections, _name(host)):
            self._connection_count -= 1
            self._gatekeeper.release(host)

    def _check_login(self, user: str, host: str) -> list[bool]:
        check = self._gatekeeper.login_check(_name(user), _name(host))
        return [check.throttled, check.sessions_full]

    def _open_session(self, user: str) -> bool:
        user = _name(user)
        if self._session_count >= self._connection_count + SESSION_SLACK:
            # Each session is a client's, on a connection this worker holds: the worker asks for
            # no other, and must not take a user's sessions, nor fill the table with names. The
            # answer is the one for a user at the limit (the worker refuses that login).
            log.warn("worker_channel_session_refused pid={pid} connections={connections} sessions={sessions}",
                     pid=self._worker, connections=self._connection_count, sessions=self._session_count)
            return False
        opened = self._gatekeeper.connections.open_session(user)
        if opened:
            self._sessions[user] += 1
            self._session_count += 1
        return opened

    def _close_session(self, user: str) -> None:
        if take_one(self._sessions, _name(user)):
            self._session_count -= 1
            self._gatekeeper.close_session(user)

    def _failed(self, user: str, host: str, fingerprint: str) -> tuple[float, bool]:
        key = base64.b64decode(_name(fingerprint), validate=True)
        if len(key) != _FINGERPRINT_LENGTH:
            raise ValueError(f"a fingerprint of {len(key)} bytes")
        count = self._gatekeeper.count_failure(_name(user), _name(host), key)
        return count.delay, count.repeated

    def _succeeded(self, user: str, host: str) -> None:
        self._gatekeeper.succeeded(_name(user), _name(host))

    def _publish(self, fields: dict[str, Any]) -> None:
        if not isinstance(fields, dict):
            raise TypeError(f"log fields {type(fields).__name__}")
        if fields.get("log_namespace") in _SUPERVISOR_NAMESPACES:
            return  # such as worker_channel_closed, which would drop another worker's open connections
        # Published as it was logged: the log reads the same with one process or many (fail2ban).
        fields["log_level"] = LogLevel.levelWithName(fields.pop("log_level_name", "info"))
        fields["log_worker"] = self._worker
        self._publisher(fields)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        # After the worker's last event: the metrics drop what it still had open.
        self._events.info("worker_channel_closed pid={pid} connections={connections} sessions={sessions}",
                       pid=self._worker, connections=sum(self._connections.values()),
                       sessions=sum(self._sessions.values()))
        for host, count in self._connections.items():
            for _ in range(count):
                self._gatekeeper.release(host)
        for user, count in self._sessions.items():
            for _ in range(count):
                self._gatekeeper.close_session(user)
        self._connections.clear()
        self._sessions.clear()
        self._connection_count = self._session_count = 0


_FINGERPRINT_LENGTH = len(password_fingerprint(b"", b""))


def _name(value: object) -> str:
    """C{value}, a user key, host or fingerprint from a worker, checked: text of at most L{MAX_NAME} characters."""
    if not isinstance(value, str) or len(value) > MAX_NAME:
        raise ValueError(f"a name that is not text of at most {MAX_NAME} characters (a {type(value).__name__})")
    return value


def loggable(event: LogEvent) -> dict[str, Any]:
    """
    The fields of a log event that can cross the channel: plain values as they are, others as
    text, a failure as its traceback (appended to the message), long values cut.
    """
    fields: dict[str, Any] = {}
    for key, value in event.items():
        if key in _DROPPED:
            continue
        if not isinstance(value, _PLAIN):
            value = str(value)
        if isinstance(value, str) and len(value) > _MAX_FIELD:
            value = value[:_MAX_FIELD] + "[...]"
        fields[key] = value
    level = event.get("log_level")
    fields["log_level_name"] = level.name if isinstance(level, type(LogLevel.info)) else "info"
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        fields["log_format"] = (fields.get("log_format") or "") + "\n{log_traceback}"
        fields["log_traceback"] = failure.getTraceback()[-_MAX_FIELD:]
    return fields


class WorkerChannel(_Channel):
    """
    The worker's end of its channel.

    :param lost: called when the supervisor is gone (the worker then stops).
    :param orphaned: where log events go once the supervisor is gone, so that the lines of the
        connections the worker then ends (a message delivered, a disconnect) are not lost.
    """

    def __init__(self, lost: Callable[[], None], orphaned: Callable[[LogEvent], object] = lambda event: None) -> None:
        self._lost = lost
        self._orphaned: Callable[[LogEvent], object] | None = None
        self._fallback = orphaned
        # Its events go to the supervisor's log, which drops a worker's event in this module's
        # namespace (the supervisor's own): the worker's end logs as the worker.
        self._log = _worker_log
        self._serial = 0
        self._waiting: dict[int, Deferred[Any]] = {}
        self._closed: Deferred[None] | None = None

    def close(self) -> Deferred[None]:
        """
        End the channel once what was written to it has gone, the worker's last log lines among
        it (the reactor's stop would drop them); the Deferred fires then. For a worker stopping.
        """
        closed: Deferred[None] = Deferred()
        if self.transport is None:
            closed.callback(None)
            return closed
        self._closed = closed
        self.transport.loseConnection()
        return closed

    def call(self, name: str, *arguments: object) -> Deferred[Any]:
        """Ask the supervisor; the Deferred fires with its answer (or fails once the channel has gone)."""
        self._serial += 1
        answer: Deferred[Any] = Deferred()
        if self.transport is None:
            answer.errback(ConnectionError("the supervisor has gone"))
            return answer
        self._waiting[self._serial] = answer
        self.send(self._serial, name, *arguments)
        return answer

    def tell(self, name: str, *arguments: object) -> None:
        """Tell the supervisor something that needs no answer."""
        self.send(0, name, *arguments)

    def emit(self, event: LogEvent) -> None:
        """Send one log event to the supervisor, or once it is gone to the fallback; an C{ILogObserver}."""
        if self._orphaned is not None:
            self._orphaned(event)
        else:
            self.tell("log", loggable(event))

    def lineReceived(self, line: bytes) -> None:
        serial, answer = _decode(line.decode("ascii"))
        self._waiting.pop(serial).callback(answer)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.transport = None
        waiting, self._waiting = self._waiting, {}
        for answer in waiting.values():
            answer.errback(ConnectionError("the supervisor has gone"))
        if self._closed is not None:
            self._closed.callback(None)  # closed by the worker, which is stopping already
            return
        self._orphaned = self._fallback
        self._lost()


class RemoteGatekeeper:
    """
    The gatekeeper of a worker: every question goes to the supervisor.

    A question whose asker has gone (its Deferred cancelled) still gets its answer, and what
    the answer counted is undone, so nothing stays counted for a client that left.
    """

    def __init__(self, channel: WorkerChannel, fingerprint_key: bytes) -> None:
        self._channel = channel
        self._key = fingerprint_key

    def admit(self, host: str) -> Deferred[str | None]:
        def undo(refused: str | None) -> None:
            if refused is None:
                self.release(host)

        return _settle(self._channel.call("admit", host), undo)

    def release(self, host: str) -> None:
        self._channel.tell("release", host)

    def check_login(self, user: str, host: str) -> Deferred[LoginCheck]:
        asking = self._channel.call("check_login", user, host)
        return _settle(asking.addCallback(lambda answer: LoginCheck(*answer)))

    def open_session(self, user: str) -> Deferred[bool]:
        def undo(opened: bool) -> None:
            if opened:
                self.close_session(user)

        return _settle(self._channel.call("open_session", user), undo)

    def close_session(self, user: str) -> None:
        self._channel.tell("close_session", user)

    def failed(self, user: str, host: str, password: bytes) -> Deferred[FailureCount]:
        fingerprint = base64.b64encode(password_fingerprint(self._key, password)).decode("ascii")
        asking = self._channel.call("failed", user, host, fingerprint)
        return _settle(asking.addCallback(lambda answer: FailureCount(*answer)))

    def succeeded(self, user: str, host: str) -> None:
        self._channel.tell("succeeded", user, host)


def _settle(asking: Deferred[T], undo: Callable[[T], object] | None = None) -> Deferred[T]:
    """
    A Deferred for C{asking}'s answer that its asker may cancel at any time; an answer that
    arrives after that is handed to C{undo}.
    """
    result: Deferred[T] = Deferred()

    def answered(value: T) -> None:
        if not result.called:
            result.callback(value)
        elif undo is not None:
            undo(value)

    def failed(failure: Failure) -> None:
        if not result.called:
            result.errback(failure)

    asking.addCallbacks(answered, failed)
    return result
