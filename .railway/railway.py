"""Brownout on Railway, as Infrastructure as Code: the web and worker services, their Redis and RabbitMQ.

Railway's CLI evaluates this file and applies it; Railway never reads it at deploy time:

    railway config plan      # what would change in the linked project and environment (changes nothing)
    railway config apply     # the same plan, applied after confirmation

Run both from a shell where `railway_sdk` imports (the CLI runs `python3` from PATH): `. .venv/bin/activate`
after `bash deploy/setup.sh`, which installs the exact version pinned in pyproject.toml (Railway calls its
Python authoring beta). Run them again after every change to this file; a deploy of new code needs neither.

PARTIAL makes this a named partial: applied inside a project that already runs a team's own services, it
creates and manages the five resources below and leaves every other resource alone. Their names start with
"brownout-" so that they cannot claim a team's own "web" or "redis". Do not rename the partial once applied.

On the services declared here, Railway deletes every variable this file does not name. Secrets are named
with `preserve()`: the file never holds them, and apply keeps what was set with `railway variables`. A setting
of your own (any `BROWNOUT_*` variable of the README's configuration table) goes in `_shared_variables()` below.
tests/unit/test_railway_iac.py checks every field against the Procfile, src/brownout/_settings.py and the ports.
"""

from __future__ import annotations

from typing import Any

from railway_sdk import define_railway, github, image, preserve, project, redis, service, volume

PARTIAL = "brownout"
PROJECT_NAME = "brownout"  # the graph's name; Railway's plan compares resources, never the project's name

# "your-org/your-fork" to build both services from GitHub on every push to GITHUB_BRANCH. Left None, no
# source is declared: connect the repository in each service's Settings, or deploy with `railway up`.
GITHUB_REPOSITORY: str | None = None
GITHUB_BRANCH = "main"

# The fleet's shape: Railway's replica counts and the connection budget every process checks at start-up
# (src/brownout/_pool_budget.py) come from the same numbers, so they cannot drift apart.
WEB_REPLICAS = 1
WEB_PROCESSES = 1
WORKER_REPLICAS = 1
WORKER_PROCESSES = 1
# Client connections this service may open to Supabase's pooler (its limit depends on the compute size).
POOLER_CONNECTION_LIMIT = 60

WEB = "brownout-web"
WORKER = "brownout-worker"
REDIS = "brownout-redis"
RABBITMQ = "brownout-rabbitmq"
RABBITMQ_IMAGE = "rabbitmq:4.1"  # the same major as docker-compose.yml; see the README's quorum-queue notes
RABBITMQ_USER = "brownout"
METRICS_PORT = 9191  # the worker's /metrics (BROWNOUT_METRICS_PORT)

# Railway runs no Procfile release line: the migration is the pre-deploy command of both services (a
# worker built from a new commit must not start on the old schema either; the second run takes the
# advisory lock, finds the schema at head and does nothing). `python -m app migrate` connects with
# MIGRATION_DATABASE_URL when it is set (a session-mode or direct connection: DDL and the advisory lock
# do not belong on a transaction pooler), else with DATABASE_URL.
PRE_DEPLOY = "run-procfile release"
# The image's own entrypoint and command, refused until the password is set (see the service below).
RABBITMQ_START = (
    'sh -c \'if [ -z "$RABBITMQ_DEFAULT_PASS" ]; then echo "set RABBITMQ_DEFAULT_PASS first" >&2; exit 1; fi; '
    "exec docker-entrypoint.sh rabbitmq-server'"
)


def _build() -> dict[str, Any]:
    return {"builder": "DOCKERFILE", "dockerfilePath": "Dockerfile"}


def _source() -> dict[str, Any] | None:
    return github(GITHUB_REPOSITORY, branch=GITHUB_BRANCH) if GITHUB_REPOSITORY else None


def _rabbitmq_url() -> str:
    """amqp:// to the RabbitMQ service over Railway's private network; its password stays a Railway variable."""
    password = f"${{{{{RABBITMQ}.RABBITMQ_DEFAULT_PASS}}}}"
    host = f"${{{{{RABBITMQ}.RAILWAY_PRIVATE_DOMAIN}}}}"
    return f"amqp://{RABBITMQ_USER}:{password}@{host}:5672/%2F"


