"""The app as `portolan serve` runs it, plus one bare FastAPI route as the ceiling.

For looking into a figure (not used by the scenarios' own figures):
PORTOLAN_BENCH_TIMING=1 adds each answer's time in the server (`x-server-ms`, from the
request's arrival to its answer's head) and logs every stall of the event loop past 10 ms;
with PORTOLAN_BENCH_SLOW_CALLBACKS=1 too, asyncio's debug mode names each callback that ran
8 ms or more (debug mode slows everything down: its figures are not comparable).
PORTOLAN_BENCH_TRACE=<file> records every turn of the loop (bench/trace.py)."""

from __future__ import annotations

import os
import sys

import uvicorn

from app.config import get_settings
from app.kit.runtime import settle_heap
from app.kit.serving import loop_factory, protocol_for
from app.main import create_app

# As `portolan serve` runs it: with the in-process worker and its scheduled upkeep (unless a
# scenario times the worker's jobs itself).
settings = get_settings()
app = create_app(settings, with_worker=not os.environ.get("PORTOLAN_BENCH_NO_WORKER"))


if os.environ.get("PORTOLAN_BENCH_TRACE"):
    from bench import trace

    trace.install(os.environ["PORTOLAN_BENCH_TRACE"])
    app.middleware_stack = trace.wrap(app.build_middleware_stack())

if os.environ.get("PORTOLAN_BENCH_TIMING"):
    import asyncio
    import time

    from starlette.types import Message, Receive, Scope, Send

    inner = app.build_middleware_stack()

    async def lag() -> None:
        """The server's loop stalls past 10 ms, in the log (diagnosis only)."""
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            late = (time.perf_counter() - before) * 1000
            if late > 10:
                print(f"loop lag {late:.1f} ms at {time.time():.3f}", file=sys.stderr, flush=True)

    watching: list[asyncio.Task[None]] = []

    async def timed(scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        if not watching:
            loop = asyncio.get_running_loop()
            if os.environ.get("PORTOLAN_BENCH_SLOW_CALLBACKS"):
                loop.set_debug(True)
                loop.slow_callback_duration = 0.008
            watching.append(loop.create_task(lag()))

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                spent = f"{(time.perf_counter() - started) * 1000:.2f}".encode()
                message = {**message, "headers": [*message["headers"], (b"x-server-ms", spent)]}
            await send(message)

        await inner(scope, receive, sending)

    app.middleware_stack = timed  # type: ignore[assignment]


@app.get("/bench/bare", include_in_schema=False)
async def bare() -> dict[str, object]:
    return {"ok": True, "organization": {"id": "bare", "name": "bare"}}


if __name__ == "__main__":
    settle_heap()
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        log_config=None,
        access_log=False,
        log_level="warning",
        http=protocol_for(settings),
        loop=loop_factory(settings),
    )
