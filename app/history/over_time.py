"""Aggregates over time (Port's `POST /v1/entities/aggregate-over-time`): entity counts and
number properties' aggregates of a query's entities, bucketed on the zone's wall clock.

Two ways to place entities in time (`measureTimeBy`):
- a date-time property (or `$createdAt`, `$updatedAt`), as Port does: the entities of
  today that match the query, each in the bucket that holds its time (entities whose time
  lies outside the range are left out);
- `$history`: the catalog as it stood when each bucket closed, from the entity events —
  the entities that existed then and matched the query then, with their values then.

`aggregate_over_time(tx, body)` is the whole computation (the route, and dashboard
widgets, call it): `body` is Port's request body as a dict; the answer is Port's
`result` ({minDate, maxDate, data}).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.dialects.postgresql import ARRAY, aggregate_order_by
from sqlalchemy.sql.elements import ColumnElement

from app.db.database import Tx
from app.history.asof import PastCompiler, renames, states_over
from app.history.schemas import TimeRange
from app.history.timeframe import Frame, Interval, epoch_ms, frame, zone
from app.kit.caps import OrgCap
from app.kit.errors import Invalid
from app.search.compiler import Compiler, E
from app.search.service import fresh_scope
from app.search.sql import (
    META_TEXT,
    Scope,
    number_aggregate,
    number_value,
    run_bounded,
    time_value,
)

HISTORY = "$history"
# A breakdown draws at most this many lines (Port's limit): the values with the most
# entities over the range.
MAX_LINES = 10
MAX_PROPERTIES = 20
# `average` of countEntities: a bucket's count divided by these (Port: entities per minute
# of an hour, per hour of a day, per day of a week or a month; per day of a quarter).
PER_UNIT = {"hour": 60, "day": 24, "isoWeek": 7, "month": 30, "quarter": 90}
PROPERTY_FUNCS = ("average", "sum", "min", "max", "median", "last")
COUNT_FUNCS = ("count", "average")
_STAMPS = ARRAY(sa.DateTime(timezone=True))


class OverTimeBody(BaseModel):
    """Port's body. `query` is a search query over `blueprint`'s entities."""

    model_config = ConfigDict(extra="forbid")

    blueprint: str = Field(min_length=1, max_length=100)
    timeRange: TimeRange
    timeInterval: Interval
    query: dict[str, Any] = Field(default_factory=lambda: {"combinator": "and", "rules": []})
    measureTimeBy: str = Field(
        min_length=1,
        max_length=100,
        description="A date-time property, `$createdAt`, `$updatedAt`, or `$history` "
        "(the catalog as it stood when each bucket closed)",
    )
    aggregationType: Literal["aggregatePropertiesValues", "countEntities"]
    func: Literal["average", "sum", "min", "max", "median", "last", "count"]
    properties: list[str] | None = Field(default=None, min_length=1, max_length=MAX_PROPERTIES)
    breakdownProperty: str | None = Field(default=None, min_length=1, max_length=100)


def parse(body: Mapping[str, Any]) -> OverTimeBody:
    try:
        return OverTimeBody.model_validate(body)
    except ValidationError as exc:
        details = [
            {
                "pointer": "/" + "/".join(str(p) for p in error["loc"]),
                "message": str(error["msg"]),
            }
            for error in exc.errors()
        ]
        summary = "; ".join(f"{d['pointer']}: {d['message']}" for d in details[:5])
        raise Invalid(f"The aggregation is invalid: {summary}", details=details) from exc


def _check(spec: OverTimeBody, scope: Scope) -> None:
    problems: list[dict[str, str]] = []
    blueprint = scope.blueprints[spec.blueprint]
    declared = blueprint["schema"]["properties"]
    if spec.aggregationType == "aggregatePropertiesValues":
        if spec.func not in PROPERTY_FUNCS:
            problems.append({"pointer": "/func", "message": f"one of {', '.join(PROPERTY_FUNCS)}"})
        if not spec.properties:
            problems.append({"pointer": "/properties", "message": "number properties needed"})
        for index, name in enumerate(spec.properties or []):
            if (declared.get(name) or {}).get("type") != "number":
                problems.append(
                    {"pointer": f"/properties/{index}", "message": f"{name!r}: not a number"}
                )
        if spec.breakdownProperty is not None:
            problems.append(
                {"pointer": "/breakdownProperty", "message": "breaks down countEntities only"}
            )
    else:
        if spec.func not in COUNT_FUNCS:
            problems.append({"pointer": "/func", "message": "count or average"})
        if spec.properties is not None:
            problems.append(
                {"pointer": "/properties", "message": "for aggregatePropertiesValues only"}
            )
        if spec.func == "average" and spec.measureTimeBy == HISTORY:
            problems.append(
                {
                    "pointer": "/func",
                    "message": "with $history each point counts the entities standing when "
                    "its bucket closes: use count",
                }
            )
    if spec.measureTimeBy != HISTORY and time_value([blueprint], E, spec.measureTimeBy) is None:
        problems.append(
            {
                "pointer": "/measureTimeBy",
                "message": f"{spec.measureTimeBy!r} is not $createdAt, $updatedAt, $history "
                f"or a date-time property of {spec.blueprint!r}",
            }
        )
    if problems:
        summary = "; ".join(f"{p['pointer']}: {p['message']}" for p in problems[:5])
        raise Invalid(f"The aggregation is invalid: {summary}", details=problems)


def _breakdown(scope: Scope, entity: Any, name: str) -> tuple[Any, Any]:
    """The breakdown value's expression and the FROM it needs (arrays and `$team` count
    each element)."""
    if name == "$team":
        team = sa.func.unnest(entity.c.team).table_valued("value").render_derived("v")
        return sa.func.to_jsonb(team.c.value), entity.join(team, sa.true())
    if name in META_TEXT:
        return sa.func.to_jsonb(entity.c[META_TEXT[name]]), entity
    prop = scope.blueprints[scope.searched[0]]["schema"]["properties"].get(name)
    if prop is None or prop.get("type") == "object":
        raise Invalid(
            f"breakdownProperty {name!r} is not a property (object properties do not break "
            f"down) or a meta-property of {scope.searched[0]!r}",
            details=[{"pointer": "/breakdownProperty", "message": "not a property"}],
        )
    if prop.get("type", "string") == "string":  # grouped by the text (cheaper than jsonb)
        text = entity.c.properties.op("->>", return_type=sa.Text)(
            sa.bindparam(None, name, type_=sa.Text)
        )
        return text, entity
    value = entity.c.properties[name]
    if prop.get("type") == "array":
        items = sa.func.jsonb_array_elements(value).table_valued("value").render_derived("v")
        return items.c.value, entity.join(items, sa.true())
    return value, entity


def _label(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def _measures(spec: OverTimeBody, entity: Any, order: list[Any]) -> list[ColumnElement[Any]]:
    if spec.aggregationType == "countEntities":
        return [sa.func.count().label("m0")]
    out = []
    for index, name in enumerate(spec.properties or []):
        value = number_value(entity, name)
        if spec.func == "last":
            latest = sa.func.array_agg(aggregate_order_by(value, *order)).filter(value.is_not(None))
            measure: Any = sa.type_coerce(latest, ARRAY(sa.Numeric))[1]
        else:
            measure = number_aggregate(spec.func, value)
        out.append(measure.label(f"m{index}"))
    return out


def cumulative(spec: OverTimeBody) -> bool:
    """Counts, sums and averages of `$history` add up changes: each state adds itself where
    it comes into force and takes itself away where it ends, and each close's value is the
    running total — one pass over the states whatever the number of buckets. Medians,
    minima, maxima and last values are not sums: each state joins the closes it spans."""
    return spec.measureTimeBy == HISTORY and (
        spec.aggregationType == "countEntities" or spec.func in ("sum", "average")
    )


def _fast_time(name: str) -> ColumnElement[Any]:
    """A date-time property as portolan_time reads it (UTC without an offset), by an inline
    cast: only for rows a portolan_time condition has already kept (their values cast),
    at a fraction of the function's cost a row."""
    raw = E.c.properties.op("->>", return_type=sa.Text)(sa.bindparam(None, name, type_=sa.Text))
    offset = raw.op("~", return_type=sa.Boolean)(r"([Zz]|[+-]\d{2}(:?\d{2})?)$")
    return sa.cast(sa.case((offset, raw), else_=raw + "+00:00"), sa.DateTime(timezone=True))


