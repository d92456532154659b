"""The open-loop load generator of one step: `python -m bench.overloadkit.generator CONFIG.json`.

A child process, so its event loop shares no GIL with the parent's probes, and pinned to a core of its own
when the parent says so (`cpu`): the web process has another. Built as bench/readkit/load.py is, for its
cost per request (about a third of an asyncio-streams client's): uvloop, raw HTTP/1.1 keep-alive
connections as asyncio protocols, one request in flight on each, every request's bytes built before the
step starts, the answer parsed as a header search and a Content-Length (or a chunked body, read whole).

Requests are due at fixed intervals whatever the server does (open loop), and each latency is measured from
the request's scheduled time: a server that falls behind shows it in the latencies instead of slowing the
offered rate. At most `connections` connections (a client's pool: opened before the step, the last one
freed taken first, another opened when all are busy and the pool is not full, one idle over 2 s closed
before the server's keep-alive does). A due request that finds none free waits, first in first out, and
that wait is counted as sending late, in its latency, never dropped. Its deadline runs from the scheduled
time too, the wait included: at `timeout` it is given up (its connection closed), a client timeout.

uvloop's timers count whole milliseconds, so due requests are taken up when a timer fires (at most every
ms) or when an answer arrives, whichever comes first: how late that is behind the schedule is the
generator's own lag (each row's loop lag). Its CPU is reported for the step, and as a share of one core
while it was sending: near 100 % its own lag would be in the latencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import re
import resource
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, cast

from bench.overloadkit.mixes import Mix

# A row per request: kind, status (-1 client timeout, 0 connection error), shed (503 "overloaded"),
# stale, scheduled (s from the start), loop lag and send lag (ms after the scheduled time; send lag -1
# when it never got a connection), latency (ms from the scheduled time to the answer or the give-up).
Row = tuple[str, int, int, int, float, float, float, float]

CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)")
CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r]*chunked")
CONNECTION_CLOSE = b"\r\nconnection: close"
STALE = b"\r\nx-brownout: stale"
IDLE_SECONDS = 2.0  # a connection idle longer is closed, not reused (uvicorn closes them at 5 s)
SWEEP_SECONDS = 0.005  # how often requests past their deadline are looked for


def is_shed(status: int, body: bytes) -> bool:
    """A refusal by admission control: 503 with the JSON body's detail "overloaded"."""
    if status != 503 or b"overloaded" not in body:
        return False
    with contextlib.suppress(ValueError, AttributeError):
        return bool(json.loads(body).get("detail") == "overloaded")
    return False


def chunked_body(buffer: bytearray, start: int) -> tuple[int, bytes] | None:
    """A chunked body from *start*: (the index after it, its data), or None while incomplete."""
    data = bytearray()
    at = start
    while True:
        eol = buffer.find(b"\r\n", at)
        if eol < 0:
            return None
        size = int(bytes(buffer[at:eol]).split(b";")[0], 16)
        if size == 0:
            end = buffer.find(b"\r\n\r\n", eol)  # the last chunk, trailers (none expected), a blank line
            return None if end < 0 else (end + 4, bytes(data))
        at = eol + 2 + size + 2
        if at > len(buffer):
            return None
        data += buffer[eol + 2 : eol + 2 + size]


class Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time; its answer's status, stale flag and shed flag handed back."""

    def __init__(self, load: Load) -> None:
        self.load = load
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.need = -1  # bytes of the answer under way (head and body), -1 until its head is in
        self.head = b""
        self.body_at = 0  # where the answer's body starts in the buffer
        self.chunked = False
        self.request: tuple[int, float, float, float] | None = None  # index, scheduled, loop lag, send lag
        self.idle_since = 0.0
        self.dead = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass
        self.load.opened(self)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if self.need < 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head = bytes(buffer[:end]).lower()
            length = CONTENT_LENGTH.search(self.head)
            self.chunked = length is None and CHUNKED.search(self.head) is not None
            self.body_at = end + 4
            self.need = self.body_at + (int(length.group(1)) if length else 0)
        if self.chunked:
            found = chunked_body(buffer, self.body_at)
            if found is None:
                return
            end, body = found
        else:
            if len(buffer) < self.need:
                return
            end, body = self.need, b""
        head = self.head
        status = int(head[9:12])
        if status == 503 and not self.chunked:
            body = bytes(buffer[self.body_at : end])  # read only where it can be a refusal
        del buffer[:end]
        self.need = -1
        self.load.answered(self, status, head, body)

    def connection_lost(self, exc: Exception | None) -> None:
        self.load.lost(self)

    def send(self, data: bytes, request: tuple[int, float, float, float]) -> None:
        assert self.transport is not None
        self.request = request
        self.transport.write(data)


