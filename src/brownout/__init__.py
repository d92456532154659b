"""Brownout: keep a FastAPI + SQLAlchemy service on PostgreSQL useful while its database is sick.

The public API is what `__all__` names here and in `brownout.fastapi` and `brownout.migrations`;
modules whose name starts with `_` are private and change without notice.

Names are imported on first use (PEP 562): `import brownout`, `brownout --version` and
`brownout --help` stay cheap, where importing every piece costs SQLAlchemy, Dramatiq and pika.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from brownout._version import __version__

if TYPE_CHECKING:
    from brownout._cache.pending_replay import PendingReplay
    from brownout._cache.read_cache import Entry, Lookup, ReadCache
    from brownout._cache.redis_link import RedisLink, RedisUnavailable, build_redis_link
    from brownout._cache.single_flight import SingleFlight
    from brownout._cache.stale_reads import CachedRead, DatabaseUnavailable, ReadResult, StaleReads, invalidate_after_apply
    from brownout._db import (
        BreakerState,
        BrownoutDbError,
        CircuitBreaker,
        CircuitOpenError,
        CommitOutcomeUnknown,
        Database,
        DeadlineExceeded,
        ErrorKind,
        HealthMonitor,
        Resilience,
        RetryPolicy,
        check_db_health,
        classify,
        execute_with_retry,
    )
    from brownout._dispatch.apply import KeyConflict
    from brownout._dispatch.bulk import recordset, rows_param
    from brownout._dispatch.commands import (
        Command,
        DependencyMissing,
        DependencyPending,
        Effect,
        NotPermitted,
        Refused,
        Registry,
        RegistryNotFound,
        UnknownCommand,
        load_registry,
    )
    from brownout._dispatch.dead_letters import reason_summary
    from brownout._dispatch.dispatcher import Applied, Dispatcher, InvalidCommand, Queued, Rejected
    from brownout._dispatch.envelope import Envelope
    from brownout._dispatch.outbox import add_email, email_row, emails_of
    from brownout._dispatch.publisher import Publisher, PublishRejected
    from brownout._fleet.read_only import ReadOnlyMode
    from brownout._observability.log_masking import install_log_masking
    from brownout._observability.logs import configure_logging
    from brownout._observability.metrics import Metrics
    from brownout._observability.sentry import init_sentry
    from brownout._schema import applied_commands, command_conflicts, dead_letters, metadata
    from brownout._settings import ConfigurationError, Settings, load_settings, normalise_database_url, settings_from_values
    from brownout._text import SafeLine, SafeText

# Each public name and the private module it lives in (the TYPE_CHECKING imports above say the same
# for type checkers; tests/unit/test_public_api.py holds the two together).
_EXPORTS: dict[str, str] = {
    # settings
    "ConfigurationError": "brownout._settings",
    "Settings": "brownout._settings",
    "load_settings": "brownout._settings",
    "normalise_database_url": "brownout._settings",
    "settings_from_values": "brownout._settings",
    # the database: breaker, retry, deadlines, health
    "BreakerState": "brownout._db",
    "BrownoutDbError": "brownout._db",
    "CircuitBreaker": "brownout._db",
    "CircuitOpenError": "brownout._db",
    "CommitOutcomeUnknown": "brownout._db",
    "Database": "brownout._db",
    "DeadlineExceeded": "brownout._db",
    "ErrorKind": "brownout._db",
    "HealthMonitor": "brownout._db",
    "Resilience": "brownout._db",
    "RetryPolicy": "brownout._db",
    "check_db_health": "brownout._db",
    "classify": "brownout._db",
    "execute_with_retry": "brownout._db",
    # writes as commands
    "Applied": "brownout._dispatch.dispatcher",
    "Command": "brownout._dispatch.commands",
    "DependencyMissing": "brownout._dispatch.commands",
    "DependencyPending": "brownout._dispatch.commands",
    "Dispatcher": "brownout._dispatch.dispatcher",
    "Effect": "brownout._dispatch.commands",
    "Envelope": "brownout._dispatch.envelope",
    "InvalidCommand": "brownout._dispatch.dispatcher",
    "KeyConflict": "brownout._dispatch.apply",
    "NotPermitted": "brownout._dispatch.commands",
    "Refused": "brownout._dispatch.commands",
    "PublishRejected": "brownout._dispatch.publisher",
    "Publisher": "brownout._dispatch.publisher",
    "Queued": "brownout._dispatch.dispatcher",
    "Rejected": "brownout._dispatch.dispatcher",
    "Registry": "brownout._dispatch.commands",
    "RegistryNotFound": "brownout._dispatch.commands",
    "UnknownCommand": "brownout._dispatch.commands",
    "load_registry": "brownout._dispatch.commands",
    "recordset": "brownout._dispatch.bulk",
    "rows_param": "brownout._dispatch.bulk",
    # read-only mode (POST /admin/mode, BROWNOUT_READ_ONLY): what Dispatcher.accept raises
    "ReadOnlyMode": "brownout._fleet.read_only",
    # side effects written with the write (the outbox)
    "reason_summary": "brownout._dispatch.dead_letters",
    "add_email": "brownout._dispatch.outbox",
    "email_row": "brownout._dispatch.outbox",
    "emails_of": "brownout._dispatch.outbox",
    # the cache
    "Entry": "brownout._cache.read_cache",
    "Lookup": "brownout._cache.read_cache",
    "PendingReplay": "brownout._cache.pending_replay",
    "ReadCache": "brownout._cache.read_cache",
    "RedisLink": "brownout._cache.redis_link",
    "RedisUnavailable": "brownout._cache.redis_link",
    "SingleFlight": "brownout._cache.single_flight",
    "CachedRead": "brownout._cache.stale_reads",
    "DatabaseUnavailable": "brownout._cache.stale_reads",
    "ReadResult": "brownout._cache.stale_reads",
    "StaleReads": "brownout._cache.stale_reads",
    "invalidate_after_apply": "brownout._cache.stale_reads",
    "build_redis_link": "brownout._cache.redis_link",
    # observability
    "Metrics": "brownout._observability.metrics",
    "configure_logging": "brownout._observability.logs",
    "install_log_masking": "brownout._observability.log_masking",
    "init_sentry": "brownout._observability.sentry",
    # text a caller sends
    "SafeLine": "brownout._text",
    "SafeText": "brownout._text",
    # Brownout's tables
    "applied_commands": "brownout._schema",
    "command_conflicts": "brownout._schema",
    "dead_letters": "brownout._schema",
    "metadata": "brownout._schema",
}

__all__ = [
    "Applied",
    "BreakerState",
    "BrownoutDbError",
    "CachedRead",
    "CircuitBreaker",
    "CircuitOpenError",
    "Command",
    "CommitOutcomeUnknown",
    "ConfigurationError",
    "Database",
    "DatabaseUnavailable",
    "DeadlineExceeded",
    "DependencyMissing",
    "DependencyPending",
    "Dispatcher",
    "Effect",
    "Entry",
    "Envelope",
    "ErrorKind",
    "HealthMonitor",
    "InvalidCommand",
    "KeyConflict",
    "Lookup",
    "Metrics",
    "NotPermitted",
    "PendingReplay",
    "PublishRejected",
    "Publisher",
    "Queued",
    "ReadCache",
    "ReadOnlyMode",
    "ReadResult",
    "RedisLink",
    "RedisUnavailable",
    "Refused",
    "Registry",
    "RegistryNotFound",
    "Rejected",
    "Resilience",
    "RetryPolicy",
    "SafeLine",
    "SafeText",
    "Settings",
    "SingleFlight",
    "StaleReads",
    "UnknownCommand",
    "__version__",
    "add_email",
    "applied_commands",
    "build_redis_link",
    "check_db_health",
    "classify",
    "command_conflicts",
    "configure_logging",
    "dead_letters",
    "email_row",
    "emails_of",
    "execute_with_retry",
    "init_sentry",
    "install_log_masking",
    "invalidate_after_apply",
    "load_registry",
    "load_settings",
    "metadata",
    "normalise_database_url",
    "reason_summary",
    "recordset",
    "rows_param",
    "settings_from_values",
]


if not TYPE_CHECKING:  # so that mypy reports `from brownout import Databse` instead of typing it Any

    def __getattr__(name: str) -> Any:
        module = _EXPORTS.get(name)
        if module is None:
            raise AttributeError(f"module 'brownout' has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # once: later lookups do not come back here
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
