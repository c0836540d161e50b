"""Portolan on a Citus cluster: a coordinator and two workers on 127.0.0.1, built from the
vendored Citus source (tests/citus_cluster.py), migrated and distributed by
`run_migrations`, then driven through the real HTTP app.

Statements a request sends are recorded on the app's connections and explained on the
coordinator: a tenant's entity read must be a router plan on one shard. Searches, lists and
walks must also answer what the suite's single PostgreSQL answers for the same catalog.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
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
from app.dispatch.runner import sweep_expired
from app.kit.crypto import cipher_for
from app.main import create_app
from app.orgs import service as org_service
from app.worker import InProcessWorker
from tests.citus_cluster import CitusCluster, citus_cluster
from tests.conftest import (
    PLATFORM_TOKEN,
    RUN_ID,
    SECRET_KEY,
    Org,
    OrgFactory,
    Servers,
    dispatch_settings,
)
from tests.receivers import WebhookReceiver

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

    async def acquire(*args: Any, **kwargs: Any) -> asyncpg.Connection:
        conn = await original_acquire(*args, **kwargs)
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
        for kind in ("json", "jsonb"):  # as the app's connections encode them
            await conn.set_type_codec(
                kind, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
            )
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


# The search page's subqueries compare with the bound org, not with `e.org_id`: Citus
# refused the windowed page while they were correlated through the window's rows.
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


async def test_two_orgs_read_their_own_audit_logs_with_port_filters(
    citus_app: FastAPI, http: httpx.AsyncClient
) -> None:
    """The audit log (entity events and other changes in one statement, with the run
    lookup of `actionType`) runs on the org's shard."""
    first = await _org(citus_app, http)
    second = await _org(citus_app, http)
    action = {
        "identifier": "deploy",
        "trigger": {"type": "self-service", "operation": "CREATE", "userInputs": {}},
        "invocationMethod": {"type": "WEBHOOK", "url": "http://127.0.0.1:9/x"},
    }
    for org in (first, second):
        created = await http.post("/v1/blueprints", json=SERVICE, headers=org.headers)
        assert created.status_code == 201, created.text
        created = await http.post("/v1/actions", json=action, headers=org.headers)
        assert created.status_code == 201, created.text
    entity = {"identifier": "billing", "title": "Billing", "properties": {"language": "go"}}
    written = await http.post("/v1/blueprints/service/entities", json=entity, headers=first.headers)
    assert written.status_code == 201, written.text
    run = await http.post("/v1/actions/deploy/runs", json={"properties": {}}, headers=first.headers)
    assert run.status_code == 202, run.text
    run_id = run.json()["run"]["id"]

    async def audits(org: Org, query: str) -> set[tuple[str, str]]:
        r = await http.get(f"/v1/audit-log?{query}", headers=org.headers)
        assert r.status_code == 200, r.text
        return {(a["resourceType"], a["identifier"]) for a in r.json()["audits"]}

    assert ("entity", "billing") in await audits(first, "")
    assert ("entity", "billing") not in await audits(second, "")
    assert await audits(first, "actionType=self-service") == {("action", "deploy"), ("run", run_id)}
    assert await audits(second, "actionType=self-service") == {("action", "deploy")}
    assert await audits(first, "webhookId=nope&resources=entity") == set()
    assert await audits(first, "webhookEventId=nope") == set()
    assert await audits(first, "InstallationId=nope") == set()
    kept = await audits(first, "include_deleted_entities=false&resources=entity")
    assert kept == {("entity", "billing")}


async def test_stale_statistics_of_distributed_tables_are_refreshed_on_their_shards(
    citus_app: FastAPI, http: httpx.AsyncClient
) -> None:
    """A distributed table's rows, and its activity counters, are in its shards: the
    refresh adds the nodes' counters up by table and ANALYZEs the table (Citus runs it on
    the shards). On the coordinator alone a bulk write looked like no change at all."""
    from app.db.maintenance import analyze_stale_tables

    db: Database = citus_app.state.db
    for _ in range(2):
        org = await _org(citus_app, http)
        created = await http.post("/v1/blueprints", json=SERVICE, headers=org.headers)
        assert created.status_code == 201, created.text
        bulk = {"entities": [{"identifier": f"svc-{n}"} for n in range(300)]}
        written = await http.post(
            "/v1/blueprints/service/entities/bulk", json=bulk, headers=org.headers
        )
        assert written.status_code in (200, 207), written.text
    analyzed: list[str] = []
    for _ in range(100):  # activity statistics reach each node's server asynchronously
        analyzed = await analyze_stale_tables(db, min_rows=100)
        if "entities" in analyzed:
            break
        await asyncio.sleep(0.1)
    assert "entities" in analyzed, analyzed
    assert not any(name.rpartition("_")[2].isdigit() for name in analyzed), analyzed
    async with db.system() as tx:
        # Every placement of the table was analyzed (the shards hold the statistics).
        results = await tx.fetch(
            "SELECT success, result FROM run_command_on_shards('entities', "
            "$$SELECT (last_analyze IS NOT NULL OR last_autoanalyze IS NOT NULL "
            "OR n_live_tup = 0)::text FROM pg_stat_user_tables WHERE relid = '%s'::regclass$$)"
        )
    assert results and all(r["success"] and r["result"] == "true" for r in results), results
    # Once analyzed it is no longer stale (counters still arriving may ask for one more).
    for _ in range(50):
        if "entities" not in await analyze_stale_tables(db, min_rows=100):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("entities stayed stale after being analyzed")


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


