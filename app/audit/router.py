"""`GET /v1/audit-log`: the organization's changes, newest first, for Admins.

Entries are written by triggers in the transaction of each change (migration 0014): who
(`trigger.by.userId`, the caller's subject; `system` for the service's own work), from
where (`trigger.origin`: API for machine credentials, UI for people signed in, INTEGRATION for
Port's Ocean, SSO for a sign-in's provisioning, WEBHOOK, ACTION for a run's entity upsert,
SYSTEM), what (`resourceType`, `identifier`, `context`), the `action`
(CREATE, UPDATE, DELETE), `status` and the `diff` (before / after; secrets and credentials
by metadata only). A change that fails is rolled back with its entry, so entries are
SUCCESS. Filters combine with AND; pages follow `next`.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import Query
from pydantic import BaseModel, ConfigDict

from app.auth import permissions
from app.auth.principal import CurrentTenant
from app.db.routing import api_router
from app.kit.errors import Invalid
from app.kit.openapi import ERRORS_AUTHED
from app.kit.responses import json_response

router = api_router(tags=["Audit log"])
Resource = Literal[
    "blueprint",
    "entity",
    "scorecard",
    "action",
    "run",
    "webhook",
    "secret",
    "credential",
    "user",
    "team",
    "blueprint-permissions",
    "action-permissions",
    "oidc",
    "organization",
    "integration",
    "workflow",
    "workflow-run",
    "page",
    "page-widget",
    "migration",
]


# The fields `includes` may name (Port's list).
Included = Literal[
    "action",
    "context",
    "diff",
    "identifier",
    "resourceType",
    "status",
    "trigger",
    "additionalData",
    "message",
]


class AuditEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    identifier: str | None
    resourceType: str
    action: Literal["CREATE", "UPDATE", "DELETE"]
    status: Literal["SUCCESS", "FAILURE"]
    trigger: dict[str, Any]
    context: dict[str, Any]
    diff: dict[str, Any]
    timestamp: datetime


class AuditLogResponse(BaseModel):
    ok: Literal[True] = True
    audits: list[AuditEntry]
    next: str | None = None


def _cursor(row: asyncpg.Record) -> str:
    raw = json.dumps([row["at"].isoformat(), row["src"], row["id"]]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _position(cursor: str) -> tuple[datetime, str, int]:
    try:
        at, src, ident = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if src not in ("a", "e"):
            raise ValueError(src)
        return datetime.fromisoformat(at), str(src), int(ident)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise Invalid("`next` is not a cursor this route gave") from exc


def _shape(row: asyncpg.Record) -> dict[str, Any]:
    context: dict[str, Any] = {}
    if row["blueprint"] is not None:
        context["blueprint"] = row["blueprint"]
    if row["resource"] == "entity":
        context["entity"] = row["identifier"]
    if row["run_id"] is not None:
        context["runId"] = row["run_id"]
    if row["installation"] is not None:
        context["installationId"] = row["installation"]
    if row["webhook_event"] is not None:
        context["webhookEventId"] = row["webhook_event"]
    return {
        "id": f"{row['src']}{row['id']}",
        "identifier": row["identifier"],
        "resourceType": row["resource"],
        "action": row["action"],
        "status": row["status"],
        "trigger": {
            "by": {"orgId": str(row["org_id"]), "userId": row["actor"]},
            "origin": row["origin"],
            "at": row["at"],
        },
        "context": context,
        "diff": row["diff"],
        "timestamp": row["at"],
    }


@router.get(
    "/v1/audit-log",
    response_model=AuditLogResponse,
    responses=ERRORS_AUTHED,
    summary="The organization's audit log (Admins)",
)
async def audit_log(
    tenant: CurrentTenant,
    identifier: Annotated[str | None, Query(max_length=1000)] = None,
    entity: Annotated[str | None, Query(max_length=1000)] = None,
    blueprint: Annotated[str | None, Query(max_length=100)] = None,
    run_id: Annotated[str | None, Query(max_length=200)] = None,
    resources: Annotated[list[Resource] | None, Query()] = None,
    origin: Annotated[list[str] | None, Query(max_length=20)] = None,
    action: Literal["CREATE", "UPDATE", "DELETE"] | None = None,
    status: Literal["SUCCESS", "FAILURE"] | None = None,
    from_: Annotated[datetime | None, Query(alias="from")] = None,
    to: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    next: Annotated[str | None, Query(max_length=200)] = None,
    includes: Annotated[
        list[Included] | None,
        Query(description="Only these fields of each entry (Port's names)"),
    ] = None,
    webhook_id: Annotated[
        str | None,
        Query(
            alias="webhookId",
            min_length=1,
            max_length=100,
            description="Only entries of this incoming webhook: its own changes and the "
            "entity changes its events made",
        ),
    ] = None,
    webhook_event_id: Annotated[
        str | None,
        Query(
            alias="webhookEventId",
            min_length=1,
            max_length=100,
            description="Only the entity changes this incoming webhook event's mappings made",
        ),
    ] = None,
    include_deleted_entities: Annotated[
        bool | None,
        Query(
            description="false: leave out the entries of entities that no longer exist "
            "(left unset, every entity's entries are there, deleted ones' included)"
        ),
    ] = None,
    installation_id: Annotated[
        str | None,
        Query(
            alias="InstallationId",
            min_length=1,
            max_length=100,
            description="Only entries of this integration: its own changes and the entity "
            "changes it wrote (Ocean's writes name it in their User-Agent)",
        ),
    ] = None,
    action_type: Annotated[
        Literal["automation", "self-service"] | None,
        Query(
            alias="actionType",
            description="Only entries of actions of this kind: the actions' own changes, "
            "their runs' and what those runs changed",
        ),
    ] = None,
) -> Any:
    """Newest first. `entity` names an entity (with `blueprint`, of that blueprint);
    `identifier` any resource's identifier; `resources`, `origin` repeatable; `from` / `to`
    ISO 8601 times; `next`: the cursor of the previous page; `includes` keeps only the
    fields named (`additionalData` and `message` Portolan has no value for: left out);
    `actionType`: entries of actions of that kind (`trigger.type` of an action's
    definition, as its run keeps it): action changes, runs, and entity changes runs made;
    `webhookId`: an incoming webhook's changes and the entity changes its events made;
    `InstallationId`: an integration's changes and the entity changes it wrote;
    `webhookEventId`: the entity changes an incoming webhook event made;
    `include_deleted_entities=false`: no entries of entities that no longer exist."""
    permissions.require(tenant.principal, "audit.read")
    after = _position(next) if next else None
    rows = await tenant.tx.fetch(
        # Entity changes are the catalog's entity events; the rest is audit_log. The
        # filters apply to both (PostgreSQL pushes them into each branch).
        "SELECT * FROM ("
        " SELECT 'a' AS src, id, org_id, at, actor, origin, resource, identifier, blueprint,"
        "  run_id, NULL::text AS installation, NULL::text AS webhook_event, action, status,"
        "  diff"
        "  FROM audit_log WHERE org_id = $1"
        " UNION ALL"
        " SELECT 'e', id, org_id, at, actor, origin, 'entity', identifier, blueprint, run_id,"
        "  installation, webhook_event, action, 'SUCCESS',"
        "  jsonb_build_object('before', before, 'after', after)"
        "  FROM entity_events WHERE org_id = $1"
        ") x WHERE true"
        " AND ($2::text IS NULL OR identifier = $2)"
        " AND ($3::text IS NULL OR (resource = 'entity' AND identifier = $3))"
        " AND ($4::text IS NULL OR blueprint = $4)"
        " AND ($5::text IS NULL OR run_id = $5)"
        " AND ($6::text[] IS NULL OR resource = ANY($6::text[]))"
        " AND ($7::text[] IS NULL OR origin = ANY($7::text[]))"
        " AND ($8::text IS NULL OR action = $8)"
        " AND ($9::text IS NULL OR status = $9)"
        " AND ($10::timestamptz IS NULL OR at >= $10)"
        " AND ($11::timestamptz IS NULL OR at <= $11)"
        " AND ($12::timestamptz IS NULL OR (at, src, id) < ($12, $13::text, $14::bigint))"
        " AND ($16::text IS NULL OR CASE WHEN resource = 'action' THEN"
        "  coalesce(diff->'after'->'trigger'->>'type', diff->'before'->'trigger'->>'type')"
        "  ELSE (SELECT r.definition->'trigger'->>'type' FROM action_runs r"
        "   WHERE r.org_id = $1 AND r.id = x.run_id) END = $16)"
        " AND ($17::text IS NULL OR (resource = 'webhook' AND identifier = $17)"
        "  OR (resource = 'entity' AND origin = 'WEBHOOK' AND actor = 'webhook:' || $17))"
        " AND ($18::text IS NULL OR (resource = 'integration' AND identifier = $18)"
        "  OR installation = $18)"
        " AND ($20::text IS NULL OR webhook_event = $20)"
        " AND ($19::boolean IS NOT FALSE OR resource <> 'entity' OR EXISTS (SELECT 1"
        "  FROM entities en WHERE en.org_id = $1 AND en.blueprint = x.blueprint"
        "  AND en.identifier = x.identifier))"
        " ORDER BY at DESC, src DESC, id DESC LIMIT $15",
        tenant.org_id,
        identifier,
        entity,
        blueprint,
        run_id,
        resources,
        origin,
        action,
        status,
        from_,
        to,
        after[0] if after else None,
        after[1] if after else None,
        after[2] if after else None,
        limit + 1,
        action_type,
        webhook_id,
        installation_id,
        include_deleted_entities,
        webhook_event_id,
    )
    page = rows[:limit]
    audits = [_shape(r) for r in page]
    if includes:
        kept = set(includes)
        audits = [{k: v for k, v in entry.items() if k in kept} for entry in audits]
    body: dict[str, Any] = {"ok": True, "audits": audits}
    if len(rows) > limit:
        body["next"] = _cursor(page[-1])
    return json_response(body)
