"""What a read costs: `.venv/bin/python bench/read_path.py [--requests N] [--concurrency C] [--duration S]`.

Prints, in one run, for `GET /notifications/{id}`:
- server-side latency p50/p99 (a pure-ASGI timing middleware of this bench
  around the app, in-thread uvicorn, N sequential requests per case) of a fresh
  cache hit, a cache miss served by a healthy database (the item's Redis entry
  deleted before each request), and a stale read from Redis while the database
  is unreachable (a server whose DATABASE_URL points at a closed port, measured
  once its breaker has opened); every stale response must carry
  `X-Brownout: stale` or the bench fails. Also `services.reads.notification()`
  called directly in that server's process. Target: stale p99 <= 5 ms.
- requests/s and client-side p50/p99 of cached reads through a real
  `uvicorn --factory app.api.main:app_from_environment --workers 1` subprocess
  (access log off, BROWNOUT_CACHE_FRESH_SECONDS=3600 so every read is a hit),
  under `wrk -c C -d S` (an asyncio httpx load generator when wrk is missing).
- what identifying the caller costs each request (`--auth-only` prints just this, in seconds): the
  authenticator's `identify` for a service key, an HS256 user token and an ES256 user token (its JWKS
  served on loopback), each with its verified-token cache warm, best of 5 rounds of N calls, beside the
  stale read's p99 it is paid on top of. Target: under 50 us each.

DATABASE_URL / RABBITMQ_URL / REDIS_URL default to the local set-up. It works in
a throwaway database, queue and Redis key prefix, all removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
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

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/read_path.py`: the reference service (app/) and tests.support importable
    sys.path.insert(0, str(ROOT))

from app.api.services import Services  # noqa: E402
from app.schema import upgrade_database  # noqa: E402
from tests.support.api_server import free_port, serve_in_thread  # noqa: E402
from tests.support.credentials import AS_SERVICE, SERVICE_KEY, SERVICE_KEY_ENTRY  # noqa: E402
from tests.support.processes import stop  # noqa: E402

LOCAL_DB = "postgresql://brownout:brownout@127.0.0.1:5432/brownout?sslmode=require"
LOCAL_RABBIT = "amqp://guest:guest@127.0.0.1:5672/%2F"
LOCAL_REDIS = "redis://127.0.0.1:6379/0"
NOTE = {"user_id": 1, "email": "bench@example.com", "subject": "bench", "body": "x" * 200}


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


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def serve_in_process(env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "--factory", "app.api.main:app_from_environment"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--log-level", "warning", "--no-access-log"]
    log = tempfile.TemporaryFile("w+")  # the app logs at INFO: kept out of the figures, shown if it fails
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        give_up = time.monotonic() + 60
        while not answers(f"{url}/health"):
            if process.poll() is not None or time.monotonic() > give_up:
                log.seek(0)
                raise RuntimeError(f"uvicorn did not start (exit {process.poll()}):\n{log.read()[-4000:]}")
            time.sleep(0.1)
        yield url
    finally:
        stop(process, grace=20)
        log.close()


def run_wrk(url: str, ids: list[str], concurrency: int, duration: float) -> dict[str, Any]:
    paths = ", ".join(f'"/notifications/{ident}"' for ident in ids)
    script = f"local paths = {{{paths}}}\nlocal i = 0\n"
    script += f'wrk.headers["Authorization"] = "Bearer {SERVICE_KEY}"\n'
    script += "request = function()\n  i = i + 1\n  return wrk.format('GET', paths[(i % #paths) + 1])\nend\n"
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as lua:
        lua.write(script)
        lua.flush()
        command = f"wrk -t 1 -c {concurrency} -d {max(1, round(duration))}s --latency -s {lua.name} {url}".split()
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    units = {"us": 0.001, "ms": 1.0, "s": 1000.0}

    def latency(label: str) -> float:
        value, unit = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()  # type: ignore[union-attr]
        return float(value) * units[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors or "Socket errors" in out:
        raise SystemExit(f"wrk saw failed requests:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return {"tool": "wrk", "rps": rps, "p50": latency("50"), "p99": latency("99")}


def run_httpx(url: str, ids: list[str], concurrency: int, duration: float) -> dict[str, Any]:
    samples: list[float] = []

    async def user(client: httpx.AsyncClient, i: int, stop: float) -> None:
        while time.perf_counter() < stop:
            start = time.perf_counter()
            response = await client.get(f"/notifications/{ids[i % len(ids)]}")
            samples.append((time.perf_counter() - start) * 1000)
            expect(response, "hit")
            i += 1

    async def load() -> None:
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10, headers=AS_SERVICE) as client:
            stop = time.perf_counter() + duration
            await asyncio.gather(*(user(client, n, stop) for n in range(concurrency)))

    begin = time.perf_counter()
    asyncio.run(load())
    rps = len(samples) / (time.perf_counter() - begin)
    return {"tool": "httpx (asyncio)", "rps": rps, "p50": percentile(samples, 0.5), "p99": percentile(samples, 0.99)}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500, help="sequential reads per server-side latency case")
    parser.add_argument("--concurrency", type=int, default=16, help="connections of the load generator")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load through the uvicorn subprocess")
    parser.add_argument("--items", type=int, default=100, help="notifications created and read in turn")
    parser.add_argument("--httpx", action="store_true", help="use the asyncio httpx load generator even if wrk is installed")
    parser.add_argument("--auth-only", action="store_true", help="print only what identifying the caller costs")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}")

    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    os.environ.setdefault("DATABASE_URL", LOCAL_DB)
    os.environ.setdefault("RABBITMQ_URL", LOCAL_RABBIT)
    os.environ.setdefault("REDIS_URL", LOCAL_REDIS)
    # Callers authenticated and limited as in production; the one key here carries the whole load, so its
    # limit is set above what the load can reach (the check still runs on every request).
    os.environ.setdefault("BROWNOUT_API_KEYS", SERVICE_KEY_ENTRY)
    os.environ.setdefault("BROWNOUT_RATE_LIMIT_READS", "100000000/minute")
    os.environ.setdefault("BROWNOUT_RATE_LIMIT_WRITES", "100000000/minute")
    if args.auth_only:
        print_auth_costs(auth_costs())
        return
    base = load_settings()
    tag = uuid.uuid4().hex[:8]
    dbname, queue, prefix = f"bo_bench_{tag}", f"bo-bench-{tag}", f"bo-bench-{tag}:"
    database_url = make_url(base.database_url).set(database=dbname).render_as_string(hide_password=False)
    unreachable_url = make_url(database_url).set(port=free_port()).render_as_string(hide_password=False)
    assert base.rabbitmq_url and base.redis_url
    rds = redis.Redis.from_url(base.redis_url)
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

        env = {key: value for key, value in os.environ.items() if not key.startswith("BROWNOUT_")}
        env |= {key: os.environ[key] for key in ("BROWNOUT_API_KEYS", "BROWNOUT_RATE_LIMIT_READS", "BROWNOUT_RATE_LIMIT_WRITES")}
        env |= {"DATABASE_URL": database_url, "RABBITMQ_URL": base.rabbitmq_url, "REDIS_URL": base.redis_url}
        env |= {"BROWNOUT_REDIS_KEY_PREFIX": prefix, "BROWNOUT_QUEUE_NAME": queue, "BROWNOUT_CACHE_FRESH_SECONDS": "3600"}
        with serve_in_process(env) as url:
            for ident in ids[:5]:
                expect(httpx.get(f"{url}/notifications/{ident}", headers=AS_SERVICE), "hit")
            generator = run_wrk if shutil.which("wrk") and not args.httpx else run_httpx
            load = generator(url, ids, args.concurrency, args.duration)
            for ident in ids[-5:]:
                expect(httpx.get(f"{url}/notifications/{ident}", headers=AS_SERVICE), "hit")
    finally:
        admin(base.database_url, f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        delete_queues(base.rabbitmq_url, queue)
        for key in rds.scan_iter(match=f"{prefix}*", count=1000):
            rds.delete(key)
        rds.close()

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
        print(f"  {len(opening)} reads before the breaker opened (stale after retries): median {percentile(opening, 0.5):.1f} ms")
    print(f"cached reads through uvicorn, 1 worker, {load['tool']}, {args.concurrency} connections, {args.duration:g} s:")
    print(f"  {load['rps']:.0f} requests/s, client p50 {load['p50']:.2f} ms, p99 {load['p99']:.2f} ms")
    print_auth_costs(auth_costs())


if __name__ == "__main__":
    main()
