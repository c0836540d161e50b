"""Search: number comparisons usable by range indexes under row-level security; costs of
the typed readers.

Under row-level security the planner takes only leakproof operators as index conditions.
PostgreSQL 15 does not mark numeric comparisons leakproof, so `portolan_number(properties,
'p') > 50` could use a range index for operator work but never for a tenant (timestamp
comparisons are marked already). Numeric comparisons raise no error whatever their
operands, so they are marked here (superuser only, as in 0005).

`portolan_number(jsonb, text)` gets a cost near what it takes (PL/pgSQL functions default to
100, which made the planner shun a primary-key scan that filters on it and read every
row of a range index instead).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SUPERUSER = "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
_COMPARISONS = ("numeric_eq", "numeric_ne", "numeric_lt", "numeric_le", "numeric_gt", "numeric_ge")


def upgrade() -> None:
    if bool(op.get_bind().exec_driver_sql(_SUPERUSER).scalar()):
        for name in _COMPARISONS:
            op.execute(f"ALTER FUNCTION {name}(numeric, numeric) LEAKPROOF")
    op.execute("ALTER FUNCTION portolan_number(jsonb, text) COST 25")
    op.execute("ALTER FUNCTION portolan_time(jsonb, text) COST 50")


def downgrade() -> None:
    op.execute("ALTER FUNCTION portolan_time(jsonb, text) COST 100")
    op.execute("ALTER FUNCTION portolan_number(jsonb, text) COST 100")
    if bool(op.get_bind().exec_driver_sql(_SUPERUSER).scalar()):
        for name in _COMPARISONS:
            op.execute(f"ALTER FUNCTION {name}(numeric, numeric) NOT LEAKPROOF")
