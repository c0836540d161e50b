"""Port API parity: the organization's settings and announcement.

`organizations` gains `settings` (Port's documented organization settings, as given) and
`announcement` (the banner Port's organization object carries). Changes to them are audited
by the service in the change's transaction rather than by a trigger: under Citus
`organizations` is a reference table, whose triggers would fire on every node's copy.

Revision ID: 0030
Revises: 0029
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0030"
down_revision: str | None = "0029"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONB = postgresql.JSONB(astext_type=sa.Text())


def upgrade() -> None:
    op.add_column(
        "organizations",
        sa.Column("settings", JSONB, server_default=sa.text("'{}'::jsonb"), nullable=False),
    )
    op.add_column("organizations", sa.Column("announcement", JSONB, nullable=True))


def downgrade() -> None:
    op.drop_column("organizations", "announcement")
    op.drop_column("organizations", "settings")