def statement(
    spec: OverTimeBody, scope: Scope, span: Frame, closes: list[datetime], changes: Any
) -> sa.Select[Any]:
    """One statement: (bucket number, breakdown value?, measures...) per bucket; for a
    `cumulative` aggregation, the changes per bucket (number n+1: after the last)."""
    history = spec.measureTimeBy == HISTORY
    stamps = sa.cast(sa.bindparam(None, closes, type_=_STAMPS), _STAMPS)
    points: Any = None
    edges: tuple[Any, Any] | None = None
    if history:
        entity = states_over(scope, span.end, changes)
        condition = PastCompiler(scope, entity).compile(spec.query, "/query")
        order = [entity.c.at.desc(), entity.c.identifier.desc()]
        where = [entity.c.action != "DELETE", condition]
        if cumulative(spec):
            # where each state starts and stops being the one in force (a state a later
            # event recorded earlier shadows never is)
            where.append(sa.or_(entity.c.until.is_(None), entity.c.until > entity.c.at))
            starts = sa.func.width_bucket(entity.c.at, stamps) + 1
            stops = sa.case(
                (entity.c.until.is_(None), len(closes) + 1),
                else_=sa.func.width_bucket(entity.c.until, stamps) + 1,
            )
            edges = (starts, stops)
        else:
            points = (
                sa.func.unnest(stamps)
                .table_valued("close", with_ordinality="i")
                .render_derived("b")
            )
        bucket: Any = points.c.i if points is not None else None
    else:
        entity = E
        condition = Compiler(scope).compile(spec.query, "/query")
        stamp = time_value([scope.blueprints[spec.blueprint]], E, spec.measureTimeBy)
        assert stamp is not None  # checked
        if spec.measureTimeBy.startswith("$"):
            read = stamp
        else:
            read = _fast_time(spec.measureTimeBy)
        starts = sa.cast(sa.bindparam(None, span.starts, type_=_STAMPS), _STAMPS)
        bucket = sa.func.width_bucket(read, starts)
        order = [read.desc(), E.c.identifier.desc()]
        where = [
            E.c.org_id == sa.bindparam(None, scope.org_id, type_=E.c.org_id.type),
            E.c.blueprint == sa.bindparam(None, spec.blueprint, type_=sa.String),
            condition,
            stamp >= sa.bindparam(None, span.start, type_=sa.DateTime(timezone=True)),
            stamp < sa.bindparam(None, span.end, type_=sa.DateTime(timezone=True)),
        ]
    source: Any = entity
    key: Any = None
    if spec.breakdownProperty is not None:
        key, source = _breakdown(scope, entity, spec.breakdownProperty)
    if edges is not None:
        # One pass, two groupings: the states by where they start (+) and by where they
        # stop (-); `grouping()` tells the rows apart.
        starting = sa.func.grouping(edges[0]) == 0
        sign = sa.case((starting, 1), else_=-1)
        columns: list[Any] = [sa.case((starting, edges[0]), else_=edges[1]).label("bucket")]
        if key is not None:
            columns.append(key.label("key"))
        if spec.aggregationType == "countEntities":
            columns.append((sa.func.count() * sign).label("m0"))
        for index, name in enumerate(spec.properties or []):
            value = number_value(entity, name)
            columns.append((sa.func.sum(value) * sign).label(f"m{index}"))
            columns.append((sa.func.count(value) * sign).label(f"n{index}"))
        sets = [sa.tuple_(edge, key) if key is not None else sa.tuple_(edge) for edge in edges]
        return (
            sa.select(*columns)
            .select_from(source)
            .where(*where)
            .group_by(sa.func.grouping_sets(*sets))
        )
    columns = [bucket.label("bucket")]
    if key is not None:
        columns.append(key.label("key"))
    if points is not None:
        source = source.join(
            points,
            sa.and_(
                entity.c.at < points.c.close,
                sa.or_(entity.c.until.is_(None), entity.c.until >= points.c.close),
            ),
        )
    columns += _measures(spec, entity, order)
    groups: list[Any] = [sa.literal_column("1")] + (
        [sa.literal_column("2")] if key is not None else []
    )
    return sa.select(*columns).select_from(source).where(*where).group_by(*groups)


