"""An organization's OpenID Connect identity provider: its settings, checked before they are
stored (issuer, JWKS URI through the outbound guard and fetched once, mapped roles).

Settings are the org's own: any org may save any issuer and audience, whatever other orgs
saved, and no answer depends on (or tells of) another org's settings. Several orgs may
share an issuer and audience; the verifier finds a token's org as docs/identity.md says
(the org the request names, else the one org whose settings the token verifies under).
"""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from app.auth import permissions
from app.auth.jwks import Jwk, JwksError
from app.db.database import Tx
from app.kit import outbound
from app.kit.errors import Invalid, NotFound

FetchKeys = Callable[[str], Awaitable[tuple[Jwk, ...]]]

_SELECT = (
    "SELECT org_id, issuer, audience, jwks_uri, email_claim, name_claim, groups_claim, "
    "group_teams, group_roles, updated_at FROM oidc_configs"
)
_DELETE = "DELETE FROM oidc_configs WHERE org_id = $1"
_RETURNING = (
    " RETURNING org_id, issuer, audience, jwks_uri, email_claim, name_claim, groups_claim, "
    "group_teams, group_roles, updated_at"
)


@dataclass(frozen=True, slots=True)
class Draft:
    """Settings as an Admin sends them, before they are checked."""

    issuer: str
    audience: str
    jwks_uri: str
    email_claim: str = "email"
    name_claim: str = "name"
    groups_claim: str | None = None
    group_teams: Mapping[str, str] | None = None
    group_roles: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Provider:
    """An org's stored settings. `version` (the last change) tells a verifier whether what
    it remembers about a token still holds."""

    org_id: uuid.UUID
    issuer: str
    audience: str
    jwks_uri: str
    email_claim: str
    name_claim: str
    groups_claim: str | None
    group_teams: Mapping[str, str]
    group_roles: Mapping[str, str]
    version: datetime

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Provider:
        return cls(
            org_id=row["org_id"],
            issuer=row["issuer"],
            audience=row["audience"],
            jwks_uri=row["jwks_uri"],
            email_claim=row["email_claim"],
            name_claim=row["name_claim"],
            groups_claim=row["groups_claim"],
            group_teams=dict(row["group_teams"]),
            group_roles=dict(row["group_roles"]),
            version=row["updated_at"],
        )

    def to_api(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "audience": self.audience,
            "jwksUri": self.jwks_uri,
            "emailClaim": self.email_claim,
            "nameClaim": self.name_claim,
            "groupsClaim": self.groups_claim,
            "groupTeams": dict(self.group_teams),
            "groupRoles": dict(self.group_roles),
            "updatedAt": self.version,
        }


async def get(tx: Tx) -> Provider:
    row = await tx.fetchrow(_SELECT + " WHERE org_id = $1", tx.org_id)
    if row is None:
        raise NotFound("The organization has no OpenID Connect settings")
    return Provider.from_row(row)


async def matching(tx: Tx, issuer: str, audiences: list[str], *, limit: int) -> list[Provider]:
    """The settings that name this issuer and one of these audiences, at most `limit`:
    the bound org's only when `tx` has one, else every org's (`tx` is the operator's)."""
    if tx.org_id is not None:
        rows = await tx.fetch(
            _SELECT + " WHERE org_id = $1 AND issuer = $2 AND audience = ANY($3::varchar[])",
            tx.org_id,
            issuer,
            audiences,
        )
    else:
        rows = await tx.fetch(
            _SELECT + " WHERE issuer = $1 AND audience = ANY($2::varchar[]) "
            "ORDER BY org_id LIMIT $3",
            issuer,
            audiences,
            limit,
        )
    return [Provider.from_row(row) for row in rows]


def _http_allowed(host: str, allowed: outbound.Allowed) -> bool:
    """Plain http only to a host the operator allowed by name or address (a test or an
    in-cluster provider); anywhere else a token's keys could be swapped on the way."""
    if host in allowed.hosts:
        return True
    try:
        return allowed.covers(ipaddress.ip_address(host))
    except ValueError:
        return False


