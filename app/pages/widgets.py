"""Widget definitions (Port's shapes): checked when a page or widget is saved, flattened
into rows, and put back together for reads.

What a widget shows is checked against the catalog when its data is asked for
(app/pages/data.py), not when it is saved: blueprints, properties and scorecards change
after a dashboard is made, and Ocean creates its default pages in the same pass as the
blueprints they read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.catalog.validation import Problems

DASHBOARD = "dashboard-widget"
NUMBER = "entities-number-chart"
PIE = "entities-pie-chart"
TABLE = "table-entities-explorer"
LINE = "line-chart"
MARKDOWN = "markdown"
IFRAME = "iframe-widget"
# Beyond Port: an entity count per scorecard level, grouped by team or a property.
COMPLIANCE = "scorecard-compliance"
TYPES = (DASHBOARD, NUMBER, PIE, TABLE, LINE, MARKDOWN, IFRAME, COMPLIANCE)

NUMBER_ENTITY_FUNCS = ("count", "average")
NUMBER_PROPERTY_FUNCS = ("sum", "min", "max", "average", "median")
AVERAGE_OF = ("hour", "day", "week", "month", "total")
MAX_ID = 100
MAX_TEXT = 100_000  # markdown and other free text of one widget


@dataclass(frozen=True, slots=True)
class Row:
    """A widget as stored: its definition without the widgets it holds."""

    id: str
    container: str | None
    position: int
    type: str
    definition: dict[str, Any]


def _ptr(pointer: str, *parts: str | int) -> str:
    return pointer + "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def blueprint_rule(query: Any) -> str | None:
    """The blueprint a query's top-level `$blueprint =` rule names (an `and` query's)."""
    if isinstance(query, list):
        rules: Any = query
    elif isinstance(query, dict) and query.get("combinator", "and") == "and":
        rules = query.get("rules")
    else:
        return None
    for rule in rules if isinstance(rules, list) else []:
        if (
            isinstance(rule, dict)
            and rule.get("property") == "$blueprint"
            and rule.get("operator") == "="
            and isinstance(rule.get("value"), str)
        ):
            return str(rule["value"])
    return None


def _check_dataset(value: Any, pointer: str, problems: Problems) -> None:
    """A search query ({combinator, rules}) or, as Port's number charts send it, a list of
    rules (joined by `and`). The rules themselves are compiled when data is asked for."""
    if isinstance(value, list):
        if not all(isinstance(r, dict) for r in value):
            problems.add(pointer, "a list of rules holds objects only")
        return
    if not isinstance(value, dict):
        problems.add(pointer, "must be a query ({combinator, rules}) or a list of rules")
        return
    if value.get("combinator", "and") not in ("and", "or"):
        problems.add(_ptr(pointer, "combinator"), "must be 'and' or 'or'")
    rules = value.get("rules", [])
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        problems.add(_ptr(pointer, "rules"), "must be a list of rules (objects)")


def _string(
    widget: dict[str, Any], key: str, pointer: str, problems: Problems, *, required: bool = False
) -> None:
    value = widget.get(key)
    if value is None:
        if required:
            problems.add(_ptr(pointer, key), f"{key} is required")
        return
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
        problems.add(_ptr(pointer, key), f"{key} must be a non-empty string")


def _check_number(widget: dict[str, Any], pointer: str, problems: Problems) -> None:
    by = widget.get("calculationBy", "entities")
    func = widget.get("func", "count" if by == "entities" else None)
    if by == "entities":
        if func not in NUMBER_ENTITY_FUNCS:
            problems.add(_ptr(pointer, "func"), "counting entities, func is count or average")
    elif by == "property":
        if func not in NUMBER_PROPERTY_FUNCS:
            problems.add(
                _ptr(pointer, "func"),
                f"aggregating a property, func is one of {', '.join(NUMBER_PROPERTY_FUNCS)}",
            )
        _string(widget, "property", pointer, problems, required=True)
    else:
        problems.add(_ptr(pointer, "calculationBy"), "calculationBy is entities or property")
    if "averageOf" in widget and widget["averageOf"] not in AVERAGE_OF:
        problems.add(_ptr(pointer, "averageOf"), f"averageOf is one of {', '.join(AVERAGE_OF)}")
    _string(widget, "measureTimeBy", pointer, problems)


LINE_INTERVALS = ("hour", "day", "week", "isoWeek", "month", "quarter")
LINE_KINDS = ("aggregatePropertiesValues", "countEntities")


def _check_line(widget: dict[str, Any], pointer: str, problems: Problems) -> None:
    """The shape of Port's aggregate-over-time body; its values are checked by it when the
    data is asked for."""
    if "timeInterval" in widget and widget["timeInterval"] not in LINE_INTERVALS:
        problems.add(
            _ptr(pointer, "timeInterval"), f"timeInterval is one of {', '.join(LINE_INTERVALS)}"
        )
    if "aggregationType" in widget and widget["aggregationType"] not in LINE_KINDS:
        problems.add(
            _ptr(pointer, "aggregationType"), f"aggregationType is one of {', '.join(LINE_KINDS)}"
        )
    if "timeRange" in widget and not isinstance(widget["timeRange"], dict):
        problems.add(_ptr(pointer, "timeRange"), "timeRange is an object (preset, or from/to)")
    props = widget.get("properties")
    if props is not None and (
        not isinstance(props, list) or not props or not all(isinstance(p, str) for p in props)
    ):
        problems.add(_ptr(pointer, "properties"), "properties is a list of property names")
    for key in ("measureTimeBy", "breakdownProperty"):
        _string(widget, key, pointer, problems)


def _check_one(widget: dict[str, Any], pointer: str, problems: Problems) -> None:
    kind = widget["type"]
    for key in ("title", "description", "icon"):
        if key in widget and widget[key] is not None and not isinstance(widget[key], str):
            problems.add(_ptr(pointer, key), f"{key} must be a string")
    _string(widget, "blueprint", pointer, problems, required=kind in (LINE, COMPLIANCE))
    if "dataset" in widget:
        _check_dataset(widget["dataset"], _ptr(pointer, "dataset"), problems)
    if kind == MARKDOWN:
        text = widget.get("markdown", "")
        if not isinstance(text, str) or len(text) > MAX_TEXT:
            problems.add(_ptr(pointer, "markdown"), f"markdown is text of at most {MAX_TEXT}")
    elif kind == IFRAME:
        _string(widget, "url", pointer, problems, required=True)
    elif kind == NUMBER:
        _check_number(widget, pointer, problems)
    elif kind == PIE:
        _string(widget, "property", pointer, problems, required=True)
    elif kind == TABLE:
        if widget.get("blueprint") is None and blueprint_rule(widget.get("dataset")) is None:
            problems.add(
                _ptr(pointer, "dataset"),
                "a table names its blueprint: `blueprint`, or a `$blueprint` = rule "
                "at the top of its dataset",
            )
    elif kind == LINE:
        _check_line(widget, pointer, problems)
    elif kind == COMPLIANCE:
        _string(widget, "scorecard", pointer, problems, required=True)
        _string(widget, "groupBy", pointer, problems)


def _check_layout(layout: Any, children: set[str], pointer: str, problems: Problems) -> None:
    if not isinstance(layout, list):
        problems.add(pointer, "layout is a list of rows")
        return
    for i, row in enumerate(layout):
        columns = row.get("columns") if isinstance(row, dict) else None
        if not isinstance(columns, list):
            problems.add(_ptr(pointer, i, "columns"), "a layout row has a list of columns")
            continue
        for j, column in enumerate(columns):
            name = column.get("id") if isinstance(column, dict) else None
            if not isinstance(name, str) or name not in children:
                problems.add(
                    _ptr(pointer, i, "columns", j, "id"), "names no widget of this dashboard"
                )


def flatten(widgets: Any, pointer: str, problems: Problems) -> list[Row]:
    """The rows of a page's widgets (a dashboard wrapper's widgets after it, in order);
    every problem is added to `problems` with its pointer."""
    rows: list[Row] = []
    seen: set[str] = set()
    if not isinstance(widgets, list):
        problems.add(pointer, "widgets must be a list")
        return rows

    def take(widget: Any, at: str, container: str | None, position: int) -> bool:
        if not isinstance(widget, dict):
            problems.add(at, "a widget is an object")
            return False
        wid, kind = widget.get("id"), widget.get("type")
        ok = True
        if not isinstance(wid, str) or not 0 < len(wid) <= MAX_ID:
            problems.add(_ptr(at, "id"), f"a widget has an id: a string of 1-{MAX_ID}")
            ok = False
        elif wid in seen:
            problems.add(_ptr(at, "id"), f"widget id {wid!r} is used twice on the page")
            ok = False
        if kind not in TYPES:
            problems.add(_ptr(at, "type"), f"type must be one of {', '.join(TYPES)}")
            return False
        if kind == DASHBOARD and container is not None:
            problems.add(_ptr(at, "type"), "a dashboard-widget holds widgets, not another one")
            return False
        if not ok or not isinstance(wid, str):
            return False
        seen.add(wid)
        definition = {k: v for k, v in widget.items() if not (kind == DASHBOARD and k == "widgets")}
        _check_one(widget, at, problems)
        rows.append(Row(wid, container, position, str(kind), definition))
        return True

    for i, widget in enumerate(widgets):
        if not take(widget, _ptr(pointer, i), None, i):
            continue
        if widget["type"] != DASHBOARD:
            continue
        children = widget.get("widgets", [])
        if not isinstance(children, list):
            problems.add(_ptr(pointer, i, "widgets"), "widgets must be a list")
            continue
        first = len(rows)
        for j, child in enumerate(children):
            take(child, _ptr(pointer, i, "widgets", j), widget["id"], j)
        if "layout" in widget:
            names = {row.id for row in rows[first:]}
            _check_layout(widget["layout"], names, _ptr(pointer, i, "layout"), problems)
    return rows


def assemble(rows: list[Row]) -> list[dict[str, Any]]:
    """A page's widgets in Port's shape, from its rows."""
    top = sorted((r for r in rows if r.container is None), key=lambda r: r.position)
    held: dict[str, list[Row]] = {}
    for row in rows:
        if row.container is not None:
            held.setdefault(row.container, []).append(row)
    out: list[dict[str, Any]] = []
    for row in top:
        widget = dict(row.definition)
        if row.type == DASHBOARD:
            children = sorted(held.get(row.id, []), key=lambda r: r.position)
            widget["widgets"] = [dict(c.definition) for c in children]
        out.append(widget)
    return out
