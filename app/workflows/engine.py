"""Executing workflow node runs, one node at a time, durably.

A node run is due when its row and an outbox row exist (written in one transaction by the
step before it); the relay (app/workflows/relay.py) hands it to arq. A job claims the node
run for one attempt with a conditional update (a duplicate job for the same attempt claims
nothing), under a lease; the claim's transaction deletes the outbox row and reads what the
node needs: the run's version of the graph, the outputs of the nodes before it and, for a
WEBHOOK, the secrets its request names. The node then runs with no transaction open (jq in
the sandbox, the HTTP call), and its outcome is recorded under the claim in one transaction
that also moves the run on: the next node run and its outbox row, or the run's end. An
UPSERT_ENTITY node writes its entity in that same transaction. A node run has one row per
place on the run's path (unique), so a run moves on from a node at most once.

- A worker that dies mid-node leaves its claim to expire; the sweeper (`sweep_expired`)
  queues a new attempt. A WEBHOOK's request is signed with the node run's id as its
  `webhook-id` on every attempt, so a receiver dedupes a request sent again.
- A transient failure (timeout, connection error, 408, 429, 5xx, no jq turn) is retried
  after a backoff through the outbox, up to PORTOLAN_DISPATCH_MAX_ATTEMPTS; then the node
  fails.
- A failed node ends the run in FAILED unless its `onFailure` is `continue`: then its output
  is `{error: {message}}` and the run goes on.
- Secrets: a WEBHOOK's url, headers and body see the secrets they name; what is kept (the
  node's output, its logs) has every secret, and whatever the templates made of them,
  masked. No other node sees a secret.
"""

from __future__ import annotations

import copy
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pydantic_core

from app.auth.permissions import EntityGuard
from app.auth.principal import principal_of
from app.catalog import entities
from app.config import Settings
from app.db.database import Database, Tx
from app.dispatch import invokers, runner, templates
from app.kit import sandbox
from app.kit.crypto import Cipher, cipher_for
from app.kit.errors import Forbidden, PortolanError
from app.kit.outbound import Allowed
from app.secrets import service as secrets_service
from app.workflows import definitions, events, runs

log = logging.getLogger("portolan.workflows")
CONDITION_OUTPUT_LIMIT = 64 * 1024
_MAPPING_KEYS = ("identifier", "title", "icon", "team", "properties", "relations")


@dataclass
class Held:
    """A claimed node run and what it needs."""

    org_id: uuid.UUID
    node_run: asyncpg.Record
    run: asyncpg.Record
    definition: dict[str, Any]
    node: dict[str, Any]
    token: uuid.UUID
    outputs: dict[str, Any]
    secrets: dict[str, str] = field(default_factory=dict)
    signing_secret: str = ""

    @property
    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = self.node["config"]
        return config


@dataclass
class Step:
    """A node's outcome: SUCCESS or FAILED, its output (what readers and later nodes see),
    the log line, the CONDITION outlet taken, and the entity an UPSERT_ENTITY writes."""

    result: str
    output: Any
    message: str
    outlet: str | None = None
    write: tuple[str, dict[str, Any]] | None = None


@dataclass
class Transient:
    message: str
    retry_after: float | None = None


@dataclass
class Handoff:
    """An INTEGRATION_ACTION node's invocation, rendered: the node waits for its
    integration to claim it (app/workflows/integrations.py)."""

    invocation: dict[str, Any]


def _failed(message: str) -> Step:
    return Step("FAILED", {"error": {"message": message}}, message)


