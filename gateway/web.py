"""
The gateway's web side: client autoconfiguration over HTTPS, a reverse proxy to a plaintext
webmail, and a plain HTTP listener that sends browsers to HTTPS.

The HTTPS site serves the documents of L{gateway.autoconfig} at the paths mail clients ask
(Thunderbird's autoconfig, Outlook's Autodiscover, Apple's configuration profile) and passes
every other path to C{[web] upstream}. The plain HTTP site serves Thunderbird's autoconfig paths
too (Thunderbird asks over HTTP as well), with C{[web] acme_webroot} the ACME HTTP-01 challenges
certbot's C{--webroot} leaves there (so that the certificate renews while the gateway holds port
80), and answers everything else with a 301 (Outlook's Autodiscover: a 302) to
C{https://<public_host>}: the configured name, never the request's Host header, so the redirect
cannot be pointed elsewhere.

Both sites read the configuration through a L{WebState}, so a reload changes the documents,
the upstream and the headers of the next request.

Every response carries C{X-Content-Type-Options: nosniff}, and on HTTPS
C{Strict-Transport-Security} (RFC 6797 forbids sending it over plain HTTP). The gateway's own
responses also carry a C{Content-Security-Policy} that allows nothing; proxied webmail
responses do not, since it would break the webmail. Error pages are short fixed texts.

Request bodies are bounded while they arrive: L{DOCUMENT_BODY_LIMIT} on every path the gateway
answers itself, L{PROXIED_BODY_LIMIT} on proxied paths. As soon as a body is over its bound
(or declared so, by its C{Content-Length} or a chunk's size), the request is answered with a 400
(a document path) or a 413 and the connection closes; the rest of the body is not read.

A request must also arrive in bounded time, since twisted.web's idle timeout restarts at every
byte: L{REQUEST_DEADLINE} from its first byte, plus one second for every L{UPLOAD_MIN_RATE}
bytes of body. A request still incomplete then gets a 408 and the connection closes
(L{RequestDeadlineChannel}, which the metrics listener uses too). The webmail has
L{UPSTREAM_RESPONSE_TIMEOUT} to start its answer, or the client gets a 504; after that, a
proxied response that makes no progress for L{RESPONSE_PROGRESS_TIMEOUT} (the webmail sends
nothing, or the client reads nothing) is cut off: both connections close.

A request is refused with a 400 before its body is read when it is malformed in a way the
webmail might read differently from the gateway (RFC 9112 section 3.2): an HTTP/1.1 request
without a Host header, any request with several or with one that is not C{host[:port]}, a
header value with a control character, or a path with a dot segment (which a webmail serving
files might follow). TRACE and CONNECT are answered with a 405, never passed on. The webmail is
told the client's address (C{X-Forwarded-For}, C{X-Real-IP}) and the public
host (C{Host}, C{X-Forwarded-Host}) by the gateway alone: the client's own claims, and every
header whose name has an underscore (which CGI-style servers read as the dashed one), are
dropped.

The access log (twisted.web's combined format, in the gateway's log) leaves out the values of
the parameters in a request's query and path and in its Referer's, and any user name and
password before a host: an autoconfig query names the user's address, and a webmail's may carry
a token, a session id or, from a careless form, a password.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tempfile
from io import BytesIO
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IOpenSSLServerConnectionCreator, IProtocolFactory, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Cooperator
from twisted.logger import Logger, LogLevel
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http import (
    NO_BODY_CODES,
    RESPONSES,
    HTTPChannel,
    PotentialDataLoss,
    _ChunkedTransferDecoder,
    combinedLogFormatter,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from gateway.addresses import address_host, client_key, plain_address
from gateway.autoconfig import (
    AUTODISCOVER_MAX_BODY,
    MOBILECONFIG_CONTENT_TYPE,
    AutodiscoverError,
    autodiscover_response,
    mobileconfig,
    parse_autodiscover_request,
    plausible_email,
    thunderbird_config,
)
from gateway.config import Settings, WebSettings
from gateway.connection_limits import ConnectionLimits
from gateway.listener import AdmittingFactory, listener
from gateway.relay import GracePeriod, close_with_grace
from gateway.tls import tls_ended, tls_layer

__all__ = [
    "DOCUMENT_BODY_LIMIT",
    "PROXIED_BODY_LIMIT",
    "REQUEST_DEADLINE",
    "REQUEST_TIMEOUT",
    "RESPONSE_PROGRESS_TIMEOUT",
    "RequestDeadlineChannel",
    "SPOOL_LIMIT",
    "SPOOL_SHARE",
    "UPLOAD_MIN_RATE",
    "UPSTREAM_CONNECT_TIMEOUT",
    "UPSTREAM_RESPONSE_TIMEOUT",
    "WebState",
    "build_web_service",
    "http_site",
    "https_site",
]

log = Logger()

DOCUMENT_BODY_LIMIT = AUTODISCOVER_MAX_BODY
"""Largest request body, in bytes, on the paths the gateway answers itself (64 KiB)."""

PROXIED_BODY_LIMIT = 128 * 1024 * 1024
"""Largest request body, in bytes, passed to the webmail (uploads wait in a temporary file)."""

REQUEST_TIMEOUT = 60.0
"""Seconds a client may stay silent while sending a request or between requests (twisted.web's own)."""

REQUEST_DEADLINE = 60.0
"""Seconds from a request's first byte to its last, before any allowance for its body (nginx's
client_header_timeout). Counted per request, not per connection, so a kept-alive connection is
not cut in the middle of its tenth request."""

UPLOAD_MIN_RATE = 16 * 1024
"""Bytes of body per second a client must send on average past L{REQUEST_DEADLINE}: each such
amount received adds a second. 128 kbit/s lets a slow mobile link upload an attachment, but a
client trickling bytes to hold a connection slot has to spend that bandwidth per slot."""

SPOOL_LIMIT = 1024 * 1024 * 1024
"""Bytes of proxied request bodies kept at once, over every client together: they wait in
temporary files, which are memory where /tmp is a tmpfs (Debian's default since 13). A body that
would pass it, or its client's L{SPOOL_SHARE}, gets a 503 at once."""

SPOOL_SHARE = SPOOL_LIMIT // 4
"""Bytes of the spool one client may hold (two uploads of the largest size): a single client
trickling its uploads cannot keep everyone else's out. An IPv6 client is its network of
C{[auth] ipv6_prefix} bits, as everywhere else it is counted."""

UPSTREAM_CONNECT_TIMEOUT = 10.0
"""Seconds allowed to connect to the webmail before the client gets a 502."""

UPSTREAM_RESPONSE_TIMEOUT = 60.0
"""Seconds from passing a request on (connecting and sending its body included: the webmail is
near) to the webmail's response headers, before the client gets a 504 (nginx's proxy_read_timeout)."""

RESPONSE_PROGRESS_TIMEOUT = 60.0
"""Seconds a proxied response may go without progress once its headers are out: neither a byte
from the webmail nor the client's connection taking what waits for it (nginx's proxy_read_timeout
and send_timeout in one). Then the webmail connection is closed and the client's aborted, since a
stalled webmail or a client that stops reading would otherwise hold both, and a connection slot,
for ever (twisted.web turns its idle timeout off while a request is answered)."""

CONTENT_SECURITY_POLICY = b"default-src 'none'; frame-ancestors 'none'"
"""The policy of the gateway's own responses: they need no script, style, image or frame."""

_THUNDERBIRD_PATHS = frozenset({b"/.well-known/autoconfig/mail/config-v1.1.xml", b"/mail/config-v1.1.xml"})
_AUTODISCOVER_PATH = b"/autodiscover/autodiscover.xml"  # compared in lower case: Outlook's case varies
_MOBILECONFIG_PATH = b"/apple/mail.mobileconfig"
_ACME_PATH = b"/.well-known/acme-challenge/"
_ACME_TOKEN = re.compile(rb"[A-Za-z0-9_-]{1,255}")  # RFC 8555 8.3: base64url, so never a path of its own
_ACME_RESPONSE_LIMIT = 4096  # a key authorization is under 200 bytes

# Bodies up to this size stay in memory; larger proxied uploads go to a temporary file.
_IN_MEMORY_BODY = DOCUMENT_BODY_LIMIT

# RFC 9110 section 7.6.1, plus the pre-standard Proxy-Connection some clients still send.
_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
    b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
# The gateway is the edge: whatever a client claims about forwarding, its address or the URL it
# asked for is dropped (every X-Forwarded-* too), and the gateway's own X-Forwarded-*, X-Real-IP
# and Host replace it. Content-Length comes from the body producer, and Expect was answered by
# twisted.web before the body arrived.
_CLIENT_ONLY_HEADERS = frozenset({
    b"content-length", b"expect", b"forwarded", b"x-real-ip", b"x-client-ip", b"true-client-ip", b"client-ip",
    b"x-cluster-client-ip", b"x-original-url", b"x-rewrite-url", b"x-original-host", b"x-host",
})
_CLIENT_ONLY_PREFIX = b"x-forwarded-"
# The gateway's values of these replace the webmail's.
_GATEWAY_RESPONSE_HEADERS = frozenset({b"strict-transport-security", b"x-content-type-options"})

# RFC 9112 section 3.2's host[:port]: a reg-name of the characters host names use (RFC 3986 also
# allows sub-delims and percent-encoding, which no DNS name has), an IPv4 address (a reg-name to
# this pattern), or an IPv6 literal (checked by ipaddress); a port of up to five digits.
_HOST = re.compile(rb"(?:[A-Za-z0-9._~-]+|\[([0-9A-Fa-f:.]+)\])(?::([0-9]{1,5}))?")
# RFC 9110 section 5.5: control characters in a field value; HTAB is whitespace.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# What separates a path's segments for some server behind the gateway: a slash, or a backslash on Windows.
_SEGMENT_SEPARATOR = re.compile(rb"[/\\]")
# RFC 3986 section 3.1's scheme, and the "//" before an authority.
_SCHEME = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://")
# A Refresh header's URL (HTML's "delay; url=URL", where "url=" and the ";" may be left out and
# the URL quoted): group 1.
_REFRESH_URL = re.compile(rb"\s*[0-9.]+(?:\s*[;,]\s*|\s+)(?:url\s*=\s*)?['\"]?([^'\"\s]+)", re.IGNORECASE)
# An absolute-form request target's scheme and authority (RFC 9112 section 3.2.2).
_HTTP_ORIGIN = re.compile(rb"https?://[^/?#]*", re.IGNORECASE)
# Never passed on: TRACE would echo the request, cookies included, and CONNECT asks for a tunnel.
_REFUSED_METHODS = frozenset({b"TRACE", b"CONNECT"})

# Standard reason phrases, with the one twisted.web lacks (RFC 6585).
_REASON_PHRASES = {**RESPONSES, 431: b"Request Header Fields Too Large"}

# What every fixed page carries besides the security headers (L{_page}, L{_WebChannel.refusal}).
_PAGE_HEADERS = ((b"Content-Type", b"text/plain; charset=utf-8"), (b"Cache-Control", b"no-store"))

_PAGES = {
    400: b"Bad request.\n",
    404: b"Not found.\n",
    405: b"Method not allowed.\n",
    408: b"Request timeout.\n",
    413: b"Request body too large.\n",
    414: b"Address too long.\n",
    # Most often the cookies: a browser sends every one the site's names have set.
    431: b"Request headers too large. Deleting this site's cookies may help.\n",
    502: b"The webmail is not available at the moment. Please try again later.\n",
    503: b"The server is busy. Please try again later.\n",
    504: b"The webmail did not answer in time. Please try again later.\n",
}


class WebState:
    """
    What the web sites serve: the configuration in force, replaced on reload.

    The listeners themselves (C{[web] https} and C{http}) change only with a restart; everything
    else (the documents, the public host, the upstream, the HSTS max-age) applies from the next
    request on.

    :ivar settings: the configuration in force; its C{web} is never None.
    """

    def __init__(self, settings: Settings) -> None:
        """
        :param settings: a configuration with a C{[web]} section.
        :raises ValueError: if it has none.
        """
        self.settings = self._checked(settings)

    @property
    def web(self) -> WebSettings:
        """The C{[web]} section in force."""
        assert self.settings.web is not None
        return self.settings.web

    def update(self, settings: Settings) -> None:
        """
        Serve from a new configuration from the next request on.

        :param settings: the reloaded configuration.
        :raises ValueError: if it has no C{[web]} section (removing the listeners takes a
            restart); nothing changes then.
        """
        self.settings = self._checked(settings)

    @staticmethod
    def _checked(settings: Settings) -> Settings:
        if settings.web is None:
            raise ValueError(f"{settings.path}: [web] is missing; the web listeners need it until a restart")
        return settings


def _route(path: bytes, https: bool) -> str | None:
    """
    Name the document a path asks for, or None for a path the gateway does not answer itself.

    :param path: the request path, without the query.
    :param https: whether the request came over HTTPS (only Thunderbird's paths exist on HTTP).
    """
    if path in _THUNDERBIRD_PATHS:
        return "thunderbird"
    if not https:
        return "acme" if path.startswith(_ACME_PATH) else None
    if path.lower() == _AUTODISCOVER_PATH:
        return "autodiscover"
    if path == _MOBILECONFIG_PATH:
        return "mobileconfig"
    return None


class _WebRequest(Request):
    """
    A request whose body is bounded as it arrives, and whose every response carries the
    security headers.

    :ivar target: the request target from the request line, as the client sent it (an absolute
        form too, which the access log shows), set by L{_WebChannel} before the headers are read.
    :ivar body_too_large: the body was over its limit: the request has been answered and the
        connection is closing.
    """

    channel: _WebChannel  # twisted.web's attributes, of the classes this module gives them
    content: BytesIO | _Spool  # type: ignore[assignment]  # twisted.web says None: set by gotLength
    target = b""
    body_too_large = False
    _body_limit = DOCUMENT_BODY_LIMIT
    _body_received = 0

    def gotLength(self, length: int | None) -> None:
        """Choose the body's limit from the path, and where the body is kept (twisted.web hook)."""
        site: _WebSite = self.channel.site
        self._body_limit = site.body_limit(self.target_path())
        self.body_too_large = length is not None and length > self._body_limit
        in_memory = self._body_limit <= _IN_MEMORY_BODY or (length is not None and length <= _IN_MEMORY_BODY)
        if self.body_too_large or in_memory:
            self.content = BytesIO()
        else:  # an IPv6 client's share is its network's, as everywhere else it is counted
            self.content = _Spool(site, client_key(_peer(self), site.state.settings.auth.ipv6_prefix))
        if self.body_too_large:
            # twisted.web sends 100 Continue after this hook: it must not invite a refused body.
            self.requestHeaders.removeHeader(b"expect")
            self._refuse_body()

    def target_path(self) -> bytes:
        """The path of the target, before twisted.web has parsed the request (for the body's limit)."""
        return _origin_form(self.target).split(b"?", 1)[0]

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """Take the target in origin form, then go on as twisted.web does (twisted.web hook)."""
        super().requestReceived(command, _origin_form(path), version)

    def __repr__(self) -> str:
        # twisted.web names a request in a few of its log lines: as the access log shows it there too.
        return f"<{type(self).__name__} at 0x{id(self):x} method={self.method!r} uri={_loggable_target(self.uri)!r}>"

    def chunk_announced(self, remaining: int) -> None:
        """Refuse the request at once if the chunk arriving, C{remaining} bytes still to come, would pass the limit."""
        if not self.body_too_large and self._body_received + remaining > self._body_limit:
            self.body_too_large = True
            self._refuse_body()

    def handleContentChunk(self, data: bytes) -> None:
        """Keep a piece of the body, or refuse the request once the body is over its limit (twisted.web hook)."""
        if self.body_too_large:
            return
        self._body_received += len(data)
        if self._body_received > self._body_limit:
            self.body_too_large = True
            self._refuse_body()
            return
        if isinstance(self.content, _Spool) and not self.content.take(len(data)):
            self.body_too_large = True
            self._refuse_body(spool_full=True)
            return
        self.content.write(data)

    def _refuse_body(self, spool_full: bool = False) -> None:
        # At once: waiting for the end of a body over the limit would let an endless one hold the connection.
        channel: _WebChannel = self.channel
        if spool_full:
            channel.refuse(503, "spool_full")
        else:
            code = 400 if _route(self.target_path(), channel.site.https) is not None else 413
            channel.refuse(code, "body_too_large")

    def process(self) -> None:
        """Set the security headers, then let twisted.web find and render the resource."""
        site: _WebSite = self.channel.site
        for name, value in site.security_headers():
            self.responseHeaders.setRawHeaders(name, [value])
        super().process()


class _Spool:
    """
    A proxied request's body in a temporary file, counted against its site's L{SPOOL_LIMIT} and
    its client's L{SPOOL_SHARE} until the file is closed: by the upload to the webmail once sent
    or stopped, by twisted.web when the request is done or its connection lost, or when the
    request is refused.
    """

    _held = 0
    _file: Any = None

    def __init__(self, site: _WebSite, client: str) -> None:
        self._site = site
        self._client = client
        self._file = tempfile.TemporaryFile()

    def take(self, size: int) -> bool:
        """Count C{size} more bytes against the spool, unless that would pass its limit or the client's share."""
        site, client = self._site, self._client
        if site.spooled + size > SPOOL_LIMIT or site.spooled_by.get(client, 0) + size > SPOOL_SHARE:
            return False
        site.spooled_by[client] = site.spooled_by.get(client, 0) + size
        self._held += size
        return True

    def close(self) -> None:
        """Close the file and give its bytes back to the spool (once, however often called)."""
        if self._held:
            spooled_by, client = self._site.spooled_by, self._client
            spooled_by[client] -= self._held
            if not spooled_by[client]:
                del spooled_by[client]
            self._held = 0
        if self._file is not None:
            self._file.close()

    __del__ = close  # a last resort: every way a request ends closes it

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)  # write, read, seek, tell: the file's own


