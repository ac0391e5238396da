"""Tests for gateway.autoconfig: every document parsed back and checked against the configured listeners."""

from __future__ import annotations

import plistlib
import shutil
import tempfile
import uuid
import xml.etree.ElementTree as ElementTree
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from gateway.autoconfig import (
    AUTODISCOVER_MAX_BODY,
    AUTODISCOVER_OUTLOOK_NS,
    AUTODISCOVER_REQUEST_NS,
    AUTODISCOVER_RESPONSE_NS,
    MOBILECONFIG_CONTENT_TYPE,
    Advertised,
    AutodiscoverError,
    NothingToAdvertise,
    advertised,
    autodiscover_response,
    dns_records,
    mobileconfig,
    parse_autodiscover_request,
    plausible_email,
    thunderbird_config,
)
from gateway.config import Settings, parse_settings

HOSTNAME = "mail.example.org"
PUBLIC_HOST = "gw.example.net"
MOBILESYNC_NS = "http://schemas.microsoft.com/exchange/autodiscover/mobilesync/responseschema/2006"

# Non-standard ports throughout, so that a port taken from the wrong place shows.
FULL: dict[str, Any] = {
    "imap": {"implicit_tls": ["tcp:10993", "tcp6:port=10993:interface=\\:\\:"], "starttls": ["tcp:10143"]},
    "pop3": {"implicit_tls": ["tcp:10995:interface=127.0.0.1"], "starttls": ["tcp6:10110:interface=\\:\\:1"]},
    "submission": {"implicit_tls": ["tcp:10465"], "starttls": ["tcp:10587"]},
    "web": {"https": ["tcp:443"], "public_host": PUBLIC_HOST},
}

PLACEHOLDERS = ("%EMAILADDRESS%", "${USER}", "", "   ", "%EMAILLOCALPART%@example.org", "${USER}@example.org",
                "user", "@example.org", "user@", "a@b@example.org")

INJECTIONS = ("a<b>@example.org", 'joe@example.org"><evil/>', "joe@example.org</username><evil/>",
              "<evil/>@example.org", "joe@exa<evil/>mple.org", "joe@example.org\n<evil/>")


class SettingsTestCase(SynchronousTestCase):
    """Builds settings from small TOML-shaped dictionaries, with a state directory of its own."""

    def setUp(self) -> None:
        self.state_dir = tempfile.mkdtemp(prefix="mailgateway-autoconfig-")
        self.addCleanup(shutil.rmtree, self.state_dir)

    def settings(self, sections: dict[str, Any], *, hostname: str = HOSTNAME) -> Settings:
        """
        Validate a configuration with a self-signed certificate, backend logins and the given sections.

        :param sections: protocol, C{web} and C{limits} tables as C{tomllib} would decode them.
        :param hostname: C{[gateway] hostname}.
        :returns: the settings.
        """
        data: dict[str, Any] = {
            "gateway": {"hostname": hostname, "state_dir": self.state_dir},
            "tls": {"self_signed": True},
            "auth": {"mode": "backend"},
        }
        data.update(sections)
        for name, port in (("imap", 20143), ("pop3", 20110), ("submission", 20587)):
            if name in data:  # the stores on ports of their own: the gateway takes the standard ones
                data[name] = {"backend": {"port": port}, **data[name]}
        return parse_settings(f"{self.state_dir}/mailgateway.toml", data)

    def with_web(self, sections: dict[str, Any], **web: str) -> dict[str, Any]:
        """
        Return the sections with a C{[web]} table for L{PUBLIC_HOST} plus the given keys.

        :param sections: protocol tables.
        :param web: further C{[web]} keys.
        :returns: a new dictionary.
        """
        return {**sections, "web": {"https": ["tcp:443"], "public_host": PUBLIC_HOST, **web}}


