"""Pages and dashboards (/v1/pages): CRUD in Port's shapes, widgets, page permissions (who
sees which dashboard), each widget type's data against real entities, catalog pages made
with blueprints, caps, cross-tenant isolation on every route, and every 4xx."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.db.database import Database
from tests.conftest import Org, OrgFactory
from tests.test_permissions import add_user, app_headers, user_headers

SERVICE = {
    "identifier": "service",
    "title": "Service",
    "schema": {
        "properties": {
            "language": {"type": "string"},
            "tier": {"type": "string", "enum": ["tier-1", "tier-2"]},
            "coverage": {"type": "number"},
            "tags": {"type": "array", "items": {"type": "string"}},
        }
    },
}
SCORECARD = {
    "identifier": "ready",
    "title": "Production readiness",
    "levels": [
        {"title": "Basic", "color": "paleBlue"},
        {"title": "Bronze", "color": "bronze"},
        {"title": "Gold", "color": "gold"},
    ],
    "rules": [
        {
            "identifier": "hasLanguage",
            "title": "Has a language",
            "level": "Bronze",
            "query": {
                "combinator": "and",
                "conditions": [{"property": "language", "operator": "isNotEmpty"}],
            },
        },
        {
            "identifier": "covered",
            "title": "Coverage at least 80",
            "level": "Gold",
            "query": {
                "combinator": "and",
                "conditions": [{"property": "coverage", "operator": ">=", "value": 80}],
            },
        },
    ],
}
# (identifier, team, properties): three levels, two teams and one with none, two tiers.
ENTITIES = [
    ("a", ["alpha"], {"language": "python", "tier": "tier-1", "coverage": 90, "tags": ["x"]}),
    ("b", ["alpha"], {"language": "python", "tier": "tier-2", "coverage": 50}),
    ("c", ["beta"], {"language": "go", "tier": "tier-1", "coverage": 85, "tags": ["x", "y"]}),
    ("d", ["beta"], {"tier": "tier-1", "coverage": 10}),
    ("e", [], {"language": "go", "tier": "tier-2"}),
]
SERVICES = {
    "combinator": "and",
    "rules": [{"property": "$blueprint", "operator": "=", "value": "service"}],
}


def dashboard(
    identifier: str = "eng", widgets: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """A dashboard page as Port's UI and Ocean's defaults make it: one dashboard-widget
    holding the widgets, with a layout of rows."""
    held = (
        widgets
        if widgets is not None
        else [{"id": "intro", "type": "markdown", "markdown": "# Hi"}]
    )
    return {
        "identifier": identifier,
        "title": "Engineering",
        "icon": "Apps",
        "type": "dashboard",
        "showInSidebar": True,
        "requiredQueryParams": [],
        "section": "software_catalog",
        "protected": False,
        "widgets": [
            {
                "id": f"{identifier}-board",
                "type": "dashboard-widget",
                "layout": [
                    {"height": 400, "columns": [{"id": w["id"], "size": 12}]}
                    for w in held
                    if isinstance(w.get("id"), str)
                ],
                "widgets": held,
            }
        ],
    }


async def _post(client: httpx.AsyncClient, org: Org, path: str, body: Any) -> httpx.Response:
    return await client.post(path, json=body, headers=org.headers)


async def _catalog(client: httpx.AsyncClient, org: Org, *, scorecard: bool = True) -> None:
    for team in ("alpha", "beta"):
        r = await _post(client, org, "/v1/teams", {"name": team})
        assert r.status_code < 300, r.text
    r = await _post(client, org, "/v1/blueprints", SERVICE)
    assert r.status_code == 201, r.text
    if scorecard:
        r = await _post(client, org, "/v1/blueprints/service/scorecards", SCORECARD)
        assert r.status_code < 300, r.text
    for identifier, team, props in ENTITIES:
        body = {"identifier": identifier, "team": team, "properties": props}
        r = await _post(client, org, "/v1/blueprints/service/entities", body)
        assert r.status_code < 300, r.text


async def _data(
    client: httpx.AsyncClient, headers: dict[str, str], page: str, widget: str, body: Any = None
) -> httpx.Response:
    return await client.post(f"/v1/pages/{page}/widgets/{widget}/data", json=body, headers=headers)


async def _widget_data(
    client: httpx.AsyncClient, org: Org, widget: dict[str, Any], body: Any = None
) -> dict[str, Any]:
    """Puts the widget on a fresh dashboard and answers its data."""
    page = f"p-{widget['id']}"
    r = await _post(client, org, "/v1/pages", dashboard(page, [widget]))
    assert r.status_code == 201, r.text
    r = await _data(client, org.headers, page, widget["id"], body)
    assert r.status_code == 200, r.text
    return r.json()


def _error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["ok"] is False and body["message"], body
    if code is not None:
        assert body["error"] == code, body
    return body


# -- CRUD -----------------------------------------------------------------------------------


async def test_a_page_is_created_read_listed_changed_and_deleted(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    r = await _post(client, org, "/v1/pages", dashboard())
    assert r.status_code == 201, r.text
    page = r.json()["page"]
    assert page["identifier"] == "eng" and page["type"] == "dashboard"
    assert page["title"] == "Engineering" and page["section"] == "software_catalog"
    assert page["widgets"] == dashboard()["widgets"]
    got = (await client.get("/v1/pages/eng", headers=org.headers)).json()["page"]
    assert got == page
    listed = (await client.get("/v1/pages", headers=org.headers)).json()["pages"]
    assert [p["identifier"] for p in listed] == ["eng"] and listed[0]["widgets"]
    compact = await client.get("/v1/pages", params={"compact": "true"}, headers=org.headers)
    assert "widgets" not in compact.json()["pages"][0]

    change = {"title": "Eng", "icon": None, "widgets": [{"id": "m", "type": "markdown"}]}
    r = await client.patch("/v1/pages/eng", json=change, headers=org.headers)
    assert r.status_code == 200, r.text
    changed = r.json()["page"]
    assert changed["title"] == "Eng" and "icon" not in changed
    assert changed["widgets"] == [{"id": "m", "type": "markdown"}]
    assert changed["section"] == "software_catalog"  # fields not given stay

    r = await client.delete("/v1/pages/eng", headers=org.headers)
    assert r.status_code == 200 and r.json() == {"ok": True}
    _error(await client.get("/v1/pages/eng", headers=org.headers), 404, "page_not_found")
    _error(await client.delete("/v1/pages/eng", headers=org.headers), 404, "page_not_found")


async def test_ocean_default_pages_are_taken_as_ocean_sends_them(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    """The shape of an Ocean integration's .port/resources/pages.json: a dashboard wrapper
    with markdown, pie, iframe, number (dataset as a list of rules) and table widgets."""
    org = await make_org()
    await _catalog(client, org)
    widgets = [
        {"id": "readme", "type": "markdown", "title": "About", "markdown": "text", "icon": "port"},
        {
            "id": "byLanguage",
            "type": "entities-pie-chart",
            "title": "Services by language",
            "dataset": SERVICES,
            "property": "property#language",
        },
        {"id": "ext", "type": "iframe-widget", "url": "https://example.com/w", "urlType": "public"},
        {
            "id": "pythons",
            "type": "entities-number-chart",
            "blueprint": "service",
            "calculationBy": "entities",
            "func": "count",
            "unit": "none",
            "dataset": [
                {"property": "language", "operator": "in", "value": ["python", "Python"]},
                {"property": "$blueprint", "operator": "=", "value": "service"},
            ],
        },
        {
            "id": "byLevel",
            "type": "table-entities-explorer",
            "displayMode": "widget",
            "blueprintConfig": {"service": {"groupSettings": {"groupBy": ["ready"]}}},
            "dataset": SERVICES,
        },
        {
            "id": "levels",
            "type": "entities-pie-chart",
            "property": "scorecard#ready",
            "dataset": SERVICES,
        },
    ]
    r = await _post(client, org, "/v1/pages", dashboard("ocean-dash", widgets))
    assert r.status_code == 201, r.text
    assert r.json()["page"]["widgets"][0]["widgets"] == widgets
    r = await _data(client, org.headers, "ocean-dash", "pythons")
    assert r.json()["value"] == 2


async def test_a_page_identifier_is_taken_once(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    assert (await _post(client, org, "/v1/pages", dashboard())).status_code == 201
    _error(await _post(client, org, "/v1/pages", dashboard()), 409, "page_exists")


@pytest.mark.parametrize(
    ("body", "pointer"),
    [
        ({**dashboard(), "colour": "red"}, "/colour"),
        ({**dashboard(), "identifier": "has space"}, "/identifier"),
        ({**dashboard(), "type": "wiki"}, "/type"),
        ({**dashboard(), "title": 3}, "/title"),
        ({**dashboard(), "showInSidebar": "yes"}, "/showInSidebar"),
        ({**dashboard(), "requiredQueryParams": [1]}, "/requiredQueryParams"),
        ({"identifier": "cat", "type": "blueprint-entities"}, "/blueprint"),
        ({**dashboard(), "widgets": {}}, "/widgets"),
        (dashboard(widgets=[{"type": "markdown"}]), "/widgets/0/widgets/0/id"),
        (dashboard(widgets=[{"id": "x", "type": "gauge"}]), "/widgets/0/widgets/0/type"),
        (
            dashboard(widgets=[{"id": "x", "type": "markdown"}, {"id": "x", "type": "markdown"}]),
            "/widgets/0/widgets/1/id",
        ),
        (
            dashboard(widgets=[{"id": "inner", "type": "dashboard-widget", "widgets": []}]),
            "/widgets/0/widgets/0/type",
        ),
        (
            {
                **dashboard(),
                "widgets": [
                    {
                        "id": "d",
                        "type": "dashboard-widget",
                        "widgets": [],
                        "layout": [{"columns": [{"id": "ghost"}]}],
                    }
                ],
            },
            "/widgets/0/layout/0/columns/0/id",
        ),
        (
            dashboard(widgets=[{"id": "n", "type": "entities-number-chart", "func": "sum"}]),
            "/widgets/0/widgets/0/func",
        ),
        (
            dashboard(
                widgets=[
                    {
                        "id": "n",
                        "type": "entities-number-chart",
                        "calculationBy": "property",
                        "func": "sum",
                    }
                ]
            ),
            "/widgets/0/widgets/0/property",
        ),
        (
            dashboard(widgets=[{"id": "p", "type": "entities-pie-chart"}]),
            "/widgets/0/widgets/0/property",
        ),
        (
            dashboard(
                widgets=[{"id": "t", "type": "table-entities-explorer", "dataset": {"rules": []}}]
            ),
            "/widgets/0/widgets/0/dataset",
        ),
        (
            dashboard(
                widgets=[{"id": "t", "type": "entities-pie-chart", "property": "x", "dataset": 3}]
            ),
            "/widgets/0/widgets/0/dataset",
        ),
        (dashboard(widgets=[{"id": "l", "type": "line-chart"}]), "/widgets/0/widgets/0/blueprint"),
        (
            dashboard(
                widgets=[{"id": "s", "type": "scorecard-compliance", "blueprint": "service"}]
            ),
            "/widgets/0/widgets/0/scorecard",
        ),
        (dashboard(widgets=[{"id": "i", "type": "iframe-widget"}]), "/widgets/0/widgets/0/url"),
        (
            {
                **dashboard(),
                "widgets": [
                    {
                        "id": "d",
                        "type": "dashboard-widget",
                        "widgets": [{"id": "m", "type": "markdown"}],
                        "layout": [{"columns": [{"id": ["m"]}]}, "row"],
                    }
                ],
            },
            "/widgets/0/layout/0/columns/0/id",
        ),
    ],
)
async def test_a_bad_page_is_refused_by_pointer_and_nothing_is_written(
    client: httpx.AsyncClient, make_org: OrgFactory, body: dict[str, Any], pointer: str
) -> None:
    org = await make_org()
    error = _error(await _post(client, org, "/v1/pages", body), 422)
    assert pointer in [d["pointer"] for d in error["details"]], error
    assert (await client.get("/v1/pages", headers=org.headers)).json()["pages"] == []


async def test_a_page_body_that_is_not_an_object_is_refused(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    _error(await _post(client, org, "/v1/pages", [dashboard()]), 422)
    await _post(client, org, "/v1/pages", dashboard())
    _error(await client.patch("/v1/pages/eng", json="x", headers=org.headers), 422)


async def test_a_bad_change_leaves_the_page_as_it_was(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    before = (await _post(client, org, "/v1/pages", dashboard())).json()["page"]
    bad = {"title": "New", "widgets": [{"id": "x", "type": "nope"}]}
    _error(await client.patch("/v1/pages/eng", json=bad, headers=org.headers), 422)
    _error(
        await client.patch("/v1/pages/eng", json={"identifier": "other"}, headers=org.headers), 422
    )
    _error(
        await client.patch(
            "/v1/pages/eng", json={"type": "blueprint-entities"}, headers=org.headers
        ),
        422,
    )
    _error(await client.patch("/v1/pages/ghost", json={"title": "x"}, headers=org.headers), 404)
    assert (await client.get("/v1/pages/eng", headers=org.headers)).json()["page"] == before


async def test_page_and_widget_changes_are_in_the_audit_log(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    two = [{"id": "a", "type": "markdown"}, {"id": "b", "type": "markdown"}]
    await _post(client, org, "/v1/pages", dashboard("eng", two))
    await client.patch("/v1/pages/eng/widgets/b", json={"title": "B"}, headers=org.headers)
    await client.patch(
        "/v1/pages/eng/permissions", json={"read": {"roles": []}}, headers=org.headers
    )
    await client.delete("/v1/pages/eng/widgets/a", headers=org.headers)
    r = await client.get("/v1/audit-log?resources=page&resources=page-widget", headers=org.headers)
    assert r.status_code == 200, r.text
    kinds = [(a["resourceType"], a["action"], a["identifier"]) for a in r.json()["audits"]]
    # Newest first; a widget change touches only the widgets that change: removing `a`
    # took its row out of the dashboard-widget's layout and moved `b` up.
    assert sorted(kinds[:3]) == [
        ("page-widget", "DELETE", "a"),
        ("page-widget", "UPDATE", "b"),
        ("page-widget", "UPDATE", "eng-board"),
    ], kinds
    assert kinds[3:5] == [("page", "UPDATE", "eng"), ("page-widget", "UPDATE", "b")], kinds
    assert sorted(kinds[5:]) == [
        ("page", "CREATE", "eng"),
        ("page-widget", "CREATE", "a"),
        ("page-widget", "CREATE", "b"),
        ("page-widget", "CREATE", "eng-board"),
    ], kinds


# -- widgets ----------------------------------------------------------------------------------


async def test_widgets_are_added_changed_and_removed_one_at_a_time(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _post(client, org, "/v1/pages", dashboard())
    r = await _post(
        client, org, "/v1/pages/eng/widgets", {"id": "note", "type": "markdown", "markdown": "a"}
    )
    assert r.status_code == 201 and r.json()["identifier"] == "note", r.text
    board = (await client.get("/v1/pages/eng", headers=org.headers)).json()["page"]["widgets"][0]
    assert [w["id"] for w in board["widgets"]] == ["intro", "note"]
    assert board["layout"][-1]["columns"] == [{"id": "note", "size": 12}]

    r = await client.patch(
        "/v1/pages/eng/widgets/note", json={"markdown": "b", "title": "T"}, headers=org.headers
    )
    assert r.status_code == 200 and r.json() == {"ok": True, "identifier": "note"}, r.text
    board = (await client.get("/v1/pages/eng", headers=org.headers)).json()["page"]["widgets"][0]
    assert board["widgets"][1] == {"id": "note", "type": "markdown", "markdown": "b", "title": "T"}

    r = await client.delete("/v1/pages/eng/widgets/note", headers=org.headers)
    assert r.status_code == 200, r.text
    board = (await client.get("/v1/pages/eng", headers=org.headers)).json()["page"]["widgets"][0]
    assert [w["id"] for w in board["widgets"]] == ["intro"]
    assert all(c["id"] != "note" for row in board["layout"] for c in row["columns"])

    # Removing the dashboard wrapper takes what it holds with it.
    r = await client.delete("/v1/pages/eng/widgets/eng-board", headers=org.headers)
    assert r.status_code == 200, r.text
    assert (await client.get("/v1/pages/eng", headers=org.headers)).json()["page"]["widgets"] == []
    _error(await _data(client, org.headers, "eng", "intro"), 404, "widget_not_found")


async def test_a_widget_on_a_page_without_a_dashboard_goes_at_the_end(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _post(
        client,
        org,
        "/v1/pages",
        {"identifier": "plain", "widgets": [{"id": "a", "type": "markdown"}]},
    )
    r = await _post(client, org, "/v1/pages/plain/widgets", {"id": "b", "type": "markdown"})
    assert r.status_code == 201, r.text
    widgets = (await client.get("/v1/pages/plain", headers=org.headers)).json()["page"]["widgets"]
    assert [w["id"] for w in widgets] == ["a", "b"]


async def test_bad_widget_changes_are_refused_and_change_nothing(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    before = (await _post(client, org, "/v1/pages", dashboard())).json()["page"]
    for path, body, status in (
        ("/v1/pages/eng/widgets", {"id": "intro", "type": "markdown"}, 422),  # id taken
        ("/v1/pages/eng/widgets", {"id": "x", "type": "gauge"}, 422),
        ("/v1/pages/eng/widgets", {"type": "markdown"}, 422),
        ("/v1/pages/eng/widgets", [1], 422),
        ("/v1/pages/ghost/widgets", {"id": "x", "type": "markdown"}, 404),
    ):
        _error(await client.post(path, json=body, headers=org.headers), status)
    for path, body, status in (
        ("/v1/pages/eng/widgets/intro", {"id": "renamed"}, 422),
        ("/v1/pages/eng/widgets/intro", {"type": "gauge"}, 422),
        ("/v1/pages/eng/widgets/intro", {"markdown": 5}, 422),
        ("/v1/pages/eng/widgets/ghost", {"title": "x"}, 404),
        ("/v1/pages/ghost/widgets/intro", {"title": "x"}, 404),
    ):
        _error(await client.patch(path, json=body, headers=org.headers), status)
    _error(
        await client.delete("/v1/pages/eng/widgets/ghost", headers=org.headers),
        404,
        "widget_not_found",
    )
    assert (await client.get("/v1/pages/eng", headers=org.headers)).json()["page"] == before


async def test_pages_and_widgets_are_capped_per_org_and_per_page(
    client: httpx.AsyncClient, make_org: OrgFactory, app: FastAPI
) -> None:
    org = await make_org()
    original = app.state.settings
    app.state.settings = original.model_copy(update={"pages_max_per_org": 2, "page_widgets_max": 3})
    try:
        two = [{"id": "a", "type": "markdown"}, {"id": "b", "type": "markdown"}]
        assert (await _post(client, org, "/v1/pages", dashboard("one", two))).status_code == 201
        assert (await _post(client, org, "/v1/pages", dashboard("two"))).status_code == 201
        _error(await _post(client, org, "/v1/pages", dashboard("three")), 422, "limit_reached")
        # A page holds at most 3 widgets: the wrapper and two.
        r = await _post(client, org, "/v1/pages/one/widgets", {"id": "c", "type": "markdown"})
        _error(r, 422)
        three = [*two, {"id": "c", "type": "markdown"}]
        r = await client.patch("/v1/pages/two", json=dashboard("two", three), headers=org.headers)
        _error(r, 422)
        other = await make_org()  # another org's cap is its own
        assert (await _post(client, other, "/v1/pages", dashboard("three"))).status_code == 201
    finally:
        app.state.settings = original


async def test_widgets_added_at_once_are_all_kept(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _post(client, org, "/v1/pages", dashboard())
    answers = await asyncio.gather(
        *(
            _post(client, org, "/v1/pages/eng/widgets", {"id": f"w{i}", "type": "markdown"})
            for i in range(8)
        )
    )
    assert [r.status_code for r in answers] == [201] * 8, [r.text for r in answers]
    board = (await client.get("/v1/pages/eng", headers=org.headers)).json()["page"]["widgets"][0]
    assert sorted(w["id"] for w in board["widgets"]) == [
        "intro",
        *sorted(f"w{i}" for i in range(8)),
    ]
    assert len(board["layout"]) == 9


async def test_pages_created_at_once_stop_at_the_cap(
    client: httpx.AsyncClient, make_org: OrgFactory, app: FastAPI
) -> None:
    org = await make_org()
    original = app.state.settings
    app.state.settings = original.model_copy(update={"pages_max_per_org": 3})
    try:
        answers = await asyncio.gather(
            *(_post(client, org, "/v1/pages", dashboard(f"p{i}")) for i in range(6))
        )
    finally:
        app.state.settings = original
    assert sorted(r.status_code for r in answers) == [201, 201, 201, 422, 422, 422]
    assert len((await client.get("/v1/pages", headers=org.headers)).json()["pages"]) == 3


# -- widget data ----------------------------------------------------------------------------


async def test_a_number_widget_counts_and_aggregates_its_entities(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _catalog(client, org, scorecard=False)
    tier1 = [{"property": "tier", "operator": "=", "value": "tier-1"}]
    count = {"id": "n1", "type": "entities-number-chart", "blueprint": "service", "dataset": tier1}
    assert (await _widget_data(client, org, count))["value"] == 3
    total = {
        "id": "n2",
        "type": "entities-number-chart",
        "blueprint": "service",
        "calculationBy": "property",
        "func": "sum",
        "property": "coverage",
    }
    assert (await _widget_data(client, org, total))["value"] == 235
    average = {
        **total,
        "id": "n3",
        "func": "average",
        "dataset": {"combinator": "and", "rules": tier1},
    }
    data = await _widget_data(client, org, average)
    assert data == {
        "ok": True,
        "widget": "n3",
        "type": "entities-number-chart",
        "func": "average",
        "value": 61.666666666666664,
    }


async def test_a_pie_widget_counts_the_values_of_a_property(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _catalog(client, org, scorecard=False)
    pie = {
        "id": "pie",
        "type": "entities-pie-chart",
        "property": "property#language",
        "dataset": SERVICES,
    }
    values = (await _widget_data(client, org, pie))["values"]
    assert values == [
        {"value": "go", "count": 2},
        {"value": "python", "count": 2},
        {"value": None, "count": 1},
    ]
    teams = {
        "id": "teams",
        "type": "entities-pie-chart",
        "property": "$team",
        "blueprint": "service",
    }
    values = (await _widget_data(client, org, teams))["values"]
    assert values == [{"value": "alpha", "count": 2}, {"value": "beta", "count": 2}]


async def test_a_pie_widget_counts_scorecard_levels_and_rule_results(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _catalog(client, org)
    levels = {
        "id": "lv",
        "type": "entities-pie-chart",
        "property": "scorecard#ready",
        "dataset": SERVICES,
    }
    values = (await _widget_data(client, org, levels))["values"]
    # a: Gold; b, e: Bronze (language, coverage < 80 or none); c: Gold; d: Basic.
    assert sorted((v["value"], v["count"]) for v in values) == [
        ("Basic", 1),
        ("Bronze", 2),
        ("Gold", 2),
    ]
    rule = {
        "id": "rl",
        "type": "entities-pie-chart",
        "property": "scorecard-rule#ready#covered",
        "dataset": SERVICES,
    }
    values = (await _widget_data(client, org, rule))["values"]
    assert values == [{"value": False, "count": 3}, {"value": True, "count": 2}]


async def test_a_table_widget_is_a_search_read_page_by_page(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _catalog(client, org, scorecard=False)
    table = {
        "id": "tbl",
        "type": "table-entities-explorer",
        "dataset": {
            "combinator": "and",
            "rules": [
                {"property": "$blueprint", "operator": "=", "value": "service"},
                {"property": "tier", "operator": "=", "value": "tier-1"},
            ],
        },
    }
    first = await _widget_data(client, org, table, {"limit": 2})
    assert [e["identifier"] for e in first["entities"]] == ["a", "c"]
    assert first["blueprint"] == "service" and first["entities"][0]["properties"]["coverage"] == 90
    r = await _data(client, org.headers, "p-tbl", "tbl", {"limit": 2, "from": first["next"]})
    assert r.status_code == 200, r.text
    assert [e["identifier"] for e in r.json()["entities"]] == ["d"] and "next" not in r.json()


async def test_a_compliance_widget_counts_levels_by_team_and_by_tier(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _catalog(client, org)
    widget = {
        "id": "cmp",
        "type": "scorecard-compliance",
        "blueprint": "service",
        "scorecard": "ready",
    }
    data = await _widget_data(client, org, widget)
    assert data["levels"] == ["Basic", "Bronze", "Gold"] and data["groupBy"] == "$team"
    by_team = {g["value"]: (g["entities"], g["levels"]) for g in data["groups"]}
    assert by_team == {
        "alpha": (2, {"Basic": 0, "Bronze": 1, "Gold": 1}),
        "beta": (2, {"Basic": 1, "Bronze": 0, "Gold": 1}),
        None: (1, {"Basic": 0, "Bronze": 1, "Gold": 0}),
    }
    tiers = await _widget_data(client, org, {**widget, "id": "tier", "groupBy": "tier"})
    by_tier = {g["value"]: g["levels"] for g in tiers["groups"]}
    assert by_tier == {
        "tier-1": {"Basic": 1, "Bronze": 0, "Gold": 2},
        "tier-2": {"Basic": 0, "Bronze": 2, "Gold": 0},
    }


async def test_markdown_and_iframe_widgets_answer_what_they_hold(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    assert (await _widget_data(client, org, {"id": "md", "type": "markdown", "markdown": "# T"}))[
        "markdown"
    ] == "# T"
    frame = {"id": "fr", "type": "iframe-widget", "url": "https://example.com/x"}
    assert (await _widget_data(client, org, frame))["url"] == "https://example.com/x"


def _line_totals(data: dict[str, Any]) -> dict[str, float]:
    """Each line's values summed over the buckets (nulls left out)."""
    totals: dict[str, float] = {}
    for point in data["data"]:
        for key, value in point.items():
            if key != "date" and value is not None:
                totals[key] = totals.get(key, 0) + value
    return totals


