"""Workflow runs (Port's shapes): started from a self-serve trigger, read with their node
runs, cancelled, and answered where an INPUT node waits for people.

A run keeps the version of the workflow it started on. Its trigger is node run 0 (its
output: the inputs, as checked); the node the trigger connects to is queued in the same
transaction (a node run row and its outbox row, app/workflows/engine.py), so a run the API
acknowledged is never lost. Statuses: IN_PROGRESS, then COMPLETED with a result (SUCCESS,
FAILED, CANCELLED); node runs likewise.

An INPUT node run waits in PostgreSQL (state `waiting`: no outbox row, no job, no lease)
until its responders' answers reach one of its outlets; each answer is one transaction that
records it and, when an outlet is reached, completes the node and queues the next. A run
waiting for input thus survives any restart and holds nothing while it waits.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import asyncpg

from app.actions import inputs as action_inputs
from app.auth import permissions
from app.auth.principal import Principal
from app.db.database import Tx
from app.kit.errors import Conflict, Invalid, NotFound
from app.workflows import definitions
from app.workflows.service import new_id

NOTIFY_CHANNEL = "portolan_workflows"
RUN_FIELDS = ("inputs", "properties", "triggerIdentifier")
LIST_LIMIT = 1000
WAITING = "waiting"  # an INPUT node run's state while it waits for its responders
RESPONSE_FIELDS = ("button", "inputs")

_RUN_SELECT = "SELECT r.* FROM workflow_runs r"


def run_to_api(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "identifier": row["id"],
        "workflow": {"identifier": row["workflow"], "versionIdentifier": row["version_id"]},
        "trigger": {"identifier": row["trigger_node"]},
        "status": row["status"],
        "result": row["result"],
        "createdBy": row["created_by"],
        "createdAt": row["created_at"],
        "updatedAt": row["updated_at"],
        "completedAt": row["completed_at"],
    }


def node_run_to_api(
    row: asyncpg.Record, node: dict[str, Any] | None, logs: list[asyncpg.Record]
) -> dict[str, Any]:
    node = node or {}
    waiting = row["state"] == WAITING and row["status"] == "IN_PROGRESS"
    out: dict[str, Any] = {
        "identifier": row["id"],
        "node": {"identifier": row["node"]},
        "nodeTitle": node.get("title"),
        "nodeIcon": node.get("icon"),
        "nodeConfigType": row["node_type"],
        "status": row["status"],
        "result": row["result"],
        "output": row["output"],
        "attempts": row["attempts"],
        "nodeRunLogs": [
            {"level": log["level"], "message": log["message"], "createdAt": log["created_at"]}
            for log in logs
        ],
        "createdAt": row["created_at"],
        "updatedAt": row["updated_at"],
        "completedAt": row["completed_at"],
        "waitingForInput": waiting,
    }
    if row["outlet"] is not None:
        out["selectedOutlet"] = {"identifier": row["outlet"]}
    if row["installation_id"] is not None:  # an INTEGRATION_ACTION node's run
        out["integration"] = {
            "installationId": row["installation_id"],
            "state": row["state"],
            "invocation": row["invocation"],
            "acknowledgedAt": row["acknowledged_at"],
        }
        out["externalRunId"] = row["external_run_id"]
        out["links"] = row["links"] or []
        out["statusLabel"] = row["status_label"]
    return out


def _hash(workflow: str, body: dict[str, Any]) -> str:
    canonical = json.dumps([workflow, body], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


async def queue(tx: Tx, node_run_id: str, attempt: int, delay_seconds: float = 0.0) -> None:
    """Make a node run due: an outbox row, and a wake-up for the relay on commit."""
    await tx.execute(
        "INSERT INTO workflow_outbox (org_id, node_run_id, attempt, available_at) "
        "VALUES ($1, $2, $3, now() + make_interval(secs => $4))",
        tx.org_id,
        node_run_id,
        attempt,
        delay_seconds,
    )
    await tx.execute(f"NOTIFY {NOTIFY_CHANNEL}")


async def node_log(tx: Tx, node_run_id: str, message: str, level: str = "INFO") -> None:
    await tx.execute(
        "INSERT INTO workflow_node_run_logs (org_id, node_run_id, level, message) "
        "VALUES ($1, $2, $3, $4)",
        tx.org_id,
        node_run_id,
        level,
        message,
    )


async def start_node(
    tx: Tx, run_id: str, seq: int, node: dict[str, Any], *, delay: float = 0.0
) -> str | None:
    """Queue `node` at place `seq` of the run; None when that place is already taken (the
    run moved on from the node before it already). An INPUT node is not queued: it waits
    for its responders (`respond`)."""
    node_run_id = new_id("wfnr_")
    kind = node["config"]["type"]
    waits = kind == "INPUT"
    # An INPUT node with a timeout keeps its deadline where a retry keeps its next attempt.
    timeout = node["config"].get("timeoutSeconds") if waits else None
    inserted = await tx.fetchval(
        "INSERT INTO workflow_node_runs (org_id, id, run_id, seq, node, node_type, status, "
        "state, output, next_attempt_at) VALUES ($1, $2, $3, $4, $5, $6, 'IN_PROGRESS', $7, $8, "
        "now() + make_interval(secs => $9)) "
        "ON CONFLICT (org_id, run_id, seq) DO NOTHING RETURNING id",
        tx.org_id,
        node_run_id,
        run_id,
        seq,
        node["identifier"],
        kind,
        WAITING if waits else "queued",
        {"responses": []} if waits else None,
        timeout,
    )
    if inserted is None:
        return None
    if waits:
        await node_log(tx, node_run_id, "Waiting for input")
    else:
        await queue(tx, node_run_id, 1, delay)
    return node_run_id


async def advance(
    tx: Tx,
    run_id: str,
    definition: dict[str, Any],
    source: dict[str, Any],
    seq: int,
    outlet: str | None = None,
) -> None:
    """Move the run on from the node `source` completed at place `seq`: to the node its
    connection leads to (for a CONDITION or INPUT node, the connection of `outlet`, or the
    fallback when there is none), or to the run's end when there is none."""
    name = source["identifier"]
    if source["config"].get("type") in definitions.FLOW:
        following = (
            definitions.next_node(definition, name, outlet)
            if outlet is not None
            else definitions.next_node(definition, name, fallback=True)
        )
    else:
        following = definitions.next_node(definition, name)
    node = definitions.node_of(definition, following) if following else None
    if node is None:
        await end_run(tx, run_id, "SUCCESS")
    else:
        await start_node(tx, run_id, seq + 1, node)


