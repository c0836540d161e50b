"""Search: trigram indexes for text rules (pg_trgm), usable under row-level security.

Text rules (`contains`, `beginsWith`, `endsWith`) compile to `LIKE` with the term's `%`, `_`
and `\\` escaped (app/search/compiler.py). A GIN `gin_trgm_ops` index answers `LIKE` for any
term of three characters or more, wherever it sits in the value; the worker builds one per
(org, blueprint) for titles, identifiers and string properties where it pays off
(app/search/indexes.py). This migration installs pg_trgm (a trusted extension: the database
owner may install it) when the server has it; without it text rules still answer, only
without indexes.

Under row-level security the planner takes only leakproof functions as index conditions,
and neither `textlike` (`~~`, LIKE) nor `jsonb_object_field_text` (`->>`, a string
property's value) is marked so. `->>` raises no error (it is null on anything but an
object); LIKE raises one only for a malformed pattern (an escape character at its end),
and Portolan's patterns are always the escaped term, bound as a parameter, never a column.
Both are marked LEAKPROOF here (superuser only, as in 0005 and 0006; on Citus the workers
get the marks too, app/db/citus.py).

Revision ID: 0029
Revises: 0028
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0029"
down_revision: str | None = "0028"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SUPERUSER = "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
_LEAKPROOF = ("textlike(text, text)", "jsonb_object_field_text(jsonb, text)")
_AVAILABLE = "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm')"


def upgrade() -> None:
    bind = op.get_bind()
    if bool(bind.exec_driver_sql(_AVAILABLE).scalar()):
        op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm WITH SCHEMA public")
    if bool(bind.exec_driver_sql(_SUPERUSER).scalar()):
        for function in _LEAKPROOF:
            op.execute(f"ALTER FUNCTION {function} LEAKPROOF")


def downgrade() -> None:
    bind = op.get_bind()
    if bool(bind.exec_driver_sql(_SUPERUSER).scalar()):
        for function in _LEAKPROOF:
            op.execute(f"ALTER FUNCTION {function} NOT LEAKPROOF")
    # The worker's trigram indexes depend on the extension's operator classes.
    op.execute(
        """
        DO $$
        DECLARE name text;
        BEGIN
            FOR name IN
                SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                WHERE i.indrelid = 'public.entities'::regclass
                  AND pg_get_indexdef(c.oid) LIKE '%gin_trgm_ops%'
            LOOP
                EXECUTE format('DROP INDEX public.%I', name);
            END LOOP;
        END
        $$
        """
    )
    op.execute("DROP EXTENSION IF EXISTS pg_trgm")
