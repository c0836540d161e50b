"""Run routes (Port's shapes): execute an action, approve, report progress, read logs.

Included before the action routes, so `/v1/actions/runs` is not read as an action named
"runs".
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Header, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from app.actions import claims, runs, streams, versions
from app.auth import permissions
from app.auth.principal import CurrentTenant, DeferredTenant, Tenant, principal_of
from app.db.database import Database, Tx
from app.db.routing import AfterCommit, api_router
from app.kit.errors import Invalid, NotFound
from app.kit.openapi import ERRORS_AUTHED, ErrorBody, conflict
from app.kit.responses import json_response

router = api_router(prefix="/v1/actions", tags=["Action runs"])
ActionId = Annotated[str, Path(min_length=1, max_length=100)]
RunId = Annotated[str, Path(min_length=1, max_length=40)]


class RunBody(BaseModel):
    """`properties`: the action's user inputs; `entity`: the entity a DAY-2 or DELETE action
    runs on."""

    model_config = ConfigDict(extra="allow")

    properties: dict[str, Any] = Field(default_factory=dict)
    entity: str | None = Field(default=None, max_length=1000)


class RunAction(BaseModel):
    identifier: str
    title: str | None = None
    icon: str | None = None
    deleted: bool


class Run(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    status: Literal["IN_PROGRESS", "SUCCESS", "FAILURE", "WAITING_FOR_APPROVAL", "DECLINED"]
    action: RunAction
    properties: dict[str, Any]
    source: Literal["UI", "API", "AUTOMATION"]
    requiredApproval: Any
    createdAt: datetime
    updatedAt: datetime
    createdBy: str


class RunResponse(BaseModel):
    ok: Literal[True] = True
    run: Run


class RunListResponse(BaseModel):
    ok: Literal[True] = True
    runs: list[Run]


class RunPatch(BaseModel):
    """Each key given overrides its previous value; `status` ends the run."""

    model_config = ConfigDict(extra="allow")

    status: Literal["SUCCESS", "FAILURE"] | None = None
    statusLabel: str | None = Field(default=None, max_length=500)
    link: str | list[str] | None = None
    summary: str | None = Field(default=None, max_length=20_000)
    externalRunId: str | None = Field(default=None, max_length=200)
    message: str | None = Field(default=None, description="Deprecated: a log line")


class ApprovalBody(BaseModel):
    status: Literal["APPROVE", "DECLINE"]
    description: str | None = Field(default=None, max_length=2000)


class LogBody(BaseModel):
    message: str = Field(min_length=1, max_length=20_000)
    terminationStatus: Literal["SUCCESS", "FAILURE"] | None = None
    statusLabel: str | None = Field(default=None, max_length=500)


class RunLog(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    runId: str
    message: str
    createdBy: str
    createdAt: datetime


class RunLogResponse(BaseModel):
    ok: Literal[True] = True
    runLog: RunLog


class RunLogListResponse(BaseModel):
    ok: Literal[True] = True
    runLogs: list[RunLog]


MIN_VISIBILITY_MS = 1000


class ClaimBody(BaseModel):
    """What Port's Ocean sends to take its installation's pending runs."""

    model_config = ConfigDict(extra="forbid")

    installationId: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9@_.+:=-]+$")
    limit: int = Field(default=100, ge=1, le=1000, strict=True)
    visibilityTimeoutMs: int = Field(
        default=60_000,
        ge=1,
        le=600_000,
        strict=True,
        description="How long the claimed runs stay invisible to other claims unless "
        "acknowledged (milliseconds; at least 1000 is used)",
    )
    exclude: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(
        default_factory=list,
        max_length=1000,
        description="Action identifiers whose runs are not to be claimed now",
    )


class ClaimResponse(BaseModel):
    ok: Literal[True] = True
    runs: list[Run]


class AckBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    runId: str = Field(min_length=1, max_length=40)


_IDEMPOTENCY = conflict("The Idempotency-Key was used for a different request")


@router.post(
    "/{identifier}/runs",
    status_code=202,
    response_model=RunResponse,
    responses={**ERRORS_AUTHED, **_IDEMPOTENCY},
    summary="Run an action",
)
async def create_run(
    identifier: ActionId,
    body: RunBody,
    caller: DeferredTenant,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    run_as: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=200,
            description="Admins: the email of a user of the organization to start the run "
            "as. The run is theirs (its creator, and their permissions decide whether they "
            "may run the action and what its entity writes may change); the audit log "
            "records the caller.",
        ),
    ] = None,
) -> Any:
    """202 with the run: it is recorded and queued (or waits for approval). A repeated
    `Idempotency-Key` (same starter, same request) answers the first run again."""
    if idempotency_key is not None and not idempotency_key.strip():
        raise Invalid("Idempotency-Key must not be blank")
    payload = body.model_dump(exclude_unset=True)
    # The action's `required` jq runs before the transaction opens: no connection waits
    # on a child process.
    required = await runs.prepare_required(
        caller.request.app.state.db, caller.principal.org_id, identifier, payload
    )
    tenant = await caller.open()
    starter = tenant.principal
    if run_as is not None:
        # A person's roles are read when the transaction opens (a token carries none).
        permissions.require(tenant.principal, "runs.runAs")
        found = await principal_of(tenant.tx, run_as.lower())
        if found is None or found.kind != "user":
            raise NotFound(f"run_as: no active user {run_as!r} in this organization")
        starter = found
    run, _ = await runs.create(
        tenant.tx,
        starter.subject,
        identifier,
        payload,
        idempotency_key=idempotency_key,
        principal=starter,
        required=required,
    )
    return json_response({"ok": True, "run": run}, status_code=202)


@router.get(
    "/runs", response_model=RunListResponse, responses=ERRORS_AUTHED, summary="List action runs"
)
async def list_runs(
    tenant: CurrentTenant,
    action: Annotated[str | None, Query(max_length=100)] = None,
    entity: Annotated[str | None, Query(max_length=1000)] = None,
    blueprint: Annotated[str | None, Query(max_length=100)] = None,
    active: bool | None = None,
    status: Annotated[
        list[Literal["IN_PROGRESS", "SUCCESS", "FAILURE", "WAITING_FOR_APPROVAL", "DECLINED"]]
        | None,
        Query(),
    ] = None,
    user_id: Annotated[str | None, Query(max_length=200)] = None,
    user_email: Annotated[str | None, Query(max_length=200)] = None,
    external_run_id: Annotated[str | None, Query(max_length=200)] = None,
    source: Annotated[list[Literal["UI", "API", "AUTOMATION"]] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    exclude: Annotated[
        list[Annotated[str, Query(min_length=1, max_length=200)]] | None,
        Query(
            max_length=100,
            description="Fields left out of each run: a key (`payload`) or a dotted path "
            "(`properties.token`)",
        ),
    ] = None,
    version: versions.ApiVersion = None,
) -> Any:
    """Newest first. `active`: waiting for approval or in progress. Admins see every run;
    others see the runs they started (and read the ones they may approve by id)."""
    versions.check(version)
    user = user_id or user_email
    if not permissions.allows(tenant.principal, "runs.readAll"):
        if user is not None and user != tenant.principal.subject:
            raise permissions.Denied("runs.readAll")
        user = tenant.principal.subject
    found = await runs.list_runs(
        tenant.tx,
        action=action,
        entity=entity,
        blueprint=blueprint,
        active=active,
        statuses=list(status) if status else None,
        user=user,
        external_run_id=external_run_id,
        sources=list(source) if source else None,
        limit=limit,
    )
    if exclude:
        paths = [name.split(".") for name in exclude]
        found = [_without(run, paths) for run in found]
    return json_response({"ok": True, "runs": found})


def _without(doc: dict[str, Any], paths: list[list[str]]) -> dict[str, Any]:
    """`doc` less the keys at `paths` (a path that leads nowhere leaves it as it is)."""
    for path in paths:
        *parents, last = path
        node: Any = doc
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return doc


@router.get(
    "/runs/{run_id}", response_model=RunResponse, responses=ERRORS_AUTHED, summary="Get a run"
)
async def get_run(run_id: RunId, tenant: CurrentTenant, version: versions.ApiVersion = None) -> Any:
    versions.check(version)
    return json_response({"ok": True, "run": await _readable(tenant, run_id)})


async def _readable(tenant: Tenant, run_id: str) -> dict[str, Any]:
    """The run, if the caller may read it: Admins, whoever started it, its approvers, and
    for a run of an INTEGRATION_ACTION, its integration's own credential."""
    run = await runs.get(tenant.tx, run_id)
    principal = tenant.principal
    if permissions.allows(principal, "runs.readAll") or run["createdBy"] == principal.subject:
        return run
    if await _integrations_own(tenant, run):
        return run
    if await permissions.may_approve(tenant.tx, principal, run["action"]):
        return run
    raise permissions.Denied("runs.readAll", f"run {run_id!r}")


