"""JwtVerifier against a JWKS served over real HTTP on loopback, as Supabase serves it: ES256 and
RS256 keys, algorithm confusion, a key rotation, an endpoint refused, stalling or broken.

Time for tokens is an injected clock; real time is only ever bounded (the short wait for an
unknown kid), never slept through."""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

from brownout._auth.tokens import InvalidToken, JwtVerifier
from tests.support.jwt_issuer import (
    ISSUER,
    SECRET,
    FakeClock,
    JwksServer,
    SigningKey,
    hand_signed,
    jwks_server,
    mint_hs256,
    refused_url,
    supabase_claims,
)
from tests.support.polling import wait_until

FETCH_TIMEOUT = 2.0
UNKNOWN_KID_WAIT = min(FETCH_TIMEOUT, 1.0)  # the verifier's default bound
SLACK = 0.5


@pytest.fixture(scope="module")
def ec_key() -> SigningKey:
    return SigningKey("EC")


@pytest.fixture(scope="module")
def rsa_key() -> SigningKey:
    return SigningKey("RSA")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def server(ec_key: SigningKey, rsa_key: SigningKey) -> Iterator[JwksServer]:
    server = JwksServer([ec_key.jwk, rsa_key.jwk])
    yield server
    server.close()


def started(url: str, clock: FakeClock, **options: Any) -> JwtVerifier:
    options.setdefault("secret", SECRET)
    verifier = JwtVerifier(
        jwks_url=url,
        issuer=ISSUER,
        clock=clock,
        jwks_refresh_seconds=3600,  # no periodic fetch during a test: every request counted is ours
        fetch_timeout_seconds=FETCH_TIMEOUT,
        **options,
    )
    verifier.start()
    return verifier


@pytest.fixture
def verifier(server: JwksServer, clock: FakeClock) -> Iterator[JwtVerifier]:
    v = started(server.url, clock)
    assert wait_until(lambda: v._fetches_finished >= 1, timeout=5)  # the first fetch, in the background
    assert server.requests == 1
    yield v
    v.close()


def refused(v: JwtVerifier, token: str) -> str:
    with pytest.raises(InvalidToken) as raised:
        v.verify(token)
    assert token not in str(raised.value)
    return raised.value.reason


def timed(call: Any) -> float:
    began = time.monotonic()
    call()
    return time.monotonic() - began


def test_es256_and_rs256_tokens_verify(verifier: JwtVerifier, clock: FakeClock, ec_key: SigningKey, rsa_key: SigningKey) -> None:
    for key in (ec_key, rsa_key):
        payload = supabase_claims(clock.now)
        claims = verifier.verify(key.mint(payload))
        assert (claims.user_id, claims.is_anonymous, claims.expires_at) == (payload["sub"], False, payload["exp"])
    # The legacy secret's tokens stay valid beside them (a project moving off it has both).
    verifier.verify(mint_hs256(supabase_claims(clock.now)))


def test_a_token_arriving_before_the_first_fetch_waits_for_it(server: JwksServer, clock: FakeClock, ec_key: SigningKey) -> None:
    v = started(server.url, clock)
    try:
        v.verify(ec_key.mint(supabase_claims(clock.now)))
        assert server.requests == 1  # it waited for the first fetch, it did not force a second
    finally:
        v.close()


def test_wrong_issuer_is_refused(verifier: JwtVerifier, clock: FakeClock, ec_key: SigningKey) -> None:
    other = "https://qrstuvwxyzabcdef.supabase.co/auth/v1"
    assert refused(verifier, ec_key.mint(supabase_claims(clock.now, iss=other))) == "wrong issuer"
    assert refused(verifier, ec_key.mint(supabase_claims(clock.now, iss=None))) == "missing iss claim"


def test_expired_and_early_tokens_are_refused(verifier: JwtVerifier, clock: FakeClock, rsa_key: SigningKey) -> None:
    assert refused(verifier, rsa_key.mint(supabase_claims(clock.now, exp=int(clock.now) - 31))) == "token expired"
    assert refused(verifier, rsa_key.mint(supabase_claims(clock.now, nbf=int(clock.now) + 31))) == "token not yet valid"
    assert refused(verifier, rsa_key.mint(supabase_claims(clock.now, aud="anon"))) == "wrong audience"


def test_bad_signature_is_refused(verifier: JwtVerifier, clock: FakeClock, ec_key: SigningKey) -> None:
    impostor = SigningKey("EC")
    assert refused(verifier, impostor.mint(supabase_claims(clock.now), kid=ec_key.kid)) == "bad signature"


