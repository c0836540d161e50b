"""Catalog routes: /v1/blueprints (Port's shapes and status codes)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path

from app.auth.principal import CurrentTenant
from app.catalog import blueprints
from app.catalog.schemas import (
    BlueprintBody,
    BlueprintListResponse,
    BlueprintPatchBody,
    BlueprintReplaceBody,
    BlueprintResponse,
    OkResponse,
    RenameMirrorBody,
    RenamePropertyBody,
    RenameRelationBody,
)
from app.db.routing import api_router
from app.kit.openapi import ERRORS_AUTHED, conflict

router = api_router(prefix="/v1/blueprints", tags=["Blueprints"])
BlueprintId = Annotated[str, Path(min_length=1, max_length=100)]
_CONFLICT = conflict("Conflicts with existing data")


def _body(model: BlueprintBody | BlueprintPatchBody) -> dict[str, Any]:
    return model.model_dump(by_alias=True, exclude_unset=True)


@router.post(
    "",
    status_code=201,
    response_model=BlueprintResponse,
    responses={**ERRORS_AUTHED, **_CONFLICT},
    summary="Create a blueprint",
)
async def create_blueprint(body: BlueprintBody, tenant: CurrentTenant) -> Any:
    created = await blueprints.create(tenant.tx, tenant.principal.subject, _body(body))
    return {"ok": True, "blueprint": created}


@router.get(
    "", response_model=BlueprintListResponse, responses=ERRORS_AUTHED, summary="List blueprints"
)
async def list_blueprints(tenant: CurrentTenant) -> Any:
    return {"ok": True, "blueprints": await blueprints.list_all(tenant.tx)}


@router.get(
    "/{identifier}",
    response_model=BlueprintResponse,
    responses=ERRORS_AUTHED,
    summary="Get a blueprint",
)
async def get_blueprint(identifier: BlueprintId, tenant: CurrentTenant) -> Any:
    return {"ok": True, "blueprint": await blueprints.get(tenant.tx, identifier)}


@router.put(
    "/{identifier}",
    response_model=BlueprintResponse,
    responses={**ERRORS_AUTHED, **_CONFLICT},
    summary="Replace a blueprint",
)
async def replace_blueprint(
    identifier: BlueprintId, body: BlueprintReplaceBody, tenant: CurrentTenant
) -> Any:
    updated = await blueprints.replace(tenant.tx, tenant.principal.subject, identifier, _body(body))
    return {"ok": True, "blueprint": updated}


@router.patch(
    "/{identifier}",
    response_model=BlueprintResponse,
    responses={**ERRORS_AUTHED, **_CONFLICT},
    summary="Change part of a blueprint (top-level keys given replace the stored ones)",
)
async def patch_blueprint(
    identifier: BlueprintId, body: BlueprintPatchBody, tenant: CurrentTenant
) -> Any:
    updated = await blueprints.patch(tenant.tx, tenant.principal.subject, identifier, _body(body))
    return {"ok": True, "blueprint": updated}


@router.delete(
    "/{identifier}",
    response_model=OkResponse,
    responses={**ERRORS_AUTHED, **_CONFLICT},
    summary="Delete a blueprint (refused while it has entities or is a relation target)",
)
async def delete_blueprint(identifier: BlueprintId, tenant: CurrentTenant) -> Any:
    await blueprints.delete(tenant.tx, identifier)
    return {"ok": True}


NameInPath = Annotated[str, Path(min_length=1, max_length=100)]


@router.patch(
    "/{identifier}/properties/{name}/rename",
    response_model=BlueprintResponse,
    responses={**ERRORS_AUTHED, **_CONFLICT},
    summary="Rename a property, carrying every entity's value along",
)
async def rename_property(
    identifier: BlueprintId, name: NameInPath, body: RenamePropertyBody, tenant: CurrentTenant
) -> Any:
    updated = await blueprints.rename_property(
        tenant.tx, tenant.principal.subject, identifier, name, body.newPropertyName
    )
    return {"ok": True, "blueprint": updated}


@router.patch(
    "/{identifier}/relations/{name}/rename",
    response_model=BlueprintResponse,
    responses={**ERRORS_AUTHED, **_CONFLICT},
    summary="Rename a relation, carrying every entity's links along",
)
async def rename_relation(
    identifier: BlueprintId, name: NameInPath, body: RenameRelationBody, tenant: CurrentTenant
) -> Any:
    updated = await blueprints.rename_relation(
        tenant.tx, tenant.principal.subject, identifier, name, body.newRelationIdentifier
    )
    return {"ok": True, "blueprint": updated}


@router.patch(
    "/{identifier}/mirror/{name}/rename",
    response_model=BlueprintResponse,
    responses={**ERRORS_AUTHED, **_CONFLICT},
    summary="Rename a mirror property",
)
async def rename_mirror(
    identifier: BlueprintId, name: NameInPath, body: RenameMirrorBody, tenant: CurrentTenant
) -> Any:
    updated = await blueprints.rename_mirror(
        tenant.tx, tenant.principal.subject, identifier, name, body.newMirrorName
    )
    return {"ok": True, "blueprint": updated}
