"""Dead letters in PostgreSQL: one row per message and attempt; a replay that fails again is a new row."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import dramatiq
from sqlalchemy import func, select

from app.schema import upgrade_database
from brownout._db import Database
from brownout._dispatch import dead_letters
from brownout._schema import dead_letters as table
from tests.conftest import database_url
from tests.support.cli import dead_letters_cli_run


def test_storing_is_idempotent_per_attempt_and_a_replay_is_a_new_attempt(
    make_database: Callable[..., Database], pg_database: str
) -> None:
    upgrade_database(database_url(pg_database))
    db = make_database()
    message = dramatiq.Message(queue_name="q", actor_name="a", args=({"x": 1},), kwargs={}, options={})
    with db.session() as s:
        first = dead_letters.store(s, message, "bad payload")
        again = dead_letters.store(s, message, "bad payload (stored again after a lost COMMIT)")
        assert again == first
        row = dead_letters.fetch(s, first)
        assert row is not None
        dead_letters.mark_replayed(s, first)
        replayed = dead_letters.for_replay(row)
        assert replayed.message_id == message.message_id and replayed.options[dead_letters.REPLAYS_OPTION] == 1
        second = dead_letters.store(s, replayed, "failed again")
        assert second != first
        assert dead_letters.count_unreplayed(s) == 1  # the new failure shows, though the message was replayed
        assert dead_letters.for_replay(dead_letters.fetch(s, second) or {}).options[dead_letters.REPLAYS_OPTION] == 2
        assert s.execute(select(func.count()).select_from(table)).scalar_one() == 2


def test_a_message_postgresql_refuses_as_json_is_kept_as_text_and_not_replayed_blindly(
    make_database: Callable[..., Database], make_settings: Callable[..., Any], pg_database: str, capsys: Any
) -> None:
    upgrade_database(database_url(pg_database))
    db = make_database()
    message = dramatiq.Message(queue_name="q", actor_name="a", args=({"body": "a\ud800b", "ratio": math.nan},),
                               kwargs={}, options={})  # fmt: skip
    with db.session() as s:
        kept = dead_letters.store(s, message, "error while applying it: UnicodeEncodeError")
        assert dead_letters.store(s, message, "again, after a lost COMMIT") == kept
        row = dead_letters.fetch(s, kept)
    assert row is not None and dead_letters.kept_as_text(row)
    assert "kept as text: PostgreSQL refused it as JSON" in row["reason"]
    assert json.loads(row["message"]["text"])["args"][0]["body"] == "a\ud800b", "the text holds the message whole"

    settings = make_settings(rabbitmq_url="amqp://guest:guest@127.0.0.1:5672/%2F")
    assert dead_letters_cli_run(settings, db, ["dead-letters", "replay", str(kept)]) == 1
    assert "kept as text" in capsys.readouterr().out
    assert dead_letters_cli_run(settings, db, ["dead-letters", "show", str(kept)]) == 0
    assert "\\\\ud800" in capsys.readouterr().out
    with db.session() as s:
        assert dead_letters.fetch(s, kept)["replayed_at"] is None  # type: ignore[index]
