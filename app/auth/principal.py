"""Who is calling: the Principal, and the dependencies that produce it and its transaction."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPBearer

from app.auth.tokens import TokenService
from app.db.database import Tx
from app.db.routing import open_request_tx
from app.kit.errors import Unauthorized


@dataclass(frozen=True, slots=True)
class Principal:
    org_id: uuid.UUID
    subject: str
    kind: str
    roles: tuple[str, ...]

    @property
    def is_admin(self) -> bool:
        return "Admin" in self.roles


class BearerAuth(HTTPBearer):
    """Reads and verifies the bearer token in one dependency (it is on every tenant route),
    and declares the bearer scheme in the OpenAPI document."""

    def __init__(self) -> None:
        super().__init__(
            auto_error=False, description="Access token from POST /v1/auth/access_token"
        )

    async def __call__(self, request: Request) -> Principal:  # type: ignore[override]
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("A bearer access token is required", code="unauthorized")
        tokens: TokenService = request.app.state.tokens
        claims = tokens.verify(token)
        return Principal(
            org_id=claims.org_id, subject=claims.subject, kind=claims.kind, roles=claims.roles
        )


authenticate = BearerAuth()
CurrentPrincipal = Annotated[Principal, Depends(authenticate)]


async def tenant_tx(request: Request, principal: CurrentPrincipal) -> Tx:
    """The request's one transaction, bound to the caller's org. TransactionRoute commits
    it after the endpoint returns and before the response is sent; errors roll it back."""
    return await open_request_tx(request, request.app.state.db, principal.org_id)


TenantTx = Annotated[Tx, Depends(tenant_tx)]