async def end_run(tx: Tx, run_id: str, result: str) -> bool:
    done = await tx.fetchval(
        "UPDATE workflow_runs SET status = 'COMPLETED', result = $3, completed_at = now(), "
        "updated_at = now() WHERE org_id = $1 AND id = $2 AND status = 'IN_PROGRESS' "
        "RETURNING id",
        tx.org_id,
        run_id,
        result,
    )
    return done is not None


async def _by_key(tx: Tx, actor: str, key: str, request_hash: str) -> dict[str, Any] | None:
    row = await tx.fetchrow(
        _RUN_SELECT + " WHERE r.org_id = $1 AND r.created_by = $2 AND r.idempotency_key = $3",
        tx.org_id,
        actor,
        key,
    )
    if row is None:
        return None
    if row["request_hash"] != request_hash:
        raise Conflict(
            "This Idempotency-Key was used for a different request",
            code="idempotency_key_reused",
        )
    return await get(tx, row["id"])


async def insert_run(
    tx: Tx,
    *,
    workflow: str,
    version_id: str,
    definition: dict[str, Any],
    trigger: dict[str, Any],
    output: Any,
    actor: str,
    context: dict[str, Any],
    idempotency_key: str | None,
    request_hash: str | None,
    started: str,
) -> str | None:
    """A new run of the version fired by `trigger`: the run, its trigger's node run (its
    output `output`) and the next node queued, or the run ended when there is none. None
    when the starter's `idempotency_key` already made a run."""
    now = datetime.now(UTC)
    run_id = new_id("wfr_")
    context = {
        **context,
        "allowAnyoneToViewRuns": definition.get("allowAnyoneToViewRuns", True),
    }
    inserted = await tx.fetchval(
        "INSERT INTO workflow_runs (org_id, id, workflow, version_id, trigger_node, status, "
        "context, idempotency_key, request_hash, created_at, updated_at, created_by) "
        "VALUES ($1, $2, $3, $4, $5, 'IN_PROGRESS', $6, $7, $8, $9, $9, $10) "
        "ON CONFLICT (org_id, created_by, idempotency_key) WHERE idempotency_key IS NOT NULL "
        "DO NOTHING RETURNING id",
        tx.org_id,
        run_id,
        workflow,
        version_id,
        trigger["identifier"],
        context,
        idempotency_key,
        request_hash,
        now,
        actor,
    )
    if inserted is None:
        return None
    trigger_run = new_id("wfnr_")
    await tx.execute(
        "INSERT INTO workflow_node_runs (org_id, id, run_id, seq, node, node_type, status, "
        "result, output, state, created_at, updated_at, completed_at) "
        "VALUES ($1, $2, $3, 0, $4, $5, 'COMPLETED', 'SUCCESS', $6, 'done', $7, $7, $7)",
        tx.org_id,
        trigger_run,
        run_id,
        trigger["identifier"],
        trigger["config"]["type"],
        output,
        now,
    )
    await node_log(tx, trigger_run, started)
    await advance(tx, run_id, definition, trigger, 0)
    return run_id