class RequestDeadlineChannel(HTTPChannel):
    """
    An HTTP/1.1 connection that gives each request a deadline to arrive, and that can refuse a
    request before it has arrived.

    twisted.web's idle timeout restarts at every byte, so a client trickling a request would hold
    its connection for ever: here a request has L{REQUEST_DEADLINE} from its first byte, plus a
    second for every L{UPLOAD_MIN_RATE} bytes of body, and then gets a 408. Both the web sites
    and the metrics listener use it. A subclass says what a refusal carries (L{refusal}) and logs
    refusals (L{request_refused}), a missed deadline among them. No response names the server software.
    """

    site: Site  # set by twisted.web's factory
    _deadline: IDelayedCall | None = None
    _closing: GracePeriod | None = None
    _request_started = 0.0  # when the first byte of the request being received came
    _body_bytes = 0
    _refused = False

    def dataReceived(self, data: bytes) -> None:
        """Start a request's deadline at its first byte, then parse as twisted.web does."""
        if self._refused:
            return  # the answer is out: nothing more is read, and the idle timeout is not restarted
        if self._deadline is None and not self._handlingRequest:
            self._body_bytes = 0
            self._request_started = self.site.reactor.seconds()
            self._deadline = self.callLater(REQUEST_DEADLINE, self._deadline_reached)
        super().dataReceived(data)

    def _respondToBadRequestAndDisconnect(self) -> None:
        """
        Refuse a request twisted.web cannot take (headers over its size or count limits, a line
        without a colon, a framing it rejects, a broken chunk) as the gateway refuses one: a 400
        with the refusal's headers and body (twisted.web's hook, whose own answer is a bare status
        line: no length, no security headers, no page).
        """
        if self._receivedHeaderSize > self.totalHeadersSize and len(getattr(self, "_path", b"")) > self.totalHeadersSize // 2:
            self.refuse(414, "target_too_long")  # the request line counts too: mostly the address
        elif self._receivedHeaderSize > self.totalHeadersSize or self._receivedHeaderCount > self.maxHeaders:
            self.refuse(431, "headers_too_large")  # RFC 6585 5
        else:
            self.refuse(400, "unparsable")

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Headers) -> None:
        """
        Write a response's headers without a Server header: none for scanners, whether twisted.web
        set it (on every response, even those it answers itself, as OPTIONS *) or the webmail did.
        """
        headers.removeHeader(b"server")
        super().writeHeaders(version, code, reason, headers)

    def rawDataReceived(self, data: bytes) -> None:
        """Count the bytes of a request body (not those of a pipelined request waiting in line)."""
        if not self._handlingRequest:
            self._body_bytes += len(data)
        super().rawDataReceived(data)

    def lineLengthExceeded(self, line: bytes) -> None:
        """
        A request line over twisted.web's bound is a 414, a header line a 431. (LineReceiver's
        default closes the transport itself, which over TLS waits for the channel to unregister as
        its producer: the client got no answer, and its connection stayed open until the deadline.)
        """
        if self._receivedHeaderSize == 0:  # nothing of this request read yet: its request line
            self.refuse(414, "target_too_long")
        else:
            self.refuse(431, "headers_too_large")

    def allContentReceived(self) -> None:
        """The request has arrived in time: process it, unless it was refused meanwhile (twisted.web hook)."""
        self._cancel_deadline()
        if not self._refused:
            super().allContentReceived()

    def _deadline_reached(self) -> None:
        # One timer, moved on only when it fires: no rescheduling at every piece of the body.
        end = self._request_started + REQUEST_DEADLINE + self._body_bytes / UPLOAD_MIN_RATE
        remaining = end - self.site.reactor.seconds()
        if remaining > 0:
            self._deadline = self.callLater(remaining, self._deadline_reached)
            return
        self._deadline = None
        self.refuse(408, "deadline")

    def timeoutConnection(self) -> None:
        """
        twisted.web's idle timeout (twisted.web hook): a request still arriving is answered by its
        deadline, which falls due at the same time when the request stopped at once; an idle
        connection between requests is closed as twisted.web closes it.
        """
        if self._deadline is not None:
            self.refuse(408, "deadline")  # which cancels the deadline
            return
        super().timeoutConnection()

    def _cancel_deadline(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None:
            deadline.cancel()

    def request_refused(self, code: int, reason: str) -> None:
        """Log a refusal about to be written (a hook: nothing by default); C{reason} C{deadline} is a 408."""

    def refusal(self, code: int) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """
        What a refusal with C{code} carries besides C{Content-Length} and C{Connection: close}
        (a hook: no other header and no body by default).

        :returns: the headers and the body.
        """
        return [], b""

    def refuse(self, code: int, reason: str) -> None:
        """
        Answer the request still arriving and close the connection; the rest of the request is
        neither read nor processed.

        :param code: the status code.
        :param reason: why, in a word, for the log (L{request_refused}).
        """
        if self._refused:
            return
        self._refused = True
        self.setTimeout(None)  # twisted.web's idle timeout: it would time the connection out a second time
        self.request_refused(code, reason)
        self._cancel_deadline()
        if self.requests:  # the request still arriving: what its body holds, maybe in a file, is of no use now
            content = getattr(self.requests[-1], "content", None)
            if content is not None:
                content.close()
        fields, body = self.refusal(code)
        headers = Headers()
        for name, value in [*fields, (b"Content-Length", b"%d" % len(body)), (b"Connection", b"close")]:
            headers.addRawHeader(name, value)
        self.writeHeaders(b"HTTP/1.1", b"%d" % code, _REASON_PHRASES[code], headers)
        self.transport.write(body)  # type: ignore[union-attr]
        # A client that does not read this is aborted after the grace period (loseConnection).
        self.loseConnection()

    def loseConnection(self) -> None:
        """
        Close as twisted.web does, and abort once the client has gone the grace period without
        taking enough of what it was sent (L{gateway.relay.close_with_grace}): twisted.web keeps no timer on
        a connection it closes (C{Connection: close}, HTTP/1.0, a refusal), so a client that
        stops reading the end of a response, or never ends TLS, would hold it, and a connection
        slot, for ever.
        """
        self._networkProducer.unregisterProducer()
        if self._closing is None:
            self._closing = close_with_grace(self.transport, self.site.reactor)  # type: ignore[arg-type]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        closing, self._closing = self._closing, None
        if closing is not None:
            closing.cancel()
        super().connectionLost(reason)


class _WebChannel(RequestDeadlineChannel):
    """
    A connection of the web sites: it tells each request its target before the request's
    headers, refuses a malformed request before its body, answers refusals with the fixed pages,
    and lets a client go once it has ended TLS.
    """

    site: _WebSite

    def request_refused(self, code: int, reason: str) -> None:
        peer = address_host(self.getPeer())
        if reason == "deadline":
            log.info("web_request_timeout peer={peer}", peer=peer)
        else:  # the client sees only the status: the log says why (a user's cookies over 16 KiB, say)
            log.info("web_request_refused code={code} reason={reason} peer={peer}", code=code, reason=reason, peer=peer)

    def refusal(self, code: int) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """The fixed page of C{code}, with the security headers."""
        site: _WebSite = self.site
        return [*site.security_headers(), *_PAGE_HEADERS], _PAGES[code]

    def allHeadersReceived(self) -> None:
        """
        Refuse a malformed request, or one whose path has a dot segment, with a 400 before its
        body, or go on as twisted.web does (twisted.web hook).
        """
        request = self.requests[-1]
        if not _well_formed(request.requestHeaders, self._version):
            self.refuse(400, "malformed")
            return
        if _climbs(request.target_path()):
            self.refuse(400, "dot_segment")
            return
        super().allHeadersReceived()

    def rawDataReceived(self, data: bytes) -> None:
        """Parse a piece of body as twisted.web does, then hold the size of a chunk begun against the body's limit."""
        super().rawDataReceived(data)
        # twisted.web reads a chunk's size and then waits for the chunk, however large it is said to be.
        decoder = self._transferDecoder
        if isinstance(decoder, _ChunkedTransferDecoder) and decoder.state == "BODY" and self.requests:
            self.requests[-1].chunk_announced(decoder.length)

    def lineReceived(self, line: bytes) -> None:
        """Parse a line as twisted.web does, and hand a request line's target to its new request."""
        before = len(self.requests)
        super().lineReceived(line)
        if len(self.requests) > before:
            parts = line.split(b" ")
            if len(parts) == 3:
                self.requests[-1].target = parts[1]

    def resumeProducing(self) -> None:
        """Resume the response being written, unless the client has ended TLS meanwhile."""
        if tls_ended(tls_layer(self.transport)):
            # The response would be read from the webmail to its end and dropped, and the
            # connection stay open: unregistered, the channel lets it close, and the request
            # learns that its client is gone.
            self.transport.unregisterProducer()  # type: ignore[union-attr]
            return
        super().resumeProducing()


def _origin_form(target: bytes) -> bytes:
    """
    An absolute-form request target (C{http://host/path?query}) in origin form (C{/path?query});
    any other target as it is. A server must accept the absolute form (RFC 9112 section 3.2.2),
    and the gateway serves one site whatever the host named: only the path and query are kept.
    """
    origin = _HTTP_ORIGIN.match(target)
    if origin is None:
        return target
    rest = target[origin.end():].partition(b"#")[0]
    return rest if rest.startswith(b"/") else b"/" + rest


def _climbs(path: bytes) -> bool:
    """
    Whether a request path has a "." or ".." segment, or a NUL, once percent-decoded: browsers
    resolve dot segments before they send a request (RFC 3986 5.2.4), so only a probe sends one,
    and a webmail that serves files might follow it. Decoded once, as a server would, and cut at a
    "#" (which the agent drops before forwarding), at either kind of slash, and at a segment's ";"
    parameters (C{/..;/}, which Java servers take as C{/../}).
    """
    decoded = unquote_to_bytes(path.partition(b"#")[0])
    return b"\0" in decoded or any(segment.partition(b";")[0] in (b".", b"..")
                                   for segment in _SEGMENT_SEPARATOR.split(decoded))


def _well_formed(headers: Headers, version: bytes) -> bool:
    """
    Whether a request's headers may be acted on: no control character but HTAB in any value;
    (RFC 9112 section 3.2) exactly one valid C{Host}, which only an HTTP/1.0 request may leave
    out; and (section 6.1) no transfer coding but C{chunked}, the one that twisted.web decodes
    (it takes C{identity}, gone since RFC 7230, as no body at all, and would read a body sent
    with it as the next request), and none at all in HTTP/1.0, whose framing it makes faulty.
    """
    if any(_CONTROL.search(value) for _, values in headers.getAllRawHeaders() for value in values):
        return False
    codings = headers.getRawHeaders(b"transfer-encoding")
    if codings is not None and ([coding.strip().lower() for coding in codings] != [b"chunked"]
                                or version == b"HTTP/1.0"):
        return False
    hosts = headers.getRawHeaders(b"host")
    if not hosts:
        return version == b"HTTP/1.0"
    return len(hosts) == 1 and _valid_host(hosts[0])


def _valid_host(value: bytes) -> bool:
    """Whether a Host header's value is C{host[:port]}: a host name, an IPv4 address or an [IPv6] literal."""
    match = _HOST.fullmatch(value)
    if match is None:
        return False
    literal, port = match.groups()
    if literal is not None:
        try:
            ipaddress.IPv6Address(literal.decode("ascii"))
        except ValueError:
            return False
    return port is None or int(port) <= 65535


class _WebSite(Site):
    """
    A twisted.web site bound to the live configuration.

    :ivar spooled_by: bytes of proxied request bodies its requests keep now (see L{_Spool}), by
        client (an IPv6 client's network, see L{SPOOL_SHARE}), for the clients that keep any.
    """

    # HTTP/1.1 only: the listeners offer no other ALPN protocol, so no HTTP/2 negotiation.
    protocol = _WebChannel  # type: ignore[assignment]
    noisy = False
    displayTracebacks = False

    def __init__(self, root: Resource, state: WebState, reactor: IReactorTime, https: bool) -> None:
        super().__init__(root, requestFactory=_WebRequest, parsePOSTFormSubmission=False,
                         timeout=REQUEST_TIMEOUT, reactor=reactor, logFormatter=_access_log_line)
        self.state = state
        self.https = https
        self.spooled_by: dict[str, int] = {}

    @property
    def spooled(self) -> int:
        """Bytes of proxied request bodies its requests keep now, over every client."""
        return sum(self.spooled_by.values())

    def body_limit(self, path: bytes) -> int:
        """The largest body accepted for a path: uploads to the webmail may be large, nothing else."""
        if self.https and _route(path, True) is None and self.state.web.upstream is not None:
            return PROXIED_BODY_LIMIT
        return DOCUMENT_BODY_LIMIT

    def security_headers(self) -> list[tuple[bytes, bytes]]:
        """The headers every response starts with (the proxy drops the CSP for the webmail's)."""
        headers = [(b"X-Content-Type-Options", b"nosniff"), (b"Content-Security-Policy", CONTENT_SECURITY_POLICY)]
        if self.https:  # max-age=0 too: browsers then forget a policy an earlier setting gave them (RFC 6797 6.1.1)
            headers.append((b"Strict-Transport-Security", b"max-age=%d" % self.state.web.hsts_max_age))
        return headers


def _access_log_line(timestamp: str, request: Request) -> str:
    """A request's line in the access log: twisted.web's combined format, with no parameter's values."""
    return combinedLogFormatter(timestamp, _AsLogged(request))


class _AsLogged:
    """A request as the access log shows it: its target and Referer as L{_loggable_target} makes them."""

    __slots__ = ("_request",)

    def __init__(self, request: Request) -> None:
        self._request = request

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)

    @property
    def uri(self) -> bytes:
        # As the client sent it: an absolute form shows what was asked of the gateway (a proxy probe).
        return _loggable_target(getattr(self._request, "target", b"") or self._request.uri)

    def getHeader(self, name: bytes) -> bytes | None:
        value = self._request.getHeader(name)
        return _loggable_target(value) if value is not None and name.lower() == b"referer" else value