LINE = {
    "id": "ln",
    "type": "line-chart",
    "blueprint": "service",
    "timeInterval": "day",
    "timeRange": {"preset": "lastWeek", "timeZone": "Europe/Paris"},
    "measureTimeBy": "$createdAt",
}


async def test_a_line_chart_counts_entities_over_time(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _catalog(client, org, scorecard=False)
    data = await _widget_data(client, org, {**LINE, "func": "count"})
    assert data["type"] == "line-chart" and data["minDate"] < data["maxDate"]
    assert len(data["data"]) >= 7 and all("date" in p for p in data["data"])
    # Every entity was created today: the last bucket holds them all.
    assert data["data"][-1]["count"] == 5 and _line_totals(data) == {"count": 5}
    tier1 = {
        **LINE,
        "id": "t1",
        "dataset": [{"property": "tier", "operator": "=", "value": "tier-1"}],
    }
    assert _line_totals(await _widget_data(client, org, tier1)) == {"count": 3}


async def test_a_line_chart_aggregates_properties_and_breaks_counts_down(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _catalog(client, org, scorecard=False)
    top = {**LINE, "id": "top", "properties": ["coverage"], "func": "max", "timeInterval": "week"}
    data = await _widget_data(client, org, top)
    assert data["data"][-1]["coverage"] == 90
    split = {**LINE, "id": "split", "func": "count", "breakdownProperty": "tier"}
    assert _line_totals(await _widget_data(client, org, split)) == {"tier-1": 3, "tier-2": 2}


async def test_a_line_chart_that_cannot_be_drawn_is_a_422(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _catalog(client, org, scorecard=False)
    for bad, pointer in (
        ({"timeInterval": "fortnight"}, "/widgets/0/widgets/0/timeInterval"),
        ({"aggregationType": "histogram"}, "/widgets/0/widgets/0/aggregationType"),
        ({"properties": []}, "/widgets/0/widgets/0/properties"),
        ({"timeRange": "lastWeek"}, "/widgets/0/widgets/0/timeRange"),
    ):
        error = _error(
            await _post(client, org, "/v1/pages", dashboard("bad", [{**LINE, **bad}])), 422
        )
        assert pointer in [d["pointer"] for d in error["details"]], error
    later = [
        {**LINE, "id": "ghostProp", "properties": ["ghost"]},
        {**LINE, "id": "textProp", "properties": ["language"]},
        {**LINE, "id": "ghostTime", "measureTimeBy": "ghost"},
        {**LINE, "id": "ghostBp", "blueprint": "ghost"},
        {**LINE, "id": "badZone", "timeRange": {"preset": "lastWeek", "timeZone": "Mars/Base"}},
    ]
    assert (await _post(client, org, "/v1/pages", dashboard("lines", later))).status_code == 201
    for widget in later:
        r = await _data(client, org.headers, "lines", widget["id"])
        assert 400 <= r.status_code < 500 and r.json()["ok"] is False, (widget["id"], r.text)


async def test_widget_data_that_cannot_be_computed_is_a_422_naming_why(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _catalog(client, org)
    widgets = [
        {
            "id": "ghostProp",
            "type": "entities-pie-chart",
            "property": "property#ghost",
            "dataset": SERVICES,
        },
        {"id": "ghostBp", "type": "entities-number-chart", "blueprint": "ghost"},
        {
            "id": "textSum",
            "type": "entities-number-chart",
            "blueprint": "service",
            "calculationBy": "property",
            "func": "sum",
            "property": "language",
        },
        {
            "id": "badRule",
            "type": "entities-pie-chart",
            "property": "language",
            "dataset": {"rules": [{"property": "language", "operator": "~", "value": 1}]},
        },
        {
            "id": "ghostCard",
            "type": "entities-pie-chart",
            "property": "scorecard#ghost",
            "dataset": SERVICES,
        },
        {
            "id": "ghostRule",
            "type": "entities-pie-chart",
            "property": "scorecard-rule#ready#ghost",
            "dataset": SERVICES,
        },
        {
            "id": "tagTier",
            "type": "scorecard-compliance",
            "blueprint": "service",
            "scorecard": "ready",
            "groupBy": "tags",
        },
        {
            "id": "ghostGroup",
            "type": "scorecard-compliance",
            "blueprint": "service",
            "scorecard": "ready",
            "groupBy": "ghost",
        },
        {"id": "ghostTable", "type": "table-entities-explorer", "blueprint": "ghost"},
    ]
    r = await _post(client, org, "/v1/pages", dashboard("broken", widgets))
    assert r.status_code == 201, r.text
    for widget in widgets:
        r = await _data(client, org.headers, "broken", widget["id"])
        assert 400 <= r.status_code < 500 and r.json()["ok"] is False, (widget["id"], r.text)
    _error(await _data(client, org.headers, "broken", "broken-board"), 422, "not_supported")
    _error(await _data(client, org.headers, "broken", "ghost"), 404, "widget_not_found")
    _error(await _data(client, org.headers, "ghost", "ghostBp"), 404, "page_not_found")
    _error(await _data(client, org.headers, "broken", "ghostBp", {"limit": 0}), 422)
    _error(await _data(client, org.headers, "broken", "ghostBp", {"page": 2}), 422)


async def test_widget_data_follows_the_catalog_as_it_changes(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _catalog(client, org, scorecard=False)
    count = {"id": "n", "type": "entities-number-chart", "blueprint": "service"}
    assert (await _widget_data(client, org, count))["value"] == 5
    await client.delete("/v1/blueprints/service/entities/a", headers=org.headers)
    assert (await _data(client, org.headers, "p-n", "n")).json()["value"] == 4


async def test_a_renamed_property_is_carried_into_the_widgets_that_read_it(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _catalog(client, org, scorecard=False)
    other = {
        "identifier": "other",
        "title": "Other",
        "schema": {"properties": {"coverage": {"type": "number"}}},
    }
    assert (await _post(client, org, "/v1/blueprints", other)).status_code == 201
    tier1 = {
        "combinator": "and",
        "rules": [{"property": "tier", "operator": "=", "value": "tier-1"}],
    }
    widgets = [
        {
            "id": "sum",
            "type": "entities-number-chart",
            "blueprint": "service",
            "calculationBy": "property",
            "func": "sum",
            "property": "coverage",
            "dataset": tier1,
        },
        {
            "id": "pie",
            "type": "entities-pie-chart",
            "property": "property#tier",
            "dataset": SERVICES,
        },
        {**LINE, "id": "line", "properties": ["coverage"], "func": "max"},
        {
            "id": "elsewhere",
            "type": "entities-number-chart",
            "blueprint": "other",
            "calculationBy": "property",
            "func": "sum",
            "property": "coverage",
        },
    ]
    assert (await _post(client, org, "/v1/pages", dashboard("eng", widgets))).status_code == 201
    for old, new in (("coverage", "cov"), ("tier", "level")):
        r = await client.patch(
            f"/v1/blueprints/service/properties/{old}/rename",
            json={"newPropertyName": new},
            headers=org.headers,
        )
        assert r.status_code == 200, r.text
    held = (await client.get("/v1/pages/eng", headers=org.headers)).json()["page"]["widgets"][0]
    by_id = {w["id"]: w for w in held["widgets"]}
    assert by_id["sum"]["property"] == "cov"
    assert by_id["sum"]["dataset"]["rules"][0]["property"] == "level"
    assert by_id["pie"]["property"] == "property#level"
    assert by_id["line"]["properties"] == ["cov"]
    assert by_id["elsewhere"]["property"] == "coverage"  # another blueprint's property
    assert (await _data(client, org.headers, "eng", "sum")).json()["value"] == 185
    values = (await _data(client, org.headers, "eng", "pie")).json()["values"]
    assert values == [{"value": "tier-1", "count": 3}, {"value": "tier-2", "count": 2}]


# -- permissions -----------------------------------------------------------------------------


async def test_page_permissions_decide_who_sees_which_dashboard(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, app: FastAPI
) -> None:
    org = await make_org()
    await _catalog(client, org, scorecard=False)
    await add_user(db, org.org_id, "al@example.com", roles=["Member"], teams=["alpha"])
    await add_user(db, org.org_id, "bo@example.com", roles=["Member"], teams=["beta"])
    await add_user(db, org.org_id, "cy@example.com", roles=["Member"])
    al, bo, cy = (user_headers(app, org.org_id, f"{n}@example.com") for n in ("al", "bo", "cy"))
    count = {"id": "n", "type": "entities-number-chart", "blueprint": "service"}
    await _post(client, org, "/v1/pages", dashboard("open", [count]))
    await _post(client, org, "/v1/pages", dashboard("alphas", [count]))

    # By default every member reads a page.
    for headers in (al, bo, cy):
        listed = (await client.get("/v1/pages", headers=headers)).json()["pages"]
        assert [p["identifier"] for p in listed] == ["alphas", "open"]

    change = {"read": {"roles": [], "teams": ["alpha"], "users": ["cy@example.com"]}}
    r = await client.patch("/v1/pages/alphas/permissions", json=change, headers=org.headers)
    assert r.status_code == 200, r.text
    assert r.json()["permissions"]["read"] == change["read"]
    for headers, sees in ((al, True), (bo, False), (cy, True)):
        listed = [
            p["identifier"]
            for p in (await client.get("/v1/pages", headers=headers)).json()["pages"]
        ]
        assert listed == (["alphas", "open"] if sees else ["open"])
        r = await client.get("/v1/pages/alphas", headers=headers)
        assert r.status_code == (200 if sees else 403), r.text
        r = await _data(client, headers, "alphas", "n")
        assert r.status_code == (200 if sees else 403), r.text
        r = await client.get("/v1/pages/alphas/permissions", headers=headers)
        assert r.status_code == (200 if sees else 403), r.text
    _error(await client.get("/v1/pages/alphas", headers=bo), 403, "missing_permission")
    # Admins always see it.
    assert (await client.get("/v1/pages/alphas", headers=org.headers)).status_code == 200


async def test_a_widget_filtered_by_the_callers_teams_shows_each_reader_their_own(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, app: FastAPI
) -> None:
    org = await make_org()
    await _catalog(client, org, scorecard=False)
    await add_user(db, org.org_id, "al@example.com", roles=["Member"], teams=["alpha"])
    await add_user(db, org.org_id, "bo@example.com", roles=["Member"], teams=["beta"])
    await add_user(db, org.org_id, "cy@example.com", roles=["Member"])
    mine = {
        "id": "mine",
        "type": "table-entities-explorer",
        "blueprint": "service",
        "dataset": {
            "combinator": "and",
            "rules": [
                {
                    "property": "$team",
                    "operator": "containsAny",
                    "value": {"context": "userTeams", "property": "$identifier"},
                }
            ],
        },
    }
    odd = {
        **mine,
        "id": "odd",
        "dataset": [
            {"property": "tier", "operator": "=", "value": {"context": "user", "property": "tier"}}
        ],
    }
    await _post(client, org, "/v1/pages", dashboard("my", [mine, odd]))
    for name, expected in (("al", ["a", "b"]), ("bo", ["c", "d"]), ("cy", [])):
        headers = user_headers(app, org.org_id, f"{name}@example.com")
        r = await _data(client, headers, "my", "mine")
        assert r.status_code == 200, r.text
        assert [e["identifier"] for e in r.json()["entities"]] == expected, name
    # A machine credential has no teams of its own to stand for.
    error = _error(await _data(client, org.headers, "my", "mine"), 422)
    assert error["details"][0]["pointer"] == "/dataset/rules/0/value"
    al = user_headers(app, org.org_id, "al@example.com")
    error = _error(await _data(client, al, "my", "odd"), 422)
    assert error["details"][0]["pointer"] == "/dataset/0/value"


async def test_the_update_permission_lets_a_member_change_a_page_not_delete_it(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, app: FastAPI
) -> None:
    org = await make_org()
    await add_user(db, org.org_id, "ed@example.com", roles=["Member"], teams=["editors"])
    await add_user(db, org.org_id, "no@example.com", roles=["Member"])
    ed, no = (
        user_headers(app, org.org_id, "ed@example.com"),
        user_headers(app, org.org_id, "no@example.com"),
    )
    await _post(client, org, "/v1/pages", dashboard())
    r = await client.patch(
        "/v1/pages/eng/permissions", json={"update": {"teams": ["editors"]}}, headers=org.headers
    )
    assert r.status_code == 200, r.text
    assert r.json()["permissions"]["read"]["roles"] == ["Admin", "Member"]  # left as it was

    assert (
        await client.patch("/v1/pages/eng", json={"title": "By Ed"}, headers=ed)
    ).status_code == 200
    assert (
        await client.post("/v1/pages/eng/widgets", json={"id": "w", "type": "markdown"}, headers=ed)
    ).status_code == 201
    assert (
        await client.patch("/v1/pages/eng/widgets/w", json={"title": "x"}, headers=ed)
    ).status_code == 200
    assert (await client.delete("/v1/pages/eng/widgets/w", headers=ed)).status_code == 200
    for method, path, body in (
        ("PATCH", "/v1/pages/eng", {"title": "By No"}),
        ("POST", "/v1/pages/eng/widgets", {"id": "v", "type": "markdown"}),
        ("PATCH", "/v1/pages/eng/widgets/intro", {"title": "x"}),
        ("DELETE", "/v1/pages/eng/widgets/intro", None),
    ):
        _error(await client.request(method, path, json=body, headers=no), 403, "missing_permission")
    for headers in (ed, no):
        _error(await client.delete("/v1/pages/eng", headers=headers), 403, "missing_permission")
        _error(
            await client.post("/v1/pages", json=dashboard("mine"), headers=headers),
            403,
            "missing_permission",
        )
        r = await client.patch(
            "/v1/pages/eng/permissions", json={"read": {"roles": []}}, headers=headers
        )
        _error(r, 403, "missing_permission")
    assert (await client.get("/v1/pages/eng", headers=org.headers)).json()["page"][
        "title"
    ] == "By Ed"


async def test_a_member_credential_reads_pages_but_cannot_manage_them(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _post(client, org, "/v1/pages", dashboard())
    member = await app_headers(client, db, org.org_id, ["Member"])
    assert (await client.get("/v1/pages/eng", headers=member)).status_code == 200
    _error(
        await client.post("/v1/pages", json=dashboard("x"), headers=member),
        403,
        "missing_permission",
    )
    _error(await client.delete("/v1/pages/eng", headers=member), 403, "missing_permission")


@pytest.mark.parametrize(
    ("body", "pointer"),
    [
        ({"read": {"teams": ["nobody"]}}, "/read/teams"),
        ({"read": {"users": ["ghost@example.com"]}}, "/read/users"),
        ({"update": {"roles": ["Overlord"]}}, "/update/roles"),
        ({"write": {"roles": []}}, "/write"),
        ({"read": {"roles": "Admin"}}, "/read/roles"),
        ({"read": {"ownedByTeam": True}}, "/read/ownedByTeam"),
        ({"read": []}, "/read"),
    ],
)
async def test_bad_page_permissions_are_refused_and_change_nothing(
    client: httpx.AsyncClient, make_org: OrgFactory, body: dict[str, Any], pointer: str
) -> None:
    org = await make_org()
    await _post(client, org, "/v1/pages", dashboard())
    before = (await client.get("/v1/pages/eng/permissions", headers=org.headers)).json()
    error = _error(
        await client.patch("/v1/pages/eng/permissions", json=body, headers=org.headers), 422
    )
    assert pointer in [d["pointer"] for d in error["details"]], error
    assert (await client.get("/v1/pages/eng/permissions", headers=org.headers)).json() == before
    _error(await client.patch("/v1/pages/ghost/permissions", json={}, headers=org.headers), 404)
    _error(await client.get("/v1/pages/ghost/permissions", headers=org.headers), 404)


async def test_a_renamed_team_keeps_its_page_permissions(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _post(client, org, "/v1/teams", {"name": "alpha"})
    await _post(client, org, "/v1/pages", dashboard())
    await client.patch(
        "/v1/pages/eng/permissions", json={"read": {"teams": ["alpha"]}}, headers=org.headers
    )
    r = await client.patch("/v1/teams/alpha", json={"name": "omega"}, headers=org.headers)
    assert r.status_code == 200, r.text
    got = (await client.get("/v1/pages/eng/permissions", headers=org.headers)).json()
    assert got["permissions"]["read"]["teams"] == ["omega"]


# -- catalog pages ---------------------------------------------------------------------------


async def test_a_blueprint_made_with_create_catalog_page_gets_its_catalog_page(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    r = await client.post(
        "/v1/blueprints", params={"create_catalog_page": "true"}, json=SERVICE, headers=org.headers
    )
    assert r.status_code == 201, r.text
    page = (await client.get("/v1/pages/service", headers=org.headers)).json()["page"]
    assert page["type"] == "blueprint-entities" and page["blueprint"] == "service"
    assert page["title"] == "Service"
    table = page["widgets"][0]
    assert table["type"] == "table-entities-explorer"
    await _post(client, org, "/v1/blueprints/service/entities", {"identifier": "s1"})
    r = await _data(client, org.headers, "service", table["id"])
    assert [e["identifier"] for e in r.json()["entities"]] == ["s1"]
    # Without the parameter (or false), no page is made.
    other = {**SERVICE, "identifier": "other", "title": "Other"}
    assert (await _post(client, org, "/v1/blueprints", other)).status_code == 201
    _error(await client.get("/v1/pages/other", headers=org.headers), 404)


async def test_a_deleted_blueprint_takes_its_catalog_page_and_leaves_dashboards(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    r = await client.post(
        "/v1/blueprints", params={"create_catalog_page": "true"}, json=SERVICE, headers=org.headers
    )
    assert r.status_code == 201, r.text
    count = {"id": "n", "type": "entities-number-chart", "blueprint": "service"}
    await _post(client, org, "/v1/pages", dashboard("eng", [count]))
    other = await make_org()  # another org's page of that name is its own
    await _post(client, other, "/v1/blueprints", SERVICE)
    await client.post(
        "/v1/pages",
        json={"identifier": "service", "type": "blueprint-entities", "blueprint": "service"},
        headers=other.headers,
    )
    assert (await client.delete("/v1/blueprints/service", headers=org.headers)).status_code == 200
    _error(await client.get("/v1/pages/service", headers=org.headers), 404, "page_not_found")
    assert (await client.get("/v1/pages/eng", headers=org.headers)).status_code == 200
    _error(await _data(client, org.headers, "eng", "n"), 422)
    assert (await client.get("/v1/pages/service", headers=other.headers)).status_code == 200


async def test_a_catalog_page_that_cannot_be_made_leaves_no_blueprint(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _post(client, org, "/v1/pages", dashboard("service"))
    r = await client.post(
        "/v1/blueprints", params={"create_catalog_page": "true"}, json=SERVICE, headers=org.headers
    )
    _error(r, 409, "page_exists")
    _error(await client.get("/v1/blueprints/service", headers=org.headers), 404)


ROUTES = [
    ("GET", "/v1/pages"),
    ("POST", "/v1/pages"),
    ("GET", "/v1/pages/eng"),
    ("PATCH", "/v1/pages/eng"),
    ("DELETE", "/v1/pages/eng"),
    ("GET", "/v1/pages/eng/permissions"),
    ("PATCH", "/v1/pages/eng/permissions"),
    ("POST", "/v1/pages/eng/widgets"),
    ("PATCH", "/v1/pages/eng/widgets/intro"),
    ("DELETE", "/v1/pages/eng/widgets/intro"),
    ("POST", "/v1/pages/eng/widgets/intro/data"),
]


async def test_every_pages_route_needs_a_token_and_takes_no_unknown_parameter(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _post(client, org, "/v1/pages", dashboard())
    for method, path in ROUTES:
        body = {} if method in ("POST", "PATCH") else None
        _error(await client.request(method, path, json=body), 401)
        bad = {"Authorization": "Bearer not-a-token"}
        _error(await client.request(method, path, json=body, headers=bad), 401)
        r = await client.request(
            method, path, params={"colour": "red"}, json=body, headers=org.headers
        )
        _error(r, 422, "unknown_query_parameter")
    assert (await client.get("/v1/pages/eng", headers=org.headers)).status_code == 200


# -- tenancy ----------------------------------------------------------------------------------


async def test_another_org_can_neither_see_nor_change_a_page(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org, other = await make_org(), await make_org()
    await _catalog(client, org, scorecard=False)
    count = {"id": "n", "type": "entities-number-chart", "blueprint": "service"}
    await _post(client, org, "/v1/pages", dashboard("eng", [count]))
    before = (await client.get("/v1/pages/eng", headers=org.headers)).json()
    assert (await client.get("/v1/pages", headers=other.headers)).json()["pages"] == []
    for method, path, body in (
        ("GET", "/v1/pages/eng", None),
        ("PATCH", "/v1/pages/eng", {"title": "mine"}),
        ("DELETE", "/v1/pages/eng", None),
        ("GET", "/v1/pages/eng/permissions", None),
        ("PATCH", "/v1/pages/eng/permissions", {"read": {"roles": []}}),
        ("POST", "/v1/pages/eng/widgets", {"id": "x", "type": "markdown"}),
        ("PATCH", "/v1/pages/eng/widgets/n", {"title": "x"}),
        ("DELETE", "/v1/pages/eng/widgets/n", None),
        ("POST", "/v1/pages/eng/widgets/n/data", None),
    ):
        r = await client.request(method, path, json=body, headers=other.headers)
        _error(r, 404, "page_not_found")
    assert (await client.get("/v1/pages/eng", headers=org.headers)).json() == before
    # The other org's own page of the same name is its own, and reads its own catalog.
    await _post(client, other, "/v1/blueprints", SERVICE)
    assert (await _post(client, other, "/v1/pages", dashboard("eng", [count]))).status_code == 201
    assert (await _data(client, other.headers, "eng", "n")).json()["value"] == 0
    assert (await _data(client, org.headers, "eng", "n")).json()["value"] == 5
