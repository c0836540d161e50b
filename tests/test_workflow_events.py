"""Workflow EVENT_TRIGGER nodes: entity created / updated / deleted (or any change) start
runs through the automations' event feed, once per (trigger, event), when their jq
condition holds; a workflow's own writes never start it again and chains stop; tenants
apart; a slow condition holds up only its own org, with no connection held meanwhile."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.automations.feed import process_once
from app.config import Settings
from app.db.database import Database
from tests.conftest import Org, OrgFactory
from tests.receivers import WebhookReceiver
from tests.test_automations import SERVICE, _entity, _feed, _post
from tests.test_automations import feed_started as feed_started
from tests.test_dispatch import signing_secret
from tests.test_permissions import add_user, user_headers
from tests.test_sandbox import _idle_in_transaction
from tests.test_workflows import link, nodes_of, run_of, wait_done, webhook

SLOW = "[limit(1; range(1e12) | select(. < 0))] == []"


def on_event(
    identifier: str,
    event: str,
    nodes: list[dict[str, Any]],
    connections: list[dict[str, Any]],
    condition: list[str] | None = None,
    **config: Any,
) -> dict[str, Any]:
    trigger: dict[str, Any] = {
        "type": "EVENT_TRIGGER",
        "event": {"type": event, "blueprintIdentifier": "service"},
        **config,
    }
    if condition is not None:
        trigger["condition"] = {"type": "JQ", "expressions": condition, "combinator": "and"}
    return {
        "identifier": identifier,
        "nodes": [{"identifier": "trigger", "config": trigger}, *nodes],
        "connections": connections,
    }


def set_tier(identifier: str, tier: str) -> dict[str, Any]:
    return {
        "identifier": identifier,
        "config": {
            "type": "UPSERT_ENTITY",
            "blueprintIdentifier": "service",
            "mapping": {
                "identifier": "{{ .outputs.trigger.diff.after.identifier }}",
                "properties": {"tier": tier},
            },
        },
    }


async def runs_of(client: httpx.AsyncClient, org: Org, workflow: str) -> list[dict[str, Any]]:
    r = await client.get(
        "/v1/workflows/runs", params={"workflowIdentifier": workflow}, headers=org.headers
    )
    assert r.status_code == 200, r.text
    return list(r.json()["workflowRuns"])


async def triggers(client: httpx.AsyncClient, org: Org, workflow: str) -> list[dict[str, Any]]:
    """Each run's trigger output, oldest first."""
    found = []
    for run in reversed(await runs_of(client, org, workflow)):
        full = await run_of(client, org, run["identifier"])
        found.append(full["nodeRuns"][0]["output"])
    return found


# ---------------------------------------------------------------------------------------
# Definitions


@pytest.mark.parametrize(
    ("config", "pointer", "words"),
    [
        (
            {"event": {"type": "TIMER_EXPIRED", "blueprintIdentifier": "service"}},
            "/event/propertyIdentifier",
            "timer property",
        ),
        (
            {
                "event": {
                    "type": "TIMER_EXPIRED",
                    "blueprintIdentifier": "service",
                    "propertyIdentifier": "tier",
                }
            },
            "/event/propertyIdentifier",
            "timer property",
        ),
        (
            {
                "event": {
                    "type": "ENTITY_CREATED",
                    "blueprintIdentifier": "service",
                    "propertyIdentifier": "expires",
                }
            },
            "/event/propertyIdentifier",
            "for timers",
        ),
        (
            {"event": {"type": "RUN_CREATED", "blueprintIdentifier": "service"}},
            "/event/type",
            "one of",
        ),
        (
            {"event": {"type": "ENTITY_CREATED", "blueprintIdentifier": "nope"}},
            "/event/blueprintIdentifier",
            "does not exist",
        ),
        (
            {"event": {"type": "ENTITY_CREATED", "blueprintIdentifier": "service", "x": 1}},
            "/event/x",
            "unknown field",
        ),
        (
            {"condition": {"type": "JQ", "expressions": [".a =="]}},
            "/condition/expressions/0",
            "not a valid jq",
        ),
        (
            {"condition": {"type": "JQ", "expressions": ['.secrets["t"]']}},
            "/condition/expressions/0",
            "secrets go into",
        ),
        (
            {"condition": {"type": "JQ", "expressions": ["true"], "combinator": "xor"}},
            "/condition/combinator",
            "'and' or 'or'",
        ),
        ({"condition": {"type": "JQ", "expressions": []}}, "/condition/expressions", "non-empty"),
        ({"permissions": {"roles": ["Member"]}}, "/permissions", "unknown field"),
    ],
)
async def test_an_invalid_event_trigger_is_a_422_naming_the_problem(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    config: dict[str, Any],
    pointer: str,
    words: str,
) -> None:
    org = await make_org()
    await _post(client, org, "/v1/blueprints", SERVICE)
    body = on_event("w", "ENTITY_CREATED", [], [])
    body["nodes"][0]["config"].update(config)
    r = await client.post("/v1/workflows", json=body, headers=org.headers)
    assert r.status_code == 422, r.text
    assert r.json()["ok"] is False and r.json()["error"] == "invalid_request"
    assert r.json()["message"]
    details = {d["pointer"]: d["message"] for d in r.json()["details"]}
    assert f"/nodes/0/config{pointer}" in details, details
    assert words in details[f"/nodes/0/config{pointer}"]


