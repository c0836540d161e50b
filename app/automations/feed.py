"""The event feed: entity and run events become automation runs, once each.

Entity events are written by the catalog in the transaction of the change; run events by a
trigger on `action_runs` (migration 0011). Both carry the id of the transaction that wrote
them (`xid`). Identity ids are handed out before commit, so they do not say in which order
transactions committed; transaction ids with PostgreSQL's snapshot horizon do: every
transaction below `pg_snapshot_xmin(pg_current_snapshot())` has ended, committed (its
events are visible) or rolled back (they never will be). The feed keeps that horizon as its
cursor (`event_feed_cursors`) and each pass reads the events of the transactions between the
old horizon and the new one: every committed change once, a rolled-back one never.

A pass runs in one transaction: it locks the cursor (a second worker's pass skips the
round), evaluates the automations of the events' orgs, creates their runs (source
AUTOMATION, with an outbox row each: app/actions/runs.py), and moves the cursor. Were the
pass to fail, nothing of it stays and the next pass reads the same events again; each run
also carries a key made of the automation and the event (a unique index), so an event
makes at most one run per automation.

An automation matches an event of its `event` (ENTITY_CREATED / ENTITY_UPDATED /
ENTITY_DELETED / ANY_ENTITY_CHANGE on its blueprint, RUN_CREATED / RUN_UPDATED /
ANY_RUN_CHANGE of its action) when it is published and its jq `condition` holds over the
event's data `{action, resourceType, trigger, context, diff: {before, after}}`. A run of an
automation never triggers that same automation, and a chain of automations stops after
MAX_CHAIN runs. A long-running transaction anywhere in the cluster holds the horizon back,
and automations wait for it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import asyncpg

from app.actions import runs
from app.automations import changelog
from app.db.database import Database, Tx
from app.dispatch import templates
from app.kit.loops import PollingLoop

log = logging.getLogger("portolan.automations")
FEED = "automations"
BATCH = 2000
MAX_CHAIN = 5
POLL_SECONDS = 0.1
_ENTITY_TYPES = {
    "CREATE": ("ENTITY_CREATED", "ANY_ENTITY_CHANGE"),
    "UPDATE": ("ENTITY_UPDATED", "ANY_ENTITY_CHANGE"),
    "DELETE": ("ENTITY_DELETED", "ANY_ENTITY_CHANGE"),
}
_RUN_TYPES = {
    "CREATE": ("RUN_CREATED", "ANY_RUN_CHANGE"),
    "UPDATE": ("RUN_UPDATED", "ANY_RUN_CHANGE"),
}


@dataclass
class Event:
    """One event as automations see it."""

    org_id: Any
    key: str  # unique per event within its feed (`e<id>` / `r<id>`)
    types: tuple[str, ...]
    scope: str  # the blueprint (entity events) or the action (run events)
    data: dict[str, Any]  # the event data of conditions and of templates' `.event`
    entity: dict[str, Any] | None
    caused_by: str | None  # the action whose run made this change
    depth: int


def _at(value: Any) -> str:
    return str(value.isoformat().replace("+00:00", "Z"))


def entity_event(row: asyncpg.Record) -> Event:
    after, before = row["after"], row["before"]
    return Event(
        org_id=row["org_id"],
        key=f"e{row['id']}",
        types=_ENTITY_TYPES.get(row["action"], ()),
        scope=row["blueprint"],
        data={
            "action": row["action"],
            "resourceType": "entity",
            "trigger": {
                "by": {"orgId": str(row["org_id"]), "userId": row["actor"]},
                "origin": row["origin"],
                "at": _at(row["at"]),
            },
            "context": {
                "blueprintIdentifier": row["blueprint"],
                "entityIdentifier": row["identifier"],
            },
            "diff": {"before": before, "after": after},
        },
        entity=after if after is not None else before,
        caused_by=row["run_action"],
        depth=int(row["run_depth"] or 0),
    )


def run_event(row: asyncpg.Record) -> Event:
    return Event(
        org_id=row["org_id"],
        key=f"r{row['id']}",
        types=_RUN_TYPES.get(row["kind"], ()),
        scope=row["action"],
        data={
            "action": row["kind"],
            "resourceType": "run",
            "trigger": {
                "by": {"orgId": str(row["org_id"]), "userId": row["actor"]},
                "origin": "API",
                "at": _at(row["at"]),
            },
            "context": {"actionIdentifier": row["action"], "runId": row["run_id"]},
            "diff": {"before": row["before"], "after": row["after"]},
        },
        entity=None,
        caused_by=row["action"],
        depth=int(row["depth"]),
    )


async def _automations(tx: Tx, orgs: list[Any]) -> dict[Any, list[asyncpg.Record]]:
    rows = await tx.fetch(
        "SELECT org_id, identifier, title, icon, trigger, invocation_method, required_approval "
        "FROM actions WHERE org_id = ANY($1::uuid[]) AND publish "
        "AND trigger->>'type' = 'automation'",
        orgs,
    )
    found: dict[Any, list[asyncpg.Record]] = defaultdict(list)
    for row in rows:
        found[row["org_id"]].append(row)
    return found


def _matches(automation: asyncpg.Record, event: Event) -> bool:
    wanted = automation["trigger"].get("event") or {}
    kind = wanted.get("type")
    if kind not in event.types:
        return False
    scope = (
        wanted.get("blueprintIdentifier")
        if kind.startswith(("ENTITY", "ANY_ENTITY"))
        else (wanted.get("actionIdentifier"))
    )
    if scope != event.scope:
        return False
    # Never its own trigger; and chains of automations end.
    return event.caused_by != automation["identifier"] and event.depth < MAX_CHAIN


async def condition_holds(automation: asyncpg.Record, data: dict[str, Any]) -> bool:
    """The automation's jq condition over the event data (no condition: true). A jq error
    is logged and counts as false."""
    condition = automation["trigger"].get("condition")
    if not condition:
        return True
    expressions = [str(e) for e in condition.get("expressions") or []]
    if not expressions:
        return True
    try:
        values = await templates.render(["{{ " + e + " }}" for e in expressions], data)
    except templates.TemplateError as exc:
        log.warning(
            "automation %s: its condition failed on an event: %s", automation["identifier"], exc
        )
        return False
    truths = [v is not None and v is not False for v in values]
    return any(truths) if condition.get("combinator") == "or" else all(truths)


async def create_automation_run(
    tx: Tx,
    automation: asyncpg.Record,
    event_data: dict[str, Any],
    entity: dict[str, Any] | None,
    key: str,
    depth: int,
) -> str | None:
    """A run of the automation for an event (once per key); its id, or None when the key
    already made one."""
    trigger = event_data.get("trigger") or {}
    context = {
        "trigger": {**trigger, "origin": "AUTOMATION"},
        "entity": entity,
        "inputEntities": {},
        "event": event_data,
        "depth": depth + 1,
    }
    return await runs.insert_run(
        tx,
        actor="automation",
        action=automation,
        properties={},
        blueprint=(automation["trigger"].get("event") or {}).get("blueprintIdentifier"),
        entity=(entity or {}).get("identifier"),
        context=context,
        source="AUTOMATION",
        idempotency_key=f"{automation['identifier']}/{key}",
    )


async def _fire(tx: Tx, events: list[Event]) -> int:
    if not events:
        return 0
    automations = await _automations(tx, sorted({e.org_id for e in events}, key=str))
    made = 0
    for event in events:
        for automation in automations.get(event.org_id, ()):
            if not _matches(automation, event):
                continue
            if not await condition_holds(automation, event.data):
                continue
            bound = Tx(tx.conn, event.org_id)
            run_id = await create_automation_run(
                bound, automation, event.data, event.entity, event.key, event.depth
            )
            made += run_id is not None
    return made


async def _interested(tx: Tx) -> list[Any]:
    """The orgs whose events anything reads: published automations or a blueprint with a
    changelog destination. Other orgs' events are passed over unread."""
    rows = await tx.fetch(
        "SELECT org_id FROM actions WHERE publish AND trigger->>'type' = 'automation' "
        "UNION SELECT org_id FROM blueprints WHERE changelog_destination IS NOT NULL"
    )
    return [r["org_id"] for r in rows]


