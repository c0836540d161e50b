"""`/v1/organization/oidc`: the organization's OpenID Connect identity provider (Admins).

Tokens the provider issues for the configured audience are accepted as bearer tokens of
this organization's users (app/auth/verifier.py); docs/identity.md tells how, and how a
token finds its organization when organizations share an issuer and audience.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.background import BackgroundTask
from starlette.responses import Response

from app.auth import oidc, permissions
from app.auth.principal import CurrentTenant
from app.auth.verifier import Verifier
from app.config import Settings
from app.db.routing import api_router
from app.kit import outbound
from app.kit.openapi import ERRORS_AUTHED, OkResponse
from app.kit.responses import json_response

router = api_router(prefix="/v1/organization", tags=["Organization"])

ClaimName = Annotated[str, StringConstraints(min_length=1, max_length=100)]
GroupName = Annotated[str, StringConstraints(min_length=1, max_length=200)]
TeamName = Annotated[str, StringConstraints(min_length=1, max_length=200)]
RoleName = Annotated[str, StringConstraints(min_length=1, max_length=120)]


class OidcBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    issuer: str = Field(
        min_length=1,
        max_length=500,
        description="The provider's issuer (`iss`), an https URL",
    )
    audience: str = Field(
        min_length=1, max_length=500, description="The `aud` its tokens carry for Portolan"
    )
    jwksUri: str = Field(
        min_length=1, max_length=2000, description="Where its signing keys (JWKS) are"
    )
    emailClaim: ClaimName = Field(default="email", description="The claim naming the user")
    nameClaim: ClaimName = Field(default="name", description="The user's full name")
    groupsClaim: ClaimName | None = Field(
        default=None, description="The user's groups (a list of strings)"
    )
    groupTeams: dict[GroupName, TeamName] = Field(
        default_factory=dict, max_length=1000, description="Group -> team the user joins"
    )
    groupRoles: dict[GroupName, RoleName] = Field(
        default_factory=dict,
        max_length=1000,
        description="Group -> role: Admin, Member or <blueprint>-moderator",
    )


class Oidc(BaseModel):
    issuer: str
    audience: str
    jwksUri: str
    emailClaim: str
    nameClaim: str
    groupsClaim: str | None
    groupTeams: dict[str, str]
    groupRoles: dict[str, str]
    updatedAt: datetime


class OidcResponse(BaseModel):
    ok: Literal[True] = True
    oidc: Oidc


def _verifier(request: Request) -> Verifier:
    verifier: Verifier = request.app.state.verifier
    return verifier


def _answer(content: Any, verifier: Verifier, stale: oidc.Provider | None) -> Response:
    """The answer to a change; this process forgets the org's previous settings (and the
    key set of `stale`) now, and again once the change is committed (the response goes
    out after the commit), so a request in between cannot keep them."""

    async def forget_again() -> None:
        verifier.forget(stale)

    verifier.forget(stale)
    response = json_response(content)
    response.background = BackgroundTask(forget_again)
    return response


@router.get(
    "/oidc",
    response_model=OidcResponse,
    responses=ERRORS_AUTHED,
    summary="Read the OpenID Connect sign-in settings",
)
async def get_oidc(tenant: CurrentTenant) -> Any:
    permissions.require(tenant.principal, "oidc.read")
    provider = await oidc.get(tenant.tx)
    return json_response({"ok": True, "oidc": provider.to_api()})


@router.put(
    "/oidc",
    response_model=OidcResponse,
    responses=ERRORS_AUTHED,
    summary="Set the OpenID Connect sign-in settings",
)
async def put_oidc(body: OidcBody, tenant: CurrentTenant, request: Request) -> Any:
    """The JWKS URI must pass the outbound URL guard and answer a key set now. Roles in
    `groupRoles` are `Admin`, `Member` or `<blueprint>-moderator` of an existing blueprint.
    Other organizations may use the same issuer and audience (the answer never depends on
    theirs); requests then name their organization with `X-Portolan-Org`. Users signed in
    under the previous settings are provisioned again on their next request."""
    permissions.require(tenant.principal, "oidc.update")
    settings: Settings = request.app.state.settings
    verifier = _verifier(request)
    before, after = await oidc.put(
        tenant.tx,
        oidc.Draft(
            issuer=body.issuer,
            audience=body.audience,
            jwks_uri=body.jwksUri,
            email_claim=body.emailClaim,
            name_claim=body.nameClaim,
            groups_claim=body.groupsClaim,
            group_teams=body.groupTeams,
            group_roles=body.groupRoles,
        ),
        allowed=outbound.Allowed.parse(settings.outbound_allow),
        own_issuer=settings.token_issuer,
        fetch_keys=verifier.fetch_keys,
    )
    moved = before is not None and before.jwks_uri != after.jwks_uri
    return _answer({"ok": True, "oidc": after.to_api()}, verifier, before if moved else None)


@router.delete(
    "/oidc",
    response_model=OkResponse,
    responses=ERRORS_AUTHED,
    summary="Remove the OpenID Connect sign-in settings",
)
async def delete_oidc(tenant: CurrentTenant, request: Request) -> Any:
    """The provider's tokens stop working; the users it provisioned stay."""
    permissions.require(tenant.principal, "oidc.update")
    removed = await oidc.delete(tenant.tx)
    return _answer({"ok": True}, _verifier(request), removed)
