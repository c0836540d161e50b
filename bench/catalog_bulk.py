"""Scenario: catalog writes through the API, beside the same rows written with raw asyncpg.

(1) bulk upsert of 100k entities (15 properties, 2 relations) through
    POST /v1/blueprints/{bp}/entities/bulk, 1000 per request, vs the raw ceiling: asyncpg
    `INSERT ... SELECT unnest ... ON CONFLICT DO UPDATE` into the same tables and indexes.
    Target: >= 5,000 entities/s and >= 35% of the raw figure.
(2) the same re-sync with nothing changed. Target: >= 2x the first figure.
(3) single-entity upserts from 16 concurrent clients. Target: p99 <= 50 ms.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from typing import Any

import asyncpg
import httpx

from app.db.database import Database
from bench.env import (
    LoadResult,
    load,
    new_org,
    pin_database_backends,
    scratch_settings,
    served,
    settle_range_indexes,
)

ENTITIES = int(os.environ.get("PORTOLAN_BENCH_ENTITIES", "100000"))
BATCH = 1000
CLIENTS = 2
SINGLE_CLIENTS = 16
SINGLE_SECONDS = float(os.environ.get("PORTOLAN_BENCH_SECONDS", "5"))
TEAMS, SYSTEMS = 100, 50

# The number and date-time properties carry `"indexed": true`: the range indexes a
# blueprint this size gets anyway (automatically from 10,000 entities) exist from the
# start, so every phase writes into the same indexes instead of the worker building them
# in the middle of one (app/search/indexes.py).
PROPERTIES: dict[str, Any] = {
    "language": {"type": "string", "enum": ["python", "go", "java", "rust", "ts"]},
    "tier": {"type": "string", "enum": ["1", "2", "3"]},
    "coverage": {"type": "number", "minimum": 0, "maximum": 100, "indexed": True},
    "latencyMs": {"type": "number", "indexed": True},
    "replicas": {"type": "number", "indexed": True},
    "public": {"type": "boolean"},
    "onCall": {"type": "boolean"},
    "repo": {"type": "string", "format": "url"},
    "docs": {"type": "string", "format": "url"},
    "owner": {"type": "string", "format": "email"},
    "lastDeploy": {"type": "string", "format": "date-time", "indexed": True},
    "slug": {"type": "string", "pattern": "^[a-z0-9-]+$"},
    "tags": {"type": "array", "items": {"type": "string"}},
    "config": {"type": "object"},
    "description": {"type": "string"},
}


def entity(i: int, rnd: random.Random) -> dict[str, Any]:
    return {
        "identifier": f"svc-{i:06d}",
        "title": f"Service {i}",
        "properties": {
            "language": rnd.choice(["python", "go", "java", "rust", "ts"]),
            "tier": rnd.choice(["1", "2", "3"]),
            "coverage": rnd.randint(0, 100),
            "latencyMs": rnd.random() * 500,
            "replicas": rnd.randint(1, 20),
            "public": rnd.random() < 0.5,
            "onCall": rnd.random() < 0.7,
            "repo": f"https://git.example.com/org/svc-{i}",
            "docs": f"https://docs.example.com/svc-{i}",
            "owner": f"owner{i % 500}@example.com",
            "lastDeploy": "2026-11-01T12:00:00Z",
            "slug": f"svc-{i}",
            "tags": ["backend", f"t{i % 7}"],
            "config": {"region": "eu-west-1", "size": i % 4},
            "description": "A service in the benchmark catalog.",
        },
        "relations": {"team": f"team-{i % TEAMS}", "system": f"sys-{i % SYSTEMS}"},
    }


async def _setup_org(
    db: Database, http: httpx.AsyncClient, name: str
) -> tuple[uuid.UUID, dict[str, str]]:
    org_id, headers = await new_org(
        db,
        http,
        name,
        [
            {"identifier": "team", "title": "Team", "schema": {"properties": {}}},
            {"identifier": "system", "title": "System", "schema": {"properties": {}}},
            {
                "identifier": "service",
                "title": "Service",
                "schema": {"properties": PROPERTIES, "required": ["language"]},
                "relations": {
                    "team": {"target": "team", "required": False, "many": False},
                    "system": {"target": "system", "required": False, "many": False},
                },
            },
        ],
    )
    for bp, prefix, n in (("team", "team", TEAMS), ("system", "sys", SYSTEMS)):
        items = [{"identifier": f"{prefix}-{i}"} for i in range(n)]
        response = await http.post(
            f"/v1/blueprints/{bp}/entities/bulk", json={"entities": items}, headers=headers
        )
        response.raise_for_status()
    return org_id, headers


async def _api_sync(http: httpx.AsyncClient, headers: dict[str, str], bodies: list[bytes]) -> float:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)

    async def worker() -> None:
        while not queue.empty():
            body = queue.get_nowait()
            response = await http.post(
                "/v1/blueprints/service/entities/bulk",
                content=body,
                headers=headers,
                params={"upsert": "true", "merge": "true"},
            )
            if response.status_code != 200:
                raise RuntimeError(f"bulk failed: {response.status_code} {response.text[:300]}")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CLIENTS)))
    return time.perf_counter() - started


async def _raw_sync(url: str, org_id: uuid.UUID, batches: list[list[dict[str, Any]]]) -> float:
    """The ceiling: the same rows and links, straight into the same tables and indexes."""
    conn = await asyncpg.connect(url)
    try:
        started = time.perf_counter()
        for batch in batches:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL app.org_id = '{org_id}'")
                await conn.execute(
                    """
                    INSERT INTO entities AS e (org_id, blueprint, identifier, title, team,
                                               properties, created_by, updated_by)
                    SELECT $1, 'service', u.identifier, u.title, '{}', u.properties::jsonb,
                           'raw', 'raw'
                    FROM unnest($2::text[], $3::text[], $4::text[])
                         AS u(identifier, title, properties)
                    ON CONFLICT (org_id, blueprint, identifier) DO UPDATE
                       SET title = excluded.title, properties = excluded.properties,
                           updated_at = now()
                    WHERE (e.title, e.properties)
                          IS DISTINCT FROM (excluded.title, excluded.properties)
                    """,
                    org_id,
                    [e["identifier"] for e in batch],
                    [e["title"] for e in batch],
                    [json.dumps(e["properties"]) for e in batch],
                )
                await conn.execute(
                    """
                    INSERT INTO entity_relations (org_id, source_blueprint, source_identifier,
                                                  relation, target_identifier, target_blueprint)
                    SELECT $1, 'service', l.source, l.relation, l.target, l.relation
                    FROM unnest($2::text[], $3::text[], $4::text[]) AS l(source, relation, target)
                    ON CONFLICT DO NOTHING
                    """,
                    org_id,
                    [e["identifier"] for e in batch for _ in (0, 1)],
                    ["team", "system"] * len(batch),
                    [t for e in batch for t in (e["relations"]["team"], e["relations"]["system"])],
                )
        return time.perf_counter() - started
    finally:
        await conn.close()


async def _steady_state(url: str) -> None:
    """The bulk phases leave 300k new row versions behind; autovacuum would clean them up
    during the latency phase. A service at steady state has had that done: do it now."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("VACUUM ANALYZE entities, entity_relations, entity_events")
    finally:
        await conn.close()