async def claim(
    db: Database, cipher: Cipher, org_id: uuid.UUID, node_run_id: str, attempt: int, lease: float
) -> Held | None:
    token = uuid.uuid4()
    async with db.tenant(org_id) as tx:
        row = await tx.fetchrow(
            "WITH claimed AS (UPDATE workflow_node_runs n SET state = 'dispatching', "
            "attempts = attempts + 1, claim = $3, lease_until = now() + make_interval(secs => $4), "
            "next_attempt_at = NULL, updated_at = now() "
            "WHERE n.org_id = $1 AND n.id = $2 AND n.status = 'IN_PROGRESS' "
            "AND n.state IN ('queued', 'retrying') AND n.attempts = $5 - 1 "
            "AND EXISTS (SELECT 1 FROM workflow_runs r WHERE r.org_id = n.org_id "
            "AND r.id = n.run_id AND r.status = 'IN_PROGRESS') RETURNING n.*), "
            "done AS (DELETE FROM workflow_outbox WHERE org_id = $1 AND node_run_id = $2 "
            "AND attempt <= $5) "
            "SELECT * FROM claimed",
            org_id,
            node_run_id,
            token,
            lease,
            attempt,
        )
        if row is None:
            return None
        run = await tx.fetchrow(
            "SELECT * FROM workflow_runs WHERE org_id = $1 AND id = $2", org_id, row["run_id"]
        )
        assert run is not None
        definition = await tx.fetchval(
            "SELECT definition FROM workflow_versions WHERE org_id = $1 AND id = $2",
            org_id,
            run["version_id"],
        )
        earlier = await tx.fetch(
            "SELECT seq, node, output FROM workflow_node_runs WHERE org_id = $1 "
            "AND run_id = $2 AND seq < $3 AND status = 'COMPLETED' ORDER BY seq",
            org_id,
            row["run_id"],
            row["seq"],
        )
        outputs: dict[str, Any] = {}
        for done in earlier:
            outputs[done["node"]] = done["output"]
            if done["seq"] == 0:
                outputs["trigger"] = done["output"]
        node = definitions.node_of(definition, row["node"]) or {
            "identifier": row["node"],
            "config": {"type": row["node_type"]},
        }
        held = Held(org_id, row, run, definition, node, token, outputs)
        if node["config"].get("type") == "WEBHOOK":
            wanted = templates.referenced_secrets(_request(node["config"]))
            held.secrets = await secrets_service.reveal(tx, cipher, names=wanted) if wanted else {}
            held.signing_secret = await secrets_service.signing_secret(tx, cipher)
    return held


def template_data(held: Held) -> dict[str, Any]:
    """What a node's `{{ jq }}` sees (Port's data flow), without secrets."""
    run, node_run = held.run, held.node_run
    by = run["context"].get("by") or {}
    return {
        "outputs": held.outputs,
        "workflow": {"identifier": run["workflow"], "versionIdentifier": run["version_id"]},
        "workflowRun": {
            "identifier": run["id"],
            "createdAt": run["created_at"],
            "trigger": {"identifier": run["trigger_node"], "by": by},
        },
        "workflowNodeRun": {"identifier": node_run["id"], "createdAt": node_run["created_at"]},
    }


async def render(value: Any, data: dict[str, Any], pointer: str, *, org: object) -> Any:
    """A node's templates (a WEBHOOK's request, a mapping, variables) rendered in the jq
    sandbox against the node's data."""
    return await templates.render(value, data, pointer, org=org)


def _request(config: dict[str, Any]) -> dict[str, Any]:
    return {key: config[key] for key in ("url", "headers", "body") if key in config}


async def run_node(
    settings: Settings, db: Database, org_id: uuid.UUID, node_run_id: str, attempt: int
) -> str:
    """One attempt at a node run; what happened, in a word (the job's result)."""
    held = await claim(
        db, cipher_for(settings), org_id, node_run_id, attempt, settings.dispatch_lease_seconds
    )
    if held is None:
        return "skipped"
    try:
        outcome = await _execute(settings, held)
    except sandbox.Busy as exc:
        # The org's jq turns are taken (its own backlog): a transient failure.
        outcome = Transient(f"the node was not evaluated: {exc}")
    if isinstance(outcome, Transient):
        return await _transient(settings, db, held, outcome)
    if isinstance(outcome, Handoff):
        return await _hand_off(db, held, outcome)
    return await finish(db, held, outcome)


async def _execute(settings: Settings, held: Held) -> Step | Transient | Handoff:
    attempts = int(held.node_run["attempts"])
    kind = held.config.get("type")
    # An integration's node run queued again with the result it reported: it ends now.
    reported = kind == "INTEGRATION_ACTION" and held.node_run["result"] is not None
    if attempts > settings.dispatch_max_attempts and not reported:
        return _failed(f"gave up after {attempts - 1} attempts")
    if kind == "WEBHOOK":
        outcome = await _webhook(settings, held)
    elif kind == "UPSERT_ENTITY":
        outcome = await _upsert(held)
    elif kind == "CONDITION":
        outcome = await _condition(held)
    elif kind == "INTEGRATION_ACTION":
        if not reported:
            return await _integration(held)  # its variables apply once the integration reports
        outcome = _reported(held)
    else:
        outcome = _failed(f"node type {kind} is not run by Portolan")
    if isinstance(outcome, Step) and outcome.result == "SUCCESS" and "variables" in held.node:
        data = {**template_data(held), "result": outcome.output}
        try:
            outcome.output = await render(
                held.node["variables"], data, "/variables", org=held.org_id
            )
        except templates.TemplateError as exc:
            return _failed(f"the node's variables failed: {exc}")
    return outcome


