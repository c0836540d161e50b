"""Entities: Port's shapes and flags, validation by JSON pointer, relations, events, tenancy."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from app.db.database import Database
from tests.conftest import Org, OrgFactory

H = dict[str, str]


async def _setup(client: httpx.AsyncClient, org: Org) -> None:
    async def bp(body: dict[str, Any]) -> None:
        r = await client.post("/v1/blueprints", json=body, headers=org.headers)
        assert r.status_code == 201, r.text

    await bp(
        {
            "identifier": "team",
            "title": "Team",
            "schema": {"properties": {"size": {"type": "number"}}},
        }
    )
    await bp(
        {
            "identifier": "service",
            "title": "Service",
            "schema": {
                "properties": {
                    "language": {"type": "string", "enum": ["python", "go"]},
                    "coverage": {"type": "number", "minimum": 0, "maximum": 100},
                    "url": {"type": "string", "format": "url"},
                    "owner_email": {"type": "string", "format": "email"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["language"],
            },
            "relations": {
                "team": {"target": "team", "required": False, "many": False},
                "dependsOn": {"target": "service", "required": False, "many": True},
            },
        }
    )
    await bp(
        {
            "identifier": "deployment",
            "title": "Deployment",
            "schema": {"properties": {}},
            "relations": {"service": {"target": "service", "required": True, "many": False}},
        }
    )


def svc(identifier: str = "api", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "identifier": identifier,
        "title": identifier.upper(),
        "properties": {"language": "python"},
    }
    body.update(extra)
    return body


@pytest.fixture
async def org(client: httpx.AsyncClient, make_org: OrgFactory) -> Org:
    created = await make_org()
    await _setup(client, created)
    return created


async def _post(
    client: httpx.AsyncClient, org: Org, body: Any, bp: str = "service", **params: Any
) -> httpx.Response:
    query = {k: str(v).lower() for k, v in params.items()}
    return await client.post(
        f"/v1/blueprints/{bp}/entities", json=body, headers=org.headers, params=query
    )


async def _events(db: Database, org: Org, identifier: str) -> list[dict[str, Any]]:
    async with db.tenant(org.org_id) as tx:
        rows = await tx.fetch(
            "SELECT action, before, after, actor, origin FROM entity_events WHERE org_id = $1 AND identifier = $2 ORDER BY id",
            org.org_id,
            identifier,
        )
    return [dict(r) for r in rows]


async def test_create_answers_201_with_ports_entity_shape(
    client: httpx.AsyncClient, org: Org
) -> None:
    response = await _post(client, org, svc(team="platform", relations={"dependsOn": []}))
    entity = response.json()["entity"]
    assert response.status_code == 201
    assert entity["identifier"] == "api" and entity["blueprint"] == "service"
    assert entity["team"] == ["platform"] and entity["properties"] == {"language": "python"}
    assert entity["relations"] == {"team": None, "dependsOn": []}
    assert {"createdAt", "createdBy", "updatedAt", "updatedBy"} <= set(entity)


async def test_datasource_is_the_writers_user_agent(
    client: httpx.AsyncClient, org: Org, db: Database
) -> None:
    agent = "port-ocean/github/1.0/my-github/exporter"
    await client.post(
        "/v1/blueprints/service/entities", json=svc(), headers={**org.headers, "User-Agent": agent}
    )
    async with db.tenant(org.org_id) as tx:
        stored = await tx.fetchval("SELECT datasource FROM entities WHERE identifier = 'api'")
    assert stored == agent
    assert (await _events(db, org, "api"))[0]["origin"] == "INTEGRATION"


async def test_existing_identifier_without_upsert_is_409(
    client: httpx.AsyncClient, org: Org
) -> None:
    await _post(client, org, svc())
    again = await _post(client, org, svc())
    assert again.status_code == 409 and again.json()["error"] == "conflict"


async def test_every_failing_property_is_named_by_pointer(
    client: httpx.AsyncClient, org: Org
) -> None:
    body = svc(
        properties={
            "language": "cobol",
            "coverage": 120,
            "url": "not a url",
            "owner_email": "x",
            "tags": [1],
            "extra": 1,
        }
    )
    response = await _post(client, org, body)
    pointers = {d["pointer"] for d in response.json()["details"]}
    assert response.status_code == 422
    assert pointers == {
        "/properties/language",
        "/properties/coverage",
        "/properties/url",
        "/properties/owner_email",
        "/properties/tags/0",
        "/properties/extra",
    }


async def test_missing_required_property_is_422(client: httpx.AsyncClient, org: Org) -> None:
    response = await _post(client, org, {"identifier": "x", "properties": {}})
    assert response.status_code == 422
    assert response.json()["details"][0]["pointer"] == "/properties/language"


async def test_upsert_that_changes_nothing_writes_nothing(
    client: httpx.AsyncClient, org: Org, db: Database
) -> None:
    first = (await _post(client, org, svc())).json()["entity"]
    await asyncio.sleep(0.01)
    again = await _post(client, org, svc(), upsert=True)
    assert again.status_code == 200
    assert again.json()["entity"]["updatedAt"] == first["updatedAt"]
    assert [e["action"] for e in await _events(db, org, "api")] == ["CREATE"]


async def test_upsert_replaces_without_merge(client: httpx.AsyncClient, org: Org) -> None:
    await _post(client, org, svc(properties={"language": "go", "coverage": 50}))
    response = await _post(client, org, svc(properties={"language": "python"}), upsert=True)
    assert response.json()["entity"]["properties"] == {"language": "python"}


async def test_merge_updates_only_given_fields_and_null_clears(
    client: httpx.AsyncClient, org: Org
) -> None:
    await _post(
        client,
        org,
        svc(properties={"language": "go", "coverage": 50, "url": "https://x.io"}, team="a"),
    )
    response = await _post(
        client,
        org,
        {"identifier": "api", "properties": {"coverage": 70, "url": None}},
        upsert=True,
        merge=True,
    )
    entity = response.json()["entity"]
    assert entity["properties"] == {"language": "go", "coverage": 70}
    assert entity["title"] == "API" and entity["team"] == ["a"]


async def test_updates_append_events_with_before_and_after(
    client: httpx.AsyncClient, org: Org, db: Database
) -> None:
    await _post(client, org, svc())
    await client.patch(
        "/v1/blueprints/service/entities/api",
        json={"properties": {"coverage": 10}},
        headers=org.headers,
    )
    await client.delete("/v1/blueprints/service/entities/api", headers=org.headers)
    events = await _events(db, org, "api")
    assert [e["action"] for e in events] == ["CREATE", "UPDATE", "DELETE"]
    assert events[0]["before"] is None and events[2]["after"] is None
    assert events[1]["before"]["properties"] == {"language": "python"}
    assert events[1]["after"]["properties"] == {"language": "python", "coverage": 10}
    assert events[1]["actor"] == org.client_id


async def test_validation_only_writes_nothing(client: httpx.AsyncClient, org: Org) -> None:
    response = await _post(client, org, svc(), validation_only=True)
    assert response.status_code == 201
    assert (
        await client.get("/v1/blueprints/service/entities/api", headers=org.headers)
    ).status_code == 404


async def test_relation_to_a_missing_entity_is_404_not_found(
    client: httpx.AsyncClient, org: Org
) -> None:
    response = await _post(client, org, svc(relations={"team": "ghost"}))
    assert response.status_code == 404
    assert response.json()["error"] == "not_found" and "ghost" in response.json()["message"]


async def test_create_missing_related_entities_creates_them(
    client: httpx.AsyncClient, org: Org
) -> None:
    response = await _post(
        client,
        org,
        svc(relations={"team": "platform", "dependsOn": ["db", "cache"]}),
        create_missing_related_entities=True,
    )
    # dependsOn targets are services, which require `language`: they cannot be made bare.
    assert response.status_code == 422
    response = await _post(
        client, org, svc(relations={"team": "platform"}), create_missing_related_entities=True
    )
    assert response.status_code == 201
    team = await client.get("/v1/blueprints/team/entities/platform", headers=org.headers)
    assert team.status_code == 200


async def test_single_relation_takes_one_identifier(client: httpx.AsyncClient, org: Org) -> None:
    response = await _post(client, org, svc(relations={"team": ["a", "b"]}))
    assert response.status_code == 422


async def test_many_relation_links_are_stored_and_returned(
    client: httpx.AsyncClient, org: Org
) -> None:
    await _post(client, org, svc("db"))
    await _post(client, org, svc("cache"))
    response = await _post(client, org, svc(relations={"dependsOn": ["db", "cache"]}))
    assert response.json()["entity"]["relations"]["dependsOn"] == ["cache", "db"]
    got = (await client.get("/v1/blueprints/service/entities/api", headers=org.headers)).json()[
        "entity"
    ]
    assert got["relations"]["dependsOn"] == ["cache", "db"]


async def test_entities_of_one_request_may_link_to_each_other(
    client: httpx.AsyncClient, org: Org
) -> None:
    response = await client.post(
        "/v1/blueprints/service/entities/bulk",
        json={"entities": [svc("a", relations={"dependsOn": ["b"]}), svc("b")]},
        headers=org.headers,
    )
    assert response.status_code == 200, response.text


async def test_required_relation_is_enforced(client: httpx.AsyncClient, org: Org) -> None:
    response = await _post(client, org, {"identifier": "d1"}, bp="deployment")
    assert response.status_code == 422
    assert response.json()["details"][0]["pointer"] == "/relations/service"


async def test_deleting_a_required_target_is_409_unless_delete_dependents(
    client: httpx.AsyncClient, org: Org
) -> None:
    await _post(client, org, svc())
    await _post(client, org, {"identifier": "d1", "relations": {"service": "api"}}, bp="deployment")
    refused = await client.delete("/v1/blueprints/service/entities/api", headers=org.headers)
    assert refused.status_code == 409 and "delete_dependents" in refused.json()["message"]
    done = await client.delete(
        "/v1/blueprints/service/entities/api",
        headers=org.headers,
        params={"delete_dependents": "true"},
    )
    assert done.status_code == 200
    assert (
        await client.get("/v1/blueprints/deployment/entities/d1", headers=org.headers)
    ).status_code == 404


async def test_deleting_an_optional_target_unlinks_it(client: httpx.AsyncClient, org: Org) -> None:
    await _post(client, org, {"identifier": "platform"}, bp="team")
    await _post(client, org, svc(relations={"team": "platform"}))
    assert (
        await client.delete("/v1/blueprints/team/entities/platform", headers=org.headers)
    ).status_code == 200
    got = (await client.get("/v1/blueprints/service/entities/api", headers=org.headers)).json()[
        "entity"
    ]
    assert got["relations"]["team"] is None


async def test_deleting_a_missing_entity_is_json_404(client: httpx.AsyncClient, org: Org) -> None:
    response = await client.delete("/v1/blueprints/service/entities/nope", headers=org.headers)
    assert response.status_code == 404 and response.json() == {
        **response.json(),
        "ok": False,
        "error": "not_found",
    }


async def test_identifiers_with_slashes_round_trip(client: httpx.AsyncClient, org: Org) -> None:
    await _post(client, org, svc("org/repo"))
    got = await client.get("/v1/blueprints/service/entities/org%2Frepo", headers=org.headers)
    assert got.status_code == 200 and got.json()["entity"]["identifier"] == "org/repo"
    gone = await client.delete("/v1/blueprints/service/entities/org%2Frepo", headers=org.headers)
    assert gone.status_code == 200


async def test_put_replaces_and_patch_merges(client: httpx.AsyncClient, org: Org) -> None:
    await _post(client, org, svc(properties={"language": "go", "coverage": 1}))
    put = await client.put(
        "/v1/blueprints/service/entities/api",
        json={"properties": {"language": "python"}},
        headers=org.headers,
    )
    assert (
        put.json()["entity"]["properties"] == {"language": "python"}
        and put.json()["entity"]["title"] is None
    )
    patched = await client.patch(
        "/v1/blueprints/service/entities/api", json={"title": "Api"}, headers=org.headers
    )
    assert patched.json()["entity"]["title"] == "Api" and patched.json()["entity"][
        "properties"
    ] == {"language": "python"}
    missing = await client.patch(
        "/v1/blueprints/service/entities/none", json={}, headers=org.headers
    )
    assert missing.status_code == 404


async def test_bulk_answers_200_or_207_with_per_item_results(
    client: httpx.AsyncClient, org: Org
) -> None:
    ok = await client.post(
        "/v1/blueprints/service/entities/bulk",
        json={"entities": [svc("a"), svc("b")]},
        headers=org.headers,
    )
    assert ok.status_code == 200
    assert ok.json()["entities"] == [
        {"index": 0, "identifier": "a", "created": True},
        {"index": 1, "identifier": "b", "created": True},
    ]
    mixed = await client.post(
        "/v1/blueprints/service/entities/bulk",
        json={"entities": [svc("c"), {"identifier": "d", "properties": {}}, svc("a")]},
        headers=org.headers,
    )
    body = mixed.json()
    assert mixed.status_code == 207
    assert [e["identifier"] for e in body["entities"]] == ["c"]
    assert [(e["index"], e["identifier"], e["statusCode"]) for e in body["errors"]] == [
        (1, "d", 422),
        (2, "a", 409),
    ]


async def test_bulk_accepts_a_thousand_and_refuses_more(
    client: httpx.AsyncClient, org: Org
) -> None:
    many = [{"identifier": f"t{i:04d}", "properties": {"size": i}} for i in range(1000)]
    ok = await client.post(
        "/v1/blueprints/team/entities/bulk", json={"entities": many}, headers=org.headers
    )
    assert ok.status_code == 200 and len(ok.json()["entities"]) == 1000
    too_many = await client.post(
        "/v1/blueprints/team/entities/bulk",
        json={"entities": [*many, {"identifier": "x"}]},
        headers=org.headers,
    )
    assert too_many.status_code == 422
    count = await client.get("/v1/blueprints/team/entities-count", headers=org.headers)
    assert count.json() == {"ok": True, "count": 1000}


async def test_bulk_delete_answers_deleted_entities(client: httpx.AsyncClient, org: Org) -> None:
    await client.post(
        "/v1/blueprints/service/entities/bulk",
        json={"entities": [svc("a"), svc("b")]},
        headers=org.headers,
    )
    response = await client.post(
        "/v1/blueprints/service/bulk/entities/delete",
        json={"entities": ["a", "b", "zzz"]},
        headers=org.headers,
    )
    assert response.json() == {"ok": True, "deletedEntities": ["a", "b"]}


async def test_list_streams_every_entity_with_include_and_exclude(
    client: httpx.AsyncClient, org: Org
) -> None:
    many = [{"identifier": f"t{i:04d}", "properties": {"size": i}} for i in range(1000)]
    await client.post(
        "/v1/blueprints/team/entities/bulk", json={"entities": many}, headers=org.headers
    )
    await client.post(
        "/v1/blueprints/team/entities/bulk",
        json={"entities": [{"identifier": "zz"}]},
        headers=org.headers,
    )
    listed = (await client.get("/v1/blueprints/team/entities", headers=org.headers)).json()[
        "entities"
    ]
    assert len(listed) == 1001 and listed[-1]["identifier"] == "zz"
    one = (await client.get("/v1/blueprints/team/entities/zz", headers=org.headers)).json()
    assert listed[-1] == one["entity"]  # same shape and date format as the single GET
    assert one["entity"]["createdAt"].endswith("Z")
    picked = await client.get(
        "/v1/blueprints/team/entities",
        headers=org.headers,
        params=[("include", "identifier"), ("include", "properties.size")],
    )
    assert picked.json()["entities"][1] == {"identifier": "t0001", "properties": {"size": 1}}
    trimmed = await client.get(
        "/v1/blueprints/team/entities", headers=org.headers, params={"exclude": "properties"}
    )
    assert "properties" not in trimmed.json()["entities"][0]


async def test_all_entities_delete_reports_a_complete_migration(
    client: httpx.AsyncClient, org: Org
) -> None:
    await client.post(
        "/v1/blueprints/team/entities/bulk",
        json={"entities": [{"identifier": "a"}, {"identifier": "b"}]},
        headers=org.headers,
    )
    blocked = await client.delete("/v1/blueprints/team", headers=org.headers)
    assert blocked.status_code == 409 and "entities" in blocked.json()["message"]
    started = await client.delete(
        "/v1/blueprints/deployment/all-entities",
        headers=org.headers,
        params={"delete_blueprint": "true"},
    )
    migration = (
        await client.get(f"/v1/migrations/{started.json()['migrationId']}", headers=org.headers)
    ).json()["migration"]
    assert migration["status"] == "COMPLETED" and migration["sourceBlueprint"] == "deployment"
    assert (await client.get("/v1/blueprints/deployment", headers=org.headers)).status_code == 404
    started = await client.delete("/v1/blueprints/team/all-entities", headers=org.headers)
    assert started.status_code == 200
    assert (await client.get("/v1/blueprints/team/entities-count", headers=org.headers)).json()[
        "count"
    ] == 0


async def test_unknown_blueprint_is_404(client: httpx.AsyncClient, org: Org) -> None:
    assert (await _post(client, org, svc(), bp="nope")).status_code == 404
    assert (
        await client.get("/v1/blueprints/nope/entities", headers=org.headers)
    ).status_code == 404


async def test_same_identifiers_in_two_orgs_never_collide_or_leak(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org_a, org_b = await make_org(), await make_org()
    await _setup(client, org_a)
    await _setup(client, org_b)
    await _post(client, org_a, svc(properties={"language": "go"}))
    await _post(client, org_b, svc(properties={"language": "python"}))
    got_a = (await client.get("/v1/blueprints/service/entities/api", headers=org_a.headers)).json()[
        "entity"
    ]
    assert got_a["properties"] == {"language": "go"}
    await client.delete("/v1/blueprints/service/entities/api", headers=org_a.headers)
    got_b = await client.get("/v1/blueprints/service/entities/api", headers=org_b.headers)
    assert got_b.status_code == 200
    listed_a = (await client.get("/v1/blueprints/service/entities", headers=org_a.headers)).json()[
        "entities"
    ]
    assert listed_a == []


async def test_an_org_cannot_write_into_another_orgs_blueprint(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org_a, org_b = await make_org(), await make_org()
    await _setup(client, org_a)
    response = await _post(client, org_b, svc())
    assert response.status_code == 404


async def test_twenty_concurrent_upserts_end_in_one_consistent_row(
    client: httpx.AsyncClient, org: Org, db: Database
) -> None:
    async def upsert(i: int) -> int:
        r = await _post(client, org, svc(properties={"language": "go", "coverage": i}), upsert=True)
        return r.status_code

    statuses = await asyncio.gather(*(upsert(i) for i in range(20)))
    assert set(statuses) <= {200, 201} and statuses.count(201) == 1
    async with db.tenant(org.org_id) as tx:
        rows = await tx.fetch("SELECT properties FROM entities WHERE identifier = 'api'")
        events = await tx.fetchval("SELECT count(*) FROM entity_events WHERE identifier = 'api'")
    assert len(rows) == 1 and 0 <= rows[0]["properties"]["coverage"] < 20
    assert events == 20


async def test_concurrent_overlapping_bulk_writes_do_not_deadlock(
    client: httpx.AsyncClient, org: Org
) -> None:
    async def bulk(offset: int) -> int:
        items = [
            {"identifier": f"n{(offset + i) % 300:03d}", "properties": {"size": offset}}
            for i in range(200)
        ]
        items.reverse()
        r = await client.post(
            "/v1/blueprints/team/entities/bulk",
            json={"entities": items},
            headers=org.headers,
            params={"upsert": "true"},
        )
        return r.status_code

    statuses = await asyncio.wait_for(
        asyncio.gather(*(bulk(o) for o in (0, 50, 100, 150, 200, 250))), 60
    )
    assert statuses == [200] * 6


async def test_renaming_a_property_carries_the_values(client: httpx.AsyncClient, org: Org) -> None:
    await _post(client, org, svc(properties={"language": "go", "coverage": 40}))
    response = await client.patch(
        "/v1/blueprints/service/properties/coverage/rename",
        json={"newPropertyName": "testCoverage"},
        headers=org.headers,
    )
    assert response.status_code == 200
    assert "testCoverage" in response.json()["blueprint"]["schema"]["properties"]
    got = (await client.get("/v1/blueprints/service/entities/api", headers=org.headers)).json()[
        "entity"
    ]
    assert got["properties"] == {"language": "go", "testCoverage": 40}


async def test_renaming_a_required_property_keeps_it_required(
    client: httpx.AsyncClient, org: Org
) -> None:
    response = await client.patch(
        "/v1/blueprints/service/properties/language/rename",
        json={"newPropertyName": "lang"},
        headers=org.headers,
    )
    assert response.json()["blueprint"]["schema"]["required"] == ["lang"]


async def test_renaming_a_relation_carries_the_links(client: httpx.AsyncClient, org: Org) -> None:
    await _post(client, org, {"identifier": "platform"}, bp="team")
    await _post(client, org, svc(relations={"team": "platform"}))
    response = await client.patch(
        "/v1/blueprints/service/relations/team/rename",
        json={"newRelationIdentifier": "owningTeam"},
        headers=org.headers,
    )
    assert response.status_code == 200
    got = (await client.get("/v1/blueprints/service/entities/api", headers=org.headers)).json()[
        "entity"
    ]
    assert got["relations"]["owningTeam"] == "platform" and "team" not in got["relations"]


async def test_rename_to_a_taken_name_is_409(client: httpx.AsyncClient, org: Org) -> None:
    response = await client.patch(
        "/v1/blueprints/service/properties/coverage/rename",
        json={"newPropertyName": "language"},
        headers=org.headers,
    )
    assert response.status_code == 409


async def test_removing_a_property_removes_its_values(client: httpx.AsyncClient, org: Org) -> None:
    await _post(client, org, svc(properties={"language": "go", "coverage": 40}))
    bp = (await client.get("/v1/blueprints/service", headers=org.headers)).json()["blueprint"]
    del bp["schema"]["properties"]["coverage"]
    assert (
        await client.put("/v1/blueprints/service", json=bp, headers=org.headers)
    ).status_code == 200
    got = (await client.get("/v1/blueprints/service/entities/api", headers=org.headers)).json()[
        "entity"
    ]
    assert got["properties"] == {"language": "go"}
    # and the entity can still be written afterwards
    again = await client.patch(
        "/v1/blueprints/service/entities/api", json={"title": "x"}, headers=org.headers
    )
    assert again.status_code == 200


async def test_changing_a_blueprint_keeps_its_entities_links(
    client: httpx.AsyncClient, org: Org
) -> None:
    await client.post(
        "/v1/blueprints/team/entities", json={"identifier": "core"}, headers=org.headers
    )
    await _post(client, org, svc("db"))
    linked = svc("api", relations={"team": "core", "dependsOn": ["db"]})
    assert (await _post(client, org, linked)).status_code == 201
    patched = await client.patch(
        "/v1/blueprints/service", json={"description": "changed"}, headers=org.headers
    )
    assert patched.status_code == 200, patched.text
    bp = (await client.get("/v1/blueprints/service", headers=org.headers)).json()["blueprint"]
    bp["relations"]["team"]["title"] = "Owning team"
    assert (
        await client.put("/v1/blueprints/service", json=bp, headers=org.headers)
    ).status_code == 200
    got = (await client.get("/v1/blueprints/service/entities/api", headers=org.headers)).json()
    assert got["entity"]["relations"] == {"team": "core", "dependsOn": ["db"]}


async def test_a_recreated_blueprint_validates_by_its_new_schema(
    client: httpx.AsyncClient, org: Org
) -> None:
    """A blueprint deleted and created again under the same identifier starts a new
    history: nothing remembered of the old one (its schema, its relations) applies."""
    body: dict[str, Any] = {
        "identifier": "probe",
        "title": "Probe",
        "schema": {"properties": {"size": {"type": "number"}}},
    }
    assert (await client.post("/v1/blueprints", json=body, headers=org.headers)).status_code == 201
    ok = await _post(client, org, {"identifier": "p1", "properties": {"size": 3}}, bp="probe")
    assert ok.status_code == 201, ok.text
    gone = await client.delete(
        "/v1/blueprints/probe/all-entities",
        headers=org.headers,
        params={"delete_blueprint": "true"},
    )
    assert gone.status_code == 200, gone.text
    body["schema"] = {"properties": {"size": {"type": "string"}}}
    assert (await client.post("/v1/blueprints", json=body, headers=org.headers)).status_code == 201
    as_number = await _post(
        client, org, {"identifier": "p1", "properties": {"size": 3}}, bp="probe"
    )
    assert as_number.status_code == 422, as_number.text
    as_text = await _post(
        client, org, {"identifier": "p1", "properties": {"size": "L"}}, bp="probe"
    )
    assert as_text.status_code == 201, as_text.text


async def test_a_schema_changed_elsewhere_is_used_at_once(
    client: httpx.AsyncClient, org: Org, db: Database
) -> None:
    """Another server process may change a blueprint: the next write here must validate
    against the committed schema, not a remembered one."""
    assert (await _post(client, org, svc("a", properties={"language": "go"}))).status_code == 201
    async with db.tenant(org.org_id) as tx:
        await tx.execute(
            "UPDATE blueprints SET schema = jsonb_set(schema, '{properties,language,enum}', "
            '\'["go", "rust"]\'), version = version + 1 '
            "WHERE org_id = $1 AND identifier = 'service'",
            org.org_id,
        )
    rust = await _post(client, org, svc("b", properties={"language": "rust"}))
    assert rust.status_code == 201, rust.text
    python = await _post(client, org, svc("c", properties={"language": "python"}))
    assert python.status_code == 422, python.text


async def test_a_new_required_property_needs_existing_entities_to_have_it(
    client: httpx.AsyncClient, org: Org
) -> None:
    await _post(client, org, svc())
    bp = (await client.get("/v1/blueprints/service", headers=org.headers)).json()["blueprint"]
    bp["schema"]["required"].append("coverage")
    response = await client.put("/v1/blueprints/service", json=bp, headers=org.headers)
    assert response.status_code == 422 and "coverage" in response.json()["message"]


async def test_changing_a_linked_relations_target_is_422(
    client: httpx.AsyncClient, org: Org
) -> None:
    await _post(client, org, {"identifier": "platform"}, bp="team")
    await _post(client, org, svc(relations={"team": "platform"}))
    response = await client.patch(
        "/v1/blueprints/service",
        json={
            "relations": {
                "team": {"target": "service", "required": False, "many": False},
                "dependsOn": {"target": "service", "required": False, "many": True},
            }
        },
        headers=org.headers,
    )
    assert (
        response.status_code == 422
        and response.json()["details"][0]["pointer"] == "/relations/team/target"
    )


async def test_removing_a_relation_removes_its_links(
    client: httpx.AsyncClient, org: Org, db: Database
) -> None:
    await _post(client, org, {"identifier": "platform"}, bp="team")
    await _post(client, org, svc(relations={"team": "platform"}))
    response = await client.patch(
        "/v1/blueprints/service",
        json={"relations": {"dependsOn": {"target": "service", "many": True}}},
        headers=org.headers,
    )
    assert response.status_code == 200
    async with db.tenant(org.org_id) as tx:
        assert (
            await tx.fetchval("SELECT count(*) FROM entity_relations WHERE relation = 'team'") == 0
        )


async def test_concurrent_creates_of_one_new_linked_entity_all_succeed(
    client: httpx.AsyncClient, org: Org, db: Database
) -> None:
    await _post(client, org, {"identifier": "platform"}, bp="team")

    async def upsert(i: int) -> int:
        body = svc(
            "race", properties={"language": "go", "coverage": i}, relations={"team": "platform"}
        )
        return (await _post(client, org, body, upsert=True)).status_code

    statuses = await asyncio.gather(*(upsert(i) for i in range(12)))
    assert sorted(set(statuses)) in ([200, 201], [201]) and statuses.count(201) == 1
    actions = [e["action"] for e in await _events(db, org, "race")]
    assert actions[0] == "CREATE" and set(actions[1:]) <= {"UPDATE"}
    got = (await client.get("/v1/blueprints/service/entities/race", headers=org.headers)).json()[
        "entity"
    ]
    assert got["relations"]["team"] == "platform"


async def test_concurrent_creates_of_missing_related_entities_all_succeed(
    client: httpx.AsyncClient, org: Org
) -> None:
    async def upsert(i: int) -> int:
        body = svc(f"s{i}", relations={"team": "shared-team"})
        return (
            await _post(client, org, body, upsert=True, create_missing_related_entities=True)
        ).status_code

    statuses = await asyncio.gather(*(upsert(i) for i in range(12)))
    assert statuses == [201] * 12


async def test_links_follow_each_write(client: httpx.AsyncClient, org: Org, db: Database) -> None:
    for name in ("a", "b", "c"):
        await _post(client, org, svc(name))
    await _post(client, org, svc(relations={"dependsOn": ["a", "b"]}))
    replaced = await _post(client, org, svc(relations={"dependsOn": ["b", "c"]}), upsert=True)
    assert replaced.json()["entity"]["relations"]["dependsOn"] == ["b", "c"]
    cleared = await _post(
        client,
        org,
        {"identifier": "api", "relations": {"dependsOn": None}},
        upsert=True,
        merge=True,
    )
    assert cleared.json()["entity"]["relations"]["dependsOn"] == []
    async with db.tenant(org.org_id) as tx:
        links = await tx.fetchval(
            "SELECT count(*) FROM entity_relations WHERE source_identifier = 'api'"
        )
    assert links == 0


async def test_another_org_reaches_none_of_the_catalog_routes(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org_a, org_b = await make_org(), await make_org()
    await _setup(client, org_a)
    await _post(client, org_a, svc())
    started = await client.delete("/v1/blueprints/deployment/all-entities", headers=org_a.headers)
    migration_id = started.json()["migrationId"]
    b = org_b.headers
    attempts = [
        ("PATCH", "/v1/blueprints/service/properties/coverage/rename", {"newPropertyName": "x"}),
        ("PATCH", "/v1/blueprints/service/relations/team/rename", {"newRelationIdentifier": "x"}),
        ("POST", "/v1/blueprints/service/entities/bulk", {"entities": [svc()]}),
        ("POST", "/v1/blueprints/service/bulk/entities/delete", {"entities": ["api"]}),
        ("PUT", "/v1/blueprints/service/entities/api", {"properties": {"language": "go"}}),
        ("GET", "/v1/blueprints/service/entities-count", None),
        ("DELETE", "/v1/blueprints/service/all-entities", None),
        ("GET", f"/v1/migrations/{migration_id}", None),
    ]
    for method, path, body in attempts:
        response = await client.request(method, path, headers=b, **({"json": body} if body else {}))
        assert response.status_code == 404 and response.json()["ok"] is False, (method, path)
    got = (await client.get("/v1/blueprints/service/entities/api", headers=org_a.headers)).json()[
        "entity"
    ]
    assert got["properties"] == {"language": "python"}
    bp = (await client.get("/v1/blueprints/service", headers=org_a.headers)).json()["blueprint"]
    assert "coverage" in bp["schema"]["properties"] and "team" in bp["relations"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
async def test_non_json_numbers_are_a_400(
    client: httpx.AsyncClient, org: Org, literal: str
) -> None:
    body = '{"identifier": "n", "properties": {"language": "go", "coverage": LIT}}'
    body = body.replace("LIT", literal)
    response = await client.post(
        "/v1/blueprints/service/entities",
        content=body,
        headers={**org.headers, "content-type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert response.json()["ok"] is False


async def test_one_entity_with_include_and_exclude(client: httpx.AsyncClient, org: Org) -> None:
    assert (await _post(client, org, svc("api"))).status_code == 201
    url = "/v1/blueprints/service/entities/api"
    picked = await client.get(
        url,
        params=[("include", "identifier"), ("include", "properties.language")],
        headers=org.headers,
    )
    assert picked.json() == {
        "ok": True,
        "entity": {"identifier": "api", "properties": {"language": "python"}},
    }
    trimmed = (await client.get(url, params={"exclude": "properties"}, headers=org.headers)).json()
    assert "properties" not in trimmed["entity"] and trimmed["entity"]["title"] == "API"
    then = (await client.get(url, headers=org.headers)).json()["entity"]["updatedAt"]
    past = await client.get(url, params={"at": then, "include": "title"}, headers=org.headers)
    assert past.status_code == 200, past.text
    assert past.json()["entity"] == {"title": "API"}
