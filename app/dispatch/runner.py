"""One attempt at dispatching a run: claim it, render its invocation, invoke, record.

arq runs a job at least once, so the claim is a conditional update: it succeeds only for a
run still IN_PROGRESS whose dispatch waits for exactly this attempt (`attempts` is the
attempt before it). A second job for the same attempt, a job for a run the backend already
finished, or one for a declined run claims nothing and does nothing. The claim holds a lease
(`PORTOLAN_DISPATCH_LEASE_SECONDS`); the sweeper (`sweep_expired`) hands a run whose lease
ran out (its worker died) to a new attempt.

Outcomes are recorded under the claim: a success or failure ends the run with a log line;
`accepted` leaves it IN_PROGRESS for the backend to report; a transient failure schedules
the next attempt through the outbox after an exponential backoff with jitter, until
`PORTOLAN_DISPATCH_MAX_ATTEMPTS`, when the run ends in FAILURE. UPSERT_ENTITY writes the
entity and ends the run in one transaction.
"""

from __future__ import annotations

import copy
import logging
import random
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from app.actions import runs
from app.actions.runs import AUTOMATION_ACTOR
from app.auth.permissions import EntityGuard
from app.auth.principal import principal_of
from app.catalog import entities
from app.config import Settings
from app.db.database import Database, Tx
from app.dispatch import invokers, templates
from app.kit import sandbox
from app.kit.crypto import Cipher, cipher_for
from app.kit.errors import Forbidden, PortolanError
from app.kit.outbound import Allowed
from app.search.calc import calculate
from app.search.service import scope_for
from app.secrets import service as secrets_service

log = logging.getLogger("portolan.dispatch")
WORKER = "portolan-dispatcher"
_MAX_RESPONSE_LOG = 500


@dataclass
class Claim:
    org_id: uuid.UUID
    run: asyncpg.Record
    token: uuid.UUID
    secrets: dict[str, str]  # the org's secrets the invocation names, decrypted
    signing_secret: str  # for webhooks ("" otherwise)
    # The definitions of the run's entities' blueprints that have calculation properties.
    calculated: dict[str, dict[str, Any]]


def run_entities(context: dict[str, Any]) -> list[dict[str, Any]]:
    """The entities a run's templates see: its entity and the entities its inputs name."""
    found = [context["entity"]] if isinstance(context.get("entity"), dict) else []
    for value in (context.get("inputEntities") or {}).values():
        for entity in value if isinstance(value, list) else [value]:
            if isinstance(entity, dict):
                found.append(entity)
    return found


def wanted_secrets(method: dict[str, Any]) -> set[str]:
    """The secrets an invocation reads: those its templates name, and its token. An
    UPSERT_ENTITY run reads none: what it writes, tenants read back."""
    if method.get("type") == "UPSERT_ENTITY":
        return set()
    wanted = templates.referenced_secrets(method)
    if method.get("type") == "GITHUB":
        wanted.add(method.get("tokenSecret") or "GITHUB_TOKEN")
    elif method.get("type") == "GITLAB":
        wanted.add(method.get("tokenSecret") or "GITLAB_TRIGGER_TOKEN")
    return wanted


async def claim(
    db: Database, cipher: Cipher, org_id: uuid.UUID, run_id: str, attempt: int, lease: float
) -> Claim | None:
    """Claim the run for this attempt and read the secrets it needs, in one transaction.
    The attempt's outbox row (and any older one) is deleted whether or not the claim
    succeeds: a failed claim means another job took this attempt or the run moved on."""
    token = uuid.uuid4()
    async with db.tenant(org_id) as tx:
        row = await tx.fetchrow(
            "WITH claimed AS (UPDATE action_runs SET dispatch_state = 'dispatching', "
            "attempts = attempts + 1, claim = $3, lease_until = now() + make_interval(secs => $4), "
            "next_attempt_at = NULL, updated_at = now() "
            "WHERE org_id = $1 AND id = $2 AND status = 'IN_PROGRESS' "
            "AND dispatch_state IN ('queued', 'retrying') AND attempts = $5 - 1 RETURNING *), "
            "done AS (DELETE FROM dispatch_outbox WHERE org_id = $1 AND run_id = $2 "
            "AND attempt <= $5) "
            "SELECT * FROM claimed",
            org_id,
            run_id,
            token,
            lease,
            attempt,
        )
        if row is None:
            return None
        method: dict[str, Any] = row["definition"]["invocationMethod"]
        wanted = wanted_secrets(method)
        known = await secrets_service.reveal(tx, cipher, names=wanted) if wanted else {}
        signing = (
            await secrets_service.signing_secret(tx, cipher)
            if method.get("type") == "WEBHOOK"
            else ""
        )
        named = {e.get("blueprint") for e in run_entities(row["context"])}
        scope = await scope_for(tx, None, None) if named else None
        calculated = {
            bp: definition
            for bp, definition in (scope.blueprints.items() if scope else ())
            if bp in named and definition.get("calculationProperties")
        }
    return Claim(org_id, row, token, known, signing, calculated)


