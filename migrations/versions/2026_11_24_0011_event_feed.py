"""The event feed automations read: entity and run events stamped with their transaction,
the feed's cursor, and timer cursors.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from app.db import rls

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONB = postgresql.JSONB(astext_type=sa.Text())
UUID = postgresql.UUID(as_uuid=True)

# What a run looks like in its RUN_CREATED / RUN_UPDATED events (Port's run fields).
_RUN_DOC = """jsonb_build_object(
    'id', r.id, 'status', r.status, 'statusLabel', r.status_label,
    'action', jsonb_build_object('identifier', r.action),
    'blueprint', r.blueprint, 'entity', r.entity, 'properties', r.properties,
    'source', r.source, 'link', r.link, 'summary', r.summary,
    'externalRunId', r.external_run_id, 'approval', r.approval,
    'createdBy', r.created_by, 'updatedBy', r.updated_by,
    'createdAt', r.created_at, 'updatedAt', r.updated_at, 'endedAt', r.ended_at)"""

_TRIGGER_FUNCTION = """
CREATE FUNCTION portolan_run_event() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r action_runs;
    before jsonb;
    after jsonb;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        r := OLD;
        before := RUN_DOC;
    END IF;
    r := NEW;
    after := RUN_DOC;
    INSERT INTO run_events (org_id, run_id, action, kind, before, after, actor, depth)
    VALUES (NEW.org_id, NEW.id, NEW.action, CASE WHEN TG_OP = 'INSERT' THEN 'CREATE'
            ELSE 'UPDATE' END, before, after, NEW.updated_by,
            coalesce((NEW.context->>'depth')::int, 0));
    RETURN NULL;
END $$
""".replace("RUN_DOC", _RUN_DOC)

_TRIGGERS = (
    "CREATE TRIGGER action_runs_created AFTER INSERT ON action_runs "
    "FOR EACH ROW EXECUTE FUNCTION portolan_run_event()",
    # Only what a run's watchers see changes it; claims, leases and attempts do not.
    "CREATE TRIGGER action_runs_updated AFTER UPDATE ON action_runs FOR EACH ROW "
    "WHEN ((OLD.status, OLD.status_label, OLD.link, OLD.summary, OLD.external_run_id, "
    "OLD.approval) IS DISTINCT FROM (NEW.status, NEW.status_label, NEW.link, NEW.summary, "
    "NEW.external_run_id, NEW.approval)) EXECUTE FUNCTION portolan_run_event()",
)


def upgrade() -> None:
    # The writing transaction's id: the feed reads a transaction's events once no older
    # transaction is still running (see app/automations/feed.py).
    op.execute(
        "ALTER TABLE entity_events ADD COLUMN xid xid8 NOT NULL DEFAULT pg_current_xact_id()"
    )
    op.create_index("ix_entity_events_xid", "entity_events", ["xid"])
    op.create_table(
        "run_events",
        sa.Column("org_id", UUID, nullable=False),
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("run_id", sa.String(40), nullable=False),
        sa.Column("action", sa.String(100), nullable=False),
        sa.Column("kind", sa.String(10), nullable=False),
        sa.Column("before", JSONB, nullable=True),
        sa.Column("after", JSONB, nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("depth", sa.Integer(), server_default="0", nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name="fk_run_events_org_id_organizations",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("org_id", "id", name="pk_run_events"),
    )
    op.execute("ALTER TABLE run_events ADD COLUMN xid xid8 NOT NULL DEFAULT pg_current_xact_id()")
    op.create_index("ix_run_events_xid", "run_events", ["xid"])
    for statement in rls.fence_table("run_events"):
        op.execute(statement)
    op.execute(_TRIGGER_FUNCTION)
    for statement in _TRIGGERS:
        op.execute(statement)
    # The feed's reading position: every event of a transaction below `horizon` was read.
    # Global (a reference table when distributed): it tracks transactions, not tenants.
    op.create_table(
        "event_feed_cursors",
        sa.Column("feed", sa.String(40), nullable=False),
        sa.Column("horizon", sa.Text(), nullable=False),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("feed", name="pk_event_feed_cursors"),
    )
    op.create_table(
        "timer_cursors",
        sa.Column("org_id", UUID, nullable=False),
        sa.Column("blueprint", sa.String(100), nullable=False),
        sa.Column("property", sa.String(100), nullable=False),
        sa.Column("checked_until", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name="fk_timer_cursors_org_id_organizations",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("org_id", "blueprint", "property", name="pk_timer_cursors"),
    )
    for statement in rls.fence_table("timer_cursors"):
        op.execute(statement)


def downgrade() -> None:
    op.drop_table("timer_cursors")
    op.drop_table("event_feed_cursors")
    op.execute("DROP TRIGGER action_runs_updated ON action_runs")
    op.execute("DROP TRIGGER action_runs_created ON action_runs")
    op.execute("DROP FUNCTION portolan_run_event()")
    op.drop_table("run_events")
    op.drop_index("ix_entity_events_xid", "entity_events")
    op.drop_column("entity_events", "xid")
