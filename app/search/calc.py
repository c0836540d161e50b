"""calculationProperties: jq over the entity, evaluated in the jq sandbox.

A page's entities go to the sandbox (app/kit/sandbox.py) in chunks, each a call with its
own time limit, so one org's large page takes turns with other orgs' work. A chunk that
runs past its time limit (or crashes its child) makes every value of that chunk and of the
rest of the page null, each named in the entity's `calculationErrors` `{property: reason}`;
an output larger than the size limit, a jq error, more than one result, or a result of the
wrong type makes that one value null with an error entry. When no evaluation turn comes in
time, the read fails with 503 and Retry-After: a value is never null without a reason.
"""

from __future__ import annotations

from typing import Any

import pydantic_core

from app.kit import sandbox

OUTPUT_LIMIT_BYTES = 64 * 1024
CHUNK = 100  # entities per sandbox call

_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


def _value(kind: str, outcome: tuple[bool, Any]) -> tuple[Any, str | None]:
    ok, found = outcome
    if not ok:
        return None, str(found)
    if len(found) > 1:
        return None, "the expression gave more than one result"
    value = found[0] if found else None
    wanted = _TYPES.get(kind)
    if value is not None and wanted is not None:
        if not isinstance(value, wanted) or (kind == "number" and isinstance(value, bool)):
            return None, f"the result is not of type {kind}"
    return value, None


async def calculate(
    blueprint: dict[str, Any], entities: list[dict[str, Any]], *, org: object
) -> None:
    """Adds each calculation property of `blueprint` to the entities' properties (in
    place); failures are null values listed in the entity's `calculationErrors`. Raises
    sandbox.Busy (a 503) when the sandbox gives the org no turn in time."""
    calcs = blueprint.get("calculationProperties") or {}
    if not calcs or not entities:
        return
    names = sorted(calcs)
    programs = [str(calcs[name].get("calculation", "")) for name in names]
    kinds = [str(calcs[name].get("type", "")) for name in names]
    failed: str | None = None
    for start in range(0, len(entities), CHUNK):
        chunk = entities[start : start + CHUNK]
        rows: list[list[tuple[bool, Any]]] | None = None
        if failed is None:
            # The entity as the API writes it (dates included), so `.createdAt` reads the same.
            docs = [pydantic_core.to_json(entity).decode() for entity in chunk]
            try:
                rows = await sandbox.evaluate(
                    org, programs, docs, outputs=2, output_limit=OUTPUT_LIMIT_BYTES
                )
            except sandbox.TimeLimit:
                limit = sandbox.limits().time_limit
                failed = f"the calculation ran longer than {limit:g} s"
            except sandbox.Crashed as exc:
                failed = str(exc)
        for index, entity in enumerate(chunk):
            values: dict[str, Any] = {}
            errors: dict[str, str] = {}
            for column, (name, kind) in enumerate(zip(names, kinds, strict=True)):
                outcome = rows[index][column] if rows is not None else (False, failed)
                values[name], error = _value(kind, outcome)
                if error is not None:
                    errors[name] = error
            entity["properties"] = {**entity["properties"], **values}
            if errors:
                entity["calculationErrors"] = errors
