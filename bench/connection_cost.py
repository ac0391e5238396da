"""
What one bare TLS connection costs the gateway's process in CPU, against servers that do less
around the same OpenSSL: what a TLS transport of the gateway's own could save at most.

    .venv/bin/python bench/connection_cost.py [--rounds 5] [--seconds 8]

``openssl s_time -new`` makes connections one after the other (a full TLS 1.3 handshake, then a
close, no login) to each server in turn, round after round, and each server's CPU time
(``/proc/PID/stat``) over the connections it served gives its CPU per connection. Every server
uses the gateway's own TLS context (``gateway.tls.ServerTLS``, an ECDSA P-256 certificate),
sends an IMAP-like greeting after the handshake, and closes when the client does:

- ``socket``: an epoll loop in Python with OpenSSL on the socket, as nginx and stunnel use it;
- ``memory-bios``: the same loop feeding OpenSSL through memory BIOs, as Twisted does;
- ``twisted-minimal``: Twisted's reactor and TCP connections, with a protocol that does only the
  handshake and the greeting over memory BIOs;
- ``twisted-tls``: Twisted's TLS layer (``TLSMemoryBIOProtocol``) on the same;
- ``gateway``: the gateway under twistd, as ``bench/run.sh`` runs it, with its IMAPS listener
  (three log lines per connection, admission, timers).

The first two also write a log line at each step, to ``/dev/null``. Prints one Markdown table:
median and range over the rounds.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from OpenSSL import SSL

SOURCE_TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, SOURCE_TREE)

from gateway.testing.host import accepts, free_ports  # noqa: E402  (from this source tree)
from gateway.testing.pki import TestCA  # noqa: E402

_GREETING = b"* OK ready\r\n"
_KINDS = ("socket", "memory-bios", "twisted-minimal", "twisted-tls")
_CLOSED = (SSL.ZeroReturnError, SSL.SysCallError, SSL.Error, OSError)


def _context(chain: str, key: str) -> SSL.Context:
    from gateway.tls import ServerTLS
    return ServerTLS(chain, key, b"imap")._context


def _listening(port: int) -> socket.socket:
    listening = socket.socket()
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listening.bind(("127.0.0.1", port))
    listening.listen(128)
    listening.setblocking(False)
    return listening


def _serve_epoll(context: SSL.Context, port: int, on_socket: bool) -> None:
    """An epoll loop: OpenSSL on each socket, or fed through memory BIOs."""
    listening = _listening(port)
    poller = select.epoll()
    poller.register(listening.fileno(), select.EPOLLIN)
    connections: dict[int, tuple[socket.socket, SSL.Connection]] = {}
    greeted: set[int] = set()
    log = open(os.devnull, "w")

    def send_pending(sock: socket.socket, tls: SSL.Connection) -> None:
        if on_socket:
            return
        try:
            sock.send(tls.bio_read(65536))
        except (SSL.WantReadError, OSError):
            pass

    print("ready", flush=True)
    while True:
        for fd, _ in poller.poll():
            if fd == listening.fileno():
                try:
                    sock, peer = listening.accept()
                except BlockingIOError:
                    continue
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                tls = SSL.Connection(context, sock if on_socket else None)
                tls.set_accept_state()
                connections[sock.fileno()] = (sock, tls)
                poller.register(sock.fileno(), select.EPOLLIN)
                log.write(f"connect client={peer[0]} port={peer[1]}\n")
                log.flush()
                continue
            sock, tls = connections[fd]
            try:
                if not on_socket:
                    data = sock.recv(65536)
                    if not data:
                        raise OSError("closed")
                    tls.bio_write(data)
                if fd not in greeted:
                    tls.do_handshake()
                    greeted.add(fd)
                    log.write(f"tls version={tls.get_protocol_version_name()} cipher={tls.get_cipher_name()}\n")
                    log.flush()
                    tls.send(_GREETING)
                else:
                    tls.recv(4096)
                send_pending(sock, tls)
                continue
            except SSL.WantReadError:
                send_pending(sock, tls)
                continue
            except _CLOSED:
                pass
            poller.unregister(fd)
            del connections[fd]
            greeted.discard(fd)
            sock.close()
            log.write("disconnect\n")
            log.flush()


def _serve_twisted(context: SSL.Context, port: int, minimal: bool) -> None:
    """Twisted's epoll reactor: a minimal TLS protocol, or Twisted's TLS layer."""
    from twisted.internet import epollreactor
    epollreactor.install()
    from twisted.internet import protocol, reactor
    from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
    from twisted.protocols.tls import TLSMemoryBIOFactory
    from zope.interface import implementer

    class Greeter(protocol.Protocol):
        def connectionMade(self) -> None:
            self.transport.write(_GREETING)

    class MinimalTLS(protocol.Protocol):
        greeted = False

        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)
            self.tls = SSL.Connection(context, None)
            self.tls.set_accept_state()

        def dataReceived(self, data: bytes) -> None:
            self.tls.bio_write(data)
            try:
                if not self.greeted:
                    self.tls.do_handshake()
                    self.greeted = True
                    self.tls.send(_GREETING)
                else:
                    self.tls.recv(4096)
            except SSL.WantReadError:
                pass
            except _CLOSED:
                self.transport.loseConnection()
                return
            try:
                self.transport.write(self.tls.bio_read(65536))
            except SSL.WantReadError:
                pass

    @implementer(IOpenSSLServerConnectionCreator)
    class Creator:
        def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
            return SSL.Connection(context, None)

    if minimal:
        factory: protocol.Factory = protocol.Factory.forProtocol(MinimalTLS)
    else:
        factory = TLSMemoryBIOFactory(Creator(), False, protocol.Factory.forProtocol(Greeter))
    reactor.listenTCP(port, factory, interface="127.0.0.1")
    print("ready", flush=True)
    reactor.run()


def serve(kind: str, chain: str, key: str, port: int) -> None:
    """Run one of the bare servers (this script, started again by :func:`main`)."""
    context = _context(chain, key)
    if kind in ("socket", "memory-bios"):
        _serve_epoll(context, port, on_socket=kind == "socket")
    else:
        _serve_twisted(context, port, minimal=kind == "twisted-minimal")


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _connections(port: int, seconds: int) -> int:
    done = subprocess.run(["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-time", str(seconds)],
                          capture_output=True, text=True)
    made = re.search(r"(\d+) connections in [\d.]+ real", done.stdout)
    if made is None:
        raise RuntimeError(f"openssl s_time against port {port} failed: {done.stdout[-300:]} {done.stderr[-300:]}")
    return int(made.group(1))


def _gateway(directory: str, chain: str, key: str, port: int) -> subprocess.Popen[bytes]:
    config = os.path.join(directory, "gateway.toml")
    with open(config, "w") as f:
        f.write(f"""\
