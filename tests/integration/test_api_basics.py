"""The API against healthy services: the HTTP contract's happy paths and its 4xx answers."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from brownout._settings import Settings
from tests.support.api_server import OPERATOR_TOKEN, RunningApi, serve_in_thread

OPERATOR = OPERATOR_TOKEN
ADA = {"user_id": 42, "email": "ada@example.com", "subject": "Welcome", "body": "Hello"}


@pytest.fixture
def api(api_settings: Callable[..., Settings]) -> Iterator[RunningApi]:
    with serve_in_thread(api_settings(max_body_bytes=2048)) as running:
        yield running


def test_create_is_201_and_readable_at_once(api: RunningApi) -> None:
    created = api.client.post("/notifications", json=ADA, headers={"Idempotency-Key": "welcome-1"})
    assert created.status_code == 201, created.text
    item = created.json()
    assert item["status"] == "applied" and item["read"] is False and "read_stamp" not in item
    uuid.UUID(item["id"])

    fetched = api.client.get(f"/notifications/{item['id']}")
    assert fetched.status_code == 200
    assert fetched.json() == item
    # written through: the first read is already a cache hit
    assert fetched.headers["cache-status"].startswith("Brownout; hit")
    assert "x-brownout" not in fetched.headers


def test_replay_returns_first_result_and_other_body_is_422(api: RunningApi) -> None:
    first = api.client.post("/notifications", json=ADA, headers={"Idempotency-Key": "k-1"})
    again = api.client.post("/notifications", json=ADA, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()

    other = api.client.post("/notifications", json=ADA | {"subject": "Other"}, headers={"Idempotency-Key": "k-1"})
    assert other.status_code == 422
    assert "Idempotency-Key" in other.json()["detail"]


def test_mark_read_then_unread_last_wins(api: RunningApi) -> None:
    item = api.client.post("/notifications", json=ADA).json()
    read = api.client.post(f"/notifications/{item['id']}/read")
    assert read.status_code == 200 and read.json()["read"] is True
    unread = api.client.post(f"/notifications/{item['id']}/unread")
    assert unread.status_code == 200 and unread.json()["read"] is False
    assert api.client.get(f"/notifications/{item['id']}").json()["read"] is False


def test_list_is_newest_first_and_paginates(api: RunningApi) -> None:
    ids = [api.client.post("/notifications", json=ADA | {"subject": f"n{i}"}).json()["id"] for i in range(5)]
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(5):
        params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = api.client.get("/users/42/notifications", params=params)
        assert page.status_code == 200
        body = page.json()
        assert len(body["items"]) <= 2
        seen += [item["id"] for item in body["items"]]
        cursor = body["next"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))


def test_stats_counts_read_and_unread(api: RunningApi) -> None:
    first = api.client.post("/notifications", json=ADA).json()
    api.client.post("/notifications", json=ADA | {"subject": "two"})
    api.client.post(f"/notifications/{first['id']}/read")
    assert api.client.get("/users/42/notifications/stats").json() == {"total": 2, "read": 1, "unread": 1}


def test_bad_requests_get_clear_4xx(api: RunningApi) -> None:
    invalid = api.client.post("/notifications", json={"user_id": 0, "email": "nope", "subject": ""})
    assert invalid.status_code == 422
    fields = {error["field"] for error in invalid.json()["errors"]}
    assert fields == {"user_id", "email", "subject"}
    assert all(error["reason"] for error in invalid.json()["errors"])

    assert api.client.post("/notifications", json=ADA | {"extra": 1}).status_code == 422
    nul = api.client.post("/notifications", json=ADA | {"body": "a\u0000b"})  # PostgreSQL text cannot hold it
    assert nul.status_code == 422 and [e["field"] for e in nul.json()["errors"]] == ["body"], nul.text
    assert "NUL" in nul.json()["errors"][0]["reason"]
    for field, value in (("subject", "Hi\r\nBcc: eve@example.com"), ("subject", "invoice\u202efdp.exe"), ("body", "x\u202ey")):
        refused = api.client.post("/notifications", json=ADA | {field: value})
        assert refused.status_code == 422 and [e["field"] for e in refused.json()["errors"]] == [field], refused.text
    lines = api.client.post("/notifications", json=ADA | {"body": "line one\nline two\tend"}, headers={"Idempotency-Key": "ml"})
    assert lines.status_code == 201, lines.text
    assert api.client.get("/notifications/not-a-uuid").status_code == 422
    missing = api.client.get(f"/notifications/{uuid.uuid4()}")
    assert missing.status_code == 404 and missing.json() == {"detail": "not found"}
    unknown = api.client.get("/no/such/route")
    assert unknown.status_code == 404 and unknown.headers["content-type"] == "application/json"
    assert api.client.get("/users/42/notifications", params={"cursor": "garbage!"}).status_code == 400
    forged = base64.urlsafe_b64encode(f"{10**22}:{uuid.uuid4()}".encode()).decode()  # decodes; no such time
    forged_answer = api.client.get("/users/42/notifications", params={"cursor": forged})
    assert forged_answer.status_code == 400 and "cursor" in forged_answer.json()["detail"], forged_answer.text
    assert api.client.get("/users/42/notifications", params={"limit": 101}).status_code == 422
    key = api.client.post("/notifications", json=ADA, headers={"Idempotency-Key": "x" * 201})
    assert key.status_code == 422


def test_body_over_the_limit_is_413_before_it_is_read(api: RunningApi) -> None:
    big = ADA | {"body": "x" * 4000}
    declared = api.client.post("/notifications", json=big)
    assert declared.status_code == 413 and "2048" in declared.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        yield b'{"user_id": 42, "email": "ada@example.com", "subject": "s", "body": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}'

    streamed = api.client.post("/notifications", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413


def test_health_and_ready(api_settings: Callable[..., Settings]) -> None:
    with serve_in_thread(api_settings(admin_token=OPERATOR)) as api:
        assert api.client.get("/health").json() == {"status": "ok"}
        ready = api.client.get("/ready", headers={"Authorization": f"Bearer {OPERATOR}"})
    assert ready.status_code == 200
    body = ready.json()
    assert body["ready"] is True and body["writes"] == "direct" and body["reasons"] == []
    assert body["parts"] == {"database": "healthy", "breaker": "closed", "redis": "ok", "rabbitmq": "ready"}
    assert body["breaker"]["state"] == "closed" and body["redis"]["ok"] is True
    assert body["rabbitmq"]["publisher"] == "ready" and body["rabbitmq"]["queue"]["ok"] is True


def test_ready_tells_an_anonymous_caller_its_status_only(api_settings: Callable[..., Settings]) -> None:
    """Error texts name hosts, ports and users: only the operator's token shows them."""
    with serve_in_thread(api_settings(admin_token=OPERATOR, redis_url="redis://:pw@127.0.0.1:1/0")) as api:
        with api.anonymous() as outsider:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {OPERATOR}"}):
                anonymous = outsider.get("/ready", headers=headers)
                assert anonymous.status_code == 200 and anonymous.json() == {"ready": True}, headers
        operator = api.client.get("/ready", headers={"Authorization": f"Bearer {OPERATOR}"}).json()
    assert operator["parts"]["redis"] in ("unreachable", "skipped") and "127.0.0.1:1" in str(operator)
    assert "pw" not in str(operator["redis"])


