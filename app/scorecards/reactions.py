"""How scorecards react to catalog changes (subscribed by app/wiring.py through the seam in
app/kit/reactions.py):

- entities written: their blueprint's scorecards are evaluated for them in the writer's
  transaction (an entity's results change with it), and scorecards elsewhere that read
  them through relations are flagged for the worker;
- entities deleted: those scorecards elsewhere are flagged;
- a blueprint changed: its scorecards' version moves, so the worker evaluates them again
  (values removed or renamed, relations changed).
"""

from __future__ import annotations

from app.db.database import Tx
from app.kit import reactions
from app.scorecards.evaluate import evaluate_entities, request_refresh


async def _written(tx: Tx, change: reactions.EntitiesWritten) -> None:
    await evaluate_entities(tx, change.blueprint, change.identifiers)


async def _deleted(tx: Tx, change: reactions.EntitiesDeleted) -> None:
    await request_refresh(tx, change.blueprint)


async def _blueprint_changed(tx: Tx, change: reactions.BlueprintChanged) -> None:
    await tx.execute(
        "UPDATE scorecards SET version = version + 1 WHERE org_id = $1 AND blueprint = $2",
        tx.org_id,
        change.blueprint,
    )


def subscribe() -> None:
    reactions.subscribe(reactions.EntitiesWritten, _written)
    reactions.subscribe(reactions.EntitiesDeleted, _deleted)
    reactions.subscribe(reactions.BlueprintChanged, _blueprint_changed)
