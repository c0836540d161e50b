"""The worker's side: accepted events applied to the catalog through the mappings.

A pass over one webhook takes its pending events oldest first, a batch at a time (up to
BATCH_EVENTS events, and up to BATCH_BYTES of stored bodies). The pass holds a lease on the
webhook (a `webhook_passes` row: one pass per webhook at a time across workers, so events
apply in the order they arrived, while ingest keeps inserting), renewed by each batch and
ended with the pass; a pass that died leaves a lease that runs out (LEASE_SECONDS). Each
batch is read in a short transaction, rendered with no transaction open (the tenant's jq
runs in the sandbox meanwhile, and no connection waits on it), then applied in one
transaction that checks the lease is still the pass's: the entity writes and every
event's outcome commit together, so an event is applied once, however many jobs or passes
reach it.

Per mapping: `itemsToParse` (jq -> array; at most 500 items, each exposed as `.item`),
then per item `filter` (jq -> true/false) and the entity's jq. Entities are upserted and
merged (Port's webhook semantics; related entities that do not exist yet are created) or
deleted. A jq error, an entity the catalog refuses, or a refused delete is recorded on
the event with the mapping's index, the item's index and the message; the other items,
mappings and events still apply.

Rendering: every jq expression of the mappings is evaluated once for the whole batch, as
one program mapping the batch's contexts (events, or events' items) to each context's
first output or its error (one round trip to the jq children for `itemsToParse`, one for
the rest). A context whose expressions failed is rendered again on its own, which gives
the error's exact pointer and message. When the batched evaluation fails as a whole (time
limit, output limit, a crashed child) each event is rendered on its own; once that has
taken RENDER_ALONE_SECONDS the batch ends at the events rendered so far.

Writing: the batch's entities, in the order the events and mappings give them, are
grouped into levels. An entity goes one level after the last earlier write of the same
entity and after the last earlier write it depends on through a relation (or that depends
on it); a delete is a level of its own, after everything before it and before everything
after it. Within a level the writes do not touch each other, so each blueprint's share is
one `entities.write` call (under a savepoint); the levels run in order, so a later event's
write of an entity wins over an earlier one's, exactly as if the events were applied one
after the other. A write call the database or the catalog refuses as a whole is written
again per event and mapping, so the refusal is recorded on the events it belongs to.

A batch whose processing fails outright (e.g. the database deadlocked) is rolled back and
stays pending: every event of it counts an attempt, and events with an attempt behind them
are then processed one at a time, so an event that keeps failing only counts attempts of
its own and is marked failed after MAX_ATTEMPTS, and the webhook moves on.

Passes: a job (one per accepted event) runs a pass over its webhook, batch after batch
until none is pending (after a batch that took every pending event it waits
BATCH_WAIT_SECONDS, so a burst of events makes a few large batches rather than many small
ones). While a pass over the webhook runs in this process, another job only asks it to
look once more before it ends. The periodic pass takes the events pending in every webhook
and, while it finds any, looks again every LOOK_AGAIN_SECONDS.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import asyncpg

from app.catalog import entities
from app.catalog.entities import WriteFlags, Writer
from app.catalog.validation import json_type
from app.db.database import Database, Tx
from app.dispatch.templates import TemplateError, render
from app.kit.errors import PortolanError
from app.webhooks.definitions import Mapping, compile_mapping

log = logging.getLogger("portolan.webhooks")

MAX_ITEMS = 500
MAX_ATTEMPTS = 5
MAX_ERRORS = 200
EVENTS_PER_PASS = 2000
BATCH_EVENTS = 200
BATCH_BYTES = 1024 * 1024  # stored (possibly compressed) body bytes of one batch
BATCH_WAIT_SECONDS = 0.05  # after a batch that took every pending event
WEBHOOKS_PER_SCAN = 200
PENDING_PASS_SECONDS = 30.0
LOOK_AGAIN_SECONDS = 0.25
RENDER_ALONE_SECONDS = 5.0
_WRITE = WriteFlags(upsert=True, merge=True, create_missing_related_entities=True)
# The whole batch is tried again later for these: nothing about its events is wrong.
_TRANSIENT: tuple[type[BaseException], ...] = (
    asyncpg.TransactionRollbackError,  # serialization failure, deadlock
    asyncpg.LockNotAvailableError,
    asyncpg.QueryCanceledError,  # statement timeout
    asyncpg.InterfaceError,
    OSError,
)
# A `{{ jq }}` template of one expression, as `template_of` makes them.
_ONE_TEMPLATE = re.compile(r"\s*\{\{(.*)\}\}\s*", re.S)
T = TypeVar("T")


# ---------------------------------------------------------------------------------------
# Outcomes


@dataclass(slots=True)
class _Outcome:
    """What one event did. Entries carry a sort key, so the outcome lists them in the
    order of the mappings and items however the batch ran them: errors by (mapping,
    phase: 0 rendering / 1 writing, item or write position), entities by write position."""

    prior: list[dict[str, Any]] = field(default_factory=list)  # recorded at ingest
    entities: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    errors: list[tuple[tuple[int, int, int], dict[str, Any]]] = field(default_factory=list)

    def error(
        self,
        key: tuple[int, int, int],
        mapping: int | None,
        item: int | None,
        pointer: str,
        message: str,
        **extra: Any,
    ) -> None:
        self.errors.append(
            (
                key,
                {"mapping": mapping, "item": item, "pointer": pointer, "message": message, **extra},
            )
        )

    def as_json(self) -> dict[str, Any]:
        errors = self.prior + [e for _, e in sorted(self.errors, key=lambda pair: pair[0])]
        if len(errors) > MAX_ERRORS:
            omitted = len(errors) - MAX_ERRORS
            errors = [
                *errors[:MAX_ERRORS],
                {
                    "mapping": None,
                    "item": None,
                    "pointer": "",
                    "message": f"{omitted} more error(s) were not recorded",
                },
            ]
        written = [e for _, e in sorted(self.entities, key=lambda pair: pair[0])]
        return {"entities": written, "errors": errors}


@dataclass(slots=True)
class _Rendered:
    """What one event's mappings rendered to: per mapping index the (item, entity) pairs
    to write, in item order, and the rendering errors."""

    found: dict[int, list[tuple[int | None, dict[str, Any]]]] = field(default_factory=dict)
    errors: list[tuple[int | None, int | None, str, str]] = field(default_factory=list)

    def error(self, mapping: int | None, item: int | None, pointer: str, message: str) -> None:
        self.errors.append((mapping, item, pointer, message))


@dataclass(slots=True)
class _Op:
    """One entity to write or delete: the event's `seq`-th, in mapping and item order."""

    event: _Event
    seq: int
    mapping: Mapping
    item: int | None
    entity: dict[str, Any]

    @property
    def identifier(self) -> str:
        identifier: str = self.entity["identifier"]
        return identifier

    def targets(self) -> set[str]:
        """The identifiers the entity's relations name (whatever their blueprint)."""
        relations = self.entity.get("relations")
        found: set[str] = set()
        if isinstance(relations, dict):
            for value in relations.values():
                if isinstance(value, str):
                    found.add(value)
                elif isinstance(value, list):
                    found.update(v for v in value if isinstance(v, str))
        return found

    def searches(self) -> bool:
        """Whether the entity's relations or team are search queries: what they find
        depends on every write before it."""
        relations = self.entity.get("relations")
        return isinstance(self.entity.get("team"), dict) or (
            isinstance(relations, dict) and any(isinstance(v, dict) for v in relations.values())
        )

    def error(self, message: str, **extra: Any) -> None:
        index = self.mapping.index
        self.event.outcome.error(
            (index, 1, self.seq), index, self.item, f"/mappings/{index}", message, **extra
        )

    def written(self, identifier: str, operation: str) -> None:
        self.event.outcome.entities.append(
            (
                self.seq,
                {
                    "mapping": self.mapping.index,
                    "item": self.item,
                    "blueprint": self.mapping.blueprint,
                    "identifier": identifier,
                    "operation": operation,
                },
            )
        )