class AdvertisedTests(SettingsTestCase):
    """Which listeners are offered, on which host and port, in which order."""

    def test_order_host_and_ports(self) -> None:
        """IMAP, POP3, then SMTP, implicit TLS first, on the public host and the configured ports; duplicates merge."""
        self.assertEqual(advertised(self.settings(FULL)), [
            Advertised("imap", PUBLIC_HOST, 10993, "SSL"),
            Advertised("imap", PUBLIC_HOST, 10143, "STARTTLS"),
            Advertised("pop3", PUBLIC_HOST, 10995, "SSL"),
            Advertised("pop3", PUBLIC_HOST, 10110, "STARTTLS"),
            Advertised("smtp", PUBLIC_HOST, 10465, "SSL"),
            Advertised("smtp", PUBLIC_HOST, 10587, "STARTTLS"),
        ])

    def test_hostname_without_web(self) -> None:
        """Without [web] the host is [gateway] hostname, lower-cased and without a trailing dot."""
        settings = self.settings({"imap": {"implicit_tls": ["tcp:993"]}}, hostname="Mail.Example.ORG.")
        self.assertEqual(advertised(settings), [Advertised("imap", "mail.example.org", 993, "SSL")])

    def test_standard_ports(self) -> None:
        """Listeners behind haproxy:, systemd and unix listeners, and tcp:0 get the protocol's standard port."""
        settings = self.settings({
            "imap": {"implicit_tls": ["haproxy:tcp:10993"], "starttls": ["systemd:domain=INET:index=0"]},
            "pop3": {"implicit_tls": ["unix:/run/mailgateway/pop3s.sock"], "starttls": ["tcp:0:interface=127.0.0.1"]},
            "submission": {"implicit_tls": ["haproxy:tcp6:port=10465"], "starttls": ["systemd:domain=INET6:index=1"]},
            "limits": {"proxy_sources": ["192.0.2.0/24"]},
        })
        self.assertEqual([(entry.protocol, entry.port, entry.tls) for entry in advertised(settings)], [
            ("imap", 993, "SSL"), ("imap", 143, "STARTTLS"),
            ("pop3", 995, "SSL"), ("pop3", 110, "STARTTLS"),
            ("smtp", 465, "SSL"), ("smtp", 587, "STARTTLS"),
        ])

    def test_starttls_only(self) -> None:
        """A protocol with only a STARTTLS listener is advertised as STARTTLS, never as plaintext."""
        settings = self.settings({"pop3": {"starttls": ["tcp:110"]}})
        self.assertEqual(advertised(settings), [Advertised("pop3", HOSTNAME, 110, "STARTTLS")])

    def test_description_syntax(self) -> None:
        """The port is found as Twisted reads descriptions: named or positional, after escaped colons."""
        settings = self.settings({"imap": {"implicit_tls": ["tcp6:interface=\\:\\:1:1993", "tcp:backlog=5:port=2993",
                                                            "tcp:interface=127.0.0.1:3993"]}})
        self.assertEqual([entry.port for entry in advertised(settings)], [1993, 2993, 3993])

    def test_different_ports_each_advertised(self) -> None:
        """Two implicit-TLS listeners on different ports give two entries."""
        settings = self.settings({"imap": {"implicit_tls": ["tcp:993", "tcp:1993"]}})
        self.assertEqual([entry.port for entry in advertised(settings)], [993, 1993])


class PlausibleEmailTests(SynchronousTestCase):
    """What counts as an address."""

    def test_addresses(self) -> None:
        """Dot-atom addresses are kept, without surrounding white space."""
        for value in ("joe@example.org", "Joe.Smith+tag@Mail.Example.ORG", "a&b'c@example.org", "x@localhost"):
            self.assertEqual(plausible_email(value), value)
        self.assertEqual(plausible_email("  joe@example.org\n"), "joe@example.org")

    def test_not_addresses(self) -> None:
        """Placeholders, markup, missing parts and overlong parts are no address."""
        for value in (None, *PLACEHOLDERS, *INJECTIONS, "a..b@example.org", ".a@example.org",
                      "a" * 65 + "@example.org", "joe@-example.org", "joe@example..org", '"joe"@example.org',
                      "jo e@example.org", "joe@" + "a" * 64 + ".org"):
            self.assertIsNone(plausible_email(value), value)


