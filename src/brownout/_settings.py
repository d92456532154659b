"""One validated configuration object, built at the entry point and passed down.

Nothing here runs at import time: `load_settings()` reads the environment when an
entry point (CLI, web, worker, test) asks for it. Every tunable is a
`BROWNOUT_*` variable with its default; connection URLs
keep their conventional names (`DATABASE_URL`).
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import os
from collections.abc import Mapping
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, unquote

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from brownout._auth.keys import MIN_KEY_LENGTH as MIN_TOKEN_LENGTH
from brownout._auth.keys import parse_keys
from brownout._dispatch.rabbitmq_nodes import NODE_SEPARATOR, split_node_urls
from brownout._redaction import mask_secrets

log = logging.getLogger(__name__)

PositiveSeconds = Annotated[float, Field(gt=0)]
Pooler = Literal["none", "transaction"]


class ConfigurationError(Exception):
    """Raised when the environment does not describe a usable configuration."""


class Settings(BaseSettings):
    """Brownout's settings; field docs are the README's configuration table."""

    model_config = SettingsConfigDict(
        env_prefix="BROWNOUT_",
        case_sensitive=False,
        extra="ignore",
        frozen=True,
    )

    database_url: str = Field(
        validation_alias=AliasChoices("DATABASE_URL", "BROWNOUT_DATABASE_URL"),
        description="PostgreSQL URL (postgresql://user:pass@host:port/db?sslmode=require).",
    )
    commands: str | None = Field(
        default=None,
        description="`module:attribute` of the service's command registry (a Registry, or a function returning one), "
        "which the worker applies; `brownout worker COMMANDS` sets it.",
    )
    migration_database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MIGRATION_DATABASE_URL", "BROWNOUT_MIGRATION_DATABASE_URL"),
        description="URL for `brownout migrate` when DATABASE_URL is a transaction-mode pooler "
        "(migrations need a session: Supabase's session pooler on :5432 or a direct connection).",
    )
    database_pooler: Pooler = Field(
        default="none",
        description="'transaction' when DATABASE_URL points at a transaction-mode pooler "
        "(Supabase :6543, PgBouncer): no start-up options, per-transaction timeouts. Default: 'transaction' for "
        "Supabase's pooler on port 6543 (a host under pooler.supabase.com), else 'none'.",
    )

    rabbitmq_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("RABBITMQ_URL", "BROWNOUT_RABBITMQ_URL"),
        description="AMQP URL of RabbitMQ (amqp://user:pass@host:5672/vhost); required by the write path. "
        "A cluster: one URL per node separated by `;`, each with its own credentials, the same vhost and scheme; "
        "every client tries them in its own shuffled order.",
    )
    queue_name: str = Field(
        default="brownout-commands",
        pattern=r"^[a-zA-Z_][a-zA-Z0-9._-]*$",
        description="Dramatiq queue that carries queued writes.",
    )
    queue_max_length: int = Field(
        default=100_000,
        ge=1,
        description="Messages the queue holds before publishes are rejected (then 503, never a blocked publisher).",
    )
    publish_timeout_seconds: PositiveSeconds = Field(
        default=2.0, description="Longest a publish may wait for RabbitMQ's confirm before the write is rejected (503)."
    )
    rabbitmq_heartbeat_seconds: int = Field(
        default=30, ge=1, description="AMQP heartbeat; a dead RabbitMQ link is noticed within about twice this."
    )

    applied_retention_days: float = Field(
        default=30,
        gt=0,
        description="Applied idempotency keys older than this are purged (brownout purge-applied).",
    )

    dead_letter_retention_days: float = Field(default=90, gt=0, description="Dead letters older than this are purged.")

    breaker_failure_threshold: int = Field(default=5, ge=1, description="Consecutive transient failures that open the breaker.")
    breaker_open_seconds: PositiveSeconds = Field(default=60.0, description="Time the breaker stays OPEN before one trial call.")
    breaker_open_jitter: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="Open time is stretched by up to this fraction, at random, so a fleet does not probe in lockstep.",
    )
    breaker_success_threshold: int = Field(
        default=2, ge=1, description="Successful trial calls in HALF_OPEN that close the breaker."
    )

    retry_max_retries: int = Field(default=4, ge=0, le=20, description="Retries after the first try (so up to N+1 calls).")
    retry_base_seconds: PositiveSeconds = Field(
        default=0.5, description="Nominal delay before the first retry; doubles each retry."
    )
    retry_cap_seconds: PositiveSeconds = Field(default=3.0, description="Largest nominal delay between retries.")
    retry_budget_ratio: float = Field(
        default=0.1, ge=0, le=1, description="Retry budget: retries allowed per call over the window (SRE book)."
    )
    retry_budget_window_seconds: float = Field(default=10.0, ge=1, description="Retry budget: the sliding window.")
    retry_budget_min_retries: int = Field(
        default=10,
        ge=0,
        description="Retry budget: retries always allowed per window (a quiet process keeps the default schedule).",
    )
    breaker_backend: Literal["local", "redis"] = Field(
        default="local",
        description="'redis': one breaker for the fleet, its state shared through Redis (REDIS_URL); "
        "'local': each process has its own.",
    )
    breaker_window_seconds: PositiveSeconds = Field(
        default=10.0, description="Shared breaker: failures counted fleet-wide over this window open it."
    )
    breaker_probe_gated: bool = Field(
        default=True,
        description="Shared breaker: while OPEN, a passing health check (not a timer) moves it to HALF_OPEN.",
    )
    breaker_probe_interval_seconds: PositiveSeconds = Field(
        default=1.0, description="Health check interval while the breaker is not CLOSED (probe-gated recovery)."
    )

    pool_size: int = Field(default=10, ge=1, description="Connections kept open in each process's pool.")
    pool_max_overflow: int = Field(default=20, ge=0, description="Extra connections allowed above pool_size under load.")
    pool_recycle_seconds: PositiveSeconds = Field(
        default=90.0, description="Connections older than this are replaced at checkout."
    )
    pool_pre_ping: bool = Field(
        default=True, description="Test each connection at checkout (a round trip) and replace dead ones."
    )
    pool_pre_ping_idle_seconds: float = Field(
        default=1.0, ge=0, description="Pre-ping only connections idle at least this long (0: ping at every checkout)."
    )
    pool_timeout_seconds: PositiveSeconds = Field(
        default=5.0, description="Longest wait for a free pooled connection (never longer than the call's deadline)."
    )

    db_connect_timeout_seconds: PositiveSeconds = Field(
        default=5.0, description="Longest a new connection may take when the call has no shorter deadline."
    )
    db_io_timeout_seconds: PositiveSeconds = Field(
        default=30.0,
        description="Longest any single wait on the database may take without a shorter deadline (cuts a silent peer).",
    )
    db_min_wait_seconds: PositiveSeconds = Field(
        default=0.1,
        description="The least a query or connect is given from when the database is asked, even past the call's "
        "deadline: a process that spent its deadline before asking (CPU overload) does not blame the database.",
    )
    db_statement_timeout_seconds: float | None = Field(
        default=None,
        gt=0,
        description="Server-side statement_timeout (unset: the server's own). Set per transaction behind a pooler.",
    )
    db_application_name: str = Field(
        default="brownout", min_length=1, max_length=63, description="application_name reported to PostgreSQL."
    )

    health_interval_seconds: PositiveSeconds = Field(
        default=30.0, description="Interval of the background SELECT 1 health check."
    )
    health_timeout_seconds: PositiveSeconds = Field(default=2.0, description="Deadline of one health check (connect included).")
    request_db_deadline_seconds: PositiveSeconds = Field(
        default=0.3, description="Total time a call on the HTTP request path may spend on the database, retries included."
    )
    admission: bool = Field(
        default=True,
        description="Admission control: each web process bounds its requests in flight and answers the rest 503 "
        "(Retry-After: 1) at once, optional routes first, critical ones last.",
    )
    admission_min_in_flight: int = Field(
        default=4, ge=1, description="Admission control: the limit never falls below this many requests in flight."
    )
    admission_max_in_flight: int = Field(
        default=32,
        ge=1,
        description="Admission control: the most requests in flight per process (the limit starts here, and "
        "falls while the event loop lags). Keep it below the thread pool's 40 threads.",
    )
    admission_target_seconds: PositiveSeconds = Field(
        default=0.002,
        description="Admission control: while the process is busy (half a core or more), requests' time in it "
        "(the median over 100 ms) is queueing above twice its lowest value of the last 10 s and above this; the "
        "limit then halves.",
    )
    admission_lag_target_seconds: PositiveSeconds = Field(
        default=0.005,
        description="Admission control: standing event-loop delay above which the limit is halved (the process's "
        "own queueing: CPU, the GIL; a slow database does not count).",
    )
    worker_gate_base_seconds: PositiveSeconds = Field(
        default=1.0,
        description="Worker health gate: check interval while healthy, and the first (pre-jitter) wait while paused.",
    )
    worker_gate_cap_seconds: PositiveSeconds = Field(
        default=60.0, description="Worker health gate: longest (pre-jitter) wait between checks while the database is down."
    )
    worker_wait_unknown_version_hours: float = Field(
        default=24.0,
        gt=0,
        le=24 * 30,
        description="How long a queued write of a version this release does not know waits for a release that "
        "does (a rolling deploy) before it is kept as a dead letter.",
    )
    worker_wait_dependency_minutes: float = Field(
        default=60.0,
        gt=0,
        le=24 * 60 * 7,
        description="How long a queued write that needs an earlier one (an update of an entity not created yet) "
        "waits before it is recorded as dropped.",
    )
    worker_batch_max: int = Field(
        default=64,
        ge=1,
        le=1000,
        description="Most queued writes the worker applies in one transaction (one batch of deliveries); "
        "RabbitMQ's prefetch is twice this.",
    )
    worker_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="CPU priority (Unix nice) of `brownout worker`'s processes: where web and worker share a machine, "
        "the web's requests get the CPU first and a backlog drains with what is left; 0: the web's priority.",
    )
    worker_min_concurrency: int = Field(
        default=1, ge=1, description="Adaptive drain: batches applied at once after boot or a pause (slow start)."
    )
    worker_max_concurrency: int = Field(
        default=8, ge=1, description="Adaptive drain: most batches applied at once (above --threads it has no effect)."
    )
    worker_latency_target_seconds: PositiveSeconds = Field(
        default=0.1, description="Adaptive drain: p90 time of a batch above which the worker halves its concurrency."
    )

    smtp_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("SMTP_URL", "BROWNOUT_SMTP_URL"),
        description="SMTP server for the outbox's emails: smtp://[user:pass@]host:25, smtp+starttls://...:587 "
        "or smtps://...:465; unset: emails wait in the outbox.",
    )
    smtp_timeout_seconds: PositiveSeconds = Field(
        default=10.0, description="Deadline of each SMTP step (connect, TLS, login, each command)."
    )
    email_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("EMAIL_URL", "BROWNOUT_EMAIL_URL"),
        description="Where the outbox's emails go: resend://API_KEY, postmark://SERVER_TOKEN (HTTPS), or an SMTP URL "
        "as SMTP_URL takes; unset: SMTP_URL, and without it emails wait in the outbox. Not both.",
    )
    email_timeout_seconds: PositiveSeconds = Field(
        default=10.0,
        description="Deadline of a whole call to an HTTPS email provider: connect (at most 3 s), request and answer.",
    )
    email_from: str = Field(default="Brownout <noreply@localhost>", min_length=3, description="From header of emails.")
    outbox_relay_interval_seconds: PositiveSeconds = Field(
        default=1.0, description="How often the worker's relay publishes unpublished outbox rows."
    )
    outbox_resend_after_minutes: float = Field(
        default=60.0,
        gt=0,
        description="An email job published this long ago whose email was never sent (and not dead-lettered) is "
        "published again by the relay (rows created within the last 7 days).",
    )
    email_queue_name: str = Field(
        default="brownout-email",
        pattern=r"^[a-zA-Z_][a-zA-Z0-9._-]*$",
        description="Dramatiq queue that carries send_email jobs.",
    )

    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_URL", "BROWNOUT_REDIS_URL"),
        description="Redis URL (redis://[:pass@]host:6379/0, rediss:// for TLS) of the read cache, pending "
        "writes and the fleet-wide breaker override; unset: reads go to the database only.",
    )
    redis_timeout_seconds: PositiveSeconds = Field(
        default=0.05,
        description="Deadline of each Redis connect and command; a dead Redis costs a request about this much, once.",
    )
    redis_skip_seconds: PositiveSeconds = Field(
        default=1.0,
        description="After a Redis failure, go around Redis for this long before trying it again (a dead Redis "
        "then costs each process one Redis deadline per this interval; a false alarm under load costs little).",
    )
    redis_key_prefix: str = Field(
        default="brownout:", min_length=1, max_length=100, description="Prefix of every Redis key Brownout writes."
    )
    cache_fresh_seconds: PositiveSeconds = Field(
        default=30.0, description="Age below which a cached read is served without asking the database."
    )
    cache_stale_seconds: PositiveSeconds = Field(
        default=86_400.0, description="How long a cached read is kept to be served stale while the database is sick."
    )
    pending_seconds: PositiveSeconds = Field(
        default=3_600.0,
        description="How long a queued write shows in reads as pending if nothing clears it (the worker's apply does).",
    )
    admin_token: SecretStr | None = Field(
        default=None,
        description="The operator's bearer token (at least 32 characters): the admin scope, as a service key with "
        "`admin` has it (/admin/*, /ready's detail). Unset: only keys open those.",
    )
    auth: Literal["required", "disabled"] = Field(
        default="required",
        description="'disabled' answers every caller as if it held every scope (a warning at start-up and on /ready): "
        "for a service behind a gateway that authenticates. 'required' with no key, token or JWT setting: "
        "the web refuses to start.",
    )
    api_keys: str | None = Field(
        default=None,
        description="Service keys: `NAME:SHA256_HEX:SCOPES` entries, comma-separated, scopes joined by + out of "
        "write, read, metrics, admin (`brownout keys new NAME SCOPES` makes a key and its entry).",
    )
    jwt_secret: SecretStr | None = Field(
        default=None,
        description="HS256 secret of end users' tokens (Supabase: the project's legacy JWT secret).",
    )
    jwt_jwks_url: str | None = Field(
        default=None,
        description="JWKS of end users' ES256/RS256 tokens (Supabase: https://<ref>.supabase.co/auth/v1/.well-known/jwks.json); "
        "needs BROWNOUT_JWT_ISSUER.",
    )
    jwt_issuer: str | None = Field(
        default=None, description="Required `iss` of end users' tokens (Supabase: https://<ref>.supabase.co/auth/v1)."
    )
    jwt_audience: str = Field(default="authenticated", description="Required `aud` of end users' tokens.")
    jwt_user_claim: str = Field(default="sub", description="The claim of an end user's token that is their user id.")
    jwt_allow_anonymous: bool = Field(
        default=False,
        description="Whether Supabase's anonymous users (`is_anonymous: true`) are users here; refused by default.",
    )
    rate_limit_writes: str | None = Field(
        default="600/minute",
        description="Writes (any method but GET/HEAD) each service key or user may make, fleet-wide (e.g. 600/minute, "
        "10/second); over it: 429 with Retry-After, nothing queued. Empty: no limit.",
    )
    rate_limit_reads: str | None = Field(
        default="3000/minute", description="Reads (GET/HEAD) each service key or user may make, fleet-wide. Empty: no limit."
    )
    rate_limit_auth_failures: str | None = Field(
        default="30/minute",
        description="Requests with an invalid credential each client address may make before it gets 429 instead of 401.",
    )
    cors_origins: str | None = Field(
        default=None,
        description="Comma-separated origins whose browsers may call the API (CORS); none by default.",
    )
    override_poll_seconds: PositiveSeconds = Field(
        default=1.0,
        description="How often each web and worker process reads the fleet-wide operator records (breaker override, "
        "read-only mode) from Redis.",
    )
    read_only: bool = Field(
        default=False,
        description="This process is read-only from start-up whatever the fleet's mode: writes refused with 503, "
        "the worker holds its queue (POST /admin/mode read-write does not lift it).",
    )
    max_body_bytes: int = Field(
        default=65_536, ge=1024, description="Largest request body accepted; larger ones get 413 before being read."
    )
    max_query_bytes: int = Field(
        default=4096, ge=256, description="Longest query string accepted; longer ones get 414 before any work."
    )
    max_header_bytes: int = Field(
        default=8192, ge=1024, description="Longest request header (name and value) accepted; a longer one gets 431."
    )
    max_head_bytes: int = Field(
        default=65_536,
        ge=4096,
        description="Longest request head (request line and all headers) accepted; past it the web answers 431 and "
        "closes the connection, before the head is parsed further.",
    )

    queue_type: Literal["classic", "quorum"] = Field(
        default="classic",
        description="RabbitMQ queue type of the command and email queues: 'quorum' replicates them across a "
        "RabbitMQ cluster (declared the same way by web and worker).",
    )
    queue_delivery_limit: int = Field(
        default=1000,
        ge=1,
        description="Quorum queues only: redeliveries after which RabbitMQ dead-letters a message (x-delivery-limit).",
    )

    log_format: Literal["text", "json"] = Field(default="text", description="'json': one JSON object per log line.")
    access_log: bool = Field(
        default=False,
        description="`brownout web`: uvicorn's line per request (off: requests are counted and timed per route in "
        "/metrics, and a line per request costs a cache hit a sizeable part of its time).",
    )
    log_profile: Literal["production", "dev"] = Field(
        default="production", description="'dev' logs more detail (DEBUG for Brownout's own loggers) with the same values."
    )
    sentry_dsn: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("SENTRY_DSN", "BROWNOUT_SENTRY_DSN"),
        description="Sentry DSN; unset: Sentry is not initialised.",
    )
    sentry_environment: str = Field(default="production", description="Sentry environment tag.")
    sentry_incident_interval_seconds: PositiveSeconds = Field(
        default=600,
        description="At most one Sentry event per kind of incident (disconnect burst, breaker opening, dead letter) "
        "per process in this time; those held back are counted on the next one.",
    )
    metrics_port: int = Field(
        default=9191,
        ge=1,
        le=65535,
        description="Port of the worker dyno's /metrics endpoint (the web serves /metrics on $PORT).",
    )

    pooler_connection_limit: int | None = Field(
        default=None,
        ge=1,
        description="Connections the database (or its pooler) allows this service; a start-up warning when "
        "replicas x processes x (pool_size + pool_max_overflow) would exceed it.",
    )
    web_replicas: int = Field(default=1, ge=1, description="Web replicas deployed (for the connection budget).")
    web_processes: int = Field(default=1, ge=1, le=64, description="uvicorn worker processes per web replica.")
    worker_replicas: int = Field(default=1, ge=1, description="Worker replicas deployed (for the connection budget).")
    worker_processes: int = Field(default=1, ge=1, le=64, description="Dramatiq processes per worker replica.")

    @field_validator("database_url")
    @classmethod
    def _normalise_database_url(cls, value: str) -> str:
        return normalise_database_url(value)

    @field_validator("migration_database_url")
    @classmethod
    def _normalise_migration_url(cls, value: str | None) -> str | None:
        return None if value is None else normalise_database_url(value)

    @field_validator(
        "migration_database_url",
        "smtp_url",
        "email_url",
        "redis_url",
        "admin_token",
        "api_keys",
        "jwt_secret",
        "jwt_jwks_url",
        "jwt_issuer",
        "sentry_dsn",
        "pooler_connection_limit",
        "db_statement_timeout_seconds",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        """`NAME=` on a platform's variable page means unset for a setting whose default is unset (a limit with a
        default, where empty means "no limit", is read as it says)."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("rabbitmq_url")
    @classmethod
    def _valid_rabbitmq_nodes(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None  # unset (or set empty): no write path, as before
        return NODE_SEPARATOR.join(split_node_urls(value))

    @field_validator("admin_token")
    @classmethod
    def _long_admin_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_TOKEN_LENGTH:
            raise ValueError(f"must be at least {MIN_TOKEN_LENGTH} characters (unset it to rely on service keys)")
        return value

    @field_validator("jwt_secret")
    @classmethod
    def _long_jwt_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().encode()) < MIN_TOKEN_LENGTH:
            raise ValueError(f"must be at least {MIN_TOKEN_LENGTH} bytes (Supabase's legacy secrets are longer)")
        return value

    @field_validator("rate_limit_writes", "rate_limit_reads", "rate_limit_auth_failures")
    @classmethod
    def _valid_rate(cls, value: str | None) -> str | None:
        if value is not None and value.strip():
            from brownout._auth.rate_limit import Rate  # here: it imports redis, which settings alone do not need

            Rate.parse(value)
        return value or None

    @field_validator("api_keys")
    @classmethod
    def _valid_api_keys(cls, value: str | None) -> str | None:
        parse_keys(value)
        return value

    @model_validator(mode="after")
    def _pooler_from_the_url(self) -> Settings:
        if "database_pooler" not in self.model_fields_set:  # named, it wins; else the URL may say
            object.__setattr__(self, "database_pooler", _pooler_of(self.database_url))  # frozen: set once, here
        return self

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.jwt_jwks_url and not self.jwt_issuer:
            raise ValueError("BROWNOUT_JWT_JWKS_URL needs BROWNOUT_JWT_ISSUER (the tokens' required `iss`)")
        if self.retry_cap_seconds < self.retry_base_seconds:
            raise ValueError(
                f"BROWNOUT_RETRY_CAP_SECONDS ({self.retry_cap_seconds}) must be >= "
                f"BROWNOUT_RETRY_BASE_SECONDS ({self.retry_base_seconds})"
            )
        if self.email_url and self.smtp_url:
            raise ValueError("EMAIL_URL and SMTP_URL are both set: keep one (EMAIL_URL takes SMTP URLs too)")
        if self.admission_min_in_flight > self.admission_max_in_flight:
            raise ValueError(
                f"BROWNOUT_ADMISSION_MIN_IN_FLIGHT ({self.admission_min_in_flight}) must be <= "
                f"BROWNOUT_ADMISSION_MAX_IN_FLIGHT ({self.admission_max_in_flight})"
            )
        return self

    @property
    def rabbitmq_urls(self) -> tuple[str, ...]:
        """RABBITMQ_URL's node URLs (`brownout._dispatch.rabbitmq_nodes`); empty when unset. Checked, stripped and
        joined again by its validator, so this split is the whole parse (and follows a `model_copy`)."""
        return tuple(self.rabbitmq_url.split(NODE_SEPARATOR)) if self.rabbitmq_url else ()

    @property
    def email_target_url(self) -> str | None:
        """Where emails go: EMAIL_URL, or SMTP_URL (its older name)."""
        return self.email_url or self.smtp_url

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, (mask_secrets(value) if name and name.endswith("_url") else value)


