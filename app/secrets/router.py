"""Organization secrets (Port's shapes) and the webhook signing secret."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path, Request
from pydantic import BaseModel, ConfigDict, Field

from app.auth import permissions
from app.auth.principal import CurrentTenant
from app.db.routing import api_router
from app.kit.crypto import Cipher, cipher_for
from app.kit.openapi import ERRORS_AUTHED, OkResponse, conflict
from app.secrets import service

router = api_router(prefix="/v1/organization", tags=["Organization"])
SecretName = Annotated[str, Path(min_length=1, max_length=100)]
_CONFLICT = conflict("A secret with this name exists")


def _cipher(request: Request) -> Cipher:
    return cipher_for(request.app.state.settings)


class SecretBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    secretName: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_-]+$")
    secretValue: str = Field(min_length=1, description="never returned after this")
    description: str | None = Field(default=None, max_length=200)


class SecretPatchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    secretValue: str | None = Field(default=None, min_length=1)
    description: str | None = Field(default=None, max_length=200)


class Secret(BaseModel):
    secretName: str
    description: str | None = None
    createdAt: datetime
    updatedAt: datetime


class SecretResponse(BaseModel):
    ok: Literal[True] = True
    secret: Secret


class SecretListResponse(BaseModel):
    ok: Literal[True] = True
    secrets: list[Secret]


class SigningSecretResponse(BaseModel):
    ok: Literal[True] = True
    signingSecret: str = Field(
        description="The key of X-Port-Signature: base64 HMAC-SHA256 of '{timestamp}.{body}'"
    )


@router.post(
    "/secrets",
    status_code=201,
    response_model=SecretResponse,
    responses={**ERRORS_AUTHED, **_CONFLICT},
    summary="Create a secret (its value is encrypted and never returned)",
)
async def create_secret(body: SecretBody, tenant: CurrentTenant, request: Request) -> Any:
    permissions.require(tenant.principal, "secrets.manage")
    created = await service.create(
        tenant.tx,
        _cipher(request),
        tenant.principal.subject,
        body.secretName,
        body.secretValue,
        body.description,
    )
    return {"ok": True, "secret": created}


@router.get(
    "/secrets",
    response_model=SecretListResponse,
    responses=ERRORS_AUTHED,
    summary="The organization's secrets (names and descriptions)",
)
async def list_secrets(tenant: CurrentTenant) -> Any:
    permissions.require(tenant.principal, "secrets.read")
    return {"ok": True, "secrets": await service.list_all(tenant.tx)}


@router.get(
    "/secrets/{name}",
    response_model=SecretResponse,
    responses=ERRORS_AUTHED,
    summary="A secret (without its value)",
)
async def get_secret(name: SecretName, tenant: CurrentTenant) -> Any:
    permissions.require(tenant.principal, "secrets.read")
    return {"ok": True, "secret": await service.get(tenant.tx, name)}


@router.patch(
    "/secrets/{name}",
    response_model=SecretResponse,
    responses=ERRORS_AUTHED,
    summary="Change a secret's value or description",
)
async def update_secret(
    name: SecretName, body: SecretPatchBody, tenant: CurrentTenant, request: Request
) -> Any:
    permissions.require(tenant.principal, "secrets.manage")
    changes = body.model_dump(exclude_unset=True)
    updated = await service.update(
        tenant.tx, _cipher(request), tenant.principal.subject, name, changes
    )
    return {"ok": True, "secret": updated}


@router.delete(
    "/secrets/{name}",
    response_model=OkResponse,
    responses=ERRORS_AUTHED,
    summary="Delete a secret",
)
async def delete_secret(name: SecretName, tenant: CurrentTenant) -> Any:
    permissions.require(tenant.principal, "secrets.manage")
    await service.delete(tenant.tx, name)
    return {"ok": True}


@router.get(
    "/signing-secret",
    response_model=SigningSecretResponse,
    responses=ERRORS_AUTHED,
    summary="The key outbound webhooks are signed with",
)
async def get_signing_secret(tenant: CurrentTenant, request: Request) -> Any:
    permissions.require(tenant.principal, "organization.signingSecret")
    return {"ok": True, "signingSecret": await service.signing_secret(tenant.tx, _cipher(request))}


@router.post(
    "/signing-secret/rotate",
    response_model=SigningSecretResponse,
    responses=ERRORS_AUTHED,
    summary="Replace the signing secret (the old one stops signing at once)",
)
async def rotate_signing_secret(tenant: CurrentTenant, request: Request) -> Any:
    permissions.require(tenant.principal, "organization.signingSecret")
    fresh = await service.rotate_signing_secret(tenant.tx, _cipher(request))
    return {"ok": True, "signingSecret": fresh}
