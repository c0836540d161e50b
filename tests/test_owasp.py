"""The OWASP API Security Top 10 (2023), one group per category: each test fails if the
protection it names breaks. Where a category is covered elsewhere, the group says where and
adds what that coverage leaves out. API5 (function level authorization) is the roles x
operations matrix of its own module."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from jose import jwt

from app.config import Settings
from app.db.database import Database
from app.dispatch.invokers import Context, invoke
from app.kit import outbound
from app.kit.client import READ_LIMIT_BYTES, Client
from app.kit.crypto import cipher_for
from app.kit.http import iter_routes
from app.kit.outbound import Allowed, Refused
from app.main import create_app
from app.orgs import service as org_service
from tests.conftest import SECRET_KEY, Org, OrgFactory
from tests.receivers import GitHubReceiver, GitLabReceiver, WebhookReceiver

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
OPENAPI_FILE = Path(__file__).resolve().parent.parent / "openapi" / "openapi.json"
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


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


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
    ("PUT", "/v1/apps/{app}", {"name": "taken", "roles": ["Member"]}),
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
        # (no run_id: the run list takes none, and a parameter a route does not take is a 422)
        "/v1/actions/runs?entity=api&action=deploy": ("runs", []),
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


# ---------------------------------------------------------------------------------------
# API2: Broken authentication.
# test_auth covers tampered signatures, alg none, another key, other algorithms, expiry,
# audience, issuer, each missing claim, garbage tokens and the client secret in logs. Here:
# malformed Authorization headers, tokens of an org or a credential that does not exist,
# the exchange's answers that tell nothing apart, and the access token kept out of logs.


def _claims(org_id: uuid.UUID, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": "portolan",
        "aud": "portolan-api",
        "sub": "someone",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "org": str(org_id),
        "kind": "app",
        "roles": ["Admin"],
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


@pytest.mark.parametrize(
    "header",
    [
        "Bearer",
        "Bearer ",
        "Bearer    ",
        "bearer a b c",
        "Bearer " + "x" * 8000,
        "Bearer e30.e30.",
        "Bearer eyJhbGciOiJIUzI1NiJ9.\x7f\x7f.sig",
        "Token abc",
        "Bearer\tabc",
        "Bearer ..",
        "Bearer 😀.😀.😀",
    ],
)
async def test_api2_malformed_authorization_headers_are_401(
    client: httpx.AsyncClient, header: str
) -> None:
    r = await client.get("/v1/blueprints", headers=[(b"authorization", header.encode("utf-8"))])
    assert r.status_code == 401, r.text
    assert r.json()["ok"] is False


async def test_api2_forged_tokens_reach_nothing_on_any_route(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    # test_auth checks one route; a forged token must fail on writes and admin routes too.
    org = await make_org()
    forged = [
        jwt.encode(_claims(org.org_id), "another-key-" + "y" * 40, "HS256"),
        jwt.encode(_claims(org.org_id, exp=None), SECRET_KEY, "HS256"),
        jwt.encode(_claims(org.org_id, aud="portolan-api-2"), SECRET_KEY, "HS256"),
        jwt.encode(_claims(org.org_id, nbf=int(time.time()) + 3600), SECRET_KEY, "HS256"),
        _b64(b'{"alg":"none","typ":"JWT"}')
        + "."
        + _b64(json.dumps(_claims(org.org_id)).encode())
        + ".",
    ]
    attempts = [
        ("POST", "/v1/blueprints", SERVICE),
        ("POST", "/v1/apps", {"name": "x", "roles": ["Admin"]}),
        ("GET", "/v1/audit-log", None),
        ("GET", "/v1/organization/signing-secret", None),
        ("POST", "/v1/organization/secrets", {"secretName": "X", "secretValue": "y"}),
    ]
    for token in forged:
        for method, path, body in attempts:
            r = await client.request(
                method, path, json=body, headers={"Authorization": f"Bearer {token}"}
            )
            assert r.status_code == 401, (token, path, r.text)
    assert (await client.get("/v1/blueprints", headers=org.headers)).json()["blueprints"] == []


async def test_api2_a_token_for_an_org_that_does_not_exist_gets_no_500(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    # Signed by the service (e.g. the org was removed after the token was issued): the
    # tenant binding sees no rows, so nothing answers with data or fails with a 500.
    token = app.state.tokens.issue(org_id=uuid.uuid4(), subject="x", kind="app", roles=["Admin"])
    headers = {"Authorization": f"Bearer {token}"}
    for method, path, body in (
        ("GET", "/v1/organization", None),
        ("GET", "/v1/organization/signing-secret", None),
        ("POST", "/v1/organization/signing-secret/rotate", None),
        ("POST", "/v1/blueprints", SERVICE),
    ):
        r = await client.request(method, path, json=body, headers=headers)
        assert r.status_code in (401, 404, 409), (path, r.text)
        assert r.json()["ok"] is False
    r = await client.get("/v1/apps", headers=headers)
    assert r.status_code == 401 or r.json()["apps"] == []


async def test_api2_tokens_of_a_deleted_credential_or_org_are_401(
    client: httpx.AsyncClient, make_org: OrgFactory, app: FastAPI
) -> None:
    org = await make_org()
    made = (
        await client.post("/v1/apps", json={"name": "ci", "roles": ["Admin"]}, headers=org.headers)
    ).json()["app"]
    exchanged = await client.post(
        "/v1/auth/access_token",
        json={"clientId": made["clientId"], "clientSecret": made["secret"]},
    )
    token = exchanged.json()["accessToken"]
    await client.delete(f"/v1/apps/{made['clientId']}", headers=org.headers)
    ghost = app.state.tokens.issue(org_id=uuid.uuid4(), subject="x", kind="app", roles=["Admin"])
    for bearer in (token, ghost):
        r = await client.get("/v1/blueprints", headers={"Authorization": f"Bearer {bearer}"})
        assert r.status_code == 401, r.text


async def test_api2_the_exchange_answers_every_wrong_guess_alike(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    # No per-client lockout or limit on the exchange: secrets are 256-bit random strings,
    # so guessing is hopeless as long as no answer tells one wrong guess from another
    # (unknown org, unknown client, wrong secret) and the secret is long.
    org = await make_org()
    other = await make_org()
    assert len(org.client_secret) >= 43
    guesses = [
        (org.client_id, "wrong"),
        (org.client_id, org.client_secret[:-1]),
        (org.client_id, other.client_secret),
        (org.client_id[:22] + "A" * 10, org.client_secret),  # the org's prefix, no such client
        ("0" * 32, org.client_secret),  # no such org
        ("!" * 32, "x"),
    ]
    answers = set()
    for _ in range(5):
        for client_id, secret in guesses:
            r = await client.post(
                "/v1/auth/access_token", json={"clientId": client_id, "clientSecret": secret}
            )
            answers.add((r.status_code, r.text))
    assert answers == {
        (401, '{"ok":false,"error":"invalid_credentials","message":"Invalid client credentials"}')
    }
    ok = await client.post(
        "/v1/auth/access_token",
        json={"clientId": org.client_id, "clientSecret": org.client_secret},
    )
    assert ok.status_code == 200


async def test_api2_access_tokens_and_secrets_never_reach_the_logs(
    client: httpx.AsyncClient, make_org: OrgFactory, caplog: pytest.LogCaptureFixture
) -> None:
    org = await make_org()
    caplog.set_level(logging.DEBUG)
    issued = await client.post(
        "/v1/auth/access_token",
        json={"clientId": org.client_id, "clientSecret": org.client_secret},
    )
    token = issued.json()["accessToken"]
    bearer = {"Authorization": f"Bearer {token}"}
    await client.get("/v1/organization", headers=bearer)
    await client.post("/v1/blueprints", json={"identifier": "!"}, headers=bearer)  # 422
    await client.get("/v1/nowhere", headers=bearer)  # 404
    await client.get("/v1/organization", headers={"Authorization": f"Bearer {token}x"})  # 401
    await client.post(
        "/v1/organization/secrets",
        json={"secretName": "TOKEN", "secretValue": SECRET_VALUE},
        headers=bearer,
    )
    logged = caplog.text + "".join(repr(r.__dict__) for r in caplog.records)
    signature = token.rsplit(".", 1)[1]
    for secret in (signature, org.client_secret, SECRET_VALUE):
        assert secret not in logged


# ---------------------------------------------------------------------------------------
# API3: Broken object property level authorization.
# test_apps refuses `org_id` on credentials; test_secrets and test_webhooks keep secret
# values and the webhook secret out of their own answers. Here: server-owned fields sent
# on every writable resource are refused or ignored, and no answer anywhere carries a
# stored secret.

FORGED: dict[str, Any] = {
    "org_id": "00000000-0000-0000-0000-000000000000",
    "orgId": "00000000-0000-0000-0000-000000000000",
    "_orgId": "00000000-0000-0000-0000-000000000000",
    "createdBy": "forged-user",
    "updatedBy": "forged-user",
    "createdAt": "2001-01-01T00:00:00Z",
    "updatedAt": "2001-01-01T00:00:00Z",
    "id": "forged-id",
}


def _no_forgery(obj: Any, org: Org) -> None:
    text = json.dumps(obj)
    assert "forged" not in text and "2001-01-01" not in text, text
    assert "00000000-0000-0000-0000-000000000000" not in text, text


async def _rows_of(db: Database, org_id: uuid.UUID) -> int:
    async with db.system() as tx:
        return int(
            await tx.fetchval(
                "SELECT (SELECT count(*) FROM entities WHERE org_id = $1)"
                " + (SELECT count(*) FROM blueprints WHERE org_id = $1)"
                " + (SELECT count(*) FROM actions WHERE org_id = $1)",
                org_id,
            )
        )


async def test_api3_server_owned_fields_on_blueprints_and_entities(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    h = org.headers
    r = await client.post("/v1/blueprints", json={**SERVICE, **FORGED}, headers=h)
    assert r.status_code in (201, 422), r.text
    if r.status_code == 201:
        _no_forgery(r.json(), org)
    else:
        await _ok(await client.post("/v1/blueprints", json=SERVICE, headers=h))
    for method, path in (("PUT", "/v1/blueprints/service"), ("PATCH", "/v1/blueprints/service")):
        r = await client.request(method, path, json={**SERVICE, **FORGED}, headers=h)
        assert r.status_code in (200, 422), r.text
    stored = await _ok(await client.get("/v1/blueprints/service", headers=h))
    _no_forgery(stored, org)
    await _ok(
        await client.post(
            "/v1/blueprints/service/entities",
            json={"identifier": "api", "properties": {"tier": "1"}},
            headers=h,
        )
    )
    # One field at a time, so each is refused (or ignored) on its own account.
    for name, value in FORGED.items():
        entity = {"identifier": "api", "properties": {"tier": "2"}, name: value}
        writes = [
            ("POST", "/v1/blueprints/service/entities?upsert=true", entity),
            ("POST", "/v1/blueprints/service/entities?upsert=true&merge=true", entity),
            ("PUT", "/v1/blueprints/service/entities/api", entity),
            ("PATCH", "/v1/blueprints/service/entities/api", entity),
            ("POST", "/v1/blueprints/service/entities/bulk", {"entities": [entity]}),
        ]
        for method, path, body in writes:
            r = await client.request(method, path, json=body, headers=h)
            assert r.status_code in (200, 201, 207, 422), (name, path, r.text)
            _no_forgery(r.json().get("entity") or r.json().get("entities"), org)
    got = (await _ok(await client.get("/v1/blueprints/service/entities/api", headers=h)))["entity"]
    _no_forgery(got, org)
    assert got["createdBy"] == got["updatedBy"] == org.client_id
    assert got["properties"] == {"tier": "1"}
    assert await _rows_of(db, uuid.UUID(FORGED["org_id"])) == 0


async def test_api3_server_owned_fields_on_actions_runs_and_webhooks(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    h = org.headers
    await _ok(await client.post("/v1/blueprints", json=SERVICE, headers=h))
    await _ok(
        await client.post("/v1/blueprints/service/entities", json={"identifier": "api"}, headers=h)
    )
    action = {**DEPLOY, "requiredApproval": False, **FORGED}
    for method, path in (("POST", "/v1/actions"), ("PUT", "/v1/actions/deploy")):
        r = await client.request(method, path, json=action, headers=h)
        assert r.status_code in (200, 201, 422), (path, r.text)
        if r.status_code == 422:
            body = {**DEPLOY, "requiredApproval": False}
            await _ok(await client.request(method, path, json=body, headers=h))
    _no_forgery(await _ok(await client.get("/v1/actions/deploy", headers=h)), org)
    run_body = {
        "properties": {"version": "1"},
        "entity": "api",
        "status": "SUCCESS",
        "source": "AUTOMATION",
        "requiredApproval": False,
        **FORGED,
    }
    r = await client.post("/v1/actions/deploy/runs", json=run_body, headers=h)
    assert r.status_code in (202, 422), r.text
    if r.status_code == 422:
        r = await client.post(
            "/v1/actions/deploy/runs",
            json={"properties": {"version": "1"}, "entity": "api"},
            headers=h,
        )
    run = r.json()["run"]
    assert (run["status"], run["source"]) == ("IN_PROGRESS", "API")
    _no_forgery(run, org)
    r = await client.patch(
        f"/v1/actions/runs/{run['id']}",
        json={"statusLabel": "ok", "source": "UI", "action": {"identifier": "other"}, **FORGED},
        headers=h,
    )
    assert r.status_code in (200, 422), r.text
    stored = (await _ok(await client.get(f"/v1/actions/runs/{run['id']}", headers=h)))["run"]
    _no_forgery(stored, org)
    assert stored["id"] == run["id"] and stored["source"] == "API"
    assert stored["action"]["identifier"] == "deploy"
    assert stored["createdBy"] == org.client_id
    hook = {**HOOK, **FORGED, "webhookKey": "chosen-by-the-caller-0123456789", "url": "http://x/"}
    for method, path in (
        ("POST", "/v1/webhooks"),
        ("PUT", "/v1/webhooks/hook"),
        ("PATCH", "/v1/webhooks/hook"),
    ):
        r = await client.request(method, path, json=hook, headers=h)
        assert r.status_code in (200, 201, 422), (path, r.text)
        if r.status_code == 422 and method == "POST":
            await _ok(await client.post("/v1/webhooks", json=HOOK, headers=h))
    stored_hook = (await _ok(await client.get("/v1/webhooks/hook", headers=h)))["integration"]
    _no_forgery(stored_hook, org)
    assert stored_hook["webhookKey"] != "chosen-by-the-caller-0123456789"
    assert stored_hook["url"].startswith("http://127.0.0.1:8000/") or stored_hook["url"].endswith(
        stored_hook["webhookKey"]
    )


async def test_api3_no_answer_carries_a_stored_secret(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    h = org.headers
    signing = (await _ok(await client.get("/v1/organization/signing-secret", headers=h)))[
        "signingSecret"
    ]
    await _ok(await client.post("/v1/blueprints", json=SERVICE, headers=h))
    await _ok(await client.post("/v1/webhooks", json=HOOK, headers=h))
    await _ok(
        await client.post(
            "/v1/organization/secrets",
            json={"secretName": "TOKEN", "secretValue": SECRET_VALUE},
            headers=h,
        )
    )
    deploy = {
        **DEPLOY,
        "invocationMethod": {
            **DEPLOY["invocationMethod"],
            "headers": {"X": "{{ .secrets.TOKEN }}"},
        },
    }
    await _ok(await client.post("/v1/actions", json=deploy, headers=h))
    async with db.system() as tx:
        hashes = [
            bytes(r["secret_hash"]).hex()
            for r in await tx.fetch(
                "SELECT secret_hash FROM credentials WHERE org_id = $1", org.org_id
            )
        ]
    answers = []
    for path in (
        "/v1/organization",
        "/v1/webhooks",
        "/v1/webhooks/hook",
        "/v1/organization/secrets",
        "/v1/organization/secrets/TOKEN",
        "/v1/apps",
        "/v1/actions",
        "/v1/actions/deploy",
        "/v1/audit-log?limit=1000",
    ):
        r = await client.get(path, headers=h)
        assert r.status_code == 200, (path, r.text)
        answers.append(r.text)
    answers.append((await client.patch("/v1/webhooks/hook", json={"title": "T"}, headers=h)).text)
    answers.append(
        (await client.put("/v1/apps/" + org.client_id, json={"name": "n"}, headers=h)).text
    )
    text = "\n".join(answers)
    for secret in (HOOK_SECRET, SECRET_VALUE, signing, org.client_secret, *hashes):
        assert secret not in text
    assert "secret_hash" not in text and "secretHash" not in text


# ---------------------------------------------------------------------------------------
# API4: Unrestricted resource consumption.
# test_http covers 413 on the token exchange (declared and chunked); test_entities 1000
# entities per bulk write; test_search `limit` 1..1000; test_webhooks the ingest limit and
# `limit` on events; test_ratelimit the per-org buckets. Here: the body limit on
# authenticated writes, the other list and bulk caps, deep nesting on every JSON route
# kind, and queries with too many rules.


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"a": value}
    return value


def _deep_raw(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


async def test_api4_oversized_authenticated_writes_are_413_json(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _ok(await client.post("/v1/blueprints", json=SERVICE, headers=org.headers))
    blob = "x" * (1024 * 1024)
    for path, body in (
        (
            "/v1/blueprints/service/entities/bulk",
            {"entities": [{"identifier": "a", "title": blob}]},
        ),
        ("/v1/blueprints/service/entities", {"identifier": "a", "title": blob}),
        ("/v1/actions", {**DEPLOY, "description": blob}),
    ):
        r = await client.post(path, json=body, headers=org.headers)
        assert r.status_code == 413, (path, r.text[:200])
        assert r.json()["error"] == "payload_too_large"
    count = await client.get("/v1/blueprints/service/entities-count", headers=org.headers)
    assert count.json()["count"] == 0


async def test_api4_list_and_bulk_caps(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    org = await make_org()
    h = org.headers
    await _ok(await client.post("/v1/blueprints", json=SERVICE, headers=h))
    for path in (
        "/v1/audit-log?limit=1001",
        "/v1/audit-log?limit=0",
        "/v1/actions/runs?limit=1001",
        "/v1/actions/runs?limit=-1",
        "/v1/webhooks/any/events?limit=101",
    ):
        r = await client.get(path, headers=h)
        assert r.status_code == 422, (path, r.text)
    r = await client.post(
        "/v1/blueprints/service/bulk/entities/delete",
        json={"entities": [f"e{n}" for n in range(101)]},
        headers=h,
    )
    assert r.status_code == 422, r.text
    r = await client.post(
        "/v1/blueprints/service/entities/bulk",
        json={"entities": [{"identifier": f"e{n}"} for n in range(1001)]},
        headers=h,
    )
    assert 400 <= r.status_code < 500, r.text
    assert (await client.get("/v1/blueprints/service/entities-count", headers=h)).json()[
        "count"
    ] == 0


@pytest.mark.parametrize("depth", [200, 5000])
async def test_api4_deeply_nested_bodies_are_4xx_never_500(
    client: httpx.AsyncClient, make_org: OrgFactory, depth: int
) -> None:
    org = await make_org()
    h = {**org.headers, "Content-Type": "application/json"}
    free = {
        "identifier": "service",
        "title": "S",
        "schema": {"properties": {"tier": {"type": "object"}}},
    }
    await _ok(await client.post("/v1/blueprints", json=free, headers=org.headers))
    deep = _deep_raw(depth)
    bodies = {
        "/v1/blueprints": b'{"identifier":"deep","title":"D","schema":' + deep + b"}",
        "/v1/blueprints/service/entities": b'{"identifier":"d","properties":{"tier":'
        + deep
        + b"}}",
        "/v1/blueprints/service/entities/bulk": b'{"entities":[' + deep + b"]}",
        "/v1/actions": b'{"identifier":"deep","trigger":' + deep + b"}",
        "/v1/webhooks": b'{"title":"deep","mappings":' + deep + b"}",
        "/v1/entities/search": b'{"combinator":"and","rules":[' + deep + b"]}",
        "/v1/blueprints/service/scorecards": b'{"identifier":"s","title":"S","rules":'
        + deep
        + b"}",
        "/v1/auth/access_token": deep,
    }
    for path, raw in bodies.items():
        r = await client.post(path, content=raw, headers=h)
        if path == "/v1/blueprints/service/entities" and r.status_code == 201:
            continue  # an object property may nest; reads below must still work
        assert 400 <= r.status_code < 500 or r.status_code == 207, (depth, path, r.text[:200])
        assert r.json()["ok"] is False
        assert r.json().get("entities", []) == []
    # Stored nesting stays readable and searchable: nothing written above breaks reads.
    for path in ("/v1/blueprints/service/entities", "/v1/blueprints/service/entities-count"):
        assert (await client.get(path, headers=org.headers)).status_code == 200


async def test_api4_nested_query_groups_and_many_rules_are_bounded(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _ok(await client.post("/v1/blueprints", json=SERVICE, headers=org.headers))
    rule = {"property": "tier", "operator": "=", "value": "1"}
    group: dict[str, Any] = {"combinator": "and", "rules": [rule]}
    for _ in range(100):
        group = {"combinator": "or", "rules": [group]}
    many = {"combinator": "or", "rules": [rule] * 10_000}
    for path, query in (
        ("/v1/entities/search", group),
        ("/v1/entities/search", many),
        ("/v1/blueprints/service/entities/search", {"query": many}),
        ("/v1/entities/aggregate", {"func": "count", "query": many}),
    ):
        started = time.monotonic()
        r = await client.post(path, json=query, headers=org.headers)
        assert r.status_code == 422, (path, r.text[:300])
        assert time.monotonic() - started < 5


# ---------------------------------------------------------------------------------------
# API6: Unrestricted access to sensitive business flows.
# test_runs covers Idempotency-Key replays (same answer, one outbox row), a reused key with
# another body (409) and concurrent requests with one key. Here: a key is the caller's
# org's alone - another org sending the same key gets its own run, never the first one -
# and one key cannot start a second run of another action.


async def test_api6_idempotency_keys_are_per_org_and_per_action(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    one, two = await make_org(), await make_org()
    action = {**DEPLOY, "requiredApproval": False}
    other_action = {**action, "identifier": "rollback", "title": "Rollback"}
    for org in (one, two):
        await _ok(await client.post("/v1/blueprints", json=SERVICE, headers=org.headers))
        await _ok(
            await client.post(
                "/v1/blueprints/service/entities", json={"identifier": "api"}, headers=org.headers
            )
        )
        for body in (action, other_action):
            await _ok(await client.post("/v1/actions", json=body, headers=org.headers))
    body = {"properties": {"version": "1"}, "entity": "api"}
    key = {"Idempotency-Key": "deploy-" + uuid.uuid4().hex}
    first = await client.post("/v1/actions/deploy/runs", json=body, headers={**one.headers, **key})
    theirs = await client.post("/v1/actions/deploy/runs", json=body, headers={**two.headers, **key})
    assert first.status_code == theirs.status_code == 202
    assert first.json()["run"]["id"] != theirs.json()["run"]["id"]
    runs_of_two = (await client.get("/v1/actions/runs", headers=two.headers)).json()["runs"]
    assert [r["id"] for r in runs_of_two] == [theirs.json()["run"]["id"]]
    again = await client.post(
        "/v1/actions/rollback/runs", json=body, headers={**one.headers, **key}
    )
    assert again.status_code in (202, 409), again.text
    if again.status_code == 202:
        assert again.json()["run"]["action"]["identifier"] == "rollback"
    listed = (await client.get("/v1/actions/runs", headers=one.headers)).json()["runs"]
    assert len(listed) == (2 if again.status_code == 202 else 1)


# ---------------------------------------------------------------------------------------
# API7: Server side request forgery.
# test_outbound covers the guard on literal private, loopback, link-local, IPv4-mapped and
# NAT64 addresses and `localhost`; test_invokers the client (address pinning, no
# redirects followed, a 301 to 10.0.0.1 a failure); test_dispatch a WEBHOOK run to
# 169.254.169.254 and to 127.0.0.1. The GitHub and GitLab API URLs are operator settings,
# not tenant input, and go through the same client. Here: the other spellings of private
# addresses, and both tenant-given URLs that the worker calls (action invocations and
# changelog destinations) refused end to end when nothing is allowed.

PRIVATE_SPELLINGS = [
    "http://2130706433/",  # 127.0.0.1 as one decimal number
    "http://0177.0.0.1/",  # octal
    "http://0x7f.0.0.1/",  # hexadecimal
    "http://0x7f000001/",
    "http://127.1/",  # short form
    "http://0/",  # 0.0.0.0
    "http://017700000001/",
    "http://[::ffff:7f00:1]/",  # IPv4-mapped, hex words
    "http://[0:0:0:0:0:ffff:127.0.0.1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[::]/",
    "http://[fe80::1%25eth0]/",  # link-local with a zone
    "http://169.254.169.254./",  # trailing dot
    "http://0251.0376.0251.0376/",  # 169.254.169.254 in octal
    "http://2852039166/",  # 169.254.169.254 as a number
    "http://10.0.0.1/",
    "http://167772161/",  # 10.0.0.1 as a number
    "http://LOCALHOST/",
    "http://localhost./",
    "http://ip6-localhost/",
]


@pytest.mark.parametrize("url", PRIVATE_SPELLINGS)
async def test_api7_every_spelling_of_a_private_address_is_refused(url: str) -> None:
    with pytest.raises(Refused):
        await outbound.check(url, Allowed.parse(None))


@pytest.mark.parametrize("url", PRIVATE_SPELLINGS)
async def test_api7_the_client_sends_nothing_to_a_private_spelling(url: str) -> None:
    async with Client() as http:
        with pytest.raises((Refused, httpx.InvalidURL)):
            await http.send(
                "POST", url, headers={}, content=b"{}", allowed=Allowed.parse(None), timeout=2
            )


async def test_api7_an_allowed_network_does_not_open_its_neighbours() -> None:
    allowed = Allowed.parse("127.0.0.1/32")
    for url in ("http://127.0.0.2/", "http://0x7f000002/", "http://[::1]/", "http://10.0.0.1/"):
        with pytest.raises(Refused):
            await outbound.check(url, allowed)


async def test_api7_tenant_urls_to_the_services_own_network_are_never_called(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    start_worker: Callable[..., Settings],
    db: Database,
) -> None:
    org = await make_org()
    secret = (await _ok(await client.get("/v1/organization/signing-secret", headers=org.headers)))[
        "signingSecret"
    ]
    with WebhookReceiver(secret) as receiver:
        port = receiver.port
        spellings = [
            f"http://localhost:{port}/hook",
            f"http://2130706433:{port}/hook",
            f"http://0x7f.0.0.1:{port}/hook",
            f"http://[::ffff:127.0.0.1]:{port}/hook",
        ]
        blueprint = {**SERVICE, "changelogDestination": {"type": "WEBHOOK", "url": spellings[0]}}
        await _ok(await client.post("/v1/blueprints", json=blueprint, headers=org.headers))
        for n, url in enumerate(spellings):
            action = {
                **DEPLOY,
                "identifier": f"hook-{n}",
                "requiredApproval": False,
                "trigger": {**DEPLOY["trigger"], "operation": "CREATE"},
                "invocationMethod": {"type": "WEBHOOK", "url": url},
            }
            await _ok(await client.post("/v1/actions", json=action, headers=org.headers))
        start_worker(outbound_allow=[])
        runs = [
            (
                await _ok(
                    await client.post(
                        f"/v1/actions/hook-{n}/runs", json={"properties": {}}, headers=org.headers
                    )
                )
            )["run"]["id"]
            for n in range(len(spellings))
        ]
        await _ok(
            await client.post(
                "/v1/blueprints/service/entities", json={"identifier": "api"}, headers=org.headers
            )
        )
        deadline = time.monotonic() + 20
        for run_id in runs:
            while True:
                run = (
                    await _ok(await client.get(f"/v1/actions/runs/{run_id}", headers=org.headers))
                )["run"]
                if run["status"] != "IN_PROGRESS":
                    break
                assert time.monotonic() < deadline, run
                await asyncio.sleep(0.05)
            assert run["status"] == "FAILURE"
            logs = (
                await _ok(await client.get(f"/v1/actions/runs/{run_id}/logs", headers=org.headers))
            )["runLogs"]
            assert any("PORTOLAN_OUTBOUND_ALLOW" in entry["message"] for entry in logs)
        while True:
            async with db.system() as tx:
                states = await tx.fetch(
                    "SELECT state, last_error FROM changelog_deliveries WHERE org_id = $1",
                    org.org_id,
                )
            if states and all(s["state"] not in ("pending", "sending") for s in states):
                break
            assert time.monotonic() < deadline, states
            await asyncio.sleep(0.05)
        assert [s["state"] for s in states] == ["failed"]
        assert "PORTOLAN_OUTBOUND_ALLOW" in states[0]["last_error"]
        assert receiver.requests == []


# ---------------------------------------------------------------------------------------
# API8: Security misconfiguration.
# test_http covers a CORS preflight from the configured origin and from another one, the
# security headers on a 200, a 401 and a 404, a 500 from a broken database handle, and
# JSON 404 / 405 bodies. Here: CORS on actual requests and when no origin is configured,
# lookalike origins, the headers on every other kind of answer, and a failure inside an
# endpoint (after its transaction opened) that leaves nothing written and tells nothing.


@asynccontextmanager
async def _app_client(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://portolan.test") as c:
            yield application, c


def _cors_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("access-control-")}


async def test_api8_cors_echoes_only_the_configured_origin(
    make_org: OrgFactory, fresh_settings: Callable[..., Settings]
) -> None:
    org = await make_org()
    allowed = "https://spa.example.org"
    settings = fresh_settings(cors_origins=[allowed])
    async with _app_client(settings) as (_, http):
        r = await http.get("/v1/organization", headers={**org.headers, "Origin": allowed})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == allowed
        assert "origin" in r.headers.get("vary", "").lower()
        for foreign in (
            "https://evil.example.net",
            "https://spa.example.org.evil.net",
            "http://spa.example.org",
            "https://spa.example.org:8443",
            "null",
        ):
            r = await http.get("/v1/organization", headers={**org.headers, "Origin": foreign})
            assert "access-control-allow-origin" not in r.headers, foreign
            pre = await http.options(
                "/v1/organization",
                headers={"Origin": foreign, "Access-Control-Request-Method": "GET"},
            )
            assert pre.headers.get("access-control-allow-origin") in (None, ""), foreign
            assert foreign not in pre.text


async def test_api8_no_cors_headers_without_configured_origins(
    make_org: OrgFactory, fresh_settings: Callable[..., Settings]
) -> None:
    org = await make_org()
    async with _app_client(fresh_settings(cors_origins=[])) as (_, http):
        origin = "https://portal.example.com"
        answers = [
            await http.get("/v1/organization", headers={**org.headers, "Origin": origin}),
            await http.options(
                "/v1/organization",
                headers={
                    "Origin": origin,
                    "Access-Control-Request-Method": "DELETE",
                    "Access-Control-Request-Headers": "authorization",
                },
            ),
        ]
        for r in answers:
            assert _cors_headers(r) == {}, r.headers
        assert answers[1].status_code == 405 and answers[1].json()["ok"] is False


def _secured(response: httpx.Response) -> bool:
    h = response.headers
    return (
        h.get("x-content-type-options") == "nosniff"
        and h.get("x-frame-options") == "DENY"
        and h.get("referrer-policy") == "no-referrer"
        and h.get("cache-control") == "no-store"
        and h.get("content-security-policy", "").startswith("default-src 'none'")
        and len(h.get("x-request-id", "")) > 0
    )


async def test_api8_security_headers_on_every_kind_of_answer(
    client: httpx.AsyncClient, make_org: OrgFactory, fresh_settings: Callable[..., Settings]
) -> None:
    org = await make_org()
    h = org.headers
    answers = {
        "201": await client.post("/v1/blueprints", json=SERVICE, headers=h),
        "200 authed": await client.get("/v1/blueprints/service", headers=h),
        "200 stream": await client.get("/v1/blueprints/service/entities", headers=h),
        "400": await client.post(
            "/v1/blueprints", content=b"{", headers={**h, "Content-Type": "application/json"}
        ),
        "403": await client.post("/v1/platform/orgs", json={"name": "x"}, headers=h),
        "405": await client.patch("/v1/actions/runs", headers=h),
        "409": await client.post("/v1/blueprints", json=SERVICE, headers=h),
        "413": await client.post("/v1/blueprints", content=b"x" * (1024 * 1024 + 1), headers=h),
        "422": await client.post("/v1/blueprints", json={}, headers=h),
        "preflight": await client.options(
            "/v1/blueprints",
            headers={
                "Origin": "https://portal.example.com",
                "Access-Control-Request-Method": "GET",
            },
        ),
        "ingest 404": await client.post("/v1/webhooks/ingest/" + "k" * 40, json={}),
        "openapi": await client.get("/openapi.json"),
    }
    async with _app_client(fresh_settings(rate_limit_other=1)) as (_, limited):
        await limited.get("/v1/organization", headers=h)
        answers["429"] = await limited.get("/v1/organization", headers=h)
    assert answers["429"].status_code == 429
    assert answers["403"].status_code in (401, 403)
    for name, response in answers.items():
        assert _secured(response), (name, response.status_code, dict(response.headers))


async def test_api8_a_failure_inside_an_endpoint_is_a_bare_500_and_rolls_back(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    fresh_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    org = await make_org()
    from app.catalog import blueprints

    real_create = blueprints.create

    async def create_then_fail(*args: Any, **kwargs: Any) -> Any:
        await real_create(*args, **kwargs)
        raise RuntimeError("internal detail: /srv/portolan password=hunter2")

    monkeypatch.setattr(blueprints, "create", create_then_fail)
    async with _app_client(fresh_settings()) as (application, http):

        @application.get("/v1/test-only/boom")
        async def boom() -> None:
            raise ValueError("internal detail: boom at line 42")

        answers = [
            await http.post("/v1/blueprints", json=SERVICE, headers=org.headers),
            await http.get("/v1/test-only/boom"),
        ]
        for r in answers:
            assert r.status_code == 500
            assert r.json() == {
                "ok": False,
                "error": "internal_error",
                "message": "Internal server error",
            }
            assert "internal detail" not in r.text and "Traceback" not in r.text
            assert _secured(r)
    monkeypatch.undo()
    listed = await client.get("/v1/blueprints", headers=org.headers)
    assert listed.json()["blueprints"] == []
    assert "internal detail" in caplog.text  # the operator still sees it


# ---------------------------------------------------------------------------------------
# API9: Improper inventory management.
# test_http checks every route commits through TransactionRoute; `portolan openapi
# --check` that the committed document is the generated one. Here: the routes the app
# serves and the operations the document describes are the same set, both ways, and the
# only undocumented paths are the documentation itself.

UNDOCUMENTED = {"/docs", "/redoc", "/openapi.json"}


def _served(application: FastAPI) -> tuple[set[tuple[str, str]], set[str]]:
    operations: set[tuple[str, str]] = set()
    others: set[str] = set()
    for route in iter_routes(application.routes):
        if isinstance(route, APIRoute):
            if route.include_in_schema:
                path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)  # {id:path} -> {id}
                operations |= {(path, m.lower()) for m in route.methods}
            else:
                others.add(route.path)
        else:
            others.add(str(getattr(route, "path", route)))
    return operations, others


def _described(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (path, method)
        for path, item in document["paths"].items()
        for method in item
        if method in ("get", "put", "post", "patch", "delete", "head", "options")
    }


async def test_api9_served_routes_and_the_committed_document_match(app: FastAPI) -> None:
    operations, others = _served(app)
    committed = json.loads(OPENAPI_FILE.read_text())
    assert operations == _described(app.openapi())
    assert operations == _described(committed)
    assert others == UNDOCUMENTED
    assert len(operations) > 60  # included routers were walked


async def test_api9_no_route_outside_the_inventory_answers(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    for path in (
        "/debug",
        "/admin",
        "/_debug",
        "/v0/organization",
        "/v2/organization",
        "/docs/oauth2-redirect",
        "/.env",
        "/v1/../v1/organization/../../.env",
        "/v1/platform/orgs/list",
        "/v1/organization/secrets/TOKEN/value",
        "/server-status",
    ):
        r = await client.get(path, headers=org.headers)
        assert r.status_code in (404, 405), (path, r.status_code)
        assert r.json()["ok"] is False


def test_api9_the_app_does_not_run_in_debug_mode(app: FastAPI) -> None:
    assert app.debug is False


# ---------------------------------------------------------------------------------------
# API10: Unsafe consumption of APIs.
# test_invokers covers redirects (not followed), timeouts, a dripping server, a 64 KiB cap
# on a synchronized webhook's kept answer, plain-text answers, secrets echoed back masked,
# and GitHub's / GitLab's error shapes; test_webhooks jq errors, poisoned events and the
# ingest's own limits. Here: an endless or huge answer is read only up to the client's
# limit, non-JSON garbage from each kind of receiver ends as one short log line, and
# incoming payloads that look like code stay data.


def _endless_server(stop: threading.Event) -> socket.socket:
    """Answers 200 and then streams body bytes for as long as it is read."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n")
            chunk = b"<p>" + b"A" * 65536
            while not stop.is_set():
                try:
                    conn.sendall(chunk)
                except OSError:
                    return

    threading.Thread(target=serve, daemon=True).start()
    return listener