def _trigger(definition: dict[str, Any], workflow: str, wanted: Any) -> dict[str, Any]:
    triggers: list[dict[str, Any]] = [
        n for n in definition["nodes"] if n["config"]["type"] == "SELF_SERVE_TRIGGER"
    ]
    if wanted is not None:
        found = [n for n in triggers if n["identifier"] == wanted]
        if not found:
            raise Invalid(
                f"Workflow {workflow!r} has no self-serve trigger {wanted!r}",
                details=[{"pointer": "/triggerIdentifier", "message": "not a trigger node"}],
            )
        return found[0]
    if not triggers:
        raise Invalid(
            f"Workflow {workflow!r} has no self-serve trigger: it is started by its events",
            code="workflow_not_self_serve",
        )
    if len(triggers) != 1:
        raise Invalid(
            f"Workflow {workflow!r} has {len(triggers)} triggers: name one (triggerIdentifier)",
            details=[{"pointer": "/triggerIdentifier", "message": "required"}],
        )
    return triggers[0]


async def _check_entities(tx: Tx, refs: list[action_inputs.EntityRef]) -> None:
    problems = []
    for ref in refs:
        if not ref.identifiers:
            continue
        found = await tx.fetch(
            "SELECT identifier FROM entities WHERE org_id = $1 AND blueprint = $2 "
            "AND identifier = ANY($3::text[])",
            tx.org_id,
            ref.blueprint,
            ref.identifiers,
        )
        missing = sorted(set(ref.identifiers) - {r["identifier"] for r in found})
        for identifier in missing:
            problems.append(
                {
                    "pointer": f"/inputs/{ref.name}",
                    "message": f"entity {identifier!r} of blueprint {ref.blueprint!r} "
                    "does not exist",
                }
            )
    if problems:
        raise Invalid("The run's inputs are invalid", details=problems)


