"""
IPv6 end to end: the gateway listening on C{::1} and on a dual-stack C{::} (as the example
configuration does), real clients connecting from C{::1}, the client's address forwarded to
Dovecot and Postfix, backends reached over IPv6, and failed logins from an IPv6 client throttled
and matched by the fail2ban filter.

Loopback offers one IPv6 address only, C{::1}. So that an address forwarded to a backend can be
told from the address the gateway itself connects from, the backends of L{ClientOverIPv6Tests}
listen on 127.0.0.1 (a backend log naming C{::1} then names the client), and those of
L{BackendOverIPv6Tests} on C{::1} only, with IPv4 clients.
"""

from __future__ import annotations

import imaplib
import os
import poplib
import re
import smtplib
import socket
import subprocess
import urllib.request

from twisted.trial.unittest import SynchronousTestCase

from gateway.testing.dovecot import DovecotSandbox
from gateway.testing.gateway import GatewayProcess
from gateway.testing.host import free_ports
from gateway.testing.postfix import PostfixSandbox

from .stack import Stack, require_tool
from .test_submission_gateway import wait_for_file

USERS = {"alice@example.org": "alice's password", "bob@example.org": "bob's password",
         "carol@example.org": "carol's password", "dave@example.org": "dave's password",
         "erin@example.org": "erin's password", "frank@example.org": "frank's password"}

# Listener descriptions as an administrator writes them in TOML literal strings.
LOOPBACK6 = r"tcp6:0:interface=\:\:1"
DUAL_STACK = r"tcp6:0:interface=\:\:"
FILTER = os.path.join(os.path.dirname(__file__), "..", "..", "etc", "fail2ban", "filter.d", "mailgateway.conf")


def require_ipv6(dual_stack: bool = False) -> None:
    """
    Fail, saying why, where the host has no IPv6 loopback, or (C{dual_stack}) its IPv6 sockets
    take no IPv4 clients: the example configuration's C{::} listener counts on both.
    """
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError as error:
        raise RuntimeError(f"these tests need an IPv6 loopback (::1), which this host lacks: {error}") from None
    if dual_stack:
        with open("/proc/sys/net/ipv6/bindv6only") as f:
            if f.read().strip() != "0":
                raise RuntimeError("these tests need net.ipv6.bindv6only = 0 (a '::' listener taking IPv4 clients too)")


def local_port(client: imaplib.IMAP4 | poplib.POP3 | smtplib.SMTP) -> int:
    """The client's own port, as the gateway's connect line names it."""
    sock = client.sock
    assert sock is not None
    return sock.getsockname()[1]


