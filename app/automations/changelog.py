"""Changelog destinations: a blueprint's `changelogDestination {"type": "WEBHOOK", "url"}`
receives every change of its entities, signed like action webhooks, in commit order per
entity.

The event feed (app/automations/feed.py) reads each committed change once; for a blueprint
with a destination it adds a delivery row in the same transaction that moves its cursor.
Per entity, ids of events follow commit order (a change waits for the entity's row lock,
so the next change's event is written after the previous one committed), and deliveries
are made in id order: the sender only takes the oldest undelivered delivery of an entity,
and the next one waits until it is delivered (or has failed for good). Entities are
independent: one entity's failing receiver does not hold up another's.

Tenants share the sender fairly: each delivery is its own task, at most
`changelog_org_concurrency` of an organization's are in flight at once and at most
`changelog_concurrency` in all, and a claim takes the orgs' oldest deliveries in turns
(every org's first, then every org's second, ...). (On Citus the heads of every org are
found first, then claimed org by org: docs/scaling.md.) A slow receiver holds only its own
org's turns; another org's deliveries are claimed and sent meanwhile.

A delivery is claimed with a lease (its worker's death hands it back), sent outside any
transaction, and recorded: 2xx delivered; another 4xx failed (the reason kept); timeouts,
connection errors, 408, 429 and 5xx retried with backoff until the last attempt. The body is
the event's data (`{action, resourceType, trigger, context, diff: {before, after}}`); the
`webhook-id` header is the delivery's id, the same on every attempt, so receivers dedupe.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterable
from typing import Any

import asyncpg

from app.config import Settings
from app.db.database import Database, Tx
from app.dispatch import invokers
from app.dispatch.runner import backoff
from app.kit.crypto import cipher_for
from app.kit.loops import PollingLoop
from app.kit.outbound import Allowed
from app.secrets import service as secrets_service

log = logging.getLogger("portolan.changelog")
POLL_SECONDS = 0.1
BATCH = 50


async def enqueue(tx: Tx, events: Iterable[Any]) -> int:
    """Delivery rows for the entity events whose blueprint has a changelog destination."""
    entity_events = [e for e in events if e.data.get("resourceType") == "entity"]
    if not entity_events:
        return 0
    pairs = sorted({(str(e.org_id), e.scope) for e in entity_events})
    rows = await tx.fetch(
        "SELECT org_id, identifier, changelog_destination FROM blueprints "
        "WHERE (org_id::text, identifier) IN (SELECT * FROM unnest($1::text[], $2::text[])) "
        "AND changelog_destination IS NOT NULL",
        [p[0] for p in pairs],
        [p[1] for p in pairs],
    )
    urls = {
        (str(r["org_id"]), r["identifier"]): r["changelog_destination"].get("url")
        for r in rows
        if (r["changelog_destination"] or {}).get("type") == "WEBHOOK"
    }
    wanted = [e for e in entity_events if urls.get((str(e.org_id), e.scope))]
    if not wanted:
        return 0
    await tx.execute(
        "INSERT INTO changelog_deliveries (org_id, blueprint, entity, event_key, url, body) "
        "SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], "
        "$6::jsonb[])",
        [e.org_id for e in wanted],
        [e.scope for e in wanted],
        [e.data["context"]["entityIdentifier"] for e in wanted],
        [e.key for e in wanted],
        [urls[(str(e.org_id), e.scope)] for e in wanted],
        [e.data for e in wanted],
    )
    return len(wanted)


async def claim(
    db: Database,
    lease: float,
    batch: int = BATCH,
    *,
    per_org: int | None = None,
    busy: dict[uuid.UUID, int] | None = None,
) -> list[asyncpg.Record]:
    """The oldest undelivered delivery of each entity that has one due (at most `batch`),
    claimed for `lease` seconds. Expired claims count as undelivered again. Orgs take
    turns: every org's oldest first, then every org's second, ...; with `per_org`, an org
    gets at most that many less what it has `busy` (in flight already)."""
    busy = busy or {}
    async with db.system() as tx:
        if tx.citus:
            return await _claim_org_by_org(tx, lease, batch, per_org, busy)
        return await tx.fetch(_CLAIM_SQL, batch, lease, list(busy), list(busy.values()), per_org)


# A delivery that may be sent now: pending and due, or claimed by a sender whose lease ran
# out.
_DUE = (
    "(d.state = 'pending' AND d.next_attempt_at <= now()"
    " OR d.state = 'sending' AND d.lease_until < now())"
)
# On Citus (_claim_org_by_org): each org's heads, up to $1 of them, across orgs in turns.
_CITUS_HEADS = (
    "SELECT h.org_id, h.id, h.turn FROM ("  # noqa: S608 - constants
    " SELECT d.org_id, d.id, row_number() OVER (PARTITION BY d.org_id ORDER BY d.id) AS turn"
    " FROM changelog_deliveries d"
    " WHERE d.state IN ('pending', 'sending') AND " + _DUE + " AND NOT EXISTS ("
    "  SELECT 1 FROM changelog_deliveries p"
    "  WHERE p.org_id = d.org_id AND p.blueprint = d.blueprint AND p.entity = d.entity"
    "  AND p.state IN ('pending', 'sending') AND p.id < d.id)) h"
    " WHERE h.turn <= $1"
)
_CITUS_LOCK = (
    "SELECT id FROM changelog_deliveries WHERE org_id = $1 AND id = ANY($2::bigint[])"
    " FOR UPDATE SKIP LOCKED"
)
_CITUS_TAKE = (
    "UPDATE changelog_deliveries d SET state = 'sending', attempts = attempts + 1,"  # noqa: S608 - constants
    " lease_until = now() + make_interval(secs => $3)"
    " WHERE d.org_id = $1 AND d.id = ANY($2::bigint[]) AND " + _DUE + " RETURNING d.*"
)


async def _claim_org_by_org(
    tx: Tx, lease: float, batch: int, per_org: int | None, busy: dict[uuid.UUID, int]
) -> list[asyncpg.Record]:
    """`claim` on Citus, which runs neither the recursive walk over orgs nor a lock in a
    statement that reaches several shards: the heads of every org are found first (no
    lock), turns and rooms applied here, then each org's are locked and claimed by
    statements routed to its shard, all in this transaction."""
    cap = batch if per_org is None else per_org
    heads = await tx.fetch(_CITUS_HEADS, cap)
    chosen = sorted(
        (h for h in heads if h["turn"] <= cap - busy.get(h["org_id"], 0)),
        key=lambda h: (h["turn"], h["id"]),
    )[:batch]
    by_org: dict[uuid.UUID, list[int]] = {}
    for head in chosen:
        by_org.setdefault(head["org_id"], []).append(head["id"])
    claimed: list[asyncpg.Record] = []
    for org_id, ids in by_org.items():
        locked = [r["id"] for r in await tx.fetch(_CITUS_LOCK, org_id, ids)]
        if locked:
            claimed += await tx.fetch(_CITUS_TAKE, org_id, locked, lease)
    return claimed


# Orgs with open deliveries (a loose scan of the open deliveries' index), then each org's
# oldest heads (at most its room: `per_org` less what it has in flight), walked in id order
# by the (org_id, id) index of open deliveries so a long backlog is not read whole; then
# turns across orgs, locked and claimed.
_CLAIM_SQL = (
    "WITH RECURSIVE orgs AS ("
    " (SELECT org_id FROM changelog_deliveries WHERE state IN ('pending', 'sending')"
    " ORDER BY org_id LIMIT 1)"
    " UNION ALL"
    " SELECT (SELECT d.org_id FROM changelog_deliveries d"
    "  WHERE d.state IN ('pending', 'sending') AND d.org_id > o.org_id ORDER BY d.org_id LIMIT 1)"
    " FROM orgs o WHERE o.org_id IS NOT NULL),"
    " room AS ("
    " SELECT b.org_id, b.n FROM unnest($3::uuid[], $4::int[]) AS b(org_id, n)),"
    " heads AS ("
    " SELECT h.org_id, h.id, row_number() OVER (PARTITION BY h.org_id ORDER BY h.id) AS turn"
    " FROM orgs o LEFT JOIN room r ON r.org_id = o.org_id"
    " CROSS JOIN LATERAL ("
    "  SELECT d.org_id, d.id FROM changelog_deliveries d"
    "  WHERE d.org_id = o.org_id AND d.state IN ('pending', 'sending')"
    "  AND (d.state = 'pending' AND d.next_attempt_at <= now()"
    "       OR d.state = 'sending' AND d.lease_until < now())"
    "  AND NOT EXISTS (SELECT 1 FROM changelog_deliveries p"
    "   WHERE p.org_id = d.org_id AND p.blueprint = d.blueprint"
    "   AND p.entity = d.entity AND p.state IN ('pending', 'sending') AND p.id < d.id)"
    "  ORDER BY d.id"
    "  LIMIT greatest(0, coalesce($5::int, $1::int) - coalesce(r.n, 0))) h"
    " WHERE o.org_id IS NOT NULL),"
    " chosen AS (SELECT org_id, id FROM heads ORDER BY turn, id LIMIT $1),"
    " locked AS ("
    " SELECT c.org_id, c.id FROM changelog_deliveries c"
    " WHERE (c.org_id, c.id) IN (SELECT org_id, id FROM chosen)"
    " FOR UPDATE SKIP LOCKED)"
    " UPDATE changelog_deliveries c SET state = 'sending', attempts = attempts + 1,"
    " lease_until = now() + make_interval(secs => $2)"
    " FROM locked WHERE c.org_id = locked.org_id AND c.id = locked.id"
    # Claimed meanwhile by another sender (its lease is live): not again.
    " AND (c.state = 'pending' AND c.next_attempt_at <= now()"
    "      OR c.state = 'sending' AND c.lease_until < now())"
    " RETURNING c.*"
)


async def _record(
    db: Database, row: asyncpg.Record, state: str, message: str, retry_in: float | None
) -> None:
    async with db.system() as tx:
        if tx.citus:
            # Citus refuses `now()` inside CASE in a write: the branches are chosen here
            # ($5, NULL when not retrying, is still named so its type is known).
            next_attempt = (
                "CASE WHEN $5::float8 IS NULL THEN next_attempt_at END"
                if retry_in is None
                else "now() + make_interval(secs => $5::float8)"
            )
            delivered = "now()" if state == "delivered" else "NULL"
            sql = (
                "UPDATE changelog_deliveries SET state = $3, last_error = $4, "  # noqa: S608 - constants
                f"lease_until = NULL, next_attempt_at = {next_attempt}, "
                f"delivered_at = {delivered} "
                "WHERE org_id = $1 AND id = $2 AND state = 'sending' AND attempts = $6"
            )
        else:
            sql = (
                "UPDATE changelog_deliveries SET state = $3, last_error = $4, lease_until = NULL, "
                "next_attempt_at = CASE WHEN $5::float8 IS NULL THEN next_attempt_at "
                "ELSE now() + make_interval(secs => $5) END, "
                "delivered_at = CASE WHEN $3::varchar = 'delivered' THEN now() END "
                "WHERE org_id = $1 AND id = $2 AND state = 'sending' AND attempts = $6"
            )
        await tx.execute(
            sql,
            row["org_id"],
            row["id"],
            state,
            message,
            retry_in,
            row["attempts"],
        )


async def send(settings: Settings, db: Database, row: asyncpg.Record) -> str:
    """Deliver one claimed row; its new state."""
    cipher = cipher_for(settings)
    async with db.system(row["org_id"]) as tx:
        bound = Tx(tx.conn, row["org_id"])
        signing = await secrets_service.signing_secret(bound, cipher)
    context = invokers.Context(
        run_id=f"chg_{row['id']}",
        signing_secret=signing,
        secrets={},
        allowed=Allowed.parse(settings.outbound_allow),
        github_api_url=settings.github_api_url,
        gitlab_api_url=settings.gitlab_api_url,
        timeout=settings.dispatch_timeout_seconds,
        inputs={},
    )
    method = {"type": "WEBHOOK", "url": row["url"], "body": row["body"], "synchronized": True}
    outcome = await invokers.invoke(method, context)
    if outcome.state == "success":
        state, retry_in = "delivered", None
    elif outcome.state == "retry" and row["attempts"] < settings.dispatch_max_attempts:
        state, retry_in = "pending", backoff(settings, row["attempts"], outcome.retry_after)
    else:
        state, retry_in = "failed", None
    await _record(db, row, state, outcome.message, retry_in)
    return state


class Sender:
    """The sender in a worker process: each claimed delivery is its own task; at most
    `changelog_org_concurrency` of an org's in flight and `changelog_concurrency` in all."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.in_flight: dict[asyncio.Task[str], uuid.UUID] = {}

    def busy(self) -> dict[uuid.UUID, int]:
        counts: dict[uuid.UUID, int] = {}
        for org_id in self.in_flight.values():
            counts[org_id] = counts.get(org_id, 0) + 1
        return counts

    async def step(self) -> bool:
        """Claims what the free slots allow and starts sending it; True when every slot
        was filled (more may be waiting)."""
        free = self.settings.changelog_concurrency - len(self.in_flight)
        if free <= 0:
            return False
        rows = await claim(
            self.db,
            self.settings.dispatch_lease_seconds,
            free,
            per_org=self.settings.changelog_org_concurrency,
            busy=self.busy(),
        )
        for row in rows:
            task = asyncio.create_task(self._send(row), name=f"changelog-{row['id']}")
            self.in_flight[task] = row["org_id"]
            task.add_done_callback(self._done)
        return len(rows) >= free

    async def _send(self, row: asyncpg.Record) -> str:
        try:
            return await send(self.settings, self.db, row)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Its lease runs out and it is claimed again.
            log.exception("changelog delivery %s failed", row["id"])
            return "error"

    def _done(self, task: asyncio.Task[str]) -> None:
        self.in_flight.pop(task, None)

    async def stop(self) -> None:
        """Cancels the deliveries in flight (their leases hand them back)."""
        tasks = list(self.in_flight)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class SenderLoop(PollingLoop):
    """The sender's polling loop; stopping it stops its deliveries in flight."""

    def __init__(self, sender: Sender) -> None:
        super().__init__("changelog delivery", sender.step, poll_seconds=POLL_SECONDS, log=log)
        self.sender = sender

    async def stop(self) -> None:
        await super().stop()
        await self.sender.stop()


def changelog_sender(settings: Settings, db: Database) -> SenderLoop:
    """The sender's loop in a worker process."""
    return SenderLoop(Sender(settings, db))