async def create(
    tx: Tx,
    workflow: str,
    body: Any,
    *,
    principal: Principal,
    idempotency_key: str | None = None,
) -> tuple[dict[str, Any], bool]:
    """The new run (and True), or for a repeated Idempotency-Key the first run (and False).
    The caller must hold the trigger's permissions."""
    if not isinstance(body, dict):
        raise Invalid("A run is {inputs: {...}, triggerIdentifier?}")
    unknown = sorted(set(body) - set(RUN_FIELDS))
    if unknown:
        raise Invalid(f"A run takes inputs and triggerIdentifier, not {', '.join(unknown)}")
    if "inputs" in body and "properties" in body:
        raise Invalid("A run's inputs are `inputs` (or `properties`), not both")
    actor = principal.subject
    request_hash = _hash(workflow, body)
    if idempotency_key is not None:
        earlier = await _by_key(tx, actor, idempotency_key, request_hash)
        if earlier is not None:
            return earlier, False
    row = await tx.fetchrow(
        "SELECT w.version_id, v.definition FROM workflows w JOIN workflow_versions v "
        "ON v.org_id = w.org_id AND v.id = w.version_id "
        "WHERE w.org_id = $1 AND w.identifier = $2",
        tx.org_id,
        workflow,
    )
    if row is None:
        raise NotFound(f"Workflow {workflow!r} was not found")
    definition: dict[str, Any] = row["definition"]
    trigger = _trigger(definition, workflow, body.get("triggerIdentifier"))
    config = trigger["config"]
    permissions.require_workflow_execute(principal, workflow, config.get("permissions"))
    if config.get("published", True) is False:
        raise Invalid(
            f"The trigger {trigger['identifier']!r} of workflow {workflow!r} is not published",
            code="workflow_not_published",
        )
    raw = body.get("inputs", body.get("properties", {}))
    try:
        checked = action_inputs.check(config.get("userInputs") or {}, raw, None)
    except Invalid as exc:
        # The same checks as an action's inputs, said of a workflow's.
        details = [
            {**d, "pointer": "/inputs" + str(d["pointer"]).removeprefix("/properties")}
            for d in exc.details or []
        ]
        message = exc.message.replace("of this action", "of this trigger")
        raise Invalid(message, details=details) from exc
    await _check_entities(tx, checked.entity_refs)
    by = {"orgId": str(tx.org_id), "userId": actor, "email": principal.email}
    run_id = await insert_run(
        tx,
        workflow=workflow,
        version_id=row["version_id"],
        definition=definition,
        trigger=trigger,
        output=checked.properties,
        actor=actor,
        context={"by": by},
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        started=f"Started by {actor}",
    )
    if run_id is None:
        assert idempotency_key is not None
        earlier = await _by_key(tx, actor, idempotency_key, request_hash)
        if earlier is None:
            raise Conflict("A run with this Idempotency-Key is being created; retry")
        return earlier, False
    return await get(tx, run_id), True


async def _run_row(tx: Tx, run_id: str, *, lock: bool = False) -> asyncpg.Record:
    row = await tx.fetchrow(
        _RUN_SELECT + " WHERE r.org_id = $1 AND r.id = $2" + (" FOR UPDATE" if lock else ""),
        tx.org_id,
        run_id,
    )
    if row is None:
        raise NotFound(f"Workflow run {run_id!r} was not found")
    return row


def readable(principal: Principal, row: asyncpg.Record) -> bool:
    """Admins, the run's starter, and everyone when its workflow lets anyone view runs."""
    return (
        permissions.allows(principal, "workflowRuns.readAll")
        or row["created_by"] == principal.subject
        or bool(row["context"].get("allowAnyoneToViewRuns", True))
    )


async def get(tx: Tx, run_id: str, principal: Principal | None = None) -> dict[str, Any]:
    """The run with every node run (status, output, timestamps, logs). With a principal,
    a run it may not read is not found."""
    row = await _run_row(tx, run_id)
    if principal is not None and not readable(principal, row):
        raise NotFound(f"Workflow run {run_id!r} was not found")
    definition = await tx.fetchval(
        "SELECT definition FROM workflow_versions WHERE org_id = $1 AND id = $2",
        tx.org_id,
        row["version_id"],
    )
    node_runs = await tx.fetch(
        "SELECT * FROM workflow_node_runs WHERE org_id = $1 AND run_id = $2 ORDER BY seq",
        tx.org_id,
        run_id,
    )
    logs = await tx.fetch(
        "SELECT l.node_run_id, l.level, l.message, l.created_at FROM workflow_node_run_logs l "
        "JOIN workflow_node_runs n ON n.org_id = l.org_id AND n.id = l.node_run_id "
        "WHERE l.org_id = $1 AND n.run_id = $2 ORDER BY l.id",
        tx.org_id,
        run_id,
    )
    by_node: dict[str, list[asyncpg.Record]] = {}
    for log in logs:
        by_node.setdefault(log["node_run_id"], []).append(log)
    out = run_to_api(row)
    out["waitingForInput"] = row["status"] == "IN_PROGRESS" and any(
        n["state"] == WAITING and n["status"] == "IN_PROGRESS" for n in node_runs
    )
    out["nodeRuns"] = [
        node_run_to_api(
            n, definitions.node_of(definition or {}, n["node"]), by_node.get(n["id"], [])
        )
        for n in node_runs
    ]
    return out


