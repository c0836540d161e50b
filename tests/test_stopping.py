"""Stopping background work: a cancellation is never lost on its way, so whoever stops a
loop (a worker shutting down, a test ending) is never left waiting for it forever."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from arq.connections import RedisSettings, create_pool

from app.config import Settings
from app.db.database import Database
from app.dispatch import relay as relay_module
from app.kit.loops import cancel_and_wait


@pytest.mark.parametrize("turns", range(6))
async def test_a_relay_ends_when_cancelled_as_it_is_woken(
    settings: Settings, db: Database, turns: int
) -> None:
    """The relay idles on its wake-up event; a cancellation arriving in the turns just
    after the event is set (the wait has completed, the relay has not run yet) ends it.
    Python 3.11's wait_for returned normally there and the relay ran on for ever."""
    queue = f"portolan-test:stop-{time.monotonic_ns()}"
    relay = relay_module.Relay(settings.model_copy(update={"queue_name": queue}), db)
    relay.start()
    task = relay._task
    assert task is not None
    try:
        await asyncio.sleep(0.4)  # its first pass is done: it idles on the event
        relay._notified()
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.wait({task}, timeout=3.0)
        assert task.done(), f"the relay ran on after being cancelled ({turns} turns)"
    finally:
        await relay.stop()
        pool = await create_pool(RedisSettings.from_dsn(settings.redis_url or ""))
        await pool.delete(queue)
        await pool.aclose()


async def test_stopping_cancels_again_a_task_that_swallowed_its_cancellation(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from app.kit import loops

    monkeypatch.setattr(loops, "_STOP_PATIENCE", 0.1)
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                swallowed += 1
                if swallowed >= 3:
                    raise
                asyncio.current_task().uncancel()  # type: ignore[union-attr]

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING):
        async with asyncio.timeout(5):
            await cancel_and_wait(task, logging.getLogger("test"))
    assert task.cancelled() and swallowed == 3
    assert caplog.text.count("stubborn did not end when cancelled") == 2


async def test_stopping_a_task_that_failed_or_ended_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    for coro in (fails(), asyncio.sleep(0)):
        task = asyncio.create_task(coro)
        await asyncio.sleep(0.01)
        await cancel_and_wait(task, logging.getLogger("test"))
        assert task.done()
