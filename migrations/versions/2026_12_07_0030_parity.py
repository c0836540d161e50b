"""Port API parity: the organization's settings and announcement; users' personal
credentials.

- `organizations` gains `settings` (Port's documented organization settings, as given) and
  `announcement` (the banner Port's organization object carries). Changes to them are
  audited by the service in the change's transaction rather than by a trigger: under Citus
  `organizations` is a reference table, whose triggers would fire on every node's copy.
- `users` gain personal credentials (`POST /v1/rotate-credentials/{user_email}`): a client
  id, the hash of its secret, and `tokens_valid_after` (the user's tokens issued before it
  are refused). The audit trigger leaves the hash out of the diff.

Revision ID: 0030
Revises: 0029
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0030"
down_revision: str | None = "0029"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONB = postgresql.JSONB(astext_type=sa.Text())

# The users' audit trigger (migration 0016): resource, key, then the columns left out.
_USERS_AUDIT = ("user", "email", "id", "created_at", "updated_at", "last_login_at")


def _audit_users(*hidden: str) -> None:
    args = ", ".join(f"'{v}'" for v in (*_USERS_AUDIT, *hidden))
    op.execute("DROP TRIGGER users_audit ON users")
    op.execute(
        "CREATE TRIGGER users_audit AFTER INSERT OR UPDATE OR DELETE ON users "
        f"FOR EACH ROW EXECUTE FUNCTION portolan_audit_row({args})"
    )


# The credentials' audit trigger (migration 0014): resource, key, then the columns left out.
_CREDENTIALS_AUDIT = ("credential", "client_id", "secret_hash", "created_at")


def _audit_credentials(*hidden: str) -> None:
    args = ", ".join(f"'{v}'" for v in (*_CREDENTIALS_AUDIT, *hidden))
    op.execute("DROP TRIGGER credentials_audit ON credentials")
    op.execute(
        "CREATE TRIGGER credentials_audit AFTER INSERT OR UPDATE OR DELETE ON credentials "
        f"FOR EACH ROW EXECUTE FUNCTION portolan_audit_row({args})"
    )


# Runs as the app role with the request's org bound (RLS applies). Whole seconds, as a
# token's `iat`: a token issued in the second of a rotation is still accepted.
_CHECK = """
CREATE OR REPLACE FUNCTION portolan_credential_valid(p_client_id text, p_issued_at bigint)
RETURNS void LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM credentials
        WHERE org_id = NULLIF(current_setting('app.org_id', true), '')::uuid
          AND client_id = p_client_id
          AND tokens_valid_after <= to_timestamp(p_issued_at)
          {enabled}
    ) THEN
        RAISE EXCEPTION 'credential revoked' USING ERRCODE = 'invalid_authorization_specification';
    END IF;
END $$
"""


def upgrade() -> None:
    op.add_column(
        "organizations",
        sa.Column("settings", JSONB, server_default=sa.text("'{}'::jsonb"), nullable=False),
    )
    op.add_column("organizations", sa.Column("announcement", JSONB, nullable=True))
    op.add_column("users", sa.Column("personal_client_id", sa.String(64), nullable=True))
    op.add_column("users", sa.Column("personal_secret_hash", sa.LargeBinary(), nullable=True))
    op.add_column(
        "users", sa.Column("tokens_valid_after", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_unique_constraint(
        "uq_users_org_id_personal_client_id", "users", ["org_id", "personal_client_id"]
    )
    _audit_users("personal_secret_hash")
    op.add_column(
        "credentials",
        sa.Column("enabled", sa.Boolean(), server_default=sa.text("true"), nullable=False),
    )
    op.add_column(
        "credentials",
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
    )
    _audit_credentials("updated_at")
    op.execute(_CHECK.replace("{enabled}", "AND enabled"))


def downgrade() -> None:
    op.execute(_CHECK.replace("{enabled}", ""))
    _audit_credentials()
    op.drop_column("credentials", "updated_at")
    op.drop_column("credentials", "enabled")
    _audit_users()
    op.drop_constraint("uq_users_org_id_personal_client_id", "users", type_="unique")
    op.drop_column("users", "tokens_valid_after")
    op.drop_column("users", "personal_secret_hash")
    op.drop_column("users", "personal_client_id")
    op.drop_column("organizations", "announcement")
    op.drop_column("organizations", "settings")
