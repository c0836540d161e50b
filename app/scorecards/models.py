"""Scorecard definitions and their stored results. Every key leads with org_id."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    ARRAY,
    Boolean,
    Date,
    DateTime,
    ForeignKeyConstraint,
    Integer,
    SmallInteger,
    String,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, timestamp


class Scorecard(Base):
    """A scorecard of a blueprint. `version` counts its changes; `evaluated_version` is the
    version whose results are stored for every entity (the scorecard is `evaluating` while
    they differ)."""

    __tablename__ = "scorecards"
    __table_args__ = (
        ForeignKeyConstraint(
            ["org_id", "blueprint"],
            ["blueprints.org_id", "blueprints.identifier"],
            ondelete="CASCADE",
        ),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    blueprint: Mapped[str] = mapped_column(String(100), primary_key=True)
    identifier: Mapped[str] = mapped_column(String(100), primary_key=True)
    title: Mapped[str] = mapped_column(String(200), nullable=False)
    levels: Mapped[list[Any]] = mapped_column(JSONB, nullable=False)
    rules: Mapped[list[Any]] = mapped_column(JSONB, nullable=False)
    filter: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    # Port's `properties`: the scorecard's own key-value pairs (not graded, not evaluated).
    properties: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, server_default=text("'{}'::jsonb")
    )
    version: Mapped[int] = mapped_column(Integer, nullable=False, server_default="1")
    evaluated_version: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    # Entities its rules read through relations (mirror / aggregation properties) changed:
    # the worker evaluates it again for the whole blueprint.
    refresh_requested: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="false")
    # The worker's evaluation failing (app/scorecards/evaluate.py): how many times in a row,
    # the last reason, and when it is tried again (backing off). Cleared by a success.
    evaluation_failures: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    evaluation_error: Mapped[str | None] = mapped_column(Text)
    evaluation_retry_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = timestamp()
    created_by: Mapped[str] = mapped_column(String(200), nullable=False)
    updated_at: Mapped[datetime] = timestamp()
    updated_by: Mapped[str] = mapped_column(String(200), nullable=False)


class ScorecardResult(Base):
    """One entity's standing on one scorecard: the rank of its level (0 = the base level) and
    whether each rule passed (in the definition's order), as evaluated from the entity's
    state at `entity_at` under the scorecard's `version` (a later evaluation never loses to
    an older one). Level and rule names come from the definition when results are read.

    Kept narrow and without foreign keys: a full evaluation writes a row per entity, and a
    foreign-key check per row cost as much as the rest of the write. An entity's results go
    with it through a statement trigger on entities (migration 0007); a scorecard's are
    deleted with it by the service."""

    __tablename__ = "scorecard_results"
    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    blueprint: Mapped[str] = mapped_column(String(100), primary_key=True)
    identifier: Mapped[str] = mapped_column(String(1000), primary_key=True)
    scorecard: Mapped[str] = mapped_column(String(100), primary_key=True)
    level_rank: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    passed: Mapped[list[bool]] = mapped_column(ARRAY(Boolean), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    entity_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class ScorecardSnapshot(Base):
    """A scorecard's summary as it stood on a day (one per day: the trend)."""

    __tablename__ = "scorecard_snapshots"
    __table_args__ = (
        ForeignKeyConstraint(
            ["org_id", "blueprint", "scorecard"],
            ["scorecards.org_id", "scorecards.blueprint", "scorecards.identifier"],
            ondelete="CASCADE",
        ),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    blueprint: Mapped[str] = mapped_column(String(100), primary_key=True)
    scorecard: Mapped[str] = mapped_column(String(100), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    summary: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    taken_at: Mapped[datetime] = timestamp()
