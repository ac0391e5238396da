"""gateway.text_log: the same text lines as Twisted's observer writes, and when the runner uses it."""

from __future__ import annotations

import io
import os
import time

from twisted.application.twist._options import TwistOptions
from twisted.logger import (
    LogEvent,
    Logger,
    LogLevel,
    LogPublisher,
    formatEventAsClassicLogText,
    jsonFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SynchronousTestCase

from gateway.text_log import format_event, stdout_observer, text_file_observer, use_for


class _Named:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<Named {self.name}>"


def _logged(format: str, **fields: object) -> LogEvent:
    """The event a Logger makes for C{format} and C{fields}."""
    caught: list[LogEvent] = []
    Logger(namespace="gateway.frontend", observer=caught.append).info(format, **fields)
    return caught[0]


class SameLinesTests(SynchronousTestCase):
    """Every event gives exactly Twisted's line: the fast path and the fallback alike."""

    def assert_same(self, event: LogEvent) -> None:
        self.assertEqual(format_event(event), formatEventAsClassicLogText(event))

    def test_gateway_events(self) -> None:
        """The gateway's own kinds of line: fields, repr, format specs, quoted user names."""
        self.assert_same(_logged("connect protocol={protocol} client={client} port={client_port} listener={listener} "
                                 "tls={tls}", protocol="imap", client="192.0.2.7", client_port=54321,
                                 listener=993, tls="implicit"))
        self.assert_same(_logged("login protocol={protocol} client={client} user={user} backend_ms={ms:.1f}",
                                 protocol="pop3", client="2001:db8::1", user='"al{ice}"', ms=3.25))
        self.assert_same(_logged("settings {settings!r} at {where.name} first {items[0]} width {n:>{w}}",
                                 settings={"a": 1}, where=_Named("x"), items=["i"], n=7, w=5))

    def test_multiline_and_levels(self) -> None:
        """Continuation lines are indented by a tab; the level and namespace name the system."""
        event = _logged("two\nlines {x}", x="a\nb")
        for level in (LogLevel.warn, LogLevel.error, None):
            event["log_level"] = level
            self.assert_same(event)

    def test_fallbacks(self) -> None:
        """Callable fields, missing keys, failures, flattened and odd events: Twisted's own text."""
        self.assert_same(_logged("called {f()}", f=lambda: "yes"))
        self.assert_same(_logged("missing {nothere}"))
        self.assert_same(_logged("bad spec {x:q}", x=1))
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        event = _logged("failed {x}", x=1)
        event["log_failure"] = failure
        self.assert_same(event)
        self.assert_same({"log_format": b"bytes {x}", "x": 1, "log_time": 1.0})
        self.assert_same({"log_format": "legacy {log_text}", "log_text": "t", "log_system": "-", "log_time": 2.5})
        self.assert_same({"log_format": "odd system", "log_system": 42, "log_time": 2.5})
        self.assert_same({"log_format": "no time"})
        self.assert_same({"log_format": "", "log_time": 3.0})
        self.assert_same({"message": ("no format",), "log_time": 3.0})

    def test_timestamps(self) -> None:
        """Events within a second, across seconds and back again all carry Twisted's timestamp."""
        event = _logged("tick")
        for when in (1000.0, 1000.999, 1001.0, 1000.5, 1_800_000_000.25, 1_800_000_000.75, 1_800_000_001.0):
            event["log_time"] = when
            self.assert_same(event)

    def test_observer_writes(self) -> None:
        """The observer writes the lines to its file, and nothing for an empty event."""
        out = io.StringIO()
        observer = text_file_observer(out)
        event = _logged("hello {who}", who="world")
        observer(event)
        observer({"log_format": "", "log_time": 1.0})
        self.assertEqual(out.getvalue(), formatEventAsClassicLogText(event))


def _event(log_time: float, format: str = "tick", **fields: object) -> LogEvent:
    """A Logger-style event at C{log_time}."""
    return {"log_format": format, "log_namespace": "gateway.frontend", "log_level": LogLevel.info,
            "log_time": log_time, **fields}


class _Abort(BaseException):
    """A BaseException that is not an Exception (as KeyboardInterrupt, SystemExit, CancelledError are)."""


class _Interrupting:
    """A field whose formatting is interrupted by a BaseException."""

    def __format__(self, spec: str) -> str:
        raise _Abort()


class TimestampTests(SynchronousTestCase):
    """Timestamps are Twisted's, whatever the fraction of the second."""

    def test_last_microsecond_rounds_up(self) -> None:
        """
        A time whose fraction rounds to a whole microsecond of the next second (as time.time() gives
        about once in two million calls) carries the next second, as Twisted's formatTime rounds it,
        whether or not the second before is cached.
        """
        second = 1_800_000_000
        late = second + (1 - 2**-22)  # the largest float below second + 1
        self.assertEqual(format_event(_event(late)), formatEventAsClassicLogText(_event(late)))
        format_event(_event(second + 0.25))
        self.assertEqual(format_event(_event(late)), formatEventAsClassicLogText(_event(late)))

    def test_negative_fraction(self) -> None:
        """A time before the epoch with a fraction carries the second it falls in, not the one after."""
        for when in (-0.5, -1.5, -1_031_504_400.5):
            self.assertEqual(format_event(_event(when)), formatEventAsClassicLogText(_event(when)))

    def test_time_zone_change_within_a_second(self) -> None:
        """After the process's time zone changes, the next line carries the new offset at once."""
        saved = os.environ.get("TZ")

        def restore() -> None:
            if saved is None:
                os.environ.pop("TZ", None)
            else:
                os.environ["TZ"] = saved
            time.tzset()

        self.addCleanup(restore)
        os.environ["TZ"] = "UTC"
        time.tzset()
        format_event(_event(1_800_000_000.1))
        os.environ["TZ"] = "JST-9"  # a POSIX rule: needs no tzdata
        time.tzset()
        later = _event(1_800_000_000.2)
        self.assertEqual(format_event(later), formatEventAsClassicLogText(later))

    def test_text_time_is_refused(self) -> None:
        """A log_time that is not a number fails to format as Twisted's formatting fails."""
        event = _event(0.0)
        event["log_time"] = "12"
        self.assertRaises(TypeError, formatEventAsClassicLogText, event)
        self.assertRaises(TypeError, format_event, event)


class FormatTests(SynchronousTestCase):
    """Messages are filled in exactly as Twisted's string.Formatter-based formatting fills them in."""

    def test_dunder_attributes(self) -> None:
        """Fields reaching attributes Twisted's call wrapper has itself read as Twisted reads them."""
        for format in ("{e.__class__.__name__}: {e}", "{e.__class__}", "{e.__doc__}"):
            event = _event(5.0, format, e=ValueError("bad"))
            self.assertEqual(format_event(event), formatEventAsClassicLogText(event))

    def test_literal_call_key(self) -> None:
        """A field name ending in "()" is a call, never a key of that name, even if the event has one."""
        event = _event(5.0, "{f()}", **{"f()": "literal"})
        self.assertEqual(format_event(event), formatEventAsClassicLogText(event))

    def test_base_exception_while_formatting(self) -> None:
        """
        A field whose formatting raises a BaseException gives Twisted's "Unable to format event"
        line; nothing escapes the observer into the code that logged.
        """
        event = _event(5.0, "value={v}", v=_Interrupting())
        out = io.StringIO()
        logger = Logger(namespace="gateway.frontend", observer=LogPublisher(text_file_observer(out)))
        try:
            line = format_event(event)
            logger.info("value={v}", v=_Interrupting())
        except _Abort:
            self.fail("the BaseException raised while formatting escaped format_event")
        self.assertEqual(line, formatEventAsClassicLogText(event))
        self.assertIn("Unable to format event", out.getvalue())


class RunnerTests(SynchronousTestCase):
    """Which runner options get the faster lines."""

    def twistd(self, *argv: str) -> object:
        options = ServerOptions()
        options.parseOptions([*argv, "mailgateway", "--config", "/nonexistent.toml"])
        return options["logger"]

    def test_twistd_foreground_to_stdout(self) -> None:
        """twistd -n, with no log file or with "-", writes to standard output through stdout_observer."""
        self.assertIs(self.twistd("-n"), stdout_observer)
        self.assertIs(self.twistd("-n", "--logfile", "-"), stdout_observer)

    def test_twistd_left_alone(self) -> None:
        """A daemon, a log file, syslog and a --logger of one's own keep twistd's choice."""
        self.assertIsNone(self.twistd())
        self.assertIsNone(self.twistd("-n", "--logfile", "/tmp/gateway.log"))
        self.assertIsNone(self.twistd("-n", "--syslog"))
        self.assertIs(self.twistd("-n", "--logger", "twisted.logger.jsonFileLogObserver"), jsonFileLogObserver)

    def test_twist(self) -> None:
        """twist --log-format=text gets text_file_observer; JSON stays JSON."""
        for argv, expected in ((["--log-format=text"], text_file_observer), (["--log-format=json"], jsonFileLogObserver)):
            options = TwistOptions()
            options.parseOptions([*argv, "mailgateway", "--config", "/nonexistent.toml"])
            self.assertIs(options["fileLogObserverFactory"], expected)

    def test_alone(self) -> None:
        """The plugin's options parsed without a runner change nothing."""
        use_for(None)
