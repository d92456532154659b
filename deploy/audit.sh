#!/usr/bin/env bash
# Known vulnerabilities in the packages uv.lock installs (every group: CI and developers install them all),
# looked up by pip-audit in PyPI's advisory data. deploy/test.sh runs it; it runs alone too.
#
#   bash deploy/audit.sh
#
# A finding fails (exit 1): upgrade the package in the lock (`uv lock --upgrade-package NAME`). When the
# advisory data cannot be had (no network, as on an offline CI machine; a package index without it), the
# audit prints one line saying it could not run and why, and exits 0: it neither fails for want of a
# network nor reports "no known vulnerabilities" about packages it never looked up.
set -euo pipefail
cd "$(dirname "$0")/.."

# The whole audit stays within this (seconds); one HTTP request within --timeout.
readonly AUDIT_SECONDS=${BROWNOUT_AUDIT_SECONDS:-25}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Exact versions, no hashes and not Brownout itself: pip-audit looks each name and version up as given.
.tools/uv/bin/uv export --frozen --all-groups --no-hashes --no-emit-project --format requirements-txt --quiet \
    >"$work/requirements.txt"
status=0
timeout "$AUDIT_SECONDS" .venv/bin/pip-audit --requirement "$work/requirements.txt" --no-deps --disable-pip \
    --progress-spinner off --timeout 5 --format json --output "$work/report.json" >"$work/log" 2>&1 || status=$?

.venv/bin/python - "$status" "$AUDIT_SECONDS" "$work" <<'EOF'
import json
import re
import sys
from pathlib import Path

status, seconds, work = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
log = (work / "log").read_text(errors="replace")
report = work / "report.json"
# pip-audit's own connection errors, and the requests/urllib3 ones it lets through as a traceback.
NETWORK = re.compile(
    r"ConnectionError|ConnectTimeout|ReadTimeout|NameResolutionError|Failed to resolve|Max retries exceeded"
    r"|Could not connect|not redirecting properly|Connection refused|Network is unreachable|SSLError"
)


def could_not_run(why: str) -> None:
    print(f"audit: could not run, the locked packages are NOT audited: {why}")
    sys.exit(0)


def failed(why: str) -> None:
    print(f"audit: {why}", file=sys.stderr)
    sys.exit(1)


if status == 124:
    could_not_run(f"no answer from the vulnerability service within {seconds} s")
if not report.is_file() or report.stat().st_size == 0:
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    if status != 0 and NETWORK.search(log):
        cause = next((line for line in reversed(lines) if NETWORK.search(line)), lines[-1])
        could_not_run(f"the vulnerability service is unreachable ({cause[:300]})")
    sys.stderr.write(log)
    failed(f"pip-audit failed (exit {status}) without a report")

dependencies = json.loads(report.read_text())["dependencies"]
vulnerable = [dep for dep in dependencies if dep.get("vulns")]
skipped = [dep for dep in dependencies if "skip_reason" in dep]
audited = len(dependencies) - len(skipped)
if vulnerable:
    for dep in vulnerable:
        for vuln in dep["vulns"]:
            fixed_in = ", ".join(vuln.get("fix_versions") or []) or "no fixed release yet"
            aliases = f" ({', '.join(vuln['aliases'])})" if vuln.get("aliases") else ""
            print(f"audit: {dep['name']} {dep['version']}: {vuln['id']}{aliases}, fixed in {fixed_in}", file=sys.stderr)
    count = sum(len(dep["vulns"]) for dep in vulnerable)
    failed(f"{count} known vulnerabilities in {len(vulnerable)} locked packages: upgrade them (uv lock --upgrade-package NAME)")
if status != 0:
    sys.stderr.write(log)
    failed(f"pip-audit exited {status} without reporting a vulnerability")
if skipped and not audited:
    # pip-audit skips a package when PyPI's per-release JSON answers 404: for every one, nothing was audited.
    could_not_run(
        f"PyPI's per-release JSON API, which holds the advisories, answered 404 for all {len(skipped)} packages "
        f"(first: {skipped[0]['skip_reason']})"
    )
if skipped:
    names = ", ".join(f"{dep['name']}" for dep in skipped)
    print(f"audit: no known vulnerabilities in {audited} locked packages; {len(skipped)} could not be looked up: {names}")
else:
    print(f"audit: no known vulnerabilities in the {audited} locked packages")
EOF
