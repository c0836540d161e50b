"""HTTP shapes of history: Port's properties-history body and answer, and the timeline."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.history.timeframe import Interval, Preset


class TimeRange(BaseModel):
    """Port's `preset` (with `timeZone`), or explicit bounds `from` / `to` (ISO 8601; a
    bound without an offset is read in `timeZone`). The zone defaults to UTC."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    preset: Preset | None = None
    timeZone: str | None = Field(default=None, max_length=100)
    from_: datetime | None = Field(default=None, alias="from")
    to: datetime | None = None


class PropertiesHistoryBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    entityIdentifier: str = Field(min_length=1, max_length=1000)
    blueprintIdentifier: str = Field(min_length=1, max_length=100)
    propertyNames: list[str] = Field(min_length=1, max_length=50)
    timeInterval: Interval = "day"
    timeRange: TimeRange = Field(default_factory=lambda: TimeRange(preset="lastMonth"))


class PropertiesHistory(BaseModel):
    minDate: int = Field(description="The range's start, milliseconds since the epoch")
    maxDate: int = Field(description="The range's end (no later than now), milliseconds")
    data: list[dict[str, Any]] = Field(
        description="One point per bucket: `date` (the bucket's start, milliseconds) and "
        "each property's value in force when the bucket closes (null: no entity then)"
    )


class PropertiesHistoryResponse(BaseModel):
    ok: Literal[True] = True
    result: PropertiesHistory


class OverTime(BaseModel):
    minDate: int = Field(description="The range's start, milliseconds since the epoch")
    maxDate: int = Field(description="The range's end (no later than now), milliseconds")
    data: list[dict[str, Any]] = Field(
        description="One point per bucket: `date` (the bucket's start, milliseconds) and a "
        "value per line (a property, `count` / `average`, or a breakdown value)"
    )


class OverTimeResponse(BaseModel):
    ok: Literal[True] = True
    result: OverTime


class ChangedBy(BaseModel):
    kind: Literal["user", "credential", "integration", "webhook", "run", "automation", "system"]
    id: str = Field(description="The actor as recorded: a user, a credential's client id...")


class FieldChange(BaseModel):
    path: str = Field(description="`$title`, `$icon`, `$team`, `properties.<p>`, `relations.<r>`")
    before: Any = None
    after: Any = None


class RunRef(BaseModel):
    id: str
    action: str | None = None


class TimelineEntry(BaseModel):
    id: str
    action: Literal["CREATE", "UPDATE", "DELETE"]
    at: datetime
    by: ChangedBy
    origin: str = Field(description="Where from: UI, API, INTEGRATION, WEBHOOK, ACTION, SYSTEM")
    run: RunRef | None = None
    changes: list[FieldChange]
    before: dict[str, Any] | None
    after: dict[str, Any] | None


class TimelineResponse(BaseModel):
    ok: Literal[True] = True
    history: list[TimelineEntry]
    next: str | None = None
