"""The audit log: every change recorded in the transaction of the change (none for a
rolled-back one), who and from where, secrets by metadata only, Port's filters, cursor
pages, Admins only, one org's log only."""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import FastAPI

from app.auth.service import create_credential
from app.db.database import Database
from tests.conftest import Org, OrgFactory
from tests.test_permissions import add_user, user_headers

SERVICE = {
    "identifier": "service",
    "title": "Service",
    "schema": {"properties": {"tier": {"type": "string"}}},
}


# A self-service action whose runs go nowhere (nothing listens on port 9).
DEPLOY: dict[str, Any] = {
    "identifier": "deploy",
    "trigger": {"type": "self-service", "operation": "CREATE", "userInputs": {"properties": {}}},
    "invocationMethod": {"type": "WEBHOOK", "url": "http://127.0.0.1:9/x"},
}


async def _audits(client: httpx.AsyncClient, org: Org, query: str = "") -> dict[str, Any]:
    r = await client.get(f"/v1/audit-log?{query}", headers=org.headers)
    assert r.status_code == 200, r.text
    return dict(r.json())


async def test_changes_are_recorded_with_actor_origin_and_diff(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    h = org.headers
    assert (await client.post("/v1/blueprints", json=SERVICE, headers=h)).status_code == 201
    await client.post(
        "/v1/blueprints/service/entities",
        json={"identifier": "api", "properties": {"tier": "1"}},
        headers={**h, "User-Agent": "port-ocean/0.12.9"},
    )
    await client.patch(
        "/v1/blueprints/service/entities/api", json={"properties": {"tier": "2"}}, headers=h
    )
    await client.post(
        "/v1/organization/secrets",
        json={"secretName": "TOKEN", "secretValue": "very-secret-value"},
        headers=h,
    )
    await client.delete("/v1/blueprints/service/entities/api", headers=h)
    audits = (await _audits(client, org))["audits"]
    kinds = [(a["resourceType"], a["action"], a["identifier"]) for a in audits]
    assert kinds == [
        ("entity", "DELETE", "api"),
        ("secret", "CREATE", "TOKEN"),
        ("entity", "UPDATE", "api"),
        ("entity", "CREATE", "api"),
        ("blueprint", "CREATE", "service"),
        ("credential", "CREATE", org.client_id),  # made with the org, by the service
    ]
    assert {a["status"] for a in audits} == {"SUCCESS"}
    assert {a["trigger"]["by"]["userId"] for a in audits[:-1]} == {org.client_id}
    assert audits[-1]["trigger"] == {**audits[-1]["trigger"], "origin": "SYSTEM"}
    assert audits[-1]["trigger"]["by"]["userId"] == "system"
    assert "secret_hash" not in audits[-1]["diff"]["after"]
    created = audits[3]
    assert created["trigger"]["origin"] == "INTEGRATION"
    assert created["context"] == {"blueprint": "service", "entity": "api"}
    update = audits[2]
    assert update["diff"]["before"]["properties"] == {"tier": "1"}
    assert update["diff"]["after"]["properties"] == {"tier": "2"}
    assert audits[4]["trigger"]["origin"] == "API"
    # Secrets by metadata only.
    secret = audits[1]
    assert "very-secret-value" not in str(audits)
    assert "value_encrypted" not in secret["diff"]["after"]
    assert secret["diff"]["after"]["name"] == "TOKEN"


async def test_a_failed_change_leaves_no_entry(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await client.post("/v1/blueprints", json=SERVICE, headers=org.headers)
    r = await client.post(
        "/v1/blueprints/service/entities",
        json={"identifier": "bad", "properties": {"tier": 5}},
        headers=org.headers,
    )
    assert r.status_code == 422
    audits = (await _audits(client, org, "resources=entity"))["audits"]
    assert audits == []


async def test_filters_and_pages(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    org = await make_org()
    h = org.headers
    await client.post("/v1/blueprints", json=SERVICE, headers=h)
    for i in range(5):
        await client.post(
            "/v1/blueprints/service/entities?upsert=true",
            json={"identifier": f"e{i}", "properties": {"tier": str(i)}},
            headers=h,
        )
    assert len((await _audits(client, org, "entity=e3"))["audits"]) == 1
    assert len((await _audits(client, org, "identifier=service"))["audits"]) == 1
    assert len((await _audits(client, org, "resources=entity&action=CREATE"))["audits"]) == 5
    assert (await _audits(client, org, "resources=run"))["audits"] == []
    assert len((await _audits(client, org, "blueprint=service&resources=blueprint"))["audits"]) == 1
    assert (await _audits(client, org, "status=FAILURE"))["audits"] == []
    assert (await _audits(client, org, "from=2100-01-01T00:00:00Z"))["audits"] == []
    seen: list[str] = []
    page = await _audits(client, org, "limit=2")
    while True:
        seen += [a["id"] for a in page["audits"]]
        if "next" not in page:
            break
        page = await _audits(client, org, f"limit=2&next={page['next']}")
    assert len(seen) == len(set(seen)) == 7  # the org's credential, the blueprint, 5 entities
    r = await client.get("/v1/audit-log?next=garbage", headers=h)
    assert r.status_code == 422 and r.json()["ok"] is False
    r = await client.get("/v1/audit-log?resources=nonsense", headers=h)
    assert r.status_code == 422


async def test_runs_and_actions_are_recorded(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    h = org.headers
    assert (await client.post("/v1/actions", json=DEPLOY, headers=h)).status_code == 201
    run_id = (
        await client.post("/v1/actions/deploy/runs", json={"properties": {}}, headers=h)
    ).json()["run"]["id"]
    await client.patch(f"/v1/actions/runs/{run_id}", json={"status": "SUCCESS"}, headers=h)
    runs = (await _audits(client, org, f"run_id={run_id}"))["audits"]
    assert [a["action"] for a in runs] == ["UPDATE", "CREATE"]
    assert runs[0]["diff"]["after"]["status"] == "SUCCESS"
    assert "definition" not in runs[0]["diff"]["after"]
    actions = (await _audits(client, org, "resources=action"))["audits"]
    assert [a["identifier"] for a in actions] == ["deploy"]


async def test_only_admins_of_the_org_read_it(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    owner, other = await make_org(), await make_org()
    await client.post("/v1/blueprints", json=SERVICE, headers=owner.headers)
    theirs = (await _audits(client, other))["audits"]
    assert [(a["resourceType"], a["identifier"]) for a in theirs] == [
        ("credential", other.client_id)
    ]
    async with db.system(owner.org_id) as tx:
        member = await create_credential(tx, org_id=owner.org_id, name="ci", roles=["Member"])
    r = await client.post(
        "/v1/auth/access_token",
        json={"clientId": member.client_id, "clientSecret": member.client_secret},
    )
    token = r.json()["accessToken"]
    r = await client.get("/v1/audit-log", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 403 and r.json()["ok"] is False
    assert "Admin" in r.json()["message"]


async def test_includes_keeps_only_the_fields_named(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await client.patch("/v1/organization", json={"name": "Renamed"}, headers=org.headers)
    r = await client.get(
        "/v1/audit-log",
        params=[("includes", "action"), ("includes", "resourceType"), ("includes", "message")],
        headers=org.headers,
    )
    assert r.status_code == 200, r.text
    assert r.json()["audits"] == [
        {"action": "UPDATE", "resourceType": "organization"},
        {"action": "CREATE", "resourceType": "credential"},  # the org's first credential
    ]
    r = await client.get("/v1/audit-log", params={"includes": "secret"}, headers=org.headers)
    assert r.status_code == 422 and r.json()["ok"] is False


async def test_action_type_keeps_the_entries_of_actions_of_that_kind(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    """`actionType` (Port's): an action's changes, its runs and what they changed, by the
    action's kind; entries of no action are left out; another org's are never there."""
    from app.automations.feed import process_once
    from tests.test_automations import _feed, automation

    await process_once(db)  # the feed's cursor exists from here on
    org = await make_org()
    other = await make_org()
    h = org.headers
    for who in (org, other):
        r = await client.post("/v1/blueprints", json=SERVICE, headers=who.headers)
        assert r.status_code == 201
    created = automation("on-create", {"type": "ENTITY_CREATED", "blueprintIdentifier": "service"})
    for body in (DEPLOY, created):
        assert (await client.post("/v1/actions", json=body, headers=h)).status_code == 201
        r = await client.post("/v1/actions", json=body, headers=other.headers)
        assert r.status_code == 201
    manual = await client.post("/v1/actions/deploy/runs", json={"properties": {}}, headers=h)
    manual_id = manual.json()["run"]["id"]
    r = await client.post("/v1/blueprints/service/entities", json={"identifier": "api"}, headers=h)
    assert r.status_code == 201
    await _feed(db)
    runs = (await client.get("/v1/actions/runs?action=on-create", headers=h)).json()["runs"]
    assert len(runs) == 1
    fired = runs[0]["id"]

    def key(a: dict[str, Any]) -> tuple[str, str]:
        return (a["resourceType"], a["identifier"])

    automated = (await _audits(client, org, "actionType=automation"))["audits"]
    assert {key(a) for a in automated} == {("action", "on-create"), ("run", fired)}, automated
    manual_entries = (await _audits(client, org, "actionType=self-service"))["audits"]
    assert {key(a) for a in manual_entries} == {("action", "deploy"), ("run", manual_id)}
    everything = (await _audits(client, org))["audits"]
    assert ("entity", "api") in {key(a) for a in everything}  # of no action: left out above
    r = await client.get("/v1/audit-log?actionType=manual", headers=h)
    assert r.status_code == 422 and r.json()["ok"] is False
    theirs = (await _audits(client, other, "actionType=automation"))["audits"]
    assert {key(a) for a in theirs} == {("action", "on-create")}


async def test_installation_id_keeps_an_integrations_entries(
    client: httpx.AsyncClient, app: FastAPI, make_org: OrgFactory, db: Database
) -> None:
    """`InstallationId` (Port's): the integration's own changes and the entity changes
    its Ocean writes made (named by their User-Agent), deletes included; not the same
    entities written by anyone else, nor another org's integration of the same name."""
    org = await make_org()
    other = await make_org()
    ocean = {"User-Agent": "port-ocean/fake-integration/0.1.0/my-gh/exporter"}
    for who in (org, other):
        assert (
            await client.post("/v1/blueprints", json=SERVICE, headers=who.headers)
        ).status_code == 201
        r = await client.post(
            "/v1/integration",
            json={"installationId": "my-gh", "installationAppType": "fake-integration"},
            headers=who.headers,
        )
        assert r.status_code in (200, 201), r.text
    path = "/v1/blueprints/service/entities"
    bulk = {"entities": [{"identifier": "api"}, {"identifier": "web"}]}
    r = await client.post(f"{path}/bulk?upsert=true", json=bulk, headers={**org.headers, **ocean})
    assert r.status_code in (200, 207), r.text
    r = await client.post(f"{path}?upsert=true", json={"identifier": "db"}, headers=org.headers)
    assert r.status_code in (200, 201), r.text
    r = await client.delete(f"{path}/web", headers={**org.headers, **ocean})
    assert r.status_code == 200, r.text
    r = await client.post(f"{path}?upsert=true", json={"identifier": "x"}, headers=other.headers)
    assert r.status_code in (200, 201), r.text
    # A person's write names no integration, whatever its User-Agent says.
    await add_user(db, org.org_id, "ann@example.com", roles=["Admin"])
    ann = {**user_headers(app, org.org_id, "ann@example.com"), **ocean}
    r = await client.post(f"{path}?upsert=true", json={"identifier": "ann"}, headers=ann)
    assert r.status_code in (200, 201), r.text
    r = await client.get("/v1/audit-log?InstallationId=", headers=org.headers)
    assert r.status_code == 422, r.text

    found = (await _audits(client, org, "InstallationId=my-gh"))["audits"]
    assert sorted((a["resourceType"], a["identifier"], a["action"]) for a in found) == [
        ("entity", "api", "CREATE"),
        ("entity", "web", "CREATE"),
        ("entity", "web", "DELETE"),
        ("integration", "my-gh", "CREATE"),
    ], found
    assert {a["context"].get("installationId") for a in found if a["resourceType"] == "entity"} == {
        "my-gh"
    }
    theirs = (await _audits(client, other, "InstallationId=my-gh"))["audits"]
    assert [(a["resourceType"], a["identifier"]) for a in theirs] == [("integration", "my-gh")]


async def test_include_deleted_entities_false_leaves_out_entities_that_are_gone(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    h = org.headers
    assert (await client.post("/v1/blueprints", json=SERVICE, headers=h)).status_code == 201
    for name in ("kept", "gone"):
        r = await client.post(
            "/v1/blueprints/service/entities", json={"identifier": name}, headers=h
        )
        assert r.status_code == 201, r.text
    assert (
        await client.delete("/v1/blueprints/service/entities/gone", headers=h)
    ).status_code == 200

    async def entities(query: str) -> list[tuple[str, str]]:
        found = (await _audits(client, org, f"resources=entity{query}"))["audits"]
        return [(a["identifier"], a["action"]) for a in found]

    everything = [("gone", "DELETE"), ("gone", "CREATE"), ("kept", "CREATE")]
    assert await entities("") == everything
    assert await entities("&include_deleted_entities=true") == everything
    assert await entities("&include_deleted_entities=false") == [("kept", "CREATE")]
    others = (await _audits(client, org, "include_deleted_entities=false"))["audits"]
    assert ("blueprint", "service") in {(a["resourceType"], a["identifier"]) for a in others}
