"""
Client autoconfiguration documents, generated from the configured listeners.

Pure functions: settings (and, for Autodiscover, the request body) in, document bytes out; no
I/O and no Twisted. The HTTPS layer serves them; C{mailgateway dns-records} prints
L{dns_records}.

What is advertised (L{advertised}), for every document alike:

    - Only the listeners actually configured, IMAP first, then POP3, then submission (SMTP);
      within a protocol implicit TLS before STARTTLS. A STARTTLS listener is advertised as
      STARTTLS: the gateway has no plaintext port, and none is ever offered.
    - The host is C{[web] public_host} when C{[web]} is configured, else C{[gateway] hostname}.
    - The port is the one in the endpoint description for C{tcp:} and C{tcp6:} listeners
      (C{tcp:993}, C{tcp6:port=993:interface=\\:\\:}). Every other listener gets the protocol's
      standard port (IMAP 993/143, POP3 995/110, submission 465/587): behind C{haproxy:} the
      clients connect to the balancer, whose port the gateway cannot know; a C{systemd:} or
      C{unix:} listener names no port at all; and C{tcp:0} (any free port) names none usable.
    - Authentication is always a normal password, sent inside TLS.

Addresses from requests are used only when they look like a mailbox address (L{plausible_email});
anything else, including the template placeholders some clients send (C{%EMAILADDRESS%},
C{${USER}}), counts as no address. Every document is built with ElementTree or plistlib, which
escape whatever text they are given; no request text is ever formatted into markup.
"""

from __future__ import annotations

import plistlib
import re
import uuid
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from typing import Literal

from gateway.config import ProtocolSettings, Settings, SubmissionSettings, is_host_name, tcp_endpoint

Protocol = Literal["imap", "pop3", "smtp"]
Security = Literal["SSL", "STARTTLS"]

MOBILECONFIG_CONTENT_TYPE = "application/x-apple-aspen-config"
"""The media type Safari and iOS install a configuration profile from."""

AUTODISCOVER_MAX_BODY = 64 * 1024
"""The largest Autodiscover request body accepted, in bytes."""

AUTODISCOVER_REQUEST_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"
AUTODISCOVER_RESPONSE_NS = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
AUTODISCOVER_OUTLOOK_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"

DEFAULT_USERNAME = "%EMAILADDRESS%"
"""The login name form when C{[web]} is not configured: the whole address."""

_STANDARD_PORTS: dict[tuple[Protocol, Security], int] = {
    ("imap", "SSL"): 993,
    ("imap", "STARTTLS"): 143,
    ("pop3", "SSL"): 995,
    ("pop3", "STARTTLS"): 110,
    ("smtp", "SSL"): 465,
    ("smtp", "STARTTLS"): 587,
}

# RFC 6186 / RFC 8314 service labels, in the order the records are printed, with their SRV
# priorities: a client that finds several reading (or sending) services takes the lowest (RFC 6186
# 3.4), so they give the order of Thunderbird's and Outlook's documents, IMAP before POP3 and
# implicit TLS before STARTTLS; with all equal, a client may as well pick POP3.
_SRV_SERVICES: tuple[tuple[str, Protocol, Security, int], ...] = (
    ("_imaps._tcp", "imap", "SSL", 0),
    ("_imap._tcp", "imap", "STARTTLS", 10),
    ("_pop3s._tcp", "pop3", "SSL", 20),
    ("_pop3._tcp", "pop3", "STARTTLS", 30),
    ("_submissions._tcp", "smtp", "SSL", 0),
    ("_submission._tcp", "smtp", "STARTTLS", 10),
)

# RFC 5322 dot-atom, less "%", "$", "{" and "}": real mailboxes do without them, while the
# placeholders clients send instead of an address (%EMAILADDRESS%, ${USER}) are made of them.
_ATOM = r"[A-Za-z0-9!#&'*+/=?^_`|~-]+"
_LOCAL_PART = re.compile(rf"(?=.{{1,64}}$){_ATOM}(?:\.{_ATOM})*")


class NothingToAdvertise(ValueError):
    """The configured listeners cannot fill the document (no incoming or no outgoing server)."""


class AutodiscoverError(ValueError):
    """An Autodiscover request body is not one the gateway answers; the message is for the log."""


