"""Action runs, their logs, and the dispatch outbox.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from app.db import rls

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONB = postgresql.JSONB(astext_type=sa.Text())
UUID = postgresql.UUID(as_uuid=True)
TABLES = ("dispatch_outbox", "action_run_logs", "action_runs")


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


def upgrade() -> None:
    op.create_table(
        "action_runs",
        sa.Column("org_id", UUID, nullable=False),
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("action", sa.String(100), nullable=False),
        sa.Column("definition", JSONB, nullable=False),
        sa.Column("blueprint", sa.String(100), nullable=True),
        sa.Column("entity", sa.String(1000), nullable=True),
        sa.Column("properties", JSONB, nullable=False),
        sa.Column("raw_properties", JSONB, nullable=False),
        sa.Column("context", JSONB, nullable=False),
        sa.Column("source", sa.String(20), nullable=False),
        sa.Column("status", sa.String(30), nullable=False),
        sa.Column("status_label", sa.Text(), nullable=True),
        sa.Column("required_approval", JSONB, nullable=False),
        sa.Column("approval", JSONB, nullable=True),
        sa.Column("link", JSONB, nullable=True),
        sa.Column("summary", sa.Text(), nullable=True),
        sa.Column("external_run_id", sa.String(200), nullable=True),
        sa.Column("payload", JSONB, nullable=True),
        sa.Column("response", JSONB, nullable=True),
        sa.Column("dispatch_state", sa.String(20), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("claim", UUID, nullable=True),
        _ts("lease_until", nullable=True),
        _ts("next_attempt_at", nullable=True),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("request_hash", sa.String(64), nullable=True),
        _ts("created_at"),
        sa.Column("created_by", sa.String(200), nullable=False),
        _ts("updated_at"),
        sa.Column("updated_by", sa.String(200), nullable=False),
        _ts("ended_at", nullable=True),
        _org_fk("action_runs"),
        sa.PrimaryKeyConstraint("org_id", "id", name="pk_action_runs"),
    )
    op.create_index("ix_action_runs_created", "action_runs", ["org_id", "created_at"])
    op.create_index("ix_action_runs_action", "action_runs", ["org_id", "action", "created_at"])
    op.create_index(
        "ix_action_runs_entity", "action_runs", ["org_id", "blueprint", "entity", "created_at"]
    )
    op.create_index(
        "ix_action_runs_idempotency",
        "action_runs",
        ["org_id", "created_by", "idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    # The sweeper's query: claims whose lease ran out, across every org.
    op.create_index(
        "ix_action_runs_lease",
        "action_runs",
        ["lease_until"],
        postgresql_where=sa.text("dispatch_state = 'dispatching'"),
    )
    op.create_table(
        "action_run_logs",
        sa.Column("org_id", UUID, nullable=False),
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("run_id", sa.String(40), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("termination_status", sa.String(20), nullable=True),
        sa.Column("status_label", sa.Text(), nullable=True),
        sa.Column("created_by", sa.String(200), nullable=False),
        _ts("created_at"),
        sa.ForeignKeyConstraint(
            ["org_id", "run_id"],
            ["action_runs.org_id", "action_runs.id"],
            name="fk_action_run_logs_org_id_action_runs",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("org_id", "id", name="pk_action_run_logs"),
    )
    op.create_index("ix_action_run_logs_run", "action_run_logs", ["org_id", "run_id", "id"])
    # A run has one terminating log at most.
    op.create_index(
        "ix_action_run_logs_termination",
        "action_run_logs",
        ["org_id", "run_id"],
        unique=True,
        postgresql_where=sa.text("termination_status IS NOT NULL"),
    )
    op.create_table(
        "dispatch_outbox",
        sa.Column("org_id", UUID, nullable=False),
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("run_id", sa.String(40), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        _ts("available_at"),
        _ts("relayed_at", nullable=True),
        sa.Column("relays", sa.Integer(), server_default="0", nullable=False),
        _ts("created_at"),
        sa.ForeignKeyConstraint(
            ["org_id", "run_id"],
            ["action_runs.org_id", "action_runs.id"],
            name="fk_dispatch_outbox_org_id_action_runs",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("org_id", "id", name="pk_dispatch_outbox"),
    )
    op.create_index("ix_dispatch_outbox_available", "dispatch_outbox", ["available_at"])
    for table in TABLES:
        for statement in rls.fence_table(table):
            op.execute(statement)


def downgrade() -> None:
    for table in TABLES:
        op.drop_table(table)
