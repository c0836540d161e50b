"""Users and teams (`/v1/users`, `/v1/teams`): Port's shapes, Admins manage and everyone
reads, the identity provider's roles and memberships stay, no self-lockout, team names
carried into entities, audited, and per org."""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import FastAPI

from app.auth.service import create_credential
from app.db.database import Database
from app.scorecards.evaluate import evaluate_pending
from tests.conftest import Org, OrgFactory


async def _member_headers(client: httpx.AsyncClient, db: Database, org: Org) -> dict[str, str]:
    async with db.tenant(org.org_id) as tx:
        made = await create_credential(tx, org_id=org.org_id, name="member", roles=["Member"])
    r = await client.post(
        "/v1/auth/access_token",
        json={"clientId": made.client_id, "clientSecret": made.client_secret},
    )
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['accessToken']}"}


def _user_headers(app: FastAPI, org: Org, email: str) -> dict[str, str]:
    token = app.state.tokens.issue(org_id=org.org_id, subject=email, kind="user", roles=[])
    return {"Authorization": f"Bearer {token}"}


async def _invite(client: httpx.AsyncClient, org: Org, email: str, **extra: Any) -> httpx.Response:
    return await client.post(
        "/v1/users/invite", json={"invitee": {"email": email, **extra}}, headers=org.headers
    )


async def _team(client: httpx.AsyncClient, org: Org, name: str, **extra: Any) -> httpx.Response:
    return await client.post("/v1/teams", json={"name": name, **extra}, headers=org.headers)


async def _entity(client: httpx.AsyncClient, org: Org, identifier: str, team: list[str]) -> None:
    r = await client.post(
        "/v1/blueprints/service/entities",
        json={"identifier": identifier, "title": identifier, "team": team, "properties": {}},
        headers=org.headers,
    )
    assert r.status_code in (200, 201), r.text


async def _entity_team(client: httpx.AsyncClient, org: Org, identifier: str) -> list[str]:
    r = await client.get(f"/v1/blueprints/service/entities/{identifier}", headers=org.headers)
    assert r.status_code == 200, r.text
    return list(r.json()["entity"]["team"])


async def _service_blueprint(client: httpx.AsyncClient, org: Org) -> None:
    r = await client.post(
        "/v1/blueprints",
        json={"identifier": "service", "title": "Service", "schema": {}},
        headers=org.headers,
    )
    assert r.status_code == 201, r.text


# ------------------------------------------------------------------------------------------
# Users


