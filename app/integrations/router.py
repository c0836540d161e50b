"""Integration routes (Port's shapes, as Port's Ocean framework calls them): /v1/integration,
provision-enabled types, resync reports and requests, the raw examples per kind, logs and
sync metrics, and their ingest URLs.

Single integrations answer `{"ok": true, "integration": {...}}`; the list answers
`{"ok": true, "integrations": [...]}`. Ocean posts its logs to the integration's
`logAttributes.ingestUrl`, and its sync metrics under `metricAttributes.ingestUrl`, with its
bearer token: those URLs need the token and the integration's secret ingest id both.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import unquote_plus

from fastapi import Header, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from app.auth import permissions
from app.auth.principal import CurrentTenant
from app.config import Settings
from app.db.routing import api_router, writes
from app.integrations import service
from app.kit.errors import Invalid
from app.kit.openapi import ERRORS_AUTHED, OkResponse, conflict

router = api_router(tags=["Integrations"])
_ID_PATTERN = r"^[A-Za-z0-9@_.+:=-]+$"
IntegrationId = Annotated[str, Path(min_length=1, max_length=100, pattern=_ID_PATTERN)]
IngestId = Annotated[str, Path(min_length=1, max_length=80, pattern=r"^[A-Za-z0-9_-]+$")]
SkipResync = Annotated[
    bool | None,
    Header(alias="x-skip-resync", description="true: a new mapping asks for no resync"),
]
_CONFLICT = conflict("An integration with this identifier exists")
_MAX_KIND = 200
_MAX_EVENT = 200
OceanVersion = Annotated[
    str | None,
    Query(
        max_length=100,
        pattern=r"^[A-Za-z0-9.+!_-]+$",
        description="the Ocean version of the caller (kept on the integration)",
    ),
]


def _public_url(request: Request) -> str:
    settings: Settings = request.app.state.settings
    return settings.public_url


# ------------------------------------------------------------------------------------------
# Shapes


class ResyncState(BaseModel):
    status: str | None = Field(description="running, completed, failed or aborted")
    lastResyncStart: datetime | None
    lastResyncEnd: datetime | None
    nextResync: datetime | None
    intervalInMinuets: int | None = Field(description="Port's spelling")
    updatedAt: datetime | None = Field(description="when the integration last reported")


class LogAttributes(BaseModel):
    ingestId: str
    ingestUrl: str = Field(description="where the integration posts its logs (bearer token)")


class MetricAttributes(BaseModel):
    ingestId: str
    ingestUrl: str = Field(
        description="where the integration posts its sync metrics (/syncMetrics, "
        "/syncMetrics/resync/{eventId}/kind/{kindIdentifier}, /heartbeat; bearer token)"
    )


_ProcessingMode = Literal["ocean-core", "dsp"]
_Origin = Literal["Empty", "Ocean", "Default", "Port"]


class Integration(BaseModel):
    identifier: str
    installationId: str
    installationAppType: str | None
    integrationType: str | None
    installationType: Literal["OnPrem"]
    title: str | None
    version: str | None
    actionsProcessingEnabled: bool
    config: dict[str, Any] = Field(description="the mapping (Port's port-app-config)")
    changelogDestination: dict[str, Any] | None
    resyncState: ResyncState
    logAttributes: LogAttributes
    metricAttributes: MetricAttributes
    arePortResourcesInitialized: bool = Field(
        description="Ocean created the integration's default resources (it does not again)"
    )
    incrementalSyncEnabled: bool
    processingMode: str | None = Field(description="ocean-core or dsp, as Ocean reported it")
    createPortResourcesOrigin: str | None = Field(
        description="who creates the integration's default resources: Empty, Ocean, Default"
    )
    spec: dict[str, Any] | None
    oceanCoreVersion: str | None = Field(description="the Ocean version its reads last reported")
    createdBy: str
    updatedBy: str
    createdAt: datetime
    updatedAt: datetime = Field(
        description="moves on every change of the definition or mapping; a resync report "
        "sets it to resyncState.updatedAt"
    )


class IntegrationResponse(BaseModel):
    ok: Literal[True] = True
    integration: Integration


class IntegrationListResponse(BaseModel):
    ok: Literal[True] = True
    integrations: list[Integration]


_Text = Annotated[str, Field(max_length=100)]


class IntegrationFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    title: Annotated[str, Field(max_length=200)] | None = None
    installationAppType: _Text | None = Field(default=None, description="the integration type")
    version: _Text | None = None
    actionsProcessingEnabled: bool | None = None
    config: dict[str, Any] | None = Field(
        default=None,
        description="the mapping: {deleteDependentEntities?, createMissingRelatedEntities?, "
        "enableMergeEntity?, resources: [{kind, selector: {query}, port: {entity: {mappings}}}]}",
    )
    changelogDestination: dict[str, Any] | None = Field(
        default=None, description='{} | {"type": "WEBHOOK", "url"} | {"type": "KAFKA"} (stored)'
    )
    arePortResourcesInitialized: bool | None = None
    incrementalSyncEnabled: bool | None = None
    processingMode: _ProcessingMode | None = None
    createPortResourcesOrigin: _Origin | None = Field(
        default=None, description="Port is refused: Portolan does not provision resources"
    )
    spec: dict[str, Any] | None = None


class IntegrationCreateBody(IntegrationFields):
    installationId: Annotated[str, Field(min_length=1, max_length=100, pattern=_ID_PATTERN)]


class ConfigBody(BaseModel):
    config: dict[str, Any] | None


class ResyncStateBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    status: Literal["running", "completed", "failed", "aborted"] | None = None
    lastResyncStart: datetime | None = None
    lastResyncEnd: datetime | None = None
    nextResync: datetime | None = None
    intervalInMinuets: Annotated[int, Field(ge=0, le=10_000_000)] | None = None


class ProvisionEnabledResponse(BaseModel):
    ok: Literal[True] = True
    integrations: list[str] = Field(
        description="integration types whose default resources the server provisions: none"
    )


class ResyncRequest(BaseModel):
    updatedAt: datetime = Field(description="when the resync was asked for")
    requestedBy: str | None


class ResyncRequestResponse(BaseModel):
    ok: Literal[True] = True
    request: ResyncRequest | None = Field(
        description="the pending request; null once the integration started a resync after it"
    )


class ExamplesBody(BaseModel):
    examples: list[Any] = Field(description=f"raw objects; the latest {service.MAX_EXAMPLES} kept")


class ExamplesResponse(BaseModel):
    ok: Literal[True] = True
    examples: list[Any]


class LogLine(BaseModel):
    id: str
    level: str
    message: str
    timestamp: datetime
    extra: dict[str, Any]


class LogsResponse(BaseModel):
    ok: Literal[True] = True
    logs: list[LogLine] = Field(description="newest first")


class LogsBody(BaseModel):
    logs: list[Any] = Field(
        description=f'[{{"message", "level", "timestamp", "extra"}}], at most '
        f"{service.MAX_LOG_LINES} lines"
    )


class IngestedResponse(BaseModel):
    ok: Literal[True] = True
    ingested: int


_Name = Annotated[str, Field(max_length=100)]


class SyncKindMetrics(BaseModel):
    """One kind's metrics of one sync, as Ocean reports them."""

    model_config = ConfigDict(extra="ignore")

    eventId: Annotated[str, Field(max_length=_MAX_EVENT)] = Field(
        description="the sync (a report with an empty one is not kept)"
    )
    kindIdentifier: Annotated[str, Field(min_length=1, max_length=_MAX_KIND)] = Field(
        description="`<kind>-<index>`, or __runtime__ / __reconciliation__"
    )
    kind: Annotated[str, Field(max_length=_MAX_KIND)] | None = None
    kindIndex: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    syncState: Annotated[str, Field(max_length=40)] | None = None
    blueprint: Annotated[str, Field(max_length=200)] | None = None
    integrationType: _Name | None = None
    integrationIdentifier: _Name | None = None
    integrationVersion: _Name | None = None
    oceanVersion: _Name | None = None
    installationType: _Name | None = None
    executionMode: _Name | None = None
    metrics: dict[str, Any] = Field(
        default_factory=dict,
        description='{"phase": {"extract" | "transform" | "load" | "delete" | "resync": ...}, '
        f"...}}, at most {service.MAX_METRICS_BYTES} bytes of JSON",
    )


