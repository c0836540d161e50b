"""Action routes (Port's shapes): /v1/actions."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path, Query
from pydantic import BaseModel, ConfigDict, Field

from app.actions import service, versions
from app.auth import permissions
from app.auth.principal import CurrentTenant
from app.db.routing import api_router
from app.kit.openapi import ERRORS_AUTHED, OkResponse, conflict

router = api_router(prefix="/v1/actions", tags=["Actions"])
ActionId = Annotated[str, Path(min_length=1, max_length=100)]
Names = Annotated[list[str] | None, Query(max_length=100)]
_CONFLICT = conflict("An action with this identifier exists")


class ActionBody(BaseModel):
    """Port's action: `trigger` (self-service with `operation`, `blueprintIdentifier`,
    `userInputs`, `condition`; or automation with an `event` and a jq `condition`),
    `invocationMethod` (WEBHOOK, GITHUB, GITLAB, UPSERT_ENTITY, INTEGRATION_ACTION),
    `requiredApproval`."""

    model_config = ConfigDict(extra="allow")

    identifier: str | None = Field(default=None, max_length=100)
    title: str | None = None
    icon: str | None = None
    description: str | None = None
    trigger: Any = None
    invocationMethod: Any = None
    requiredApproval: Any = Field(default=None, description="true, false or {type: ANY|ALL}")
    approvalNotification: Any = None
    publish: Any = Field(default=None, description="true or false")
    allowAnyoneToViewRuns: Any = Field(default=None, description="true or false")


class Action(BaseModel):
    model_config = ConfigDict(extra="allow")

    identifier: str
    trigger: dict[str, Any]
    invocationMethod: dict[str, Any]
    requiredApproval: bool | dict[str, Any]
    publish: bool
    createdAt: datetime
    createdBy: str
    updatedAt: datetime
    updatedBy: str


class ActionResponse(BaseModel):
    ok: Literal[True] = True
    action: Action


class ActionListResponse(BaseModel):
    ok: Literal[True] = True
    actions: list[Action]


TriggerEvents = Annotated[
    list[
        Literal[
            "ENTITY_CREATED",
            "ENTITY_UPDATED",
            "ENTITY_DELETED",
            "TIMER_PROPERTY_EXPIRED",
            "ANY_ENTITY_CHANGE",
            "RUN_CREATED",
            "RUN_UPDATED",
            "ANY_RUN_CHANGE",
        ]
    ]
    | None,
    Query(description="Automations triggered by these events"),
]


def _blueprint_of(action: dict[str, Any]) -> str | None:
    """The blueprint an action belongs to (its moderators manage it), if any."""
    trigger = action.get("trigger")
    if not isinstance(trigger, dict):
        return None
    event = trigger.get("event")
    found = trigger.get("blueprintIdentifier") or (
        event.get("blueprintIdentifier") if isinstance(event, dict) else None
    )
    return found if isinstance(found, str) else None


def _raw(body: ActionBody) -> dict[str, Any]:
    return body.model_dump(exclude_unset=True)


@router.post(
    "",
    status_code=201,
    response_model=ActionResponse,
    responses={**ERRORS_AUTHED, **_CONFLICT},
    summary="Create an action",
)
async def create_action(body: ActionBody, tenant: CurrentTenant) -> Any:
    raw = _raw(body)
    permissions.require(tenant.principal, "actions.manage", blueprint=_blueprint_of(raw))
    created = await service.create(tenant.tx, tenant.principal.subject, raw)
    return {"ok": True, "action": created}


@router.get("", response_model=ActionListResponse, responses=ERRORS_AUTHED, summary="List actions")
async def list_actions(
    tenant: CurrentTenant,
    action_identifier: Names = None,
    blueprint_identifier: Names = None,
    operation: Names = None,
    published: bool | None = None,
    trigger_type: Literal["self-service", "automation"] | None = None,
    trigger_event: TriggerEvents = None,
    trigger_event_action_identifier: Names = None,
    version: versions.ApiVersion = None,
) -> Any:
    """Filters combine with AND; `trigger_event` (the event that triggers an automation)
    and `trigger_event_action_identifier` (the action whose runs trigger it) leave
    self-service actions out."""
    versions.check(version)
    permissions.require(tenant.principal, "actions.read")
    actions = await service.list_all(
        tenant.tx,
        identifiers=action_identifier,
        blueprints=blueprint_identifier,
        operations=operation,
        published=published,
        trigger_type=trigger_type,
        events=list(trigger_event) if trigger_event else None,
        event_actions=trigger_event_action_identifier,
    )
    return {"ok": True, "actions": actions}


@router.get(
    "/{identifier}", response_model=ActionResponse, responses=ERRORS_AUTHED, summary="Get an action"
)
async def get_action(identifier: ActionId, tenant: CurrentTenant) -> Any:
    permissions.require(tenant.principal, "actions.read")
    return {"ok": True, "action": await service.get(tenant.tx, identifier)}


@router.put(
    "/{identifier}",
    response_model=ActionResponse,
    responses=ERRORS_AUTHED,
    summary="Replace an action",
)
async def replace_action(identifier: ActionId, body: ActionBody, tenant: CurrentTenant) -> Any:
    raw = _raw(body)
    current = await service.get(tenant.tx, identifier)
    for blueprint in (_blueprint_of(current), _blueprint_of(raw)):
        permissions.require(tenant.principal, "actions.manage", blueprint=blueprint)
    updated = await service.replace(tenant.tx, tenant.principal.subject, identifier, raw)
    return {"ok": True, "action": updated}


@router.delete(
    "/{identifier}", response_model=OkResponse, responses=ERRORS_AUTHED, summary="Delete an action"
)
async def delete_action(identifier: ActionId, tenant: CurrentTenant) -> Any:
    current = await service.get(tenant.tx, identifier)
    permissions.require(tenant.principal, "actions.manage", blueprint=_blueprint_of(current))
    await service.delete(tenant.tx, identifier)
    return {"ok": True}


class ActionPermissionsResponse(BaseModel):
    ok: Literal[True] = True
    permissions: dict[str, Any] = Field(
        description="`{execute: {users, roles, teams, ownedByTeam, policy}, approve: {users, "
        "roles, teams, policy}}`"
    )


@router.get(
    "/{identifier}/permissions",
    response_model=ActionPermissionsResponse,
    responses=ERRORS_AUTHED,
    tags=["Permissions"],
    summary="Who may execute and approve the action",
)
async def get_action_permissions(identifier: ActionId, tenant: CurrentTenant) -> Any:
    permissions.require(tenant.principal, "actions.permissions.read")
    action = await service.get(tenant.tx, identifier)
    perms = await permissions.action_permissions(tenant.tx, action)
    return {"ok": True, "permissions": perms.to_api()}


@router.patch(
    "/{identifier}/permissions",
    response_model=ActionPermissionsResponse,
    responses=ERRORS_AUTHED,
    tags=["Permissions"],
    summary="Change who may execute and approve the action",
)
async def patch_action_permissions(
    identifier: ActionId, body: dict[str, Any], tenant: CurrentTenant
) -> Any:
    """Each block given replaces the keys it names; others keep their values. Roles, teams
    and users named must exist; `policy` (dynamic permissions) cannot be set."""
    action = await service.get(tenant.tx, identifier)
    permissions.require(
        tenant.principal, "actions.permissions.update", blueprint=_blueprint_of(action)
    )
    perms = await permissions.update_action_permissions(tenant.tx, action, body)
    return {"ok": True, "permissions": perms.to_api()}