@dataclass(slots=True)
class _Event:
    id: str
    data: dict[str, Any]  # what the jq sees: {body, headers, queryParams}
    outcome: _Outcome
    ops: list[_Op] = field(default_factory=list)

    def take(self, mappings: list[Mapping | None], rendered: _Rendered) -> None:
        """Record the rendering's errors, and the entities to write in mapping order."""
        for index, item, pointer, message in rendered.errors:
            key = (-1 if index is None else index, 0, -1 if item is None else item)
            self.outcome.error(key, index, item, pointer, message)
        for mapping in mappings:
            if mapping is None:
                continue
            for at, entity in rendered.found.get(mapping.index, []):
                self.ops.append(_Op(self, len(self.ops), mapping, at, entity))


# ---------------------------------------------------------------------------------------
# Rendering, one context at a time


def _items_checked(mapping: Mapping, items: Any, rendered: _Rendered) -> list[Any] | None:
    """The items to apply of an `itemsToParse` result; None when it is not an array."""
    pointer = f"/mappings/{mapping.index}/itemsToParse"
    if items is None:
        return []
    if not isinstance(items, list):
        rendered.error(
            mapping.index,
            None,
            pointer,
            f"itemsToParse must evaluate to an array, not {json_type(items)}",
        )
        return None
    if len(items) > MAX_ITEMS:
        rendered.error(
            mapping.index,
            None,
            pointer,
            f"itemsToParse gave {len(items)} items; only the first {MAX_ITEMS} were applied",
        )
        return items[:MAX_ITEMS]
    return items


