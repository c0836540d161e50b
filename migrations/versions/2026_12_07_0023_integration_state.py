"""What current Ocean versions keep on an integration and send about their syncs: the
integration's own flags (resources initialized, processing mode, incremental sync, origin of
its defaults, spec), the Ocean version seen, resync requests (and when the integration last
started a resync), and the sync metrics posted to the integration's metrics ingest URL
(`integration_syncs`, one row per resync; `integration_sync_kinds`, one per kind of it).

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from app.db import rls

revision: str = "0023"
down_revision: str | None = "0022"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONB = postgresql.JSONB(astext_type=sa.Text())
UUID = postgresql.UUID(as_uuid=True)
TABLES = ("integration_sync_kinds", "integration_syncs")
# The integrations' audit trigger of 0018, with the bookkeeping added here left out too:
# the Ocean version a read reports and when a resync last started (a resync report).
_HIDDEN = ("ingest_id", "resync_state", "resync_updated_at", "created_at", "updated_at")
_BOOKKEEPING = ("ocean_core_version", "resync_started_at")


def _trigger(hidden: tuple[str, ...]) -> list[str]:
    args = ", ".join(f"'{v}'" for v in ("integration", "identifier", *hidden))
    return [
        "DROP TRIGGER integrations_audit ON integrations",
        "CREATE TRIGGER integrations_audit AFTER INSERT OR UPDATE OR DELETE ON integrations "
        f"FOR EACH ROW EXECUTE FUNCTION portolan_audit_row({args})",
    ]


def _ts(name: str) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)


def upgrade() -> None:
    false = sa.text("false")
    op.add_column(
        "integrations",
        sa.Column(
            "are_port_resources_initialized", sa.Boolean(), server_default=false, nullable=False
        ),
    )
    op.add_column(
        "integrations",
        sa.Column("incremental_sync_enabled", sa.Boolean(), server_default=false, nullable=False),
    )
    op.add_column("integrations", sa.Column("processing_mode", sa.String(20), nullable=True))
    op.add_column(
        "integrations", sa.Column("create_port_resources_origin", sa.String(20), nullable=True)
    )
    op.add_column("integrations", sa.Column("spec", JSONB, nullable=True))
    op.add_column("integrations", sa.Column("ocean_core_version", sa.String(100), nullable=True))
    op.add_column(
        "integrations",
        sa.Column("resync_requested_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.add_column("integrations", sa.Column("resync_requested_by", sa.String(200), nullable=True))
    op.add_column(
        "integrations", sa.Column("resync_started_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_table(
        "integration_syncs",
        sa.Column("org_id", UUID, nullable=False),
        sa.Column("integration", sa.String(100), nullable=False),
        sa.Column("event_id", sa.String(200), nullable=False),
        sa.Column("seq", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("sync_state", sa.String(40), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        sa.ForeignKeyConstraint(
            ["org_id", "integration"],
            ["integrations.org_id", "integrations.identifier"],
            name="fk_integration_syncs_org_id_integrations",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("org_id", "integration", "event_id", name="pk_integration_syncs"),
    )
    op.create_index(
        "ix_integration_syncs_seq", "integration_syncs", ["org_id", "integration", "seq"]
    )
    op.create_table(
        "integration_sync_kinds",
        sa.Column("org_id", UUID, nullable=False),
        sa.Column("integration", sa.String(100), nullable=False),
        sa.Column("event_id", sa.String(200), nullable=False),
        sa.Column("kind_identifier", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(200), nullable=False),
        sa.Column("kind_index", sa.Integer(), nullable=False),
        sa.Column("blueprint", sa.String(200), nullable=True),
        sa.Column("sync_state", sa.String(40), nullable=True),
        sa.Column("integration_type", sa.String(100), nullable=True),
        sa.Column("integration_version", sa.String(100), nullable=True),
        sa.Column("ocean_version", sa.String(100), nullable=True),
        sa.Column("metrics", JSONB, nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.ForeignKeyConstraint(
            ["org_id", "integration", "event_id"],
            [
                "integration_syncs.org_id",
                "integration_syncs.integration",
                "integration_syncs.event_id",
            ],
            name="fk_integration_sync_kinds_org_id_integration_syncs",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "org_id", "integration", "event_id", "kind_identifier", name="pk_integration_sync_kinds"
        ),
    )
    for table in TABLES:
        for statement in rls.fence_table(table):
            op.execute(statement)
    for statement in _trigger(_HIDDEN + _BOOKKEEPING):
        op.execute(statement)


def downgrade() -> None:
    for statement in _trigger(_HIDDEN):
        op.execute(statement)
    for table in TABLES:
        op.drop_table(table)
    for column in (
        "resync_started_at",
        "resync_requested_by",
        "resync_requested_at",
        "ocean_core_version",
        "spec",
        "create_port_resources_origin",
        "processing_mode",
        "incremental_sync_enabled",
        "are_port_resources_initialized",
    ):
        op.drop_column("integrations", column)
