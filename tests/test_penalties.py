"""
Unit tests of the login penalties on a Clock: the escalating failure delay per pair, address and
user, the per-address budget and its window, IPv6 prefixes, trusted networks, the log of
refusals and the bounded memory.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from gateway.penalties import LoginPenalties, PenaltyRules, _Count, password_fingerprint

ATTACKER = "192.0.2.66"
OTHER = "192.0.2.67"
TRUSTED_NETWORK = ipaddress.ip_network("10.0.0.0/8")
TRUSTED = "10.1.2.3"
# The default rules: 2 s doubled per earlier failure, capped at 15 s.
ESCALATION = [2.0, 4.0, 8.0, 15.0, 15.0]


def spray_address(n: int) -> str:
    """The n-th address of a spray, all distinct, none of them trusted."""
    return str(ipaddress.IPv4Address(0x0B000000 + n))


class PenaltyTestBase(SynchronousTestCase):
    """Fresh penalties on a Clock per test, and failed logins reported as the front end reports them."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.penalties = self.make()
        self._guesses = 0

    def make(self, **rules: object) -> LoginPenalties:
        """Penalties under the default rules with C{rules} changed; they replace C{self.penalties}."""
        self.penalties = LoginPenalties(self.clock, PenaltyRules(**rules))  # type: ignore[arg-type]
        return self.penalties

    def failed_login(self, user: str, host: str, password: bytes | None = None) -> float:
        """
        One failed login as the front end handles it: the delay is read before the failure is
        counted. Every call guesses a new password unless C{password} is given.

        :returns: the delay before the failure reply.
        """
        self._guesses += 1
        delay = self.penalties.failure_delay(user, host)
        password = b"guess %d" % self._guesses if password is None else password
        self.penalties.failed(user, host, password_fingerprint(self.penalties.fingerprint_key, password))
        return delay


class PairTests(PenaltyTestBase):
    """Failures of one user from one client."""

    def test_escalates_then_caps(self) -> None:
        """Failures of one pair wait 2, 4 and 8 s, then 15 s, and stay at 15 s."""
        self.assertEqual([self.failed_login("alice", ATTACKER) for _ in range(5)], ESCALATION)
        for _ in range(40):
            self.failed_login("alice", ATTACKER)
        self.assertEqual(self.penalties.failure_delay("alice", ATTACKER), 15.0)

    def test_escalates_on_the_pair_alone(self) -> None:
        """From a trusted client (no per-address count) one user's failures escalate on the pair count."""
        self.make(trusted=(TRUSTED_NETWORK,), user_free=100)
        self.assertEqual([self.failed_login("alice", TRUSTED) for _ in range(5)], ESCALATION)
        self.assertEqual(self.penalties.failure_delay("bob", TRUSTED), 2.0)

    def test_same_wrong_password_not_counted(self) -> None:
        """A wrong password repeated (a stale saved one) counts once: the delay does not grow."""
        self.make(ip_budget=3)
        delays = [self.failed_login("alice", ATTACKER, b"stale") for _ in range(6)]
        self.assertEqual(delays, [2.0, 4.0, 4.0, 4.0, 4.0, 4.0])
        self.assertFalse(self.penalties.refused(ATTACKER))
        # Another wrong password is a new failure.
        self.assertEqual(self.failed_login("alice", ATTACKER, b"other"), 4.0)
        self.assertEqual(self.failed_login("alice", ATTACKER, b"third"), 8.0)
        self.assertTrue(self.penalties.refused(ATTACKER))

    def test_says_whether_counted(self) -> None:
        """failed() says which failures it counted: a repeat of a recent wrong password is not."""
        self.make()
        key = self.penalties.fingerprint_key
        counted = [self.penalties.failed("alice", ATTACKER, password_fingerprint(key, password))
                   for password in (b"stale", b"stale", b"other", b"stale")]
        self.assertEqual(counted, [True, False, True, False])

    def test_success_resets_pair(self) -> None:
        """A good login clears the pair's failures."""
        self.make(trusted=(TRUSTED_NETWORK,), user_free=100)
        for _ in range(3):
            self.failed_login("alice", TRUSTED)
        self.assertEqual(self.penalties.failure_delay("alice", TRUSTED), 15.0)
        self.penalties.succeeded("alice", TRUSTED)
        self.assertEqual(self.penalties.failure_delay("alice", TRUSTED), 2.0)

    def test_success_keeps_address_count(self) -> None:
        """A good login does not clear the address's failures: they still delay, and use up its budget."""
        self.make(ip_budget=3)
        self.failed_login("alice", ATTACKER)
        self.failed_login("alice", ATTACKER)
        self.penalties.succeeded("alice", ATTACKER)
        self.assertEqual(self.penalties.failure_delay("alice", ATTACKER), 8.0)
        self.assertEqual(self.penalties.failure_delay("bob", ATTACKER), 8.0)
        self.assertFalse(self.penalties.refused(ATTACKER))
        self.failed_login("bob", ATTACKER)
        self.assertTrue(self.penalties.refused(ATTACKER))

    def test_success_keeps_user_count(self) -> None:
        """A good login does not clear the user's failures from other addresses."""
        self.make(user_free=1)
        self.failed_login("alice", "198.51.100.1")
        self.failed_login("alice", "198.51.100.2")
        self.penalties.succeeded("alice", "198.51.100.2")
        self.assertEqual(self.penalties.failure_delay("alice", "198.51.100.9"), 8.0)


