"""Blueprint service: define, change and remove blueprints (no HTTP, never commits)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

import asyncpg

from app.catalog import validation as v
from app.db.database import Tx
from app.kit import reactions
from app.kit.errors import Conflict, Invalid, NotFound

# Columns read back for a blueprint, in the API's shape.
_SELECT = """
SELECT identifier, title, icon, description, schema, relations, mirror_properties,
       calculation_properties, aggregation_properties, ownership, team_inheritance,
       changelog_destination, version, created_at, created_by, updated_at, updated_by
FROM blueprints
"""

DEFINITION_KEYS = (
    "identifier",
    "title",
    "icon",
    "description",
    "schema",
    "relations",
    "mirrorProperties",
    "calculationProperties",
    "aggregationProperties",
    "ownership",
    "teamInheritance",
    "changelogDestination",
)


def to_api(row: asyncpg.Record) -> dict[str, Any]:
    out = {
        "identifier": row["identifier"],
        "title": row["title"],
        "icon": row["icon"],
        "description": row["description"],
        "schema": row["schema"],
        "relations": row["relations"],
        "mirrorProperties": row["mirror_properties"],
        "calculationProperties": row["calculation_properties"],
        "aggregationProperties": row["aggregation_properties"],
        "createdAt": row["created_at"],
        "createdBy": row["created_by"],
        "updatedAt": row["updated_at"],
        "updatedBy": row["updated_by"],
    }
    for key, column in (
        ("ownership", "ownership"),
        ("teamInheritance", "team_inheritance"),
        ("changelogDestination", "changelog_destination"),
    ):
        if row[column] is not None:
            out[key] = row[column]
    return out


def normalise(definition: dict[str, Any]) -> dict[str, Any]:
    """Check a whole definition; returns it with defaults filled in, or raises one 422
    listing every problem by JSON pointer."""
    problems = v.Problems()
    bad = v.first_unstorable(definition)
    if bad is not None:
        problems.add(bad, v.UNSTORABLE_TEXT)
        problems.raise_if_any("The blueprint is invalid")
    identifier = definition.get("identifier")
    if not isinstance(identifier, str) or not v.valid_blueprint_identifier(identifier):
        problems.add(
            "/identifier",
            "identifier must be 1-100 letters, digits or @_.+:\\/- (not '.' or '..')",
        )
    schema = definition.get("schema")
    v.check_schema(schema, problems)
    relations = v.check_relations(definition.get("relations") or {}, problems)
    mirrors = definition.get("mirrorProperties") or {}
    v.check_mirror_properties(mirrors, relations, problems)
    calcs = definition.get("calculationProperties") or {}
    v.check_calculation_properties(calcs, problems)
    aggs = definition.get("aggregationProperties") or {}
    v.check_aggregation_properties(aggs, problems)
    v.check_ownership(definition.get("ownership"), relations, problems)
    v.check_changelog_destination(definition.get("changelogDestination"), problems)
    if isinstance(schema, dict):
        declared = set((schema.get("properties") or {}).keys())
        for section, names in (
            ("relations", relations),
            ("mirrorProperties", mirrors),
            ("calculationProperties", calcs),
            ("aggregationProperties", aggs),
        ):
            for name in names if isinstance(names, dict) else {}:
                if name in declared:
                    problems.add(f"/{section}/{name}", "clashes with a schema property")
    problems.raise_if_any("The blueprint is invalid")
    assert isinstance(schema, dict)
    return {
        "identifier": identifier,
        "title": definition.get("title"),
        "icon": definition.get("icon"),
        "description": definition.get("description"),
        "schema": {
            "properties": schema.get("properties", {}),
            "required": schema.get("required", []),
        },
        "relations": relations,
        "mirrorProperties": mirrors,
        "calculationProperties": calcs,
        "aggregationProperties": aggs,
        "ownership": definition.get("ownership"),
        "teamInheritance": definition.get("teamInheritance"),
        "changelogDestination": definition.get("changelogDestination") or None,
    }


async def get_row(tx: Tx, identifier: str, *, lock: bool = False) -> asyncpg.Record:
    row = await tx.fetchrow(
        _SELECT + " WHERE org_id = $1 AND identifier = $2" + (" FOR UPDATE" if lock else ""),
        tx.org_id,
        identifier,
    )
    if row is None:
        raise NotFound(f"Blueprint {identifier!r} was not found")
    return row


async def get(tx: Tx, identifier: str) -> dict[str, Any]:
    return to_api(await get_row(tx, identifier))


Version = tuple[datetime, int]


def version_of(row: asyncpg.Record) -> Version:
    """A blueprint's version token: its creation time with its change counter, so that a
    blueprint deleted and created again under the same identifier never matches anything
    remembered of the old one."""
    return (row["created_at"], int(row["version"]))


async def get_with_version(tx: Tx, identifier: str) -> dict[str, Any]:
    """The blueprint plus its version token (the key of everything derived from it)."""
    row = await get_row(tx, identifier)
    found = {**to_api(row), "version": version_of(row)}
    _remember(tx.org_id, found)
    return found


# Blueprint definitions as last read, per (org, identifier): entity writes start from the
# remembered one and check its version in the same statement that reads the entities (see
# entities.write), so a definition changed by any process is never used.
_DEFINITIONS_SIZE = 1024
_definitions: OrderedDict[tuple[UUID | None, str], dict[str, Any]] = OrderedDict()


def remembered(org_id: UUID | None, identifier: str) -> dict[str, Any] | None:
    found = _definitions.get((org_id, identifier))
    if found is not None:
        _definitions.move_to_end((org_id, identifier))
    return found


def _remember(org_id: UUID | None, blueprint: dict[str, Any]) -> None:
    _definitions[(org_id, blueprint["identifier"])] = blueprint
    _definitions.move_to_end((org_id, blueprint["identifier"]))
    if len(_definitions) > _DEFINITIONS_SIZE:
        _definitions.popitem(last=False)


def forget(org_id: UUID | None, identifier: str) -> None:
    _definitions.pop((org_id, identifier), None)


async def list_all(tx: Tx) -> list[dict[str, Any]]:
    rows = await tx.fetch(_SELECT + " WHERE org_id = $1 ORDER BY identifier", tx.org_id)
    return [to_api(r) for r in rows]


async def _check_targets(tx: Tx, identifier: str, definition: dict[str, Any]) -> None:
    wanted = {r["target"] for r in definition["relations"].values()}
    wanted |= {a["target"] for a in definition["aggregationProperties"].values()}
    wanted.discard(identifier)
    if not wanted:
        return
    found = {
        r["identifier"]
        for r in await tx.fetch(
            "SELECT identifier FROM blueprints WHERE org_id = $1 AND identifier = ANY($2)",
            tx.org_id,
            sorted(wanted),
        )
    }
    missing = sorted(wanted - found)
    if missing:
        problems = v.Problems()
        for section in ("relations", "aggregationProperties"):
            for name, item in definition[section].items():
                if item["target"] in missing:
                    problems.add(
                        f"/{section}/{name}/target", f"blueprint {item['target']!r} does not exist"
                    )
        problems.raise_if_any("The blueprint is invalid")


_META_LEAVES = {
    "$identifier",
    "$title",
    "$icon",
    "$team",
    "$blueprint",
    "$createdAt",
    "$updatedAt",
    "$createdBy",
    "$updatedBy",
    "$datasource",
}


async def _check_paths(tx: Tx, identifier: str, definition: dict[str, Any]) -> None:
    """Every hop of a mirror property's path (and of inherited ownership) is a relation of
    the blueprint reached so far, and a mirror ends on a property or meta-property of the
    last one. (The first hop is checked with the rest of the definition.)"""
    paths = [
        (f"/mirrorProperties/{name}/path", str(m.get("path", "")), True)
        for name, m in definition["mirrorProperties"].items()
    ]
    ownership = definition.get("ownership") or {}
    if ownership.get("type") == "Inherited":
        paths.append(("/ownership/path", str(ownership.get("path", "")), False))
    if not paths:
        return
    known = {bp["identifier"]: bp for bp in await list_all(tx)}
    known[identifier] = definition
    problems = v.Problems()
    for pointer, path, leafed in paths:
        hops = path.split(".")
        leaf = hops.pop() if leafed else None
        current = identifier
        for hop in hops:
            relation = (known.get(current) or {}).get("relations", {}).get(hop)
            if relation is None:
                problems.add(pointer, f"{hop!r} is not a relation of blueprint {current!r}")
                break
            current = relation["target"]
        else:
            properties = (known.get(current) or {}).get("schema", {}).get("properties", {})
            if leaf is not None and leaf not in properties and leaf not in _META_LEAVES:
                problems.add(pointer, f"{leaf!r} is not a property or meta-property of {current!r}")
    problems.raise_if_any("The blueprint is invalid")


async def _write_relations(tx: Tx, identifier: str, relations: dict[str, Any]) -> None:
    """Make the blueprint's relation rows match `relations`. Rows of relations that remain
    are updated in place: deleting them would cascade to every entity link they carry."""
    await tx.execute(
        "DELETE FROM blueprint_relations WHERE org_id = $1 AND blueprint = $2 "
        "AND NOT (relation = ANY($3::varchar[]))",
        tx.org_id,
        identifier,
        sorted(relations),
    )
    if relations:
        await tx.executemany(
            "INSERT INTO blueprint_relations (org_id, blueprint, relation, target, many, required) "
            "VALUES ($1, $2, $3, $4, $5, $6) "
            "ON CONFLICT (org_id, blueprint, relation) DO UPDATE "
            "SET target = excluded.target, many = excluded.many, required = excluded.required",
            [
                (tx.org_id, identifier, name, rel["target"], rel["many"], rel["required"])
                for name, rel in relations.items()
            ],
        )


def _row_values(definition: dict[str, Any]) -> list[Any]:
    return [
        definition["title"],
        definition["icon"],
        definition["description"],
        definition["schema"],
        definition["relations"],
        definition["mirrorProperties"],
        definition["calculationProperties"],
        definition["aggregationProperties"],
        definition["ownership"],
        definition["teamInheritance"],
        definition["changelogDestination"],
    ]


async def create(tx: Tx, actor: str, body: dict[str, Any]) -> dict[str, Any]:
    definition = normalise(body)
    identifier = definition["identifier"]
    await _check_targets(tx, identifier, definition)
    await _check_paths(tx, identifier, definition)
    row = await tx.fetchrow(
        "INSERT INTO blueprints (org_id, identifier, title, icon, description, schema, relations, "
        "mirror_properties, calculation_properties, aggregation_properties, ownership, "
        "team_inheritance, changelog_destination, created_by, updated_by) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $14) "
        "ON CONFLICT (org_id, identifier) DO NOTHING RETURNING identifier",
        tx.org_id,
        identifier,
        *_row_values(definition),
        actor,
    )
    if row is None:
        raise Conflict(f"A blueprint with identifier {identifier!r} already exists")
    await _write_relations(tx, identifier, definition["relations"])
    return await get(tx, identifier)


def _check_compatible(current: dict[str, Any], new: dict[str, Any]) -> None:
    """A property's type cannot change in place: existing entities hold the old type."""
    problems = v.Problems()
    old_props = current["schema"].get("properties", {})
    for name, prop in new["schema"].get("properties", {}).items():
        old = old_props.get(name)
        if old is None:
            continue
        before = (old.get("type"), (old.get("items") or {}).get("type"))
        after = (prop.get("type"), (prop.get("items") or {}).get("type"))
        if before != after:
            problems.add(
                f"/schema/properties/{name}/type",
                f"cannot change the type of {name!r} from {_type_label(before)} to "
                f"{_type_label(after)} in place: add a new property with the new type, copy "
                "the values over with a data migration (POST /v1/migrations with a jq "
                "mapping; try it with dryRun first), remove the old property, then rename "
                f"the new one (PATCH /v1/blueprints/{{bp}}/properties/<new>/rename)",
            )
    problems.raise_if_any("Incompatible blueprint change")


