"""Citus: a schema that distributes by org_id and runs the same on a single PostgreSQL.

- The permission rows' foreign keys to their blueprint or action lose `ON UPDATE CASCADE`:
  identifiers never change in place (a rename is a new row), and Citus refuses a cascading
  update through a key that holds the distribution column.
- `portolan_drop_entity_scorecard_results()`: the per-row form of the trigger that takes an
  entity's scorecard results with it. A single PostgreSQL keeps the statement trigger (one
  delete per statement); Citus cannot run a transition table on a shard, so distributing
  the schema (app/db/citus.py) swaps this one in.

Revision ID: 0028
Revises: 0027
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0028"
down_revision: str | None = "0027"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEYS = (
    ("blueprint_permissions", "blueprint", "blueprints"),
    ("action_permissions", "action", "actions"),
)


def _recreate_keys(on_update: str) -> None:
    for table, column, parent in _KEYS:
        name = f"fk_{table}_org_id_{column}_{parent}"
        op.drop_constraint(name, table, type_="foreignkey")
        op.create_foreign_key(
            name,
            table,
            parent,
            ["org_id", column],
            ["org_id", "identifier"],
            ondelete="CASCADE",
            onupdate=on_update or None,
        )


def upgrade() -> None:
    _recreate_keys("")
    op.execute(
        """
        CREATE FUNCTION portolan_drop_entity_scorecard_results() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            DELETE FROM scorecard_results
            WHERE org_id = OLD.org_id AND blueprint = OLD.blueprint
              AND identifier = OLD.identifier;
            RETURN NULL;
        END
        $$
        """
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION portolan_drop_entity_scorecard_results()")
    _recreate_keys("CASCADE")