def _entity_checked(
    mapping: Mapping, rendered_template: dict[str, Any], item: int | None, rendered: _Rendered
) -> dict[str, Any] | None:
    """The entity of a rendered mapping template; None when the filter drops it or an
    error was recorded."""
    base = f"/mappings/{mapping.index}"
    if mapping.has_filter:
        passed = rendered_template["filter"]
        if not isinstance(passed, bool):
            rendered.error(
                mapping.index,
                item,
                base + "/filter",
                f"filter must evaluate to true or false, not {json_type(passed)}",
            )
            return None
        if not passed:
            return None
    entity: dict[str, Any] = rendered_template["entity"]
    identifier = entity.get("identifier")
    if not isinstance(identifier, str) or not identifier:
        rendered.error(
            mapping.index,
            item,
            base + "/entity/identifier",
            "the entity's identifier must evaluate to a non-empty string, not "
            f"{json_type(identifier)}"
            + (" (add | tostring)" if json_type(identifier) == "number" else ""),
        )
        return None
    return entity


async def _rendered_entity(
    mapping: Mapping,
    data: dict[str, Any],
    item: int | None,
    rendered: _Rendered,
    *,
    org: object,
    kept: bool = False,
) -> dict[str, Any] | None:
    """One item's entity rendered on its own; None when the filter drops it or an error
    was recorded. `kept`: the filter is known to give something other than false."""
    base = f"/mappings/{mapping.index}"
    try:
        result = await render(mapping.template, data, base, org=org)
    except TemplateError as exc:
        if mapping.has_filter and not kept and exc.pointer != base + "/filter":
            # An item the filter drops does not fail on its entity's jq.
            try:
                passed = await render(mapping.template["filter"], data, base + "/filter", org=org)
            except TemplateError as filter_exc:
                rendered.error(mapping.index, item, filter_exc.pointer, filter_exc.message)
                return None
            if passed is False:
                return None
        rendered.error(mapping.index, item, exc.pointer, exc.message)
        return None
    return _entity_checked(mapping, result, item, rendered)


async def _items_alone(
    mapping: Mapping, data: dict[str, Any], rendered: _Rendered, *, org: object
) -> list[Any] | None:
    assert mapping.items is not None
    try:
        items = await render(
            mapping.items, data, f"/mappings/{mapping.index}/itemsToParse", org=org
        )
    except TemplateError as exc:
        rendered.error(mapping.index, None, exc.pointer, exc.message)
        return None
    return _items_checked(mapping, items, rendered)


async def _render_alone(
    mappings: list[Mapping | None], data: dict[str, Any], *, org: object
) -> _Rendered:
    """One event's mappings, one render per context."""
    rendered = _Rendered()
    for mapping in mappings:
        if mapping is None:
            continue
        contexts: list[tuple[int | None, dict[str, Any]]] = [(None, data)]
        if mapping.items is not None:
            items = await _items_alone(mapping, data, rendered, org=org)
            contexts = [(i, {**data, "item": item}) for i, item in enumerate(items or [])]
        found = rendered.found.setdefault(mapping.index, [])
        for item, context in contexts:
            entity = await _rendered_entity(mapping, context, item, rendered, org=org)
            if entity is not None:
                found.append((item, entity))
    return rendered


# ---------------------------------------------------------------------------------------
# Rendering a batch


class _Unexpected(Exception):
    """A batched evaluation that cannot be used (not one answer per context, or a
    template this module does not batch)."""


def _expression(template: Any) -> str:
    """The jq expression of a `{{ jq }}` template of one expression."""
    if isinstance(template, str):
        match = _ONE_TEMPLATE.fullmatch(template)
        if match is not None and "}}" not in match.group(1) and match.group(1).strip():
            return match.group(1).strip()
    raise _Unexpected(f"not a template of one expression: {template!r}")


@dataclass(frozen=True, slots=True)
class _Plan:
    """A mapping's template as expressions: the filter's (if any) and the leaves of the
    entity in the template's order, with how to put the results back together."""

    filter: str | None
    leaves: list[str]
    build: Callable[[list[Any]], dict[str, Any]]


