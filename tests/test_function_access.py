"""OWASP API5 (broken function level authorization): every route of the API is classified by
who may call it, the classification covers the OpenAPI document exactly (a new route cannot
slip in unclassified), and a Member credential calling each route is refused exactly where
the classification says, with a 403 naming the permission."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.routing import APIRoute

from app.db.database import Database
from app.kit.http import iter_routes
from tests.conftest import Org, OrgFactory
from tests.test_permissions import add_user, app_headers, ok, user_headers

# public: no bearer token; member: any member of the org; moderator: Admins and the
# blueprint's moderators; admin: Admins only; entity: the blueprint's entity permissions
# (by default Admins and moderators); run: Admins, the run's starter (and its approvers);
# page: Admins and the page's `update` permissions (by default Admins only).
ACCESS: dict[tuple[str, str], str] = {
    ("GET", "/healthz"): "public",
    ("GET", "/metrics"): "public",
    ("GET", "/readyz"): "public",
    ("POST", "/v1/auth/access_token"): "public",
    ("POST", "/v1/platform/orgs"): "public",
    ("POST", "/v1/webhooks/ingest/{webhookKey}"): "public",
    ("GET", "/v1/auth/me"): "member",
    ("GET", "/v1/organization"): "member",
    ("PUT", "/v1/organization"): "admin",
    ("PATCH", "/v1/organization"): "admin",
    ("GET", "/v1/organization/signing-secret"): "admin",
    ("POST", "/v1/organization/signing-secret/rotate"): "admin",
    ("GET", "/v1/organization/oidc"): "admin",
    ("PUT", "/v1/organization/oidc"): "admin",
    ("DELETE", "/v1/organization/oidc"): "admin",
    ("GET", "/v1/organization/secrets"): "admin",
    ("POST", "/v1/organization/secrets"): "admin",
    ("GET", "/v1/organization/secrets/{name}"): "admin",
    ("PATCH", "/v1/organization/secrets/{name}"): "admin",
    ("DELETE", "/v1/organization/secrets/{name}"): "admin",
    ("GET", "/v1/apps"): "admin",
    ("POST", "/v1/apps"): "admin",
    ("PUT", "/v1/apps/{app_id}"): "admin",
    ("DELETE", "/v1/apps/{app_id}"): "admin",
    ("POST", "/v1/apps/{app_id}/rotate-secret"): "admin",
    ("GET", "/v1/audit-log"): "admin",
    ("GET", "/v1/users"): "member",
    ("GET", "/v1/users/{user_email}"): "member",
    ("POST", "/v1/users/invite"): "admin",
    ("PATCH", "/v1/users/{user_email}"): "admin",
    ("DELETE", "/v1/users/{user_email}"): "admin",
    ("POST", "/v1/rotate-credentials/{user_email}"): "admin",
    ("GET", "/v1/teams"): "member",
    ("GET", "/v1/teams/{name}"): "member",
    ("POST", "/v1/teams"): "admin",
    ("PATCH", "/v1/teams/{name}"): "admin",
    ("PUT", "/v1/teams/{name}"): "admin",
    ("DELETE", "/v1/teams/{name}"): "admin",
    ("GET", "/v1/webhooks"): "admin",
    ("GET", "/v1/webhooks/metadata"): "member",
    ("POST", "/v1/webhooks"): "admin",
    ("GET", "/v1/webhooks/{identifier}"): "admin",
    ("PUT", "/v1/webhooks/{identifier}"): "admin",
    ("PATCH", "/v1/webhooks/{identifier}"): "admin",
    ("DELETE", "/v1/webhooks/{identifier}"): "admin",
    ("GET", "/v1/webhooks/{identifier}/events"): "admin",
    ("GET", "/v1/integration"): "admin",
    ("POST", "/v1/integration"): "admin",
    ("GET", "/v1/integration/{identifier}"): "admin",
    ("PATCH", "/v1/integration/{identifier}"): "admin",
    ("DELETE", "/v1/integration/{identifier}"): "admin",
    ("DELETE", "/v1/integrations/{identifier}"): "admin",
    ("PATCH", "/v1/integration/{identifier}/config"): "admin",
    ("PATCH", "/v1/integration/{identifier}/resync-state"): "admin",
    ("GET", "/v1/integration/{identifier}/kinds/{kind}/examples"): "admin",
    ("POST", "/v1/integration/{identifier}/kinds/{kind}/examples"): "admin",
    ("GET", "/v1/integration/{identifier}/logs"): "admin",
    ("POST", "/v1/integration-logs/{ingestId}"): "admin",
    ("GET", "/v1/integration/provision-enabled"): "admin",
    ("GET", "/v1/integration/metadata"): "member",
    ("GET", "/v1/integration/{identifier}/resync-request"): "admin",
    ("POST", "/v1/integration/{identifier}/resync-request"): "admin",
    ("GET", "/v1/integration/{identifier}/syncMetrics"): "admin",
    ("GET", "/v1/integration/{identifier}/syncsMetadata"): "admin",
    ("POST", "/v1/integration-metrics/{ingestId}/heartbeat"): "admin",
    ("POST", "/v1/integration-metrics/{ingestId}/syncMetrics"): "admin",
    ("PUT", "/v1/integration-metrics/{ingestId}/syncMetrics/resync/{rest}"): "admin",
    ("POST", "/v1/blueprints/entities/datasource-entities"): "member",
    ("GET", "/v1/blueprints"): "member",
    ("POST", "/v1/blueprints"): "admin",
    ("GET", "/v1/blueprints/{identifier}"): "member",
    ("PUT", "/v1/blueprints/{identifier}"): "moderator",
    ("PATCH", "/v1/blueprints/{identifier}"): "moderator",
    ("DELETE", "/v1/blueprints/{identifier}"): "admin",
    ("PATCH", "/v1/blueprints/{identifier}/properties/{name}/rename"): "moderator",
    ("PATCH", "/v1/blueprints/{identifier}/relations/{name}/rename"): "moderator",
    ("PATCH", "/v1/blueprints/{identifier}/mirror/{name}/rename"): "moderator",
    ("GET", "/v1/blueprints/{identifier}/permissions"): "member",
    ("PATCH", "/v1/blueprints/{identifier}/permissions"): "moderator",
    ("GET", "/v1/blueprints/{blueprint}/entities"): "member",
    ("POST", "/v1/blueprints/{blueprint}/entities"): "entity",
    ("GET", "/v1/blueprints/{blueprint}/entities-count"): "member",
    ("POST", "/v1/blueprints/{blueprint}/entities/bulk"): "entity",
    ("POST", "/v1/blueprints/{blueprint}/entities/search"): "member",
    ("GET", "/v1/blueprints/{blueprint}/entities/{identifier}"): "member",
    ("PUT", "/v1/blueprints/{blueprint}/entities/{identifier}"): "entity",
    ("PATCH", "/v1/blueprints/{blueprint}/entities/{identifier}"): "entity",
    ("DELETE", "/v1/blueprints/{blueprint}/entities/{identifier}"): "entity",
    ("POST", "/v1/blueprints/{blueprint}/bulk/entities/delete"): "entity",
    ("DELETE", "/v1/blueprints/{blueprint}/all-entities"): "moderator",
    ("GET", "/v1/migrations"): "member",
    ("POST", "/v1/migrations"): "entity",
    ("GET", "/v1/migrations/{migration_id}"): "member",
    ("POST", "/v1/migrations/{migration_id}/cancel"): "run",
    ("POST", "/v1/entities/search"): "member",
    ("POST", "/v1/entities/aggregate"): "member",
    ("POST", "/v1/entities/properties-history"): "member",
    ("POST", "/v1/entities/aggregate-over-time"): "member",
    ("GET", "/v1/blueprints/{blueprint}/entities-history/{identifier}"): "member",
    ("GET", "/v1/scorecards"): "member",
    ("GET", "/v1/blueprints/{blueprint}/scorecards"): "member",
    ("POST", "/v1/blueprints/{blueprint}/scorecards"): "moderator",
    ("PUT", "/v1/blueprints/{blueprint}/scorecards"): "moderator",
    ("GET", "/v1/blueprints/{blueprint}/scorecards/{identifier}"): "member",
    ("PUT", "/v1/blueprints/{blueprint}/scorecards/{identifier}"): "moderator",
    ("DELETE", "/v1/blueprints/{blueprint}/scorecards/{identifier}"): "moderator",
    ("POST", "/v1/blueprints/{blueprint}/scorecards/{identifier}/dry-run"): "member",
    ("GET", "/v1/blueprints/{blueprint}/scorecards/{identifier}/summary"): "member",
    ("GET", "/v1/actions"): "member",
    ("POST", "/v1/actions"): "moderator",
    ("GET", "/v1/actions/{identifier}"): "member",
    ("PUT", "/v1/actions/{identifier}"): "moderator",
    ("DELETE", "/v1/actions/{identifier}"): "moderator",
    ("GET", "/v1/actions/{identifier}/permissions"): "member",
    ("PATCH", "/v1/actions/{identifier}/permissions"): "moderator",
    ("POST", "/v1/actions/{identifier}/runs"): "member",
    ("GET", "/v1/actions/runs"): "member",
    ("GET", "/v1/actions/runs/{run_id}"): "run",
    ("PATCH", "/v1/actions/runs/{run_id}"): "run",
    ("PATCH", "/v1/actions/runs/{run_id}/approval"): "run",
    ("GET", "/v1/actions/runs/{run_id}/approvers"): "run",
    ("GET", "/v1/actions/runs/{run_id}/logs"): "run",
    ("POST", "/v1/actions/runs/{run_id}/logs"): "run",
    ("GET", "/v1/actions/runs/{run_id}/logs/stream"): "run",
    ("POST", "/v1/actions/runs/claim-pending"): "admin",
    ("PATCH", "/v1/actions/runs/ack"): "admin",
    ("GET", "/v1/workflows"): "member",
    ("POST", "/v1/workflows"): "admin",
    ("GET", "/v1/workflows/{identifier}"): "member",
    ("PUT", "/v1/workflows/{identifier}"): "admin",
    ("DELETE", "/v1/workflows/{identifier}"): "admin",
    ("POST", "/v1/workflows/{identifier}/runs"): "member",
    ("GET", "/v1/workflows/runs"): "member",
    ("POST", "/v1/workflows/runs/claim-pending"): "admin",
    ("PATCH", "/v1/workflows/runs/ack"): "admin",
    ("GET", "/v1/workflows/nodes/runs"): "member",
    ("PATCH", "/v1/workflows/nodes/runs/{node_run_id}"): "admin",
    ("POST", "/v1/workflows/nodes/runs/{node_run_id}/logs"): "admin",
    ("GET", "/v1/workflows/runs/{workflow_run_id}"): "member",
    ("POST", "/v1/workflows/runs/{workflow_run_id}/cancel"): "run",
    ("GET", "/v1/workflows/runs/{workflow_run_id}/stream"): "member",
    ("POST", "/v1/workflows/nodes/runs/{node_run_id}/responses"): "run",
    ("GET", "/v1/pages"): "member",
    ("POST", "/v1/pages"): "admin",
    ("GET", "/v1/pages/{identifier}"): "member",
    ("PATCH", "/v1/pages/{identifier}"): "page",
    ("DELETE", "/v1/pages/{identifier}"): "admin",
    ("GET", "/v1/pages/{page_identifier}/permissions"): "member",
    ("PATCH", "/v1/pages/{page_identifier}/permissions"): "admin",
    ("POST", "/v1/pages/{page_identifier}/widgets"): "page",
    ("PATCH", "/v1/pages/{page_identifier}/widgets/{widget_id}"): "page",
    ("DELETE", "/v1/pages/{page_identifier}/widgets/{widget_id}"): "page",
    ("POST", "/v1/pages/{page_identifier}/widgets/{widget_id}/data"): "member",
}

SERVICE = {
    "identifier": "service",
    "title": "Service",
    "schema": {"properties": {"language": {"type": "string"}}},
    "mirrorProperties": {"system_title": {"path": "system.$title"}},
    "relations": {"system": {"target": "system", "many": False, "required": False}},
}
SYSTEM = {"identifier": "system", "title": "System", "schema": {"properties": {}}}
ACTION = {
    "identifier": "open",
    "trigger": {
        "type": "self-service",
        "operation": "CREATE",
        "blueprintIdentifier": "service",
        "userInputs": {"properties": {}},
    },
    "invocationMethod": {"type": "WEBHOOK", "url": "http://127.0.0.1:9/open"},
    "requiredApproval": True,
}
SCORECARD = {
    "identifier": "sc",
    "title": "SC",
    "levels": [{"title": "Basic", "color": "paleBlue"}, {"title": "Gold", "color": "gold"}],
    "rules": [
        {
            "identifier": "lang",
            "title": "Has language",
            "level": "Gold",
            "query": {
                "combinator": "and",
                "conditions": [{"property": "language", "operator": "isNotEmpty"}],
            },
        }
    ],
}
WEBHOOK = {"identifier": "wh", "title": "Hook", "mappings": []}
WORKFLOW = {
    "identifier": "flow",
    "nodes": [
        {
            "identifier": "trigger",
            "config": {"type": "SELF_SERVE_TRIGGER", "permissions": {"roles": ["Member"]}},
        },
        {"identifier": "hook", "config": {"type": "WEBHOOK", "url": "http://127.0.0.1:9/flow"}},
    ],
    "connections": [{"sourceIdentifier": "trigger", "targetIdentifier": "hook"}],
}
GATE = {
    "identifier": "gate",
    "nodes": [
        {"identifier": "trigger", "config": {"type": "SELF_SERVE_TRIGGER"}},
        {
            "identifier": "approval",
            "config": {
                "type": "INPUT",
                "userInputs": {"buttons": [{"identifier": "approve", "label": "Approve"}]},
                "outlets": [{"identifier": "approve"}],
            },
        },
    ],
    "connections": [{"sourceIdentifier": "trigger", "targetIdentifier": "approval"}],
}
INTEGRATION = {"installationId": "ocean", "installationAppType": "fake", "version": "1.0.0"}
PAGE = {"identifier": "dash", "widgets": [{"id": "note", "type": "markdown", "markdown": "hi"}]}


def _documented() -> set[tuple[str, str]]:
    document = json.loads(Path("openapi/openapi.json").read_text())
    return {(m.upper(), p) for p, ops in document["paths"].items() for m in ops}


def test_every_route_is_classified() -> None:
    assert set(ACCESS) == _documented()


async def _world(client: httpx.AsyncClient, db: Database, org: Org) -> dict[str, str]:
    for path, body in (
        ("/v1/blueprints", SYSTEM),
        ("/v1/blueprints", SERVICE),
        ("/v1/blueprints", {**SYSTEM, "identifier": "scratch", "title": "Scratch"}),
        ("/v1/actions", ACTION),
        ("/v1/blueprints/service/scorecards", SCORECARD),
        ("/v1/webhooks", WEBHOOK),
        ("/v1/workflows", WORKFLOW),
        ("/v1/workflows", GATE),
        ("/v1/integration", INTEGRATION),
        ("/v1/organization/secrets", {"secretName": "s1", "secretValue": "v"}),
        ("/v1/teams", {"name": "alpha"}),
        ("/v1/users/invite", {"invitee": {"email": "u@example.com"}}),
        ("/v1/blueprints/service/entities", {"identifier": "e1"}),
        ("/v1/pages", PAGE),
    ):
        await ok(client, "POST", path, org, json=body)
    run = await ok(client, "POST", "/v1/actions/open/runs", org, json={"properties": {}})
    flow_run = await ok(client, "POST", "/v1/workflows/flow/runs", org, json={"inputs": {}})
    gate_run = await ok(client, "POST", "/v1/workflows/gate/runs", org, json={"inputs": {}})
    # An ended run, so that following its live stream ends.
    ended = await ok(client, "POST", "/v1/workflows/flow/runs", org, json={"inputs": {}})
    ended_id = ended["workflowRun"]["identifier"]
    await ok(client, "POST", f"/v1/workflows/runs/{ended_id}/cancel", org)
    migration = await ok(client, "DELETE", "/v1/blueprints/scratch/all-entities", org)
    integration = await ok(client, "GET", "/v1/integration/ocean", org)
    return {
        "run_id": run["run"]["id"],
        "workflow_run_id": flow_run["workflowRun"]["identifier"],
        "ended_workflow_run_id": ended_id,
        "node_run_id": gate_run["workflowRun"]["nodeRuns"][1]["identifier"],
        "migration_id": migration["migrationId"],
        "app_id": org.client_id,
        "ingest_id": integration["integration"]["logAttributes"]["ingestId"],
    }


def _call(ids: dict[str, str], method: str, path: str) -> tuple[str, Any]:
    """A concrete request for the route: existing resources, a body the route accepts."""
    if "/rename" in path:
        name = {"properties": "language", "relations": "system", "mirror": "system_title"}[
            path.split("/")[-3]
        ]
    else:
        name = {"secrets": "s1", "teams": "alpha"}.get(path.split("/")[-2], "")
    identifier = {
        "/v1/actions": "open",
        "/v1/webhooks": "wh",
        "/v1/workflows": "flow",
        "/v1/integration": "ocean",
        "/v1/integrations": "ocean",
        "/v1/blueprints/{blueprint}/scorecards": "sc",
        "/v1/blueprints/{blueprint}/entities": "e1",
        "/v1/blueprints/{blueprint}/entities-history": "e1",
        "/v1/pages": "dash",
    }.get(path.split("/{identifier}")[0], "service")
    url = path.format(
        identifier=identifier,
        blueprint="service",
        name=name,
        run_id=ids["run_id"],
        workflow_run_id=ids[
            "ended_workflow_run_id" if path.endswith("/stream") else "workflow_run_id"
        ],
        node_run_id=ids["node_run_id"],
        migration_id=ids["migration_id"],
        app_id=ids["app_id"],
        user_email="u@example.com",
        webhookKey="nope",
        kind="person",
        ingestId=ids["ingest_id"],
        rest="e1/kind/service",
        page_identifier="dash",
        widget_id="note",
    )
    bodies: dict[tuple[str, str], Any] = {
        ("PUT", "/v1/organization/oidc"): {
            "issuer": "https://idp.example",
            "audience": "portolan",
            "jwksUri": "https://idp.example/jwks",
        },
        ("PUT", "/v1/organization"): {"name": "renamed"},
        ("PATCH", "/v1/organization"): {"settings": {"portalTitle": "Portal"}},
        ("POST", "/v1/organization/secrets"): {"secretName": "s2", "secretValue": "v"},
        ("PATCH", "/v1/organization/secrets/{name}"): {"secretValue": "w"},
        ("POST", "/v1/apps"): {"name": "other"},
        ("PUT", "/v1/apps/{app_id}"): {"name": "renamed"},
        ("POST", "/v1/users/invite"): {"invitee": {"email": "n@example.com"}},
        ("PATCH", "/v1/users/{user_email}"): {"roles": ["Member"]},
        ("POST", "/v1/teams"): {"name": "beta"},
        ("PATCH", "/v1/teams/{name}"): {"description": "d"},
        ("PUT", "/v1/teams/{name}"): {"name": "alpha"},
        ("POST", "/v1/webhooks"): {**WEBHOOK, "identifier": "wh2"},
        ("PUT", "/v1/webhooks/{identifier}"): WEBHOOK,
        ("PATCH", "/v1/webhooks/{identifier}"): {"title": "Renamed"},
        ("POST", "/v1/integration"): {**INTEGRATION, "installationId": "ocean2"},
        ("PATCH", "/v1/integration/{identifier}"): {"version": "1.0.1"},
        ("PATCH", "/v1/integration/{identifier}/config"): {"config": {"resources": []}},
        ("PATCH", "/v1/integration/{identifier}/resync-state"): {"status": "running"},
        ("POST", "/v1/integration/{identifier}/kinds/{kind}/examples"): {"examples": [{"a": 1}]},
        ("POST", "/v1/integration-logs/{ingestId}"): {"logs": [{"message": "hi"}]},
        ("POST", "/v1/integration-metrics/{ingestId}/heartbeat"): {"eventId": "e1"},
        ("POST", "/v1/integration-metrics/{ingestId}/syncMetrics"): {"syncKindsMetrics": []},
        ("PUT", "/v1/integration-metrics/{ingestId}/syncMetrics/resync/{rest}"): {
            "syncKindMetrics": {"eventId": "e1", "kindIdentifier": "service-0"}
        },
        ("POST", "/v1/blueprints/entities/datasource-entities"): {
            "datasource_prefix": "port-ocean/x/",
            "datasource_suffix": "/ocean/exporter",
            "limit": 10,
        },
        ("POST", "/v1/blueprints"): {**SYSTEM, "identifier": "other", "title": "Other"},
        ("PUT", "/v1/blueprints/{identifier}"): SERVICE,
        ("PATCH", "/v1/blueprints/{identifier}"): {"title": "Renamed"},
        ("PATCH", "/v1/blueprints/{identifier}/properties/{name}/rename"): {
            "newPropertyName": "lang"
        },
        ("PATCH", "/v1/blueprints/{identifier}/relations/{name}/rename"): {
            "newRelationIdentifier": "sys"
        },
        ("PATCH", "/v1/blueprints/{identifier}/mirror/{name}/rename"): {"newMirrorName": "st"},
        ("PATCH", "/v1/blueprints/{identifier}/permissions"): {
            "entities": {"register": {"roles": ["Admin"]}}
        },
        ("POST", "/v1/blueprints/{blueprint}/entities"): {"identifier": "e2"},
        ("POST", "/v1/blueprints/{blueprint}/entities/bulk"): {"entities": [{"identifier": "e3"}]},
        ("POST", "/v1/blueprints/{blueprint}/entities/search"): {},
        ("PUT", "/v1/blueprints/{blueprint}/entities/{identifier}"): {
            "properties": {"language": "rust"}
        },
        ("PATCH", "/v1/blueprints/{blueprint}/entities/{identifier}"): {
            "properties": {"language": "go"}
        },
        ("POST", "/v1/blueprints/{blueprint}/bulk/entities/delete"): {"entities": ["e1"]},
        ("POST", "/v1/migrations"): {
            "sourceBlueprint": "service",
            "mapping": {"entity": {"properties": {"language": ".properties.language"}}},
        },
        ("POST", "/v1/entities/search"): {"combinator": "and", "rules": []},
        ("POST", "/v1/entities/aggregate"): {"func": "count"},
        ("POST", "/v1/entities/aggregate-over-time"): {
            "blueprint": "service",
            "timeRange": {"preset": "today"},
            "timeInterval": "hour",
            "measureTimeBy": "$history",
            "aggregationType": "countEntities",
            "func": "count",
        },
        ("POST", "/v1/entities/properties-history"): {
            "entityIdentifier": "e1",
            "blueprintIdentifier": "service",
            "propertyNames": ["language"],
        },
        ("POST", "/v1/blueprints/{blueprint}/scorecards"): {**SCORECARD, "identifier": "sc2"},
        ("PUT", "/v1/blueprints/{blueprint}/scorecards"): [SCORECARD],
        ("PUT", "/v1/blueprints/{blueprint}/scorecards/{identifier}"): SCORECARD,
        ("POST", "/v1/blueprints/{blueprint}/scorecards/{identifier}/dry-run"): SCORECARD,
        ("POST", "/v1/actions"): {**ACTION, "identifier": "other"},
        ("PUT", "/v1/actions/{identifier}"): ACTION,
        ("PATCH", "/v1/actions/{identifier}/permissions"): {"execute": {"roles": ["Admin"]}},
        ("POST", "/v1/actions/{identifier}/runs"): {"properties": {}},
        ("PATCH", "/v1/actions/runs/{run_id}"): {"statusLabel": "halfway"},
        ("PATCH", "/v1/actions/runs/{run_id}/approval"): {"status": "DECLINE"},
        ("POST", "/v1/actions/runs/{run_id}/logs"): {"message": "hello"},
        ("POST", "/v1/actions/runs/claim-pending"): {"installationId": "ocean", "limit": 1},
        ("PATCH", "/v1/actions/runs/ack"): {"runId": ids["run_id"]},
        ("POST", "/v1/workflows/runs/claim-pending"): {"installationId": "ocean", "limit": 1},
        ("PATCH", "/v1/workflows/runs/ack"): {"nodeRunIdentifier": ids["node_run_id"]},
        ("PATCH", "/v1/workflows/nodes/runs/{node_run_id}"): {"status": "IN_PROGRESS"},
        ("POST", "/v1/workflows/nodes/runs/{node_run_id}/logs"): {"logs": [{"message": "x"}]},
        ("POST", "/v1/workflows"): {**WORKFLOW, "identifier": "flow2"},
        ("PUT", "/v1/workflows/{identifier}"): WORKFLOW,
        ("POST", "/v1/workflows/{identifier}/runs"): {"inputs": {}},
        ("POST", "/v1/workflows/nodes/runs/{node_run_id}/responses"): {"button": "approve"},
        ("POST", "/v1/pages"): {"identifier": "dash2"},
        ("PATCH", "/v1/pages/{identifier}"): {"title": "Dash"},
        ("PATCH", "/v1/pages/{page_identifier}/permissions"): {"read": {"roles": ["Member"]}},
        ("POST", "/v1/pages/{page_identifier}/widgets"): {"id": "more", "type": "markdown"},
        ("PATCH", "/v1/pages/{page_identifier}/widgets/{widget_id}"): {"title": "Note"},
    }
    return url, bodies.get((method, path))


async def test_a_member_is_refused_exactly_the_routes_it_does_not_hold(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    ids = await _world(client, db, org)
    member = await app_headers(client, db, org.org_id, ["Member"])
    wrong = []
    for (method, path), holder in sorted(ACCESS.items()):
        if holder == "public":
            continue
        url, body = _call(ids, method, path)
        r = await client.request(method, url, json=body, headers=member)
        if r.status_code == 207:  # a bulk write: each refused entity is its own 403
            errors = r.json()["errors"]
            if r.json()["entities"] or any(e["statusCode"] != 403 for e in errors):
                wrong.append(f"{method} {path}: a member wrote {r.text[:200]}")
            continue
        if holder == "member":
            if r.status_code in (401, 403) or r.status_code >= 500:
                wrong.append(f"{method} {path}: a member got {r.status_code} {r.text[:200]}")
        elif r.status_code != 403 or r.json().get("error") != "missing_permission":
            wrong.append(f"{method} {path} ({holder}): expected 403, got {r.status_code}")
        elif not r.json()["details"]["permission"]:
            wrong.append(f"{method} {path}: 403 without the permission's name")
    assert wrong == [], "\n".join(wrong)


async def test_a_moderator_holds_its_blueprints_routes(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, app: FastAPI
) -> None:
    org = await make_org()
    ids = await _world(client, db, org)
    await add_user(db, org.org_id, "mod@example.com", roles=["service-moderator"])
    moderator = user_headers(app, org.org_id, "mod@example.com")
    wrong = []
    for (method, path), holder in sorted(ACCESS.items()):
        if holder not in ("moderator", "entity") or path == "/v1/blueprints/{identifier}":
            continue
        url, body = _call(ids, method, path)
        r = await client.request(method, url, json=body, headers=moderator)
        if r.status_code in (401, 403) or r.status_code >= 500:
            wrong.append(f"{method} {path}: the moderator got {r.status_code} {r.text[:200]}")
    assert wrong == [], "\n".join(wrong)


# What counts as asking the permission module: a direct call, or the helpers that ask it
# for their route (entity writes through their guard, runs through their checks).
_ASKS = (
    "permissions.",
    "_writer(request, tenant)",
    "_rewrite(",
    "_readable(tenant",
    "_reportable(tenant",
    "principal=tenant.principal",
    "runs.decide(tenant.tx, tenant.principal",
    "_admin(tenant)",
    "claims.may_claim(tenant.principal",
    "integrations.claimer(tenant)",
)


def test_every_tenant_route_asks_the_permission_module(app: FastAPI) -> None:
    silent = []
    for route in iter_routes(app.routes):
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
        if all(ACCESS.get((m, path)) == "public" for m in route.methods):
            continue
        source = inspect.getsource(route.endpoint)
        if not any(marker in source for marker in _ASKS):
            silent.append(f"{sorted(route.methods)} {path}")
    assert silent == []