async def test_an_event_only_workflow_is_not_run_by_hand(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _post(client, org, "/v1/blueprints", SERVICE)
    await _post(client, org, "/v1/workflows", on_event("w", "ENTITY_CREATED", [], []))
    r = await client.post("/v1/workflows/w/runs", json={"inputs": {}}, headers=org.headers)
    assert r.status_code == 422, r.text
    assert r.json()["ok"] is False and r.json()["error"] == "workflow_not_self_serve"
    assert r.json()["message"]


# ---------------------------------------------------------------------------------------
# Runs from events


async def test_entity_changes_start_a_run_once_each_when_the_condition_holds(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    db: Database,
    start_worker: Callable[..., Settings],
    feed_started: None,
) -> None:
    org = await make_org()
    await _post(client, org, "/v1/blueprints", SERVICE)
    with WebhookReceiver(await signing_secret(client, org)) as receiver:
        body = on_event(
            "tier-changed",
            "ENTITY_UPDATED",
            [
                webhook(
                    "notify",
                    receiver.url,
                    body={
                        "entity": "{{ .outputs.trigger.diff.after.identifier }}",
                        "before": "{{ .outputs.trigger.diff.before.properties.tier }}",
                        "after": "{{ .outputs.trigger.diff.after.properties.tier }}",
                        "action": "{{ .outputs.trigger.action }}",
                        "by": "{{ .workflowRun.trigger.by.userId }}",
                    },
                )
            ],
            [link("trigger", "notify")],
            condition=[".diff.before.properties.tier != .diff.after.properties.tier"],
        )
        await _post(client, org, "/v1/workflows", body)
        await _entity(client, org, "api", tier="1")  # created: not an update
        await _entity(client, org, "api", tier="2")  # matches
        await _entity(client, org, "api", tier="2")  # unchanged: no event
        await _entity(client, org, "api", tier="3")  # matches
        await _post(
            client, org, "/v1/blueprints/service/entities?upsert=true", {"identifier": "web"}
        )
        await _feed(db)
        await _feed(db)  # reading again starts nothing more
        found = await runs_of(client, org, "tier-changed")
        assert len(found) == 2
        assert {r["createdBy"] for r in found} == {"automation"}
        assert {r["trigger"]["identifier"] for r in found} == {"trigger"}
        start_worker()
        for run in found:
            done = await wait_done(client, org, run["identifier"])
            assert done["result"] == "SUCCESS"
    assert sorted((d.body["before"], d.body["after"]) for d in receiver.deliveries) == [
        ("1", "2"),
        ("2", "3"),
    ]
    assert {(d.body["entity"], d.body["action"], d.body["by"]) for d in receiver.deliveries} == {
        ("api", "UPDATE", "automation")
    }


async def test_created_deleted_and_any_change_are_told_apart(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, feed_started: None
) -> None:
    org = await make_org()
    await _post(client, org, "/v1/blueprints", SERVICE)
    for name, event in (
        ("created", "ENTITY_CREATED"),
        ("deleted", "ENTITY_DELETED"),
        ("any", "ANY_ENTITY_CHANGE"),
    ):
        await _post(client, org, "/v1/workflows", on_event(name, event, [], []))
    off = on_event("off", "ANY_ENTITY_CHANGE", [], [], published=False)
    await _post(client, org, "/v1/workflows", off)
    await _entity(client, org, "api", tier="1")
    await _entity(client, org, "api", tier="2")
    r = await client.delete("/v1/blueprints/service/entities/api", headers=org.headers)
    assert r.status_code == 200, r.text
    await _feed(db)
    created = await triggers(client, org, "created")
    assert [(t["action"], t["diff"]["before"]) for t in created] == [("CREATE", None)]
    assert created[0]["diff"]["after"]["properties"]["tier"] == "1"
    assert created[0]["context"] == {"blueprintIdentifier": "service", "entityIdentifier": "api"}
    deleted = await triggers(client, org, "deleted")
    assert [(t["action"], t["diff"]["after"]) for t in deleted] == [("DELETE", None)]
    assert [t["action"] for t in await triggers(client, org, "any")] == [
        "CREATE",
        "UPDATE",
        "DELETE",
    ]
    assert await runs_of(client, org, "off") == []  # not published


async def test_a_workflows_own_writes_never_start_it_again_and_chains_stop(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    db: Database,
    start_worker: Callable[..., Settings],
    feed_started: None,
) -> None:
    org = await make_org()
    await _post(client, org, "/v1/blueprints", SERVICE)
    # Writes the entity it is started by: its own events are not its triggers.
    selfish = on_event(
        "selfish", "ANY_ENTITY_CHANGE", [set_tier("touch", "touched")], [link("trigger", "touch")]
    )
    selfish["nodes"][0]["config"]["event"]["blueprintIdentifier"] = "service"
    selfish["nodes"][0]["config"]["condition"] = {
        "type": "JQ",
        "expressions": ['.diff.after.identifier == "solo"'],
    }
    # Two workflows set each other's condition: a chain, cut at the automations' depth.
    ping = on_event(
        "ping",
        "ENTITY_UPDATED",
        [set_tier("to_b", "b")],
        [link("trigger", "to_b")],
        condition=['.diff.after.properties.tier == "a"'],
    )
    pong = on_event(
        "pong",
        "ENTITY_UPDATED",
        [set_tier("to_a", "a")],
        [link("trigger", "to_a")],
        condition=['.diff.after.properties.tier == "b"'],
    )
    for body in (selfish, ping, pong):
        await _post(client, org, "/v1/workflows", body)
    start_worker()
    await _entity(client, org, "solo", tier="x")
    await _entity(client, org, "chain", tier="start")
    await _entity(client, org, "chain", tier="a")
    deadline = time.monotonic() + 60
    seen: tuple[int, ...] = ()
    while time.monotonic() < deadline:
        await _feed(db)
        found = tuple(
            [len(await runs_of(client, org, name)) for name in ("selfish", "ping", "pong")]
        )
        everything = [
            r for name in ("selfish", "ping", "pong") for r in await runs_of(client, org, name)
        ]
        if found == seen and all(r["status"] == "COMPLETED" for r in everything):
            break
        seen = found
        await asyncio.sleep(0.5)
    assert seen == (1, 3, 2), seen  # selfish once; ping at depth 1, 3, 5; pong at 2, 4
    r = await client.get("/v1/blueprints/service/entities/solo", headers=org.headers)
    assert r.json()["entity"]["properties"]["tier"] == "touched"
    run = (await runs_of(client, org, "selfish"))[0]
    assert nodes_of(await run_of(client, org, run["identifier"]))["touch"]["result"] == "SUCCESS"
    async with db.tenant(org.org_id) as tx:
        actor = await tx.fetchval(
            "SELECT actor FROM entity_events WHERE org_id = $1 AND identifier = 'solo' "
            "AND origin = 'WORKFLOW'",
            org.org_id,
        )
    assert actor == f"workflow-run:{run['identifier']}"


async def test_another_orgs_changes_start_none_of_an_orgs_workflows(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, feed_started: None
) -> None:
    mine, theirs = await make_org(), await make_org()
    for org in (mine, theirs):
        await _post(client, org, "/v1/blueprints", SERVICE)
        await _post(client, org, "/v1/workflows", on_event("w", "ENTITY_CREATED", [], []))
    await _entity(client, theirs, "theirs")
    await _entity(client, mine, "mine")
    await _feed(db)
    for org, name in ((mine, "mine"), (theirs, "theirs")):
        found = await triggers(client, org, "w")
        assert [t["context"]["entityIdentifier"] for t in found] == [name]
        run = (await runs_of(client, org, "w"))[0]
        other = theirs if org is mine else mine
        r = await client.get(f"/v1/workflows/runs/{run['identifier']}", headers=other.headers)
        assert r.status_code == 404 and r.json()["ok"] is False


# ---------------------------------------------------------------------------------------
# Fairness


async def test_a_slow_workflow_condition_holds_up_only_its_own_org(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    start_worker: Callable[..., Settings],
    db: Database,
    feed_started: None,
) -> None:
    """B's event trigger's condition runs to the jq time limit on each of 12 changes: A's
    workflow starts while B's events are still being evaluated."""
    a, b = await make_org(), await make_org()
    for org, condition in ((a, ["true"]), (b, [SLOW])):
        await _post(client, org, "/v1/blueprints", SERVICE)
        body = on_event("watch", "ANY_ENTITY_CHANGE", [], [], condition=condition)
        await _post(client, org, "/v1/workflows", body)
    for i in range(12):
        await _entity(client, b, f"b{i}", tier=str(i))
    await _entity(client, a, "a0", tier="1")
    async with db.system() as tx:
        b_last = int(
            await tx.fetchval(
                "SELECT max(xid)::text FROM entity_events WHERE org_id = $1", b.org_id
            )
        )
    start_worker()
    deadline = time.monotonic() + 20
    while not await runs_of(client, a, "watch"):
        assert time.monotonic() < deadline, "A's workflow did not start"
        await asyncio.sleep(0.1)
    async with db.system() as tx:
        b_cursor = await tx.fetchval(
            "SELECT horizon FROM event_feed_cursors WHERE org_id = $1", b.org_id
        )
    assert int(b_cursor) <= b_last, "B's events were all evaluated before A's"
    assert await runs_of(client, b, "watch") == []  # B's condition never holds
    # B's slow events are left unread by later tests: its org no longer reads events.
    r = await client.delete("/v1/workflows/watch", headers=b.headers)
    assert r.status_code == 200, r.text


async def test_a_workflow_condition_holds_no_connection_while_it_runs(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, feed_started: None
) -> None:
    org = await make_org()
    await _post(client, org, "/v1/blueprints", SERVICE)
    body = on_event("slow", "ENTITY_CREATED", [], [], condition=["def f: f; f"])
    await _post(client, org, "/v1/workflows", body)
    await _entity(client, org, "api")
    async with db.system() as tx:
        event = int(
            await tx.fetchval(
                "SELECT max(xid)::text FROM entity_events WHERE org_id = $1", org.org_id
            )
        )

    async def past_the_event() -> None:
        deadline = time.monotonic() + 20
        while True:
            await process_once(db)
            async with db.system() as tx:
                cursor = await tx.fetchval(
                    "SELECT horizon FROM event_feed_cursors WHERE org_id = $1", org.org_id
                )
            if cursor is not None and int(cursor) > event:
                return
            assert time.monotonic() < deadline, "the org's event was never read"
            await asyncio.sleep(0.05)

    seen, _ = await _idle_in_transaction(db, past_the_event())
    assert seen, "the condition ended before it could be watched"
    assert max(seen) == 0, seen
    assert await runs_of(client, org, "slow") == []  # past its time limit: false
    await client.delete("/v1/workflows/slow", headers=org.headers)


async def test_an_event_started_runs_input_node_is_answered_by_admins_and_named_responders(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    db: Database,
    app: FastAPI,
    feed_started: None,
) -> None:
    org = await make_org()
    await _post(client, org, "/v1/blueprints", SERVICE)
    for email in ("dev@example.com", "lead@example.com"):
        await add_user(db, org.org_id, email, roles=["Member"])
    dev = user_headers(app, org.org_id, "dev@example.com")
    lead = user_headers(app, org.org_id, "lead@example.com")
    gate = {
        "identifier": "approval",
        "config": {
            "type": "INPUT",
            "userInputs": {"buttons": [{"identifier": "ok", "label": "OK"}]},
            "outlets": [{"identifier": "ok"}],
        },
    }
    named = {**gate, "identifier": "named"}
    named["config"] = {**gate["config"], "responders": {"users": ["lead@example.com"]}}
    body = on_event(
        "gated",
        "ENTITY_CREATED",
        [gate, named],
        [link("trigger", "approval"), link("approval", "named", sourceOutletIdentifier="ok")],
    )
    await _post(client, org, "/v1/workflows", body)
    await _entity(client, org, "api")
    await _feed(db)
    [run] = await runs_of(client, org, "gated")
    node = nodes_of(await run_of(client, org, run["identifier"]))["approval"]["identifier"]
    url = f"/v1/workflows/nodes/runs/{node}/responses"
    r = await client.post(url, json={}, headers=dev)  # no starter to stand for: not a member
    assert r.status_code == 403 and r.json()["error"] == "missing_permission", r.text
    r = await client.post(url, json={}, headers=org.headers)  # an Admin
    assert r.status_code == 200, r.text
    second = nodes_of(r.json()["workflowRun"])["named"]["identifier"]
    url = f"/v1/workflows/nodes/runs/{second}/responses"
    r = await client.post(url, json={}, headers=dev)
    assert r.status_code == 403 and r.json()["ok"] is False, r.text
    r = await client.post(url, json={}, headers=lead)
    assert r.status_code == 200, r.text
    assert r.json()["workflowRun"]["result"] == "SUCCESS"


async def test_a_timer_expiry_starts_a_workflow_once_beside_automations(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    """TIMER_EXPIRED triggers fire in the timers' pass, with the automations of the same
    property: once per expiry, when the condition holds, only in their own org."""
    from datetime import UTC, datetime, timedelta

    from app.automations import timers
    from tests.test_automations import automation

    org, other = await make_org(), await make_org()
    timer = {"type": "TIMER_EXPIRED", "propertyIdentifier": "expires"}
    for tenant in (org, other):
        await _post(client, tenant, "/v1/blueprints", SERVICE)
        body = on_event(
            "expiry", "TIMER_EXPIRED", [], [], condition=['.diff.after.identifier != "skip"']
        )
        body["nodes"][0]["config"]["event"] = {**timer, "blueprintIdentifier": "service"}
        r = await client.post("/v1/workflows", json=body, headers=tenant.headers)
        assert r.status_code == 201, r.text
    await _post(
        client,
        org,
        "/v1/actions",
        automation(
            "expired",
            {
                "type": "TIMER_PROPERTY_EXPIRED",
                "blueprintIdentifier": "service",
                "propertyIdentifier": "expires",
            },
        ),
    )
    await timers.fire_expired(db)  # the property's cursor starts now
    soon = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    for name, when in (("soon", soon), ("skip", soon), ("later", later)):
        await _entity(client, org, name, expires=when)
    assert await timers.fire_expired(db) == 0  # not yet
    await asyncio.sleep(1.2)
    # soon: the workflow and the automation; skip: the automation only (the condition).
    assert await timers.fire_expired(db) == 3
    assert await timers.fire_expired(db) == 0
    found = await triggers(client, org, "expiry")
    assert [t["diff"]["after"]["identifier"] for t in found] == ["soon"]
    assert found[0]["action"] == "TIMER_EXPIRED"
    assert found[0]["context"]["propertyIdentifier"] == "expires"
    (run,) = await runs_of(client, org, "expiry")
    assert run["createdBy"] == "automation"
    assert await runs_of(client, other, "expiry") == []
