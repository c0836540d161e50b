"""Entity writes under faults: concurrent deletes of relation targets, deadlocks between
concurrent bulk writers, refused connections, and text PostgreSQL cannot store."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.catalog import entities
from app.config import Settings
from app.db.database import Database
from app.db.rls import APP_ROLE
from tests.conftest import Org, OrgFactory


async def _blueprints(client: httpx.AsyncClient, org: Org) -> None:
    for body in (
        {
            "identifier": "team",
            "title": "Team",
            "schema": {"properties": {"size": {"type": "number"}}},
        },
        {
            "identifier": "service",
            "title": "Service",
            "schema": {"properties": {"language": {"type": "string"}}},
            "relations": {
                "team": {"target": "team", "required": False, "many": False},
                "dependsOn": {"target": "service", "required": False, "many": True},
            },
        },
    ):
        r = await client.post("/v1/blueprints", json=body, headers=org.headers)
        assert r.status_code == 201, r.text


@pytest.fixture
async def org(client: httpx.AsyncClient, make_org: OrgFactory) -> Org:
    created = await make_org()
    await _blueprints(client, created)
    return created


async def _wait_for_lock_wait(db: Database) -> None:
    """Until some connection of this database waits for a row lock (10 s at most)."""
    deadline = asyncio.get_running_loop().time() + 10
    while asyncio.get_running_loop().time() < deadline:
        async with db.system() as tx:
            waiting = await tx.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            )
        if waiting:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("no writer came to wait for the delete's lock")


async def test_a_target_deleted_during_a_bulk_write_fails_only_its_items(
    client: httpx.AsyncClient, org: Org, db: Database
) -> None:
    teams = [{"identifier": f"t{i:03d}"} for i in range(100)]
    r = await client.post(
        "/v1/blueprints/team/entities/bulk", json={"entities": teams}, headers=org.headers
    )
    assert r.status_code == 200, r.text
    services = [
        {"identifier": f"s{i:03d}", "relations": {"team": f"t{i % 100:03d}"}} for i in range(300)
    ]
    writer = entities.Writer(actor="test", origin="API", datasource=None)
    # Another transaction deletes team t007 and has not committed when the bulk write
    # checks its targets; it commits while the bulk write waits.
    async with db.tenant(org.org_id) as tx:
        assert await entities.delete_many(
            tx, "team", ["t007"], delete_dependents=False, writer=writer
        ) == ["t007"]
        bulk = asyncio.create_task(
            client.post(
                "/v1/blueprints/service/entities/bulk",
                json={"entities": services},
                headers=org.headers,
            )
        )
        await _wait_for_lock_wait(db)
    r = await asyncio.wait_for(bulk, 30)
    assert r.status_code == 207, r.text
    body = r.json()
    assert len(body["entities"]) == 297
    assert [(e["index"], e["statusCode"]) for e in body["errors"]] == [
        (7, 404),
        (107, 404),
        (207, 404),
    ]
    assert all("t007" in e["message"] for e in body["errors"])
    count = await client.get("/v1/blueprints/service/entities-count", headers=org.headers)
    assert count.json()["count"] == 297


async def _deadlock_a_bulk_write(
    client: httpx.AsyncClient, org: Org, db: Database
) -> httpx.Response:
    """A real deadlock: the request locks services a, b (in that order) while another
    transaction holds b and then asks for a. PostgreSQL aborts the request's transaction
    (the other one waits longer before it checks for deadlocks)."""
    r = await client.post(
        "/v1/blueprints/service/entities/bulk",
        json={"entities": [{"identifier": "a"}, {"identifier": "b"}]},
        headers=org.headers,
    )
    assert r.status_code == 200, r.text
    changed = [
        {"identifier": "a", "properties": {"language": "go"}},
        {"identifier": "b", "properties": {"language": "go"}},
    ]
    lock = "SELECT 1 FROM entities WHERE org_id = $1 AND blueprint = 'service' AND identifier = $2 FOR UPDATE"
    async with db.system(org.org_id) as tx:
        await tx.execute("SET LOCAL deadlock_timeout = '10s'")
        await tx.fetch(lock, org.org_id, "b")
        bulk = asyncio.create_task(
            client.post(
                "/v1/blueprints/service/entities/bulk",
                json={"entities": changed},
                headers=org.headers,
                params={"upsert": "true"},
            )
        )
        await _wait_for_lock_wait(db)
        await tx.fetch(lock, org.org_id, "a")  # granted once the request's tx is aborted
    return await asyncio.wait_for(bulk, 30)


async def test_a_deadlocked_request_is_run_again(
    client: httpx.AsyncClient, org: Org, db: Database
) -> None:
    r = await _deadlock_a_bulk_write(client, org, db)
    assert r.status_code == 200, r.text
    async with db.tenant(org.org_id) as tx:
        rows = await tx.fetch(
            "SELECT identifier, properties FROM entities WHERE blueprint = 'service' "
            "ORDER BY identifier"
        )
        updates = await tx.fetchval(
            "SELECT count(*) FROM entity_events WHERE blueprint = 'service' AND action = 'UPDATE'"
        )
    assert [(row["identifier"], row["properties"]) for row in rows] == [
        ("a", {"language": "go"}),
        ("b", {"language": "go"}),
    ]
    assert updates == 2  # the aborted attempt left nothing behind


async def test_a_deadlock_past_the_retries_is_a_503_with_retry_after(
    client: httpx.AsyncClient, org: Org, db: Database, settings: Settings
) -> None:
    attempts = settings.db_retry_attempts
    settings.db_retry_attempts = 1
    try:
        r = await _deadlock_a_bulk_write(client, org, db)
    finally:
        settings.db_retry_attempts = attempts
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    assert r.json()["ok"] is False and r.json()["error"] == "transaction_conflict"
    assert "deadlock" not in r.text


async def test_concurrent_bulk_upserts_linking_each_others_batches_never_fail(
    client: httpx.AsyncClient, org: Org, make_org: OrgFactory
) -> None:
    """4 writers, batches of 500 upserts whose `many` relations point at entities of the
    other writers' batches, created when missing: no request may fail."""
    writers, rounds, size = 4, 4, 500

    def batch(w: int, r: int) -> list[dict[str, Any]]:
        return [
            {
                "identifier": f"w{w}-{i:03d}",
                "properties": {"language": f"round-{r}"},
                "relations": {
                    "dependsOn": [
                        f"w{(w + 1) % writers}-{(i + r) % size:03d}",
                        f"w{(w + 2) % writers}-{(i * 7 + r) % size:03d}",
                        f"w{(w + 3) % writers}-{(size - 1 - i + r) % size:03d}",
                    ]
                },
            }
            for i in range(size)
        ]

    async def write(w: int, r: int) -> httpx.Response:
        return await client.post(
            "/v1/blueprints/service/entities/bulk",
            json={"entities": batch(w, r)},
            headers=org.headers,
            params={"upsert": "true", "create_missing_related_entities": "true"},
        )

    statuses: list[int] = []
    for r in range(rounds):
        answers = await asyncio.wait_for(
            asyncio.gather(*(write(w, r) for w in range(writers))), 120
        )
        statuses += [a.status_code for a in answers]
        for answer in answers:
            assert answer.status_code == 200, answer.text
    assert statuses == [200] * (writers * rounds)
    # The last round's links are the stored ones.
    got = await client.get("/v1/blueprints/service/entities/w0-010", headers=org.headers)
    last = batch(0, rounds - 1)[10]["relations"]["dependsOn"]
    assert got.json()["entity"]["relations"]["dependsOn"] == sorted(last)
    # Another tenant's catalog of the same shape holds none of them.
    other = await make_org()
    await _blueprints(client, other)
    count = await client.get("/v1/blueprints/service/entities-count", headers=other.headers)
    assert count.json()["count"] == 0


