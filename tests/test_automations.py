"""Automations: entity and run events (and timers) create runs through the event feed, once
per (automation, event), never for a rolled-back change, and per tenant."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from app.automations import feed, timers
from app.automations.feed import process_once
from app.catalog import entities
from app.config import Settings
from app.db.database import Database
from app.search import indexes
from tests.conftest import Org, OrgFactory
from tests.receivers import WebhookReceiver
from tests.test_dispatch import signing_secret, wait_run
from tests.test_dispatch_faults import worker_process  # noqa: F401 - a fixture

SERVICE = {
    "identifier": "service",
    "title": "Service",
    "schema": {
        "properties": {
            "tier": {"type": "string"},
            "expires": {"type": "string", "format": "timer"},
        }
    },
}


def automation(
    identifier: str,
    event: dict[str, Any],
    url: str = "http://127.0.0.1:9/none",
    condition: list[str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    trigger: dict[str, Any] = {"type": "automation", "event": event}
    if condition is not None:
        trigger["condition"] = {"type": "JQ", "expressions": condition, "combinator": "and"}
    return {
        "identifier": identifier,
        "trigger": trigger,
        "invocationMethod": {
            "type": "WEBHOOK",
            "url": url,
            "body": {
                "run": "{{ .run.id }}",
                "entity": "{{ .event.context.entityIdentifier }}",
                "before": "{{ .event.diff.before.properties.tier }}",
                "after": "{{ .event.diff.after.properties.tier }}",
            },
        },
        **extra,
    }


async def _post(client: httpx.AsyncClient, org: Org, path: str, body: Any) -> Any:
    r = await client.post(path, json=body, headers=org.headers)
    assert r.status_code in (200, 201), r.text
    return r.json()


async def _entity(client: httpx.AsyncClient, org: Org, ident: str, **props: Any) -> None:
    await _post(
        client,
        org,
        "/v1/blueprints/service/entities?upsert=true&merge=true",
        {"identifier": ident, "properties": props},
    )


async def _runs(client: httpx.AsyncClient, org: Org, action: str) -> list[dict[str, Any]]:
    r = await client.get(f"/v1/actions/runs?action={action}", headers=org.headers)
    return list(r.json()["runs"])


async def _feed(db: Database) -> int:
    """Passes until the feed has read every transaction that ended before this call (its
    horizon waits for any transaction still open on the server, so it may take a moment)."""
    async with db.system() as tx:
        goal = int(await tx.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())::text"))
    made = 0
    deadline = time.monotonic() + 30
    while True:
        made += await process_once(db)
        async with db.system() as tx:
            # The floor and every org's cursor.
            horizon = await tx.fetchval(
                "SELECT min(horizon::xid8)::text FROM event_feed_cursors "
                "WHERE feed = 'automations' OR feed LIKE 'automations/%'"
            )
        if horizon is not None and int(horizon) >= goal:
            return made
        assert time.monotonic() < deadline, f"the feed's horizon stayed below {goal}"
        await asyncio.sleep(0.05)


@pytest.fixture
async def feed_started(db: Database) -> None:
    await process_once(db)  # the cursor exists from here on


async def test_entity_updated_fires_once_per_matching_change(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, feed_started: None
) -> None:
    org = await make_org()
    await _post(client, org, "/v1/blueprints", SERVICE)
    await _post(
        client,
        org,
        "/v1/actions",
        automation(
            "tier-changed",
            {"type": "ENTITY_UPDATED", "blueprintIdentifier": "service"},
            condition=[".diff.before.properties.tier != .diff.after.properties.tier"],
        ),
    )
    await _entity(client, org, "api", tier="1")  # created: not an update
    await _entity(client, org, "api", tier="2")  # matches
    await _entity(client, org, "api", tier="2")  # unchanged: no event at all
    await _entity(client, org, "api", tier="3")  # matches
    await _post(client, org, "/v1/blueprints/service/entities?upsert=true", {"identifier": "web"})
    await _feed(db)
    await _feed(db)  # reading again makes nothing more
    found = await _runs(client, org, "tier-changed")
    assert len(found) == 2
    assert {r["source"] for r in found} == {"AUTOMATION"}
    assert {r["entity"]["identifier"] for r in found} == {"api"}


async def test_a_rolled_back_change_fires_nothing(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, feed_started: None
) -> None:
    org = await make_org()
    await _post(client, org, "/v1/blueprints", SERVICE)
    await _post(
        client,
        org,
        "/v1/actions",
        automation("on-create", {"type": "ENTITY_CREATED", "blueprintIdentifier": "service"}),
    )
    writer = entities.Writer(actor="test", origin="API", datasource=None)

    class Abort(Exception):
        pass

    with pytest.raises(Abort):
        async with db.tenant(org.org_id) as tx:
            outcome = await entities.write(
                tx, "service", [{"identifier": "ghost"}], entities.WriteFlags(), writer
            )
            assert outcome[0].error is None
            # The event row exists inside the transaction...
            assert await tx.fetchval(
                "SELECT count(*) FROM entity_events WHERE org_id = $1", org.org_id
            )
            for _ in range(3):  # ...while the feed reads: it is not committed yet
                await process_once(db)
            raise Abort
    await _entity(client, org, "real")
    await _feed(db)
    found = await _runs(client, org, "on-create")
    assert [r["entity"]["identifier"] for r in found] == ["real"]


async def test_an_orgs_open_transaction_holds_back_only_its_own_automations(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, feed_started: None
) -> None:
    """B's write transaction stays open: A's automation fires meanwhile (one horizon for all
    made every org wait for it); B's changes after it wait, and fire once it commits."""
    a, b = await make_org(), await make_org()
    on_create = automation(
        "on-create", {"type": "ENTITY_CREATED", "blueprintIdentifier": "service"}
    )
    for org in (a, b):
        await _post(client, org, "/v1/blueprints", SERVICE)
        await _post(client, org, "/v1/actions", on_create)
    await process_once(db)  # both orgs have their cursors
    writer = entities.Writer(actor="test", origin="API", datasource=None)
    tx, conn = await db.begin_tenant(b.org_id)
    committed = False
    try:
        outcome = await entities.write(
            tx, "service", [{"identifier": "slow"}], entities.WriteFlags(), writer
        )
        assert outcome[0].error is None
        await _entity(client, a, "quick")
        await _entity(client, b, "meanwhile")  # committed, but after B's open transaction began
        deadline = time.monotonic() + 10
        while not await _runs(client, a, "on-create"):
            assert time.monotonic() < deadline, "A's automation waited for B's open transaction"
            await process_once(db)
            await asyncio.sleep(0.05)
        for _ in range(3):
            await process_once(db)
        assert await _runs(client, b, "on-create") == []  # behind B's own open transaction
        await db.finish(conn, commit=True)
        committed = True
    finally:
        if not committed:
            await db.finish(conn, commit=False)
    await _feed(db)
    fired = sorted(r["entity"]["identifier"] for r in await _runs(client, b, "on-create"))
    assert fired == ["meanwhile", "slow"]
    assert [r["entity"]["identifier"] for r in await _runs(client, a, "on-create")] == ["quick"]


