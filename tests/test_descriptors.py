"""The limit on open descriptors is raised to what the configured connections need."""

from __future__ import annotations

import resource

from twisted.trial.unittest import SynchronousTestCase

from gateway.descriptors import descriptors_needed, raise_descriptor_limit


class _Limits:
    """A process's soft and hard descriptor limits, as getrlimit and setrlimit see them."""

    def __init__(self, soft: int, hard: int, ceiling: int = 1_048_576) -> None:
        self.soft, self.hard, self.ceiling = soft, hard, ceiling
        self.set: list[tuple[int, int]] = []

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        if limits[0] > self.ceiling:
            raise ValueError("not allowed to raise maximum limit")
        self.set.append(limits)
        self.soft, self.hard = limits

    def raise_to(self, needed: int) -> int:
        return raise_descriptor_limit(needed, self.getrlimit, self.setrlimit)


class RaiseTests(SynchronousTestCase):
    """raise_descriptor_limit raises the soft limit as far as needed and allowed, and never lowers it."""

    def test_systemd_default(self) -> None:
        """systemd's 1,024 soft limit is raised to what 10,000 connections need; the hard limit stays."""
        limits = _Limits(1024, 524_288)
        needed = descriptors_needed(10_000)
        self.assertEqual(limits.raise_to(needed), needed)
        self.assertEqual(limits.set, [(needed, 524_288)])

    def test_hard_limit_lower(self) -> None:
        """Below a lower hard limit, the soft limit goes up to it, and the shortfall shows in the result."""
        limits = _Limits(1024, 4096)
        self.assertEqual(limits.raise_to(20_128), 4096)
        self.assertEqual(limits.set, [(4096, 4096)])

    def test_high_enough(self) -> None:
        """A soft limit already as high as needed, or higher, is left alone."""
        for soft in (20_128, 65_536):
            limits = _Limits(soft, 524_288)
            self.assertEqual(limits.raise_to(20_128), soft)
            self.assertEqual(limits.set, [])

    def test_unlimited_hard(self) -> None:
        """With no hard limit, the soft limit goes to what is needed."""
        limits = _Limits(1024, resource.RLIM_INFINITY)
        self.assertEqual(limits.raise_to(20_128), 20_128)

    def test_refused(self) -> None:
        """Past what the kernel allows, nothing changes and the result says so."""
        limits = _Limits(1024, resource.RLIM_INFINITY, ceiling=10_000)
        self.assertEqual(limits.raise_to(2_000_128), 1024)
        self.assertEqual(limits.set, [])

    def test_needed(self) -> None:
        """Each session needs two descriptors, with room to spare for the rest of the process."""
        self.assertGreater(descriptors_needed(10_000), 20_000)
        self.assertEqual(descriptors_needed(20_000) - descriptors_needed(10_000), 20_000)

    def test_this_process(self) -> None:
        """On this process's real limits: a soft limit below the hard one is raised."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        lower = min(soft, hard) - 16
        resource.setrlimit(resource.RLIMIT_NOFILE, (lower, hard))
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        self.assertEqual(raise_descriptor_limit(lower + 8), lower + 8)
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE), (lower + 8, hard))
