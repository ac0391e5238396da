"""A server and a client of Twisted's TLS layer connected in memory, for tests of what crosses it."""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.test.iosim import FakeTransport, IOPump, connect

from gateway.tls import ServerTLS, client_tls


class Collector(Protocol):
    """Keeps what it receives."""

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


@dataclass
class TLSPair:
    """
    :ivar server: the server's TLS protocol (what a front end writes to under implicit TLS);
        its C{wrappedProtocol} is the server protocol, by default a L{Collector} of what the server decrypted.
    :ivar wire: the server's transport below TLS (what reached the socket).
    :ivar collector: what the client decrypted.
    :ivar pump: moves bytes between the two; it advances C{clock}.
    """

    server: TLSMemoryBIOProtocol
    wire: FakeTransport
    collector: Collector
    pump: IOPump
    clock: Clock


def memory_bios(tls: TLSMemoryBIOProtocol) -> tuple[object, object]:
    """The memory BIOs through which a TLS protocol's connection reads and writes records (new ones
    after each :func:`gateway.tls.release_tls_buffers`)."""
    connection = tls._tlsConnection
    return connection._into_ssl, connection._from_ssl


def tls_pair(chain: str, key: str, ca: str, server_protocol: Protocol | None = None,
             client_creator: IOpenSSLClientConnectionCreator | None = None) -> TLSPair:
    """
    Connect a gateway server TLS (for C{localhost}, chain and key) to a client trusting C{ca}; handshake done.

    :param server_protocol: what runs over the server's TLS (by default a L{Collector}).
    :param client_creator: the client's TLS, by default the gateway's backend TLS (L{client_tls}) for C{localhost}.
    """
    clock = Clock()
    inner = Factory.forProtocol(Collector) if server_protocol is None else Factory.forProtocol(lambda: server_protocol)
    server_factory = TLSMemoryBIOFactory(ServerTLS(chain, key, b"imap"), False, inner, clock=clock)
    creator = client_tls("localhost", ca) if client_creator is None else client_creator
    client_factory = TLSMemoryBIOFactory(creator, True, Factory.forProtocol(Collector), clock=clock)
    server = server_factory.buildProtocol(None)
    client = client_factory.buildProtocol(None)
    wire = FakeTransport(server, isServer=True)
    pump = connect(server, wire, client, FakeTransport(client, isServer=False), clock=clock)
    return TLSPair(server, wire, client.wrappedProtocol, pump, clock)  # type: ignore[arg-type]
