"""Blueprints: Port's shapes, schema checks named by JSON pointer, relations, safe changes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from tests.conftest import Org, OrgFactory


def service_bp(**overrides: Any) -> dict[str, Any]:
    bp: dict[str, Any] = {
        "identifier": "service",
        "title": "Service",
        "icon": "Service",
        "schema": {
            "properties": {
                "language": {
                    "type": "string",
                    "enum": ["python", "go"],
                    "enumColors": {"go": "blue"},
                },
                "coverage": {"type": "number", "minimum": 0, "maximum": 100},
                "url": {"type": "string", "format": "url"},
                "slug": {"type": "string", "pattern": "^([a-z0-9]+-)*[a-z0-9]+$"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "onCall": {"type": "boolean", "default": False},
            },
            "required": ["language"],
        },
    }
    bp.update(overrides)
    return bp


async def _create(client: httpx.AsyncClient, org: Org, body: dict[str, Any]) -> httpx.Response:
    return await client.post("/v1/blueprints", json=body, headers=org.headers)


async def test_create_answers_201_with_ports_shape(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    response = await _create(client, org, service_bp())
    bp = response.json()["blueprint"]
    assert response.status_code == 201 and response.json()["ok"] is True
    assert bp["identifier"] == "service" and bp["relations"] == {}
    assert bp["schema"]["required"] == ["language"]
    assert {"createdAt", "createdBy", "updatedAt", "updatedBy"} <= set(bp)
    assert bp["createdBy"] == org.client_id


async def test_every_blueprint_carries_schema_and_relations(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _create(client, org, {"identifier": "bare", "title": "Bare", "schema": {}})
    bp = (await client.get("/v1/blueprints/bare", headers=org.headers)).json()["blueprint"]
    assert bp["schema"] == {"properties": {}, "required": []} and bp["relations"] == {}


async def test_list_returns_the_orgs_blueprints(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _create(client, org, service_bp())
    await _create(client, org, {"identifier": "team", "title": "Team", "schema": {}})
    listed = (await client.get("/v1/blueprints", headers=org.headers)).json()["blueprints"]
    assert [b["identifier"] for b in listed] == ["service", "team"]


async def test_duplicate_identifier_is_409(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    org = await make_org()
    await _create(client, org, service_bp())
    again = await _create(client, org, service_bp())
    assert again.status_code == 409 and again.json()["error"] == "conflict"


async def test_schema_problems_are_all_named_by_pointer(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    body = service_bp(
        schema={
            "properties": {
                "a": {"type": "text"},
                "b": {"type": "string", "format": "colour"},
                "c": {"type": "number", "minimum": 5, "maximum": 1},
                "bad name": {"type": "string"},
            },
            "required": ["missing"],
        }
    )
    response = await _create(client, org, body)
    pointers = {d["pointer"] for d in response.json()["details"]}
    assert response.status_code == 422
    assert {
        "/schema/properties/a/type",
        "/schema/properties/b/format",
        "/schema/properties/c/minimum",
        "/schema/properties/bad name",
        "/schema/required/0",
    } <= pointers


async def test_invalid_regex_is_422(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    org = await make_org()
    body = service_bp(schema={"properties": {"p": {"type": "string", "pattern": "(unclosed"}}})
    response = await _create(client, org, body)
    assert response.status_code == 422
    assert response.json()["details"][0]["pointer"] == "/schema/properties/p/pattern"


async def test_runaway_regex_is_422_quickly(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    started = time.monotonic()
    for pattern in ("^(a+)+$", "(x+x+)+y", "^(\\w+\\s?)+$", "(a|aa)+$"):
        body = service_bp(schema={"properties": {"p": {"type": "string", "pattern": pattern}}})
        response = await _create(client, org, body)
        assert response.status_code == 422, pattern
        assert "nests repetitions" in response.json()["message"]
    assert time.monotonic() - started < 5


async def test_a_separated_repetition_is_accepted(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    response = await _create(client, org, service_bp())  # slug: ^([a-z0-9]+-)*[a-z0-9]+$
    assert response.status_code == 201


async def test_bad_identifier_is_422(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    org = await make_org()
    for identifier in ("..", "has space", "x" * 101):
        response = await _create(client, org, service_bp(identifier=identifier))
        assert response.status_code == 422, identifier


async def test_unicode_letters_are_allowed_in_identifiers(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    response = await _create(
        client, org, {"identifier": "dienst-ü", "title": "Dienst", "schema": {}}
    )
    assert response.status_code == 201


async def test_relation_target_must_exist(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    org = await make_org()
    body = service_bp(relations={"owner": {"target": "team", "required": False, "many": False}})
    response = await _create(client, org, body)
    assert response.status_code == 422
    assert response.json()["details"][0]["pointer"] == "/relations/owner/target"


async def test_relations_are_stored_with_defaults(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _create(client, org, {"identifier": "team", "title": "Team", "schema": {}})
    body = service_bp(
        relations={
            "owner": {"target": "team", "title": "Owner"},
            "dependsOn": {"target": "service", "many": True},
        }
    )
    bp = (await _create(client, org, body)).json()["blueprint"]
    assert bp["relations"]["owner"] == {
        "target": "team",
        "title": "Owner",
        "required": False,
        "many": False,
    }
    assert bp["relations"]["dependsOn"]["many"] is True


async def test_a_relation_target_cannot_be_deleted(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _create(client, org, {"identifier": "team", "title": "Team", "schema": {}})
    await _create(client, org, service_bp(relations={"owner": {"target": "team"}}))
    response = await client.delete("/v1/blueprints/team", headers=org.headers)
    assert response.status_code == 409
    assert "service.owner" in response.json()["message"]


async def test_a_self_related_blueprint_can_be_deleted(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _create(
        client, org, service_bp(relations={"dependsOn": {"target": "service", "many": True}})
    )
    assert (await client.delete("/v1/blueprints/service", headers=org.headers)).status_code == 200
    assert (await client.get("/v1/blueprints/service", headers=org.headers)).status_code == 404


async def test_type_change_in_place_is_422_with_how_to_migrate(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _create(client, org, service_bp())
    changed = service_bp()
    changed["schema"]["properties"]["coverage"] = {"type": "string"}
    response = await client.put("/v1/blueprints/service", json=changed, headers=org.headers)
    assert response.status_code == 422
    assert "rename" in response.json()["message"]


async def test_put_replaces_and_bumps_updated_at(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    created = (await _create(client, org, service_bp())).json()["blueprint"]
    await asyncio.sleep(0.01)
    changed = service_bp(title="Microservice")
    del changed["schema"]["properties"]["tags"]
    updated = (
        await client.put("/v1/blueprints/service", json=changed, headers=org.headers)
    ).json()["blueprint"]
    assert updated["title"] == "Microservice" and "tags" not in updated["schema"]["properties"]
    assert (
        updated["updatedAt"] > created["updatedAt"] and updated["createdAt"] == created["createdAt"]
    )


async def test_patch_changes_only_given_keys(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _create(client, org, {"identifier": "team", "title": "Team", "schema": {}})
    await _create(client, org, service_bp())
    response = await client.patch(
        "/v1/blueprints/service",
        json={"relations": {"owner": {"target": "team", "required": False, "many": False}}},
        headers=org.headers,
    )
    bp = response.json()["blueprint"]
    assert response.status_code == 200
    assert bp["relations"]["owner"]["target"] == "team" and bp["title"] == "Service"
    assert "coverage" in bp["schema"]["properties"]


async def test_identifier_mismatch_on_put_is_422(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _create(client, org, service_bp())
    response = await client.put(
        "/v1/blueprints/service", json=service_bp(identifier="other"), headers=org.headers
    )
    assert response.status_code == 422


async def test_invalid_jq_calculation_is_422(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    body = service_bp(
        calculationProperties={"x": {"calculation": ".properties | ((", "type": "string"}}
    )
    response = await _create(client, org, body)
    assert response.status_code == 422
    assert response.json()["details"][0]["pointer"] == "/calculationProperties/x/calculation"


async def test_missing_blueprint_is_json_404(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    for method in ("GET", "PUT", "PATCH", "DELETE"):
        kwargs: dict[str, Any] = {"json": service_bp()} if method in ("PUT", "PATCH") else {}
        response = await client.request(
            method, "/v1/blueprints/nope", headers=org.headers, **kwargs
        )
        assert response.status_code == 404 and response.json()["error"] == "not_found", method


async def test_orgs_never_see_or_touch_each_others_blueprints(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org_a = await make_org()
    org_b = await make_org()
    await _create(client, org_a, service_bp(title="A's"))
    assert (await client.get("/v1/blueprints", headers=org_b.headers)).json()["blueprints"] == []
    assert (await client.get("/v1/blueprints/service", headers=org_b.headers)).status_code == 404
    assert (await client.delete("/v1/blueprints/service", headers=org_b.headers)).status_code == 404
    assert (
        await client.patch("/v1/blueprints/service", json={"title": "x"}, headers=org_b.headers)
    ).status_code == 404
    # the same identifier in another org is independent
    assert (await _create(client, org_b, service_bp(title="B's"))).status_code == 201
    seen_a = (await client.get("/v1/blueprints/service", headers=org_a.headers)).json()["blueprint"]
    assert seen_a["title"] == "A's"


async def test_a_relation_cannot_target_another_orgs_blueprint(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org_a = await make_org()
    org_b = await make_org()
    await _create(client, org_b, {"identifier": "team", "title": "Team", "schema": {}})
    response = await _create(client, org_a, service_bp(relations={"owner": {"target": "team"}}))
    assert response.status_code == 422


async def test_mirror_and_ownership_paths_are_checked_to_the_end(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    for body in (
        {
            "identifier": "group",
            "title": "Group",
            "schema": {"properties": {"tier": {"type": "number"}}},
        },
        {
            "identifier": "team",
            "title": "Team",
            "schema": {"properties": {}},
            "relations": {"group": {"target": "group", "required": False, "many": False}},
        },
    ):
        assert (await _create(client, org, body)).status_code == 201

    def svc(mirrors: dict[str, Any], ownership: Any = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "identifier": "svc",
            "title": "Svc",
            "schema": {"properties": {}},
            "relations": {"owner": {"target": "team", "required": False, "many": False}},
            "mirrorProperties": mirrors,
        }
        if ownership is not None:
            body["ownership"] = ownership
        return body

    bad = await _create(
        client,
        org,
        svc(
            {"a": {"path": "owner.nope.tier"}, "b": {"path": "owner.group.nope"}},
            {"type": "Inherited", "path": "owner.nope"},
        ),
    )
    assert bad.status_code == 422, bad.text
    assert [d["pointer"] for d in bad.json()["details"]] == [
        "/mirrorProperties/a/path",
        "/mirrorProperties/b/path",
        "/ownership/path",
    ]
    good = await _create(
        client,
        org,
        svc(
            {"tier": {"path": "owner.group.tier"}, "groupName": {"path": "owner.group.$title"}},
            {"type": "Inherited", "path": "owner.group"},
        ),
    )
    assert good.status_code == 201, good.text


async def test_delete_actions_takes_the_blueprints_self_service_actions_along(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    for ident in ("gone", "kept"):
        r = await client.post(
            "/v1/blueprints",
            json={"identifier": ident, "title": ident, "schema": {"properties": {}}},
            headers=org.headers,
        )
        assert r.status_code == 201, r.text

    def action(ident: str, blueprint: str) -> dict[str, object]:
        return {
            "identifier": ident,
            "trigger": {
                "type": "self-service",
                "operation": "CREATE",
                "blueprintIdentifier": blueprint,
                "userInputs": {"properties": {}},
            },
            "invocationMethod": {"type": "WEBHOOK", "url": "https://hooks.example.com/a"},
        }

    on_change = {
        "identifier": "on-change",
        "trigger": {
            "type": "automation",
            "event": {"type": "ENTITY_UPDATED", "blueprintIdentifier": "gone"},
        },
        "invocationMethod": {"type": "WEBHOOK", "url": "https://hooks.example.com/b"},
    }
    for body in (action("make-gone", "gone"), action("make-kept", "kept"), on_change):
        r = await client.post("/v1/actions", json=body, headers=org.headers)
        assert r.status_code == 201, r.text
    r = await client.delete(
        "/v1/blueprints/gone", params={"delete_actions": "true"}, headers=org.headers
    )
    assert r.status_code == 200, r.text
    listed = (await client.get("/v1/actions", headers=org.headers)).json()["actions"]
    assert [a["identifier"] for a in listed] == ["make-kept", "on-change"]
    r = await client.delete("/v1/blueprints/kept", headers=org.headers)
    assert r.status_code == 200
    listed = (await client.get("/v1/actions", headers=org.headers)).json()["actions"]
    assert [a["identifier"] for a in listed] == ["make-kept", "on-change"]


async def test_a_catalog_page_is_made_only_when_asked_for(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    body = {"identifier": "paged", "title": "Paged", "schema": {"properties": {}}}
    r = await client.post(
        "/v1/blueprints", params={"create_catalog_page": "true"}, json=body, headers=org.headers
    )
    assert r.status_code == 201, r.text
    page = (await client.get("/v1/pages/paged", headers=org.headers)).json()["page"]
    assert (page["type"], page["blueprint"]) == ("blueprint-entities", "paged")
    r = await client.post(
        "/v1/blueprints",
        params={"create_catalog_page": "false"},
        json={**body, "identifier": "unpaged"},
        headers=org.headers,
    )
    assert r.status_code == 201, r.text
    assert (await client.get("/v1/pages/unpaged", headers=org.headers)).status_code == 404
