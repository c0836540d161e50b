"""Citus: whether the database is a Citus cluster, and distributing the schema on it.

Every tenant table is distributed by `org_id`, all in one colocation group (an org's rows of
every table live on the same shard, so a tenant's statements and foreign keys stay on one
node); tables without an org (organizations, the event feed's cursors) are reference tables,
copied to every node. `portolan migrate` runs `distribute` after the migrations, so tables a
later migration adds are distributed the next time it runs (docs/scaling.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import asyncpg

from app.db.rls import APP_ROLE

CitusMode = Literal["auto", "on", "off"]
# Tables Portolan does not distribute at all (alembic's bookkeeping stays on the coordinator).
LOCAL_TABLES = frozenset({"alembic_version"})
DEFAULT_SHARD_COUNT = 32


class CitusMissing(RuntimeError):
    """PORTOLAN_CITUS=on but the database has no Citus extension."""


async def has_citus(conn: asyncpg.Connection) -> bool:
    return bool(
        await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')")
    )


async def citus_enabled(conn: asyncpg.Connection, mode: CitusMode) -> bool:
    """Whether Portolan runs in its Citus mode on this database."""
    if mode == "off":
        return False
    present = await has_citus(conn)
    if mode == "on" and not present:
        raise CitusMissing("PORTOLAN_CITUS=on, but the database has no citus extension")
    return present


@dataclass
class Distribution:
    reference: list[str] = field(default_factory=list)
    distributed: list[str] = field(default_factory=list)


async def _tables(conn: asyncpg.Connection) -> dict[str, bool]:
    """Public tables: name -> whether it is a tenant's (its primary key leads with org_id)."""
    rows = await conn.fetch(
        """
        SELECT c.relname AS name,
               COALESCE((SELECT a.attname = 'org_id'
                         FROM pg_constraint k
                         JOIN pg_attribute a ON a.attrelid = k.conrelid
                                            AND a.attnum = k.conkey[1]
                         WHERE k.conrelid = c.oid AND k.contype = 'p'), false) AS tenant
        FROM pg_class c
        WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')
        """
    )
    return {r["name"]: r["tenant"] for r in rows if r["name"] not in LOCAL_TABLES}


async def _dependencies(conn: asyncpg.Connection) -> dict[str, set[str]]:
    rows = await conn.fetch(
        """
        SELECT c.conrelid::regclass::text AS child, c.confrelid::regclass::text AS parent
        FROM pg_constraint c
        WHERE c.contype = 'f' AND c.connamespace = 'public'::regnamespace
          AND c.conrelid <> c.confrelid
        """
    )
    graph: dict[str, set[str]] = {}
    for row in rows:
        graph.setdefault(row["child"], set()).add(row["parent"])
    return graph


def _ordered(names: list[str], graph: dict[str, set[str]]) -> list[str]:
    """Referenced tables first (Citus distributes a table after those its keys point at)."""
    done: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for parent in sorted(graph.get(name, ())):
            if parent in names:
                visit(parent)
        done.append(name)

    for name in sorted(names):
        visit(name)
    return done


