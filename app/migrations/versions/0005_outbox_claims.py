"""Empty: outbox claims moved to Brownout's own history (its revision brownout_0005).

Revision ID: 0005
Revises: 0004

Kept so a database migrated before Brownout had its own history still finds its revision here.
"""

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
