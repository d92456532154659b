"""The web dyno: `python -m app.api.serve` (the Procfile's web line).

Prepares the metrics folder shared by the uvicorn worker processes (it must
exist before any of them imports prometheus_client), then becomes uvicorn:
`BROWNOUT_WEB_PROCESSES` processes on `$PORT`.
"""

from __future__ import annotations

import os
import sys

from brownout import _metrics_dir as metrics_dir
from brownout._observability.logs import configure_logging
from brownout._pool_budget import warn_if_over_budget
from brownout._settings import ConfigurationError, load_settings


def command(port: str, processes: int) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", "--factory", "app.api.main:app_from_environment",
        "--host", "0.0.0.0", "--port", port, "--workers", str(processes),
        "--proxy-headers", "--timeout-graceful-shutdown", "10", "--no-server-header",
    ]  # fmt: skip


def main() -> None:
    try:
        settings = load_settings()
    except ConfigurationError as exc:
        sys.exit(f"brownout web: {exc}")
    configure_logging(settings)
    warn_if_over_budget(settings)  # the whole fleet's pools against the pooler's limit, said once per dyno
    metrics_dir.prepare("brownout-web-metrics-")
    argv = command(os.environ.get("PORT", "8000"), settings.web_processes)
    os.execv(sys.executable, argv)


if __name__ == "__main__":
    main()
