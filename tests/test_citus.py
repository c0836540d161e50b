"""Portolan on a Citus cluster: a coordinator and two workers on 127.0.0.1, built from the
vendored Citus source (tests/citus_cluster.py), migrated and distributed by
`run_migrations`, then driven through the real HTTP app.

Statements a request sends are recorded on the app's connections and explained on the
coordinator: a tenant's entity read must be a router plan on one shard.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from app.cli import run_migrations
from app.config import Settings
from app.db.citus import CitusMissing, citus_enabled
from app.db.database import Database
from app.kit.crypto import cipher_for
from app.main import create_app
from app.orgs import service as org_service
from tests.citus_cluster import CitusCluster, citus_cluster
from tests.conftest import PLATFORM_TOKEN, RUN_ID, SECRET_KEY, Org, Servers

SHARD_COUNT = 4  # per table: enough to tell one shard from all, cheap to create


@pytest.fixture(scope="module")
def cluster() -> Iterator[CitusCluster]:
    with citus_cluster() as started:
        yield started


@pytest.fixture(scope="module")
async def citus_settings(cluster: CitusCluster, servers: Servers) -> Settings:
    url = await asyncio.to_thread(cluster.create_database, "portolan")
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        env="test",
        database_url=url,
        redis_url=servers.redis_url,
        secret_key=SECRET_KEY,
        platform_token=PLATFORM_TOKEN,
        queue_name=f"portolan-test-citus:{RUN_ID}",
        log_level="WARNING",
        citus="on",
        citus_shard_count=SHARD_COUNT,
        db_pool_size=3,
        db_max_overflow=2,
    )
    await asyncio.to_thread(run_migrations, settings)
    return settings


@pytest.fixture(scope="module")
async def citus_app(citus_settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(citus_settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def http(citus_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=citus_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://portolan.test") as client:
        yield client


async def _org(app: FastAPI, http: httpx.AsyncClient) -> Org:
    db: Database = app.state.db
    async with db.system() as tx:
        created = await org_service.create_org(
            tx, name=f"org-{uuid.uuid4().hex[:8]}", cipher=cipher_for(app.state.settings)
        )
    response = await http.post(
        "/v1/auth/access_token",
        json={"clientId": created.client_id, "clientSecret": created.client_secret},
    )
    assert response.status_code == 200, response.text
    return Org(
        org_id=created.org_id,
        name=created.name,
        client_id=created.client_id,
        client_secret=created.client_secret,
        token=response.json()["accessToken"],
    )


SERVICE = {
    "identifier": "service",
    "title": "Service",
    "schema": {
        "properties": {
            "language": {"type": "string", "enum": ["python", "go"]},
            "tier": {"type": "number"},
        },
        "required": [],
    },
    "relations": {
        "dependsOn": {"title": "Depends on", "target": "service", "many": True, "required": False}
    },
}


@dataclass
class Recorded:
    sql: str
    args: tuple[Any, ...]


@dataclass(eq=False)
class Recorder:
    """Every statement the app's connections send while recording."""

    statements: list[Recorded]
    on: bool = False

    def __call__(self, record: Any) -> None:
        if self.on:
            self.statements.append(Recorded(record.query, tuple(record.args or ())))


@pytest.fixture
def recorder(citus_app: FastAPI) -> Iterator[Recorder]:
    """Records the statements of requests served while `recorder.on` (the app's idle
    connections, and any it opens, get the logger)."""
    db: Database = citus_app.state.db
    rec = Recorder(statements=[])
    pool = db.pool
    attached: list[asyncpg.Connection] = []
    original_acquire = pool.acquire

    async def acquire() -> asyncpg.Connection:
        conn = await original_acquire()
        if conn not in attached:
            conn.add_query_logger(rec)
            attached.append(conn)
        return conn

    pool.acquire = acquire  # type: ignore[method-assign]
    try:
        yield rec
    finally:
        pool.acquire = original_acquire  # type: ignore[method-assign]
        for conn in attached:
            if not conn.is_closed():
                conn.remove_query_logger(rec)


