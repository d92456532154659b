"""The read bench's Python load generator: `python -m bench.readkit.load CONFIG.json` prints its result as JSON.

A child process of its own (its own GIL and event loop, uvloop), raw HTTP/1.1 keep-alive connections opened
before it starts (asyncio protocols: no HTTP client library, the parse is a header search and a Content-Length),
one request in flight on each. Two modes:

- open: requests are due at fixed intervals (`rate` per second) whatever the server does. A due request goes
  out on an idle connection, else waits, first in first out, for the next connection to come free; its latency
  runs from its scheduled time, that wait included, so a server falling behind shows in the latencies instead
  of slowing the offered rate (no coordinated omission). Waiting past `timeout` counts as a failure.
- closed: each connection sends its next request as soon as the last one is answered (what wrk does): the
  figure is requests/s, bounded by this generator's own CPU.

uvloop's timers count whole milliseconds, so due requests go out when a timer fires (at most every ms) or when
an answer arrives, whichever comes first: how late that is behind the schedule is the generator's own lag,
reported beside the latencies (which include it). A failure (an answer other than 200, a timeout, a connection
lost) counts as slower than every answer in the percentiles. A 200 whose headers lack `expect` (a lower-case
`name: value` prefix, e.g. `x-brownout: stale`) is counted as `unexpected`, the first one's head kept.
"""

from __future__ import annotations

import asyncio
import gc
import json
import re
import resource
import sys
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any, cast

from bench.chaoskit.processes import first_in_line

CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)")
CONNECTION_CLOSE = b"\r\nconnection: close"


class Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time, its answer's status line and headers handed back."""

    def __init__(self, load: Load) -> None:
        self.load = load
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.need = -1  # bytes of the answer under way (head and body), -1 until its head is in
        self.head = b""
        self.scheduled: float | None = None  # the request in flight: its scheduled (or, closed loop, sent) time

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass
        self.load.free(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.need < 0:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head = bytes(self.buffer[:end]).lower()
            length = CONTENT_LENGTH.search(self.head)
            self.need = end + 4 + (int(length.group(1)) if length else 0)
        if len(self.buffer) >= self.need:
            del self.buffer[: self.need]
            self.need = -1
            self.load.answered(self, self.head)

    def connection_lost(self, exc: Exception | None) -> None:
        self.load.lost(self)

    def send(self, request: bytes, scheduled: float) -> None:
        assert self.transport is not None
        self.scheduled = scheduled
        self.transport.write(request)


class Load:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.host, self.port = cfg["host"], cfg["port"]
        head = "".join(f"{name}: {value}\r\n" for name, value in cfg["headers"].items())
        host = f"Host: {self.host}:{self.port}\r\n"
        self.requests = [f"GET {path} HTTP/1.1\r\n{host}{head}\r\n".encode() for path in cfg["paths"]]
        self.expect = ("\r\n" + cfg["expect"]).encode() if cfg.get("expect") else None
        self.rate, self.timeout, self.duration = cfg.get("rate") or 0.0, cfg["timeout"], cfg["duration"]
        self.closed_loop = cfg["mode"] == "closed"
        self.idle: deque[Connection] = deque()  # first in, first out: every connection kept in use
        self.waiting: deque[float] = deque()  # scheduled times of due requests without a connection
        self.in_flight: set[Connection] = set()
        self.latencies: list[float] = []  # ms, of 200 answers within the timeout
        self.lag: list[float] = []  # ms, how late each request was taken up behind its schedule
        self.failed: Counter[str] = Counter()
        self.unexpected = 0
        self.unexpected_head = ""  # the first one's status line and headers
        self.waited = 0  # requests that found no idle connection
        self.next = 0  # open loop: index of the next request due
        self.sent = 0
        self.total = 0
        self.t0 = 0.0
        self.stop_at = float("inf")
        self.sending = False

    # -- connections -------------------------------------------------------------

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: Connection(self), self.host, self.port)

    def free(self, conn: Connection) -> None:
        """*conn* can take a request: the oldest waiting one (open loop), the next one (closed), or it idles."""
        if self.closed_loop:
            now = time.monotonic()
            if self.sending and now < self.stop_at:
                self._send(conn, now)
                return
        else:
            while self.waiting:
                scheduled = self.waiting.popleft()
                if time.monotonic() - scheduled > self.timeout:
                    self.failed["timeout"] += 1
                    continue
                self._send(conn, scheduled)
                return
        self.idle.append(conn)

    def _send(self, conn: Connection, scheduled: float) -> None:
        self.in_flight.add(conn)
        conn.send(self.requests[self.sent % len(self.requests)], scheduled)  # the paths in turn
        self.sent += 1

    def answered(self, conn: Connection, head: bytes) -> None:
        now = time.monotonic()
        assert conn.scheduled is not None
        latency = (now - conn.scheduled) * 1000
        conn.scheduled = None
        self.in_flight.discard(conn)
        status = int(head[9:12])
        if status != 200:
            self.failed[f"HTTP {status}"] += 1
        elif latency > self.timeout * 1000:
            self.failed["timeout"] += 1
        else:
            self.latencies.append(latency)
            if self.expect is not None and self.expect not in head:
                self.unexpected += 1
                self.unexpected_head = self.unexpected_head or head.decode("latin-1")[:600]
        if CONNECTION_CLOSE in head and conn.transport is not None:
            conn.transport.close()  # lost() replaces it
            return
        if not self.closed_loop:
            self.dispatch_due()
        self.free(conn)

    def lost(self, conn: Connection) -> None:
        if conn.scheduled is not None:
            self.failed["connection lost"] += 1
            conn.scheduled = None
        self.in_flight.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        if self.sending:
            asyncio.get_running_loop().create_task(self.connect())

    # -- the schedule ------------------------------------------------------------

    def dispatch_due(self) -> None:
        """Take up every request whose time has come: on an idle connection, else in the queue."""
        if not self.sending:
            return
        now = time.monotonic()
        due = min(self.total, int((now - self.t0) * self.rate) + 1)
        while self.next < due:
            scheduled = self.t0 + self.next / self.rate
            self.lag.append((now - scheduled) * 1000)
            self.next += 1
            if self.idle:
                self._send(self.idle.popleft(), scheduled)
            else:
                self.waited += 1
                self.waiting.append(scheduled)

    async def run(self) -> dict[str, Any]:
        errors: list[str] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(str(context.get("exception"))))
        await asyncio.gather(*(self.connect() for _ in range(self.cfg["connections"])))
        gc.disable()  # a collection mid-run would read as the generator's lag
        cpu = _cpu_seconds()
        self.t0 = time.monotonic() + 0.05
        await asyncio.sleep(0.05)
        while time.monotonic() < self.t0:
            await asyncio.sleep(0)
        self.sending = True
        if self.closed_loop:
            self.stop_at = self.t0 + self.duration
            for _ in range(len(self.idle)):
                self.free(self.idle.popleft())
            await asyncio.sleep(self.duration)
            self.sending = False
            give_up = time.monotonic() + self.timeout
            while self.in_flight and time.monotonic() < give_up:
                await asyncio.sleep(0.001)
        else:
            self.total = max(1, round(self.rate * self.duration))
            while self.next < self.total:
                self.dispatch_due()
                if self.next < self.total:
                    # uvloop's timers count whole ms (less is no wait at all): at least one ms, at most until due
                    await asyncio.sleep(max(0.001, self.t0 + self.next / self.rate - time.monotonic()))
            give_up = time.monotonic() + self.timeout
            while (self.in_flight or self.waiting) and time.monotonic() < give_up:
                await asyncio.sleep(0.001)
            self.sending = False
        elapsed = time.monotonic() - self.t0
        cpu = _cpu_seconds() - cpu
        if self.in_flight or self.waiting:
            self.failed["timeout"] += len(self.in_flight) + len(self.waiting)
        for conn in [*self.idle, *self.in_flight]:
            conn.scheduled = None  # counted above
            if conn.transport is not None:
                conn.transport.close()
        gc.enable()
        if errors:  # a bug of this generator's, raised in a callback: no figure from this run
            raise RuntimeError(f"{len(errors)} errors in the generator's callbacks, the first: {errors[0]}")
        return self.summary(elapsed, cpu)

    def summary(self, elapsed: float, cpu: float) -> dict[str, Any]:
        failed = sum(self.failed.values())
        ranked = sorted(self.latencies)
        count = len(ranked) + failed

        def percentile(fraction: float) -> float | None:
            """None: the rank falls among the failures (slower than every answer)."""
            rank = min(count - 1, int(fraction * count))
            return ranked[rank] if rank < len(ranked) else None

        lag = sorted(self.lag)
        return {
            "mode": self.cfg["mode"],
            "requests": count,
            "ok": len(ranked),
            "rps": len(ranked) / self.duration,
            "failed": dict(self.failed),
            "unexpected": self.unexpected,
            "unexpected_head": self.unexpected_head,
            "waited_for_connection": self.waited,
            "p50": percentile(0.5) if count else None,
            "p99": percentile(0.99) if count else None,
            "max": ranked[-1] if ranked else None,
            "ok_p50": ranked[len(ranked) // 2] if ranked else None,  # of the 200 answers alone
            "ok_p99": ranked[min(len(ranked) - 1, int(0.99 * len(ranked)))] if ranked else None,
            "lag_p50": lag[len(lag) // 2] if lag else 0.0,
            "lag_p99": lag[min(len(lag) - 1, int(0.99 * len(lag)))] if lag else 0.0,
            "lag_max": lag[-1] if lag else 0.0,
            "cpu_seconds": cpu,
            "elapsed": elapsed,
        }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(config_path: str) -> None:
    import uvloop

    cfg = json.loads(Path(config_path).read_text())
    first_in_line()
    result = uvloop.run(Load(cfg).run())
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
