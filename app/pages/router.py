"""Page routes (Port's /v1/pages, their widgets and permissions), and the widget data route
beyond Port: `POST /v1/pages/{page}/widgets/{widget}/data` (docs/dashboards.md)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Body, Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from app.auth import permissions
from app.auth.principal import CurrentTenant
from app.config import Settings
from app.db.routing import AfterCommit, api_router
from app.kit.openapi import ERRORS_AUTHED, OkResponse, conflict
from app.kit.responses import json_response
from app.pages import data, service
from app.pages.widgets import LINE, TABLE, blueprint_rule
from app.search.service import decode_cursor, encode_cursor, prepare

router = api_router(prefix="/v1/pages", tags=["Pages"])
PageId = Annotated[str, Path(min_length=1, max_length=100)]
WidgetId = Annotated[str, Path(min_length=1, max_length=100)]
_CONFLICT = conflict("A page with this identifier exists")


class PageResponse(BaseModel):
    ok: bool = True
    page: dict[str, Any]


class PageListResponse(BaseModel):
    ok: bool = True
    pages: list[dict[str, Any]]


class PermissionsResponse(BaseModel):
    ok: bool = True
    permissions: dict[str, Any]


class WidgetResponse(BaseModel):
    ok: bool = True
    identifier: str
    widget: dict[str, Any] | None = None


class WidgetDataBody(BaseModel):
    """For a table widget: the page size and the cursor of the page to read (the `next`
    of the previous answer)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    limit: int = Field(default=100, ge=1, le=1000)
    from_: str | None = Field(default=None, alias="from", max_length=4000)


class WidgetData(BaseModel):
    """`widget` and `type`, and what the type shows: `value` (number), `values` (pie),
    `entities` and `next` (table), `groups` (scorecard-compliance), `minDate`, `maxDate`
    and `data` (line chart), `markdown`, `url`."""

    model_config = ConfigDict(extra="allow")

    ok: bool = True
    widget: str
    type: str


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


@router.get("", response_model=PageListResponse, responses=ERRORS_AUTHED, summary="List pages")
async def list_pages(
    tenant: CurrentTenant,
    compact: Annotated[bool, Query(description="Leave the widgets out")] = False,
) -> Any:
    """The pages the caller may read (their read or update permissions name them)."""
    permissions.require(tenant.principal, "pages.read")
    found = await service.list_readable(tenant.tx, tenant.principal, compact=compact)
    return json_response({"ok": True, "pages": found})


@router.post(
    "",
    status_code=201,
    response_model=PageResponse,
    responses={**ERRORS_AUTHED, **_CONFLICT},
    summary="Create a page",
)
async def create_page(
    request: Request, tenant: CurrentTenant, body: Annotated[dict[str, Any], Body()]
) -> Any:
    permissions.require(tenant.principal, "pages.create")
    settings = _settings(request)
    page = await service.create(
        tenant.tx,
        tenant.principal.subject,
        body,
        max_pages=settings.pages_max_per_org,
        max_widgets=settings.page_widgets_max,
    )
    return json_response({"ok": True, "page": page}, status_code=201)


@router.get(
    "/{identifier}", response_model=PageResponse, responses=ERRORS_AUTHED, summary="Get a page"
)
async def get_page(identifier: PageId, tenant: CurrentTenant) -> Any:
    row = await service.stored(tenant.tx, identifier)
    permissions.require_page(
        tenant.principal, identifier, row["read_access"], row["update_access"], "read"
    )
    return json_response({"ok": True, "page": await service.get(tenant.tx, row)})


@router.patch(
    "/{identifier}",
    response_model=PageResponse,
    responses=ERRORS_AUTHED,
    summary="Change a page (the fields given replace the stored ones; widgets all of them)",
)
async def patch_page(
    request: Request,
    identifier: PageId,
    tenant: CurrentTenant,
    body: Annotated[dict[str, Any], Body()],
) -> Any:
    row = await service.stored(tenant.tx, identifier, lock=True)
    permissions.require_page(
        tenant.principal, identifier, row["read_access"], row["update_access"], "update"
    )
    page = await service.patch(
        tenant.tx,
        tenant.principal.subject,
        row,
        body,
        max_widgets=_settings(request).page_widgets_max,
    )
    return json_response({"ok": True, "page": page})


@router.delete(
    "/{identifier}", response_model=OkResponse, responses=ERRORS_AUTHED, summary="Delete a page"
)
async def delete_page(identifier: PageId, tenant: CurrentTenant) -> Any:
    permissions.require(tenant.principal, "pages.delete")
    await service.delete(tenant.tx, identifier)
    return {"ok": True}


@router.get(
    "/{page_identifier}/permissions",
    response_model=PermissionsResponse,
    responses=ERRORS_AUTHED,
    summary="Get a page's permissions (who reads it, who changes it)",
)
async def get_page_permissions(page_identifier: PageId, tenant: CurrentTenant) -> Any:
    row = await service.stored(tenant.tx, page_identifier)
    permissions.require_page(
        tenant.principal, page_identifier, row["read_access"], row["update_access"], "read"
    )
    return {"ok": True, "permissions": service.access(row)}


