"""The audit log reads entity changes from entity events instead of copying them.

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Entity events already hold every entity change with its actor, origin and diff; the
    # copy doubled the rows every entity write inserts.
    op.execute("DROP TRIGGER entity_events_audit ON entity_events")
    op.execute("DROP FUNCTION portolan_audit_entities()")


def downgrade() -> None:
    op.execute(
        """
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
    )
    op.execute(
        "CREATE TRIGGER entity_events_audit AFTER INSERT ON entity_events "
        "REFERENCING NEW TABLE AS added FOR EACH STATEMENT "
        "EXECUTE FUNCTION portolan_audit_entities()"
    )
