"""The one place that decides who may do what. Every router asks it; none decides itself.

Three kinds of decision:

- **Org-level** operations (`require`): a table maps each operation to who holds it:
  everyone in the org, Admins, or Admins and the moderators of the blueprint concerned.
- **Entity writes** (`EntityGuard`): a blueprint's permission document (`entities.register /
  update / unregister`, per-property `updateProperties`, per-relation `updateRelations`),
  each a block of `users, roles, teams, ownedByTeam`. Absent blocks take Port's defaults:
  Admins and the blueprint's moderators.
- **Actions** (`action_block_allows`): an action's `execute` and `approve` blocks.

Admins pass every check. A refusal is a 403 naming the permission that was missing.
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from app.kit.errors import Forbidden, Invalid

if TYPE_CHECKING:
    from app.auth.principal import Principal
    from app.db.database import Tx

ADMIN = "Admin"
MEMBER = "Member"
MODERATOR_SUFFIX = "-moderator"


def moderator(blueprint: str) -> str:
    """The role with full control of one blueprint's entities."""
    return f"{blueprint}{MODERATOR_SUFFIX}"


class Denied(Forbidden):
    code = "missing_permission"

    def __init__(self, permission: str, resource: str | None = None, hint: str = "") -> None:
        where = f" on {resource}" if resource else ""
        super().__init__(
            f"Missing permission {permission!r}{where}{hint}",
            details={"permission": permission, "resource": resource},
        )
        self.permission = permission


# ------------------------------------------------------------------------------------------
# Org-level operations

Holder = Literal["everyone", "admin", "moderator"]

OPERATIONS: dict[str, Holder] = {
    "organization.read": "everyone",
    "organization.update": "admin",
    "organization.signingSecret": "admin",
    "oidc.read": "admin",
    "oidc.update": "admin",
    "apps.manage": "admin",
    "audit.read": "admin",
    "users.read": "everyone",
    "users.manage": "admin",
    "users.rotateCredentials": "admin",
    "teams.read": "everyone",
    "teams.manage": "admin",
    "secrets.read": "admin",
    "secrets.manage": "admin",
    "webhooks.read": "admin",
    "webhooks.metadata": "everyone",  # identifier, title, icon, updatedAt: no settings
    "webhooks.manage": "admin",
    "integrations.read": "admin",
    "integrations.metadata": "everyone",  # identifier, type, updatedAt: no config
    "integrations.manage": "admin",
    "blueprints.read": "everyone",
    "blueprints.create": "admin",
    "blueprints.update": "moderator",
    "blueprints.delete": "admin",
    "blueprints.permissions.read": "everyone",
    "blueprints.permissions.update": "moderator",
    "entities.read": "everyone",
    "entities.unregisterAll": "moderator",
    "scorecards.read": "everyone",
    "scorecards.manage": "moderator",
    "actions.read": "everyone",
    "actions.manage": "moderator",
    "actions.permissions.read": "everyone",
    "actions.permissions.update": "moderator",
    "runs.readAll": "admin",
    "runs.report": "admin",
    "runs.runAs": "admin",  # start a run in another user's name (`run_as`)
    "workflows.read": "everyone",
    "workflows.manage": "admin",
    "workflowRuns.readAll": "admin",
    "pages.read": "everyone",  # each page by its own read permissions (require_page)
    "pages.create": "admin",
    "pages.delete": "admin",
    "pages.permissions.update": "admin",
}


def allows(principal: Principal, operation: str, *, blueprint: str | None = None) -> bool:
    holder = OPERATIONS[operation]
    if principal.is_admin or holder == "everyone":
        return True
    if holder == "moderator" and blueprint is not None:
        return moderator(blueprint) in principal.roles
    return False


def require(principal: Principal, operation: str, *, blueprint: str | None = None) -> None:
    """Raise Denied unless the principal may perform the org-level `operation` (on
    `blueprint`, for the operations its moderators hold)."""
    if not allows(principal, operation, blueprint=blueprint):
        holder = OPERATIONS[operation]
        hint = (
            " (held by Admins)"
            if holder == "admin" or blueprint is None
            else f" (held by Admins and the {moderator(blueprint)} role)"
        )
        raise Denied(operation, f"blueprint {blueprint!r}" if blueprint else None, hint)


