"""The arq worker: job functions and how to run them standalone or inside the API process."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from arq.connections import RedisSettings
from arq.cron import cron
from arq.worker import Worker

from app.config import Settings
from app.db.database import Database
from app.db.maintenance import analyze_stale_tables
from app.scorecards.evaluate import evaluate_pending
from app.scorecards.insight import snapshot_all
from app.search import indexes

log = logging.getLogger("portolan.worker")


async def ping(ctx: dict[str, Any], value: str) -> str:
    """Round-trip probe: proves a queued job reaches a live worker and comes back."""
    return value


async def refresh_statistics(ctx: dict[str, Any]) -> list[str]:
    """Keep planner statistics current after bulk writes (see app.db.maintenance)."""
    return await analyze_stale_tables(ctx["db"])


async def maintain_range_indexes(ctx: dict[str, Any]) -> dict[str, int]:
    """Build and drop property range indexes as blueprints and their sizes ask."""
    settings: Settings = ctx["settings"]
    assert settings.database_url is not None
    done = await indexes.reconcile(
        settings.database_url, min_entities=settings.range_index_min_entities
    )
    return {"created": len(done.created), "dropped": len(done.dropped), "failed": len(done.failed)}


async def evaluate_scorecards(ctx: dict[str, Any]) -> int:
    """Evaluates, for whole blueprints, the scorecards whose results lag their definition."""
    return await evaluate_pending(ctx["db"])


async def snapshot_scorecards(ctx: dict[str, Any]) -> int:
    """Keeps today's summary of every scorecard (the trend's point for the day)."""
    return await snapshot_all(ctx["db"])


async def _startup(ctx: dict[str, Any]) -> None:
    ctx["db"] = await Database.connect(ctx["settings"])


async def _shutdown(ctx: dict[str, Any]) -> None:
    if "db" in ctx:
        await ctx["db"].close()


JOB_FUNCTIONS = [ping]
CRON_JOBS = [
    # Hourly, so a day always has its point (the last pass of the day stands).
    cron(snapshot_scorecards, minute=7, second=0, run_at_startup=True, timeout=3600),
    cron(refresh_statistics, second=set(range(0, 60, 5)), run_at_startup=True),
    cron(
        evaluate_scorecards,
        second=set(range(1, 60, 2)),
        run_at_startup=True,
        timeout=3600,  # a scorecard over a very large blueprint
    ),
    cron(
        maintain_range_indexes,
        second={2, 17, 32, 47},
        run_at_startup=True,
        timeout=6 * 3600,  # building an index over a very large blueprint
    ),
]


def redis_settings(settings: Settings) -> RedisSettings:
    if settings.redis_url is None:
        raise RuntimeError("no Redis URL: start the embedded services first")
    return RedisSettings.from_dsn(settings.redis_url)


def build_worker(settings: Settings, *, handle_signals: bool) -> Worker:
    return Worker(
        functions=JOB_FUNCTIONS,
        cron_jobs=CRON_JOBS,
        on_startup=_startup,
        on_shutdown=_shutdown,
        ctx={"settings": settings},
        redis_settings=redis_settings(settings),
        queue_name=settings.queue_name,
        handle_signals=handle_signals,
        max_jobs=50,
        job_timeout=300,
        keep_result=3600,
        health_check_interval=30,
    )


class InProcessWorker:
    """Runs the arq worker as a task on the API's event loop (`serve` without --no-worker)."""

    def __init__(self, settings: Settings) -> None:
        self._worker = build_worker(settings, handle_signals=False)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._worker.async_run(), name="arq-worker")

    async def stop(self) -> None:
        await self._worker.close()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: S110 - shutting down
                pass