class AddressTests(PenaltyTestBase):
    """Failures from one client address, whatever the user."""

    def test_escalates_across_users(self) -> None:
        """Failures from one address for different users escalate together."""
        self.assertEqual([self.failed_login(f"user{n}", ATTACKER) for n in range(5)], ESCALATION)

    def test_other_address_unaffected(self) -> None:
        """Another IPv4 address, even the next one, starts from the base delay."""
        for n in range(5):
            self.failed_login(f"user{n}", ATTACKER)
        self.assertEqual(self.penalties.failure_delay("user9", OTHER), 2.0)

    def test_budget_refuses(self) -> None:
        """After ip_budget failures in the window the address is refused; another address is not."""
        self.make(ip_budget=3)
        self.failed_login("alice", ATTACKER)
        self.failed_login("bob", ATTACKER)
        self.assertFalse(self.penalties.refused(ATTACKER))
        self.failed_login("carol", ATTACKER)
        self.assertTrue(self.penalties.refused(ATTACKER))
        self.assertFalse(self.penalties.refused(OTHER))

    def test_budget_resets_after_window(self) -> None:
        """Once the window has passed the address is no longer refused, and its budget starts over."""
        self.make(ip_budget=3, window=600.0)
        for n in range(3):
            self.failed_login(f"user{n}", ATTACKER)
        self.clock.advance(599)
        self.assertTrue(self.penalties.refused(ATTACKER))
        self.clock.advance(2)
        self.assertFalse(self.penalties.refused(ATTACKER))
        self.assertEqual(self.penalties.failure_delay("user9", ATTACKER), 2.0)
        self.failed_login("user3", ATTACKER)
        self.failed_login("user4", ATTACKER)
        self.assertFalse(self.penalties.refused(ATTACKER))
        self.failed_login("user5", ATTACKER)
        self.assertTrue(self.penalties.refused(ATTACKER))


class UserTests(PenaltyTestBase):
    """Failures of one user over all addresses."""

    def test_escalates_after_user_free(self) -> None:
        """A user's failures from many addresses are free up to user_free, then escalate."""
        delays = [self.failed_login("alice", f"198.51.100.{n}") for n in range(1, 9)]
        self.assertEqual(delays, [2.0, 2.0, 2.0, 2.0, 2.0, 4.0, 8.0, 15.0])

    def test_no_refusal_keyed_on_user(self) -> None:
        """However many failures a user has, no address is refused for it: the user is only delayed."""
        self.make(ip_budget=3)
        hosts = [spray_address(n) for n in range(200)]
        for host in hosts:
            self.failed_login("alice", host)
        self.assertFalse(any(self.penalties.refused(host) for host in hosts))
        self.assertFalse(self.penalties.refused("198.51.100.9"))
        self.assertEqual(self.penalties.failure_delay("alice", "198.51.100.9"), 15.0)
        self.assertEqual(self.penalties.failure_delay("bob", "198.51.100.9"), 2.0)


