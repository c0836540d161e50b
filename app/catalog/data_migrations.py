"""Data migrations (Port's `/v1/migrations`): a blueprint's entities moved or transformed by
jq mappings, as background work with progress, a dry run, cancellation and an audit trail.

A migration maps each entity of `sourceBlueprint` (the entity as the API shows it: its
identifier, title, icon, team, properties, relations, dates) through Port's mapping
(`filter`, `itemsToParse`, `entity.identifier / title / icon / team / properties /
relations`, each a jq expression) to entities of `mapping.blueprint` (the source blueprint
when absent: a property's type changed in place), upserted and merged through the catalog's
entity writer with the starter's permissions, checked against the target blueprint for
each entity (and, with `deleteSourceEntities`, against the source blueprint for each
entity deleted: entities moved). `dryRun` writes nothing: the same writes are validated
only, and the migration reports what would be created, updated, left unchanged, deleted,
and what would fail, with a preview of the first entities.

The work is durable in PostgreSQL, not in the queue: the worker (`advance`, every second)
takes, org by org, the oldest active migration of each org and does one batch of it
(BATCH source entities in identifier order, after `cursor`, created before the migration
was): claimed with a lease and read in a short transaction, its jq evaluated in the
sandbox with no transaction open, then written in one transaction that also advances the
cursor and the counts and checks the lease and the status. A worker that stops leaves its
batch uncommitted and its lease to expire: the next one resumes at the cursor, nothing lost
and nothing written twice. A cancel seen by that transaction discards the batch.

Fairness: one org has at most `migrations_max_active_per_org` migrations pending or running
(more is a 409) and one batch in work at a time; orgs take turns batch by batch (at most
`migrations_concurrency` orgs' batches at once in a process), so a 100k-entity migration
of one org delays another org's by at most one batch per round. The jq runs in the
sandbox's fair turns (a chunk of CHUNK entities per call); an org whose calls keep running
past the time limit fails its migration after MAX_TIMEOUTS such entities.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg
import pydantic_core

from app.auth import permissions
from app.auth.principal import Principal, principal_of
from app.catalog import blueprints as bp_service
from app.catalog import entities
from app.catalog.validation import Problems, check_jq, json_type
from app.db.database import Database, Tx
from app.kit import fairloop, sandbox
from app.kit.errors import Conflict, Invalid, NotFound, PortolanError

log = logging.getLogger("portolan.migrations")

BATCH = 500  # source entities per batch (one write transaction)
CHUNK = 100  # contexts per sandbox call
MAX_ERRORS = 200  # per-entity failures kept on a migration (all are counted)
MAX_PREVIEW = 50  # entities a dry run shows
MAX_ITEMS = 100  # itemsToParse items per source entity
MAX_TIMEOUTS = 5  # entities whose jq ran past the time limit before the migration fails
MAX_EXPRESSIONS = 300
MAX_LIST = 1000
PASS_SECONDS = 50.0
LEASE_SECONDS = 60.0
OUTPUT_LIMIT_BYTES = 256 * 1024
ORIGIN = "MIGRATION"

ACTIVE = ("PENDING", "RUNNING", "PENDING_CANCELLATION")
STATUSES = (
    "COMPLETED",
    "RUNNING",
    "PENDING",
    "INITIALIZING",
    "FAILURE",
    "CANCELLED",
    "PENDING_CANCELLATION",
)
_TRANSIENT: tuple[type[BaseException], ...] = (
    asyncpg.TransactionRollbackError,
    asyncpg.LockNotAvailableError,
    asyncpg.QueryCanceledError,
    asyncpg.InterfaceError,
    OSError,
    sandbox.Busy,
)
T = TypeVar("T")


# ---------------------------------------------------------------------------------------
# Definitions


def _fields(mapping: dict[str, Any]) -> list[tuple[str, str]]:
    """(pointer, expression) of the entity's jq, in a fixed order; the identifier defaults
    to the source entity's."""
    entity = mapping.get("entity") or {}
    found = [("/mapping/entity/identifier", entity.get("identifier") or ".identifier")]
    for key in ("title", "icon", "team"):
        if entity.get(key) is not None:
            found.append((f"/mapping/entity/{key}", entity[key]))
    for group in ("properties", "relations"):
        for name, expression in (entity.get(group) or {}).items():
            found.append((f"/mapping/entity/{group}/{_escape(name)}", expression))
    return found


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


