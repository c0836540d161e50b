"""Fair turns across organizations: the event feed keeps a cursor per organization, claimed
with a lease, and a scorecard's evaluation keeps its failures (and when it is tried again).

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UUID = postgresql.UUID(as_uuid=True)
# The scorecards' audit trigger of 0014, with the evaluation's bookkeeping left out too.
_HIDDEN = ("version", "evaluated_version", "refresh_requested", "created_at", "updated_at")
_EVALUATION = ("evaluation_failures", "evaluation_error", "evaluation_retry_at")


def _trigger(hidden: tuple[str, ...]) -> list[str]:
    args = ", ".join(f"'{v}'" for v in ("scorecard", "identifier", *hidden))
    return [
        "DROP TRIGGER scorecards_audit ON scorecards",
        "CREATE TRIGGER scorecards_audit AFTER INSERT OR UPDATE OR DELETE ON scorecards "
        f"FOR EACH ROW EXECUTE FUNCTION portolan_audit_row({args})",
    ]


def upgrade() -> None:
    op.alter_column("event_feed_cursors", "feed", type_=sa.String(100), existing_type=sa.String(40))
    op.add_column("event_feed_cursors", sa.Column("org_id", UUID, nullable=True))
    op.add_column(
        "event_feed_cursors", sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column("event_feed_cursors", sa.Column("lease_token", UUID, nullable=True))
    op.add_column(
        "scorecards",
        sa.Column("evaluation_failures", sa.Integer(), server_default="0", nullable=False),
    )
    op.add_column("scorecards", sa.Column("evaluation_error", sa.Text(), nullable=True))
    op.add_column(
        "scorecards",
        sa.Column("evaluation_retry_at", sa.DateTime(timezone=True), nullable=True),
    )
    for statement in _trigger(_HIDDEN + _EVALUATION):
        op.execute(statement)


def downgrade() -> None:
    for statement in _trigger(_HIDDEN):
        op.execute(statement)
    op.drop_column("scorecards", "evaluation_retry_at")
    op.drop_column("scorecards", "evaluation_error")
    op.drop_column("scorecards", "evaluation_failures")
    op.drop_column("event_feed_cursors", "lease_token")
    op.drop_column("event_feed_cursors", "lease_until")
    op.drop_column("event_feed_cursors", "org_id")
    op.execute("DELETE FROM event_feed_cursors WHERE length(feed) > 40")
    op.alter_column("event_feed_cursors", "feed", type_=sa.String(40), existing_type=sa.String(100))
