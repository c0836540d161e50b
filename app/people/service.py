"""Users and teams of an organization, in Port's shapes.

Two sources feed roles and memberships: the API (`users.roles`, `team_members.source =
'api'`) and the identity provider at sign-in (`users.idp_roles`, `source = 'idp'`). A user
holds both; the API reads both and replaces only its own, so the next sign-in never has
to undo an Admin's edit nor the other way round.

Inviting a user records them as `Invited`; no email is sent. A team's name is also what
entities keep in their `team` lists: renaming a team renames it there, deleting it removes
it there, and the scorecards of the org are then evaluated again by the worker (a rule may
read `$team`).
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from typing import Any

import asyncpg

from app.auth import permissions
from app.auth.principal import Principal
from app.db.database import Tx
from app.kit.errors import Conflict, Invalid, NotFound

_USER_SELECT = (
    "SELECT u.id, u.email, u.first_name, u.last_name, u.picture, u.status, u.roles, "
    "u.idp_roles, u.providers, u.created_at, u.updated_at, ARRAY("
    " SELECT DISTINCT t.name FROM team_members m JOIN teams t"
    " ON t.org_id = m.org_id AND t.id = m.team_id"
    " WHERE m.org_id = u.org_id AND m.user_id = u.id ORDER BY t.name) AS teams "
    "FROM users u WHERE u.org_id = $1"
)
_TEAM_SELECT = (
    "SELECT id, name, description, provider, created_at, updated_at FROM teams WHERE org_id = $1"
)
# Each member once, whichever source (or both) made them one.
_MEMBERS = (
    "SELECT DISTINCT m.team_id, u.email, u.first_name, u.last_name, u.picture, u.status "
    "FROM team_members m JOIN users u ON u.org_id = m.org_id AND u.id = m.user_id "
    "WHERE m.org_id = $1 AND m.team_id = ANY($2::uuid[]) ORDER BY m.team_id, u.email"
)


def _reachable(key: str) -> bool:
    """PostgreSQL text holds no NUL: such a name or email names nothing."""
    return "\x00" not in key


def _present(out: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        out[key] = value


def project(doc: dict[str, Any], fields: Collection[str] | None) -> dict[str, Any]:
    """Port's `fields`: keep the keys named; `a.b` keeps `a`, and in a list of objects under
    `a` only the keys named after the dot."""
    if not fields:
        return doc
    wanted: dict[str, set[str]] = {}
    for name in fields:
        head, _, sub = name.partition(".")
        subs = wanted.setdefault(head, set())
        if sub:
            subs.add(sub)
    out: dict[str, Any] = {}
    for key, subs in wanted.items():
        if key not in doc:
            continue
        value = doc[key]
        if subs and isinstance(value, list) and all(isinstance(v, dict) for v in value):
            value = [{k: v for k, v in item.items() if k in subs} for item in value]
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------
# Users


def _user(row: asyncpg.Record) -> dict[str, Any]:
    out: dict[str, Any] = {"email": row["email"]}
    _present(out, "firstName", row["first_name"])
    _present(out, "lastName", row["last_name"])
    _present(out, "picture", row["picture"])
    out.update(
        {
            "status": row["status"],
            "id": str(row["id"]),
            "type": "standard",
            "providers": list(row["providers"]),
            "createdAt": row["created_at"],
            "updatedAt": row["updated_at"],
            "teams": list(row["teams"]),
            "roles": [{"name": r} for r in dict.fromkeys([*row["roles"], *row["idp_roles"]])],
        }
    )
    return out


def _user_project(doc: dict[str, Any], fields: Collection[str] | None) -> dict[str, Any]:
    # A user's teams are names and its roles carry only a name: `teams.x` / `roles.x` keep
    # them whole (a role without its name would be no role).
    if not fields:
        return doc
    return project(doc, {f.partition(".")[0] for f in fields})


async def list_users(tx: Tx, fields: Collection[str] | None = None) -> list[dict[str, Any]]:
    rows = await tx.fetch(_USER_SELECT + " ORDER BY u.email", tx.org_id)
    return [_user_project(_user(r), fields) for r in rows]


async def get_user(tx: Tx, email: str) -> dict[str, Any]:
    email = email.lower()
    row = (
        await tx.fetchrow(_USER_SELECT + " AND u.email = $2", tx.org_id, email)
        if _reachable(email)
        else None
    )
    if row is None:
        raise NotFound(f"User {email!r} was not found", code="user_not_found")
    return _user(row)


async def _check_roles(tx: Tx, roles: Sequence[str], pointer: str) -> list[str]:
    await permissions.check_roles(tx, roles, pointer)
    return list(dict.fromkeys(roles))


# Teams by name, users by (lower-cased) email: the ids of those named, or Invalid naming
# every one that does not exist.
_LOOKUPS = {
    "team": "SELECT name AS key, id FROM teams WHERE org_id = $1 AND name = ANY($2::varchar[])",
    "user": "SELECT email AS key, id FROM users WHERE org_id = $1 AND email = ANY($2::varchar[])",
}


async def _ids(tx: Tx, kind: str, keys: Sequence[str], pointer: str) -> list[uuid.UUID]:
    keys = list(dict.fromkeys(keys))
    rows = await tx.fetch(_LOOKUPS[kind], tx.org_id, keys)
    found = {r["key"]: r["id"] for r in rows}
    missing = [k for k in keys if k not in found]
    if missing:
        raise Invalid(
            f"Unknown {kind}(s): {', '.join(repr(k) for k in missing)}",
            details=[{"pointer": pointer, "message": f"no {kind} {k!r}"} for k in missing],
        )
    return [found[k] for k in keys]


async def _team_ids(tx: Tx, names: Sequence[str], pointer: str) -> list[uuid.UUID]:
    return await _ids(tx, "team", names, pointer)


async def _user_ids(tx: Tx, emails: Sequence[str], pointer: str) -> list[uuid.UUID]:
    return await _ids(tx, "user", [e.lower() for e in emails], pointer)


async def _set_user_teams(tx: Tx, user_id: uuid.UUID, team_ids: list[uuid.UUID]) -> bool:
    """Make the user's API memberships exactly `team_ids` (the identity provider's stay).
    Only the differences are written, so the audit log records only real changes."""
    removed = await tx.execute(
        "DELETE FROM team_members WHERE org_id = $1 AND user_id = $2 AND source = 'api' "
        "AND NOT (team_id = ANY($3::uuid[]))",
        tx.org_id,
        user_id,
        team_ids,
    )
    added = await tx.execute(
        "INSERT INTO team_members (org_id, team_id, user_id, source) "
        "SELECT $1, t, $2, 'api' FROM unnest($3::uuid[]) AS t ON CONFLICT DO NOTHING",
        tx.org_id,
        user_id,
        team_ids,
    )
    return removed != "DELETE 0" or added != "INSERT 0 0"


async def invite(
    tx: Tx, email: str, roles: Sequence[str] | None, teams: Sequence[str] | None
) -> dict[str, Any]:
    """A new user, `Invited`, with the roles given (Member when none) and the teams."""
    email = email.lower()
    given = await _check_roles(tx, roles or [permissions.MEMBER], "/invitee/roles")
    team_ids = await _team_ids(tx, teams or [], "/invitee/teams")
    user_id = await tx.fetchval(
        "INSERT INTO users (org_id, email, status, roles) VALUES ($1, $2, 'Invited', $3) "
        "ON CONFLICT DO NOTHING RETURNING id",
        tx.org_id,
        email,
        given,
    )
    if user_id is None:
        raise Conflict(f"User {email!r} is already in the organization", code="user_exists")
    await _set_user_teams(tx, user_id, team_ids)
    return await get_user(tx, email)


def _is_self(principal: Principal, email: str) -> bool:
    return principal.email is not None and principal.email.lower() == email


async def _locked_user(tx: Tx, email: str) -> asyncpg.Record:
    row = (
        await tx.fetchrow(
            "SELECT id, roles, idp_roles FROM users WHERE org_id = $1 AND email = $2 FOR UPDATE",
            tx.org_id,
            email,
        )
        if _reachable(email)
        else None
    )
    if row is None:
        raise NotFound(f"User {email!r} was not found", code="user_not_found")
    return row


async def update_user(
    tx: Tx,
    principal: Principal,
    email: str,
    roles: Sequence[str] | None,
    teams: Sequence[str] | None,
) -> dict[str, Any]:
    """Replace the user's API roles and / or API team memberships. A caller cannot take
    their own Admin role away (they would lock themselves out)."""
    email = email.lower()
    row = await _locked_user(tx, email)
    changed = False
    if roles is not None:
        given = await _check_roles(tx, roles, "/roles")
        idp = list(row["idp_roles"])
        was_admin = permissions.ADMIN in [*row["roles"], *idp]
        if _is_self(principal, email) and was_admin and permissions.ADMIN not in [*given, *idp]:
            raise Conflict("You cannot remove your own Admin role", code="self_lockout")
        if given != list(row["roles"]):
            await tx.execute(
                "UPDATE users SET roles = $3 WHERE org_id = $1 AND id = $2",
                tx.org_id,
                row["id"],
                given,
            )
            changed = True
    if teams is not None:
        team_ids = await _team_ids(tx, teams, "/teams")
        changed = await _set_user_teams(tx, row["id"], team_ids) or changed
    if changed:
        await tx.execute(
            "UPDATE users SET updated_at = now() WHERE org_id = $1 AND id = $2",
            tx.org_id,
            row["id"],
        )
    return await get_user(tx, email)


async def delete_user(tx: Tx, principal: Principal, email: str) -> None:
    email = email.lower()
    if _is_self(principal, email):
        raise Conflict("You cannot delete yourself", code="self_lockout")
    row = await _locked_user(tx, email)
    await tx.execute("DELETE FROM users WHERE org_id = $1 AND id = $2", tx.org_id, row["id"])


# ------------------------------------------------------------------------------------------
# Teams


def _team(row: asyncpg.Record) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": str(row["id"]),
        "name": row["name"],
        "createdAt": row["created_at"],
        "updatedAt": row["updated_at"],
        "provider": row["provider"],
    }
    _present(out, "description", row["description"])
    return out


def _member(row: asyncpg.Record) -> dict[str, Any]:
    out: dict[str, Any] = {"email": row["email"]}
    _present(out, "firstName", row["first_name"])
    _present(out, "lastName", row["last_name"])
    _present(out, "picture", row["picture"])
    out["status"] = row["status"]
    return out


async def _teams(
    tx: Tx, rows: Sequence[asyncpg.Record], fields: Collection[str] | None
) -> list[dict[str, Any]]:
    teams = [_team(r) for r in rows]
    if not fields or any(f.startswith("users") for f in fields):
        members: dict[uuid.UUID, list[dict[str, Any]]] = {r["id"]: [] for r in rows}
        for m in await tx.fetch(_MEMBERS, tx.org_id, list(members)):
            members[m["team_id"]].append(_member(m))
        for team, row in zip(teams, rows, strict=True):
            team["users"] = members[row["id"]]
    return [project(t, fields) for t in teams]


async def list_teams(tx: Tx, fields: Collection[str] | None = None) -> list[dict[str, Any]]:
    rows = await tx.fetch(_TEAM_SELECT + " ORDER BY name", tx.org_id)
    return await _teams(tx, rows, fields)


async def _team_row(tx: Tx, name: str, *, lock: bool = False) -> asyncpg.Record:
    row = (
        await tx.fetchrow(
            _TEAM_SELECT + " AND name = $2" + (" FOR UPDATE" if lock else ""), tx.org_id, name
        )
        if _reachable(name)
        else None
    )
    if row is None:
        raise NotFound(f"Team {name!r} was not found", code="team_not_found")
    return row


async def get_team(tx: Tx, name: str, fields: Collection[str] | None = None) -> dict[str, Any]:
    return (await _teams(tx, [await _team_row(tx, name)], fields))[0]


async def _set_team_members(tx: Tx, team_id: uuid.UUID, user_ids: list[uuid.UUID]) -> bool:
    """Make the team's API members exactly `user_ids` (the identity provider's stay)."""
    removed = await tx.execute(
        "DELETE FROM team_members WHERE org_id = $1 AND team_id = $2 AND source = 'api' "
        "AND NOT (user_id = ANY($3::uuid[]))",
        tx.org_id,
        team_id,
        user_ids,
    )
    added = await tx.execute(
        "INSERT INTO team_members (org_id, team_id, user_id, source) "
        "SELECT $1, $2, u, 'api' FROM unnest($3::uuid[]) AS u ON CONFLICT DO NOTHING",
        tx.org_id,
        team_id,
        user_ids,
    )
    return removed != "DELETE 0" or added != "INSERT 0 0"


def _name_taken(name: str) -> Conflict:
    return Conflict(f"A team named {name!r} already exists", code="team_exists")


async def create_team(
    tx: Tx, name: str, users: Sequence[str] | None, description: str | None
) -> dict[str, Any]:
    user_ids = await _user_ids(tx, users or [], "/users")
    team_id = await tx.fetchval(
        "INSERT INTO teams (org_id, name, description) VALUES ($1, $2, $3) "
        "ON CONFLICT DO NOTHING RETURNING id",
        tx.org_id,
        name,
        description,
    )
    if team_id is None:
        raise _name_taken(name)
    await _set_team_members(tx, team_id, user_ids)
    return await get_team(tx, name)


# Entities keep their teams as a sorted set of names (app.catalog.entities): code-point
# order, which is the "C" collation's.
_RENAME_IN_ENTITIES = (
    "WITH changed AS (UPDATE entities SET team = ARRAY("
    ' SELECT DISTINCT t COLLATE "C" FROM unnest(array_replace(team, $2::text, $3::text))'
    " AS t ORDER BY 1)"
    " WHERE org_id = $1 AND $2::text = ANY(team) RETURNING 1) SELECT count(*) FROM changed"
)
_REMOVE_FROM_ENTITIES = (
    "WITH changed AS (UPDATE entities SET team = array_remove(team, $2::text)"
    " WHERE org_id = $1 AND $2::text = ANY(team) RETURNING 1) SELECT count(*) FROM changed"
)


async def _entities_changed(tx: Tx, count: int) -> None:
    """Entities' teams changed: a scorecard rule may read `$team`, so the worker evaluates
    the org's scorecards again."""
    if count:
        await tx.execute(
            "UPDATE scorecards SET refresh_requested = true "
            "WHERE org_id = $1 AND NOT refresh_requested",
            tx.org_id,
        )


