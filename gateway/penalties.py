"""
Login penalties against password guessing, in the style of Dovecot's anvil.

Failed logins are counted per (user, client) pair, per client and per user, within a window.
The failure reply to the next bad login waits longer the more failures came before it: the base
delay, doubled per earlier failure, up to a cap. Only failures are slowed: a good login always
goes through at once, so an attack never locks out an honest user, from the same address or
another. Past a budget of failures a client address gets no more login attempts until its
window ends. A client that repeats the same wrong password (a stale saved one) is not counted
again. IPv6 clients count per network prefix (/64 by default), since one host owns a whole
prefix. Trusted networks (webmail, monitoring) are exempt from the per-address rules, never
from the per-user ones.

Everything lives in memory, in tables of bounded size whose oldest entries go first; entries
also expire with their window.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gateway.addresses import Network, client_key, in_networks, parse_ip

log = Logger()

K = TypeVar("K")


@dataclass(frozen=True)
class PenaltyRules:
    """
    :ivar base_delay: seconds before the reply to a first failure.
    :ivar max_delay: the cap of the doubling delay.
    :ivar ip_budget: failures from one client address in a window before its logins are refused.
    :ivar user_free: failures of one user (over all addresses) in a window before they slow it too.
    :ivar window: seconds over which failures are counted.
    :ivar ipv6_prefix: IPv6 clients are counted per network of this prefix length.
    :ivar trusted: networks exempt from the per-address rules.
    :ivar max_entries: size bound of each table.
    """

    base_delay: float = 2.0
    max_delay: float = 15.0
    ip_budget: int = 20
    user_free: int = 5
    window: float = 600.0
    ipv6_prefix: int = 64
    trusted: tuple[Network, ...] = ()
    max_entries: int = 100_000


@dataclass(slots=True)  # three tables of up to 100,000 each: no dict per entry
class _Count:
    started: float
    failures: int = 0
    refusal_logged: bool = False
    recent: tuple[bytes, ...] = ()  # fingerprints of recent wrong passwords (pairs only)


class _Table(Generic[K]):
    """Counters by key, oldest evicted first once full, each forgotten when its window has passed."""

    def __init__(self, max_entries: int, window: float) -> None:
        self._entries: OrderedDict[K, _Count] = OrderedDict()
        self.limit(max_entries, window)

    def limit(self, max_entries: int, window: float) -> None:
        """Hold at most ``max_entries``, each for ``window`` seconds from its first failure."""
        self._max = max_entries
        self._window = window
        while len(self._entries) > max_entries:
            self._entries.popitem(last=False)

    def get(self, key: K, now: float) -> _Count | None:
        count = self._entries.get(key)
        if count is not None and now - count.started >= self._window:
            del self._entries[key]
            return None
        return count

    def touch(self, key: K, now: float) -> _Count:
        self._purge(now)
        count = self.get(key, now)
        if count is None:
            count = self._entries[key] = _Count(now)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        return count

    def _purge(self, now: float) -> None:
        """Drop expired entries from the least recently used end (the rest expire when next looked up)."""
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if now - oldest.started < self._window:
                return
            self._entries.popitem(last=False)

    def forget(self, key: K) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)


def password_fingerprint(key: bytes, password: bytes) -> bytes:
    """What a wrong password is remembered as: a keyed hash, useless without the gateway's key."""
    return hmac.new(key, password, hashlib.sha256).digest()[:16]


class LoginPenalties:
    """
    The shared penalty state of one gateway.

    :param clock: the time source.
    :param rules: the limits.
    :ivar fingerprint_key: the key of L{password_fingerprint}; made at start, never stored.
    """

    def __init__(self, clock: IReactorTime, rules: PenaltyRules) -> None:
        self._clock = clock
        self._pairs: _Table[tuple[str, str]] = _Table(rules.max_entries, rules.window)
        self._sources: _Table[str] = _Table(rules.max_entries, rules.window)
        self._users: _Table[str] = _Table(rules.max_entries, rules.window)
        self.rules = rules
        self.fingerprint_key = secrets.token_bytes(32)

    @property
    def rules(self) -> PenaltyRules:
        """The limits. New ones (a reload) keep the counts, which follow the new window and size from then on."""
        return self._rules

    @rules.setter
    def rules(self, rules: PenaltyRules) -> None:
        self._rules = rules
        for table in (self._pairs, self._sources, self._users):
            table.limit(rules.max_entries, rules.window)

    def source(self, host: str) -> str | None:
        """The key a client address is counted under, or None for a trusted (or non-IP) client."""
        if parse_ip(host) is None or in_networks(host, self.rules.trusted):
            return None
        return client_key(host, self.rules.ipv6_prefix)

    def refused(self, host: str) -> bool:
        """
        True when this client has used up its failures for the window: refuse the login before
        any password is checked. The first refusal of a window is logged, later ones are not.
        """
        source = self.source(host)
        if source is None:
            return False
        count = self._sources.get(source, self._clock.seconds())
        if count is None or count.failures < self.rules.ip_budget:
            return False
        if not count.refusal_logged:
            count.refusal_logged = True
            log.warn("login_throttled client={client} source={source} failures={failures} window={window:g}",
                     client=host, source=source, failures=count.failures, window=self.rules.window)
        return True

    def failure_delay(self, user: str, host: str) -> float:
        """Seconds from a failed login command to its reply, from the failures counted so far."""
        now = self._clock.seconds()
        source = self.source(host)
        pair = self._pairs.get((user, source or host), now)
        earlier = pair.failures if pair else 0
        if source is not None:
            by_source = self._sources.get(source, now)
            earlier = max(earlier, by_source.failures if by_source else 0)
        by_user = self._users.get(user, now)
        if by_user is not None:
            earlier = max(earlier, by_user.failures - self.rules.user_free + 1)
        return float(min(self.rules.max_delay, self.rules.base_delay * 2 ** min(earlier, 32)))

    def failed(self, user: str, host: str, fingerprint: bytes) -> bool:
        """
        Count a failed login; the same wrong password again from the same pair is not counted.

        :param fingerprint: the wrong password's L{password_fingerprint} under L{fingerprint_key}.
        :returns: whether it was counted (False for a repeat).
        """
        now = self._clock.seconds()
        source = self.source(host)
        pair = self._pairs.touch((user, source or host), now)
        if fingerprint in pair.recent:
            return False
        pair.recent = (*pair.recent, fingerprint)[-3:]
        pair.failures += 1
        self._users.touch(user, now).failures += 1
        if source is not None:
            self._sources.touch(source, now).failures += 1
        return True

    def succeeded(self, user: str, host: str) -> None:
        """A good login clears its pair (not the address or the user: an attack may go on)."""
        self._pairs.forget((user, self.source(host) or host))

    def sizes(self) -> tuple[int, int, int]:
        """Entries held in the pair, address and user tables (for tests and metrics)."""
        return len(self._pairs), len(self._sources), len(self._users)
