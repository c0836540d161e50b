"""Action definitions: Port's routes and shapes, definitions that could not run are 422s
naming the problem, Port's list filters, and tenancy."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import Org, OrgFactory

SERVICE = {
    "identifier": "service",
    "title": "Service",
    "schema": {
        "properties": {
            "tier": {"type": "string"},
            "expires": {"type": "string", "format": "timer"},
        }
    },
}

DEPLOY = {
    "identifier": "deploy",
    "title": "Deploy",
    "icon": "Rocket",
    "trigger": {
        "type": "self-service",
        "operation": "DAY-2",
        "blueprintIdentifier": "service",
        "userInputs": {
            "properties": {
                "version": {"type": "string", "pattern": "^v[0-9]+$"},
                "target": {"type": "string", "format": "entity", "blueprint": "service"},
                "dryRun": {"type": "boolean", "default": False},
            },
            "required": ["version"],
            "order": ["version", "target", "dryRun"],
        },
        "condition": {
            "type": "SEARCH",
            "combinator": "and",
            "rules": [{"property": "tier", "operator": "=", "value": "1"}],
        },
    },
    "invocationMethod": {
        "type": "GITHUB",
        "org": "acme",
        "repo": "deployer",
        "workflow": "deploy.yml",
        "workflowInputs": {"version": "{{ .inputs.version }}", "run": "{{ .run.id }}"},
    },
    "requiredApproval": {"type": "ANY"},
}

NOTIFY = {
    "identifier": "notify-on-change",
    "trigger": {
        "type": "automation",
        "event": {"type": "ENTITY_UPDATED", "blueprintIdentifier": "service"},
        "condition": {
            "type": "JQ",
            "expressions": [".diff.before.properties.tier != .diff.after.properties.tier"],
            "combinator": "and",
        },
    },
    "invocationMethod": {
        "type": "WEBHOOK",
        "url": "https://hooks.example.com/changes",
        "body": {"entity": "{{ .event.context.entityIdentifier }}"},
    },
    "publish": False,
}


async def _catalog(client: httpx.AsyncClient, org: Org) -> None:
    r = await client.post("/v1/blueprints", json=SERVICE, headers=org.headers)
    assert r.status_code == 201, r.text


async def test_actions_in_ports_shapes(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    org = await make_org()
    await _catalog(client, org)
    r = await client.post("/v1/actions", json=DEPLOY, headers=org.headers)
    assert r.status_code == 201, r.text
    action = r.json()["action"]
    assert action["identifier"] == "deploy" and action["publish"] is True
    assert action["trigger"] == DEPLOY["trigger"]
    assert action["invocationMethod"] == DEPLOY["invocationMethod"]
    assert action["requiredApproval"] == {"type": "ANY"}
    for key in ("createdAt", "createdBy", "updatedAt", "updatedBy"):
        assert action[key]
    r = await client.post("/v1/actions", json=DEPLOY, headers=org.headers)
    assert r.status_code == 409 and r.json()["ok"] is False
    r = await client.post("/v1/actions", json=NOTIFY, headers=org.headers)
    assert r.status_code == 201, r.text
    r = await client.get("/v1/actions/deploy", headers=org.headers)
    assert r.status_code == 200 and r.json()["action"]["title"] == "Deploy"
    r = await client.put(
        "/v1/actions/deploy", json={**DEPLOY, "title": "Ship it"}, headers=org.headers
    )
    assert r.status_code == 200 and r.json()["action"]["title"] == "Ship it"

    async def listed(**params: Any) -> list[str]:
        r = await client.get("/v1/actions", params=params, headers=org.headers)
        assert r.status_code == 200, r.text
        return [a["identifier"] for a in r.json()["actions"]]

    assert await listed() == ["deploy", "notify-on-change"]
    assert await listed(trigger_type="automation") == ["notify-on-change"]
    assert await listed(published="false") == ["notify-on-change"]
    assert await listed(operation=["DAY-2"]) == ["deploy"]
    assert await listed(blueprint_identifier=["service"]) == ["deploy", "notify-on-change"]
    assert await listed(action_identifier=["deploy", "nope"]) == ["deploy"]
    r = await client.delete("/v1/actions/deploy", headers=org.headers)
    assert r.status_code == 200 and r.json() == {"ok": True}
    r = await client.get("/v1/actions/deploy", headers=org.headers)
    assert r.status_code == 404 and r.json()["error"] == "not_found"


async def test_a_definition_that_could_not_run_is_a_422_naming_it(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _catalog(client, org)

    def trigger(**changes: Any) -> dict[str, Any]:
        return {**DEPLOY, "trigger": {**DEPLOY["trigger"], **changes}}  # type: ignore[dict-item]

    def inputs(**props: Any) -> dict[str, Any]:
        return trigger(userInputs={"properties": props})

    def method(**changes: Any) -> dict[str, Any]:
        return {**DEPLOY, "invocationMethod": {**DEPLOY["invocationMethod"], **changes}}  # type: ignore[dict-item]

    cases = [
        ({**DEPLOY, "identifier": ".."}, "/identifier"),
        (trigger(operation="LAUNCH"), "/trigger/operation"),
        (trigger(blueprintIdentifier="ghost"), "/trigger/blueprintIdentifier"),
        (inputs(x={"type": "date"}), "/trigger/userInputs/properties/x/type"),
        (
            inputs(x={"type": "string", "format": "colour"}),
            "/trigger/userInputs/properties/x/format",
        ),
        (
            inputs(x={"type": "string", "format": "entity", "blueprint": "ghost"}),
            "/trigger/userInputs/properties/x/blueprint",
        ),
        (
            trigger(userInputs={"properties": {}, "required": ["missing"]}),
            "/trigger/userInputs/required/0",
        ),
        (
            trigger(
                condition={
                    "type": "SEARCH",
                    "combinator": "and",
                    "rules": [{"property": "nope", "operator": "=", "value": 1}],
                }
            ),
            "/trigger/condition/rules/0/property",
        ),
        (method(type="KAFKA"), "/invocationMethod/type"),
        (method(repo=None), "/invocationMethod/repo"),
        (
            method(workflowInputs={"v": "{{ .inputs.version | }}"}),
            "/invocationMethod/workflowInputs/v",
        ),
        (
            {**NOTIFY, "invocationMethod": {"type": "WEBHOOK", "url": "ftp://x"}},
            "/invocationMethod/url",
        ),
        (
            {**NOTIFY, "invocationMethod": {"type": "WEBHOOK", "url": "https://x", "agent": True}},
            "/invocationMethod/agent",
        ),
        (
            {
                **NOTIFY,
                "trigger": {
                    **NOTIFY["trigger"],
                    "condition": {"type": "JQ", "expressions": ["..."]},
                },
            },  # type: ignore[dict-item]
            "/trigger/condition/expressions/0",
        ),
        (
            {
                **NOTIFY,
                "trigger": {
                    "type": "automation",
                    "event": {
                        "type": "TIMER_PROPERTY_EXPIRED",
                        "blueprintIdentifier": "service",
                        "propertyIdentifier": "tier",
                    },
                },
            },
            "/trigger/event/propertyIdentifier",
        ),
        ({**DEPLOY, "requiredApproval": "yes"}, "/requiredApproval"),
    ]
    for body, pointer in cases:
        r = await client.post("/v1/actions", json=body, headers=org.headers)
        assert r.status_code == 422, (pointer, r.text)
        assert pointer in [d["pointer"] for d in r.json()["details"]], (pointer, r.text)
    r = await client.get("/v1/actions", headers=org.headers)
    assert r.json()["actions"] == []


async def test_actions_never_cross_tenants(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    ours, theirs = await make_org(), await make_org()
    await _catalog(client, ours)
    r = await client.post("/v1/actions", json=DEPLOY, headers=ours.headers)
    assert r.status_code == 201, r.text
    assert (await client.get("/v1/actions", headers=theirs.headers)).json()["actions"] == []
    for method in ("get", "put", "delete"):
        r = await client.request(
            method,
            "/v1/actions/deploy",
            json=DEPLOY if method == "put" else None,
            headers=theirs.headers,
        )
        assert r.status_code in (404, 422), (method, r.text)
    # Their own blueprint is what their definitions are checked against.
    r = await client.post("/v1/actions", json=DEPLOY, headers=theirs.headers)
    assert r.status_code == 422 and "/trigger/blueprintIdentifier" in r.text


async def test_automations_are_listed_by_their_trigger_event(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _catalog(client, org)
    on_run = {
        "identifier": "on-deploy-run",
        "trigger": {
            "type": "automation",
            "event": {"type": "RUN_UPDATED", "actionIdentifier": "deploy"},
        },
        "invocationMethod": {"type": "WEBHOOK", "url": "https://hooks.example.com/runs"},
    }
    for body in (DEPLOY, NOTIFY, on_run):
        r = await client.post("/v1/actions", json=body, headers=org.headers)
        assert r.status_code == 201, r.text

    async def listed(params: list[tuple[str, str]]) -> list[str]:
        r = await client.get("/v1/actions", params=params, headers=org.headers)
        assert r.status_code == 200, r.text
        return [a["identifier"] for a in r.json()["actions"]]

    assert await listed([("trigger_event", "ENTITY_UPDATED")]) == ["notify-on-change"]
    assert await listed(
        [("trigger_event", "ENTITY_UPDATED"), ("trigger_event", "RUN_UPDATED")]
    ) == ["notify-on-change", "on-deploy-run"]
    assert await listed([("trigger_event_action_identifier", "deploy")]) == ["on-deploy-run"]
    assert await listed([("trigger_event_action_identifier", "other")]) == []
    r = await client.get("/v1/actions", params={"trigger_event": "SOMETHING"}, headers=org.headers)
    assert r.status_code == 422 and r.json()["ok"] is False
