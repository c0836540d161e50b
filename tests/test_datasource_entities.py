"""POST /v1/blueprints/entities/datasource-entities: the entities an Ocean integration wrote
(by its User-Agent), paged by cursor, before a time, per tenant; and Ocean's event query
parameters on entity writes."""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from app.catalog import datasource
from app.db.database import Database
from tests.conftest import Org, OrgFactory
from tests.test_permissions import app_headers

ROUTE = "/v1/blueprints/entities/datasource-entities"
TYPE = "github"
IDENT = "my-github"
PREFIX = f"port-ocean/{TYPE}/"
SUFFIX = f"/{IDENT}/exporter"


def agent(
    version: str = "0.5.1", identifier: str = IDENT, kind: str = "exporter", type_: str = TYPE
) -> str:
    return f"port-ocean/{type_}/{version}/{identifier}/{kind}"


async def _blueprints(client: httpx.AsyncClient, org: Org) -> None:
    for body in (
        {"identifier": "team", "title": "Team", "schema": {"properties": {}}},
        {
            "identifier": "repo",
            "title": "Repo",
            "schema": {"properties": {}},
            "relations": {
                "team": {"target": "team", "required": False, "many": False},
                "uses": {"target": "repo", "required": False, "many": True},
            },
        },
    ):
        r = await client.post("/v1/blueprints", json=body, headers=org.headers)
        assert r.status_code == 201, r.text


async def _write(
    client: httpx.AsyncClient,
    org: Org,
    blueprint: str,
    entities: list[dict[str, Any]],
    user_agent: str,
) -> None:
    r = await client.post(
        f"/v1/blueprints/{blueprint}/entities/bulk",
        params={"upsert": "true", "merge": "true", "create_missing_related_entities": "true"},
        json={"entities": entities},
        headers={**org.headers, "User-Agent": user_agent},
    )
    assert r.status_code == 200, r.text


async def _page(client: httpx.AsyncClient, org: Org, **body: Any) -> dict[str, Any]:
    r = await client.post(
        ROUTE,
        json={"datasource_prefix": PREFIX, "datasource_suffix": SUFFIX, "limit": 5000, **body},
        headers=org.headers,
    )
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


async def _all(client: httpx.AsyncClient, org: Org, **body: Any) -> list[tuple[str, str]]:
    """Every page, as Ocean reads them: (blueprint, identifier) in the order answered."""
    found: list[tuple[str, str]] = []
    cursor = None
    for _ in range(1000):
        page = await _page(client, org, **body, **({"from": cursor} if cursor else {}))
        found += [(e["blueprint"], e["identifier"]) for e in page["entities"]]
        cursor = page["next"]
        if not cursor:
            return found
    raise AssertionError("paging did not end")


@pytest.fixture
async def org(client: httpx.AsyncClient, make_org: OrgFactory) -> Org:
    org = await make_org()
    await _blueprints(client, org)
    return org


async def test_finds_the_integrations_entities_of_every_version_and_no_others(
    client: httpx.AsyncClient, org: Org
) -> None:
    await _write(client, org, "repo", [{"identifier": "a"}], agent("0.5.1"))
    await _write(client, org, "repo", [{"identifier": "b"}], agent("0.6.0"))
    await _write(client, org, "team", [{"identifier": "t1"}], agent("0.6.0"))
    # Another integration of the same type, the same identifier of another type, the
    # integration's gitops writes, and other writers: none of them are its exporter's.
    await _write(client, org, "repo", [{"identifier": "other"}], agent(identifier="her-github"))
    await _write(client, org, "repo", [{"identifier": "gl"}], agent(type_="gitlab"))
    await _write(client, org, "repo", [{"identifier": "ops"}], agent(kind="gitops"))
    await _write(client, org, "repo", [{"identifier": "api"}], "python-httpx/0.27")
    await _write(client, org, "repo", [{"identifier": "sub"}], agent(identifier=f"x{IDENT}"))

    assert sorted(await _all(client, org)) == [("repo", "a"), ("repo", "b"), ("team", "t1")]


async def test_an_entity_last_written_by_someone_else_is_no_longer_the_integrations(
    client: httpx.AsyncClient, org: Org
) -> None:
    await _write(client, org, "repo", [{"identifier": "a"}, {"identifier": "b"}], agent())
    r = await client.patch(
        "/v1/blueprints/repo/entities/b",
        json={"title": "edited by hand"},
        headers={**org.headers, "User-Agent": "Mozilla/5.0"},
    )
    assert r.status_code == 200, r.text

    assert await _all(client, org) == [("repo", "a")]