# -- searches, lists and walks: what a single PostgreSQL answers, each a router plan ------

TEAM = {
    "identifier": "team",
    "title": "Team",
    "schema": {"properties": {"size": {"type": "number"}}, "required": []},
}

# Relations to itself and to teams, a mirror through a relation and aggregations over the
# linked services: every kind of subquery a page's statement holds.
CATALOG_SERVICE = {
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
        "dependsOn": {"title": "Depends on", "target": "service", "many": True, "required": False},
        "owner": {"title": "Owner", "target": "team", "many": False, "required": False},
    },
    "mirrorProperties": {"teamSize": {"path": "owner.size"}, "teamTitle": {"path": "owner.$title"}},
    "aggregationProperties": {
        "neighbours": {
            "title": "Neighbours",
            "target": "service",
            "calculationSpec": {"func": "count", "calculationBy": "entities"},
        },
        "neighbourTiers": {
            "title": "Neighbours' tiers",
            "target": "service",
            "calculationSpec": {"func": "sum", "calculationBy": "property", "property": "tier"},
        },
    },
}

# a -> b -> c, d -> a, d -> c (dependsOn); a and d owned by core, b by edge.
CATALOG_ENTITIES: list[tuple[str, dict[str, Any]]] = [
    ("team", {"identifier": "core", "title": "Core", "properties": {"size": 5}}),
    ("team", {"identifier": "edge", "title": "Edge", "properties": {"size": 3}}),
    ("service", {"identifier": "c", "title": "C", "properties": {"language": "go", "tier": 3}}),
    (
        "service",
        {
            "identifier": "b",
            "title": "B",
            "properties": {"language": "go", "tier": 2},
            "relations": {"dependsOn": ["c"], "owner": "edge"},
        },
    ),
    (
        "service",
        {
            "identifier": "a",
            "title": "A",
            "properties": {"language": "python", "tier": 1},
            "relations": {"dependsOn": ["b"], "owner": "core"},
        },
    ),
    (
        "service",
        {
            "identifier": "d",
            "title": "D",
            "properties": {"language": "python", "tier": 2},
            "relations": {"dependsOn": ["a", "c"], "owner": "core"},
        },
    ),
]


async def _write_catalog(
    http: httpx.AsyncClient, org: Org, scorecard: dict[str, Any] | None = None
) -> None:
    """The catalog above; with `scorecard`, services' scorecard made before the entities
    (their writes grade them)."""
    for blueprint in (TEAM, CATALOG_SERVICE):
        created = await http.post("/v1/blueprints", json=blueprint, headers=org.headers)
        assert created.status_code == 201, created.text
    if scorecard is not None:
        made = await http.post(
            "/v1/blueprints/service/scorecards", json=scorecard, headers=org.headers
        )
        assert made.status_code == 201, made.text
    for bp, entity in CATALOG_ENTITIES:
        written = await http.post(f"/v1/blueprints/{bp}/entities", json=entity, headers=org.headers)
        assert written.status_code == 201, written.text


@dataclass
class Twins:
    """The same catalog in an org on the cluster and in one on the suite's PostgreSQL."""

    citus_app: FastAPI
    citus_settings: Settings
    http: httpx.AsyncClient
    citus: Org
    client: httpx.AsyncClient
    plain: Org
    recorder: Recorder

    async def answer(self, method: str, path: str, body: Any = None) -> Any:
        """The cluster's answer, checked equal to the single PostgreSQL's (times and
        authors aside: the orgs differ in them) and checked to read entities only through
        router plans on the org's shard; the statements read are in `self.reads`."""
        self.recorder.statements.clear()
        self.recorder.on = True
        try:
            on_citus = await self.http.request(method, path, json=body, headers=self.citus.headers)
        finally:
            self.recorder.on = False
        assert on_citus.status_code == 200, on_citus.text
        on_plain = await self.client.request(method, path, json=body, headers=self.plain.headers)
        assert on_plain.status_code == 200, on_plain.text
        assert _comparable(on_citus.json()) == _comparable(on_plain.json())
        self.reads = _tenant_reads(self.recorder.statements, "FROM entities")
        assert self.reads, [r.sql for r in self.recorder.statements]
        await _assert_router_plans(self.citus_settings, self.citus.org_id, self.reads)
        return on_citus.json()


_PER_ORG = {"createdAt", "updatedAt", "createdBy", "updatedBy"}


def _comparable(answer: Any) -> Any:
    if isinstance(answer, dict):
        return {k: _comparable(v) for k, v in answer.items() if k not in _PER_ORG}
    if isinstance(answer, list):
        return [_comparable(v) for v in answer]
    return answer


def _identifiers(answer: dict[str, Any]) -> list[str]:
    return [e["identifier"] for e in answer["entities"]]


@pytest.fixture
async def twins(
    citus_app: FastAPI,
    citus_settings: Settings,
    http: httpx.AsyncClient,
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    recorder: Recorder,
) -> Twins:
    citus = await _org(citus_app, http)
    plain = await make_org()
    await _write_catalog(http, citus)
    await _write_catalog(client, plain)
    return Twins(citus_app, citus_settings, http, citus, client, plain, recorder)


def _search(*rules: dict[str, Any]) -> dict[str, Any]:
    return {"query": {"combinator": "and", "rules": list(rules)}}


def _related(value: str, hops: int, direction: str = "downstream") -> dict[str, Any]:
    return {
        "operator": "relatedTo",
        "blueprint": "service",
        "value": value,
        "direction": direction,
        "maxHops": hops,
    }


