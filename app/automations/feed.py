"""The event feed: entity and run events become automation runs, once each.

Entity events are written by the catalog in the transaction of the change; run events by a
trigger on `action_runs` (migration 0011). Both carry the id of the transaction that wrote
them (`xid`). Identity ids are handed out before commit, so they do not say in which order
transactions committed; transaction ids with PostgreSQL's snapshot horizon do: every
transaction below `pg_snapshot_xmin(pg_current_snapshot())` has ended, committed (its
events are visible) or rolled back (they never will be). The feed keeps that horizon as its
cursor (`event_feed_cursors`) and each pass reads the events of the transactions between the
old horizon and the new one: every committed change once, a rolled-back one never.

Organizations take turns: each has its own cursor (`automations/<org>`), and one org's
pass never waits for another's. A tick of the feed (every 100 ms in each worker process)
computes the horizon, gives orgs that newly have automations or a changelog destination a
cursor (starting at the floor: the previous tick's horizon), moves the cursors of orgs
with no events in their range straight to the horizon (at most once a second: idle orgs'
rows are not written on every tick), and claims, least recently served
first, the cursors of orgs that have events, each with a lease (one pass per org at a time,
across processes). At most `automation_concurrency` passes run at once per process, each
evaluating at most `automation_org_concurrency` of its org's conditions at once.

A pass holds no transaction while conditions are evaluated (an open transaction would hold
back every org's horizon): it reads its org's events and automations in one short
transaction, evaluates, then in another creates the runs (source AUTOMATION, with an
outbox row each: app/actions/runs.py), adds the changelog deliveries and moves its cursor,
only while its lease is still its own. A pass spends about `PASS_SECONDS` on conditions and
then stops at a transaction boundary (the rest waits for its org's next turn), so a slow
condition holds up only its own org. Were a pass to fail, nothing of it stays and the next
reads the same events again; each run also carries a key made of the automation and the
event (a unique index), so an event makes at most one run per automation.

An automation matches an event of its `event` (ENTITY_CREATED / ENTITY_UPDATED /
ENTITY_DELETED / ANY_ENTITY_CHANGE on its blueprint, RUN_CREATED / RUN_UPDATED /
ANY_RUN_CHANGE of its action) when it is published and its jq `condition` holds over the
event's data `{action, resourceType, trigger, context, diff: {before, after}}`. A run of an
automation never triggers that same automation, and a chain of automations stops after
MAX_CHAIN runs. The same pass starts workflows from their EVENT_TRIGGER nodes
(app/workflows/events.py): matched and their conditions evaluated as automations are, with
the same per-org share, their runs made in the same transaction. Each org's horizon is its
own (`horizons`): a long-running tenant transaction holds back its own org's automations;
one that names no org, every org's.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from app.actions import runs
from app.automations import changelog
from app.config import Settings
from app.db.database import ORG_TAG, Database, Tx, bind_org
from app.dispatch import templates
from app.kit.loops import PollingLoop
from app.workflows import events as workflow_events

log = logging.getLogger("portolan.automations")
FEED = "automations"
BATCH = 2000
LEASE_SECONDS = 15.0
PASS_SECONDS = 2.0
IDLE_ADVANCE_SECONDS = 1.0
CONCURRENCY = 8
ORG_CONCURRENCY = 2
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
    workflow: str | None = None  # the workflow whose event-started run made this change


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


async def condition_holds(
    automation: asyncpg.Record | dict[str, Any], data: dict[str, Any], org_id: uuid.UUID | None
) -> bool:
    """The automation's jq condition over the event data (no condition: true). A jq error
    is logged and counts as false; a failure to evaluate at all (no turn in the jq
    processes) is raised, and the event is read again on the org's next turn."""
    condition = automation["trigger"].get("condition")
    if not condition:
        return True
    expressions = [str(e) for e in condition.get("expressions") or []]
    if not expressions:
        return True
    try:
        values = await templates.render(["{{ " + e + " }}" for e in expressions], data, org=org_id)
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