class Load:
    """One step's schedule over a pool of connections; `rows` holds (index, status, shed, stale, loop lag,
    send lag, latency) per request, the kind and the scheduled time added when written out."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(cfg["url"])
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.rate, self.timeout, self.max_connections = cfg["rate"], cfg["timeout"], cfg["connections"]
        self.total = max(1, round(self.rate * cfg["duration"]))
        self.mix = Mix(cfg["mix"], cfg["tag"], cfg["item_start"], cfg["list_start"])
        self.kinds, self.requests = self._build(cfg["headers"])
        self.idle: list[Connection] = []  # a stack: the last one freed is taken first
        self.waiting: deque[tuple[int, float, float]] = deque()  # index, scheduled, loop lag
        self.in_flight: set[Connection] = set()
        self.connections = 0  # open or opening
        self.rows: list[tuple[int, int, int, int, float, float, float]] = []
        self.next = 0
        self.t0 = 0.0
        self.sending = False
        self.errors: list[str] = []

    def _build(self, headers: dict[str, str]) -> tuple[list[str], list[bytes]]:
        """Every request's bytes, before the step: the mix's requests in turn (the cached mix's repeat)."""
        common = f"Host: {self.host}:{self.port}\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        kinds: list[str] = []
        requests: list[bytes] = []
        built: dict[str, bytes] = {}
        for index in range(self.total):
            kind, method, path, body, extra = self.mix.request(index)
            kinds.append(kind)
            if method == "GET" and not extra:
                data = built.get(path)
                if data is None:
                    data = built[path] = f"GET {path} HTTP/1.1\r\n{common}\r\n".encode()
                requests.append(data)
                continue
            head = f"{method} {path} HTTP/1.1\r\n{common}" + "".join(f"{k}: {v}\r\n" for k, v in (extra or {}).items())
            if body or method == "POST":
                head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            requests.append(head.encode() + b"\r\n" + body)
        return kinds, requests

    # -- connections -------------------------------------------------------------

    def open_one(self) -> None:
        self.connections += 1
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: Connection(self), self.host, self.port)
        except OSError:
            self.connections -= 1
            if self.waiting:  # the request that asked for it: a connection error
                index, scheduled, loop_lag = self.waiting.popleft()
                now = time.monotonic()
                sent = (now - scheduled) * 1000
                self.rows.append((index, 0, 0, 0, loop_lag, sent, sent))

    def opened(self, conn: Connection) -> None:
        self.free(conn, time.monotonic())

    def free(self, conn: Connection, now: float) -> None:
        """*conn* can take a request: the oldest waiting one still within its deadline, or it idles."""
        while self.waiting:
            index, scheduled, loop_lag = self.waiting.popleft()
            if now - scheduled >= self.timeout:
                self.rows.append((index, -1, 0, 0, loop_lag, -1.0, (now - scheduled) * 1000))
                continue
            self._send(conn, index, scheduled, loop_lag, now)
            return
        conn.idle_since = now
        self.idle.append(conn)

    def _take_idle(self, now: float) -> Connection | None:
        while self.idle:
            conn = self.idle.pop()
            if now - conn.idle_since <= IDLE_SECONDS:
                return conn
            self._drop(conn)
        return None

    def _drop(self, conn: Connection) -> None:
        if not conn.dead:
            conn.dead = True
            self.connections -= 1
            if conn.transport is not None:
                conn.transport.close()

    def _send(self, conn: Connection, index: int, scheduled: float, loop_lag: float, now: float) -> None:
        self.in_flight.add(conn)
        conn.send(self.requests[index], (index, scheduled, loop_lag, (now - scheduled) * 1000))

    def answered(self, conn: Connection, status: int, head: bytes, body: bytes) -> None:
        now = time.monotonic()
        request = conn.request
        if request is None:  # an answer to a request already given up: its connection is being closed
            return
        conn.request = None
        self.in_flight.discard(conn)
        index, scheduled, loop_lag, sent = request
        shed = 1 if status == 503 and is_shed(status, body) else 0
        stale = 1 if STALE in head else 0
        self.rows.append((index, status, shed, stale, loop_lag, sent, (now - scheduled) * 1000))
        if CONNECTION_CLOSE in head:
            self._drop(conn)  # lost() opens another if a request waits
        else:
            self.free(conn, now)
        self.dispatch_due(now)

    def lost(self, conn: Connection) -> None:
        if conn.request is not None:
            index, scheduled, loop_lag, sent = conn.request
            conn.request = None
            self.rows.append((index, 0, 0, 0, loop_lag, sent, (time.monotonic() - scheduled) * 1000))
        self.in_flight.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        if not conn.dead:
            conn.dead = True
            self.connections -= 1
        if self.waiting and self.sending and self.connections < self.max_connections:
            self.open_one()

    # -- the schedule ------------------------------------------------------------

    def dispatch_due(self, now: float) -> None:
        """Take up every request whose time has come: on an idle connection, else in the queue."""
        if not self.sending:
            return
        due = min(self.total, int((now - self.t0) * self.rate) + 1)
        while self.next < due:
            index = self.next
            scheduled = self.t0 + index / self.rate
            loop_lag = (now - scheduled) * 1000
            self.next += 1
            conn = self._take_idle(now) if not self.waiting else None
            if conn is not None:
                self._send(conn, index, scheduled, loop_lag, now)
            else:
                self.waiting.append((index, scheduled, loop_lag))
                if self.connections < self.max_connections:
                    self.open_one()

    def sweep(self, now: float) -> None:
        """Give up the requests past their deadline (from the scheduled time): waiting, or in flight."""
        deadline = now - self.timeout
        while self.waiting and self.waiting[0][1] <= deadline:
            index, scheduled, loop_lag = self.waiting.popleft()
            self.rows.append((index, -1, 0, 0, loop_lag, -1.0, (now - scheduled) * 1000))
        for conn in [c for c in self.in_flight if c.request is not None and c.request[1] <= deadline]:
            assert conn.request is not None
            index, scheduled, loop_lag, sent = conn.request
            conn.request = None
            self.in_flight.discard(conn)
            self.rows.append((index, -1, 0, 0, loop_lag, sent, (now - scheduled) * 1000))
            self._drop(conn)  # its answer, if it ever comes, must not be read as the next request's

    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: self.errors.append(str(context.get("exception") or context)))
        self.connections = self.max_connections
        opened = await asyncio.gather(
            *(loop.create_connection(lambda: Connection(self), self.host, self.port) for _ in range(self.max_connections)),
            return_exceptions=True,
        )
        self.connections -= sum(isinstance(found, OSError) for found in opened)  # more are tried when requests wait
        gc.disable()  # a collection in the middle of a step would show as the generator's own lag
        self.t0 = time.monotonic() + 0.05
        await asyncio.sleep(0.05)
        while time.monotonic() < self.t0:
            await asyncio.sleep(0)
        cpu_at_start = _cpu_seconds()
        self.sending = True
        last_sweep = self.t0
        while self.next < self.total:
            now = time.monotonic()
            self.dispatch_due(now)
            if now - last_sweep >= SWEEP_SECONDS:
                self.sweep(now)
                last_sweep = now
            if self.next < self.total:
                # uvloop's timers count whole ms (less is no wait at all): at least one ms, at most until due
                await asyncio.sleep(max(0.001, self.t0 + self.next / self.rate - time.monotonic()))
        sending_wall = time.monotonic() - self.t0
        sending_cpu = _cpu_seconds() - cpu_at_start
        while self.in_flight or self.waiting:
            await asyncio.sleep(0.002)
            self.sweep(time.monotonic())
        cpu = _cpu_seconds() - cpu_at_start
        self.sending = False
        for conn in list(self.idle):
            self._drop(conn)
        await asyncio.sleep(0)
        gc.enable()
        if self.errors:  # a bug of this generator's, raised in a callback: no figure from this step
            raise RuntimeError(f"{len(self.errors)} errors in the generator's callbacks, the first: {self.errors[0]}")
        kinds, rate = self.kinds, self.rate
        rows: list[Row] = [
            (kinds[i], status, shed, stale, round(i / rate, 4), round(loop_lag, 2), round(sent, 2), round(latency, 2))
            for i, status, shed, stale, loop_lag, sent, latency in sorted(self.rows)
        ]
        assert len(rows) == self.total, f"{len(rows)} rows for {self.total} requests"
        return {
            "rows": rows,
            "items_used": self.mix.items_used,
            "lists_used": self.mix.lists_used,
            "cpu_seconds": cpu,  # from the step's start to its last answer or give-up; imports and set-up left out
            "sending_cpu_seconds": sending_cpu,
            "sending_seconds": sending_wall,
            "cpus": sorted(os.sched_getaffinity(0)),
        }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def first_in_line() -> None:
    """The instrument first, where allowed (root): it is cheap, and a stall of its own would read as lag.

    With the kernel's autogroups (one per session) a nice value counts only within its session, and the
    web process has a session of its own: this process takes its own (started with start_new_session)
    and raises that group's priority. Measured beside two busy loops: wake-up lag p99 4 ms with nice
    alone, 0.3 ms with this."""
    with contextlib.suppress(OSError):
        Path("/proc/self/autogroup").write_text("-10")
    with contextlib.suppress(OSError):
        os.nice(-10)


def main(config_path: str) -> None:
    import uvloop

    cfg = json.loads(Path(config_path).read_text())
    if cfg.get("cpu") is not None:
        os.sched_setaffinity(0, {cfg["cpu"]})  # the parent's preexec_fn did it already; said again, in case
    first_in_line()
    result = uvloop.run(Load(cfg).run())
    Path(cfg["out"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
