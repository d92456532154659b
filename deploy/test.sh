#!/usr/bin/env bash
# Set everything up, then lint, type-check and run the whole test suite against the real services.
# Extra arguments go to pytest (e.g. deploy/test.sh tests/unit -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
source deploy/local-env.sh
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .
.venv/bin/mypy app worker
exec .venv/bin/python -m pytest "$@"
