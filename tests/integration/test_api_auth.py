"""Who may call, route by route, against the real app: service keys, the operator's token, end users' tokens.

Tokens are minted as Supabase Auth mints them (tests/support/jwt_issuer.py) and verified against a JWKS served
over real HTTP on loopback; every refusal is the JSON the rest of the API answers.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from brownout._auth.keys import entry_for
from brownout._settings import Settings
from tests.support.api_server import RunningApi, serve_in_process, serve_in_thread
from tests.support.credentials import AS_SERVICE, SERVICE_KEY_ENTRY
from tests.support.jwt_issuer import ISSUER, SECRET, JwksServer, SigningKey, hand_signed, mint_hs256, supabase_claims
from tests.support.rabbit import ready_count

READER = "bo_a-reader-key-for-the-auth-matrix-0123456789"
PROMETHEUS = "bo_a-prometheus-key-for-the-auth-matrix-012345"
NOTE = {"user_id": "u-1", "email": "ada@example.com", "subject": "Hello", "body": "b"}


@pytest.fixture
def signing() -> SigningKey:
    return SigningKey("EC")


@pytest.fixture
def jwks(signing: SigningKey) -> Iterator[JwksServer]:
    server = JwksServer([signing.jwk])
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def auth_settings(api_settings: Callable[..., Settings], jwks: JwksServer) -> Callable[..., Settings]:
    keys = ",".join((SERVICE_KEY_ENTRY, entry_for("reader", READER, ["read"]), entry_for("prometheus", PROMETHEUS, ["metrics"])))

    def settings(**overrides: Any) -> Settings:
        fields = {"api_keys": keys, "jwt_secret": SECRET, "jwt_jwks_url": jwks.url, "jwt_issuer": ISSUER} | overrides
        return api_settings(**fields)

    return settings


@pytest.fixture
def api(auth_settings: Callable[..., Settings]) -> Iterator[RunningApi]:
    with serve_in_thread(auth_settings()) as running:
        yield running


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def user_token(user_id: str, **overrides: Any) -> str:
    return mint_hs256(supabase_claims(time.time(), sub=user_id, **overrides))


def routes(notification_id: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    return [
        ("POST", "/notifications", NOTE),
        ("POST", f"/notifications/{notification_id}/read", None),
        ("POST", f"/notifications/{notification_id}/unread", None),
        ("GET", f"/notifications/{notification_id}", None),
        ("GET", "/users/u-1/notifications", None),
        ("GET", "/users/u-1/notifications/stats", None),
        ("GET", f"/commands/{uuid.uuid4()}", None),
        ("GET", "/metrics", None),
        ("POST", "/admin/breaker", {"action": "reset"}),
        ("POST", "/admin/mode", {"mode": "read-write"}),
    ]


def call(client: httpx.Client, method: str, path: str, body: dict[str, Any] | None, headers: dict[str, str]) -> httpx.Response:
    return client.request(method, path, json=body, headers=headers)


def test_every_route_but_health_refuses_a_caller_without_a_valid_credential(
    auth_settings: Callable[..., Settings], signing: SigningKey
) -> None:
    with serve_in_thread(auth_settings(rate_limit_auth_failures="100000/minute")) as api:  # many refusals, one address
        refuses_everything_invalid(api, signing)


def refuses_everything_invalid(api: RunningApi, signing: SigningKey) -> None:
    created = api.client.post("/notifications", json=NOTE).json()
    now = time.time()
    claims = supabase_claims(now, sub="u-1")
    invalid = {
        "no credential": {},
        "not bearer": {"Authorization": f"Basic {READER}"},
        "an unknown key": bearer("bo_" + "x" * 43),
        "a key too short": bearer("bo_short"),
        "expired token": bearer(user_token("u-1", exp=int(now) - 3600)),
        "token not yet valid": bearer(user_token("u-1", nbf=int(now) + 3600)),
        "wrong audience": bearer(user_token("u-1", aud="somebody-else")),
        "wrong issuer (HS256)": bearer(user_token("u-1", iss="https://evil.example/auth/v1")),
        "wrong issuer (ES256)": bearer(signing.mint(supabase_claims(now, sub="u-1", iss="https://evil.example/auth/v1"))),
        "bad signature": bearer(mint_hs256(claims, secret="another-secret-of-at-least-32-characters!")),
        "alg none": bearer(hand_signed(claims, {"alg": "none", "typ": "JWT"}, None)),
        "HS256 signed with the JWKS public key": bearer(
            hand_signed(claims, {"alg": "HS256", "typ": "JWT", "kid": signing.kid}, signing.public_pem)
        ),
        "anonymous Supabase user": bearer(user_token("u-1", is_anonymous=True)),
        "role not authenticated": bearer(user_token("u-1", role="service_role")),
    }
    with api.anonymous() as outsider:
        for name, headers in invalid.items():
            for method, path, body in routes(created["id"]):
                answer = call(outsider, method, path, body, headers)
                assert answer.status_code == 401, (name, method, path, answer.status_code, answer.text)
                assert answer.headers["www-authenticate"] == "Bearer" and set(answer.json()) == {"detail"}
        assert outsider.get("/health").status_code == 200  # the platform's health check stays public
        assert outsider.get("/ready").json() == {"ready": True}


def test_a_valid_credential_without_the_scope_is_403(api: RunningApi) -> None:
    created = api.client.post("/notifications", json=NOTE).json()
    for method, path, body in routes(created["id"]):
        as_prometheus = call(api.client, method, path, body, bearer(PROMETHEUS))
        assert as_prometheus.status_code == (200 if path == "/metrics" else 403), (method, path, as_prometheus.text)
        as_reader = call(api.client, method, path, body, bearer(READER))
        expected = 200 if method == "GET" and path != "/metrics" else 403
        assert as_reader.status_code in ((expected, 404) if path.startswith("/commands") else (expected,)), (method, path)
    assert api.client.get("/ready", headers=bearer(READER)).json() == {"ready": True}  # detail: admin or metrics
    assert "parts" in api.client.get("/ready", headers=bearer(PROMETHEUS)).json()


def test_a_user_sees_their_own_list_and_nobody_elses(api: RunningApi) -> None:
    mine = api.client.post("/notifications", json=NOTE | {"user_id": "u-1"}).json()
    as_u1 = bearer(user_token("u-1"))
    listed = api.client.get("/users/u-1/notifications", headers=as_u1)
    assert listed.status_code == 200 and [item["id"] for item in listed.json()["items"]] == [mine["id"]]
    assert api.client.get("/users/u-1/notifications/stats", headers=as_u1).json()["total"] == 1
    assert api.client.get(f"/notifications/{mine['id']}", headers=as_u1).json()["id"] == mine["id"]
    theirs = api.client.post("/notifications", json=NOTE | {"user_id": "u-2"}).json()
    assert api.client.get(f"/notifications/{theirs['id']}", headers=as_u1).status_code == 404
    assert api.client.get(f"/notifications/{uuid.uuid4()}", headers=as_u1).status_code == 404
    other = api.client.get("/users/u-2/notifications", headers=as_u1)
    assert other.status_code == 404 and other.json() == {"detail": "Not Found"}  # its existence is not revealed
    assert api.client.get("/users/u-3/notifications", headers=as_u1).status_code == 404
    created = api.client.post("/notifications", json=NOTE, headers=as_u1)
    assert created.status_code == 403, created.text  # users do not create notifications


def test_es256_tokens_from_the_jwks_and_a_stalled_endpoint_never_stalls_a_request(
    api: RunningApi, jwks: JwksServer, signing: SigningKey
) -> None:
    token = signing.mint(supabase_claims(time.time(), sub="u-1"))
    assert api.client.get("/users/u-1/notifications", headers=bearer(token)).status_code == 200
    jwks.stall()
    started = time.monotonic()
    assert api.client.get("/users/u-1/notifications", headers=bearer(token)).status_code == 200  # a known key
    rotated = SigningKey("EC").mint(supabase_claims(time.time(), sub="u-1"))  # a kid the stalled JWKS never serves
    refused = api.client.get("/users/u-1/notifications", headers=bearer(rotated))
    assert refused.status_code == 401 and "signing key" in refused.json()["detail"]
    assert time.monotonic() - started < 5  # bounded by the verifier's short wait, not the endpoint's silence


def test_a_jwks_key_rotation_is_picked_up_on_the_first_token_signed_with_the_new_key(api: RunningApi, jwks: JwksServer) -> None:
    rotated = SigningKey("EC")
    jwks.keys.append(rotated.jwk)  # Supabase publishes the new key, then starts signing with it
    token = rotated.mint(supabase_claims(time.time(), sub="u-1"))
    assert api.client.get("/users/u-1/notifications", headers=bearer(token)).status_code == 200


def test_writes_over_the_callers_rate_get_429_and_are_not_accepted(
    auth_settings: Callable[..., Settings], queue_name: str
) -> None:
    with serve_in_thread(auth_settings(rate_limit_writes="3/hour")) as api:
        api.brownout.database.breaker.force_open()  # queued writes: what was accepted is countable in RabbitMQ
        answers = [api.client.post("/notifications", json=NOTE) for _ in range(4)]
        assert [answer.status_code for answer in answers] == [202, 202, 202, 429]
        assert int(answers[-1].headers["retry-after"]) >= 1 and "rate limit" in answers[-1].json()["detail"]
        assert ready_count(queue_name) == 3  # the refused write was not queued
        command = api.client.get(f"/commands/{answers[0].json()['command_id']}")
        assert command.status_code == 200, command.text  # reads have their own budget


def test_the_rate_is_shared_by_the_fleet(auth_settings: Callable[..., Settings]) -> None:
    settings = auth_settings(rate_limit_reads="4/hour")
    fields = {name: getattr(settings, name) for name in type(settings).model_fields}
    with serve_in_thread(settings) as here, serve_in_process(fields) as there:
        assert [here.client.get("/users/u-1/notifications").status_code for _ in range(2)] == [200, 200]
        elsewhere = [httpx.get(f"{there}/users/u-1/notifications", headers=AS_SERVICE, timeout=10).status_code for _ in range(3)]
        assert elsewhere == [200, 200, 429]


def test_with_redis_down_each_process_keeps_its_share(auth_settings: Callable[..., Settings]) -> None:
    settings = auth_settings(rate_limit_reads="4/hour", web_processes=2, redis_url="redis://127.0.0.1:1/0")
    with serve_in_thread(settings) as api:  # Redis refuses: this process's share is 4 / 2
        statuses = [api.client.get("/users/u-1/notifications/stats").status_code for _ in range(3)]
    assert statuses == [200, 200, 429]  # limited, not unlimited, and not refused for Redis's sake


def test_guessing_credentials_from_one_address_is_slowed_down(auth_settings: Callable[..., Settings]) -> None:
    with serve_in_thread(auth_settings(rate_limit_auth_failures="3/hour")) as api, api.anonymous() as guesser:
        statuses = [guesser.get("/users/u-1/notifications", headers=bearer(f"bo_guess-{n:040d}")).status_code for n in range(4)]
        assert statuses == [401, 401, 401, 429]
        assert api.client.get("/users/u-1/notifications").status_code == 200  # a valid key still gets in


def test_openapi_declares_both_bearer_schemes(api: RunningApi) -> None:
    spec = api.client.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["ServiceKey"]["scheme"] == "bearer" and schemes["UserToken"]["bearerFormat"] == "JWT"
    listing = spec["paths"]["/users/{user_id}/notifications"]["get"]
    assert {"ServiceKey": []} in listing["security"] and {"UserToken": []} in listing["security"]


def test_with_no_credential_configured_the_web_refuses_to_start(api_settings: Callable[..., Settings]) -> None:
    from brownout._settings import ConfigurationError

    with pytest.raises(ConfigurationError, match="no credential is configured"):
        serve_in_thread(api_settings(api_keys=None)).__enter__()


def test_authentication_disabled_on_purpose_answers_everyone_and_says_so(api_settings: Callable[..., Settings]) -> None:
    with serve_in_thread(api_settings(api_keys=None, auth="disabled")) as api, api.anonymous() as anyone:
        assert anyone.post("/notifications", json=NOTE).status_code == 201
        ready = anyone.get("/ready").json()
        assert any("authentication is disabled" in reason for reason in ready["reasons"])
