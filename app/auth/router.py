"""POST /v1/auth/access_token: client credentials -> bearer token, as Port answers it."""

from __future__ import annotations

from fastapi import Request

from app.auth import service
from app.auth.schemas import AccessTokenRequest, AccessTokenResponse
from app.db.routing import api_router
from app.kit.openapi import ERRORS_PUBLIC

router = api_router(prefix="/v1/auth", tags=["Authentication"])


@router.post(
    "/access_token",
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