async def test_an_unnamed_open_transaction_still_holds_back_every_org(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, feed_started: None
) -> None:
    """A running transaction that names no org (operator work) may write any org's events:
    no org reads past it."""
    a = await make_org()
    await _post(client, a, "/v1/blueprints", SERVICE)
    on_create = automation(
        "on-create", {"type": "ENTITY_CREATED", "blueprintIdentifier": "service"}
    )
    await _post(client, a, "/v1/actions", on_create)
    await process_once(db)
    async with db.system() as tx:
        await tx.fetchval("SELECT pg_current_xact_id()")  # holds a transaction id
        await _entity(client, a, "later")
        for _ in range(5):
            await process_once(db)
            await asyncio.sleep(0.05)
        assert await _runs(client, a, "on-create") == []
    await _feed(db)
    assert [r["entity"]["identifier"] for r in await _runs(client, a, "on-create")] == ["later"]


async def test_create_delete_and_any_change(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, feed_started: None
) -> None:
    org = await make_org()
    await _post(client, org, "/v1/blueprints", SERVICE)
    for ident, kind in (
        ("c", "ENTITY_CREATED"),
        ("d", "ENTITY_DELETED"),
        ("a", "ANY_ENTITY_CHANGE"),
    ):
        await _post(
            client,
            org,
            "/v1/actions",
            automation(ident, {"type": kind, "blueprintIdentifier": "service"}),
        )
    await _post(
        client,
        org,
        "/v1/actions",
        automation(
            "off", {"type": "ANY_ENTITY_CHANGE", "blueprintIdentifier": "service"}, publish=False
        ),
    )
    await _entity(client, org, "x", tier="1")
    await _entity(client, org, "x", tier="2")
    r = await client.delete("/v1/blueprints/service/entities/x", headers=org.headers)
    assert r.status_code == 200
    await _feed(db)
    assert len(await _runs(client, org, "c")) == 1
    assert len(await _runs(client, org, "d")) == 1
    assert len(await _runs(client, org, "a")) == 3
    assert await _runs(client, org, "off") == []


