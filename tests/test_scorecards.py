"""Scorecards: Port's definitions and routes, level semantics evaluated in SQL, results on
entities kept current by writes and by the background evaluation, and tenancy."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx

from app.config import Settings
from app.db.database import Database
from app.scorecards.evaluate import evaluate_pending
from tests.conftest import Org, OrgFactory

SERVICE = {
    "identifier": "service",
    "title": "Service",
    "schema": {
        "properties": {
            "owner": {"type": "string"},
            "coverage": {"type": "number"},
            "onCall": {"type": "boolean"},
            "tier": {"type": "string"},
        }
    },
    "relations": {"team": {"target": "team", "required": False, "many": False}},
}

READINESS = {
    "identifier": "readiness",
    "title": "Production readiness",
    "rules": [
        {
            "identifier": "hasOwner",
            "title": "Has an owner",
            "level": "Bronze",
            "query": {
                "combinator": "and",
                "conditions": [{"property": "owner", "operator": "isNotEmpty"}],
            },
        },
        {
            "identifier": "covered",
            "title": "Coverage over 50",
            "level": "Silver",
            "query": {
                "combinator": "and",
                "conditions": [{"property": "coverage", "operator": ">", "value": 50}],
            },
        },
        {
            "identifier": "onCall",
            "title": "On call",
            "level": "Silver",
            "query": {
                "combinator": "and",
                "conditions": [{"property": "onCall", "operator": "=", "value": True}],
            },
        },
        {
            "identifier": "hasTeam",
            "title": "Belongs to a team",
            "level": "Gold",
            "query": {
                "combinator": "and",
                "conditions": [{"relation": "team", "operator": "isEmpty", "not": True}],
            },
        },
    ],
}


async def _post(client: httpx.AsyncClient, org: Org, path: str, body: Any) -> httpx.Response:
    return await client.post(path, json=body, headers=org.headers)


async def _catalog(client: httpx.AsyncClient, org: Org) -> None:
    for body in ({"identifier": "team", "title": "Team", "schema": {"properties": {}}}, SERVICE):
        r = await _post(client, org, "/v1/blueprints", body)
        assert r.status_code == 201, r.text
    r = await _post(
        client, org, "/v1/blueprints/team/entities/bulk", {"entities": [{"identifier": "core"}]}
    )
    assert r.status_code == 200, r.text
    entities = [
        # every rule: Gold
        {
            "identifier": "gold",
            "properties": {"owner": "ana", "coverage": 90, "onCall": True},
            "relations": {"team": "core"},
        },
        # Bronze and Silver, no team: Silver
        {"identifier": "silver", "properties": {"owner": "bo", "coverage": 70, "onCall": True}},
        # Silver's rules and Gold's, but no owner: stays at the base level
        {
            "identifier": "basic",
            "properties": {"coverage": 99, "onCall": True},
            "relations": {"team": "core"},
        },
        # an owner only: Bronze
        {"identifier": "bronze", "properties": {"owner": "cy", "coverage": 10}},
    ]
    r = await _post(client, org, "/v1/blueprints/service/entities/bulk", {"entities": entities})
    assert r.status_code == 200, r.text


async def _graded(client: httpx.AsyncClient, make_org: OrgFactory, db: Database) -> Org:
    """An org with the catalog and READINESS, evaluated."""
    org = await make_org()
    await _catalog(client, org)
    r = await _post(client, org, "/v1/blueprints/service/scorecards", READINESS)
    assert r.status_code == 201, r.text
    await evaluate_pending(db)
    return org


async def _levels(client: httpx.AsyncClient, org: Org, scorecard: str) -> dict[str, str | None]:
    r = await client.get("/v1/blueprints/service/entities", headers=org.headers)
    assert r.status_code == 200, r.text
    return {
        e["identifier"]: (e.get("scorecards") or {}).get(scorecard, {}).get("level")
        for e in r.json()["entities"]
    }


async def test_scorecard_routes_in_ports_shapes(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _catalog(client, org)
    r = await _post(client, org, "/v1/blueprints/service/scorecards", READINESS)
    assert r.status_code == 201, r.text
    created = r.json()["scorecard"]
    assert created["identifier"] == "readiness" and created["blueprint"] == "service"
    assert [level["title"] for level in created["levels"]] == ["Basic", "Bronze", "Silver", "Gold"]
    assert created["levels"][0]["color"] == "paleBlue" and created["state"] == "evaluating"
    assert [rule["identifier"] for rule in created["rules"]] == [
        "hasOwner",
        "covered",
        "onCall",
        "hasTeam",
    ]
    for key in ("createdAt", "createdBy", "updatedAt", "updatedBy"):
        assert created[key]
    again = await _post(client, org, "/v1/blueprints/service/scorecards", READINESS)
    assert again.status_code == 409 and again.json()["ok"] is False
    one = await client.get("/v1/blueprints/service/scorecards/readiness", headers=org.headers)
    assert one.status_code == 200 and one.json()["scorecard"]["title"] == "Production readiness"
    listed = await client.get("/v1/blueprints/service/scorecards", headers=org.headers)
    assert [s["identifier"] for s in listed.json()["scorecards"]] == ["readiness"]
    every = await client.get("/v1/scorecards", headers=org.headers)
    assert [s["identifier"] for s in every.json()["scorecards"]] == ["readiness"]
    renamed = await client.put(
        "/v1/blueprints/service/scorecards/readiness",
        json={**READINESS, "title": "Readiness"},
        headers=org.headers,
    )
    assert renamed.status_code == 200 and renamed.json()["scorecard"]["title"] == "Readiness"
    # PUT on the collection: the given set becomes the whole set.
    docs = {**READINESS, "identifier": "docs", "title": "Docs", "rules": []}
    r = await client.put("/v1/blueprints/service/scorecards", json=[docs], headers=org.headers)
    assert r.status_code == 200, r.text
    assert [s["identifier"] for s in r.json()["scorecards"]] == ["docs"]
    gone = await client.get("/v1/blueprints/service/scorecards/readiness", headers=org.headers)
    assert gone.status_code == 404 and gone.json()["error"] == "not_found"
    r = await client.delete("/v1/blueprints/service/scorecards/docs", headers=org.headers)
    assert r.status_code == 200 and r.json() == {"ok": True}
    r = await client.delete("/v1/blueprints/service/scorecards/docs", headers=org.headers)
    assert r.status_code == 404
    r = await client.get("/v1/blueprints/nope/scorecards", headers=org.headers)
    assert r.status_code == 404


async def test_a_definition_that_cannot_apply_is_a_422_naming_it(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _catalog(client, org)

    def with_rule(**changes: Any) -> dict[str, Any]:
        rule = {**READINESS["rules"][1], **changes}  # type: ignore[index]
        return {**READINESS, "rules": [rule]}

    cases = [
        (with_rule(level="Platinum"), "/rules/0/level"),
        (with_rule(level="Basic"), "/rules/0/level"),
        (
            with_rule(
                query={
                    "combinator": "and",
                    "conditions": [{"property": "nope", "operator": "=", "value": 1}],
                }
            ),
            "/rules/0/query/conditions/0/property",
        ),
        (
            with_rule(
                query={
                    "combinator": "and",
                    "conditions": [{"property": "onCall", "operator": ">", "value": 1}],
                }
            ),
            "/rules/0/query/conditions/0/operator",
        ),
        (
            with_rule(
                query={
                    "combinator": "and",
                    "conditions": [{"property": "coverage", "operator": ">", "value": "high"}],
                }
            ),
            "/rules/0/query/conditions/0/value",
        ),
        (with_rule(query={"combinator": "and", "conditions": []}), "/rules/0/query/conditions"),
        ({**READINESS, "levels": [{"title": "Only", "color": "nope"}]}, "/levels/0/color"),
        (
            {
                **READINESS,
                "filter": {
                    "combinator": "and",
                    "conditions": [{"property": "tier", "operator": ">", "value": 1}],
                },
            },
            "/filter/conditions/0/operator",
        ),
        ({**READINESS, "identifier": "bad id!"}, "/identifier"),
    ]
    for body, pointer in cases:
        r = await _post(client, org, "/v1/blueprints/service/scorecards", body)
        assert r.status_code == 422, (pointer, r.text)
        assert pointer in [d["pointer"] for d in r.json()["details"]], (pointer, r.text)
    r = await client.get("/v1/blueprints/service/scorecards", headers=org.headers)
    assert r.json()["scorecards"] == []


async def test_levels_are_reached_only_with_every_lower_level(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _catalog(client, org)
    r = await _post(client, org, "/v1/blueprints/service/scorecards", READINESS)
    assert r.status_code == 201, r.text
    assert await evaluate_pending(db) >= 1
    state = await client.get("/v1/blueprints/service/scorecards/readiness", headers=org.headers)
    assert state.json()["scorecard"]["state"] == "ready"
    assert await _levels(client, org, "readiness") == {
        "gold": "Gold",
        "silver": "Silver",
        "basic": "Basic",
        "bronze": "Bronze",
    }
    r = await client.get("/v1/blueprints/service/entities/basic", headers=org.headers)
    result = r.json()["entity"]["scorecards"]["readiness"]
    assert result["level"] == "Basic"
    assert result["rules"] == [
        {"identifier": "hasOwner", "status": "FAILURE", "level": "Bronze"},
        {"identifier": "covered", "status": "SUCCESS", "level": "Silver"},
        {"identifier": "onCall", "status": "SUCCESS", "level": "Silver"},
        {"identifier": "hasTeam", "status": "SUCCESS", "level": "Gold"},
    ]


async def test_entity_writes_keep_results_current(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await _graded(client, make_org, db)
    # No background step: the write itself re-evaluates.
    r = await client.patch(
        "/v1/blueprints/service/entities/gold",
        json={"properties": {"coverage": 20}},
        headers=org.headers,
    )
    assert r.status_code == 200, r.text
    r = await _post(
        client,
        org,
        "/v1/blueprints/service/entities?upsert=true",
        {"identifier": "new", "properties": {"owner": "di"}},
    )
    assert r.status_code == 201, r.text
    r = await _post(
        client,
        org,
        "/v1/blueprints/service/entities/bulk?upsert=true&merge=true",
        {"entities": [{"identifier": "basic", "properties": {"owner": "eve"}}]},
    )
    assert r.status_code == 200, r.text
    levels = await _levels(client, org, "readiness")
    assert levels["gold"] == "Bronze" and levels["new"] == "Bronze" and levels["basic"] == "Gold"
    r = await client.delete(
        "/v1/blueprints/service/entities/new?delete_dependents=false", headers=org.headers
    )
    assert r.status_code == 200, r.text
    async with db.tenant(org.org_id) as tx:
        left = await tx.fetchval("SELECT count(*) FROM scorecard_results WHERE identifier = 'new'")
    assert left == 0


async def test_rule_edits_and_filters_are_evaluated_in_the_background(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await _graded(client, make_org, db)
    # Gold now also needs coverage above 95, and only services with an owner count.
    stricter = {
        **READINESS,
        "filter": {
            "combinator": "and",
            "conditions": [{"property": "owner", "operator": "isNotEmpty"}],
        },
        "rules": [
            *READINESS["rules"],  # type: ignore[misc]
            {
                "identifier": "excellent",
                "title": "Coverage over 95",
                "level": "Gold",
                "query": {
                    "combinator": "and",
                    "conditions": [{"property": "coverage", "operator": ">", "value": 95}],
                },
            },
        ],
    }
    r = await client.put(
        "/v1/blueprints/service/scorecards/readiness", json=stricter, headers=org.headers
    )
    assert r.status_code == 200 and r.json()["scorecard"]["state"] == "evaluating", r.text
    assert await _levels(client, org, "readiness") == {
        "gold": "Gold",  # the old results until the evaluation
        "silver": "Silver",
        "basic": "Basic",
        "bronze": "Bronze",
    }
    await evaluate_pending(db)
    assert await _levels(client, org, "readiness") == {
        "gold": "Silver",
        "silver": "Silver",
        "basic": None,  # no owner: outside the filter, no result
        "bronze": "Bronze",
    }
    # A write that brings an entity into the filter gives it a result at once.
    r = await client.patch(
        "/v1/blueprints/service/entities/basic",
        json={"properties": {"owner": "fay"}},
        headers=org.headers,
    )
    assert r.status_code == 200, r.text
    assert (await _levels(client, org, "readiness"))["basic"] == "Gold"
    # A blueprint change marks its scorecards for evaluation.
    r = await client.put(
        "/v1/blueprints/service",
        json={**SERVICE, "title": "Services"},
        headers=org.headers,
    )
    assert r.status_code == 200, r.text
    r = await client.get("/v1/blueprints/service/scorecards/readiness", headers=org.headers)
    assert r.json()["scorecard"]["state"] == "evaluating"
    await evaluate_pending(db)
    r = await client.get("/v1/blueprints/service/scorecards/readiness", headers=org.headers)
    assert r.json()["scorecard"]["state"] == "ready"


async def test_rules_over_aggregation_properties(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    """ "Has at least one deployment": a rule over an aggregation property."""
    org = await make_org()
    r = await _post(
        client,
        org,
        "/v1/blueprints",
        {"identifier": "service", "title": "Service", "schema": {"properties": {}}},
    )
    assert r.status_code == 201, r.text
    r = await _post(
        client,
        org,
        "/v1/blueprints",
        {
            "identifier": "deployment",
            "title": "Deployment",
            "schema": {"properties": {}},
            "relations": {"service": {"target": "service", "required": True, "many": False}},
        },
    )
    assert r.status_code == 201, r.text
    aggregations = {
        "deployments": {
            "title": "Deployments",
            "target": "deployment",
            "calculationSpec": {"calculationBy": "entities", "func": "count"},
        }
    }
    r = await client.patch(
        "/v1/blueprints/service",
        json={"aggregationProperties": aggregations},
        headers=org.headers,
    )
    assert r.status_code == 200, r.text
    r = await _post(
        client,
        org,
        "/v1/blueprints/service/entities/bulk",
        {"entities": [{"identifier": "api"}, {"identifier": "web"}]},
    )
    assert r.status_code == 200, r.text
    r = await _post(
        client,
        org,
        "/v1/blueprints/deployment/entities",
        {"identifier": "api-1", "relations": {"service": "api"}},
    )
    assert r.status_code == 201, r.text
    card = {
        "identifier": "shipping",
        "title": "Shipping",
        "levels": [{"title": "No", "color": "red"}, {"title": "Yes", "color": "green"}],
        "rules": [
            {
                "identifier": "deployed",
                "title": "Deployed at least once",
                "level": "Yes",
                "query": {
                    "combinator": "and",
                    "conditions": [{"property": "deployments", "operator": ">=", "value": 1}],
                },
            }
        ],
    }
    r = await _post(client, org, "/v1/blueprints/service/scorecards", card)
    assert r.status_code == 201, r.text
    await evaluate_pending(db)
    assert await _levels(client, org, "shipping") == {"api": "Yes", "web": "No"}
    # A new deployment of `web` concerns the service's scorecard: it is evaluated again
    # in the background (the service itself was not written).
    r = await _post(
        client,
        org,
        "/v1/blueprints/deployment/entities",
        {"identifier": "web-1", "relations": {"service": "web"}},
    )
    assert r.status_code == 201, r.text
    assert await evaluate_pending(db) >= 1
    assert await _levels(client, org, "shipping") == {"api": "Yes", "web": "Yes"}
    r = await client.delete(
        "/v1/blueprints/deployment/entities/api-1?delete_dependents=false", headers=org.headers
    )
    assert r.status_code == 200, r.text
    assert await evaluate_pending(db) >= 1
    assert await _levels(client, org, "shipping") == {"api": "No", "web": "Yes"}
    # Nothing left to do once evaluated.
    assert await evaluate_pending(db) == 0


async def test_scorecards_never_cross_tenants(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    ours, theirs = await make_org(), await make_org()
    await _catalog(client, ours)
    await _catalog(client, theirs)
    r = await _post(client, ours, "/v1/blueprints/service/scorecards", READINESS)
    assert r.status_code == 201, r.text
    await evaluate_pending(db)
    r = await client.get("/v1/scorecards", headers=theirs.headers)
    assert r.json()["scorecards"] == []
    r = await client.get("/v1/blueprints/service/scorecards/readiness", headers=theirs.headers)
    assert r.status_code == 404
    for method in ("put", "delete"):
        r = await client.request(
            method,
            "/v1/blueprints/service/scorecards/readiness",
            json=READINESS if method == "put" else None,
            headers=theirs.headers,
        )
        assert r.status_code == 404, (method, r.text)
    assert set((await _levels(client, theirs, "readiness")).values()) == {None}
    # Their dry run, summary and set replacement reach only their own (none) scorecards.
    r = await _post(
        client, theirs, "/v1/blueprints/service/scorecards/readiness/dry-run", READINESS
    )
    assert r.status_code == 200 and r.json()["dryRun"]["new"] == 4, r.text  # theirs: no results
    r = await client.get(
        "/v1/blueprints/service/scorecards/readiness/summary", headers=theirs.headers
    )
    assert r.status_code == 404
    r = await client.put("/v1/blueprints/service/scorecards", json=[], headers=theirs.headers)
    assert r.status_code == 200 and r.json()["scorecards"] == []
    r = await client.get("/v1/blueprints/service/scorecards", headers=ours.headers)
    assert [s["identifier"] for s in r.json()["scorecards"]] == ["readiness"]
    # Theirs has the same name, evaluated from their own entities only.
    r = await _post(client, theirs, "/v1/blueprints/service/scorecards", READINESS)
    assert r.status_code == 201, r.text
    r = await client.patch(
        "/v1/blueprints/service/entities/gold",
        json={"properties": {"owner": None}},
        headers=theirs.headers,
    )
    assert r.status_code == 200, r.text
    await evaluate_pending(db)
    assert (await _levels(client, theirs, "readiness"))["gold"] == "Basic"
    assert (await _levels(client, ours, "readiness"))["gold"] == "Gold"


async def test_results_are_searchable(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await _graded(client, make_org, db)

    async def found(*rules: dict[str, Any]) -> list[str] | httpx.Response:
        r = await _post(
            client,
            org,
            "/v1/blueprints/service/entities/search",
            {"query": {"combinator": "and", "rules": list(rules)}},
        )
        if r.status_code != 200:
            return r
        return sorted(e["identifier"] for e in r.json()["entities"])

    level = "scorecards.readiness.level"
    assert await found({"property": level, "operator": "=", "value": "Silver"}) == ["silver"]
    assert await found({"property": level, "operator": ">=", "value": "Silver"}) == [
        "gold",
        "silver",
    ]
    assert await found({"property": level, "operator": "<", "value": "Bronze"}) == ["basic"]
    assert await found({"property": level, "operator": "in", "value": ["Basic", "Gold"]}) == [
        "basic",
        "gold",
    ]
    assert await found({"property": level, "operator": "!=", "value": "Gold"}) == [
        "basic",
        "bronze",
        "silver",
    ]
    rule = "scorecards.readiness.rules.hasOwner"
    assert await found({"property": rule, "operator": "=", "value": "FAILURE"}) == ["basic"]
    # Across blueprints too.
    r = await _post(
        client,
        org,
        "/v1/entities/search",
        {"combinator": "and", "rules": [{"property": level, "operator": "=", "value": "Gold"}]},
    )
    assert [e["identifier"] for e in r.json()["entities"]] == ["gold"]
    for bad, pointer in (
        ({"property": level, "operator": "=", "value": "Platinum"}, "/rules/0/value"),
        (
            {"property": "scorecards.nope.level", "operator": "=", "value": "Gold"},
            "/rules/0/property",
        ),
        (
            {"property": "scorecards.readiness.rules.nope", "operator": "=", "value": "SUCCESS"},
            "/rules/0/property",
        ),
        ({"property": rule, "operator": ">", "value": "SUCCESS"}, "/rules/0/operator"),
    ):
        response = await found(bad)
        assert isinstance(response, httpx.Response) and response.status_code == 422, bad
        assert pointer in [d["pointer"] for d in response.json()["details"]], response.text


async def test_dry_run_tells_who_would_move_without_saving(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await _graded(client, make_org, db)
    # Coverage for Silver raised to 80: `silver` (70) falls to Bronze; the owner rule
    # dropped: `basic` (no owner) rises to Gold.
    proposal = {
        **READINESS,
        "rules": [
            {
                **READINESS["rules"][1],  # type: ignore[index]
                "query": {
                    "combinator": "and",
                    "conditions": [{"property": "coverage", "operator": ">", "value": 80}],
                },
            },
            *READINESS["rules"][2:],  # type: ignore[index]
        ],
    }
    r = await _post(client, org, "/v1/blueprints/service/scorecards/readiness/dry-run", proposal)
    assert r.status_code == 200, r.text
    dry = r.json()["dryRun"]
    assert (dry["up"], dry["down"], dry["same"], dry["new"], dry["removed"]) == (1, 1, 2, 0, 0)
    assert {(m["identifier"], m["from"], m["to"], m["change"]) for m in dry["moved"]} == {
        ("basic", "Basic", "Gold", "up"),
        ("silver", "Silver", "Bronze", "down"),
    }
    assert {lv["level"]: lv["count"] for lv in dry["levels"]} == {
        "Basic": 0,
        "Bronze": 2,  # `bronze` keeps its level: Bronze has no rules left
        "Silver": 0,
        "Gold": 2,
    }
    # Nothing was saved.
    assert (await _levels(client, org, "readiness"))["silver"] == "Silver"
    r = await client.get("/v1/blueprints/service/scorecards/readiness", headers=org.headers)
    assert r.json()["scorecard"]["rules"] == READINESS["rules"]
    # A proposal that cannot apply is a 422, like a definition.
    bad = {**READINESS, "rules": [{**READINESS["rules"][0], "level": "Platinum"}]}  # type: ignore[index]
    r = await _post(client, org, "/v1/blueprints/service/scorecards/readiness/dry-run", bad)
    assert r.status_code == 422, r.text


async def test_summary_and_daily_trend(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    from datetime import date

    from app.scorecards.insight import snapshot_all

    org = await make_org()
    await _catalog(client, org)
    r = await client.patch(
        "/v1/blueprints/service/entities/gold", json={"team": ["core"]}, headers=org.headers
    )
    assert r.status_code == 200, r.text
    r = await _post(client, org, "/v1/blueprints/service/scorecards", READINESS)
    assert r.status_code == 201, r.text
    await evaluate_pending(db)
    r = await client.get("/v1/blueprints/service/scorecards/readiness/summary", headers=org.headers)
    assert r.status_code == 200, r.text
    summary = r.json()["summary"]
    assert summary["entities"] == 4 and summary["state"] == "ready"
    assert {lv["level"]: lv["count"] for lv in summary["levels"]} == {
        "Basic": 1,
        "Bronze": 1,
        "Silver": 1,
        "Gold": 1,
    }
    teams = {t["team"]: {lv["level"]: lv["count"] for lv in t["levels"]} for t in summary["teams"]}
    assert teams["core"]["Gold"] == 1 and sum(teams[None].values()) == 3
    rates = {rule["identifier"]: rule for rule in summary["rules"]}
    assert rates["hasOwner"]["passed"] == 3 and rates["hasOwner"]["total"] == 4
    assert rates["hasOwner"]["passRate"] == 0.75
    # Two days of snapshots: the trend lists them in order, within from..to.
    assert await snapshot_all(db, date(2026, 11, 1)) >= 1
    r = await client.patch(
        "/v1/blueprints/service/entities/basic",
        json={"properties": {"owner": "x"}},
        headers=org.headers,
    )
    assert r.status_code == 200, r.text
    await snapshot_all(db, date(2026, 11, 2))
    r = await client.get(
        "/v1/blueprints/service/scorecards/readiness/summary?from=2026-11-01&to=2026-11-02",
        headers=org.headers,
    )
    trend = r.json()["summary"]["trend"]
    assert [point["day"] for point in trend] == ["2026-11-01", "2026-11-02"]
    gold = [{lv["level"]: lv["count"] for lv in p["levels"]}["Gold"] for p in trend]
    assert gold == [1, 2]
    r = await client.get(
        "/v1/blueprints/service/scorecards/readiness/summary?from=2026-11-05&to=2026-11-01",
        headers=org.headers,
    )
    assert r.status_code == 422
    other = await make_org()
    r = await client.get(
        "/v1/blueprints/service/scorecards/readiness/summary", headers=other.headers
    )
    assert r.status_code == 404


async def test_a_first_evaluation_meets_results_written_meanwhile(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    """A new scorecard's first evaluation inserts without conflict handling; an entity
    written before it ran already has a result, and the evaluation then upserts."""
    org = await make_org()
    await _catalog(client, org)
    r = await _post(client, org, "/v1/blueprints/service/scorecards", READINESS)
    assert r.status_code == 201, r.text
    r = await client.patch(
        "/v1/blueprints/service/entities/bronze",
        json={"properties": {"coverage": 60, "onCall": True}},
        headers=org.headers,
    )
    assert r.status_code == 200, r.text
    assert await _levels(client, org, "readiness") == {
        "gold": None,
        "silver": None,
        "basic": None,
        "bronze": "Silver",  # evaluated by its write
    }
    await evaluate_pending(db)
    assert await _levels(client, org, "readiness") == {
        "gold": "Gold",
        "silver": "Silver",
        "basic": "Basic",
        "bronze": "Silver",
    }


async def _held(settings: Settings, org: Org) -> asyncpg.Connection:
    """A connection inside a transaction that has inserted (uncommitted) one of the org's
    results: the org's first evaluation waits on it until its statement times out."""
    holder = await asyncpg.connect(settings.database_url)
    await holder.execute("BEGIN")
    await holder.execute(
        "INSERT INTO scorecard_results (org_id, blueprint, identifier, scorecard, level_rank, "
        "passed, version, entity_at) VALUES ($1, 'service', 'gold', 'readiness', 0, '{}', 0, "
        "now())",
        org.org_id,
    )
    return holder


