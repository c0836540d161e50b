"""Entity service: set-based writes for one entity or a thousand, with relations and events.

A write of N entities costs a fixed handful of statements (lock the existing rows, check the
relation targets, upsert the changed rows, replace their links, append their events),
whatever N is. Entities are always handled in identifier order, so concurrent writers of
overlapping sets take their row locks in the same order and cannot deadlock.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import asyncpg

from app.auth.permissions import EntityChange, EntityGuard
from app.catalog import blueprints as bp_service
from app.catalog import entity_queries
from app.catalog.validation import UNSTORABLE_TEXT, first_unstorable, valid_entity_identifier
from app.catalog.validators import EntityValidator, validator_for
from app.db.database import Tx
from app.kit import reactions
from app.kit.errors import Conflict, Invalid, NotFound, PortolanError

# Writes of up to this many entities lock their rows on the first read.
_LOCK_AT_ONCE = 50
# Array parameters are typed varchar[] like the key columns: comparing a varchar column with
# text[] casts the column and turns the primary-key lookup into a scan of the blueprint.


@dataclass(frozen=True, slots=True)
class WriteFlags:
    upsert: bool = False
    merge: bool = False
    create_missing_related_entities: bool = False
    validation_only: bool = False
    run_id: str | None = None
    must_exist: bool = False  # PUT / PATCH of one entity: 404 instead of creating it


@dataclass(frozen=True, slots=True)
class Writer:
    """Who writes. `guard` checks each change against the blueprint's permissions; None
    (automations, incoming webhooks, the action runner) writes with the org's authority."""

    actor: str
    origin: str
    datasource: str | None
    guard: EntityGuard | None = None
    # Port's Ocean integrations map properties their blueprint may not declare (Port keeps
    # the declared ones); every other writer is told about such a property (422).
    drop_undeclared: bool = False
    # The integration installation writing (an Ocean integration's identifier), kept on
    # each change's event for the audit log's `InstallationId`.
    installation: str | None = None
    # The incoming webhook event behind the write (`webhook_event`), or behind each item of
    # it (`webhook_events`, by the item's index in the request), kept on each change's
    # event for the audit log's `webhookEventId`.
    webhook_event: str | None = None
    webhook_events: Sequence[str | None] | None = None

    def event_of(self, index: int) -> str | None:
        if self.webhook_events is not None:
            return self.webhook_events[index]
        return self.webhook_event


@dataclass(slots=True)
class Item:
    """One entity of a write request, as it moves through the pipeline."""

    index: int
    raw: Any
    identifier: str = ""
    title: str | None = None
    icon: str | None = None
    team: list[str] | None = None
    properties: dict[str, Any] | None = None
    relations: dict[str, list[str] | None] | None = None
    error: PortolanError | None = None
    created: bool = False
    changed: bool = False
    state: dict[str, Any] = field(default_factory=dict)
    before: dict[str, Any] | None = None
    # Fields given as search queries, found before the write (app.catalog.entity_queries).
    identifier_query: Any = None
    team_query: Any = None
    relation_queries: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Outcome:
    index: int
    identifier: str
    created: bool
    entity: dict[str, Any] | None
    error: PortolanError | None
    changed: bool = False  # the write changes the entity (or would, validating only)


