"""Row-level security: the role tenant work runs as, and the SQL that fences each table.

Migrations call these; they are plain SQL builders so a migration's effect never changes
behind its back. Policies compare with NULLIF(...) so an unset or reset `app.org_id`
means "no rows" instead of a cast error.
"""

from __future__ import annotations

APP_ROLE = "portolan_app"
ORG_SETTING = "app.org_id"
CURRENT_ORG = f"NULLIF(current_setting('{ORG_SETTING}', true), '')::uuid"


def create_app_role() -> list[str]:
    return [
        f"""
        DO $$
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
                CREATE ROLE {APP_ROLE} NOLOGIN NOSUPERUSER NOBYPASSRLS NOINHERIT;
            END IF;
        END
        $$
        """,  # noqa: S608 - constant identifiers only
        # The login role must be a member to `SET LOCAL ROLE portolan_app`.
        f"GRANT {APP_ROLE} TO CURRENT_USER",
        f"GRANT USAGE ON SCHEMA public TO {APP_ROLE}",
    ]


def fence_table(
    table: str,
    *,
    column: str = "org_id",
    privileges: str = "SELECT, INSERT, UPDATE, DELETE",
) -> list[str]:
    """Grant the app role `privileges` on `table` and confine every role to the bound org."""
    return [
        f"GRANT {privileges} ON {table} TO {APP_ROLE}",
        f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
        f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY",
        f"CREATE POLICY tenant_isolation ON {table} "
        f"USING ({column} = {CURRENT_ORG}) WITH CHECK ({column} = {CURRENT_ORG})",
        # FORCE fences the owner too; the operator (the login that ran the migrations)
        # keeps an explicit, visible policy instead of an accidental bypass. Tenant work
        # never runs as it: requests switch to the app role, which this does not cover.
        f"CREATE POLICY operator_access ON {table} TO CURRENT_USER USING (true) WITH CHECK (true)",
    ]


def unfence_table(table: str) -> list[str]:
    return [
        f"DROP POLICY IF EXISTS operator_access ON {table}",
        f"DROP POLICY IF EXISTS tenant_isolation ON {table}",
        f"ALTER TABLE {table} NO FORCE ROW LEVEL SECURITY",
        f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY",
        f"REVOKE ALL ON {table} FROM {APP_ROLE}",
    ]
