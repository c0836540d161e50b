"""Range indexes on number and date-time properties: asked for by the blueprint schema (or
by size), built and dropped in the background, read by range rules and counts, never able
to fail a write, and fenced per tenant."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import asyncpg
import httpx
import pytest
import sqlalchemy as sa

from app.config import Settings
from app.db.database import Database, compile_query
from app.db.maintenance import MAINTENANCE_LOCK
from app.search import indexes
from app.search.aggregate import matching
from app.search.compiler import Compiler, E
from app.search.service import Search, scope_for
from tests.conftest import Org, OrgFactory


def _blueprint(**flags: Any) -> dict[str, Any]:
    props: dict[str, Any] = {
        "coverage": {"type": "number"},
        "replicas": {"type": "number"},
        "lastDeploy": {"type": "string", "format": "date-time"},
        "name": {"type": "string"},
    }
    for name, flag in flags.items():
        props[name] = {**props[name], "indexed": flag}
    return {"identifier": "service", "title": "Service", "schema": {"properties": props}}


async def _create(client: httpx.AsyncClient, org: Org, body: dict[str, Any]) -> None:
    r = await client.post("/v1/blueprints", json=body, headers=org.headers)
    assert r.status_code == 201, r.text


async def _put(client: httpx.AsyncClient, org: Org, body: dict[str, Any]) -> None:
    r = await client.put("/v1/blueprints/service", json=body, headers=org.headers)
    assert r.status_code == 200, r.text


async def _reconcile(
    settings: Settings, *orgs: Org, min_entities: int = 10**9
) -> indexes.Reconciled:
    assert settings.database_url is not None
    return await indexes.reconcile(
        settings.database_url, min_entities=min_entities, orgs=[o.org_id for o in orgs]
    )


async def _indexes(db: Database, org: Org) -> dict[str, str]:
    """The org's range indexes: name -> definition (its text indexes: tests/test_text_search)."""
    async with db.system() as tx:
        rows = await tx.fetch(
            "SELECT c.relname, pg_get_indexdef(c.oid) AS ddl FROM pg_index i "
            "JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE i.indrelid = 'entities'::regclass AND c.relname LIKE $1 AND i.indisvalid "
            "AND pg_get_indexdef(c.oid) NOT LIKE '%gin_trgm_ops%'",
            f"ixr_{org.org_id.hex}_%",
        )
    return {r["relname"]: r["ddl"] for r in rows}


def _indexed_properties(found: dict[str, str]) -> set[str]:
    props = set()
    for ddl in found.values():
        for name in ("coverage", "replicas", "lastDeploy", "name"):
            if f"'{name}'::text" in ddl:
                props.add(name)
    return props


async def _fill(db: Database, org: Org, count: int) -> None:
    """`count` services straight into the table: coverage i % 100, replicas i % 7,
    lastDeploy one per hour back from 2026-11-01."""
    async with db.system() as tx:
        await tx.execute(
            """
            INSERT INTO entities (org_id, blueprint, identifier, properties, created_by,
                                  updated_by)
            SELECT $1, 'service', 's' || lpad(i::text, 6, '0'),
                   jsonb_build_object(
                       'coverage', i % 100,
                       'replicas', i % 7,
                       'lastDeploy', to_char(
                           timestamptz '2026-11-01 00:00:00+00' - make_interval(hours => i),
                           'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
                       'name', 'service ' || i),
                   'seed', 'seed'
            FROM generate_series(0, $2 - 1) AS i
            """,
            org.org_id,
            count,
        )


