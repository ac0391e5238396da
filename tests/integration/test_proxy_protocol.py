"""The PROXY protocol on the real gateway: the load balancer's client is the client everywhere."""

from __future__ import annotations

import shutil
import socket
import struct
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from gateway.testing.gateway import GatewayProcess

from .wire import Wire

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v2_header(source: str, source_port: int, destination: str, destination_port: int) -> bytes:
    """A PROXY v2 header for TCP over IPv4."""
    addresses = socket.inet_aton(source) + socket.inet_aton(destination) + struct.pack("!HH", source_port,
                                                                                         destination_port)
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(addresses)) + addresses


class ProxyProtocolTests(SynchronousTestCase):
    """Listeners behind haproxy: accept a header from 127.0.0.2 only."""

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="gw-proxy-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        # Failed logins never reach a backend: nothing needs to listen on its port.
        self.gateway = GatewayProcess(self.directory, imap_backend_port=9, users={"alice": "secret"}, proxy=True,
                                      host="127.0.0.1", settings='[limits]\nproxy_sources = ["127.0.0.2/32"]')
        self.gateway.start()
        self.addCleanup(self.gateway.stop)
        self.port = self.gateway.port("imap", "starttls")

    def test_v1_from_trusted_source(self) -> None:
        """A v1 header from a trusted source names the client in the greeting's log, limits and failures."""
        wire = Wire(self.port, source="127.0.0.2")
        wire.send(b"PROXY TCP4 203.0.113.9 127.0.0.1 55555 143\r\n")
        self.assertTrue(wire.line().startswith(b"* OK "))
        wire.send(b"a STARTTLS\r\n")
        wire.close()
        self.gateway.wait_for_log(r"connect protocol=imap client=203\.0\.113\.9 port=55555 listener=143 tls=none")

    def test_v2_split_header(self) -> None:
        """A v2 header, even sent a few bytes at a time, names the client."""
        wire = Wire(self.port, source="127.0.0.2")
        header = v2_header("198.51.100.7", 40000, "127.0.0.1", 143)
        for start in range(0, len(header), 5):
            wire.send(header[start:start + 5])
        self.assertTrue(wire.line().startswith(b"* OK "))
        wire.close()
        self.gateway.wait_for_log(r"connect protocol=imap client=198\.51\.100\.7 port=40000")

    def test_untrusted_source_refused(self) -> None:
        """A header from an address not in proxy_sources is refused: the connection closes with no greeting."""
        wire = Wire(self.port, source="127.0.0.1")
        wire.send(b"PROXY TCP4 203.0.113.10 127.0.0.1 55555 143\r\n")
        self.assertEqual(wire.line(), b"")
        wire.close()
        self.gateway.wait_for_log(r"proxy_refused source=127\.0\.0\.1 reason=untrusted")
        self.assertNotIn("203.0.113.10", self.gateway.log())

    def test_missing_header_refused(self) -> None:
        """A trusted source that sends no header (a client speaking IMAP directly) is refused."""
        wire = Wire(self.port, source="127.0.0.2")
        wire.send(b"a CAPABILITY\r\n")
        self.assertEqual(wire.line(), b"")
        wire.close()
        self.gateway.wait_for_log(r"proxy_refused source=127\.0\.0\.2 reason=no PROXY header")
