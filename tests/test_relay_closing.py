"""
Every way a relay ends, over real loopback sockets: the backend lost, the client lost, and the
relay closed (its idle timeout); for a client on implicit TLS or STARTTLS and a backend in clear,
on implicit TLS or on STARTTLS. The gateway's legs are tuned as the gateway tunes them. Each
connection must then close at both ends.

Twisted closes a TLS connection only once no producer is registered on it, and a TCP transport
whose producer is paused resumes it when its buffer drains instead of closing. So the side whose
loss ends the relay has first been sent more than the loopback buffers hold: the other side's
reading is paused when it happens.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from gateway.relay import CLOSE_GRACE, Splice, close_with_grace
from gateway.sockets import tune
from gateway.testing.pki import TestCA
from gateway.tls import ITLSEndListener, ServerTLS, client_tls

# More than the loopback socket buffers of both ends hold.
_FLOOD = 8 * 1024 * 1024
# How long every connection has to close once the relay has ended.
_CLOSE_WITHIN = 10.0


@implementer(ITLSEndListener)
class _Side(Protocol):
    """
    A connection in the test: a gateway leg feeding the splice (and, as the front end and the
    backend login do, ending the relay when its peer ends TLS), or a peer (client, backend).
    """

    def __init__(self, start_tls: Any = None, leg: bool = False) -> None:
        """
        :param start_tls: the TLS to start at once on connecting (STARTTLS), if any.
        :param leg: a gateway leg, whose connection is tuned as the gateway tunes its own (writes
            sent at once, the records of a bulk write sent from where they lie).
        """
        self.start_tls = start_tls
        self.leg = leg
        self.splice_side: tuple[Any, Any] | None = None  # (what it reads goes to, what its loss calls)
        self.tls_ended: Any = None  # a leg's: what its peer ending TLS calls
        self.closing: Any = None  # the client leg's grace period, once the splice closes it
        self.gone: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        if self.leg:
            tune(self.transport)
        if self.start_tls is not None:
            self.transport.startTLS(self.start_tls)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.splice_side is not None:
            self.splice_side[0](data)

    def tlsEnded(self) -> None:
        if self.tls_ended is not None:
            self.tls_ended()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.closing is not None:
            self.closing.cancel()
        self.gone.callback(None)
        if self.splice_side is not None:
            self.splice_side[1]()


class _RelayClosingMixin:
    """The three ways a relay ends; subclasses choose the client's and the backend's TLS."""

    client_starttls: bool
    backend_tls: str  # "", "implicit" or "starttls"

    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="test_relay_closing-")
        self.addCleanup(shutil.rmtree, directory)  # type: ignore[attr-defined]
        ca = TestCA(directory)
        issued = ca.issue()
        self.server_tls = ServerTLS(issued.chain_path, issued.key_path, b"imap")
        self.client_tls = client_tls("localhost", ca.ca_path)

    @inlineCallbacks
    def connected(self) -> Any:
        """A client, the gateway's two legs spliced, and a backend; handshakes done."""
        legs: dict[str, _Side] = {}
        peers: dict[str, _Side] = {}

        def side(sides: dict[str, _Side], name: str, tls: Any, mode: str) -> Any:
            """A factory of the side C{name}, which starts TLS at once under STARTTLS."""
            leg = sides is legs
            return Factory.forProtocol(lambda: sides.setdefault(name, _Side(tls if mode == "starttls" else None, leg)))

        def listen(sides: dict[str, _Side], name: str, mode: str) -> Deferred[Any]:
            factory = side(sides, name, self.server_tls, mode)
            if mode == "implicit":
                factory = TLSMemoryBIOFactory(self.server_tls, False, factory)
            return TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)

        def connect(sides: dict[str, _Side], name: str, port: Any, mode: str) -> Deferred[Any]:
            endpoint: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
            if mode == "implicit":
                endpoint = wrapClientTLS(self.client_tls, endpoint)
            return endpoint.connect(side(sides, name, self.client_tls, mode))

        client_mode = "starttls" if self.client_starttls else "implicit"
        gateway_port = yield listen(legs, "client", client_mode)
        backend_port = yield listen(peers, "backend", self.backend_tls)
        for port in (gateway_port, backend_port):
            self.addCleanup(port.stopListening)  # type: ignore[attr-defined]
        yield connect(peers, "client", gateway_port, client_mode)
        yield connect(legs, "backend", backend_port, self.backend_tls)
        yield deferLater(reactor, 0.3, lambda: None)  # the handshakes
        sides = [legs["client"], legs["backend"], peers["client"], peers["backend"]]
        for each in sides:
            self.addCleanup(lambda each=each: None if each.gone.called else each.transport.abortConnection())  # type: ignore[attr-defined]
        client_leg = legs["client"]

        def close_client() -> None:
            """As the front end closes its client: cut off after the grace period."""
            client_leg.closing = close_with_grace(client_leg.transport, reactor)  # type: ignore[arg-type]

        self.splice = splice = Splice(client_leg.transport, legs["backend"].transport, reactor,
                                      close_client=close_client)
        legs["client"].splice_side = (splice.from_client, splice.client_lost)
        legs["backend"].splice_side = (splice.from_backend, splice.backend_lost)
        legs["client"].tls_ended = legs["backend"].tls_ended = splice.close
        return peers["client"], peers["backend"], sides

    @inlineCallbacks
    def all_closed(self, sides: list[_Side], within: float = _CLOSE_WITHIN) -> Any:
        """Every connection closes, at both ends, within C{within} seconds."""
        for side in sides:
            timer = reactor.callLater(within, side.gone.cancel)
            try:
                yield side.gone
            except Exception:
                self.fail(f"a connection was still open {within} s after the relay ended")  # type: ignore[attr-defined]
            if timer.active():
                timer.cancel()

    @inlineCallbacks
    def lost(self, going: _Side, other: _Side, sides: list[_Side]) -> Any:
        """C{going} stops reading and C{other} floods it, which pauses the gateway's reading of
        C{other}; then C{going}'s connection breaks."""
        going.transport.pauseProducing()  # type: ignore[union-attr]
        other.transport.write(b"x" * _FLOOD)  # type: ignore[union-attr]
        yield deferLater(reactor, 0.5, lambda: None)
        going.transport.abortConnection()  # type: ignore[union-attr]
        yield self.all_closed(sides)

    @inlineCallbacks
    def test_backend_lost(self) -> Any:
        """The backend goes while the client's reading is paused."""
        client, backend, sides = yield self.connected()
        yield self.lost(backend, client, sides)

    @inlineCallbacks
    def test_client_lost(self) -> Any:
        """The client goes while the backend's reading is paused."""
        client, backend, sides = yield self.connected()
        yield self.lost(client, backend, sides)

    @inlineCallbacks
    def test_client_ends_tls_without_reading(self) -> Any:
        """
        The client stops reading, is flooded, and sends close_notify: it is cut off within the
        grace period, and the backend closed (Twisted alone would wait for ever to send it the rest).
        """
        client, backend, sides = yield self.connected()
        client.transport.pauseProducing()  # type: ignore[union-attr]
        backend.transport.write(b"x" * _FLOOD)  # type: ignore[union-attr]
        yield deferLater(reactor, 0.5, lambda: None)
        client.transport.loseConnection()  # type: ignore[union-attr]  # close_notify
        yield self.all_closed([side for side in sides if side is not client], CLOSE_GRACE + _CLOSE_WITHIN)
        client.transport.resumeProducing()  # type: ignore[union-attr]  # and it finds its connection reset
        yield self.all_closed([client])

    @inlineCallbacks
    def test_closed(self) -> Any:
        """The relay is ended (its idle timeout)."""
        _, _, sides = yield self.connected()
        self.splice.close()
        yield self.all_closed(sides)


# One test class for each client TLS (implicit, STARTTLS) and backend TLS (none, implicit, STARTTLS).
for _client_starttls, _backend_tls in itertools.product((False, True), ("", "implicit", "starttls")):
    _name = f"{'StartTLS' if _client_starttls else 'Implicit'}Client{(_backend_tls or 'plain').title()}BackendTests"
    globals()[_name] = type(_name, (_RelayClosingMixin, TestCase),
                            {"client_starttls": _client_starttls, "backend_tls": _backend_tls})
