"""
Tests for gateway.event_loop: Twisted's epoll reactor, switched to the lighter hand-over of ready
descriptors and to slotted TCP connections.

Each test runs its own reactor (not the one the test suite runs on) over real socket pairs.
If these fail after a Twisted upgrade, gateway.event_loop must follow Twisted's epoll reactor again.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import shutil
import socket
import tempfile

from twisted.internet import tcp, unix
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import CONNECTION_DONE
from twisted.internet.protocol import ClientFactory, Factory
from twisted.internet.selectreactor import SelectReactor
from twisted.logger import capturedLogs
from twisted.python import log
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from gateway.event_loop import streamline
from gateway.slots import SlottedClient, SlottedConnector, SlottedServer


class _Reader:
    """A descriptor the reactor reads: one end of a socket pair; what it does on reading is set per test."""

    def __init__(self, test: SynchronousTestCase, name: str) -> None:
        self.socket, self.peer = socket.socketpair()
        test.addCleanup(self.socket.close)
        test.addCleanup(self.peer.close)
        self.socket.setblocking(False)
        self.name = name
        self.read: list[bytes] = []
        self.lost: list[Failure] = []
        self.on_read = lambda: None

    def fileno(self) -> int:
        return self.socket.fileno()

    def logPrefix(self) -> str:
        return self.name

    def doRead(self) -> object:
        self.read.append(self.socket.recv(100))
        return self.on_read()

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)


def _close_wakers(reactor: EPollReactor | SelectReactor) -> None:
    """Close the waker a reactor opened for itself."""
    for waker in reactor._internalReaders:
        waker.connectionLost(Failure(CONNECTION_DONE))


class StreamlineTests(SynchronousTestCase):
    """The switched reactor hands ready descriptors over as Twisted's does, less the per-event log context."""

    def setUp(self) -> None:
        self.reactor = EPollReactor()
        self.addCleanup(self._close, self.reactor)
        streamline(self.reactor)

    @staticmethod
    def _close(reactor: EPollReactor) -> None:
        """Close what the reactor opened: its waker and its epoll descriptor (the tests close their sockets)."""
        _close_wakers(reactor)
        reactor._poller.close()

    def _ending_in(self, name: str, failure: BaseException) -> _Reader:
        """A ready reader whose read ends its connection, and whose connectionLost then raises ``failure``."""
        reader = _Reader(self, name)
        reader.on_read = lambda: CONNECTION_DONE

        def lost(reason: Failure) -> None:
            raise failure

        reader.connectionLost = lost  # type: ignore[method-assign]
        self.reactor.addReader(reader)
        reader.peer.send(b"x")
        return reader

    def _ready(self, name: str) -> _Reader:
        """A reader with a byte waiting."""
        reader = _Reader(self, name)
        self.reactor.addReader(reader)
        reader.peer.send(b"x")
        return reader

    def test_switched(self) -> None:
        """The reactor is still Twisted's epoll reactor, with the lighter dispatch."""
        self.assertIsInstance(self.reactor, EPollReactor)
        self.assertIsNot(type(self.reactor), EPollReactor)
        self.assertEqual(self.reactor.doIteration, self.reactor.doPoll)

    def test_other_reactor_left_alone(self) -> None:
        """A reactor that is not Twisted's epoll reactor keeps its class."""
        other = SelectReactor()
        self.addCleanup(_close_wakers, other)
        streamline(other)
        self.assertIs(type(other), SelectReactor)

    def test_reads(self) -> None:
        """A ready descriptor is read."""
        reader = _Reader(self, "reader")
        self.reactor.addReader(reader)
        reader.peer.send(b"a1 NOOP\r\n")
        self.reactor.doIteration(1)
        self.assertEqual(reader.read, [b"a1 NOOP\r\n"])

    def test_read_failure(self) -> None:
        """A descriptor whose reading raises is disconnected and the failure logged, as by Twisted's dispatch."""
        reader = self._ready("reader")
        reader.on_read = lambda: 1 / 0
        with capturedLogs() as events:
            self.reactor.doIteration(1)
        self.assertEqual(len(reader.lost), 1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertTrue(any(event.get("isError") for event in events))

    def test_disconnection_failure(self) -> None:
        """
        A failure raised past Twisted's own handling (by a descriptor's connectionLost) is logged
        under the descriptor's log prefix, and the other ready descriptors are still handled.
        """
        self._ending_in("failing,7,127.0.0.1", RuntimeError("connectionLost failed"))
        other = self._ready("other")
        with capturedLogs() as events:
            self.reactor.doIteration(1)
        self.assertEqual(other.read, [b"x"], "a descriptor ready in the same batch was not handled")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual([event.get("log_system") for event in events if event.get("isError")],
                         ["failing,7,127.0.0.1"])

    def test_exit_logged(self) -> None:
        """Even SystemExit from a handler's disconnection is logged, as callWithLogger logs it, and the batch goes on."""
        self._ending_in("failing", SystemExit(3))
        other = self._ready("other")
        self.reactor.doIteration(1)
        self.assertEqual(other.read, [b"x"])
        self.assertEqual(len(self.flushLoggedErrors(SystemExit)), 1)

    def test_interrupt_raised(self) -> None:
        """KeyboardInterrupt from a handler's disconnection ends the iteration, as with callWithLogger."""
        self._ending_in("reader", KeyboardInterrupt())
        self.assertRaises(KeyboardInterrupt, self.reactor.doIteration, 1)

    def test_removed_in_the_same_batch(self) -> None:
        """A descriptor removed by a handler earlier in the same batch is not handed over."""
        first, second = self._ready("first"), self._ready("second")
        first.on_read = lambda: self.reactor.removeReader(second)
        second.on_read = lambda: self.reactor.removeReader(first)
        self.reactor.doIteration(1)
        self.assertEqual(len(first.read) + len(second.read), 1)


class ConnectionClassTests(SynchronousTestCase):
    """The switched reactor makes its TCP connections slotted (gateway.slots), and leaves UNIX ones alone."""

    def setUp(self) -> None:
        self.reactor = EPollReactor()
        self.addCleanup(StreamlineTests._close, self.reactor)
        streamline(self.reactor)

    def _closing(self, port: tcp.Port | unix.Port) -> None:
        """Close a listening port at the end, without running the reactor."""
        self.addCleanup(port.connectionLost, Failure(CONNECTION_DONE))

    def test_listen(self) -> None:
        """A port it listens on accepts slotted connections."""
        port = self.reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        self._closing(port)
        self.assertIs(port.transport, SlottedServer)

    def test_adopt(self) -> None:
        """A TCP port it adopts (a worker's share of a listening socket) accepts slotted connections."""
        with socket.create_server(("127.0.0.1", 0)) as listening:
            port = self.reactor.adoptStreamPort(listening.fileno(), socket.AF_INET, Factory())
        self._closing(port)
        self.assertIs(port.transport, SlottedServer)

    def test_adopt_unix(self) -> None:
        """A UNIX port it adopts keeps Twisted's connection class."""
        directory = tempfile.mkdtemp(prefix="test_event_loop-")
        self.addCleanup(shutil.rmtree, directory)
        with socket.socket(socket.AF_UNIX) as listening:
            listening.bind(os.path.join(directory, "socket"))
            listening.listen()
            port = self.reactor.adoptStreamPort(listening.fileno(), socket.AF_UNIX, Factory())
        self._closing(port)
        self.assertIs(port.transport, unix.Server)

    def test_connect(self) -> None:
        """A connection it makes (as Twisted's client endpoints do, through connectTCP) is slotted."""
        with socket.create_server(("127.0.0.1", 0)) as listening:
            connector = self.reactor.connectTCP("127.0.0.1", listening.getsockname()[1], ClientFactory(), timeout=5,
                                                bindAddress=("127.0.0.1", 0))
            self.addCleanup(connector.stopConnecting)
            self.assertIsInstance(connector, SlottedConnector)
            self.assertIs(type(connector.transport), SlottedClient)
            self.assertEqual((connector.host, connector.timeout, connector.bindAddress), ("127.0.0.1", 5, ("127.0.0.1", 0)))
            self.assertEqual(connector.transport.getHost().host, "127.0.0.1", "bound as asked")


class TwistedDispatchTests(SynchronousTestCase):
    """
    The Twisted code that gateway.event_loop._Streamlined.doPoll stands in for, as of Twisted 26.10.

    When one fails after a Twisted upgrade, compare the new code with _Streamlined.doPoll, carry
    over what changed, and put the new digest here.
    """

    def assert_unchanged(self, function: object, digest: str) -> None:
        found = hashlib.sha256(inspect.getsource(function).encode()).hexdigest()  # type: ignore[arg-type]
        self.assertEqual(found, digest, f"Twisted's {function.__qualname__} changed: review gateway.event_loop")  # type: ignore[attr-defined]

    def test_epoll_dispatch(self) -> None:
        self.assert_unchanged(EPollReactor.doPoll, "09b62ae68ef01b4bc5eaa170827e2baf0a2a5098e7e7ce7b5e1c80cda187c827")

    def test_call_with_logger(self) -> None:
        self.assert_unchanged(log.callWithLogger, "802f8564bca3531fe46ea2098450b784ad60ff5bf0365c9fb06dda1c7ff668a6")