def trigger_data(run: asyncpg.Record, secrets: dict[str, str]) -> dict[str, Any]:
    """What `{{ jq }}` templates see (Port's trigger data)."""
    definition = run["definition"]
    context = run["context"]
    inputs = dict(run["properties"])
    inputs.update(context.get("inputEntities") or {})
    return {
        "inputs": inputs,
        "trigger": context.get("trigger") or {},
        "entity": context.get("entity") or {},
        "action": {
            "identifier": definition["identifier"],
            "blueprint": definition["trigger"].get("blueprintIdentifier"),
            "encryptedProperties": [],
        },
        "run": {"id": run["id"]},
        "event": context.get("event"),
        "secrets": secrets,
    }


def derived(real: Any, masked: Any, found: list[str] | None = None) -> list[str]:
    """The parts of the real rendering that differ from the masked one: what secrets
    became (encoded, cut, spelled out), to be masked wherever they come back (a message
    that quotes a header name or a host, a receiver echoing a header)."""
    found = [] if found is None else found
    if isinstance(real, str) and isinstance(masked, str):
        if real != masked:
            start = 0
            while start < min(len(real), len(masked)) and real[start] == masked[start]:
                start += 1
            end = 0
            while (
                end < min(len(real), len(masked)) - start
                and real[len(real) - 1 - end] == masked[len(masked) - 1 - end]
            ):
                end += 1
            part = real[start : len(real) - end]
            if len(part) >= 4:
                found.append(part)
    elif isinstance(real, dict) and isinstance(masked, dict):
        for (key, value), (masked_key, masked_value) in zip(
            real.items(), masked.items(), strict=False
        ):
            derived(key, masked_key, found)
            derived(value, masked_value, found)
    elif isinstance(real, list) and isinstance(masked, list):
        for value, masked_value in zip(real, masked, strict=False):
            derived(value, masked_value, found)
    elif real != masked and not isinstance(real, bool) and isinstance(real, int | float):
        if len(str(real)) >= 4:
            found.append(str(real))
    return found


def redact(value: Any, secrets: list[str]) -> Any:
    """The value with every secret that was rendered into it replaced."""
    if not secrets:
        return value
    if isinstance(value, str):
        return templates.redact(value, secrets)
    if isinstance(value, dict):
        return {redact(k, secrets): redact(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, secrets) for v in value]
    return value


# An attempt's outcome, under its claim: the run's row, and (in _RECORD) its log line.
_ENDED = (
    "UPDATE action_runs SET dispatch_state = $4, "
    "status = coalesce($5, status), "
    "ended_at = {ended_at}, "
    "claim = NULL, lease_until = NULL, "
    "next_attempt_at = {next_attempt_at}, "
    "link = coalesce($7::jsonb, link), external_run_id = coalesce($8, external_run_id), "
    "response = coalesce($9::jsonb, response), payload = coalesce($10::jsonb, payload), "
    "updated_at = now(), updated_by = $11 "
    "WHERE org_id = $1 AND id = $2 AND claim = $3 AND dispatch_state = 'dispatching' "
    "AND status = 'IN_PROGRESS' RETURNING attempts"
)
_RECORD = (
    "WITH ended AS ("  # noqa: S608 - constants
    + _ENDED.format(
        ended_at="CASE WHEN $5 IS NULL THEN ended_at ELSE now() END",
        next_attempt_at="CASE WHEN $6::float8 IS NULL THEN NULL "
        "ELSE now() + make_interval(secs => $6) END",
    )
    + "), logged AS (INSERT INTO action_run_logs (org_id, run_id, message, created_by) "
    "SELECT $1, $2, $12, $11 FROM ended) "
    "SELECT attempts FROM ended"
)


def _ended_on_citus(*, ends: bool, retries: bool) -> str:
    """_ENDED for Citus, which refuses `now()` inside CASE in a write: the branch is
    chosen here (the values stay parameters; $6, NULL when not retrying, is still named
    so its type is known)."""
    return _ENDED.format(
        ended_at="now()" if ends else "ended_at",
        next_attempt_at="now() + make_interval(secs => $6::float8)"
        if retries
        else "CASE WHEN $6::float8 IS NULL THEN NULL::timestamptz END",
    )


