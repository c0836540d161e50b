"""Search queries in entity writes (Port's shapes): relation targets, identifiers and teams
given as `{"combinator", "rules"}`, found in the write's transaction with what the writer
may read; counts a field cannot take are the entity's error; tenancy; webhook mappings."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from app.auth import permissions
from app.auth.service import create_credential
from app.catalog import entity_queries
from app.config import Settings
from app.db.database import Database
from tests.conftest import Org, OrgFactory

SQUAD = {
    "identifier": "squad",
    "title": "Squad",
    "schema": {"properties": {"slug": {"type": "string"}, "area": {"type": "string"}}},
}
SERVICE = {
    "identifier": "service",
    "title": "Service",
    "schema": {"properties": {"language": {"type": "string"}, "repo": {"type": "string"}}},
    "relations": {
        "squad": {"target": "squad", "required": False, "many": False},
        "squads": {"target": "squad", "required": False, "many": True},
    },
}
SQUADS = [
    ("payments", "pay", "money"),
    ("billing", "bill", "money"),
    ("search", "find", "discovery"),
]


def q(*rules: dict[str, Any], combinator: str = "and") -> dict[str, Any]:
    return {"combinator": combinator, "rules": list(rules)}


def eq(prop: str, value: Any) -> dict[str, Any]:
    return {"property": prop, "operator": "=", "value": value}


async def _catalog(client: httpx.AsyncClient, org: Org) -> None:
    for body in (SQUAD, SERVICE):
        r = await client.post("/v1/blueprints", json=body, headers=org.headers)
        assert r.status_code == 201, r.text
    for identifier, slug, area in SQUADS:
        r = await client.post(
            "/v1/blueprints/squad/entities",
            json={"identifier": identifier, "properties": {"slug": slug, "area": area}},
            headers=org.headers,
        )
        assert r.status_code == 201, r.text


@pytest.fixture
async def org(client: httpx.AsyncClient, make_org: OrgFactory) -> Org:
    created = await make_org()
    await _catalog(client, created)
    return created


async def _post(
    client: httpx.AsyncClient,
    org: Org,
    body: Any,
    headers: dict[str, str] | None = None,
    **params: Any,
) -> httpx.Response:
    return await client.post(
        "/v1/blueprints/service/entities",
        json=body,
        params={k: str(v).lower() for k, v in params.items()},
        headers=headers or org.headers,
    )


async def _get(client: httpx.AsyncClient, org: Org, identifier: str) -> dict[str, Any]:
    r = await client.get(f"/v1/blueprints/service/entities/{identifier}", headers=org.headers)
    assert r.status_code == 200, r.text
    entity: dict[str, Any] = r.json()["entity"]
    return entity


async def test_a_many_relation_by_query_links_every_entity_it_finds(
    client: httpx.AsyncClient, org: Org
) -> None:
    body = {"identifier": "api", "relations": {"squads": q(eq("area", "money"))}}
    r = await _post(client, org, body)
    assert r.status_code == 201, r.text
    assert r.json()["entity"]["relations"]["squads"] == ["billing", "payments"]
    assert (await _get(client, org, "api"))["relations"]["squads"] == ["billing", "payments"]


async def test_a_many_relation_query_that_finds_nothing_links_nothing(
    client: httpx.AsyncClient, org: Org
) -> None:
    r = await _post(client, org, {"identifier": "api", "relations": {"squads": ["search"]}})
    assert r.status_code == 201, r.text
    body = {"identifier": "api", "relations": {"squads": q(eq("area", "nowhere"))}}
    r = await _post(client, org, body, upsert=True, merge=True)
    assert r.status_code == 200, r.text
    assert r.json()["entity"]["relations"]["squads"] == []


async def test_a_single_relation_by_query_links_the_one_it_finds(
    client: httpx.AsyncClient, org: Org
) -> None:
    rules = q(eq("slug", "find"), {"property": "area", "operator": "in", "value": ["discovery"]})
    r = await _post(client, org, {"identifier": "api", "relations": {"squad": rules}})
    assert r.status_code == 201, r.text
    assert r.json()["entity"]["relations"]["squad"] == "search"


async def test_a_single_relation_query_finding_several_names_the_count(
    client: httpx.AsyncClient, org: Org
) -> None:
    body = {"identifier": "api", "relations": {"squad": q(eq("area", "money"))}}
    r = await _post(client, org, body)
    assert r.status_code == 422, r.text
    answer = r.json()
    assert answer["ok"] is False and answer["error"] == "query_match_count"
    assert "found 2 entities of blueprint 'squad'" in answer["message"]
    assert answer["details"] == [{"pointer": "/relations/squad", "message": "found 2, not one"}]
    r = await client.get("/v1/blueprints/service/entities/api", headers=org.headers)
    assert r.status_code == 404  # nothing written


async def test_a_single_relation_query_finding_nothing_names_the_count(
    client: httpx.AsyncClient, org: Org
) -> None:
    body = {"identifier": "api", "relations": {"squad": q(eq("slug", "nope"))}}
    r = await _post(client, org, body)
    assert r.status_code == 422, r.text
    assert "found 0 entities" in r.json()["message"]


async def test_a_many_relation_query_finding_more_than_the_cap_is_refused(
    client: httpx.AsyncClient, org: Org, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(entity_queries, "MAX_FOUND", 2)
    body = {"identifier": "api", "relations": {"squads": q(combinator="or")}}
    body["relations"]["squads"]["rules"] = [eq("area", "money"), eq("area", "discovery")]
    r = await _post(client, org, body)
    assert r.status_code == 422, r.text
    assert "found more than 2 entities" in r.json()["message"]


async def test_an_identifier_query_updates_the_entity_it_finds(
    client: httpx.AsyncClient, org: Org
) -> None:
    r = await _post(client, org, {"identifier": "api", "properties": {"repo": "acme/api"}})
    assert r.status_code == 201, r.text
    r = await _post(client, org, {"identifier": "web", "properties": {"repo": "acme/web"}})
    assert r.status_code == 201, r.text
    body = {"identifier": q(eq("repo", "acme/web")), "properties": {"language": "go"}}
    r = await _post(client, org, body, upsert=True, merge=True)
    assert r.status_code == 200, r.text
    assert r.json()["entity"]["identifier"] == "web"
    web = await _get(client, org, "web")
    assert web["properties"] == {"repo": "acme/web", "language": "go"}
    assert (await _get(client, org, "api"))["properties"] == {"repo": "acme/api"}
    r = await client.get("/v1/blueprints/service/entities-count", headers=org.headers)
    assert r.json()["count"] == 2


async def test_an_identifier_query_finding_none_or_several_names_the_count(
    client: httpx.AsyncClient, org: Org
) -> None:
    for name in ("api", "web"):
        r = await _post(client, org, {"identifier": name, "properties": {"language": "go"}})
        assert r.status_code == 201, r.text
    r = await _post(client, org, {"identifier": q(eq("language", "go"))}, upsert=True)
    assert r.status_code == 422, r.text
    assert r.json()["message"].startswith("The search query of identifier found 2 entities")
    r = await _post(client, org, {"identifier": q(eq("language", "rust"))}, upsert=True)
    assert r.status_code == 422, r.text
    assert "found 0 entities" in r.json()["message"]


async def test_bulk_reports_each_query_problem_on_its_entity(
    client: httpx.AsyncClient, org: Org
) -> None:
    entities = [
        {"identifier": "a", "relations": {"squad": q(eq("slug", "pay"))}},
        {"identifier": "b", "relations": {"squad": q(eq("area", "money"))}},
        {"identifier": "c", "relations": {"squads": q(eq("area", "money"))}},
        {"identifier": "d", "relations": {"squad": q(eq("nosuch", "x"))}},
        {"identifier": "e", "relations": {"squad": q(eq("slug", "pay"))}},  # same query as a
    ]
    r = await client.post(
        "/v1/blueprints/service/entities/bulk",
        json={"entities": entities},
        headers=org.headers,
    )
    assert r.status_code == 207, r.text
    answer = r.json()
    assert [e["identifier"] for e in answer["entities"]] == ["a", "c", "e"]
    errors = {e["identifier"]: e for e in answer["errors"]}
    assert set(errors) == {"b", "d"}
    assert errors["b"]["statusCode"] == 422 and "found 2" in errors["b"]["message"]
    assert errors["d"]["statusCode"] == 422
    assert "/relations/squad/rules/0" in errors["d"]["message"]
    assert (await _get(client, org, "a"))["relations"]["squad"] == "payments"
    assert (await _get(client, org, "c"))["relations"]["squads"] == ["billing", "payments"]


async def test_a_query_with_an_invalid_rule_is_a_422_with_its_pointer(
    client: httpx.AsyncClient, org: Org
) -> None:
    bad = q(eq("slug", "pay"), {"property": "slug", "operator": "bogus", "value": "x"})
    r = await _post(client, org, {"identifier": "api", "relations": {"squad": bad}})
    assert r.status_code == 422, r.text
    answer = r.json()
    assert answer["ok"] is False
    pointers = [d["pointer"] for d in answer["details"]]
    assert pointers == ["/relations/squad/rules/1/operator"]


async def test_put_and_patch_take_relation_queries(client: httpx.AsyncClient, org: Org) -> None:
    r = await _post(client, org, {"identifier": "api", "properties": {"language": "go"}})
    assert r.status_code == 201, r.text
    r = await client.patch(
        "/v1/blueprints/service/entities/api",
        json={"relations": {"squad": q(eq("slug", "bill"))}},
        headers=org.headers,
    )
    assert r.status_code == 200, r.text
    assert r.json()["entity"]["relations"]["squad"] == "billing"
    assert r.json()["entity"]["properties"] == {"language": "go"}
    r = await client.put(
        "/v1/blueprints/service/entities/api",
        json={"relations": {"squads": q(eq("area", "discovery"))}},
        headers=org.headers,
    )
    assert r.status_code == 200, r.text
    assert r.json()["entity"]["relations"] == {"squad": None, "squads": ["search"]}


async def test_a_team_given_as_a_query_takes_the_teams_it_finds(
    client: httpx.AsyncClient, org: Org
) -> None:
    for name in ("platform-core", "platform-edge", "data"):
        r = await client.post("/v1/teams", json={"name": name}, headers=org.headers)
        assert r.status_code in (200, 201), r.text
    team = q({"property": "$identifier", "operator": "beginsWith", "value": "platform-"})
    r = await _post(client, org, {"identifier": "api", "team": team})
    assert r.status_code == 201, r.text
    assert r.json()["entity"]["team"] == ["platform-core", "platform-edge"]
    bad = q({"property": "$identifier", "operator": "between", "value": "x"})
    r = await _post(client, org, {"identifier": "web", "team": bad})
    assert r.status_code == 422, r.text
    assert r.json()["details"][0]["pointer"] == "/team/rules/0/operator"


async def test_another_orgs_query_never_finds_this_orgs_entities(
    client: httpx.AsyncClient, org: Org, make_org: OrgFactory
) -> None:
    other = await make_org()
    for body in (SQUAD, SERVICE):
        r = await client.post("/v1/blueprints", json=body, headers=other.headers)
        assert r.status_code == 201, r.text
    # Org B has the blueprints but none of A's squads: its queries find nothing of A's.
    r = await _post(
        client, other, {"identifier": "api", "relations": {"squad": q(eq("slug", "pay"))}}
    )
    assert r.status_code == 422, r.text
    assert "found 0 entities" in r.json()["message"]
    r = await _post(
        client, other, {"identifier": "api", "relations": {"squads": q(eq("area", "money"))}}
    )
    assert r.status_code == 201, r.text
    assert r.json()["entity"]["relations"]["squads"] == []
    r = await _post(client, other, {"identifier": q(eq("slug", "pay"))}, upsert=True)
    assert r.status_code == 422, r.text


async def _app_headers(
    client: httpx.AsyncClient, db: Database, org: Org, roles: list[str]
) -> dict[str, str]:
    async with db.tenant(org.org_id) as tx:
        cred = await create_credential(tx, org_id=org.org_id, name="writer", roles=roles)
    r = await client.post(
        "/v1/auth/access_token",
        json={"clientId": cred.client_id, "clientSecret": cred.client_secret},
    )
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['accessToken']}"}


async def test_a_writer_links_through_a_query_with_what_it_may_write(
    client: httpx.AsyncClient, org: Org, db: Database
) -> None:
    moderator = await _app_headers(client, db, org, ["Member", "service-moderator"])
    body = {"identifier": "api", "relations": {"squads": q(eq("area", "money"))}}
    r = await _post(client, org, body, headers=moderator)
    assert r.status_code == 201, r.text
    assert r.json()["entity"]["relations"]["squads"] == ["billing", "payments"]
    member = await _app_headers(client, db, org, ["Member"])
    r = await _post(client, org, {**body, "identifier": "web"}, headers=member)
    assert r.status_code == 403, r.text  # a Member may not register services (the default)


async def test_a_writer_who_may_not_read_the_target_cannot_link_through_a_query(
    client: httpx.AsyncClient, org: Org, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every member reads the catalog today (docs/permissions.md); were reading restricted,
    # a query must not find, nor link, what its writer could not read.
    moderator = await _app_headers(client, db, org, ["Member", "service-moderator"])
    monkeypatch.setitem(permissions.OPERATIONS, "entities.read", "admin")
    body = {"identifier": "api", "relations": {"squads": q(eq("area", "money"))}}
    r = await _post(client, org, body, headers=moderator)
    assert r.status_code == 403, r.text
    answer = r.json()
    assert answer["error"] == "missing_permission"
    assert "entities.read" in answer["message"] and "'squad'" in answer["message"]
    assert "found" not in answer["message"]
    r = await client.get("/v1/blueprints/service/entities/api", headers=org.headers)
    assert r.status_code == 404
    # The same write by plain identifiers does not search, and is the moderator's to make.
    r = await _post(
        client, org, {"identifier": "api", "relations": {"squads": ["payments"]}}, headers=moderator
    )
    assert r.status_code == 201, r.text


async def test_a_webhook_mapping_links_through_a_relation_query(
    client: httpx.AsyncClient,
    org: Org,
    start_worker: Callable[..., Settings],
) -> None:
    webhook = {
        "identifier": "deploys",
        "title": "Deploys",
        "mappings": [
            {
                "blueprint": "service",
                "entity": {
                    "identifier": ".body.service",
                    "properties": {"repo": ".body.repo"},
                    "relations": {
                        "squad": '{combinator: "and", rules: [{property: "slug", '
                        'operator: "=", value: .body.squad}]}',
                        "squads": '{combinator: "and", rules: [{property: "area", '
                        'operator: "=", value: .body.area}]}',
                    },
                },
            }
        ],
    }
    r = await client.post("/v1/webhooks", json=webhook, headers=org.headers)
    assert r.status_code == 201, r.text
    path = f"/v1/webhooks/ingest/{r.json()['integration']['webhookKey']}"
    start_worker()
    payloads = [
        {"service": "api", "repo": "acme/api", "squad": "pay", "area": "money"},
        {"service": "web", "repo": "acme/web", "squad": "none", "area": "money"},
    ]
    for payload in payloads:
        r = await client.post(path, json=payload)
        assert r.status_code == 202, r.text
    deadline = time.monotonic() + 20
    events: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        r = await client.get("/v1/webhooks/deploys/events", headers=org.headers)
        events = r.json()["events"]
        if len(events) == 2 and all(e["status"] != "pending" for e in events):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError(f"the events did not get there: {events}")
    api = await _get(client, org, "api")
    assert api["relations"] == {"squad": "payments", "squads": ["billing", "payments"]}
    failed = [e for e in events if e["outcome"]["errors"]]
    assert len(failed) == 1
    assert "found 0 entities" in failed[0]["outcome"]["errors"][0]["message"]
    r = await client.get("/v1/blueprints/service/entities/web", headers=org.headers)
    assert r.status_code == 404


async def test_a_webhook_mapping_takes_ports_query_objects_of_jq_fields(
    client: httpx.AsyncClient,
    org: Org,
    start_worker: Callable[..., Settings],
) -> None:
    r = await client.post("/v1/teams", json={"name": "payments-team"}, headers=org.headers)
    assert r.status_code in (200, 201), r.text
    squad_query = {
        "combinator": '"and"',
        "rules": [
            {"property": '"slug"', "operator": '"="', "value": ".body.squad # a comment"},
            {
                "combinator": '"or"',
                "rules": [{"property": '"area"', "operator": '"in"', "value": "[.body.area]"}],
            },
        ],
    }
    team_query = {
        "combinator": '"and"',
        "rules": [{"property": '"$identifier"', "operator": '"="', "value": ".body.team"}],
    }
    webhook = {
        "identifier": "literal",
        "title": "Literal queries",
        "mappings": [
            {
                "blueprint": "service",
                "entity": {
                    "identifier": ".body.service",
                    "team": team_query,
                    "relations": {"squad": squad_query},
                },
            }
        ],
    }
    bad = {**webhook, "identifier": "bad"}
    bad["mappings"] = [
        {
            "blueprint": "service",
            "entity": {
                "identifier": ".body.service",
                "relations": {"squad": {"rules": [{"property": '"slug"', "value": ".body.("}]}},
            },
        }
    ]
    r = await client.post("/v1/webhooks", json=bad, headers=org.headers)
    assert r.status_code == 422, r.text
    pointers = [d["pointer"] for d in r.json()["details"]]
    assert pointers == ["/mappings/0/entity/relations/squad/rules/0/value"]
    r = await client.post("/v1/webhooks", json=webhook, headers=org.headers)
    assert r.status_code == 201, r.text
    stored = r.json()["integration"]
    assert stored["mappings"][0]["entity"]["relations"]["squad"] == squad_query
    start_worker()
    payload = {"service": "api", "squad": "pay", "area": "money", "team": "payments-team"}
    r = await client.post(f"/v1/webhooks/ingest/{stored['webhookKey']}", json=payload)
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        r = await client.get("/v1/webhooks/literal/events", headers=org.headers)
        events = r.json()["events"]
        if events and events[0]["status"] != "pending":
            break
        await asyncio.sleep(0.1)
    assert events[0]["outcome"]["errors"] == [], events
    api = await _get(client, org, "api")
    assert api["relations"]["squad"] == "payments"
    assert api["team"] == ["payments-team"]
