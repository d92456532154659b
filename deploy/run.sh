#!/usr/bin/env bash
# Set everything up, then run the service against the local backing services:
# migrate the database (the Procfile's release step), print its health report,
# and run the Procfile's web and worker processes together with honcho in the
# foreground (Ctrl-C stops both cleanly). The API listens on $PORT (default 8000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
source deploy/local-env.sh
export PATH="$PWD/.venv/bin:$PATH" PORT="${PORT:-8000}"
python -m app migrate
python -m brownout health || true  # a sick database is what Brownout is for: start anyway
# Only web and worker: the release line exits when done, and honcho would stop the others with it.
exec honcho start -f Procfile web worker
