"""`/ready` answers from a database check at most a few seconds old, not the monitor's last one (every 30 s)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from brownout import Settings
from brownout.fastapi._routes.health import READY_MAX_AGE_SECONDS
from tests.conftest import database_url
from tests.support.api_server import OPERATOR_TOKEN, RunningApi, serve_in_thread
from tests.support.tcp_proxy import FaultProxy

OPERATOR = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    with FaultProxy(upstream_host="127.0.0.1", upstream_port=5432) as started:
        yield started


@pytest.fixture
def api(api_settings: Callable[..., Settings], pg_database: str, proxy: FaultProxy) -> Iterator[RunningApi]:
    # No RabbitMQ: a write is durable only if the database takes it, so /ready says what the database does.
    settings = api_settings(
        database_url=database_url(pg_database, port=proxy.port), rabbitmq_url=None, admin_token=OPERATOR_TOKEN
    )
    with serve_in_thread(settings) as running:
        yield running


def test_a_database_gone_since_the_last_check_reads_not_ready(api: RunningApi, proxy: FaultProxy) -> None:
    monitor = api.brownout.monitor
    assert api.client.get("/ready", headers=OPERATOR).status_code == 200
    checks = monitor.checks
    assert api.client.get("/ready").status_code == 200
    assert monitor.checks == checks, "a check younger than the limit is answered from"

    proxy.refuse()
    proxy.reset_existing()
    assert monitor.last_at is not None
    monitor.last_at -= READY_MAX_AGE_SECONDS + 1  # the last check, taken before the outage, is now that old
    answer = api.client.get("/ready", headers=OPERATOR)
    assert answer.status_code == 503, answer.text
    assert answer.json()["parts"]["database"] in ("ssl", "disconnect")
    assert monitor.checks == checks + 1