_INTERESTED = " UNION ".join(
    (
        "SELECT org_id FROM actions WHERE publish AND trigger->>'type' = 'automation'",
        "SELECT org_id FROM blueprints WHERE changelog_destination IS NOT NULL",
        workflow_events.INTERESTED,
    )
)


async def _interested(tx: Tx) -> list[Any]:
    """The orgs whose events anything reads: published automations, a blueprint with a
    changelog destination or a workflow with an event trigger. Other orgs' events are
    passed over unread."""
    rows = await tx.fetch(_INTERESTED)
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


# The cursor row `c`'s org has events between its horizon and its org's horizon `h.h`.
_HAS_EVENTS = (
    "(EXISTS (SELECT 1 FROM entity_events e WHERE e.org_id = c.org_id "
    " AND e.xid >= c.horizon::xid8 AND e.xid < h.h::xid8) "
    "OR EXISTS (SELECT 1 FROM run_events e WHERE e.org_id = c.org_id "
    " AND e.xid >= c.horizon::xid8 AND e.xid < h.h::xid8))"
)
# The interested orgs' cursors with their horizons: `$1` feed keys, `$2` horizons.
_HORIZONS = "unnest($1::text[], $2::text[]) AS h(feed, h)"


async def horizons(tx: Tx, orgs: list[uuid.UUID]) -> tuple[str, dict[uuid.UUID, str]]:
    """The feed's floor (every transaction below it has ended) and, per org, how far its
    events may be read: below every transaction still running that could write them.

    A tenant transaction names its org in `application_name` from its first statement
    (app/db/database.py) and, bound by row-level security, writes only that org's rows:
    it holds back its own org's horizon, not the others'. A running transaction that names
    no org (operator work, another role, a row pg_stat_activity hides from this role, one
    that ended between the snapshot and the read of pg_stat_activity) holds back every
    org's, as the snapshot's horizon always did; so does a session of another database
    or login role, whatever it calls itself."""
    row = await tx.fetchrow(
        "SELECT pg_snapshot_xmin(s)::text AS xmin, pg_snapshot_xmax(s)::text AS xmax, "
        "ARRAY(SELECT x::text FROM pg_snapshot_xip(s) x) AS xip, "
        # A name counts only from Portolan's own sessions (this database, this login role):
        # any other session's transaction holds back every org.
        "ARRAY(SELECT a.backend_xid::text || ' ' || CASE WHEN a.datname = current_database() "
        "      AND a.usename = session_user THEN COALESCE(a.application_name, '') ELSE '' END "
        "      FROM pg_stat_activity a WHERE a.backend_xid IS NOT NULL) AS running "
        "FROM pg_current_snapshot() s"
    )
    assert row is not None
    floor = str(row["xmin"])
    named: dict[int, str] = {}
    for entry in row["running"]:
        xid, _, name = entry.partition(" ")
        if name.startswith(ORG_TAG):
            named[int(xid)] = name[len(ORG_TAG) :]
    anyone = int(row["xmax"])  # below it: ended, or running in some org's transaction
    own: dict[str, int] = {}
    for text in row["xip"]:
        xid = int(text)
        org = named.get(xid & 0xFFFFFFFF)
        if org is None:
            anyone = min(anyone, xid)
        else:
            own[org] = min(own.get(org, xid), xid)
    return floor, {org: str(min(anyone, own.get(org.hex, anyone))) for org in orgs}


def _feed_key(org_id: uuid.UUID) -> str:
    return f"{FEED}/{org_id.hex}"


@dataclass
class Claim:
    """One org's turn: its cursor, leased."""

    org_id: uuid.UUID
    start: str
    horizon: str
    token: uuid.UUID


