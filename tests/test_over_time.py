"""Aggregates over time (POST /v1/entities/aggregate-over-time) and searches as of an
instant (`at` on the search bodies): buckets across DST changes and time zones, values at
bucket edges, entities created and deleted inside the range, tenancy and every 4xx."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx

from app.db.database import Database
from app.history import asof
from app.history.asof import check_instant
from app.history.over_time import aggregate_over_time
from app.kit.errors import Invalid
from tests.conftest import Org, OrgFactory
from tests.test_permissions import app_headers, ok

SERVICE = {
    "identifier": "service",
    "title": "Service",
    "schema": {
        "properties": {
            "coverage": {"type": "number"},
            "cost": {"type": "number"},
            "tier": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "deployedAt": {"type": "string", "format": "date-time"},
            "meta": {"type": "object"},
        }
    },
    "relations": {"system": {"target": "system", "many": False, "required": False}},
}
SYSTEM = {"identifier": "system", "title": "System", "schema": {"properties": {}}}
OVER_TIME = "/v1/entities/aggregate-over-time"
NY = ZoneInfo("America/New_York")


def ms(instant: datetime) -> int:
    return int(instant.timestamp() * 1000)


async def _catalog(client: httpx.AsyncClient, org: Org) -> None:
    await ok(client, "POST", "/v1/blueprints", org, json=SYSTEM)
    await ok(client, "POST", "/v1/blueprints", org, json=SERVICE)


async def _write(
    client: httpx.AsyncClient, org: Org, identifier: str, **props: Any
) -> dict[str, Any]:
    body = {"identifier": identifier, "properties": props}
    r = await ok(client, "POST", "/v1/blueprints/service/entities?upsert=true", org, json=body)
    return dict(r["entity"])


async def _delete(client: httpx.AsyncClient, org: Org, identifier: str) -> None:
    await ok(client, "DELETE", f"/v1/blueprints/service/entities/{identifier}", org)


async def _place(db: Database, org: Org, identifier: str, times: list[datetime]) -> None:
    """Put the entity's events (oldest first) at the given instants."""
    async with db.system() as tx:
        ids = [
            r["id"]
            for r in await tx.fetch(
                "SELECT id FROM entity_events WHERE org_id = $1 AND blueprint = 'service' "
                "AND identifier = $2 ORDER BY id",
                org.org_id,
                identifier,
            )
        ]
        assert len(ids) == len(times)
        for event_id, at in zip(ids, times, strict=True):
            await tx.execute(
                "UPDATE entity_events SET at = $3 WHERE org_id = $1 AND id = $2",
                org.org_id,
                event_id,
                at,
            )


def _body(**extra: Any) -> dict[str, Any]:
    return {
        "blueprint": "service",
        "query": {"combinator": "and", "rules": []},
        "aggregationType": "countEntities",
        "func": "count",
        **extra,
    }


async def _over_time(client: httpx.AsyncClient, org: Org, body: dict[str, Any]) -> Any:
    r = await client.post(OVER_TIME, json=body, headers=org.headers)
    assert r.status_code == 200, r.text
    return r.json()["result"]


def _series(result: dict[str, Any], line: str) -> list[Any]:
    return [p[line] for p in result["data"]]


# ------------------------------------------------------------------------------------------
# Measured by a date-time property (Port's way: today's entities placed by their time)


