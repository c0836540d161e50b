"""Streamed answers built by the database (each entity's JSON made in the statement) answer
exactly what the entity reads answer: every field, derived, scorecard and calculation
property, relation shape and date, with the query flags and include / exclude."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from app.db.database import Database
from app.search import service
from tests.conftest import Org, OrgFactory

BLUEPRINTS: list[dict[str, Any]] = [
    {
        "identifier": "team",
        "title": "Team",
        "schema": {"properties": {"slack": {"type": "string"}}},
    },
    {
        "identifier": "service",
        "title": "Service",
        "schema": {
            "properties": {
                "lang": {"type": "string"},
                "coverage": {"type": "number"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "meta": {"type": "object"},
                "at": {"type": "string", "format": "date-time"},
            }
        },
        "relations": {
            "owner": {"target": "team", "required": False, "many": False},
            "uses": {"target": "team", "required": False, "many": True},
            "dependsOn": {"target": "service", "required": False, "many": True},
        },
        "mirrorProperties": {
            "ownerSlack": {"path": "owner.slack"},
            "usedTitles": {"path": "uses.$title"},
        },
        "aggregationProperties": {
            "dependents": {
                "title": "Dependents",
                "target": "service",
                "calculationSpec": {"func": "count", "calculationBy": "entities"},
            }
        },
        "calculationProperties": {
            "shout": {"title": "Shout", "calculation": ".title | ascii_upcase", "type": "string"},
            "broken": {
                "title": "Broken",
                "calculation": ".properties.lang | ascii_upcase",
                "type": "number",
            },
            "created": {"title": "Created", "calculation": ".createdAt", "type": "string"},
        },
        "ownership": {"type": "Inherited", "path": "owner"},
    },
]
SCORECARD = {
    "identifier": "basics",
    "title": "Basics",
    "rules": [
        {
            "identifier": "covered",
            "title": "Covered",
            "level": "Gold",
            "query": {
                "combinator": "and",
                "conditions": [{"property": "coverage", "operator": ">", "value": 50}],
            },
        },
        {
            "identifier": "tagged",
            "title": "Tagged",
            "level": "Silver",
            "query": {
                "combinator": "and",
                "conditions": [{"property": "tags", "operator": "isNotEmpty"}],
            },
        },
    ],
}


async def _catalog(client: httpx.AsyncClient, org: Org, db: Database) -> None:
    for body in BLUEPRINTS:
        r = await client.post("/v1/blueprints", json=body, headers=org.headers)
        assert r.status_code == 201, r.text
    r = await client.post("/v1/blueprints/service/scorecards", json=SCORECARD, headers=org.headers)
    assert r.status_code in (200, 201), r.text
    teams = [
        {"identifier": "core", "title": "Core — ядро", "team": ["platform"]},
        {"identifier": "edge", "properties": {"slack": "#edge"}, "icon": "Cloud"},
    ]
    services: list[dict[str, Any]] = [
        {
            "identifier": f"svc-{i}",
            "title": f'Service "{i}" \\ ✓' if i % 3 else None,
            "properties": {
                "lang": ["go", "python", None][i % 3],
                "coverage": i * 9.5,
                "tags": [f"t{i}", "ü"] if i % 2 else [],
                "meta": {"nested": {"n": i, "b": None}, "z": [1.25, True]},
                "at": "2026-03-04T05:06:07.123Z",
            },
            "relations": {
                "owner": ["core", "edge", None][i % 3],
                "uses": ["core", "edge"][: i % 3],
                "dependsOn": [f"svc-{j}" for j in range(i)][:2],
            },
        }
        for i in range(7)
    ]
    for bp, items in (("team", teams), ("service", services)):
        r = await client.post(
            f"/v1/blueprints/{bp}/entities/bulk?create_missing_related_entities=true",
            json={"entities": items},
            headers=org.headers,
        )
        assert r.status_code == 200, r.text
    # Dates with and without microseconds are written differently: have both.
    async with db.system(org.org_id) as tx:
        await tx.execute(
            "UPDATE entities SET created_at = date_trunc('second', created_at) "
            "WHERE org_id = $1 AND identifier IN ('svc-1', 'core')",
            org.org_id,
        )


@pytest.fixture
async def catalog(client: httpx.AsyncClient, make_org: OrgFactory, db: Database) -> Org:
    org = await make_org()
    await _catalog(client, org, db)
    return org


async def _each(client: httpx.AsyncClient, org: Org, bp: str, ids: list[str], query: str) -> Any:
    out = []
    for identifier in ids:
        r = await client.get(
            f"/v1/blueprints/{bp}/entities/{identifier}{query}", headers=org.headers
        )
        assert r.status_code == 200, r.text
        out.append(r.json()["entity"])
    return out


@pytest.mark.parametrize(
    "query",
    ["", "?attach_title_to_relation=true", "?exclude_calculated_properties=true"],
)
async def test_list_answers_what_each_entity_read_answers(
    client: httpx.AsyncClient, catalog: Org, query: str
) -> None:
    for bp in ("service", "team"):
        r = await client.get(f"/v1/blueprints/{bp}/entities{query}", headers=catalog.headers)
        assert r.status_code == 200, r.text
        listed = r.json()["entities"]
        ids = [e["identifier"] for e in listed]
        assert listed == await _each(client, catalog, bp, ids, query)
        assert len(listed) == (7 if bp == "service" else 2)


async def test_list_carries_scorecards_calculations_and_their_errors(
    client: httpx.AsyncClient, catalog: Org
) -> None:
    listed = (await client.get("/v1/blueprints/service/entities", headers=catalog.headers)).json()[
        "entities"
    ]
    svc = next(e for e in listed if e["identifier"] == "svc-5")
    assert svc["scorecards"]["basics"]["level"] == "Silver"
    assert svc["properties"]["shout"] == 'SERVICE "5" \\ ✓'
    assert svc["properties"]["created"] == svc["createdAt"]
    assert svc["properties"]["broken"] is None and "broken" in svc["calculationErrors"]
    owned = next(e for e in listed if e["identifier"] == "svc-3")
    assert owned["team"] == ["platform"]  # inherited from its owner, core


async def test_search_across_blueprints_answers_what_the_blueprint_pages_answer(
    client: httpx.AsyncClient, catalog: Org
) -> None:
    query = {
        "combinator": "or",
        "rules": [
            {"property": "$identifier", "operator": "beginsWith", "value": "svc-"},
            {"property": "$identifier", "operator": "=", "value": "edge"},
        ],
    }
    found = await client.post(
        "/v1/entities/search?attach_title_to_relation=true", json=query, headers=catalog.headers
    )
    assert found.status_code == 200, found.text
    paged = []
    for bp in ("service", "team"):
        r = await client.post(
            f"/v1/blueprints/{bp}/entities/search?attach_title_to_relation=true",
            json={"query": query, "limit": 1000},
            headers=catalog.headers,
        )
        paged += r.json()["entities"]
    assert found.json()["entities"] == paged


async def test_include_and_exclude_pick_fields_of_streamed_entities(
    client: httpx.AsyncClient, catalog: Org
) -> None:
    r = await client.get(
        "/v1/blueprints/service/entities?include=properties.shout&include=title&exclude=title",
        headers=catalog.headers,
    )
    assert r.json()["entities"][1] == {"properties": {"shout": 'SERVICE "1" \\ ✓'}}
    query = {"rules": [{"property": "$identifier", "operator": "=", "value": "svc-1"}]}
    r = await client.post(
        "/v1/entities/search?include=$title&include=lang", json=query, headers=catalog.headers
    )
    assert r.json()["entities"] == [
        {
            "identifier": "svc-1",
            "blueprint": "service",
            "title": 'Service "1" \\ ✓',
            "properties": {"lang": "python"},
        }
    ]


async def test_a_list_longer_than_a_page_streams_every_entity_once(
    client: httpx.AsyncClient, make_org: OrgFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    org = await make_org()
    body = {"identifier": "item", "title": "Item", "schema": {"properties": {}}}
    assert (await client.post("/v1/blueprints", json=body, headers=org.headers)).is_success
    items = [{"identifier": f"i-{n:03d}"} for n in range(25)]
    r = await client.post(
        "/v1/blueprints/item/entities/bulk", json={"entities": items}, headers=org.headers
    )
    assert r.status_code == 200
    monkeypatch.setattr(service, "_DOC_PAGE", 4)
    listed = (await client.get("/v1/blueprints/item/entities", headers=org.headers)).json()
    assert [e["identifier"] for e in listed["entities"]] == [i["identifier"] for i in items]


async def test_a_search_across_blueprints_longer_than_a_page_streams_every_entity_once(
    client: httpx.AsyncClient, make_org: OrgFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages resume after (blueprint, identifier): each page runs the same statement with
    the previous page's last key, across the blueprints' boundary."""
    org = await make_org()
    expected = []
    for name in ("alpha", "beta"):
        body = {"identifier": name, "title": name, "schema": {"properties": {}}}
        assert (await client.post("/v1/blueprints", json=body, headers=org.headers)).is_success
        items = [{"identifier": f"{name[0]}-{n:02d}"} for n in range(7)]
        r = await client.post(
            f"/v1/blueprints/{name}/entities/bulk", json={"entities": items}, headers=org.headers
        )
        assert r.status_code == 200
        expected += [(name, i["identifier"]) for i in items]
    monkeypatch.setattr(service, "_DOC_PAGE", 4)
    found = await client.post("/v1/entities/search", json={"rules": []}, headers=org.headers)
    assert found.status_code == 200, found.text
    assert [(e["blueprint"], e["identifier"]) for e in found.json()["entities"]] == expected