@dataclass(frozen=True)
class Advertised:
    """
    One server entry as clients are told it.

    :ivar protocol: C{imap}, C{pop3} or C{smtp} (submission).
    :ivar host: the host name clients connect to.
    :ivar port: the port clients connect to.
    :ivar tls: C{SSL} for implicit TLS, C{STARTTLS} for an upgrade from the first exchange.
    """

    protocol: Protocol
    host: str
    port: int
    tls: Security


def public_host(settings: Settings) -> str:
    """
    Return the host name clients are told to connect to.

    :param settings: the configuration.
    :returns: C{[web] public_host} when C{[web]} is configured, else C{[gateway] hostname}, in
        lower case and without a trailing dot.
    """
    host = settings.web.public_host if settings.web is not None else settings.hostname
    return host.rstrip(".").lower()


def advertised(settings: Settings) -> list[Advertised]:
    """
    Return the server entries the configured listeners offer, by the rules in the module docstring.

    :param settings: the configuration.
    :returns: IMAP, then POP3, then SMTP entries, implicit TLS before STARTTLS within each;
        listeners that end up with the same host, port and TLS mode give one entry.
    """
    host = public_host(settings)
    sections: tuple[tuple[Protocol, ProtocolSettings | SubmissionSettings | None], ...] = (
        ("imap", settings.imap), ("pop3", settings.pop3), ("smtp", settings.submission))
    entries: list[Advertised] = []
    for protocol, section in sections:
        if section is None:
            continue
        listeners: tuple[tuple[Security, tuple[str, ...]], ...] = (
            ("SSL", section.implicit_tls), ("STARTTLS", section.starttls))
        for security, descriptions in listeners:
            standard = _STANDARD_PORTS[(protocol, security)]
            for description in descriptions:
                entry = Advertised(protocol, host, _listener_port(description, standard), security)
                if entry not in entries:
                    entries.append(entry)
    return entries


def _listener_port(description: str, standard: int) -> int:
    """
    Return the port clients reach a listener on.

    :param description: a Twisted endpoint description, possibly behind C{haproxy:}.
    :param standard: the protocol's standard port, for listeners that name no usable port.
    :returns: the port of a C{tcp:}/C{tcp6:} listener, else C{standard}.
    """
    # "haproxy:tcp:10993" is no tcp: description: clients reach the balancer, on the standard port.
    bound = tcp_endpoint(description)
    return bound[2] if bound is not None and 1 <= bound[2] <= 65535 else standard


def plausible_email(value: str | None) -> str | None:
    """
    Return an address if the value looks like one, else C{None}.

    Plausible is an RFC 5322 dot-atom local part of at most 64 characters, C{@}, and a host
    name. The local part may not hold a percent sign, a dollar sign or a brace, the stuff of
    template placeholders.

    :param value: text from a request, or C{None}.
    :returns: the value without surrounding white space, or C{None}.
    """
    if value is None:
        return None
    value = value.strip()
    if len(value) > 254 or value.count("@") != 1:
        return None
    local, domain = value.split("@")
    if not _LOCAL_PART.fullmatch(local) or not is_host_name(domain):
        return None
    return value


def _require_email(email: str) -> tuple[str, str]:
    """
    Check an address the caller promises is one.

    :param email: the address.
    :returns: the address and its domain in lower case.
    :raises ValueError: if it is not a plausible address.
    """
    address = plausible_email(email)
    if address is None:
        raise ValueError("not a plausible e-mail address")
    return address, address.rsplit("@", 1)[1].lower()


def _username_form(settings: Settings) -> str:
    """Return C{%EMAILADDRESS%} or C{%EMAILLOCALPART%}, as configured."""
    return settings.web.autoconfig_username if settings.web is not None else DEFAULT_USERNAME


def login_name(settings: Settings, email: str) -> str:
    """
    Return what a user with this address logs in as.

    :param settings: the configuration (C{[web] autoconfig_username}).
    :param email: a plausible address.
    :returns: the address, or its local part when C{%EMAILLOCALPART%} is configured.
    """
    return email.rsplit("@", 1)[0] if _username_form(settings) == "%EMAILLOCALPART%" else email


def _provider_domain(settings: Settings) -> str:
    """
    Return the mail domain to name when the client gave no address: the public host less its
    first label when that leaves at least two (mail.example.org gives example.org).
    """
    labels = public_host(settings).split(".")
    return ".".join(labels[1:]) if len(labels) > 2 else ".".join(labels)


