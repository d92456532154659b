"""Verifies end users' JWTs as Supabase Auth issues them (or any issuer doing the same).

Two kinds of signing are valid at once, because a project moving off its legacy secret
has live tokens of both: HS256 with the shared secret, and ES256/RS256 with a key from
the issuer's JWKS. The key is chosen by the token header's `alg` and `kid`, and each
kind only ever meets its own key source (no algorithm confusion).

PyJWT checks signatures, `aud` and `iss`. The rest is ours, each for a reason:
- `exp`/`nbf` are checked against an injectable clock (PyJWT reads its own), so tests
  move time instead of sleeping and the verified-token cache shares the same rule;
- the JWKS is fetched and refreshed on a background thread: PyJWKClient fetches on the
  request path when its cache lapses (a slow or unreachable endpoint would stall requests
  for keys already known), and its fetch has no size cap. PyJWK still parses every key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import jwt
from jwt import PyJWK
from jwt.types import Options

__all__ = ["InvalidToken", "JwtVerifier", "UserClaims"]

log = logging.getLogger("brownout.auth")

# Only these: HS256 with the configured secret, the asymmetric ones with a JWKS key of this type.
_ASYMMETRIC_KEY_TYPES = {"ES256": "EC", "RS256": "RSA"}
_MAX_TOKEN_CHARS = 8192  # a Supabase access token is ~1 KB; anything far larger is refused unparsed
_MAX_JWKS_BYTES = 64 * 1024
_MAX_USER_ID_CHARS = 128
_MIN_SECRET_BYTES = 32  # RFC 7518 3.2 for HS256; Supabase requires at least 32 characters too
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


class InvalidToken(Exception):
    """A refused token. `reason` is a short text safe to log and to return in a 401 body
    (never the token, never a key)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class UserClaims:
    user_id: str  # the configured user claim (default "sub"), 1..128 characters
    is_anonymous: bool  # Supabase's `is_anonymous` claim (False when absent)
    expires_at: float  # the token's exp (epoch seconds)


