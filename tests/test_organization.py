"""GET /v1/organization and the operator's platform API."""

from __future__ import annotations

import httpx

from app.db.database import Database
from tests.conftest import OrgFactory
from tests.test_permissions import app_headers


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


# -- PUT / PATCH /v1/organization ---------------------------------------------------------


async def test_an_admin_renames_the_org_and_sets_its_settings(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org("Old name")
    body = {
        "name": "New name",
        "settings": {"hiddenBlueprints": ["legacy"], "portalTitle": "Our portal"},
        "announcement": {"content": "Maintenance at noon", "color": "red"},
    }
    r = await client.put("/v1/organization", json=body, headers=org.headers)
    assert r.status_code == 200, r.text
    seen = (await client.get("/v1/organization", headers=org.headers)).json()["organization"]
    assert (seen["name"], seen["settings"], seen["announcement"]) == (
        "New name",
        {"hiddenBlueprints": ["legacy"], "portalTitle": "Our portal"},
        {"content": "Maintenance at noon", "color": "red"},
    )


async def test_put_clears_what_it_does_not_give(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await client.put(
        "/v1/organization",
        json={"name": "a", "settings": {"federatedLogout": True}, "announcement": {"content": "x"}},
        headers=org.headers,
    )
    r = await client.put("/v1/organization", json={"name": "b"}, headers=org.headers)
    assert (r.json()["organization"]["settings"], r.json()["organization"]["announcement"]) == (
        {},
        None,
    )


async def test_patch_changes_only_what_it_gives(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org("Keep me")
    await client.patch(
        "/v1/organization",
        json={"settings": {"portalTitle": "T", "portalIcon": "rocket"}},
        headers=org.headers,
    )
    r = await client.patch(
        "/v1/organization",
        json={"settings": {"portalIcon": None, "federatedLogout": False}},
        headers=org.headers,
    )
    assert r.status_code == 200, r.text
    seen = r.json()["organization"]
    assert (seen["name"], seen["settings"]) == (
        "Keep me",
        {"portalTitle": "T", "federatedLogout": False},
    )


async def test_patch_merges_the_announcement(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await client.patch(
        "/v1/organization",
        json={"announcement": {"content": "Hello", "color": "blue"}},
        headers=org.headers,
    )
    r = await client.patch(
        "/v1/organization", json={"announcement": {"enabled": False}}, headers=org.headers
    )
    assert r.json()["organization"]["announcement"] == {
        "content": "Hello",
        "color": "blue",
        "enabled": False,
    }


async def test_an_announcement_needs_content(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    r = await client.patch(
        "/v1/organization", json={"announcement": {"enabled": True}}, headers=org.headers
    )
    assert r.status_code == 422
    assert r.json()["details"] == [{"pointer": "/announcement/content", "message": "required"}]


async def test_a_change_is_audited(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    org = await make_org("Before")
    await client.patch("/v1/organization", json={"name": "After"}, headers=org.headers)
    r = await client.get("/v1/audit-log", params={"resources": "organization"}, headers=org.headers)
    [entry] = r.json()["audits"]
    assert (entry["identifier"], entry["action"], entry["trigger"]["by"]["userId"]) == (
        str(org.org_id),
        "UPDATE",
        org.client_id,
    )
    assert (entry["diff"]["before"]["name"], entry["diff"]["after"]["name"]) == ("Before", "After")


async def test_a_change_that_changes_nothing_is_not_audited(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org("Same")
    await client.put("/v1/organization", json={"name": "Same"}, headers=org.headers)
    r = await client.get("/v1/audit-log", params={"resources": "organization"}, headers=org.headers)
    assert r.json()["audits"] == []


async def test_a_member_cannot_change_the_org(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org("Untouched")
    member = await app_headers(client, db, org.org_id, ["Member"])
    for method in ("PUT", "PATCH"):
        r = await client.request(method, "/v1/organization", json={"name": "x"}, headers=member)
        assert r.status_code == 403
        assert r.json() == {**r.json(), "ok": False, "error": "missing_permission"}
    seen = (await client.get("/v1/organization", headers=org.headers)).json()["organization"]
    assert seen["name"] == "Untouched"


async def test_a_change_never_reaches_another_org(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org_a = await make_org("A")
    org_b = await make_org("B")
    await client.put(
        "/v1/organization",
        json={"name": "B renamed", "settings": {"portalTitle": "B"}},
        headers=org_b.headers,
    )
    seen = (await client.get("/v1/organization", headers=org_a.headers)).json()["organization"]
    assert (seen["name"], seen["settings"]) == ("A", {})
    audits = await client.get(
        "/v1/audit-log", params={"resources": "organization"}, headers=org_a.headers
    )
    assert audits.json()["audits"] == []


async def test_a_change_needs_a_token(client: httpx.AsyncClient) -> None:
    r = await client.put("/v1/organization", json={"name": "x"})
    assert r.status_code == 401 and r.json()["ok"] is False


async def test_put_needs_a_name(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    org = await make_org()
    r = await client.put("/v1/organization", json={"settings": {}}, headers=org.headers)
    assert r.status_code == 422 and r.json()["ok"] is False and r.json()["message"]


async def test_a_blank_or_null_name_is_refused(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    for method, body in (("PUT", {"name": "  "}), ("PATCH", {"name": None})):
        r = await client.request(method, "/v1/organization", json=body, headers=org.headers)
        assert r.status_code == 422, (method, r.text)
        assert r.json()["error"] == "invalid_request"


async def test_unknown_keys_and_bad_values_are_refused(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    for body in (
        {"name": "x", "hiddenBlueprints": []},
        {"name": "x", "settings": {"theme": "dark"}},
        {"name": "x", "settings": {"portalTitle": "t" * 31}},
        {"name": "x", "announcement": {"content": "hi", "color": "green"}},
    ):
        r = await client.put("/v1/organization", json=body, headers=org.headers)
        assert r.status_code == 422, body
        assert r.json()["ok"] is False


async def test_ports_onboarding_and_support_settings_are_not_supported(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    for body, pointer in (
        ({"name": "x", "isOnboarded": True}, "/isOnboarded"),
        (
            {"name": "x", "toolSelectionProvisioning": {"status": "DONE"}},
            "/toolSelectionProvisioning",
        ),
        ({"name": "x", "settings": {"supportUserTTL": "ONE_DAY"}}, "/settings/supportUserTTL"),
        (
            {"name": "x", "settings": {"supportUserPermission": "OPT_IN"}},
            "/settings/supportUserPermission",
        ),
    ):
        r = await client.patch("/v1/organization", json=body, headers=org.headers)
        assert r.status_code == 422, body
        assert r.json()["error"] == "not_supported"
        assert [d["pointer"] for d in r.json()["details"]] == [pointer]
    r = await client.patch(
        "/v1/organization",
        json={"settings": {"supportUserPermission": "OPT_OUT"}},
        headers=org.headers,
    )
    assert r.status_code == 200


async def test_a_malformed_body_is_a_400(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    org = await make_org()
    r = await client.put(
        "/v1/organization",
        content=b"{not json",
        headers={**org.headers, "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"] == "invalid_json"
