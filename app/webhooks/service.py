"""Webhook definitions: create, replace, patch, delete, read, list; and their events.

Every statement filters by the transaction's org (and row-level security fences the
tables besides). The secret is encrypted before it is stored and never read back into a
response.
"""

from __future__ import annotations

import secrets
import uuid
from typing import Any

import asyncpg

from app.db.database import Tx
from app.kit.crypto import Cipher
from app.kit.errors import Conflict, Invalid, NotFound
from app.kit.ids import new_client_id, org_of_client_id
from app.webhooks.definitions import READ_ONLY_KEYS, Definition, normalise, resolve_secret

_SELECT = """
SELECT identifier, title, description, icon, enabled, integration_type, mappings, security,
       secret_encrypted IS NOT NULL AS secret_set, webhook_key, created_at, created_by,
       updated_at, updated_by
FROM webhooks
"""
_KEY_RANDOM_BYTES = 24
_KEY_LENGTH = 22 + 32  # the org (base62) and 24 random bytes (url-safe base64)


def new_webhook_key(org_id: uuid.UUID) -> str:
    """An unguessable key (192 random bits) that starts with the org's id, as client ids
    do (app.kit.ids): the ingest route binds the org from the key alone, and keys of
    different orgs can never be equal."""
    return new_client_id(org_id)[:22] + secrets.token_urlsafe(_KEY_RANDOM_BYTES)


def org_of_webhook_key(webhook_key: str) -> uuid.UUID | None:
    """The org a key was made for (None for anything that is not a key)."""
    if len(webhook_key) != _KEY_LENGTH:
        return None
    return org_of_client_id(webhook_key[:32])


def ingest_url(public_url: str, webhook_key: str) -> str:
    return f"{public_url.rstrip('/')}/v1/webhooks/ingest/{webhook_key}"


def to_api(row: asyncpg.Record, public_url: str) -> dict[str, Any]:
    security = dict(row["security"])
    security["secretSet"] = bool(row["secret_set"])
    out: dict[str, Any] = {
        "identifier": row["identifier"],
        "title": row["title"],
        "enabled": row["enabled"],
        "integrationType": row["integration_type"],
        "mappings": row["mappings"],
        "security": security,
        "webhookKey": row["webhook_key"],
        "url": ingest_url(public_url, row["webhook_key"]),
        "createdAt": row["created_at"],
        "createdBy": row["created_by"],
        "updatedAt": row["updated_at"],
        "updatedBy": row["updated_by"],
    }
    if row["description"] is not None:
        out["description"] = row["description"]
    if row["icon"] is not None:
        out["icon"] = row["icon"]
    return out


async def _check_blueprints(tx: Tx, definition: Definition) -> None:
    if not definition.blueprints:
        return
    rows = await tx.fetch(
        "SELECT identifier FROM blueprints WHERE org_id = $1 AND identifier = ANY($2::varchar[])",
        tx.org_id,
        sorted(definition.blueprints),
    )
    present = {r["identifier"] for r in rows}
    missing = [(bp, at) for bp, at in definition.blueprints.items() if bp not in present]
    if missing:
        raise Invalid(
            "Invalid webhook: "
            + "; ".join(f"{at}: blueprint {bp!r} was not found" for bp, at in missing[:5]),
            details=[
                {"pointer": at, "message": f"blueprint {bp!r} was not found"} for bp, at in missing
            ],
        )


async def _prepared(
    tx: Tx, cipher: Cipher, body: Any, stored_secret: str | None
) -> tuple[Definition, str | None]:
    definition = normalise(body)
    secret = resolve_secret(definition, stored_secret)
    await _check_blueprints(tx, definition)
    return definition, (cipher.encrypt(secret) if secret is not None else None)


def _values(definition: Definition) -> list[Any]:
    return [
        definition.title,
        definition.description,
        definition.icon,
        definition.enabled,
        definition.integration_type,
        definition.mappings,
        definition.security,
    ]


RESERVED_IDENTIFIERS = frozenset({"metadata"})  # a route of /v1/webhooks


async def metadata(tx: Tx) -> list[dict[str, Any]]:
    """Port's member view of the org's webhooks: what they are, not how they are set up
    (no mappings, security or ingest key)."""
    rows = await tx.fetch(
        "SELECT identifier, title, icon, integration_type, updated_at FROM webhooks "
        "WHERE org_id = $1 ORDER BY identifier",
        tx.org_id,
    )
    return [
        {
            "identifier": r["identifier"],
            "title": r["title"],
            "icon": r["icon"],
            "integrationType": r["integration_type"],
            "updatedAt": r["updated_at"],
        }
        for r in rows
    ]


async def create(tx: Tx, cipher: Cipher, actor: str, body: Any, public_url: str) -> dict[str, Any]:
    definition, encrypted = await _prepared(tx, cipher, body, None)
    assert tx.org_id is not None
    if definition.identifier in RESERVED_IDENTIFIERS:
        raise Invalid(
            f"{definition.identifier!r} is a route of /v1/webhooks, not a webhook identifier",
            details=[{"pointer": "/identifier", "message": "is reserved"}],
        )
    row = await tx.fetchrow(
        "INSERT INTO webhooks (org_id, identifier, title, description, icon, enabled, "
        "integration_type, mappings, security, secret_encrypted, webhook_key, created_by, "
        "updated_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12) "
        "ON CONFLICT (org_id, identifier) DO NOTHING RETURNING identifier",
        tx.org_id,
        definition.identifier,
        *_values(definition),
        encrypted,
        new_webhook_key(tx.org_id),
        actor,
    )
    if row is None:
        raise Conflict(f"A webhook {definition.identifier!r} already exists", code="webhook_exists")
    return await get(tx, definition.identifier, public_url)


