"""Data migrations (`/v1/migrations`): each kind end to end with a real worker (a property's
type changed through a new property, entities moved to another blueprint, a blueprint split
by filters, itemsToParse), the dry run's report, cancellation (pending, between batches and
mid-batch), per-entity failures, the starter's permissions, a worker that died mid-batch,
the audit trail, every route across tenants, every 4xx, and the new jq site's sandbox
escapes and per-org fairness."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.catalog import data_migrations
from app.config import Settings
from app.db.database import Database
from app.kit import sandbox
from app.worker import InProcessWorker
from tests.conftest import Org, OrgFactory, dispatch_settings
from tests.test_permissions import add_user, user_headers
from tests.test_sandbox import (  # noqa: F401
    CANARY,
    LOOP_JQ,
    _via_migration,
    canary_env,
)

ENDED = ("COMPLETED", "FAILURE", "CANCELLED")
SERVICE = {
    "identifier": "service",
    "title": "Service",
    "schema": {
        "properties": {
            "port": {"type": "string"},
            "port_number": {"type": "number"},
            "kind": {"type": "string"},
        }
    },
    "relations": {},
}
LEGACY = {
    "identifier": "legacy",
    "title": "Legacy",
    "schema": {"properties": {"language": {"type": "string"}, "kind": {"type": "string"}}},
    "relations": {},
}
APP = {
    "identifier": "app",
    "title": "App",
    "schema": {"properties": {"language": {"type": "string"}}},
    "relations": {},
}
LIBRARY = {
    "identifier": "library",
    "title": "Library",
    "schema": {"properties": {"language": {"type": "string"}}},
    "relations": {"used_by": {"target": "app", "many": True, "required": False}},
}
TYPE_CHANGE = {
    "sourceBlueprint": "service",
    "mapping": {"entity": {"properties": {"port_number": ".properties.port | tonumber"}}},
}


async def call(
    client: httpx.AsyncClient, org: Org, method: str, path: str, status: int = 200, **kw: Any
) -> Any:
    r = await client.request(method, path, headers=org.headers, **kw)
    assert r.status_code == status, r.text
    return r.json()


async def blueprint(client: httpx.AsyncClient, org: Org, body: dict[str, Any]) -> None:
    await call(client, org, "POST", "/v1/blueprints", 201, json=body)


async def entities(
    client: httpx.AsyncClient, org: Org, bp: str, items: list[dict[str, Any]]
) -> None:
    for start in range(0, len(items), 1000):
        r = await client.post(
            f"/v1/blueprints/{bp}/entities/bulk?upsert=true",
            json={"entities": items[start : start + 1000]},
            headers=org.headers,
        )
        assert r.status_code in (200, 201), r.text
        assert not r.json().get("errors"), r.text


async def start(client: httpx.AsyncClient, org: Org, body: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = (await call(client, org, "POST", "/v1/migrations", 201, json=body))[
        "migration"
    ]
    return found


async def ended(
    client: httpx.AsyncClient, org: Org, migration_id: str, within: float = 30.0
) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        found: dict[str, Any] = (await call(client, org, "GET", f"/v1/migrations/{migration_id}"))[
            "migration"
        ]
        if found["status"] in ENDED:
            return found
        assert time.monotonic() < deadline, found
        await asyncio.sleep(0.1)


async def entity(client: httpx.AsyncClient, org: Org, bp: str, ident: str) -> dict[str, Any]:
    found: dict[str, Any] = (
        await call(client, org, "GET", f"/v1/blueprints/{bp}/entities/{ident}")
    )["entity"]
    return found


async def events_of(db: Database, org: Org, bp: str) -> list[Any]:
    async with db.tenant(org.org_id) as tx:
        return list(
            await tx.fetch(
                "SELECT identifier, action, origin, actor FROM entity_events "
                "WHERE org_id = $1 AND blueprint = $2 AND origin = 'MIGRATION' "
                "ORDER BY id",
                org.org_id,
                bp,
            )
        )


# ---------------------------------------------------------------------------------------
# Each kind, end to end


async def test_a_propertys_type_changes_through_a_new_property(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    await blueprint(client, org, SERVICE)
    await entities(
        client,
        org,
        "service",
        [{"identifier": f"s{i}", "properties": {"port": str(8000 + i)}} for i in range(5)]
        + [{"identifier": "bad", "properties": {"port": "eighty"}}],
    )
    start_worker()
    migration = await start(client, org, TYPE_CHANGE)
    assert migration["status"] == "PENDING"
    assert migration["mapping"]["blueprint"] == "service"
    done = await ended(client, org, migration["id"])
    assert done["status"] == "COMPLETED"
    assert done["progress"]["total"] == 6 and done["progress"]["processed"] == 6
    assert done["progress"]["updated"] == 5 and done["successCount"] == 5
    assert done["failureCount"] == 1
    [error] = done["errors"]
    assert error["sourceIdentifier"] == "bad"
    assert error["pointer"] == "/mapping/entity/properties/port_number"
    assert "eighty" in error["message"]
    written = await entity(client, org, "service", "s3")
    assert written["properties"]["port_number"] == 8003
    assert written["properties"]["port"] == "8003"  # merged: the other properties stay
    assert (await entity(client, org, "service", "bad"))["properties"].get("port_number") is None


async def test_the_documented_type_change_ends_with_the_old_name_and_the_new_type(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    """docs/migrations.md, "Changing a property's type", step by step."""
    org = await make_org()
    string_port = {"port": {"type": "string"}}
    await blueprint(client, org, {**SERVICE, "schema": {"properties": string_port}})
    await entities(client, org, "service", [{"identifier": "s1", "properties": {"port": "80"}}])
    r = await client.patch(
        "/v1/blueprints/service",
        json={"schema": {"properties": {"port": {"type": "number"}}}},
        headers=org.headers,
    )
    assert r.status_code == 422 and "/v1/migrations" in r.text
    both = {**string_port, "port_number": {"type": "number"}}
    await call(
        client, org, "PATCH", "/v1/blueprints/service", json={"schema": {"properties": both}}
    )
    start_worker()
    done = await ended(client, org, (await start(client, org, TYPE_CHANGE))["id"])
    assert done["status"] == "COMPLETED" and done["progress"]["updated"] == 1
    only_new = {"port_number": {"type": "number"}}
    await call(
        client, org, "PATCH", "/v1/blueprints/service", json={"schema": {"properties": only_new}}
    )
    await call(
        client,
        org,
        "PATCH",
        "/v1/blueprints/service/properties/port_number/rename",
        json={"newPropertyName": "port"},
    )
    assert (await entity(client, org, "service", "s1"))["properties"] == {"port": 80}


async def test_entities_move_to_another_blueprint(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    start_worker: Callable[..., Settings],
    db: Database,
) -> None:
    org = await make_org()
    await blueprint(client, org, LEGACY)
    await blueprint(client, org, APP)
    await entities(
        client,
        org,
        "legacy",
        [
            {"identifier": f"a{i}", "title": f"A{i}", "properties": {"language": "go"}}
            for i in range(4)
        ],
    )
    start_worker()
    migration = await start(
        client,
        org,
        {
            "sourceBlueprint": "legacy",
            "mapping": {
                "blueprint": "app",
                "entity": {
                    "identifier": ".identifier",
                    "title": ".title",
                    "properties": {"language": ".properties.language | ascii_upcase"},
                },
            },
            "deleteSourceEntities": True,
        },
    )
    done = await ended(client, org, migration["id"])
    assert done["status"] == "COMPLETED", done
    assert done["progress"]["created"] == 4 and done["progress"]["deleted"] == 4
    moved = await entity(client, org, "app", "a2")
    assert moved["title"] == "A2" and moved["properties"]["language"] == "GO"
    left = await call(client, org, "GET", "/v1/blueprints/legacy/entities")
    assert left["entities"] == []
    # Written and deleted through the entity writer, in the starter's name.
    events = await events_of(db, org, "app")
    assert len(events) == 4 and {e["actor"] for e in events} == {org.client_id}
    assert [e["action"] for e in await events_of(db, org, "legacy")] == ["DELETE"] * 4


async def test_a_blueprint_splits_by_filters(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    await blueprint(client, org, LEGACY)
    await blueprint(client, org, APP)
    await blueprint(client, org, {**APP, "identifier": "tool", "title": "Tool"})
    kinds = ["app", "tool", "app", "tool", "app"]
    await entities(
        client,
        org,
        "legacy",
        [{"identifier": f"e{i}", "properties": {"kind": k}} for i, k in enumerate(kinds)],
    )
    start_worker()
    ids = []
    for target in ("app", "tool"):
        migration = await start(
            client,
            org,
            {
                "sourceBlueprint": "legacy",
                "mapping": {
                    "blueprint": target,
                    "filter": f'.properties.kind == "{target}"',
                    "entity": {"identifier": ".identifier"},
                },
                "deleteSourceEntities": True,
            },
        )
        ids.append(migration["id"])
    first, second = [await ended(client, org, i) for i in ids]
    assert first["progress"]["created"] == 3 and first["progress"]["skipped"] == 2
    assert second["progress"]["created"] == 2
    apps = await call(client, org, "GET", "/v1/blueprints/app/entities")
    assert sorted(e["identifier"] for e in apps["entities"]) == ["e0", "e2", "e4"]
    tools = await call(client, org, "GET", "/v1/blueprints/tool/entities")
    assert sorted(e["identifier"] for e in tools["entities"]) == ["e1", "e3"]
    assert (await call(client, org, "GET", "/v1/blueprints/legacy/entities"))["entities"] == []


async def test_items_to_parse_make_an_entity_per_item(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    await blueprint(client, org, {**LEGACY, "schema": {"properties": {"libs": {"type": "array"}}}})
    await blueprint(client, org, APP)
    await blueprint(client, org, LIBRARY)
    await entities(client, org, "app", [{"identifier": "shop"}, {"identifier": "blog"}])
    await entities(
        client,
        org,
        "legacy",
        [
            {"identifier": "shop", "properties": {"libs": ["react", "redux"]}},
            {"identifier": "blog", "properties": {"libs": ["react"]}},
        ],
    )
    start_worker()
    migration = await start(
        client,
        org,
        {
            "sourceBlueprint": "legacy",
            "mapping": {
                "blueprint": "library",
                "itemsToParse": ".properties.libs",
                "entity": {
                    "identifier": '.identifier + "-" + .item',
                    "properties": {"language": '"js"'},
                    "relations": {"used_by": "[.identifier]"},
                },
            },
        },
    )
    done = await ended(client, org, migration["id"])
    assert done["progress"]["created"] == 3, done
    lib = await entity(client, org, "library", "shop-redux")
    assert lib["relations"]["used_by"] == ["shop"]


# ---------------------------------------------------------------------------------------
# Dry run, failures, cancellation


async def test_a_dry_run_reports_what_would_change_and_fail_without_writing(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    start_worker: Callable[..., Settings],
    db: Database,
) -> None:
    org = await make_org()
    await blueprint(client, org, SERVICE)
    await entities(
        client,
        org,
        "service",
        [
            {"identifier": "s1", "properties": {"port": "80"}},
            {"identifier": "s2", "properties": {"port": "nope"}},
            {"identifier": "s3", "properties": {"port": "443", "port_number": 443}},
        ],
    )
    before = await call(client, org, "GET", "/v1/blueprints/service/entities")
    start_worker()
    migration = await start(client, org, {**TYPE_CHANGE, "dryRun": True})
    done = await ended(client, org, migration["id"])
    assert done["status"] == "COMPLETED" and done["dryRun"] is True
    progress = done["progress"]
    assert (progress["updated"], progress["unchanged"], progress["failed"]) == (1, 1, 1)
    [preview] = done["preview"]
    assert preview["sourceIdentifier"] == "s1" and preview["operation"] == "update"
    assert preview["entity"]["properties"]["port_number"] == 80
    assert [e["sourceIdentifier"] for e in done["errors"]] == ["s2"]
    after = await call(client, org, "GET", "/v1/blueprints/service/entities")
    assert after == before
    assert await events_of(db, org, "service") == []


async def test_a_dry_run_of_a_move_reports_deletes_it_would_refuse(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    await blueprint(client, org, APP)
    await blueprint(client, org, {**APP, "identifier": "tool", "title": "Tool"})
    await blueprint(
        client,
        org,
        {
            **LIBRARY,
            "relations": {"used_by": {"target": "app", "many": False, "required": True}},
        },
    )
    await entities(client, org, "app", [{"identifier": "shop"}, {"identifier": "blog"}])
    await entities(
        client, org, "library", [{"identifier": "react", "relations": {"used_by": "shop"}}]
    )
    start_worker()
    migration = await start(
        client,
        org,
        {
            "sourceBlueprint": "app",
            "mapping": {"blueprint": "tool", "entity": {}},
            "deleteSourceEntities": True,
            "dryRun": True,
        },
    )
    done = await ended(client, org, migration["id"])
    assert done["progress"]["created"] == 2 and done["progress"]["deleted"] == 1, done
    [error] = done["errors"]
    assert error["sourceIdentifier"] == "shop" and error["pointer"] == "/deleteSourceEntities"
    assert len((await call(client, org, "GET", "/v1/blueprints/app/entities"))["entities"]) == 2
    assert (await call(client, org, "GET", "/v1/blueprints/tool/entities"))["entities"] == []


async def test_per_entity_failures_name_the_entity_and_the_others_are_written(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    await blueprint(client, org, APP)
    await blueprint(client, org, LIBRARY)
    await blueprint(client, org, {**LEGACY, "schema": {"properties": {"app": {"type": "string"}}}})
    await entities(client, org, "app", [{"identifier": "shop"}])
    await entities(
        client,
        org,
        "legacy",
        [
            {"identifier": "ok", "properties": {"app": "shop"}},
            {"identifier": "dangling", "properties": {"app": "gone"}},
            {"identifier": "7", "properties": {"app": "shop"}},
            {"identifier": "filtered", "properties": {}},
        ],
    )
    start_worker()
    migration = await start(
        client,
        org,
        {
            "sourceBlueprint": "legacy",
            "mapping": {
                "blueprint": "library",
                "filter": ".properties.app != null",
                "entity": {
                    "identifier": 'if .identifier == "7" then 7 else .identifier end',
                    "relations": {"used_by": "[.properties.app]"},
                },
            },
        },
    )
    done = await ended(client, org, migration["id"])
    assert done["status"] == "COMPLETED"
    assert done["progress"]["created"] == 1 and done["progress"]["skipped"] == 1
    failures = {e["sourceIdentifier"]: e for e in done["errors"]}
    assert set(failures) == {"dangling", "7"}
    assert failures["dangling"]["identifier"] == "dangling"
    assert failures["dangling"]["statusCode"] == 404
    assert "tostring" in failures["7"]["message"]


async def test_a_pending_migration_is_cancelled_at_once(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await blueprint(client, org, SERVICE)
    migration = await start(client, org, TYPE_CHANGE)
    r = await call(
        client, org, "POST", f"/v1/migrations/{migration['id']}/cancel", json={"reason": "oops"}
    )
    assert r["migration"]["status"] == "CANCELLED"
    assert r["migration"]["cancelReason"] == "oops"


async def test_cancelled_between_batches_the_rest_is_left_alone(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    start_worker: Callable[..., Settings],
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(data_migrations, "BATCH", 3)
    org = await make_org()
    await blueprint(client, org, SERVICE)
    await entities(
        client,
        org,
        "service",
        [{"identifier": f"s{i}", "properties": {"port": str(i)}} for i in range(9)],
    )
    migration = await start(client, org, TYPE_CHANGE)
    # One batch, as a worker does it; then the cancel arrives.
    assert await data_migrations.batch(db, org.org_id, migration["id"], owner="w1")
    midway = (await call(client, org, "GET", f"/v1/migrations/{migration['id']}"))["migration"]
    assert midway["status"] == "RUNNING" and midway["progress"]["processed"] == 3
    r = await call(client, org, "POST", f"/v1/migrations/{migration['id']}/cancel")
    assert r["migration"]["status"] == "CANCELLED"
    start_worker()
    await asyncio.sleep(1.5)  # a worker looks every second: it finds nothing to do
    done = (await call(client, org, "GET", f"/v1/migrations/{migration['id']}"))["migration"]
    assert done["status"] == "CANCELLED" and done["progress"]["processed"] == 3
    written = sorted(e["identifier"] for e in await events_of(db, org, "service"))
    assert written == ["s0", "s1", "s2"]


async def test_a_cancel_during_a_batch_discards_that_batch(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(data_migrations, "BATCH", 3)
    org = await make_org()
    await blueprint(client, org, SERVICE)
    await entities(
        client,
        org,
        "service",
        [{"identifier": f"s{i}", "properties": {"port": str(i)}} for i in range(9)],
    )
    migration = await start(client, org, TYPE_CHANGE)
    claim = await data_migrations._claim(db, org.org_id, migration["id"], "w1")
    assert claim is not None and len(claim.documents) == 3
    rendered = await data_migrations.render(org.org_id, claim.mapping, claim.documents)
    r = await call(client, org, "POST", f"/v1/migrations/{migration['id']}/cancel")
    assert r["migration"]["status"] == "PENDING_CANCELLATION"
    await data_migrations._write(db, claim, rendered, "w1")
    done = (await call(client, org, "GET", f"/v1/migrations/{migration['id']}"))["migration"]
    assert done["status"] == "CANCELLED" and done["progress"]["processed"] == 0
    assert await events_of(db, org, "service") == []


async def test_a_worker_that_died_mid_batch_is_resumed_without_repeating_work(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    start_worker: Callable[..., Settings],
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(data_migrations, "BATCH", 4)
    org = await make_org()
    await blueprint(client, org, SERVICE)
    await entities(
        client,
        org,
        "service",
        [{"identifier": f"s{i:02}", "properties": {"port": str(i)}} for i in range(10)],
    )
    migration = await start(client, org, TYPE_CHANGE)
    # A worker does one batch, claims the next and dies before writing it.
    assert await data_migrations.batch(db, org.org_id, migration["id"], owner="dead")
    assert await data_migrations._claim(db, org.org_id, migration["id"], "dead") is not None
    async with db.tenant(org.org_id) as tx:  # its lease runs out
        await tx.execute(
            "UPDATE catalog_migrations SET lease_until = now() - interval '1 second' "
            "WHERE org_id = $1 AND id = $2",
            org.org_id,
            migration["id"],
        )
    start_worker()
    done = await ended(client, org, migration["id"])
    assert done["status"] == "COMPLETED" and done["progress"]["processed"] == 10
    written = [e["identifier"] for e in await events_of(db, org, "service")]
    assert sorted(written) == [f"s{i:02}" for i in range(10)]  # each exactly once


async def test_a_worker_stopped_mid_migration_is_taken_over_at_once(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    settings: Settings,
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real worker stopped while the migration runs: its batch in work is rolled back and
    its lease given back; the next worker finishes the migration, each entity written
    once."""
    monkeypatch.setattr(data_migrations, "BATCH", 20)
    org = await make_org()
    await blueprint(client, org, SERVICE)
    count = 400
    await entities(
        client,
        org,
        "service",
        [{"identifier": f"s{i:04}", "properties": {"port": str(i)}} for i in range(count)],
    )
    first = InProcessWorker(dispatch_settings(settings))
    first.start()
    # Each entity's jq takes a while, so the stop lands while a batch is being evaluated.
    slow = ".properties.port | tonumber + ([range(0; 20000)] | length) * 0"
    body = {
        "sourceBlueprint": "service",
        "mapping": {"entity": {"properties": {"port_number": slow}}},
    }
    migration = await start(client, org, body)
    path = f"/v1/migrations/{migration['id']}"
    try:
        while True:
            found = (await call(client, org, "GET", path))["migration"]
            if found["progress"]["processed"] >= 40:
                break
            await asyncio.sleep(0.02)
    finally:
        await first.stop()
    midway = (await call(client, org, "GET", path))["migration"]
    assert midway["status"] == "RUNNING" and midway["progress"]["processed"] < count, midway
    async with db.tenant(org.org_id) as tx:
        lease = await tx.fetchval(
            "SELECT lease_owner FROM catalog_migrations WHERE org_id = $1 AND id = $2",
            org.org_id,
            migration["id"],
        )
    assert lease is None  # given back: nobody waits for it to run out
    second = InProcessWorker(dispatch_settings(settings))
    second.start()
    try:
        done = await ended(client, org, migration["id"], within=120)
    finally:
        await second.stop()
    assert done["status"] == "COMPLETED" and done["progress"]["updated"] == count, done
    written = [e["identifier"] for e in await events_of(db, org, "service")]
    assert len(written) == count and len(set(written)) == count, len(written)


