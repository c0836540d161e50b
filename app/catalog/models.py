"""Catalog tables. Every key leads with org_id; relation definitions are rows so that the
database itself refuses to drop a blueprint another blueprint's relation targets."""

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
    func,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base


def _ts() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class Blueprint(Base):
    __tablename__ = "blueprints"
    __table_args__ = (ForeignKeyConstraint(["org_id"], ["organizations.id"], ondelete="CASCADE"),)

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    identifier: Mapped[str] = mapped_column(String(100), primary_key=True)
    title: Mapped[str] = mapped_column(String(200), nullable=False)
    icon: Mapped[str | None] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    schema: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    relations: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    mirror_properties: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    calculation_properties: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    aggregation_properties: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    ownership: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    team_inheritance: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    changelog_destination: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    version: Mapped[int] = mapped_column(Integer, nullable=False, server_default="1")
    created_at: Mapped[datetime] = _ts()
    created_by: Mapped[str] = mapped_column(String(200), nullable=False)
    updated_at: Mapped[datetime] = _ts()
    updated_by: Mapped[str] = mapped_column(String(200), nullable=False)


class BlueprintRelation(Base):
    """One row per relation definition: (blueprint, relation) -> target blueprint."""

    __tablename__ = "blueprint_relations"
    __table_args__ = (
        ForeignKeyConstraint(
            ["org_id", "blueprint"],
            ["blueprints.org_id", "blueprints.identifier"],
            ondelete="CASCADE",
        ),
        ForeignKeyConstraint(
            ["org_id", "target"],
            ["blueprints.org_id", "blueprints.identifier"],
            name="fk_blueprint_relations_target_blueprints",
        ),
        Index("ix_blueprint_relations_org_id_target", "org_id", "target"),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    blueprint: Mapped[str] = mapped_column(String(100), primary_key=True)
    relation: Mapped[str] = mapped_column(String(100), primary_key=True)
    target: Mapped[str] = mapped_column(String(100), nullable=False)
    many: Mapped[bool] = mapped_column(Boolean, nullable=False)
    required: Mapped[bool] = mapped_column(Boolean, nullable=False)
