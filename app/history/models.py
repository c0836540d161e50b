"""History's own table: the names a blueprint's properties and relations had, so values
recorded under a former name are read under today's (entity events are never rewritten)."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKeyConstraint, Identity, Index, String, text
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base


class NameChange(Base):
    """A property or relation of `blueprint` renamed (`new_name` set) or removed (`new_name`
    null) at `at`. Events recorded before `at` name it by `old_name`."""

    __tablename__ = "history_name_changes"
    __table_args__ = (
        ForeignKeyConstraint(["org_id"], ["organizations.id"], ondelete="CASCADE"),
        Index("ix_history_name_changes_blueprint", "org_id", "blueprint", "id"),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    blueprint: Mapped[str] = mapped_column(String(100), nullable=False)
    kind: Mapped[str] = mapped_column(String(10), nullable=False)
    old_name: Mapped[str] = mapped_column(String(100), nullable=False)
    new_name: Mapped[str | None] = mapped_column(String(100))
    # The statement's own clock, not the transaction's start: a write that began before the
    # change and still used the old name is recorded before it.
    at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=text("clock_timestamp()")
    )
