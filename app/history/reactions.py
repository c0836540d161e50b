"""How history reacts to catalog changes (subscribed by app/wiring.py through the seam in
app/kit/reactions.py): a property or relation renamed or removed is recorded, in the
writer's transaction, so events written under the former name are read under today's."""

from __future__ import annotations

from app.db.database import Tx
from app.kit import reactions


async def _names_changed(tx: Tx, change: reactions.NamesChanged) -> None:
    pairs: list[tuple[str, str | None]] = [*change.renamed, *((n, None) for n in change.removed)]
    await tx.execute(
        "INSERT INTO history_name_changes (org_id, blueprint, kind, old_name, new_name) "
        "SELECT $1, $2, $3, c.old, c.new "
        "FROM unnest($4::varchar[], $5::varchar[]) WITH ORDINALITY AS c(old, new, n) "
        "ORDER BY c.n",
        tx.org_id,
        change.blueprint,
        change.kind,
        [p[0] for p in pairs],
        [p[1] for p in pairs],
    )


def subscribe() -> None:
    reactions.subscribe(reactions.NamesChanged, _names_changed)
