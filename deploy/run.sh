#!/usr/bin/env bash
# Set everything up, then run the service against the local backing services.
# For now the service is the database layer: this prints its health report.
# (The web and worker processes arrive with their issues and will start here.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
source deploy/local-env.sh
exec .venv/bin/python -m app health
