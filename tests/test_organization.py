"""GET /v1/organization and the operator's platform API."""

from __future__ import annotations

import httpx

from tests.conftest import OrgFactory


async def test_organization_has_ports_shape(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org("Acme Platform")
    response = await client.get("/v1/organization", headers=org.headers)
    body = response.json()
    assert response.status_code == 200
    assert body["ok"] is True
    assert body["organization"]["id"] == str(org.org_id)
    assert body["organization"]["name"] == "Acme Platform"
    assert body["organization"]["featureFlags"] == []


async def test_each_org_reads_only_itself(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    org_a = await make_org("same-name")
    org_b = await make_org("same-name")
    seen_a = (await client.get("/v1/organization", headers=org_a.headers)).json()
    seen_b = (await client.get("/v1/organization", headers=org_b.headers)).json()
    assert seen_a["organization"]["id"] == str(org_a.org_id)
    assert seen_b["organization"]["id"] == str(org_b.org_id)


async def test_platform_api_creates_an_org_that_can_sign_in(
    client: httpx.AsyncClient, platform_headers: dict[str, str]
) -> None:
    created = await client.post(
        "/v1/platform/orgs", json={"name": "Globex"}, headers=platform_headers
    )
    body = created.json()
    assert created.status_code == 201
    assert {"orgId", "name", "clientId", "clientSecret"} <= set(body)
    token = await client.post(
        "/v1/auth/access_token",
        json={"clientId": body["clientId"], "clientSecret": body["clientSecret"]},
    )
    org = await client.get(
        "/v1/organization", headers={"Authorization": f"Bearer {token.json()['accessToken']}"}
    )
    assert org.json()["organization"] == {
        **org.json()["organization"],
        "id": body["orgId"],
        "name": "Globex",
    }


async def test_platform_api_refuses_a_wrong_token(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/platform/orgs", json={"name": "x"}, headers={"Authorization": "Bearer wrong"}
    )
    assert response.status_code == 401 and response.json()["ok"] is False


async def test_platform_api_refuses_a_tenant_token(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    response = await client.post("/v1/platform/orgs", json={"name": "x"}, headers=org.headers)
    assert response.status_code == 401


async def test_platform_api_rejects_a_blank_name(
    client: httpx.AsyncClient, platform_headers: dict[str, str]
) -> None:
    response = await client.post(
        "/v1/platform/orgs", json={"name": "   "}, headers=platform_headers
    )
    assert response.status_code == 422 and response.json()["error"] == "invalid_request"


async def test_platform_api_is_off_without_a_platform_token(
    client: httpx.AsyncClient,
    app,
    platform_headers: dict[str, str],  # type: ignore[no-untyped-def]
) -> None:
    original = app.state.settings
    app.state.settings = original.model_copy(update={"platform_token": None})
    try:
        response = await client.post(
            "/v1/platform/orgs", json={"name": "x"}, headers=platform_headers
        )
    finally:
        app.state.settings = original
    assert response.status_code == 403
