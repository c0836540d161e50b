"""Organization secrets and the webhook signing secret.

Secret values are encrypted at rest (app.kit.crypto) and never leave the API after they are
written: responses carry names, descriptions and times. Invocations read them by name
(`{{ .secrets.NAME }}`, a GitHub or GitLab token) through `reveal`.

The signing secret keys the HMAC of outbound webhooks (`X-Port-Signature`). Each org gets
one when it is created; Admins read it and rotate it.
"""

from __future__ import annotations

import re
import secrets as token_source
from collections.abc import Collection
from typing import Any

import asyncpg

from app.db.database import Tx
from app.kit.crypto import Cipher
from app.kit.errors import Conflict, Invalid, NotFound

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
MAX_VALUE = 64 * 1024
_SELECT = "SELECT name, description, created_at, updated_at FROM org_secrets"


def _shape(row: asyncpg.Record) -> dict[str, Any]:
    out: dict[str, Any] = {
        "secretName": row["name"],
        "createdAt": row["created_at"],
        "updatedAt": row["updated_at"],
    }
    if row["description"] is not None:
        out["description"] = row["description"]
    return out


def _check_value(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_VALUE:
        raise Invalid(
            f"secretValue must be a non-empty string of at most {MAX_VALUE} characters",
            details=[{"pointer": "/secretValue", "message": "invalid value"}],
        )
    return value


async def create(
    tx: Tx, cipher: Cipher, actor: str, name: Any, value: Any, description: str | None
) -> dict[str, Any]:
    if not isinstance(name, str) or not _NAME.match(name):
        raise Invalid(
            "secretName matches ^[A-Za-z0-9_-]+$ (at most 100 characters)",
            details=[{"pointer": "/secretName", "message": "invalid name"}],
        )
    encrypted = cipher.encrypt(_check_value(value))
    row = await tx.fetchrow(
        "INSERT INTO org_secrets (org_id, name, value_encrypted, description, created_by, "
        "updated_by) VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT DO NOTHING "
        "RETURNING name, description, created_at, updated_at",
        tx.org_id,
        name,
        encrypted,
        description,
        actor,
    )
    if row is None:
        raise Conflict(f"A secret named {name!r} already exists", code="secret_exists")
    return _shape(row)


async def list_all(tx: Tx) -> list[dict[str, Any]]:
    rows = await tx.fetch(_SELECT + " WHERE org_id = $1 ORDER BY name", tx.org_id)
    return [_shape(r) for r in rows]


async def get(tx: Tx, name: str) -> dict[str, Any]:
    row = await tx.fetchrow(_SELECT + " WHERE org_id = $1 AND name = $2", tx.org_id, name)
    if row is None:
        raise NotFound(f"Secret {name!r} was not found")
    return _shape(row)


async def update(
    tx: Tx, cipher: Cipher, actor: str, name: str, changes: dict[str, Any]
) -> dict[str, Any]:
    encrypted = (
        cipher.encrypt(_check_value(changes["secretValue"])) if "secretValue" in changes else None
    )
    row = await tx.fetchrow(
        "UPDATE org_secrets SET value_encrypted = coalesce($3, value_encrypted), "
        "description = CASE WHEN $4 THEN $5 ELSE description END, "
        "updated_at = now(), updated_by = $6 WHERE org_id = $1 AND name = $2 "
        "RETURNING name, description, created_at, updated_at",
        tx.org_id,
        name,
        encrypted,
        "description" in changes,
        changes.get("description"),
        actor,
    )
    if row is None:
        raise NotFound(f"Secret {name!r} was not found")
    return _shape(row)


async def delete(tx: Tx, name: str) -> None:
    status = await tx.execute(
        "DELETE FROM org_secrets WHERE org_id = $1 AND name = $2", tx.org_id, name
    )
    if not status.endswith(" 1"):
        raise NotFound(f"Secret {name!r} was not found")


async def reveal(tx: Tx, cipher: Cipher, *, names: Collection[str] | None = None) -> dict[str, str]:
    """The org's secrets (those named, or all) by name, decrypted: for invocations only."""
    rows = await tx.fetch(
        "SELECT name, value_encrypted FROM org_secrets WHERE org_id = $1 "
        "AND ($2::text[] IS NULL OR name = ANY($2::text[]))",
        tx.org_id,
        None if names is None else sorted(names),
    )
    return {r["name"]: cipher.decrypt(r["value_encrypted"]) for r in rows}


def new_signing_secret() -> str:
    return token_source.token_urlsafe(32)


async def signing_secret(tx: Tx, cipher: Cipher) -> str:
    """The org's signing secret (made now for an org created before signing secrets)."""
    stored = await tx.fetchval(
        "SELECT signing_secret_encrypted FROM organizations WHERE id = $1", tx.org_id
    )
    if stored is not None:
        return cipher.decrypt(str(stored))
    return await rotate_signing_secret(tx, cipher, only_if_missing=True)


async def rotate_signing_secret(tx: Tx, cipher: Cipher, *, only_if_missing: bool = False) -> str:
    fresh = new_signing_secret()
    row = await tx.fetchrow(
        "UPDATE organizations SET signing_secret_encrypted = $2, updated_at = now() "
        "WHERE id = $1 AND ($3 = false OR signing_secret_encrypted IS NULL) "
        "RETURNING signing_secret_encrypted",
        tx.org_id,
        cipher.encrypt(fresh),
        only_if_missing,
    )
    if row is None:
        if only_if_missing:  # another request made one first (or there is no such org)
            stored = await tx.fetchval(
                "SELECT signing_secret_encrypted FROM organizations WHERE id = $1", tx.org_id
            )
            if stored is not None:
                return cipher.decrypt(str(stored))
        raise NotFound("Organization was not found")
    return fresh