class ClientOverIPv6Tests(SynchronousTestCase):
    """
    Clients from C{::1} on a C{::1} listener and on a dual-stack C{::} one; Dovecot and Postfix on
    127.0.0.1, told the client's address (IMAP ID, POP3 XCLIENT, Postfix XCLIENT).
    """

    @classmethod
    def setUpClass(cls) -> None:
        require_ipv6(dual_stack=True)
        cls.stack = stack = Stack("gw-ipv6-")
        cls.dovecot = stack.start(DovecotSandbox(stack.path("dovecot"), USERS))
        # Postfix refuses XCLIENT ADDR=IPV6:... with "501 5.5.4 Bad ADDR syntax" unless it speaks IPv6
        # itself; the sandbox on an IPv4 address sets inet_protocols = ipv4.
        cls.postfix = stack.start(PostfixSandbox(stack.path("postfix"), extra_main_cf="inet_protocols = all\n"))
        cls.gateway = stack.start(GatewayProcess(
            stack.path("gateway"), listeners=(LOOPBACK6, DUAL_STACK), users=USERS,
            imap_backend_port=cls.dovecot.imap_port, imap_backend="forward_client_ip = true\ntimeout = 5",
            pop3_backend_port=cls.dovecot.pop3_port, pop3_backend="forward_client_ip = true\ntimeout = 5",
            submission_backend_port=cls.postfix.smtp_port, submission_backend='login = "xclient"\ntimeout = 5',
            certificate=stack.certificate.chain_path, private_key=stack.certificate.key_path,
            settings=f"[metrics]\nlisten = ['{LOOPBACK6}']\n",
        ))

    @classmethod
    def tearDownClass(cls) -> None:
        cls.stack.stop()

    def port(self, protocol: str, tls: str, address: str = "::1") -> int:
        return self.gateway.listener_port(protocol, tls, address)

    def imaps(self, host: str, listener: str) -> imaplib.IMAP4_SSL:
        return imaplib.IMAP4_SSL(host, self.port("imap", "implicit_tls", listener), ssl_context=self.stack.tls(),
                                 timeout=15)

    def assert_connect_logged(self, protocol: str, client: str, port: int) -> None:
        """The gateway's connect line for the client's own port names the client as C{client}."""
        self.gateway.wait_for_log(rf"connect protocol={protocol} client={re.escape(client)} port={port} ")

    def test_listeners(self) -> None:
        """Each protocol listens on ::1 and on ::, as the listeners are written (colons escaped)."""
        for protocol in ("imap", "pop3", "submission"):
            for tls in ("implicit_tls", "starttls"):
                for address in ("::1", "::"):
                    endpoint = re.escape(LOOPBACK6 if address == "::1" else DUAL_STACK)
                    # An IPv6 address in brackets, so that the port stands apart.
                    self.gateway.wait_for_log(rf"listening protocol={protocol} tls={tls} endpoint={endpoint} "
                                              rf"address=\[{re.escape(address)}\]:\d+\n")

    def test_imaps_from_ipv6(self) -> None:
        """
        An IMAPS login from ::1 is logged as client=::1, and Dovecot (reached over IPv4) records
        rip=::1 from the gateway's ID.
        """
        client = self.imaps("::1", "::1")
        self.assertEqual(client.login("alice@example.org", USERS["alice@example.org"])[0], "OK")
        port = local_port(client)
        self.assertEqual(client.select("INBOX")[0], "OK")
        client.logout()
        self.assert_connect_logged("imap", "::1", port)
        self.gateway.wait_for_log(r'login protocol=imap client=::1 user="alice@example\.org"')
        wait_for_file(self.dovecot.info_log_path,
                      r"imap-login: Info: Login: user=<alice@example\.org>, method=PLAIN, rip=::1, lip=::1,")

    def test_imap_starttls_from_ipv6_on_dual_stack(self) -> None:
        """IMAP STARTTLS from ::1 on the dual-stack listener: client=::1 here, rip=::1 at Dovecot."""
        client = imaplib.IMAP4("::1", self.port("imap", "starttls", "::"), timeout=15)
        client.starttls(self.stack.tls())
        self.assertEqual(client.login("bob@example.org", USERS["bob@example.org"])[0], "OK")
        port = local_port(client)
        client.logout()
        self.assert_connect_logged("imap", "::1", port)
        wait_for_file(self.dovecot.info_log_path, r"Login: user=<bob@example\.org>, method=PLAIN, rip=::1,")

    def test_ipv4_client_on_dual_stack(self) -> None:
        """An IPv4 client of the :: listener is client=127.0.0.1 (not ::ffff:127.0.0.1), here and at Dovecot."""
        client = self.imaps("127.0.0.1", "::")
        self.assertEqual(client.login("carol@example.org", USERS["carol@example.org"])[0], "OK")
        port = local_port(client)
        client.logout()
        self.assert_connect_logged("imap", "127.0.0.1", port)
        self.gateway.wait_for_log(r'login protocol=imap client=127\.0\.0\.1 user="carol@example\.org"')
        wait_for_file(self.dovecot.info_log_path,
                      r"Login: user=<carol@example\.org>, method=PLAIN, rip=127\.0\.0\.1, lip=127\.0\.0\.1,")

    def test_pop3s_from_ipv6(self) -> None:
        """A POP3S login from ::1: Dovecot records rip=::1 from the gateway's XCLIENT."""
        client = poplib.POP3_SSL("::1", self.port("pop3", "implicit_tls"), context=self.stack.tls(), timeout=15)
        client.user("dave@example.org")
        self.assertTrue(client.pass_(USERS["dave@example.org"]).startswith(b"+OK"))
        port = local_port(client)
        client.quit()
        self.assert_connect_logged("pop3", "::1", port)
        wait_for_file(self.dovecot.info_log_path, r"pop3-login: Info: Login: user=<dave@example\.org>, method=PLAIN, rip=::1,")

    def test_submission_from_ipv6(self) -> None:
        """
        Mail submitted on 465 from ::1 arrives; Postfix, reached from 127.0.0.1, names the client
        [::1] after the gateway's XCLIENT ADDR=IPV6:::1.
        """
        client = smtplib.SMTP_SSL("::1", self.port("submission", "implicit_tls"), context=self.stack.tls(), timeout=15)
        client.login("erin@example.org", USERS["erin@example.org"])
        self.assertEqual(client.sendmail("erin@example.org", ["v6-465@example.org"],
                                         b"Subject: over IPv6\r\n\r\nsent from ::1\r\n"), {})
        port = local_port(client)
        client.quit()
        self.assert_connect_logged("submission", "::1", port)
        self.gateway.wait_for_log(r'message protocol=submission client=::1 user="erin@example\.org" .* reply=250')
        wait_for_file(self.postfix.log_path,
                      r"smtpd\[\d+\]: \w+: client=unknown\[::1\], sasl_method=XCLIENT, sasl_username=erin@example\.org")
        self.assertIn(b"sent from ::1", self.postfix.wait_for_delivered("v6-465", 1)[0])

    def test_submission_starttls_from_ipv6_on_dual_stack(self) -> None:
        """Submission on 587 (STARTTLS) from ::1 on the dual-stack listener: Postfix names the client [::1]."""
        client = smtplib.SMTP("::1", self.port("submission", "starttls", "::"), timeout=15)
        client.starttls(context=self.stack.tls())
        client.login("frank@example.org", USERS["frank@example.org"])
        self.assertEqual(client.sendmail("frank@example.org", ["v6-587@example.org"],
                                         b"Subject: over IPv6\r\n\r\n587\r\n"), {})
        client.quit()
        wait_for_file(self.postfix.log_path,
                      r"smtpd\[\d+\]: \w+: client=unknown\[::1\], sasl_method=XCLIENT, sasl_username=frank@example\.org")
        self.postfix.wait_for_delivered("v6-587", 1)

    def test_metrics_on_ipv6(self) -> None:
        """The metrics listener on ::1 answers GET http://[::1]:PORT/metrics."""
        port = self.port("metrics", "none")
        with urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=15) as response:
            self.assertEqual(response.status, 200)
            self.assertIn(b"mailgateway_connections_total", response.read())


