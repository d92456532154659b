"""Ids derived from keys, payload hashes and the Dramatiq message format."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import dramatiq

from brownout._dispatch.envelope import APPLY_ACTOR, Envelope, command_id_for, entity_id_for, payload_hash


def test_ids_are_stable_and_scoped() -> None:
    assert command_id_for("create", "user:1", "k") == command_id_for("create", "user:1", "k")
    assert command_id_for("create", "user:1", "k") != command_id_for("create", "user:2", "k")
    assert command_id_for("create", "user:1", "k") != command_id_for("other", "user:1", "k")
    assert entity_id_for("create", "user:1", "k") != command_id_for("create", "user:1", "k")
    # a release must never change them: pin one value
    assert command_id_for("create_notification", "user:42", "abc") == uuid.UUID("0113e0e4-12e3-5d76-bd28-021facafda7e")


def test_payload_hash_ignores_key_order_but_not_values() -> None:
    assert payload_hash({"a": 1, "b": "x"}) == payload_hash({"b": "x", "a": 1})
    assert payload_hash({"a": 1}) != payload_hash({"a": 2})


def test_round_trip_through_a_dramatiq_message() -> None:
    envelope = Envelope(
        command_id=uuid.uuid4(),
        name="create_notification",
        version=1,
        scope="user:1",
        idempotency_key="k",
        client_key=True,
        payload={"user_id": 1},
        payload_hash=payload_hash({"user_id": 1}),
        entity_key="notification:x",
        entity_id=uuid.uuid4(),
        accepted_stamp=123456789,
        accepted_at=datetime(2026, 11, 29, tzinfo=UTC),
    )
    message = envelope.to_message("q")
    assert message.actor_name == APPLY_ACTOR and message.queue_name == "q"
    assert message.message_id == str(envelope.command_id)
    decoded = dramatiq.Message.decode(message.encode())
    assert Envelope.from_message(decoded) == envelope
