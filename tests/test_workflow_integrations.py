"""INTEGRATION_ACTION workflow nodes: rendered by the worker, claimed, acknowledged and
reported on by the integration (Ocean's routes and shapes), then the run moves on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.db.database import Database
from tests.conftest import Org, OrgFactory
from tests.receivers import WebhookReceiver
from tests.test_dispatch import signing_secret
from tests.test_permissions import app_headers
from tests.test_workflows import create, link, nodes_of, run_of, start, wait_done, webhook, workflow

INSTALLATION = "gh-ocean"
RESERVED = {"x-port-reserved-usage": "true"}


def integration(identifier: str = "gh", **config: Any) -> dict[str, Any]:
    return {
        "identifier": identifier,
        "title": "Dispatch",
        "config": {
            "type": "INTEGRATION_ACTION",
            "installationId": INSTALLATION,
            "integrationProvider": "github-ocean",
            "integrationInvocationType": "dispatch_workflow",
            "integrationActionExecutionProperties": {
                "org": "acme",
                "repo": "{{ .outputs.trigger.name }}",
                "workflow": "deploy.yml",
                "workflowInputs": {"environment": "{{ .outputs.trigger.environment }}"},
                "reportWorkflowStatus": True,
            },
            **config,
        },
    }


async def install(client: httpx.AsyncClient, org: Org) -> None:
    r = await client.post(
        "/v1/integration",
        json={"installationId": INSTALLATION, "installationAppType": "github-ocean"},
        headers=org.headers,
    )
    assert r.status_code == 201, r.text


async def claim(
    client: httpx.AsyncClient, headers: dict[str, str], **extra: Any
) -> list[dict[str, Any]]:
    body = {"installationId": INSTALLATION, "limit": 10, "visibilityTimeoutMs": 60_000, **extra}
    r = await client.post(
        "/v1/workflows/runs/claim-pending", json=body, headers={**headers, **RESERVED}
    )
    assert r.status_code == 200, r.text
    found: list[dict[str, Any]] = r.json()["nodeRuns"]
    return found


async def claim_one(
    client: httpx.AsyncClient, headers: dict[str, str], within: float = 15.0, **extra: Any
) -> dict[str, Any]:
    """The worker renders the node first: claim until it is there."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        found = await claim(client, headers, **extra)
        if found:
            assert len(found) == 1, found
            return found[0]
        await asyncio.sleep(0.05)
    raise AssertionError("no node run became claimable")


async def ack(client: httpx.AsyncClient, headers: dict[str, str], node_run: str) -> httpx.Response:
    return await client.patch(
        "/v1/workflows/runs/ack",
        json={"nodeRunIdentifier": node_run},
        headers={**headers, **RESERVED},
    )


async def report(
    client: httpx.AsyncClient, headers: dict[str, str], node_run: str, body: Any
) -> httpx.Response:
    return await client.patch(f"/v1/workflows/nodes/runs/{node_run}", json=body, headers=headers)