async def _stored(tx: Tx, identifier: str) -> asyncpg.Record:
    """The stored webhook, locked for the change."""
    row = await tx.fetchrow(
        _SELECT.replace("FROM webhooks", ", secret_encrypted FROM webhooks")
        + " WHERE org_id = $1 AND identifier = $2 FOR UPDATE",
        tx.org_id,
        identifier,
    )
    if row is None:
        raise NotFound(f"Webhook {identifier!r} was not found")
    return row


def _check_identifier(body: Any, identifier: str) -> None:
    if isinstance(body, dict) and body.get("identifier") not in (None, identifier):
        raise Invalid(
            "The identifier in the body does not match the URL",
            details=[{"pointer": "/identifier", "message": "does not match the URL"}],
        )


async def _update(
    tx: Tx, cipher: Cipher, actor: str, identifier: str, body: dict[str, Any], public_url: str
) -> dict[str, Any]:
    row = await _stored(tx, identifier)
    stored = row["secret_encrypted"]
    definition, encrypted = await _prepared(
        tx, cipher, body, cipher.decrypt(stored) if stored is not None else None
    )
    await tx.execute(
        "UPDATE webhooks SET title = $3, description = $4, icon = $5, enabled = $6, "
        "integration_type = $7, mappings = $8, security = $9, secret_encrypted = $10, "
        "updated_at = now(), updated_by = $11 WHERE org_id = $1 AND identifier = $2",
        tx.org_id,
        identifier,
        *_values(definition),
        encrypted,
        actor,
    )
    return await get(tx, identifier, public_url)


async def replace(
    tx: Tx, cipher: Cipher, actor: str, identifier: str, body: Any, public_url: str
) -> dict[str, Any]:
    _check_identifier(body, identifier)
    if not isinstance(body, dict):
        raise Invalid("A webhook must be a JSON object")
    return await _update(
        tx, cipher, actor, identifier, {**body, "identifier": identifier}, public_url
    )


async def patch(
    tx: Tx, cipher: Cipher, actor: str, identifier: str, changes: Any, public_url: str
) -> dict[str, Any]:
    """Port's partial update: the keys given replace the stored ones (`security` as a
    whole, keeping the stored secret unless it is named)."""
    _check_identifier(changes, identifier)
    if not isinstance(changes, dict):
        raise Invalid("A webhook patch must be a JSON object")
    await _stored(tx, identifier)  # locked before it is read, so no change is lost
    current = await get(tx, identifier, public_url)
    merged = {k: v for k, v in current.items() if k not in READ_ONLY_KEYS}
    merged["security"] = {k: v for k, v in current["security"].items() if k != "secretSet"}
    merged.update(changes)
    merged["identifier"] = identifier
    return await _update(tx, cipher, actor, identifier, merged, public_url)


async def get(tx: Tx, identifier: str, public_url: str) -> dict[str, Any]:
    row = await tx.fetchrow(
        _SELECT + " WHERE org_id = $1 AND identifier = $2", tx.org_id, identifier
    )
    if row is None:
        raise NotFound(f"Webhook {identifier!r} was not found")
    return to_api(row, public_url)


async def list_all(tx: Tx, public_url: str) -> list[dict[str, Any]]:
    rows = await tx.fetch(_SELECT + " WHERE org_id = $1 ORDER BY identifier", tx.org_id)
    return [to_api(r, public_url) for r in rows]


async def delete(tx: Tx, identifier: str) -> None:
    """The webhook and its events."""
    status = await tx.execute(
        "DELETE FROM webhooks WHERE org_id = $1 AND identifier = $2", tx.org_id, identifier
    )
    if not status.endswith(" 1"):
        raise NotFound(f"Webhook {identifier!r} was not found")


def event_to_api(row: asyncpg.Record) -> dict[str, Any]:
    outcome = row["outcome"] or {}
    return {
        "id": row["id"],
        "requestId": row["request_id"],
        "receivedAt": row["received_at"],
        "status": row["status"],
        "processedAt": row["processed_at"],
        "attempts": row["attempts"],
        "outcome": {
            "entities": outcome.get("entities", []),
            "errors": outcome.get("errors", []),
        },
    }


async def list_events(tx: Tx, identifier: str, limit: int) -> list[dict[str, Any]]:
    """The webhook's latest events, newest first."""
    exists = await tx.fetchval(
        "SELECT true FROM webhooks WHERE org_id = $1 AND identifier = $2", tx.org_id, identifier
    )
    if not exists:
        raise NotFound(f"Webhook {identifier!r} was not found")
    rows = await tx.fetch(
        "SELECT id, request_id, received_at, status, processed_at, attempts, outcome "
        "FROM webhook_events WHERE org_id = $1 AND webhook = $2 "
        "ORDER BY received_at DESC, id DESC LIMIT $3",
        tx.org_id,
        identifier,
        limit,
    )
    return [event_to_api(r) for r in rows]
