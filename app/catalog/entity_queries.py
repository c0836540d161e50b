"""Search queries in entity writes (Port's shapes): a relation's targets, an entity's
identifier or its teams given as `{"combinator", "rules"}`, found in the write's own
transaction before the write is evaluated.

Relation and identifier queries are compiled by the search compiler (the same rules, the
same 422 by JSON pointer) over the target blueprint's entities; team queries read the
org's teams. Every distinct query of a write is read once, up to `_CHUNK` of them in one
statement under a savepoint, so a statement stopped by the time limit fails only the
entities whose queries it held.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa

from app.auth import permissions
from app.catalog import blueprints as bp_service
from app.catalog.validation import Problems
from app.kit.errors import Invalid, PortolanError
from app.orgs.models import Team
from app.search.compiler import Compiler, E
from app.search.sql import Scope, run_bounded

if TYPE_CHECKING:
    from app.catalog.entities import Item, Writer
    from app.db.database import Tx

# A query finds at most this many entities: the most a `many` relation links through one
# query (and the most teams a team query gives). More is the entity's error.
MAX_FOUND = 1000
# Distinct queries read by one statement.
_CHUNK = 50

Kind = Literal["identifier", "relation", "team"]

_TEAMS = Team.__table__
# What a team query's rules may name: Port's `_team` entities are named by the team's name.
_TEAM_FIELDS = {
    "$identifier": "name",
    "$title": "name",
    "name": "name",
    "description": "description",
}
_TEAM_OPERATORS = ("=", "!=", "in", "notIn", "containsAny", "contains", "beginsWith", "endsWith")


def is_query(value: Any) -> bool:
    """A value given as a search query rather than as identifiers."""
    return isinstance(value, dict)


@dataclass(slots=True)
class Lookup:
    """One query of one entity of the write."""

    item: Item
    kind: Kind
    query: Any
    pointer: str
    relation: str | None = None  # the relation a relation query fills
    blueprint: str | None = None  # whose entities it finds (None: the org's teams)
    many: bool = True
    statement: sa.Select[Any] | None = None  # compiled: a SELECT of (n, value)
    key: str = ""
    found: list[str] = dataclasses.field(default_factory=list)


def lookups(items: list[Item], blueprint: dict[str, Any]) -> list[Lookup]:
    """The queries the parsed items carry (items already refused carry none)."""
    found: list[Lookup] = []
    for item in items:
        if item.error is not None:
            continue
        if item.identifier_query is not None:
            found.append(
                Lookup(
                    item,
                    "identifier",
                    item.identifier_query,
                    "/identifier",
                    blueprint=blueprint["identifier"],
                    many=False,
                )
            )
        for name, query in sorted(item.relation_queries.items()):
            definition = blueprint["relations"][name]
            found.append(
                Lookup(
                    item,
                    "relation",
                    query,
                    f"/relations/{name}",
                    relation=name,
                    blueprint=definition["target"],
                    many=bool(definition["many"]),
                )
            )
        if item.team_query is not None:
            found.append(Lookup(item, "team", item.team_query, "/team"))
    return found


async def resolve(tx: Tx, blueprint: dict[str, Any], items: list[Item], writer: Writer) -> None:
    """Find what each item's queries name and put it in the item (its identifier, a
    relation's targets, its teams); a query that cannot be run, or finds a count its field
    cannot take, is the item's error."""
    wanted = lookups(items, blueprint)
    if not wanted:
        return
    scope = await _scope(tx)
    distinct: dict[str, Lookup] = {}
    for n, lookup in enumerate(wanted):
        if lookup.item.error is not None:
            continue
        try:
            _allowed(writer, lookup)
            lookup.key = json.dumps([lookup.blueprint, lookup.query], sort_keys=True)
            if lookup.key not in distinct:
                lookup.statement = _compile(scope, lookup, len(distinct), n)
                distinct[lookup.key] = lookup
        except PortolanError as exc:
            lookup.item.error = exc
    results = await _run(tx, list(distinct.values()))
    for lookup in wanted:
        if lookup.item.error is not None:
            continue
        outcome = results.get(lookup.key)
        if isinstance(outcome, PortolanError):
            lookup.item.error = outcome
            continue
        try:
            _apply(lookup, outcome or [])
        except PortolanError as exc:
            lookup.item.error = exc


