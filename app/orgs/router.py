"""Organization routes: the tenant's own organization, and the operator's platform API."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.auth import permissions
from app.auth.principal import CurrentTenant
from app.config import Settings
from app.db.routing import api_router
from app.kit.crypto import cipher_for
from app.kit.errors import Forbidden, Unauthorized
from app.kit.openapi import ERRORS_AUTHED
from app.orgs import service
from app.orgs.schemas import (
    OrganizationOut,
    OrganizationPatch,
    OrganizationPut,
    OrganizationResponse,
    OrgCreatedResponse,
    OrgCreateRequest,
)

router = api_router(tags=["Organization"])
# The flags Port's Ocean reads, and whether Portolan has what each one switches on:
# USE_PROVISIONED_DEFAULTS (the server provisions an integration's resources), LAKEHOUSE_ELIGIBLE
# and DATA_SOURCE_PROCESSOR_ENABLED (raw data to a lakehouse ingest URL, processed there),
# OCEAN_KAFKA_INTEGRATION_RESYNC_REQUESTS_TOPIC_ENABLED (resync requests over Kafka) and
# LIVE_EVENTS_REDIS_STREAM_ENABLED (live events from the server's Redis stream) all need
# services Portolan does not run; LIVE_EVENTS_PAYLOAD_LOGGING_ENABLED is an organization's
# consent to have whole live-event payloads logged, which Portolan has no setting for. So no
# flag is claimed, and Ocean keeps to what Portolan serves: it creates resources itself,
# processes its data itself (ocean-core) and polls for resync requests.
FEATURE_FLAGS: tuple[str, ...] = ()
_platform_bearer = HTTPBearer(
    auto_error=False, scheme_name="platformToken", description="PORTOLAN_PLATFORM_TOKEN"
)


@router.get(
    "/v1/organization",
    response_model=OrganizationResponse,
    responses=ERRORS_AUTHED,
    summary="Get organization details",
)
async def get_organization(tenant: CurrentTenant) -> OrganizationResponse:
    permissions.require(tenant.principal, "organization.read")
    return _answer(await service.get_org(tenant.tx, tenant.org_id))


def _answer(org: service.Org) -> OrganizationResponse:
    return OrganizationResponse(
        organization=OrganizationOut(
            id=org.id,
            name=org.name,
            featureFlags=list(FEATURE_FLAGS),
            settings=org.settings,
            announcement=org.announcement,
            createdAt=org.created_at,
            updatedAt=org.updated_at,
        )
    )


@router.put(
    "/v1/organization",
    response_model=OrganizationResponse,
    responses=ERRORS_AUTHED,
    summary="Change organization details (Admins)",
)
async def replace_organization(
    body: OrganizationPut, tenant: CurrentTenant
) -> OrganizationResponse:
    """The name, the settings and the announcement as given (absent ones are cleared).
    Answers the organization (Port answers `{"ok": true}` alone). Audited."""
    permissions.require(tenant.principal, "organization.update")
    change = body.model_dump(exclude_unset=True, mode="json")
    return _answer(await service.change_org(tenant.tx, tenant.org_id, change, replace=True))


@router.patch(
    "/v1/organization",
    response_model=OrganizationResponse,
    responses=ERRORS_AUTHED,
    summary="Update organization details (Admins)",
)
async def update_organization(
    body: OrganizationPatch, tenant: CurrentTenant
) -> OrganizationResponse:
    """What is given: the name, each setting (`null` removes it), the announcement (merged
    into the current one; `null` removes it). Audited."""
    permissions.require(tenant.principal, "organization.update")
    change = body.model_dump(exclude_unset=True, mode="json")
    return _answer(await service.change_org(tenant.tx, tenant.org_id, change, replace=False))


async def require_platform_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_platform_bearer)],
) -> None:
    settings: Settings = request.app.state.settings
    if settings.platform_token is None:
        raise Forbidden("The platform API is disabled (PORTOLAN_PLATFORM_TOKEN is not set)")
    if credentials is None:
        raise Unauthorized("The platform token is required")
    expected = settings.platform_token.get_secret_value().encode()
    if not hmac.compare_digest(credentials.credentials.encode(), expected):
        raise Unauthorized("The platform token is invalid")


@router.post(
    "/v1/platform/orgs",
    status_code=201,
    response_model=OrgCreatedResponse,
    responses=ERRORS_AUTHED,
    dependencies=[Depends(require_platform_token)],
    tags=["Platform"],
    summary="Create an organization with its first credentials (operator)",
)
async def create_organization(body: OrgCreateRequest, request: Request) -> OrgCreatedResponse:
    async with request.app.state.db.system() as tx:
        created = await service.create_org(
            tx, name=body.name, cipher=cipher_for(request.app.state.settings)
        )
    return OrgCreatedResponse(
        orgId=created.org_id,
        name=created.name,
        clientId=created.client_id,
        clientSecret=created.client_secret,
        signingSecret=created.signing_secret,
    )