def _loggable_target(target: bytes) -> bytes:
    """
    C{target} (a request target or a URL) with what may be a secret left out: the values of the
    query's parameters and of the path's (a session id: C{;jsessionid=}), and a user name and
    password before the host. C{/a;sid=1?user=x&token=y} becomes C{/a;sid=?user=&token=}, and
    C{http://alice:secret@host/} becomes C{http://-@host/}. A parameter without C{=} may be a
    value alone (C{/a?alice@example.org}): it becomes C{-}.
    """
    rest, question, query = target.partition(b"?")
    origin, path = b"", rest
    scheme = _SCHEME.match(rest)
    if scheme or rest.startswith(b"//"):
        start = scheme.end() if scheme else 2
        authority, slash, path = rest[start:].partition(b"/")
        origin = rest[:start] + _without_user(authority) + slash
    elif not rest.startswith(b"/"):
        # No path: CONNECT's host:port, or a relative Referer. A user name and password would
        # end at an "@" before the first "/".
        first, slash, after = rest.partition(b"/")
        if b"@" in first:
            origin, path = _without_user(first) + slash, after
    segments = []
    for segment in path.split(b"/"):
        name, *parameters = segment.split(b";")
        segments.append(b";".join([name, *_names(parameters)]))
    logged = origin + b"/".join(segments)
    return logged + b"?" + b"&".join(_names(query.split(b"&"))) if question else logged