async def test_a_search_page_answers_as_postgresql_with_router_plans(twins: Twins) -> None:
    found = await twins.answer(
        "POST",
        "/v1/blueprints/service/entities/search",
        _search({"property": "language", "operator": "=", "value": "go"}),
    )
    assert _identifiers(found) == ["b", "c"]


async def test_a_search_page_with_titled_relations_and_a_cursor_answers_as_postgresql(
    twins: Twins,
) -> None:
    path = "/v1/blueprints/service/entities/search?attach_title_to_relation=true"
    rule = {"property": "tier", "operator": ">", "value": 1}
    first = await twins.answer("POST", path, {**_search(rule), "limit": 2})
    assert _identifiers(first) == ["b", "c"] and first["next"]
    rest = await twins.answer("POST", path, {**_search(rule), "limit": 2, "from": first["next"]})
    assert _identifiers(rest) == ["d"]
    assert rest["entities"][0]["relations"]["owner"] == {"identifier": "core", "title": "Core"}


async def test_the_full_list_streams_as_postgresql_with_router_plans(twins: Twins) -> None:
    listed = await twins.answer("GET", "/v1/blueprints/service/entities")
    assert _identifiers(listed) == ["a", "b", "c", "d"]


async def test_a_search_across_blueprints_streams_as_postgresql_with_router_plans(
    twins: Twins,
) -> None:
    found = await twins.answer("POST", "/v1/entities/search", {"combinator": "and", "rules": []})
    assert _identifiers(found) == ["a", "b", "c", "d", "core", "edge"]


async def test_related_to_one_hop_answers_as_postgresql_with_router_plans(twins: Twins) -> None:
    found = await twins.answer(
        "POST", "/v1/blueprints/service/entities/search", _search(_related("c", 1))
    )
    assert _identifiers(found) == ["b", "d"]


async def test_related_to_two_hops_walks_on_the_orgs_shard_as_postgresql(twins: Twins) -> None:
    found = await twins.answer(
        "POST", "/v1/blueprints/service/entities/search", _search(_related("c", 2))
    )
    assert _identifiers(found) == ["a", "b", "d"]
    assert any("WITH RECURSIVE" in r.sql for r in twins.reads), [r.sql for r in twins.reads]


async def test_related_to_both_ways_inside_an_or_answers_as_postgresql(twins: Twins) -> None:
    query = {
        "query": {
            "combinator": "or",
            "rules": [
                {"operator": "relatedTo", "blueprint": "service", "value": "a", "maxHops": 2},
                {"property": "$identifier", "operator": "=", "value": "a"},
            ],
        }
    }
    found = await twins.answer("POST", "/v1/blueprints/service/entities/search", query)
    assert _identifiers(found) == ["a", "b", "c", "d"]


async def test_mirror_and_aggregation_properties_answer_as_postgresql(twins: Twins) -> None:
    found = await twins.answer(
        "POST",
        "/v1/blueprints/service/entities/search",
        _search({"property": "teamSize", "operator": "=", "value": 5}),
    )
    assert _identifiers(found) == ["a", "d"]
    a = found["entities"][0]["properties"]
    assert (a["teamSize"], a["teamTitle"], a["neighbours"], a["neighbourTiers"]) == (
        5,
        "Core",
        2,
        4,
    )


async def test_a_rule_on_an_aggregation_answers_as_postgresql(twins: Twins) -> None:
    found = await twins.answer(
        "POST",
        "/v1/blueprints/service/entities/search",
        _search({"property": "neighbours", "operator": ">=", "value": 2}),
    )
    assert _identifiers(found) == ["a", "b", "c", "d"]


async def test_another_org_searches_lists_and_walks_none_of_an_orgs_entities(
    citus_app: FastAPI, http: httpx.AsyncClient
) -> None:
    owner = await _org(citus_app, http)
    await _write_catalog(http, owner)
    other = await _org(citus_app, http)
    for blueprint in (TEAM, SERVICE):
        created = await http.post("/v1/blueprints", json=blueprint, headers=other.headers)
        assert created.status_code == 201, created.text
    own = {"identifier": "z", "title": "Z", "properties": {"language": "go"}}
    written = await http.post("/v1/blueprints/service/entities", json=own, headers=other.headers)
    assert written.status_code == 201, written.text
    answers = [
        await http.post(
            "/v1/blueprints/service/entities/search", json=_search(), headers=other.headers
        ),
        await http.post(
            "/v1/blueprints/service/entities/search",
            json=_search({"property": "language", "operator": "=", "value": "go"}),
            headers=other.headers,
        ),
        await http.post(
            "/v1/blueprints/service/entities/search",
            json=_search(_related("c", 2)),
            headers=other.headers,
        ),
        await http.get("/v1/blueprints/service/entities", headers=other.headers),
        await http.post("/v1/entities/search", json={"rules": []}, headers=other.headers),
    ]
    seen = []
    for answer in answers:
        assert answer.status_code == 200, answer.text
        seen.append(_identifiers(answer.json()))
    assert seen == [["z"], ["z"], [], ["z"], ["z"]]


# -- deletes ---------------------------------------------------------------------------------


