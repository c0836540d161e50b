"""The incoming webhook event behind an entity change (Port's audit-log `webhookEventId`).

Revision ID: 0039
Revises: 0038
Create Date: 2026-12-08
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0039"
down_revision: str | None = "0038"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("entity_events", sa.Column("webhook_event", sa.String(100), nullable=True))


def downgrade() -> None:
    op.drop_column("entity_events", "webhook_event")
