"""The seam between domains (app/kit/reactions.py): a write's changes reach the subscribers
in the writer's transaction, an error in a reaction fails the write whole, and a process
that did not wire its reactions cannot write."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from app import wiring
from app.catalog import entities
from app.db.database import Database, Tx
from app.kit import reactions
from tests.conftest import OrgFactory

SERVICE = {
    "identifier": "service",
    "title": "Service",
    "schema": {"properties": {"tier": {"type": "string"}}},
}


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[Any, str]] = []
        self.fail = False

    async def __call__(self, tx: Tx, change: Any) -> None:
        xid = await tx.fetchval("SELECT pg_current_xact_id()::text")
        self.seen.append((change, str(xid)))
        if self.fail:
            raise RuntimeError("the reaction failed")


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    found = Recorder()
    kinds = (reactions.EntitiesWritten, reactions.EntitiesDeleted, reactions.BlueprintChanged)
    for kind in kinds:
        reactions.subscribe(kind, found)
    try:
        yield found
    finally:
        for kind in kinds:
            reactions.unsubscribe(kind, found)


async def test_changes_reach_subscribers_in_the_writers_transaction(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, recorder: Recorder
) -> None:
    org = await make_org()
    r = await client.post("/v1/blueprints", json=SERVICE, headers=org.headers)
    assert r.status_code == 201, r.text
    r = await client.post(
        "/v1/blueprints/service/entities/bulk",
        json={"entities": [{"identifier": "a"}, {"identifier": "b"}]},
        headers=org.headers,
    )
    assert r.status_code in (200, 207), r.text
    r = await client.patch(
        "/v1/blueprints/service", json={"title": "Services"}, headers=org.headers
    )
    assert r.status_code == 200, r.text
    r = await client.delete("/v1/blueprints/service/entities/a", headers=org.headers)
    assert r.status_code == 200, r.text

    kinds = [(type(change).__name__, xid) for change, xid in recorder.seen]
    assert [k for k, _ in kinds] == ["EntitiesWritten", "BlueprintChanged", "EntitiesDeleted"]
    written, _ = recorder.seen[0]
    assert written.blueprint["identifier"] == "service" and written.identifiers == ["a", "b"]
    deleted, _ = recorder.seen[2]
    assert (deleted.blueprint, deleted.identifiers) == ("service", ["a"])
    async with db.system() as tx:
        events = await tx.fetch(
            "SELECT action, xid::text AS xid FROM entity_events WHERE org_id = $1 ORDER BY id",
            org.org_id,
        )
    # The reactions ran in the very transactions that wrote the events.
    assert [e["xid"] for e in events if e["action"] != "DELETE"] == [kinds[0][1]] * 2
    assert [e["xid"] for e in events if e["action"] == "DELETE"] == [kinds[2][1]]


async def test_a_failed_reaction_fails_the_write_whole(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, recorder: Recorder
) -> None:
    org = await make_org()
    r = await client.post("/v1/blueprints", json=SERVICE, headers=org.headers)
    assert r.status_code == 201, r.text
    recorder.fail = True
    writer = entities.Writer(actor="test", origin="API", datasource=None)
    with pytest.raises(RuntimeError, match="the reaction failed"):
        async with db.tenant(org.org_id) as tx:
            await entities.write(
                tx, "service", [{"identifier": "x"}], entities.WriteFlags(), writer
            )
    async with db.system() as tx:
        assert not await tx.fetchval("SELECT count(*) FROM entities WHERE org_id = $1", org.org_id)
        assert not await tx.fetchval(
            "SELECT count(*) FROM entity_events WHERE org_id = $1", org.org_id
        )


async def test_a_process_that_did_not_wire_its_reactions_cannot_write(
    make_org: OrgFactory, client: httpx.AsyncClient, db: Database
) -> None:
    org = await make_org()
    r = await client.post("/v1/blueprints", json=SERVICE, headers=org.headers)
    assert r.status_code == 201, r.text
    reactions.reset()
    try:
        writer = entities.Writer(actor="test", origin="API", datasource=None)
        with pytest.raises(RuntimeError, match="not connected"):
            async with db.tenant(org.org_id) as tx:
                await entities.write(
                    tx, "service", [{"identifier": "x"}], entities.WriteFlags(), writer
                )
    finally:
        wiring.connect()
    async with db.system() as tx:
        assert not await tx.fetchval("SELECT count(*) FROM entities WHERE org_id = $1", org.org_id)
