"""Outbox claims: the relay claims rows in a short transaction instead of locking them while it publishes.

Revision ID: brownout_0005
Revises: brownout_0004

The DDL is written out as of this revision, never taken from brownout._schema.
"""

import sqlalchemy as sa
from alembic import op

revision = "brownout_0005"
down_revision = "brownout_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("outbox", sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("outbox", "claimed_until")