def _url_problem(url: str, allowed: outbound.Allowed, *, what: str) -> str | None:
    try:
        parts = urlsplit(url)
    except ValueError:
        return f"{what} is not a URL"
    host = (parts.hostname or "").lower().rstrip(".")
    if parts.scheme not in ("https", "http") or not host:
        return f"{what} must be an https URL"
    if parts.scheme == "http" and not _http_allowed(host, allowed):
        return f"{what} must be an https URL (http only for hosts in PORTOLAN_OUTBOUND_ALLOW)"
    if parts.username or parts.password:
        return f"{what} must not carry credentials"
    return None


async def _check(
    tx: Tx, draft: Draft, *, allowed: outbound.Allowed, own_issuer: str
) -> list[dict[str, str]]:
    problems: list[dict[str, str]] = []
    problem = _url_problem(draft.issuer, allowed, what="issuer")
    if problem is None:
        parts = urlsplit(draft.issuer)  # parsed once already
        if parts.query or parts.fragment:
            problem = "issuer must not have a query or fragment"
        elif draft.issuer == own_issuer:
            problem = "issuer is the name of Portolan's own tokens"
    if problem is not None:
        problems.append({"pointer": "/issuer", "message": problem})
    problem = _url_problem(draft.jwks_uri, allowed, what="jwksUri")
    if problem is not None:
        problems.append({"pointer": "/jwksUri", "message": problem})
    if (draft.group_teams or draft.group_roles) and not draft.groups_claim:
        problems.append(
            {
                "pointer": "/groupsClaim",
                "message": "groupTeams and groupRoles map the groups of groupsClaim: name it",
            }
        )
    if draft.group_roles:
        known = await permissions.known_roles(tx)
        for group, role in draft.group_roles.items():
            if role not in known:
                problems.append(
                    {
                        "pointer": f"/groupRoles/{group.replace('~', '~0').replace('/', '~1')}",
                        "message": f"{role!r} is not Admin, Member or <blueprint>-moderator "
                        "of a blueprint",
                    }
                )
    return problems


async def put(
    tx: Tx,
    draft: Draft,
    *,
    allowed: outbound.Allowed,
    own_issuer: str,
    fetch_keys: FetchKeys,
) -> tuple[Provider | None, Provider]:
    """Check and store the org's settings; the previous settings (None) and the new ones.
    The JWKS URI must pass the outbound guard and answer a key set now."""
    problems = await _check(tx, draft, allowed=allowed, own_issuer=own_issuer)
    if problems:
        raise Invalid(problems[0]["message"], details=problems)
    try:
        await fetch_keys(draft.jwks_uri)
    except outbound.Refused as exc:
        raise Invalid(
            f"jwksUri is refused: {exc}", details=[{"pointer": "/jwksUri", "message": str(exc)}]
        ) from exc
    except JwksError as exc:
        raise Invalid(
            f"jwksUri did not yield a JSON Web Key Set: {exc}",
            details=[{"pointer": "/jwksUri", "message": str(exc)}],
        ) from exc
    before = await tx.fetchrow(_SELECT + " WHERE org_id = $1 FOR UPDATE", tx.org_id)
    row = await tx.fetchrow(
        "INSERT INTO oidc_configs (org_id, issuer, audience, jwks_uri, email_claim, "
        "name_claim, groups_claim, group_teams, group_roles) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) "
        "ON CONFLICT (org_id) DO UPDATE SET issuer = EXCLUDED.issuer, "
        "audience = EXCLUDED.audience, jwks_uri = EXCLUDED.jwks_uri, "
        "email_claim = EXCLUDED.email_claim, name_claim = EXCLUDED.name_claim, "
        "groups_claim = EXCLUDED.groups_claim, group_teams = EXCLUDED.group_teams, "
        "group_roles = EXCLUDED.group_roles, updated_at = clock_timestamp()" + _RETURNING,
        tx.org_id,
        draft.issuer,
        draft.audience,
        draft.jwks_uri,
        draft.email_claim,
        draft.name_claim,
        draft.groups_claim,
        dict(draft.group_teams or {}),
        dict(draft.group_roles or {}),
    )
    assert row is not None
    return (Provider.from_row(before) if before is not None else None), Provider.from_row(row)


async def delete(tx: Tx) -> Provider:
    row = await tx.fetchrow(_DELETE + _RETURNING, tx.org_id)
    if row is None:
        raise NotFound("The organization has no OpenID Connect settings")
    return Provider.from_row(row)