def normalise_database_url(value: str) -> str:
    """postgres:// and postgresql:// (as hosting providers hand them out) -> postgresql+psycopg2://, and
    sslmode=require added when the URL names a host off this machine and no sslmode (see `_default_sslmode`).

    Every database URL goes through here (the settings' DATABASE_URL and MIGRATION_DATABASE_URL, the
    migrations' env.py), so every engine (web, worker, migrations, health check, CLI) gets the same rule."""
    value = value.strip()
    scheme, sep, rest = value.partition("://")
    if not sep:
        raise ValueError("must be a URL such as postgresql://user:password@host:5432/dbname")
    scheme = scheme.lower()
    if scheme in ("postgres", "postgresql", "postgresql+psycopg2"):
        return f"postgresql+psycopg2://{_default_sslmode(rest)}"
    raise ValueError(f"unsupported scheme {scheme!r}: use postgresql:// (driver psycopg2)")


def _default_sslmode(rest: str) -> str:
    """*rest* (a URL after its "://") with sslmode=require when it reaches a non-local host and says no sslmode.

    libpq's default is `prefer`: TLS when the server offers it, plain text when it does not, so anyone on
    the path who answers "no SSL" gets the password and every row. An explicit choice stays: sslmode in the
    URL (even `disable`), libpq's PGSSLMODE, or a pg_service.conf entry (`service=`). Local means localhost,
    a loopback address or a Unix socket (no host, or a path); a URL without host follows PGHOST as libpq does.
    """
    userinfo, at, after = rest.partition("@")
    if not at or "/" in userinfo:  # no user info: an "@" further on is in the path or the query
        userinfo, at, after = "", "", rest
    # Split after the user info, which SQLAlchemy lets hold a raw "?" (a password).
    location, _, query = after.partition("?")
    params = parse_qs(query, keep_blank_values=True)
    if "sslmode" in params or "service" in params or os.environ.get("PGSSLMODE"):
        return rest
    hosts = _url_hosts(location.split("/", 1)[0])
    for key in ("host", "hostaddr"):
        hosts += [host for value in params.get(key, []) for host in value.split(",")]
    if not [host for host in hosts if host.strip()]:
        hosts = os.environ.get("PGHOST", "").split(",")
    if all(_is_local_host(host) for host in hosts):
        return rest
    query = f"{query}&sslmode=require" if query else "sslmode=require"
    return f"{userinfo}{at}{location}?{query}"