def _plan(mapping: Mapping) -> _Plan:
    leaves: list[str] = []
    shape: list[tuple[str, list[str] | None]] = []  # (key, names of a nested object)
    for key, value in mapping.template["entity"].items():
        if not isinstance(key, str) or "{{" in key:
            raise _Unexpected(f"a templated key: {key!r}")
        if isinstance(value, dict):
            names: list[str] = []
            for name, sub in value.items():
                if not isinstance(name, str) or "{{" in name:
                    raise _Unexpected(f"a templated key: {name!r}")
                names.append(name)
                leaves.append(_expression(sub))
            shape.append((key, names))
        else:
            leaves.append(_expression(value))
            shape.append((key, None))

    def build(values: list[Any]) -> dict[str, Any]:
        entity: dict[str, Any] = {}
        at = 0
        for key, names in shape:
            if names is None:
                entity[key] = values[at]
                at += 1
            else:
                entity[key] = dict(zip(names, values[at : at + len(names)], strict=True))
                at += len(names)
        return entity

    has_filter = mapping.has_filter
    return _Plan(_expression(mapping.template["filter"]) if has_filter else None, leaves, build)


def _program(expression: str, contexts: str | None) -> str:
    """A template evaluating `expression` for each context of the document: `.events`
    when `contexts` is None, else `.[contexts]`, pairs [event index, item] whose item is
    exposed as `.item`. Each answer is [true, first output or null] or [false].

    The expression starts on the program's first line (`$__loc__` is unchanged) and a
    line break follows it (a trailing comment ends there). It holds no `}}` (template_of
    takes them apart), and neither does the rest."""
    one = "try [true, first((" + expression + "\n), null)] catch [false]"
    if contexts is None:
        return "{{ [.events[] | " + one + "] }}"
    return (
        "{{ .events as $__events | [." + contexts + "[] | "
        "($__events[.[0]] + {item: .[1]}) | " + one + "] }}"
    )


def _answers(value: Any, count: int) -> list[list[Any]]:
    if not isinstance(value, list) or len(value) != count:
        raise _Unexpected("a batched evaluation gave no answer per context")
    for answer in value:
        if not (
            isinstance(answer, list)
            and (
                (len(answer) == 2 and answer[0] is True)
                or (len(answer) == 1 and answer[0] is False)
            )
        ):
            raise _Unexpected("a batched evaluation gave an answer of another shape")
    return value


async def _render_together(
    mappings: list[Mapping | None], events: list[_Event], *, org: object
) -> list[_Rendered]:
    """Every event's mappings, each expression evaluated for the whole batch at once.
    Raises TemplateError or _Unexpected when the batched evaluation cannot be used."""
    rendered = [_Rendered() for _ in events]
    live = [m for m in mappings if m is not None]
    plans = {m.index: _plan(m) for m in live}
    document: dict[str, Any] = {"events": [event.data for event in events]}

    # itemsToParse, for every event at once.
    with_items = [m for m in live if m.items is not None]
    items: dict[tuple[int, int], list[Any]] = {}  # (mapping, event position) -> items
    if with_items:
        programs = [_program(_expression(m.items), None) for m in with_items]
        results = await render(programs, document, org=org)
        for mapping, result in zip(with_items, results, strict=True):
            for position, answer in enumerate(_answers(result, len(events))):
                if answer[0]:
                    checked = _items_checked(mapping, answer[1], rendered[position])
                else:
                    data = events[position].data
                    checked = await _items_alone(mapping, data, rendered[position], org=org)
                items[(mapping.index, position)] = checked or []

    # The contexts of each mapping: (event position, item index, item).
    contexts: dict[int, list[tuple[int, int | None, Any]]] = {}
    for mapping in live:
        if mapping.items is None:
            contexts[mapping.index] = [(position, None, None) for position in range(len(events))]
        else:
            contexts[mapping.index] = [
                (position, index, item)
                for position in range(len(events))
                for index, item in enumerate(items[(mapping.index, position)])
            ]
            document[f"c{mapping.index}"] = [
                [position, item] for position, _, item in contexts[mapping.index]
            ]

    # Filters and entities, for every context at once.
    programs = []
    slots: dict[int, int] = {}  # mapping index -> its first program
    for mapping in live:
        if not contexts[mapping.index]:
            continue
        plan = plans[mapping.index]
        key = None if mapping.items is None else f"c{mapping.index}"
        slots[mapping.index] = len(programs)
        expressions = ([plan.filter] if plan.filter is not None else []) + plan.leaves
        programs.extend(_program(expression, key) for expression in expressions)
    results = await render(programs, document, org=org) if programs else []
    for mapping in live:
        at = slots.get(mapping.index)
        if at is None:
            continue
        plan = plans[mapping.index]
        width = (1 if plan.filter is not None else 0) + len(plan.leaves)
        count = len(contexts[mapping.index])
        columns = [_answers(result, count) for result in results[at : at + width]]
        for row, (position, item, value) in enumerate(contexts[mapping.index]):
            answers = [column[row] for column in columns]
            found = rendered[position].found.setdefault(mapping.index, [])
            if plan.filter is not None and answers[0][0] is True and answers[0][1] is False:
                continue  # dropped by the filter, whatever its entity's jq does
            if not all(answer[0] for answer in answers):
                # Rendered again on its own for the failure's pointer and message.
                data = events[position].data
                context = data if item is None else {**data, "item": value}
                kept = plan.filter is not None and answers[0][0] is True
                entity = await _rendered_entity(
                    mapping, context, item, rendered[position], org=org, kept=kept
                )
            else:
                values = [answer[1] for answer in answers]
                template: dict[str, Any] = {}
                if plan.filter is not None:
                    template["filter"] = values.pop(0)
                template["entity"] = plan.build(values)
                entity = _entity_checked(mapping, template, item, rendered[position])
            if entity is not None:
                found.append((item, entity))
    return rendered


