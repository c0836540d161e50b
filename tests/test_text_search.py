"""Text rules (`contains`, `beginsWith`, `endsWith` and their negations) on titles,
identifiers and string properties: literal terms whatever their characters, the same
answers with and without the trigram indexes, those indexes read under row-level security,
capped per org with the range indexes, and fenced per tenant."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import asyncpg
import httpx
import pytest

from app.config import Settings
from app.db.database import Database, compile_query
from app.search import indexes
from app.search.service import Search, scope_for
from tests.conftest import Org, OrgFactory

BLUEPRINT = {
    "identifier": "service",
    "title": "Service",
    "schema": {
        "properties": {
            "name": {"type": "string"},
            "language": {"type": "string", "enum": ["go", "python"]},
            "coverage": {"type": "number"},
        }
    },
}

# (identifier, title, name): terms with LIKE's own characters, backslashes, case and
# characters outside ASCII; one entity without a name (negations match it).
ROWS: list[tuple[str, str, str | None]] = [
    ("pct-1", "100% done", "rate 100%"),
    ("pct-2", "100 percent", "rate 100"),
    ("snake_id", "snake_case", "under_score"),
    ("snakeXid", "snakeXcase", "underXscore"),
    ("back-1", "back\\slash", "C:\\temp\\x"),
    ("back-2", "backslash", "C:/temp/x"),
    ("cafe-1", "Café ünïcode", "naïve"),
    ("cafe-2", "CAFÉ", "NAÏVE"),
    ("jp-1", "日本語のサービス", "東京"),
    ("rocket", "launch 🚀 pad", "🚀"),
    ("mixed", "MiXeD Case", "MiXeD"),
    ("short", "ab", None),
]

TERMS: dict[str, list[str]] = {
    "contains": ["%", "_", "\\", "0% d", "e_c", "Café", "café", "日本", "🚀", "ab", "MiXeD", "ixe"],
    "beginsWith": ["100%", "snake_", "Caf", "日本", "C:\\", "b"],
    "endsWith": ["\\slash", "_case", "ode", "100%", "x"],
}
NEGATIONS = {
    "contains": "doesNotContains",
    "beginsWith": "doesNotBeginsWith",
    "endsWith": "doesNotEndsWith",
}
FIELDS = {"$identifier": 0, "$title": 1, "name": 2}


def _matches(op: str, value: str, term: str) -> bool:
    if op == "contains":
        return term in value
    if op == "beginsWith":
        return value.startswith(term)
    return value.endswith(term)


def _expected(field: str, op: str, term: str) -> list[str]:
    positive_op = next((p for p, n in NEGATIONS.items() if n == op), op)
    positive = {
        row[0]
        for row in ROWS
        if row[FIELDS[field]] is not None and _matches(positive_op, str(row[FIELDS[field]]), term)
    }
    if op == positive_op:
        return sorted(positive)
    return sorted({row[0] for row in ROWS} - positive)


async def _create(client: httpx.AsyncClient, org: Org, body: dict[str, Any]) -> None:
    r = await client.post("/v1/blueprints", json=body, headers=org.headers)
    assert r.status_code == 201, r.text


async def _insert(db: Database, org: Org, rows: list[tuple[str, str, str | None]]) -> None:
    async with db.system() as tx:
        for ident, title, name in rows:
            props = {} if name is None else {"name": name}
            await tx.execute(
                "INSERT INTO entities (org_id, blueprint, identifier, title, properties, "
                "created_by, updated_by) VALUES ($1, 'service', $2, $3, $4::text::jsonb, 's', 's')",
                org.org_id,
                ident,
                title,
                json.dumps(props),
            )


async def _fill(db: Database, org: Org, count: int, word: str) -> None:
    """`count` services: titles `<word> <i>`, names `<word>-<md5 of i>` (rare trigrams)."""
    async with db.system() as tx:
        await tx.execute(
            """
            INSERT INTO entities (org_id, blueprint, identifier, title, properties,
                                  created_by, updated_by)
            SELECT $1, 'service', 'svc-' || lpad(i::text, 6, '0'), $3 || ' ' || i,
                   jsonb_build_object('name', $3 || '-' || md5(i::text),
                                      'language', CASE WHEN i % 2 = 0 THEN 'go'
                                                  ELSE 'python' END),
                   's', 's'
            FROM generate_series(0, $2 - 1) AS i
            """,
            org.org_id,
            count,
            word,
        )


async def _reconcile(
    settings: Settings, *orgs: Org, min_entities: int = 1, cap: int | None = None
) -> indexes.Reconciled:
    assert settings.database_url is not None
    return await indexes.reconcile(
        settings.database_url,
        min_entities=min_entities,
        max_per_org=cap,
        orgs=[o.org_id for o in orgs],
    )


async def _text_indexes(db: Database, org: Org) -> dict[str, str]:
    """The org's valid trigram indexes: name -> definition."""
    async with db.system() as tx:
        rows = await tx.fetch(
            "SELECT c.relname, pg_get_indexdef(c.oid) AS ddl FROM pg_index i "
            "JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE i.indrelid = 'entities'::regclass AND c.relname LIKE $1 AND i.indisvalid "
            "AND pg_get_indexdef(c.oid) LIKE '%gin_trgm_ops%'",
            f"ixr_{org.org_id.hex}_%",
        )
    return {r["relname"]: r["ddl"] for r in rows}