async def _catalog_of(citus_settings: Settings, org_id: uuid.UUID) -> dict[str, Any]:
    """An org's entities, their DELETE events and scorecard results, read on the coordinator
    (as the operator: no request path in between)."""
    assert citus_settings.database_url is not None
    conn = await asyncpg.connect(citus_settings.database_url)
    try:
        entities = await conn.fetch(
            "SELECT blueprint || '/' || identifier AS key FROM entities WHERE org_id = $1"
            " ORDER BY 1",
            org_id,
        )
        deleted = await conn.fetch(
            "SELECT blueprint || '/' || identifier AS key, before FROM entity_events"
            " WHERE org_id = $1 AND action = 'DELETE' ORDER BY 1",
            org_id,
        )
        graded = await conn.fetch(
            "SELECT DISTINCT identifier FROM scorecard_results WHERE org_id = $1 ORDER BY 1", org_id
        )
    finally:
        await conn.close()
    return {
        "entities": [r["key"] for r in entities],
        "deleted": [r["key"] for r in deleted],
        "befores": {r["key"]: json.loads(r["before"]) for r in deleted},
        "graded": [r["identifier"] for r in graded],
    }


async def test_two_orgs_delete_one_bulk_and_all_entities_each_only_its_own(
    citus_app: FastAPI, citus_settings: Settings, http: httpx.AsyncClient
) -> None:
    first = await _org(citus_app, http)
    second = await _org(citus_app, http)
    for org in (first, second):
        await _write_catalog(http, org, scorecard=READY)
    before = await _catalog_of(citus_settings, second.org_id)
    assert before["graded"] == ["a", "b", "c", "d"]

    one = await http.delete("/v1/blueprints/service/entities/d", headers=first.headers)
    assert one.status_code == 200, one.text
    bulk = await http.post(
        "/v1/blueprints/service/bulk/entities/delete",
        json={"entities": ["a", "b", "missing"]},
        headers=first.headers,
    )
    assert bulk.status_code == 200, bulk.text
    assert bulk.json()["deletedEntities"] == ["a", "b"]
    everything = await http.delete("/v1/blueprints/team/all-entities", headers=first.headers)
    assert everything.status_code == 200, everything.text
    migration = await http.get(
        f"/v1/migrations/{everything.json()['migrationId']}", headers=first.headers
    )
    assert migration.status_code == 200, migration.text
    assert migration.json()["migration"]["successCount"] == 2

    after = await _catalog_of(citus_settings, first.org_id)
    assert after["entities"] == ["service/c"]
    assert after["deleted"] == [
        "service/a",
        "service/b",
        "service/d",
        "team/core",
        "team/edge",
    ]
    assert after["befores"]["service/d"]["properties"]["tier"] == 2
    # The entity delete trigger (a row trigger on Citus) took their scorecard results.
    assert after["graded"] == ["c"]
    listed = await http.get("/v1/blueprints/service/entities", headers=first.headers)
    assert _identifiers(listed.json()) == ["c"]
    gone = await http.get("/v1/blueprints/service/entities/d", headers=first.headers)
    assert gone.status_code == 404, gone.text
    # The other org, with the same identifiers on the cluster, keeps all of it.
    assert await _catalog_of(citus_settings, second.org_id) == before
    kept = await http.get("/v1/blueprints/service/entities", headers=second.headers)
    assert _identifiers(kept.json()) == ["a", "b", "c", "d"]


async def test_another_orgs_token_deletes_nothing(
    citus_app: FastAPI, citus_settings: Settings, http: httpx.AsyncClient
) -> None:
    owner = await _org_with_entity(citus_app, http)
    other = await _org(citus_app, http)
    created = await http.post("/v1/blueprints", json=SERVICE, headers=other.headers)
    assert created.status_code == 201, created.text
    refused = await http.delete("/v1/blueprints/service/entities/api", headers=other.headers)
    assert refused.status_code == 404, refused.text
    bulk = await http.post(
        "/v1/blueprints/service/bulk/entities/delete",
        json={"entities": ["api"]},
        headers=other.headers,
    )
    assert bulk.status_code == 200 and bulk.json()["deletedEntities"] == [], bulk.text
    everything = await http.delete("/v1/blueprints/service/all-entities", headers=other.headers)
    assert everything.status_code == 200, everything.text
    assert (await _catalog_of(citus_settings, owner.org_id))["entities"] == ["service/api"]


async def test_a_bulk_delete_past_one_statement_of_events_logs_every_entity(
    citus_app: FastAPI, citus_settings: Settings, http: httpx.AsyncClient
) -> None:
    """All-entities deletes write their events in VALUES lists of 500 rows on Citus."""
    org = await _org(citus_app, http)
    created = await http.post("/v1/blueprints", json=SERVICE, headers=org.headers)
    assert created.status_code == 201, created.text
    for start in (0, 550):
        batch = [
            {"identifier": f"s{n:04d}", "properties": {"tier": n}}
            for n in range(start, start + 550)
        ]
        written = await http.post(
            "/v1/blueprints/service/entities/bulk", json={"entities": batch}, headers=org.headers
        )
        assert written.status_code == 200, written.text
    everything = await http.delete("/v1/blueprints/service/all-entities", headers=org.headers)
    assert everything.status_code == 200, everything.text
    catalog = await _catalog_of(citus_settings, org.org_id)
    assert catalog["entities"] == []
    assert catalog["deleted"] == [f"service/s{n:04d}" for n in range(1100)]
    assert catalog["befores"]["service/s1099"]["properties"]["tier"] == 1099


# -- every statement of other tenant requests: router plans on the org's shard ------------

