"""Organization secrets: Port's routes, values encrypted at rest and never returned; the
webhook signing secret made with the org, readable and rotatable; tenancy."""

from __future__ import annotations

import json
from typing import Any

import httpx

from app.config import Settings
from app.db.database import Database
from app.kit.crypto import cipher_for
from app.orgs import service as org_service
from app.secrets import service
from tests.conftest import OrgFactory


async def test_secrets_in_ports_shapes_never_show_their_value(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, settings: Settings
) -> None:
    org = await make_org()
    value = "ghp_not-a-real-token-123"
    r = await client.post(
        "/v1/organization/secrets",
        json={"secretName": "GITHUB_TOKEN", "secretValue": value, "description": "CI"},
        headers=org.headers,
    )
    assert r.status_code == 201, r.text
    assert r.json()["secret"]["secretName"] == "GITHUB_TOKEN"
    seen: list[Any] = [r.json()]
    again = await client.post(
        "/v1/organization/secrets",
        json={"secretName": "GITHUB_TOKEN", "secretValue": "x"},
        headers=org.headers,
    )
    assert again.status_code == 409 and again.json()["ok"] is False
    bad = await client.post(
        "/v1/organization/secrets",
        json={"secretName": "no spaces", "secretValue": "x"},
        headers=org.headers,
    )
    assert bad.status_code == 422
    listed = await client.get("/v1/organization/secrets", headers=org.headers)
    assert [s["secretName"] for s in listed.json()["secrets"]] == ["GITHUB_TOKEN"]
    one = await client.get("/v1/organization/secrets/GITHUB_TOKEN", headers=org.headers)
    assert one.json()["secret"]["description"] == "CI"
    changed = await client.patch(
        "/v1/organization/secrets/GITHUB_TOKEN",
        json={"secretValue": "ghp_rotated", "description": "rotated"},
        headers=org.headers,
    )
    assert changed.status_code == 200 and changed.json()["secret"]["description"] == "rotated"
    seen += [listed.json(), one.json(), changed.json()]
    for body in seen:
        text = json.dumps(body)
        assert value not in text and "ghp_rotated" not in text and "secretValue" not in text
    # Encrypted at rest; readable for invocations only.
    async with db.tenant(org.org_id) as tx:
        stored = await tx.fetchval("SELECT value_encrypted FROM org_secrets")
        revealed = await service.reveal(tx, cipher_for(settings))
    assert "ghp_" not in stored and revealed == {"GITHUB_TOKEN": "ghp_rotated"}
    r = await client.delete("/v1/organization/secrets/GITHUB_TOKEN", headers=org.headers)
    assert r.status_code == 200 and r.json() == {"ok": True}
    r = await client.get("/v1/organization/secrets/GITHUB_TOKEN", headers=org.headers)
    assert r.status_code == 404 and r.json()["error"] == "not_found"


async def test_secrets_never_cross_tenants(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    ours, theirs = await make_org(), await make_org()
    r = await client.post(
        "/v1/organization/secrets",
        json={"secretName": "TOKEN", "secretValue": "ours"},
        headers=ours.headers,
    )
    assert r.status_code == 201, r.text
    assert (await client.get("/v1/organization/secrets", headers=theirs.headers)).json()[
        "secrets"
    ] == []
    for method, body in (("get", None), ("patch", {"secretValue": "x"}), ("delete", None)):
        r = await client.request(
            method, "/v1/organization/secrets/TOKEN", json=body, headers=theirs.headers
        )
        assert r.status_code == 404, (method, r.text)
    # Each org reads its own signing secret.
    ours_key = (await client.get("/v1/organization/signing-secret", headers=ours.headers)).json()
    theirs_key = (
        await client.get("/v1/organization/signing-secret", headers=theirs.headers)
    ).json()
    assert ours_key["signingSecret"] != theirs_key["signingSecret"]
    rotated = await client.post("/v1/organization/signing-secret/rotate", headers=theirs.headers)
    assert rotated.status_code == 200
    again = await client.get("/v1/organization/signing-secret", headers=ours.headers)
    assert again.json()["signingSecret"] == ours_key["signingSecret"]
    # The same name is theirs to use.
    r = await client.post(
        "/v1/organization/secrets",
        json={"secretName": "TOKEN", "secretValue": "theirs"},
        headers=theirs.headers,
    )
    assert r.status_code == 201, r.text


async def test_signing_secret_comes_with_the_org_and_rotates(
    client: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    platform_headers: dict[str, str],
) -> None:
    r = await client.post("/v1/platform/orgs", json={"name": "signer"}, headers=platform_headers)
    assert r.status_code == 201, r.text
    created = r.json()
    first = created["signingSecret"]
    assert len(first) >= 32
    token = (
        await client.post(
            "/v1/auth/access_token",
            json={"clientId": created["clientId"], "clientSecret": created["clientSecret"]},
        )
    ).json()["accessToken"]
    headers = {"Authorization": f"Bearer {token}"}
    r = await client.get("/v1/organization/signing-secret", headers=headers)
    assert r.status_code == 200 and r.json()["signingSecret"] == first
    r = await client.post("/v1/organization/signing-secret/rotate", headers=headers)
    rotated = r.json()["signingSecret"]
    assert r.status_code == 200 and rotated != first
    r = await client.get("/v1/organization/signing-secret", headers=headers)
    assert r.json()["signingSecret"] == rotated
    async with db.system() as tx:
        stored = await tx.fetchval(
            "SELECT signing_secret_encrypted FROM organizations WHERE id = $1",
            __import__("uuid").UUID(created["orgId"]),
        )
    assert rotated not in stored
    # Another org reads its own.
    async with db.system() as tx:
        other = await org_service.create_org(tx, name="other", cipher=cipher_for(settings))
    assert other.signing_secret not in (first, rotated)