async def plan(db: Database, slots: int, skip: set[uuid.UUID] | None = None) -> list[Claim]:
    """One tick: cursors for newly interested orgs, idle orgs moved to the horizon, and up
    to `slots` orgs with events claimed (least recently served first), except `skip`."""
    async with db.system() as tx:
        orgs = await _interested(tx)
        horizon, by_org = await horizons(tx, orgs)
        floor = await tx.fetchrow(
            "SELECT horizon FROM event_feed_cursors WHERE feed = $1 FOR UPDATE SKIP LOCKED", FEED
        )
        if floor is None:
            # No floor yet (the feed starts now), or another process is ticking.
            await tx.execute(
                "INSERT INTO event_feed_cursors (feed, horizon) VALUES ($1, $2) "
                "ON CONFLICT DO NOTHING",
                FEED,
                horizon,
            )
            return []
        keys = [_feed_key(org) for org in orgs]
        ends = [by_org[org] for org in orgs]
        # Orgs that no longer read events lose their cursor (one that comes back starts
        # at the floor, not at old events); new ones start at the floor.
        await tx.execute(
            "DELETE FROM event_feed_cursors WHERE org_id IS NOT NULL "
            "AND NOT (feed = ANY($1::text[])) AND (lease_until IS NULL OR lease_until < now())",
            keys,
        )
        await tx.execute(
            "INSERT INTO event_feed_cursors (feed, org_id, horizon) "
            "SELECT * FROM unnest($1::text[], $2::uuid[]), (SELECT $3::text) f "
            "ON CONFLICT DO NOTHING",
            keys,
            orgs,
            str(floor["horizon"]),
        )
        await tx.execute(
            "UPDATE event_feed_cursors SET horizon = $2, updated_at = now() "
            "WHERE feed = $1 AND horizon::xid8 < $2::text::xid8",
            FEED,
            horizon,
        )
        # Orgs without events since their cursor: straight to the horizon (at most every
        # IDLE_ADVANCE_SECONDS, so idle orgs' rows are not written on every tick, and
        # their ranges to look into stay short).
        await tx.execute(
            "UPDATE event_feed_cursors c SET horizon = h.h, updated_at = now() "  # noqa: S608
            f"FROM {_HORIZONS} WHERE c.feed = h.feed AND c.horizon::xid8 < h.h::xid8 "
            "AND c.updated_at < now() - make_interval(secs => $3) "
            f"AND (c.lease_until IS NULL OR c.lease_until < now()) AND NOT {_HAS_EVENTS}",
            keys,
            ends,
            IDLE_ADVANCE_SECONDS,
        )
        if slots <= 0:
            return []
        rows = await tx.fetch(
            "UPDATE event_feed_cursors c SET lease_until = now() + make_interval(secs => $3), "  # noqa: S608
            "lease_token = gen_random_uuid() FROM ("
            f" SELECT c.feed, h.h FROM event_feed_cursors c JOIN {_HORIZONS} ON c.feed = h.feed"
            " WHERE c.horizon::xid8 < h.h::xid8 "
            " AND (c.lease_until IS NULL OR c.lease_until < now()) "
            f" AND NOT (c.org_id = ANY($5::uuid[])) AND {_HAS_EVENTS}"
            " ORDER BY c.updated_at, c.feed LIMIT $4 FOR UPDATE OF c SKIP LOCKED) t "
            "WHERE c.feed = t.feed RETURNING c.org_id, c.horizon, c.lease_token, t.h",
            keys,
            ends,
            LEASE_SECONDS,
            slots,
            list(skip or ()),
        )
    return [Claim(r["org_id"], str(r["horizon"]), str(r["h"]), r["lease_token"]) for r in rows]


async def _extend(db: Database, claim: Claim) -> bool:
    async with db.system() as tx:
        return (
            await tx.fetchval(
                "UPDATE event_feed_cursors SET lease_until = now() + make_interval(secs => $3) "
                "WHERE feed = $1 AND lease_token = $2 RETURNING true",
                _feed_key(claim.org_id),
                claim.token,
                LEASE_SECONDS,
            )
            is not None
        )


async def _release(db: Database, claim: Claim) -> None:
    async with db.system() as tx:
        await tx.execute(
            "UPDATE event_feed_cursors SET lease_until = NULL, lease_token = NULL "
            "WHERE feed = $1 AND lease_token = $2",
            _feed_key(claim.org_id),
            claim.token,
        )


