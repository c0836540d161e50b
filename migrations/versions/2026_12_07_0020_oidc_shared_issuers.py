"""Organizations may share an identity provider's issuer and audience: the unique key on
(issuer, audience) across organizations goes (it told an org that another used a pair and
let the first org to save a pair lock the others out); a plain index keeps the look-up of
the orgs a token may belong to (docs/identity.md).

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint("uq_oidc_configs_issuer_audience", "oidc_configs", type_="unique")
    op.create_index("ix_oidc_configs_issuer_audience", "oidc_configs", ["issuer", "audience"])


def downgrade() -> None:
    # The unique key cannot come back while organizations share a pair: say so, and leave
    # it to the operator which org keeps it.
    op.execute(
        "DO $$ BEGIN IF EXISTS (SELECT 1 FROM oidc_configs GROUP BY issuer, audience "
        "HAVING count(*) > 1) THEN RAISE EXCEPTION 'organizations share an OpenID Connect "
        "issuer and audience: remove all but one organization''s settings for each pair "
        "before downgrading'; END IF; END $$"
    )
    op.drop_index("ix_oidc_configs_issuer_audience", table_name="oidc_configs")
    op.create_unique_constraint(
        "uq_oidc_configs_issuer_audience", "oidc_configs", ["issuer", "audience"]
    )
