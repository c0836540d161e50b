"""Scenario: POST /v1/entities/properties-history of one entity with 1,000 changes.

One service entity changed 1,000 times through the API (its events then spread over the
last 28 days), among 5,000 other entities with a change each. The history of three of its
fields (a number, a string, `$title`) over the last month by day, in a time zone, through
the API, alternating with the statement it runs sent directly with asyncpg in a tenant
transaction, one request at a time. Target: API p50 <= 20 ms.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx

from app.db.database import Database
from app.history import service
from app.history.timeframe import frame
from bench.env import new_org, pin_database_backends, scratch_settings, served
from bench.load import build_requests, roundtrip

CHANGES = int(os.environ.get("PORTOLAN_BENCH_HISTORY_CHANGES", "1000"))
OTHERS = 5000
SECONDS = float(os.environ.get("PORTOLAN_BENCH_SECONDS", "3"))
ZONE = "Europe/Berlin"
BLUEPRINTS: list[dict[str, Any]] = [
    {
        "identifier": "service",
        "title": "Service",
        "schema": {
            "properties": {
                "coverage": {"type": "number"},
                "tier": {"type": "string"},
                "language": {"type": "string"},
                "description": {"type": "string"},
            }
        },
    }
]
BODY = {
    "entityIdentifier": "hot",
    "blueprintIdentifier": "service",
    "propertyNames": ["coverage", "tier", "$title"],
    "timeInterval": "day",
    "timeRange": {"preset": "lastMonth", "timeZone": ZONE},
}


async def _fill(http: httpx.AsyncClient, headers: dict[str, str], url: str) -> None:
    others = [
        {"identifier": f"svc-{i:05d}", "properties": {"coverage": i % 100, "tier": "2"}}
        for i in range(OTHERS)
    ]
    for start in range(0, OTHERS, 1000):
        r = await http.post(
            "/v1/blueprints/service/entities/bulk",
            json={"entities": others[start : start + 1000]},
            headers=headers,
        )
        r.raise_for_status()
    for n in range(CHANGES):
        body = {
            "identifier": "hot",
            "title": f"Hot {n // 100}",
            "properties": {
                "coverage": n % 101,
                "tier": str(n % 3),
                "language": "python",
                "description": "A service changed often. " * 4,
            },
        }
        r = await http.post(
            "/v1/blueprints/service/entities?upsert=true", json=body, headers=headers
        )
        r.raise_for_status()
    conn = await asyncpg.connect(url)
    try:
        # Spread the hot entity's changes over the last 28 days, oldest first.
        await conn.execute(
            "UPDATE entity_events e SET at = now() - (s.n * interval '28 days') / $1 "
            "FROM (SELECT id, $1 - row_number() OVER (ORDER BY id) AS n FROM entity_events "
            "      WHERE identifier = 'hot') s WHERE e.id = s.id",
            CHANGES,
        )
        await conn.execute("VACUUM ANALYZE entity_events, entities")
    finally:
        await conn.close()


async def _measure(
    port: int, auth: dict[str, str], db: Database, org_id: uuid.UUID
) -> tuple[list[float], list[float], int, int]:
    requests = build_requests(
        {
            "method": "POST",
            "path": "/v1/entities/properties-history",
            "headers": auth,
            "bodies": [json.dumps(BODY)],
        }
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    api: list[float] = []
    direct: list[float] = []
    errors = rows = 0
    paths = [("properties", "coverage"), ("properties", "tier"), ("title",)]
    try:
        warm_until = time.perf_counter() + 1.0
        stop_at = warm_until + SECONDS
        while time.perf_counter() < stop_at:
            measured = time.perf_counter() >= warm_until
            ok, elapsed = await roundtrip(reader, writer, requests[0])
            span = frame(
                preset="lastMonth",
                start=None,
                end=None,
                tz=ZoneInfo(ZONE),
                interval="day",
                now=datetime.now(UTC),
            )
            async with db.tenant(org_id) as tx:
                started = time.perf_counter()
                found = await tx.fetch(
                    service.events_sql(len(paths)),
                    *service.events_arguments(tx, "service", "hot", span, paths),
                )
                sent = time.perf_counter() - started
            rows = len(found)
            if measured:
                api.append(elapsed)
                direct.append(sent)
                errors += not ok
    finally:
        writer.close()
    return api, direct, errors, rows


async def _explain(db: Database, org_id: uuid.UUID) -> None:
    paths = [("properties", "coverage"), ("properties", "tier"), ("title",)]
    now = datetime.now(UTC)
    span = frame(
        preset="lastMonth", start=None, end=None, tz=ZoneInfo(ZONE), interval="day", now=now
    )
    async with db.tenant(org_id) as tx:
        plan = await tx.fetch(
            "EXPLAIN (ANALYZE, BUFFERS) " + service.events_sql(len(paths)),
            *service.events_arguments(tx, "service", "hot", span, paths),
        )
    print("\n".join(r[0] for r in plan))


def _pct(times: list[float], q: float) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000


async def run() -> bool:
    async with scratch_settings() as settings:
        url = settings.database_url or ""
        db = await Database.connect(settings)
        try:
            with served(settings) as port:
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{port}", timeout=300
                ) as http:
                    org_id, headers = await new_org(db, http, "bench-history", BLUEPRINTS)
                    started = time.perf_counter()
                    await _fill(http, headers, url)
                    loaded = time.perf_counter() - started
                    check = await http.post(
                        "/v1/entities/properties-history", json=BODY, headers=headers
                    )
                    check.raise_for_status()
                    points = check.json()["result"]["data"]
                    if os.environ.get("PORTOLAN_BENCH_VERBOSE"):
                        await _explain(db, org_id)
                    await pin_database_backends(settings)
                    auth = {"Authorization": headers["Authorization"]}
                    api, direct, errors, rows = await _measure(port, auth, db, org_id)
        finally:
            await db.close()
    a50, a99 = _pct(api, 0.5), _pct(api, 0.99)
    d50, d99 = _pct(direct, 0.5), _pct(direct, 0.99)
    filled = sum(p["coverage"] is not None for p in points)
    ok = errors == 0 and a50 <= 20 and filled >= 28
    print(
        f"history   one entity with {CHANGES:,} changes among {OTHERS:,} others "
        f"(loaded in {loaded:.0f} s); lastMonth by day in {ZONE}: {len(points)} buckets, "
        f"{filled} with a value, {rows} events read"
    )
    print(
        f"          properties-history, API and direct SQL alternately ({len(api)} each): "
        f"API p50 / p99 {a50:5.1f} / {a99:5.1f} ms; direct SQL {d50:5.1f} / {d99:5.1f} ms "
        f"-> {'PASS' if ok else 'FAIL'}"
    )
    print("          target: API p50 <= 20 ms")
    return ok