READY = {
    "identifier": "ready",
    "title": "Ready",
    "rules": [
        {
            "identifier": "owned",
            "title": "Owned",
            "level": "Gold",
            "query": {
                "combinator": "and",
                "conditions": [{"property": "owner", "operator": "isNotEmpty"}],
            },
        }
    ],
}
_SERVICES = {
    "combinator": "and",
    "rules": [{"property": "$blueprint", "operator": "=", "value": "service"}],
}

# (what, method, path, body): requests whose every statement is checked.
REQUESTS: list[tuple[str, str, str, Any]] = [
    (
        "bulk write",
        "POST",
        "/v1/blueprints/service/entities/bulk",
        {
            "entities": [
                {
                    "identifier": "e",
                    "properties": {"language": "go"},
                    "relations": {"dependsOn": ["a"]},
                },
                {"identifier": "f", "properties": {"tier": 1}},
            ]
        },
    ),
    ("scorecard creation", "POST", "/v1/blueprints/service/scorecards", READY),
    (
        "entity write graded by a scorecard",
        "POST",
        "/v1/blueprints/service/entities?upsert=true",
        {"identifier": "e", "properties": {"language": "go"}, "relations": {"owner": "core"}},
    ),
    (
        "search by scorecard level",
        "POST",
        "/v1/blueprints/service/entities/search",
        _search({"property": "scorecards.ready.level", "operator": "=", "value": "Gold"}),
    ),
    (
        "search by relation",
        "POST",
        "/v1/blueprints/service/entities/search",
        _search({"property": "dependsOn", "operator": "in", "value": ["a", "c"]}),
    ),
    (
        "search by a path of relations",
        "POST",
        "/v1/blueprints/service/entities/search",
        _search(
            {"property": {"path": ["dependsOn", "owner"]}, "operator": "matchAny", "value": "core"}
        ),
    ),
    ("delete one", "DELETE", "/v1/blueprints/service/entities/d", None),
    (
        "bulk delete",
        "POST",
        "/v1/blueprints/service/bulk/entities/delete",
        {"entities": ["a", "d", "missing"]},
    ),
    ("delete all entities", "DELETE", "/v1/blueprints/team/all-entities", None),
    ("aggregate count", "POST", "/v1/entities/aggregate", {"func": "count", "query": _SERVICES}),
    (
        "aggregate sum",
        "POST",
        "/v1/entities/aggregate",
        {"func": "sum", "property": "tier", "query": _SERVICES, "groupBy": "language"},
    ),
    (
        "aggregate value counts",
        "POST",
        "/v1/entities/aggregate",
        {"func": "countValues", "property": "language"},
    ),
    (
        "aggregate relation counts",
        "POST",
        "/v1/entities/aggregate",
        {"func": "countValues", "relation": "dependsOn", "query": _SERVICES},
    ),
]


DELETES = {"delete one", "bulk delete", "delete all entities"}
# Scorecards made before the request (their results are read or written by it).
FILTERED = {
    **READY,
    "filter": {
        "combinator": "and",
        "conditions": [{"property": "language", "operator": "=", "value": "go"}],
    },
}
SCORECARD_FIRST = {
    "search by scorecard level": READY,
    "entity write graded by a scorecard": READY,
}
# Requests with a statement Citus runs in steps (distributed subplans) before its one-shard
# task: the entity write's statement inserts rows selected from its parameters
# (`INSERT ... SELECT ... FROM unnest(...)` in its CTEs), which Citus pulls through the
# coordinator into the org's shard (docs/scaling.md).
WITH_SUBPLANS = {"bulk write", "entity write graded by a scorecard"}


@pytest.mark.parametrize(("what", "method", "path", "body"), REQUESTS, ids=[r[0] for r in REQUESTS])
async def test_every_statement_of_a_tenant_request_is_a_router_plan(
    citus_app: FastAPI,
    citus_settings: Settings,
    http: httpx.AsyncClient,
    recorder: Recorder,
    what: str,
    method: str,
    path: str,
    body: Any,
) -> None:
    org = await _org(citus_app, http)
    await _write_catalog(http, org)
    if what in SCORECARD_FIRST:
        made = await http.post(
            "/v1/blueprints/service/scorecards", json=SCORECARD_FIRST[what], headers=org.headers
        )
        assert made.status_code == 201, made.text
    recorder.on = True
    answered = await http.request(method, path, json=body, headers=org.headers)
    recorder.on = False
    assert answered.status_code in (200, 201), answered.text
    distributed = 0
    with_subplans: list[str] = []
    for statement in recorder.statements:
        if (
            not statement.sql.lstrip()
            .upper()
            .startswith(("SELECT", "WITH", "INSERT", "UPDATE", "DELETE"))
        ):
            continue  # the opening (BEGIN; SET LOCAL ...) and COMMIT
        scans = _custom_scans(await _explain(citus_settings, org.org_id, statement))
        if not scans:
            continue  # no distributed table: the credential check, the driver's own queries
        distributed += 1
        for scan in scans:
            assert scan["Distributed Query"]["Job"]["Task Count"] == 1, (statement.sql, scan)
            if scan["Distributed Query"].get("Subplans"):
                with_subplans.append(statement.sql)
    assert distributed, [r.sql for r in recorder.statements]
    assert bool(with_subplans) == (what in WITH_SUBPLANS), (what, with_subplans)
    if what in DELETES:
        events = [r for r in recorder.statements if "INSERT INTO entity_events" in r.sql]
        assert events, [r.sql for r in recorder.statements]
    if what == "entity write graded by a scorecard":
        graded = [r for r in recorder.statements if "INSERT INTO scorecard_results" in r.sql]
        assert graded, [r.sql for r in recorder.statements]


