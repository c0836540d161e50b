"""Pages and their widgets. Every key leads with org_id.

A page row keeps Port's page fields (title, icon, section, ...) in `attributes` as given;
`type` and `blueprint` are columns because lists and catalog pages select by them. Widgets
are rows of their own, each addressed by its page and id: a dashboard's widgets sit inside
a `dashboard-widget` (their `container`), in `position` order.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKeyConstraint, Integer, String
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, timestamp


class Page(Base):
    __tablename__ = "pages"
    __table_args__ = (ForeignKeyConstraint(["org_id"], ["organizations.id"], ondelete="CASCADE"),)

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    identifier: Mapped[str] = mapped_column(String(100), primary_key=True)
    type: Mapped[str] = mapped_column(String(40), nullable=False)
    blueprint: Mapped[str | None] = mapped_column(String(100))
    attributes: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    # Port's page permissions: who reads the page, who changes it (blocks of users, roles
    # and teams; Admins always do both).
    read_access: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    update_access: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    created_at: Mapped[datetime] = timestamp()
    created_by: Mapped[str] = mapped_column(String(200), nullable=False)
    updated_at: Mapped[datetime] = timestamp()
    updated_by: Mapped[str] = mapped_column(String(200), nullable=False)


class PageWidget(Base):
    __tablename__ = "page_widgets"
    __table_args__ = (
        ForeignKeyConstraint(
            ["org_id", "page"], ["pages.org_id", "pages.identifier"], ondelete="CASCADE"
        ),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    page: Mapped[str] = mapped_column(String(100), primary_key=True)
    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    container: Mapped[str | None] = mapped_column(String(100))
    position: Mapped[int] = mapped_column(Integer, nullable=False)
    type: Mapped[str] = mapped_column(String(60), nullable=False)
    definition: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
