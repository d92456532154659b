"""A request head (request line and headers) longer than BROWNOUT_MAX_HEAD_BYTES, on the web dyno as the Procfile
starts it: 431 once that much has arrived, before the rest is read or parsed, and the connection closed; heads up to
the limit, keep-alive and pipelined requests go on as before. Real sockets against the real uvicorn process."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import uvicorn

from bench.chaoskit.processes import procfile
from brownout._settings import Settings
from brownout.cli import WEB_HTTP_PROTOCOL
from tests.support.api_server import free_port, settings_env
from tests.support.polling import wait_until
from tests.support.processes import stop

MB = 1024 * 1024
START = b"GET /health HTTP/1.1\r\nHost: x\r\n"


@contextmanager
def web(settings: Settings) -> Iterator[tuple[int, int]]:
    """The Procfile's web line with one process (the one the port is on): its port and pid."""
    port = free_port()
    fields = {name: getattr(settings, name) for name in type(settings).model_fields} | {"web_processes": 1}
    env = settings_env(fields) | {"PORT": str(port)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    process = subprocess.Popen(procfile()["web"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: _answers(port), timeout=60), "the web dyno did not start"
        yield port, process.pid
    finally:
        stop(process, grace=30)


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        time.sleep(0.1)
        return False


def head_of(size: int, start: bytes = START) -> bytes:
    """A GET head of exactly *size* bytes, its headers 4000 bytes at most each (under BROWNOUT_MAX_HEADER_BYTES)."""
    lines = [start]
    fill = size - len(start) - 2
    while fill > 0:
        n = min(4000, fill)
        if 0 < fill - n < 20:
            n = fill - 20
        lines.append(b"X-Pad-%06d: %s\r\n" % (len(lines), b"v" * (n - 16)))
        fill -= n
    head = b"".join([*lines, b"\r\n"])
    assert len(head) == size
    return head


def many_small_headers(size: int) -> bytes:
    """The reviewer's head: *size* bytes of 62-byte headers, each well under every per-header bound."""
    count = size // 62
    return START + b"".join(b"X-H%07d: %s\r\n" % (i, b"v" * 49) for i in range(count)) + b"\r\n"


def read_response(stream: BinaryIO) -> tuple[int, dict[str, str], bytes]:
    status_line = stream.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers: dict[str, str] = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = stream.read(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


def send_until_refused(conn: socket.socket, data: bytes) -> None:
    """Send *data*; the server may close the connection before it is all sent."""
    try:
        conn.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def refused(status: int, headers: dict[str, str], body: bytes, limit: int) -> None:
    assert status == 431, (status, body[:200])
    assert json.loads(body) == {"detail": f"request head longer than {limit} bytes"}
    assert headers["connection"] == "close" and headers["content-type"] == "application/json"


def closed(stream: BinaryIO) -> bool:
    try:
        return stream.read(1) == b""
    except ConnectionResetError:
        return True


def exchange(port: int, *parts: bytes, responses: int = 1, pause: float = 0.0) -> list[tuple[int, dict[str, str], bytes]]:
    """Send *parts* on one connection (each its own write, *pause* apart) and read *responses* responses."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn, conn.makefile("rb") as stream:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for part in parts:
            send_until_refused(conn, part)
            time.sleep(pause)
        return [read_response(stream) for _ in range(responses)]


def test_a_head_of_many_small_headers_over_the_limit_is_refused_early_and_costs_no_memory(
    api_settings: Callable[..., Settings],
) -> None:
    settings = api_settings()
    limit = settings.max_head_bytes
    attack = many_small_headers(40 * MB)
    with web(settings) as (port, pid):
        exchange(port, head_of(1000))  # warm: the first request's imports and caches are not the attack's
        peak_before = memory_kib(pid, "VmHWM")
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn, conn.makefile("rb") as stream:
            sender = threading.Thread(target=send_until_refused, args=(conn, attack), daemon=True)
            sender.start()
            status, headers, body = read_response(stream)
            answered = time.monotonic() - started
            assert closed(stream)
            sender.join(timeout=30)
        grown_mb = (memory_kib(pid, "VmHWM") - peak_before) / 1024
        refused(status, headers, body, limit)
        assert answered < 2.0, f"answered after {answered:.2f} s"
        assert grown_mb < 20, f"the web's peak memory grew by {grown_mb:.0f} MB"
        assert exchange(port, head_of(1000))[0][0] == 200  # the web goes on answering


def test_heads_up_to_the_limit_pass_and_one_byte_more_is_refused(api_settings: Callable[..., Settings]) -> None:
    settings = api_settings()
    limit = settings.max_head_bytes
    with web(settings) as (port, _):
        assert exchange(port, head_of(limit))[0][0] == 200
        refused(*exchange(port, head_of(limit + 1))[0], limit)
        # in small pieces, each its own read on the server: counted across them
        pieces = [head_of(limit)[i : i + 5000] for i in range(0, limit, 5000)]
        assert exchange(port, *pieces, pause=0.01)[0][0] == 200
        over = head_of(limit + 1)
        refused(*exchange(port, *[over[i : i + 5000] for i in range(0, limit + 1, 5000)], pause=0.01)[0], limit)


def test_keep_alive_and_pipelined_requests_are_counted_one_head_at_a_time(api_settings: Callable[..., Settings]) -> None:
    settings = api_settings()
    limit = settings.max_head_bytes
    with web(settings) as (port, _):
        # keep-alive: request after request on one connection, each head near the limit, none cut
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn, conn.makefile("rb") as stream:
            for _ in range(5):
                conn.sendall(head_of(limit - 100))
                status, headers, _body = read_response(stream)
                assert status == 200 and headers.get("connection") != "close"
        # pipelined in one write: three heads near the limit, a POST whose body runs into the next head
        near = head_of(limit - 100)
        post = b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 30000\r\n\r\n" + b"b" * 30000
        answers = exchange(port, near + near + post + near, responses=4)
        assert [status for status, _, _ in answers] == [200, 200, 405, 200]
        # the same in pieces that cut heads and the body anywhere
        burst = near + post + near + near
        answers = exchange(port, *[burst[i : i + 7777] for i in range(0, len(burst), 7777)], responses=4, pause=0.005)
        assert [status for status, _, _ in answers] == [200, 405, 200, 200]
        # a pipelined head over the limit after good requests: they are answered, it is refused
        for after in (near + near, post):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn, conn.makefile("rb") as stream:
                sender = threading.Thread(target=send_until_refused, args=(conn, after + many_small_headers(4 * MB)))
                sender.start()
                statuses = [read_response(stream) for _ in range(after.count(b"HTTP/1.1\r\n") + 1)]
                sender.join(timeout=30)
            assert [status for status, _, _ in statuses[:-1]] in ([200, 200], [405])
            refused(*statuses[-1], limit)


# The protocol alone, in a uvicorn of the test process serving a bare ASGI app: the cases the API cannot set up.

SMALL = 4096


async def echo(scope: dict[str, Any], receive: Callable[[], Any], send: Callable[[dict[str, Any]], Any]) -> None:
    """Answers each request with what it saw: path, body length, number of headers; /slow after 0.3 s."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/slow":
        await asyncio.sleep(0.3)
    out = json.dumps({"path": scope["path"], "body": len(body), "headers": len(scope["headers"])}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})


@contextmanager
def protocol_server(http: str = WEB_HTTP_PROTOCOL) -> Iterator[int]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    config = uvicorn.Config(echo, http=http, h11_max_incomplete_event_size=SMALL, log_level="critical", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: server.started, timeout=10), "uvicorn did not start"
        yield listener.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        listener.close()


def test_a_head_over_the_limit_behind_a_slow_request_is_refused_after_its_answer() -> None:
    with protocol_server() as port:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn, conn.makefile("rb") as stream:
            started = time.monotonic()
            conn.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n" + head_of(SMALL + 1))
            slow = read_response(stream)
            refusal = read_response(stream)
            assert closed(stream)
        assert slow[0] == 200 and json.loads(slow[2])["path"] == "/slow"
        assert time.monotonic() - started >= 0.25  # after the slow answer (its 0.3 s sleep; the loop may wake a hair early)
        refused(*refusal, SMALL)


def test_a_head_after_a_chunked_body_in_the_same_read_is_answered() -> None:
    chunked = b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n"
    after = b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n"
    with protocol_server() as port:
        answers = exchange(port, chunked + after, responses=2)
        assert [json.loads(body) for _, _, body in answers] == [
            {"path": "/up", "body": 8, "headers": 2},
            {"path": "/after", "body": 0, "headers": 1},
        ]
        # the same cut anywhere: a byte at a time
        whole = chunked + after
        answers = exchange(port, *[whole[i : i + 1] for i in range(len(whole))], responses=2, pause=0.001)
        assert [status for status, _, _ in answers] == [200, 200]


def test_blank_lines_before_a_request_count_towards_its_head() -> None:
    with protocol_server() as port:
        assert exchange(port, b"\r\n" * 100 + head_of(SMALL - 200))[0][0] == 200
        refused(*exchange(port, b"\r\n" * (SMALL // 2 + 1))[0], SMALL)
        refused(*exchange(port, b"\r\n" * 100 + head_of(SMALL - 199))[0], SMALL)


def test_with_h11_the_same_limit_bounds_the_head() -> None:
    with protocol_server(http="h11") as port:
        assert exchange(port, head_of(SMALL - 100))[0][0] == 200
        status, _, _ = exchange(port, many_small_headers(MB))[0]
        assert 400 <= status < 500


def test_the_rest_of_a_read_after_a_declined_upgrade_is_dropped_as_plain_uvicorn_drops_it() -> None:
    """Bytes after a head asking for an upgrade uvicorn does not perform (here the body a proxy in front would take
    for this request's) are not a request of their own: cut at the head and fed on, they were parsed as one."""
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    upgrade = b"POST /u HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: foo\r\nContent-Length: %d\r\n\r\n"
    for http in ("httptools", WEB_HTTP_PROTOCOL):
        with protocol_server(http) as port, socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(upgrade % len(smuggled) + smuggled)
            conn.settimeout(1.0)
            answered = b""
            try:
                while chunk := conn.recv(65536):
                    answered += chunk
            except TimeoutError:
                pass
            assert b"/u" in answered and b"/smuggled" not in answered, (http, answered)


def test_a_head_after_a_chunked_body_is_never_charged_for_the_body() -> None:
    """The framing of a long chunked upload, read with the next head, counted towards that head (a false 431)."""
    chunks = b"".join(b"1\r\nx\r\n" for _ in range(SMALL // 6 + 100)) + b"0\r\n\r\n"
    upload = b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
    following = head_of(SMALL // 2, b"GET /next HTTP/1.1\r\n")
    with protocol_server() as port:  # the next head begins in the upload's read and ends in the next one
        answers = exchange(port, upload + following[:100], following[100:], responses=2, pause=0.2)
        assert [status for status, _, _ in answers] == [200, 200]
