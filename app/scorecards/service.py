"""Scorecard definitions: create, replace, delete, read (Port's routes and shapes).

Every change counts up the scorecard's `version`; its results are then re-evaluated for the
whole blueprint in the background (app.scorecards.evaluate) and the scorecard reads as
`evaluating` until its `evaluated_version` catches up. A change also counts up the
blueprint's version: entity writes keep the blueprint's scorecards with its definition,
and this is how every process learns that they changed.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from app.catalog import blueprints as bp_service
from app.catalog.validation import check_url_identifier
from app.db.database import Tx
from app.kit.errors import Conflict, Invalid, NotFound
from app.scorecards.definitions import normalise
from app.search.service import fresh_scope

_SELECT = """
SELECT blueprint, identifier, title, levels, rules, filter, properties, version,
       evaluated_version,
       created_at, created_by, updated_at, updated_by,
       evaluation_failures, evaluation_error, evaluation_retry_at
FROM scorecards
"""


def to_api(row: asyncpg.Record) -> dict[str, Any]:
    out: dict[str, Any] = {
        "identifier": row["identifier"],
        "title": row["title"],
        "blueprint": row["blueprint"],
        "levels": row["levels"],
        "rules": row["rules"],
        "createdAt": row["created_at"],
        "createdBy": row["created_by"],
        "updatedAt": row["updated_at"],
        "updatedBy": row["updated_by"],
        # Portolan's: `evaluating` until every entity's result follows this definition.
        "state": "ready" if row["evaluated_version"] >= row["version"] else "evaluating",
    }
    if row["evaluation_failures"]:
        # The worker's evaluation keeps failing (app/scorecards/evaluate.py): why, how many
        # times in a row, and when it is tried again.
        out["state"] = "failing"
        out["evaluationError"] = {
            "message": row["evaluation_error"],
            "failures": row["evaluation_failures"],
            "retryAt": row["evaluation_retry_at"],
        }
    if row["filter"] is not None:
        out["filter"] = row["filter"]
    if row["properties"]:
        out["properties"] = row["properties"]
    return out


async def list_all(tx: Tx) -> list[dict[str, Any]]:
    rows = await tx.fetch(_SELECT + " WHERE org_id = $1 ORDER BY blueprint, identifier", tx.org_id)
    return [to_api(r) for r in rows]


async def list_for(tx: Tx, blueprint: str) -> list[dict[str, Any]]:
    await bp_service.get_row(tx, blueprint)  # 404 for an unknown blueprint
    rows = await tx.fetch(
        _SELECT + " WHERE org_id = $1 AND blueprint = $2 ORDER BY identifier",
        tx.org_id,
        blueprint,
    )
    return [to_api(r) for r in rows]


async def get(tx: Tx, blueprint: str, identifier: str) -> dict[str, Any]:
    row = await tx.fetchrow(
        _SELECT + " WHERE org_id = $1 AND blueprint = $2 AND identifier = $3",
        tx.org_id,
        blueprint,
        identifier,
    )
    if row is None:
        await bp_service.get_row(tx, blueprint)
        raise NotFound(f"Scorecard {identifier!r} of blueprint {blueprint!r} was not found")
    return to_api(row)


async def _prepare(tx: Tx, blueprint: str, body: Any) -> dict[str, Any]:
    # The blueprint row is locked: a scorecard and its blueprint change one at a time.
    await bp_service.get_row(tx, blueprint, lock=True)
    scope = await fresh_scope(tx, blueprint, None)
    return await normalise(body, blueprint, scope)


async def _changed(tx: Tx, blueprint: str) -> None:
    await tx.execute(
        "UPDATE blueprints SET version = version + 1 WHERE org_id = $1 AND identifier = $2",
        tx.org_id,
        blueprint,
    )
    bp_service.forget(tx.org_id, blueprint)


async def _insert(tx: Tx, actor: str, blueprint: str, sc: dict[str, Any]) -> None:
    await tx.execute(
        "INSERT INTO scorecards (org_id, blueprint, identifier, title, levels, rules, filter, "
        "properties, created_by, updated_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $9, $8, $8)",
        tx.org_id,
        blueprint,
        sc["identifier"],
        sc["title"],
        sc["levels"],
        sc["rules"],
        sc["filter"],
        actor,
        sc["properties"],
    )


async def _update(tx: Tx, actor: str, blueprint: str, sc: dict[str, Any]) -> bool:
    status = await tx.execute(
        # A changed definition is evaluated at once, even while a failure backs off.
        # Only what grades (levels, rules, filter) makes a new version to evaluate: a change
        # of title or properties re-grades nothing.
        "UPDATE scorecards SET title = $4, levels = $5, rules = $6, filter = $7, "
        "properties = $9, version = version + "
        "(CASE WHEN (levels, rules, filter) IS DISTINCT FROM ($5::jsonb, $6::jsonb, $7::jsonb) "
        "THEN 1 ELSE 0 END), updated_at = now(), updated_by = $8, "
        "evaluation_retry_at = NULL "
        "WHERE org_id = $1 AND blueprint = $2 AND identifier = $3",
        tx.org_id,
        blueprint,
        sc["identifier"],
        sc["title"],
        sc["levels"],
        sc["rules"],
        sc["filter"],
        actor,
        sc["properties"],
    )
    return status.endswith(" 1")


async def create(tx: Tx, actor: str, blueprint: str, body: Any) -> dict[str, Any]:
    sc = await _prepare(tx, blueprint, body)
    exists = await tx.fetchval(
        "SELECT 1 FROM scorecards WHERE org_id = $1 AND blueprint = $2 AND identifier = $3",
        tx.org_id,
        blueprint,
        sc["identifier"],
    )
    if exists:
        raise Conflict(
            f"Scorecard {sc['identifier']!r} of blueprint {blueprint!r} already exists",
            code="scorecard_exists",
        )
    await _insert(tx, actor, blueprint, sc)
    await _changed(tx, blueprint)
    return await get(tx, blueprint, sc["identifier"])


async def replace(tx: Tx, actor: str, blueprint: str, identifier: str, body: Any) -> dict[str, Any]:
    check_url_identifier(body, identifier)
    sc = await _prepare(
        tx, blueprint, {**body, "identifier": identifier} if isinstance(body, dict) else body
    )
    if not await _update(tx, actor, blueprint, sc):
        raise NotFound(f"Scorecard {identifier!r} of blueprint {blueprint!r} was not found")
    await _changed(tx, blueprint)
    return await get(tx, blueprint, identifier)


async def replace_all(tx: Tx, actor: str, blueprint: str, bodies: Any) -> list[dict[str, Any]]:
    """PUT /v1/blueprints/{bp}/scorecards: the blueprint's scorecards become the given ones
    (others are deleted, existing ones replaced, new ones created)."""
    if not isinstance(bodies, list):
        raise Invalid("The body is the list of the blueprint's scorecards")
    await bp_service.get_row(tx, blueprint, lock=True)
    scope = await fresh_scope(tx, blueprint, None)
    wanted: list[dict[str, Any]] = []
    details: list[dict[str, str]] = []
    for index, body in enumerate(bodies):
        try:
            wanted.append(await normalise(body, blueprint, scope))
        except Invalid as exc:
            for detail in exc.details or []:
                details.append({**detail, "pointer": f"/{index}{detail.get('pointer', '')}"})
    ids = [sc["identifier"] for sc in wanted]
    if len(set(ids)) != len(ids):
        details.append({"pointer": "/", "message": "a scorecard identifier appears twice"})
    if details:
        raise Invalid("The scorecards are invalid", details=details)
    dropped = await tx.fetch(
        "DELETE FROM scorecards WHERE org_id = $1 AND blueprint = $2 "
        "AND NOT identifier = ANY($3::varchar[]) RETURNING identifier",
        tx.org_id,
        blueprint,
        ids,
    )
    await _drop_results(tx, blueprint, [r["identifier"] for r in dropped])
    for sc in wanted:
        if not await _update(tx, actor, blueprint, sc):
            await _insert(tx, actor, blueprint, sc)
    await _changed(tx, blueprint)
    return await list_for(tx, blueprint)


async def delete(tx: Tx, blueprint: str, identifier: str) -> None:
    await bp_service.get_row(tx, blueprint, lock=True)
    status = await tx.execute(
        "DELETE FROM scorecards WHERE org_id = $1 AND blueprint = $2 AND identifier = $3",
        tx.org_id,
        blueprint,
        identifier,
    )
    if not status.endswith(" 1"):
        raise NotFound(f"Scorecard {identifier!r} of blueprint {blueprint!r} was not found")
    await _drop_results(tx, blueprint, [identifier])
    await _changed(tx, blueprint)


async def _drop_results(tx: Tx, blueprint: str, identifiers: list[str]) -> None:
    await tx.execute(
        "DELETE FROM scorecard_results WHERE org_id = $1 AND blueprint = $2 "
        "AND scorecard = ANY($3::varchar[])",
        tx.org_id,
        blueprint,
        identifiers,
    )