async def _render_batch(
    mappings: list[Mapping | None], events: list[_Event], *, org: object
) -> int:
    """Render the batch into its events: together, or event by event when that fails.
    How many of the events (the first ones) were rendered: event by event, the batch is
    cut once RENDER_ALONE_SECONDS have passed, and the rest waits for the next batch."""
    try:
        together = await _render_together(mappings, events, org=org)
    except (TemplateError, _Unexpected) as exc:
        log.info("webhook events rendered one at a time", extra={"reason": str(exc)[:200]})
        started = time.monotonic()
        for count, event in enumerate(events):
            if count and time.monotonic() - started > RENDER_ALONE_SECONDS:
                return count
            try:
                [rendered] = await _render_together(mappings, [event], org=org)
            except (TemplateError, _Unexpected):
                rendered = await _render_alone(mappings, event.data, org=org)
            event.take(mappings, rendered)
        return len(events)
    for event, rendered in zip(events, together, strict=True):
        event.take(mappings, rendered)
    return len(events)


# ---------------------------------------------------------------------------------------
# Writing


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


def _levels(ops: list[_Op]) -> list[list[_Op]]:
    """The batch's writes grouped so that running the levels in order, each level's
    writes in any order, ends as running every write one after the other would.

    Two upserts are ordered when they write the same entity or when one names the other's
    identifier in a relation (it may create it as a bare related entity, or find it
    created); a delete is ordered with everything (it may delete dependents and unlink),
    and so is an upsert whose relations or team are search queries (they find what the
    writes before it left, and a later write may change what they would find)."""
    levels: list[list[_Op]] = []
    floor = 0
    written: dict[tuple[str, str], int] = {}  # (blueprint, identifier) -> last level
    written_ids: dict[str, int] = {}  # identifier (any blueprint) -> last level
    named: dict[str, int] = {}  # identifier named by a relation -> last level
    for op in ops:
        if op.mapping.delete or op.searches():
            levels.append([op])
            floor = len(levels)
            continue
        identifier = op.identifier
        key = (op.mapping.blueprint, identifier)
        targets = op.targets()
        level = max(
            floor,
            written.get(key, -1) + 1,
            named.get(identifier, -1) + 1,
            *(written_ids.get(target, -1) + 1 for target in targets),
        )
        while len(levels) <= level:
            levels.append([])
        levels[level].append(op)
        written[key] = level
        written_ids[identifier] = max(written_ids.get(identifier, -1), level)
        for target in targets:
            named[target] = max(named.get(target, -1), level)
    return levels


async def _upsert(tx: Tx, blueprint: str, ops: list[_Op], writer: Writer) -> None:
    """One write of entities of one blueprint, none twice. Refused as a whole, the write
    is made again per event and mapping, so each refusal lands on its own event."""
    raws = [op.entity for op in ops]
    # Each change's event names the webhook event its entity came from.
    by_item = replace(writer, webhook_events=[op.event.id for op in ops])

    async def work() -> list[entities.Outcome]:
        return await entities.write(tx, blueprint, raws, _WRITE, by_item)

    try:
        results = await _savepoint(tx, work)
    except _TRANSIENT:
        raise
    except (PortolanError, asyncpg.PostgresError) as exc:
        parts: dict[tuple[int, int], list[_Op]] = {}
        for op in ops:
            parts.setdefault((id(op.event), op.mapping.index), []).append(op)
        if len(parts) > 1:
            for part in parts.values():
                await _upsert(tx, blueprint, part, writer)
            return
        message = exc.message if isinstance(exc, PortolanError) else _refused(exc)
        for op in ops:
            op.error(message, blueprint=blueprint, identifier=op.identifier)
        return
    for result in results:
        op = ops[result.index]
        if result.error is not None:
            op.error(result.error.message, blueprint=blueprint, identifier=result.identifier)
        else:
            op.written(result.identifier, "create" if result.created else "update")


