"""
Tests for gateway.web in memory: the HTTPS and HTTP sites driven over in-memory connections, with
a fake agent standing in for the webmail.
"""

from __future__ import annotations

import dataclasses
import io
import plistlib
import os
import shutil
import tempfile
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from ipaddress import ip_network
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent, ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import HTTPChannel, PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from twisted.web.server import Site
from zope.interface import implementer

from gateway import web
from gateway.autoconfig import (
    AUTODISCOVER_OUTLOOK_NS,
    AUTODISCOVER_REQUEST_NS,
    AUTODISCOVER_RESPONSE_NS,
    MOBILECONFIG_CONTENT_TYPE,
    autodiscover_response,
    mobileconfig,
    thunderbird_config,
)
from gateway.config import ConfigError, Settings, parse_settings
from gateway.connection_limits import ConnectionLimits, ConnectionRules
from gateway.listener import Listener
from gateway.testing.pki import TestCA
from gateway.relay import CLOSE_GRACE
from gateway.tls import ServerTLS
from gateway.web import (
    CONTENT_SECURITY_POLICY,
    DOCUMENT_BODY_LIMIT,
    WebState,
    build_web_service,
    http_site,
    https_site,
)

PUBLIC_HOST = "mail.example.org"
UPSTREAM = "http://127.0.0.1:8080"
CLIENT = IPv4Address("TCP", "192.0.2.7", 50123)
TB_PATH = b"/.well-known/autoconfig/mail/config-v1.1.xml"

LISTENERS: dict[str, Any] = {  # the stores on ports of their own: the gateway takes the standard ones
    "imap": {"implicit_tls": ["tcp:993"], "starttls": ["tcp:143"], "backend": {"port": 10143}},
    "pop3": {"implicit_tls": ["tcp:995"], "backend": {"port": 10110}},
    "submission": {"implicit_tls": ["tcp:465"], "starttls": ["tcp:587"], "backend": {"port": 10587}},
}


def autodiscover_body(email: str) -> bytes:
    """An Outlook POX Autodiscover request for an address."""
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<Autodiscover xmlns="{AUTODISCOVER_REQUEST_NS}"><Request>'
            f"<EMailAddress>{email}</EMailAddress>"
            f"<AcceptableResponseSchema>{AUTODISCOVER_OUTLOOK_NS}</AcceptableResponseSchema>"
            "</Request></Autodiscover>").encode()


@dataclass
class Reply:
    """One HTTP response as a client read it."""

    code: int
    headers: Headers
    body: bytes
    complete: bool
    chunked: bool

    def header(self, name: str) -> bytes | None:
        values = self.headers.getRawHeaders(name.encode())
        return values[-1] if values else None


def parse_reply(data: bytes) -> Reply:
    """Parse the first response in what a server wrote (Content-Length, chunked, or up to the end)."""
    head, separator, rest = data.partition(b"\r\n\r\n")
    assert separator, f"no complete response head in {data[:200]!r}"
    status, *lines = head.split(b"\r\n")
    headers = Headers()
    for line in lines:
        name, _, value = line.partition(b":")
        headers.addRawHeader(name.strip(), value.strip())
    chunked = headers.getRawHeaders(b"transfer-encoding") == [b"chunked"]
    length = headers.getRawHeaders(b"content-length")
    if chunked:
        body, complete = b"", False
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                complete = True
                break
            body, rest = body + rest[:size], rest[size + 2:]
    elif length is not None:
        body = rest[:int(length[0])]
        complete = len(rest) >= int(length[0])
    else:
        body, complete = rest, True
    return Reply(int(status.split(b" ")[1]), headers, body, complete, chunked)


@dataclass
class SentRequest:
    """What the fake agent was asked to send to the webmail."""

    method: bytes
    uri: bytes
    headers: Headers
    body: IBodyProducer | None
    answer: Deferred[IResponse]
    cancelled: list[bool] = field(default_factory=list)

    def header(self, name: str) -> list[bytes] | None:
        return self.headers.getRawHeaders(name.encode())


@implementer(IAgent)
class FakeAgent:
    """An agent that records each request and lets the test answer it."""

    def __init__(self) -> None:
        self.sent: list[SentRequest] = []

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: IBodyProducer | None = None) -> Deferred[IResponse]:
        cancelled: list[bool] = []

        def cancel(answer: Deferred[IResponse]) -> None:
            # As Twisted's Agent does: a cancelled request fails with an error of its own.
            cancelled.append(True)
            answer.errback(ResponseNeverReceived([Failure(CancelledError())]))

        answer: Deferred[IResponse] = Deferred(cancel)
        self.sent.append(SentRequest(method, uri, headers or Headers(), bodyProducer, answer, cancelled))
        return answer