class SyncMetricsBody(BaseModel):
    syncKindsMetrics: Annotated[list[SyncKindMetrics], Field(max_length=service.MAX_SYNC_KINDS)]


class KindMetricsBody(BaseModel):
    syncKindMetrics: SyncKindMetrics


class HeartbeatBody(BaseModel):
    eventId: Annotated[str, Field(min_length=1, max_length=_MAX_EVENT)]


class StoredResponse(BaseModel):
    ok: Literal[True] = True
    stored: int = Field(description="kinds stored (past a sync's cap, new kinds are not)")


class SyncKindMetricsOut(BaseModel):
    integrationType: str
    integrationIdentifier: str
    integrationVersion: str
    oceanVersion: str
    kindIdentifier: str
    kind: str
    kindIndex: int
    eventId: str
    syncState: str
    blueprint: str
    metrics: dict[str, Any]
    createdAt: datetime
    updatedAt: datetime


class SyncMetricsResponse(BaseModel):
    ok: Literal[True] = True
    count: int
    data: list[SyncKindMetricsOut]


class SyncMetadata(BaseModel):
    eventId: str
    syncState: str = Field(description="syncing, completed, failed or aborted")
    createdAt: datetime
    updatedAt: datetime
    lastHeartbeatAt: datetime | None


class SyncsMetadataResponse(BaseModel):
    ok: Literal[True] = True
    count: int
    data: list[SyncMetadata] = Field(description="newest first")


