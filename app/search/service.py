"""Running searches: one compiled statement per page, keyset pagination, bounded time."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY

from app.catalog import blueprints as bp_service
from app.catalog.entities import row_state, to_api
from app.db.database import Database, Tx
from app.kit.errors import Invalid, NotFound
from app.search.calc import calculate
from app.search.compiler import Compiler, E, Scope
from app.search.derived import derived_column

_PAGE = 1000

_LINKS: sa.Label[Any] = sa.literal_column(
    "(SELECT jsonb_object_agg(r.relation, r.targets) FROM ("
    " SELECT relation, jsonb_agg(target_identifier ORDER BY target_identifier) AS targets"
    " FROM entity_relations WHERE org_id = e.org_id AND source_blueprint = e.blueprint"
    " AND source_identifier = e.identifier GROUP BY relation) r)"
).label("links")

# attach_title_to_relation: each target as {identifier, title} (Port's shape).
_TITLED_LINKS: sa.Label[Any] = sa.literal_column(
    "(SELECT jsonb_object_agg(r.relation, r.targets) FROM ("
    " SELECT l.relation, jsonb_agg(jsonb_build_object('identifier', l.target_identifier,"
    " 'title', t.title) ORDER BY l.target_identifier) AS targets"
    " FROM entity_relations l JOIN entities t ON t.org_id = l.org_id"
    " AND t.blueprint = l.target_blueprint AND t.identifier = l.target_identifier"
    " WHERE l.org_id = e.org_id AND l.source_blueprint = e.blueprint"
    " AND l.source_identifier = e.identifier GROUP BY l.relation) r)"
).label("links")

_COLUMNS = [
    E.c.blueprint,
    E.c.identifier,
    E.c.title,
    E.c.icon,
    E.c.team,
    E.c.properties,
    E.c.datasource,
    E.c.created_at,
    E.c.created_by,
    E.c.updated_at,
    E.c.updated_by,
    _LINKS,
]


# The org's blueprint definitions change rarely and every search needs all of them: each
# process remembers them per org with their fingerprint (identifiers, creation times and
# versions). A search statement built from remembered definitions carries the fingerprint
# as a condition, so it matches nothing when they changed meanwhile; an empty page is then
# checked against the committed fingerprint and run again from fresh definitions.
_FINGERPRINT_SQL = (
    "SELECT md5(coalesce(string_agg(identifier || '@' || created_at::text || '#' || "
    "version::text, ',' ORDER BY identifier), '')) FROM blueprints WHERE org_id = {org}"
)
_SCOPES_SIZE = 512
_scopes: OrderedDict[uuid.UUID, tuple[str, dict[str, dict[str, Any]]]] = OrderedDict()


async def _load_definitions(tx: Tx) -> tuple[str, dict[str, dict[str, Any]]]:
    assert tx.org_id is not None
    everything = {bp["identifier"]: bp for bp in await bp_service.list_all(tx)}
    fingerprint = str(await tx.fetchval(_FINGERPRINT_SQL.format(org="$1"), tx.org_id))
    _scopes[tx.org_id] = (fingerprint, everything)
    _scopes.move_to_end(tx.org_id)
    if len(_scopes) > _SCOPES_SIZE:
        _scopes.popitem(last=False)
    return fingerprint, everything


async def fresh_scope(tx: Tx, blueprint: str | None, query: Any) -> Scope:
    """As scope_for, from the committed definitions (for statements that do not check the
    fingerprint)."""
    assert tx.org_id is not None
    return _scope(tx.org_id, await _load_definitions(tx), blueprint, query)


async def scope_for(tx: Tx, blueprint: str | None, query: Any) -> Scope:
    """The org's blueprints, and which of them are searched: the URL's blueprint, or every
    blueprint (narrowed by a top-level `$blueprint` rule of an `and` query)."""
    assert tx.org_id is not None
    remembered = _scopes.get(tx.org_id)
    if remembered is None or (blueprint is not None and blueprint not in remembered[1]):
        remembered = await _load_definitions(tx)
    return _scope(tx.org_id, remembered, blueprint, query)


async def prepare(
    tx: Tx, blueprint: str | None, query: Any, *, calculated: bool = True, titles: bool = False
) -> Search:
    """A compiled search over the org's blueprints as remembered; a query that does not
    compile against them is tried once more against the committed definitions."""
    scope = await scope_for(tx, blueprint, query)
    try:
        return Search(scope, query, calculated=calculated, titles=titles)
    except Invalid:
        fresh = await _load_definitions(tx)
        if fresh[0] == scope.fingerprint:
            raise
        return Search(
            _scope(scope.org_id, fresh, blueprint, query),
            query,
            calculated=calculated,
            titles=titles,
        )


def _scope(
    org_id: uuid.UUID,
    remembered: tuple[str, dict[str, dict[str, Any]]],
    blueprint: str | None,
    query: Any,
) -> Scope:
    fingerprint, everything = remembered
    if blueprint is not None:
        if blueprint not in everything:
            raise NotFound(f"Blueprint {blueprint!r} was not found")
        searched = [blueprint]
    else:
        searched = _narrowed(query, sorted(everything))
    return Scope(org_id, everything, searched, fingerprint=fingerprint, fixed=blueprint)


def _narrowed(query: Any, every: list[str]) -> list[str]:
    if not isinstance(query, dict) or query.get("combinator", "and") != "and":
        return every
    chosen = set(every)
    for rule in query.get("rules") or []:
        if not isinstance(rule, dict) or rule.get("property") != "$blueprint":
            continue
        value = rule.get("value")
        if rule.get("operator") == "=" and isinstance(value, str):
            chosen &= {value}
        elif rule.get("operator") == "in" and isinstance(value, list):
            chosen &= {v for v in value if isinstance(v, str)}
    return sorted(chosen)


def encode_cursor(position: tuple[str, str]) -> str:
    raw = json.dumps(list(position), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        blueprint, identifier = json.loads(raw)
        if isinstance(blueprint, str) and isinstance(identifier, str):
            return blueprint, identifier
    except (ValueError, TypeError, binascii.Error):
        pass
    raise Invalid(
        "from is not a cursor this API returned (pass a response's `next` unchanged)",
        details=[{"pointer": "/from", "message": "invalid cursor"}],
    )


class Search:
    """A compiled query over a scope, read a page at a time in (blueprint, identifier)
    order; the position after a page is its cursor, so pages neither skip nor repeat rows
    that concurrent writes leave in place."""

    def __init__(
        self, scope: Scope, query: Any, *, calculated: bool = True, titles: bool = False
    ) -> None:
        """`calculated=False`: leave calculation properties out (Port's
        `exclude_calculated_properties`). `titles`: relations name their targets as
        `{identifier, title}` (Port's `attach_title_to_relation`)."""
        self.query = query
        self.calculated = calculated
        self.titles = titles
        self._build(scope)

    def _build(self, scope: Scope) -> None:
        self.scope = scope
        compiler = Compiler(scope, joins=True)
        self.condition = compiler.compile(self.query or {"combinator": "and", "rules": []})
        self.joins = compiler.joins
        self.derived = derived_column(scope, E)

    def statement(self, after: tuple[str, str] | None, limit: int) -> sa.Select[Any]:
        columns: list[Any] = [*_COLUMNS[:-1], _TITLED_LINKS if self.titles else _LINKS]
        if self.derived is not None:
            columns.append(self.derived)
        source: Any = E
        for related in self.joins:  # relatedTo rules: read in the page's order
            source = source.join(
                related,
                sa.and_(E.c.blueprint == related.c.bp, E.c.identifier == related.c.ident),
            )
        stmt = (
            sa.select(*columns)
            .select_from(source)
            .where(E.c.org_id == sa.bindparam(None, self.scope.org_id))
        )
        if len(self.scope.searched) == 1:
            only = self.scope.searched[0]
            stmt = stmt.where(E.c.blueprint == sa.bindparam(None, only))
            if after is not None:
                if after[0] > only:
                    stmt = stmt.where(sa.false())
                elif after[0] == only:
                    stmt = stmt.where(E.c.identifier > sa.bindparam(None, after[1]))
            stmt = stmt.order_by(E.c.identifier)
        else:
            searched = sa.cast(
                sa.bindparam(None, self.scope.searched, type_=ARRAY(sa.String)),
                ARRAY(sa.String),
            )
            stmt = stmt.where(E.c.blueprint == sa.any_(searched))
            if after is not None:
                stmt = stmt.where(
                    sa.tuple_(E.c.blueprint, E.c.identifier)
                    > sa.tuple_(sa.bindparam(None, after[0]), sa.bindparam(None, after[1]))
                )
            stmt = stmt.order_by(E.c.blueprint, E.c.identifier)
        if self.scope.fingerprint is not None:
            # Uncorrelated (the org is a parameter): evaluated once per statement.
            fresh = sa.text(
                "(" + _FINGERPRINT_SQL.format(org=":fp_org") + ") = :fp_expected"
            ).bindparams(fp_org=self.scope.org_id, fp_expected=self.scope.fingerprint)
            stmt = stmt.where(fresh)
        return stmt.where(self.condition).limit(limit)

    async def page(
        self, tx: Tx, after: tuple[str, str] | None, limit: int
    ) -> tuple[list[dict[str, Any]], tuple[str, str] | None]:
        """Up to `limit` entities in the API's shape, and the position to continue from
        (None when this was the last page)."""
        rows = await run_bounded(tx, self.statement(after, limit + 1))
        if not rows and self.scope.fingerprint is not None:
            remembered = await _load_definitions(tx)
            if remembered[0] != self.scope.fingerprint:  # changed since: run it afresh
                self._build(_scope(self.scope.org_id, remembered, self.scope.fixed, self.query))
                rows = await run_bounded(tx, self.statement(after, limit + 1))
        more = len(rows) > limit
        rows = rows[:limit]
        found = [self._entity(row) for row in rows]
        if self.calculated:
            for bp in self.scope.searched:
                await calculate(
                    self.scope.blueprints[bp], [e for e in found if e["blueprint"] == bp]
                )
        last = (rows[-1]["blueprint"], rows[-1]["identifier"]) if more and rows else None
        return found, last

    def _entity(self, row: asyncpg.Record) -> dict[str, Any]:
        state = row_state(row)
        derived = row["derived"] if self.derived is not None else None
        if derived:
            team = derived.pop("$team", None)
            if team is not None:  # ownership inherited through a relation path
                state["team"] = team
            state["properties"] = {**state["properties"], **derived}
        return to_api(self.scope.blueprints[row["blueprint"]], state)

    async def stream(self, db: Database, org_id: uuid.UUID) -> AsyncIterator[dict[str, Any]]:
        """Every match, a page per short transaction (memory stays flat)."""
        after: tuple[str, str] | None = None
        while True:
            async with db.tenant(org_id) as tx:
                found, after = await self.page(tx, after, _PAGE)
            for entity in found:
                yield entity
            if after is None:
                return


async def run_bounded(tx: Tx, stmt: sa.Select[Any]) -> list[asyncpg.Record]:
    """Runs a search statement; the connection's statement_timeout (a setting) bounds it."""
    try:
        return await tx.fetch(stmt)
    except asyncpg.QueryCanceledError as exc:
        raise Invalid(
            "The search ran longer than the statement time limit and was stopped; "
            "narrow the query (fewer hops, more selective rules)"
        ) from exc
    except asyncpg.DataError as exc:
        raise Invalid(
            "Stored values of a property in this query do not all fit its type "
            f"({exc.__class__.__name__}); fix the data or compare it differently"
        ) from exc