async def _delete(tx: Tx, op: _Op, writer: Writer) -> None:
    identifier = op.identifier
    blueprint = op.mapping.blueprint

    async def work() -> list[str]:
        return await entities.delete_many(
            tx,
            blueprint,
            [identifier],
            delete_dependents=op.mapping.delete_dependents,
            writer=replace(writer, webhook_event=op.event.id),
        )

    try:
        deleted = await _savepoint(tx, work)
    except _TRANSIENT:
        raise
    except PortolanError as exc:
        op.error(exc.message, blueprint=blueprint, identifier=identifier)
        return
    except asyncpg.PostgresError as exc:
        op.error(_refused(exc), blueprint=blueprint, identifier=identifier)
        return
    if deleted:  # an entity that does not exist is nothing to delete
        op.written(identifier, "delete")


async def render_events(
    org: object, mappings: list[Any], rows: Sequence[asyncpg.Record]
) -> list[_Event]:
    """The mappings rendered for a batch of events, in order, each with what to write and
    its outcome so far: the first events (all of them unless rendering them took too long).
    Call it with no transaction open: jq runs in the sandbox meanwhile."""
    events = [
        _Event(
            id=row["id"],
            data={
                "body": row["body"],
                "headers": row["headers"],
                "queryParams": row["query_params"],
            },
            outcome=_Outcome(prior=list((row["outcome"] or {}).get("errors", []))),
        )
        for row in rows
    ]
    compiled: list[Mapping | None] = []
    for index, raw in enumerate(mappings):
        try:
            compiled.append(compile_mapping(index, raw))
        except (KeyError, TypeError, AttributeError):
            compiled.append(None)
            for event in events:
                event.outcome.error(
                    (index, 0, -1), index, None, f"/mappings/{index}", "the mapping cannot be read"
                )
    return events[: await _render_batch(compiled, events, org=org)]


async def write_events(tx: Tx, webhook: str, events: list[_Event]) -> list[dict[str, Any]]:
    """Write what rendered events map to, in order; the outcome to record on each."""
    writer = Writer(actor=f"webhook:{webhook}", origin="WEBHOOK", datasource=None)
    for level in _levels([op for event in events for op in event.ops]):
        if level[0].mapping.delete:
            await _delete(tx, level[0], writer)
            continue
        by_blueprint: dict[str, list[_Op]] = {}
        for op in level:
            by_blueprint.setdefault(op.mapping.blueprint, []).append(op)
        for blueprint, ops in by_blueprint.items():
            await _upsert(tx, blueprint, ops, writer)
    return [event.outcome.as_json() for event in events]


# ---------------------------------------------------------------------------------------
# Passes


def _batch_of(rows: Sequence[asyncpg.Record]) -> list[str]:
    """The oldest pending events to apply together: alone when it was tried before,
    else those up to the first tried before, within BATCH_BYTES."""
    if rows[0]["attempts"] > 0:
        return [rows[0]["id"]]
    chosen: list[str] = []
    size = 0
    for row in rows:
        if row["attempts"] > 0 or (chosen and size + row["size"] > BATCH_BYTES):
            break
        chosen.append(row["id"])
        size += row["size"]
    return chosen


LEASE_SECONDS = 120.0  # a pass's hold on its webhook, renewed by every batch

# Take the webhook's pass, or renew this pass's hold on it; nothing when another pass holds
# it (or the webhook is gone).
_CLAIM = """
INSERT INTO webhook_passes AS p (org_id, webhook, claim, lease_until)
SELECT org_id, identifier, $3, now() + make_interval(secs => $4)
FROM webhooks WHERE org_id = $1 AND identifier = $2
ON CONFLICT (org_id, webhook) DO UPDATE
SET claim = excluded.claim, lease_until = excluded.lease_until
WHERE p.claim = excluded.claim OR p.lease_until < now()
RETURNING claim
"""


