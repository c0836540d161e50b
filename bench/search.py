"""Scenario: search at scale — 1M entities across 10 orgs (100k services in the measured one).

First pages of 50 through POST /v1/blueprints/service/entities/search (equality, containment,
range, relatedTo 1 and 3 hops, a 3-rule combination; text filters on the title, the identifier
and string properties, with rare and common terms) alternating with the same compiled SQL sent
directly with asyncpg in a tenant transaction, one request at a time. Targets: API p50 <= 10
ms, p99 <= 50 ms, p50 within 3x of the direct SQL; facet/aggregate counts over 100k entities
p50 <= 150 ms. Also reports the API process's memory.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from app.db.database import Database, compile_query
from app.search.service import Search, scope_for
from bench.catalog_bulk import PROPERTIES
from bench.catalog_bulk import entity as catalog_entity
from bench.env import (
    ENTITY_COLUMNS,
    copy_connection,
    new_org,
    pin_database_backends,
    scratch_settings,
    served,
    settle_range_indexes,
)
from bench.load import build_requests, roundtrip

ORGS = int(os.environ.get("PORTOLAN_BENCH_SEARCH_ORGS", "10"))
PER_ORG = int(os.environ.get("PORTOLAN_BENCH_SEARCH_ENTITIES", "100000"))
SECONDS = float(os.environ.get("PORTOLAN_BENCH_SECONDS", "3"))
TEAMS = 100

QUERIES: dict[str, list[dict[str, Any]]] = {
    "equality": [{"property": "language", "operator": "=", "value": "go"}],
    "containment": [{"property": "tags", "operator": "contains", "value": "t3"}],
    "range": [{"property": "coverage", "operator": ">", "value": 90}],
    "relatedTo 1 hop": [
        {
            "operator": "relatedTo",
            "blueprint": "team",
            "value": "team-7",
            "direction": "downstream",
            "maxHops": 1,
        }
    ],
    "relatedTo 3 hops": [
        {
            "operator": "relatedTo",
            "blueprint": "service",
            "value": "svc-000001",
            "direction": "downstream",
            "maxHops": 3,
        }
    ],
    "3-rule combination": [
        {"property": "language", "operator": "=", "value": "python"},
        {"property": "coverage", "operator": ">=", "value": 50},
        {"property": "tags", "operator": "contains", "value": "t1"},
    ],
}
# Text filters (trigram indexes, app/search/indexes.py). Titles are "Service <i>", slugs
# "svc-<i>", owners "owner<i % 500>@example.com": "ice 4242" matches 11 of 100k, "c-77777"
# one, "owner499@" 200 (too few for the first window of the page, too many to be rare), and
# "ice 1" / "c-3" about one in nine.
TEXT_QUERIES: dict[str, list[dict[str, Any]]] = {
    "$title contains, rare": [{"property": "$title", "operator": "contains", "value": "ice 4242"}],
    "$title contains, common": [{"property": "$title", "operator": "contains", "value": "ice 1"}],
    "$identifier contains, rare": [
        {"property": "$identifier", "operator": "contains", "value": "-04242"}
    ],
    "slug contains, rare": [{"property": "slug", "operator": "contains", "value": "c-77777"}],
    "slug contains, common": [{"property": "slug", "operator": "contains", "value": "c-3"}],
    "owner endsWith, 0.2%": [
        {"property": "owner", "operator": "endsWith", "value": "owner499@example.com"}
    ],
    "slug beginsWith, rare": [{"property": "slug", "operator": "beginsWith", "value": "svc-7777"}],
    "$title !contains, common": [
        {"property": "$title", "operator": "doesNotContains", "value": "ice 1"}
    ],
}
AGGREGATES: dict[str, dict[str, Any]] = {
    "facet countValues(language)": {"func": "countValues", "property": "language"},
    "count(coverage > 50)": {
        "func": "count",
        "query": {
            "combinator": "and",
            "rules": [
                {"property": "$blueprint", "operator": "=", "value": "service"},
                {"property": "coverage", "operator": ">", "value": 50},
            ],
        },
    },
}


async def _org(
    db: Database, http: httpx.AsyncClient, name: str
) -> tuple[uuid.UUID, dict[str, str]]:
    return await new_org(
        db,
        http,
        name,
        [
            {"identifier": "team", "title": "Team", "schema": {"properties": {}}},
            {
                "identifier": "service",
                "title": "Service",
                "schema": {"properties": PROPERTIES},
                "relations": {
                    "team": {"target": "team", "required": False, "many": False},
                    "dependsOn": {"target": "service", "required": False, "many": True},
                },
            },
        ],
    )


async def _fill(url: str, org_id: uuid.UUID, seed: int) -> None:
    """Rows straight into the tables with COPY: services (each on a team, each depending on
    its 'parent' svc i//2, a binary tree for multi-hop walks) and teams."""
    rnd = random.Random(seed)
    now = datetime.now(UTC)
    conn = await copy_connection(url)
    try:
        teams = [
            (org_id, "team", f"team-{t}", f"Team {t}", [], {}, None, now, "bench", now, "bench")
            for t in range(TEAMS)
        ]
        services = []
        for i in range(PER_ORG):
            entity = catalog_entity(i, rnd)
            ident, props = entity["identifier"], entity["properties"]
            services.append(
                (
                    org_id,
                    "service",
                    ident,
                    f"Service {i}",
                    [f"team-{i % TEAMS}"],
                    props,
                    None,
                    now,
                    "bench",
                    now,
                    "bench",
                )
            )
        await conn.copy_records_to_table(
            "entities", records=teams + services, columns=ENTITY_COLUMNS
        )
        links = [
            (org_id, "service", f"svc-{i:06d}", "team", f"team-{i % TEAMS}", "team")
            for i in range(PER_ORG)
        ]
        links += [
            (org_id, "service", f"svc-{i:06d}", "dependsOn", f"svc-{i // 2:06d}", "service")
            for i in range(2, PER_ORG)
        ]
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


async def _settle(url: str) -> int:
    """The state a catalog reaches a minute after a bulk load: the range indexes built (as
    the worker does every 15 s), vacuumed and analyzed (as autovacuum does after inserts).
    Returns how many range indexes exist."""
    ranged = await settle_range_indexes(url)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("VACUUM ANALYZE entities")
        await conn.execute("VACUUM ANALYZE entity_relations")
    finally:
        await conn.close()
    return ranged


async def _text_indexes(url: str) -> int:
    """How many trigram indexes exist (app/search/indexes.py)."""
    conn = await asyncpg.connect(url)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_indexes WHERE tablename = 'entities' "
                "AND indexdef LIKE '%gin_trgm_ops%'"
            )
        )
    finally:
        await conn.close()


