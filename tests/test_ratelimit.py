"""Rate limits: a token bucket per organization and route class in Redis, headers on every
limited response, 429 with Retry-After over the limit, and no outage when Redis is gone."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from app.config import Settings
from app.kit import ratelimit
from app.kit.ratelimit import route_class
from app.main import create_app
from tests.conftest import OrgFactory


@asynccontextmanager
async def _client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://portolan.test") as c:
            yield c


def test_route_classes() -> None:
    assert route_class("GET", "/v1/blueprints/{blueprint}/entities/{identifier:path}") == (
        "entity_reads"
    )
    assert route_class("GET", "/v1/blueprints/{blueprint}/entities") == "entity_reads"
    assert route_class("POST", "/v1/blueprints/{blueprint}/entities/bulk") == "entity_writes"
    assert route_class("DELETE", "/v1/blueprints/{blueprint}/all-entities") == "entity_writes"
    assert route_class("POST", "/v1/blueprints/{blueprint}/entities/search") == "search"
    assert route_class("POST", "/v1/entities/search") == "search"
    assert route_class("POST", "/v1/entities/aggregate") == "search"
    assert route_class("POST", "/v1/blueprints/entities/datasource-entities") == "search"
    assert route_class("POST", "/v1/pages/{page_identifier}/widgets/{widget_id}/data") == "search"
    assert route_class("GET", "/v1/blueprints/{blueprint}") == "other"
    assert route_class("POST", "/v1/actions/{identifier}/runs") == "other"


async def test_headers_count_down_per_org_and_class(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    first = await client.get("/v1/organization", headers=org.headers)
    second = await client.get("/v1/organization", headers=org.headers)
    assert first.headers["x-ratelimit-limit"] == "15000"
    assert first.headers["x-ratelimit-period"] == "300"
    assert int(second.headers["x-ratelimit-remaining"]) == (
        int(first.headers["x-ratelimit-remaining"]) - 1
    )
    assert int(first.headers["x-ratelimit-reset"]) >= 0
    # Another class has its own bucket.
    await client.post(
        "/v1/blueprints",
        json={"identifier": "svc", "title": "S", "schema": {}},
        headers=org.headers,
    )
    reads = await client.get("/v1/blueprints/svc/entities", headers=org.headers)
    assert reads.headers["x-ratelimit-limit"] == "35000"
    assert reads.headers["x-ratelimit-remaining"] == "34999"


async def test_over_the_limit_is_429_with_retry_after(
    make_org: OrgFactory, fresh_settings: Callable[..., Settings]
) -> None:
    settings = fresh_settings(rate_limit_other=3, rate_limit_period_seconds=60)
    one, two = await make_org(), await make_org()
    async with _client(settings) as client:
        answers = [await client.get("/v1/organization", headers=one.headers) for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        refused = answers[-1]
        assert refused.json()["ok"] is False and refused.json()["error"] == "rate_limited"
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.headers["x-ratelimit-remaining"] == "0"
        assert refused.headers["x-ratelimit-limit"] == "3"
        # Per org: the other org still has its tokens; per class: entity reads too.
        assert (await client.get("/v1/organization", headers=two.headers)).status_code == 200
        r = await client.get("/v1/blueprints/missing/entities-count", headers=one.headers)
        assert r.status_code != 429


async def test_redis_down_fails_open(
    make_org: OrgFactory,
    fresh_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    org = await make_org()
    settings = fresh_settings(redis_url="redis://127.0.0.1:1/0", rate_limit_other=1)
    caplog.set_level(logging.WARNING, logger="portolan.ratelimit")
    async with _client(settings) as client:
        answers = [await client.get("/v1/organization", headers=org.headers) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert "x-ratelimit-limit" not in answers[0].headers
    assert any("rate limits not enforced" in r.getMessage() for r in caplog.records)


async def test_unauthenticated_requests_take_no_tokens(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    before = await client.get("/v1/organization", headers=org.headers)
    r = await client.get("/v1/organization", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    after = await client.get("/v1/organization", headers=org.headers)
    spent: Any = int(before.headers["x-ratelimit-remaining"]) - int(
        after.headers["x-ratelimit-remaining"]
    )
    assert spent == 1


async def test_tokens_are_leased_a_few_at_a_time_and_never_past_the_limit(
    make_org: OrgFactory,
    fresh_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A process takes a large bucket's tokens ten at a time (one Redis round trip per ten
    requests): the bucket in Redis moves by ten every tenth request, while the headers
    count down by one. A small bucket is taken a token at a time, and refused exactly at
    its limit (above)."""
    monkeypatch.setattr(ratelimit, "LEASE_SECONDS", 60.0)  # however slow the machine
    settings = fresh_settings(rate_limit_other=20_000, rate_limit_period_seconds=86_400)
    org = await make_org()
    key = f"portolan:rl:{org.org_id}:other"
    redis = Redis.from_url(settings.redis_url or "")

    async def in_redis() -> float:
        return float(await redis.hget(key, "tokens") or 0)

    try:
        async with _client(settings) as client:
            remaining = []
            seen = []
            for _ in range(21):
                r = await client.get("/v1/organization", headers=org.headers)
                assert r.status_code == 200
                remaining.append(int(r.headers["x-ratelimit-remaining"]))
                seen.append(round(await in_redis()))
        assert remaining == list(range(19_999, 19_978, -1))
        assert seen == [19_990] * 10 + [19_980] * 10 + [19_970]
    finally:
        await redis.aclose()
