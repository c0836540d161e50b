"""Scorecard routes (Port's shapes): /v1/blueprints/{bp}/scorecards..., /v1/scorecards."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Body, Path
from pydantic import BaseModel, ConfigDict, Field

from app.auth.principal import CurrentTenant
from app.db.routing import api_router
from app.kit.openapi import ERRORS_AUTHED, ErrorBody
from app.scorecards import service

router = api_router(tags=["Scorecards"])
BlueprintId = Annotated[str, Path(min_length=1, max_length=100)]
ScorecardId = Annotated[str, Path(min_length=1, max_length=100)]
_CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorBody, "description": "A scorecard with this identifier exists"}
}


class Level(BaseModel):
    title: str
    color: str


class ScorecardRule(BaseModel):
    model_config = ConfigDict(extra="allow")

    identifier: str
    title: str
    level: str
    description: str | None = None
    query: dict[str, Any] = Field(description="{combinator: and|or, conditions: [...]}")


class ScorecardBody(BaseModel):
    """Port's scorecard: `rules` grade entities into `levels` (Basic, Bronze, Silver, Gold
    by default; the first is the base level and owns no rules); `filter` chooses the
    entities it applies to. Conditions: `{property | relation, operator, value?, not?}`."""

    model_config = ConfigDict(extra="allow")

    identifier: str | None = Field(default=None, max_length=100)
    title: str | None = Field(default=None, max_length=200)
    levels: list[Any] | None = None
    filter: dict[str, Any] | None = None
    rules: list[Any] = Field(default_factory=list)


class Scorecard(BaseModel):
    identifier: str
    title: str
    blueprint: str
    levels: list[Level]
    rules: list[ScorecardRule]
    filter: dict[str, Any] | None = None
    state: Literal["ready", "evaluating"] = Field(
        description="`evaluating` until every entity's result follows this definition"
    )
    createdAt: datetime
    createdBy: str
    updatedAt: datetime
    updatedBy: str


class ScorecardResponse(BaseModel):
    ok: Literal[True] = True
    scorecard: Scorecard


class ScorecardListResponse(BaseModel):
    ok: Literal[True] = True
    scorecards: list[Scorecard]


class OkResponse(BaseModel):
    ok: Literal[True] = True


def _raw(body: ScorecardBody) -> dict[str, Any]:
    return body.model_dump(exclude_unset=True)


@router.post(
    "/v1/blueprints/{blueprint}/scorecards",
    status_code=201,
    response_model=ScorecardResponse,
    responses={**ERRORS_AUTHED, **_CONFLICT},
    summary="Create a scorecard",
)
async def create_scorecard(
    blueprint: BlueprintId, body: ScorecardBody, tenant: CurrentTenant
) -> Any:
    created = await service.create(tenant.tx, tenant.principal.subject, blueprint, _raw(body))
    return {"ok": True, "scorecard": created}


@router.put(
    "/v1/blueprints/{blueprint}/scorecards",
    response_model=ScorecardListResponse,
    responses=ERRORS_AUTHED,
    summary="Replace a blueprint's scorecards (the given set becomes the whole set)",
)
async def replace_scorecards(
    blueprint: BlueprintId,
    tenant: CurrentTenant,
    body: Annotated[list[ScorecardBody], Body(max_length=100)],
) -> Any:
    replaced = await service.replace_all(
        tenant.tx, tenant.principal.subject, blueprint, [_raw(b) for b in body]
    )
    return {"ok": True, "scorecards": replaced}


@router.get(
    "/v1/blueprints/{blueprint}/scorecards",
    response_model=ScorecardListResponse,
    responses=ERRORS_AUTHED,
    summary="A blueprint's scorecards",
)
async def list_blueprint_scorecards(blueprint: BlueprintId, tenant: CurrentTenant) -> Any:
    return {"ok": True, "scorecards": await service.list_for(tenant.tx, blueprint)}


@router.get(
    "/v1/blueprints/{blueprint}/scorecards/{identifier}",
    response_model=ScorecardResponse,
    responses=ERRORS_AUTHED,
    summary="Get a scorecard",
)
async def get_scorecard(
    blueprint: BlueprintId, identifier: ScorecardId, tenant: CurrentTenant
) -> Any:
    return {"ok": True, "scorecard": await service.get(tenant.tx, blueprint, identifier)}


@router.put(
    "/v1/blueprints/{blueprint}/scorecards/{identifier}",
    response_model=ScorecardResponse,
    responses=ERRORS_AUTHED,
    summary="Replace a scorecard",
)
async def replace_scorecard(
    blueprint: BlueprintId, identifier: ScorecardId, body: ScorecardBody, tenant: CurrentTenant
) -> Any:
    updated = await service.replace(
        tenant.tx, tenant.principal.subject, blueprint, identifier, _raw(body)
    )
    return {"ok": True, "scorecard": updated}


@router.delete(
    "/v1/blueprints/{blueprint}/scorecards/{identifier}",
    response_model=OkResponse,
    responses=ERRORS_AUTHED,
    summary="Delete a scorecard (and its results)",
)
async def delete_scorecard(
    blueprint: BlueprintId, identifier: ScorecardId, tenant: CurrentTenant
) -> Any:
    await service.delete(tenant.tx, blueprint, identifier)
    return {"ok": True}


@router.get(
    "/v1/scorecards",
    response_model=ScorecardListResponse,
    responses=ERRORS_AUTHED,
    summary="Every scorecard of the organization",
)
async def list_scorecards(tenant: CurrentTenant) -> Any:
    return {"ok": True, "scorecards": await service.list_all(tenant.tx)}