async def list_runs(
    tx: Tx, principal: Principal, *, workflow: str | None, limit: int
) -> list[dict[str, Any]]:
    """Newest first: every run for Admins; others see their own and those of workflows that
    let anyone view runs."""
    everything = permissions.allows(principal, "workflowRuns.readAll")
    rows = await tx.fetch(
        _RUN_SELECT + " WHERE r.org_id = $1 AND ($2::text IS NULL OR r.workflow = $2)"
        " AND ($3 OR r.created_by = $4 OR coalesce((r.context->>'allowAnyoneToViewRuns')::boolean,"
        " true)) ORDER BY r.created_at DESC, r.id LIMIT $5",
        tx.org_id,
        workflow,
        everything,
        principal.subject,
        limit,
    )
    return [run_to_api(r) for r in rows]


async def cancel(tx: Tx, principal: Principal, run_id: str) -> dict[str, Any]:
    """End the run as CANCELLED: its node runs still in progress end with it (a node being
    executed finishes its call, and what it brings back is not recorded). Admins and the
    run's starter may cancel."""
    row = await _run_row(tx, run_id, lock=True)
    if not readable(principal, row):
        raise NotFound(f"Workflow run {run_id!r} was not found")
    if not (principal.is_admin or row["created_by"] == principal.subject):
        raise permissions.Denied("workflowRuns.cancel", f"workflow run {run_id!r}")
    if row["status"] != "IN_PROGRESS":
        raise Conflict(f"Workflow run {run_id!r} has already ended", code="run_ended")
    ended = await tx.fetch(
        "UPDATE workflow_node_runs SET status = 'COMPLETED', result = 'CANCELLED', "
        "state = 'done', claim = NULL, lease_until = NULL, next_attempt_at = NULL, "
        "completed_at = now(), updated_at = now() "
        "WHERE org_id = $1 AND run_id = $2 AND status = 'IN_PROGRESS' RETURNING id",
        tx.org_id,
        run_id,
    )
    for node_run in ended:
        await node_log(tx, node_run["id"], f"Cancelled by {principal.subject}", "WARNING")
    await tx.execute(
        "DELETE FROM workflow_outbox WHERE org_id = $1 AND node_run_id = ANY($2::text[])",
        tx.org_id,
        [r["id"] for r in ended],
    )
    await end_run(tx, run_id, "CANCELLED")
    return await get(tx, run_id)


# ---------------------------------------------------------------------------------------
# INPUT nodes: responses


def may_respond(principal: Principal, run: asyncpg.Record, config: dict[str, Any]) -> bool:
    """Who may answer an INPUT node: the people its `responders` name (`users` by email,
    `teams`, `roles`); with none named, the run's starter. Admins always may."""
    responders = config.get("responders") or {}
    named = any(responders.get(key) for key in ("users", "teams", "roles"))
    if not named:
        return principal.is_admin or run["created_by"] == principal.subject
    block = permissions.Block(
        users=tuple(u.lower() for u in responders.get("users") or ()),
        roles=tuple(responders.get("roles") or ()),
        teams=tuple(responders.get("teams") or ()),
    )
    if principal.email is not None and principal.email.lower() in block.users:
        return True
    return block.grants(principal)


