"""Entity routes under /v1/blueprints/{bp}/... (Port's shapes)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, Path, Query, Request
from fastapi.responses import Response, StreamingResponse

from app.auth import permissions
from app.auth.principal import CurrentTenant, Tenant
from app.catalog import entities, migrations
from app.catalog.migration_router import router as migration_router
from app.catalog.schemas import (
    AttachTitles,
    BulkBody,
    BulkDeleteBody,
    BulkDeleteResponse,
    BulkResponse,
    CountResponse,
    EntityListResponse,
    EntityResponse,
    MigrationStarted,
    OkResponse,
)
from app.db.database import Database
from app.db.routing import AfterCommit, api_router, key_lookups
from app.history import service as history
from app.kit.errors import Invalid, NotFound, PortolanError
from app.kit.openapi import ERRORS_AUTHED, ErrorBody
from app.kit.responses import json_response, to_json
from app.search.service import prepare, read_one

router = api_router(tags=["Entities"])
BlueprintId = Annotated[str, Path(min_length=1, max_length=100)]
EntityId = Annotated[str, Path(min_length=1, max_length=1000)]
_CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorBody, "description": "Conflicts with existing data"}
}
_MAX_DATASOURCE = 500
_AT = (
    "An instant (ISO 8601; UTC without an offset): the entity as it was then, its own "
    "fields without derived properties, in today's property names"
)


def _writer(request: Request, tenant: Tenant) -> entities.Writer:
    agent = request.headers.get("user-agent", "")[:_MAX_DATASOURCE] or None
    origin = tenant.principal.origin or (
        "INTEGRATION" if agent and agent.startswith("port-ocean/") else "API"
    )
    principal = tenant.principal
    # Admins may write anything: no guard to consult.
    guard = None if principal.is_admin else permissions.EntityGuard(principal)
    ocean = bool(agent and agent.startswith("port-ocean/"))
    return entities.Writer(
        actor=principal.subject,
        origin=origin,
        datasource=agent,
        guard=guard,
        drop_undeclared=ocean,
        # Integrations run on machine credentials: a person's writes name none.
        installation=_installation(agent) if ocean and principal.kind == "app" else None,
    )


def _installation(agent: str | None) -> str | None:
    """The integration's identifier in Ocean's User-Agent
    (`port-ocean/<type>/<version>/<identifier>[/<kind of client>]`)."""
    parts = (agent or "").split("/")
    return parts[3][:100] or None if len(parts) > 3 else None


async def _write_flags(
    upsert: bool = False,
    merge: bool = False,
    create_missing_related_entities: bool = False,
    validation_only: bool = False,
    run_id: Annotated[str | None, Query(max_length=200)] = None,
) -> entities.WriteFlags:
    """Port's write flags, read from the query string."""
    return entities.WriteFlags(
        upsert=upsert,
        merge=merge,
        create_missing_related_entities=create_missing_related_entities,
        validation_only=validation_only,
        run_id=run_id,
    )


def _one(outcomes: list[entities.Outcome]) -> entities.Outcome:
    outcome = outcomes[0]
    if outcome.error is not None:
        raise outcome.error
    return outcome


def _entity_response(outcome: entities.Outcome, *, created: int = 201) -> Response:
    status = created if outcome.created else 200
    return json_response({"ok": True, "entity": outcome.entity}, status_code=status)


@router.post(
    "/v1/blueprints/{blueprint}/entities",
    status_code=201,
    response_model=EntityResponse,
    responses={
        **ERRORS_AUTHED,
        **_CONFLICT,
        200: {"model": EntityResponse, "description": "Updated"},
    },
    summary="Create (or upsert) an entity",
)
@key_lookups
async def create_entity(
    blueprint: BlueprintId,
    request: Request,
    tenant: CurrentTenant,
    body: dict[str, Any],
    flags: Annotated[entities.WriteFlags, Depends(_write_flags)],
) -> Any:
    outcome = _one(
        await entities.write(tenant.tx, blueprint, [body], flags, _writer(request, tenant))
    )
    return _entity_response(outcome)


@router.post(
    "/v1/blueprints/{blueprint}/entities/bulk",
    response_model=BulkResponse,
    responses={
        **ERRORS_AUTHED,
        207: {"model": BulkResponse, "description": "Some entities failed"},
    },
    summary="Create or upsert up to 1000 entities",
)
async def bulk_entities(
    blueprint: BlueprintId,
    body: BulkBody,
    request: Request,
    tenant: CurrentTenant,
    flags: Annotated[entities.WriteFlags, Depends(_write_flags)],
) -> Any:
    outcomes = await entities.write(
        tenant.tx, blueprint, body.entities, flags, _writer(request, tenant)
    )
    done = [
        {"index": o.index, "identifier": o.identifier, "created": o.created}
        for o in outcomes
        if o.error is None
    ]
    errors = [_bulk_error(o.index, o.identifier, o.error) for o in outcomes if o.error is not None]
    return json_response(
        {"ok": not errors, "entities": done, "errors": errors},
        status_code=207 if errors else 200,
    )


