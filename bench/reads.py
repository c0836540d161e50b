"""Scenario: reads of every kind at scale — full lists, one entity, text filters, facets.

1M entities across 10 orgs (100k services in the measured one, loaded as bench.search does),
each figure beside its ceiling measured in the same run, alternately:
- full list: GET /v1/blueprints/service/entities (streamed) beside `COPY (SELECT <the same
  JSON>) TO STDOUT` of the same rows; targets >= 100k entities/s and >= 50% of the COPY;
  the API process's peak memory while streaming (target < 200 MiB);
- one entity: GET /v1/blueprints/service/entities/{id} beside the authenticated
  GET /v1/organization, one request at a time; target p50 within 1.5x;
- text filters (`contains` on $title and on a string property, rare and common terms):
  first page of 50 beside the same statements sent directly; targets p50 <= 10 ms and
  within 3x of the SQL;
- facets (countValues over 100k) p50 <= 50 ms; a filtered page and its count p50 <= 10 ms.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from typing import Any

import httpx
import sqlalchemy as sa

from app.db.database import Database, compile_query
from app.search.service import Search, scope_for
from bench.env import pin_database_backends, scratch_settings, served
from bench.load import build_requests, roundtrip
from bench.search import ORGS, PER_ORG, _fill, _org, _pct, _rss, _settle, _statements

ROUNDS = int(os.environ.get("PORTOLAN_BENCH_READS_ROUNDS", "5"))
SAMPLES = int(os.environ.get("PORTOLAN_BENCH_READS_SAMPLES", "300"))

TEXT: dict[str, list[dict[str, Any]]] = {
    "$title contains, rare": [{"property": "$title", "operator": "contains", "value": "ice 4242"}],
    "$title contains, common": [{"property": "$title", "operator": "contains", "value": "ice 1"}],
    "slug contains, rare": [{"property": "slug", "operator": "contains", "value": "c-77777"}],
    "slug contains, common": [{"property": "slug", "operator": "contains", "value": "c-3"}],
    "owner endsWith, rare": [
        {"property": "owner", "operator": "endsWith", "value": "owner499@example.com"}
    ],
}
FACET = {
    "func": "countValues",
    "property": "language",
    "query": {
        "combinator": "and",
        "rules": [{"property": "$blueprint", "operator": "=", "value": "service"}],
    },
}
COUNTED_RULES = [
    {"property": "$blueprint", "operator": "=", "value": "service"},
    {"property": "language", "operator": "=", "value": "go"},
    {"property": "tier", "operator": "=", "value": "1"},
]


async def _read_response(reader: asyncio.StreamReader) -> tuple[bool, int]:
    """Reads one response (chunked or with a length): (status 200, body bytes)."""
    status = await reader.readline()
    chunked, length = False, 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.lower() == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif name.lower() == b"content-length":
            length = int(value)
    if not chunked:
        await reader.readexactly(length)
        return status.startswith(b"HTTP/1.1 200"), length
    total = 0
    while True:
        size = int((await reader.readline()).strip(), 16)
        if size == 0:
            await reader.readline()
            return status.startswith(b"HTTP/1.1 200"), total
        await reader.readexactly(size + 2)
        total += size


async def _stream_once(port: int, request: bytes) -> tuple[float, int, bool]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    try:
        started = time.perf_counter()
        writer.write(request)
        ok, size = await _read_response(reader)
        return time.perf_counter() - started, size, ok
    finally:
        writer.close()


async def _copy_once(db: Database, org_id: uuid.UUID) -> tuple[float, int] | None:
    """COPY of the same JSON the list streams (None when the search has no JSON form)."""
    async with db.tenant(org_id) as tx:
        search = Search(await scope_for(tx, "service", None), None)
        statement = getattr(search, "document_statement", None)
        if statement is None:
            return None
        rows = statement(None, PER_ORG * 10).subquery("j")
        sql, args = compile_query(sa.select(rows.c.doc), (), search.values())
        size = 0

        async def take(chunk: bytes) -> None:
            nonlocal size
            size += len(chunk)

        started = time.perf_counter()
        await tx.conn.copy_from_query(sql, *args, output=take, format="text")
        return time.perf_counter() - started, size


async def _full_list(
    port: int, auth: dict[str, str], db: Database, org_id: uuid.UUID
) -> tuple[list[float], list[float], int, int]:
    (request,) = build_requests(
        {"method": "GET", "path": "/v1/blueprints/service/entities", "headers": auth}
    )
    api: list[float] = []
    ceiling: list[float] = []
    errors = 0
    size = 0
    await _stream_once(port, request)  # warm-up
    for _ in range(ROUNDS):
        elapsed, size, ok = await _stream_once(port, request)
        api.append(elapsed)
        errors += not ok
        copied = await _copy_once(db, org_id)
        if copied is not None:
            ceiling.append(copied[0])
    return api, ceiling, size, errors


async def _alternate(
    port: int, first: list[bytes], second: list[bytes]
) -> tuple[list[float], list[float], int]:
    """Two kinds of request alternately on one keep-alive connection, one at a time."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    a: list[float] = []
    b: list[float] = []
    errors = 0
    try:
        for n in range(SAMPLES + 50):
            ok1, t1 = await roundtrip(reader, writer, first[n % len(first)])
            ok2, t2 = await roundtrip(reader, writer, second[n % len(second)])
            if n >= 50:
                a.append(t1)
                b.append(t2)
                errors += (not ok1) + (not ok2)
    finally:
        writer.close()
    return a, b, errors


