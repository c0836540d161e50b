"""Database upkeep the worker runs on a schedule (as the operator, never for a tenant)."""

from __future__ import annotations

import json
import logging
from typing import Any

from app.db.database import Database, Tx

log = logging.getLogger("portolan.maintenance")

# A table is re-analyzed once more than this many rows *and* this share of it changed since
# the last ANALYZE: it catches a bulk sync that grew a table (the planner would otherwise
# believe a 100k-row table empty and scan it for every upsert until autovacuum, up to a
# minute later, notices), while steady writes to a large table are left to autovacuum:
# analyzing under write load costs the database CPU that requests need.
MIN_CHANGED_ROWS = 500
CHANGED_SHARE = 0.2

# Held (advisory) by whatever maintenance changes a table's indexes or statistics, so they
# take turns: an ANALYZE inside a transaction and a CREATE INDEX CONCURRENTLY on the same
# table wait for each other (each for the other's lock or snapshot) and deadlock.
MAINTENANCE_LOCK = 0x706F72746F6C01


# On Citus a distributed table's rows, and so its activity counters, are in its shards
# on the nodes: each node's counters are read in one statement and added up by table.
_SHARD_STATS = (
    "SELECT coalesce(json_agg(json_build_array(relname, n_mod_since_analyze, n_live_tup)),"
    " '[]') FROM pg_stat_user_tables WHERE schemaname = 'public'"
)


async def _stale_distributed(tx: Tx, min_rows: int) -> tuple[list[str], set[int]]:
    """The distributed and reference tables whose shards changed enough since their last
    ANALYZE, over every node (the coordinator included, which may hold placements); and
    the shards' ids."""
    tables = {
        int(r["shardid"]): str(r["name"])
        for r in await tx.fetch(
            "SELECT shardid, logicalrelid::regclass::text AS name FROM pg_dist_shard"
        )
    }
    reports: list[Any] = [
        json.loads(str(r["result"]))  # each node's answer, as text
        for r in await tx.fetch(
            "SELECT result FROM run_command_on_workers($1) WHERE success", _SHARD_STATS
        )
    ]
    local = await tx.fetchval(_SHARD_STATS)  # the connection's codec may decode it
    reports.append(json.loads(local) if isinstance(local, str) else local)
    changed: dict[str, int] = {}
    live: dict[str, int] = {}
    for report in reports:
        for relname, mods, rows in report:
            shard = _shard_id(str(relname))
            name = tables.get(shard) if shard is not None else None
            if name is not None:
                changed[name] = changed.get(name, 0) + int(mods or 0)
                live[name] = live.get(name, 0) + int(rows or 0)
    return sorted(
        name for name, mods in changed.items() if mods > max(min_rows, CHANGED_SHARE * live[name])
    ), set(tables)


def _shard_id(relname: str) -> int | None:
    """The shard id a shard's relation name ends with (`entities_102008`), if any."""
    head, _, tail = relname.rpartition("_")
    return int(tail) if head and tail.isdigit() else None


async def analyze_stale_tables(db: Database, *, min_rows: int = MIN_CHANGED_ROWS) -> list[str]:
    async with db.system() as tx:
        if not await tx.fetchval("SELECT pg_try_advisory_xact_lock($1)", MAINTENANCE_LOCK):
            return []  # a range index is being built: next round
        rows = await tx.fetch(
            "SELECT relname FROM pg_stat_user_tables WHERE schemaname = 'public' "
            "AND n_mod_since_analyze > greatest($1::bigint, $2 * n_live_tup) ORDER BY relname",
            min_rows,
            CHANGED_SHARE,
        )
        names = [str(r["relname"]) for r in rows]
        if tx.citus:
            # ANALYZE of a distributed table is run on its shards by Citus; placements the
            # coordinator holds are counted with their table, not analyzed by their names.
            stale, shards = await _stale_distributed(tx, min_rows)
            local = [n for n in names if _shard_id(n) not in shards]
            names = sorted({*local, *stale})
        for name in names:
            # The name comes from the catalog, quoted as an identifier.
            await tx.execute(f'ANALYZE public."{name.replace(chr(34), chr(34) * 2)}"')
    if names:
        log.info("analyzed tables", extra={"tables": names})
    return names