async def test_api10_an_endless_answer_is_read_up_to_the_limit() -> None:
    stop = threading.Event()
    listener = _endless_server(stop)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
    try:
        async with Client() as http:
            started = time.monotonic()
            response = await http.send(
                "GET",
                url,
                headers={},
                content=None,
                allowed=Allowed.parse("127.0.0.1/32"),
                timeout=5,
            )
        assert time.monotonic() - started < 5
        assert 0 < len(response.content) <= READ_LIMIT_BYTES
    finally:
        stop.set()
        listener.close()


async def test_api10_garbage_answers_end_as_one_short_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    garbage = ("<html>" + "\u202e\r\n\x00 junk " * 200_000 + "</html>").encode("utf-8", "replace")
    local = Allowed.parse("127.0.0.1/32")
    secrets = {"GITHUB_TOKEN": "ghp_" + "t" * 36, "GITLAB_TRIGGER_TOKEN": "glptt-" + "t" * 20}
    with (
        WebhookReceiver("whsec_" + "c2VjcmV0" * 4) as hook,
        GitHubReceiver({secrets["GITHUB_TOKEN"]}, {("acme", "repo", "ci.yml")}) as github,
        GitLabReceiver({"g/p": secrets["GITLAB_TRIGGER_TOKEN"]}, refs={"main"}) as gitlab,
    ):
        hook.fail_next(1, 400, body=garbage)
        github.fail_next(1, 422, body=garbage)
        gitlab.fail_next(1, 400, body=garbage)
        async with Client() as http:
            methods = [
                {"type": "WEBHOOK", "url": hook.url},
                {"type": "WEBHOOK", "url": hook.url, "synchronized": True},
                {"type": "GITHUB", "org": "acme", "repo": "repo", "workflow": "ci.yml"},
                {"type": "GITLAB", "projectName": "p", "groupName": "g"},
            ]
            hook.fail_next(1, 200, body=garbage)  # the synchronized call's answer
            for method in methods:
                outcome = await invoke(
                    method,
                    Context(
                        run_id="r_owasp",
                        signing_secret="whsec_" + "c2VjcmV0" * 4,
                        secrets=secrets,
                        allowed=local,
                        github_api_url=github.url,
                        gitlab_api_url=gitlab.api_url,
                        timeout=5,
                        inputs={},
                        client=http,
                    ),
                )
                assert len(outcome.message) <= 500, (method, outcome.message[:100])
                assert "\n" not in outcome.message
                if isinstance(outcome.response, str):
                    assert len(outcome.response) <= 64 * 1024
    assert len(hook.requests) == 2 and len(github.requests) == len(gitlab.requests) == 1
    assert len(caplog.text) < 20_000