# ---------------------------------------------------------------------------------------
# Permissions, audit, tenancy


async def test_the_starters_permissions_decide_each_entity(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    start_worker: Callable[..., Settings],
    db: Database,
    app: FastAPI,
) -> None:
    org = await make_org()
    await blueprint(client, org, SERVICE)
    await blueprint(client, org, APP)
    await entities(client, org, "service", [{"identifier": "s1", "properties": {"port": "1"}}])
    await entities(client, org, "app", [{"identifier": "s1"}])
    # Members may update app entities (not register new ones).
    await call(
        client,
        org,
        "PATCH",
        "/v1/blueprints/app/permissions",
        json={"entities": {"update": {"roles": ["Member"]}}},
    )
    await add_user(db, org.org_id, "dev@example.com", roles=["Member"])
    dev = user_headers(app, org.org_id, "dev@example.com")
    # Nothing of service's is theirs to write: refused at once.
    r = await client.post("/v1/migrations", json=TYPE_CHANGE, headers=dev)
    assert r.status_code == 403 and r.json()["error"] == "missing_permission"
    await entities(client, org, "service", [{"identifier": "s2", "properties": {"port": "2"}}])
    start_worker()
    body = {
        "sourceBlueprint": "service",
        "mapping": {"blueprint": "app", "entity": {"title": '"from " + .identifier'}},
    }
    r = await client.post("/v1/migrations", json=body, headers=dev)
    assert r.status_code == 201, r.text
    migration_id = r.json()["migration"]["id"]
    done = await ended(client, org, migration_id)
    assert done["progress"]["updated"] == 1 and done["failureCount"] == 1
    [error] = done["errors"]
    assert error["identifier"] == "s2" and error["statusCode"] == 403
    assert "entities.register" in error["message"]
    assert (await entity(client, org, "app", "s1"))["title"] == "from s1"
    # Another member may not cancel it; the starter may (here: it has ended).
    await add_user(db, org.org_id, "other@example.com", roles=["Member"])
    other = user_headers(app, org.org_id, "other@example.com")
    r = await client.post(f"/v1/migrations/{migration_id}/cancel", headers=other)
    assert r.status_code == 403 and r.json()["details"]["permission"] == "migrations.cancel"
    r = await client.post(f"/v1/migrations/{migration_id}/cancel", headers=dev)
    assert r.status_code == 409 and r.json()["error"] == "migration_ended"