def _url_hosts(netloc: str) -> list[str]:
    """The host names of a URL's host:port[,host:port...] part, ports dropped."""
    hosts = []
    for item in netloc.split(","):
        if item.startswith("["):
            hosts.append(item[1:].partition("]")[0])
        else:
            hosts.append(item.partition(":")[0])
    return hosts


def _is_local_host(host: str) -> bool:
    host = unquote(host).strip()
    if not host or host.startswith(("/", "@")):  # the default socket, a socket directory, an abstract socket
        return True
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _env_name(field: str) -> str:
    if field.lower() in ("database_url", "brownout_database_url"):
        return "DATABASE_URL"
    if field.lower() in ("rabbitmq_url", "brownout_rabbitmq_url"):
        return "RABBITMQ_URL"
    if field.lower() in ("smtp_url", "brownout_smtp_url"):
        return "SMTP_URL"
    if field.lower() in ("email_url", "brownout_email_url"):
        return "EMAIL_URL"
    if field.lower() in ("migration_database_url", "brownout_migration_database_url"):
        return "MIGRATION_DATABASE_URL"
    if field.lower() in ("redis_url", "brownout_redis_url"):
        return "REDIS_URL"
    if field.lower() in ("sentry_dsn", "brownout_sentry_dsn"):
        return "SENTRY_DSN"
    return f"BROWNOUT_{field.upper()}"


