"""How pages react to catalog changes (subscribed by app/wiring.py through the seam in
app/kit/reactions.py): a property renamed is carried into every widget that reads the
blueprint and names it (what it breaks down, aggregates, groups or measures time by, and
its dataset's rules), in the writer's transaction, so dashboards keep drawing the same
data. A removed property is left named: the widget's data then answers a 422 naming it.
A deleted blueprint takes its catalog pages with it."""

from __future__ import annotations

from typing import Any

from app.db.database import Tx
from app.kit import reactions
from app.pages.widgets import COMPLIANCE, LINE, NUMBER, PIE, TABLE, blueprint_rule

_READERS = (NUMBER, PIE, TABLE, LINE, COMPLIANCE)


def _reads(definition: dict[str, Any], blueprint: str) -> bool:
    named = definition.get("blueprint")
    if isinstance(named, str):
        return named == blueprint
    return blueprint_rule(definition.get("dataset")) == blueprint


def _rules(query: Any, names: dict[str, str]) -> Any:
    """A dataset with its rules' properties renamed (nested queries included)."""
    if isinstance(query, list):
        return [_rules(rule, names) for rule in query]
    if not isinstance(query, dict):
        return query
    out = dict(query)
    if isinstance(out.get("rules"), list):
        out["rules"] = [_rules(rule, names) for rule in out["rules"]]
    prop = out.get("property")
    if isinstance(prop, str) and prop in names:
        out["property"] = names[prop]
    return out


def _breakdown(value: Any, names: dict[str, str]) -> Any:
    """A pie's `property#<name>` (or a plain name)."""
    if not isinstance(value, str):
        return value
    kind, sep, rest = value.partition("#")
    if sep and kind == "property" and rest in names:
        return f"property#{names[rest]}"
    return names.get(value, value)


def renamed(definition: dict[str, Any], kind: str, names: dict[str, str]) -> dict[str, Any]:
    """The widget's definition with the properties in `names` renamed."""
    out = dict(definition)
    if "dataset" in out:
        out["dataset"] = _rules(out["dataset"], names)
    for key in ("groupBy", "measureTimeBy", "breakdownProperty"):
        if isinstance(out.get(key), str) and out[key] in names:
            out[key] = names[out[key]]
    if kind == PIE:
        out["property"] = _breakdown(out.get("property"), names)
    elif isinstance(out.get("property"), str) and out["property"] in names:
        out["property"] = names[out["property"]]
    if isinstance(out.get("properties"), list):
        out["properties"] = [
            names.get(p, p) if isinstance(p, str) else p for p in out["properties"]
        ]
    return out


async def _names_changed(tx: Tx, change: reactions.NamesChanged) -> None:
    if change.kind != "property" or not change.renamed:
        return
    names = dict(change.renamed)
    rows = await tx.fetch(
        "SELECT page, id, type, definition FROM page_widgets "
        "WHERE org_id = $1 AND type = ANY($2::varchar[]) FOR UPDATE",
        tx.org_id,
        list(_READERS),
    )
    for row in rows:
        definition = row["definition"]
        if not _reads(definition, change.blueprint):
            continue
        updated = renamed(definition, row["type"], names)
        if updated != definition:
            await tx.execute(
                "UPDATE page_widgets SET definition = $4 "
                "WHERE org_id = $1 AND page = $2 AND id = $3",
                tx.org_id,
                row["page"],
                row["id"],
                updated,
            )


async def _blueprint_deleted(tx: Tx, change: reactions.BlueprintDeleted) -> None:
    """A blueprint's catalog pages go with it (Port's behaviour); dashboards that read it
    stay, and their widgets' data answers a 422 naming it."""
    await tx.execute(
        "DELETE FROM pages WHERE org_id = $1 AND type = 'blueprint-entities' AND blueprint = $2",
        tx.org_id,
        change.blueprint,
    )


def subscribe() -> None:
    reactions.subscribe(reactions.NamesChanged, _names_changed)
    reactions.subscribe(reactions.BlueprintDeleted, _blueprint_deleted)
