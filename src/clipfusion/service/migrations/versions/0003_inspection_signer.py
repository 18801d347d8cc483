"""Inspections record the trusted key that signed the model which decided them (``--trusted-keys``).

Revision ID: 0003
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("inspections") as table:
        table.add_column(sa.Column("signer", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("inspections") as table:
        table.drop_column("signer")
