"""History routes: Port's properties-history, and the timeline of one entity's changes.
(An entity as it was at an instant is `GET .../entities/{id}?at=`, in the catalog's
entity routes.)"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Path, Query, Request
from fastapi.responses import Response

from app.auth import permissions
from app.auth.principal import CurrentTenant
from app.config import Settings
from app.db.routing import api_router
from app.history import service
from app.history.over_time import OverTimeBody, aggregate_over_time
from app.history.schemas import (
    OverTimeResponse,
    PropertiesHistoryBody,
    PropertiesHistoryResponse,
    TimelineResponse,
)
from app.history.timeframe import frame, zone
from app.kit.errors import Invalid
from app.kit.openapi import ERRORS_AUTHED
from app.kit.responses import json_response

router = api_router(tags=["History"])


@router.post(
    "/v1/entities/properties-history",
    response_model=PropertiesHistoryResponse,
    responses=ERRORS_AUTHED,
    tags=["Entities"],
    summary="An entity's properties over a time range, in buckets",
)
async def properties_history(tenant: CurrentTenant, body: PropertiesHistoryBody) -> Response:
    """For each bucket of `timeRange` (`timeInterval` long, in `timeRange.timeZone`), the
    value of each named property (or relation, `$title`, `$icon`, `$team`) in force when
    the bucket closes."""
    permissions.require(tenant.principal, "entities.read")
    window = body.timeRange
    span = frame(
        preset=window.preset,
        start=window.from_,
        end=window.to,
        tz=zone(window.timeZone),
        interval=body.timeInterval,
        now=datetime.now(UTC),
    )
    result = await service.properties_history(
        tenant.tx,
        body.blueprintIdentifier,
        body.entityIdentifier,
        list(dict.fromkeys(body.propertyNames)),
        span,
    )
    return json_response({"ok": True, "result": result})


@router.post(
    "/v1/entities/aggregate-over-time",
    response_model=OverTimeResponse,
    responses=ERRORS_AUTHED,
    tags=["Entities"],
    summary="Counts and number properties' aggregates of a query's entities over time",
)
async def aggregate_entities_over_time(
    request: Request, tenant: CurrentTenant, body: OverTimeBody
) -> Response:
    """Port's aggregate-over-time: `countEntities` (count, average) or
    `aggregatePropertiesValues` (average, sum, min, max, median, last of number
    properties) per bucket of `timeRange`, the entities placed in time by `measureTimeBy`:
    a date-time property, or `$history` (the catalog as it stood when each bucket
    closed)."""
    permissions.require(tenant.principal, "entities.read")
    settings: Settings = request.app.state.settings
    result = await aggregate_over_time(
        tenant.tx,
        body.model_dump(by_alias=True, exclude_none=True),
        retention_days=settings.history_retention_days,
        history_reads=settings.history_reads_per_org,
    )
    return json_response({"ok": True, "result": result})


def _cursor(value: str | None) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or len(value) > 19:
        raise Invalid(
            "next is not a cursor this route returned",
            details=[{"pointer": "/next", "message": "invalid cursor"}],
        )
    return int(value)


def _instant(value: datetime | None) -> datetime | None:
    return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)


@router.get(
    "/v1/blueprints/{blueprint}/entities-history/{identifier:path}",
    response_model=TimelineResponse,
    responses=ERRORS_AUTHED,
    summary="Every change of one entity, newest first: what changed, who, from where",
)
async def entity_timeline(
    blueprint: Annotated[str, Path(min_length=1, max_length=100)],
    identifier: Annotated[str, Path(min_length=1, max_length=1000)],
    tenant: CurrentTenant,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    next: Annotated[str | None, Query(max_length=40)] = None,
    from_: Annotated[datetime | None, Query(alias="from")] = None,
    to: datetime | None = None,
) -> Response:
    """`from` / `to` (ISO 8601; UTC without an offset) bound the changes' times; `next` is
    the cursor of the previous page. Documents are shown in today's property and relation
    names."""
    permissions.require(tenant.principal, "entities.read")
    entries, last = await service.timeline(
        tenant.tx,
        blueprint,
        identifier,
        limit=limit,
        before_id=_cursor(next),
        since=_instant(from_),
        until=_instant(to),
    )
    body: dict[str, Any] = {"ok": True, "history": entries}
    if last is not None:
        body["next"] = str(last)
    return json_response(body)