def _allowed(writer: Writer, lookup: Lookup) -> None:
    """A writer finds only what it may read: a guarded writer (a caller) needs the read
    permission of the blueprint searched (the teams, for a team query); unguarded writers
    (automations, incoming webhooks, the action runner) write with the org's authority."""
    if writer.guard is None:
        return
    principal = writer.guard.principal
    if lookup.blueprint is None:
        permissions.require(principal, "teams.read")
    elif not permissions.allows(principal, "entities.read", blueprint=lookup.blueprint):
        raise permissions.Denied(
            "entities.read",
            f"blueprint {lookup.blueprint!r}",
            f" (the query at {lookup.pointer} searches it)",
        )


async def _scope(tx: Tx) -> Scope:
    """The org's blueprints as committed (with their scorecards' levels and rules, which
    rules may name), as a search reads them."""
    assert tx.org_id is not None
    everything = {bp["identifier"]: bp for bp in await bp_service.list_all(tx)}
    for bp in everything.values():
        bp["scorecards"] = {}
    for row in await tx.fetch(
        "SELECT blueprint, identifier, levels, rules FROM scorecards WHERE org_id = $1",
        tx.org_id,
    ):
        if row["blueprint"] in everything:
            everything[row["blueprint"]]["scorecards"][row["identifier"]] = {
                "levels": [level["title"] for level in row["levels"]],
                "rules": [rule["identifier"] for rule in row["rules"]],
                "rule_levels": [rule["level"] for rule in row["rules"]],
            }
    return Scope(tx.org_id, everything, [])


def _compile(scope: Scope, lookup: Lookup, n: int, seq: int) -> sa.Select[Any]:
    if lookup.blueprint is None:
        condition = _team_condition(lookup.query, lookup.pointer)
        return (
            sa.select(sa.literal(n).label("n"), _TEAMS.c.name.label("value"))
            .where(_TEAMS.c.org_id == sa.bindparam(None, scope.org_id), condition)
            .order_by(_TEAMS.c.name)
            .limit(MAX_FOUND + 1)
        )
    if lookup.blueprint not in scope.blueprints:
        raise Invalid(f"{lookup.pointer}: blueprint {lookup.blueprint!r} does not exist")
    searched = dataclasses.replace(scope, searched=[lookup.blueprint], fixed=lookup.blueprint)
    # Named apart: the queries of one statement each have their own walks.
    compiler = Compiler(searched, namespace=f"wq{seq}_")
    condition = compiler.compile(lookup.query, lookup.pointer)
    return (
        sa.select(sa.literal(n).label("n"), E.c.identifier.label("value"))
        .where(
            E.c.org_id == sa.bindparam(None, scope.org_id),
            E.c.blueprint == sa.bindparam(None, lookup.blueprint),
            condition,
        )
        .order_by(E.c.identifier)
        .limit(MAX_FOUND + 1)
    )


async def _run(tx: Tx, lookups: list[Lookup]) -> dict[str, list[str] | PortolanError]:
    """Each distinct query's findings (identifiers or team names, in order), or the error
    that stopped the statement holding it."""
    results: dict[str, list[str] | PortolanError] = {}
    for start in range(0, len(lookups), _CHUNK):
        chunk = lookups[start : start + _CHUNK]
        statements = [lookup.statement for lookup in chunk if lookup.statement is not None]
        stmt: sa.ClauseElement = (
            statements[0] if len(statements) == 1 else sa.union_all(*statements)
        )
        # A statement stopped by the time limit aborts the transaction: the savepoint keeps
        # the rest of the write going, the entities of this chunk fail.
        await tx.execute("SAVEPOINT entity_queries")
        try:
            rows = await run_bounded(tx, stmt)
        except Invalid as exc:
            await tx.execute("ROLLBACK TO SAVEPOINT entity_queries")
            for lookup in chunk:
                results[lookup.key] = exc
            continue
        except BaseException:
            await tx.execute("ROLLBACK TO SAVEPOINT entity_queries")
            raise
        await tx.execute("RELEASE SAVEPOINT entity_queries")
        for lookup in chunk:
            results[lookup.key] = []
        for row in rows:
            found = results[chunk[row["n"] - start].key]
            assert isinstance(found, list)
            found.append(row["value"])
    return results


