"""Listening endpoints as services, for every listener the gateway has (mail, web, metrics)."""

from __future__ import annotations

import errno
import os
import socket
import sys

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorSocket, IStreamServerEndpoint, ITransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.addresses import Network, address_host, host_port
from gateway.config import PROXY_PREFIX, ConfigError
from gateway.connection_limits import ConnectionLimits
from gateway.proxy_protocol import TrustedProxyFactory

log = Logger()

# Twisted listens with a backlog of 50 connections. A reconnect storm (every client of an office at
# 9 a.m., or all of them after a restart) overflows that while the gateway is busy with handshakes,
# and a client whose SYN is dropped tries again only a second later. nginx asks for 511; the kernel
# caps it at net.core.somaxconn. A description that names its own backlog keeps it.
_BACKLOG = 511
_BACKLOG_KINDS = ("tcp", "tcp6", "unix")


class Listener(Service):
    """
    Listens on one endpoint. Binding happens in C{privilegedStartService}, before twistd drops
    privileges, and a failure to bind stops the start-up with one line naming the endpoint.

    :param accepting: False for a socket held only for worker processes, which accept on it.
    :param source: where the endpoint is configured, e.g. C{/etc/mailgateway/mailgateway.toml: [imap] starttls},
        put first in that line; None for a listener no configuration key describes.
    :ivar proxy: the factory that reads the PROXY header of a C{haproxy:} listener, whose
        C{sources} a reload replaces; None for any other listener.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory, label: str, accepting: bool = True,
                 proxy: TrustedProxyFactory | None = None, source: str | None = None) -> None:
        self._endpoint = endpoint
        self._source = source
        self._factory = factory
        self.label = label
        self._accepting = accepting
        self.proxy = proxy
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        outcome: list[IListeningPort | Failure] = []
        self._endpoint.listen(self._factory).addBoth(outcome.append)
        # The key tells the operator which line of the file to change (an address in use, say).
        where = f"mailgateway: {self._source}: {self.label}" if self._source else f"mailgateway: {self.label}"
        if not outcome:
            raise SystemExit(f"{where}: the endpoint did not start listening at once")
        if isinstance(outcome[0], Failure):
            problem = f"{where}: cannot listen: {outcome[0].getErrorMessage()}"
            error = getattr(outcome[0].value, "socketError", None)
            if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM):
                # No restart mends this: the exit status of a configuration error (78), which the
                # unit does not restart. (An address in use or not yet up may pass: status 1.)
                print(f"{problem} (a port below 1024 needs CAP_NET_BIND_SERVICE, as the unit's "
                      "AmbientCapabilities= gives; a UNIX socket, a directory the user may write)",
                      file=sys.stderr, flush=True)
                raise SystemExit(os.EX_CONFIG)
            raise SystemExit(problem)
        self.port = outcome[0]
        if not self._accepting:
            self.port.stopReading()  # type: ignore[attr-defined]
        address = self.port.getHost()
        log.info("listening {label} address={address}", label=self.label,
                 address=host_port(address.host, address.port) if isinstance(address, (IPv4Address, IPv6Address))
                 else f"{address}:0")

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> object:
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


@implementer(IStreamServerEndpoint)
class InheritedEndpoint:
    """A listening socket this process was given (by the supervisor), as an endpoint."""

    def __init__(self, reactor: IReactorSocket, fileno: int) -> None:
        self._reactor = reactor
        self._fileno = fileno

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        with socket.socket(fileno=self._fileno) as inherited:  # closed here: the reactor keeps a copy
            return succeed(self._reactor.adoptStreamPort(inherited.fileno(), inherited.family,
                                                         factory))  # type: ignore[arg-type]  # any factory will do


class _Admitted(ProtocolWrapper):
    """One connection of an L{AdmittingFactory}: its protocol starts only once admitted."""

    factory: AdmittingFactory
    _host: str | None = None  # set once admitted: what to release

    def makeConnection(self, transport: ITransport) -> None:
        # Here, not in buildProtocol: behind a PROXY header, only the transport knows the client.
        host = address_host(transport.getPeer())
        refused = self.factory.limits.admit(host)
        if refused is None:
            self._host = host
            super().makeConnection(transport)
            return
        log.warn("connection_refused protocol={protocol} client={client} limit={limit}",
                 protocol=self.factory.protocol_name, client=host, limit=refused)
        self.transport = transport
        transport.abortConnection()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        # A refused connection still gets what came with a PROXY header: dropped.
        if self._host is not None:
            super().dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._host is None:
            return  # refused: the protocol never started
        self.factory.limits.release(self._host)
        self._host = None
        super().connectionLost(reason)


class AdmittingFactory(WrappingFactory):
    """
    Counts each connection against the gateway's connection limits while it lasts, for listeners
    whose protocol has no refusal of its own (the web's and the metrics'). A connection over a
    limit is closed at once, before any TLS handshake, and logged as the mail front ends log theirs.
    """

    protocol = _Admitted
    noisy = False

    def __init__(self, wrapped: IProtocolFactory, limits: ConnectionLimits, protocol: str) -> None:
        """
        :param wrapped: the listener's own factory.
        :param limits: the counts the mail listeners use too, so that the gateway as a whole holds
            at most C{max_connections}.
        :param protocol: the C{protocol=} of the log lines.
        """
        super().__init__(wrapped)
        self.limits = limits
        self.protocol_name = protocol


def listener(reactor: object, description: str, factory: IProtocolFactory, *, label: str, key: str, config_path: str,
             proxy_sources: tuple[Network, ...] | None, inherited: int | None = None,
             accepting: bool = True) -> Listener:
    """
    The listener for one endpoint description of the configuration.

    :param label: how the listener is logged, e.g. C{protocol=imap tls=implicit_tls}.
    :param key: the configuration key it comes from, e.g. C{[imap] implicit_tls}, named in errors.
    :param proxy_sources: who may send a PROXY header to a C{haproxy:} listener (until a reload
        replaces the listener's C{proxy.sources}); None when this kind of listener takes none.
    :param inherited: the descriptor of the socket already listening on this endpoint (in a
        worker process), instead of listening anew.
    :param accepting: see L{Listener}.
    :raises ConfigError: for a description that is not a usable endpoint, or a C{haproxy:} one
        where no PROXY header is taken.
    """
    proxy = None
    if description.startswith(PROXY_PREFIX):
        if proxy_sources is None:
            raise ConfigError(f"{config_path}: {key}: {description!r}: this listener takes no PROXY header; "
                              'expected an endpoint such as "tcp:9101:interface=127.0.0.1"')
        factory = proxy = TrustedProxyFactory(factory, proxy_sources, reactor)  # type: ignore[arg-type]
    if inherited is not None:
        return Listener(InheritedEndpoint(reactor, inherited), factory,  # type: ignore[arg-type]
                        f"{label} endpoint={description} inherited={inherited}", proxy=proxy,
                        source=f"{config_path}: {key}")
    try:
        endpoint = serverFromString(reactor, _with_backlog(description.removeprefix(PROXY_PREFIX)))
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise ConfigError(f"{config_path}: {key}: {description!r} is not a usable endpoint description "
                          f"({type(e).__name__}: {e})") from None
    return Listener(endpoint, factory, f"{label} endpoint={description}", accepting, proxy,
                    source=f"{config_path}: {key}")


def _with_backlog(description: str) -> str:
    """The description, asking for a backlog of ``_BACKLOG`` where its kind of endpoint takes one and it names none."""
    if description.partition(":")[0] in _BACKLOG_KINDS and "backlog=" not in description:
        return f"{description}:backlog={_BACKLOG}"
    return description
