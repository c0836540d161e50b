"""Derived properties on reads: mirror, aggregation and inherited ownership, computed in
the statement that reads the entities (GET one, GET list, search)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import Org, OrgFactory


async def _setup(client: httpx.AsyncClient, org: Org) -> None:
    blueprints: list[dict[str, Any]] = [
        {
            "identifier": "group",
            "title": "Group",
            "schema": {"properties": {"tier": {"type": "number"}}},
        },
        {
            "identifier": "team",
            "title": "Team",
            "schema": {"properties": {"slack": {"type": "string"}}},
            "relations": {"group": {"target": "group", "required": False, "many": False}},
        },
        {
            "identifier": "service",
            "title": "Service",
            "schema": {"properties": {"lang": {"type": "string"}}},
            "relations": {
                "owner": {"target": "team", "required": False, "many": False},
                "uses": {"target": "team", "required": False, "many": True},
            },
            "mirrorProperties": {
                "ownerSlack": {"path": "owner.slack"},
                "ownerTitle": {"path": "owner.$title"},
                "groupTier": {"path": "owner.group.tier"},
                "usedSlacks": {"path": "uses.slack"},
            },
            "ownership": {"type": "Inherited", "path": "owner"},
        },
        {
            "identifier": "deployment",
            "title": "Deployment",
            "schema": {
                "properties": {
                    "minutes": {"type": "number"},
                    "status": {"type": "string"},
                }
            },
            "relations": {"service": {"target": "service", "required": True, "many": False}},
        },
    ]
    for body in blueprints:
        r = await client.post("/v1/blueprints", json=body, headers=org.headers)
        assert r.status_code == 201, r.text
    aggs = {
        "deployments": {
            "title": "Deployments",
            "target": "deployment",
            "calculationSpec": {"func": "count", "calculationBy": "entities"},
        },
        "failed": {
            "title": "Failed",
            "target": "deployment",
            "calculationSpec": {"func": "count", "calculationBy": "entities"},
            "query": {
                "combinator": "and",
                "rules": [{"property": "status", "operator": "=", "value": "failed"}],
            },
        },
        "totalMinutes": {
            "title": "Minutes",
            "target": "deployment",
            "calculationSpec": {"func": "sum", "calculationBy": "property", "property": "minutes"},
        },
        "medianMinutes": {
            "title": "Median",
            "target": "deployment",
            "calculationSpec": {
                "func": "median",
                "calculationBy": "property",
                "property": "minutes",
            },
        },
    }
    r = await client.patch(
        "/v1/blueprints/service", json={"aggregationProperties": aggs}, headers=org.headers
    )
    assert r.status_code == 200, r.text

    async def bulk(bp: str, items: list[dict[str, Any]]) -> None:
        r = await client.post(
            f"/v1/blueprints/{bp}/entities/bulk", json={"entities": items}, headers=org.headers
        )
        assert r.status_code == 200, r.text

    await bulk("group", [{"identifier": "g1", "properties": {"tier": 2}}])
    await bulk(
        "team",
        [
            {
                "identifier": "core",
                "title": "Core team",
                "properties": {"slack": "#core"},
                "relations": {"group": "g1"},
            },
            {"identifier": "web", "properties": {"slack": "#web"}},
        ],
    )
    await bulk(
        "service",
        [
            {
                "identifier": "api",
                "team": "someone-else",
                "properties": {"lang": "go"},
                "relations": {"owner": "core", "uses": ["web", "core"]},
            },
            {"identifier": "lonely", "properties": {"lang": "go"}},
        ],
    )
    await bulk(
        "deployment",
        [
            {
                "identifier": f"d{i}",
                "properties": {"minutes": m, "status": s},
                "relations": {"service": "api"},
            }
            for i, (m, s) in enumerate([(3, "ok"), (10, "failed"), (5, "ok")])
        ],
    )


@pytest.fixture
async def org(client: httpx.AsyncClient, make_org: OrgFactory) -> Org:
    created = await make_org()
    await _setup(client, created)
    return created


async def test_get_one_entity_carries_its_derived_properties(
    client: httpx.AsyncClient, org: Org
) -> None:
    r = await client.get("/v1/blueprints/service/entities/api", headers=org.headers)
    assert r.status_code == 200, r.text
    entity = r.json()["entity"]
    assert entity["properties"] == {
        "lang": "go",
        "ownerSlack": "#core",
        "ownerTitle": "Core team",
        "groupTier": 2,
        "usedSlacks": ["#core", "#web"],
        "deployments": 3,
        "failed": 1,
        "totalMinutes": 18,
        "medianMinutes": 5,
    }
    assert entity["team"] == []  # inherited from the owner team, which has no team itself


async def test_missing_links_give_nulls_and_zero_counts(
    client: httpx.AsyncClient, org: Org
) -> None:
    entity = (
        await client.get("/v1/blueprints/service/entities/lonely", headers=org.headers)
    ).json()["entity"]
    assert entity["properties"] == {
        "lang": "go",
        "ownerSlack": None,
        "ownerTitle": None,
        "groupTier": None,
        "usedSlacks": None,
        "deployments": 0,
        "failed": 0,
        "totalMinutes": 0,
        "medianMinutes": None,
    }


async def test_inherited_ownership_follows_the_path(client: httpx.AsyncClient, org: Org) -> None:
    r = await client.patch(
        "/v1/blueprints/team/entities/core", json={"team": ["platform"]}, headers=org.headers
    )
    assert r.status_code == 200
    entity = (await client.get("/v1/blueprints/service/entities/api", headers=org.headers)).json()[
        "entity"
    ]
    assert entity["team"] == ["platform"]


async def test_list_and_search_carry_them_too(client: httpx.AsyncClient, org: Org) -> None:
    listed = (await client.get("/v1/blueprints/service/entities", headers=org.headers)).json()[
        "entities"
    ]
    one = (await client.get("/v1/blueprints/service/entities/api", headers=org.headers)).json()[
        "entity"
    ]
    assert listed[0] == one
    found = await client.post(
        "/v1/entities/search",
        json={
            "combinator": "and",
            "rules": [{"property": "$identifier", "operator": "in", "value": ["api", "d0"]}],
        },
        headers=org.headers,
    )
    entities = {e["identifier"]: e for e in found.json()["entities"]}
    assert entities["api"] == one
    assert entities["d0"]["properties"] == {"minutes": 3, "status": "ok"}


async def test_derived_values_follow_the_linked_data(client: httpx.AsyncClient, org: Org) -> None:
    await client.patch(
        "/v1/blueprints/team/entities/core",
        json={"properties": {"slack": "#core-2"}},
        headers=org.headers,
    )
    await client.delete("/v1/blueprints/deployment/entities/d1", headers=org.headers)
    props = (await client.get("/v1/blueprints/service/entities/api", headers=org.headers)).json()[
        "entity"
    ]["properties"]
    assert props["ownerSlack"] == "#core-2" and props["deployments"] == 2 and props["failed"] == 0


async def test_another_tenant_never_feeds_a_derived_value(
    client: httpx.AsyncClient, org: Org, make_org: OrgFactory
) -> None:
    other = await make_org()
    await _setup(client, other)
    await client.post(
        "/v1/blueprints/deployment/entities",
        json={
            "identifier": "extra",
            "properties": {"minutes": 100},
            "relations": {"service": "api"},
        },
        headers=other.headers,
    )
    await client.patch(
        "/v1/blueprints/team/entities/core",
        json={"properties": {"slack": "#theirs"}},
        headers=other.headers,
    )
    props = (await client.get("/v1/blueprints/service/entities/api", headers=org.headers)).json()[
        "entity"
    ]["properties"]
    assert props["deployments"] == 3 and props["ownerSlack"] == "#core"


async def test_aggregation_along_a_path_filter(client: httpx.AsyncClient, org: Org) -> None:
    aggs = {
        "services": {
            "title": "Services",
            "target": "service",
            "calculationSpec": {"func": "count", "calculationBy": "entities"},
            "pathFilter": [{"path": ["owner", "group"]}],
        }
    }
    r = await client.patch(
        "/v1/blueprints/group", json={"aggregationProperties": aggs}, headers=org.headers
    )
    assert r.status_code == 200, r.text
    group = (await client.get("/v1/blueprints/group/entities/g1", headers=org.headers)).json()[
        "entity"
    ]
    assert group["properties"] == {"tier": 2, "services": 1}


async def test_calculation_properties_run_jq_over_the_entity(
    client: httpx.AsyncClient, org: Org
) -> None:
    calcs = {
        "label": {
            "title": "Label",
            "type": "string",
            "calculation": '.identifier + " (" + .properties.lang + ")"',
        },
        "busy": {"title": "Busy", "type": "boolean", "calculation": ".properties.deployments > 2"},
        "owner": {"title": "Owner", "type": "string", "calculation": ".relations.owner"},
        "broken": {
            "title": "Broken",
            "type": "number",
            "calculation": '.properties.lang | error("no number here")',
        },
        "wrongType": {"title": "Wrong", "type": "number", "calculation": ".properties.lang"},
        "huge": {"title": "Huge", "type": "array", "calculation": "[range(100000)]"},
    }
    r = await client.patch(
        "/v1/blueprints/service", json={"calculationProperties": calcs}, headers=org.headers
    )
    assert r.status_code == 200, r.text
    r = await client.get("/v1/blueprints/service/entities/api", headers=org.headers)
    assert r.status_code == 200, r.text
    entity = r.json()["entity"]
    props = entity["properties"]
    assert props["label"] == "api (go)"
    assert props["busy"] is True  # over the aggregation value
    assert props["owner"] == "core"
    assert props["broken"] is None and props["wrongType"] is None and props["huge"] is None
    assert entity["calculationErrors"]["broken"] == "no number here"
    assert "type number" in entity["calculationErrors"]["wrongType"]
    assert "larger than" in entity["calculationErrors"]["huge"]
    plain = await client.get(
        "/v1/blueprints/service/entities/api",
        headers=org.headers,
        params={"exclude_calculated_properties": "true"},
    )
    assert "label" not in plain.json()["entity"]["properties"]


async def test_a_runaway_calculation_is_stopped(client: httpx.AsyncClient, org: Org) -> None:
    calcs = {
        "forever": {"title": "Forever", "type": "number", "calculation": "def f: f; f"},
    }
    r = await client.patch(
        "/v1/blueprints/service", json={"calculationProperties": calcs}, headers=org.headers
    )
    assert r.status_code == 200, r.text
    r = await client.get("/v1/blueprints/service/entities/api", headers=org.headers)
    assert r.status_code == 200, r.text
    entity = r.json()["entity"]
    assert entity["properties"]["forever"] is None
    assert "longer than" in entity["calculationErrors"]["forever"]
    # and the next read still calculates
    calcs = {"ok": {"title": "Ok", "type": "number", "calculation": "1 + 1"}}
    await client.patch(
        "/v1/blueprints/service", json={"calculationProperties": calcs}, headers=org.headers
    )
    again = (await client.get("/v1/blueprints/service/entities/api", headers=org.headers)).json()
    assert again["entity"]["properties"]["ok"] == 2


async def _found(client: httpx.AsyncClient, org: Org, rules: list[dict[str, Any]]) -> Any:
    return await client.post(
        "/v1/blueprints/service/entities/search",
        json={"query": {"combinator": "and", "rules": rules}},
        headers=org.headers,
    )


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        ([{"property": "ownerSlack", "operator": "=", "value": "#core"}], ["api"]),
        ([{"property": "ownerSlack", "operator": "isEmpty"}], ["lonely"]),
        ([{"property": "ownerTitle", "operator": "beginsWith", "value": "Core"}], ["api"]),
        ([{"property": "groupTier", "operator": ">=", "value": 2}], ["api"]),
        ([{"property": "usedSlacks", "operator": "contains", "value": "#web"}], ["api"]),
        ([{"property": "deployments", "operator": ">", "value": 2}], ["api"]),
        ([{"property": "deployments", "operator": "=", "value": 0}], ["lonely"]),
        ([{"property": "failed", "operator": "<", "value": 1}], ["lonely"]),
        (
            [
                {"property": "lang", "operator": "=", "value": "go"},
                {
                    "property": "totalMinutes",
                    "operator": "between",
                    "value": {"from": "2020-01-01T00:00:00Z", "to": "2021-01-01T00:00:00Z"},
                },
            ],
            None,
        ),
    ],
)
async def test_rules_apply_to_mirror_and_aggregation_properties(
    client: httpx.AsyncClient, org: Org, rules: list[dict[str, Any]], expected: list[str] | None
) -> None:
    r = await _found(client, org, rules)
    if expected is None:  # a number is not a date-time
        assert r.status_code == 422, r.text
        return
    assert r.status_code == 200, r.text
    assert [e["identifier"] for e in r.json()["entities"]] == expected


async def test_calculation_properties_cannot_be_searched(
    client: httpx.AsyncClient, org: Org
) -> None:
    calcs = {"label": {"title": "Label", "type": "string", "calculation": ".identifier"}}
    await client.patch(
        "/v1/blueprints/service", json={"calculationProperties": calcs}, headers=org.headers
    )
    r = await _found(client, org, [{"property": "label", "operator": "=", "value": "api"}])
    assert r.status_code == 422 and "calculation" in r.json()["message"]


async def test_related_to_search_beside_an_aggregation_that_walks_related_to(
    client: httpx.AsyncClient, org: Org, make_org: OrgFactory
) -> None:
    # The team blueprint counts the services related (any number of hops) to group g1; a
    # relatedTo search over teams compiles its own walk in the same statement.
    aggs = {
        "groupServices": {
            "title": "Services of g1",
            "target": "service",
            "calculationSpec": {"func": "count", "calculationBy": "entities"},
            "query": {
                "combinator": "and",
                "rules": [
                    {
                        "operator": "relatedTo",
                        "blueprint": "group",
                        "value": "g1",
                        "direction": "downstream",
                    }
                ],
            },
        }
    }
    r = await client.patch(
        "/v1/blueprints/team", json={"aggregationProperties": aggs}, headers=org.headers
    )
    assert r.status_code == 200, r.text
    related = {
        "combinator": "and",
        "rules": [
            {"operator": "relatedTo", "blueprint": "group", "value": "g1", "maxHops": 3},
        ],
    }
    r = await client.post(
        "/v1/blueprints/team/entities/search", json={"query": related}, headers=org.headers
    )
    assert r.status_code == 200, r.text
    found = {e["identifier"]: e["properties"] for e in r.json()["entities"]}
    assert found == {"core": {"slack": "#core", "groupServices": 1}}
    # Across blueprints the answer is streamed: it must arrive whole.
    r = await client.post("/v1/entities/search", json=related, headers=org.headers)
    assert r.status_code == 200, r.text
    streamed = r.json()["entities"]
    assert {e["identifier"] for e in streamed} == {"core", "api", "d0", "d1", "d2"}
    assert [e["properties"]["groupServices"] for e in streamed if e["blueprint"] == "team"] == [1]
    # Another tenant with the same catalog shape sees none of these entities.
    other = await make_org()
    r = await client.post("/v1/entities/search", json=related, headers=other.headers)
    assert r.status_code == 422 or r.json()["entities"] == [], r.text


async def test_renames_are_carried_into_other_blueprints_derived_properties(
    client: httpx.AsyncClient, org: Org, make_org: OrgFactory
) -> None:
    other = await make_org()
    await _setup(client, other)
    group_aggs = {
        "services": {
            "title": "Services",
            "target": "service",
            "calculationSpec": {"func": "count", "calculationBy": "entities"},
            "pathFilter": [{"path": ["owner", "group"]}],
            "query": {
                "combinator": "and",
                "rules": [
                    {"property": "lang", "operator": "=", "value": "go"},
                    {"property": "owner", "operator": "=", "value": "core"},
                    {
                        "property": {"path": ["owner", "group"]},
                        "operator": "matchAny",
                        "value": "g1",
                    },
                ],
            },
        }
    }
    for tenant in (org, other):
        r = await client.patch(
            "/v1/blueprints/group",
            json={"aggregationProperties": group_aggs},
            headers=tenant.headers,
        )
        assert r.status_code == 200, r.text
    team_aggs = {
        "coreServices": {
            "title": "Services owned through #core",
            "target": "service",
            "calculationSpec": {"func": "count", "calculationBy": "entities"},
            "query": {
                "combinator": "and",
                "rules": [{"property": "ownerSlack", "operator": "=", "value": "#core"}],
            },
        }
    }
    r = await client.patch(
        "/v1/blueprints/team", json={"aggregationProperties": team_aggs}, headers=org.headers
    )
    assert r.status_code == 200, r.text

    async def values() -> tuple[dict[str, Any], dict[str, Any]]:
        service = await client.get("/v1/blueprints/service/entities/api", headers=org.headers)
        group = await client.get("/v1/blueprints/group/entities/g1", headers=org.headers)
        return service.json()["entity"]["properties"], group.json()["entity"]["properties"]

    before = await values()
    assert before[1] == {"tier": 2, "services": 1}

    async def rename(bp: str, kind: str, old: str, new: str) -> None:
        key = "newPropertyName" if kind == "properties" else "newRelationIdentifier"
        r = await client.patch(
            f"/v1/blueprints/{bp}/{kind}/{old}/rename", json={key: new}, headers=org.headers
        )
        assert r.status_code == 200, r.text

    await rename("team", "properties", "slack", "chat")  # mirrors' leaves
    await rename("group", "properties", "tier", "level")  # a leaf two hops away
    await rename("deployment", "properties", "minutes", "duration")  # measured property
    await rename("deployment", "properties", "status", "state")  # an aggregation's rule
    await rename("service", "properties", "lang", "language")  # another blueprint's rule
    await rename("team", "relations", "group", "parent")  # hops of mirrors, pathFilter, rules
    await rename("service", "relations", "owner", "lead")
    await rename("deployment", "relations", "service", "of")
    r = await client.patch(
        "/v1/blueprints/service/mirror/ownerSlack/rename",
        json={"newMirrorName": "ownerChat"},
        headers=org.headers,
    )
    assert r.status_code == 200, r.text
    core = await client.get("/v1/blueprints/team/entities/core", headers=org.headers)
    assert core.json()["entity"]["properties"]["coreServices"] == 1
    r = await client.get("/v1/blueprints/team", headers=org.headers)
    rules = r.json()["blueprint"]["aggregationProperties"]["coreServices"]["query"]["rules"]
    assert rules[0]["property"] == "ownerChat"
    after = await values()
    renamed = {"ownerTitle", "groupTier", "usedSlacks", "deployments"}
    assert {k: after[0][k] for k in renamed} == {k: before[0][k] for k in renamed}
    assert after[0]["ownerChat"] == before[0]["ownerSlack"] == "#core"
    assert after[0]["language"] == "go"
    assert [after[0][k] for k in ("failed", "totalMinutes", "medianMinutes")] == [1, 18, 5]
    assert after[1] == {"level": 2, "services": 1}
    service = (await client.get("/v1/blueprints/service", headers=org.headers)).json()["blueprint"]
    assert service["mirrorProperties"]["groupTier"]["path"] == "lead.parent.level"
    assert service["mirrorProperties"]["usedSlacks"]["path"] == "uses.chat"
    assert service["ownership"]["path"] == "lead"
    failed = service["aggregationProperties"]["failed"]["query"]["rules"][0]
    assert failed["property"] == "state"
    spec = service["aggregationProperties"]["totalMinutes"]["calculationSpec"]
    assert spec["property"] == "duration"
    group = (await client.get("/v1/blueprints/group", headers=org.headers)).json()["blueprint"]
    agg = group["aggregationProperties"]["services"]
    assert agg["pathFilter"] == [{"path": ["lead", "parent"]}]
    assert [rule["property"] for rule in agg["query"]["rules"]] == [
        "language",
        "lead",
        {"path": ["lead", "parent"]},
    ]
    # The other tenant's catalog of the same shape is untouched.
    theirs = (await client.get("/v1/blueprints/service", headers=other.headers)).json()["blueprint"]
    assert theirs["mirrorProperties"]["groupTier"]["path"] == "owner.group.tier"
    props = (await client.get("/v1/blueprints/service/entities/api", headers=other.headers)).json()[
        "entity"
    ]["properties"]
    assert props["groupTier"] == 2 and props["totalMinutes"] == 18
