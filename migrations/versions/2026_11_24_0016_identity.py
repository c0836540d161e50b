"""Identity: users, teams and their members, blueprint and action permissions, and each
org's OpenID Connect identity provider; all of them audited.

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from app.db import rls

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONB = postgresql.JSONB(astext_type=sa.Text())
UUID = postgresql.UUID(as_uuid=True)

# A membership change is recorded as an UPDATE of the team. Rows removed because their team
# or user was deleted are not: that deletion is the record.
_MEMBER_FUNCTION = """
CREATE FUNCTION portolan_audit_team_member() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r record;
    team_name text;
    user_email text;
BEGIN
    IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
    SELECT name INTO team_name FROM teams WHERE org_id = r.org_id AND id = r.team_id;
    SELECT email INTO user_email FROM users WHERE org_id = r.org_id AND id = r.user_id;
    IF team_name IS NULL OR user_email IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO audit_log (org_id, actor, origin, resource, identifier, action, status, diff)
    VALUES (r.org_id,
            coalesce(nullif(current_setting('portolan.actor', true), ''), 'system'),
            coalesce(nullif(current_setting('portolan.origin', true), ''), 'SYSTEM'),
            'team', team_name, 'UPDATE', 'SUCCESS',
            jsonb_build_object(
                CASE TG_OP WHEN 'INSERT' THEN 'memberAdded' ELSE 'memberRemoved' END,
                jsonb_build_object('email', user_email, 'source', r.source)));
    RETURN NULL;
END $$
"""

_AUDITED = (
    ("users", "user", "email", ("id", "created_at", "updated_at", "last_login_at")),
    ("teams", "team", "name", ("id", "created_at", "updated_at")),
    ("blueprint_permissions", "blueprint-permissions", "blueprint", ("updated_at",)),
    ("action_permissions", "action-permissions", "action", ("updated_at",)),
    ("oidc_configs", "oidc", "issuer", ("updated_at",)),
)


def _args(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def _timestamps() -> list[sa.Column[object]]:
    return [
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
    ]


def _org_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["org_id"],
        ["organizations.id"],
        name=f"fk_{table}_org_id_organizations",
        ondelete="CASCADE",
    )


def upgrade() -> None:
    op.alter_column("audit_log", "resource", type_=sa.String(40), existing_nullable=False)
    op.create_table(
        "users",
        sa.Column("org_id", UUID, nullable=False),
        sa.Column("id", UUID, server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("first_name", sa.String(200), nullable=True),
        sa.Column("last_name", sa.String(200), nullable=True),
        sa.Column("picture", sa.Text(), nullable=True),
        sa.Column("status", sa.String(20), server_default="Invited", nullable=False),
        sa.Column("roles", postgresql.ARRAY(sa.String(120)), server_default="{}", nullable=False),
        sa.Column(
            "idp_roles", postgresql.ARRAY(sa.String(120)), server_default="{}", nullable=False
        ),
        sa.Column(
            "providers", postgresql.ARRAY(sa.String(40)), server_default="{}", nullable=False
        ),
        *_timestamps(),
        sa.Column("last_login_at", sa.DateTime(timezone=True), nullable=True),
        _org_fk("users"),
        sa.PrimaryKeyConstraint("org_id", "id", name="pk_users"),
        sa.UniqueConstraint("org_id", "email", name="uq_users_org_id_email"),
    )
    op.create_table(
        "teams",
        sa.Column("org_id", UUID, nullable=False),
        sa.Column("id", UUID, server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("provider", sa.String(40), server_default="Port", nullable=False),
        *_timestamps(),
        _org_fk("teams"),
        sa.PrimaryKeyConstraint("org_id", "id", name="pk_teams"),
        sa.UniqueConstraint("org_id", "name", name="uq_teams_org_id_name"),
    )
    op.create_table(
        "team_members",
        sa.Column("org_id", UUID, nullable=False),
        sa.Column("team_id", UUID, nullable=False),
        sa.Column("user_id", UUID, nullable=False),
        sa.Column("source", sa.String(10), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id", "team_id"],
            ["teams.org_id", "teams.id"],
            name="fk_team_members_org_id_team_id_teams",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id", "user_id"],
            ["users.org_id", "users.id"],
            name="fk_team_members_org_id_user_id_users",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("org_id", "team_id", "user_id", "source", name="pk_team_members"),
    )
    op.create_index("ix_team_members_org_id_user_id", "team_members", ["org_id", "user_id"])
    for table, parent in (("blueprint_permissions", "blueprint"), ("action_permissions", "action")):
        parents = f"{parent}s"
        op.create_table(
            table,
            sa.Column("org_id", UUID, nullable=False),
            sa.Column(parent, sa.String(100), nullable=False),
            sa.Column("permissions", JSONB, nullable=False),
            sa.Column(
                "updated_at",
                sa.DateTime(timezone=True),
                server_default=sa.func.now(),
                nullable=False,
            ),
            sa.ForeignKeyConstraint(
                ["org_id", parent],
                [f"{parents}.org_id", f"{parents}.identifier"],
                name=f"fk_{table}_org_id_{parent}_{parents}",
                ondelete="CASCADE",
                onupdate="CASCADE",
            ),
            sa.PrimaryKeyConstraint("org_id", parent, name=f"pk_{table}"),
        )
    op.create_table(
        "oidc_configs",
        sa.Column("org_id", UUID, nullable=False),
        sa.Column("issuer", sa.String(500), nullable=False),
        sa.Column("audience", sa.String(500), nullable=False),
        sa.Column("jwks_uri", sa.String(2000), nullable=False),
        sa.Column("email_claim", sa.String(100), nullable=False),
        sa.Column("name_claim", sa.String(100), nullable=False),
        sa.Column("groups_claim", sa.String(100), nullable=True),
        sa.Column("group_teams", JSONB, nullable=False),
        sa.Column("group_roles", JSONB, nullable=False),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        _org_fk("oidc_configs"),
        sa.PrimaryKeyConstraint("org_id", name="pk_oidc_configs"),
        sa.UniqueConstraint("issuer", "audience", name="uq_oidc_configs_issuer_audience"),
    )
    for table in (
        "users",
        "teams",
        "team_members",
        "blueprint_permissions",
        "action_permissions",
        "oidc_configs",
    ):
        for statement in rls.fence_table(table):
            op.execute(statement)
    for table, resource, key, hidden in _AUDITED:
        op.execute(
            f"CREATE TRIGGER {table}_audit AFTER INSERT OR UPDATE OR DELETE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION portolan_audit_row({_args((resource, key, *hidden))})"
        )
    op.execute(_MEMBER_FUNCTION)
    op.execute(
        "CREATE TRIGGER team_members_audit AFTER INSERT OR DELETE ON team_members "
        "FOR EACH ROW EXECUTE FUNCTION portolan_audit_team_member()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER team_members_audit ON team_members")
    op.execute("DROP FUNCTION portolan_audit_team_member()")
    for table in (
        "oidc_configs",
        "action_permissions",
        "blueprint_permissions",
        "team_members",
        "teams",
        "users",
    ):
        op.drop_table(table)
    op.execute("DELETE FROM audit_log WHERE length(resource) > 20")
    op.alter_column("audit_log", "resource", type_=sa.String(20), existing_nullable=False)
