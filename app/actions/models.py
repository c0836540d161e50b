"""Action definitions. Every key leads with org_id."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, ForeignKeyConstraint, String, Text
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
