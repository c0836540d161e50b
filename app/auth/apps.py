"""Machine credentials of an organization (`/v1/apps`): list, create, change, rotate, delete.

Admins only. A credential's secret is shown once, when it is made or rotated; only its hash
is kept. Roles are `Admin`, `Member` or `<blueprint>-moderator` for a blueprint of the org.
The organization's last enabled Admin credential cannot be deleted, disabled or lose its
Admin role (nobody could manage the organization any more). Rotating, disabling, changing
the roles of or deleting a credential ends the tokens issued for it at once.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import Path, Query
from pydantic import BaseModel, ConfigDict, Field

from app.auth import permissions
from app.auth.principal import CurrentTenant, Tenant
from app.auth.service import ADMIN_ROLE, _hash_secret, create_credential
from app.db.database import Tx
from app.db.routing import api_router
from app.kit.errors import Conflict, NotFound
from app.kit.ids import new_secret
from app.kit.openapi import ERRORS_AUTHED, OkResponse, conflict
from app.kit.responses import json_response

router = api_router(prefix="/v1/apps", tags=["Apps (machine credentials)"])
AppId = Annotated[str, Path(min_length=1, max_length=64)]
MEMBER_ROLE = "Member"
_ALL = "SELECT client_id, name, roles, enabled, created_at, updated_at FROM credentials "
_SELECT = _ALL + "WHERE org_id = $1 AND client_id = $2"
_LOCKED = _SELECT + " FOR UPDATE"


class AppBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    roles: list[str] = Field(default_factory=lambda: [MEMBER_ROLE], min_length=1, max_length=50)


class AppPut(BaseModel):
    """Port's body is `{"name"}`; Portolan also takes the roles and `enabled` (absent: as
    they are)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    roles: list[str] | None = Field(default=None, min_length=1, max_length=50)
    enabled: bool | None = Field(
        default=None, description="false: the credential's tokens are refused at once"
    )


