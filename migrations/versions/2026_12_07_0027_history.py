"""Entity history: `history_name_changes` keeps the names a blueprint's properties and
relations had (renamed or removed), so events recorded under a former name are read under
today's; entity events themselves are never rewritten. Append-only for tenants, like the
events.

Revision ID: 0027
Revises: 0026
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from app.db import rls

revision: str = "0027"
down_revision: str | None = "0026"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "history_name_changes",
        sa.Column("org_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("blueprint", sa.String(100), nullable=False),
        sa.Column("kind", sa.String(10), nullable=False),
        sa.Column("old_name", sa.String(100), nullable=False),
        sa.Column("new_name", sa.String(100), nullable=True),
        sa.Column(
            "at",
            sa.DateTime(timezone=True),
            server_default=sa.text("clock_timestamp()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name="fk_history_name_changes_org_id_organizations",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("org_id", "id", name="pk_history_name_changes"),
    )
    op.create_index(
        "ix_history_name_changes_blueprint",
        "history_name_changes",
        ["org_id", "blueprint", "id"],
    )
    for statement in rls.fence_table("history_name_changes", privileges="SELECT, INSERT"):
        op.execute(statement)


def downgrade() -> None:
    op.drop_index("ix_history_name_changes_blueprint", table_name="history_name_changes")
    op.drop_table("history_name_changes")
