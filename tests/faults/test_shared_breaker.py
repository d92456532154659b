"""One breaker for the fleet: four real processes, PostgreSQL behind a proxy, real Redis.

- the breaker opens once the threshold is reached fleet-wide (not per process),
- in HALF_OPEN exactly one trial runs at a time across the fleet,
- after recovery every process sees CLOSED within the pub/sub latency,
- with Redis gone the processes fall back to their own breakers and keep
  working, and rejoin when it is back (a throwaway redis-server, never the
  machine's).
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from brownout._settings import Settings
from tests.conftest import database_url
from tests.support import fleet_process
from tests.support.api_server import free_port
from tests.support.polling import wait_until
from tests.support.tcp_proxy import FaultProxy

FLEET = 4
THRESHOLD = 5


class Member:
    def __init__(self, fields: dict[str, Any]) -> None:
        context = mp.get_context("spawn")
        self.commands: mp.Queue[Any] = context.Queue()
        self.results: mp.Queue[Any] = context.Queue()
        self.process = context.Process(target=fleet_process.serve, args=(fields, self.commands, self.results), daemon=True)
        self.process.start()

    def send(self, op: str, *args: Any) -> None:
        self.commands.put((op, args))

    def receive(self, timeout: float = 60) -> Any:
        status, value = self.results.get(timeout=timeout)
        assert status == "ok", value
        return value

    def ask(self, op: str, *args: Any, timeout: float = 60) -> Any:
        self.send(op, *args)
        return self.receive(timeout)

    def stop(self) -> None:
        self.commands.put(None)
        self.process.join(timeout=20)
        if self.process.is_alive():
            self.process.kill()


@contextmanager
def fleet(fields: dict[str, Any], size: int = FLEET) -> Iterator[list[Member]]:
    members = [Member(fields) for _ in range(size)]
    try:
        for member in members:  # each answers once it is built
            member.ask("state", timeout=60)
        yield members
    finally:
        for member in members:
            member.stop()


def fields_for(make_settings: Callable[..., Settings], pg_database: str, proxy: FaultProxy, **extra: Any) -> dict[str, Any]:
    settings = make_settings(
        database_url=database_url(pg_database, port=proxy.port),
        breaker_backend="redis",
        breaker_failure_threshold=THRESHOLD,
        breaker_open_seconds=30,
        breaker_probe_interval_seconds=0.2,
        health_interval_seconds=30,
        retry_max_retries=0,
        **extra,
    )
    return {name: getattr(settings, name) for name in type(settings).model_fields}


def states(members: list[Member]) -> list[tuple[str, bool]]:
    return [member.ask("state") for member in members]


def test_the_fleet_opens_on_the_fleet_wide_count_and_recovers_with_one_trial_at_a_time(
    make_settings: Callable[..., Settings], pg_database: str, proxy: FaultProxy, redis_prefix: str
) -> None:
    fields = fields_for(make_settings, pg_database, proxy, redis_url="redis://127.0.0.1:6379/0", redis_key_prefix=redis_prefix)
    with fleet(fields) as members:
        assert all(state == ("closed", True) for state in states(members))
        proxy.reset()  # every new connection is accepted and reset: a database that is down
        proxy.reset_existing()
        before = proxy.connection_count
        for member in members:
            member.send("calls", 10, 0.5, 0.05)
        outcomes = [member.receive() for member in members]
        attempts = proxy.connection_count - before
        assert all(state == ("open", True) for state in states(members))
        failed = sum(outcome != "refused" for run in outcomes for outcome in run)
        # local breakers would let 4 x 5 = 20 calls fail; the fleet stops at its threshold (plus a call
        # in flight per process when the news arrives, plus the health probes while open)
        assert failed <= THRESHOLD + FLEET, outcomes
        assert attempts < FLEET * THRESHOLD, f"{attempts} connection attempts reached the dead database"

        proxy.pass_through()  # the database is back: a probe moves the fleet to HALF_OPEN
        for member in members:
            member.send("trials", 3.0, 0.1)
        spans = sorted(span for member in members for span in member.receive())
        assert len(spans) >= 2  # two successful trials close it (success threshold 2)
        for (_, first_end), (second_start, _) in zip(spans, spans[1:], strict=False):
            assert second_start >= first_end - 0.005, f"two trials overlapped across the fleet: {spans}"
        assert wait_until(lambda: all(state == ("closed", True) for state in states(members)), timeout=5)


def test_without_redis_each_process_falls_back_and_rejoins(
    make_settings: Callable[..., Settings], pg_database: str, proxy: FaultProxy
) -> None:
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is needed for a throwaway Redis (Debian's redis-server package)")
    port = free_port()
    argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]

    def start_redis() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        assert wait_until(lambda: _redis_up(port), timeout=10)
        return process

    redis_process = start_redis()
    fields = fields_for(make_settings, pg_database, proxy, redis_url=f"redis://127.0.0.1:{port}/0", redis_skip_seconds=0.5)
    try:
        with fleet(fields) as members:
            assert all(shared for _, shared in states(members))
            redis_process.send_signal(signal.SIGKILL)
            redis_process.wait()
            assert wait_until(lambda: not any(shared for _, shared in states(members)), timeout=15)
            for member in members:  # they keep working on their own breakers
                assert member.ask("calls", 3, 1.0, 0.0) == ["ok", "ok", "ok"]
            redis_process = start_redis()
            assert wait_until(lambda: all(shared for _, shared in states(members)), timeout=20)
            assert all(state == "closed" for state, _ in states(members))
    finally:
        redis_process.kill()
        redis_process.wait()


def _redis_up(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(port=port, socket_timeout=0.5, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        time.sleep(0.05)
        return False
