"""connection_budget / warn_if_over_budget: the fleet's worst-case connections against the pooler's limit."""

from __future__ import annotations

import logging

import pytest

from brownout._pool_budget import Budget, PoolSuggestion, connection_budget, warn_if_over_budget
from brownout._settings import Settings

URL = "postgresql://app:hunter2@pooler.example.com:6543/postgres?sslmode=require"


def settings(**overrides: object) -> Settings:
    """Settings from explicit values only (init arguments win over the environment)."""
    values: dict[str, object] = {
        "database_url": URL,
        "pool_size": 10,
        "pool_max_overflow": 20,
        "web_replicas": 1,
        "web_processes": 1,
        "worker_replicas": 1,
        "worker_processes": 1,
        "pooler_connection_limit": None,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def logger() -> logging.Logger:
    return logging.getLogger("tests.pool_budget")


def test_the_readme_example() -> None:
    budget = connection_budget(settings(web_replicas=2, web_processes=2, pooler_connection_limit=100))
    assert budget.per_process == 30
    assert budget.processes == 5
    assert (budget.web_connections, budget.worker_connections, budget.total) == (120, 30, 150)
    assert budget.over_budget
    assert budget.formula() == "2 web replicas x 2 processes x (10 + 20) + 1 worker replica x 1 process x (10 + 20) = 150"
    # 100 // 5 = 20 per process: keep the steady pool of 10, trim the overflow to 10.
    assert budget.suggestion() == PoolSuggestion(pool_size=10, pool_max_overflow=10)


def test_defaults_are_one_web_and_one_worker_process() -> None:
    budget = connection_budget(settings())
    assert budget == Budget(
        web_replicas=1,
        web_processes=1,
        worker_replicas=1,
        worker_processes=1,
        pool_size=10,
        pool_max_overflow=20,
        limit=None,
    )
    assert budget.total == 60
    assert not budget.over_budget
    assert budget.suggestion() is None


def test_worker_processes_count_like_web_processes() -> None:
    budget = connection_budget(settings(worker_replicas=3, worker_processes=2, pool_size=5, pool_max_overflow=0))
    assert budget.worker_connections == 3 * 2 * 5
    assert budget.web_connections == 5
    assert budget.total == 35


def test_exactly_at_the_limit_is_within_budget() -> None:
    assert not connection_budget(settings(pooler_connection_limit=60)).over_budget
    assert connection_budget(settings(pooler_connection_limit=59)).over_budget


def test_the_suggestion_fits_and_keeps_pool_size_when_it_can() -> None:
    for limit in (7, 40, 59, 100, 149):
        budget = connection_budget(settings(web_replicas=2, web_processes=2, pooler_connection_limit=limit))
        fit = budget.suggestion()
        assert fit is not None
        assert budget.processes * fit.per_process <= limit
        assert fit.pool_size == min(10, limit // budget.processes)
        assert fit.pool_size >= 1
        assert fit.pool_max_overflow <= 20


def test_no_suggestion_when_not_one_connection_per_process_fits() -> None:
    budget = connection_budget(settings(web_replicas=10, web_processes=2, pooler_connection_limit=20))
    assert budget.processes == 21
    assert budget.over_budget
    assert budget.suggestion() is None


def test_no_warning_without_a_limit(logger: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=logger.name):
        budget = warn_if_over_budget(settings(web_replicas=50, web_processes=8), logger)
    assert budget.total == (50 * 8 + 1) * 30
    assert caplog.records == []


def test_no_warning_within_the_limit(logger: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=logger.name):
        warn_if_over_budget(settings(pooler_connection_limit=60), logger)
    assert caplog.records == []


def test_one_warning_line_with_the_formula_and_a_fit(logger: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=logger.name):
        budget = warn_if_over_budget(settings(web_replicas=2, web_processes=2, pooler_connection_limit=100), logger)
    assert budget.total == 150
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "\n" not in message
    assert "2 web replicas x 2 processes x (10 + 20) + 1 worker replica x 1 process x (10 + 20) = 150" in message
    assert "BROWNOUT_POOLER_CONNECTION_LIMIT=100" in message
    assert "at most 20 per process" in message
    assert "BROWNOUT_POOL_SIZE=10 BROWNOUT_POOL_MAX_OVERFLOW=10" in message


def test_warning_when_nothing_fits(logger: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=logger.name):
        warn_if_over_budget(settings(web_replicas=10, web_processes=2, pooler_connection_limit=20), logger)
    (record,) = caplog.records
    message = record.getMessage()
    assert "21 processes cannot have one connection each" in message
    assert "BROWNOUT_POOL_SIZE=" not in message


def test_default_logger_is_the_module_logger(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="brownout._pool_budget"):
        warn_if_over_budget(settings(pooler_connection_limit=1))
    assert [record.name for record in caplog.records] == ["brownout._pool_budget"]


def test_limit_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", URL)
    monkeypatch.setenv("BROWNOUT_POOLER_CONNECTION_LIMIT", "45")
    monkeypatch.setenv("BROWNOUT_WEB_PROCESSES", "3")
    for name in ("BROWNOUT_POOL_SIZE", "BROWNOUT_POOL_MAX_OVERFLOW", "BROWNOUT_WEB_REPLICAS"):
        monkeypatch.delenv(name, raising=False)
    for name in ("BROWNOUT_WORKER_REPLICAS", "BROWNOUT_WORKER_PROCESSES"):
        monkeypatch.delenv(name, raising=False)
    budget = connection_budget(Settings())  # type: ignore[call-arg]
    assert (budget.limit, budget.web_processes, budget.total) == (45, 3, 4 * 30)
    assert budget.suggestion() == PoolSuggestion(pool_size=10, pool_max_overflow=1)
