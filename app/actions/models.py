"""Action definitions, runs, run logs and the dispatch outbox. Every key leads with org_id."""

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


class Action(Base):
    __tablename__ = "actions"
    __table_args__ = (ForeignKeyConstraint(["org_id"], ["organizations.id"], ondelete="CASCADE"),)

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    identifier: Mapped[str] = mapped_column(String(100), primary_key=True)
    title: Mapped[str | None] = mapped_column(String(200))
    icon: Mapped[str | None] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    trigger: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    invocation_method: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    required_approval: Mapped[Any] = mapped_column(JSONB, nullable=False)
    approval_notification: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    publish: Mapped[bool] = mapped_column(Boolean, nullable=False)
    allow_anyone_to_view_runs: Mapped[bool | None] = mapped_column(Boolean)
    created_at: Mapped[datetime] = timestamp()
    created_by: Mapped[str] = mapped_column(String(200), nullable=False)
    updated_at: Mapped[datetime] = timestamp()
    updated_by: Mapped[str] = mapped_column(String(200), nullable=False)


class ActionRun(Base):
    """One run of an action: the definition as it was, the inputs, status and dispatch state.

    `dispatch_state`: waiting (for approval) -> queued -> dispatching (claimed, `claim` and
    `lease_until` set) -> retrying (after a transient failure, until `next_attempt_at`) |
    delivered (the backend took it and reports the outcome) | done. A run of an
    INTEGRATION_ACTION (`installation_id` set) is never queued: waiting -> claimable ->
    claimed (by its integration's `claimed_by`, until `lease_until`; claimable again
    after it) ->
    delivered (acknowledged) | done."""

    __tablename__ = "action_runs"
    __table_args__ = (
        ForeignKeyConstraint(["org_id"], ["organizations.id"], ondelete="CASCADE"),
        Index("ix_action_runs_created", "org_id", "created_at"),
        Index("ix_action_runs_action", "org_id", "action", "created_at"),
        Index("ix_action_runs_entity", "org_id", "blueprint", "entity", "created_at"),
        Index(
            "ix_action_runs_idempotency",
            "org_id",
            "created_by",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
        Index(
            "ix_action_runs_lease",
            "lease_until",
            postgresql_where=text("dispatch_state = 'dispatching'"),
        ),
        Index(
            "ix_action_runs_claimable",
            "org_id",
            "installation_id",
            "created_at",
            postgresql_where=text("dispatch_state IN ('claimable', 'claimed')"),
        ),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    action: Mapped[str] = mapped_column(String(100), nullable=False)
    definition: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    blueprint: Mapped[str | None] = mapped_column(String(100))
    entity: Mapped[str | None] = mapped_column(String(1000))
    properties: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    raw_properties: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    context: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    source: Mapped[str] = mapped_column(String(20), nullable=False)
    status: Mapped[str] = mapped_column(String(30), nullable=False)
    status_label: Mapped[str | None] = mapped_column(Text)
    required_approval: Mapped[Any] = mapped_column(JSONB, nullable=False)
    approval: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    link: Mapped[Any] = mapped_column(JSONB, nullable=True)
    summary: Mapped[str | None] = mapped_column(Text)
    external_run_id: Mapped[str | None] = mapped_column(String(200))
    payload: Mapped[Any] = mapped_column(JSONB, nullable=True)
    response: Mapped[Any] = mapped_column(JSONB, nullable=True)
    dispatch_state: Mapped[str] = mapped_column(String(20), nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    claim: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    installation_id: Mapped[str | None] = mapped_column(String(100))
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = timestamp()
    created_by: Mapped[str] = mapped_column(String(200), nullable=False)
    updated_at: Mapped[datetime] = timestamp()
    updated_by: Mapped[str] = mapped_column(String(200), nullable=False)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ActionRunLog(Base):
    """A run's log lines; at most one carries a terminationStatus."""

    __tablename__ = "action_run_logs"
    __table_args__ = (
        ForeignKeyConstraint(
            ["org_id", "run_id"], ["action_runs.org_id", "action_runs.id"], ondelete="CASCADE"
        ),
        Index("ix_action_run_logs_run", "org_id", "run_id", "id"),
        Index(
            "ix_action_run_logs_termination",
            "org_id",
            "run_id",
            unique=True,
            postgresql_where=text("termination_status IS NOT NULL"),
        ),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(40), nullable=False)
    message: Mapped[str] = mapped_column(Text, nullable=False)
    termination_status: Mapped[str | None] = mapped_column(String(20))
    status_label: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(String(200), nullable=False)
    created_at: Mapped[datetime] = timestamp()


class DispatchOutbox(Base):
    """Runs to hand to the queue, written in the transaction that makes them dispatchable;
    the relay hands them to arq, the worker's claim deletes them (app/dispatch)."""

    __tablename__ = "dispatch_outbox"
    __table_args__ = (
        ForeignKeyConstraint(
            ["org_id", "run_id"], ["action_runs.org_id", "action_runs.id"], ondelete="CASCADE"
        ),
        Index("ix_dispatch_outbox_available", "available_at"),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(40), nullable=False)
    attempt: Mapped[int] = mapped_column(Integer, nullable=False)
    available_at: Mapped[datetime] = timestamp()
    # When the relay last handed the row to the queue, and how often: a row stays until a
    # worker claims its run, and is handed again when no worker did for a while (the
    # queue lost the job: Redis restarted empty, or the worker died holding it).
    relayed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    relays: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    created_at: Mapped[datetime] = timestamp()
