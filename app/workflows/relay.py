"""The workflow outbox relay: hands due node runs from PostgreSQL to the arq queue.

The same pattern as action runs' relay (app/dispatch/relay.py): a node run becomes due in
the transaction that records it, with an outbox row and `NOTIFY portolan_workflows`
(delivered on commit). The relay wakes on it (or every second, or when a delayed row falls
due), takes due rows `FOR UPDATE SKIP LOCKED`, enqueues one `run_workflow_node` job per row
and marks the rows relayed in the same transaction; orgs take turns (each org's oldest rows
first). A row is deleted by the worker's claim of its node run. When no claim comes within
`PORTOLAN_DISPATCH_REQUEUE_SECONDS` (Redis lost the job, or the worker died holding it),
the row is handed to the queue again under a new job id; the claim lets one job run it.
"""

from __future__ import annotations

from arq.connections import ArqRedis

from app.db.database import Database
from app.dispatch.relay import Relay
from app.workflows.runs import NOTIFY_CHANNEL

BATCH = 200
JOB = "run_workflow_node"

# Due rows, each org's oldest first, as many of an org as its share of the queue allows:
# an org's node runs in flight (handed to the queue and not yet requeued, or claimed by a
# worker whose lease holds) count against `org_cap`, as action runs' do (the same setting).
_DUE = """
WITH busy AS (
    SELECT org_id, count(*) AS n FROM (
        SELECT org_id FROM workflow_outbox
        WHERE relayed_at >= now() - make_interval(secs => $2)
        UNION ALL
        SELECT org_id FROM workflow_node_runs
        WHERE state = 'dispatching' AND lease_until > now()
    ) AS held GROUP BY org_id
), due AS (
    SELECT org_id, id, available_at,
           row_number() OVER (PARTITION BY org_id ORDER BY available_at, id) AS turn
    FROM workflow_outbox
    WHERE available_at <= now()
      AND (relayed_at IS NULL OR relayed_at < now() - make_interval(secs => $2))
)
SELECT due.org_id, due.id FROM due LEFT JOIN busy ON busy.org_id = due.org_id
WHERE due.turn + coalesce(busy.n, 0) <= $3
ORDER BY due.turn, due.available_at, due.id LIMIT $1
"""


def job_id(node_run_id: str, attempt: int, relays: int) -> str:
    return f"{node_run_id}:{attempt}.{relays}"


async def relay_once(
    db: Database,
    pool: ArqRedis,
    *,
    requeue_seconds: float,
    org_cap: int = 1_000_000,
    batch: int = BATCH,
) -> int:
    """Hand the due outbox rows to the queue, orgs in turns and each within `org_cap` node
    runs in flight; how many were handed."""
    async with db.system() as tx:
        chosen = await tx.fetch(_DUE, batch, requeue_seconds, org_cap)
        if not chosen:
            return 0
        rows = await tx.fetch(
            "SELECT org_id, id, node_run_id, attempt, relays FROM workflow_outbox "
            "WHERE (org_id, id) IN (SELECT * FROM unnest($1::uuid[], $2::bigint[])) "
            "ORDER BY available_at, id FOR UPDATE SKIP LOCKED",
            [r["org_id"] for r in chosen],
            [r["id"] for r in chosen],
        )
        for row in rows:
            await pool.enqueue_job(
                JOB,
                str(row["org_id"]),
                row["node_run_id"],
                row["attempt"],
                _job_id=job_id(row["node_run_id"], row["attempt"], row["relays"]),
            )
        if rows:
            await tx.execute(
                "UPDATE workflow_outbox o SET relayed_at = now(), relays = relays + 1 "
                "FROM unnest($1::uuid[], $2::bigint[]) AS d(o, i) "
                "WHERE o.org_id = d.o AND o.id = d.i",
                [r["org_id"] for r in rows],
                [r["id"] for r in rows],
            )
    return len(rows)


async def _seconds_to_next(db: Database, requeue_seconds: float) -> float | None:
    async with db.system() as tx:
        value = await tx.fetchval(
            "SELECT extract(epoch FROM min(CASE WHEN relayed_at IS NULL THEN available_at "
            "ELSE relayed_at + make_interval(secs => $1) END) - now()) FROM workflow_outbox",
            requeue_seconds,
        )
    return None if value is None else max(0.0, float(value))


class WorkflowRelay(Relay):
    """The relay loop of one worker process (start / stop): the action runs' loop over the
    workflow outbox."""

    CHANNEL = NOTIFY_CHANNEL
    NAME = "workflow-relay"

    async def _relay_once(self, pool: ArqRedis, requeue_seconds: float) -> int:
        return await relay_once(
            self._db,
            pool,
            requeue_seconds=requeue_seconds,
            org_cap=self._settings.dispatch_org_concurrency,
        )

    async def _next_due(self, requeue_seconds: float) -> float | None:
        return await _seconds_to_next(self._db, requeue_seconds)
