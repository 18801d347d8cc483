"""An inspection remembers the Idempotency-Key of the request that made it, so that a client's retry
(``watch --server`` after a lost answer) gets the same inspection instead of a second one.

Revision ID: 0005
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("inspections") as table:
        table.add_column(sa.Column("idempotency_key", sa.String(200), nullable=True))
        table.create_index("ix_inspections_idempotency_key", ["idempotency_key"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("inspections") as table:
        table.drop_index("ix_inspections_idempotency_key")
        table.drop_column("idempotency_key")
