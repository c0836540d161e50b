"""Entity history: properties-history buckets (time zones, DST, values at bucket edges),
the timeline of changes, entities as they were (`?at=`), renames, tenancy and every 4xx."""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
from fastapi import FastAPI

from app.db.database import Database
from app.history import retention
from app.history.timeframe import frame, zone
from tests.conftest import Org, OrgFactory
from tests.test_permissions import add_user, app_headers, ok, user_headers

SERVICE = {
    "identifier": "service",
    "title": "Service",
    "schema": {
        "properties": {
            "coverage": {"type": "number"},
            "tier": {"type": "string"},
        }
    },
    "relations": {"system": {"target": "system", "many": False, "required": False}},
}
SYSTEM = {"identifier": "system", "title": "System", "schema": {"properties": {}}}
HISTORY = "/v1/entities/properties-history"
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


def _body(identifier: str, names: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "entityIdentifier": identifier,
        "blueprintIdentifier": "service",
        "propertyNames": names,
        **extra,
    }


async def _history(client: httpx.AsyncClient, org: Org, body: dict[str, Any]) -> Any:
    r = await client.post(HISTORY, json=body, headers=org.headers)
    assert r.status_code == 200, r.text
    return r.json()["result"]


# ------------------------------------------------------------------------------------------
# Buckets in time zones


def _starts(**kw: Any) -> list[datetime]:
    return [s.astimezone(kw["tz"]) for s in frame(now=datetime.now(UTC), preset=None, **kw).starts]


def test_day_buckets_follow_local_midnights_across_spring_forward() -> None:
    starts = _starts(
        start=datetime(2024, 3, 9, tzinfo=NY),
        end=datetime(2024, 3, 12, tzinfo=NY),
        tz=NY,
        interval="day",
    )
    assert [(s.day, s.hour) for s in starts] == [(9, 0), (10, 0), (11, 0)]
    assert starts[2].astimezone(UTC) - starts[1].astimezone(UTC) == timedelta(
        hours=23
    )  # the day the clocks went forward


def test_the_repeated_hour_of_a_fall_back_night_is_two_hour_buckets() -> None:
    starts = _starts(
        start=datetime(2024, 11, 3, 0, tzinfo=NY),
        end=datetime(2024, 11, 3, 3, tzinfo=NY),
        tz=NY,
        interval="hour",
    )
    assert [(s.hour, s.utcoffset()) for s in starts] == [
        (0, timedelta(hours=-4)),
        (1, timedelta(hours=-4)),
        (1, timedelta(hours=-5)),
        (2, timedelta(hours=-5)),
    ]
    instants = [s.astimezone(UTC) for s in starts]
    assert all(b - a == timedelta(hours=1) for a, b in itertools.pairwise(instants))


def test_weeks_start_on_monday_and_quarters_on_their_first_day_in_the_zone() -> None:
    tokyo = ZoneInfo("Asia/Tokyo")
    weeks = _starts(
        start=datetime(2024, 12, 31, 20, tzinfo=UTC),  # already Wednesday in Tokyo
        end=datetime(2025, 1, 10, tzinfo=UTC),
        tz=tokyo,
        interval="isoWeek",
    )
    assert [(w.month, w.day, w.weekday(), w.hour) for w in weeks] == [
        (12, 30, 0, 0),
        (1, 6, 0, 0),
    ]
    quarters = _starts(
        start=datetime(2024, 2, 1, tzinfo=UTC),
        end=datetime(2024, 8, 1, tzinfo=UTC),
        tz=tokyo,
        interval="quarter",
    )
    assert [(q.year, q.month, q.day) for q in quarters] == [
        (2024, 1, 1),
        (2024, 4, 1),
        (2024, 7, 1),
    ]


def test_a_month_bucket_spans_the_dst_change_in_its_zone() -> None:
    london = zone("Europe/London")
    starts = _starts(
        start=datetime(2024, 3, 1, tzinfo=london),
        end=datetime(2024, 4, 15, tzinfo=london),
        tz=london,
        interval="month",
    )
    assert [s.utcoffset() for s in starts] == [timedelta(0), timedelta(hours=1)]
    assert starts[1].astimezone(UTC) - starts[0].astimezone(UTC) == timedelta(days=31, hours=-1)


