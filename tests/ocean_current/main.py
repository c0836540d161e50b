"""The suite's integration for current Ocean (port-ocean 0.56): clusters and the workloads on
them, read from a JSON file the test writes, and a `scale_workload` integration action.

`OCEAN__INTEGRATION__CONFIG__DATA_FILE` names the file (`{"clusters": [...], "workloads":
[...], "holdResyncSeconds": 0}`); `OCEAN__INTEGRATION__CONFIG__JOURNAL` a file that gets one
JSON line per resync of a kind and per step of an action run, for the test to count.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from port_ocean.context.ocean import ocean
from port_ocean.core.handlers.actions.abstract_executor import AbstractExecutor
from port_ocean.core.models import IntegrationRun


def _data() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(Path(ocean.integration_config["data_file"]).read_text())
    return data


def _journal(**line: Any) -> None:
    # One short append per line: whole lines, even when a process is killed mid-run.
    with Path(ocean.integration_config["journal"]).open("a") as journal:
        journal.write(json.dumps({"at": time.time(), **line}) + "\n")


def _journal_lines() -> list[dict[str, Any]]:
    path = Path(ocean.integration_config["journal"])
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@ocean.on_resync("cluster")
async def resync_clusters(kind: str) -> list[dict[str, Any]]:
    _journal(event="resync", kind=kind)
    return list(_data()["clusters"])


@ocean.on_resync("workload")
async def resync_workloads(kind: str) -> list[dict[str, Any]]:
    data = _data()
    _journal(event="resync", kind=kind)
    hold = float(data.get("holdResyncSeconds") or 0)
    if hold:
        # A slow source: the test stops Ocean while this resync is under way.
        _journal(event="holding", kind=kind)
        await asyncio.sleep(hold)
    return list(data["workloads"])


class ScaleWorkload(AbstractExecutor):
    """Runs of the `scale_workload` integration action: each step goes to the journal, the
    run gets a log line and is reported SUCCESS.

    `hangFirstClaim` makes the first claim of a run hang before Ocean acknowledges it (Ocean
    asks the executor about rate limits between claiming a run and acknowledging it), so
    the test can kill Ocean while it holds the run unacknowledged."""

    ACTION_NAME = "scale_workload"
    WEBHOOK_PROCESSOR_CLASS = None
    WEBHOOK_PATH = ""

    async def is_close_to_rate_limit(self, run: IntegrationRun) -> bool:
        earlier = [
            line
            for line in _journal_lines()
            if line["event"] == "claimed" and line.get("run") == run.id
        ]
        _journal(event="claimed", run=run.id, attempt=len(earlier) + 1)
        if run.execution_properties.get("hangFirstClaim") and not earlier:
            await asyncio.sleep(3600)
        return False

    async def get_remaining_seconds_until_rate_limit(self, run: IntegrationRun) -> float:
        return 0.0

    async def execute(self, run: IntegrationRun) -> None:
        props = run.execution_properties
        _journal(event="start", run=run.id, properties=props)
        workload, replicas = props["workload"], props["replicas"]
        await ocean.port_client.post_run_log(run, f"scaling {workload} to {replicas} replicas")
        _journal(event="done", run=run.id)
        await ocean.port_client.report_run_completed(
            run, success=True, message=f"{workload} scaled to {replicas}", should_raise=True
        )


ocean.register_action_executor(ScaleWorkload())