async def _found(client: httpx.AsyncClient, org: Org, rules: list[dict[str, Any]]) -> list[str]:
    r = await client.post(
        "/v1/blueprints/service/entities/search",
        json={"query": {"combinator": "and", "rules": rules}, "limit": 1000},
        headers=org.headers,
    )
    assert r.status_code == 200, r.text
    return sorted(e["identifier"] for e in r.json()["entities"])


async def _plan(db: Database, org: Org, rules: list[dict[str, Any]]) -> str:
    """EXPLAIN of the statement the planner plans freely for a page of 50 (the one a page
    runs when its first window of entities in identifier order does not fill it)."""
    query = {"combinator": "and", "rules": rules}
    async with db.tenant(org.org_id) as tx:
        search = Search(await scope_for(tx, "service", query), query)
        sql, args = compile_query(search.statement(None, 51), (), search.values())
        return "\n".join(r[0] for r in await tx.fetch("EXPLAIN " + sql, *args))


async def _analyze(settings: Settings) -> None:
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute("ANALYZE entities")
    finally:
        await conn.close()


async def test_text_rules_take_terms_literally_with_and_without_indexes(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, settings: Settings
) -> None:
    org = await make_org()
    await _create(client, org, BLUEPRINT)
    await _insert(db, org, ROWS)
    cases = [
        (field, op, term)
        for field in FIELDS
        for positive, terms in TERMS.items()
        for term in terms
        for op in (positive, NEGATIONS[positive])
    ]

    async def answers() -> dict[tuple[str, str, str], list[str]]:
        return {
            c: await _found(client, org, [{"property": c[0], "operator": c[1], "value": c[2]}])
            for c in cases
        }

    without = await answers()
    for case, found in without.items():
        assert found == _expected(*case), case
    done = await _reconcile(settings, org)
    assert not done.failed
    assert len(await _text_indexes(db, org)) == 3  # identifier, title, name
    assert await answers() == without