def thunderbird_servers(document: bytes) -> tuple[ElementTree.Element, list[tuple[str, ...]]]:
    """
    Parse a Thunderbird autoconfig document.

    :param document: the bytes served.
    :returns: the emailProvider element and, for each server in document order, its element
        name, type, hostname, port, socketType, authentication and username.
    """
    root = ElementTree.fromstring(document)
    assert root.tag == "clientConfig" and root.get("version") == "1.1", root.tag
    providers = root.findall("emailProvider")
    assert len(providers) == 1, providers
    servers = [
        (server.tag, server.get("type", ""), *(server.findtext(name, "") for name in
                                               ("hostname", "port", "socketType", "authentication", "username")))
        for server in providers[0] if server.tag in ("incomingServer", "outgoingServer")
    ]
    return providers[0], servers


class ThunderbirdTests(SettingsTestCase):
    """The config-v1.1 clientConfig document."""

    def test_full(self) -> None:
        """Every listener appears with its port, TLS mode, cleartext password (inside TLS) and username form."""
        document = thunderbird_config(self.settings(FULL), "joe@example.org")
        self.assertTrue(document.startswith(b"<?xml version='1.0' encoding='UTF-8'?>"), document[:60])
        provider, servers = thunderbird_servers(document)
        self.assertEqual(provider.get("id"), "example.org")
        self.assertEqual(provider.findtext("domain"), "example.org")
        self.assertEqual(provider.findtext("displayName"), "example.org")
        incoming = [("incomingServer", kind, PUBLIC_HOST, port, tls, "password-cleartext", "%EMAILADDRESS%")
                    for kind, port, tls in (("imap", "10993", "SSL"), ("imap", "10143", "STARTTLS"),
                                            ("pop3", "10995", "SSL"), ("pop3", "10110", "STARTTLS"))]
        outgoing = [("outgoingServer", "smtp", PUBLIC_HOST, port, tls, "password-cleartext", "%EMAILADDRESS%")
                    for port, tls in (("10465", "SSL"), ("10587", "STARTTLS"))]
        self.assertEqual(servers, incoming + outgoing)

    def test_without_pop3(self) -> None:
        """Without [pop3] the incoming entries are IMAP's only, on [gateway] hostname without [web]."""
        _, servers = thunderbird_servers(thunderbird_config(
            self.settings({"imap": FULL["imap"], "submission": FULL["submission"]}), None))
        self.assertEqual([(s[0], s[1], s[2], s[3]) for s in servers], [
            ("incomingServer", "imap", HOSTNAME, "10993"), ("incomingServer", "imap", HOSTNAME, "10143"),
            ("outgoingServer", "smtp", HOSTNAME, "10465"), ("outgoingServer", "smtp", HOSTNAME, "10587")])

    def test_local_part_username(self) -> None:
        """With autoconfig_username %EMAILLOCALPART% every server says so."""
        settings = self.settings(self.with_web({"imap": FULL["imap"], "submission": FULL["submission"]},
                                               autoconfig_username="%EMAILLOCALPART%"))
        _, servers = thunderbird_servers(thunderbird_config(settings, "joe@example.org"))
        self.assertEqual({server[-1] for server in servers}, {"%EMAILLOCALPART%"})
        self.assertEqual(len(servers), 4)

    def test_starttls_only_protocol(self) -> None:
        """A protocol with only a STARTTLS listener appears as STARTTLS."""
        settings = self.settings({"imap": {"starttls": ["tcp:143"]}, "submission": {"starttls": ["tcp:587"]}})
        _, servers = thunderbird_servers(thunderbird_config(settings, None))
        self.assertEqual([(s[1], s[3], s[4]) for s in servers], [("imap", "143", "STARTTLS"), ("smtp", "587", "STARTTLS")])

    def test_without_address(self) -> None:
        """Without an address the provider is the public host's mail domain."""
        provider, _ = thunderbird_servers(thunderbird_config(self.settings(FULL), None))
        self.assertEqual((provider.get("id"), provider.findtext("domain")), ("example.net", "example.net"))
        provider, _ = thunderbird_servers(
            thunderbird_config(self.settings({"imap": FULL["imap"], "submission": FULL["submission"]},
                                             hostname="example.com"), None))
        self.assertEqual(provider.get("id"), "example.com")

    def test_placeholders_are_no_address(self) -> None:
        """Placeholder forms such as %EMAILADDRESS% and ${USER} give the document for no address."""
        settings = self.settings(FULL)
        expected = thunderbird_config(settings, None)
        for placeholder in PLACEHOLDERS:
            self.assertEqual(thunderbird_config(settings, placeholder), expected, placeholder)

    def test_address_domain_lower_case(self) -> None:
        """The provider id is the address's domain in lower case."""
        provider, _ = thunderbird_servers(thunderbird_config(self.settings(FULL), "Joe@Example.ORG"))
        self.assertEqual(provider.get("id"), "example.org")

    def test_injection(self) -> None:
        """Markup in the address never reaches the document, which stays well-formed."""
        settings = self.settings(FULL)
        for email in INJECTIONS:
            document = thunderbird_config(settings, email)
            provider, servers = thunderbird_servers(document)
            self.assertEqual(provider.get("id"), "example.net", email)
            self.assertNotIn(b"evil", document)
            self.assertEqual(len(servers), 6)

    def test_no_incoming_server(self) -> None:
        """A gateway with only submission has no account to describe."""
        self.assertRaises(NothingToAdvertise, thunderbird_config, self.settings({"submission": FULL["submission"]}),
                          "joe@example.org")

    def test_no_outgoing_server(self) -> None:
        """
        Without a submission listener there is no document either: Thunderbird would refuse it
        whole ("Need proper <outgoingServer> in XML file") instead of going on to its other sources.
        """
        error = self.assertRaises(NothingToAdvertise, thunderbird_config,
                                  self.settings({"imap": FULL["imap"], "pop3": FULL["pop3"]}), "joe@example.org")
        self.assertEqual(str(error), "no submission listener to advertise")


