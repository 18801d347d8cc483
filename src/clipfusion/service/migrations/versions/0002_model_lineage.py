"""Model versions remember the version they were learned from (for rollback).

Revision ID: 0002
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as table:
        table.add_column(sa.Column("parent_id", sa.Integer, nullable=True))
        table.create_foreign_key("fk_model_versions_parent", "model_versions", ["parent_id"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("model_versions") as table:
        table.drop_constraint("fk_model_versions_parent", type_="foreignkey")
        table.drop_column("parent_id")