def _given(body: BaseModel) -> dict[str, Any]:
    return body.model_dump(mode="json", exclude_unset=True)


# ------------------------------------------------------------------------------------------
# Integrations


@router.get(
    "/v1/integration",
    response_model=IntegrationListResponse,
    responses=ERRORS_AUTHED,
    summary="List the organization's integrations",
)
async def list_integrations(
    tenant: CurrentTenant, request: Request, actionsProcessingEnabled: bool | None = None
) -> Any:
    permissions.require(tenant.principal, "integrations.read")
    found = await service.list_all(tenant.tx, _public_url(request), actionsProcessingEnabled)
    return {"ok": True, "integrations": found}


@router.get(
    "/v1/integration/provision-enabled",
    response_model=ProvisionEnabledResponse,
    responses=ERRORS_AUTHED,
    summary="Integration types whose resources the server provisions (none: Ocean creates them)",
)
async def provision_enabled(tenant: CurrentTenant) -> Any:
    permissions.require(tenant.principal, "integrations.read")
    return {"ok": True, "integrations": []}


class IntegrationMetadata(BaseModel):
    identifier: str
    installationId: str
    integrationType: str | None
    title: str | None
    version: str | None
    updatedAt: datetime


class IntegrationMetadataResponse(BaseModel):
    ok: Literal[True] = True
    integrations: list[IntegrationMetadata]


@router.get(
    "/v1/integration/metadata",
    response_model=IntegrationMetadataResponse,
    responses=ERRORS_AUTHED,
    summary="The organization's integrations, member view (what they are, not their settings)",
)
async def integrations_metadata(tenant: CurrentTenant) -> Any:
    permissions.require(tenant.principal, "integrations.metadata")
    return {"ok": True, "integrations": await service.metadata(tenant.tx)}


@router.post(
    "/v1/integration",
    status_code=201,
    response_model=IntegrationResponse,
    responses={**ERRORS_AUTHED, **_CONFLICT},
    summary="Create an integration (Ocean does on its first start)",
)
async def create_integration(
    body: IntegrationCreateBody, tenant: CurrentTenant, request: Request
) -> Any:
    permissions.require(tenant.principal, "integrations.manage")
    created = await service.create(
        tenant.tx, tenant.principal.subject, _given(body), _public_url(request)
    )
    return {"ok": True, "integration": created}