async def test_refused_database_connections_are_a_503_with_retry_after(
    client: httpx.AsyncClient, org: Org, db: Database, app: FastAPI, settings: Settings
) -> None:
    """PostgreSQL refusing a connection (53300, too many clients: here the role's
    CONNECTION LIMIT) is a 503 with Retry-After, and the next request is served."""
    role = f"portolan_limited_{uuid.uuid4().hex[:10]}"
    async with db.system() as tx:
        await tx.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 1")
        await tx.execute(f"GRANT {APP_ROLE} TO {role}")
    url = settings.database_url
    assert url is not None
    limited_url = url.replace("postgresql://postgres@", f"postgresql://{role}@", 1)
    assert limited_url != url
    limited = await Database.connect(settings.model_copy(update={"database_url": limited_url}))
    held = await limited.pool.acquire()  # the role's one connection
    app.state.db = limited
    try:
        r = await client.get("/v1/blueprints", headers=org.headers)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "2"
        assert r.json()["ok"] is False and r.json()["error"] == "unavailable"
        limited.pool.release(held)
        r = await client.get("/v1/blueprints", headers=org.headers)
        assert r.status_code == 200, r.text
        assert {bp["identifier"] for bp in r.json()["blueprints"]} == {"team", "service"}
    finally:
        app.state.db = db
        await limited.close()
        async with db.system() as tx:
            await tx.execute(f"DROP ROLE {role}")


