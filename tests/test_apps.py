"""Machine credentials (`/v1/apps`): Admins create, list, change, rotate and delete them; the
secret is shown once; roles are checked; the last Admin credential stays; per org."""

from __future__ import annotations

import asyncio

import httpx

from tests.conftest import Org, OrgFactory


async def _token(client: httpx.AsyncClient, client_id: str, secret: str) -> httpx.Response:
    return await client.post(
        "/v1/auth/access_token", json={"clientId": client_id, "clientSecret": secret}
    )


async def _bearer(client: httpx.AsyncClient, client_id: str, secret: str) -> dict[str, str]:
    r = await _token(client, client_id, secret)
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['accessToken']}"}


async def test_create_use_rotate_and_delete(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    r = await client.post("/v1/apps", json={"name": "ci", "roles": ["Member"]}, headers=org.headers)
    assert r.status_code == 201, r.text
    made = r.json()["app"]
    assert made["name"] == "ci" and made["roles"] == ["Member"] and made["secret"]
    member = await _bearer(client, made["clientId"], made["secret"])
    # A Member reads the catalog but manages no credentials.
    assert (await client.get("/v1/blueprints", headers=member)).status_code == 200
    r = await client.get("/v1/apps", headers=member)
    assert r.status_code == 403 and r.json()["ok"] is False
    listed = (await client.get("/v1/apps", headers=org.headers)).json()["apps"]
    assert {a["clientId"] for a in listed} == {org.client_id, made["clientId"]}
    assert all("secret" not in a for a in listed)
    r = await client.post(f"/v1/apps/{made['clientId']}/rotate-secret", headers=org.headers)
    fresh = r.json()["app"]["secret"]
    assert fresh != made["secret"]
    assert (await _token(client, made["clientId"], made["secret"])).status_code == 401
    assert (await _token(client, made["clientId"], fresh)).status_code == 200
    r = await client.put(
        f"/v1/apps/{made['clientId']}", json={"name": "ci", "roles": ["Admin"]}, headers=org.headers
    )
    assert r.json()["app"]["roles"] == ["Admin"]
    assert (await client.delete(f"/v1/apps/{made['clientId']}", headers=org.headers)).json() == {
        "ok": True
    }
    assert (await _token(client, made["clientId"], fresh)).status_code == 401
    assert (
        await client.delete(f"/v1/apps/{made['clientId']}", headers=org.headers)
    ).status_code == 404


async def test_roles_are_checked(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    org = await make_org()
    r = await client.post("/v1/apps", json={"name": "x", "roles": ["Root"]}, headers=org.headers)
    assert r.status_code == 422 and r.json()["details"][0]["pointer"] == "/roles/0"
    r = await client.post(
        "/v1/apps", json={"name": "x", "roles": ["service-moderator"]}, headers=org.headers
    )
    assert r.status_code == 422
    await client.post(
        "/v1/blueprints",
        json={"identifier": "service", "title": "S", "schema": {}},
        headers=org.headers,
    )
    r = await client.post(
        "/v1/apps", json={"name": "x", "roles": ["service-moderator"]}, headers=org.headers
    )
    assert r.status_code == 201
    r = await client.post(
        "/v1/apps", json={"name": "x", "roles": ["Admin"], "org_id": "x"}, headers=org.headers
    )
    assert r.status_code == 422  # no mass assignment


async def test_the_last_admin_credential_stays(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    r = await client.delete(f"/v1/apps/{org.client_id}", headers=org.headers)
    assert r.status_code == 409 and r.json()["error"] == "last_admin_credential"
    r = await client.put(
        f"/v1/apps/{org.client_id}",
        json={"name": "default", "roles": ["Member"]},
        headers=org.headers,
    )
    assert r.status_code == 409
    second = (
        await client.post("/v1/apps", json={"name": "a2", "roles": ["Admin"]}, headers=org.headers)
    ).json()["app"]
    r = await client.delete(f"/v1/apps/{org.client_id}", headers=org.headers)
    assert r.status_code == 200
    assert second["roles"] == ["Admin"]


async def test_apps_are_per_org(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    one, two = await make_org(), await make_org()

    async def try_all(org: Org, target: str) -> list[int]:
        return [
            (
                await client.put(f"/v1/apps/{target}", json={"name": "z"}, headers=org.headers)
            ).status_code,
            (
                await client.post(f"/v1/apps/{target}/rotate-secret", headers=org.headers)
            ).status_code,
            (await client.delete(f"/v1/apps/{target}", headers=org.headers)).status_code,
        ]

    assert await try_all(two, one.client_id) == [404, 404, 404]
    listed = (await client.get("/v1/apps", headers=two.headers)).json()["apps"]
    assert [a["clientId"] for a in listed] == [two.client_id]


async def test_tokens_end_with_their_credential(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    made = (
        await client.post("/v1/apps", json={"name": "ci", "roles": ["Member"]}, headers=org.headers)
    ).json()["app"]
    old = await _bearer(client, made["clientId"], made["secret"])
    assert (await client.get("/v1/blueprints", headers=old)).status_code == 200
    # Tokens carry whole seconds: the rotation must come in a later second than the token.
    await asyncio.sleep(1.1)
    r = await client.post(f"/v1/apps/{made['clientId']}/rotate-secret", headers=org.headers)
    fresh_secret = r.json()["app"]["secret"]
    r = await client.get("/v1/blueprints", headers=old)
    assert r.status_code == 401 and r.json()["error"] == "invalid_token"
    fresh = await _bearer(client, made["clientId"], fresh_secret)
    assert (await client.get("/v1/blueprints", headers=fresh)).status_code == 200
    # Changing the roles ends the tokens that carry the old ones.
    await asyncio.sleep(1.1)
    r = await client.put(
        f"/v1/apps/{made['clientId']}", json={"name": "ci", "roles": ["Admin"]}, headers=org.headers
    )
    assert r.status_code == 200
    assert (await client.get("/v1/blueprints", headers=fresh)).status_code == 401
    admin = await _bearer(client, made["clientId"], fresh_secret)
    assert (await client.get("/v1/audit-log", headers=admin)).status_code == 200
    # A deleted credential's tokens stop at once.
    assert (await client.delete(f"/v1/apps/{made['clientId']}", headers=org.headers)).is_success
    assert (await client.get("/v1/blueprints", headers=admin)).status_code == 401
    # The rotation and the role change are in the audit log (the secret's hash is not).
    r = await client.get(
        "/v1/audit-log",
        params={"resources": "credential", "identifier": made["clientId"]},
        headers=org.headers,
    )
    actions = [a["action"] for a in r.json()["audits"]]
    assert actions.count("UPDATE") == 2 and "DELETE" in actions and "CREATE" in actions
    assert "secret_hash" not in r.text


# -- Port's PUT {name}, enabled / updatedAt, fields ----------------------------------------


async def _made(client: httpx.AsyncClient, org: Org, roles: list[str]) -> dict[str, str]:
    r = await client.post("/v1/apps", json={"name": "ci", "roles": roles}, headers=org.headers)
    assert r.status_code == 201, r.text
    return dict(r.json()["app"])


async def test_apps_carry_enabled_and_updated_at(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    made = await _made(client, org, ["Member"])
    assert made["enabled"] is True and made["updatedAt"] == made["createdAt"]
    await asyncio.sleep(0.01)
    r = await client.put(
        f"/v1/apps/{made['clientId']}", json={"name": "renamed"}, headers=org.headers
    )
    assert r.status_code == 200, r.text
    renamed = r.json()["app"]
    assert (renamed["name"], renamed["roles"], renamed["enabled"]) == ("renamed", ["Member"], True)
    assert renamed["updatedAt"] > made["updatedAt"]


async def test_put_needs_ports_name(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    org = await make_org()
    made = await _made(client, org, ["Member"])
    for body in ({"roles": ["Admin"]}, {"name": ""}, {"name": "x", "secret": "mine"}):
        r = await client.put(f"/v1/apps/{made['clientId']}", json=body, headers=org.headers)
        assert r.status_code == 422, body
        assert r.json()["ok"] is False and r.json()["message"]


async def test_a_disabled_credentials_tokens_are_refused_at_once(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    made = await _made(client, org, ["Member"])
    token = await _bearer(client, made["clientId"], made["secret"])
    r = await client.put(
        f"/v1/apps/{made['clientId']}", json={"name": "ci", "enabled": False}, headers=org.headers
    )
    assert r.status_code == 200 and r.json()["app"]["enabled"] is False
    # Refused in the same second as the change: no waiting for a later token second.
    r = await client.get("/v1/blueprints", headers=token)
    assert r.status_code == 401 and r.json()["error"] == "invalid_token"
    assert (await _token(client, made["clientId"], made["secret"])).status_code == 401


async def test_enabling_again_does_not_revive_older_tokens(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    made = await _made(client, org, ["Member"])
    token = await _bearer(client, made["clientId"], made["secret"])
    await asyncio.sleep(1.1)  # the token is from an earlier second than the disabling
    url = f"/v1/apps/{made['clientId']}"
    await client.put(url, json={"name": "ci", "enabled": False}, headers=org.headers)
    await client.put(url, json={"name": "ci", "enabled": True}, headers=org.headers)
    assert (await client.get("/v1/blueprints", headers=token)).status_code == 401
    fresh = await _bearer(client, made["clientId"], made["secret"])
    assert (await client.get("/v1/blueprints", headers=fresh)).status_code == 200


async def test_the_last_enabled_admin_credential_cannot_be_disabled(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    r = await client.put(
        f"/v1/apps/{org.client_id}", json={"name": "default", "enabled": False}, headers=org.headers
    )
    assert r.status_code == 409 and r.json()["error"] == "last_admin_credential"
    second = await _made(client, org, ["Admin"])
    await client.put(
        f"/v1/apps/{second['clientId']}", json={"name": "ci", "enabled": False}, headers=org.headers
    )
    # A disabled Admin credential does not count as a way in.
    r = await client.delete(f"/v1/apps/{org.client_id}", headers=org.headers)
    assert r.status_code == 409


async def test_disabling_is_audited(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    org = await make_org()
    made = await _made(client, org, ["Member"])
    await client.put(
        f"/v1/apps/{made['clientId']}", json={"name": "ci", "enabled": False}, headers=org.headers
    )
    r = await client.get(
        "/v1/audit-log",
        params={"resources": "credential", "identifier": made["clientId"], "action": "UPDATE"},
        headers=org.headers,
    )
    [entry] = r.json()["audits"]
    assert (entry["diff"]["before"]["enabled"], entry["diff"]["after"]["enabled"]) == (True, False)


async def test_list_fields_keeps_only_those_asked(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    r = await client.get(
        "/v1/apps", params=[("fields", "id"), ("fields", "enabled")], headers=org.headers
    )
    assert r.status_code == 200, r.text
    assert r.json()["apps"] == [{"id": org.client_id, "enabled": True}]
    r = await client.get("/v1/apps", params={"fields": "secret"}, headers=org.headers)
    assert r.json()["apps"] == [{}]  # only the hash is kept: never listed


async def test_an_unknown_field_is_refused(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    org = await make_org()
    r = await client.get("/v1/apps", params={"fields": "secret_hash"}, headers=org.headers)
    assert r.status_code == 422 and r.json()["ok"] is False
