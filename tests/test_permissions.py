"""Permissions: the roles x operations matrix, blueprint and action permission documents,
ownership (Direct and Inherited), ALL approvals, and GET /v1/auth/me."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI

from app.auth.service import create_credential
from app.db.database import Database
from tests.conftest import Org, OrgFactory

SERVICE = {
    "identifier": "service",
    "title": "Service",
    "schema": {"properties": {"language": {"type": "string"}, "tier": {"type": "string"}}},
    "relations": {"system": {"target": "system", "many": False, "required": False}},
}
NO_INPUTS: dict[str, Any] = {"userInputs": {"properties": {}}}
SYSTEM = {"identifier": "system", "title": "System", "schema": {"properties": {}}}

DEPLOY = {
    "identifier": "deploy",
    "trigger": {
        "type": "self-service",
        "operation": "DAY-2",
        "blueprintIdentifier": "service",
        **NO_INPUTS,
    },
    "invocationMethod": {"type": "WEBHOOK", "url": "http://127.0.0.1:9/deploy"},
}
OPEN = {
    "identifier": "open",
    "trigger": {
        "type": "self-service",
        "operation": "CREATE",
        "blueprintIdentifier": "service",
        **NO_INPUTS,
    },
    "invocationMethod": {"type": "WEBHOOK", "url": "http://127.0.0.1:9/open"},
}
GATED = {
    "identifier": "gated",
    "trigger": {
        "type": "self-service",
        "operation": "CREATE",
        "blueprintIdentifier": "service",
        **NO_INPUTS,
    },
    "invocationMethod": {"type": "WEBHOOK", "url": "http://127.0.0.1:9/gated"},
    "requiredApproval": True,
}


@dataclass
class Caller:
    name: str
    headers: dict[str, str]


async def add_user(
    db: Database,
    org_id: uuid.UUID,
    email: str,
    *,
    roles: list[str],
    teams: list[str] = (),  # type: ignore[assignment]
) -> None:
    """A user and their team memberships, straight into the tables (the users and teams
    API is tested on its own)."""
    async with db.tenant(org_id) as tx:
        user_id = await tx.fetchval(
            "INSERT INTO users (org_id, email, status, roles) VALUES ($1, $2, 'Active', $3) "
            "RETURNING id",
            org_id,
            email,
            roles,
        )
        for team in teams:
            team_id = await tx.fetchval(
                "INSERT INTO teams (org_id, name) VALUES ($1, $2) ON CONFLICT (org_id, name) "
                "DO UPDATE SET name = EXCLUDED.name RETURNING id",
                org_id,
                team,
            )
            await tx.execute(
                "INSERT INTO team_members (org_id, team_id, user_id, source) "
                "VALUES ($1, $2, $3, 'api')",
                org_id,
                team_id,
                user_id,
            )


def user_headers(app: FastAPI, org_id: uuid.UUID, email: str) -> dict[str, str]:
    token = app.state.tokens.issue(org_id=org_id, subject=email, kind="user", roles=[])
    return {"Authorization": f"Bearer {token}"}


async def app_headers(
    client: httpx.AsyncClient, db: Database, org_id: uuid.UUID, roles: list[str]
) -> dict[str, str]:
    async with db.tenant(org_id) as tx:
        cred = await create_credential(tx, org_id=org_id, name="ci", roles=roles)
    r = await client.post(
        "/v1/auth/access_token",
        json={"clientId": cred.client_id, "clientSecret": cred.client_secret},
    )
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['accessToken']}"}


async def ok(client: httpx.AsyncClient, method: str, path: str, org: Org, **kw: Any) -> Any:
    r = await client.request(method, path, headers=org.headers, **kw)
    assert r.status_code < 300, r.text
    return r.json()


CALLERS = ("admin", "moderator", "owner", "stranger", "member_app")


async def _world(
    client: httpx.AsyncClient, db: Database, app: FastAPI, org: Org
) -> dict[str, Caller]:
    for path, body in (
        ("/v1/blueprints", SYSTEM),
        ("/v1/blueprints", SERVICE),
        ("/v1/actions", DEPLOY),
        ("/v1/actions", OPEN),
        ("/v1/actions", GATED),
    ):
        await ok(client, "POST", path, org, json=body)
    await add_user(db, org.org_id, "mod@example.com", roles=["Member", "service-moderator"])
    await add_user(db, org.org_id, "owner@example.com", roles=["Member"], teams=["payments"])
    await add_user(db, org.org_id, "stranger@example.com", roles=["Member"], teams=["search"])
    await ok(
        client,
        "PATCH",
        "/v1/blueprints/service/permissions",
        org,
        json={
            "entities": {
                "register": {"ownedByTeam": True},
                "update": {"ownedByTeam": True},
                "updateProperties": {"tier": {"ownedByTeam": False}},
            }
        },
    )
    await ok(
        client,
        "PATCH",
        "/v1/actions/deploy/permissions",
        org,
        json={"execute": {"roles": ["Admin"], "ownedByTeam": True}},
    )
    await ok(
        client,
        "PATCH",
        "/v1/actions/gated/permissions",
        org,
        json={"approve": {"users": ["stranger@example.com"]}},
    )
    return {
        "admin": Caller("admin", org.headers),
        "moderator": Caller("moderator", user_headers(app, org.org_id, "mod@example.com")),
        "owner": Caller("owner", user_headers(app, org.org_id, "owner@example.com")),
        "stranger": Caller("stranger", user_headers(app, org.org_id, "stranger@example.com")),
        "member_app": Caller("member_app", await app_headers(client, db, org.org_id, ["Member"])),
    }


Op = Callable[[httpx.AsyncClient, Org, Caller], Awaitable[httpx.Response]]


def _entity(ident: str, team: str, **props: str) -> dict[str, Any]:
    return {"identifier": ident, "team": team, "properties": props}


async def _seed(client: httpx.AsyncClient, org: Org, ident: str, team: str = "payments") -> None:
    await ok(client, "POST", "/v1/blueprints/service/entities", org, json=_entity(ident, team))


def _op_list_blueprints(c: httpx.AsyncClient, org: Org, who: Caller) -> Awaitable[httpx.Response]:
    return c.get("/v1/blueprints", headers=who.headers)


async def _op_create_blueprint(c: httpx.AsyncClient, org: Org, who: Caller) -> httpx.Response:
    ident = f"bp-{who.name}".replace("_", "-")
    body = {"identifier": ident, "title": ident, "schema": {"properties": {}}}
    return await c.post("/v1/blueprints", json=body, headers=who.headers)


async def _op_update_blueprint(c: httpx.AsyncClient, org: Org, who: Caller) -> httpx.Response:
    return await c.patch(
        "/v1/blueprints/service", json={"title": f"By {who.name}"}, headers=who.headers
    )


async def _op_delete_blueprint(c: httpx.AsyncClient, org: Org, who: Caller) -> httpx.Response:
    ident = f"scratch-{who.name}".replace("_", "-")
    await ok(
        c,
        "POST",
        "/v1/blueprints",
        org,
        json={"identifier": ident, "title": ident, "schema": {"properties": {}}},
    )
    return await c.delete(f"/v1/blueprints/{ident}", headers=who.headers)


async def _op_read_permissions(c: httpx.AsyncClient, org: Org, who: Caller) -> httpx.Response:
    return await c.get("/v1/blueprints/service/permissions", headers=who.headers)


async def _op_change_permissions(c: httpx.AsyncClient, org: Org, who: Caller) -> httpx.Response:
    body = {"entities": {"unregister": {"roles": ["Admin", "service-moderator"]}}}
    return await c.patch("/v1/blueprints/service/permissions", json=body, headers=who.headers)


async def _op_register_own_team(c: httpx.AsyncClient, org: Org, who: Caller) -> httpx.Response:
    body = _entity(f"mine-{who.name}", "payments", language="go")
    return await c.post("/v1/blueprints/service/entities", json=body, headers=who.headers)


async def _op_register_other_team(c: httpx.AsyncClient, org: Org, who: Caller) -> httpx.Response:
    body = _entity(f"theirs-{who.name}", "search", language="go")
    return await c.post("/v1/blueprints/service/entities", json=body, headers=who.headers)


async def _op_register_untyped(c: httpx.AsyncClient, org: Org, who: Caller) -> httpx.Response:
    body = {"identifier": f"system-{who.name}"}
    return await c.post("/v1/blueprints/system/entities", json=body, headers=who.headers)


async def _op_update_property(c: httpx.AsyncClient, org: Org, who: Caller) -> httpx.Response:
    ident = f"lang-{who.name}"
    await _seed(c, org, ident)
    return await c.patch(
        f"/v1/blueprints/service/entities/{ident}",
        json={"properties": {"language": "python"}},
        headers=who.headers,
    )


async def _op_update_restricted(c: httpx.AsyncClient, org: Org, who: Caller) -> httpx.Response:
    ident = f"tier-{who.name}"
    await _seed(c, org, ident)
    return await c.patch(
        f"/v1/blueprints/service/entities/{ident}",
        json={"properties": {"tier": "1"}},
        headers=who.headers,
    )


async def _op_give_away(c: httpx.AsyncClient, org: Org, who: Caller) -> httpx.Response:
    ident = f"give-{who.name}"
    await _seed(c, org, ident)
    return await c.patch(
        f"/v1/blueprints/service/entities/{ident}", json={"team": "search"}, headers=who.headers
    )


async def _op_unregister(c: httpx.AsyncClient, org: Org, who: Caller) -> httpx.Response:
    ident = f"gone-{who.name}"
    await _seed(c, org, ident)
    return await c.delete(f"/v1/blueprints/service/entities/{ident}", headers=who.headers)


async def _op_unregister_all(c: httpx.AsyncClient, org: Org, who: Caller) -> httpx.Response:
    return await c.delete("/v1/blueprints/system/all-entities", headers=who.headers)


async def _op_search(c: httpx.AsyncClient, org: Org, who: Caller) -> httpx.Response:
    body = {"rules": [{"property": "$blueprint", "operator": "=", "value": "service"}]}
    return await c.post("/v1/entities/search", json=body, headers=who.headers)


async def _op_create_scorecard(c: httpx.AsyncClient, org: Org, who: Caller) -> httpx.Response:
    body = {
        "identifier": f"sc-{who.name}".replace("_", "-"),
        "title": "SC",
        "levels": [{"title": "Basic", "color": "paleBlue"}, {"title": "Gold", "color": "gold"}],
        "rules": [
            {
                "identifier": "has-lang",
                "title": "Has language",
                "level": "Gold",
                "query": {
                    "combinator": "and",
                    "conditions": [{"property": "language", "operator": "isNotEmpty"}],
                },
            }
        ],
    }
    return await c.post("/v1/blueprints/service/scorecards", json=body, headers=who.headers)


async def _op_create_action(c: httpx.AsyncClient, org: Org, who: Caller) -> httpx.Response:
    body = {**OPEN, "identifier": f"act-{who.name}".replace("_", "-")}
    return await c.post("/v1/actions", json=body, headers=who.headers)


async def _op_run_owned(c: httpx.AsyncClient, org: Org, who: Caller) -> httpx.Response:
    ident = f"run-{who.name}"
    await _seed(c, org, ident)
    return await c.post(
        "/v1/actions/deploy/runs", json={"entity": ident, "properties": {}}, headers=who.headers
    )


async def _op_run_open(c: httpx.AsyncClient, org: Org, who: Caller) -> httpx.Response:
    return await c.post("/v1/actions/open/runs", json={"properties": {}}, headers=who.headers)


async def _op_approve(c: httpx.AsyncClient, org: Org, who: Caller) -> httpx.Response:
    run = await ok(c, "POST", "/v1/actions/gated/runs", org, json={"properties": {}})
    return await c.patch(
        f"/v1/actions/runs/{run['run']['id']}/approval",
        json={"status": "APPROVE"},
        headers=who.headers,
    )


async def _op_read_others_run(c: httpx.AsyncClient, org: Org, who: Caller) -> httpx.Response:
    run = await ok(c, "POST", "/v1/actions/open/runs", org, json={"properties": {}})
    return await c.get(f"/v1/actions/runs/{run['run']['id']}", headers=who.headers)


async def _op_read_gated_run(c: httpx.AsyncClient, org: Org, who: Caller) -> httpx.Response:
    run = await ok(c, "POST", "/v1/actions/gated/runs", org, json={"properties": {}})
    return await c.get(f"/v1/actions/runs/{run['run']['id']}", headers=who.headers)


async def _op_report_others_run(c: httpx.AsyncClient, org: Org, who: Caller) -> httpx.Response:
    run = await ok(c, "POST", "/v1/actions/open/runs", org, json={"properties": {}})
    return await c.patch(
        f"/v1/actions/runs/{run['run']['id']}",
        json={"status": "SUCCESS"},
        headers=who.headers,
    )


def _get(path: str) -> Op:
    async def op(c: httpx.AsyncClient, org: Org, who: Caller) -> httpx.Response:
        return await c.get(path, headers=who.headers)

    return op


async def _op_create_secret(c: httpx.AsyncClient, org: Org, who: Caller) -> httpx.Response:
    body = {"secretName": f"s-{who.name}".replace("_", "-"), "secretValue": "v"}
    return await c.post("/v1/organization/secrets", json=body, headers=who.headers)


async def _op_create_app(c: httpx.AsyncClient, org: Org, who: Caller) -> httpx.Response:
    return await c.post("/v1/apps", json={"name": who.name}, headers=who.headers)


ALL = dict.fromkeys(CALLERS, True)
ADMIN_ONLY = {**dict.fromkeys(CALLERS, False), "admin": True}
ADMIN_AND_MOD = {**ADMIN_ONLY, "moderator": True}
OWNERS = {**ADMIN_AND_MOD, "owner": True}

# operation -> (how, who may)
MATRIX: dict[str, tuple[Op, dict[str, bool]]] = {
    "list blueprints": (_op_list_blueprints, ALL),
    "create blueprint": (_op_create_blueprint, ADMIN_ONLY),
    "update blueprint": (_op_update_blueprint, ADMIN_AND_MOD),
    "delete blueprint": (_op_delete_blueprint, ADMIN_ONLY),
    "read blueprint permissions": (_op_read_permissions, ALL),
    "change blueprint permissions": (_op_change_permissions, ADMIN_AND_MOD),
    "register entity of own team": (_op_register_own_team, OWNERS),
    "register entity of another team": (
        _op_register_other_team,
        {**ADMIN_AND_MOD, "stranger": True},
    ),
    "register entity (default permissions)": (_op_register_untyped, ADMIN_ONLY),
    "update property of owned entity": (_op_update_property, OWNERS),
    "update restricted property": (_op_update_restricted, ADMIN_AND_MOD),
    "give entity to another team": (_op_give_away, ADMIN_AND_MOD),
    "unregister entity": (_op_unregister, ADMIN_AND_MOD),
    "unregister all entities": (_op_unregister_all, ADMIN_ONLY),
    "search entities": (_op_search, ALL),
    "create scorecard": (_op_create_scorecard, ADMIN_AND_MOD),
    "create action": (_op_create_action, ADMIN_AND_MOD),
    "run action on owned entity": (_op_run_owned, {**ADMIN_ONLY, "owner": True}),
    "run action open to members": (_op_run_open, ALL),
    "approve run": (_op_approve, {**ADMIN_ONLY, "stranger": True}),
    "read another's run": (_op_read_others_run, ADMIN_ONLY),
    "read a run one may approve": (_op_read_gated_run, {**ADMIN_ONLY, "stranger": True}),
    "report another's run": (_op_report_others_run, ADMIN_ONLY),
    "read organization": (_get("/v1/organization"), ALL),
    "read signing secret": (_get("/v1/organization/signing-secret"), ADMIN_ONLY),
    "list secrets": (_get("/v1/organization/secrets"), ADMIN_ONLY),
    "create secret": (_op_create_secret, ADMIN_ONLY),
    "list webhooks": (_get("/v1/webhooks"), ADMIN_ONLY),
    "list apps": (_get("/v1/apps"), ADMIN_ONLY),
    "create app": (_op_create_app, ADMIN_ONLY),
    "read audit log": (_get("/v1/audit-log"), ADMIN_ONLY),
    "who am I": (_get("/v1/auth/me"), ALL),
}
# Notes on cells: the moderator of `service` has no say on `system` and holds no team (so
# ownership gives them nothing); `stranger` approves `gated`, so may read its runs.


async def test_roles_by_operations_matrix(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, app: FastAPI
) -> None:
    org = await make_org()
    callers = await _world(client, db, app, org)
    wrong: list[str] = []
    for name, (op, allowed) in MATRIX.items():
        for caller in CALLERS:
            r = await op(client, org, callers[caller])
            if allowed[caller]:
                if r.status_code >= 300:
                    wrong.append(
                        f"{name} / {caller}: expected success, got {r.status_code} {r.text}"
                    )
            else:
                body = r.json()
                if r.status_code != 403 or body.get("error") != "missing_permission":
                    wrong.append(f"{name} / {caller}: expected 403, got {r.status_code} {r.text}")
                elif not body.get("details", {}).get("permission"):
                    wrong.append(f"{name} / {caller}: 403 without the permission's name")
    assert wrong == [], "\n".join(wrong)


async def test_blueprint_permissions_read_back_with_defaults_and_merge(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    for body in (SYSTEM, SERVICE):
        await ok(client, "POST", "/v1/blueprints", org, json=body)
    got = (await ok(client, "GET", "/v1/blueprints/service/permissions", org))["permissions"]
    default = {
        "users": [],
        "roles": ["Admin", "service-moderator"],
        "teams": [],
        "ownedByTeam": False,
    }
    entities = got["entities"]
    assert entities["register"] == entities["update"] == entities["unregister"] == default
    assert entities["updateProperties"] == {"language": default, "tier": default}
    assert entities["updateRelations"] == {"system": default}
    await add_user(db, org.org_id, "ann@example.com", roles=["Member"], teams=["payments"])
    await ok(
        client,
        "PATCH",
        "/v1/blueprints/service/permissions",
        org,
        json={"entities": {"update": {"teams": ["payments"]}}},
    )
    await ok(
        client,
        "PATCH",
        "/v1/blueprints/service/permissions",
        org,
        json={"entities": {"updateProperties": {"tier": {"users": ["ann@example.com"]}}}},
    )
    entities = (await ok(client, "GET", "/v1/blueprints/service/permissions", org))["permissions"][
        "entities"
    ]
    # The second PATCH kept the first; a property without a block of its own follows update.
    assert entities["update"]["teams"] == ["payments"]
    assert entities["updateProperties"]["language"]["teams"] == ["payments"]
    assert entities["updateProperties"]["tier"]["users"] == ["ann@example.com"]
    assert entities["updateProperties"]["tier"]["teams"] == []
    assert entities["register"] == default


async def test_bad_permission_documents_are_refused_by_pointer(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    for body in (SYSTEM, SERVICE):
        await ok(client, "POST", "/v1/blueprints", org, json=body)
    cases = [
        ({"entities": {"register": {"roles": ["Owner"]}}}, "/entities/register/roles"),
        ({"entities": {"register": {"teams": ["nobody"]}}}, "/entities/register/teams"),
        ({"entities": {"register": {"users": ["x@example.com"]}}}, "/entities/register/users"),
        ({"entities": {"register": {"ownedByTeam": "yes"}}}, "/entities/register/ownedByTeam"),
        ({"entities": {"register": {"colour": []}}}, "/entities/register/colour"),
        ({"entities": {"updateProperties": {"nope": {}}}}, "/entities/updateProperties/nope"),
        ({"entities": {"updateRelations": {"nope": {}}}}, "/entities/updateRelations/nope"),
        ({"entities": {"read": {"roles": ["Admin"]}}}, "/entities/read"),
        ({"entities": {"register": {"policy": {"queries": {}}}}}, "/entities/register/policy"),
    ]
    for body, pointer in cases:
        r = await client.patch("/v1/blueprints/service/permissions", json=body, headers=org.headers)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["ok"] is False
        assert pointer in [d["pointer"] for d in r.json()["details"]], (body, r.text)
    r = await client.patch("/v1/blueprints/nope/permissions", json={}, headers=org.headers)
    assert r.status_code == 404 and r.json()["ok"] is False
    # Nothing was stored by the refused requests.
    got = (await ok(client, "GET", "/v1/blueprints/service/permissions", org))["permissions"]
    assert got["entities"]["register"]["roles"] == ["Admin", "service-moderator"]


async def test_permissions_of_another_org_are_out_of_reach(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    a, b = await make_org(), await make_org()
    for body in (SYSTEM, SERVICE):
        await ok(client, "POST", "/v1/blueprints", a, json=body)
    await ok(client, "POST", "/v1/actions", a, json=OPEN)
    change = {"entities": {"register": {"roles": ["Admin", "Member"]}}}
    for method, path, body in (
        ("GET", "/v1/blueprints/service/permissions", None),
        ("PATCH", "/v1/blueprints/service/permissions", change),
        ("GET", "/v1/actions/open/permissions", None),
        ("PATCH", "/v1/actions/open/permissions", {"execute": {"roles": ["Admin"]}}),
    ):
        r = await client.request(method, path, json=body, headers=b.headers)
        assert r.status_code == 404, (path, r.text)
    got = (await ok(client, "GET", "/v1/blueprints/service/permissions", a))["permissions"]
    assert got["entities"]["register"]["roles"] == ["Admin", "service-moderator"]
    got = (await ok(client, "GET", "/v1/actions/open/permissions", a))["permissions"]
    assert got["execute"]["roles"] == ["Admin", "Member"]


async def test_inherited_ownership_follows_the_relation_path(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, app: FastAPI
) -> None:
    org = await make_org()
    for body in (SYSTEM, SERVICE):
        await ok(client, "POST", "/v1/blueprints", org, json=body)
    deployment = {
        "identifier": "deployment",
        "title": "Deployment",
        "schema": {"properties": {"version": {"type": "string"}}},
        "relations": {"service": {"target": "service", "many": False, "required": True}},
        "ownership": {"type": "Inherited", "path": "service"},
    }
    await ok(client, "POST", "/v1/blueprints", org, json=deployment)
    await ok(
        client,
        "PATCH",
        "/v1/blueprints/deployment/permissions",
        org,
        json={"entities": {"register": {"ownedByTeam": True}, "update": {"ownedByTeam": True}}},
    )
    await _seed(client, org, "pay-api", "payments")
    await _seed(client, org, "search-api", "search")
    await add_user(db, org.org_id, "owner@example.com", roles=["Member"], teams=["payments"])
    owner = user_headers(app, org.org_id, "owner@example.com")

    def dep(ident: str, service: str) -> dict[str, Any]:
        return {"identifier": ident, "relations": {"service": service}}

    r = await client.post(
        "/v1/blueprints/deployment/entities", json=dep("d1", "pay-api"), headers=owner
    )
    assert r.status_code == 201, r.text
    r = await client.post(
        "/v1/blueprints/deployment/entities", json=dep("d2", "search-api"), headers=owner
    )
    assert r.status_code == 403, r.text
    assert r.json()["details"]["permission"] == "entities.register"
    # Moving an owned deployment to another team's service gives it away: refused.
    r = await client.patch(
        "/v1/blueprints/deployment/entities/d1",
        json={"relations": {"service": "search-api"}},
        headers=owner,
    )
    assert r.status_code == 403, r.text
    assert r.json()["details"]["permission"] == "entities.updateRelations.service"
    r = await client.patch(
        "/v1/blueprints/deployment/entities/d1",
        json={"properties": {"version": "2"}},
        headers=owner,
    )
    assert r.status_code == 200, r.text


async def test_a_bulk_write_refuses_only_the_entities_not_permitted(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, app: FastAPI
) -> None:
    org = await make_org()
    for body in (SYSTEM, SERVICE):
        await ok(client, "POST", "/v1/blueprints", org, json=body)
    await ok(
        client,
        "PATCH",
        "/v1/blueprints/service/permissions",
        org,
        json={"entities": {"register": {"ownedByTeam": True}}},
    )
    await add_user(db, org.org_id, "owner@example.com", roles=["Member"], teams=["payments"])
    owner = user_headers(app, org.org_id, "owner@example.com")
    r = await client.post(
        "/v1/blueprints/service/entities/bulk",
        json={"entities": [_entity("a", "payments"), _entity("b", "search")]},
        headers=owner,
    )
    assert r.status_code == 207, r.text
    assert [e["identifier"] for e in r.json()["entities"]] == ["a"]
    [error] = r.json()["errors"]
    assert error["identifier"] == "b" and error["statusCode"] == 403
    r = await client.get("/v1/blueprints/service/entities/b", headers=org.headers)
    assert r.status_code == 404


async def test_role_and_team_changes_apply_to_the_next_request(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, app: FastAPI
) -> None:
    org = await make_org()
    await add_user(db, org.org_id, "eve@example.com", roles=["Admin"])
    eve = user_headers(app, org.org_id, "eve@example.com")
    assert (await client.get("/v1/audit-log", headers=eve)).status_code == 200
    async with db.tenant(org.org_id) as tx:
        await tx.execute(
            "UPDATE users SET roles = '{Member}' WHERE org_id = $1 AND email = $2",
            org.org_id,
            "eve@example.com",
        )
    r = await client.get("/v1/audit-log", headers=eve)
    assert r.status_code == 403 and r.json()["details"]["permission"] == "audit.read"
    async with db.tenant(org.org_id) as tx:
        await tx.execute(
            "UPDATE users SET status = 'Disabled' WHERE org_id = $1 AND email = $2",
            org.org_id,
            "eve@example.com",
        )
    assert (await client.get("/v1/blueprints", headers=eve)).status_code == 401
    # A user token names its org: the same email in another org is another person.
    other = await make_org()
    stray = user_headers(app, other.org_id, "eve@example.com")
    assert (await client.get("/v1/blueprints", headers=stray)).status_code == 401


async def test_all_approvals_wait_for_every_approver(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, app: FastAPI
) -> None:
    org = await make_org()
    await ok(client, "POST", "/v1/blueprints", org, json=SYSTEM)
    await ok(client, "POST", "/v1/blueprints", org, json=SERVICE)
    gated = {**GATED, "requiredApproval": {"type": "ALL"}}
    await ok(client, "POST", "/v1/actions", org, json=gated)
    await add_user(db, org.org_id, "ann@example.com", roles=["Member"], teams=["release"])
    await add_user(db, org.org_id, "bob@example.com", roles=["Member"], teams=["release"])
    await add_user(db, org.org_id, "cid@example.com", roles=["Member"])
    await ok(
        client,
        "PATCH",
        "/v1/actions/gated/permissions",
        org,
        json={"approve": {"roles": [], "teams": ["release"]}},
    )
    ann, bob, cid = (
        user_headers(app, org.org_id, f"{n}@example.com") for n in ("ann", "bob", "cid")
    )

    async def new_run() -> str:
        run = await ok(client, "POST", "/v1/actions/gated/runs", org, json={"properties": {}})
        assert run["run"]["status"] == "WAITING_FOR_APPROVAL"
        return str(run["run"]["id"])

    async def decide(run_id: str, who: dict[str, str], status: str) -> httpx.Response:
        return await client.patch(
            f"/v1/actions/runs/{run_id}/approval", json={"status": status}, headers=who
        )

    run_id = await new_run()
    r = await decide(run_id, cid, "APPROVE")
    assert r.status_code == 403 and r.json()["details"]["permission"] == "actions.approve"
    r = await decide(run_id, ann, "APPROVE")
    assert r.status_code == 201, r.text
    run = r.json()["run"]
    assert run["status"] == "WAITING_FOR_APPROVAL"
    assert run["approval"]["state"] == "PENDING"
    assert run["approval"]["pending"] == ["bob@example.com"]
    # Approving twice counts once.
    r = await decide(run_id, ann, "APPROVE")
    assert r.json()["run"]["status"] == "WAITING_FOR_APPROVAL"
    r = await decide(run_id, bob, "APPROVE")
    assert r.json()["run"]["status"] == "IN_PROGRESS", r.text
    assert {a["userId"] for a in r.json()["run"]["approval"]["approvals"]} == {
        "ann@example.com",
        "bob@example.com",
    }
    # One decline ends it.
    run_id = await new_run()
    await decide(run_id, ann, "APPROVE")
    r = await decide(run_id, bob, "DECLINE")
    assert r.json()["run"]["status"] == "DECLINED"


async def test_me_reports_roles_teams_and_effective_permissions(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, app: FastAPI
) -> None:
    org = await make_org()
    await _world(client, db, app, org)
    owner = user_headers(app, org.org_id, "owner@example.com")
    me = (await client.get("/v1/auth/me", headers=owner)).json()["me"]
    assert me["kind"] == "user" and me["email"] == "owner@example.com"
    assert me["organization"] == {"id": str(org.org_id), "name": org.name}
    assert me["roles"] == ["Member"] and me["teams"] == ["payments"]
    perms = me["permissions"]
    assert "audit.read" not in perms["operations"] and "blueprints.read" in perms["operations"]
    service = perms["blueprints"]["service"]["entities"]
    assert service["register"] == "ownedByTeam"
    assert service["unregister"] == "none"
    assert service["updateProperties"] == {"language": "ownedByTeam", "tier": "none"}
    assert perms["blueprints"]["system"]["entities"]["register"] == "none"
    assert perms["actions"]["deploy"] == {"execute": "ownedByTeam", "approve": False}
    assert perms["actions"]["open"] == {"execute": "all", "approve": False}

    mod = user_headers(app, org.org_id, "mod@example.com")
    perms = (await client.get("/v1/auth/me", headers=mod)).json()["me"]["permissions"]
    assert perms["blueprints"]["service"]["entities"]["unregister"] == "all"
    assert "blueprints.update" in perms["blueprints"]["service"]["operations"]
    assert perms["blueprints"]["system"]["operations"] == []

    me = (await client.get("/v1/auth/me", headers=org.headers)).json()["me"]
    assert me["kind"] == "app" and me["roles"] == ["Admin"] and me["email"] is None
    assert "audit.read" in me["permissions"]["operations"]
    assert me["permissions"]["actions"]["gated"] == {"execute": "all", "approve": True}


async def test_permission_changes_are_in_the_audit_log(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    for body in (SYSTEM, SERVICE):
        await ok(client, "POST", "/v1/blueprints", org, json=body)
    await ok(client, "POST", "/v1/actions", org, json=OPEN)
    await ok(
        client,
        "PATCH",
        "/v1/blueprints/service/permissions",
        org,
        json={"entities": {"register": {"ownedByTeam": True}}},
    )
    await ok(client, "PATCH", "/v1/actions/open/permissions", org, json={"execute": {"roles": []}})
    async with db.tenant(org.org_id) as tx:
        rows = await tx.fetch(
            "SELECT resource, identifier, action, actor, diff FROM audit_log "
            "WHERE org_id = $1 AND resource LIKE '%permissions' ORDER BY id",
            org.org_id,
        )
    assert [(r["resource"], r["identifier"], r["action"]) for r in rows] == [
        ("blueprint-permissions", "service", "CREATE"),
        ("action-permissions", "open", "CREATE"),
    ]
    assert rows[0]["actor"] == org.client_id
    assert rows[0]["diff"]["after"]["permissions"]["entities"]["register"]["ownedByTeam"] is True


async def test_a_moderator_holds_what_members_hold(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, app: FastAPI
) -> None:
    org = await make_org()
    for path, body in (
        ("/v1/blueprints", SYSTEM),
        ("/v1/blueprints", SERVICE),
        ("/v1/actions", OPEN),
    ):
        await ok(client, "POST", path, org, json=body)
    await add_user(db, org.org_id, "mo@example.com", roles=["service-moderator"])
    await add_user(db, org.org_id, "nobody@example.com", roles=[])
    mo = user_headers(app, org.org_id, "mo@example.com")
    nobody = user_headers(app, org.org_id, "nobody@example.com")
    # `open` is executable by Members (the default): a moderator without the Member role too,
    # a user holding no role not.
    r = await client.post("/v1/actions/open/runs", json={"properties": {}}, headers=mo)
    assert r.status_code == 202, r.text
    r = await client.post("/v1/actions/open/runs", json={"properties": {}}, headers=nobody)
    assert r.status_code == 403


async def test_people_write_from_the_ui_and_machines_from_the_api(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, app: FastAPI
) -> None:
    org = await make_org()
    await ok(client, "POST", "/v1/blueprints", org, json=SYSTEM)
    await add_user(db, org.org_id, "ann@example.com", roles=["Admin"])
    ann = user_headers(app, org.org_id, "ann@example.com")
    r = await client.post("/v1/blueprints/system/entities", json={"identifier": "a"}, headers=ann)
    assert r.status_code == 201, r.text
    await ok(client, "POST", "/v1/blueprints/system/entities", org, json={"identifier": "b"})
    r = await client.get("/v1/audit-log", params={"resources": "entity"}, headers=org.headers)
    seen = {
        (a["identifier"], a["trigger"]["origin"], a["trigger"]["by"]["userId"])
        for a in r.json()["audits"]
    }
    assert seen == {("a", "UI", "ann@example.com"), ("b", "API", org.client_id)}