async def update_team(
    tx: Tx, name: str, changes: dict[str, Any], *, replace: bool
) -> dict[str, Any]:
    """PATCH (`replace=False`: the keys given) or PUT (`replace=True`: the whole team; a
    missing `users` means no API members, a missing `description` none)."""
    row = await _team_row(tx, name, lock=True)
    if replace:
        changes = {"description": None, **changes, "users": changes.get("users") or []}
    new_name = changes.get("name") or row["name"]
    description = changes["description"] if "description" in changes else row["description"]
    user_ids = (
        await _user_ids(tx, changes["users"], "/users")
        if changes.get("users") is not None
        else None
    )
    if new_name != row["name"]:
        taken = await tx.fetchval(
            "SELECT 1 FROM teams WHERE org_id = $1 AND name = $2", tx.org_id, new_name
        )
        if taken:
            raise _name_taken(new_name)
    changed = False
    if new_name != row["name"] or description != row["description"]:
        await tx.execute(
            "UPDATE teams SET name = $3, description = $4 WHERE org_id = $1 AND id = $2",
            tx.org_id,
            row["id"],
            new_name,
            description,
        )
        changed = True
    if new_name != row["name"]:
        await _entities_changed(
            tx, await tx.fetchval(_RENAME_IN_ENTITIES, tx.org_id, row["name"], new_name)
        )
        await permissions.rename_team(tx, row["name"], new_name)
    if user_ids is not None:
        changed = await _set_team_members(tx, row["id"], user_ids) or changed
    if changed:
        await tx.execute(
            "UPDATE teams SET updated_at = now() WHERE org_id = $1 AND id = $2",
            tx.org_id,
            row["id"],
        )
    return await get_team(tx, new_name)


async def delete_team(tx: Tx, name: str) -> None:
    """Delete the team (its memberships go with it) and take it out of entities' teams."""
    row = await _team_row(tx, name, lock=True)
    await tx.execute("DELETE FROM teams WHERE org_id = $1 AND id = $2", tx.org_id, row["id"])
    await _entities_changed(tx, await tx.fetchval(_REMOVE_FROM_ENTITIES, tx.org_id, row["name"]))
    await permissions.rename_team(tx, row["name"], None)
