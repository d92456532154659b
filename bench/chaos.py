"""Chaos run: the Procfile's dynos under steady load while real services fail, audited from the database.

    .venv/bin/python bench/chaos.py                       # full scenario (about 8 minutes, both modes)
    .venv/bin/python bench/chaos.py --scenario short      # under two minutes per mode
    .venv/bin/python bench/chaos.py --writes 100 --reads 200 --outage 30 --modes brownout,naive

What one run does, for each mode (`brownout`, then `naive`):

1. makes a throwaway database on the configured PostgreSQL (DATABASE_URL, else the
   local set-up), runs the Procfile's `release` line on it, and starts the `web` line
   (`--web` replicas, one uvicorn process each, on their own ports) and the `worker`
   line, every service URL going through a TCP proxy (FaultProxy from tests/support, each
   in a process of its own so its relaying shares no GIL: TLS stays end to end); its own
   queues and Redis key prefix;
2. runs a steady open-loop load from a child process (asyncio + httpx, fixed rate,
   latency measured from each request's scheduled time): creations and read/unread
   toggles with Idempotency-Keys over many users and a hot set of notifications (one
   toggle in flight per notification: the client's order is causal), and reads of
   recent items (a user's first page, a recent notification by id), round robin
   over the web replicas;
3. plays the fault timeline on the real services: SSL kills (pg_terminate_backend of
   the service's backends, by application_name, over sslmode=require), a full
   database outage (the proxy refuses new connections and resets open ones), a
   RabbitMQ outage while the database is healthy, Redis down and back, and a shorter
   database outage whose drain is cut by SIGKILL to the worker's process group (the
   worker is then started again from the Procfile). `--*-down/--*-up` replace a
   proxy fault with the operator's own commands (a throwaway instance, or the local
   services when the operator asks for it);
4. waits for the backlog to drain, then audits from the database itself: acknowledged
   writes (201/200/202) against `applied_commands` and `notifications`; lost,
   duplicated and out-of-order (per notification) writes; reads answered, stale,
   failed; breaker open and close times (from the dynos' own transition log lines),
   drain time, peak backlog;
5. restores and removes everything it made: proxies back to pass-through and stopped,
   dynos stopped, database dropped, queues deleted, Redis keys deleted; also on
   Ctrl-C (SIGINT/SIGTERM) or error.

The `naive` mode is the same load and timeline against `naive_app` below: the same
routes and schema with plain SQLAlchemy (create_engine defaults: no breaker, no
retry, no queue, no cache, no idempotency). A report follows: per-fault error
rates, p99 and lost writes side by side, the audit, the timings against the
targets; `summary.md`, `chaos.png` (needs matplotlib) and the raw records in
`--out` (default bench/out/chaos-<time>/). Safety: every address is 127.0.0.1
(a non-loopback URL is refused), every loop is bounded in count and time, and the
run stops by itself.

`run_chaos(ChaosConfig(...))` does the same from Python (tests/faults/test_chaos.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import queue
import random
import re
import resource
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/chaos.py`: tests.support and bench.chaos importable
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import pika  # noqa: E402
import psycopg2  # noqa: E402
import redis  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from app.dispatch.envelope import command_id_for  # noqa: E402
from app.dispatch.notifications import CREATE, MARK_READ, MARK_UNREAD  # noqa: E402
from tests.support.tcp_proxy import FaultProxy  # noqa: E402

LOCAL_DB = "postgresql://brownout:brownout@127.0.0.1:5432/brownout?sslmode=require"
LOCAL_RABBIT = "amqp://guest:guest@127.0.0.1:5672/%2F"
LOCAL_REDIS = "redis://127.0.0.1:6379/0"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
HARNESS_APP_NAME = "bo-chaos-harness"
BREAKER_LINE = re.compile(r"circuit breaker '([^']+)': (\w+) -> (\w+)")
STATE_LEVEL = {"closed": 0, "half_open": 1, "open": 2}

# The short settings of the run (printed); --seed-defaults keeps the seed's own.
RUN_SETTINGS = {
    "BROWNOUT_BREAKER_OPEN_SECONDS": "5",
    "BROWNOUT_HEALTH_INTERVAL_SECONDS": "1",
    "BROWNOUT_WORKER_GATE_CAP_SECONDS": "4",
}
# Always: a good neighbour on a shared PostgreSQL (max_connections 100 here), no access log to parse.
FIXED_SETTINGS = {"BROWNOUT_POOL_MAX_OVERFLOW": "5", "UVICORN_ACCESS_LOG": "false"}

TARGETS = {
    "open_within": 1.0,  # s, outage start -> breaker open
    "drain_within": 15.0,  # s, fleet breakers closed -> backlog drained
    "reads_answered": 0.999,  # during the 30 s outage
    "p99_ms": 50.0,  # during the 30 s outage
    "writes": 100.0,
    "reads": 200.0,
}


# ---------------------------------------------------------------------------
# Scenarios: faults placed one after another (kind, duration, gap after it)
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str  # ssl_kills | db_outage | rabbit_outage | redis_outage | worker_kill
    start: float  # seconds after the load starts
    duration: float
    every: float = 0.0  # ssl_kills: seconds between two kills

    @property
    def end(self) -> float:
        return self.start + self.duration

    @property
    def label(self) -> str:
        return {
            "ssl_kills": f"SSL kills every {self.every:g} s",
            "db_outage": f"database outage {self.duration:g} s",
            "rabbit_outage": f"RabbitMQ outage {self.duration:g} s",
            "redis_outage": f"Redis down {self.duration:g} s",
            "worker_kill": f"database outage {self.duration:g} s + worker SIGKILL mid-drain",
        }[self.kind]


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    writes: float
    reads: float
    users: int
    hot: int
    warmup: float
    steps: tuple[tuple[str, float, float], ...]  # (kind, duration, gap after)
    tail: float
    kill_every: float
    drain_timeout: float

    def timeline(self, *, outage: float | None = None, only: set[str] | None = None) -> tuple[list[Fault], float]:
        faults, t = [], self.warmup
        for kind, duration, gap in self.steps:
            if only is not None and kind not in only:
                continue
            if kind == "db_outage" and outage is not None:
                duration = outage
            faults.append(Fault(kind, t, duration, self.kill_every if kind == "ssl_kills" else 0.0))
            t += duration + gap
        return faults, t + self.tail


SCENARIOS = {
    "full": Scenario(
        "full",
        writes=100,
        reads=200,
        users=200,
        hot=300,
        warmup=20,
        steps=(
            ("ssl_kills", 15, 10),
            ("db_outage", 30, 20),
            ("rabbit_outage", 15, 10),
            ("redis_outage", 15, 10),
            ("worker_kill", 10, 0),
        ),
        tail=25,
        kill_every=3,
        drain_timeout=90,
    ),
    "short": Scenario(
        "short",
        writes=40,
        reads=80,
        users=60,
        hot=80,
        warmup=8,
        steps=(
            ("ssl_kills", 6, 2),
            ("db_outage", 10, 12),
            ("rabbit_outage", 5, 3),
            ("redis_outage", 5, 8),  # > BROWNOUT_REDIS_SKIP_SECONDS: Redis is skipped up to 5 s after it is back
            ("worker_kill", 6, 0),
        ),
        tail=14,
        kill_every=2,
        drain_timeout=40,
    ),
}


@dataclasses.dataclass
class ChaosConfig:
    scenario: str = "full"
    writes: float | None = None  # per second; None: the scenario's
    reads: float | None = None
    duration: float | None = None  # whole load; None: the scenario's (faults that do not fit are dropped)
    outage: float | None = None  # the main database outage, seconds
    faults: set[str] | None = None  # a subset of the kinds; None: all
    modes: tuple[str, ...] = ("brownout", "naive")
    web: int = 2  # web replicas (one uvicorn process each)
    seed_defaults: bool = False  # keep the seed's breaker, health and gate settings
    outage_style: str = "refuse"  # refuse (PostgreSQL down) or silence (a black hole)
    out_dir: Path | None = None
    progress: bool | None = None  # None: a live line on a terminal, a plain line every 5 s otherwise
    seed: int = 1
    database_url: str | None = None
    rabbitmq_url: str | None = None
    redis_url: str | None = None
    commands: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)  # db/rabbit/redis -> (down, up)
    client_timeout: float = 5.0
    plot: bool = True
    echo: Callable[[str], None] = print


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def now() -> float:
    return time.monotonic()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(samples: list[float], fraction: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def loopback_only(url: str, what: str) -> None:
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    if host not in LOOPBACK:
        raise SystemExit(f"chaos: {what} must point at 127.0.0.1 (got host {host!r}); this harness sends no traffic elsewhere")


def _port_of(url: str, default: int) -> int:
    from urllib.parse import urlsplit

    return urlsplit(url).port or default


def with_port(url: str, port: int) -> str:
    """The URL with 127.0.0.1:*port* as its address (credentials, path and query kept)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    netloc = (auth + "@" if auth else "") + f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def pg_url(url: str, *, dbname: str | None = None, port: int | None = None, app_name: str | None = None) -> str:
    """A plain libpq URL (driver psycopg2), optionally to another database, port or application_name."""
    parsed = make_url(url).set(drivername="postgresql")
    if dbname is not None:
        parsed = parsed.set(database=dbname)
    if port is not None:
        parsed = parsed.set(host="127.0.0.1", port=port)
    if app_name is not None:
        parsed = parsed.update_query_dict({"application_name": app_name})
    return parsed.render_as_string(hide_password=False)


def admin_connect(url: str, dbname: str) -> Any:
    conn = psycopg2.connect(pg_url(url, dbname=dbname, app_name=HARNESS_APP_NAME), connect_timeout=5)
    conn.autocommit = True
    return conn


