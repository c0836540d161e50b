"""Action runs (Port's shapes, `port-api-notes.md` §2.6): create, approve, report, log.

A run is created with its inputs checked, the action's definition as it was (a later edit
does not change what an acknowledged run does), and what its templates will see (the
entity, the entities its inputs name, who triggered it). A run that may go ahead gets an
outbox row in the same transaction (`queue`), which the relay hands to the worker
(app/dispatch). A run that needs approval waits in WAITING_FOR_APPROVAL until an approver
approves (then it is queued) or declines it (DECLINED, ended).

Statuses: IN_PROGRESS, SUCCESS, FAILURE, WAITING_FOR_APPROVAL, DECLINED. A run ends when a
status is reported (PATCH, a log with `terminationStatus`, a synchronized webhook's answer,
a permanent dispatch failure) and an ended run's status never changes again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from app.actions import inputs
from app.auth import permissions
from app.auth.principal import Principal
from app.catalog import blueprints as bp_service
from app.db.database import Database, Tx
from app.dispatch import templates
from app.kit.errors import Conflict, Invalid, NotFound
from app.search.service import prepare

ACTIVE = ("IN_PROGRESS", "WAITING_FOR_APPROVAL")
ENDED = ("SUCCESS", "FAILURE", "DECLINED")
SOURCES = ("UI", "API", "AUTOMATION")
NOTIFY_CHANNEL = "portolan_dispatch"
AUTOMATION_ACTOR = "automation"  # who starts an automation's runs
# Dispatch states in which a run has not reached its backend yet, and those of a claim.
PENDING = ("waiting", "queued", "retrying", "claimable", "claimed")
CLAIMED = ("dispatching", "claimed")
INTEGRATION_ACTION = "INTEGRATION_ACTION"
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
_ENTITY_KEYS = ("identifier", "title", "icon", "team", "properties", "relations", "blueprint")

_SELECT = """
SELECT r.*, a.identifier IS NULL AS action_deleted,
       b.title AS blueprint_title, b.icon AS blueprint_icon,
       (r.blueprint IS NOT NULL AND b.identifier IS NULL) AS blueprint_deleted,
       (r.entity IS NOT NULL AND e.identifier IS NULL) AS entity_deleted
FROM action_runs r
LEFT JOIN actions a ON a.org_id = r.org_id AND a.identifier = r.action
LEFT JOIN blueprints b ON b.org_id = r.org_id AND b.identifier = r.blueprint
LEFT JOIN entities e ON e.org_id = r.org_id AND e.blueprint = r.blueprint
     AND e.identifier = r.entity