def _button(config: dict[str, Any], wanted: Any) -> str:
    buttons = [
        str(b["identifier"])
        for b in (config.get("userInputs") or {}).get("buttons") or []
        if isinstance(b, dict)
    ]
    if wanted is None:
        if len(buttons) == 1:
            return buttons[0]
        raise Invalid(
            "Name the button pressed: one of " + ", ".join(repr(b) for b in buttons),
            details=[{"pointer": "/button", "message": "required"}],
        )
    if wanted not in buttons:
        raise Invalid(
            f"The node has no button {wanted!r}: one of " + ", ".join(repr(b) for b in buttons),
            details=[{"pointer": "/button", "message": "not a button of the node"}],
        )
    return str(wanted)


def _reached(config: dict[str, Any], responses: list[dict[str, Any]]) -> str | None:
    """The first outlet (in order) whose button as many responders pressed as it waits
    for."""
    for outlet in config.get("outlets") or []:
        name = outlet["identifier"]
        pressed = sum(1 for r in responses if r.get("button") == name)
        if pressed >= int(outlet.get("numOfResponders", 1)):
            return str(name)
    return None


async def respond(tx: Tx, principal: Principal, node_run_id: str, body: Any) -> dict[str, Any]:
    """Record a response to a waiting INPUT node run: a button (approve, decline, ...) and
    the node's inputs, checked as a trigger's are. When the responses reach an outlet (as
    many pressed its button as its `numOfResponders`), the node completes with output
    `{selectedOutlet, responses}` and the run moves on through that outlet's connection; a
    button no outlet counts takes the fallback connection at once. The run with every node
    run."""
    if not isinstance(body, dict):
        raise Invalid("A response is {button?, inputs?}")
    unknown = sorted(set(body) - set(RESPONSE_FIELDS))
    if unknown:
        raise Invalid(f"A response takes button and inputs, not {', '.join(unknown)}")
    found = await tx.fetchrow(
        "SELECT run_id FROM workflow_node_runs WHERE org_id = $1 AND id = $2",
        tx.org_id,
        node_run_id,
    )
    if found is None:
        raise NotFound(f"Workflow node run {node_run_id!r} was not found")
    # The run first, then the node run: the order cancelling takes them in.
    run = await _run_row(tx, found["run_id"], lock=True)
    if not readable(principal, run):
        raise NotFound(f"Workflow node run {node_run_id!r} was not found")
    row = await tx.fetchrow(
        "SELECT * FROM workflow_node_runs WHERE org_id = $1 AND id = $2 FOR UPDATE",
        tx.org_id,
        node_run_id,
    )
    assert row is not None
    if row["node_type"] != "INPUT":
        raise Invalid(
            f"Workflow node run {node_run_id!r} is a {row['node_type']} node: only INPUT "
            "nodes take responses",
            code="not_an_input_node",
        )
    if run["status"] != "IN_PROGRESS" or row["status"] != "IN_PROGRESS":
        raise Conflict(
            f"Workflow node run {node_run_id!r} is no longer waiting for input",
            code="node_run_ended",
        )
    definition: dict[str, Any] = await tx.fetchval(
        "SELECT definition FROM workflow_versions WHERE org_id = $1 AND id = $2",
        tx.org_id,
        run["version_id"],
    )
    node = definitions.node_of(definition, row["node"])
    assert node is not None
    config = node["config"]
    if not may_respond(principal, run, config):
        raise permissions.Denied("workflowRuns.respond", f"workflow node run {node_run_id!r}")
    responses: list[dict[str, Any]] = list((row["output"] or {}).get("responses") or [])
    if any(r.get("submitterInfo", {}).get("userId") == principal.subject for r in responses):
        raise Conflict(
            f"{principal.subject} has already responded to this node", code="already_responded"
        )
    button = _button(config, body.get("button"))
    form = {k: v for k, v in (config.get("userInputs") or {}).items() if k != "buttons"}
    try:
        checked = action_inputs.check(form, body.get("inputs") or {}, None)
    except Invalid as exc:
        details = [
            {**d, "pointer": "/inputs" + str(d["pointer"]).removeprefix("/properties")}
            for d in exc.details or []
        ]
        message = exc.message.replace("of this action", "of this node")
        raise Invalid(message, details=details) from exc
    await _check_entities(tx, checked.entity_refs)
    responses.append(
        {
            "button": button,
            "inputs": checked.properties,
            "submitterInfo": {
                "submittedBy": principal.email or principal.subject,
                "userId": principal.subject,
                "submittedAt": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            },
        }
    )
    await node_log(tx, node_run_id, f"{principal.subject} pressed {button!r}")
    counted = {str(o["identifier"]) for o in config.get("outlets") or []}
    outlet = _reached(config, responses)
    if outlet is None and button in counted:
        await tx.execute(
            "UPDATE workflow_node_runs SET output = $3, updated_at = now() "
            "WHERE org_id = $1 AND id = $2",
            tx.org_id,
            node_run_id,
            {"responses": responses},
        )
        return await get(tx, run["id"])
    selected = {"identifier": outlet} if outlet is not None else None
    await tx.execute(
        "UPDATE workflow_node_runs SET status = 'COMPLETED', result = 'SUCCESS', output = $3, "
        "outlet = $4, state = 'done', completed_at = now(), updated_at = now() "
        "WHERE org_id = $1 AND id = $2",
        tx.org_id,
        node_run_id,
        {"selectedOutlet": selected, "responses": responses},
        outlet,
    )
    await node_log(
        tx,
        node_run_id,
        f"outlet {outlet!r} reached" if outlet else f"{button!r} has no outlet: the fallback",
    )
    await advance(tx, run["id"], definition, node, int(row["seq"]), outlet)
    return await get(tx, run["id"])