async def test_run_events_fire_and_never_loop(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, feed_started: None
) -> None:
    org = await make_org()
    await _post(client, org, "/v1/blueprints", SERVICE)
    deploy = {
        "identifier": "deploy",
        "trigger": {
            "type": "self-service",
            "operation": "CREATE",
            "userInputs": {"properties": {}},
        },
        "invocationMethod": {"type": "WEBHOOK", "url": "http://127.0.0.1:9/deploy"},
    }
    await _post(client, org, "/v1/actions", deploy)
    await _post(
        client,
        org,
        "/v1/actions",
        automation(
            "on-deploy-failed",
            {"type": "RUN_UPDATED", "actionIdentifier": "deploy"},
            condition=['.diff.after.status == "FAILURE"'],
        ),
    )
    # Watches every run of itself: must not feed on its own runs.
    await _post(
        client,
        org,
        "/v1/actions",
        automation("self", {"type": "ANY_RUN_CHANGE", "actionIdentifier": "self"}),
    )
    await _post(
        client,
        org,
        "/v1/actions",
        automation("on-deploy", {"type": "RUN_CREATED", "actionIdentifier": "deploy"}),
    )
    r = await client.post("/v1/actions/deploy/runs", json={"properties": {}}, headers=org.headers)
    run_id = r.json()["run"]["id"]
    await client.patch(
        f"/v1/actions/runs/{run_id}", json={"statusLabel": "going"}, headers=org.headers
    )
    await client.patch(
        f"/v1/actions/runs/{run_id}", json={"status": "FAILURE"}, headers=org.headers
    )
    await _feed(db)
    assert len(await _runs(client, org, "on-deploy")) == 1
    failed = await _runs(client, org, "on-deploy-failed")
    assert len(failed) == 1
    assert await _runs(client, org, "self") == []


async def test_automations_stay_in_their_org(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, feed_started: None
) -> None:
    one, two = await make_org(), await make_org()
    for org in (one, two):
        await _post(client, org, "/v1/blueprints", SERVICE)
        await _post(
            client,
            org,
            "/v1/actions",
            automation("watch", {"type": "ANY_ENTITY_CHANGE", "blueprintIdentifier": "service"}),
        )
    await _entity(client, one, "only-in-one")
    await _feed(db)
    assert len(await _runs(client, one, "watch")) == 1
    assert await _runs(client, two, "watch") == []


async def test_delivered_to_the_receiver_with_the_event(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    start_worker: Callable[..., Settings],
    db: Database,
    feed_started: None,
) -> None:
    org = await make_org()
    await _post(client, org, "/v1/blueprints", SERVICE)
    with WebhookReceiver(await signing_secret(client, org)) as receiver:
        await _post(
            client,
            org,
            "/v1/actions",
            automation(
                "notify", {"type": "ENTITY_UPDATED", "blueprintIdentifier": "service"}, receiver.url
            ),
        )
        await _entity(client, org, "api", tier="1")
        start_worker()
        await _entity(client, org, "api", tier="2")
        deliveries = await receiver.wait_for(1, timeout=20)
        body = deliveries[0].body
        assert body["entity"] == "api" and body["before"] == "1" and body["after"] == "2"
        run = await wait_run(client, org, body["run"], lambda r: r["pendingExecution"] is False)
        assert run["source"] == "AUTOMATION"