def _require_servers(entries: list[Advertised], outgoing: bool = False) -> None:
    """Refuse an account document with nothing to read mail from (or, with C{outgoing}, to send it through)."""
    if not any(entry.protocol != "smtp" for entry in entries):
        raise NothingToAdvertise("no IMAP or POP3 listener to advertise")
    if outgoing and not any(entry.protocol == "smtp" for entry in entries):
        raise NothingToAdvertise("no submission listener to advertise")


def _xml_document(root: ElementTree.Element) -> bytes:
    """Serialize as UTF-8 with an XML declaration."""
    return ElementTree.tostring(root, encoding="UTF-8", xml_declaration=True)


def _child(parent: ElementTree.Element, tag: str, text: str) -> ElementTree.Element:
    """Append an element holding text (escaped by ElementTree on output)."""
    element = ElementTree.SubElement(parent, tag)
    element.text = text
    return element


def thunderbird_config(settings: Settings, email: str | None) -> bytes:
    """
    Build the Thunderbird autoconfig document (config-v1.1 C{clientConfig}).

    Each advertised IMAP and POP3 entry becomes an C{incomingServer}, each SMTP entry an
    C{outgoingServer}, all with C{password-cleartext} authentication (a normal password, inside
    TLS) and the configured username placeholder, which the client fills in itself.

    :param settings: the configuration.
    :param email: the address the client asked about; anything implausible counts as none.
    :returns: the UTF-8 XML document with its declaration. The provider id and domain are the
        address's domain, or without one the public host's mail domain.
    :raises NothingToAdvertise: if there is no IMAP or POP3 listener, or no submission listener:
        Thunderbird refuses a whole document without an C{outgoingServer}, and after a 404 goes on
        to its other sources (its ISPDB, guessing), which may find the MTA.
    """
    entries = advertised(settings)
    _require_servers(entries, outgoing=True)
    address = plausible_email(email)
    domain = address.rsplit("@", 1)[1].lower() if address is not None else _provider_domain(settings)
    username = _username_form(settings)

    root = ElementTree.Element("clientConfig", version="1.1")
    provider = ElementTree.SubElement(root, "emailProvider", id=domain)
    _child(provider, "domain", domain)
    _child(provider, "displayName", domain)
    _child(provider, "displayShortName", domain)
    for entry in entries:
        tag = "outgoingServer" if entry.protocol == "smtp" else "incomingServer"
        server = ElementTree.SubElement(provider, tag, type=entry.protocol)
        _child(server, "hostname", entry.host)
        _child(server, "port", str(entry.port))
        _child(server, "socketType", entry.tls)
        _child(server, "authentication", "password-cleartext")
        _child(server, "username", username)
    return _xml_document(root)


def parse_autodiscover_request(body: bytes) -> str:
    """
    Read the address from an Outlook (POX) Autodiscover request.

    The body must be UTF-8 XML of at most L{AUTODISCOVER_MAX_BODY} bytes, without a document type
    declaration or entity declaration (which are refused before parsing, so no entity is ever
    expanded): an C{Autodiscover} root in the Outlook request schema namespace (or in none),
    a C{Request}, and in it an C{EMailAddress}. An C{AcceptableResponseSchema}, if present,
    must be the Outlook 2006a response schema (ActiveSync's mobilesync schema is not served).

    :param body: the request body.
    :returns: the address.
    :raises AutodiscoverError: for anything else.
    """
    if len(body) > AUTODISCOVER_MAX_BODY:
        raise AutodiscoverError("request body over 64 KiB")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise AutodiscoverError("request body is not UTF-8") from None
    upper = text.upper()
    if "<!DOCTYPE" in upper or "<!ENTITY" in upper:
        raise AutodiscoverError("request body declares a document type or an entity")
    try:
        # A str is parsed as UTF-8 whatever its XML declaration says, so the check above holds.
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError:
        raise AutodiscoverError("request body is not well-formed XML") from None
    namespace = _namespace(root.tag)
    if namespace not in ("", AUTODISCOVER_REQUEST_NS) or _local_name(root.tag) != "Autodiscover":
        raise AutodiscoverError("not an Outlook Autodiscover request")
    prefix = f"{{{namespace}}}" if namespace else ""
    request = root.find(f"{prefix}Request")
    if request is None:
        raise AutodiscoverError("request has no Request element")
    schema = request.findtext(f"{prefix}AcceptableResponseSchema")
    if schema is not None and schema.strip() != AUTODISCOVER_OUTLOOK_NS:
        raise AutodiscoverError("request asks for a response schema other than Outlook's 2006a")
    address = plausible_email(request.findtext(f"{prefix}EMailAddress"))
    if address is None:
        raise AutodiscoverError("request has no plausible EMailAddress")
    return address


