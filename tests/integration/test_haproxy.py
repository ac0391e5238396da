"""
The gateway behind a real HAProxy: a private HAProxy in TCP mode with the PROXY protocol (v2 and
v1) and health checks, as etc/haproxy.cfg has it, in front of the gateway's haproxy: listeners
and a private Dovecot. Clients connect from 127.0.0.3 to HAProxy on 127.0.0.2; HAProxy reaches the
gateway from 127.0.0.1, its only proxy source: a log line naming 127.0.0.3 names the client, one
naming 127.0.0.1 names HAProxy.
"""

from __future__ import annotations

import imaplib
import os
import re
import shutil
import socket
import subprocess
import time

from twisted.trial.unittest import SynchronousTestCase

from gateway.testing.dovecot import DovecotSandbox
from gateway.testing.gateway import SOURCE_TREE, GatewayProcess
from gateway.testing.host import end_process, free_ports

from .stack import Stack, require_tool
from .test_submission_gateway import wait_for_file

USER, PASSWORD = "alice", "alice-password"
FRONT = "127.0.0.2"  # HAProxy's listening address, the name clients use
CLIENT = "127.0.0.3"  # the real client's address
BALANCER = "127.0.0.1"  # HAProxy's address towards the gateway: [limits] proxy_sources
EXAMPLE = os.path.join(SOURCE_TREE, "etc", "haproxy.cfg")
# Dovecot's login line with the client's port too, so that each test finds its own login.
LOGIN_LOG = "login_log_format_elements = user=<%u> method=%m rip=%r rport=%{rport} lip=%l mpid=%e %c session=<%{session}>\n"

# The gateway's lines about a connection that failed or was refused, timed out or was throttled.
TROUBLE = re.compile(r"\b(?:proxy_refused|proxy_header_timeout|connection_refused|tls_failed|timeout|login_failed|"
                     r"login_refused|login_throttled|http_on_mail_port)\b")


# The backend lines of etc/haproxy.cfg's checks: each waits for the greeting.
CHECK_GREETING = '    option tcp-check\n    tcp-check expect string "* OK"'


def haproxy_binary() -> str:
    """HAProxy's path; Debian installs it in /usr/sbin, which a user's PATH may leave out."""
    found = shutil.which("haproxy", path=os.environ.get("PATH", os.defpath) + os.pathsep + "/usr/sbin")
    return found or require_tool("haproxy", "haproxy")


class HAProxy:
    """
    A private HAProxy in the foreground (C{-db}) with its own configuration, stats socket and log.

    :param backends: frontend name -> (frontend port on L{FRONT} or a UNIX socket's path, gateway
        port, server options, the backend's check lines).
    """

    def __init__(self, directory: str, backends: dict[str, tuple[int | str, int, str, str]]) -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.config_path = os.path.join(directory, "haproxy.cfg")
        self.log_path = os.path.join(directory, "haproxy.log")
        self.socket_path = os.path.join(directory, "stats.sock")
        self.backends = backends
        self._process: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        # defaults as in etc/haproxy.cfg; checks every 300 ms instead of every 2 s, so that a
        # few run within a second.
        text = f"""\
global
    log stdout format raw local0 info
    stats socket {self.socket_path} level admin

defaults
    mode tcp
    log global
    option tcplog
    source {BALANCER}
    timeout connect 5s
    timeout check 5s
    timeout client 35m
    timeout server 35m
"""
        for name, (port, gateway_port, options, checks) in self.backends.items():
            text += f"""
frontend {name}
    bind {f"unix@{port}" if isinstance(port, str) else f"{FRONT}:{port}"}
    default_backend gateway_{name}

backend gateway_{name}
{checks}
    server gw1 {BALANCER}:{gateway_port} {options} check inter 300ms
"""
        return text

    def start(self) -> None:
        """Start HAProxy and wait until its stats socket answers (every frontend is bound by then)."""
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(self.config())
        log = open(self.log_path, "ab")
        self._process = subprocess.Popen([haproxy_binary(), "-db", "-f", self.config_path], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self._process.poll() is None:
            try:
                self.servers()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"haproxy did not start; its output ends with:\n{self.log()[-2000:]}")

    def stop(self) -> None:
        """Stop HAProxy (SIGTERM, then SIGKILL after 10 s) and wait for it."""
        process, self._process = self._process, None
        end_process(process)

    def log(self) -> str:
        """What HAProxy has written: alerts, warnings and one line per connection."""
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def servers(self) -> dict[str, dict[str, str]]:
        """Backend name -> its server's row of C{show stat} (status, check_status, chkfail, ...)."""
        with socket.socket(socket.AF_UNIX) as stats:
            stats.settimeout(5)
            stats.connect(self.socket_path)
            stats.sendall(b"show stat\n")
            answer = b""
            while chunk := stats.recv(65536):
                answer += chunk
        header, *rows = answer.decode("ascii").splitlines()
        fields = header.lstrip("# ").split(",")
        table = [dict(zip(fields, row.split(","))) for row in rows if row]
        return {row["pxname"]: row for row in table if row["svname"] == "gw1"}


