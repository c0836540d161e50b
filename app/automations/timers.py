"""TIMER_PROPERTY_EXPIRED: a `timer` property's time passing starts its automations (and
workflows whose EVENT_TRIGGER waits for `TIMER_EXPIRED` of the property: their runs start in
the same pass, with the same cursor and key, once per expiry).

Every `timer` property has a range index on `portolan_time(properties, 'p')`
(app/search/indexes.py), so a pass asks that index for the entities whose timer fell in
(checked_until, now] — it never scans a blueprint. `timer_cursors` keeps `checked_until` per
(org, blueprint, property), moved in the transaction that creates the runs; each run also
carries a key made of the automation, the entity and the expiry, so an expiry makes one run
per automation however often a pass is retried. A timer property's first pass starts its
cursor at that moment: timers that passed before then do not fire, nor do timers written
already in the past.

Organizations take turns: each org's properties are fired by their own task (at most
CONCURRENCY orgs at once), and conditions are evaluated with no transaction open (an open
transaction would hold back the event feed's horizon for every org): a pass reads the
cursor and the expiries in one short transaction, evaluates, then creates the runs and
moves the cursor in another, only if no other pass moved it meanwhile. An org whose pass
fails (its conditions get no jq turn) is logged and tried again on the next pass; the
others go on.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import defaultdict
from datetime import datetime
from typing import Any

from app.automations.feed import condition_holds, create_automation_run
from app.db.database import Database, Tx
from app.workflows import events as workflow_events
from app.workflows.definitions import TIMER_EVENT

log = logging.getLogger("portolan.automations")
EVENT = "TIMER_PROPERTY_EXPIRED"
CONCURRENCY = 8


def _key(entity: str, prop: str, expiry: datetime) -> str:
    digest = hashlib.sha256(f"{entity}\n{prop}\n{expiry.isoformat()}".encode()).hexdigest()
    return f"timer:{digest[:40]}"


def _event(
    org_id: Any, blueprint: str, prop: str, entity: dict[str, Any], at: datetime
) -> dict[str, Any]:
    return {
        "action": "TIMER_PROPERTY_EXPIRED",
        "resourceType": "entity",
        "trigger": {
            "by": {"orgId": str(org_id), "userId": "timer"},
            "origin": "TIMER",
            "at": at.isoformat().replace("+00:00", "Z"),
        },
        "context": {
            "blueprintIdentifier": blueprint,
            "entityIdentifier": entity["identifier"],
            "propertyIdentifier": prop,
        },
        "diff": {"before": entity, "after": entity},
    }


async def fire_expired(db: Database, concurrency: int = CONCURRENCY) -> int:
    """One pass over every timer automation; how many runs it made."""
    async with db.system() as tx:
        rows = await tx.fetch(
            "SELECT org_id, identifier, title, icon, trigger, invocation_method, "
            "required_approval FROM actions WHERE publish AND trigger->>'type' = 'automation' "
            "AND trigger->'event'->>'type' = $1",
            EVENT,
        )
        # Workflows' TIMER_EXPIRED triggers share the timers' cursors: one pass fires both.
        flows = await workflow_events.timer_triggers(tx)
    groups: dict[Any, dict[tuple[str, str], list[Any]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        event = row["trigger"]["event"]
        groups[row["org_id"]][(event["blueprintIdentifier"], event["propertyIdentifier"])].append(
            row
        )
    for org_id, flow in flows:
        event = flow["trigger"]["event"]
        groups[org_id][(event["blueprintIdentifier"], event["propertyIdentifier"])].append(flow)
    slots = asyncio.Semaphore(max(1, concurrency))

    async def org_turn(org_id: Any, properties: dict[tuple[str, str], list[Any]]) -> int:
        made = 0
        async with slots:
            for (blueprint, prop), automations in properties.items():
                try:
                    made += await _fire_property(db, org_id, blueprint, prop, automations)
                except Exception:
                    log.exception(
                        "timer automations of %s/%s.%s failed; tried again on the next pass",
                        org_id,
                        blueprint,
                        prop,
                    )
        return made

    return sum(await asyncio.gather(*(org_turn(o, p) for o, p in groups.items())))


async def _fire_property(
    db: Database, org_id: Any, blueprint: str, prop: str, automations: list[Any]
) -> int:
    async with db.system(org_id) as raw:
        tx = Tx(raw.conn, org_id)
        cursor = await tx.fetchrow(
            "SELECT checked_until, now() AS now FROM timer_cursors "
            "WHERE org_id = $1 AND blueprint = $2 AND property = $3",
            org_id,
            blueprint,
            prop,
        )
        if cursor is None:
            await tx.execute(
                "INSERT INTO timer_cursors (org_id, blueprint, property, checked_until) "
                "VALUES ($1, $2, $3, now()) ON CONFLICT DO NOTHING",
                org_id,
                blueprint,
                prop,
            )
            return 0
        # The same expression as the range index's, and its predicate: the index answers it.
        expired = await tx.fetch(
            "SELECT identifier, title, icon, team, properties, "
            "portolan_time(properties, $3) AS expiry FROM entities "
            "WHERE org_id = $1 AND blueprint = $2 AND portolan_time(properties, $3) IS NOT NULL "
            "AND portolan_time(properties, $3) > $4 AND portolan_time(properties, $3) <= $5 "
            "ORDER BY portolan_time(properties, $3), identifier",
            org_id,
            blueprint,
            prop,
            cursor["checked_until"],
            cursor["now"],
        )
    # Conditions with no transaction open.
    chosen: list[tuple[Any, dict[str, Any], dict[str, Any], str]] = []
    for row in expired:
        entity = {
            "identifier": row["identifier"],
            "blueprint": blueprint,
            "title": row["title"],
            "icon": row["icon"],
            "team": row["team"],
            "properties": row["properties"],
        }
        data = _event(org_id, blueprint, prop, entity, row["expiry"])
        for automation in automations:
            # A workflow's trigger output names its event type as its trigger does.
            seen = {**data, "action": TIMER_EVENT} if _is_workflow(automation) else data
            if await condition_holds(automation, seen, org_id):
                chosen.append(
                    (automation, seen, entity, _key(row["identifier"], prop, row["expiry"]))
                )
    made = 0
    async with db.system(org_id) as raw:
        tx = Tx(raw.conn, org_id)
        now = await tx.fetchval(
            "SELECT checked_until FROM timer_cursors "
            "WHERE org_id = $1 AND blueprint = $2 AND property = $3 FOR UPDATE",
            org_id,
            blueprint,
            prop,
        )
        if now != cursor["checked_until"]:
            return 0  # another pass fired these meanwhile
        for automation, data, entity, key in chosen:
            if _is_workflow(automation):
                started = await workflow_events.start_run(tx, automation, data, key, depth=0)
            else:
                started = await create_automation_run(tx, automation, data, entity, key, depth=0)
            made += started is not None
        await tx.execute(
            "UPDATE timer_cursors SET checked_until = $4 "
            "WHERE org_id = $1 AND blueprint = $2 AND property = $3",
            org_id,
            blueprint,
            prop,
            cursor["now"],
        )
    return made


def _is_workflow(trigger: Any) -> bool:
    """A workflow's EVENT_TRIGGER (a dict from app/workflows/events.py), not an automation."""
    return isinstance(trigger, dict) and "workflow" in trigger
