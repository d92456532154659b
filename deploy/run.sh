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
# Callers need a key: the first run makes one with every scope (kept in .local-key, git-ignored, mode 600),
# unless the environment already names keys of its own.
if [ -z "${BROWNOUT_API_KEYS:-}" ]; then
  if [ ! -s .local-key ]; then
    (umask 077 && python -m brownout keys new local write+read+metrics+admin > .local-key 2>/dev/null)
  fi
  export BROWNOUT_API_KEYS="$(sed -n 2p .local-key)"
  echo "run: callers need a key; yours (in .local-key):"
  echo "  curl -H \"Authorization: Bearer $(sed -n 1p .local-key)\" localhost:$PORT/users/42/notifications"
fi
# Only web and worker: the release line exits when done, and honcho would stop the others with it.
exec honcho start -f Procfile web worker
