"""The arq worker: job functions and how to run them standalone or inside the API process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
import uuid
from typing import Any

from arq.connections import RedisSettings
from arq.cron import cron
from arq.typing import WorkerCoroutine
from arq.worker import Function, Worker, func

from app import wiring
from app.automations import timers
from app.automations.changelog import changelog_sender
from app.automations.feed import event_feed
from app.catalog import data_migrations
from app.config import Settings
from app.db.database import Database
from app.db.maintenance import analyze_stale_tables
from app.dispatch import runner
from app.dispatch.relay import Relay
from app.history import retention as history_retention
from app.kit import client, sandbox
from app.kit.loops import cancel_and_wait
from app.scorecards.evaluate import evaluate_pending
from app.scorecards.insight import snapshot_all
from app.search import indexes
from app.webhooks.jobs import (
    process_pending_webhook_events,
    process_webhook_events,
    prune_webhook_events,
)
from app.workflows import engine as workflow_engine
from app.workflows.relay import WorkflowRelay

log = logging.getLogger("portolan.worker")
_CLOSE_SECONDS = 10.0
_DRAIN_SECONDS = 30.0  # a job's outbound request has its own, shorter, time limit


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
        settings.database_url,
        min_entities=settings.range_index_min_entities,
        max_per_org=settings.range_index_max_per_org,
    )
    return {
        "created": len(done.created),
        "dropped": len(done.dropped),
        "failed": len(done.failed),
        "capped": len(done.capped),
    }


async def evaluate_scorecards(ctx: dict[str, Any]) -> int:
    """Evaluates, for whole blueprints, the scorecards whose results lag their definition:
    one pass per org at a time, orgs in turns, failures backed off (app.scorecards.evaluate)."""
    settings: Settings = ctx["settings"]
    return await evaluate_pending(
        ctx["db"],
        concurrency=settings.scorecard_concurrency,
        retry_base=settings.scorecard_retry_base_seconds,
        retry_max=settings.scorecard_retry_max_seconds,
    )


async def snapshot_scorecards(ctx: dict[str, Any]) -> int:
    """Keeps today's summary of every scorecard (the trend's point for the day)."""
    return await snapshot_all(ctx["db"])


async def dispatch_run(ctx: dict[str, Any], org_id: str, run_id: str, attempt: int) -> str:
    """One attempt at a run's invocation (see app.dispatch.runner)."""
    return await runner.dispatch(ctx["settings"], ctx["db"], uuid.UUID(org_id), run_id, attempt)


async def run_workflow_node(
    ctx: dict[str, Any], org_id: str, node_run_id: str, attempt: int
) -> str:
    """One attempt at a workflow node run (see app.workflows.engine)."""
    return await workflow_engine.run_node(
        ctx["settings"], ctx["db"], uuid.UUID(org_id), node_run_id, attempt
    )


async def sweep_workflow_nodes(ctx: dict[str, Any]) -> int:
    """Workflow node runs whose worker died mid-node (lease expired) get a new attempt, and
    INPUT nodes whose timeout passed take their timeout outlet."""
    swept = await workflow_engine.sweep_expired(ctx["db"])
    return swept + await workflow_engine.expire_inputs(ctx["db"])


async def fire_timers(ctx: dict[str, Any]) -> int:
    """TIMER_PROPERTY_EXPIRED automations for timers that passed since the last look."""
    return await timers.fire_expired(ctx["db"])


async def sweep_runs(ctx: dict[str, Any]) -> int:
    """Runs whose worker died mid-dispatch (lease expired) are dispatched again."""
    return await runner.sweep_expired(ctx["settings"], ctx["db"])


async def prune_history(ctx: dict[str, Any]) -> int:
    """Entity events past PORTOLAN_HISTORY_RETENTION_DAYS (unset: none) are pruned."""
    settings: Settings = ctx["settings"]
    if settings.history_retention_days is None:
        return 0
    return await history_retention.prune(ctx["db"], settings.history_retention_days)


async def advance_migrations(ctx: dict[str, Any]) -> int:
    """Batches of the active data migrations, orgs in turns; their progress is kept in
    PostgreSQL, so a worker that stops leaves the next one to resume
    (app.catalog.data_migrations)."""
    settings: Settings = ctx["settings"]
    return await data_migrations.advance(
        ctx["db"], owner=ctx["owner"], concurrency=settings.migrations_concurrency
    )


async def _startup(ctx: dict[str, Any]) -> None:
    ctx["db"] = await Database.connect(ctx["settings"])
    # Who holds a migration's lease: one name per started worker (after any fork).
    ctx["owner"] = uuid.uuid4().hex


async def _shutdown(ctx: dict[str, Any]) -> None:
    db = ctx.pop("db", None)
    if db is not None:
        await db.close()


