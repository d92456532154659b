"""User ids become text: end users are named by Supabase Auth (UUIDs) or another issuer, not by a number.

Revision ID: 0007
Revises: 0006

In place: every bigint becomes its decimal string (`42` -> `'42'`, the same user to the code, whose scopes and
Redis keys already spelled it so). The table is rewritten under an ACCESS EXCLUSIVE lock, the list index
rebuilt with it; README, "Upgrading to string user ids", says what a running deployment sees meanwhile.
Down converts back only while every user id is a bigint's decimal form, and otherwise refuses.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# A bigint's decimal form, exactly: what text -> bigint -> text gives back unchanged.
_NOT_A_BIGINT = """
    SELECT count(*) FROM notifications
    WHERE NOT CASE WHEN user_id ~ '^-?[0-9]{1,19}$'
                   THEN user_id::numeric BETWEEN -9223372036854775808 AND 9223372036854775807
                        AND user_id::numeric::text = user_id
                   ELSE false END
"""


def upgrade() -> None:
    # Wait at most 5 s for the lock: behind a long transaction, every query of the table would queue behind
    # this one. Failing instead fails the deploy, and the running release carries on.
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.alter_column(
        "notifications",
        "user_id",
        type_=sa.Text(),
        existing_type=sa.BigInteger(),
        existing_nullable=False,
        postgresql_using="user_id::text",
    )


def downgrade() -> None:
    refused = op.get_bind().execute(sa.text(_NOT_A_BIGINT)).scalar_one()
    if refused:
        raise RuntimeError(
            f"0007 downgrade refused: {refused} notification(s) have a user id that is not a number, which a bigint "
            "column cannot hold; nothing was changed (delete or move those rows first)"
        )
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.alter_column(
        "notifications",
        "user_id",
        type_=sa.BigInteger(),
        existing_type=sa.Text(),
        existing_nullable=False,
        postgresql_using="user_id::bigint",
    )