def test_openapi_documents_the_routes(api: RunningApi) -> None:
    spec = api.client.get("/openapi.json").json()
    for path in ("/notifications", "/notifications/{notification_id}/read", "/users/{user_id}/notifications", "/ready"):
        assert path in spec["paths"]
    assert api.client.get("/docs").status_code == 200


def test_an_over_long_query_string_or_header_is_refused_before_any_work(api: RunningApi) -> None:
    settings = api.brownout.settings
    padding = "p=" + "x" * (settings.max_query_bytes - 2)  # exactly at the bound: served
    assert api.client.get(f"/users/42/notifications?{padding}").status_code == 200
    too_long = api.client.get(f"/users/42/notifications?{padding}x")
    assert too_long.status_code == 414 and "query string" in too_long.json()["detail"]
    header = api.client.get("/health", headers={"X-Junk": "y" * settings.max_header_bytes})
    assert header.status_code == 431 and header.headers["content-type"] == "application/json"
    assert api.client.get("/health", headers={"X-Fine": "y" * 1000}).status_code == 200


def test_a_uuid_user_id_round_trips(api: RunningApi) -> None:
    """Supabase Auth's user ids are UUIDs: created, listed, counted and read back as the same string."""
    user = str(uuid.uuid4())
    created = api.client.post("/notifications", json=ADA | {"user_id": user}, headers={"Idempotency-Key": "uuid-1"})
    assert created.status_code == 201, created.text
    item = created.json()
    assert item["user_id"] == user
    listed = api.client.get(f"/users/{user}/notifications")
    assert listed.status_code == 200, listed.text
    assert listed.json()["items"] == [item]
    assert api.client.get(f"/users/{user}/notifications/stats").json() == {"total": 1, "read": 0, "unread": 1}
    assert api.client.get(f"/notifications/{item['id']}").json() == item
    assert api.client.get("/users/auth0|abc/notifications").json()["items"] == []  # another issuer's form
    assert api.client.get("/users/42/notifications").json()["items"] == []  # not this user's


