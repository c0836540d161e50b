"""Shapes of the organization routes (Port's `{"ok": true, "organization": {...}}`)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class OrganizationOut(BaseModel):
    id: uuid.UUID
    name: str
    featureFlags: list[str] = Field(default_factory=list)
    settings: dict[str, Any] = Field(default_factory=dict)
    createdAt: datetime
    updatedAt: datetime


class OrganizationResponse(BaseModel):
    ok: Literal[True] = True
    organization: OrganizationOut


class OrgCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Blank names and control characters are refused by the service (shared with the CLI).
    name: str = Field(min_length=1, max_length=200)


class OrgCreatedResponse(BaseModel):
    ok: Literal[True] = True
    orgId: uuid.UUID
    name: str
    clientId: str
    clientSecret: str
    signingSecret: str = Field(description="the key outbound webhooks are signed with")
