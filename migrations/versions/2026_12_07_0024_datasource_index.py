"""Entities by datasource: the index Ocean's reconciliation pages through
(POST /v1/blueprints/entities/datasource-entities, app/catalog/datasource.py).

Every entity already keeps its last writer's `User-Agent` as `datasource` (migration 0003;
Ocean's is `port-ocean/{type}/{version}/{identifier}/{exporter|gitops}`), so nothing is
backfilled. Ocean asks for a prefix and a suffix of it: the prefix is a range of
(org_id, datasource, blueprint, identifier), read in that order, the suffix a filter on
the rows of that range. For the prefix to be a range whatever the database's locale, the
column compares in the "C" collation (code point order); PostgreSQL changes a column's
collation without rewriting the table. Only entities with a datasource are indexed.

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0024"
down_revision: str | None = "0023"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.alter_column(
        "entities",
        "datasource",
        type_=sa.Text(collation="C"),
        existing_type=sa.Text(),
        existing_nullable=True,
    )
    op.create_index(
        "ix_entities_datasource",
        "entities",
        ["org_id", "datasource", "blueprint", "identifier"],
        postgresql_where=sa.text("datasource IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_entities_datasource", table_name="entities")
    op.alter_column(
        "entities",
        "datasource",
        type_=sa.Text(),
        existing_type=sa.Text(collation="C"),
        existing_nullable=True,
    )
