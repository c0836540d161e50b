"""Entities, their relations, the entity event feed and catalog migrations.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from app.db import rls

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONB = postgresql.JSONB(astext_type=sa.Text())
UUID = postgresql.UUID(as_uuid=True)
TABLES = ("catalog_migrations", "entity_events", "entity_relations", "entities")


def _ts(name: str) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)


def upgrade() -> None:
    op.create_table(
        "entities",
        sa.Column("org_id", UUID, nullable=False),
        sa.Column("blueprint", sa.String(100), nullable=False),
        sa.Column("identifier", sa.String(1000), nullable=False),
        sa.Column("title", sa.Text(), nullable=True),
        sa.Column("icon", sa.String(200), nullable=True),
        sa.Column("team", postgresql.ARRAY(sa.Text()), server_default="{}", nullable=False),
        sa.Column("properties", JSONB, nullable=False),
        sa.Column("datasource", sa.Text(), nullable=True),
        _ts("created_at"),
        sa.Column("created_by", sa.String(200), nullable=False),
        _ts("updated_at"),
        sa.Column("updated_by", sa.String(200), nullable=False),
        # NO ACTION: a blueprint that still has entities cannot be deleted.
        sa.ForeignKeyConstraint(
            ["org_id", "blueprint"],
            ["blueprints.org_id", "blueprints.identifier"],
            name="fk_entities_org_id_blueprints",
        ),
        sa.PrimaryKeyConstraint("org_id", "blueprint", "identifier", name="pk_entities"),
    )
    op.create_table(
        "entity_relations",
        sa.Column("org_id", UUID, nullable=False),
        sa.Column("source_blueprint", sa.String(100), nullable=False),
        sa.Column("source_identifier", sa.String(1000), nullable=False),
        sa.Column("relation", sa.String(100), nullable=False),
        sa.Column("target_identifier", sa.String(1000), nullable=False),
        sa.Column("target_blueprint", sa.String(100), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id", "source_blueprint", "source_identifier"],
            ["entities.org_id", "entities.blueprint", "entities.identifier"],
            name="fk_entity_relations_source_entities",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id", "target_blueprint", "target_identifier"],
            ["entities.org_id", "entities.blueprint", "entities.identifier"],
            name="fk_entity_relations_target_entities",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id", "source_blueprint", "relation"],
            [
                "blueprint_relations.org_id",
                "blueprint_relations.blueprint",
                "blueprint_relations.relation",
            ],
            name="fk_entity_relations_relation_blueprint_relations",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "org_id",
            "source_blueprint",
            "source_identifier",
            "relation",
            "target_identifier",
            name="pk_entity_relations",
        ),
    )
    op.create_index(
        "ix_entity_relations_target",
        "entity_relations",
        ["org_id", "target_blueprint", "target_identifier"],
    )
    op.create_table(
        "entity_events",
        sa.Column("org_id", UUID, nullable=False),
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("blueprint", sa.String(100), nullable=False),
        sa.Column("identifier", sa.String(1000), nullable=False),
        sa.Column("action", sa.String(10), nullable=False),
        sa.Column("before", JSONB, nullable=True),
        sa.Column("after", JSONB, nullable=True),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("origin", sa.String(40), nullable=False),
        sa.Column("run_id", sa.String(200), nullable=True),
        _ts("at"),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name="fk_entity_events_org_id_organizations",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("org_id", "id", name="pk_entity_events"),
    )
    op.create_index(
        "ix_entity_events_entity", "entity_events", ["org_id", "blueprint", "identifier", "id"]
    )
    op.create_table(
        "catalog_migrations",
        sa.Column("org_id", UUID, nullable=False),
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("source_blueprint", sa.String(100), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("mapping", JSONB, nullable=False),
        sa.Column("success_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("failure_count", sa.Integer(), server_default="0", nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name="fk_catalog_migrations_org_id_organizations",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("org_id", "id", name="pk_catalog_migrations"),
    )
    for table in TABLES:
        privileges = (
            "SELECT, INSERT" if table == "entity_events" else "SELECT, INSERT, UPDATE, DELETE"
        )
        for statement in rls.fence_table(table, privileges=privileges):
            op.execute(statement)


def downgrade() -> None:
    for table in TABLES:
        for statement in rls.unfence_table(table):
            op.execute(statement)
    op.drop_table("catalog_migrations")
    op.drop_index("ix_entity_events_entity", table_name="entity_events")
    op.drop_table("entity_events")
    op.drop_index("ix_entity_relations_target", table_name="entity_relations")
    op.drop_table("entity_relations")
    op.drop_table("entities")
