"""Scenario: a data migration of 100k entities, beside bulk ingest of the same entities.

(1) bulk upsert of 100k entities (6 properties) through POST .../entities/bulk, 1000 per
    request, 2 clients: the ingest figure of this run.
(2) POST /v1/migrations changing a property's type in place (`port` string -> new
    `port_number` number through `tonumber`, every entity updated), run by the served
    process's worker (batches of 500: read, jq in the sandbox, one write transaction each),
    timed from creation until GET /v1/migrations/{id} answers COMPLETED.
(3) another org's single-entity reads (sequential, one client), alone and while a second
    migration of the same size runs (every entity updated again): what one org's migration
    does to another's latency (printed, no target), and that migration's rate beside them.
Target: every entity migrated, none failed, and >= 25% of the ingest rate (a migration reads
each entity, evaluates its jq in a child process and writes it through the same writer).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import httpx

from app.db.database import Database
from bench.env import new_org, pin_database_backends, scratch_settings, served

ENTITIES = int(os.environ.get("PORTOLAN_BENCH_ENTITIES", "100000"))
REQUEST = 1000
CLIENTS = 2
BLUEPRINT = {
    "identifier": "service",
    "title": "Service",
    "schema": {
        "properties": {
            "port": {"type": "string"},
            "port_number": {"type": "number"},
            "language": {"type": "string"},
            "tier": {"type": "string"},
            "public": {"type": "boolean"},
            "owner": {"type": "string", "format": "email"},
        }
    },
}
MIGRATION = {
    "sourceBlueprint": "service",
    "mapping": {"entity": {"properties": {"port_number": ".properties.port | tonumber"}}},
}

AGAIN = {
    "sourceBlueprint": "service",
    "mapping": {"entity": {"properties": {"port_number": "(.properties.port | tonumber) + 1"}}},
}


def entity(i: int) -> dict[str, Any]:
    return {
        "identifier": f"svc-{i:06d}",
        "title": f"Service {i}",
        "properties": {
            "port": str(1024 + i % 50000),
            "language": ("python", "go", "java")[i % 3],
            "tier": str(1 + i % 3),
            "public": i % 2 == 0,
            "owner": f"owner{i % 500}@example.com",
        },
    }


async def _ingest(http: httpx.AsyncClient, headers: dict[str, str], bodies: list[bytes]) -> float:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)

    async def client() -> None:
        while not queue.empty():
            body = queue.get_nowait()
            response = await http.post(
                "/v1/blueprints/service/entities/bulk",
                content=body,
                headers=headers,
                params={"upsert": "true"},
            )
            if response.status_code != 200:
                raise RuntimeError(f"bulk failed: {response.status_code} {response.text[:300]}")

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return time.perf_counter() - started


async def _reads(
    http: httpx.AsyncClient, headers: dict[str, str], until: asyncio.Event | None, count: int
) -> list[float]:
    """Another org's single-entity reads, one after the other: `count` of them, or as many
    as fit until `until` is set."""
    times: list[float] = []
    while len(times) < count and (until is None or not until.is_set()):
        began = time.perf_counter()
        response = await http.get("/v1/blueprints/service/entities/svc-000001", headers=headers)
        response.raise_for_status()
        times.append((time.perf_counter() - began) * 1000)
    return times


def _p(times: list[float], q: float) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _migrate(
    http: httpx.AsyncClient, headers: dict[str, str], body: dict[str, Any]
) -> tuple[float, Any]:
    started = time.perf_counter()
    response = await http.post("/v1/migrations", json=body, headers=headers)
    if response.status_code != 201:
        raise RuntimeError(f"migration refused: {response.status_code} {response.text[:300]}")
    migration_id = response.json()["migration"]["id"]
    while True:
        found = (await http.get(f"/v1/migrations/{migration_id}", headers=headers)).json()
        migration = found["migration"]
        if migration["status"] in ("COMPLETED", "FAILURE", "CANCELLED"):
            return time.perf_counter() - started, migration
        await asyncio.sleep(0.2)


async def run() -> bool:
    bodies = [
        json.dumps(
            {"entities": [entity(i) for i in range(start, min(start + REQUEST, ENTITIES))]}
        ).encode()
        for start in range(0, ENTITIES, REQUEST)
    ]
    async with scratch_settings() as settings:
        db = await Database.connect(settings)
        try:
            with served(settings) as port:
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{port}", timeout=120
                ) as http:
                    _, headers = await new_org(db, http, "bench-migrations", [BLUEPRINT])
                    _, quiet = await new_org(db, http, "bench-quiet", [BLUEPRINT])
                    created = await http.post(
                        "/v1/blueprints/service/entities", json=entity(1), headers=quiet
                    )
                    created.raise_for_status()
                    await pin_database_backends(settings)
                    ingest = await _ingest(http, headers, bodies)
                    seconds, migration = await _migrate(http, headers, MIGRATION)
                    alone = await _reads(http, quiet, None, 300)
                    ended = asyncio.Event()
                    during_task = asyncio.create_task(_reads(http, quiet, ended, 100_000))
                    try:
                        beside, _ = await _migrate(http, headers, AGAIN)
                    finally:
                        ended.set()
                    during = await during_task
        finally:
            await db.close()
    ingest_rate, migrate_rate = ENTITIES / ingest, ENTITIES / seconds
    progress = migration["progress"]
    ok = (
        migration["status"] == "COMPLETED"
        and progress["updated"] == ENTITIES
        and migration["failureCount"] == 0
        and migrate_rate >= 0.25 * ingest_rate
    )
    print(
        f"migrations  type change in place ({ENTITIES:,} entities, jq tonumber, batches of "
        f"500, the served worker): {migrate_rate:,.0f} entities/s "
        f"({seconds:.1f} s; status {migration['status']}, updated {progress['updated']:,}, "
        f"failed {migration['failureCount']})\n"
        f"            bulk ingest of the same entities via API in this run "
        f"({REQUEST}/request, {CLIENTS} clients): {ingest_rate:,.0f} entities/s\n"
        f"            ratio {migrate_rate / ingest_rate:.0%} (target >= 25%) -> "
        f"{'PASS' if ok else 'FAIL'}\n"
        f"            another org's entity reads (one client, sequential): p50 "
        f"{_p(alone, 0.5):.1f} ms, p99 {_p(alone, 0.99):.1f} ms alone; p50 "
        f"{_p(during, 0.5):.1f} ms, p99 {_p(during, 0.99):.1f} ms during a second migration "
        f"({len(during):,} reads), which ran at {ENTITIES / beside:,.0f} entities/s beside them"
    )
    return ok
