"""Workflows, their versions, runs, node runs, node run logs and the node outbox.

Every key leads with org_id. A workflow's versions are kept apart from the workflow (no
foreign key to it), so a deleted or replaced workflow's runs keep the graph they started on.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKeyConstraint,
    Identity,
    Index,
    Integer,
    String,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, timestamp


class Workflow(Base):
    """The current definition of a workflow; `version_id` names its version row."""

    __tablename__ = "workflows"
    __table_args__ = (ForeignKeyConstraint(["org_id"], ["organizations.id"], ondelete="CASCADE"),)

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    identifier: Mapped[str] = mapped_column(String(100), primary_key=True)
    title: Mapped[str | None] = mapped_column(String(200))
    icon: Mapped[str | None] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    category: Mapped[str | None] = mapped_column(String(200))
    allow_anyone_to_view_runs: Mapped[bool] = mapped_column(Boolean, nullable=False)
    nodes: Mapped[list[Any]] = mapped_column(JSONB, nullable=False)
    connections: Mapped[list[Any]] = mapped_column(JSONB, nullable=False)
    version_id: Mapped[str] = mapped_column(String(40), nullable=False)
    created_at: Mapped[datetime] = timestamp()
    created_by: Mapped[str] = mapped_column(String(200), nullable=False)
    updated_at: Mapped[datetime] = timestamp()
    updated_by: Mapped[str] = mapped_column(String(200), nullable=False)


class WorkflowVersion(Base):
    """One saved definition of a workflow, as runs started on it see it."""

    __tablename__ = "workflow_versions"
    __table_args__ = (
        ForeignKeyConstraint(["org_id"], ["organizations.id"], ondelete="CASCADE"),
        Index("ix_workflow_versions_workflow", "org_id", "workflow", "number"),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    workflow: Mapped[str] = mapped_column(String(100), nullable=False)
    number: Mapped[int] = mapped_column(Integer, nullable=False)
    definition: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    created_at: Mapped[datetime] = timestamp()
    created_by: Mapped[str] = mapped_column(String(200), nullable=False)


class WorkflowRun(Base):
    """A walk through one version's graph. `status`: IN_PROGRESS -> COMPLETED with a
    `result` (SUCCESS, FAILED, CANCELLED)."""

    __tablename__ = "workflow_runs"
    __table_args__ = (
        ForeignKeyConstraint(["org_id"], ["organizations.id"], ondelete="CASCADE"),
        ForeignKeyConstraint(
            ["org_id", "version_id"],
            ["workflow_versions.org_id", "workflow_versions.id"],
            ondelete="CASCADE",
        ),
        Index("ix_workflow_runs_created", "org_id", "created_at"),
        Index("ix_workflow_runs_workflow", "org_id", "workflow", "created_at"),
        Index(
            "ix_workflow_runs_idempotency",
            "org_id",
            "created_by",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    workflow: Mapped[str] = mapped_column(String(100), nullable=False)
    version_id: Mapped[str] = mapped_column(String(40), nullable=False)
    trigger_node: Mapped[str] = mapped_column(String(100), nullable=False)
    status: Mapped[str] = mapped_column(String(20), nullable=False)
    result: Mapped[str | None] = mapped_column(String(20))
    context: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = timestamp()
    created_by: Mapped[str] = mapped_column(String(200), nullable=False)
    updated_at: Mapped[datetime] = timestamp()
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WorkflowNodeRun(Base):
    """One node's turn in a run. `seq` is its place on the run's path: one row per place,
    so a run moves on from a node at most once. `state` is the execution's bookkeeping:
    queued -> dispatching (claimed under `claim` until `lease_until`) -> retrying (after a
    transient failure, until `next_attempt_at`) -> done; an INPUT node waits (`waiting`);
    an INTEGRATION_ACTION node is handed to its integration (`claimable` -> `claimed` ->
    `acknowledged` -> done)."""

    __tablename__ = "workflow_node_runs"
    __table_args__ = (
        ForeignKeyConstraint(
            ["org_id", "run_id"],
            ["workflow_runs.org_id", "workflow_runs.id"],
            ondelete="CASCADE",
        ),
        Index("ix_workflow_node_runs_run", "org_id", "run_id", "seq", unique=True),
        Index(
            "ix_workflow_node_runs_lease",
            "lease_until",
            postgresql_where=text("state = 'dispatching'"),
        ),
        Index(
            "ix_workflow_node_runs_claimable",
            "org_id",
            "installation_id",
            "created_at",
            postgresql_where=text("state IN ('claimable', 'claimed')"),
        ),
        Index(
            "ix_workflow_node_runs_deadline",
            "next_attempt_at",
            postgresql_where=text("state = 'waiting'"),
        ),
        Index(
            "ix_workflow_node_runs_external",
            "org_id",
            "external_run_id",
            postgresql_where=text("external_run_id IS NOT NULL"),
        ),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(40), nullable=False)
    seq: Mapped[int] = mapped_column(Integer, nullable=False)
    node: Mapped[str] = mapped_column(String(100), nullable=False)
    node_type: Mapped[str] = mapped_column(String(40), nullable=False)
    status: Mapped[str] = mapped_column(String(20), nullable=False)
    result: Mapped[str | None] = mapped_column(String(20))
    output: Mapped[Any] = mapped_column(JSONB, nullable=True)
    outlet: Mapped[str | None] = mapped_column(String(100))
    state: Mapped[str] = mapped_column(String(20), nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    claim: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = timestamp()
    updated_at: Mapped[datetime] = timestamp()
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # INTEGRATION_ACTION nodes (app/workflows/integrations.py): the installation that runs
    # it, what it is handed (rendered), and what the integration reported.
    installation_id: Mapped[str | None] = mapped_column(String(100))
    invocation: Mapped[Any] = mapped_column(JSONB, nullable=True)
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    acknowledged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    external_run_id: Mapped[str | None] = mapped_column(String(200))
    status_label: Mapped[str | None] = mapped_column(String(200))
    links: Mapped[Any] = mapped_column(JSONB, nullable=True)


class WorkflowNodeRunLog(Base):
    __tablename__ = "workflow_node_run_logs"
    __table_args__ = (
        ForeignKeyConstraint(
            ["org_id", "node_run_id"],
            ["workflow_node_runs.org_id", "workflow_node_runs.id"],
            ondelete="CASCADE",
        ),
        Index("ix_workflow_node_run_logs_node_run", "org_id", "node_run_id", "id"),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    node_run_id: Mapped[str] = mapped_column(String(40), nullable=False)
    level: Mapped[str] = mapped_column(String(10), nullable=False)
    message: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = timestamp()


class WorkflowOutbox(Base):
    """Node runs to hand to the queue, written in the transaction that makes them due; the
    relay hands them to arq, the worker's claim deletes them (app/workflows/relay.py)."""

    __tablename__ = "workflow_outbox"
    __table_args__ = (
        ForeignKeyConstraint(
            ["org_id", "node_run_id"],
            ["workflow_node_runs.org_id", "workflow_node_runs.id"],
            ondelete="CASCADE",
        ),
        Index("ix_workflow_outbox_available", "available_at"),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    node_run_id: Mapped[str] = mapped_column(String(40), nullable=False)
    attempt: Mapped[int] = mapped_column(Integer, nullable=False)
    available_at: Mapped[datetime] = timestamp()
    relayed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    relays: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    created_at: Mapped[datetime] = timestamp()
