"""Scorecard routes (Port's shapes): /v1/blueprints/{bp}/scorecards..., /v1/scorecards."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Body, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from app.auth import permissions
from app.auth.principal import CurrentTenant
from app.db.routing import api_router
from app.kit.openapi import ERRORS_AUTHED, OkResponse, conflict
from app.scorecards import insight, service

router = api_router(tags=["Scorecards"])
BlueprintId = Annotated[str, Path(min_length=1, max_length=100)]
ScorecardId = Annotated[str, Path(min_length=1, max_length=100)]
_CONFLICT = conflict("A scorecard with this identifier exists")


class Level(BaseModel):
    title: str
    color: str


class ScorecardRule(BaseModel):
    """A rule (and its `description`, when it has one)."""

    model_config = ConfigDict(extra="allow")

    identifier: str
    title: str
    level: str
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
    properties: Any = Field(
        default=None,
        description="The scorecard's own key-value pairs (Port's: an object), kept as given",
    )


class EvaluationError(BaseModel):
    """Why the scorecard's evaluation failed, how many times in a row, and when it is tried
    again (the wait doubles with each failure; null: on the next pass, e.g. after a
    change of the definition)."""

    message: str
    failures: int
    retryAt: datetime | None


class Scorecard(BaseModel):
    identifier: str
    title: str
    blueprint: str
    levels: list[Level]
    rules: list[ScorecardRule]
    filter: dict[str, Any] | None = None
    properties: dict[str, Any] | None = None
    state: Literal["ready", "evaluating", "failing"] = Field(
        description="`evaluating` until every entity's result follows this definition; "
        "`failing` while the evaluation keeps failing (see `evaluationError`)"
    )
    evaluationError: EvaluationError | None = None
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
    permissions.require(tenant.principal, "scorecards.manage", blueprint=blueprint)
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
    permissions.require(tenant.principal, "scorecards.manage", blueprint=blueprint)
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
    permissions.require(tenant.principal, "scorecards.read")
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
    permissions.require(tenant.principal, "scorecards.read")
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
    permissions.require(tenant.principal, "scorecards.manage", blueprint=blueprint)
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
    permissions.require(tenant.principal, "scorecards.manage", blueprint=blueprint)
    await service.delete(tenant.tx, blueprint, identifier)
    return {"ok": True}


@router.get(
    "/v1/scorecards",
    response_model=ScorecardListResponse,
    responses=ERRORS_AUTHED,
    summary="Every scorecard of the organization",
)
async def list_scorecards(tenant: CurrentTenant) -> Any:
    permissions.require(tenant.principal, "scorecards.read")
    return {"ok": True, "scorecards": await service.list_all(tenant.tx)}


class LevelCount(BaseModel):
    level: str
    count: int


class Moved(BaseModel):
    identifier: str
    from_: str | None = Field(alias="from")
    to: str | None
    change: Literal["up", "down", "new", "removed"]


class DryRun(BaseModel):
    scorecard: str
    entities: int = Field(description="entities the proposed scorecard would apply to")
    levels: list[LevelCount]
    up: int
    down: int
    same: int
    new: int = Field(description="entities without a result now that would get one")
    removed: int = Field(description="entities with a result now that would lose it")
    moved: list[Moved] = Field(description="the first 1,000 entities that would change")
    movedTruncated: bool


class DryRunResponse(BaseModel):
    ok: Literal[True] = True
    dryRun: DryRun


class TeamLevels(BaseModel):
    team: str | None
    levels: list[LevelCount]


class RuleRate(BaseModel):
    identifier: str
    level: str
    passed: int
    total: int
    passRate: float | None


class TrendPoint(BaseModel):
    day: str
    entities: int
    levels: list[LevelCount]
    rules: list[RuleRate]


class Summary(BaseModel):
    scorecard: str
    state: Literal["ready", "evaluating"]
    entities: int
    levels: list[LevelCount]
    teams: list[TeamLevels]
    rules: list[RuleRate]
    trend: list[TrendPoint] = Field(description="one snapshot a day, from..to")


class SummaryResponse(BaseModel):
    ok: Literal[True] = True
    summary: Summary


@router.post(
    "/v1/blueprints/{blueprint}/scorecards/{identifier}/dry-run",
    response_model=DryRunResponse,
    responses=ERRORS_AUTHED,
    summary="What a proposed definition would change, without saving it",
)
async def dry_run_scorecard(
    blueprint: BlueprintId, identifier: ScorecardId, body: ScorecardBody, tenant: CurrentTenant
) -> Any:
    permissions.require(tenant.principal, "scorecards.read")
    result = await insight.dry_run(tenant.tx, blueprint, identifier, _raw(body))
    return {"ok": True, "dryRun": result}


@router.get(
    "/v1/blueprints/{blueprint}/scorecards/{identifier}/summary",
    response_model=SummaryResponse,
    responses=ERRORS_AUTHED,
    summary="Entities per level and team, rule pass rates, and the daily trend",
)
async def scorecard_summary(
    blueprint: BlueprintId,
    identifier: ScorecardId,
    tenant: CurrentTenant,
    from_: Annotated[str | None, Query(alias="from", max_length=40)] = None,
    to: Annotated[str | None, Query(max_length=40)] = None,
) -> Any:
    permissions.require(tenant.principal, "scorecards.read")
    start, end = insight.default_range()
    start = insight.parse_day(from_, start, "from")
    end = insight.parse_day(to, end, "to")
    current = await insight.summary(tenant.tx, blueprint, identifier)
    current["trend"] = await insight.trend(tenant.tx, blueprint, identifier, start, end)
    return {"ok": True, "summary": current}
