"""Runs an integration claims and runs itself (Port's INTEGRATION_ACTION, the pull model).

A run of an INTEGRATION_ACTION is never dispatched: it waits (`dispatch_state`
`claimable`) until its integration asks for work.

- **Claim** (`claim`): up to `limit` of the installation's claimable runs, oldest first,
  are taken with `FOR UPDATE SKIP LOCKED` and marked `claimed` until the visibility
  timeout (`lease_until`), under one claim token. Concurrent claimers never get the same
  run: a row another claimer holds is skipped, and one it committed is re-checked against
  its new claim. A claimed run whose lease ran out without an acknowledgement (its
  integration died, or gave up on it) is claimable again.
- **Payload** (`complete`): after the claim has committed, runs claimed for the first time
  get their payload rendered (app/dispatch/pull.py) with no transaction open, and stored;
  a later claim of the same run gets the stored payload. A run whose templates fail ends
  in FAILURE; a run the jq sandbox had no turn for is handed back (claimable at once).
  The answer holds only runs this claim still holds.
- **Acknowledge** (`acknowledge`): the first acknowledgement of a claimed run, by the
  credential that holds its latest claim, moves it to `delivered` (the integration runs
  it and reports on it through the run routes); any later one, one of a run never
  claimed, or one by a credential whose claim expired and was taken again by another is a
  409. Replicas of one integration share a credential and Ocean sends no claim token, so
  between them the first acknowledgement wins: however many claimers a run had, exactly
  one acknowledgement succeeds.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from app.actions.runs import _SELECT, log, to_api
from app.auth import permissions
from app.auth.principal import Principal
from app.db.database import Database, Tx
from app.dispatch import pull
from app.dispatch.runner import run_entities
from app.kit import sandbox
from app.kit.errors import Conflict, Invalid, NotFound
from app.search.service import scope_for

WORKER = "portolan-dispatcher"

_CLAIM = """
WITH picked AS (
    SELECT org_id, id FROM action_runs
    WHERE org_id = $1 AND installation_id = $2 AND status = 'IN_PROGRESS'
      AND (dispatch_state = 'claimable' OR (dispatch_state = 'claimed' AND lease_until <= now()))
      AND NOT (action = ANY($3::varchar[]))
    ORDER BY created_at, id
    LIMIT $4
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE action_runs r SET dispatch_state = 'claimed', claim = $5,
        lease_until = now() + make_interval(secs => $6), attempts = r.attempts + 1,
        claimed_by = $7, updated_at = now(), updated_by = $7
    FROM picked WHERE r.org_id = picked.org_id AND r.id = picked.id
    RETURNING r.id, r.attempts, r.lease_until
)
SELECT id FROM claimed
"""


def may_claim(principal: Principal, creator: str | None) -> bool:
    """An installation's runs are claimed by machine credentials: an Admin's (who manage
    integrations) or the one that created the integration."""
    if principal.kind != "app":
        return False
    return permissions.allows(principal, "integrations.manage") or (
        creator is not None and creator == principal.subject
    )


def claim_denied(installation: str) -> permissions.Denied:
    return permissions.Denied(
        "integrations.manage",
        f"installation {installation!r}",
        " (held by Admins' machine credentials and the integration's own credential)",
    )


@dataclass
class Claimed:
    """What one claim took, for `complete` (after the claim's transaction committed)."""

    org_id: uuid.UUID
    token: uuid.UUID
    visibility_seconds: float
    rows: list[asyncpg.Record]
    # The definitions of the runs' entities' blueprints that have calculation properties.
    calculated: dict[str, dict[str, Any]] = field(default_factory=dict)


async def integration_creator(tx: Tx, installation_id: str) -> str | None:
    """The credential (or user) that created the org's integration; None when the org has
    no integration with this installation id."""
    creator = await tx.fetchval(
        "SELECT created_by FROM integrations WHERE org_id = $1 AND identifier = $2",
        tx.org_id,
        installation_id,
    )
    return None if creator is None else str(creator)


async def claim(
    tx: Tx,
    actor: str,
    installation_id: str,
    *,
    limit: int,
    visibility_seconds: float,
    exclude: list[str],
) -> Claimed:
    """Claim up to `limit` of the installation's claimable runs (oldest first)."""
    assert tx.org_id is not None
    token = uuid.uuid4()
    ids = await tx.fetch(
        _CLAIM,
        tx.org_id,
        installation_id,
        exclude,
        limit,
        token,
        visibility_seconds,
        actor,
    )
    rows: list[asyncpg.Record] = []
    calculated: dict[str, dict[str, Any]] = {}
    if ids:
        rows = await tx.fetch(
            _SELECT + " WHERE r.org_id = $1 AND r.id = ANY($2::varchar[]) "
            "ORDER BY r.created_at, r.id",
            tx.org_id,
            [r["id"] for r in ids],
        )
        named = {
            e.get("blueprint")
            for r in rows
            if r["payload"] is None
            for e in run_entities(r["context"])
        }
        if named:
            scope = await scope_for(tx, None, None)
            calculated = {
                bp: definition
                for bp, definition in scope.blueprints.items()
                if bp in named and definition.get("calculationProperties")
            }
    return Claimed(tx.org_id, token, visibility_seconds, rows, calculated)


async def complete(db: Database, claimed: Claimed) -> list[dict[str, Any]]:
    """Render the payloads the claimed runs lack (no transaction open), store them, and
    answer the runs this claim still holds. Rendering stops at half the visibility
    timeout: the runs not reached by then are handed back, claimable at once."""
    if not claimed.rows:
        return []
    rendered: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    handed_back: list[str] = []
    deadline = time.monotonic() + claimed.visibility_seconds / 2
    for row in claimed.rows:
        if row["payload"] is not None:
            continue
        if handed_back or time.monotonic() > deadline:
            handed_back.append(row["id"])
            continue
        try:
            rendered[row["id"]] = await pull.render_payload(
                row, claimed.calculated, org=claimed.org_id
            )
        except pull.Unrenderable as exc:
            failed[row["id"]] = str(exc)
        except sandbox.Busy:
            handed_back.append(row["id"])
    async with db.tenant(claimed.org_id) as tx:
        if rendered:
            # A run claimed again meanwhile (a visibility timeout shorter than the
            # rendering) may have its payload already: the first one stays.
            await tx.execute(
                "UPDATE action_runs r SET payload = m.value FROM jsonb_each($2::jsonb) m "
                "WHERE r.org_id = $1 AND r.id = m.key AND r.payload IS NULL",
                claimed.org_id,
                rendered,
            )
        for run_id, message in failed.items():
            ended = await tx.fetchval(
                "UPDATE action_runs SET status = 'FAILURE', dispatch_state = 'done', "
                "ended_at = now(), claim = NULL, lease_until = NULL, updated_at = now(), "
                "updated_by = $4 WHERE org_id = $1 AND id = $2 AND claim = $3 "
                "AND dispatch_state = 'claimed' AND status = 'IN_PROGRESS' RETURNING id",
                claimed.org_id,
                run_id,
                claimed.token,
                WORKER,
            )
            if ended is not None:
                await log(tx, run_id, WORKER, message)
        if handed_back:
            await tx.execute(
                "UPDATE action_runs SET dispatch_state = 'claimable', claim = NULL, "
                "lease_until = NULL, updated_at = now() WHERE org_id = $1 "
                "AND id = ANY($2::varchar[]) AND claim = $3 AND dispatch_state = 'claimed'",
                claimed.org_id,
                handed_back,
                claimed.token,
            )
        rows = await tx.fetch(
            _SELECT + " WHERE r.org_id = $1 AND r.claim = $2 AND r.dispatch_state = 'claimed' "
            "AND r.status = 'IN_PROGRESS' AND r.payload IS NOT NULL "
            "AND r.id = ANY($3::varchar[]) ORDER BY r.created_at, r.id",
            claimed.org_id,
            claimed.token,
            [r["id"] for r in claimed.rows],
        )
        # Each run answered says so in its log (a run handed back is not: it was never
        # the integration's).
        await tx.execute(
            "INSERT INTO action_run_logs (org_id, run_id, message, created_by) "
            "SELECT r.org_id, r.id, format('Claimed by integration %s (claim %s, until %s)', "
            "r.installation_id, r.attempts, to_char(r.lease_until AT TIME ZONE 'UTC', "
            '\'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"\')), r.claimed_by FROM action_runs r '
            "WHERE r.org_id = $1 AND r.id = ANY($2::varchar[])",
            claimed.org_id,
            [r["id"] for r in rows],
        )
    return [to_api(r) for r in rows]


async def locked_run(tx: Tx, run_id: str) -> asyncpg.Record:
    """The run, locked for its acknowledgement (a concurrent one waits, then sees ours)."""
    row = await tx.fetchrow(
        "SELECT id, installation_id, status, dispatch_state, claimed_by FROM action_runs "
        "WHERE org_id = $1 AND id = $2 FOR UPDATE",
        tx.org_id,
        run_id,
    )
    if row is None:
        raise NotFound(f"Run {run_id!r} was not found")
    return row


async def acknowledge(tx: Tx, actor: str, row: asyncpg.Record) -> dict[str, Any]:
    """The first acknowledgement of a claimed run (see the module's account); 409 for
    any other."""
    run_id = row["id"]
    if row["installation_id"] is None:
        raise Invalid(
            f"Run {run_id!r} is not a run of an INTEGRATION_ACTION: it is not claimed",
            code="not_integration_action",
        )
    state, status = row["dispatch_state"], row["status"]
    if status not in ("IN_PROGRESS", "WAITING_FOR_APPROVAL"):
        raise Conflict(f"Run {run_id!r} has ended ({status})", code="run_ended")
    if state == "delivered":
        raise Conflict(f"Run {run_id!r} was already acknowledged", code="run_already_acknowledged")
    if state != "claimed":
        raise Conflict(
            f"Run {run_id!r} is not claimed: claim it (claim-pending) first",
            code="run_not_claimed",
        )
    if row["claimed_by"] != actor:
        raise Conflict(
            f"Run {run_id!r} is claimed by another credential (this claim expired and the "
            "run was claimed again)",
            code="run_claimed_by_another",
        )
    await tx.execute(
        "UPDATE action_runs SET dispatch_state = 'delivered', claim = NULL, lease_until = NULL, "
        "updated_at = now(), updated_by = $3 WHERE org_id = $1 AND id = $2",
        tx.org_id,
        run_id,
        actor,
    )
    await log(tx, run_id, actor, f"Acknowledged by integration {row['installation_id']}")
    row = await tx.fetchrow(_SELECT + " WHERE r.org_id = $1 AND r.id = $2", tx.org_id, run_id)
    assert row is not None
    return to_api(row)
