"""Scenario: aggregate-over-time and search `at` over 100k entities.

One org with 100,000 services and their history (a CREATE event each, spread over the last
12 months, and an UPDATE for a third of them, moving their tier and coverage), rows put
straight into the tables with COPY. Measured through the API one request at a time,
alternating with the statement it runs sent directly with asyncpg in a tenant transaction:

- POST /v1/entities/aggregate-over-time, countEntities by month over the last 12 months in
  a time zone, broken down by `language` (10 values): measured by a date-time property
  (`deployedAt`) and by `$history` (the catalog as it stood at each month's close).
  Target: API p50 <= 500 ms (the date-time measure, Port's).
- A blueprint search (`tier = tier-1`, a page of 200) as of six months ago, beside the same
  search in the present. Target: past p50 within 5x of the present p50.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx

from app.db.database import Database, compile_query
from app.history import asof, over_time
from app.history.timeframe import frame, zone
from app.search.service import Search, fresh_scope, scope_for
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

ENTITIES = int(os.environ.get("PORTOLAN_BENCH_OVER_TIME_ENTITIES", "100000"))
SECONDS = float(os.environ.get("PORTOLAN_BENCH_SECONDS", "3"))
ZONE = "Europe/Berlin"
LANGUAGES = [f"lang-{n}" for n in range(10)]
BLUEPRINTS: list[dict[str, Any]] = [
    {
        "identifier": "service",
        "title": "Service",
        "schema": {
            "properties": {
                "coverage": {"type": "number"},
                "tier": {"type": "string"},
                "language": {"type": "string"},
                "deployedAt": {"type": "string", "format": "date-time"},
            }
        },
    }
]
QUERY = {"combinator": "and", "rules": [{"property": "tier", "operator": "=", "value": "tier-1"}]}


def _over_time(measure: str) -> dict[str, Any]:
    return {
        "blueprint": "service",
        "query": {"combinator": "and", "rules": []},
        "aggregationType": "countEntities",
        "func": "count",
        "breakdownProperty": "language",
        "measureTimeBy": measure,
        "timeInterval": "month",
        "timeRange": {"preset": "last12Months", "timeZone": ZONE},
    }


async def _fill(url: str, org_id: uuid.UUID) -> None:
    rnd = random.Random(21)
    now = datetime.now(UTC)
    year = timedelta(days=365)
    entities, events = [], []
    for i in range(ENTITIES):
        ident = f"svc-{i:06d}"
        created = now - year + timedelta(seconds=rnd.uniform(0, year.total_seconds() - 3600))
        props: dict[str, Any] = {
            "coverage": rnd.randint(0, 100),
            "tier": f"tier-{rnd.randint(1, 5)}",
            "language": LANGUAGES[i % len(LANGUAGES)],
            "deployedAt": created.isoformat(),
        }
        doc = {
            "identifier": ident,
            "blueprint": "service",
            "title": f"Service {i}",
            "icon": None,
            "team": [],
            "properties": props,
            "relations": {},
        }
        events.append((org_id, "service", ident, "CREATE", None, doc, "bench", "API", created))
        if i % 3 == 0:
            changed = created + (now - created) * rnd.uniform(0.1, 0.9)
            moved = {**props, "tier": f"tier-{rnd.randint(1, 5)}", "coverage": rnd.randint(0, 100)}
            after = {**doc, "properties": moved}
            events.append((org_id, "service", ident, "UPDATE", doc, after, "bench", "API", changed))
            props = moved
        entities.append(
            (
                org_id,
                "service",
                ident,
                f"Service {i}",
                [],
                props,
                None,
                created,
                "bench",
                now,
                "bench",
            )
        )
    conn = await copy_connection(url)
    try:
        await conn.copy_records_to_table("entities", records=entities, columns=ENTITY_COLUMNS)
        # Written in time order (ids follow the events' times, as writes make them).
        events.sort(key=lambda e: e[-1])
        await conn.copy_records_to_table(
            "entity_events",
            records=events,
            columns=[
                "org_id",
                "blueprint",
                "identifier",
                "action",
                "before",
                "after",
                "actor",
                "origin",
                "at",
            ],
        )
    finally:
        await conn.close()
    await settle_range_indexes(url)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("VACUUM ANALYZE entities, entity_events")
    finally:
        await conn.close()


async def _over_time_sql(db: Database, org_id: uuid.UUID, body: dict[str, Any]) -> tuple[str, Any]:
    spec = over_time.parse(body)
    async with db.tenant(org_id) as tx:
        scope = await fresh_scope(tx, spec.blueprint, spec.query)
        span = frame(
            preset=spec.timeRange.preset,
            start=None,
            end=None,
            tz=zone(spec.timeRange.timeZone),
            interval=spec.timeInterval,
            now=datetime.now(UTC),
        )
        changes = await asof.renames(tx, scope)
        stmt = over_time.statement(spec, scope, span, span.closes(), changes)
        return compile_query(stmt, ())


async def _past_sql(db: Database, org_id: uuid.UUID, at: datetime) -> list[tuple[str, Any]]:
    """The statements of the past search's first page: its first window's end, then the
    window's matches (app.history.asof.search_page)."""
    async with db.tenant(org_id) as tx:
        scope = await fresh_scope(tx, "service", QUERY)
        changes = await asof.renames(tx, scope)
        close = at + asof.TICK
        first = asof.window_end_statement(scope, "service", close, None, asof.FIRST_WINDOW)
        ends = await tx.fetch(*_args(compile_query(first, ())))
        end = (ends[0]["identifier"], ends[0]["id"]) if ends else None
        page = asof.page_statement(scope, "service", QUERY, at, (None, end), 201, changes)
        found = await tx.fetch(*_args(compile_query(page, ())))
        assert len(found) == 201, "the first window fills the page"
        return [compile_query(first, ()), compile_query(page, ())]


