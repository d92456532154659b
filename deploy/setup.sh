#!/usr/bin/env bash
# Set up a Debian/Ubuntu machine for Brownout: backing services (deploy/local-services.sh)
# and the Python virtual environment at .venv, installed exactly from uv.lock.
# Idempotent: `uv sync --frozen` installs only what differs from the lock.
#
#   bash deploy/setup.sh                  # every dependency group (tests, lint, bench, local run)
#   UV_PYTHON=3.13 UV_PROJECT_ENVIRONMENT=.venv-3.13 bash deploy/setup.sh   # another interpreter
set -euo pipefail
cd "$(dirname "$0")/.."

# uv itself, from PyPI, at one version, in a virtualenv of its own (.tools/uv): never the system's pip.
readonly UV_VERSION=0.13.9
readonly UV=.tools/uv/bin/uv

need_root() { if [[ $EUID -eq 0 ]]; then "$@"; else sudo -- "$@"; fi; }

if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "setup: Python 3.11+ is required (found: $(python3 --version 2>&1))" >&2
    exit 1
fi
if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
    echo "setup: installing python3-venv"
    need_root apt-get update -qq >/dev/null
    need_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
fi

if [[ "${BROWNOUT_SKIP_SERVICES:-}" != 1 ]]; then
    bash deploy/local-services.sh
fi

if [[ "$("$UV" --version 2>/dev/null)" != "uv $UV_VERSION"* ]]; then
    echo "setup: installing uv $UV_VERSION into .tools/uv"
    rm -rf .tools/uv
    python3 -m venv .tools/uv
    .tools/uv/bin/python -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
fi

# Without UV_PYTHON, .venv gets the oldest Python Brownout supports (3.11: what CI must test) where the
# machine has one, else python3.
if [[ -z "${UV_PYTHON:-}" ]]; then
    if ! UV_PYTHON=$("$UV" python find --system 3.11 2>/dev/null); then
        UV_PYTHON=$(command -v python3)
        echo "setup: no Python 3.11 found; .venv uses $("$UV_PYTHON" --version)" >&2
    fi
fi
export UV_PYTHON UV_PYTHON_DOWNLOADS=never
# --frozen: install what uv.lock says, never re-resolve (a stale lock fails `uv lock --check` in deploy/test.sh).
"$UV" sync --frozen --all-groups --quiet
echo "setup: ready (${UV_PROJECT_ENVIRONMENT:-.venv} from uv.lock$([[ "${BROWNOUT_SKIP_SERVICES:-}" == 1 ]] || echo ", PostgreSQL, RabbitMQ, Redis"))"
