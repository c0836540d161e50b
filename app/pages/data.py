"""What a widget shows, computed on the server with the caller's reach (Portolan's
`POST /v1/pages/{page}/widgets/{widget}/data`): a number chart is an aggregate, a pie
counts the values of a property (or of a scorecard's levels or rule results), a table is
a search page, a scorecard-compliance widget counts levels per team or property value, a
line chart is an aggregate over time (app/history/over_time.py).
Each is one bounded statement of app/search (statement time limit, the search rate
class); the definition is checked against the catalog here, so a widget whose blueprint,
property or scorecard went away answers a 422 naming it."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from app.auth.principal import Principal
from app.db.database import Tx
from app.history.over_time import aggregate_over_time
from app.kit.errors import Invalid
from app.pages.widgets import (
    COMPLIANCE,
    DASHBOARD,
    IFRAME,
    MARKDOWN,
    NUMBER,
    PIE,
    Row,
    blueprint_rule,
)
from app.search.aggregate import (
    RESULTS,
    aggregate,
    count_scorecard_values,
    matching,
    scorecard_results_join,
)
from app.search.compiler import Compiler, E
from app.search.service import fresh_scope
from app.search.sql import META_TEXT, Scope, run_bounded

MAX_VALUES = 1000  # slices of a pie, groups of a compliance widget


def for_caller(definition: dict[str, Any], principal: Principal) -> dict[str, Any]:
    """The widget with its dataset's dynamic values (Port's `{"context": "user" |
    "userTeams", "property": ...}`) replaced by the caller's: `user` `$identifier` (their
    email), `user` `$team` and `userTeams` `$identifier` (their teams' names). "My team's
    services" then means the teams of whoever draws the dashboard."""
    if "dataset" not in definition:
        return definition
    return {**definition, "dataset": _resolved(definition["dataset"], principal, "/dataset")}


def _resolved(node: Any, principal: Principal, pointer: str) -> Any:
    if isinstance(node, list):
        return [_resolved(rule, principal, f"{pointer}/{i}") for i, rule in enumerate(node)]
    if not isinstance(node, dict):
        return node
    out = dict(node)
    if isinstance(out.get("rules"), list):
        out["rules"] = [
            _resolved(rule, principal, f"{pointer}/rules/{i}")
            for i, rule in enumerate(out["rules"])
        ]
    value = out.get("value")
    if isinstance(value, dict) and "context" in value:
        out["value"] = _context_value(value, principal, f"{pointer}/value")
    return out


def _context_value(ref: dict[str, Any], principal: Principal, pointer: str) -> Any:
    context, name = ref.get("context"), ref.get("property")
    if principal.kind != "user" or principal.email is None:
        raise Invalid(
            "The widget filters by the signed-in user's properties, and the caller is a "
            "machine credential: draw it as a user",
            details=[{"pointer": pointer, "message": "needs a signed-in user"}],
        )
    if context == "user" and name == "$identifier":
        return principal.email
    if (context, name) in (("user", "$team"), ("userTeams", "$identifier")):
        return list(principal.teams)
    raise Invalid(
        f"The widget's dynamic value {context}.{name} is not supported (user.$identifier, "
        "user.$team, userTeams.$identifier)",
        details=[{"pointer": pointer, "message": "unsupported context property"}],
    )


def widget_query(definition: dict[str, Any]) -> dict[str, Any]:
    """The widget's entities as one search query: its dataset (a query, or a list of rules
    joined by `and`), narrowed to its `blueprint` when it names one."""
    dataset = definition.get("dataset")
    if isinstance(dataset, list):
        query: dict[str, Any] = {"combinator": "and", "rules": list(dataset)}
    elif isinstance(dataset, dict):
        query = {"combinator": dataset.get("combinator", "and"), "rules": dataset.get("rules", [])}
    else:
        query = {"combinator": "and", "rules": []}
    blueprint = definition.get("blueprint")
    if isinstance(blueprint, str) and blueprint_rule(query) != blueprint:
        rule = {"property": "$blueprint", "operator": "=", "value": blueprint}
        if query["combinator"] == "and":
            query = {"combinator": "and", "rules": [*query["rules"], rule]}
        else:
            query = {"combinator": "and", "rules": [rule, query]}
    return query


async def _scope(tx: Tx, definition: dict[str, Any], query: dict[str, Any]) -> Scope:
    scope = await fresh_scope(tx, None, query)
    named = definition.get("blueprint") or blueprint_rule(query)
    if named is not None and named not in scope.blueprints:
        raise Invalid(
            f"The widget reads blueprint {named!r}, which does not exist",
            details=[{"pointer": "/blueprint", "message": f"no blueprint {named!r}"}],
        )
    return scope


def _base(scope: Scope, query: dict[str, Any]) -> Any:
    return matching(scope, Compiler(scope).compile(query, "/dataset"))


async def number(tx: Tx, definition: dict[str, Any]) -> dict[str, Any]:
    query = widget_query(definition)
    scope = await _scope(tx, definition, query)
    by = definition.get("calculationBy", "entities")
    body: dict[str, Any] = {"query": query}
    if by == "entities":
        body["func"] = definition.get("func", "count")
    else:
        body["func"] = definition["func"]
        body["property"] = definition["property"]
    for key in ("averageOf", "measureTimeBy"):
        if key in definition:
            body[key] = definition[key]
    answer = await aggregate(tx, scope, body)
    return {"func": answer["func"], "value": answer["result"]}


def _scorecard_of(scope: Scope, scorecard: str, pointer: str) -> tuple[str, dict[str, Any]]:
    """The one searched blueprint that has the scorecard, and the scorecard."""
    holders = [bp for bp in scope.searched if scorecard in scope.blueprints[bp]["scorecards"]]
    if len(holders) != 1:
        reason = "no" if not holders else "more than one"
        raise Invalid(
            f"{reason.capitalize()} blueprint the widget reads has a scorecard {scorecard!r}"
            " (name one blueprint with `blueprint` or a `$blueprint` rule)",
            details=[{"pointer": pointer, "message": f"{reason} blueprint has it"}],
        )
    return holders[0], scope.blueprints[holders[0]]["scorecards"][scorecard]


async def pie(tx: Tx, definition: dict[str, Any]) -> dict[str, Any]:
    """Port's breakdowns: `property#x` (or `x`), `scorecard#sc` (entities per level; no
    level yet: null), `scorecard-rule#sc#rule` (true: passed, false: not, null: not yet
    evaluated)."""
    query = widget_query(definition)
    scope = await _scope(tx, definition, query)
    breakdown = str(definition["property"])
    kind, _, rest = breakdown.partition("#")
    if kind == "scorecard" and rest:
        return await _scorecard_pie(tx, scope, query, rest, None)
    if kind == "scorecard-rule" and "#" in rest:
        scorecard, _, rule = rest.partition("#")
        return await _scorecard_pie(tx, scope, query, scorecard, rule)
    name = rest if kind == "property" and rest else breakdown
    answer = await aggregate(tx, scope, {"func": "countValues", "property": name, "query": query})
    return {"property": breakdown, "values": answer["result"]}


async def _scorecard_pie(
    tx: Tx, scope: Scope, query: dict[str, Any], scorecard: str, rule: str | None
) -> dict[str, Any]:
    blueprint, card = _scorecard_of(scope, scorecard, "/property")
    if rule is not None and rule not in card["rules"]:
        raise Invalid(
            f"Scorecard {scorecard!r} has no rule {rule!r}",
            details=[{"pointer": "/property", "message": f"no rule {rule!r}"}],
        )
    values = await count_scorecard_values(
        tx, scope, _base(scope, query), blueprint, scorecard, card, rule
    )
    prefix = "scorecard" if rule is None else "scorecard-rule"
    name = scorecard if rule is None else f"{scorecard}#{rule}"
    return {"property": f"{prefix}#{name}", "values": values}


def _group(scope: Scope, name: str) -> tuple[Any, Any]:
    """(the grouping value, the FROM clause it needs) for `$team`, a meta-property or a
    property; an entity with no team, or no value, is in the null group."""
    if name == "$team":
        teams = sa.func.unnest(E.c.team).table_valued("value").render_derived("t")
        return teams.c.value, teams
    if name in META_TEXT:
        return E.c[META_TEXT[name]], None
    declared = [scope.blueprints[bp]["schema"]["properties"].get(name) for bp in scope.searched]
    if not any(declared):
        raise Invalid(
            f"{name!r} is not a property of the blueprint the widget reads",
            details=[{"pointer": "/groupBy", "message": f"no property {name!r}"}],
        )
    if any(p and p.get("type") in ("object", "array") for p in declared):
        raise Invalid(
            f"{name!r} holds objects or lists; group by a single-valued property or $team",
            details=[{"pointer": "/groupBy", "message": "not a single-valued property"}],
        )
    return E.c.properties[name].astext, None


async def compliance(tx: Tx, definition: dict[str, Any]) -> dict[str, Any]:
    """Per team (`groupBy` `$team`, the default) or per value of a property (a tier), how
    many of the widget's entities stand at each level of the scorecard."""
    query = widget_query(definition)
    scope = await _scope(tx, definition, query)
    scorecard = str(definition["scorecard"])
    blueprint, card = _scorecard_of(scope, scorecard, "/scorecard")
    group_by = str(definition.get("groupBy", "$team"))
    key, lateral = _group(scope, group_by)
    source = scorecard_results_join(scope, scorecard)
    if lateral is not None:
        source = source.outerjoin(lateral, sa.true())
    stmt = (
        sa.select(
            key.label("value"), RESULTS.c.level_rank.label("rank"), sa.func.count().label("count")
        )
        .select_from(source)
        .where(_base(scope, query))
        .group_by(sa.literal_column("1"), sa.literal_column("2"))
        .order_by(sa.literal_column("1").nulls_last(), sa.literal_column("2"))
        .limit(MAX_VALUES * (len(card["levels"]) + 1))
    )
    rows = await run_bounded(tx, stmt)
    levels: list[str] = card["levels"]
    groups: dict[Any, dict[str, Any]] = {}
    for r in rows:
        group = groups.setdefault(
            r["value"],
            {
                "value": r["value"],
                "entities": 0,
                "levels": dict.fromkeys(levels, 0),
                "notEvaluated": 0,
            },
        )
        group["entities"] += r["count"]
        rank = r["rank"]
        if rank is None or not 0 <= rank < len(levels):
            group["notEvaluated"] += r["count"]
        else:
            group["levels"][levels[rank]] += r["count"]
    return {
        "scorecard": scorecard,
        "blueprint": blueprint,
        "groupBy": group_by,
        "levels": levels,
        "groups": list(groups.values())[:MAX_VALUES],
    }


# Port's UI names the week `week`; aggregate-over-time buckets ISO weeks.
_INTERVALS = {"week": "isoWeek"}


def over_time_body(definition: dict[str, Any]) -> dict[str, Any]:
    """A line chart as Port's aggregate-over-time body: its dataset is the query over its
    blueprint's entities; properties aggregate their values, no properties count entities
    (a property's average and an entity count by default)."""
    dataset = definition.get("dataset")
    query = widget_query({"dataset": dataset}) if dataset is not None else None
    properties = definition.get("properties")
    kind = definition.get("aggregationType") or (
        "aggregatePropertiesValues" if properties else "countEntities"
    )
    interval = definition.get("timeInterval", "isoWeek")
    body: dict[str, Any] = {
        "blueprint": definition["blueprint"],
        "timeRange": definition.get("timeRange", {"preset": "lastMonth"}),
        "timeInterval": _INTERVALS.get(interval, interval)
        if isinstance(interval, str)
        else interval,
        "measureTimeBy": definition.get("measureTimeBy", "$createdAt"),
        "aggregationType": kind,
        "func": definition.get(
            "func", "average" if kind == "aggregatePropertiesValues" else "count"
        ),
    }
    if query is not None:
        body["query"] = query
    for key in ("properties", "breakdownProperty"):
        if definition.get(key) is not None:
            body[key] = definition[key]
    return body


async def line(
    tx: Tx,
    definition: dict[str, Any],
    *,
    retention_days: int | None,
    history_reads: int | None = None,
) -> dict[str, Any]:
    """`{minDate, maxDate, data}`: aggregate-over-time's answer (app/history/over_time.py),
    one point per bucket."""
    return await aggregate_over_time(
        tx,
        over_time_body(definition),
        retention_days=retention_days,
        history_reads=history_reads,
    )


def plain(row: Row) -> dict[str, Any] | None:
    """The answer of a widget that needs no query, None for one that does."""
    if row.type == MARKDOWN:
        return {"markdown": row.definition.get("markdown", "")}
    if row.type == IFRAME:
        return {"url": row.definition.get("url")}
    if row.type == DASHBOARD:
        raise Invalid(
            "A dashboard-widget holds other widgets: ask each of them for its data",
            code="not_supported",
            details=[{"pointer": "/type", "message": "a dashboard-widget shows no data"}],
        )
    return None


# A table is a search page: the router reads it, and calculates it after the commit.
COMPUTED = {NUMBER: number, PIE: pie, COMPLIANCE: compliance}