async def _until_ended(client: httpx.AsyncClient, org: Org, run_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:
        r = await client.get(f"/v1/actions/runs/{run_id}", headers=org.headers)
        run: dict[str, Any] = r.json()["run"]
        if run["status"] in ("SUCCESS", "FAILURE"):
            return run
        assert time.monotonic() < deadline, run
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, b"bad \x00 request\r\n\x1b[31m"),
        (200, b'{"deployed": "v1\\u0000", "\\u0000": 1}'),
        (200, b"plain \x00 text \xff\xfe"),
        (500, b"\x00" * 10_000),
    ],
)
async def test_api10_nul_and_control_bytes_in_an_answer_end_the_run_cleanly(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    start_worker: Callable[..., Settings],
    status: int,
    body: bytes,
) -> None:
    # PostgreSQL text and jsonb hold no NUL: an answer carrying one must still end the run
    # with its log line instead of failing every attempt to record it.
    org = await make_org()
    secret = (await _ok(await client.get("/v1/organization/signing-secret", headers=org.headers)))[
        "signingSecret"
    ]
    await _ok(await client.post("/v1/blueprints", json=SERVICE, headers=org.headers))
    with WebhookReceiver(secret) as receiver:
        action = {
            **DEPLOY,
            "requiredApproval": False,
            "trigger": {**DEPLOY["trigger"], "operation": "CREATE"},
            "invocationMethod": {"type": "WEBHOOK", "url": receiver.url, "synchronized": True},
        }
        await _ok(await client.post("/v1/actions", json=action, headers=org.headers))
        receiver.fail_until(time.monotonic() + 60, status, body=body)
        start_worker(dispatch_max_attempts=2)
        run_id = (
            await _ok(
                await client.post(
                    "/v1/actions/deploy/runs", json={"properties": {}}, headers=org.headers
                )
            )
        )["run"]["id"]
        run = await _until_ended(client, org, run_id)
    assert run["status"] == ("SUCCESS" if status == 200 else "FAILURE")
    logs = (await _ok(await client.get(f"/v1/actions/runs/{run_id}/logs", headers=org.headers)))[
        "runLogs"
    ]
    assert logs and all("\x00" not in entry["message"] for entry in logs)


