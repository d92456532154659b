"""The worker dyno: `python -m worker.serve` (the Procfile's worker line).

Prepares the metrics folder shared by the Dramatiq processes, then becomes
`dramatiq brownout._worker.main` with `BROWNOUT_WORKER_PROCESSES` processes of 8
threads on the command and email queues. SIGTERM (Railway's deploy): in-flight
applies get 10 s, then the rest goes back to RabbitMQ.
"""

from __future__ import annotations

import os
import sys

from brownout import _metrics_dir as metrics_dir
from brownout._observability.logs import configure_logging
from brownout._pool_budget import warn_if_over_budget
from brownout._settings import ConfigurationError, load_settings

THREADS = 8
SHUTDOWN_TIMEOUT_MS = 10_000


def command(processes: int, queues: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "dramatiq", "brownout._worker.main",
        "--processes", str(processes), "--threads", str(THREADS),
        "--worker-shutdown-timeout", str(SHUTDOWN_TIMEOUT_MS), "--skip-logging",
        "--queues", *queues,
    ]  # fmt: skip


def main() -> None:
    try:
        settings = load_settings()
    except ConfigurationError as exc:
        sys.exit(f"brownout worker: {exc}")
    configure_logging(settings)
    warn_if_over_budget(settings)  # the whole fleet's pools against the pooler's limit, said once per dyno
    metrics_dir.prepare("brownout-worker-metrics-")
    os.execv(sys.executable, command(settings.worker_processes, [settings.queue_name, settings.email_queue_name]))


if __name__ == "__main__":
    main()
