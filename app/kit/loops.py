"""A worker's background loop: one step again and again, with a pause between steps and a
growing one after failures (logged). The event feed and the changelog sender run on it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

_BACKOFF_MAX = 5.0


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
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

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
