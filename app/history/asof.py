"""The catalog as it stood: entities' states rebuilt from their events, as relations the
search compiler reads like `entities` (same column names), so Port's queries run against
the past.

An entity's state before an instant C is its last event (in the order events were
written) among those recorded before C; a DELETE event, or none, means it did not exist.
Documents are read in today's names (renames applied in SQL, as app/history/service.py
does in Python). What events do not hold cannot be searched in the past: rules on
mirror, aggregation and calculation properties, scorecards, and relation walks
(`relatedTo`, `matchAny`) are refused with a 422 naming them; direct relation rules read
the relations the event recorded.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.sql.elements import ColumnElement

from app.catalog.models import EntityEvent
from app.db.database import Tx
from app.history.service import NameChange, name_changes
from app.kit.errors import Invalid
from app.search.compiler import Compiler, _Field
from app.search.sql import Scope, run_bounded

EVENTS = EntityEvent.__table__
# One microsecond (PostgreSQL's resolution): "at or before T" is "before T + 1 µs".
TICK = timedelta(microseconds=1)


def _org(scope: Scope) -> Any:
    return sa.bindparam(None, scope.org_id, type_=EVENTS.c.org_id.type)


def _searched(scope: Scope) -> ColumnElement[Any]:
    return sa.cast(sa.bindparam(None, scope.searched, type_=ARRAY(sa.String)), ARRAY(sa.String))


def _renamed(
    doc: ColumnElement[Any],
    at: ColumnElement[Any],
    blueprint: ColumnElement[Any],
    changes: dict[str, list[NameChange]],
    kind: str,
) -> ColumnElement[Any]:
    """`doc` (properties or relations of an event) with the renames and removals of its
    blueprint made after the event applied, in the order they were made."""
    out = doc
    for bp, made in sorted(changes.items()):
        for change in made:
            if change.kind != kind:
                continue
            old = sa.bindparam(None, change.old, type_=sa.Text)
            moved: ColumnElement[Any] = out.op("-", return_type=JSONB)(old)
            if change.new is not None:
                moved = moved.op("||", return_type=JSONB)(
                    sa.func.jsonb_build_object(
                        sa.bindparam(None, change.new, type_=sa.Text),
                        out.op("->", return_type=JSONB)(old),
                        type_=JSONB,
                    )
                )
            out = sa.case(
                (
                    sa.and_(
                        blueprint == sa.bindparam(None, bp, type_=sa.String),
                        at < sa.bindparam(None, change.at, type_=sa.DateTime(timezone=True)),
                        out.op("?", return_type=sa.Boolean)(old),
                    ),
                    moved,
                ),
                else_=out,
            )
    return sa.type_coerce(out, JSONB)


def _columns(scope: Scope, ev: Any, changes: dict[str, list[NameChange]]) -> list[Any]:
    """An event's document as the columns of `entities` (plus `relations`, `action`)."""
    after = ev.c.after
    team = after.op("->", return_type=JSONB)("team")
    created = EVENTS.alias("created")
    creation = (
        sa.select(created.c.at)
        .where(
            created.c.org_id == _org(scope),
            created.c.blueprint == ev.c.blueprint,
            created.c.identifier == ev.c.identifier,
            created.c.action == "CREATE",
            created.c.id <= ev.c.id,
        )
        .order_by(created.c.id.desc())
        .limit(1)
    )
    creator = creation.with_only_columns(created.c.actor)
    nothing = sa.text("'{}'::jsonb")
    properties = sa.func.coalesce(after.op("->", return_type=JSONB)("properties"), nothing)
    relations = sa.func.coalesce(after.op("->", return_type=JSONB)("relations"), nothing)
    return [
        ev.c.org_id,
        ev.c.blueprint,
        ev.c.identifier,
        after.op("->>", return_type=sa.Text)("title").label("title"),
        after.op("->>", return_type=sa.Text)("icon").label("icon"),
        sa.func.array(
            sa.select(
                sa.func.jsonb_array_elements_text(
                    sa.case(
                        (sa.func.jsonb_typeof(team) == "array", team),
                        else_=sa.text("'[]'::jsonb"),
                    )
                )
            )
            .correlate(ev)
            .scalar_subquery(),
            type_=ARRAY(sa.Text),
        ).label("team"),
        _renamed(properties, ev.c.at, ev.c.blueprint, changes, "property").label("properties"),
        _renamed(relations, ev.c.at, ev.c.blueprint, changes, "relation").label("relations"),
        sa.null().cast(sa.Text).label("datasource"),
        creation.scalar_subquery().label("created_at"),
        creator.scalar_subquery().label("created_by"),
        ev.c.at.label("updated_at"),
        ev.c.actor.label("updated_by"),
        ev.c.action,
        ev.c.id.label("event_id"),
        ev.c.at,
    ]


