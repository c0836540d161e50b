"""Machine credentials of an organization (`/v1/apps`): list, create, change, rotate, delete.

Admins only. A credential's secret is shown once, when it is made or rotated; only its hash
is kept. Roles are `Admin`, `Member` or `<blueprint>-moderator` for a blueprint of the org.
The organization's last Admin credential cannot be deleted or lose its Admin role (nobody
could manage the organization any more). Tokens already issued for a credential stay valid
until they expire (PORTOLAN_TOKEN_TTL_SECONDS); rotating or deleting it stops new ones.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import asyncpg
from fastapi import Path
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
_SELECT = (
    "SELECT client_id, name, roles, created_at FROM credentials "
    "WHERE org_id = $1 AND client_id = $2"
)
_LOCKED = _SELECT + " FOR UPDATE"


class AppBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    roles: list[str] = Field(default_factory=lambda: [MEMBER_ROLE], min_length=1, max_length=50)


class AppPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=200)
    roles: list[str] | None = Field(default=None, min_length=1, max_length=50)


class App(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    clientId: str
    name: str
    roles: list[str]


class AppResponse(BaseModel):
    ok: Literal[True] = True
    app: App


class AppListResponse(BaseModel):
    ok: Literal[True] = True
    apps: list[App]


def _shape(row: asyncpg.Record, secret: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": row["client_id"],
        "clientId": row["client_id"],
        "name": row["name"],
        "roles": list(row["roles"]),
        "createdAt": row["created_at"],
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
    """Refuse when `client_id` is the org's only Admin credential."""
    others = await tx.fetchval(
        "SELECT count(*) FROM credentials WHERE org_id = $1 AND client_id <> $2 "
        "AND $3 = ANY(roles)",
        tx.org_id,
        client_id,
        ADMIN_ROLE,
    )
    if not others:
        raise Conflict(
            "This is the organization's last Admin credential", code="last_admin_credential"
        )


@router.get("", response_model=AppListResponse, responses=ERRORS_AUTHED, summary="List apps")
async def list_apps(tenant: CurrentTenant) -> Any:
    tx = _admin(tenant)
    rows = await tx.fetch(
        "SELECT client_id, name, roles, created_at FROM credentials WHERE org_id = $1 "
        "ORDER BY created_at, client_id",
        tx.org_id,
    )
    return json_response({"ok": True, "apps": [_shape(r) for r in rows]})


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
    summary="Change an app's name or roles",
)
async def change_app(app_id: AppId, body: AppPatch, tenant: CurrentTenant) -> Any:
    tx = _admin(tenant)
    current = await _row(tx, app_id, lock=True)
    roles = await _check_roles(tx, body.roles) if body.roles is not None else None
    if roles is not None and ADMIN_ROLE in current["roles"] and ADMIN_ROLE not in roles:
        await _keep_an_admin(tx, app_id)
    await tx.execute(
        # Tokens carry their roles: changing the roles ends the tokens issued before.
        "UPDATE credentials SET name = coalesce($3, name), roles = coalesce($4, roles), "
        "tokens_valid_after = CASE WHEN $4::varchar[] IS DISTINCT FROM roles "
        "THEN date_trunc('second', now()) ELSE tokens_valid_after END "
        "WHERE org_id = $1 AND client_id = $2",
        tx.org_id,
        app_id,
        body.name,
        roles,
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
        "UPDATE credentials SET secret_hash = $3, tokens_valid_after = date_trunc('second', now()) "
        "WHERE org_id = $1 AND client_id = $2",
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
    if ADMIN_ROLE in current["roles"]:
        await _keep_an_admin(tx, app_id)
    await tx.execute(
        "DELETE FROM credentials WHERE org_id = $1 AND client_id = $2", tx.org_id, app_id
    )
    return {"ok": True}
