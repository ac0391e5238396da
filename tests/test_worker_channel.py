"""Tests for gateway.worker_channel: the supervisor's gatekeeper and log, as workers reach them."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Callable
from dataclasses import replace

from frontend_harness import FrontEndTestBase
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogEvent, Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gateway.connection_limits import ConnectionLimits, ConnectionRules
from gateway.gatekeeper import FailureCount, LocalGatekeeper, LoginCheck
from gateway.imap import ImapFrontEnd
from gateway.penalties import LoginPenalties, PenaltyRules
from gateway.worker_channel import (
    MAX_MESSAGE,
    MAX_NAME,
    MAX_UNREAD,
    SESSION_SLACK,
    RemoteGatekeeper,
    SupervisorChannel,
    WorkerChannel,
    loggable,
)
from gateway.workers import SingleProtocolFactory

CLIENT = "198.51.100.7"


class Worker:
    """One worker's channel to the shared supervisor, pumped by hand."""

    def __init__(self, case: ChannelTests, configuration: Callable[[], str] = lambda: "[gateway]\n") -> None:
        self.lost = 0
        self.ready = 0
        self.orphaned: list[LogEvent] = []
        self.supervisor = SupervisorChannel(case.shared, case.published.append, 4321, configuration, self._ready)
        self.channel = WorkerChannel(self._lost, self.orphaned.append)
        self.pump = iosim.connect(self.supervisor, iosim.FakeTransport(self.supervisor, True),
                                  self.channel, iosim.FakeTransport(self.channel, False))
        key = self.answer(self.channel.call("hello"))
        self.configuration = self.answer(self.channel.call("configuration"))
        self.gatekeeper = RemoteGatekeeper(self.channel, base64.b64decode(key))  # type: ignore[arg-type]

    def _lost(self) -> None:
        self.lost += 1

    def _ready(self) -> None:
        self.ready += 1

    def answer(self, asking: Deferred[object]) -> object:
        """Pump until C{asking} has fired; its result."""
        self.pump.flush()
        return self.result(asking)

    @staticmethod
    def result(asking: Deferred[object]) -> object:
        results: list[object] = []
        asking.addBoth(results.append)
        assert results, "no answer"
        return results[0]