@dataclass(frozen=True)
class _Verified:
    claims: UserClaims
    not_before: float  # nbf - leeway (or -inf): the cache answers by the same rule as a verification
    not_after: float  # exp + leeway


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A JWKS that moved is a configuration error to see, not a hop to follow."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class JwtVerifier:
    """Verifies tokens from the caches in memory; the network is only ever awaited, briefly,
    for a `kid` it has not seen."""

    def __init__(
        self,
        *,
        secret: str | None,
        jwks_url: str | None,
        audience: str = "authenticated",
        issuer: str | None = None,
        user_claim: str = "sub",
        allow_anonymous: bool = False,
        leeway_seconds: float = 30.0,
        clock: Callable[[], float] = time.time,
        jwks_refresh_seconds: float = 300.0,
        fetch_timeout_seconds: float = 2.0,
        cache_size: int = 10_000,
        unknown_kid_refetch_seconds: float = 30.0,
        unknown_kid_wait_seconds: float | None = None,
    ) -> None:
        if not secret and not jwks_url:
            raise ValueError("a JWT verifier needs a secret, a JWKS URL, or both")
        if secret is not None and len(secret.encode()) < _MIN_SECRET_BYTES:
            raise ValueError(f"the JWT secret must be at least {_MIN_SECRET_BYTES} bytes")
        if jwks_url is not None:
            if urlparse(jwks_url).scheme not in ("http", "https"):
                raise ValueError("the JWKS URL must be http or https")
            if not issuer:
                # A JWKS key may be shared by several issuers' tokens (or be a public one):
                # without an issuer to compare, any token it signed would be a user of ours.
                raise ValueError("an issuer is required with a JWKS URL")
        if not user_claim:
            raise ValueError("user_claim must name a claim")
        for name, value in (
            ("leeway_seconds", leeway_seconds),
            ("unknown_kid_refetch_seconds", unknown_kid_refetch_seconds),
        ):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0")
        for name, value in (("jwks_refresh_seconds", jwks_refresh_seconds), ("fetch_timeout_seconds", fetch_timeout_seconds)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0")
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")

        self._secret = secret
        self._jwks_url = jwks_url
        # What the logs name: the endpoint without any userinfo or query string it may carry.
        parts = urlparse(jwks_url or "")
        self._jwks_label = f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"
        self._audience = audience
        self._issuer = issuer
        self._user_claim = user_claim
        self._allow_anonymous = allow_anonymous
        self._leeway = float(leeway_seconds)
        self._clock = clock
        self._refresh_seconds = float(jwks_refresh_seconds)
        self._fetch_timeout = float(fetch_timeout_seconds)
        self._refetch_seconds = float(unknown_kid_refetch_seconds)
        self._unknown_kid_wait = (
            min(self._fetch_timeout, 1.0) if unknown_kid_wait_seconds is None else float(unknown_kid_wait_seconds)
        )
        self._decode_options: Options = {
            "verify_exp": False,  # ours, with self._clock
            "verify_nbf": False,  # ours, with self._clock
            "verify_iat": False,  # PyJWT would compare iat with its own clock; a future iat proves nothing exp does not
            "require": ["exp", "aud", user_claim] + (["iss"] if issuer else []),
            "enforce_minimum_key_length": True,  # an RSA key under 2048 bits is refused, not warned about
        }

        # The JWKS keys: replaced whole (never mutated), so `verify` reads them without a lock.
        self._keys: dict[str, PyJWK] = {}
        self._key_fingerprints: dict[str, str] = {}
        self._lock = threading.Lock()
        self._fetched = threading.Condition(self._lock)
        self._fetches_started = 0
        self._fetches_finished = 0  # attempts, failed or not: a waiting `verify` stops at either
        self._last_forced = -math.inf
        self._failing = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()

        # Verified tokens by SHA-256 of the token: memory holds no bearer token, only its digest.
        self._cache_size = cache_size
        self._cache: OrderedDict[bytes, _Verified] = OrderedDict()
        self._cache_lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the JWKS refresher (its first fetch included) in the background. Idempotent."""
        if self._jwks_url is None:
            return
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop = threading.Event()
            self._wake = threading.Event()
            self._thread = threading.Thread(
                target=self._refresh_loop, args=(self._stop, self._wake), name="brownout-jwks", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        """Stop the refresher; waits at most about one fetch's timeout (the thread is a daemon)."""
        with self._lock:
            thread, self._thread = self._thread, None
            self._stop.set()
            self._wake.set()
            self._fetched.notify_all()
        if thread is not None:
            thread.join(timeout=self._fetch_timeout + 0.5)

    # -- verification --------------------------------------------------------------------------

    @staticmethod
    def looks_like_jwt(token: str) -> bool:
        """Three base64url segments (the third may be empty: an unsigned token is still a JWT, to refuse)."""
        return len(token) <= _MAX_TOKEN_CHARS and _JWT_SHAPE.fullmatch(token) is not None

    def verify(self, token: str) -> UserClaims:
        """The token's user, or InvalidToken with a reason safe to show."""
        if not isinstance(token, str) or not token or len(token) > _MAX_TOKEN_CHARS:
            raise InvalidToken("malformed token")
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        now = self._clock()
        claims = self._cached(digest, now)
        if claims is not None:
            return claims
        verified = self._verify_uncached(token, now)
        if self._cache_size:
            with self._cache_lock:
                self._cache[digest] = verified
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return verified.claims

    def verified_before(self, token: str) -> UserClaims | None:
        """The token's user when it was verified before and still holds, else None: never waits (no signature
        check, no JWKS fetch), so an event loop may ask; None sends the caller to `verify`."""
        if not isinstance(token, str) or not token or len(token) > _MAX_TOKEN_CHARS:
            return None
        return self._cached(hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest(), self._clock())

    def _cached(self, digest: bytes, now: float) -> UserClaims | None:
        if not self._cache_size:
            return None
        with self._cache_lock:
            hit = self._cache.get(digest)
        if hit is None:
            return None
        if hit.not_before <= now < hit.not_after:
            return hit.claims
        with self._cache_lock:
            self._cache.pop(digest, None)
        return None

    def _verify_uncached(self, token: str, now: float) -> _Verified:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("malformed token") from None
        alg = header.get("alg")
        key: str | PyJWK
        if alg == "HS256":
            if self._secret is None:
                raise InvalidToken("unsupported algorithm")
            key = self._secret  # never a JWKS key, whatever the header's kid says
        elif isinstance(alg, str) and alg in _ASYMMETRIC_KEY_TYPES:
            if self._jwks_url is None:
                raise InvalidToken("unsupported algorithm")
            kid = header.get("kid")
            if not isinstance(kid, str) or not kid:
                raise InvalidToken("missing key id")
            found = self._keys.get(kid) or self._await_unknown_kid(kid)
            if found is None:
                raise InvalidToken("unknown signing key")
            if found.key_type != _ASYMMETRIC_KEY_TYPES[alg] or found.algorithm_name != alg:
                raise InvalidToken("signing key does not match the algorithm")
            key = found
        else:
            raise InvalidToken("unsupported algorithm")  # none, HS384, PS256, EdDSA, ...

        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                options=self._decode_options,
            )
        except jwt.InvalidSignatureError:
            raise InvalidToken("bad signature") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("wrong issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            claim = exc.claim if exc.claim in ("exp", "aud", "iss", self._user_claim) else "required"
            raise InvalidToken(f"missing {claim} claim") from None
        except jwt.exceptions.InvalidSubjectError:
            raise InvalidToken("malformed user id") from None
        except jwt.InvalidAlgorithmError:
            raise InvalidToken("unsupported algorithm") from None
        except jwt.InvalidKeyError:
            raise InvalidToken("unusable signing key") from None
        except jwt.DecodeError:
            raise InvalidToken("malformed token") from None
        except jwt.PyJWTError:
            raise InvalidToken("invalid token") from None
        return self._check_claims(payload, now)

    def _check_claims(self, payload: dict[str, Any], now: float) -> _Verified:
        exp = _number(payload.get("exp"))
        if exp is None:
            raise InvalidToken("malformed exp claim")
        if exp <= now - self._leeway:
            raise InvalidToken("token expired")
        not_before = -math.inf
        if "nbf" in payload:
            nbf = _number(payload["nbf"])
            if nbf is None:
                raise InvalidToken("malformed nbf claim")
            if nbf > now + self._leeway:
                raise InvalidToken("token not yet valid")
            not_before = nbf - self._leeway
        user_id = payload.get(self._user_claim)
        if not isinstance(user_id, str) or not user_id:
            raise InvalidToken("missing user id")
        if len(user_id) > _MAX_USER_ID_CHARS:
            raise InvalidToken("user id too long")
        if payload.get("role") != "authenticated":
            raise InvalidToken("role not authenticated")
        anonymous = payload.get("is_anonymous", False)
        if not isinstance(anonymous, bool):
            raise InvalidToken("malformed is_anonymous claim")
        if anonymous and not self._allow_anonymous:
            raise InvalidToken("anonymous users not allowed")
        claims = UserClaims(user_id=user_id, is_anonymous=anonymous, expires_at=exp)
        return _Verified(claims=claims, not_before=not_before, not_after=exp + self._leeway)

    # -- JWKS ----------------------------------------------------------------------------------

    def _await_unknown_kid(self, kid: str) -> PyJWK | None:
        """Wait briefly for a fetch that may bring `kid`: the first one at start-up, otherwise one
        forced refetch, at most one per `unknown_kid_refetch_seconds` (a stream of made-up kids
        must not turn into a stream of requests to the issuer)."""
        with self._lock:
            if kid in self._keys:
                return self._keys[kid]
            if self._thread is None or not self._thread.is_alive():
                return None
            if self._fetches_finished == 0:
                target = max(self._fetches_started, 1)
            else:
                now = self._clock()
                if self._last_forced <= now < self._last_forced + self._refetch_seconds:
                    return None
                self._last_forced = now
                target = self._fetches_started + 1
                self._wake.set()
            self._fetched.wait_for(
                lambda: kid in self._keys or self._fetches_finished >= target or self._stop.is_set(),
                timeout=self._unknown_kid_wait,
            )
            return self._keys.get(kid)

    def _refresh_loop(self, stop: threading.Event, wake: threading.Event) -> None:
        failures = 0
        while not stop.is_set():
            failures = 0 if self._fetch_once() else failures + 1
            # After a failure, retry sooner than the refresh period (2 s, 4 s, ...): a JWKS
            # unreachable at start-up would otherwise leave no key for a whole period.
            wake.wait(self._refresh_seconds if failures == 0 else min(self._refresh_seconds, 2.0 ** min(failures, 8)))
            wake.clear()

    def _fetch_once(self) -> bool:
        with self._lock:
            self._fetches_started += 1
            number = self._fetches_started
        ok = False
        try:
            keys, fingerprints = _parse_jwks(self._download())
            ok = True
        except Exception as exc:  # any failure keeps the previous keys
            if not self._failing:
                log.warning(
                    "JWKS fetch from %s failed, keeping the %d keys known: %s", self._jwks_label, len(self._keys), _describe(exc)
                )
            else:
                log.debug("JWKS fetch from %s failed again: %s", self._jwks_label, _describe(exc))
        with self._lock:
            if ok:
                if self._failing:
                    log.info("JWKS fetch from %s succeeded again", self._jwks_label)
                changed = any(fingerprints.get(kid) != fp for kid, fp in self._key_fingerprints.items())
                self._keys, self._key_fingerprints = keys, fingerprints
                if changed:
                    # A key withdrawn (revoked) or replaced: tokens it verified are not trusted from memory.
                    with self._cache_lock:
                        self._cache.clear()
            self._failing = not ok
            self._fetches_finished = number
            self._fetched.notify_all()
        return ok

    def _download(self) -> bytes:
        """The JWKS body, at most 64 KB, within about two fetch timeouts in all (urllib's timeout
        bounds each socket operation; the deadline bounds a server dribbling bytes)."""
        if self._jwks_url is None:
            raise RuntimeError("no JWKS URL")
        deadline = time.monotonic() + self._fetch_timeout
        request = urllib.request.Request(self._jwks_url, headers={"Accept": "application/json"})  # noqa: S310 - http(s) checked in __init__
        opener = urllib.request.build_opener(_NoRedirect())
        with opener.open(request, timeout=self._fetch_timeout) as response:
            body = bytearray()
            while chunk := response.read1(16384):
                body += chunk
                if len(body) > _MAX_JWKS_BYTES:
                    raise ValueError(f"JWKS response larger than {_MAX_JWKS_BYTES} bytes")
                if time.monotonic() > deadline:
                    raise TimeoutError("JWKS response too slow")
        return bytes(body)


def _parse_jwks(body: bytes) -> tuple[dict[str, PyJWK], dict[str, str]]:
    """The usable signing keys by kid. A well-formed answer is authoritative, even empty
    (a project on its legacy secret only serves no keys); anything else raises, and the
    previous keys stay."""
    document = json.loads(body)
    raw_keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(raw_keys, list):
        raise ValueError("JWKS response has no keys list")
    keys: dict[str, PyJWK] = {}
    fingerprints: dict[str, str] = {}
    # PyJWK per key rather than PyJWKSet: PyJWKSet refuses an empty set, and we keep each key's
    # JSON to notice a kid whose key material changed.
    for raw in raw_keys:
        if not isinstance(raw, dict) or raw.get("use", "sig") != "sig":
            continue
        kid = raw.get("kid")
        if not isinstance(kid, str) or not kid or kid in keys:
            continue
        try:
            key = PyJWK(raw)
        except jwt.PyJWTError:
            continue  # an unsupported or malformed key; the others still count
        if _ASYMMETRIC_KEY_TYPES.get(key.algorithm_name) != key.key_type:
            continue  # `oct` keys above all: a JWKS never supplies an HMAC key
        keys[kid] = key
        fingerprints[kid] = json.dumps(raw, sort_keys=True)
    return keys, fingerprints


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond a float's range
        return None
    return number if math.isfinite(number) else None


def _describe(exc: Exception) -> str:
    """The failure in a few words: its type and message, cut short (never a response body)."""
    return f"{type(exc).__name__}: {str(exc)[:200]}"
