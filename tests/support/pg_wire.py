"""What a PostgreSQL client sends, read off the wire: its simple-protocol queries, one per round trip.

Used as a FaultProxy's `on_client_bytes` between a client with `sslmode=disable` and the server, so a test
counts the round trips a piece of code really costs, whatever the driver or SQLAlchemy believe."""

from __future__ import annotations

import threading

_SSL_OR_GSS_REQUEST = {80877103, 80877104}  # sent before the startup message; answered with one byte


class FrontendMessages:
    """Parses each client stream into messages; `queries` are the texts of its Query ('Q') messages."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[object, bytes] = {}
        self._started: set[object] = set()
        self.queries: list[str] = []

    def __call__(self, stream: object, data: bytes) -> None:
        with self._lock:
            buffer = self._pending.get(stream, b"") + data
            while True:
                if stream not in self._started:  # length (4 bytes, itself included), then a code
                    if len(buffer) < 8 or len(buffer) < int.from_bytes(buffer[:4], "big"):
                        break
                    length = int.from_bytes(buffer[:4], "big")
                    if int.from_bytes(buffer[4:8], "big") not in _SSL_OR_GSS_REQUEST:
                        self._started.add(stream)
                    buffer = buffer[length:]
                    continue
                if len(buffer) < 5:  # type byte, then length (4 bytes, itself included)
                    break
                length = int.from_bytes(buffer[1:5], "big")
                if len(buffer) < 1 + length:
                    break
                kind, body, buffer = buffer[:1], buffer[5 : 1 + length], buffer[1 + length :]
                if kind == b"Q":
                    self.queries.append(body.rstrip(b"\0").decode())
            self._pending[stream] = buffer

    def take(self) -> list[str]:
        """The queries sent since the last take."""
        with self._lock:
            taken, self.queries = self.queries, []
            return taken
