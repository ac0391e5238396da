"""
The PROXY protocol (v1 and v2, HAProxy) in front of a mail listener.

A load balancer in front of the gateway prepends a PROXY header naming the real client. Only
configured source addresses may do so; connections from anywhere else are closed at once. Unlike
Twisted's own wrapper, which starts the wrapped protocol at connect (fine for HTTP, where the
client speaks first), the mail front end starts only once the header has been read: a mail
server speaks first, and its greeting, logs, limits and penalties must all see the real client.
The header is parsed by Twisted's v1 and v2 parsers.
"""

from __future__ import annotations

import re

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress, IDelayedCall, IHandshakeListener, IProtocol, IProtocolFactory, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._info import ProxyInfo
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from gateway.addresses import Network, in_networks, parse_ip, plain_address
from gateway.tls import ITLSEndListener

log = Logger()

_V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
_V2_LOCAL = 0x20  # version 2, command LOCAL: the 13th byte of a v2 header

HEADER_TIMEOUT = 10.0
"""Seconds a trusted proxy has to send the header before the connection is dropped."""

# A v1 header as the specification has it (Twisted's parser takes more: "+5555", "05555",
# "5_555" as ports, extra fields, lines past 107 bytes when the CRLF comes in the same read).
_V1_PORT = rb"(?:0|[1-9][0-9]{0,4})"
_V1_HEADER = re.compile(rb"PROXY TCP[46] [0-9A-Fa-f.:]+ [0-9A-Fa-f.:]+ %s %s" % (_V1_PORT, _V1_PORT))
_V1_MAX = 107 - len(b"\r\n")


@implementer(IHandshakeListener, ITLSEndListener)
class ProxiedConnection(ProtocolWrapper):
    """
    One connection from a trusted proxy: reads the header, then starts the wrapped protocol.

    After STARTTLS the TLS layer sits under this wrapper, as its TCP transport's protocol: it
    tells this wrapper of the handshake and of the end of TLS, which pass them on.

    :ivar balancers_own: the header was a v2 LOCAL one: the proxy made this connection itself,
        relaying no client (the specification's example is a health check).
    """

    balancers_own = False

    def __init__(self, factory: TrustedProxyFactory, wrapped: IProtocol) -> None:
        super().__init__(factory, wrapped)
        self._clock = factory.clock
        self._parser: V1Parser | V2Parser | None = None
        self._start = b""
        self._info: ProxyInfo | None = None
        self._timer: IDelayedCall | None = None
        # The wrapped protocol paused its reading (a worker's front end waits for admission):
        # what came with the header waits too, in _held.
        self._paused = False
        self._held = b""

    def makeConnection(self, transport: object) -> None:
        # Like ProtocolWrapper.makeConnection, except that the wrapped protocol waits for the header.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self._timer = self._clock.callLater(HEADER_TIMEOUT, self._too_slow)

    def _too_slow(self) -> None:
        self._timer = None
        log.warn("proxy_header_timeout source={source}", source=self.transport.getPeer().host)  # type: ignore[union-attr]
        self.transport.abortConnection()  # type: ignore[union-attr]

    def pauseProducing(self) -> None:
        self._paused = True
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def resumeProducing(self) -> None:
        self._paused = False
        held, self._held = self._held, b""
        if held:
            self.wrappedProtocol.dataReceived(held)  # which may pause again
        if not self._paused:
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self._info is not None:
            if self._paused:
                self._held += data  # a read already under way when the pause came
            else:
                self.wrappedProtocol.dataReceived(data)
            return
        if self._parser is None:
            # Enough bytes to tell v2 (a 12-byte signature) from v1 ("PROXY") from anything else.
            self._start += data
            start = self._start
            if start[:12] == V2Parser.PREFIX:
                if len(start) < 16:
                    return  # Twisted's v2 parser needs the fixed 16-byte part in one piece
                self._parser = V2Parser()
            elif start[:5] == V1Parser.PROXYSTR:
                if start.startswith(_V1_UNKNOWN):
                    # The minimal v1 form, which Twisted's parser refuses: use the real addresses.
                    self._start = b""
                    self._started(ProxyInfo(_V1_UNKNOWN.strip(), None, None), start[len(_V1_UNKNOWN):])
                    return
                if _V1_UNKNOWN.startswith(start):
                    return
                self._parser = V1Parser()
            elif V2Parser.PREFIX.startswith(start) or V1Parser.PROXYSTR.startswith(start):
                return
            else:
                self._refuse("no PROXY header")
                return
            data, self._start = start, b""
        try:
            info, remaining = self._parser.feed(data)
        except (InvalidProxyHeader, ValueError):  # ValueError: Twisted's v1 parser on a bad port
            self._refuse("malformed PROXY header")
            return
        if info is None:
            return
        addresses = (info.source, info.destination)
        if all(isinstance(a, UNIXAddress) for a in addresses):
            # The client reached the proxy over a UNIX socket: it has no address to tell, as with LOCAL.
            info = ProxyInfo(info.header, None, None)
        elif not all(_is_ip(a) for a in addresses) or (
                isinstance(self._parser, V1Parser) and info.source is not None
                and (len(info.header) > _V1_MAX or _V1_HEADER.fullmatch(info.header) is None)):
            # Twisted's v1 parser takes any word for an address; an address is what limits, logs
            # and the backend's ID or XCLIENT are given.
            self._refuse("malformed PROXY header")
            return
        self._started(info, remaining or b"")

    def _started(self, info: ProxyInfo, remaining: bytes) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not in_networks(plain_address(self.transport.getPeer().host), self.factory.sources):  # type: ignore[union-attr]
            # Taken out of proxy_sources by a reload while its header was on its way.
            self._refuse("untrusted")
            return
        self._info = info
        self.balancers_own = isinstance(self._parser, V2Parser) and info.header[12] == _V2_LOCAL
        self.wrappedProtocol.makeConnection(self)  # type: ignore[arg-type]  # a wrapper is its protocol's transport
        if self._paused:
            self._held += remaining
        elif remaining:
            self.wrappedProtocol.dataReceived(remaining)

    def _refuse(self, reason: str) -> None:
        log.warn("proxy_refused source={source} reason={reason}", source=self.transport.getPeer().host,  # type: ignore[union-attr]
                 reason=reason)
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._info is not None:
            super().connectionLost(reason)
        else:
            self.factory.unregisterProtocol(self)

    def handshakeCompleted(self) -> None:
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def tlsEnded(self) -> None:
        if ITLSEndListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.tlsEnded()

    def getPeer(self) -> IAddress:
        if self._info is not None and self._info.source is not None:
            return self._info.source
        return self.transport.getPeer()  # type: ignore[union-attr]

    def getHost(self) -> IAddress:
        if self._info is not None and self._info.destination is not None:
            return self._info.destination
        return self.transport.getHost()  # type: ignore[union-attr]


