"""The runtime database layer: Core statements compile to asyncpg SQL; JSON round-trips."""

from __future__ import annotations

from typing import Any

import httpx
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


async def test_generic_plans_are_chosen_per_transaction(db: Database, make_org: OrgFactory) -> None:
    org = await make_org()
    tx, conn = await db.begin_tenant(org.org_id, generic_plans=True)
    try:
        assert await tx.fetchval("SHOW plan_cache_mode") == "force_generic_plan"
    finally:
        await db.finish(conn, commit=True)
    # The setting was transaction-local: the next transaction on any connection plans
    # each execution again.
    async with db.tenant(org.org_id) as tx:
        assert await tx.fetchval("SHOW plan_cache_mode") == "force_custom_plan"


async def test_only_single_entity_routes_use_generic_plans(
    client: httpx.AsyncClient, make_org: OrgFactory, app: Any
) -> None:
    """Each route's transaction opens with the plan mode its route declares."""
    org = await make_org()
    db: Database = app.state.db
    seen: list[bool] = []
    original = db.begin_tenant

    async def recording(org_id: Any, *, generic_plans: bool = False, **kwargs: Any) -> Any:
        seen.append(generic_plans)
        return await original(org_id, generic_plans=generic_plans, **kwargs)

    bp = {"identifier": "svc", "title": "Svc", "schema": {"properties": {}}}
    one = {"identifier": "a"}
    calls: list[tuple[str, str, Any, bool]] = [
        ("POST", "/v1/blueprints", bp, False),
        ("POST", "/v1/blueprints/svc/entities", one, True),
        ("GET", "/v1/blueprints/svc/entities/a", None, True),
        ("PUT", "/v1/blueprints/svc/entities/a", one, True),
        ("PATCH", "/v1/blueprints/svc/entities/a", one, True),
        ("POST", "/v1/blueprints/svc/entities/bulk", {"entities": [{"identifier": "b"}]}, False),
        ("GET", "/v1/blueprints/svc/entities-count", None, False),
        ("DELETE", "/v1/blueprints/svc/entities/a", None, True),
    ]
    db.begin_tenant = recording  # type: ignore[method-assign]
    try:
        for method, path, body, _ in calls:
            response = await client.request(method, path, json=body, headers=org.headers)
            assert response.status_code < 300, (method, path, response.text)
    finally:
        db.begin_tenant = original  # type: ignore[method-assign]
    assert seen == [generic for *_, generic in calls]


def test_compiled_statements_are_reused_with_each_calls_values() -> None:
    from sqlalchemy import column, table

    t = table("t", column("a"), column("b"))
    first = compile_query(select(t.c.a).where(t.c.a == 1, t.c.b == "x"), ())
    second = compile_query(select(t.c.a).where(t.c.a == 2, t.c.b == "y"), ())
    assert first[0] == second[0]
    assert list(first[1]) == [1, "x"] and list(second[1]) == [2, "y"]
    # expanding IN renders its values into the SQL, so it is compiled for each call
    three = compile_query(select(t.c.a).where(t.c.a.in_([1, 2, 3])), ())
    one = compile_query(select(t.c.a).where(t.c.a.in_([9])), ())
    assert list(three[1]) == [1, 2, 3] and list(one[1]) == [9]
    assert three[0] != one[0]
