"""One listening endpoint as a service, for every listener the gateway has (mail, web, metrics)."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


class Listener(Service):
    """
    Listens on one endpoint. Binding happens in C{privilegedStartService}, before twistd drops
    privileges, and a failure to bind stops the start-up with one line naming the endpoint.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, factory: Factory, label: str) -> None:
        self._endpoint = endpoint
        self._factory = factory
        self.label = label
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        outcome: list[IListeningPort | Failure] = []
        self._endpoint.listen(self._factory).addBoth(outcome.append)
        if not outcome:
            raise SystemExit(f"mailgateway: {self.label}: the endpoint did not start listening at once")
        if isinstance(outcome[0], Failure):
            raise SystemExit(f"mailgateway: {self.label}: cannot listen: {outcome[0].getErrorMessage()}")
        self.port = outcome[0]
        address = self.port.getHost()
        log.info("listening {label} address={host}:{port}", label=self.label,
                 host=getattr(address, "host", address), port=getattr(address, "port", 0))

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> object:
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None
