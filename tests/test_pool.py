"""The connection pool: reuse, a hard size limit, waiters, and never reusing a bad connection."""

from __future__ import annotations

import asyncio

import pytest

from app.db.pool import ConnectionPool
from app.kit.errors import Unavailable


@pytest.fixture
async def pool(database_url: str):  # type: ignore[no-untyped-def]
    p = ConnectionPool(database_url, max_size=2, acquire_timeout=1.0)
    yield p
    await p.close()


async def test_a_released_connection_is_reused(pool: ConnectionPool) -> None:
    first = await pool.acquire()
    pool.release(first)
    second = await pool.acquire()
    pool.release(second)
    assert first is second and pool.size == 1


async def test_the_pool_never_opens_more_than_max_size(pool: ConnectionPool) -> None:
    a, b = await pool.acquire(), await pool.acquire()
    waiting = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0.05)
    assert not waiting.done() and pool.size == 2
    pool.release(a)
    assert await asyncio.wait_for(waiting, 1) is a
    pool.release(a)
    pool.release(b)


async def test_a_waiter_gives_up_with_unavailable(pool: ConnectionPool) -> None:
    a, b = await pool.acquire(), await pool.acquire()
    with pytest.raises(Unavailable):
        await pool.acquire()
    pool.release(a)
    pool.release(b)
    assert pool.stats()["waiting"] == 0


async def test_a_connection_left_in_a_transaction_is_closed_not_reused(
    pool: ConnectionPool,
) -> None:
    conn = await pool.acquire()
    await conn.execute("BEGIN")
    pool.release(conn)
    assert conn.is_closed() and pool.size == 0
    fresh = await pool.acquire()
    assert fresh is not conn and not fresh.is_in_transaction()
    pool.release(fresh)


async def test_a_closed_slot_lets_a_waiter_open_a_new_connection(pool: ConnectionPool) -> None:
    a, b = await pool.acquire(), await pool.acquire()
    waiting = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0.05)
    await a.close()
    pool.release(a)  # broken: discarded, and the waiter gets a fresh connection
    fresh = await asyncio.wait_for(waiting, 2)
    assert fresh is not a and await fresh.fetchval("SELECT 1") == 1
    pool.release(fresh)
    pool.release(b)


async def test_a_cancelled_waiter_does_not_leak_a_connection(pool: ConnectionPool) -> None:
    a, b = await pool.acquire(), await pool.acquire()
    waiting = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0.05)
    waiting.cancel()
    await asyncio.sleep(0)
    pool.release(a)
    assert pool.idle == 1
    pool.release(b)
    assert pool.idle == 2 and pool.stats()["waiting"] == 0


async def test_a_closed_pool_refuses_new_work(database_url: str) -> None:
    p = ConnectionPool(database_url, max_size=1)
    await p.close()
    with pytest.raises(Unavailable):
        await p.acquire()
