"""
Slots for the attributes that Twisted's per-session objects keep on each instance.

Twisted's classes have no ``__slots__``, so each of their instances keeps its attributes in a
dict, and Python sizes a dict that the class cannot share for three times its keys. Declared as
slots of a subclass, the attributes take 8 bytes each and no dict is made. A slot shadows
Twisted's class-level default, so a subclass that mixes in :class:`TwistedDefaults` has each
slot start with that default. An attribute that a later Twisted adds still works: it goes to a
dict.

- **Protocols.** The gateway's per-session protocols subclass Twisted's ``LineReceiver`` (the
  front ends also ``TimeoutMixin``), and declare :data:`LINE_RECEIVER` and :data:`TIMEOUT_MIXIN`
  among their slots: 0.3 to 0.5 KB less per protocol, two protocols per session.
- **TCP connections.** The gateway's reactor (:mod:`gateway.event_loop`) makes each TCP
  connection, accepted or made, a :class:`SlottedServer` or a :class:`SlottedClient`, whose
  attributes fill a 464-byte dict otherwise, two connections per session. Their dict keeps
  ``fileno`` alone (see :data:`_CONNECTION`).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

__all__ = ["LINE_RECEIVER", "SLOTTED_CONNECTIONS", "TIMEOUT_MIXIN", "SlottedClient", "SlottedConnector", "SlottedServer",
           "TwistedDefaults"]


class TwistedDefaults:
    """
    Mixed in (first) by a subclass of a Twisted class that declares slots: each slot starts
    with the value the attribute has on the classes after it, if it has one that is not a method
    or other descriptor, as the attribute would read without the slot.
    """

    __slots__ = ()
    _defaults: tuple[tuple[Any, object], ...] = ()  # each slot that starts set, with its value

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        instance = super().__new__(cls)
        for slot, value in cls._defaults:
            slot.__set__(instance, value)
        return instance

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        after = super(cls, cls)
        own = [(cls.__dict__[name], getattr(after, name)) for name in cls.__dict__.get("__slots__", ())
               if hasattr(after, name)]
        cls._defaults += tuple((slot, value) for slot, value in own if not hasattr(type(value), "__get__"))


# Protocol's, then LineReceiver's own (and those of the pausing mixin it inherits).
LINE_RECEIVER = ("connected", "transport", "factory", "line_mode", "_buffer", "_busyReceiving", "paused")
TIMEOUT_MIXIN = ("timeOut", "_TimeoutMixin__timeoutCall")


# What Twisted sets on every TCP connection it keeps open (FileDescriptor's, Connection's), and
# what flow control and STARTTLS set for the rest of a session. Not ``fileno``: Twisted puts the
# socket's in place of the class's method, and deletes it once the socket is closed (the
# reactor then relies on the class's -1), which a slot cannot do. It stays an ordinary
# attribute, as do the methods Twisted replaces for a while (``doRead`` and ``doWrite`` while a
# client connects or once a connection is aborted; ``getHandle``, ``getPeerCertificate`` and the
# interface declaration after STARTTLS) and what only closing sets. Python keeps those in a small
# dict once ``gateway.sockets.tune`` has switched the connection's class (64 bytes for ``fileno``).
_CONNECTION = ("reactor", "socket", "protocol", "connected", "_tempDataBuffer", "_tempDataLen", "producer",
               "streamingProducer", "producerPaused", "dataBuffer", "offset", "logstr", "_addressType", "TLS")
_SERVER = ("client", "server", "sessionno", "hostname", "repstr")
_CLIENT = ("connector", "addr", "realAddress", "_requiresResolution", "addressFamily")


class SlottedServer(TwistedDefaults, tcp.Server):
    """Twisted's accepted TCP connection, with its attributes in slots."""

    __slots__ = _CONNECTION + _SERVER


class SlottedClient(TwistedDefaults, tcp.Client):
    """Twisted's outgoing TCP connection, with its attributes in slots."""

    __slots__ = _CONNECTION + _CLIENT


SLOTTED_CONNECTIONS = (SlottedServer, SlottedClient)


class SlottedConnector(tcp.Connector):
    """Twisted's connector, making its connection a :class:`SlottedClient`."""

    def _makeTransport(self) -> SlottedClient:
        return SlottedClient(self.host, self.port, self.bindAddress, self, self.reactor)
