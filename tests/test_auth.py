"""The authenticator: verification off the reactor thread, and the verified-credentials cache."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from gateway.auth import MAX_BACKEND_PASSWORD_BYTES, Authenticator, RememberedPairs
from gateway import userdb
from gateway.userdb import MAX_USER_NAME_BYTES, UserDatabase, hash_password


@implementer(IReactorFromThreads)
class InlineReactor(Clock):
    """A Clock whose callFromThread runs at once (the fake pool runs everything inline)."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


class InlinePool:
    """A thread pool stand-in that runs work at once and counts it."""

    max = 2  # threads

    def __init__(self) -> None:
        self.calls = 0

    def callInThreadWithCallback(self, on_result: Callable[[bool, Any], None], f: Callable[..., Any],
                                 *args: Any, **kwargs: Any) -> None:
        self.calls += 1
        try:
            result = f(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class AuthenticatorCacheTests(SynchronousTestCase):
    """Clients that reconnect often do not pay the password hash every time."""

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="gw-auth-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.path = os.path.join(self.directory, "users")
        self.write("alice", b"right")
        self.clock = InlineReactor()
        self.pool = InlinePool()
        self.auth = Authenticator(self.clock, self.pool, UserDatabase(self.path))  # type: ignore[arg-type]

    def write(self, user: str, password: bytes) -> None:
        with open(self.path, "w") as f:
            f.write(f"{user}:{hash_password(password, 'bcrypt')}\n")

    def verify(self, user: str, password: bytes) -> bool:
        return bool(self.successResultOf(self.auth.verify(user, password, self.fail)))

    def test_good_pair_remembered(self) -> None:
        """A second good login within the TTL is accepted without a hash on the pool."""
        self.assertTrue(self.verify("alice", b"right"))
        self.assertTrue(self.verify("alice", b"right"))
        self.assertEqual(self.pool.calls, 1)

    def test_wrong_pair_remembered(self) -> None:
        """
        A client repeating one wrong password (a stale saved one) pays the hash once in ten
        minutes; each other guess, and an unknown user, still pays it.
        """
        for _ in range(3):
            self.assertFalse(self.verify("alice", b"wrong"))
            self.assertFalse(self.verify("mallory", b"wrong"))
        self.assertEqual(self.pool.calls, 2)
        self.assertFalse(self.verify("alice", b"wrong2"))
        self.assertEqual(self.pool.calls, 3)
        self.clock.advance(601)
        self.assertFalse(self.verify("alice", b"wrong"))
        self.assertEqual(self.pool.calls, 4)

    def test_no_answer_not_remembered(self) -> None:
        """A check that failed by error (argon2 out of memory, say) answers no, and is asked again."""
        def broken(password: bytes, stored: str) -> bool:
            raise MemoryError()

        self.patch(userdb.CONTEXT, "verify", broken)
        self.assertFalse(self.verify("alice", b"right"))
        self.flushLoggedErrors()
        self.patch(userdb.CONTEXT, "verify", type(userdb.CONTEXT).verify.__get__(userdb.CONTEXT))
        self.assertTrue(self.verify("alice", b"right"))

    def test_answer_of_users_from_before_a_failed_reload(self) -> None:
        """
        While the changed file cannot be read (out of descriptors, say), the earlier users answer;
        that answer is not taken for the new file's once it loads.
        """
        self.write("alice", b"new password")
        real_load = UserDatabase._load

        def failing_once(database: UserDatabase) -> Any:
            self.patch(UserDatabase, "_load", real_load)
            raise userdb.UserFileError("cannot read: Too many open files")

        self.patch(UserDatabase, "_load", failing_once)
        self.assertFalse(self.verify("alice", b"new password"))
        self.assertTrue(self.verify("alice", b"new password"))
        self.assertEqual(self.pool.calls, 2)

    def test_wrong_pairs_leave_good_ones(self) -> None:
        """A flood of wrong pairs does not push the good ones out of memory."""
        self.verify("alice", b"right")
        for n in range(10_001):
            self.auth._wrong.remember("alice", b"guess%d" % n, self.auth._users.version())  # type: ignore[union-attr]
        self.assertTrue(self.verify("alice", b"right"))
        self.assertEqual(self.pool.calls, 1)

    def test_other_password_not_served_from_cache(self) -> None:
        """Only the exact pair is remembered: another password for the user is checked (and fails)."""
        self.verify("alice", b"right")
        self.assertFalse(self.verify("alice", b"righ"))
        self.assertEqual(self.pool.calls, 2)

    def test_ttl(self) -> None:
        """After the TTL the pair is checked again."""
        self.verify("alice", b"right")
        self.clock.advance(121)
        self.assertTrue(self.verify("alice", b"right"))
        self.assertEqual(self.pool.calls, 2)

    def test_users_file_change_invalidates(self) -> None:
        """A changed users file (a new password) is obeyed at once: no remembered pair counts."""
        self.verify("alice", b"right")
        self.assertFalse(self.verify("alice", b"new password"))
        self.write("alice", b"new password")
        self.assertFalse(self.verify("alice", b"right"))
        self.assertTrue(self.verify("alice", b"new password"))


class BackendDecidesTests(SynchronousTestCase):
    """Without a users file the backend decides, except on credentials no backend could take."""

    def test_passed_on(self) -> None:
        """Any credentials within the bounds go on to the backend, unhashed."""
        pool = InlinePool()
        auth = Authenticator(InlineReactor(), pool, None)  # type: ignore[arg-type]
        self.assertTrue(auth.backend_decides)
        for user, password in (("alice", b"secret"), ("u" * MAX_USER_NAME_BYTES, b"p" * MAX_BACKEND_PASSWORD_BYTES)):
            self.assertIs(self.successResultOf(auth.verify(user, password, lambda: None)), True)
        self.assertEqual(pool.calls, 0)

    def test_over_long_refused(self) -> None:
        """
        A user name or password longer than a backend takes is a wrong login (counted as one),
        not a backend refusing the command and seeming to be down. Bounds count UTF-8 bytes.
        """
        auth = Authenticator(InlineReactor(), InlinePool(), None)  # type: ignore[arg-type]
        for user, password in (("u" * (MAX_USER_NAME_BYTES + 1), b"secret"), ("\u00fc" * 128, b"secret"),
                               ("alice", b"p" * (MAX_BACKEND_PASSWORD_BYTES + 1))):
            self.assertIs(self.successResultOf(auth.verify(user, password, lambda: None)), False)


class HeldPool(InlinePool):
    """A thread pool stand-in that keeps work until told to run it, as a busy pool would."""

    def __init__(self) -> None:
        super().__init__()
        self.queued: list[Callable[[], None]] = []

    def callInThreadWithCallback(self, on_result: Callable[[bool, Any], None], f: Callable[..., Any],
                                 *args: Any, **kwargs: Any) -> None:
        self.queued.append(lambda: InlinePool.callInThreadWithCallback(self, on_result, f, *args, **kwargs))

    def run(self) -> None:
        while self.queued:
            self.queued.pop(0)()


class CountingUsers(UserDatabase):
    """The users file, counting the hashes it verifies; C{during} runs in the middle of one."""

    hashes = 0
    during: Callable[[], None] = staticmethod(lambda: None)

    def check(self, user: str, password: bytes) -> tuple[bool, Any]:
        self.hashes += 1
        self.during()
        return super().check(user, password)


class AbandonedCheckTests(SynchronousTestCase):
    """
    A check cancelled before a pool thread takes it costs no hash; one cancelled while its hash
    runs finishes, and reports a wrong password after all.
    """

    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="gw-auth-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "users")
        with open(path, "w") as f:
            f.write(f"alice:{hash_password(b'right', 'bcrypt')}\n")
        self.pool = HeldPool()
        self.users = CountingUsers(path)
        self.auth = Authenticator(InlineReactor(), self.pool, self.users)  # type: ignore[arg-type]
        self.wrong_after_all = 0

    def verify(self, password: bytes) -> Deferred[bool]:
        def wrong() -> None:
            self.wrong_after_all += 1
        return self.auth.verify("alice", password, wrong)

    def test_cancelled_before_a_thread_takes_it(self) -> None:
        """
        Cancelled while it waits for a thread (both are busy): it fails with CancelledError at
        once, and no hash is computed later.
        """
        busy = [self.verify(b"right") for _ in range(self.pool.max)]
        checking = self.verify(b"wrong")
        checking.cancel()
        self.failureResultOf(checking, CancelledError)
        self.pool.run()
        self.assertEqual([self.successResultOf(each) for each in busy], [True] * self.pool.max)
        self.assertEqual((self.users.hashes, self.wrong_after_all), (self.pool.max, 0))

    def test_waiting_checks_hold_nothing_once_cancelled(self) -> None:
        """
        Logins that come and go while the threads are busy leave nothing waiting behind them (in
        Twisted's pool queue, each would hold its user and password until a thread came to it),
        and the pool is never handed more checks than it has threads.
        """
        busy = [self.verify(b"right") for _ in range(self.pool.max)]
        for _ in range(1000):
            guess = self.verify(b"guess")
            guess.cancel()
            self.failureResultOf(guess, CancelledError)
        self.assertEqual(len(self.pool.queued), self.pool.max)
        self.assertEqual(len(self.auth._waiting), 0)
        waiting = self.verify(b"wrong")
        self.assertEqual(len(self.pool.queued), self.pool.max)
        self.pool.run()
        self.assertFalse(self.successResultOf(waiting))
        self.assertEqual([self.successResultOf(each) for each in busy], [True] * self.pool.max)
        self.assertEqual(self.users.hashes, self.pool.max + 1)

    def test_cancelled_while_hashing(self) -> None:
        """
        Cancelled while its hash runs: the hash finishes, a wrong password is reported once, and a
        right one never.
        """
        for password, reported in ((b"wrong", 1), (b"right", 0)):
            self.wrong_after_all = 0
            checking = self.verify(password)
            self.users.during = checking.cancel
            self.pool.run()
            self.failureResultOf(checking, CancelledError)
            self.assertEqual(self.wrong_after_all, reported)
        self.assertEqual(self.users.hashes, 2)

    def test_check_that_raises(self) -> None:
        """
        A check that raises fails its Deferred; raising after its login was cancelled, it is logged
        (and nothing is reported as a wrong password).
        """
        def broken() -> None:
            raise RuntimeError("broken check")

        self.users.during = broken
        checking = self.verify(b"wrong")
        self.pool.run()
        self.failureResultOf(checking, RuntimeError)
        checking = self.verify(b"wrong")

        def cancelled_then_broken() -> None:
            checking.cancel()
            broken()

        self.users.during = cancelled_then_broken
        self.pool.run()
        self.failureResultOf(checking, CancelledError)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.wrong_after_all, 0)

    def test_broken_report_is_logged(self) -> None:
        """A report of a wrong password that raises (a bug) is logged, and the queue goes on."""
        def broken() -> None:
            raise RuntimeError("broken report")

        checking = self.auth.verify("alice", b"wrong", broken)
        self.users.during = checking.cancel
        self.pool.run()
        self.failureResultOf(checking, CancelledError)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.users.during = lambda: None
        following = self.verify(b"right")
        self.pool.run()
        self.assertTrue(self.successResultOf(following))

    def test_not_cancelled(self) -> None:
        """Left alone, the check is answered when a thread has computed it; nothing is reported aside."""
        for password, good in ((b"right", True), (b"wrong", False)):
            checking = self.verify(password)
            self.assertNoResult(checking)
            self.pool.run()
            self.assertEqual(self.successResultOf(checking), good)
        self.assertEqual((self.users.hashes, self.wrong_after_all), (2, 0))


class RememberedPairsTests(SynchronousTestCase):
    """The cache itself."""

    def test_bounded(self) -> None:
        """The table keeps at most its bound of entries, dropping the oldest."""
        cache = RememberedPairs(Clock(), ttl=120.0, max_entries=3)
        for n in range(5):
            cache.remember(f"user{n}", b"pw", 1)
        self.assertFalse(cache.fresh("user0", b"pw", 1))
        self.assertTrue(cache.fresh("user4", b"pw", 1))
        self.assertEqual(len(cache._entries), 3)

    def test_keyed_hashes_only(self) -> None:
        """Neither user names nor passwords are kept in the clear."""
        cache = RememberedPairs(Clock(), ttl=120.0)
        cache.remember("alice", b"secret-password", 1)
        self.assertNotIn(b"secret-password", repr(cache._entries).encode())
        self.assertNotIn(b"alice", repr(cache._entries).encode())