def test_an_integer_user_id_is_taken_as_its_decimal_string(api: RunningApi) -> None:
    """What callers of the previous release send: the same user, now named by a string."""
    as_int = api.client.post("/notifications", json=ADA, headers={"Idempotency-Key": "int-1"})
    as_str = api.client.post("/notifications", json=ADA | {"user_id": "42"}, headers={"Idempotency-Key": "int-2"})
    assert as_int.status_code == as_str.status_code == 201, (as_int.text, as_str.text)
    assert as_int.json()["user_id"] == as_str.json()["user_id"] == "42"
    listed = api.client.get("/users/42/notifications").json()["items"]
    assert [item["user_id"] for item in listed] == ["42", "42"]


@pytest.mark.parametrize(
    "user_id",
    ["", " ", "a b", "a/b", "a\u0000b", "a\nb", "x" * 129, "..", "\u00e9t\u00e9", 0, -1, True, 4.2, None, 2**63],
)
def test_a_bad_user_id_in_the_body_is_422_naming_the_field(api: RunningApi, user_id: object) -> None:
    refused = api.client.post("/notifications", json=ADA | {"user_id": user_id})
    assert refused.status_code == 422, refused.text
    assert [error["field"] for error in refused.json()["errors"]] == ["user_id"], refused.text


@pytest.mark.parametrize("segment", ["a%20b", "%20", "a%2Fb", "%00", "x" * 129, "a%0Ab", "%C3%A9"])
def test_a_bad_user_id_in_the_path_is_422(api: RunningApi, segment: str) -> None:
    for path in (f"/users/{segment}/notifications", f"/users/{segment}/notifications/stats"):
        refused = api.client.get(path)
        assert refused.status_code in (404, 422), (path, refused.text)  # "a%2Fb" may not reach the route
        if "%2F" not in segment:
            assert refused.status_code == 422, (path, refused.text)


def test_browsers_of_the_configured_origins_may_call(api_settings: Callable[..., Settings]) -> None:
    with serve_in_thread(api_settings(cors_origins="https://app.example.com, https://admin.example.com")) as api:
        with api.anonymous() as browser:
            preflight = browser.options(
                "/users/7/notifications",
                headers={
                    "Origin": "https://app.example.com",
                    "Access-Control-Request-Method": "GET",
                    "Access-Control-Request-Headers": "authorization, idempotency-key",
                },
            )
            assert preflight.status_code == 200, preflight.text
            assert preflight.headers["access-control-allow-origin"] == "https://app.example.com"
            assert {"authorization", "idempotency-key"} <= set(
                preflight.headers["access-control-allow-headers"].lower().split(", ")
            )
            other = browser.options(
                "/users/7/notifications", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
            )
            assert "access-control-allow-origin" not in other.headers
        answer = api.client.get("/users/7/notifications", headers={"Origin": "https://admin.example.com"})
        assert answer.headers["access-control-allow-origin"] == "https://admin.example.com"
        exposed = {name.strip().lower() for name in answer.headers["access-control-expose-headers"].split(",")}
        assert {"location", "retry-after", "age", "x-brownout", "cache-status"} <= exposed


def test_no_origin_is_allowed_by_default(api: RunningApi) -> None:
    answer = api.client.get("/users/7/notifications", headers={"Origin": "https://app.example.com"})
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers
