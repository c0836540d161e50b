"""Indexes the worker keeps per (org, blueprint) in the background: range indexes on number
and date-time properties, and trigram indexes for text rules.

Equality, `in` and containment on any property are answered by the GIN index (migration
0004). Range rules (`>`, `<=`, `between`, date presets) on a number or date-time property
compare `portolan_number(properties, 'p')` / `portolan_time(properties, 'p')`
(migration 0005), and a btree on that expression answers them. Text rules (`contains`,
`beginsWith`, `endsWith`) compile to `LIKE` (app/search/compiler.py), and a GIN
`gin_trgm_ops` index (pg_trgm, migration 0029) on the title, the identifier or
`properties ->> 'p'` answers them, for rare and common terms alike. There is one index per
(org, blueprint, property), partial to that org's blueprint: it holds only those entities,
and the search statement's own `org_id = ... AND blueprint = ...` lets the planner use it.

Which are indexed, from the blueprint schema:
- `"indexed": true` on a number, date-time or (other) string property, and every `timer`
  property (the timer automations' query): always;
- `"indexed": false`: never;
- neither: once the blueprint holds `range_index_min_entities` entities (a small blueprint
  is read quickly without one, and every index costs each write to its entities): range
  indexes for its number and date-time properties, trigram indexes for its title, its
  identifier and its string properties without an `enum` (a handful of values is not
  searched by substring). An automatic index stays when its blueprint shrinks again.

Every index on the shared `entities` table is weighed by the planner for every tenant's
statements, so an organization gets at most `range_index_max_per_org` of them, range and
trigram together (PORTOLAN_RANGE_INDEX_MAX_PER_ORG). Flagged and timer properties go first,
then automatic ones, each in blueprint and property order (`$identifier` and `$title` before
a blueprint's properties); the ones beyond the cap are not indexed (an index beyond a
lowered cap is dropped), logged with the org, and listed in the pass's `capped`.

`reconcile` compares what the blueprints want with the `ixr_*` indexes (of both kinds) that
exist, and builds or drops the difference with `CREATE/DROP INDEX CONCURRENTLY`, which
block neither reads nor writes. A build that is interrupted leaves an invalid index: the
next pass drops it and builds it again. One process reconciles at a time, and not while
statistics are refreshed (app.db.maintenance.MAINTENANCE_LOCK).
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from app.db.maintenance import MAINTENANCE_LOCK

log = logging.getLogger("portolan.indexes")

# Both kinds: the indexes of an org are found (and counted against its cap) by name.
PREFIX = "ixr_"
_EXISTING_SQL = (
    "SELECT c.relname AS name, i.indisvalid AS valid FROM pg_index i "
    "JOIN pg_class c ON c.oid = i.indexrelid "
    "WHERE i.indrelid = 'public.entities'::regclass AND c.relname LIKE 'ixr\\_%'"
)
# Meta-properties with a trigram index of their own: their columns.
TEXT_COLUMNS = {"$identifier": "identifier", "$title": "title"}
_FUNCTIONS = {"number": "portolan_number", "datetime": "portolan_time"}


def range_kind(prop: dict[str, Any]) -> str | None:
    """`number` or `datetime` for a property a range index can serve; None otherwise."""
    if prop.get("type") == "number":
        return "number"
    if prop.get("type") == "string" and prop.get("format") in ("date-time", "timer"):
        return "datetime"
    return None


@dataclass(frozen=True)
class RangeIndex:
    org_id: uuid.UUID
    blueprint: str
    prop: str
    kind: str  # number | datetime

    @property
    def name(self) -> str:
        # The org in clear (an org's indexes are found by name), the rest hashed to fit
        # PostgreSQL's 63 characters. `v2`: the shape of create_sql; a new shape gets new
        # names, and the old indexes are dropped as unwanted.
        key = f"v2/{self.blueprint}/{self.prop}/{self.kind}".encode()
        return f"{PREFIX}{self.org_id.hex}_{hashlib.sha256(key).hexdigest()[:20]}"

    def create_sql(self) -> str:
        # Identifiers of blueprints and properties match ^[A-Za-z0-9@_=\-]+$ (checked when
        # a blueprint is written); quoted as literals all the same.
        value = f"{_FUNCTIONS[self.kind]}(properties, {_literal(self.prop)})"
        # `value IS NOT NULL` in the predicate: a range rule implies it, so the index
        # serves the rule; and without it every index of a blueprint would be a cheap way
        # to list that blueprint's entities, which the planner then picks for rules on
        # other properties (reading and filtering every row instead of the right index).
        return (
            f'CREATE INDEX CONCURRENTLY IF NOT EXISTS "{self.name}" ON public.entities '
            f"({value}) WHERE org_id = {_literal(str(self.org_id))}::uuid "
            f"AND blueprint = {_literal(self.blueprint)} AND {value} IS NOT NULL"
        )

    def describe(self) -> str:
        return f"{self.kind} range index of {self.org_id}/{self.blueprint}.{self.prop}"


def text_indexable(prop: dict[str, Any]) -> bool:
    """A string property text rules apply to (date-times take range rules instead)."""
    return prop.get("type") == "string" and prop.get("format") not in ("date-time", "timer")


@dataclass(frozen=True)
class TextIndex:
    """A trigram index answering `LIKE` on a title, identifier or string property."""

    org_id: uuid.UUID
    blueprint: str
    prop: str  # `$title`, `$identifier` or a property

    kind = "text"

    @property
    def name(self) -> str:
        key = f"v1/{self.blueprint}/{self.prop}/text".encode()  # v1: keyed in "C"
        return f"{PREFIX}{self.org_id.hex}_{hashlib.sha256(key).hexdigest()[:20]}"

    def create_sql(self) -> str:
        # Written as the compiler writes the rule's value (app/search/compiler.py): the
        # planner matches index expressions exactly. In the "C" collation, as the rules
        # compare: gin_trgm_ops answers `=` too, and only a clause of the index's
        # collation can use it, so the joins and equalities on identifiers and titles
        # keep their btrees.
        column = TEXT_COLUMNS.get(self.prop)
        value = column or f"(properties ->> {_literal(self.prop)})"
        # A property's index holds the entities that have it (LIKE implies IS NOT NULL, so
        # the index still serves the rule); the title and identifier of every entity.
        present = "" if column else f" AND {value} IS NOT NULL"
        return (
            f'CREATE INDEX CONCURRENTLY IF NOT EXISTS "{self.name}" ON public.entities '
            f'USING gin (({value}) COLLATE "C" gin_trgm_ops) '
            f"WHERE org_id = {_literal(str(self.org_id))}::uuid "
            f"AND blueprint = {_literal(self.blueprint)}{present}"
        )

    def describe(self) -> str:
        return f"text index of {self.org_id}/{self.blueprint}.{self.prop}"


Index = RangeIndex | TextIndex


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def wanted_by(
    org_id: uuid.UUID, blueprint: str, schema: dict[str, Any]
) -> tuple[list[Index], list[Index]]:
    """(always, automatic): the indexes a blueprint asks for by flag, and those it gets once
    it is large enough."""
    always: list[Index] = []
    automatic: list[Index] = [TextIndex(org_id, blueprint, meta) for meta in TEXT_COLUMNS]
    for name, prop in (schema.get("properties") or {}).items():
        if not isinstance(prop, dict):
            continue
        flag = prop.get("indexed")
        if flag is False:
            continue
        kind = range_kind(prop)
        if kind is not None:
            # Timers always: TIMER_PROPERTY_EXPIRED automations find expiries through it.
            wanted = flag is True or prop.get("format") == "timer"
            (always if wanted else automatic).append(RangeIndex(org_id, blueprint, name, kind))
        elif text_indexable(prop):
            if flag is True:
                always.append(TextIndex(org_id, blueprint, name))
            elif "enum" not in prop:
                automatic.append(TextIndex(org_id, blueprint, name))
    return always, automatic


@dataclass
class Reconciled:
    created: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    # Properties left without the index they asked for: their org is at its cap.
    capped: list[str] = field(default_factory=list)
    skipped: bool = False  # another process was reconciling


async def reconcile(
    database_url: str,
    *,
    min_entities: int,
    max_per_org: int | None = None,
    orgs: Collection[uuid.UUID] | None = None,
) -> Reconciled:
    """One pass: build the range indexes the blueprints want and drop the others (of the
    given orgs only, when `orgs` is given); at most `max_per_org` per organization (None:
    no cap)."""
    done = Reconciled()
    conn = await asyncpg.connect(
        database_url,
        server_settings={
            "application_name": "portolan-indexes",
            # An index build over a large blueprint may take longer than a request may.
            "statement_timeout": "0",
        },
    )
    try:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", MAINTENANCE_LOCK):
            done.skipped = True
            return done
        prefixes = None if orgs is None else tuple(f"{PREFIX}{org.hex}_" for org in orgs)
        existing = {
            r["name"]: r["valid"]
            for r in await conn.fetch(_EXISTING_SQL)
            if prefixes is None or str(r["name"]).startswith(prefixes)
        }
        wanted, done.capped = _capped(
            await _wanted(conn, existing, min_entities, orgs), max_per_org
        )
        for name, valid in sorted(existing.items()):
            if name in wanted and valid:
                continue
            await conn.execute(f'DROP INDEX CONCURRENTLY IF EXISTS public."{name}"')
            if name in wanted:  # an interrupted build: built again below
                log.warning("dropped an invalid range index", extra={"index": name})
            else:
                done.dropped.append(name)
        for name, index in sorted(wanted.items()):
            if existing.get(name):
                continue
            try:
                await conn.execute(index.create_sql())
                await conn.execute(
                    f'COMMENT ON INDEX public."{name}" IS {_literal(index.describe())}'
                )
            except asyncpg.PostgresError as exc:
                # Left invalid (if it got that far): dropped and retried on the next pass.
                log.error(
                    "index build failed",
                    extra={"index": name, "error": f"{exc.__class__.__name__}: {exc}"},
                )
                done.failed.append(name)
                continue
            done.created.append(name)
        await conn.execute("SELECT pg_advisory_unlock($1)", MAINTENANCE_LOCK)
    finally:
        await conn.close()
    if done.capped:
        log.warning(
            "indexes over the organization's cap are not built",
            extra={"cap": max_per_org, "capped": done.capped},
        )
    if done.created or done.dropped:
        log.info(
            "range indexes reconciled",
            # ("created" is a LogRecord attribute: logging refuses it as an extra key)
            extra={"built": len(done.created), "removed": len(done.dropped)},
        )
    return done


def _capped(
    wanted: dict[str, tuple[bool, Index]], cap: int | None
) -> tuple[dict[str, Index], list[str]]:
    """The wanted indexes within each org's cap, and what is left out (described)."""
    by_org: dict[uuid.UUID, list[tuple[bool, Index]]] = {}
    for flagged, index in wanted.values():
        by_org.setdefault(index.org_id, []).append((flagged, index))
    kept: dict[str, Index] = {}
    left: list[str] = []
    for org_id in sorted(by_org, key=str):
        ranked = sorted(
            by_org[org_id],
            key=lambda item: (not item[0], item[1].blueprint, item[1].prop, item[1].kind),
        )
        within = ranked if cap is None else ranked[:cap]
        kept.update((index.name, index) for _, index in within)
        left.extend(index.describe() for _, index in ranked[len(within) :])
    return kept, left


