"""Empty: the outbox's sent time moved to Brownout's own history (its revision brownout_0006).

Revision ID: 0006
Revises: 0005

Kept so a database migrated before Brownout had its own history still finds its revision here.
"""

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
