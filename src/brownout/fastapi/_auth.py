"""Who may call: the caller behind `Authorization: Bearer ...`, and the scope a route needs.

One credential per request, told apart by its form: a service key (`bo_...`, checked against the
hashes in BROWNOUT_API_KEYS), the operator's token (BROWNOUT_ADMIN_TOKEN, the `admin` scope), or an
end user's JWT (when BROWNOUT_JWT_SECRET or BROWNOUT_JWT_JWKS_URL is set). No credential: 401 with
`WWW-Authenticate: Bearer`; a credential without the route's scope: 403; both JSON like every other
error. The two bearer schemes are declared to OpenAPI so `/docs` can be used with either.

Each caller's requests are then counted against its rate (BROWNOUT_RATE_LIMIT_WRITES for any method but
GET/HEAD, BROWNOUT_RATE_LIMIT_READS for those), fleet-wide through Redis, and invalid credentials
against their client address (BROWNOUT_RATE_LIMIT_AUTH_FAILURES): over either, 429 with Retry-After,
before the route does any work (a write refused for its rate was not accepted: nothing is queued).
With BROWNOUT_AUTH=disabled callers are not told apart, so nothing is limited here.
"""

from __future__ import annotations

import hmac
import logging
import math
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from brownout._auth.callers import OPERATOR, Caller
from brownout._auth.keys import SCOPES, KeyRing, bearer, parse_keys
from brownout._auth.rate_limit import Rate, RateLimiter
from brownout._cache.redis_link import RedisLink
from brownout._settings import ConfigurationError, Settings

log = logging.getLogger("brownout.auth")

_SERVICE_KEY = HTTPBearer(
    scheme_name="ServiceKey",
    bearerFormat="bo_...",
    description="A service key (`brownout keys new NAME SCOPES`), or the operator's BROWNOUT_ADMIN_TOKEN.",
    auto_error=False,
)
_USER_TOKEN = HTTPBearer(
    scheme_name="UserToken",
    bearerFormat="JWT",
    description="An end user's access token (Supabase Auth, or the issuer BROWNOUT_JWT_* names).",
    auto_error=False,
)
_EVERY_SCOPE = frozenset(SCOPES)


class Unauthenticated(HTTPException):
    def __init__(self, detail: str) -> None:
        super().__init__(401, detail, headers={"WWW-Authenticate": "Bearer"})