"""


def _now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def new_run_id() -> str:
    return "r_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(16))


def to_api(row: asyncpg.Record) -> dict[str, Any]:
    definition = row["definition"]
    out: dict[str, Any] = {
        "id": row["id"],
        "status": row["status"],
        "action": {
            "identifier": row["action"],
            "title": definition.get("title"),
            "icon": definition.get("icon"),
            "deleted": row["action_deleted"],
        },
        "properties": row["properties"],
        "rawProperties": row["raw_properties"],
        "source": row["source"],
        "requiredApproval": row["required_approval"],
        "link": row["link"],
        "summary": row["summary"],
        "externalRunId": row["external_run_id"],
        "endedAt": row["ended_at"],
        "pendingExecution": row["dispatch_state"] in PENDING,
        "claimedUntil": row["lease_until"] if row["dispatch_state"] in CLAIMED else None,
        "createdBy": row["created_by"],
        "updatedBy": row["updated_by"],
        "createdAt": row["created_at"],
        "updatedAt": row["updated_at"],
    }
    if row["status_label"] is not None:
        out["statusLabel"] = row["status_label"]
    if row["blueprint"] is not None:
        out["blueprint"] = {
            "identifier": row["blueprint"],
            "title": row["blueprint_title"],
            "icon": row["blueprint_icon"],
            "deleted": row["blueprint_deleted"],
        }
    if row["entity"] is not None:
        snapshot = row["context"].get("entity") or {}
        out["entity"] = {
            "identifier": row["entity"],
            "title": snapshot.get("title"),
            "icon": snapshot.get("icon"),
            "deleted": row["entity_deleted"],
        }
    if row["installation_id"] is not None:
        out["installationId"] = row["installation_id"]
    if row["approval"] is not None:
        out["approval"] = row["approval"]
    if row["payload"] is not None:
        out["payload"] = row["payload"]
    if row["response"] is not None:
        out["response"] = row["response"]
    return out


def _hash(action: str, body: dict[str, Any]) -> str:
    canonical = json.dumps([action, body], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


async def _row(tx: Tx, run_id: str, *, lock: bool = False) -> asyncpg.Record:
    row = await tx.fetchrow(
        _SELECT + " WHERE r.org_id = $1 AND r.id = $2" + (" FOR UPDATE OF r" if lock else ""),
        tx.org_id,
        run_id,
    )
    if row is None:
        raise NotFound(f"Run {run_id!r} was not found")
    return row


async def get(tx: Tx, run_id: str) -> dict[str, Any]:
    return to_api(await _row(tx, run_id))


async def _entities(tx: Tx, blueprint: str, identifiers: list[str]) -> dict[str, dict[str, Any]]:
    """The entities (API shape, derived properties included) by identifier."""
    if not identifiers:
        return {}
    rules = [{"property": "$identifier", "operator": "in", "value": identifiers}]
    search = await prepare(tx, blueprint, {"combinator": "and", "rules": rules})
    found, _ = await search.page(tx, None, len(identifiers))
    return {e["identifier"]: {k: e[k] for k in _ENTITY_KEYS if k in e} for e in found}


async def _matches_condition(
    tx: Tx, blueprint: str, identifier: str, condition: dict[str, Any]
) -> bool:
    query = {
        "combinator": "and",
        "rules": [
            {"property": "$identifier", "operator": "=", "value": identifier},
            {k: v for k, v in condition.items() if k != "type"},
        ],
    }
    search = await prepare(tx, blueprint, query, calculated=False)
    found, _ = await search.page(tx, None, 1)
    return bool(found)


@dataclass(frozen=True)
class Required:
    """An action's `required: {jqQuery}` and what it gave for a run's inputs, evaluated
    before the run's transaction opens (no connection is held while jq runs)."""

    query: str
    names: list[str]


def _required_query(trigger: dict[str, Any]) -> str | None:
    required = (trigger.get("userInputs") or {}).get("required")
    return str(required["jqQuery"]) if isinstance(required, dict) else None


async def prepare_required(
    db: Database, org_id: uuid.UUID, action_id: str, body: Any
) -> Required | None:
    """Read the action's `required` jqQuery in a short transaction of its own, then
    evaluate it over the run's inputs with no connection held; None when it has none."""
    async with db.tenant(org_id) as tx:
        trigger = await tx.fetchval(
            "SELECT trigger FROM actions WHERE org_id = $1 AND identifier = $2",
            org_id,
            action_id,
        )
    query = _required_query(trigger) if isinstance(trigger, dict) else None
    if query is None:
        return None
    raw = body.get("properties", {}) if isinstance(body, dict) else {}
    try:
        value = await templates.render("{{ " + query + " }}", {"form": raw}, org=org_id)
    except templates.TemplateError as exc:
        raise Invalid(f"The action's required jqQuery failed: {exc}") from exc
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Invalid("The action's required jqQuery must give a list of input names")
    return Required(query, list(value))


async def queue(tx: Tx, run_id: str, attempt: int, delay_seconds: float = 0.0) -> None:
    """Make the run dispatchable: an outbox row, and a wake-up for the relay on commit."""
    await tx.execute(
        "INSERT INTO dispatch_outbox (org_id, run_id, attempt, available_at) "
        "VALUES ($1, $2, $3, now() + make_interval(secs => $4))",
        tx.org_id,
        run_id,
        attempt,
        delay_seconds,
    )
    await tx.execute(f"NOTIFY {NOTIFY_CHANNEL}")