async def _integrations_own(tenant: Tenant, run: dict[str, Any]) -> bool:
    """Whether the caller is the credential that created the integration the run is for."""
    installation = run.get("installationId")
    if installation is None or tenant.principal.kind != "app":
        return False
    return await claims.integration_creator(tenant.tx, installation) == tenant.principal.subject


async def _reportable(tenant: Tenant, run_id: str) -> None:
    """Progress is reported by Admins' credentials (the CI that runs the action), by whoever
    started the run, or, for a run of an INTEGRATION_ACTION, by its integration's own
    credential."""
    run = await runs.get(tenant.tx, run_id)
    principal = tenant.principal
    if permissions.allows(principal, "runs.report") or run["createdBy"] == principal.subject:
        return
    if await _integrations_own(tenant, run):
        return
    raise permissions.Denied("runs.report", f"run {run_id!r}")


@router.post(
    "/runs/claim-pending",
    response_model=ClaimResponse,
    responses=ERRORS_AUTHED,
    summary="Claim an integration's pending runs",
)
async def claim_pending(body: ClaimBody, tenant: CurrentTenant, request: Request) -> Any:
    """Up to `limit` runs of the installation's INTEGRATION_ACTIONs that wait to be run,
    oldest first, each with its rendered `payload`. They stay claimed for
    `visibilityTimeoutMs`: acknowledge each (`PATCH /v1/actions/runs/ack`) before it runs;
    a run not acknowledged in time is handed to the next claim."""
    creator = await claims.integration_creator(tenant.tx, body.installationId)
    if not claims.may_claim(tenant.principal, creator):
        raise claims.claim_denied(body.installationId)
    if creator is None:
        raise NotFound(
            f"Integration {body.installationId!r} was not found", code="integration_not_found"
        )
    claimed = await claims.claim(
        tenant.tx,
        tenant.principal.subject,
        body.installationId,
        limit=body.limit,
        # Under a second, runs would mostly be handed back unrendered and claimed again.
        visibility_seconds=max(body.visibilityTimeoutMs, MIN_VISIBILITY_MS) / 1000,
        exclude=list(body.exclude),
    )
    db: Database = request.app.state.db

    async def answer() -> Response:
        # The claim has committed; payloads are rendered with no connection held.
        found = await claims.complete(db, claimed)
        return json_response({"ok": True, "runs": found})

    return AfterCommit(answer)


