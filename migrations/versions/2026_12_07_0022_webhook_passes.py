"""Incoming-webhook passes hold a lease instead of a transaction while they render: a
webhook's pass is a row of `webhook_passes` (claim, lease_until), so no connection waits
while a tenant's mappings run.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from app.db import rls

revision: str = "0022"
down_revision: str | None = "0021"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "webhook_passes",
        sa.Column("org_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("webhook", sa.String(30), nullable=False),
        sa.Column("claim", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id", "webhook"],
            ["webhooks.org_id", "webhooks.identifier"],
            name="fk_webhook_passes_org_id_webhooks",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("org_id", "webhook", name="pk_webhook_passes"),
    )
    for statement in rls.fence_table("webhook_passes"):
        op.execute(statement)


def downgrade() -> None:
    op.drop_table("webhook_passes")
