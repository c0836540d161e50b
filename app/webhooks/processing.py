"""The worker's side: accepted events applied to the catalog through the mappings.

A pass over one webhook takes its pending events oldest first. Each event is applied in
one tenant transaction that holds the webhook's row (`FOR NO KEY UPDATE SKIP LOCKED`: one
worker per webhook at a time, so events apply in the order they arrived, while ingest
keeps inserting) and the event's row (`FOR UPDATE SKIP LOCKED`, status still pending).
The entity writes and the event's outcome commit together, so an event is applied once,
however many jobs or passes reach it.

Per mapping: `itemsToParse` (jq -> array; at most 500 items, each exposed as `.item`),
then per item `filter` (jq -> true/false) and the entity's jq. Entities are upserted and
merged (Port's webhook semantics; related entities that do not exist yet are created) or
deleted. A jq error, an entity the catalog refuses, or a refused delete is recorded on
the event with the mapping's index, the item's index and the message; the other items and
mappings still apply (each write runs under a savepoint).

An event whose processing fails outright (e.g. the database deadlocked) stays pending and
is tried again by a later pass; after MAX_ATTEMPTS it is marked failed.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg

from app.catalog import entities
from app.catalog.entities import WriteFlags, Writer
from app.db.database import Database, Tx
from app.dispatch.templates import TemplateError, render
from app.kit.errors import PortolanError
from app.webhooks.definitions import Mapping, compile_mapping

log = logging.getLogger("portolan.webhooks")

MAX_ITEMS = 500
MAX_ATTEMPTS = 5
MAX_ERRORS = 200
EVENTS_PER_PASS = 100
WEBHOOKS_PER_SCAN = 200
_WRITE = WriteFlags(upsert=True, merge=True, create_missing_related_entities=True)
# The whole event is tried again later for these: nothing about the event is wrong.
_TRANSIENT: tuple[type[BaseException], ...] = (
    asyncpg.TransactionRollbackError,  # serialization failure, deadlock
    asyncpg.LockNotAvailableError,
    asyncpg.QueryCanceledError,  # statement timeout
    asyncpg.InterfaceError,
    OSError,
)
T = TypeVar("T")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


@dataclass(slots=True)
class _Outcome:
    entities: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    omitted: int = 0

    def error(
        self,
        mapping: int | None,
        item: int | None,
        pointer: str,
        message: str,
        **extra: Any,
    ) -> None:
        if len(self.errors) >= MAX_ERRORS:
            self.omitted += 1
            return
        self.errors.append(
            {"mapping": mapping, "item": item, "pointer": pointer, "message": message, **extra}
        )

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"entities": self.entities, "errors": self.errors}
        if self.omitted:
            out["errors"] = [
                *self.errors,
                {
                    "mapping": None,
                    "item": None,
                    "pointer": "",
                    "message": f"{self.omitted} more error(s) were not recorded",
                },
            ]
        return out


async def _savepoint(tx: Tx, work: Callable[[], Awaitable[T]]) -> T:
    """`work` under a savepoint: when it raises, what it wrote is undone and the
    transaction goes on."""
    await tx.execute("SAVEPOINT webhook_write")
    try:
        result = await work()
    except Exception:
        await tx.execute("ROLLBACK TO SAVEPOINT webhook_write")
        raise
    await tx.execute("RELEASE SAVEPOINT webhook_write")
    return result


def _refused(exc: asyncpg.PostgresError) -> str:
    return f"the database refused the write: {exc}"


async def _rendered_entity(
    mapping: Mapping, data: dict[str, Any], item: int | None, outcome: _Outcome
) -> dict[str, Any] | None:
    """The item's entity, None when the filter drops it or an error was recorded."""
    base = f"/mappings/{mapping.index}"
    try:
        rendered = await render(mapping.template, data, base)
    except TemplateError as exc:
        if mapping.has_filter and exc.pointer != base + "/filter":
            # An item the filter drops does not fail on its entity's jq.
            try:
                passed = await render(mapping.template["filter"], data, base + "/filter")
            except TemplateError as filter_exc:
                outcome.error(mapping.index, item, filter_exc.pointer, filter_exc.message)
                return None
            if passed is False:
                return None
        outcome.error(mapping.index, item, exc.pointer, exc.message)
        return None
    if mapping.has_filter:
        passed = rendered["filter"]
        if not isinstance(passed, bool):
            outcome.error(
                mapping.index,
                item,
                base + "/filter",
                f"filter must evaluate to true or false, not {_json_type(passed)}",
            )
            return None
        if not passed:
            return None
    entity: dict[str, Any] = rendered["entity"]
    identifier = entity.get("identifier")
    if not isinstance(identifier, str) or not identifier:
        outcome.error(
            mapping.index,
            item,
            base + "/entity/identifier",
            "the entity's identifier must evaluate to a non-empty string, not "
            f"{_json_type(identifier)}"
            + (" (add | tostring)" if _json_type(identifier) == "number" else ""),
        )
        return None
    return entity


