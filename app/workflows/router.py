"""Workflow routes (Port's paths): /v1/workflows and their runs.

The run routes come first, so `/v1/workflows/runs` is not read as a workflow named "runs".
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Header, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from app.actions import streams
from app.auth import permissions
from app.auth.principal import CurrentTenant
from app.db.routing import api_router
from app.kit.errors import Invalid
from app.kit.openapi import ERRORS_AUTHED, ErrorBody, OkResponse, conflict
from app.kit.responses import json_response
from app.workflows import integrations, runs, service, stream
from app.workflows.schemas import (
    ResponseBody,
    RunBody,
    WorkflowBody,
    WorkflowListResponse,
    WorkflowResponse,
    WorkflowRunListResponse,
    WorkflowRunResponse,
)

router = api_router(prefix="/v1/workflows", tags=["Workflows"])
WorkflowId = Annotated[str, Path(min_length=1, max_length=100)]
RunId = Annotated[str, Path(min_length=1, max_length=40)]
NodeRunId = Annotated[str, Path(min_length=1, max_length=40)]
_CONFLICT = conflict("A workflow with this identifier exists")
_IDEMPOTENCY = conflict("The Idempotency-Key was used for a different request")


@router.get(
    "/runs",
    response_model=WorkflowRunListResponse,
    responses=ERRORS_AUTHED,
    summary="List workflow runs",
)
async def list_workflow_runs(
    tenant: CurrentTenant,
    workflow_identifier: Annotated[str | None, Query(alias="workflowIdentifier")] = None,
    limit: Annotated[int, Query(ge=1, le=runs.LIST_LIMIT)] = 100,
) -> Any:
    """Newest first. Admins see every run; others their own and those of workflows that
    let anyone view runs."""
    permissions.require(tenant.principal, "workflows.read")
    found = await runs.list_runs(
        tenant.tx, tenant.principal, workflow=workflow_identifier, limit=limit
    )
    return json_response({"ok": True, "workflowRuns": found})


class NodeClaimBody(BaseModel):
    """What Ocean's actions processor sends for an integration's workflow node runs."""

    model_config = ConfigDict(extra="forbid")

    installationId: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9@_.+:=-]+$")
    limit: int = Field(default=100, ge=1, le=1000, strict=True)
    visibilityTimeoutMs: int = Field(default=60_000, ge=1, le=600_000, strict=True)
    exclude: list[Annotated[str, Field(max_length=100)]] = Field(
        default_factory=list, max_length=1000
    )


class NodeClaimResponse(BaseModel):
    ok: bool = True
    nodeRuns: list[dict[str, Any]]


@router.post(
    "/runs/claim-pending",
    response_model=NodeClaimResponse,
    responses=ERRORS_AUTHED,
    summary="Claim an integration's pending workflow node runs",
)
async def claim_pending_node_runs(body: NodeClaimBody, tenant: CurrentTenant) -> Any:
    """Up to `limit` of the installation's INTEGRATION_ACTION node runs waiting to be
    claimed, oldest first, each held for `visibilityTimeoutMs` (claimable again after it
    unless acknowledged); `exclude` names node uids (`<workflow>/<node>`) to leave. Admins'
    machine credentials and the integration's own credential may claim."""
    node_runs = await integrations.claim(
        tenant.tx,
        integrations.claimer(tenant),
        body.installationId,
        limit=body.limit,
        visibility_seconds=body.visibilityTimeoutMs / 1000,
        exclude=list(body.exclude),
    )
    return json_response({"ok": True, "nodeRuns": node_runs})


class NodeAckBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    nodeRunIdentifier: str = Field(min_length=1, max_length=40)


class NodeRunResponse(BaseModel):
    ok: bool = True
    nodeRun: dict[str, Any]


class NodeRunListResponse(BaseModel):
    ok: bool = True
    nodeRuns: list[dict[str, Any]]


class NodeRunLog(BaseModel):
    model_config = ConfigDict(extra="forbid")

    level: str = Field(default="INFO", max_length=10)
    message: str = Field(max_length=integrations.MAX_LOG_MESSAGE)


class NodeRunLogsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    logs: list[NodeRunLog] = Field(min_length=1, max_length=integrations.MAX_LOGS)


class NodeRunReport(BaseModel):
    """An integration's report on the node run it runs (Ocean's shapes)."""

    model_config = ConfigDict(extra="allow")

    # Checked by app/workflows/integrations.py, which names each problem by pointer.
    status: Any = Field(default=None, description="IN_PROGRESS or COMPLETED")
    result: Any = Field(default=None, description="SUCCESS, FAILED or CANCELLED (COMPLETED)")
    output: Any = Field(default=None, description="An object, merged into the node's output")
    statusLabel: Any = Field(default=None, description="{text}")
    externalRunId: Any = Field(default=None, description="The external run's id")
    links: Any = Field(default=None, description="At most 3 URLs")


_NOT_CLAIMED = conflict("The node run is not claimed by this credential, or has ended")