async def renames(tx: Tx, scope: Scope) -> dict[str, list[NameChange]]:
    out = {}
    for bp in scope.searched:
        found = await name_changes(tx, bp)
        if found:
            out[bp] = found
    return out


def state_before(
    scope: Scope,
    blueprint: str,
    close: datetime,
    changes: dict[str, list[NameChange]],
    start: tuple[str, int] | None,
    end: tuple[str, int] | None,
) -> Any:
    """The entities of `blueprint` as they stood before `close`, one row each (the deleted
    left out), named `e` with the columns of `entities`: those whose events lie in the
    window (identifier, event id) in (start, end] of the events' index."""
    ev = EVENTS.alias("ev")
    later = EVENTS.alias("later")
    stamp = sa.bindparam(None, close, type_=sa.DateTime(timezone=True))
    superseded = sa.exists().where(
        later.c.org_id == _org(scope),
        later.c.blueprint == ev.c.blueprint,
        later.c.identifier == ev.c.identifier,
        later.c.id > ev.c.id,
        later.c.at < stamp,
    )
    position = sa.tuple_(ev.c.identifier, ev.c.id)
    # Each bound also on the identifier alone: the planner estimates a window from its
    # histogram (a row comparison it estimates blindly, and read the table instead).
    bounds = []
    if start is not None:
        bounds.append(position > sa.tuple_(_text(start[0]), _int(start[1])))
        bounds.append(ev.c.identifier >= _text(start[0]))
    if end is not None:
        bounds.append(position <= sa.tuple_(_text(end[0]), _int(end[1])))
        bounds.append(ev.c.identifier <= _text(end[0]))
    return (
        sa.select(*_columns(scope, ev, changes))
        .where(
            ev.c.org_id == _org(scope),
            ev.c.blueprint == sa.bindparam(None, blueprint, type_=sa.String),
            *bounds,
            ev.c.at < stamp,
            ev.c.action != "DELETE",
            ~superseded,
        )
        .subquery("e")
    )


def _text(value: str) -> Any:
    return sa.bindparam(None, value, type_=sa.String)


def _int(value: int) -> Any:
    return sa.bindparam(None, value, type_=sa.BigInteger)


def states_over(scope: Scope, end: datetime, changes: dict[str, list[NameChange]]) -> Any:
    """Every state the searched blueprints' entities were in before `end`, each with
    `until`: the earliest time of a later event of its entity (null: none), so a state is
    the one in force before instant C when `at < C <= until` (C <= end). Named `e`, with
    the columns of `entities`; deletions included (`action`)."""
    ev = EVENTS.alias("ev")
    until = sa.func.min(ev.c.at).over(
        partition_by=[ev.c.blueprint, ev.c.identifier], order_by=ev.c.id, rows=(1, None)
    )
    return (
        sa.select(*_columns(scope, ev, changes), until.label("until"))
        .where(
            ev.c.org_id == _org(scope),
            ev.c.blueprint == sa.any_(_searched(scope)),
            ev.c.at < sa.bindparam(None, end, type_=sa.DateTime(timezone=True)),
        )
        .subquery("e")
    )