async def _webhook(settings: Settings, held: Held) -> Step | Transient:
    config = held.config
    request = _request(config)
    named = templates.referenced_secrets(request)
    known = held.secrets
    missing = sorted(name for name in named if name not in known)
    if missing:
        return _failed(f"secret {missing[0]} is not defined in the organization")
    data = template_data(held)
    real = {**data, "secrets": {name: known[name] for name in named}}
    masked = {**data, "secrets": dict.fromkeys(named, templates.MASK)}
    try:
        rendered = await render(request, real, "", org=held.org_id)
    except templates.TemplateError:
        # jq's message could carry a secret-derived value: say what the masked render says.
        try:
            await render(request, masked, "", org=held.org_id)
            reason = "it failed with the organization's secret values (the message is withheld)"
        except templates.TemplateError as exc:
            reason = str(exc)
        return _failed(f"the request's template failed: {reason}")
    try:
        shown_request = (
            await render(request, masked, "", org=held.org_id) if named else copy.deepcopy(rendered)
        )
    except templates.TemplateError:
        shown_request = dict(request)
    shown = [
        *(v for v in known.values() if v),
        held.signing_secret,
        *runner.derived(rendered, shown_request),
    ]
    method = {
        "type": "WEBHOOK",
        "url": rendered.get("url"),
        "method": config.get("method", "POST"),
        "headers": rendered.get("headers"),
        "body": rendered.get("body", {}),
        "synchronized": True,
    }
    context = invokers.Context(
        run_id=held.node_run["id"],
        signing_secret=held.signing_secret,
        secrets=known,
        allowed=Allowed.parse(settings.outbound_allow),
        github_api_url=settings.github_api_url,
        gitlab_api_url=settings.gitlab_api_url,
        timeout=settings.dispatch_timeout_seconds,
        inputs=dict(held.outputs.get("trigger") or {}),
    )
    outcome = await invokers.invoke(method, context)
    message = runner.redact(outcome.message, shown)
    where = runner.redact(f"{method['method']} {shown_request.get('url')}", shown)
    if outcome.state == "retry":
        return Transient(f"{where}: {message}", outcome.retry_after)
    response = {"status": outcome.status_code, "data": runner.redact(outcome.response, shown)}
    if outcome.state in ("success", "accepted"):
        return Step("SUCCESS", {"response": response}, f"{where}: {message}")
    failed = _failed(f"{where}: {message}")
    failed.output["response"] = response
    return failed


async def _integration(held: Held) -> Step | Handoff:
    config = held.config
    properties = config.get("integrationActionExecutionProperties") or {}
    try:
        rendered = await render(
            properties,
            template_data(held),
            "/integrationActionExecutionProperties",
            org=held.org_id,
        )
    except templates.TemplateError as exc:
        return _failed(f"the invocation's template failed: {exc}")
    if not isinstance(rendered, dict):
        return _failed("integrationActionExecutionProperties did not render to an object")
    return Handoff(
        {
            "type": "INTEGRATION_ACTION",
            "installationId": config["installationId"],
            "integrationProvider": config["integrationProvider"],
            "integrationInvocationType": config["integrationInvocationType"],
            "integrationActionExecutionProperties": rendered,
        }
    )


def _reported(held: Held) -> Step:
    result = str(held.node_run["result"])
    output = held.node_run["output"] if isinstance(held.node_run["output"], dict) else {}
    installation = held.node_run["installation_id"]
    if result == "SUCCESS":
        return Step("SUCCESS", output, f"integration {installation!r} ran it")
    message = f"integration {installation!r} reported {result}"
    return Step(result, {**output, "error": {"message": message}}, message)


async def _hand_off(db: Database, held: Held, outcome: Handoff) -> str:
    """The node run becomes claimable by its installation, under no claim of this worker:
    it holds nothing while it waits (as an INPUT node does)."""
    installation = outcome.invocation["installationId"]
    async with db.tenant(held.org_id) as tx:
        moved = await tx.fetchval(
            "UPDATE workflow_node_runs SET state = 'claimable', invocation = $4, "
            "installation_id = $5, claim = NULL, lease_until = NULL, updated_at = now() "
            "WHERE org_id = $1 AND id = $2 AND claim = $3 AND state = 'dispatching' "
            "AND status = 'IN_PROGRESS' RETURNING id",
            held.org_id,
            held.node_run["id"],
            held.token,
            outcome.invocation,
            installation,
        )
        if moved is None:
            return "skipped"
        await runs.node_log(
            tx, held.node_run["id"], f"Waiting for integration {installation!r} to claim it"
        )
    return "handed-off"


