"""Scorecard alerts: a graded entity's level change (or a rule flipping) is an entity event
(action SCORECARD) with the results before and after, read by automations
(SCORECARD_UPDATED), changelog destinations, the timeline; tenancy and the 4xx."""

from __future__ import annotations

from typing import Any

import httpx

from app.db.database import Database
from tests.conftest import Org, OrgFactory
from tests.test_automations import _feed, _runs, automation
from tests.test_automations import feed_started as feed_started
from tests.test_permissions import ok

SERVICE = {
    "identifier": "service",
    "title": "Service",
    "schema": {
        "properties": {
            "coverage": {"type": "number"},
            "documented": {"type": "boolean"},
        }
    },
}
READINESS = {
    "identifier": "readiness",
    "title": "Production readiness",
    "rules": [
        {
            "identifier": "covered",
            "title": "Coverage over 50",
            "level": "Bronze",
            "query": {
                "combinator": "and",
                "conditions": [{"property": "coverage", "operator": ">", "value": 50}],
            },
        },
        {
            "identifier": "excellent",
            "title": "Coverage over 90",
            "level": "Gold",
            "query": {
                "combinator": "and",
                "conditions": [{"property": "coverage", "operator": ">", "value": 90}],
            },
        },
        {
            "identifier": "documented",
            "title": "Documented",
            "level": "Gold",
            "query": {
                "combinator": "and",
                "conditions": [{"property": "documented", "operator": "=", "value": True}],
            },
        },
    ],
}
DROPPED = ".diff.after.scorecards.readiness.rank < .diff.before.scorecards.readiness.rank"


async def _catalog(client: httpx.AsyncClient, org: Org, **blueprint: Any) -> None:
    await ok(client, "POST", "/v1/blueprints", org, json={**SERVICE, **blueprint})
    await ok(client, "POST", "/v1/blueprints/service/scorecards", org, json=READINESS)


async def _write(client: httpx.AsyncClient, org: Org, identifier: str, **props: Any) -> None:
    body = {"identifier": identifier, "properties": props}
    await ok(
        client, "POST", "/v1/blueprints/service/entities?upsert=true&merge=true", org, json=body
    )


async def _scorecard_events(db: Database, org: Org, identifier: str) -> list[Any]:
    async with db.system() as tx:
        return list(
            await tx.fetch(
                "SELECT before, after, actor, origin FROM entity_events WHERE org_id = $1 "
                "AND identifier = $2 AND action = 'SCORECARD' ORDER BY id",
                org.org_id,
                identifier,
            )
        )


def _result(doc: dict[str, Any]) -> tuple[str, list[str]]:
    card = doc["scorecards"]["readiness"]
    return card["level"], [r["status"] for r in card["rules"]]


async def test_a_level_change_and_a_rule_flip_are_events_with_before_and_after(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _catalog(client, org)
    await _write(client, org, "api", coverage=95, documented=True)  # first grade: Gold
    assert await _scorecard_events(db, org, "api") == []
    await _write(client, org, "api", coverage=60)  # Gold -> Silver (it has no rules)
    await _write(client, org, "api", coverage=70)  # same results: nothing
    await _write(client, org, "api", documented=False)  # a rule flips, still Silver
    events = await _scorecard_events(db, org, "api")
    assert [(_result(e["before"]), _result(e["after"])) for e in events] == [
        (
            ("Gold", ["SUCCESS", "SUCCESS", "SUCCESS"]),
            ("Silver", ["SUCCESS", "FAILURE", "SUCCESS"]),
        ),
        (
            ("Silver", ["SUCCESS", "FAILURE", "SUCCESS"]),
            ("Silver", ["SUCCESS", "FAILURE", "FAILURE"]),
        ),
    ]
    first = events[0]
    assert first["after"]["properties"] == {"coverage": 60, "documented": True}
    assert first["before"]["scorecards"]["readiness"]["rank"] == 3
    assert first["after"]["scorecards"]["readiness"]["rank"] == 2
    assert (first["actor"], first["origin"]) == ("scorecard:readiness", "SYSTEM")
    timeline = await ok(client, "GET", "/v1/blueprints/service/entities-history/api", org)
    # newest first: the rule flip, the write that flipped it, ... the level change
    assert [e["action"] for e in timeline["history"]] == [
        "SCORECARD",
        "UPDATE",
        "UPDATE",
        "SCORECARD",
        "UPDATE",
        "CREATE",
    ]
    alert = timeline["history"][3]
    assert alert["action"] == "SCORECARD" and alert["by"]["kind"] == "system"
    assert [c["path"] for c in alert["changes"]] == ["scorecards.readiness"]
    # history reads the entity's values through these events unchanged
    now = timeline["history"][0]["at"]
    past = await ok(client, "GET", f"/v1/blueprints/service/entities/api?at={now}", org)
    assert past["entity"]["properties"] == {"coverage": 70, "documented": False}


async def test_an_automation_fires_when_the_level_drops_and_not_when_it_rises(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, feed_started: None
) -> None:
    org, other = await make_org(), await make_org()
    for each in (org, other):
        await _catalog(client, each)
        await ok(
            client,
            "POST",
            "/v1/actions",
            each,
            json=automation(
                "level-dropped",
                {"type": "SCORECARD_UPDATED", "blueprintIdentifier": "service"},
                condition=[DROPPED],
            ),
        )
        await ok(
            client,
            "POST",
            "/v1/actions",
            each,
            json=automation(
                "any-update", {"type": "ENTITY_UPDATED", "blueprintIdentifier": "service"}
            ),
        )
    await _write(client, org, "api", coverage=95, documented=True)
    await _write(client, org, "api", coverage=60)  # drops: Gold -> Silver
    await _write(client, org, "api", coverage=99)  # rises again
    await _feed(db)
    dropped = await _runs(client, org, "level-dropped")
    assert len(dropped) == 1
    # grading is not an entity update: only the two writes' updates ran that automation
    assert len(await _runs(client, org, "any-update")) == 2
    assert await _runs(client, other, "level-dropped") == []


async def test_a_changelog_destination_receives_the_scorecard_change(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, feed_started: None
) -> None:
    org = await make_org()
    await _catalog(
        client, org, changelogDestination={"type": "WEBHOOK", "url": "http://127.0.0.1:9/log"}
    )
    await _write(client, org, "api", coverage=95, documented=True)
    await _write(client, org, "api", coverage=10)  # Gold -> Basic
    await _feed(db)
    async with db.system() as tx:
        bodies = [
            r["body"]
            for r in await tx.fetch(
                "SELECT body FROM changelog_deliveries WHERE org_id = $1 ORDER BY id",
                org.org_id,
            )
        ]
    alerts = [b for b in bodies if b["action"] == "SCORECARD"]
    assert len(alerts) == 1
    diff = alerts[0]["diff"]
    assert diff["before"]["scorecards"]["readiness"]["level"] == "Gold"
    assert diff["after"]["scorecards"]["readiness"]["level"] == "Basic"
    assert alerts[0]["context"] == {"blueprintIdentifier": "service", "entityIdentifier": "api"}


async def test_a_scorecard_trigger_needs_a_blueprint_of_the_org(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _catalog(client, org)
    for event in (
        {"type": "SCORECARD_UPDATED"},
        {"type": "SCORECARD_UPDATED", "blueprintIdentifier": "nope"},
        {"type": "SCORECARD_LEVEL"},
    ):
        r = await client.post("/v1/actions", json=automation("bad", event), headers=org.headers)
        assert 400 <= r.status_code < 500, (event, r.text)
        body = r.json()
        assert body["ok"] is False and body["error"] and body["message"]
