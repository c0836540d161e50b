"""Foundation: the app role, organizations and machine credentials, fenced by RLS.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from app.db import rls

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for statement in rls.create_app_role():
        op.execute(statement)

    op.create_table(
        "organizations",
        sa.Column("id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name="pk_organizations"),
    )
    # A tenant reads (and later edits) its own row only; creating orgs is operator work.
    for statement in rls.fence_table("organizations", column="id", privileges="SELECT, UPDATE"):
        op.execute(statement)

    op.create_table(
        "credentials",
        sa.Column("org_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("client_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("secret_hash", sa.LargeBinary(), nullable=False),
        sa.Column("roles", postgresql.ARRAY(sa.String(120)), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name="fk_credentials_org_id_organizations",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("org_id", "client_id", name="pk_credentials"),
    )
    for statement in rls.fence_table("credentials"):
        op.execute(statement)


def downgrade() -> None:
    for table in ("credentials", "organizations"):
        for statement in rls.unfence_table(table):
            op.execute(statement)
    op.drop_table("credentials")
    op.drop_table("organizations")