async def _explain(settings: Settings, org_id: uuid.UUID, statement: Recorded) -> dict[str, Any]:
    """The coordinator's plan of `statement` as the app role, bound to `org_id`."""
    assert settings.database_url is not None
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with conn.transaction():
            await conn.execute(
                f"SET LOCAL ROLE portolan_app; SET LOCAL app.org_id = '{org_id}';"
                " SET LOCAL plan_cache_mode = force_custom_plan"
            )
            raw = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {statement.sql}", *statement.args)
    finally:
        await conn.close()
    plan: dict[str, Any] = (json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
    return plan


def _custom_scans(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan] if plan.get("Node Type") == "Custom Scan" else []
    for child in plan.get("Plans", []):
        found.extend(_custom_scans(child))
    return found


def _tenant_reads(recorded: list[Recorded], table: str) -> list[Recorded]:
    return [
        r
        for r in recorded
        if r.sql.lstrip().upper().startswith(("SELECT", "WITH")) and table in r.sql
    ]


async def test_tables_are_distributed_by_org_and_globals_are_reference(
    citus_settings: Settings,
) -> None:
    assert citus_settings.database_url is not None
    conn = await asyncpg.connect(citus_settings.database_url)
    try:
        rows = await conn.fetch(
            "SELECT logicalrelid::regclass::text AS name, partmethod::text, colocationid,"
            " column_to_column_name(logicalrelid, partkey) AS column"
            " FROM pg_dist_partition"
        )
        local = await conn.fetch(
            "SELECT c.relname FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace"
            " AND c.relkind = 'r' AND c.relname <> 'alembic_version'"
            " AND NOT EXISTS (SELECT 1 FROM pg_dist_partition p WHERE p.logicalrelid = c.oid)"
        )
    finally:
        await conn.close()
    kinds = {r["name"]: r for r in rows}
    assert [r["relname"] for r in local] == []
    assert kinds["organizations"]["partmethod"] == "n"
    assert kinds["event_feed_cursors"]["partmethod"] == "n"
    hashed = [r for r in rows if r["partmethod"] == "h"]
    assert {r["column"] for r in hashed} == {"org_id"}
    assert len({r["colocationid"] for r in hashed}) == 1
    assert {"entities", "blueprints", "entity_events", "audit_log"} <= {r["name"] for r in hashed}


async def test_migrate_again_changes_nothing(citus_settings: Settings) -> None:
    await asyncio.to_thread(run_migrations, citus_settings)
    assert citus_settings.database_url is not None
    conn = await asyncpg.connect(citus_settings.database_url)
    try:
        shards = await conn.fetchval(
            "SELECT count(*) FROM pg_dist_shard WHERE logicalrelid = 'entities'::regclass"
        )
    finally:
        await conn.close()
    assert shards == SHARD_COUNT


async def test_two_orgs_write_and_read_their_own_catalogs(
    citus_app: FastAPI, http: httpx.AsyncClient
) -> None:
    first = await _org(citus_app, http)
    second = await _org(citus_app, http)
    for org in (first, second):
        created = await http.post("/v1/blueprints", json=SERVICE, headers=org.headers)
        assert created.status_code == 201, created.text
    entity = {"identifier": "billing", "title": "Billing", "properties": {"language": "go"}}
    written = await http.post("/v1/blueprints/service/entities", json=entity, headers=first.headers)
    assert written.status_code == 201, written.text
    one = await http.get("/v1/blueprints/service/entities/billing", headers=first.headers)
    assert one.status_code == 200, one.text
    assert one.json()["entity"]["properties"]["language"] == "go"
    other = await http.get("/v1/blueprints/service/entities/billing", headers=second.headers)
    assert other.status_code == 404, other.text


# The search page's statements join entities with correlated subqueries keyed by
# `e.org_id` (app/search/service.py): Citus refuses the windowed page ("complex joins are
# only supported when all distributed tables are co-located and joined on their
# distribution columns") until they compare with the bound org parameter (docs/scaling.md).
@pytest.mark.xfail(strict=True, reason="search pages are not yet router queries on Citus")
async def test_two_orgs_search_their_own_catalogs(
    citus_app: FastAPI, http: httpx.AsyncClient
) -> None:
    first = await _org(citus_app, http)
    second = await _org(citus_app, http)
    for org in (first, second):
        created = await http.post("/v1/blueprints", json=SERVICE, headers=org.headers)
        assert created.status_code == 201, created.text
    entity = {"identifier": "billing", "title": "Billing", "properties": {"language": "go"}}
    written = await http.post("/v1/blueprints/service/entities", json=entity, headers=first.headers)
    assert written.status_code == 201, written.text
    query = {
        "combinator": "and",
        "rules": [{"property": "language", "operator": "=", "value": "go"}],
    }
    found = await http.post(
        "/v1/blueprints/service/entities/search", json={"query": query}, headers=first.headers
    )
    assert found.status_code == 200, found.text
    assert [e["identifier"] for e in found.json()["entities"]] == ["billing"]
    nothing = await http.post(
        "/v1/blueprints/service/entities/search", json={"query": query}, headers=second.headers
    )
    assert nothing.status_code == 200, nothing.text
    assert nothing.json()["entities"] == []


async def test_a_token_ends_with_its_deleted_credential(
    citus_app: FastAPI, http: httpx.AsyncClient
) -> None:
    org = await _org(citus_app, http)
    made = await http.post(
        "/v1/apps", json={"name": "ci", "roles": ["Member"]}, headers=org.headers
    )
    assert made.status_code == 201, made.text
    app = made.json()["app"]
    exchanged = await http.post(
        "/v1/auth/access_token", json={"clientId": app["clientId"], "clientSecret": app["secret"]}
    )
    assert exchanged.status_code == 200, exchanged.text
    bearer = {"Authorization": f"Bearer {exchanged.json()['accessToken']}"}
    assert (await http.get("/v1/blueprints", headers=bearer)).status_code == 200
    gone = await http.delete(f"/v1/apps/{app['clientId']}", headers=org.headers)
    assert gone.status_code == 200, gone.text
    refused = await http.get("/v1/blueprints", headers=bearer)
    assert refused.status_code == 401 and refused.json()["error"] == "invalid_token"


async def _assert_router_plans(
    settings: Settings, org_id: uuid.UUID, statements: list[Recorded]
) -> None:
    for statement in statements:
        plan = await _explain(settings, org_id, statement)
        scans = _custom_scans(plan)
        assert scans, (statement.sql, plan)
        for scan in scans:
            job = scan["Distributed Query"]["Job"]
            assert job["Task Count"] == 1, (statement.sql, job)
            assert scan["Custom Plan Provider"] == "Citus Adaptive", scan


async def _org_with_entity(app: FastAPI, http: httpx.AsyncClient) -> Org:
    org = await _org(app, http)
    created = await http.post("/v1/blueprints", json=SERVICE, headers=org.headers)
    assert created.status_code == 201, created.text
    entity = {"identifier": "api", "title": "API", "properties": {"language": "python"}}
    written = await http.post("/v1/blueprints/service/entities", json=entity, headers=org.headers)
    assert written.status_code == 201, written.text
    return org


async def test_an_entity_upsert_reads_the_entity_with_a_router_plan_on_one_shard(
    citus_app: FastAPI, citus_settings: Settings, http: httpx.AsyncClient, recorder: Recorder
) -> None:
    org = await _org_with_entity(citus_app, http)
    recorder.on = True
    changed = await http.post(
        "/v1/blueprints/service/entities?upsert=true&merge=true",
        json={"identifier": "api", "properties": {"tier": 2}},
        headers=org.headers,
    )
    recorder.on = False
    assert changed.status_code == 200, changed.text
    reads = _tenant_reads(recorder.statements, "FROM entities")
    assert reads, [r.sql for r in recorder.statements]
    await _assert_router_plans(citus_settings, org.org_id, reads)


# GET one reads one document written by PostgreSQL (app/search/documents.py), every table
# by the bound org: Citus routes it to the org's shard.
async def test_get_one_entity_is_a_router_plan_on_one_shard(
    citus_app: FastAPI, citus_settings: Settings, http: httpx.AsyncClient, recorder: Recorder
) -> None:
    org = await _org_with_entity(citus_app, http)
    recorder.on = True
    one = await http.get("/v1/blueprints/service/entities/api", headers=org.headers)
    recorder.on = False
    assert one.status_code == 200, one.text
    reads = _tenant_reads(recorder.statements, "FROM entities")
    assert reads, [r.sql for r in recorder.statements]
    await _assert_router_plans(citus_settings, org.org_id, reads)


async def test_a_single_postgresql_is_not_citus_unless_required(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        assert await citus_enabled(conn, "auto") is False
        assert await citus_enabled(conn, "off") is False
        with pytest.raises(CitusMissing):
            await citus_enabled(conn, "on")
    finally:
        await conn.close()
