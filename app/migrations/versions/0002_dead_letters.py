"""Dead letters kept in PostgreSQL (Dramatiq's own expire after 7 days).

Revision ID: 0002
Revises: 0001
"""

from alembic import op

from app.schema import dead_letters

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    dead_letters.create(op.get_bind())


def downgrade() -> None:
    dead_letters.drop(op.get_bind())
