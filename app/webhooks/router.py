"""Incoming webhook routes (Port's shapes): /v1/webhooks, their events, and the ingest URL.

Single webhooks answer `{"ok": true, "integration": {...}}` as Port does; lists answer
`{"ok": true, "integrations": [...]}`. `POST /v1/webhooks/ingest/{webhookKey}` takes no
bearer token: the key, and the signature when the webhook has a secret, authenticate it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import BackgroundTasks, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from app.auth import permissions
from app.auth.principal import CurrentTenant
from app.config import Settings
from app.db.routing import any_query, api_router
from app.kit.crypto import Cipher, cipher_for
from app.kit.openapi import ERRORS_AUTHED, ErrorBody, OkResponse, conflict
from app.webhooks import ingest, service

router = api_router(prefix="/v1/webhooks", tags=["Webhook"])
WebhookId = Annotated[str, Path(min_length=1, max_length=100)]
WebhookKey = Annotated[str, Path(min_length=1, max_length=200)]
_CONFLICT = conflict("A webhook with this identifier exists")


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _cipher(request: Request) -> Cipher:
    return cipher_for(_settings(request))


class WebhookBody(BaseModel):
    """Port's webhook. `mappings`: `[{blueprint, operation?, filter?, itemsToParse?,
    entity: {identifier, title?, icon?, team?, properties?, relations?}}]`, their strings
    jq over `{body, headers, queryParams, item}`. `security`: `{secret?,
    signatureHeaderName?, signatureAlgorithm?: sha1|sha256|plain, signaturePrefix?,
    requestIdentifierPath?}`; the secret is encrypted and never returned."""

    model_config = ConfigDict(extra="allow")

    identifier: Any = Field(default=None, description="at most 30 characters; made when absent")
    title: Any = Field(default=None, description="required on create; at most 30 characters")
    description: Any = Field(default=None, description="at most 200 characters")
    icon: Any = None
    enabled: Any = Field(default=None, description="true (the default) or false")
    integrationType: Any = Field(default=None, description='"custom" (the default) or "template"')
    mappings: Any = Field(default=None, description="the mappings, applied in order")
    security: Any = Field(default=None, description="how requests are authenticated")


class WebhookSecurity(BaseModel):
    signatureHeaderName: str | None = None
    signatureAlgorithm: Literal["sha1", "sha256", "plain"] | None = None
    signaturePrefix: str | None = None
    requestIdentifierPath: str | None = None
    secretSet: bool = Field(description="whether a secret is stored (it is never returned)")


class Webhook(BaseModel):
    identifier: str
    title: str
    description: str | None = None
    icon: str | None = None
    enabled: bool
    integrationType: str
    mappings: list[dict[str, Any]]
    security: WebhookSecurity
    webhookKey: str
    url: str = Field(description="where the sender posts events (no bearer token)")
    createdAt: datetime
    createdBy: str
    updatedAt: datetime
    updatedBy: str


class WebhookResponse(BaseModel):
    ok: Literal[True] = True
    integration: Webhook


class WebhookListResponse(BaseModel):
    ok: Literal[True] = True
    integrations: list[Webhook]


class EntityChange(BaseModel):
    mapping: int
    item: int | None
    blueprint: str
    identifier: str
    operation: Literal["create", "update", "delete"]


class EventError(BaseModel):
    model_config = ConfigDict(extra="allow")

    mapping: int | None = Field(description="the mapping's index (null: the event as a whole)")
    item: int | None = Field(description="the item's index in itemsToParse")
    pointer: str = Field(description="JSON pointer into the webhook definition")
    message: str


class EventOutcome(BaseModel):
    entities: list[EntityChange]
    errors: list[EventError]


class WebhookEvent(BaseModel):
    id: str
    requestId: str | None
    receivedAt: datetime
    status: Literal["pending", "processed", "failed"]
    processedAt: datetime | None
    attempts: int
    outcome: EventOutcome


class WebhookEventListResponse(BaseModel):
    ok: Literal[True] = True
    events: list[WebhookEvent]


class IngestResponse(BaseModel):
    ok: Literal[True] = True
    eventId: str
    replayed: bool = Field(description="true: the request identifier was seen before")


def _raw(body: WebhookBody) -> dict[str, Any]:
    return body.model_dump(exclude_unset=True)


def _err(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


_INGEST_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _err("The body is not a JSON document"),
    401: _err("The signature is missing or does not match"),
    404: _err("No webhook has this key"),
    409: _err("The webhook is disabled: the event was dropped"),
    413: _err("The body is larger than the webhook limit (512 KiB)"),
    422: _err("The request does not match the route's schema"),
    429: _err(
        "Too many events for the webhook or its organization: not stored, send it again "
        "after Retry-After seconds"
    ),
}


@router.post(
    "/ingest/{webhookKey}",
    status_code=202,
    response_model=IngestResponse,
    responses=_INGEST_ERRORS,
    summary="Send an event to a webhook (authenticated by its key and signature)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"description": "any JSON document"}}},
        }
    },
)
@any_query  # the sender's query parameters are kept with the event (`queryParams` in jq)
async def ingest_event(
    webhookKey: WebhookKey, request: Request, background: BackgroundTasks
) -> Any:
    settings = _settings(request)
    accepted = await ingest.accept(
        request, request.app.state.db, _cipher(request), settings, webhookKey
    )
    if not accepted.replayed:
        background.add_task(ingest.enqueue, request, settings, accepted)
    return {"ok": True, "eventId": accepted.event_id, "replayed": accepted.replayed}


@router.post(
    "",
    status_code=201,
    response_model=WebhookResponse,
    response_model_exclude_unset=True,
    responses={**ERRORS_AUTHED, **_CONFLICT},
    summary="Create a webhook",
)
async def create_webhook(body: WebhookBody, tenant: CurrentTenant, request: Request) -> Any:
    permissions.require(tenant.principal, "webhooks.manage")
    created = await service.create(
        tenant.tx,
        _cipher(request),
        tenant.principal.subject,
        _raw(body),
        _settings(request).public_url,
    )
    return {"ok": True, "integration": created}


@router.get(
    "",
    response_model=WebhookListResponse,
    response_model_exclude_unset=True,
    responses=ERRORS_AUTHED,
    summary="List webhooks",
)
async def list_webhooks(tenant: CurrentTenant, request: Request) -> Any:
    permissions.require(tenant.principal, "webhooks.read")
    webhooks = await service.list_all(tenant.tx, _settings(request).public_url)
    return {"ok": True, "integrations": webhooks}


class WebhookMetadata(BaseModel):
    identifier: str
    title: str
    icon: str | None
    integrationType: str | None
    updatedAt: datetime


class WebhookMetadataResponse(BaseModel):
    ok: Literal[True] = True
    webhooks: list[WebhookMetadata]


@router.get(
    "/metadata",
    response_model=WebhookMetadataResponse,
    responses=ERRORS_AUTHED,
    summary="The organization's webhooks, member view (what they are, not their settings)",
)
async def webhooks_metadata(tenant: CurrentTenant) -> Any:
    permissions.require(tenant.principal, "webhooks.metadata")
    return {"ok": True, "webhooks": await service.metadata(tenant.tx)}


@router.get(
    "/{identifier}",
    response_model=WebhookResponse,
    response_model_exclude_unset=True,
    responses=ERRORS_AUTHED,
    summary="Get a webhook",
)
async def get_webhook(identifier: WebhookId, tenant: CurrentTenant, request: Request) -> Any:
    permissions.require(tenant.principal, "webhooks.read")
    webhook = await service.get(tenant.tx, identifier, _settings(request).public_url)
    return {"ok": True, "integration": webhook}


@router.put(
    "/{identifier}",
    response_model=WebhookResponse,
    response_model_exclude_unset=True,
    responses=ERRORS_AUTHED,
    summary="Replace a webhook (the stored secret stays unless `security.secret` is given)",
)
async def replace_webhook(
    identifier: WebhookId, body: WebhookBody, tenant: CurrentTenant, request: Request
) -> Any:
    permissions.require(tenant.principal, "webhooks.manage")
    updated = await service.replace(
        tenant.tx,
        _cipher(request),
        tenant.principal.subject,
        identifier,
        _raw(body),
        _settings(request).public_url,
    )
    return {"ok": True, "integration": updated}


@router.patch(
    "/{identifier}",
    response_model=WebhookResponse,
    response_model_exclude_unset=True,
    responses=ERRORS_AUTHED,
    summary="Change some of a webhook's fields",
)
async def patch_webhook(
    identifier: WebhookId, body: WebhookBody, tenant: CurrentTenant, request: Request
) -> Any:
    permissions.require(tenant.principal, "webhooks.manage")
    updated = await service.patch(
        tenant.tx,
        _cipher(request),
        tenant.principal.subject,
        identifier,
        _raw(body),
        _settings(request).public_url,
    )
    return {"ok": True, "integration": updated}


@router.delete(
    "/{identifier}",
    response_model=OkResponse,
    responses=ERRORS_AUTHED,
    summary="Delete a webhook and its events",
)
async def delete_webhook(identifier: WebhookId, tenant: CurrentTenant) -> Any:
    permissions.require(tenant.principal, "webhooks.manage")
    await service.delete(tenant.tx, identifier)
    return {"ok": True}


@router.get(
    "/{identifier}/events",
    response_model=WebhookEventListResponse,
    responses=ERRORS_AUTHED,
    summary="A webhook's latest events and what they did (newest first)",
)
async def list_webhook_events(
    identifier: WebhookId,
    tenant: CurrentTenant,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> Any:
    permissions.require(tenant.principal, "webhooks.read")
    events = await service.list_events(tenant.tx, identifier, limit)
    return {"ok": True, "events": events}
