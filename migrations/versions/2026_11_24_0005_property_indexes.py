"""Search: typed reads of property values that never fail, for range rules and indexes.

`portolan_number` is a value as a number when it is one (null otherwise); `portolan_time`
a date-time string as a timestamp (null when it is not one; a string without a UTC offset
is read as UTC, so the result never depends on the session). The (document, key) forms
read a stored property: search compares number and date-time properties through them, and
the service indexes them per (org, blueprint, property) in the background
(app/search/indexes.py). An index expression must never raise, or one bad value would
fail every write to the table. (`portolan_time` catches cast errors in a subtransaction,
which parallel workers cannot start: it is not marked parallel safe.)

Tenant statements run under row-level security, where the planner lets only leakproof
functions be index conditions. These functions raise nothing, so they are marked
LEAKPROOF, as is jsonb containment (GIN): that takes a superuser, and a migration run by
another role leaves them unmarked (the indexes then serve operator work only; see
docs/search.md).

The relation-target index carries the source columns, so walks downstream read it alone.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


_SUPERUSER = "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"


def upgrade() -> None:
    leakproof = bool(op.get_bind().exec_driver_sql(_SUPERUSER).scalar())
    marks = "LEAKPROOF" if leakproof else ""
    # A value: for values computed in a statement (mirror and aggregation properties).
    op.execute(
        """
        CREATE FUNCTION portolan_number(value jsonb) RETURNS numeric
        LANGUAGE sql IMMUTABLE PARALLEL SAFE
        AS $$ SELECT CASE WHEN jsonb_typeof(value) = 'number' THEN value::numeric END $$
        """
    )
    # A stored property, by document and key: what range rules compare and indexes key.
    op.execute(
        f"""
        CREATE FUNCTION portolan_number(document jsonb, key text) RETURNS numeric
        LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE {marks}
        AS $$
        BEGIN
            IF jsonb_typeof(document -> key) = 'number' THEN
                RETURN (document -> key)::numeric;
            END IF;
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        rf"""
        CREATE FUNCTION portolan_time(value jsonb) RETURNS timestamptz
        LANGUAGE plpgsql IMMUTABLE STRICT {marks}
        AS $$
        DECLARE
            text_value text;
        BEGIN
            IF jsonb_typeof(value) <> 'string' THEN
                RETURN NULL;
            END IF;
            text_value := value #>> '{{}}';
            IF text_value !~ '^\d{{4}}-\d{{2}}-\d{{2}}' THEN
                RETURN NULL;
            END IF;
            IF text_value !~ '([Zz]|[+-]\d{{2}}(:?\d{{2}})?)$' THEN
                text_value := text_value || '+00:00';
            END IF;
            RETURN text_value::timestamptz;
        EXCEPTION WHEN others THEN
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION portolan_time(document jsonb, key text) RETURNS timestamptz
        LANGUAGE plpgsql IMMUTABLE STRICT {marks}
        AS $$ BEGIN RETURN portolan_time(document -> key); END $$
        """
    )
    if leakproof:
        # Under row-level security only leakproof operators may be index conditions: the
        # GIN index answers `properties @> ...` for tenants only once it is marked so.
        # jsonb containment raises no error that could reveal a row it is not shown.
        op.execute("ALTER FUNCTION jsonb_contains(jsonb, jsonb) LEAKPROOF")
    op.drop_index("ix_entity_relations_target", table_name="entity_relations")
    op.create_index(
        "ix_entity_relations_target",
        "entity_relations",
        ["org_id", "target_blueprint", "target_identifier"],
        postgresql_include=["source_blueprint", "source_identifier", "relation"],
    )


def downgrade() -> None:
    op.drop_index("ix_entity_relations_target", table_name="entity_relations")
    op.create_index(
        "ix_entity_relations_target",
        "entity_relations",
        ["org_id", "target_blueprint", "target_identifier"],
    )
    if bool(op.get_bind().exec_driver_sql(_SUPERUSER).scalar()):
        op.execute("ALTER FUNCTION jsonb_contains(jsonb, jsonb) NOT LEAKPROOF")
    op.execute("DROP FUNCTION portolan_time(jsonb, text)")
    op.execute("DROP FUNCTION portolan_time(jsonb)")
    op.execute("DROP FUNCTION portolan_number(jsonb, text)")
    op.execute("DROP FUNCTION portolan_number(jsonb)")
