"""Applied commands and command conflicts: what makes a write take effect once, in order.

Revision ID: brownout_0001
Revises:

The DDL is written out as of this revision, never taken from brownout._schema: a migration must build the
same tables on every install, whatever the models say later.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "brownout_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(sa.schema.CreateSequence(sa.Sequence("applied_commands_apply_seq")))
    op.create_table(
        "applied_commands",
        sa.Column("command_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("idempotency_key", sa.Text(), nullable=False),
        sa.Column("payload_hash", sa.Text(), nullable=False),
        sa.Column("entity_key", sa.Text(), nullable=False),
        sa.Column("accepted_stamp", sa.BigInteger(), nullable=False),
        sa.Column("accepted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("apply_seq", sa.BigInteger(), nullable=False),
        sa.Column("applied_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("result", postgresql.JSONB(), nullable=False),
        sa.PrimaryKeyConstraint("command_id", name="applied_commands_pkey"),
        sa.UniqueConstraint("apply_seq", name="applied_commands_apply_seq_key"),
    )
    op.create_index("applied_commands_entity_order", "applied_commands", ["entity_key", "apply_seq"])
    op.create_index("applied_commands_applied_at", "applied_commands", ["applied_at"])
    op.create_table(
        "command_conflicts",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("command_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("payload_hash", sa.Text(), nullable=False),
        sa.Column("first_payload_hash", sa.Text(), nullable=False),
        sa.Column("envelope", postgresql.JSONB(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name="command_conflicts_pkey"),
    )
    op.create_index("ix_command_conflicts_command_id", "command_conflicts", ["command_id"])


def downgrade() -> None:
    op.drop_table("command_conflicts")
    op.drop_table("applied_commands")
    op.execute(sa.schema.DropSequence(sa.Sequence("applied_commands_apply_seq")))
