"""Integrations, the raw examples they send per kind, their log lines, and their syncs'
metrics.

Every key leads with org_id."""

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
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, timestamp


class Integration(Base):
    """One installed integration (Port's `installationId` is its identifier).

    `resync_state` holds what the integration last reported (status, lastResyncStart,
    lastResyncEnd, nextResync, intervalInMinuets); `resync_updated_at` is when, and a
    report sets `updated_at` to the same instant: Ocean's older polling listener resyncs when
    `updatedAt` differs from the `resyncState.updatedAt` it last saw. Current Ocean polls
    the resync request instead: one is pending while `resync_requested_at` is later than
    `resync_started_at` (when the integration last reported a resync running).
    `ingest_id` is the secret part of the log and metrics ingest URLs; `ocean_core_version`
    the Ocean version its reads last reported."""

    __tablename__ = "integrations"
    __table_args__ = (
        ForeignKeyConstraint(["org_id"], ["organizations.id"], ondelete="CASCADE"),
        UniqueConstraint("org_id", "ingest_id"),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    identifier: Mapped[str] = mapped_column(String(100), primary_key=True)
    title: Mapped[str | None] = mapped_column(String(200))
    installation_app_type: Mapped[str | None] = mapped_column(String(100))
    version: Mapped[str | None] = mapped_column(String(100))
    actions_processing_enabled: Mapped[bool] = mapped_column(
        Boolean, nullable=False, server_default=text("false")
    )
    config: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    changelog_destination: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    resync_state: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    resync_updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    are_port_resources_initialized: Mapped[bool] = mapped_column(
        Boolean, nullable=False, server_default=text("false")
    )
    incremental_sync_enabled: Mapped[bool] = mapped_column(
        Boolean, nullable=False, server_default=text("false")
    )
    processing_mode: Mapped[str | None] = mapped_column(String(20))
    create_port_resources_origin: Mapped[str | None] = mapped_column(String(20))
    spec: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    ocean_core_version: Mapped[str | None] = mapped_column(String(100))
    resync_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    resync_requested_by: Mapped[str | None] = mapped_column(String(200))
    resync_started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ingest_id: Mapped[str] = mapped_column(String(80), nullable=False)
    created_at: Mapped[datetime] = timestamp()
    created_by: Mapped[str] = mapped_column(String(200), nullable=False)
    updated_at: Mapped[datetime] = timestamp()
    updated_by: Mapped[str] = mapped_column(String(200), nullable=False)


class IntegrationKindExamples(Base):
    """The latest raw objects (at most 5) an integration saw of one kind."""

    __tablename__ = "integration_kind_examples"
    __table_args__ = (
        ForeignKeyConstraint(
            ["org_id", "integration"],
            ["integrations.org_id", "integrations.identifier"],
            ondelete="CASCADE",
        ),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    integration: Mapped[str] = mapped_column(String(100), primary_key=True)
    kind: Mapped[str] = mapped_column(String(200), primary_key=True)
    examples: Mapped[list[Any]] = mapped_column(JSONB, nullable=False)
    updated_at: Mapped[datetime] = timestamp()


class IntegrationLog(Base):
    """One log line an integration sent to its ingest URL."""

    __tablename__ = "integration_logs"
    __table_args__ = (
        ForeignKeyConstraint(
            ["org_id", "integration"],
            ["integrations.org_id", "integrations.identifier"],
            ondelete="CASCADE",
        ),
        Index("ix_integration_logs_at", "org_id", "integration", "logged_at", "id"),
        Index("ix_integration_logs_id", "org_id", "integration", "id"),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    integration: Mapped[str] = mapped_column(String(100), nullable=False)
    logged_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    level: Mapped[str] = mapped_column(String(20), nullable=False)
    message: Mapped[str] = mapped_column(Text, nullable=False)
    extra: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    received_at: Mapped[datetime] = timestamp()


class IntegrationSync(Base):
    """One sync (Ocean's event id) an integration reported metrics or heartbeats for. Its
    state is its `__runtime__` kind's, else the last one reported; `seq` orders syncs."""

    __tablename__ = "integration_syncs"
    __table_args__ = (
        ForeignKeyConstraint(
            ["org_id", "integration"],
            ["integrations.org_id", "integrations.identifier"],
            ondelete="CASCADE",
        ),
        Index("ix_integration_syncs_seq", "org_id", "integration", "seq"),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    integration: Mapped[str] = mapped_column(String(100), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, Identity(always=True), nullable=False)
    sync_state: Mapped[str | None] = mapped_column(String(40))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = timestamp()
    updated_at: Mapped[datetime] = timestamp()


class IntegrationSyncKind(Base):
    """The metrics of one kind (Ocean's `kindIdentifier`, `<kind>-<index>`) of one sync, as
    last reported."""

    __tablename__ = "integration_sync_kinds"
    __table_args__ = (
        ForeignKeyConstraint(
            ["org_id", "integration", "event_id"],
            [
                "integration_syncs.org_id",
                "integration_syncs.integration",
                "integration_syncs.event_id",
            ],
            ondelete="CASCADE",
        ),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    integration: Mapped[str] = mapped_column(String(100), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    kind_identifier: Mapped[str] = mapped_column(String(200), primary_key=True)
    kind: Mapped[str] = mapped_column(String(200), nullable=False)
    kind_index: Mapped[int] = mapped_column(Integer, nullable=False)
    blueprint: Mapped[str | None] = mapped_column(String(200))
    sync_state: Mapped[str | None] = mapped_column(String(40))
    integration_type: Mapped[str | None] = mapped_column(String(100))
    integration_version: Mapped[str | None] = mapped_column(String(100))
    ocean_version: Mapped[str | None] = mapped_column(String(100))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    created_at: Mapped[datetime] = timestamp()
    updated_at: Mapped[datetime] = timestamp()
