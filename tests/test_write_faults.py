"""Entity writes under faults: concurrent deletes of relation targets, deadlocks between
concurrent bulk writers, refused connections, and text PostgreSQL cannot store."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from app.catalog import entities
from app.db.database import Database
from tests.conftest import Org, OrgFactory


async def _blueprints(client: httpx.AsyncClient, org: Org) -> None:
    for body in (
        {
            "identifier": "team",
            "title": "Team",
            "schema": {"properties": {"size": {"type": "number"}}},
        },
        {
            "identifier": "service",
            "title": "Service",
            "schema": {"properties": {"language": {"type": "string"}}},
            "relations": {
                "team": {"target": "team", "required": False, "many": False},
                "dependsOn": {"target": "service", "required": False, "many": True},
            },
        },
    ):
        r = await client.post("/v1/blueprints", json=body, headers=org.headers)
        assert r.status_code == 201, r.text


@pytest.fixture
async def org(client: httpx.AsyncClient, make_org: OrgFactory) -> Org:
    created = await make_org()
    await _blueprints(client, created)
    return created


async def _wait_for_lock_wait(db: Database) -> None:
    """Until some connection of this database waits for a row lock (10 s at most)."""
    deadline = asyncio.get_running_loop().time() + 10
    while asyncio.get_running_loop().time() < deadline:
        async with db.system() as tx:
            waiting = await tx.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            )
        if waiting:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("no writer came to wait for the delete's lock")


async def test_a_target_deleted_during_a_bulk_write_fails_only_its_items(
    client: httpx.AsyncClient, org: Org, db: Database
) -> None:
    teams = [{"identifier": f"t{i:03d}"} for i in range(100)]
    r = await client.post(
        "/v1/blueprints/team/entities/bulk", json={"entities": teams}, headers=org.headers
    )
    assert r.status_code == 200, r.text
    services = [
        {"identifier": f"s{i:03d}", "relations": {"team": f"t{i % 100:03d}"}} for i in range(300)
    ]
    writer = entities.Writer(actor="test", origin="API", datasource=None)
    # Another transaction deletes team t007 and has not committed when the bulk write
    # checks its targets; it commits while the bulk write waits.
    async with db.tenant(org.org_id) as tx:
        assert await entities.delete_many(
            tx, "team", ["t007"], delete_dependents=False, writer=writer
        ) == ["t007"]
        bulk = asyncio.create_task(
            client.post(
                "/v1/blueprints/service/entities/bulk",
                json={"entities": services},
                headers=org.headers,
            )
        )
        await _wait_for_lock_wait(db)
    r = await asyncio.wait_for(bulk, 30)
    assert r.status_code == 207, r.text
    body = r.json()
    assert len(body["entities"]) == 297
    assert [(e["index"], e["statusCode"]) for e in body["errors"]] == [
        (7, 404),
        (107, 404),
        (207, 404),
    ]
    assert all("t007" in e["message"] for e in body["errors"])
    count = await client.get("/v1/blueprints/service/entities-count", headers=org.headers)
    assert count.json()["count"] == 297