async def test_counts_by_a_date_property_fall_in_local_days_across_spring_forward(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _catalog(client, org)
    # 23:30 on March 9th and 10th in New York are the 10th and 11th in UTC
    for name, when in (
        ("a", datetime(2024, 3, 9, 23, 30, tzinfo=NY)),
        ("b", datetime(2024, 3, 10, 23, 30, tzinfo=NY)),
        ("c", datetime(2024, 3, 10, 0, 0, tzinfo=NY)),  # a bucket's first instant
        ("d", datetime(2024, 3, 12, 0, 0, tzinfo=NY)),  # the range's end: left out
    ):
        await _write(client, org, name, deployedAt=when.isoformat())
    body = _body(
        measureTimeBy="deployedAt",
        timeInterval="day",
        timeRange={
            "from": "2024-03-09T00:00:00",
            "to": "2024-03-12T00:00:00",
            "timeZone": "America/New_York",
        },
    )
    result = await _over_time(client, org, body)
    assert [p["date"] for p in result["data"]] == [
        ms(datetime(2024, 3, 9, tzinfo=NY)),
        ms(datetime(2024, 3, 10, tzinfo=NY)),
        ms(datetime(2024, 3, 11, tzinfo=NY)),
    ]
    assert _series(result, "count") == [1, 2, 0]
    utc = await _over_time(
        client,
        org,
        {**body, "timeRange": {"from": "2024-03-09T00:00:00Z", "to": "2024-03-12T00:00:00Z"}},
    )
    assert _series(utc, "count") == [0, 2, 1]


async def test_property_aggregates_per_bucket_with_last_by_time(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _catalog(client, org)
    d = datetime(2024, 5, 1, tzinfo=UTC)
    rows = [
        ("a", d + timedelta(hours=1), 10, 1),
        ("b", d + timedelta(hours=5), 20, None),
        ("c", d + timedelta(hours=3), 60, 3),
        ("e", d + timedelta(days=1, hours=1), 7, 7),
    ]
    for name, when, coverage, cost in rows:
        props: dict[str, Any] = {"coverage": coverage, "deployedAt": when.isoformat()}
        if cost is not None:
            props["cost"] = cost
        await _write(client, org, name, **props)
    base = _body(
        aggregationType="aggregatePropertiesValues",
        properties=["coverage", "cost"],
        measureTimeBy="deployedAt",
        timeInterval="day",
        timeRange={"from": "2024-05-01T00:00:00Z", "to": "2024-05-04T00:00:00Z"},
    )
    expected = {
        "average": ([30, 7, None], [2, 7, None]),
        "sum": ([90, 7, None], [4, 7, None]),
        "min": ([10, 7, None], [1, 7, None]),
        "max": ([60, 7, None], [3, 7, None]),
        "median": ([20, 7, None], [2, 7, None]),
        "last": ([20, 7, None], [3, 7, None]),  # b is last, but has no cost: c's
    }
    for func, (coverage, cost) in expected.items():
        result = await _over_time(client, org, {**base, "func": func})
        assert _series(result, "coverage") == coverage, func
        assert _series(result, "cost") == cost, func


async def test_counts_break_down_by_a_property_and_average_per_unit(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _catalog(client, org)
    d = datetime(2024, 1, 1, tzinfo=UTC)
    for n in range(14):
        tier = "gold" if n % 2 else "silver"
        await _write(
            client, org, f"s{n}", tier=tier, deployedAt=(d + timedelta(days=n)).isoformat()
        )
    await _write(client, org, "none", deployedAt=d.isoformat())
    body = _body(
        measureTimeBy="deployedAt",
        timeInterval="isoWeek",
        breakdownProperty="tier",
        timeRange={"from": "2024-01-01T00:00:00Z", "to": "2024-01-15T00:00:00Z"},
    )
    result = await _over_time(client, org, body)
    assert result["data"] == [
        {"date": ms(d), "silver": 4, "gold": 3, "null": 1},
        {"date": ms(d + timedelta(days=7)), "silver": 3, "gold": 4, "null": 0},
    ]
    average = await _over_time(client, org, {**body, "func": "average", "breakdownProperty": None})
    assert _series(average, "average") == [8 / 7, 1.0]


# ------------------------------------------------------------------------------------------
# Measured by the change history: the catalog as it stood when each bucket closed


async def test_history_counts_entities_standing_at_each_close_created_and_deleted_inside(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _catalog(client, org)
    d = datetime(2024, 6, 1, tzinfo=UTC)
    await _write(client, org, "old", coverage=10)
    await _place(db, org, "old", [d - timedelta(days=30)])
    await _write(client, org, "short", coverage=50)
    await _delete(client, org, "short")
    await _place(db, org, "short", [d + timedelta(hours=1), d + timedelta(days=1, hours=12)])
    await _write(client, org, "late", coverage=30)
    await _write(client, org, "late", coverage=40)
    # created on the 3rd; changed exactly when the 4th's bucket closes (the 5th's start):
    # that change is the 5th's
    await _place(db, org, "late", [d + timedelta(days=2, hours=5), d + timedelta(days=4)])
    body = _body(
        measureTimeBy="$history",
        timeInterval="day",
        timeRange={"from": "2024-06-01T00:00:00Z", "to": "2024-06-06T00:00:00Z"},
    )
    counts = await _over_time(client, org, body)
    assert _series(counts, "count") == [2, 1, 2, 2, 2]
    sums = await _over_time(
        client,
        org,
        {
            **body,
            "aggregationType": "aggregatePropertiesValues",
            "func": "sum",
            "properties": ["coverage"],
        },
    )
    assert _series(sums, "coverage") == [60, 10, 40, 40, 50]
    last = await _over_time(
        client,
        org,
        {
            **body,
            "aggregationType": "aggregatePropertiesValues",
            "func": "last",
            "properties": ["coverage"],
        },
    )
    assert _series(last, "coverage") == [50, 10, 30, 30, 40]
    for func in ("average", "median"):  # a running total, and a join of states with closes
        middle = await _over_time(
            client,
            org,
            {
                **body,
                "aggregationType": "aggregatePropertiesValues",
                "func": func,
                "properties": ["coverage"],
            },
        )
        assert _series(middle, "coverage") == [30, 10, 20, 20, 25], func


async def test_a_change_written_later_but_stamped_earlier_is_the_one_in_force(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    """Two writers of one entity: the one that began first commits last. Its event comes
    later (by id) with an earlier time; from then on it is the state, never both."""
    org = await make_org()
    await _catalog(client, org)
    d = datetime(2024, 6, 1, tzinfo=UTC)
    await _write(client, org, "api", coverage=1)
    await _write(client, org, "api", coverage=2)
    await _place(db, org, "api", [d + timedelta(hours=5), d + timedelta(hours=3)])
    body = _body(
        measureTimeBy="$history",
        timeInterval="hour",
        timeRange={"from": "2024-06-01T02:00:00Z", "to": "2024-06-01T07:00:00Z"},
    )
    assert _series(await _over_time(client, org, body), "count") == [0, 1, 1, 1, 1]
    for func, expected in (("sum", [None, 2, 2, 2, 2]), ("max", [None, 2, 2, 2, 2])):
        result = await _over_time(
            client,
            org,
            {
                **body,
                "aggregationType": "aggregatePropertiesValues",
                "func": func,
                "properties": ["coverage"],
            },
        )
        assert _series(result, "coverage") == expected, func
    at = (await _past(client, org, "2024-06-01T06:00:00Z", []))["entities"]
    assert [e["properties"]["coverage"] for e in at] == [2]


async def test_history_applies_the_query_to_each_past_state_and_breaks_down_by_it(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _catalog(client, org)
    d = datetime(2024, 3, 1, tzinfo=NY)
    await _write(client, org, "api", tier="gold", coverage=80)
    await _write(client, org, "api", tier="silver", coverage=50)
    await _write(client, org, "web", tier="gold", coverage=70)
    await _place(db, org, "api", [d - timedelta(days=40), datetime(2024, 3, 15, tzinfo=NY)])
    await _place(db, org, "web", [d - timedelta(days=40)])
    gold = {"combinator": "and", "rules": [{"property": "tier", "operator": "=", "value": "gold"}]}
    body = _body(
        measureTimeBy="$history",
        timeInterval="month",
        query=gold,
        timeRange={
            "from": "2024-02-01T00:00:00",
            "to": "2024-05-01T00:00:00",
            "timeZone": "America/New_York",
        },
    )
    result = await _over_time(client, org, body)
    assert [p["date"] for p in result["data"]] == [
        ms(datetime(2024, 2, 1, tzinfo=NY)),
        ms(datetime(2024, 3, 1, tzinfo=NY)),
        ms(datetime(2024, 4, 1, tzinfo=NY)),
    ]
    assert _series(result, "count") == [2, 1, 1]
    broken = await _over_time(
        client,
        org,
        {**body, "query": {"combinator": "and", "rules": []}, "breakdownProperty": "tier"},
    )
    assert [(p["gold"], p["silver"]) for p in broken["data"]] == [(2, 0), (1, 1), (1, 1)]


async def test_the_function_answers_the_widget_as_the_route_does(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _catalog(client, org)
    await _write(client, org, "api", coverage=5)
    body = _body(measureTimeBy="$history", timeInterval="hour", timeRange={"preset": "today"})
    via_route = await _over_time(client, org, body)
    async with db.tenant(org.org_id) as tx:
        direct = await aggregate_over_time(tx, body)
    assert direct["data"][-1] == via_route["data"][-1]
    assert direct["data"][-1]["count"] == 1


# ------------------------------------------------------------------------------------------
# Tenancy, permissions and every 4xx


async def test_another_org_counts_nothing_of_the_first(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org, other = await make_org(), await make_org()
    await _catalog(client, org)
    await _catalog(client, other)
    for n in range(3):
        await _write(client, org, f"s{n}", coverage=4242, deployedAt=datetime.now(UTC).isoformat())
    for measure in ("$history", "deployedAt", "$createdAt"):
        body = _body(
            measureTimeBy=measure,
            timeInterval="hour",
            aggregationType="aggregatePropertiesValues",
            func="max",
            properties=["coverage"],
            timeRange={"preset": "today"},
        )
        mine = await _over_time(client, org, body)
        assert mine["data"][-1]["coverage"] == 4242, measure
        theirs = await _over_time(client, other, body)
        assert all(p["coverage"] is None for p in theirs["data"]), measure
        plain = _body(measureTimeBy=measure, timeInterval="hour", timeRange={"preset": "today"})
        count = await _over_time(client, other, plain)
        assert all(p["count"] == 0 for p in count["data"]), measure


async def test_a_member_aggregates_and_a_stranger_does_not(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _catalog(client, org)
    await _write(client, org, "api", coverage=1)
    member = await app_headers(client, db, org.org_id, ["Member"])
    body = _body(measureTimeBy="$createdAt", timeInterval="day", timeRange={"preset": "today"})
    r = await client.post(OVER_TIME, json=body, headers=member)
    assert r.status_code == 200, r.text
    assert r.json()["result"]["data"][-1]["count"] == 1
    r = await client.post(OVER_TIME, json=body)
    assert r.status_code == 401
    assert r.json()["ok"] is False


async def test_bad_requests_are_4xx_in_ports_error_body(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _catalog(client, org)
    good = _body(measureTimeBy="$createdAt", timeInterval="day", timeRange={"preset": "lastWeek"})
    props = {**good, "aggregationType": "aggregatePropertiesValues", "func": "sum"}
    cases: list[tuple[dict[str, Any], int]] = [
        ({**good, "blueprint": "nope"}, 404),
        ({**good, "measureTimeBy": "tier"}, 422),
        ({**good, "measureTimeBy": "nope"}, 422),
        ({**good, "func": "sum"}, 422),
        ({**good, "func": "average", "measureTimeBy": "$history"}, 422),
        ({**good, "properties": ["coverage"]}, 422),
        ({**good, "breakdownProperty": "meta"}, 422),
        ({**good, "breakdownProperty": "nope"}, 422),
        ({**good, "aggregationType": "sometimes"}, 422),
        ({**props}, 422),  # no properties
        ({**props, "properties": ["tier"]}, 422),
        ({**props, "properties": ["nope"]}, 422),
        ({**props, "properties": []}, 422),
        ({**props, "properties": ["coverage"], "func": "count"}, 422),
        ({**props, "properties": ["coverage"], "breakdownProperty": "tier"}, 422),
        ({**good, "timeInterval": "week"}, 422),
        ({**good, "timeRange": {"preset": "last2Years"}}, 422),
        ({**good, "timeRange": {"preset": "lastWeek", "timeZone": "Mars/Olympus"}}, 422),
        (
            {**good, "timeRange": {"from": "2024-01-02T00:00:00Z", "to": "2024-01-01T00:00:00Z"}},
            422,
        ),
        (
            {
                **good,
                "timeRange": {"from": "2020-01-01T00:00:00Z", "to": "2024-01-01T00:00:00Z"},
                "timeInterval": "hour",
            },
            422,
        ),
        (
            {
                **good,
                "query": {
                    "combinator": "and",
                    "rules": [{"property": "nope", "operator": "=", "value": 1}],
                },
            },
            422,
        ),
        ({**good, "query": {"combinator": "xor", "rules": []}}, 422),
        (
            {
                **good,
                "measureTimeBy": "$history",
                "query": {
                    "combinator": "and",
                    "rules": [{"operator": "relatedTo", "blueprint": "system", "identifier": "x"}],
                },
            },
            422,
        ),
        ({**good, "surprise": 1}, 422),
        ({"blueprint": "service"}, 422),
    ]
    for body, status in cases:
        r = await client.post(OVER_TIME, json=body, headers=org.headers)
        assert r.status_code == status, (body, r.text)
        error = r.json()
        assert error["ok"] is False and error["error"] and error["message"], error


# ------------------------------------------------------------------------------------------
# Searching the past: `at` on the search bodies

SEARCH = "/v1/blueprints/service/entities/search"


async def _past(
    client: httpx.AsyncClient, org: Org, at: str, rules: list[Any], url: str = SEARCH, **extra: Any
) -> Any:
    query = {"combinator": "and", "rules": rules}
    body = {"query": query, "at": at, **extra} if url == SEARCH else {**query, "at": at}
    r = await client.post(url, json=body, headers=org.headers)
    assert r.status_code == 200, r.text
    return r.json()


async def test_a_search_at_an_instant_matches_the_entities_as_they_were(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _catalog(client, org)
    d = datetime(2024, 6, 1, tzinfo=UTC)
    await _write(client, org, "api", tier="gold", coverage=80)
    await _write(client, org, "api", tier="silver", coverage=40)
    await _place(db, org, "api", [d, d + timedelta(days=2)])
    await _write(client, org, "gone", tier="gold", coverage=90)
    await _delete(client, org, "gone")
    await _place(db, org, "gone", [d, d + timedelta(days=1)])
    await _write(client, org, "new", tier="gold", coverage=10)
    await _place(db, org, "new", [d + timedelta(days=3)])
    gold = [{"property": "tier", "operator": "=", "value": "gold"}]
    day1 = await _past(client, org, "2024-06-01T12:00:00Z", gold)
    assert [(e["identifier"], e["properties"]["coverage"]) for e in day1["entities"]] == [
        ("api", 80),
        ("gone", 90),
    ]
    assert day1["entities"][0]["createdAt"].startswith("2024-06-01T00:00:00")
    # the deletion at exactly 2024-06-02T00:00 is in force at that instant
    day2 = await _past(client, org, "2024-06-02T00:00:00Z", gold)
    assert [e["identifier"] for e in day2["entities"]] == ["api"]
    day4 = await _past(client, org, "2024-06-04T00:00:00Z", gold)
    assert [e["identifier"] for e in day4["entities"]] == ["new"]
    high = [{"property": "coverage", "operator": ">", "value": 50}]
    assert [
        e["identifier"] for e in (await _past(client, org, "2024-06-01T12:00:00", high))["entities"]
    ] == ["api", "gone"]
    everything = await _past(client, org, "2024-06-04T00:00:00Z", [], url="/v1/entities/search")
    assert everything["matchingBlueprints"] == ["service", "system"]
    assert sorted(e["identifier"] for e in everything["entities"]) == ["api", "new"]
    present = await ok(
        client, "POST", SEARCH, org, json={"query": {"combinator": "and", "rules": gold}}
    )
    assert [e["identifier"] for e in present["entities"]] == ["new"]


async def test_a_past_search_pages_and_reads_relations_and_renamed_properties(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _catalog(client, org)
    await ok(client, "POST", "/v1/blueprints/system/entities", org, json={"identifier": "core"})
    for team in ("alpha", "beta"):
        await ok(client, "POST", "/v1/teams", org, json={"name": team})
    await ok(
        client,
        "POST",
        "/v1/blueprints/service/entities",
        org,
        json={"identifier": "owned", "team": ["beta"], "properties": {"coverage": 9}},
    )
    await _delete(client, org, "owned")
    for n in range(5):
        body = {
            "identifier": f"s{n}",
            "properties": {"coverage": n},
            "relations": {"system": "core" if n % 2 else None},
        }
        await ok(client, "POST", "/v1/blueprints/service/entities", org, json=body)
    await ok(
        client,
        "PATCH",
        "/v1/blueprints/service/properties/coverage/rename",
        org,
        json={"newPropertyName": "testCoverage"},
    )
    now = datetime.now(UTC).isoformat()
    linked = await _past(
        client, org, now, [{"property": "system", "operator": "=", "value": "core"}]
    )
    assert [e["identifier"] for e in linked["entities"]] == ["s1", "s3"]
    assert linked["entities"][0]["relations"] == {"system": "core"}
    assert linked["entities"][0]["properties"] == {"testCoverage": 1}
    renamed = await _past(
        client, org, now, [{"property": "testCoverage", "operator": ">=", "value": 3}]
    )
    assert [e["identifier"] for e in renamed["entities"]] == ["s3", "s4"]
    teams = [{"property": "$team", "operator": "containsAny", "value": ["alpha", "beta"]}]
    assert (await _past(client, org, now, teams))["entities"] == []
    await ok(
        client,
        "PATCH",
        "/v1/blueprints/service/entities/s2",
        org,
        json={"team": ["alpha"]},
    )
    later = datetime.now(UTC).isoformat()
    owned = (await _past(client, org, later, teams))["entities"]
    assert [(e["identifier"], e["team"]) for e in owned] == [("s2", ["alpha"])]
    seen: list[str] = []
    page = await _past(client, org, now, [], limit=2)
    while True:
        seen += [e["identifier"] for e in page["entities"]]
        if "next" not in page:
            break
        page = await _past(client, org, now, [], limit=2, **{"from": page["next"]})
    assert seen == ["s0", "s1", "s2", "s3", "s4"]
    picked = await _past(client, org, now, [], limit=1, include=["testCoverage"])
    assert picked["entities"] == [
        {"identifier": "s0", "blueprint": "service", "properties": {"testCoverage": 0}}
    ]


async def test_another_org_finds_nothing_in_the_past_of_the_first(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org, other = await make_org(), await make_org()
    await _catalog(client, org)
    await _catalog(client, other)
    await _write(client, org, "secret", coverage=4242)
    now = datetime.now(UTC).isoformat()
    mine = await _past(client, org, now, [])
    assert [e["identifier"] for e in mine["entities"]] == ["secret"]
    for url in (SEARCH, "/v1/entities/search"):
        theirs = await _past(client, other, now, [], url=url)
        assert theirs["entities"] == [] and "4242" not in str(theirs)


async def test_bad_past_searches_are_4xx_in_ports_error_body(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _catalog(client, org)
    now = datetime.now(UTC)
    past = (now - timedelta(hours=1)).isoformat()
    cases = [
        (SEARCH, {"at": (now + timedelta(days=1)).isoformat()}, 422),
        (SEARCH, {"at": "yesterday"}, 422),
        (SEARCH, {"at": past, "from": "garbage"}, 422),
        ("/v1/blueprints/nope/entities/search", {"at": past}, 404),
        (
            SEARCH,
            {
                "at": past,
                "query": {
                    "combinator": "and",
                    "rules": [{"operator": "relatedTo", "blueprint": "system", "identifier": "x"}],
                },
            },
            422,
        ),
        (
            SEARCH,
            {
                "at": past,
                "query": {
                    "combinator": "and",
                    "rules": [{"property": "scorecards.x.level", "operator": "=", "value": "Gold"}],
                },
            },
            422,
        ),
        (
            SEARCH,
            {
                "at": past,
                "query": {
                    "combinator": "and",
                    "rules": [{"property": "nope", "operator": "=", "value": 1}],
                },
            },
            422,
        ),
        (
            "/v1/entities/search",
            {"combinator": "and", "rules": [], "at": (now + timedelta(days=1)).isoformat()},
            422,
        ),
        (
            "/v1/entities/search",
            {
                "combinator": "and",
                "rules": [{"operator": "matchAny", "property": "system", "value": "x"}],
                "at": past,
            },
            422,
        ),
    ]
    cases += [
        (SEARCH + "?attach_title_to_relation=true", {"at": past}, 422),
        ("/v1/entities/search?attach_title_to_relation=true", {"rules": [], "at": past}, 422),
    ]
    for url, body, status in cases:
        r = await client.post(url, json=body, headers=org.headers)
        assert r.status_code == status, (body, r.text)
        error = r.json()
        assert error["ok"] is False and error["error"] and error["message"], error


def test_an_instant_before_the_retention_horizon_is_refused() -> None:
    now = datetime(2024, 6, 1, tzinfo=UTC)
    check_instant(now - timedelta(days=29), now, 30)
    check_instant(now - timedelta(days=400), now, None)
    for at, days in ((now - timedelta(days=31), 30), (now + timedelta(seconds=1), None)):
        try:
            check_instant(at, now, days)
        except Invalid as exc:
            assert exc.details and exc.details[0]["pointer"] == "/at"
        else:
            raise AssertionError(f"{at} was accepted")


async def test_history_buckets_before_the_retention_horizon_are_null(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _catalog(client, org)
    await _write(client, org, "api", coverage=3)
    await _place(db, org, "api", [datetime.now(UTC) - timedelta(days=20)])
    body = _body(measureTimeBy="$history", timeInterval="day", timeRange={"preset": "lastMonth"})
    async with db.tenant(org.org_id) as tx:
        kept = await aggregate_over_time(tx, body, retention_days=10)
        whole = await aggregate_over_time(tx, body)
    assert all(p["count"] is None for p in kept["data"][:-11])
    assert all(p["count"] == 1 for p in kept["data"][-10:])
    assert [p["count"] for p in whole["data"]][-10:] == [1] * 10
    assert None not in [p["count"] for p in whole["data"]]


async def test_a_past_search_read_in_small_windows_finds_each_entity_once_as_it_was(
    client: httpx.AsyncClient, make_org: OrgFactory, monkeypatch: Any
) -> None:
    org = await make_org()
    await _catalog(client, org)
    for n in range(6):
        for coverage in range(n % 3 + 1):  # 1 to 3 events each, cut across windows
            await _write(client, org, f"s{n}", coverage=n * 10 + coverage)
    await _delete(client, org, "s4")
    now = datetime.now(UTC).isoformat()
    monkeypatch.setattr(asof, "FIRST_WINDOW", 1)
    monkeypatch.setattr(asof, "LAST_WINDOW", 2)
    rules = [{"property": "coverage", "operator": ">=", "value": 0}]
    seen: list[tuple[str, int]] = []
    page = await _past(client, org, now, rules, limit=2)
    while True:
        seen += [(e["identifier"], e["properties"]["coverage"]) for e in page["entities"]]
        if "next" not in page:
            break
        page = await _past(client, org, now, rules, limit=2, **{"from": page["next"]})
    assert seen == [("s0", 0), ("s1", 11), ("s2", 22), ("s3", 30), ("s5", 52)]


async def test_the_repeated_hour_of_a_fall_back_night_counts_in_two_buckets(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _catalog(client, org)
    first = datetime(2024, 11, 3, 5, 30, tzinfo=UTC)  # 01:30 EDT
    second = datetime(2024, 11, 3, 6, 30, tzinfo=UTC)  # 01:30 EST, an hour later
    await _write(client, org, "a", deployedAt=first.isoformat())
    await _write(client, org, "b", deployedAt=second.isoformat())
    await _write(client, org, "c", deployedAt="2024-11-03T06:45:00Z")
    body = _body(
        measureTimeBy="deployedAt",
        timeInterval="hour",
        timeRange={
            "from": "2024-11-03T00:00:00",
            "to": "2024-11-03T03:00:00",
            "timeZone": "America/New_York",
        },
    )
    result = await _over_time(client, org, body)
    assert [(p["date"], p["count"]) for p in result["data"]] == [
        (ms(datetime(2024, 11, 3, 4, tzinfo=UTC)), 0),
        (ms(datetime(2024, 11, 3, 5, tzinfo=UTC)), 1),
        (ms(datetime(2024, 11, 3, 6, tzinfo=UTC)), 2),
        (ms(datetime(2024, 11, 3, 7, tzinfo=UTC)), 0),
    ]
    day = await _over_time(
        client,
        org,
        {
            **body,
            "timeInterval": "day",
            "timeRange": {
                "from": "2024-11-03T00:00:00",
                "to": "2024-11-04T00:00:00",
                "timeZone": "America/New_York",
            },
        },
    )
    assert [p["count"] for p in day["data"]] == [3]  # a 25-hour day


async def test_teams_and_arrays_break_down_by_each_element(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _catalog(client, org)
    for team in ("alpha", "beta"):
        await ok(client, "POST", "/v1/teams", org, json={"name": team})
    for name, team, tags in (("a", ["alpha", "beta"], ["x", "y"]), ("b", ["beta"], ["y"])):
        body = {"identifier": name, "team": team, "properties": {"tags": tags}}
        await ok(client, "POST", "/v1/blueprints/service/entities", org, json=body)
    for measure in ("$createdAt", "$history"):
        base = _body(measureTimeBy=measure, timeInterval="day", timeRange={"preset": "today"})
        teams = await _over_time(client, org, {**base, "breakdownProperty": "$team"})
        assert {k: v for k, v in teams["data"][-1].items() if k != "date"} == {
            "beta": 2,
            "alpha": 1,
        }, measure
        tags = await _over_time(client, org, {**base, "breakdownProperty": "tags"})
        assert {k: v for k, v in tags["data"][-1].items() if k != "date"} == {
            "y": 2,
            "x": 1,
        }, measure


async def test_history_aggregates_a_renamed_property_under_its_new_name(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _catalog(client, org)
    d = datetime(2024, 2, 1, tzinfo=UTC)
    await _write(client, org, "api", coverage=1)
    await _write(client, org, "api", coverage=3)
    await _place(db, org, "api", [d, d + timedelta(days=1)])
    await ok(
        client,
        "PATCH",
        "/v1/blueprints/service/properties/coverage/rename",
        org,
        json={"newPropertyName": "testCoverage"},
    )
    body = _body(
        measureTimeBy="$history",
        timeInterval="day",
        aggregationType="aggregatePropertiesValues",
        properties=["testCoverage"],
        timeRange={"from": "2024-02-01T00:00:00Z", "to": "2024-02-03T00:00:00Z"},
    )
    for func in ("sum", "max"):
        result = await _over_time(client, org, {**body, "func": func})
        assert _series(result, "testCoverage") == [1, 3], func
    r = await client.post(
        OVER_TIME, json={**body, "func": "sum", "properties": ["coverage"]}, headers=org.headers
    )
    assert r.status_code == 422


async def test_a_past_search_that_reads_too_many_events_for_a_page_is_a_422(
    client: httpx.AsyncClient, make_org: OrgFactory, monkeypatch: Any
) -> None:
    org = await make_org()
    await _catalog(client, org)
    for n in range(6):
        await _write(client, org, f"s{n}", coverage=n)
    now = datetime.now(UTC).isoformat()
    monkeypatch.setattr(asof, "FIRST_WINDOW", 1)
    monkeypatch.setattr(asof, "LAST_WINDOW", 1)
    monkeypatch.setattr(asof, "MAX_EVENTS", 3)
    rare = {"combinator": "and", "rules": [{"property": "coverage", "operator": "=", "value": 5}]}
    r = await client.post(SEARCH, json={"query": rare, "at": now}, headers=org.headers)
    assert r.status_code == 422, r.text
    assert r.json()["ok"] is False and "narrow" in r.json()["message"]
    common = {"combinator": "and", "rules": []}
    r = await client.post(
        SEARCH, json={"query": common, "at": now, "limit": 2}, headers=org.headers
    )
    assert r.status_code == 200, r.text
    assert [e["identifier"] for e in r.json()["entities"]] == ["s0", "s1"]


async def test_an_orgs_history_reads_are_capped_at_once_and_others_are_not_held(
    client: httpx.AsyncClient, make_org: OrgFactory, settings: Any
) -> None:
    """`$history` reads are the heaviest: an org runs at most PORTOLAN_HISTORY_READS_PER_ORG
    of them at once per process; the next is a 429 with Retry-After at once, while another
    org's read and the org's reads by a date property go on."""
    from app.history.over_time import HISTORY_READS

    org = await make_org()
    other = await make_org()
    for who in (org, other):
        await _catalog(client, who)
        await _write(client, who, "svc", coverage=10)
    body = _body(
        measureTimeBy="$history",
        timeInterval="day",
        timeRange={"from": "2024-06-01T00:00:00Z", "to": "2024-06-03T00:00:00Z"},
    )
    path = "/v1/entities/aggregate-over-time"
    limit = settings.history_reads_per_org
    with contextlib.ExitStack() as held:
        for _ in range(limit):  # the org's places taken, as by reads still running
            held.enter_context(HISTORY_READS.hold(org.org_id, limit))
        r = await client.post(path, json=body, headers=org.headers)
        assert r.status_code == 429 and r.json()["error"] == "rate_limited", r.text
        assert r.headers["Retry-After"] == "1"
        assert (await client.post(path, json=body, headers=other.headers)).status_code == 200
        by_date = {**body, "measureTimeBy": "deployedAt"}
        assert (await client.post(path, json=by_date, headers=org.headers)).status_code == 200
    assert HISTORY_READS.held(org.org_id) == 0
    assert (await client.post(path, json=body, headers=org.headers)).status_code == 200
    assert HISTORY_READS.held(org.org_id) == 0  # given back after the read