@implementer(IResponse)
class FakeResponse:
    """A webmail response whose body the test delivers piece by piece through C{protocol}."""

    version = (b"HTTP", 1, 1)
    request = None
    previousResponse = None

    def __init__(self, code: int, headers: dict[str, list[str]], length: int | None = None) -> None:
        self.code = code
        self.length = UNKNOWN_LENGTH if length is None else length
        self.phrase = b"OK" if code == 200 else b"Whatever"
        self.headers = Headers(headers)
        self.transport = StringTransport()  # the upstream connection, as a producer
        self.protocol: Protocol | None = None

    def deliverBody(self, protocol: Protocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def setPreviousResponse(self, response: IResponse) -> None:
        raise NotImplementedError


class Connection:
    """One client connection to a site, in memory."""

    def __init__(self, site: Site, peer: IPv4Address | IPv6Address = CLIENT) -> None:
        self.transport = StringTransport(peerAddress=peer)
        channel = site.buildProtocol(peer)
        assert isinstance(channel, HTTPChannel)
        self.channel = channel
        channel.makeConnection(self.transport)

    def send(self, method: bytes, target: bytes, headers: dict[bytes, bytes] | None = None,
             body: bytes = b"") -> None:
        """Send one request; a body gets a Content-Length unless the headers give one or say chunked."""
        fields = {b"Host": PUBLIC_HOST.encode(), **(headers or {})}
        if body and b"Transfer-Encoding" not in fields:
            fields.setdefault(b"Content-Length", b"%d" % len(body))
        head = b"".join(b"%s: %s\r\n" % item for item in fields.items())
        self.channel.dataReceived(b"%s %s HTTP/1.1\r\n%s\r\n" % (method, target, head) + body)

    def reply(self) -> Reply:
        return parse_reply(self.transport.value())

    def close(self) -> None:
        if self.transport.connected:
            self.transport.connected = False
            self.channel.connectionLost(Failure(ConnectionDone()))


class SiteTestCase(SynchronousTestCase):
    """Builds settings, a web state and the two sites on a fake clock."""

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="mailgateway-web-")
        self.addCleanup(shutil.rmtree, self.directory)
        self.clock = Clock()
        self.agent = FakeAgent()
        self.state = WebState(self.settings())
        self.cooperator = Cooperator(scheduler=lambda step: self.clock.callLater(0, step))
        self.https = self.site(https_site(self.state, self.clock, self.agent, self.cooperator))
        self.http = self.site(http_site(self.state, self.clock))

    def tearDown(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def settings(self, *, listeners: dict[str, Any] | None = None, **web: Any) -> Settings:
        """A configuration with the given listeners and [web] keys (defaults: all protocols, an upstream)."""
        web_table = {"https": ["tcp:443"], "http": ["tcp:80"], "public_host": PUBLIC_HOST, "upstream": UPSTREAM}
        web_table.update(web)
        data: dict[str, Any] = {
            "gateway": {"hostname": "gateway.internal", "state_dir": self.directory},
            "tls": {"self_signed": True},
            "auth": {"mode": "backend"},
            "web": {key: value for key, value in web_table.items() if value is not None},
        }
        data.update(LISTENERS if listeners is None else listeners)
        return parse_settings(f"{self.directory}/mailgateway.toml", data)

    def site(self, site: Site) -> Site:
        site.doStart()
        self.addCleanup(site.doStop)
        return site

    def connect(self, site: Site, peer: IPv4Address | IPv6Address = CLIENT) -> Connection:
        connection = Connection(site, peer)
        self.addCleanup(connection.close)
        return connection

    def get(self, target: bytes, *, site: Site | None = None, method: bytes = b"GET",
            headers: dict[bytes, bytes] | None = None, body: bytes = b"") -> Reply:
        """Send one request on a new connection and return the complete reply."""
        connection = self.connect(site or self.https)
        connection.send(method, target, headers, body)
        reply = connection.reply()
        self.assertTrue(reply.complete, "the response is not complete")
        return reply

    def assert_own_page(self, reply: Reply, code: int) -> None:
        """A fixed plain-text page of the gateway's, with its security headers."""
        self.assertEqual(reply.code, code)
        self.assertEqual(reply.body, web._PAGES[code])
        self.assertEqual(reply.header("content-type"), b"text/plain; charset=utf-8")
        self.assertEqual(reply.header("content-security-policy"), CONTENT_SECURITY_POLICY)
        self.assertEqual(reply.header("x-content-type-options"), b"nosniff")


class DocumentTests(SiteTestCase):
    """The autoconfig documents at their paths."""

    def test_thunderbird_paths(self) -> None:
        """Both Thunderbird paths, with or without an address, serve the autoconfig document as text/xml."""
        for path in (TB_PATH, b"/mail/config-v1.1.xml"):
            for query, email in ((b"", None), (b"?emailaddress=alice%40example.com", "alice@example.com")):
                reply = self.get(path + query)
                self.assertEqual(reply.code, 200)
                self.assertEqual(reply.header("content-type"), b"text/xml; charset=utf-8")
                self.assertEqual(reply.body, thunderbird_config(self.state.settings, email))
                hosts = {e.text for e in ElementTree.fromstring(reply.body).iter("hostname")}
                self.assertEqual(hosts, {PUBLIC_HOST})

    def test_thunderbird_over_http(self) -> None:
        """The plain HTTP site serves the Thunderbird document too, without HSTS."""
        reply = self.get(TB_PATH + b"?emailaddress=bob%40example.com", site=self.http)
        self.assertEqual(reply.code, 200)
        self.assertEqual(reply.body, thunderbird_config(self.state.settings, "bob@example.com"))
        self.assertIsNone(reply.header("strict-transport-security"))
        self.assertEqual(reply.header("x-content-type-options"), b"nosniff")

    def test_thunderbird_head(self) -> None:
        """
        HEAD on a document path, a fixed page or a redirect gives the GET's headers, its length
        included, and no body; the log gets the access line alone (no warning naming the request).
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        for site, target in ((self.https, TB_PATH + b"?emailaddress=alice%40example.com"),
                             (self.https, b"/apple/mail.mobileconfig"), (self.http, b"/roundcube/?_task=mail")):
            connection = self.connect(site)
            connection.send(b"HEAD", target)
            head, _, body = connection.transport.value().partition(b"\r\n\r\n")
            got = self.get(target, site=site)
            self.assertIn(b"%d" % got.code, head.split(b"\r\n")[0])
            self.assertIn(b"\r\nContent-Length: %d\r\n" % len(got.body), head + b"\r\n")
            self.assertEqual(body, b"")
        # The access log's lines alone (written as text, "log_io"), and none names the address.
        self.assertEqual([event["log_format"] for event in events if event["log_format"] != "{log_io}"], [])
        self.assertFalse([event for event in events if "alice" in event["log_io"]])

    def test_request_named_without_query_values(self) -> None:
        """Where twisted.web names a request in its log, the query's values are left out."""
        request = web._WebRequest(self.connect(self.https).channel)
        request.method, request.uri = b"GET", TB_PATH + b"?emailaddress=alice%40example.com"
        self.assertIn("uri=b'/.well-known/autoconfig/mail/config-v1.1.xml?emailaddress='", repr(request))
        self.assertNotIn("alice", repr(request))

    def test_thunderbird_without_incoming_listener(self) -> None:
        """With no IMAP or POP3 listener the autoconfig path is a 404."""
        self.state.update(self.settings(listeners={"submission": {"implicit_tls": ["tcp:465"]}}))
        self.assert_own_page(self.get(TB_PATH), 404)

    def test_document_wrong_method(self) -> None:
        """POST to the Thunderbird path is a 405 naming GET and HEAD."""
        reply = self.get(TB_PATH, method=b"POST", body=b"x")
        self.assert_own_page(reply, 405)
        self.assertEqual(reply.header("allow"), b"GET, HEAD")

    def test_autodiscover(self) -> None:
        """An Autodiscover POST gets the response for its address as application/xml."""
        reply = self.get(b"/autodiscover/autodiscover.xml", method=b"POST",
                         headers={b"Content-Type": b"text/xml"}, body=autodiscover_body("carol@example.com"))
        self.assertEqual(reply.code, 200)
        self.assertEqual(reply.header("content-type"), b"application/xml; charset=utf-8")
        self.assertEqual(reply.body, autodiscover_response(self.state.settings, "carol@example.com"))
        root = ElementTree.fromstring(reply.body)
        self.assertEqual(root.tag, f"{{{AUTODISCOVER_RESPONSE_NS}}}Autodiscover")

    def test_autodiscover_path_case(self) -> None:
        """The Autodiscover path matches whatever its case."""
        for path in (b"/Autodiscover/Autodiscover.xml", b"/AUTODISCOVER/AUTODISCOVER.XML", b"/autodiscover/AutoDiscover.xml"):
            reply = self.get(path, method=b"POST", body=autodiscover_body("carol@example.com"))
            self.assertEqual(reply.code, 200, path)
            self.assertEqual(self.agent.sent, [])

    def test_autodiscover_malformed(self) -> None:
        """A malformed Autodiscover body gets a fixed 400 page, never a traceback."""
        for body in (b"<Autodiscover><Request>", b"not xml at all", b"\xff\xfe", b"",
                     b'<!DOCTYPE x [<!ENTITY a "b">]><Autodiscover/>'):
            reply = self.get(b"/autodiscover/autodiscover.xml", method=b"POST", body=body)
            self.assert_own_page(reply, 400)

    def test_autodiscover_get(self) -> None:
        """GET on the Autodiscover path is a 405 naming POST."""
        reply = self.get(b"/autodiscover/autodiscover.xml")
        self.assert_own_page(reply, 405)
        self.assertEqual(reply.header("allow"), b"POST")

    def test_autodiscover_oversized(self) -> None:
        """An Autodiscover body over 64 KiB is a 400."""
        body = autodiscover_body("carol@example.com")
        body += b" " * (DOCUMENT_BODY_LIMIT + 1 - len(body))
        reply = self.get(b"/autodiscover/autodiscover.xml", method=b"POST", body=body)
        self.assert_own_page(reply, 400)

    def test_autodiscover_at_limit(self) -> None:
        """An Autodiscover body of exactly 64 KiB is answered."""
        body = autodiscover_body("carol@example.com")
        body += b" " * (DOCUMENT_BODY_LIMIT - len(body))
        reply = self.get(b"/autodiscover/autodiscover.xml", method=b"POST", body=body)
        self.assertEqual(reply.code, 200)

    def test_oversized_chunked_body_answered_at_once(self) -> None:
        """A chunked body to a document path gets the 400 page once past 64 KiB, and the connection closes."""
        connection = self.connect(self.https)
        connection.send(b"POST", b"/autodiscover/autodiscover.xml", {b"Transfer-Encoding": b"chunked"})
        chunk = b"x" * 16384
        for _ in range(5):  # 80 KiB, and no last chunk: the body might never end
            connection.channel.dataReceived(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.assert_own_page(connection.reply(), 400)
        self.assertEqual(connection.reply().header("connection"), b"close")
        self.assertTrue(connection.transport.disconnecting)
        (request,) = connection.channel.requests
        self.assertTrue(request.content.closed)  # what arrived of it is dropped
        connection.channel.dataReceived(b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunk), chunk))
        self.assertEqual(connection.transport.value().count(b"HTTP/1.1 "), 1)  # the rest is ignored

    def test_oversized_chunk_size_answered_at_once(self) -> None:
        """A chunk said to be larger than the rest of the limit gets the 400 page before its bytes, as does an absurd size."""
        for size in (b"10001", b"fffffffffffffffffffff"):
            connection = self.connect(self.https)
            connection.send(b"POST", b"/autodiscover/autodiscover.xml", {b"Transfer-Encoding": b"chunked"})
            connection.channel.dataReceived(b"%x\r\n%s\r\n" % (0xffff, b"x" * 0xffff))  # one byte short of 64 KiB
            self.assertEqual(connection.transport.value(), b"")
            connection.channel.dataReceived(size + b"\r\nx")  # at the limit: only the size passes it
            self.assert_own_page(connection.reply(), 400)
            self.assertTrue(connection.transport.disconnecting)

    def test_chunk_size_within_limit_waits(self) -> None:
        """A chunk that ends at the limit is waited for."""
        connection = self.connect(self.https)
        connection.send(b"POST", b"/autodiscover/autodiscover.xml", {b"Transfer-Encoding": b"chunked"})
        connection.channel.dataReceived(b"%x\r\nxy" % DOCUMENT_BODY_LIMIT)
        self.assertEqual(connection.transport.value(), b"")
        self.assertFalse(connection.transport.disconnecting)

    def test_declared_oversized_body_answered_at_once(self) -> None:
        """A body declared over 64 KiB on a document path gets the 400 page before any of it, no 100 Continue."""
        connection = self.connect(self.https)
        connection.send(b"POST", b"/autodiscover/autodiscover.xml",
                        {b"Content-Length": b"%d" % (DOCUMENT_BODY_LIMIT + 1), b"Expect": b"100-continue"})
        self.assert_own_page(connection.reply(), 400)
        self.assertTrue(connection.transport.disconnecting)
        self.assertNotIn(b"100 Continue", connection.transport.value())
        connection.channel.dataReceived(b"y" * (DOCUMENT_BODY_LIMIT + 1))
        self.assertEqual(connection.transport.value().count(b"HTTP/1.1 "), 1)

    def test_mobileconfig(self) -> None:
        """The profile is served as an attachment of Apple's profile type and parses as a plist."""
        reply = self.get(b"/apple/mail.mobileconfig?emailaddress=dave%40example.com")
        self.assertEqual(reply.code, 200)
        self.assertEqual(reply.header("content-type"), MOBILECONFIG_CONTENT_TYPE.encode())
        self.assertEqual(reply.header("content-disposition"), b'attachment; filename="mail.mobileconfig"')
        self.assertEqual(reply.body, mobileconfig(self.state.settings, "dave@example.com"))
        profile = plistlib.loads(reply.body)
        self.assertEqual(profile["PayloadContent"][0]["PayloadType"], "com.apple.mail.managed")

    def test_mobileconfig_plus_address(self) -> None:
        """
        A "+" in the address stays one, as Safari sends it when a user types alice+tag@... into the
        address bar; encoded, it is the same; the first emailaddress counts.
        """
        for query in (b"?emailaddress=dave+mail@example.com", b"?emailaddress=dave%2Bmail%40example.com",
                      b"?x=1&emailaddress=dave+mail@example.com&emailaddress=eve@example.com"):
            reply = self.get(b"/apple/mail.mobileconfig" + query)
            self.assertEqual(reply.code, 200, query)
            self.assertEqual(reply.body, mobileconfig(self.state.settings, "dave+mail@example.com"))

    def test_mobileconfig_needs_an_address(self) -> None:
        """A profile request without a plausible address is a 400."""
        for query in (b"", b"?emailaddress=", b"?emailaddress=%25EMAILADDRESS%25", b"?emailaddress=nobody",
                      b"?emailaddress=%ff%40example.com", b"?other=dave%40example.com"):
            self.assert_own_page(self.get(b"/apple/mail.mobileconfig" + query), 400)

    def test_mobileconfig_without_submission(self) -> None:
        """Without a submission listener there is no profile: a 404."""
        self.state.update(self.settings(listeners={"imap": {"starttls": ["tcp:143"], "backend": {"port": 10143}}}))
        self.assert_own_page(self.get(b"/apple/mail.mobileconfig?emailaddress=dave%40example.com"), 404)

    def test_thunderbird_without_submission(self) -> None:
        """Without a submission listener there is no Thunderbird document either: a 404."""
        self.state.update(self.settings(listeners={"imap": {"starttls": ["tcp:143"], "backend": {"port": 10143}}}))
        self.assert_own_page(self.get(b"/mail/config-v1.1.xml?emailaddress=dave%40example.com"), 404)

    def test_mobileconfig_only_over_https(self) -> None:
        """The plain HTTP site redirects the profile path instead of serving a profile in clear."""
        reply = self.get(b"/apple/mail.mobileconfig?emailaddress=dave%40example.com", site=self.http)
        self.assertEqual(reply.code, 301)