def test_a_key_only_verifies_its_own_algorithm(
    verifier: JwtVerifier, clock: FakeClock, ec_key: SigningKey, rsa_key: SigningKey
) -> None:
    payload = supabase_claims(clock.now)
    # Signed by the RSA key, labelled with the EC key's kid; and the other way round.
    assert refused(verifier, rsa_key.mint(payload, kid=ec_key.kid)) == "signing key does not match the algorithm"
    assert refused(verifier, ec_key.mint(payload, kid=rsa_key.kid)) == "signing key does not match the algorithm"
    # RS512 by the RSA key under its own kid: not an algorithm Supabase uses, refused.
    assert refused(verifier, rsa_key.mint(payload, alg="RS512")) == "unsupported algorithm"


def test_hs256_signed_with_a_jwks_public_key_is_refused(
    server: JwksServer, clock: FakeClock, ec_key: SigningKey, rsa_key: SigningKey
) -> None:
    """Algorithm confusion: the public key is public, so an HMAC keyed with its bytes is forgeable
    by anyone. Refused whether or not a legacy secret is configured."""
    payload = supabase_claims(clock.now)
    forgeries = []
    for key in (ec_key, rsa_key):
        header = {"alg": "HS256", "typ": "JWT", "kid": key.kid}
        forgeries.append(hand_signed(payload, header, key.public_pem))
        forgeries.append(hand_signed(payload, header, json.dumps(key.jwk).encode()))
        forgeries.append(hand_signed(payload, header, json.dumps(key.jwk, separators=(",", ":")).encode()))
    with_secret = started(server.url, clock)
    without_secret = started(server.url, clock, secret=None)
    try:
        for token in forgeries:
            assert refused(with_secret, token) == "bad signature"
            assert refused(without_secret, token) == "unsupported algorithm"
    finally:
        with_secret.close()
        without_secret.close()


def test_an_oct_key_in_the_jwks_is_never_used(clock: FakeClock, ec_key: SigningKey) -> None:
    """A JWKS that serves a symmetric key (a misconfiguration, or an attacker's proxy) does not
    make HS256 tokens signed with it valid."""
    oct_secret = b"a-symmetric-key-someone-published-in-the-jwks"
    oct_jwk = {"kty": "oct", "kid": "oct-1", "alg": "HS256", "k": base64.urlsafe_b64encode(oct_secret).rstrip(b"=").decode()}
    with jwks_server([oct_jwk, ec_key.jwk]) as server:
        v = started(server.url, clock, secret=None)
        try:
            v.verify(ec_key.mint(supabase_claims(clock.now)))
            token = hand_signed(supabase_claims(clock.now), {"alg": "HS256", "kid": "oct-1"}, oct_secret)
            assert refused(v, token) == "unsupported algorithm"
            assert "oct-1" not in v._keys
        finally:
            v.close()


def test_a_rotation_is_picked_up_by_one_immediate_refetch(
    verifier: JwtVerifier, server: JwksServer, clock: FakeClock, ec_key: SigningKey
) -> None:
    new_key = SigningKey("EC")
    server.keys = [new_key.jwk, ec_key.jwk]
    assert verifier.verify(new_key.mint(supabase_claims(clock.now))).user_id
    assert server.requests == 2  # one refetch, forced by the unknown kid

    # A second unknown kid within 30 s: refused at once, without asking the issuer again.
    clock.advance(29)
    later_key = SigningKey("EC")
    server.keys = [later_key.jwk, new_key.jwk]
    token = later_key.mint(supabase_claims(clock.now))
    assert timed(lambda: refused(verifier, token)) < SLACK
    assert server.requests == 2
    # Keys known still verify meanwhile, from memory.
    verifier.verify(new_key.mint(supabase_claims(clock.now)))
    assert server.requests == 2

    # Past the 30 s, an unknown kid may force a refetch again.
    clock.advance(2)
    verifier.verify(token)
    assert server.requests == 3


def test_a_withdrawn_key_stops_verifying_even_from_the_cache(
    verifier: JwtVerifier, server: JwksServer, clock: FakeClock, ec_key: SigningKey, rsa_key: SigningKey
) -> None:
    cached = rsa_key.mint(supabase_claims(clock.now))
    verifier.verify(cached)
    server.keys = [ec_key.jwk]  # the RSA key revoked
    newcomer = SigningKey("EC")
    refused(verifier, newcomer.mint(supabase_claims(clock.now)))  # an unknown kid: the refetch sees the revocation
    assert server.requests == 2
    assert refused(verifier, cached) == "unknown signing key"