async def _card(client: httpx.AsyncClient, org: Org) -> dict[str, Any]:
    r = await client.get("/v1/blueprints/service/scorecards/readiness", headers=org.headers)
    assert r.status_code == 200, r.text
    return dict(r.json()["scorecard"])


async def test_a_failing_scorecard_backs_off_and_other_orgs_are_evaluated(
    client: httpx.AsyncClient, make_org: OrgFactory, settings: Settings
) -> None:
    """B's evaluation runs past the statement timeout: the pass still evaluates A, B's
    failure is on its scorecard (and not tried again before its backoff), and B is
    evaluated once the cause is gone."""
    a, b = await make_org(), await make_org()
    for org in (a, b):
        await _catalog(client, org)
        r = await _post(client, org, "/v1/blueprints/service/scorecards", READINESS)
        assert r.status_code == 201, r.text
    quick = await Database.connect(settings.model_copy(update={"statement_timeout_ms": 500}))
    holder = await _held(settings, b)
    try:
        await evaluate_pending(quick)  # B's failure ends nothing
        assert (await _card(client, a))["state"] == "ready"
        assert (await _levels(client, a, "readiness"))["gold"] == "Gold"
        failing = await _card(client, b)
        assert failing["state"] == "failing", failing
        error = failing["evaluationError"]
        assert "statement timeout" in error["message"] and error["failures"] == 1
        retry_at = datetime.fromisoformat(error["retryAt"].replace("Z", "+00:00"))
        assert retry_at > datetime.now(UTC) + timedelta(seconds=20)
        # Backing off: the next passes leave B alone (before: started again every pass).
        started = time.monotonic()
        assert await evaluate_pending(quick) == 0
        assert time.monotonic() - started < 0.5
        assert (await _card(client, b))["evaluationError"]["failures"] == 1
    finally:
        await holder.execute("ROLLBACK")
        await holder.close()
    async with quick.system() as tx:  # the backoff is over
        await tx.execute(
            "UPDATE scorecards SET evaluation_retry_at = now() WHERE org_id = $1", b.org_id
        )
    assert await evaluate_pending(quick) == 1
    healed = await _card(client, b)
    assert healed["state"] == "ready" and healed.get("evaluationError") is None
    assert (await _levels(client, b, "readiness"))["gold"] == "Gold"
    await quick.close()


