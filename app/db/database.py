"""The runtime database: an asyncpg pool, and transactions bound to a tenant or the operator.

SQLAlchemy defines the tables (alembic, `alembic check`) and builds dynamic queries (Core);
statements run on asyncpg directly. Measured here, an async SQLAlchemy session costs about
0.75 ms of CPU per request transaction against 0.14 ms for the same work on asyncpg: the
difference between serving ~1,300 and ~5,800 tenant-bound reads per second on one core.
"""

from __future__ import annotations

import json
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pydantic_core
from sqlalchemy.dialects.postgresql import asyncpg as sa_asyncpg
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from app.config import Settings
from app.db.citus import citus_enabled
from app.db.pool import ConnectionPool
from app.db.rls import APP_ROLE, ORG_SETTING
from app.kit import fairloop
from app.kit.errors import Unauthorized

Query = str | ClauseElement
# Who is changing things in a transaction, for the audit log's triggers (migration 0014).
ACTOR_SETTING = "portolan.actor"
ORIGIN_SETTING = "portolan.origin"
ORG_TAG = "portolan/org/"  # + org id (hex): the application_name of a tenant transaction
_DIALECT = sa_asyncpg.dialect()  # type: ignore[no-untyped-call]


# Compiled Core statements by SQLAlchemy's cache key (the statement's structure without its
# values): a search compiles once per query shape, not once per request.
_COMPILED_SIZE = 2048
_compiled: OrderedDict[Any, SQLCompiler] = OrderedDict()


def compile_query(
    query: Query, args: Sequence[Any], values: Mapping[str, Any] | None = None
) -> tuple[str, Sequence[Any]]:
    """SQL text passes through; a SQLAlchemy Core statement compiles to `$n` SQL + values.
    `values`: values for the statement's named bind parameters (by name), for a statement
    built once and run with different values."""
    if isinstance(query, str):
        return query, args
    key = query._generate_cache_key()
    compiled = _compiled.get(key.key) if key is not None else None
    if compiled is None:
        fresh = query.compile(dialect=_DIALECT, cache_key=key)
        assert isinstance(fresh, SQLCompiler)
        if key is None or fresh.post_compile_params or fresh.literal_execute_params:
            # Values rendered into the SQL (expanding IN): compile for these values only.
            once = query.compile(dialect=_DIALECT, compile_kwargs={"render_postcompile": True})
            assert isinstance(once, SQLCompiler)
            bound = once.construct_params(params=values) or {}
            return once.string, [bound[name] for name in once.positiontup or []]
        compiled = _compiled[key.key] = fresh
        if len(_compiled) > _COMPILED_SIZE:
            _compiled.popitem(last=False)
    else:
        assert key is not None
        _compiled.move_to_end(key.key)
    params = compiled.construct_params(params=values, extracted_parameters=key.bindparams) or {}
    return compiled.string, [params[name] for name in compiled.positiontup or []]


class Compiled:
    """A Core statement compiled once and run many times with other values of its named
    bind parameters: no statement building, cache key or compiling per run (a streamed
    list runs one per page of 2,000). `reusable` is False when values are rendered into
    the SQL (expanding IN); run those through `compile_query`."""

    def __init__(self, query: ClauseElement) -> None:
        compiled = query.compile(dialect=_DIALECT)
        assert isinstance(compiled, SQLCompiler)
        self._compiled = compiled
        self.reusable = not (compiled.post_compile_params or compiled.literal_execute_params)

    def bind(self, values: Mapping[str, Any]) -> tuple[str, list[Any]]:
        """The SQL and its positional values (the statement's own values where `values`
        names none)."""
        params = self._compiled.construct_params(params=values) or {}
        return self._compiled.string, [params[name] for name in self._compiled.positiontup or []]


def _literal(value: str) -> str:
    """A string as an SQL literal (standard_conforming_strings: only quotes are special)."""
    if "\x00" in value:
        raise ValueError("NUL in a session setting")
    return "'" + value.replace("'", "''") + "'"


