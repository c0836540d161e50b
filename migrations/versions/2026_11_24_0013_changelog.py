"""Changelog deliveries: each entity change for a blueprint's changelog destination.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from app.db import rls

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONB = postgresql.JSONB(astext_type=sa.Text())


def upgrade() -> None:
    op.create_table(
        "changelog_deliveries",
        sa.Column("org_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("blueprint", sa.String(100), nullable=False),
        sa.Column("entity", sa.String(1000), nullable=False),
        sa.Column("event_key", sa.String(40), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("body", JSONB, nullable=False),
        sa.Column("state", sa.String(20), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name="fk_changelog_deliveries_org_id_organizations",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("org_id", "id", name="pk_changelog_deliveries"),
    )
    # The sender's queue: undelivered deliveries by entity, oldest first.
    op.create_index(
        "ix_changelog_deliveries_open",
        "changelog_deliveries",
        ["org_id", "blueprint", "entity", "id"],
        postgresql_where=sa.text("state IN ('pending', 'sending')"),
    )
    for statement in rls.fence_table("changelog_deliveries"):
        op.execute(statement)


def downgrade() -> None:
    op.drop_table("changelog_deliveries")
