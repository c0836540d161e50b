"""A worker's background loop: one step again and again, with a pause between steps and a
growing one after failures (logged). The event feed and the changelog sender run on it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

_BACKOFF_MAX = 5.0
_STOP_PATIENCE = 5.0


async def cancel_and_wait(task: asyncio.Task[Any], log: logging.Logger) -> None:
    """Cancel a background task and wait until it has ended, whatever it raises.

    A cancellation can be lost on its way (code that catches it, or completes an await in
    the same turn and carries on): a task still running after `_STOP_PATIENCE` seconds is
    cancelled again, and again, so whoever stops it is never left waiting forever."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=_STOP_PATIENCE)
        if not task.done():
            log.warning("%s did not end when cancelled; cancelling it again", task.get_name())
    if not task.cancelled():
        with contextlib.suppress(BaseException):
            task.result()


class PollingLoop:
    """`step` returns True when more work is waiting (the next step starts at once)."""

    def __init__(
        self,
        name: str,
        step: Callable[[], Awaitable[bool]],
        *,
        poll_seconds: float,
        log: logging.Logger,
    ) -> None:
        self._name = name
        self._step = step
        self._poll = poll_seconds
        self._log = log
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task, self._log)

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                more = await self._step()
                failures = 0
                wait = 0.0 if more else self._poll
            except asyncio.CancelledError:
                raise
            except Exception:
                failures += 1
                wait = min(_BACKOFF_MAX, self._poll * 2**failures)
                self._log.exception("%s failed; again in %.1f s", self._name, wait)
            await asyncio.sleep(wait)
