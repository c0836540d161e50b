"""Credentials: machine credentials and users' personal credentials; exchange a client id +
secret for a token."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from dataclasses import dataclass

from app.auth.tokens import TokenService
from app.db.database import Tx
from app.kit.errors import NotFound, Unauthorized
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
    tx: Tx, *, org_id: uuid.UUID, name: str, roles: list[str]
) -> NewCredential:
    client_id = new_client_id(org_id)
    secret = new_secret()
    await tx.execute(
        "INSERT INTO credentials (org_id, client_id, name, secret_hash, roles) "
        "VALUES ($1, $2, $3, $4, $5)",
        org_id,
        client_id,
        name,
        _hash_secret(secret),
        roles,
    )
    return NewCredential(client_id=client_id, client_secret=secret)


def org_for_client_id(client_id: str) -> uuid.UUID:
    org_id = org_of_client_id(client_id)
    if org_id is None:
        raise Unauthorized("Invalid client credentials", code="invalid_credentials")
    return org_id


async def exchange_credentials(
    tx: Tx,
    tokens: TokenService,
    *,
    org_id: uuid.UUID,
    client_id: str,
    client_secret: str,
) -> str:
    """`tx` must already be bound to `org_id` (see org_for_client_id). A machine
    credential's token speaks for the credential; a user's personal credential's for the
    user (their roles and teams are read on each request)."""
    row = await tx.fetchrow(_CREDENTIAL, org_id, client_id)
    presented = _hash_secret(client_secret)
    expected = bytes(row["secret_hash"]) if row is not None else b"\0" * len(presented)
    if not hmac.compare_digest(presented, expected) or row is None or not row["enabled"]:
        raise Unauthorized("Invalid client credentials", code="invalid_credentials")
    if row["email"] is not None:
        return tokens.issue(org_id=org_id, subject=row["email"], kind="user", roles=[])
    return tokens.issue(org_id=org_id, subject=client_id, kind="app", roles=list(row["roles"]))


# The client id's credential: a machine credential, else a user's personal one (a disabled
# user's is not enabled).
_CREDENTIAL = (
    "SELECT secret_hash, roles, enabled, NULL::varchar AS email FROM credentials "
    "WHERE org_id = $1 AND client_id = $2 "
    "UNION ALL "
    "SELECT personal_secret_hash, '{}'::varchar[], status <> 'Disabled', email FROM users "
    "WHERE org_id = $1 AND personal_client_id = $2 "
    "LIMIT 1"
)


async def rotate_personal(tx: Tx, email: str) -> NewCredential:
    """New personal credentials for the user: a new client id and secret. The old ones stop
    working at once, and so does every token of the user issued before now (from the old
    credentials or from the identity provider)."""
    assert tx.org_id is not None
    client_id = new_client_id(tx.org_id)
    secret = new_secret()
    changed = await tx.fetchval(
        "UPDATE users SET personal_client_id = $3, personal_secret_hash = $4, "
        "tokens_valid_after = date_trunc('second', now()), updated_at = now() "
        "WHERE org_id = $1 AND email = $2 RETURNING id",
        tx.org_id,
        email.lower(),
        client_id,
        _hash_secret(secret),
    )
    if changed is None:
        raise NotFound(f"User {email!r} was not found", code="user_not_found")
    return NewCredential(client_id=client_id, client_secret=secret)
