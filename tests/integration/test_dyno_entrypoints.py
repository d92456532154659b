"""The Procfile's web and worker lines, run as processes: several processes, one sum in /metrics.

`brownout web` with two uvicorn processes and `brownout worker`, as the Procfile runs them,
are started for real against this test's database, queue and Redis prefix;
what they count must add up across processes, as Prometheus will scrape it.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from app.dispatch.notifications import CREATE, build_registry
from app.schema import notifications
from bench.chaoskit.processes import procfile
from brownout._db import Database
from brownout._dispatch.dispatcher import Dispatcher, Queued
from brownout._settings import Settings
from tests.support.api_server import free_port, settings_env
from tests.support.credentials import AS_SERVICE
from tests.support.polling import wait_until
from tests.support.processes import stop

ADA = {"user_id": 8, "email": "ada@example.com", "subject": "Dyno", "body": "b"}


def sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and all(found.labels.get(key) == value for key, value in labels.items()):
                return float(found.value)
    return 0.0


@contextmanager
def dyno(line: str, env: dict[str, str], output: Any = None, *, own_session: bool = False) -> Iterator[subprocess.Popen[bytes]]:
    """The Procfile's *line* (web, worker), started with this interpreter (its output to *output*, a file);
    *own_session*: as a container's first process or a process manager's child, the leader of its session."""
    argv = procfile()[line]
    process = subprocess.Popen(argv, env=env, stdout=output, stderr=output, start_new_session=own_session)
    try:
        yield process
    finally:
        stop(process, grace=30)


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def fields_of(settings: Settings, **extra: Any) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in type(settings).model_fields} | extra


def test_web_processes_add_up_in_metrics(api_settings: Callable[..., Settings]) -> None:
    settings = api_settings()
    port = free_port()
    env = settings_env(fields_of(settings, web_processes=2)) | {"PORT": str(port)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    web = f"http://127.0.0.1:{port}"
    with dyno("web", env) as dyno_process:
        assert wait_until(lambda: _answers(f"{web}/health"), timeout=60), "the web dyno did not start"
        ours = os.getpriority(os.PRIO_PROCESS, 0)
        assert {os.getpriority(os.PRIO_PROCESS, pid) for pid in [dyno_process.pid, *children(dyno_process.pid)]} == {ours}
        for _ in range(20):  # a new connection each: the two processes share the listening socket
            with httpx.Client(base_url=web, timeout=10) as fresh:
                assert fresh.get("/health").status_code == 200
        assert httpx.get(f"{web}/metrics", timeout=10).status_code == 401  # Prometheus scrapes with a key
        text = httpx.get(f"{web}/metrics", headers=AS_SERVICE, timeout=10).text
    # whichever process answered the scrape, every process's requests are in it (the scrape itself not yet)
    assert sample(text, "brownout_http_requests_total", route="/health", status="200") >= 20
    assert sample(text, "brownout_pool_connections", state="size") == 2 * settings.pool_size  # two live pools


def test_read_only_shows_in_the_metrics_of_the_web_and_worker_dynos(api_settings: Callable[..., Settings]) -> None:
    """`brownout_mode` is a prometheus_client Enum, whose value multiprocess mode never reads: the dynos'
    processes must still export `brownout_mode{brownout_mode="read-only"} 1`."""
    settings = api_settings(read_only=True)
    port, metrics_port = free_port(), free_port()
    env = settings_env(fields_of(settings, web_processes=2, metrics_port=metrics_port)) | {"PORT": str(port)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    web = f"http://127.0.0.1:{port}"
    with dyno("web", env):
        assert wait_until(lambda: _answers(f"{web}/health"), timeout=60), "the web dyno did not start"
        refused = httpx.post(f"{web}/notifications", json=ADA, headers=AS_SERVICE, timeout=10)
        assert refused.status_code == 503 and refused.json()["detail"] == "read-only mode", refused.text
        text = httpx.get(f"{web}/metrics", headers=AS_SERVICE, timeout=10).text
    assert sample(text, "brownout_mode", brownout_mode="read-only") == 1, text
    assert sample(text, "brownout_mode", brownout_mode="read-write") == 0
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with dyno("worker", env):
        assert wait_until(lambda: _answers(url), timeout=60), "the worker's metrics did not come up"
        assert wait_until(
            lambda: sample(httpx.get(url, headers=AS_SERVICE, timeout=5).text, "brownout_mode", brownout_mode="read-only") == 1,
            timeout=30,
        )
        text = httpx.get(url, headers=AS_SERVICE, timeout=5).text
    assert sample(text, "brownout_mode", brownout_mode="read-write") == 0


def test_the_web_dyno_masks_a_password_in_its_access_log(api_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """uvicorn's own access-log handler (BROWNOUT_ACCESS_LOG=true), in a process started as the Procfile does:
    masked without being told."""
    text = _web_log(api_settings(access_log=True), tmp_path, "/health?next=redis://:hunter2@cache.internal:6379")
    assert '"GET /health?next=redis://:***@cache.internal:6379 HTTP/1.1" 200' in text, text
    assert "hunter2" not in text, text


def test_the_web_dyno_writes_no_line_per_request_by_default(api_settings: Callable[..., Settings], tmp_path: Path) -> None:
    text = _web_log(api_settings(), tmp_path, "/health?probe=42")
    assert "probe=42" not in text and "GET /health" not in text, text


def _web_log(settings: Settings, tmp_path: Path, path: str) -> str:
    """What a web dyno started as the Procfile does logs while it answers one GET of *path*."""
    port = free_port()
    env = settings_env(fields_of(settings, web_processes=1)) | {"PORT": str(port)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    web = f"http://127.0.0.1:{port}"
    log = tmp_path / "web.log"
    with log.open("wb") as output, dyno("web", env, output):
        assert wait_until(lambda: _answers(f"{web}/health"), timeout=60), "the web dyno did not start"
        assert httpx.get(f"{web}{path}", timeout=10).status_code == 200
    return log.read_text()


def test_the_worker_dyno_applies_and_counts(api_settings: Callable[..., Settings]) -> None:
    settings = api_settings()
    database = Database.from_settings(settings)
    dispatcher = Dispatcher.from_settings(settings, database, registry=build_registry())
    try:
        queued = dispatcher.enqueue(dispatcher.accept(CREATE, ADA, idempotency_key="dyno-1"))
        assert isinstance(queued, Queued)
    finally:
        dispatcher.close()
    metrics_port = free_port()
    env = settings_env(fields_of(settings, metrics_port=metrics_port))
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        with dyno("worker", env) as worker:
            assert wait_until(lambda: _answers(url), timeout=60), "the worker's metrics did not come up"
            family = [worker.pid, *children(worker.pid)]
            assert len(family) >= 2 and {os.getpriority(os.PRIO_PROCESS, pid) for pid in family} == {settings.worker_nice}
            refused = httpx.get(url, timeout=5)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer", refused.text
            applied = wait_until(
                lambda: (
                    sample(
                        httpx.get(url, headers=AS_SERVICE, timeout=5).text, "brownout_worker_messages_total", outcome="applied"
                    )
                    == 1
                ),
                timeout=60,
            )
            text = httpx.get(url, headers=AS_SERVICE, timeout=5).text
        assert applied, text
        assert sample(text, "brownout_db_calls_total") >= 1
        assert sample(text, "brownout_worker_apply_duration_seconds_count") == 1
        assert sample(text, "brownout_worker_batch_size_count") == 1 and sample(text, "brownout_worker_batch_size_sum") == 1
        with database.session() as session:
            assert session.execute(select(func.count()).select_from(notifications)).scalar_one() == 1
    finally:
        database.close()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, headers=AS_SERVICE, timeout=2).status_code == 200
    except httpx.TransportError:
        time.sleep(0.1)
        return False


def autogroup_nice(pid: int) -> int | None:
    """The nice value of the process's autogroup, or None where the kernel shows none (the file can exist, empty)."""
    try:
        fields = Path(f"/proc/{pid}/autogroup").read_text().split()
    except OSError:
        return None
    return int(fields[-1]) if fields and fields[-1].lstrip("-").isdigit() else None


@pytest.mark.skipif(autogroup_nice(os.getpid()) is None, reason="the kernel shows no autogroups here")
def test_a_worker_leading_its_own_session_lowers_its_session_s_group(api_settings: Callable[..., Settings]) -> None:
    """With autogroups the CPU is shared between sessions first: nice alone would not yield to a web in another."""
    settings = api_settings()
    env = settings_env(fields_of(settings, metrics_port=free_port()))
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    ours = autogroup_nice(os.getpid())
    with dyno("worker", env, own_session=True) as worker:
        assert wait_until(lambda: autogroup_nice(worker.pid) == settings.worker_nice, timeout=30), autogroup_nice(worker.pid)
        assert os.getpriority(os.PRIO_PROCESS, worker.pid) == settings.worker_nice
    with dyno("worker", env) as in_our_session:  # not its session's leader: the group is not its alone
        assert wait_until(lambda: os.getpriority(os.PRIO_PROCESS, in_our_session.pid) == settings.worker_nice, timeout=30)
        assert autogroup_nice(in_our_session.pid) == ours
