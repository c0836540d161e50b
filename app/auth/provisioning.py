"""Sign-in provisioning: a verified identity-provider token makes (or refreshes) its user.

Runs once per newly verified token, in its own transaction bound to the org, with the user
as the actor and `SSO` as the origin, so the audit log shows what the sign-in changed.

- The email claim (lower-cased) names the user. The first sign-in creates them: Active,
  role `Member`, provider `oidc`, names from the name claim. Later sign-ins mark them
  Active (a Disabled user stays Disabled and is refused) and refresh names and picture.
- The provider's groups decide the user's `idp_roles` and their team memberships of
  source `idp` (a mapped team that does not exist is created, provider `oidc`). Roles and
  memberships given through the API are never touched. Without a groups claim in the
  settings, or in the token, the provider grants nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app.auth.oidc import Provider
from app.db.database import Database, Tx
from app.kit.errors import Unauthorized

ORIGIN = "SSO"
PROVIDER = "oidc"
NEW_USER_ROLES = ["Member"]
_MAX_GROUPS = 1000
_MAX_EMAIL = 320
_MAX_NAME = 200


@dataclass(frozen=True, slots=True)
class SignIn:
    """What a token says about its user, read with the org's settings."""

    email: str
    first_name: str | None
    last_name: str | None
    picture: str | None
    idp_roles: list[str]
    idp_teams: list[str]


def _email(claims: Mapping[str, Any], claim: str) -> str:
    value = claims.get(claim)
    if not isinstance(value, str):
        raise Unauthorized(f"The token has no {claim!r} claim", code="invalid_token")
    email = value.strip().lower()
    local, at, domain = email.partition("@")
    if not (local and at and domain) or len(email) > _MAX_EMAIL or any(c.isspace() for c in email):
        raise Unauthorized(f"The token's {claim!r} claim is not an email", code="invalid_token")
    if claims.get("email_verified") in (False, "false"):
        raise Unauthorized(
            "The identity provider has not verified the user's email", code="invalid_token"
        )
    return email


def _text(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip()[:_MAX_NAME]


def _names(claims: Mapping[str, Any], claim: str) -> tuple[str | None, str | None]:
    """First and last name: the name claim split at its first space; else OIDC's
    given_name / family_name."""
    name = _text(claims.get(claim))
    if name is not None:
        first, _, last = name.partition(" ")
        return first, (last.strip() or None)
    return _text(claims.get("given_name")), _text(claims.get("family_name"))


def _groups(claims: Mapping[str, Any], claim: str | None) -> list[str]:
    value = claims.get(claim) if claim else None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [g for g in value[:_MAX_GROUPS] if isinstance(g, str)]
    return []


def read_claims(provider: Provider, claims: Mapping[str, Any]) -> SignIn:
    """The user a verified token names, with the roles and teams its groups map to."""
    email = _email(claims, provider.email_claim)
    first, last = _names(claims, provider.name_claim)
    picture = claims.get("picture")
    groups = _groups(claims, provider.groups_claim)
    return SignIn(
        email=email,
        first_name=first,
        last_name=last,
        picture=picture if isinstance(picture, str) and len(picture) <= 2000 else None,
        idp_roles=sorted({provider.group_roles[g] for g in groups if g in provider.group_roles}),
        idp_teams=sorted({provider.group_teams[g] for g in groups if g in provider.group_teams}),
    )


async def sign_in(db: Database, provider: Provider, claims: Mapping[str, Any]) -> SignIn:
    """Create or refresh the token's user in the provider's org (committed)."""
    seen = read_claims(provider, claims)
    async with db.tenant(provider.org_id, actor=seen.email, origin=ORIGIN) as tx:
        user_id = await _upsert_user(tx, seen)
        await _replace_idp_teams(tx, user_id, seen.idp_teams)
    return seen


_SELECT_USER = (
    "SELECT id, status, first_name, last_name, picture, idp_roles, providers FROM users "
    "WHERE org_id = $1 AND email = $2 FOR UPDATE"
)


async def _upsert_user(tx: Tx, seen: SignIn) -> uuid.UUID:
    row = await tx.fetchrow(_SELECT_USER, tx.org_id, seen.email)
    if row is None:
        created = await tx.fetchval(
            "INSERT INTO users (org_id, email, first_name, last_name, picture, status, roles, "
            "idp_roles, providers, last_login_at) "
            "VALUES ($1, $2, $3, $4, $5, 'Active', $6, $7, $8, now()) "
            "ON CONFLICT (org_id, email) DO NOTHING RETURNING id",
            tx.org_id,
            seen.email,
            seen.first_name,
            seen.last_name,
            seen.picture,
            NEW_USER_ROLES,
            seen.idp_roles,
            [PROVIDER],
        )
        if created is not None:
            return uuid.UUID(str(created))
        # Another process created the user a moment ago: refresh that row instead.
        row = await tx.fetchrow(_SELECT_USER, tx.org_id, seen.email)
        assert row is not None
    if row["status"] == "Disabled":
        raise Unauthorized("The user is not a member of the organization", code="unknown_user")
    providers = list(row["providers"])
    if PROVIDER not in providers:
        providers.append(PROVIDER)
    changed = (
        row["status"] != "Active"
        or list(row["idp_roles"]) != seen.idp_roles
        or providers != list(row["providers"])
        or (seen.first_name or row["first_name"]) != row["first_name"]
        or (seen.last_name or row["last_name"]) != row["last_name"]
        or (seen.picture or row["picture"]) != row["picture"]
    )
    await tx.execute(
        "UPDATE users SET status = 'Active', idp_roles = $3, providers = $4, "
        "first_name = coalesce($5, first_name), last_name = coalesce($6, last_name), "
        "picture = coalesce($7, picture), last_login_at = now(), "
        "updated_at = CASE WHEN $8 THEN now() ELSE updated_at END "
        "WHERE org_id = $1 AND id = $2",
        tx.org_id,
        row["id"],
        seen.idp_roles,
        providers,
        seen.first_name,
        seen.last_name,
        seen.picture,
        changed,
    )
    return uuid.UUID(str(row["id"]))


async def _replace_idp_teams(tx: Tx, user_id: uuid.UUID, teams: list[str]) -> None:
    """The user's `idp` memberships become exactly `teams` (created when missing)."""
    team_ids: list[uuid.UUID] = []
    if teams:
        await tx.execute(
            "INSERT INTO teams (org_id, name, provider) "
            "SELECT $1, t, $3 FROM unnest($2::varchar[]) AS t "
            "ON CONFLICT (org_id, name) DO NOTHING",
            tx.org_id,
            teams,
            PROVIDER,
        )
        rows = await tx.fetch(
            "SELECT id FROM teams WHERE org_id = $1 AND name = ANY($2::varchar[])",
            tx.org_id,
            teams,
        )
        team_ids = [r["id"] for r in rows]
    await tx.execute(
        "DELETE FROM team_members WHERE org_id = $1 AND user_id = $2 AND source = 'idp' "
        "AND team_id <> ALL($3::uuid[])",
        tx.org_id,
        user_id,
        team_ids,
    )
    if team_ids:
        await tx.execute(
            "INSERT INTO team_members (org_id, team_id, user_id, source) "
            "SELECT $1, t, $2, 'idp' FROM unnest($3::uuid[]) AS t "
            "ON CONFLICT DO NOTHING",
            tx.org_id,
            user_id,
            team_ids,
        )
