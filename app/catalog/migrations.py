"""Deleting all of a blueprint's entities, recorded as a migration reported through
/v1/migrations/{id} (Port's shape; data migrations are app/catalog/data_migrations.py)."""

from __future__ import annotations

import secrets

from app.catalog import blueprints as bp_service
from app.catalog import entities
from app.db.database import Tx


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
    COMPLETED migration."""
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
        "success_count) VALUES ($1, $2, $3, 'COMPLETED', $4, $5, $6)",
        tx.org_id,
        migration_id,
        blueprint,
        writer.actor,
        {"operation": "delete-all-entities", "deleteBlueprint": delete_blueprint},
        len(deleted),
    )
    return migration_id
