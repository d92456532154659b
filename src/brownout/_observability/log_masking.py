"""Secrets and email addresses masked in every log record where it is made, whatever logger or handler writes it.

Masking at call sites leaks from the first line someone forgets, and a filter
on handlers misses the ones installed after it (uvicorn's and Dramatiq's
logging set-up add their own). The record factory is the one point every
record passes through, so it is wrapped here: the message, its arguments, the
formatted exception and the stack are masked before any handler sees them, and
a Dramatiq message is named by its actor and id instead of its arguments.
Fields passed with `extra=` are set on the record after the factory runs; the
JSON formatter of `configure_logging` masks those (`MaskingJsonFormatter`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from brownout._redaction import redact

_PLAIN = (int, float, bool, type(None), bytes)
_EXCEPTIONS = logging.Formatter()


def install_log_masking() -> None:
    """Mask every log record made from now on in this process (idempotent)."""
    current = logging.getLogRecordFactory()
    if getattr(current, "brownout_masking", False):
        return
    logging.setLogRecordFactory(_masking(current))


def _masking(make: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        mask_record(record)
        return record

    factory.brownout_masking = True  # type: ignore[attr-defined]
    return factory


def mask_record(record: logging.LogRecord) -> None:
    record.msg = _masked(record.msg)
    if isinstance(record.args, Mapping):
        record.args = {key: _masked(value) for key, value in record.args.items()}
    elif isinstance(record.args, tuple):
        # Each argument alone, types kept (uvicorn's access formatter unpacks them; %d needs an int).
        record.args = tuple(_masked(value) for value in record.args)
    if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
        record.exc_text = redact(_EXCEPTIONS.formatException(record.exc_info))
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


def _masked(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, _PLAIN):
        return value
    if _is_queued_message(value):
        # Dramatiq logs a failed message as `actor({...its arguments...})`: a write's or an email's
        # whole payload (addresses, subjects, bodies). Named by actor and id, it is still findable.
        return f"{value.actor_name}(message {value.message_id})"
    text = str(value)  # an exception, a URL object, a dict: what %s would print
    masked = redact(text)
    return value if masked == text else masked


def _is_queued_message(value: Any) -> bool:
    return type(value).__module__.startswith("dramatiq") and hasattr(value, "actor_name") and hasattr(value, "message_id")


class MaskingJsonFormatter(JsonFormatter):
    """JSON lines whose `extra=` fields, exception and stack are masked too."""

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        super().add_fields(log_data, record, message_dict)
        for key, value in log_data.items():
            if isinstance(value, str):
                log_data[key] = redact(value)

    def formatException(self, ei: Any) -> Any:  # noqa: N802 - logging's name
        formatted = super().formatException(ei)
        return redact(formatted) if isinstance(formatted, str) else [redact(line) for line in formatted]
