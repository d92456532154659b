"""Tables, as SQLAlchemy Core: what the code reads and writes, and what the migrations must add up to.

The migrations in app/migrations state their own DDL, frozen as of each revision (they never import
this module); tests/integration/test_migrations.py checks that head equals these tables. A change here
needs a new revision (`alembic revision --autogenerate`, then read and freeze what it wrote).

`notifications` is the reference domain. `applied_commands` records every
write applied (its key, payload hash, acceptance stamp and apply sequence),
which is what makes a write take effect once and lets order be audited;
`command_conflicts` keeps writes refused for reusing a key with another body.
`outbox` holds side effects (notification emails) written in the same
transaction as the notification, for the worker's relay to publish;
`email_sends` records each email handed to the SMTP server (see worker/email.py).
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import (
    BigInteger,
    Boolean,
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

notifications = Table(
    "notifications",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("user_id", BigInteger, nullable=False),
    Column("email", Text, nullable=False),
    Column("subject", Text, nullable=False),
    Column("body", Text, nullable=False),
    Column("read", Boolean, nullable=False, server_default="false"),
    # Stamp of the write that last set `read` (0: never set): last writer wins.
    Column("read_stamp", BigInteger, nullable=False, server_default="0"),
    Column("created_at", DateTime(timezone=True), nullable=False),  # acceptance time
    Column("applied_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("notifications_user_recent", "user_id", "created_at", "id"),
)

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
    # The message's replay count (app/dispatch/dead_letters.py): one row per message and attempt, so storing
    # a dead letter again after a lost COMMIT finds the row, and a replay that fails again is a row of its own.
    Column("attempt", Integer, nullable=False, server_default="0"),
    UniqueConstraint("message_id", "attempt", name="dead_letters_message_attempt"),
)

outbox = Table(
    "outbox",
    metadata,
    # uuid5 of the kind and the notification id (app/dispatch/outbox.py): a replayed
    # creation finds the row already there, and the relay's job carries it as message id.
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("notification_id", UUID(as_uuid=True), nullable=False),
    Column("kind", Text, nullable=False),  # "email"
    Column("payload", JSONB, nullable=False),  # email: notification_id, to, subject, body
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("published_at", DateTime(timezone=True), nullable=True),  # NULL: not yet handed to RabbitMQ
    Index("outbox_unpublished", "created_at", postgresql_where=text("published_at IS NULL")),
    # A relay's claim on an unpublished row while it publishes it (worker/outbox.py): no row lock is held
    # across that network I/O; a claim that outlives its relay expires and the row is relayed again.
    Column("claimed_until", DateTime(timezone=True), nullable=True),
    # Set by the email job with its send record: a row published and never sent is published again
    # (worker/outbox.py), found through this partial index among the few that are.
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

MIGRATIONS = Path(__file__).parent / "migrations"


def upgrade_database(database_url: str, revision: str = "head") -> None:
    """`alembic upgrade head` against *database_url* (what the Procfile's release line runs)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["database_url"] = database_url
    command.upgrade(config, revision)