class PastCompiler(Compiler):
    """Port's rules over a relation of past states: what events do not hold is refused."""

    def _refuse(self, pointer: str, what: str) -> Exception:
        return self._problem(pointer, f"{what} are not kept in history: not searchable in the past")

    def _related_to(self, rule: dict[str, Any], pointer: str, *, join: bool = False) -> Any:
        raise self._refuse(pointer, "relation walks (relatedTo)")

    def _match_any(self, rule: dict[str, Any], pointer: str) -> Any:
        raise self._refuse(pointer, "relation paths (matchAny)")

    def _scorecard(self, prop: str, op: str, value: Any, has_value: bool, pointer: str) -> Any:
        raise self._refuse(pointer, "scorecard results")

    def _derived_field(self, name: str) -> _Field | None:
        for bp in self.scope.searched:
            for section in ("mirrorProperties", "aggregationProperties", "calculationProperties"):
                if name in (self.scope.blueprints[bp].get(section) or {}):
                    raise self._refuse("", f"derived properties ({name!r})")
        return None

    def _relation(self, name: str, op: str, value: Any, pointer: str) -> ColumnElement[bool]:
        named = sa.bindparam(None, name, type_=sa.Text)
        raw = self.e.c.relations.op("->", return_type=JSONB)(named)
        targets = sa.case(
            (sa.func.jsonb_typeof(raw) == "array", raw),
            (sa.func.jsonb_typeof(raw) == "string", sa.func.jsonb_build_array(raw, type_=JSONB)),
            else_=sa.text("'[]'::jsonb"),
        )
        empty = sa.func.jsonb_array_length(targets) == 0
        if op in ("isEmpty", "isNotEmpty") or (value is None and op in ("=", "!=")):
            return empty if op in ("isEmpty", "=") else ~empty
        if op in ("=", "!=", "contains", "doesNotContains"):
            if not isinstance(value, str):
                raise self._problem(
                    pointer + "/value", f"relation {name!r} compares with an entity identifier"
                )
            holds = targets.op("@>", is_comparison=True)(
                sa.cast(sa.bindparam(None, [value], type_=JSONB), JSONB)
            )
            return holds if op in ("=", "contains") else ~holds
        if op in ("in", "notIn", "containsAny"):
            values = self._values(value, pointer)
            if not all(isinstance(v, str) for v in values):
                raise self._problem(pointer + "/value", "the values must be entity identifiers")
            some = targets.op("?|", is_comparison=True)(
                sa.cast(sa.bindparam(None, values, type_=ARRAY(sa.Text)), ARRAY(sa.Text))
            )
            return some if op != "notIn" else ~some
        raise self._problem(pointer + "/operator", f"{op!r} does not apply to relation {name!r}")


def _relation_value(targets: Any, many: bool) -> Any:
    if many:
        if isinstance(targets, list):
            return targets
        return [] if targets is None else [targets]
    if isinstance(targets, list):
        return targets[0] if targets else None
    return targets


def entity_of(blueprint: dict[str, Any], row: Any) -> dict[str, Any]:
    """A past state's row in the shape of the entity routes (derived properties and
    scorecards are not kept in history and are left out)."""
    linked = row["relations"] or {}
    return {
        "identifier": row["identifier"],
        "title": row["title"],
        "icon": row["icon"],
        "blueprint": row["blueprint"],
        "team": list(row["team"] or []),
        "properties": row["properties"] or {},
        "relations": {
            name: _relation_value(linked.get(name), bool(definition["many"]))
            for name, definition in blueprint["relations"].items()
        },
        "createdAt": row["created_at"] or row["updated_at"],
        "createdBy": row["created_by"] or row["updated_by"],
        "updatedAt": row["updated_at"],
        "updatedBy": row["updated_by"],
    }


def check_instant(at: datetime, now: datetime, retention_days: int | None) -> None:
    """An instant a past search may ask for: not in the future, not before the retention
    horizon (history before it is no longer whole)."""
    if at > now:
        raise Invalid(
            "at is in the future: search the present without it",
            details=[{"pointer": "/at", "message": "in the future"}],
        )
    if retention_days is not None and at < now - timedelta(days=retention_days):
        raise Invalid(
            f"at is before the history retention horizon ({retention_days} days): entities "
            "changed or deleted since then are no longer known as they were",
            details=[{"pointer": "/at", "message": "before the retention horizon"}],
        )