async def time_out(tx: Tx, node_run_id: str) -> bool:
    """An INPUT node whose `timeoutSeconds` passed with no outlet reached completes through
    its `timeout` outlet: the connection named so, or else the fallback (none: the run
    ends). False when it is no longer waiting (answered or cancelled meanwhile)."""
    found = await tx.fetchrow(
        "SELECT run_id FROM workflow_node_runs WHERE org_id = $1 AND id = $2",
        tx.org_id,
        node_run_id,
    )
    if found is None:
        return False
    run = await _run_row(tx, found["run_id"], lock=True)  # the run first, as respond does
    row = await tx.fetchrow(
        "SELECT * FROM workflow_node_runs WHERE org_id = $1 AND id = $2 AND state = $3 "
        "AND status = 'IN_PROGRESS' AND next_attempt_at <= now() FOR UPDATE",
        tx.org_id,
        node_run_id,
        WAITING,
    )
    if row is None or run["status"] != "IN_PROGRESS":
        return False
    definition: dict[str, Any] = await tx.fetchval(
        "SELECT definition FROM workflow_versions WHERE org_id = $1 AND id = $2",
        tx.org_id,
        run["version_id"],
    )
    node = definitions.node_of(definition, row["node"])
    assert node is not None
    responses = list((row["output"] or {}).get("responses") or [])
    outlet = definitions.TIMEOUT_OUTLET
    await tx.execute(
        "UPDATE workflow_node_runs SET status = 'COMPLETED', result = 'SUCCESS', output = $3, "
        "outlet = $4, state = 'done', next_attempt_at = NULL, completed_at = now(), "
        "updated_at = now() WHERE org_id = $1 AND id = $2",
        tx.org_id,
        node_run_id,
        {"selectedOutlet": {"identifier": outlet}, "responses": responses, "timedOut": True},
        outlet,
    )
    seconds = node["config"].get("timeoutSeconds")
    await node_log(tx, node_run_id, f"No outlet reached within {seconds} s: the timeout outlet")
    name = node["identifier"]
    if definitions.next_node(definition, name, outlet) is not None:
        await advance(tx, run["id"], definition, node, int(row["seq"]), outlet)
    else:
        await advance(tx, run["id"], definition, node, int(row["seq"]), None)
    return True