def autodiscover_request(email: str, *, namespace: str = AUTODISCOVER_REQUEST_NS,
                         schema: str | None = AUTODISCOVER_OUTLOOK_NS) -> bytes:
    """
    Build an Outlook Autodiscover request as Outlook sends it.

    :param email: the EMailAddress text.
    :param namespace: the request namespace, or C{""} for none.
    :param schema: the AcceptableResponseSchema text, or C{None} to leave it out.
    :returns: the UTF-8 body.
    """
    prefix = f"{{{namespace}}}" if namespace else ""
    root = ElementTree.Element(f"{prefix}Autodiscover")
    request = ElementTree.SubElement(root, f"{prefix}Request")
    ElementTree.SubElement(request, f"{prefix}EMailAddress").text = email
    if schema is not None:
        ElementTree.SubElement(request, f"{prefix}AcceptableResponseSchema").text = schema
    return ElementTree.tostring(root, encoding="utf-8", xml_declaration=True)


class AutodiscoverRequestTests(SynchronousTestCase):
    """Parsing the POX request."""

    def test_request(self) -> None:
        """The address is read from an Outlook request, with or without a namespace or a schema."""
        self.assertEqual(parse_autodiscover_request(autodiscover_request("joe@example.org")), "joe@example.org")
        self.assertEqual(parse_autodiscover_request(autodiscover_request("a@b.org", namespace="")), "a@b.org")
        self.assertEqual(parse_autodiscover_request(autodiscover_request("c@d.org", schema=None)), "c@d.org")
        self.assertEqual(parse_autodiscover_request(autodiscover_request(" e@f.org\r\n")), "e@f.org")

    def test_utf8_bom_and_declared_encoding(self) -> None:
        """A UTF-8 byte order mark is accepted; a declared encoding cannot make the body other than UTF-8."""
        body = autodiscover_request("joe@example.org")
        self.assertEqual(parse_autodiscover_request(b"\xef\xbb\xbf" + body), "joe@example.org")
        relabelled = body.replace(b"encoding='utf-8'", b"encoding='utf-16'")
        self.assertNotEqual(relabelled, body)
        self.assertEqual(parse_autodiscover_request(relabelled), "joe@example.org")

    def test_size_limit(self) -> None:
        """A body of 64 KiB is read; one byte more is refused unparsed."""
        body = autodiscover_request("joe@example.org")
        padded = body + b" " * (AUTODISCOVER_MAX_BODY - len(body))
        self.assertEqual(AUTODISCOVER_MAX_BODY, 65536)
        self.assertEqual(parse_autodiscover_request(padded), "joe@example.org")
        error = self.assertRaises(AutodiscoverError, parse_autodiscover_request, padded + b" ")
        self.assertIn("64 KiB", str(error))

    def test_malformed(self) -> None:
        """Bodies that are not well-formed UTF-8 XML are refused."""
        for body in (b"", b"joe@example.org", b"<Autodiscover>", b"<a></b>", b"\xff\xfe<\x00a\x00/\x00>\x00",
                     autodiscover_request("joe@example.org")[:-5], "<Autodiscover>é</Autodiscover>".encode("latin-1")):
            self.assertRaises(AutodiscoverError, parse_autodiscover_request, body)

    def test_doctype_and_entities_refused(self) -> None:
        """A document type or entity declaration is refused, however it is spelt or encoded."""
        laughs = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
                  b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>'
                  b'<Autodiscover><Request><EMailAddress>&lol2;@example.org</EMailAddress></Request></Autodiscover>')
        external = (b'<!DOCTYPE Autodiscover SYSTEM "file:///etc/passwd"><Autodiscover><Request>'
                    b"<EMailAddress>joe@example.org</EMailAddress></Request></Autodiscover>")
        for body in (laughs, external, external.replace(b"DOCTYPE", b"doctype"), laughs.decode().encode("utf-16"),
                     b"<Autodiscover><!ENTITY x 'y'><Request><EMailAddress>joe@example.org</EMailAddress>"
                     b"</Request></Autodiscover>"):
            self.assertRaises(AutodiscoverError, parse_autodiscover_request, body)

    def test_not_outlook_request(self) -> None:
        """Another root, namespace or response schema (ActiveSync's) is refused."""
        for body in (autodiscover_request("joe@example.org", namespace="urn:other"),
                     autodiscover_request("joe@example.org", schema=MOBILESYNC_NS),
                     b"<Other><Request><EMailAddress>joe@example.org</EMailAddress></Request></Other>",
                     b"<Autodiscover><EMailAddress>joe@example.org</EMailAddress></Autodiscover>",
                     b"<Autodiscover><Request><LegacyDN>/o=x</LegacyDN></Request></Autodiscover>"):
            self.assertRaises(AutodiscoverError, parse_autodiscover_request, body)

    def test_implausible_address(self) -> None:
        """Markup, placeholders and an empty EMailAddress are refused."""
        for email in (*INJECTIONS, *PLACEHOLDERS):
            self.assertRaises(AutodiscoverError, parse_autodiscover_request, autodiscover_request(email))

    def test_error_is_value_error(self) -> None:
        """AutodiscoverError is a ValueError."""
        self.assertTrue(issubclass(AutodiscoverError, ValueError))