# `$history` reads rebuild the catalog at each bucket's close from the events: the heaviest
# reads there are (~0.25 s of the database for 100k entities and 13 buckets, bench
# over_time). An org runs at most `history_reads` of them at once per process.
HISTORY_READS = OrgCap("history reads")


async def aggregate_over_time(
    tx: Tx,
    body: Mapping[str, Any],
    *,
    now: datetime | None = None,
    retention_days: int | None = None,
    history_reads: int | None = None,
) -> dict[str, Any]:
    """Port's aggregate-over-time for the org of `tx` (whose caller may read entities):
    `body` as Port's route takes it; returns Port's `result`: `minDate` / `maxDate` (the
    range, ms since the epoch) and `data`, one point per bucket: `date` (its start, ms)
    and a value per line. Lines: each property (aggregatePropertiesValues), `count` or
    `average` (countEntities), or each breakdown value (at most MAX_LINES). A bucket with
    nothing to aggregate holds null (0 for counts). With `$history`, buckets that close
    before the retention horizon (`retention_days`) hold null: history is not whole there.
    Bad input raises Invalid (422) naming it by pointer; an unknown blueprint NotFound;
    a `$history` read past the org's `history_reads` running at once RateLimited (429)."""
    spec = parse(body)
    now = now or datetime.now(UTC)
    scope = await fresh_scope(tx, spec.blueprint, spec.query)
    _check(spec, scope)
    window = spec.timeRange
    span = frame(
        preset=window.preset,
        start=window.from_,
        end=window.to,
        tz=zone(window.timeZone),
        interval=spec.timeInterval,
        now=now,
    )
    history = spec.measureTimeBy == HISTORY
    horizon = now - timedelta(days=retention_days) if retention_days is not None else None
    all_closes = span.closes()
    known = [horizon is None or close >= horizon for close in all_closes]
    closes = [c for c, k in zip(all_closes, known, strict=True) if k]
    # bucket number in the statement -> index of the bucket
    index_of = (
        {n + 1: i for n, i in enumerate(i for i, k in enumerate(known) if k)}
        if history
        else {n + 1: n for n in range(len(span.starts))}
    )
    rows: list[Any] = []
    if span.starts and (closes or not history):
        capped = history_reads if history else None
        with HISTORY_READS.hold(tx.org_id, capped) if capped is not None else nullcontext():
            changes = await renames(tx, scope) if history else {}
            rows = await run_bounded(tx, statement(spec, scope, span, closes, changes))
    return _points(spec, span, rows, index_of, known if history else None)