class IPv6Tests(PenaltyTestBase):
    """IPv6 clients count per network prefix."""

    def test_one_prefix_shares_counts(self) -> None:
        """Two addresses in one /64 share their failures and their budget; another /64 does not."""
        self.make(ip_budget=3)
        self.failed_login("alice", "2001:db8:1:2::1")
        self.failed_login("bob", "2001:db8:1:2:ffff:ffff:ffff:fffe")
        self.assertEqual(self.penalties.failure_delay("carol", "2001:db8:1:2::9"), 8.0)
        self.failed_login("carol", "2001:db8:1:2::abcd")
        self.assertTrue(self.penalties.refused("2001:db8:1:2::77"))
        self.assertFalse(self.penalties.refused("2001:db8:1:3::1"))
        self.assertEqual(self.penalties.failure_delay("dave", "2001:db8:1:3::1"), 2.0)

    def test_source_is_the_prefix(self) -> None:
        """An IPv6 client is counted under its /64; an IPv4 client under its address."""
        self.assertEqual(self.penalties.source("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64")
        self.assertEqual(self.penalties.source(ATTACKER), ATTACKER)

    def test_prefix_configurable(self) -> None:
        """With ipv6_prefix 48, addresses in one /48 share counts and another /48 does not."""
        self.make(ipv6_prefix=48)
        self.failed_login("alice", "2001:db8:1:2::1")
        self.failed_login("bob", "2001:db8:1:3::1")
        self.assertEqual(self.penalties.failure_delay("carol", "2001:db8:1:ffff::1"), 8.0)
        self.assertEqual(self.penalties.failure_delay("carol", "2001:db8:2::1"), 2.0)


class TrustedTests(PenaltyTestBase):
    """Trusted networks are exempt from the per-address rules only."""

    def setUp(self) -> None:
        super().setUp()
        self.make(trusted=(TRUSTED_NETWORK, ipaddress.ip_network("2001:db8:ffff::/48")), ip_budget=3, user_free=2)

    def test_never_refused(self) -> None:
        """A trusted client is never refused, however many failures it sends."""
        for n in range(50):
            self.failed_login(f"user{n}", TRUSTED)
            self.failed_login(f"user{n}", "2001:db8:ffff::1")
        self.assertFalse(self.penalties.refused(TRUSTED))
        self.assertFalse(self.penalties.refused("2001:db8:ffff::1"))

    def test_not_delayed_per_address(self) -> None:
        """Failures from a trusted client for other users do not delay a new user."""
        for n in range(50):
            self.failed_login(f"user{n}", TRUSTED)
        self.assertEqual(self.penalties.failure_delay("newcomer", TRUSTED), 2.0)

    def test_delayed_per_user(self) -> None:
        """A user under attack from elsewhere is delayed from a trusted client too."""
        for n in range(1, 4):
            self.failed_login("alice", f"198.51.100.{n}")
        self.assertEqual(self.penalties.failure_delay("alice", TRUSTED), 8.0)

    def test_delayed_per_pair(self) -> None:
        """One user failing repeatedly from a trusted client escalates."""
        self.assertEqual([self.failed_login("alice", TRUSTED) for _ in range(2)], [2.0, 4.0])
        self.assertEqual(self.penalties.failure_delay("alice", TRUSTED), 8.0)


class LoggingTests(PenaltyTestBase):
    """The refusal of an address is logged once per window."""

    def setUp(self) -> None:
        super().setUp()
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.make(ip_budget=2, window=600.0)

    def throttled(self) -> list[dict[str, object]]:
        """The login_throttled events logged so far."""
        return [dict(e) for e in self.events if str(e.get("log_format", "")).startswith("login_throttled ")]

    def test_logged_once_per_window(self) -> None:
        """Many refusals in one window log login_throttled once; the next window logs it again."""
        self.failed_login("alice", ATTACKER)
        self.assertFalse(self.penalties.refused(ATTACKER))
        self.failed_login("bob", ATTACKER)
        for _ in range(5):
            self.assertTrue(self.penalties.refused(ATTACKER))
        [event] = self.throttled()
        self.assertEqual(event["log_format"],
                         "login_throttled client={client} source={source} failures={failures} window={window:g}")
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual((event["client"], event["source"], event["failures"], event["window"]),
                         (ATTACKER, ATTACKER, 2, 600.0))
        self.clock.advance(600)
        self.assertFalse(self.penalties.refused(ATTACKER))
        self.failed_login("alice", ATTACKER)
        self.failed_login("bob", ATTACKER)
        for _ in range(3):
            self.assertTrue(self.penalties.refused(ATTACKER))
        self.assertEqual(len(self.throttled()), 2)

    def test_ipv6_logged_with_prefix(self) -> None:
        """A refused IPv6 client is logged with its address and the prefix it is counted under."""
        self.failed_login("alice", "2001:db8:1:2::1")
        self.failed_login("bob", "2001:db8:1:2::2")
        self.assertTrue(self.penalties.refused("2001:db8:1:2::3"))
        [event] = self.throttled()
        self.assertEqual((event["client"], event["source"]), ("2001:db8:1:2::3", "2001:db8:1:2::/64"))


class MemoryTests(PenaltyTestBase):
    """The tables are bounded in size and forget what has expired."""

    def test_spray_stays_within_bound(self) -> None:
        """Failures from 100,000 distinct addresses for as many users never hold more than max_entries."""
        self.make(max_entries=1000)
        for n in range(100_000):
            host, user = spray_address(n), f"user{n}"
            self.penalties.refused(host)
            self.failed_login(user, host)
            self.assertLessEqual(max(self.penalties.sizes()), 1000)
        self.assertEqual(self.penalties.sizes(), (1000, 1000, 1000))

    def test_ipv6_spray_stays_within_bound(self) -> None:
        """Failures from 5,000 distinct /64 networks never hold more than max_entries."""
        self.make(max_entries=100)
        for n in range(5000):
            self.failed_login("alice", f"2001:db8:{n >> 16:x}:{n & 0xffff:x}::1")
            self.assertLessEqual(max(self.penalties.sizes()), 100)
        self.assertEqual(self.penalties.sizes(), (100, 100, 1))

    def test_default_bound_holds(self) -> None:
        """Under the default rules, a spray past max_entries leaves each table at its bound."""
        bound = PenaltyRules().max_entries
        for n in range(bound + 5000):
            self.penalties.failed(f"user{n}", spray_address(n), b"guess")
            self.assertLessEqual(max(self.penalties.sizes()), bound)
        self.assertEqual(self.penalties.sizes(), (bound, bound, bound))

    def test_entries_hold_no_dict(self) -> None:
        """
        An entry keeps its fields in slots, and the address and user tables' entries share one
        empty tuple of fingerprints: at their bounds, three tables of 100,000 took 114 MB with a
        dict and a list per entry, 90 MB without.
        """
        self.assertFalse(hasattr(_Count(0.0), "__dict__"))
        self.assertIs(_Count(0.0).recent, _Count(1.0).recent)

    def test_oldest_go_first(self) -> None:
        """A full table forgets its oldest entry first and keeps the newer ones."""
        self.make(max_entries=3)
        hosts = [spray_address(n) for n in range(4)]
        for host in hosts:
            self.failed_login("u-" + host, host)
            self.failed_login("u-" + host, host)
        self.assertEqual(self.penalties.failure_delay("x", hosts[0]), 2.0)
        for host in hosts[1:]:
            self.assertEqual(self.penalties.failure_delay("x", host), 8.0)

    def test_entries_expire_after_window(self) -> None:
        """After the window, the pair, the address and the user count nothing any more."""
        self.make(user_free=1, window=600.0)
        for _ in range(3):
            self.failed_login("alice", ATTACKER)
        self.clock.advance(599)
        self.assertEqual(self.penalties.failure_delay("alice", ATTACKER), 15.0)
        self.clock.advance(1)
        self.assertEqual(self.penalties.failure_delay("alice", ATTACKER), 2.0)
        self.assertEqual(self.penalties.failure_delay("alice", OTHER), 2.0)
        self.assertEqual(self.penalties.failure_delay("bob", ATTACKER), 2.0)

    def test_expired_entries_leave_the_tables(self) -> None:
        """
        Expired entries do not stay in memory until evicted: once the window has passed and the
        next failure is counted, the tables hold only the live entries.
        """
        self.make(window=600.0)
        for n in range(10):
            self.failed_login(f"user{n}", spray_address(n))
        self.assertEqual(self.penalties.sizes(), (10, 10, 10))
        self.clock.advance(601)
        self.failed_login("alice", ATTACKER)
        self.assertEqual(self.penalties.sizes(), (1, 1, 1))


class ReloadTests(SynchronousTestCase):
    """New rules (a reload) keep the counts, which follow the new window and size."""

    def test_longer_window(self) -> None:
        """
        After a reload lengthens the window from 600 s to 3600 s, an address that used up its
        budget is still refused 601 s after its first failure, and no longer after 3600 s.
        """
        clock = Clock()
        penalties = LoginPenalties(clock, PenaltyRules(ip_budget=3, window=600.0))
        penalties.rules = replace(penalties.rules, window=3600.0)
        for n in range(3):
            penalties.failed("alice", ATTACKER, password_fingerprint(penalties.fingerprint_key, b"guess-%d" % n))
        self.assertTrue(penalties.refused(ATTACKER))
        clock.advance(601)
        self.assertTrue(penalties.refused(ATTACKER), "the address got a new budget after the old window")
        clock.advance(3000)
        self.assertFalse(penalties.refused(ATTACKER))

    def test_smaller_tables(self) -> None:
        """A reload that lowers the table size drops the oldest entries at once."""
        clock = Clock()
        penalties = LoginPenalties(clock, PenaltyRules(max_entries=10))
        for n in range(10):
            penalties.failed(f"user{n}", f"192.0.2.{n}", b"x" * 16)
        penalties.rules = replace(penalties.rules, max_entries=4)
        self.assertEqual(penalties.sizes(), (4, 4, 4))