def _type_label(pair: tuple[Any, Any]) -> str:
    return f"array of {pair[1]}" if pair[0] == "array" and pair[1] else str(pair[0])


async def replace(tx: Tx, actor: str, identifier: str, body: dict[str, Any]) -> dict[str, Any]:
    current = to_api(await get_row(tx, identifier, lock=True))
    v.check_url_identifier(body, identifier)
    definition = normalise({**body, "identifier": identifier})
    _check_compatible(current, definition)
    await _check_targets(tx, identifier, definition)
    await _check_paths(tx, identifier, definition)
    await _check_existing_entities(tx, identifier, current, definition)
    await tx.execute(
        "UPDATE blueprints SET title = $3, icon = $4, description = $5, schema = $6, "
        "relations = $7, mirror_properties = $8, calculation_properties = $9, "
        "aggregation_properties = $10, ownership = $11, team_inheritance = $12, "
        "changelog_destination = $13, version = version + 1, updated_at = now(), "
        "updated_by = $14 WHERE org_id = $1 AND identifier = $2",
        tx.org_id,
        identifier,
        *_row_values(definition),
        actor,
    )
    await _changed(tx, identifier)
    unrelated = tuple(sorted(set(current["relations"]) - set(definition["relations"])))
    await _write_relations(tx, identifier, definition["relations"])
    if unrelated:  # their links went with them
        await reactions.emit(tx, reactions.NamesChanged(identifier, "relation", removed=unrelated))
    removed = sorted(
        set(current["schema"].get("properties", {})) - set(definition["schema"]["properties"])
    )
    if removed:
        # A property taken off the schema takes its values with it, as in Port.
        await tx.execute(
            "UPDATE entities SET properties = properties - $3::text[] "
            "WHERE org_id = $1 AND blueprint = $2 AND properties ?| $3::text[]",
            tx.org_id,
            identifier,
            removed,
        )
        await reactions.emit(
            tx, reactions.NamesChanged(identifier, "property", removed=tuple(removed))
        )
    return await get(tx, identifier)


