"""Scenario: a 6-rule, 3-level scorecard over 100k entities, evaluated and stored, beside the
bare SQL aggregate of the same rules; and what re-evaluation adds to a single upsert.

Full evaluation (app.scorecards.evaluate: one statement computes and stores every entity's
result) is timed on the first evaluation (every result inserted) and after a rule change
(every result rewritten), against `SELECT level, count(*)` over the same compiled rules
without storing anything. Targets: <= 2 s and within 3x of the bare aggregate. Then single
upserts through the API, one client, with the scorecard and on a twin blueprint without
one: the difference of the p50s is what re-evaluation adds (target <= 5 ms).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import sqlalchemy as sa

from app.db.database import Database
from app.scorecards.evaluate import _load_cards, card_select, evaluate_blueprint
from app.search.service import fresh_scope
from app.search.sql import run_bounded
from bench.catalog_bulk import PROPERTIES
from bench.catalog_bulk import entity as catalog_entity
from bench.env import (
    ENTITY_COLUMNS,
    copy_connection,
    load,
    new_org,
    pin_database_backends,
    scratch_settings,
    served,
)

ENTITIES = int(os.environ.get("PORTOLAN_BENCH_SCORECARD_ENTITIES", "100000"))
SECONDS = float(os.environ.get("PORTOLAN_BENCH_SECONDS", "3"))
ROUNDS = 5


def _rule(identifier: str, level: str, *conditions: dict[str, Any]) -> dict[str, Any]:
    return {
        "identifier": identifier,
        "title": identifier,
        "level": level,
        "query": {"combinator": "and", "conditions": list(conditions)},
    }


CARD = {
    "identifier": "readiness",
    "title": "Production readiness",
    "levels": [
        {"title": "Basic", "color": "paleBlue"},
        {"title": "Silver", "color": "silver"},
        {"title": "Gold", "color": "gold"},
    ],
    "rules": [
        _rule("owned", "Silver", {"property": "owner", "operator": "isNotEmpty"}),
        _rule("onCall", "Silver", {"property": "onCall", "operator": "=", "value": True}),
        _rule("covered", "Silver", {"property": "coverage", "operator": ">=", "value": 40}),
        _rule("wellCovered", "Gold", {"property": "coverage", "operator": ">=", "value": 80}),
        _rule(
            "redundant",
            "Gold",
            {"property": "replicas", "operator": ">=", "value": 3},
            {"property": "tier", "operator": "in", "value": ["1", "2"]},
        ),
        _rule(
            "supported",
            "Gold",
            {"property": "language", "operator": "in", "value": ["python", "go", "ts"]},
        ),
    ],
}


async def _fill(url: str, org_id: uuid.UUID, blueprint: str, count: int) -> None:
    """`count` entities of the catalog bench's shape, straight into the table (COPY)."""
    rnd = random.Random(11)
    now = datetime.now(UTC)
    conn = await copy_connection(url)
    try:
        rows = []
        for i in range(count):
            one = catalog_entity(i, rnd)
            rows.append(
                (
                    org_id,
                    blueprint,
                    one["identifier"],
                    one["title"],
                    [],
                    one["properties"],
                    None,
                    now,
                    "bench",
                    now,
                    "bench",
                )
            )
        await conn.copy_records_to_table("entities", records=rows, columns=ENTITY_COLUMNS)
        await conn.execute("VACUUM ANALYZE entities")
    finally:
        await conn.close()


async def _timed_evaluation(db: Database, org_id: uuid.UUID) -> float:
    started = time.perf_counter()
    assert await evaluate_blueprint(db, org_id, "service") == 1
    return time.perf_counter() - started


async def _bare(db: Database, org_id: uuid.UUID) -> tuple[float, dict[str, int]]:
    """The same rules, compiled the same way, counted per level; nothing stored."""
    async with db.tenant(org_id) as tx:
        (card,) = await _load_cards(tx, "service")
        scope = await fresh_scope(tx, "service", None)
        levels = card_select(scope, "service", card, only_ids=False, fenced=False).subquery()
        statement = sa.select(levels.c.level_rank, sa.func.count().label("n")).group_by(
            levels.c.level_rank
        )
        started = time.perf_counter()
        rows = await run_bounded(tx, statement)
        return time.perf_counter() - started, {card.levels[r["level_rank"]]: r["n"] for r in rows}