def _parse(item: Item, blueprint: dict[str, Any]) -> None:
    raw = item.raw
    if not isinstance(raw, dict):
        raise Invalid("An entity must be a JSON object")
    bad = first_unstorable(raw)
    if bad is not None:
        # Refused here, for this item alone: the database would fail the whole statement
        # (and an answer could not carry the text back).
        named = raw.get("identifier")
        if isinstance(named, str) and valid_entity_identifier(named):
            item.identifier = named
        raise Invalid(
            f"{bad}: the text {UNSTORABLE_TEXT}",
            details=[{"pointer": bad, "message": UNSTORABLE_TEXT}],
        )
    unknown = sorted(
        set(raw) - {"identifier", "title", "icon", "team", "properties", "relations", "blueprint"}
    )
    if unknown:
        raise Invalid(f"Unknown entity field(s): {', '.join(unknown)}")
    if raw.get("blueprint") not in (None, blueprint["identifier"]):
        raise Invalid(
            f"The entity's blueprint {raw['blueprint']!r} does not match the URL's "
            f"{blueprint['identifier']!r}"
        )
    identifier = raw.get("identifier")
    if identifier is None:
        identifier = "e_" + secrets.token_hex(8)
    if entity_queries.is_query(identifier):
        item.identifier_query = identifier  # the entity it finds (before the write)
    elif not isinstance(identifier, str) or not valid_entity_identifier(identifier):
        raise Invalid(
            "identifier must be 1-1000 letters, digits or @_.+:\\/=- (not '.' or '..')",
            details=[{"pointer": "/identifier", "message": "invalid identifier"}],
        )
    else:
        item.identifier = identifier
    if "title" in raw:
        if raw["title"] is not None and not isinstance(raw["title"], str):
            raise Invalid("title must be a string")
        item.title = raw["title"]
    if "icon" in raw:
        if raw["icon"] is not None and (not isinstance(raw["icon"], str) or len(raw["icon"]) > 200):
            raise Invalid("icon must be a string of at most 200 characters")
        item.icon = raw["icon"]
    if "team" in raw:
        team = raw["team"]
        if team is None:
            item.team = []
        elif isinstance(team, str):
            item.team = [team]
        elif isinstance(team, list) and all(isinstance(t, str) for t in team):
            item.team = sorted(set(team))
        elif entity_queries.is_query(team):
            item.team_query = team
        else:
            raise Invalid("team must be a team name, a list of team names or a search query")
    if "properties" in raw:
        if raw["properties"] is not None and not isinstance(raw["properties"], dict):
            raise Invalid("properties must be an object")
        item.properties = raw["properties"] or {}
    if "relations" in raw:
        rels = raw["relations"]
        if rels is not None and not isinstance(rels, dict):
            raise Invalid("relations must be an object")
        item.relations = {}
        defs = blueprint["relations"]
        for name, value in (rels or {}).items():
            definition = defs.get(name)
            if definition is None:
                raise Invalid(
                    f"Relation {name!r} is not defined on blueprint {blueprint['identifier']!r}",
                    details=[{"pointer": f"/relations/{name}", "message": "unknown relation"}],
                )
            if entity_queries.is_query(value):
                item.relation_queries[name] = value  # its targets are found before the write
                continue
            item.relations[name] = _relation_value(name, value, definition)


def _relation_value(name: str, value: Any, definition: dict[str, Any]) -> list[str] | None:
    if value is None:
        return None
    if definition["many"]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise Invalid(f"Relation {name!r} takes a list of entity identifiers")
        return sorted(set(value)) or None
    if not isinstance(value, str) or not value:
        raise Invalid(f"Relation {name!r} takes one entity identifier (it is not 'many')")
    return [value]


def _state(item: Item, existing: dict[str, Any] | None, merge: bool) -> dict[str, Any]:
    """The entity as it will be stored: the request applied to what exists."""
    base = existing if (existing is not None and merge) else None
    props = dict(base["properties"]) if base else {}
    for key, value in (item.properties or {}).items():
        if value is None:
            props.pop(key, None)  # null clears a property
        else:
            props[key] = value
    rels: dict[str, list[str]] = dict(base["relations"]) if base else {}
    for name, targets in (item.relations or {}).items():
        if targets:
            rels[name] = targets
        else:
            rels.pop(name, None)
    return {
        "title": item.title if item.title is not None or not base else base["title"],
        "icon": item.icon if item.icon is not None or not base else base["icon"],
        "team": item.team if item.team is not None else (base["team"] if base else []),
        "properties": props,
        "relations": rels,
    }


def _same(state: dict[str, Any], existing: dict[str, Any]) -> bool:
    return all(
        state[k] == existing[k] for k in ("title", "icon", "team", "properties", "relations")
    )


# An entity with its links ({relation: [targets]}) in one round trip.
_SELECT_WITH_LINKS = (
    "SELECT e.identifier, e.title, e.icon, e.team, e.properties, e.datasource, "
    "e.created_at, e.created_by, e.updated_at, e.updated_by, "
    "(SELECT jsonb_object_agg(r.relation, r.targets) FROM ("
    "   SELECT relation, jsonb_agg(target_identifier ORDER BY target_identifier) AS targets"
    "   FROM entity_relations WHERE org_id = $1 AND source_blueprint = e.blueprint"
    "   AND source_identifier = e.identifier GROUP BY relation) r) AS links "
    "FROM entities e WHERE e.org_id = $1 AND e.blueprint = $2 "
)


# Rows a write changes are locked FOR NO KEY UPDATE (an UPDATE's own lock): it does not
# conflict with the FOR KEY SHARE that other writers take on the entities they link to (see
# _resolve_targets, and every foreign key check), so writers that link to each other's rows
# do not wait on each other. Rows about to be deleted are locked FOR UPDATE.
_FOR_WRITE = " FOR NO KEY UPDATE OF e"
_FOR_DELETE = " FOR UPDATE OF e"