def autodiscover_protocols(document: bytes) -> tuple[ElementTree.Element, list[dict[str, str]]]:
    """
    Parse an Autodiscover response.

    :param document: the bytes served.
    :returns: the Account element and each Protocol's children as a dictionary, in order.
    """
    outlook = f"{{{AUTODISCOVER_OUTLOOK_NS}}}"
    root = ElementTree.fromstring(document)
    assert root.tag == f"{{{AUTODISCOVER_RESPONSE_NS}}}Autodiscover", root.tag
    account = root.find(f"{outlook}Response/{outlook}Account")
    assert account is not None
    protocols = []
    for protocol in account.findall(f"{outlook}Protocol"):
        children = {child.tag.removeprefix(outlook): child.text or "" for child in protocol}
        assert len(children) == len(protocol), "a repeated element"
        protocols.append(children)
    return account, protocols


def expected_protocol(kind: str, port: int, tls: str, login: str, host: str = PUBLIC_HOST) -> dict[str, str]:
    """Return the Protocol children expected for one entry."""
    return {"Type": kind, "Server": host, "Port": str(port), "DomainRequired": "off", "LoginName": login,
            "SPA": "off", "SSL": "on", "Encryption": tls, "AuthRequired": "on"}


class AutodiscoverResponseTests(SettingsTestCase):
    """The outlook/responseschema/2006a Account."""

    def test_full(self) -> None:
        """Each listener is a Protocol with its port and encryption, the address as login, SPA off."""
        document = autodiscover_response(self.settings(FULL), "joe@example.org")
        self.assertTrue(document.startswith(b"<?xml version='1.0' encoding='UTF-8'?>"), document[:60])
        account, protocols = autodiscover_protocols(document)
        outlook = f"{{{AUTODISCOVER_OUTLOOK_NS}}}"
        self.assertEqual((account.findtext(f"{outlook}AccountType"), account.findtext(f"{outlook}Action")),
                         ("email", "settings"))
        login = "joe@example.org"
        self.assertEqual(protocols, [
            expected_protocol("IMAP", 10993, "SSL", login), expected_protocol("IMAP", 10143, "TLS", login),
            expected_protocol("POP3", 10995, "SSL", login), expected_protocol("POP3", 10110, "TLS", login),
            expected_protocol("SMTP", 10465, "SSL", login), expected_protocol("SMTP", 10587, "TLS", login),
        ])

    def test_round_trip(self) -> None:
        """The address parsed from a request is the login name of the response."""
        email = parse_autodiscover_request(autodiscover_request("Joe.Smith@Example.org"))
        _, protocols = autodiscover_protocols(autodiscover_response(self.settings(FULL), email))
        self.assertEqual({protocol["LoginName"] for protocol in protocols}, {"Joe.Smith@Example.org"})

    def test_imap_only_and_local_part(self) -> None:
        """Without [pop3] there is no POP3 Protocol; %EMAILLOCALPART% logs in with the local part."""
        settings = self.settings(self.with_web({"imap": {"implicit_tls": ["tcp:993"]},
                                                "submission": {"starttls": ["haproxy:tcp:10587"]},
                                                "limits": {"proxy_sources": ["192.0.2.1"]}},
                                               autoconfig_username="%EMAILLOCALPART%"))
        _, protocols = autodiscover_protocols(autodiscover_response(settings, "joe@example.org"))
        self.assertEqual(protocols, [expected_protocol("IMAP", 993, "SSL", "joe"),
                                     expected_protocol("SMTP", 587, "TLS", "joe")])

    def test_implausible_address(self) -> None:
        """An address that is not plausible is refused rather than written."""
        for email in INJECTIONS:
            self.assertRaises(ValueError, autodiscover_response, self.settings(FULL), email)

    def test_escaped(self) -> None:
        """Characters special to XML in a plausible address come back unchanged after parsing."""
        _, protocols = autodiscover_protocols(autodiscover_response(self.settings(FULL), "a&b'c@example.org"))
        self.assertEqual(protocols[0]["LoginName"], "a&b'c@example.org")

    def test_no_incoming_server(self) -> None:
        """A gateway with only submission has no account to describe."""
        self.assertRaises(NothingToAdvertise, autodiscover_response,
                          self.settings({"submission": FULL["submission"]}), "joe@example.org")