@router.get(
    "/v1/integration/{identifier}",
    response_model=IntegrationResponse,
    responses=ERRORS_AUTHED,
    summary="Get an integration (by its identifier, or by its log ingest id)",
)
@writes  # keeps the Ocean version a read reports
async def get_integration(
    identifier: IntegrationId,
    tenant: CurrentTenant,
    request: Request,
    byField: Literal["installationId", "logIngestId"] = "installationId",
    oceanCoreVersion: OceanVersion = None,
    isPolling: Annotated[bool | None, Query(description="sent by Ocean; not used")] = None,
) -> Any:
    permissions.require(tenant.principal, "integrations.read")
    found = await service.get(
        tenant.tx, identifier, _public_url(request), byField, ocean_core_version=oceanCoreVersion
    )
    return {"ok": True, "integration": found}


@router.patch(
    "/v1/integration/{identifier}",
    response_model=IntegrationResponse,
    responses=ERRORS_AUTHED,
    summary="Change an integration (moves updatedAt; a new config asks for a resync)",
)
async def patch_integration(
    identifier: IntegrationId,
    body: IntegrationFields,
    tenant: CurrentTenant,
    request: Request,
    skip_resync: SkipResync = None,
) -> Any:
    permissions.require(tenant.principal, "integrations.manage")
    updated = await service.patch(
        tenant.tx,
        tenant.principal.subject,
        identifier,
        _given(body),
        _public_url(request),
        request_resync=not skip_resync,
    )
    return {"ok": True, "integration": updated}


@router.patch(
    "/v1/integration/{identifier}/config",
    response_model=IntegrationResponse,
    responses=ERRORS_AUTHED,
    summary="Replace an integration's mapping (asks for a resync, unless x-skip-resync)",
)
async def patch_integration_config(
    identifier: IntegrationId,
    body: ConfigBody,
    tenant: CurrentTenant,
    request: Request,
    skip_resync: SkipResync = None,
) -> Any:
    permissions.require(tenant.principal, "integrations.manage")
    updated = await service.patch(
        tenant.tx,
        tenant.principal.subject,
        identifier,
        {"config": body.config},
        _public_url(request),
        request_resync=not skip_resync,
    )
    return {"ok": True, "integration": updated}


@router.patch(
    "/v1/integration/{identifier}/resync-state",
    response_model=IntegrationResponse,
    responses=ERRORS_AUTHED,
    summary="Report a resync's state (updatedAt becomes resyncState.updatedAt)",
)
async def report_resync_state(
    identifier: IntegrationId, body: ResyncStateBody, tenant: CurrentTenant, request: Request
) -> Any:
    permissions.require(tenant.principal, "integrations.manage")
    updated = await service.report_resync(tenant.tx, identifier, _given(body), _public_url(request))
    return {"ok": True, "integration": updated}


@router.get(
    "/v1/integration/{identifier}/resync-request",
    response_model=ResyncRequestResponse,
    responses=ERRORS_AUTHED,
    summary="The pending resync request (null when none): a polling integration resyncs on it",
)
async def get_resync_request(identifier: IntegrationId, tenant: CurrentTenant) -> Any:
    permissions.require(tenant.principal, "integrations.read")
    return {"ok": True, "request": await service.resync_request(tenant.tx, identifier)}


@router.post(
    "/v1/integration/{identifier}/resync-request",
    status_code=202,
    response_model=ResyncRequestResponse,
    responses=ERRORS_AUTHED,
    summary="Ask an integration to resync (it does at its next poll)",
)
async def post_resync_request(identifier: IntegrationId, tenant: CurrentTenant) -> Any:
    permissions.require(tenant.principal, "integrations.manage")
    requested = await service.request_resync(tenant.tx, tenant.principal.subject, identifier)
    return {"ok": True, "request": requested}


async def _delete(identifier: str, tenant: CurrentTenant) -> Any:
    await service.delete(tenant.tx, identifier)
    return {"ok": True}


@router.delete(
    "/v1/integration/{identifier}",
    response_model=OkResponse,
    responses=ERRORS_AUTHED,
    summary="Delete an integration with its examples, logs and metrics (its entities stay)",
)
async def delete_integration(identifier: IntegrationId, tenant: CurrentTenant) -> Any:
    permissions.require(tenant.principal, "integrations.manage")
    return await _delete(identifier, tenant)


@router.delete(
    "/v1/integrations/{identifier}",
    response_model=OkResponse,
    responses=ERRORS_AUTHED,
    summary="Delete an integration (the plural form Ocean's test helpers use)",
)
async def delete_integration_plural(identifier: IntegrationId, tenant: CurrentTenant) -> Any:
    permissions.require(tenant.principal, "integrations.manage")
    return await _delete(identifier, tenant)


