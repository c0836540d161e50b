"""The audit log's table, written only by triggers (migration 0014). Entity changes are
read from the catalog's entity events (migration 0015)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKeyConstraint, Identity, Index, String, Text
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, timestamp


class AuditEntry(Base):
    __tablename__ = "audit_log"
    __table_args__ = (
        ForeignKeyConstraint(["org_id"], ["organizations.id"], ondelete="CASCADE"),
        Index("ix_audit_log_at", "org_id", "at", "id"),
        Index("ix_audit_log_identifier", "org_id", "resource", "identifier", "at"),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    at: Mapped[datetime] = timestamp()
    actor: Mapped[str] = mapped_column(String(200), nullable=False)
    origin: Mapped[str] = mapped_column(String(40), nullable=False)
    resource: Mapped[str] = mapped_column(String(40), nullable=False)
    identifier: Mapped[str | None] = mapped_column(Text)
    blueprint: Mapped[str | None] = mapped_column(String(100))
    run_id: Mapped[str | None] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(10), nullable=False)
    status: Mapped[str] = mapped_column(String(10), nullable=False)
    diff: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