async def test_writes_graded_by_a_scorecard_with_a_filter_keep_its_results_true(
    citus_app: FastAPI, citus_settings: Settings, http: httpx.AsyncClient
) -> None:
    """With a filter, the results' statement also deletes those of entities the filter
    no longer takes (a CTE): Citus runs it in steps through the coordinator."""
    org = await _org(citus_app, http)
    other = await _org(citus_app, http)
    for each in (org, other):
        await _write_catalog(http, each, scorecard=FILTERED)
    assert (await _catalog_of(citus_settings, org.org_id))["graded"] == ["b", "c"]
    moved = await http.post(
        "/v1/blueprints/service/entities/bulk?upsert=true",
        json={
            "entities": [
                {"identifier": "a", "properties": {"language": "go"}},
                {"identifier": "b", "properties": {"language": "python"}},
            ]
        },
        headers=org.headers,
    )
    assert moved.status_code == 200, moved.text
    assert (await _catalog_of(citus_settings, org.org_id))["graded"] == ["a", "c"]
    assert (await _catalog_of(citus_settings, other.org_id))["graded"] == ["b", "c"]


# -- background work across orgs ----------------------------------------------------------


async def _orgs_on_two_workers(
    app: FastAPI, http: httpx.AsyncClient, settings: Settings
) -> list[Org]:
    """Two orgs whose shards are on different workers: a claim across them locks and
    writes on both nodes in one transaction (Citus commits it in two phases)."""
    assert settings.database_url is not None
    conn = await asyncpg.connect(settings.database_url)
    try:
        by_node: dict[int, Org] = {}
        for _ in range(40):
            org = await _org(app, http)
            port = await conn.fetchval(
                "SELECT nodeport FROM pg_dist_shard_placement WHERE shardid ="
                " get_shard_id_for_distribution_column('action_runs', $1::uuid)",
                org.org_id,
            )
            by_node.setdefault(port, org)
            if len(by_node) == 2:
                return list(by_node.values())
    finally:
        await conn.close()
    raise AssertionError("no two orgs on different workers")


@pytest.fixture
async def citus_worker(citus_settings: Settings) -> AsyncIterator[Settings]:
    """The supervised worker (relay, arq worker, sweeper, sender) on the cluster, with the
    receivers' addresses allowed; stopped after the test."""
    configured = dispatch_settings(citus_settings)
    worker = InProcessWorker(configured)
    worker.start()
    try:
        yield configured
    finally:
        await worker.stop()


async def _wait_run(
    http: httpx.AsyncClient, org: Org, run_id: str, within: float = 20.0
) -> dict[str, Any]:
    deadline = time.monotonic() + within
    run: dict[str, Any] = {}
    while time.monotonic() < deadline:
        answer = await http.get(f"/v1/actions/runs/{run_id}", headers=org.headers)
        assert answer.status_code == 200, answer.text
        run = answer.json()["run"]
        if run["status"] in ("SUCCESS", "FAILURE"):
            return run
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} did not end: {run}")


async def test_action_runs_of_two_orgs_dispatch_to_their_webhooks(
    citus_app: FastAPI, citus_settings: Settings, http: httpx.AsyncClient, citus_worker: Settings
) -> None:
    """The relay finds due outbox rows across orgs, then locks and marks them org by org
    (Citus locks rows only in a statement routed to one shard); the worker claims each
    run, signs with its org's secret and records the outcome on the org's shard. The
    orgs are on different workers."""
    orgs = await _orgs_on_two_workers(citus_app, http, citus_settings)
    with contextlib.ExitStack() as receivers:
        hooks: list[WebhookReceiver] = []
        for org in orgs:
            created = await http.post("/v1/blueprints", json=SERVICE, headers=org.headers)
            assert created.status_code == 201, created.text
            secret = await http.get("/v1/organization/signing-secret", headers=org.headers)
            assert secret.status_code == 200, secret.text
            hook = receivers.enter_context(WebhookReceiver(secret.json()["signingSecret"]))
            hooks.append(hook)
            action = {
                "identifier": "deploy",
                "title": "Deploy",
                "trigger": {
                    "type": "self-service",
                    "operation": "CREATE",
                    "blueprintIdentifier": "service",
                    "userInputs": {"properties": {"tag": {"type": "string"}}},
                },
                "invocationMethod": {
                    "type": "WEBHOOK",
                    "url": hook.url + "/deploy",
                    "synchronized": True,
                    "body": {"tag": "{{ .inputs.tag }}", "run": "{{ .run.id }}"},
                },
            }
            defined = await http.post("/v1/actions", json=action, headers=org.headers)
            assert defined.status_code == 201, defined.text
        run_ids = []
        for n, org in enumerate(orgs):
            started = await http.post(
                "/v1/actions/deploy/runs",
                json={"properties": {"tag": f"v{n}"}},
                headers=org.headers,
            )
            assert started.status_code == 202, started.text
            run_ids.append(started.json()["run"]["id"])
        for n, (org, hook, run_id) in enumerate(zip(orgs, hooks, run_ids, strict=True)):
            run = await _wait_run(http, org, run_id)
            assert run["status"] == "SUCCESS", run
            assert [d.body for d in hook.deliveries] == [{"tag": f"v{n}", "run": run_id}]
            assert hook.signature_failures == 0
            logs = await http.get(f"/v1/actions/runs/{run_id}/logs", headers=org.headers)
            assert logs.status_code == 200, logs.text
            assert logs.json()["runLogs"], logs.text
            other = orgs[1 - n]
            hidden = await http.get(f"/v1/actions/runs/{run_id}", headers=other.headers)
            assert hidden.status_code == 404, hidden.text


