"""Who is calling: the Principal, and the dependencies that produce it and its session."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.tokens import TokenService
from app.kit.errors import Unauthorized

_bearer = HTTPBearer(auto_error=False, description="Access token from POST /v1/auth/access_token")


@dataclass(frozen=True, slots=True)
class Principal:
    org_id: uuid.UUID
    subject: str
    kind: str
    roles: tuple[str, ...]

    @property
    def is_admin(self) -> bool:
        return "Admin" in self.roles


async def authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise Unauthorized("A bearer access token is required", code="unauthorized")
    tokens: TokenService = request.app.state.tokens
    claims = tokens.verify(credentials.credentials)
    return Principal(
        org_id=claims.org_id, subject=claims.subject, kind=claims.kind, roles=claims.roles
    )


CurrentPrincipal = Annotated[Principal, Depends(authenticate)]


async def tenant_session(
    request: Request, principal: CurrentPrincipal
) -> AsyncIterator[AsyncSession]:
    """The request's one transaction, bound to the caller's org; committed before the
    response is sent (function scope), rolled back on any error."""
    session = await request.app.state.db.open_tenant_session(principal.org_id)
    try:
        yield session
        await session.commit()
    except BaseException:
        await session.rollback()
        raise
    finally:
        await session.close()


TenantSession = Annotated[AsyncSession, Depends(tenant_session, scope="function")]