def balancers_own(transport: object) -> bool:
    """
    Whether a protocol's transport is a connection a load balancer made on its own behalf (a
    PROXY v2 LOCAL header), such as HAProxy's health checks with C{send-proxy-v2}: served as any
    other, but no client's, so not logged as one. (A v1 header cannot say so: HAProxy's v1 checks
    carry the balancer's own addresses.)

    :param transport: a protocol's transport, under which a TLS layer may sit.
    """
    layer = transport
    while isinstance(layer, ProtocolWrapper):
        if isinstance(layer, ProxiedConnection):
            return layer.balancers_own
        layer = layer.transport
    return False


def _is_ip(address: IAddress | None) -> bool:
    """
    Whether a PROXY header's address is a TCP address of its family, without a zone, and a port
    (or absent, as in LOCAL).
    """
    if address is None:
        return True
    if not isinstance(address, (IPv4Address, IPv6Address)) or address.type != "TCP" or "%" in address.host:
        return False
    ip = parse_ip(address.host)
    return (ip is not None and ip.version == (4 if isinstance(address, IPv4Address) else 6)
            and 0 <= address.port <= 65535)


class TrustedProxyFactory(WrappingFactory[ProxiedConnection]):
    """
    Accepts connections only from C{sources}, each starting with a PROXY header.

    :param wrapped: the listener's factory (the front end, or TLS around it).
    :param sources: the load balancers' networks.
    :param clock: for the header timeout.
    :ivar sources: read at every connection, so that a reload that replaces them (a balancer taken
        out of C{[limits] proxy_sources}) applies from the next connection on.
    """

    protocol = ProxiedConnection
    noisy = False

    def __init__(self, wrapped: IProtocolFactory, sources: tuple[Network, ...], clock: IReactorTime) -> None:
        super().__init__(wrapped)
        self.sources = sources
        self.clock = clock

    def buildProtocol(self, addr: IAddress) -> ProxiedConnection | None:  # type: ignore[override]
        host = plain_address(getattr(addr, "host", ""))
        if not in_networks(host, self.sources):
            log.warn("proxy_refused source={source} reason=untrusted", source=host)
            return None
        wrapped = self.wrappedFactory.buildProtocol(addr)
        if wrapped is None:
            return None
        return self.protocol(self, wrapped)