def _shared_variables(cache: Any) -> dict[str, Any]:
    """What the web and the worker both read (names from src/brownout/_settings.py)."""
    return {
        # Secrets: set with `railway variables --service <name> --set ...`, never written here.
        "DATABASE_URL": preserve(),  # Supabase's transaction pooler, port 6543, sslmode=verify-full
        "MIGRATION_DATABASE_URL": preserve(),  # its session-mode pooler (port 5432) or the direct connection
        "SENTRY_DSN": preserve(),
        "EMAIL_URL": preserve(),  # resend://KEY or postmark://TOKEN: HTTPS, as Railway blocks SMTP below Pro
        "SMTP_URL": preserve(),
        "RABBITMQ_URL": _rabbitmq_url(),
        "REDIS_URL": cache.env.REDIS_URL,
        "BROWNOUT_DATABASE_POOLER": "transaction",
        "BROWNOUT_LOG_FORMAT": "json",
        "BROWNOUT_POOLER_CONNECTION_LIMIT": str(POOLER_CONNECTION_LIMIT),
        "BROWNOUT_WEB_REPLICAS": str(WEB_REPLICAS),
        "BROWNOUT_WEB_PROCESSES": str(WEB_PROCESSES),
        "BROWNOUT_WORKER_REPLICAS": str(WORKER_REPLICAS),
        "BROWNOUT_WORKER_PROCESSES": str(WORKER_PROCESSES),
    }


@define_railway
def main(ctx: Any = None) -> Any:
    cache = redis(REDIS)
    broker_data = volume(f"{RABBITMQ}-data")
    broker = service(
        RABBITMQ,
        source=image(RABBITMQ_IMAGE),
        variables={
            "RABBITMQ_DEFAULT_USER": RABBITMQ_USER,
            "RABBITMQ_DEFAULT_PASS": preserve(),
            # RabbitMQ keeps its data under its node name, by default rabbit@<hostname>, and a container's
            # host name changes at every deploy: a fixed name keeps the queued writes across redeploys.
            "RABBITMQ_NODENAME": "rabbit@localhost",
        },
        volumeMounts={"/var/lib/rabbitmq": broker_data},
        # RabbitMQ creates its user once, at first boot, and keeps it on the volume: started before its
        # password is set, it would create the user with the image's default password ("guest") for good.
        start=RABBITMQ_START,
        deploy={"restartPolicyType": "ALWAYS"},
    )
    web = service(
        WEB,
        source=_source(),
        build=_build(),
        start="run-procfile web",
        preDeployCommand=[PRE_DEPLOY],
        # Liveness only. Never /ready: a database or RabbitMQ outage must not block a deploy.
        healthcheck="/health",
        healthcheckTimeout=120,
        replicas=WEB_REPLICAS,
        deploy={
            "restartPolicyType": "ON_FAILURE",
            "restartPolicyMaxRetries": 10,
            # SIGTERM to SIGKILL: uvicorn's --timeout-graceful-shutdown is 10 s (`brownout web`).
            "drainingSeconds": 15,
        },
        variables={**_shared_variables(cache), "BROWNOUT_ADMIN_TOKEN": preserve()},
    )
    worker = service(
        WORKER,
        source=_source(),
        build=_build(),
        start="run-procfile worker",
        preDeployCommand=[PRE_DEPLOY],
        # No health check: the worker serves no HTTP on $PORT (only /metrics on BROWNOUT_METRICS_PORT).
        replicas=WORKER_REPLICAS,
        deploy={
            "restartPolicyType": "ON_FAILURE",
            "restartPolicyMaxRetries": 10,
            # In-flight applies get 10 s after SIGTERM, then the rest goes back to RabbitMQ: >= 25 s in all.
            "drainingSeconds": 30,
        },
        variables={**_shared_variables(cache), "BROWNOUT_METRICS_PORT": str(METRICS_PORT)},
    )
    return project(PROJECT_NAME, resources=[cache, broker_data, broker, web, worker])