def _apply(lookup: Lookup, found: list[str]) -> None:
    item = lookup.item
    what = f"entities of blueprint {lookup.blueprint!r}" if lookup.blueprint else "teams"
    count = f"more than {MAX_FOUND}" if len(found) > MAX_FOUND else str(len(found))
    if not lookup.many and len(found) != 1:
        field = "identifier" if lookup.kind == "identifier" else f"relation {lookup.relation!r}"
        raise Invalid(
            f"The search query of {field} found {count} {what}; it must find exactly one",
            code="query_match_count",
            details=[{"pointer": lookup.pointer, "message": f"found {count}, not one"}],
        )
    if len(found) > MAX_FOUND:
        raise Invalid(
            f"The search query at {lookup.pointer} found {count} {what}; at most {MAX_FOUND} "
            "may be linked through a query",
            code="query_match_count",
            details=[{"pointer": lookup.pointer, "message": f"found {count}"}],
        )
    if lookup.kind == "identifier":
        item.identifier = found[0]
    elif lookup.kind == "team":
        item.team = sorted(found)
    else:
        assert item.relations is not None and lookup.relation is not None
        item.relations[lookup.relation] = sorted(found) or None


# -- team queries ---------------------------------------------------------------------------


def _team_condition(query: Any, pointer: str) -> Any:
    problems = Problems()
    condition = _team_group(query, pointer, problems, 0)
    problems.raise_if_any("The team query is invalid")
    return condition


def _team_group(query: Any, pointer: str, problems: Problems, depth: int) -> Any:
    if not isinstance(query, dict) or not isinstance(query.get("rules"), list):
        problems.add(pointer or "/", "a query is an object with combinator and rules")
        return sa.false()
    combinator = query.get("combinator", "and")
    if combinator not in ("and", "or"):
        problems.add(f"{pointer}/combinator", "combinator must be 'and' or 'or'")
    unknown = sorted(set(query) - {"combinator", "rules"})
    if unknown:
        problems.add(pointer or "/", f"unknown field(s) {', '.join(unknown)}")
    if depth >= 10 or len(query["rules"]) > 200:
        problems.add(pointer or "/", "at most 200 rules, nested at most 10 deep")
        return sa.false()
    parts = []
    for i, rule in enumerate(query["rules"]):
        where = f"{pointer}/rules/{i}"
        if isinstance(rule, dict) and "rules" in rule:
            parts.append(_team_group(rule, where, problems, depth + 1))
        else:
            parts.append(_team_rule(rule, where, problems))
    if not parts:
        return sa.true() if combinator == "and" else sa.false()
    return sa.and_(*parts) if combinator == "and" else sa.or_(*parts)


def _team_rule(rule: Any, pointer: str, problems: Problems) -> Any:
    if not isinstance(rule, dict):
        problems.add(pointer, "a rule is an object {property, operator, value}")
        return sa.false()
    column_name = _TEAM_FIELDS.get(rule.get("property"))  # type: ignore[arg-type]
    if column_name is None:
        problems.add(
            f"{pointer}/property",
            f"a team query's rules name {', '.join(sorted(_TEAM_FIELDS))}",
        )
        return sa.false()
    op = rule.get("operator")
    if op not in _TEAM_OPERATORS:
        problems.add(f"{pointer}/operator", f"operator must be one of {', '.join(_TEAM_OPERATORS)}")
        return sa.false()
    column = _TEAMS.c[column_name]
    value = rule.get("value")
    if op in ("in", "notIn", "containsAny"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            problems.add(f"{pointer}/value", "the value must be a list of strings")
            return sa.false()
        found = column.in_([sa.bindparam(None, v, type_=sa.String) for v in value])
        return sa.not_(found) if op == "notIn" else found
    if not isinstance(value, str):
        problems.add(f"{pointer}/value", "the value must be a string")
        return sa.false()
    if op == "=":
        return column == sa.bindparam(None, value, type_=sa.String)
    if op == "!=":
        return sa.or_(column.is_(None), column != sa.bindparam(None, value, type_=sa.String))
    # Literal text: positions of the term, never a pattern.
    term = sa.bindparam(None, value, type_=sa.String)
    position = sa.func.strpos(column, term)
    if op == "contains":
        return position > 0
    if op == "beginsWith":
        return position == 1
    return sa.func.right(column, sa.func.length(term)) == term
