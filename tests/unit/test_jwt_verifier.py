"""JwtVerifier without a JWKS: HS256 with the legacy secret, every claim rule, the verified-token
cache against an injected clock (never a sleep)."""

from __future__ import annotations

import jwt
import pytest

from brownout._auth.tokens import InvalidToken, JwtVerifier, UserClaims
from tests.support.jwt_issuer import ISSUER, SECRET, FakeClock, hand_signed, mint_hs256, supabase_claims


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def verifier(clock: FakeClock, **options: object) -> JwtVerifier:
    return JwtVerifier(secret=SECRET, jwks_url=None, clock=clock, **options)  # type: ignore[arg-type]


def refused(v: JwtVerifier, token: str) -> str:
    with pytest.raises(InvalidToken) as raised:
        v.verify(token)
    assert not token or token not in str(raised.value)
    return raised.value.reason


def test_valid_hs256_token_gives_its_user(clock: FakeClock) -> None:
    payload = supabase_claims(clock.now)
    claims = verifier(clock).verify(mint_hs256(payload))
    assert claims == UserClaims(user_id=payload["sub"], is_anonymous=False, expires_at=float(payload["exp"]))


def test_hs256_kid_is_ignored_the_secret_is_the_only_key(clock: FakeClock) -> None:
    payload = supabase_claims(clock.now)
    assert verifier(clock).verify(mint_hs256(payload, kid="whatever")).user_id == payload["sub"]


def test_expired_token_is_refused_past_the_leeway(clock: FakeClock) -> None:
    v = verifier(clock, leeway_seconds=30, cache_size=0)
    token = mint_hs256(supabase_claims(clock.now, exp=int(clock.now) + 60))
    clock.advance(60 + 29)
    v.verify(token)  # inside the leeway
    clock.advance(1)
    assert refused(v, token) == "token expired"


def test_missing_or_malformed_exp_is_refused(clock: FakeClock) -> None:
    v = verifier(clock)
    assert refused(v, mint_hs256(supabase_claims(clock.now, exp=None))) == "missing exp claim"
    assert refused(v, mint_hs256(supabase_claims(clock.now, exp="tomorrow"))) == "malformed exp claim"
    assert refused(v, mint_hs256(supabase_claims(clock.now, exp=10**400))) == "malformed exp claim"


def test_nbf_in_the_future_is_refused_until_it_comes(clock: FakeClock) -> None:
    v = verifier(clock, leeway_seconds=30)
    token = mint_hs256(supabase_claims(clock.now, nbf=int(clock.now) + 120))
    assert refused(v, token) == "token not yet valid"
    clock.advance(91)
    v.verify(token)


def test_wrong_or_missing_audience_is_refused(clock: FakeClock) -> None:
    v = verifier(clock)
    assert refused(v, mint_hs256(supabase_claims(clock.now, aud="service"))) == "wrong audience"
    assert refused(v, mint_hs256(supabase_claims(clock.now, aud=None))) == "missing aud claim"
    v.verify(mint_hs256(supabase_claims(clock.now, aud=["other", "authenticated"])))


def test_issuer_is_checked_for_hs256_too_when_configured(clock: FakeClock) -> None:
    v = verifier(clock, issuer=ISSUER)
    v.verify(mint_hs256(supabase_claims(clock.now)))
    assert refused(v, mint_hs256(supabase_claims(clock.now, iss="https://evil.supabase.co/auth/v1"))) == "wrong issuer"
    assert refused(v, mint_hs256(supabase_claims(clock.now, iss=None))) == "missing iss claim"


def test_bad_signature_is_refused(clock: FakeClock) -> None:
    v = verifier(clock)
    other = mint_hs256(supabase_claims(clock.now), secret="another-secret-of-at-least-32-bytes!!")
    assert refused(v, other) == "bad signature"
    header, _, signature = mint_hs256(supabase_claims(clock.now)).split(".")
    forged_body = mint_hs256(supabase_claims(clock.now, sub="someone-else")).split(".")[1]
    assert refused(v, f"{header}.{forged_body}.{signature}") == "bad signature"