async def test_api10_hostile_incoming_payloads_stay_data(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    h = org.headers
    await _ok(await client.post("/v1/blueprints", json=SERVICE, headers=h))
    await _ok(
        await client.post(
            "/v1/organization/secrets",
            json={"secretName": "TOKEN", "secretValue": SECRET_VALUE},
            headers=h,
        )
    )
    hook = {
        "identifier": "hostile",
        "title": "Hostile",
        "mappings": [
            {
                "blueprint": "service",
                "itemsToParse": ".body.items",
                "entity": {"identifier": ".item.id", "properties": {"tier": ".item.tier"}},
            }
        ],
    }
    made = (await _ok(await client.post("/v1/webhooks", json=hook, headers=h)))["integration"]
    path = f"/v1/webhooks/ingest/{made['webhookKey']}"
    hostile = [
        '") | env | tostring | ("',
        "{{ .secrets.TOKEN }}",
        "$__loc__",
        '"; input_filename; "',
        "\\(env.HOME)",
        "' or 1=1 --",
        "<script>alert(1)</script>",
    ]
    items = [{"id": f"h{n}", "tier": text} for n, text in enumerate(hostile)]
    start_worker()
    events = [
        {"items": items},
        {"items": [{"id": f"b{n}"} for n in range(20_000)]},
        {"items": [{"id": "deep", "tier": _nested(90)}]},
        {"items": [{"id": "after", "tier": "fine"}]},
    ]
    for body in events:
        r = await client.post(path, json=body)
        assert r.status_code == 202, r.text[:200]
    deadline = time.monotonic() + 30
    while True:
        listed = (await _ok(await client.get("/v1/webhooks/hostile/events", headers=h)))["events"]
        if len(listed) == len(events) and all(e["status"] != "pending" for e in listed):
            break
        assert time.monotonic() < deadline, listed
        await asyncio.sleep(0.1)
    for n, text in enumerate(hostile):
        got = await _ok(await client.get(f"/v1/blueprints/service/entities/h{n}", headers=h))
        assert got["entity"]["properties"]["tier"] == text
    after = await client.get("/v1/blueprints/service/entities/after", headers=h)
    assert after.status_code == 200
    count = await _ok(await client.get("/v1/blueprints/service/entities-count", headers=h))
    assert count["count"] <= len(hostile) + 1 + 1000  # items per event are capped
    everything = (await client.get("/v1/blueprints/service/entities", headers=h)).text
    assert SECRET_VALUE not in everything
    outcomes = json.dumps(listed)
    assert len(outcomes) < 200_000 and SECRET_VALUE not in outcomes
