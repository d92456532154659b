"""Dead letters kept in PostgreSQL (Dramatiq's own expire after 7 days).

Revision ID: brownout_0002
Revises: brownout_0001

The DDL is written out as of this revision, never taken from brownout._schema.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "brownout_0002"
down_revision = "brownout_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("message_id", sa.Text(), nullable=False),
        sa.Column("queue_name", sa.Text(), nullable=False),
        sa.Column("actor_name", sa.Text(), nullable=False),
        sa.Column("message", postgresql.JSONB(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("failed_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("replayed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="dead_letters_pkey"),
    )
    op.create_index("ix_dead_letters_message_id", "dead_letters", ["message_id"])


def downgrade() -> None:
    op.drop_table("dead_letters")
