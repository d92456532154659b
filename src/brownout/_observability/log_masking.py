"""Secrets and email addresses masked in every log record where it is made, whatever logger or handler writes it.

Masking at call sites leaks from the first line someone forgets, and a filter
on handlers misses the ones installed after it (uvicorn's and Dramatiq's
logging set-up add their own). The record factory is the one point every
record passes through, so it is wrapped here: the message, its arguments, the
formatted exception and the stack are masked before any handler sees them, and
a Dramatiq message is named by its actor and id instead of its arguments:
passed alone (a Message, a MessageProxy, the worker's batch of deliveries),
inside a list, tuple or dict, or already formatted into the text
(`Message(... args=...)`, masked by `redact`); an actor's own DEBUG line
(`Received args=%r kwargs=%r.`) keeps none of its arguments. A bytes argument
is masked as it prints (an SMTP reply names the address it refuses).
Fields passed with `extra=` are set on the record after the factory runs; the
JSON formatter of `configure_logging` masks those (`MaskingJsonFormatter`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from brownout._redaction import MASK, redact

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


# Dramatiq's per-actor logger (`<module>.<actor name>`: under `brownout.` for our actors) says what each call
# received, at DEBUG: a write's or an email's whole payload. The line stays, its arguments do not.
_ACTOR_RECEIVED = "Received args=%r kwargs=%r."
_MESSAGE_TYPES = ("Message", "MessageProxy")
_CONTAINER_DEPTH = 3


class Named:
    """What stands for a masked argument: its text alone under %s and %r alike (no quotes added)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text

    __str__ = __repr__


def mask_record(record: logging.LogRecord) -> None:
    record.msg = _masked(record.msg)
    if record.msg == _ACTOR_RECEIVED and isinstance(record.args, tuple) and len(record.args) == 2:
        record.args = (Named(MASK), Named(MASK))
    elif isinstance(record.args, Mapping):
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
    if isinstance(value, bytes):
        if b"@" not in value and b"%40" not in value:
            return value
        masked_bytes = redact(repr(value))  # what %s and %r print, `\xc3\xab` escapes included
        return value if masked_bytes == repr(value) else Named(masked_bytes)
    if isinstance(value, _PLAIN):
        return value
    if _is_queued_message(value):
        # Dramatiq logs a failed message as `actor({...its arguments...})`: a write's or an email's
        # whole payload (addresses, subjects, bodies). Named by actor and id, it is still findable.
        return Named(_message_name(value))
    if isinstance(value, list | tuple | set | frozenset | dict) and _holds_message(value, _CONTAINER_DEPTH):
        return Named(redact(str(_named_messages(value, _CONTAINER_DEPTH))))
    text = str(value)  # an exception, a URL object, a dict: what %s would print
    masked = redact(text)
    return value if masked == text else masked


def _is_queued_message(value: Any) -> bool:
    """A Dramatiq Message or MessageProxy, or a subclass of either (the worker's DeliveryBatch)."""
    kind = type(value)
    known = _MESSAGE_KINDS.get(kind)
    if known is None:
        known = _MESSAGE_KINDS[kind] = any(
            base.__module__.startswith("dramatiq") and base.__name__ in _MESSAGE_TYPES for base in kind.__mro__
        )
    return known


_MESSAGE_KINDS: dict[type, bool] = {}


def _message_name(message: Any) -> str:
    if getattr(type(message), "log_safe_repr", False):  # our own batch: its repr names deliveries, not payloads
        return repr(message)
    args: Any = getattr(message, "args", ())
    batch = args[0] if len(args) == 1 and isinstance(args[0], list | tuple) else ()
    if batch and all(_is_queued_message(m) for m in batch):  # a batch actor's message: the messages it holds
        ids = ", ".join(str(m.message_id) for m in batch[:10])
        more = f" and {len(batch) - 10} more" if len(batch) > 10 else ""
        return f"{message.actor_name}(messages {ids}{more})"
    return f"{message.actor_name}(message {message.message_id})"


def _holds_message(value: Any, depth: int) -> bool:
    items = value.values() if isinstance(value, dict) else value
    for item in items:
        if _is_queued_message(item):
            return True
        if depth > 1 and isinstance(item, list | tuple | set | frozenset | dict) and _holds_message(item, depth - 1):
            return True
    return False


def _named_messages(value: Any, depth: int) -> Any:
    """*value* with every Dramatiq message in it (*depth* containers down) replaced by its name."""
    if _is_queued_message(value):
        return Named(_message_name(value))
    if depth <= 0 or not isinstance(value, list | tuple | set | frozenset | dict):
        return value
    if isinstance(value, dict):
        return {key: _named_messages(item, depth - 1) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(_named_messages(item, depth - 1) for item in value)
    return [_named_messages(item, depth - 1) for item in value]  # a list, or a set in some order


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
