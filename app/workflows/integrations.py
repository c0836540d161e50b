"""INTEGRATION_ACTION nodes: node runs an installed integration claims, runs and reports on
(Port's pull model, as Ocean's actions processor drives it).

- The worker renders the node's `integrationActionExecutionProperties` over the run's data
  (in the jq sandbox, with no secret: definitions naming one are refused) and leaves the
  node run `claimable` by its installation, holding nothing (app/workflows/engine.py).
- **Claim** (`POST /v1/workflows/runs/claim-pending`): up to `limit` of the installation's
  claimable node runs, oldest first, are taken with `FOR UPDATE SKIP LOCKED` and marked
  `claimed` until the visibility timeout. A claim whose lease ran out without an
  acknowledgement is claimable again. `exclude` names node uids (`<workflow>/<node>`) the
  integration has no room for now.
- **Acknowledge** (`PATCH /v1/workflows/runs/ack`): the first acknowledgement, by the
  credential holding the latest claim, makes the node run `acknowledged`; any other is a
  409 (Ocean reads it as "already being processed").
- **Report** (`PATCH /v1/workflows/nodes/runs/{id}`): while in progress the integration sets
  `externalRunId`, `links`, `statusLabel` and `output`; `status: COMPLETED` with a `result`
  records the outcome and queues the node run once more, so the worker applies the node's
  `variables` (jq, in the sandbox, never in a request) and moves the run on in the same
  transaction as any other node's end. Logs: `POST /v1/workflows/nodes/runs/{id}/logs`.
- **Find** (`GET /v1/workflows/nodes/runs?external_run_id=`): the node run an integration
  started an external run for (Ocean's workflow-status reporting looks it up so).

Only machine credentials that may claim the installation's work (Admins' and the
integration's own, as for action runs) use these routes; people read node runs through the
run routes.
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from app.actions import claims
from app.auth import permissions
from app.auth.principal import Principal, Tenant
from app.db.database import Tx
from app.kit.errors import Conflict, Invalid, NotFound
from app.workflows import runs

MAX_LOGS = 100  # log lines of one call
MAX_LOG_MESSAGE = 10_000
MAX_LINKS = 3
LEVELS = {
    "INFO": "INFO",
    "WARN": "WARNING",
    "WARNING": "WARNING",
    "ERROR": "ERROR",
    "DEBUG": "DEBUG",
}
RESULTS = ("SUCCESS", "FAILED", "CANCELLED")
_REPORT_FIELDS = frozenset(("status", "result", "output", "statusLabel", "externalRunId", "links"))

_CLAIM = """
WITH picked AS (
    SELECT n.org_id, n.id FROM workflow_node_runs n
    JOIN workflow_runs r ON r.org_id = n.org_id AND r.id = n.run_id
    WHERE n.org_id = $1 AND n.installation_id = $2 AND n.status = 'IN_PROGRESS'
      AND r.status = 'IN_PROGRESS'
      AND (n.state = 'claimable' OR (n.state = 'claimed' AND n.lease_until <= now()))
      AND NOT (r.workflow || '/' || n.node = ANY($3::text[]))
    ORDER BY n.created_at, n.id
    LIMIT $4
    FOR UPDATE OF n SKIP LOCKED
)
UPDATE workflow_node_runs n SET state = 'claimed', claim = $5,
    lease_until = now() + make_interval(secs => $6), claimed_by = $7, updated_at = now()
