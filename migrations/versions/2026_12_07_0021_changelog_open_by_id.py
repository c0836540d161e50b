"""The changelog sender walks each organization's open deliveries oldest first: an index of
open deliveries by (org_id, id), so a claim reads a few rows per org however long a backlog.

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_changelog_deliveries_open_id",
        "changelog_deliveries",
        ["org_id", "id"],
        postgresql_where=sa.text("state IN ('pending', 'sending')"),
    )


def downgrade() -> None:
    op.drop_index("ix_changelog_deliveries_open_id", "changelog_deliveries")