class SecurityHeaderTests(SiteTestCase):
    """Headers on every response."""

    def test_document_headers(self) -> None:
        """A document carries HSTS with the configured max-age, nosniff, the CSP and no-store."""
        self.state.update(self.settings(hsts_max_age=86400))
        reply = self.get(TB_PATH)
        self.assertEqual(reply.header("strict-transport-security"), b"max-age=86400")
        self.assertEqual(reply.header("x-content-type-options"), b"nosniff")
        self.assertEqual(reply.header("content-security-policy"), b"default-src 'none'; frame-ancestors 'none'")
        self.assertEqual(reply.header("cache-control"), b"no-store")
        self.assertIsNone(reply.header("server"))

    def test_star_request_names_no_server(self) -> None:
        """OPTIONS * and GET *, which twisted.web answers itself, name no server software either, on both sites."""
        for site in (self.https, self.http):
            for method in (b"OPTIONS", b"GET"):
                reply = self.get(b"*", site=site, method=method)
                self.assertIsNone(reply.header("server"), (site, method))

    def test_error_headers(self) -> None:
        """An error page carries the security headers too."""
        reply = self.get(b"/autodiscover/autodiscover.xml", method=b"POST", body=b"junk")
        self.assertEqual(reply.header("strict-transport-security"), b"max-age=31536000")

    def test_hsts_off(self) -> None:
        """With hsts_max_age = 0 the header says max-age=0, so that browsers forget an earlier policy (RFC 6797 6.1.1)."""
        self.state.update(self.settings(hsts_max_age=0))
        self.assertEqual(self.get(TB_PATH).header("strict-transport-security"), b"max-age=0")

    def test_no_upstream(self) -> None:
        """Without an upstream every other path is a plain 404 page."""
        self.state.update(self.settings(upstream=None))
        reply = self.get(b"/roundcube/")
        self.assert_own_page(reply, 404)
        self.assertEqual(reply.header("strict-transport-security"), b"max-age=31536000")
        self.assertEqual(self.agent.sent, [])


class AccessLogTests(SiteTestCase):
    """The access log's lines: twisted.web's combined format, without parameters' values, user names or passwords."""

    def logged(self, target: bytes, headers: dict[bytes, bytes] | None = None, https: bool = True) -> str:
        """The access log line of one request to the HTTPS site, or to the plain one."""
        site = self.https if https else self.http
        written = io.StringIO()
        site.logFile = written  # type: ignore[attr-defined]
        self.get(target, headers=headers, site=site)
        return written.getvalue()

    def test_query_values_left_out(self) -> None:
        """An autoconfig request is logged with its path and parameter name, not the user's address."""
        line = self.logged(TB_PATH + b"?emailaddress=alice%40example.com")
        self.assertIn('"GET %s?emailaddress= HTTP/1.1" 200 ' % TB_PATH.decode(), line)
        self.assertNotIn("alice", line)

    def test_referer_query_values_left_out(self) -> None:
        """A Referer is logged without its query's values; the rest of the line is as twisted.web writes it."""
        line = self.logged(TB_PATH, {b"Referer": b"https://mail.example.org/?_task=login&_token=s3cret",
                                     b"User-Agent": b"Thunderbird"})
        self.assertRegex(line, r'^"192\.0\.2\.7" - - \[.+\] "GET /\.well-known/autoconfig/mail/config-v1\.1\.xml '
                               r'HTTP/1\.1" 200 \d+ "https://mail\.example\.org/\?_task=&_token=" "Thunderbird"\n$')

    def test_query_shapes(self) -> None:
        """Parameters keep their names; a part without a name is a dash; a target without a query is unchanged."""
        for target, logged in ((b"/a", b"/a"), (b"/a?", b"/a?"), (b"/a?user=x&token=y", b"/a?user=&token="),
                               (b"/a?alice@example.com", b"/a?-"), (b"/a?x=1=2&&b", b"/a?x=&&-"), (b"*", b"*")):
            self.assertEqual(web._loggable_target(target), logged)

    def test_path_parameter_values_left_out(self) -> None:
        """A session id in the path (Java webmails: C{;jsessionid=}) is logged by its name alone, in any segment."""
        line = self.logged(b"/webmail;jsessionid=0123ABCD/inbox;view=list;sid?page=2", https=False)
        self.assertIn('"GET /webmail;jsessionid=/inbox;view=;-?page= HTTP/1.1" 301 ', line)
        self.assertNotIn("0123ABCD", line)

    def test_user_and_password_left_out(self) -> None:
        """
        A user name and password in an absolute-form target (logged as the client sent it, though
        served as its path) or a Referer are logged as a dash; the host stays.
        """
        line = self.logged(b"https://alice:s3cret@mail.example.org" + TB_PATH,
                           {b"Referer": b"https://bob:hunter2@mail.example.org/roundcube/;x=1"})
        self.assertIn('"GET https://-@mail.example.org%s HTTP/1.1" 200 ' % TB_PATH.decode(), line)
        self.assertIn('"https://-@mail.example.org/roundcube/;x="', line)
        for secret in ("alice", "s3cret", "bob", "hunter2"):
            self.assertNotIn(secret, line)
        for target, logged in ((b"http://a:b@c@host", b"http://-@host"), (b"http://host/a@b", b"http://host/a@b"),
                               (b"http://host", b"http://host"), (b"/x/http://a:b@host/", b"/x/http://a:b@host/"),
                               (b"HTTP://A:B@HOST/", b"HTTP://-@HOST/"), (b"//alice:pw@host/a;s=1", b"//-@host/a;s="),
                               (b"alice:pw@host:443", b"-@host:443"), (b"host:443", b"host:443")):
            self.assertEqual(web._loggable_target(target), logged)

    def test_relative_referer(self) -> None:
        """A relative Referer's path parameters lose their values too, whatever its later segments look like."""
        self.assertEqual(web._loggable_target(b"a;sid=s3cret/b://c"), b"a;sid=/b://c")


class RedirectTests(SiteTestCase):
    """The plain HTTP site sends everything but Thunderbird's paths to HTTPS."""

    def test_redirect_uses_public_host(self) -> None:
        """A 301 goes to the configured public host with the same path and query, whatever the Host header says."""
        reply = self.get(b"/roundcube/?_task=mail&x=%2F", site=self.http, headers={b"Host": b"evil.example"})
        self.assertEqual(reply.code, 301)
        self.assertEqual(reply.header("location"), b"https://mail.example.org/roundcube/?_task=mail&x=%2F")
        self.assertIsNone(reply.header("strict-transport-security"))
        self.assertEqual(reply.header("x-content-type-options"), b"nosniff")

    def test_absolute_target(self) -> None:
        """An absolute-form request target is redirected to its path on the public host, not to its own host."""
        reply = self.get(b"http://evil.example/path?q=1", site=self.http)
        self.assertEqual(reply.header("location"), b"https://mail.example.org/path?q=1")
        self.assertEqual(self.get(b"http://evil.example", site=self.http).header("location"), b"https://mail.example.org/")

    def test_autodiscover_redirected(self) -> None:
        """
        Autodiscover over HTTP is redirected to HTTPS (where Outlook then posts) with a 302, the only
        redirect Outlook's plain-HTTP probe follows (MS-OXDISCO), whatever the path's case.
        """
        for path, method in ((b"/autodiscover/autodiscover.xml", b"GET"), (b"/Autodiscover/Autodiscover.xml", b"POST")):
            reply = self.get(path, site=self.http, method=method, body=b"<x/>" if method == b"POST" else b"")
            self.assertEqual(reply.code, 302)
            self.assertEqual(reply.header("location"), b"https://mail.example.org" + path)

    def test_reload_changes_redirect(self) -> None:
        """After WebState.update the redirect names the new public host."""
        self.state.update(self.settings(public_host="webmail.example.net"))
        self.assertEqual(self.get(b"/", site=self.http).header("location"), b"https://webmail.example.net/")