async def _entities_of(
    mapping: Mapping, data: dict[str, Any], outcome: _Outcome
) -> list[tuple[int | None, dict[str, Any]]]:
    base = f"/mappings/{mapping.index}"
    contexts: list[tuple[int | None, dict[str, Any]]]
    if mapping.items is None:
        contexts = [(None, data)]
    else:
        try:
            items = await render(mapping.items, data, base + "/itemsToParse")
        except TemplateError as exc:
            outcome.error(mapping.index, None, exc.pointer, exc.message)
            return []
        if items is None:
            items = []
        if not isinstance(items, list):
            outcome.error(
                mapping.index,
                None,
                base + "/itemsToParse",
                f"itemsToParse must evaluate to an array, not {_json_type(items)}",
            )
            return []
        if len(items) > MAX_ITEMS:
            outcome.error(
                mapping.index,
                None,
                base + "/itemsToParse",
                f"itemsToParse gave {len(items)} items; only the first {MAX_ITEMS} were applied",
            )
            items = items[:MAX_ITEMS]
        contexts = [(index, {**data, "item": item}) for index, item in enumerate(items)]
    found: list[tuple[int | None, dict[str, Any]]] = []
    for item, context in contexts:
        entity = await _rendered_entity(mapping, context, item, outcome)
        if entity is not None:
            found.append((item, entity))
    return found


async def _upsert(
    tx: Tx,
    mapping: Mapping,
    found: list[tuple[int | None, dict[str, Any]]],
    writer: Writer,
    outcome: _Outcome,
) -> None:
    # One write takes an identifier once: items naming the same entity go in later
    # rounds, in their order, so the last one wins as if each were written in turn.
    rounds: list[list[tuple[int | None, dict[str, Any]]]] = []
    for pair in found:
        identifier = pair[1]["identifier"]
        for batch in rounds:
            if all(other["identifier"] != identifier for _, other in batch):
                batch.append(pair)
                break
        else:
            rounds.append([pair])
    for batch in rounds:
        raws = [entity for _, entity in batch]

        async def work(raws: list[dict[str, Any]] = raws) -> list[entities.Outcome]:
            return await entities.write(tx, mapping.blueprint, raws, _WRITE, writer)

        try:
            results = await _savepoint(tx, work)
        except PortolanError as exc:
            for item, entity in batch:
                outcome.error(
                    mapping.index,
                    item,
                    f"/mappings/{mapping.index}",
                    exc.message,
                    blueprint=mapping.blueprint,
                    identifier=entity["identifier"],
                )
            continue
        except _TRANSIENT:
            raise
        except asyncpg.PostgresError as exc:
            for item, entity in batch:
                outcome.error(
                    mapping.index,
                    item,
                    f"/mappings/{mapping.index}",
                    _refused(exc),
                    blueprint=mapping.blueprint,
                    identifier=entity["identifier"],
                )
            continue
        for result in results:
            item = batch[result.index][0]
            if result.error is not None:
                outcome.error(
                    mapping.index,
                    item,
                    f"/mappings/{mapping.index}",
                    result.error.message,
                    blueprint=mapping.blueprint,
                    identifier=result.identifier,
                )
            else:
                outcome.entities.append(
                    {
                        "mapping": mapping.index,
                        "item": item,
                        "blueprint": mapping.blueprint,
                        "identifier": result.identifier,
                        "operation": "create" if result.created else "update",
                    }
                )


async def _delete(
    tx: Tx,
    mapping: Mapping,
    found: list[tuple[int | None, dict[str, Any]]],
    writer: Writer,
    outcome: _Outcome,
) -> None:
    for item, entity in found:
        identifier: str = entity["identifier"]

        async def work(identifier: str = identifier) -> list[str]:
            return await entities.delete_many(
                tx,
                mapping.blueprint,
                [identifier],
                delete_dependents=mapping.delete_dependents,
                writer=writer,
            )

        try:
            deleted = await _savepoint(tx, work)
        except PortolanError as exc:
            outcome.error(
                mapping.index,
                item,
                f"/mappings/{mapping.index}",
                exc.message,
                blueprint=mapping.blueprint,
                identifier=identifier,
            )
            continue
        except _TRANSIENT:
            raise
        except asyncpg.PostgresError as exc:
            outcome.error(
                mapping.index,
                item,
                f"/mappings/{mapping.index}",
                _refused(exc),
                blueprint=mapping.blueprint,
                identifier=identifier,
            )
            continue
        if deleted:  # an entity that does not exist is nothing to delete
            outcome.entities.append(
                {
                    "mapping": mapping.index,
                    "item": item,
                    "blueprint": mapping.blueprint,
                    "identifier": identifier,
                    "operation": "delete",
                }
            )