class ChannelTests(SynchronousTestCase):
    """Workers asking one supervisor see one set of counts."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.connections = ConnectionLimits(ConnectionRules(max_per_address=2, max_sessions_per_user=1))
        self.penalties = LoginPenalties(self.clock, PenaltyRules(base_delay=2.0, max_delay=60.0, ip_budget=3))
        self.shared = LocalGatekeeper(self.connections, self.penalties)
        self.published: list[LogEvent] = []

    def test_closed_by_a_stopping_worker(self) -> None:
        """
        A stopping worker closes its channel once its last log lines are sent; the supervisor gets
        them, and the worker's loss handler (which stops the worker) is not called: it is stopping.
        """
        worker = Worker(self)
        Logger(namespace="gateway.frontend", observer=worker.channel.emit).info("disconnect last=1")
        closed = worker.channel.close()
        self.assertNoResult(closed)
        worker.pump.flush()
        self.successResultOf(closed)
        self.assertEqual([event["log_format"].split(" ")[0] for event in self.published],
                         ["disconnect", "worker_channel_closed"])
        self.assertEqual(worker.lost, 0)
        self.successResultOf(worker.channel.close())  # again, once closed: at once
        Logger(observer=worker.channel.emit).info("Main loop terminated.")
        self.assertEqual(worker.orphaned, [])

    def test_orphaned_worker_logs_on(self) -> None:
        """
        A worker whose supervisor has gone logs what it still does (the connections it then
        ends) to its fallback, as it was, where it had dropped those lines.
        """
        worker = Worker(self)
        logger = Logger(namespace="gateway.submission", observer=worker.channel.emit)
        logger.info("login user=alice")
        worker.pump.flush()
        worker.supervisor.transport.loseConnection()  # type: ignore[union-attr]
        worker.pump.flush()
        self.assertEqual(worker.lost, 1)
        logger.info("message user={user} size={size}", user="alice", size=120)
        self.assertEqual([event["log_format"].split(" ")[0] for event in self.published],
                         ["login", "worker_channel_closed"])
        [event] = worker.orphaned
        self.assertEqual(formatEvent(event), "message user=alice size=120")
        self.assertEqual(event["log_namespace"], "gateway.submission")

    def test_limits_count_every_worker(self) -> None:
        """A per-address limit of 2 refuses the third connection, whichever worker each came to."""
        first, second = Worker(self), Worker(self)
        self.assertIsNone(first.answer(first.gatekeeper.admit(CLIENT)))
        self.assertIsNone(second.answer(second.gatekeeper.admit(CLIENT)))
        self.assertEqual(first.answer(first.gatekeeper.admit(CLIENT)), "max_connections_per_ip")
        second.gatekeeper.release(CLIENT)
        second.pump.flush()
        self.assertIsNone(first.answer(first.gatekeeper.admit(CLIENT)))
        self.assertEqual(self.connections.connections, 2)

    def test_sessions_count_every_worker(self) -> None:
        """A user with one session allowed gets no second one on another worker, and one after closing."""
        first, second = Worker(self), Worker(self)
        first.answer(first.gatekeeper.admit(CLIENT))
        second.answer(second.gatekeeper.admit(CLIENT))
        self.assertIs(first.answer(first.gatekeeper.open_session("alice")), True)
        self.assertIs(second.answer(second.gatekeeper.open_session("alice")), False)
        self.assertEqual(second.answer(second.gatekeeper.check_login("alice", CLIENT)), LoginCheck(False, True))
        first.gatekeeper.close_session("alice")
        first.pump.flush()
        self.assertEqual(self.connections.sessions("alice"), 0)

    def test_names_beyond_ascii(self) -> None:
        """A user name beyond ASCII crosses the channel escaped, and counts as the same user on every worker."""
        first, second = Worker(self), Worker(self)
        first.answer(first.gatekeeper.admit(CLIENT))
        second.answer(second.gatekeeper.admit(CLIENT))
        self.assertIs(first.answer(first.gatekeeper.open_session("jörg@bücher.example")), True)
        self.assertIs(second.answer(second.gatekeeper.open_session("jörg@bücher.example")), False)
        self.assertEqual(self.connections.sessions("jörg@bücher.example"), 1)

    def test_failures_count_every_worker(self) -> None:
        """Failures from one address escalate across workers; the same wrong password counts once."""
        first, second = Worker(self), Worker(self)
        self.assertEqual(first.answer(first.gatekeeper.failed("alice", CLIENT, b"guess-1")), FailureCount(2.0, False))
        self.assertEqual(second.answer(second.gatekeeper.failed("alice", CLIENT, b"guess-2")), FailureCount(4.0, False))
        self.assertEqual(first.answer(first.gatekeeper.failed("alice", CLIENT, b"guess-2")), FailureCount(8.0, True))
        self.assertEqual(second.answer(second.gatekeeper.failed("alice", CLIENT, b"guess-3")), FailureCount(8.0, False))
        self.assertEqual(first.answer(first.gatekeeper.check_login("alice", CLIENT)), LoginCheck(True, False))
        second.gatekeeper.succeeded("alice", CLIENT)
        second.pump.flush()
        self.assertEqual(self.penalties.sizes()[0], 0)

    def test_fingerprints_not_passwords(self) -> None:
        """What crosses the channel for a failed login holds no password."""
        worker = Worker(self)
        sent: list[bytes] = []
        write = worker.channel.transport.write  # type: ignore[union-attr]
        worker.channel.transport.write = lambda data: (sent.append(data), write(data))  # type: ignore[union-attr]
        worker.answer(worker.gatekeeper.failed("alice", CLIENT, b"hunter2-secret"))
        self.assertTrue(sent)
        self.assertFalse(any(b"hunter2" in data or base64.b64encode(b"hunter2-secret")[:8] in data for data in sent))

    def test_cancelled_question_is_undone(self) -> None:
        """A session or connection counted for a client that left meanwhile is given back."""
        worker = Worker(self)
        worker.answer(worker.gatekeeper.admit(CLIENT))
        opening = worker.gatekeeper.open_session("alice")
        admitting = worker.gatekeeper.admit(CLIENT)
        opening.cancel()
        admitting.cancel()
        self.assertIsInstance(worker.result(opening).value, CancelledError)  # type: ignore[attr-defined]
        worker.result(admitting)
        worker.pump.flush()
        self.assertEqual(self.connections.sessions("alice"), 0)
        self.assertEqual(self.connections.connections, 1)  # the first, still held

    def test_lost_worker_releases_its_counts(self) -> None:
        """When a worker's channel closes, its connections and sessions no longer count; the other's do."""
        first, second = Worker(self), Worker(self)
        first.answer(first.gatekeeper.admit(CLIENT))
        first.answer(first.gatekeeper.open_session("alice"))
        second.answer(second.gatekeeper.admit(CLIENT))
        first.supervisor.transport.loseConnection()  # type: ignore[union-attr]
        first.pump.flush()
        self.assertEqual(self.connections.connections, 1)
        self.assertEqual(self.connections.sessions("alice"), 0)
        self.assertEqual(first.lost, 1)
        failed = first.channel.call("admit", CLIENT)
        self.assertIsInstance(first.result(failed).value, ConnectionError)  # type: ignore[attr-defined]

    def test_hello_and_ready(self) -> None:
        """A new worker learns the supervisor's configuration text; its ready notice reaches the supervisor."""
        worker = Worker(self)
        self.assertEqual((worker.configuration, worker.ready), ("[gateway]\n", 0))
        worker.channel.tell("ready")
        worker.pump.flush()
        self.assertEqual(worker.ready, 1)

    def test_configuration_is_the_supervisors_latest(self) -> None:
        """Asked again (at a reload), the supervisor answers the text it runs with at that time."""
        texts = ["[gateway]\n"]
        worker = Worker(self, lambda: texts[-1])
        texts.append("[gateway]\nworkers = 2\n")
        self.assertEqual(worker.answer(worker.channel.call("configuration")), "[gateway]\nworkers = 2\n")
        self.assertEqual(worker.lost, 0)

    def test_unknown_release_is_ignored(self) -> None:
        """A worker cannot release what it never held (another worker's count stays)."""
        first, second = Worker(self), Worker(self)
        first.answer(first.gatekeeper.admit(CLIENT))
        second.gatekeeper.release(CLIENT)
        second.gatekeeper.close_session("alice")
        second.pump.flush()
        self.assertEqual(self.connections.connections, 1)

    def test_sessions_only_for_connections(self) -> None:
        """
        A worker gets no more sessions than it holds connections (each is a client's), but for
        SESSION_SLACK (undos on their way): asked for more, it is answered as for a user at the
        limit, and takes no session of the user.
        """
        rogue, honest = Worker(self), Worker(self)
        self.connections.rules = replace(self.connections.rules, max_sessions_per_user=2)
        for number in range(SESSION_SLACK):
            self.assertIs(rogue.answer(rogue.gatekeeper.open_session(f"user{number}")), True)
        for name in ("alice", "mallory", "x" * 200):
            self.assertIs(rogue.answer(rogue.gatekeeper.open_session(name)), False)
        self.assertEqual(self.connections.sessions("alice"), 0)
        rogue.answer(rogue.gatekeeper.admit(CLIENT))
        self.assertIs(rogue.answer(rogue.gatekeeper.open_session("alice")), True)  # one connection, one more
        self.assertIs(rogue.answer(rogue.gatekeeper.open_session("alice")), False)
        rogue.gatekeeper.release(CLIENT)
        self.assertIs(rogue.answer(rogue.gatekeeper.open_session("carol")), False)
        self.assertIs(honest.answer(honest.gatekeeper.admit(CLIENT)), None)
        self.assertIs(honest.answer(honest.gatekeeper.open_session("alice")), True)
        self.assertEqual((rogue.lost, honest.lost), (0, 0))
        self.assertEqual(self.connections.sessions("alice"), 2)

    def test_session_of_a_client_gone_meanwhile(self) -> None:
        """
        A client that left while its session was being opened has its connection released before
        the session's undo comes: another client's session, asked for meanwhile, is not refused.
        """
        worker = Worker(self)
        worker.answer(worker.gatekeeper.admit(CLIENT))
        opening = worker.gatekeeper.open_session("alice")
        worker.gatekeeper.release(CLIENT)  # the client left; the late answer's undo is on its way
        worker.answer(worker.gatekeeper.admit(CLIENT))
        self.assertIs(worker.answer(worker.gatekeeper.open_session("bob")), True)
        self.assertIs(worker.answer(opening), True)

    def test_bad_arguments_close_channel(self) -> None:
        """
        A question whose arguments are not names (text of at most MAX_NAME characters), or whose
        fingerprint is not one, closes the worker's channel, as any bad message does; what it
        held is released.
        """
        long, fingerprint = "x" * (MAX_NAME + 1), base64.b64encode(bytes(16)).decode("ascii")
        messages: list[tuple[object, ...]] = [
            ("1", "hello"), (1, "admit", 5), (1, "admit", None), (1, "admit", long), (1, "admit", ["x"]),
            (0, "release", None), (1, "check_login", "alice", 7), (1, "check_login", long, CLIENT),
            (1, "open_session", {"a": 1}), (1, "open_session", long), (0, "close_session", long),
            (1, "failed", "alice", CLIENT, "!!" + fingerprint), (1, "failed", "alice", CLIENT, fingerprint[:12]),
            (1, "failed", "alice", long, fingerprint), (0, "succeeded", "alice", None), (0, "log", ["x"]),
        ]
        for message in messages:
            worker = Worker(self)
            worker.answer(worker.gatekeeper.admit(CLIENT))
            worker.channel.send(*message)
            worker.pump.flush()
            self.assertEqual(worker.lost, 1, message)
            self.assertEqual(self.connections.connections, 0, message)
            self.assertEqual(len(self.flushLoggedErrors(ValueError, TypeError)), 1, message)
        worker = Worker(self)
        name = "y" * MAX_NAME
        self.assertIsNone(worker.answer(worker.gatekeeper.admit(name)))
        self.assertEqual(worker.answer(worker.gatekeeper.check_login(name, name)), LoginCheck(False, False))
        self.assertIs(worker.answer(worker.gatekeeper.open_session(name)), True)
        self.assertEqual(worker.answer(worker.gatekeeper.failed(name, name, b"wrong")), FailureCount(2.0, False))
        self.assertEqual(worker.lost, 0)

    def test_bad_message_closes_channel(self) -> None:
        """A message the supervisor cannot read closes that worker's channel and is logged."""
        worker = Worker(self)
        worker.channel.send(1, "no-such-question")
        worker.pump.flush()
        self.assertEqual(worker.lost, 1)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_message_beyond_ascii_closes_channel(self) -> None:
        """The channel's messages are ASCII (JSON escapes the rest): raw bytes beyond it are a bad message."""
        worker = Worker(self)
        assert worker.channel.transport is not None
        worker.channel.transport.write('[1,"admit","198.51.100.7\u00e9"]\n'.encode("utf-8"))
        worker.pump.flush()
        self.assertEqual(worker.lost, 1)
        self.assertEqual(len(self.flushLoggedErrors(UnicodeDecodeError)), 1)

    def test_log_events_are_published(self) -> None:
        """A worker's event reaches the supervisor's log with its level, namespace, time and text."""
        worker = Worker(self)
        logger = Logger(namespace="gateway.frontend", observer=worker.channel.emit)
        logger.warn("login_failed protocol={protocol} client={client} n={n}", protocol="imap", client=CLIENT, n=3)
        worker.pump.flush()
        [event] = self.published
        self.assertEqual(formatEvent(event), f"login_failed protocol=imap client={CLIENT} n=3")
        self.assertEqual((event["log_level"], event["log_namespace"], event["n"]), (LogLevel.warn, "gateway.frontend", 3))
        self.assertIsInstance(event["log_time"], float)

    def test_supervisor_events_not_taken(self) -> None:
        """
        A worker's event in a namespace only the supervisor logs in (a forgery, such as another
        worker's channel closing, which the metrics act on) is dropped; the worker's own pass.
        """
        worker = Worker(self)
        for namespace in ("gateway.worker_channel", "gateway.workers"):
            worker.channel.tell("log", {"log_namespace": namespace, "log_format": "worker_channel_closed pid={pid}",
                                        "pid": 1001})
        Logger(namespace="gateway.frontend", observer=worker.channel.emit).info("connect protocol={protocol}",
                                                                                   protocol="imap")
        worker.pump.flush()
        self.assertEqual([event["log_namespace"] for event in self.published], ["gateway.frontend"])
        self.assertEqual(worker.lost, 0)

    def test_worker_logs_as_worker(self) -> None:
        """The worker's end of the channel logs as the worker, so that the supervisor publishes its events."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        worker = Worker(self, lambda: "#" * MAX_MESSAGE)
        self.assertEqual(worker.lost, 1)  # the configuration was too long to read
        [event] = [event for event in events if event["log_format"].startswith("worker_channel_message_too_long")]
        self.assertEqual(event["log_namespace"], "gateway.worker")

    def test_failure_event_keeps_traceback(self) -> None:
        """A logged failure arrives as its message followed by its traceback."""
        worker = Worker(self)
        logger = Logger(namespace="gateway.frontend", observer=worker.channel.emit)
        try:
            raise ValueError("broken {braces}")
        except ValueError:
            logger.failure("login handling failed client={client}", client=CLIENT)
        worker.pump.flush()
        [event] = self.published
        text = formatEvent(event)
        self.assertTrue(text.startswith(f"login handling failed client={CLIENT}\n"), text)
        self.assertIn("ValueError: broken {braces}", text)
        self.assertEqual(event["log_level"], LogLevel.critical)

    def test_loggable_cuts_and_stringifies(self) -> None:
        """Objects become text, long values are cut, the logger itself is left behind."""
        fields = loggable({"log_format": "{thing} {long}", "thing": object(), "long": "x" * 100_000,
                           "log_logger": Logger(), "log_level": LogLevel.info})
        self.assertIsInstance(fields["thing"], str)
        self.assertLess(len(fields["long"]), 20_000)
        self.assertNotIn("log_logger", fields)
        self.assertEqual(fields["log_level_name"], "info")


class _WatchedChannel(SupervisorChannel):
    """A supervisor's channel that says when it has closed."""

    def __init__(self, *arguments: object) -> None:
        super().__init__(*arguments)  # type: ignore[arg-type]
        self.closed: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        super().connectionLost(reason)
        self.closed.callback(None)