async def _record(
    db: Database,
    held: Claim,
    *,
    state: str,
    message: str,
    status: str | None = None,
    fields: dict[str, Any] | None = None,
    retry_in: float | None = None,
) -> bool:
    """Write an attempt's outcome under its claim; False when the claim was lost (the
    backend finished the run first, or the lease expired and another attempt began)."""
    fields = fields or {}
    run_id = held.run["id"]
    values = (
        held.org_id,
        run_id,
        held.token,
        state,
        status,
        retry_in,
        fields.get("link"),
        fields.get("external_run_id"),
        fields.get("response"),
        fields.get("payload"),
        WORKER,
    )
    async with db.tenant(held.org_id) as tx:
        if tx.citus:
            # The log in a statement of its own: Citus would pull the CTE's INSERT ...
            # SELECT through the coordinator (a transaction over two nodes for one org).
            ended = _ended_on_citus(ends=status is not None, retries=retry_in is not None)
            done = await tx.fetchval(ended, *values)
            if done is not None:
                await runs.log(tx, run_id, WORKER, message)
        else:
            done = await tx.fetchval(_RECORD, *values, message)
        if done is None:
            return False
        if retry_in is not None:
            await runs.queue(tx, run_id, int(done) + 1, retry_in)
    return True


def backoff(settings: Settings, attempt: int, retry_after: float | None) -> float:
    """Exponential from the base, capped, with jitter (half to all of the step); never
    sooner than the receiver's Retry-After."""
    step = min(
        settings.dispatch_retry_max_seconds,
        settings.dispatch_retry_base_seconds * float(2 ** max(0, attempt - 1)),
    )
    delay = step * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret
    if retry_after is not None:
        delay = max(delay, min(retry_after, settings.dispatch_retry_max_seconds))
    return delay


async def dispatch(
    settings: Settings, db: Database, org_id: uuid.UUID, run_id: str, attempt: int
) -> str:
    """Run one attempt of a run; what happened, in a word (for the job's result)."""
    cipher = cipher_for(settings)
    held = await claim(db, cipher, org_id, run_id, attempt, settings.dispatch_lease_seconds)
    if held is None:
        return "skipped"
    try:
        return await _attempt(settings, db, held)
    except sandbox.Busy as exc:
        # The org's jq turns are taken (its own backlog): a transient failure.
        return await _transient(settings, db, held, f"the invocation was not rendered: {exc}")


async def _transient(
    settings: Settings,
    db: Database,
    held: Claim,
    message: str,
    *,
    fields: dict[str, Any] | None = None,
    retry_after: float | None = None,
) -> str:
    """A failure worth another attempt: scheduled after a backoff, or the run ends in
    FAILURE once its attempts are spent."""
    attempts = int(held.run["attempts"])
    if attempts >= settings.dispatch_max_attempts:
        await _record(
            db,
            held,
            state="done",
            status="FAILURE",
            message=f"{message}; gave up after {attempts} attempts",
            fields=fields,
        )
        return "failure"
    delay = backoff(settings, attempts, retry_after)
    await _record(
        db,
        held,
        state="retrying",
        message=f"{message}; attempt {attempts} of {settings.dispatch_max_attempts}, "
        f"next in {delay:.1f} s",
        fields=fields,
        retry_in=delay,
    )
    return "retrying"


