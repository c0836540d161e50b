"""Row-level security holds for the app role whatever the login role is."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from app.db.database import Database
from tests.conftest import OrgFactory

# event_feed_cursors: the event feed's position in transaction ids, not a tenant's data
# (a reference table when distributed).
GLOBAL_TABLES = {"alembic_version", "event_feed_cursors"}
# Unique across tenants on purpose: an identity provider's (issuer, audience) names the one
# org its tokens sign in to.
ROUTING_KEYS = {"uq_oidc_configs_issuer_audience"}


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()


async def test_login_role_used_by_the_suite_is_a_superuser(conn: asyncpg.Connection) -> None:
    # The isolation tests below only mean something if the login could bypass RLS itself.
    assert await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")


async def test_app_role_cannot_bypass_rls(conn: asyncpg.Connection) -> None:
    row = await conn.fetchrow(
        "SELECT rolsuper, rolbypassrls, rolcanlogin FROM pg_roles WHERE rolname = 'portolan_app'"
    )
    assert row is not None
    assert (row["rolsuper"], row["rolbypassrls"], row["rolcanlogin"]) == (False, False, False)


async def test_app_role_sees_no_rows_without_an_org_bound(
    conn: asyncpg.Connection, make_org: OrgFactory
) -> None:
    await make_org()
    async with conn.transaction():
        await conn.execute("SET LOCAL ROLE portolan_app")
        assert await conn.fetchval("SELECT count(*) FROM organizations") == 0
        assert await conn.fetchval("SELECT count(*) FROM credentials") == 0


async def test_app_role_sees_only_the_bound_org(
    conn: asyncpg.Connection, make_org: OrgFactory
) -> None:
    org_a = await make_org()
    org_b = await make_org()
    async with conn.transaction():
        await conn.execute("SET LOCAL ROLE portolan_app")
        await conn.execute("SELECT set_config('app.org_id', $1, true)", str(org_a.org_id))
        org_ids = {r["id"] for r in await conn.fetch("SELECT id FROM organizations")}
        cred_orgs = {r["org_id"] for r in await conn.fetch("SELECT org_id FROM credentials")}
        other = await conn.fetchval(
            "SELECT count(*) FROM credentials WHERE org_id = $1", org_b.org_id
        )
    assert org_ids == {org_a.org_id}
    assert cred_orgs == {org_a.org_id}
    assert other == 0


async def test_app_role_cannot_insert_rows_for_another_org(
    conn: asyncpg.Connection, make_org: OrgFactory
) -> None:
    org_a = await make_org()
    org_b = await make_org()
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        async with conn.transaction():
            await conn.execute("SET LOCAL ROLE portolan_app")
            await conn.execute("SELECT set_config('app.org_id', $1, true)", str(org_a.org_id))
            await conn.execute(
                "INSERT INTO credentials (org_id, client_id, name, secret_hash, roles) "
                "VALUES ($1, 'intruder', 'x', '\\x00', ARRAY['Admin'])",
                org_b.org_id,
            )


async def test_app_role_cannot_move_a_row_to_another_org(
    conn: asyncpg.Connection, make_org: OrgFactory
) -> None:
    org_a = await make_org()
    org_b = await make_org()
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        async with conn.transaction():
            await conn.execute("SET LOCAL ROLE portolan_app")
            await conn.execute("SELECT set_config('app.org_id', $1, true)", str(org_a.org_id))
            await conn.execute(
                "UPDATE credentials SET org_id = $1 WHERE org_id = $2", org_b.org_id, org_a.org_id
            )


async def test_org_binding_ends_with_the_transaction(
    conn: asyncpg.Connection, make_org: OrgFactory
) -> None:
    org_a = await make_org()
    async with conn.transaction():
        await conn.execute("SET LOCAL ROLE portolan_app")
        await conn.execute("SELECT set_config('app.org_id', $1, true)", str(org_a.org_id))
        assert await conn.fetchval("SELECT count(*) FROM organizations") == 1
    assert await conn.fetchval("SELECT current_user") == "postgres"
    async with conn.transaction():
        await conn.execute("SET LOCAL ROLE portolan_app")
        assert await conn.fetchval("SELECT count(*) FROM organizations") == 0


async def test_every_table_is_fenced_by_forced_rls(conn: asyncpg.Connection) -> None:
    rows = await conn.fetch(
        "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')"
    )
    unfenced = [
        r["relname"]
        for r in rows
        if r["relname"] not in GLOBAL_TABLES
        and not (r["relrowsecurity"] and r["relforcerowsecurity"])
    ]
    assert rows and unfenced == []


async def test_every_tenant_key_leads_with_org_id(conn: asyncpg.Connection) -> None:
    # Primary, unique and foreign keys of tenant tables start with org_id (Citus-ready and
    # cross-tenant references impossible). `organizations` is the tenant itself.
    rows = await conn.fetch(
        """
        SELECT con.conname, rel.relname, con.contype,
               (SELECT attname FROM pg_attribute
                 WHERE attrelid = con.conrelid AND attnum = con.conkey[1]) AS first_col
        FROM pg_constraint con
        JOIN pg_class rel ON rel.oid = con.conrelid
        JOIN pg_namespace n ON n.oid = rel.relnamespace
        WHERE n.nspname = 'public' AND con.contype IN ('p', 'u', 'f')
        """
    )
    offending = [
        (r["relname"], r["conname"])
        for r in rows
        if r["relname"] not in GLOBAL_TABLES | {"organizations"}
        and r["first_col"] != "org_id"
        and r["conname"] not in ROUTING_KEYS
    ]
    assert rows and offending == []


async def test_request_transactions_run_as_the_app_role(db: Database, make_org: OrgFactory) -> None:
    org = await make_org()
    async with db.tenant(org.org_id) as tx:
        role = await tx.fetchval("SELECT current_user")
        bound = await tx.fetchval("SELECT current_setting('app.org_id')")
    assert (role, bound) == ("portolan_app", str(org.org_id))


async def test_tenant_transaction_sees_nothing_of_a_random_org(db: Database) -> None:
    async with db.tenant(uuid.uuid4()) as tx:
        count = await tx.fetchval("SELECT count(*) FROM organizations")
    assert count == 0


async def test_pooled_connections_come_back_unbound(db: Database, make_org: OrgFactory) -> None:
    org = await make_org()
    async with db.tenant(org.org_id):
        pass
    conn = await db.pool.acquire()
    try:
        role = await conn.fetchval("SELECT current_user")
        bound = await conn.fetchval("SELECT current_setting('app.org_id', true)")
    finally:
        db.pool.release(conn)
    assert role != "portolan_app" and not bound


async def test_a_failed_request_transaction_rolls_back(db: Database, make_org: OrgFactory) -> None:
    org = await make_org()
    try:
        async with db.system(org.org_id) as tx:
            await tx.execute("UPDATE organizations SET name = 'renamed' WHERE id = $1", org.org_id)
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    async with db.tenant(org.org_id) as tx:
        assert await tx.fetchval("SELECT name FROM organizations") == org.name
