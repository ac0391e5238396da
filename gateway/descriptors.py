"""
Enough open file descriptors for the connections the configuration allows.

Every relayed session holds two descriptors, the client's and the backend's. systemd starts
services with a soft limit of 1,024 (and a hard limit of 524,288), which would stop a gateway
at about 500 sessions: accept and connect would fail with EMFILE. As nginx does with
``worker_rlimit_nofile``, the gateway raises its own soft limit as far as the configuration
needs, within the hard limit; worker processes inherit it.
"""

from __future__ import annotations

import resource
from collections.abc import Callable

__all__ = ["descriptors_needed", "raise_descriptor_limit"]

# Beyond the sessions: listening sockets, worker channels, log files, backend probes, the
# hashing threads' files, a users file being re-read.
_SPARE = 128


def descriptors_needed(max_connections: int) -> int:
    """Descriptors that ``max_connections`` sessions need, each with a client and a backend connection."""
    return 2 * max_connections + _SPARE


def raise_descriptor_limit(needed: int,
                           getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
                           setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit) -> int:
    """
    Raise this process's soft limit on open descriptors to ``needed``, or as close as the hard
    limit allows. A limit already high enough is left alone; it is never lowered.

    :param getrlimit: how the limits are read (the ``resource`` module's, unless a test's).
    :param setrlimit: how they are set.
    :returns: the soft limit in force afterwards; below ``needed`` when the hard limit (or the
        kernel's ceiling) is lower.
    """
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target <= soft:
        return soft
    try:
        setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):  # above the kernel's nr_open, say
        return soft
    return target
