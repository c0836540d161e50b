"""Pages and dashboards on a Citus cluster (docs/scaling.md): two orgs' pages apart, every
widget's data as on a single PostgreSQL, and every statement of every pages route a router
plan on the org's shard (one task)."""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import FastAPI

from app.config import Settings
from tests.conftest import Org
from tests.test_citus import (  # noqa: F401 - the cluster's fixtures
    Recorder,
    _custom_scans,
    _explain,
    _org,
    citus_app,
    citus_settings,
    cluster,
    http,
    recorder,
)
from tests.test_pages import ENTITIES, LINE, SCORECARD, SERVICE, SERVICES, dashboard

WIDGETS = [
    {"id": "md", "type": "markdown", "markdown": "# Services"},
    {"id": "count", "type": "entities-number-chart", "blueprint": "service"},
    {
        "id": "sum",
        "type": "entities-number-chart",
        "blueprint": "service",
        "calculationBy": "property",
        "func": "sum",
        "property": "coverage",
    },
    {"id": "langs", "type": "entities-pie-chart", "property": "language", "dataset": SERVICES},
    {
        "id": "levels",
        "type": "entities-pie-chart",
        "property": "scorecard#ready",
        "dataset": SERVICES,
    },
    {
        "id": "covered",
        "type": "entities-pie-chart",
        "property": "scorecard-rule#ready#covered",
        "dataset": SERVICES,
    },
    {"id": "table", "type": "table-entities-explorer", "dataset": SERVICES},
    {"id": "teams", "type": "scorecard-compliance", "blueprint": "service", "scorecard": "ready"},
    {**LINE, "id": "line", "func": "count"},
]
# What each widget answers for ENTITIES (as tests/test_pages.py finds on one PostgreSQL).
EXPECTED: dict[str, Any] = {
    "count": lambda d: d["value"] == 5,
    "sum": lambda d: d["value"] == 235,
    "langs": lambda d: (
        d["values"]
        == [
            {"value": "go", "count": 2},
            {"value": "python", "count": 2},
            {"value": None, "count": 1},
        ]
    ),
    "levels": lambda d: (
        sorted((v["value"], v["count"]) for v in d["values"])
        == [("Basic", 1), ("Bronze", 2), ("Gold", 2)]
    ),
    "covered": lambda d: d["values"] == [{"value": False, "count": 3}, {"value": True, "count": 2}],
    "table": lambda d: [e["identifier"] for e in d["entities"]] == ["a", "b", "c", "d", "e"],
    "teams": lambda d: (
        [(g["value"], g["entities"], g["levels"]) for g in d["groups"]]
        == [(None, 5, {"Basic": 1, "Bronze": 2, "Gold": 2})]
    ),
    "line": lambda d: d["data"][-1]["count"] == 5,
    "md": lambda d: d["markdown"] == "# Services",
}


async def _catalog(client: httpx.AsyncClient, org: Org) -> None:
    # No teams: creating one is not served on Citus yet (docs/scaling.md).
    for path, body in (
        ("/v1/blueprints", SERVICE),
        ("/v1/blueprints/service/scorecards", SCORECARD),
    ):
        r = await client.post(path, json=body, headers=org.headers)
        assert r.status_code < 300, (path, r.text)
    for identifier, _, props in ENTITIES:
        body = {"identifier": identifier, "properties": props}
        r = await client.post("/v1/blueprints/service/entities", json=body, headers=org.headers)
        assert r.status_code < 300, r.text


async def _router_plans(settings: Settings, org: Org, recorded: Recorder) -> int:
    """How many statements recorded read or wrote distributed tables; each must be one
    task on one shard."""
    distributed = 0
    for statement in recorded.statements:
        if (
            not statement.sql.lstrip()
            .upper()
            .startswith(("SELECT", "WITH", "INSERT", "UPDATE", "DELETE"))
        ):
            continue
        scans = _custom_scans(await _explain(settings, org.org_id, statement))
        if not scans:
            continue
        distributed += 1
        for scan in scans:
            assert scan["Distributed Query"]["Job"]["Task Count"] == 1, (statement.sql, scan)
    recorded.statements.clear()
    return distributed


async def test_two_orgs_dashboards_answer_as_postgresql_with_router_plans(
    citus_app: FastAPI,  # noqa: F811
    citus_settings: Settings,  # noqa: F811
    http: httpx.AsyncClient,  # noqa: F811
    recorder: Recorder,  # noqa: F811
) -> None:
    first = await _org(citus_app, http)
    second = await _org(citus_app, http)
    for org in (first, second):
        await _catalog(http, org)
    recorder.on = True
    r = await http.post("/v1/pages", json=dashboard("eng", WIDGETS), headers=first.headers)
    assert r.status_code == 201, r.text
    assert await _router_plans(citus_settings, first, recorder)
    for widget in WIDGETS:
        r = await http.post(f"/v1/pages/eng/widgets/{widget['id']}/data", headers=first.headers)
        assert r.status_code == 200, (widget["id"], r.text)
        assert EXPECTED[widget["id"]](r.json()), (widget["id"], str(r.json()))
        assert await _router_plans(citus_settings, first, recorder), widget["id"]
    for method, path, body in (
        ("GET", "/v1/pages", None),
        ("GET", "/v1/pages/eng", None),
        ("PATCH", "/v1/pages/eng", {"title": "Engineering"}),
        ("POST", "/v1/pages/eng/widgets", {"id": "note", "type": "markdown"}),
        ("PATCH", "/v1/pages/eng/widgets/note", {"title": "Note"}),
        ("DELETE", "/v1/pages/eng/widgets/note", None),
        ("PATCH", "/v1/pages/eng/permissions", {"read": {"roles": ["Admin"]}}),
        ("GET", "/v1/pages/eng/permissions", None),
    ):
        r = await http.request(method, path, json=body, headers=first.headers)
        assert r.status_code < 300, (method, path, r.text)
        assert await _router_plans(citus_settings, first, recorder), (method, path)
    recorder.on = False

    # The other org sees none of it, and its own page of the same name reads its own rows.
    assert (await http.get("/v1/pages", headers=second.headers)).json()["pages"] == []
    r = await http.post("/v1/pages/eng/widgets/count/data", headers=second.headers)
    assert r.status_code == 404, r.text
    r = await http.post("/v1/pages", json=dashboard("eng", WIDGETS[:2]), headers=second.headers)
    assert r.status_code == 201, r.text
    await http.delete("/v1/blueprints/service/entities/a", headers=second.headers)
    r = await http.post("/v1/pages/eng/widgets/count/data", headers=second.headers)
    assert r.json()["value"] == 4, r.text
    r = await http.post("/v1/pages/eng/widgets/count/data", headers=first.headers)
    assert r.json()["value"] == 5, r.text


async def test_a_catalog_page_is_made_on_the_orgs_shard(
    citus_app: FastAPI,  # noqa: F811
    http: httpx.AsyncClient,  # noqa: F811
) -> None:
    org = await _org(citus_app, http)
    r = await http.post(
        "/v1/blueprints",
        params={"create_catalog_page": "true"},
        json=SERVICE,
        headers=org.headers,
    )
    assert r.status_code == 201, r.text
    page = (await http.get("/v1/pages/service", headers=org.headers)).json()["page"]
    assert page["type"] == "blueprint-entities"
