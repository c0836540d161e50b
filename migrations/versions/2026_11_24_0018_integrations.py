"""Integrations (Port's Ocean): their mapping and resync state, the raw examples they send
per kind, and their log lines; integrations audited.

Revision ID: 0018
Revises: 0017
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from app.db import rls

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONB = postgresql.JSONB(astext_type=sa.Text())
UUID = postgresql.UUID(as_uuid=True)
TABLES = ("integration_logs", "integration_kind_examples", "integrations")
# Left out of the audit diff: the log ingest secret, and the resync state an integration
# reports on every run (a report alone is no audit entry).
_HIDDEN = ("ingest_id", "resync_state", "resync_updated_at", "created_at", "updated_at")


def _ts(name: str) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)


def _integration_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["org_id", "integration"],
        ["integrations.org_id", "integrations.identifier"],
        name=f"fk_{table}_org_id_integrations",
        ondelete="CASCADE",
    )


def upgrade() -> None:
    op.create_table(
        "integrations",
        sa.Column("org_id", UUID, nullable=False),
        sa.Column("identifier", sa.String(100), nullable=False),
        sa.Column("title", sa.String(200), nullable=True),
        sa.Column("installation_app_type", sa.String(100), nullable=True),
        sa.Column("version", sa.String(100), nullable=True),
        sa.Column(
            "actions_processing_enabled",
            sa.Boolean(),
            server_default=sa.text("false"),
            nullable=False,
        ),
        sa.Column("config", JSONB, nullable=False),
        sa.Column("changelog_destination", JSONB, nullable=True),
        sa.Column("resync_state", JSONB, nullable=False),
        sa.Column("resync_updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ingest_id", sa.String(80), nullable=False),
        _ts("created_at"),
        sa.Column("created_by", sa.String(200), nullable=False),
        _ts("updated_at"),
        sa.Column("updated_by", sa.String(200), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name="fk_integrations_org_id_organizations",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("org_id", "identifier", name="pk_integrations"),
        sa.UniqueConstraint("org_id", "ingest_id", name="uq_integrations_org_id_ingest_id"),
    )
    op.create_table(
        "integration_kind_examples",
        sa.Column("org_id", UUID, nullable=False),
        sa.Column("integration", sa.String(100), nullable=False),
        sa.Column("kind", sa.String(200), nullable=False),
        sa.Column("examples", JSONB, nullable=False),
        _ts("updated_at"),
        _integration_fk("integration_kind_examples"),
        sa.PrimaryKeyConstraint(
            "org_id", "integration", "kind", name="pk_integration_kind_examples"
        ),
    )
    op.create_table(
        "integration_logs",
        sa.Column("org_id", UUID, nullable=False),
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("integration", sa.String(100), nullable=False),
        sa.Column("logged_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("level", sa.String(20), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("extra", JSONB, nullable=False),
        _ts("received_at"),
        _integration_fk("integration_logs"),
        sa.PrimaryKeyConstraint("org_id", "id", name="pk_integration_logs"),
    )
    op.create_index(
        "ix_integration_logs_at",
        "integration_logs",
        ["org_id", "integration", "logged_at", "id"],
    )
    op.create_index("ix_integration_logs_id", "integration_logs", ["org_id", "integration", "id"])
    for table in TABLES:
        for statement in rls.fence_table(table):
            op.execute(statement)
    hidden = ", ".join(f"'{column}'" for column in ("integration", "identifier", *_HIDDEN))
    op.execute(
        "CREATE TRIGGER integrations_audit AFTER INSERT OR UPDATE OR DELETE ON integrations "
        f"FOR EACH ROW EXECUTE FUNCTION portolan_audit_row({hidden})"
    )


def downgrade() -> None:
    for table in TABLES:
        op.drop_table(table)