def require_self_or(principal: Principal, operation: str, email: str) -> None:
    """A user may do `operation` to themself; on anyone else it takes its holders."""
    if principal.kind == "user" and (principal.email or "").lower() == email.lower():
        return
    if not allows(principal, operation):
        raise Denied(operation, f"user {email!r}", " (held by Admins; a user holds it on themself)")


def granted_operations(principal: Principal, moderated: Iterable[str]) -> dict[str, Any]:
    """What `GET /v1/auth/me` reports: org-wide operations held, and per moderated blueprint
    the operations held there."""
    org = sorted(op for op in OPERATIONS if allows(principal, op))
    per_bp = {
        bp: sorted(
            op
            for op, holder in OPERATIONS.items()
            if holder == "moderator" and op not in org and allows(principal, op, blueprint=bp)
        )
        for bp in moderated
    }
    return {"operations": org, "blueprints": {bp: ops for bp, ops in per_bp.items() if ops}}


# ------------------------------------------------------------------------------------------
# Blocks: {users, roles, teams, ownedByTeam}


@dataclass(frozen=True, slots=True)
class Block:
    users: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    teams: tuple[str, ...] = ()
    owned_by_team: bool = False

    def to_api(self, *, ownership: bool = True) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "users": list(self.users),
            "roles": list(self.roles),
            "teams": list(self.teams),
        }
        if ownership:
            doc["ownedByTeam"] = self.owned_by_team
        return doc

    def grants(self, principal: Principal) -> bool:
        """Granted whatever the entity (role, user or team listed). Roles rank Admin >
        moderator > Member: a block open to Members is open to moderators too."""
        if principal.is_admin or any(role in self.roles for role in principal.roles):
            return True
        if MEMBER in self.roles and any(r.endswith(MODERATOR_SUFFIX) for r in principal.roles):
            return True
        if principal.email is not None and principal.email in self.users:
            return True
        return any(team in self.teams for team in principal.teams)

    def grants_as_owner(self, principal: Principal, owners: Iterable[str]) -> bool:
        return self.owned_by_team and bool(set(principal.teams) & set(owners))


def _block(doc: dict[str, Any]) -> Block:
    return Block(
        users=tuple(doc.get("users") or ()),
        roles=tuple(doc.get("roles") or ()),
        teams=tuple(doc.get("teams") or ()),
        owned_by_team=bool(doc.get("ownedByTeam", False)),
    )


_BLOCK_KEYS = {"users", "roles", "teams", "ownedByTeam"}


def _check_block(
    doc: Any, pointer: str, *, ownership: bool, problems: list[dict[str, str]]
) -> None:
    if not isinstance(doc, dict):
        problems.append({"pointer": pointer, "message": "must be an object"})
        return
    allowed = _BLOCK_KEYS if ownership else _BLOCK_KEYS - {"ownedByTeam"}
    for key in doc:
        if key == "policy":
            if doc[key] is not None:
                problems.append(
                    {
                        "pointer": f"{pointer}/policy",
                        "message": "dynamic permission policies are not supported",
                    }
                )
        elif key not in allowed:
            problems.append({"pointer": f"{pointer}/{key}", "message": "unknown key"})
    for key in ("users", "roles", "teams"):
        value = doc.get(key, [])
        if not isinstance(value, list) or not all(
            isinstance(v, str) and 0 < len(v) <= 320 for v in value
        ):
            problems.append({"pointer": f"{pointer}/{key}", "message": "must be a list of names"})
        elif len(value) > 1000:
            problems.append({"pointer": f"{pointer}/{key}", "message": "at most 1000 names"})
    if "ownedByTeam" in doc and not isinstance(doc["ownedByTeam"], bool):
        problems.append({"pointer": f"{pointer}/ownedByTeam", "message": "must be a boolean"})


def _merge_block(current: dict[str, Any] | None, change: dict[str, Any]) -> dict[str, Any]:
    merged = dict(current or {})
    merged.update({k: v for k, v in change.items() if k != "policy"})
    return merged


