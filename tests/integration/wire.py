"""A raw line-oriented client socket, for the cases that library clients cannot express."""

from __future__ import annotations

import socket
import ssl


class Wire:
    """A blocking client connection with line reads and an optional TLS upgrade."""

    def __init__(self, port: int, *, tls: ssl.SSLContext | None = None, source: str | None = None,
                 timeout: float = 15.0, preface: bytes = b"") -> None:
        """:param preface: bytes sent first, before any TLS: a load balancer's PROXY header."""
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                       source_address=(source, 0) if source else None)
        raw.sendall(preface)
        self.sock: socket.socket = tls.wrap_socket(raw, server_hostname="127.0.0.1") if tls else raw
        self._buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        """The next line, with its CRLF; b"" when the server has closed (or reset) the connection."""
        while b"\n" not in self._buffer:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                rest, self._buffer = self._buffer, b""
                return rest
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line + b"\n"

    def exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self._buffer += chunk
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def until(self, prefix: bytes) -> list[bytes]:
        """Lines up to and including the first that starts with C{prefix}."""
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if not line or line.startswith(prefix):
                return lines

    def upgrade(self, tls: ssl.SSLContext) -> None:
        """Start TLS on the connection; fails if unread bytes are pending."""
        assert not self._buffer, self._buffer
        self.sock = tls.wrap_socket(self.sock, server_hostname="127.0.0.1")

    def close(self) -> None:
        self.sock.close()
