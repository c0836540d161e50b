"""`make bench`: run every scenario; exit 1 if any misses its target."""

from __future__ import annotations

import asyncio
import importlib
import sys

SCENARIOS = [
    "bench.org_read",
    "bench.catalog_bulk",
    "bench.migrations",
    "bench.search",
    "bench.reads",
    "bench.datasource",
    "bench.history",
    "bench.over_time",
    "bench.dashboards",
    "bench.scorecards",
    "bench.dispatch",
    "bench.workflows",
    "bench.events",
    "bench.noisy",
]


async def main(names: list[str]) -> int:
    failed = []
    for name in names:
        module = importlib.import_module(name)
        print(f"== {name}: {module.__doc__.strip().splitlines()[0] if module.__doc__ else ''}")
        if not await module.run():
            failed.append(name)
    if failed:
        print(f"missed target: {', '.join(failed)}")
        return 1
    print("all scenarios met their targets")
    return 0


if __name__ == "__main__":
    chosen = [f"bench.{n}" for n in sys.argv[1:]] or SCENARIOS
    sys.exit(asyncio.run(main(chosen)))