async def _check_names(tx: Tx, blocks: list[tuple[str, dict[str, Any]]], roles: set[str]) -> None:
    """Roles named must exist (Admin, Member, `<blueprint>-moderator`), and so must the teams
    and users named."""
    problems: list[dict[str, str]] = []
    teams = {t for _, b in blocks for t in b.get("teams", [])}
    users = {u.lower() for _, b in blocks for u in b.get("users", [])}
    known_teams: set[str] = set()
    known_users: set[str] = set()
    if teams:
        rows = await tx.fetch(
            "SELECT name FROM teams WHERE org_id = $1 AND name = ANY($2::varchar[])",
            tx.org_id,
            sorted(teams),
        )
        known_teams = {r["name"] for r in rows}
    if users:
        rows = await tx.fetch(
            "SELECT email FROM users WHERE org_id = $1 AND email = ANY($2::varchar[])",
            tx.org_id,
            sorted(users),
        )
        known_users = {r["email"] for r in rows}
    for pointer, block in blocks:
        for role in block.get("roles", []):
            if role not in roles:
                problems.append({"pointer": f"{pointer}/roles", "message": f"no role {role!r}"})
        for team in block.get("teams", []):
            if team not in known_teams:
                problems.append({"pointer": f"{pointer}/teams", "message": f"no team {team!r}"})
        for user in block.get("users", []):
            if user.lower() not in known_users:
                problems.append({"pointer": f"{pointer}/users", "message": f"no user {user!r}"})
    if problems:
        raise Invalid("The permissions name unknown roles, teams or users", details=problems)


async def known_roles(tx: Tx) -> set[str]:
    rows = await tx.fetch("SELECT identifier FROM blueprints WHERE org_id = $1", tx.org_id)
    return {ADMIN, MEMBER} | {moderator(r["identifier"]) for r in rows}


async def check_roles(tx: Tx, roles: Sequence[str], pointer: str) -> None:
    """Every role must exist: Admin, Member, or `<blueprint>-moderator` of a blueprint."""
    known = await known_roles(tx)
    bad = [(i, r) for i, r in enumerate(roles) if r not in known]
    if bad:
        names = ", ".join(repr(r) for _, r in bad)
        raise Invalid(
            f"Unknown role(s): {names} (roles are Admin, Member or <blueprint>-moderator of "
            "an existing blueprint)",
            details=[{"pointer": f"{pointer}/{i}", "message": f"no role {r!r}"} for i, r in bad],
        )


# ------------------------------------------------------------------------------------------
# Blueprint permissions


def _default_entity_block(blueprint: str) -> dict[str, Any]:
    return {"users": [], "roles": [ADMIN, moderator(blueprint)], "teams": [], "ownedByTeam": False}


@dataclass(slots=True)
class BlueprintPermissions:
    """A blueprint's stored permission document with Port's defaults filled in."""

    blueprint: str
    register: Block
    update: Block
    unregister: Block
    properties: dict[str, Block] = field(default_factory=dict)
    relations: dict[str, Block] = field(default_factory=dict)

    def property_block(self, name: str) -> Block:
        return self.properties.get(name, self.update)

    def relation_block(self, name: str) -> Block:
        return self.relations.get(name, self.update)

    def to_api(self, definition: dict[str, Any]) -> dict[str, Any]:
        props = definition.get("schema", {}).get("properties", {})
        return {
            "entities": {
                "read": {
                    "users": [],
                    "roles": [ADMIN, moderator(self.blueprint), MEMBER],
                    "teams": [],
                    "ownedByTeam": False,
                },
                "register": self.register.to_api(),
                "update": self.update.to_api(),
                "unregister": self.unregister.to_api(),
                "updateProperties": {p: self.property_block(p).to_api() for p in sorted(props)},
                "updateRelations": {
                    r: self.relation_block(r).to_api() for r in sorted(definition["relations"])
                },
            }
        }


def _blueprint_permissions(blueprint: str, stored: dict[str, Any] | None) -> BlueprintPermissions:
    entities = (stored or {}).get("entities", {})

    def block(name: str) -> Block:
        return _block({**_default_entity_block(blueprint), **entities.get(name, {})})

    return BlueprintPermissions(
        blueprint=blueprint,
        register=block("register"),
        update=block("update"),
        unregister=block("unregister"),
        properties={
            p: _block({**_default_entity_block(blueprint), **doc})
            for p, doc in entities.get("updateProperties", {}).items()
        },
        relations={
            r: _block({**_default_entity_block(blueprint), **doc})
            for r, doc in entities.get("updateRelations", {}).items()
        },
    )


