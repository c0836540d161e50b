"""The OWASP API Security Top 10 (2023), one group per category: each test fails if the
protection it names breaks. Where a category is covered elsewhere, the group says where and
adds what that coverage leaves out. API5 (function level authorization) is the roles x
operations matrix of its own module."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.db.database import Database
from app.kit.crypto import cipher_for
from app.orgs import service as org_service
from tests.conftest import Org

SERVICE: dict[str, Any] = {
    "identifier": "service",
    "title": "Service",
    "schema": {"properties": {"tier": {"type": "string"}, "owner": {"type": "string"}}},
}
VAULT: dict[str, Any] = {
    "identifier": "vault",
    "title": "Vault",
    "schema": {"properties": {"code": {"type": "string"}}},
}
READINESS: dict[str, Any] = {
    "identifier": "readiness",
    "title": "Readiness",
    "rules": [
        {
            "identifier": "owned",
            "title": "Owned",
            "level": "Gold",
            "query": {
                "combinator": "and",
                "conditions": [{"property": "owner", "operator": "isNotEmpty"}],
            },
        }
    ],
}
DEPLOY: dict[str, Any] = {
    "identifier": "deploy",
    "title": "Deploy",
    "trigger": {
        "type": "self-service",
        "operation": "DAY-2",
        "blueprintIdentifier": "service",
        "userInputs": {"properties": {"version": {"type": "string"}}},
    },
    "invocationMethod": {"type": "WEBHOOK", "url": "http://127.0.0.1:9/deploy"},
    "requiredApproval": True,
}
HOOK_SECRET = "incoming-hook-secret-" + uuid.uuid4().hex
HOOK: dict[str, Any] = {
    "identifier": "hook",
    "title": "Hook",
    "mappings": [
        {
            "blueprint": "service",
            "entity": {"identifier": ".body.name", "properties": {"tier": ".body.tier"}},
        }
    ],
    "security": {
        "secret": HOOK_SECRET,
        "signatureAlgorithm": "plain",
        "signatureHeaderName": "X-T",
    },
}
SECRET_VALUE = "org-secret-value-" + uuid.uuid4().hex


async def _org(db: Database, http: httpx.AsyncClient, settings: Settings) -> Org:
    async with db.system() as tx:
        made = await org_service.create_org(
            tx, name=f"owasp-{uuid.uuid4().hex[:8]}", cipher=cipher_for(settings)
        )
    r = await http.post(
        "/v1/auth/access_token",
        json={"clientId": made.client_id, "clientSecret": made.client_secret},
    )
    assert r.status_code == 200, r.text
    return Org(made.org_id, made.name, made.client_id, made.client_secret, r.json()["accessToken"])


async def _ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code < 300, response.text
    body: dict[str, Any] = response.json()
    return body


# ---------------------------------------------------------------------------------------
# API1: Broken object level authorization.
# Covered per domain in test_blueprints, test_entities, test_scorecards, test_actions,
# test_runs, test_webhooks, test_secrets, test_apps and test_audit (and RLS itself in
# test_tenancy). Here: every identifier-addressed route in one table, org B holding org A's
# identifiers (and a blueprint of the same name as A's), and A's whole state - its audit log
# included - compared after each attempt.


@dataclass
class Tenants:
    http: httpx.AsyncClient
    a: Org
    b: Org
    ids: dict[str, str]
    app_secret: str
    baseline: dict[str, Any]


async def _snapshot(http: httpx.AsyncClient, org: Org, ids: dict[str, str], secret: str) -> Any:
    h = org.headers
    paths = [
        "/v1/blueprints/vault",
        "/v1/blueprints/service",
        "/v1/blueprints/service/entities/api",
        "/v1/blueprints/vault/entities/v1",
        "/v1/blueprints/service/scorecards/readiness",
        "/v1/actions/deploy",
        f"/v1/actions/runs/{ids['run']}",
        f"/v1/actions/runs/{ids['run']}/logs",
        "/v1/webhooks/hook",
        "/v1/webhooks/hook/events",
        "/v1/organization/secrets/TOKEN",
        "/v1/apps",
        f"/v1/migrations/{ids['migration']}",
        "/v1/audit-log?limit=1000",
        "/v1/organization/signing-secret",
    ]
    state: dict[str, Any] = {}
    for path in paths:
        r = await http.get(path, headers=h)
        assert r.status_code == 200, (path, r.text)
        state[path] = r.json()
    exchange = await http.post(
        "/v1/auth/access_token", json={"clientId": ids["app"], "clientSecret": secret}
    )
    state["app exchange"] = exchange.status_code
    return state


@pytest.fixture(scope="module")
async def tenants(app: FastAPI, db: Database, settings: Settings) -> AsyncIterator[Tenants]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://portolan.test") as http:
        a = await _org(db, http, settings)
        b = await _org(db, http, settings)
        h = a.headers
        for body in (SERVICE, VAULT):
            await _ok(await http.post("/v1/blueprints", json=body, headers=h))
        # B has a blueprint named like A's: entity and scorecard routes reach past it.
        await _ok(await http.post("/v1/blueprints", json=SERVICE, headers=b.headers))
        await _ok(
            await http.post(
                "/v1/blueprints/service/entities",
                json={"identifier": "api", "properties": {"tier": "1", "owner": "ana"}},
                headers=h,
            )
        )
        await _ok(
            await http.post("/v1/blueprints/vault/entities", json={"identifier": "v1"}, headers=h)
        )
        await _ok(await http.post("/v1/blueprints/service/scorecards", json=READINESS, headers=h))
        await _ok(await http.post("/v1/actions", json=DEPLOY, headers=h))
        run = await _ok(
            await http.post(
                "/v1/actions/deploy/runs",
                json={"properties": {"version": "1"}, "entity": "api"},
                headers=h,
            )
        )
        assert run["run"]["status"] == "WAITING_FOR_APPROVAL"
        await _ok(await http.post("/v1/webhooks", json=HOOK, headers=h))
        hook = (await _ok(await http.get("/v1/webhooks/hook", headers=h)))["integration"]
        r = await http.post(
            f"/v1/webhooks/ingest/{hook['webhookKey']}", json={"x": 1}, headers={"X-T": "nope"}
        )
        assert r.status_code == 401, r.text
        await _ok(
            await http.post(
                "/v1/organization/secrets",
                json={"secretName": "TOKEN", "secretValue": SECRET_VALUE},
                headers=h,
            )
        )
        made = (
            await _ok(
                await http.post("/v1/apps", json={"name": "ci", "roles": ["Admin"]}, headers=h)
            )
        )["app"]
        # A migration: everything of a scratch blueprint deleted.
        scratch = {**VAULT, "identifier": "scratch"}
        await _ok(await http.post("/v1/blueprints", json=scratch, headers=h))
        migration = await _ok(await http.delete("/v1/blueprints/scratch/all-entities", headers=h))
        ids = {
            "run": run["run"]["id"],
            "app": made["clientId"],
            "migration": migration["migrationId"],
            "webhookKey": hook["webhookKey"],
        }
        baseline = await _snapshot(http, a, ids, made["secret"])
        yield Tenants(http, a, b, ids, made["secret"], baseline)


_SWAPS: list[tuple[str, str, Any]] = [
    ("GET", "/v1/blueprints/vault", None),
    ("PUT", "/v1/blueprints/vault", {**VAULT, "title": "Taken"}),
    ("PATCH", "/v1/blueprints/vault", {"title": "Taken"}),
    ("DELETE", "/v1/blueprints/vault", None),
    ("PATCH", "/v1/blueprints/vault/properties/code/rename", {"newPropertyName": "c2"}),
    ("GET", "/v1/blueprints/vault/entities", None),
    ("GET", "/v1/blueprints/vault/entities-count", None),
    ("POST", "/v1/blueprints/vault/entities/search", {"query": {"combinator": "and", "rules": []}}),
    ("POST", "/v1/blueprints/vault/entities?upsert=true", {"identifier": "v1"}),
    ("POST", "/v1/blueprints/vault/entities/bulk", {"entities": [{"identifier": "v1"}]}),
    ("POST", "/v1/blueprints/vault/bulk/entities/delete", {"entities": ["v1"]}),
    ("DELETE", "/v1/blueprints/vault/all-entities", None),
    ("GET", "/v1/blueprints/vault/entities/v1", None),
    ("GET", "/v1/blueprints/service/entities/api", None),
    ("PUT", "/v1/blueprints/service/entities/api", {"identifier": "api", "properties": {}}),
    ("PATCH", "/v1/blueprints/service/entities/api", {"properties": {"tier": "0"}}),
    ("DELETE", "/v1/blueprints/service/entities/api", None),
    ("GET", "/v1/blueprints/service/scorecards/readiness", None),
    ("PUT", "/v1/blueprints/service/scorecards/readiness", READINESS),
    ("DELETE", "/v1/blueprints/service/scorecards/readiness", None),
    ("GET", "/v1/blueprints/service/scorecards/readiness/summary", None),
    ("GET", "/v1/actions/deploy", None),
    ("PUT", "/v1/actions/deploy", {**DEPLOY, "title": "Taken"}),
    ("DELETE", "/v1/actions/deploy", None),
    ("POST", "/v1/actions/deploy/runs", {"properties": {}, "entity": "api"}),
    ("GET", "/v1/actions/runs/{run}", None),
    ("PATCH", "/v1/actions/runs/{run}", {"status": "SUCCESS"}),
    ("PATCH", "/v1/actions/runs/{run}/approval", {"status": "APPROVE"}),
    ("GET", "/v1/actions/runs/{run}/logs", None),
    ("POST", "/v1/actions/runs/{run}/logs", {"message": "injected"}),
    ("GET", "/v1/actions/runs/{run}/logs/stream", None),
    ("GET", "/v1/webhooks/hook", None),
    ("PUT", "/v1/webhooks/hook", {**HOOK, "title": "Taken"}),
    ("PATCH", "/v1/webhooks/hook", {"enabled": False}),
    ("DELETE", "/v1/webhooks/hook", None),
    ("GET", "/v1/webhooks/hook/events", None),
    ("GET", "/v1/organization/secrets/TOKEN", None),
    ("PATCH", "/v1/organization/secrets/TOKEN", {"secretValue": "taken"}),
    ("DELETE", "/v1/organization/secrets/TOKEN", None),
    ("PUT", "/v1/apps/{app}", {"roles": ["Member"]}),
    ("POST", "/v1/apps/{app}/rotate-secret", None),
    ("DELETE", "/v1/apps/{app}", None),
    ("GET", "/v1/migrations/{migration}", None),
]


@pytest.mark.parametrize(("method", "path", "body"), _SWAPS, ids=[f"{m} {p}" for m, p, _ in _SWAPS])
async def test_api1_another_orgs_identifiers_are_404_and_change_nothing(
    tenants: Tenants, method: str, path: str, body: Any
) -> None:
    url = path.format(**tenants.ids)
    r = await tenants.http.request(method, url, json=body, headers=tenants.b.headers)
    assert r.status_code == 404, r.text
    assert r.json()["ok"] is False
    for secret in (tenants.app_secret, SECRET_VALUE, HOOK_SECRET, tenants.ids["webhookKey"]):
        assert secret not in r.text
    after = await _snapshot(tenants.http, tenants.a, tenants.ids, tenants.app_secret)
    assert after == tenants.baseline


async def test_api1_listings_and_the_audit_log_show_nothing_of_another_org(
    tenants: Tenants,
) -> None:
    http, b = tenants.http, tenants.b
    run = tenants.ids["run"]
    empty = {
        "/v1/blueprints": ("blueprints", ["service"]),
        "/v1/actions": ("actions", []),
        "/v1/actions/runs": ("runs", []),
        f"/v1/actions/runs?entity=api&action=deploy&run_id={run}": ("runs", []),
        "/v1/scorecards": ("scorecards", []),
        "/v1/webhooks": ("integrations", []),
        "/v1/organization/secrets": ("secrets", []),
        "/v1/blueprints/service/entities": ("entities", []),
        "/v1/audit-log?identifier=api": ("audits", []),
        f"/v1/audit-log?run_id={run}": ("audits", []),
        "/v1/audit-log?blueprint=vault": ("audits", []),
    }
    for path, (key, expected) in empty.items():
        r = await http.get(path, headers=b.headers)
        assert r.status_code == 200, (path, r.text)
        listed = r.json()[key]
        names = [item.get("identifier") for item in listed]
        assert names == expected, path
    everything = (await http.get("/v1/audit-log?limit=1000", headers=b.headers)).json()["audits"]
    assert everything and {e["trigger"]["by"]["orgId"] for e in everything} == {str(b.org_id)}
    apps = (await http.get("/v1/apps", headers=b.headers)).json()["apps"]
    assert [a["clientId"] for a in apps] == [b.client_id]
    found = await http.post(
        "/v1/entities/search",
        json={
            "combinator": "or",
            "rules": [{"property": "$identifier", "operator": "=", "value": "api"}],
        },
        headers=b.headers,
    )
    assert found.status_code == 200 and found.json()["entities"] == []