async def _upsert(held: Held) -> Step:
    config = held.config
    blueprint = str(config["blueprintIdentifier"])
    try:
        rendered = await render(
            config.get("mapping") or {}, template_data(held), "/mapping", org=held.org_id
        )
    except templates.TemplateError as exc:
        return _failed(f"the mapping's template failed: {exc}")
    if not isinstance(rendered, dict):
        return _failed("the mapping did not render to an entity")
    entity = {key: rendered[key] for key in _MAPPING_KEYS if key in rendered}
    if entity.get("identifier") in (None, ""):
        # Port makes one when the mapping gives none; made here, so it is the same on
        # every attempt of this node run.
        entity["identifier"] = "e_" + held.node_run["id"].removeprefix("wfnr_")
    data = {**entity, "blueprint": blueprint}
    return Step(
        "SUCCESS",
        {"response": {"data": data}},
        f"entity {entity['identifier']!r} of blueprint {blueprint!r} written",
        write=(blueprint, entity),
    )


async def _condition(held: Held) -> Step:
    outlets = [o for o in held.config.get("outlets") or [] if isinstance(o, dict)]
    return await take_outlet(held.org_id, outlets, template_data(held))


async def take_outlet(org: object, outlets: list[dict[str, Any]], data: dict[str, Any]) -> Step:
    """A CONDITION's outcome: the first outlet whose jq expression (in the sandbox) gives
    something other than null or false, else the fallback; an expression that fails fails
    the node."""
    try:
        document = pydantic_core.to_json(data).decode()
        (row,) = await sandbox.evaluate(
            org,
            [str(o["expression"]) for o in outlets],
            [document],
            outputs=1,
            output_limit=CONDITION_OUTPUT_LIMIT,
        )
    except sandbox.TimeLimit:
        limit = sandbox.limits().time_limit
        return _failed(f"the outlets' expressions ran longer than {limit:g} s")
    except sandbox.Crashed:
        return _failed("the outlets' expressions stopped (out of memory or a crash)")
    for outlet, (ok, values) in zip(outlets, row, strict=True):
        if not ok:
            return _failed(f"the expression of outlet {outlet['identifier']!r} failed: {values}")
        if values and values[0] not in (None, False):
            name = str(outlet["identifier"])
            return Step(
                "SUCCESS",
                {"selectedOutlet": {"identifier": name}},
                f"outlet {name!r} matched",
                outlet=name,
            )
    return Step("SUCCESS", {"selectedOutlet": None}, "no outlet matched: the fallback")


class _ClaimLost(Exception):
    """The node run was ended elsewhere (the run cancelled, or a new attempt took it)."""


async def finish(db: Database, held: Held, step: Step) -> str:
    """Record the node's outcome under its claim and move the run on, in one transaction;
    an entity the node could not write makes it a failure."""
    try:
        async with db.tenant(held.org_id) as tx:
            if step.write is not None:
                await _write(tx, held, *step.write)
            await _record(tx, held, step)
    except _ClaimLost:
        return "skipped"
    except PortolanError as exc:
        if step.write is None:
            raise
        return await finish(db, held, _failed(f"the entity could not be written: {exc.message}"))
    return "success" if step.result == "SUCCESS" else "failure"


async def _write(tx: Tx, held: Held, blueprint: str, entity: dict[str, Any]) -> None:
    run = held.run
    if events.started_by_event(run["context"]):
        # No person started it: it writes with the org's authority, as automations do,
        # under a name that tells the event feed which run wrote (app/workflows/events.py).
        writer = entities.Writer(
            actor=events.writer_actor(run["id"]), origin="WORKFLOW", datasource=None
        )
    else:
        principal = await principal_of(tx, run["created_by"])
        if principal is None:
            raise Forbidden(
                f"{run['created_by']!r} is no longer a member of the organization: the "
                "entity cannot be written in their name",
                code="missing_permission",
            )
        guard = None if principal.is_admin else EntityGuard(principal)
        writer = entities.Writer(
            actor=run["created_by"], origin="WORKFLOW", datasource=None, guard=guard
        )
    # (Entity events name action runs only: a workflow's writes carry its starter and the
    # WORKFLOW origin.)
    flags = entities.WriteFlags(upsert=True, merge=True)
    outcome = (await entities.write(tx, blueprint, [entity], flags, writer))[0]
    if outcome.error is not None:
        raise outcome.error


