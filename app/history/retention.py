"""History retention (PORTOLAN_HISTORY_RETENTION_DAYS): entity events older than the
horizon are pruned, except each entity's last event before it, so every entity's state at
the horizon stays known (and with it every answer from the horizon on)."""

from __future__ import annotations

import uuid

from app.db.database import Database

# An event older than the horizon goes when a later event of its entity is older too (it
# no longer decides any state from the horizon on), or when it is a deletion (the entity
# did not exist at the horizon: nothing to keep).
_PRUNE = (
    "DELETE FROM entity_events x USING ("
    "  SELECT e.org_id, e.id FROM entity_events e"
    "  WHERE e.at < now() - make_interval(days => $1)"
    "  AND (e.action = 'DELETE' OR EXISTS ("
    "    SELECT 1 FROM entity_events n WHERE n.org_id = e.org_id"
    "    AND n.blueprint = e.blueprint AND n.identifier = e.identifier AND n.id > e.id"
    "    AND n.at < now() - make_interval(days => $1)))"
    "  AND ($3::uuid IS NULL OR e.org_id = $3)"
    "  LIMIT $2) d "
    "WHERE x.org_id = d.org_id AND x.id = d.id"
)


async def prune(
    db: Database, retention_days: int, *, batch: int = 5000, org_id: uuid.UUID | None = None
) -> int:
    """Prune every org's history (or `org_id`'s) past the retention, a batch per
    transaction; how many events went."""
    total = 0
    while True:
        async with db.system() as tx:
            status = await tx.execute(_PRUNE, retention_days, batch, org_id)
        pruned = int(status.rsplit(" ", 1)[-1])
        total += pruned
        if pruned < batch:
            return total