def _upserts(port: int, headers: dict[str, str], blueprint: str) -> Any:
    rnd = random.Random(5)
    bodies = []
    for _ in range(2000):
        one = catalog_entity(rnd.randrange(ENTITIES), rnd)
        one["properties"]["coverage"] = rnd.randint(0, 100)
        del one["relations"]
        bodies.append(json.dumps(one))
    return load(
        port,
        f"/v1/blueprints/{blueprint}/entities?upsert=true",
        headers={"Authorization": headers["Authorization"]},
        seconds=SECONDS,
        connections=1,
        method="POST",
        bodies=bodies,
    )


async def run() -> bool:
    async with scratch_settings() as settings:
        db = await Database.connect(settings)
        try:
            # No worker in the server: the evaluations timed here are the worker's job.
            with served(settings, worker=False) as port:
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{port}", timeout=120
                ) as http:
                    schema = {"properties": PROPERTIES}
                    org_id, headers = await new_org(
                        db,
                        http,
                        "bench-scorecards",
                        [
                            {"identifier": "service", "title": "Service", "schema": schema},
                            {"identifier": "twin", "title": "Twin", "schema": schema},
                        ],
                    )
                    url = settings.database_url or ""
                    await _fill(url, org_id, "service", ENTITIES)
                    await _fill(url, org_id, "twin", ENTITIES)
                    r = await http.post(
                        "/v1/blueprints/service/scorecards", json=CARD, headers=headers
                    )
                    r.raise_for_status()
                    first = await _timed_evaluation(db, org_id)
                    changed = dict(CARD)
                    changed["rules"] = [
                        {**rule, "title": rule["title"] + "!"} if i == 0 else rule
                        for i, rule in enumerate(CARD["rules"])  # type: ignore[arg-type]
                    ]
                    changed["rules"][3] = _rule(
                        "wellCovered",
                        "Gold",
                        {"property": "coverage", "operator": ">=", "value": 75},
                    )
                    r = await http.put(
                        "/v1/blueprints/service/scorecards/readiness",
                        json=changed,
                        headers=headers,
                    )
                    r.raise_for_status()
                    rewritten = await _timed_evaluation(db, org_id)
                    again = [await _timed_evaluation(db, org_id) for _ in range(ROUNDS)]
                    bare_runs = [await _bare(db, org_id) for _ in range(ROUNDS)]
                    async with db.tenant(org_id) as tx:
                        names = [level["title"] for level in CARD["levels"]]  # type: ignore[index]
                        stored = {
                            names[r["level_rank"]]: r["n"]
                            for r in await tx.fetch(
                                "SELECT level_rank, count(*) AS n FROM scorecard_results "
                                "WHERE blueprint = 'service' GROUP BY level_rank"
                            )
                        }
                    await pin_database_backends(settings)
                    with_card = await asyncio.to_thread(_upserts, port, headers, "service")
                    without = await asyncio.to_thread(_upserts, port, headers, "twin")
                    with_card = await asyncio.to_thread(_upserts, port, headers, "service")
        finally:
            await db.close()
    bare = sorted(t for t, _ in bare_runs)[len(bare_runs) // 2]
    counts = bare_runs[0][1]
    unchanged = sorted(again)[len(again) // 2]
    worst = max(first, rewritten)
    ok_full = worst <= 2.0 and worst <= 3 * bare and stored == counts
    added = with_card.p50_ms - without.p50_ms
    ok_single = added <= 5 and with_card.errors == 0 and without.errors == 0
    verdict = {True: "PASS", False: "FAIL"}
    print(
        f"scorecard 6 rules, 3 levels, {ENTITIES:,} entities "
        f"({', '.join(f'{k} {v:,}' for k, v in sorted(counts.items()))})\n"
        f"          full evaluation, stored: first {first:.2f} s, after a rule change "
        f"{rewritten:.2f} s, unchanged {unchanged:.2f} s\n"
        f"          bare SQL aggregate of the same rules: {bare:.2f} s; "
        f"worst {worst / bare:.1f}x (target <= 2 s and <= 3x; stored levels = aggregate: "
        f"{stored == counts}) -> {verdict[ok_full]}\n"
        f"          single upsert p50 with the scorecard {with_card.p50_ms:.1f} ms, without "
        f"{without.p50_ms:.1f} ms: re-evaluation adds {added:.1f} ms (target <= 5 ms) -> "
        f"{verdict[ok_single]}"
    )
    return ok_full and ok_single