async def _record(tx: Tx, held: Held, step: Step) -> None:
    node_run = held.node_run
    seq = await tx.fetchval(
        "UPDATE workflow_node_runs SET status = 'COMPLETED', result = $4, output = $5, "
        "outlet = $6, state = 'done', claim = NULL, lease_until = NULL, completed_at = now(), "
        "updated_at = now() WHERE org_id = $1 AND id = $2 AND claim = $3 "
        "AND state = 'dispatching' AND status = 'IN_PROGRESS' RETURNING seq",
        held.org_id,
        node_run["id"],
        held.token,
        step.result,
        step.output,
        step.outlet,
    )
    if seq is None:
        raise _ClaimLost()
    level = "INFO" if step.result == "SUCCESS" else "ERROR"
    await runs.node_log(tx, node_run["id"], step.message, level)
    run_id = held.run["id"]
    if step.result == "CANCELLED":  # an integration cancelled its node: the run ends so
        await runs.end_run(tx, run_id, "CANCELLED")
        return
    if step.result == "FAILED" and held.config.get("onFailure", "terminate") != "continue":
        await runs.end_run(tx, run_id, "FAILED")
        return
    await runs.advance(tx, run_id, held.definition, held.node, int(seq), step.outlet)


async def _transient(settings: Settings, db: Database, held: Held, outcome: Transient) -> str:
    attempts = int(held.node_run["attempts"])
    if attempts >= settings.dispatch_max_attempts:
        return await finish(
            db, held, _failed(f"{outcome.message}; gave up after {attempts} attempts")
        )
    delay = runner.backoff(settings, attempts, outcome.retry_after)
    async with db.tenant(held.org_id) as tx:
        moved = await tx.fetchval(
            "UPDATE workflow_node_runs SET state = 'retrying', claim = NULL, lease_until = NULL, "
            "next_attempt_at = now() + make_interval(secs => $4), updated_at = now() "
            "WHERE org_id = $1 AND id = $2 AND claim = $3 AND state = 'dispatching' "
            "AND status = 'IN_PROGRESS' RETURNING id",
            held.org_id,
            held.node_run["id"],
            held.token,
            delay,
        )
        if moved is None:
            return "skipped"
        await runs.node_log(
            tx,
            held.node_run["id"],
            f"{outcome.message}; attempt {attempts} of {settings.dispatch_max_attempts}, "
            f"next in {delay:.1f} s",
            "WARNING",
        )
        await runs.queue(tx, held.node_run["id"], attempts + 1, delay)
    return "retrying"


async def sweep_expired(db: Database) -> int:
    """Node runs whose worker's lease ran out get a new attempt (past the last one, that
    attempt fails the node); how many were swept."""
    async with db.system() as tx:
        rows = await tx.fetch(
            "UPDATE workflow_node_runs SET state = 'retrying', claim = NULL, lease_until = NULL, "
            "updated_at = now() WHERE state = 'dispatching' AND lease_until < now() "
            "AND status = 'IN_PROGRESS' RETURNING org_id, id, attempts"
        )
        for row in rows:
            await tx.execute(
                "INSERT INTO workflow_node_run_logs (org_id, node_run_id, level, message) "
                "VALUES ($1, $2, 'WARNING', $3)",
                row["org_id"],
                row["id"],
                f"attempt {row['attempts']} did not finish (its worker stopped); running again",
            )
            await tx.execute(
                "INSERT INTO workflow_outbox (org_id, node_run_id, attempt) VALUES ($1, $2, $3)",
                row["org_id"],
                row["id"],
                row["attempts"] + 1,
            )
        if rows:
            await tx.execute(f"NOTIFY {runs.NOTIFY_CHANNEL}")
    return len(rows)


async def expire_inputs(db: Database, limit: int = 500) -> int:
    """INPUT node runs whose `timeoutSeconds` passed take their timeout outlet; how many.
    Each in its org's own transaction (one org's many expiries wait for the next pass past
    `limit`, oldest first)."""
    async with db.system() as tx:
        due = await tx.fetch(
            "SELECT org_id, id FROM workflow_node_runs WHERE state = $1 "
            "AND status = 'IN_PROGRESS' AND next_attempt_at <= now() "
            "ORDER BY next_attempt_at LIMIT $2",
            runs.WAITING,
            limit,
        )
    expired = 0
    for row in due:
        async with db.tenant(row["org_id"]) as tenant_tx:
            expired += await runs.time_out(tenant_tx, row["id"])
    return expired
