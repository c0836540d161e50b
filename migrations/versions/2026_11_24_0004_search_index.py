"""Search: a GIN index answering property equality and containment.

`jsonb_path_ops` indexes each path-value pair of an entity's properties; the search
compiler writes equality, `in`, `containsAny` and array membership as `properties @> ...`
and merges the containments of one `and` group into a single document.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_entities_properties",
        "entities",
        ["properties"],
        postgresql_using="gin",
        postgresql_ops={"properties": "jsonb_path_ops"},
    )


def downgrade() -> None:
    op.drop_index("ix_entities_properties", table_name="entities")
