"""Scenario: Ocean's reconciliation read — POST /v1/blueprints/entities/datasource-entities.

One integration's 100k entities (two versions of its User-Agent, each linked to a team)
among 50k of another integration of the same type, 20k written through the API, and
another org holding 100k entities of an integration with the same identifier. Every page
of 5000 (as Ocean asks) through the API, alternating with the statements it runs sent
directly with asyncpg in a tenant transaction, one request at a time. Targets: API p50 per
page <= 150 ms and within 3x of the direct SQL; the whole walk returns exactly the
integration's entities.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx

from app.catalog import datasource
from app.db.database import Database
from bench.env import (
    ENTITY_COLUMNS,
    copy_connection,
    new_org,
    pin_database_backends,
    scratch_settings,
    served,
)
from bench.load import build_requests, roundtrip

PER_INTEGRATION = int(os.environ.get("PORTOLAN_BENCH_DATASOURCE_ENTITIES", "100000"))
SECONDS = float(os.environ.get("PORTOLAN_BENCH_SECONDS", "3"))
PAGE = 5000
TEAMS = 100
TYPE, IDENT = "github", "my-github"
PREFIX, SUFFIX = f"port-ocean/{TYPE}/", f"/{IDENT}/exporter"

BLUEPRINTS: list[dict[str, Any]] = [
    {"identifier": "team", "title": "Team", "schema": {"properties": {}}},
    {
        "identifier": "repo",
        "title": "Repo",
        "schema": {"properties": {"language": {"type": "string"}}},
        "relations": {"team": {"target": "team", "required": False, "many": False}},
    },
]


def _agent(identifier: str, version: str = "0.5.1") -> str:
    return f"port-ocean/{TYPE}/{version}/{identifier}/exporter"


async def _fill(url: str, org_id: uuid.UUID, groups: list[tuple[str, str | None, int]]) -> None:
    """Rows straight into the tables with COPY: per group (identifier prefix, datasource,
    count) that many repos, each on a team; and the teams (no datasource)."""
    written = datetime.now(UTC) - timedelta(hours=1)
    conn = await copy_connection(url)
    try:
        rows: list[tuple[Any, ...]] = [
            (org_id, "team", f"team-{t}", None, [], {}, None, written, "bench", written, "bench")
            for t in range(TEAMS)
        ]
        links: list[tuple[Any, ...]] = []
        for name, source, count in groups:
            for i in range(count):
                ident = f"{name}-{i:06d}"
                props = {"language": "python" if i % 2 else "go"}
                rows.append(
                    (
                        org_id,
                        "repo",
                        ident,
                        None,
                        [],
                        props,
                        source,
                        written,
                        "bench",
                        written,
                        "bench",
                    )
                )
                links.append((org_id, "repo", ident, "team", f"team-{i % TEAMS}", "team"))
        await conn.copy_records_to_table("entities", records=rows, columns=ENTITY_COLUMNS)
        await conn.copy_records_to_table(
            "entity_relations",
            records=links,
            columns=[
                "org_id",
                "source_blueprint",
                "source_identifier",
                "relation",
                "target_identifier",
                "target_blueprint",
            ],
        )
    finally:
        await conn.close()


async def _settle(url: str) -> None:
    """Vacuumed and analyzed, as autovacuum leaves a table after a bulk load."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("VACUUM ANALYZE entities")
        await conn.execute("VACUUM ANALYZE entity_relations")
    finally:
        await conn.close()


async def _walk(
    http: httpx.AsyncClient, headers: dict[str, str], before: str
) -> tuple[list[str], list[str | None], list[str], float]:
    """Every page, as Ocean reads them: the bodies sent, the cursors they carried, the
    identifiers found, and how long the walk took."""
    bodies: list[str] = []
    cursors: list[str | None] = []
    found: list[str] = []
    cursor: str | None = None
    started = time.perf_counter()
    while True:
        body = {
            "datasource_prefix": PREFIX,
            "datasource_suffix": SUFFIX,
            "limit": PAGE,
            "before": before,
            **({"from": cursor} if cursor else {}),
        }
        r = await http.post(
            "/v1/blueprints/entities/datasource-entities", json=body, headers=headers
        )
        r.raise_for_status()
        page = r.json()
        bodies.append(json.dumps(body))
        cursors.append(cursor)
        found += [e["identifier"] for e in page["entities"]]
        cursor = page["next"]
        if not cursor:
            return bodies, cursors, found, time.perf_counter() - started