class _ExplicitSettings(Settings):
    """Settings from keyword arguments and defaults only (see settings_from_values); a misspelt name is an error."""

    model_config = SettingsConfigDict(extra="forbid")

    @classmethod
    def settings_customise_sources(cls, settings_cls: Any, init_settings: Any, *sources: Any, **named: Any) -> tuple[Any, ...]:
        return (init_settings,)


def settings_from_values(**values: Any) -> Settings:
    """Brownout's settings from these values and the defaults, reading nothing from the environment: for a
    service with a settings object of its own, which passes on what it decided."""
    return _ExplicitSettings(**values)


def load_settings(**overrides: Any) -> Settings:
    """Read and validate the environment; raise ConfigurationError with one line per problem. A variable that
    looks like a misspelt setting is logged (a warning): it changes nothing, which is the surprise."""
    for name, meant in misspelt_settings(os.environ):
        log.warning("%s is not a setting and changes nothing: did you mean %s?", name, meant)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            name = _env_name(loc) if loc else "configuration"
            lines.append(f"  {name}: {err['msg']}")
        raise ConfigurationError("invalid configuration:\n" + "\n".join(lines)) from None


def setting_names() -> set[str]:
    """Every environment variable a setting is read from."""
    names = set()
    for field_name, field in Settings.model_fields.items():
        names.add(f"BROWNOUT_{field_name.upper()}")
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(str(choice).upper() for choice in alias.choices)
        elif isinstance(alias, str):
            names.add(alias.upper())
    return names


def misspelt_settings(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """(variable, the setting it is close to) for each BROWNOUT_ variable that is no setting but nearly one.
    Only near misses: deploy scripts keep variables of their own under the same prefix."""
    known = setting_names()
    found = []
    for name in sorted(environ):
        upper = name.upper()
        if upper.startswith("BROWNOUT_") and upper not in known:
            close = difflib.get_close_matches(upper, known, n=1, cutoff=0.9)  # a letter or two off
            if close:
                found.append((name, close[0]))
    return found


SUPABASE_POOLER_DOMAIN = ".pooler.supabase.com"
SUPABASE_TRANSACTION_PORT = 6543


def _pooler_of(database_url: str | None) -> Pooler:
    """Supabase's pooler takes transactions on 6543 (sessions on 5432): its URL says which, so nobody has to.
    Any other pooler says nothing in its URL: BROWNOUT_DATABASE_POOLER names it."""
    if database_url is None:
        return "none"
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(database_url)
    except ArgumentError:
        return "none"
    host = (url.host or "").lower().rstrip(".")
    on_supabase = host.endswith(SUPABASE_POOLER_DOMAIN)
    return "transaction" if on_supabase and url.port == SUPABASE_TRANSACTION_PORT else "none"
