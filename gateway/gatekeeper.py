"""
The connection limits and login penalties as the front ends consult them.

There is one gatekeeper per gateway, however many processes serve it: in a single process it
answers at once from its own counts; in a worker process it asks the supervisor, which holds
the counts for every worker (L{gateway.worker_channel}). Questions are answered through
Deferreds (already fired when the answer is local); notices need no answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred, succeed

from gateway.connection_limits import ConnectionLimits
from gateway.penalties import LoginPenalties, password_fingerprint


@dataclass(frozen=True)
class LoginCheck:
    """
    What is known about a login before its password is checked.

    :ivar throttled: the client address has used up its failures: refuse before checking.
    :ivar sessions_full: the user holds as many sessions as allowed now (tell only after good
        credentials, so that guesses learn nothing).
    """

    throttled: bool
    sessions_full: bool


@dataclass(frozen=True)
class FailureCount:
    """
    A failed login, as counted.

    :ivar delay: how long after the attempt began its reply waits.
    :ivar repeated: the same wrong password came from the same client lately, and was not
        counted again (a device retrying a stale password is not a guesser).
    """

    delay: float
    repeated: bool


class Gatekeeper(Protocol):
    """What a front end asks and tells about connections, sessions and logins."""

    def admit(self, host: str) -> Deferred[str | None]:
        """Count a new connection: None when admitted (L{release} it later), else the limit that refused it."""

    def release(self, host: str) -> None:
        """An admitted connection has ended."""

    def check_login(self, user: str, host: str) -> Deferred[LoginCheck]:
        """Whether a login may go on to its password check."""

    def open_session(self, user: str) -> Deferred[bool]:
        """Count a logged-in session; False (and nothing counted) when the user has too many."""

    def close_session(self, user: str) -> None:
        """A session counted by L{open_session} has ended."""

    def failed(self, user: str, host: str, password: bytes) -> Deferred[FailureCount]:
        """Count a failed login."""

    def succeeded(self, user: str, host: str) -> None:
        """A good login: its (user, client) pair starts afresh."""


class LocalGatekeeper:
    """The gatekeeper of the process that holds the counts."""

    def __init__(self, connections: ConnectionLimits, penalties: LoginPenalties) -> None:
        self.connections = connections
        self.penalties = penalties

    def admit(self, host: str) -> Deferred[str | None]:
        return succeed(self.connections.admit(host))

    def release(self, host: str) -> None:
        self.connections.release(host)

    def check_login(self, user: str, host: str) -> Deferred[LoginCheck]:
        return succeed(self.login_check(user, host))

    def login_check(self, user: str, host: str) -> LoginCheck:
        """L{check_login}'s answer, at once."""
        full = self.connections.sessions(user) >= self.connections.rules.max_sessions_per_user
        return LoginCheck(self.penalties.refused(host), full)

    def open_session(self, user: str) -> Deferred[bool]:
        return succeed(self.connections.open_session(user))

    def close_session(self, user: str) -> None:
        self.connections.close_session(user)

    def failed(self, user: str, host: str, password: bytes) -> Deferred[FailureCount]:
        fingerprint = password_fingerprint(self.penalties.fingerprint_key, password)
        return succeed(self.count_failure(user, host, fingerprint))

    def count_failure(self, user: str, host: str, fingerprint: bytes) -> FailureCount:
        """Count a failure known by its password's fingerprint (the delay is the one it had earned)."""
        delay = self.penalties.failure_delay(user, host)
        return FailureCount(delay, not self.penalties.failed(user, host, fingerprint))

    def succeeded(self, user: str, host: str) -> None:
        self.penalties.succeeded(user, host)
