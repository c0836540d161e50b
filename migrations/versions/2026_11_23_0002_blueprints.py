"""Blueprints and their relation definitions.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from app.db import rls

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONB = postgresql.JSONB(astext_type=sa.Text())


def _ts(name: str) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)


def upgrade() -> None:
    op.create_table(
        "blueprints",
        sa.Column("org_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("identifier", sa.String(100), nullable=False),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("icon", sa.String(200), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("schema", JSONB, nullable=False),
        sa.Column("relations", JSONB, nullable=False),
        sa.Column("mirror_properties", JSONB, nullable=False),
        sa.Column("calculation_properties", JSONB, nullable=False),
        sa.Column("aggregation_properties", JSONB, nullable=False),
        sa.Column("ownership", JSONB, nullable=True),
        sa.Column("team_inheritance", JSONB, nullable=True),
        sa.Column("changelog_destination", JSONB, nullable=True),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        _ts("created_at"),
        sa.Column("created_by", sa.String(200), nullable=False),
        _ts("updated_at"),
        sa.Column("updated_by", sa.String(200), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name="fk_blueprints_org_id_organizations",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("org_id", "identifier", name="pk_blueprints"),
    )
    for statement in rls.fence_table("blueprints"):
        op.execute(statement)

    op.create_table(
        "blueprint_relations",
        sa.Column("org_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("blueprint", sa.String(100), nullable=False),
        sa.Column("relation", sa.String(100), nullable=False),
        sa.Column("target", sa.String(100), nullable=False),
        sa.Column("many", sa.Boolean(), nullable=False),
        sa.Column("required", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id", "blueprint"],
            ["blueprints.org_id", "blueprints.identifier"],
            name="fk_blueprint_relations_org_id_blueprints",
            ondelete="CASCADE",
        ),
        # NO ACTION (checked at the end of the statement): a blueprint's relations to
        # itself are cascaded away with it, a relation from another blueprint holds it.
        sa.ForeignKeyConstraint(
            ["org_id", "target"],
            ["blueprints.org_id", "blueprints.identifier"],
            name="fk_blueprint_relations_target_blueprints",
        ),
        sa.PrimaryKeyConstraint("org_id", "blueprint", "relation", name="pk_blueprint_relations"),
    )
    op.create_index(
        "ix_blueprint_relations_org_id_target", "blueprint_relations", ["org_id", "target"]
    )
    for statement in rls.fence_table("blueprint_relations"):
        op.execute(statement)


def downgrade() -> None:
    for table in ("blueprint_relations", "blueprints"):
        for statement in rls.unfence_table(table):
            op.execute(statement)
    op.drop_index("ix_blueprint_relations_org_id_target", table_name="blueprint_relations")
    op.drop_table("blueprint_relations")
    op.drop_table("blueprints")
