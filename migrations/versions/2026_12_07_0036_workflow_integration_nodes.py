"""Workflow INTEGRATION_ACTION nodes (the node runs an integration claims and reports on)
and INPUT nodes' timeouts (found by their deadline).

Revision ID: 0036
Revises: 0033
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0036"
down_revision: str | None = "0033"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("workflow_node_runs", sa.Column("installation_id", sa.String(100)))
    op.add_column(
        "workflow_node_runs", sa.Column("invocation", postgresql.JSONB(astext_type=sa.Text()))
    )
    op.add_column("workflow_node_runs", sa.Column("claimed_by", sa.String(200)))
    op.add_column("workflow_node_runs", sa.Column("acknowledged_at", sa.DateTime(timezone=True)))
    op.add_column("workflow_node_runs", sa.Column("external_run_id", sa.String(200)))
    op.add_column("workflow_node_runs", sa.Column("status_label", sa.String(200)))
    op.add_column("workflow_node_runs", sa.Column("links", postgresql.JSONB(astext_type=sa.Text())))
    op.create_index(
        "ix_workflow_node_runs_claimable",
        "workflow_node_runs",
        ["org_id", "installation_id", "created_at"],
        postgresql_where=sa.text("state IN ('claimable', 'claimed')"),
    )
    op.create_index(
        "ix_workflow_node_runs_deadline",
        "workflow_node_runs",
        ["next_attempt_at"],
        postgresql_where=sa.text("state = 'waiting'"),
    )
    op.create_index(
        "ix_workflow_node_runs_external",
        "workflow_node_runs",
        ["org_id", "external_run_id"],
        postgresql_where=sa.text("external_run_id IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_workflow_node_runs_external", table_name="workflow_node_runs")
    op.drop_index("ix_workflow_node_runs_deadline", table_name="workflow_node_runs")
    op.drop_index("ix_workflow_node_runs_claimable", table_name="workflow_node_runs")
    for column in (
        "links",
        "status_label",
        "external_run_id",
        "acknowledged_at",
        "claimed_by",
        "invocation",
        "installation_id",
    ):
        op.drop_column("workflow_node_runs", column)
