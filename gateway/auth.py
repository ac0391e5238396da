"""
Deciding whether a login is good, off the reactor thread, and pacing failures.

Password hashes cost tens of milliseconds of CPU each, so verification runs on a dedicated
thread pool: one slow login never stalls the relays. (Failure replies are paced by the front end
with L{gateway.penalties}, the same for an unknown user, a wrong password and a backend refusal.)
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

from gateway.userdb import UserDatabase


class IAuthenticator(Interface):
    """Checks credentials for the front ends."""

    backend_decides: bool  # type: ignore[misc]
    """True when there is no local database and the backend's answer decides."""

    def verify(user: str, password: bytes) -> Deferred[bool]:
        """Check credentials; fires True when they are good (always True when the backend decides)."""



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

    def verify(self, user: str, password: bytes) -> Deferred[bool]:
        if self._users is None:
            return succeed(True)
        assert IReactorFromThreads.providedBy(self._reactor)
        return deferToThreadPool(self._reactor, self._pool, self._users.verify, user, password)  # type: ignore[arg-type]