def _namespace(tag: str) -> str:
    return tag[1:].split("}", 1)[0] if tag.startswith("{") else ""


def _local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def autodiscover_response(settings: Settings, email: str) -> bytes:
    """
    Build the Outlook Autodiscover (POX) response for an address.

    One C{Protocol} per advertised entry, IMAP, then POP3, then SMTP: C{Type}, C{Server},
    C{Port}, C{LoginName} (the address or its local part, as configured), C{DomainRequired}
    off, C{SPA} off, C{SSL} on, C{Encryption} C{SSL} (implicit TLS) or C{TLS} (STARTTLS), and
    C{AuthRequired} on. C{SSL} stays on for STARTTLS too: it means "secure logon required",
    Encryption overrides it where understood, and an old client that reads only C{SSL} then
    fails a TLS handshake rather than sending a password in clear.

    :param settings: the configuration.
    :param email: the address from L{parse_autodiscover_request}.
    :returns: the UTF-8 XML document with its declaration.
    :raises ValueError: if the address is not plausible.
    :raises NothingToAdvertise: if there is no IMAP or POP3 listener.
    """
    address, _ = _require_email(email)
    entries = advertised(settings)
    _require_servers(entries)
    login = login_name(settings, address)
    # Plain tags with xmlns attributes: the default namespaces are written as such, without
    # touching ElementTree's process-wide prefix registry.
    root = ElementTree.Element("Autodiscover", xmlns=AUTODISCOVER_RESPONSE_NS)
    response = ElementTree.SubElement(root, "Response", xmlns=AUTODISCOVER_OUTLOOK_NS)
    account = ElementTree.SubElement(response, "Account")
    _child(account, "AccountType", "email")
    _child(account, "Action", "settings")
    for entry in entries:
        protocol = ElementTree.SubElement(account, "Protocol")
        _child(protocol, "Type", entry.protocol.upper())
        _child(protocol, "Server", entry.host)
        _child(protocol, "Port", str(entry.port))
        _child(protocol, "DomainRequired", "off")
        _child(protocol, "LoginName", login)
        _child(protocol, "SPA", "off")
        _child(protocol, "SSL", "on")
        _child(protocol, "Encryption", "SSL" if entry.tls == "SSL" else "TLS")
        _child(protocol, "AuthRequired", "on")
    return _xml_document(root)


