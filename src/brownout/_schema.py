"""Brownout's own tables, as SQLAlchemy Core: what its write path reads and writes.

`applied_commands` records every write applied (its key, payload hash, acceptance stamp and apply sequence),
which is what makes a write take effect once and lets order be audited; `command_conflicts` keeps writes
refused for reusing a key with another body; `dead_letters` the queued writes that failed for their own
reason; `outbox` holds side effects (emails) written in the same transaction as the write they belong to, for
the worker's relay to publish; `email_sends` records each email handed to the mail server.

Their migrations are in brownout/migrations, with a version table of their own; a service's tables stay
on its own MetaData and in its own history.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    MetaData,
    Sequence,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

metadata = MetaData()
apply_sequence = Sequence("applied_commands_apply_seq", metadata=metadata)

applied_commands = Table(
    "applied_commands",
    metadata,
    Column("command_id", UUID(as_uuid=True), primary_key=True),
    Column("name", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("scope", Text, nullable=False),
    Column("idempotency_key", Text, nullable=False),
    Column("payload_hash", Text, nullable=False),
    Column("entity_key", Text, nullable=False),
    Column("accepted_stamp", BigInteger, nullable=False),
    Column("accepted_at", DateTime(timezone=True), nullable=False),
    # Drawn after the effect, while the entity's row lock is held: for one
    # entity, apply_seq order is the order in which writes took effect.
    Column("apply_seq", BigInteger, nullable=False, unique=True),
    Column("applied_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("path", Text, nullable=False),  # "direct" or "queued"
    Column("outcome", Text, nullable=False),  # "applied" or "superseded"
    Column("result", JSONB, nullable=False),
    # Who submitted it (a key's NAME, `user:<id>`): whom GET /commands/{id} answers. NULL before it was kept.
    Column("caller", Text, nullable=True),
    Index("applied_commands_entity_order", "entity_key", "apply_seq"),
    Index("applied_commands_applied_at", "applied_at"),
)

command_conflicts = Table(
    "command_conflicts",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("command_id", UUID(as_uuid=True), nullable=False, index=True),
    Column("payload_hash", Text, nullable=False),
    Column("first_payload_hash", Text, nullable=False),
    Column("envelope", JSONB, nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("message_id", Text, nullable=False),
    Column("queue_name", Text, nullable=False),
    Column("actor_name", Text, nullable=False),
    Column("message", JSONB, nullable=False),  # the whole Dramatiq message, replayable as is
    Column("reason", Text, nullable=False),
    Column("failed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("replayed_at", DateTime(timezone=True), nullable=True),
    # The message's replay count (src/brownout/_dispatch/dead_letters.py): one row per message and attempt, so storing
    # a dead letter again after a lost COMMIT finds the row, and a replay that fails again is a row of its own.
    Column("attempt", Integer, nullable=False, server_default="0"),
    UniqueConstraint("message_id", "attempt", name="dead_letters_message_attempt"),
)

outbox = Table(
    "outbox",
    metadata,
    # uuid5 of the kind and the entity id (src/brownout/_dispatch/outbox.py): a replayed
    # creation finds the row already there, and the relay's job carries it as message id.
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("notification_id", UUID(as_uuid=True), nullable=False),
    Column("kind", Text, nullable=False),  # "email"
    Column("payload", JSONB, nullable=False),  # email: notification_id, to, subject, body
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("published_at", DateTime(timezone=True), nullable=True),  # NULL: not yet handed to RabbitMQ
    Index("outbox_unpublished", "created_at", postgresql_where=text("published_at IS NULL")),
    # A relay's claim on an unpublished row while it publishes it (src/brownout/_worker/outbox.py): no row lock is held
    # across that network I/O; a claim that outlives its relay expires and the row is relayed again.
    Column("claimed_until", DateTime(timezone=True), nullable=True),
    # Set by the email job with its send record: a row published and never sent is published again
    # (src/brownout/_worker/outbox.py), found through this partial index among the few that are.
    Column("sent_at", DateTime(timezone=True), nullable=True),
    Index("outbox_published_unsent", "published_at", postgresql_where=text("published_at IS NOT NULL AND sent_at IS NULL")),
)

email_sends = Table(
    "email_sends",
    metadata,
    Column("message_id", Text, primary_key=True),  # the email's Message-ID header: one send per message
    Column("outbox_id", UUID(as_uuid=True), nullable=False),
    Column("notification_id", UUID(as_uuid=True), nullable=False),
    Column("recipient", Text, nullable=False),
    Column("sent_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)
