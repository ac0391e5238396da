"""The relayed sessions' idle timeouts (gateway.idle): one timer, exact to the second."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from gateway.idle import IdleSessions


class _Session:
    """A watched session that records when it was told its deadline passed."""

    def __init__(self, sessions: IdleSessions, clock: Clock, timeout: float) -> None:
        self.sessions, self.clock, self.timeout = sessions, clock, timeout
        self.idle_slot: int | None = None
        self.expired_at: list[float] = []
        self.active()

    def active(self) -> None:
        self.idle_deadline = self.clock.seconds() + self.timeout

    def idle_expired(self) -> None:
        self.expired_at.append(self.clock.seconds())


def _broken() -> None:
    raise RuntimeError("a session's end went wrong")


class IdleSessionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.sessions = IdleSessions(self.clock)

    def session(self, timeout: float = 100.0) -> _Session:
        session = _Session(self.sessions, self.clock, timeout)
        self.sessions.watch(session)
        return session

    def assert_expires_at(self, session: _Session, when: float) -> None:
        """Advance to a second before ``when``: not told yet; to ``when``: told then."""
        self.clock.advance(when - 1 - self.clock.seconds())
        self.assertEqual(session.expired_at, [])
        self.clock.advance(1)
        self.assertEqual(session.expired_at, [when])

    def test_silent_session_expires_at_its_deadline(self) -> None:
        """A session silent since it was watched is told at its deadline, once, and no longer watched."""
        session = self.session()
        self.assert_expires_at(session, 100)
        self.assertEqual(len(self.sessions), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(1000)
        self.assertEqual(session.expired_at, [100])

    def test_activity_moves_the_deadline(self) -> None:
        """Activity pushes the deadline on; the session is told only after a full silent timeout."""
        session = self.session()
        self.clock.advance(60)
        session.active()
        self.clock.advance(60)  # its first deadline has passed: it is filed again, not told
        self.assertEqual(session.expired_at, [])
        self.assertEqual(len(self.sessions), 1)
        self.assert_expires_at(session, 160)

    def test_within_a_second(self) -> None:
        """A deadline inside a second is met at the end of that second."""
        self.clock.advance(0.25)
        session = self.session(timeout=10.5)  # deadline 10.75
        self.clock.advance(10.5)
        self.assertEqual(session.expired_at, [])
        self.clock.advance(0.25)
        self.assertEqual(session.expired_at, [11])

    def test_one_timer_for_all(self) -> None:
        """However many sessions are watched, one timer waits, for the earliest deadline."""
        sessions = [self.session(timeout=t) for t in (300, 100, 200, 100)]
        [timer] = self.clock.getDelayedCalls()
        self.assertEqual(timer.getTime(), 100)
        self.clock.advance(100)
        self.assertEqual([bool(s.expired_at) for s in sessions], [False, True, False, True])
        [timer] = self.clock.getDelayedCalls()
        self.assertEqual(timer.getTime(), 200)
        self.clock.advance(100)
        self.clock.advance(100)
        self.assertEqual([s.expired_at for s in sessions], [[300], [100], [200], [100]])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_forget(self) -> None:
        """A forgotten session is never told, and the timer stops when no session is left."""
        session = self.session()
        self.sessions.forget(session)
        self.sessions.forget(session)  # twice: a session closes once, but is forgotten safely again
        self.assertEqual(len(self.sessions), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(1000)
        self.assertEqual(session.expired_at, [])

    def test_forgotten_while_due(self) -> None:
        """
        A session that closes while the wheel is telling others, before or after its own turn in
        the same second, is not filed again (ten pairs, so that both orders occur).
        """
        pairs = [(self.session(), self.session()) for _ in range(10)]
        self.clock.advance(50)
        for expiring, closing in pairs:
            closing.active()  # due at 100 but not silent: to be filed again
            expiring.idle_expired = lambda closing=closing: self.sessions.forget(closing)  # type: ignore[method-assign]
        self.clock.advance(50)
        self.assertEqual(len(self.sessions), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(1000)
        self.assertEqual([closing.expired_at for _, closing in pairs], [[]] * 10)

    def test_watched_twice(self) -> None:
        """Watching a session again files it once, under its current deadline."""
        session = self.session()
        self.clock.advance(30)
        session.active()
        self.sessions.watch(session)
        self.assertEqual(len(self.sessions), 1)
        self.assert_expires_at(session, 130)

    def test_earlier_session_later(self) -> None:
        """A session watched after others but due before them brings the timer forward."""
        late = self.session(timeout=500)
        early = self.session(timeout=50)
        [timer] = self.clock.getDelayedCalls()
        self.assertEqual(timer.getTime(), 50)
        self.clock.advance(50)
        self.assertEqual((early.expired_at, late.expired_at), ([50], []))
        self.clock.advance(450)
        self.assertEqual(late.expired_at, [500])

    def test_session_that_raises(self) -> None:
        """
        A session that raises when told is logged; the other silent sessions of its second are
        told all the same, and one active since is filed again and told at its new deadline.
        """
        failing = [self.session() for _ in range(3)]
        silent = [self.session() for _ in range(3)]
        moved = self.session()
        for session in failing:
            session.idle_expired = _broken  # type: ignore[method-assign]
        self.clock.advance(50)
        moved.active()
        self.clock.advance(50)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 3)
        self.assertEqual([session.expired_at for session in silent], [[100]] * 3)
        self.assertEqual(len(self.sessions), 1)
        self.assert_expires_at(moved, 150)
        self.assertEqual(self.clock.getDelayedCalls(), [])
