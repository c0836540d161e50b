"""Edge cases of the fair turns (app/kit/fairloop.py) and the pool's per-org shares
(app/db/pool.py): no org starved by work of no org, socket reads counted for no org
whoever opened the socket, no idle time charged, pool counts back to empty after errors."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
import uuid
from typing import Any

import pytest

from app.db.pool import ConnectionPool
from app.kit import fairloop
from app.kit.errors import Unavailable


def _run_fair(coro_fn, *args):  # type: ignore[no-untyped-def]
    loop = fairloop.new_loop()
    try:
        return loop.run_until_complete(coro_fn(*args))
    finally:
        loop.close()


def test_work_of_no_org_yielding_in_a_loop_does_not_starve_the_orgs() -> None:
    """A task of no org that yields with sleep(0) goes first in each pass, once: the
    callbacks it schedules wait for the next pass, as every other callback's do."""

    async def main() -> float:
        stop = asyncio.Event()

        async def upkeep() -> None:  # no org: e.g. a chunked job of the server's own
            deadline = time.monotonic() + 2.0
            while not stop.is_set() and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0)

        async def org_work() -> float:
            fairloop.charge_to("a")
            began = time.monotonic()
            for _ in range(20):
                await asyncio.sleep(0)
            stop.set()
            return time.monotonic() - began

        background = asyncio.create_task(upkeep(), context=contextvars.Context())
        await asyncio.sleep(0.01)
        took = await asyncio.create_task(org_work(), context=contextvars.Context())
        await background
        return took

    took = _run_fair(main)
    assert took < 0.5, f"the org's 20 steps took {took:.2f} s behind work of no org"


def test_a_socket_opened_for_an_org_is_read_as_work_of_no_org() -> None:
    """A pooled connection is opened by whichever org's work needed it first, then serves
    every org: its reads must not be counted for (and queued behind) the opener's org."""

    async def main() -> object:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        async def opener() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            fairloop.charge_to("a")
            return await asyncio.open_connection("127.0.0.1", port)

        _reader, writer = await asyncio.create_task(opener(), context=contextvars.Context())
        await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        key = loop._selector.get_key(writer.get_extra_info("socket").fileno())  # type: ignore[attr-defined]
        handle = key.data[0]  # the reader's handle, run each time the socket is readable
        org = fairloop._org_of(handle)
        writer.close()
        server.close()
        await server.wait_closed()
        return org

    assert _run_fair(main) is None


def test_time_the_loop_is_stopped_is_charged_to_no_org() -> None:
    """The callback that stops the loop is charged when it ends, not when the loop runs
    again: the time in between is no org's."""
    loop = fairloop.new_loop()
    try:

        async def step() -> None:
            fairloop.charge_to("a")
            await asyncio.sleep(0)  # the step after this one is a's
            asyncio.get_running_loop().stop()

        task = loop.create_task(step(), context=contextvars.Context())
        loop.run_forever()
        assert task.done()
        time.sleep(0.2)  # the loop is not running: no org's callback is
        loop.run_until_complete(asyncio.sleep(0))
        spent = loop._ready._spent.get("a", 0.0)  # type: ignore[attr-defined]
    finally:
        loop.close()
    assert spent < 0.05, f"org a was charged {spent:.3f} s"


@pytest.fixture
async def shared(database_url: str):  # type: ignore[no-untyped-def]
    p = ConnectionPool(database_url, max_size=4, acquire_timeout=1.0, org_share=0.5)
    yield p
    await p.close()


async def test_pool_counts_return_to_empty_after_error_paths(shared: ConnectionPool) -> None:
    # A connection broken while held.
    a = await shared.acquire("a")
    a.terminate()
    shared.release(a)
    # A connection released inside a transaction.
    b = await shared.acquire("b")
    await b.execute("BEGIN")
    shared.release(b)
    # A waiter cancelled while over its org's cap.
    one, two = await shared.acquire("a"), await shared.acquire("a")
    waiting = asyncio.create_task(shared.acquire("a"))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    # A waiter handed a connection in the same turn it is cancelled.
    waiting = asyncio.create_task(shared.acquire("a"))
    await asyncio.sleep(0.05)
    shared.release(one)
    waiting.cancel()
    try:
        got = await waiting
    except asyncio.CancelledError:
        pass
    else:
        shared.release(got)
    # A waiter that times out.
    three = await shared.acquire("a")
    with pytest.raises(Unavailable):
        await shared.acquire("a")
    shared.release(two)
    shared.release(three)
    # An acquire cancelled while it opens a connection.
    taken = [await shared.acquire(None) for _ in range(shared.idle)]  # none idle now
    connecting = asyncio.create_task(shared.acquire("c"))
    await asyncio.sleep(0)
    connecting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await connecting
    for conn in taken:
        shared.release(conn)
    await asyncio.sleep(0.1)
    assert shared._held == {} and shared._holder == {}, (shared._held, shared._holder)
    assert shared.size == shared.idle


