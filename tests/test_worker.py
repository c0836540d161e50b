"""The arq worker takes jobs from the real Redis queue and returns their results."""

from __future__ import annotations

import asyncio
import uuid

from arq import create_pool

from app.config import Settings
from app.worker import InProcessWorker, redis_settings


async def test_in_process_worker_runs_a_queued_job(settings: Settings) -> None:
    isolated = settings.model_copy(update={"queue_name": f"portolan-test:{uuid.uuid4().hex}"})
    worker = InProcessWorker(isolated)
    pool = await create_pool(redis_settings(isolated), default_queue_name=isolated.queue_name)
    worker.start()
    try:
        value = uuid.uuid4().hex
        job = await pool.enqueue_job("ping", value)
        assert job is not None
        assert await asyncio.wait_for(job.result(timeout=10), 15) == value
    finally:
        await worker.stop()
        await pool.aclose()


async def _grow_entities(db, org_id, blueprint: str) -> None:  # type: ignore[no-untyped-def]
    """300 new entities: enough change for analyze_stale_tables(min_rows=100)."""
    async with db.system(org_id) as tx:
        await tx.execute(
            "INSERT INTO blueprints (org_id, identifier, title, schema, relations, "
            "mirror_properties, calculation_properties, aggregation_properties, created_by, "
            "updated_by) VALUES ($1, $2, 'S', '{}', '{}', '{}', '{}', '{}', 'x', 'x')",
            org_id,
            blueprint,
        )
        await tx.execute(
            "INSERT INTO entities (org_id, blueprint, identifier, properties, created_by, "
            "updated_by) SELECT $1, $2, 'e' || g, '{}', 'x', 'x' FROM generate_series(1, 300) g",
            org_id,
            blueprint,
        )


async def _analyzed_soon(db) -> list[str]:  # type: ignore[no-untyped-def]
    from app.db.maintenance import analyze_stale_tables

    analyzed: list[str] = []
    for _ in range(50):  # activity statistics reach the server asynchronously
        analyzed = await analyze_stale_tables(db, min_rows=100)
        if "entities" in analyzed:
            break
        await asyncio.sleep(0.1)
    return analyzed


async def test_stale_statistics_are_refreshed(db, make_org) -> None:  # type: ignore[no-untyped-def]
    org = await make_org()
    await _grow_entities(db, org.org_id, "stats")
    assert "entities" in await _analyzed_soon(db)


async def test_statistics_wait_while_an_index_is_being_built(db, make_org, settings) -> None:  # type: ignore[no-untyped-def]
    """ANALYZE in a transaction and CREATE INDEX CONCURRENTLY on one table deadlock: the
    refresh skips its round while the range-index reconciler holds the maintenance lock."""
    import asyncpg

    from app.db.maintenance import MAINTENANCE_LOCK, analyze_stale_tables

    org = await make_org()
    await _grow_entities(db, org.org_id, "waits")
    holder = await asyncpg.connect(settings.database_url)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MAINTENANCE_LOCK)
        for _ in range(10):
            assert await analyze_stale_tables(db, min_rows=100) == []
            await asyncio.sleep(0.05)
    finally:
        await holder.close()
    assert "entities" in await _analyzed_soon(db)
