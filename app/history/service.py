"""Entity history, read from the catalog's entity events (written in the transaction of each
change, with the documents before and after): properties over time in buckets, the
timeline of one entity's changes with who made them, and an entity as it was at an instant.

An entity's state at instant T is its last event (in the order they were written) among
those recorded at or before T; a DELETE event means it did not exist. History is read in
today's names: a value recorded under a property's or relation's former name is shown under
its current one, and one removed from the blueprint since is left out
(`history_name_changes`, kept by app/history/reactions.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.catalog import blueprints as bp_service
from app.db.database import Tx
from app.history.timeframe import Frame, epoch_ms
from app.kit.errors import Invalid, NotFound

# Top-level fields of an event's document that Port names as meta-properties.
_META = {"$title": "title", "$icon": "icon", "$team": "team"}
_SECTIONS = {"property": "properties", "relation": "relations"}


@dataclass(frozen=True, slots=True)
class NameChange:
    id: int
    kind: str
    old: str
    new: str | None
    at: datetime


async def name_changes(tx: Tx, blueprint: str) -> list[NameChange]:
    rows = await tx.fetch(
        "SELECT id, kind, old_name, new_name, at FROM history_name_changes "
        "WHERE org_id = $1 AND blueprint = $2 ORDER BY id",
        tx.org_id,
        blueprint,
    )
    return [NameChange(r["id"], r["kind"], r["old_name"], r["new_name"], r["at"]) for r in rows]


# (since, name): events recorded at or after `since` (None: from the beginning) name the
# field `name` (None: the field did not exist then). Newest first.
Segments = list[tuple[datetime | None, str | None]]


def segments(changes: list[NameChange], kind: str, name: str) -> Segments:
    """The names today's field `name` of `kind` had, walking back through the changes."""
    out: Segments = []
    current: str | None = name
    for change in reversed(changes):
        if change.kind != kind or current is None:
            continue
        if change.new is not None and change.new == current:
            out.append((change.at, current))
            current = change.old
        elif change.old == current:
            # Removed, or renamed away: before this the name was another field's.
            out.append((change.at, current))
            current = None
    out.append((None, current))
    return out


def name_at(segs: Segments, at: datetime) -> str | None:
    for since, name in segs:
        if since is None or at >= since:
            return name
    return None


def in_todays_names(
    doc: dict[str, Any] | None, at: datetime, changes: list[NameChange]
) -> dict[str, Any] | None:
    """An event's document with the renames and removals made after it applied."""
    if doc is None:
        return None
    later = [c for c in changes if c.at > at]
    if not later:
        return doc
    out = {**doc}
    for section in _SECTIONS.values():
        out[section] = dict(doc.get(section) or {})
    for change in later:
        values = out[_SECTIONS[change.kind]]
        if change.old not in values:
            continue
        value = values.pop(change.old)
        if change.new is not None:
            values[change.new] = value
    return out


@dataclass(frozen=True, slots=True)
class _Field:
    label: str  # as asked
    section: str | None  # "properties", "relations", or None for a top-level field
    segments: Segments
    many: bool = False


def _fields(blueprint: dict[str, Any], names: list[str], changes: list[NameChange]) -> list[_Field]:
    properties = blueprint["schema"].get("properties", {})
    relations = blueprint["relations"]
    out: list[_Field] = []
    problems = []
    for index, name in enumerate(names):
        if name in _META:
            out.append(_Field(name, None, [(None, _META[name])]))
        elif name in properties:
            out.append(_Field(name, "properties", segments(changes, "property", name)))
        elif name in relations:
            many = bool(relations[name]["many"])
            out.append(_Field(name, "relations", segments(changes, "relation", name), many))
        else:
            problems.append({"pointer": f"/propertyNames/{index}", "message": "not found"})
    if problems:
        raise Invalid(
            f"Not a property, relation or $title / $icon / $team of blueprint "
            f"{blueprint['identifier']!r}: "
            + ", ".join(repr(names[int(p["pointer"].rsplit("/", 1)[1])]) for p in problems),
            details=problems,
        )
    return out


def _relation_value(targets: Any, many: bool) -> Any:
    if many:
        return list(targets or [])
    if isinstance(targets, list):
        return targets[0] if targets else None
    return targets