def test_presets_end_now_and_lie_in_the_zone() -> None:
    now = datetime(2024, 7, 15, 12, 30, tzinfo=UTC)
    kolkata = ZoneInfo("Asia/Kolkata")
    today = frame(preset="today", start=None, end=None, tz=kolkata, interval="hour", now=now)
    assert today.start == datetime(2024, 7, 15, 0, tzinfo=kolkata)
    assert today.end == now  # no bucket in the future
    assert len(today.starts) == 18  # 00:00 to 17:00 local: it is 18:00 sharp
    month = frame(preset="lastMonth", start=None, end=None, tz=kolkata, interval="day", now=now)
    assert month.start == datetime(2024, 6, 15, 18, 0, tzinfo=kolkata)


# ------------------------------------------------------------------------------------------
# properties-history through the API


async def test_each_bucket_holds_the_value_in_force_when_it_closes(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _catalog(client, org)
    await _write(client, org, "api", coverage=10)
    await _write(client, org, "api", coverage=20)
    await _write(client, org, "api", coverage=30)
    await _write(client, org, "api", coverage=40)
    d = datetime(2024, 5, 1, tzinfo=UTC)
    # before the range; two changes on the 2nd (the last counts); one exactly on the 4th's
    # first instant (it belongs to the 4th, not the 3rd)
    await _place(
        db,
        org,
        "api",
        [
            d - timedelta(days=3),
            d + timedelta(days=1, hours=2),
            d + timedelta(days=1, hours=9),
            d + timedelta(days=3),
        ],
    )
    body = _body(
        "api",
        ["coverage"],
        timeInterval="day",
        timeRange={"from": "2024-05-01T00:00:00Z", "to": "2024-05-06T00:00:00Z"},
    )
    result = await _history(client, org, body)
    assert result["minDate"] == ms(d)
    assert result["maxDate"] == ms(d + timedelta(days=5))
    assert [(p["date"], p["coverage"]) for p in result["data"]] == [
        (ms(d), 10),
        (ms(d + timedelta(days=1)), 30),
        (ms(d + timedelta(days=2)), 30),
        (ms(d + timedelta(days=3)), 40),
        (ms(d + timedelta(days=4)), 40),
    ]


async def test_day_buckets_in_a_zone_across_its_dst_change(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _catalog(client, org)
    await _write(client, org, "api", tier="bronze")
    await _write(client, org, "api", tier="silver")
    await _write(client, org, "api", tier="gold")
    # 23:30 on March 9th and 23:30 on March 10th in New York: UTC says the next day
    await _place(
        db,
        org,
        "api",
        [
            datetime(2024, 3, 8, 12, tzinfo=NY),
            datetime(2024, 3, 9, 23, 30, tzinfo=NY),
            datetime(2024, 3, 10, 23, 30, tzinfo=NY),
        ],
    )
    body = _body(
        "api",
        ["tier"],
        timeInterval="day",
        timeRange={
            "from": "2024-03-09T00:00:00",
            "to": "2024-03-12T00:00:00",
            "timeZone": "America/New_York",
        },
    )
    result = await _history(client, org, body)
    assert [(p["date"], p["tier"]) for p in result["data"]] == [
        (ms(datetime(2024, 3, 9, tzinfo=NY)), "silver"),
        (ms(datetime(2024, 3, 10, tzinfo=NY)), "gold"),
        (ms(datetime(2024, 3, 11, tzinfo=NY)), "gold"),
    ]
    utc = await _history(
        client,
        org,
        {**body, "timeRange": {"from": "2024-03-09T00:00:00Z", "to": "2024-03-12T00:00:00Z"}},
    )
    assert [p["tier"] for p in utc["data"]] == ["bronze", "silver", "gold"]


async def test_an_entity_created_and_deleted_inside_the_range_is_null_outside_its_life(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _catalog(client, org)
    await _write(client, org, "short", coverage=5, tier="t1")
    await ok(client, "DELETE", "/v1/blueprints/service/entities/short", org)
    d = datetime(2024, 1, 1, tzinfo=UTC)
    await _place(db, org, "short", [d + timedelta(hours=2, minutes=30), d + timedelta(hours=4)])
    body = _body(
        "short",
        ["coverage", "$title", "system"],
        timeInterval="hour",
        timeRange={"from": "2024-01-01T00:00:00Z", "to": "2024-01-01T06:00:00Z"},
    )
    result = await _history(client, org, body)
    assert [p["coverage"] for p in result["data"]] == [None, None, 5, 5, None, None]
    assert [p["system"] for p in result["data"]] == [None, None, None, None, None, None]


async def test_history_of_a_renamed_property_reads_its_former_values(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _catalog(client, org)
    await _write(client, org, "api", coverage=1)
    await _write(client, org, "api", coverage=2)
    d = datetime(2024, 2, 1, tzinfo=UTC)
    await _place(db, org, "api", [d, d + timedelta(days=1)])
    await ok(
        client,
        "PATCH",
        "/v1/blueprints/service/properties/coverage/rename",
        org,
        json={"newPropertyName": "testCoverage"},
    )
    body = _body(
        "api",
        ["testCoverage"],
        timeRange={"from": "2024-02-01T00:00:00Z", "to": "2024-02-03T00:00:00Z"},
    )
    result = await _history(client, org, body)
    assert [p["testCoverage"] for p in result["data"]] == [1, 2]
    r = await client.post(
        HISTORY, json={**body, "propertyNames": ["coverage"]}, headers=org.headers
    )
    assert r.status_code == 422
    timeline = await ok(client, "GET", "/v1/blueprints/service/entities-history/api", org)
    assert timeline["history"][0]["after"]["properties"] == {"testCoverage": 2}
    assert timeline["history"][0]["changes"] == [
        {"path": "properties.testCoverage", "before": 1, "after": 2}
    ]
    past = await ok(
        client, "GET", "/v1/blueprints/service/entities/api?at=2024-02-01T12:00:00Z", org
    )
    assert past["entity"]["properties"] == {"testCoverage": 1}


async def test_a_name_taken_again_after_a_rename_does_not_inherit_the_old_values(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _catalog(client, org)
    await _write(client, org, "api", tier="gold")
    await _place(db, org, "api", [datetime(2024, 2, 1, tzinfo=UTC)])
    await ok(
        client,
        "PATCH",
        "/v1/blueprints/service/properties/tier/rename",
        org,
        json={"newPropertyName": "level"},
    )
    schema = {
        **SERVICE["schema"]["properties"],  # type: ignore[index]
        "level": {"type": "string"},
    }
    await ok(
        client, "PATCH", "/v1/blueprints/service", org, json={"schema": {"properties": schema}}
    )
    body = _body(
        "api",
        ["tier", "level"],
        timeRange={"from": "2024-02-01T00:00:00Z", "to": "2024-02-02T00:00:00Z"},
    )
    result = await _history(client, org, body)
    assert result["data"] == [
        {"date": ms(datetime(2024, 2, 1, tzinfo=UTC)), "tier": None, "level": "gold"}
    ]


async def test_a_relation_renamed_and_a_property_removed_show_in_todays_names(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _catalog(client, org)
    await ok(client, "POST", "/v1/blueprints/system/entities", org, json={"identifier": "core"})
    body = {
        "identifier": "api",
        "properties": {"tier": "t1", "coverage": 3},
        "relations": {"system": "core"},
    }
    await ok(client, "POST", "/v1/blueprints/service/entities", org, json=body)
    await ok(
        client,
        "PATCH",
        "/v1/blueprints/service/relations/system/rename",
        org,
        json={"newRelationIdentifier": "platform"},
    )
    await ok(
        client,
        "PATCH",
        "/v1/blueprints/service",
        org,
        json={"schema": {"properties": {"coverage": {"type": "number"}}}},
    )
    timeline = await ok(client, "GET", "/v1/blueprints/service/entities-history/api", org)
    created = timeline["history"][0]["after"]
    assert created["relations"] == {"platform": ["core"]}
    assert created["properties"] == {"coverage": 3}
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    past = await ok(client, "GET", f"/v1/blueprints/service/entities/api?at={now}", org)
    assert past["entity"]["relations"] == {"platform": "core"}
    result = await _history(
        client, org, _body("api", ["platform"], timeRange={"preset": "today", "timeZone": "UTC"})
    )
    assert result["data"][-1]["platform"] == "core"


# ------------------------------------------------------------------------------------------
# The timeline


async def test_the_timeline_tells_who_changed_what_from_where_newest_first(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, app: FastAPI
) -> None:
    org = await make_org()
    await _catalog(client, org)
    await add_user(db, org.org_id, "ana@example.com", roles=["Admin"])
    person = user_headers(app, org.org_id, "ana@example.com")
    await _write(client, org, "api", coverage=1)
    r = await client.patch(
        "/v1/blueprints/service/entities/api", json={"properties": {"coverage": 2}}, headers=person
    )
    assert r.status_code == 200, r.text
    r = await client.patch(
        "/v1/blueprints/service/entities/api",
        json={"properties": {"coverage": 3}},
        headers={**org.headers, "User-Agent": "port-ocean/github/1/exporter"},
    )
    assert r.status_code == 200, r.text
    timeline = await ok(client, "GET", "/v1/blueprints/service/entities-history/api", org)
    history = timeline["history"]
    assert [(e["action"], e["by"]["kind"], e["origin"]) for e in history] == [
        ("UPDATE", "integration", "INTEGRATION"),
        ("UPDATE", "user", "UI"),
        ("CREATE", "credential", "API"),
    ]
    assert history[0]["changes"] == [{"path": "properties.coverage", "before": 2, "after": 3}]
    assert history[1]["changes"] == [{"path": "properties.coverage", "before": 1, "after": 2}]
    assert {"path": "properties.coverage", "before": None, "after": 1} in history[2]["changes"]
    assert history[2]["before"] is None
    assert timeline["history"][1]["by"]["id"] == "ana@example.com"
    assert "next" not in timeline


async def test_the_timeline_pages_with_its_cursor(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _catalog(client, org)
    for value in range(5):
        await _write(client, org, "api", coverage=value)
    url = "/v1/blueprints/service/entities-history/api?limit=2"
    seen: list[Any] = []
    page = await ok(client, "GET", url, org)
    while True:
        seen += [e["after"]["properties"]["coverage"] for e in page["history"]]
        if "next" not in page:
            break
        page = await ok(client, "GET", f"{url}&next={page['next']}", org)
    assert seen == [4, 3, 2, 1, 0]


# ------------------------------------------------------------------------------------------
# An entity as it was


async def test_an_entity_read_at_an_instant_is_as_it_was_then(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _catalog(client, org)
    await _write(client, org, "api", coverage=1)
    await _write(client, org, "api", coverage=2)
    await ok(client, "DELETE", "/v1/blueprints/service/entities/api", org)
    await _write(client, org, "api", coverage=3)
    d = datetime(2024, 6, 1, tzinfo=UTC)
    await _place(
        db, org, "api", [d, d + timedelta(days=1), d + timedelta(days=2), d + timedelta(days=3)]
    )
    url = "/v1/blueprints/service/entities/api?at="

    async def at(instant: str) -> httpx.Response:
        return await client.get(url + instant, headers=org.headers)

    assert (await at("2024-05-31T00:00:00Z")).status_code == 404  # not created yet
    then = (await at("2024-06-01T12:00:00Z")).json()["entity"]
    assert then["properties"] == {"coverage": 1}
    assert then["createdAt"].startswith("2024-06-01T00:00:00")
    assert (await at("2024-06-02T00:00:00Z")).json()["entity"]["properties"] == {"coverage": 2}
    assert (await at("2024-06-03T01:00:00Z")).status_code == 404  # deleted then
    again = (await at("2024-06-05T00:00:00")).json()["entity"]
    assert again["properties"] == {"coverage": 3}
    assert again["createdAt"].startswith("2024-06-04")
    assert (await at("yesterday")).status_code == 422


# ------------------------------------------------------------------------------------------
# Tenancy, permissions and every 4xx


async def test_another_org_sees_no_history_of_an_entity(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org, other = await make_org(), await make_org()
    await _catalog(client, org)
    await _catalog(client, other)
    await _write(client, org, "secret", coverage=4242)
    body = _body("secret", ["coverage"], timeRange={"preset": "today", "timeZone": "UTC"})
    for method, url, payload in (
        ("POST", HISTORY, body),
        ("GET", "/v1/blueprints/service/entities-history/secret", None),
        ("GET", "/v1/blueprints/service/entities/secret?at=2999-01-01T00:00:00Z", None),
    ):
        r = await client.request(method, url, json=payload, headers=other.headers)
        assert r.status_code == 404, (url, r.text)
        assert r.json()["ok"] is False
        assert "4242" not in r.text
        mine = await client.request(method, url, json=payload, headers=org.headers)
        assert mine.status_code == 200, mine.text


async def test_a_member_reads_history_and_a_stranger_does_not(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _catalog(client, org)
    await _write(client, org, "api", coverage=1)
    member = await app_headers(client, db, org.org_id, ["Member"])
    body = _body("api", ["coverage"], timeRange={"preset": "today", "timeZone": "UTC"})
    r = await client.post(HISTORY, json=body, headers=member)
    assert r.status_code == 200
    assert r.json()["result"]["data"][-1]["coverage"] == 1
    r = await client.post(HISTORY, json=body)
    assert r.status_code == 401
    assert r.json()["ok"] is False
    r = await client.get("/v1/blueprints/service/entities-history/api")
    assert r.status_code == 401


async def test_bad_requests_are_4xx_in_ports_error_body(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _catalog(client, org)
    await _write(client, org, "api", coverage=1)
    good = _body("api", ["coverage"], timeRange={"preset": "lastWeek", "timeZone": "UTC"})
    cases: list[tuple[dict[str, Any], int]] = [
        ({**good, "blueprintIdentifier": "nope"}, 404),
        ({**good, "entityIdentifier": "nope"}, 404),
        ({**good, "propertyNames": ["nope"]}, 422),
        ({**good, "propertyNames": []}, 422),
        ({**good, "timeInterval": "week"}, 422),
        ({**good, "timeRange": {"preset": "last2Years", "timeZone": "UTC"}}, 422),
        ({**good, "timeRange": {"preset": "lastWeek", "timeZone": "Mars/Olympus"}}, 422),
        ({**good, "timeRange": {"preset": "lastWeek", "from": "2024-01-01T00:00:00Z"}}, 422),
        (
            {**good, "timeRange": {"from": "2024-01-02T00:00:00Z", "to": "2024-01-01T00:00:00Z"}},
            422,
        ),
        ({**good, "timeRange": {"from": "2024-01-02T00:00:00Z"}}, 422),
        (
            {
                **good,
                "timeRange": {"from": "2020-01-01T00:00:00Z", "to": "2024-01-01T00:00:00Z"},
                "timeInterval": "hour",
            },
            422,
        ),
        ({**good, "timeRange": {"from": "not a time", "to": "2024-01-01T00:00:00Z"}}, 422),
        ({**good, "surprise": 1}, 422),
        ({"propertyNames": ["coverage"]}, 422),
    ]
    for body, status in cases:
        r = await client.post(HISTORY, json=body, headers=org.headers)
        assert r.status_code == status, (body, r.text)
        error = r.json()
        assert error["ok"] is False and error["error"] and error["message"], error
    r = await client.post(
        HISTORY,
        json={
            **good,
            "timeRange": {"preset": "last2Years", "timeZone": "UTC"},
            "timeInterval": "quarter",
        },
        headers=org.headers,
    )
    assert r.status_code == 200, r.text
    base = "/v1/blueprints/service/entities-history"
    for url, status in (
        (f"{base}/api?next=abc", 422),
        (f"{base}/api?limit=0", 422),
        (f"{base}/api?from=soon", 422),
        (f"{base}/nope", 404),
        ("/v1/blueprints/nope/entities-history/api", 404),
        ("/v1/blueprints/nope/entities/api?at=2024-01-01T00:00:00Z", 404),
    ):
        r = await client.get(url, headers=org.headers)
        assert r.status_code == status, (url, r.text)
        assert r.json()["ok"] is False


async def test_an_unknown_entity_is_a_404_even_in_a_fresh_org(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _catalog(client, org)
    name = uuid.uuid4().hex
    r = await client.get(f"/v1/blueprints/service/entities-history/{name}", headers=org.headers)
    assert r.status_code == 404


# ------------------------------------------------------------------------------------------
# Retention


async def test_pruning_keeps_each_entitys_state_at_the_horizon(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _catalog(client, org)
    now = datetime.now(UTC)
    days = [now - timedelta(days=n) for n in (100, 90, 80)]
    for value in (1, 2, 3, 4):
        await _write(client, org, "kept", coverage=value)
    await _place(db, org, "kept", [*days, now])
    await _write(client, org, "gone", coverage=1)
    await ok(client, "DELETE", "/v1/blueprints/service/entities/gone", org)
    await _place(db, org, "gone", days[:2])
    await _write(client, org, "old", coverage=7)
    await _place(db, org, "old", days[:1])

    assert await retention.prune(db, 30, batch=1, org_id=org.org_id) == 4

    async with db.system() as tx:
        left = await tx.fetch(
            "SELECT identifier, after -> 'properties' -> 'coverage' AS coverage "
            "FROM entity_events WHERE org_id = $1 ORDER BY id",
            org.org_id,
        )
    assert [(r["identifier"], r["coverage"]) for r in left] == [
        ("kept", 3),
        ("kept", 4),
        ("old", 7),
    ]
    url = "/v1/blueprints/service/entities/kept?at="
    then = await ok(
        client, "GET", url + (now - timedelta(days=40)).isoformat().replace("+00:00", "Z"), org
    )
    assert then["entity"]["properties"] == {"coverage": 3}
    assert await retention.prune(db, 30, org_id=org.org_id) == 0