async def test_the_sweeper_hands_expired_runs_of_two_orgs_back_or_ends_them(
    citus_app: FastAPI, citus_settings: Settings, http: httpx.AsyncClient
) -> None:
    """Runs whose worker's lease ran out, in two orgs: one goes to a new attempt, the one
    at its last attempt ends in FAILURE (two statements across the shards on Citus). The
    orgs are on different workers."""
    orgs = await _orgs_on_two_workers(citus_app, http, citus_settings)
    run_ids = []
    for org in orgs:
        created = await http.post("/v1/blueprints", json=SERVICE, headers=org.headers)
        assert created.status_code == 201, created.text
        action = {
            "identifier": "deploy",
            "title": "Deploy",
            "trigger": {
                "type": "self-service",
                "operation": "CREATE",
                "blueprintIdentifier": "service",
                "userInputs": {"properties": {}},
            },
            "invocationMethod": {"type": "WEBHOOK", "url": "http://127.0.0.1:9/never"},
        }
        defined = await http.post("/v1/actions", json=action, headers=org.headers)
        assert defined.status_code == 201, defined.text
        started = await http.post("/v1/actions/deploy/runs", json={}, headers=org.headers)
        assert started.status_code == 202, started.text
        run_ids.append(started.json()["run"]["id"])
    last = citus_settings.dispatch_max_attempts
    assert citus_settings.database_url is not None
    conn = await asyncpg.connect(citus_settings.database_url)
    try:
        for org, run_id, attempts in zip(orgs, run_ids, (1, last), strict=True):
            # As a worker that claimed the attempt and died: its lease has run out.
            await conn.execute(
                "DELETE FROM dispatch_outbox WHERE org_id = $1 AND run_id = $2", org.org_id, run_id
            )
            await conn.execute(
                "UPDATE action_runs SET dispatch_state = 'dispatching', attempts = $3,"
                " claim = $4, lease_until = now() - interval '1 minute'"
                " WHERE org_id = $1 AND id = $2",
                org.org_id,
                run_id,
                attempts,
                uuid.uuid4(),
            )
        assert await sweep_expired(citus_settings, citus_app.state.db) >= 2
        outbox = await conn.fetch(
            "SELECT org_id, run_id, attempt FROM dispatch_outbox WHERE run_id = ANY($1::text[])",
            run_ids,
        )
    finally:
        await conn.close()
    assert [(r["org_id"], r["run_id"], r["attempt"]) for r in outbox] == [
        (orgs[0].org_id, run_ids[0], 2)
    ]
    again = await http.get(f"/v1/actions/runs/{run_ids[0]}", headers=orgs[0].headers)
    assert again.json()["run"]["status"] == "IN_PROGRESS", again.text
    ended = await http.get(f"/v1/actions/runs/{run_ids[1]}", headers=orgs[1].headers)
    assert ended.json()["run"]["status"] == "FAILURE", ended.text
    assert ended.json()["run"]["endedAt"] is not None
    for org, run_id, word in zip(orgs, run_ids, ("dispatching again", "gave up"), strict=True):
        logs = await http.get(f"/v1/actions/runs/{run_id}/logs", headers=org.headers)
        assert any(word in line["message"] for line in logs.json()["runLogs"]), logs.text


def _change_body(entity: str, n: int) -> dict[str, Any]:
    return {
        "action": "UPDATE",
        "resourceType": "entity",
        "trigger": {"by": {"orgId": "o", "userId": "u"}, "origin": "API"},
        "context": {"blueprintIdentifier": "service", "entityIdentifier": entity},
        "diff": {"before": None, "after": {"identifier": entity, "n": n}},
    }


async def test_the_changelog_sender_delivers_two_orgs_changes_in_order(
    citus_app: FastAPI, citus_settings: Settings, http: httpx.AsyncClient
) -> None:
    """The sender finds every org's oldest undelivered delivery per entity across orgs,
    then claims them org by org (Citus runs neither its walk over orgs nor a lock reaching
    several shards). The delivery rows are written here, as the event feed would write
    them (the feed itself does not run on Citus yet: docs/scaling.md). The orgs are on
    different workers."""
    orgs = await _orgs_on_two_workers(citus_app, http, citus_settings)
    with contextlib.ExitStack() as receivers:
        hooks = []
        for org in orgs:
            secret = await http.get("/v1/organization/signing-secret", headers=org.headers)
            assert secret.status_code == 200, secret.text
            hooks.append(receivers.enter_context(WebhookReceiver(secret.json()["signingSecret"])))
        hooks[1].fail_next(1, 500)  # the second org's first delivery is retried
        rows = [
            (orgs[0], hooks[0], "x", 1),
            (orgs[0], hooks[0], "x", 2),
            (orgs[0], hooks[0], "y", 1),
            (orgs[0], hooks[0], "x", 3),
            (orgs[1], hooks[1], "x", 1),
        ]
        assert citus_settings.database_url is not None
        conn = await asyncpg.connect(citus_settings.database_url)
        try:
            for org, hook, entity, n in rows:
                await conn.execute(
                    "INSERT INTO changelog_deliveries (org_id, blueprint, entity, event_key,"
                    " url, body) VALUES ($1, 'service', $2, $3, $4, $5::text::jsonb)",
                    org.org_id,
                    entity,
                    f"k-{entity}-{n}",
                    hook.url + "/changes",
                    json.dumps(_change_body(entity, n)),
                )
            worker = InProcessWorker(dispatch_settings(citus_settings))
            worker.start()
            try:
                await hooks[0].wait_for(4, timeout=20)
                await hooks[1].wait_for(2, timeout=20)
                deadline = time.monotonic() + 10
                while await conn.fetchval(
                    "SELECT count(*) FROM changelog_deliveries WHERE org_id = ANY($1::uuid[])"
                    " AND state <> 'delivered'",
                    [o.org_id for o in orgs],
                ):
                    assert time.monotonic() < deadline, "deliveries not recorded delivered"
                    await asyncio.sleep(0.05)
            finally:
                await worker.stop()
        finally:
            await conn.close()
    first = [d.body["diff"]["after"] for d in hooks[0].deliveries]
    assert [a["n"] for a in first if a["identifier"] == "x"] == [1, 2, 3]
    assert [a["n"] for a in first if a["identifier"] == "y"] == [1]
    assert [(d.status, d.body["diff"]["after"]["n"]) for d in hooks[1].deliveries] == [
        (500, 1),
        (200, 1),
    ]
    assert hooks[0].signature_failures == 0 and hooks[1].signature_failures == 0


