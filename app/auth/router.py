"""POST /v1/auth/access_token: client credentials -> bearer token, as Port answers it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Path, Request
from pydantic import BaseModel, Field

from app.auth import permissions, service
from app.auth.principal import CurrentTenant
from app.auth.schemas import AccessTokenRequest, AccessTokenResponse
from app.catalog import blueprints
from app.db.routing import api_router
from app.kit.openapi import ERRORS_AUTHED, ERRORS_PUBLIC

router = api_router(tags=["Authentication"])


@router.post(
    "/v1/auth/access_token",
    response_model=AccessTokenResponse,
    responses=ERRORS_PUBLIC,
    summary="Create an access token",
)
async def create_access_token(body: AccessTokenRequest, request: Request) -> AccessTokenResponse:
    org_id = service.org_for_client_id(body.clientId)
    tokens = request.app.state.tokens
    async with request.app.state.db.tenant(org_id) as tx:
        token = await service.exchange_credentials(
            tx, tokens, org_id=org_id, client_id=body.clientId, client_secret=body.clientSecret
        )
    return AccessTokenResponse(accessToken=token, expiresIn=tokens.ttl)


class Me(BaseModel):
    kind: Literal["app", "user"]
    subject: str = Field(description="The credential's client id, or the user's email")
    email: str | None
    organization: dict[str, Any] = Field(description="`{id, name}`")
    roles: list[str]
    teams: list[str]
    permissions: dict[str, Any] = Field(
        description="`operations`: org-level operations held; `blueprints`: per blueprint the "
        "operations held there and the entity permissions (`all`, `ownedByTeam`: only "
        "entities the caller's teams own, `none`); `actions`: per self-service action, "
        "`execute` (`all`, `ownedByTeam`, `none`) and `approve`"
    )


class MeResponse(BaseModel):
    ok: Literal[True] = True
    me: Me


@router.get(
    "/v1/auth/me",
    response_model=MeResponse,
    responses=ERRORS_AUTHED,
    summary="Who am I: organization, roles, teams and effective permissions",
)
async def me(tenant: CurrentTenant) -> Any:
    principal = tenant.principal
    org_name = await tenant.tx.fetchval(
        "SELECT name FROM organizations WHERE id = $1", tenant.org_id
    )
    return {
        "ok": True,
        "me": {
            "kind": principal.kind,
            "subject": principal.subject,
            "email": principal.email,
            "organization": {"id": str(tenant.org_id), "name": org_name},
            "roles": list(principal.roles),
            "teams": list(principal.teams),
            "permissions": await permissions.effective(
                tenant.tx, principal, await blueprints.list_all(tenant.tx)
            ),
        },
    }


class PersonalCredentials(BaseModel):
    clientId: str
    clientSecret: str = Field(description="Shown this once; only its hash is kept")


class RotatedCredentialsResponse(BaseModel):
    ok: Literal[True] = True
    credentials: PersonalCredentials


@router.post(
    "/v1/rotate-credentials/{user_email}",
    response_model=RotatedCredentialsResponse,
    responses=ERRORS_AUTHED,
    tags=["Users"],
    summary="Rotate a user's personal credentials",
)
async def rotate_credentials(
    user_email: Annotated[
        str, Path(min_length=1, max_length=320, description="The user's email address")
    ],
    tenant: CurrentTenant,
) -> Any:
    """New personal credentials (client id and secret, exchanged at
    `POST /v1/auth/access_token` for a token of the user). The old ones stop working at once,
    and so does every token of the user issued before. Admins rotate anyone's; a user their
    own."""
    permissions.require_self_or(tenant.principal, "users.rotateCredentials", user_email)
    made = await service.rotate_personal(tenant.tx, user_email)
    return {
        "ok": True,
        "credentials": {"clientId": made.client_id, "clientSecret": made.client_secret},
    }