def _bulk_error(index: int, identifier: str, error: PortolanError) -> dict[str, Any]:
    return {
        "index": index,
        "identifier": identifier,
        "statusCode": error.status_code,
        "error": error.code,
        "message": error.message,
    }


@router.get(
    "/v1/blueprints/{blueprint}/entities-count",
    response_model=CountResponse,
    responses=ERRORS_AUTHED,
    summary="Count a blueprint's entities",
)
async def count_entities(blueprint: BlueprintId, tenant: CurrentTenant) -> Any:
    permissions.require(tenant.principal, "entities.read")
    return {"ok": True, "count": await entities.count(tenant.tx, blueprint)}


@router.get(
    "/v1/blueprints/{blueprint}/entities",
    response_model=EntityListResponse,
    responses=ERRORS_AUTHED,
    summary="All entities of a blueprint (streamed)",
)
async def list_entities(
    blueprint: BlueprintId,
    request: Request,
    tenant: CurrentTenant,
    include: Annotated[list[str] | None, Query(max_length=100)] = None,
    exclude: Annotated[list[str] | None, Query(max_length=100)] = None,
    exclude_calculated_properties: bool = False,
    attach_title_to_relation: AttachTitles = False,
) -> Any:
    permissions.require(tenant.principal, "entities.read")
    search = await prepare(
        tenant.tx,
        blueprint,
        None,
        calculated=not exclude_calculated_properties,
        titles=attach_title_to_relation,
        streamed=True,
        documents=True,
    )
    db: Database = request.app.state.db
    pick = entities.FieldFilter(include or [], exclude or [])

    async def stream() -> AsyncIterator[bytes]:
        yield b'{"ok":true,"entities":['
        async for chunk in search.stream_documents(db, tenant.org_id, pick):
            yield chunk
        yield b"]}"

    async def complete() -> Response:
        if search.first_documents is not None:  # before the headers: a failure is the status
            await search.complete_documents(search.first_documents, pick)
        return StreamingResponse(stream(), media_type="application/json")

    return AfterCommit(complete)


@router.get(
    "/v1/blueprints/{blueprint}/entities/{identifier:path}",
    response_model=EntityResponse,
    responses=ERRORS_AUTHED,
    summary="Get an entity",
)
@key_lookups
async def get_entity(
    blueprint: BlueprintId,
    identifier: EntityId,
    tenant: CurrentTenant,
    exclude_calculated_properties: bool = False,
    attach_title_to_relation: AttachTitles = False,
    at: Annotated[datetime | None, Query(description=_AT)] = None,
    include: Annotated[list[str] | None, Query(max_length=100)] = None,
    exclude: Annotated[list[str] | None, Query(max_length=100)] = None,
) -> Any:
    """Read through search, so the entity carries its derived properties; with `at`, the
    entity as it was then, from its history (docs/history.md). `include` / `exclude` as on
    the list: top-level fields or `properties.<name>` / `relations.<name>`."""
    permissions.require(tenant.principal, "entities.read")
    pick = entities.FieldFilter(include or [], exclude or []) if include or exclude else None
    if at is not None:
        past = await history.entity_at(
            tenant.tx, blueprint, identifier, at if at.tzinfo else at.replace(tzinfo=UTC)
        )
        return json_response({"ok": True, "entity": pick.apply(past) if pick else past})
    search, found = await read_one(
        tenant.tx,
        blueprint,
        identifier,
        calculated=not exclude_calculated_properties,
        titles=attach_title_to_relation,
    )
    if not found.docs:
        raise NotFound(f"Entity {identifier!r} of blueprint {blueprint!r} was not found")

    async def complete() -> Response:
        # The transaction has committed: no connection waits on the calculations.
        await search.complete_documents(found, None)
        document = found.docs[0]
        if pick is not None:  # decoded only when asked: the plain read sends what was written
            document = to_json(pick.apply(json.loads(document)))
        body = b'{"ok":true,"entity":' + document + b"}"
        return Response(body, media_type="application/json")

    return AfterCommit(complete)


async def _rewrite(
    tenant: Tenant,
    request: Request,
    blueprint: str,
    identifier: str,
    body: dict[str, Any],
    *,
    merge: bool,
    create_missing: bool,
    run_id: str | None,
) -> Any:
    if body.get("identifier", identifier) != identifier:
        raise Invalid("The identifier in the body does not match the URL")
    flags = entities.WriteFlags(
        upsert=True,
        merge=merge,
        create_missing_related_entities=create_missing,
        run_id=run_id,
        must_exist=True,
    )
    outcome = _one(
        await entities.write(
            tenant.tx,
            blueprint,
            [{**body, "identifier": identifier}],
            flags,
            _writer(request, tenant),
        )
    )
    return _entity_response(outcome, created=200)


