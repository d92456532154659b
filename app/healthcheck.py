"""The image's health check: `python -m app.healthcheck`, true for whichever Procfile process runs in the container.

One image runs every process type, but a Docker HEALTHCHECK is fixed per image: `run-procfile` records the
type it starts (in ``BROWNOUT_PROCESS_TYPE_FILE``) and this probe asks the endpoint that type serves. The web
is alive when ``/health`` answers on ``$PORT`` (never ``/ready``: an outage of the database or RabbitMQ must not
mark a container unhealthy that is built to serve through it); the worker when the ``/health`` of its metrics
server answers on ``BROWNOUT_METRICS_PORT`` (its ``/metrics`` needs a key); a release (migration) container is a
one-shot job, healthy while it runs.

Standard library and environment only: no settings validation, no import of the service, so the probe costs
a few milliseconds and cannot fail for a reason other than the process not answering.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path

PROCESS_TYPE_FILE = "/tmp/brownout-process-type"  # noqa: S108 - the image's own marker, written by run-procfile inside the container; only read here
TIMEOUT_SECONDS = 4.0


def probe_url(process_type: str, environ: dict[str, str] | os._Environ[str]) -> str | None:
    """The URL that says *process_type* is alive, or None when there is nothing to ask."""
    if process_type == "worker":
        return f"http://127.0.0.1:{environ.get('BROWNOUT_METRICS_PORT', '9191')}/health"
    if process_type == "release":
        return None
    # The web, and an image started with a command of someone's own: the image's default process.
    return f"http://127.0.0.1:{environ.get('PORT', '8000')}/health"


def recorded_process_type(environ: dict[str, str] | os._Environ[str]) -> str:
    path = Path(environ.get("BROWNOUT_PROCESS_TYPE_FILE", PROCESS_TYPE_FILE))
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return "web"


def main() -> int:
    process_type = recorded_process_type(os.environ)
    url = probe_url(process_type, os.environ)
    if url is None:
        return 0
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:  # noqa: S310 (a loopback URL we built)
            response.read(1)
    except OSError as exc:
        print(f"brownout healthcheck: {process_type}: {url}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