async def _slice(
    tx: Tx, table: str, start: str, end: str, orgs: list[Any]
) -> tuple[list[asyncpg.Record], str]:
    """The events of the transactions in [start, end) — at most about BATCH of them: when
    there are more, the slice ends at a transaction boundary (a transaction is read whole)
    and the returned end says where."""
    select = (
        "SELECT e.*, r.action AS run_action, (r.context->>'depth')::int AS run_depth "
        "FROM entity_events e LEFT JOIN action_runs r ON r.org_id = e.org_id AND r.id = e.run_id"
        if table == "entity_events"
        else "SELECT e.* FROM run_events e"
    )
    rows = await tx.fetch(
        f"{select} WHERE e.xid >= $1::text::xid8 AND e.xid < $2::text::xid8 "
        "AND e.org_id = ANY($4::uuid[]) ORDER BY e.xid, e.id LIMIT $3",
        start,
        end,
        BATCH + 1,
        orgs,
    )
    if len(rows) <= BATCH:
        return rows, end
    last = str(rows[-1]["xid"])
    kept = [r for r in rows if str(r["xid"]) != last]
    if kept:
        return kept, last
    # One transaction wrote more than a batch: read it whole.
    whole = await tx.fetch(
        f"{select} WHERE e.xid = $1::text::xid8 AND e.org_id = ANY($2::uuid[]) ORDER BY e.id",
        last,
        orgs,
    )
    return whole, str(int(last) + 1)