async def test_answers_identifier_blueprint_and_relations_in_ports_shape(
    client: httpx.AsyncClient, org: Org
) -> None:
    await _write(client, org, "team", [{"identifier": "t1"}], "python-httpx/0.27")
    await _write(client, org, "repo", [{"identifier": "c"}], "python-httpx/0.27")
    await _write(
        client,
        org,
        "repo",
        [
            {"identifier": "a", "relations": {"team": "t1", "uses": ["c", "b"]}},
            {"identifier": "b"},
        ],
        agent(),
    )

    page = await _page(client, org)

    assert page == {
        "ok": True,
        "entities": [
            {
                "identifier": "a",
                "blueprint": "repo",
                "relations": {"team": "t1", "uses": ["b", "c"]},
            },
            {"identifier": "b", "blueprint": "repo", "relations": {"team": None, "uses": []}},
        ],
        "next": None,
    }


async def test_pages_follow_the_cursor_without_skipping_or_repeating(
    client: httpx.AsyncClient, org: Org
) -> None:
    await _write(client, org, "repo", [{"identifier": f"r{i:02d}"} for i in range(17)], agent())
    await _write(client, org, "team", [{"identifier": f"t{i}"} for i in range(6)], agent("1.0"))

    sizes = []
    cursor = None
    seen: list[tuple[str, str]] = []
    while True:
        page = await _page(client, org, limit=5, **({"from": cursor} if cursor else {}))
        sizes.append(len(page["entities"]))
        seen += [(e["blueprint"], e["identifier"]) for e in page["entities"]]
        cursor = page["next"]
        if cursor is None:
            break

    assert sizes == [5, 5, 5, 5, 3]
    assert sorted(seen) == sorted(
        [("repo", f"r{i:02d}") for i in range(17)] + [("team", f"t{i}") for i in range(6)]
    )
    assert len(set(seen)) == len(seen)


async def test_a_full_last_page_says_there_is_no_next(client: httpx.AsyncClient, org: Org) -> None:
    await _write(client, org, "repo", [{"identifier": f"r{i}"} for i in range(4)], agent())

    page = await _page(client, org, limit=4)

    assert len(page["entities"]) == 4
    assert page["next"] is None


async def test_before_leaves_out_entities_written_since(
    client: httpx.AsyncClient, org: Org
) -> None:
    await _write(client, org, "repo", [{"identifier": "old"}, {"identifier": "kept"}], agent())
    await asyncio.sleep(0.01)
    resync_start = datetime.now(UTC)
    await asyncio.sleep(0.01)
    await _write(client, org, "repo", [{"identifier": "new"}], agent())
    # Rewritten unchanged: nothing is written, so it still counts as written before.
    await _write(client, org, "repo", [{"identifier": "kept"}], agent())
    await _write(client, org, "repo", [{"identifier": "old", "title": "changed"}], agent())

    found = await _all(client, org, before=resync_start.isoformat())

    assert found == [("repo", "kept")]


@pytest.mark.parametrize("shape", ["offset", "zulu", "naive"])
async def test_before_reads_ocean_s_timestamps(
    client: httpx.AsyncClient, org: Org, shape: str
) -> None:
    await _write(client, org, "repo", [{"identifier": "a"}], agent())
    later = datetime.now(UTC).replace(year=datetime.now(UTC).year + 1)
    earlier = later.replace(year=2000)
    text = {
        "offset": lambda t: t.isoformat(),
        "zulu": lambda t: t.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "naive": lambda t: t.replace(tzinfo=None).isoformat(),
    }[shape]

    assert await _all(client, org, before=text(later)) == [("repo", "a")]
    assert await _all(client, org, before=text(earlier)) == []


async def test_paging_under_a_resync_s_concurrent_writes_stays_exact(
    client: httpx.AsyncClient, org: Org
) -> None:
    await _write(client, org, "repo", [{"identifier": f"r{i:02d}"} for i in range(20)], agent())
    resync_start = datetime.now(UTC).isoformat()
    first = await _page(client, org, limit=8, before=resync_start)
    # While Ocean pages, the resync creates entities on both sides of the cursor and
    # changes one not read yet.
    await _write(
        client,
        org,
        "repo",
        [{"identifier": "r00a"}, {"identifier": "r15a"}, {"identifier": "r19", "title": "new"}],
        agent(),
    )
    rest = await _all(client, org, before=resync_start, **{"from": first["next"]})

    seen = [(e["blueprint"], e["identifier"]) for e in first["entities"]] + rest
    assert seen == [("repo", f"r{i:02d}") for i in range(19)]


