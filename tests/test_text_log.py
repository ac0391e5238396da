"""gateway.text_log: the same text lines as Twisted's observer writes, and when the runner uses it."""

from __future__ import annotations

import io

from twisted.application.twist._options import TwistOptions
from twisted.logger import LogEvent, Logger, LogLevel, formatEventAsClassicLogText, jsonFileLogObserver
from twisted.python.failure import Failure
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SynchronousTestCase

from gateway.text_log import format_event, stdout_observer, text_file_observer, use_for


class _Named:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<Named {self.name}>"


def _events(format: str, **fields: object) -> LogEvent:
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
        self.assert_same(_events("connect protocol={protocol} client={client} port={client_port} listener={listener} "
                                 "tls={tls}", protocol="imap", client="192.0.2.7", client_port=54321,
                                 listener=993, tls="implicit"))
        self.assert_same(_events("login protocol={protocol} client={client} user={user} backend_ms={ms:.1f}",
                                 protocol="pop3", client="2001:db8::1", user='"al{ice}"', ms=3.25))
        self.assert_same(_events("settings {settings!r} at {where.name} first {items[0]} width {n:>{w}}",
                                 settings={"a": 1}, where=_Named("x"), items=["i"], n=7, w=5))

    def test_multiline_and_levels(self) -> None:
        """Continuation lines are indented by a tab; the level and namespace name the system."""
        event = _events("two\nlines {x}", x="a\nb")
        for level in (LogLevel.warn, LogLevel.error, None):
            event["log_level"] = level
            self.assert_same(event)

    def test_fallbacks(self) -> None:
        """Callable fields, missing keys, failures, flattened and odd events: Twisted's own text."""
        self.assert_same(_events("called {f()}", f=lambda: "yes"))
        self.assert_same(_events("missing {nothere}"))
        self.assert_same(_events("bad spec {x:q}", x=1))
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        event = _events("failed {x}", x=1)
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
        event = _events("tick")
        for when in (1000.0, 1000.999, 1001.0, 1000.5, 1_800_000_000.25, 1_800_000_000.75, 1_800_000_001.0):
            event["log_time"] = when
            self.assert_same(event)

    def test_observer_writes(self) -> None:
        """The observer writes the lines to its file, and nothing for an empty event."""
        out = io.StringIO()
        observer = text_file_observer(out)
        event = _events("hello {who}", who="world")
        observer(event)
        observer({"log_format": "", "log_time": 1.0})
        self.assertEqual(out.getvalue(), formatEventAsClassicLogText(event))


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
