"""Catalog routes: /v1/blueprints (Port's shapes and status codes)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Path, Query, Request
from pydantic import BaseModel, Field

from app.actions import service as actions
from app.auth import permissions
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
from app.config import Settings
from app.db.routing import api_router
from app.kit.openapi import ERRORS_AUTHED, conflict
from app.pages import service as pages

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
async def create_blueprint(
    request: Request,
    body: BlueprintBody,
    tenant: CurrentTenant,
    create_catalog_page: Annotated[
        bool | None,
        Query(
            description="Port's: also make the blueprint's catalog page (a page of type "
            "blueprint-entities named as the blueprint, with a table of its entities; "
            "docs/dashboards.md). Left out, no page is made"
        ),
    ] = None,
) -> Any:
    permissions.require(tenant.principal, "blueprints.create")
    created = await blueprints.create(tenant.tx, tenant.principal.subject, _body(body))
    if create_catalog_page:
        permissions.require(tenant.principal, "pages.create")
        settings: Settings = request.app.state.settings
        await pages.create_catalog_page(
            tenant.tx,
            tenant.principal.subject,
            created,
            max_pages=settings.pages_max_per_org,
            max_widgets=settings.page_widgets_max,
        )
    return {"ok": True, "blueprint": created}


@router.get(
    "", response_model=BlueprintListResponse, responses=ERRORS_AUTHED, summary="List blueprints"
)
async def list_blueprints(tenant: CurrentTenant) -> Any:
    permissions.require(tenant.principal, "blueprints.read")
    return {"ok": True, "blueprints": await blueprints.list_all(tenant.tx)}


@router.get(
    "/{identifier}",
    response_model=BlueprintResponse,
    responses=ERRORS_AUTHED,
    summary="Get a blueprint",
)
async def get_blueprint(identifier: BlueprintId, tenant: CurrentTenant) -> Any:
    permissions.require(tenant.principal, "blueprints.read")
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
    permissions.require(tenant.principal, "blueprints.update", blueprint=identifier)
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
    permissions.require(tenant.principal, "blueprints.update", blueprint=identifier)
    updated = await blueprints.patch(tenant.tx, tenant.principal.subject, identifier, _body(body))
    return {"ok": True, "blueprint": updated}


@router.delete(
    "/{identifier}",
    response_model=OkResponse,
    responses={**ERRORS_AUTHED, **_CONFLICT},
    summary="Delete a blueprint (refused while it has entities or is a relation target)",
)
async def delete_blueprint(
    identifier: BlueprintId,
    tenant: CurrentTenant,
    delete_actions: Annotated[
        bool,
        Query(description="Also delete the self-service actions of the blueprint (Port's)"),
    ] = False,
) -> Any:
    """Without `delete_actions` the blueprint's actions stay (their runs show the blueprint
    deleted); with it, its self-service actions go in the same transaction."""
    permissions.require(tenant.principal, "blueprints.delete")
    await blueprints.delete(tenant.tx, identifier)
    if delete_actions:
        owned = await actions.list_all(
            tenant.tx, blueprints=[identifier], trigger_type="self-service"
        )
        for action in owned:
            await actions.delete(tenant.tx, action["identifier"])
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
    permissions.require(tenant.principal, "blueprints.update", blueprint=identifier)
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
    permissions.require(tenant.principal, "blueprints.update", blueprint=identifier)
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
    permissions.require(tenant.principal, "blueprints.update", blueprint=identifier)
    updated = await blueprints.rename_mirror(
        tenant.tx, tenant.principal.subject, identifier, name, body.newMirrorName
    )
    return {"ok": True, "blueprint": updated}


class PermissionsResponse(BaseModel):
    ok: Literal[True] = True
    permissions: dict[str, Any] = Field(
        description="`{entities: {read, register, update, unregister, updateProperties: "
        "{property: block}, updateRelations: {relation: block}}}`; a block is "
        "`{users, roles, teams, ownedByTeam}`. A property or relation without a block of "
        "its own follows `update`."
    )


@router.get(
    "/{identifier}/permissions",
    response_model=PermissionsResponse,
    responses=ERRORS_AUTHED,
    tags=["Permissions"],
    summary="Who may register, update and unregister the blueprint's entities",
)
async def get_permissions(identifier: BlueprintId, tenant: CurrentTenant) -> Any:
    permissions.require(tenant.principal, "blueprints.permissions.read", blueprint=identifier)
    definition = await blueprints.get(tenant.tx, identifier)
    perms = await permissions.blueprint_permissions(tenant.tx, identifier)
    return {"ok": True, "permissions": perms.to_api(definition)}


@router.patch(
    "/{identifier}/permissions",
    response_model=PermissionsResponse,
    responses=ERRORS_AUTHED,
    tags=["Permissions"],
    summary="Change who may register, update and unregister the blueprint's entities",
)
async def patch_permissions(
    identifier: BlueprintId, body: dict[str, Any], tenant: CurrentTenant
) -> Any:
    """Each block given replaces the keys it names (`users`, `roles`, `teams`,
    `ownedByTeam`); blocks and keys not given keep their values. Roles, teams and users named
    must exist. `read` cannot be restricted, nor `policy` set."""
    permissions.require(tenant.principal, "blueprints.permissions.update", blueprint=identifier)
    definition = await blueprints.get(tenant.tx, identifier)
    perms = await permissions.update_blueprint_permissions(tenant.tx, definition, body)
    return {"ok": True, "permissions": perms.to_api(definition)}
