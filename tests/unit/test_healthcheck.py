"""The image's health check asks the endpoint of the process type run-procfile recorded, over real loopback HTTP."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


class _Handler(BaseHTTPRequestHandler):
    paths: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).paths.append(self.path)
        status = 200 if self.path in ("/health", "/metrics") else 404
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[int]:
    _Handler.paths = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def probe(tmp_path: Path, process_type: str | None, **env: str) -> int:
    type_file = tmp_path / "process-type"
    if process_type is not None:
        type_file.write_text(f"{process_type}\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "app.healthcheck"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "BROWNOUT_PROCESS_TYPE_FILE": str(type_file), **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return result.returncode


def test_the_web_is_alive_when_health_answers_on_its_port(tmp_path: Path, server: int) -> None:
    assert probe(tmp_path, "web", PORT=str(server)) == 0
    assert _Handler.paths == ["/health"]
    assert probe(tmp_path, "web", PORT=str(closed_port())) == 1


def test_the_worker_is_alive_when_its_metrics_answer(tmp_path: Path, server: int) -> None:
    # $PORT answering says nothing about a worker: only its metrics port counts.
    assert probe(tmp_path, "worker", PORT=str(server), BROWNOUT_METRICS_PORT=str(closed_port())) == 1
    assert probe(tmp_path, "worker", BROWNOUT_METRICS_PORT=str(server)) == 0
    assert _Handler.paths == ["/health"]


def test_a_release_job_is_healthy_while_it_runs(tmp_path: Path) -> None:
    assert probe(tmp_path, "release", PORT=str(closed_port())) == 0


def test_without_a_recorded_type_the_image_default_process_is_asked(tmp_path: Path, server: int) -> None:
    assert probe(tmp_path, None, PORT=str(server)) == 0
    assert _Handler.paths == ["/health"]
