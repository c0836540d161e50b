"""Workflows: definitions checked as a whole graph, versions, permissions, tenants, audit,
and runs walked node by node by a real worker against real receivers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.db.database import Database
from tests.conftest import Org, OrgFactory
from tests.receivers import WebhookReceiver
from tests.test_dispatch import SERVICE, add_secret, signing_secret
from tests.test_permissions import add_user, app_headers, user_headers

TRIGGER = {
    "identifier": "trigger",
    "config": {
        "type": "SELF_SERVE_TRIGGER",
        "permissions": {"roles": ["Member"]},
        "userInputs": {
            "properties": {
                "name": {"type": "string", "minLength": 2},
                "environment": {"type": "string", "enum": ["staging", "production"]},
            },
            "required": ["name"],
        },
    },
}


def webhook(identifier: str, url: str, **config: Any) -> dict[str, Any]:
    return {
        "identifier": identifier,
        "title": identifier.title(),
        "config": {"type": "WEBHOOK", "url": url, "method": "POST", **config},
    }


def upsert(identifier: str, mapping: dict[str, Any], **config: Any) -> dict[str, Any]:
    return {
        "identifier": identifier,
        "config": {
            "type": "UPSERT_ENTITY",
            "blueprintIdentifier": "service",
            "mapping": mapping,
            **config,
        },
    }


def condition(identifier: str, **outlets: str) -> dict[str, Any]:
    return {
        "identifier": identifier,
        "config": {
            "type": "CONDITION",
            "outlets": [{"identifier": k, "expression": v} for k, v in outlets.items()],
        },
    }


def link(source: str, target: str, **extra: Any) -> dict[str, Any]:
    return {"sourceIdentifier": source, "targetIdentifier": target, **extra}


def workflow(identifier: str, nodes: list[dict[str, Any]], connections: list[Any]) -> Any:
    return {
        "identifier": identifier,
        "title": identifier.title(),
        "category": "Tests",
        "nodes": [TRIGGER, *nodes],
        "connections": connections,
    }


SIMPLE = workflow(
    "simple",
    [webhook("notify", "http://127.0.0.1:9/notify")],
    [link("trigger", "notify")],
)


async def create(client: httpx.AsyncClient, org: Org, body: Any) -> dict[str, Any]:
    r = await client.post("/v1/workflows", json=body, headers=org.headers)
    assert r.status_code == 201, r.text
    return dict(r.json()["workflow"])


async def start(
    client: httpx.AsyncClient,
    org: Org | dict[str, str],
    identifier: str,
    inputs: dict[str, Any],
    **headers: str,
) -> httpx.Response:
    base = org.headers if isinstance(org, Org) else org
    return await client.post(
        f"/v1/workflows/{identifier}/runs",
        json={"inputs": inputs},
        headers={**base, **headers},
    )


async def run_of(client: httpx.AsyncClient, org: Org, run_id: str) -> dict[str, Any]:
    r = await client.get(f"/v1/workflows/runs/{run_id}", headers=org.headers)
    assert r.status_code == 200, r.text
    return dict(r.json()["workflowRun"])


async def wait_done(
    client: httpx.AsyncClient, org: Org, run_id: str, within: float = 30.0
) -> dict[str, Any]:
    deadline = time.monotonic() + within
    run: dict[str, Any] = {}
    while time.monotonic() < deadline:
        run = await run_of(client, org, run_id)
        if run["status"] == "COMPLETED":
            return run
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} did not complete: {json.dumps(run, default=str)}")


def nodes_of(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["node"]["identifier"]: n for n in run["nodeRuns"]}


def pointers(response: httpx.Response) -> set[str]:
    return {d["pointer"] for d in response.json().get("details") or []}


# ---------------------------------------------------------------------------------------
# Definitions


async def test_a_workflow_is_created_read_listed_replaced_and_deleted(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    created = await create(client, org, SIMPLE)
    assert created["identifier"] == "simple" and created["version"] == 1
    assert created["allowAnyoneToViewRuns"] is True
    assert created["category"] == "Tests"
    assert created["versionIdentifier"].startswith("wfv_")
    r = await client.get("/v1/workflows/simple", headers=org.headers)
    assert r.status_code == 200 and r.json()["workflow"]["nodes"] == SIMPLE["nodes"]
    r = await client.get("/v1/workflows", headers=org.headers)
    assert [w["identifier"] for w in r.json()["workflows"]] == ["simple"]

    changed = copy.deepcopy(SIMPLE)
    changed["title"] = "Changed"
    r = await client.put("/v1/workflows/simple", json=changed, headers=org.headers)
    assert r.status_code == 200, r.text
    assert r.json()["workflow"]["version"] == 2
    assert r.json()["workflow"]["versionIdentifier"] != created["versionIdentifier"]
    assert r.json()["workflow"]["title"] == "Changed"

    r = await client.delete("/v1/workflows/simple", headers=org.headers)
    assert r.status_code == 200, r.text
    for method in ("GET", "PUT", "DELETE"):
        r = await client.request(method, "/v1/workflows/simple", json=SIMPLE, headers=org.headers)
        assert r.status_code == 404 and r.json()["ok"] is False, (method, r.text)


async def test_a_taken_identifier_and_a_mismatched_body_are_refused(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await create(client, org, SIMPLE)
    r = await client.post("/v1/workflows", json=SIMPLE, headers=org.headers)
    assert r.status_code == 409 and r.json()["error"] == "workflow_exists", r.text
    r = await client.put(
        "/v1/workflows/simple", json={**SIMPLE, "identifier": "other"}, headers=org.headers
    )
    assert r.status_code == 422 and r.json()["ok"] is False, r.text
    r = await client.post("/v1/workflows", content=b"[1", headers=org.headers)
    assert r.status_code in (400, 422) and r.json()["ok"] is False


def _invalid_cases() -> list[tuple[str, Any, str, str]]:
    """(name, definition, pointer expected, words expected in its message)."""
    hook = webhook("hook", "http://127.0.0.1:9/h")
    cases: list[tuple[str, Any, str, str]] = [
        ("unknown top field", {**SIMPLE, "owner": "x"}, "/owner", "unknown field"),
        (
            "unknown node field",
            workflow("w", [{**hook, "links": []}], []),
            "/nodes/1/links",
            "unknown field",
        ),
        (
            "unknown config field",
            workflow("w", [webhook("hook", "http://x.test", retries=3)], []),
            "/nodes/1/config/retries",
            "unknown field",
        ),
        (
            "unknown node type",
            workflow("w", [{"identifier": "n", "config": {"type": "TELEPORT"}}], []),
            "/nodes/1/config/type",
            "unknown node type",
        ),
        (
            "missing source and target",
            workflow("w", [hook], [link("ghost", "phantom")]),
            "/connections/0/sourceIdentifier",
            "does not exist",
        ),
        (
            "missing target",
            workflow("w", [hook], [link("trigger", "phantom")]),
            "/connections/0/targetIdentifier",
            "does not exist",
        ),
        (
            "trigger as target",
            workflow("w", [hook], [link("hook", "trigger")]),
            "/connections/0/targetIdentifier",
            "trigger",
        ),
        (
            "two outgoing connections",
            workflow(
                "w",
                [hook, webhook("other", "http://x.test")],
                [link("trigger", "hook"), link("trigger", "other")],
            ),
            "/connections/1",
            "one at most",
        ),
        (
            "two connections from one outlet",
            workflow(
                "w",
                [condition("c", yes="true"), hook, webhook("other", "http://x.test")],
                [
                    link("trigger", "c"),
                    link("c", "hook", sourceOutletIdentifier="yes"),
                    link("c", "other", sourceOutletIdentifier="yes"),
                ],
            ),
            "/connections/2",
            "one at most",
        ),
        (
            "condition connection without an outlet",
            workflow("w", [condition("c", yes="true"), hook], [link("c", "hook")]),
            "/connections/0",
            "sourceOutletIdentifier or fallback",
        ),
        (
            "an outlet the condition lacks",
            workflow(
                "w",
                [condition("c", yes="true"), hook],
                [link("c", "hook", sourceOutletIdentifier="no")],
            ),
            "/connections/0/sourceOutletIdentifier",
            "no outlet",
        ),
        (
            "an outlet on a node without outlets",
            workflow("w", [hook], [link("trigger", "hook", fallback=True)]),
            "/connections/0",
            "no outlets",
        ),
        (
            "a cycle",
            workflow(
                "w",
                [hook, webhook("other", "http://x.test")],
                [link("trigger", "hook"), link("hook", "other"), link("other", "hook")],
            ),
            "/connections/2",
            "cycle",
        ),
        (
            "a self loop",
            workflow("w", [hook], [link("hook", "hook")]),
            "/connections/0",
            "cycle",
        ),
        (
            "jq that does not compile in a template",
            workflow("w", [webhook("hook", "http://x.test", body={"a": "{{ .outputs | }}"})], []),
            "/nodes/1/config/body/a",
            "not a valid jq expression",
        ),
        (
            "jq that does not compile in an outlet",
            workflow("w", [condition("c", yes=".a ==")], []),
            "/nodes/1/config/outlets/0/expression",
            "not a valid jq expression",
        ),
        (
            "a jq module",
            workflow("w", [condition("c", yes='import "x" as $x; $x')], []),
            "/nodes/1/config/outlets/0/expression",
            "modules are not available",
        ),
        (
            "an input that is not JSON Schema",
            {
                **SIMPLE,
                "nodes": [
                    {
                        "identifier": "trigger",
                        "config": {
                            "type": "SELF_SERVE_TRIGGER",
                            "userInputs": {
                                "properties": {"n": {"type": "string", "minLength": -1}}
                            },
                        },
                    }
                ],
                "connections": [],
            },
            "/nodes/0/config/userInputs/properties/n",
            "JSON Schema",
        ),
        (
            "too many nodes",
            workflow("w", [webhook(f"n{i}", "http://x.test") for i in range(60)], []),
            "/nodes",
            "at most 50 nodes",
        ),
        (
            "a template past its length cap",
            workflow(
                "w", [webhook("hook", "http://x.test", body={"a": "{{ . }}" + "x" * 10_001})], []
            ),
            "/nodes/1/config/body/a",
            "at most 10000 characters",
        ),
        (
            "a secret into an entity",
            workflow("w", [upsert("u", {"identifier": '{{ .secrets["t"] }}'})], []),
            "/nodes/1/config/mapping/identifier",
            "secrets go into a WEBHOOK",
        ),
        (
            "a secret into variables",
            workflow("w", [{**hook, "variables": {"t": "{{ .secrets.t }}"}}], []),
            "/nodes/1/variables/t",
            "secrets go into a WEBHOOK",
        ),
        (
            "a missing blueprint",
            workflow(
                "w",
                [
                    {
                        **upsert("u", {}),
                        "config": {**upsert("u", {})["config"], "blueprintIdentifier": "nope"},
                    }
                ],
                [],
            ),
            "/nodes/1/config/blueprintIdentifier",
            "does not exist",
        ),
        (
            "no trigger",
            {"identifier": "w", "nodes": [hook], "connections": []},
            "/nodes",
            "needs a trigger",
        ),
        (
            "a duplicate node",
            workflow("w", [hook, hook], []),
            "/nodes/2/identifier",
            "defined twice",
        ),
    ]
    for kind in ("KAFKA", "AI", "AI_AGENT", "CURSOR_AGENT"):
        cases.append(
            (
                f"{kind} refused",
                workflow("w", [{"identifier": "n", "config": {"type": kind}}], []),
                "/nodes/1/config/type",
                kind,
            )
        )
    return cases


@pytest.mark.parametrize("case", _invalid_cases(), ids=lambda c: c[0])
async def test_an_invalid_graph_is_a_422_naming_the_problem(
    client: httpx.AsyncClient, make_org: OrgFactory, case: tuple[str, Any, str, str]
) -> None:
    _, body, pointer, words = case
    org = await make_org()
    await client.post("/v1/blueprints", json=SERVICE, headers=org.headers)
    r = await client.post("/v1/workflows", json=body, headers=org.headers)
    assert r.status_code == 422, r.text
    assert r.json()["ok"] is False and r.json()["error"] == "invalid_request"
    details = {d["pointer"]: d["message"] for d in r.json()["details"]}
    assert pointer in details, r.text
    assert words in details[pointer], details
    assert (await client.get("/v1/workflows", headers=org.headers)).json()["workflows"] == []


async def test_every_problem_of_a_graph_is_named_at_once(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    body = workflow(
        "w",
        [{"identifier": "k", "config": {"type": "KAFKA"}}, condition("c", yes=".a ==")],
        [link("ghost", "c"), link("c", "trigger", fallback=True)],
    )
    r = await client.post("/v1/workflows", json=body, headers=org.headers)
    assert r.status_code == 422
    assert {
        "/nodes/1/config/type",
        "/nodes/2/config/outlets/0/expression",
        "/connections/0/sourceIdentifier",
        "/connections/1/targetIdentifier",
    } <= pointers(r)


async def test_only_admins_manage_workflows_and_members_read_them(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await create(client, org, SIMPLE)
    member = await app_headers(client, db, org.org_id, ["Member"])
    for method, path in (
        ("POST", "/v1/workflows"),
        ("PUT", "/v1/workflows/simple"),
        ("DELETE", "/v1/workflows/simple"),
    ):
        r = await client.request(
            method, path, json={**SIMPLE, "identifier": "simple"}, headers=member
        )
        assert r.status_code == 403 and r.json()["error"] == "missing_permission", (method, r.text)
        assert r.json()["details"]["permission"] == "workflows.manage"
    assert (await client.get("/v1/workflows/simple", headers=member)).status_code == 200


async def test_another_org_sees_nothing_of_a_workflow_or_its_runs(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    mine, theirs = await make_org(), await make_org()
    await create(client, mine, SIMPLE)
    r = await start(client, mine, "simple", {"name": "api"})
    assert r.status_code == 202, r.text
    run_id = r.json()["workflowRun"]["identifier"]
    assert (await client.get("/v1/workflows", headers=theirs.headers)).json()["workflows"] == []
    for method, path, body in (
        ("GET", "/v1/workflows/simple", None),
        ("PUT", "/v1/workflows/simple", SIMPLE),
        ("DELETE", "/v1/workflows/simple", None),
        ("POST", "/v1/workflows/simple/runs", {"inputs": {"name": "api"}}),
        ("GET", f"/v1/workflows/runs/{run_id}", None),
        ("POST", f"/v1/workflows/runs/{run_id}/cancel", None),
    ):
        r = await client.request(method, path, json=body, headers=theirs.headers)
        assert r.status_code == 404 and r.json()["ok"] is False, (method, path, r.text)
    r = await client.get("/v1/workflows/runs", headers=theirs.headers)
    assert r.json()["workflowRuns"] == []
    # Their own workflow of the same name is theirs alone.
    await create(client, theirs, SIMPLE)
    assert (await run_of(client, mine, run_id))["status"] == "IN_PROGRESS"


async def test_workflow_changes_and_runs_are_in_the_audit_log(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await create(client, org, SIMPLE)
    await client.put("/v1/workflows/simple", json={**SIMPLE, "title": "T"}, headers=org.headers)
    r = await start(client, org, "simple", {"name": "api"})
    run_id = r.json()["workflowRun"]["identifier"]
    await client.post(f"/v1/workflows/runs/{run_id}/cancel", headers=org.headers)
    await client.delete("/v1/workflows/simple", headers=org.headers)
    r = await client.get("/v1/audit-log", headers=org.headers, params={"limit": 100})
    assert r.status_code == 200, r.text
    seen = [(a["resourceType"], a["action"], a["identifier"]) for a in r.json()["audits"]]
    for wanted in (
        ("workflow", "CREATE", "simple"),
        ("workflow", "UPDATE", "simple"),
        ("workflow", "DELETE", "simple"),
        ("workflow-run", "CREATE", run_id),
        ("workflow-run", "UPDATE", run_id),
    ):
        assert wanted in seen, (wanted, seen)


# ---------------------------------------------------------------------------------------
# Starting runs


async def test_a_run_checks_its_inputs_against_the_trigger(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await create(client, org, SIMPLE)
    for inputs, pointer in (
        ({}, "/inputs/name"),
        ({"name": "x"}, "/inputs/name"),
        ({"name": "api", "environment": "moon"}, "/inputs/environment"),
        ({"name": "api", "colour": "red"}, "/inputs/colour"),
    ):
        r = await start(client, org, "simple", inputs)
        assert r.status_code == 422, (inputs, r.text)
        assert pointer in pointers(r), r.text
    r = await client.post(
        "/v1/workflows/simple/runs", json={"inputs": {"name": "api"}, "x": 1}, headers=org.headers
    )
    assert r.status_code == 422 and r.json()["ok"] is False
    r = await client.post(
        "/v1/workflows/simple/runs",
        json={"inputs": {"name": "api"}, "triggerIdentifier": "notify"},
        headers=org.headers,
    )
    assert r.status_code == 422 and "/triggerIdentifier" in pointers(r)
    assert (await client.get("/v1/workflows/runs", headers=org.headers)).json()[
        "workflowRuns"
    ] == []
    r = await start(client, org, "missing", {"name": "api"})
    assert r.status_code == 404


async def test_a_run_records_its_trigger_and_queues_the_next_node(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await create(client, org, SIMPLE)
    r = await start(client, org, "simple", {"name": "api"})
    assert r.status_code == 202, r.text
    run = r.json()["workflowRun"]
    assert run["identifier"].startswith("wfr_") and run["status"] == "IN_PROGRESS"
    assert run["result"] is None
    trigger, notify = run["nodeRuns"]
    assert trigger["node"]["identifier"] == "trigger"
    assert (trigger["status"], trigger["result"]) == ("COMPLETED", "SUCCESS")
    assert trigger["output"] == {"name": "api"}
    assert notify["node"]["identifier"] == "notify" and notify["status"] == "IN_PROGRESS"
    assert notify["identifier"].startswith("wfnr_") and notify["nodeConfigType"] == "WEBHOOK"


async def test_an_idempotency_key_answers_the_first_run(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await create(client, org, SIMPLE)
    first = await start(client, org, "simple", {"name": "api"}, **{"Idempotency-Key": "k1"})
    again = await start(client, org, "simple", {"name": "api"}, **{"Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 202
    assert first.json()["workflowRun"]["identifier"] == again.json()["workflowRun"]["identifier"]
    other = await start(client, org, "simple", {"name": "web"}, **{"Idempotency-Key": "k1"})
    assert other.status_code == 409 and other.json()["error"] == "idempotency_key_reused"
    blank = await start(client, org, "simple", {"name": "web"}, **{"Idempotency-Key": " "})
    assert blank.status_code == 422
    r = await client.get("/v1/workflows/runs", headers=org.headers)
    assert len(r.json()["workflowRuns"]) == 1


async def test_who_may_start_a_run_is_the_triggers_permissions(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, app: FastAPI
) -> None:
    org = await make_org()
    await create(client, org, SIMPLE)  # Members may run it
    closed = copy.deepcopy(SIMPLE)
    closed["identifier"] = "closed"
    closed["nodes"][0]["config"].pop("permissions")  # Admins only
    await create(client, org, closed)
    teams = copy.deepcopy(closed)
    teams["identifier"] = "teams"
    teams["nodes"][0]["config"]["permissions"] = {"teams": ["platform"]}
    await create(client, org, teams)
    await add_user(db, org.org_id, "dev@example.com", roles=["Member"])
    await add_user(db, org.org_id, "ops@example.com", roles=["Member"], teams=["platform"])
    dev = user_headers(app, org.org_id, "dev@example.com")
    ops = user_headers(app, org.org_id, "ops@example.com")
    assert (await start(client, dev, "simple", {"name": "api"})).status_code == 202
    for caller, name, wanted in (
        (dev, "closed", 403),
        (ops, "closed", 403),
        (dev, "teams", 403),
        (ops, "teams", 202),
        (org.headers, "closed", 202),
    ):
        r = await start(client, caller, name, {"name": "api"})
        assert r.status_code == wanted, (name, r.text)
        if wanted == 403:
            assert r.json()["details"]["permission"] == "workflows.execute"


async def test_runs_are_read_by_whom_the_workflow_lets(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, app: FastAPI
) -> None:
    org = await make_org()
    private = {**copy.deepcopy(SIMPLE), "identifier": "private", "allowAnyoneToViewRuns": False}
    await create(client, org, SIMPLE)
    await create(client, org, private)
    await add_user(db, org.org_id, "a@example.com", roles=["Member"])
    await add_user(db, org.org_id, "b@example.com", roles=["Member"])
    a = user_headers(app, org.org_id, "a@example.com")
    b = user_headers(app, org.org_id, "b@example.com")
    mine = (await start(client, a, "private", {"name": "api"})).json()["workflowRun"]["identifier"]
    open_run = (await start(client, a, "simple", {"name": "api"})).json()["workflowRun"]
    assert (await client.get(f"/v1/workflows/runs/{mine}", headers=a)).status_code == 200
    assert (await client.get(f"/v1/workflows/runs/{mine}", headers=b)).status_code == 404
    r = await client.get(f"/v1/workflows/runs/{open_run['identifier']}", headers=b)
    assert r.status_code == 200
    listed = (await client.get("/v1/workflows/runs", headers=b)).json()["workflowRuns"]
    assert [x["identifier"] for x in listed] == [open_run["identifier"]]
    r = await client.post(f"/v1/workflows/runs/{open_run['identifier']}/cancel", headers=b)
    assert r.status_code == 403, r.text
    r = await client.get(
        "/v1/workflows/runs", headers=org.headers, params={"workflowIdentifier": "private"}
    )
    assert [x["identifier"] for x in r.json()["workflowRuns"]] == [mine]


async def test_a_cancelled_run_runs_no_further_node(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    with WebhookReceiver(await signing_secret(client, org)) as receiver:
        body = workflow("w", [webhook("hook", receiver.url)], [link("trigger", "hook")])
        await create(client, org, body)
        run_id = (await start(client, org, "w", {"name": "api"})).json()["workflowRun"][
            "identifier"
        ]
        r = await client.post(f"/v1/workflows/runs/{run_id}/cancel", headers=org.headers)
        assert r.status_code == 200, r.text
        run = r.json()["workflowRun"]
        assert (run["status"], run["result"]) == ("COMPLETED", "CANCELLED")
        assert nodes_of(run)["hook"]["result"] == "CANCELLED"
        r = await client.post(f"/v1/workflows/runs/{run_id}/cancel", headers=org.headers)
        assert r.status_code == 409 and r.json()["error"] == "run_ended"
        assert (
            await client.post("/v1/workflows/runs/wfr_nope/cancel", headers=org.headers)
        ).status_code == 404
        # A worker finds nothing to do; a run started after is delivered (the worker is live).
        start_worker()
        later = (await start(client, org, "w", {"name": "web"})).json()["workflowRun"]["identifier"]
        await wait_done(client, org, later)
        assert len(receiver.deliveries) == 1


# ---------------------------------------------------------------------------------------
# Runs, end to end


async def test_a_run_walks_webhook_condition_and_upsert_with_data_flowing(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    await client.post("/v1/blueprints", json=SERVICE, headers=org.headers)
    await add_secret(client, org, "API_TOKEN", "tok-9f8e7d6c5b4a")
    with WebhookReceiver(await signing_secret(client, org)) as receiver:
        receiver.respond(200, {"replicas": 3, "echo": "tok-9f8e7d6c5b4a"})
        body = workflow(
            "provision",
            [
                webhook(
                    "create_repo",
                    receiver.url + "/repos/{{ .outputs.trigger.name }}",
                    headers={"Authorization": 'Bearer {{ .secrets["API_TOKEN"] }}'},
                    body={
                        "name": "{{ .outputs.trigger.name }}",
                        "run": "{{ .workflowRun.identifier }}",
                        "by": "{{ .workflowRun.trigger.by.userId }}",
                    },
                ),
                condition("is_prod", prod='.outputs.trigger.environment == "production"'),
                upsert(
                    "register",
                    {
                        "identifier": "{{ .outputs.trigger.name }}",
                        "title": "{{ .outputs.trigger.name | ascii_upcase }}",
                        "properties": {
                            "tier": "prod",
                            "replicas": '{{ .outputs["create_repo"].response.data.replicas }}',
                        },
                    },
                ),
                {
                    **webhook(
                        "notify",
                        receiver.url + "/notify",
                        body={"t": "{{ .outputs.register.entity }}"},
                    ),
                },
            ],
            [
                link("trigger", "create_repo"),
                link("create_repo", "is_prod"),
                link("is_prod", "register", sourceOutletIdentifier="prod"),
                link("is_prod", "notify", fallback=True),
            ],
        )
        body["nodes"][3]["variables"] = {
            "entity": "{{ .result.response.data.identifier }}",
            "replicas": "{{ .outputs.create_repo.response.data.replicas }}",
        }
        await create(client, org, body)
        start_worker()
        prod = (
            await start(client, org, "provision", {"name": "api", "environment": "production"})
        ).json()
        staging = (
            await start(client, org, "provision", {"name": "web", "environment": "staging"})
        ).json()
        run = await wait_done(client, org, prod["workflowRun"]["identifier"])
        other = await wait_done(client, org, staging["workflowRun"]["identifier"])

    assert run["result"] == "SUCCESS", json.dumps(run, default=str)
    assert [n["node"]["identifier"] for n in run["nodeRuns"]] == [
        "trigger",
        "create_repo",
        "is_prod",
        "register",
    ]
    nodes = nodes_of(run)
    assert all(n["result"] == "SUCCESS" and n["completedAt"] for n in run["nodeRuns"])
    assert nodes["is_prod"]["output"] == {"selectedOutlet": {"identifier": "prod"}}
    assert nodes["register"]["output"] == {"entity": "api", "replicas": 3}
    assert nodes["create_repo"]["output"]["response"]["status"] == 200
    assert nodes["create_repo"]["nodeRunLogs"], nodes["create_repo"]
    # The secret reached the receiver, and nothing a reader sees holds it.
    first = next(d for d in receiver.deliveries if d.path.startswith("/repos/api"))
    assert first.headers["authorization"] == "Bearer tok-9f8e7d6c5b4a"
    assert first.body["run"] == run["identifier"]
    assert first.headers["webhook-id"] == nodes["create_repo"]["identifier"]
    assert "tok-9f8e7d6c5b4a" not in json.dumps(run, default=str)
    r = await client.get("/v1/blueprints/service/entities/api", headers=org.headers)
    assert r.status_code == 200, r.text
    entity = r.json()["entity"]
    assert entity["title"] == "API" and entity["properties"]["replicas"] == 3

    assert [n["node"]["identifier"] for n in other["nodeRuns"]] == [
        "trigger",
        "create_repo",
        "is_prod",
        "notify",
    ]
    assert nodes_of(other)["is_prod"]["output"] == {"selectedOutlet": None}
    r = await client.get("/v1/blueprints/service/entities/web", headers=org.headers)
    assert r.status_code == 404


async def test_a_failed_node_ends_the_run_unless_it_continues(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    with WebhookReceiver(await signing_secret(client, org)) as receiver:
        receiver.respond(400, {"message": "bad"})
        stops = workflow(
            "stops",
            [webhook("a", receiver.url + "/a"), webhook("b", receiver.url + "/b")],
            [link("trigger", "a"), link("a", "b")],
        )
        goes_on = workflow(
            "goes_on",
            [
                webhook("a", receiver.url + "/a", onFailure="continue"),
                webhook("b", "http://127.0.0.1:9/b"),
            ],
            [link("trigger", "a"), link("a", "b")],
        )
        goes_on["nodes"][2] = upsert("b", {"identifier": "x"})
        goes_on["nodes"][2]["config"]["blueprintIdentifier"] = "service"
        await client.post("/v1/blueprints", json=SERVICE, headers=org.headers)
        await create(client, org, stops)
        await create(client, org, goes_on)
        start_worker()
        first = (await start(client, org, "stops", {"name": "api"})).json()["workflowRun"]
        second = (await start(client, org, "goes_on", {"name": "api"})).json()["workflowRun"]
        stopped = await wait_done(client, org, first["identifier"])
        continued = await wait_done(client, org, second["identifier"])
    assert stopped["result"] == "FAILED"
    assert [n["node"]["identifier"] for n in stopped["nodeRuns"]] == ["trigger", "a"]
    assert "400" in nodes_of(stopped)["a"]["output"]["error"]["message"]
    assert continued["result"] == "SUCCESS"
    a = nodes_of(continued)["a"]
    assert a["result"] == "FAILED" and "400" in a["output"]["error"]["message"]
    assert nodes_of(continued)["b"]["result"] == "SUCCESS"


async def test_a_receivers_503s_are_retried_and_the_node_sent_with_one_id(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    with WebhookReceiver(await signing_secret(client, org)) as receiver:
        receiver.fail_next(3, 503)
        await create(
            client, org, workflow("w", [webhook("hook", receiver.url)], [link("trigger", "hook")])
        )
        start_worker()
        run_id = (await start(client, org, "w", {"name": "api"})).json()["workflowRun"][
            "identifier"
        ]
        run = await wait_done(client, org, run_id)
    assert run["result"] == "SUCCESS", run
    hook = nodes_of(run)["hook"]
    assert hook["attempts"] == 4
    assert {d.run_id for d in receiver.deliveries} == {hook["identifier"]}
    assert sum("503" in log["message"] for log in hook["nodeRunLogs"]) == 3


async def test_a_run_keeps_the_version_it_started_on(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    with WebhookReceiver(await signing_secret(client, org)) as receiver:
        first = workflow("w", [webhook("hook", receiver.url + "/v1")], [link("trigger", "hook")])
        created = await create(client, org, first)
        run_id = (await start(client, org, "w", {"name": "api"})).json()["workflowRun"][
            "identifier"
        ]
        second = workflow("w", [webhook("hook", receiver.url + "/v2")], [link("trigger", "hook")])
        r = await client.put("/v1/workflows/w", json=second, headers=org.headers)
        assert r.status_code == 200
        start_worker()
        run = await wait_done(client, org, run_id)
        newer = (await start(client, org, "w", {"name": "api"})).json()["workflowRun"]["identifier"]
        await wait_done(client, org, newer)
        await client.delete("/v1/workflows/w", headers=org.headers)
        kept = await run_of(client, org, run_id)
    assert run["workflow"]["versionIdentifier"] == created["versionIdentifier"]
    assert sorted(d.path for d in receiver.deliveries) == ["/v1", "/v2"]
    assert kept["result"] == "SUCCESS"  # the run and its version outlive the workflow


async def test_an_entity_is_written_only_where_the_starter_may(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    start_worker: Callable[..., Settings],
    db: Database,
) -> None:
    org = await make_org()
    await client.post("/v1/blueprints", json=SERVICE, headers=org.headers)
    await create(
        client,
        org,
        workflow(
            "w",
            [upsert("u", {"identifier": "{{ .outputs.trigger.name }}"})],
            [link("trigger", "u")],
        ),
    )
    member = await app_headers(client, db, org.org_id, ["Member"])
    start_worker()
    run_id = (await start(client, member, "w", {"name": "api"})).json()["workflowRun"]["identifier"]
    run = await wait_done(client, org, run_id)
    assert run["result"] == "FAILED"
    assert "could not be written" in nodes_of(run)["u"]["output"]["error"]["message"]
    r = await client.get("/v1/blueprints/service/entities/api", headers=org.headers)
    assert r.status_code == 404


async def test_an_integrations_node_run_claim_is_checked_and_finds_none_when_none_waits(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    """Ocean's actions processor also asks for workflow node runs: with none waiting the
    answer is empty, after the checks of an action runs' claim (the claims themselves:
    tests/test_workflow_integrations.py)."""
    org, other = await make_org(), await make_org()
    r = await client.post("/v1/integration", json={"installationId": "ocean"}, headers=org.headers)
    assert r.status_code == 201, r.text
    body = {"installationId": "ocean", "limit": 10, "visibilityTimeoutMs": 5000}
    r = await client.post("/v1/workflows/runs/claim-pending", json=body, headers=org.headers)
    assert r.status_code == 200, r.text
    assert r.json() == {"ok": True, "nodeRuns": []}
    member = await app_headers(client, db, org.org_id, ["Member"])
    r = await client.post("/v1/workflows/runs/claim-pending", json=body, headers=member)
    assert r.status_code == 403 and r.json()["error"] == "missing_permission"
    # Another org has no such integration.
    r = await client.post("/v1/workflows/runs/claim-pending", json=body, headers=other.headers)
    assert r.status_code == 404 and r.json()["error"] == "integration_not_found"
    r = await client.post(
        "/v1/workflows/runs/claim-pending", json={**body, "limit": 0}, headers=org.headers
    )
    assert r.status_code == 422 and r.json()["ok"] is False


async def test_one_orgs_workflow_backlog_does_not_hold_up_another_orgs_nodes(
    client: httpx.AsyncClient, make_org: OrgFactory, settings: Settings, db: Database
) -> None:
    """As for action runs: an org with its share of node runs in flight waits in the
    outbox; another org's node run is handed to the workers in the same pass."""
    from arq import create_pool
    from arq.connections import RedisSettings

    from app.workflows.relay import relay_once

    noisy, quiet = await make_org(), await make_org()
    for org in (noisy, quiet):
        await create(client, org, SIMPLE)
    for _ in range(6):
        r = await start(client, noisy, "simple", {"name": "api"})
        assert r.status_code in (200, 201, 202), r.text
    r = await start(client, quiet, "simple", {"name": "api"})
    assert r.status_code in (200, 201, 202), r.text

    async def relayed(org: Org) -> int:
        async with db.system() as tx:
            return int(
                await tx.fetchval(
                    "SELECT count(*) FROM workflow_outbox WHERE org_id = $1 "
                    "AND relayed_at IS NOT NULL",
                    org.org_id,
                )
            )

    queue = f"portolan-test:wf-fair-{time.monotonic_ns()}"
    pool = await create_pool(
        RedisSettings.from_dsn(settings.redis_url or ""), default_queue_name=queue
    )
    try:
        await relay_once(db, pool, requeue_seconds=60, org_cap=2)
        assert (await relayed(noisy), await relayed(quiet)) == (2, 1)
        await relay_once(db, pool, requeue_seconds=60, org_cap=2)
        assert await relayed(noisy) == 2  # its two are still in flight
    finally:
        await pool.delete(queue)
        await pool.aclose()
