"""calculationProperties: jq over the entity, evaluated in a separate process.

jq runs in C and cannot be interrupted from Python, so a page's calculations go to a small
process pool; a batch that runs past its time limit has its process killed and every value
of the batch becomes null with an error entry. An output larger than the size limit, a jq
error, or a result of the wrong type makes that one value null with an error entry. A
request never fails because of a calculation.

The jq programs and the entities travel as JSON; the child keeps compiled programs.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import pydantic_core

TIME_LIMIT_SECONDS = 2.0
OUTPUT_LIMIT_BYTES = 64 * 1024
_WORKERS = 2

_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}

_pool: ProcessPoolExecutor | None = None
_compiled: dict[str, Any] = {}  # in the child: jq expression -> compiled program


def _evaluate(programs: list[tuple[str, str, str]], docs: list[Any]) -> list[dict[str, Any]]:
    """In the child: for each entity, {property: [value, error or None]}."""
    import jq

    out: list[dict[str, Any]] = []
    for doc in docs:
        results: dict[str, Any] = {}
        for name, expression, kind in programs:
            try:
                program = _compiled.get(expression)
                if program is None:
                    program = _compiled[expression] = jq.compile(expression)
                found = program.input_value(doc).all()
                value = found[0] if len(found) == 1 else (found or None)
                if len(found) > 1:
                    raise ValueError(f"the expression gave {len(found)} results, not one")
                if len(json.dumps(value)) > OUTPUT_LIMIT_BYTES:
                    raise ValueError(f"the result is larger than {OUTPUT_LIMIT_BYTES} bytes")
                wanted = _TYPES.get(kind)
                if value is not None and wanted is not None:
                    if not isinstance(value, wanted) or (
                        kind == "number" and isinstance(value, bool)
                    ):
                        raise ValueError(f"the result is not of type {kind}")
                results[name] = [value, None]
            except Exception as exc:
                results[name] = [None, str(exc)[:500]]
        out.append(results)
    return out


def _get_pool() -> ProcessPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ProcessPoolExecutor(
            max_workers=_WORKERS, mp_context=multiprocessing.get_context("spawn")
        )
    return _pool


def _discard_pool() -> None:
    """Kill the pool's processes (one is stuck past its time limit) and start afresh."""
    global _pool
    pool, _pool = _pool, None
    if pool is None:
        return
    for process in list(getattr(pool, "_processes", {}).values()):
        process.kill()
    pool.shutdown(wait=False, cancel_futures=True)


def shutdown() -> None:
    _discard_pool()


async def calculate(blueprint: dict[str, Any], entities: list[dict[str, Any]]) -> None:
    """Adds each calculation property of `blueprint` to the entities' properties (in
    place); failures are null values listed in the entity's `calculationErrors`."""
    calcs = blueprint.get("calculationProperties") or {}
    if not calcs or not entities:
        return
    programs = [
        (name, str(calc.get("calculation", "")), str(calc.get("type", "")))
        for name, calc in sorted(calcs.items())
    ]
    # The entity as the API writes it (dates included), so `.createdAt` reads the same.
    docs = [json.loads(pydantic_core.to_json(entity)) for entity in entities]
    loop = asyncio.get_running_loop()
    try:
        results = await asyncio.wait_for(
            loop.run_in_executor(_get_pool(), _evaluate, programs, docs), TIME_LIMIT_SECONDS
        )
    except (TimeoutError, BrokenProcessPool):
        _discard_pool()
        message = f"the calculation ran longer than {TIME_LIMIT_SECONDS:g} s"
        results = [{name: [None, message] for name, _, _ in programs} for _ in entities]
    for entity, result in zip(entities, results, strict=True):
        errors = {name: error for name, (_, error) in result.items() if error is not None}
        entity["properties"] = {
            **entity["properties"],
            **{name: value for name, (value, _) in result.items()},
        }
        if errors:
            entity["calculationErrors"] = errors