def procfile() -> dict[str, list[str]]:
    """The Procfile's lines as argv, `python` being this interpreter."""
    lines: dict[str, list[str]] = {}
    for raw in (ROOT / "Procfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, command = line.partition(":")
        argv = shlex.split(command)
        if argv and argv[0] == "python":
            argv[0] = sys.executable
        lines[name.strip()] = argv
    return lines


def _load_prctl() -> Any:
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()  # resolved here: nothing but the call itself runs between fork and exec


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the thread that started it ends (Linux PR_SET_PDEATHSIG).

    So a harness killed outright leaves no dyno, proxy or load generator behind.
    The signal follows the starting *thread*: children are started from the main thread only."""
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    give_up = now() + timeout
    while now() < give_up:
        if condition():
            return True
        time.sleep(interval)
    return condition()


# ---------------------------------------------------------------------------
# Dynos: the Procfile's lines as processes, their breaker transitions read from their logs
# ---------------------------------------------------------------------------


class BreakerTracker:
    """Breaker state per dyno, from the `circuit breaker 'database': a -> b` line each process logs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.states: dict[str, str] = {}
        self.transitions: list[tuple[float, str, str, str]] = []  # (monotonic, dyno, old, new)

    def register(self, dyno: str) -> None:
        with self._lock:
            self.states[dyno] = "closed"
            self.transitions.append((now(), dyno, "start", "closed"))

    def line(self, dyno: str, text: str) -> None:
        match = BREAKER_LINE.search(text)
        if match is None or match.group(1) != "database":
            return
        with self._lock:
            self.states[dyno] = match.group(3)
            self.transitions.append((now(), dyno, match.group(2), match.group(3)))

    def web_states(self) -> dict[str, str]:
        with self._lock:
            return {name: state for name, state in self.states.items() if name.startswith("web")}

    def summary(self) -> str:
        states = self.web_states()
        if not states:
            return "none"
        counts: dict[str, int] = {}
        for state in states.values():
            counts[state] = counts.get(state, 0) + 1
        return " ".join(f"{state} {n}/{len(states)}" for state, n in sorted(counts.items(), key=lambda kv: -STATE_LEVEL[kv[0]]))


class Dyno:
    """One process in its own process group (so a SIGKILL takes its children too), output kept in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path, tracker: BreakerTracker | None) -> None:
        self.name, self.argv, self.env = name, argv, env
        self.log_path = log_dir / f"{name}.log"
        self.tracker = tracker
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self._reader: threading.Thread | None = None
        self.starts = 0

    def start(self) -> Dyno:
        self.process = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.starts += 1
        if self.tracker is not None:
            self.tracker.register(self.name)
        self._reader = threading.Thread(target=self._read, args=(self.process,), name=f"log-{self.name}", daemon=True)
        self._reader.start()
        return self

    def _read(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts} pid {process.pid} at {dt.datetime.now().isoformat()}\n".encode())
            for raw in process.stdout:
                log.write(raw)
                if self.tracker is not None and b"circuit breaker" in raw:
                    self.tracker.line(self.name, raw.decode(errors="replace"))

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)

    def stop(self, timeout: float = 30.0) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):  # whatever is left in the group (forked children)
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=5)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class ProxyProcess:
    """A FaultProxy in a child process of its own, driven over its stdin (one command, one "ok").

    In this process, a proxy's relay threads would share the GIL with the harness's
    poller and log readers, and a Redis call has 50 ms: the relaying would be the fault."""

    def __init__(self, name: str, upstream_port: int) -> None:
        self.name = name
        self._lock = threading.Lock()
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--proxy-child", str(upstream_port)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        assert self.process.stdout is not None
        first = self.process.stdout.readline().split()
        if len(first) != 2 or first[0] != "port":
            self.process.kill()
            raise RuntimeError(f"proxy for {name} did not start")
        self.port = int(first[1])

    def _command(self, op: str) -> None:
        with self._lock:
            assert self.process.stdin is not None and self.process.stdout is not None
            self.process.stdin.write(op + "\n")
            self.process.stdin.flush()
            reply = self.process.stdout.readline().strip()
        if reply != "ok":
            raise RuntimeError(f"proxy for {self.name}: {op} failed ({reply or 'no answer'})")

    def refuse(self) -> None:
        self._command("refuse")

    def reset_existing(self) -> None:
        self._command("reset_existing")

    def silence(self) -> None:
        self._command("silence")

    def pass_through(self) -> None:
        self._command("pass_through")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._command("stop")
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def proxy_child(upstream_port: int) -> None:
    """`--proxy-child PORT`: serve one FaultProxy; stdin closed (the harness gone) stops it too."""
    with contextlib.suppress(OSError):  # part of the network, not of the service: first in line for the CPU
        os.nice(-5)
    proxy = FaultProxy(upstream_host="127.0.0.1", upstream_port=upstream_port).start()
    print(f"port {proxy.port}", flush=True)
    try:
        for line in sys.stdin:
            op = line.strip()
            if op == "stop":
                break
            if op in ("refuse", "reset_existing", "silence", "pass_through"):
                getattr(proxy, op)()
                print("ok", flush=True)
            else:
                print(f"unknown {op}", flush=True)
    finally:
        with contextlib.suppress(Exception):
            proxy.pass_through()
        proxy.stop()
        print("ok", flush=True)


# ---------------------------------------------------------------------------
# The naive mode: the same routes and schema, plain SQLAlchemy with its defaults
# ---------------------------------------------------------------------------


def naive_app() -> Any:
    """`uvicorn --factory bench.chaos:naive_app`: what the service would be with everything off.

    create_engine() defaults (QueuePool 5 + 10, no pre-ping, no timeouts), one
    transaction per request, no breaker, retry, queue, cache or idempotency: a
    database error is FastAPI's plain 500."""
    from fastapi import Body, FastAPI, HTTPException
    from sqlalchemy import create_engine, func, insert, select, update
    from sqlalchemy.orm import Session

    from app.schema import notifications as table

    engine = create_engine(make_url(os.environ["DATABASE_URL"]).set(drivername="postgresql+psycopg2"))
    app = FastAPI(title="naive")

    def as_json(row: Any) -> dict[str, Any]:
        return {
            "id": str(row.id),
            "user_id": row.user_id,
            "email": row.email,
            "subject": row.subject,
            "body": row.body,
            "read": row.read,
            "created_at": row.created_at.isoformat(),
        }

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/notifications", status_code=201)
    def create(body: dict[str, Any] = Body()) -> dict[str, Any]:  # noqa: B008 (FastAPI's idiom)
        values = {key: body[key] for key in ("user_id", "email", "subject")} | {"body": body.get("body", "")}
        with Session(engine) as session:
            statement = insert(table).values(id=uuid.uuid4(), created_at=func.now(), **values).returning(table)
            row = session.execute(statement).one()
            session.commit()
        return as_json(row)

    def set_read(notification_id: uuid.UUID, value: bool) -> dict[str, Any]:
        with Session(engine) as session:
            statement = update(table).where(table.c.id == notification_id).values(read=value).returning(table)
            row = session.execute(statement).one_or_none()
            session.commit()
        if row is None:
            raise HTTPException(404)
        return as_json(row)

    @app.post("/notifications/{notification_id}/read")
    def mark_read(notification_id: uuid.UUID) -> dict[str, Any]:
        return set_read(notification_id, True)

    @app.post("/notifications/{notification_id}/unread")
    def mark_unread(notification_id: uuid.UUID) -> dict[str, Any]:
        return set_read(notification_id, False)

    @app.get("/notifications/{notification_id}")
    def get_one(notification_id: uuid.UUID) -> dict[str, Any]:
        with Session(engine) as session:
            row = session.execute(select(table).where(table.c.id == notification_id)).one_or_none()
        if row is None:
            raise HTTPException(404)
        return as_json(row)

    @app.get("/users/{user_id}/notifications")
    def list_recent(user_id: int, limit: int = 20) -> dict[str, Any]:
        query = select(table).where(table.c.user_id == user_id).order_by(table.c.created_at.desc(), table.c.id.desc())
        with Session(engine) as session:
            rows = session.execute(query.limit(limit)).all()
        return {"items": [as_json(row) for row in rows], "next": None}

    return app


# ---------------------------------------------------------------------------
# The load generator (a child process: its event loop shares no GIL with the proxies)
# ---------------------------------------------------------------------------

KINDS = ("create", "read", "unread", "list", "get")
WRITE_KINDS = {"create", "read", "unread"}


class LeanHttp:
    """A small HTTP/1.1 keep-alive client for one server on 127.0.0.1.

    The load generator's own cost is part of every latency it reports, so it
    sends with asyncio streams and parses only what uvicorn answers (status,
    headers, a Content-Length or chunked body), a fraction of httpx's CPU per
    request. Connections are reused one request at a time, never after 2 s idle
    (uvicorn closes them at 5 s); like browsers and httpx, a request that meets
    a reused connection already closed by the server, before a byte of answer,
    is sent once more on a new one (the server never read it)."""

    IDLE_SECONDS = 2.0

    def __init__(self, url: str, max_idle: int) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.idle: list[tuple[float, asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.max_idle = max_idle

    async def request(
        self, method: str, path: str, *, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        for name, value in (headers or {}).items():
            head += f"{name}: {value}\r\n"
        if body or method == "POST":
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        data = head.encode() + b"\r\n" + body
        while self.idle:
            since, reader, writer = self.idle.pop()
            if now() - since > self.IDLE_SECONDS or reader.at_eof():
                writer.close()
                continue
            try:
                return await self._exchange(reader, writer, data)
            except _NothingReceived:
                continue  # closed by the server while idle: the request never reached it
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            return await self._exchange(reader, writer, data)
        except _NothingReceived as exc:
            raise ConnectionResetError("server closed the connection without answering") from exc

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        reuse = False
        try:
            try:
                writer.write(data)
                status_line = await reader.readline()
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise _NothingReceived from exc
            if not status_line:
                raise _NothingReceived
            status = int(status_line.split(b" ", 2)[1])
            found: dict[str, str] = {}
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                found[name.strip().lower()] = value.strip()
            if "content-length" in found:
                payload = await reader.readexactly(int(found["content-length"]))
            elif found.get("transfer-encoding", "").lower() == "chunked":
                payload = b""
                while True:
                    size = int((await reader.readline()).split(b";")[0], 16)
                    chunk = await reader.readexactly(size + 2)
                    if size == 0:
                        break
                    payload += chunk[:-2]
            else:
                payload = await reader.read()
                found["connection"] = "close"
            reuse = found.get("connection", "").lower() != "close" and len(self.idle) < self.max_idle
            return status, found, payload
        finally:
            if reuse:
                self.idle.append((now(), reader, writer))
            else:
                writer.close()

    async def close(self) -> None:
        for _, _, writer in self.idle:
            writer.close()
        self.idle.clear()


class _NothingReceived(Exception):
    """The connection failed before the first byte of an answer."""


class Workload:
    """What to send next: creations over many users, toggles on a hot set (one in flight each), reads."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.rng = random.Random(cfg["seed"])
        self.run_id = cfg["run_id"]
        self.users = cfg["users"]
        self.hot_cap = cfg["hot"]
        self.recent: deque[str] = deque(maxlen=500)  # acknowledged creations, newest last
        self.hot: list[str] = []
        self.next_value: dict[str, bool] = {}
        self.busy: set[str] = set()
        self.count = 0

    def next_write(self) -> dict[str, Any]:
        self.count += 1
        key = f"{self.run_id}-{self.count}"
        if len(self.hot) >= 10 and self.rng.random() < 0.6:
            for _ in range(8):
                target = self.rng.choice(self.hot)
                if target not in self.busy:
                    self.busy.add(target)
                    value = self.next_value.get(target, True)
                    self.next_value[target] = not value
                    return {"kind": "read" if value else "unread", "key": key, "nid": target, "value": value}
        user = self.rng.randint(1, self.users)
        body = {"user_id": user, "email": f"u{user}@example.com", "subject": f"chaos {key}", "body": "chaos"}
        return {"kind": "create", "key": key, "user": user, "body": body}

    def acknowledged_create(self, ident: str) -> None:
        self.recent.append(ident)
        if len(self.hot) < self.hot_cap:
            self.hot.append(ident)

    def next_read(self) -> tuple[str, str]:
        if self.recent and self.rng.random() < 0.3:
            return "get", f"/notifications/{self.rng.choice(self.recent)}"
        return "list", f"/users/{self.rng.randint(1, self.users)}/notifications?limit=20"


async def _load(cfg: dict[str, Any]) -> dict[str, Any]:
    work = Workload(cfg)
    clients = [LeanHttp(url, 64) for url in cfg["urls"]]
    t0, duration, timeout = cfg["t0"], cfg["duration"], cfg["timeout"]
    # [t_sched, t_sent, t_done, kind, status, stale, detail, replica] (times relative to t0; detail: the id read, or the error)
    requests: list[list[Any]] = []
    writes: list[dict[str, Any]] = []
    window: list[list[Any]] = []
    queued_ids: list[str] = []
    inflight = 0
    shed = 0
    turn = 0

    def client() -> tuple[int, LeanHttp]:
        nonlocal turn
        turn += 1
        return turn % len(clients), clients[turn % len(clients)]

    async def send(
        kind: str, scheduled: float, method: str, path: str, *, payload: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any] | None, str]:
        nonlocal inflight
        inflight += 1
        sent = now()
        body: dict[str, Any] | None = None
        marker = detail = ""
        data = json.dumps(payload).encode() if payload is not None else b""
        replica, http = client()
        try:
            async with asyncio.timeout(timeout):  # the whole request, connect included
                status, found, raw = await http.request(method, path, body=data, headers=headers)
            marker = found.get("x-brownout", "")
            if found.get("content-type", "").startswith("application/json"):
                with contextlib.suppress(ValueError):
                    body = json.loads(raw)
        except TimeoutError:
            status, detail = -1, "timeout"
        except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
            status, detail = 0, type(exc).__name__
        finally:
            inflight -= 1
        done = now()
        stale = 1 if marker == "stale" else 0
        if kind == "get":
            detail = path.rsplit("/", 1)[1] + (" " + detail if detail else "")
        row = [round(scheduled - t0, 4), round(sent - t0, 4), round(done - t0, 4), kind, status, stale, detail, replica]
        requests.append(row)
        window.append([kind, status, round((done - scheduled) * 1000, 2), stale])
        return status, body, marker

    async def write(scheduled: float, spec: dict[str, Any]) -> None:
        if spec["kind"] == "create":
            status, body, _ = await send(
                "create", scheduled, "POST", "/notifications", payload=spec["body"], headers={"Idempotency-Key": spec["key"]}
            )
        else:
            path = f"/notifications/{spec['nid']}/{spec['kind']}"
            status, body, _ = await send(spec["kind"], scheduled, "POST", path, headers={"Idempotency-Key": spec["key"]})
            work.busy.discard(spec["nid"])
        record: dict[str, Any] = {key: spec[key] for key in ("kind", "key", "nid", "value", "user") if key in spec}
        record |= {"t": round(scheduled - t0, 4), "td": round(now() - t0, 4), "status": status}
        if body is not None:
            record["id"] = body.get("id")
            if status == 202:
                record["cid"] = body.get("command_id")
                queued_ids.append(str(body.get("command_id")))
        writes.append(record)
        if spec["kind"] == "create" and status in (200, 201, 202) and body and body.get("id"):
            work.acknowledged_create(str(body["id"]))

    async def read(scheduled: float) -> None:
        kind, path = work.next_read()
        await send(kind, scheduled, "GET", path)

    async def report() -> None:
        while True:
            await asyncio.sleep(0.5)
            line = {"t": round(now() - t0, 3), "done": list(window), "queued": list(queued_ids), "inflight": inflight}
            window.clear()
            queued_ids.clear()
            sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()

    tasks: set[asyncio.Task[None]] = set()

    def launch(coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    while now() < t0:
        await asyncio.sleep(min(0.05, max(0.0, t0 - now())))
    reporter = asyncio.get_running_loop().create_task(report())
    sent_w = sent_r = 0
    w_rate, r_rate = cfg["writes"], cfg["reads"]
    while True:  # bounded: at most duration * rate requests of each kind, then it stops
        elapsed = now() - t0
        if elapsed >= duration:
            break
        while sent_w < elapsed * w_rate:
            scheduled = t0 + sent_w / w_rate
            sent_w += 1
            if inflight >= cfg["max_inflight"]:
                shed += 1
                continue
            launch(write(scheduled, work.next_write()))
        while sent_r < elapsed * r_rate:
            scheduled = t0 + sent_r / r_rate
            sent_r += 1
            if inflight >= cfg["max_inflight"]:
                shed += 1
                continue
            launch(read(scheduled))
        await asyncio.sleep(0.002)
    if tasks:
        await asyncio.wait(set(tasks), timeout=timeout + 5)
    reporter.cancel()
    line = {"t": round(now() - t0, 3), "done": list(window), "queued": list(queued_ids), "inflight": inflight}
    sys.stdout.write(json.dumps(line) + "\n")
    for c in clients:
        await c.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"requests": requests, "writes": writes, "shed": shed, "cpu_seconds": usage.ru_utime + usage.ru_stime}


def load_child(config_path: str) -> None:
    cfg = json.loads(Path(config_path).read_text())
    with contextlib.suppress(OSError):  # the measuring instrument first, where allowed (root): less noise in its figures
        os.nice(-5)
    result = asyncio.run(_load(cfg))
    Path(cfg["records"]).write_text(json.dumps(result))
    sys.stdout.write(json.dumps({"finished": True}) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------
# Live figures (parent side) and the progress line
# ---------------------------------------------------------------------------


class Live:
    """What the progress line shows, fed by the load child's half-second reports."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.recent: deque[tuple[float, str, int, float, int]] = deque()  # (t, kind, status, latency_ms, stale)
        self.counts = {"applied": 0, "queued": 0, "rejected": 0, "failed_writes": 0, "answered": 0, "stale": 0, "failed_reads": 0}
        self.t = 0.0
        self.finished = False
        self.new_queued: list[str] = []

    def feed(self, line: dict[str, Any]) -> None:
        with self.lock:
            if line.get("finished"):
                self.finished = True
                return
            self.t = float(line["t"])
            for kind, status, latency, stale in line["done"]:
                self.recent.append((self.t, kind, status, latency, stale))
                if kind in WRITE_KINDS:
                    key = (
                        "applied"
                        if status in (200, 201)
                        else "queued"
                        if status == 202
                        else "rejected"
                        if status == 503
                        else "failed_writes"
                    )
                else:
                    key = "answered" if status == 200 else "failed_reads"
                    self.counts["stale"] += stale
                self.counts[key] += 1
            self.new_queued.extend(line["queued"])
            while self.recent and self.recent[0][0] < self.t - 2.0:
                self.recent.popleft()

    def take_queued(self) -> list[str]:
        with self.lock:
            taken, self.new_queued = self.new_queued, []
            return taken

    def rate_and_p99(self) -> tuple[float, float]:
        with self.lock:
            latest = [row for row in self.recent if row[0] > self.t - 1.01]
            rate = float(len(latest))
            p99 = percentile([row[3] for row in self.recent], 0.99) if self.recent else float("nan")
            return rate, p99


class Progress:
    """One line: rich's Live on a terminal, a plain line every 5 s otherwise."""

    def __init__(self, enabled: bool | None, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self._live: Any = None
        self._last = 0.0
        self.enabled = enabled
        self._rich = False
        if enabled is not False:
            try:
                from rich.console import Console

                console = Console()
                self._rich = console.is_terminal if enabled is None else True
                self._console = console
            except ImportError:  # rich is a dev extra: without it, plain lines
                self._rich = False

    def __enter__(self) -> Progress:
        if self._rich:
            from rich.live import Live as RichLive

            self._live = RichLive(console=self._console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None

    def show(self, fields: dict[str, Any]) -> None:
        if self.enabled is False:
            return
        text = (
            f"{fields['mode']:<8} {fields['t']:6.1f}s  breaker {fields['breaker']:<20} "
            f"{fields['rate']:5.0f} req/s  p99 {fields['p99']:7.1f} ms  "
            f"writes {fields['applied']} applied / {fields['queued']} queued / {fields['rejected']} rejected"
            f"{' / ' + str(fields['failed_writes']) + ' failed' if fields['failed_writes'] else ''}  "
            f"backlog {fields['backlog']}  stale reads {fields['stale']}"
            f"{'  failed reads ' + str(fields['failed_reads']) if fields['failed_reads'] else ''}  {fields['fault']}"
        )
        if self._live is not None:
            from rich.text import Text

            breaker = fields["breaker"]
            style = "yellow" if "half" in breaker else "bold red" if "open" in breaker else "green"
            line = Text(text)
            line.highlight_words([breaker], style)
            self._live.update(line)
        elif now() - self._last >= 5.0:
            self._last = now()
            self.echo(text)


# ---------------------------------------------------------------------------
# One mode's run
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class FaultRecord:
    kind: str
    label: str
    start: float
    end: float
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ModeResult:
    mode: str
    duration: float
    writes_rate: float
    reads_rate: float
    requests: list[list[Any]]
    writes: list[dict[str, Any]]
    shed: int
    faults: list[FaultRecord]
    transitions: list[tuple[float, str, str, str]]  # relative to t0
    backlog: list[tuple[float, int]]
    queue_depth: list[tuple[float, int]]
    audit: dict[str, Any]
    timings: list[dict[str, Any]]
    drained_after_load: float | None
    settings: dict[str, str]
    load_cpu_seconds: float = 0.0
    loadavg: tuple[float, float] = (0.0, 0.0)  # the machine's 1-minute load average at the start and the end


class Backlog:
    """Queued (202) writes not yet in applied_commands, asked of the database directly every 0.25 s."""

    def __init__(self, admin_url: str, dbname: str, queue: str, rabbit_url: str, live: Live) -> None:
        self.admin_url, self.dbname, self.queue, self.rabbit_url, self.live = admin_url, dbname, queue, rabbit_url, live
        self.pending: set[str] = set()
        self.samples: list[tuple[float, int]] = []
        self.depth: list[tuple[float, int]] = []
        self.current = 0
        self.peak = 0
        self.queue_messages = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="backlog", daemon=True)

    def start(self) -> Backlog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        conn = None
        channel_conn = channel = None
        last_depth = 0.0
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = admin_connect(self.admin_url, self.dbname)
                self.pending.update(self.live.take_queued())
                if self.pending:
                    with conn.cursor() as cur:
                        cur.execute(
                            "SELECT command_id::text FROM applied_commands WHERE command_id = ANY(%s::uuid[])",
                            (list(self.pending),),
                        )
                        self.pending.difference_update(row[0] for row in cur.fetchall())
                self.current = len(self.pending)
                self.peak = max(self.peak, self.current)
                self.samples.append((now(), self.current))
                if now() - last_depth >= 1.0:
                    last_depth = now()
                    if channel_conn is None or channel is None:
                        params = pika.URLParameters(self.rabbit_url)
                        params.socket_timeout = params.stack_timeout = params.blocked_connection_timeout = 5.0
                        channel_conn = pika.BlockingConnection(params)
                        channel = channel_conn.channel()
                    declared = channel.queue_declare(self.queue, passive=True)
                    self.queue_messages = int(declared.method.message_count)
                    self.depth.append((now(), self.queue_messages))
            except Exception:  # the harness's own links go around the proxies; a hiccup is retried next tick
                with contextlib.suppress(Exception):
                    if conn is not None:
                        conn.close()
                with contextlib.suppress(Exception):
                    if channel_conn is not None:
                        channel_conn.close()
                conn = channel_conn = channel = None
            self._stop.wait(0.25)
        with contextlib.suppress(Exception):
            if conn is not None:
                conn.close()
        with contextlib.suppress(Exception):
            if channel_conn is not None:
                channel_conn.close()


class ModeRun:
    def __init__(self, config: ChaosConfig, mode: str, out_dir: Path, faults: list[Fault], duration: float) -> None:
        scenario = SCENARIOS[config.scenario]
        self.config, self.mode, self.out_dir = config, mode, out_dir
        self.faults, self.duration = faults, duration
        self.writes_rate = config.writes if config.writes is not None else scenario.writes
        self.reads_rate = config.reads if config.reads is not None else scenario.reads
        self.scenario = scenario
        tag = uuid.uuid4().hex[:8]
        self.tag = tag
        self.dbname = f"bo_chaos_{tag}_{mode}"
        self.queue = f"bo-chaos-{tag}"
        self.email_queue = f"bo-chaos-{tag}-email"
        self.prefix = f"bo-chaos-{tag}:"
        self.app_name = f"bo-chaos-{tag}"
        self.base_db = config.database_url or os.environ.get("DATABASE_URL") or LOCAL_DB
        self.base_rabbit = config.rabbitmq_url or os.environ.get("RABBITMQ_URL") or LOCAL_RABBIT
        self.base_redis = config.redis_url or os.environ.get("REDIS_URL") or LOCAL_REDIS
        for url, what in ((self.base_db, "DATABASE_URL"), (self.base_rabbit, "RABBITMQ_URL"), (self.base_redis, "REDIS_URL")):
            loopback_only(url, what)
        self.tracker = BreakerTracker()
        self.live = Live()
        self.webs: list[Dyno] = []
        self.worker: Dyno | None = None
        self.proxies: dict[str, ProxyProcess] = {}
        self.records: list[FaultRecord] = []
        self.t0 = 0.0
        self.backlog: Backlog | None = None
        self.current_fault = ""
        self.settings: dict[str, str] = {}
        self._stop = threading.Event()
        self._down: set[str] = set()  # operator commands run "down" and not yet "up"
        self._main_calls: queue.Queue[tuple[Callable[[], None], threading.Event]] = queue.Queue()

    # -- set-up and tear-down ---------------------------------------------------

    def run(self) -> ModeResult:
        with contextlib.ExitStack() as stack:
            self._set_up(stack)
            return self._play()
        raise AssertionError("unreachable")

    def _set_up(self, stack: contextlib.ExitStack) -> None:
        echo = self.config.echo
        conn = admin_connect(self.base_db, "postgres")
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{self.dbname}"')
        conn.close()
        stack.callback(self._drop_database)
        if self.mode == "brownout":
            stack.callback(self._delete_queues)
            stack.callback(self._delete_redis_keys)
        lines = procfile()
        direct_url = pg_url(self.base_db, dbname=self.dbname)
        env = self._env()
        migrate = subprocess.run(
            lines["release"], env=env | {"DATABASE_URL": direct_url}, cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        if migrate.returncode != 0:
            raise RuntimeError(f"release line failed:\n{migrate.stdout}\n{migrate.stderr}")
        for name, url, default in (
            ("db", self.base_db, 5432),
            ("rabbit", self.base_rabbit, 5672),
            ("redis", self.base_redis, 6379),
        ):
            if self.mode == "naive" and name != "db":
                continue
            proxy = ProxyProcess(name, _port_of(url, default))
            self.proxies[name] = proxy
            stack.callback(self._restore_proxy, proxy)
        stack.callback(self._restore_commands)
        db_url = pg_url(self.base_db, dbname=self.dbname, port=self.proxies["db"].port)
        env["DATABASE_URL"] = db_url
        if self.mode == "brownout":
            env["RABBITMQ_URL"] = with_port(self.base_rabbit, self.proxies["rabbit"].port)
            env["REDIS_URL"] = with_port(self.base_redis, self.proxies["redis"].port)
        log_dir = self.out_dir / f"logs-{self.mode}"
        log_dir.mkdir(parents=True, exist_ok=True)
        for index in range(self.config.web):
            port = free_port()
            if self.mode == "brownout":
                argv = lines["web"]
            else:
                argv = [sys.executable, "-m", "uvicorn", "--factory", "bench.chaos:naive_app", "--host", "127.0.0.1"]
                argv += ["--port", str(port), "--no-access-log"]
            web_env = env | {"PORT": str(port)}
            if self.mode == "naive":  # identified by its URL: naive_app knows no Brownout setting
                web_env["DATABASE_URL"] = pg_url(db_url, app_name=self.app_name)
            web = Dyno(f"web{index + 1}", argv, web_env, log_dir, self.tracker)
            web.url = f"http://127.0.0.1:{port}"
            stack.callback(web.stop)
            self.webs.append(web.start())
        if self.mode == "brownout":
            self.worker = Dyno(
                "worker", lines["worker"], env | {"BROWNOUT_METRICS_PORT": str(free_port())}, log_dir, self.tracker
            )
            stack.callback(lambda: self.worker.stop() if self.worker else None)
            self.worker.start()
        for web in self.webs:
            if not wait_for(lambda web=web: answers(f"{web.url}/health") or not web.alive, 60):  # type: ignore[misc]
                raise RuntimeError(f"{web.name} did not answer /health:\n{web.tail()}")
            if not web.alive:
                raise RuntimeError(f"{web.name} exited:\n{web.tail()}")
        if self.worker is not None and not self._worker_ready(60):
            raise RuntimeError(f"the worker did not come up:\n{self.worker.tail()}")
        echo(
            f"[{self.mode}] database {self.dbname}, {len(self.webs)} web replica(s)"
            + (f", worker, queue {self.queue}, Redis prefix {self.prefix}" if self.mode == "brownout" else " (naive_app)")
        )

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BROWNOUT_", "UVICORN_"))}
        for key in ("DATABASE_URL", "RABBITMQ_URL", "REDIS_URL", "MIGRATION_DATABASE_URL", "SMTP_URL", "SENTRY_DSN", "PORT"):
            env.pop(key, None)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        settings = dict(FIXED_SETTINGS)
        if self.mode == "brownout":
            if not self.config.seed_defaults:
                settings |= RUN_SETTINGS
            settings |= {
                "BROWNOUT_DB_APPLICATION_NAME": self.app_name,
                "BROWNOUT_QUEUE_NAME": self.queue,
                "BROWNOUT_EMAIL_QUEUE_NAME": self.email_queue,
                "BROWNOUT_REDIS_KEY_PREFIX": self.prefix,
                "BROWNOUT_WEB_REPLICAS": str(self.config.web),
            }
        self.settings = settings
        return env | settings

    def _worker_ready(self, timeout: float) -> bool:
        worker = self.worker
        assert worker is not None
        port = worker.env["BROWNOUT_METRICS_PORT"]
        return wait_for(lambda: answers(f"http://127.0.0.1:{port}/metrics") or not worker.alive, timeout) and worker.alive

    @staticmethod
    def _restore_proxy(proxy: ProxyProcess) -> None:
        with contextlib.suppress(Exception):
            proxy.pass_through()
        proxy.stop()

    def _restore_commands(self) -> None:
        for service in sorted(self._down):
            self._command(service, up=True)

    def _command(self, service: str, *, up: bool) -> None:
        down_cmd, up_cmd = self.config.commands[service]
        command = up_cmd if up else down_cmd
        result = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120)
        if up:
            self._down.discard(service)
        else:
            self._down.add(service)
        if result.returncode != 0:
            self.config.echo(
                f"[{self.mode}] {service} {'up' if up else 'down'} command exited {result.returncode}: {result.stderr[-500:]}"
            )

    def _drop_database(self) -> None:
        conn = admin_connect(self.base_db, "postgres")
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')
        conn.close()

    def _delete_queues(self) -> None:
        from dramatiq.common import dq_name, xq_name

        params = pika.URLParameters(self.base_rabbit)
        params.socket_timeout = params.stack_timeout = 5.0
        connection = pika.BlockingConnection(params)
        try:
            channel = connection.channel()
            for queue in (self.queue, self.email_queue):
                for name in (queue, dq_name(queue), xq_name(queue)):
                    channel.queue_delete(name)
        finally:
            connection.close()

    def _delete_redis_keys(self) -> None:
        client = redis.Redis.from_url(self.base_redis, socket_timeout=5)
        try:
            keys = list(client.scan_iter(match=self.prefix + "*", count=1000))
            for start in range(0, len(keys), 1000):
                client.delete(*keys[start : start + 1000])
        finally:
            client.close()

    # -- the run ----------------------------------------------------------------

    def _play(self) -> ModeResult:
        config = self.config
        records_path = self.out_dir / f"records-{self.mode}.json"
        cfg = {
            "urls": [web.url for web in self.webs],
            "t0": now() + 1.0,
            "duration": self.duration,
            "writes": self.writes_rate,
            "reads": self.reads_rate,
            "users": self.scenario.users,
            "hot": self.scenario.hot,
            "seed": config.seed,
            "run_id": self.tag,
            "timeout": config.client_timeout,
            "max_inflight": 512,
            "records": str(records_path),
        }
        self.t0 = float(cfg["t0"])  # type: ignore[arg-type]
        load_before = os.getloadavg()[0]
        wall_t0 = dt.datetime.now() + dt.timedelta(seconds=self.t0 - now())
        config.echo(f"[{self.mode}] load starts at {wall_t0.strftime('%H:%M:%S.%f')[:-3]} (t = 0 in the logs' local time)")
        cfg_path = self.out_dir / f"load-{self.mode}.json"
        cfg_path.write_text(json.dumps(cfg))
        child = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--load-child", str(cfg_path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            text=True,
        )
        reader = threading.Thread(target=self._read_child, args=(child,), name="load-reports", daemon=True)
        reader.start()
        timeline = threading.Thread(target=self._timeline, name="timeline", daemon=True)
        if self.mode == "brownout":
            self.backlog = Backlog(pg_url(self.base_db), self.dbname, self.queue, self.base_rabbit, self.live).start()
        timeline.start()
        hard_stop = self.t0 + self.duration + config.client_timeout + 30
        try:
            with Progress(config.progress, config.echo) as progress:
                while child.poll() is None and now() < hard_stop:
                    self._show(progress)
                    self._run_main_calls(0.25)
                self._show(progress)
            if child.poll() is None:
                raise RuntimeError("the load generator did not stop in time")
            if child.returncode != 0:
                raise RuntimeError(f"the load generator exited with {child.returncode}")
            self._stop.set()
            timeline.join(timeout=60)
            drained_after = self._wait_for_drain()
        finally:
            self._stop.set()
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.wait(timeout=10)
            reader.join(timeout=5)
            if self.backlog is not None:
                self.backlog.stop()
            timeline.join(timeout=30)
        data = json.loads(records_path.read_text())
        audit = self._audit(data["writes"], data["requests"])
        result = ModeResult(
            mode=self.mode,
            duration=self.duration,
            writes_rate=self.writes_rate,
            reads_rate=self.reads_rate,
            requests=data["requests"],
            writes=data["writes"],
            shed=data["shed"],
            faults=self.records,
            transitions=[(t - self.t0, dyno, old, new) for t, dyno, old, new in self.tracker.transitions],
            backlog=[(t - self.t0, n) for t, n in (self.backlog.samples if self.backlog else [])],
            queue_depth=[(t - self.t0, n) for t, n in (self.backlog.depth if self.backlog else [])],
            audit=audit,
            timings=[],
            drained_after_load=drained_after,
            settings=self.settings,
            load_cpu_seconds=data.get("cpu_seconds", 0.0),
            loadavg=(load_before, os.getloadavg()[0]),
        )
        result.timings = outage_timings(result)
        return result

    def _run_main_calls(self, wait: float) -> None:
        """Run what the timeline asked of the main thread (starting processes), waiting up to *wait* s for it."""
        try:
            fn, done = self._main_calls.get(timeout=wait)
        except queue.Empty:
            return
        try:
            fn()
        finally:
            done.set()

    def _on_main_thread(self, fn: Callable[[], None], timeout: float = 30.0) -> bool:
        done = threading.Event()
        self._main_calls.put((fn, done))
        return done.wait(timeout)

    def _read_child(self, child: subprocess.Popen[str]) -> None:
        assert child.stdout is not None
        for line in child.stdout:
            with contextlib.suppress(ValueError, KeyError):
                self.live.feed(json.loads(line))

    def _show(self, progress: Progress) -> None:
        rate, p99 = self.live.rate_and_p99()
        counts = self.live.counts
        backlog = self.backlog.current if self.backlog is not None else 0
        breaker = self.tracker.summary() if self.mode == "brownout" else "none (naive)"
        progress.show(
            {"mode": self.mode, "t": max(0.0, now() - self.t0), "breaker": breaker, "rate": rate, "p99": p99}
            | counts
            | {"backlog": backlog, "fault": self.current_fault}
        )

    def _wait_for_drain(self) -> float | None:
        """After the load: until nothing acknowledged is left to apply (and the queue is empty); bounded."""
        if self.backlog is None:
            return 0.0
        started = now()
        give_up = started + self.scenario.drain_timeout
        steady = 0
        while now() < give_up:
            if self.backlog.current == 0 and self.backlog.queue_messages == 0 and not self.live.new_queued:
                steady += 1
                if steady >= 8:  # two seconds of nothing left: unacknowledged publishes included
                    return now() - started
            else:
                steady = 0
            time.sleep(0.25)
        return None

    # -- the timeline ---------------------------------------------------------------

    def _sleep_until(self, t: float) -> bool:
        """Sleep until t0 + t; False when the run is stopping."""
        while now() < self.t0 + t:
            if self._stop.wait(min(0.05, self.t0 + t - now())):
                return False
        return True

    def _timeline(self) -> None:
        for fault in self.faults:
            if not self._sleep_until(fault.start):
                return
            record = FaultRecord(fault.kind, fault.label, now() - self.t0, fault.end)
            self.records.append(record)
            self.current_fault = fault.label
            try:
                getattr(self, f"_fault_{fault.kind}")(fault, record)  # sets record.end when the fault is undone
            finally:
                self.current_fault = ""

    def _outage(self, service: str, seconds: float, record: FaultRecord, style: str = "refuse") -> bool:
        """Break *service* for *seconds* (proxy, or the operator's commands) and restore it; False if stopping."""
        end = now() - self.t0 + seconds
        if service in self.config.commands:
            self._command(service, up=False)
            record.details["via"] = "command"
            try:
                return self._sleep_until(end)
            finally:
                self._command(service, up=True)
                record.end = now() - self.t0
        proxy = self.proxies.get(service)
        if proxy is None:  # naive mode has no RabbitMQ or Redis: the fault is a no-op there
            record.details["via"] = "not used by this mode"
            try:
                return self._sleep_until(end)
            finally:
                record.end = now() - self.t0
        record.details["via"] = f"proxy {style}"
        if style == "silence":
            proxy.silence()
        else:
            proxy.refuse()
            proxy.reset_existing()
        try:
            return self._sleep_until(end)
        finally:
            proxy.pass_through()
            record.end = now() - self.t0

    def _fault_ssl_kills(self, fault: Fault, record: FaultRecord) -> None:
        killed: list[int] = []
        t = fault.start
        while t < fault.end and self._sleep_until(t):
            killed.append(self._terminate_backends())
            t += fault.every
        record.details["killed_per_round"] = killed
        record.end = max(now() - self.t0, fault.end)

    def _terminate_backends(self) -> int:
        conn = admin_connect(self.base_db, "postgres")
        try:
            with conn.cursor() as cur:  # an sslmode=require admin link, as the seed's error came
                cur.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
                    (self.dbname, self.app_name),
                )
                return int(cur.fetchone()[0])
        finally:
            conn.close()

    def _fault_db_outage(self, fault: Fault, record: FaultRecord) -> None:
        self._outage("db", fault.duration, record, self.config.outage_style)

    def _fault_rabbit_outage(self, fault: Fault, record: FaultRecord) -> None:
        self._outage("rabbit", fault.duration, record)

    def _fault_redis_outage(self, fault: Fault, record: FaultRecord) -> None:
        self._outage("redis", fault.duration, record)

    def _fault_worker_kill(self, fault: Fault, record: FaultRecord) -> None:
        if not self._outage("db", fault.duration, record, self.config.outage_style):
            return
        if self.worker is None or self.backlog is None:
            record.details["kill"] = "no worker in this mode"
            return
        # Mid-drain: once the worker has applied some of the backlog, and while some is left.
        peak = max(self.backlog.current, 1)
        mid = wait_for(lambda: 0 < self.backlog.current <= 0.85 * peak or self._stop.is_set(), 20, 0.05)  # type: ignore[union-attr]
        if self._stop.is_set():
            return
        record.details |= {"backlog_at_kill": self.backlog.current, "peak_before": peak, "mid_drain": mid}
        record.details["killed_at"] = now() - self.t0
        self.worker.kill(signal.SIGKILL)
        self.worker.process.wait(timeout=10)  # type: ignore[union-attr]
        if not self._sleep_until(now() - self.t0 + 2.0):
            return
        worker = self.worker
        if not self._on_main_thread(lambda: None if worker.start() else None):  # PDEATHSIG follows the starting thread
            return
        record.details["restarted_at"] = now() - self.t0
        record.details["ready_at"] = (now() - self.t0) if self._worker_ready(60) else None
        record.details["worker_alive"] = self.worker.alive

    # -- the audit -------------------------------------------------------------------

    def _audit(self, writes: list[dict[str, Any]], requests: list[list[Any]]) -> dict[str, Any]:
        conn = admin_connect(self.base_db, self.dbname)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT id::text, read, read_stamp, subject FROM notifications")
                rows = {ident: (read, stamp, subject) for ident, read, stamp, subject in cur.fetchall()}
                cur.execute("SELECT subject, count(*) FROM notifications GROUP BY subject HAVING count(*) > 1")
                duplicate_subjects = {subject: n for subject, n in cur.fetchall()}
                applied: dict[str, tuple[str, str, int, int, str, str]] = {}
                dead_letters = conflicts = duplicate_outbox = duplicate_keys = 0
                if self.mode == "brownout":
                    cur.execute(
                        "SELECT command_id::text, name, entity_key, accepted_stamp, apply_seq, path, outcome"
                        " FROM applied_commands"
                    )
                    applied = {row[0]: row[1:] for row in cur.fetchall()}
                    cur.execute(
                        "SELECT count(*) FROM (SELECT 1 FROM outbox GROUP BY notification_id, kind HAVING count(*) > 1) d"
                    )
                    duplicate_outbox = int(cur.fetchone()[0])
                    cur.execute(
                        "SELECT count(*) FROM (SELECT 1 FROM applied_commands GROUP BY name, scope, idempotency_key"
                        " HAVING count(*) > 1) d"
                    )
                    duplicate_keys = int(cur.fetchone()[0])
                    cur.execute("SELECT count(*) FROM dead_letters")
                    dead_letters = int(cur.fetchone()[0])
                    cur.execute("SELECT count(*) FROM command_conflicts")
                    conflicts = int(cur.fetchone()[0])
        finally:
            conn.close()
        return audit_writes(
            self.mode,
            writes,
            requests,
            rows=rows,
            applied=applied,
            duplicate_subjects=duplicate_subjects,
            duplicate_outbox=duplicate_outbox,
            duplicate_keys=duplicate_keys,
            dead_letters=dead_letters,
            conflicts=conflicts,
        )


# ---------------------------------------------------------------------------
# The audit and the figures (pure functions of the records and the database's rows)
# ---------------------------------------------------------------------------

ACK = (200, 201, 202)


def command_id_of(write: dict[str, Any]) -> str:
    if write["kind"] == "create":
        return str(command_id_for(CREATE, f"user:{write['user']}", write["key"]))
    name = MARK_READ if write["kind"] == "read" else MARK_UNREAD
    return str(command_id_for(name, f"notification:{write['nid']}", write["key"]))


def audit_writes(
    mode: str,
    writes: list[dict[str, Any]],
    requests: list[list[Any]],
    *,
    rows: dict[str, tuple[bool, int, str]],
    applied: dict[str, tuple[str, str, int, int, str, str]],
    duplicate_subjects: dict[str, int],
    duplicate_outbox: int = 0,
    duplicate_keys: int = 0,
    dead_letters: int = 0,
    conflicts: int = 0,
) -> dict[str, Any]:
    """Acknowledged writes against the database: lost, duplicated, out of order (see the module docstring)."""
    acked = [w for w in writes if w["status"] in ACK]
    lost: list[str] = []
    unacked_applied = 0
    mismatched_ids = 0
    row_subjects = {subject for _, _, subject in rows.values()}
    for write in writes:
        present = _present(mode, write, rows, row_subjects, applied)
        if write["status"] in ACK:
            if not present:
                lost.append(write["key"])
            if write["status"] == 202 and write.get("cid") and write["cid"] != command_id_of(write):
                mismatched_ids += 1
        elif present:
            unacked_applied += 1
    subjects = {f"chaos {w['key']}" for w in writes if w["kind"] == "create"}
    phantoms = len(row_subjects - subjects)
    duplicated = sum(n - 1 for n in duplicate_subjects.values()) + duplicate_outbox + duplicate_keys

    reordered, entities, superseded = _order(mode, writes, rows, applied)
    reads = [r for r in requests if r[3] in ("list", "get")]
    answered = sum(1 for r in reads if r[4] == 200)
    created_by = {w["id"]: w["status"] for w in writes if w["kind"] == "create" and w.get("id")}
    not_found = [r[6].split(" ")[0] for r in reads if r[4] == 404 and r[3] == "get"]
    return {
        "writes_sent": len(writes),
        "acknowledged": len(acked),
        "acknowledged_applied": sum(1 for w in acked if w["status"] in (200, 201)),
        "acknowledged_queued": sum(1 for w in acked if w["status"] == 202),
        "present": len(acked) - len(lost),
        "lost": len(lost),
        "lost_keys": lost,
        "duplicated": duplicated,
        "phantoms": phantoms,
        "reordered": reordered,
        "toggled_entities": entities,
        "superseded": superseded,
        "applied_via_queue": sum(1 for row in applied.values() if row[4] == "queued"),
        "unacknowledged_applied": unacked_applied,
        "command_id_mismatches": mismatched_ids,
        "rejected": sum(1 for w in writes if w["status"] == 503),
        "failed_writes": sum(1 for w in writes if w["status"] not in ACK and w["status"] != 503),
        "reads": len(reads),
        "reads_answered": answered,
        "reads_stale": sum(r[5] for r in reads),
        "reads_failed": len(reads) - answered,
        "reads_not_found": len(not_found),
        "reads_not_found_queued": sum(1 for ident in not_found if created_by.get(ident) == 202),
        "dead_letters": dead_letters,
        "conflicts": conflicts,
    }


def _present(
    mode: str, write: dict[str, Any], rows: dict[str, tuple[bool, int, str]], subjects: set[str], applied: dict[str, Any]
) -> bool:
    if mode == "brownout":
        found = command_id_of(write) in applied
        if write["kind"] == "create" and write.get("id"):
            found = found and write["id"] in rows
        return found
    if write["kind"] == "create":  # naive: the row exists (its id came back in the answer, or look for its subject)
        if write.get("id"):
            return write["id"] in rows
        return f"chaos {write['key']}" in subjects
    return write["status"] in ACK  # naive toggles leave no record of their own: judged by the final state (_order)


def _order(
    mode: str, writes: list[dict[str, Any]], rows: dict[str, tuple[bool, int, str]], applied: dict[str, Any]
) -> tuple[int, int, int]:
    """Per notification toggled: (entities out of order, entities toggled, superseded writes).

    Brownout: (1) among the acknowledged toggles of one notification, sent one after
    another, acceptance stamps increase; (2) in apply order (apply_seq), the writes
    that took effect have increasing stamps (a late, older one is `superseded`);
    (3) the row's final (read, read_stamp) is the one of the highest stamp applied.
    Naive: the final `read` is the value of the last acknowledged toggle (entities
    whose later toggle failed with an unknown outcome are left out)."""
    chains: dict[str, list[dict[str, Any]]] = {}
    for write in sorted(writes, key=lambda w: w["t"]):  # one toggle in flight per notification: send order
        if write["kind"] != "create":
            chains.setdefault(write["nid"], []).append(write)
    bad: set[str] = set()
    superseded = 0
    if mode == "brownout":
        by_entity: dict[str, list[tuple[int, int, str, str]]] = {}
        for _cid, (name, entity_key, stamp, seq, _path, outcome) in applied.items():
            if name in (MARK_READ, MARK_UNREAD):
                by_entity.setdefault(entity_key.partition(":")[2], []).append((seq, stamp, name, outcome))
        for nid, chain in chains.items():
            stamps = [applied[command_id_of(w)][2] for w in chain if w["status"] in ACK and command_id_of(w) in applied]
            if any(b <= a for a, b in pairwise(stamps)):
                bad.add(nid)
        for nid, entries in by_entity.items():
            entries.sort()
            superseded += sum(1 for e in entries if e[3] == "superseded")
            effective = [stamp for _seq, stamp, _name, outcome in entries if outcome == "applied"]
            if any(b <= a for a, b in pairwise(effective)):
                bad.add(nid)
            _seq, top_stamp, top_name, _outcome = max(entries, key=lambda e: e[1])
            row = rows.get(nid)
            if row is None or row[0] != (top_name == MARK_READ) or row[1] != top_stamp:
                bad.add(nid)
    else:
        for nid, chain in chains.items():
            last_ack = max((i for i, w in enumerate(chain) if w["status"] in ACK), default=None)
            if last_ack is None or any(w["status"] not in ACK for w in chain[last_ack + 1 :]):
                continue
            row = rows.get(nid)
            if row is None or row[0] != chain[last_ack]["value"]:
                bad.add(nid)
    return len(bad), len(chains), superseded


def outage_timings(result: ModeResult) -> list[dict[str, Any]]:
    """Per database outage: breaker open after its start, closed after its end (each web replica), drained."""
    timings = []
    webs = sorted({dyno for _, dyno, _, _ in result.transitions if dyno.startswith("web")})
    for index, fault in enumerate(result.faults):
        if fault.kind not in ("db_outage", "worker_kill") or result.mode != "brownout":
            continue
        start, end = fault.start, fault.end
        horizon = result.faults[index + 1].start if index + 1 < len(result.faults) else math.inf
        opened: dict[str, float | None] = {}
        closed: dict[str, float | None] = {}
        already_open: list[str] = []
        for web in webs:
            ts = [(t, new) for t, dyno, _, new in result.transitions if dyno == web]
            before = [new for t, new in ts if t < start]
            if before and before[-1] == "open":  # already open when the outage began (overload, an earlier fault)
                opened[web] = 0.0
                already_open.append(web)
            else:
                opened[web] = next((t - start for t, new in ts if new == "open" and start <= t <= end + 1), None)
            # closed for good after the outage (before the next fault): the first close not followed by a reopening
            later = [(t, new) for t, new in ts if end <= t < horizon]
            last_close = None
            for t, new in later:
                if new == "closed" and last_close is None:
                    last_close = t
                elif new != "closed":
                    last_close = None
            closed[web] = None if last_close is None else last_close - end
        opened_at = [v for v in opened.values() if v is not None]
        closed_at_all = [v for v in closed.values() if v is not None]
        fleet_open = max(opened_at) if opened and len(opened_at) == len(opened) else None
        first_open = min(opened_at, default=None)
        fleet_closed = max(closed_at_all) if closed and len(closed_at_all) == len(closed) else None
        drained = None
        peak = max((n for t, n in result.backlog if start <= t < horizon), default=None)
        if fleet_closed is not None:
            closed_at = end + fleet_closed
            drained_at = next((t for t, n in result.backlog if closed_at <= t and n == 0), None)
            drained = None if drained_at is None else drained_at - closed_at
        timings.append(
            {
                "label": fault.label,
                "kind": fault.kind,
                "start": start,
                "end": end,
                "open_first": first_open,
                "open_all": fleet_open,
                "closed_all": fleet_closed,
                "drained": drained,
                "peak_backlog": peak,
                "already_open": already_open,
                "details": fault.details,
            }
        )
    return timings


def window_stats(result: ModeResult, start: float, end: float) -> dict[str, Any]:
    """Requests scheduled in [start, end): write/read error rates, p99 of all, acknowledged writes lost."""
    reqs = [r for r in result.requests if start <= r[0] < end]
    writes = [r for r in reqs if r[3] in WRITE_KINDS]
    reads = [r for r in reqs if r[3] not in WRITE_KINDS]
    lost_keys = set(result.audit["lost_keys"])
    lost = sum(1 for w in result.writes if start <= w["t"] < end and w["key"] in lost_keys)
    write_acked = sum(1 for r in writes if r[4] in ACK)
    read_ok = sum(1 for r in reads if r[4] == 200)
    latencies = [(r[2] - r[0]) * 1000 for r in reqs]
    return {
        "requests": len(reqs),
        "writes": len(writes),
        "write_errors": len(writes) - write_acked,
        "write_error_rate": (len(writes) - write_acked) / len(writes) if writes else 0.0,
        "queued": sum(1 for r in writes if r[4] == 202),
        "reads": len(reads),
        "read_errors": len(reads) - read_ok,
        "read_error_rate": (len(reads) - read_ok) / len(reads) if reads else 0.0,
        "answered": read_ok / len(reads) if reads else 1.0,
        "stale": sum(r[5] for r in reads),
        "p99_ms": percentile(latencies, 0.99),
        "p99_reads_ms": percentile([(r[2] - r[0]) * 1000 for r in reads], 0.99),
        "p99_writes_ms": percentile([(r[2] - r[0]) * 1000 for r in writes], 0.99),
        "p50_ms": percentile(latencies, 0.50),
        "lost": lost,
    }


# ---------------------------------------------------------------------------
# Report: console and Markdown tables, PNG
# ---------------------------------------------------------------------------


def fmt_s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def fmt_pct(value: float) -> str:
    return f"{value * 100:.2f} %" if value < 0.9995 or value == 1 else f"{value * 100:.3f} %"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def targets(results: dict[str, ModeResult]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for the Brownout mode; None: not measured in this run."""
    out: list[tuple[str, str, bool | None]] = []
    result = results.get("brownout")
    if result is None:
        return out
    audit = result.audit
    for name in ("lost", "duplicated", "reordered"):
        out.append((f"0 {name} writes", str(audit[name]), audit[name] == 0))
    main = next((t for t in result.timings if t["kind"] == "db_outage"), None)
    rates = f" (run at {result.writes_rate:g} writes/s, {result.reads_rate:g} reads/s)"
    if main is None:
        return out
    stats = window_stats(result, main["start"], main["end"])
    out.append(
        (
            "every write acknowledged during the database outage, RabbitMQ up" + rates,
            f"{stats['writes'] - stats['write_errors']}/{stats['writes']} ({stats['queued']} queued)",
            stats["write_errors"] == 0,
        )
    )
    out.append(
        (
            "reads answered during the outage >= 99.9 %",
            f"{fmt_pct(stats['answered'])} ({stats['stale']} stale)",
            stats["answered"] >= TARGETS["reads_answered"],
        )
    )
    out.append(
        (
            "API p99 during the outage <= 50 ms",
            f"{stats['p99_ms']:.1f} ms (reads {stats['p99_reads_ms']:.1f}, writes {stats['p99_writes_ms']:.1f})",
            stats["p99_ms"] <= TARGETS["p99_ms"],
        )
    )
    opened = main["open_all"]
    out.append(
        (
            "breaker open within 1 s of the outage (every web replica)",
            fmt_s(opened) + (f" (first {fmt_s(main['open_first'])})" if main["open_first"] is not None else ""),
            opened is not None and opened <= TARGETS["open_within"],
        )
    )
    out.append(("database back -> every web breaker closed (reported)", fmt_s(main["closed_all"]), None))
    drained = main["drained"]
    out.append(
        (
            "backlog drained within 15 s of the breakers closing",
            fmt_s(drained) + f" (peak {main['peak_backlog']})",
            drained is not None and drained <= TARGETS["drain_within"],
        )
    )
    return out


def report_markdown(results: dict[str, ModeResult], config: ChaosConfig, started: str) -> str:
    modes = list(results)
    first = next(iter(results.values()))
    parts = [
        f"### Chaos run, scenario `{config.scenario}`, {started}",
        "",
        f"{first.writes_rate:g} writes/s + {first.reads_rate:g} reads/s for {first.duration:g} s, "
        f"{config.web} web replica(s) (`python -m app.api.serve`) and one worker (`python -m worker.serve`); "
        f"settings: {', '.join(f'`{k}={v}`' for k, v in first.settings.items() if k in RUN_SETTINGS or k in FIXED_SETTINGS)}"
        ", the seed's defaults otherwise.",
        "",
        "**Audit, from the database** (acknowledged = 201/200 applied or 202 queued):",
        "",
    ]
    audit_rows = [
        ("writes sent", "writes_sent"),
        ("acknowledged", "acknowledged"),
        ("  of which queued (202)", "acknowledged_queued"),
        ("applied by the worker (path queued)", "applied_via_queue"),
        ("present in the database", "present"),
        ("lost", "lost"),
        ("duplicated", "duplicated"),
        ("rows no write asked for", "phantoms"),
        ("out of acceptance order (notifications)", "reordered"),
        ("notifications toggled", "toggled_entities"),
        ("late writes superseded (not applied over a newer one)", "superseded"),
        ("rejected (503, retry with the same key)", "rejected"),
        ("failed (500, timeout, connection)", "failed_writes"),
        ("unacknowledged but applied", "unacknowledged_applied"),
        ("reads", "reads"),
        ("reads answered", "reads_answered"),
        ("  of which stale", "reads_stale"),
        ("reads failed", "reads_failed"),
        ("  of which 404 for a notification created by an acknowledged write", "reads_not_found"),
        ("    created by a queued write (202), read before it was applied", "reads_not_found_queued"),
        ("dead letters", "dead_letters"),
    ]
    parts.append(md_table(["", *modes], [[label] + [str(results[m].audit[key]) for m in modes] for label, key in audit_rows]))
    parts += ["", "**During each fault** (requests scheduled inside the fault's window; p99 of all requests, client side):", ""]
    rows = []
    reference = results.get("brownout") or first
    for fault in reference.faults:
        for mode in modes:
            match = next((f for f in results[mode].faults if f.kind == fault.kind), None)
            if match is None:
                continue
            stats = window_stats(results[mode], match.start, match.end)
            rows.append(
                [
                    fault.label if mode == modes[0] else "",
                    mode,
                    f"{fmt_pct(stats['write_error_rate'])} ({stats['write_errors']}/{stats['writes']})",
                    f"{fmt_pct(stats['read_error_rate'])} ({stats['read_errors']}/{stats['reads']})",
                    f"{stats['p99_ms']:.1f} ({stats['p99_reads_ms']:.1f} / {stats['p99_writes_ms']:.1f})",
                    str(stats["queued"]),
                    str(stats["stale"]),
                    str(stats["lost"]),
                ]
            )
    parts.append(
        md_table(["fault", "mode", "write errors", "read errors", "p99 ms (reads / writes)", "queued", "stale", "lost"], rows)
    )
    brownout = results.get("brownout")
    if brownout is not None and brownout.timings:
        parts += ["", "**Breaker and backlog** (Brownout; from the dynos' transition log lines and the database):", ""]
        rows = []
        for t in brownout.timings:
            extra = ""
            if t["kind"] == "worker_kill":
                d = t["details"]
                extra = (
                    f"worker SIGKILLed at backlog {d.get('backlog_at_kill')} of {d.get('peak_before')}"
                    f" (mid-drain: {d.get('mid_drain')}), restarted"
                )
            rows.append(
                [
                    t["label"],
                    fmt_s(t["open_first"])
                    + " / "
                    + fmt_s(t["open_all"])
                    + (f" ({', '.join(t['already_open'])} already open)" if t["already_open"] else ""),
                    fmt_s(t["closed_all"]),
                    fmt_s(t["drained"]),
                    str(t["peak_backlog"]),
                    extra,
                ]
            )
        header = ["outage", "breaker open (first / all)", "back -> all closed", "closed -> drained", "peak backlog", ""]
        parts.append(md_table(header, rows))
        parts += ["", "**Targets**:", ""]
        parts.append(
            md_table(
                ["target", "measured", "met"],
                [[name, value, "-" if met is None else ("yes" if met else "**no**")] for name, value, met in targets(results)],
            )
        )
    lag = {m: harness_lag(results[m]) for m in modes}
    cpu = {m: results[m].load_cpu_seconds * 1000 / max(1, len(results[m].requests)) for m in modes}
    parts += [
        "",
        "Harness: open-loop load from a child process, latency from each request's scheduled time; its send lag p99 "
        + ", ".join(f"{m} {v:.1f} ms" for m, v in lag.items())
        + "; its CPU per request "
        + ", ".join(f"{m} {v:.2f} ms" for m, v in cpu.items())
        + "; requests shed by the client (over 512 in flight): "
        + ", ".join(f"{m} {results[m].shed}" for m in modes)
        + f"; machine ({os.cpu_count()} cores, shared) 1-min load average at start -> end: "
        + ", ".join(f"{m} {results[m].loadavg[0]:.1f} -> {results[m].loadavg[1]:.1f}" for m in modes)
        + ".",
    ]
    return "\n".join(parts) + "\n"


def harness_lag(result: ModeResult) -> float:
    return percentile([(r[1] - r[0]) * 1000 for r in result.requests], 0.99)


def plot(results: dict[str, ModeResult], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    modes = list(results)
    rows = ["requests/s", "p99 latency (ms)", "breaker state", "backlog (queued writes)", "errors/s"]
    fig, axes = plt.subplots(len(rows), len(modes), figsize=(7.5 * len(modes), 12), sharex="col", squeeze=False)
    colors = {
        "ssl_kills": "#f4a261",
        "db_outage": "#e63946",
        "rabbit_outage": "#457b9d",
        "redis_outage": "#2a9d8f",
        "worker_kill": "#9b5de5",
    }
    for col, mode in enumerate(modes):
        result = results[mode]
        horizon = int(result.duration)  # whole seconds: a last partial bin would show a false drop
        bins: list[list[list[Any]]] = [[] for _ in range(horizon)]
        for r in result.requests:
            index = int(r[0])
            if 0 <= index < horizon:
                bins[index].append(r)
        xs = list(range(horizon))
        writes = [sum(1 for r in b if r[3] in WRITE_KINDS) for b in bins]
        reads = [sum(1 for r in b if r[3] not in WRITE_KINDS) for b in bins]
        p99 = [percentile([(r[2] - r[0]) * 1000 for r in b], 0.99) if b else float("nan") for b in bins]
        write_err = [sum(1 for r in b if r[3] in WRITE_KINDS and r[4] not in ACK) for b in bins]
        read_err = [sum(1 for r in b if r[3] not in WRITE_KINDS and r[4] != 200) for b in bins]
        queued = [sum(1 for r in b if r[4] == 202) for b in bins]
        stale = [sum(r[5] for r in b if r[3] not in WRITE_KINDS) for b in bins]
        ax = axes[0][col]
        ax.plot(xs, writes, label="writes", color="#1d3557")
        ax.plot(xs, reads, label="reads", color="#2a9d8f")
        ax.plot(xs, queued, label="writes queued (202)", color="#9b5de5", linewidth=0.8)
        ax.set_title(f"{mode}: {result.writes_rate:g} writes/s + {result.reads_rate:g} reads/s")
        ax.legend(loc="upper right", fontsize=7)
        ax = axes[1][col]
        ax.plot(xs, p99, color="#e63946")
        ax.axhline(TARGETS["p99_ms"], color="grey", linestyle=":", linewidth=0.8)
        ax.set_yscale("log")
        ax = axes[2][col]
        webs = sorted({dyno for _, dyno, _, _ in result.transitions})
        if result.mode == "brownout" and webs:
            for offset, dyno in enumerate(webs):
                ts = [(t, STATE_LEVEL.get(new, 0)) for t, d, _, new in result.transitions if d == dyno]
                xs_s = [max(0.0, t) for t, _ in ts] + [result.duration]
                ys_s = [lvl for _, lvl in ts] + [ts[-1][1]]
                ax.step(xs_s, [y + 0.04 * offset for y in ys_s], where="post", label=dyno)
            ax.set_yticks([0, 1, 2], ["closed", "half open", "open"])
            ax.legend(loc="upper right", fontsize=7)
        else:
            ax.text(0.5, 0.5, "no breaker", ha="center", va="center", transform=ax.transAxes)
            ax.set_yticks([])
        ax = axes[3][col]
        if result.backlog:
            ax.plot(
                [t for t, _ in result.backlog], [n for _, n in result.backlog], color="#9b5de5", label="acknowledged, not applied"
            )
            if result.queue_depth:
                ax.plot(
                    [t for t, _ in result.queue_depth],
                    [n for _, n in result.queue_depth],
                    color="grey",
                    linewidth=0.8,
                    label="RabbitMQ ready",
                )
            ax.legend(loc="upper right", fontsize=7)
        else:
            ax.text(0.5, 0.5, "no queue", ha="center", va="center", transform=ax.transAxes)
        ax = axes[4][col]
        ax.plot(xs, write_err, label="write errors (not acknowledged)", color="#e63946")
        ax.plot(xs, read_err, label="read errors", color="#f4a261")
        ax.plot(xs, stale, label="stale reads (answered)", color="#2a9d8f", linewidth=0.8)
        ax.legend(loc="upper right", fontsize=7)
        ax.set_xlabel("seconds since the load started")
        for row_index in range(len(rows)):
            ax = axes[row_index][col]
            for fault in result.faults:
                ax.axvspan(fault.start, fault.end, color=colors.get(fault.kind, "grey"), alpha=0.15)
                killed = fault.details.get("killed_at")
                if killed is not None:
                    ax.axvline(killed, color="#9b5de5", linestyle="--", linewidth=0.8)
            if col == 0:
                ax.set_ylabel(rows[row_index])
        for fault in result.faults:
            top = axes[0][col]
            where = top.get_xaxis_transform()
            top.text(fault.start, 0.02, " " + fault.label, transform=where, fontsize=6, rotation=90, va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class ChaosResult:
    modes: dict[str, ModeResult]
    markdown: str
    out_dir: Path
    png: Path | None
    faults: list[Fault]

    @property
    def brownout(self) -> ModeResult:
        return self.modes["brownout"]


def run_chaos(config: ChaosConfig) -> ChaosResult:
    scenario = SCENARIOS[config.scenario]
    faults, natural = scenario.timeline(outage=config.outage, only=config.faults)
    duration = config.duration if config.duration is not None else natural
    kept = [f for f in faults if f.end + (8 if f.kind == "worker_kill" else 2) <= duration]
    for dropped in faults[len(kept) :]:
        config.echo(f"chaos: {dropped.label} at {dropped.start:g} s does not fit in {duration:g} s: left out")
    started = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    out_dir = config.out_dir or ROOT / "bench" / "out" / f"chaos-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    config.echo(
        f"chaos: scenario {config.scenario}, {duration:g} s per mode, modes {', '.join(config.modes)}; timeline: "
        + "; ".join(f"{f.start:g}-{f.end:g} s {f.label}" for f in kept)
    )
    if not config.seed_defaults:
        config.echo("chaos: run settings " + " ".join(f"{k}={v}" for k, v in (RUN_SETTINGS | FIXED_SETTINGS).items()))
    results: dict[str, ModeResult] = {}
    for mode in config.modes:
        results[mode] = ModeRun(config, mode, out_dir, kept, duration).run()
    markdown = report_markdown(results, config, started)
    (out_dir / "summary.md").write_text(markdown)
    png = plot(results, out_dir / "chaos.png") if config.plot else None
    return ChaosResult(modes=results, markdown=markdown, out_dir=out_dir, png=png, faults=kept)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="full")
    parser.add_argument("--writes", type=float, help="writes per second (full: 100, short: 40)")
    parser.add_argument("--reads", type=float, help="reads per second (full: 200, short: 80)")
    parser.add_argument("--duration", type=float, help="seconds of load per mode (default: the scenario's)")
    parser.add_argument("--outage", type=float, help="length of the main database outage, seconds (full: 30)")
    parser.add_argument("--faults", help="comma-separated subset: ssl_kills,db_outage,rabbit_outage,redis_outage,worker_kill")
    parser.add_argument("--modes", default="brownout,naive", help="brownout,naive (default) or one of them")
    parser.add_argument("--web", type=int, default=2, help="web replicas (default 2)")
    parser.add_argument("--seed-defaults", action="store_true", help="keep the seed's breaker, health and gate settings")
    parser.add_argument("--outage-style", choices=("refuse", "silence"), default="refuse")
    parser.add_argument("--out", type=Path, help="output folder (default bench/out/chaos-<time>)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--seed", type=int, default=1)
    for service in ("db", "rabbit", "redis"):
        parser.add_argument(f"--{service}-down", help=f"shell command that takes {service} down instead of the proxy")
        parser.add_argument(f"--{service}-up", help=f"shell command that brings {service} back (also run on exit)")
    parser.add_argument("--load-child", help=argparse.SUPPRESS)
    parser.add_argument("--proxy-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for service in ("db", "rabbit", "redis"):
        down, up = getattr(args, f"{service}_down"), getattr(args, f"{service}_up")
        if bool(down) != bool(up):
            parser.error(f"--{service}-down and --{service}-up go together")
    return args


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.load_child:
        load_child(args.load_child)
        return 0
    if args.proxy_child:
        proxy_child(args.proxy_child)
        return 0
    signal.signal(signal.SIGTERM, _raise_interrupt)
    commands = {
        s: (getattr(args, f"{s}_down"), getattr(args, f"{s}_up")) for s in ("db", "rabbit", "redis") if getattr(args, f"{s}_down")
    }
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not modes or any(m not in ("brownout", "naive") for m in modes):
        raise SystemExit("--modes: brownout, naive or both")
    config = ChaosConfig(
        scenario=args.scenario,
        writes=args.writes,
        reads=args.reads,
        duration=args.duration,
        outage=args.outage,
        faults=set(args.faults.split(",")) if args.faults else None,
        modes=modes,
        web=args.web,
        seed_defaults=args.seed_defaults,
        outage_style=args.outage_style,
        out_dir=args.out,
        progress=False if args.no_progress else None,
        seed=args.seed,
        commands=commands,
        plot=not args.no_plot,
    )
    try:
        result = run_chaos(config)
    except KeyboardInterrupt:
        print("chaos: interrupted; everything it changed was restored and removed", file=sys.stderr)
        return 130
    print()
    print(result.markdown)
    print(
        f"chaos: summary {result.out_dir / 'summary.md'}"
        + (f", plot {result.png}" if result.png else " (no plot: matplotlib missing)")
    )
    brownout = result.modes.get("brownout")
    if brownout is not None:
        audit = brownout.audit
        return 0 if audit["lost"] == audit["duplicated"] == audit["reordered"] == 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