async def _check_existing_entities(
    tx: Tx, identifier: str, current: dict[str, Any], new: dict[str, Any]
) -> None:
    """Refuse changes the blueprint's existing entities could not satisfy."""
    problems = v.Problems()
    old_required = set(current["schema"].get("required", []))
    for name in sorted(set(new["schema"].get("required", [])) - old_required):
        lacking = await tx.fetchval(
            "SELECT count(*) FROM entities WHERE org_id = $1 AND blueprint = $2 "
            "AND NOT properties ? $3",
            tx.org_id,
            identifier,
            name,
        )
        if lacking:
            problems.add(
                "/schema/required",
                f"{lacking} existing entities have no {name!r}: set it on them first",
            )
    for name, rel in new["relations"].items():
        old = current["relations"].get(name)
        if old is None:
            if rel["required"]:
                lacking = await tx.fetchval(
                    "SELECT count(*) FROM entities WHERE org_id = $1 AND blueprint = $2",
                    tx.org_id,
                    identifier,
                )
                if lacking:
                    problems.add(
                        f"/relations/{name}/required",
                        f"a new relation cannot be required while {lacking} entities exist",
                    )
            continue
        links = await tx.fetchrow(
            "SELECT count(*) AS links, count(DISTINCT source_identifier) AS sources, "
            "(SELECT count(*) FROM entities e WHERE e.org_id = $1 AND e.blueprint = $2 "
            " AND NOT EXISTS (SELECT 1 FROM entity_relations x WHERE x.org_id = $1 "
            "   AND x.source_blueprint = $2 AND x.source_identifier = e.identifier "
            "   AND x.relation = $3)) AS unlinked "
            "FROM entity_relations WHERE org_id = $1 AND source_blueprint = $2 AND relation = $3",
            tx.org_id,
            identifier,
            name,
        )
        assert links is not None
        if rel["target"] != old["target"] and links["links"]:
            problems.add(
                f"/relations/{name}/target",
                f"{links['links']} links point at {old['target']!r} entities: remove them, "
                "or add a new relation, before changing the target",
            )
        if old["many"] and not rel["many"] and links["links"] > links["sources"]:
            problems.add(
                f"/relations/{name}/many",
                "some entities link to several targets through this relation",
            )
        if rel["required"] and not old["required"] and links["unlinked"]:
            problems.add(
                f"/relations/{name}/required",
                f"{links['unlinked']} entities have no {name!r} link yet",
            )
    problems.raise_if_any("The change does not fit the blueprint's existing entities")


