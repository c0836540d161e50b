"""A workflow run's progress as server-sent events, served by the live streams of
app/actions/streams.py (the same per-org cap, caller checks and polling).

Events, in the order things happened as far as one look can tell:

- `run` — the run (no node runs) when first seen and whenever its status, result or
  `waitingForInput` changes;
- `nodeRun` — a node run (as in `GET /v1/workflows/runs/{id}`, without its logs) when it
  first appears and whenever its status, result or `waitingForInput` changes;
- `log` — a node run's log line, `{id, nodeRunIdentifier, node, level, message,
  createdAt}`; its `id` is the event's id, so `Last-Event-ID` resumes after it;
- `end` — `{status, result}` once the run has ended and everything before was sent.

Node runs are taken in their order on the run's path; a node run's new logs come after its
first `nodeRun` event and before the event of its next change.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from app.actions import streams
from app.auth.principal import Principal
from app.db.database import Tx
from app.kit.errors import NotFound
from app.workflows import definitions, runs

LOG_PAGE = 200


async def opened(tx: Tx, principal: Principal, run_id: str) -> dict[str, Any]:
    """The version's definition of a run the caller may read (else 404, as for reading
    it), checked before the stream starts."""
    row = await tx.fetchrow(
        "SELECT * FROM workflow_runs WHERE org_id = $1 AND id = $2", tx.org_id, run_id
    )
    if row is None or not runs.readable(principal, row):
        raise NotFound(f"Workflow run {run_id!r} was not found")
    definition: dict[str, Any] = await tx.fetchval(
        "SELECT definition FROM workflow_versions WHERE org_id = $1 AND id = $2",
        tx.org_id,
        row["version_id"],
    )
    return definition or {}


class Follower:
    """What one stream has sent so far, and how to look for what is new."""

    def __init__(self, run_id: str, definition: dict[str, Any], after: int = 0) -> None:
        self.run_id = run_id
        self.definition = definition
        self.seen = after  # the last log id sent
        self.run_state: tuple[Any, ...] | None = None
        self.node_states: dict[str, tuple[Any, ...]] = {}

    async def look(self, tx: Tx) -> streams.Look:
        # Read committed: each statement sees at least what the one before saw. The run
        # first (so an ended run's last logs are read after it), then the logs, then the
        # node runs (so every log's node run is among them).
        run = await tx.fetchrow(
            "SELECT * FROM workflow_runs WHERE org_id = $1 AND id = $2", tx.org_id, self.run_id
        )
        if run is None:  # its org was deleted
            raise NotFound(f"Workflow run {self.run_id!r} was not found")
        logs = await tx.fetch(
            "SELECT l.id, l.node_run_id, l.level, l.message, l.created_at "
            "FROM workflow_node_run_logs l JOIN workflow_node_runs n "
            "ON n.org_id = l.org_id AND n.id = l.node_run_id "
            "WHERE l.org_id = $1 AND n.run_id = $2 AND l.id > $3 ORDER BY l.id LIMIT $4",
            tx.org_id,
            self.run_id,
            self.seen,
            LOG_PAGE,
        )
        node_runs = await tx.fetch(
            "SELECT * FROM workflow_node_runs WHERE org_id = $1 AND run_id = $2 ORDER BY seq",
            tx.org_id,
            self.run_id,
        )
        out = streams.Look(more=len(logs) == LOG_PAGE)
        by_node: dict[str, list[asyncpg.Record]] = {}
        for log in logs:
            by_node.setdefault(log["node_run_id"], []).append(log)
        waiting = False
        for node_run in node_runs:
            shown = self._node_run(node_run)
            state = (shown["status"], shown["result"], shown["waitingForInput"])
            waiting = waiting or bool(shown["waitingForInput"])
            first = node_run["id"] not in self.node_states
            if first:
                out.events.append(streams.event("nodeRun", shown))
            for log in by_node.get(node_run["id"], []):
                out.events.append(streams.event("log", _log(log, node_run), log["id"]))
            if not first and self.node_states[node_run["id"]] != state:
                out.events.append(streams.event("nodeRun", shown))
            self.node_states[node_run["id"]] = state
        if logs:
            self.seen = int(logs[-1]["id"])
        ended = run["status"] != "IN_PROGRESS"
        run_state = (run["status"], run["result"], waiting and not ended)
        if run_state != self.run_state:
            shown = {**runs.run_to_api(run), "waitingForInput": waiting and not ended}
            # The run opens the first look; later, its changes follow its node runs'.
            at = 0 if self.run_state is None else len(out.events)
            out.events.insert(at, streams.event("run", shown))
            self.run_state = run_state
        if ended and not out.more:
            out.events.append(
                streams.event("end", {"status": run["status"], "result": run["result"]})
            )
            out.ended = True
        return out

    def _node_run(self, row: asyncpg.Record) -> dict[str, Any]:
        shown = runs.node_run_to_api(row, definitions.node_of(self.definition, row["node"]), [])
        del shown["nodeRunLogs"]
        return shown


def _log(log: asyncpg.Record, node_run: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": str(log["id"]),
        "nodeRunIdentifier": log["node_run_id"],
        "node": {"identifier": node_run["node"]},
        "level": log["level"],
        "message": log["message"],
        "createdAt": log["created_at"],
    }
