"""Empty: dead letter attempts moved to Brownout's own history (its revision brownout_0004).

Revision ID: 0004
Revises: 0003

Kept so a database migrated before Brownout had its own history still finds its revision here.
"""

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