async def create(
    tx: Tx,
    principal: Principal,
    source: str,
    mapping: dict[str, Any],
    *,
    dry_run: bool,
    delete_source: bool,
    max_active: int = 3,
) -> dict[str, Any]:
    """Checks the migration (blueprints, names, jq, the starter's permissions, the org's
    cap: `max_active` pending or running) and records it PENDING for the worker."""
    target = mapping.get("blueprint") or source
    source_def = await bp_service.get(tx, source)
    target_def = source_def if target == source else await bp_service.get(tx, target)
    problems = Problems()
    if delete_source and target == source:
        problems.add(
            "/deleteSourceEntities",
            "entities cannot be moved to their own blueprint (leave it false to update them)",
        )
    elif delete_source and tx.citus:
        # A batch's deletes beside its writes make its transaction span two servers there.
        problems.add(
            "/deleteSourceEntities",
            "moving entities is not supported on a Citus cluster yet: migrate them (without "
            "deleteSourceEntities), then delete the source's entities",
        )
    declared = target_def["schema"].get("properties", {})
    entity = mapping.get("entity") or {}
    for name in entity.get("properties") or {}:
        if name not in declared:
            problems.add(
                f"/mapping/entity/properties/{_escape(name)}",
                f"blueprint {target!r} has no property {name!r}",
            )
    for name in entity.get("relations") or {}:
        if name not in target_def["relations"]:
            problems.add(
                f"/mapping/entity/relations/{_escape(name)}",
                f"blueprint {target!r} has no relation {name!r}",
            )
    expressions = [
        *(
            ("/mapping/" + key, mapping[key])
            for key in ("filter", "itemsToParse")
            if mapping.get(key)
        ),
        *_fields(mapping),
    ]
    if len(expressions) > MAX_EXPRESSIONS:
        problems.add("/mapping/entity", f"a mapping has at most {MAX_EXPRESSIONS} expressions")
    else:
        for pointer, expression in expressions:
            check_jq(expression, pointer, problems)
    problems.raise_if_any("The migration is not valid")
    await require_writer(
        tx, principal, target_def["identifier"], delete_from=(source if delete_source else None)
    )
    # One creation at a time per org, so two cannot both pass the cap.
    await tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('catalog_migrations:' || $1::text, 0))",
        str(tx.org_id),
    )
    active = await tx.fetchval(
        "SELECT count(*) FROM catalog_migrations WHERE org_id = $1 AND status = ANY($2::text[])",
        tx.org_id,
        list(ACTIVE),
    )
    if active >= max_active:
        raise Conflict(
            f"The organization already has {active} migrations pending or running (at most "
            f"{max_active}): wait for one to end, or cancel one",
            code="too_many_migrations",
        )
    migration_id = "migration_" + secrets.token_hex(8)
    stored = {key: value for key, value in mapping.items() if value is not None}
    stored["blueprint"] = target
    await tx.execute(
        "INSERT INTO catalog_migrations (org_id, id, source_blueprint, target_blueprint, "
        "status, actor, mapping, dry_run, delete_source) "
        "VALUES ($1, $2, $3, $4, 'PENDING', $5, $6, $7, $8)",
        tx.org_id,
        migration_id,
        source,
        target,
        principal.subject,
        stored,
        dry_run,
        delete_source,
    )
    return await get(tx, migration_id)


async def require_writer(
    tx: Tx, principal: Principal, target: str, *, delete_from: str | None
) -> None:
    """A migration's starter must hold some entity write on the target blueprint (to
    register or update entities, or one of their properties or relations, directly or as
    an owning team), and with `delete_from`, to unregister entities of that blueprint.
    Each entity written or deleted is still checked against the blueprint's permissions
    when it is (a refusal is that entity's failure)."""
    if principal.is_admin:
        return
    if permissions.moderator(target) not in principal.roles:
        perms = await permissions.blueprint_permissions(tx, target)
        blocks = [perms.register, perms.update, *perms.properties.values()]
        blocks += list(perms.relations.values())
        if not any(_may(block, principal) for block in blocks):
            raise permissions.Denied(
                "entities.register",
                f"blueprint {target!r}",
                " (a migration writes the target blueprint's entities as its starter)",
            )
    if delete_from is not None and permissions.moderator(delete_from) not in principal.roles:
        perms = await permissions.blueprint_permissions(tx, delete_from)
        if not _may(perms.unregister, principal):
            raise permissions.Denied(
                "entities.unregister",
                f"blueprint {delete_from!r}",
                " (deleteSourceEntities deletes the source blueprint's entities)",
            )


def _may(block: permissions.Block, principal: Principal) -> bool:
    return block.grants(principal) or (block.owned_by_team and bool(principal.teams))


_SELECT = (
    "SELECT id, actor, source_blueprint, target_blueprint, mapping, status, dry_run, "
    "delete_source, "
    "total_count, processed_count, skipped_count, created_count, updated_count, "
    "unchanged_count, deleted_count, success_count, failure_count, message, cancel_reason, "
    "created_at, updated_at, started_at, ended_at, errors, preview FROM catalog_migrations "
)