async def test_a_starter_who_left_fails_the_migration(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    db: Database,
    app: FastAPI,
) -> None:
    org = await make_org()
    await blueprint(client, org, SERVICE)
    await entities(client, org, "service", [{"identifier": "s1", "properties": {"port": "1"}}])
    await add_user(db, org.org_id, "mod@example.com", roles=["service-moderator"])
    mod = user_headers(app, org.org_id, "mod@example.com")
    r = await client.post("/v1/migrations", json=TYPE_CHANGE, headers=mod)
    assert r.status_code == 201, r.text
    async with db.tenant(org.org_id) as tx:
        await tx.execute(
            "DELETE FROM users WHERE org_id = $1 AND email = $2", org.org_id, "mod@example.com"
        )
    migration_id = r.json()["migration"]["id"]
    assert await data_migrations.batch(db, org.org_id, migration_id, owner="w")
    done = (await call(client, org, "GET", f"/v1/migrations/{migration_id}"))["migration"]
    assert done["status"] == "FAILURE" and "no longer a member" in done["message"]
    assert (await entity(client, org, "service", "s1"))["properties"].get("port_number") is None


async def test_the_audit_log_records_a_migration_and_its_status_changes(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    await blueprint(client, org, SERVICE)
    await entities(client, org, "service", [{"identifier": "s1", "properties": {"port": "1"}}])
    start_worker()
    migration = await start(client, org, TYPE_CHANGE)
    await ended(client, org, migration["id"])
    log = await call(client, org, "GET", "/v1/audit-log?resources=migration")
    entries = [a for a in log["audits"] if a["identifier"] == migration["id"]]
    statuses = [(a["action"], (a["diff"]["after"] or {}).get("status")) for a in entries]
    assert statuses[::-1] == [("CREATE", "PENDING"), ("UPDATE", "RUNNING"), ("UPDATE", "COMPLETED")]
    assert all(a["trigger"]["by"]["userId"] == org.client_id for a in entries)
    entity_log = await call(client, org, "GET", "/v1/audit-log?resources=entity&entity=s1")
    assert entity_log["audits"][0]["trigger"]["origin"] == "MIGRATION"


async def test_no_route_reaches_another_orgs_migration(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    a, b = await make_org(), await make_org()
    await blueprint(client, a, SERVICE)
    migration = await start(client, a, TYPE_CHANGE)
    path = f"/v1/migrations/{migration['id']}"
    await call(client, b, "GET", path, 404)
    await call(client, b, "POST", path + "/cancel", 404)
    assert (await call(client, b, "GET", "/v1/migrations"))["migrations"] == []
    await call(client, b, "POST", "/v1/migrations", 404, json=TYPE_CHANGE)
    # Org A's migration is untouched by B's attempts.
    mine = (await call(client, a, "GET", path))["migration"]
    assert mine["status"] == "PENDING"
    listed = (await call(client, a, "GET", "/v1/migrations?blueprint=service"))["migrations"]
    assert [m["id"] for m in listed] == [migration["id"]]


async def test_the_list_filters_by_status_actor_and_blueprint(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await blueprint(client, org, SERVICE)
    first = await start(client, org, TYPE_CHANGE)
    await call(client, org, "POST", f"/v1/migrations/{first['id']}/cancel")
    second = await start(client, org, TYPE_CHANGE)

    async def ids(query: str) -> list[str]:
        found = await call(client, org, "GET", "/v1/migrations" + query)
        return [m["id"] for m in found["migrations"]]

    assert await ids("") == [second["id"], first["id"]]
    assert await ids("?status=CANCELLED") == [first["id"]]
    assert await ids("?status=CANCELLED&status=PENDING") == [second["id"], first["id"]]
    assert await ids(f"?actor={org.client_id}&status=PENDING") == [second["id"]]
    assert await ids("?actor=someone-else") == []
    assert await ids("?blueprint=other") == []
    await blueprint(client, org, APP)
    moving = await start(
        client, org, {"sourceBlueprint": "service", "mapping": {"blueprint": "app", "entity": {}}}
    )
    assert await ids("?blueprint=app") == [moving["id"]]  # the target matches too
    assert await ids("?blueprint=service") == [moving["id"], second["id"], first["id"]]


async def test_every_bad_request_is_a_clear_4xx(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, settings: Settings
) -> None:
    org = await make_org()
    await blueprint(client, org, SERVICE)
    await blueprint(client, org, APP)
    mapping = TYPE_CHANGE["mapping"]

    async def refused(body: Any, status: int, error: str | None = None) -> dict[str, Any]:
        r = await client.post("/v1/migrations", json=body, headers=org.headers)
        assert r.status_code == status, r.text
        found: dict[str, Any] = r.json()
        assert found["ok"] is False and found["message"]
        if error is not None:
            assert found["error"] == error
        return found

    await refused({**TYPE_CHANGE, "sourceBlueprint": "nope"}, 404, "not_found")
    await refused(
        {"sourceBlueprint": "service", "mapping": {"blueprint": "nope", "entity": {}}}, 404
    )
    bad_prop = await refused(
        {"sourceBlueprint": "service", "mapping": {"entity": {"properties": {"x": "1"}}}}, 422
    )
    assert bad_prop["details"][0]["pointer"] == "/mapping/entity/properties/x"
    bad_rel = await refused(
        {"sourceBlueprint": "service", "mapping": {"entity": {"relations": {"r": "1"}}}}, 422
    )
    assert bad_rel["details"][0]["pointer"] == "/mapping/entity/relations/r"
    bad_jq = await refused(
        {"sourceBlueprint": "service", "mapping": {"filter": ".[", "entity": {}}}, 422
    )
    assert bad_jq["details"][0]["pointer"] == "/mapping/filter"
    module = await refused(
        {
            "sourceBlueprint": "service",
            "mapping": {"entity": {"title": 'import "x" as $x; $x'}},
        },
        422,
    )
    assert "modules" in module["details"][0]["message"]
    await refused({**TYPE_CHANGE, "deleteSourceEntities": True}, 422)
    await refused({**TYPE_CHANGE, "extra": 1}, 422)
    await refused({"sourceBlueprint": "service"}, 422)
    await refused({"sourceBlueprint": "service", "mapping": {"entity": {"nope": "."}}}, 422)
    await refused(
        {"sourceBlueprint": "service", "mapping": {**mapping, "entity": {"title": 3}}}, 422
    )
    await refused([], 422)
    # At most migrations_max_active_per_org pending or running.
    for _ in range(settings.migrations_max_active_per_org):
        await start(client, org, TYPE_CHANGE)
    await refused(TYPE_CHANGE, 409, "too_many_migrations")
    # The other routes.
    r = await client.get("/v1/migrations?status=DONE", headers=org.headers)
    assert r.status_code == 422 and r.json()["ok"] is False
    r = await client.get("/v1/migrations?sourceBlueprint=service", headers=org.headers)
    assert r.status_code == 422 and r.json()["error"] == "unknown_query_parameter"
    r = await client.get("/v1/migrations/migration_nope", headers=org.headers)
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = await client.post("/v1/migrations/migration_nope/cancel", headers=org.headers)
    assert r.status_code == 404
    listed = (await call(client, org, "GET", "/v1/migrations"))["migrations"]
    r = await client.post(
        f"/v1/migrations/{listed[0]['id']}/cancel", json={"why": "x"}, headers=org.headers
    )
    assert r.status_code == 422
    await call(client, org, "POST", f"/v1/migrations/{listed[0]['id']}/cancel")
    r = await client.post(f"/v1/migrations/{listed[0]['id']}/cancel", headers=org.headers)
    assert r.status_code == 409 and r.json()["error"] == "migration_ended"
    for method, path in (
        ("GET", "/v1/migrations"),
        ("POST", "/v1/migrations"),
        ("GET", "/v1/migrations/x"),
        ("POST", "/v1/migrations/x/cancel"),
    ):
        r = await client.request(method, path)
        assert r.status_code == 401 and r.json()["ok"] is False
    # Text PostgreSQL cannot store is refused, not a failed statement.
    await refused({**TYPE_CHANGE, "sourceBlueprint": "svc\u0000"}, 422)
    await refused(
        {"sourceBlueprint": "service", "mapping": {"entity": {"title": '"a\u0000"'}}}, 422
    )
    for query in ("?actor=a%00b", "?blueprint=%00"):
        r = await client.get("/v1/migrations" + query, headers=org.headers)
        assert r.status_code == 422, r.text
    r = await client.get("/v1/migrations/m%00x", headers=org.headers)
    assert r.status_code in (404, 422), r.text
    r = await client.post(
        f"/v1/migrations/{listed[1]['id']}/cancel",
        json={"reason": "a\u0000"},
        headers=org.headers,
    )
    assert r.status_code == 422, r.text
    # Nothing was recorded by the refused creations.
    async with db.tenant(org.org_id) as tx:
        count = await tx.fetchval(
            "SELECT count(*) FROM catalog_migrations WHERE org_id = $1", org.org_id
        )
    assert count == settings.migrations_max_active_per_org


# ---------------------------------------------------------------------------------------
# The new jq site: the sandbox's escapes and fair turns


async def test_a_migration_mapping_cannot_read_the_services_environment(
    canary_env: None,  # noqa: F811
) -> None:
    """(The table of escapes runs against this site with the others, tests/test_sandbox.py.)"""
    for program in ("$ENV | tostring", "env | tostring", "[inputs] | tostring"):
        assert CANARY not in str(await _via_migration("org-escapes", program))
    leak = f'$ENV | tostring | test("{CANARY}")'
    assert await _via_migration("org-escapes", leak) is False


async def test_a_mapping_past_its_time_limit_is_that_entitys_failure() -> None:
    mapping = {
        "entity": {"properties": {"v": f'if .identifier == "slow" then {LOOP_JQ} else 1 end'}}
    }
    docs = [{"identifier": "slow"}, {"identifier": "quick"}]
    rendered = await data_migrations.render("org-slow-migration", mapping, docs)
    assert [source for source, _ in rendered.writes] == ["quick"]
    [error] = rendered.errors
    assert error["sourceIdentifier"] == "slow" and "longer than" in error["message"]
    assert rendered.timeouts == 1


async def test_one_orgs_slow_mappings_do_not_hold_up_another_orgs() -> None:
    slow = {"entity": {"properties": {"v": LOOP_JQ}}}
    quick = {"entity": {"properties": {"v": ".properties.n * 2"}}}
    noisy = [
        asyncio.create_task(
            data_migrations.render("org-noisy-mig", slow, [{"identifier": f"n{i}"}])
        )
        for i in range(6)
    ]
    await asyncio.sleep(0.2)  # the noisy org holds its share of the children
    began = time.monotonic()
    for _ in range(5):
        docs = [{"identifier": f"q{i}", "properties": {"n": i}} for i in range(50)]
        rendered = await data_migrations.render("org-quiet-mig", quick, docs)
        assert [w["properties"]["v"] for _, w in rendered.writes] == [i * 2 for i in range(50)]
    assert time.monotonic() - began < sandbox.limits().time_limit
    assert not all(task.done() for task in noisy)
    results = await asyncio.gather(*noisy, return_exceptions=True)
    assert all(
        isinstance(r, sandbox.Busy) or (r.errors and not r.writes)  # type: ignore[union-attr]
        for r in results
    )


async def test_one_orgs_large_migration_does_not_hold_up_anothers(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    start_worker: Callable[..., Settings],
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Orgs take turns batch by batch: a small migration started after a large one of
    another org ends long before it."""
    monkeypatch.setattr(data_migrations, "BATCH", 30)
    big, small = await make_org(), await make_org()
    for org, count in ((big, 3000), (small, 20)):
        await blueprint(client, org, SERVICE)
        await entities(
            client,
            org,
            "service",
            [{"identifier": f"s{i:04}", "properties": {"port": str(i)}} for i in range(count)],
        )
    start_worker()
    large = await start(client, big, TYPE_CHANGE)
    await asyncio.sleep(0.5)
    little = await start(client, small, TYPE_CHANGE)
    done = await ended(client, small, little["id"])
    assert done["status"] == "COMPLETED"
    other = (await call(client, big, "GET", f"/v1/migrations/{large['id']}"))["migration"]
    assert other["status"] == "RUNNING", other["progress"]
    assert other["progress"]["processed"] < 3000
    finished = await ended(client, big, large["id"], within=120)
    assert finished["status"] == "COMPLETED" and finished["endedAt"] > done["endedAt"]


async def test_a_deleted_source_blueprint_fails_the_migration(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await blueprint(client, org, APP)
    migration = await start(client, org, {"sourceBlueprint": "app", "mapping": {"entity": {}}})
    await call(client, org, "DELETE", "/v1/blueprints/app")
    assert not await data_migrations.batch(db, org.org_id, migration["id"], owner="w")
    done = (await call(client, org, "GET", f"/v1/migrations/{migration['id']}"))["migration"]
    assert done["status"] == "FAILURE" and "deleted" in done["message"]


async def test_a_deleted_target_blueprint_fails_the_migration(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await blueprint(client, org, SERVICE)
    await blueprint(client, org, APP)
    await entities(client, org, "service", [{"identifier": "s1", "properties": {"port": "1"}}])
    body = {"sourceBlueprint": "service", "mapping": {"blueprint": "app", "entity": {}}}
    migration = await start(client, org, body)
    await call(client, org, "DELETE", "/v1/blueprints/app")
    assert await data_migrations.batch(db, org.org_id, migration["id"], owner="w")
    done = (await call(client, org, "GET", f"/v1/migrations/{migration['id']}"))["migration"]
    assert done["status"] == "FAILURE" and "'app'" in done["message"], done
    assert done["progress"]["processed"] == 0


async def test_two_workers_never_hold_two_migrations_of_one_org_at_once(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    """An org's migrations run one at a time: two workers claiming two different migrations
    of one org at the same instant get one claim between them (each checked that no other
    migration of the org was held, and neither saw the other's claim until it committed)."""
    org = await make_org()
    await blueprint(client, org, SERVICE)
    await entities(client, org, "service", [{"identifier": "s1", "properties": {"port": "1"}}])
    first = await start(client, org, TYPE_CHANGE)
    second = await start(client, org, TYPE_CHANGE)
    for _ in range(20):
        claims = await asyncio.gather(
            data_migrations._claim(db, org.org_id, first["id"], "w1"),
            data_migrations._claim(db, org.org_id, second["id"], "w2"),
        )
        assert sum(claim is not None for claim in claims) <= 1
        async with db.tenant(org.org_id) as tx:  # both leases end: the next round starts over
            await tx.execute(
                "UPDATE catalog_migrations SET lease_until = NULL, lease_owner = NULL "
                "WHERE org_id = $1",
                org.org_id,
            )


async def test_the_cap_on_an_orgs_active_migrations_is_a_setting(
    client: httpx.AsyncClient, make_org: OrgFactory, app: FastAPI
) -> None:
    org = await make_org()
    await blueprint(client, org, SERVICE)
    original = app.state.settings
    app.state.settings = original.model_copy(update={"migrations_max_active_per_org": 1})
    try:
        await start(client, org, TYPE_CHANGE)
        r = await client.post("/v1/migrations", json=TYPE_CHANGE, headers=org.headers)
        assert r.status_code == 409 and r.json()["error"] == "too_many_migrations", r.text
        assert "at most 1" in r.json()["message"]
    finally:
        app.state.settings = original
