"""The app as `portolan serve` runs it, plus one bare FastAPI route as the ceiling."""

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