async def test_invite_creates_an_invited_user_in_ports_shape(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    assert (await _team(client, org, "platform")).status_code == 200
    r = await _invite(client, org, "Ada@Example.com", teams=["platform"])
    assert r.status_code == 200, r.text
    user = r.json()["user"]
    assert user["email"] == "ada@example.com"
    assert user["status"] == "Invited" and user["type"] == "standard"
    assert user["roles"] == [{"name": "Member"}] and user["teams"] == ["platform"]
    assert {"id", "providers", "createdAt", "updatedAt"} <= set(user)
    r = await client.get("/v1/users/ADA@example.com", headers=org.headers)
    assert r.status_code == 200 and r.json()["user"] == user
    listed = (await client.get("/v1/users", headers=org.headers)).json()
    assert listed == {"ok": True, "users": [user]}


async def test_inviting_an_existing_user_conflicts(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    assert (await _invite(client, org, "ada@example.com")).status_code == 200
    r = await _invite(client, org, "ADA@example.com", roles=["Admin"])
    assert r.status_code == 409 and r.json()["error"] == "user_exists"


async def test_invite_names_unknown_roles_and_teams(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    r = await _invite(client, org, "ada@example.com", roles=["Member", "Root"])
    assert r.status_code == 422 and "'Root'" in r.json()["message"]
    assert r.json()["details"] == [{"pointer": "/invitee/roles/1", "message": "no role 'Root'"}]
    r = await _invite(client, org, "ada@example.com", teams=["ghosts"])
    assert r.status_code == 422 and "'ghosts'" in r.json()["message"]
    r = await _invite(client, org, "ada@example.com", roles=["service-moderator"])
    assert r.status_code == 422
    await _service_blueprint(client, org)
    r = await _invite(client, org, "ada@example.com", roles=["service-moderator"])
    assert r.status_code == 200 and r.json()["user"]["roles"] == [{"name": "service-moderator"}]


async def test_invite_rejects_malformed_bodies(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    for body in (
        {"invitee": {"email": "not-an-email"}},
        {"invitee": {"email": "a b@example.com"}},
        {"invitee": {"email": "a@example.com", "admin": True}},
        {"invitee": {}},
        {"email": "a@example.com"},
    ):
        r = await client.post("/v1/users/invite", json=body, headers=org.headers)
        assert r.status_code == 422, body
        assert r.json()["ok"] is False and r.json()["error"] == "invalid_request"


async def test_patch_replaces_roles_and_teams(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    for name in ("alpha", "beta"):
        await _team(client, org, name)
    await _invite(client, org, "ada@example.com", teams=["alpha"])
    r = await client.patch(
        "/v1/users/ada@example.com",
        json={"roles": ["Admin"], "teams": ["beta"]},
        headers=org.headers,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ok"] is True and body["email"] == "ada@example.com"  # Port's flat answer
    assert body["roles"] == [{"name": "Admin"}] and body["teams"] == ["beta"]
    r = await client.patch("/v1/users/ada@example.com", json={"teams": []}, headers=org.headers)
    assert r.json()["teams"] == [] and r.json()["roles"] == [{"name": "Admin"}]


async def test_patch_rejects_bad_input(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    org = await make_org()
    await _invite(client, org, "ada@example.com")
    url = "/v1/users/ada@example.com"
    r = await client.patch(url, json={"roles": []}, headers=org.headers)
    assert r.status_code == 422  # Port's minItems: 1
    r = await client.patch(url, json={"roles": ["Owner"]}, headers=org.headers)
    assert r.status_code == 422 and "'Owner'" in r.json()["message"]
    r = await client.patch(url, json={"teams": ["nope", "nada"]}, headers=org.headers)
    assert r.status_code == 422 and "'nope'" in r.json()["message"]
    assert "'nada'" in r.json()["message"]
    r = await client.patch(url, json={"status": "Active"}, headers=org.headers)
    assert r.status_code == 422
    r = await client.patch(
        "/v1/users/nobody@example.com", json={"roles": ["Member"]}, headers=org.headers
    )
    assert r.status_code == 404 and r.json()["error"] == "user_not_found"


async def test_unknown_users_answer_404(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    org = await make_org()
    for method in ("GET", "DELETE"):
        r = await client.request(method, "/v1/users/nobody@example.com", headers=org.headers)
        assert r.status_code == 404 and r.json()["ok"] is False
    r = await client.get("/v1/users/nul%00@example.com", headers=org.headers)
    assert r.status_code == 404


async def test_delete_user_removes_their_memberships(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _team(client, org, "alpha")
    await _invite(client, org, "ada@example.com", teams=["alpha"])
    r = await client.delete("/v1/users/ada@example.com", headers=org.headers)
    assert r.status_code == 200 and r.json() == {"ok": True}
    assert (await client.get("/v1/users/ada@example.com", headers=org.headers)).status_code == 404
    team = (await client.get("/v1/teams/alpha", headers=org.headers)).json()["team"]
    assert team["users"] == []


async def test_identity_provider_roles_and_memberships_stay(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    for name in ("alpha", "beta"):
        await _team(client, org, name)
    await _invite(client, org, "ada@example.com")
    async with db.tenant(org.org_id) as tx:
        await tx.execute(
            "UPDATE users SET idp_roles = '{service-moderator}' WHERE email = 'ada@example.com'"
        )
        await tx.execute(
            "INSERT INTO team_members (org_id, team_id, user_id, source) "
            "SELECT t.org_id, t.id, u.id, 'idp' FROM teams t, users u "
            "WHERE t.name = 'alpha' AND u.email = 'ada@example.com'"
        )
    r = await client.patch(
        "/v1/users/ada@example.com",
        json={"roles": ["Admin"], "teams": ["beta"]},
        headers=org.headers,
    )
    assert r.json()["roles"] == [{"name": "Admin"}, {"name": "service-moderator"}]
    assert r.json()["teams"] == ["alpha", "beta"]
    r = await client.patch("/v1/teams/alpha", json={"users": []}, headers=org.headers)
    assert [u["email"] for u in r.json()["team"]["users"]] == ["ada@example.com"]
    r = await client.patch("/v1/users/ada@example.com", json={"teams": []}, headers=org.headers)
    assert r.json()["teams"] == ["alpha"]


async def test_a_user_cannot_remove_their_own_admin_role_or_delete_themselves(
    client: httpx.AsyncClient, make_org: OrgFactory, app: FastAPI
) -> None:
    org = await make_org()
    await _team(client, org, "alpha")
    await _invite(client, org, "root@example.com", roles=["Admin"])
    me = _user_headers(app, org, "root@example.com")
    url = "/v1/users/root@example.com"
    r = await client.patch(url, json={"roles": ["Member"]}, headers=me)
    assert r.status_code == 409 and r.json()["error"] == "self_lockout"
    assert (await client.delete(url, headers=me)).status_code == 409
    r = await client.patch(url, json={"teams": ["alpha"]}, headers=me)
    assert r.status_code == 200 and r.json()["teams"] == ["alpha"]
    # Another Admin may.
    r = await client.patch(url, json={"roles": ["Member"]}, headers=org.headers)
    assert r.status_code == 200
    assert (await client.delete(url, headers=org.headers)).status_code == 200


async def test_a_member_reads_people_but_manages_none(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _team(client, org, "alpha")
    await _invite(client, org, "ada@example.com")
    member = await _member_headers(client, db, org)
    for url in ("/v1/users", "/v1/users/ada@example.com", "/v1/teams", "/v1/teams/alpha"):
        assert (await client.get(url, headers=member)).status_code == 200, url
    refused = [
        ("POST", "/v1/users/invite", {"invitee": {"email": "b@example.com"}}, "users.manage"),
        ("PATCH", "/v1/users/ada@example.com", {"roles": ["Admin"]}, "users.manage"),
        ("DELETE", "/v1/users/ada@example.com", None, "users.manage"),
        ("POST", "/v1/teams", {"name": "beta"}, "teams.manage"),
        ("PATCH", "/v1/teams/alpha", {"description": "x"}, "teams.manage"),
        ("PUT", "/v1/teams/alpha", {"name": "alpha"}, "teams.manage"),
        ("DELETE", "/v1/teams/alpha", None, "teams.manage"),
    ]
    for method, url, body, permission in refused:
        r = await client.request(method, url, json=body, headers=member)
        assert r.status_code == 403, (method, url)
        assert r.json()["details"]["permission"] == permission


# ------------------------------------------------------------------------------------------
# Teams


async def test_team_lifecycle(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    org = await make_org()
    await _invite(client, org, "ada@example.com")
    await _invite(client, org, "bob@example.com")
    r = await _team(
        client, org, "Platform Team", users=["Ada@example.com"], description="Runs things"
    )
    assert r.status_code == 200, r.text
    team = r.json()["team"]
    assert team["name"] == "Platform Team" and team["provider"] == "Port"
    assert team["description"] == "Runs things"
    assert team["users"] == [{"email": "ada@example.com", "status": "Invited"}]
    assert (await client.get("/v1/teams/Platform%20Team", headers=org.headers)).json()[
        "team"
    ] == team
    # PATCH changes only what it names.
    r = await client.patch(
        "/v1/teams/Platform Team", json={"description": "Keeps things running"}, headers=org.headers
    )
    assert r.json()["team"]["users"] == team["users"]
    assert r.json()["team"]["description"] == "Keeps things running"
    r = await client.patch(
        "/v1/teams/Platform Team", json={"users": ["bob@example.com"]}, headers=org.headers
    )
    assert [u["email"] for u in r.json()["team"]["users"]] == ["bob@example.com"]
    # PUT replaces the whole team.
    r = await client.put("/v1/teams/Platform Team", json={"name": "Infra"}, headers=org.headers)
    assert r.status_code == 200
    replaced = r.json()["team"]
    assert replaced["name"] == "Infra" and replaced["users"] == []
    assert "description" not in replaced and replaced["id"] == team["id"]
    assert (await client.get("/v1/teams/Platform Team", headers=org.headers)).status_code == 404
    user = (await client.get("/v1/users/bob@example.com", headers=org.headers)).json()["user"]
    assert user["teams"] == []
    assert (await client.delete("/v1/teams/Infra", headers=org.headers)).json() == {"ok": True}
    assert (await client.get("/v1/teams", headers=org.headers)).json() == {"ok": True, "teams": []}


async def test_team_fields_select_what_is_returned(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _invite(client, org, "ada@example.com")
    await _team(client, org, "alpha", users=["ada@example.com"])
    r = await client.get(
        "/v1/teams", params=[("fields", "name"), ("fields", "users.email")], headers=org.headers
    )
    assert r.json()["teams"] == [{"name": "alpha", "users": [{"email": "ada@example.com"}]}]
    r = await client.get("/v1/teams/alpha", params={"fields": "id"}, headers=org.headers)
    assert set(r.json()["team"]) == {"id"}
    r = await client.get("/v1/teams", params={"fields": "secret"}, headers=org.headers)
    assert r.status_code == 422
    r = await client.get("/v1/users", params={"fields": "roles.name"}, headers=org.headers)
    assert r.json()["users"] == [{"roles": [{"name": "Member"}]}]


async def test_team_names_follow_ports_rule(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    for name in ("a", " lead", "trail ", "a/b", "a?b", "a#b", "a;b", "x" * 201):
        r = await _team(client, org, name)
        assert r.status_code == 422, name
        assert r.json()["error"] == "invalid_request"
    assert (await _team(client, org, "ok team")).status_code == 200
    r = await client.patch("/v1/teams/ok team", json={"name": "bad/name"}, headers=org.headers)
    assert r.status_code == 422


async def test_team_conflicts_and_unknown_members(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _team(client, org, "alpha")
    await _team(client, org, "beta")
    r = await _team(client, org, "alpha")
    assert r.status_code == 409 and r.json()["error"] == "team_exists"
    r = await client.patch("/v1/teams/beta", json={"name": "alpha"}, headers=org.headers)
    assert r.status_code == 409
    r = await _team(client, org, "gamma", users=["ghost@example.com"])
    assert r.status_code == 422 and "'ghost@example.com'" in r.json()["message"]
    assert (await client.get("/v1/teams/gamma", headers=org.headers)).status_code == 404
    for method in ("GET", "PATCH", "PUT", "DELETE"):
        body = {"name": "delta"} if method in ("PATCH", "PUT") else None
        r = await client.request(method, "/v1/teams/delta", json=body, headers=org.headers)
        assert r.status_code == 404 and r.json()["error"] == "team_not_found", method


async def test_renaming_and_deleting_a_team_updates_entities(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    other = await make_org()
    for o in (org, other):
        await _service_blueprint(client, o)
        await _team(client, o, "alpha")
        await _team(client, o, "beta")
        await _entity(client, o, "api", ["alpha", "beta"])
    await _entity(client, org, "web", ["beta"])
    r = await client.patch("/v1/teams/alpha", json={"name": "zeta"}, headers=org.headers)
    assert r.status_code == 200
    assert await _entity_team(client, org, "api") == ["beta", "zeta"]
    r = await client.put("/v1/teams/zeta", json={"name": "Alpha"}, headers=org.headers)
    assert await _entity_team(client, org, "api") == ["Alpha", "beta"]
    assert (await client.delete("/v1/teams/beta", headers=org.headers)).status_code == 200
    assert await _entity_team(client, org, "api") == ["Alpha"]
    assert await _entity_team(client, org, "web") == []
    # The other organization's entities keep their teams.
    assert await _entity_team(client, other, "api") == ["alpha", "beta"]


async def test_deleting_a_team_regrades_scorecards_that_read_teams(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _service_blueprint(client, org)
    await _team(client, org, "alpha")
    await _entity(client, org, "api", ["alpha"])
    card = {
        "identifier": "owned",
        "title": "Owned",
        "rules": [
            {
                "identifier": "hasTeam",
                "title": "Belongs to alpha",
                "level": "Bronze",
                "query": {
                    "combinator": "and",
                    "conditions": [{"property": "$team", "operator": "=", "value": "alpha"}],
                },
            }
        ],
    }
    r = await client.post("/v1/blueprints/service/scorecards", json=card, headers=org.headers)
    assert r.status_code == 201, r.text
    await evaluate_pending(db)

    async def level() -> str:
        r = await client.get("/v1/blueprints/service/entities/api", headers=org.headers)
        return str(r.json()["entity"]["scorecards"]["owned"]["level"])

    assert await level() == "Gold"  # no rule above Bronze
    assert (await client.delete("/v1/teams/alpha", headers=org.headers)).status_code == 200
    await evaluate_pending(db)
    assert await level() == "Basic"


# ------------------------------------------------------------------------------------------
# Audit and tenancy


async def test_user_and_team_changes_are_in_the_audit_log(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _invite(client, org, "ada@example.com")
    await _team(client, org, "alpha", users=["ada@example.com"])
    await client.patch("/v1/users/ada@example.com", json={"roles": ["Admin"]}, headers=org.headers)
    await client.patch("/v1/teams/alpha", json={"users": []}, headers=org.headers)
    await client.delete("/v1/users/ada@example.com", headers=org.headers)
    r = await client.get("/v1/audit-log", params={"resources": "user"}, headers=org.headers)
    assert r.status_code == 200, r.text
    users = [(a["action"], a["identifier"]) for a in reversed(r.json()["audits"])]
    assert users == [
        ("CREATE", "ada@example.com"),
        ("UPDATE", "ada@example.com"),
        ("DELETE", "ada@example.com"),
    ]
    r = await client.get("/v1/audit-log", params={"resources": "team"}, headers=org.headers)
    teams = [(a["action"], a["diff"]) for a in reversed(r.json()["audits"])]
    assert teams[0][0] == "CREATE"
    assert teams[1] == ("UPDATE", {"memberAdded": {"email": "ada@example.com", "source": "api"}})
    assert teams[2] == (
        "UPDATE",
        {"memberRemoved": {"email": "ada@example.com", "source": "api"}},
    )
    assert len(teams) == 3


async def test_another_org_cannot_reach_users_or_teams(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    a = await make_org()
    b = await make_org()
    await _invite(client, a, "ada@example.com")
    await _team(client, a, "alpha")
    assert (await client.get("/v1/users", headers=b.headers)).json()["users"] == []
    assert (await client.get("/v1/teams", headers=b.headers)).json()["teams"] == []
    calls = [
        ("GET", "/v1/users/ada@example.com", None),
        ("PATCH", "/v1/users/ada@example.com", {"roles": ["Admin"]}),
        ("DELETE", "/v1/users/ada@example.com", None),
        ("GET", "/v1/teams/alpha", None),
        ("PATCH", "/v1/teams/alpha", {"description": "mine"}),
        ("PUT", "/v1/teams/alpha", {"name": "alpha"}),
        ("DELETE", "/v1/teams/alpha", None),
    ]
    for method, url, body in calls:
        r = await client.request(method, url, json=body, headers=b.headers)
        assert r.status_code == 404, (method, url)
    # Org B may hold the same names on its own.
    assert (await _invite(client, b, "ada@example.com")).status_code == 200
    assert (await _team(client, b, "alpha")).status_code == 200
    user = (await client.get("/v1/users/ada@example.com", headers=a.headers)).json()["user"]
    assert user["roles"] == [{"name": "Member"}]
    team = (await client.get("/v1/teams/alpha", headers=a.headers)).json()["team"]
    assert "description" not in team


async def test_a_user_of_one_org_is_refused_by_another(
    client: httpx.AsyncClient, make_org: OrgFactory, app: FastAPI
) -> None:
    a = await make_org()
    b = await make_org()
    await _invite(client, a, "ada@example.com", roles=["Admin"])
    assert (
        await client.get("/v1/users", headers=_user_headers(app, a, "ada@example.com"))
    ).status_code == 200
    r = await client.get("/v1/users", headers=_user_headers(app, b, "ada@example.com"))
    assert r.status_code == 401 and r.json()["ok"] is False


async def test_renaming_and_deleting_a_team_carries_into_permission_blocks(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _service_blueprint(client, org)
    for name in ("alpha", "beta"):
        await _team(client, org, name)
    r = await client.patch(
        "/v1/blueprints/service/permissions",
        json={"entities": {"register": {"teams": ["alpha", "beta"]}}},
        headers=org.headers,
    )
    assert r.status_code == 200, r.text
    await client.patch("/v1/teams/alpha", json={"name": "zeta"}, headers=org.headers)
    await client.delete("/v1/teams/beta", headers=org.headers)
    r = await client.get("/v1/blueprints/service/permissions", headers=org.headers)
    assert r.json()["permissions"]["entities"]["register"]["teams"] == ["zeta"]
