# One image for every process type of the Procfile (web, worker, release).
#
#   docker build -t brownout .
#   docker run -p 8000:8000 -e DATABASE_URL=... -e RABBITMQ_URL=... brownout              # web (default)
#   docker run -e DATABASE_URL=... -e RABBITMQ_URL=... brownout run-procfile worker      # worker
#   docker run -e DATABASE_URL=... brownout run-procfile release                         # migrations
#
# The commands themselves live in one place, the Procfile: `run-procfile TYPE` execs
# the Procfile's TYPE line through /bin/sh (so ${PORT:-8000} and the other defaults
# expand as they do under honcho). docker-compose.yml and .railway/railway.py name process
# types, never commands; tests/unit/test_deploy_files.py and test_railway_iac.py check that they agree.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: the project and exactly the versions in uv.lock, into a virtualenv ----
FROM ${PYTHON_IMAGE} AS build
# The same uv as deploy/setup.sh (tests/unit/test_deploy_files.py checks that they agree).
ARG UV_VERSION=0.13.9
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1
RUN pip install "uv==${UV_VERSION}"
WORKDIR /src
# The dependencies first (their own layer, rebuilt only when the lock changes), then the project.
# --frozen: exactly uv.lock, never re-resolved; --no-default-groups: no test, lint, bench or local tools.
# Every locked runtime dependency ships a manylinux wheel: nothing is compiled, and the slim image
# has no compiler, so a dependency that would need one fails here.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-default-groups --no-install-project --python /usr/local/bin/python3
COPY src ./src
RUN uv sync --frozen --no-default-groups --no-editable --python /usr/local/bin/python3

# ---- runtime: the virtualenv, the Procfile and a non-root user; no pip cache, no build tree ----
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PORT=8000
RUN groupadd --system --gid 10001 brownout \
    && useradd --system --uid 10001 --gid brownout --home-dir /app --no-create-home --shell /usr/sbin/nologin brownout
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY Procfile ./
# The reference service runs from here, beside the installed library (the wheel holds `brownout` only):
# its processes start in /app, which Python, uvicorn and Dramatiq put on sys.path.
COPY app/ ./app/
# deploy/ holds no secrets; it is here so that a public CA certificate committed there
# (Supabase's, for sslmode=verify-full) can be named as sslrootcert=/app/deploy/<file>.
COPY deploy/ ./deploy/
# run-procfile TYPE: exec the Procfile's "TYPE:" line (PROCFILE overrides the path, for tests).
RUN printf '%s\n' \
      '#!/bin/sh' \
      '# run-procfile TYPE: exec the line "TYPE: command" of the Procfile, through /bin/sh.' \
      'set -e' \
      'type="${1:?usage: run-procfile web|worker|release}"' \
      'procfile="${PROCFILE:-/app/Procfile}"' \
      'line="$(sed -n "s/^${type}:[[:space:]]*//p" "$procfile")"' \
      'if [ -z "$line" ]; then echo "run-procfile: no ${type}: line in ${procfile}" >&2; exit 64; fi' \
      '# What the health check (python -m app.healthcheck) asks depends on the process type: the first' \
      '# run-procfile of a container (its main process) records it; a later `docker exec ... run-procfile` does not.' \
      'typefile="${BROWNOUT_PROCESS_TYPE_FILE:-/tmp/brownout-process-type}"' \
      '[ -e "$typefile" ] || printf "%s\\n" "$type" > "$typefile" 2>/dev/null || true' \
      'eval "exec ${line}"' \
      > /usr/local/bin/run-procfile \
    && chmod 0755 /usr/local/bin/run-procfile

USER brownout:brownout
EXPOSE 8000
# Liveness only, of the process type run-procfile started (app/healthcheck.py): the web's /health on
# $PORT, the worker's /metrics on BROWNOUT_METRICS_PORT, nothing for a release job. Never /ready:
# a database or RabbitMQ outage must not mark the container unhealthy (Brownout is built to serve through it).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "app.healthcheck"]
STOPSIGNAL SIGTERM
CMD ["run-procfile", "web"]