async def test_the_indexed_keyword_is_checked(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    # (`true` on a string property asks for a text index: tests/test_text_search.py)
    r = await client.post("/v1/blueprints", json=_blueprint(coverage="yes"), headers=org.headers)
    assert r.status_code == 422, r.text
    assert "/schema/properties/coverage/indexed" in str(r.json()), r.text
    await _create(client, org, _blueprint(coverage=True, lastDeploy=True, name=False))
    r = await client.get("/v1/blueprints/service", headers=org.headers)
    stored = r.json()["blueprint"]["schema"]["properties"]
    assert stored["coverage"]["indexed"] is True and stored["name"]["indexed"] is False


async def test_flagged_properties_are_indexed_and_dropped_when_no_longer_asked_for(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    db: Database,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="portolan.indexes")  # as `make run` logs
    org = await make_org()
    body = _blueprint(coverage=True, lastDeploy=True)
    await _create(client, org, body)
    done = await _reconcile(settings, org)
    assert len(done.created) == 2 and not done.dropped and not done.failed
    (logged,) = [r for r in caplog.records if r.getMessage() == "range indexes reconciled"]
    assert logged.built == 2 and logged.removed == 0  # type: ignore[attr-defined]
    found = await _indexes(db, org)
    assert _indexed_properties(found) == {"coverage", "lastDeploy"}
    for ddl in found.values():
        assert str(org.org_id) in ddl and "'service'::text" in ddl and "IS NOT NULL" in ddl
    assert any("portolan_number" in ddl for ddl in found.values())
    assert any("portolan_time" in ddl for ddl in found.values())
    # A second pass has nothing to do.
    again = await _reconcile(settings, org)
    assert not again.created and not again.dropped
    # Opted out, and removed from the schema: both dropped.
    changed = _blueprint(coverage=False)
    del changed["schema"]["properties"]["lastDeploy"]
    await _put(client, org, changed)
    done = await _reconcile(settings, org)
    assert len(done.dropped) == 2 and await _indexes(db, org) == {}
    # Asked for again, then the blueprint deleted: built, then dropped.
    await _put(client, org, _blueprint(coverage=True))
    assert len((await _reconcile(settings, org)).created) == 1
    r = await client.delete("/v1/blueprints/service", headers=org.headers)
    assert r.status_code == 200, r.text
    assert len((await _reconcile(settings, org)).dropped) == 1
    assert await _indexes(db, org) == {}


async def test_large_blueprints_get_indexes_without_a_flag(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, settings: Settings
) -> None:
    org = await make_org()
    await _create(client, org, _blueprint())
    await _fill(db, org, 30)
    assert not (await _reconcile(settings, org, min_entities=31)).created
    done = await _reconcile(settings, org, min_entities=30)
    # Three range indexes, and text indexes for the title, the identifier and `name`.
    assert len(done.created) == 6
    assert _indexed_properties(await _indexes(db, org)) == {"coverage", "replicas", "lastDeploy"}
    # `indexed: false` wins over size.
    await _put(client, org, _blueprint(replicas=False))
    done = await _reconcile(settings, org, min_entities=30)
    assert len(done.dropped) == 1
    assert _indexed_properties(await _indexes(db, org)) == {"coverage", "lastDeploy"}


async def test_an_interrupted_build_is_built_again(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, settings: Settings
) -> None:
    org = await make_org()
    await _create(client, org, _blueprint(coverage=True))
    await _reconcile(settings, org)
    (name,) = await _indexes(db, org)
    async with db.system() as tx:  # what a cancelled CREATE INDEX CONCURRENTLY leaves
        await tx.execute(
            "UPDATE pg_index SET indisvalid = false WHERE indexrelid = $1::regclass", name
        )
    assert await _indexes(db, org) == {}
    done = await _reconcile(settings, org)
    assert done.created == [name] and not done.dropped
    assert list(await _indexes(db, org)) == [name]


async def test_one_reconciler_at_a_time(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, settings: Settings
) -> None:
    org = await make_org()
    await _create(client, org, _blueprint(coverage=True))
    holder = await asyncpg.connect(settings.database_url)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MAINTENANCE_LOCK)
        done = await _reconcile(settings, org)
        assert done.skipped and not done.created
    finally:
        await holder.close()
    assert len((await _reconcile(settings, org)).created) == 1


