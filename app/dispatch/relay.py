"""The outbox relay: hands dispatchable runs from PostgreSQL to the arq queue.

A run becomes dispatchable in the transaction that records it (or approves it, or schedules
its retry) by an outbox row; the same transaction sends `NOTIFY portolan_dispatch`, which
PostgreSQL delivers only on commit. The relay wakes on that notification (or every second,
or when a delayed row falls due), takes due rows with `FOR UPDATE SKIP LOCKED` (several
workers relay side by side without taking the same rows), enqueues one arq job per row and
marks the rows relayed in the same transaction. (On Citus, which locks rows only in a
statement routed to one shard, due rows are found across orgs first, then locked and
marked org by org in that transaction: docs/scaling.md.) Orgs take turns, and an org with
`PORTOLAN_DISPATCH_ORG_CONCURRENCY` runs in flight waits for one of them to be claimed and
end: one org's backlog stays in the outbox instead of filling the workers' job slots. A
row is deleted by the worker's claim of its run (app/dispatch/runner.py), not by the relay.

Redis is only the transport. When it is unreachable the enqueue fails, the transaction
rolls back, the rows stay, and the relay tries again with backoff. When Redis loses a job
(it restarted empty) or a worker died holding one before claiming the run, no claim comes:
after `PORTOLAN_DISPATCH_REQUEUE_SECONDS` the relay hands the row to the queue again, under
a new job id. However many jobs an attempt gets, the claim (a conditional update) lets one
of them run it, so a receiver sees one delivery per attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from typing import Any

import asyncpg
from arq.connections import ArqRedis, RedisSettings, create_pool

from app.actions.runs import NOTIFY_CHANNEL
from app.config import Settings
from app.db.database import Database, Tx
from app.kit.loops import cancel_and_wait

log = logging.getLogger("portolan.dispatch")
BATCH = 200
_IDLE_WAIT = 1.0
_CAPPED_WAIT = 0.25
_BACKOFF_MAX = 5.0
_PASS_SECONDS = 30.0


def job_id(run_id: str, attempt: int, relays: int = 0) -> str:
    """The arq job id of a run's attempt: the run id for the first, `<run id>:<n>` after,
    and `.<k>` behind it when the relay hands the same attempt to the queue again."""
    base = run_id if attempt == 1 else f"{run_id}:{attempt}"
    return base if relays == 0 else f"{base}.{relays}"


# Due rows, each org's oldest first, as many of an org as its share of the queue allows:
# an org's runs in flight (handed to the queue and not yet requeued, or claimed by a worker
# whose lease holds) count against `org_cap`. The rest wait here, in PostgreSQL, so one
# org's backlog (slow receivers, slow templates) never fills the workers' job slots.
_DUE = """
WITH busy AS (
    SELECT org_id, count(*) AS n FROM (
        SELECT org_id FROM dispatch_outbox
        WHERE relayed_at >= now() - make_interval(secs => $2)
        UNION ALL
        SELECT org_id FROM action_runs
        WHERE dispatch_state = 'dispatching' AND lease_until > now()
    ) AS held GROUP BY org_id
), due AS (
    SELECT org_id, id, available_at,
           row_number() OVER (PARTITION BY org_id ORDER BY available_at, id) AS turn
    FROM dispatch_outbox
    WHERE available_at <= now()
      AND (relayed_at IS NULL OR relayed_at < now() - make_interval(secs => $2))
)
SELECT due.org_id, due.id FROM due LEFT JOIN busy ON busy.org_id = due.org_id
WHERE due.turn + coalesce(busy.n, 0) <= $3
ORDER BY due.turn, due.available_at, due.id LIMIT $1
"""


async def relay_once(
    db: Database,
    pool: ArqRedis,
    *,
    requeue_seconds: float,
    org_cap: int = 1_000_000,
    batch: int = BATCH,
) -> int:
    """Hand the due outbox rows to the queue, orgs in turns and each within `org_cap` runs
    in flight; how many were handed."""
    async with db.system() as tx:
        chosen = await tx.fetch(_DUE, batch, requeue_seconds, org_cap)
        if not chosen:
            return 0
        rows = await (_lock_per_org(tx, chosen) if tx.citus else _lock(tx, chosen))
        for row in rows:
            await pool.enqueue_job(
                "dispatch_run",
                str(row["org_id"]),
                row["run_id"],
                row["attempt"],
                _job_id=job_id(row["run_id"], row["attempt"], row["relays"]),
            )
        if rows and tx.citus:
            for org_id, ids in _by_org(rows).items():
                await tx.execute(
                    "UPDATE dispatch_outbox SET relayed_at = now(), relays = relays + 1 "
                    "WHERE org_id = $1 AND id = ANY($2::bigint[])",
                    org_id,
                    ids,
                )
        elif rows:
            await tx.execute(
                "UPDATE dispatch_outbox o SET relayed_at = now(), relays = relays + 1 "
                "FROM unnest($1::uuid[], $2::bigint[]) AS d(o, i) "
                "WHERE o.org_id = d.o AND o.id = d.i",
                [r["org_id"] for r in rows],
                [r["id"] for r in rows],
            )
    return len(rows)


async def _lock(tx: Tx, chosen: list[asyncpg.Record]) -> list[asyncpg.Record]:
    """The chosen rows no other relay holds, locked, oldest first."""
    return await tx.fetch(
        "SELECT org_id, id, run_id, attempt, relays FROM dispatch_outbox "
        "WHERE (org_id, id) IN (SELECT * FROM unnest($1::uuid[], $2::bigint[])) "
        "ORDER BY available_at, id FOR UPDATE SKIP LOCKED",
        [r["org_id"] for r in chosen],
        [r["id"] for r in chosen],
    )


async def _lock_per_org(tx: Tx, chosen: list[asyncpg.Record]) -> list[asyncpg.Record]:
    """`_lock` on Citus, which locks rows only in a statement routed to one shard: one
    statement per org (all in this transaction), filtered by the org."""
    rows: list[asyncpg.Record] = []
    for org_id, ids in _by_org(chosen).items():
        rows += await tx.fetch(
            "SELECT org_id, id, run_id, attempt, relays, available_at FROM dispatch_outbox "
            "WHERE org_id = $1 AND id = ANY($2::bigint[]) FOR UPDATE SKIP LOCKED",
            org_id,
            ids,
        )
    return sorted(rows, key=lambda r: (r["available_at"], r["id"]))


def _by_org(rows: list[asyncpg.Record]) -> dict[uuid.UUID, list[int]]:
    grouped: dict[uuid.UUID, list[int]] = {}
    for row in rows:
        grouped.setdefault(row["org_id"], []).append(row["id"])
    return grouped


async def _seconds_to_next(db: Database, requeue_seconds: float) -> float | None:
    async with db.system() as tx:
        value = await tx.fetchval(
            "SELECT extract(epoch FROM min(CASE WHEN relayed_at IS NULL THEN available_at "
            "ELSE relayed_at + make_interval(secs => $1) END) - now()) FROM dispatch_outbox",
            requeue_seconds,
        )
    return None if value is None else max(0.0, float(value))


class Relay:
    """The relay loop of one worker process (start / stop). A subclass relays another
    outbox with the same loop (app/workflows/relay.py): its channel, name, pass and look
    at the next due row."""

    CHANNEL = NOTIFY_CHANNEL
    NAME = "dispatch-relay"

    async def _relay_once(self, pool: ArqRedis, requeue_seconds: float) -> int:
        return await relay_once(
            self._db,
            pool,
            requeue_seconds=requeue_seconds,
            org_cap=self._settings.dispatch_org_concurrency,
        )

    async def _next_due(self, requeue_seconds: float) -> float | None:
        return await _seconds_to_next(self._db, requeue_seconds)

    def __init__(self, settings: Settings, db: Database) -> None:
        self._settings = settings
        self._db = db
        self._pool: ArqRedis | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._listener: asyncpg.Connection | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.NAME)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task, log)
        await self._close_listener()
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await self._pool.aclose()
            self._pool = None

    async def _drop_queue(self) -> None:
        """Forget the Redis pool after a failure: the next pass connects afresh."""
        pool, self._pool = self._pool, None
        if pool is not None:
            closing = asyncio.create_task(pool.aclose())
            await asyncio.wait({closing}, timeout=1.0)

    async def _queue(self) -> ArqRedis:
        if self._pool is None:
            assert self._settings.redis_url is not None
            target = RedisSettings.from_dsn(self._settings.redis_url)
            target.conn_retries = 0  # the relay's own loop retries, with backoff
            self._pool = await create_pool(target, default_queue_name=self._settings.queue_name)
        return self._pool

    def _notified(self, *_: Any) -> None:
        self._wake.set()

    async def _listen(self) -> None:
        if self._listener is not None and not self._listener.is_closed():
            return
        assert self._settings.database_url is not None
        self._listener = await asyncpg.connect(
            self._settings.database_url,
            server_settings={"application_name": f"portolan-{self.NAME}"},
        )
        await self._listener.add_listener(self.CHANNEL, self._notified)

    async def _close_listener(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
            self._listener = None

    async def _run(self) -> None:
        failures = 0
        while True:
            wait = _IDLE_WAIT
            try:
                await self._listen()
                self._wake.clear()
                requeue = self._settings.dispatch_requeue_seconds
                # Bounded: a call stuck on a dead connection must not stop the relay.
                async with asyncio.timeout(_PASS_SECONDS):
                    moved = await self._relay_once(await self._queue(), requeue)
                failures = 0
                if moved >= BATCH:
                    continue  # more are due
                due = await self._next_due(requeue)
                if due is not None:
                    wait = min(wait, due)
                if moved == 0 and due is not None and due < _CAPPED_WAIT:
                    # Due rows that were not moved wait for their org's runs in flight to
                    # end, or another relay holds them: look again shortly, not at once
                    # (that would spin).
                    wait = _CAPPED_WAIT
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis or PostgreSQL unreachable: keep the rows, retry
                failures += 1
                await self._drop_queue()
                wait = min(_BACKOFF_MAX, 0.1 * 2**failures) * random.uniform(0.5, 1.0)  # noqa: S311
                log.warning(
                    "%s: %s (%s); retrying in %.1f s",
                    self.NAME,
                    type(exc).__name__,
                    exc,
                    wait,
                )
                await self._close_listener()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