def _without_user(authority: bytes) -> bytes:
    """An authority with any user name and password before its host as C{-}."""
    return b"-@" + authority.rpartition(b"@")[2] if b"@" in authority else authority


def _names(parameters: list[bytes]) -> list[bytes]:
    """Each C{name=value} as C{name=}; a part without C{=} as C{-}, an empty one as it is."""
    return [part[:part.index(b"=") + 1] if b"=" in part else part and b"-" for part in parameters]


def _page(request: Request, code: int) -> bytes:
    """Make a request's response one of the fixed plain-text pages; the body is the result."""
    request.setResponseCode(code)
    request.setHeader(b"Content-Security-Policy", CONTENT_SECURITY_POLICY)  # the proxy may have dropped it
    for name, value in _PAGE_HEADERS:
        request.setHeader(name, value)
    return _PAGES[code]


def _document(request: Request, content_type: bytes, body: bytes) -> bytes:
    """Make a request's response a generated document; the body is the result."""
    request.setHeader(b"Content-Type", content_type)
    # Documents follow the configuration, and a profile names the user: never from a cache.
    request.setHeader(b"Cache-Control", b"no-store")
    return body


def _not_allowed(request: Request, allowed: bytes) -> bytes:
    request.setHeader(b"Allow", allowed)
    return _page(request, 405)


