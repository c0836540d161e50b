"""Workflows: definitions and their versions, runs, node runs with their logs, and the node
outbox; audit log entries for workflow changes and runs.

Revision ID: 0026
Revises: 0025
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from app.db import rls

revision: str = "0026"
down_revision: str | None = "0025"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONB = postgresql.JSONB(astext_type=sa.Text())
UUID = postgresql.UUID(as_uuid=True)
TABLES = (
    "workflow_outbox",
    "workflow_node_run_logs",
    "workflow_node_runs",
    "workflow_runs",
    "workflow_versions",
    "workflows",
)
# What a run's audit entries leave out: bookkeeping, and what the run's readers see on the
# run itself.
_RUN_HIDDEN = ("context", "idempotency_key", "request_hash", "created_at", "updated_at")


def _ts(name: str, nullable: bool = False) -> sa.Column:  # type: ignore[type-arg]
    if nullable:
        return sa.Column(name, sa.DateTime(timezone=True), nullable=True)
    return sa.Column(name, sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)


def _org_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["org_id"],
        ["organizations.id"],
        name=f"fk_{table}_org_id_organizations",
        ondelete="CASCADE",
    )


def _args(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def upgrade() -> None:
    op.create_table(
        "workflows",
        sa.Column("org_id", UUID, nullable=False),
        sa.Column("identifier", sa.String(100), nullable=False),
        sa.Column("title", sa.String(200), nullable=True),
        sa.Column("icon", sa.String(200), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("category", sa.String(200), nullable=True),
        sa.Column("allow_anyone_to_view_runs", sa.Boolean(), nullable=False),
        sa.Column("nodes", JSONB, nullable=False),
        sa.Column("connections", JSONB, nullable=False),
        sa.Column("version_id", sa.String(40), nullable=False),
        _ts("created_at"),
        sa.Column("created_by", sa.String(200), nullable=False),
        _ts("updated_at"),
        sa.Column("updated_by", sa.String(200), nullable=False),
        _org_fk("workflows"),
        sa.PrimaryKeyConstraint("org_id", "identifier", name="pk_workflows"),
    )
    op.create_table(
        "workflow_versions",
        sa.Column("org_id", UUID, nullable=False),
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("workflow", sa.String(100), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("definition", JSONB, nullable=False),
        _ts("created_at"),
        sa.Column("created_by", sa.String(200), nullable=False),
        _org_fk("workflow_versions"),
        sa.PrimaryKeyConstraint("org_id", "id", name="pk_workflow_versions"),
    )
    op.create_index(
        "ix_workflow_versions_workflow", "workflow_versions", ["org_id", "workflow", "number"]
    )
    op.create_table(
        "workflow_runs",
        sa.Column("org_id", UUID, nullable=False),
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("workflow", sa.String(100), nullable=False),
        sa.Column("version_id", sa.String(40), nullable=False),
        sa.Column("trigger_node", sa.String(100), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("result", sa.String(20), nullable=True),
        sa.Column("context", JSONB, nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("request_hash", sa.String(64), nullable=True),
        _ts("created_at"),
        sa.Column("created_by", sa.String(200), nullable=False),
        _ts("updated_at"),
        _ts("completed_at", nullable=True),
        _org_fk("workflow_runs"),
        sa.ForeignKeyConstraint(
            ["org_id", "version_id"],
            ["workflow_versions.org_id", "workflow_versions.id"],
            name="fk_workflow_runs_org_id_version_id_workflow_versions",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("org_id", "id", name="pk_workflow_runs"),
    )
    op.create_index("ix_workflow_runs_created", "workflow_runs", ["org_id", "created_at"])
    op.create_index(
        "ix_workflow_runs_workflow", "workflow_runs", ["org_id", "workflow", "created_at"]
    )
    op.create_index(
        "ix_workflow_runs_idempotency",
        "workflow_runs",
        ["org_id", "created_by", "idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.create_table(
        "workflow_node_runs",
        sa.Column("org_id", UUID, nullable=False),
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("run_id", sa.String(40), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("node", sa.String(100), nullable=False),
        sa.Column("node_type", sa.String(40), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("result", sa.String(20), nullable=True),
        sa.Column("output", JSONB, nullable=True),
        sa.Column("outlet", sa.String(100), nullable=True),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("claim", UUID, nullable=True),
        _ts("lease_until", nullable=True),
        _ts("next_attempt_at", nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        _ts("completed_at", nullable=True),
        sa.ForeignKeyConstraint(
            ["org_id", "run_id"],
            ["workflow_runs.org_id", "workflow_runs.id"],
            name="fk_workflow_node_runs_org_id_run_id_workflow_runs",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("org_id", "id", name="pk_workflow_node_runs"),
    )
    # One node run per place on a run's path: a run moves on from a node at most once.
    op.create_index(
        "ix_workflow_node_runs_run",
        "workflow_node_runs",
        ["org_id", "run_id", "seq"],
        unique=True,
    )
    # The sweeper's query: claims whose lease ran out, across every org.
    op.create_index(
        "ix_workflow_node_runs_lease",
        "workflow_node_runs",
        ["lease_until"],
        postgresql_where=sa.text("state = 'dispatching'"),
    )
    op.create_table(
        "workflow_node_run_logs",
        sa.Column("org_id", UUID, nullable=False),
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("node_run_id", sa.String(40), nullable=False),
        sa.Column("level", sa.String(10), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        _ts("created_at"),
        sa.ForeignKeyConstraint(
            ["org_id", "node_run_id"],
            ["workflow_node_runs.org_id", "workflow_node_runs.id"],
            name="fk_workflow_node_run_logs_org_id_node_run_id_workflow_node_runs",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("org_id", "id", name="pk_workflow_node_run_logs"),
    )
    op.create_index(
        "ix_workflow_node_run_logs_node_run",
        "workflow_node_run_logs",
        ["org_id", "node_run_id", "id"],
    )
    op.create_table(
        "workflow_outbox",
        sa.Column("org_id", UUID, nullable=False),
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("node_run_id", sa.String(40), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        _ts("available_at"),
        _ts("relayed_at", nullable=True),
        sa.Column("relays", sa.Integer(), server_default="0", nullable=False),
        _ts("created_at"),
        sa.ForeignKeyConstraint(
            ["org_id", "node_run_id"],
            ["workflow_node_runs.org_id", "workflow_node_runs.id"],
            name="fk_workflow_outbox_org_id_node_run_id_workflow_node_runs",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("org_id", "id", name="pk_workflow_outbox"),
    )
    op.create_index("ix_workflow_outbox_available", "workflow_outbox", ["available_at"])
    for table in TABLES:
        for statement in rls.fence_table(table):
            op.execute(statement)
    # Audit entries (portolan_audit_row, migration 0014): every change of a workflow, and a
    # run's start and end.
    op.execute(
        "CREATE TRIGGER workflows_audit AFTER INSERT OR UPDATE OR DELETE ON workflows "
        "FOR EACH ROW EXECUTE FUNCTION portolan_audit_row("
        f"{_args(('workflow', 'identifier', 'created_at', 'updated_at'))})"
    )
    op.execute(
        "CREATE TRIGGER workflow_runs_audit_created AFTER INSERT ON workflow_runs FOR EACH ROW "
        f"EXECUTE FUNCTION portolan_audit_row({_args(('workflow-run', 'id', *_RUN_HIDDEN))})"
    )
    op.execute(
        "CREATE TRIGGER workflow_runs_audit_updated AFTER UPDATE ON workflow_runs FOR EACH ROW "
        "WHEN ((OLD.status, OLD.result) IS DISTINCT FROM (NEW.status, NEW.result)) "
        f"EXECUTE FUNCTION portolan_audit_row({_args(('workflow-run', 'id', *_RUN_HIDDEN))})"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER workflow_runs_audit_updated ON workflow_runs")
    op.execute("DROP TRIGGER workflow_runs_audit_created ON workflow_runs")
    op.execute("DROP TRIGGER workflows_audit ON workflows")
    for table in TABLES:
        op.drop_table(table)
