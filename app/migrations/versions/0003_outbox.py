"""Empty: the outbox and the email send record moved to Brownout's own history (its revision brownout_0003).

Revision ID: 0003
Revises: 0002

Kept so a database migrated before Brownout had its own history still finds its revision here.
"""

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
