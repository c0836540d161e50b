"""The audit log: every change to blueprints, entities, scorecards, actions, runs, webhooks,
secrets and credentials, written by triggers in the transaction of the change.

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from app.db import rls

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONB = postgresql.JSONB(astext_type=sa.Text())

# TG_ARGV: resource, identifier column, then the columns left out of the diff (bookkeeping,
# and secrets: the log keeps metadata only). An update that changes only left-out columns
# is no change.
_ROW_FUNCTION = """
CREATE FUNCTION portolan_audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    hidden text[] := TG_ARGV[2:TG_NARGS - 1] || ARRAY['org_id'];
    old_doc jsonb;
    new_doc jsonb;
    doc jsonb;
BEGIN
    IF TG_OP <> 'INSERT' THEN
        old_doc := to_jsonb(OLD);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        new_doc := to_jsonb(NEW);
    END IF;
    doc := coalesce(new_doc, old_doc);
    IF TG_OP = 'UPDATE' AND (old_doc - hidden) = (new_doc - hidden) THEN
        RETURN NULL;
    END IF;
    INSERT INTO audit_log (org_id, actor, origin, resource, identifier, blueprint, run_id,
                           action, status, diff)
    VALUES ((doc->>'org_id')::uuid,
            coalesce(nullif(current_setting('portolan.actor', true), ''), 'system'),
            coalesce(nullif(current_setting('portolan.origin', true), ''), 'SYSTEM'),
            TG_ARGV[0], doc->>TG_ARGV[1],
            CASE WHEN TG_ARGV[0] = 'blueprint' THEN doc->>'identifier' ELSE doc->>'blueprint' END,
            CASE WHEN TG_ARGV[0] = 'run' THEN doc->>'id' END,
            CASE TG_OP WHEN 'INSERT' THEN 'CREATE' WHEN 'UPDATE' THEN 'UPDATE' ELSE 'DELETE' END,
            'SUCCESS',
            jsonb_build_object('before', old_doc - hidden, 'after', new_doc - hidden));
    RETURN NULL;
END $$
"""

# Entity changes are already recorded, with their actor and origin, as entity events: one
# statement per write statement copies them.
_ENTITY_FUNCTION = """
CREATE FUNCTION portolan_audit_entities() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO audit_log (org_id, at, actor, origin, resource, identifier, blueprint, run_id,
                           action, status, diff)
    SELECT org_id, at, actor, origin, 'entity', identifier, blueprint, run_id, action,
           'SUCCESS', jsonb_build_object('before', before, 'after', after)
    FROM added;
    RETURN NULL;
END $$
"""

_AUDITED = (
    ("blueprints", "blueprint", "identifier", ("version", "created_at", "updated_at")),
    (
        "scorecards",
        "scorecard",
        "identifier",
        ("version", "evaluated_version", "refresh_requested", "created_at", "updated_at"),
    ),
    ("actions", "action", "identifier", ("created_at", "updated_at")),
    (
        "webhooks",
        "webhook",
        "identifier",
        ("secret_encrypted", "webhook_key", "created_at", "updated_at"),
    ),
    ("org_secrets", "secret", "name", ("value_encrypted", "created_at", "updated_at")),
    ("credentials", "credential", "client_id", ("secret_hash", "created_at")),
)
# Runs: what a run's watchers see (status, label, link, summary, external id, approval);
# dispatch bookkeeping is left out.
_RUN_HIDDEN = (
    "definition",
    "context",
    "raw_properties",
    "payload",
    "response",
    "dispatch_state",
    "attempts",
    "claim",
    "lease_until",
    "next_attempt_at",
    "idempotency_key",
    "request_hash",
    "created_at",
    "updated_at",
    "updated_by",
)


def _args(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("org_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("origin", sa.String(40), nullable=False),
        sa.Column("resource", sa.String(20), nullable=False),
        sa.Column("identifier", sa.Text(), nullable=True),
        sa.Column("blueprint", sa.String(100), nullable=True),
        sa.Column("run_id", sa.String(200), nullable=True),
        sa.Column("action", sa.String(10), nullable=False),
        sa.Column("status", sa.String(10), nullable=False),
        sa.Column("diff", JSONB, nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name="fk_audit_log_org_id_organizations",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("org_id", "id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["org_id", "at", "id"])
    op.create_index(
        "ix_audit_log_identifier", "audit_log", ["org_id", "resource", "identifier", "at"]
    )
    for statement in rls.fence_table("audit_log", privileges="SELECT, INSERT"):
        op.execute(statement)
    op.execute(_ROW_FUNCTION)
    op.execute(_ENTITY_FUNCTION)
    for table, resource, key, hidden in _AUDITED:
        op.execute(
            f"CREATE TRIGGER {table}_audit AFTER INSERT OR UPDATE OR DELETE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION portolan_audit_row({_args((resource, key, *hidden))})"
        )
    op.execute(
        "CREATE TRIGGER action_runs_audit_created AFTER INSERT ON action_runs FOR EACH ROW "
        f"EXECUTE FUNCTION portolan_audit_row({_args(('run', 'id', *_RUN_HIDDEN))})"
    )
    op.execute(
        "CREATE TRIGGER action_runs_audit_updated AFTER UPDATE ON action_runs FOR EACH ROW "
        "WHEN ((OLD.status, OLD.status_label, OLD.link, OLD.summary, OLD.external_run_id, "
        "OLD.approval) IS DISTINCT FROM (NEW.status, NEW.status_label, NEW.link, NEW.summary, "
        "NEW.external_run_id, NEW.approval)) "
        f"EXECUTE FUNCTION portolan_audit_row({_args(('run', 'id', *_RUN_HIDDEN))})"
    )
    op.execute(
        "CREATE TRIGGER entity_events_audit AFTER INSERT ON entity_events "
        "REFERENCING NEW TABLE AS added FOR EACH STATEMENT "
        "EXECUTE FUNCTION portolan_audit_entities()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER entity_events_audit ON entity_events")
    op.execute("DROP TRIGGER action_runs_audit_updated ON action_runs")
    op.execute("DROP TRIGGER action_runs_audit_created ON action_runs")
    for table, _, _, _ in _AUDITED:
        op.execute(f"DROP TRIGGER {table}_audit ON {table}")
    op.execute("DROP FUNCTION portolan_audit_entities()")
    op.execute("DROP FUNCTION portolan_audit_row()")
    op.drop_table("audit_log")
