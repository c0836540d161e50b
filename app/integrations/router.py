"""Integration routes (Port's shapes, as Port's Ocean framework calls them): /v1/integration,
resync reports, the raw examples per kind, logs, and the log ingest URL.

Single integrations answer `{"ok": true, "integration": {...}}`; the list answers
`{"ok": true, "integrations": [...]}`. Ocean posts its logs to the integration's
`logAttributes.ingestUrl` with its bearer token: that URL needs the token and the
integration's secret ingest id both.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import unquote_plus

from fastapi import Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from app.auth import permissions
from app.auth.principal import CurrentTenant
from app.config import Settings
from app.db.routing import api_router
from app.integrations import service
from app.kit.errors import Invalid
from app.kit.openapi import ERRORS_AUTHED, OkResponse, conflict

router = api_router(tags=["Integrations"])
_ID_PATTERN = r"^[A-Za-z0-9@_.+:=-]+$"
IntegrationId = Annotated[str, Path(min_length=1, max_length=100, pattern=_ID_PATTERN)]
IngestId = Annotated[str, Path(min_length=1, max_length=80, pattern=r"^[A-Za-z0-9_-]+$")]
_CONFLICT = conflict("An integration with this identifier exists")
_MAX_KIND = 200


def _public_url(request: Request) -> str:
    settings: Settings = request.app.state.settings
    return settings.public_url


# ------------------------------------------------------------------------------------------
# Shapes


class ResyncState(BaseModel):
    status: str | None = Field(description="running, completed or failed")
    lastResyncStart: datetime | None
    lastResyncEnd: datetime | None
    nextResync: datetime | None
    intervalInMinuets: int | None = Field(description="Port's spelling")
    updatedAt: datetime | None = Field(description="when the integration last reported")


class LogAttributes(BaseModel):
    ingestId: str
    ingestUrl: str = Field(description="where the integration posts its logs (bearer token)")


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


class IntegrationCreateBody(IntegrationFields):
    installationId: Annotated[str, Field(min_length=1, max_length=100, pattern=_ID_PATTERN)]


class ConfigBody(BaseModel):
    config: dict[str, Any] | None


class ResyncStateBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    status: Literal["running", "completed", "failed"] | None = None
    lastResyncStart: datetime | None = None
    lastResyncEnd: datetime | None = None
    nextResync: datetime | None = None
    intervalInMinuets: Annotated[int, Field(ge=0, le=10_000_000)] | None = None


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
async def get_integration(
    identifier: IntegrationId,
    tenant: CurrentTenant,
    request: Request,
    byField: Literal["installationId", "logIngestId"] = "installationId",
) -> Any:
    permissions.require(tenant.principal, "integrations.read")
    found = await service.get(tenant.tx, identifier, _public_url(request), byField)
    return {"ok": True, "integration": found}


@router.patch(
    "/v1/integration/{identifier}",
    response_model=IntegrationResponse,
    responses=ERRORS_AUTHED,
    summary="Change an integration (any PATCH, an empty one too, asks for a resync)",
)
async def patch_integration(
    identifier: IntegrationId, body: IntegrationFields, tenant: CurrentTenant, request: Request
) -> Any:
    permissions.require(tenant.principal, "integrations.manage")
    updated = await service.patch(
        tenant.tx, tenant.principal.subject, identifier, _given(body), _public_url(request)
    )
    return {"ok": True, "integration": updated}


@router.patch(
    "/v1/integration/{identifier}/config",
    response_model=IntegrationResponse,
    responses=ERRORS_AUTHED,
    summary="Replace an integration's mapping (asks for a resync)",
)
async def patch_integration_config(
    identifier: IntegrationId, body: ConfigBody, tenant: CurrentTenant, request: Request
) -> Any:
    permissions.require(tenant.principal, "integrations.manage")
    updated = await service.patch(
        tenant.tx,
        tenant.principal.subject,
        identifier,
        {"config": body.config},
        _public_url(request),
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


async def _delete(identifier: str, tenant: CurrentTenant) -> Any:
    await service.delete(tenant.tx, identifier)
    return {"ok": True}


@router.delete(
    "/v1/integration/{identifier}",
    response_model=OkResponse,
    responses=ERRORS_AUTHED,
    summary="Delete an integration with its examples and logs (its entities stay)",
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
) -> Any:
    permissions.require(tenant.principal, "integrations.read")
    if level is not None and not all(service.storable(item) for item in level):
        raise Invalid("A level is text")
    logs = await service.list_logs(
        tenant.tx,
        identifier,
        limit=limit,
        timestamp=timestamp,
        log_id=log_id,
        direction=direction,
        levels=level,
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