@router.patch(
    "/runs/ack",
    response_model=RunResponse,
    responses={**ERRORS_AUTHED, **conflict("The run is acknowledged already, or not claimed")},
    summary="Acknowledge a claimed run",
)
async def acknowledge_run(body: AckBody, tenant: CurrentTenant) -> Any:
    """The integration takes the run: the first acknowledgement of a claimed run, by the
    credential that holds its latest claim, succeeds; any other is a 409
    (`run_already_acknowledged`, `run_not_claimed`, `run_ended`, `run_claimed_by_another`)."""
    row = await claims.locked_run(tenant.tx, body.runId)
    installation = row["installation_id"]
    creator = await claims.integration_creator(tenant.tx, installation) if installation else None
    if not claims.may_claim(tenant.principal, creator):
        raise (
            claims.claim_denied(installation)
            if installation
            else permissions.Denied("integrations.manage", f"run {body.runId!r}")
        )
    acknowledged = await claims.acknowledge(tenant.tx, tenant.principal.subject, row)
    return json_response({"ok": True, "run": acknowledged})


@router.patch(
    "/runs/{run_id}",
    response_model=RunResponse,
    responses=ERRORS_AUTHED,
    summary="Report a run's progress",
)
async def patch_run(
    run_id: RunId, body: RunPatch, tenant: CurrentTenant, version: versions.ApiVersion = None
) -> Any:
    versions.check(version)
    await _reportable(tenant, run_id)
    updated = await runs.update(
        tenant.tx, tenant.principal.subject, run_id, body.model_dump(exclude_unset=True)
    )
    return json_response({"ok": True, "run": updated})


@router.patch(
    "/runs/{run_id}/approval",
    status_code=201,
    response_model=RunResponse,
    responses=ERRORS_AUTHED,
    summary="Approve or decline a run",
)
async def decide_run(
    run_id: RunId, body: ApprovalBody, tenant: CurrentTenant, version: versions.ApiVersion = None
) -> Any:
    versions.check(version)
    decided = await runs.decide(tenant.tx, tenant.principal, run_id, body.status, body.description)
    return json_response({"ok": True, "run": decided}, status_code=201)