class BackendOverIPv6Tests(SynchronousTestCase):
    """
    Dovecot and Postfix listening on ::1 only, named C{host = "::1"}; IPv4 clients on 127.0.0.1.
    IMAP does not forward the client's address, so Dovecot sees the gateway's own.
    """

    @classmethod
    def setUpClass(cls) -> None:
        require_ipv6()
        cls.stack = stack = Stack("gw-ipv6-backend-")
        cls.dovecot = stack.start(DovecotSandbox(stack.path("dovecot"), USERS, host="::1",
                                                 trusted_networks="127.0.0.0/8 ::1"))
        cls.postfix = stack.start(PostfixSandbox(stack.path("postfix"), host="::1", xclient_hosts="[::1]/128"))
        cls.gateway = stack.start(GatewayProcess(
            stack.path("gateway"), listeners=("tcp:0:interface=127.0.0.1",), backend_host="::1", users=USERS,
            imap_backend_port=cls.dovecot.imap_port, imap_backend="forward_client_ip = false\ntimeout = 5",
            pop3_backend_port=cls.dovecot.pop3_port, pop3_backend="forward_client_ip = true\ntimeout = 5",
            submission_backend_port=cls.postfix.smtp_port, submission_backend='login = "xclient"\ntimeout = 5',
            certificate=stack.certificate.chain_path, private_key=stack.certificate.key_path,
        ))

    @classmethod
    def tearDownClass(cls) -> None:
        cls.stack.stop()

    def test_imap(self) -> None:
        """An IMAPS login reaches Dovecot on ::1, which sees the gateway connect from ::1."""
        client = imaplib.IMAP4_SSL("127.0.0.1", self.gateway.port("imap", "implicit_tls"),
                                   ssl_context=self.stack.tls(), timeout=15)
        self.assertEqual(client.login("alice@example.org", USERS["alice@example.org"])[0], "OK")
        self.assertEqual(client.select("INBOX")[0], "OK")
        client.logout()
        wait_for_file(self.dovecot.info_log_path,
                      r"imap-login: Info: Login: user=<alice@example\.org>, method=PLAIN, rip=::1, lip=::1,")

    def test_pop3(self) -> None:
        """A POP3S login reaches Dovecot on ::1, with the IPv4 client forwarded by XCLIENT."""
        client = poplib.POP3_SSL("127.0.0.1", self.gateway.port("pop3", "implicit_tls"),
                                 context=self.stack.tls(), timeout=15)
        client.user("bob@example.org")
        self.assertTrue(client.pass_(USERS["bob@example.org"]).startswith(b"+OK"))
        client.quit()
        wait_for_file(self.dovecot.info_log_path,
                      r"pop3-login: Info: Login: user=<bob@example\.org>, method=PLAIN, rip=127\.0\.0\.1,")

    def test_submission(self) -> None:
        """Mail reaches Postfix on ::1, which is told the IPv4 client by XCLIENT, and arrives."""
        client = smtplib.SMTP_SSL("127.0.0.1", self.gateway.port("submission", "implicit_tls"),
                                  context=self.stack.tls(), timeout=15)
        client.login("carol@example.org", USERS["carol@example.org"])
        self.assertEqual(client.sendmail("carol@example.org", ["to-v6-mta@example.org"],
                                         b"Subject: to an IPv6 MTA\r\n\r\nhello\r\n"), {})
        client.quit()
        self.postfix.wait_for_delivered("to-v6-mta", 1)
        wait_for_file(self.postfix.log_path,
                      r"client=unknown\[127\.0\.0\.1\], sasl_method=XCLIENT, sasl_username=carol@example\.org")


