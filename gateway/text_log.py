"""
Log lines in the text format of twistd and twist, written at a fraction of the cost of Twisted's
own text observer.

Twisted's ``textFileLogObserver`` fills in each event's format through ``string.Formatter`` in
Python and works out the time zone again for every timestamp. With four lines to an IMAP login
that was about a tenth of the login's CPU, and nearly half of the supervisor's when workers log
through it. :func:`format_event` makes the same line, character for character:

- a plain event (a ``str`` format whose fields are keys of the event) is filled in by
  ``str.format_map``, and its timestamp comes from a cache that keeps the current second's;
- any other event (a failure and its traceback, callable fields, a flattened or an
  unformattable event) goes through Twisted's own formatting.

:func:`use_for` is called by the plugin's options (:mod:`gateway.tap`). It has the runner write
its text lines this way wherever the runner would write text lines to a stream:

- twistd in the foreground without ``--logfile``, as under systemd, through twistd's own
  ``--logger`` option;
- twist wherever it writes text: with ``--log-format=text``, or on a terminal by default.

twistd's log files (and their rotation), syslog, JSON and an explicit ``--logger`` are left to
the runner.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import IO, Any

from twisted.logger import FileLogObserver, LogEvent, formatEventAsClassicLogText, formatTime, textFileLogObserver
from twisted.python import usage

__all__ = ["format_event", "stdout_observer", "text_file_observer", "use_for"]

STDOUT_OBSERVER = "gateway.text_log.stdout_observer"
"""What twistd's ``--logger`` names: resolved by twistd, and called with no arguments."""


class _Timestamps:
    """Twisted's timestamps (RFC 3339, to the second, local offset), each second's worked out once."""

    __slots__ = ("_key", "_text")

    def __init__(self) -> None:
        self._key: tuple[int, int, int] | None = None
        self._text = ""

    def __call__(self, when: float | None) -> str:
        if when is None:
            return formatTime(None)
        # The second Twisted prints: datetime rounds to the microsecond (half to even) first, so
        # the last half-microsecond of a second is the next one.
        fraction, whole = math.modf(when)
        microseconds = round(fraction * 1e6)
        second = int(whole) + (1 if microseconds >= 1_000_000 else -1 if microseconds < 0 else 0)
        # A second has one offset (offsets change on whole seconds), unless the zone itself changes.
        key = (second, time.timezone, time.altzone)
        if key != self._key:
            self._key, self._text = key, formatTime(second)
        return self._text


_timestamp = _Timestamps()


def format_event(event: LogEvent) -> str | None:
    """
    The event as one text line, exactly as Twisted's ``formatEventAsClassicLogText`` makes it.

    :returns: the line with its newline, continuation lines indented by a tab; None for an
        event with nothing to say.
    """
    text = _plain_text(event)
    system = event.get("log_system")
    if text is None or not (system is None or type(system) is str):
        return formatEventAsClassicLogText(event, formatTime=_timestamp)
    if not text:
        return None
    if system is None:
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
    return f"{_timestamp(event.get('log_time'))} [{system}] {text}".replace("\n", "\n\t") + "\n"


def _plain_text(event: LogEvent) -> str | None:
    """The event's message filled in by ``str.format_map``, or None where only Twisted's formatting will do."""
    if "log_failure" in event or "log_flattened" in event:
        return None
    format = event.get("log_format")
    # Twisted calls fields written "name()", and reads fields through a wrapper whose own private
    # and special attributes ("._wrapped", ".__class__") would read differently.
    if type(format) is not str or "()" in format or "._" in format:
        return None
    try:
        return format.format_map(event)
    except BaseException:  # a missing key, a value that cannot be formatted: Twisted says so its way
        return None


def text_file_observer(out: IO[Any]) -> FileLogObserver:
    """A log observer writing text lines to ``out``, in place of Twisted's ``textFileLogObserver``."""
    return FileLogObserver(out, format_event)


def stdout_observer() -> FileLogObserver:
    """The log observer for twistd's ``--logger``: text lines to standard output as it is now (before twistd
    redirects ``sys.stdout`` into the log)."""
    return text_file_observer(sys.stdout)


def use_for(runner: usage.Options | None) -> None:
    """
    Have the runner whose options these are write its text log lines with :func:`format_event`,
    where it would write them to a stream with Twisted's text observer.

    :param runner: twistd's or twist's options, as parsed so far; None when the plugin's options
        are parsed on their own.
    """
    if runner is None:
        return
    if "logger" in runner:  # twistd
        if (runner["logger"] is None and runner.get("nodaemon") and not runner.get("syslog")
                and runner.get("logfile") in (None, "", "-")):
            runner["logger"] = STDOUT_OBSERVER
    elif runner.get("fileLogObserverFactory") is textFileLogObserver:  # twist, writing text
        runner["fileLogObserverFactory"] = text_file_observer


def loggable_text(text: str) -> str:
    """
    Text from a client (a user name, an address) or with spaces, as one field of a log line:
    quoted, escaped, bounded, so that it cannot forge another field (fail2ban parses C{user=}).
    """
    return json.dumps(text[:64])
