"""`/v1/users` and `/v1/teams` (Port's routes). Everyone in the org reads; Admins manage."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path, Query

from app.auth import permissions
from app.auth.principal import CurrentTenant
from app.db.routing import api_router
from app.kit.openapi import ERRORS_AUTHED, OkResponse, conflict
from app.kit.responses import json_response
from app.people import service
from app.people.schemas import (
    EMAIL_MAX,
    TEAM_NAME_MAX,
    InviteBody,
    TeamBody,
    TeamField,
    TeamListResponse,
    TeamPatchBody,
    TeamResponse,
    UserField,
    UserListResponse,
    UserPatchBody,
    UserResponse,
    UserUpdatedResponse,
)

users_router = api_router(prefix="/v1/users", tags=["Users"])
teams_router = api_router(prefix="/v1/teams", tags=["Teams"])

UserEmail = Annotated[
    str, Path(min_length=1, max_length=EMAIL_MAX, description="The user's email address")
]
TeamNameParam = Annotated[
    str, Path(min_length=1, max_length=TEAM_NAME_MAX, description="The team's name")
]
_SELF = conflict("The caller would remove their own Admin role or delete themselves")


# ------------------------------------------------------------------------------------------
# Users


@users_router.get(
    "", response_model=UserListResponse, responses=ERRORS_AUTHED, summary="List users"
)
async def list_users(
    tenant: CurrentTenant,
    fields: Annotated[
        list[UserField] | None,
        Query(
            description="Only these fields of each user (fields Portolan has no value for "
            "are left out)"
        ),
    ] = None,
) -> Any:
    permissions.require(tenant.principal, "users.read")
    return json_response({"ok": True, "users": await service.list_users(tenant.tx, fields)})


@users_router.post(
    "/invite",
    response_model=UserResponse,
    responses={**ERRORS_AUTHED, **conflict("A user with this email exists")},
    summary="Invite a user",
)
async def invite_user(
    body: InviteBody,
    tenant: CurrentTenant,
    notify: Annotated[
        bool, Query(description="Accepted for Port's clients; Portolan sends no email")
    ] = True,
) -> Any:
    """Adds the user with status `Invited`, the roles given (Member when none) and the teams
    named (which must exist). No invitation email is sent: the user signs in through the
    organization's identity provider."""
    permissions.require(tenant.principal, "users.manage")
    invitee = body.invitee
    user = await service.invite(tenant.tx, invitee.email, invitee.roles, invitee.teams)
    return json_response({"ok": True, "user": user})


@users_router.get(
    "/{user_email}", response_model=UserResponse, responses=ERRORS_AUTHED, summary="Get a user"
)
async def get_user(user_email: UserEmail, tenant: CurrentTenant) -> Any:
    permissions.require(tenant.principal, "users.read")
    return json_response({"ok": True, "user": await service.get_user(tenant.tx, user_email)})


@users_router.patch(
    "/{user_email}",
    response_model=UserUpdatedResponse,
    responses={**ERRORS_AUTHED, **_SELF},
    summary="Change a user's roles or teams",
)
async def update_user(user_email: UserEmail, body: UserPatchBody, tenant: CurrentTenant) -> Any:
    """`roles` replaces the roles given through the API, `teams` the team memberships given
    through the API; what the identity provider gives at sign-in stays. Roles must exist
    (Admin, Member, `<blueprint>-moderator`) and so must the teams. A caller cannot remove
    their own Admin role. Answers with the user's fields beside `ok`, as Port does."""
    permissions.require(tenant.principal, "users.manage")
    user = await service.update_user(
        tenant.tx, tenant.principal, user_email, body.roles, body.teams
    )
    return json_response({"ok": True, **user})


@users_router.delete(
    "/{user_email}",
    response_model=OkResponse,
    responses={**ERRORS_AUTHED, **_SELF},
    summary="Delete a user",
)
async def delete_user(user_email: UserEmail, tenant: CurrentTenant) -> Any:
    """Removes the user and their memberships. A caller cannot delete themselves."""
    permissions.require(tenant.principal, "users.manage")
    await service.delete_user(tenant.tx, tenant.principal, user_email)
    return {"ok": True}


# ------------------------------------------------------------------------------------------
# Teams

TeamFields = Annotated[list[TeamField] | None, Query(description="Only these fields of each team")]
_NAME_TAKEN = conflict("A team with this name exists")


@teams_router.get(
    "", response_model=TeamListResponse, responses=ERRORS_AUTHED, summary="List teams"
)
async def list_teams(tenant: CurrentTenant, fields: TeamFields = None) -> Any:
    permissions.require(tenant.principal, "teams.read")
    return json_response({"ok": True, "teams": await service.list_teams(tenant.tx, fields)})


@teams_router.post(
    "",
    response_model=TeamResponse,
    responses={**ERRORS_AUTHED, **_NAME_TAKEN},
    summary="Create a team",
)
async def create_team(body: TeamBody, tenant: CurrentTenant) -> Any:
    """`users` are emails of users of the organization."""
    permissions.require(tenant.principal, "teams.manage")
    team = await service.create_team(tenant.tx, body.name, body.users, body.description)
    return json_response({"ok": True, "team": team})


@teams_router.get(
    "/{name}", response_model=TeamResponse, responses=ERRORS_AUTHED, summary="Get a team"
)
async def get_team(name: TeamNameParam, tenant: CurrentTenant, fields: TeamFields = None) -> Any:
    permissions.require(tenant.principal, "teams.read")
    return json_response({"ok": True, "team": await service.get_team(tenant.tx, name, fields)})


@teams_router.patch(
    "/{name}",
    response_model=TeamResponse,
    responses={**ERRORS_AUTHED, **_NAME_TAKEN},
    summary="Change a team's name, members or description",
)
async def patch_team(name: TeamNameParam, body: TeamPatchBody, tenant: CurrentTenant) -> Any:
    """Only the keys given change. `users` replaces the members given through the API (the
    identity provider's stay). A new `name` is carried into the `team` of every entity."""
    permissions.require(tenant.principal, "teams.manage")
    changes = body.model_dump(exclude_unset=True)
    team = await service.update_team(tenant.tx, name, changes, replace=False)
    return json_response({"ok": True, "team": team})


@teams_router.put(
    "/{name}",
    response_model=TeamResponse,
    responses={**ERRORS_AUTHED, **_NAME_TAKEN},
    summary="Replace a team",
)
async def replace_team(name: TeamNameParam, body: TeamBody, tenant: CurrentTenant) -> Any:
    """The whole team: a missing `users` leaves no members given through the API, a missing
    `description` none."""
    permissions.require(tenant.principal, "teams.manage")
    changes = body.model_dump(exclude_unset=True)
    team = await service.update_team(tenant.tx, name, changes, replace=True)
    return json_response({"ok": True, "team": team})


@teams_router.delete(
    "/{name}", response_model=OkResponse, responses=ERRORS_AUTHED, summary="Delete a team"
)
async def delete_team(name: TeamNameParam, tenant: CurrentTenant) -> Any:
    """Removes the team, its memberships, and its name from entities' `team`."""
    permissions.require(tenant.principal, "teams.manage")
    await service.delete_team(tenant.tx, name)
    return {"ok": True}