def _cells(spec: OverTimeBody, rows: list[Any], buckets: int) -> dict[tuple[int, str], list[Any]]:
    """(bucket number, line) -> the row's measures; for a `cumulative` aggregation, the
    running totals of its changes at each bucket number (1..buckets)."""

    def line(row: Any) -> str:
        return _label(row["key"]) if spec.breakdownProperty is not None else ""

    width = 1 if spec.aggregationType == "countEntities" else len(spec.properties or [])
    names = [f"m{n}" for n in range(width)]
    if not cumulative(spec):
        return {(int(r["bucket"]), line(r)): [r[m] for m in names] for r in rows}
    counts = [f"n{n}" for n in range(width)] if spec.aggregationType != "countEntities" else []
    changes: dict[str, dict[int, list[Any]]] = {}
    for r in rows:
        per = changes.setdefault(line(r), {})
        seen = per.setdefault(int(r["bucket"]), [0] * (len(names) + len(counts)))
        for n, m in enumerate(names + counts):
            seen[n] += r[m] or 0
    out: dict[tuple[int, str], list[Any]] = {}
    for label, per in changes.items():
        running = [Decimal(0)] * (len(names) + len(counts))
        for number in range(1, buckets + 1):
            running = [
                a + b for a, b in zip(running, per.get(number, [0] * len(running)), strict=True)
            ]
            if not counts:
                out[(number, label)] = list(running)
                continue
            values: list[Any] = []
            for n in range(width):
                total, present = running[n], running[width + n]
                if not present:
                    values.append(None)
                else:
                    values.append(total / present if spec.func == "average" else total)
            out[(number, label)] = values
    return out


def _points(
    spec: OverTimeBody,
    span: Frame,
    rows: list[Any],
    index_of: dict[int, int],
    known: list[bool] | None,
) -> dict[str, Any]:
    counting = spec.aggregationType == "countEntities"
    cells = _cells(spec, rows, len(index_of))
    if spec.breakdownProperty is not None:
        totals: dict[str, int] = {}
        for (_, label), measured in cells.items():
            totals[label] = totals.get(label, 0) + int(measured[0] or 0)
        ranked = sorted((kv for kv in totals.items() if kv[1]), key=lambda kv: (-kv[1], kv[0]))
        lines = [k for k, _ in ranked][:MAX_LINES]
    elif counting:
        lines = [spec.func]
    else:
        lines = list(spec.properties or [])
    empty: Any = 0 if counting else None
    values: list[dict[str, Any]] = [dict.fromkeys(lines, empty) for _ in span.starts]
    divisor = PER_UNIT[spec.timeInterval] if counting and spec.func == "average" else 1
    for (number, label), measured in cells.items():
        at = index_of.get(number)
        if at is None:
            continue
        if spec.breakdownProperty is not None:
            if label in values[at]:
                values[at][label] = _count(measured[0], divisor)
        elif counting:
            values[at][spec.func] = _count(measured[0], divisor)
        else:
            for n, name in enumerate(lines):
                values[at][name] = _plain(measured[n])
    data = []
    for n, start in enumerate(span.starts):
        point: dict[str, Any] = {"date": epoch_ms(start)}
        if known is not None and not known[n]:
            point.update(dict.fromkeys(lines))
        else:
            point.update(values[n])
        data.append(point)
    return {"minDate": epoch_ms(span.start), "maxDate": epoch_ms(span.end), "data": data}


def _count(value: Any, divisor: int) -> Any:
    return int(value) if divisor == 1 else int(value) / divisor
