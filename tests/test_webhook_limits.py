"""Rate limits of incoming webhook events: a bucket per webhook and one per organization;
over either, 429 with Retry-After in Port's error shape and nothing stored; every event
that was taken is processed; another organization's webhooks are never held back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx

from app.config import Settings
from app.db.database import Database
from app.main import create_app
from tests.conftest import Org, OrgFactory
from tests.test_webhooks import _catalog, _create, all_done, entity, ingest_path, wait_events

WEBHOOK: dict[str, Any] = {
    "identifier": "flood",
    "title": "Flood",
    "mappings": [
        {
            "blueprint": "label",
            "entity": {"identifier": ".body.name", "title": ".body.name"},
        }
    ],
}


@asynccontextmanager
async def _api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://portolan.test") as c:
            yield c


async def _send(
    api: httpx.AsyncClient, webhook: dict[str, Any], names: list[str]
) -> dict[str, httpx.Response]:
    """The events at once (as a flooding sender would), each answer by its event's name."""
    answers = await asyncio.gather(
        *(api.post(ingest_path(webhook), json={"name": name}) for name in names)
    )
    return dict(zip(names, answers, strict=True))


def _taken(answers: dict[str, httpx.Response]) -> list[str]:
    return sorted(name for name, r in answers.items() if r.status_code == 202)


def _assert_refused(response: httpx.Response, whose: str) -> None:
    assert response.status_code == 429, response.text
    body = response.json()
    assert set(body) == {"ok", "error", "message"}, body
    assert body["ok"] is False and body["error"] == "rate_limited"
    assert whose in body["message"] and "not stored" in body["message"], body
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["x-ratelimit-remaining"] == "0"


async def _stored(db: Database, org: Org, webhook: str) -> list[str]:
    async with db.system() as tx:
        rows = await tx.fetch(
            "SELECT body->>'name' AS name FROM webhook_events WHERE org_id = $1 AND webhook = $2",
            org.org_id,
            webhook,
        )
    return sorted(row["name"] for row in rows)


async def test_a_flood_is_limited_per_webhook_and_per_org_and_every_taken_event_is_processed(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    start_worker: Callable[..., Settings],
    db: Database,
) -> None:
    a, b = await make_org(), await make_org()
    for org in (a, b):
        await _catalog(client, org)
    a_flood = await _create(client, a, WEBHOOK)
    a_other = await _create(client, a, {**WEBHOOK, "identifier": "other"})
    b_hook = await _create(client, b, WEBHOOK)  # the same identifier, in another org
    worker_settings = start_worker()
    limited = worker_settings.model_copy(
        update={
            "webhook_rate_limit_per_webhook": 5,
            "webhook_rate_limit_per_org": 8,
            # No token comes back during the test.
            "webhook_rate_limit_period_seconds": 3600,
        }
    )
    async with _api(limited) as api:
        # A floods one webhook: five are taken, the rest refused and not stored.
        flood = await _send(api, a_flood, [f"a-flood-{i}" for i in range(30)])
        taken_flood = _taken(flood)
        assert len(taken_flood) == 5, {n: r.status_code for n, r in flood.items()}
        for name, response in flood.items():
            if name not in taken_flood:
                _assert_refused(response, "webhook 'flood'")
        assert all("x-ratelimit-limit" in flood[name].headers for name in taken_flood)

        # Another org's webhook (same identifier) takes its events all the same.
        other_org = await _send(api, b_hook, [f"b-{i}" for i in range(5)])
        assert _taken(other_org) == sorted(other_org), {n: r.text for n, r in other_org.items()}

        # A's other webhook has its own bucket, but A as a whole is held to 8: the flood's
        # refused events spent none of A's tokens, so 8 - 5 = 3 are taken.
        rest = await _send(api, a_other, [f"a-other-{i}" for i in range(5)])
        taken_rest = _taken(rest)
        assert len(taken_rest) == 3, {n: r.status_code for n, r in rest.items()}
        for name, response in rest.items():
            if name not in taken_rest:
                _assert_refused(response, "this organization's webhooks")

        # Exactly the events that were taken are stored, and every one is processed.
        assert await _stored(db, a, "flood") == taken_flood
        assert await _stored(db, a, "other") == taken_rest
        assert await _stored(db, b, "flood") == sorted(other_org)
        for org, identifier, count in ((a, "flood", 5), (a, "other", 3), (b, "flood", 5)):
            events = await wait_events(api, org, identifier, all_done(count))
            assert all(e["status"] == "processed" for e in events), events
        for org, names in ((a, taken_flood + taken_rest), (b, sorted(other_org))):
            for name in names:
                assert (await entity(api, org, "label", name)).status_code == 200, name
        refused = [n for n in [*flood, *rest] if n not in taken_flood + taken_rest]
        for name in refused:
            assert (await entity(api, a, "label", name)).status_code == 404, name


async def test_refused_requests_spend_no_tokens(
    client: httpx.AsyncClient, make_org: OrgFactory, fresh_settings: Callable[..., Settings]
) -> None:
    # Forged requests to a signed webhook (401) are refused before the limit: someone who
    # knows the URL but not the secret cannot use up the sender's events.
    org = await make_org()
    await _catalog(client, org)
    signed = await _create(
        client,
        org,
        {
            **WEBHOOK,
            "security": {
                "secret": "s3cret-token",
                "signatureHeaderName": "X-Token",
                "signatureAlgorithm": "plain",
            },
        },
    )
    limited = fresh_settings(
        webhook_rate_limit_per_webhook=3,
        webhook_rate_limit_per_org=3,
        webhook_rate_limit_period_seconds=3600,
    )
    async with _api(limited) as api:
        for _ in range(10):
            r = await api.post(ingest_path(signed), json={"name": "x"}, headers={"X-Token": "no"})
            assert r.status_code == 401, r.text
        for i in range(3):
            r = await api.post(
                ingest_path(signed), json={"name": f"n{i}"}, headers={"X-Token": "s3cret-token"}
            )
            assert r.status_code == 202, r.text
        r = await api.post(
            ingest_path(signed), json={"name": "n3"}, headers={"X-Token": "s3cret-token"}
        )
        _assert_refused(r, "webhook 'flood'")
