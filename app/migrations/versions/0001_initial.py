"""Notifications.

Revision ID: 0001
Revises:

The DDL is written out as of this revision, never taken from app.schema: a migration must build the
same tables on every install, whatever the models say later. Brownout's own tables (applied commands,
conflicts, dead letters, the outbox) are in Brownout's migrations, with their own version table.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "notifications",
        sa.Column("id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("email", sa.Text(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("read", sa.Boolean(), server_default="false", nullable=False),
        sa.Column("read_stamp", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("applied_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name="notifications_pkey"),
    )
    op.create_index("notifications_user_recent", "notifications", ["user_id", "created_at", "id"])


def downgrade() -> None:
    op.drop_table("notifications")
