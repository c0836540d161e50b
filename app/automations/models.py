"""The event feed's tables: run events, the feed's cursor, timer cursors.

Entity events are the catalog's (`entity_events`); run events are written by a trigger on
`action_runs` (migration 0011) whenever a run is created or what its watchers see changes.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
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

from app.db.base import Base, current_xid, timestamp


class RunEvent(Base):
    __tablename__ = "run_events"
    __table_args__ = (
        ForeignKeyConstraint(["org_id"], ["organizations.id"], ondelete="CASCADE"),
        Index("ix_run_events_xid", "xid"),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(40), nullable=False)
    action: Mapped[str] = mapped_column(String(100), nullable=False)
    kind: Mapped[str] = mapped_column(String(10), nullable=False)
    before: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    after: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    actor: Mapped[str] = mapped_column(String(200), nullable=False)
    # How many automation runs led to this run (a chain of automations stops at a limit).
    depth: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    at: Mapped[datetime] = timestamp()
    xid: Mapped[str] = current_xid()


class EventFeedCursor(Base):
    """Where a feed has read to: every event of a transaction below `horizon` was read.
    A system table: the feed's floor (`automations`, where a newly interested org's cursor
    starts) and one cursor per organization (`automations/<org hex>`, `org_id` set), each
    claimed by one pass at a time with a lease (app/automations/feed.py)."""

    __tablename__ = "event_feed_cursors"

    feed: Mapped[str] = mapped_column(String(100), primary_key=True)
    horizon: Mapped[str] = mapped_column(Text, nullable=False)
    updated_at: Mapped[datetime] = timestamp()
    org_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lease_token: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))


class TimerCursor(Base):
    """Up to when a blueprint's timer property was checked for expiries."""

    __tablename__ = "timer_cursors"
    __table_args__ = (ForeignKeyConstraint(["org_id"], ["organizations.id"], ondelete="CASCADE"),)

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    blueprint: Mapped[str] = mapped_column(String(100), primary_key=True)
    property: Mapped[str] = mapped_column(String(100), primary_key=True)
    checked_until: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class ChangelogDelivery(Base):
    """One entity change on its way to its blueprint's changelog destination
    (app/automations/changelog.py): pending -> sending -> delivered | failed."""

    __tablename__ = "changelog_deliveries"
    __table_args__ = (
        ForeignKeyConstraint(["org_id"], ["organizations.id"], ondelete="CASCADE"),
        Index(
            "ix_changelog_deliveries_open",
            "org_id",
            "blueprint",
            "entity",
            "id",
            postgresql_where=text("state IN ('pending', 'sending')"),
        ),
        # The sender walks each org's open deliveries oldest first.
        Index(
            "ix_changelog_deliveries_open_id",
            "org_id",
            "id",
            postgresql_where=text("state IN ('pending', 'sending')"),
        ),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    blueprint: Mapped[str] = mapped_column(String(100), nullable=False)
    entity: Mapped[str] = mapped_column(String(1000), nullable=False)
    event_key: Mapped[str] = mapped_column(String(40), nullable=False)
    url: Mapped[str] = mapped_column(Text, nullable=False)
    body: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    state: Mapped[str] = mapped_column(String(20), nullable=False, server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime] = timestamp()
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = timestamp()
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
