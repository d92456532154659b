"""Notifications, applied commands, command conflicts.

Revision ID: 0001
Revises:
"""

from alembic import op

from app.schema import applied_commands, apply_sequence, command_conflicts, notifications

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    apply_sequence.create(bind)
    for table in (notifications, applied_commands, command_conflicts):
        table.create(bind)


def downgrade() -> None:
    bind = op.get_bind()
    for table in (command_conflicts, applied_commands, notifications):
        table.drop(bind)
    apply_sequence.drop(bind)
