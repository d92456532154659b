"""Applied commands keep who submitted them: a command's status is shown to its issuer, not to every user.

Revision ID: brownout_0007
Revises: brownout_0006

Nullable: rows recorded before this revision, and writes queued by a release that did not say, have none.
The DDL is written out as of this revision, never taken from brownout._schema.
"""

import sqlalchemy as sa
from alembic import op

revision = "brownout_0007"
down_revision = "brownout_0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("applied_commands", sa.Column("caller", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("applied_commands", "caller")
