#!/usr/bin/env bash
# Set up a Debian/Ubuntu machine for Brownout: backing services (deploy/local-services.sh)
# and the Python virtual environment at .venv with the pinned dependencies.
# Idempotent: the venv is reinstalled only when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."

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

bash deploy/local-services.sh

stamp=.venv/.brownout-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -x .venv/bin/python || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    echo "setup: installing Python dependencies into .venv"
    python3 -m venv .venv
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
    echo "$want" >"$stamp"
fi
echo "setup: ready (.venv, PostgreSQL, RabbitMQ, Redis)"