async def test_range_rules_and_counts_read_the_index(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, settings: Settings
) -> None:
    """20k services with three indexed properties, beside four other tenants as large: a
    count over a range reads the range's own index (not a sibling index as a list of the
    blueprint), a narrow date range finds its page through its index, and the answers
    are right."""
    for _ in range(4):
        neighbour = await make_org()
        await _create(client, neighbour, _blueprint())
        await _fill(db, neighbour, 20_000)
    org = await make_org()
    await _create(client, org, _blueprint(coverage=True, replicas=True, lastDeploy=True))
    await _fill(db, org, 20_000)
    await _reconcile(settings, org)
    found = await _indexes(db, org)
    by_prop = {
        prop: name
        for name, ddl in found.items()
        for prop in ("coverage", "replicas", "lastDeploy")
        if f"'{prop}'::text" in ddl
    }
    assert len(by_prop) == 3
    assert settings.database_url is not None
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute("VACUUM ANALYZE entities")
    finally:
        await conn.close()

    async def plan(stmt: Any, values: dict[str, Any] | None = None) -> str:
        async with db.tenant(org.org_id) as tx:
            sql, args = compile_query(stmt, (), values)
            return "\n".join(r[0] for r in await tx.fetch("EXPLAIN " + sql, *args))

    coverage = {
        "combinator": "and",
        "rules": [{"property": "coverage", "operator": ">", "value": 50}],
    }
    async with db.tenant(org.org_id) as tx:
        scope = await scope_for(tx, "service", coverage)
    count = (
        sa.select(sa.func.count())
        .select_from(E)
        .where(matching(scope, Compiler(scope).compile(coverage)))
    )
    counted = await plan(count)
    # The range is the index's condition (not a filter over every row the index lists).
    assert by_prop["coverage"] in counted, counted
    assert "Index Cond: (portolan_number(properties, 'coverage'::text) >" in counted, counted
    week = {
        "combinator": "and",
        "rules": [
            {
                "property": "lastDeploy",
                "operator": "between",
                "value": {"from": "2026-10-25T00:00:00Z", "to": "2026-11-01T00:00:00Z"},
            }
        ],
    }
    async with db.tenant(org.org_id) as tx:
        search = Search(await scope_for(tx, "service", week), week)
    paged = await plan(search.statement(None, 51), search.values())
    assert by_prop["lastDeploy"] in paged, paged
    assert "Index Cond: ((portolan_time(properties, 'lastDeploy'::text) >=" in paged, paged

    r = await client.post(
        "/v1/entities/aggregate",
        json={
            "func": "count",
            "query": {
                **coverage,
                "rules": [
                    *coverage["rules"],
                    {"property": "$blueprint", "operator": "=", "value": "service"},
                ],
            },
        },
        headers=org.headers,
    )
    assert r.status_code == 200, r.text
    assert r.json()["result"] == sum(1 for i in range(20_000) if i % 100 > 50)
    r = await client.post(
        "/v1/blueprints/service/entities/search",
        json={"query": week, "limit": 1000},
        headers=org.headers,
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["entities"]) == 7 * 24 + 1


async def test_an_indexed_date_property_never_fails_a_write(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, settings: Settings
) -> None:
    """The index expression reads a value that is no date as null: a blueprint whose
    date-time property became a plain string keeps taking writes before the index goes."""
    org = await make_org()
    await _create(client, org, _blueprint(lastDeploy=True))
    await _reconcile(settings, org)
    assert _indexed_properties(await _indexes(db, org)) == {"lastDeploy"}
    plain = _blueprint()
    plain["schema"]["properties"]["lastDeploy"] = {"type": "string"}
    await _put(client, org, plain)
    for value in ("last tuesday", "2026-02-30T00:00:00Z", "2026-13-01"):
        r = await client.post(
            "/v1/blueprints/service/entities",
            json={"identifier": f"s-{uuid.uuid4().hex[:6]}", "properties": {"lastDeploy": value}},
            headers=org.headers,
        )
        assert r.status_code == 201, r.text
    assert len((await _reconcile(settings, org)).dropped) == 1