@router.put(
    "/v1/blueprints/{blueprint}/entities/{identifier:path}",
    response_model=EntityResponse,
    responses=ERRORS_AUTHED,
    summary="Replace an entity",
)
@key_lookups
async def replace_entity(
    blueprint: BlueprintId,
    identifier: EntityId,
    body: dict[str, Any],
    request: Request,
    tenant: CurrentTenant,
    create_missing_related_entities: bool = False,
    run_id: Annotated[str | None, Query(max_length=200)] = None,
) -> Any:
    return await _rewrite(
        tenant,
        request,
        blueprint,
        identifier,
        body,
        merge=False,
        create_missing=create_missing_related_entities,
        run_id=run_id,
    )


@router.patch(
    "/v1/blueprints/{blueprint}/entities/{identifier:path}",
    response_model=EntityResponse,
    responses=ERRORS_AUTHED,
    summary="Change part of an entity (properties and relations given are merged)",
)
@key_lookups
async def patch_entity(
    blueprint: BlueprintId,
    identifier: EntityId,
    body: dict[str, Any],
    request: Request,
    tenant: CurrentTenant,
    create_missing_related_entities: bool = False,
    run_id: Annotated[str | None, Query(max_length=200)] = None,
) -> Any:
    return await _rewrite(
        tenant,
        request,
        blueprint,
        identifier,
        body,
        merge=True,
        create_missing=create_missing_related_entities,
        run_id=run_id,
    )


@router.delete(
    "/v1/blueprints/{blueprint}/entities/{identifier:path}",
    response_model=OkResponse,
    responses={**ERRORS_AUTHED, **_CONFLICT},
    summary="Delete an entity",
)
@key_lookups
async def delete_entity(
    blueprint: BlueprintId,
    identifier: EntityId,
    request: Request,
    tenant: CurrentTenant,
    delete_dependents: bool = False,
    run_id: Annotated[str | None, Query(max_length=200)] = None,
) -> Any:
    deleted = await entities.delete_many(
        tenant.tx,
        blueprint,
        [identifier],
        delete_dependents=delete_dependents,
        writer=_writer(request, tenant),
        run_id=run_id,
    )
    if not deleted:
        raise NotFound(f"Entity {identifier!r} of blueprint {blueprint!r} was not found")
    return {"ok": True}


@router.post(
    "/v1/blueprints/{blueprint}/bulk/entities/delete",
    response_model=BulkDeleteResponse,
    responses={**ERRORS_AUTHED, **_CONFLICT},
    summary="Delete up to 100 entities",
)
async def bulk_delete(
    blueprint: BlueprintId,
    body: BulkDeleteBody,
    request: Request,
    tenant: CurrentTenant,
    delete_dependents: bool = False,
    run_id: Annotated[str | None, Query(max_length=200)] = None,
) -> Any:
    """With `run_id`, the deletions are tied to the run (their events carry it), as a single
    delete's are: only while the run is in progress."""
    deleted = await entities.delete_many(
        tenant.tx,
        blueprint,
        body.entities,
        delete_dependents=delete_dependents,
        writer=_writer(request, tenant),
        run_id=run_id,
    )
    return {"ok": True, "deletedEntities": deleted}


@router.delete(
    "/v1/blueprints/{blueprint}/all-entities",
    response_model=MigrationStarted,
    responses={**ERRORS_AUTHED, **_CONFLICT},
    summary="Delete all of a blueprint's entities (and the blueprint, if asked)",
)
async def delete_all_entities(
    blueprint: BlueprintId,
    request: Request,
    tenant: CurrentTenant,
    delete_blueprint: bool = False,
    run_id: Annotated[str | None, Query(max_length=200)] = None,
) -> Any:
    """With `run_id`, the deletions are tied to the run in progress (their events carry it)."""
    permissions.require(tenant.principal, "entities.unregisterAll", blueprint=blueprint)
    if delete_blueprint:
        permissions.require(tenant.principal, "blueprints.delete")
    migration_id = await migrations.delete_all_entities(
        tenant.tx,
        blueprint,
        delete_blueprint=delete_blueprint,
        writer=_writer(request, tenant),
        run_id=run_id,
    )
    return {"ok": True, "migrationId": migration_id}


# /v1/migrations, served beside the entity routes that start the other kind of migration
# (deleting all of a blueprint's entities).
router.include_router(migration_router)
