"""Dead letters: writes that failed for their own reason, kept until someone looks.

A message is dead-lettered when retrying cannot help: its payload does not
validate, it reuses a key with another body, it waited for a prerequisite or a
release too long, or the database refused it permanently. Dramatiq's own
dead-letter queue expires messages after 7 days, so they are kept in
PostgreSQL instead, whole (the Dramatiq message as JSON), with the reason, for
`BROWNOUT_DEAD_LETTER_RETENTION_DAYS` (90). `brownout dead-letters`
lists, shows, replays (publishes the message again once the cause is fixed,
its replay count one higher: the apply step's idempotency makes a double replay
harmless, and a replay that fails again is a dead letter of its own) and
purges them.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import timedelta
from typing import Any

import dramatiq
from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from brownout._db import classify, describe
from brownout._dispatch.envelope import APPLY_ACTOR
from brownout._dispatch.waiting import fresh_options
from brownout._schema import dead_letters

MAX_REASON = 2000
REPLAYS_OPTION = "brownout_replays"
"""How many times the message was replayed from here: its dead letter's attempt, so storing it is idempotent
per delivery (a replay republishes the same message id) and a replay that fails again is a new row."""


def attempt_of(message: dramatiq.Message[Any]) -> int:
    replays = message.options.get(REPLAYS_OPTION, 0)
    return replays if isinstance(replays, int) and not isinstance(replays, bool) and replays >= 0 else 0


def store(session: Session, message: dramatiq.Message[Any], reason: str) -> int:
    """Keep *message* with *reason*; commit; return the dead letter's id.

    Idempotent: storing the same message and attempt again (a retry after a COMMIT whose outcome was
    lost) returns the row already there. A message PostgreSQL refuses as JSON (a lone surrogate, NaN:
    published by hand or by another client) is kept as text, ASCII only (`TEXT_KEY`): a write that
    failed must never fail its own dead-lettering for what it holds."""
    raw = message.asdict()
    body = _storable(raw)
    if body != raw:
        reason += " (NUL characters in the message are kept as the text \\u0000)"
    try:
        with session.begin_nested():
            row_id = _insert(session, message, body, reason)
    except Exception as exc:
        if classify(exc).is_transient:
            raise
        text = json.dumps(raw, ensure_ascii=True, default=repr)
        refused = f"{reason} (kept as text: PostgreSQL refused it as JSON: {describe(exc)})"
        row_id = _insert(session, message, {TEXT_KEY: text}, refused)
    session.commit()
    return row_id


def reason_summary(reason: str) -> str:
    """A dead letter's reason as a caller may see it: Brownout's own words, before the first ": ".

    What follows quotes the driver, the SMTP server or the validator: hosts, users, row values, the
    payload's own text. It stays in `dead_letters` (and `brownout dead-letters show`) for the operator."""
    return reason.partition(": ")[0].partition(" (")[0]


def command_name(message: dramatiq.Message[Any]) -> str | None:
    """The command's name as a queued write's envelope says it (its `name`), None for another actor's message
    (an email job) or one whose envelope is not a mapping. Unchecked: a message that does not validate can hold
    anything there."""
    if message.actor_name != APPLY_ACTOR:
        return None
    args = message.args
    first = args[0] if isinstance(args, list | tuple) and args else None
    name = first.get("name") if isinstance(first, dict) else None
    return name if isinstance(name, str) else None


TEXT_KEY = "text"
"""A dead letter kept as text holds ``{"text": <the message as ASCII JSON>}``: shown, not replayable as is."""


def _insert(session: Session, message: dramatiq.Message[Any], body: dict[str, Any], reason: str) -> int:
    message_id, attempt = _text(message.message_id), attempt_of(message)
    row_id = session.execute(
        insert(dead_letters)
        .values(
            message_id=message_id,
            attempt=attempt,
            queue_name=_text(message.queue_name),
            actor_name=_text(message.actor_name),
            message=body,
            reason=_text(reason)[:MAX_REASON],
        )
        .on_conflict_do_nothing(constraint="dead_letters_message_attempt")
        .returning(dead_letters.c.id)
    ).scalar_one_or_none()
    if row_id is None:
        row_id = session.execute(
            select(dead_letters.c.id).where(dead_letters.c.message_id == message_id, dead_letters.c.attempt == attempt)
        ).scalar_one()
    return int(row_id)


def kept_as_text(row: dict[str, Any]) -> bool:
    return set(row["message"]) == {TEXT_KEY}


def _text(value: Any) -> str:
    """A text column's value that PostgreSQL always takes: NUL and what UTF-8 cannot hold written out."""
    return str(value).replace("\x00", "\\u0000").encode("utf-8", "backslashreplace").decode("utf-8")


def for_replay(row: dict[str, Any]) -> dramatiq.Message[Any]:
    """The dead letter's message as it is published again: the same message, one replay more, its wait
    (src/brownout/_dispatch/waiting.py) starting afresh."""
    message = as_message(row)
    # dataclasses.replace, not Message.copy: copy merges options, and the wait's options must go.
    return dataclasses.replace(message, options={**fresh_options(message.options), REPLAYS_OPTION: attempt_of(message) + 1})


def _storable(value: Any) -> Any:
    """*value* with NUL written out: JSONB refuses ``\\u0000``, and a message holding one (queued by a
    release that let it through, or published by hand) must still be kept, not fail its dead-lettering."""
    if isinstance(value, str):
        return value.replace("\x00", "\\u0000")
    if isinstance(value, dict):
        return {_storable(key): _storable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_storable(item) for item in value)
    return value


def listing(session: Session, *, limit: int = 50) -> list[dict[str, Any]]:
    rows = session.execute(
        select(
            dead_letters.c.id,
            dead_letters.c.message_id,
            dead_letters.c.reason,
            dead_letters.c.failed_at,
            dead_letters.c.replayed_at,
        )
        .order_by(dead_letters.c.id.desc())
        .limit(limit)
    ).mappings()
    return [dict(row) for row in rows]


def fetch(session: Session, dead_letter_id: int) -> dict[str, Any] | None:
    row = session.execute(select(dead_letters).where(dead_letters.c.id == dead_letter_id)).mappings().one_or_none()
    return None if row is None else dict(row)


def as_message(row: dict[str, Any]) -> dramatiq.Message[Any]:
    return dramatiq.Message(**row["message"])


def mark_replayed(session: Session, dead_letter_id: int) -> None:
    session.execute(dead_letters.update().where(dead_letters.c.id == dead_letter_id).values(replayed_at=func.now()))
    session.commit()


def purge(session: Session, *, older_than: timedelta) -> int:
    deleted = session.execute(delete(dead_letters).where(dead_letters.c.failed_at < func.now() - older_than)).rowcount  # type: ignore[attr-defined]
    session.commit()
    return int(deleted)


def count_unreplayed(session: Session) -> int:
    """Dead letters nobody has replayed yet (the metric `brownout_dead_letters`)."""
    return int(
        session.execute(select(func.count()).select_from(dead_letters).where(dead_letters.c.replayed_at.is_(None))).scalar_one()
    )
