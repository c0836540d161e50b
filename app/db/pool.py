"""A small asyncpg connection pool shaped by how Portolan uses connections.

Every transaction ends in COMMIT or ROLLBACK and binds only transaction-local settings, so
a returned connection needs no reset, and releasing one can be a plain synchronous hand-off.
asyncpg's own pool resets each connection and releases it through `asyncio.shield` (a new
task per release); on a simple tenant-bound read that bookkeeping measured ~0.06 ms of the
~0.33 ms the request costs.

Connections are shared fairly between orgs: one org holds at most `org_share` of the
pool's connections (the rest stay for the others, however long its statements run), and
a connection that comes free goes to the waiting org that holds the fewest (in arrival
order within an org). Work of no org (operator work, the server's own upkeep) has no cap.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from app.kit import fairloop
from app.kit.errors import Unavailable

Init = Callable[[asyncpg.Connection], Awaitable[None]]

_REFUSED = (asyncpg.TooManyConnectionsError, asyncpg.CannotConnectNowError)
REFUSED_RETRY_AFTER_SECONDS = 2


class ConnectionPool:
    def __init__(
        self,
        dsn: str,
        *,
        max_size: int,
        init: Init | None = None,
        acquire_timeout: float = 30.0,
        max_idle_seconds: float = 300.0,
        server_settings: dict[str, str] | None = None,
        org_share: float = 1.0,
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self._dsn = dsn
        self._max_size = max_size
        self._init = init
        self._acquire_timeout = acquire_timeout
        self._max_idle = max_idle_seconds
        self._server_settings = server_settings or {}
        self._idle: list[tuple[asyncpg.Connection, float]] = []  # LIFO: warm ones first
        # Waiting acquirers by org (None: no org), each (arrival, future), in arrival order.
        self._waiters: dict[object, deque[tuple[int, asyncio.Future[asyncpg.Connection]]]] = {}
        self._arrivals = 0
        self._held: dict[object, int] = {}  # connections each org holds (or is being given)
        self._holder: dict[asyncpg.Connection, object] = {}
        self._org_cap = max(1, int(max_size * org_share))
        self._open = 0  # connections that exist or are being opened
        self._closed = False
        self._tasks: set[asyncio.Future[None]] = set()

    @property
    def size(self) -> int:
        return self._open

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def _connect(self) -> asyncpg.Connection:
        try:
            conn = await asyncpg.connect(self._dsn, server_settings=self._server_settings)
        except _REFUSED as exc:
            # PostgreSQL is there but takes no more connections now (53300 too many
            # clients, 57P03 starting up or shutting down): the client may try again.
            raise Unavailable(
                "The database takes no more connections right now; try again",
                retry_after=REFUSED_RETRY_AFTER_SECONDS,
            ) from exc
        try:
            if self._init is not None:
                await self._init(conn)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def acquire(self, org: object = None) -> asyncpg.Connection:
        """A connection for `org`'s work (None: work of no org)."""
        if self._closed:
            raise Unavailable("The database pool is closed")
        if not self._over_cap(org) and not self._waiting_before(org):
            now = time.monotonic()
            while self._idle:
                conn, since = self._idle.pop()
                if conn.is_closed() or now - since > self._max_idle:
                    self._discard(conn)
                    continue
                self._hold(conn, org)
                return conn
            if self._open < self._max_size:
                self._open += 1
                self._count(org, 1)
                try:
                    conn = await self._connect()
                except BaseException:
                    self._open -= 1
                    self._count(org, -1)
                    self._uncounted()
                    raise
                self._holder[conn] = org
                return conn
        waiter: asyncio.Future[asyncpg.Connection] = asyncio.get_running_loop().create_future()
        self._arrivals += 1
        entry = (self._arrivals, waiter)
        self._waiters.setdefault(org, deque()).append(entry)
        try:
            async with asyncio.timeout(self._acquire_timeout):
                return await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Handed a connection just as we gave up (cancelled): give it back.
                self.release(waiter.result())
            else:
                queue = self._waiters.get(org)
                if queue is not None and entry in queue:
                    queue.remove(entry)
                    if not queue:
                        del self._waiters[org]
            if isinstance(exc, TimeoutError):
                raise Unavailable("No database connection became free in time") from exc
            raise

    def release(self, conn: asyncpg.Connection) -> None:
        """Give a connection back. It must not be inside a transaction; one that is (a
        COMMIT/ROLLBACK that failed half-way) or that broke is closed, never reused."""
        self._count(self._holder.pop(conn, None), -1)
        if conn.is_closed() or conn.is_in_transaction() or self._closed:
            self._discard(conn)
            return
        while True:
            picked = self._next_waiter()
            if picked is None:
                break
            org, waiter = picked
            if not waiter.done():
                self._hold(conn, org)
                waiter.set_result(conn)
                return
        self._idle.append((conn, time.monotonic()))

    def _over_cap(self, org: object) -> bool:
        return org is not None and self._held.get(org, 0) >= self._org_cap

    def _waiting_before(self, org: object) -> bool:
        """Someone who may be served is already waiting (a newcomer goes behind them)."""
        return any(not self._over_cap(o) for o in self._waiters)

    def _count(self, org: object, delta: int) -> None:
        if org is None:
            return
        held = self._held.get(org, 0) + delta
        if held > 0:
            self._held[org] = held
        else:
            self._held.pop(org, None)

    def _hold(self, conn: asyncpg.Connection, org: object) -> None:
        self._holder[conn] = org
        self._count(org, 1)

    def _next_waiter(self) -> tuple[object, asyncio.Future[asyncpg.Connection]] | None:
        """The waiting org under its cap that holds the fewest connections (the earliest
        arrival among equals), and its first waiter; dropped waiters are skipped."""
        best: object = None
        best_key: tuple[int, int] | None = None
        for org, queue in list(self._waiters.items()):
            while queue and queue[0][1].done():
                queue.popleft()
            if not queue:
                del self._waiters[org]
                continue
            if self._over_cap(org):
                continue
            key = (self._held.get(org, 0), queue[0][0])
            if best_key is None or key < best_key:
                best, best_key = org, key
        if best_key is None:
            return None
        queue = self._waiters[best]
        _, waiter = queue.popleft()
        if not queue:
            del self._waiters[best]
        return best, waiter

    def _discard(self, conn: asyncpg.Connection) -> None:
        self._open -= 1
        if not conn.is_closed():
            conn.terminate()
        self._wake_one_to_connect()

    def _uncounted(self) -> None:
        """A connection being opened for an org failed: a slot opened up, and the org's
        waiters queued over its cap may be under it now and take an idle connection."""
        for _ in range(len(self._idle)):
            if not self._waiting_before(None):
                break
            conn, _since = self._idle.pop()
            self.release(conn)  # to the waiter it is due to (or back to the idle ones)
        self._wake_one_to_connect()

    def _wake_one_to_connect(self) -> None:
        # A slot opened up: a waiter may now open a connection of its own.
        while self._open < self._max_size:
            picked = self._next_waiter()
            if picked is None:
                return
            org, waiter = picked
            if waiter.done():
                continue
            self._open += 1
            self._count(org, 1)
            # The release that freed the slot may be another org's work: the connection
            # is opened as the waiter's, in its turns (app/kit/fairloop.py).
            task = asyncio.get_running_loop().create_task(
                self._connect_for(waiter, org), context=fairloop.context_for(org)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return

    async def _connect_for(self, waiter: asyncio.Future[asyncpg.Connection], org: object) -> None:
        try:
            conn = await self._connect()
        except BaseException as exc:
            self._open -= 1
            self._count(org, -1)
            if not waiter.done():
                waiter.set_exception(exc)
            self._uncounted()
            return
        self._holder[conn] = org
        if waiter.done():
            self.release(conn)
        else:
            waiter.set_result(conn)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn, _ in idle:
            self._open -= 1
            await conn.close()
        waiting, self._waiters = self._waiters, {}
        for queue in waiting.values():
            for _, waiter in queue:
                if not waiter.done():
                    waiter.set_exception(Unavailable("The database pool is closed"))

    def stats(self) -> dict[str, Any]:
        waiting = sum(len(queue) for queue in self._waiters.values())
        return {"open": self._open, "idle": len(self._idle), "waiting": waiting}