def events_sql(values: int) -> str:
    """The entity's events that decide a range's buckets: the last one recorded before the
    range and every one inside it, with the `values` document paths asked for."""
    columns = "".join(f", after #> ${i + 6}::text[] AS v{i}" for i in range(values))
    return (
        f"SELECT id, at, action{columns} FROM entity_events "  # noqa: S608 - numbered columns
        "WHERE org_id = $1 AND blueprint = $2 AND identifier = $3 AND at < $4 "
        "AND id >= coalesce((SELECT id FROM entity_events WHERE org_id = $1 "
        "  AND blueprint = $2 AND identifier = $3 AND at < $5 ORDER BY id DESC LIMIT 1), 0) "
        "ORDER BY id"
    )


def events_arguments(
    tx: Tx, blueprint: str, identifier: str, frame: Frame, paths: list[tuple[str, ...]]
) -> list[Any]:
    return [tx.org_id, blueprint, identifier, frame.end, frame.start, *[list(p) for p in paths]]


async def properties_history(
    tx: Tx, blueprint_id: str, identifier: str, names: list[str], frame: Frame
) -> dict[str, Any]:
    """Port's properties-history: for each bucket, the value of each field in force when
    the bucket closes (its last change before the next bucket opens; for the last bucket,
    before the range's end). Before the entity existed, and after it was deleted, null."""
    blueprint = await bp_service.get(tx, blueprint_id)
    changes = await name_changes(tx, blueprint_id)
    fields = _fields(blueprint, names, changes)
    paths: dict[tuple[str, ...], int] = {}
    for f in fields:
        for _, name in f.segments:
            if name is not None:
                path = (f.section, name) if f.section else (name,)
                paths.setdefault(path, len(paths))
    rows = await tx.fetch(
        events_sql(len(paths)),
        *events_arguments(tx, blueprint_id, identifier, frame, list(paths)),
    )
    if not rows:
        await _require_history(tx, blueprint_id, identifier)
    # Sweep the bucket closes in time order; at each, the last event written (by id) among
    # those recorded before it is in force.
    by_time = sorted(rows, key=lambda r: (r["at"], r["id"]))
    data: list[dict[str, Any]] = []
    position, in_force = 0, None
    for start, close in zip(frame.starts, frame.closes(), strict=True):
        while position < len(by_time) and by_time[position]["at"] < close:
            row = by_time[position]
            if in_force is None or row["id"] > in_force["id"]:
                in_force = row
            position += 1
        point: dict[str, Any] = {"date": epoch_ms(start)}
        for f in fields:
            point[f.label] = _value(in_force, f, paths)
        data.append(point)
    return {"minDate": epoch_ms(frame.start), "maxDate": epoch_ms(frame.end), "data": data}


def _value(row: Any, field: _Field, paths: dict[tuple[str, ...], int]) -> Any:
    if row is None or row["action"] == "DELETE":
        return None
    name = name_at(field.segments, row["at"])
    if name is None:
        return None
    path = (field.section, name) if field.section else (name,)
    value = row[f"v{paths[path]}"]
    if field.section == "relations":
        return _relation_value(value, field.many)
    return value


async def _require_history(tx: Tx, blueprint: str, identifier: str) -> None:
    found = await tx.fetchval(
        "SELECT 1 FROM entity_events WHERE org_id = $1 AND blueprint = $2 "
        "AND identifier = $3 LIMIT 1",
        tx.org_id,
        blueprint,
        identifier,
    )
    if found is None:
        raise NotFound(f"Entity {identifier!r} of blueprint {blueprint!r} has no history")


# ------------------------------------------------------------------------------------------
# The timeline


def _source(row: Any) -> str:
    """Who made a change, as a kind: a person, a machine credential, an integration (Port's
    Ocean), an incoming webhook, an action run, an automation's run, or Portolan itself."""
    if row["run_source"] == "AUTOMATION":
        return "automation"
    return {
        "UI": "user",
        "API": "credential",
        "INTEGRATION": "integration",
        "WEBHOOK": "webhook",
        "ACTION": "run",
    }.get(row["origin"], "system")


def diff(before: dict[str, Any] | None, after: dict[str, Any] | None) -> list[dict[str, Any]]:
    """What changed between two documents, field by field (`$title`, `properties.x`,
    `relations.y`)."""
    out: list[dict[str, Any]] = []
    old, new = before or {}, after or {}
    for meta, key in _META.items():
        if old.get(key) != new.get(key):
            out.append({"path": meta, "before": old.get(key), "after": new.get(key)})
    for section in _SECTIONS.values():
        was, now = old.get(section) or {}, new.get(section) or {}
        for key in sorted(set(was) | set(now)):
            if was.get(key) != now.get(key):
                out.append(
                    {"path": f"{section}.{key}", "before": was.get(key), "after": now.get(key)}
                )
    return out


