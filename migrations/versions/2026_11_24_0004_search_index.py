"""Search: one GIN index answering property equality and containment within a tenant.

The indexed document is an entity's properties plus its org and blueprint under keys no
property can have (`$org`, `$blueprint`), so a containment query names all three and the
index intersects them itself: a value common in every tenant never makes the planner read
other tenants' rows (btree_gin would do the same with a composite index, but it is a
contrib extension that not every PostgreSQL has).

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
    # IMMUTABLE is true of this body for uuid and text inputs (jsonb_build_object is only
    # STABLE because of other input types); index expressions need it.
    op.execute(
        """
        CREATE FUNCTION entity_search_doc(org_id uuid, blueprint text, properties jsonb)
        RETURNS jsonb LANGUAGE sql IMMUTABLE PARALLEL SAFE
        RETURN properties || jsonb_build_object('$org', org_id, '$blueprint', blueprint)
        """
    )
    op.execute(
        "CREATE INDEX ix_entities_search_doc ON entities USING gin "
        "(entity_search_doc(org_id, blueprint, properties) jsonb_path_ops)"
    )


def downgrade() -> None:
    op.execute("DROP INDEX ix_entities_search_doc")
    op.execute("DROP FUNCTION entity_search_doc(uuid, text, jsonb)")