class AcmeChallengeTests(SiteTestCase):
    """With [web] acme_webroot, the plain HTTP site serves certbot's HTTP-01 challenges."""

    def setUp(self) -> None:
        super().setUp()
        self.webroot = os.path.join(self.directory, "acme")
        self.challenges = os.path.join(self.webroot, ".well-known", "acme-challenge")
        os.makedirs(self.challenges)
        self.state.update(self.settings(acme_webroot=self.webroot))

    def challenge(self, name: str, body: bytes) -> None:
        with open(os.path.join(self.challenges, name), "wb") as f:
            f.write(body)

    def test_served(self) -> None:
        """The token's file, as it is, never from a cache."""
        self.challenge("Ab-9_x", b"Ab-9_x.thumbprint")
        reply = self.get(b"/.well-known/acme-challenge/Ab-9_x", site=self.http)
        self.assertEqual((reply.code, reply.body), (200, b"Ab-9_x.thumbprint"))
        self.assertEqual(reply.header("content-type"), b"text/plain")
        self.assertEqual(reply.header("cache-control"), b"no-store")

    def test_nothing_else_served(self) -> None:
        """
        Unknown tokens, paths that are no token (a parent, an escape, a deeper path), links and
        FIFOs get a 404; POST a 405.
        """
        os.symlink("/etc/hostname", os.path.join(self.challenges, "linked"))
        os.mkfifo(os.path.join(self.challenges, "fifo"))
        self.challenge("big", b"x" * 5000)
        with open(os.path.join(self.directory, "secret"), "wb") as f:
            f.write(b"secret")
        for path in (b"missing", b"a/b", b"", b"linked", b"fifo", b"big"):
            self.assert_own_page(self.get(b"/.well-known/acme-challenge/" + path, site=self.http), 404)
        for path in (b"..", b"../../secret", b"..%2Fsecret"):  # a dot segment: refused before any path is looked at
            self.assert_own_page(self.get(b"/.well-known/acme-challenge/" + path, site=self.http), 400)
        self.assert_own_page(self.get(b"/.well-known/acme-challenge/big", site=self.http, method=b"POST",
                                      body=b"x"), 405)

    def test_only_when_configured_and_on_http(self) -> None:
        """Without acme_webroot the path is redirected as any other; over HTTPS it is the webmail's."""
        self.challenge("token", b"token.thumbprint")
        connection = self.connect(self.https)
        connection.send(b"GET", b"/.well-known/acme-challenge/token")
        self.assertEqual([sent.uri for sent in self.agent.sent], [UPSTREAM.encode() + b"/.well-known/acme-challenge/token"])
        self.assertEqual(connection.transport.value(), b"")
        self.state.update(self.settings())
        reply = self.get(b"/.well-known/acme-challenge/token", site=self.http)
        self.assertEqual(reply.code, 301)


class WebStateTests(SiteTestCase):
    """Reloads."""

    def test_update_changes_documents(self) -> None:
        """After WebState.update the documents name the new public host."""
        before = self.get(TB_PATH).body
        self.state.update(self.settings(public_host="imap.example.net"))
        after = self.get(TB_PATH).body
        self.assertNotEqual(before, after)
        self.assertEqual({e.text for e in ElementTree.fromstring(after).iter("hostname")}, {"imap.example.net"})

    def test_update_without_web(self) -> None:
        """A configuration without [web] is refused and the one in force stays."""
        data: dict[str, Any] = {"gateway": {"hostname": "gw.example.org", "state_dir": self.directory},
                                "tls": {"self_signed": True}, "auth": {"mode": "backend"}, **LISTENERS}
        settings = self.state.settings
        self.assertRaises(ValueError, self.state.update, parse_settings(f"{self.directory}/x.toml", data))
        self.assertIs(self.state.settings, settings)
        self.assertRaises(ValueError, WebState, parse_settings(f"{self.directory}/x.toml", data))


