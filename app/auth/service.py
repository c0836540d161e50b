"""Machine credentials: create them, and exchange a client id + secret for a token."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.models import Credential
from app.auth.tokens import TokenService
from app.kit.errors import Unauthorized
from app.kit.ids import new_client_id, new_secret, org_of_client_id

ADMIN_ROLE = "Admin"


@dataclass(frozen=True, slots=True)
class NewCredential:
    client_id: str
    client_secret: str


def _hash_secret(secret: str) -> bytes:
    # Secrets are 256 random bits, so a fast digest is enough (as for GitHub tokens);
    # a slow KDF would only slow down every token exchange.
    return hashlib.sha256(secret.encode()).digest()


async def create_credential(
    session: AsyncSession, *, org_id: uuid.UUID, name: str, roles: list[str]
) -> NewCredential:
    client_id = new_client_id(org_id)
    secret = new_secret()
    session.add(
        Credential(
            org_id=org_id,
            client_id=client_id,
            name=name,
            secret_hash=_hash_secret(secret),
            roles=roles,
        )
    )
    await session.flush()
    return NewCredential(client_id=client_id, client_secret=secret)


def org_for_client_id(client_id: str) -> uuid.UUID:
    org_id = org_of_client_id(client_id)
    if org_id is None:
        raise Unauthorized("Invalid client credentials", code="invalid_credentials")
    return org_id


async def exchange_credentials(
    session: AsyncSession,
    tokens: TokenService,
    *,
    org_id: uuid.UUID,
    client_id: str,
    client_secret: str,
) -> str:
    """`session` must already be bound to `org_id` (see org_for_client_id)."""
    row = (
        await session.execute(
            select(Credential.secret_hash, Credential.roles).where(
                Credential.org_id == org_id, Credential.client_id == client_id
            )
        )
    ).one_or_none()
    presented = _hash_secret(client_secret)
    expected = row.secret_hash if row is not None else b"\0" * len(presented)
    if not hmac.compare_digest(presented, expected) or row is None:
        raise Unauthorized("Invalid client credentials", code="invalid_credentials")
    return tokens.issue(org_id=org_id, subject=client_id, kind="app", roles=list(row.roles))