class _FromClient(imaplib.IMAP4):
    """IMAP from L{CLIENT}'s address (STARTTLS)."""

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, source_address=(CLIENT, 0))


class _FromClientTLS(imaplib.IMAP4_SSL):
    """IMAPS from L{CLIENT}'s address."""

    def _create_socket(self, timeout: float | None) -> socket.socket:
        raw = socket.create_connection((self.host, self.port), timeout, source_address=(CLIENT, 0))
        return self.ssl_context.wrap_socket(raw, server_hostname=self.host)


class HAProxyFixture(SynchronousTestCase):
    """A Dovecot, the gateway with haproxy: listeners, and a private HAProxy with L{frontends}."""

    @classmethod
    def frontends(cls, gateway: GatewayProcess, stack: Stack) -> dict[str, tuple[int | str, int, str, str]]:
        """HAProxy's frontends (see L{HAProxy}), in front of C{gateway}."""
        raise NotImplementedError

    @classmethod
    def setUpClass(cls) -> None:
        binary = haproxy_binary()  # before anything starts: a missing HAProxy fails saying what to install
        cls.stack = stack = Stack("gw-haproxy-")
        try:
            cls.binary = binary
            # A certificate for the name clients use: HAProxy's address, not the gateway's.
            certificate = stack.ca.issue(FRONT)
            cls.dovecot = stack.start(DovecotSandbox(stack.path("dovecot"), {USER: PASSWORD}, extra_config=LOGIN_LOG))
            cls.gateway = stack.start(GatewayProcess(
                stack.path("gateway"), imap_backend_port=cls.dovecot.imap_port, users={USER: PASSWORD},
                certificate=certificate.chain_path, private_key=certificate.key_path, proxy=True, host=BALANCER,
                imap_backend="forward_client_ip = true", settings=f'[limits]\nproxy_sources = ["{BALANCER}/32"]',
            ))
            cls.haproxy = stack.start(HAProxy(stack.path("haproxy"), cls.frontends(cls.gateway, stack)))
        except BaseException:
            stack.stop()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        cls.stack.stop()

    def assert_client_logged_in(self, port: int) -> None:
        """The gateway's connect and login lines, and Dovecot's, name the client, not HAProxy."""
        self.gateway.wait_for_log(rf"connect protocol=imap client={re.escape(CLIENT)} port={port} ")
        self.gateway.wait_for_log(rf"login protocol=imap client={re.escape(CLIENT)} user=\"{USER}\"")
        # forward_client_ip: the gateway's ID command hands Dovecot the address from the header.
        wait_for_file(self.dovecot.info_log_path,
                      rf"Login: user=<{USER}>, method=PLAIN, rip={re.escape(CLIENT)}, rport={port},")