async def _measure(
    port: int,
    auth: dict[str, str],
    bodies: list[str],
    statements: list[tuple[str, list[Any]]],
    db: Database,
    org_id: uuid.UUID,
) -> tuple[list[float], list[float], int]:
    """API pages and their statements sent directly, alternately, one at a time, cycling
    through the pages for SECONDS after a second of warm-up."""
    requests = build_requests(
        {
            "method": "POST",
            "path": "/v1/blueprints/entities/datasource-entities",
            "headers": auth,
            "bodies": bodies,
        }
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    api: list[float] = []
    direct: list[float] = []
    errors = 0
    n = 0
    try:
        warm_until = time.perf_counter() + 1.0
        stop_at = warm_until + SECONDS
        while time.perf_counter() < stop_at:
            measured = time.perf_counter() >= warm_until
            ok, elapsed = await roundtrip(reader, writer, requests[n % len(requests)])
            sql, args = statements[n % len(statements)]
            async with db.tenant(org_id) as tx:
                started = time.perf_counter()
                await tx.execute(datasource.ORDERED_WALK)
                await tx.fetch(sql, *args)
                sent = time.perf_counter() - started
            n += 1
            if measured:
                api.append(elapsed)
                direct.append(sent)
                errors += not ok
    finally:
        writer.close()
    return api, direct, errors


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
                    org_a, headers = await new_org(db, http, "bench-a", BLUEPRINTS)
                    org_b, _ = await new_org(db, http, "bench-b", BLUEPRINTS)
                    half = PER_INTEGRATION // 2
                    started = time.perf_counter()
                    await asyncio.gather(
                        _fill(
                            url,
                            org_a,
                            [
                                ("mine-old", _agent(IDENT, "0.5.0"), half),
                                ("mine", _agent(IDENT), PER_INTEGRATION - half),
                                ("other", _agent("her-github"), PER_INTEGRATION // 2),
                                ("api", "python-httpx/0.27", PER_INTEGRATION // 5),
                            ],
                        ),
                        _fill(url, org_b, [("theirs", _agent(IDENT), PER_INTEGRATION)]),
                    )
                    loaded = time.perf_counter() - started
                    await _settle(url)
                    await pin_database_backends(settings)
                    before = datetime.now(UTC).isoformat()
                    bodies, cursors, found, walk_seconds = await _walk(http, headers, before)
                    exact = sorted(found) == sorted(
                        [f"mine-old-{i:06d}" for i in range(half)]
                        + [f"mine-{i:06d}" for i in range(PER_INTEGRATION - half)]
                    )
                    when = datetime.fromisoformat(before)
                    statements = [
                        datasource.page_arguments(
                            org_a,
                            PREFIX,
                            SUFFIX,
                            PAGE,
                            when,
                            datasource.decode_cursor(c) if c else None,
                        )
                        for c in cursors
                    ]
                    if os.environ.get("PORTOLAN_BENCH_VERBOSE"):
                        async with db.tenant(org_a) as tx:
                            await tx.execute(datasource.ORDERED_WALK)
                            sql, args = statements[len(statements) // 2]
                            plan = await tx.fetch("EXPLAIN (ANALYZE, BUFFERS) " + sql, *args)
                            print("\n".join(r[0] for r in plan))
                    auth = {"Authorization": headers["Authorization"]}
                    api, direct, errors = await _measure(port, auth, bodies, statements, db, org_a)
        finally:
            await db.close()
    a50, a99 = _pct(api, 0.5), _pct(api, 0.99)
    d50, d99 = _pct(direct, 0.5), _pct(direct, 0.99)
    ratio = a50 / d50 if d50 else float("inf")
    ok = exact and errors == 0 and a50 <= 150 and ratio <= 3
    total = PER_INTEGRATION * 2 + PER_INTEGRATION // 2 + PER_INTEGRATION // 5 + 2 * TEAMS
    print(
        f"datasource {total:,} entities in 2 orgs ({PER_INTEGRATION:,} of the integration), "
        f"loaded in {loaded:.0f} s"
    )
    print(
        f"          whole walk: {len(bodies)} pages of {PAGE}, {len(found):,} entities in "
        f"{walk_seconds:.2f} s ({'exactly the integration' if exact else 'WRONG SET'})"
    )
    print(
        f"          page of {PAGE}, API and direct SQL alternately ({len(api)} each): "
        f"API p50 / p99 {a50:6.1f} / {a99:6.1f} ms; direct SQL {d50:6.1f} / {d99:6.1f} ms; "
        f"{ratio:4.1f}x -> {'PASS' if ok else 'FAIL'}"
    )
    print("          targets: API p50 <= 150 ms, within 3x of direct SQL, the exact set")
    return ok