def _begin_sql(
    org_id: uuid.UUID | None,
    *,
    as_app_role: bool,
    org_tag: bool = True,
    generic_plans: bool = False,
    actor: str | None = None,
    origin: str | None = None,
    credential: tuple[str, int] | None = None,
    read_only: bool = False,
) -> str:
    # One simple-query round trip opens the transaction and binds it. The org id is a
    # parsed uuid.UUID rendered canonically; the actor and origin (read by the audit log's
    # triggers) are quoted literals.
    parts = ["BEGIN READ ONLY" if read_only else "BEGIN"]
    if as_app_role:
        parts.append(f"SET LOCAL ROLE {APP_ROLE}")
    if org_id is not None:
        parts.append(f"SET LOCAL {ORG_SETTING} = '{uuid.UUID(str(org_id))}'")
        if as_app_role and org_tag:
            # Bound by row-level security to this org's rows: named so, the event feed
            # holds back only this org's automations while the transaction runs.
            parts.append(f"SET LOCAL application_name = '{ORG_TAG}{uuid.UUID(str(org_id)).hex}'")
    if actor is not None:
        parts.append(f"SET LOCAL {ACTOR_SETTING} = {_literal(actor)}")
    if origin is not None:
        parts.append(f"SET LOCAL {ORIGIN_SETTING} = {_literal(origin)}")
    if generic_plans:
        parts.append("SET LOCAL plan_cache_mode = force_generic_plan")
    if credential is not None:
        # Checked in the same round trip: raises when the credential is gone or rotated.
        parts.append(_credential_check(*credential))
    return "; ".join(parts)


def _credential_check(client_id: str, issued_at: int) -> str:
    return f"SELECT portolan_credential_valid({_literal(client_id)}, {int(issued_at)})"


class Tx:
    """One open transaction. Services receive it, run statements, never commit.

    `citus`: the database is a Citus cluster (app/db/citus.py). The few statements Citus
    cannot route to the org's shard have a form of their own there; on a single
    PostgreSQL every statement is the same as without Citus."""

    __slots__ = ("citus", "conn", "org_id")

    def __init__(
        self, conn: asyncpg.Connection, org_id: uuid.UUID | None, *, citus: bool = False
    ) -> None:
        self.conn = conn
        self.org_id = org_id
        self.citus = citus

    async def fetch(self, query: Query, *args: Any) -> list[asyncpg.Record]:
        sql, values = compile_query(query, args)
        return list(await self.conn.fetch(sql, *values))

    async def fetchrow(self, query: Query, *args: Any) -> asyncpg.Record | None:
        sql, values = compile_query(query, args)
        return await self.conn.fetchrow(sql, *values)

    async def fetchval(self, query: Query, *args: Any) -> Any:
        sql, values = compile_query(query, args)
        return await self.conn.fetchval(sql, *values)

    async def execute(self, query: Query, *args: Any) -> str:
        sql, values = compile_query(query, args)
        return str(await self.conn.execute(sql, *values))

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self.conn.executemany(sql, rows)


def _encode_json(value: Any) -> str:
    # pydantic-core's encoder: ~6x faster than json.dumps on entity documents, which a bulk
    # write encodes three times each (properties, event before, event after).
    return pydantic_core.to_json(value).decode()


async def _init_connection(conn: asyncpg.Connection) -> None:
    for kind in ("json", "jsonb"):
        await conn.set_type_codec(
            kind, encoder=_encode_json, decoder=json.loads, schema="pg_catalog", format="text"
        )


