"""
Slots for the attributes that Twisted's protocol classes keep on each instance.

The gateway's per-session protocols subclass Twisted's ``LineReceiver`` (the front ends also
``TimeoutMixin``), which have no ``__slots__``. Their few attributes would give each instance a
dict, and Python sizes a dict that the class cannot share for three times its keys: 0.3 to
0.5 KB per protocol, two protocols per session. Declared as slots of the subclass, they take
8 bytes each and no dict is made. A slot shadows Twisted's class-level default, so
:func:`set_defaults` sets each one to that default first. An attribute that a later Twisted
adds still works: it goes to a dict.
"""

from __future__ import annotations

from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin

__all__ = ["LINE_RECEIVER", "TIMEOUT_MIXIN", "set_defaults"]

# Protocol's, then LineReceiver's own (and those of the pausing mixin it inherits).
LINE_RECEIVER = ("connected", "transport", "factory", "line_mode", "_buffer", "_busyReceiving", "paused")
TIMEOUT_MIXIN = ("timeOut", "_TimeoutMixin__timeoutCall")

_DEFAULTS = {name: getattr(LineReceiver, name) for name in LINE_RECEIVER} | \
            {name: getattr(TimeoutMixin, name) for name in TIMEOUT_MIXIN}


def set_defaults(protocol: object, names: tuple[str, ...]) -> None:
    """Give each of the slots ``names`` of ``protocol`` the value Twisted's class has for it."""
    for name in names:
        setattr(protocol, name, _DEFAULTS[name])