@router.patch(
    "/{page_identifier}/permissions",
    response_model=PermissionsResponse,
    responses=ERRORS_AUTHED,
    summary="Change a page's permissions (keys given replace the stored ones)",
)
async def patch_page_permissions(
    page_identifier: PageId, tenant: CurrentTenant, body: Annotated[dict[str, Any], Body()]
) -> Any:
    permissions.require(tenant.principal, "pages.permissions.update")
    row = await service.stored(tenant.tx, page_identifier, lock=True)
    merged = await service.update_access(tenant.tx, tenant.principal.subject, row, body)
    return {"ok": True, "permissions": merged}


@router.post(
    "/{page_identifier}/widgets",
    status_code=201,
    response_model=WidgetResponse,
    responses=ERRORS_AUTHED,
    summary="Add a widget to a page (into its dashboard, when it has one)",
)
async def create_widget(
    request: Request,
    page_identifier: PageId,
    tenant: CurrentTenant,
    body: Annotated[dict[str, Any], Body()],
) -> Any:
    row = await service.stored(tenant.tx, page_identifier, lock=True)
    permissions.require_page(
        tenant.principal, page_identifier, row["read_access"], row["update_access"], "update"
    )
    widget = await service.create_widget(
        tenant.tx,
        tenant.principal.subject,
        row,
        body,
        max_widgets=_settings(request).page_widgets_max,
    )
    return json_response(
        {"ok": True, "identifier": widget["id"], "widget": widget}, status_code=201
    )


@router.patch(
    "/{page_identifier}/widgets/{widget_id}",
    response_model=WidgetResponse,
    responses=ERRORS_AUTHED,
    summary="Change a widget (the fields given replace the stored ones)",
)
async def update_widget(
    request: Request,
    page_identifier: PageId,
    widget_id: WidgetId,
    tenant: CurrentTenant,
    body: Annotated[dict[str, Any], Body()],
) -> Any:
    row = await service.stored(tenant.tx, page_identifier, lock=True)
    permissions.require_page(
        tenant.principal, page_identifier, row["read_access"], row["update_access"], "update"
    )
    await service.update_widget(
        tenant.tx,
        tenant.principal.subject,
        row,
        widget_id,
        body,
        max_widgets=_settings(request).page_widgets_max,
    )
    return json_response({"ok": True, "identifier": widget_id})


@router.delete(
    "/{page_identifier}/widgets/{widget_id}",
    response_model=OkResponse,
    responses=ERRORS_AUTHED,
    summary="Delete a widget (a dashboard-widget with the widgets it holds)",
)
async def delete_widget(page_identifier: PageId, widget_id: WidgetId, tenant: CurrentTenant) -> Any:
    row = await service.stored(tenant.tx, page_identifier, lock=True)
    permissions.require_page(
        tenant.principal, page_identifier, row["read_access"], row["update_access"], "update"
    )
    await service.delete_widget(tenant.tx, tenant.principal.subject, row, widget_id)
    return {"ok": True}


@router.post(
    "/{page_identifier}/widgets/{widget_id}/data",
    response_model=WidgetData,
    responses=ERRORS_AUTHED,
    summary="What a widget shows, computed with the caller's permissions",
)
async def widget_data(
    request: Request,
    page_identifier: PageId,
    widget_id: WidgetId,
    tenant: CurrentTenant,
    body: Annotated[WidgetDataBody | None, Body()] = None,
) -> Response:
    row = await service.stored(tenant.tx, page_identifier)
    permissions.require_page(
        tenant.principal, page_identifier, row["read_access"], row["update_access"], "read"
    )
    permissions.require(tenant.principal, "entities.read")
    widget = await service.widget(tenant.tx, page_identifier, widget_id)
    definition = data.for_caller(widget.definition, tenant.principal)
    head: dict[str, Any] = {"ok": True, "widget": widget.id, "type": widget.type}
    simple = data.plain(widget)
    if simple is not None:
        return json_response({**head, **simple})
    if widget.type == LINE:
        settings = _settings(request)
        points = await data.line(
            tenant.tx,
            definition,
            retention_days=settings.history_retention_days,
            history_reads=settings.history_reads_per_org,
        )
        return json_response({**head, **points})
    if widget.type != TABLE:
        return json_response({**head, **await data.COMPUTED[widget.type](tenant.tx, definition)})
    body = body or WidgetDataBody()
    query = data.widget_query(definition)
    blueprint = definition.get("blueprint") or blueprint_rule(query)
    search = await prepare(tenant.tx, str(blueprint), query, windowed=True)
    after = decode_cursor(body.from_) if body.from_ else None
    found, last = await search.page(tenant.tx, after, body.limit)

    async def complete() -> Response:
        await search.calculate(found)  # the transaction has committed: no connection waits
        answer: dict[str, Any] = {**head, "blueprint": blueprint, "entities": found}
        if last is not None:
            answer["next"] = encode_cursor(last)
        return json_response(answer)

    return AfterCommit(complete)