def mobileconfig(settings: Settings, email: str) -> bytes:
    """
    Build an Apple configuration profile with one mail account for an address.

    A profile has one server of each kind and cannot say which TLS: C{UseSSL} is set either way.
    Implicit TLS is preferred: incoming is the first implicit-TLS IMAP entry, else the first
    implicit-TLS POP3 one, else the first STARTTLS entry (IMAP before POP3); outgoing is the first
    implicit-TLS SMTP entry, else the first STARTTLS one. Apple's clients take C{UseSSL} with port
    587 as STARTTLS (Apple's own settings for iCloud Mail say port 587, "SSL required"), and the
    gateway offers no plaintext to fall back to. Both servers use a password, the same for both,
    and the configured login name. The identifiers and UUIDs derive from the public host and the
    address, so the same request gives the same profile, and installing it again replaces the
    earlier one.

    :param settings: the configuration.
    :param email: the address the profile is for.
    :returns: the profile as an XML property list.
    :raises ValueError: if the address is not plausible.
    :raises NothingToAdvertise: if no incoming or no outgoing entry exists.
    """
    address, domain = _require_email(email)
    entries = advertised(settings)
    _require_servers(entries, outgoing=True)
    # advertised() lists IMAP, POP3, then SMTP, each with implicit TLS first: a stable sort on TLS keeps that.
    by_tls = sorted(entries, key=lambda entry: entry.tls != "SSL")
    incoming = next(entry for entry in by_tls if entry.protocol != "smtp")
    outgoing = next(entry for entry in by_tls if entry.protocol == "smtp")
    host = public_host(settings)
    login = login_name(settings, address)
    name = f"mailgateway:{host}:{address.lower()}"
    identifier = ".".join(reversed(host.split("."))) + ".mailgateway." + str(uuid.uuid5(uuid.NAMESPACE_URL, name))
    account = {
        "PayloadType": "com.apple.mail.managed",
        "PayloadVersion": 1,
        "PayloadIdentifier": identifier + ".mail",
        "PayloadUUID": str(uuid.uuid5(uuid.NAMESPACE_URL, name + ":mail")).upper(),
        "PayloadDisplayName": f"Mail ({address})",
        "EmailAccountDescription": address,
        "EmailAccountType": "EmailTypeIMAP" if incoming.protocol == "imap" else "EmailTypePOP",
        "EmailAddress": address,
        "IncomingMailServerAuthentication": "EmailAuthPassword",
        "IncomingMailServerHostName": incoming.host,
        "IncomingMailServerPortNumber": incoming.port,
        "IncomingMailServerUseSSL": True,
        "IncomingMailServerUsername": login,
        "OutgoingMailServerAuthentication": "EmailAuthPassword",
        "OutgoingMailServerHostName": outgoing.host,
        "OutgoingMailServerPortNumber": outgoing.port,
        "OutgoingMailServerUseSSL": True,
        "OutgoingMailServerUsername": login,
        "OutgoingPasswordSameAsIncomingPassword": True,
    }
    profile = {
        "PayloadType": "Configuration",
        "PayloadVersion": 1,
        "PayloadIdentifier": identifier,
        "PayloadUUID": str(uuid.uuid5(uuid.NAMESPACE_URL, name)).upper(),
        "PayloadDisplayName": f"Mail for {address}",
        "PayloadDescription": f"Sets up {address} to read and send mail through {host}.",
        "PayloadOrganization": domain,
        "PayloadRemovalDisallowed": False,
        "PayloadContent": [account],
    }
    return plistlib.dumps(profile, fmt=plistlib.FMT_XML, sort_keys=True)


def dns_records(settings: Settings, domain: str) -> list[str]:
    """
    Return the DNS records to publish for a mail domain, as zone-file lines.

    - RFC 6186 / RFC 8314 SRV records for the six services (C{_imaps}, C{_imap}, C{_pop3s},
      C{_pop3}, C{_submissions}, C{_submission}, all C{._tcp}): the service's priority
      (L{_SRV_SERVICES}: 0, 10, 20, 30 for reading, 0 and 10 for sending), weight 1, the
      advertised port and the public host, one per distinct port; a service with no listener
      gets C{0 0 0 .}, RFC 6186's "not available here", so clients do not try it.
    - With C{[web]}: C{autoconfig.DOMAIN} and C{autodiscover.DOMAIN} as CNAMEs of the public
      host (where Thunderbird and Outlook look first), and C{_autodiscover._tcp} SRV to port 443
      (Outlook's fallback). Without C{[web]} nothing serves those names, so they are left out.

    :param settings: the configuration.
    :param domain: the mail domain (the part after C{@}), e.g. C{example.org}.
    :returns: the lines, SRV records first.
    :raises ValueError: if C{domain} is not a host name.
    """
    zone = domain.rstrip(".").lower()
    if not is_host_name(zone):
        raise ValueError(f"not a domain name: {domain!r}")
    host = public_host(settings)
    entries = advertised(settings)
    lines: list[str] = []
    for service, protocol, security, priority in _SRV_SERVICES:
        ports = [entry.port for entry in entries if entry.protocol == protocol and entry.tls == security]
        owner = f"{service}.{zone}."
        if not ports:
            lines.append(f"{owner} IN SRV 0 0 0 .")
        lines.extend(f"{owner} IN SRV {priority} 1 {port} {host}." for port in ports)
    if settings.web is not None:
        for alias in ("autoconfig", "autodiscover"):
            if f"{alias}.{zone}" != host:  # a name cannot be a CNAME of itself
                lines.append(f"{alias}.{zone}. IN CNAME {host}.")
        lines.append(f"_autodiscover._tcp.{zone}. IN SRV 0 1 443 {host}.")
    return lines