FROM picked WHERE n.org_id = picked.org_id AND n.id = picked.id
RETURNING n.id
"""

_SELECT = (
    "SELECT n.*, r.workflow FROM workflow_node_runs n "
    "JOIN workflow_runs r ON r.org_id = n.org_id AND r.id = n.run_id"
)


def to_ocean(row: asyncpg.Record, *, node_config: bool = True) -> dict[str, Any]:
    """A node run as an integration receives it (Ocean's WorkflowNodeRun)."""
    out: dict[str, Any] = {
        "identifier": row["id"],
        "nodeUid": f"{row['workflow']}/{row['node']}",
        "status": row["status"],
        "result": row["result"] if row["status"] == "COMPLETED" else None,
        "config": row["invocation"],
        "output": row["output"] if isinstance(row["output"], dict) else {},
        "externalRunId": row["external_run_id"],
        "workflowRun": {"identifier": row["run_id"]},
    }
    if node_config:
        out["node"] = {"identifier": row["node"], "config": row["invocation"]}
    return out


def claimer(tenant: Tenant) -> Principal:
    """The caller, when it is a machine credential (people read node runs through the run
    routes); which installations it may act for is checked per node run."""
    if tenant.principal.kind != "app":
        raise permissions.Denied(
            "integrations.manage",
            "workflow node runs of integrations",
            " (used by integrations' machine credentials)",
        )
    return tenant.principal


async def _authorize(tx: Tx, principal: Principal, installation: str) -> None:
    creator = await claims.integration_creator(tx, installation)
    if not claims.may_claim(principal, creator):
        raise claims.claim_denied(installation)


async def claim(
    tx: Tx,
    principal: Principal,
    installation: str,
    *,
    limit: int,
    visibility_seconds: float,
    exclude: list[str],
) -> list[dict[str, Any]]:
    creator = await claims.integration_creator(tx, installation)
    if not claims.may_claim(principal, creator):
        raise claims.claim_denied(installation)
    if creator is None:
        raise NotFound(f"Integration {installation!r} was not found", code="integration_not_found")
    ids = await tx.fetch(
        _CLAIM,
        tx.org_id,
        installation,
        exclude,
        limit,
        uuid.uuid4(),
        visibility_seconds,
        principal.subject,
    )
    if not ids:
        return []
    rows = await tx.fetch(
        _SELECT + " WHERE n.org_id = $1 AND n.id = ANY($2::text[]) ORDER BY n.created_at, n.id",
        tx.org_id,
        [r["id"] for r in ids],
    )
    for row in rows:
        await runs.node_log(tx, row["id"], f"Claimed by integration {installation!r}")
    return [to_ocean(row) for row in rows]


async def _node_run(tx: Tx, principal: Principal, node_run_id: str) -> asyncpg.Record:
    """The integration node run, locked (after its run, the order cancelling takes)."""
    found = await tx.fetchrow(
        "SELECT run_id, installation_id FROM workflow_node_runs WHERE org_id = $1 AND id = $2",
        tx.org_id,
        node_run_id,
    )
    if found is None:
        raise NotFound(f"Workflow node run {node_run_id!r} was not found")
    if found["installation_id"] is None:
        permissions.require(principal, "integrations.manage")
        raise Invalid(
            f"Workflow node run {node_run_id!r} is not run by an integration "
            "(only INTEGRATION_ACTION node runs are claimed and reported on)",
            code="not_integration_action",
        )
    await _authorize(tx, principal, found["installation_id"])
    await tx.fetchrow(
        "SELECT id FROM workflow_runs WHERE org_id = $1 AND id = $2 FOR UPDATE",
        tx.org_id,
        found["run_id"],
    )
    row = await tx.fetchrow(
        _SELECT + " WHERE n.org_id = $1 AND n.id = $2 FOR UPDATE OF n", tx.org_id, node_run_id
    )
    assert row is not None
    return row


def _ended(row: asyncpg.Record) -> Conflict:
    return Conflict(
        f"Workflow node run {row['id']!r} has ended ({row['result']})", code="node_run_ended"
    )


async def acknowledge(tx: Tx, principal: Principal, node_run_id: str) -> dict[str, Any]:
    row = await _node_run(tx, principal, node_run_id)
    if row["status"] != "IN_PROGRESS":
        raise _ended(row)
    state = row["state"]
    if state == "acknowledged" or (state == "queued" and row["result"] is not None):
        raise Conflict(
            f"Workflow node run {node_run_id!r} was already acknowledged",
            code="run_already_acknowledged",
        )
    if state != "claimed":
        raise Conflict(
            f"Workflow node run {node_run_id!r} is not claimed: claim it (claim-pending) first",
            code="run_not_claimed",
        )
    if row["claimed_by"] != principal.subject:
        raise Conflict(
            f"Workflow node run {node_run_id!r} is claimed by another credential (this claim "
            "expired and the node run was claimed again)",
            code="run_claimed_by_another",
        )
    await tx.execute(
        "UPDATE workflow_node_runs SET state = 'acknowledged', claim = NULL, lease_until = NULL, "
        "acknowledged_at = now(), updated_at = now() WHERE org_id = $1 AND id = $2",
        tx.org_id,
        node_run_id,
    )
    await runs.node_log(tx, node_run_id, f"Acknowledged by integration {row['installation_id']!r}")
    return await _current(tx, node_run_id)


async def _current(tx: Tx, node_run_id: str) -> dict[str, Any]:
    row = await tx.fetchrow(_SELECT + " WHERE n.org_id = $1 AND n.id = $2", tx.org_id, node_run_id)
    assert row is not None
    return to_ocean(row)


def _report(body: Any) -> dict[str, Any]:
    """The checked report, or Invalid naming each problem."""
    if not isinstance(body, dict):
        raise Invalid("A node run report is an object")
    problems: list[dict[str, str]] = []

    def bad(pointer: str, message: str) -> None:
        problems.append({"pointer": pointer, "message": message})

    for key in sorted(set(body) - _REPORT_FIELDS):
        bad(f"/{key}", f"unknown field {key!r}: a report takes {', '.join(sorted(_REPORT_FIELDS))}")
    status = body.get("status")
    if status is not None and status not in ("IN_PROGRESS", "COMPLETED"):
        bad("/status", "status is IN_PROGRESS or COMPLETED")
    result = body.get("result")
    if status == "COMPLETED" and result not in RESULTS:
        bad("/result", f"a COMPLETED node run has a result: one of {', '.join(RESULTS)}")
    elif result is not None and status != "COMPLETED":
        bad("/result", "a result goes with status COMPLETED")
    if "output" in body and not isinstance(body["output"], dict):
        bad("/output", "output is an object")
    label = body.get("statusLabel")
    if label is not None:
        text = label.get("text") if isinstance(label, dict) else label
        if not isinstance(text, str) or len(text) > 200:
            bad("/statusLabel", "statusLabel is {text} (at most 200 characters)")
    external = body.get("externalRunId")
    if external is not None and (not isinstance(external, str) or not 0 < len(external) <= 200):
        bad("/externalRunId", "externalRunId is a string of 1 to 200 characters")
    links = body.get("links")
    if links is not None and (
        not isinstance(links, list)
        or len(links) > MAX_LINKS
        or not all(isinstance(link, str) and len(link) <= 2000 for link in links)
    ):
        bad("/links", f"links is a list of at most {MAX_LINKS} URLs")
    if problems:
        raise Invalid("The node run report is invalid", details=problems)
    return body


async def report(tx: Tx, principal: Principal, node_run_id: str, body: Any) -> dict[str, Any]:
    checked = _report(body)
    row = await _node_run(tx, principal, node_run_id)
    if row["status"] != "IN_PROGRESS":
        raise _ended(row)
    if row["state"] == "queued" and row["result"] is not None:
        raise Conflict(
            f"Workflow node run {node_run_id!r} has already reported its end",
            code="node_run_reported",
        )
    if row["state"] not in ("claimed", "acknowledged"):
        raise Conflict(
            f"Workflow node run {node_run_id!r} is not claimed by an integration",
            code="run_not_claimed",
        )
    label = checked.get("statusLabel")
    text = label.get("text") if isinstance(label, dict) else label
    output = row["output"] if isinstance(row["output"], dict) else {}
    if "output" in checked:
        output = {**output, **checked["output"]}
    await tx.execute(
        "UPDATE workflow_node_runs SET output = $3, status_label = COALESCE($4, status_label), "
        "external_run_id = COALESCE($5, external_run_id), links = COALESCE($6, links), "
        "updated_at = now() WHERE org_id = $1 AND id = $2",
        tx.org_id,
        node_run_id,
        output,
        text,
        checked.get("externalRunId"),
        checked.get("links"),
    )
    if checked.get("status") == "COMPLETED":
        result = str(checked["result"])
        # The worker ends the node (its variables are jq, run in the sandbox, never in a
        # request) and moves the run on: the node run is queued once more with its result.
        await tx.execute(
            "UPDATE workflow_node_runs SET state = 'queued', result = $3, claim = NULL, "
            "lease_until = NULL, updated_at = now() WHERE org_id = $1 AND id = $2",
            tx.org_id,
            node_run_id,
            result,
        )
        await runs.node_log(
            tx,
            node_run_id,
            f"Integration {row['installation_id']!r} reported {result}",
            "INFO" if result == "SUCCESS" else "ERROR",
        )
        await runs.queue(tx, node_run_id, int(row["attempts"]) + 1)
    return await _current(tx, node_run_id)


async def add_logs(tx: Tx, principal: Principal, node_run_id: str, body: Any) -> None:
    logs = body.get("logs") if isinstance(body, dict) else None
    if not isinstance(logs, list) or not logs or len(logs) > MAX_LOGS:
        raise Invalid(
            f"logs is a list of 1 to {MAX_LOGS} {{level, message}}",
            details=[{"pointer": "/logs", "message": "a list of {level, message}"}],
        )
    problems = []
    for index, entry in enumerate(logs):
        if not isinstance(entry, dict) or not isinstance(entry.get("message"), str):
            problems.append({"pointer": f"/logs/{index}", "message": "{level, message}"})
        elif len(entry["message"]) > MAX_LOG_MESSAGE:
            problems.append(
                {"pointer": f"/logs/{index}/message", "message": f"at most {MAX_LOG_MESSAGE}"}
            )
        elif entry.get("level", "INFO") not in LEVELS:
            problems.append(
                {"pointer": f"/logs/{index}/level", "message": "INFO, WARN, ERROR or DEBUG"}
            )
    if problems:
        raise Invalid("The node run logs are invalid", details=problems)
    row = await _node_run(tx, principal, node_run_id)
    if row["status"] != "IN_PROGRESS":
        raise _ended(row)
    for entry in logs:
        level = LEVELS[entry.get("level", "INFO")]
        await runs.node_log(tx, node_run_id, entry["message"].replace("\x00", ""), level)


async def by_external_id(
    tx: Tx, principal: Principal, external_run_id: str, *, node_config: bool
) -> list[dict[str, Any]]:
    rows = await tx.fetch(
        _SELECT + " WHERE n.org_id = $1 AND n.external_run_id = $2 ORDER BY n.created_at",
        tx.org_id,
        external_run_id,
    )
    found = []
    for row in rows:
        creator = await claims.integration_creator(tx, row["installation_id"])
        if claims.may_claim(principal, creator):
            found.append(to_ocean(row, node_config=node_config))
    return found
