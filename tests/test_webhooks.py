"""Incoming webhooks: Port's definition shapes, signed ingest (GitHub sha256, GitLab plain
token), body limits, replays, mappings applied by the worker (itemsToParse, filter,
delete), jq errors recorded on the event, exactly-once processing, batches of events
(arrival order, errors kept to their event, failed batches, poisoned events), and
tenancy."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.db.database import Database
from app.webhooks import processing
from app.webhooks.definitions import template_of
from tests.conftest import Org, OrgFactory

GITHUB_SECRET = "gh-webhook-secret-0123456789"
GITLAB_TOKEN = "gl-plain-token-abcdef"

BLUEPRINTS: list[dict[str, Any]] = [
    {
        "identifier": "repository",
        "title": "Repository",
        "schema": {"properties": {"url": {"type": "string"}}},
    },
    {
        "identifier": "pullRequest",
        "title": "Pull request",
        "schema": {
            "properties": {
                "state": {"type": "string"},
                "number": {"type": "number"},
                "author": {"type": "string"},
            }
        },
        "relations": {"repository": {"target": "repository", "required": False, "many": False}},
    },
    {
        "identifier": "label",
        "title": "Label",
        "schema": {"properties": {"color": {"type": "string"}, "rank": {"type": "number"}}},
    },
]

GITHUB_WEBHOOK: dict[str, Any] = {
    "identifier": "github",
    "title": "GitHub",
    "description": "pull requests and their labels",
    "icon": "Github",
    "mappings": [
        {
            "blueprint": "pullRequest",
            "filter": '.headers["x-github-event"] == "pull_request"',
            "entity": {
                "identifier": ".body.pull_request.id | tostring",
                "title": ".body.pull_request.title",
                "properties": {
                    "state": ".body.pull_request.state",
                    "number": ".body.pull_request.number",
                    "author": ".body.pull_request.user.login",
                },
                "relations": {"repository": ".body.repository.name"},
            },
        },
        {
            "blueprint": "label",
            "operation": {"type": "create"},
            "filter": '.headers["x-github-event"] == "pull_request"',
            "itemsToParse": ".body.pull_request.labels",
            "entity": {
                "identifier": ".item.name",
                "title": '.item.name + " (" + .body.repository.name + ")"',
                "properties": {"color": ".item.color"},
            },
        },
    ],
    "security": {
        "secret": GITHUB_SECRET,
        "signatureHeaderName": "X-Hub-Signature-256",
        "signatureAlgorithm": "sha256",
        "signaturePrefix": "sha256=",
        "requestIdentifierPath": '.headers["x-github-delivery"]',
    },
}


def pull_request_payload(action: str = "opened", number: int = 42) -> dict[str, Any]:
    return {
        "action": action,
        "number": number,
        "pull_request": {
            "id": 900000 + number,
            "number": number,
            "state": "open" if action == "opened" else "closed",
            "title": "Add webhooks",
            "user": {"login": "octocat"},
            "labels": [
                {"id": 1, "name": "enhancement", "color": "a2eeef"},
                {"id": 2, "name": "backend", "color": "0e8a16"},
            ],
        },
        "repository": {"id": 7, "name": "portolan", "full_name": "acme/portolan"},
    }


def github_headers(raw: bytes, delivery: str, secret: str = GITHUB_SECRET) -> dict[str, str]:
    digest = hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
    return {
        "Content-Type": "application/json",
        "X-GitHub-Event": "pull_request",
        "X-GitHub-Delivery": delivery,
        "X-Hub-Signature-256": "sha256=" + digest,
    }


def encode(payload: Any) -> bytes:
    return json.dumps(payload).encode()


async def _catalog(client: httpx.AsyncClient, org: Org) -> None:
    for blueprint in BLUEPRINTS:
        r = await client.post("/v1/blueprints", json=blueprint, headers=org.headers)
        assert r.status_code == 201, r.text


async def _create(client: httpx.AsyncClient, org: Org, body: dict[str, Any]) -> dict[str, Any]:
    r = await client.post("/v1/webhooks", json=body, headers=org.headers)
    assert r.status_code == 201, r.text
    webhook: dict[str, Any] = r.json()["integration"]
    return webhook


def ingest_path(webhook: dict[str, Any]) -> str:
    return f"/v1/webhooks/ingest/{webhook['webhookKey']}"


async def wait_events(
    client: httpx.AsyncClient,
    org: Org,
    identifier: str,
    done: Callable[[list[dict[str, Any]]], bool],
    within: float = 20.0,
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + within
    events: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        r = await client.get(f"/v1/webhooks/{identifier}/events", headers=org.headers)
        assert r.status_code == 200, r.text
        events = r.json()["events"]
        if done(events):
            return events
        await asyncio.sleep(0.1)
    raise AssertionError(f"the events of {identifier} did not get there: {events}")


def all_done(count: int) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda events: len(events) == count and all(e["status"] != "pending" for e in events)


async def entity(
    client: httpx.AsyncClient, org: Org, blueprint: str, identifier: str
) -> httpx.Response:
    return await client.get(
        f"/v1/blueprints/{blueprint}/entities/{identifier}", headers=org.headers
    )


async def stored_events(db: Database, org: Org, webhook: str) -> int:
    async with db.system() as tx:
        return int(
            await tx.fetchval(
                "SELECT count(*) FROM webhook_events WHERE org_id = $1 AND webhook = $2",
                org.org_id,
                webhook,
            )
        )


# ---------------------------------------------------------------------------------------
# Definitions


async def test_webhooks_in_ports_shapes(
    client: httpx.AsyncClient, make_org: OrgFactory, settings: Settings, db: Database
) -> None:
    org = await make_org()
    await _catalog(client, org)
    r = await client.post("/v1/webhooks", json=GITHUB_WEBHOOK, headers=org.headers)
    assert r.status_code == 201, r.text
    assert GITHUB_SECRET not in r.text
    body = r.json()
    assert body["ok"] is True
    webhook = body["integration"]
    assert webhook["identifier"] == "github" and webhook["title"] == "GitHub"
    assert webhook["enabled"] is True and webhook["integrationType"] == "custom"
    assert webhook["mappings"] == GITHUB_WEBHOOK["mappings"]
    assert webhook["security"] == {
        "signatureHeaderName": "X-Hub-Signature-256",
        "signatureAlgorithm": "sha256",
        "signaturePrefix": "sha256=",
        "requestIdentifierPath": '.headers["x-github-delivery"]',
        "secretSet": True,
    }
    key = webhook["webhookKey"]
    assert len(key) >= 40
    assert webhook["url"] == f"{settings.public_url.rstrip('/')}/v1/webhooks/ingest/{key}"
    for field in ("createdAt", "createdBy", "updatedAt", "updatedBy"):
        assert webhook[field]
    # The secret is stored encrypted.
    async with db.system() as tx:
        stored = await tx.fetchval(
            "SELECT secret_encrypted FROM webhooks WHERE org_id = $1", org.org_id
        )
    assert stored and GITHUB_SECRET not in stored

    r = await client.post("/v1/webhooks", json=GITHUB_WEBHOOK, headers=org.headers)
    assert r.status_code == 409 and r.json()["ok"] is False

    r = await client.get("/v1/webhooks/github", headers=org.headers)
    assert r.status_code == 200 and r.json()["integration"]["webhookKey"] == key
    assert GITHUB_SECRET not in r.text
    r = await client.get("/v1/webhooks", headers=org.headers)
    assert r.status_code == 200
    assert [w["identifier"] for w in r.json()["integrations"]] == ["github"]
    assert GITHUB_SECRET not in r.text

    # Written back as read, the secret stays (the key too).
    read = r.json()["integrations"][0]
    r = await client.put("/v1/webhooks/github", json={**read, "title": "GH"}, headers=org.headers)
    assert r.status_code == 200, r.text
    updated = r.json()["integration"]
    assert updated["title"] == "GH" and updated["security"]["secretSet"] is True
    assert updated["webhookKey"] == key

    r = await client.patch("/v1/webhooks/github", json={"enabled": False}, headers=org.headers)
    assert r.status_code == 200, r.text
    patched = r.json()["integration"]
    assert patched["enabled"] is False and patched["title"] == "GH"
    assert patched["security"]["secretSet"] is True and patched["mappings"]

    # Replaced without signature settings: no secret any more.
    r = await client.put(
        "/v1/webhooks/github", json={"title": "Open", "mappings": []}, headers=org.headers
    )
    assert r.status_code == 200, r.text
    assert r.json()["integration"]["security"] == {"secretSet": False}
    assert r.json()["integration"]["enabled"] is True

    # A body naming another identifier than the URL, or an unknown webhook.
    r = await client.put(
        "/v1/webhooks/github", json={"identifier": "other", "title": "x"}, headers=org.headers
    )
    assert r.status_code == 422 and r.json()["ok"] is False
    for method in ("GET", "PUT", "PATCH", "DELETE"):
        r = await client.request(
            method, "/v1/webhooks/nope", json={"title": "x"}, headers=org.headers
        )
        assert r.status_code == 404 and r.json()["error"] == "not_found", (method, r.text)

    r = await client.delete("/v1/webhooks/github", headers=org.headers)
    assert r.status_code == 200 and r.json() == {"ok": True}
    r = await client.get("/v1/webhooks/github", headers=org.headers)
    assert r.status_code == 404


async def test_the_secret_never_appears_in_logs(
    client: httpx.AsyncClient, make_org: OrgFactory, caplog: Any
) -> None:
    org = await make_org()
    await _catalog(client, org)
    caplog.set_level("DEBUG")
    webhook = await _create(client, org, GITHUB_WEBHOOK)
    raw = encode(pull_request_payload())
    await client.post(ingest_path(webhook), content=raw, headers=github_headers(raw, "l-1"))
    await client.post(
        ingest_path(webhook), content=raw, headers={"X-Hub-Signature-256": GITHUB_SECRET}
    )
    await client.patch(
        "/v1/webhooks/github", json={"security": {"secret": "bad"}}, headers=org.headers
    )
    assert GITHUB_SECRET not in caplog.text


async def test_generated_identifier_and_defaults(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    webhook = await _create(client, org, {"title": "Anything"})
    assert 0 < len(webhook["identifier"]) <= 30
    assert webhook["mappings"] == [] and webhook["security"] == {"secretSet": False}
    assert webhook["enabled"] is True and "description" not in webhook


async def test_definitions_that_could_not_work_are_422s_naming_each_problem(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _catalog(client, org)
    bad = {
        "identifier": "x" * 31,
        "title": "t" * 31,
        "enabled": "yes",
        "integrationType": "other",
        "extra": 1,
        "mappings": [
            {
                "blueprint": "label",
                "filter": ".body | ",
                "entity": {"identifier": ".item.name", "properties": {"color": "[.x"}},
            },
            {"blueprint": "nope", "entity": {"identifier": ".x"}},
            {"blueprint": "label", "entity": {"title": ".x"}},
            {"blueprint": "label", "operation": "upsert", "entity": {"identifier": ".x"}},
            {
                "blueprint": "label",
                "operation": "delete",
                "entity": {"identifier": ".x", "title": ".y"},
            },
            {"blueprint": "label", "itemsToParse": 3, "entity": {"identifier": {"rules": []}}},
        ],
        "security": {"signatureAlgorithm": "md5", "color": "red"},
    }
    r = await client.post("/v1/webhooks", json=bad, headers=org.headers)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["ok"] is False and body["error"] == "invalid_request"
    pointers = {p["pointer"] for p in body["details"]}
    assert {
        "",
        "/identifier",
        "/title",
        "/enabled",
        "/integrationType",
        "/mappings/0/filter",
        "/mappings/0/entity/properties/color",
        "/mappings/2/entity/identifier",
        "/mappings/3/operation",
        "/mappings/4/entity",
        "/mappings/5/itemsToParse",
        "/mappings/5/entity/identifier",
        "/security",
        "/security/signatureAlgorithm",
    } <= pointers, pointers
    messages = {p["pointer"]: p["message"] for p in body["details"]}
    assert "jq" in messages["/mappings/0/filter"]

    # The shape is right but a blueprint does not exist.
    r = await client.post(
        "/v1/webhooks",
        json={"title": "t", "mappings": [{"blueprint": "nope", "entity": {"identifier": ".x"}}]},
        headers=org.headers,
    )
    assert r.status_code == 422
    assert r.json()["details"] == [
        {"pointer": "/mappings/0/blueprint", "message": "blueprint 'nope' was not found"}
    ]

    # Signature settings that do not go together.
    for security, pointer in (
        ({"signatureAlgorithm": "sha256", "signatureHeaderName": "X-Sig"}, "/security/secret"),
        ({"secret": "s"}, "/security/signatureAlgorithm"),
        ({"secret": "s", "signatureAlgorithm": "plain"}, "/security/signatureHeaderName"),
        ({"signatureHeaderName": "bad header"}, "/security/signatureHeaderName"),
    ):
        r = await client.post(
            "/v1/webhooks", json={"title": "t", "security": security}, headers=org.headers
        )
        assert r.status_code == 422, (security, r.text)
        assert pointer in {p["pointer"] for p in r.json()["details"]}, (security, r.text)

    # Not an object at all.
    r = await client.post("/v1/webhooks", json=[1], headers=org.headers)
    assert r.status_code == 422 and r.json()["ok"] is False
    r = await client.get("/v1/webhooks", headers=org.headers)
    assert r.json()["integrations"] == []


def test_jq_with_closing_braces_survives_the_template_wrapper() -> None:
    import jq

    for expression, data in (
        ("{a: {b: .x}}", {"x": 1}),
        ('.x | "}}\\(.)}}"', {"x": 1}),
        ('.["}}"]', {"}}": 5}),
        (".x # note }}\n | . + 1", {"x": 1}),
    ):
        wrapped = template_of(expression)
        inner = wrapped[3:-3]
        assert "}}" not in inner, wrapped
        assert jq.compile(inner).input_value(data).first() == (
            jq.compile(expression).input_value(data).first()
        )


# ---------------------------------------------------------------------------------------
# Ingest and processing


async def test_github_pull_request_signed_with_sha256_maps_to_entities(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    start_worker: Callable[..., Settings],
    db: Database,
) -> None:
    org = await make_org()
    await _catalog(client, org)
    webhook = await _create(client, org, GITHUB_WEBHOOK)
    start_worker()
    raw = encode(pull_request_payload())
    r = await client.post(
        ingest_path(webhook) + "?source=github",
        content=raw,
        headers={**github_headers(raw, "delivery-1"), "Authorization": "Bearer not-kept"},
    )
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["ok"] is True and accepted["replayed"] is False and accepted["eventId"]

    events = await wait_events(client, org, "github", all_done(1))
    event = events[0]
    assert event["id"] == accepted["eventId"] and event["requestId"] == "delivery-1"
    assert event["status"] == "processed", event
    assert event["processedAt"] and event["receivedAt"] and event["outcome"]["errors"] == []
    written = {
        (e["blueprint"], e["identifier"], e["operation"]) for e in event["outcome"]["entities"]
    }
    assert written == {
        ("pullRequest", "900042", "create"),
        ("label", "enhancement", "create"),
        ("label", "backend", "create"),
    }
    items = sorted(e["item"] for e in event["outcome"]["entities"] if e["blueprint"] == "label")
    assert items == [0, 1]

    r = await entity(client, org, "pullRequest", "900042")
    assert r.status_code == 200, r.text
    pr = r.json()["entity"]
    assert pr["title"] == "Add webhooks"
    assert pr["properties"] == {"state": "open", "number": 42, "author": "octocat"}
    assert pr["relations"] == {"repository": "portolan"}
    assert pr["createdBy"] == "webhook:github"
    # The related repository did not exist: it was created for the relation.
    r = await entity(client, org, "repository", "portolan")
    assert r.status_code == 200
    r = await entity(client, org, "label", "backend")
    assert r.json()["entity"]["properties"] == {"color": "0e8a16"}
    assert r.json()["entity"]["title"] == "backend (portolan)"

    # What the mappings saw: no credentials, no signature; the query string.
    async with db.system() as tx:
        row = await tx.fetchrow(
            "SELECT headers, query_params FROM webhook_events WHERE org_id = $1", org.org_id
        )
    assert row is not None
    assert "authorization" not in row["headers"]
    assert "x-hub-signature-256" not in row["headers"]
    assert row["headers"]["x-github-event"] == "pull_request"
    assert row["query_params"] == {"source": "github"}

    # A later event merges into the same entities (upsert + merge).
    raw = encode(pull_request_payload("closed"))
    r = await client.post(
        ingest_path(webhook), content=raw, headers=github_headers(raw, "delivery-2")
    )
    assert r.status_code == 202, r.text
    events = await wait_events(client, org, "github", all_done(2))
    assert events[0]["requestId"] == "delivery-2"  # newest first
    assert {e["operation"] for e in events[0]["outcome"]["entities"]} == {"update"}
    r = await entity(client, org, "pullRequest", "900042")
    assert r.json()["entity"]["properties"]["state"] == "closed"


async def test_gitlab_payload_with_a_plain_token(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    await _catalog(client, org)
    webhook = await _create(
        client,
        org,
        {
            "identifier": "gitlab",
            "title": "GitLab",
            "mappings": [
                {
                    "blueprint": "pullRequest",
                    "filter": '.body.object_kind == "merge_request"',
                    "entity": {
                        "identifier": '"mr-" + (.body.object_attributes.iid | tostring)',
                        "title": ".body.object_attributes.title",
                        "properties": {"state": ".body.object_attributes.state"},
                    },
                }
            ],
            "security": {
                "secret": GITLAB_TOKEN,
                "signatureHeaderName": "X-Gitlab-Token",
                "signatureAlgorithm": "plain",
            },
        },
    )
    start_worker()
    payload = {
        "object_kind": "merge_request",
        "object_attributes": {"iid": 5, "title": "Fix it", "state": "opened"},
    }
    r = await client.post(
        ingest_path(webhook), json=payload, headers={"X-Gitlab-Token": "wrong-token"}
    )
    assert r.status_code == 401 and r.json()["error"] == "invalid_signature"
    r = await client.post(
        ingest_path(webhook), json=payload, headers={"X-Gitlab-Token": GITLAB_TOKEN}
    )
    assert r.status_code == 202, r.text
    events = await wait_events(client, org, "gitlab", all_done(1))
    assert events[0]["status"] == "processed", events
    assert events[0]["requestId"] is None
    r = await entity(client, org, "pullRequest", "mr-5")
    assert r.status_code == 200 and r.json()["entity"]["properties"] == {"state": "opened"}


async def test_unsigned_and_mis_signed_requests_are_refused_and_not_stored(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _catalog(client, org)
    webhook = await _create(client, org, GITHUB_WEBHOOK)
    raw = encode(pull_request_payload())
    good = github_headers(raw, "d-1")
    cases: list[dict[str, Any]] = [
        {k: v for k, v in good.items() if k != "X-Hub-Signature-256"},  # unsigned
        {**good, "X-Hub-Signature-256": good["X-Hub-Signature-256"][:-2] + "00"},
        {**good, "X-Hub-Signature-256": good["X-Hub-Signature-256"].removeprefix("sha256=")},
        github_headers(raw, "d-1", secret="another-secret"),
        {**good, "X-Hub-Signature-256": "sha256=\u00e9".encode("latin-1")},
    ]
    for headers in cases:
        r = await client.post(ingest_path(webhook), content=raw, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["ok"] is False and r.json()["error"] == "invalid_signature"
    # Signed over other bytes than those sent.
    r = await client.post(ingest_path(webhook), content=raw + b" ", headers=good)
    assert r.status_code == 401
    assert await stored_events(db, org, "github") == 0

    # The signature as base64, and in upper-case hex, are accepted too.
    import base64

    digest = hmac.new(GITHUB_SECRET.encode(), raw, hashlib.sha256).digest()
    for signature in (base64.b64encode(digest).decode(), digest.hex().upper()):
        r = await client.post(
            ingest_path(webhook),
            content=raw,
            headers={
                **good,
                "X-GitHub-Delivery": signature[:8],
                "X-Hub-Signature-256": "sha256=" + signature,
            },
        )
        assert r.status_code == 202, r.text
    assert await stored_events(db, org, "github") == 2


async def test_a_replayed_request_is_accepted_once_and_applied_once(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    start_worker: Callable[..., Settings],
    db: Database,
) -> None:
    org = await make_org()
    await _catalog(client, org)
    webhook = await _create(client, org, GITHUB_WEBHOOK)
    raw = encode(pull_request_payload())
    headers = github_headers(raw, "same-delivery")
    first = await client.post(ingest_path(webhook), content=raw, headers=headers)
    again = await client.post(ingest_path(webhook), content=raw, headers=headers)
    assert first.status_code == 202 and again.status_code == 202, again.text
    assert first.json()["replayed"] is False and again.json()["replayed"] is True
    assert again.json()["eventId"] == first.json()["eventId"]
    start_worker()
    events = await wait_events(client, org, "github", all_done(1))
    assert events[0]["status"] == "processed"
    # Replayed after processing: still the one event.
    r = await client.post(ingest_path(webhook), content=raw, headers=headers)
    assert r.status_code == 202 and r.json()["replayed"] is True
    assert await stored_events(db, org, "github") == 1
    async with db.system() as tx:
        writes = await tx.fetchval(
            "SELECT count(*) FROM entity_events WHERE org_id = $1 AND blueprint = 'pullRequest'",
            org.org_id,
        )
    assert writes == 1


async def test_an_event_is_applied_once_when_passes_run_side_by_side(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _catalog(client, org)
    webhook = await _create(client, org, GITHUB_WEBHOOK)
    for number in (1, 2, 3):
        raw = encode(pull_request_payload(number=number))
        r = await client.post(
            ingest_path(webhook), content=raw, headers=github_headers(raw, f"d-{number}")
        )
        assert r.status_code == 202
    counts = await asyncio.gather(
        *(processing.process_webhook(db, org.org_id, "github") for _ in range(4))
    )
    assert sum(counts) == 3
    assert await processing.process_webhook(db, org.org_id, "github") == 0
    async with db.system() as tx:
        rows = await tx.fetch(
            "SELECT status, attempts FROM webhook_events WHERE org_id = $1", org.org_id
        )
        writes = await tx.fetchval(
            "SELECT count(*) FROM entity_events WHERE org_id = $1 AND blueprint = 'pullRequest'",
            org.org_id,
        )
    assert [(r["status"], r["attempts"]) for r in rows] == [("processed", 1)] * 3
    assert writes == 3


async def test_jq_and_entity_errors_are_recorded_on_the_event_never_a_500(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    await _catalog(client, org)
    webhook = await _create(
        client,
        org,
        {
            "identifier": "labels",
            "title": "Labels",
            "mappings": [
                {
                    "blueprint": "label",
                    "itemsToParse": ".body.labels",
                    "entity": {
                        "identifier": ".item.name",
                        "properties": {
                            "color": ".item.color | ascii_downcase",
                            "rank": ".item.rank",
                        },
                    },
                },
                {"blueprint": "label", "entity": {"identifier": ".body.count"}},
                {
                    "blueprint": "label",
                    "itemsToParse": ".body.count",
                    "entity": {"identifier": ".x"},
                },
                {"blueprint": "label", "filter": ".body.count", "entity": {"identifier": '"f"'}},
                {
                    "blueprint": "label",
                    "entity": {
                        "identifier": '"solo"',
                        "properties": {"color": "{a: {b: 1}} | .a.b | tostring"},
                    },
                },
            ],
        },
    )
    start_worker()
    payload = {
        "count": 3,
        "labels": [
            {"name": "good", "color": "ABC", "rank": 1},
            {"name": "bad-color", "color": 7, "rank": 2},
            {"name": "bad-rank", "color": "fff", "rank": "high"},
            {"name": "also-good", "color": "DEF"},
        ],
    }
    r = await client.post(ingest_path(webhook), json=payload)
    assert r.status_code == 202, r.text
    events = await wait_events(client, org, "labels", all_done(1))
    event = events[0]
    assert event["status"] == "failed"
    written = sorted(e["identifier"] for e in event["outcome"]["entities"])
    assert written == ["also-good", "good", "solo"]
    errors = {(e["mapping"], e["item"]): e for e in event["outcome"]["errors"]}
    jq_error = errors[(0, 1)]
    assert jq_error["pointer"] == "/mappings/0/entity/properties/color"
    assert jq_error["message"] == "jq error: explode input must be a string"
    entity_error = errors[(0, 2)]
    assert entity_error["identifier"] == "bad-rank" and entity_error["blueprint"] == "label"
    assert "rank" in entity_error["message"]
    assert errors[(1, None)]["pointer"] == "/mappings/1/entity/identifier"
    assert "tostring" in errors[(1, None)]["message"]
    assert "array" in errors[(2, None)]["message"]
    assert errors[(3, None)]["pointer"] == "/mappings/3/filter"
    assert "true or false" in errors[(3, None)]["message"]
    r = await entity(client, org, "label", "solo")
    assert r.json()["entity"]["properties"] == {"color": "1"}


async def test_a_false_filter_writes_nothing(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    await _catalog(client, org)
    webhook = await _create(
        client,
        org,
        {
            "identifier": "opened-only",
            "title": "Opened only",
            "mappings": [
                {
                    "blueprint": "pullRequest",
                    "filter": '.body.action == "opened"',
                    # Fails on this payload, but the filter drops the event first.
                    "entity": {"identifier": ".body.pull_request.id | ascii_downcase"},
                }
            ],
        },
    )
    start_worker()
    r = await client.post(ingest_path(webhook), json=pull_request_payload("closed"))
    assert r.status_code == 202
    events = await wait_events(client, org, "opened-only", all_done(1))
    assert events[0]["status"] == "processed"
    assert events[0]["outcome"] == {"entities": [], "errors": []}
    r = await client.get("/v1/blueprints/pullRequest/entities", headers=org.headers)
    assert r.json()["entities"] == []


async def test_a_delete_mapping_deletes_the_entities(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    await _catalog(client, org)
    for name in ("stale", "old", "kept"):
        r = await client.post(
            "/v1/blueprints/label/entities", json={"identifier": name}, headers=org.headers
        )
        assert r.status_code in (200, 201), r.text
    webhook = await _create(
        client,
        org,
        {
            "identifier": "cleanup",
            "title": "Cleanup",
            "mappings": [
                {
                    "blueprint": "label",
                    "operation": {"type": "delete", "deleteDependents": True},
                    "itemsToParse": ".body.removed",
                    "entity": {"identifier": ".item"},
                }
            ],
        },
    )
    start_worker()
    r = await client.post(ingest_path(webhook), json={"removed": ["stale", "old", "never-was"]})
    assert r.status_code == 202
    events = await wait_events(client, org, "cleanup", all_done(1))
    assert events[0]["status"] == "processed", events
    assert sorted((e["identifier"], e["operation"]) for e in events[0]["outcome"]["entities"]) == [
        ("old", "delete"),
        ("stale", "delete"),
    ]
    assert (await entity(client, org, "label", "stale")).status_code == 404
    assert (await entity(client, org, "label", "kept")).status_code == 200


async def test_bodies_the_ingest_refuses(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    webhook = await _create(client, org, {"identifier": "open", "title": "Open"})
    path = ingest_path(webhook)
    big = encode({"blob": "x" * (600 * 1024)})
    r = await client.post(path, content=big)
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 64 * 1024):
            yield big[start : start + 64 * 1024]

    # Streamed without a Content-Length.
    r = await client.post(path, content=chunks())
    assert r.status_code == 413, r.text
    # A Content-Length that understates the body.
    r = await client.post(path, content=chunks(), headers={"Content-Length": "10"})
    assert r.status_code == 413, r.text
    for raw in (b"", b"not json", b'{"a": NaN}', b'{"a": 1e999}', b"[" * 150 + b"]" * 150):
        r = await client.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (raw[:20], r.text)
        assert r.json()["ok"] is False
    r = await client.post(path, content=b'{"a": "nul\\u0000"}')
    assert r.status_code == 400 and "NUL" in r.json()["message"]
    r = await client.post(path + "?q=%00", json={})
    assert r.status_code == 400
    r = await client.post(path[:-3] + "abc", json={})
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = await client.post("/v1/webhooks/ingest/short", json={})
    assert r.status_code == 404
    assert await stored_events(db, org, "open") == 0
    # A body just under the limit, and a JSON scalar, are fine.
    r = await client.post(path, content=encode({"blob": "x" * (500 * 1024)}))
    assert r.status_code == 202, r.text
    r = await client.post(path, content=b"null")
    assert r.status_code == 202, r.text
    r = await client.post(path, content=b'{"big": ' + b"9" * 4000 + b', "tiny": 1e-400}')
    assert r.status_code == 202, r.text
    assert await stored_events(db, org, "open") == 3

    r = await client.patch("/v1/webhooks/open", json={"enabled": False}, headers=org.headers)
    assert r.status_code == 200
    r = await client.post(path, json={"a": 1})
    assert r.status_code == 409 and r.json()["error"] == "webhook_disabled"
    assert await stored_events(db, org, "open") == 3


async def test_a_request_identifier_that_fails_is_recorded(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    await _catalog(client, org)
    webhook = await _create(
        client,
        org,
        {
            "identifier": "ids",
            "title": "Ids",
            "mappings": [{"blueprint": "label", "entity": {"identifier": ".body.name"}}],
            "security": {"requestIdentifierPath": ".body.id | tonumber"},
        },
    )
    start_worker()
    r = await client.post(ingest_path(webhook), json={"id": "x1", "name": "n1"})
    assert r.status_code == 202
    r = await client.post(ingest_path(webhook), json={"id": "x1", "name": "n1"})
    assert r.status_code == 202 and r.json()["replayed"] is False  # no identifier: no dedup
    events = await wait_events(client, org, "ids", all_done(2))
    for event in events:
        assert event["status"] == "failed" and event["requestId"] is None
        [error] = event["outcome"]["errors"]
        assert error["pointer"] == "/security/requestIdentifierPath"
        assert "jq error" in error["message"]
        assert [e["identifier"] for e in event["outcome"]["entities"]] == ["n1"]


async def test_events_wait_when_the_queue_is_unreachable(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    start_worker: Callable[..., Settings],
    app: FastAPI,
) -> None:
    class Down:
        async def enqueue_job(self, *args: Any, **kwargs: Any) -> None:
            raise ConnectionError("redis is down")

    org = await make_org()
    await _catalog(client, org)
    webhook = await _create(
        client,
        org,
        {
            "identifier": "q",
            "title": "Q",
            "mappings": [{"blueprint": "label", "entity": {"identifier": ".body.name"}}],
        },
    )
    previous = getattr(app.state, "webhook_queue", None)
    app.state.webhook_queue = Down()
    try:
        r = await client.post(ingest_path(webhook), json={"name": "queued"})
        assert r.status_code == 202, r.text
    finally:
        app.state.webhook_queue = previous
    start_worker()
    events = await wait_events(client, org, "q", all_done(1))
    assert events[0]["status"] == "processed"


async def test_an_event_that_keeps_failing_is_marked_failed(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    webhook = await _create(client, org, {"identifier": "poison", "title": "Poison"})
    r = await client.post(ingest_path(webhook), json={})
    event_id = r.json()["eventId"]
    for _ in range(processing.MAX_ATTEMPTS):
        await processing._record_failure(db, org.org_id, event_id, RuntimeError("boom"))
    r = await client.get("/v1/webhooks/poison/events", headers=org.headers)
    [event] = r.json()["events"]
    assert event["status"] == "failed" and event["attempts"] == processing.MAX_ATTEMPTS
    assert "RuntimeError" in event["outcome"]["errors"][0]["message"]


async def test_events_are_listed_newest_first_with_a_limit(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    webhook = await _create(client, org, {"identifier": "many", "title": "Many"})
    ids = []
    for n in range(3):
        r = await client.post(ingest_path(webhook), json={"n": n})
        ids.append(r.json()["eventId"])
    r = await client.get("/v1/webhooks/many/events", params={"limit": 2}, headers=org.headers)
    assert r.status_code == 200
    assert [e["id"] for e in r.json()["events"]] == [ids[2], ids[1]]
    for bad in (0, 101, "x"):
        r = await client.get("/v1/webhooks/many/events", params={"limit": bad}, headers=org.headers)
        assert r.status_code == 422 and r.json()["ok"] is False
    r = await client.get("/v1/webhooks/many/events")
    assert r.status_code == 401


async def test_prune_deletes_old_processed_events_only(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    webhook = await _create(client, org, {"identifier": "old", "title": "Old"})
    for n in range(3):
        r = await client.post(ingest_path(webhook), json={"n": n})
        assert r.status_code == 202
    async with db.system() as tx:
        await tx.execute(
            "UPDATE webhook_events SET received_at = now() - interval '30 days', "
            "status = CASE WHEN body->>'n' = '0' THEN 'pending' ELSE 'processed' END "
            "WHERE org_id = $1",
            org.org_id,
        )
    await processing.prune(db, 7)
    async with db.system() as tx:
        left = await tx.fetch("SELECT status FROM webhook_events WHERE org_id = $1", org.org_id)
    assert [r["status"] for r in left] == ["pending"]


# ---------------------------------------------------------------------------------------
# Tenancy


async def test_tenants_never_see_or_change_each_others_webhooks(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    start_worker: Callable[..., Settings],
    db: Database,
) -> None:
    a = await make_org()
    b = await make_org()
    await _catalog(client, a)
    await _catalog(client, b)
    webhook = await _create(client, a, GITHUB_WEBHOOK)
    raw = encode(pull_request_payload())
    r = await client.post(ingest_path(webhook), content=raw, headers=github_headers(raw, "x-1"))
    assert r.status_code == 202

    # B reaches nothing of A's: not the webhook, not its events.
    r = await client.get("/v1/webhooks", headers=b.headers)
    assert r.json()["integrations"] == []
    r = await client.get("/v1/webhooks/github", headers=b.headers)
    assert r.status_code == 404
    r = await client.get("/v1/webhooks/github/events", headers=b.headers)
    assert r.status_code == 404
    r = await client.put("/v1/webhooks/github", json={"title": "Mine"}, headers=b.headers)
    assert r.status_code == 404
    r = await client.patch("/v1/webhooks/github", json={"enabled": False}, headers=b.headers)
    assert r.status_code == 404
    r = await client.delete("/v1/webhooks/github", headers=b.headers)
    assert r.status_code == 404

    # B may use the same identifier; each org's key writes into its own catalog only.
    other = await _create(client, b, {**GITHUB_WEBHOOK, "security": {}})
    assert other["webhookKey"] != webhook["webhookKey"]
    start_worker()
    await wait_events(client, a, "github", all_done(1))
    assert (await entity(client, a, "pullRequest", "900042")).status_code == 200
    assert (await entity(client, b, "pullRequest", "900042")).status_code == 404
    r = await client.get("/v1/webhooks/github/events", headers=b.headers)
    assert r.json()["events"] == []

    # A's key with B's org in front of it, or B's key: never A's webhook.
    forged = other["webhookKey"][:22] + webhook["webhookKey"][22:]
    r = await client.post(f"/v1/webhooks/ingest/{forged}", json={})
    assert r.status_code == 404
    r = await client.get("/v1/webhooks/github", headers=a.headers)
    assert r.json()["integration"]["title"] == "GitHub"
    assert await stored_events(db, a, "github") == 1
    assert await stored_events(db, b, "github") == 0


@pytest.mark.parametrize("algorithm", ["sha1", "sha256"])
async def test_hmac_algorithms_without_a_prefix(
    client: httpx.AsyncClient, make_org: OrgFactory, algorithm: str
) -> None:
    org = await make_org()
    webhook = await _create(
        client,
        org,
        {
            "identifier": f"hmac-{algorithm}",
            "title": algorithm,
            "security": {
                "secret": "k3y",
                "signatureHeaderName": "X-Signature",
                "signatureAlgorithm": algorithm,
            },
        },
    )
    raw = b'{"event": "ping"}'
    digest = hmac.new(b"k3y", raw, getattr(hashlib, algorithm)).hexdigest()
    r = await client.post(ingest_path(webhook), content=raw, headers={"X-Signature": digest})
    assert r.status_code == 202, r.text
    other = "sha256" if algorithm == "sha1" else "sha1"
    wrong = hmac.new(b"k3y", raw, getattr(hashlib, other)).hexdigest()
    r = await client.post(ingest_path(webhook), content=raw, headers={"X-Signature": wrong})
    assert r.status_code == 401


# ---------------------------------------------------------------------------------------
# Batches: several events applied in one transaction


LABEL_WEBHOOK: dict[str, Any] = {
    "identifier": "labels",
    "title": "Labels",
    "mappings": [
        {
            "blueprint": "label",
            "filter": '.body.op == "upsert"',
            "entity": {
                "identifier": ".body.name",
                "properties": {"color": ".body.color | ascii_downcase", "rank": ".body.rank"},
            },
        },
        {
            "blueprint": "label",
            "operation": "delete",
            "filter": '.body.op == "delete"',
            "entity": {"identifier": ".body.name"},
        },
    ],
}


def upsert(name: str, color: Any, rank: Any = 1) -> dict[str, Any]:
    return {"op": "upsert", "name": name, "color": color, "rank": rank}


async def post_events(
    client: httpx.AsyncClient, webhook: dict[str, Any], bodies: list[Any]
) -> list[str]:
    ids = []
    for body in bodies:
        r = await client.post(ingest_path(webhook), json=body)
        assert r.status_code == 202, r.text
        ids.append(r.json()["eventId"])
    return ids


async def event_rows(db: Database, org: Org, ids: list[str]) -> list[dict[str, Any]]:
    async with db.system() as tx:
        rows = await tx.fetch(
            "SELECT id, status, attempts, outcome FROM webhook_events "
            "WHERE org_id = $1 AND id = ANY($2::varchar[])",
            org.org_id,
            ids,
        )
    by_id = {row["id"]: dict(row) for row in rows}
    return [by_id[event_id] for event_id in ids]


def operations(row: dict[str, Any]) -> list[tuple[str, str]]:
    return [(e["identifier"], e["operation"]) for e in row["outcome"]["entities"]]


@pytest.fixture
def render_calls(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every templates.render call the processing makes (the value rendered)."""
    calls: list[Any] = []
    real = processing.render

    async def counting(value: Any, data: dict[str, Any], pointer: str = "", *, org: Any) -> Any:
        calls.append(value)
        return await real(value, data, pointer, org=org)

    monkeypatch.setattr(processing, "render", counting)
    return calls


