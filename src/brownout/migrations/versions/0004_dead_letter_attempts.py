"""Dead letters keyed by message and attempt: storing one is idempotent, a replay that fails again is a new row.

Revision ID: brownout_0004
Revises: brownout_0003

A replay republishes the same message id with its replay count in the message's options; the count is
the dead letter's attempt. Rows kept before this revision are numbered in the order they were written.
The DDL is written out as of this revision, never taken from brownout._schema.
"""

import sqlalchemy as sa
from alembic import op

revision = "brownout_0004"
down_revision = "brownout_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("dead_letters", sa.Column("attempt", sa.Integer(), server_default="0", nullable=False))
    op.execute(
        """
        UPDATE dead_letters AS d SET attempt = numbered.attempt
        FROM (SELECT id, row_number() OVER (PARTITION BY message_id ORDER BY id) - 1 AS attempt FROM dead_letters) AS numbered
        WHERE d.id = numbered.id AND numbered.attempt > 0
        """
    )
    op.create_unique_constraint("dead_letters_message_attempt", "dead_letters", ["message_id", "attempt"])
    op.drop_index("ix_dead_letters_message_id", table_name="dead_letters")


def downgrade() -> None:
    op.create_index("ix_dead_letters_message_id", "dead_letters", ["message_id"])
    op.drop_constraint("dead_letters_message_attempt", "dead_letters", type_="unique")
    op.drop_column("dead_letters", "attempt")