async def _process_batch(
    db: Database, org_id: uuid.UUID, webhook: str, limit: int, running: _Pass, claimed: list[str]
) -> tuple[int, bool] | None:
    """Apply a batch of the webhook's oldest pending events: how many (0 when there are
    none) and whether more were pending; None when another pass holds the webhook (or it
    is gone). The batch's ids go to `claimed` before anything is applied.

    Three steps, so no connection waits while the mappings' jq runs: take (or renew) the
    pass's lease and read the batch; render it with no transaction open; then, still
    holding the lease, write the entities and record the outcomes in one transaction."""
    async with db.tenant(org_id) as tx:
        held = await tx.fetchval(_CLAIM, org_id, webhook, running.claim, LEASE_SECONDS)
        if held is None:
            return None
        mappings = await tx.fetchval(
            "SELECT mappings FROM webhooks WHERE org_id = $1 AND identifier = $2",
            org_id,
            webhook,
        )
        pending = await tx.fetch(
            "SELECT id, attempts, coalesce(pg_column_size(body), 0) AS size "
            "FROM webhook_events WHERE org_id = $1 AND webhook = $2 AND status = 'pending' "
            "ORDER BY received_at, id LIMIT $3",
            org_id,
            webhook,
            limit,
        )
        if not pending:
            return 0, False
        chosen = _batch_of(pending)
        rows = await tx.fetch(
            "SELECT id, body, headers, query_params, outcome FROM webhook_events "
            "WHERE org_id = $1 AND id = ANY($2::varchar[])",
            org_id,
            chosen,
        )
    order = {event_id: position for position, event_id in enumerate(chosen)}
    rows.sort(key=lambda row: order[row["id"]])
    claimed.extend(chosen)
    events = await render_events(org_id, mappings, rows)
    del claimed[len(events) :]
    async with db.tenant(org_id) as tx:
        # Still this pass's (a lease that ran out may have gone to another pass), and the
        # mappings unchanged; events are only ever applied under the lease, so they are
        # still pending.
        current = await tx.fetchval(
            "SELECT w.mappings FROM webhook_passes p JOIN webhooks w "
            "ON w.org_id = p.org_id AND w.identifier = p.webhook "
            "WHERE p.org_id = $1 AND p.webhook = $2 AND p.claim = $3 FOR UPDATE OF p",
            org_id,
            webhook,
            running.claim,
        )
        if current is None:
            claimed.clear()
            return None
        if current != mappings:
            claimed.clear()
            return 0, True  # changed meanwhile: read the batch again
        outcomes = await write_events(tx, webhook, events)
        await tx.execute(
            "UPDATE webhook_events AS w SET status = u.status, outcome = u.outcome, "
            "processed_at = now(), attempts = w.attempts + 1 "
            "FROM unnest($2::varchar[], $3::varchar[], $4::jsonb[]) AS u(id, status, outcome) "
            "WHERE w.org_id = $1 AND w.id = u.id",
            org_id,
            [event.id for event in events],
            ["failed" if outcome["errors"] else "processed" for outcome in outcomes],
            outcomes,
        )
    return len(events), len(pending) > len(events) or len(pending) == limit


async def _release(db: Database, org_id: uuid.UUID, webhook: str, running: _Pass) -> None:
    """End the pass's hold on its webhook (another pass may take it at once)."""
    async with db.tenant(org_id) as tx:
        await tx.execute(
            "DELETE FROM webhook_passes WHERE org_id = $1 AND webhook = $2 AND claim = $3",
            org_id,
            webhook,
            running.claim,
        )


async def _record_failure(
    db: Database, org_id: uuid.UUID, event_ids: str | Sequence[str], exc: BaseException
) -> None:
    """One more failed attempt at each event; at MAX_ATTEMPTS an event is marked failed.
    The rows are locked in the order a pass locks them, so the two never deadlock."""
    error = {
        "mapping": None,
        "item": None,
        "pointer": "",
        "message": f"processing stopped ({type(exc).__name__}) after {MAX_ATTEMPTS} attempts",
    }
    ids = [event_ids] if isinstance(event_ids, str) else list(event_ids)
    async with db.tenant(org_id) as tx:
        await tx.execute(
            "UPDATE webhook_events SET attempts = attempts + 1, "
            "status = CASE WHEN attempts + 1 >= $3 THEN 'failed' ELSE status END, "
            "processed_at = CASE WHEN attempts + 1 >= $3 THEN now() END, "
            "outcome = CASE WHEN attempts + 1 >= $3 THEN jsonb_build_object("
            "'entities', '[]'::jsonb, 'errors', "
            "coalesce(outcome->'errors', '[]'::jsonb) || jsonb_build_array($4::jsonb)) "
            "ELSE outcome END "
            "WHERE org_id = $1 AND id IN ("
            "  SELECT id FROM webhook_events WHERE org_id = $1 AND id = ANY($2::varchar[])"
            "  AND status = 'pending' ORDER BY received_at, id FOR UPDATE)",
            org_id,
            ids,
            MAX_ATTEMPTS,
            error,
        )