async def log(
    tx: Tx,
    run_id: str,
    actor: str,
    message: str,
    *,
    termination_status: str | None = None,
    status_label: str | None = None,
) -> asyncpg.Record:
    row = await tx.fetchrow(
        "INSERT INTO action_run_logs (org_id, run_id, message, termination_status, "
        "status_label, created_by) VALUES ($1, $2, $3, $4, $5, $6) "
        "RETURNING id, run_id, message, termination_status, status_label, created_by, created_at",
        tx.org_id,
        run_id,
        message,
        termination_status,
        status_label,
        actor,
    )
    assert row is not None
    return row


def log_to_api(row: asyncpg.Record) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": str(row["id"]),
        "runId": row["run_id"],
        "message": row["message"],
        "createdBy": row["created_by"],
        "createdAt": row["created_at"],
    }
    if row["termination_status"] is not None:
        out["terminationStatus"] = row["termination_status"]
    if row["status_label"] is not None:
        out["statusLabel"] = row["status_label"]
    return out


async def create(
    tx: Tx,
    actor: str,
    action_id: str,
    body: Any,
    *,
    source: str = "API",
    idempotency_key: str | None = None,
    principal: Principal | None = None,
    required: Required | None = None,
) -> tuple[dict[str, Any], bool]:
    """The new run (and True), or for a repeated Idempotency-Key the first run (and False).
    With a `principal`, it must hold the action's execute permission. An action with a
    `required` jqQuery needs `required` from prepare_required."""
    if not isinstance(body, dict):
        raise Invalid("A run is {properties: {...}, entity?}")
    request_hash = _hash(action_id, body)
    if idempotency_key is not None:
        earlier = await _by_key(tx, actor, idempotency_key, request_hash)
        if earlier is not None:
            return earlier, False
    action = await tx.fetchrow(
        "SELECT identifier, title, icon, description, trigger, invocation_method, "
        "required_approval, publish FROM actions WHERE org_id = $1 AND identifier = $2",
        tx.org_id,
        action_id,
    )
    if action is None:
        raise NotFound(f"Action {action_id!r} was not found")
    trigger = action["trigger"]
    if trigger.get("type") != "self-service":
        raise Invalid(
            f"Action {action_id!r} is an automation: its runs are created by its events",
            code="not_self_service",
        )
    if not action["publish"]:
        raise Invalid(f"Action {action_id!r} is not published", code="action_not_published")
    unknown = sorted(set(body) - {"properties", "entity"})
    if unknown:
        raise Invalid(f"A run takes properties and entity, not {', '.join(unknown)}")
    raw = body.get("properties", {})
    blueprint: str | None = trigger.get("blueprintIdentifier")
    operation = trigger.get("operation")
    entity = await _target_entity(tx, action_id, trigger, body.get("entity"))
    if principal is not None:
        definition = None if blueprint is None else functools.partial(bp_service.get, tx, blueprint)
        await permissions.require_execute(tx, principal, dict(action), entity, definition)
    user_inputs = trigger.get("userInputs") or {}
    query = _required_query(trigger)
    if query is not None and (required is None or required.query != query):
        raise Conflict("The action changed while the run was being created; retry")
    checked = inputs.check(user_inputs, raw, required.names if query and required else None)
    input_entities = await _input_entities(tx, checked)
    now = datetime.now(UTC)
    context = {
        "trigger": {
            "by": {"orgId": str(tx.org_id), "userId": actor},
            "origin": source,
            "at": now.isoformat().replace("+00:00", "Z"),
            "operation": operation,
        },
        "entity": entity,
        "inputEntities": input_entities,
    }
    run_id = await insert_run(
        tx,
        actor=actor,
        action=action,
        properties=checked.properties,
        raw_properties=raw,
        blueprint=blueprint,
        entity=entity["identifier"] if entity else None,
        context=context,
        source=source,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
    )
    if run_id is None:
        # Another request with the same key committed first.
        assert idempotency_key is not None
        earlier = await _by_key(tx, actor, idempotency_key, request_hash)
        if earlier is None:
            raise Conflict("A run with this Idempotency-Key is being created; retry")
        return earlier, False
    return await get(tx, run_id), True