async def timeline(
    tx: Tx,
    blueprint_id: str,
    identifier: str,
    *,
    limit: int,
    before_id: int | None,
    since: datetime | None,
    until: datetime | None,
) -> tuple[list[dict[str, Any]], int | None]:
    """One entity's changes, newest first, a page of `limit` below event `before_id`;
    the page and the cursor of the next one."""
    await bp_service.get(tx, blueprint_id)
    changes = await name_changes(tx, blueprint_id)
    rows = await tx.fetch(
        "SELECT e.id, e.at, e.action, e.before, e.after, e.actor, e.origin, e.run_id, "
        "       r.action AS run_action, r.source AS run_source "
        "FROM entity_events e "
        "LEFT JOIN action_runs r ON r.org_id = e.org_id AND r.id = e.run_id "
        "WHERE e.org_id = $1 AND e.blueprint = $2 AND e.identifier = $3 "
        "AND ($4::bigint IS NULL OR e.id < $4) "
        "AND ($5::timestamptz IS NULL OR e.at >= $5) "
        "AND ($6::timestamptz IS NULL OR e.at < $6) "
        "ORDER BY e.id DESC LIMIT $7",
        tx.org_id,
        blueprint_id,
        identifier,
        before_id,
        since,
        until,
        limit + 1,
    )
    if not rows and before_id is None:
        await _require_history(tx, blueprint_id, identifier)
    page = rows[:limit]
    entries = []
    for row in page:
        before = in_todays_names(row["before"], row["at"], changes)
        after = in_todays_names(row["after"], row["at"], changes)
        by: dict[str, Any] = {"kind": _source(row), "id": row["actor"]}
        entry: dict[str, Any] = {
            "id": str(row["id"]),
            "action": row["action"],
            "at": row["at"],
            "by": by,
            "origin": row["origin"],
            "changes": diff(before, after),
            "before": _document(before),
            "after": _document(after),
        }
        if row["run_id"] is not None:
            entry["run"] = {"id": row["run_id"], "action": row["run_action"]}
        entries.append(entry)
    return entries, (page[-1]["id"] if len(rows) > limit else None)


def _document(doc: dict[str, Any] | None) -> dict[str, Any] | None:
    if doc is None:
        return None
    return {
        "identifier": doc.get("identifier"),
        "title": doc.get("title"),
        "icon": doc.get("icon"),
        "team": doc.get("team") or [],
        "properties": doc.get("properties") or {},
        "relations": doc.get("relations") or {},
    }


# ------------------------------------------------------------------------------------------
# An entity as it was


async def entity_at(tx: Tx, blueprint_id: str, identifier: str, at: datetime) -> dict[str, Any]:
    """The entity as it stood at `at` (its own fields; derived properties are not kept in
    history), in today's names; 404 if it did not exist then."""
    blueprint = await bp_service.get(tx, blueprint_id)
    row = await tx.fetchrow(
        "SELECT e.at, e.action, e.after, e.actor, c.at AS created_at, c.actor AS created_by "
        "FROM (SELECT id, at, action, after, actor FROM entity_events "
        "      WHERE org_id = $1 AND blueprint = $2 AND identifier = $3 AND at <= $4 "
        "      ORDER BY id DESC LIMIT 1) e "
        "LEFT JOIN LATERAL (SELECT at, actor FROM entity_events "
        "      WHERE org_id = $1 AND blueprint = $2 AND identifier = $3 AND action = 'CREATE' "
        "      AND id <= e.id ORDER BY id DESC LIMIT 1) c ON true",
        tx.org_id,
        blueprint_id,
        identifier,
        at,
    )
    if row is None or row["action"] == "DELETE":
        raise NotFound(
            f"Entity {identifier!r} of blueprint {blueprint_id!r} did not exist at {at.isoformat()}"
        )
    changes = await name_changes(tx, blueprint_id)
    doc = in_todays_names(row["after"], row["at"], changes) or {}
    linked = doc.get("relations") or {}
    return {
        "identifier": identifier,
        "title": doc.get("title"),
        "icon": doc.get("icon"),
        "blueprint": blueprint_id,
        "team": doc.get("team") or [],
        "properties": doc.get("properties") or {},
        "relations": {
            name: _relation_value(linked.get(name), bool(definition["many"]))
            for name, definition in blueprint["relations"].items()
        },
        "createdAt": row["created_at"] or row["at"],
        "createdBy": row["created_by"] or row["actor"],
        "updatedAt": row["at"],
        "updatedBy": row["actor"],
    }