async def process_once(db: Database) -> int:
    """One pass of the feed; how many automation runs it made."""
    async with db.system() as tx:
        horizon = await tx.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
        row = await tx.fetchrow(
            "SELECT horizon FROM event_feed_cursors WHERE feed = $1 FOR UPDATE SKIP LOCKED", FEED
        )
        if row is None:
            # No cursor yet (the feed starts now), or another pass holds it.
            await tx.execute(
                "INSERT INTO event_feed_cursors (feed, horizon) VALUES ($1, $2) "
                "ON CONFLICT DO NOTHING",
                FEED,
                horizon,
            )
            return 0
        start = str(row["horizon"])
        if int(horizon) <= int(start):
            return 0
        orgs = await _interested(tx)
        if orgs:
            entity_rows, entity_end = await _slice(tx, "entity_events", start, horizon, orgs)
            run_rows, end = await _slice(tx, "run_events", start, entity_end, orgs)
        else:
            entity_rows, run_rows, entity_end = [], [], horizon
            end = horizon
        if end != entity_end:  # the run slice was cut shorter: entity events that far too
            entity_rows = [r for r in entity_rows if int(str(r["xid"])) < int(end)]
        ordered = sorted(
            [(int(str(r["xid"])), 0, r["id"], entity_event(r)) for r in entity_rows]
            + [(int(str(r["xid"])), 1, r["id"], run_event(r)) for r in run_rows],
            key=lambda item: item[:3],
        )
        events = [item[3] for item in ordered]
        made = await _fire(tx, events)
        await changelog.enqueue(tx, events)
        await tx.execute(
            "UPDATE event_feed_cursors SET horizon = $2, updated_at = now() WHERE feed = $1",
            FEED,
            end,
        )
    return made


def event_feed(db: Database) -> PollingLoop:
    """The feed's loop in a worker process."""

    async def step() -> bool:
        await process_once(db)
        return False

    return PollingLoop("event feed", step, poll_seconds=POLL_SECONDS, log=log)