async def test_another_org_streams_none_of_these_entities(
    client: httpx.AsyncClient, catalog: Org, make_org: OrgFactory
) -> None:
    other = await make_org()
    for body in BLUEPRINTS:
        await client.post("/v1/blueprints", json=body, headers=other.headers)
    listed = await client.get("/v1/blueprints/service/entities", headers=other.headers)
    found = await client.post("/v1/entities/search", json={"rules": []}, headers=other.headers)
    assert listed.json()["entities"] == [] and found.json()["entities"] == []
    assert uuid.UUID(str(catalog.org_id)) != other.org_id


async def test_one_entity_follows_a_changed_definition(
    client: httpx.AsyncClient, catalog: Org
) -> None:
    before = await client.get("/v1/blueprints/service/entities/svc-1", headers=catalog.headers)
    assert "ownerTitle" not in before.json()["entity"]["properties"]
    mirrors = {**BLUEPRINTS[1]["mirrorProperties"], "ownerTitle": {"path": "owner.$title"}}
    r = await client.patch(
        "/v1/blueprints/service", json={"mirrorProperties": mirrors}, headers=catalog.headers
    )
    assert r.status_code == 200, r.text
    after = await client.get("/v1/blueprints/service/entities/svc-1", headers=catalog.headers)
    assert after.json()["entity"]["properties"]["ownerTitle"] is None  # edge has no title


async def test_one_entity_is_found_only_by_its_org_and_blueprint(
    client: httpx.AsyncClient, catalog: Org, make_org: OrgFactory
) -> None:
    other = await make_org()
    for body in BLUEPRINTS:
        await client.post("/v1/blueprints", json=body, headers=other.headers)
    mine = await client.get("/v1/blueprints/service/entities/svc-1", headers=catalog.headers)
    theirs = await client.get("/v1/blueprints/service/entities/svc-1", headers=other.headers)
    elsewhere = await client.get("/v1/blueprints/team/entities/svc-1", headers=catalog.headers)
    assert mine.status_code == 200 and mine.json()["entity"]["identifier"] == "svc-1"
    assert theirs.status_code == 404 and theirs.json()["error"] == "not_found"
    assert elsewhere.status_code == 404
