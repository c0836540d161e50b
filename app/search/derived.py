"""Derived properties computed in SQL, in the statement that reads a page of entities.

- mirrorProperties: `relation[.relation...].property` (or `.$meta`) followed through
  `entity_relations`; through a `many` relation the value is the list of values found.
- aggregationProperties: count / sum / average / min / max / median over the target
  blueprint's entities linked to this one (either direction, or along `pathFilter`),
  filtered by the property's own query.
- ownership `Inherited`: the teams of the entity at the end of the relation path.

Everything comes back as one jsonb column `derived` ({property: value, "$team": [...]}):
per blueprint, a `CASE` branch of correlated subqueries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, aggregate_order_by
from sqlalchemy.sql.elements import ColumnElement

from app.catalog.models import Entity, EntityRelation
from app.kit.errors import PortolanError
from app.search.sql import (
    META_TEXT,
    META_TIME,
    TIME_UNITS,
    Scope,
    number_aggregate,
    number_value,
    time_value,
)

# An aggregation's `query` over its target's entities (table), compiled by the search
# compiler (app/search/compiler.py `nested_query`), which compiles derived properties in
# turn: (scope, table, namespace, query) -> a boolean expression.
QueryCompiler = Callable[[Scope, Any, str, Any], ColumnElement[bool]]

_ENTITIES = Entity.__table__
_RELATIONS = EntityRelation.__table__
_PAIRS_PER_CALL = 50  # jsonb_build_object takes at most 100 arguments
_ALIASES: dict[str, Any] = {}


def _alias(table: Any, name: str) -> Any:
    """Named aliases built once (an alias's column collection is costly to build); a name
    is used once per subquery level."""
    found = _ALIASES.get(name)
    if found is None:
        found = _ALIASES[name] = table.alias(name)
    return found


def derived_column(
    scope: Scope, entity: Any, compile_query: QueryCompiler
) -> ColumnElement[Any] | None:
    """The `derived` jsonb column for entities of the searched blueprints (None when none
    of them derives anything)."""
    branches = []
    for bp in scope.searched:
        pairs = _pairs(scope, bp, entity, compile_query)
        if pairs:
            branches.append((bp, _object(pairs)))
    if not branches:
        return None
    if len(scope.searched) == 1:
        return branches[0][1].label("derived")
    return sa.case(*((entity.c.blueprint == bp, obj) for bp, obj in branches)).label("derived")


def _org(scope: Scope) -> ColumnElement[Any]:
    """The org as a parameter. Every table a derived property reads is filtered by it
    rather than correlated with the entity's `org_id`: the same plan on a single PostgreSQL
    (a constant instead of the outer row's value), and on Citus each table carries a filter
    on the distribution column, which keeps the statement on the org's shard."""
    return sa.bindparam(None, scope.org_id, type_=_ENTITIES.c.org_id.type)


def _object(pairs: list[tuple[str, ColumnElement[Any]]]) -> ColumnElement[Any]:
    parts = []
    for i in range(0, len(pairs), _PAIRS_PER_CALL):
        args: list[Any] = []
        for key, value in pairs[i : i + _PAIRS_PER_CALL]:
            args += [sa.literal(key, sa.Text), value]
        parts.append(sa.func.jsonb_build_object(*args, type_=JSONB))
    out: ColumnElement[Any] = parts[0]
    for part in parts[1:]:
        out = out.op("||")(part)
    return out


def _pairs(
    scope: Scope, bp: str, entity: Any, compile_query: QueryCompiler
) -> list[tuple[str, ColumnElement[Any]]]:
    definition = scope.blueprints[bp]
    pairs: list[tuple[str, ColumnElement[Any]]] = []
    for name, mirror in sorted((definition.get("mirrorProperties") or {}).items()):
        pairs.append((name, _follow(scope, bp, entity, str(mirror.get("path", "")))))
    for name, agg in sorted((definition.get("aggregationProperties") or {}).items()):
        pairs.append((name, _aggregation(scope, bp, entity, agg, compile_query)))
    ownership = definition.get("ownership") or {}
    if ownership.get("type") == "Inherited":
        pairs.append(("$team", _follow(scope, bp, entity, f"{ownership.get('path')}.$team")))
    return pairs


def _leaf(target: Any, name: str, definition: dict[str, Any]) -> ColumnElement[Any] | None:
    if name == "$team":
        return sa.func.to_jsonb(target.c.team)
    if name in META_TEXT:
        return sa.func.to_jsonb(target.c[META_TEXT[name]])
    if name in META_TIME:
        return sa.func.to_jsonb(target.c[META_TIME[name]])
    if name in definition["schema"]["properties"]:
        value: ColumnElement[Any] = target.c.properties[name]
        return value
    return None


def _follow(scope: Scope, bp: str, entity: Any, path: str) -> ColumnElement[Any]:
    """The value at the end of `relation[.relation...].leaf` from `entity` (of blueprint
    bp); null where the path no longer fits the blueprints."""
    *hops, leaf = path.split(".")
    if not hops:
        return sa.null()
    org = _org(scope)
    current, source, many = bp, entity, False
    conditions: list[ColumnElement[bool]] = []
    froms: list[Any] = []
    for depth, hop in enumerate(hops):
        relation = scope.blueprints.get(current, {}).get("relations", {}).get(hop)
        if relation is None or relation["target"] not in scope.blueprints:
            return sa.null()
        link = _alias(_RELATIONS, f"m_link_{depth}")
        target = _alias(_ENTITIES, f"m_entity_{depth}")
        froms += [link, target]
        conditions += [
            link.c.org_id == org,
            link.c.source_blueprint == source.c.blueprint,
            link.c.source_identifier == source.c.identifier,
            link.c.relation == sa.literal(hop, sa.String),
            target.c.org_id == org,
            target.c.blueprint == link.c.target_blueprint,
            target.c.identifier == link.c.target_identifier,
        ]
        many = many or bool(relation["many"])
        current, source = relation["target"], target
    value = _leaf(source, leaf, scope.blueprints[current])
    if value is None:
        return sa.null()
    if many:
        collected = sa.func.jsonb_agg(aggregate_order_by(value, source.c.identifier))
        found = sa.select(collected).select_from(*froms).where(*conditions, value.isnot(None))
    else:
        found = sa.select(value).select_from(*froms).where(*conditions).limit(1)
    return found.scalar_subquery()


def _aggregation(
    scope: Scope, bp: str, entity: Any, agg: dict[str, Any], compile_query: QueryCompiler
) -> ColumnElement[Any]:
    target_bp = agg.get("target")
    if target_bp not in scope.blueprints:
        return sa.null()
    target = _alias(_ENTITIES, "a_target")
    linked = _linked(scope, bp, entity, target, agg.get("pathFilter"))
    if linked is None:
        return sa.null()
    where: list[ColumnElement[bool]] = [
        target.c.org_id == _org(scope),
        target.c.blueprint == sa.literal(target_bp, sa.String),
        linked,
    ]
    if agg.get("query"):
        try:
            sub = Scope(
                scope.org_id, scope.blueprints, [str(target_bp)], scope.now, nested=scope.nested
            )
            namespace = f"d{next(scope.nested)}_"
            where.append(compile_query(sub, target, namespace, agg["query"]))
        except PortolanError:
            return sa.null()  # the query no longer fits the target's schema
    spec = agg.get("calculationSpec") or {}
    func = spec.get("func")
    if spec.get("calculationBy") == "property":
        prop = spec.get("property")
        declared = scope.blueprints[str(target_bp)]["schema"]["properties"].get(prop)
        if not isinstance(prop, str) or not declared or declared.get("type") != "number":
            return sa.null()
        found = number_aggregate(str(func), number_value(target, prop))
        if found is None:
            return sa.null()
        measure = sa.func.coalesce(found, 0) if func == "sum" else found  # a sum of none is 0
    elif func == "average" and spec.get("averageOf") in TIME_UNITS:
        measured = str(spec.get("measureTimeBy", "$createdAt"))
        stamp = time_value([scope.blueprints[str(target_bp)]], target, measured)
        if stamp is None:
            return sa.null()
        # entities per unit, from the earliest measured time to now (at least one unit)
        elapsed = sa.func.extract("epoch", sa.bindparam(None, scope.now) - sa.func.min(stamp))
        units = sa.func.greatest(elapsed / TIME_UNITS[spec["averageOf"]], 1)
        measure = sa.func.count() / units
    else:
        measure = sa.func.count()
    return sa.func.to_jsonb(sa.select(measure).select_from(target).where(*where).scalar_subquery())


def _linked(
    scope: Scope, bp: str, entity: Any, target: Any, path_filter: Any
) -> ColumnElement[bool] | None:
    """Target entities linked to `entity`: along `pathFilter[0].path` (relations walked from
    the target), or by any direct link in either direction."""
    org = _org(scope)
    if path_filter:
        path = (path_filter[0] or {}).get("path") if isinstance(path_filter, list) else None
        if not isinstance(path, list) or not path:
            return None
        source = target
        conditions: list[ColumnElement[bool]] = []
        froms: list[Any] = []
        for i, hop in enumerate(path):
            link = _alias(_RELATIONS, f"a_link_{i}")
            froms.append(link)
            conditions += [
                link.c.org_id == org,
                link.c.source_blueprint == source.c.blueprint,
                link.c.source_identifier == source.c.identifier,
                link.c.relation == sa.literal(str(hop), sa.String),
            ]
            if i == len(path) - 1:
                conditions += [
                    link.c.target_blueprint == entity.c.blueprint,
                    link.c.target_identifier == entity.c.identifier,
                ]
            else:
                nxt = _alias(_ENTITIES, f"a_entity_{i}")
                froms.append(nxt)
                conditions += [
                    nxt.c.org_id == org,
                    nxt.c.blueprint == link.c.target_blueprint,
                    nxt.c.identifier == link.c.target_identifier,
                ]
                source = nxt
        walked = sa.select(sa.literal(1)).select_from(*froms).where(*conditions)
        return sa.exists(walked.correlate_except(*froms))
    out_link, in_link = _alias(_RELATIONS, "a_out"), _alias(_RELATIONS, "a_in")
    # Both the target (one level up) and the entity (two levels up) come from outside:
    # correlate everything but the link table.
    to_entity = sa.exists(
        sa.select(sa.literal(1)).select_from(in_link).correlate_except(in_link)
    ).where(
        in_link.c.org_id == org,
        in_link.c.source_blueprint == target.c.blueprint,
        in_link.c.source_identifier == target.c.identifier,
        in_link.c.target_blueprint == entity.c.blueprint,
        in_link.c.target_identifier == entity.c.identifier,
    )
    from_entity = sa.exists(
        sa.select(sa.literal(1)).select_from(out_link).correlate_except(out_link)
    ).where(
        out_link.c.org_id == org,
        out_link.c.source_blueprint == entity.c.blueprint,
        out_link.c.source_identifier == entity.c.identifier,
        out_link.c.target_blueprint == target.c.blueprint,
        out_link.c.target_identifier == target.c.identifier,
    )
    return sa.or_(to_entity, from_entity)


def mirror_value(scope: Scope, bp: str, entity: Any, path: str) -> ColumnElement[Any]:
    """A mirror property's value (jsonb) for `entity`, as reads compute it."""
    return _follow(scope, bp, entity, path)


def aggregation_value(
    scope: Scope, bp: str, entity: Any, name: str, compile_query: QueryCompiler
) -> ColumnElement[Any]:
    """An aggregation property's value (jsonb number) for `entity`."""
    definition = scope.blueprints[bp]["aggregationProperties"][name]
    return _aggregation(scope, bp, entity, definition, compile_query)


def mirror_kind(scope: Scope, bp: str, path: str) -> tuple[str, str | None]:
    """The type of a mirror's value: the leaf's (string for text meta-properties), or an
    array of it when a relation on the path is `many`."""
    *hops, leaf = path.split(".")
    current, many = bp, False
    for hop in hops:
        relation = scope.blueprints.get(current, {}).get("relations", {}).get(hop)
        if relation is None or relation["target"] not in scope.blueprints:
            return "string", None
        many = many or bool(relation["many"])
        current = relation["target"]
    if leaf == "$team":
        kind, item = "array", "string"
    elif leaf in META_TIME:
        kind, item = "datetime", None
    elif leaf in META_TEXT:
        kind, item = "string", None
    else:
        prop = scope.blueprints[current]["schema"]["properties"].get(leaf) or {}
        kind = prop.get("type", "string")
        if kind == "string" and prop.get("format") in ("date-time", "timer"):
            kind = "datetime"
        items = prop.get("items") if isinstance(prop.get("items"), dict) else None
        item = items.get("type") if items else None
    if many:
        return "array", (kind if kind != "array" else item)
    return kind, item