async def wait_claimable(client: httpx.AsyncClient, org: Org, run_id: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        shown = nodes_of(await run_of(client, org, run_id)).get("gh")
        if shown is not None and (shown.get("integration") or {}).get("state") == "claimable":
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the node run did not become claimable")


def refused(r: httpx.Response, status: int, error: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["ok"] is False and body["error"] == error, body


async def test_a_node_is_claimed_acknowledged_reported_and_the_run_moves_on(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    await install(client, org)
    with WebhookReceiver(await signing_secret(client, org)) as receiver:
        gh = {**integration(), "variables": {"url": "{{ .result.workflowRunUrl }}"}}
        after = webhook("after", receiver.url + "/after", body={"url": "{{ .outputs.gh.url }}"})
        await create(
            client,
            org,
            workflow("ship", [gh, after], [link("trigger", "gh"), link("gh", "after")]),
        )
        start_worker()
        r = await start(client, org, "ship", {"name": "billing", "environment": "staging"})
        run_id = r.json()["workflowRun"]["identifier"]
        node = await claim_one(client, org.headers)
        # What the integration is handed: Ocean's WorkflowNodeRun, its templates rendered.
        assert node["status"] == "IN_PROGRESS" and node["nodeUid"] == "ship/gh"
        assert node["config"] == {
            "type": "INTEGRATION_ACTION",
            "installationId": INSTALLATION,
            "integrationProvider": "github-ocean",
            "integrationInvocationType": "dispatch_workflow",
            "integrationActionExecutionProperties": {
                "org": "acme",
                "repo": "billing",
                "workflow": "deploy.yml",
                "workflowInputs": {"environment": "staging"},
                "reportWorkflowStatus": True,
            },
        }
        assert node["node"]["config"] == node["config"]
        assert await claim(client, org.headers) == []  # held by this claim
        r = await ack(client, org.headers, node["identifier"])
        assert r.status_code == 200, r.text
        refused(await ack(client, org.headers, node["identifier"]), 409, "run_already_acknowledged")
        link_url = "https://github.com/acme/billing/actions/runs/77"
        r = await report(
            client,
            org.headers,
            node["identifier"],
            {
                "status": "IN_PROGRESS",
                "externalRunId": "77",
                "output": {"workflowRunUrl": link_url},
                "links": [link_url],
                "statusLabel": {"text": "Running"},
            },
        )
        assert r.status_code == 200, r.text
        r = await client.post(
            f"/v1/workflows/nodes/runs/{node['identifier']}/logs",
            json={"logs": [{"level": "WARN", "message": "queued on GitHub"}]},
            headers=org.headers,
        )
        assert r.status_code == 200, r.text
        r = await client.get(
            "/v1/workflows/nodes/runs",
            params={"external_run_id": "77", "include": "nodeConfig"},
            headers={**org.headers, **RESERVED},
        )
        assert r.status_code == 200, r.text
        (found,) = r.json()["nodeRuns"]
        assert found["identifier"] == node["identifier"] and found["node"]["config"]
        shown = nodes_of(await run_of(client, org, run_id))["gh"]
        assert shown["status"] == "IN_PROGRESS" and shown["externalRunId"] == "77"
        assert shown["links"] == [link_url] and shown["statusLabel"] == "Running"
        assert shown["integration"]["state"] == "acknowledged"
        assert {"level": "WARNING", "message": "queued on GitHub"}.items() <= next(
            line for line in shown["nodeRunLogs"] if line["message"] == "queued on GitHub"
        ).items()
        r = await report(
            client,
            org.headers,
            node["identifier"],
            {"status": "COMPLETED", "result": "SUCCESS", "output": {"conclusion": "success"}},
        )
        assert r.status_code == 200, r.text
        run = await wait_done(client, org, run_id)
        delivered = await receiver.wait_for(1)
    assert run["result"] == "SUCCESS", run
    gh_run = nodes_of(run)["gh"]
    assert gh_run["result"] == "SUCCESS" and gh_run["output"] == {"url": link_url}
    assert delivered[0].body["url"] == link_url
    refused(
        await report(client, org.headers, node["identifier"], {"status": "IN_PROGRESS"}),
        409,
        "node_run_ended",
    )


@pytest.mark.parametrize(
    ("result", "on_failure", "run_result"),
    [
        ("FAILED", "terminate", "FAILED"),
        ("FAILED", "continue", "SUCCESS"),
        ("CANCELLED", "terminate", "CANCELLED"),
    ],
)
async def test_a_reported_failure_ends_the_run_as_the_node_says(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    start_worker: Callable[..., Settings],
    result: str,
    on_failure: str,
    run_result: str,
) -> None:
    org = await make_org()
    await install(client, org)
    await create(
        client, org, workflow("ship", [integration(onFailure=on_failure)], [link("trigger", "gh")])
    )
    start_worker()
    run_id = (await start(client, org, "ship", {"name": "billing"})).json()["workflowRun"][
        "identifier"
    ]
    node = await claim_one(client, org.headers)
    assert (await ack(client, org.headers, node["identifier"])).status_code == 200
    r = await report(
        client, org.headers, node["identifier"], {"status": "COMPLETED", "result": result}
    )
    assert r.status_code == 200, r.text
    run = await wait_done(client, org, run_id)
    assert run["result"] == run_result
    assert nodes_of(run)["gh"]["result"] == result


async def test_a_claim_not_acknowledged_in_time_is_claimed_again(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    await install(client, org)
    await create(client, org, workflow("ship", [integration()], [link("trigger", "gh")]))
    start_worker()
    await start(client, org, "ship", {"name": "billing"})
    first = await claim_one(client, org.headers, visibilityTimeoutMs=200)
    # Excluded by its node uid: the integration has no room for it now.
    await asyncio.sleep(0.3)
    assert await claim(client, org.headers, exclude=["ship/gh"]) == []
    again = await claim_one(client, org.headers)
    assert again["identifier"] == first["identifier"]
    assert (await ack(client, org.headers, again["identifier"])).status_code == 200


async def test_a_cancelled_run_hands_nothing_on_and_refuses_reports(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    await install(client, org)
    await create(client, org, workflow("ship", [integration()], [link("trigger", "gh")]))
    start_worker()
    run_id = (await start(client, org, "ship", {"name": "billing"})).json()["workflowRun"][
        "identifier"
    ]
    node = await claim_one(client, org.headers, visibilityTimeoutMs=100)
    r = await client.post(f"/v1/workflows/runs/{run_id}/cancel", headers=org.headers)
    assert r.status_code == 200, r.text
    await asyncio.sleep(0.2)
    assert await claim(client, org.headers) == []
    refused(await ack(client, org.headers, node["identifier"]), 409, "node_run_ended")
    refused(
        await report(
            client, org.headers, node["identifier"], {"status": "COMPLETED", "result": "SUCCESS"}
        ),
        409,
        "node_run_ended",
    )


async def test_secrets_never_reach_what_an_integration_is_handed(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    node = integration()
    node["config"]["integrationActionExecutionProperties"]["token"] = '{{ .secrets["gh"] }}'
    r = await client.post(
        "/v1/workflows",
        json=workflow("ship", [node], [link("trigger", "gh")]),
        headers=org.headers,
    )
    assert r.status_code == 422, r.text
    assert "/nodes/1/config/integrationActionExecutionProperties/token" in [
        d["pointer"] for d in r.json()["details"]
    ]


@pytest.mark.parametrize(
    ("change", "pointer"),
    [
        ({"installationId": "bad id!"}, "/nodes/1/config/installationId"),
        ({"integrationProvider": ""}, "/nodes/1/config/integrationProvider"),
        ({"integrationInvocationType": None}, "/nodes/1/config/integrationInvocationType"),
        (
            {"integrationActionExecutionProperties": []},
            "/nodes/1/config/integrationActionExecutionProperties",
        ),
        (
            {"integrationActionExecutionProperties": {"x": "{{ .outputs[ }}"}},
            "/nodes/1/config/integrationActionExecutionProperties/x",
        ),
        ({"agent": True}, "/nodes/1/config/agent"),
    ],
)
async def test_an_invalid_integration_node_is_a_422(
    client: httpx.AsyncClient, make_org: OrgFactory, change: dict[str, Any], pointer: str
) -> None:
    org = await make_org()
    node = integration()
    node["config"].update(change)
    r = await client.post(
        "/v1/workflows",
        json=workflow("ship", [node], [link("trigger", "gh")]),
        headers=org.headers,
    )
    assert r.status_code == 422, r.text
    assert pointer in [d["pointer"] for d in r.json()["details"]], r.json()


async def test_reports_and_logs_are_checked(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    await install(client, org)
    with WebhookReceiver(await signing_secret(client, org)) as receiver:
        hook = webhook("hook", receiver.url + "/x")
        await create(
            client,
            org,
            workflow("ship", [integration(), hook], [link("trigger", "gh"), link("gh", "hook")]),
        )
        start_worker()
        run_id = (await start(client, org, "ship", {"name": "billing"})).json()["workflowRun"][
            "identifier"
        ]
        node = await claim_one(client, org.headers)
        node_id = node["identifier"]
        for body, pointer in [
            ({"status": "DONE"}, "/status"),
            ({"status": "COMPLETED"}, "/result"),
            ({"result": "SUCCESS"}, "/result"),
            ({"status": "COMPLETED", "result": "MAYBE"}, "/result"),
            ({"output": "text"}, "/output"),
            ({"links": ["a", "b", "c", "d"]}, "/links"),
            ({"nope": 1}, "/nope"),
        ]:
            r = await report(client, org.headers, node_id, body)
            assert r.status_code == 422, (body, r.text)
            assert r.json()["ok"] is False
            assert pointer in [d["pointer"] for d in r.json()["details"]], (body, r.json())
        r = await client.post(
            f"/v1/workflows/nodes/runs/{node_id}/logs",
            json={"logs": [{"level": "LOUD", "message": "x"}]},
            headers=org.headers,
        )
        assert r.status_code == 422 and r.json()["ok"] is False
        r = await client.post(
            f"/v1/workflows/nodes/runs/{node_id}/logs", json={"logs": []}, headers=org.headers
        )
        assert r.status_code == 422 and r.json()["ok"] is False
        r = await client.get(
            "/v1/workflows/nodes/runs",
            params={"external_run_id": "1", "include": "x"},
            headers=org.headers,
        )
        assert r.status_code == 422 and r.json()["ok"] is False
        r = await client.patch(
            "/v1/workflows/runs/ack", json={"runId": node_id}, headers=org.headers
        )
        assert r.status_code == 422 and r.json()["ok"] is False
        refused(await ack(client, org.headers, "wfnr_nope"), 404, "not_found")
        # Ended without acknowledgement: the integration may report straight away.
        r = await report(client, org.headers, node_id, {"status": "COMPLETED", "result": "SUCCESS"})
        assert r.status_code == 200, r.text
        refused(
            await report(
                client, org.headers, node_id, {"status": "COMPLETED", "result": "SUCCESS"}
            ),
            409,
            "node_run_reported",
        )
        run = await wait_done(client, org, run_id)
        # A node run no integration runs is not reported on by one.
        hook_run = nodes_of(run)["hook"]
        refused(
            await report(client, org.headers, hook_run["identifier"], {"status": "IN_PROGRESS"}),
            422,
            "not_integration_action",
        )
    assert run["result"] == "SUCCESS"


async def test_who_may_claim_and_report_and_another_org_may_not(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    db: Database,
    start_worker: Callable[..., Settings],
) -> None:
    org, other = await make_org(), await make_org()
    await install(client, org)
    await install(client, other)  # the same installation id in another org
    await create(client, org, workflow("ship", [integration()], [link("trigger", "gh")]))
    await create(client, other, workflow("ship", [integration()], [link("trigger", "gh")]))
    start_worker()
    run_id = (await start(client, org, "ship", {"name": "billing"})).json()["workflowRun"][
        "identifier"
    ]
    member = await app_headers(client, db, org.org_id, ["Member"])
    r = await client.post(
        "/v1/workflows/runs/claim-pending",
        json={"installationId": INSTALLATION, "limit": 10, "visibilityTimeoutMs": 1000},
        headers=member,
    )
    refused(r, 403, "missing_permission")
    # Another org's integration of the same id sees none of this org's node runs.
    await wait_claimable(client, org, run_id)
    assert await claim(client, other.headers) == []
    node = await claim_one(client, org.headers)
    node_id = node["identifier"]
    refused(await ack(client, other.headers, node_id), 404, "not_found")
    refused(
        await report(client, other.headers, node_id, {"status": "IN_PROGRESS"}), 404, "not_found"
    )
    r = await client.post(
        f"/v1/workflows/nodes/runs/{node_id}/logs",
        json={"logs": [{"message": "x"}]},
        headers=other.headers,
    )
    refused(r, 404, "not_found")
    refused(await ack(client, member, node_id), 403, "missing_permission")
    assert (await ack(client, org.headers, node_id)).status_code == 200
    r = await report(client, org.headers, node_id, {"externalRunId": "ext-1"})
    assert r.status_code == 200, r.text
    r = await client.get(
        "/v1/workflows/nodes/runs", params={"external_run_id": "ext-1"}, headers=other.headers
    )
    assert r.status_code == 200 and r.json()["nodeRuns"] == []
    r = await client.get(
        "/v1/workflows/nodes/runs", params={"external_run_id": "ext-1"}, headers=member
    )
    assert r.status_code == 200 and r.json()["nodeRuns"] == []
    r = await client.get(f"/v1/workflows/runs/{run_id}", headers=other.headers)
    assert r.status_code == 404