@dataclass
class _Item:
    """One (event, automation) whose condition is evaluated."""

    xid: int
    event: Event
    automation: asyncpg.Record | dict[str, Any]  # a dict: a workflow's EVENT_TRIGGER
    holds: bool | None = None  # None: not evaluated (yet)
    failed: bool = False


@dataclass
class _Pass:
    events: list[tuple[int, Event]] = field(default_factory=list)
    end: str = ""


async def _read(
    db: Database, claim: Claim
) -> tuple[_Pass, list[asyncpg.Record], list[dict[str, Any]]]:
    """The org's events from its cursor (about BATCH), its automations and its workflows'
    event triggers."""
    org = [claim.org_id]
    read = _Pass()
    async with db.system() as tx:
        entity_rows, entity_end = await _slice(tx, "entity_events", claim.start, claim.horizon, org)
        run_rows, end = await _slice(tx, "run_events", claim.start, entity_end, org)
        if end != entity_end:  # the run slice was cut shorter: entity events that far too
            entity_rows = [r for r in entity_rows if int(str(r["xid"])) < int(end)]
        automations = (await _automations(tx, org)).get(claim.org_id, [])
        triggers = await workflow_events.triggers(tx, claim.org_id)
        chains = await workflow_events.chains(
            tx, claim.org_id, [r["actor"] for r in entity_rows if r["origin"] == "WORKFLOW"]
        )
    ordered = sorted(
        [(int(str(r["xid"])), 0, r["id"], entity_event(r)) for r in entity_rows]
        + [(int(str(r["xid"])), 1, r["id"], run_event(r)) for r in run_rows],
        key=lambda item: item[:3],
    )
    read.events = [(item[0], item[3]) for item in ordered]
    read.end = end
    for _, event in read.events:
        chain = chains.get(event.data["trigger"]["by"]["userId"])
        if chain is not None:  # written by an event-started workflow run: its chain goes on
            event.workflow, event.depth = chain[0], max(event.depth, chain[1])
    return read, automations, triggers


async def _evaluate(items: list[_Item], org_id: uuid.UUID, concurrency: int) -> None:
    """Conditions in order, `concurrency` at once. New ones stop starting after PASS_SECONDS
    (those of the first transaction always run) or at the first that could not be
    evaluated."""
    if not items:
        return
    deadline = time.monotonic() + PASS_SECONDS
    first = items[0].xid
    queue = iter(items)
    stop = False

    async def work() -> None:
        nonlocal stop
        for item in queue:
            if stop or (item.xid != first and time.monotonic() > deadline):
                stop = True
                return
            try:
                item.holds = await condition_holds(item.automation, item.event.data, org_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "automation %s: its condition could not be evaluated now (%s: %s); "
                    "read again on the org's next turn",
                    item.automation["identifier"],
                    type(exc).__name__,
                    exc,
                )
                item.failed = stop = True
                return

    await asyncio.gather(*(work() for _ in range(max(1, concurrency))))


