"""Search routes (Port's shapes): per blueprint, paginated; across blueprints, streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import Body, Path, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from app.auth import permissions
from app.auth.principal import CurrentTenant, Tenant
from app.catalog.entities import FieldFilter
from app.catalog.schemas import AttachTitles
from app.config import Settings
from app.db.database import Database
from app.db.routing import AfterCommit, api_router
from app.history import asof
from app.kit.errors import Invalid
from app.kit.openapi import ERRORS_AUTHED
from app.kit.responses import json_response, to_json
from app.search.aggregate import aggregate
from app.search.service import decode_cursor, encode_cursor, fresh_scope, prepare

router = api_router(tags=["Search"])
_META = {
    "$identifier": "identifier",
    "$title": "title",
    "$icon": "icon",
    "$team": "team",
    "$blueprint": "blueprint",
    "$createdAt": "createdAt",
    "$createdBy": "createdBy",
    "$updatedAt": "updatedAt",
    "$updatedBy": "updatedBy",
}

Paths = Annotated[list[str] | None, Query(max_length=200)]


class Rules(BaseModel):
    """A Port search query: rules (or nested queries) joined by a combinator. Each rule is
    checked by the compiler, which names every bad one by its JSON pointer."""

    model_config = ConfigDict(extra="forbid")

    combinator: Literal["and", "or"] = "and"
    rules: list[dict[str, Any]] = Field(default_factory=list, max_length=200)


class BlueprintSearchBody(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    query: Rules | None = None
    include: list[str] | None = Field(default=None, max_length=200)
    exclude: list[str] | None = Field(default=None, max_length=200)
    limit: int = Field(default=200, ge=1, le=1000)
    from_: str | None = Field(default=None, alias="from", max_length=4000)
    at: datetime | None = Field(
        default=None,
        description="Search the catalog as it stood at this instant (ISO 8601; UTC without "
        "an offset), from the entities' history",
    )


class SearchAllBody(Rules):
    at: datetime | None = Field(
        default=None,
        description="Search the catalog as it stood at this instant (ISO 8601; UTC without "
        "an offset), from the entities' history",
    )


# Entities per page of a past search across blueprints (each page its own transaction).
_PAST_PAGE = 1000


def _past_instant(request: Request, at: datetime, titles: bool) -> datetime:
    """`at` as an instant a past search may use (UTC when it carries no offset)."""
    if titles:
        raise Invalid(
            "attach_title_to_relation is not available with at: history keeps each "
            "entity's relations, not its targets' titles then",
            details=[{"pointer": "/at", "message": "not with attach_title_to_relation"}],
        )
    instant = at if at.tzinfo else at.replace(tzinfo=UTC)
    settings: Settings = request.app.state.settings
    asof.check_instant(instant, datetime.now(UTC), settings.history_retention_days)
    return instant


class SearchPage(BaseModel):
    ok: Literal[True] = True
    entities: list[dict[str, Any]]
    next: str | None = None


class SearchAll(BaseModel):
    ok: Literal[True] = True
    matchingBlueprints: list[str]
    entities: list[dict[str, Any]]


def _paths(names: list[str] | None, blueprints: list[dict[str, Any]]) -> list[str]:
    """Port's include/exclude names (`$title`, a property or relation identifier) as the
    field paths of an entity (`title`, `properties.x`, `relations.y`); paths given as such
    pass through."""
    out: list[str] = []
    for name in names or []:
        if name in _META:
            out.append(_META[name])
        elif "." in name:
            out.append(name)
        elif any(name in bp["schema"]["properties"] for bp in blueprints):
            out.append(f"properties.{name}")
        elif any(name in bp["relations"] for bp in blueprints):
            out.append(f"relations.{name}")
        else:
            out.append(name)  # a top-level field (`identifier`, `title`, ...)
    return out


def _picker(
    include: list[str] | None, exclude: list[str] | None, blueprints: list[dict[str, Any]]
) -> FieldFilter:
    paths = _paths(include, blueprints)
    if paths:
        paths += ["identifier", "blueprint"]  # always identify what was found
    return FieldFilter(paths, _paths(exclude, blueprints))


@router.post(
    "/v1/blueprints/{blueprint}/entities/search",
    response_model=SearchPage,
    responses=ERRORS_AUTHED,
    summary="Search a blueprint's entities (paginated)",
)
async def search_blueprint(
    request: Request,
    blueprint: Annotated[str, Path(min_length=1, max_length=100)],
    tenant: CurrentTenant,
    body: Annotated[BlueprintSearchBody | None, Body()] = None,
    include: Paths = None,
    exclude: Paths = None,
    exclude_calculated_properties: bool = False,
    attach_title_to_relation: AttachTitles = False,
) -> Response:
    permissions.require(tenant.principal, "entities.read")
    body = body or BlueprintSearchBody()
    query = body.query.model_dump() if body.query is not None else None
    if body.at is not None:
        instant = _past_instant(request, body.at, attach_title_to_relation)
        past_scope = await fresh_scope(tenant.tx, blueprint, query)
        past, position = await asof.search_page(
            tenant.tx,
            past_scope,
            query,
            instant,
            decode_cursor(body.from_) if body.from_ else None,
            body.limit,
        )
        chosen = _picker(
            (body.include or []) + (include or []) or None,
            (body.exclude or []) + (exclude or []) or None,
            [past_scope.blueprints[blueprint]],
        )
        answer: dict[str, Any] = {"ok": True, "entities": [chosen.apply(e) for e in past]}
        if position is not None:
            answer["next"] = encode_cursor(position)
        return json_response(answer)
    search = await prepare(
        tenant.tx,
        blueprint,
        query,
        calculated=not exclude_calculated_properties,
        titles=attach_title_to_relation,
        windowed=True,
    )
    scope = search.scope
    after = decode_cursor(body.from_) if body.from_ else None
    found, last = await search.page(tenant.tx, after, body.limit)
    pick = _picker(
        (body.include or []) + (include or []) or None,
        (body.exclude or []) + (exclude or []) or None,
        [scope.blueprints[blueprint]],
    )

    async def complete() -> Response:
        await search.calculate(found)  # the transaction has committed: no connection waits
        page: dict[str, Any] = {"ok": True, "entities": [pick.apply(e) for e in found]}
        if last is not None:
            page["next"] = encode_cursor(last)
        return json_response(page)

    return AfterCommit(complete)


class AggregateBody(BaseModel):
    """Port's aggregation body (`func`, `query`, and `property` / `relation` / `scorecard`
    (+ `rule`) / `averageOf` / `measureTimeBy` as the function needs), plus `groupBy`."""

    model_config = ConfigDict(extra="forbid")

    func: Literal["count", "sum", "average", "min", "max", "median", "countValues"]
    query: Rules = Field(default_factory=Rules)
    property: str | None = Field(default=None, max_length=100)
    relation: str | None = Field(default=None, max_length=100)
    scorecard: str | None = Field(
        default=None, max_length=100, description="countValues: entities per level"
    )
    rule: str | None = Field(
        default=None, max_length=100, description="countValues with scorecard: per rule result"
    )
    averageOf: Literal["hour", "day", "week", "month", "total"] | None = None
    measureTimeBy: str | None = Field(default=None, max_length=100)
    calculationBy: str | None = Field(default=None, max_length=100)
    groupBy: str | None = Field(default=None, max_length=100)


class AggregateResult(BaseModel):
    ok: Literal[True] = True
    func: str
    groupBy: str | None = None
    result: Any


@router.post(
    "/v1/entities/aggregate",
    response_model=AggregateResult,
    responses=ERRORS_AUTHED,
    summary="Aggregate over a query: count, sum, average, min, max, median, value counts",
)
async def aggregate_entities(tenant: CurrentTenant, body: AggregateBody) -> Response:
    permissions.require(tenant.principal, "entities.read")
    raw = body.model_dump(exclude_none=True)
    scope = await fresh_scope(tenant.tx, None, raw["query"])
    return json_response(await aggregate(tenant.tx, scope, raw))


@router.post(
    "/v1/entities/search",
    response_model=SearchAll,
    responses=ERRORS_AUTHED,
    summary="Search entities across blueprints (every match, streamed)",
)
async def search_all(
    request: Request,
    tenant: CurrentTenant,
    body: Annotated[SearchAllBody, Body()],
    include: Paths = None,
    exclude: Paths = None,
    exclude_calculated_properties: bool = False,
    attach_title_to_relation: AttachTitles = False,
) -> Response:
    permissions.require(tenant.principal, "entities.read")
    query = body.model_dump(exclude={"at"})
    if body.at is not None:
        if attach_title_to_relation:
            _past_instant(request, body.at, True)
        return await _search_all_past(request, tenant, query, body.at, include, exclude)
    search = await prepare(
        tenant.tx,
        None,
        query,
        calculated=not exclude_calculated_properties,
        titles=attach_title_to_relation,
        documents=True,
    )
    scope = search.scope
    pick = _picker(include, exclude, [scope.blueprints[b] for b in scope.searched])
    db: Database = request.app.state.db
    head = b'{"ok":true,"matchingBlueprints":' + to_json(scope.searched) + b',"entities":['

    async def stream() -> AsyncIterator[bytes]:
        yield head
        async for chunk in search.stream_documents(db, scope.org_id, pick):
            yield chunk
        yield b"]}"

    async def complete() -> Response:
        if search.first_documents is not None:  # before the headers: a failure is the status
            await search.complete_documents(search.first_documents, pick)
        return StreamingResponse(stream(), media_type="application/json")

    return AfterCommit(complete)


async def _search_all_past(
    request: Request,
    tenant: Tenant,
    query: dict[str, Any],
    at: datetime,
    include: list[str] | None,
    exclude: list[str] | None,
) -> Response:
    """Every match as it stood at `at`: the first page read in the request's transaction
    (a bad query is the answer's status), the rest streamed a page per transaction (the
    past does not change between them)."""
    instant = _past_instant(request, at, False)
    scope = await fresh_scope(tenant.tx, None, query)
    pick = _picker(include, exclude, [scope.blueprints[b] for b in scope.searched])
    first, position = await asof.search_page(tenant.tx, scope, query, instant, None, _PAST_PAGE)
    db: Database = request.app.state.db
    head = b'{"ok":true,"matchingBlueprints":' + to_json(scope.searched) + b',"entities":['

    async def stream() -> AsyncIterator[bytes]:
        yield head
        found, after, sent = first, position, False
        while True:
            if found:
                yield (b"," if sent else b"") + b",".join(to_json(pick.apply(e)) for e in found)
                sent = True
            if after is None:
                break
            async with db.tenant(scope.org_id) as tx:
                found, after = await asof.search_page(tx, scope, query, instant, after, _PAST_PAGE)
        yield b"]}"

    async def complete() -> Response:
        return StreamingResponse(stream(), media_type="application/json")

    return AfterCommit(complete)