class MobileconfigTests(SettingsTestCase):
    """The Apple configuration profile."""

    def test_content_type(self) -> None:
        """Profiles are served as application/x-apple-aspen-config."""
        self.assertEqual(MOBILECONFIG_CONTENT_TYPE, "application/x-apple-aspen-config")

    def test_full(self) -> None:
        """One com.apple.mail.managed payload with the implicit-TLS IMAP and submission ports."""
        document = mobileconfig(self.settings(FULL), "joe@example.org")
        self.assertTrue(document.startswith(b'<?xml version="1.0" encoding="UTF-8"?>'), document[:60])
        profile = plistlib.loads(document, fmt=plistlib.FMT_XML)
        self.assertEqual((profile["PayloadType"], profile["PayloadVersion"]), ("Configuration", 1))
        self.assertEqual(len(profile["PayloadContent"]), 1)
        account = profile["PayloadContent"][0]
        self.assertEqual((account["PayloadType"], account["PayloadVersion"]), ("com.apple.mail.managed", 1))
        expected = {
            "EmailAccountType": "EmailTypeIMAP",
            "EmailAddress": "joe@example.org",
            "IncomingMailServerAuthentication": "EmailAuthPassword",
            "IncomingMailServerHostName": PUBLIC_HOST,
            "IncomingMailServerPortNumber": 10993,
            "IncomingMailServerUseSSL": True,
            "IncomingMailServerUsername": "joe@example.org",
            "OutgoingMailServerAuthentication": "EmailAuthPassword",
            "OutgoingMailServerHostName": PUBLIC_HOST,
            "OutgoingMailServerPortNumber": 10465,
            "OutgoingMailServerUseSSL": True,
            "OutgoingMailServerUsername": "joe@example.org",
            "OutgoingPasswordSameAsIncomingPassword": True,
        }
        self.assertEqual({key: account.get(key) for key in expected}, expected)
        for payload in (profile, account):
            self.assertEqual(str(uuid.UUID(payload["PayloadUUID"])).upper(), payload["PayloadUUID"])
        self.assertNotEqual(profile["PayloadUUID"], account["PayloadUUID"])
        self.assertTrue(account["PayloadIdentifier"].startswith(profile["PayloadIdentifier"] + "."))

    def test_deterministic(self) -> None:
        """The same request gives the same profile; another address or host gives other identifiers."""
        settings = self.settings(FULL)
        first = mobileconfig(settings, "joe@example.org")
        self.assertEqual(mobileconfig(settings, "joe@example.org"), first)
        identifiers = {(profile["PayloadIdentifier"], profile["PayloadUUID"], profile["PayloadContent"][0]["PayloadUUID"])
                       for profile in (plistlib.loads(document) for document in (
                           first,
                           mobileconfig(settings, "ann@example.org"),
                           mobileconfig(self.settings({**FULL, "web": {"https": ["tcp:443"]}}), "joe@example.org"),
                       ))}
        self.assertEqual(len(identifiers), 3)
        self.assertEqual(len({part for triple in identifiers for part in triple}), 9)

    def test_pop3_when_imap_is_starttls_only(self) -> None:
        """An implicit-TLS POP3 listener comes before IMAP with only STARTTLS."""
        settings = self.settings({"imap": {"starttls": ["tcp:143"]}, "pop3": {"implicit_tls": ["haproxy:tcp:10995"]},
                                  "submission": {"implicit_tls": ["systemd:domain=INET:index=2"]},
                                  "limits": {"proxy_sources": ["192.0.2.1"]}})
        account = plistlib.loads(mobileconfig(settings, "joe@example.org"))["PayloadContent"][0]
        self.assertEqual((account["EmailAccountType"], account["IncomingMailServerHostName"],
                          account["IncomingMailServerPortNumber"], account["OutgoingMailServerPortNumber"]),
                         ("EmailTypePOP", HOSTNAME, 995, 465))

    def test_starttls_when_no_implicit_tls(self) -> None:
        """
        Where a kind of server has no implicit-TLS listener, its STARTTLS one is in the profile,
        with UseSSL all the same (the common 993 and 587); IMAP before POP3 among them.
        """
        for sections, expected in (
                ({"imap": FULL["imap"], "submission": {"starttls": ["tcp:587"]}}, ("EmailTypeIMAP", 10993, 587)),
                ({"imap": {"starttls": ["tcp:143"]}, "pop3": {"starttls": ["tcp:110"]},
                  "submission": {"starttls": ["tcp:587"]}}, ("EmailTypeIMAP", 143, 587)),
                ({"pop3": {"starttls": ["tcp:110"]}, "submission": FULL["submission"]}, ("EmailTypePOP", 110, 10465))):
            account = plistlib.loads(mobileconfig(self.settings(sections), "joe@example.org"))["PayloadContent"][0]
            self.assertEqual((account["EmailAccountType"], account["IncomingMailServerPortNumber"],
                              account["OutgoingMailServerPortNumber"]), expected, sections)
            self.assertIs(account["IncomingMailServerUseSSL"], True)
            self.assertIs(account["OutgoingMailServerUseSSL"], True)

    def test_no_incoming_or_outgoing(self) -> None:
        """A profile needs an incoming and an outgoing listener."""
        for sections in ({"imap": FULL["imap"]}, {"submission": FULL["submission"]}):
            error = self.assertRaises(NothingToAdvertise, mobileconfig, self.settings(sections), "joe@example.org")
            self.assertIsInstance(error, ValueError)

    def test_local_part(self) -> None:
        """With %EMAILLOCALPART% both servers log in with the local part; the address stays whole."""
        settings = self.settings(self.with_web({"imap": FULL["imap"], "submission": FULL["submission"]},
                                               autoconfig_username="%EMAILLOCALPART%"))
        account = plistlib.loads(mobileconfig(settings, "joe@example.org"))["PayloadContent"][0]
        self.assertEqual((account["IncomingMailServerUsername"], account["OutgoingMailServerUsername"],
                          account["EmailAddress"]), ("joe", "joe", "joe@example.org"))

    def test_injection(self) -> None:
        """Markup and placeholders are refused; XML-special characters of a plausible address survive."""
        settings = self.settings(FULL)
        for email in (*INJECTIONS, *PLACEHOLDERS):
            self.assertRaises(ValueError, mobileconfig, settings, email)
        account = plistlib.loads(mobileconfig(settings, "a&b'c@example.org"))["PayloadContent"][0]
        self.assertEqual(account["EmailAddress"], "a&b'c@example.org")