@dataclass(slots=True)
class _Pass:
    """A pass over one webhook: `again` notes that another call for the webhook arrived
    while it ran in this process (that call's event may have committed after the pass
    last looked); `failed`, that a batch failed and the pass stopped."""

    again: bool = False
    done: int = 0
    failed: bool = False
    claim: uuid.UUID = field(default_factory=uuid.uuid4)  # its lease on the webhook


_passes: dict[tuple[uuid.UUID, str], _Pass] = {}


async def process_webhook(
    db: Database, org_id: uuid.UUID, webhook: str, *, limit: int = EVENTS_PER_PASS
) -> int:
    """Apply up to `limit` pending events of one webhook, oldest first; how many.

    While a pass over the webhook runs in this process, another call only asks it to
    look again before it ends (and returns 0): the jobs of a burst of events cost no
    transaction each. Passes in other processes exclude each other through the
    webhook's row."""
    return (await _webhook_pass(db, org_id, webhook, limit)).done


async def _webhook_pass(
    db: Database, org_id: uuid.UUID, webhook: str, limit: int, *, drain: bool = True
) -> _Pass:
    key = (org_id, webhook)
    running = _passes.get(key)
    if running is not None:
        running.again = True
        return _Pass()
    running = _passes[key] = _Pass()
    try:
        await _run_pass(db, org_id, webhook, limit, running, drain=drain)
    finally:
        if _passes.get(key) is running:
            del _passes[key]
    return running


async def _run_pass(
    db: Database,
    org_id: uuid.UUID,
    webhook: str,
    limit: int,
    running: _Pass,
    *,
    drain: bool = True,
) -> int:
    """Batches until `limit` events are applied, a batch fails, or none is pending.
    After a batch that took every pending event, `drain` waits BATCH_WAIT_SECONDS (more
    are likely on their way, and make one batch) and looks again; without `drain` the
    pass ends there."""
    try:
        while running.done < limit:
            running.again = False
            claimed: list[str] = []
            try:
                result = await _process_batch(
                    db, org_id, webhook, min(BATCH_EVENTS, limit - running.done), running, claimed
                )
            except Exception as exc:
                running.failed = True
                log.warning(
                    "webhook event processing failed; it will be tried again",
                    extra={
                        "org_id": str(org_id),
                        "webhook": webhook,
                        "events": len(claimed),
                        "error": type(exc).__name__,
                    },
                )
                if claimed:
                    try:
                        await _record_failure(db, org_id, claimed, exc)
                    except Exception:
                        log.warning("could not record the failure", exc_info=True)
                break
            if result is None:  # another process's pass holds the webhook
                break
            count, more = result
            if count == 0:
                if running.again or more:  # more: the mappings changed while it rendered
                    continue
                break
            running.done += count
            if not more:
                if not drain:
                    break
                await asyncio.sleep(BATCH_WAIT_SECONDS)
    finally:
        try:
            await _release(db, org_id, webhook, running)
        except Exception:  # the lease runs out by itself
            log.warning("could not end a webhook pass's lease", exc_info=True)
    return running.done


_periodic: set[int] = set()  # the databases a periodic pass of this process runs on


async def process_pending(db: Database) -> int:
    """The periodic pass: the events pending in every webhook, oldest first. While it
    finds events it looks again every LOOK_AGAIN_SECONDS (up to PENDING_PASS_SECONDS), so
    events whose job never reached a worker wait that long rather than for the next pass;
    a webhook whose batch failed is left alone until the next pass. A pass started while
    another runs in this process returns at once."""
    if id(db) in _periodic:
        return 0
    _periodic.add(id(db))
    try:
        total = 0
        resting: set[tuple[uuid.UUID, str]] = set()
        deadline = time.monotonic() + PENDING_PASS_SECONDS
        while True:
            done = await _pending_once(db, resting)
            total += done
            if done == 0 or time.monotonic() >= deadline:
                return total
            await asyncio.sleep(LOOK_AGAIN_SECONDS)
    finally:
        _periodic.discard(id(db))


async def _pending_once(db: Database, resting: set[tuple[uuid.UUID, str]]) -> int:
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
        key = (row["org_id"], row["webhook"])
        if key in resting:
            continue
        done = await _webhook_pass(db, key[0], key[1], EVENTS_PER_PASS, drain=False)
        if done.failed:
            resting.add(key)
        total += done.done
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