[gateway]
hostname = "localhost"
state_dir = "{directory}/state"

[tls]
certificate = "{chain}"
private_key = "{key}"

[auth]
mode = "backend"

[limits]
max_connections_per_ip = 100000

[imap]
implicit_tls = ["tcp:{port}:interface=127.0.0.1"]
[imap.backend]
port = 9
""")
    # twistd as the harness runs it, on this source tree's gateway rather than the one installed in .venv.
    return subprocess.Popen([sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "--nodaemon",
                             "--pidfile=", "mailgateway", "--config", config], cwd=SOURCE_TREE,
                            stdout=open(os.path.join(directory, "gateway.log"), "wb"), stderr=subprocess.STDOUT)


def _wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        if accepts("127.0.0.1", port):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=8, help="of connections per server and round")
    parser.add_argument("--serve", nargs=4, metavar=("KIND", "CHAIN", "KEY", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        kind, chain, key, port = args.serve
        serve(kind, chain, key, int(port))
        return
    with tempfile.TemporaryDirectory(prefix="connection-cost-") as directory:
        leaf = TestCA(os.path.join(directory, "ca")).issue("localhost", "127.0.0.1")
        servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
        ports = iter(free_ports("127.0.0.1", len(_KINDS) + 1))
        try:
            for kind, port in zip(_KINDS, ports):
                process = subprocess.Popen([sys.executable, __file__, "--serve", kind, leaf.chain_path,
                                            leaf.key_path, str(port)], stdout=subprocess.DEVNULL)
                servers[kind] = (process, port)
            port = next(ports)
            servers["gateway"] = (_gateway(directory, leaf.chain_path, leaf.key_path, port), port)
            for process, port in servers.values():
                _wait_listening(port, process)
            spent: dict[str, list[float]] = {kind: [] for kind in servers}
            for _ in range(args.rounds):
                for kind, (process, port) in servers.items():
                    _connections(port, 1)  # warm
                    before = _cpu_seconds(process.pid)
                    made = _connections(port, args.seconds)
                    spent[kind].append((_cpu_seconds(process.pid) - before) / made * 1e6)
        finally:
            for process, _ in servers.values():
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
    print(f"{args.rounds} rounds of {args.seconds} s each, CPU per connection in us, median [range]\n")
    print("| server | CPU per connection |")
    print("|---|---|")
    for kind, values in spent.items():
        print(f"| {kind} | {statistics.median(values):.0f} [{min(values):.0f}-{max(values):.0f}] |")


if __name__ == "__main__":
    main()