async def distribute(
    conn: asyncpg.Connection, *, shard_count: int = DEFAULT_SHARD_COUNT
) -> Distribution:
    """Make every Portolan table a Citus table; tables already distributed are left as they
    are, so running it again only takes what a later migration added."""
    database = await conn.fetchval("SELECT current_database()")
    # The audit log and run events are written by triggers; on a distributed table they
    # run on the shards, in the transaction of the change (Citus calls them unsafe
    # because a trigger may reach other shards: Portolan's write only their own org's
    # rows, which are colocated). Set for the database, so later DDL keeps working too.
    await conn.execute("SET citus.enable_unsafe_triggers = on")
    await conn.execute(f"SET citus.shard_count = {int(shard_count)}")
    # One connection per node: keys to reference tables are created in the same transaction.
    await conn.execute("SET citus.multi_shard_modify_mode = sequential")
    done = {
        r["name"]
        for r in await conn.fetch(
            "SELECT logicalrelid::regclass::text AS name FROM pg_dist_partition"
            " WHERE partmethod = 'h' OR repmodel = 't'"
        )
    }
    tables = await _tables(conn)
    # Citus takes no foreign key between a Citus table and a local one, so while tables
    # change kind one by one none can hold: the keys among Portolan's tables are taken
    # off, the tables distributed, and the keys put back (then checked across the shards).
    keys = await conn.fetch(
        """
        SELECT c.conrelid::regclass::text AS child, c.confrelid::regclass::text AS parent,
               c.conname AS name, pg_get_constraintdef(c.oid) AS definition
        FROM pg_constraint c
        WHERE c.contype = 'f' AND c.connamespace = 'public'::regnamespace
        ORDER BY c.conrelid::regclass::text, c.conname
        """
    )
    pending = [t for t in tables if t not in done]
    keys = [k for k in keys if k["child"] in pending or k["parent"] in pending]
    graph = await _dependencies(conn)
    for key in keys:
        await conn.execute(f'ALTER TABLE "{key["child"]}" DROP CONSTRAINT "{key["name"]}"')
    result = Distribution()
    await _prepare_nodes(conn, database)
    await _row_triggers(conn)
    for name in _ordered([n for n, tenant in tables.items() if not tenant], graph):
        if name not in done:
            await conn.execute("SELECT create_reference_table($1::regclass)", name)
            result.reference.append(name)
    anchor = await conn.fetchval(
        "SELECT logicalrelid::regclass::text FROM pg_dist_partition"
        " WHERE partmethod = 'h' ORDER BY logicalrelid::regclass::text LIMIT 1"
    )
    for name in _ordered([n for n, tenant in tables.items() if tenant], graph):
        if name in done:
            continue
        await conn.execute(
            "SELECT create_distributed_table($1::regclass, 'org_id', colocate_with => $2)",
            name,
            anchor or "none",
        )
        anchor = anchor or name
        result.distributed.append(name)
    for key in keys:
        await conn.execute(
            f'ALTER TABLE "{key["child"]}" ADD CONSTRAINT "{key["name"]}" {key["definition"]}'
        )
    return result


# Built-in functions the migrations mark LEAKPROOF (0005, 0006, 0029) so that searches under
# row-level security keep their indexes; the marks are catalog changes of each node, and a
# shard's query is planned by its worker.
_LEAKPROOF_BUILTINS = (
    "jsonb_contains(jsonb, jsonb)",
    "numeric_eq(numeric, numeric)",
    "numeric_ne(numeric, numeric)",
    "numeric_lt(numeric, numeric)",
    "numeric_le(numeric, numeric)",
    "numeric_gt(numeric, numeric)",
    "numeric_ge(numeric, numeric)",
    "textlike(text, text)",
    "jsonb_object_field_text(jsonb, text)",
)


async def _prepare_nodes(conn: asyncpg.Connection, database: str) -> None:
    """What the workers need beyond the tables (Citus propagates ALTER ROLE and ALTER
    DATABASE ... SET to every node)."""
    # The triggers (audit log, run events) run on the shards (see distribute); DDL run
    # later (migrations, range indexes) must accept them too.
    await conn.execute(f'ALTER DATABASE "{database}" SET citus.enable_unsafe_triggers = on')
    # Row-level security reads app.org_id on the worker that runs a shard's query: the
    # request's SET LOCALs go along with the transaction to every worker it reaches.
    await conn.execute(f'ALTER DATABASE "{database}" SET citus.propagate_set_commands = local')
    # Citus opens a worker connection as the current role: tenant work switches to the
    # app role (SET LOCAL ROLE), so that role must be able to log in to the workers.
    # Its password (or trust for it) is the operator's to configure (docs/scaling.md).
    await conn.execute(f"ALTER ROLE {APP_ROLE} LOGIN")
    marked = await conn.fetch(
        "SELECT p.oid::regprocedure::text AS name FROM pg_proc p"
        " WHERE p.proleakproof AND p.oid = ANY($1::regprocedure[])",
        list(_LEAKPROOF_BUILTINS),
    )
    for row in marked:
        await conn.execute(
            "SELECT run_command_on_workers($1)", f"ALTER FUNCTION {row['name']} LEAKPROOF"
        )


async def _row_triggers(conn: asyncpg.Connection) -> None:
    """Statement triggers with transition tables cannot run on a shard: the entity's
    scorecard results go with it through the per-row trigger of migration 0028."""
    if await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = 'entities'::regclass"
        " AND tgname = 'tr_entities_drop_scorecard_results')"
    ):
        await conn.execute("DROP TRIGGER tr_entities_drop_scorecard_results ON entities")
    await conn.execute(
        "CREATE OR REPLACE TRIGGER tr_entities_drop_entity_scorecard_results"
        " AFTER DELETE ON entities FOR EACH ROW"
        " EXECUTE FUNCTION portolan_drop_entity_scorecard_results()"
    )
