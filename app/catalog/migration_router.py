"""`/v1/migrations` (Port's shapes): create a data migration, list, read and cancel
migrations (app/catalog/data_migrations.py; docs/migrations.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from app.auth import permissions
from app.auth.principal import CurrentTenant
from app.catalog import data_migrations
from app.db.routing import api_router
from app.kit.openapi import ERRORS_AUTHED, ErrorBody

router = api_router(tags=["Migrations"])
MigrationId = Annotated[str, Path(min_length=1, max_length=64)]
Jq = Annotated[str, Field(min_length=1, max_length=10_000)]
Status = Literal[
    "COMPLETED",
    "RUNNING",
    "PENDING",
    "INITIALIZING",
    "FAILURE",
    "CANCELLED",
    "PENDING_CANCELLATION",
]
_CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorBody, "description": "The migration has ended, or too many are active"}
}


class MappedEntity(BaseModel):
    """Each value a jq expression over the source entity (with `.item` when
    `itemsToParse` is given); `identifier` defaults to the source entity's."""

    model_config = ConfigDict(extra="forbid")

    identifier: Jq | None = None
    title: Jq | None = None
    icon: Jq | None = None
    team: Jq | None = None
    properties: dict[Annotated[str, Field(min_length=1, max_length=100)], Jq] = Field(
        default_factory=dict
    )
    relations: dict[Annotated[str, Field(min_length=1, max_length=100)], Jq] = Field(
        default_factory=dict
    )


class MigrationMapping(BaseModel):
    model_config = ConfigDict(extra="forbid")

    blueprint: str | None = Field(
        default=None,
        min_length=1,
        max_length=100,
        description="The target blueprint (default: the source blueprint)",
    )
    filter: Jq | None = Field(default=None, description="jq: true to migrate the entity")
    itemsToParse: Jq | None = Field(
        default=None, description="jq: an array; one entity per item, the item as `.item`"
    )
    entity: MappedEntity


class CreateMigrationBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sourceBlueprint: str = Field(min_length=1, max_length=100)
    mapping: MigrationMapping
    dryRun: bool = Field(
        default=False,
        description="Portolan: write nothing; report what would change and what would fail",
    )
    deleteSourceEntities: bool = Field(
        default=False,
        description="Portolan: delete each source entity once its mapped entities are written "
        "(entities moved to another blueprint)",
    )


class CancelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, max_length=1000)


class MigrationOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    actor: str
    sourceBlueprint: str
    mapping: dict[str, Any]
    status: str
    successCount: int
    failureCount: int
    createdAt: datetime
    updatedAt: datetime


class MigrationResponse(BaseModel):
    ok: Literal[True] = True
    migration: MigrationOut


class MigrationListResponse(BaseModel):
    ok: Literal[True] = True
    migrations: list[MigrationOut]


@router.post(
    "/v1/migrations",
    status_code=201,
    response_model=MigrationResponse,
    responses={**ERRORS_AUTHED, **_CONFLICT},
    summary="Create a migration",
)
async def create_migration(
    body: CreateMigrationBody, tenant: CurrentTenant, request: Request
) -> Any:
    """Starts moving or transforming the source blueprint's entities through the mapping,
    in the background (status PENDING, then RUNNING); the writes are checked against the
    starter's permissions entity by entity. `dryRun` reports instead of writing."""
    permissions.require(tenant.principal, "entities.read", blueprint=body.sourceBlueprint)
    migration = await data_migrations.create(
        tenant.tx,
        tenant.principal,
        body.sourceBlueprint,
        body.mapping.model_dump(exclude_none=True),
        dry_run=body.dryRun,
        delete_source=body.deleteSourceEntities,
        max_active=request.app.state.settings.migrations_max_active_per_org,
    )
    return {"ok": True, "migration": migration}


@router.get(
    "/v1/migrations",
    response_model=MigrationListResponse,
    responses=ERRORS_AUTHED,
    summary="Get all migrations",
)
async def list_migrations(
    tenant: CurrentTenant,
    status: Annotated[list[Status] | None, Query()] = None,
    actor: Annotated[str | None, Query(max_length=200)] = None,
    blueprint: Annotated[str | None, Query(max_length=100)] = None,
) -> Any:
    """Newest first (at most 1000); filters combine with AND, `status` repeatable."""
    permissions.require(tenant.principal, "entities.read")
    found = await data_migrations.list_all(
        tenant.tx, statuses=status, actor=actor, blueprint=blueprint
    )
    return {"ok": True, "migrations": found}


@router.get(
    "/v1/migrations/{migration_id}",
    response_model=MigrationResponse,
    responses=ERRORS_AUTHED,
    summary="Get a migration",
)
async def get_migration(migration_id: MigrationId, tenant: CurrentTenant) -> Any:
    """With its progress, its per-entity failures (the first 200) and, for a dry run, the
    preview of the first entities it would write."""
    permissions.require(tenant.principal, "entities.read")
    return {"ok": True, "migration": await data_migrations.get(tenant.tx, migration_id)}


@router.post(
    "/v1/migrations/{migration_id}/cancel",
    response_model=MigrationResponse,
    responses={**ERRORS_AUTHED, **_CONFLICT},
    summary="Cancel a migration",
)
async def cancel_migration(
    migration_id: MigrationId, tenant: CurrentTenant, body: CancelBody | None = None
) -> Any:
    """Admins and the migration's starter may cancel it; batches already written stay."""
    starter = await data_migrations.starter_of(tenant.tx, migration_id)
    if starter != tenant.principal.subject and not tenant.principal.is_admin:
        raise permissions.Denied(
            "migrations.cancel",
            f"migration {migration_id!r}",
            " (held by Admins and the migration's starter)",
        )
    migration = await data_migrations.cancel(
        tenant.tx, migration_id, body.reason if body is not None else None
    )
    return {"ok": True, "migration": migration}
