"""The audit trail and operators' feedback record the name of the API key that acted (roles).

Revision ID: 0004
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table_name in ("audit", "feedback"):
        with op.batch_alter_table(table_name) as table:
            table.add_column(sa.Column("actor", sa.String(100), nullable=True))


def downgrade() -> None:
    for table_name in ("audit", "feedback"):
        with op.batch_alter_table(table_name) as table:
            table.drop_column("actor")