class ProxyTests(SiteTestCase):
    """Every other HTTPS path goes to the webmail."""

    def forward(self, target: bytes = b"/roundcube/?_task=mail", *, method: bytes = b"GET",
                headers: dict[bytes, bytes] | None = None, body: bytes = b"",
                peer: IPv4Address | IPv6Address = CLIENT) -> tuple[Connection, SentRequest]:
        connection = self.connect(self.https, peer)
        connection.send(method, target, headers, body)
        self.assertEqual(len(self.agent.sent), 1)
        return connection, self.agent.sent[0]

    def produced(self, sent: SentRequest) -> bytes:
        """The body a forwarded request's producer gives the webmail, all of it (the cooperator's turns run)."""
        assert sent.body is not None
        consumer = StringTransport()
        done = sent.body.startProducing(consumer)
        for _ in range(100):
            self.clock.advance(0)
        self.successResultOf(done)
        return consumer.value()

    def answer(self, sent: SentRequest, code: int = 200, headers: dict[str, list[str]] | None = None,
               length: int | None = None) -> FakeResponse:
        response = FakeResponse(code, headers if headers is not None else {"Content-Type": ["text/html"]}, length)
        sent.answer.callback(response)
        return response

    def test_request_target_and_headers(self) -> None:
        """The webmail gets the path and query, the client's headers less hop-by-hop ones, and the forwarding headers."""
        _, sent = self.forward(headers={
            b"Host": b"Mail.Example.org", b"Cookie": b"roundcube_sessid=abc", b"User-Agent": b"Firefox",
            b"X-Forwarded-For": b"10.6.6.6", b"X-Forwarded-Proto": b"http", b"X-Forwarded-Host": b"evil.example",
            b"Forwarded": b"for=10.6.6.6", b"X-Real-IP": b"10.6.6.6",
            b"Connection": b"keep-alive, X-Secret-Hop", b"X-Secret-Hop": b"1", b"Keep-Alive": b"timeout=5",
            b"TE": b"trailers", b"Upgrade": b"websocket", b"Proxy-Authorization": b"Basic Zm9vOmJhcg==",
            b"Trailer": b"X-Checksum",
        })
        self.assertEqual((sent.method, sent.uri), (b"GET", b"http://127.0.0.1:8080/roundcube/?_task=mail"))
        self.assertEqual(sent.header("x-forwarded-for"), [b"192.0.2.7"])
        self.assertEqual(sent.header("x-real-ip"), [b"192.0.2.7"])
        self.assertEqual(sent.header("x-forwarded-proto"), [b"https"])
        self.assertEqual(sent.header("x-forwarded-host"), [b"mail.example.org"])
        self.assertEqual(sent.header("host"), [b"mail.example.org"])
        self.assertEqual(sent.header("cookie"), [b"roundcube_sessid=abc"])
        self.assertEqual(sent.header("user-agent"), [b"Firefox"])
        for name in ("forwarded", "connection", "x-secret-hop", "keep-alive", "te", "upgrade",
                     "proxy-authorization", "trailer", "content-length", "transfer-encoding"):
            self.assertIsNone(sent.header(name), name)
        self.assertIsNone(sent.body)

    def test_ipv6_client(self) -> None:
        """An IPv6 client's address is forwarded in its compressed form."""
        _, sent = self.forward(peer=IPv6Address("TCP", "2001:db8:0:0::7", 4000))
        self.assertEqual(sent.header("x-forwarded-for"), [b"2001:db8::7"])

    def test_upstream_with_slash(self) -> None:
        """An upstream written with a trailing slash gives no double slash."""
        self.state.update(self.settings(upstream="http://127.0.0.1:8080/"))
        _, sent = self.forward(b"/x")
        self.assertEqual(sent.uri, b"http://127.0.0.1:8080/x")

    def test_request_body_streamed(self) -> None:
        """A request body reaches the webmail through a body producer of the body's length."""
        body = bytes(range(256)) * 1000
        _, sent = self.forward(b"/upload", method=b"POST", body=body,
                               headers={b"Content-Type": b"application/x-www-form-urlencoded", b"Expect": b"100-continue"})
        self.assertIsNone(sent.header("expect"))
        assert sent.body is not None
        self.assertEqual(sent.body.length, len(body))
        self.assertEqual(self.produced(sent), body)

    def test_form_body_not_parsed(self) -> None:
        """
        A POSTed form goes to the webmail as sent, never parsed into C{request.args} by twisted.web
        on the way (the site's C{parsePOSTFormSubmission=False}): that parse reads the whole body
        into memory and, for multipart, holds the reactor about 2 s and 370 MiB per 32 MiB upload.
        """
        for content_type in (b"multipart/form-data; boundary=x", b"application/x-www-form-urlencoded"):
            self.agent.sent.clear()
            body = b"--x\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n\xff%zz&=&a=1"
            connection, sent = self.forward(b"/upload", method=b"POST", body=body,
                                            headers={b"Content-Type": content_type})
            self.assertEqual(connection.transport.value(), b"", content_type)
            self.assertEqual(connection.channel.requests[-1].args, {}, content_type)
            self.assertEqual(self.produced(sent), body)

    def test_response_streamed(self) -> None:
        """The webmail's status, headers and body reach the client as they arrive, without the CSP."""
        connection, sent = self.forward()
        response = self.answer(sent, 201, {
            "Content-Type": ["text/html; charset=utf-8"], "Set-Cookie": ["a=1; Secure", "b=2; HttpOnly"],
            "Keep-Alive": ["timeout=3"],
            "Strict-Transport-Security": ["max-age=1"], "X-Content-Type-Options": ["whatever"],
            "Server": ["BaseHTTP/0.6 Python/3.11.7"],
        })
        assert response.protocol is not None
        response.protocol.dataReceived(b"<html>first")
        partial = connection.reply()
        self.assertEqual(partial.code, 201)
        self.assertEqual(partial.body, b"<html>first")
        self.assertFalse(partial.complete)
        response.protocol.dataReceived(b" second</html>")
        response.protocol.connectionLost(Failure(ResponseDone()))
        reply = connection.reply()
        self.assertTrue(reply.complete)
        self.assertEqual(reply.body, b"<html>first second</html>")
        self.assertEqual(reply.header("content-type"), b"text/html; charset=utf-8")
        self.assertEqual(reply.headers.getRawHeaders(b"set-cookie"), [b"a=1; Secure", b"b=2; HttpOnly; Secure"])
        self.assertEqual(reply.headers.getRawHeaders(b"strict-transport-security"), [b"max-age=31536000"])
        self.assertEqual(reply.headers.getRawHeaders(b"x-content-type-options"), [b"nosniff"])
        for name in ("content-security-policy", "keep-alive", "server"):
            self.assertIsNone(reply.header(name), name)
        self.assertEqual(reply.headers.getRawHeaders(b"connection"), None)

    def test_control_characters_made_spaces(self) -> None:
        """
        Control characters in the webmail's header values become spaces (RFC 9110 5.5), and its
        reason phrase is not relayed: the standard one takes its place.
        """
        connection, sent = self.forward()
        response = FakeResponse(200, {"Content-Type": ["text/plain"],
                                      "Content-Disposition": ['attachment; filename="a\x1b[31mb\x00c\x7f.txt"'],
                                      "Location": ["http://127.0.0.1:8080/a\x1bb"], "Set-Cookie": ["s=\x00x"],
                                      "Refresh": ["5; url=/a\x1bb"]}, 2)
        response.phrase = b"OK\x00\x1b[31m\rX-Injected: 1"
        sent.answer.callback(response)
        assert response.protocol is not None
        response.protocol.dataReceived(b"ok")
        response.protocol.connectionLost(Failure(ResponseDone()))
        written = connection.transport.value()
        self.assertTrue(written.startswith(b"HTTP/1.1 200 OK\r\n"), written[:60])
        self.assertIn(b'\r\nContent-Disposition: attachment; filename="a [31mb c .txt"\r\n', written)
        self.assertIn(b"\r\nLocation: https://mail.example.org/a b\r\n", written)
        self.assertIn(b"\r\nSet-Cookie: s= x; Secure\r\n", written)
        self.assertIn(b"\r\nRefresh: 5; url=/a b\r\n", written)
        self.assertEqual(connection.reply().body, b"ok")

    def test_closed_connection_aborted_without_progress(self) -> None:
        """
        A connection twisted.web closes after its response (Connection: close) is aborted once the
        client has gone the grace period without taking it, and left alone if it goes in time.
        """
        for goes_in_time in (False, True):
            timers = len(self.clock.getDelayedCalls())  # the site's own
            connection = self.connect(self.https)
            connection.send(b"GET", b"/mail/config-v1.1.xml", {b"Connection": b"close"})
            self.assertTrue(connection.reply().complete)
            self.assertTrue(connection.transport.disconnecting)
            self.clock.advance(CLOSE_GRACE - 0.1)
            if goes_in_time:
                connection.close()
                self.assertEqual(len(self.clock.getDelayedCalls()), timers, "the abort outlived the connection")
            else:
                self.assertFalse(connection.transport.disconnected)
                self.clock.advance(0.1)
                self.assertTrue(connection.transport.disconnected, "a client that never read was not aborted")

    def test_links_made_public(self) -> None:
        """
        A Location or Content-Location under the webmail's own address, or under http://public_host,
        becomes https://public_host; any other is left alone.
        """
        cases = {
            f"{UPSTREAM}/roundcube/?_task=mail": f"https://{PUBLIC_HOST}/roundcube/?_task=mail",
            UPSTREAM: f"https://{PUBLIC_HOST}",
            f"http://{PUBLIC_HOST.upper()}/sogo/": f"https://{PUBLIC_HOST}/sogo/",
            f"http://{PUBLIC_HOST}:80/sogo/": f"https://{PUBLIC_HOST}/sogo/",
            f"http://{PUBLIC_HOST}:8080/sogo/": f"http://{PUBLIC_HOST}:8080/sogo/",
            f"{UPSTREAM}0/elsewhere": f"{UPSTREAM}0/elsewhere",  # another port
            f"http://{PUBLIC_HOST}.evil.example/": f"http://{PUBLIC_HOST}.evil.example/",
            "/relative/path": "/relative/path",
            "https://example.net/": "https://example.net/",
        }
        for location, expected in cases.items():
            connection, sent = self.forward()
            response = self.answer(sent, 302, {"Location": [location], "Content-Location": [location]}, length=0)
            assert response.protocol is not None
            response.protocol.connectionLost(Failure(ResponseDone()))
            reply = connection.reply()
            self.assertEqual((reply.header("location"), reply.header("content-location")),
                             (expected.encode(), expected.encode()), location)
            self.agent.sent.clear()

    def test_refresh_made_public(self) -> None:
        """A Refresh header's URL is made public as a Location is; its delay and quoting are kept."""
        cases = {
            f"0; url={UPSTREAM}/roundcube/": f"0; url=https://{PUBLIC_HOST}/roundcube/",
            f"5;URL='{UPSTREAM}/x?y=1'": f"5;URL='https://{PUBLIC_HOST}/x?y=1'",
            f"3, url=\"http://{PUBLIC_HOST}/\"": f"3, url=\"https://{PUBLIC_HOST}/\"",
            f"0; {UPSTREAM}/x": f"0; https://{PUBLIC_HOST}/x",
            f"0 url={UPSTREAM}/x": f"0 url=https://{PUBLIC_HOST}/x",
            "10": "10",
            "5; url=/relative": "5; url=/relative",
            "5; url=https://example.net/": "5; url=https://example.net/",
        }
        for refresh, expected in cases.items():
            connection, sent = self.forward()
            response = self.answer(sent, 200, {"Refresh": [refresh]}, length=0)
            assert response.protocol is not None
            response.protocol.connectionLost(Failure(ResponseDone()))
            self.assertEqual(connection.reply().header("refresh"), expected.encode(), refresh)
            self.agent.sent.clear()

    def test_response_length_kept(self) -> None:
        """A webmail response of known length is passed on with its Content-Length, unchunked."""
        connection, sent = self.forward()
        response = self.answer(sent, 200, {}, length=5)
        assert response.protocol is not None
        response.protocol.dataReceived(b"hello")
        response.protocol.connectionLost(Failure(ResponseDone()))
        reply = connection.reply()
        self.assertEqual((reply.body, reply.chunked, reply.complete), (b"hello", False, True))
        self.assertIsNone(reply.header("content-type"))

    def test_not_modified(self) -> None:
        """A 304 from the webmail goes on without a body or a Content-Length."""
        connection, sent = self.forward(headers={b"If-None-Match": b'"v1"'})
        self.assertEqual(sent.header("if-none-match"), [b'"v1"'])
        response = self.answer(sent, 304, {"ETag": ['"v1"']}, length=0)
        assert response.protocol is not None
        response.protocol.connectionLost(Failure(ResponseDone()))
        reply = connection.reply()
        self.assertEqual((reply.code, reply.body), (304, b""))
        self.assertIsNone(reply.header("content-length"))
        self.assertEqual(reply.header("etag"), b'"v1"')

    def test_backpressure(self) -> None:
        """A client that stops reading pauses the webmail connection, and resumes it when it reads again."""
        connection, sent = self.forward()
        response = self.answer(sent)
        assert response.protocol is not None
        response.protocol.dataReceived(b"x" * 65536)
        client_side = connection.transport.producer  # what the client's socket pauses when its buffer is full
        client_side.pauseProducing()
        self.assertEqual(response.transport.producerState, "paused")
        client_side.resumeProducing()
        self.assertEqual(response.transport.producerState, "producing")

    def test_upstream_down(self) -> None:
        """An unreachable webmail gives a fixed 502 page with the gateway's headers."""
        connection, sent = self.forward()
        sent.answer.errback(ConnectionRefusedError("127.0.0.1:8080"))
        reply = connection.reply()
        self.assert_own_page(reply, 502)
        self.assertEqual(reply.header("strict-transport-security"), b"max-age=31536000")
        self.assertNotIn(b"8080", connection.transport.value())

    def test_client_leaves_before_answer(self) -> None:
        """A client that leaves while the webmail has not answered cancels the webmail request."""
        connection, sent = self.forward()
        connection.close()
        self.assertEqual(sent.cancelled, [True])

    def test_client_leaves_during_body(self) -> None:
        """A client that leaves while the body streams stops the webmail connection."""
        connection, sent = self.forward()
        response = self.answer(sent)
        assert response.protocol is not None
        response.protocol.dataReceived(b"part")
        connection.close()
        self.assertEqual(response.transport.producerState, "stopped")
        response.protocol.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost())])))

    def test_upstream_breaks_during_body(self) -> None:
        """A webmail that breaks off mid-body makes the client connection close without the body's end."""
        connection, sent = self.forward()
        response = self.answer(sent)
        assert response.protocol is not None
        response.protocol.dataReceived(b"part")
        response.protocol.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost())])))
        self.assertTrue(connection.transport.disconnecting)
        self.assertFalse(connection.reply().complete)

    def test_absolute_form_target(self) -> None:
        """
        An absolute-form target is served as its path and query (RFC 9112 3.2.2: a server must
        accept it), from the webmail and under the public host, whatever host it names.
        """
        connection = self.connect(self.https)
        connection.send(b"GET", b"HTTP://alice:pw@169.254.169.254/latest/meta-data/?x=1#frag")
        self.assertEqual(len(self.agent.sent), 1)
        self.assertEqual(self.agent.sent[0].uri, UPSTREAM.encode() + b"/latest/meta-data/?x=1")
        self.assertEqual(self.agent.sent[0].headers.getRawHeaders(b"host"), [PUBLIC_HOST.encode()])

    def test_non_origin_target(self) -> None:
        """A target in another form (another scheme's, or an authority) is a 400 and never reaches the webmail."""
        for target in (b"ftp://169.254.169.254/latest/meta-data/", b"169.254.169.254:80"):
            connection = self.connect(self.https)
            connection.send(b"GET", target)
            self.assert_own_page(connection.reply(), 400)
        self.assertEqual(self.agent.sent, [])

    def test_transfer_coding_other_than_chunked(self) -> None:
        """
        A body sent with a transfer coding other than chunked (identity, gone since RFC 7230) is
        a 400, not a request without a body followed by its body read as the next request.
        """
        connection = self.connect(self.https)
        connection.send(b"POST", b"/upload", {b"Transfer-Encoding": b"identity"},
                        body=b"GET /second HTTP/1.1\r\nHost: mail.example.org\r\n\r\n")
        self.assert_own_page(connection.reply(), 400)
        for coding in (b"chunked, identity", b"gzip, chunked"):  # refused by twisted.web itself
            connection = self.connect(self.https)
            connection.send(b"POST", b"/upload", {b"Transfer-Encoding": coding}, body=b"x")
            self.assert_own_page(connection.reply(), 400)
        self.assertEqual(self.agent.sent, [])

    def test_refused_by_twisted_web_itself(self) -> None:
        """
        What twisted.web refuses before the gateway sees it gets the gateway's own page, with its
        length and security headers, and the connection closes: headers over 16 KiB in all (431,
        RFC 6585), a header name with spaces, a broken chunk (400).
        """
        for target, headers, body, code in (
                (b"/roundcube/", {b"X-%d" % n: b"x" * 6000 for n in range(3)}, b"", 431),
                (b"/roundcube/", {b"Broken header line": b""}, b"", 400),
                (b"/upload", {b"Transfer-Encoding": b"chunked"}, b"zz\r\nx\r\n0\r\n\r\n", 400)):
            connection = self.connect(self.https)
            connection.send(b"POST", target, headers, body)
            reply = connection.reply()
            self.assert_own_page(reply, code)
            self.assertEqual(connection.transport.value().split(b"\r\n", 1)[0],
                             b"HTTP/1.1 431 Request Header Fields Too Large" if code == 431 else b"HTTP/1.1 400 Bad Request")
            self.assertEqual(reply.header("strict-transport-security"), b"max-age=31536000")
            self.assertEqual(reply.header("connection"), b"close")
            self.assertTrue(connection.transport.disconnecting)
        self.assertEqual(self.agent.sent, [])

    def test_oversized_upload(self) -> None:
        """An upload over the proxied body limit is a 413 and never reaches the webmail."""
        self.patch(web, "PROXIED_BODY_LIMIT", 100_000)
        connection = self.connect(self.https)
        connection.send(b"POST", b"/upload", body=b"z" * 100_001)
        self.assert_own_page(connection.reply(), 413)
        self.assertEqual(self.agent.sent, [])

    def test_oversized_chunked_upload_answered_at_once(self) -> None:
        """A chunked upload gets the 413 page once past the proxied limit, and never reaches the webmail."""
        self.patch(web, "PROXIED_BODY_LIMIT", 100_000)
        connection = self.connect(self.https)
        connection.send(b"POST", b"/upload", {b"Transfer-Encoding": b"chunked"})
        chunk = b"z" * 16384
        for _ in range(7):  # 112 KiB, and no last chunk
            connection.channel.dataReceived(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.assert_own_page(connection.reply(), 413)
        self.assertTrue(connection.transport.disconnecting)
        self.assertEqual(self.agent.sent, [])

    def test_oversized_chunk_size_of_upload_answered_at_once(self) -> None:
        """An upload whose chunk is said to pass the proxied limit gets the 413 page before the chunk's bytes."""
        self.patch(web, "PROXIED_BODY_LIMIT", 100_000)
        connection = self.connect(self.https)
        connection.send(b"POST", b"/upload", {b"Transfer-Encoding": b"chunked"})
        connection.channel.dataReceived(b"%x\r\nz" % 100_001)
        self.assert_own_page(connection.reply(), 413)
        self.assertTrue(connection.transport.disconnecting)
        self.assertEqual(self.agent.sent, [])

    def test_invalid_uri_byte(self) -> None:
        """A path byte the agent refuses in a URI (0x7F to 0xB0) gets the fixed 400 page, not a 500."""
        agent = Agent(MemoryReactorClock())  # the real agent: it raises at once for such a URI
        site = self.site(https_site(self.state, self.clock, agent, self.cooperator))
        for byte in (b"\x7f", b"\x80", b"\xb0"):
            reply = self.get(b"/roundcube/" + byte, site=site)
            self.assert_own_page(reply, 400)
            self.assertEqual(reply.header("strict-transport-security"), b"max-age=31536000")
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_upstream_silent(self) -> None:
        """A webmail silent for a minute gives the fixed 504 page, and the request to it is cancelled."""
        connection, sent = self.forward()
        self.clock.advance(59)
        self.assertEqual(connection.transport.value(), b"")
        self.clock.advance(1)
        self.assertEqual(sent.cancelled, [True])
        self.assert_own_page(connection.reply(), 504)
        self.assertNotIn(b"8080", connection.transport.value())

    def test_upstream_answer_in_time(self) -> None:
        """A webmail answer within the minute is passed on, and no timer is left behind."""
        connection, sent = self.forward()
        self.clock.advance(59)
        response = self.answer(sent, 200, {}, length=2)
        assert response.protocol is not None
        response.protocol.dataReceived(b"ok")
        response.protocol.connectionLost(Failure(ResponseDone()))
        self.clock.advance(60)
        self.assertEqual(connection.reply().body, b"ok")
        self.assertEqual(sent.cancelled, [])

    def test_large_upload_forwarded(self) -> None:
        """An upload under the proxied body limit but over 64 KiB is forwarded whole."""
        body = b"u" * 300_000
        _, sent = self.forward(b"/upload", method=b"PUT", body=body)
        assert sent.body is not None
        self.assertEqual(sent.body.length, len(body))

    def response_timeouts(self, events: EventLoggingObserver) -> list[tuple[str, str, str]]:
        """The (upstream, peer, waiting_for) of each web_response_timeout event."""
        return [(e["upstream"], e["peer"], e["waiting_for"]) for e in events
                if e.get("log_format", "").startswith("web_response_timeout ")]

    def test_upstream_stalls_mid_body(self) -> None:
        """
        A webmail that goes silent in the middle of a body is cut off a minute after its last
        byte: its connection is stopped, the client's aborted without the end of the body, and
        what the webmail connection's end says afterwards changes nothing.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        connection, sent = self.forward()
        response = self.answer(sent)  # no length: chunked to the client, so an end would show
        assert response.protocol is not None
        response.protocol.dataReceived(b"first")
        self.clock.advance(59)
        response.protocol.dataReceived(b"second")  # progress: a minute again from here
        self.clock.advance(59)
        self.assertFalse(connection.transport.disconnecting)
        self.assertEqual(response.transport.producerState, "producing")
        self.clock.advance(1)
        self.assertTrue(connection.transport.disconnected)  # aborted: nothing waits for a flush
        self.assertEqual(response.transport.producerState, "stopped")
        self.assertEqual(self.response_timeouts(events), [(UPSTREAM, "192.0.2.7", "webmail")])
        written = connection.transport.value()
        response.protocol.connectionLost(Failure(PotentialDataLoss()))  # a body without length ends so
        self.assertEqual(connection.transport.value(), written)
        reply = connection.reply()
        self.assertEqual(reply.body, b"firstsecond")
        self.assertFalse(reply.complete)

    def test_client_stops_reading(self) -> None:
        """
        A client whose connection takes nothing for a minute is cut off, and the webmail
        connection stopped; each time its connection drained restarts the minute.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        connection, sent = self.forward()
        response = self.answer(sent, 200, {}, length=10_000_000)
        assert response.protocol is not None
        response.protocol.dataReceived(b"x" * 65536)
        client_side = connection.transport.producer
        client_side.pauseProducing()
        self.clock.advance(50)
        client_side.resumeProducing()  # the client read what was waiting: progress, though the webmail sent nothing
        client_side.pauseProducing()
        self.clock.advance(59)
        self.assertFalse(connection.transport.disconnecting)
        self.assertEqual(response.transport.producerState, "paused")
        self.clock.advance(1)
        self.assertTrue(connection.transport.disconnected)
        self.assertEqual(response.transport.producerState, "stopped")
        self.assertEqual(self.response_timeouts(events), [(UPSTREAM, "192.0.2.7", "client")])

    def test_host_is_public_host(self) -> None:
        """The webmail's Host and X-Forwarded-Host are the configured public host, whatever the client's Host says."""
        _, sent = self.forward(headers={b"Host": b"evil.example:8443", b"X-Forwarded-Host": b"evil.example"})
        self.assertEqual(sent.header("host"), [b"mail.example.org"])
        self.assertEqual(sent.header("x-forwarded-host"), [b"mail.example.org"])
        self.state.update(self.settings(public_host="webmail.example.net"))
        self.agent.sent.clear()
        _, sent = self.forward()
        self.assertEqual((sent.header("host"), sent.header("x-forwarded-host")),
                         ([b"webmail.example.net"], [b"webmail.example.net"]))

    def test_client_claims_dropped(self) -> None:
        """
        Headers whose names have an underscore, and the client's claims about its address or the
        URL it asked for, never reach the webmail; X-Real-IP is the client's address.
        """
        claims = {
            b"X_Forwarded_For": b"10.6.6.6", b"X-Forwarded_For": b"10.6.6.6", b"X_Real_IP": b"10.6.6.6",
            b"Remote_User": b"admin", b"X-Client-IP": b"10.6.6.6", b"True-Client-IP": b"10.6.6.6",
            b"Client-IP": b"10.6.6.6", b"X-Cluster-Client-IP": b"10.6.6.6", b"X-Real-IP": b"10.6.6.6",
            b"X-Original-URL": b"/admin", b"X-Rewrite-URL": b"/admin", b"X-Original-Host": b"evil.example",
            b"X-Host": b"evil.example", b"X-Forwarded-Server": b"evil.example", b"X-Forwarded-Prefix": b"/evil",
        }
        _, sent = self.forward(headers={b"Accept-Language": b"de", **claims})
        self.assertEqual(sent.header("accept-language"), [b"de"])
        self.assertEqual(sent.header("x-forwarded-for"), [b"192.0.2.7"])
        self.assertEqual(sent.header("x-real-ip"), [b"192.0.2.7"])
        names = {name.lower() for name, _ in sent.headers.getAllRawHeaders()}
        self.assertEqual(names, {b"accept-language", b"host", b"x-forwarded-for", b"x-forwarded-proto",
                                 b"x-forwarded-host", b"x-real-ip"})

    def test_trace_and_connect_refused(self) -> None:
        """TRACE and CONNECT get the fixed 405 page and never reach the webmail."""
        for method in (b"TRACE", b"CONNECT"):
            reply = self.get(b"/roundcube/", method=method, headers={b"Cookie": b"roundcube_sessauth=secret"})
            self.assert_own_page(reply, 405)
            self.assertNotIn(b"secret", reply.body)
        self.assert_own_page(self.get(b"mail.example.org:443", method=b"CONNECT"), 405)
        self.assertEqual(self.agent.sent, [])


    def upload_start(self, size: int, sent: int, peer: IPv4Address = CLIENT) -> Connection:
        """A proxied upload of C{size} bytes declared, of which the first C{sent} have arrived."""
        connection = self.connect(self.https, peer)
        connection.channel.dataReceived(b"PUT /upload HTTP/1.1\r\nHost: mail.example.org\r\n"
                                        b"Content-Length: %d\r\n\r\n" % size + b"u" * sent)
        return connection

    def test_spool_limit(self) -> None:
        """
        Proxied bodies waiting for the webmail share one spool: a body that would pass its limit gets
        a 503 at once, and what it held is given back, as is what a client that goes held.
        """
        self.patch(web, "SPOOL_LIMIT", 300_000)
        first = self.upload_start(400_000, 200_000)
        second = self.upload_start(400_000, 50_000, IPv4Address("TCP", "198.51.100.3", 40000))
        self.assertEqual(self.https.spooled, 250_000)
        second.channel.dataReceived(b"u" * 60_000)
        self.assert_own_page(second.reply(), 503)
        self.assertTrue(second.transport.disconnecting)
        self.assertEqual(self.https.spooled, 200_000)
        first.close()
        self.assertEqual((self.https.spooled, self.https.spooled_by), (0, {}))

    def test_spool_share(self) -> None:
        """One address may hold only its share of the spool; another address still gets in."""
        self.patch(web, "SPOOL_SHARE", 300_000)
        self.upload_start(400_000, 200_000)
        self.assert_own_page(self.upload_start(400_000, 150_000).reply(), 503)
        self.upload_start(400_000, 150_000, IPv4Address("TCP", "198.51.100.3", 40000))
        self.assertEqual(self.https.spooled_by, {"192.0.2.7": 200_000, "198.51.100.3": 150_000})

    def test_spool_share_per_ipv6_network(self) -> None:
        """An IPv6 client's share is its /64's, as everywhere else it is counted: another address of it gets none."""
        self.patch(web, "SPOOL_SHARE", 300_000)
        self.upload_start(400_000, 200_000, IPv6Address("TCP", "2001:db8:1:2::7", 40000))
        refused = self.upload_start(400_000, 150_000, IPv6Address("TCP", "2001:db8:1:2:ffff::8", 40001))
        self.assert_own_page(refused.reply(), 503)
        self.upload_start(400_000, 150_000, IPv6Address("TCP", "2001:db8:1:3::7", 40002))
        self.assertEqual(self.https.spooled_by, {"2001:db8:1:2::/64": 200_000, "2001:db8:1:3::/64": 150_000})

    def test_spool_given_back_once_sent(self) -> None:
        """A body passed on whole is given back as soon as the webmail has read it all."""
        self.upload_start(250_000, 250_000)
        (sent,) = self.agent.sent
        assert sent.body is not None
        received = StringTransport()
        sent.body.startProducing(received)
        self.assertEqual(self.https.spooled, 250_000)
        while self.clock.getDelayedCalls() and len(received.value()) < 250_000:
            self.clock.advance(0)
        self.clock.advance(0)
        self.assertEqual(received.value(), b"u" * 250_000)
        self.assertEqual(self.https.spooled, 0)
        self.answer(sent, 204, {})

    def test_spool_given_back_on_timeout(self) -> None:
        """A request cut off by its deadline gives its body back at once, before its connection ends."""
        connection = self.upload_start(400_000, 100_000)
        for _ in range(2):  # a byte every 30 s: never idle long enough for twisted.web's own timeout
            self.clock.advance(30)
            connection.channel.dataReceived(b"u")
        self.assertEqual(self.https.spooled, 100_002)
        self.clock.advance(10)  # past 60 s plus 1 s per 16 KiB received
        self.assert_own_page(connection.reply(), 408)
        self.assertFalse(connection.transport.disconnected)  # closing, not yet closed
        self.assertEqual(self.https.spooled, 0)


class MalformedRequestTests(SiteTestCase):
    """Requests the webmail might read otherwise than the gateway get a 400 before their body, on both sites."""

    def assert_refused(self, request: bytes, site: Site | None = None, code: int = 400) -> None:
        connection = self.connect(site or self.https)
        connection.channel.dataReceived(request)
        reply = connection.reply()
        self.assert_own_page(reply, code)
        self.assertEqual(reply.header("connection"), b"close")
        self.assertTrue(connection.transport.disconnecting)
        connection.channel.dataReceived(b"GET / HTTP/1.1\r\nHost: mail.example.org\r\n\r\n")
        self.assertEqual(connection.transport.value().count(b"HTTP/1.1 "), 1)  # nothing more is read
        self.assertEqual(self.agent.sent, [])

    def test_dot_segments(self) -> None:
        """
        A path with a "." or ".." segment, raw or percent-encoded, is a 400 on both sites (browsers
        never send one); dots inside a segment, or in the query, are served.
        """
        for site in (self.https, self.http):
            for target in (b"/../../etc/passwd", b"/roundcube/..", b"/a/./b", b"/%2e%2E/x", b"/a/.%2e/b",
                           b"/%2e", b"http://mail.example.org/a/../b", b"/..#", b"/a/..#x", b"/a/..%2f..%2fetc",
                           b"/a/..%00/b", b"/a/..;/b", b"/a/.;x", b"/a\\..\\b", b"/a/%5c..%5cb", b"/a%00"):
                self.assert_refused(b"GET %s HTTP/1.1\r\nHost: mail.example.org\r\n\r\n" % target, site)
        connection = self.connect(self.https)
        connection.send(b"GET", b"/roundcube/...x/.well/a..b/%252e%252e/;x/?x=/../y")
        self.assertEqual([sent.uri for sent in self.agent.sent],
                         [b"http://127.0.0.1:8080/roundcube/...x/.well/a..b/%252e%252e/;x/?x=/../y"])

    def test_refusals_logged(self) -> None:
        """Every refusal is logged with its code, why in a word, and the client's address."""
        self.patch(web, "PROXIED_BODY_LIMIT", 100)
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        for target, headers, body in (
                (b"/roundcube/", {b"Host": b"a b"}, b""),
                (b"/a/../b", {}, b""),
                (b"/roundcube/", {b"Broken header line": b""}, b""),
                (b"/roundcube/", {b"X-%d" % n: b"x" * 6000 for n in range(3)}, b""),
                (b"/roundcube/", {b"X-%d" % n: b"x" for n in range(501)}, b""),
                (b"/roundcube/", {b"Cookie": b"x" * 17_000}, b""),
                (b"/" + b"x" * 17_000, {}, b""),
                (b"/upload", {}, b"x" * 101)):
            self.connect(self.https).send(b"POST", target, headers, body)
        self.assertEqual([(e["code"], e["reason"], e["peer"]) for e in events
                          if e["log_format"].startswith("web_request_refused ")],
                         [(400, "malformed", "192.0.2.7"), (400, "dot_segment", "192.0.2.7"),
                          (400, "unparsable", "192.0.2.7"), (431, "headers_too_large", "192.0.2.7"),
                          (431, "headers_too_large", "192.0.2.7"), (431, "headers_too_large", "192.0.2.7"),
                          (414, "target_too_long", "192.0.2.7"), (413, "body_too_large", "192.0.2.7")])

    def test_no_host(self) -> None:
        """An HTTP/1.1 request without Host is a 400, to a proxied path, a document, or on plain HTTP."""
        for site, path in ((self.https, b"/roundcube/"), (self.https, TB_PATH), (self.http, b"/")):
            self.assert_refused(b"GET %s HTTP/1.1\r\nUser-Agent: x\r\n\r\n" % path, site)

    def test_no_host_http10(self) -> None:
        """An HTTP/1.0 request may leave Host out; the webmail gets the public host."""
        connection = self.connect(self.https)
        connection.channel.dataReceived(b"GET /roundcube/ HTTP/1.0\r\n\r\n")
        (sent,) = self.agent.sent
        self.assertEqual(sent.header("host"), [b"mail.example.org"])
        sent.answer.errback(ConnectionRefusedError("127.0.0.1:8080"))
        self.assertEqual(connection.reply().code, 502)

    def test_chunked_http10(self) -> None:
        """HTTP/1.0 knows no transfer coding: one makes the framing faulty (RFC 9112 6.1), a 400."""
        self.assert_refused(b"POST /upload HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"5\r\nhello\r\n0\r\n\r\n")

    def test_several_hosts(self) -> None:
        """Two Host headers are a 400, even when they agree."""
        for second in (b"evil.example", b"mail.example.org"):
            self.assert_refused(b"GET /roundcube/ HTTP/1.1\r\nHost: mail.example.org\r\nHost: %s\r\n\r\n" % second)

    def test_host_syntax(self) -> None:
        """A Host that is not host[:port] is a 400; names, IPv4 addresses and IPv6 literals, with or without a port, are served."""
        for host in (b"", b"evil.example/path", b"evil.example?x", b"user@evil.example", b"a b", b"a,b", b"a;b",
                     b"exa%2emple.org", b"mail.example.org:", b"mail.example.org:x", b"mail.example.org:99999",
                     b"[::1", b"[2001:db8::zz]", b"[1:2:3]", b"[192.0.2.1]", b"[fe80::1%25eth0]", b"[v1.x]", b"::1", b"\xc3\xa9.example"):
            self.assert_refused(b"GET /roundcube/ HTTP/1.1\r\nHost: %s\r\n\r\n" % host)
        for host in (b"mail.example.org", b"MAIL.Example.Org:443", b"xn--bcher-kva.example.", b"192.0.2.1",
                     b"192.0.2.1:8443", b"[2001:db8::1]", b"[2001:db8::1]:443", b"[::ffff:192.0.2.1]"):
            self.assertEqual(self.get(TB_PATH, headers={b"Host": host}).code, 200, host)

    def test_control_characters(self) -> None:
        """A header value with a control character (but HTAB) is a 400 and never reaches the webmail."""
        for value in (b"a\x01b", b"a\x08b", b"a\x0bb", b"a\x0cb", b"a\x1bb", b"a\x1fb", b"a\x7fb"):
            self.assert_refused(b"GET /roundcube/ HTTP/1.1\r\nHost: mail.example.org\r\nX-A: %s\r\n\r\n" % value)
        self.assert_refused(b"GET / HTTP/1.1\r\nHost: mail.example.org\r\nUser-Agent: \x7f\r\n\r\n", self.http)
        connection = self.connect(self.https)
        connection.send(b"GET", b"/roundcube/", {b"X-A": b"a\tb"})
        (sent,) = self.agent.sent
        self.assertEqual(sent.header("x-a"), [b"a\tb"])
        sent.answer.errback(ConnectionRefusedError("127.0.0.1:8080"))

    def test_over_long_lines(self) -> None:
        """
        A request line over twisted.web's 16 KiB, ended or not, is a 414 on both sites, a header
        line a 431 (a cookie, most often).
        """
        long = b"a" * 17000
        for site in (self.https, self.http):
            for request, code in ((b"GET /%s HTTP/1.1\r\n" % long, 414), (long, 414),
                                  (b"GET / HTTP/1.1\r\nHost: mail.example.org\r\nCookie: %s" % long, 431),
                                  # under 16 KiB each, over it together: the longer names the fault
                                  (b"GET /%s HTTP/1.1\r\nHost: mail.example.org\r\nCookie: %s\r\n\r\n"
                                   % (b"a" * 16000, b"c" * 1000), 414),
                                  (b"GET /%s HTTP/1.1\r\nHost: mail.example.org\r\nCookie: %s\r\n\r\n"
                                   % (b"a" * 1000, b"c" * 16000), 431)):
                self.assert_refused(request, site, code)

    def test_refused_before_body(self) -> None:
        """A malformed request is answered before its body arrives, which is then never read or kept."""
        connection = self.connect(self.https)
        connection.channel.dataReceived(b"POST /upload HTTP/1.1\r\nContent-Length: 1000000\r\nExpect: 100-continue\r\n\r\n")
        self.assert_own_page(connection.reply(), 400)
        self.assertNotIn(b"100 Continue", connection.transport.value())
        connection.channel.dataReceived(b"u" * 1_000_000)
        self.assertEqual(self.https.spooled, 0)
        self.assertEqual(self.agent.sent, [])


class RequestDeadlineTests(SiteTestCase):
    """A request must arrive whole in a bounded time, however its bytes trickle in."""

    def trickle(self, connection: Connection, data: bytes, every: float, limit: float) -> float:
        """Send C{data} every C{every} seconds until the connection closes or C{limit} seconds pass; the time taken."""
        start = self.clock.seconds()
        while not connection.transport.disconnecting and self.clock.seconds() - start < limit:
            self.clock.advance(every)
            if not connection.transport.disconnecting:
                connection.channel.dataReceived(data)
        return self.clock.seconds() - start

    def test_trickled_headers(self) -> None:
        """Headers sent a byte every 30 s (never idle 60 s) are cut off a minute after the first byte, with a 408."""
        for site in (self.https, self.http):
            connection = self.connect(site)
            connection.channel.dataReceived(b"GET /x HTTP/1.1\r\nX: ")
            self.assertLessEqual(self.trickle(connection, b"a", 30, 3600), 60)
            self.assertTrue(connection.transport.disconnecting)
            self.assertEqual(connection.reply().code, 408)
            self.assertEqual(connection.reply().header("connection"), b"close")
            connection.close()

    def test_silent_request_logged_once(self) -> None:
        """
        A request that stops arriving gets its 408 when its deadline and twisted.web's own idle
        timeout come due together, whichever fires first, and one line in the log: the gateway's,
        not twisted.web's too.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        for trickled in (False, True):  # twisted.web's timeout first, then the deadline first
            connection = self.connect(self.https)
            connection.channel.dataReceived(b"GET /x HTTP/1.1\r\n")
            if trickled:
                self.clock.advance(web.REQUEST_DEADLINE / 2)
                connection.channel.dataReceived(b"X: 1\r\n")  # restarts twisted.web's timeout, not the deadline
                self.clock.advance(web.REQUEST_DEADLINE / 2)
            else:
                self.clock.advance(web.REQUEST_DEADLINE)
            self.assertEqual(connection.reply().code, 408)
            self.clock.advance(web.REQUEST_TIMEOUT)
            self.assertEqual(connection.transport.value().count(b"HTTP/1.1 "), 1)
            connection.close()
        self.assertEqual([e.get("log_format") for e in events], ["web_request_timeout peer={peer}"] * 2)

    def test_trickled_body(self) -> None:
        """A body sent far below the minimum rate is cut off with a 408 soon after the first minute."""
        connection = self.connect(self.https)
        connection.send(b"POST", b"/upload", {b"Content-Length": b"1000000"})
        self.assertLessEqual(self.trickle(connection, b"u" * 1024, 30, 3600), 90)
        self.assertEqual(connection.reply().code, 408)
        self.assertEqual(self.agent.sent, [])

    def test_steady_upload_not_cut(self) -> None:
        """An upload at twice the minimum rate may take longer than a minute, and is forwarded."""
        size = 200 * web.UPLOAD_MIN_RATE
        connection = self.connect(self.https)
        connection.send(b"POST", b"/upload", {b"Content-Length": b"%d" % size})
        piece = b"u" * (2 * web.UPLOAD_MIN_RATE)
        for _ in range(size // len(piece)):
            self.clock.advance(1)
            connection.channel.dataReceived(piece)
        self.assertFalse(connection.transport.disconnecting)
        self.assertEqual(len(self.agent.sent), 1)
        self.agent.sent[0].answer.errback(ConnectionRefusedError("127.0.0.1:8080"))

    def test_each_request_has_its_own_deadline(self) -> None:
        """On a kept-alive connection the deadline starts again at each request's first byte."""
        connection = self.connect(self.https)
        connection.send(b"GET", TB_PATH)
        self.clock.advance(50)
        connection.channel.dataReceived(b"GET " + TB_PATH + b" HTTP/1.1\r\n")
        self.clock.advance(50)
        connection.channel.dataReceived(b"Host: mail.example.org\r\n\r\n")
        self.assertFalse(connection.transport.disconnecting)
        self.assertEqual(connection.transport.value().count(b"HTTP/1.1 200 OK"), 2)
        self.clock.advance(50)  # idle between requests: only the idle timeout applies
        self.assertFalse(connection.transport.disconnecting)


class BuildServiceTests(SynchronousTestCase):
    """The listeners of [web]."""

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="mailgateway-web-")
        self.addCleanup(shutil.rmtree, self.directory)
        issued = TestCA(f"{self.directory}/ca").issue()
        self.server_tls = ServerTLS(issued.chain_path, issued.key_path, b"http/1.1")

    def settings(self, **web: Any) -> Settings:
        data: dict[str, Any] = {
            "gateway": {"hostname": "gw.example.org", "state_dir": self.directory},
            "tls": {"self_signed": True}, "auth": {"mode": "backend"}, **LISTENERS,
            "web": {"https": ["tcp:0:interface=127.0.0.1"], "http": ["tcp:0:interface=127.0.0.1"], **web},
        }
        return parse_settings(f"{self.directory}/mailgateway.toml", data)

    def test_listener_labels(self) -> None:
        """One listener per endpoint, labelled with protocol, TLS mode and endpoint as the log lines need."""
        settings = self.settings()
        assert settings.web is not None
        service = build_web_service(settings.web, MemoryReactorClock(), self.server_tls, WebState(settings),
                                    ConnectionLimits(ConnectionRules()))
        labels = sorted(child.label for child in service if isinstance(child, Listener))
        self.assertEqual(labels, ["protocol=http tls=none endpoint=tcp:0:interface=127.0.0.1",
                                  "protocol=https tls=implicit_tls endpoint=tcp:0:interface=127.0.0.1"])

    def test_no_proxy_listener(self) -> None:
        """A haproxy: web listener, which the configuration refuses, is refused here too, with [web] named."""
        settings = self.settings()
        assert settings.web is not None
        web_settings = dataclasses.replace(settings.web, https=("haproxy:tcp:0:interface=127.0.0.1",))
        settings = dataclasses.replace(settings, web=web_settings,
                                       limits=dataclasses.replace(settings.limits, proxy_sources=(ip_network("10.0.0.0/8"),)))
        error = self.assertRaises(ConfigError, build_web_service, web_settings, MemoryReactorClock(),
                                  self.server_tls, WebState(settings), ConnectionLimits(ConnectionRules()))
        self.assertIn("[web] https", str(error))

    def test_bad_endpoint(self) -> None:
        """An endpoint description Twisted cannot use is a ConfigError naming [web]."""
        settings = self.settings(https=["tcp:notaport"])
        assert settings.web is not None
        error = self.assertRaises(ConfigError, build_web_service, settings.web, MemoryReactorClock(),
                                  self.server_tls, WebState(settings), ConnectionLimits(ConnectionRules()))
        self.assertIn("[web] https", str(error))