async def _wanted(
    conn: asyncpg.Connection,
    existing: dict[str, bool],
    min_entities: int,
    orgs: Collection[uuid.UUID] | None,
) -> dict[str, tuple[bool, Index]]:
    """name -> (asked for by a flag or a timer, the index)."""
    wanted: dict[str, tuple[bool, Index]] = {}
    rows = await conn.fetch(
        "SELECT org_id, identifier, schema FROM public.blueprints "
        "WHERE $1::uuid[] IS NULL OR org_id = ANY($1::uuid[])",
        None if orgs is None else list(orgs),
    )
    # Without pg_trgm (migration 0029 installs it where it is available) text rules are
    # answered without indexes.
    trigrams = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm')"
    )
    for row in rows:
        schema = json.loads(row["schema"])  # jsonb arrives as text on a plain connection
        always, automatic = wanted_by(row["org_id"], row["identifier"], schema)
        if not trigrams:
            always = [index for index in always if not isinstance(index, TextIndex)]
            automatic = [index for index in automatic if not isinstance(index, TextIndex)]
        for index in always:
            wanted[index.name] = (True, index)
        pending = [index for index in automatic if index.name not in existing]
        wanted.update((index.name, (False, index)) for index in automatic if index.name in existing)
        if pending and await _holds_at_least(conn, row["org_id"], row["identifier"], min_entities):
            wanted.update((index.name, (False, index)) for index in pending)
    return wanted


async def _holds_at_least(
    conn: asyncpg.Connection, org_id: uuid.UUID, blueprint: str, count: int
) -> bool:
    found = await conn.fetchval(
        "SELECT count(*) FROM (SELECT 1 FROM public.entities WHERE org_id = $1 "
        "AND blueprint = $2 LIMIT $3) s",
        org_id,
        blueprint,
        count,
    )
    return int(found) >= count