async def _attempt(settings: Settings, db: Database, held: Claim) -> str:
    org_id, run_id = held.org_id, held.run["id"]
    run = held.run
    # The run's entities' calculation properties, evaluated now (no transaction open):
    # the run recorded their stored and derived properties.
    for blueprint, definition in held.calculated.items():
        found = [e for e in run_entities(run["context"]) if e.get("blueprint") == blueprint]
        await calculate(definition, found, org=org_id)
        for entity in found:
            entity.pop("calculationErrors", None)
    method: dict[str, Any] = run["definition"]["invocationMethod"]
    kind = method.get("type")
    known, signing = held.secrets, held.signing_secret
    named = templates.referenced_secrets(method)
    template = {k: v for k, v in method.items() if k != "type"}
    if kind == "UPSERT_ENTITY":
        if named:
            return await _fail(
                db,
                held,
                f"secret {sorted(named)[0]} cannot be used by UPSERT_ENTITY: secrets go into "
                "outbound requests only, never into an entity",
            )
        try:
            rendered = await templates.render(template, trigger_data(run, {}), org=org_id)
        except templates.TemplateError as exc:
            return await _fail(db, held, f"the invocation's template failed: {exc}")
        if not isinstance(rendered, dict):
            return await _fail(db, held, "the invocation did not render to an object")
        return await _upsert_entity(db, held, rendered)
    missing = sorted(name for name in named if name not in known)
    if missing:
        return await _fail(db, held, f"secret {missing[0]} is not defined in the organization")
    # Templates see the secrets they name (not the invoker's token unless named). Readers
    # of the run see the invocation rendered with every secret replaced by a mask, so no
    # value derived from a secret (encoded, hashed, cut) is ever stored or shown.
    data = trigger_data(run, {name: known[name] for name in named})
    masked = trigger_data(run, dict.fromkeys(named, templates.MASK))
    shown = [v for v in known.values() if v]
    try:
        rendered = await templates.render(template, data, org=org_id)
    except templates.TemplateError:
        # jq's message could carry a secret-derived value: say what the masked render says.
        try:
            await templates.render(template, masked, org=org_id)
            reason = "it failed with the organization's secret values (the message is withheld)"
        except templates.TemplateError as exc:
            reason = str(exc)
        return await _fail(db, held, f"the invocation's template failed: {reason}")
    try:
        payload = (
            await templates.render(template, masked, org=org_id)
            if named
            else copy.deepcopy(rendered)
        )
    except templates.TemplateError:
        payload = dict(template)  # shown as written when the mask cannot stand in
    if not isinstance(rendered, dict) or not isinstance(payload, dict):
        return await _fail(db, held, "the invocation did not render to an object")
    rendered["type"] = payload["type"] = kind
    if kind == "WEBHOOK" and "body" not in method:
        rendered["body"] = payload["body"] = {k: v for k, v in data.items() if k != "secrets"}
    # Masked wherever they come back: the secrets, and what the templates made of them.
    shown = [*shown, *derived(rendered, payload)]
    context = invokers.Context(
        run_id=run_id,
        signing_secret=signing,
        secrets=known,
        allowed=Allowed.parse(settings.outbound_allow),
        github_api_url=settings.github_api_url,
        gitlab_api_url=settings.gitlab_api_url,
        timeout=settings.dispatch_timeout_seconds,
        inputs=dict(run["properties"]),
    )
    outcome = await invokers.invoke(rendered, context)
    message = redact(outcome.message, shown)
    fields = {
        "payload": payload,
        "link": outcome.link,
        "external_run_id": outcome.external_run_id,
        "response": redact(outcome.response, shown),
    }
    if outcome.state == "success":
        await _record(db, held, state="done", status="SUCCESS", message=message, fields=fields)
    elif outcome.state == "failure":
        await _record(db, held, state="done", status="FAILURE", message=message, fields=fields)
    elif outcome.state == "accepted":
        await _record(db, held, state="delivered", message=message, fields=fields)
    elif (
        await _transient(
            settings, db, held, message, fields=fields, retry_after=outcome.retry_after
        )
        == "failure"
    ):
        return "failure"
    return outcome.state


async def _fail(db: Database, held: Claim, message: str) -> str:
    await _record(db, held, state="done", status="FAILURE", message=message)
    return "failure"


async def _upsert_entity(db: Database, held: Claim, rendered: dict[str, Any]) -> str:
    """Write the mapped entity and end the run, in one transaction (so a retried job finds
    the run ended and writes nothing twice)."""
    mapping = rendered.get("mapping")
    blueprint = rendered.get("blueprintIdentifier")
    if not isinstance(mapping, dict) or not isinstance(blueprint, str):
        return await _fail(db, held, "the UPSERT_ENTITY mapping did not render to an entity")
    run = held.run
    flags = entities.WriteFlags(upsert=True, merge=True, run_id=run["id"])
    try:
        async with db.tenant(held.org_id) as tx:
            guard = await _authority(tx, run)
            writer = entities.Writer(
                actor=run["created_by"], origin="ACTION", datasource=None, guard=guard
            )
            outcome = (await entities.write(tx, blueprint, [mapping], flags, writer))[0]
            if outcome.error is not None:
                raise outcome.error
            ended = await _end_in(tx, held, "SUCCESS", _upserted(blueprint, outcome))
            if not ended:
                raise _ClaimLost()
    except _ClaimLost:
        return "skipped"
    except PortolanError as exc:
        return await _fail(db, held, f"the entity could not be written: {exc.message}")
    return "success"