def _single_upserts(
    port: int, headers: dict[str, str], seconds: float = SINGLE_SECONDS
) -> LoadResult:
    """Single-entity upserts (each changes a property) from 16 keep-alive connections of the
    raw-socket driver, so that the latency measured is the server's, not an HTTP client's."""
    rnd = random.Random(7)
    bodies = []
    for _ in range(4000):
        one = entity(rnd.randrange(ENTITIES), rnd)
        one["properties"]["coverage"] = rnd.randint(0, 100)
        bodies.append(json.dumps(one))
    auth = {"Authorization": headers["Authorization"]}
    return load(
        port,
        "/v1/blueprints/service/entities?upsert=true",
        headers=auth,
        seconds=seconds,
        connections=SINGLE_CLIENTS,
        method="POST",
        bodies=bodies,
    )


async def run() -> bool:
    rnd = random.Random(42)
    entities = [entity(i, rnd) for i in range(ENTITIES)]
    batches = [entities[i : i + BATCH] for i in range(0, ENTITIES, BATCH)]
    bodies = [json.dumps({"entities": b}).encode() for b in batches]
    async with scratch_settings() as settings:
        db = await Database.connect(settings)
        try:
            with served(settings) as port:
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{port}", timeout=120
                ) as http:
                    org_api, headers = await _setup_org(db, http, "bench-api")
                    org_raw, _ = await _setup_org(db, http, "bench-raw")
                    await settle_range_indexes(settings.database_url or "")
                    await pin_database_backends(settings)
                    first = await _api_sync(http, headers, bodies)
                    again = await _api_sync(http, headers, bodies)
                raw = await _raw_sync(settings.database_url or "", org_raw, batches)
                await _steady_state(settings.database_url or "")
                # Warm up (the server's pool grows to the 16 clients), then move the new
                # backends onto the database's core like the first ones.
                await asyncio.to_thread(_single_upserts, port, headers, 1.0)
                await pin_database_backends(settings)
                singles = await asyncio.to_thread(_single_upserts, port, headers)
            async with db.tenant(org_api) as tx:
                stored = await tx.fetchval(
                    "SELECT count(*) FROM entities WHERE blueprint = 'service'"
                )
        finally:
            await db.close()
    api_rate, again_rate, raw_rate = ENTITIES / first, ENTITIES / again, ENTITIES / raw
    p50, p99 = singles.p50_ms, singles.p99_ms
    ok_bulk = api_rate >= 5000 and api_rate >= 0.35 * raw_rate and stored == ENTITIES
    ok_again = again_rate >= 2 * api_rate
    ok_single = p99 <= 50 and singles.errors == 0
    verdict = {True: "PASS", False: "FAIL"}
    print(
        f"catalog   bulk upsert via API ({ENTITIES:,} entities, 15 props, 2 relations, "
        f"{BATCH}/request, {CLIENTS} clients): {api_rate:,.0f} entities/s\n"
        f"          ceiling: raw asyncpg unnest upsert, same tables: {raw_rate:,.0f} entities/s\n"
        f"          ratio {api_rate / raw_rate:.0%} (target >= 5,000/s and >= 35%) -> "
        f"{verdict[ok_bulk]}\n"
        f"          unchanged re-sync: {again_rate:,.0f} entities/s = "
        f"{again_rate / api_rate:.1f}x the first sync (target >= 2x) -> {verdict[ok_again]}\n"
        f"          single upserts, {SINGLE_CLIENTS} clients: {singles.rps:,.0f}/s, "
        f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, errors {singles.errors} (target p99 <= 50 ms) -> "
        f"{verdict[ok_single]}"
    )
    return ok_bulk and ok_again and ok_single
