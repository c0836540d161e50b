"""Shapes of the organization routes (Port's `{"ok": true, "organization": {...}}`)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

BlueprintId = Annotated[str, Field(min_length=1, max_length=100)]


class OrgSettings(BaseModel):
    """Port's documented organization settings. Portolan keeps them and answers them on
    `GET /v1/organization` (a portal reads them: hidden blueprints, its title and icon,
    federated logout). Port's support-user settings govern Port's staff access, which a
    Portolan organization never has: `supportUserPermission` takes only `OPT_OUT`, and
    `supportUserTTL` / `supportUserExpiresAt` are refused as not supported (422)."""

    model_config = ConfigDict(extra="forbid")

    hiddenBlueprints: list[BlueprintId] | None = Field(default=None, max_length=1000)
    federatedLogout: bool | None = None
    portalIcon: str | None = Field(default=None, max_length=2000)
    portalTitle: str | None = Field(default=None, max_length=30)
    supportUserPermission: Literal["OPT_OUT", "OPT_IN"] | None = None
    supportUserTTL: Literal["ONE_DAY", "ONE_WEEK", "ONE_MONTH", "FOREVER"] | None = None
    supportUserExpiresAt: datetime | None = None


class Announcement(BaseModel):
    """The banner a portal shows its users."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = None
    content: str | None = Field(default=None, min_length=1, max_length=300)
    link: str | None = Field(default=None, max_length=300)
    color: Literal["blue", "red"] | None = None


class ToolSelection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["IN_PROGRESS", "DONE"]


class OrganizationPut(BaseModel):
    """Replaces the name, the settings and the announcement (absent: none)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    settings: OrgSettings | None = None
    announcement: Announcement | None = None
    isOnboarded: bool | None = Field(
        default=None, description="Port's onboarding state: not supported (422)"
    )
    toolSelectionProvisioning: ToolSelection | None = Field(
        default=None, description="Port's onboarding state: not supported (422)"
    )


class OrganizationPatch(BaseModel):
    """Changes what is given: each setting given replaces that setting (`null` removes it);
    an announcement given is merged into the current one (`null` removes it). Port's
    document marks `name` required here too; Portolan lets it be left out."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=200)
    settings: OrgSettings | None = None
    announcement: Announcement | None = None
    isOnboarded: bool | None = Field(
        default=None, description="Port's onboarding state: not supported (422)"
    )
    toolSelectionProvisioning: ToolSelection | None = Field(
        default=None, description="Port's onboarding state: not supported (422)"
    )


class OrganizationOut(BaseModel):
    id: uuid.UUID
    name: str
    featureFlags: list[str] = Field(default_factory=list)
    settings: dict[str, Any] = Field(default_factory=dict)
    announcement: dict[str, Any] | None = None
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
