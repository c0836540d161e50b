"""The runtime database layer: Core statements compile to asyncpg SQL; JSON round-trips."""

from __future__ import annotations

from sqlalchemy import select

from app.db.database import Database, compile_query
from app.orgs.models import Organization
from tests.conftest import OrgFactory


async def test_core_statement_binds_values_to_the_right_placeholders(
    db: Database, make_org: OrgFactory
) -> None:
    # Expanding IN lists are numbered after the other parameters: the values must follow.
    a, b, c = (await make_org("cmp-x"), await make_org("cmp-y"), await make_org("cmp-z"))
    stmt = select(Organization.name).where(
        Organization.name.in_([a.name, b.name]), Organization.name != c.name
    )
    sql, _ = compile_query(stmt, ())
    async with db.system() as tx:
        names = sorted(r["name"] for r in await tx.fetch(stmt))
    assert "%(" not in sql and names == sorted([a.name, b.name])


async def test_core_statement_runs_in_a_tenant_transaction(
    db: Database, make_org: OrgFactory
) -> None:
    org = await make_org("compiled")
    async with db.tenant(org.org_id) as tx:
        names = [r["name"] for r in await tx.fetch(select(Organization.name))]
    assert names == ["compiled"]


async def test_jsonb_values_round_trip_as_python_objects(db: Database) -> None:
    async with db.system() as tx:
        value = await tx.fetchval("SELECT $1::jsonb", {"a": [1, "x", None]})
    assert value == {"a": [1, "x", None]}