async def test_timer_expiry_fires_once_through_its_index(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, settings: Settings
) -> None:
    org = await make_org()
    await _post(client, org, "/v1/blueprints", SERVICE)
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
    await _entity(client, org, "soon", expires=soon)
    await _entity(client, org, "later", expires=later)
    assert await timers.fire_expired(db) == 0  # not yet
    await asyncio.sleep(1.2)
    assert await timers.fire_expired(db) >= 1
    assert await timers.fire_expired(db) == 0
    found = await _runs(client, org, "expired")
    assert [r["entity"]["identifier"] for r in found] == ["soon"]
    # The timer property has its range index, and the expiry query can use it.
    assert settings.database_url is not None
    await indexes.reconcile(settings.database_url, min_entities=10**9, orgs=[org.org_id])
    async with db.system(org.org_id) as tx:
        await tx.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(
            r[0]
            for r in await tx.fetch(
                "EXPLAIN SELECT identifier FROM entities WHERE org_id = $1 AND blueprint = "
                "'service' AND portolan_time(properties, 'expires') IS NOT NULL AND "
                "portolan_time(properties, 'expires') > now() - interval '1 minute' "
                "AND portolan_time(properties, 'expires') <= now()",
                org.org_id,
            )
        )
    assert "ixr_" in plan, plan


async def test_fires_once_per_change_when_the_worker_is_killed(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    worker_process: Callable[..., subprocess.Popen[bytes]],  # noqa: F811
    db: Database,
    feed_started: None,
) -> None:
    org = await make_org()
    await _post(client, org, "/v1/blueprints", SERVICE)
    queue = f"portolan-test:auto-kill-{time.monotonic_ns()}"
    with WebhookReceiver(await signing_secret(client, org), delay=0.3) as receiver:
        await _post(
            client,
            org,
            "/v1/actions",
            automation(
                "every-update",
                {"type": "ENTITY_UPDATED", "blueprintIdentifier": "service"},
                receiver.url,
            ),
        )
        await _entity(client, org, "svc", tier="0")
        first = worker_process(PORTOLAN_QUEUE_NAME=queue)
        for i in range(1, 31):
            await _entity(client, org, "svc", tier=str(i))
            if i == 15:
                await receiver.wait_requests(3, timeout=30)
                first.send_signal(signal.SIGKILL)
                first.wait(10)
                worker_process(PORTOLAN_QUEUE_NAME=queue)
        await receiver.wait_unique(30, timeout=90)
        runs = await _runs(client, org, "every-update")
        assert len(runs) == 30  # one run per change, none twice
        assert {d.body["after"] for d in receiver.deliveries} == {str(i) for i in range(1, 31)}


async def test_a_slow_condition_holds_up_only_its_own_org(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    start_worker: Callable[..., Settings],
    db: Database,
    feed_started: None,
) -> None:
    """B's condition runs until the jq time limit on each of 12 changes; A's automation
    fires while B's events are still being evaluated (one global loop made A wait for
    all of B's: 12 x 2 s)."""
    a, b = await make_org(), await make_org()
    for org, condition in ((a, ["true"]), (b, ["[limit(1; range(1e12) | select(. < 0))] == []"])):
        await _post(client, org, "/v1/blueprints", SERVICE)
        await _post(
            client,
            org,
            "/v1/actions",
            automation(
                "watch",
                {"type": "ANY_ENTITY_CHANGE", "blueprintIdentifier": "service"},
                condition=condition,
            ),
        )
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
    while not await _runs(client, a, "watch"):
        assert time.monotonic() < deadline, "A's automation did not fire"
        await asyncio.sleep(0.1)
    async with db.system() as tx:
        b_cursor = await tx.fetchval(
            "SELECT horizon FROM event_feed_cursors WHERE org_id = $1", b.org_id
        )
    assert int(b_cursor) <= b_last, "B's events were all evaluated before A's"
    assert await _runs(client, b, "watch") == []  # B's condition never holds