async def test_a_date_without_an_offset_reads_as_utc_whatever_the_session(db: Database) -> None:
    async with db.system() as tx:
        await tx.execute("SET LOCAL TimeZone = 'America/New_York'")
        plain = await tx.fetchval("SELECT portolan_time('\"2026-01-01T00:00:00\"')")
        offset = await tx.fetchval("SELECT portolan_time('\"2026-01-01T00:00:00+02:00\"')")
        times = await tx.fetchval(
            "SELECT array[portolan_time('3'), portolan_time('\"x\"'), "
            "portolan_time('{\"d\": \"2026-02-30T00:00:00Z\"}', 'd'), "
            "portolan_time('{}', 'd')]"
        )
        numbers = await tx.fetchval(
            "SELECT array[portolan_number('\"3\"'), portolan_number('{\"n\": \"3\"}', 'n'), "
            "portolan_number('{\"n\": 3.5}', 'n')]"
        )
    assert plain.isoformat() == "2026-01-01T00:00:00+00:00"
    assert offset.isoformat() == "2025-12-31T22:00:00+00:00"
    assert times == [None, None, None, None]
    assert numbers == [None, None, 3.5]


async def test_range_indexes_are_per_tenant(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, settings: Settings
) -> None:
    ours, theirs = await make_org(), await make_org()
    for org, body in ((ours, _blueprint(coverage=True)), (theirs, _blueprint())):
        await _create(client, org, body)
    await _fill(db, ours, 2000)
    await _fill(db, theirs, 500)
    await _reconcile(settings, ours, theirs)
    ((name, ddl),) = (await _indexes(db, ours)).items()
    assert str(ours.org_id) in ddl and str(theirs.org_id) not in ddl
    assert await _indexes(db, theirs) == {}
    # Their range searches and counts are answered from their rows alone.
    query = {
        "combinator": "and",
        "rules": [{"property": "coverage", "operator": ">=", "value": 98}],
    }
    r = await client.post(
        "/v1/blueprints/service/entities/search",
        json={"query": query, "limit": 1000},
        headers=theirs.headers,
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["entities"]) == sum(1 for i in range(500) if i % 100 >= 98)
    async with db.tenant(theirs.org_id) as tx:
        scope = await scope_for(tx, "service", query)
        sql, args = compile_query(
            sa.select(sa.func.count())
            .select_from(E)
            .where(matching(scope, Compiler(scope).compile(query))),
            (),
        )
        plan = "\n".join(r[0] for r in await tx.fetch("EXPLAIN " + sql, *args))
    assert name not in plan


async def test_an_orgs_range_indexes_are_capped(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    db: Database,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One org's many indexes slow every tenant's planning: beyond its cap, properties are
    not indexed, and what was left out is logged and reported; another org keeps its own."""
    noisy, quiet = await make_org(), await make_org()
    props: dict[str, Any] = {f"n{i}": {"type": "number", "indexed": True} for i in range(6)}
    props["expires"] = {"type": "string", "format": "timer"}
    await _create(
        client, noisy, {"identifier": "service", "title": "S", "schema": {"properties": props}}
    )
    await _create(client, quiet, _blueprint(coverage=True))
    assert settings.database_url is not None
    caplog.set_level(logging.WARNING, logger="portolan.indexes")
    done = await indexes.reconcile(
        settings.database_url, min_entities=10**9, max_per_org=3, orgs=[noisy.org_id, quiet.org_id]
    )
    built = await _indexes(db, noisy)
    assert len(built) == 3, list(built)
    # Flagged and timer properties in property order: expires, n0, n1.
    names = ("expires", "n0", "n1", "n2", "n3", "n4", "n5")
    assert {p for p in names if any(f"'{p}'::text" in d for d in built.values())} == {
        "expires",
        "n0",
        "n1",
    }
    assert sorted(c.rsplit(".", 1)[1] for c in done.capped) == ["n2", "n3", "n4", "n5"]
    assert all(f"{noisy.org_id}/service." in c for c in done.capped)
    assert _indexed_properties(await _indexes(db, quiet)) == {"coverage"}
    (logged,) = [r for r in caplog.records if "cap" in r.getMessage()]
    assert len(logged.capped) == 4  # type: ignore[attr-defined]
    # A lower cap drops what is now beyond it.
    again = await indexes.reconcile(
        settings.database_url, min_entities=10**9, max_per_org=1, orgs=[noisy.org_id]
    )
    assert len(again.dropped) == 2 and len(await _indexes(db, noisy)) == 1
    # The setting reaches the worker's job.
    assert settings.range_index_max_per_org == 30