class HAProxyTests(HAProxyFixture):
    """
    IMAPS through HAProxy with send-proxy-v2 and IMAP STARTTLS through HAProxy with send-proxy
    (v1), each with HAProxy's health checks on; the example configuration is valid.
    """

    @classmethod
    def frontends(cls, gateway: GatewayProcess, stack: Stack) -> dict[str, tuple[int | str, int, str, str]]:
        cls.imaps_port, cls.imap_port = free_ports(FRONT, 2)
        return {
            # As etc/haproxy.cfg has it: a check that waits for the greeting, over TLS.
            "imaps": (cls.imaps_port, gateway.port("imap", "implicit_tls"), "send-proxy-v2 check-ssl verify none",
                      CHECK_GREETING),
            # v1, and a layer-4 check (connect, then reset).
            "imap": (cls.imap_port, gateway.port("imap", "starttls"), "send-proxy", ""),
        }

    def assert_servers_up(self) -> None:
        """
        Once checked, each backend's server is up, its last check passed and none failed: the
        greeting came (L7OK) where the check waits for it.

        A server starts as C{UP 1/3} with its check at C{* INI} (C{* } marks a check in progress:
        C{* L7OK} is one running after a pass), and shows C{UP} once its checks have passed.
        """

        def settled(server: dict[str, str]) -> bool:
            return server["status"] == "UP" and _last_check(server) != "INI"

        deadline = time.monotonic() + 10
        while not all(settled(server) for server in self.haproxy.servers().values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        servers = self.haproxy.servers()
        self.assertEqual(sorted(servers), ["gateway_imap", "gateway_imaps"])
        expected = {"gateway_imaps": "L7OK", "gateway_imap": "L4OK"}
        for backend, server in servers.items():
            self.assertEqual((backend, server["status"], _last_check(server), server["chkfail"]),
                             (backend, "UP", expected[backend], "0"), self.haproxy.log()[-2000:])

    def test_imaps_login_through_haproxy_v2(self) -> None:
        """
        An imaplib IMAPS login through HAProxy (send-proxy-v2) works, and the gateway logs the
        client's address and port, not HAProxy's.
        """
        client = _FromClientTLS(FRONT, self.imaps_port, ssl_context=self.stack.tls(), timeout=30)
        port = client.sock.getsockname()[1]
        self.assertEqual(client.login(USER, PASSWORD)[0], "OK")
        self.assertEqual(client.select("INBOX")[0], "OK")
        self.assertEqual(client.logout()[0], "BYE")
        self.assert_client_logged_in(port)

    def test_starttls_login_through_haproxy_v1(self) -> None:
        """An IMAP STARTTLS login through HAProxy (send-proxy, v1) works and names the client."""
        client = _FromClient(FRONT, self.imap_port, timeout=30)
        port = client.sock.getsockname()[1]
        self.assertEqual(client.starttls(self.stack.tls())[0], "OK")
        self.assertEqual(client.login(USER, PASSWORD)[0], "OK")
        self.assertEqual(client.logout()[0], "BYE")
        self.assert_client_logged_in(port)

    def test_health_checks(self) -> None:
        """
        HAProxy's checks find both listeners up. Those with a PROXY v2 LOCAL header (HAProxy's
        own connections), which get the greeting over TLS, leave no line in the gateway's log;
        v1 checks, which carry HAProxy's own address as if it were a client, are logged as
        connections that come and go. None is refused, failed or timed out.
        """
        self.assert_servers_up()
        # A few v1 checks have shown; the v2 checks run as often (every 300 ms).
        self.gateway.wait_for_log(rf"connect protocol=imap client={re.escape(BALANCER)} port=\d+ "
                                  rf"listener={self.gateway.port('imap', 'starttls')} ", count=4)
        self.assert_servers_up()
        balancer = re.compile(rf"\b(?:client|source)={re.escape(BALANCER)}\b")
        lines = [line for line in self.gateway.log().splitlines() if balancer.search(line)]
        self.assertEqual([line for line in lines if TROUBLE.search(line)], [])
        implicit = f"listener={self.gateway.port('imap', 'implicit_tls')} "
        self.assertEqual([line for line in lines if implicit in line], [])
        # The v1 checks: only connect and disconnect (no TLS handshake, no command, no login),
        # and no more disconnects than their connects (those of the v2 checks would be as many).
        events = [re.sub(r"^\S+ \[[^]]+\] (\S+) .*", r"\1", line) for line in lines]
        self.assertEqual(set(events), {"connect", "disconnect"})
        self.assertLessEqual(events.count("disconnect"), events.count("connect"))

    def test_example_config_valid(self) -> None:
        """
        etc/haproxy.cfg as shipped passes C{haproxy -c} with warnings as errors (-dW). The check
        neither binds :993 nor reaches its servers, so its addresses need not exist here.
        """
        result = subprocess.run([self.binary, "-c", "-dW", "-f", EXAMPLE], capture_output=True, text=True, timeout=30)
        self.assertEqual((result.returncode, result.stdout.strip()), (0, "Configuration file is valid"), result.stderr)


def _last_check(server: dict[str, str]) -> str:
    """The status of a server's last completed check, without the mark of one in progress."""
    return server["check_status"].removeprefix("* ")


class _FromUnixSocketTLS(imaplib.IMAP4_SSL):
    """IMAPS to HAProxy over a UNIX socket (C{host} is the socket's path)."""

    def _create_socket(self, timeout: float | None) -> socket.socket:
        raw = socket.socket(socket.AF_UNIX)
        raw.settimeout(timeout)
        raw.connect(self.host)
        return self.ssl_context.wrap_socket(raw, server_hostname=FRONT)


class UnixSocketClientTests(HAProxyFixture):
    """
    HAProxy relays a client that reached it over a UNIX socket with a PROXY v2 LOCAL header, the
    header of its own health checks: it has no address to tell.
    """

    @classmethod
    def frontends(cls, gateway: GatewayProcess, stack: Stack) -> dict[str, tuple[int | str, int, str, str]]:
        cls.socket_path = stack.path("imaps.sock")
        return {"imaps": (cls.socket_path, gateway.port("imap", "implicit_tls"), "send-proxy-v2 check-ssl verify none",
                          CHECK_GREETING)}

    def test_client_is_logged(self) -> None:
        """
        Unlike the checks, such a client is logged once it speaks (at HAProxy's address, the
        connection's own): its connect, TLS and login lines all appear, in that order.
        """
        client = _FromUnixSocketTLS(self.socket_path, ssl_context=self.stack.tls(), timeout=30)
        self.assertEqual(client.login(USER, PASSWORD)[0], "OK")
        self.assertEqual(client.logout()[0], "BYE")
        self.gateway.wait_for_log(rf"disconnect protocol=imap client={re.escape(BALANCER)} user=\"{USER}\"")
        lines = [line for line in self.gateway.log().splitlines() if f"client={BALANCER} " in line]
        events = [re.sub(r"^\S+ \[[^]]+\] (\S+) .*", r"\1", line) for line in lines]
        self.assertEqual(events, ["connect", "tls", "login", "disconnect"], "\n".join(lines))