def _args(compiled: tuple[str, Any]) -> list[Any]:
    return [compiled[0], *compiled[1]]


async def _present_sql(db: Database, org_id: uuid.UUID) -> list[tuple[str, Any]]:
    """The statements of the present search's first page (a window first: see
    app.search.service)."""
    async with db.tenant(org_id) as tx:
        search = Search(await scope_for(tx, "service", QUERY), QUERY, windowed=True)
        out = [compile_query(search.window_statement(201), (), search.window_values(None))]
        found = await tx.fetch(out[0][0], *out[0][1])
        if len(found) < 201:
            resume = ("service", found[-1]["identifier"]) if found else None
            out.append(
                compile_query(search.statement(resume, 201 - len(found)), (), search.values())
            )
        return out


async def _measure(
    port: int,
    auth: dict[str, str],
    path: str,
    body: dict[str, Any],
    db: Database,
    org_id: uuid.UUID,
    statements: list[tuple[str, Any]],
) -> tuple[list[float], list[float], int]:
    (request,) = build_requests(
        {"method": "POST", "path": path, "headers": auth, "bodies": [json.dumps(body)]}
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    api: list[float] = []
    direct: list[float] = []
    errors = 0
    try:
        warm_until = time.perf_counter() + 1.0
        stop_at = warm_until + SECONDS
        while time.perf_counter() < stop_at or len(api) < 5:
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


async def _explain(db: Database, org_id: uuid.UUID, statements: list[tuple[str, Any]]) -> None:
    async with db.tenant(org_id) as tx:
        for sql, args in statements:
            plan = await tx.fetch("EXPLAIN (ANALYZE, BUFFERS) " + sql, *args)
            print("\n".join(r[0] for r in plan))


async def run() -> bool:
    results: dict[str, tuple[list[float], list[float], int]] = {}
    checks: dict[str, Any] = {}
    async with scratch_settings() as settings:
        url = settings.database_url or ""
        db = await Database.connect(settings)
        try:
            with served(settings) as port:
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{port}", timeout=300
                ) as http:
                    org_id, headers = await new_org(db, http, "bench-over-time", BLUEPRINTS)
                    started = time.perf_counter()
                    await _fill(url, org_id)
                    loaded = time.perf_counter() - started
                    at = datetime.now(UTC) - timedelta(days=182)
                    cases: list[tuple[str, str, dict[str, Any], list[tuple[str, Any]]]] = [
                        (
                            "over time by deployedAt",
                            "/v1/entities/aggregate-over-time",
                            _over_time("deployedAt"),
                            [await _over_time_sql(db, org_id, _over_time("deployedAt"))],
                        ),
                        (
                            "over time by $history",
                            "/v1/entities/aggregate-over-time",
                            _over_time("$history"),
                            [await _over_time_sql(db, org_id, _over_time("$history"))],
                        ),
                        (
                            "search present",
                            "/v1/blueprints/service/entities/search",
                            {"query": QUERY},
                            await _present_sql(db, org_id),
                        ),
                        (
                            "search at -182 d",
                            "/v1/blueprints/service/entities/search",
                            {"query": QUERY, "at": at.isoformat()},
                            await _past_sql(db, org_id, at),
                        ),
                    ]
                    for name, path, body, statements in cases:
                        r = await http.post(path, json=body, headers=headers)
                        r.raise_for_status()
                        checks[name] = r.json()
                        if os.environ.get("PORTOLAN_BENCH_VERBOSE"):
                            await _explain(db, org_id, statements)
                    await pin_database_backends(settings)
                    auth = {"Authorization": headers["Authorization"]}
                    for name, path, body, statements in cases:
                        results[name] = await _measure(
                            port, auth, path, body, db, org_id, statements
                        )
        finally:
            await db.close()
    print(f"over_time {ENTITIES:,} services, their history loaded in {loaded:.0f} s")
    for name, (api, direct, errors) in results.items():
        print(
            f"          {name:<24} API p50 / p99 {_pct(api, 0.5):7.1f} / {_pct(api, 0.99):7.1f}"
            f" ms; direct SQL {_pct(direct, 0.5):7.1f} / {_pct(direct, 0.99):7.1f} ms"
            f" ({len(api)} each, {errors} errors)"
        )
    monthly = checks["over time by deployedAt"]["result"]["data"]
    history = checks["over time by $history"]["result"]["data"]
    counted = sum(sum(v for k, v in p.items() if k != "date") for p in monthly)
    standing = sum(v for k, v in history[-1].items() if k != "date")
    past = len(checks["search at -182 d"]["entities"])
    present = len(checks["search present"]["entities"])
    print(
        f"          {len(monthly)} monthly buckets; {counted:,} services placed by deployedAt; "
        f"{standing:,} standing at the last close; pages of {present} (present) and {past} (past)"
    )
    p50 = _pct(results["over time by deployedAt"][0], 0.5)
    ratio = _pct(results["search at -182 d"][0], 0.5) / _pct(results["search present"][0], 0.5)
    print(
        f"          targets: over time (deployedAt) p50 {p50:.0f} ms <= 500 ms; "
        f"search at / present p50 {ratio:.1f}x <= 5x"
    )
    errors = sum(e for _, _, e in results.values())
    return errors == 0 and p50 <= 500 and ratio <= 5 and counted > 0 and past == present == 200