async def rename_property(
    tx: Tx, actor: str, identifier: str, old: str, new: str
) -> dict[str, Any]:
    current = to_api(await get_row(tx, identifier, lock=True))
    props = current["schema"].get("properties", {})
    if old not in props:
        raise NotFound(f"Property {old!r} is not defined on blueprint {identifier!r}")
    _check_new_name(current, new)
    schema = {
        "properties": {(new if k == old else k): val for k, val in props.items()},
        "required": [new if r == old else r for r in current["schema"].get("required", [])],
    }
    carried = await _carry_rename(tx, actor, Renamed(identifier, "property", old, new))
    own = carried.get(identifier, {})
    await tx.execute(
        "UPDATE blueprints SET schema = $3, mirror_properties = $4, "
        "aggregation_properties = $5, version = version + 1, updated_at = now(), "
        "updated_by = $6 WHERE org_id = $1 AND identifier = $2",
        tx.org_id,
        identifier,
        schema,
        own.get("mirrorProperties", current["mirrorProperties"]),
        own.get("aggregationProperties", current["aggregationProperties"]),
        actor,
    )
    await _changed(tx, identifier)
    await tx.execute(
        "UPDATE entities SET properties = (properties - $3::text) "
        "|| jsonb_build_object($4::text, properties -> $3::text) "
        "WHERE org_id = $1 AND blueprint = $2 AND properties ? $3::text",
        tx.org_id,
        identifier,
        old,
        new,
    )
    await reactions.emit(tx, reactions.NamesChanged(identifier, "property", ((old, new),)))
    return await get(tx, identifier)