class App(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    clientId: str
    name: str
    roles: list[str]
    enabled: bool
    createdAt: datetime
    updatedAt: datetime
    secret: str | None = Field(default=None, description="Only when made or rotated")


AppField = Literal["id", "clientId", "name", "roles", "enabled", "createdAt", "updatedAt", "secret"]


class AppResponse(BaseModel):
    ok: Literal[True] = True
    app: App


class AppListResponse(BaseModel):
    ok: Literal[True] = True
    apps: list[dict[str, Any]] = Field(description="Apps, or the `fields` asked of each")


def _shape(row: asyncpg.Record, secret: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": row["client_id"],
        "clientId": row["client_id"],
        "name": row["name"],
        "roles": list(row["roles"]),
        "enabled": row["enabled"],
        "createdAt": row["created_at"],
        "updatedAt": row["updated_at"],
    }
    if secret is not None:
        out["secret"] = secret  # shown this once
    return out


def _admin(tenant: Tenant) -> Tx:
    permissions.require(tenant.principal, "apps.manage")
    return tenant.tx


async def _check_roles(tx: Tx, roles: list[str]) -> list[str]:
    await permissions.check_roles(tx, roles, "/roles")
    return sorted(set(roles))


async def _row(tx: Tx, client_id: str, *, lock: bool = False) -> asyncpg.Record:
    row = await tx.fetchrow(_LOCKED if lock else _SELECT, tx.org_id, client_id)
    if row is None:
        raise NotFound(f"App {client_id!r} was not found")
    return row


async def _keep_an_admin(tx: Tx, client_id: str) -> None:
    """Refuse when `client_id` is the org's only enabled Admin credential."""
    others = await tx.fetchval(
        "SELECT count(*) FROM credentials WHERE org_id = $1 AND client_id <> $2 "
        "AND $3 = ANY(roles) AND enabled",
        tx.org_id,
        client_id,
        ADMIN_ROLE,
    )
    if not others:
        raise Conflict(
            "This is the organization's last enabled Admin credential",
            code="last_admin_credential",
        )


@router.get("", response_model=AppListResponse, responses=ERRORS_AUTHED, summary="List apps")
async def list_apps(
    tenant: CurrentTenant,
    fields: Annotated[
        list[AppField] | None,
        Query(
            description="Only these fields of each app (`secret` is never listed: only its "
            "hash is kept)"
        ),
    ] = None,
) -> Any:
    tx = _admin(tenant)
    rows = await tx.fetch(
        _ALL + "WHERE org_id = $1 ORDER BY created_at, client_id",
        tx.org_id,
    )
    apps = [_shape(r) for r in rows]
    if fields:
        wanted = set(fields)
        apps = [{k: v for k, v in app.items() if k in wanted} for app in apps]
    return json_response({"ok": True, "apps": apps})


@router.post(
    "",
    status_code=201,
    response_model=AppResponse,
    responses=ERRORS_AUTHED,
    summary="Create an app",
)
async def create_app(body: AppBody, tenant: CurrentTenant) -> Any:
    """The answer carries the secret, once."""
    tx = _admin(tenant)
    roles = await _check_roles(tx, body.roles)
    assert tx.org_id is not None
    made = await create_credential(tx, org_id=tx.org_id, name=body.name, roles=roles)
    row = await _row(tx, made.client_id)
    return json_response({"ok": True, "app": _shape(row, made.client_secret)}, status_code=201)


@router.put(
    "/{app_id}",
    response_model=AppResponse,
    responses={**ERRORS_AUTHED, **conflict("The organization's last Admin credential")},
    summary="Change an app's name (and roles, enabled)",
)
async def change_app(app_id: AppId, body: AppPut, tenant: CurrentTenant) -> Any:
    """Port's `{"name"}`, and Portolan's `roles` and `enabled` (absent: unchanged).
    Disabling a credential refuses its tokens at once and gives it no new ones; enabling it
    again does not bring back the tokens issued before."""
    tx = _admin(tenant)
    current = await _row(tx, app_id, lock=True)
    roles = await _check_roles(tx, body.roles) if body.roles is not None else None
    admin_now = ADMIN_ROLE in current["roles"] and current["enabled"]
    admin_after = ADMIN_ROLE in (roles if roles is not None else current["roles"]) and (
        body.enabled if body.enabled is not None else current["enabled"]
    )
    if admin_now and not admin_after:
        await _keep_an_admin(tx, app_id)
    await tx.execute(
        # Tokens carry their roles: changing the roles, or disabling the credential, ends
        # the tokens issued before.
        "UPDATE credentials SET name = $3::varchar, roles = coalesce($4, roles), "
        "enabled = coalesce($5, enabled), "
        "tokens_valid_after = CASE WHEN ($4::varchar[] IS NOT NULL AND $4 IS DISTINCT FROM roles)"
        " OR ($5 IS FALSE AND enabled) "
        "THEN date_trunc('second', now()) ELSE tokens_valid_after END, "
        "updated_at = CASE WHEN (name, roles, enabled) IS DISTINCT FROM "
        "($3::varchar, coalesce($4, roles), coalesce($5, enabled)) "
        "THEN now() ELSE updated_at END "
        "WHERE org_id = $1 AND client_id = $2",
        tx.org_id,
        app_id,
        body.name,
        roles,
        body.enabled,
    )
    return json_response({"ok": True, "app": _shape(await _row(tx, app_id))})


@router.post(
    "/{app_id}/rotate-secret",
    response_model=AppResponse,
    responses=ERRORS_AUTHED,
    summary="Rotate an app's secret",
)
async def rotate_secret(app_id: AppId, tenant: CurrentTenant) -> Any:
    """A new secret (in the answer, once); the old one stops working at once."""
    tx = _admin(tenant)
    await _row(tx, app_id, lock=True)
    secret = new_secret()
    await tx.execute(
        "UPDATE credentials SET secret_hash = $3, tokens_valid_after = date_trunc('second', now()),"
        " updated_at = now() WHERE org_id = $1 AND client_id = $2",
        tx.org_id,
        app_id,
        _hash_secret(secret),
    )
    return json_response({"ok": True, "app": _shape(await _row(tx, app_id), secret)})


@router.delete(
    "/{app_id}",
    response_model=OkResponse,
    responses={**ERRORS_AUTHED, **conflict("The organization's last Admin credential")},
    summary="Delete an app",
)
async def delete_app(app_id: AppId, tenant: CurrentTenant) -> Any:
    tx = _admin(tenant)
    current = await _row(tx, app_id, lock=True)
    if ADMIN_ROLE in current["roles"] and current["enabled"]:
        await _keep_an_admin(tx, app_id)
    await tx.execute(
        "DELETE FROM credentials WHERE org_id = $1 AND client_id = $2", tx.org_id, app_id
    )
    return {"ok": True}