def test_alg_none_is_refused(clock: FakeClock) -> None:
    v = verifier(clock)
    payload = supabase_claims(clock.now)
    for alg in ("none", "None", "NONE"):
        assert refused(v, hand_signed(payload, {"alg": alg, "typ": "JWT"}, None)) == "unsupported algorithm"
    # The control: the helper's HS256 with the secret is a valid token.
    assert v.verify(hand_signed(payload, {"alg": "HS256", "typ": "JWT"}, SECRET.encode())).user_id == payload["sub"]
    # The right HMAC, but the header says none: still refused.
    header_none = hand_signed(payload, {"alg": "none", "typ": "JWT"}, SECRET.encode())
    assert refused(v, header_none) == "unsupported algorithm"


def test_other_algorithms_are_refused(clock: FakeClock) -> None:
    v = verifier(clock)
    payload = supabase_claims(clock.now)
    assert refused(v, jwt.encode(payload, SECRET * 2, algorithm="HS512")) == "unsupported algorithm"
    assert refused(v, hand_signed(payload, {"typ": "JWT"}, SECRET.encode())) == "unsupported algorithm"


def test_asymmetric_tokens_are_refused_without_a_jwks(clock: FakeClock) -> None:
    from tests.support.jwt_issuer import SigningKey

    key = SigningKey("EC")
    assert refused(verifier(clock), key.mint(supabase_claims(clock.now))) == "unsupported algorithm"


def test_hs256_is_refused_without_a_secret(clock: FakeClock) -> None:
    v = JwtVerifier(secret=None, jwks_url="http://127.0.0.1:9/jwks.json", issuer=ISSUER, clock=clock)
    assert refused(v, mint_hs256(supabase_claims(clock.now))) == "unsupported algorithm"


def test_user_id_is_required_and_bounded(clock: FakeClock) -> None:
    v = verifier(clock)
    assert refused(v, mint_hs256(supabase_claims(clock.now, sub=None))) == "missing sub claim"
    assert refused(v, mint_hs256(supabase_claims(clock.now, sub=""))) == "missing user id"
    assert refused(v, mint_hs256(supabase_claims(clock.now, sub="x" * 129))) == "user id too long"
    assert refused(v, mint_hs256(supabase_claims(clock.now, sub=42))) == "malformed user id"
    assert v.verify(mint_hs256(supabase_claims(clock.now, sub="x" * 128))).user_id == "x" * 128


def test_user_claim_is_configurable(clock: FakeClock) -> None:
    v = verifier(clock, user_claim="user_id")
    assert v.verify(mint_hs256(supabase_claims(clock.now, user_id="u-1"))).user_id == "u-1"
    assert refused(v, mint_hs256(supabase_claims(clock.now))) == "missing user_id claim"
    assert refused(v, mint_hs256(supabase_claims(clock.now, user_id=["u-1"]))) == "missing user id"


def test_role_must_be_authenticated(clock: FakeClock) -> None:
    v = verifier(clock)
    for role in ("anon", "service_role", "supabase_admin", None):
        assert refused(v, mint_hs256(supabase_claims(clock.now, role=role))) == "role not authenticated"


def test_anonymous_users_are_refused_unless_allowed(clock: FakeClock) -> None:
    token = mint_hs256(supabase_claims(clock.now, is_anonymous=True))
    assert refused(verifier(clock), token) == "anonymous users not allowed"
    assert verifier(clock, allow_anonymous=True).verify(token).is_anonymous is True
    assert verifier(clock).verify(mint_hs256(supabase_claims(clock.now, is_anonymous=None))).is_anonymous is False
    assert refused(verifier(clock), mint_hs256(supabase_claims(clock.now, is_anonymous="true"))) == (
        "malformed is_anonymous claim"
    )