# A past search reads the events' index a window at a time: the first of this many events,
# doubling up to the last, so a page of a common match reads a few thousand events and a
# rare one walks the blueprint's events in a few statements, each bounded.
FIRST_WINDOW = 2000
LAST_WINDOW = 64000
# A page reads at most this many events (a request's share of the database: each statement
# is bounded by the statement timeout, the page by this), then answers a 422.
MAX_EVENTS = 1_000_000


def window_end_statement(
    scope: Scope, blueprint: str, close: datetime, start: tuple[str, int] | None, size: int
) -> sa.Select[Any]:
    """The (identifier, event id) that ends the window of `size` events of `blueprint`
    recorded before `close` after `start` (no row: the rest of them is smaller)."""
    ev = EVENTS.alias("ev")
    stmt = sa.select(ev.c.identifier, ev.c.id).where(
        ev.c.org_id == _org(scope),
        ev.c.blueprint == sa.bindparam(None, blueprint, type_=sa.String),
        ev.c.at < sa.bindparam(None, close, type_=sa.DateTime(timezone=True)),
    )
    if start is not None:
        stmt = stmt.where(
            sa.tuple_(ev.c.identifier, ev.c.id) > sa.tuple_(_text(start[0]), _int(start[1]))
        )
    return stmt.order_by(ev.c.identifier, ev.c.id).offset(size - 1).limit(1)


def page_statement(
    scope: Scope,
    blueprint: str,
    query: Any,
    at: datetime,
    window: tuple[tuple[str, int] | None, tuple[str, int] | None],
    limit: int,
    changes: dict[str, list[NameChange]],
) -> sa.Select[Any]:
    """The matches among a window's entities as they stood at `at`, in identifier order."""
    e = state_before(scope, blueprint, at + TICK, changes, *window)
    condition = PastCompiler(scope, e).compile(query or {"combinator": "and", "rules": []})
    return sa.select(e).where(condition).order_by(e.c.identifier).limit(limit)


async def search_page(
    tx: Tx,
    scope: Scope,
    query: Any,
    at: datetime,
    after: tuple[str, str] | None,
    limit: int,
) -> tuple[list[dict[str, Any]], tuple[str, str] | None]:
    """Up to `limit` of the searched blueprints' entities that matched `query` as they
    stood at `at` (inclusive), in (blueprint, identifier) order after `after`; and the
    position to continue from (None after the last page)."""
    changes = await renames(tx, scope)
    close = at + TICK
    rows: list[Any] = []
    read = 0
    for blueprint in scope.searched:
        if after is not None and blueprint < after[0]:
            continue
        # An entity's events follow each other in the index: after an entity, its last.
        start: tuple[str, int] | None = None
        if after is not None and blueprint == after[0]:
            start = (after[1], 2**63 - 1)
        size = FIRST_WINDOW
        while len(rows) <= limit:
            if read >= MAX_EVENTS:
                raise Invalid(
                    f"The past search read {read:,} events without filling its page: narrow "
                    "the query (rules that match more entities fill a page sooner)",
                    details=[{"pointer": "/query", "message": "too few matches to page"}],
                )
            ends = await run_bounded(tx, window_end_statement(scope, blueprint, close, start, size))
            end = (str(ends[0]["identifier"]), int(ends[0]["id"])) if ends else None
            rows += await run_bounded(
                tx,
                page_statement(
                    scope, blueprint, query, at, (start, end), limit + 1 - len(rows), changes
                ),
            )
            if end is None:
                break
            read += size
            start, size = end, min(size * 2, LAST_WINDOW)
        if len(rows) > limit:
            break
    more = len(rows) > limit
    rows = rows[:limit]
    found = [entity_of(scope.blueprints[r["blueprint"]], r) for r in rows]
    last = (rows[-1]["blueprint"], rows[-1]["identifier"]) if more and rows else None
    return found, last
