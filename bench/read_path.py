"""What a read costs, beside a bare peer: `.venv/bin/python bench/read_path.py [--duration S] [--rate R] [--auth-only]`.

Prints, in one run (about 90 s with the defaults), for `GET /notifications/{id}`:

- server-side latency p50/p99 (a pure-ASGI timing middleware of this bench around the app, in-thread uvicorn,
  N sequential requests per case) of a fresh cache hit, a cache miss served by a healthy database (the item's
  Redis entry deleted before each request), and a stale read from Redis while the database is unreachable (a
  server whose DATABASE_URL points at a closed port, measured once its breaker has opened); every stale response
  must carry `X-Brownout: stale` or the bench fails. Also `services.reads.notification()` called directly in that
  server's process. Target: stale p99 <= 5 ms.
- Brownout's served read against a peer, in the same run. Brownout: the reference app as a web process
  (`uvicorn --factory app.api.main:app_from_environment`), callers authenticated (a service key, sent as
  `Authorization: Bearer` with every request) and limited per caller through Redis as in production
  (BROWNOUT_RATE_LIMIT_READS high enough never to refuse, checked on every request), admission control at its
  default (on), Prometheus in multiprocess mode as `brownout web` sets it up. The peer (bench/readkit/peer.py):
  plain Starlette, one route doing one `redis.asyncio` GET of the same notification JSON, answered as is; it gets
  the same header. Both run under the web dyno's uvicorn flags (src/brownout/cli.py: --proxy-headers,
  --timeout-graceful-shutdown, --no-server-header, its head-bounded httptools protocol; uvloop named),
  one worker process, access log off, one at a time beside the other idle. Two cases: (a) a fresh cache hit
  (BROWNOUT_CACHE_FRESH_SECONDS=3600), every Brownout answer `Cache-Status: Brownout; hit`; (b) a stale read,
  a Brownout server whose DATABASE_URL points at a closed port, its breaker open (read from /ready), every
  answer `X-Brownout: stale`: a 200 of Brownout's without it fails the bench. In (a) a 200 that is not a hit
  (under overload Brownout may answer from the database) is counted and printed, the first one's header shown.
  - throughput: closed-loop requests/s under `wrk -t1 -c C -d S` (ids in turn, a Lua script that also checks
    each answer's header), after a 1 s warm-up; any non-2xx answer or socket error fails the bench. Prints
    `brownout N req/s, peer M req/s, ratio: X.XX` per case. Target: ratio >= 0.60. C is 6 by default, the
    most at which Brownout's admission control never refuses this route: past capacity a closed loop makes
    the time in the process pass 5 ms, which halves the limit down to 4 in flight, and a cached read such as
    this one is admitted up to 1.5 times the limit. Past 6 it answered part of the loop 503, by design, which
    fails the bench (at 8 connections 1 % of one run, at 16 and 32 more). The peer did within 3 % as much at 6
    as at 8. Without wrk (or with --no-wrk), the closed-loop mode of the Python generator below, whose own
    CPU bounds the figures.
  - latency: open loop at a fixed rate, the same for both servers and both cases: --rate, by default half the
    peer's requests/s in case (a). bench/readkit/load.py sends on its schedule whatever the server does, over
    --connections keep-alive connections (32), and measures each latency from the request's scheduled time (a
    request waiting for a connection counts its wait; no coordinated omission); 1 s at the rate first, not
    counted. A failure (not 200, e.g. admission control's 503, or past --timeout) ranks above every answer.
    Prints p50/p99 of both and `p99 ratio: X.XX`. Target: <= 2.0. The generator's own lag behind its
    schedule (uvloop's timers count whole ms) is printed; a case where its p99 passed 2 ms is marked
    GENERATOR LAGGED: there the latencies overstate both servers'.
- what identifying the caller costs each request (`--auth-only` prints just this, in seconds): the
  authenticator's `identify` for a service key, an HS256 user token and an ES256 user token (its JWKS
  served on loopback), each with its verified-token cache warm, best of 5 rounds of N calls, beside the
  stale read's p99 it is paid on top of. Target: under 50 us each.

The 1-minute load average is printed at the start and at the end; a run started above 1.5 proves nothing and
says so (the machine's absolute figures swing 2-4x between hours: compare the ratios of one run).
DATABASE_URL / RABBITMQ_URL / REDIS_URL default to the local set-up. It works in a throwaway database, queue and
Redis key prefix, all removed at the end. wrk: `apt-get install -y wrk` (Debian's 4.1.0).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pika
import psycopg2
import redis
from sqlalchemy.engine import make_url

from brownout._db import BreakerState
from brownout._dispatch.queues import queue_declarations
from brownout._settings import Settings, load_settings
from brownout.cli import WEB_GRACEFUL_SHUTDOWN_SECONDS, WEB_HTTP_PROTOCOL

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/read_path.py`: the reference service (app/) and tests.support importable
    sys.path.insert(0, str(ROOT))

from app.api.services import Services  # noqa: E402
from app.schema import upgrade_database  # noqa: E402
from bench.chaoskit.processes import clean_env, die_with_parent  # noqa: E402
from tests.support.api_server import free_port, serve_in_thread  # noqa: E402
from tests.support.credentials import AS_SERVICE, SERVICE_KEY, SERVICE_KEY_ENTRY  # noqa: E402
from tests.support.processes import stop  # noqa: E402

LOCAL_DB = "postgresql://brownout:brownout@127.0.0.1:5432/brownout?sslmode=require"
LOCAL_RABBIT = "amqp://guest:guest@127.0.0.1:5672/%2F"
LOCAL_REDIS = "redis://127.0.0.1:6379/0"
NOTE = {"user_id": 1, "email": "bench@example.com", "subject": "bench", "body": "x" * 200}
BROWNOUT_APP = "app.api.main:app_from_environment"
PEER_APP = "bench.readkit.peer:create_app"
# What each case's every Brownout answer must carry: a header (lower case, as uvicorn sends it) and its value's start.
CASES = {"hit": ("cache-status", "Brownout; hit"), "stale": ("x-brownout", "stale")}
CASE_LABELS = {"hit": "fresh cache hit", "stale": "stale, database unreachable"}
LOAD_LIMIT = 1.5  # the 1-minute load average above which a run's figures prove nothing
LAG_LIMIT_MS = 2.0  # the generator's p99 lag behind its schedule above which a case is marked


class Timing:
    """Pure ASGI: milliseconds from the request reaching the app to the last body chunk sent."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.samples: list[float] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()

        async def timed_send(message: Any) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.samples.append((time.perf_counter() - start) * 1000)

        await self.app(scope, receive, timed_send)