async def blueprint_permissions(tx: Tx, blueprint: str) -> BlueprintPermissions:
    stored = await tx.fetchval(
        "SELECT permissions FROM blueprint_permissions WHERE org_id = $1 AND blueprint = $2",
        tx.org_id,
        blueprint,
    )
    return _blueprint_permissions(blueprint, stored)


async def update_blueprint_permissions(
    tx: Tx, definition: dict[str, Any], change: Any
) -> BlueprintPermissions:
    """Merge a PATCH into the stored document: each block given replaces the keys it names,
    per property and per relation; blocks not given are left as they are."""
    blueprint = definition["identifier"]
    problems: list[dict[str, str]] = []
    if not isinstance(change, dict) or set(change) - {"entities"}:
        raise Invalid('The body is {"entities": {...}}')
    entities = change.get("entities") or {}
    if not isinstance(entities, dict):
        raise Invalid("entities must be an object")
    props = set(definition.get("schema", {}).get("properties", {}))
    rels = set(definition["relations"])
    blocks: list[tuple[str, dict[str, Any]]] = []
    for key, value in entities.items():
        pointer = f"/entities/{key}"
        if key == "read":
            if value != {} and _block(value) != _block(
                {"roles": [ADMIN, moderator(blueprint), MEMBER]}
            ):
                problems.append(
                    {
                        "pointer": pointer,
                        "message": "read cannot be restricted: every member reads the catalog",
                    }
                )
        elif key in ("register", "update", "unregister"):
            _check_block(value, pointer, ownership=True, problems=problems)
            blocks.append((pointer, value if isinstance(value, dict) else {}))
        elif key in ("updateProperties", "updateRelations"):
            names = props if key == "updateProperties" else rels
            if not isinstance(value, dict):
                problems.append({"pointer": pointer, "message": "must be an object"})
                continue
            for name, sub in value.items():
                if name not in names:
                    kind = "property" if key == "updateProperties" else "relation"
                    problems.append(
                        {"pointer": f"{pointer}/{name}", "message": f"no {kind} {name!r}"}
                    )
                    continue
                _check_block(sub, f"{pointer}/{name}", ownership=True, problems=problems)
                blocks.append((f"{pointer}/{name}", sub if isinstance(sub, dict) else {}))
        else:
            problems.append({"pointer": pointer, "message": "unknown key"})
    if problems:
        raise Invalid("The permissions are invalid", details=problems)
    await _check_names(tx, blocks, await known_roles(tx))
    stored = await tx.fetchval(
        "SELECT permissions FROM blueprint_permissions WHERE org_id = $1 AND blueprint = $2 "
        "FOR UPDATE",
        tx.org_id,
        blueprint,
    )
    doc = copy.deepcopy(stored) if stored else {"entities": {}}
    current = doc.setdefault("entities", {})
    for key, value in entities.items():
        if key in ("register", "update", "unregister"):
            current[key] = _merge_block(current.get(key), value)
        elif key in ("updateProperties", "updateRelations"):
            section = current.setdefault(key, {})
            for name, sub in value.items():
                section[name] = _merge_block(section.get(name), sub)
    await tx.execute(
        "INSERT INTO blueprint_permissions (org_id, blueprint, permissions) VALUES ($1, $2, $3) "
        "ON CONFLICT (org_id, blueprint) DO UPDATE SET permissions = EXCLUDED.permissions, "
        "updated_at = now()",
        tx.org_id,
        blueprint,
        doc,
    )
    return _blueprint_permissions(blueprint, doc)


# ------------------------------------------------------------------------------------------
# Entity writes


@dataclass(frozen=True, slots=True)
class EntityChange:
    """One entity write as the guard sees it: the entity before (None: new) and after
    (None: deleted), each `{team, properties, relations, title, icon}`."""

    index: int
    identifier: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None


