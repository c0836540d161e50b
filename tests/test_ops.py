"""Liveness, readiness and metrics."""

from __future__ import annotations

import httpx
from fastapi import FastAPI
from redis.asyncio import Redis


async def test_healthz_is_ok(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200 and response.json()["ok"] is True


async def test_readyz_checks_postgres_and_redis(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"] == {"postgres": "ok", "redis": "ok"}


async def test_readyz_is_503_when_redis_is_unreachable(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    original = app.state.redis
    app.state.redis = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    try:
        response = await client.get("/readyz")
    finally:
        await app.state.redis.aclose()
        app.state.redis = original
    assert response.status_code == 503
    body = response.json()
    assert body["ok"] is False and body["error"] == "not_ready"
    assert body["details"]["checks"] == {"postgres": "ok", "redis": "unreachable"}


async def test_metrics_count_requests_by_route_template(client: httpx.AsyncClient) -> None:
    await client.get("/healthz")
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert (
        'portolan_http_requests_total{method="GET",route="/healthz",status="200"}' in response.text
    )
