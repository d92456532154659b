"""Empty: dead letters moved to Brownout's own history (its revision brownout_0002).

Revision ID: 0002
Revises: 0001

Kept so a database migrated before Brownout had its own history still finds its revision here.
"""

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