class IPv6ThrottlingTests(SynchronousTestCase):
    """
    Failed logins from ::1 count against its /64: past C{ip_failure_budget} the client is refused
    before any password is checked, and fail2ban's filter finds ::1 in the lines.
    """

    BUDGET = 3

    @classmethod
    def setUpClass(cls) -> None:
        require_ipv6()
        cls.stack = stack = Stack("gw-ipv6-throttle-")
        # Passwords are checked locally and every login here fails: the backend is never reached.
        cls.gateway = stack.start(GatewayProcess(
            stack.path("gateway"), listeners=(LOOPBACK6,), users=USERS,
            imap_backend_port=free_ports("127.0.0.1", 1)[0],
            certificate=stack.certificate.chain_path, private_key=stack.certificate.key_path,
            auth=f"ip_failure_budget = {cls.BUDGET}",
        ))

    @classmethod
    def tearDownClass(cls) -> None:
        cls.stack.stop()

    def test_failures_from_ipv6_throttled_and_matched(self) -> None:
        """
        BUDGET wrong passwords from ::1 are refused as such; the next login, even with the right
        password, is refused with [UNAVAILABLE]; login_throttled names client=::1 source=::/64,
        and fail2ban-regex extracts ::1 from every failure and from the throttled line.
        """
        port = self.gateway.listener_port("imap", "implicit_tls", "::1")
        replies = []
        for attempt in range(self.BUDGET + 1):
            client = imaplib.IMAP4_SSL("::1", port, ssl_context=self.stack.tls(), timeout=15)
            password = USERS["alice@example.org"] if attempt == self.BUDGET else f"wrong {attempt}"
            with self.assertRaises(imaplib.IMAP4.error) as caught:
                client.login("alice@example.org", password)
            replies.append(str(caught.exception))
            client.logout()
        self.assertEqual(["[AUTHENTICATIONFAILED]" in reply for reply in replies], [True] * self.BUDGET + [False])
        # Not "[UNAVAILABLE]" alone: a login let through would get that too, from the absent backend.
        self.assertIn("[UNAVAILABLE] Too many failed logins from your address", replies[-1])
        self.gateway.wait_for_log(rf"login_throttled client=::1 source=::/64 failures={self.BUDGET} window=600\n")
        self.gateway.wait_for_log(r'login_refused protocol=imap client=::1 user="alice@example\.org" reason=throttled')

        fail2ban_regex = require_tool("fail2ban-regex", "fail2ban")
        result = subprocess.run([fail2ban_regex, "-o", "ip", self.gateway.log_path, FILTER],
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        # One address per matched line: the failures and the throttled line.
        self.assertEqual(result.stdout.split(), ["::1"] * (self.BUDGET + 1), result.stdout)
