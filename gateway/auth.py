"""
Deciding whether a login is good, off the reactor thread, and pacing failures.

Password hashes cost tens of milliseconds of CPU each, so verification runs on a dedicated
thread pool: one slow login never stalls the relays. Checks wait for a free thread in a queue
of the gateway's own, from which a check whose login has ended is taken out at once: what waits
is bounded by the connections logging in, however fast clients come and go. Clients that reconnect often (phones,
folder watchers) would pay that at every connection, so the answer for a pair of user and
password is remembered for a while, as a keyed hash, until the users file changes: a good pair
for two minutes, and a wrong one (a stale saved password, a bot replaying its list) for ten.
Each new guess still pays the hash. (Failure replies are paced by the front end with
L{gateway.penalties}, the same for an unknown user, a wrong password and a backend refusal,
and timed from the login command: a remembered failure is answered when a computed one would
be, as long as that delay is longer than a hash.)
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

from gateway.userdb import MAX_USER_NAME_BYTES, UserDatabase

MAX_BACKEND_PASSWORD_BYTES = 4096
"""
The longest password passed on to a backend that decides (an OAuth token may pass 1 KiB): Dovecot's
login process drops a SASL response over its 8 KiB buffer with a BYE, which would read as the
backend being down. Longer than 1 KiB, the backends' logins go as SASL PLAIN, which Dovecot reads
into that buffer (L{gateway.imap_backend}, L{gateway.pop3_backend}).
"""

log = Logger()


class IAuthenticator(Interface):
    """Checks credentials for the front ends."""

    backend_decides: bool
    """True when there is no local database and the backend's answer decides."""

    def verify(user: str, password: bytes, wrong_after_all: Callable[[], None]) -> Deferred[bool]:
        """
        Check credentials; fires True when they are good (when the backend decides, True for any it could take).

        Cancelled before the check has started, it costs nothing and tells nothing. Cancelled
        while it runs, the check finishes: C{wrong_after_all} is then called if the password
        was wrong, so that a guess whose client did not wait for the answer still counts.
        """



class HashingPool(Service):
    """The thread pool that verifies password hashes, started and stopped with the gateway."""

    def __init__(self, threads: int) -> None:
        self.pool = ThreadPool(minthreads=1, maxthreads=threads, name="password-hashing")

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


class RememberedPairs:
    """
    (user, password) pairs whose check gave one answer, each for C{ttl} seconds and only while
    the users file keeps the version it had. Only keyed hashes are kept (the key never leaves the
    process), in a table of bounded size whose oldest entries go first.
    """

    def __init__(self, clock: IReactorTime, ttl: float, max_entries: int = 10_000) -> None:
        self._clock = clock
        self._ttl = ttl
        self._max = max_entries
        self._key = secrets.token_bytes(32)
        self._entries: OrderedDict[bytes, tuple[float, object]] = OrderedDict()

    def _fingerprint(self, user: str, password: bytes) -> bytes:
        return hmac.new(self._key, user.encode("utf-8", "surrogateescape") + b"\0" + password, hashlib.sha256).digest()

    def fresh(self, user: str, password: bytes, version: object) -> bool:
        """True when this exact pair was remembered within the TTL under this users-file version."""
        fingerprint = self._fingerprint(user, password)
        entry = self._entries.get(fingerprint)
        if entry is None:
            return False
        expires, remembered_version = entry
        if expires <= self._clock.seconds() or remembered_version != version:
            del self._entries[fingerprint]
            return False
        return True

    def remember(self, user: str, password: bytes, version: object) -> None:
        """Note a pair the users file (at C{version}) has just answered."""
        fingerprint = self._fingerprint(user, password)
        self._entries[fingerprint] = (self._clock.seconds() + self._ttl, version)
        self._entries.move_to_end(fingerprint)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)


@implementer(IAuthenticator)
class Authenticator:
    """
    Verifies against the local users file on a thread pool, or defers to the backend.

    :param reactor: for the failure delay, and to return results from the pool's threads.
    :param pool: where hashes are verified; unused when C{users} is None.
    :param users: the local database, or None when the backend decides.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        pool: ThreadPool,
        users: UserDatabase | None,
    ) -> None:
        self._reactor = reactor
        self._pool = pool
        self._users = users
        self.backend_decides = users is None
        # Two tables, so that a flood of wrong pairs cannot push the good ones out.
        self._good = RememberedPairs(reactor, ttl=120.0)
        self._wrong = RememberedPairs(reactor, ttl=600.0)
        self._hashing = 0  # checks handed to the pool and not yet answered
        # Checks no thread has taken yet, oldest first. Twisted's pool keeps its own queue, from
        # which nothing can be taken out: a check waiting there for a login long gone would hold
        # its user name and password, and a place in line, until a thread came to it.
        self._waiting: OrderedDict[Deferred[bool], Callable[[], None]] = OrderedDict()

    def verify(self, user: str, password: bytes, wrong_after_all: Callable[[], None]) -> Deferred[bool]:
        if self._users is None:
            # What no backend account can have is a wrong login here, as a users file would have it.
            return succeed(len(user.encode("utf-8", "surrogateescape")) <= MAX_USER_NAME_BYTES
                           and len(password) <= MAX_BACKEND_PASSWORD_BYTES)
        version = self._users.version()  # one stat: no read on the reactor thread
        if version is not None:
            if self._good.fresh(user, password, version):
                return succeed(True)
            if self._wrong.fresh(user, password, version):
                return succeed(False)
        assert IReactorFromThreads.providedBy(self._reactor)
        users = self._users

        def start() -> None:
            self._hashing += 1
            hashing = deferToThreadPool(self._reactor, self._pool, users.check, user, password)  # type: ignore[arg-type]
            hashing.addCallbacks(answered, failed)
            hashing.addBoth(self._finished)

        def answered(answer: tuple[bool, object]) -> None:
            good, answered_from = answer
            if answered_from is not None:
                # Under the version of the users that answered: if that is not the file's now (a
                # reload failed), the answer is never taken for the file's.
                (self._good if good else self._wrong).remember(user, password, answered_from)
            if not checking.called:
                checking.callback(good)
            elif not good:
                wrong_after_all()

        def failed(failure: Failure) -> None:
            if not checking.called:
                checking.errback(failure)
            else:
                log.failure("password check failed after its login ended", failure)

        checking: Deferred[bool] = Deferred(self._abandon)
        self._waiting[checking] = start
        self._start_waiting()
        return checking

    def _abandon(self, checking: Deferred[bool]) -> None:
        """A login ended: its check, if still waiting, costs nothing; one a thread has taken runs on."""
        self._waiting.pop(checking, None)

    def _finished(self, result: object) -> None:
        self._hashing -= 1
        self._start_waiting()
        if isinstance(result, Failure):  # a bug in the callbacks above: said, not swallowed
            log.failure("answering a password check failed", result)

    def _start_waiting(self) -> None:
        """Hand waiting checks to the pool, oldest first, while it has threads free."""
        while self._waiting and self._hashing < self._pool.max:
            _, start = self._waiting.popitem(last=False)
            start()