def _shape(row: asyncpg.Record, *, report: bool) -> dict[str, Any]:
    total = row["total_count"]
    processed = row["processed_count"]
    doc: dict[str, Any] = {
        "id": row["id"],
        "actor": row["actor"],
        "sourceBlueprint": row["source_blueprint"],
        "mapping": row["mapping"],
        "status": row["status"],
        "successCount": row["success_count"],
        "failureCount": row["failure_count"],
        "createdAt": row["created_at"],
        "updatedAt": row["updated_at"],
    }
    if row["target_blueprint"] is None:  # deleting all of a blueprint's entities
        return doc
    doc.update(
        dryRun=row["dry_run"],
        deleteSourceEntities=row["delete_source"],
        progress={
            "total": total,
            "processed": processed,
            "percent": (100 if total == 0 else min(100, processed * 100 // total))
            if total is not None
            else 0,
            "skipped": row["skipped_count"],
            "created": row["created_count"],
            "updated": row["updated_count"],
            "unchanged": row["unchanged_count"],
            "deleted": row["deleted_count"],
            "failed": row["failure_count"],
        },
        message=row["message"],
        cancelReason=row["cancel_reason"],
        startedAt=row["started_at"],
        endedAt=row["ended_at"],
    )
    if report:
        doc["errors"] = row["errors"]
        if row["dry_run"]:
            doc["preview"] = row["preview"]
    return doc


async def get(tx: Tx, migration_id: str) -> dict[str, Any]:
    row = await tx.fetchrow(
        _SELECT + "WHERE org_id = $1 AND id = $2",
        tx.org_id,
        migration_id,
    )
    if row is None:
        raise NotFound(f"Migration {migration_id!r} was not found")
    return _shape(row, report=True)


async def list_all(
    tx: Tx, *, statuses: Sequence[str] | None, actor: str | None, blueprint: str | None
) -> list[dict[str, Any]]:
    """Newest first, at most MAX_LIST; `blueprint` matches the source or the target."""
    rows = await tx.fetch(
        _SELECT + "WHERE org_id = $1 "
        "AND ($2::text[] IS NULL OR status = ANY($2::text[])) "
        "AND ($3::text IS NULL OR actor = $3) "
        "AND ($4::text IS NULL OR source_blueprint = $4 OR target_blueprint = $4) "
        "ORDER BY created_at DESC, id LIMIT $5",
        tx.org_id,
        list(statuses) if statuses else None,
        actor,
        blueprint,
        MAX_LIST,
    )
    return [_shape(row, report=False) for row in rows]


async def starter_of(tx: Tx, migration_id: str) -> str:
    actor = await tx.fetchval(
        "SELECT actor FROM catalog_migrations WHERE org_id = $1 AND id = $2",
        tx.org_id,
        migration_id,
    )
    if actor is None:
        raise NotFound(f"Migration {migration_id!r} was not found")
    return str(actor)


async def cancel(tx: Tx, migration_id: str, reason: str | None) -> dict[str, Any]:
    """A pending migration, or a running one between batches, is CANCELLED at once; one
    with a batch in work is PENDING_CANCELLATION until that batch's transaction sees it
    (it then writes nothing and ends the migration CANCELLED). Entities written by
    batches committed before stay written."""
    row = await tx.fetchrow(
        "SELECT status, lease_until > now() AS held FROM catalog_migrations "
        "WHERE org_id = $1 AND id = $2 FOR UPDATE",
        tx.org_id,
        migration_id,
    )
    if row is None:
        raise NotFound(f"Migration {migration_id!r} was not found")
    if row["status"] not in ACTIVE:
        raise Conflict(
            f"Migration {migration_id!r} has already ended ({row['status']})",
            code="migration_ended",
        )
    if row["status"] != "PENDING_CANCELLATION":
        status = "PENDING_CANCELLATION" if row["held"] else "CANCELLED"
        # (now() only as a plain value: Citus refuses it inside CASE or COALESCE.)
        await tx.execute(
            (
                "UPDATE catalog_migrations SET status = $3, cancel_reason = $4, "
                "updated_at = now(), ended_at = now() WHERE org_id = $1 AND id = $2"
                if status == "CANCELLED"
                else "UPDATE catalog_migrations SET status = $3, cancel_reason = $4, "
                "updated_at = now() WHERE org_id = $1 AND id = $2"
            ),
            tx.org_id,
            migration_id,
            status,
            reason,
        )
    return await get(tx, migration_id)


# ---------------------------------------------------------------------------------------
# Evaluating the mapping


@dataclass(slots=True)
class Rendered:
    """One batch's mapping results: the target entities (with the source they came from),
    the per-entity failures, how many contexts the filter dropped, and how many entities'
    jq ran past its time limit."""

    writes: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0
    timeouts: int = 0
    # Source identifiers with at least one failure (not to be deleted when moving).
    failed_sources: set[str] = field(default_factory=set)

    def fail(self, source: str, pointer: str, message: str, **extra: Any) -> None:
        self.failed_sources.add(source)
        self.errors.append(
            {"sourceIdentifier": source, "pointer": pointer, "message": message, **extra}
        )


async def _evaluate(
    org: object, programs: list[str], documents: list[str]
) -> list[list[tuple[bool, Any]]]:
    """Each document's results (True, first output or null) / (False, message), in calls
    of CHUNK documents. A chunk whose call fails as a whole (time limit, crash) is evaluated
    again one document at a time; a document that fails so alone is (False, the reason)
    for every program, with the reason starting TIMEOUT for a time limit."""
    results: list[list[tuple[bool, Any]]] = []
    for start in range(0, len(documents), CHUNK):
        chunk = documents[start : start + CHUNK]
        try:
            rows = await sandbox.evaluate(
                org, programs, chunk, outputs=1, output_limit=OUTPUT_LIMIT_BYTES
            )
        except (sandbox.TimeLimit, sandbox.Crashed):
            rows = []
            for document in chunk:
                try:
                    [row] = await sandbox.evaluate(
                        org, programs, [document], outputs=1, output_limit=OUTPUT_LIMIT_BYTES
                    )
                except sandbox.TimeLimit:
                    limit = sandbox.limits().time_limit
                    reason = f"{_TIMEOUT}jq error: evaluation ran longer than {limit:g} s"
                    row = [(False, reason)] * len(programs)
                except sandbox.Crashed:
                    row = [(False, "jq error: evaluation stopped (out of memory or a crash)")]
                    row = row * len(programs)
                rows.append(row)
        for row in rows:
            results.append(
                [(True, (outs[0] if outs else None)) if ok else (False, outs) for ok, outs in row]
            )
    return results


_TIMEOUT = "\x00timeout\x00"


def _message(found: Any) -> str:
    text = str(found)
    return text.removeprefix(_TIMEOUT)


async def render(org: object, mapping: dict[str, Any], sources: list[dict[str, Any]]) -> Rendered:
    """The mapping evaluated for each source entity (the API's document of it): the entities
    to write, in order, and each failure with its source entity and pointer. Raises
    sandbox.Busy when the org gets no evaluation turn in time."""
    rendered = Rendered()
    fields = _fields(mapping)
    # Contexts: (source identifier, document).
    contexts: list[tuple[str, dict[str, Any]]] = [(s["identifier"], s) for s in sources]
    items_jq = mapping.get("itemsToParse")
    if items_jq:
        documents = [pydantic_core.to_json(doc).decode() for _, doc in contexts]
        answers = await _evaluate(org, [items_jq], documents)
        expanded: list[tuple[str, dict[str, Any]]] = []
        for (source, doc), [(ok, value)] in zip(contexts, answers, strict=True):
            pointer = "/mapping/itemsToParse"
            if not ok:
                rendered.timeouts += str(value).startswith(_TIMEOUT)
                rendered.fail(source, pointer, _message(value))
            elif value is None:
                continue
            elif not isinstance(value, list):
                rendered.fail(
                    source, pointer, f"itemsToParse must give an array, not {json_type(value)}"
                )
            else:
                if len(value) > MAX_ITEMS:
                    rendered.fail(
                        source,
                        pointer,
                        f"itemsToParse gave {len(value)} items; only the first {MAX_ITEMS} "
                        "were migrated",
                    )
                expanded.extend((source, {**doc, "item": item}) for item in value[:MAX_ITEMS])
        contexts = expanded
    programs = ([mapping["filter"]] if mapping.get("filter") else []) + [e for _, e in fields]
    documents = [pydantic_core.to_json(doc).decode() for _, doc in contexts]
    answers = await _evaluate(org, programs, documents) if documents else []
    has_filter = bool(mapping.get("filter"))
    for (source, _), row in zip(contexts, answers, strict=True):
        if has_filter:
            ok, passed = row[0]
            if ok and passed is False:
                rendered.skipped += 1
                continue
            if not ok or not isinstance(passed, bool):
                rendered.timeouts += (not ok) and str(passed).startswith(_TIMEOUT)
                message = (
                    _message(passed)
                    if not ok
                    else f"filter must give true or false, not {json_type(passed)}"
                )
                rendered.fail(source, "/mapping/filter", message)
                continue
            row = row[1:]
        entity = _entity(source, fields, row, rendered)
        if entity is not None:
            rendered.writes.append((source, entity))
    return rendered


def _entity(
    source: str,
    fields: list[tuple[str, str]],
    row: list[tuple[bool, Any]],
    rendered: Rendered,
) -> dict[str, Any] | None:
    entity: dict[str, Any] = {}
    for (pointer, _), (ok, value) in zip(fields, row, strict=True):
        if not ok:
            rendered.timeouts += str(value).startswith(_TIMEOUT)
            rendered.fail(source, pointer, _message(value))
            return None
        parts = pointer.split("/")[3:]  # entity, then key[, name]
        if len(parts) == 1:
            entity[parts[0]] = value
        else:
            name = parts[1].replace("~1", "/").replace("~0", "~")
            entity.setdefault(parts[0], {})[name] = value
    identifier = entity.get("identifier")
    if not isinstance(identifier, str) or not identifier:
        kind = json_type(identifier)
        rendered.fail(
            source,
            "/mapping/entity/identifier",
            f"the entity's identifier must be a non-empty string, not {kind}"
            + (" (add | tostring)" if kind == "number" else ""),
        )
        return None
    return entity


# ---------------------------------------------------------------------------------------
# The worker's side

_running: set[int] = set()
# A page of source entities with their links, as the entity writer reads them.
_SOURCE_PAGE = (
    "SELECT e.identifier, e.title, e.icon, e.team, e.properties, e.datasource, "
    "e.created_at, e.created_by, e.updated_at, e.updated_by, "
    "(SELECT jsonb_object_agg(r.relation, r.targets) FROM ("
    "   SELECT relation, jsonb_agg(target_identifier ORDER BY target_identifier) AS targets"
    "   FROM entity_relations WHERE org_id = $1 AND source_blueprint = e.blueprint"
    "   AND source_identifier = e.identifier GROUP BY relation) r) AS links "
    "FROM entities e WHERE e.org_id = $1 AND e.blueprint = $2 "
)


@dataclass(slots=True)
class _Claim:
    org_id: uuid.UUID
    id: str
    actor: str
    source: str
    target: str
    mapping: dict[str, Any]
    dry_run: bool
    delete_source: bool
    cursor: str | None
    created_at: Any
    preview_left: int
    errors_kept: int
    timeouts: int
    documents: list[dict[str, Any]] = field(default_factory=list)


async def advance(
    db: Database, *, owner: str, seconds: float = PASS_SECONDS, concurrency: int = 4
) -> int:
    """The periodic pass: batches of active migrations, orgs in turns, until none is left
    or `seconds` have passed; how many batches were done. A pass started while another runs
    in this process returns at once."""
    if id(db) in _running:
        return 0
    _running.add(id(db))
    try:
        done = 0
        deadline = time.monotonic() + seconds
        turns = asyncio.Semaphore(concurrency)
        while time.monotonic() < deadline:
            async with db.system() as tx:
                rows = await tx.fetch(
                    "SELECT DISTINCT ON (org_id) org_id, id FROM catalog_migrations "
                    "WHERE status IN ('PENDING', 'RUNNING', 'PENDING_CANCELLATION') "
                    "ORDER BY org_id, created_at, id LIMIT 1000"
                )
            if not rows:
                return done

            async def one(org_id: uuid.UUID, migration_id: str) -> bool:
                async with turns:
                    return await batch(db, org_id, migration_id, owner=owner)

            # Each org's batch is its own task whose work counts for the org in the loop's
            # fair turns (the jq's documents, the entities' JSON between its transactions),
            # not work of no org, which goes before every org's requests.
            loop = asyncio.get_running_loop()
            tasks = [
                loop.create_task(
                    one(r["org_id"], r["id"]), context=fairloop.context_for(r["org_id"])
                )
                for r in rows
            ]
            results = await asyncio.gather(*tasks, return_exceptions=True)
            progressed = 0
            for row, result in zip(rows, results, strict=True):
                if isinstance(result, BaseException):
                    log.warning(
                        "migration batch failed",
                        extra={"org": str(row["org_id"]), "migration": row["id"]},
                        exc_info=result,
                    )
                elif result:
                    progressed += 1
            done += progressed
            if not progressed:
                # Held elsewhere, or waiting for an evaluation turn: look again shortly.
                await asyncio.sleep(0.2)
        return done
    finally:
        _running.discard(id(db))


async def batch(db: Database, org_id: uuid.UUID, migration_id: str, *, owner: str) -> bool:
    """One batch of one migration; False when nothing was done (held elsewhere, or the
    batch is left for later)."""
    try:
        claim = await _claim(db, org_id, migration_id, owner)
        if claim is None:
            return False
        try:
            rendered = await render(org_id, claim.mapping, claim.documents)
        except sandbox.Busy:
            await _release(db, org_id, migration_id, owner)
            return False
        try:
            await _write(db, claim, rendered, owner)
        except _TRANSIENT:
            await _release(db, org_id, migration_id, owner)
            raise
        except Exception as exc:
            log.exception("migration failed", extra={"org": str(org_id), "migration": migration_id})
            await _end(db, claim, owner, "FAILURE", f"the migration stopped: {type(exc).__name__}")
        return True
    except asyncio.CancelledError:
        # The worker is stopping: its batch is rolled back; the lease (if its claim was
        # committed) is given back so the next worker resumes at once rather than when the
        # lease runs out.
        releasing = asyncio.ensure_future(_release(db, org_id, migration_id, owner))
        with contextlib.suppress(Exception, asyncio.CancelledError):
            async with asyncio.timeout(5):
                await asyncio.shield(releasing)
        raise


async def _claim(db: Database, org_id: uuid.UUID, migration_id: str, owner: str) -> _Claim | None:
    async with db.tenant(org_id) as tx:
        # An org's migrations run one at a time: its claims are taken one after another (two
        # workers claiming two of its migrations at once each saw no other held, and both
        # held one). A claim that finds another being taken leaves this one for later.
        if not await tx.fetchval(
            "SELECT pg_try_advisory_xact_lock("
            "hashtextextended('catalog_migrations/claim:' || $1::text, 0))",
            str(org_id),
        ):
            return None
        # The status changes below are audited in the starter's name, as the writes are.
        await tx.execute(
            "SELECT set_config('portolan.actor', actor, true), "
            "set_config('portolan.origin', 'MIGRATION', true) "
            "FROM catalog_migrations WHERE org_id = $1 AND id = $2",
            org_id,
            migration_id,
        )
        row = await tx.fetchrow(
            "UPDATE catalog_migrations m SET lease_owner = $3, "
            " lease_until = now() + make_interval(secs => $4) "
            "WHERE org_id = $1 AND id = $2 "
            " AND status IN ('PENDING', 'RUNNING', 'PENDING_CANCELLATION') "
            " AND (lease_until IS NULL OR lease_until < now() OR lease_owner = $3) "
            " AND NOT EXISTS (SELECT 1 FROM catalog_migrations o WHERE o.org_id = $1 "
            "   AND o.id <> $2 AND o.lease_until > now() AND o.status = ANY($5::text[])) "
            "RETURNING id, actor, source_blueprint, target_blueprint, mapping, status, "
            " dry_run, delete_source, cursor, total_count, created_at, timeout_count, "
            " jsonb_array_length(preview) AS previewed, jsonb_array_length(errors) AS kept",
            org_id,
            migration_id,
            owner,
            LEASE_SECONDS,
            list(ACTIVE),
        )
        if row is None:
            return None
        if row["status"] == "PENDING":
            await tx.execute(
                "UPDATE catalog_migrations SET status = 'RUNNING', started_at = now() "
                "WHERE org_id = $1 AND id = $2",
                org_id,
                migration_id,
            )
        if row["status"] == "PENDING_CANCELLATION":
            await _set_end(tx, migration_id, "CANCELLED", None)
            return None
        try:
            source_def = await bp_service.get(tx, row["source_blueprint"])
        except NotFound:
            await _set_end(
                tx, migration_id, "FAILURE", f"blueprint {row['source_blueprint']!r} was deleted"
            )
            return None
        if row["total_count"] is None:
            await tx.execute(
                "UPDATE catalog_migrations SET total_count = (SELECT count(*) FROM entities "
                " WHERE org_id = $1 AND blueprint = $3 AND created_at <= $4) "
                "WHERE org_id = $1 AND id = $2",
                org_id,
                migration_id,
                row["source_blueprint"],
                row["created_at"],
            )
        records = await tx.fetch(
            _SOURCE_PAGE + "AND ($3::varchar IS NULL OR e.identifier > $3) "
            "AND e.created_at <= $4 ORDER BY e.identifier LIMIT $5",
            org_id,
            row["source_blueprint"],
            row["cursor"],
            row["created_at"],
            BATCH,
        )
    claim = _Claim(
        org_id=org_id,
        id=migration_id,
        actor=row["actor"],
        source=row["source_blueprint"],
        target=row["target_blueprint"],
        mapping=row["mapping"],
        dry_run=row["dry_run"],
        delete_source=row["delete_source"],
        cursor=row["cursor"],
        created_at=row["created_at"],
        preview_left=max(0, MAX_PREVIEW - row["previewed"]),
        errors_kept=row["kept"],
        timeouts=row["timeout_count"],
    )
    claim.documents = [entities.to_api(source_def, entities.row_state(r)) for r in records]
    return claim


async def _release(db: Database, org_id: uuid.UUID, migration_id: str, owner: str) -> None:
    async with db.tenant(org_id) as tx:
        await tx.execute(
            "UPDATE catalog_migrations SET lease_owner = NULL, lease_until = NULL "
            "WHERE org_id = $1 AND id = $2 AND lease_owner = $3",
            org_id,
            migration_id,
            owner,
        )


async def _set_end(tx: Tx, migration_id: str, status: str, message: str | None) -> None:
    await tx.execute(
        "UPDATE catalog_migrations SET status = $3, message = coalesce($4, message), "
        "ended_at = now(), updated_at = now(), lease_owner = NULL, lease_until = NULL "
        "WHERE org_id = $1 AND id = $2",
        tx.org_id,
        migration_id,
        status,
        message,
    )


async def _end(db: Database, claim: _Claim, owner: str, status: str, message: str) -> None:
    async with db.tenant(claim.org_id) as tx:
        held = await tx.fetchval(
            "SELECT lease_owner = $3 FROM catalog_migrations WHERE org_id = $1 AND id = $2 "
            "FOR UPDATE",
            claim.org_id,
            claim.id,
            owner,
        )
        if held:
            await _set_end(tx, claim.id, status, message)


async def _savepoint(tx: Tx, work: Callable[[], Awaitable[T]]) -> T:
    await tx.execute("SAVEPOINT migration_write")
    try:
        result = await work()
    except Exception:
        await tx.execute("ROLLBACK TO SAVEPOINT migration_write")
        raise
    await tx.execute("RELEASE SAVEPOINT migration_write")
    return result


@dataclass(slots=True)
class _Tally:
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    preview: list[dict[str, Any]] = field(default_factory=list)


async def _write(db: Database, claim: _Claim, rendered: Rendered, owner: str) -> None:
    """The batch's writes, its progress and its outcome, in one transaction that holds the
    migration's row: a batch whose lease was lost or whose migration was cancelled writes
    nothing."""
    async with db.tenant(claim.org_id, actor=claim.actor, origin=ORIGIN) as tx:
        state = await tx.fetchrow(
            "SELECT status, lease_owner FROM catalog_migrations WHERE org_id = $1 AND id = $2 "
            "FOR UPDATE",
            claim.org_id,
            claim.id,
        )
        if state is None or state["lease_owner"] != owner:
            return  # taken over (our lease ran out): the other worker does this batch
        if state["status"] == "PENDING_CANCELLATION":
            await _set_end(tx, claim.id, "CANCELLED", None)
            return
        principal = await principal_of(tx, claim.actor)
        if principal is None:
            await _set_end(
                tx,
                claim.id,
                "FAILURE",
                f"{claim.actor!r} is no longer a member of the organization: the migration "
                "cannot write in their name",
            )
            return
        guard = None if principal.is_admin else permissions.EntityGuard(principal)
        writer = entities.Writer(actor=claim.actor, origin=ORIGIN, datasource=None, guard=guard)
        tally = _Tally()
        try:
            await _write_targets(tx, claim, rendered, writer, tally)
        except NotFound as exc:
            await _set_end(tx, claim.id, "FAILURE", exc.message)
            return
        if claim.delete_source:
            await _delete_sources(tx, claim, rendered, writer, tally)
        timeouts = claim.timeouts + rendered.timeouts
        last = claim.documents[-1]["identifier"] if claim.documents else claim.cursor
        done = len(claim.documents) < BATCH
        failures = len(rendered.errors)
        kept = rendered.errors[: max(0, MAX_ERRORS - claim.errors_kept)]
        ending: tuple[str, str | None] | None = ("COMPLETED", None) if done else None
        if timeouts >= MAX_TIMEOUTS:
            ending = (
                "FAILURE",
                f"the mapping's jq ran past its time limit for {timeouts} entities: "
                "the migration was stopped",
            )
        await tx.execute(
            _PROGRESS + "WHERE org_id = $1 AND id = $2",
            claim.org_id,
            claim.id,
            last,
            len(claim.documents),
            rendered.skipped,
            tally.created,
            tally.updated,
            tally.unchanged,
            tally.deleted,
            failures,
            timeouts,
            kept,
            tally.preview,
        )
    if ending is not None:
        await _finish(db, claim, *ending)


async def _finish(db: Database, claim: _Claim, status: str, message: str | None) -> None:
    """The migration's end, in a transaction of its own after its last batch's: its audit
    entry is then the only row it writes (on Citus, a trigger's insert beside the batch's
    writes would make the transaction span two servers). A worker that stops in between
    leaves it RUNNING at the end of its source: the next batch finds nothing and ends it."""
    async with db.tenant(claim.org_id, actor=claim.actor, origin=ORIGIN) as tx:
        await tx.execute(
            "UPDATE catalog_migrations SET status = $3, message = coalesce($4, message), "
            "ended_at = now(), updated_at = now() "
            "WHERE org_id = $1 AND id = $2 AND status = 'RUNNING' AND lease_owner IS NULL",
            claim.org_id,
            claim.id,
            status,
            message,
        )


# A batch's progress: bookkeeping only (no audit entry), committed with the batch's writes.
_PROGRESS = (
    "UPDATE catalog_migrations SET cursor = $3, processed_count = processed_count + $4, "
    " skipped_count = skipped_count + $5, created_count = created_count + $6, "
    " updated_count = updated_count + $7, unchanged_count = unchanged_count + $8, "
    " deleted_count = deleted_count + $9, failure_count = failure_count + $10, "
    " success_count = success_count + $6 + $7 + $8, timeout_count = $11, "
    " errors = errors || $12::jsonb, preview = preview || $13::jsonb, updated_at = now(), "
    " lease_owner = NULL, lease_until = NULL "
)


async def _write_targets(
    tx: Tx, claim: _Claim, rendered: Rendered, writer: entities.Writer, tally: _Tally
) -> None:
    """Upsert and merge the rendered entities into the target blueprint (validated only,
    for a dry run); each refusal is its source entity's failure."""
    writes = rendered.writes
    if not writes:
        return
    flags = entities.WriteFlags(upsert=True, merge=True, validation_only=claim.dry_run)
    raws = [entity for _, entity in writes]

    async def write(some: list[dict[str, Any]]) -> list[entities.Outcome]:
        return await entities.write(tx, claim.target, some, flags, writer)

    try:
        outcomes = await _savepoint(tx, lambda: write(raws))
    except _TRANSIENT:
        raise
    except (PortolanError, asyncpg.PostgresError) as exc:
        if isinstance(exc, NotFound) and not await _exists(tx, claim.target):
            raise  # the target blueprint is gone: the migration fails
        # Refused as a whole: written one by one, so each refusal is its own entity's.
        outcomes = []
        for index, raw in enumerate(raws):
            try:
                outcomes.extend(await _savepoint(tx, _one(write, raw)))
            except _TRANSIENT:
                raise
            except (PortolanError, asyncpg.PostgresError) as alone:
                error = alone if isinstance(alone, PortolanError) else Invalid(str(alone))
                identifier = str(raw.get("identifier"))
                outcomes.append(entities.Outcome(index, identifier, False, None, error))
    for (source, raw), outcome in zip(writes, outcomes, strict=True):
        if outcome.error is not None:
            rendered.fail(
                source,
                "/mapping/entity",
                outcome.error.message,
                identifier=raw.get("identifier"),
                blueprint=claim.target,
                statusCode=outcome.error.status_code,
            )
            continue
        if not outcome.changed:
            tally.unchanged += 1
            continue
        if outcome.created:
            tally.created += 1
        else:
            tally.updated += 1
        if claim.dry_run and len(tally.preview) < claim.preview_left:
            tally.preview.append(
                {
                    "sourceIdentifier": source,
                    "operation": "create" if outcome.created else "update",
                    "entity": _previewed(outcome.entity),
                }
            )


def _one(
    write: Callable[[list[dict[str, Any]]], Awaitable[list[entities.Outcome]]],
    raw: dict[str, Any],
) -> Callable[[], Awaitable[list[entities.Outcome]]]:
    return lambda: write([raw])


def _previewed(entity: dict[str, Any] | None) -> dict[str, Any] | None:
    if entity is None:
        return None
    keys = ("identifier", "title", "icon", "blueprint", "team", "properties", "relations")
    return {key: entity.get(key) for key in keys}


async def _exists(tx: Tx, blueprint: str) -> bool:
    return bool(
        await tx.fetchval(
            "SELECT EXISTS (SELECT 1 FROM blueprints WHERE org_id = $1 AND identifier = $2)",
            tx.org_id,
            blueprint,
        )
    )


async def _delete_sources(
    tx: Tx, claim: _Claim, rendered: Rendered, writer: entities.Writer, tally: _Tally
) -> None:
    """Moving: the source entities whose every mapped entity was written (and that the
    filter did not drop) are deleted. A dry run deletes them in a savepoint rolled back,
    to report what would be refused."""
    written = {source for source, _ in rendered.writes} - rendered.failed_sources
    doomed = [d["identifier"] for d in claim.documents if d["identifier"] in written]
    if not doomed:
        return

    async def delete(identifiers: list[str]) -> list[str]:
        return await entities.delete_many(
            tx, claim.source, identifiers, delete_dependents=False, writer=writer
        )

    async def attempt(identifiers: list[str]) -> list[str]:
        if not claim.dry_run:
            return await _savepoint(tx, lambda: delete(identifiers))
        await tx.execute("SAVEPOINT migration_dry_delete")
        try:
            return await delete(identifiers)
        finally:
            await tx.execute("ROLLBACK TO SAVEPOINT migration_dry_delete")

    try:
        tally.deleted += len(await attempt(doomed))
        return
    except _TRANSIENT:
        raise
    except (PortolanError, asyncpg.PostgresError):
        pass
    for identifier in doomed:  # one at a time: each refusal is its own entity's
        try:
            tally.deleted += len(await attempt([identifier]))
        except _TRANSIENT:
            raise
        except (PortolanError, asyncpg.PostgresError) as exc:
            message = exc.message if isinstance(exc, PortolanError) else str(exc)
            rendered.fail(
                identifier,
                "/deleteSourceEntities",
                f"the source entity could not be deleted: {message}",
                blueprint=claim.source,
            )
