"""Search: Port's rule language over a small catalog, typed comparisons, relatedTo walks,
keyset pagination, 422s that name the rule, and tenancy."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import Org, OrgFactory

SERVICE = {
    "identifier": "service",
    "title": "Service",
    "schema": {
        "properties": {
            "language": {"type": "string", "enum": ["python", "go", "java"]},
            "coverage": {"type": "number"},
            "onCall": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "lastDeploy": {"type": "string", "format": "date-time"},
            "expires": {"type": "string", "format": "timer"},
            "repo": {"type": "string", "format": "url"},
            "config": {"type": "object"},
        }
    },
    "relations": {
        "team": {"target": "team", "required": False, "many": False},
        "dependsOn": {"target": "service", "required": False, "many": True},
        "system": {"target": "system", "required": True, "many": False},
    },
}


async def _catalog(client: httpx.AsyncClient, org: Org) -> None:
    for body in (
        {
            "identifier": "team",
            "title": "Team",
            "schema": {"properties": {"size": {"type": "number"}}},
        },
        {
            "identifier": "system",
            "title": "System",
            "schema": {"properties": {"coverage": {"type": "string"}}},
        },
        SERVICE,
    ):
        r = await client.post("/v1/blueprints", json=body, headers=org.headers)
        assert r.status_code == 201, r.text

    async def bulk(bp: str, items: list[dict[str, Any]]) -> None:
        r = await client.post(
            f"/v1/blueprints/{bp}/entities/bulk", json={"entities": items}, headers=org.headers
        )
        assert r.status_code == 200, r.text

    await bulk("team", [{"identifier": "core", "properties": {"size": 5}}, {"identifier": "web"}])
    await bulk("system", [{"identifier": "shop", "properties": {"coverage": "high"}}])
    await bulk(
        "service",
        [
            {
                "identifier": "db",
                "title": "Database",
                "team": "core",
                "properties": {
                    "language": "go",
                    "coverage": 91.5,
                    "onCall": True,
                    "tags": ["storage", "tier1"],
                    "lastDeploy": "2026-11-20T10:00:00Z",
                    "expires": "2020-01-01T00:00:00Z",
                    "config": {"replicas": 3},
                },
                "relations": {"team": "core", "system": "shop"},
            },
            {
                "identifier": "api",
                "title": "API gateway",
                "team": ["web", "core"],
                "properties": {
                    "language": "python",
                    "coverage": 40,
                    "onCall": False,
                    "tags": ["edge"],
                    "lastDeploy": "2026-10-01T00:00:00+02:00",
                    "expires": "2999-01-01T00:00:00Z",
                    "repo": "https://git.example.com/api",
                },
                "relations": {"team": "web", "system": "shop", "dependsOn": ["db"]},
            },
            {
                "identifier": "web-ui",
                "title": "Web UI",
                "properties": {"language": "python", "coverage": 9, "tags": []},
                "relations": {"system": "shop", "dependsOn": ["api"]},
            },
            {
                "identifier": "batch_1",
                "properties": {"language": "java"},
                "relations": {"system": "shop"},
            },
        ],
    )


@pytest.fixture
async def org(client: httpx.AsyncClient, make_org: OrgFactory) -> Org:
    created = await make_org()
    await _catalog(client, created)
    return created


async def _ids(
    client: httpx.AsyncClient,
    org: Org,
    rules: list[Any],
    combinator: str = "and",
    bp: str = "service",
) -> list[str]:
    r = await client.post(
        f"/v1/blueprints/{bp}/entities/search",
        json={"query": {"combinator": combinator, "rules": rules}},
        headers=org.headers,
    )
    assert r.status_code == 200, r.text
    return [e["identifier"] for e in r.json()["entities"]]


def rule(prop: str, op: str, value: Any = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"property": prop, "operator": op, **extra}
    if value is not None or op in ("=", "!="):
        out["value"] = value
    return out


CASES: list[tuple[dict[str, Any], list[str]]] = [
    (rule("language", "=", "python"), ["api", "web-ui"]),
    (rule("language", "!=", "python"), ["batch_1", "db"]),
    (rule("coverage", ">", 40), ["db"]),
    (rule("coverage", ">=", 40), ["api", "db"]),
    (rule("coverage", "<", 40), ["web-ui"]),
    (rule("coverage", "<=", 9), ["web-ui"]),
    (rule("coverage", "=", 91.5), ["db"]),
    (rule("onCall", "=", False), ["api"]),
    (rule("tags", "contains", "edge"), ["api"]),
    (rule("tags", "doesNotContains", "edge"), ["batch_1", "db", "web-ui"]),
    (rule("tags", "containsAny", ["tier1", "edge"]), ["api", "db"]),
    (rule("tags", "=", ["storage", "tier1"]), ["db"]),
    (rule("tags", "isEmpty"), ["batch_1", "web-ui"]),
    (rule("tags", "isNotEmpty"), ["api", "db"]),
    (rule("repo", "isEmpty"), ["batch_1", "db", "web-ui"]),
    (rule("language", "in", ["go", "java"]), ["batch_1", "db"]),
    (rule("language", "notIn", ["go", "java"]), ["api", "web-ui"]),
    (rule("repo", "contains", "example.com"), ["api"]),
    (rule("repo", "beginsWith", "https://"), ["api"]),
    (rule("repo", "doesNotBeginsWith", "https://"), ["batch_1", "db", "web-ui"]),
    (rule("repo", "endsWith", "/api"), ["api"]),
    (rule("config", "=", {"replicas": 3}), ["db"]),
    # date-times compare as instants, whatever their offset
    (rule("lastDeploy", ">", "2026-09-30T21:30:00Z"), ["api", "db"]),
    (rule("lastDeploy", "<", "2026-09-30T22:30:00Z"), ["api"]),
    (rule("lastDeploy", "=", "2026-09-30T22:00:00Z"), ["api"]),
    (
        rule(
            "lastDeploy", "between", {"from": "2026-11-01T00:00:00Z", "to": "2026-12-01T00:00:00Z"}
        ),
        ["db"],
    ),
    (
        rule(
            "lastDeploy",
            "notBetween",
            {"from": "2026-11-01T00:00:00Z", "to": "2026-12-01T00:00:00Z"},
        ),
        ["api", "batch_1", "web-ui"],
    ),
    (rule("expires", "isExpired"), ["db"]),
    (rule("expires", "isNotExpired"), ["api", "batch_1", "web-ui"]),
    # meta-properties
    (rule("$identifier", "=", "api"), ["api"]),
    (rule("$identifier", "beginsWith", "batch_1"), ["batch_1"]),
    (rule("$identifier", "endsWith", "h_1"), ["batch_1"]),
    (rule("$identifier", "beginsWith", "batc_"), []),  # LIKE wildcards are literal
    (rule("$title", "contains", "API"), ["api"]),
    (rule("$title", "isEmpty"), ["batch_1"]),
    (rule("$team", "=", "core"), ["api", "db"]),
    (rule("$team", "in", ["web"]), ["api"]),
    (rule("$team", "isEmpty"), ["batch_1", "web-ui"]),
    (rule("$blueprint", "=", "service"), ["api", "batch_1", "db", "web-ui"]),
    (rule("$createdAt", "between", {"preset": "lastDay"}), ["api", "batch_1", "db", "web-ui"]),
    (rule("$updatedAt", "<", "2000-01-01T00:00:00Z"), []),
    # relations as properties
    (rule("team", "=", "core"), ["db"]),
    (rule("team", "isEmpty"), ["batch_1", "web-ui"]),
    (rule("dependsOn", "in", ["db", "api"]), ["api", "web-ui"]),
    (rule("dependsOn", "notIn", ["db"]), ["batch_1", "db", "web-ui"]),
]


@pytest.mark.parametrize(
    ("one", "expected"), CASES, ids=[f"{c[0]['property']} {c[0]['operator']}" for c in CASES]
)
async def test_operator(
    client: httpx.AsyncClient, org: Org, one: dict[str, Any], expected: list[str]
) -> None:
    assert await _ids(client, org, [one]) == expected


async def test_rules_nest_with_and_and_or(client: httpx.AsyncClient, org: Org) -> None:
    rules = [
        rule("language", "=", "python"),
        {"combinator": "or", "rules": [rule("coverage", ">", 30), rule("$title", "=", "Web UI")]},
    ]
    assert await _ids(client, org, rules) == ["api", "web-ui"]
    assert await _ids(
        client, org, [rule("coverage", ">", 90), rule("language", "=", "java")], "or"
    ) == ["batch_1", "db"]
    assert await _ids(client, org, []) == ["api", "batch_1", "db", "web-ui"]


async def test_related_to_walks_the_graph_both_ways(client: httpx.AsyncClient, org: Org) -> None:
    # web-ui -> api -> db (dependsOn); every service -> shop (system); db -> core, api -> web
    up = [
        {
            "operator": "relatedTo",
            "blueprint": "service",
            "value": "web-ui",
            "direction": "upstream",
        }
    ]
    assert await _ids(client, org, up) == ["api", "db"]
    one_hop = [{**up[0], "maxHops": 1}]
    assert await _ids(client, org, one_hop) == ["api"]
    down = [
        {"operator": "relatedTo", "blueprint": "service", "value": "db", "direction": "downstream"}
    ]
    assert await _ids(client, org, down) == ["api", "web-ui"]
    both = [{"operator": "relatedTo", "blueprint": "service", "value": "api"}]
    assert await _ids(client, org, both) == ["db", "web-ui"]
    # every service depends on the shop system through a required relation
    by_system = [
        {"operator": "relatedTo", "blueprint": "system", "value": "shop", "direction": "downstream"}
    ]
    assert await _ids(client, org, by_system) == ["api", "batch_1", "db", "web-ui"]
    optional_only = [{**by_system[0], "required": False}]
    assert await _ids(client, org, optional_only) == []
    teams = [
        {
            "operator": "relatedTo",
            "blueprint": "service",
            "value": "web-ui",
            "direction": "upstream",
        }
    ]
    assert await _ids(client, org, teams, bp="team") == ["core", "web"]


async def test_related_to_survives_cycles(client: httpx.AsyncClient, org: Org) -> None:
    r = await client.patch(
        "/v1/blueprints/service/entities/db",
        json={"relations": {"dependsOn": ["web-ui"]}},
        headers=org.headers,
    )
    assert r.status_code == 200, r.text
    up = [
        {"operator": "relatedTo", "blueprint": "service", "value": "api", "direction": "upstream"}
    ]
    assert await _ids(client, org, up) == ["api", "db", "web-ui"]


BAD: list[tuple[dict[str, Any], str]] = [
    (rule("onCall", ">", 1), "/rules/0/operator"),
    (rule("nope", "=", "x"), "/rules/0/property"),
    (rule("coverage", ">", "ten"), "/rules/0/value"),
    (rule("coverage", "=", "ten"), "/rules/0/value"),
    (rule("lastDeploy", ">", "yesterday-ish"), "/rules/0/value"),
    (rule("lastDeploy", "between", {"preset": "lastDecade"}), "/rules/0/value/preset"),
    (rule("language", "beginsWith", 5), "/rules/0/value"),
    (rule("language", "in", "python"), "/rules/0/value"),
    (rule("language", "frobnicates", "x"), "/rules/0/operator"),
    (rule("tags", "beginsWith", "x"), "/rules/0/operator"),
    (rule("$nope", "=", "x"), "/rules/0/property"),
    (rule("$team", ">", "x"), "/rules/0/operator"),
    ({"operator": "relatedTo", "blueprint": "nope", "value": "x"}, "/rules/0/blueprint"),
    (
        {"operator": "relatedTo", "blueprint": "service", "value": "x", "maxHops": 16},
        "/rules/0/maxHops",
    ),
    (
        {"operator": "relatedTo", "blueprint": "service", "value": "x", "direction": "sideways"},
        "/rules/0/direction",
    ),
    (
        {"property": {"context": "user", "property": "$team"}, "operator": "=", "value": "x"},
        "/rules/0/property",
    ),
    ({"operator": "="}, "/rules/0/property"),
]


@pytest.mark.parametrize(("bad", "pointer"), BAD)
async def test_a_rule_that_cannot_apply_is_a_422_naming_it(
    client: httpx.AsyncClient, org: Org, bad: dict[str, Any], pointer: str
) -> None:
    r = await client.post(
        "/v1/blueprints/service/entities/search",
        json={"query": {"combinator": "and", "rules": [bad]}},
        headers=org.headers,
    )
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["ok"] is False
    assert pointer in [d["pointer"] for d in body["details"]], body


async def test_every_bad_rule_is_reported_at_once(client: httpx.AsyncClient, org: Org) -> None:
    query = {
        "combinator": "and",
        "rules": [rule("nope", "=", 1), {"combinator": "or", "rules": [rule("onCall", "<", 2)]}],
    }
    r = await client.post(
        "/v1/blueprints/service/entities/search", json={"query": query}, headers=org.headers
    )
    assert r.status_code == 422
    assert [d["pointer"] for d in r.json()["details"]] == [
        "/rules/0/property",
        "/rules/1/rules/0/operator",
    ]


async def test_pages_follow_the_cursor_without_skips_or_repeats(
    client: httpx.AsyncClient, org: Org
) -> None:
    items = [{"identifier": f"t{i:03d}", "properties": {"size": i}} for i in range(25)]
    r = await client.post(
        "/v1/blueprints/team/entities/bulk", json={"entities": items}, headers=org.headers
    )
    assert r.status_code == 200
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        body: dict[str, Any] = {
            "limit": 10,
            "query": {"combinator": "and", "rules": [rule("size", ">=", 0)]},
        }
        if cursor:
            body["from"] = cursor
        page = (
            await client.post("/v1/blueprints/team/entities/search", json=body, headers=org.headers)
        ).json()
        pages += 1
        seen += [e["identifier"] for e in page["entities"]]
        if pages == 1:
            # a concurrent write before the cursor does not shift later pages
            await client.post(
                "/v1/blueprints/team/entities", json={"identifier": "a-new"}, headers=org.headers
            )
        cursor = page.get("next")
        if not cursor:
            break
    assert pages == 3
    assert seen == sorted(seen) and len(seen) == len(set(seen)) == 26  # 25 + "core"


async def test_a_forged_cursor_is_a_422(client: httpx.AsyncClient, org: Org) -> None:
    r = await client.post(
        "/v1/blueprints/service/entities/search", json={"from": "not-a-cursor"}, headers=org.headers
    )
    assert r.status_code == 422 and r.json()["ok"] is False


async def test_limit_is_1_to_1000(client: httpx.AsyncClient, org: Org) -> None:
    for limit in (0, 1001):
        r = await client.post(
            "/v1/blueprints/service/entities/search", json={"limit": limit}, headers=org.headers
        )
        assert r.status_code == 422


async def test_results_have_the_entity_shape_and_honour_include(
    client: httpx.AsyncClient, org: Org
) -> None:
    full = await client.post(
        "/v1/blueprints/service/entities/search",
        json={"query": {"combinator": "and", "rules": [rule("$identifier", "=", "api")]}},
        headers=org.headers,
    )
    one = (await client.get("/v1/blueprints/service/entities/api", headers=org.headers)).json()
    assert full.json()["entities"] == [one["entity"]]
    picked = await client.post(
        "/v1/blueprints/service/entities/search",
        json={
            "include": ["$title", "language", "team"],
            "query": {"combinator": "and", "rules": [rule("$identifier", "=", "api")]},
        },
        headers=org.headers,
    )
    assert picked.json()["entities"] == [
        {
            "identifier": "api",
            "blueprint": "service",
            "title": "API gateway",
            "properties": {"language": "python"},
            "relations": {"team": "web"},
        }
    ]


async def test_global_search_spans_blueprints(client: httpx.AsyncClient, org: Org) -> None:
    r = await client.post(
        "/v1/entities/search",
        json={
            "combinator": "or",
            "rules": [rule("$identifier", "=", "core"), rule("$identifier", "=", "db")],
        },
        headers=org.headers,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [(e["blueprint"], e["identifier"]) for e in body["entities"]] == [
        ("service", "db"),
        ("team", "core"),
    ]
    assert body["matchingBlueprints"] == ["service", "system", "team"]
    # a property typed differently in two blueprints needs a $blueprint rule
    mixed = await client.post(
        "/v1/entities/search",
        json={"combinator": "and", "rules": [rule("coverage", ">", 1)]},
        headers=org.headers,
    )
    assert mixed.status_code == 422 and "$blueprint" in mixed.json()["message"]
    narrowed = await client.post(
        "/v1/entities/search",
        json={
            "combinator": "and",
            "rules": [rule("$blueprint", "=", "service"), rule("coverage", ">", 50)],
        },
        headers=org.headers,
    )
    assert narrowed.json()["matchingBlueprints"] == ["service"]
    assert [e["identifier"] for e in narrowed.json()["entities"]] == ["db"]


async def test_global_search_finds_an_integrations_entities_by_datasource(
    client: httpx.AsyncClient, org: Org
) -> None:
    r = await client.post(
        "/v1/blueprints/team/entities",
        json={"identifier": "synced"},
        headers={**org.headers, "User-Agent": "port-ocean/0.12.9 (fake)"},
    )
    assert r.status_code == 201
    query = {
        "combinator": "and",
        "rules": [
            {"combinator": "and", "rules": [rule("$datasource", "contains", "port-ocean/0.12.9")]}
        ],
    }
    found = await client.post(
        "/v1/entities/search",
        json=query,
        headers=org.headers,
        params=[("include", "identifier"), ("include", "blueprint")],
    )
    assert found.json()["entities"] == [{"identifier": "synced", "blueprint": "team"}]


async def test_search_never_crosses_tenants(
    client: httpx.AsyncClient, org: Org, make_org: OrgFactory
) -> None:
    other = await make_org()
    await _catalog(client, other)
    r = await client.patch(
        "/v1/blueprints/service/entities/db", json={"title": "Theirs"}, headers=other.headers
    )
    assert r.status_code == 200
    mine = await client.post(
        "/v1/blueprints/service/entities/search",
        json={"query": {"combinator": "and", "rules": [rule("$title", "=", "Theirs")]}},
        headers=org.headers,
    )
    assert mine.json()["entities"] == []
    walk = await _ids(
        client,
        org,
        [
            {
                "operator": "relatedTo",
                "blueprint": "service",
                "value": "web-ui",
                "direction": "upstream",
            }
        ],
    )
    assert walk == ["api", "db"]
    everything = await client.post(
        "/v1/entities/search", json={"combinator": "and", "rules": []}, headers=org.headers
    )
    titles = {e["title"] for e in everything.json()["entities"]}
    assert "Theirs" not in titles and len(everything.json()["entities"]) == 7
    # another org's blueprint is unknown here
    third = await make_org()
    r = await client.post("/v1/blueprints/service/entities/search", json={}, headers=third.headers)
    assert r.status_code == 404 and r.json()["error"] == "not_found"


async def test_indexed_operators_never_scan_the_table(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Any
) -> None:
    """Over 100k entities in five tenants, with values common to all of them, the plans
    for the indexed operators read through indexes, never a sequential scan."""
    from app.db.database import compile_query
    from app.search.service import Search, scope_for

    orgs = []
    for _ in range(5):
        org = await make_org()
        await _catalog(client, org)
        orgs.append(org)
    # A realistic shape: five tenants of 20k services, written straight into the tables.
    async with db.system() as tx:
        for org in orgs:
            await tx.execute(
                """
                INSERT INTO entities (org_id, blueprint, identifier, properties, created_by,
                                      updated_by)
                SELECT $1, 'service', 's' || lpad(i::text, 5, '0'),
                       jsonb_build_object(
                           'language', CASE WHEN i % 3 = 0 THEN 'go' ELSE 'python' END,
                           'coverage', i % 100,
                           'tags', jsonb_build_array('common', 't' || (i % 500))),
                       'seed', 'seed'
                FROM generate_series(0, 19999) AS i
                """,
                org.org_id,
            )
            await tx.execute(
                """
                INSERT INTO entity_relations (org_id, source_blueprint, source_identifier,
                                              relation, target_identifier, target_blueprint)
                SELECT $1, 'service', 's' || lpad(i::text, 5, '0'), 'dependsOn',
                       's' || lpad((i / 2)::text, 5, '0'), 'service'
                FROM generate_series(2, 19999) AS i
                """,
                org.org_id,
            )
    async with db.system() as tx:
        # Statistics from every row, not a sample: which rows a sample took (the suite's
        # other tenants share the table) changed the rare value's plan from run to run.
        await tx.execute("SET LOCAL default_statistics_target = 1000")
        await tx.execute("ANALYZE entities")
        await tx.execute("ANALYZE entity_relations")
    queries = {
        "rare equality": [rule("tags", "contains", "t7")],
        "common equality": [rule("language", "=", "python")],
        "common array value": [rule("tags", "contains", "common")],
        "in": [rule("language", "in", ["go", "java"])],
        "relatedTo": [
            {
                "operator": "relatedTo",
                "blueprint": "service",
                "value": "s00042",
                "direction": "upstream",
            }
        ],
        "combination": [
            rule("language", "=", "go"),
            rule("tags", "contains", "t9"),
            rule("$identifier", "beginsWith", "s0"),
        ],
    }
    async with db.tenant(orgs[0].org_id) as tx:
        for name, rules in queries.items():
            query = {"combinator": "and", "rules": rules}
            search = Search(await scope_for(tx, "service", query), query)
            sql, args = compile_query(search.statement(None, 51), (), search.values())
            plan = "\n".join(r[0] for r in await tx.fetch("EXPLAIN " + sql, *args))
            assert "Seq Scan on entities" not in plan, f"{name}:\n{plan}"
    # Under row-level security only leakproof operators can be index conditions: a rare
    # value's page is found through the GIN index by a tenant too, not by reading the
    # tenant's rows in order until 51 match.
    async with db.tenant(orgs[0].org_id) as tx:
        query = {"combinator": "and", "rules": [rule("tags", "contains", "t7")]}
        search = Search(await scope_for(tx, "service", query), query)
        sql, args = compile_query(search.statement(None, 51), (), search.values())
        plan = "\n".join(r[0] for r in await tx.fetch("EXPLAIN " + sql, *args))
        assert "ix_entities_properties" in plan, plan


async def _aggregate(client: httpx.AsyncClient, org: Org, body: dict[str, Any]) -> httpx.Response:
    return await client.post("/v1/entities/aggregate", json=body, headers=org.headers)


SERVICES = {"combinator": "and", "rules": [rule("$blueprint", "=", "service")]}


async def test_aggregate_functions(client: httpx.AsyncClient, org: Org) -> None:
    async def result(body: dict[str, Any]) -> Any:
        r = await _aggregate(client, org, body)
        assert r.status_code == 200, r.text
        return r.json()["result"]

    assert await result({"func": "count", "query": SERVICES}) == 4
    assert await result({"func": "count", "query": {"combinator": "and", "rules": []}}) == 7
    assert await result({"func": "sum", "property": "coverage", "query": SERVICES}) == 140.5
    assert await result(
        {"func": "average", "property": "coverage", "query": SERVICES}
    ) == pytest.approx(140.5 / 3)
    assert await result({"func": "min", "property": "coverage", "query": SERVICES}) == 9
    assert await result({"func": "max", "property": "coverage", "query": SERVICES}) == 91.5
    assert await result({"func": "median", "property": "coverage", "query": SERVICES}) == 40
    python = {
        "combinator": "and",
        "rules": [rule("$blueprint", "=", "service"), rule("language", "=", "python")],
    }
    assert await result({"func": "sum", "property": "coverage", "query": python}) == 49
    per_day = await result({"func": "average", "averageOf": "day", "query": SERVICES})
    assert per_day == 4.0  # all created within the last day


async def test_aggregate_facets_and_groups(client: httpx.AsyncClient, org: Org) -> None:
    languages = await _aggregate(
        client, org, {"func": "countValues", "property": "language", "query": SERVICES}
    )
    assert languages.json()["result"] == [
        {"value": "python", "count": 2},
        {"value": "go", "count": 1},
        {"value": "java", "count": 1},
    ]
    tags = await _aggregate(
        client, org, {"func": "countValues", "property": "tags", "query": SERVICES}
    )
    assert tags.json()["result"] == [
        {"value": "edge", "count": 1},
        {"value": "storage", "count": 1},
        {"value": "tier1", "count": 1},
    ]
    teams = await _aggregate(
        client, org, {"func": "countValues", "property": "$team", "query": SERVICES}
    )
    assert teams.json()["result"] == [{"value": "core", "count": 2}, {"value": "web", "count": 1}]
    links = await _aggregate(
        client, org, {"func": "countValues", "relation": "dependsOn", "query": SERVICES}
    )
    assert links.json()["result"] == [{"value": "api", "count": 1}, {"value": "db", "count": 1}]
    grouped = await _aggregate(
        client,
        org,
        {"func": "sum", "property": "coverage", "groupBy": "language", "query": SERVICES},
    )
    assert grouped.json()["result"] == [
        {"value": "go", "result": 91.5},
        {"value": "python", "result": 49},
        {"value": "java", "result": None},
    ]
    by_blueprint = await _aggregate(
        client,
        org,
        {"func": "count", "groupBy": "$blueprint", "query": {"combinator": "and", "rules": []}},
    )
    assert by_blueprint.json()["result"] == [
        {"value": "service", "result": 4},
        {"value": "team", "result": 2},
        {"value": "system", "result": 1},
    ]


@pytest.mark.parametrize(
    ("body", "pointer"),
    [
        ({"func": "sum", "property": "language", "query": SERVICES}, "/property"),
        ({"func": "sum", "query": SERVICES}, "/property"),
        ({"func": "countValues", "property": "nope", "query": SERVICES}, "/property"),
        ({"func": "countValues", "relation": "nope", "query": SERVICES}, "/relation"),
        ({"func": "count", "groupBy": "config", "query": SERVICES}, "/groupBy"),
        (
            {"func": "count", "query": {"combinator": "and", "rules": [rule("nope", "=", 1)]}},
            "/query/rules/0/property",
        ),
        (
            {"func": "average", "averageOf": "day", "measureTimeBy": "language", "query": SERVICES},
            "/measureTimeBy",
        ),
    ],
)
async def test_aggregate_refuses_what_cannot_apply(
    client: httpx.AsyncClient, org: Org, body: dict[str, Any], pointer: str
) -> None:
    r = await _aggregate(client, org, body)
    assert r.status_code == 422, r.text
    assert pointer in [d["pointer"] for d in r.json()["details"]]


async def test_aggregate_counts_one_tenant(
    client: httpx.AsyncClient, org: Org, make_org: OrgFactory
) -> None:
    other = await make_org()
    await _catalog(client, other)
    r = await _aggregate(client, org, {"func": "count", "query": SERVICES})
    assert r.json()["result"] == 4
    empty = await make_org()
    r = await _aggregate(
        client, empty, {"func": "count", "query": {"combinator": "and", "rules": []}}
    )
    assert r.status_code == 200 and r.json()["result"] == 0


async def test_a_search_past_the_time_limit_is_a_422(db: Any, make_org: OrgFactory) -> None:
    import sqlalchemy as sa

    from app.kit.errors import Invalid
    from app.search.sql import run_bounded

    org = await make_org()
    async with db.tenant(org.org_id) as tx:
        assert await tx.fetchval("SHOW statement_timeout") == "15s"  # the setting's default
        assert await tx.fetchval("SHOW jit") == "off"
        await tx.execute("SET LOCAL statement_timeout = 50")
        with pytest.raises(Invalid, match="time limit"):
            await run_bounded(tx, sa.select(sa.func.pg_sleep(2)))


async def test_definitions_changed_by_another_process_are_used_at_once(
    client: httpx.AsyncClient, org: Org, db: Any
) -> None:
    """Search remembers each org's blueprints; a change committed by any process (here,
    straight in the database) is seen by the very next search."""
    assert await _ids(client, org, [rule("language", "=", "go")]) == ["db"]
    async with db.tenant(org.org_id) as tx:
        await tx.execute(
            "UPDATE blueprints SET schema = jsonb_set(schema, '{properties,extra}', "
            '\'{"type": "number"}\'), calculation_properties = '
            '\'{"twice": {"type": "number", "calculation": ".properties.extra * 2"}}\', '
            "version = version + 1 WHERE org_id = $1 AND identifier = 'service'",
            org.org_id,
        )
        await tx.execute(
            "UPDATE entities SET properties = properties || '{\"extra\": 21}' "
            "WHERE org_id = $1 AND identifier = 'db'",
            org.org_id,
        )
    # a query that compiles against the remembered definitions answers with the new ones
    r = await client.post(
        "/v1/blueprints/service/entities/search",
        json={"query": {"combinator": "and", "rules": [rule("language", "=", "go")]}},
        headers=org.headers,
    )
    assert r.json()["entities"][0]["properties"]["twice"] == 42
    got = await client.get("/v1/blueprints/service/entities/db", headers=org.headers)
    assert got.json()["entity"]["properties"]["twice"] == 42
    # and a rule on the new property compiles against the new definition
    async with db.tenant(org.org_id) as tx:
        await tx.execute(
            "UPDATE blueprints SET schema = jsonb_set(schema, '{properties,more}', "
            '\'{"type": "number"}\'), version = version + 1 '
            "WHERE org_id = $1 AND identifier = 'service'",
            org.org_id,
        )
    assert await _ids(client, org, [rule("extra", "=", 21), rule("more", "isEmpty")]) == ["db"]


async def test_attach_title_to_relation_names_each_target(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    """Port's `attach_title_to_relation=true`: each related entity as {identifier, title},
    on the search routes and the entity reads; the identifier alone otherwise."""
    org, other = await make_org(), await make_org()
    r = await client.post(
        "/v1/blueprints",
        json={"identifier": "team", "title": "Team", "schema": {"properties": {}}},
        headers=other.headers,
    )
    assert r.status_code == 201, r.text
    r = await client.post(
        "/v1/blueprints/team/entities",
        json={"identifier": "core", "title": "Another tenant's core"},
        headers=other.headers,
    )
    assert r.status_code == 201, r.text
    for body in (
        {"identifier": "team", "title": "Team", "schema": {"properties": {}}},
        {
            "identifier": "svc",
            "title": "Service",
            "schema": {"properties": {}},
            "relations": {
                "owner": {"target": "team", "required": False, "many": False},
                "uses": {"target": "svc", "required": False, "many": True},
            },
        },
    ):
        r = await client.post("/v1/blueprints", json=body, headers=org.headers)
        assert r.status_code == 201, r.text
    for bp, items in (
        ("team", [{"identifier": "core", "title": "Core Team"}]),
        (
            "svc",
            [
                {"identifier": "db", "title": "Database"},
                {"identifier": "cache"},
                {
                    "identifier": "api",
                    "title": "API",
                    "relations": {"owner": "core", "uses": ["db", "cache"]},
                },
            ],
        ),
    ):
        r = await client.post(
            f"/v1/blueprints/{bp}/entities/bulk", json={"entities": items}, headers=org.headers
        )
        assert r.status_code == 200, r.text
    titled = {
        "owner": {"identifier": "core", "title": "Core Team"},
        "uses": [{"identifier": "cache", "title": None}, {"identifier": "db", "title": "Database"}],
    }
    plain = {"owner": "core", "uses": ["cache", "db"]}
    only_api = {"combinator": "and", "rules": [rule("$identifier", "=", "api")]}
    for flag, expected in (("true", titled), ("false", plain)):
        params = {"attach_title_to_relation": flag}
        r = await client.post(
            "/v1/blueprints/svc/entities/search",
            params=params,
            json={"query": only_api},
            headers=org.headers,
        )
        assert r.status_code == 200, r.text
        assert r.json()["entities"][0]["relations"] == expected
        r = await client.post(
            "/v1/entities/search", params=params, json=only_api, headers=org.headers
        )
        assert r.status_code == 200, r.text
        assert r.json()["entities"][0]["relations"] == expected
        r = await client.get("/v1/blueprints/svc/entities/api", params=params, headers=org.headers)
        assert r.status_code == 200, r.text
        assert r.json()["entity"]["relations"] == expected
        r = await client.get("/v1/blueprints/svc/entities", params=params, headers=org.headers)
        assert r.status_code == 200, r.text
        (api,) = [e for e in r.json()["entities"] if e["identifier"] == "api"]
        assert api["relations"] == expected
    r = await client.get(
        "/v1/blueprints/svc/entities/db",
        params={"attach_title_to_relation": "true"},
        headers=org.headers,
    )
    assert r.json()["entity"]["relations"] == {"owner": None, "uses": []}


async def _hierarchy(client: httpx.AsyncClient, org: Org) -> None:
    """team (parent: a self-relation) <- service (team) <- deployment (service):
    group <- domain <- tribe <- squad-a, squad-b; api, web on squad-a; db on squad-b."""
    for body in (
        {
            "identifier": "team",
            "title": "Team",
            "schema": {"properties": {}},
            "relations": {"parent": {"target": "team", "required": False, "many": False}},
        },
        {
            "identifier": "service",
            "title": "Service",
            "schema": {"properties": {}},
            "relations": {"team": {"target": "team", "required": False, "many": False}},
        },
        {
            "identifier": "deployment",
            "title": "Deployment",
            "schema": {"properties": {}},
            "relations": {"service": {"target": "service", "required": False, "many": False}},
        },
    ):
        r = await client.post("/v1/blueprints", json=body, headers=org.headers)
        assert r.status_code == 201, r.text
    for bp, items in (
        (
            "team",
            [
                {"identifier": "group"},
                {"identifier": "domain", "relations": {"parent": "group"}},
                {"identifier": "tribe", "relations": {"parent": "domain"}},
                {"identifier": "squad-a", "relations": {"parent": "tribe"}},
                {"identifier": "squad-b", "relations": {"parent": "tribe"}},
            ],
        ),
        (
            "service",
            [
                {"identifier": "api", "relations": {"team": "squad-a"}},
                {"identifier": "web", "relations": {"team": "squad-a"}},
                {"identifier": "db", "relations": {"team": "squad-b"}},
            ],
        ),
        (
            "deployment",
            [
                {"identifier": "api-prod", "relations": {"service": "api"}},
                {"identifier": "db-prod", "relations": {"service": "db"}},
            ],
        ),
    ):
        r = await client.post(
            f"/v1/blueprints/{bp}/entities/bulk", json={"entities": items}, headers=org.headers
        )
        assert r.status_code == 200, r.text


async def test_match_any_follows_a_path_of_relations(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _hierarchy(client, org)
    other = await make_org()
    await _hierarchy(client, other)  # the same names in another tenant: never returned

    async def found(bp: str, prop: Any, value: Any) -> list[str]:
        r = await client.post(
            f"/v1/blueprints/{bp}/entities/search",
            json={
                "query": {
                    "combinator": "and",
                    "rules": [{"property": prop, "operator": "matchAny", "value": value}],
                }
            },
            headers=org.headers,
        )
        assert r.status_code == 200, r.text
        return sorted(e["identifier"] for e in r.json()["entities"])

    # From the searched entities along their relations to the given identifiers.
    assert await found("service", "team", "squad-a") == ["api", "web"]
    assert await found("service", {"path": ["team"]}, ["squad-a", "squad-b"]) == [
        "api",
        "db",
        "web",
    ]
    assert await found("deployment", {"path": ["service", "team", "parent"]}, "tribe") == [
        "api-prod",
        "db-prod",
    ]
    assert await found("team", {"path": [{"relation": "parent", "maxHops": 3}]}, "group") == [
        "domain",
        "squad-a",
        "squad-b",
        "tribe",
    ]
    assert await found("team", {"path": ["parent", "parent"]}, "domain") == [
        "squad-a",
        "squad-b",
    ]
    # From the given entities of fromBlueprint, forward along the path: what it reaches.
    assert await found(
        "team", {"path": ["parent", "parent"], "fromBlueprint": "team"}, "squad-a"
    ) == ["domain"]
    assert await found(
        "team",
        {"path": [{"relation": "parent", "maxHops": 3}], "fromBlueprint": "team"},
        "squad-a",
    ) == ["domain", "group", "tribe"]
    assert await found("team", {"path": ["team"], "fromBlueprint": "service"}, ["api", "db"]) == [
        "squad-a",
        "squad-b",
    ]
    # Across blueprints: the blueprints that have the path's first relation.
    r = await client.post(
        "/v1/entities/search",
        json={
            "combinator": "and",
            "rules": [{"property": {"path": ["team"]}, "operator": "matchAny", "value": "squad-b"}],
        },
        headers=org.headers,
    )
    assert r.status_code == 200, r.text
    assert [e["identifier"] for e in r.json()["entities"]] == ["db"]


async def test_match_any_refuses_what_cannot_apply(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _hierarchy(client, org)
    for prop, value, pointer in (
        ({"path": ["nope"]}, "x", "/rules/0/property/path/0"),
        ({"path": ["team", "owner"]}, "x", "/rules/0/property/path/1"),
        ({"path": [{"relation": "team", "maxHops": 2}]}, "x", "/rules/0/property/path/0/maxHops"),
        (
            {"path": [{"relation": "team", "maxHops": 16}]},
            "x",
            "/rules/0/property/path/0/maxHops",
        ),
        ({"path": []}, "x", "/rules/0/property/path"),
        ({"path": ["team"], "fromBlueprint": "ghost"}, "x", "/rules/0/property/fromBlueprint"),
        ({"path": ["team"]}, 3, "/rules/0/value"),
        ({"path": ["team"]}, [], "/rules/0/value"),
    ):
        r = await client.post(
            "/v1/blueprints/service/entities/search",
            json={
                "query": {
                    "combinator": "and",
                    "rules": [{"property": prop, "operator": "matchAny", "value": value}],
                }
            },
            headers=org.headers,
        )
        assert r.status_code == 422, (prop, r.text)
        assert pointer in r.text, (prop, pointer, r.text)
    r = await client.post(
        "/v1/blueprints/team/entities/search",
        json={
            "query": {
                "combinator": "and",
                "rules": [
                    {
                        "property": {
                            "path": [
                                {"relation": "parent", "maxHops": 2},
                                {"relation": "parent", "maxHops": 2},
                            ]
                        },
                        "operator": "matchAny",
                        "value": "x",
                    }
                ],
            }
        },
        headers=org.headers,
    )
    assert r.status_code == 422 and "/rules/0/property/path/1" in r.text, r.text


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        ([rule("coverage", ">=", 10)], lambda i: i % 100 >= 10),  # dense: windows fill pages
        ([rule("coverage", "=", 37)], lambda i: i % 100 == 37),  # sparse: past the window
        (
            [rule("coverage", "<", 50), rule("language", "=", "go")],
            lambda i: i % 100 < 50 and i % 3 == 0,
        ),
    ],
)
async def test_windowed_pages_neither_skip_nor_repeat(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    db: Any,
    monkeypatch: pytest.MonkeyPatch,
    rules: list[dict[str, Any]],
    expected: Any,
) -> None:
    """A blueprint search page reads a window of entities in identifier order first and
    the planner's statement after it: across window edges and page edges every match comes
    once, in order."""
    from app.search import service

    monkeypatch.setattr(service, "WINDOW", 40)
    org = await make_org()
    await _catalog(client, org)
    async with db.system() as tx:
        await tx.execute(
            """
            INSERT INTO entities (org_id, blueprint, identifier, properties, created_by,
                                  updated_by)
            SELECT $1, 'service', 'w' || lpad(i::text, 4, '0'),
                   jsonb_build_object('coverage', i % 100,
                                      'language', CASE WHEN i % 3 = 0 THEN 'go' ELSE 'java' END),
                   'seed', 'seed'
            FROM generate_series(0, 299) AS i
            """,
            org.org_id,
        )
    query = {"combinator": "and", "rules": [rule("$identifier", "beginsWith", "w"), *rules]}
    seen: list[str] = []
    cursor = None
    for _ in range(100):
        body: dict[str, Any] = {"query": query, "limit": 7}
        if cursor:
            body["from"] = cursor
        r = await client.post(
            "/v1/blueprints/service/entities/search", json=body, headers=org.headers
        )
        assert r.status_code == 200, r.text
        page = r.json()
        seen += [e["identifier"] for e in page["entities"]]
        cursor = page.get("next")
        if not cursor:
            break
    assert seen == [f"w{i:04d}" for i in range(300) if expected(i)]


async def test_several_related_to_rules_in_one_query(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    """Two top-level relatedTo rules (joined) and one inside an `or` group (a condition)
    keep their own values."""
    org = await make_org()
    await _hierarchy(client, org)
    query = {
        "combinator": "and",
        "rules": [
            {
                "operator": "relatedTo",
                "blueprint": "team",
                "value": "squad-a",
                "direction": "downstream",
            },
            {
                "operator": "relatedTo",
                "blueprint": "deployment",
                "value": "api-prod",
                "direction": "upstream",
            },
            {
                "combinator": "or",
                "rules": [
                    {
                        "operator": "relatedTo",
                        "blueprint": "team",
                        "value": "tribe",
                        "direction": "downstream",
                        "maxHops": 2,
                    },
                    rule("$identifier", "=", "nothing"),
                ],
            },
        ],
    }
    r = await client.post(
        "/v1/blueprints/service/entities/search", json={"query": query}, headers=org.headers
    )
    assert r.status_code == 200, r.text
    assert [e["identifier"] for e in r.json()["entities"]] == ["api"]
    # maxHops 1 from tribe reaches squads only: no service.
    query["rules"][2]["rules"][0]["maxHops"] = 1
    r = await client.post(
        "/v1/blueprints/service/entities/search", json={"query": query}, headers=org.headers
    )
    assert r.status_code == 200 and r.json()["entities"] == [], r.text
    r = await client.post(
        "/v1/entities/aggregate",
        json={
            "func": "count",
            "query": {**query, "rules": [*query["rules"][:2], rule("$blueprint", "=", "service")]},
        },
        headers=org.headers,
    )
    assert r.status_code == 200 and r.json()["result"] == 1, r.text