async def rename_relation(
    tx: Tx, actor: str, identifier: str, old: str, new: str
) -> dict[str, Any]:
    current = to_api(await get_row(tx, identifier, lock=True))
    if old not in current["relations"]:
        raise NotFound(f"Relation {old!r} is not defined on blueprint {identifier!r}")
    _check_new_name(current, new)
    relations = {(new if k == old else k): val for k, val in current["relations"].items()}
    carried = await _carry_rename(tx, actor, Renamed(identifier, "relation", old, new))
    own = carried.get(identifier, {})
    await tx.execute(
        "UPDATE blueprints SET relations = $3, mirror_properties = $4, ownership = $5, "
        "aggregation_properties = $6, team_inheritance = $7, version = version + 1, "
        "updated_at = now(), updated_by = $8 WHERE org_id = $1 AND identifier = $2",
        tx.org_id,
        identifier,
        relations,
        own.get("mirrorProperties", current["mirrorProperties"]),
        own.get("ownership", current.get("ownership")),
        own.get("aggregationProperties", current["aggregationProperties"]),
        own.get("teamInheritance", current.get("teamInheritance")),
        actor,
    )
    await _changed(tx, identifier)
    definition = current["relations"][old]
    await tx.execute(
        "INSERT INTO blueprint_relations (org_id, blueprint, relation, target, many, required) "
        "VALUES ($1, $2, $3, $4, $5, $6)",
        tx.org_id,
        identifier,
        new,
        definition["target"],
        definition["many"],
        definition["required"],
    )
    await tx.execute(
        "UPDATE entity_relations SET relation = $4 "
        "WHERE org_id = $1 AND source_blueprint = $2 AND relation = $3",
        tx.org_id,
        identifier,
        old,
        new,
    )
    await tx.execute(
        "DELETE FROM blueprint_relations WHERE org_id = $1 AND blueprint = $2 AND relation = $3",
        tx.org_id,
        identifier,
        old,
    )
    await reactions.emit(tx, reactions.NamesChanged(identifier, "relation", ((old, new),)))
    return await get(tx, identifier)