async def run_pass(db: Database, claim: Claim, concurrency: int = ORG_CONCURRENCY) -> int:
    """One org's turn: its events since its cursor become automation runs and changelog
    deliveries; the cursor moves as far as was evaluated. Returns how many runs it made."""
    read, automations, triggers = await _read(db, claim)
    items = [
        _Item(xid, event, automation)
        for xid, event in read.events
        for automation in [
            *(a for a in automations if _matches(a, event)),
            *(
                t
                for t in triggers
                if workflow_events.matches(t, event.types, event.scope, event.depth, event.workflow)
            ),
        ]
    ]
    lost = False

    async def keep_lease() -> None:
        nonlocal lost
        while True:
            await asyncio.sleep(LEASE_SECONDS / 3)
            if not await _extend(db, claim):
                lost = True
                return

    keeper = asyncio.create_task(keep_lease())
    try:
        await _evaluate(items, claim.org_id, concurrency)
    finally:
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)
    # Where this pass ends: at the first transaction not wholly evaluated, else the slice.
    unfinished = next((item.xid for item in items if item.holds is None), None)
    end = read.end if unfinished is None else str(unfinished)
    if lost or (unfinished is not None and int(end) <= int(claim.start)):
        await _release(db, claim)
        return 0
    made = 0
    async with db.system() as tx:
        still = await tx.fetchval(
            "SELECT true FROM event_feed_cursors WHERE feed = $1 AND lease_token = $2 FOR UPDATE",
            _feed_key(claim.org_id),
            claim.token,
        )
        if not still:
            return 0  # the lease ran out and another pass took the org's turn
        await bind_org(tx, claim.org_id)
        bound = Tx(tx.conn, claim.org_id)
        for item in items:
            if item.xid >= int(end) or not item.holds:
                continue
            if isinstance(item.automation, dict):
                made += (
                    await workflow_events.start_run(
                        bound,
                        item.automation,
                        item.event.data,
                        item.event.key,
                        item.event.depth,
                    )
                    is not None
                )
                continue
            run_id = await create_automation_run(
                bound,
                item.automation,
                item.event.data,
                item.event.entity,
                item.event.key,
                item.event.depth,
            )
            made += run_id is not None
        await changelog.enqueue(tx, [event for xid, event in read.events if xid < int(end)])
        await tx.execute(
            "UPDATE event_feed_cursors SET horizon = $2, updated_at = now(), "
            "lease_until = NULL, lease_token = NULL WHERE feed = $1",
            _feed_key(claim.org_id),
            end,
        )
    return made


async def process_once(
    db: Database, *, concurrency: int = CONCURRENCY, org_concurrency: int = ORG_CONCURRENCY
) -> int:
    """One tick of the feed with every pass it starts awaited; how many automation runs it
    made."""
    claims = await plan(db, concurrency)
    made = await asyncio.gather(*(run_pass(db, c, org_concurrency) for c in claims))
    return sum(made)


class Feed:
    """The feed in a worker process: each tick claims orgs' turns for the free slots and
    runs each as its own task, so a slow org's pass never delays another org's."""

    def __init__(self, db: Database, concurrency: int, org_concurrency: int) -> None:
        self.db = db
        self.concurrency = concurrency
        self.org_concurrency = org_concurrency
        self.running: dict[asyncio.Task[int], Claim] = {}

    async def step(self) -> bool:
        free = self.concurrency - len(self.running)
        busy = {claim.org_id for claim in self.running.values()}
        for claim in await plan(self.db, free, busy):
            task = asyncio.create_task(self._pass(claim), name=f"event-feed-{claim.org_id}")
            self.running[task] = claim
            task.add_done_callback(self._done)
        return False

    async def _pass(self, claim: Claim) -> int:
        try:
            return await run_pass(self.db, claim, self.org_concurrency)
        except asyncio.CancelledError:
            # Stopping: hand the org's turn back at once rather than at the lease's end.
            await _release(self.db, claim)
            raise
        except Exception:
            log.exception("event feed: the pass of org %s failed", claim.org_id)
            await _release(self.db, claim)
            return 0

    def _done(self, task: asyncio.Task[int]) -> None:
        self.running.pop(task, None)

    async def stop(self) -> None:
        tasks = list(self.running)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class FeedLoop(PollingLoop):
    """The feed's polling loop; stopping it stops the passes in flight."""

    def __init__(self, feed: Feed) -> None:
        super().__init__("event feed", feed.step, poll_seconds=POLL_SECONDS, log=log)
        self.feed = feed

    async def stop(self) -> None:
        await super().stop()
        await self.feed.stop()


def event_feed(db: Database, settings: Settings | None = None) -> FeedLoop:
    """The feed's loop in a worker process."""
    concurrency = settings.automation_concurrency if settings else CONCURRENCY
    org_concurrency = settings.automation_org_concurrency if settings else ORG_CONCURRENCY
    return FeedLoop(Feed(db, concurrency, org_concurrency))
