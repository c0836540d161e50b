"""HTTP shapes of the catalog routes (Port's)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field

from app.kit.openapi import OkResponse as OkResponse

# `attach_title_to_relation` on entity reads and searches.
AttachTitles = Annotated[
    bool,
    Query(
        description="Relations name each target as {identifier, title} instead of its "
        "identifier alone"
    ),
]

JsonObject = dict[str, Any]


class BlueprintBody(BaseModel):
    """POST/PUT body. Nested definitions are checked by the service, which reports each
    problem by JSON pointer."""

    model_config = ConfigDict(extra="ignore")

    identifier: str = Field(min_length=1, max_length=100)
    title: str = Field(min_length=1, max_length=200)
    icon: str | None = Field(default=None, max_length=200)
    description: str | None = None
    schema_: JsonObject = Field(alias="schema")
    relations: JsonObject = Field(default_factory=dict)
    mirrorProperties: JsonObject = Field(default_factory=dict)
    calculationProperties: JsonObject = Field(default_factory=dict)
    aggregationProperties: JsonObject = Field(default_factory=dict)
    ownership: JsonObject | None = None
    teamInheritance: JsonObject | None = None
    changelogDestination: JsonObject | None = None


class BlueprintReplaceBody(BlueprintBody):
    identifier: str | None = Field(default=None, min_length=1, max_length=100)  # type: ignore[assignment]


class BlueprintPatchBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    identifier: str | None = Field(default=None, min_length=1, max_length=100)
    title: str | None = Field(default=None, min_length=1, max_length=200)
    icon: str | None = Field(default=None, max_length=200)
    description: str | None = None
    schema_: JsonObject | None = Field(default=None, alias="schema")
    relations: JsonObject | None = None
    mirrorProperties: JsonObject | None = None
    calculationProperties: JsonObject | None = None
    aggregationProperties: JsonObject | None = None
    ownership: JsonObject | None = None
    teamInheritance: JsonObject | None = None
    changelogDestination: JsonObject | None = None


class BlueprintOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    identifier: str
    title: str
    icon: str | None = None
    description: str | None = None
    schema_: JsonObject = Field(alias="schema", serialization_alias="schema")
    relations: JsonObject
    mirrorProperties: JsonObject
    calculationProperties: JsonObject
    aggregationProperties: JsonObject
    ownership: JsonObject | None = None
    teamInheritance: JsonObject | None = None
    changelogDestination: JsonObject | None = None
    createdAt: datetime
    createdBy: str
    updatedAt: datetime
    updatedBy: str


class BlueprintResponse(BaseModel):
    ok: Literal[True] = True
    blueprint: BlueprintOut


class BlueprintListResponse(BaseModel):
    ok: Literal[True] = True
    blueprints: list[BlueprintOut]


class EntityOut(BaseModel):
    identifier: str
    title: str | None = None
    icon: str | None = None
    blueprint: str
    team: list[str]
    properties: JsonObject
    relations: JsonObject
    createdAt: datetime
    createdBy: str
    updatedAt: datetime
    updatedBy: str


class EntityResponse(BaseModel):
    ok: Literal[True] = True
    entity: EntityOut


class EntityListResponse(BaseModel):
    ok: Literal[True] = True
    entities: list[JsonObject]


class CountResponse(BaseModel):
    ok: Literal[True] = True
    count: int


class BulkBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    entities: list[Any] = Field(min_length=1, max_length=1000)


class BulkItemOut(BaseModel):
    index: int
    identifier: str
    created: bool


class BulkErrorOut(BaseModel):
    index: int
    identifier: str
    statusCode: int
    error: str
    message: str


class BulkResponse(BaseModel):
    ok: bool
    entities: list[BulkItemOut]
    errors: list[BulkErrorOut]


class BulkDeleteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    entities: list[str] = Field(min_length=1, max_length=100)


class BulkDeleteResponse(BaseModel):
    ok: Literal[True] = True
    deletedEntities: list[str]


class MigrationStarted(BaseModel):
    ok: Literal[True] = True
    migrationId: str


class MigrationOut(BaseModel):
    id: str
    actor: str
    sourceBlueprint: str
    mapping: JsonObject
    status: str
    successCount: int
    failureCount: int
    createdAt: datetime
    updatedAt: datetime


class MigrationResponse(BaseModel):
    ok: Literal[True] = True
    migration: MigrationOut


class RenamePropertyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    newPropertyName: str = Field(min_length=1, max_length=100)


class RenameRelationBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    newRelationIdentifier: str = Field(min_length=1, max_length=100)


class RenameMirrorBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    newMirrorName: str = Field(min_length=1, max_length=100)