def test_cached_token_stops_being_accepted_past_its_exp(clock: FakeClock) -> None:
    v = verifier(clock, leeway_seconds=5)
    payload = supabase_claims(clock.now, exp=int(clock.now) + 100)
    token = mint_hs256(payload)
    first = v.verify(token)
    clock.advance(104)
    assert v.verify(token) is first  # a cache hit: the same claims, no new verification
    clock.advance(1)
    assert refused(v, token) == "token expired"
    assert refused(v, token) == "token expired"


def test_cache_keeps_at_most_its_size(clock: FakeClock) -> None:
    v = verifier(clock, cache_size=3)
    tokens = [mint_hs256(supabase_claims(clock.now, sub=f"user-{n}")) for n in range(10)]
    for token in tokens + tokens:
        v.verify(token)
    assert len(v._cache) == 3  # the cache's bound, seen from inside: no answer depends on it
    assert [v.verify(t).user_id for t in tokens] == [f"user-{n}" for n in range(10)]


def test_malformed_tokens_are_refused(clock: FakeClock) -> None:
    v = verifier(clock)
    for token in ("", "abc", "a.b.c", "bo_live_1234", "x" * 10_000, mint_hs256(supabase_claims(clock.now)) + "\n"):
        assert refused(v, token) in ("malformed token", "bad signature")


def test_an_hmac_forged_with_the_secret_but_the_wrong_header_is_refused(clock: FakeClock) -> None:
    # The correct HMAC-SHA256 over the input, but the header claims another algorithm.
    payload = supabase_claims(clock.now)
    token = hand_signed(payload, {"alg": "HS384", "typ": "JWT"}, SECRET.encode())
    assert refused(verifier(clock), token) == "unsupported algorithm"


def test_looks_like_jwt() -> None:
    assert JwtVerifier.looks_like_jwt(mint_hs256({"sub": "a"}))
    assert JwtVerifier.looks_like_jwt("eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIn0.")  # unsigned, to be refused as a JWT
    for not_jwt in ("bo_live_abc123", "", "a.b", "a.b.c.d", "a b.c.d", "a+b.c.d", "..", "x" * 9000 + ".a.b"):
        assert not JwtVerifier.looks_like_jwt(not_jwt)


def test_constructor_refuses_unsafe_configurations(clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="issuer"):
        JwtVerifier(secret=None, jwks_url="https://x.supabase.co/auth/v1/.well-known/jwks.json")
    with pytest.raises(ValueError, match="secret, a JWKS URL"):
        JwtVerifier(secret=None, jwks_url=None)
    with pytest.raises(ValueError, match="32 bytes"):
        JwtVerifier(secret="short", jwks_url=None)
    with pytest.raises(ValueError, match="http or https"):
        JwtVerifier(secret=None, jwks_url="file:///etc/passwd", issuer=ISSUER)


def test_start_and_close_without_a_jwks_do_nothing(clock: FakeClock) -> None:
    v = verifier(clock)
    v.start()
    v.start()
    v.close()
    v.verify(mint_hs256(supabase_claims(clock.now)))


def test_verified_before_answers_only_from_the_cache(clock: FakeClock) -> None:
    """What an event loop may ask: never a signature check, never a wait for a JWKS."""
    v = verifier(clock, leeway_seconds=5)
    payload = supabase_claims(clock.now, exp=int(clock.now) + 60)
    token = mint_hs256(payload)
    assert v.verified_before(token) is None  # never verified: the caller verifies it in the thread pool
    assert v.verify(token).user_id == payload["sub"]
    claims = v.verified_before(token)
    assert claims is not None and claims.user_id == payload["sub"]
    clock.advance(65)
    assert v.verified_before(token) is None  # expired: verify again (and be refused)
    assert verifier(clock, cache_size=0).verified_before(token) is None
    assert v.verified_before("x" * 100_000) is None