# ------------------------------------------------------------------------------------------
# Examples


def _kind(request: Request, decoded: str) -> str:
    """The kind as sent: Ocean `quote_plus`es it, so it is read from the raw path (a `+`
    there is a space, `%2F` a slash)."""
    raw = request.scope.get("raw_path")
    kind = decoded
    if isinstance(raw, bytes):
        text = raw.decode("latin-1")
        start = text.find("/kinds/")
        end = text.rfind("/examples")
        if 0 <= start < end:
            kind = unquote_plus(text[start + len("/kinds/") : end])
    if not kind or len(kind) > _MAX_KIND or not service.storable(kind):
        raise Invalid(f"A kind is 1 to {_MAX_KIND} characters of text")
    return kind


@router.post(
    "/v1/integration/{identifier}/kinds/{kind:path}/examples",
    response_model=OkResponse,
    responses=ERRORS_AUTHED,
    summary="Store raw examples of a kind (the latest 5 are kept)",
)
async def post_kind_examples(
    identifier: IntegrationId,
    kind: str,
    body: ExamplesBody,
    tenant: CurrentTenant,
    request: Request,
) -> Any:
    permissions.require(tenant.principal, "integrations.manage")
    await service.store_examples(tenant.tx, identifier, _kind(request, kind), body.examples)
    return {"ok": True}


@router.get(
    "/v1/integration/{identifier}/kinds/{kind:path}/examples",
    response_model=ExamplesResponse,
    responses=ERRORS_AUTHED,
    summary="The latest raw examples of a kind, newest first",
)
async def get_kind_examples(
    identifier: IntegrationId, kind: str, tenant: CurrentTenant, request: Request
) -> Any:
    permissions.require(tenant.principal, "integrations.read")
    examples = await service.get_examples(tenant.tx, identifier, _kind(request, kind))
    return {"ok": True, "examples": examples}


# ------------------------------------------------------------------------------------------
# Logs


@router.get(
    "/v1/integration/{identifier}/logs",
    response_model=LogsResponse,
    responses=ERRORS_AUTHED,
    summary="An integration's logs, newest first (page with timestamp, log_id, direction)",
)
async def list_integration_logs(
    identifier: IntegrationId,
    tenant: CurrentTenant,
    limit: Annotated[int, Query(ge=1, le=100)] = 100,
    timestamp: datetime | None = None,
    log_id: Annotated[int | None, Query(ge=0, le=2**62)] = None,
    direction: Literal["up", "down"] = "down",
    level: Annotated[list[str] | None, Query(max_length=10)] = None,
    event_id: Annotated[
        str | None,
        Query(
            alias="eventId",
            min_length=1,
            max_length=200,
            description="Only the lines logged during this event (a resync) or the events "
            "it started: Ocean's `extra.event_id` / `extra.event_parent_id`",
        ),
    ] = None,
) -> Any:
    permissions.require(tenant.principal, "integrations.read")
    if level is not None and not all(service.storable(item) for item in level):
        raise Invalid("A level is text")
    if event_id is not None and not service.storable(event_id):
        raise Invalid("eventId is text")
    logs = await service.list_logs(
        tenant.tx,
        identifier,
        limit=limit,
        timestamp=timestamp,
        log_id=log_id,
        direction=direction,
        levels=level,
        event_id=event_id,
    )
    return {"ok": True, "logs": logs}


@router.post(
    "/v1/integration-logs/{ingestId}",
    response_model=IngestedResponse,
    responses=ERRORS_AUTHED,
    summary="Ingest an integration's log lines (its logAttributes.ingestUrl)",
)
async def ingest_integration_logs(ingestId: IngestId, body: LogsBody, tenant: CurrentTenant) -> Any:
    permissions.require(tenant.principal, "integrations.manage")
    count = await service.ingest_logs(tenant.tx, ingestId, body.logs)
    return {"ok": True, "ingested": count}


# ------------------------------------------------------------------------------------------
# Sync metrics


