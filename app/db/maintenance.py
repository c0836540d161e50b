"""Database upkeep the worker runs on a schedule (as the operator, never for a tenant)."""

from __future__ import annotations

import logging

from app.db.database import Database

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
        for name in names:
            # The name comes from the catalog, quoted as an identifier.
            await tx.execute(f'ANALYZE public."{name.replace(chr(34), chr(34) * 2)}"')
    if names:
        log.info("analyzed tables", extra={"tables": names})
    return names
