"""Catalog migrations: operations reported through /v1/migrations/{id} (Port's shape)."""

from __future__ import annotations

import secrets
from typing import Any

from app.catalog import blueprints as bp_service
from app.catalog import entities
from app.db.database import Tx
from app.kit.errors import NotFound


async def delete_all_entities(
    tx: Tx,
    blueprint: str,
    *,
    delete_blueprint: bool,
    writer: entities.Writer,
    run_id: str | None = None,
) -> str:
    """Deletes every entity of `blueprint` (with their events, tied to `run_id` when given)
    and, if asked, the blueprint, in the request's transaction; records the operation as a
    COMPLETE migration."""
    await bp_service.get_row(tx, blueprint, lock=True)
    identifiers = [
        r["identifier"]
        for r in await tx.fetch(
            "SELECT identifier FROM entities WHERE org_id = $1 AND blueprint = $2 "
            "ORDER BY identifier",
            tx.org_id,
            blueprint,
        )
    ]
    deleted = await entities.delete_many(
        tx, blueprint, identifiers, delete_dependents=False, writer=writer, run_id=run_id
    )
    if delete_blueprint:
        await bp_service.delete(tx, blueprint)
    migration_id = "migration_" + secrets.token_hex(8)
    await tx.execute(
        "INSERT INTO catalog_migrations (org_id, id, source_blueprint, status, actor, mapping, "
        "success_count) VALUES ($1, $2, $3, 'COMPLETE', $4, $5, $6)",
        tx.org_id,
        migration_id,
        blueprint,
        writer.actor,
        {"operation": "delete-all-entities", "deleteBlueprint": delete_blueprint},
        len(deleted),
    )
    return migration_id


async def get(tx: Tx, migration_id: str) -> dict[str, Any]:
    row = await tx.fetchrow(
        "SELECT id, actor, source_blueprint, mapping, status, success_count, failure_count, "
        "created_at, updated_at FROM catalog_migrations WHERE org_id = $1 AND id = $2",
        tx.org_id,
        migration_id,
    )
    if row is None:
        raise NotFound(f"Migration {migration_id!r} was not found")
    return {
        "id": row["id"],
        "actor": row["actor"],
        "sourceBlueprint": row["source_blueprint"],
        "mapping": row["mapping"],
        "status": row["status"],
        "successCount": row["success_count"],
        "failureCount": row["failure_count"],
        "createdAt": row["created_at"],
        "updatedAt": row["updated_at"],
    }
