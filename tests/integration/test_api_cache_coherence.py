"""The read-through cache stays coherent: write-through, the fill race, one loader per key.

The race is forced, not hoped for: a reader's database read is held (through
the `after_load` seam) until a write has committed and written through, then
its fill is released; the generation check must drop it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import event

from brownout._settings import Settings
from tests.support.api_server import RunningApi, serve_in_thread

ADA = {"user_id": 7, "email": "ada@example.com", "subject": "Coherence", "body": "b"}


@pytest.fixture
def api(api_settings: Callable[..., Settings]) -> Iterator[RunningApi]:
    # A roomy request deadline: followers wait for a leader at most that long, and the machine is shared.
    with serve_in_thread(api_settings(request_db_deadline_seconds=2.0)) as running:
        yield running


def _notification_selects(api: RunningApi) -> list[str]:
    """Every SELECT of one notification by id that this process sends to PostgreSQL."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "notifications.id =" in statement:
            seen.append(statement)

    event.listen(api.brownout.database.engine, "before_cursor_execute", record)
    return seen


def _forget_cached(api: RunningApi, notification_id: str) -> None:
    link = api.brownout.link
    assert link is not None
    link.client.delete(link.key("cache", "item", notification_id))


def test_a_fill_that_read_before_a_write_never_hides_it(api: RunningApi) -> None:
    item = api.client.post("/notifications", json=ADA).json()
    _forget_cached(api, item["id"])  # the next read misses and fills from the database

    loaded, release = threading.Event(), threading.Event()

    def hold_the_fill(key: str) -> None:
        loaded.set()
        assert release.wait(20)

    api.services.reads.after_load = hold_the_fill
    with ThreadPoolExecutor(1) as pool:
        slow_read = pool.submit(api.client.get, f"/notifications/{item['id']}")
        assert loaded.wait(20)  # the reader has read read=false from the database...
        api.services.reads.after_load = None
        marked = api.client.post(f"/notifications/{item['id']}/read")  # ...then a write commits
        assert marked.status_code == 200 and marked.json()["read"] is True
        release.set()  # ...and only now does the reader try to fill
        assert slow_read.result(20).json()["read"] is False  # it answers what it read

    after = api.client.get(f"/notifications/{item['id']}")
    assert after.json()["read"] is True, "a fill from before the write landed after it"
    assert after.headers["cache-status"].startswith("Brownout; hit")  # the write-through entry


def test_without_a_write_the_fill_is_stored(api: RunningApi) -> None:
    item = api.client.post("/notifications", json=ADA).json()
    _forget_cached(api, item["id"])
    miss = api.client.get(f"/notifications/{item['id']}")
    assert miss.headers["cache-status"] == "Brownout; fwd=miss; stored"
    hit = api.client.get(f"/notifications/{item['id']}")
    assert hit.headers["cache-status"].startswith("Brownout; hit") and hit.json() == miss.json()


def test_a_direct_write_makes_cached_list_pages_not_fresh(api: RunningApi) -> None:
    api.client.post("/notifications", json=ADA)
    first = api.client.get("/users/7/notifications")
    again = api.client.get("/users/7/notifications")
    assert again.headers["cache-status"].startswith("Brownout; hit")
    created = api.client.post("/notifications", json=ADA | {"subject": "second"}).json()
    after = api.client.get("/users/7/notifications")
    assert [i["id"] for i in after.json()["items"]] == [created["id"]] + [i["id"] for i in first.json()["items"]]


def test_concurrent_misses_share_one_database_read(api: RunningApi) -> None:
    item = api.client.post("/notifications", json=ADA).json()
    _forget_cached(api, item["id"])
    selects = _notification_selects(api)
    entered, release = threading.Event(), threading.Event()

    def hold(key: str) -> None:
        entered.set()
        release.wait(20)

    api.services.reads.after_load = hold
    with ThreadPoolExecutor(10) as pool:
        futures = [pool.submit(api.client.get, f"/notifications/{item['id']}") for _ in range(10)]
        assert entered.wait(20)
        threading.Event().wait(0.3)  # let the other nine arrive and queue behind the leader
        release.set()
        answers = [future.result(20) for future in futures]
    assert {answer.status_code for answer in answers} == {200}
    assert {answer.json()["id"] for answer in answers} == {item["id"]}
    assert len(selects) == 1, f"{len(selects)} database reads for one key"


def test_one_loader_per_key_across_processes(api_settings: Callable[..., Settings]) -> None:
    """Two web processes' worth of services (separate pools and flights) share the Redis lock."""
    settings = api_settings(request_db_deadline_seconds=2.0)
    with serve_in_thread(settings) as first, serve_in_thread(settings) as second:
        item = first.client.post("/notifications", json=ADA).json()
        _forget_cached(first, item["id"])
        selects_second = _notification_selects(second)
        entered, release = threading.Event(), threading.Event()

        def hold(key: str) -> None:
            entered.set()
            release.wait(20)

        first.services.reads.after_load = hold
        with ThreadPoolExecutor(2) as pool:
            leader = pool.submit(first.client.get, f"/notifications/{item['id']}")
            assert entered.wait(20)
            follower = pool.submit(second.client.get, f"/notifications/{item['id']}")
            threading.Event().wait(0.1)
            release.set()
            assert leader.result(20).status_code == 200
            answer = follower.result(20)
        assert answer.status_code == 200 and answer.json()["id"] == item["id"]
        assert selects_second == [], "the second process read the database although another was loading the key"