async def test_one_evaluation_per_org_at_a_time_and_others_go_meanwhile(
    client: httpx.AsyncClient, make_org: OrgFactory, settings: Settings
) -> None:
    """While B's evaluation is stuck, later passes do not start it again (one copy, not a
    new one every 2 s), and A's scorecard is evaluated meanwhile."""
    a, b = await make_org(), await make_org()
    for org in (a, b):
        await _catalog(client, org)
    r = await _post(client, b, "/v1/blueprints/service/scorecards", READINESS)
    assert r.status_code == 201, r.text
    slow = await Database.connect(settings.model_copy(update={"statement_timeout_ms": 4000}))
    holder = await _held(settings, b)
    try:
        first = asyncio.create_task(evaluate_pending(slow))
        await asyncio.sleep(0.5)
        r = await _post(client, a, "/v1/blueprints/service/scorecards", READINESS)
        assert r.status_code == 201, r.text
        second = asyncio.create_task(evaluate_pending(slow))
        third = asyncio.create_task(evaluate_pending(slow))
        deadline = time.monotonic() + 3
        while (await _card(client, a))["state"] != "ready":
            assert time.monotonic() < deadline, "A waited for B's evaluation"
            await asyncio.sleep(0.05)
        assert not first.done()  # B's is still stuck
        async with slow.system() as tx:
            waiting = await tx.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query ILIKE '%scorecard_results%'"
            )
        assert waiting == 1
        await asyncio.gather(first, second, third, return_exceptions=True)
    finally:
        await holder.execute("ROLLBACK")
        await holder.close()
        await slow.close()
    assert (await _card(client, b))["state"] == "failing"