async def insert_run(
    tx: Tx,
    *,
    actor: str,
    action: asyncpg.Record,
    properties: dict[str, Any],
    blueprint: str | None,
    entity: str | None,
    context: dict[str, Any],
    source: str,
    idempotency_key: str | None = None,
    raw_properties: dict[str, Any] | None = None,
    request_hash: str | None = None,
) -> str | None:
    """Record a run of `action` (its definition kept as it is now) and queue it, or leave it
    waiting for approval; its id, or None when the idempotency key already made one."""
    definition = {
        "identifier": action["identifier"],
        "title": action["title"],
        "icon": action["icon"],
        "trigger": action["trigger"],
        "invocationMethod": action["invocation_method"],
    }
    approval = action["required_approval"]
    waits = approval is True or isinstance(approval, dict)
    installation = installation_of(action["invocation_method"])
    ready = "claimable" if installation is not None else "queued"
    run_id = new_run_id()
    inserted = await tx.fetchval(
        "INSERT INTO action_runs (org_id, id, action, definition, blueprint, entity, "
        "properties, raw_properties, context, source, status, required_approval, "
        "dispatch_state, idempotency_key, request_hash, created_by, updated_by, "
        "installation_id) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $16, "
        "$17) "
        "ON CONFLICT (org_id, created_by, idempotency_key) WHERE idempotency_key IS NOT NULL "
        "DO NOTHING RETURNING id",
        tx.org_id,
        run_id,
        action["identifier"],
        definition,
        blueprint,
        entity,
        properties,
        properties if raw_properties is None else raw_properties,
        context,
        source,
        "WAITING_FOR_APPROVAL" if waits else "IN_PROGRESS",
        approval,
        "waiting" if waits else ready,
        idempotency_key,
        request_hash,
        actor,
        installation,
    )
    if inserted is None:
        return None
    if waits:
        await log(tx, run_id, actor, "The run waits for approval")
    else:
        await release(tx, run_id, installation, actor)
    return run_id


def installation_of(method: Any) -> str | None:
    """The integration that claims an INTEGRATION_ACTION's runs; None for the invocations
    Portolan dispatches itself."""
    if isinstance(method, dict) and method.get("type") == INTEGRATION_ACTION:
        return str(method["installationId"])
    return None


async def release(tx: Tx, run_id: str, installation: str | None, actor: str) -> None:
    """A run that may go ahead: queued for dispatch, or left for its integration to claim
    (nothing is sent: the integration asks, docs/actions.md)."""
    if installation is None:
        await queue(tx, run_id, 1)
    else:
        await log(tx, run_id, actor, f"The run waits for integration {installation!r} to claim it")