async def _authority(tx: Tx, run: asyncpg.Record) -> EntityGuard | None:
    """Whose permissions a run's entity write needs, judged against the written entity's
    own blueprint: the run's starter as it stands now, or for an automation's run, the
    member who last saved the automation. None: an Admin's (no check needed)."""
    subject: str | None = run["created_by"]
    if subject == AUTOMATION_ACTOR:
        subject = await tx.fetchval(
            "SELECT updated_by FROM actions WHERE org_id = $1 AND identifier = $2",
            tx.org_id,
            run["definition"]["identifier"],
        )
    principal = await principal_of(tx, subject) if subject else None
    if principal is None:
        raise Forbidden(
            f"{subject!r} is no longer a member of the organization: the run's entity cannot "
            "be written in its name",
            code="missing_permission",
        )
    return None if principal.is_admin else EntityGuard(principal)


class _ClaimLost(Exception):
    """The run was finished elsewhere while this attempt ran: undo this attempt's write."""


def _upserted(blueprint: str, outcome: entities.Outcome) -> str:
    verb = "created" if outcome.created else "updated"
    return f"Entity {outcome.identifier!r} of blueprint {blueprint!r} {verb}"


async def _end_in(tx: Tx, held: Claim, status: str, message: str) -> bool:
    done = await tx.fetchval(
        "UPDATE action_runs SET dispatch_state = 'done', status = $4, ended_at = now(), "
        "claim = NULL, lease_until = NULL, updated_at = now(), updated_by = $5 "
        "WHERE org_id = $1 AND id = $2 AND claim = $3 AND dispatch_state = 'dispatching' "
        "AND status = 'IN_PROGRESS' RETURNING id",
        held.org_id,
        held.run["id"],
        held.token,
        status,
        WORKER,
    )
    if done is None:
        return False
    await runs.log(tx, held.run["id"], WORKER, message)
    return True


# sweep_expired's statement on Citus, in two: the runs that give up, and those that go again.
_SWEEP_GIVE_UP = (
    "UPDATE action_runs SET dispatch_state = 'done', status = 'FAILURE', ended_at = now(), "
    "claim = NULL, lease_until = NULL, updated_at = now(), updated_by = $2 "
    "WHERE dispatch_state = 'dispatching' AND lease_until < now() "
    "AND status = 'IN_PROGRESS' AND attempts >= $1 "
    "RETURNING org_id, id, attempts, dispatch_state"
)
_SWEEP_AGAIN = (
    "UPDATE action_runs SET dispatch_state = 'retrying', "
    "claim = NULL, lease_until = NULL, updated_at = now(), updated_by = $2 "
    "WHERE dispatch_state = 'dispatching' AND lease_until < now() "
    "AND status = 'IN_PROGRESS' AND attempts < $1 "
    "RETURNING org_id, id, attempts, dispatch_state"
)


async def sweep_expired(settings: Settings, db: Database) -> int:
    """Runs whose worker's lease ran out go to a new attempt (or end in FAILURE after the
    last one); how many were swept."""
    async with db.system() as tx:
        if tx.citus:
            # Citus refuses `now()` inside CASE in a write: those that give up and those
            # that go again are two statements (each across the shards).
            rows = [
                *await tx.fetch(_SWEEP_GIVE_UP, settings.dispatch_max_attempts, WORKER),
                *await tx.fetch(_SWEEP_AGAIN, settings.dispatch_max_attempts, WORKER),
            ]
        else:
            rows = await tx.fetch(
                "UPDATE action_runs SET dispatch_state = CASE WHEN attempts >= $1 THEN 'done' "
                "ELSE 'retrying' END, "
                "status = CASE WHEN attempts >= $1 THEN 'FAILURE' ELSE status END, "
                "ended_at = CASE WHEN attempts >= $1 THEN now() ELSE ended_at END, "
                "claim = NULL, lease_until = NULL, updated_at = now(), updated_by = $2 "
                "WHERE dispatch_state = 'dispatching' AND lease_until < now() "
                "AND status = 'IN_PROGRESS' RETURNING org_id, id, attempts, dispatch_state",
                settings.dispatch_max_attempts,
                WORKER,
            )
        for row in rows:
            gave_up = row["dispatch_state"] == "done"
            await tx.execute(
                "INSERT INTO action_run_logs (org_id, run_id, message, created_by) "
                "VALUES ($1, $2, $3, $4)",
                row["org_id"],
                row["id"],
                f"attempt {row['attempts']} did not finish (its worker stopped)"
                + ("; gave up" if gave_up else "; dispatching again"),
                WORKER,
            )
            if not gave_up:
                await tx.execute(
                    "INSERT INTO dispatch_outbox (org_id, run_id, attempt) VALUES ($1, $2, $3)",
                    row["org_id"],
                    row["id"],
                    row["attempts"] + 1,
                )
        if rows:
            await tx.execute(f"NOTIFY {runs.NOTIFY_CHANNEL}")
    return len(rows)