async def _load_existing(
    tx: Tx, blueprint: str, identifiers: list[str], *, lock: bool, deleting: bool = False
) -> dict[str, dict[str, Any]]:
    if not identifiers:
        return {}
    # OF e: lock the entity rows only.
    rows = await tx.fetch(
        _SELECT_WITH_LINKS
        + "AND e.identifier = ANY($3::varchar[]) ORDER BY e.identifier"
        + ((_FOR_DELETE if deleting else _FOR_WRITE) if lock else ""),
        tx.org_id,
        blueprint,
        identifiers,
    )
    return {row["identifier"]: row_state(row) for row in rows}


def row_state(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "identifier": row["identifier"],
        "title": row["title"],
        "icon": row["icon"],
        "team": list(row["team"]),
        "properties": row["properties"],
        "relations": row["links"] or {},
        "datasource": row["datasource"],
        "createdAt": row["created_at"],
        "createdBy": row["created_by"],
        "updatedAt": row["updated_at"],
        "updatedBy": row["updated_by"],
    }


def to_api(blueprint: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    relations: dict[str, Any] = {}
    for name, definition in blueprint["relations"].items():
        targets = state["relations"].get(name)
        if definition["many"]:
            relations[name] = list(targets or [])
        else:
            relations[name] = targets[0] if targets else None
    return {
        "identifier": state["identifier"],
        "title": state["title"],
        "icon": state["icon"],
        "blueprint": blueprint["identifier"],
        "team": state["team"],
        "properties": state["properties"],
        "relations": relations,
        "createdAt": state["createdAt"],
        "createdBy": state["createdBy"],
        "updatedAt": state["updatedAt"],
        "updatedBy": state["updatedBy"],
    }


def _event_doc(blueprint: str, state: dict[str, Any] | None) -> dict[str, Any] | None:
    if state is None:
        return None
    return {
        "identifier": state["identifier"],
        "blueprint": blueprint,
        "title": state["title"],
        "icon": state["icon"],
        "team": state["team"],
        "properties": state["properties"],
        "relations": state["relations"],
    }


class _StaleBlueprint(Exception):
    """The remembered blueprint definition is not the committed one."""


async def _definition(tx: Tx, blueprint_id: str, attempt: int) -> dict[str, Any]:
    if attempt == 0:
        remembered = bp_service.remembered(tx.org_id, blueprint_id)
        if remembered is not None:
            return remembered
    else:
        bp_service.forget(tx.org_id, blueprint_id)
    return await bp_service.get_with_version(tx, blueprint_id)


async def _load_checked(
    tx: Tx, blueprint: dict[str, Any], identifiers: list[str], *, lock: bool
) -> dict[str, dict[str, Any]]:
    """`_load_existing`, plus the blueprint's version in the same statement: a definition
    that is no longer the committed one raises _StaleBlueprint."""
    rows = await tx.fetch(
        "SELECT b.created_at AS bp_created_at, b.version AS bp_version, x.* "
        "FROM blueprints b LEFT JOIN LATERAL ("
        + _SELECT_WITH_LINKS
        + "AND e.identifier = ANY($3::varchar[]) ORDER BY e.identifier"
        + (_FOR_WRITE if lock else "")
        + ") x ON true WHERE b.org_id = $1 AND b.identifier = $2",
        tx.org_id,
        blueprint["identifier"],
        identifiers,
    )
    if not rows or (rows[0]["bp_created_at"], rows[0]["bp_version"]) != blueprint["version"]:
        raise _StaleBlueprint()
    return {row["identifier"]: row_state(row) for row in rows if row["identifier"] is not None}


async def check_run(tx: Tx, run_id: str) -> None:
    """Changes made with `?run_id=` are tied to the run (their events carry it), which they
    may be only while the run is IN_PROGRESS (Port's rule)."""
    status = await tx.fetchval(
        "SELECT status FROM action_runs WHERE org_id = $1 AND id = $2", tx.org_id, run_id
    )
    if status is None:
        raise Invalid(f"Run {run_id!r} was not found", code="run_not_found")
    if status != "IN_PROGRESS":
        raise Invalid(
            f"Run {run_id!r} is {status}: changes are tied to a run only while it is IN_PROGRESS",
            code="run_not_in_progress",
        )


async def write(
    tx: Tx,
    blueprint_id: str,
    raws: list[Any],
    flags: WriteFlags,
    writer: Writer,
) -> list[Outcome]:
    """Create / upsert / merge entities of one blueprint. Per-item problems come back as
    the item's error (the caller decides 4xx vs 207); nothing is written for a failed item.

    The blueprint definition is the one last read by this process; the first read of the
    entities checks its version in the same statement and starts again from the committed
    definition when it changed (after two changes in a row, the definition read in this
    transaction is used as is).

    Rows are read without locks first, so an unchanged re-sync takes no row locks and
    writes nothing. Only rows that will change are locked (in identifier order) and
    re-evaluated; new rows are inserted with ON CONFLICT DO NOTHING, and any that a
    concurrent writer created first are re-evaluated against the committed row."""
    if flags.run_id is not None:
        await check_run(tx, flags.run_id)
    for attempt in range(3):
        blueprint = await _definition(tx, blueprint_id, attempt)
        try:
            return await _write(tx, blueprint, raws, flags, writer, checked=attempt < 2)
        except _StaleBlueprint:
            continue
    raise AssertionError("unreachable: the last attempt does not check the version")


async def _write(
    tx: Tx,
    blueprint: dict[str, Any],
    raws: list[Any],
    flags: WriteFlags,
    writer: Writer,
    *,
    checked: bool,
) -> list[Outcome]:
    blueprint_id = blueprint["identifier"]
    validator = validator_for(tx.org_id, blueprint)
    items = [Item(index=i, raw=raw) for i, raw in enumerate(raws)]
    for item in items:
        try:
            _parse(item, blueprint)
            if writer.drop_undeclared and item.properties:
                item.properties = {
                    k: v for k, v in item.properties.items() if k in validator.declared
                }
        except PortolanError as exc:
            item.error = exc
    # Identifiers, relation targets and teams given as search queries: found now, in this
    # transaction, with what the writer may read.
    await entity_queries.resolve(tx, blueprint, items, writer)
    seen: set[str] = set()
    for item in items:
        if item.error is not None:
            continue
        if item.identifier in seen:
            item.error = Invalid(
                f"Entity {item.identifier!r} appears more than once in the request"
            )
        seen.add(item.identifier)
    live = sorted((i for i in items if i.error is None), key=lambda i: i.identifier)
    # Small writes lock at once (one read); large ones read unlocked first so that an
    # unchanged re-sync locks and writes nothing.
    lock_first = len(live) <= _LOCK_AT_ONCE and not flags.validation_only
    keys = [i.identifier for i in live]
    if checked:
        existing = await _load_checked(tx, blueprint, keys, lock=lock_first)
    else:
        existing = await _load_existing(tx, blueprint_id, keys, lock=lock_first)
    _evaluate(live, existing, blueprint, validator, flags)
    await _guard(tx, blueprint, live, writer)
    pending = [i for i in live if i.error is None and i.changed]
    if flags.validation_only:
        await _resolve_targets(tx, blueprint, pending, flags, writer)
        now = datetime.now(UTC)
        for item in live:
            item.state["at"] = now
    for _ in range(3):
        if flags.validation_only or not pending:
            break
        if not lock_first:
            # Lock what will change and look again: another writer may have been first.
            stale = [i for i in pending if i.before is not None]
            locked = await _load_existing(
                tx, blueprint_id, [i.identifier for i in stale], lock=True
            )
            _evaluate(stale, locked, blueprint, validator, flags)
            await _guard(tx, blueprint, stale, writer)
            pending = [i for i in pending if i.error is None and i.changed]
        lock_first = False
        await _resolve_targets(tx, blueprint, pending, flags, writer)
        pending = [i for i in pending if i.error is None]
        lost = await _persist(tx, blueprint_id, pending, flags, writer)
        if not lost:
            break
        # Created by a concurrent writer since we looked: evaluate against that row.
        fresh = await _load_existing(tx, blueprint_id, [i.identifier for i in lost], lock=True)
        _evaluate(lost, fresh, blueprint, validator, flags)
        await _guard(tx, blueprint, lost, writer)
        pending = [i for i in lost if i.error is None and i.changed]
    if not flags.validation_only:
        written = [i.identifier for i in items if i.error is None and i.changed]
        if written:
            await reactions.emit(tx, reactions.EntitiesWritten(blueprint, written))
    results = {i.index: i for i in items}
    outcomes: list[Outcome] = []
    for index in range(len(items)):
        item = results[index]
        if item.error is not None:
            outcomes.append(Outcome(index, item.identifier or "unknown", False, None, item.error))
            continue
        state = dict(item.before or {}) if not item.changed else dict(item.state)
        if item.changed:
            previous = item.before or {}
            state.update(
                identifier=item.identifier,
                createdAt=previous.get("createdAt", item.state.get("at")),
                createdBy=previous.get("createdBy", writer.actor),
                updatedAt=item.state.get("at"),
                updatedBy=writer.actor,
            )
        outcomes.append(
            Outcome(
                index,
                item.identifier,
                item.created,
                to_api(blueprint, state),
                None,
                changed=item.changed,
            )
        )
    return outcomes


def _evaluate(
    items: list[Item],
    existing: dict[str, dict[str, Any]],
    blueprint: dict[str, Any],
    validator: EntityValidator,
    flags: WriteFlags,
) -> None:
    """Compute each item's new state against `existing` and check it."""
    for item in items:
        current = existing.get(item.identifier)
        item.error = None
        try:
            if current is not None and not flags.upsert:
                raise Conflict(
                    f"Entity {item.identifier!r} already exists in blueprint "
                    f"{blueprint['identifier']!r} (use upsert=true to update it)"
                )
            if current is None and (flags.must_exist or (flags.merge and not flags.upsert)):
                raise NotFound(
                    f"Entity {item.identifier!r} of blueprint {blueprint['identifier']!r} "
                    "was not found"
                )
            item.state = _state(item, current, flags.merge)
            validator.check(item.state["properties"])
            _check_required_relations(blueprint, item.state["relations"])
            item.created = current is None
            item.changed = current is None or not _same(item.state, current)
            item.before = current
        except PortolanError as exc:
            item.error = exc


async def _guard(tx: Tx, blueprint: dict[str, Any], items: list[Item], writer: Writer) -> None:
    """Refuse the changes the writer may not make (each item keeps its own 403)."""
    if writer.guard is None:
        return
    changes = [
        EntityChange(i.index, i.identifier, i.before, i.state)
        for i in items
        if i.error is None and i.changed
    ]
    refused = await writer.guard.check(tx, blueprint, changes)
    for item in items:
        denied = refused.get(item.index)
        if denied is not None:
            item.error = denied


def _check_required_relations(blueprint: dict[str, Any], relations: dict[str, Any]) -> None:
    missing = [
        name
        for name, definition in blueprint["relations"].items()
        if definition["required"] and not relations.get(name)
    ]
    if missing:
        raise Invalid(
            f"Required relation(s) missing: {', '.join(missing)}",
            details=[{"pointer": f"/relations/{m}", "message": "required"} for m in missing],
        )


async def _resolve_targets(
    tx: Tx, blueprint: dict[str, Any], items: list[Item], flags: WriteFlags, writer: Writer
) -> None:
    """Every linked entity must exist (or be created when the caller asks for it). Links the
    entity already has are not looked up again: their foreign keys vouch for the targets."""
    wanted: dict[str, set[str]] = {}
    first_of: dict[tuple[str, str], int] = {}  # the first item naming each target
    for item in sorted(items, key=lambda i: i.index):  # in the request's order
        linked = (item.before or {}).get("relations", {}) if not item.created else {}
        for name, targets in item.state["relations"].items():
            fresh = set(targets) - set(linked.get(name, []))
            if fresh:
                target_bp = blueprint["relations"][name]["target"]
                wanted.setdefault(target_bp, set()).update(fresh)
                for ident in fresh:
                    first_of.setdefault((target_bp, ident), item.index)
    pairs = [(bp, ident) for bp, idents in sorted(wanted.items()) for ident in sorted(idents)]
    if not pairs:
        return
    # FOR KEY SHARE: a target deleted by a concurrent transaction is waited for and then
    # missing here (a per-item 404), instead of failing the links' foreign key later and
    # with it the whole request; and one found stays until this transaction ends. The lock
    # does not conflict with other writers' updates of the targets (FOR NO KEY UPDATE).
    rows = await tx.fetch(
        "SELECT e.blueprint, e.identifier FROM entities e "
        "JOIN unnest($2::varchar[], $3::varchar[]) AS w(bp, ident) "
        "ON e.blueprint = w.bp AND e.identifier = w.ident WHERE e.org_id = $1 "
        "ORDER BY e.blueprint, e.identifier FOR KEY SHARE OF e",
        tx.org_id,
        [p[0] for p in pairs],
        [p[1] for p in pairs],
    )
    present = {(r["blueprint"], r["identifier"]) for r in rows}
    # Entities of this same request satisfy links to their own blueprint.
    present |= {(blueprint["identifier"], i.identifier) for i in items}
    missing: dict[str, set[str]] = {}
    for target_bp, ident in pairs:
        if (target_bp, ident) in present:
            continue
        missing.setdefault(target_bp, set()).add(ident)
    if not missing:
        return
    if flags.create_missing_related_entities:
        for target_bp, idents in sorted(missing.items()):
            bare = [{"identifier": ident} for ident in sorted(idents)]
            sub = WriteFlags(
                upsert=True, merge=True, validation_only=flags.validation_only, run_id=flags.run_id
            )
            # Each created entity's event names the webhook event of the item naming it.
            events = [writer.event_of(first_of[(target_bp, ident)]) for ident in sorted(idents)]
            by_target = replace(writer, webhook_events=events) if writer.webhook_events else writer
            outcomes = await write(tx, target_bp, bare, sub, by_target)
            failed = {o.identifier: o.error.message for o in outcomes if o.error is not None}
            if failed:
                for item in items:
                    for name, targets in item.state["relations"].items():
                        if blueprint["relations"][name]["target"] == target_bp:
                            bad = [t for t in targets if t in failed]
                            if bad and item.error is None:
                                item.error = Invalid(
                                    f"Could not create related entity {bad[0]!r} of "
                                    f"{target_bp!r}: {failed[bad[0]]}"
                                )
        return
    for item in items:
        for name, targets in item.state["relations"].items():
            target_bp = blueprint["relations"][name]["target"]
            absent = sorted(set(targets) & missing.get(target_bp, set()))
            if absent and item.error is None:
                item.error = NotFound(
                    f"Related entity {absent[0]!r} of blueprint {target_bp!r} (relation "
                    f"{name!r}) was not found; create it first or pass "
                    "create_missing_related_entities=true"
                )


async def _persist(
    tx: Tx, blueprint: str, items: list[Item], flags: WriteFlags, writer: Writer
) -> list[Item]:
    """Write the changed items, their link changes and their events in one statement;
    returns the new ones a concurrent writer created first (nothing was written for those).

    Only the links that changed are touched, so the DELETE and the INSERT never meet the
    same row. Links and events are kept only for rows the statement really wrote, so a new
    entity that lost its race leaves no trace."""
    if not items:
        return []
    new = [i for i in items if i.created]
    updated = [i for i in items if not i.created]
    removed: list[tuple[str, str, str]] = []
    added: list[tuple[str, str, str]] = []
    for item in items:
        before = (item.before or {}).get("relations", {}) if not item.created else {}
        after = item.state["relations"]
        for name in sorted(set(before) | set(after)):
            was, now = set(before.get(name, [])), set(after.get(name, []))
            removed += [(item.identifier, name, t) for t in sorted(was - now)]
            added += [(item.identifier, name, t) for t in sorted(now - was)]
    rows = await tx.fetch(
        """
        WITH inserted AS (
            INSERT INTO entities (org_id, blueprint, identifier, title, icon, team, properties,
                                  datasource, created_by, updated_by)
            SELECT $1, $2, u.identifier, u.title, u.icon,
                   ARRAY(SELECT jsonb_array_elements_text(u.team::jsonb)), u.properties,
                   $3, $4, $4
            FROM unnest($5::varchar[], $6::varchar[], $7::varchar[], $8::varchar[], $9::jsonb[])
                 AS u(identifier, title, icon, team, properties)
            ORDER BY u.identifier
            ON CONFLICT (org_id, blueprint, identifier) DO NOTHING
            RETURNING identifier, created_at, updated_at
        ), updated AS (
            UPDATE entities AS e
               SET title = u.title, icon = u.icon,
                   team = ARRAY(SELECT jsonb_array_elements_text(u.team::jsonb)),
                   properties = u.properties, datasource = $3, updated_at = now(),
                   updated_by = $4
            FROM unnest($10::varchar[], $11::varchar[], $12::varchar[], $13::varchar[],
                        $14::jsonb[]) AS u(identifier, title, icon, team, properties)
            WHERE e.org_id = $1 AND e.blueprint = $2 AND e.identifier = u.identifier
            RETURNING e.identifier, e.created_at, e.updated_at
        ), written AS (
            SELECT identifier, created_at, updated_at, true AS created FROM inserted
            UNION ALL
            SELECT identifier, created_at, updated_at, false FROM updated
        ), unlinked AS (
            DELETE FROM entity_relations er
            USING unnest($15::varchar[], $16::varchar[], $17::varchar[])
                  AS d(source, relation, target)
            WHERE er.org_id = $1 AND er.source_blueprint = $2 AND er.source_identifier = d.source
              AND er.relation = d.relation AND er.target_identifier = d.target
            RETURNING 1
        ), linked AS (
            INSERT INTO entity_relations (org_id, source_blueprint, source_identifier, relation,
                                          target_identifier, target_blueprint)
            SELECT $1, $2, l.source, l.relation, l.target, br.target
            FROM unnest($18::varchar[], $19::varchar[], $20::varchar[])
                 AS l(source, relation, target)
            JOIN written w ON w.identifier = l.source
            JOIN blueprint_relations br
              ON br.org_id = $1 AND br.blueprint = $2 AND br.relation = l.relation
            RETURNING 1
        ), logged AS (
            INSERT INTO entity_events (org_id, blueprint, identifier, action, before, after,
                                       actor, origin, run_id, installation, webhook_event)
            SELECT $1, $2, ev.identifier, ev.action, ev.before, ev.after, $21, $22, $23, $28,
                   ev.webhook_event
            FROM unnest($24::varchar[], $25::varchar[], $26::jsonb[], $27::jsonb[],
                        $29::varchar[])
                 AS ev(identifier, action, before, after, webhook_event)
            JOIN written w ON w.identifier = ev.identifier
            RETURNING 1
        )
        SELECT w.identifier, w.created_at, w.updated_at, w.created,
               (SELECT count(*) FROM unlinked) AS unlinked,
               (SELECT count(*) FROM linked) AS linked,
               (SELECT count(*) FROM logged) AS logged
        FROM written w
        """,
        tx.org_id,
        blueprint,
        writer.datasource,
        writer.actor,
        *_columns(new),
        *_columns(updated),
        [r[0] for r in removed],
        [r[1] for r in removed],
        [r[2] for r in removed],
        [a[0] for a in added],
        [a[1] for a in added],
        [a[2] for a in added],
        writer.actor,
        writer.origin,
        flags.run_id,
        [i.identifier for i in items],
        ["CREATE" if i.created else "UPDATE" for i in items],
        [_event_doc(blueprint, i.before) for i in items],
        [_event_doc(blueprint, {**i.state, "identifier": i.identifier}) for i in items],
        writer.installation,
        [writer.event_of(i.index) for i in items],
    )
    stamps = {r["identifier"]: r for r in rows}
    lost: list[Item] = []
    for item in items:
        stamp = stamps.get(item.identifier)
        if stamp is None:
            lost.append(item)  # only a new row can lose: updated rows are locked
            continue
        item.state["at"] = stamp["updated_at"]
        item.state["createdAt"] = stamp["created_at"]
    return lost


def _columns(items: list[Item]) -> list[Any]:
    return [
        [i.identifier for i in items],
        [i.state["title"] for i in items],
        [i.state["icon"] for i in items],
        # As JSON text: asyncpg would read a list of lists as a 2-D array.
        [json.dumps(i.state["team"]) for i in items],
        [i.state["properties"] for i in items],
    ]


async def delete_many(
    tx: Tx,
    blueprint_id: str,
    identifiers: list[str],
    *,
    delete_dependents: bool,
    writer: Writer,
    run_id: str | None = None,
) -> list[str]:
    """Delete entities; those that others need through a required relation are refused
    (409) unless `delete_dependents`, which deletes the dependents too, recursively."""
    if run_id is not None:
        await check_run(tx, run_id)
    await bp_service.get_with_version(tx, blueprint_id)
    existing = await _load_existing(
        tx, blueprint_id, sorted(set(identifiers)), lock=True, deleting=True
    )
    if not existing:
        return []
    doomed: dict[tuple[str, str], dict[str, Any]] = {
        (blueprint_id, ident): state for ident, state in existing.items()
    }
    frontier = [(blueprint_id, ident) for ident in existing]
    while frontier:
        dependents = await tx.fetch(
            """
            SELECT er.source_blueprint, er.source_identifier, er.relation,
                   er.target_blueprint, er.target_identifier
            FROM entity_relations er
            JOIN blueprint_relations br ON br.org_id = er.org_id
                 AND br.blueprint = er.source_blueprint AND br.relation = er.relation
            JOIN unnest($2::varchar[], $3::varchar[]) AS t(bp, ident)
                 ON er.target_blueprint = t.bp AND er.target_identifier = t.ident
            WHERE er.org_id = $1 AND br.required
            """,
            tx.org_id,
            [f[0] for f in frontier],
            [f[1] for f in frontier],
        )
        frontier = []
        for dep in dependents:
            key = (dep["source_blueprint"], dep["source_identifier"])
            if key in doomed:
                continue
            if not delete_dependents:
                raise Conflict(
                    f"Entity {dep['target_identifier']!r} is required by "
                    f"{dep['source_blueprint']}/{dep['source_identifier']} (relation "
                    f"{dep['relation']!r}); pass delete_dependents=true to delete it too",
                    details={"dependents": [dict(d) for d in dependents]},
                )
            doomed[key] = {}
            frontier.append(key)
    # Load the dependents' states (for their events) in one pass per blueprint.
    by_bp: dict[str, list[str]] = {}
    for bp, ident in doomed:
        by_bp.setdefault(bp, []).append(ident)
    for bp, idents in sorted(by_bp.items()):
        if bp != blueprint_id:
            loaded = await _load_existing(tx, bp, sorted(idents), lock=True, deleting=True)
            for ident, state in loaded.items():
                doomed[(bp, ident)] = state
        if writer.guard is not None:
            definition = await bp_service.get(tx, bp)
            changes = [
                EntityChange(n, ident, doomed[(bp, ident)], None)
                for n, ident in enumerate(sorted(idents))
            ]
            refused = await writer.guard.check(tx, definition, changes)
            if refused:
                raise refused[min(refused)]
    for bp, idents in sorted(by_bp.items()):
        await _log_deletions(
            tx,
            bp,
            sorted(idents),
            [_event_doc(bp, doomed[(bp, ident)] or None) for ident in sorted(idents)],
            writer,
            run_id,
        )
        await tx.execute(
            "DELETE FROM entities WHERE org_id = $1 AND blueprint = $2 "
            "AND identifier = ANY($3::varchar[])",
            tx.org_id,
            bp,
            sorted(idents),
        )
        await reactions.emit(tx, reactions.EntitiesDeleted(bp, sorted(idents)))
    return sorted(existing)


# Rows of deletion events per statement on Citus (two parameters each).
_CITUS_EVENT_ROWS = 500


async def _log_deletions(
    tx: Tx,
    blueprint: str,
    identifiers: list[str],
    befores: list[Any],
    writer: Writer,
    run_id: str | None,
) -> None:
    """The DELETE events of `identifiers` (their documents before, in `befores`)."""
    if not tx.citus:
        await tx.execute(
            """
            INSERT INTO entity_events (org_id, blueprint, identifier, action, before, after,
                                       actor, origin, run_id, installation,
                                       webhook_event)
            SELECT $1, $2, d.identifier, 'DELETE', d.before, NULL, $3, $4, $5, $8, $9
            FROM unnest($6::varchar[], $7::jsonb[]) AS d(identifier, before)
            """,
            tx.org_id,
            blueprint,
            writer.actor,
            writer.origin,
            run_id,
            identifiers,
            befores,
            writer.installation,
            writer.webhook_event,
        )
        return
    # Citus cannot push `INSERT ... SELECT ... FROM unnest(...)` down to a shard: it pulls
    # the rows to the coordinator and copies them in, and COPY FROM is refused under
    # row-level security. (Selecting them from `entities` does not route either: the
    # table's identity and transaction-id defaults are volatile, which Citus keeps out of a
    # pushed-down INSERT ... SELECT.) A multi-row VALUES list naming the org is a router
    # plan on the org's shard.
    for start in range(0, len(identifiers), _CITUS_EVENT_ROWS):
        chunk = range(start, min(start + _CITUS_EVENT_ROWS, len(identifiers)))
        rows = ", ".join(
            f"($1, $2, ${8 + 2 * n}, 'DELETE', ${9 + 2 * n}::jsonb, NULL, $3, $4, $5, $6, $7)"
            for n in range(len(chunk))
        )
        values: list[Any] = []
        for i in chunk:
            values += [identifiers[i], befores[i]]
        await tx.execute(
            "INSERT INTO entity_events (org_id, blueprint, identifier, action, before, after,"  # noqa: S608 - placeholders only
            f" actor, origin, run_id, installation, webhook_event) VALUES {rows}",
            tx.org_id,
            blueprint,
            writer.actor,
            writer.origin,
            run_id,
            writer.installation,
            writer.webhook_event,
            *values,
        )


async def count(tx: Tx, blueprint_id: str) -> int:
    await bp_service.get_with_version(tx, blueprint_id)
    return int(
        await tx.fetchval(
            "SELECT count(*) FROM entities WHERE org_id = $1 AND blueprint = $2",
            tx.org_id,
            blueprint_id,
        )
    )


class FieldFilter:
    """Port's `include` / `exclude` query keys: top-level fields or `properties.<name>` /
    `relations.<name>`."""

    def __init__(self, include: list[str], exclude: list[str]) -> None:
        self.include = include
        self.exclude = exclude

    def apply(self, entity: dict[str, Any]) -> dict[str, Any]:
        out = entity
        if self.include:
            out = {}
            for path in self.include:
                head, _, tail = path.partition(".")
                if head not in entity:
                    continue
                if tail and isinstance(entity[head], dict):
                    if tail in entity[head]:
                        out.setdefault(head, {})[tail] = entity[head][tail]
                else:
                    out[head] = entity[head]
        if self.exclude:
            out = dict(out)
            for path in self.exclude:
                head, _, tail = path.partition(".")
                if tail and isinstance(out.get(head), dict):
                    out[head] = {k: v for k, v in out[head].items() if k != tail}
                else:
                    out.pop(head, None)
        return out