def admin(url: str, statement: str) -> None:
    conn = psycopg2.connect(make_url(url).set(drivername="postgresql", database="postgres").render_as_string(False))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(statement)
    conn.close()


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@contextmanager
def timed_server(settings: Settings) -> Iterator[tuple[httpx.Client, Services, Timing]]:
    """The app served in this process (tests/support/api_server.py), inside the timing middleware."""
    timings: list[Timing] = []

    def wrap(app: Any) -> Timing:
        timings.append(Timing(app))
        return timings[-1]

    with serve_in_thread(settings, wrap=wrap) as api:
        yield api.client, api.services, timings[0]


def expect(response: httpx.Response, case: str) -> None:
    """Fail loudly unless the response is a 200 served the way *case* says: hit, miss or stale."""
    status = response.headers.get("Cache-Status", "")
    stale = response.headers.get("X-Brownout") == "stale"
    served = "stale" if stale else "miss" if "fwd=miss" in status else "hit" if status.startswith("Brownout; hit") else "?"
    if response.status_code != 200 or served != case:
        raise SystemExit(f"expected a {case} read, got {response.status_code} {dict(response.headers)} {response.text[:200]}")


def timed_reads(client: httpx.Client, timing: Timing, ids: list[str], count: int, case: str, evict: Any = None) -> list[float]:
    timing.samples.clear()
    for i in range(count):
        ident = ids[i % len(ids)]
        if evict is not None:
            evict(ident)
        expect(client.get(f"/notifications/{ident}"), case)
    give_up = time.monotonic() + 5  # the middleware records after the last send: the client may be first
    while len(timing.samples) < count and time.monotonic() < give_up:
        time.sleep(0.001)
    # the previous phase's last sample may land after the clear: keep this phase's own
    assert len(timing.samples) >= count, len(timing.samples)
    return list(timing.samples[-count:])


