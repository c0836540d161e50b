"""Scorecard evaluation: one SQL statement computes and stores every result.

For each scorecard, a subquery reads the entities (all of the blueprint, or the ones just
written) that pass the scorecard's filter, with one boolean per rule (the rule's conditions,
compiled by the search compiler; a rule whose value is unknown fails). The entity's level
is the last level whose rules, and every lower level's, all pass:

    CASE WHEN NOT <Bronze rules> THEN 'Basic' WHEN NOT <Silver rules> THEN 'Bronze' ...
         ELSE 'Gold' END

The results go into `scorecard_results` with INSERT ... ON CONFLICT DO UPDATE (only rows
whose level or rules changed are written, and an evaluation never overwrites a later one:
results carry the scorecard version and the entity's updatedAt they were computed from),
and the results of entities the filter no longer takes are deleted — all in one statement.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert

from app.db.database import Database, Tx
from app.kit.errors import Invalid, PortolanError
from app.scorecards.definitions import to_rules
from app.scorecards.models import ScorecardResult
from app.search.compiler import Compiler, E
from app.search.service import fresh_scope, scope_for
from app.search.sql import Scope, run_bounded

log = logging.getLogger("portolan.scorecards")

RESULTS: sa.Table = ScorecardResult.__table__  # type: ignore[assignment]
_IDS = "score_ids"
_STORED = RESULTS.alias("stored")


@dataclass(frozen=True)
class Card:
    identifier: str
    levels: list[str]
    rules: list[dict[str, Any]]
    filter: dict[str, Any] | None
    version: int
    evaluated: int = 0  # the version whose results are stored (0: never evaluated)


def _card(row: Any) -> Card:
    return Card(
        identifier=row["identifier"],
        levels=[level["title"] for level in row["levels"]],
        rules=list(row["rules"]),
        filter=row["filter"],
        version=int(row["version"]),
        evaluated=int(row["evaluated_version"]),
    )


async def _load_cards(tx: Tx, blueprint: str, only: list[str] | None = None) -> list[Card]:
    rows = await tx.fetch(
        "SELECT identifier, levels, rules, filter, version, evaluated_version FROM scorecards "
        "WHERE org_id = $1 AND blueprint = $2 "
        "AND ($3::varchar[] IS NULL OR identifier = ANY($3::varchar[])) ORDER BY identifier",
        tx.org_id,
        blueprint,
        only,
    )
    return [_card(r) for r in rows]


Conditions = dict[tuple[str, int], Any]  # (scorecard, rule index) -> the rule's condition


def _condition(scope: Scope, card: Card, index: int) -> Any:
    return Compiler(scope, scan=True).compile(to_rules(card.rules[index]["query"]))


async def compiled_rules(scope: Scope, cards: list[Card]) -> Conditions:
    """Every rule's condition compiled, one rule per turn of the event loop. Building the
    conditions is most of the work of making an evaluation statement (~0.25 ms a rule):
    done at once, a scorecard of 20 rules held the loop, and every org's requests, for
    ~5 ms each time it was made."""
    found: Conditions = {}
    for card in cards:
        for index in range(len(card.rules)):
            found[(card.identifier, index)] = _condition(scope, card, index)
            await asyncio.sleep(0)
    return found


def _rule_flags(scope: Scope, card: Card, conditions: Conditions | None = None) -> list[Any]:
    """One boolean per rule: its conditions hold (unknown values fail)."""
    flags = []
    for index in range(len(card.rules)):
        condition = (
            conditions[(card.identifier, index)]
            if conditions is not None
            else _condition(scope, card, index)
        )
        flags.append(sa.func.coalesce(condition, sa.false()).label(f"r{index}"))
    return flags


def card_select(
    scope: Scope,
    blueprint: str,
    card: Card,
    *,
    only_ids: bool,
    fenced: bool = True,
    ranged: bool = False,
    conditions: Conditions | None = None,
) -> sa.Select[Any]:
    """(org_id, scorecard, identifier, level_rank, passed, version, entity_at) of the
    entities the card applies to (those named by the `score_ids` parameter, with `only_ids`).
    `fenced=False`: let the planner merge the rules into what reads them (for a query that
    reads only the level: it then stops at a level's first failing rule). `conditions`: the
    rules compiled beforehand (compiled_rules)."""
    where = [
        E.c.org_id == sa.bindparam(None, scope.org_id),
        E.c.blueprint == sa.bindparam(None, blueprint),
    ]
    if only_ids:
        where.append(E.c.identifier == sa.any_(_ids_param()))
    if ranged:
        where.append(_in_range(E.c.identifier))
    if card.filter is not None:
        where.append(Compiler(scope, scan=True).compile(to_rules(card.filter)))
    inner_select = sa.select(
        E.c.org_id, E.c.identifier, E.c.updated_at, *_rule_flags(scope, card, conditions)
    ).where(*where)
    if fenced:
        # OFFSET 0 keeps the planner from merging this subquery into the outer one, which
        # would copy every rule into both the level and the outcomes (each ran twice).
        inner_select = inner_select.offset(0)
    inner = inner_select.subquery("scored")
    by_level: list[list[Any]] = [[] for _ in card.levels]
    for index, rule in enumerate(card.rules):
        by_level[card.levels.index(rule["level"])].append(inner.c[f"r{index}"])
    whens = [
        (sa.not_(sa.and_(sa.true(), *by_level[rank])), rank - 1)
        for rank in range(1, len(card.levels))
    ]
    top = len(card.levels) - 1
    rank_expr: Any = sa.case(*whens, else_=top) if whens else sa.literal(top)
    flags = [inner.c[f"r{index}"] for index in range(len(card.rules))]
    passed: Any = (
        postgresql.array(flags, type_=sa.Boolean) if flags else sa.literal_column("'{}'::boolean[]")
    )
    return sa.select(
        inner.c.org_id,
        sa.literal(card.identifier, sa.String).label("scorecard"),
        inner.c.identifier,
        sa.cast(rank_expr, sa.SmallInteger).label("level_rank"),
        passed.label("passed"),
        sa.literal(card.version, sa.Integer).label("version"),
        inner.c.updated_at.label("entity_at"),
    )


def _in_range(identifier: Any) -> Any:
    """`range_from` <= identifier < `range_to` (either end open when its value is null)."""
    low = sa.bindparam("range_from", type_=sa.String)
    high = sa.bindparam("range_to", type_=sa.String)
    return sa.and_(
        sa.or_(sa.cast(low, sa.Text).is_(None), identifier >= low),
        sa.or_(sa.cast(high, sa.Text).is_(None), identifier < high),
    )


def _ids_param() -> Any:
    return sa.cast(sa.bindparam(_IDS, type_=ARRAY(sa.String)), ARRAY(sa.String))


def evaluation(
    scope: Scope,
    blueprint: str,
    cards: list[Card],
    *,
    only_ids: bool,
    ranged: bool = False,
    plain: bool = False,
    conditions: Conditions | None = None,
) -> sa.Insert:
    """The one statement that evaluates `cards` and stores the results: an upsert, and —
    for scorecards with a filter — a delete of the results of entities it no longer takes
    (a data-modifying CTE of the same statement)."""
    fresh = sa.union_all(
        *(
            card_select(
                scope, blueprint, card, only_ids=only_ids, ranged=ranged, conditions=conditions
            )
            for card in cards
        )
    ).subquery("fresh")
    filtered = [card for card in cards if card.filter is not None]
    # The row's org: the entities' own column, which lets Citus push the INSERT ... SELECT
    # down to the org's shard (it does only when the distribution column comes from the
    # table read). With a filter the statement also deletes in a CTE, which Citus plans
    # in steps: there the insert, pushed down, would run a step from the shard, which
    # Citus refuses; it keeps the bound org (the same value) and goes through the
    # coordinator.
    org_id: Any = (
        sa.bindparam(None, scope.org_id, type_=RESULTS.c.org_id.type)
        if filtered and not plain
        else fresh.c.org_id
    )
    insert = pg_insert(RESULTS).from_select(
        [
            "org_id",
            "blueprint",
            "identifier",
            "scorecard",
            "level_rank",
            "passed",
            "version",
            "entity_at",
        ],
        # Only results that change go on to the upsert (a re-evaluation mostly changes
        # few): the stored ones are joined first, which costs far less than the upsert's
        # conflict handling for every row.
        sa.select(
            org_id,
            sa.literal(blueprint, sa.String),
            fresh.c.identifier,
            fresh.c.scorecard,
            fresh.c.level_rank,
            fresh.c.passed,
            fresh.c.version,
            fresh.c.entity_at,
        )
        .select_from(
            fresh.outerjoin(
                _STORED,
                sa.and_(
                    _STORED.c.org_id == sa.bindparam(None, scope.org_id),
                    _STORED.c.blueprint == sa.bindparam(None, blueprint),
                    _STORED.c.identifier == fresh.c.identifier,
                    _STORED.c.scorecard == fresh.c.scorecard,
                ),
            )
        )
        .where(
            sa.or_(
                _STORED.c.identifier.is_(None),
                sa.and_(
                    sa.tuple_(_STORED.c.level_rank, _STORED.c.passed)
                    != sa.tuple_(fresh.c.level_rank, fresh.c.passed),
                    sa.tuple_(_STORED.c.version, _STORED.c.entity_at)
                    <= sa.tuple_(fresh.c.version, fresh.c.entity_at),
                ),
            )
        ),
    )
    if plain:
        # No stored results to meet (a first evaluation): a plain INSERT, about half the
        # cost of one that handles conflicts. A conflict (a result an entity write stored
        # meanwhile) fails it, and the caller runs the upsert instead.
        return insert
    excluded = insert.excluded
    upsert = insert.on_conflict_do_update(
        index_elements=["org_id", "blueprint", "identifier", "scorecard"],
        set_={
            "level_rank": excluded.level_rank,
            "passed": excluded.passed,
            "version": excluded.version,
            "entity_at": excluded.entity_at,
        },
        # Only what changed is written, and never from an older evaluation.
        where=sa.and_(
            sa.tuple_(RESULTS.c.version, RESULTS.c.entity_at)
            <= sa.tuple_(excluded.version, excluded.entity_at),
            sa.tuple_(RESULTS.c.level_rank, RESULTS.c.passed)
            != sa.tuple_(excluded.level_rank, excluded.passed),
        ),
    )
    if not filtered:
        return upsert
    # Results of entities a filter no longer takes: each checked against its entity.
    left_out = []
    for card in filtered:
        assert card.filter is not None
        outside = sa.exists().where(
            E.c.org_id == RESULTS.c.org_id,
            E.c.blueprint == RESULTS.c.blueprint,
            E.c.identifier == RESULTS.c.identifier,
            sa.not_(sa.func.coalesce(Compiler(scope).compile(to_rules(card.filter)), sa.false())),
        )
        left_out.append(sa.and_(RESULTS.c.scorecard == card.identifier, outside))
    gone = RESULTS.delete().where(
        RESULTS.c.org_id == sa.bindparam(None, scope.org_id, type_=RESULTS.c.org_id.type),
        RESULTS.c.blueprint == sa.bindparam(None, blueprint),
        sa.or_(*left_out),
    )
    if only_ids:
        gone = gone.where(RESULTS.c.identifier == sa.any_(_ids_param()))
    if ranged:
        gone = gone.where(_in_range(RESULTS.c.identifier))
    statement: sa.Insert = upsert.add_cte(gone.returning(sa.literal(1)).cte("left_out"))
    return statement


# Per (org, blueprint): the blueprint version the cards were read at, the cards, and the
# statement that evaluates them for given entities. A scorecard change counts up the
# blueprint's version, which entity writes check.
_CACHE_SIZE = 1024
_cached: OrderedDict[tuple[uuid.UUID, str], tuple[Any, list[Card], Any]] = OrderedDict()


def _reaches(scope: Scope, blueprint: str, name: str) -> set[str]:
    """The other blueprints whose entities a property of `blueprint` reads: a mirror's
    path, an aggregation's target, inherited ownership's path."""
    definition = scope.blueprints.get(blueprint) or {}
    paths: list[str] = []
    mirror = (definition.get("mirrorProperties") or {}).get(name)
    if isinstance(mirror, dict):
        paths.append(str(mirror.get("path", "")).rsplit(".", 1)[0])
    ownership = definition.get("ownership") or {}
    if name == "$team" and ownership.get("type") == "Inherited":
        paths.append(str(ownership.get("path", "")))
    found: set[str] = set()
    aggregation = (definition.get("aggregationProperties") or {}).get(name)
    if isinstance(aggregation, dict) and isinstance(aggregation.get("target"), str):
        found.add(aggregation["target"])
    for path in paths:
        current = blueprint
        for hop in filter(None, path.split(".")):
            relation = (scope.blueprints.get(current) or {}).get("relations", {}).get(hop)
            if relation is None:
                break
            current = relation["target"]
            found.add(current)
    return found


_DEPENDENTS_SIZE = 4096
_dependents: OrderedDict[tuple[uuid.UUID, str | None, str], list[tuple[str, str]]] = OrderedDict()


def dependents(scope: Scope, written: str) -> list[tuple[str, str]]:
    """(blueprint, scorecard) of every scorecard whose rules read entities of `written`
    through relations (remembered per org definitions' fingerprint)."""
    key = (scope.org_id, scope.fingerprint, written)
    found = _dependents.get(key)
    if found is None:
        found = _dependents[key] = _find_dependents(scope, written)
        if len(_dependents) > _DEPENDENTS_SIZE:
            _dependents.popitem(last=False)
    return found


def _find_dependents(scope: Scope, written: str) -> list[tuple[str, str]]:
    out = []
    for bp, definition in scope.blueprints.items():
        for card_id, card in (definition.get("scorecards") or {}).items():
            if any(written in _reaches(scope, bp, name) for name in card.get("reads", [])):
                out.append((bp, card_id))
    return out


async def request_refresh(tx: Tx, blueprint: str) -> None:
    """Entities of `blueprint` changed: the scorecards that read them through relations are
    evaluated again by the worker (flagged without waiting on a lock held elsewhere)."""
    scope = await scope_for(tx, blueprint, None)
    concerned = dependents(scope, blueprint)
    if not concerned:
        return
    # A row another writer is flagging (locked) is skipped: it will be flagged anyway, and
    # concurrent writes never queue behind each other here.
    await tx.execute(
        "UPDATE scorecards SET refresh_requested = true WHERE ctid = ANY(ARRAY("
        "SELECT ctid FROM scorecards WHERE org_id = $1 "
        "AND (blueprint, identifier) IN (SELECT * FROM unnest($2::text[], $3::text[])) "
        "AND NOT refresh_requested FOR UPDATE SKIP LOCKED))",
        tx.org_id,
        [bp for bp, _ in concerned],
        [card for _, card in concerned],
    )


async def evaluate_entities(tx: Tx, blueprint: dict[str, Any], identifiers: list[str]) -> None:
    """Re-evaluates the blueprint's scorecards for entities just written, in the writer's
    transaction (an entity's results change with it), and asks for the re-evaluation of
    scorecards elsewhere that read these entities through relations."""
    if not identifiers:
        return
    await request_refresh(tx, blueprint["identifier"])
    assert tx.org_id is not None
    key = (tx.org_id, blueprint["identifier"])
    cached = _cached.get(key)
    if cached is None or cached[0] != blueprint["version"]:
        cards = await _load_cards(tx, blueprint["identifier"])
        statement = None
        if cards:
            try:
                statement = await _statement(tx, blueprint["identifier"], cards, only_ids=True)
            except Invalid as exc:
                # A rule no longer applies to the blueprint (a property renamed or removed
                # since): the write goes ahead, the scorecard's results wait for its fix.
                log.warning(
                    "scorecard no longer compiles",
                    extra={"blueprint": blueprint["identifier"], "error": exc.message},
                )
        cached = (blueprint["version"], cards, statement)
        _cached[key] = cached
        if len(_cached) > _CACHE_SIZE:
            _cached.popitem(last=False)
    _cached.move_to_end(key)
    statement = cached[2]
    if statement is not None:
        await run_bounded(tx, statement, {_IDS: identifiers})


async def _statement(tx: Tx, blueprint: str, cards: list[Card], *, only_ids: bool) -> Any:
    scope = await scope_for(tx, blueprint, None)
    try:
        conditions = await compiled_rules(scope, cards)
    except Invalid:
        # Remembered definitions older than a rule: compile against the committed ones.
        scope = await fresh_scope(tx, blueprint, None)
        conditions = await compiled_rules(scope, cards)
    return evaluation(scope, blueprint, cards, only_ids=only_ids, conditions=conditions)


# A whole blueprint is evaluated in this many identifier ranges at once (each its own
# statement and transaction), once it holds PART_SIZE entities per range: the statement
# writes, and PostgreSQL runs no writing statement in parallel by itself.
PARALLEL = 2
PART_SIZE = 20_000


async def evaluate_blueprint(
    db: Database, org_id: uuid.UUID, blueprint: str, only: list[str] | None = None
) -> int:
    """Evaluates the blueprint's scorecards (or the named ones) for all of its entities and
    marks the versions evaluated; returns how many scorecards were evaluated."""
    async with db.tenant(org_id) as tx:
        cards = await _load_cards(tx, blueprint, only)
        if not cards:
            return 0
        scope = await fresh_scope(tx, blueprint, None)
        try:
            conditions = await compiled_rules(scope, cards)
            statement = evaluation(
                scope, blueprint, cards, only_ids=False, ranged=True, conditions=conditions
            )
        except Invalid as exc:
            # A blueprint change left a rule that no longer applies (a removed property):
            # its results stay as they were until the scorecard is changed.
            log.warning(
                "scorecard no longer compiles",
                extra={"blueprint": blueprint, "error": exc.message},
            )
            await _mark(tx, blueprint, cards)
            return 0
        size = int(
            await tx.fetchval(
                "SELECT count(*) FROM entities WHERE org_id = $1 AND blueprint = $2",
                org_id,
                blueprint,
            )
        )
        parts = max(1, min(PARALLEL, size // PART_SIZE))
        fresh = all(card.evaluated == 0 for card in cards) and not await tx.fetchval(
            "SELECT EXISTS (SELECT 1 FROM scorecard_results WHERE org_id = $1 "
            "AND blueprint = $2 AND scorecard = ANY($3::varchar[]))",
            org_id,
            blueprint,
            [card.identifier for card in cards],
        )
        first = (
            evaluation(
                scope,
                blueprint,
                cards,
                only_ids=False,
                ranged=True,
                plain=True,
                conditions=conditions,
            )
            if fresh
            else None
        )
        edges: list[str | None] = [None]
        for k in range(1, parts):
            edges.append(
                await tx.fetchval(
                    "SELECT identifier FROM entities WHERE org_id = $1 AND blueprint = $2 "
                    "ORDER BY identifier OFFSET $3 LIMIT 1",
                    org_id,
                    blueprint,
                    size * k // parts,
                )
            )
        edges.append(None)

    async def part(low: str | None, high: str | None) -> None:
        values = {"range_from": low, "range_to": high}
        async with db.tenant(org_id) as tx:
            if first is not None:
                await tx.execute("SAVEPOINT first_evaluation")
                try:
                    await run_bounded(tx, first, values)
                except asyncpg.UniqueViolationError:
                    await tx.execute("ROLLBACK TO SAVEPOINT first_evaluation")
                else:
                    return
            await run_bounded(tx, statement, values)

    await asyncio.gather(*(part(edges[i], edges[i + 1]) for i in range(parts)))
    async with db.tenant(org_id) as tx:
        await _mark(tx, blueprint, cards)
    return len(cards)


async def _mark(tx: Tx, blueprint: str, cards: list[Card]) -> None:
    """The cards' versions are evaluated (and any earlier failure is over)."""
    for card in cards:
        await tx.execute(
            "UPDATE scorecards SET evaluated_version = greatest(evaluated_version, $4), "
            "evaluation_failures = 0, evaluation_error = NULL, evaluation_retry_at = NULL "
            "WHERE org_id = $1 AND blueprint = $2 AND identifier = $3",
            tx.org_id,
            blueprint,
            card.identifier,
            card.version,
        )


# The worker's pass (evaluate_pending). Organizations take turns: each is evaluated by one
# pass at a time across every worker process (an advisory lock on the org held for its
# evaluation; a pass finding it held moves on to the next org), at most CONCURRENCY orgs
# at once per pass, in a new random order each pass. A blueprint whose evaluation fails
# (a statement past the timeout, a rule that no longer compiles against the data) is not
# tried again until its backoff has passed: RETRY_BASE_SECONDS doubling per failure in a
# row, up to RETRY_MAX_SECONDS; the failure is logged and kept on its scorecards
# (`evaluation_failures`, `evaluation_error`, `evaluation_retry_at`; the API shows the
# scorecard as `failing` with the reason) and the pass goes on with the other orgs.
# Overlapping passes of one process share its CONCURRENCY slots.
CONCURRENCY = 4
RETRY_BASE_SECONDS = 30.0
RETRY_MAX_SECONDS = 3600.0
_LOCK_SQL = "SELECT pg_try_advisory_xact_lock(hashtextextended('scorecards/' || $1::text, 0))"
_PENDING_SQL = (
    "SELECT org_id, blueprint, array_agg(identifier ORDER BY identifier) AS cards "
    "FROM scorecards WHERE (refresh_requested OR evaluated_version < version) "
    "AND (evaluation_retry_at IS NULL OR evaluation_retry_at <= now()) "
    "AND ($1::uuid IS NULL OR org_id = $1) GROUP BY org_id, blueprint ORDER BY org_id, blueprint"
)


async def _failed(
    db: Database,
    org_id: uuid.UUID,
    blueprint: str,
    cards: list[str],
    error: BaseException,
    retry: tuple[float, float],
) -> None:
    message = _describe(error)
    async with db.tenant(org_id) as tx:
        rows = await tx.fetch(
            "UPDATE scorecards SET evaluation_failures = evaluation_failures + 1, "
            "evaluation_error = $4, refresh_requested = true, "
            "evaluation_retry_at = now() + make_interval(secs => least($6::float8, "
            "$5::float8 * power(2, evaluation_failures))) "
            "WHERE org_id = $1 AND blueprint = $2 AND identifier = ANY($3::varchar[]) "
            "RETURNING identifier, evaluation_failures, evaluation_retry_at",
            org_id,
            blueprint,
            cards,
            message,
            retry[0],
            retry[1],
        )
    log.warning(
        "scorecard evaluation failed; tried again after a backoff",
        extra={
            "org_id": str(org_id),
            "blueprint": blueprint,
            "scorecards": cards,
            "error": message,
            "failures": max((r["evaluation_failures"] for r in rows), default=0),
            "retry_at": max((r["evaluation_retry_at"] for r in rows), default=None),
        },
    )


def _describe(error: BaseException) -> str:
    """What the tenant is told about a failed evaluation (no internals)."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, asyncpg.QueryCanceledError):
            return (
                "the evaluation ran past the statement timeout: narrow the scorecard's rules "
                "or filter (fewer hops, more selective conditions)"
            )
        cause = cause.__cause__
    if isinstance(error, PortolanError):
        return f"the evaluation failed: {error.message}"[:500]
    if isinstance(error, asyncpg.PostgresError):
        return f"the evaluation failed: {error.__class__.__name__}: {error}"[:500]
    return f"the evaluation failed: {error.__class__.__name__}"


async def _evaluate_org(db: Database, org_id: uuid.UUID, retry: tuple[float, float]) -> int | None:
    """The org's lagging scorecards, one blueprint after another, while holding the org's
    lock; None when another pass holds it."""
    async with db.system() as lock:
        if not await lock.fetchval(_LOCK_SQL, str(org_id)):
            return None
        async with db.system() as tx:
            pending = await tx.fetch(_PENDING_SQL, org_id)
        done = 0
        for row in pending:
            cards = list(row["cards"])
            async with db.tenant(org_id) as tx:
                # Refresh requests are taken (cleared) in this short transaction: one made
                # while the evaluation runs stays for the next pass.
                await tx.execute(
                    "UPDATE scorecards SET refresh_requested = false WHERE org_id = $1 "
                    "AND blueprint = $2 AND identifier = ANY($3::varchar[]) AND refresh_requested",
                    org_id,
                    row["blueprint"],
                    cards,
                )
            try:
                done += await evaluate_blueprint(db, org_id, row["blueprint"], cards)
            except Exception as exc:  # recorded on the scorecards and logged
                await _failed(db, org_id, row["blueprint"], cards, exc, retry)
        return done


# Evaluations at once in this process, shared by overlapping passes (a pass every 2 s
# while an earlier one still runs): per event loop and concurrency.
_SEMAPHORES: dict[tuple[int, int], asyncio.Semaphore] = {}


def _slots(concurrency: int) -> asyncio.Semaphore:
    key = (id(asyncio.get_running_loop()), max(1, concurrency))
    found = _SEMAPHORES.get(key)
    if found is None:
        if len(_SEMAPHORES) > 16:  # loops of finished tests or restarts
            _SEMAPHORES.clear()
        found = _SEMAPHORES[key] = asyncio.Semaphore(key[1])
    return found


async def evaluate_pending(
    db: Database,
    *,
    concurrency: int = CONCURRENCY,
    retry_base: float = RETRY_BASE_SECONDS,
    retry_max: float = RETRY_MAX_SECONDS,
) -> int:
    """The worker's pass: every scorecard whose stored results lag its definition (or that
    was asked to refresh), and is not backing off from a failure, is evaluated for its whole
    blueprint. Orgs take turns (see above); one org's failure or slow evaluation never ends
    or holds up another's. Returns how many scorecards were evaluated."""
    async with db.system() as tx:
        orgs = [
            r["org_id"]
            for r in await tx.fetch(
                "SELECT DISTINCT org_id FROM scorecards "
                "WHERE (refresh_requested OR evaluated_version < version) "
                "AND (evaluation_retry_at IS NULL OR evaluation_retry_at <= now())"
            )
        ]
    random.shuffle(orgs)
    slots = _slots(concurrency)

    async def turn(org_id: uuid.UUID) -> int:
        async with slots:
            try:
                return await _evaluate_org(db, org_id, (retry_base, retry_max)) or 0
            except Exception:
                log.exception(
                    "scorecard evaluation of an org failed", extra={"org_id": str(org_id)}
                )
                return 0

    done = sum(await asyncio.gather(*(turn(org) for org in orgs)))
    if done:
        log.info("scorecards evaluated", extra={"scorecards": done})
    return done
