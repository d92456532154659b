"""An HTTPS email provider's call ends within its deadline as a whole, not per wait: a server that answers a
byte at a time, each within the per-read timeout, is cut at the deadline (a real server on loopback)."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from brownout._dispatch.outbox import EmailJob
from brownout._worker.email_delivery import Outcome
from brownout._worker.email_providers import ProviderTarget, provider_backend

BODY = b'{"id":"0f8fad5b-d9cb-469f-a165-70867728950e"}'


@pytest.fixture
def dripping_server() -> Iterator[int]:
    """Answers every request 200 with its body sent one byte every 0.2 s (about 9 s in all)."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, rest = data.partition(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
            while len(rest) < length:
                rest += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY))
            for byte in BODY:
                if stop.wait(0.2):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()


@pytest.mark.parametrize("provider", ["resend", "postmark"])
def test_a_dripping_answer_is_cut_at_the_deadline(dripping_server: int, provider: str) -> None:
    target = ProviderTarget.from_url(f"{provider}://test-key-0123456789?base_url=http://127.0.0.1:{dripping_server}")
    backend = provider_backend(target, timeout=1.0)
    job = EmailJob(outbox_id=uuid.uuid4(), entity_id=uuid.uuid4(), to="ada@example.com", subject="Welcome", body="Hello")
    started = time.monotonic()
    try:
        delivery = backend.send(job, "Brownout <noreply@example.com>")
    finally:
        backend.close()
    elapsed = time.monotonic() - started
    assert delivery.outcome is Outcome.FAILED_TRANSIENT, delivery
    assert "deadline" in delivery.reason
    assert elapsed < 2.5, f"the call took {elapsed:.1f} s against a 1 s deadline"
