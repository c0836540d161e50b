"""`POST /v1/entities/aggregate`: count / sum / average / min / max / median over a query,
value counts (facets), and any of them grouped by a property — one SQL statement each."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql.elements import ColumnElement

from app.catalog.validation import Problems
from app.db.database import Tx
from app.kit.errors import Invalid
from app.search.compiler import SCORECARD_RESULTS, Compiler, E
from app.search.sql import (
    META_TEXT,
    META_TIME,
    TIME_UNITS,
    Scope,
    number_aggregate,
    number_value,
    run_bounded,
    time_value,
)

FUNCS = ("count", "sum", "average", "min", "max", "median", "countValues")
MAX_GROUPS = 1000


def _number(scope: Scope, name: str, problems: Problems, pointer: str) -> ColumnElement[Any]:
    kinds = {
        scope.blueprints[bp]["schema"]["properties"][name].get("type")
        for bp in scope.searched
        if name in scope.blueprints[bp]["schema"]["properties"]
    }
    if kinds != {"number"}:
        problems.add(pointer, f"{name!r} must be a number property of the searched blueprints")
    return number_value(E, name)


def _group_key(scope: Scope, name: str, problems: Problems, pointer: str) -> tuple[Any, bool]:
    """The grouping expression for a property or meta-property; for a set of values per
    entity (arrays, `$team`), a lateral table of them (`.c.value`), flagged True, so that
    each element counts."""
    if name == "$team":
        team = sa.func.unnest(E.c.team).table_valued("value").render_derived("v")
        return team, True
    if name in META_TEXT:
        return E.c[META_TEXT[name]], False
    if name in META_TIME:
        problems.add(pointer, "date-times do not group; aggregate over time instead")
        return None, False
    props = [
        scope.blueprints[bp]["schema"]["properties"][name]
        for bp in scope.searched
        if name in scope.blueprints[bp]["schema"]["properties"]
    ]
    if not props:
        problems.add(pointer, f"{name!r} is not a property of the searched blueprint(s)")
        return None, False
    if any(p.get("type") == "object" for p in props):
        problems.add(pointer, f"{name!r} is an object property: objects do not group")
        return None, False
    # Strings group by their text (`->>`): hashing and comparing text costs about half of
    # what jsonb values do, which is most of a facet over a large blueprint.
    if all(p.get("type") == "array" for p in props):
        texts = all(_items_type(p) == "string" for p in props)
        spread = sa.func.jsonb_array_elements_text if texts else sa.func.jsonb_array_elements
        return spread(E.c.properties[name]).table_valued("value").render_derived("v"), True
    if all(p.get("type") == "string" for p in props):
        return E.c.properties[name].astext, False
    return E.c.properties[name], False


def _items_type(prop: dict[str, Any]) -> Any:
    items = prop.get("items")
    return items.get("type") if isinstance(items, dict) else None


def matching(scope: Scope, condition: ColumnElement[bool]) -> ColumnElement[bool]:
    """The entities of the searched blueprints that meet a compiled query."""
    return sa.and_(
        E.c.org_id == sa.bindparam(None, scope.org_id),
        E.c.blueprint
        == sa.any_(
            sa.cast(sa.bindparam(None, scope.searched, type_=ARRAY(sa.String)), ARRAY(sa.String))
        ),
        condition,
    )


async def aggregate(tx: Tx, scope: Scope, body: dict[str, Any]) -> dict[str, Any]:
    problems = Problems()
    func = body.get("func")
    if func not in FUNCS:
        problems.add("/func", f"func must be one of {', '.join(FUNCS)}")
        problems.raise_if_any("The aggregation is invalid")
    base = matching(scope, Compiler(scope).compile(body.get("query"), "/query"))
    group_by = body.get("groupBy")
    if func == "countValues":
        return await _count_values(tx, scope, body, base, problems)
    measure: Any
    if func == "count" or (func == "average" and "property" not in body):
        measure = sa.func.count()
    else:
        prop = body.get("property")
        if not isinstance(prop, str):
            problems.add("/property", f"{func} needs a number property")
            problems.raise_if_any("The aggregation is invalid")
        value = _number(scope, str(prop), problems, "/property")
        measure = number_aggregate(str(func), value)
    key = None
    spread = False
    if group_by is not None:
        if not isinstance(group_by, str):
            problems.add("/groupBy", "groupBy names a property or meta-property")
        else:
            key, spread = _group_key(scope, group_by, problems, "/groupBy")
    problems.raise_if_any("The aggregation is invalid")
    per_unit = _per_unit(body, problems) if func == "average" and "property" not in body else None
    problems.raise_if_any("The aggregation is invalid")
    if key is None:
        columns: list[Any] = [measure.label("result")]
        if per_unit is not None:
            columns.append(sa.func.min(_time_of(scope, per_unit[1])).label("since"))
        rows = await run_bounded(tx, sa.select(*columns).select_from(E).where(base))
        result = _plain(rows[0]["result"])
        if per_unit is not None:
            result = _average_per(result, rows[0]["since"], per_unit[0], scope.now)
        return {"ok": True, "func": func, "result": result}
    stmt = (
        sa.select(_value(key, spread), measure.label("result"))
        .select_from(_source(key, spread))
        .where(base)
        .group_by(sa.literal_column("1"))
        .order_by(sa.literal_column("2").desc().nulls_last(), sa.literal_column("1"))
        .limit(MAX_GROUPS)
    )
    rows = await run_bounded(tx, stmt)
    return {
        "ok": True,
        "func": func,
        "groupBy": group_by,
        "result": [{"value": _plain(r["value"]), "result": _plain(r["result"])} for r in rows],
    }


RESULTS = SCORECARD_RESULTS


def scorecard_of(
    scope: Scope, scorecard: Any, pointer: str, problems: Problems
) -> tuple[str, dict[str, Any]] | None:
    """The one searched blueprint that has the scorecard, and the scorecard's levels and
    rules (a scorecard is its blueprint's: the query names one blueprint that has it)."""
    holders = [
        bp
        for bp in scope.searched
        if isinstance(scorecard, str) and scorecard in scope.blueprints[bp]["scorecards"]
    ]
    if len(holders) != 1:
        reason = "no" if not holders else "more than one"
        problems.add(
            pointer,
            f"{reason} searched blueprint has a scorecard {scorecard!r} (the query names the "
            "blueprint, e.g. a $blueprint rule)",
        )
        return None
    return holders[0], scope.blueprints[holders[0]]["scorecards"][str(scorecard)]


def scorecard_results_join(scope: Scope, scorecard: str) -> Any:
    """The searched entities with their results of `scorecard` (none yet: nulls). The
    results' org is the bound one, named as such (not only through e.org_id), so on Citus
    both tables are filtered on the distribution column: a router plan."""
    return E.outerjoin(
        RESULTS,
        sa.and_(
            RESULTS.c.org_id == sa.bindparam(None, scope.org_id, type_=E.c.org_id.type),
            RESULTS.c.org_id == E.c.org_id,
            RESULTS.c.blueprint == E.c.blueprint,
            RESULTS.c.identifier == E.c.identifier,
            RESULTS.c.scorecard == sa.bindparam(None, scorecard),
        ),
    )


async def count_scorecard_values(
    tx: Tx,
    scope: Scope,
    base: Any,
    blueprint: str,
    scorecard: str,
    card: dict[str, Any],
    rule: str | None,
) -> list[dict[str, Any]]:
    """Entities per level of a scorecard (the level's title; null: not evaluated yet), or
    per result of one of its rules (true: passed, false: not, null: not evaluated yet)."""
    value: Any = RESULTS.c.level_rank
    if rule is not None:
        value = RESULTS.c.passed[list(card["rules"]).index(rule) + 1]
    stmt = (
        sa.select(value.label("value"), sa.func.count().label("count"))
        .select_from(scorecard_results_join(scope, scorecard))
        .where(base, E.c.blueprint == sa.bindparam(None, blueprint))
        .group_by(sa.literal_column("1"))
        .order_by(sa.literal_column("2").desc(), sa.literal_column("1"))
        .limit(MAX_GROUPS)
    )
    rows = await run_bounded(tx, stmt)
    levels = list(card["levels"])

    def label(found: Any) -> Any:
        if rule is None and isinstance(found, int) and 0 <= found < len(levels):
            return levels[found]
        return found

    return [{"value": label(r["value"]), "count": r["count"]} for r in rows]


async def _count_values(
    tx: Tx, scope: Scope, body: dict[str, Any], base: Any, problems: Problems
) -> dict[str, Any]:
    named = [key for key in ("property", "relation", "scorecard") if key in body]
    if len(named) > 1:
        problems.add(f"/{named[1]}", "countValues counts one of property, relation, scorecard")
        problems.raise_if_any("The aggregation is invalid")
    if "rule" in body and "scorecard" not in body:
        problems.add("/rule", "a rule is counted with its scorecard")
        problems.raise_if_any("The aggregation is invalid")
    if "scorecard" in body:
        found = scorecard_of(scope, body["scorecard"], "/scorecard", problems)
        problems.raise_if_any("The aggregation is invalid")
        assert found is not None
        blueprint, card = found
        rule = body.get("rule")
        if rule is not None and (not isinstance(rule, str) or rule not in card["rules"]):
            problems.add("/rule", f"scorecard {body['scorecard']!r} has no rule {rule!r}")
        problems.raise_if_any("The aggregation is invalid")
        counted = await count_scorecard_values(
            tx, scope, base, blueprint, str(body["scorecard"]), card, rule
        )
        return {"ok": True, "func": "countValues", "result": counted}
    relation = body.get("relation")
    if relation is not None:
        if not isinstance(relation, str) or not any(
            relation in scope.blueprints[bp]["relations"] for bp in scope.searched
        ):
            problems.add(
                "/relation", f"{relation!r} is not a relation of the searched blueprint(s)"
            )
        problems.raise_if_any("The aggregation is invalid")
        links = sa.table(
            "entity_relations",
            sa.column("org_id"),
            sa.column("source_blueprint"),
            sa.column("source_identifier"),
            sa.column("relation"),
            sa.column("target_identifier"),
        ).alias("r")
        stmt = (
            sa.select(links.c.target_identifier.label("value"), sa.func.count().label("count"))
            .select_from(
                E.join(
                    links,
                    sa.and_(
                        links.c.org_id == E.c.org_id,
                        links.c.source_blueprint == E.c.blueprint,
                        links.c.source_identifier == E.c.identifier,
                        links.c.relation == sa.bindparam(None, relation),
                    ),
                )
            )
            .where(base)
        )
    else:
        prop = body.get("property")
        if not isinstance(prop, str):
            problems.add("/property", "countValues needs a property, a relation or a scorecard")
            problems.raise_if_any("The aggregation is invalid")
        key, spread = _group_key(scope, str(prop), problems, "/property")
        problems.raise_if_any("The aggregation is invalid")
        stmt = (
            sa.select(_value(key, spread), sa.func.count().label("count"))
            .select_from(_source(key, spread))
            .where(base)
        )
    stmt = (
        stmt.group_by(sa.literal_column("1"))
        .order_by(sa.literal_column("2").desc(), sa.literal_column("1"))
        .limit(MAX_GROUPS)
    )
    rows = await run_bounded(tx, stmt)
    return {
        "ok": True,
        "func": "countValues",
        "result": [{"value": _plain(r["value"]), "count": r["count"]} for r in rows],
    }


def _value(key: Any, spread: bool) -> Any:
    return (key.c.value if spread else key).label("value")


def _source(key: Any, spread: bool) -> Any:
    return E.join(key, sa.true()) if spread else E


def _per_unit(body: dict[str, Any], problems: Problems) -> tuple[str, str] | None:
    unit = body.get("averageOf", "total")
    if unit not in (*TIME_UNITS, "total"):
        problems.add("/averageOf", "averageOf must be hour, day, week, month or total")
        return None
    if unit == "total":
        return None
    measure = body.get("measureTimeBy", "$createdAt")
    if not isinstance(measure, str):
        problems.add("/measureTimeBy", "measureTimeBy names a date-time property")
        return None
    return str(unit), measure


def _time_of(scope: Scope, name: str) -> ColumnElement[Any]:
    stamp = time_value([scope.blueprints[bp] for bp in scope.searched], E, name)
    if stamp is None:
        raise Invalid(
            f"measureTimeBy: {name!r} is not a date-time property of the searched blueprint(s)",
            details=[{"pointer": "/measureTimeBy", "message": "not a date-time property"}],
        )
    return stamp


def _average_per(count: Any, since: datetime | None, unit: str, now: datetime) -> float | None:
    """Entities per `unit` from the earliest measured time to now (at least one unit)."""
    if not count or since is None:
        return 0.0 if count == 0 else None
    units = max(1.0, (now - since).total_seconds() / TIME_UNITS[unit])
    return float(count) / units


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value
