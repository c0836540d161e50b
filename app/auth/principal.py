"""Who is calling: the Principal, and the dependencies that produce it and its transaction."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPBearer

from app.auth.tokens import Kind, is_kind
from app.auth.verifier import ORG_HEADER, Verifier, org_hint
from app.db.database import Tx
from app.db.routing import open_request_tx
from app.kit import sandbox
from app.kit.errors import Unauthorized
from app.kit.ratelimit import enforce


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller. `kind` is "app" (a machine credential: roles from the credential) or
    "user" (a person: roles and teams read from the users table on every request, so a
    change applies at once). `email` is set for users."""

    org_id: uuid.UUID
    subject: str
    kind: Kind
    roles: tuple[str, ...]
    teams: tuple[str, ...] = ()
    email: str | None = None

    @property
    def is_admin(self) -> bool:
        return "Admin" in self.roles

    @property
    def origin(self) -> str | None:
        """The audit log's origin when the caller settles it: people sign in through the
        SPA (`UI`); machine credentials leave it to the request (API or INTEGRATION)."""
        return "UI" if self.kind == "user" else None


@dataclass(frozen=True, slots=True)
class Tenant:
    """The caller and the request's transaction, bound to the caller's org."""

    principal: Principal
    tx: Tx

    @property
    def org_id(self) -> uuid.UUID:
        return self.principal.org_id


async def _principal_from(request: Request) -> tuple[Principal, int]:
    """The caller, and when its token was issued."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("A bearer access token is required", code="unauthorized")
    verifier: Verifier = request.app.state.verifier
    identity = await verifier.verify(token, org_hint(request.headers.get(ORG_HEADER)))
    if not is_kind(identity.kind):  # the verifier refuses these; never a caller regardless
        raise Unauthorized("The access token is invalid", code="invalid_token")
    principal = Principal(
        org_id=identity.org_id,
        subject=identity.subject,
        kind=identity.kind,
        roles=identity.roles,
        email=identity.email,
    )
    return principal, identity.issued_at


# A user's roles (given + from the identity provider) and teams, in one statement.
_USER_ACCESS = (
    "SELECT u.status, u.tokens_valid_after, u.roles || u.idp_roles AS roles, ARRAY("
    " SELECT DISTINCT t.name FROM team_members m JOIN teams t"
    " ON t.org_id = m.org_id AND t.id = m.team_id"
    " WHERE m.org_id = u.org_id AND m.user_id = u.id ORDER BY t.name) AS teams "
    "FROM users u WHERE u.org_id = $1 AND u.email = $2"
)


async def _with_user_access(
    principal: Principal, tx: Tx, issued_at: int | None = None
) -> Principal:
    """The user's roles and teams now; refused when they are gone or disabled, or (given
    the token's `issued_at`) when their credentials were rotated after it was issued."""
    row = await tx.fetchrow(_USER_ACCESS, principal.org_id, principal.email)
    if row is None or row["status"] == "Disabled":
        raise Unauthorized("The user is not a member of the organization", code="unknown_user")
    valid_after = row["tokens_valid_after"]
    if issued_at is not None and valid_after is not None and issued_at < valid_after.timestamp():
        raise Unauthorized(
            "The user's credentials were rotated after this token was issued",
            code="invalid_token",
        )
    return replace(
        principal,
        roles=tuple(dict.fromkeys(row["roles"])),
        teams=tuple(row["teams"]),
    )


class _Bearer(HTTPBearer):
    """Base of the auth dependencies: declares the bearer scheme in the OpenAPI document.

    Each subclass does its whole job in one dependency (no nested dependencies), because
    FastAPI's per-dependency bookkeeping is a measurable share of a simple request."""

    def __init__(self) -> None:
        super().__init__(
            auto_error=False,
            scheme_name="bearer",
            description="Access token from POST /v1/auth/access_token",
        )


class TenantAuth(_Bearer):
    """Authenticates and opens the request's transaction as the app role with the caller's
    org bound. TransactionRoute commits it after the endpoint returns and before the
    response is sent; errors roll it back."""

    async def __call__(self, request: Request) -> Tenant:  # type: ignore[override]
        principal, issued_at = await _principal_from(request)
        await enforce(request.scope, request.app.state.limiter, principal.org_id, request.method)
        return await _open_tenant(request, principal, issued_at)


async def _open_tenant(request: Request, principal: Principal, issued_at: int) -> Tenant:
    """Open the request's transaction for an authenticated caller.

    A machine credential's token is good while the credential exists and its secret has not
    been rotated since: checked by the transaction's opening statement. A user's is good
    while the user is an active member: checked right after. Every kind has its check;
    there is no kind without one."""
    if principal.kind == "app":
        credential: tuple[str, int] | None = (principal.subject, issued_at)
    elif principal.kind == "user":
        credential = None
    else:
        raise Unauthorized("The access token is invalid", code="invalid_token")
    tx = await open_request_tx(
        request,
        request.app.state.db,
        principal.org_id,
        actor=principal.subject,
        credential=credential,
        origin=principal.origin,
    )
    if principal.kind == "user":
        principal = await _with_user_access(principal, tx, issued_at)
    sandbox.compiling_for(principal.org_id)  # definitions checked here count against its org
    return Tenant(principal=principal, tx=tx)


CurrentTenant = Annotated[Tenant, Depends(TenantAuth())]


@dataclass(frozen=True, slots=True)
class Deferred:
    """A caller whose request transaction is opened later, by `open()`: for endpoints that
    must await work outside the database first (a tenant's jq) without holding a
    connection meanwhile."""

    principal: Principal
    request: Request
    issued_at: int

    async def open(self) -> Tenant:
        return await _open_tenant(self.request, self.principal, self.issued_at)


class DeferredTenantAuth(_Bearer):
    """Authenticates and takes the rate limit's token like TenantAuth, but leaves opening
    the transaction to the endpoint (`Deferred.open`)."""

    async def __call__(self, request: Request) -> Deferred:  # type: ignore[override]
        principal, issued_at = await _principal_from(request)
        await enforce(request.scope, request.app.state.limiter, principal.org_id, request.method)
        return Deferred(principal=principal, request=request, issued_at=issued_at)


DeferredTenant = Annotated[Deferred, Depends(DeferredTenantAuth())]


async def principal_of(tx: Tx, subject: str) -> Principal | None:
    """The org's member behind a subject as it stands now, for work done later in its name
    (an action run's entity writes): a machine credential by client id, or a user by
    email, with today's roles and teams; None when it is gone or disabled."""
    assert tx.org_id is not None
    roles = await tx.fetchval(
        "SELECT roles FROM credentials WHERE org_id = $1 AND client_id = $2 AND enabled",
        tx.org_id,
        subject,
    )
    if roles is not None:
        return Principal(org_id=tx.org_id, subject=subject, kind="app", roles=tuple(roles))
    person = Principal(org_id=tx.org_id, subject=subject, kind="user", roles=(), email=subject)
    try:
        return await _with_user_access(person, tx)
    except Unauthorized:
        return None
