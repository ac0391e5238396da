"""
The web listeners on a real reactor, fetched with curl over real TLS: every autoconfig document
parsed back, the reverse proxy in front of a real twisted.web upstream (forwarding headers, a
50 MiB response, backpressure from a slow client, a stalled upstream and a stalled client cut
off, 502 when the upstream is down), the HTTP redirector, and a reload.
"""

from __future__ import annotations

import hashlib
import os
import plistlib
import re
import shutil
import signal
import subprocess
import tempfile
import xml.etree.ElementTree as ElementTree
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.internet.tcp import Connection
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from gateway import web
from gateway.autoconfig import AUTODISCOVER_OUTLOOK_NS, AUTODISCOVER_REQUEST_NS, AUTODISCOVER_RESPONSE_NS
from gateway.config import Settings, parse_settings
from gateway.connection_limits import ConnectionLimits, ConnectionRules
from gateway.listener import Listener
from gateway.testing.gateway import GatewayProcess
from gateway.testing.host import free_ports
from gateway.testing.pki import TestCA
from gateway.tls import ServerTLS
from gateway.web import WebState, build_web_service

PUBLIC_HOST = "mail.example.org"
HSTS_MAX_AGE = 600
FLOOD = 50 * 1024 * 1024
FLOOD_CHUNK = os.urandom(64 * 1024)
FLOOD_SHA256 = hashlib.sha256(FLOOD_CHUNK * (FLOOD // len(FLOOD_CHUNK))).hexdigest()
STRAY_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 14\r\n\r\nalice's secret"

LISTENERS: dict[str, Any] = {  # the stores on ports of their own: the gateway takes the standard ones
    "imap": {"implicit_tls": ["tcp:993"], "starttls": ["tcp:143"], "backend": {"port": 10143}},
    "pop3": {"implicit_tls": ["tcp:995"], "backend": {"port": 10110}},
    "submission": {"implicit_tls": ["tcp:465"], "starttls": ["tcp:587"], "backend": {"port": 10587}},
}


@implementer(IPushProducer)
class Flood:
    """Writes L{FLOOD} bytes to a response as fast as the connection takes them, counting what it wrote."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.written = 0
        self.paused = False
        self.stopped = False
        self.ended: Deferred[None] = Deferred()
        request.notifyFinish().addBoth(self._ended)
        request.registerProducer(self, True)

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and not self.stopped and self.written < FLOOD:
            self.request.write(FLOOD_CHUNK)
            self.written += len(FLOOD_CHUNK)
        if self.written >= FLOOD and not self.stopped:
            self.stopped = True
            self.request.unregisterProducer()
            self.request.finish()

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.stopped = True

    def _ended(self, result: object) -> None:
        self.stopped = True
        self.ended.callback(None)


class Upstream(Resource):
    """
    A plaintext webmail stand-in: C{/headers} records the request headers, C{/upload} answers the
    SHA-256 of the body, C{/big} streams L{FLOOD} bytes, C{/stall} sends 10 bytes of 100 and
    then nothing, C{/stray} answers 204 and writes a whole response of its own 0.5 s later, as a
    faulty webmail might, and C{/slow} answers after 1 s. Every request's connection is recorded.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[bytes, list[bytes]]] = []
        self.floods: list[Flood] = []
        self.stalls: list[Deferred[None]] = []  # each fires, or fails when the connection is lost
        self.connections: list[object] = []
        self.late: list[Deferred[None]] = []  # each fires once a late write (/stray, /slow) is done or skipped

    def render(self, request: Request) -> bytes | int:
        self.seen.append({name.lower(): list(values) for name, values in request.requestHeaders.getAllRawHeaders()})
        self.connections.append(request.channel)
        request.setHeader(b"Strict-Transport-Security", b"max-age=1")
        if request.path == b"/stray":
            transport = request.channel.transport
            self.late.append(deferLater(reactor, 0.5, lambda: transport.connected and transport.write(STRAY_RESPONSE)))
            request.setResponseCode(204)
            return b""
        if request.path == b"/slow":
            request.setHeader(b"Content-Type", b"text/html")
            self.late.append(deferLater(reactor, 1.0, lambda: request.channel and (
                request.write(b"<html>slow</html>"), request.finish())))
            return NOT_DONE_YET
        if request.path == b"/upload":
            request.setHeader(b"Content-Type", b"text/plain")
            return hashlib.sha256(request.content.read()).hexdigest().encode()
        if request.path == b"/big":
            request.setHeader(b"Content-Type", b"application/octet-stream")
            request.setHeader(b"Content-Length", b"%d" % FLOOD)
            flood = Flood(request)
            self.floods.append(flood)
            flood.resumeProducing()
            return NOT_DONE_YET
        if request.path == b"/stall":
            request.setHeader(b"Content-Type", b"text/plain")
            request.setHeader(b"Content-Length", b"100")
            request.write(b"0123456789")
            self.stalls.append(request.notifyFinish())
            return NOT_DONE_YET
        request.setHeader(b"Content-Type", b"text/html")
        return b"<html>webmail</html>"


class Fetched:
    """What curl got: exit status, the last response's status and headers, and the body."""

    def __init__(self, code: int, head: bytes, body: bytes, stderr: bytes) -> None:
        self.exit_code = code
        self.stderr = stderr
        self.body = body
        blocks = [block for block in head.split(b"\r\n\r\n") if block.strip()]
        lines = blocks[-1].split(b"\r\n") if blocks else [b""]
        self.status = int(lines[0].split(b" ")[1]) if lines[0] else 0
        self.headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.decode("latin-1").partition(":")
            self.headers.setdefault(name.strip().lower(), []).append(value.strip())

    def header(self, name: str) -> str | None:
        values = self.headers.get(name)
        return values[-1] if values else None


class _StalledReader(Protocol):
    """
    An HTTPS client that asks for C{/big}, stops reading after the first bytes of the answer, and
    fires C{stalled} then; it keeps what it reads in a count.
    """

    def __init__(self) -> None:
        self.received = 0
        self.stalled: Deferred[None] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"GET /big HTTP/1.1\r\nHost: %s\r\n\r\n" % PUBLIC_HOST.encode())

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if not self.stalled.called:
            self.transport.pauseProducing()  # type: ignore[union-attr]
            self.stalled.callback(None)

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(None)


class WebGatewayTests(TestCase):
    """The web service of the gateway on 127.0.0.1, with curl as the client."""

    timeout = 120

    @inlineCallbacks
    def setUp(self) -> Any:
        self.curl_path = shutil.which("curl")
        if self.curl_path is None:
            self.fail("curl is missing: install the Debian package curl")
        self.directory = tempfile.mkdtemp(prefix="gw-web-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.addCleanup(self._connections_closed)  # runs last: trial wants no connection left
        self.fetches = 0
        ca = TestCA(os.path.join(self.directory, "ca"))
        self.ca_path = ca.ca_path
        leaf = ca.issue(PUBLIC_HOST, "imap.example.net", "127.0.0.1")

        self.upstream = Upstream()
        upstream_site = Site(self.upstream)
        upstream_site.noisy = False
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(upstream_site)
        self.addCleanup(port.stopListening)
        self.upstream_url = f"http://127.0.0.1:{port.getHost().port}"

        self.state = WebState(self.settings())
        assert self.state.settings.web is not None
        server_tls = ServerTLS(leaf.chain_path, leaf.key_path, b"http/1.1")
        self.limits = ConnectionLimits(ConnectionRules())
        service = build_web_service(self.state.settings.web, reactor, server_tls, self.state, self.limits)
        service.startService()
        self.addCleanup(service.stopService)
        ports = {child.label.split(" ")[0]: child.port.getHost().port
                 for child in service if isinstance(child, Listener) and child.port is not None}
        self.https_port, self.http_port = ports["protocol=https"], ports["protocol=http"]

    def settings(self, **web: Any) -> Settings:
        web_table = {"https": ["tcp:0:interface=127.0.0.1"], "http": ["tcp:0:interface=127.0.0.1"],
                     "public_host": PUBLIC_HOST, "upstream": self.upstream_url, "hsts_max_age": HSTS_MAX_AGE, **web}
        data: dict[str, Any] = {
            "gateway": {"hostname": "gateway.internal", "state_dir": self.directory},
            "tls": {"self_signed": True},
            "auth": {"mode": "backend"},
            "web": web_table,
            **LISTENERS,
        }
        return parse_settings(os.path.join(self.directory, "mailgateway.toml"), data)

    @inlineCallbacks
    def _connections_closed(self) -> Any:
        """Wait until every TCP connection of this test (gateway, upstream, curl) has closed."""
        for _ in range(200):
            if not [s for s in reactor.getReaders() + reactor.getWriters() if isinstance(s, Connection)]:
                return
            yield deferLater(reactor, 0.05, lambda: None)

    @inlineCallbacks
    def curl(self, path: str, *options: str, https: bool = True, body_file: str | None = None) -> Any:
        """
        Fetch a path of the gateway with curl (HTTPS: by name, verified against the test CA).

        :returns: a L{Fetched}; the body is read from a file curl wrote, unless it went to /dev/null.
        """
        self.fetches += 1
        head_path = os.path.join(self.directory, f"head-{self.fetches}")
        body_path = body_file or os.path.join(self.directory, f"body-{self.fetches}")
        port = self.https_port if https else self.http_port
        url = f"https://{PUBLIC_HOST}:{port}{path}" if https else f"http://127.0.0.1:{port}{path}"
        arguments = ["-sS", "--cacert", self.ca_path, "--resolve", f"{PUBLIC_HOST}:{port}:127.0.0.1",
                     "-D", head_path, "-o", body_path, "--max-time", "60", *options, url]
        assert self.curl_path is not None
        _, stderr, code = yield getProcessOutputAndValue(self.curl_path, arguments, env=os.environ, reactor=reactor)
        head = b""
        if os.path.exists(head_path):  # not when the connection failed
            with open(head_path, "rb") as f:
                head = f.read()
        body = b""
        if body_path != os.devnull and os.path.exists(body_path) and os.path.getsize(body_path) < 1024 * 1024:
            with open(body_path, "rb") as f:
                body = f.read()
        return Fetched(code, head, body, stderr)

    def post_file(self, content: bytes) -> str:
        self.fetches += 1
        path = os.path.join(self.directory, f"post-{self.fetches}")
        with open(path, "wb") as f:
            f.write(content)
        return path

    # -- the documents

    @inlineCallbacks
    def test_thunderbird_autoconfig(self) -> Any:
        """The Thunderbird document parses and lists the configured listeners, over HTTPS and HTTP."""
        for path, https in (("/.well-known/autoconfig/mail/config-v1.1.xml?emailaddress=alice%40example.com", True),
                            ("/mail/config-v1.1.xml", True),
                            ("/.well-known/autoconfig/mail/config-v1.1.xml", False)):
            fetched = yield self.curl(path, https=https)
            self.assertEqual((fetched.exit_code, fetched.status), (0, 200), fetched.stderr)
            self.assertEqual(fetched.header("content-type"), "text/xml; charset=utf-8")
            provider = ElementTree.fromstring(fetched.body).find("emailProvider")
            assert provider is not None
            servers = [(s.tag, s.get("type"), s.findtext("hostname"), s.findtext("port"), s.findtext("socketType"))
                       for s in provider if s.tag in ("incomingServer", "outgoingServer")]
            self.assertEqual(servers, [
                ("incomingServer", "imap", PUBLIC_HOST, "993", "SSL"),
                ("incomingServer", "imap", PUBLIC_HOST, "143", "STARTTLS"),
                ("incomingServer", "pop3", PUBLIC_HOST, "995", "SSL"),
                ("outgoingServer", "smtp", PUBLIC_HOST, "465", "SSL"),
                ("outgoingServer", "smtp", PUBLIC_HOST, "587", "STARTTLS"),
            ])
            self.assertEqual({s.findtext("authentication") for s in provider.iter() if s.tag.endswith("Server")},
                             {"password-cleartext"})
        self.assertEqual(self.upstream.seen, [])

    @inlineCallbacks
    def test_autodiscover_round_trip(self) -> Any:
        """An Outlook request posted to a mixed-case path gets IMAP and SMTP settings; a malformed one a plain 400."""
        request = (f'<?xml version="1.0" encoding="utf-8"?><Autodiscover xmlns="{AUTODISCOVER_REQUEST_NS}">'
                   f"<Request><EMailAddress>bob@example.com</EMailAddress>"
                   f"<AcceptableResponseSchema>{AUTODISCOVER_OUTLOOK_NS}</AcceptableResponseSchema>"
                   "</Request></Autodiscover>").encode()
        fetched = yield self.curl("/AutoDiscover/AutoDiscover.xml", "-H", "Content-Type: text/xml",
                                  "--data-binary", "@" + self.post_file(request))
        self.assertEqual((fetched.exit_code, fetched.status), (0, 200), fetched.stderr)
        self.assertEqual(fetched.header("content-type"), "application/xml; charset=utf-8")
        root = ElementTree.fromstring(fetched.body)
        self.assertEqual(root.tag, f"{{{AUTODISCOVER_RESPONSE_NS}}}Autodiscover")
        ns = {"a": AUTODISCOVER_OUTLOOK_NS}
        protocols = [(p.findtext("a:Type", namespaces=ns), p.findtext("a:Server", namespaces=ns),
                      p.findtext("a:Port", namespaces=ns), p.findtext("a:LoginName", namespaces=ns))
                     for p in root.iterfind("a:Response/a:Account/a:Protocol", ns)]
        self.assertIn(("IMAP", PUBLIC_HOST, "993", "bob@example.com"), protocols)
        self.assertIn(("SMTP", PUBLIC_HOST, "465", "bob@example.com"), protocols)

        for bad in (b"<Autodiscover><Request><EMailAddress>", request + b" " * (64 * 1024)):
            fetched = yield self.curl("/autodiscover/autodiscover.xml", "--data-binary", "@" + self.post_file(bad))
            self.assertEqual(fetched.status, 400)
            self.assertEqual(fetched.body, b"Bad request.\n")
            self.assertEqual(fetched.header("strict-transport-security"), f"max-age={HSTS_MAX_AGE}")

    @inlineCallbacks
    def test_mobileconfig(self) -> Any:
        """The Apple profile parses as a plist with the implicit-TLS ports; without an address it is a 400."""
        fetched = yield self.curl("/apple/mail.mobileconfig?emailaddress=carol%40example.com")
        self.assertEqual((fetched.exit_code, fetched.status), (0, 200), fetched.stderr)
        self.assertEqual(fetched.header("content-type"), "application/x-apple-aspen-config")
        self.assertIn("attachment", fetched.header("content-disposition") or "")
        (account,) = plistlib.loads(fetched.body)["PayloadContent"]
        self.assertEqual(account["PayloadType"], "com.apple.mail.managed")
        self.assertEqual((account["IncomingMailServerHostName"], account["IncomingMailServerPortNumber"],
                          account["OutgoingMailServerPortNumber"]), (PUBLIC_HOST, 993, 465))
        fetched = yield self.curl("/apple/mail.mobileconfig")
        self.assertEqual(fetched.status, 400)

    @inlineCallbacks
    def test_reload_changes_documents(self) -> Any:
        """After WebState.update the documents and the redirect name the new public host."""
        self.state.update(self.settings(public_host="imap.example.net"))
        fetched = yield self.curl("/mail/config-v1.1.xml")
        hosts = {e.text for e in ElementTree.fromstring(fetched.body).iter("hostname")}
        self.assertEqual(hosts, {"imap.example.net"})
        fetched = yield self.curl("/", https=False)
        self.assertEqual(fetched.header("location"), "https://imap.example.net/")

    # -- the redirector

    @inlineCallbacks
    def test_http_redirects_to_https(self) -> Any:
        """Plain HTTP answers 301 to the public host over HTTPS, whatever the Host header says."""
        fetched = yield self.curl("/roundcube/?_task=mail", "-H", "Host: evil.example", https=False)
        self.assertEqual(fetched.status, 301)
        self.assertEqual(fetched.header("location"), f"https://{PUBLIC_HOST}/roundcube/?_task=mail")
        self.assertIsNone(fetched.header("strict-transport-security"))
        self.assertEqual(self.upstream.seen, [])

    @inlineCallbacks
    def test_acme_challenge_from_webroot(self) -> Any:
        """After a reload that sets acme_webroot, plain HTTP serves the challenge certbot --webroot wrote."""
        webroot = os.path.join(self.directory, "acme")
        os.makedirs(os.path.join(webroot, ".well-known", "acme-challenge"))
        with open(os.path.join(webroot, ".well-known", "acme-challenge", "tok-EN_1"), "wb") as f:
            f.write(b"tok-EN_1.key-thumbprint")
        fetched = yield self.curl("/.well-known/acme-challenge/tok-EN_1", https=False)
        self.assertEqual(fetched.status, 301)
        self.state.update(self.settings(acme_webroot=webroot))
        fetched = yield self.curl("/.well-known/acme-challenge/tok-EN_1", https=False)
        self.assertEqual((fetched.status, fetched.body), (200, b"tok-EN_1.key-thumbprint"))
        self.assertEqual(self.upstream.seen, [])

    # -- the reverse proxy

    @inlineCallbacks
    def test_forwarding_and_security_headers(self) -> Any:
        """The upstream sees who the client is; the client sees the gateway's HSTS and nosniff, and no CSP."""
        fetched = yield self.curl("/roundcube/?_task=login", "-H", "X-Forwarded-For: 203.0.113.66",
                                  "-H", "X-Real-IP: 203.0.113.66", "-H", "Connection: keep-alive, X-Hop",
                                  "-H", "X-Hop: secret", "-H", "X_Forwarded_For: 203.0.113.66",
                                  "-H", "X-Forwarded-Host: evil.example")
        self.assertEqual((fetched.exit_code, fetched.status), (0, 200), fetched.stderr)
        self.assertEqual(fetched.body, b"<html>webmail</html>")
        (seen,) = self.upstream.seen
        self.assertEqual(seen[b"x-forwarded-for"], [b"127.0.0.1"])
        self.assertEqual(seen[b"x-real-ip"], [b"127.0.0.1"])
        self.assertEqual(seen[b"x-forwarded-proto"], [b"https"])
        self.assertEqual(seen[b"x-forwarded-host"], [PUBLIC_HOST.encode()])
        self.assertEqual(seen[b"host"], [PUBLIC_HOST.encode()])
        self.assertNotIn(b"x_forwarded_for", seen)
        self.assertNotIn(b"x-hop", seen)
        self.assertEqual(fetched.headers["strict-transport-security"], [f"max-age={HSTS_MAX_AGE}"])
        self.assertEqual(fetched.header("x-content-type-options"), "nosniff")
        self.assertIsNone(fetched.header("content-security-policy"))

    @inlineCallbacks
    def test_over_long_header_answered_at_once(self) -> Any:
        """
        Over TLS, a header line over 16 KiB gets its 431 at once: the channel is its TLS
        transport's producer, and the close twisted.web's line parser made by itself waited for
        the request deadline (60 s), with no answer.
        """
        fetched = yield self.curl("/roundcube/", "-H", "X-Long: " + "a" * 17000, "--max-time", "10")
        self.assertEqual((fetched.exit_code, fetched.status), (0, 431), fetched.stderr)
        self.assertEqual(self.upstream.seen, [])

    @inlineCallbacks
    def test_upload_streams(self) -> Any:
        """A 5 MiB upload reaches the upstream whole."""
        content = os.urandom(5 * 1024 * 1024)
        fetched = yield self.curl("/upload", "--data-binary", "@" + self.post_file(content),
                                  "-H", "Content-Type: application/octet-stream")
        self.assertEqual((fetched.exit_code, fetched.status), (0, 200), fetched.stderr)
        self.assertEqual(fetched.body.decode(), hashlib.sha256(content).hexdigest())

    @inlineCallbacks
    def test_large_response_whole(self) -> Any:
        """A 50 MiB response arrives whole."""
        target = os.path.join(self.directory, "big")
        fetched = yield self.curl("/big", body_file=target)
        self.assertEqual((fetched.exit_code, fetched.status), (0, 200), fetched.stderr)
        self.assertEqual(fetched.header("content-length"), str(FLOOD))
        digest = hashlib.sha256()
        with open(target, "rb") as f:
            for block in iter(lambda: f.read(1024 * 1024), b""):
                digest.update(block)
        self.assertEqual(digest.hexdigest(), FLOOD_SHA256)

    @inlineCallbacks
    def test_slow_client_pauses_upstream(self) -> Any:
        """
        A client reading 2 MiB/s holds the upstream back: after 3 s the upstream has written the
        client's 6 MiB and what the loopback sockets buffer, far from the whole 50 MiB that it
        writes at once when nothing holds it back. When the client leaves, the upstream request ends.
        """
        fetching = self.curl("/big", "--limit-rate", "2M", "--max-time", "4", body_file=os.devnull)
        yield deferLater(reactor, 3.0, lambda: None)
        (flood,) = self.upstream.floods
        written = flood.written
        fetched = yield fetching
        self.assertEqual(fetched.exit_code, 28, fetched.stderr)  # curl's "operation timed out"
        self.assertLess(written, 30 * 1024 * 1024, f"the upstream wrote {written} bytes in 3 s")
        yield flood.ended
        self.assertLess(flood.written, FLOOD)

    @inlineCallbacks
    def stalled_reader(self) -> Any:
        """Connect a L{_StalledReader} over TLS, and wait until it has stopped reading."""
        with open(self.ca_path, "rb") as f:
            trust = Certificate.loadPEM(f.read())
        endpoint = wrapClientTLS(optionsForClientTLS(PUBLIC_HOST, trust),
                                 TCP4ClientEndpoint(reactor, "127.0.0.1", self.https_port))
        client = yield connectProtocol(endpoint, _StalledReader())
        yield client.stalled
        return client

    @inlineCallbacks
    def test_no_upstream_connection_reused(self) -> Any:
        """
        Every proxied request has a webmail connection of its own, closed after its answer: bytes a
        faulty webmail writes after a response (here a whole response, 0.5 s after a 204) never
        reach the client of the next request, as they would on a reused connection.
        """
        first = yield self.curl("/stray")
        self.assertEqual(first.status, 204)
        second = yield self.curl("/slow")
        self.assertEqual((second.exit_code, second.status, second.body), (0, 200, b"<html>slow</html>"))
        yield gatherResults(self.upstream.late)
        self.assertEqual(len(self.upstream.connections), 2)
        self.assertIsNot(self.upstream.connections[0], self.upstream.connections[1])
        self.assertEqual([seen.get(b"connection") for seen in self.upstream.seen], [[b"close"], [b"close"]])

    @inlineCallbacks
    def test_stalled_upstream_cut_off(self) -> Any:
        """
        An upstream that sends its headers and part of the body, then nothing, is cut off once the
        response has not moved for RESPONSE_PROGRESS_TIMEOUT (1 s here): curl gets the part and
        a connection closed short of the length, and the upstream connection is closed.
        """
        self.patch(web, "RESPONSE_PROGRESS_TIMEOUT", 1.0)
        started = reactor.seconds()
        fetched = yield self.curl("/stall", "--max-time", "20")
        # Aborted: curl reads a reset (56), or an end short of the length (18), never its own timeout (28).
        self.assertIn(fetched.exit_code, (18, 56), fetched.stderr)
        self.assertEqual((fetched.status, fetched.body), (200, b"0123456789"))
        self.assertLess(reactor.seconds() - started, 10)
        (stall,) = self.upstream.stalls
        ended = yield stall.addCallbacks(lambda _: "finished", lambda failure: "connection lost")
        self.assertEqual(ended, "connection lost")

    @inlineCallbacks
    def test_stalled_client_cut_off(self) -> Any:
        """
        A client that stops reading a large response is cut off once its connection has taken
        nothing for RESPONSE_PROGRESS_TIMEOUT (1 s here): the upstream request ends unfinished,
        and the client finds its connection closed short of the response.
        """
        self.patch(web, "RESPONSE_PROGRESS_TIMEOUT", 1.0)
        client = yield self.stalled_reader()
        (flood,) = self.upstream.floods
        yield flood.ended.addTimeout(15, reactor)
        self.assertLess(flood.written, FLOOD)
        client.transport.resumeProducing()  # reads what the sockets hold, then the end
        yield client.lost.addTimeout(15, reactor)
        self.assertLess(client.received, FLOOD)

    @inlineCallbacks
    def test_client_ending_tls_stops_upstream(self) -> Any:
        """
        A client that ends TLS (close_notify) while the gateway holds the upstream back is gone:
        the upstream request ends before the upstream has written everything, and the connection
        closes. (Twisted's TLS layer drops what is written after a close_notify, and its TCP
        transport stays open while a producer is registered.)
        """
        client = yield self.stalled_reader()
        yield deferLater(reactor, 0.5, lambda: None)  # the gateway's buffers fill; it pauses the upstream
        (flood,) = self.upstream.floods
        self.assertLess(flood.written, FLOOD, "the upstream was not held back")
        client.transport.loseConnection()  # close_notify
        yield deferLater(reactor, 0.2, lambda: None)
        client.transport.resumeProducing()  # the gateway's buffer drains
        yield flood.ended
        self.assertLess(flood.written, FLOOD, "the upstream answer was read to its end after the client left")
        yield client.lost

    # -- connection limits

    @inlineCallbacks
    def test_connections_per_address_limited(self) -> Any:
        """
        An address holding its share of connections gets no more, over HTTPS or HTTP, until one
        ends: a connection flood cannot take the descriptors the mail listeners need.
        """
        self.limits.rules = ConnectionRules(max_per_address=2)
        held = []
        for port in (self.https_port, self.http_port):
            protocol = Protocol()
            yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)
            self.addCleanup(protocol.transport.loseConnection)  # type: ignore[union-attr]
            held.append(protocol)
        yield self._until(lambda: self.limits.connections == 2)
        refused = yield self.curl("/mail/config-v1.1.xml")
        self.assertNotEqual(refused.exit_code, 0, refused.stderr)
        refused = yield self.curl("/mail/config-v1.1.xml", https=False)
        self.assertNotEqual(refused.exit_code, 0, refused.stderr)
        self.assertEqual(self.limits.connections, 2)

        held.pop().transport.loseConnection()
        yield self._until(lambda: self.limits.connections == 1)
        fetched = yield self.curl("/mail/config-v1.1.xml")
        self.assertEqual((fetched.exit_code, fetched.status), (0, 200), fetched.stderr)
        held.pop().transport.loseConnection()
        yield self._until(lambda: self.limits.connections == 0)

    @inlineCallbacks
    def _until(self, condition: Any) -> Any:
        for _ in range(200):
            if condition():
                return
            yield deferLater(reactor, 0.02, lambda: None)
        self.fail("the gateway did not count the connections in time")

    @inlineCallbacks
    def test_upstream_down(self) -> Any:
        """With the upstream down the client gets a plain 502 page, with HSTS and the CSP."""
        self.state.update(self.settings(upstream=f"http://127.0.0.1:{free_ports('127.0.0.1', 1)[0]}"))
        fetched = yield self.curl("/roundcube/")
        self.assertEqual(fetched.status, 502)
        self.assertEqual(fetched.header("content-type"), "text/plain; charset=utf-8")
        self.assertIn(b"not available", fetched.body)
        self.assertEqual(fetched.header("strict-transport-security"), f"max-age={HSTS_MAX_AGE}")
        self.assertEqual(fetched.header("content-security-policy"), "default-src 'none'; frame-ancestors 'none'")


class RealProcessTests(SynchronousTestCase):
    """The web listener as configured in the real `python -m twisted mailgateway` process."""

    def test_autoconfig_from_running_gateway(self) -> None:
        """The running gateway serves Thunderbird autoconfig over HTTPS and redirects plain HTTP."""
        directory = tempfile.mkdtemp(prefix="gw-web-real-")
        self.addCleanup(shutil.rmtree, directory, True)
        leaf_ca = TestCA(os.path.join(directory, "ca"))
        leaf = leaf_ca.issue("localhost", "127.0.0.1")
        # Submission too: Thunderbird's document needs an outgoing server. Nothing listens on port 9.
        gateway = GatewayProcess(os.path.join(directory, "gateway"), imap_backend_port=9, submission_backend_port=9,
                                 users={"a": "b"}, certificate=leaf.chain_path, private_key=leaf.key_path,
                                 settings='[web]\nhttps = ["tcp:0:interface=127.0.0.1"]\n'
                                          'http = ["tcp:0:interface=127.0.0.1"]\npublic_host = "localhost"\n')
        gateway.start()
        self.addCleanup(gateway.stop)
        https = int(gateway.wait_for_log(r"listening protocol=https tls=implicit_tls \S+ address=\S+:(\d+)").group(1))
        http = int(gateway.wait_for_log(r"listening protocol=http tls=none \S+ address=\S+:(\d+)").group(1))
        result = subprocess.run(["curl", "-sS", "--cacert", leaf_ca.ca_path, "-D", "-",
                                 f"https://localhost:{https}/mail/config-v1.1.xml?emailaddress=alice%40example.org"],
                                capture_output=True, timeout=60, check=True)
        headers, _, body = result.stdout.partition(b"\r\n\r\n")
        self.assertIn(b"strict-transport-security: max-age=", headers.lower())
        server = ElementTree.fromstring(body).find("./emailProvider/incomingServer")
        assert server is not None
        self.assertEqual((server.get("type"), server.findtext("port"), server.findtext("socketType")),
                         ("imap", "993", "SSL"))
        # The access log names the parameter, not the user's address.
        gateway.wait_for_log(r'"GET /mail/config-v1\.1\.xml\?emailaddress= HTTP/1\.1" 200 ')
        self.assertNotIn("alice", gateway.log())
        redirect = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                                   f"http://127.0.0.1:{http}/roundcube/"], capture_output=True, text=True,
                                  timeout=60, check=True).stdout
        self.assertEqual(redirect, "301 https://localhost/roundcube/")
        # Nor a session id in the path, or a password in the Referer.
        subprocess.run(["curl", "-sS", "-o", "/dev/null", "-H", "Referer: https://bob:hunter2@localhost/roundcube/",
                        f"http://127.0.0.1:{http}/roundcube/;jsessionid=SESSIONSECRET"], timeout=60, check=True)
        gateway.wait_for_log(r'"GET /roundcube/;jsessionid= HTTP/1\.1" 301 \d+ "https://-@localhost/roundcube/"')
        self.assertNotIn("SESSIONSECRET", gateway.log())
        self.assertNotIn("hunter2", gateway.log())

        # A reload (SIGHUP) regenerates the documents from the changed configuration.
        with open(gateway.config_path) as f:
            config = f.read()
        with open(gateway.config_path, "w") as f:
            f.write(config.replace('public_host = "localhost"', 'public_host = "imap.example.org"'))
        assert gateway.pid is not None
        os.kill(gateway.pid, signal.SIGHUP)
        gateway.wait_for_log(r"reloaded path=")
        body = subprocess.run(["curl", "-sS", "--cacert", leaf_ca.ca_path, f"https://localhost:{https}/mail/config-v1.1.xml"],
                              capture_output=True, timeout=60, check=True).stdout
        self.assertEqual(ElementTree.fromstring(body).findtext("./emailProvider/incomingServer/hostname"),
                         "imap.example.org")
        self.assertFalse(re.search(r"Traceback", gateway.log()))
