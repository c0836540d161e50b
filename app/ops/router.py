"""GET /healthz, /readyz (PostgreSQL and Redis reachable) and /metrics (Prometheus)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from app.db.routing import api_router
from app.kit.errors import error_body
from app.kit.openapi import ErrorBody

router = api_router(tags=["Operations"])
log = logging.getLogger("portolan.ops")
_CHECK_TIMEOUT = 2.0
_RETRY_AFTER_SECONDS = 5


class Health(BaseModel):
    ok: Literal[True] = True
    status: str = "ok"


class Readiness(BaseModel):
    ok: Literal[True] = True
    checks: dict[str, str]


@router.get("/healthz", response_model=Health, summary="Liveness")
async def healthz() -> Health:
    return Health()


async def _check_postgres(request: Request) -> None:
    await request.app.state.db.ping()


async def _check_redis(request: Request) -> None:
    await request.app.state.redis.ping()


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": ErrorBody, "description": "A dependency is unreachable"}},
    summary="Readiness: PostgreSQL and Redis reachable",
)
async def readyz(request: Request) -> Any:
    checks: dict[str, str] = {}
    for name, check in (("postgres", _check_postgres), ("redis", _check_redis)):
        try:
            async with asyncio.timeout(_CHECK_TIMEOUT):
                await check(request)
            checks[name] = "ok"
        except Exception as exc:
            log.warning(
                "readiness check failed", extra={"check": name, "error": type(exc).__name__}
            )
            checks[name] = "unreachable"
    if all(v == "ok" for v in checks.values()):
        return Readiness(checks=checks)
    failing = ", ".join(k for k, v in checks.items() if v != "ok")
    # A dependency's outage is usually short (a restart): the caller may look again soon.
    return JSONResponse(
        error_body("not_ready", f"Unreachable: {failing}", {"checks": checks}),
        status_code=503,
        headers={"Retry-After": str(_RETRY_AFTER_SECONDS)},
    )


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}},
    summary="Prometheus metrics",
)
async def metrics() -> PlainTextResponse:
    return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)