class Database:
    def __init__(self, pool: ConnectionPool, *, citus: bool = False) -> None:
        self.pool = pool
        # On Citus (app/db/citus.py) the opening differs: see begin_tenant.
        self.citus = citus

    @classmethod
    async def connect(cls, settings: Settings) -> Database:
        if settings.database_url is None:
            raise RuntimeError("no database URL: start the embedded services first")
        pool = ConnectionPool(
            settings.database_url,
            max_size=settings.db_pool_size + settings.db_max_overflow,
            org_share=settings.db_org_share,
            init=_init_connection,
            server_settings={
                "application_name": "portolan",
                # Plan every execution with its real parameters: a generic plan cannot
                # tell `identifier = ANY($1)` over one key from one over thousands. Only
                # transactions that look up a handful of rows by key (single-entity
                # routes, see begin_tenant) use generic plans, which halves the database's
                # CPU per request there.
                "plan_cache_mode": "force_custom_plan",
                "statement_timeout": str(settings.statement_timeout_ms),
                # JIT compiles a query when its estimated cost is high; recursive walks and
                # aggregations over a tenant estimate high and paid 20-30 ms of compilation
                # for work that runs in a few milliseconds.
                "jit": "off",
            },
        )
        # Open one connection now, so a wrong URL fails at start-up, not on first request.
        conn = await pool.acquire()
        try:
            citus = await citus_enabled(conn, settings.citus)
        finally:
            pool.release(conn)
        return cls(pool, citus=citus)

    async def close(self) -> None:
        await self.pool.close()

    async def ping(self) -> None:
        conn = await self.pool.acquire()
        try:
            await conn.fetchval("SELECT 1")
        finally:
            self.pool.release(conn)

    async def begin_tenant(
        self,
        org_id: uuid.UUID,
        *,
        generic_plans: bool = False,
        actor: str | None = None,
        origin: str | None = None,
        credential: tuple[str, int] | None = None,
        read_only: bool = False,
    ) -> tuple[Tx, Any]:
        """Open a tenant transaction; the caller must `finish` it (used by the request
        dependency, which commits between the endpoint and the response).

        `generic_plans`: the transaction's statements reuse their cached generic plans
        instead of being planned again for each execution. Only for work that reaches a
        few rows through their keys, where a plan is the same whatever the values.
        `read_only`: PostgreSQL refuses any write in it (a read route's)."""
        fairloop.charge_to(org_id)  # the loop's turns of this work count for the org
        conn = await self.pool.acquire(org_id)
        try:
            if self.citus:
                # Citus replays a transaction's SET LOCALs on each worker it reaches by
                # sending the message that held them: the check must not be in it. Generic
                # plans are left out too (Citus plans a statement for its values: a generic
                # plan of a parameterized SQL function is one it cannot distribute). Nor the
                # org's tag: Citus sends the SET LOCALs to the workers, and a worker's
                # backend named otherwise is no longer one of Citus's own, so a transaction
                # that writes on two nodes could not commit ("cannot use 2PC in
                # transactions involving multiple servers").
                await conn.execute(
                    _begin_sql(
                        org_id,
                        as_app_role=True,
                        org_tag=False,
                        actor=actor,
                        origin=origin,
                        read_only=read_only,
                    )
                )
                if credential is not None:
                    await conn.execute(_credential_check(*credential))
            else:
                await conn.execute(
                    _begin_sql(
                        org_id,
                        as_app_role=True,
                        generic_plans=generic_plans,
                        actor=actor,
                        origin=origin,
                        credential=credential,
                        read_only=read_only,
                    )
                )
        except asyncpg.InvalidAuthorizationSpecificationError as exc:
            await self.finish(conn, commit=False)
            raise Unauthorized(
                "The credential was deleted, disabled or rotated", code="invalid_token"
            ) from exc
        except BaseException:
            self.pool.release(conn)
            raise
        return Tx(conn, org_id, citus=self.citus), conn

    async def finish(self, conn: asyncpg.Connection, *, commit: bool) -> None:
        try:
            await conn.execute("COMMIT" if commit else "ROLLBACK")
        finally:
            self.pool.release(conn)

    @asynccontextmanager
    async def tenant(
        self, org_id: uuid.UUID, *, actor: str | None = None, origin: str | None = None
    ) -> AsyncIterator[Tx]:
        """A unit of work as the app role with `org_id` bound: commit on success. `actor`
        and `origin`: who and where from, for the audit log (default: the system).
        The loop's turns of the work count for the org until the unit ends (a background
        loop that goes on to other work is no longer charged to it)."""
        mark = fairloop.current()
        try:
            tx, conn = await self.begin_tenant(org_id, actor=actor, origin=origin)
            ok = False
            try:
                yield tx
                ok = True
            finally:
                await self.finish(conn, commit=ok)
        finally:
            fairloop.restore(mark)

    @asynccontextmanager
    async def system(self, org_id: uuid.UUID | None = None) -> AsyncIterator[Tx]:
        """Operator work as the login role (org creation, maintenance). With `org_id`,
        app.org_id is bound too, so rows written pass the tenant policies' checks."""
        conn = await self.pool.acquire()
        ok = False
        try:
            await conn.execute(_begin_sql(org_id, as_app_role=False))
            try:
                yield Tx(conn, org_id, citus=self.citus)
                ok = True
            finally:
                await conn.execute("COMMIT" if ok else "ROLLBACK")
        finally:
            self.pool.release(conn)


async def bind_org(tx: Tx, org_id: uuid.UUID) -> None:
    """Bind app.org_id inside an open (system) transaction, e.g. for a new org's rows."""
    await tx.execute(f"SELECT set_config('{ORG_SETTING}', $1, true)", str(uuid.UUID(str(org_id))))
    tx.org_id = org_id
