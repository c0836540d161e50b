"""POST /v1/rotate-credentials/{user_email}: a user's personal credentials. Admins rotate
anyone's, a user their own; the new pair signs in as the user; the old pair and the user's
older tokens stop working at once; audited without the secret; per org."""

from __future__ import annotations

import asyncio
import json

import httpx
from fastapi import FastAPI

from app.db.database import Database
from tests.conftest import Org, OrgFactory
from tests.test_permissions import add_user, app_headers, user_headers

ANN = "ann@example.com"


async def _rotate(client: httpx.AsyncClient, email: str, headers: dict[str, str]) -> httpx.Response:
    return await client.post(f"/v1/rotate-credentials/{email}", headers=headers)


async def _exchange(client: httpx.AsyncClient, credentials: dict[str, str]) -> httpx.Response:
    return await client.post(
        "/v1/auth/access_token",
        json={"clientId": credentials["clientId"], "clientSecret": credentials["clientSecret"]},
    )


async def _bearer(client: httpx.AsyncClient, credentials: dict[str, str]) -> dict[str, str]:
    r = await _exchange(client, credentials)
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['accessToken']}"}


async def _org_with_ann(make_org: OrgFactory, db: Database, roles: list[str]) -> Org:
    org = await make_org()
    await add_user(db, org.org_id, ANN, roles=roles)
    return org


async def test_a_user_rotates_their_own_and_signs_in_as_themself(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, app: FastAPI
) -> None:
    org = await _org_with_ann(make_org, db, ["Member"])
    r = await _rotate(client, ANN, user_headers(app, org.org_id, ANN))
    assert r.status_code == 200, r.text
    credentials = r.json()["credentials"]
    me = await client.get("/v1/auth/me", headers=await _bearer(client, credentials))
    assert (me.json()["me"]["kind"], me.json()["me"]["subject"]) == ("user", ANN)
    assert me.json()["me"]["roles"] == ["Member"]


async def test_rotating_again_ends_the_old_pair_and_older_tokens(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await _org_with_ann(make_org, db, ["Member"])
    old = (await _rotate(client, ANN, org.headers)).json()["credentials"]
    old_token = await _bearer(client, old)
    assert (await client.get("/v1/blueprints", headers=old_token)).status_code == 200
    await asyncio.sleep(1.1)  # tokens carry whole seconds: one issued in the rotation's stays
    new = (await _rotate(client, ANN, org.headers)).json()["credentials"]
    assert new["clientId"] != old["clientId"] and new["clientSecret"] != old["clientSecret"]
    assert (await _exchange(client, old)).status_code == 401
    r = await client.get("/v1/blueprints", headers=old_token)
    assert r.status_code == 401 and r.json()["error"] == "invalid_token"
    assert (await client.get("/v1/blueprints", headers=await _bearer(client, new))).is_success


async def test_an_admin_rotation_ends_the_users_identity_provider_tokens_too(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, app: FastAPI
) -> None:
    org = await _org_with_ann(make_org, db, ["Member"])
    earlier = user_headers(app, org.org_id, ANN)
    assert (await client.get("/v1/blueprints", headers=earlier)).status_code == 200
    await asyncio.sleep(1.1)
    assert (await _rotate(client, ANN, org.headers)).status_code == 200
    assert (await client.get("/v1/blueprints", headers=earlier)).status_code == 401


async def test_a_member_cannot_rotate_someone_elses(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, app: FastAPI
) -> None:
    org = await _org_with_ann(make_org, db, ["Member"])
    await add_user(db, org.org_id, "bob@example.com", roles=["Member"])
    r = await _rotate(client, "bob@example.com", user_headers(app, org.org_id, ANN))
    assert r.status_code == 403
    assert (r.json()["error"], r.json()["details"]["permission"]) == (
        "missing_permission",
        "users.rotateCredentials",
    )


async def test_a_member_credential_cannot_rotate_anyones(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await _org_with_ann(make_org, db, ["Member"])
    member = await app_headers(client, db, org.org_id, ["Member"])
    assert (await _rotate(client, ANN, member)).status_code == 403


async def test_an_admin_user_rotates_anyones(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, app: FastAPI
) -> None:
    org = await _org_with_ann(make_org, db, ["Admin"])
    await add_user(db, org.org_id, "bob@example.com", roles=["Member"])
    r = await _rotate(client, "Bob@Example.com", user_headers(app, org.org_id, ANN))
    assert r.status_code == 200, r.text
    me = await client.get("/v1/auth/me", headers=await _bearer(client, r.json()["credentials"]))
    assert me.json()["me"]["subject"] == "bob@example.com"


async def test_an_unknown_user_is_not_found(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    r = await _rotate(client, "nobody@example.com", org.headers)
    assert r.status_code == 404 and r.json()["error"] == "user_not_found"


async def test_another_orgs_user_is_not_found_and_untouched(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org_a = await _org_with_ann(make_org, db, ["Member"])
    org_b = await make_org()
    mine = (await _rotate(client, ANN, org_a.headers)).json()["credentials"]
    r = await _rotate(client, ANN, org_b.headers)
    assert r.status_code == 404 and r.json()["ok"] is False
    assert (await _exchange(client, mine)).status_code == 200


async def test_a_disabled_users_credentials_are_refused(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await _org_with_ann(make_org, db, ["Member"])
    credentials = (await _rotate(client, ANN, org.headers)).json()["credentials"]
    async with db.tenant(org.org_id) as tx:
        await tx.execute("UPDATE users SET status = 'Disabled' WHERE email = $1", ANN)
    r = await _exchange(client, credentials)
    assert r.status_code == 401 and r.json()["error"] == "invalid_credentials"


async def test_a_rotation_is_audited_without_the_secret(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await _org_with_ann(make_org, db, ["Member"])
    credentials = (await _rotate(client, ANN, org.headers)).json()["credentials"]
    r = await client.get(
        "/v1/audit-log",
        params={"resources": "user", "identifier": ANN, "action": "UPDATE"},
        headers=org.headers,
    )
    [entry] = r.json()["audits"]
    assert entry["trigger"]["by"]["userId"] == org.client_id
    assert entry["diff"]["after"]["personal_client_id"] == credentials["clientId"]
    assert "personal_secret_hash" not in entry["diff"]["after"]
    assert credentials["clientSecret"] not in json.dumps(entry)


async def test_a_rotation_needs_a_token(client: httpx.AsyncClient) -> None:
    r = await _rotate(client, ANN, {})
    assert r.status_code == 401 and r.json()["ok"] is False


async def test_an_overlong_email_is_refused(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    r = await _rotate(client, "a" * 321, org.headers)
    assert r.status_code == 422 and r.json()["ok"] is False