async def apply(tx: Tx, webhook: str, mappings: list[Any], event: asyncpg.Record) -> dict[str, Any]:
    """Apply the mappings to one event; the outcome to record on it."""
    data = {
        "body": event["body"],
        "headers": event["headers"],
        "queryParams": event["query_params"],
    }
    outcome = _Outcome(errors=list((event["outcome"] or {}).get("errors", [])))
    writer = Writer(actor=f"webhook:{webhook}", origin="WEBHOOK", datasource=None)
    for index, raw in enumerate(mappings):
        try:
            mapping = compile_mapping(index, raw)
        except (KeyError, TypeError, AttributeError):
            outcome.error(index, None, f"/mappings/{index}", "the mapping cannot be read")
            continue
        found = await _entities_of(mapping, data, outcome)
        if not found:
            continue
        if mapping.delete:
            await _delete(tx, mapping, found, writer, outcome)
        else:
            await _upsert(tx, mapping, found, writer, outcome)
    return outcome.as_json()


async def _process_next(tx: Tx, webhook: str, claimed: list[str]) -> str | None:
    """Apply the webhook's oldest pending event; its id, or None when there is none (or
    another worker holds the webhook)."""
    mappings = await tx.fetchval(
        "SELECT mappings FROM webhooks WHERE org_id = $1 AND identifier = $2 "
        "FOR NO KEY UPDATE SKIP LOCKED",
        tx.org_id,
        webhook,
    )
    if mappings is None:
        return None
    event = await tx.fetchrow(
        "SELECT id, body, headers, query_params, outcome FROM webhook_events "
        "WHERE org_id = $1 AND webhook = $2 AND status = 'pending' "
        "ORDER BY received_at, id LIMIT 1 FOR UPDATE SKIP LOCKED",
        tx.org_id,
        webhook,
    )
    if event is None:
        return None
    claimed.append(event["id"])
    outcome = await apply(tx, webhook, mappings, event)
    await tx.execute(
        "UPDATE webhook_events SET status = $3, outcome = $4, processed_at = now(), "
        "attempts = attempts + 1 WHERE org_id = $1 AND id = $2",
        tx.org_id,
        event["id"],
        "failed" if outcome["errors"] else "processed",
        outcome,
    )
    return str(event["id"])


async def _record_failure(
    db: Database, org_id: uuid.UUID, event_id: str, exc: BaseException
) -> None:
    """One more failed attempt at the event; at MAX_ATTEMPTS it is marked failed."""
    error = {
        "mapping": None,
        "item": None,
        "pointer": "",
        "message": f"processing stopped ({type(exc).__name__}) after {MAX_ATTEMPTS} attempts",
    }
    async with db.tenant(org_id) as tx:
        await tx.execute(
            "UPDATE webhook_events SET attempts = attempts + 1, "
            "status = CASE WHEN attempts + 1 >= $3 THEN 'failed' ELSE status END, "
            "processed_at = CASE WHEN attempts + 1 >= $3 THEN now() END, "
            "outcome = CASE WHEN attempts + 1 >= $3 THEN jsonb_build_object("
            "'entities', '[]'::jsonb, 'errors', "
            "coalesce(outcome->'errors', '[]'::jsonb) || jsonb_build_array($4::jsonb)) "
            "ELSE outcome END "
            "WHERE org_id = $1 AND id = $2 AND status = 'pending'",
            org_id,
            event_id,
            MAX_ATTEMPTS,
            error,
        )


async def process_webhook(
    db: Database, org_id: uuid.UUID, webhook: str, *, limit: int = EVENTS_PER_PASS
) -> int:
    """Apply up to `limit` pending events of one webhook, oldest first; how many."""
    done = 0
    while done < limit:
        claimed: list[str] = []
        try:
            async with db.tenant(org_id) as tx:
                event_id = await _process_next(tx, webhook, claimed)
        except Exception as exc:
            log.warning(
                "webhook event processing failed; it will be tried again",
                extra={"org_id": str(org_id), "webhook": webhook, "error": type(exc).__name__},
            )
            if claimed:
                try:
                    await _record_failure(db, org_id, claimed[0], exc)
                except Exception:
                    log.warning("could not record the failure", exc_info=True)
            break
        if event_id is None:
            break
        done += 1
    return done


async def process_pending(db: Database) -> int:
    """The periodic pass: every webhook with pending events, oldest first."""
    async with db.system() as tx:
        rows = await tx.fetch(
            "SELECT org_id, webhook, min(received_at) AS first FROM ("
            "  SELECT org_id, webhook, received_at FROM webhook_events"
            "  WHERE status = 'pending' ORDER BY received_at LIMIT $1 * 10"
            ") p GROUP BY org_id, webhook ORDER BY first LIMIT $1",
            WEBHOOKS_PER_SCAN,
        )
    total = 0
    for row in rows:
        total += await process_webhook(db, row["org_id"], row["webhook"])
    return total


async def prune(db: Database, retention_days: int, *, batch: int = 5000) -> int:
    """Delete events older than the retention that are no longer pending; how many."""
    async with db.system() as tx:
        status = await tx.execute(
            "DELETE FROM webhook_events WHERE (org_id, id) IN ("
            "  SELECT org_id, id FROM webhook_events"
            "  WHERE received_at < now() - make_interval(days => $1) AND status <> 'pending'"
            "  LIMIT $2)",
            retention_days,
            batch,
        )
    return int(status.rsplit(" ", 1)[-1])
