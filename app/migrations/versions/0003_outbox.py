"""Outbox (notification emails written with the notification) and the email send record.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

from app.schema import email_sends, outbox

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    outbox.create(bind)
    email_sends.create(bind)


def downgrade() -> None:
    bind = op.get_bind()
    email_sends.drop(bind)
    outbox.drop(bind)