async def test_a_nul_in_a_text_term_is_refused(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _create(client, org, BLUEPRINT)
    r = await client.post(
        "/v1/blueprints/service/entities/search",
        json={
            "query": {
                "combinator": "and",
                "rules": [{"property": "$title", "operator": "contains", "value": "a\u0000b"}],
            }
        },
        headers=org.headers,
    )
    assert r.status_code == 422, r.text


async def test_large_blueprints_get_text_indexes_on_title_identifier_and_free_strings(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, settings: Settings
) -> None:
    org = await make_org()
    await _create(client, org, BLUEPRINT)
    await _fill(db, org, 30, "Service")
    await _reconcile(settings, org, min_entities=31)
    assert await _text_indexes(db, org) == {}
    await _reconcile(settings, org, min_entities=30)
    found = await _text_indexes(db, org)
    # An enum's handful of values is not searched by substring: no index for `language`.
    assert sorted(
        next(col for col in ("(identifier ", "(title ", "'name'::text", "'language'") if col in d)
        for d in found.values()
    ) == ["'name'::text", "(identifier ", "(title "]
    for ddl in found.values():
        assert "USING gin" in ddl and str(org.org_id) in ddl and "'service'::text" in ddl


async def test_text_rules_read_their_trigram_index_under_row_level_security(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, settings: Settings
) -> None:
    """20k services: a rare term's page is found through the trigram index of the title,
    the identifier or the property it searches (not by reading the tenant's rows in order
    until 51 match), for each of contains, beginsWith and endsWith."""
    org = await make_org()
    await _create(client, org, BLUEPRINT)
    await _fill(db, org, 20_000, "Service")
    await _reconcile(settings, org)
    found = await _text_indexes(db, org)
    by_column = {
        col: name
        for name, ddl in found.items()
        for col in ("identifier", "title", "name")
        if f"({col} " in ddl or f"'{col}'::text" in ddl
    }
    assert len(by_column) == 3, found
    await _analyze(settings)
    cases = [
        ("$title", "contains", "ice 1234", "title"),
        ("$title", "endsWith", "ice 12345", "title"),
        ("$identifier", "contains", "-01234", "identifier"),
        ("$identifier", "beginsWith", "svc-01234", "identifier"),
        ("name", "contains", _md5(12345)[3:13], "name"),
        ("name", "beginsWith", "Service-" + _md5(12345)[:8], "name"),
        ("name", "endsWith", _md5(12345)[-10:], "name"),
    ]
    for prop, op, term, column in cases:
        plan = await _plan(db, org, [{"property": prop, "operator": op, "value": term}])
        assert by_column[column] in plan, f"{prop} {op} {term}:\n{plan}"
        assert "~~" in plan and "Seq Scan" not in plan, plan
    # Equalities (and the joins on identifiers) keep their btrees: the trigram indexes
    # are keyed in the "C" collation, which only the text rules compare in.
    for prop, value in (("$identifier", "svc-012345"), ("$title", "Service 12345")):
        plan = await _plan(db, org, [{"property": prop, "operator": "=", "value": value}])
        assert not any(name in plan for name in found), plan
    # The answers through the index are the rows that match.
    term = _md5(777)[:4]
    r = await _found(client, org, [{"property": "name", "operator": "contains", "value": term}])
    assert r == sorted(f"svc-{i:06d}" for i in range(20_000) if term in _md5(i))


def _md5(i: int) -> str:
    return hashlib.md5(str(i).encode(), usedforsecurity=False).hexdigest()


async def test_text_indexes_count_against_the_orgs_cap(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, settings: Settings
) -> None:
    """Range and text indexes share the org's cap: flagged ones first in property order,
    then the automatic title and identifier indexes; what is left out is reported."""
    org = await make_org()
    props: dict[str, Any] = {f"p{i}": {"type": "string", "indexed": True} for i in range(3)}
    props["n0"] = {"type": "number", "indexed": True}
    await _create(
        client, org, {"identifier": "service", "title": "S", "schema": {"properties": props}}
    )
    await _fill(db, org, 1, "x")  # large enough for automatic indexes at min_entities=1
    done = await _reconcile(settings, org, cap=3)
    assert len(done.created) == 3
    kept = await _text_indexes(db, org)
    assert sorted(p for p in props if any(f"'{p}'::text" in d for d in kept.values())) == [
        "p0",
        "p1",
    ]
    assert sorted(c.rsplit(".", 1)[1] for c in done.capped) == ["$identifier", "$title", "p2"]
    assert all(c.startswith("text index of ") for c in done.capped)
    # A lower cap drops text indexes as it does range ones.
    again = await _reconcile(settings, org, cap=1)
    assert len(again.dropped) == 2 and await _text_indexes(db, org) == {}


async def test_the_indexed_keyword_takes_string_properties(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    body: dict[str, Any] = {
        "identifier": "service",
        "title": "S",
        "schema": {"properties": {"flag": {"type": "boolean", "indexed": True}}},
    }
    r = await client.post("/v1/blueprints", json=body, headers=org.headers)
    assert r.status_code == 422 and "/schema/properties/flag/indexed" in r.text, r.text
    body["schema"]["properties"] = {"name": {"type": "string", "indexed": True}}
    await _create(client, org, body)


@pytest.mark.parametrize("op", ["contains", "beginsWith"])
async def test_text_search_never_sees_another_tenants_entities(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    db: Database,
    settings: Settings,
    op: str,
) -> None:
    ours, theirs = await make_org(), await make_org()
    for org in (ours, theirs):
        await _create(client, org, BLUEPRINT)
    await _fill(db, ours, 2000, "secret")
    await _fill(db, theirs, 200, "public")
    await _reconcile(settings, ours, theirs)
    mine = await _text_indexes(db, ours)
    assert mine and all(
        str(ours.org_id) in d and str(theirs.org_id) not in d for d in mine.values()
    )
    rules = [{"property": "$title", "operator": op, "value": "secret 19"}]
    assert len(await _found(client, ours, rules)) == 111
    assert await _found(client, theirs, rules) == []
    for prop in ("$title", "name"):
        assert (
            await _found(client, theirs, [{"property": prop, "operator": op, "value": "s"}]) == []
        )
    # Their statements are never answered from our indexes.
    plan = await _plan(db, theirs, rules)
    assert not any(name in plan for name in mine), plan
