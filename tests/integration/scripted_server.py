"""A loopback server that serves each connection on a thread of its own, for backends a test scripts."""

from __future__ import annotations

import socket
import threading


class ScriptedServer:
    """Accepts on 127.0.0.1 (a free port) until closed; a subclass's L{serve} speaks to each connection."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self.serve, args=(connection,), daemon=True).start()

    def serve(self, connection: socket.socket) -> None:
        """Speak to one connection, and close it."""
        raise NotImplementedError

    def close(self) -> None:
        self.listener.close()
