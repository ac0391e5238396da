"""
The idle timeout of relayed sessions, kept for all of them by one timer.

A relayed session may stay open for half an hour without a byte (IMAP IDLE), and thousands do.
A timer each (Twisted's ``TimeoutMixin``) costs about 900 bytes per session and a reschedule on
every relayed read. Here a session only notes its new deadline on each read; sessions are filed
by the second their deadline falls in (a timing wheel with one-second slots), and one timer
waits for the earliest slot. There, a session whose deadline moved on since it was filed is
filed again under the new one, and a session still silent is told, within a second after its
deadline. A session that raises when told is logged, and the others are told and filed all the same.
"""

from __future__ import annotations

import math
from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = ["IdleSessions", "Watched"]

log = Logger()

_DUE = -1  # the slot of a session being looked at, to be filed again unless forgotten meanwhile


class Watched(Protocol):
    """A session the wheel watches: it keeps its own deadline and is told when it passes."""

    idle_deadline: float
    idle_slot: int | None  # the wheel's, to find the session again; None for a session not watched

    def idle_expired(self) -> None:
        """The deadline passed with no activity since: end the session (even if this raises: it is no longer watched)."""


class IdleSessions:
    """Relayed sessions filed by the second of their idle deadline, with one timer for the earliest."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._slots: dict[int, set[Watched]] = {}
        self._next: int | None = None  # the slot the pending sweep looks at
        self._call: IDelayedCall | None = None

    def __len__(self) -> int:
        return sum(len(slot) for slot in self._slots.values())

    def watch(self, session: Watched) -> None:
        """Start watching ``session``, whose ``idle_deadline`` is set (again: filed once)."""
        self.forget(session)
        self._file(session)

    def forget(self, session: Watched) -> None:
        """Stop watching ``session`` (it has closed); a session not watched is ignored."""
        slot = session.idle_slot
        if slot is None:
            return
        session.idle_slot = None
        if slot == _DUE:
            return
        sessions = self._slots.get(slot)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._slots[slot]
        if not self._slots and self._call is not None:
            self._call.cancel()
            self._call = self._next = None

    def _file(self, session: Watched) -> None:
        slot = math.ceil(session.idle_deadline)
        session.idle_slot = slot
        self._slots.setdefault(slot, set()).add(session)
        if self._next is None or slot < self._next:
            self._schedule(slot)

    def _schedule(self, slot: int) -> None:
        if self._call is not None:
            self._call.cancel()
        self._next = slot
        self._call = self._clock.callLater(max(0.0, slot - self._clock.seconds()), self._sweep)

    def _sweep(self) -> None:
        self._call = self._next = None  # this call has run: nothing is to cancel it
        now = self._clock.seconds()
        due = sorted(slot for slot in self._slots if slot <= now)
        refile: list[Watched] = []
        try:
            for slot in due:
                sessions = self._slots.get(slot, set())
                while sessions:  # one at a time: telling one may make another forgotten
                    session = sessions.pop()
                    if session.idle_deadline <= now:
                        session.idle_slot = None
                        _tell(session)
                    else:
                        session.idle_slot = _DUE
                        refile.append(session)
                self._slots.pop(slot, None)
        finally:
            # Whatever happened above: with no timer set, every session still watched would be
            # watched for ever, and one taken out to be filed again would be lost.
            for session in refile:
                if session.idle_slot == _DUE:
                    self._file(session)
            if self._slots and (self._next is None or min(self._slots) < self._next):
                self._schedule(min(self._slots))


def _tell(session: Watched) -> None:
    """Tell a silent session that its deadline passed; what it raises is logged, not passed on to the sweep."""
    try:
        session.idle_expired()
    except Exception:
        log.failure("idle_expiry_failed")