def _changed(before: dict[str, Any], after: dict[str, Any], key: str) -> set[str]:
    old, new = before.get(key) or {}, after.get(key) or {}
    return {name for name in set(old) | set(new) if old.get(name) != new.get(name)}


@dataclass(slots=True)
class EntityGuard:
    """Checks a write's entities against the blueprint's permissions, for one principal.
    `None` in place of a guard (automations, incoming webhooks, the action runner) means
    the write runs with the org's authority."""

    principal: Principal

    async def check(
        self, tx: Tx, definition: dict[str, Any], changes: Sequence[EntityChange]
    ) -> dict[int, Denied]:
        """The changes refused, by index, each with the permission that was missing."""
        if self.principal.is_admin or not changes:
            return {}
        blueprint = definition["identifier"]
        if moderator(blueprint) in self.principal.roles:
            return {}
        perms = await blueprint_permissions(tx, blueprint)
        owners = _Owners(tx, definition)
        refused: dict[int, Denied] = {}
        for change in changes:
            needed = _needed(perms, change)
            for permission, block in needed:
                if block.grants(self.principal):
                    continue
                if block.owned_by_team and await self._owns(owners, change, permission):
                    continue
                refused[change.index] = Denied(
                    permission, f"entity {change.identifier!r} of blueprint {blueprint!r}"
                )
                break
        return refused

    async def _owns(self, owners: _Owners, change: EntityChange, permission: str) -> bool:
        """Ownership: the entity belongs to one of the principal's teams before the change
        (update, unregister) and after it (register, update): a member cannot take another
        team's entity, nor give theirs away."""
        mine = set(self.principal.teams)
        if not mine:
            return False
        states = [s for s in (change.before, change.after) if s is not None]
        for state in states:
            if not mine & await owners.of(state):
                return False
        return True


def _needed(perms: BlueprintPermissions, change: EntityChange) -> list[tuple[str, Block]]:
    if change.before is None:
        return [("entities.register", perms.register)]
    if change.after is None:
        return [("entities.unregister", perms.unregister)]
    needed: list[tuple[str, Block]] = []
    if any(change.before.get(k) != change.after.get(k) for k in ("title", "icon", "team")):
        needed.append(("entities.update", perms.update))
    for name in sorted(_changed(change.before, change.after, "properties")):
        needed.append((f"entities.updateProperties.{name}", perms.property_block(name)))
    for name in sorted(_changed(change.before, change.after, "relations")):
        needed.append((f"entities.updateRelations.{name}", perms.relation_block(name)))
    return needed


class _Owners:
    """The teams that own an entity: its own `team` (Direct ownership, the default), or the
    teams of the entities reached through the blueprint's ownership path (Inherited)."""

    def __init__(self, tx: Tx, definition: dict[str, Any]) -> None:
        self._tx = tx
        self._definition = definition
        ownership = definition.get("ownership") or {}
        self._path = (
            str(ownership.get("path", "")).split(".")
            if ownership.get("type") == "Inherited"
            else []
        )

    async def of(self, state: dict[str, Any]) -> set[str]:
        if not self._path:
            return set(state.get("team") or [])
        first, *rest = self._path
        linked = (state.get("relations") or {}).get(first) or []
        targets = [linked] if isinstance(linked, str) else list(linked)
        if not targets:
            return set()
        blueprint = self._definition["relations"][first]["target"]
        rows = await self._tx.fetch(
            _INHERITED_TEAMS,
            self._tx.org_id,
            blueprint,
            targets,
            rest,
        )
        return {team for row in rows for team in row["team"]}


# Follow the rest of the ownership path from the first hop's targets, then read the teams of
# the entities reached.
_INHERITED_TEAMS = """
WITH RECURSIVE walk(depth, blueprint, identifier) AS (
    SELECT 0, $2::varchar, t FROM unnest($3::varchar[]) AS t
    UNION
    SELECT w.depth + 1, r.target_blueprint, r.target_identifier
    FROM walk w
    JOIN entity_relations r ON r.org_id = $1 AND r.source_blueprint = w.blueprint
        AND r.source_identifier = w.identifier AND r.relation = ($4::varchar[])[w.depth + 1]
    WHERE w.depth < cardinality($4::varchar[])
)
SELECT e.team FROM walk w
JOIN entities e ON e.org_id = $1 AND e.blueprint = w.blueprint AND e.identifier = w.identifier
WHERE w.depth = cardinality($4::varchar[])
"""