async def rename_mirror(tx: Tx, actor: str, identifier: str, old: str, new: str) -> dict[str, Any]:
    current = to_api(await get_row(tx, identifier, lock=True))
    if old not in current["mirrorProperties"]:
        raise NotFound(f"Mirror property {old!r} is not defined on blueprint {identifier!r}")
    _check_new_name(current, new)
    # Rules of aggregation queries over this blueprint may name the mirror property: they
    # follow (a mirror is never a path's leaf nor a measured property, so nothing else does).
    carried = await _carry_rename(tx, actor, Renamed(identifier, "property", old, new))
    own = carried.get(identifier, {})
    mirrors = {
        (new if k == old else k): val
        for k, val in own.get("mirrorProperties", current["mirrorProperties"]).items()
    }
    await tx.execute(
        "UPDATE blueprints SET mirror_properties = $3, aggregation_properties = $4, "
        "version = version + 1, updated_at = now(), updated_by = $5 "
        "WHERE org_id = $1 AND identifier = $2",
        tx.org_id,
        identifier,
        mirrors,
        own.get("aggregationProperties", current["aggregationProperties"]),
        actor,
    )
    await _changed(tx, identifier)
    return await get(tx, identifier)


async def _changed(tx: Tx, identifier: str) -> None:
    """The blueprint's definition changed: what reads it reacts (its scorecards' results may
    change with values removed or renamed, relations changed)."""
    await reactions.emit(tx, reactions.BlueprintChanged(identifier))


def _check_new_name(current: dict[str, Any], new: str) -> None:
    if not v.valid_key(new):
        raise Invalid("The new identifier must match ^[A-Za-z0-9@_=\\-]+$ (at most 100)")
    taken = (
        set(current["schema"].get("properties", {}))
        | set(current["relations"])
        | set(current["mirrorProperties"])
        | set(current["calculationProperties"])
        | set(current["aggregationProperties"])
    )
    if new in taken:
        raise Conflict(f"{new!r} is already used on blueprint {current['identifier']!r}")


@dataclass(frozen=True, slots=True)
class Renamed:
    """A property or relation of `blueprint` renamed from `old` to `new`."""

    blueprint: str
    kind: Literal["property", "relation"]
    old: str
    new: str


# The parts of a definition that name other blueprints' properties and relations.
_DEPENDENT_KEYS = ("mirrorProperties", "aggregationProperties", "ownership", "teamInheritance")