@router.patch(
    "/runs/ack",
    response_model=NodeRunResponse,
    responses={**ERRORS_AUTHED, **_NOT_CLAIMED},
    summary="Acknowledge a claimed workflow node run",
)
async def acknowledge_node_run(body: NodeAckBody, tenant: CurrentTenant) -> Any:
    """The first acknowledgement by the credential holding the latest claim takes the node
    run on; any other is a 409 (`run_already_acknowledged`, `run_not_claimed`, ...)."""
    node_run = await integrations.acknowledge(
        tenant.tx, integrations.claimer(tenant), body.nodeRunIdentifier
    )
    return json_response({"ok": True, "nodeRun": node_run})


@router.get(
    "/nodes/runs",
    response_model=NodeRunListResponse,
    responses=ERRORS_AUTHED,
    summary="Find an integration's workflow node runs by their external run id",
)
async def find_node_runs(
    tenant: CurrentTenant,
    external_run_id: Annotated[str, Query(min_length=1, max_length=200)],
    include: Annotated[list[str] | None, Query(max_length=10)] = None,
) -> Any:
    """The node runs an integration reported `externalRunId` for (those the caller may
    claim); `include=nodeConfig` adds each node's invocation under `node.config`."""
    wanted = set(include or [])
    unknown = sorted(wanted - {"nodeConfig"})
    if unknown:
        raise Invalid(
            f"include takes nodeConfig, not {', '.join(unknown)}",
            details=[{"pointer": "/include", "message": "nodeConfig"}],
        )
    found = await integrations.by_external_id(
        tenant.tx, integrations.claimer(tenant), external_run_id, node_config="nodeConfig" in wanted
    )
    return json_response({"ok": True, "nodeRuns": found})


@router.patch(
    "/nodes/runs/{node_run_id}",
    response_model=NodeRunResponse,
    responses={**ERRORS_AUTHED, **_NOT_CLAIMED},
    summary="Report on a workflow node run an integration runs",
)
async def report_node_run(
    node_run_id: NodeRunId, body: NodeRunReport, tenant: CurrentTenant
) -> Any:
    """`externalRunId`, `links`, `statusLabel {text}` and `output` (merged) while it runs;
    `status: COMPLETED` with `result` (SUCCESS, FAILED, CANCELLED) ends the node: the run
    moves on (or ends, as the node's `onFailure` says) once the worker applied its
    `variables`."""
    node_run = await integrations.report(
        tenant.tx, integrations.claimer(tenant), node_run_id, body.model_dump(exclude_unset=True)
    )
    return json_response({"ok": True, "nodeRun": node_run})


@router.post(
    "/nodes/runs/{node_run_id}/logs",
    response_model=OkResponse,
    responses={**ERRORS_AUTHED, **_NOT_CLAIMED},
    summary="Add log lines to a workflow node run an integration runs",
)
async def add_node_run_logs(
    node_run_id: NodeRunId, body: NodeRunLogsBody, tenant: CurrentTenant
) -> Any:
    await integrations.add_logs(
        tenant.tx, integrations.claimer(tenant), node_run_id, body.model_dump()
    )
    return json_response({"ok": True})


@router.get(
    "/runs/{workflow_run_id}",
    response_model=WorkflowRunResponse,
    responses=ERRORS_AUTHED,
    summary="Get a workflow run with its node runs",
)
async def get_workflow_run(workflow_run_id: RunId, tenant: CurrentTenant) -> Any:
    permissions.require(tenant.principal, "workflows.read")
    run = await runs.get(tenant.tx, workflow_run_id, tenant.principal)
    return json_response({"ok": True, "workflowRun": run})


@router.get(
    "/runs/{workflow_run_id}/stream",
    responses={
        **ERRORS_AUTHED,
        200: {
            "description": "Server-sent events: `run` (the run, first and when its status "
            "changes), `nodeRun` (a node run when it appears and when its status changes), "
            "`log` (a node run's log line) and a final `end` once the run has ended; `error` "
            "(Port's error body) ends the stream when its caller's credential or membership "
            "is gone or its token expired.",
            "content": {"text/event-stream": {}},
        },
        429: {
            "model": ErrorBody,
            "description": "The organization's rate limit for this kind of request is "
            "reached, or it has its limit of live streams open (`rate_limited`; Retry-After)",
        },
    },
    summary="Follow a workflow run's progress live (server-sent events)",
)
async def stream_workflow_run(
    workflow_run_id: RunId,
    request: Request,
    tenant: CurrentTenant,
    last_event_id: Annotated[str | None, Header(max_length=40)] = None,
) -> Any:
    """The run and its node runs as they are, then each change as it happens, with every
    node run's logs; ends once the run has ended. `Last-Event-ID` resumes after the log it
    names (node runs and the run are sent again as they stand).

    Live streams of every kind count against the org's `PORTOLAN_RUN_LOG_STREAMS_PER_ORG`
    (429 beyond); a stream holds no database connection between its looks and ends when
    its caller's credential or membership is gone (as an action run's log stream)."""
    permissions.require(tenant.principal, "workflows.read")
    definition = await stream.opened(tenant.tx, tenant.principal, workflow_run_id)
    after = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0
    follower = stream.Follower(workflow_run_id, definition, after)
    return await streams.follow(request, tenant.principal, follower.look)