def stale_in_process(services: Services, ids: list[str], count: int) -> list[float]:
    samples = []
    for i in range(count):
        ident = uuid.UUID(ids[i % len(ids)])
        start = time.perf_counter()
        result = services.reads.notification(ident)
        samples.append((time.perf_counter() - start) * 1000)
        if not result.stale:
            raise SystemExit(f"expected a stale read in-process, got {result.headers()}")
    return samples


# -- Brownout and its peer as web processes ------------------------------------------------------------------


def uvicorn_argv(app: str, port: int) -> list[str]:
    """The web dyno's uvicorn command (src/brownout/cli.py's `_web`), one process, its access log off: its HTTP
    protocol (httptools with the bound on a request head) and the event loop named (uvloop: what `auto` picks)."""
    argv = [sys.executable, "-m", "uvicorn", app, "--factory", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    argv += ["--proxy-headers", "--timeout-graceful-shutdown", str(WEB_GRACEFUL_SHUTDOWN_SECONDS), "--no-server-header"]
    head = str(Settings.model_fields["max_head_bytes"].default)
    return argv + ["--http", WEB_HTTP_PROTOCOL, "--h11-max-incomplete-event-size", head, "--loop", "uvloop", "--no-access-log"]


def answers(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        return httpx.get(url, timeout=1, headers=headers).status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def served(app: str, env: dict[str, str], ready_path: str) -> Iterator[str]:
    """*app* under uvicorn_argv in a process (and a session: a scheduling group) of its own, until it answers
    *ready_path* with a 200; its log kept out of the figures, shown if it fails to start."""
    port = free_port()
    log = tempfile.TemporaryFile("w+")
    process = subprocess.Popen(
        uvicorn_argv(app, port),
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        give_up = time.monotonic() + 60
        while not answers(f"{url}{ready_path}", AS_SERVICE):
            if process.poll() is not None or time.monotonic() > give_up:
                log.seek(0)
                raise RuntimeError(f"{app} did not start (exit {process.poll()}):\n{log.read()[-4000:]}")
            time.sleep(0.1)
        yield url
    finally:
        stop(process, grace=20)
        log.close()


def breaker_state(url: str) -> str:
    state: str = httpx.get(f"{url}/ready", headers=AS_SERVICE, timeout=5).json()["parts"]["breaker"]
    return state


def open_breaker(url: str, ids: list[str]) -> int:
    """Reads (each must be stale) until the server's breaker is open; how many it took."""
    for tries in range(1, 51):
        expect(httpx.get(f"{url}/notifications/{ids[tries % len(ids)]}", headers=AS_SERVICE, timeout=10), "stale")
        if breaker_state(url) == BreakerState.OPEN.value:
            return tries
    raise SystemExit(f"the breaker did not open: {httpx.get(f'{url}/ready', headers=AS_SERVICE).text}")


# -- load ------------------------------------------------------------------------------------------------------


def wrk_script(ids: list[str], check: tuple[str, str]) -> str:
    """Ids in turn, the Authorization header, and a count of answers whose *check* header does not start as it should,
    the first one's value kept (the peer runs the same script: the same cost, its count not looked at)."""
    name, prefix = check
    paths = ", ".join(f'"/notifications/{ident}"' for ident in ids)
    return f"""
local paths = {{{paths}}}
local i = 0
unmatched = 0
sample = ""
statuses = {{}}
local threads = {{}}
wrk.headers["Authorization"] = "Bearer {SERVICE_KEY}"
function setup(thread) table.insert(threads, thread) end
function request()
  i = i + 1
  return wrk.format("GET", paths[(i % #paths) + 1])
end
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  local value = headers["{name}"]
  if value == nil or string.sub(value, 1, {len(prefix)}) ~= "{prefix}" then
    unmatched = unmatched + 1
    if sample == "" then sample = status .. " {name}: " .. tostring(value) end
  end
end
function done(summary, latency, requests)
  local total = 0
  local counts = {{}}
  for _, thread in ipairs(threads) do
    total = total + thread:get("unmatched")
    if thread:get("sample") ~= "" then io.write("sample: " .. thread:get("sample") .. "\\n") end
    for status, count in pairs(thread:get("statuses")) do counts[status] = (counts[status] or 0) + count end
  end
  io.write(string.format("unmatched: %d\\n", total))
  for status, count in pairs(counts) do io.write(string.format("status %d: %d\\n", status, count)) end
end
"""


def run_wrk(url: str, ids: list[str], check: tuple[str, str], connections: int, duration: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as lua:
        lua.write(wrk_script(ids, check))
        lua.flush()
        command = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "-s", lua.name, url]
        done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60, start_new_session=True)
    out = done.stdout
    if done.returncode != 0 or re.search(r"Non-2xx or 3xx responses: (\d+)", out) or "Socket errors" in out:
        hint = "\n503: admission control refused part of the closed loop; at --concurrency 6 or fewer it never does"
        hint = hint if "status 503" in out else ""
        raise SystemExit(f"wrk against {url}: not every answer was a 200 (exit {done.returncode}):\n{out}{done.stderr}{hint}")
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
        "unmatched": int(re.search(r"^unmatched: (\d+)", out, re.M).group(1)),  # type: ignore[union-attr]
        "unmatched_sample": (re.findall(r"^sample: (.*)$", out, re.M) or [""])[0],
    }


def run_generator(url: str, ids: list[str], check: tuple[str, str] | None, **cfg: Any) -> dict[str, Any]:
    """bench/readkit/load.py in a child process: mode, connections, duration, rate (open loop), timeout."""
    port = int(url.rsplit(":", 1)[1])
    cfg |= {"host": "127.0.0.1", "port": port, "paths": [f"/notifications/{ident}" for ident in ids]}
    cfg |= {"headers": AS_SERVICE, "expect": f"{check[0]}: {check[1]}".lower() if check else None}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as config:
        json.dump(cfg, config)
        config.flush()
        command = [sys.executable, "-m", "bench.readkit.load", config.name]
        limit = cfg["duration"] + cfg["timeout"] + 60
        done = subprocess.run(
            command, env=clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=limit, start_new_session=True
        )
    if done.returncode != 0:
        raise SystemExit(f"the load generator failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def vet(result: dict[str, Any], case: str, what: str) -> None:
    """Brownout's answers that were not what *case* says: a stale read's fail the bench; a hit's are counted and
    printed (under overload Brownout may answer from the database, a 200 all the same)."""
    if result["unmatched"] and case == "stale":
        first = result["unmatched_sample"]
        raise SystemExit(f"{result['unmatched']} of Brownout's answers {what} were not stale; the first: {first}")


def throughput(url: str, ids: list[str], case: str, args: argparse.Namespace, *, brownout: bool) -> dict[str, Any]:
    """Closed-loop requests/s after a 1 s warm-up."""
    check = CASES[case]
    if args.wrk:
        run_wrk(url, ids, check, args.concurrency, 1)
        result = run_wrk(url, ids, check, args.concurrency, args.duration)
    else:
        cfg = {"mode": "closed", "connections": args.concurrency, "timeout": args.timeout}
        run_generator(url, ids, check, duration=1, **cfg)
        result = run_generator(url, ids, check, duration=args.duration, **cfg)
        if result["failed"]:
            raise SystemExit(f"the generator against {url}: not every answer was a 200: {result['failed']}")
        result["unmatched"], result["unmatched_sample"] = result["unexpected"], result["unexpected_head"]
    if brownout:
        vet(result, case, "under closed-loop load")
    return result


def latency(url: str, ids: list[str], case: str, rate: float, args: argparse.Namespace, *, brownout: bool) -> dict[str, Any]:
    """Open loop at *rate* after a 1 s warm-up at that rate (the first seconds after closed-loop load were the
    peer's worst: a full garbage collection among them)."""
    cfg = {"mode": "open", "rate": rate, "connections": args.connections, "timeout": args.timeout}
    run_generator(url, ids, CASES[case] if brownout else None, duration=1, **cfg)
    result = run_generator(url, ids, CASES[case] if brownout else None, duration=args.latency_duration, **cfg)
    result["unmatched"], result["unmatched_sample"] = result["unexpected"], result["unexpected_head"]
    if brownout:
        vet(result, case, f"at {rate:.0f}/s")
    return result


def unmatched(result: dict[str, Any], case: str) -> str:
    if not result["unmatched"]:
        return ""
    sample = " ".join(result["unmatched_sample"].split())[:300]
    return f" ({result['unmatched']} of its 200s not a {case}: the first {sample!r})"


# -- the run ---------------------------------------------------------------------------------------------------


def delete_queues(url: str, queue: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    for declaration in queue_declarations(queue, max_length=1):
        channel.queue_delete(declaration.name)
    connection.close()


def auth_costs(rounds: int = 5, calls: int = 2000) -> dict[str, float]:
    """Microseconds per `identify` with the cache warm: what every authenticated request pays first."""
    from brownout.fastapi._auth import Authenticator
    from tests.support.jwt_issuer import ISSUER, SECRET, JwksServer, SigningKey, mint_hs256, supabase_claims

    signing = SigningKey("EC")
    jwks = JwksServer([signing.jwk])
    try:
        settings = load_settings(
            api_keys=SERVICE_KEY_ENTRY, jwt_secret=SECRET, jwt_jwks_url=jwks.url, jwt_issuer=ISSUER, auth="required"
        )
        authenticator = Authenticator(settings)
        authenticator.start()
        tokens = {
            "service key (bo_..., sha256 + compare)": SERVICE_KEY,
            "user token, HS256": mint_hs256(supabase_claims(time.time())),
            "user token, ES256 (JWKS)": signing.mint(supabase_claims(time.time())),
        }
        costs = {}
        for label, token in tokens.items():
            authenticator.identify(token)  # warm: the JWKS fetched, the token verified once
            best = float("inf")
            for _ in range(rounds):
                started = time.perf_counter()
                for _ in range(calls):
                    authenticator.identify(token)
                best = min(best, time.perf_counter() - started)
            costs[label] = best / calls * 1e6
        authenticator.close()
        return costs
    finally:
        jwks.close()


def print_auth_costs(costs: dict[str, float]) -> None:
    print("identifying the caller, per request (verified-token cache warm):")
    for label, micros in costs.items():
        print(f"  {label:<52}{micros:8.1f} us")
    verdict = "met" if max(costs.values()) < 50 else "NOT met"
    print(f"  target: under 50 us each: {verdict}")


def load_average(when: str) -> float:
    load = os.getloadavg()[0]
    print(f"load average (1 min) at the {when}: {load:.2f}", flush=True)
    return load


def ms(value: float | None) -> str:
    return f"{value:.2f} ms" if value is not None else "a failure"


def print_latency(case: str, ours: dict[str, Any], peer: dict[str, Any]) -> None:
    line = f"  {CASE_LABELS[case] + ':':<30}brownout p50 {ms(ours['p50'])}, p99 {ms(ours['p99'])}; "
    line += f"peer p50 {ms(peer['p50'])}, p99 {ms(peer['p99'])}; "
    if ours["p99"] is None or peer["p99"] is None:
        failing = "Brownout's" if ours["p99"] is None else "the peer's"
        ratio, verdict = f"none, over 1 % of {failing} requests failed", "NOT met"
    else:
        ratio = f"{ours['p99'] / peer['p99']:.2f}"
        verdict = "met" if ours["p99"] / peer["p99"] <= 2.0 else "NOT met"
    print(f"{line}p99 ratio: {ratio} (target <= 2.0: {verdict})")
    for name, result in (("brownout", ours), ("peer", peer)):
        failed = sum(result["failed"].values())
        detail = ", ".join(f"{kind} {count}" for kind, count in sorted(result["failed"].items()))
        share = f"{failed / max(1, result['requests']):.0%} failed: {detail}"
        answered = f"{result['ok']} of {result['requests']} answered 200 in time"
        if failed:
            answered += f" ({share}; the 200s alone: p50 {ms(result['ok_p50'])}, p99 {ms(result['ok_p99'])})"
        waited = result["waited_for_connection"]
        lag = f"generator lag p50 {result['lag_p50']:.2f} ms, p99 {result['lag_p99']:.2f} ms, max {result['lag_max']:.1f} ms"
        mark = f"  GENERATOR LAGGED (p99 over {LAG_LIMIT_MS:g} ms)" if result["lag_p99"] > LAG_LIMIT_MS else ""
        odd = unmatched(result, case) if name == "brownout" else ""
        print(f"      {name:<9}{answered}; {waited} waited for a connection; {lag}, CPU {result['cpu_seconds']:.1f} s{mark}{odd}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500, help="sequential reads per server-side latency case")
    parser.add_argument("--concurrency", type=int, default=6, help="connections of the closed loop (wrk)")
    parser.add_argument("--connections", type=int, default=32, help="connections of the open loop")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of closed-loop load per server and case")
    parser.add_argument("--rate", type=float, default=None, help="open-loop requests/s (default: half the peer's hit max)")
    parser.add_argument("--latency-duration", type=float, default=8.0, help="seconds of open-loop load per server and case")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds after its scheduled time a request fails")
    parser.add_argument("--items", type=int, default=100, help="notifications created and read in turn")
    parser.add_argument("--no-wrk", action="store_true", help="closed loop with the Python generator even if wrk is installed")
    parser.add_argument("--auth-only", action="store_true", help="print only what identifying the caller costs")
    args = parser.parse_args()
    args.wrk = bool(shutil.which("wrk")) and not args.no_wrk
    started_at = load_average("start")
    if started_at > LOAD_LIMIT:
        print(f"WARNING: started above {LOAD_LIMIT} (the machine is busy): this run's figures prove nothing", flush=True)

    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    os.environ.setdefault("DATABASE_URL", LOCAL_DB)
    os.environ.setdefault("RABBITMQ_URL", LOCAL_RABBIT)
    os.environ.setdefault("REDIS_URL", LOCAL_REDIS)
    # Callers authenticated and limited as in production; the one key here carries the whole load, so its
    # limit is set above what the load can reach (the check still runs on every request).
    os.environ.setdefault("BROWNOUT_API_KEYS", SERVICE_KEY_ENTRY)
    os.environ.setdefault("BROWNOUT_RATE_LIMIT_READS", "10000000/minute")
    os.environ.setdefault("BROWNOUT_RATE_LIMIT_WRITES", "10000000/minute")
    if args.auth_only:
        print_auth_costs(auth_costs())
        return
    base = load_settings()
    tag = uuid.uuid4().hex[:8]
    dbname, queue, prefix = f"bo_bench_{tag}", f"bo-bench-{tag}", f"bo-bench-{tag}:"
    peer_prefix = f"{prefix}peer:"
    database_url = make_url(base.database_url).set(database=dbname).render_as_string(hide_password=False)
    unreachable_url = make_url(database_url).set(port=free_port()).render_as_string(hide_password=False)
    assert base.rabbitmq_url and base.redis_url
    rds = redis.Redis.from_url(base.redis_url)
    metrics_dir = tempfile.TemporaryDirectory(prefix="bo-bench-metrics-")
    admin(base.database_url, f'CREATE DATABASE "{dbname}"')
    try:
        upgrade_database(database_url)
        healthy = load_settings(database_url=database_url, queue_name=queue, redis_key_prefix=prefix)
        with timed_server(healthy) as (client, services, timing):
            ids = []
            for _ in range(args.items):
                response = client.post("/notifications", json=NOTE)
                if response.status_code != 201:
                    raise SystemExit(f"create: expected 201, got {response.status_code} {response.text[:200]}")
                ids.append(response.json()["id"])
            timed_reads(client, timing, ids, min(100, args.requests), "hit")  # warm-up
            hit = timed_reads(client, timing, ids, args.requests, "hit")
            evict = lambda ident: rds.delete(services.reads.item_keys(ident)[0])  # noqa: E731
            timed_reads(client, timing, ids, min(100, args.requests), "miss", evict)  # warm the pool
            miss = timed_reads(client, timing, ids, args.requests, "miss", evict)
            for ident in ids:  # the peer's copy: the very bytes Brownout answers for this id
                response = client.get(f"/notifications/{ident}")
                expect(response, "hit")
                rds.set(f"{peer_prefix}{ident}", response.content)

        # A second server, its database unreachable; its entries are past their fresh age, so it serves them stale.
        outage = load_settings(database_url=unreachable_url, queue_name=queue, redis_key_prefix=prefix, cache_fresh_seconds=0.2)
        time.sleep(0.3)
        with timed_server(outage) as (client, services, timing):
            for tries in range(51):
                if services.brownout.database.breaker.state is BreakerState.OPEN:
                    break
                expect(client.get(f"/notifications/{ids[tries % len(ids)]}"), "stale")
            else:
                raise SystemExit(f"the breaker did not open: {services.brownout.database.breaker.snapshot()}")
            opening = list(timing.samples)
            stale = timed_reads(client, timing, ids, args.requests, "stale")
            direct = stale_in_process(services, ids, args.requests)

        print(f"GET /notifications/{{id}}, server side (ASGI timing middleware), {args.requests} sequential reads each:")
        print(f"  {'case':<52}{'p50 ms':>8}{'p99 ms':>8}")
        rows = [
            ("fresh cache hit (Redis), database up", hit),
            ("cache miss -> database (entry evicted), database up", miss),
            ("stale from Redis, database unreachable, breaker open", stale),
            ("  same, reads.notification() called in-process", direct),
        ]
        for label, samples in rows:
            print(f"  {label:<52}{percentile(samples, 0.5):8.2f}{percentile(samples, 0.99):8.2f}")
        verdict = "met" if percentile(stale, 0.99) <= 5 else "NOT met"
        print(f"  target: stale p99 <= 5 ms at the server: {verdict}")
        if opening:
            median = percentile(opening, 0.5)
            print(f"  {len(opening)} reads before the breaker opened (stale after retries): median {median:.1f} ms")
        print(flush=True)

        env = clean_env() | {"DATABASE_URL": database_url, "RABBITMQ_URL": base.rabbitmq_url, "REDIS_URL": base.redis_url}
        env |= {key: os.environ[key] for key in ("BROWNOUT_API_KEYS", "BROWNOUT_RATE_LIMIT_READS", "BROWNOUT_RATE_LIMIT_WRITES")}
        env |= {"BROWNOUT_REDIS_KEY_PREFIX": prefix, "BROWNOUT_QUEUE_NAME": queue, "BROWNOUT_CACHE_FRESH_SECONDS": "3600"}
        env |= {"PROMETHEUS_MULTIPROC_DIR": metrics_dir.name}  # as `brownout web` prepares it for its processes
        outage_env = env | {"DATABASE_URL": unreachable_url, "BROWNOUT_CACHE_FRESH_SECONDS": "0.2"}
        peer_env = clean_env() | {"REDIS_URL": base.redis_url, "READ_PEER_KEY_PREFIX": peer_prefix}
        loads: dict[str, dict[str, Any]] = {}
        rate, opened_after = args.rate, 0
        with served(PEER_APP, peer_env, f"/notifications/{ids[0]}") as peer:
            for case, server_env in (("hit", env), ("stale", outage_env)):
                with served(BROWNOUT_APP, server_env, "/health") as ours:
                    if case == "stale":
                        opened_after = open_breaker(ours, ids)
                    for ident in ids[:3]:
                        response = httpx.get(f"{ours}/notifications/{ident}", headers=AS_SERVICE)
                        expect(response, case)
                        if httpx.get(f"{peer}/notifications/{ident}", headers=AS_SERVICE).content != response.content:
                            raise SystemExit(f"the peer's answer for {ident} is not Brownout's")
                    loads[f"{case} throughput peer"] = throughput(peer, ids, case, args, brownout=False)
                    loads[f"{case} throughput brownout"] = throughput(ours, ids, case, args, brownout=True)
                    if rate is None:
                        rate = round(loads["hit throughput peer"]["rps"] / 2)
                    loads[f"{case} latency peer"] = latency(peer, ids, case, rate, args, brownout=False)
                    loads[f"{case} latency brownout"] = latency(ours, ids, case, rate, args, brownout=True)
                    for ident in ids[-3:]:
                        expect(httpx.get(f"{ours}/notifications/{ident}", headers=AS_SERVICE), case)
                    if case == "stale" and breaker_state(ours) != BreakerState.OPEN.value:
                        raise SystemExit(f"the outage server's breaker is no longer open after the run: {breaker_state(ours)}")
    finally:
        admin(base.database_url, f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        delete_queues(base.rabbitmq_url, queue)
        for key in rds.scan_iter(match=f"{prefix}*", count=1000):
            rds.delete(key)
        rds.close()
        metrics_dir.cleanup()

    tool = f"wrk -t1 -c{args.concurrency} -d{max(1, round(args.duration))}s" if args.wrk else "the Python generator"
    print(f"throughput, closed loop ({tool}, {len(ids)} ids in turn, the same Authorization header to both):")
    if not args.wrk:
        print("  (wrk not used: these figures are bounded by the Python generator's own CPU, on the same 2 cores)")
    for case in CASES:
        ours, theirs = loads[f"{case} throughput brownout"]["rps"], loads[f"{case} throughput peer"]["rps"]
        verdict = "met" if ours / theirs >= 0.6 else "NOT met"
        figures = f"brownout {ours:.0f} req/s, peer {theirs:.0f} req/s, ratio: {ours / theirs:.2f}"
        odd = unmatched(loads[f"{case} throughput brownout"], case)
        print(f"  {CASE_LABELS[case] + ':':<30}{figures} (target >= 0.60: {verdict}){odd}")
    assert rate is not None
    source = "--rate" if args.rate else "half the peer's fresh-hit throughput"
    print(
        f"latency, open loop at {rate:.0f} req/s ({source}), {args.latency_duration:g} s per server and case, "
        f"{args.connections} connections, from each request's scheduled time (bench/readkit/load.py):"
    )
    for case in CASES:
        print_latency(case, loads[f"{case} latency brownout"], loads[f"{case} latency peer"])
    print(f"  the outage server's breaker opened after {opened_after} reads")
    print()
    print_auth_costs(auth_costs())
    load_average("end (the run's own load included)")
    if started_at > LOAD_LIMIT:
        print(f"this run started at load average {started_at:.2f} (above {LOAD_LIMIT}): its figures prove nothing")


if __name__ == "__main__":
    main()