async def test_a_slow_timer_condition_holds_up_only_its_own_org(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    """B's timer automation's condition runs until the jq time limit on each of 4 expiries;
    A's timer fires while B's are still being evaluated, and no transaction is held open
    meanwhile (it would hold back every org's event feed)."""
    b, a = await make_org(), await make_org()  # B's automation first: read first
    for org, condition in ((b, ["[limit(1; range(1e12) | select(. < 0))] == []"]), (a, None)):
        await _post(client, org, "/v1/blueprints", SERVICE)
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
                condition=condition,
            ),
        )
    await timers.fire_expired(db)  # the cursors start now
    soon = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    for i in range(4):
        await _entity(client, b, f"b{i}", expires=soon)
    await _entity(client, a, "a0", expires=soon)
    await asyncio.sleep(1.2)

    async def b_cursor() -> Any:
        async with db.system() as tx:
            return await tx.fetchval(
                "SELECT checked_until FROM timer_cursors WHERE org_id = $1", b.org_id
            )

    before = await b_cursor()
    firing = asyncio.create_task(timers.fire_expired(db))
    try:
        deadline = time.monotonic() + 20
        while not await _runs(client, a, "expired"):
            assert time.monotonic() < deadline, "A's timer did not fire"
            await asyncio.sleep(0.1)
        assert await b_cursor() == before, "B's timers were all evaluated before A's"
        async with db.system() as tx:
            held = await tx.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state = 'idle in transaction'"
            )
        assert held == 0
    finally:
        await firing
    assert await b_cursor() != before
    assert await _runs(client, b, "expired") == []


async def test_a_slow_condition_does_not_hold_up_another_orgs_changelog(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    start_worker: Callable[..., Settings],
    db: Database,
    feed_started: None,
) -> None:
    a, b = await make_org(), await make_org()
    await _post(client, b, "/v1/blueprints", SERVICE)
    await _post(
        client,
        b,
        "/v1/actions",
        automation(
            "watch",
            {"type": "ANY_ENTITY_CHANGE", "blueprintIdentifier": "service"},
            condition=["[limit(1; range(1e12) | select(. < 0))] == []"],
        ),
    )
    with WebhookReceiver(await signing_secret(client, a)) as receiver:
        await _post(
            client,
            a,
            "/v1/blueprints",
            {**SERVICE, "changelogDestination": {"type": "WEBHOOK", "url": receiver.url}},
        )
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
        (delivery,) = await receiver.wait_for(1, timeout=20)
        assert delivery.body["context"]["entityIdentifier"] == "a0"
        async with db.system() as tx:
            b_cursor = await tx.fetchval(
                "SELECT horizon FROM event_feed_cursors WHERE org_id = $1", b.org_id
            )
        assert int(b_cursor) <= b_last, "B's events were all evaluated before A's change"


async def test_an_orgs_turn_is_held_by_one_pass_at_a_time(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, feed_started: None
) -> None:
    """Each org's cursor is claimed with a lease: while another pass holds B's turn, passes
    go on with A's events; a pass whose lease was lost commits nothing; once B's turn is
    free, its events are read."""
    a, b = await make_org(), await make_org()
    for org in (a, b):
        await _post(client, org, "/v1/blueprints", SERVICE)
        await _post(
            client,
            org,
            "/v1/actions",
            automation("watch", {"type": "ANY_ENTITY_CHANGE", "blueprintIdentifier": "service"}),
        )
    await _feed(db)  # both orgs have their cursor
    async with db.system() as tx:
        await tx.execute(
            "UPDATE event_feed_cursors SET lease_until = now() + interval '1 minute', "
            "lease_token = gen_random_uuid() WHERE org_id = $1",
            b.org_id,
        )
        b_start = await tx.fetchval(
            "SELECT horizon FROM event_feed_cursors WHERE org_id = $1", b.org_id
        )
    await _entity(client, b, "b0")
    await _entity(client, a, "a0")
    deadline = time.monotonic() + 10
    while not await _runs(client, a, "watch"):
        assert time.monotonic() < deadline, "A's event waited for B's turn"
        await process_once(db)
        await asyncio.sleep(0.05)
    assert await _runs(client, b, "watch") == []
    # A pass that does not hold B's lease (it ran out and was taken) commits nothing.
    async with db.system() as tx:
        horizon = await tx.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
    stale = feed.Claim(b.org_id, str(b_start), str(horizon), uuid.uuid4())
    assert await feed.run_pass(db, stale) == 0
    assert await _runs(client, b, "watch") == []
    async with db.system() as tx:
        await tx.execute(
            "UPDATE event_feed_cursors SET lease_until = NULL, lease_token = NULL "
            "WHERE org_id = $1",
            b.org_id,
        )
    await _feed(db)
    assert [r["entity"]["identifier"] for r in await _runs(client, b, "watch")] == ["b0"]