async def _carry_rename(tx: Tx, actor: str, renamed: Renamed) -> dict[str, dict[str, Any]]:
    """Carry a rename into every definition that names the renamed property or relation:
    mirror property paths (any hop, and the leaf), inherited ownership and team
    inheritance paths, and aggregation properties (the measured property, `measureTimeBy`,
    `pathFilter` paths, and the rules of their `query`), in this blueprint and every
    other one. Other blueprints are updated here (each gets a new version and its
    scorecards are evaluated again); the changed parts of the renamed blueprint itself
    are returned under its identifier for the caller's own update.

    Paths are followed through the definitions as they were before the rename, so a hop
    is renamed only where it is the renamed relation of the renamed blueprint."""
    known = {bp["identifier"]: bp for bp in await list_all(tx)}
    changed: dict[str, dict[str, Any]] = {}
    for bp_id, definition in sorted(known.items()):
        parts = _renamed_parts(known, bp_id, definition, renamed)
        if parts:
            changed[bp_id] = parts
    for bp_id in sorted(changed):
        if bp_id == renamed.blueprint:
            continue
        # Locked (in identifier order) and looked at again: a change made meanwhile is
        # kept, not overwritten by what was read above.
        current = to_api(await get_row(tx, bp_id, lock=True))
        parts = _renamed_parts(known, bp_id, current, renamed)
        changed[bp_id] = parts
        if not parts:
            continue
        values = [parts.get(key, current.get(key)) for key in _DEPENDENT_KEYS]
        await tx.execute(
            "UPDATE blueprints SET mirror_properties = $3, aggregation_properties = $4, "
            "ownership = $5, team_inheritance = $6, version = version + 1, "
            "updated_at = now(), updated_by = $7 WHERE org_id = $1 AND identifier = $2",
            tx.org_id,
            bp_id,
            *values,
            actor,
        )
        await _changed(tx, bp_id)
    return changed


def _renamed_parts(
    known: dict[str, dict[str, Any]], bp_id: str, definition: dict[str, Any], renamed: Renamed
) -> dict[str, Any]:
    """The parts of `definition` (of blueprint `bp_id`) that change with the rename."""
    out: dict[str, Any] = {}
    mirrors = {
        name: _renamed_mirror(known, bp_id, mirror, renamed)
        for name, mirror in (definition.get("mirrorProperties") or {}).items()
    }
    if mirrors != (definition.get("mirrorProperties") or {}):
        out["mirrorProperties"] = mirrors
    aggs = {
        name: _renamed_aggregation(known, agg, renamed)
        for name, agg in (definition.get("aggregationProperties") or {}).items()
    }
    if aggs != (definition.get("aggregationProperties") or {}):
        out["aggregationProperties"] = aggs
    if renamed.kind == "relation":
        for key in ("ownership", "teamInheritance"):
            block = definition.get(key)
            if isinstance(block, dict) and isinstance(block.get("path"), str):
                hops = block["path"].split(".")
                walked = _renamed_hops(known, bp_id, hops, renamed)
                if walked != hops:
                    out[key] = {**block, "path": ".".join(walked)}
    return out


def _renamed_hops(
    known: dict[str, dict[str, Any]], start: str, hops: list[Any], renamed: Renamed
) -> list[Any]:
    """Relation hops walked from blueprint `start` (each a name, or a `{relation, ...}`
    step), with the renamed relation renamed where it is reached."""
    out: list[Any] = []
    current: str | None = start
    for hop in hops:
        name = hop.get("relation") if isinstance(hop, dict) else hop
        definition = known.get(current or "", {}).get("relations", {}).get(name)
        if (
            renamed.kind == "relation"
            and current == renamed.blueprint
            and name == renamed.old
            and definition is not None
        ):
            hop = {**hop, "relation": renamed.new} if isinstance(hop, dict) else renamed.new
        out.append(hop)
        current = definition["target"] if definition is not None else None
    return out


def _end_of(known: dict[str, dict[str, Any]], start: str, hops: list[str]) -> str | None:
    current: str | None = start
    for hop in hops:
        definition = known.get(current or "", {}).get("relations", {}).get(hop)
        current = definition["target"] if definition is not None else None
    return current


def _renamed_mirror(
    known: dict[str, dict[str, Any]], bp_id: str, mirror: Any, renamed: Renamed
) -> Any:
    if not isinstance(mirror, dict) or not isinstance(mirror.get("path"), str):
        return mirror
    *hops, leaf = mirror["path"].split(".")
    if renamed.kind == "relation":
        hops = _renamed_hops(known, bp_id, hops, renamed)
    elif leaf == renamed.old and _end_of(known, bp_id, hops) == renamed.blueprint and hops:
        leaf = renamed.new
    path = ".".join([*hops, leaf])
    return mirror if path == mirror["path"] else {**mirror, "path": path}


