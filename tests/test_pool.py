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


@pytest.fixture
async def shared(database_url: str):  # type: ignore[no-untyped-def]
    p = ConnectionPool(database_url, max_size=4, acquire_timeout=1.0, org_share=0.5)
    yield p
    await p.close()


async def test_one_org_holds_at_most_its_share(shared: ConnectionPool) -> None:
    """B holding its share (long statements, a burst) leaves connections for A."""
    b1, b2 = await shared.acquire("b"), await shared.acquire("b")
    b3 = asyncio.create_task(shared.acquire("b"))
    await asyncio.sleep(0.05)
    assert not b3.done()  # over its share: it waits though the pool could open more
    a = await asyncio.wait_for(shared.acquire("a"), 0.5)  # A is not behind B's waiter
    assert shared.size == 3
    shared.release(b1)
    assert await asyncio.wait_for(b3, 1) is b1  # B's turn once it is under its share
    for conn in (a, b2, b1):
        shared.release(conn)
    assert shared.stats()["waiting"] == 0


async def test_a_freed_connection_goes_to_the_org_holding_the_fewest(
    shared: ConnectionPool,
) -> None:
    """The pool is full: B's waiters came first, A's after; the next connection is A's."""
    b1, b2 = await shared.acquire("b"), await shared.acquire("b")
    c1, c2 = await shared.acquire(None), await shared.acquire(None)  # work of no org
    b_waiting = asyncio.create_task(shared.acquire("b"))
    await asyncio.sleep(0.02)
    a_waiting = asyncio.create_task(shared.acquire("a"))
    await asyncio.sleep(0.02)
    shared.release(c1)
    a = await asyncio.wait_for(a_waiting, 1)
    assert a is c1 and not b_waiting.done()
    shared.release(a)
    shared.release(b1)
    assert await asyncio.wait_for(b_waiting, 1) in (a, b1)
    for conn in (b2, c2):
        shared.release(conn)


async def test_a_waiter_that_gave_up_is_skipped_and_counts_are_kept(
    shared: ConnectionPool,
) -> None:
    held = [await shared.acquire(org) for org in ("a", "a", "b", "b")]
    with pytest.raises(Unavailable):
        await shared.acquire("c")  # timed out: dropped from the queue
    later = asyncio.create_task(shared.acquire("a"))
    await asyncio.sleep(0.02)
    shared.release(held[2])  # B's: A is at its share, so the connection stays idle
    await asyncio.sleep(0.02)
    assert not later.done() and shared.idle == 1
    shared.release(held[0])  # A is under its share again: its waiter gets one
    assert await asyncio.wait_for(later, 1) in (held[0], held[2])
    assert shared.stats()["waiting"] == 0