class UnreadAnswersTests(TestCase):
    """A worker that asks and never reads, on a real UNIX socket pair as the supervisor adopts it."""

    @inlineCallbacks
    def test_cut_off(self):  # type: ignore[no-untyped-def]
        """
        The supervisor holds no more than MAX_UNREAD of answers (and one answer) for a worker that
        does not read them, then cuts the channel: what the worker held is released, and the
        worker's end sees its channel close (which stops a worker).
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        connections = ConnectionLimits(ConnectionRules())
        gatekeeper = LocalGatekeeper(connections, LoginPenalties(Clock(), PenaltyRules()))
        configuration = "# a line of a configuration\n" * 150  # 4 KB, asked for by 20 bytes
        published: list[LogEvent] = []
        channel = _WatchedChannel(gatekeeper, published.append, 99, lambda: configuration, lambda: None)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(theirs.close)
        with ours:
            reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, SingleProtocolFactory(channel))
        self.addCleanup(lambda: channel.transport and channel.transport.abortConnection())
        theirs.sendall(b'[1,"admit","198.51.100.7"]\n')
        # Twice what MAX_UNREAD holds, and all of it fits in the socket's buffer: sent at once.
        asking = b'[2,"configuration"]\n' * (2 * MAX_UNREAD // len(configuration))
        self.assertLess(len(asking), theirs.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2)
        theirs.sendall(asking)
        yield channel.closed.addTimeout(10, reactor)
        [cut] = [event for event in events if event["log_format"].startswith("worker_channel_unread")]
        self.assertEqual(cut["pid"], 99)
        self.assertGreater(cut["backlog"], MAX_UNREAD)
        self.assertLessEqual(cut["backlog"], MAX_UNREAD + len(json.dumps([2, configuration])) + 1)
        self.assertEqual(connections.connections, 0)
        self.assertEqual([event["log_format"].split()[0] for event in published], ["worker_channel_closed"])
        theirs.settimeout(10)
        try:
            while theirs.recv(65536):
                pass  # the answers the socket took before the cut
        except ConnectionResetError:
            pass  # the supervisor closed with questions unread


class WorkerFrontEndTests(FrontEndTestBase):
    """An IMAP front end in a worker: its gatekeeper is the supervisor's, over an in-memory channel."""

    front_end = ImapFrontEnd
    protocol = "imap"
    # Allowed by the configuration ([limits] line_length goes up to 65536).
    limits = replace(FrontEndTestBase.limits, line_length=40000)

    def setUp(self) -> None:
        super().setUp()
        self.front.connectionLost(Failure(ConnectionDone()))
        self.channel_lost = 0
        supervisor = SupervisorChannel(self.context.gatekeeper, lambda event: None, 1, str, int)  # type: ignore[arg-type]
        channel = WorkerChannel(self._lost)
        self.pump = iosim.connect(supervisor, iosim.FakeTransport(supervisor, True),
                                  channel, iosim.FakeTransport(channel, False))
        answers: list[str] = []
        channel.call("hello").addCallback(answers.append)
        self.pump.flush()
        self.context = replace(self.context, gatekeeper=RemoteGatekeeper(channel, base64.b64decode(answers[0])))
        self.front, self.transport = self.connect("192.0.2.9")
        self.pump.flush()
        self.read()

    def _lost(self) -> None:
        self.channel_lost += 1

    def test_long_user_name_keeps_channel(self) -> None:
        """
        A LOGIN whose user name fits the configured line length is answered NO, and the worker
        keeps its channel to the supervisor (losing it stops the worker and drops all its clients).
        """
        user = "\u0390" * 19000  # 38000 bytes of UTF-8; its case-folded key is 57000 characters
        self.front.dataReceived(b'a LOGIN "' + user.encode("utf-8") + b'" wrong\r\n')
        self.pump.flush()
        self.clock.advance(5)
        self.pump.flush()
        self.flushLoggedErrors(ConnectionError)
        self.assertEqual(self.channel_lost, 0)
        self.assertTrue(self.read().startswith(b"a NO "))
