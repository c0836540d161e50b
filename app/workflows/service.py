"""Workflow definitions: create, replace (a new version each time), delete, read and list."""

from __future__ import annotations

import secrets
from typing import Any

import asyncpg

from app.catalog.validation import check_url_identifier
from app.db.database import Tx
from app.kit.errors import Conflict, NotFound
from app.search.service import fresh_scope
from app.workflows.definitions import normalise

_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
_SELECT = """
SELECT w.identifier, w.title, w.icon, w.description, w.category, w.allow_anyone_to_view_runs,
       w.nodes, w.connections, w.version_id, v.number AS version_number, w.created_at,
       w.created_by, w.updated_at, w.updated_by
FROM workflows w
JOIN workflow_versions v ON v.org_id = w.org_id AND v.id = w.version_id
"""


def new_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(16))


def to_api(row: asyncpg.Record) -> dict[str, Any]:
    out: dict[str, Any] = {
        "identifier": row["identifier"],
        "allowAnyoneToViewRuns": row["allow_anyone_to_view_runs"],
        "nodes": row["nodes"],
        "connections": row["connections"],
        "versionIdentifier": row["version_id"],
        "version": row["version_number"],
        "createdAt": row["created_at"],
        "createdBy": row["created_by"],
        "updatedAt": row["updated_at"],
        "updatedBy": row["updated_by"],
    }
    for key in ("title", "icon", "description", "category"):
        if row[key] is not None:
            out[key] = row[key]
    return out


async def _normalised(tx: Tx, body: Any) -> dict[str, Any]:
    return normalise(body, await fresh_scope(tx, None, None))


async def _new_version(tx: Tx, actor: str, workflow: dict[str, Any]) -> str:
    version_id = new_id("wfv_")
    await tx.execute(
        "INSERT INTO workflow_versions (org_id, id, workflow, number, definition, created_by) "
        "SELECT $1, $2, $3::varchar, coalesce(max(number), 0) + 1, $4, $5 FROM workflow_versions "
        "WHERE org_id = $1 AND workflow = $3",
        tx.org_id,
        version_id,
        workflow["identifier"],
        workflow,
        actor,
    )
    return version_id


def _values(workflow: dict[str, Any]) -> list[Any]:
    return [
        workflow.get("title"),
        workflow.get("icon"),
        workflow.get("description"),
        workflow.get("category"),
        workflow["allowAnyoneToViewRuns"],
        workflow.get("nodes") or [],
        workflow.get("connections") or [],
    ]


async def create(tx: Tx, actor: str, body: Any) -> dict[str, Any]:
    workflow = await _normalised(tx, body)
    workflow.setdefault("connections", [])
    exists = await tx.fetchval(
        "SELECT 1 FROM workflows WHERE org_id = $1 AND identifier = $2",
        tx.org_id,
        workflow["identifier"],
    )
    if exists:
        raise Conflict(
            f"A workflow {workflow['identifier']!r} already exists", code="workflow_exists"
        )
    version_id = await _new_version(tx, actor, workflow)
    row = await tx.fetchrow(
        "INSERT INTO workflows (org_id, identifier, title, icon, description, category, "
        "allow_anyone_to_view_runs, nodes, connections, version_id, created_by, updated_by) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11) "
        "ON CONFLICT DO NOTHING RETURNING identifier",
        tx.org_id,
        workflow["identifier"],
        *_values(workflow),
        version_id,
        actor,
    )
    if row is None:
        raise Conflict(
            f"A workflow {workflow['identifier']!r} already exists", code="workflow_exists"
        )
    return await get(tx, workflow["identifier"])


async def replace(tx: Tx, actor: str, identifier: str, body: Any) -> dict[str, Any]:
    """A new version of the workflow; runs already started keep theirs."""
    check_url_identifier(body, identifier)
    workflow = await _normalised(
        tx, {**body, "identifier": identifier} if isinstance(body, dict) else body
    )
    workflow.setdefault("connections", [])
    current = await tx.fetchval(
        "SELECT 1 FROM workflows WHERE org_id = $1 AND identifier = $2 FOR UPDATE",
        tx.org_id,
        identifier,
    )
    if current is None:
        raise NotFound(f"Workflow {identifier!r} was not found")
    version_id = await _new_version(tx, actor, workflow)
    await tx.execute(
        "UPDATE workflows SET title = $3, icon = $4, description = $5, category = $6, "
        "allow_anyone_to_view_runs = $7, nodes = $8, connections = $9, version_id = $10, "
        "updated_at = now(), updated_by = $11 WHERE org_id = $1 AND identifier = $2",
        tx.org_id,
        identifier,
        *_values(workflow),
        version_id,
        actor,
    )
    return await get(tx, identifier)


async def get(tx: Tx, identifier: str) -> dict[str, Any]:
    row = await tx.fetchrow(
        _SELECT + " WHERE w.org_id = $1 AND w.identifier = $2", tx.org_id, identifier
    )
    if row is None:
        raise NotFound(f"Workflow {identifier!r} was not found")
    return to_api(row)


async def delete(tx: Tx, identifier: str) -> None:
    """The workflow goes; its versions stay for the runs that started on them."""
    status = await tx.execute(
        "DELETE FROM workflows WHERE org_id = $1 AND identifier = $2", tx.org_id, identifier
    )
    if not status.endswith(" 1"):
        raise NotFound(f"Workflow {identifier!r} was not found")


async def list_all(tx: Tx) -> list[dict[str, Any]]:
    rows = await tx.fetch(_SELECT + " WHERE w.org_id = $1 ORDER BY w.identifier", tx.org_id)
    return [to_api(r) for r in rows]