NUL = "\x00"
LONE = "\ud800"  # an unpaired surrogate: JSON's "\ud800" escape decodes to it


async def _send(
    client: httpx.AsyncClient, url: str, body: Any, org: Org, **params: str
) -> httpx.Response:
    """POST `body` as JSON with every non-ASCII character escaped (as clients send an
    unpaired surrogate: `\\ud800`)."""
    return await client.post(
        url,
        content=json.dumps(body).encode(),
        headers={**org.headers, "content-type": "application/json"},
        params=params,
    )


async def test_unstorable_text_fails_only_its_item_of_a_bulk(
    client: httpx.AsyncClient, org: Org, make_org: OrgFactory
) -> None:
    items: list[dict[str, Any]] = [
        {"identifier": f"s{i:04d}", "properties": {"language": "go"}} for i in range(1000)
    ]
    items[3]["properties"]["language"] = f"go{NUL}"
    items[10]["title"] = f"title {LONE}"
    items[20]["properties"] = {f"lang{NUL}": "go"}
    items[30]["relations"] = {"dependsOn": ["s0001", f"x{LONE}"]}
    items[40]["team"] = [f"team{NUL}"]
    items[50]["icon"] = LONE
    items[55][f"extra{LONE}"] = 1
    items[60]["properties"]["language"] = "emoji 😀 and \\u0000 as text are fine"
    r = await _send(client, "/v1/blueprints/service/entities/bulk", {"entities": items}, org)
    assert r.status_code == 207, r.text
    body = r.json()
    assert len(body["entities"]) == 993
    errors = [(e["index"], e["identifier"], e["statusCode"]) for e in body["errors"]]
    assert errors == [(i, f"s{i:04d}", 422) for i in (3, 10, 20, 30, 40, 50, 55)]
    pointers = [e["message"].split(":")[0] for e in body["errors"]]
    assert pointers == [
        "/properties/language",
        "/title",
        "/properties/lang\\u0000",
        "/relations/dependsOn/1",
        "/team/0",
        "/icon",
        "/extra\\ud800",
    ]
    got = await client.get("/v1/blueprints/service/entities/s0060", headers=org.headers)
    assert got.json()["entity"]["properties"]["language"] == items[60]["properties"]["language"]
    # One entity alone: a 422.
    r = await _send(
        client, "/v1/blueprints/service/entities", {"identifier": "one", "title": f"a{LONE}"}, org
    )
    assert r.status_code == 422, r.text
    r = await _send(
        client, "/v1/blueprints/service/entities", {"identifier": "one", "title": f"a{NUL}b"}, org
    )
    assert r.status_code == 422, r.text
    assert r.json()["ok"] is False and r.json()["error"] == "invalid_request"
    # Past the services' checks (a path parameter): still a 422.
    for url in ("/v1/blueprints/service/entities/x%00y", "/v1/blueprints/x%ED%A0%80y"):
        r = await client.get(url, headers=org.headers)
        assert r.status_code in (404, 422), (url, r.text)
    r = await client.get("/v1/blueprints/service/entities/x%00y", headers=org.headers)
    assert r.status_code == 422 and r.json()["error"] == "invalid_request", r.text
    # Nothing of it reached another tenant.
    other = await make_org()
    await _blueprints(client, other)
    count = await client.get("/v1/blueprints/service/entities-count", headers=other.headers)
    assert count.json()["count"] == 0


