"""Workflows started by events: EVENT_TRIGGER nodes, fed by the automations' event feed.

The feed (app/automations/feed.py) reads each org's committed entity events in its turn and
hands them here as it hands them to automations: `triggers` are the org's published event
triggers (each shaped like an automation's trigger, so the feed matches them by event type
and blueprint and evaluates their jq `condition` in the sandbox, between its transactions,
with the org's share of conditions), and `start_run` makes the run in the feed's
transaction that moves the org's cursor, once per (trigger, event): the run's idempotency
key is made of the workflow, the trigger node and the event.

A run started by an event has no person behind it: its starter is `automation` (Port's
"organization's automation identity"), its UPSERT_ENTITY nodes write with the org's
authority as `workflow-run:<run id>`. That name is how the feed knows what a workflow
wrote: an event a workflow's run caused never starts that same workflow again, and it
carries the run's depth, so a chain of runs and automations triggering each other stops
after MAX_CHAIN (as automations' chains do).
"""

from __future__ import annotations

import uuid
from typing import Any

from app.db.database import Tx
from app.workflows import definitions, runs

MAX_CHAIN = 5  # as automations' chains
AUTOMATION = "automation"  # the starter of runs started by events
RUN_ACTOR = "workflow-run:"  # what an event-started run's entity writes are made by
_EVENT_TRIGGER = [{"config": {"type": "EVENT_TRIGGER"}}]  # what `nodes` contains (jsonb @>)
# The orgs whose events a workflow may start from (the feed reads only interested orgs).
INTERESTED = (
    'SELECT org_id FROM workflows WHERE nodes @> \'[{"config": {"type": "EVENT_TRIGGER"}}]\''
)


def writer_actor(run_id: str) -> str:
    return RUN_ACTOR + run_id


async def triggers(tx: Tx, org_id: uuid.UUID) -> list[dict[str, Any]]:
    """The org's published EVENT_TRIGGER nodes of its workflows' current versions, each
    `{identifier, trigger: {event, condition}, workflow, version_id, definition, node}` (the
    first two as an automation's, for the feed's matching and condition)."""
    rows = await tx.fetch(
        "SELECT w.identifier, w.version_id, v.definition FROM workflows w "
        "JOIN workflow_versions v ON v.org_id = w.org_id AND v.id = w.version_id "
        "WHERE w.org_id = $1 AND w.nodes @> $2 ORDER BY w.identifier",
        org_id,
        _EVENT_TRIGGER,
    )
    found: list[dict[str, Any]] = []
    for row in rows:
        definition: dict[str, Any] = row["definition"]
        for node in definition.get("nodes") or []:
            config = node.get("config") or {}
            if config.get("type") == "EVENT_TRIGGER" and config.get("published") is not False:
                found.append(trigger_of(row["identifier"], row["version_id"], definition, node))
    return found


async def timer_triggers(tx: Tx) -> list[tuple[uuid.UUID, dict[str, Any]]]:
    """Every org's published TIMER_EXPIRED triggers of its workflows' current versions, with
    their org (the timer pass runs for all orgs; app/automations/timers.py)."""
    rows = await tx.fetch(
        "SELECT w.org_id, w.identifier, w.version_id, v.definition FROM workflows w "
        "JOIN workflow_versions v ON v.org_id = w.org_id AND v.id = w.version_id "
        "WHERE w.nodes @> $1 ORDER BY w.org_id, w.identifier",
        [{"config": {"type": "EVENT_TRIGGER", "event": {"type": definitions.TIMER_EVENT}}}],
    )
    found: list[tuple[uuid.UUID, dict[str, Any]]] = []
    for row in rows:
        definition: dict[str, Any] = row["definition"]
        for node in definition.get("nodes") or []:
            config = node.get("config") or {}
            event = config.get("event") or {}
            if (
                config.get("type") == "EVENT_TRIGGER"
                and event.get("type") == definitions.TIMER_EVENT
                and config.get("published") is not False
            ):
                trigger = trigger_of(row["identifier"], row["version_id"], definition, node)
                found.append((row["org_id"], trigger))
    return found


def trigger_of(
    workflow: str, version_id: str, definition: dict[str, Any], node: dict[str, Any]
) -> dict[str, Any]:
    """An EVENT_TRIGGER node as the feed handles it."""
    config = node["config"]
    return {
        "identifier": f"{workflow}/{node['identifier']}",
        "trigger": {"event": config.get("event") or {}, "condition": config.get("condition")},
        "workflow": workflow,
        "version_id": version_id,
        "definition": definition,
        "node": node,
    }


async def chains(tx: Tx, org_id: uuid.UUID, actors: list[str]) -> dict[str, tuple[str, int]]:
    """For the writers of events that are event-started workflow runs: the run's workflow
    and its depth in a chain of triggered runs."""
    ids = sorted({a.removeprefix(RUN_ACTOR) for a in actors if a.startswith(RUN_ACTOR)})
    if not ids:
        return {}
    rows = await tx.fetch(
        "SELECT id, workflow, coalesce((context->>'depth')::int, 0) AS depth "
        "FROM workflow_runs WHERE org_id = $1 AND id = ANY($2::text[])",
        org_id,
        ids,
    )
    return {writer_actor(r["id"]): (r["workflow"], int(r["depth"])) for r in rows}


def matches(
    trigger: dict[str, Any],
    types: tuple[str, ...],
    blueprint: str,
    depth: int,
    cause: str | None,
) -> bool:
    """Does an entity event (its types, blueprint, chain depth and the workflow whose run
    wrote it, if any) start the trigger? Its condition is the feed's to evaluate."""
    event = trigger["trigger"]["event"]
    return (
        event.get("type") in types
        and event.get("blueprintIdentifier") == blueprint
        and cause != trigger["workflow"]
        and depth < MAX_CHAIN
    )


async def start_run(
    tx: Tx, trigger: dict[str, Any], data: dict[str, Any], key: str, depth: int
) -> str | None:
    """The run the event `data` (its feed key `key`) starts from the trigger, with the event
    as the trigger's output (`.outputs.trigger.diff.after`, `.action`...); None when the
    event already started one."""
    by = {"orgId": str(tx.org_id), "userId": AUTOMATION, "email": None}
    context = data.get("context") or {}
    return await runs.insert_run(
        tx,
        workflow=trigger["workflow"],
        version_id=trigger["version_id"],
        definition=trigger["definition"],
        trigger=trigger["node"],
        output=data,
        actor=AUTOMATION,
        context={"by": by, "source": "EVENT", "depth": depth + 1},
        idempotency_key=f"{trigger['identifier']}/{key}",
        request_hash=None,
        started=(
            f"Started by {data.get('action')} of entity {context.get('entityIdentifier')!r} "
            f"of blueprint {context.get('blueprintIdentifier')!r}"
        ),
    )


def started_by_event(run_context: dict[str, Any]) -> bool:
    return run_context.get("source") == "EVENT"
