"""Incoming webhooks: their definitions and the events they accepted.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from app.db import rls

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONB = postgresql.JSONB(astext_type=sa.Text())
UUID = postgresql.UUID(as_uuid=True)
TABLES = ("webhook_events", "webhooks")


def _ts(name: str) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)


def upgrade() -> None:
    op.create_table(
        "webhooks",
        sa.Column("org_id", UUID, nullable=False),
        sa.Column("identifier", sa.String(30), nullable=False),
        sa.Column("title", sa.String(30), nullable=False),
        sa.Column("description", sa.String(200), nullable=True),
        sa.Column("icon", sa.String(200), nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("integration_type", sa.String(20), nullable=False),
        sa.Column("mappings", JSONB, nullable=False),
        sa.Column("security", JSONB, nullable=False),
        sa.Column("secret_encrypted", sa.Text(), nullable=True),
        sa.Column("webhook_key", sa.String(80), nullable=False),
        _ts("created_at"),
        sa.Column("created_by", sa.String(200), nullable=False),
        _ts("updated_at"),
        sa.Column("updated_by", sa.String(200), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name="fk_webhooks_org_id_organizations",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("org_id", "identifier", name="pk_webhooks"),
        sa.UniqueConstraint("org_id", "webhook_key", name="uq_webhooks_org_id_webhook_key"),
    )
    op.create_table(
        "webhook_events",
        sa.Column("org_id", UUID, nullable=False),
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("webhook", sa.String(30), nullable=False),
        sa.Column("request_id", sa.String(1000), nullable=True),
        sa.Column("body", JSONB, nullable=True),
        sa.Column("headers", JSONB, nullable=False),
        sa.Column("query_params", JSONB, nullable=False),
        sa.Column(
            "received_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("clock_timestamp()"),
            nullable=False,
        ),
        sa.Column("status", sa.String(20), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", JSONB, nullable=True),
        sa.ForeignKeyConstraint(
            ["org_id", "webhook"],
            ["webhooks.org_id", "webhooks.identifier"],
            name="fk_webhook_events_org_id_webhooks",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("org_id", "id", name="pk_webhook_events"),
        sa.UniqueConstraint(
            "org_id", "webhook", "request_id", name="uq_webhook_events_org_id_webhook_request_id"
        ),
    )
    op.create_index(
        "ix_webhook_events_webhook", "webhook_events", ["org_id", "webhook", "received_at"]
    )
    op.create_index("ix_webhook_events_received", "webhook_events", ["received_at"])
    # The worker's look for work, across every org.
    op.create_index(
        "ix_webhook_events_pending",
        "webhook_events",
        ["received_at"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    for table in TABLES:
        for statement in rls.fence_table(table):
            op.execute(statement)


def downgrade() -> None:
    for table in TABLES:
        op.drop_table(table)
