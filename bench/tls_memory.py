"""
What one server-side TLS connection costs in memory on the OpenSSL beneath pyOpenSSL, before the
gateway adds anything: the floor under ``bench/idle_capacity.py``'s figure per session.

    .venv/bin/python bench/tls_memory.py        # the OpenSSL of the cryptography wheel, the gateway's
    /usr/bin/python3 bench/tls_memory.py        # Debian's OpenSSL (apt-get install python3-openssl)

Each measurement is a fresh process. It accepts N connections from a child process (Python's
``ssl``, which offers TLS 1.3 with an X25519 key share), completes each handshake with a context
set up as the gateway's is (``SSL_MODE_RELEASE_BUFFERS``, an ECDSA P-256 certificate, a session
id context and an ALPN callback), keeps every connection, and reports the growth of its PSS per
connection past the first 50. Two ways of feeding OpenSSL are measured, alternating: memory BIOs,
as Twisted's TLS layer does (swapped for fresh ones after the handshake, as the relay does), and
OpenSSL on the socket, as nginx and stunnel do. Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import resource
import socket
import ssl
import statistics
import subprocess
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from OpenSSL._util import lib as _lib

_WARM = 50  # connections made before the baseline is read


def _context() -> SSL.Context:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now)
                   .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    context.set_session_id(b"tls-memory")
    context.set_alpn_select_callback(lambda connection, offered: b"imap")
    context.use_certificate(crypto.X509.from_cryptography(certificate))
    context.use_privatekey(crypto.PKey.from_cryptography_key(key))
    return context


def _over_memory_bios(context: SSL.Context, sock: socket.socket) -> SSL.Connection:
    connection = SSL.Connection(context, None)
    connection.set_accept_state()
    while True:
        try:
            connection.do_handshake()
            break
        except SSL.WantReadError:
            _flush(connection, sock)
            connection.bio_write(sock.recv(65536))
    _flush(connection, sock)  # the session tickets
    # What gateway.tls.release_tls_buffers does once the relay starts.
    into, out = _lib.BIO_new(_lib.BIO_s_mem()), _lib.BIO_new(_lib.BIO_s_mem())
    _lib.SSL_set_bio(connection._ssl, into, out)
    connection._into_ssl, connection._from_ssl = into, out
    return connection


def _flush(connection: SSL.Connection, sock: socket.socket) -> None:
    while True:
        try:
            sock.sendall(connection.bio_read(65536))
        except SSL.WantReadError:
            return


def _on_socket(context: SSL.Context, sock: socket.socket) -> SSL.Connection:
    connection = SSL.Connection(context, sock)
    connection.set_accept_state()
    connection.do_handshake()
    return connection


def _pss_kib() -> int:
    with open("/proc/self/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise RuntimeError("no Pss in /proc/self/smaps_rollup")


def _clients(port: int, count: int, ready: int) -> None:
    """In the child: open ``count`` TLS connections, say so, and hold them until killed."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["imap"])
    held = [context.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
            for _ in range(count)]
    os.write(ready, b"%d %s %s" % (len(held), held[-1].version().encode(), held[-1].cipher()[0].encode()))
    os.pause()


def measure(way: str, count: int) -> None:
    """Accept ``count`` connections fed ``way``; print KiB per connection, TLS version and cipher."""
    handshake = {"bios": _over_memory_bios, "socket": _on_socket}[way]
    context = _context()
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(count)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_end)
        try:
            _clients(listening.getsockname()[1], count, write_end)
        finally:
            os._exit(1)
    os.close(write_end)
    held = []
    baseline = 0
    try:
        for index in range(count):
            if index == _WARM:
                gc.collect()
                baseline = _pss_kib()
            sock, _ = listening.accept()
            held.append((sock, handshake(context, sock)))
        report = os.read(read_end, 200).decode()
        gc.collect()
        grown = _pss_kib() - baseline
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
    print(f"{grown / (count - _WARM):.2f} {report}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--measure", choices=("bios", "socket"), help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if arguments.measure:
        measure(arguments.measure, arguments.connections)
        return
    figures: dict[str, list[float]] = {"bios": [], "socket": []}
    negotiated = ""
    for _ in range(arguments.rounds):
        for way in figures:
            out = subprocess.run([sys.executable, __file__, "--measure", way, "--connections",
                                  str(arguments.connections)], check=True, capture_output=True, text=True).stdout
            kib, opened, version, cipher = out.split()
            if int(opened) != arguments.connections:
                raise SystemExit(f"only {opened} of {arguments.connections} connections opened")
            figures[way].append(float(kib))
            negotiated = f"{version} {cipher}"
    print(f"{SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode()}, pyOpenSSL, {arguments.connections} connections, "
          f"{negotiated}, clients on Python's ssl ({ssl.OPENSSL_VERSION})\n")
    print("| OpenSSL fed through | KiB per connection, median [range] |\n|---|---|")
    for way, label in (("bios", "memory BIOs (Twisted)"), ("socket", "the socket (nginx, stunnel)")):
        values = figures[way]
        print(f"| {label} | {statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}] |")


if __name__ == "__main__":
    main()