class TooManyRequests(HTTPException):
    def __init__(self, detail: str, retry_after: float) -> None:
        super().__init__(429, detail, headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


class Authenticator:
    """The credentials this process accepts, built from the settings once."""

    def __init__(self, settings: Settings) -> None:
        self.disabled = settings.auth == "disabled"
        self._processes = settings.web_replicas * settings.web_processes
        self._rates = {
            kind: Rate.parse(text) if text else None
            for kind, text in (
                ("writes", settings.rate_limit_writes),
                ("reads", settings.rate_limit_reads),
                ("auth-failures", settings.rate_limit_auth_failures),
            )
        }
        self.limiter = RateLimiter(link=None, processes=self._processes)
        self._keys = KeyRing(parse_keys(settings.api_keys))
        self._admin = settings.admin_token.get_secret_value().encode() if settings.admin_token else None
        self._users = None
        if settings.jwt_secret is not None or settings.jwt_jwks_url is not None:
            from brownout._auth.tokens import JwtVerifier

            self._users = JwtVerifier(
                secret=settings.jwt_secret.get_secret_value() if settings.jwt_secret else None,
                jwks_url=settings.jwt_jwks_url,
                audience=settings.jwt_audience,
                issuer=settings.jwt_issuer,
                user_claim=settings.jwt_user_claim,
                allow_anonymous=settings.jwt_allow_anonymous,
            )

    @property
    def configured(self) -> bool:
        return bool(self._keys) or self._admin is not None or self._users is not None

    def check(self) -> None:
        """Refuse to serve with no way for anyone to be answered (unless authentication is off on purpose)."""
        if not self.disabled and not self.configured:
            raise ConfigurationError(
                "no credential is configured: set BROWNOUT_API_KEYS (brownout keys new NAME SCOPES), "
                "BROWNOUT_JWT_SECRET or BROWNOUT_JWT_JWKS_URL, or BROWNOUT_AUTH=disabled behind a gateway that authenticates"
            )
        if self.disabled:
            log.warning("authentication is disabled (BROWNOUT_AUTH=disabled): every caller holds every scope")

    def start(self, link: RedisLink | None = None) -> None:
        """*link*: Redis, where the fleet shares each caller's budget (None: each process keeps its share)."""
        self.limiter = RateLimiter(link=link, processes=self._processes)
        if self._users is not None:
            self._users.start()

    async def count(self, caller: Caller, method: str) -> None:
        """Spend one of *caller*'s requests; TooManyRequests when its rate is spent."""
        limit = self.rate_of(caller, method)
        if limit is None:
            return
        subject, rate = limit
        wait = await self.limiter.ahit(subject, rate)
        if wait is not None:
            raise self.too_many(caller, method, wait)

    def rate_of(self, caller: Caller, method: str) -> tuple[str, Rate] | None:
        """The subject and rate *caller*'s request with *method* counts against (None: not limited)."""
        rate = self._rates[_kind(method)]
        if rate is None or self.disabled:
            return None
        return f"{caller.name}:{_kind(method)}", rate

    def too_many(self, caller: Caller, method: str, wait: float) -> TooManyRequests:
        rate = self._rates[_kind(method)]
        assert rate is not None  # noqa: S101 - only a limited request is refused
        return TooManyRequests(
            f"rate limit of {caller.name}'s {_kind(method)} reached ({rate.count} per {rate.seconds:g} s)", wait
        )

    async def count_failure(self, address: str) -> None:
        rate = self._rates["auth-failures"]
        if rate is None:
            return
        wait = await self.limiter.ahit(f"auth-failures:{address}", rate)
        if wait is not None:
            raise TooManyRequests("too many requests with invalid credentials from this address", wait)

    def close(self) -> None:
        if self._users is not None:
            self._users.close()

    def identify(self, token: str | None) -> Caller:
        """The caller presenting *token*; raise Unauthenticated when there is none or it is not valid."""
        caller = self.identify_now(token)
        if caller is not None:
            return caller
        from brownout._auth.tokens import InvalidToken

        assert self._users is not None and token is not None  # noqa: S101 - identify_now answers every other case
        try:
            claims = self._users.verify(token)
        except InvalidToken as invalid:
            raise Unauthenticated(f"invalid token: {invalid}") from None
        return _user(claims)

    def identify_now(self, token: str | None) -> Caller | None:
        """`identify` where it needs no waiting (a service key, the operator's token, a user token verified
        before): an event loop may call it. None: a user token to verify (a signature, maybe a JWKS fetch)."""
        if self.disabled:
            return Caller("service", "auth-disabled", _EVERY_SCOPE)
        if not token:
            raise Unauthenticated("credentials required: Authorization: Bearer <service key or user token>")
        key = self._keys.find(token)
        if key is not None:
            return Caller("service", key.name, key.scopes)
        if self._admin is not None and hmac.compare_digest(token.encode(), self._admin):
            return Caller("service", OPERATOR, frozenset({"admin"}))
        if self._users is not None and self._users.looks_like_jwt(token):
            claims = self._users.verified_before(token)
            return None if claims is None else _user(claims)
        raise Unauthenticated("invalid credentials")


def _kind(method: str) -> str:
    return "reads" if method in ("GET", "HEAD") else "writes"


def _user(claims: Any) -> Caller:
    return Caller("user", f"user:{claims.user_id}", frozenset(), user_id=claims.user_id)


def _authenticator(request: Request) -> Authenticator:
    brownout = getattr(request.app.state, "brownout", None)
    authenticator = getattr(brownout, "authenticator", None)
    if authenticator is None:  # pragma: no cover - init_app wires it before any request
        raise RuntimeError("Brownout's authenticator is not started")
    return authenticator  # type: ignore[no-any-return]


async def current_caller(
    request: Request,
    key: Annotated[HTTPAuthorizationCredentials | None, Depends(_SERVICE_KEY)],
    token: Annotated[HTTPAuthorizationCredentials | None, Depends(_USER_TOKEN)],
) -> Caller:
    """The request's caller (401 without a valid credential); kept on `request.state.caller` for logs and metrics.

    On the event loop (a plain function would cost every request a thread-pool hop), except a user token
    seen for the first time: its signature check, and a JWKS fetch it may wait for, run in the thread pool."""
    cached = getattr(request.state, "caller", None)
    if isinstance(cached, Caller):
        return cached
    credentials = key or token
    authenticator = _authenticator(request)
    presented = credentials.credentials if credentials else None
    try:
        caller = authenticator.identify_now(presented)
        if caller is None:
            caller = await run_in_threadpool(authenticator.identify, presented)
    except Unauthenticated:
        if credentials is not None:  # a wrong credential, not a missing one: guessing is what this limits
            await authenticator.count_failure(request.client.host if request.client else "unknown")
        raise
    await authenticator.count(caller, request.method)
    request.state.caller = caller
    return caller


CallerDep = Annotated[Caller, Depends(current_caller)]


def require_scope(*scopes: str) -> Any:
    """A dependency: the caller must hold one of *scopes* (403 otherwise); it returns the caller."""
    unknown = set(scopes) - _EVERY_SCOPE
    if unknown:
        raise ValueError(f"unknown scope(s) {sorted(unknown)}: scopes are {', '.join(SCOPES)}")

    async def check(caller: CallerDep) -> Caller:
        if not caller.may(*scopes):
            raise HTTPException(403, f"this credential lacks the {' or '.join(scopes)} scope")
        return caller

    return Depends(check)


def optional_caller(request: Request, authorization: str | None) -> Caller | None:
    """The caller if the request carries a valid credential, else None (for routes open to anyone)."""
    try:
        return _authenticator(request).identify(bearer(authorization))
    except HTTPException:
        return None