async def _statements(
    db: Database, org_id: uuid.UUID, rules: list[dict[str, Any]]
) -> list[tuple[str, Any]]:
    """The statements the API sends for the first page: a blueprint search reads a window
    in identifier order first, and runs the planner's statement for the rest of the page
    only when the window did not fill it (app.search.service)."""
    query = {"combinator": "and", "rules": rules}
    statements: list[tuple[str, Any]] = []
    async with db.tenant(org_id) as tx:
        search = Search(await scope_for(tx, "service", query), query, windowed=True)
        if search.uses_window:
            sql, args = compile_query(search.window_statement(51), (), search.window_values(None))
            statements.append((sql, args))
            found = await tx.fetch(sql, *args)
            if len(found) < 51:
                resume = ("service", found[-1]["identifier"]) if found else None
                statements.append(
                    compile_query(search.statement(resume, 51 - len(found)), (), search.values())
                )
        else:
            statements.append(compile_query(search.statement(None, 51), (), search.values()))
        if os.environ.get("PORTOLAN_BENCH_VERBOSE"):
            for sql, args in statements:
                plan = await tx.fetch("EXPLAIN (ANALYZE, BUFFERS) " + sql, *args)
                print("\n".join(r[0] for r in plan))
    return statements


async def _measure(
    port: int,
    auth: dict[str, str],
    body: str,
    db: Database,
    org_id: uuid.UUID,
    statements: list[tuple[str, Any]],
) -> tuple[list[float], list[float], int]:
    """API requests and the same statements sent directly, alternately, one at a time, for
    SECONDS after a second of warm-up: both see the same machine (an idle gap before a
    statement slows it ~2x here, so a back-to-back direct loop would flatter the SQL)."""
    (request,) = build_requests(
        {
            "method": "POST",
            "path": "/v1/blueprints/service/entities/search",
            "headers": auth,
            "bodies": [body],
        }
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    api: list[float] = []
    direct: list[float] = []
    errors = 0
    try:
        warm_until = time.perf_counter() + 1.0
        stop_at = warm_until + SECONDS
        while time.perf_counter() < stop_at:
            measured = time.perf_counter() >= warm_until
            ok, elapsed = await roundtrip(reader, writer, request)
            async with db.tenant(org_id) as tx:
                started = time.perf_counter()
                for sql, args in statements:
                    await tx.fetch(sql, *args)
                sent = time.perf_counter() - started
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


def _rss(port: int) -> tuple[float, float]:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if f"bench.server {port}" in cmdline and "taskset" not in cmdline.split()[0]:
                fields = dict(
                    line.split(":", 1)
                    for line in (proc / "status").read_text().splitlines()
                    if ":" in line
                )
                return int(fields["VmRSS"].split()[0]) / 1024, int(
                    fields["VmHWM"].split()[0]
                ) / 1024
        except (OSError, KeyError, ValueError):
            continue
    return 0.0, 0.0


async def run() -> bool:
    async with scratch_settings() as settings:
        db = await Database.connect(settings)
        try:
            with served(settings) as port:
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{port}", timeout=300
                ) as http:
                    orgs = [await _org(db, http, f"bench-{n}") for n in range(ORGS)]
                    started = time.perf_counter()
                    await asyncio.gather(
                        *(
                            _fill(settings.database_url or "", org, n)
                            for n, (org, _) in enumerate(orgs)
                        )
                    )
                    loaded = time.perf_counter() - started
                    ranged = await _settle(settings.database_url or "")
                    texted = await _text_indexes(settings.database_url or "")
                    org_id, headers = orgs[0]
                    auth = {"Authorization": headers["Authorization"]}
                    await pin_database_backends(settings)
                    results = []
                    for name, rules in [*QUERIES.items(), *TEXT_QUERIES.items()]:
                        body = json.dumps(
                            {"limit": 50, "query": {"combinator": "and", "rules": rules}}
                        )
                        probe = await http.post(
                            "/v1/blueprints/service/entities/search", content=body, headers=headers
                        )
                        probe.raise_for_status()
                        found = len(probe.json()["entities"])
                        statements = await _statements(db, org_id, rules)
                        api, direct, errors = await _measure(
                            port, auth, body, db, org_id, statements
                        )
                        results.append((name, found, api, direct, errors))
                    aggregates = []
                    for name, agg in AGGREGATES.items():
                        body = {
                            "query": {
                                "combinator": "and",
                                "rules": [
                                    {"property": "$blueprint", "operator": "=", "value": "service"}
                                ],
                            },
                            **agg,
                        }
                        times = []
                        for _ in range(15):
                            t0 = time.perf_counter()
                            r = await http.post(
                                "/v1/entities/aggregate", json=body, headers=headers
                            )
                            times.append(time.perf_counter() - t0)
                            r.raise_for_status()
                        aggregates.append((name, _pct(times, 0.5), _pct(times, 0.99)))
                    rss, peak = _rss(port)
        finally:
            await db.close()
    ok = True
    total = ORGS * (PER_ORG + TEAMS)
    print(
        f"search    {total:,} entities in {ORGS} orgs ({PER_ORG:,} services in the measured "
        f"org), loaded in {loaded:.0f} s; {ranged - texted} range indexes, {texted} text indexes"
    )
    print(
        "          first page of 50, API and direct SQL alternately:"
        " API p50 / p99      direct SQL p50 / p99   ratio"
    )
    for name, found, api, direct, errors in results:
        if name == next(iter(TEXT_QUERIES)):
            print("          text filters (the same, first page of 50):")
        a50, a99 = _pct(api, 0.5), _pct(api, 0.99)
        d50, d99 = _pct(direct, 0.5), _pct(direct, 0.99)
        ratio = a50 / d50 if d50 else float("inf")
        good = a50 <= 10 and a99 <= 50 and ratio <= 3 and errors == 0
        ok &= good
        print(
            f"          {name:<28} ({found:>2} found)  {a50:6.1f} / {a99:6.1f} ms   "
            f"{d50:6.1f} / {d99:6.1f} ms   {ratio:4.1f}x  -> {'PASS' if good else 'FAIL'}"
        )
    print("          targets: API p50 <= 10 ms, p99 <= 50 ms, within 3x of direct SQL")
    for name, p50, p99 in aggregates:
        good = p50 <= 150
        ok &= good
        print(
            f"          aggregate {name:<28} p50 {p50:6.1f} ms, p99 {p99:6.1f} ms "
            f"(target p50 <= 150 ms) -> {'PASS' if good else 'FAIL'}"
        )
    print(f"          API process memory: {rss:.0f} MiB resident, {peak:.0f} MiB peak")
    return ok
