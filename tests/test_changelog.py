"""Changelog destinations: every entity change reaches the blueprint's webhook, signed, in
commit order per entity, retried through receiver errors, per tenant."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx

from app.config import Settings
from app.db.database import Database
from tests.conftest import Org, OrgFactory
from tests.receivers import WebhookReceiver
from tests.test_dispatch import signing_secret


def _blueprint(url: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "identifier": "service",
        "title": "Service",
        "schema": {"properties": {"tier": {"type": "string"}}},
    }
    if url is not None:
        body["changelogDestination"] = {"type": "WEBHOOK", "url": url}
    return body


async def _change(client: httpx.AsyncClient, org: Org, ident: str, tier: str) -> None:
    r = await client.post(
        "/v1/blueprints/service/entities?upsert=true",
        json={"identifier": ident, "properties": {"tier": tier}},
        headers=org.headers,
    )
    assert r.status_code in (200, 201), r.text


def _accepted(receiver: WebhookReceiver) -> list[dict[str, Any]]:
    return [d.body for d in receiver.deliveries if 200 <= d.status < 300]


async def _wait(receiver: WebhookReceiver, count: int, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while len(_accepted(receiver)) < count:
        assert time.monotonic() < deadline, f"{len(_accepted(receiver))} of {count}"
        await asyncio.sleep(0.05)


def _tiers(bodies: list[dict[str, Any]], ident: str) -> list[str | None]:
    out = []
    for body in bodies:
        if body["context"]["entityIdentifier"] != ident:
            continue
        after = body["diff"]["after"]
        out.append(after["properties"]["tier"] if after else None)
    return out


async def test_every_change_arrives_signed_and_in_order(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    with WebhookReceiver(await signing_secret(client, org)) as receiver:
        r = await client.post("/v1/blueprints", json=_blueprint(receiver.url), headers=org.headers)
        assert r.status_code == 201, r.text
        start_worker()
        for i in range(1, 6):
            await _change(client, org, "a", str(i))
            await _change(client, org, "b", str(i * 10))
        r = await client.delete("/v1/blueprints/service/entities/a", headers=org.headers)
        assert r.status_code == 200
        await _wait(receiver, 11)
        bodies = _accepted(receiver)
        assert _tiers(bodies, "a") == ["1", "2", "3", "4", "5", None]
        assert _tiers(bodies, "b") == ["10", "20", "30", "40", "50"]
        first = next(b for b in bodies if b["context"]["entityIdentifier"] == "a")
        assert first["action"] == "CREATE" and first["diff"]["before"] is None
        assert first["resourceType"] == "entity"
        assert receiver.signature_failures == 0
        assert len({d.headers["webhook-id"] for d in receiver.deliveries}) == 11


async def test_order_holds_through_receiver_errors(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    with WebhookReceiver(await signing_secret(client, org)) as receiver:
        r = await client.post("/v1/blueprints", json=_blueprint(receiver.url), headers=org.headers)
        assert r.status_code == 201
        receiver.fail_next(4, status=503)
        start_worker()
        for i in range(1, 8):
            await _change(client, org, "a", str(i))
        await _wait(receiver, 7)
        assert _tiers(_accepted(receiver), "a") == [str(i) for i in range(1, 8)]
        assert receiver.refused >= 4


async def test_a_refused_change_is_given_up_and_the_next_goes(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    start_worker: Callable[..., Settings],
    db: Database,
) -> None:
    org = await make_org()
    with WebhookReceiver(await signing_secret(client, org)) as receiver:
        r = await client.post("/v1/blueprints", json=_blueprint(receiver.url), headers=org.headers)
        assert r.status_code == 201
        receiver.fail_next(1, status=400)
        start_worker()
        await _change(client, org, "a", "1")
        await _change(client, org, "a", "2")
        await _wait(receiver, 1)
        assert _tiers(_accepted(receiver), "a") == ["2"]
        deadline = time.monotonic() + 10  # the sender records the answer after it arrived
        while True:
            async with db.system() as tx:
                states = await tx.fetch(
                    "SELECT state, last_error FROM changelog_deliveries "
                    "WHERE org_id = $1 ORDER BY id",
                    org.org_id,
                )
            if [s["state"] for s in states] != ["failed", "sending"]:
                break
            assert time.monotonic() < deadline, "the delivered change stayed `sending`"
            await asyncio.sleep(0.05)
        assert [s["state"] for s in states] == ["failed", "delivered"]
        assert "400" in states[0]["last_error"]


async def test_only_the_blueprints_own_org_is_sent(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    one, two = await make_org(), await make_org()
    with WebhookReceiver(await signing_secret(client, one)) as receiver:
        r = await client.post("/v1/blueprints", json=_blueprint(receiver.url), headers=one.headers)
        assert r.status_code == 201
        r = await client.post("/v1/blueprints", json=_blueprint(None), headers=two.headers)
        assert r.status_code == 201
        start_worker()
        await _change(client, two, "secret-of-two", "x")
        await _change(client, one, "mine", "y")
        await _wait(receiver, 1)
        await asyncio.sleep(0.5)
        idents = [b["context"]["entityIdentifier"] for b in _accepted(receiver)]
        assert idents == ["mine"]


async def test_a_slow_receiver_does_not_hold_up_another_orgs_deliveries(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    """B's 60 changes go to a receiver that answers after 2.5 s, A's one change to a prompt
    receiver: A's arrives while B's are still being sent (B holds only its own turns)."""
    a, b = await make_org(), await make_org()
    with (
        WebhookReceiver(await signing_secret(client, a)) as fast,
        WebhookReceiver(await signing_secret(client, b), delay=2.5) as slow,
    ):
        for org, receiver in ((a, fast), (b, slow)):
            r = await client.post(
                "/v1/blueprints", json=_blueprint(receiver.url), headers=org.headers
            )
            assert r.status_code == 201, r.text
        r = await client.post(
            "/v1/blueprints/service/entities/bulk",
            json={"entities": [{"identifier": f"b{i}", "properties": {}} for i in range(60)]},
            headers=b.headers,
        )
        assert r.status_code in (200, 207), r.text
        await _change(client, a, "a", "1")
        start_worker(changelog_org_concurrency=3)
        await _wait(fast, 1)
        # B's receiver has seen its org's first turns only, none of them answered yet
        # (before: a whole batch of 50 of B's was sent and waited for first).
        assert len(slow.requests) <= 6, len(slow.requests)
        assert _accepted(slow) == []
        await slow.wait_requests(6, timeout=20)
        assert len(slow.requests) < 60  # still going
