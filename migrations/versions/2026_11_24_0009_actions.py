"""Action definitions (self-service actions and automations).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from app.db import rls

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONB = postgresql.JSONB(astext_type=sa.Text())


def _ts(name: str) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)


def upgrade() -> None:
    op.create_table(
        "actions",
        sa.Column("org_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("identifier", sa.String(100), nullable=False),
        sa.Column("title", sa.String(200), nullable=True),
        sa.Column("icon", sa.String(200), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("trigger", JSONB, nullable=False),
        sa.Column("invocation_method", JSONB, nullable=False),
        sa.Column("required_approval", JSONB, nullable=False),
        sa.Column("approval_notification", JSONB, nullable=True),
        sa.Column("publish", sa.Boolean(), nullable=False),
        sa.Column("allow_anyone_to_view_runs", sa.Boolean(), nullable=True),
        _ts("created_at"),
        sa.Column("created_by", sa.String(200), nullable=False),
        _ts("updated_at"),
        sa.Column("updated_by", sa.String(200), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name="fk_actions_org_id_organizations",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("org_id", "identifier", name="pk_actions"),
    )
    for statement in rls.fence_table("actions"):
        op.execute(statement)


def downgrade() -> None:
    op.drop_table("actions")