async def _by_key(tx: Tx, actor: str, key: str, request_hash: str) -> dict[str, Any] | None:
    row = await tx.fetchrow(
        _SELECT + " WHERE r.org_id = $1 AND r.created_by = $2 AND r.idempotency_key = $3",
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
    return to_api(row)


async def _target_entity(
    tx: Tx, action_id: str, trigger: dict[str, Any], given: Any
) -> dict[str, Any] | None:
    operation = trigger.get("operation")
    blueprint = trigger.get("blueprintIdentifier")
    if operation == "CREATE" or blueprint is None:
        if given is not None:
            raise Invalid(f"A {operation} action runs without an entity", code="invalid_entity")
        return None
    if not isinstance(given, str) or not given:
        raise Invalid(
            f"A {operation} action runs on an entity of {blueprint!r}: give its identifier",
            details=[{"pointer": "/entity", "message": "required"}],
        )
    found = (await _entities(tx, blueprint, [given])).get(given)
    if found is None:
        raise Invalid(
            f"Entity {given!r} of blueprint {blueprint!r} was not found",
            details=[{"pointer": "/entity", "message": "not found"}],
        )
    condition = trigger.get("condition")
    if condition is not None and not await _matches_condition(tx, blueprint, given, condition):
        raise Invalid(
            f"Entity {given!r} does not meet the condition of action {action_id!r}",
            code="condition_not_met",
        )
    return found


async def _input_entities(tx: Tx, checked: inputs.Checked) -> dict[str, Any]:
    """The entities `entity` inputs name (templates see them), or Invalid for missing ones."""
    out: dict[str, Any] = {}
    problems = []
    for ref in checked.entity_refs:
        found = await _entities(tx, ref.blueprint, ref.identifiers)
        for ident in ref.identifiers:
            if ident not in found:
                problems.append(
                    {
                        "pointer": f"/properties/{ref.name}",
                        "message": f"entity {ident!r} of blueprint {ref.blueprint!r} not found",
                    }
                )
        listed = [found[i] for i in ref.identifiers if i in found]
        out[ref.name] = listed if ref.many else (listed[0] if listed else None)
    if problems:
        summary = "; ".join(f"{p['pointer']}: {p['message']}" for p in problems[:5])
        raise Invalid(f"The run's inputs are invalid: {summary}", details=problems)
    return out


async def list_runs(
    tx: Tx,
    *,
    action: str | None = None,
    entity: str | None = None,
    blueprint: str | None = None,
    active: bool | None = None,
    statuses: list[str] | None = None,
    user: str | None = None,
    external_run_id: str | None = None,
    sources: list[str] | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    rows = await tx.fetch(
        _SELECT + " WHERE r.org_id = $1"
        " AND ($2::text IS NULL OR r.action = $2)"
        " AND ($3::text IS NULL OR r.entity = $3)"
        " AND ($4::text IS NULL OR r.blueprint = $4)"
        " AND ($5::boolean IS NULL OR (r.status = ANY($10::text[])) = $5)"
        " AND ($6::text[] IS NULL OR r.status = ANY($6::text[]))"
        " AND ($7::text IS NULL OR r.created_by = $7)"
        " AND ($8::text IS NULL OR r.external_run_id = $8)"
        " AND ($9::text[] IS NULL OR r.source = ANY($9::text[]))"
        " ORDER BY r.created_at DESC, r.id DESC LIMIT $11",
        tx.org_id,
        action,
        entity,
        blueprint,
        active,
        statuses,
        user,
        external_run_id,
        sources,
        list(ACTIVE),
        limit,
    )
    return [to_api(r) for r in rows]


def _check_status(value: Any) -> str | None:
    if value is None:
        return None
    if value not in ("SUCCESS", "FAILURE"):
        raise Invalid(
            "status is SUCCESS or FAILURE", details=[{"pointer": "/status", "message": "invalid"}]
        )
    return str(value)


def _check_link(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise Invalid("link is a URL or a list of URLs")


async def update(tx: Tx, actor: str, run_id: str, body: Any) -> dict[str, Any]:
    """PATCH: each given key overrides the previous value; `status` ends the run."""
    if not isinstance(body, dict):
        raise Invalid("The body is an object")
    allowed = {"status", "statusLabel", "link", "summary", "externalRunId", "message"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise Invalid(f"Unknown field(s) {', '.join(unknown)}")
    status = _check_status(body.get("status"))
    link = _check_link(body.get("link"))
    for key in ("statusLabel", "summary", "externalRunId", "message"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise Invalid(f"{key} must be a string")
    row = await _row(tx, run_id, lock=True)
    if status is not None:
        if row["status"] == "WAITING_FOR_APPROVAL":
            raise Invalid(f"Run {run_id!r} waits for approval", code="run_not_in_progress")
        if row["status"] != "IN_PROGRESS":
            raise Invalid(
                f"Run {run_id!r} has ended ({row['status']}); its status cannot change",
                code="run_ended",
            )
    await tx.execute(
        "UPDATE action_runs SET "
        "status = coalesce($3, status), "
        "status_label = CASE WHEN $4::boolean THEN $5 ELSE status_label END, "
        "link = CASE WHEN $6::boolean THEN $7::jsonb ELSE link END, "
        "summary = CASE WHEN $8::boolean THEN $9 ELSE summary END, "
        "external_run_id = CASE WHEN $10::boolean THEN $11 ELSE external_run_id END, "
        "ended_at = CASE WHEN $3 IS NULL THEN ended_at ELSE now() END, "
        "dispatch_state = CASE WHEN $3 IS NULL THEN dispatch_state ELSE 'done' END, "
        "updated_at = now(), updated_by = $12 WHERE org_id = $1 AND id = $2",
        tx.org_id,
        run_id,
        status,
        "statusLabel" in body,
        body.get("statusLabel"),
        "link" in body,
        link,
        "summary" in body,
        body.get("summary"),
        "externalRunId" in body,
        body.get("externalRunId"),
        actor,
    )
    if body.get("message"):
        await log(tx, run_id, actor, body["message"])
    return await get(tx, run_id)


async def add_log(
    tx: Tx,
    actor: str,
    run_id: str,
    message: Any,
    termination_status: Any = None,
    status_label: Any = None,
) -> dict[str, Any]:
    if not isinstance(message, str) or not message:
        raise Invalid("message is required", details=[{"pointer": "/message", "message": "x"}])
    if status_label is not None and not isinstance(status_label, str):
        raise Invalid("statusLabel must be a string")
    status = _check_status(termination_status)
    row = await _row(tx, run_id, lock=True)
    if status is not None:
        if await tx.fetchval(
            "SELECT 1 FROM action_run_logs WHERE org_id = $1 AND run_id = $2 "
            "AND termination_status IS NOT NULL",
            tx.org_id,
            run_id,
        ):
            raise Conflict(
                f"Run {run_id!r} already has a log with a terminationStatus",
                code="run_already_terminated",
            )
        if row["status"] != "IN_PROGRESS":
            raise Invalid(
                f"Run {run_id!r} is {row['status']}; only a run in progress can be terminated",
                code="run_ended" if row["status"] in ENDED else "run_not_in_progress",
            )
        await tx.execute(
            "UPDATE action_runs SET status = $3, ended_at = now(), dispatch_state = 'done', "
            "status_label = coalesce($4, status_label), updated_at = now(), updated_by = $5 "
            "WHERE org_id = $1 AND id = $2",
            tx.org_id,
            run_id,
            status,
            status_label,
            actor,
        )
    elif status_label is not None:
        await tx.execute(
            "UPDATE action_runs SET status_label = $3, updated_at = now(), updated_by = $4 "
            "WHERE org_id = $1 AND id = $2",
            tx.org_id,
            run_id,
            status_label,
            actor,
        )
    written = await log(
        tx, run_id, actor, message, termination_status=status, status_label=status_label
    )
    return log_to_api(written)


async def logs(
    tx: Tx, run_id: str, *, limit: int = 50, offset: int = 0, after: int = 0
) -> list[dict[str, Any]]:
    await _row(tx, run_id)
    rows = await tx.fetch(
        "SELECT id, run_id, message, termination_status, status_label, created_by, created_at "
        "FROM action_run_logs WHERE org_id = $1 AND run_id = $2 AND id > $3 "
        "ORDER BY id LIMIT $4 OFFSET $5",
        tx.org_id,
        run_id,
        after,
        limit,
        offset,
    )
    return [log_to_api(r) for r in rows]


_DECIDED = {"APPROVE": "APPROVED", "DECLINE": "DECLINED"}


async def approvers(tx: Tx, run_id: str, *, include_pending: bool) -> list[dict[str, Any]]:
    """Port's `approvers` of a run: each decision given (`APPROVED` / `DECLINED`, with its
    description), in the order given; with `include_pending`, while the run waits for
    approval, every user the action's approve block names who has not decided (`PENDING`).
    A run that needs no approval has none."""
    row = await _row(tx, run_id)
    given = (row["approval"] or {}).get("approvals", [])
    out: list[dict[str, Any]] = [
        {
            "userId": a["userId"],
            "state": _DECIDED.get(a.get("decision"), "APPROVED"),
            "description": a.get("description"),
        }
        for a in given
    ]
    if include_pending and row["status"] == "WAITING_FOR_APPROVAL":
        decided = {a["userId"] for a in given}
        named = await permissions.approvers(tx, {"identifier": row["action"]})
        out += [
            {"userId": email, "state": "PENDING", "description": None}
            for email in sorted(named - decided)
        ]
    return out


async def decide(
    tx: Tx, principal: Principal, run_id: str, decision: Any, description: Any
) -> dict[str, Any]:
    """Approve or decline a waiting run, as one of the action's approvers. A decline ends it
    DECLINED. An approval queues it, except under `requiredApproval: {type: "ALL"}`: then it
    waits until every approver the action's approve block names has approved (the set is
    read at each decision; an action whose block names no user needs one approval)."""
    if decision not in ("APPROVE", "DECLINE"):
        raise Invalid(
            "status is APPROVE or DECLINE", details=[{"pointer": "/status", "message": "invalid"}]
        )
    if description is not None and not isinstance(description, str):
        raise Invalid("description must be a string")
    row = await _row(tx, run_id, lock=True)
    action = {"identifier": row["action"]}
    if not await permissions.may_approve(tx, principal, action):
        raise permissions.Denied("actions.approve", f"action {row['action']!r}")
    if row["status"] != "WAITING_FOR_APPROVAL":
        raise Invalid(
            f"Run {run_id!r} is {row['status']}; only a run waiting for approval is decided",
            code="run_not_waiting",
        )
    actor = principal.subject
    previous = row["approval"] or {}
    given = [a for a in previous.get("approvals", []) if a.get("userId") != actor]
    given.append(
        {"userId": actor, "decision": decision, "description": description, "at": _now_iso()}
    )
    approved = decision == "APPROVE"
    pending: list[str] = []
    required = row["required_approval"]
    if approved and isinstance(required, dict) and required.get("type") == "ALL":
        done = {a["userId"] for a in given if a["decision"] == "APPROVE"}
        pending = sorted(await permissions.approvers(tx, action) - done)
    if approved and pending:
        await tx.execute(
            "UPDATE action_runs SET approval = $3, updated_at = now(), updated_by = $4 "
            "WHERE org_id = $1 AND id = $2",
            tx.org_id,
            run_id,
            {"state": "PENDING", "approvals": given, "pending": pending},
            actor,
        )
        note = f": {description}" if description else ""
        await log(
            tx,
            run_id,
            actor,
            f"Approved by {actor}{note}; waiting for {len(pending)} more approver(s)",
        )
        return await get(tx, run_id)
    approval: dict[str, Any] = {
        "state": "APPROVED" if approved else "DECLINED",
        "userId": actor,
        "description": description,
        "approvals": given,
    }
    await tx.execute(
        "UPDATE action_runs SET status = $3, approval = $4, dispatch_state = $5, "
        "ended_at = CASE WHEN $6 THEN NULL ELSE now() END, updated_at = now(), "
        "updated_by = $7 WHERE org_id = $1 AND id = $2",
        tx.org_id,
        run_id,
        "IN_PROGRESS" if approved else "DECLINED",
        approval,
        ("queued" if row["installation_id"] is None else "claimable") if approved else "done",
        approved,
        actor,
    )
    verb = "approved" if approved else "declined"
    note = f": {description}" if description else ""
    await log(tx, run_id, actor, f"The run was {verb} by {actor}{note}")
    if approved:
        await release(tx, run_id, row["installation_id"], actor)
    return await get(tx, run_id)
