"""Running searches: one compiled statement per page, keyset pagination, bounded time."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pydantic_core
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.sql.elements import ColumnElement

from app.catalog import blueprints as bp_service
from app.catalog.entities import FieldFilter, row_state, to_api
from app.db.database import Compiled, Database, Tx, compile_query
from app.kit.errors import Invalid, NotFound
from app.search.calc import calculate
from app.search.compiler import ENTITIES, Compiler, E, nested_query
from app.search.derived import derived_column
from app.search.documents import document
from app.search.sql import Scope, run_bounded

_PAGE = 1000
# Entities per page of a streamed answer of documents (their JSON built by the database):
# a page is bytes only, so a larger one costs little memory and saves round trips.
_DOC_PAGE = 2000

# The org every statement of a search reads, one named parameter (`search_org`, in each
# compiled query's `values`). Subqueries compare with it rather than with `e.org_id`: the
# same plan on a single PostgreSQL (a constant instead of the outer row's value), and on
# Citus every table of the statement carries its own filter on the distribution column, so
# the statement goes to the org's shard as it is. Citus refuses a subquery correlated with
# the org of the window's rows (`e` a subquery with a LIMIT: docs/scaling.md).
_ORG = sa.bindparam("search_org", type_=ENTITIES.c.org_id.type)


def _subquery_column(sql: str, name: str) -> sa.Label[Any]:
    """A correlated subquery (SQL over `e`, the org as `:search_org`) as a labelled column."""
    return sa.type_coerce(sa.text(sql).bindparams(_ORG), JSONB).label(name)


_LINKS = _subquery_column(
    "(SELECT jsonb_object_agg(r.relation, r.targets) FROM ("
    " SELECT relation, jsonb_agg(target_identifier ORDER BY target_identifier) AS targets"
    " FROM entity_relations WHERE org_id = :search_org AND source_blueprint = e.blueprint"
    " AND source_identifier = e.identifier GROUP BY relation) r)",
    "links",
)

# attach_title_to_relation: each target as {identifier, title} (Port's shape).
_TITLED_LINKS = _subquery_column(
    "(SELECT jsonb_object_agg(r.relation, r.targets) FROM ("
    " SELECT l.relation, jsonb_agg(jsonb_build_object('identifier', l.target_identifier,"
    " 'title', t.title) ORDER BY l.target_identifier) AS targets"
    " FROM entity_relations l JOIN entities t ON t.org_id = :search_org"
    " AND t.blueprint = l.target_blueprint AND t.identifier = l.target_identifier"
    " WHERE l.org_id = :search_org AND l.source_blueprint = e.blueprint"
    " AND l.source_identifier = e.identifier GROUP BY l.relation) r)",
    "links",
)

# Each entity's scorecard results (app.scorecards), in Port's shape.
_SCORECARDS = _subquery_column(
    "(SELECT jsonb_object_agg(s.scorecard, jsonb_build_array(s.level_rank, s.passed))"
    " FROM scorecard_results s WHERE s.org_id = :search_org"
    " AND s.blueprint = e.blueprint AND s.identifier = e.identifier)",
    "scorecards",
)

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
    for bp in everything.values():
        bp["scorecards"] = {}
    # Scorecards (their levels and rules: rules on results name them). A scorecard change
    # counts up its blueprint's version, so the fingerprint covers them too.
    for row in await tx.fetch(
        "SELECT blueprint, identifier, levels, rules, filter FROM scorecards WHERE org_id = $1",
        tx.org_id,
    ):
        if row["blueprint"] in everything:
            queries = [rule["query"] for rule in row["rules"]] + [row["filter"] or {}]
            everything[row["blueprint"]]["scorecards"][row["identifier"]] = {
                "levels": [level["title"] for level in row["levels"]],
                "rules": [rule["identifier"] for rule in row["rules"]],
                "rule_levels": [rule["level"] for rule in row["rules"]],
                # What the rules read (for what other entities' changes concern them).
                "reads": sorted(
                    {
                        str(c.get("property") or c.get("relation"))
                        for query in queries
                        for c in query.get("conditions") or []
                        if isinstance(c, dict)
                    }
                ),
            }
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
    tx: Tx,
    blueprint: str | None,
    query: Any,
    *,
    calculated: bool = True,
    titles: bool = False,
    windowed: bool = False,
    streamed: bool | None = None,
    documents: bool = False,
) -> Search:
    """A compiled search over the org's blueprints as remembered; a query that does not
    compile against them is tried once more against the committed definitions.

    `streamed`: the caller will `stream` the search (default: searches across blueprints,
    which are always streamed); its first page is read here, in `tx`. `documents`: the
    caller will `stream_documents` instead (each entity's JSON built by the database)."""
    scope = await scope_for(tx, blueprint, query)
    try:
        search = Search(scope, query, calculated=calculated, titles=titles, windowed=windowed)
    except Invalid:
        fresh = await _load_definitions(tx)
        if fresh[0] == scope.fingerprint:
            raise
        search = Search(
            _scope(scope.org_id, fresh, blueprint, query),
            query,
            calculated=calculated,
            titles=titles,
            windowed=windowed,
        )
    if streamed if streamed is not None else blueprint is None:
        # A streamed answer sends its headers before it reads its pages: its first page is
        # read now, in the request's transaction, so a search that fails (a statement that
        # cannot be built or runs past the time limit) is the answer's status, not a 200
        # whose body breaks off. `stream` starts with it; its calculations are the
        # caller's, after the commit (`calculate`: a calculation that cannot run is the
        # answer's status too).
        if documents:
            search.first_documents = await search.document_page(tx, None, _DOC_PAGE)
        else:
            search.first = await search.page(tx, None, _PAGE)
    return search


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


# A page of a blueprint's search first reads this many of its entities in identifier order
# and filters them (see Search.page).
WINDOW = 5000


def _window_rows() -> Any:
    """A blueprint's next `window_rows` entities after `window_after` in identifier order,
    as a subquery named like the table (its LIMIT keeps the planner from merging it). Built
    once: every value is a named parameter (Search.window_values). Each column is a plain
    labelled expression: a subquery copies a table column with its foreign keys and events
    (~0.2 ms for the eleven of them)."""
    columns = [sa.type_coerce(c, c.type).label(c.name) for c in ENTITIES.c]
    return (
        sa.select(*columns)
        .where(
            ENTITIES.c.org_id == _ORG,
            ENTITIES.c.blueprint == sa.bindparam("window_blueprint", type_=sa.String),
            ENTITIES.c.identifier > sa.bindparam("window_after", type_=sa.String),
        )
        .order_by(ENTITIES.c.identifier)
        .limit(sa.bindparam("window_rows", type_=sa.Integer))
        .subquery("e")
    )


_WINDOW_ROWS = _window_rows()


@dataclass
class _Parts:
    """A query compiled against one `entities` source (the table, or a window of it)."""

    entity: Any
    condition: ColumnElement[bool]
    joins: list[Any]
    derived: ColumnElement[Any] | None
    values: dict[str, Any]  # named parameters of the statement (the org, the condition, joins)


class Search:
    """A compiled query over a scope, read a page at a time in (blueprint, identifier)
    order; the position after a page is its cursor, so pages neither skip nor repeat rows
    that concurrent writes leave in place."""

    def __init__(
        self,
        scope: Scope,
        query: Any,
        *,
        calculated: bool = True,
        titles: bool = False,
        windowed: bool = False,
    ) -> None:
        """`calculated=False`: leave calculation properties out (Port's
        `exclude_calculated_properties`). `titles`: relations name their targets as
        `{identifier, title}` (Port's `attach_title_to_relation`). `windowed`: pages of a
        blueprint's search start with a bounded read in identifier order (see `page`)."""
        self.query = query or {"combinator": "and", "rules": []}
        self.calculated = calculated
        self.titles = titles
        self.windowed = windowed
        # The first page and where it ends, when read before streaming (see prepare).
        self.first: tuple[list[dict[str, Any]], tuple[str, str] | None] | None = None
        self.first_documents: Documents | None = None
        self._build(scope)

    def _build(self, scope: Scope) -> None:
        self.scope = scope
        self._plain: _Parts | None = None
        self._windowed: _Parts | None = None
        # Document pages' statements, compiled once (by whether they resume after a key).
        self._documents: dict[bool, Compiled] = {}
        rules = self.query.get("rules") if isinstance(self.query, dict) else None
        if (
            self.windowed
            and len(scope.searched) == 1
            and isinstance(rules, list)
            and rules
            and not any(isinstance(r, dict) and r.get("operator") == "relatedTo" for r in rules)
        ):
            # Compiled against the window only; the whole-table form when a page needs it.
            self._windowed = self._compile(_WINDOW_ROWS)

    @property
    def derived(self) -> ColumnElement[Any] | None:
        """The derived properties' column of the statements (None: nothing derived)."""
        return (self._windowed or self.parts).derived

    @property
    def parts(self) -> _Parts:
        """The query compiled against the whole table."""
        if self._plain is None:
            self._plain = self._compile(E)
        return self._plain

    def _compile(self, entity: Any) -> _Parts:
        compiler = Compiler(self.scope, entity, joins=True)
        condition = compiler.compile(self.query)
        return _Parts(
            entity,
            condition,
            compiler.joins,
            derived_column(self.scope, entity, nested_query),
            {**compiler.values, "search_org": self.scope.org_id},
        )

    def statement(
        self,
        after: tuple[str, str] | None,
        limit: int,
        parts: _Parts | None = None,
        *,
        keyed: bool = False,
    ) -> sa.Select[Any]:
        """A page's statement: entities after `after` in page order, at most `limit`. With
        `keyed`, the position and the limit are the named parameters `after_blueprint`,
        `after_identifier` and `page_limit` (`after` then only says whether there is one),
        so one statement serves every page."""
        parts = parts or self.parts
        e = parts.entity
        links = _TITLED_LINKS if self.titles else _LINKS
        columns: list[Any] = [*(e.c[c.name] for c in _COLUMNS[:-1]), links, _SCORECARDS]
        if parts.derived is not None:
            columns.append(parts.derived)
        source: Any = e
        for related in parts.joins:  # relatedTo rules: read in the page's order
            source = source.join(
                related,
                sa.and_(e.c.blueprint == related.c.bp, e.c.identifier == related.c.ident),
            )
        stmt = sa.select(*columns).select_from(source).where(e.c.org_id == _ORG)
        if len(self.scope.searched) == 1:
            only = self.scope.searched[0]
            stmt = stmt.where(e.c.blueprint == sa.bindparam(None, only))
            if keyed and after is not None:
                resume = sa.bindparam("after_identifier", type_=sa.String)
                stmt = stmt.where(e.c.identifier > resume)
            elif after is not None:
                if after[0] > only:
                    stmt = stmt.where(sa.false())
                elif after[0] == only:
                    stmt = stmt.where(e.c.identifier > sa.bindparam(None, after[1]))
            stmt = stmt.order_by(e.c.identifier)
        else:
            searched = sa.cast(
                sa.bindparam(None, self.scope.searched, type_=ARRAY(sa.String)),
                ARRAY(sa.String),
            )
            stmt = stmt.where(e.c.blueprint == sa.any_(searched))
            if after is not None:
                position = (
                    (
                        sa.bindparam("after_blueprint", type_=sa.String),
                        sa.bindparam("after_identifier", type_=sa.String),
                    )
                    if keyed
                    else (sa.bindparam(None, after[0]), sa.bindparam(None, after[1]))
                )
                stmt = stmt.where(sa.tuple_(e.c.blueprint, e.c.identifier) > sa.tuple_(*position))
            stmt = stmt.order_by(e.c.blueprint, e.c.identifier)
        if self.scope.fingerprint is not None:
            # Uncorrelated (the org is a parameter): evaluated once per statement.
            fresh = sa.text(
                "(" + _FINGERPRINT_SQL.format(org=":search_org") + ") = :fp_expected"
            ).bindparams(_ORG, fp_expected=self.scope.fingerprint)
            stmt = stmt.where(fresh)
        stmt = stmt.where(parts.condition)
        return stmt.limit(sa.bindparam("page_limit", type_=sa.Integer) if keyed else limit)

    @property
    def uses_window(self) -> bool:
        return self._windowed is not None

    def window_statement(self, limit: int) -> sa.Select[Any]:
        """The first step of a windowed page (see `_windowed_rows`); runs with the values
        of `window_values`."""
        assert self._windowed is not None
        return self.statement(None, limit, self._windowed)

    def values(self) -> dict[str, Any]:
        """The named parameters of `statement()` (`window_values` has the window's)."""
        return self.parts.values

    def window_values(self, start: str | None) -> dict[str, Any]:
        assert self._windowed is not None
        return {
            **self._windowed.values,
            "window_blueprint": self.scope.searched[0],
            "window_after": start or "",
            "window_rows": WINDOW,
        }

    async def _windowed_rows(
        self, tx: Tx, after: tuple[str, str] | None, limit: int
    ) -> list[asyncpg.Record]:
        """A page in two steps. First the next WINDOW entities in identifier order are read
        and filtered: a query that matches many entities fills its page there in a few
        milliseconds, whatever the planner would have estimated. When they do not fill it,
        the rest of the page comes from the statement the planner plans freely, resuming
        after the last match (matches are sparse there, which is where indexes pay; it may
        read the window's rows again, and finds no more there unless they changed since).
        Without the window the planner's estimates decide, and a jsonb containment is
        estimated at 1% of the table whatever its value: a page of a common value was
        planned as an index intersection reading every match of the tenant (20 ms, not 2)."""
        only = self.scope.searched[0]
        if after is not None and after[0] > only:
            return []
        start = after[1] if after is not None and after[0] == only else None
        rows = await run_bounded(tx, self.window_statement(limit), self.window_values(start))
        if len(rows) >= limit:
            return rows
        resume = str(rows[-1]["identifier"]) if rows else start
        rest = await run_bounded(
            tx,
            self.statement((only, resume) if resume is not None else None, limit - len(rows)),
            self.parts.values,
        )
        return [*rows, *rest]

    async def _rows(
        self, tx: Tx, after: tuple[str, str] | None, limit: int
    ) -> list[asyncpg.Record]:
        if self.uses_window:
            return await self._windowed_rows(tx, after, limit)
        return await run_bounded(tx, self.statement(after, limit), self.parts.values)

    async def page(
        self, tx: Tx, after: tuple[str, str] | None, limit: int
    ) -> tuple[list[dict[str, Any]], tuple[str, str] | None]:
        """Up to `limit` entities in the API's shape, and the position to continue from
        (None when this was the last page)."""
        rows = await self._rows(tx, after, limit + 1)
        if not rows and self.scope.fingerprint is not None:
            remembered = await _load_definitions(tx)
            if remembered[0] != self.scope.fingerprint:  # changed since: run it afresh
                self._build(_scope(self.scope.org_id, remembered, self.scope.fixed, self.query))
                rows = await self._rows(tx, after, limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        found = [self._entity(row) for row in rows]
        last = (rows[-1]["blueprint"], rows[-1]["identifier"]) if more and rows else None
        return found, last

    async def calculate(self, found: list[dict[str, Any]]) -> None:
        """Add the calculation properties to entities `page` read (in place, unless the
        search leaves them out). jq runs in the sandbox meanwhile: call this with no
        transaction open, so no connection waits on it."""
        if not self.calculated:
            return
        for bp in self.scope.searched:
            await calculate(
                self.scope.blueprints[bp],
                [e for e in found if e["blueprint"] == bp],
                org=self.scope.org_id,
            )

    def document_statement(
        self, after: tuple[str, str] | None, limit: int, *, keyed: bool = False
    ) -> sa.Select[Any]:
        """`statement` with each entity as the JSON text the API answers with (`doc`,
        scorecards left out: `document_page` names them), in the same order; runs with
        `values()` (and, `keyed`, the page's position and limit: see `statement`)."""
        row = self.statement(after, limit, keyed=keyed).subquery("p")
        doc = document(self.scope, row, derived=self.parts.derived is not None, titles=self.titles)
        # The statement's own order (one blueprint: identifiers only), which PostgreSQL
        # keeps without sorting the documents again.
        order = (
            [row.c.identifier]
            if len(self.scope.searched) == 1
            else [row.c.blueprint, row.c.identifier]
        )
        return sa.select(
            doc.label("doc"), row.c.blueprint, row.c.identifier, row.c.scorecards
        ).order_by(*order)

    def _document_select(self, after: tuple[str, str] | None, limit: int, *, keyed: bool) -> Any:
        inner = self.document_statement(after, limit, keyed=keyed).subquery("j")
        # bytea: asyncpg hands the bytes over as they arrive (no text decoding).
        return sa.select(
            sa.func.convert_to(inner.c.doc, sa.literal_column("'UTF8'")).label("doc"),
            inner.c.blueprint,
            inner.c.identifier,
            inner.c.scorecards,
        )

    async def _document_rows(
        self, tx: Tx, after: tuple[str, str] | None, limit: int
    ) -> list[asyncpg.Record]:
        if after is not None and len(self.scope.searched) == 1:
            only = self.scope.searched[0]
            if after[0] > only:
                return []
            if after[0] < only:
                after = None  # the blueprint's entities all come after it
        compiled = self._documents.get(after is not None)
        if compiled is None:
            compiled = Compiled(self._document_select(after, limit, keyed=True))
            self._documents[after is not None] = compiled
        if not compiled.reusable:
            return await run_bounded(
                tx, self._document_select(after, limit, keyed=False), self.parts.values
            )
        values = {**self.parts.values, "page_limit": limit}
        if after is not None:
            values["after_blueprint"], values["after_identifier"] = after
        sql, args = compiled.bind(values)
        return await run_bounded(tx, sql, positional=args)

    async def document_page(self, tx: Tx, after: tuple[str, str] | None, limit: int) -> Documents:
        """Up to `limit` entities as JSON (as `page` reads them, calculation properties
        not yet added: `complete_documents`)."""
        rows = await self._document_rows(tx, after, limit + 1)
        if not rows and self.scope.fingerprint is not None:
            remembered = await _load_definitions(tx)
            if remembered[0] != self.scope.fingerprint:  # changed since: run it afresh
                self._build(_scope(self.scope.org_id, remembered, self.scope.fixed, self.query))
                rows = await self._document_rows(tx, after, limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        docs = [self.named_scorecards(row) for row in rows]
        last = (rows[-1]["blueprint"], rows[-1]["identifier"]) if more and rows else None
        return Documents([row["blueprint"] for row in rows], docs, last)

    def named_scorecards(self, row: asyncpg.Record) -> bytes:
        """A row's document with its scorecard results, named by their definitions."""
        doc: bytes = row["doc"]
        if row["scorecards"]:
            named = scorecards_of(self.scope.blueprints[row["blueprint"]], row["scorecards"])
            doc = doc[:-1] + b',"scorecards":' + pydantic_core.to_json(named) + b"}"
        return doc

    async def complete_documents(self, page: Documents, pick: FieldFilter | None) -> None:
        """Adds the calculation properties to a page of documents (in place) and applies
        `pick` (include / exclude). Only the entities concerned become Python objects; jq
        runs in the sandbox meanwhile: call this with no transaction open."""
        calculated = {
            bp
            for bp in set(page.blueprints)
            if self.calculated and self.scope.blueprints[bp].get("calculationProperties")
        }
        picking = pick is not None and bool(pick.include or pick.exclude)
        if not calculated and not picking:
            return
        changed = [n for n, bp in enumerate(page.blueprints) if picking or bp in calculated]
        found = {n: pydantic_core.from_json(page.docs[n]) for n in changed}
        for bp in sorted(calculated):
            await calculate(
                self.scope.blueprints[bp],
                [found[n] for n in changed if page.blueprints[n] == bp],
                org=self.scope.org_id,
            )
        for n in changed:
            entity = pick.apply(found[n]) if pick is not None and picking else found[n]
            page.docs[n] = pydantic_core.to_json(entity)

    async def stream_documents(
        self, db: Database, org_id: uuid.UUID, pick: FieldFilter | None = None
    ) -> AsyncIterator[bytes]:
        """Every match as JSON documents joined by commas, a page per short transaction
        (memory stays bounded by a page), starting with the page `prepare` read (completed
        by the caller before the answer's headers). The next page is read while this one
        is sent: the database builds documents while the server writes them out."""
        page = self.first_documents
        self.first_documents = None

        async def read(after: tuple[str, str]) -> Documents:
            async with db.tenant(org_id) as tx:
                return await self.document_page(tx, after, _DOC_PAGE)

        if page is None:
            async with db.tenant(org_id) as tx:
                page = await self.document_page(tx, None, _DOC_PAGE)
            await self.complete_documents(page, pick)
        first = True
        while True:
            following = asyncio.ensure_future(read(page.last)) if page.last else None
            try:
                if page.docs:
                    yield (b"" if first else b",") + b",".join(page.docs)
                    first = False
                if following is None:
                    return
                page = await following
            finally:
                if following is not None and not following.done():
                    following.cancel()
                    with contextlib.suppress(BaseException):
                        await following
            await self.complete_documents(page, pick)

    def _entity(self, row: asyncpg.Record) -> dict[str, Any]:
        state = row_state(row)
        derived = row["derived"] if self.derived is not None else None
        if derived:
            team = derived.pop("$team", None)
            if team is not None:  # ownership inherited through a relation path
                state["team"] = team
            state["properties"] = {**state["properties"], **derived}
        blueprint = self.scope.blueprints[row["blueprint"]]
        entity = to_api(blueprint, state)
        if row["scorecards"]:
            entity["scorecards"] = scorecards_of(blueprint, row["scorecards"])
        return entity

    async def stream(self, db: Database, org_id: uuid.UUID) -> AsyncIterator[dict[str, Any]]:
        """Every match, a page per short transaction (memory stays flat), each page's
        calculations evaluated after its transaction, starting with the first page read
        by `prepare` when there is one (the caller evaluates its calculations: `calculate`,
        before the answer's headers go out)."""
        after: tuple[str, str] | None = None
        if self.first is not None:
            found, after = self.first
            self.first = None
            for entity in found:
                yield entity
            if after is None:
                return
        while True:
            async with db.tenant(org_id) as tx:
                found, after = await self.page(tx, after, _PAGE)
            await self.calculate(found)
            for entity in found:
                yield entity
            if after is None:
                return


@dataclass
class Documents:
    """A page of entities as JSON (UTF-8), each with its blueprint, and the position to
    continue from (None after the last page)."""

    blueprints: list[str]
    docs: list[bytes]
    last: tuple[str, str] | None


# One entity by its key: the document statement compiled once per (org, blueprint,
# definitions' fingerprint, titles), so a read builds no statement (building and keying a
# search statement was most of the route's own CPU).
_ONE_SIZE = 2048
_ones: OrderedDict[tuple[Any, ...], tuple[str, list[Any], int]] = OrderedDict()
_IDENTIFIER = object()


def _one_statement(search: Search) -> tuple[str, list[Any], int]:
    scope = search.scope
    key = (scope.org_id, scope.fixed, scope.fingerprint, search.titles)
    found = _ones.get(key)
    if found is not None:
        _ones.move_to_end(key)
        return found
    only = sa.bindparam("one_identifier", type_=sa.String)
    row = search.statement(None, 1).where(search.parts.entity.c.identifier == only).subquery("p")
    doc = document(scope, row, derived=search.parts.derived is not None, titles=search.titles)
    stmt = sa.select(
        sa.func.convert_to(doc, sa.literal_column("'UTF8'")).label("doc"),
        row.c.blueprint,
        row.c.identifier,
        row.c.scorecards,
    )
    sql, args = compile_query(stmt, (), {**search.parts.values, "one_identifier": _IDENTIFIER})
    found = _ones[key] = (sql, list(args), list(args).index(_IDENTIFIER))
    if len(_ones) > _ONE_SIZE:
        _ones.popitem(last=False)
    return found


async def read_one(
    tx: Tx, blueprint: str, identifier: str, *, calculated: bool = True, titles: bool = False
) -> tuple[Search, Documents]:
    """One entity as the JSON the API answers with (a page of at most one document;
    calculation properties still to add: `Search.complete_documents`)."""
    search = Search(
        await scope_for(tx, blueprint, None), None, calculated=calculated, titles=titles
    )
    for attempt in (0, 1):
        sql, args, at = _one_statement(search)
        args = [*args[:at], identifier, *args[at + 1 :]]
        rows = await run_bounded(tx, sql, positional=args)
        if rows or attempt or search.scope.fingerprint is None:
            break
        remembered = await _load_definitions(tx)
        if remembered[0] == search.scope.fingerprint:
            break
        search._build(_scope(search.scope.org_id, remembered, blueprint, None))
    return search, Documents(
        [row["blueprint"] for row in rows], [search.named_scorecards(row) for row in rows], None
    )


def scorecards_of(blueprint: dict[str, Any], stored: dict[str, Any]) -> dict[str, Any]:
    """Stored results ({scorecard: [level rank, rule outcomes]}) in Port's shape, named by
    the scorecards' definitions: {scorecard: {level, rules: [{identifier, status, level}]}}."""
    out: dict[str, Any] = {}
    for card_id, (rank, passed) in stored.items():
        card = blueprint.get("scorecards", {}).get(card_id)
        if card is None or not 0 <= rank < len(card["levels"]):
            continue  # deleted or redefined meanwhile: its results are about to go
        out[card_id] = {
            "level": card["levels"][rank],
            "rules": [
                {"identifier": rule, "status": "SUCCESS" if ok else "FAILURE", "level": level}
                for rule, level, ok in zip(card["rules"], card["rule_levels"], passed, strict=False)
            ],
        }
    return out
