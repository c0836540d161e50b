"""Catalog tables. Every key leads with org_id; relation definitions are rows so that the
database itself refuses to drop a blueprint another blueprint's relation targets."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ARRAY,
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

from app.db.base import Base, current_xid, timestamp


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
    created_at: Mapped[datetime] = timestamp()
    created_by: Mapped[str] = mapped_column(String(200), nullable=False)
    updated_at: Mapped[datetime] = timestamp()
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


class Entity(Base):
    __tablename__ = "entities"
    __table_args__ = (
        ForeignKeyConstraint(
            ["org_id", "blueprint"], ["blueprints.org_id", "blueprints.identifier"]
        ),
        # Search containment (app/search): see migration 0004.
        Index(
            "ix_entities_properties",
            "properties",
            postgresql_using="gin",
            postgresql_ops={"properties": "jsonb_path_ops"},
        ),
        # Entities by their writer, for Ocean's reconciliation: see migration 0024.
        Index(
            "ix_entities_datasource",
            "org_id",
            "datasource",
            "blueprint",
            "identifier",
            postgresql_where=text("datasource IS NOT NULL"),
        ),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    blueprint: Mapped[str] = mapped_column(String(100), primary_key=True)
    identifier: Mapped[str] = mapped_column(String(1000), primary_key=True)
    title: Mapped[str | None] = mapped_column(Text)
    icon: Mapped[str | None] = mapped_column(String(200))
    team: Mapped[list[str]] = mapped_column(ARRAY(Text), nullable=False, server_default="{}")
    properties: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    # Compared in code point order, so a prefix is a range of ix_entities_datasource.
    datasource: Mapped[str | None] = mapped_column(Text(collation="C"))
    created_at: Mapped[datetime] = timestamp()
    created_by: Mapped[str] = mapped_column(String(200), nullable=False)
    updated_at: Mapped[datetime] = timestamp()
    updated_by: Mapped[str] = mapped_column(String(200), nullable=False)


class EntityRelation(Base):
    """One row per link: (source entity, relation) -> target entity."""

    __tablename__ = "entity_relations"
    __table_args__ = (
        ForeignKeyConstraint(
            ["org_id", "source_blueprint", "source_identifier"],
            ["entities.org_id", "entities.blueprint", "entities.identifier"],
            name="fk_entity_relations_source_entities",
            ondelete="CASCADE",
        ),
        ForeignKeyConstraint(
            ["org_id", "target_blueprint", "target_identifier"],
            ["entities.org_id", "entities.blueprint", "entities.identifier"],
            name="fk_entity_relations_target_entities",
            ondelete="CASCADE",
        ),
        ForeignKeyConstraint(
            ["org_id", "source_blueprint", "relation"],
            [
                "blueprint_relations.org_id",
                "blueprint_relations.blueprint",
                "blueprint_relations.relation",
            ],
            name="fk_entity_relations_relation_blueprint_relations",
            ondelete="CASCADE",
        ),
        # Covers downstream walks (migration 0005).
        Index(
            "ix_entity_relations_target",
            "org_id",
            "target_blueprint",
            "target_identifier",
            postgresql_include=["source_blueprint", "source_identifier", "relation"],
        ),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    source_blueprint: Mapped[str] = mapped_column(String(100), primary_key=True)
    source_identifier: Mapped[str] = mapped_column(String(1000), primary_key=True)
    relation: Mapped[str] = mapped_column(String(100), primary_key=True)
    target_identifier: Mapped[str] = mapped_column(String(1000), primary_key=True)
    target_blueprint: Mapped[str] = mapped_column(String(100), nullable=False)


class EntityEvent(Base):
    """Append-only feed of entity changes, written in the transaction of the change."""

    __tablename__ = "entity_events"
    __table_args__ = (
        ForeignKeyConstraint(["org_id"], ["organizations.id"], ondelete="CASCADE"),
        Index("ix_entity_events_entity", "org_id", "blueprint", "identifier", "id"),
        Index("ix_entity_events_xid", "xid"),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    blueprint: Mapped[str] = mapped_column(String(100), nullable=False)
    identifier: Mapped[str] = mapped_column(String(1000), nullable=False)
    action: Mapped[str] = mapped_column(String(10), nullable=False)
    before: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    actor: Mapped[str] = mapped_column(String(200), nullable=False)
    origin: Mapped[str] = mapped_column(String(40), nullable=False)
    run_id: Mapped[str | None] = mapped_column(String(200))
    # The integration installation that wrote it (an Ocean integration's identifier).
    installation: Mapped[str | None] = mapped_column(String(100))
    # The incoming webhook event whose mapping made it.
    webhook_event: Mapped[str | None] = mapped_column(String(100))
    at: Mapped[datetime] = timestamp()
    xid: Mapped[str] = current_xid()


class CatalogMigration(Base):
    """Long-running catalog operations: deleting all of a blueprint's entities, and data
    migrations (app/catalog/data_migrations.py), whose progress, lease and report live here
    so that a worker that stops leaves the next one to resume at `cursor`."""

    __tablename__ = "catalog_migrations"
    __table_args__ = (
        ForeignKeyConstraint(["org_id"], ["organizations.id"], ondelete="CASCADE"),
        Index(
            "ix_catalog_migrations_active",
            "org_id",
            "created_at",
            postgresql_where=text("status IN ('PENDING', 'RUNNING', 'PENDING_CANCELLATION')"),
        ),
        Index("ix_catalog_migrations_created", "org_id", "created_at"),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    source_blueprint: Mapped[str] = mapped_column(String(100), nullable=False)
    status: Mapped[str] = mapped_column(String(20), nullable=False)
    actor: Mapped[str] = mapped_column(String(200), nullable=False)
    mapping: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    success_count: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    failure_count: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    created_at: Mapped[datetime] = timestamp()
    updated_at: Mapped[datetime] = timestamp()
    # Data migrations (migration 0033).
    target_blueprint: Mapped[str | None] = mapped_column(String(100))
    dry_run: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))
    delete_source: Mapped[bool] = mapped_column(
        Boolean, nullable=False, server_default=text("false")
    )
    cursor: Mapped[str | None] = mapped_column(String(1000))
    total_count: Mapped[int | None] = mapped_column(Integer)
    processed_count: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    skipped_count: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    created_count: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    updated_count: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    unchanged_count: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    deleted_count: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    timeout_count: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    errors: Mapped[list[Any]] = mapped_column(
        JSONB, nullable=False, server_default=text("'[]'::jsonb")
    )
    preview: Mapped[list[Any]] = mapped_column(
        JSONB, nullable=False, server_default=text("'[]'::jsonb")
    )
    message: Mapped[str | None] = mapped_column(Text)
    cancel_reason: Mapped[str | None] = mapped_column(Text)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
