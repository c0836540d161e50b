"""Incoming webhooks and the events they accepted. Every key leads with org_id."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    ForeignKeyConstraint,
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


class Webhook(Base):
    """A webhook definition. `security` holds the signature settings without the secret,
    which is kept encrypted (app.kit.crypto) in `secret_encrypted` and never returned.
    `webhook_key` is the unguessable part of the ingest URL; it starts with the org's id
    (see app.webhooks.service.new_webhook_key), so it is unique across orgs too."""

    __tablename__ = "webhooks"
    __table_args__ = (
        ForeignKeyConstraint(["org_id"], ["organizations.id"], ondelete="CASCADE"),
        UniqueConstraint("org_id", "webhook_key"),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    identifier: Mapped[str] = mapped_column(String(30), primary_key=True)
    title: Mapped[str] = mapped_column(String(30), nullable=False)
    description: Mapped[str | None] = mapped_column(String(200))
    icon: Mapped[str | None] = mapped_column(String(200))
    enabled: Mapped[bool] = mapped_column(Boolean, nullable=False)
    integration_type: Mapped[str] = mapped_column(String(20), nullable=False)
    mappings: Mapped[list[Any]] = mapped_column(JSONB, nullable=False)
    security: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    secret_encrypted: Mapped[str | None] = mapped_column(Text)
    webhook_key: Mapped[str] = mapped_column(String(80), nullable=False)
    created_at: Mapped[datetime] = timestamp()
    created_by: Mapped[str] = mapped_column(String(200), nullable=False)
    updated_at: Mapped[datetime] = timestamp()
    updated_by: Mapped[str] = mapped_column(String(200), nullable=False)


class WebhookEvent(Base):
    """One accepted request: what the mappings read (body, headers, query parameters) and,
    once the worker applied them, the outcome. `status`: pending -> processed | failed.
    A request identifier is unique per webhook, so a replayed request is stored once."""

    __tablename__ = "webhook_events"
    __table_args__ = (
        ForeignKeyConstraint(
            ["org_id", "webhook"], ["webhooks.org_id", "webhooks.identifier"], ondelete="CASCADE"
        ),
        UniqueConstraint("org_id", "webhook", "request_id"),
        Index("ix_webhook_events_webhook", "org_id", "webhook", "received_at"),
        Index("ix_webhook_events_received", "received_at"),
        # The worker's look for work, across every org.
        Index(
            "ix_webhook_events_pending",
            "received_at",
            postgresql_where=text("status = 'pending'"),
        ),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    webhook: Mapped[str] = mapped_column(String(30), nullable=False)
    request_id: Mapped[str | None] = mapped_column(String(1000))
    body: Mapped[Any] = mapped_column(JSONB, nullable=True)
    headers: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    query_params: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    received_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=text("clock_timestamp()")
    )
    status: Mapped[str] = mapped_column(String(20), nullable=False, server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    outcome: Mapped[dict[str, Any] | None] = mapped_column(JSONB)


class WebhookPass(Base):
    """Which pass is applying a webhook's events (app/webhooks/processing.py), for how long:
    a lease, so a pass can render its batch with no transaction open and no other pass
    takes the webhook meanwhile. A pass that died leaves a lease that runs out."""

    __tablename__ = "webhook_passes"
    __table_args__ = (
        ForeignKeyConstraint(
            ["org_id", "webhook"], ["webhooks.org_id", "webhooks.identifier"], ondelete="CASCADE"
        ),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    webhook: Mapped[str] = mapped_column(String(30), primary_key=True)
    claim: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    lease_until: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
