#!/usr/bin/env bash
# Set everything up, then lint, type-check and run the whole test suite against the real services.
#
#   bash deploy/test.sh                   # everything (CI): the lock, lint, types, the dependency audit, the whole suite on the
#                                         # oldest supported Python (3.11), then the newest Python of this machine
#                                         # (unit and integration tests on BROWNOUT_TEST_WORKERS processes, default 4;
#                                         # the fault tests in one)
#   bash deploy/test.sh tests/unit -x     # extra arguments go to pytest, on .venv only
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
source deploy/local-env.sh

newest_python() {  # the newest final, GIL-enabled Python 3 on this machine (PATH, pyenv) newer than .venv's, if any
    local probe='import sys, sysconfig; print(sys.version_info[1] if sys.version_info.releaselevel == "final" and not sysconfig.get_config_var("Py_GIL_DISABLED") else 0, sys.executable)'
    local oldest best="" best_minor candidate found minor
    oldest=$(.venv/bin/python -c 'import sys; print(sys.version_info[1])')
    best_minor=$oldest
    for candidate in $(compgen -c python3. | grep -E '^python3\.[0-9]+$' | sort -u) \
        "${PYENV_ROOT:-${HOME:-/nonexistent}/.pyenv}"/versions/3.*/bin/python3; do
        found=$("$candidate" -c "$probe" 2>/dev/null) || continue
        minor=${found%% *}
        [[ "$minor" =~ ^[0-9]+$ ]] || continue
        if ((minor > best_minor)); then
            best_minor=$minor
            best=${found#* }
        fi
    done
    echo "$best"
}

# uv.lock must be what pyproject.toml resolves to (a dependency changed without `uv lock` fails here).
.tools/uv/bin/uv lock --check --quiet
# ruff check includes flake8-bandit's security rules (S; pyproject.toml says how findings are marked).
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .
.venv/bin/mypy src/brownout app
if [[ $# -gt 0 ]]; then
    exec .venv/bin/python -m pytest "$@"
fi
# Known vulnerabilities in the locked packages: a finding fails; without the advisory data (offline), one
# line says the audit could not run. At most 25 s; on the full run only.
bash deploy/audit.sh

# The unit and integration tests on worker processes (pytest-xdist): each test has its own database, queues and
# Redis prefix, and most of their time is spent waiting on servers, so more workers than cores pay. worksteal:
# each worker starts on a block of whole files (a module's fixture is built once) and takes tests from the others
# when it runs out. The fault tests are timing-bound: they run alone, in one process, after them.
workers=${BROWNOUT_TEST_WORKERS:-4}
echo "test: unit and integration tests on $(.venv/bin/python --version) (.venv, $workers workers)"
.venv/bin/python -m pytest -n "$workers" --dist worksteal tests/unit tests/integration
echo "test: fault tests on $(.venv/bin/python --version) (.venv, one process)"
.venv/bin/python -m pytest tests/faults

newest=$(newest_python)
if [[ -n "$newest" ]]; then
    # The newest Python this machine has: the same lock, the unit and integration tests (the fault tests,
    # timing-bound, run once, above), but for the image's test, which builds and runs the image with the
    # machine's python3 whichever interpreter runs pytest: it would repeat the run above. Its virtualenv is
    # .venv-newest.
    echo "test: unit and integration tests on $("$newest" --version) (.venv-newest, $workers workers)"
    UV_PYTHON="$newest" UV_PROJECT_ENVIRONMENT=.venv-newest BROWNOUT_SKIP_SERVICES=1 bash deploy/setup.sh
    .venv-newest/bin/python -m pytest -q -p no:cacheprovider -n "$workers" --dist worksteal tests/unit tests/integration \
        --ignore tests/integration/test_image_runtime.py
fi