@router.post(
    "/runs/{workflow_run_id}/cancel",
    response_model=WorkflowRunResponse,
    responses={**ERRORS_AUTHED, **conflict("The run has already ended")},
    summary="Cancel a workflow run",
)
async def cancel_workflow_run(workflow_run_id: RunId, tenant: CurrentTenant) -> Any:
    """Admins and the run's starter may cancel it."""
    permissions.require(tenant.principal, "workflows.read")
    run = await runs.cancel(tenant.tx, tenant.principal, workflow_run_id)
    return json_response({"ok": True, "workflowRun": run})


@router.post(
    "/nodes/runs/{node_run_id}/responses",
    response_model=WorkflowRunResponse,
    responses={
        **ERRORS_AUTHED,
        **conflict("The node no longer waits for input, or the caller already responded"),
    },
    summary="Respond to a workflow's INPUT node (approve, decline, provide values)",
)
async def respond_to_input_node(
    node_run_id: NodeRunId, body: ResponseBody, tenant: CurrentTenant
) -> Any:
    """`{button, inputs}`: the button pressed (optional when the node has one) and the
    node's inputs. The node's `responders` may respond (by default the run's starter;
    Admins always), each once; the node moves on when an outlet has as many responses as
    it waits for. Answers the run."""
    permissions.require(tenant.principal, "workflows.read")
    run = await runs.respond(
        tenant.tx, tenant.principal, node_run_id, body.model_dump(exclude_unset=True)
    )
    return json_response({"ok": True, "workflowRun": run})


@router.post(
    "",
    status_code=201,
    response_model=WorkflowResponse,
    responses={**ERRORS_AUTHED, **_CONFLICT},
    summary="Create a workflow",
)
async def create_workflow(body: WorkflowBody, tenant: CurrentTenant) -> Any:
    permissions.require(tenant.principal, "workflows.manage")
    created = await service.create(
        tenant.tx, tenant.principal.subject, body.model_dump(exclude_unset=True)
    )
    return json_response({"ok": True, "workflow": created}, status_code=201)


@router.get(
    "", response_model=WorkflowListResponse, responses=ERRORS_AUTHED, summary="List workflows"
)
async def list_workflows(tenant: CurrentTenant) -> Any:
    permissions.require(tenant.principal, "workflows.read")
    return json_response({"ok": True, "workflows": await service.list_all(tenant.tx)})


@router.get(
    "/{identifier}",
    response_model=WorkflowResponse,
    responses=ERRORS_AUTHED,
    summary="Get a workflow",
)
async def get_workflow(identifier: WorkflowId, tenant: CurrentTenant) -> Any:
    permissions.require(tenant.principal, "workflows.read")
    return json_response({"ok": True, "workflow": await service.get(tenant.tx, identifier)})


@router.put(
    "/{identifier}",
    response_model=WorkflowResponse,
    responses=ERRORS_AUTHED,
    summary="Replace a workflow (a new version)",
)
async def replace_workflow(
    identifier: WorkflowId, body: WorkflowBody, tenant: CurrentTenant
) -> Any:
    """Runs already started keep the version they started on."""
    permissions.require(tenant.principal, "workflows.manage")
    updated = await service.replace(
        tenant.tx, tenant.principal.subject, identifier, body.model_dump(exclude_unset=True)
    )
    return json_response({"ok": True, "workflow": updated})


@router.delete(
    "/{identifier}",
    response_model=OkResponse,
    responses=ERRORS_AUTHED,
    summary="Delete a workflow",
)
async def delete_workflow(identifier: WorkflowId, tenant: CurrentTenant) -> Any:
    """Its runs, and the versions they started on, stay."""
    permissions.require(tenant.principal, "workflows.manage")
    await service.delete(tenant.tx, identifier)
    return {"ok": True}


@router.post(
    "/{identifier}/runs",
    status_code=202,
    response_model=WorkflowRunResponse,
    responses={**ERRORS_AUTHED, **_IDEMPOTENCY},
    summary="Run a workflow",
)
async def create_workflow_run(
    identifier: WorkflowId,
    body: RunBody,
    tenant: CurrentTenant,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Any:
    """202 with the run: its trigger recorded and its first node queued. A repeated
    `Idempotency-Key` (same caller, same request) answers the first run again. The caller
    needs the trigger's `permissions` (Admins always)."""
    if idempotency_key is not None and not idempotency_key.strip():
        raise Invalid("Idempotency-Key must not be blank")
    run, _ = await runs.create(
        tenant.tx,
        identifier,
        body.model_dump(exclude_unset=True),
        principal=tenant.principal,
        idempotency_key=idempotency_key,
    )
    return json_response({"ok": True, "workflowRun": run}, status_code=202)