def _renamed_aggregation(known: dict[str, dict[str, Any]], agg: Any, renamed: Renamed) -> Any:
    if not isinstance(agg, dict) or not isinstance(agg.get("target"), str):
        return agg
    target = agg["target"]
    out = dict(agg)
    spec = agg.get("calculationSpec")
    if renamed.kind == "property" and target == renamed.blueprint and isinstance(spec, dict):
        out["calculationSpec"] = {
            key: (
                renamed.new if key in ("property", "measureTimeBy") and val == renamed.old else val
            )
            for key, val in spec.items()
        }
    filters = agg.get("pathFilter")
    if renamed.kind == "relation" and isinstance(filters, list):
        out["pathFilter"] = [
            {**f, "path": _renamed_hops(known, target, f["path"], renamed)}
            if isinstance(f, dict) and isinstance(f.get("path"), list)
            else f
            for f in filters
        ]
    if isinstance(agg.get("query"), dict):
        out["query"] = _renamed_query(known, target, agg["query"], renamed)
    return agg if out == agg else out


def _renamed_query(
    known: dict[str, dict[str, Any]], searched: str, query: Any, renamed: Renamed
) -> Any:
    """A query over entities of `searched` with the renamed name renamed in its rules
    (properties and relations are both named by a rule's `property`; a `matchAny` path
    is walked from `fromBlueprint` or the searched blueprint)."""
    if not isinstance(query, dict):
        return query
    if isinstance(query.get("rules"), list):
        return {
            **query,
            "rules": [_renamed_query(known, searched, rule, renamed) for rule in query["rules"]],
        }
    prop = query.get("property")
    if isinstance(prop, str):
        if searched == renamed.blueprint and prop == renamed.old:
            return {**query, "property": renamed.new}
        return query
    if renamed.kind == "relation" and isinstance(prop, dict) and isinstance(prop.get("path"), list):
        start = (
            prop.get("fromBlueprint") if isinstance(prop.get("fromBlueprint"), str) else searched
        )
        path = _renamed_hops(known, str(start), prop["path"], renamed)
        if path != prop["path"]:
            return {**query, "property": {**prop, "path": path}}
    return query


async def patch(tx: Tx, actor: str, identifier: str, changes: dict[str, Any]) -> dict[str, Any]:
    """Top-level keys given replace the stored ones; the rest are kept."""
    current = to_api(await get_row(tx, identifier, lock=True))
    v.check_url_identifier(changes, identifier)
    merged = {k: current.get(k) for k in DEFINITION_KEYS}
    merged.update({k: val for k, val in changes.items() if k in DEFINITION_KEYS})
    return await replace(tx, actor, identifier, merged)


async def delete(tx: Tx, identifier: str) -> None:
    await get_row(tx, identifier, lock=True)
    held = await tx.fetchval(
        "SELECT count(*) FROM entities WHERE org_id = $1 AND blueprint = $2",
        tx.org_id,
        identifier,
    )
    if held:
        raise Conflict(
            f"Blueprint {identifier!r} still has {held} entities; delete them first "
            f"(DELETE /v1/blueprints/{identifier}/all-entities?delete_blueprint=true)",
            details={"entities": held},
        )
    holders = await tx.fetch(
        "SELECT blueprint, relation FROM blueprint_relations "
        "WHERE org_id = $1 AND target = $2 AND blueprint <> $2 ORDER BY blueprint, relation",
        tx.org_id,
        identifier,
    )
    if holders:
        names = ", ".join(f"{h['blueprint']}.{h['relation']}" for h in holders)
        raise Conflict(
            f"Blueprint {identifier!r} is the target of relations: {names}; remove them first",
            details={"relations": [dict(h) for h in holders]},
        )
    await tx.execute(
        "DELETE FROM blueprints WHERE org_id = $1 AND identifier = $2", tx.org_id, identifier
    )
    await reactions.emit(tx, reactions.BlueprintDeleted(identifier))