@router.get(
    "/v1/integration/{identifier}/syncsMetadata",
    response_model=SyncsMetadataResponse,
    responses=ERRORS_AUTHED,
    summary=f"An integration's syncs with metrics (the latest {service.KEPT_SYNCS}), newest first",
)
async def list_integration_syncs(identifier: IntegrationId, tenant: CurrentTenant) -> Any:
    permissions.require(tenant.principal, "integrations.read")
    syncs = await service.list_syncs(tenant.tx, identifier)
    return {"ok": True, "count": len(syncs), "data": syncs}


@router.get(
    "/v1/integration/{identifier}/syncMetrics",
    response_model=SyncMetricsResponse,
    responses=ERRORS_AUTHED,
    summary="Each kind's metrics of a sync (resyncId's, else the latest)",
)
async def get_integration_sync_metrics(
    identifier: IntegrationId,
    tenant: CurrentTenant,
    resyncId: Annotated[str | None, Query(min_length=1, max_length=_MAX_EVENT)] = None,
) -> Any:
    permissions.require(tenant.principal, "integrations.read")
    if resyncId is not None and not service.storable(resyncId):
        raise Invalid("A resync id is text")
    data = await service.sync_metrics(tenant.tx, identifier, resyncId)
    return {"ok": True, "count": len(data), "data": data}


@router.post(
    "/v1/integration-metrics/{ingestId}/syncMetrics",
    response_model=StoredResponse,
    responses=ERRORS_AUTHED,
    summary="Ingest kinds' sync metrics (under metricAttributes.ingestUrl)",
)
async def ingest_sync_metrics(
    ingestId: IngestId, body: SyncMetricsBody, tenant: CurrentTenant
) -> Any:
    permissions.require(tenant.principal, "integrations.manage")
    items = [item.model_dump(mode="json") for item in body.syncKindsMetrics]
    stored = await service.ingest_sync_metrics(tenant.tx, ingestId, items)
    return {"ok": True, "stored": stored}


def _event_and_kind(request: Request) -> tuple[str, str]:
    """The event id and kind identifier of .../syncMetrics/resync/{eventId}/kind/{kind}, read
    from the raw path: Ocean `quote_plus`es both (a kind may hold a slash, an event id may
    be empty)."""
    raw = request.scope.get("raw_path")
    text = raw.decode("latin-1") if isinstance(raw, bytes) else request.url.path
    marker = "/syncMetrics/resync/"
    start = text.find(marker)
    tail = text[start + len(marker) :].split("?", 1)[0] if start >= 0 else ""
    event, sep, kind = tail.partition("/kind/")
    event_id, kind_identifier = unquote_plus(event), unquote_plus(kind)
    if not sep or not kind_identifier or len(kind_identifier) > _MAX_KIND:
        raise Invalid(f"The path ends with /resync/{{eventId}}/kind/{{kind}} (1-{_MAX_KIND})")
    if len(event_id) > _MAX_EVENT:
        raise Invalid(f"An event id is at most {_MAX_EVENT} characters")
    return event_id, kind_identifier


@router.put(
    "/v1/integration-metrics/{ingestId}/syncMetrics/resync/{rest:path}",
    response_model=StoredResponse,
    responses=ERRORS_AUTHED,
    summary="Ingest one kind's sync metrics (.../resync/{eventId}/kind/{kindIdentifier})",
)
async def ingest_kind_metrics(
    ingestId: IngestId, rest: str, body: KindMetricsBody, tenant: CurrentTenant, request: Request
) -> Any:
    permissions.require(tenant.principal, "integrations.manage")
    event_id, kind_identifier = _event_and_kind(request)
    stored = await service.ingest_kind_metrics(
        tenant.tx, ingestId, event_id, kind_identifier, body.syncKindMetrics.model_dump(mode="json")
    )
    return {"ok": True, "stored": stored}


@router.post(
    "/v1/integration-metrics/{ingestId}/heartbeat",
    response_model=OkResponse,
    responses=ERRORS_AUTHED,
    summary="A running sync's heartbeat",
)
async def ingest_heartbeat(ingestId: IngestId, body: HeartbeatBody, tenant: CurrentTenant) -> Any:
    permissions.require(tenant.principal, "integrations.manage")
    await service.heartbeat(tenant.tx, ingestId, body.eventId)
    return {"ok": True}
