"""Integration actions: runs that an integration claims (Port's INTEGRATION_ACTION).

`action_runs.installation_id` names the integration whose runs these are (set when the
action's invocation is INTEGRATION_ACTION); such a run waits in `dispatch_state`
`claimable` until the integration claims it (`claimed`, with `claim` and `lease_until` its
visibility timeout, `claimed_by` the claiming credential) and acknowledges it
(`delivered`). The partial index serves the claim:
an installation's claimable runs, oldest first.

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0025"
down_revision: str | None = "0024"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The table is fenced already (migration 0010); a new column needs no policy or grant.
    op.add_column("action_runs", sa.Column("installation_id", sa.String(100), nullable=True))
    op.add_column("action_runs", sa.Column("claimed_by", sa.String(200), nullable=True))
    op.create_index(
        "ix_action_runs_claimable",
        "action_runs",
        ["org_id", "installation_id", "created_at"],
        postgresql_where=sa.text("dispatch_state IN ('claimable', 'claimed')"),
    )


def downgrade() -> None:
    op.drop_index("ix_action_runs_claimable", table_name="action_runs")
    op.drop_column("action_runs", "claimed_by")
    op.drop_column("action_runs", "installation_id")