async def test_another_orgs_entities_never_appear_even_with_the_same_integration(
    client: httpx.AsyncClient, make_org: OrgFactory, org: Org
) -> None:
    other = await make_org()
    await _blueprints(client, other)
    await _write(client, org, "repo", [{"identifier": "mine"}], agent())
    await _write(client, other, "repo", [{"identifier": f"theirs{i}"} for i in range(3)], agent())
    await _write(client, other, "repo", [{"identifier": "same"}], agent())
    await _write(client, org, "repo", [{"identifier": "same"}], agent())

    assert await _all(client, org) == [("repo", "mine"), ("repo", "same")]
    # A cursor pointing before the other org's rows reads none of them either.
    start = datasource.encode_cursor(datasource.Position("", "", ""))
    assert await _all(client, org, **{"from": start}) == [("repo", "mine"), ("repo", "same")]


async def test_a_member_may_read_them(client: httpx.AsyncClient, db: Database, org: Org) -> None:
    await _write(client, org, "repo", [{"identifier": "a"}], agent())
    member = await app_headers(client, db, org.org_id, ["Member"])

    r = await client.post(
        ROUTE,
        json={"datasource_prefix": PREFIX, "datasource_suffix": SUFFIX, "limit": 10},
        headers=member,
    )

    assert r.status_code == 200, r.text
    assert [e["identifier"] for e in r.json()["entities"]] == ["a"]


async def test_needs_a_token(client: httpx.AsyncClient) -> None:
    r = await client.post(ROUTE, json={"datasource_prefix": PREFIX, "datasource_suffix": SUFFIX})

    assert r.status_code == 401
    assert r.json()["ok"] is False


async def test_wins_over_a_blueprint_named_entities(client: httpx.AsyncClient, org: Org) -> None:
    r = await client.post(
        "/v1/blueprints",
        json={"identifier": "entities", "title": "Entities", "schema": {"properties": {}}},
        headers=org.headers,
    )
    assert r.status_code == 201, r.text
    await _write(client, org, "entities", [{"identifier": "datasource-entities"}], agent())

    page = await _page(client, org)
    got = await client.get(
        "/v1/blueprints/entities/entities/datasource-entities", headers=org.headers
    )

    assert page["entities"] == [
        {"identifier": "datasource-entities", "blueprint": "entities", "relations": {}}
    ]
    assert got.status_code == 200
    assert got.json()["entity"]["identifier"] == "datasource-entities"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"limit": 10_001}, "10000"),
        ({"limit": 0}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"datasource_prefix": ""}, "datasource_prefix"),
        ({"datasource_prefix": None}, "datasource_prefix"),
        ({"datasource_suffix": 7}, "datasource_suffix"),
        ({"datasource_prefix": "port-ocean/\u0000"}, "datasource_prefix"),
        ({"before": "yesterday"}, "before"),
        ({"from": "not a cursor"}, "from"),
        ({"from": "WyJhIl0"}, "from"),  # a JSON list of one string
        ({"datasourcePrefix": PREFIX}, "datasourcePrefix"),
        # A cursor nesting JSON arrays deeper than the parser goes.
        ({"from": base64.urlsafe_b64encode(b"[" * 2900).decode().rstrip("=")}, "from"),
        ({"before": "9999-12-31T23:59:59-10:00"}, "before"),
        ({"before": "0001-01-01T00:00:00+10:00"}, "before"),
    ],
)
async def test_bad_input_is_a_clear_422(
    client: httpx.AsyncClient, org: Org, body: dict[str, Any], needle: str
) -> None:
    r = await client.post(
        ROUTE,
        json={"datasource_prefix": PREFIX, "datasource_suffix": SUFFIX, "limit": 10, **body},
        headers=org.headers,
    )

    assert r.status_code == 422, r.text
    error = r.json()
    assert error["ok"] is False
    assert error["error"]
    assert needle in r.text


async def test_a_body_that_is_not_an_object_is_refused(client: httpx.AsyncClient, org: Org) -> None:
    r = await client.post(ROUTE, content=b"[1, 2]", headers=org.headers)

    assert r.status_code == 422
    assert r.json()["ok"] is False


async def test_a_missing_suffix_is_refused(client: httpx.AsyncClient, org: Org) -> None:
    r = await client.post(ROUTE, json={"datasource_prefix": PREFIX}, headers=org.headers)

    assert r.status_code == 422
    assert "datasource_suffix" in r.text


def test_a_prefix_s_upper_bound_is_the_next_string_in_code_point_order() -> None:
    assert datasource.prefix_upper_bound("port-ocean/gh/") == "port-ocean/gh0"
    assert datasource.prefix_upper_bound("a\U0010ffff") == "b"
    assert datasource.prefix_upper_bound("\U0010ffff") is None
    assert datasource.prefix_upper_bound("a\ud7ff") == "a\ue000"


