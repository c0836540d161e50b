"""Beyond Port: a dry run of a proposed definition, and a scorecard's summary and trend.

- Dry run: the proposed scorecard is evaluated in SQL for every entity of the blueprint and
  compared with the stored results, without writing anything: how many entities would go
  up, down, stay, gain or lose a result, and which (the first 1,000 that move).
- Summary: entities per level, per team and level, and each rule's pass rate, from the
  stored results. The worker keeps one snapshot of each scorecard's summary per day
  (`scorecard_snapshots`), which `?from=&to=` returns as a trend.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from app.catalog.validation import check_url_identifier
from app.db.database import Database, Tx
from app.kit.errors import Invalid
from app.scorecards import service
from app.scorecards.definitions import normalise
from app.scorecards.evaluate import _STORED, Card, card_select
from app.search.service import fresh_scope
from app.search.sql import run_bounded

MAX_MOVED = 1000
MAX_TREND_DAYS = 366


async def dry_run(tx: Tx, blueprint: str, identifier: str, body: Any) -> dict[str, Any]:
    check_url_identifier(body, identifier)
    scope = await fresh_scope(tx, blueprint, None)
    proposed = await normalise(
        {**body, "identifier": identifier} if isinstance(body, dict) else body, blueprint, scope
    )
    current = (scope.blueprints[blueprint].get("scorecards") or {}).get(identifier)
    old_levels: list[str] = current["levels"] if current else []
    card = Card(
        identifier=identifier,
        levels=[level["title"] for level in proposed["levels"]],
        rules=proposed["rules"],
        filter=proposed["filter"],
        version=0,
    )
    fresh = card_select(scope, blueprint, card, only_ids=False).subquery("proposed")
    stored = (
        sa.select(_STORED.c.identifier, _STORED.c.level_rank)
        .where(
            _STORED.c.org_id == sa.bindparam(None, scope.org_id),
            _STORED.c.blueprint == sa.bindparam(None, blueprint),
            _STORED.c.scorecard == sa.bindparam(None, identifier),
        )
        .subquery("stored_now")
    )
    joined = fresh.join(stored, stored.c.identifier == fresh.c.identifier, full=True)
    ident = sa.func.coalesce(fresh.c.identifier, stored.c.identifier)
    counts = await run_bounded(
        tx,
        sa.select(
            stored.c.level_rank.label("before"),
            fresh.c.level_rank.label("after"),
            sa.func.count().label("n"),
        )
        .select_from(joined)
        .group_by(stored.c.level_rank, fresh.c.level_rank),
    )
    moved_rows = await run_bounded(
        tx,
        sa.select(
            ident.label("identifier"),
            stored.c.level_rank.label("before"),
            fresh.c.level_rank.label("after"),
        )
        .select_from(joined)
        .where(stored.c.level_rank.is_distinct_from(fresh.c.level_rank))
        .order_by(ident)
        .limit(MAX_MOVED),
    )

    def old_name(rank: int | None) -> str | None:
        return old_levels[rank] if rank is not None and rank < len(old_levels) else None

    def new_name(rank: int | None) -> str | None:
        return card.levels[rank] if rank is not None else None

    def direction(before: int | None, after: int | None) -> str:
        if before is None:
            return "new"
        if after is None:
            return "removed"
        # Compared by name where both definitions have the level, else by position.
        b = old_name(before)
        a = new_name(after)
        if b in card.levels and a in card.levels:
            before, after = card.levels.index(b), card.levels.index(a)
        return "up" if after > before else "down" if after < before else "same"

    totals = {"up": 0, "down": 0, "same": 0, "new": 0, "removed": 0}
    levels = {name: 0 for name in card.levels}
    for row in counts:
        totals[direction(row["before"], row["after"])] += int(row["n"])
        if row["after"] is not None:
            levels[card.levels[row["after"]]] += int(row["n"])
    moved = []
    for row in moved_rows:
        change = direction(row["before"], row["after"])
        if change == "same":
            continue
        moved.append(
            {
                "identifier": row["identifier"],
                "from": old_name(row["before"]),
                "to": new_name(row["after"]),
                "change": change,
            }
        )
    return {
        "scorecard": identifier,
        "entities": sum(levels.values()),
        "levels": [{"level": name, "count": levels[name]} for name in card.levels],
        **totals,
        "moved": moved,
        "movedTruncated": len(moved_rows) >= MAX_MOVED,
    }


async def summary(tx: Tx, blueprint: str, identifier: str) -> dict[str, Any]:
    card = await service.get(tx, blueprint, identifier)
    names = [level["title"] for level in card["levels"]]
    args = (tx.org_id, blueprint, identifier)
    by_level = await tx.fetch(
        "SELECT level_rank, count(*) AS n FROM scorecard_results "
        "WHERE org_id = $1 AND blueprint = $2 AND scorecard = $3 GROUP BY level_rank",
        *args,
    )
    by_team = await tx.fetch(
        "SELECT t.team, r.level_rank, count(*) AS n FROM scorecard_results r "
        "JOIN entities e ON e.org_id = r.org_id AND e.blueprint = r.blueprint "
        "AND e.identifier = r.identifier "
        "CROSS JOIN LATERAL unnest(CASE WHEN cardinality(e.team) = 0 THEN ARRAY[NULL]::text[] "
        "ELSE e.team END) AS t(team) "
        "WHERE r.org_id = $1 AND r.blueprint = $2 AND r.scorecard = $3 "
        "GROUP BY t.team, r.level_rank ORDER BY t.team NULLS LAST",
        *args,
    )
    by_rule = await tx.fetch(
        "SELECT i, count(*) FILTER (WHERE r.passed[i]) AS passed, count(*) AS total "
        "FROM scorecard_results r CROSS JOIN LATERAL generate_subscripts(r.passed, 1) AS i "
        "WHERE r.org_id = $1 AND r.blueprint = $2 AND r.scorecard = $3 GROUP BY i",
        *args,
    )
    levels = {name: 0 for name in names}
    for row in by_level:
        if row["level_rank"] < len(names):
            levels[names[row["level_rank"]]] += int(row["n"])
    teams: dict[str | None, dict[str, int]] = {}
    for row in by_team:
        if row["level_rank"] < len(names):
            per = teams.setdefault(row["team"], {name: 0 for name in names})
            per[names[row["level_rank"]]] += int(row["n"])
    rules = {int(row["i"]): row for row in by_rule}
    return {
        "scorecard": identifier,
        "state": card["state"],
        "entities": sum(levels.values()),
        "levels": [{"level": name, "count": levels[name]} for name in names],
        "teams": [
            {"team": team, "levels": [{"level": n, "count": c} for n, c in per.items()]}
            for team, per in teams.items()
        ],
        "rules": [
            {
                "identifier": rule["identifier"],
                "level": rule["level"],
                "passed": int(rules[i + 1]["passed"]) if i + 1 in rules else 0,
                "total": int(rules[i + 1]["total"]) if i + 1 in rules else 0,
                "passRate": (
                    round(int(rules[i + 1]["passed"]) / int(rules[i + 1]["total"]), 4)
                    if i + 1 in rules and rules[i + 1]["total"]
                    else None
                ),
            }
            for i, rule in enumerate(card["rules"])
        ],
    }


async def trend(
    tx: Tx, blueprint: str, identifier: str, start: date, end: date
) -> list[dict[str, Any]]:
    if end < start or (end - start).days > MAX_TREND_DAYS:
        raise Invalid(f"from must not be after to, and at most {MAX_TREND_DAYS} days before it")
    await service.get(tx, blueprint, identifier)  # 404s
    rows = await tx.fetch(
        "SELECT day, summary FROM scorecard_snapshots WHERE org_id = $1 AND blueprint = $2 "
        "AND scorecard = $3 AND day BETWEEN $4 AND $5 ORDER BY day",
        tx.org_id,
        blueprint,
        identifier,
        start,
        end,
    )
    return [
        {
            "day": row["day"].isoformat(),
            "entities": row["summary"]["entities"],
            "levels": row["summary"]["levels"],
            "rules": row["summary"]["rules"],
        }
        for row in rows
    ]


async def snapshot_all(db: Database, day: date | None = None) -> int:
    """The worker's daily pass: today's summary of every scorecard, kept (a second pass the
    same day replaces it). Returns how many were written."""
    day = day or datetime.now(UTC).date()
    async with db.system() as tx:
        cards = await tx.fetch("SELECT org_id, blueprint, identifier FROM scorecards")
    written = 0
    for row in cards:
        async with db.tenant(row["org_id"]) as tx:
            current = await summary(tx, row["blueprint"], row["identifier"])
            await tx.execute(
                "INSERT INTO scorecard_snapshots (org_id, blueprint, scorecard, day, summary) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (org_id, blueprint, scorecard, day) "
                "DO UPDATE SET summary = excluded.summary, taken_at = now()",
                row["org_id"],
                row["blueprint"],
                row["identifier"],
                day,
                current,
            )
            written += 1
    return written


def parse_day(value: str | None, default: date, name: str) -> date:
    if value is None:
        return default
    try:
        return date.fromisoformat(value[:10])
    except ValueError as exc:
        raise Invalid(f"{name} must be a date (YYYY-MM-DD)") from exc


def default_range() -> tuple[date, date]:
    today = datetime.now(UTC).date()
    return today - timedelta(days=30), today
