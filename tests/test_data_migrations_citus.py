"""Data migrations on a Citus cluster (docs/scaling.md): the worker's pass (its scan across
orgs, each batch's claim, read, writes and progress, the migration's end) runs there as on a
single PostgreSQL, two orgs' migrations apart; moving entities (deleteSourceEntities) is
refused there (docs/migrations.md)."""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import FastAPI

from app.catalog import data_migrations
from app.db.database import Database
from tests.conftest import Org
from tests.test_citus import (  # noqa: F401 - the cluster's fixtures
    _org,
    citus_app,
    citus_settings,
    cluster,
    http,
)

SERVICE = {
    "identifier": "service",
    "title": "Service",
    "schema": {"properties": {"port": {"type": "string"}, "port_number": {"type": "number"}}},
}
APP = {"identifier": "app", "title": "App", "schema": {"properties": {}}}


async def _call(client: httpx.AsyncClient, org: Org, method: str, path: str, **kw: Any) -> Any:
    r = await client.request(method, path, headers=org.headers, **kw)
    assert r.status_code in (200, 201), r.text
    return r.json()


async def test_migrations_run_on_citus_as_on_one_postgresql(
    citus_app: FastAPI,  # noqa: F811
    http: httpx.AsyncClient,  # noqa: F811
) -> None:
    first, second = await _org(citus_app, http), await _org(citus_app, http)
    ids = {}
    for org, count in ((first, 7), (second, 3)):
        for body in (SERVICE, APP):
            await _call(http, org, "POST", "/v1/blueprints", json=body)
        items = [{"identifier": f"s{i}", "properties": {"port": str(i)}} for i in range(count)]
        await _call(
            http, org, "POST", "/v1/blueprints/service/entities/bulk", json={"entities": items}
        )
        change = {
            "sourceBlueprint": "service",
            "mapping": {"entity": {"properties": {"port_number": ".properties.port | tonumber"}}},
        }
        ids[org.org_id] = [(await _call(http, org, "POST", "/v1/migrations", json=change))]
        move = {
            "sourceBlueprint": "service",
            "mapping": {"blueprint": "app", "entity": {}},
            "deleteSourceEntities": True,
        }
        refused = await http.post("/v1/migrations", json=move, headers=org.headers)
        assert refused.status_code == 422, refused.text
        assert refused.json()["details"][0]["pointer"] == "/deleteSourceEntities"
        copy = {**move, "deleteSourceEntities": False}
        ids[org.org_id].append(await _call(http, org, "POST", "/v1/migrations", json=copy))
    db: Database = citus_app.state.db
    await data_migrations.advance(db, owner="citus-test", seconds=30)
    for org, count in ((first, 7), (second, 3)):
        change, move = [
            (await _call(http, org, "GET", f"/v1/migrations/{m['migration']['id']}"))["migration"]
            for m in ids[org.org_id]
        ]
        assert change["status"] == "COMPLETED" and change["progress"]["updated"] == count
        assert move["status"] == "COMPLETED", move
        assert move["progress"]["created"] == count
        apps = await _call(http, org, "GET", "/v1/blueprints/app/entities")
        assert len(apps["entities"]) == count
        listed = await _call(http, org, "GET", "/v1/migrations")
        assert {m["id"] for m in listed["migrations"]} == {
            m["migration"]["id"] for m in ids[org.org_id]
        }