async def test_a_tenant_transaction_writing_on_two_nodes_commits(
    citus_app: FastAPI, http: httpx.AsyncClient
) -> None:
    """A statement whose INSERT ... SELECT Citus pulls through the coordinator, in a
    transaction whose write fires a trigger on the shard (the run's event): committed in
    two phases. It failed while the opening's SET LOCAL application_name went to the
    workers ("cannot use 2PC in transactions involving multiple servers")."""
    org = await _org(citus_app, http)
    created = await http.post("/v1/blueprints", json=SERVICE, headers=org.headers)
    assert created.status_code == 201, created.text
    action = {
        "identifier": "deploy",
        "title": "Deploy",
        "trigger": {
            "type": "self-service",
            "operation": "CREATE",
            "blueprintIdentifier": "service",
            "userInputs": {"properties": {}},
        },
        "invocationMethod": {"type": "WEBHOOK", "url": "http://127.0.0.1:9/never"},
    }
    defined = await http.post("/v1/actions", json=action, headers=org.headers)
    assert defined.status_code == 201, defined.text
    started = await http.post("/v1/actions/deploy/runs", json={}, headers=org.headers)
    assert started.status_code == 202, started.text
    run_id = started.json()["run"]["id"]
    db: Database = citus_app.state.db
    async with db.tenant(org.org_id) as tx:
        assert (
            await tx.fetchval(
                "WITH ended AS (UPDATE action_runs SET status = 'SUCCESS', dispatch_state = 'done',"
                " ended_at = now(), updated_at = now() WHERE org_id = $1 AND id = $2"
                " RETURNING attempts),"
                " logged AS (INSERT INTO action_run_logs (org_id, run_id, message, created_by)"
                " SELECT $1, $2, 'ended by hand', 'test' FROM ended RETURNING 1)"
                " SELECT attempts FROM ended",
                org.org_id,
                run_id,
            )
            is not None
        )
    run = await http.get(f"/v1/actions/runs/{run_id}", headers=org.headers)
    assert run.json()["run"]["status"] == "SUCCESS", run.text
    logs = await http.get(f"/v1/actions/runs/{run_id}/logs", headers=org.headers)
    assert "ended by hand" in [line["message"] for line in logs.json()["runLogs"]], logs.text


async def test_a_single_postgresql_is_not_citus_unless_required(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        assert await citus_enabled(conn, "auto") is False
        assert await citus_enabled(conn, "off") is False
        with pytest.raises(CitusMissing):
            await citus_enabled(conn, "on")
    finally:
        await conn.close()


async def test_two_orgs_manage_their_own_teams_and_an_entity_owned_by_one(
    citus_app: FastAPI, http: httpx.AsyncClient
) -> None:
    """Teams on the cluster: created, read, changed, given to an entity and deleted by
    their own org only (creating a team was a 500 here while a transaction writing on two
    nodes could not commit)."""
    first = await _org(citus_app, http)
    second = await _org(citus_app, http)
    for org in (first, second):
        made = await http.post(
            "/v1/teams", json={"name": "platform", "description": "ours"}, headers=org.headers
        )
        assert made.status_code in (200, 201), made.text
        created = await http.post("/v1/blueprints", json=SERVICE, headers=org.headers)
        assert created.status_code == 201, created.text
    changed = await http.patch(
        "/v1/teams/platform", json={"description": "first's"}, headers=first.headers
    )
    assert changed.status_code == 200, changed.text
    theirs = await http.get("/v1/teams/platform", headers=second.headers)
    assert theirs.status_code == 200 and theirs.json()["team"]["description"] == "ours"
    entity = {"identifier": "billing", "team": ["platform"], "properties": {}}
    written = await http.post("/v1/blueprints/service/entities", json=entity, headers=first.headers)
    assert written.status_code == 201, written.text
    assert written.json()["entity"]["team"] == ["platform"]
    gone = await http.delete("/v1/teams/platform", headers=second.headers)
    assert gone.status_code == 200, gone.text
    ours = await http.get("/v1/teams", headers=first.headers)
    assert [team["name"] for team in ours.json()["teams"]] == ["platform"], ours.text
    none = await http.get("/v1/teams", headers=second.headers)
    assert none.json()["teams"] == [], none.text
