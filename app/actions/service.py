"""Action definitions: create, replace, delete, read and list (Port's routes and shapes)."""

from __future__ import annotations

from typing import Any

import asyncpg

from app.actions.definitions import normalise
from app.catalog.validation import check_url_identifier
from app.db.database import Tx
from app.kit.errors import Conflict, NotFound
from app.search.service import fresh_scope

_SELECT = """
SELECT identifier, title, icon, description, trigger, invocation_method, required_approval,
       approval_notification, publish, allow_anyone_to_view_runs, created_at, created_by,
       updated_at, updated_by
FROM actions
"""


def to_api(row: asyncpg.Record) -> dict[str, Any]:
    out: dict[str, Any] = {
        "identifier": row["identifier"],
        "trigger": row["trigger"],
        "invocationMethod": row["invocation_method"],
        "requiredApproval": row["required_approval"],
        "publish": row["publish"],
        "createdAt": row["created_at"],
        "createdBy": row["created_by"],
        "updatedAt": row["updated_at"],
        "updatedBy": row["updated_by"],
    }
    for key, column in (
        ("title", "title"),
        ("icon", "icon"),
        ("description", "description"),
        ("approvalNotification", "approval_notification"),
        ("allowAnyoneToViewRuns", "allow_anyone_to_view_runs"),
    ):
        if row[column] is not None:
            out[key] = row[column]
    return out


def _values(action: dict[str, Any]) -> list[Any]:
    return [
        action.get("title"),
        action.get("icon"),
        action.get("description"),
        action["trigger"],
        action["invocationMethod"],
        action["requiredApproval"],
        action.get("approvalNotification"),
        action["publish"],
        action.get("allowAnyoneToViewRuns"),
    ]


async def _normalised(tx: Tx, body: Any) -> dict[str, Any]:
    return normalise(body, await fresh_scope(tx, None, None))


async def create(tx: Tx, actor: str, body: Any) -> dict[str, Any]:
    action = await _normalised(tx, body)
    row = await tx.fetchrow(
        "INSERT INTO actions (org_id, identifier, title, icon, description, trigger, "
        "invocation_method, required_approval, approval_notification, publish, "
        "allow_anyone_to_view_runs, created_by, updated_by) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12) "
        "ON CONFLICT DO NOTHING RETURNING identifier",
        tx.org_id,
        action["identifier"],
        *_values(action),
        actor,
    )
    if row is None:
        raise Conflict(f"An action {action['identifier']!r} already exists", code="action_exists")
    return await get(tx, action["identifier"])


async def replace(tx: Tx, actor: str, identifier: str, body: Any) -> dict[str, Any]:
    check_url_identifier(body, identifier)
    action = await _normalised(
        tx, {**body, "identifier": identifier} if isinstance(body, dict) else body
    )
    status = await tx.execute(
        "UPDATE actions SET title = $3, icon = $4, description = $5, trigger = $6, "
        "invocation_method = $7, required_approval = $8, approval_notification = $9, "
        "publish = $10, allow_anyone_to_view_runs = $11, updated_at = now(), updated_by = $12 "
        "WHERE org_id = $1 AND identifier = $2",
        tx.org_id,
        identifier,
        *_values(action),
        actor,
    )
    if not status.endswith(" 1"):
        raise NotFound(f"Action {identifier!r} was not found")
    return await get(tx, identifier)


async def get(tx: Tx, identifier: str) -> dict[str, Any]:
    row = await tx.fetchrow(
        _SELECT + " WHERE org_id = $1 AND identifier = $2", tx.org_id, identifier
    )
    if row is None:
        raise NotFound(f"Action {identifier!r} was not found")
    return to_api(row)


async def delete(tx: Tx, identifier: str) -> None:
    status = await tx.execute(
        "DELETE FROM actions WHERE org_id = $1 AND identifier = $2", tx.org_id, identifier
    )
    if not status.endswith(" 1"):
        raise NotFound(f"Action {identifier!r} was not found")


async def list_all(
    tx: Tx,
    *,
    identifiers: list[str] | None = None,
    blueprints: list[str] | None = None,
    operations: list[str] | None = None,
    published: bool | None = None,
    trigger_type: str | None = None,
    events: list[str] | None = None,
    event_actions: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Port's filters: action identifiers, blueprints (of the trigger or its event),
    self-service operations, published, trigger type, and for automations the event that
    triggers them and the action whose runs do (self-service actions have neither)."""
    rows = await tx.fetch(
        _SELECT + " WHERE org_id = $1"
        " AND ($2::text[] IS NULL OR identifier = ANY($2::text[]))"
        " AND ($3::text[] IS NULL OR coalesce(trigger->>'blueprintIdentifier',"
        " trigger->'event'->>'blueprintIdentifier') = ANY($3::text[]))"
        " AND ($4::text[] IS NULL OR trigger->>'operation' = ANY($4::text[]))"
        " AND ($5::boolean IS NULL OR publish = $5)"
        " AND ($6::text IS NULL OR trigger->>'type' = $6)"
        " AND ($7::text[] IS NULL OR trigger->'event'->>'type' = ANY($7::text[]))"
        " AND ($8::text[] IS NULL OR trigger->'event'->>'actionIdentifier' = ANY($8::text[]))"
        " ORDER BY identifier",
        tx.org_id,
        identifiers,
        blueprints,
        operations,
        published,
        trigger_type,
        events,
        event_actions,
    )
    return [to_api(r) for r in rows]
