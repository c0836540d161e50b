"""INTEGRATION_ACTION: runs an integration (Port's Ocean) claims, acknowledges and reports
on itself, over the API and real PostgreSQL: definitions, claims with a visibility timeout,
exactly-once acknowledgement, concurrent claimers over real HTTP, who may claim, and
tenant isolation."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI
from jose import jwt

from app.auth.service import create_credential
from app.db.database import Database
from tests.conftest import LiveServer, Org, OrgFactory
from tests.test_permissions import add_user, app_headers, user_headers

INSTALLATION = "my-ocean"


def integration_action(
    identifier: str = "deploy", installation: str = INSTALLATION, **extra: Any
) -> dict[str, Any]:
    return {
        "identifier": identifier,
        "title": identifier.title(),
        "trigger": {
            "type": "self-service",
            "operation": "CREATE",
            "userInputs": {
                "properties": {"service": {"type": "string"}, "replicas": {"type": "number"}}
            },
        },
        "invocationMethod": {
            "type": "INTEGRATION_ACTION",
            "installationId": installation,
            "integrationActionType": "dispatch_workflow",
            "integrationActionExecutionProperties": {
                "org": "acme",
                "repo": "{{ .inputs.service }}",
                "workflow": "deploy.yml",
                "workflowInputs": {"replicas": "{{ .inputs.replicas }}", "run": "{{ .run.id }}"},
                "reportWorkflowStatus": True,
            },
        },
        **extra,
    }


async def define(client: httpx.AsyncClient, org: Org, action: dict[str, Any]) -> None:
    r = await client.post("/v1/actions", json=action, headers=org.headers)
    assert r.status_code == 201, r.text


async def install(
    client: httpx.AsyncClient, headers: dict[str, str], installation: str = INSTALLATION
) -> None:
    r = await client.post(
        "/v1/integration",
        json={"installationId": installation, "installationAppType": "fake", "version": "1.0"},
        headers=headers,
    )
    assert r.status_code == 201, r.text


async def start(
    client: httpx.AsyncClient, org: Org, action: str = "deploy", service: str = "billing"
) -> str:
    r = await client.post(
        f"/v1/actions/{action}/runs",
        json={"properties": {"service": service, "replicas": 3}},
        headers=org.headers,
    )
    assert r.status_code == 202, r.text
    return str(r.json()["run"]["id"])


async def claim(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    *,
    installation: str = INSTALLATION,
    limit: int = 100,
    visibility_ms: int = 60_000,
    **extra: Any,
) -> list[dict[str, Any]]:
    r = await client.post(
        "/v1/actions/runs/claim-pending",
        json={
            "installationId": installation,
            "limit": limit,
            "visibilityTimeoutMs": visibility_ms,
            **extra,
        },
        headers={**headers, "x-port-reserved-usage": "true"},
    )
    assert r.status_code == 200, r.text
    runs: list[dict[str, Any]] = r.json()["runs"]
    return runs


async def ack(client: httpx.AsyncClient, headers: dict[str, str], run_id: str) -> httpx.Response:
    return await client.patch("/v1/actions/runs/ack", json={"runId": run_id}, headers=headers)


async def get_run(client: httpx.AsyncClient, org: Org, run_id: str) -> dict[str, Any]:
    r = await client.get(f"/v1/actions/runs/{run_id}", headers=org.headers)
    assert r.status_code == 200, r.text
    run: dict[str, Any] = r.json()["run"]
    return run


async def ready(client: httpx.AsyncClient, make_org: OrgFactory) -> Org:
    """An org with its integration installed and the `deploy` action defined."""
    org = await make_org()
    await install(client, org.headers)
    await define(client, org, integration_action())
    return org


def assert_port_error(r: httpx.Response, status: int, code: str | None = None) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["ok"] is False and isinstance(body["message"], str), body
    if code is not None:
        assert body["error"] == code, body


# ---------------------------------------------------------------------------------------
# Definitions


async def test_an_integration_action_is_stored_and_shown_back(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    action = integration_action()
    await define(client, org, action)
    r = await client.get("/v1/actions/deploy", headers=org.headers)
    assert r.status_code == 200, r.text
    assert r.json()["action"]["invocationMethod"] == action["invocationMethod"]


async def test_an_integration_action_may_name_an_integration_not_installed_yet(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await define(client, org, integration_action(installation="arrives-later"))


async def test_a_malformed_integration_action_is_refused_naming_each_problem(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    action = integration_action()
    action["invocationMethod"] = {
        "type": "INTEGRATION_ACTION",
        "installationId": "has spaces",
        "integrationActionExecutionProperties": {"repo": "{{ .inputs | nope( }}"},
        "url": "https://example.com",
    }
    r = await client.post("/v1/actions", json=action, headers=org.headers)
    assert_port_error(r, 422)
    pointers = {d["pointer"] for d in r.json()["details"]}
    assert {
        "/invocationMethod/installationId",
        "/invocationMethod/integrationActionType",
        "/invocationMethod/integrationActionExecutionProperties/repo",
        "/invocationMethod/url",
    } <= pointers


async def test_an_integration_action_without_execution_properties_is_refused(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    action = integration_action()
    del action["invocationMethod"]["integrationActionExecutionProperties"]
    r = await client.post("/v1/actions", json=action, headers=org.headers)
    assert_port_error(r, 422)
    assert r.json()["details"][0]["pointer"] == (
        "/invocationMethod/integrationActionExecutionProperties"
    )


async def test_an_integration_action_may_not_name_a_secret(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    action = integration_action()
    action["invocationMethod"]["integrationActionExecutionProperties"]["token"] = (
        "{{ .secrets.GITHUB_TOKEN }}"
    )
    r = await client.post("/v1/actions", json=action, headers=org.headers)
    assert_port_error(r, 422)
    assert "GITHUB_TOKEN" in r.text


# ---------------------------------------------------------------------------------------
# Runs wait to be claimed


async def test_a_run_waits_for_its_integration_and_nothing_is_queued(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await ready(client, make_org)
    run_id = await start(client, org)
    run = await get_run(client, org, run_id)
    assert run["status"] == "IN_PROGRESS"
    assert run["pendingExecution"] is True and run["claimedUntil"] is None
    assert run["installationId"] == INSTALLATION
    async with db.tenant(org.org_id) as tx:
        queued = await tx.fetchval(
            "SELECT count(*) FROM dispatch_outbox WHERE org_id = $1 AND run_id = $2",
            org.org_id,
            run_id,
        )
    assert queued == 0


async def test_a_claim_answers_the_run_with_its_rendered_payload(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await ready(client, make_org)
    run_id = await start(client, org, service="billing")
    [run] = await claim(client, org.headers)
    # What Ocean's ActionRun reads: id, status, action.identifier, payload.
    assert run["id"] == run_id and run["status"] == "IN_PROGRESS"
    assert run["action"]["identifier"] == "deploy"
    assert run["payload"] == {
        "type": "INTEGRATION_ACTION",
        "installationId": INSTALLATION,
        "integrationActionType": "dispatch_workflow",
        "integrationActionExecutionProperties": {
            "org": "acme",
            "repo": "billing",
            "workflow": "deploy.yml",
            "workflowInputs": {"replicas": 3, "run": run_id},
            "reportWorkflowStatus": True,
        },
    }
    assert run["claimedUntil"] is not None
    # The run's readers see the same payload.
    assert (await get_run(client, org, run_id))["payload"] == run["payload"]


async def test_a_day_2_run_renders_its_entity_with_calculation_properties(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await install(client, org.headers)
    r = await client.post(
        "/v1/blueprints",
        json={
            "identifier": "workload",
            "title": "Workload",
            "schema": {"properties": {"replicas": {"type": "number"}}},
            "calculationProperties": {
                "doubled": {
                    "title": "Doubled",
                    "type": "number",
                    "calculation": ".properties.replicas * 2",
                }
            },
        },
        headers=org.headers,
    )
    assert r.status_code == 201, r.text
    r = await client.post(
        "/v1/blueprints/workload/entities",
        json={"identifier": "api", "properties": {"replicas": 2}},
        headers=org.headers,
    )
    assert r.status_code == 201, r.text
    action = integration_action("scale")
    action["trigger"] = {
        "type": "self-service",
        "operation": "DAY-2",
        "blueprintIdentifier": "workload",
        "userInputs": {"properties": {"replicas": {"type": "number"}}, "required": ["replicas"]},
    }
    action["invocationMethod"]["integrationActionExecutionProperties"] = {
        "workload": "{{ .entity.identifier }}",
        "from": "{{ .entity.properties.doubled }}",
        "to": "{{ .inputs.replicas }}",
    }
    await define(client, org, action)
    r = await client.post(
        "/v1/actions/scale/runs",
        json={"entity": "api", "properties": {"replicas": 5}},
        headers=org.headers,
    )
    assert r.status_code == 202, r.text
    [run] = await claim(client, org.headers)
    assert run["payload"]["integrationActionExecutionProperties"] == {
        "workload": "api",
        "from": 4,
        "to": 5,
    }
    assert run["entity"]["identifier"] == "api"


async def test_a_claim_takes_the_oldest_runs_up_to_its_limit(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await ready(client, make_org)
    started = [await start(client, org, service=f"s{i}") for i in range(3)]
    first = await claim(client, org.headers, limit=2)
    assert [r["id"] for r in first] == started[:2]
    second = await claim(client, org.headers, limit=2)
    assert [r["id"] for r in second] == started[2:]


async def test_a_claim_leaves_out_the_excluded_actions(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await ready(client, make_org)
    await define(client, org, integration_action("rollback"))
    await start(client, org, "deploy")
    rollback = await start(client, org, "rollback")
    claimed = await claim(client, org.headers, exclude=["deploy"])
    assert [r["id"] for r in claimed] == [rollback]


async def test_a_claimed_run_is_claimable_again_once_its_visibility_timeout_passes(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await ready(client, make_org)
    run_id = await start(client, org)
    [first] = await claim(client, org.headers, visibility_ms=1000)
    assert first["id"] == run_id
    assert await claim(client, org.headers) == []  # invisible while claimed
    await asyncio.sleep(1.2)  # the integration died: no acknowledgement came
    [again] = await claim(client, org.headers)
    assert again["id"] == run_id
    assert again["payload"] == first["payload"]  # rendered once, kept
    assert (await ack(client, org.headers, run_id)).status_code == 200


async def test_an_acknowledged_run_is_never_claimed_again(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await ready(client, make_org)
    run_id = await start(client, org)
    await claim(client, org.headers, visibility_ms=1000)
    r = await ack(client, org.headers, run_id)
    assert r.status_code == 200, r.text
    assert r.json()["run"]["pendingExecution"] is False
    await asyncio.sleep(1.2)
    assert await claim(client, org.headers) == []


async def test_a_run_waiting_for_approval_is_claimable_once_approved(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await ready(client, make_org)
    await define(client, org, integration_action("gated", requiredApproval=True))
    run_id = await start(client, org, "gated")
    assert await claim(client, org.headers) == []
    r = await client.patch(
        f"/v1/actions/runs/{run_id}/approval", json={"status": "APPROVE"}, headers=org.headers
    )
    assert r.status_code == 201, r.text
    assert [r["id"] for r in await claim(client, org.headers)] == [run_id]


async def test_a_run_whose_template_fails_ends_in_failure_and_is_not_handed_out(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await ready(client, make_org)
    action = integration_action("broken")
    action["invocationMethod"]["integrationActionExecutionProperties"] = {
        "n": "{{ .inputs.service | tonumber }}"
    }
    await define(client, org, action)
    run_id = await start(client, org, "broken", service="not-a-number")
    assert await claim(client, org.headers) == []
    run = await get_run(client, org, run_id)
    assert run["status"] == "FAILURE" and run["endedAt"] is not None
    r = await client.get(f"/v1/actions/runs/{run_id}/logs", headers=org.headers)
    assert any("template failed" in log["message"] for log in r.json()["runLogs"])


# ---------------------------------------------------------------------------------------
# Acknowledgement: exactly once


async def test_a_second_acknowledgement_is_a_conflict(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await ready(client, make_org)
    run_id = await start(client, org)
    await claim(client, org.headers)
    assert (await ack(client, org.headers, run_id)).status_code == 200
    assert_port_error(await ack(client, org.headers, run_id), 409, "run_already_acknowledged")


async def test_an_expired_claim_taken_again_by_a_replica_is_acknowledged_once(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    # Replicas of one integration share its credential.
    org = await ready(client, make_org)
    run_id = await start(client, org)
    await claim(client, org.headers, visibility_ms=1000)
    await asyncio.sleep(1.2)
    [again] = await claim(client, org.headers)
    assert again["id"] == run_id
    assert (await ack(client, org.headers, run_id)).status_code == 200
    # The first claimer, late, is told someone has it.
    assert_port_error(await ack(client, org.headers, run_id), 409, "run_already_acknowledged")


async def test_an_expired_claim_taken_by_another_credential_cannot_be_acknowledged(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await ready(client, make_org)
    other = await app_headers(client, db, org.org_id, ["Admin"])
    run_id = await start(client, org)
    await claim(client, org.headers, visibility_ms=1000)
    await asyncio.sleep(1.2)
    [again] = await claim(client, other)
    assert again["id"] == run_id
    assert_port_error(await ack(client, org.headers, run_id), 409, "run_claimed_by_another")
    assert (await ack(client, other, run_id)).status_code == 200


async def test_an_expired_claim_not_taken_again_is_still_acknowledged(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await ready(client, make_org)
    run_id = await start(client, org)
    await claim(client, org.headers, visibility_ms=1000)
    await asyncio.sleep(1.2)  # late, but no one else has it
    assert (await ack(client, org.headers, run_id)).status_code == 200
    assert await claim(client, org.headers) == []


async def test_concurrent_acknowledgements_let_exactly_one_through(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await ready(client, make_org)
    run_id = await start(client, org)
    await claim(client, org.headers)
    answers = await asyncio.gather(*(ack(client, org.headers, run_id) for _ in range(8)))
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200] + [409] * 7, [r.text for r in answers]


async def test_acknowledging_a_run_never_claimed_is_a_conflict(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await ready(client, make_org)
    run_id = await start(client, org)
    assert_port_error(await ack(client, org.headers, run_id), 409, "run_not_claimed")


async def test_acknowledging_an_ended_run_is_a_conflict(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await ready(client, make_org)
    run_id = await start(client, org)
    await claim(client, org.headers)
    r = await client.patch(
        f"/v1/actions/runs/{run_id}", json={"status": "FAILURE"}, headers=org.headers
    )
    assert r.status_code == 200, r.text
    assert_port_error(await ack(client, org.headers, run_id), 409, "run_ended")


async def test_acknowledging_a_webhook_run_is_refused(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await ready(client, make_org)
    hook = integration_action("hook")
    hook["invocationMethod"] = {"type": "WEBHOOK", "url": "http://127.0.0.1:9/x"}
    await define(client, org, hook)
    run_id = await start(client, org, "hook")
    assert_port_error(await ack(client, org.headers, run_id), 422, "not_integration_action")


async def test_acknowledging_an_unknown_run_is_not_found(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await ready(client, make_org)
    assert_port_error(await ack(client, org.headers, "r_nope"), 404)


async def test_the_integration_reports_progress_and_the_outcome(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await ready(client, make_org)
    run_id = await start(client, org)
    await claim(client, org.headers)
    assert (await ack(client, org.headers, run_id)).status_code == 200
    # What Ocean sends: a link and external id, log lines, then the status.
    r = await client.patch(
        f"/v1/actions/runs/{run_id}",
        json={"link": "https://ci.example.com/1", "externalRunId": "1", "statusLabel": "Running"},
        headers=org.headers,
    )
    assert r.status_code == 200, r.text
    r = await client.post(
        f"/v1/actions/runs/{run_id}/logs", json={"message": "deploying"}, headers=org.headers
    )
    assert r.status_code == 201, r.text
    r = await client.patch(
        f"/v1/actions/runs/{run_id}", json={"status": "SUCCESS"}, headers=org.headers
    )
    assert r.status_code == 200, r.text
    run = await get_run(client, org, run_id)
    assert (run["status"], run["link"], run["externalRunId"]) == (
        "SUCCESS",
        "https://ci.example.com/1",
        "1",
    )


# ---------------------------------------------------------------------------------------
# Concurrent claimers over real HTTP


async def test_concurrent_claims_never_hand_a_run_to_two_claimers(
    client: httpx.AsyncClient, make_org: OrgFactory, live_server: LiveServer
) -> None:
    org = await ready(client, make_org)
    started = {await start(client, org, service=f"s{i}") for i in range(30)}
    taken: list[str] = []
    async with httpx.AsyncClient(base_url=live_server.url, timeout=30) as http:
        for _ in range(10):
            rounds = await asyncio.gather(*(claim(http, org.headers, limit=4) for _ in range(8)))
            taken += [run["id"] for claimed in rounds for run in claimed]
            if len(taken) >= len(started):
                break
    assert len(taken) == len(set(taken)), "a run was handed to two claimers"
    assert set(taken) == started


# ---------------------------------------------------------------------------------------
# Who may claim


@dataclass
class Credential:
    client_id: str
    client_secret: str


async def _credential(db: Database, org: Org, roles: list[str]) -> Credential:
    async with db.tenant(org.org_id) as tx:
        made = await create_credential(tx, org_id=org.org_id, name="ocean", roles=roles)
    return Credential(made.client_id, made.client_secret)


async def _headers(client: httpx.AsyncClient, credential: Credential) -> dict[str, str]:
    r = await client.post(
        "/v1/auth/access_token",
        json={"clientId": credential.client_id, "clientSecret": credential.client_secret},
    )
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['accessToken']}"}


async def test_a_member_credential_cannot_claim_or_acknowledge(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await ready(client, make_org)
    run_id = await start(client, org)
    member = await app_headers(client, db, org.org_id, ["Member"])
    r = await client.post(
        "/v1/actions/runs/claim-pending",
        json={"installationId": INSTALLATION, "limit": 5, "visibilityTimeoutMs": 1000},
        headers=member,
    )
    assert_port_error(r, 403, "missing_permission")
    await claim(client, org.headers)
    assert_port_error(await ack(client, member, run_id), 403, "missing_permission")


async def test_a_person_cannot_claim_even_as_an_admin(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, app: FastAPI
) -> None:
    org = await ready(client, make_org)
    await add_user(db, org.org_id, "admin@example.com", roles=["Admin"])
    person = user_headers(app, org.org_id, "admin@example.com")
    r = await client.post(
        "/v1/actions/runs/claim-pending", json={"installationId": INSTALLATION}, headers=person
    )
    assert_port_error(r, 403, "missing_permission")


async def test_the_integrations_own_credential_claims_and_reports_without_admin(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    own = await _credential(db, org, ["Admin"])
    await install(client, await _headers(client, own))
    await define(client, org, integration_action())
    r = await client.put(
        f"/v1/apps/{own.client_id}", json={"name": "own", "roles": ["Member"]}, headers=org.headers
    )
    assert r.status_code == 200, r.text
    headers = await _headers(client, own)  # a Member now, still the integration's own
    run_id = await start(client, org)
    assert [r["id"] for r in await claim(client, headers)] == [run_id]
    assert (await ack(client, headers, run_id)).status_code == 200
    r = await client.patch(
        f"/v1/actions/runs/{run_id}", json={"status": "SUCCESS"}, headers=headers
    )
    assert r.status_code == 200, r.text
    r = await client.get(f"/v1/actions/runs/{run_id}", headers=headers)
    assert r.status_code == 200 and r.json()["run"]["status"] == "SUCCESS", r.text
    # Another Member credential may do none of it.
    stranger = await app_headers(client, db, org.org_id, ["Member"])
    r = await client.get(f"/v1/actions/runs/{run_id}", headers=stranger)
    assert_port_error(r, 403, "missing_permission")


async def test_machine_tokens_carry_the_is_machine_claim(
    client: httpx.AsyncClient, make_org: OrgFactory, app: FastAPI
) -> None:
    org = await make_org()
    assert jwt.get_unverified_claims(org.token)["isMachine"] is True
    person = user_headers(app, org.org_id, "someone@example.com")["Authorization"]
    assert jwt.get_unverified_claims(person.split(" ", 1)[1])["isMachine"] is False
    r = await client.get("/v1/organization", headers=org.headers)
    assert r.status_code == 200  # tokens with the claim are still accepted


# ---------------------------------------------------------------------------------------
# Tenancy


async def test_another_org_never_claims_sees_or_acknowledges_the_runs(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    a = await ready(client, make_org)
    b = await ready(client, make_org)  # the same installation id, in its own org
    a_run = await start(client, a)
    b_run = await start(client, b)
    assert [r["id"] for r in await claim(client, b.headers)] == [b_run]
    assert_port_error(await ack(client, b.headers, a_run), 404)
    r = await client.get(f"/v1/actions/runs/{a_run}", headers=b.headers)
    assert r.status_code == 404
    assert [r["id"] for r in await claim(client, a.headers)] == [a_run]
    assert (await ack(client, a.headers, a_run)).status_code == 200


# ---------------------------------------------------------------------------------------
# Bad input: Port's error body, never a 500


async def test_bad_claims_are_refused_with_port_errors(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await ready(client, make_org)
    for body in (
        {},
        {"installationId": ""},
        {"installationId": INSTALLATION, "limit": 0},
        {"installationId": INSTALLATION, "limit": 1001},
        {"installationId": INSTALLATION, "limit": "5"},
        {"installationId": INSTALLATION, "visibilityTimeoutMs": -1},
        {"installationId": INSTALLATION, "visibilityTimeoutMs": 600_001},
        {"installationId": INSTALLATION, "exclude": "deploy"},
        {"installationId": INSTALLATION, "exclude": [""]},
        {"installationId": INSTALLATION, "other": 1},
        [],
    ):
        r = await client.post("/v1/actions/runs/claim-pending", json=body, headers=org.headers)
        assert_port_error(r, 422)
    r = await client.post(
        "/v1/actions/runs/claim-pending",
        content=b"{not json",
        headers={**org.headers, "content-type": "application/json"},
    )
    assert 400 <= r.status_code < 500 and r.json()["ok"] is False


async def test_claiming_for_an_unknown_installation_is_not_found(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await ready(client, make_org)
    r = await client.post(
        "/v1/actions/runs/claim-pending",
        json={"installationId": f"nope-{uuid.uuid4().hex[:6]}"},
        headers=org.headers,
    )
    assert_port_error(r, 404, "integration_not_found")


async def test_bad_acknowledgements_are_refused_with_port_errors(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await ready(client, make_org)
    for body in ({}, {"runId": ""}, {"runId": 5}, {"runId": "r_x", "other": 1}, ["r_x"]):
        r = await client.patch("/v1/actions/runs/ack", json=body, headers=org.headers)
        assert_port_error(r, 422)


async def test_a_visibility_timeout_under_a_second_holds_for_a_second(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    """Claims asking for 1 ms would hand runs back before rendering them and take them
    again at once, each time logging a claim: a second at least is used."""
    org = await ready(client, make_org)
    run_id = await start(client, org)
    [first] = await claim(client, org.headers, visibility_ms=1)
    assert first["id"] == run_id
    for _ in range(5):
        assert await claim(client, org.headers, visibility_ms=1) == []
    await asyncio.sleep(1.2)
    [again] = await claim(client, org.headers, visibility_ms=1)
    assert again["id"] == run_id
    r = await client.get(f"/v1/actions/runs/{run_id}/logs", headers=org.headers)
    claims = [line for line in r.json()["runLogs"] if "Claimed by" in line["message"]]
    assert len(claims) == 2  # one per claim that answered the run