def test_an_unreachable_jwks_keeps_the_known_keys(
    verifier: JwtVerifier, server: JwksServer, clock: FakeClock, ec_key: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    server.close()  # the port now refuses connections
    caplog.set_level(logging.DEBUG, logger="brownout.auth")
    unknown = SigningKey("EC").mint(supabase_claims(clock.now))
    assert timed(lambda: refused(verifier, unknown)) < UNKNOWN_KID_WAIT + SLACK
    assert wait_until(lambda: verifier._fetches_finished >= 2, timeout=5)
    assert timed(lambda: verifier.verify(ec_key.mint(supabase_claims(clock.now)))) < SLACK

    clock.advance(31)  # a second forced refetch, failing too
    assert refused(verifier, unknown) == "unknown signing key"
    verifier.verify(ec_key.mint(supabase_claims(clock.now)))
    warnings = [r for r in caplog.records if r.name == "brownout.auth" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1  # one warning for the outage, not one per fetch or per request
    assert "keeping the 2 keys known" in warnings[0].getMessage()
    assert all(unknown not in r.getMessage() for r in caplog.records)


def test_a_jwks_refused_from_the_start(clock: FakeClock, ec_key: SigningKey) -> None:
    v = started(refused_url(), clock)
    try:
        assert timed(lambda: refused(v, ec_key.mint(supabase_claims(clock.now)))) < UNKNOWN_KID_WAIT + SLACK
        v.verify(mint_hs256(supabase_claims(clock.now)))  # the legacy secret's tokens do not need it
    finally:
        v.close()


def test_a_stalling_jwks_never_stalls_a_request(
    verifier: JwtVerifier, server: JwksServer, clock: FakeClock, ec_key: SigningKey, rsa_key: SigningKey
) -> None:
    server.stall()  # accepts, never answers
    unknown = SigningKey("EC").mint(supabase_claims(clock.now))
    elapsed = timed(lambda: refused(verifier, unknown))
    assert UNKNOWN_KID_WAIT - 0.1 <= elapsed < UNKNOWN_KID_WAIT + SLACK
    # The refetch still hangs in the background; known keys answer from memory meanwhile.
    assert verifier._fetches_finished == 1
    for key in (ec_key, rsa_key):
        assert timed(lambda key=key: verifier.verify(key.mint(supabase_claims(clock.now)))) < SLACK
    # The hung fetch gives up at its timeout and the keys stay.
    assert wait_until(lambda: verifier._fetches_finished >= 2, timeout=FETCH_TIMEOUT * 2 + SLACK)
    verifier.verify(ec_key.mint(supabase_claims(clock.now, sub="after-the-timeout")))


def test_a_jwks_stalling_from_the_start(clock: FakeClock, ec_key: SigningKey) -> None:
    with jwks_server([ec_key.jwk]) as server:
        server.stall()
        v = started(server.url, clock)
        try:
            assert timed(lambda: refused(v, ec_key.mint(supabase_claims(clock.now)))) < UNKNOWN_KID_WAIT + SLACK
            assert timed(v.close) < FETCH_TIMEOUT + 0.5 + SLACK  # close is bounded even mid-fetch
        finally:
            v.close()


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, b'{"error": "internal"}'),
        (200, b"<html>gateway</html>"),
        (200, b'{"error": "no keys here"}'),
        (200, json.dumps({"keys": [], "padding": "x" * 70_000}).encode()),
        (302, b""),
    ],
    ids=["http-500", "not-json", "no-keys-list", "oversized", "redirect"],
)
def test_a_broken_answer_keeps_the_known_keys(
    verifier: JwtVerifier, server: JwksServer, clock: FakeClock, ec_key: SigningKey, status: int, body: bytes
) -> None:
    server.status, server.body = status, body
    refused(verifier, SigningKey("EC").mint(supabase_claims(clock.now)))
    assert server.requests == 2
    assert wait_until(lambda: verifier._fetches_finished >= 2, timeout=5)
    verifier.verify(ec_key.mint(supabase_claims(clock.now)))


def test_an_empty_key_set_is_an_answer(verifier: JwtVerifier, server: JwksServer, clock: FakeClock, ec_key: SigningKey) -> None:
    """Supabase serves `{"keys": []}` for a project on its legacy secret only: every key withdrawn."""
    server.keys = []
    refused(verifier, SigningKey("EC").mint(supabase_claims(clock.now)))
    assert refused(verifier, ec_key.mint(supabase_claims(clock.now))) == "unknown signing key"
    verifier.verify(mint_hs256(supabase_claims(clock.now)))


def test_start_is_idempotent_and_close_stops_the_refresher(server: JwksServer, clock: FakeClock) -> None:
    v = started(server.url, clock)
    thread = v._thread
    v.start()
    v.start()
    assert v._thread is thread and thread is not None and thread.is_alive()
    assert wait_until(lambda: server.requests == 1, timeout=5)
    v.close()
    assert not thread.is_alive()
    v.close()  # twice is fine