# ------------------------------------------------------------------------------------------
# Action permissions


_DEFAULT_EXECUTE = {"users": [], "roles": [ADMIN, MEMBER], "teams": [], "ownedByTeam": False}
_DEFAULT_APPROVE = {"users": [], "roles": [ADMIN], "teams": []}


@dataclass(frozen=True, slots=True)
class ActionPermissions:
    execute: Block
    approve: Block

    def to_api(self) -> dict[str, Any]:
        return {
            "execute": {**self.execute.to_api(), "policy": None},
            "approve": {**self.approve.to_api(ownership=False), "policy": None},
        }


def _action_permissions(action: dict[str, Any], stored: dict[str, Any] | None) -> ActionPermissions:
    stored = stored or {}
    return ActionPermissions(
        execute=_block({**_DEFAULT_EXECUTE, **stored.get("execute", {})}),
        approve=_block({**_DEFAULT_APPROVE, **stored.get("approve", {})}),
    )


async def action_permissions(tx: Tx, action: dict[str, Any]) -> ActionPermissions:
    stored = await tx.fetchval(
        "SELECT permissions FROM action_permissions WHERE org_id = $1 AND action = $2",
        tx.org_id,
        action["identifier"],
    )
    return _action_permissions(action, stored)


async def update_action_permissions(
    tx: Tx, action: dict[str, Any], change: Any
) -> ActionPermissions:
    if not isinstance(change, dict):
        raise Invalid('The body is {"execute": {...}, "approve": {...}}')
    problems: list[dict[str, str]] = []
    blocks: list[tuple[str, dict[str, Any]]] = []
    for key, value in change.items():
        if key not in ("execute", "approve"):
            problems.append({"pointer": f"/{key}", "message": "unknown key"})
            continue
        _check_block(value, f"/{key}", ownership=key == "execute", problems=problems)
        blocks.append((f"/{key}", value if isinstance(value, dict) else {}))
    if problems:
        raise Invalid("The permissions are invalid", details=problems)
    await _check_names(tx, blocks, await known_roles(tx))
    stored = await tx.fetchval(
        "SELECT permissions FROM action_permissions WHERE org_id = $1 AND action = $2 FOR UPDATE",
        tx.org_id,
        action["identifier"],
    )
    doc = copy.deepcopy(stored) if stored else {}
    for key, value in change.items():
        doc[key] = _merge_block(doc.get(key), value)
    await tx.execute(
        "INSERT INTO action_permissions (org_id, action, permissions) VALUES ($1, $2, $3) "
        "ON CONFLICT (org_id, action) DO UPDATE SET permissions = EXCLUDED.permissions, "
        "updated_at = now()",
        tx.org_id,
        action["identifier"],
        doc,
    )
    return _action_permissions(action, doc)


async def require_execute(
    tx: Tx,
    principal: Principal,
    action: dict[str, Any],
    entity: dict[str, Any] | None,
    blueprint: Callable[[], Awaitable[dict[str, Any]]] | None,
) -> None:
    """May the principal run the action (on `entity`, for DAY-2 and DELETE actions, where
    `ownedByTeam` lets the entity's owners run it)? `blueprint` reads the entity's
    blueprint definition, when it is needed."""
    if principal.is_admin:
        return
    perms = await action_permissions(tx, action)
    if perms.execute.grants(principal):
        return
    if perms.execute.owned_by_team and entity is not None and blueprint is not None:
        definition = await blueprint()
        if set(principal.teams) & await _Owners(tx, definition).of(entity):
            return
    raise Denied("actions.execute", f"action {action['identifier']!r}")


def require_workflow_execute(
    principal: Principal, workflow: str, trigger_permissions: dict[str, Any] | None
) -> None:
    """May the principal start the workflow from its self-serve trigger? The trigger's
    `permissions` block (`roles`, `users`, `teams`) grants it; none, or an empty one,
    leaves it to Admins (Port's default)."""
    if principal.is_admin or _block(trigger_permissions or {}).grants(principal):
        return
    raise Denied("workflows.execute", f"workflow {workflow!r}")


