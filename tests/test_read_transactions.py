"""Read routes' transactions: opened READ ONLY (a write in one is refused by PostgreSQL),
their small answers sent before the COMMIT that gives the connection back."""

from __future__ import annotations

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from app.db import routing
from app.db.database import Database
from app.kit.http import iter_routes
from tests.conftest import OrgFactory

# Read routes that write, each for a reason of its own (their transaction is an ordinary
# one, committed before the answer).
WRITING_READS = {("GET", "/v1/integration/{identifier}")}  # keeps the Ocean version read


async def test_a_read_only_transaction_refuses_a_write(db: Database, make_org: OrgFactory) -> None:
    org = await make_org()
    tx, conn = await db.begin_tenant(org.org_id, read_only=True)
    try:
        assert await tx.fetchval("SELECT count(*) FROM blueprints") == 0
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await tx.execute("INSERT INTO teams (org_id, name) VALUES ($1, 'x')", org.org_id)
    finally:
        await db.finish(conn, commit=False)


def test_every_read_route_reads_in_a_read_only_transaction_unless_it_says_it_writes(
    app: FastAPI,
) -> None:
    reads, writing = 0, set()
    for route in iter_routes(app.routes):
        if not isinstance(route, routing.TransactionRoute):
            continue
        for method in route.methods or ():
            if method in routing.READ_METHODS:
                reads += 1
                if not route.read_only:
                    writing.add((method, route.path))
            else:
                assert not route.read_only, (method, route.path)
    assert reads > 50
    assert writing == WRITING_READS


def _held(app: FastAPI) -> int:
    stats = app.state.db.pool.stats()
    return int(stats["open"] - stats["idle"])


@pytest.mark.parametrize("limit", [routing.SEND_BEFORE_COMMIT_BYTES, 0])
async def test_a_read_gives_its_connection_back_once_answered(
    client: httpx.AsyncClient,
    app: FastAPI,
    make_org: OrgFactory,
    monkeypatch: pytest.MonkeyPatch,
    limit: int,
) -> None:
    """Sent before the COMMIT (small answers) or after it (larger ones, here all): either
    way the connection is back in the pool when the answer is complete."""
    monkeypatch.setattr(routing, "SEND_BEFORE_COMMIT_BYTES", limit)
    org = await make_org()
    blueprint = {"identifier": "svc", "title": "Svc", "schema": {"properties": {}}}
    assert (
        await client.post("/v1/blueprints", json=blueprint, headers=org.headers)
    ).status_code == 201
    before = _held(app)
    for _ in range(5):
        r = await client.get("/v1/blueprints/svc", headers=org.headers)
        assert r.status_code == 200 and r.json()["blueprint"]["identifier"] == "svc"
        assert _held(app) == before
    # A write through a writing route still lands (and a read after it sees it).
    r = await client.post(
        "/v1/blueprints/svc/entities", json={"identifier": "a"}, headers=org.headers
    )
    assert r.status_code in (200, 201), r.text
    r = await client.get("/v1/blueprints/svc/entities/a", headers=org.headers)
    assert r.status_code == 200 and _held(app) == before
