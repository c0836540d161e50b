"""POST /v1/blueprints/entities/datasource-entities: the entities a datasource (Port's
Ocean integration) wrote, paged, for its reconciliation after a resync."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.auth import permissions
from app.auth.principal import CurrentTenant
from app.catalog import datasource
from app.db.routing import api_router
from app.kit.openapi import ERRORS_AUTHED
from app.kit.responses import json_response

router = api_router(tags=["Entities"])

# Ocean asks for pages of 5000.
MAX_LIMIT = 10_000
# Entities keep at most this much of their writer's User-Agent (app/catalog/entity_router).
_MAX_DATASOURCE = 500


class DatasourceEntitiesBody(BaseModel):
    """Ocean's body. `datasource_prefix` and `datasource_suffix` are the start and the end
    of the writers' `User-Agent`; `before` leaves out entities last written at or after
    it; `from` is a previous page's `next`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    datasource_prefix: str = Field(min_length=1, max_length=_MAX_DATASOURCE)
    datasource_suffix: str = Field(max_length=_MAX_DATASOURCE)
    limit: int = Field(default=1000, ge=1, le=MAX_LIMIT)
    before: datetime | None = Field(
        default=None, description="ISO 8601; without a UTC offset it is read as UTC"
    )
    from_: str | None = Field(default=None, alias="from", min_length=1, max_length=4000)

    @field_validator("datasource_prefix", "datasource_suffix")
    @classmethod
    def _storable(cls, value: str) -> str:
        # No stored datasource holds these; PostgreSQL could not even take them as text.
        if "\x00" in value or any(0xD800 <= ord(c) <= 0xDFFF for c in value):
            raise ValueError("must not hold a NUL character or an unpaired surrogate")
        return value

    @field_validator("before")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        try:
            return value.astimezone(UTC)
        except OverflowError:
            raise ValueError("is out of the range of time PostgreSQL stores") from None


class DatasourceEntity(BaseModel):
    identifier: str
    blueprint: str
    relations: dict[str, Any]


class DatasourceEntitiesPage(BaseModel):
    ok: Literal[True] = True
    entities: list[DatasourceEntity]
    next: str | None = Field(description="pass it as `from` for the next page; null at the end")


@router.post(
    "/v1/blueprints/entities/datasource-entities",
    response_model=DatasourceEntitiesPage,
    responses=ERRORS_AUTHED,
    summary="The entities a datasource wrote (Ocean's reconciliation), paged",
)
async def datasource_entities(body: DatasourceEntitiesBody, tenant: CurrentTenant) -> Any:
    permissions.require(tenant.principal, "entities.read")
    after = datasource.decode_cursor(body.from_) if body.from_ is not None else None
    found, last = await datasource.page(
        tenant.tx,
        prefix=body.datasource_prefix,
        suffix=body.datasource_suffix,
        limit=body.limit,
        before=body.before,
        after=after,
    )
    return json_response(
        {
            "ok": True,
            "entities": found,
            "next": datasource.encode_cursor(last) if last is not None else None,
        }
    )
