"""Port's member views of integrations and webhooks: `GET /v1/integration/metadata` and
`GET /v1/webhooks/metadata` tell every member what is installed, never how it is set up."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from app.db.database import Database
from tests.conftest import OrgFactory
from tests.test_permissions import add_user, app_headers, user_headers

GITHUB_WEBHOOK = {"identifier": "github", "title": "GitHub", "icon": "Github", "mappings": []}


async def test_members_see_what_is_installed_and_nothing_of_its_settings(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, app: FastAPI
) -> None:
    org, other = await make_org(), await make_org()
    r = await client.post(
        "/v1/integration",
        json={
            "installationId": "k8s",
            "installationAppType": "kubernetes",
            "version": "1.2.0",
            "config": {"token": "s3cr3t-config"},
        },
        headers=org.headers,
    )
    assert r.status_code == 201, r.text
    webhook = {
        **GITHUB_WEBHOOK,
        "security": {
            "secret": "hook-s3cr3t",
            "signatureAlgorithm": "sha256",
            "signatureHeaderName": "X-Hub-Signature-256",
        },
    }
    r = await client.post("/v1/webhooks", json=webhook, headers=org.headers)
    assert r.status_code in (200, 201), r.text
    r = await client.post(
        "/v1/integration", json={"installationId": "theirs"}, headers=other.headers
    )
    assert r.status_code == 201, r.text
    await add_user(db, org.org_id, "member@example.com", roles=["Member"])
    for headers in (
        user_headers(app, org.org_id, "member@example.com"),
        await app_headers(client, db, org.org_id, ["Member"]),
        org.headers,
    ):
        r = await client.get("/v1/integration/metadata", headers=headers)
        assert r.status_code == 200, r.text
        (found,) = r.json()["integrations"]
        assert set(found) == {
            "identifier",
            "installationId",
            "integrationType",
            "title",
            "version",
            "updatedAt",
        }
        assert (found["identifier"], found["integrationType"], found["version"]) == (
            "k8s",
            "kubernetes",
            "1.2.0",
        )
        r = await client.get("/v1/webhooks/metadata", headers=headers)
        assert r.status_code == 200, r.text
        (hook,) = r.json()["webhooks"]
        assert set(hook) == {"identifier", "title", "icon", "integrationType", "updatedAt"}
        assert (hook["identifier"], hook["title"], hook["icon"]) == ("github", "GitHub", "Github")
        assert "s3cr3t" not in r.text
    # The full views stay the Admins'.
    member = user_headers(app, org.org_id, "member@example.com")
    assert (await client.get("/v1/integration", headers=member)).status_code == 403
    assert (await client.get("/v1/webhooks", headers=member)).status_code == 403
    # Another org sees its own only.
    r = await client.get("/v1/integration/metadata", headers=other.headers)
    assert [i["identifier"] for i in r.json()["integrations"]] == ["theirs"]
    r = await client.get("/v1/webhooks/metadata", headers=other.headers)
    assert r.json()["webhooks"] == []


async def test_metadata_is_no_ones_identifier_and_takes_no_parameters(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    r = await client.post(
        "/v1/integration", json={"installationId": "metadata"}, headers=org.headers
    )
    assert r.status_code == 422 and r.json()["ok"] is False, r.text
    r = await client.post(
        "/v1/webhooks", json={**GITHUB_WEBHOOK, "identifier": "metadata"}, headers=org.headers
    )
    assert r.status_code == 422 and r.json()["ok"] is False, r.text
    for path in ("/v1/integration/metadata", "/v1/webhooks/metadata"):
        r = await client.get(path, params={"identifier": "x"}, headers=org.headers)
        assert r.status_code == 422 and r.json()["error"] == "unknown_query_parameter", r.text
    assert (await client.get("/v1/integration/metadata")).status_code == 401
