#!/usr/bin/env bash
# Set everything up, then run the service against the local backing services:
# migrate the database, print its health report, and run the worker in the
# foreground (Ctrl-C stops it cleanly). The web process arrives with the HTTP API.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
source deploy/local-env.sh
.venv/bin/python -m app migrate
.venv/bin/python -m app health
exec .venv/bin/dramatiq worker.main --processes 1 --threads 8 --worker-shutdown-timeout 10000 --queues "${BROWNOUT_QUEUE_NAME:-brownout-commands}" "${BROWNOUT_EMAIL_QUEUE_NAME:-brownout-email}"
