"""Scorecards: definitions per blueprint, each entity's stored result, daily summaries.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from app.db import rls

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONB = postgresql.JSONB(astext_type=sa.Text())


def _ts(name: str) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)


def upgrade() -> None:
    op.create_table(
        "scorecards",
        sa.Column("org_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("blueprint", sa.String(100), nullable=False),
        sa.Column("identifier", sa.String(100), nullable=False),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("levels", JSONB, nullable=False),
        sa.Column("rules", JSONB, nullable=False),
        sa.Column("filter", JSONB, nullable=True),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("evaluated_version", sa.Integer(), server_default="0", nullable=False),
        sa.Column("refresh_requested", sa.Boolean(), server_default="false", nullable=False),
        _ts("created_at"),
        sa.Column("created_by", sa.String(200), nullable=False),
        _ts("updated_at"),
        sa.Column("updated_by", sa.String(200), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id", "blueprint"],
            ["blueprints.org_id", "blueprints.identifier"],
            name="fk_scorecards_org_id_blueprint_blueprints",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("org_id", "blueprint", "identifier", name="pk_scorecards"),
    )
    op.create_table(
        "scorecard_results",
        sa.Column("org_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("blueprint", sa.String(100), nullable=False),
        sa.Column("identifier", sa.String(1000), nullable=False),
        sa.Column("scorecard", sa.String(100), nullable=False),
        sa.Column("level_rank", sa.SmallInteger(), nullable=False),
        sa.Column("passed", postgresql.ARRAY(sa.Boolean()), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("entity_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint(
            "org_id", "blueprint", "identifier", "scorecard", name="pk_scorecard_results"
        ),
    )
    # Room on each page, so rewriting a result in place (same keys) stays on its page.
    op.execute("ALTER TABLE scorecard_results SET (fillfactor = 80)")
    # An entity's results go with it: one statement-level trigger per delete statement
    # (a foreign key would check every result row a full evaluation writes).
    op.execute(
        """
        CREATE FUNCTION portolan_drop_scorecard_results() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            DELETE FROM scorecard_results r USING gone g
            WHERE r.org_id = g.org_id AND r.blueprint = g.blueprint
              AND r.identifier = g.identifier;
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER tr_entities_drop_scorecard_results AFTER DELETE ON entities "
        "REFERENCING OLD TABLE AS gone FOR EACH STATEMENT "
        "EXECUTE FUNCTION portolan_drop_scorecard_results()"
    )
    op.create_table(
        "scorecard_snapshots",
        sa.Column("org_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("blueprint", sa.String(100), nullable=False),
        sa.Column("scorecard", sa.String(100), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("summary", JSONB, nullable=False),
        _ts("taken_at"),
        sa.ForeignKeyConstraint(
            ["org_id", "blueprint", "scorecard"],
            ["scorecards.org_id", "scorecards.blueprint", "scorecards.identifier"],
            name="fk_scorecard_snapshots_org_id_blueprint_scorecard_scorecards",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "org_id", "blueprint", "scorecard", "day", name="pk_scorecard_snapshots"
        ),
    )
    for table in ("scorecards", "scorecard_results", "scorecard_snapshots"):
        for statement in rls.fence_table(table):
            op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TRIGGER tr_entities_drop_scorecard_results ON entities")
    op.execute("DROP FUNCTION portolan_drop_scorecard_results()")
    op.drop_table("scorecard_snapshots")
    op.drop_table("scorecard_results")
    op.drop_table("scorecards")
