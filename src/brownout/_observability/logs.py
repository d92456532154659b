"""Logging for every entry point: text or JSON lines, a production and a dev profile.

Same values everywhere, more detail in dev (staging mirrors production,
with more logging): `BROWNOUT_LOG_PROFILE=dev` turns Brownout's own
loggers to DEBUG. `BROWNOUT_LOG_FORMAT=json` writes one JSON object per line
(python-json-logger), for log pipelines. The lines operators watch for:
breaker transitions (brownout._db.circuit_breaker), pool invalidations
(brownout._db.engine), and the degraded modes below, entered and left.
"""

from __future__ import annotations

import logging
import sys

from brownout._db import BreakerListener, BreakerState, CircuitBreaker
from brownout._observability.log_masking import MaskingJsonFormatter, install_log_masking
from brownout._settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
OWN_LOGGERS = ("brownout",)  # a service sets its own loggers' levels: a library does not
QUIET_LOGGERS = {"pika": logging.CRITICAL}  # pika logs an ERROR and a trace per failed connect; the publisher says it once


def configure_logging(settings: Settings, *, stream: object = None) -> None:
    """One handler on the root logger, and secrets masked in every record of the process."""
    install_log_masking()
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    if settings.log_format == "json":
        handler.setFormatter(
            MaskingJsonFormatter(
                "{asctime}{levelname}{name}{message}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    own_level = logging.DEBUG if settings.log_profile == "dev" else logging.INFO
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(own_level)
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


class DegradedModeLog(BreakerListener):
    """One line when the service enters a degraded mode, one when it leaves it."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or logging.getLogger("brownout.degraded")

    def on_transition(self, breaker: CircuitBreaker, old: BreakerState, new: BreakerState) -> None:
        if new is BreakerState.OPEN and old is BreakerState.CLOSED:
            self._log.warning(
                "degraded mode entered: database breaker open; writes are queued, reads served stale from the cache",
                extra={"breaker": breaker.name, "mode": "degraded"},
            )
        elif new is BreakerState.CLOSED:
            self._log.warning(
                "degraded mode left: database breaker closed; writes applied directly, reads fresh",
                extra={"breaker": breaker.name, "mode": "normal"},
            )
