"""HTTP shapes of the users and teams routes (Port's)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

# Port's rule for team names, also refusing control characters; at least two characters.
TEAM_NAME_PATTERN = r"^[^;#/?\s\x00-\x1f\x7f][^;#/?\x00-\x1f\x7f]*[^;#/?\s\x00-\x1f\x7f]$"
TEAM_NAME_MAX = 200
# One `@` between a local part and a domain, no spaces, none of Port's reserved characters.
EMAIL_PATTERN = r"^[^@;#/?\s\x00-\x1f\x7f]+@[^@;#/?\s\x00-\x1f\x7f]+$"
EMAIL_MAX = 320

TeamName = Annotated[str, Field(min_length=2, max_length=TEAM_NAME_MAX, pattern=TEAM_NAME_PATTERN)]
Email = Annotated[str, Field(min_length=3, max_length=EMAIL_MAX, pattern=EMAIL_PATTERN)]
RoleName = Annotated[str, Field(min_length=1, max_length=120)]

UserField = Literal[
    "id",
    "email",
    "firstName",
    "isInvisible",
    "lastName",
    "picture",
    "status",
    "supportLevel",
    "type",
    "providers",
    "createdAt",
    "updatedAt",
    "teams.name",
    "teams.provider",
    "teams.createdAt",
    "teams.updatedAt",
    "roles.name",
    "roles.description",
    "roles.isAdmin",
    "roles.protected",
    "roles.createdAt",
    "roles.updatedAt",
    "orgMembers.orgId",
    "orgMembers.status",
    "orgMembers.lastLoginAt",
]
TeamField = Literal[
    "id",
    "name",
    "createdAt",
    "updatedAt",
    "provider",
    "description",
    "users.firstName",
    "users.lastName",
    "users.email",
    "users.picture",
    "users.status",
]


# ------------------------------------------------------------------------------------------
# Requests


class Invitee(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: Email = Field(description="Stored lower-cased")
    roles: list[RoleName] | None = Field(
        default=None,
        max_length=50,
        description="Admin, Member or <blueprint>-moderator; Member when none are given",
    )
    teams: list[TeamName] | None = Field(
        default=None, max_length=1000, description="Names of existing teams"
    )


class InviteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    invitee: Invitee


class UserPatchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    roles: list[RoleName] | None = Field(
        default=None,
        min_length=1,
        max_length=50,
        description="Replaces the roles given through the API (not the identity provider's)",
    )
    teams: list[TeamName] | None = Field(
        default=None,
        max_length=1000,
        description="Replaces the memberships given through the API (not the identity provider's)",
    )


class TeamBody(BaseModel):
    """POST and PUT: the whole team."""

    model_config = ConfigDict(extra="forbid")

    name: TeamName
    users: list[Email] | None = Field(
        default=None,
        max_length=1000,
        description="Emails of existing users; replaces the members given through the API",
    )
    description: str | None = Field(default=None, max_length=2000)


class TeamPatchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: TeamName | None = Field(
        default=None, description="A new name (carried into entities' team lists)"
    )
    users: list[Email] | None = Field(
        default=None,
        max_length=1000,
        description="Emails of existing users; replaces the members given through the API",
    )
    description: str | None = Field(default=None, max_length=2000)


# ------------------------------------------------------------------------------------------
# Responses (every field optional: `fields` may select a subset)


class Role(BaseModel):
    name: str


class User(BaseModel):
    email: str | None = None
    firstName: str | None = None
    lastName: str | None = None
    picture: str | None = None
    status: Literal["Invited", "Active", "Disabled"] | None = None
    id: str | None = None
    type: Literal["standard"] | None = None
    providers: list[str] | None = None
    createdAt: datetime | None = None
    updatedAt: datetime | None = None
    teams: list[str] | None = Field(
        default=None, description="Names of the teams the user is a member of (any source)"
    )
    roles: list[Role] | None = Field(
        default=None, description="Roles given through the API and by the identity provider"
    )


class UserListResponse(BaseModel):
    ok: Literal[True] = True
    users: list[User]


class UserResponse(BaseModel):
    ok: Literal[True] = True
    user: User


class UserUpdatedResponse(User):
    """Port answers a user's update with the user's fields beside `ok`."""

    ok: Literal[True] = True


class TeamMember(BaseModel):
    email: str | None = None
    firstName: str | None = None
    lastName: str | None = None
    picture: str | None = None
    status: str | None = None


class Team(BaseModel):
    id: str | None = None
    name: str | None = None
    createdAt: datetime | None = None
    updatedAt: datetime | None = None
    provider: str | None = None
    description: str | None = None
    users: list[TeamMember] | None = None


class TeamListResponse(BaseModel):
    ok: Literal[True] = True
    teams: list[Team]


class TeamResponse(BaseModel):
    ok: Literal[True] = True
    team: Team
