"""The integration installation behind an entity change (Port's audit-log `InstallationId`):
an Ocean integration's writes carry its identifier, from its User-Agent.

Revision ID: 0038
Revises: 0037
Create Date: 2026-12-08
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0038"
down_revision: str | None = "0037"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("entity_events", sa.Column("installation", sa.String(100), nullable=True))


def downgrade() -> None:
    op.drop_column("entity_events", "installation")