async def test_a_batch_applies_its_events_in_arrival_order(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, render_calls: list[Any]
) -> None:
    org = await make_org()
    await _catalog(client, org)
    webhook = await _create(client, org, LABEL_WEBHOOK)
    ids = await post_events(
        client,
        webhook,
        [
            upsert("a", "RED", 1),
            upsert("b", "GREY"),
            upsert("a", "BLUE", 2),
            {"op": "delete", "name": "b"},
            upsert("b", "BLACK", 5),
            upsert("a", "GREEN", 3),
            {"op": "delete", "name": "never-was"},
        ],
    )
    assert await processing.process_webhook(db, org.org_id, "labels") == len(ids)
    # One batch: every expression of the mappings was evaluated for all events at once.
    assert len(render_calls) == 1
    rows = await event_rows(db, org, ids)
    assert [(r["status"], r["attempts"]) for r in rows] == [("processed", 1)] * len(ids)
    assert [operations(r) for r in rows] == [
        [("a", "create")],
        [("b", "create")],
        [("a", "update")],
        [("b", "delete")],
        [("b", "create")],
        [("a", "update")],
        [],
    ]
    r = await entity(client, org, "label", "a")
    assert r.json()["entity"]["properties"] == {"color": "green", "rank": 3}
    r = await entity(client, org, "label", "b")
    assert r.json()["entity"]["properties"] == {"color": "black", "rank": 5}
    async with db.system() as tx:
        history = await tx.fetch(
            "SELECT identifier, action, after->'properties'->>'color' AS color "
            "FROM entity_events WHERE org_id = $1 AND blueprint = 'label' ORDER BY id",
            org.org_id,
        )
    by_entity: dict[str, list[tuple[str, str | None]]] = {}
    for row in history:
        by_entity.setdefault(row["identifier"], []).append((row["action"], row["color"]))
    assert by_entity["a"] == [("CREATE", "red"), ("UPDATE", "blue"), ("UPDATE", "green")]
    assert [action for action, _ in by_entity["b"]] == ["CREATE", "DELETE", "CREATE"]
    assert by_entity["b"][-1] == ("CREATE", "black")
    # Applied once: another pass finds nothing and writes nothing.
    assert await processing.process_webhook(db, org.org_id, "labels") == 0
    async with db.system() as tx:
        again = await tx.fetchval(
            "SELECT count(*) FROM entity_events WHERE org_id = $1", org.org_id
        )
    assert again == len(history)


