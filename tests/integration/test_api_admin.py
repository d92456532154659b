"""Operator actions: the token guards them, and a forced breaker state reaches every web process."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from pydantic import ValidationError

from brownout._auth.keys import entry_for
from brownout._settings import Settings
from tests.support.api_server import serve_in_process, serve_in_thread
from tests.support.credentials import AS_SERVICE, OPERATOR_TOKEN, SERVICE_KEY_ENTRY
from tests.support.polling import wait_until

TOKEN = OPERATOR_TOKEN
METRICS_KEY = "bo_prometheus-only-key-0123456789abcdefgh"


def test_the_admin_scope_opens_the_route_and_nothing_else_does(api_settings: Callable[..., Settings]) -> None:
    keys = f"{SERVICE_KEY_ENTRY},{entry_for('prometheus', METRICS_KEY, ['metrics'])}"
    with serve_in_thread(api_settings(api_keys=keys)) as api:  # no admin token: only a key with `admin` opens it
        forbidden = api.client.post("/admin/breaker", json={"action": "open"}, headers={"Authorization": f"Bearer {METRICS_KEY}"})
        assert forbidden.status_code == 403 and "admin" in forbidden.json()["detail"]
        assert api.brownout.database.breaker.state.value == "closed"
        assert api.client.post("/admin/breaker", json={"action": "reset"}).status_code == 200  # the suite's key: every scope


def test_missing_or_wrong_token_is_401_and_changes_nothing(api_settings: Callable[..., Settings]) -> None:
    with serve_in_thread(api_settings(admin_token=TOKEN)) as api, api.anonymous() as outsider:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer"}):
            answer = outsider.post("/admin/breaker", json={"action": "open"}, headers=headers)
            assert answer.status_code == 401, headers
            assert answer.headers["www-authenticate"] == "Bearer"
            assert set(answer.json()) == {"detail"}  # JSON like every other error
        # refused before the body is even looked at
        assert outsider.post("/admin/breaker", json={"action": "explode"}).status_code == 401
        assert api.brownout.database.breaker.state.value == "closed"
        bad = outsider.post("/admin/breaker", json={"action": "explode"}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert bad.status_code == 422


def test_an_admin_token_shorter_than_32_characters_stops_start_up(api_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ValidationError, match="at least 32 characters"):
        api_settings(admin_token="s3cret-token")
    assert api_settings(admin_token="").admin_token is None  # empty is unset: the operator's routes stay off (404)


def test_forced_state_reaches_another_process(api_settings: Callable[..., Settings]) -> None:
    settings = api_settings(admin_token=TOKEN, override_poll_seconds=0.2)
    fields = {name: getattr(settings, name) for name in type(settings).model_fields}
    fields["admin_token"] = TOKEN
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def breaker_of(url: str) -> str:
        return str(httpx.get(f"{url}/ready", headers=auth, timeout=5).json()["breaker"]["state"])

    with serve_in_thread(settings) as api, serve_in_process(fields) as other:
        assert breaker_of(other) == "closed"
        opened = api.client.post("/admin/breaker", json={"action": "open"}, headers=auth)
        assert opened.status_code == 200, opened.text
        assert opened.json()["breaker"]["state"] == "open" and opened.json()["breaker"]["forced"] == "open"
        assert wait_until(lambda: breaker_of(other) == "open", timeout=15)
        # the other process queues writes now: its breaker refuses the database
        note = {"user_id": 5, "email": "a@example.com", "subject": "s"}
        queued = httpx.post(f"{other}/notifications", json=note, headers=AS_SERVICE, timeout=10)
        assert queued.status_code == 202, queued.text

        reset = api.client.post("/admin/breaker", json={"action": "reset"}, headers=auth)
        assert reset.status_code == 200 and reset.json()["breaker"]["state"] == "closed"
        assert wait_until(lambda: breaker_of(other) == "closed", timeout=15)


def test_a_process_started_later_applies_the_standing_action(api_settings: Callable[..., Settings]) -> None:
    settings = api_settings(admin_token=TOKEN)
    with serve_in_thread(settings) as api:
        api.client.post("/admin/breaker", json={"action": "open"}, headers={"Authorization": f"Bearer {TOKEN}"})
    with serve_in_thread(settings) as later:
        assert later.brownout.database.breaker.state.value == "open"
        ready = later.client.get("/ready", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ready.json()["breaker"]["forced"] == "open"
