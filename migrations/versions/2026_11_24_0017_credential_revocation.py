"""Tokens of a deleted credential, or issued before its secret was rotated, stop working at
once: each request's opening statement checks the credential.

Revision ID: 0017
Revises: 0016
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Runs as the app role with the request's org bound (RLS applies). Whole seconds, as a
# token's `iat`: a token issued in the second of a rotation is still accepted.
_CHECK = """
CREATE FUNCTION portolan_credential_valid(p_client_id text, p_issued_at bigint)
RETURNS void LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM credentials
        WHERE org_id = NULLIF(current_setting('app.org_id', true), '')::uuid
          AND client_id = p_client_id
          AND tokens_valid_after <= to_timestamp(p_issued_at)
    ) THEN
        RAISE EXCEPTION 'credential revoked' USING ERRCODE = 'invalid_authorization_specification';
    END IF;
END $$
"""


def upgrade() -> None:
    op.add_column(
        "credentials",
        sa.Column(
            "tokens_valid_after",
            sa.DateTime(timezone=True),
            server_default=sa.text("date_trunc('second', now())"),
            nullable=False,
        ),
    )
    op.execute(_CHECK)


def downgrade() -> None:
    op.execute("DROP FUNCTION portolan_credential_valid(text, bigint)")
    op.drop_column("credentials", "tokens_valid_after")