async def test_an_entity_named_by_a_relation_is_written_in_order(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _catalog(client, org)
    webhook = await _create(
        client,
        org,
        {
            "identifier": "prs",
            "title": "PRs",
            "mappings": [
                {
                    "blueprint": "repository",
                    "filter": ".body.url != null",
                    "entity": {"identifier": ".body.repo", "properties": {"url": ".body.url"}},
                },
                {
                    "blueprint": "pullRequest",
                    "filter": ".body.pr != null",
                    "entity": {
                        "identifier": ".body.pr",
                        "relations": {"repository": ".body.repo"},
                    },
                },
            ],
        },
    )
    # The pull request names a repository that does not exist yet (created bare for
    # the relation); the next event writes the repository itself.
    ids = await post_events(
        client,
        webhook,
        [{"pr": "pr-1", "repo": "portolan"}, {"repo": "portolan", "url": "https://x"}],
    )
    assert await processing.process_webhook(db, org.org_id, "prs") == 2
    first, second = await event_rows(db, org, ids)
    assert operations(first) == [("pr-1", "create")]
    assert operations(second) == [("portolan", "update")]
    r = await entity(client, org, "repository", "portolan")
    assert r.json()["entity"]["properties"] == {"url": "https://x"}
    r = await entity(client, org, "pullRequest", "pr-1")
    assert r.json()["entity"]["relations"] == {"repository": "portolan"}


async def test_an_error_in_one_event_of_a_batch_leaves_the_others_applied(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, render_calls: list[Any]
) -> None:
    org = await make_org()
    await _catalog(client, org)
    webhook = await _create(client, org, LABEL_WEBHOOK)
    ids = await post_events(
        client,
        webhook,
        [
            upsert("one", "AAA"),
            upsert("jq-fails", 7),  # ascii_downcase of a number
            upsert("refused", "BBB", "high"),  # rank must be a number
            upsert("two", "CCC"),
            {"op": "upsert", "name": 12, "color": "DDD"},  # identifier not a string
        ],
    )
    assert await processing.process_webhook(db, org.org_id, "labels") == len(ids)
    one, jq_fails, refused, two, numbered = await event_rows(db, org, ids)
    assert one["status"] == "processed" and operations(one) == [("one", "create")]
    assert two["status"] == "processed" and operations(two) == [("two", "create")]
    assert jq_fails["status"] == "failed" and operations(jq_fails) == []
    assert jq_fails["outcome"]["errors"] == [
        {
            "mapping": 0,
            "item": None,
            "pointer": "/mappings/0/entity/properties/color",
            "message": "jq error: explode input must be a string",
        }
    ]
    [error] = refused["outcome"]["errors"]
    assert refused["status"] == "failed" and operations(refused) == []
    assert error["mapping"] == 0 and error["item"] is None
    assert error["pointer"] == "/mappings/0"
    assert error["blueprint"] == "label" and error["identifier"] == "refused"
    assert "rank" in error["message"]
    [error] = numbered["outcome"]["errors"]
    assert error["pointer"] == "/mappings/0/entity/identifier"
    assert "tostring" in error["message"]
    assert (await entity(client, org, "label", "refused")).status_code == 404
    assert (await entity(client, org, "label", "two")).status_code == 200
    # The batch was rendered at once; only the event whose jq failed again, on its own
    # (for the error's pointer and message).
    assert len(render_calls) == 2


async def test_a_write_the_database_refuses_fails_only_its_event(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    org = await make_org()
    await _catalog(client, org)
    webhook = await _create(client, org, LABEL_WEBHOOK)
    real = processing.entities.write

    async def write(tx: Any, blueprint: str, raws: list[Any], *args: Any) -> Any:
        if any(raw.get("identifier") == "refused" for raw in raws):
            await tx.execute("SELECT 1 / 0")  # aborts the transaction, as a refusal would
        return await real(tx, blueprint, raws, *args)

    monkeypatch.setattr(processing.entities, "write", write)
    ids = await post_events(
        client, webhook, [upsert("before", "A"), upsert("refused", "B"), upsert("after", "C")]
    )
    assert await processing.process_webhook(db, org.org_id, "labels") == 3
    before, refused, after = await event_rows(db, org, ids)
    assert before["status"] == after["status"] == "processed"
    assert operations(before) == [("before", "create")]
    assert operations(after) == [("after", "create")]
    [error] = refused["outcome"]["errors"]
    assert refused["status"] == "failed"
    assert error["identifier"] == "refused" and error["pointer"] == "/mappings/0"
    assert error["message"].startswith("the database refused the write: division by zero")


async def test_a_batch_too_large_to_render_at_once_is_rendered_event_by_event(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, render_calls: list[Any]
) -> None:
    org = await make_org()
    await _catalog(client, org)
    webhook = await _create(
        client,
        org,
        {
            "identifier": "bulky",
            "title": "Bulky",
            "mappings": [
                {
                    "blueprint": "label",
                    "itemsToParse": ".body.labels",
                    "entity": {"identifier": ".item.name", "title": ".item.name"},
                }
            ],
        },
    )
    # Each event's items are ~400 KB: together they are over the jq output limit.
    bodies = [
        {"labels": [{"name": f"e{n}-{i}", "pad": "x" * 4000} for i in range(100)]} for n in range(3)
    ]
    bodies.insert(1, {"labels": "not a list"})
    ids = await post_events(client, webhook, bodies)
    assert await processing.process_webhook(db, org.org_id, "bulky") == 4
    rows = await event_rows(db, org, ids)
    assert [r["status"] for r in rows] == ["processed", "failed", "processed", "processed"]
    assert rows[1]["outcome"]["errors"][0]["pointer"] == "/mappings/0/itemsToParse"
    assert len(rows[3]["outcome"]["entities"]) == 100
    r = await client.get("/v1/blueprints/label/entities-count", headers=org.headers)
    assert r.json()["count"] == 300
    # The batch once, then each event on its own (items, then its entities).
    assert len(render_calls) == 1 + 3 * 2 + 1


async def test_a_pass_already_running_takes_the_events_of_later_calls(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    org = await make_org()
    await _catalog(client, org)
    webhook = await _create(client, org, LABEL_WEBHOOK)
    ids = await post_events(client, webhook, [upsert("first", "A")])
    real = processing.render
    later: list[int] = []

    async def render_and_ingest(
        value: Any, data: dict[str, Any], pointer: str = "", **kw: Any
    ) -> Any:
        if not later:
            # While the pass renders its first batch, another event arrives and its job
            # runs: the job leaves it to the running pass.
            ids.extend(await post_events(client, webhook, [upsert("second", "B")]))
            later.append(await processing.process_webhook(db, org.org_id, "labels"))
        return await real(value, data, pointer, **kw)

    monkeypatch.setattr(processing, "render", render_and_ingest)
    assert await processing.process_webhook(db, org.org_id, "labels") == 2
    assert later == [0]
    assert [r["status"] for r in await event_rows(db, org, ids)] == ["processed"] * 2


async def test_passes_of_two_processes_apply_each_event_once(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    db: Database,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    org = await make_org()
    await _catalog(client, org)
    webhook = await _create(client, org, LABEL_WEBHOOK)
    ids = await post_events(client, webhook, [upsert(f"l{n}", "A", n) for n in range(30)])
    real = processing.render

    async def slow(value: Any, data: dict[str, Any], pointer: str = "", *, org: Any) -> Any:
        await asyncio.sleep(0.2)  # the pass holds its batch a while
        return await real(value, data, pointer, org=org)

    monkeypatch.setattr(processing, "render", slow)
    other = await Database.connect(settings)  # as another worker process would
    try:
        counts = await asyncio.gather(
            *(
                processing._run_pass(database, org.org_id, "labels", 10, processing._Pass())
                for database in (db, other, db, other)
            )
        )
    finally:
        await other.close()
    assert sorted(counts) == [0, 0, 0, 10]  # one pass held the webhook, the rest skipped it
    # What is left is taken by later passes; nothing is applied twice.
    while await processing.process_webhook(db, org.org_id, "labels"):
        pass
    rows = await event_rows(db, org, ids)
    assert [(r["status"], r["attempts"]) for r in rows] == [("processed", 1)] * 30
    async with db.system() as tx:
        writes = await tx.fetchval(
            "SELECT count(*) FROM entity_events WHERE org_id = $1", org.org_id
        )
    assert writes == 30


async def test_a_poisoned_event_fails_alone_and_the_webhook_moves_on(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    org = await make_org()
    await _catalog(client, org)
    webhook = await _create(client, org, LABEL_WEBHOOK)
    real = processing.entities.write

    async def write(tx: Any, blueprint: str, raws: list[Any], *args: Any) -> Any:
        if any(raw.get("identifier") == "poison" for raw in raws):
            raise asyncpg.DeadlockDetectedError("deadlock detected")
        return await real(tx, blueprint, raws, *args)

    monkeypatch.setattr(processing.entities, "write", write)
    ids = await post_events(
        client, webhook, [upsert("a", "A"), upsert("poison", "P"), upsert("b", "B")]
    )
    # The batch fails as a whole: every event counts an attempt and stays pending.
    assert await processing.process_webhook(db, org.org_id, "labels") == 0
    rows = await event_rows(db, org, ids)
    assert [(r["status"], r["attempts"]) for r in rows] == [("pending", 1)] * 3
    # Then one at a time: the poisoned event fails alone until it is marked failed.
    passes = 0
    while any(r["status"] == "pending" for r in rows):
        passes += 1
        assert passes <= 10, rows
        await processing.process_webhook(db, org.org_id, "labels")
        rows = await event_rows(db, org, ids)
    a, poison, b = rows
    assert (a["status"], a["attempts"]) == ("processed", 2)
    assert (b["status"], b["attempts"]) == ("processed", 2)
    assert (poison["status"], poison["attempts"]) == ("failed", processing.MAX_ATTEMPTS)
    assert "DeadlockDetectedError" in poison["outcome"]["errors"][0]["message"]
    assert (await entity(client, org, "label", "b")).status_code == 200
    assert (await entity(client, org, "label", "poison")).status_code == 404


async def test_rendering_event_by_event_stops_at_a_time_budget(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    db: Database,
    render_calls: list[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    org = await make_org()
    await _catalog(client, org)
    webhook = await _create(
        client,
        org,
        {
            "identifier": "bulky",
            "title": "Bulky",
            "mappings": [
                {
                    "blueprint": "label",
                    "itemsToParse": ".body.labels",
                    "entity": {"identifier": ".item.name"},
                }
            ],
        },
    )
    bodies = [
        {"labels": [{"name": f"e{n}-{i}", "pad": "x" * 4000} for i in range(100)]} for n in range(3)
    ]
    ids = await post_events(client, webhook, bodies)
    monkeypatch.setattr(processing, "RENDER_ALONE_SECONDS", 0.0)
    assert await processing.process_webhook(db, org.org_id, "bulky") == 3
    # The three together are over the jq output limit: the first is rendered on its
    # own, the budget is spent, and the other two make the next batch (together).
    assert len(render_calls) == 1 + 2 + 2
    rows = await event_rows(db, org, ids)
    assert [(r["status"], r["attempts"]) for r in rows] == [("processed", 1)] * 3
    async with db.system() as tx:
        batches = await tx.fetchval(
            "SELECT count(DISTINCT processed_at) FROM webhook_events WHERE org_id = $1",
            org.org_id,
        )
    assert batches == 2


async def test_the_periodic_pass_leaves_a_failing_webhook_until_its_next_run(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    org = await make_org()
    await _catalog(client, org)
    failing = await _create(client, org, LABEL_WEBHOOK)
    working = await _create(client, org, {**LABEL_WEBHOOK, "identifier": "working"})
    real = processing.entities.write

    async def write(tx: Any, blueprint: str, raws: list[Any], *args: Any) -> Any:
        if any(raw.get("identifier") == "poison" for raw in raws):
            raise asyncpg.DeadlockDetectedError("deadlock detected")
        return await real(tx, blueprint, raws, *args)

    monkeypatch.setattr(processing.entities, "write", write)
    monkeypatch.setattr(processing, "LOOK_AGAIN_SECONDS", 0.01)
    [poison] = await post_events(client, failing, [upsert("poison", "P")])
    [first] = await post_events(client, working, [upsert("w1", "A")])
    assert await processing.process_pending(db) >= 1
    # It looked again (the working webhook had events) without trying the failing one.
    [failed, applied] = await event_rows(db, org, [poison, first])
    assert (failed["status"], failed["attempts"]) == ("pending", 1)
    assert applied["status"] == "processed"
    await processing.process_pending(db)
    [failed] = await event_rows(db, org, [poison])
    assert failed["attempts"] == 2


async def test_item_errors_in_a_batch_name_their_event_mapping_and_item(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, render_calls: list[Any]
) -> None:
    org = await make_org()
    await _catalog(client, org)
    webhook = await _create(
        client,
        org,
        {
            "identifier": "items",
            "title": "Items",
            "mappings": [
                {
                    "blueprint": "label",
                    "itemsToParse": ".body.labels",
                    "filter": ".item.skip != true",
                    "entity": {
                        "identifier": ".item.name",
                        "properties": {"color": ".item.color | ascii_downcase"},
                    },
                }
            ],
        },
    )
    ids = await post_events(
        client,
        webhook,
        [
            {"labels": [{"name": "a", "color": "A"}, {"name": "b", "color": 1}]},
            {"labels": [{"name": "c", "color": 2, "skip": True}, {"name": "d", "color": "D"}]},
            {"labels": None},
        ],
    )
    assert await processing.process_webhook(db, org.org_id, "items") == 3
    first, second, third = await event_rows(db, org, ids)
    assert first["status"] == "failed"
    assert first["outcome"]["entities"] == [
        {"mapping": 0, "item": 0, "blueprint": "label", "identifier": "a", "operation": "create"}
    ]
    assert first["outcome"]["errors"] == [
        {
            "mapping": 0,
            "item": 1,
            "pointer": "/mappings/0/entity/properties/color",
            "message": "jq error: explode input must be a string",
        }
    ]
    # An item the filter drops does not fail on its entity's jq.
    assert second["status"] == "processed"
    assert [(e["item"], e["identifier"]) for e in second["outcome"]["entities"]] == [(1, "d")]
    assert third["status"] == "processed" and third["outcome"] == {"entities": [], "errors": []}
    # itemsToParse for the batch, the rest for the batch, the failing item on its own.
    assert len(render_calls) == 3


async def test_the_audit_log_keeps_one_webhooks_entries_by_webhook_id(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    """`webhookId` on the audit log (Port's): the webhook's own changes and the entity
    changes its events made; another webhook's, and another org's same-named one's, are not
    among them."""
    org = await make_org()
    other = await make_org()
    made: dict[tuple[str, str], dict[str, Any]] = {}
    for who in (org, other):
        await _catalog(client, who)
        for name in ("repos-a", "repos-b"):
            made[(str(who.org_id), name)] = await _create(
                client,
                who,
                {
                    "identifier": name,
                    "title": name,
                    "mappings": [
                        {"blueprint": "repository", "entity": {"identifier": ".body.name"}}
                    ],
                },
            )
    start_worker()
    for who, name, repo in (
        (org, "repos-a", "one"),
        (org, "repos-b", "two"),
        (other, "repos-a", "three"),
    ):
        r = await client.post(ingest_path(made[(str(who.org_id), name)]), json={"name": repo})
        assert r.status_code == 202, r.text
        await wait_events(client, who, name, all_done(1))

    async def audits(who: Org, webhook: str) -> set[tuple[str, str, str]]:
        r = await client.get(f"/v1/audit-log?webhookId={webhook}", headers=who.headers)
        assert r.status_code == 200, r.text
        return {(a["resourceType"], a["identifier"], a["action"]) for a in r.json()["audits"]}

    assert await audits(org, "repos-a") == {
        ("webhook", "repos-a", "CREATE"),
        ("entity", "one", "CREATE"),
    }
    assert await audits(org, "repos-b") == {
        ("webhook", "repos-b", "CREATE"),
        ("entity", "two", "CREATE"),
    }
    assert await audits(other, "repos-a") == {
        ("webhook", "repos-a", "CREATE"),
        ("entity", "three", "CREATE"),
    }
    assert await audits(org, "nope") == set()


async def test_the_audit_log_keeps_one_events_entity_changes_by_webhook_event_id(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    """`webhookEventId` on the audit log (Port's): the entity changes of that event alone,
    though its batch wrote several events' entities in one statement; an entity created
    bare for a relation counts for the event that named it; another org's log has none."""
    org = await make_org()
    other = await make_org()
    await _catalog(client, org)
    await _catalog(client, other)
    labels = await _create(client, org, LABEL_WEBHOOK)
    ids = await post_events(
        client,
        labels,
        [
            upsert("a", "RED"),
            upsert("b", "GREY"),
            upsert("a", "BLUE"),
            {"op": "delete", "name": "b"},
        ],
    )
    prs = await _create(
        client,
        org,
        {
            "identifier": "prs",
            "title": "PRs",
            "mappings": [
                {
                    "blueprint": "pullRequest",
                    "entity": {"identifier": ".body.pr", "relations": {"repository": ".body.repo"}},
                }
            ],
        },
    )
    # pr-z names "shared" first (its identifier sorts after pr-a's, which names it too).
    ids += await post_events(
        client,
        prs,
        [
            {"pr": "pr-1", "repo": "portolan"},
            {"pr": "pr-2", "repo": "other"},
            {"pr": "pr-z", "repo": "shared"},
            {"pr": "pr-a", "repo": "shared"},
        ],
    )
    assert await processing.process_webhook(db, org.org_id, "labels") == 4
    assert await processing.process_webhook(db, org.org_id, "prs") == 4

    async def changes(who: Org, event: str) -> set[tuple[str, str, str]]:
        r = await client.get(f"/v1/audit-log?webhookEventId={event}", headers=who.headers)
        assert r.status_code == 200, r.text
        audits = r.json()["audits"]
        assert all(a["context"]["webhookEventId"] == event for a in audits), audits
        return {(a["context"]["blueprint"], a["identifier"], a["action"]) for a in audits}

    assert [await changes(org, event) for event in ids] == [
        {("label", "a", "CREATE")},
        {("label", "b", "CREATE")},
        {("label", "a", "UPDATE")},
        {("label", "b", "DELETE")},
        {("pullRequest", "pr-1", "CREATE"), ("repository", "portolan", "CREATE")},
        {("pullRequest", "pr-2", "CREATE"), ("repository", "other", "CREATE")},
        {("pullRequest", "pr-z", "CREATE"), ("repository", "shared", "CREATE")},
        {("pullRequest", "pr-a", "CREATE")},
    ]
    assert await changes(other, ids[0]) == set()