async def test_a_changed_definition_is_evaluated_despite_a_backoff(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _catalog(client, org)
    r = await _post(client, org, "/v1/blueprints/service/scorecards", READINESS)
    assert r.status_code == 201, r.text
    async with db.system() as tx:  # as a failed evaluation leaves it
        await tx.execute(
            "UPDATE scorecards SET evaluation_failures = 2, evaluation_error = 'x', "
            "evaluation_retry_at = now() + interval '1 hour' WHERE org_id = $1",
            org.org_id,
        )
    assert await evaluate_pending(db) == 0
    assert (await _card(client, org))["state"] == "failing"
    r = await client.put(
        "/v1/blueprints/service/scorecards/readiness", json=READINESS, headers=org.headers
    )
    assert r.status_code == 200, r.text
    assert await evaluate_pending(db) == 1
    assert (await _card(client, org))["state"] == "ready"


async def test_aggregate_counts_entities_per_level_and_per_rule_result(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    """Port's countValues grouped by scorecard, and by scorecard and rule."""
    org = await _graded(client, make_org, db)
    other = await _graded(client, make_org, db)  # another org's results count for it only
    r = await _post(
        client,
        org,
        "/v1/blueprints/service/entities",
        {"identifier": "fresh", "properties": {"owner": "fy"}},
    )
    assert r.status_code == 201, r.text
    services = {
        "combinator": "and",
        "rules": [{"property": "$blueprint", "operator": "=", "value": "service"}],
    }

    async def counted(**body: Any) -> Any:
        r = await _post(
            client,
            org,
            "/v1/entities/aggregate",
            {"func": "countValues", "query": services, **body},
        )
        assert r.status_code == 200, r.text
        return r.json()["result"]

    levels = await counted(scorecard="readiness")
    assert sorted((x["value"], x["count"]) for x in levels) == [
        ("Basic", 1),
        ("Bronze", 2),
        ("Gold", 1),
        ("Silver", 1),
    ]
    assert levels[0] == {"value": "Bronze", "count": 2}  # most first
    covered = await counted(scorecard="readiness", rule="covered")
    assert sorted((str(x["value"]), x["count"]) for x in covered) == [
        ("False", 2),
        ("True", 3),
    ]
    # Narrowed by the query like any aggregation.
    gold_only = {
        "combinator": "and",
        "rules": [
            *services["rules"],
            {"property": "$identifier", "operator": "=", "value": "gold"},
        ],
    }
    assert await counted(scorecard="readiness", query=gold_only) == [{"value": "Gold", "count": 1}]
    for body, pointer in (
        ({"scorecard": "nope"}, "/scorecard"),
        ({"scorecard": "readiness", "rule": "nope"}, "/rule"),
        ({"rule": "covered"}, "/rule"),
        ({"scorecard": "readiness", "property": "owner"}, "/scorecard"),
    ):
        r = await _post(
            client,
            org,
            "/v1/entities/aggregate",
            {"func": "countValues", "query": services, **body},
        )
        assert r.status_code == 422, (body, r.text)
        assert pointer in [d["pointer"] for d in r.json()["details"]], (body, r.json())
    assert other.org_id != org.org_id


async def test_a_scorecard_keeps_its_properties_and_changing_them_grades_nothing(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    """Port's `properties` on a scorecard: kept and answered; a change of them (or of the
    title) is no new version to evaluate."""
    org = await _graded(client, make_org, db)
    path = "/v1/blueprints/service/scorecards/readiness"
    body = {**READINESS, "properties": {"owner": "platform", "reviewed": True, "weight": 2}}
    r = await client.put(path, json=body, headers=org.headers)
    assert r.status_code == 200, r.text
    found = (await client.get(path, headers=org.headers)).json()["scorecard"]
    assert found["properties"] == {"owner": "platform", "reviewed": True, "weight": 2}
    assert found["state"] == "ready"  # nothing that grades changed
    listed = (await client.get("/v1/scorecards", headers=org.headers)).json()["scorecards"]
    assert [s.get("properties") for s in listed] == [found["properties"]]
    changed = {**READINESS, "rules": READINESS["rules"][:2], "properties": {"owner": "sre"}}
    r = await client.put(path, json=changed, headers=org.headers)
    assert r.status_code == 200, r.text
    found = (await client.get(path, headers=org.headers)).json()["scorecard"]
    assert found["state"] == "evaluating" and found["properties"] == {"owner": "sre"}
    for properties, pointer in (([1], "/properties"), ({"bad key": 1}, "/properties/bad key")):
        r = await client.put(
            path, json={**READINESS, "properties": properties}, headers=org.headers
        )
        assert r.status_code == 422, r.text
        assert pointer in [d["pointer"] for d in r.json()["details"]], r.json()


async def test_compiling_a_scorecard_gives_the_loop_back_between_rules(
    client: httpx.AsyncClient, db: Database, make_org: OrgFactory
) -> None:
    """Building an evaluation statement or checking a definition compiles every rule;
    each rule is compiled in a turn of the event loop of its own, so a scorecard of many
    rules (which a tenant may rewrite at its rate limit) never holds other orgs' requests
    for all of them at once."""
    from app.scorecards import evaluate
    from app.scorecards.definitions import normalise
    from app.search.service import fresh_scope

    org = await make_org()
    blueprint = {
        "identifier": "svc",
        "title": "svc",
        "schema": {"properties": {"n": {"type": "number"}, "tier": {"type": "string"}}},
    }
    r = await client.post("/v1/blueprints", json=blueprint, headers=org.headers)
    assert r.status_code in (200, 201), r.text
    card = {
        "identifier": "many",
        "title": "many",
        "rules": [
            {
                "identifier": f"r{i}",
                "title": f"r{i}",
                "level": "Gold",
                "query": {
                    "combinator": "and",
                    "conditions": [{"property": "n", "operator": ">", "value": i}],
                },
            }
            for i in range(20)
        ],
    }
    r = await client.post("/v1/blueprints/svc/scorecards", json=card, headers=org.headers)
    assert r.status_code in (200, 201), r.text
    async with db.tenant(org.org_id) as tx:
        cards = await evaluate._load_cards(tx, "svc")
        scope = await fresh_scope(tx, "svc", None)

    async def turns_while(work: Any) -> tuple[Any, int]:
        """How many turns another task had while `work` ran."""
        done = False
        turns = 0

        async def other() -> None:
            nonlocal turns
            while not done:
                turns += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(other())
        await asyncio.sleep(0)
        try:
            result = await work
        finally:
            done = True
            await ticker
        return result, turns

    conditions, turns = await turns_while(evaluate.compiled_rules(scope, cards))
    assert len(conditions) == 20 and turns >= 19
    statement = evaluate.evaluation(scope, "svc", cards, only_ids=False, conditions=conditions)
    assert "r19" in str(statement.compile())
    stored, turns = await turns_while(normalise(card, "svc", scope))
    assert len(stored["rules"]) == 20 and turns >= 19
