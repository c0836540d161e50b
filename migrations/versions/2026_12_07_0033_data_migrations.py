"""Data migrations (Port's /v1/migrations): a migration's target, mode, progress, lease and
report on `catalog_migrations`, its status changes in the audit log.

- Progress (`cursor`: the last source identifier done, and the counts) is written in the
  same transaction as the batch's entity writes, so a worker that stops mid-way leaves the
  next one to resume where the last committed batch ended, neither losing nor repeating
  a batch. `lease_owner` / `lease_until`: the worker holding a batch.
- Status values follow Port's (`COMPLETED`, not `COMPLETE`).
- The audit trigger records a migration's creation and each status change; progress
  bookkeeping is left out of the diff (an update of only that is no entry).

Revision ID: 0033
Revises: 0032
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0033"
down_revision: str | None = "0032"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONB = postgresql.JSONB(astext_type=sa.Text())
_COUNTS = (
    "processed_count",
    "skipped_count",
    "created_count",
    "updated_count",
    "unchanged_count",
    "deleted_count",
    "timeout_count",
)
# The audit trigger's arguments: resource, key, then the columns left out of the diff.
_AUDIT = (
    "migration",
    "id",
    "cursor",
    "total_count",
    *_COUNTS,
    "success_count",
    "failure_count",
    "errors",
    "preview",
    "lease_owner",
    "lease_until",
    "updated_at",
)
_ACTIVE = "status IN ('PENDING', 'RUNNING', 'PENDING_CANCELLATION')"


def upgrade() -> None:
    add = op.add_column
    add("catalog_migrations", sa.Column("target_blueprint", sa.String(100), nullable=True))
    for name in ("dry_run", "delete_source"):
        add(
            "catalog_migrations",
            sa.Column(name, sa.Boolean(), server_default=sa.text("false"), nullable=False),
        )
    add("catalog_migrations", sa.Column("cursor", sa.String(1000), nullable=True))
    add("catalog_migrations", sa.Column("total_count", sa.Integer(), nullable=True))
    for name in _COUNTS:
        add("catalog_migrations", sa.Column(name, sa.Integer(), server_default="0", nullable=False))
    for name in ("errors", "preview"):
        add(
            "catalog_migrations",
            sa.Column(name, JSONB, server_default=sa.text("'[]'::jsonb"), nullable=False),
        )
    add("catalog_migrations", sa.Column("message", sa.Text(), nullable=True))
    add("catalog_migrations", sa.Column("cancel_reason", sa.Text(), nullable=True))
    add("catalog_migrations", sa.Column("lease_owner", sa.String(64), nullable=True))
    for name in ("lease_until", "started_at", "ended_at"):
        add("catalog_migrations", sa.Column(name, sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_catalog_migrations_active",
        "catalog_migrations",
        ["org_id", "created_at"],
        postgresql_where=sa.text(_ACTIVE),
    )
    op.create_index("ix_catalog_migrations_created", "catalog_migrations", ["org_id", "created_at"])
    op.execute("UPDATE catalog_migrations SET status = 'COMPLETED' WHERE status = 'COMPLETE'")
    args = ", ".join(f"'{v}'" for v in _AUDIT)
    op.execute(
        "CREATE TRIGGER catalog_migrations_audit AFTER INSERT OR UPDATE OR DELETE "
        f"ON catalog_migrations FOR EACH ROW EXECUTE FUNCTION portolan_audit_row({args})"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER catalog_migrations_audit ON catalog_migrations")
    op.execute("UPDATE catalog_migrations SET status = 'COMPLETE' WHERE status = 'COMPLETED'")
    op.drop_index("ix_catalog_migrations_created", table_name="catalog_migrations")
    op.drop_index("ix_catalog_migrations_active", table_name="catalog_migrations")
    for name in (
        "ended_at",
        "started_at",
        "lease_until",
        "lease_owner",
        "cancel_reason",
        "message",
        "preview",
        "errors",
        *reversed(_COUNTS),
        "total_count",
        "cursor",
        "delete_source",
        "dry_run",
        "target_blueprint",
    ):
        op.drop_column("catalog_migrations", name)