@pytest.mark.parametrize("text", [f"go{NUL}", f"go{LONE}"], ids=["nul", "surrogate"])
async def test_unstorable_text_in_a_query_filter_is_a_422(
    client: httpx.AsyncClient, org: Org, text: str
) -> None:
    queries: list[dict[str, Any]] = [
        {"combinator": "and", "rules": [{"property": "language", "operator": "=", "value": text}]},
        {
            "combinator": "or",
            "rules": [
                {"property": "$title", "operator": "contains", "value": "x"},
                {"property": "language", "operator": "in", "value": ["go", text]},
            ],
        },
        {
            "combinator": "and",
            "rules": [{"operator": "relatedTo", "blueprint": "team", "value": text}],
        },
        {"combinator": "and", "rules": [{"property": text, "operator": "isEmpty"}]},
    ]
    for query in queries:
        for r in (
            await _send(client, "/v1/blueprints/service/entities/search", {"query": query}, org),
            await _send(client, "/v1/entities/search", query, org),
            await _send(client, "/v1/entities/aggregate", {"func": "count", "query": query}, org),
        ):
            assert r.status_code == 422, (query, r.text)
            assert r.json()["ok"] is False


async def test_unstorable_text_in_a_blueprint_is_a_422_naming_it(
    client: httpx.AsyncClient, org: Org
) -> None:
    for body, pointer in (
        ({"identifier": "b1", "title": f"x{NUL}", "schema": {"properties": {}}}, "/title"),
        (
            {
                "identifier": "b2",
                "title": "B2",
                "schema": {"properties": {"p": {"type": "string", "description": LONE}}},
            },
            "/schema/properties/p/description",
        ),
    ):
        r = await _send(client, "/v1/blueprints", body, org)
        assert r.status_code == 422, r.text
        assert [d.get("pointer") for d in r.json()["details"]] == [pointer], r.text


async def test_a_streamed_search_failing_on_its_first_page_is_an_error_answer(
    client: httpx.AsyncClient, org: Org, db: Database, app: FastAPI, settings: Settings
) -> None:
    """The first page of a streamed read (across blueprints, or a blueprint's list) runs
    before the headers are sent: when it fails (here the statement time limit, while
    another transaction holds a table the page reads), the client gets that error, not a
    200 whose body breaks off."""
    r = await client.post(
        "/v1/blueprints/team/entities/bulk",
        json={"entities": [{"identifier": "t1"}, {"identifier": "t2"}]},
        headers=org.headers,
    )
    assert r.status_code == 200, r.text
    quick = await Database.connect(settings.model_copy(update={"statement_timeout_ms": 300}))
    query = {"combinator": "and", "rules": []}
    app.state.db = quick
    try:
        async with db.system() as tx:
            await tx.execute("LOCK TABLE scorecard_results IN ACCESS EXCLUSIVE MODE")
            answers = []
            for method, url, body in (
                ("POST", "/v1/entities/search", query),
                ("GET", "/v1/blueprints/team/entities", None),
            ):
                try:
                    answer = await client.request(method, url, json=body, headers=org.headers)
                except Exception as exc:  # the body broke off after a 200's headers
                    raise AssertionError(f"{url}: the answer broke off ({exc!r})") from exc
                answers.append(answer)
        for answer in answers:
            assert answer.status_code == 422, answer.text
            assert answer.json()["ok"] is False and "time limit" in answer.json()["message"]
        # Unblocked, the same reads stream every entity.
        r = await client.post("/v1/entities/search", json=query, headers=org.headers)
        assert r.status_code == 200 and [e["identifier"] for e in r.json()["entities"]] == [
            "t1",
            "t2",
        ]
        r = await client.get("/v1/blueprints/team/entities", headers=org.headers)
        assert r.status_code == 200 and len(r.json()["entities"]) == 2
    finally:
        app.state.db = db
        await quick.close()