async def may_approve(tx: Tx, principal: Principal, action: dict[str, Any]) -> bool:
    if principal.is_admin:
        return True
    perms = await action_permissions(tx, action)
    return perms.approve.grants(principal)


async def approvers(tx: Tx, action: dict[str, Any]) -> set[str]:
    """The users (emails) the action's approve block names: listed users, members of listed
    teams, and holders of listed roles. An `ALL` approval waits for each of them."""
    perms = await action_permissions(tx, action)
    rows = await tx.fetch(
        "SELECT u.email FROM users u WHERE u.org_id = $1 AND u.status <> 'Disabled' AND ("
        " u.email = ANY($2::varchar[])"
        " OR (u.roles || u.idp_roles) && $3::varchar[]"
        " OR EXISTS (SELECT 1 FROM team_members m JOIN teams t"
        "   ON t.org_id = m.org_id AND t.id = m.team_id"
        "   WHERE m.org_id = u.org_id AND m.user_id = u.id AND t.name = ANY($4::varchar[])))",
        tx.org_id,
        [u.lower() for u in perms.approve.users],
        list(perms.approve.roles),
        list(perms.approve.teams),
    )
    return {r["email"] for r in rows}


# ------------------------------------------------------------------------------------------
# Effective permissions (GET /v1/auth/me)

Reach = Literal["all", "ownedByTeam", "none"]


def _reach(block: Block, principal: Principal) -> Reach:
    if block.grants(principal):
        return "all"
    if block.owned_by_team and principal.teams:
        return "ownedByTeam"
    return "none"


async def effective(
    tx: Tx, principal: Principal, definitions: list[dict[str, Any]]
) -> dict[str, Any]:
    """Everything the principal may do, as a SPA needs it to draw its menus: org-level
    operations, per blueprint (`definitions`: the org's blueprints) the entity permissions
    (`all`, `ownedByTeam`: only entities their teams own, `none`), per action whether they
    may execute and approve it."""
    stored_bp = {
        r["blueprint"]: r["permissions"]
        for r in await tx.fetch(
            "SELECT blueprint, permissions FROM blueprint_permissions WHERE org_id = $1",
            tx.org_id,
        )
    }
    moderated = [d["identifier"] for d in definitions]
    granted = granted_operations(principal, moderated)
    blueprints: dict[str, Any] = {}
    for definition in definitions:
        identifier = definition["identifier"]
        perms = _blueprint_permissions(identifier, stored_bp.get(identifier))
        full = principal.is_admin or moderator(identifier) in principal.roles

        def reach(block: Block, full: bool = full) -> Reach:
            return "all" if full else _reach(block, principal)

        blueprints[identifier] = {
            "operations": granted["blueprints"].get(identifier, []),
            "entities": {
                "read": "all",
                "register": reach(perms.register),
                "update": reach(perms.update),
                "unregister": reach(perms.unregister),
                "updateProperties": {
                    p: reach(perms.property_block(p))
                    for p in sorted(definition.get("schema", {}).get("properties", {}))
                },
                "updateRelations": {
                    r: reach(perms.relation_block(r)) for r in sorted(definition["relations"])
                },
            },
        }
    stored_actions = {
        r["action"]: r["permissions"]
        for r in await tx.fetch(
            "SELECT action, permissions FROM action_permissions WHERE org_id = $1", tx.org_id
        )
    }
    actions: dict[str, Any] = {}
    for row in await tx.fetch(
        "SELECT identifier FROM actions WHERE org_id = $1 AND trigger->>'type' = 'self-service' "
        "ORDER BY identifier",
        tx.org_id,
    ):
        action = {"identifier": row["identifier"]}
        perms_a = _action_permissions(action, stored_actions.get(row["identifier"]))
        actions[row["identifier"]] = {
            "execute": "all" if principal.is_admin else _reach(perms_a.execute, principal),
            "approve": principal.is_admin or perms_a.approve.grants(principal),
        }
    return {"operations": granted["operations"], "blueprints": blueprints, "actions": actions}


# ------------------------------------------------------------------------------------------
# Pages: who reads a page (its dashboards' data included) and who changes it


