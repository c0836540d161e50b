"""Port's query language -> one SQLAlchemy Core boolean expression over `entities`.

Every rule is typed by the blueprint schemas in scope: numbers compare as numbers, date-times
as timestamps, arrays by element, and values are always bound parameters. A rule that cannot
apply (an operator its property's type does not take, an unknown property, a malformed value)
is reported by its JSON pointer in the query; all problems are reported at once as one 422.

Equality, `in` and array membership compile to JSONB containment (`properties @> ...`), which
the GIN `jsonb_path_ops` index on properties answers. `relatedTo` walks `entity_relations`
with a recursive CTE, up to 15 hops.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.sql.elements import ColumnElement

from app.catalog.models import BlueprintRelation, Entity, EntityRelation
from app.catalog.validation import UNSTORABLE_TEXT, Problems, first_unstorable
from app.search import derived
from app.search.sql import (
    META_TEXT,
    META_TIME,
    Scope,
    as_number,
    as_time,
    number_value,
    stored_time,
)

ENTITIES = Entity.__table__
E = ENTITIES.alias("e")
_RELATIONS = EntityRelation.__table__
_BLUEPRINT_RELATIONS = BlueprintRelation.__table__

# Aliases are built once: SQLAlchemy builds an alias's column collection on first use,
# which cost ~1 ms per alias per request. Each is used once per (sub)query level.
_LINK = _RELATIONS.alias("rl")
SCORECARD_RESULTS = sa.table(
    "scorecard_results",
    sa.column("org_id"),
    sa.column("blueprint"),
    sa.column("identifier"),
    sa.column("scorecard"),
    sa.column("level_rank"),
    sa.column("passed", ARRAY(sa.Boolean)),
)
_WALK_FIRST = _RELATIONS.alias("w_first")
_WALK_NEXT = _RELATIONS.alias("w_next")
_WALK_FIRST_DEF = _BLUEPRINT_RELATIONS.alias("w_first_def")
_WALK_NEXT_DEF = _BLUEPRINT_RELATIONS.alias("w_next_def")

_EMPTY_VALUES: ColumnElement[Any] = sa.literal_column(
    """ARRAY['""'::jsonb, '[]'::jsonb, '{}'::jsonb, 'null'::jsonb]"""
)

MAX_HOPS = 15
MAX_RULES = 200
MAX_DEPTH = 10
MAX_VALUES = 1000

_PRESETS_PAST = {
    "lastDay": timedelta(days=1),
    "lastWeek": timedelta(weeks=1),
    "last2Weeks": timedelta(weeks=2),
    "lastMonth": timedelta(days=30),
    "last3Months": timedelta(days=91),
    "last6Months": timedelta(days=182),
    "last12Months": timedelta(days=365),
    "last2Years": timedelta(days=730),
    "last3Years": timedelta(days=1095),
}
_PRESETS_NEXT = {
    "nextDay": timedelta(days=1),
    "nextWeek": timedelta(weeks=1),
    "next2Weeks": timedelta(weeks=2),
    "nextMonth": timedelta(days=30),
    "next3Months": timedelta(days=91),
    "next6Months": timedelta(days=182),
    "next12Months": timedelta(days=365),
}
PRESETS = sorted({"today", "tomorrow", "yesterday", *_PRESETS_PAST, *_PRESETS_NEXT})


class _Skip(Exception):
    """A rule with a problem (already recorded): compile the rest to find theirs too."""


@dataclass
class _Field:
    """A property as the rules see it: its type across the searched blueprints."""

    name: str
    kind: str  # string | number | boolean | datetime | array | object
    item_kind: str | None
    blueprints: list[str]  # searched blueprints that declare it
    # A derived property's value (jsonb, computed in the statement); None for a stored one.
    source: Any = None


def _kind(prop: dict[str, Any]) -> str:
    kind = prop.get("type", "string")
    if kind == "string" and prop.get("format") in ("date-time", "timer"):
        return "datetime"
    return str(kind)


def _ptr(base: str, *parts: str | int) -> str:
    return base + "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _bind(value: Any, type_: Any = None) -> Any:
    return (
        sa.bindparam(None, value, type_=type_) if type_ is not None else sa.bindparam(None, value)
    )


def _jsonb(value: Any) -> ColumnElement[Any]:
    return sa.cast(sa.bindparam(None, value, type_=JSONB), JSONB)


def _text_array(values: list[str]) -> ColumnElement[Any]:
    return sa.cast(sa.bindparam(None, values, type_=ARRAY(sa.Text)), ARRAY(sa.Text))


def _like_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def text_match(text_value: ColumnElement[Any], op: str, value: str) -> ColumnElement[bool]:
    """`contains` / `beginsWith` / `endsWith` (case-sensitive, `%` and `_` literal) as
    `value COLLATE "C" LIKE pattern`, the shape a trigram index answers
    (app/search/indexes.py). The indexes are keyed in the "C" collation so that they serve
    these rules only: gin_trgm_ops also answers `=`, and an identifier's trigram index in
    the default collation was chosen for the joins on identifiers (2.5 ms a lookup instead
    of a primary-key probe); LIKE matches the same in every deterministic collation. No
    ESCAPE clause: backslash is LIKE's own escape, and `LIKE p ESCAPE e` is planned as
    `~~ like_escape(p, e)`, a function the planner would have to fold first."""
    escaped = _like_escape(value)
    if op == "contains":
        pattern = "%" + escaped + "%"
    elif op == "beginsWith":
        pattern = escaped + "%"
    else:
        pattern = "%" + escaped
    return sa.collate(sa.type_coerce(text_value, sa.Text).self_group(), "C").like(
        _bind(pattern, sa.Text)
    )


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not re.match(r"^\d{4}-\d{2}-\d{2}", value):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _number(value: Any) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return Decimal(str(value))


class Compiler:
    def __init__(
        self,
        scope: Scope,
        entity: Any = None,
        *,
        joins: bool = False,
        scan: bool = False,
        namespace: str = "",
    ) -> None:
        """`entity`: the alias of `entities` the rules apply to (`e` unless given).

        `joins`: `relatedTo` rules of the top-level `and` become subqueries in `self.joins`
        (columns `bp`, `ident`: the related entities, each once) for the caller to join,
        instead of `IN (...)` conditions. A page query then reads the related entities in
        its own order and stops at the page's end: as a condition, the planner reads every
        related entity before sorting (1,000 of them for a team's services: 6 vs 1.5 ms)."""
        self.scope = scope
        self.e = entity if entity is not None else E
        # `scan`: for statements that read every row (scorecard evaluations), numbers are
        # read by an expression the planner inlines (~5x cheaper a row) rather than the
        # leakproof function that range indexes are keyed by.
        self.scan = scan
        self.allow_joins = joins
        self.joins: list[Any] = []
        # With joins (the search pages), relatedTo shapes are built once and their values
        # are collected here, to be bound by name when the statement runs.
        self.templates = joins
        self.values: dict[str, Any] = {}
        self.problems = Problems()
        self._rules = 0
        self._walks = 0
        # Prefix of this compiler's walk names (CTEs, subqueries, parameters): a query
        # compiled inside another's statement (see derived) gets its own.
        self._namespace = namespace
        self._docs: dict[int, dict[str, Any]] = {}

    # -- entry points -------------------------------------------------------------------

    def compile(self, query: Any, pointer: str = "") -> ColumnElement[bool]:
        """The whole query as one boolean expression; raises Invalid naming every bad rule."""
        bad = first_unstorable(query)
        if bad is not None:  # no statement could carry it
            self.problems.add(pointer + bad if bad != "/" else pointer or "/", UNSTORABLE_TEXT)
            self.problems.raise_if_any("The search query is invalid")
        try:
            expression = self._group(query, pointer, 0)
        except _Skip:
            expression = sa.false()
        self.problems.raise_if_any("The search query is invalid")
        return expression

    # -- structure ----------------------------------------------------------------------

    def _problem(self, pointer: str, message: str) -> _Skip:
        self.problems.add(pointer or "/", message)
        return _Skip()

    def _group(self, query: Any, pointer: str, depth: int) -> ColumnElement[bool]:
        if not isinstance(query, dict):
            raise self._problem(pointer, "a query must be an object with combinator and rules")
        if depth > MAX_DEPTH:
            raise self._problem(pointer, f"queries nest at most {MAX_DEPTH} levels deep")
        unknown = sorted(set(query) - {"combinator", "rules"})
        if unknown:
            raise self._problem(pointer, f"unknown field(s) {', '.join(unknown)}")
        combinator = query.get("combinator", "and")
        if combinator not in ("and", "or"):
            raise self._problem(_ptr(pointer, "combinator"), "combinator must be 'and' or 'or'")
        rules = query.get("rules")
        if not isinstance(rules, list):
            raise self._problem(_ptr(pointer, "rules"), "rules must be a list")
        parts: list[ColumnElement[bool]] = []
        top = self.allow_joins and depth == 0 and combinator == "and"
        for index, rule in enumerate(rules):
            try:
                parts.append(self._rule(rule, _ptr(pointer, "rules", index), depth, top=top))
            except _Skip:
                continue
        if not rules:
            return sa.true()
        if len(parts) != len(rules):
            raise _Skip()
        if combinator == "and":
            return sa.and_(*self._merge_containments(parts))
        return sa.or_(*parts)

    def _rule(
        self, rule: Any, pointer: str, depth: int, *, top: bool = False
    ) -> ColumnElement[bool]:
        self._rules += 1
        if self._rules > MAX_RULES:
            raise self._problem(pointer, f"a query holds at most {MAX_RULES} rules")
        if isinstance(rule, dict) and "combinator" in rule:
            return self._group(rule, pointer, depth + 1)
        if not isinstance(rule, dict):
            raise self._problem(pointer, "a rule must be an object")
        operator = rule.get("operator")
        if not isinstance(operator, str):
            raise self._problem(_ptr(pointer, "operator"), "operator is required")
        if operator == "relatedTo":
            return self._related_to(rule, pointer, join=top)
        if operator == "matchAny":
            return self._match_any(rule, pointer)
        if "propertySchema" in rule:
            return self._property_schema(rule, pointer, operator)
        prop = rule.get("property")
        if isinstance(prop, dict):
            raise self._problem(
                _ptr(pointer, "property"),
                "context references ({context, property}) need a signed-in user; "
                "they are not available to this caller",
            )
        if not isinstance(prop, str) or not prop:
            raise self._problem(_ptr(pointer, "property"), "property is required")
        value = rule.get("value")
        if isinstance(value, dict) and "context" in value:
            raise self._problem(
                _ptr(pointer, "value"),
                "context references ({context, property}) need a signed-in user; "
                "they are not available to this caller",
            )
        if prop == "$team":
            return self._team(operator, value, "value" in rule, pointer)
        if prop in META_TEXT:
            return self._text_column(self.e.c[META_TEXT[prop]], prop, operator, value, pointer)
        if prop in META_TIME:
            column = self.e.c[META_TIME[prop]]
            return self._time(column, prop, operator, value, pointer)
        if prop.startswith("$"):
            raise self._problem(_ptr(pointer, "property"), f"unknown meta-property {prop!r}")
        if prop.startswith("scorecards."):
            return self._scorecard(prop, operator, value, "value" in rule, pointer)
        found = self._field(prop)
        if found is not None:
            return self._property(found, operator, value, "value" in rule, pointer)
        if any(prop in self.scope.blueprints[bp]["relations"] for bp in self.scope.searched):
            return self._relation(prop, operator, value, pointer)
        where = ", ".join(self.scope.searched) or "(no blueprint)"
        raise self._problem(
            _ptr(pointer, "property"),
            f"{prop!r} is not a property or relation of the searched blueprint(s): {where}",
        )

    # -- properties ---------------------------------------------------------------------

    def _field(self, name: str) -> _Field | None:
        kinds: dict[tuple[str, str | None], list[str]] = {}
        for bp in self.scope.searched:
            prop = self.scope.blueprints[bp]["schema"]["properties"].get(name)
            if prop is None:
                continue
            items = prop.get("items") if isinstance(prop.get("items"), dict) else {}
            item_kind = _kind(items) if prop.get("type") == "array" and items else None
            kinds.setdefault((_kind(prop), item_kind), []).append(bp)
        if not kinds:
            return self._derived_field(name)
        if len(kinds) > 1:
            described = "; ".join(f"{k[0]} in {', '.join(v)}" for k, v in sorted(kinds.items()))
            raise self._problem(
                "",
                f"property {name!r} has different types in the searched blueprints "
                f"({described}): narrow the search with a $blueprint rule",
            )
        (kind, item_kind), bps = next(iter(kinds.items()))
        return _Field(name, kind, item_kind, bps)

    def _derived_field(self, name: str) -> _Field | None:
        """A mirror or aggregation property of the one searched blueprint, as the jsonb
        value the read statement computes for it (calculation properties are computed
        after the statement and cannot be searched)."""
        holders = [
            bp
            for bp in self.scope.searched
            for section in ("mirrorProperties", "aggregationProperties", "calculationProperties")
            if name in (self.scope.blueprints[bp].get(section) or {})
        ]
        if not holders:
            return None
        if len(self.scope.searched) != 1:
            raise self._problem(
                "", f"derived property {name!r} is searchable on its blueprint's own search"
            )
        bp = holders[0]
        definition = self.scope.blueprints[bp]
        if name in (definition.get("calculationProperties") or {}):
            raise self._problem(
                "", f"{name!r} is a calculation property (jq): it cannot be searched"
            )
        if name in (definition.get("aggregationProperties") or {}):
            source = derived.aggregation_value(self.scope, bp, self.e, name, nested_query)
            return _Field(name, "number", None, [bp], source)
        path = str(definition["mirrorProperties"][name].get("path", ""))
        kind, item_kind = derived.mirror_kind(self.scope, bp, path)
        source = derived.mirror_value(self.scope, bp, self.e, path)
        return _Field(name, kind, item_kind, [bp], source)

    def _has(self, f: _Field, value: Any) -> ColumnElement[bool]:
        """The property contains `value` (jsonb containment)."""
        if f.source is None:
            return self._contains(f.name, value)
        contained: ColumnElement[bool] = f.source.op("@>", is_comparison=True)(_jsonb(value))
        return contained

    def _guard(self, field_: _Field) -> ColumnElement[bool] | None:
        """Restricts typed casts to the blueprints that declare the property."""
        if set(field_.blueprints) >= set(self.scope.searched):
            return None
        return self.e.c.blueprint == sa.any_(_text_array(field_.blueprints))

    def _contains(self, name: str, value: Any) -> ColumnElement[bool]:
        """`properties @> {name: value}` (GIN `jsonb_path_ops`, migration 0004). The
        containments of one `and` group are merged into one document by `_group`: the
        planner estimates each containment's selectivity on its own, and a product of
        several underestimates a page query into reading the whole tenant."""
        doc = {name: value}
        expr = self._containment(doc)
        self._docs[id(expr)] = doc
        return expr

    def _containment(self, doc: dict[str, Any]) -> ColumnElement[bool]:
        return self.e.c.properties.op("@>", is_comparison=True)(_jsonb(doc))

    def _merge_containments(self, parts: list[ColumnElement[bool]]) -> list[ColumnElement[bool]]:
        merged: dict[str, Any] = {}
        rest: list[ColumnElement[bool]] = []
        for part in parts:
            doc = self._docs.get(id(part))
            if doc is None:
                rest.append(part)
                continue
            ((name, value),) = doc.items()
            if name not in merged:
                merged[name] = value
            elif isinstance(merged[name], list) and isinstance(value, list):
                merged[name] = merged[name] + value
            else:
                rest.append(part)  # same scalar property twice: keep both rules
        if not merged:
            return parts
        return [self._containment(merged), *rest]

    def _check_scalar(self, f: _Field, value: Any, pointer: str, kind: str | None = None) -> Any:
        kind = kind or f.kind
        ok = {
            "string": isinstance(value, str),
            "number": _number(value) is not None,
            "boolean": isinstance(value, bool),
            "datetime": parse_time(value) is not None,
            "object": isinstance(value, dict),
            "array": isinstance(value, list),
        }.get(kind, False)
        if not ok:
            wanted = {"datetime": "an ISO 8601 date-time"}.get(kind, f"a {kind}")
            raise self._problem(
                _ptr(pointer, "value"),
                f"{f.name!r} is a {f.kind} property: the value must be {wanted}",
            )
        return value

    def _values(self, value: Any, pointer: str) -> list[Any]:
        if not isinstance(value, list):
            raise self._problem(_ptr(pointer, "value"), "the value must be a list")
        if len(value) > MAX_VALUES:
            raise self._problem(_ptr(pointer, "value"), f"at most {MAX_VALUES} values")
        return value

    def _property(
        self, f: _Field, op: str, value: Any, has_value: bool, pointer: str
    ) -> ColumnElement[bool]:
        name = f.name
        json_value = self.e.c.properties[name] if f.source is None else f.source
        text_value = (
            self.e.c.properties[name].astext
            if f.source is None
            else f.source.op("#>>", return_type=sa.Text)(sa.literal_column("'{}'"))
        )
        if op in ("isEmpty", "isNotEmpty"):
            # One comparison against the four empty values (the value is read once).
            empty = sa.func.coalesce(
                json_value == sa.any_(_EMPTY_VALUES),
                sa.true(),
            )
            return empty if op == "isEmpty" else _not(empty)
        if not has_value and op not in ("isExpired", "isNotExpired"):
            raise self._problem(_ptr(pointer, "value"), f"operator {op!r} needs a value")
        if f.kind == "datetime":
            guard = self._guard(f)
            stamp: ColumnElement[Any] = (
                stored_time(self.e, name) if f.source is None else as_time(f.source)
            )
            if guard is not None:
                stamp = sa.case((guard, stamp), else_=None)
            return self._time(stamp, name, op, value, pointer)
        if op in ("=", "!="):
            if value is None:
                absent = (
                    _not(self.e.c.properties.has_key(name))
                    if f.source is None
                    else json_value.is_(None)
                )
                return absent if op == "=" else _not(absent)
            if f.kind == "array":
                if isinstance(value, list):
                    equal = json_value == _jsonb(value)
                    expr = equal
                else:
                    self._check_scalar(f, value, pointer, f.item_kind or self._scalar_kind(value))
                    expr = self._has(f, [value])
            else:
                self._check_scalar(f, value, pointer)
                expr = self._has(f, value)
            return expr if op == "=" else _not(expr)
        if op in (">", ">=", "<", "<="):
            if f.kind != "number":
                raise self._problem(
                    _ptr(pointer, "operator"),
                    f"{op!r} compares numbers and date-times; {name!r} is a {f.kind} property",
                )
            number = _number(value)
            if number is None:
                raise self._problem(_ptr(pointer, "value"), "the value must be a number")
            guard = self._guard(f)
            cast: ColumnElement[Any] = (
                as_number(f.source if f.source is not None else self.e.c.properties[name])
                if self.scan or f.source is not None
                else number_value(self.e, name)
            )
            if guard is not None:
                cast = sa.case((guard, cast), else_=None)
            return _compare(cast, op, _bind(number, sa.Numeric))
        if op in ("in", "notIn"):
            values = self._values(value, pointer)
            if f.kind not in ("string", "number", "boolean"):
                raise self._problem(
                    _ptr(pointer, "operator"), f"{op!r} takes string, number or boolean properties"
                )
            for i, item in enumerate(values):
                self._check_scalar(f, item, _ptr(pointer, "value", i))
            expr = sa.or_(sa.false(), *(self._has(f, v) for v in values))
            return expr if op == "in" else _not(expr)
        if op in ("contains", "doesNotContains"):
            if f.kind == "array":
                self._check_scalar(f, value, pointer, f.item_kind or self._scalar_kind(value))
                expr = self._has(f, [value])
            elif f.kind == "string":
                self._check_scalar(f, value, pointer)
                expr = text_match(text_value, "contains", value)
            else:
                raise self._problem(
                    _ptr(pointer, "operator"), f"{op!r} takes string or array properties"
                )
            return expr if op == "contains" else _not(expr)
        if op == "containsAny":
            values = self._values(value, pointer)
            if f.kind == "array":
                for i, item in enumerate(values):
                    self._check_scalar(
                        f, item, _ptr(pointer, "value", i), f.item_kind or self._scalar_kind(item)
                    )
                return sa.or_(sa.false(), *(self._has(f, [v]) for v in values))
            if f.kind in ("string", "number", "boolean"):
                for i, item in enumerate(values):
                    self._check_scalar(f, item, _ptr(pointer, "value", i))
                return sa.or_(sa.false(), *(self._has(f, v) for v in values))
            raise self._problem(_ptr(pointer, "operator"), "'containsAny' takes array properties")
        if op in ("beginsWith", "doesNotBeginsWith", "endsWith", "doesNotEndsWith"):
            if f.kind != "string":
                raise self._problem(
                    _ptr(pointer, "operator"),
                    f"{op!r} takes string properties; {name!r} is a {f.kind}",
                )
            self._check_scalar(f, value, pointer)
            return self._affix(text_value, op, value)
        if op in ("between", "notBetween", "isExpired", "isNotExpired"):
            raise self._problem(
                _ptr(pointer, "operator"),
                f"{op!r} takes date-time properties; {name!r} is a {f.kind}",
            )
        raise self._problem(_ptr(pointer, "operator"), f"unknown operator {op!r}")

    @staticmethod
    def _scalar_kind(value: Any) -> str:
        if isinstance(value, bool):
            return "boolean"
        if isinstance(value, int | float):
            return "number"
        if isinstance(value, str):
            return "string"
        return "object"

    @staticmethod
    def _affix(text_value: ColumnElement[Any], op: str, value: str) -> ColumnElement[bool]:
        begins = op in ("beginsWith", "doesNotBeginsWith")
        expr = text_match(text_value, "beginsWith" if begins else "endsWith", value)
        return expr if op in ("beginsWith", "endsWith") else _not(expr)

    def _text_column(
        self, column: Any, name: str, op: str, value: Any, pointer: str
    ) -> ColumnElement[bool]:
        if op in ("isEmpty", "isNotEmpty"):
            empty = sa.func.coalesce(column, "") == ""
            return empty if op == "isEmpty" else _not(empty)
        if op in ("in", "notIn", "containsAny"):
            values = self._values(value, pointer)
            if not all(isinstance(v, str) for v in values):
                raise self._problem(_ptr(pointer, "value"), "the values must be strings")
            expr = column == sa.any_(_text_array(values))
            return expr if op != "notIn" else _not(expr)
        if not isinstance(value, str):
            raise self._problem(_ptr(pointer, "value"), f"{name} compares with a string value")
        if op in ("=", "!="):
            expr = column == _bind(value)
            return expr if op == "=" else _not(expr)
        if op in ("contains", "doesNotContains"):
            expr = text_match(column, "contains", value)
            return expr if op == "contains" else _not(expr)
        if op in ("beginsWith", "doesNotBeginsWith", "endsWith", "doesNotEndsWith"):
            return self._affix(column, op, value)
        raise self._problem(_ptr(pointer, "operator"), f"{op!r} does not apply to {name}")

    def _team(self, op: str, value: Any, has_value: bool, pointer: str) -> ColumnElement[bool]:
        team = self.e.c.team
        if op in ("isEmpty", "isNotEmpty"):
            empty = sa.func.cardinality(team) == 0
            return empty if op == "isEmpty" else _not(empty)
        if op in ("=", "!=", "contains", "doesNotContains"):
            if not isinstance(value, str):
                raise self._problem(_ptr(pointer, "value"), "$team compares with a team name")
            expr = team.op("@>", is_comparison=True)(_text_array([value]))
            return expr if op in ("=", "contains") else _not(expr)
        if op in ("in", "notIn", "containsAny"):
            values = self._values(value, pointer)
            if not all(isinstance(v, str) for v in values):
                raise self._problem(_ptr(pointer, "value"), "the values must be team names")
            expr = team.op("&&", is_comparison=True)(_text_array(values))
            return expr if op != "notIn" else _not(expr)
        raise self._problem(_ptr(pointer, "operator"), f"{op!r} does not apply to $team")

    # -- time ---------------------------------------------------------------------------

    def _range(self, value: Any, pointer: str) -> tuple[datetime, datetime]:
        if not isinstance(value, dict):
            raise self._problem(_ptr(pointer, "value"), "the value must be {from, to} or {preset}")
        if "preset" in value:
            preset = value["preset"]
            if preset not in PRESETS:
                raise self._problem(
                    _ptr(pointer, "value", "preset"),
                    f"unknown preset {preset!r} (one of {', '.join(PRESETS)})",
                )
            return self._preset(preset)
        start, end = parse_time(value.get("from")), parse_time(value.get("to"))
        if start is None or end is None:
            raise self._problem(
                _ptr(pointer, "value"), "from and to must both be ISO 8601 date-times"
            )
        return start, end

    def _preset(self, preset: str) -> tuple[datetime, datetime]:
        now = self.scope.now
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        day = timedelta(days=1)
        if preset == "today":
            return midnight, midnight + day
        if preset == "tomorrow":
            return midnight + day, midnight + 2 * day
        if preset == "yesterday":
            return midnight - day, midnight
        if preset in _PRESETS_PAST:
            return now - _PRESETS_PAST[preset], now
        return now, now + _PRESETS_NEXT[preset]

    def _time(
        self,
        column: ColumnElement[Any],
        name: str,
        op: str,
        value: Any,
        pointer: str,
    ) -> ColumnElement[bool]:
        stamp_type = sa.DateTime(timezone=True)
        if op in ("isEmpty", "isNotEmpty"):
            empty = column.is_(None)
            return empty if op == "isEmpty" else _not(empty)
        if op in ("isExpired", "isNotExpired"):
            expired = column < _bind(self.scope.now, stamp_type)
            return expired if op == "isExpired" else _not(expired)
        if op in ("between", "notBetween"):
            start, end = self._range(value, pointer)
            inside = sa.and_(column >= _bind(start, stamp_type), column <= _bind(end, stamp_type))
            return inside if op == "between" else _not(inside)
        if op in ("=", "!=", ">", ">=", "<", "<="):
            if op in ("=", "!=") and value is None:
                empty = column.is_(None)
                return empty if op == "=" else _not(empty)
            stamp = parse_time(value)
            if stamp is None:
                raise self._problem(
                    _ptr(pointer, "value"), f"{name} compares with an ISO 8601 date-time"
                )
            if op == "!=":
                return _not(column == _bind(stamp, stamp_type))
            return _compare(column, op, _bind(stamp, stamp_type))
        if op in ("in", "notIn"):
            values = self._values(value, pointer)
            stamps = [parse_time(v) for v in values]
            if any(s is None for s in stamps):
                raise self._problem(_ptr(pointer, "value"), "the values must be date-times")
            expr = column == sa.any_(sa.cast(_bind(stamps, ARRAY(stamp_type)), ARRAY(stamp_type)))
            return expr if op == "in" else _not(expr)
        raise self._problem(_ptr(pointer, "operator"), f"{op!r} does not apply to date-times")

    # -- relations ----------------------------------------------------------------------

    def _org(self) -> Any:
        """The org as a parameter, for subqueries' own filter on it (rather than a
        correlation through `e.org_id`): Citus routes a statement to one shard when every
        table in it is filtered by the org (docs/scaling.md)."""
        return _bind(self.scope.org_id, ENTITIES.c.org_id.type)

    def _links(self, relation: str) -> Any:
        r = _LINK
        return r, sa.and_(
            r.c.org_id == self._org(),
            r.c.source_blueprint == self.e.c.blueprint,
            r.c.source_identifier == self.e.c.identifier,
            r.c.relation == _bind(relation),
        )

    def _relation(self, name: str, op: str, value: Any, pointer: str) -> ColumnElement[bool]:
        r, linked = self._links(name)
        if op in ("isEmpty", "isNotEmpty"):
            exists = sa.exists().where(linked)
            return _not(exists) if op == "isEmpty" else exists
        if op in ("=", "!=", "contains", "doesNotContains"):
            if value is None and op in ("=", "!="):
                exists = sa.exists().where(linked)
                return _not(exists) if op == "=" else exists
            if not isinstance(value, str):
                raise self._problem(
                    _ptr(pointer, "value"), f"relation {name!r} compares with an entity identifier"
                )
            exists = sa.exists().where(linked, r.c.target_identifier == _bind(value))
            return exists if op in ("=", "contains") else _not(exists)
        if op in ("in", "notIn", "containsAny"):
            values = self._values(value, pointer)
            if not all(isinstance(v, str) for v in values):
                raise self._problem(_ptr(pointer, "value"), "the values must be entity identifiers")
            exists = sa.exists().where(
                linked, r.c.target_identifier == sa.any_(_text_array(values))
            )
            return exists if op != "notIn" else _not(exists)
        raise self._problem(
            _ptr(pointer, "operator"), f"{op!r} does not apply to relation {name!r}"
        )

    def _related_to(
        self, rule: dict[str, Any], pointer: str, *, join: bool = False
    ) -> ColumnElement[bool]:
        unknown = sorted(
            set(rule) - {"operator", "blueprint", "value", "direction", "required", "maxHops"}
        )
        if unknown:
            raise self._problem(pointer, f"unknown field(s) {', '.join(unknown)}")
        blueprint = rule.get("blueprint")
        if not isinstance(blueprint, str) or blueprint not in self.scope.blueprints:
            raise self._problem(
                _ptr(pointer, "blueprint"), f"blueprint {blueprint!r} does not exist"
            )
        value = rule.get("value")
        ids = [value] if isinstance(value, str) else value
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise self._problem(
                _ptr(pointer, "value"), "the value must be an entity identifier or a list of them"
            )
        if len(ids) > MAX_VALUES:
            raise self._problem(_ptr(pointer, "value"), f"at most {MAX_VALUES} identifiers")
        direction = rule.get("direction")
        if direction not in (None, "upstream", "downstream"):
            raise self._problem(
                _ptr(pointer, "direction"), "direction must be 'upstream' or 'downstream'"
            )
        required = rule.get("required")
        if required is not None and not isinstance(required, bool):
            raise self._problem(_ptr(pointer, "required"), "required must be true or false")
        hops = rule.get("maxHops", MAX_HOPS)
        if isinstance(hops, bool) or not isinstance(hops, int) or not 1 <= hops <= MAX_HOPS:
            raise self._problem(_ptr(pointer, "maxHops"), f"maxHops must be 1..{MAX_HOPS}")
        ways = tuple(way for way in ("upstream", "downstream") if direction in (None, way))
        self._walks += 1
        slot = f"{self._namespace}{self._walks}"
        values = {
            f"rt{slot}{way[0]}_{name}": value
            for way in ways
            for name, value in (
                ("org", self.scope.org_id),
                ("bp", blueprint),
                ("ids", ids),
                ("hops", hops),
            )
        }
        recursive = hops > 1
        if self.templates:  # shapes built once; the values travel beside the statement
            self.values.update(values)
            if join:
                self.joins.append(_related_set(slot, ways, required, recursive))
                return sa.true()
            walks = [_walk_shape(slot, way, required, recursive) for way in ways]
        else:
            walks = [_build_walk(slot, way, required, recursive, values) for way in ways]
            if join:
                found: Any = walks[0].distinct() if len(walks) == 1 else sa.union(*walks)
                self.joins.append(found.subquery(f"related_{slot}"))
                return sa.true()
        key = sa.tuple_(self.e.c.blueprint, self.e.c.identifier)
        return sa.or_(*(key.in_(walk) for walk in walks))

    # -- scorecard results --------------------------------------------------------------

    def _scorecard(
        self, prop: str, op: str, value: Any, has_value: bool, pointer: str
    ) -> ColumnElement[bool]:
        """`scorecards.<id>.level` (=, !=, in, notIn, and >, >=, <, <= by the order of the
        scorecard's levels; isEmpty: no result) and `scorecards.<id>.rules.<rule>`
        (= / != "SUCCESS" | "FAILURE"), on the stored results (app.scorecards)."""
        parts = prop.split(".")
        where = _ptr(pointer, "property")
        if len(parts) == 3 and parts[2] == "level":
            kind = "level"
        elif len(parts) == 4 and parts[2] == "rules":
            kind = "rule"
        else:
            raise self._problem(
                where, "use scorecards.<scorecard>.level or scorecards.<scorecard>.rules.<rule>"
            )
        card_id = parts[1]
        cards = {
            bp: self.scope.blueprints[bp].get("scorecards", {}).get(card_id)
            for bp in self.scope.searched
        }
        cards = {bp: card for bp, card in cards.items() if card is not None}
        if not cards:
            raise self._problem(where, f"no searched blueprint has a scorecard {card_id!r}")
        results = SCORECARD_RESULTS.alias()
        own = sa.and_(
            results.c.org_id == self._org(),
            results.c.blueprint == self.e.c.blueprint,
            results.c.identifier == self.e.c.identifier,
            results.c.scorecard == _bind(card_id),
        )
        if op in ("isEmpty", "isNotEmpty"):
            scored = sa.exists().where(own)
            return _not(scored) if op == "isEmpty" else scored
        if not has_value:
            raise self._problem(_ptr(pointer, "value"), f"operator {op!r} needs a value")
        if kind == "rule":
            rule = parts[3]
            if not any(rule in card["rules"] for card in cards.values()):
                raise self._problem(where, f"scorecard {card_id!r} has no rule {rule!r}")
            if op not in ("=", "!=") or value not in ("SUCCESS", "FAILURE"):
                raise self._problem(
                    _ptr(pointer, "operator"),
                    'rule results compare with = / != "SUCCESS" | "FAILURE"',
                )
            # Outcomes are stored in the definition's order (PostgreSQL arrays count from 1).
            status = sa.or_(
                *(
                    sa.and_(
                        results.c.blueprint == _bind(bp),
                        results.c.passed[card["rules"].index(rule) + 1].is_(value == "SUCCESS"),
                    )
                    for bp, card in cards.items()
                    if rule in card["rules"]
                )
            )
            found = sa.exists().where(own, status)
            return found if op == "=" else _not(found)
        names = sorted({level for card in cards.values() for level in card["levels"]})
        values = value if op in ("in", "notIn") else [value]
        if not isinstance(values, list) or not values or not all(v in names for v in values):
            raise self._problem(
                _ptr(pointer, "value"), f"levels of {card_id!r}: {', '.join(names)}"
            )
        if op in ("=", "!=", "in", "notIn"):
            ranks = sa.or_(
                *(
                    sa.and_(
                        results.c.blueprint == _bind(bp),
                        results.c.level_rank
                        == sa.any_(
                            sa.cast(
                                _bind(
                                    [
                                        card["levels"].index(v)
                                        for v in values
                                        if v in card["levels"]
                                    ],
                                    ARRAY(sa.Integer),
                                ),
                                ARRAY(sa.Integer),
                            )
                        ),
                    )
                    for bp, card in cards.items()
                )
            )
            found = sa.exists().where(own, ranks)
            return found if op in ("=", "in") else _not(found)
        if op in (">", ">=", "<", "<="):
            # By each blueprint's own order of the scorecard's levels.
            ranked = [
                sa.and_(
                    results.c.blueprint == _bind(bp),
                    _compare(results.c.level_rank, op, _bind(card["levels"].index(value))),
                )
                for bp, card in cards.items()
                if value in card["levels"]
            ]
            return sa.exists().where(own, sa.or_(*ranked))
        raise self._problem(_ptr(pointer, "operator"), f"{op!r} does not apply to levels")

    # -- matchAny: a path of relations ---------------------------------------------------

    def _match_any(self, rule: dict[str, Any], pointer: str) -> ColumnElement[bool]:
        """Port's path rule: `{"property": {"path": [relation | {relation, maxHops}],
        "fromBlueprint"?} | relation, "operator": "matchAny", "value": id | [ids]}`.

        Without `fromBlueprint` an entity matches when following the path from it (each
        relation from source to target) reaches one of the given identifiers. With it, the
        path starts at the given entities of `fromBlueprint`, and the entities it reaches are
        the matches. A `{relation, maxHops}` step follows a self-relation 1..maxHops times
        (once per path)."""
        unknown = sorted(set(rule) - {"operator", "property", "value"})
        if unknown:
            raise self._problem(pointer, f"unknown field(s) {', '.join(unknown)}")
        spec = rule.get("property")
        if isinstance(spec, str):
            spec = {"path": [spec]}
        if not isinstance(spec, dict) or set(spec) - {"path", "fromBlueprint"}:
            raise self._problem(
                _ptr(pointer, "property"),
                "matchAny takes a relation identifier or {path: [...], fromBlueprint?}",
            )
        value = rule.get("value")
        ids = [value] if isinstance(value, str) else value
        if isinstance(value, dict) and "context" in value:
            raise self._problem(
                _ptr(pointer, "value"),
                "context references ({context, property}) need a signed-in user; "
                "they are not available to this caller",
            )
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise self._problem(
                _ptr(pointer, "value"), "the value must be an entity identifier or a list of them"
            )
        if len(ids) > MAX_VALUES:
            raise self._problem(_ptr(pointer, "value"), f"at most {MAX_VALUES} identifiers")
        origin = spec.get("fromBlueprint")
        if origin is not None and (
            not isinstance(origin, str) or origin not in self.scope.blueprints
        ):
            raise self._problem(
                _ptr(pointer, "property", "fromBlueprint"), f"blueprint {origin!r} does not exist"
            )
        path = spec.get("path")
        if not isinstance(path, list) or not path or len(path) > MAX_HOPS:
            raise self._problem(
                _ptr(pointer, "property", "path"), f"path must list 1..{MAX_HOPS} relations"
            )
        if origin is not None:
            steps = self._path_steps(origin, path, _ptr(pointer, "property", "path"))
            reached = self._follow_path(sa.select(*_start(origin, ids)), steps, forward=True)
            return sa.tuple_(self.e.c.blueprint, self.e.c.identifier).in_(reached)
        starts = [
            bp
            for bp in self.scope.searched
            if _step_relation(path[0]) in self.scope.blueprints[bp]["relations"]
        ]
        if not starts:
            raise self._problem(
                _ptr(pointer, "property", "path", 0),
                f"{_step_relation(path[0])!r} is not a relation of the searched blueprint(s)",
            )
        matched = []
        for bp in starts:
            steps = self._path_steps(bp, path, _ptr(pointer, "property", "path"))
            end = steps[-1][2]
            found = self._follow_path(sa.select(*_start(end, ids)), steps[::-1], forward=False)
            matched.append(sa.tuple_(self.e.c.blueprint, self.e.c.identifier).in_(found))
        return sa.or_(*matched)

    def _path_steps(
        self, blueprint: str, path: list[Any], pointer: str
    ) -> list[tuple[str, str, str, int | None]]:
        """(source blueprint, relation, target blueprint, maxHops or None) per step."""
        steps: list[tuple[str, str, str, int | None]] = []
        at = blueprint
        variable = False
        for index, step in enumerate(path):
            hops: int | None = None
            if isinstance(step, dict):
                if set(step) - {"relation", "maxHops"} or not isinstance(step.get("relation"), str):
                    raise self._problem(
                        _ptr(pointer, index), "a step is a relation or {relation, maxHops}"
                    )
                hops = step.get("maxHops")
                if isinstance(hops, bool) or not isinstance(hops, int) or not 1 <= hops <= 15:
                    raise self._problem(_ptr(pointer, index, "maxHops"), "maxHops must be 1..15")
                if variable:
                    raise self._problem(_ptr(pointer, index), "maxHops may be used once in a path")
                variable = True
            relation = _step_relation(step)
            definition = self.scope.blueprints[at]["relations"].get(relation)
            if not isinstance(relation, str) or definition is None:
                raise self._problem(
                    _ptr(pointer, index), f"{relation!r} is not a relation of blueprint {at!r}"
                )
            target = str(definition["target"])
            if hops is not None and target != at:
                raise self._problem(
                    _ptr(pointer, index, "maxHops"),
                    f"maxHops follows a relation of a blueprint to itself; {relation!r} "
                    f"leads from {at!r} to {target!r}",
                )
            steps.append((at, relation, target, hops))
            at = target
        return steps

    def _follow_path(
        self, start: Any, steps: list[tuple[str, str, str, int | None]], *, forward: bool
    ) -> Any:
        """SELECT (bp, ident) reached from `start` (a SELECT of (bp, ident)) along `steps`:
        forward from source to target, or backward (the steps given last first)."""
        org = self._org()
        current = start
        for source, relation, target, hops in steps:
            link = _RELATIONS.alias()
            near = (link.c.source_blueprint, link.c.source_identifier)
            far = (link.c.target_blueprint, link.c.target_identifier)
            if not forward:
                near, far = far, near
            one = sa.select(_plain(far[0], "bp"), _plain(far[1], "ident")).where(
                link.c.org_id == org,
                link.c.source_blueprint == _bind(source),
                link.c.relation == _bind(relation),
                link.c.target_blueprint == _bind(target),
                sa.tuple_(*near).in_(current),
            )
            if hops is None or hops == 1:
                current = one
                continue
            self._walks += 1
            walk = one.add_columns(sa.literal(1).label("depth")).cte(
                name=f"path_{self._namespace}{self._walks}", recursive=True
            )
            again = _RELATIONS.alias()
            near2 = (again.c.source_blueprint, again.c.source_identifier)
            far2 = (again.c.target_blueprint, again.c.target_identifier)
            if not forward:
                near2, far2 = far2, near2
            more = sa.select(far2[0], far2[1], walk.c.depth + 1).where(
                again.c.org_id == org,
                again.c.source_blueprint == _bind(source),
                again.c.relation == _bind(relation),
                near2[0] == walk.c.bp,
                near2[1] == walk.c.ident,
                walk.c.depth < hops,
            )
            graph = walk.union(more)
            current = sa.select(graph.c.bp, graph.c.ident)
        return current

    # -- property schema ----------------------------------------------------------------

    def _property_schema(self, rule: dict[str, Any], pointer: str, op: str) -> ColumnElement[bool]:
        wanted = rule.get("propertySchema")
        if not isinstance(wanted, dict) or not isinstance(wanted.get("type"), str):
            raise self._problem(_ptr(pointer, "propertySchema"), "propertySchema needs a type")
        names = sorted(
            {
                name
                for bp in self.scope.searched
                for name, prop in self.scope.blueprints[bp]["schema"]["properties"].items()
                if prop.get("type") == wanted["type"]
                and prop.get("format") == wanted.get("format")
                and (
                    "items" not in wanted
                    or (prop.get("items") or {}).get("type") == (wanted["items"] or {}).get("type")
                )
            }
        )
        if not names:
            return sa.false()
        parts = []
        for name in names:
            found = self._field(name)
            assert found is not None
            expr = self._property(found, op, rule.get("value"), "value" in rule, pointer)
            guard = self._guard(found)
            parts.append(sa.and_(guard, expr) if guard is not None else expr)
        return sa.or_(*parts)


def nested_query(scope: Scope, table: Any, namespace: str, query: Any) -> ColumnElement[bool]:
    """A query inside a derived property (an aggregation's), over `table`, its walks and
    parameters named apart with `namespace`."""
    return Compiler(scope, table, namespace=namespace).compile(query)


@functools.lru_cache(maxsize=256)
def _walk_shape(slot: str, way: str, required: bool | None, recursive: bool) -> Any:
    """A walk's shape, built once: its values are bound by name when it runs."""
    return _build_walk(slot, way, required, recursive)


def _build_walk(
    slot: str,
    way: str,
    required: bool | None,
    recursive: bool,
    values: dict[str, Any] | None = None,
) -> Any:
    """SELECT (bp, ident) of the entities reachable from (`rt{slot}{w}_bp`,
    `rt{slot}{w}_ids`) in at most `rt{slot}{w}_hops` links: upstream follows links from
    source to target (what the given entities depend on), downstream the other way (what
    depends on them). One hop is a plain query (the planner estimates it from statistics);
    more is a recursive CTE. Built once per shape, with named parameters: building it
    cost ~0.3 ms a request."""
    prefix = f"rt{slot}{way[0]}_"

    def param(name: str, type_: Any) -> Any:
        if values is None:
            return sa.bindparam(prefix + name, type_=type_)
        return sa.bindparam(prefix + name, values[prefix + name], type_=type_)

    org = param("org", ENTITIES.c.org_id.type)

    def step(edge: Any) -> tuple[Any, Any, Any, Any]:
        if way == "upstream":
            return (
                edge.c.source_blueprint,
                edge.c.source_identifier,
                edge.c.target_blueprint,
                edge.c.target_identifier,
            )
        return (
            edge.c.target_blueprint,
            edge.c.target_identifier,
            edge.c.source_blueprint,
            edge.c.source_identifier,
        )

    def edges(edge: Any, br: Any) -> Any:
        if required is None:
            return edge
        return edge.join(
            br,
            sa.and_(
                br.c.org_id == org,
                br.c.blueprint == edge.c.source_blueprint,
                br.c.relation == edge.c.relation,
                br.c.required == required,
            ),
        )

    first = _WALK_FIRST
    from_bp, from_id, to_bp, to_id = step(first)
    ids = param("ids", ARRAY(sa.String))
    anchor = (
        sa.select(_plain(to_bp, "bp"), _plain(to_id, "ident"), sa.literal(1).label("depth"))
        .select_from(edges(first, _WALK_FIRST_DEF))
        .where(
            first.c.org_id == org,
            from_bp == param("bp", sa.String),
            from_id == sa.any_(sa.cast(ids, ARRAY(sa.String))),
        )
    )
    if not recursive:
        return anchor.with_only_columns(_plain(to_bp, "bp"), _plain(to_id, "ident"))
    walk = anchor.cte(name=f"walk_{slot}{way[0]}", recursive=True)
    nxt = _WALK_NEXT
    from_bp, from_id, to_bp, to_id = step(nxt)
    more = (
        sa.select(to_bp, to_id, walk.c.depth + 1)
        .select_from(
            edges(nxt, _WALK_NEXT_DEF).join(
                walk, sa.and_(from_bp == walk.c.bp, from_id == walk.c.ident)
            )
        )
        .where(
            nxt.c.org_id == org,
            walk.c.depth < param("hops", sa.Integer),
        )
    )
    graph = walk.union(more)
    return sa.select(graph.c.bp, graph.c.ident)


@functools.lru_cache(maxsize=256)
def _related_set(slot: str, ways: tuple[str, ...], required: bool | None, recursive: bool) -> Any:
    """The related entities of a relatedTo rule, each once, as a subquery to join."""
    walks = [_walk_shape(slot, way, required, recursive) for way in ways]
    found: Any = walks[0].distinct() if len(walks) == 1 else sa.union(*walks)
    return found.subquery(f"related_{slot}")


def _step_relation(step: Any) -> Any:
    return step.get("relation") if isinstance(step, dict) else step


def _start(blueprint: str, ids: list[str]) -> tuple[ColumnElement[Any], ColumnElement[Any]]:
    """(bp, ident) of given entities, as a one-column-pair set to start a path from."""
    idents = sa.func.unnest(sa.cast(_bind(ids, ARRAY(sa.String)), ARRAY(sa.String)))
    return _plain(_bind(blueprint), "bp"), _plain(idents, "ident")


def _plain(column: Any, name: str) -> ColumnElement[Any]:
    """`column AS name`, seen by enclosing queries as a plain column: a labelled table
    column is copied with its foreign keys and events into every CTE or subquery that
    selects it, which cost ~0.4 ms per relatedTo rule."""
    return sa.type_coerce(column, sa.String).label(name)


def _compare(left: ColumnElement[Any], op: str, right: Any) -> ColumnElement[bool]:
    compared: ColumnElement[bool]
    if op == ">":
        compared = left > right
    elif op == ">=":
        compared = left >= right
    elif op == "<":
        compared = left < right
    elif op == "<=":
        compared = left <= right
    else:
        compared = left == right
    return compared


def _not(expr: ColumnElement[bool]) -> ColumnElement[bool]:
    """Negation where an absent value (NULL) counts as not matching the positive rule.
    Positive rules stay bare, so their indexes apply."""
    return sa.not_(sa.func.coalesce(expr, sa.false()))