class Approver(BaseModel):
    userId: str = Field(description="The user's email")
    state: Literal["APPROVED", "DECLINED", "PENDING"]
    description: str | None = None


class ApproversResponse(BaseModel):
    ok: Literal[True] = True
    approvers: list[Approver]


@router.get(
    "/runs/{run_id}/approvers",
    response_model=ApproversResponse,
    responses=ERRORS_AUTHED,
    summary="Get an action run's approvers",
)
async def list_approvers(
    run_id: RunId,
    tenant: CurrentTenant,
    include_pending_approvers: Annotated[
        bool,
        Query(
            description="Also the users who may approve the run and have not decided yet "
            "(while it waits for approval)"
        ),
    ] = False,
) -> Any:
    """Who decided the run (`APPROVED`, `DECLINED`, with their description) and, with
    `include_pending_approvers`, who else may (`PENDING`: the users the action's approve
    block names). Readable by whoever may read the run."""
    await _readable(tenant, run_id)
    found = await runs.approvers(tenant.tx, run_id, include_pending=include_pending_approvers)
    return json_response({"ok": True, "approvers": found})


@router.post(
    "/runs/{run_id}/logs",
    status_code=201,
    response_model=RunLogResponse,
    responses={**ERRORS_AUTHED, **conflict("The run already has a terminating log")},
    summary="Add a log line to a run",
)
async def add_log(run_id: RunId, body: LogBody, tenant: CurrentTenant) -> Any:
    """A log with `terminationStatus` ends the run; a run has one at most."""
    await _reportable(tenant, run_id)
    written = await runs.add_log(
        tenant.tx,
        tenant.principal.subject,
        run_id,
        body.message,
        body.terminationStatus,
        body.statusLabel,
    )
    return json_response({"ok": True, "runLog": written}, status_code=201)


@router.get(
    "/runs/{run_id}/logs",
    response_model=RunLogListResponse,
    responses=ERRORS_AUTHED,
    summary="A run's logs",
)
async def list_logs(
    run_id: RunId,
    tenant: CurrentTenant,
    limit: Annotated[int, Query(ge=1, le=50)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Any:
    await _readable(tenant, run_id)
    found = await runs.logs(tenant.tx, run_id, limit=limit, offset=offset)
    return json_response({"ok": True, "runLogs": found})


@router.get(
    "/runs/{run_id}/logs/stream",
    responses={
        **ERRORS_AUTHED,
        200: {
            "description": "Server-sent events: `log` (a run log), `status` (the run when "
            "its status changes) and a final `end` once the run has ended; `error` (Port's "
            "error body) ends the stream when its caller's credential or membership is gone "
            "or its token expired.",
            "content": {"text/event-stream": {}},
        },
        429: {
            "model": ErrorBody,
            "description": "The organization's rate limit for this kind of request is "
            "reached, or it has its limit of live streams open (`rate_limited`; Retry-After)",
        },
    },
    summary="Follow a run's logs live (server-sent events)",
)
async def stream_logs(
    run_id: RunId,
    request: Request,
    tenant: CurrentTenant,
    last_event_id: Annotated[str | None, Header(max_length=40)] = None,
) -> Any:
    """Every log so far, then new ones as they are written; `Last-Event-ID` resumes after
    the log it names. Ends after the run has ended and its last logs are sent.

    An org has at most `PORTOLAN_RUN_LOG_STREAMS_PER_ORG` streams open (429 beyond). A
    stream holds no database connection between its looks (each look is its own short
    transaction, less often while nothing happens), and checks its caller: a machine
    credential on every look (deleted or rotated: the stream ends), the token and a
    person's membership every `PORTOLAN_RUN_LOG_STREAM_RECHECK_SECONDS`."""
    await _readable(tenant, run_id)  # 404 / 403 before the stream starts
    seen = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0
    status: str | None = None

    async def look(tx: Tx) -> streams.Look:
        nonlocal seen, status
        found = await runs.logs(tx, run_id, limit=50, after=seen)
        run = await runs.get(tx, run_id)
        out = streams.Look(more=bool(found))
        for entry in found:
            seen = int(entry["id"])
            out.events.append(streams.event("log", entry, entry["id"]))
        if run["status"] != status:
            status = run["status"]
            out.events.append(streams.event("status", run))
        if run["status"] in runs.ENDED and len(found) < 50:
            out.events.append(streams.event("end", {"status": run["status"]}))
            out.ended = True
        return out

    return await streams.follow(request, tenant.principal, look)