async def test_a_connection_opened_for_a_waiter_counts_for_the_waiters_org(
    database_url: str,
) -> None:
    """The release that frees a slot may be another org's: the connection opened for the
    waiter is the waiter's org's work, not queued in (and charged to) the releaser's turn."""
    seen: list[object] = []

    async def init(conn: object) -> None:
        slot = fairloop.TENANT.get()
        seen.append(None if slot is None else slot.org)

    pool = ConnectionPool(database_url, max_size=1, acquire_timeout=2.0, init=init)
    try:

        async def as_b() -> None:
            fairloop.charge_to("b")
            conn = await pool.acquire("b")
            waiting = asyncio.create_task(waiter(), context=contextvars.Context())
            await asyncio.sleep(0.05)
            conn.terminate()  # broken while b holds it: the slot opens for c's waiter
            pool.release(conn)
            await waiting

        async def waiter() -> None:
            fairloop.charge_to("c")
            pool.release(await pool.acquire("c"))

        await asyncio.create_task(as_b(), context=contextvars.Context())
    finally:
        await pool.close()
    assert seen == ["b", "c"], seen


async def test_a_waiter_back_under_its_cap_takes_an_idle_connection(database_url: str) -> None:
    """A connection being opened for a waiter counts for its org; when opening it fails, the
    org's next waiter (queued over the cap meanwhile) takes a connection that is idle."""
    pool = ConnectionPool(database_url, max_size=2, acquire_timeout=1.0, org_share=0.5)
    try:
        one, two = await pool.acquire(None), await pool.acquire(None)
        first = asyncio.create_task(pool.acquire("a"))
        second = asyncio.create_task(pool.acquire("a"))
        await asyncio.sleep(0.05)
        gate = asyncio.Event()

        async def refused() -> object:
            await gate.wait()
            raise OSError("refused")

        pool._connect = refused  # type: ignore[assignment,method-assign]
        one.terminate()
        pool.release(one)  # the slot goes to a's first waiter: a connection is opened
        await asyncio.sleep(0)
        pool.release(two)  # a is at its cap (one being opened): this one stays idle
        assert pool.idle == 1
        gate.set()
        with pytest.raises(OSError):
            await first
        got = await asyncio.wait_for(second, 0.5)
        pool.release(got)
        assert pool._held == {} and pool._holder == {}
    finally:
        await pool.close()


async def test_a_job_left_by_a_dead_worker_starts_about_a_second_after_its_mark_expires(
    servers: Any,
) -> None:
    """The worker skips a job found running elsewhere for a second, not until it ends: a
    job whose worker died is taken soon after its in-progress mark expires."""
    from arq.connections import RedisSettings, create_pool
    from arq.constants import in_progress_key_prefix
    from arq.worker import func

    from app.worker import _Worker

    started = asyncio.Event()

    async def job(ctx: dict[str, Any]) -> None:
        started.set()

    queue, job_id = f"portolan-test:{uuid.uuid4().hex}", uuid.uuid4().hex
    redis = await create_pool(RedisSettings.from_dsn(servers.redis_url))
    try:
        await redis.enqueue_job("job", _job_id=job_id, _queue_name=queue)
        await redis.psetex(in_progress_key_prefix + job_id, 500, b"1")  # its worker died
        worker = _Worker(
            functions=[func(job, name="job")],
            redis_pool=redis,
            queue_name=queue,
            poll_delay=0.02,
            handle_signals=False,
        )
        began = time.monotonic()
        running = asyncio.create_task(worker.main())
        try:
            await asyncio.wait_for(started.wait(), 3.0)
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
        took = time.monotonic() - began
    finally:
        await redis.aclose()
    assert 0.5 <= took < 1.8, took