def _query_text(request: Request, name: bytes) -> str | None:
    """
    The first value of a query parameter as text, or None if absent or not UTF-8; fields are split
    at "&" only, as clients write them. A "+" stays a "+", not a space as in a form: the
    parameters read are addresses, such as alice+tag@..., which a user types into Safari's
    address bar (which does not encode it).
    """
    for field in request.uri.partition(b"?")[2].split(b"&"):
        key, _, value = field.partition(b"=")
        if unquote_to_bytes(key) == name:
            try:
                return unquote_to_bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                return None
    return None


class _WebRoot(Resource):
    """Answers every path of one site: a document, a redirect, or the webmail through the proxy."""

    isLeaf = True

    def __init__(self, state: WebState, https: bool, proxy: _ReverseProxy | None) -> None:
        super().__init__()
        self._state = state
        self._https = https
        self._proxy = proxy

    def render(self, request: _WebRequest) -> bytes | int:
        """Answer a request; a HEAD gets the length of the body it would have had (twisted.web hook)."""
        body = self._answer(request)
        if request.method == b"HEAD" and isinstance(body, bytes):
            # Given a body, twisted.web drops it but logs a warning naming the request, every time.
            request.setHeader(b"Content-Length", b"%d" % len(body))
            return b""
        return body

    def _answer(self, request: _WebRequest) -> bytes | int:
        """Route a request by its path: a document's or page's body, or NOT_DONE_YET while proxied."""
        route = _route(request.path, self._https)
        if route == "thunderbird":
            return self._thunderbird(request)
        if route == "autodiscover":
            return self._autodiscover(request)
        if route == "mobileconfig":
            return self._mobileconfig(request)
        if route == "acme" and self._state.web.acme_webroot is not None:
            return self._acme_challenge(request, self._state.web.acme_webroot)
        if not self._https:
            return self._redirect(request)
        web = self._state.web
        if web.upstream is None or self._proxy is None:
            return _page(request, 404)
        return self._proxy.forward(request, web.upstream, web.public_host)

    def _thunderbird(self, request: Request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            return _not_allowed(request, b"GET, HEAD")
        try:
            body = thunderbird_config(self._state.settings, _query_text(request, b"emailaddress"))
        except ValueError:  # no IMAP or POP3 listener, or no submission listener, to offer
            return _page(request, 404)
        return _document(request, b"text/xml; charset=utf-8", body)

    def _acme_challenge(self, request: Request, webroot: str) -> bytes:
        """The file certbot's C{--webroot} wrote for this token, or a 404."""
        if request.method not in (b"GET", b"HEAD"):
            return _not_allowed(request, b"GET, HEAD")
        token = request.path[len(_ACME_PATH):]
        if _ACME_TOKEN.fullmatch(token) is None:
            return _page(request, 404)
        try:
            body = _small_file(os.path.join(webroot, ".well-known", "acme-challenge", token.decode("ascii")),
                               _ACME_RESPONSE_LIMIT)
        except OSError:
            return _page(request, 404)
        return _document(request, b"text/plain", body)

    def _autodiscover(self, request: _WebRequest) -> bytes:
        if request.method != b"POST":
            return _not_allowed(request, b"POST")
        try:
            email = parse_autodiscover_request(request.content.read(DOCUMENT_BODY_LIMIT + 1))
        except AutodiscoverError as e:
            log.info("autodiscover_refused peer={peer} reason={reason}", peer=_peer(request), reason=str(e))
            return _page(request, 400)
        try:
            body = autodiscover_response(self._state.settings, email)
        except ValueError:
            return _page(request, 404)
        return _document(request, b"application/xml; charset=utf-8", body)

    def _mobileconfig(self, request: Request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            return _not_allowed(request, b"GET, HEAD")
        email = plausible_email(_query_text(request, b"emailaddress"))
        if email is None:
            return _page(request, 400)
        try:
            body = mobileconfig(self._state.settings, email)
        except ValueError:  # no incoming or no submission listener to put in a profile
            return _page(request, 404)
        request.setHeader(b"Content-Disposition", b'attachment; filename="mail.mobileconfig"')
        return _document(request, MOBILECONFIG_CONTENT_TYPE.encode("ascii"), body)

    def _redirect(self, request: Request) -> bytes:
        # Only an origin-form target ("/path?query", an absolute form's made one) is kept; anything else goes to the root.
        target = request.uri if request.uri.startswith(b"/") else b"/"
        # Outlook follows only a 302 from its plain-HTTP Autodiscover probe (MS-OXDISCO 3.1.5.4).
        request.setResponseCode(302 if request.path.lower() == _AUTODISCOVER_PATH else 301)
        request.setHeader(b"Location", b"https://" + self._state.web.public_host.encode("ascii") + target)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"Moved to HTTPS.\n"


def _small_file(path: str, limit: int) -> bytes:
    """
    The contents of a regular file of at most C{limit} bytes, read at once (on the reactor's thread:
    it is that small); anything else (a link, a FIFO, which would block, a larger file) is an OSError.
    """
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode) or status.st_size > limit:
            raise OSError(f"not a regular file of at most {limit} bytes: {path}")
        return os.read(descriptor, limit)
    finally:
        os.close(descriptor)


def _peer(request: Request) -> str:
    """The client's address as the rest of the gateway spells it, or C{-} if it has none (a UNIX socket)."""
    host = getattr(request.getClientAddress(), "host", None)
    return plain_address(host) if isinstance(host, str) else "-"


def _connection_tokens(headers: Headers) -> frozenset[bytes]:
    """The header names a Connection header lists, in lower case: they are hop-by-hop too."""
    values = headers.getRawHeaders(b"connection") or []
    return frozenset(token.strip().lower() for value in values for token in value.split(b",") if token.strip())


def _upstream_request_headers(request: Request, public_host: str) -> Headers:
    """
    The headers a proxied request goes to the webmail with.

    Hop-by-hop headers (and those the client's Connection names), every forwarding header the
    client sent, and every header whose name has an underscore are dropped: a CGI, FastCGI or
    WSGI server reads C{X_Forwarded_For} as C{X-Forwarded-For} (both become
    C{HTTP_X_FORWARDED_FOR}), so it could stand in for a header the gateway sets (nginx drops
    them too). C{X-Forwarded-For} and C{X-Real-IP} are the client's address, C{X-Forwarded-Proto}
    is C{https}, and C{Host} and C{X-Forwarded-Host} are the public host: the configured name,
    as in the redirects, never the client's, so that what the webmail builds from them (links in
    a password-reset mail, say) cannot point elsewhere.

    :param request: the client's request.
    :param public_host: C{[web] public_host}.
    :returns: new headers; the request's own are unchanged.
    """
    dropped = _HOP_BY_HOP | _CLIENT_ONLY_HEADERS | _connection_tokens(request.requestHeaders)
    headers = Headers()
    for name, values in request.requestHeaders.getAllRawHeaders():
        lower = name.lower()
        if lower not in dropped and b"_" not in name and not lower.startswith(_CLIENT_ONLY_PREFIX):
            headers.setRawHeaders(name, list(values))
    peer = _peer(request)
    if peer != "-":
        headers.setRawHeaders(b"X-Forwarded-For", [peer.encode("ascii")])
        headers.setRawHeaders(b"X-Real-IP", [peer.encode("ascii")])
    headers.setRawHeaders(b"X-Forwarded-Proto", [b"https"])
    # One name, the same in both: never two different ones for the webmail to choose from.
    host = public_host.encode("ascii")
    headers.setRawHeaders(b"Host", [host])
    headers.setRawHeaders(b"X-Forwarded-Host", [host])
    return headers


def _copy_response_headers(source: Headers, target: Headers, upstream: str, public_host: str) -> None:
    """
    Copy the webmail's response headers, less hop-by-hop ones and those the gateway sets itself.

    The headers a response's C{Connection} names are hop-by-hop too (RFC 9110 7.6.1), but they
    pass: Twisted's client keeps C{Connection} to itself, out of C{source} (nginx passes them too).
    A control character in a value (NUL, ESC, DEL; Twisted's C{Headers} has made CR and LF
    spaces) becomes a space, as RFC 9110 5.5 allows: a webmail that puts an attachment's name in
    C{Content-Disposition} must not carry a terminal escape or a NUL to the browser.

    A C{Location} or C{Content-Location} (or the URL of a C{Refresh}) under the webmail's own address, or under
    C{http://public_host} (a webmail that builds links from Host without heeding
    C{X-Forwarded-Proto}), is made C{https://public_host}, as nginx's C{proxy_redirect default}
    does: the internal address is not shown, and the browser is not sent to plain HTTP. Every
    cookie is made C{Secure}: the webmail is only ever served over HTTPS, and a cookie without
    the flag would go in clear with any request the browser makes to C{http://public_host}.
    """
    dropped = _HOP_BY_HOP | _GATEWAY_RESPONSE_HEADERS
    public = b"https://" + public_host.encode("ascii")
    internal = (upstream.rstrip("/").encode("ascii"), b"http://" + public_host.encode("ascii"),
                b"http://" + public_host.encode("ascii") + b":80")
    for name, values in source.getAllRawHeaders():
        lower = name.lower()
        if lower in dropped:
            continue
        if lower in (b"location", b"content-location"):
            values = [_public_url(value, internal, public) for value in values]
        elif lower == b"refresh":
            values = [_public_refresh(value, internal, public) for value in values]
        elif lower == b"set-cookie":
            values = [_secure_cookie(value) for value in values]
        target.setRawHeaders(name, [_CONTROL.sub(b" ", value) for value in values])


def _public_url(url: bytes, internal: tuple[bytes, ...], public: bytes) -> bytes:
    """C{url} with a prefix of C{internal} (an origin, then the end or a path) made C{public}."""
    for prefix in internal:
        if url[: len(prefix)].lower() == prefix.lower() and url[len(prefix):len(prefix) + 1] in (b"", b"/", b"?", b"#"):
            return public + url[len(prefix):]
    return url


def _public_refresh(refresh: bytes, internal: tuple[bytes, ...], public: bytes) -> bytes:
    """A C{Refresh} value (C{5; url=URL}, the URL maybe quoted) with its URL made public as L{_public_url} makes it."""
    match = _REFRESH_URL.match(refresh)
    if match is None:
        return refresh
    start, end = match.span(1)
    return refresh[:start] + _public_url(refresh[start:end], internal, public) + refresh[end:]


def _secure_cookie(cookie: bytes) -> bytes:
    """A Set-Cookie value with the C{Secure} attribute, added if it lacks it."""
    attributes = (attribute.strip().lower() for attribute in cookie.split(b";")[1:])
    return cookie if b"secure" in attributes else cookie + b"; Secure"


class _ReverseProxy:
    """Passes requests to the webmail and streams the answers back, with backpressure both ways."""

    def __init__(self, agent: IAgent, cooperator: Cooperator, clock: IReactorTime) -> None:
        """
        :param agent: makes the requests to the webmail.
        :param cooperator: paces the reading of request bodies into the upstream connection.
        :param clock: times the webmail's answers.
        """
        self._agent = agent
        self._cooperator = cooperator
        self._clock = clock

    def forward(self, request: _WebRequest, upstream: str, public_host: str) -> bytes | int:
        """
        Start passing a request on; the result is for twisted.web's C{render}.

        :param upstream: C{[web] upstream}.
        :param public_host: C{[web] public_host}, the webmail's C{Host}.
        """
        if request.method in _REFUSED_METHODS:
            return _page(request, 405)  # no Allow: the webmail's methods are not known here (nginx sends none)
        if not request.uri.startswith(b"/"):
            return _page(request, 400)  # an authority form, or an absolute form but HTTP's, must not pick the upstream's target
        body: IBodyProducer | None = None
        content = request.content
        content.seek(0, os.SEEK_END)
        if content.tell() > 0:
            content.seek(0)
            body = FileBodyProducer(content, self._cooperator)
        url = upstream.rstrip("/").encode("ascii") + request.uri
        headers = _upstream_request_headers(request, public_host)
        try:
            pending = self._agent.request(request.method, url, headers, body)
        except ValueError:  # the agent refuses some bytes in a URI (0x7F and above) that twisted.web let in
            return _page(request, 400)
        request.responseHeaders.removeHeader(b"content-security-policy")
        pending.addTimeout(UPSTREAM_RESPONSE_TIMEOUT, self._clock, onTimeoutCancel=_upstream_timed_out)
        _Exchange(request, pending, upstream, public_host, self._clock)
        return NOT_DONE_YET


def _upstream_timed_out(result: object, timeout: float) -> Failure:
    """
    The webmail's answer, cancelled for being late, as a timeout: the Agent fails a cancelled
    request with errors of its own (ResponseNeverReceived, RequestGenerationFailed), which
    addTimeout would otherwise pass on as they are.
    """
    return Failure(defer.TimeoutError(f"the webmail did not answer within {timeout:g} s"))


class _Exchange:
    """
    One proxied request, from sending it on to the last byte of the answer.

    :ivar upstream: the webmail's address, for the log (and the links to make public).
    :ivar client_gone: the client disconnected, or is being cut off; nothing more is written to it.
    """

    def __init__(self, request: Request, pending: Deferred[IResponse], upstream: str, public_host: str,
                 clock: IReactorTime) -> None:
        self._request = request
        self.upstream = upstream
        self._public_host = public_host
        self._clock = clock
        self._pending: Deferred[IResponse] | None = pending
        self._relay: _ResponseRelay | None = None
        self.client_gone = False
        request.notifyFinish().addErrback(self._lost_client)
        pending.addCallbacks(self._respond, self._failed)

    def _lost_client(self, reason: Failure) -> None:
        # The client left: stop sending its request, or stop reading the answer.
        self.client_gone = True
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
        elif self._relay is not None:
            self._relay.stop()

    def _respond(self, response: IResponse) -> None:
        self._pending = None
        request = self._request
        # The standard reason phrase, not the webmail's: it means nothing to a client (RFC 9112
        # 4), and a control character or bare CR in it would reach the status line as sent.
        request.setResponseCode(response.code, _REASON_PHRASES.get(response.code))
        _copy_response_headers(response.headers, request.responseHeaders, self.upstream, self._public_host)
        # The agent keeps Content-Length to itself (but for HEAD) and gives the length instead.
        if isinstance(response.length, int) and response.code not in NO_BODY_CODES and request.method != b"HEAD":
            request.setHeader(b"Content-Length", b"%d" % response.length)
        request.defaultContentType = None  # the webmail's Content-Type, or none, never twisted.web's
        self._relay = _ResponseRelay(request, self, self._clock)
        response.deliverBody(self._relay)

    def abandon(self) -> None:
        """Cut the client off midway through the answer: its connection is aborted, unflushed."""
        self.client_gone = True
        self._request.channel.transport.abortConnection()  # type: ignore[union-attr]  # TCP's or TLS's

    def _failed(self, reason: Failure) -> None:
        self._pending = None
        if self.client_gone:
            return
        log.warn("web_upstream_unavailable upstream={upstream} reason={reason}", upstream=self.upstream,
                 reason=reason.getErrorMessage())
        body = _page(self._request, 504 if reason.check(defer.TimeoutError) else 502)
        self._request.setHeader(b"Content-Length", b"%d" % len(body))
        self._request.write(body)
        self._request.finish()


@implementer(IPushProducer)
class _ResponseRelay(Protocol):
    """
    Writes the webmail's response body to the client as it arrives.

    The relay is the producer of the client's response and passes pauses and resumes on to the
    upstream connection: a client that reads slowly pauses the reading from the webmail, so
    nothing piles up in the gateway. Between the two, it also sees the response progress: each
    piece from the webmail, and each time the client's connection has taken what waited for it
    (a resume), restart one timer of L{RESPONSE_PROGRESS_TIMEOUT}. If it fires, the webmail
    connection is closed and the client's aborted. It is cancelled when the response ends.
    """

    _timer: IDelayedCall | None = None
    _paused = False

    def __init__(self, request: Request, exchange: _Exchange, clock: IReactorTime) -> None:
        self._request = request
        self._exchange = exchange
        self._clock = clock

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(RESPONSE_PROGRESS_TIMEOUT, self._stalled)
        self._request.registerProducer(self, True)

    def dataReceived(self, data: bytes) -> None:
        self._progress()
        self._request.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timer()
        if self._exchange.client_gone:
            return
        self._request.unregisterProducer()
        if reason.check(ResponseDone, PotentialDataLoss):
            self._request.finish()
            return
        # Headers are out: closing without the end of the body is how the client learns it is cut.
        log.warn("web_upstream_response_broken upstream={upstream} reason={reason}",
                 upstream=self._exchange.upstream, reason=reason.getErrorMessage())
        self._request.loseConnection()

    def pauseProducing(self) -> None:
        """The client's connection is full: stop reading from the webmail."""
        self._paused = True
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def resumeProducing(self) -> None:
        """The client's connection has taken what waited: progress, and read from the webmail again."""
        self._paused = False
        self._progress()
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def stopProducing(self) -> None:
        """The client's connection is gone."""
        self.stop()

    def stop(self) -> None:
        """Stop reading the webmail's answer: the client is gone."""
        self._cancel_timer()
        assert self.transport is not None
        self.transport.stopProducing()  # type: ignore[attr-defined]

    def _progress(self) -> None:
        if self._timer is not None:
            self._timer.reset(RESPONSE_PROGRESS_TIMEOUT)

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _stalled(self) -> None:
        self._timer = None
        # Paused, the webmail connection cannot deliver: the client is the one not reading.
        waiting_for = "client" if self._paused else "webmail"
        log.emit(LogLevel.info if self._paused else LogLevel.warn,
                 "web_response_timeout upstream={upstream} peer={peer} waiting_for={waiting_for}",
                 upstream=self._exchange.upstream, peer=_peer(self._request), waiting_for=waiting_for)
        self._exchange.abandon()
        self.stop()


def https_site(state: WebState, reactor: IReactorTime, agent: IAgent, cooperator: Cooperator) -> Site:
    """
    The HTTPS site: the autoconfig documents, and the webmail through the reverse proxy.

    :param state: the configuration in force.
    :param reactor: for the timeouts and log timestamps.
    :param agent: makes the requests to C{[web] upstream}.
    :param cooperator: paces request bodies into the upstream connection.
    :returns: the factory to put behind TLS.
    """
    return _WebSite(_WebRoot(state, True, _ReverseProxy(agent, cooperator, reactor)), state, reactor, https=True)


def http_site(state: WebState, reactor: IReactorTime) -> Site:
    """
    The plain HTTP site: Thunderbird's autoconfig paths, and a 301 to HTTPS for every other one.

    :param state: the configuration in force.
    :param reactor: for twisted.web's timeouts and log timestamps.
    :returns: the factory to listen with.
    """
    return _WebSite(_WebRoot(state, False, None), state, reactor, https=False)


def build_web_service(web: WebSettings, reactor: Any, server_tls: IOpenSSLServerConnectionCreator, state: WebState,
                      limits: ConnectionLimits) -> MultiService:
    """
    Build the HTTPS and HTTP listeners of C{[web]}.

    :param web: the C{[web]} section whose listeners to open (C{https} behind TLS, C{http} plain).
        They take no PROXY header: the configuration refuses a C{haproxy:} one, and so does this.
    :param reactor: the running reactor (TCP, time).
    :param server_tls: the TLS of the HTTPS listeners, with ALPN C{http/1.1}.
    :param state: what the sites serve; the caller updates it on reload.
    :param limits: the gateway's connection counts, which every web connection joins while it lasts.
    :returns: a service whose children are one L{Listener} per endpoint (labelled
        C{protocol=https tls=implicit_tls endpoint=...} and C{protocol=http tls=none endpoint=...}).
    :raises ConfigError: if an endpoint description is not usable, or behind C{haproxy:}.
    """
    top = MultiService()
    # A connection to the webmail per request (Connection: close), as nginx's default: Twisted's
    # client drops what a response leaves unread, so on a reused connection a webmail's stray bytes
    # (a body after a 204 or for a HEAD, more than its Content-Length) would be read as the answer
    # to the next request on it, another user's. The webmail is near: a connection costs little.
    agent = Agent(reactor, connectTimeout=UPSTREAM_CONNECT_TIMEOUT, pool=HTTPConnectionPool(reactor, persistent=False))
    cooperator = Cooperator(scheduler=lambda step: reactor.callLater(0, step))
    secure_factory = TLSMemoryBIOFactory(server_tls, False, https_site(state, reactor, agent, cooperator))
    secure_factory.noisy = False
    listeners: tuple[tuple[str, str, tuple[str, ...], IProtocolFactory], ...] = (
        ("https", "implicit_tls", web.https, secure_factory),
        ("http", "none", web.http, http_site(state, reactor)),
    )
    for name, tls, descriptions, factory in listeners:
        admitting = AdmittingFactory(factory, limits, name)
        for description in descriptions:
            listener(reactor, description, admitting, label=f"protocol={name} tls={tls}", key=f"[web] {name}",
                     config_path=state.settings.path, proxy_sources=None).setServiceParent(top)
    return top