PAGE_BLOCKS = ("read", "update")
# Port's defaults: every member reads a new page; only Admins change it.
_DEFAULT_PAGE_ACCESS: dict[str, dict[str, list[str]]] = {
    "read": {"users": [], "roles": [ADMIN, MEMBER], "teams": []},
    "update": {"users": [], "roles": [], "teams": []},
}


def default_page_access(block: str) -> dict[str, list[str]]:
    return copy.deepcopy(_DEFAULT_PAGE_ACCESS[block])


def page_allows(principal: Principal, access: dict[str, Any], operation: str) -> bool:
    """`operation` (read or update) on a page whose block for it is `access`. Admins hold
    both; whoever may change a page may read it (the caller passes both blocks then)."""
    return principal.is_admin or _block(access).grants(principal)


def require_page(
    principal: Principal, page: str, read: dict[str, Any], update: dict[str, Any], operation: str
) -> None:
    """Raise Denied unless the principal may `operation` (read, update) the page."""
    allowed = page_allows(principal, update, "update")
    if operation == "read":
        allowed = allowed or page_allows(principal, read, "read")
    if not allowed:
        raise Denied(
            f"pages.{operation}",
            f"page {page!r}",
            " (held by Admins and the page's " + operation + " permissions)",
        )


async def merged_page_access(
    tx: Tx, current: dict[str, dict[str, Any]], change: Any
) -> dict[str, dict[str, Any]]:
    """Port's PATCH of a page's permissions: each block's keys given replace the stored
    ones, keys left out stay; every role, team and user named must exist."""
    problems: list[dict[str, str]] = []
    if not isinstance(change, dict):
        raise Invalid("The permissions must be an object with read and/or update")
    for key in change:
        if key not in PAGE_BLOCKS:
            problems.append({"pointer": f"/{key}", "message": "unknown key (read, update)"})
    for key in PAGE_BLOCKS:
        if key in change:
            _check_block(change[key], f"/{key}", ownership=False, problems=problems)
    if problems:
        raise Invalid("The page permissions are invalid", details=problems)
    merged = {k: _merge_block(current.get(k), change.get(k, {})) for k in PAGE_BLOCKS}
    await _check_names(
        tx, [(f"/{k}", merged[k]) for k in PAGE_BLOCKS if k in change], await known_roles(tx)
    )
    return merged


# ------------------------------------------------------------------------------------------
# Teams renamed or deleted


def _retitled(doc: Any, old: str, new: str | None) -> Any:
    if isinstance(doc, dict):
        out = {k: _retitled(v, old, new) for k, v in doc.items()}
        teams = doc.get("teams")
        if isinstance(teams, list) and old in teams:
            renamed = [new if t == old else t for t in teams if new is not None or t != old]
            out["teams"] = list(dict.fromkeys(renamed))
        return out
    return doc


async def rename_team(tx: Tx, old: str, new: str | None) -> None:
    """Carry a team's new name (or its deletion: `new` None) into every permission block
    that names it, so a block keeps meaning the same people."""
    for table, key in (("blueprint_permissions", "blueprint"), ("action_permissions", "action")):
        rows = await tx.fetch(
            f"SELECT {key} AS key, permissions FROM {table} WHERE org_id = $1 FOR UPDATE",  # noqa: S608 - constant names
            tx.org_id,
        )
        for row in rows:
            doc = _retitled(row["permissions"], old, new)
            if doc != row["permissions"]:
                await tx.execute(
                    f"UPDATE {table} SET permissions = $3, updated_at = now() "  # noqa: S608
                    f"WHERE org_id = $1 AND {key} = $2",
                    tx.org_id,
                    row["key"],
                    doc,
                )
    for row in await tx.fetch(
        "SELECT identifier, read_access, update_access FROM pages WHERE org_id = $1 FOR UPDATE",
        tx.org_id,
    ):
        read, update = (_retitled(row[k], old, new) for k in ("read_access", "update_access"))
        if (read, update) != (row["read_access"], row["update_access"]):
            await tx.execute(
                "UPDATE pages SET read_access = $3, update_access = $4 "
                "WHERE org_id = $1 AND identifier = $2",
                tx.org_id,
                row["identifier"],
                read,
                update,
            )