async def test_a_page_walks_the_datasource_index_in_order_under_row_level_security(
    db: Database, org: Org
) -> None:
    cursor = datasource.Position(agent(), "repo", "r1")
    sql, args = datasource.page_arguments(
        org.org_id, PREFIX, SUFFIX, 5000, datetime.now(UTC), cursor
    )
    async with db.tenant(org.org_id) as tx:
        await tx.execute(datasource.ORDERED_WALK)
        plan = "\n".join(r[0] for r in await tx.fetch("EXPLAIN " + sql, *args))

    top = plan.split("SubPlan")[0]
    assert "Index Scan using ix_entities_datasource" in top, plan
    assert "Sort" not in top, plan
    conditions = top.split("Index Cond:", 1)[1].split("Filter:")[0]
    assert "datasource >= " in conditions
    assert "datasource < " in conditions
    assert "ROW(datasource, " in conditions


async def test_like_wildcards_in_the_prefix_and_suffix_are_taken_literally(
    client: httpx.AsyncClient, org: Org
) -> None:
    await _write(client, org, "repo", [{"identifier": "a"}], agent(identifier="my_git%"))
    await _write(client, org, "repo", [{"identifier": "b"}], agent(identifier="myXgitXX"))

    r = await client.post(
        ROUTE,
        json={"datasource_prefix": PREFIX, "datasource_suffix": "/my_git%/exporter"},
        headers=org.headers,
    )

    assert r.status_code == 200, r.text
    assert [e["identifier"] for e in r.json()["entities"]] == ["a"]


async def test_a_prefix_and_suffix_that_overlap_match_only_what_holds_both(
    client: httpx.AsyncClient, org: Org
) -> None:
    await _write(client, org, "repo", [{"identifier": "a"}], "port-ocean/x/")

    r = await client.post(
        ROUTE,
        json={"datasource_prefix": "port-ocean/x/", "datasource_suffix": "/x/"},
        headers=org.headers,
    )

    assert r.status_code == 200, r.text
    assert r.json()["entities"] == []


# Ocean (0.56) adds its event's type and resync id to the query of every entity write and
# delete; Portolan takes them and ignores them.
OCEAN_INFO = {"ocean_info_event_type": "resync", "ocean_info_resync_id": "a1b2c3"}


async def test_entity_writes_and_deletes_accept_ocean_s_event_parameters(
    client: httpx.AsyncClient, org: Org
) -> None:
    h = {**org.headers, "User-Agent": agent()}
    upsert = {"upsert": "true", "merge": "true", "validation_only": "false", **OCEAN_INFO}
    calls = [
        ("POST", "/v1/blueprints/repo/entities", upsert, {"identifier": "one"}),
        (
            "POST",
            "/v1/blueprints/repo/entities/bulk",
            upsert,
            {"entities": [{"identifier": "two"}, {"identifier": "three"}]},
        ),
        (
            "DELETE",
            "/v1/blueprints/repo/entities/one",
            {"delete_dependents": "true", **OCEAN_INFO},
            None,
        ),
        (
            "POST",
            "/v1/blueprints/repo/bulk/entities/delete",
            {"delete_dependents": "false", **OCEAN_INFO},
            {"entities": ["two"]},
        ),
        (
            "DELETE",
            "/v1/blueprints/repo/all-entities",
            {"delete_blueprint": "false", **OCEAN_INFO},
            None,
        ),
    ]
    statuses = []
    for method, path, params, body in calls:
        r = await client.request(method, path, params=params, json=body, headers=h)
        statuses.append((path, r.status_code, r.text if r.status_code >= 300 else ""))

    assert [s[1] for s in statuses] == [201, 200, 200, 200, 200], statuses


async def test_a_page_ends_early_past_its_byte_budget_and_paging_stays_exact(
    client: httpx.AsyncClient, org: Org, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However much an org's entities link to, one page's memory stays bounded: past
    PAGE_BYTES it ends with a `next`, and the pages still cover everything once."""
    repos = [
        {"identifier": f"r{i:02d}", "relations": {"uses": [f"u{i}-{j}" for j in range(30)]}}
        for i in range(12)
    ]
    await _write(client, org, "repo", repos, agent())
    monkeypatch.setattr(datasource, "PAGE_BYTES", 2000)
    first = await _page(client, org)
    assert 1 <= len(first["entities"]) < 12 and first["next"]
    everything = await _all(client, org)
    mine = sorted(i for b, i in everything if b == "repo" and i.startswith("r"))
    assert mine == [f"r{i:02d}" for i in range(12)]
    assert len(everything) == len(set(everything))