async def _text(
    port: int, auth: dict[str, str], db: Database, org_id: uuid.UUID, rules: list[dict[str, Any]]
) -> tuple[list[float], list[float], int]:
    body = json.dumps({"limit": 50, "query": {"combinator": "and", "rules": rules}})
    requests = build_requests(
        {
            "method": "POST",
            "path": "/v1/blueprints/service/entities/search",
            "headers": auth,
            "bodies": [body],
        }
    )
    statements = await _statements(db, org_id, rules)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    api: list[float] = []
    direct: list[float] = []
    errors = 0
    try:
        for n in range(SAMPLES // 3 + 20):
            ok, elapsed = await roundtrip(reader, writer, requests[0])
            async with db.tenant(org_id) as tx:
                started = time.perf_counter()
                for sql, args in statements:
                    await tx.fetch(sql, *args)
                sent = time.perf_counter() - started
            if n >= 20:
                api.append(elapsed)
                direct.append(sent)
                errors += not ok
    finally:
        writer.close()
    return api, direct, errors


async def _facets(
    port: int, facet: list[bytes], paged: list[bytes]
) -> tuple[list[float], list[float], list[float], int]:
    """The facet's times, the page's plus its count's, and the count's alone."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    facets: list[float] = []
    pages: list[float] = []
    counts: list[float] = []
    errors = 0
    try:
        for n in range(60):
            ok1, t1 = await roundtrip(reader, writer, facet[0])
            ok2, t2 = await roundtrip(reader, writer, paged[0])
            ok3, t3 = await roundtrip(reader, writer, paged[1])
            if n >= 10:
                facets.append(t1)
                pages.append(t2 + t3)
                counts.append(t3)
                errors += (not ok1) + (not ok2) + (not ok3)
    finally:
        writer.close()
    return facets, pages, counts, errors


def _post(path: str, auth: dict[str, str], body: Any) -> list[bytes]:
    return build_requests(
        {"method": "POST", "path": path, "headers": auth, "bodies": [json.dumps(body)]}
    )


async def run() -> bool:
    async with scratch_settings() as settings:
        db = await Database.connect(settings)
        try:
            with served(settings) as port:
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{port}", timeout=300
                ) as http:
                    orgs = [await _org(db, http, f"bench-{n}") for n in range(ORGS)]
                    started = time.perf_counter()
                    await asyncio.gather(
                        *(
                            _fill(settings.database_url or "", org, n)
                            for n, (org, _) in enumerate(orgs)
                        )
                    )
                    loaded = time.perf_counter() - started
                    await _settle(settings.database_url or "")
                    org_id, headers = orgs[0]
                    auth = {"Authorization": headers["Authorization"]}
                    await pin_database_backends(settings)
                    rss_before, _ = _rss(port)
                    api, ceiling, size, list_errors = await _full_list(port, auth, db, org_id)
                    _, peak = _rss(port)

                    rnd = random.Random(7)
                    ones = [
                        build_requests(
                            {
                                "method": "GET",
                                "path": f"/v1/blueprints/service/entities/svc-"
                                f"{rnd.randrange(PER_ORG):06d}",
                                "headers": auth,
                            }
                        )[0]
                        for _ in range(200)
                    ]
                    org_read = build_requests(
                        {"method": "GET", "path": "/v1/organization", "headers": auth}
                    )
                    one_api, org_api, one_errors = await _alternate(port, ones, org_read)

                    texts = [(n, *await _text(port, auth, db, org_id, r)) for n, r in TEXT.items()]

                    facet = _post("/v1/entities/aggregate", auth, FACET)
                    page = {
                        "limit": 100,
                        "query": {"combinator": "and", "rules": COUNTED_RULES[1:]},
                    }
                    count = {
                        "func": "count",
                        "query": {"combinator": "and", "rules": COUNTED_RULES},
                    }
                    paged = _post("/v1/blueprints/service/entities/search", auth, page) + _post(
                        "/v1/entities/aggregate", auth, count
                    )
                    facet_times, counted_times, count_times, agg_errors = await _facets(
                        port, facet, paged
                    )
        finally:
            await db.close()

    ok = True
    total = ORGS * (PER_ORG + 100)
    print(
        f"reads     {total:,} entities in {ORGS} orgs ({PER_ORG:,} services in the measured "
        f"org), loaded in {loaded:.0f} s"
    )
    a50 = _pct(api, 0.5) / 1000
    rate = PER_ORG / a50
    if ceiling:
        c50 = _pct(ceiling, 0.5) / 1000
        share = c50 / a50
        ceiling_text = f"COPY of the same JSON {PER_ORG / c50:,.0f}/s ({c50 * 1000:,.0f} ms)"
    else:
        share = 0.0
        ceiling_text = "COPY of the same JSON: n/a"
    good = rate >= 100_000 and share >= 0.5 and peak < 200 and list_errors == 0
    ok &= good
    print(
        f"          full list (streamed, {size / 2**20:.0f} MiB): {rate:,.0f} entities/s "
        f"({a50 * 1000:,.0f} ms, median of {ROUNDS}); {ceiling_text}; {share:.0%} of it\n"
        f"          API memory {rss_before:.0f} MiB before, {peak:.0f} MiB peak "
        f"(targets >= 100,000/s, >= 50%, < 200 MiB) -> {'PASS' if good else 'FAIL'}"
    )
    o50, r50 = _pct(one_api, 0.5), _pct(org_api, 0.5)
    good = o50 <= 1.5 * r50 and one_errors == 0
    ok &= good
    print(
        f"          one entity p50 {o50:.2f} ms (p99 {_pct(one_api, 0.99):.2f}); "
        f"GET /v1/organization p50 {r50:.2f} ms (p99 {_pct(org_api, 0.99):.2f}); "
        f"{o50 / r50:.2f}x (target <= 1.5x) -> {'PASS' if good else 'FAIL'}"
    )
    print("          text filters, first page of 50:      API p50 / p99      direct SQL p50  ratio")
    for name, t_api, t_direct, errors in texts:
        t50, d50 = _pct(t_api, 0.5), _pct(t_direct, 0.5)
        ratio = t50 / d50 if d50 else float("inf")
        good = t50 <= 10 and ratio <= 3 and errors == 0
        ok &= good
        print(
            f"          {name:<28} {t50:7.1f} / {_pct(t_api, 0.99):6.1f} ms   {d50:7.1f} ms"
            f"   {ratio:4.1f}x -> {'PASS' if good else 'FAIL'}"
        )
    f50, p50 = _pct(facet_times, 0.5), _pct(counted_times, 0.5)
    good = f50 <= 50 and p50 <= 10 and agg_errors == 0
    ok &= good
    print(
        f"          facet countValues(language) p50 {f50:.1f} ms (target <= 50); "
        f"filtered page of 100 + its count p50 {p50:.1f} ms (target <= 10; the count alone "
        f"{_pct(count_times, 0.5):.1f}) -> "
        f"{'PASS' if good else 'FAIL'}"
    )
    return ok
