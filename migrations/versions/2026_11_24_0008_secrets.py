"""Organization secrets (encrypted at rest) and each organization's webhook signing secret.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from app.db import rls

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)


def upgrade() -> None:
    op.create_table(
        "org_secrets",
        sa.Column("org_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("value_encrypted", sa.Text(), nullable=False),
        sa.Column("description", sa.String(200), nullable=True),
        _ts("created_at"),
        sa.Column("created_by", sa.String(200), nullable=False),
        _ts("updated_at"),
        sa.Column("updated_by", sa.String(200), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name="fk_org_secrets_org_id_organizations",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("org_id", "name", name="pk_org_secrets"),
    )
    for statement in rls.fence_table("org_secrets"):
        op.execute(statement)
    # Organizations created before this have none yet: one is made on first use.
    op.add_column("organizations", sa.Column("signing_secret_encrypted", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("organizations", "signing_secret_encrypted")
    op.drop_table("org_secrets")