class DNSRecordsTests(SettingsTestCase):
    """The zone-file lines for `mailgateway dns-records`."""

    def test_full(self) -> None:
        """Every service has its SRV record; autoconfig, autodiscover and _autodiscover point at the public host."""
        self.assertEqual(dns_records(self.settings(FULL), "example.org"), [
            "_imaps._tcp.example.org. IN SRV 0 1 10993 gw.example.net.",
            "_imap._tcp.example.org. IN SRV 10 1 10143 gw.example.net.",
            "_pop3s._tcp.example.org. IN SRV 20 1 10995 gw.example.net.",
            "_pop3._tcp.example.org. IN SRV 30 1 10110 gw.example.net.",
            "_submissions._tcp.example.org. IN SRV 0 1 10465 gw.example.net.",
            "_submission._tcp.example.org. IN SRV 10 1 10587 gw.example.net.",
            "autoconfig.example.org. IN CNAME gw.example.net.",
            "autodiscover.example.org. IN CNAME gw.example.net.",
            "_autodiscover._tcp.example.org. IN SRV 0 1 443 gw.example.net.",
        ])

    def test_services_not_available(self) -> None:
        """Services without a listener get target "." (RFC 6186); without [web] no autoconfig names."""
        settings = self.settings({"imap": {"implicit_tls": ["tcp:993", "tcp:1993"]},
                                  "submission": {"implicit_tls": ["haproxy:tcp:10465"]},
                                  "limits": {"proxy_sources": ["192.0.2.1"]}})
        self.assertEqual(dns_records(settings, "Example.COM."), [
            "_imaps._tcp.example.com. IN SRV 0 1 993 mail.example.org.",
            "_imaps._tcp.example.com. IN SRV 0 1 1993 mail.example.org.",
            "_imap._tcp.example.com. IN SRV 0 0 0 .",
            "_pop3s._tcp.example.com. IN SRV 0 0 0 .",
            "_pop3._tcp.example.com. IN SRV 0 0 0 .",
            "_submissions._tcp.example.com. IN SRV 0 1 465 mail.example.org.",
            "_submission._tcp.example.com. IN SRV 0 0 0 .",
        ])

    def test_no_self_cname(self) -> None:
        """When the public host is autoconfig.DOMAIN itself, it gets no CNAME of itself."""
        settings = self.settings({"imap": {"starttls": ["tcp:143"]},
                                  "web": {"https": ["tcp:443"], "public_host": "autoconfig.example.org"}})
        records = dns_records(settings, "example.org")
        self.assertNotIn("autoconfig.example.org. IN CNAME autoconfig.example.org.", records)
        self.assertIn("autodiscover.example.org. IN CNAME autoconfig.example.org.", records)
        self.assertIn("_imap._tcp.example.org. IN SRV 10 1 143 autoconfig.example.org.", records)

    def test_bad_domain(self) -> None:
        """A domain that is not a host name is refused."""
        settings = self.settings(FULL)
        for domain in ("", ".", "exa mple.org", "-bad.org", "a..b", "example.org\n", "a" * 64 + ".org",
                       "joe@example.org", "example.org; rm", "*.example.org"):
            self.assertRaises(ValueError, dns_records, settings, domain)
