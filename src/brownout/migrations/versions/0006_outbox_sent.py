"""Outbox rows know when their email was sent: the relay re-publishes a job that was published and never sent.

Revision ID: brownout_0006
Revises: brownout_0005

Rows whose email was sent before this revision take the time of their send record.
The DDL is written out as of this revision, never taken from brownout._schema.
"""

import sqlalchemy as sa
from alembic import op

revision = "brownout_0006"
down_revision = "brownout_0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("outbox", sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE outbox SET sent_at = s.sent_at FROM email_sends AS s WHERE s.outbox_id = outbox.id")
    op.create_index(
        "outbox_published_unsent",
        "outbox",
        ["published_at"],
        postgresql_where=sa.text("published_at IS NOT NULL AND sent_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("outbox_published_unsent", table_name="outbox")
    op.drop_column("outbox", "sent_at")