JOB_FUNCTIONS: list[Function | WorkerCoroutine] = [
    ping,
    # A dispatch's outcome lives on the run; its job result only needs to outlive a
    # duplicate enqueue of the same job id by a little.
    func(dispatch_run, keep_result=60),
    func(run_workflow_node, keep_result=60),
    func(process_webhook_events, keep_result=60),
]
CRON_JOBS = [
    cron(process_pending_webhook_events, second=set(range(0, 60, 2)), run_at_startup=True),
    cron(prune_webhook_events, minute=41, second=30, run_at_startup=True, timeout=3600),
    cron(prune_history, hour=3, minute=17, second=0, timeout=3600),
    cron(fire_timers, second=set(range(0, 60, 5)), run_at_startup=True),
    cron(sweep_runs, second=set(range(3, 60, 5)), run_at_startup=True),
    cron(sweep_workflow_nodes, second=set(range(4, 60, 5)), run_at_startup=True),
    # A pass lasts up to data_migrations.PASS_SECONDS; one started meanwhile returns at once.
    cron(advance_migrations, second=set(range(60)), run_at_startup=True, timeout=120),
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


class _Worker(Worker):
    """arq's worker, without re-checking the jobs it knows cannot start.

    arq leaves a job in the queue while it runs, and every look for jobs (each
    `poll_delay`) checks each queued job against Redis (three round trips) before it
    finds the job is running. Runs held by a slow receiver stay queued for as long as
    the receiver takes, so one org's slow receivers cost the process thousands of Redis
    round trips a second, paid by every org's requests. Jobs running in this worker are
    not looked at again; jobs found running in another worker are not looked at again for
    a second (a worker that died leaves its job to be taken once its in-progress mark
    expires: a second later at most)."""

    _ELSEWHERE_SECONDS = 1.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._elsewhere: dict[bytes, float] = {}

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        now = time.monotonic()
        if len(self._elsewhere) > 10_000:
            self._elsewhere = {j: t for j, t in self._elsewhere.items() if t > now}
        for job_id in job_ids:
            if job_id.decode() in self.tasks or self._elsewhere.get(job_id, 0.0) > now:
                continue
            if self.job_counter >= self.max_jobs:
                return  # full: the rest waits for a later look
            await super().start_jobs([job_id])
            if job_id.decode() not in self.tasks:  # running elsewhere (or already done)
                self._elsewhere[job_id] = now + self._ELSEWHERE_SECONDS


def build_worker(settings: Settings, *, handle_signals: bool) -> Worker:
    wiring.connect()
    return _Worker(
        functions=JOB_FUNCTIONS,
        cron_jobs=CRON_JOBS,
        on_startup=_startup,
        on_shutdown=_shutdown,
        ctx={"settings": settings},
        redis_settings=redis_settings(settings),
        queue_name=settings.queue_name,
        handle_signals=handle_signals,
        max_jobs=50,
        # How often an idle worker looks for jobs: a run waits for the next look (arq's
        # default, 0.5 s, would be most of a dispatch's latency).
        poll_delay=0.02,
        job_timeout=300,
        keep_result=3600,
        health_check_interval=30,
    )


class Supervisor:
    """A worker process's dispatch machinery: the outbox relay, and the arq worker started
    again whenever it stops on an error (arq's poll loop ends when Redis is unreachable;
    the runs wait in PostgreSQL meanwhile). Runs until cancelled."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._worker: Worker | None = None

    async def run(self) -> None:
        sandbox.configure(self.settings)
        db = await Database.connect(self.settings)
        relay = Relay(self.settings, db)
        relay.start()
        workflow_relay = WorkflowRelay(self.settings, db)
        workflow_relay.start()
        feed = event_feed(db, self.settings)
        feed.start()
        sender = changelog_sender(self.settings, db)
        sender.start()
        failures = 0
        try:
            while True:
                self._worker = build_worker(self.settings, handle_signals=False)
                started = asyncio.get_running_loop().time()
                failed = False
                try:
                    await self._worker.async_run()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("worker stopped: %s (%s); starting again", type(exc).__name__, exc)
                    failed = True
                finally:
                    await self._close_worker(drain=failed)
                ran = asyncio.get_running_loop().time() - started
                failures = 0 if ran > 30 else failures + 1
                await asyncio.sleep(min(5.0, 0.2 * 2**failures) * random.uniform(0.5, 1.0))  # noqa: S311
        finally:
            await sender.stop()
            await feed.stop()
            await workflow_relay.stop()
            await relay.stop()
            await db.close()
            await client.aclose_shared()
            sandbox.shutdown()

    async def _close_worker(self, *, drain: bool = False) -> None:
        """Stop arq's worker, within a time limit: with Redis gone its close cannot finish
        (it deletes its health key and closes its pool there), and a stuck close would
        stop the supervisor from ever starting a new worker.

        `drain` (the worker stopped because Redis went away): its running jobs are let
        finish first, up to _DRAIN_SECONDS. Their outcome is kept in PostgreSQL, so a
        request in flight (a webhook being sent) is not cut off and sent again later;
        arq's close cancels what is still running after that."""
        worker, self._worker = self._worker, None
        if worker is None:
            return
        running = [task for task in worker.tasks.values() if not task.done()]
        if drain and running:
            await asyncio.wait(running, timeout=_DRAIN_SECONDS)
        # Not wait_for: it waits for a cancelled close to finish, which a close stuck on a
        # dead connection may never do. A close still running after the limit is left.
        closing = asyncio.create_task(worker.close(), name="arq-close")
        done, _ = await asyncio.wait({closing}, timeout=_CLOSE_SECONDS)
        if not done:
            log.warning("worker did not close within %.0f s; starting a new one", _CLOSE_SECONDS)
        elif closing.cancelled():
            # arq's close gathers the jobs it has just cancelled, and so ends cancelled
            # itself: that is its close, not this supervisor being stopped.
            log.info("worker closed (its running jobs were cancelled)")
        elif closing.exception() is not None:
            log.warning("worker did not close cleanly: %s", type(closing.exception()).__name__)
        db = worker.ctx.get("db")
        if db is not None:  # on_shutdown did not run
            worker.ctx.pop("db", None)
            with contextlib.suppress(Exception):
                await db.close()


class InProcessWorker:
    """Runs the supervised worker as a task on the API's event loop (`serve` without
    --no-worker), or alone (`portolan worker`)."""

    def __init__(self, settings: Settings) -> None:
        self._supervisor = Supervisor(settings)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervisor.run(), name="portolan-worker")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task, log)


async def run_standalone(settings: Settings) -> None:
    """`portolan worker`: until SIGINT or SIGTERM."""
    task = asyncio.create_task(Supervisor(settings).run(), name="portolan-worker")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task
