"""Action runs through the API (no worker here; dispatch is tests/test_dispatch.py): inputs
checked with every bad one named, Idempotency-Key, approvals, progress reports, logs and
their live stream, entity writes tied to a run, list filters, and tenancy."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
from fastapi import FastAPI

from app.db.database import Database
from tests.conftest import LiveServer, Org, OrgFactory
from tests.test_permissions import add_user, user_headers

SERVICE = {
    "identifier": "service",
    "title": "Service",
    "schema": {"properties": {"tier": {"type": "string"}, "lang": {"type": "string"}}},
}

CREATE = {
    "identifier": "create-service",
    "title": "Create service",
    "trigger": {
        "type": "self-service",
        "operation": "CREATE",
        "blueprintIdentifier": "service",
        "userInputs": {
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z-]+$", "maxLength": 20},
                "replicas": {"type": "number", "minimum": 1, "maximum": 10, "default": 2},
                "language": {"type": "string", "enum": ["go", "python"]},
                "owner": {"type": "string", "format": "email"},
                "depends": {
                    "type": "array",
                    "items": {"type": "string", "format": "entity", "blueprint": "service"},
                },
                "config": {"type": "object"},
            },
            "required": ["name", "language"],
        },
    },
    "invocationMethod": {
        "type": "WEBHOOK",
        "url": "http://127.0.0.1:9/create",
        "body": {"name": "{{ .inputs.name }}", "run": "{{ .run.id }}"},
    },
}

DEPLOY = {
    "identifier": "deploy",
    "trigger": {
        "type": "self-service",
        "operation": "DAY-2",
        "blueprintIdentifier": "service",
        "userInputs": {"properties": {"version": {"type": "string"}}},
        "condition": {
            "type": "SEARCH",
            "combinator": "and",
            "rules": [{"property": "tier", "operator": "=", "value": "1"}],
        },
    },
    "invocationMethod": {"type": "WEBHOOK", "url": "http://127.0.0.1:9/deploy"},
    "requiredApproval": True,
}


async def _setup(client: httpx.AsyncClient, org: Org) -> None:
    for path, body in (
        ("/v1/blueprints", SERVICE),
        ("/v1/actions", CREATE),
        ("/v1/actions", DEPLOY),
    ):
        r = await client.post(path, json=body, headers=org.headers)
        assert r.status_code == 201, r.text
    for ident, tier in (("api", "1"), ("web", "2")):
        r = await client.post(
            "/v1/blueprints/service/entities",
            json={"identifier": ident, "title": ident.upper(), "properties": {"tier": tier}},
            headers=org.headers,
        )
        assert r.status_code == 201, r.text


async def _run(
    client: httpx.AsyncClient, org: Org, action: str, body: dict[str, Any], **headers: str
) -> httpx.Response:
    return await client.post(
        f"/v1/actions/{action}/runs", json=body, headers={**org.headers, **headers}
    )


GOOD = {"properties": {"name": "billing", "language": "go", "owner": "a@example.com"}}


async def _outbox(db: Database, org: Org, run_id: str) -> list[int]:
    async with db.system() as tx:
        rows = await tx.fetch(
            "SELECT attempt FROM dispatch_outbox WHERE org_id = $1 AND run_id = $2",
            org.org_id,
            run_id,
        )
    return [r["attempt"] for r in rows]


async def test_a_run_is_recorded_queued_and_answered_202(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _setup(client, org)
    r = await _run(client, org, "create-service", GOOD)
    assert r.status_code == 202, r.text
    run = r.json()["run"]
    assert r.json()["ok"] is True
    assert run["id"].startswith("r_") and run["status"] == "IN_PROGRESS"
    assert run["action"] == {
        "identifier": "create-service",
        "title": "Create service",
        "icon": None,
        "deleted": False,
    }
    assert run["source"] == "API" and run["requiredApproval"] is False
    # The default is applied; what was sent is kept too.
    assert run["properties"] == {**GOOD["properties"], "replicas": 2}
    assert run["rawProperties"] == GOOD["properties"]
    assert run["blueprint"]["identifier"] == "service" and "entity" not in run
    assert run["pendingExecution"] is True
    # The outbox row was written with the run.
    assert await _outbox(db, org, run["id"]) == [1]
    got = await client.get(f"/v1/actions/runs/{run['id']}", headers=org.headers)
    assert got.status_code == 200 and got.json()["run"]["id"] == run["id"]


async def test_every_bad_input_is_named(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    org = await make_org()
    await _setup(client, org)
    bad = {
        "properties": {
            "name": "Not Valid!",
            "replicas": 50,
            "language": "cobol",
            "owner": "not-an-email",
            "depends": ["api", "ghost"],
            "config": "text",
            "extra": 1,
        }
    }
    r = await _run(client, org, "create-service", bad)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["ok"] is False and body["error"] == "invalid_request"
    pointers = {d["pointer"] for d in body["details"]}
    assert {
        "/properties/name",
        "/properties/replicas",
        "/properties/language",
        "/properties/owner",
        "/properties/config",
        "/properties/extra",
    } <= pointers
    missing = await _run(client, org, "create-service", {"properties": {"name": "x"}})
    assert missing.status_code == 422
    assert {
        "pointer": "/properties/language",
        "message": "'language' is required",
    } in missing.json()["details"]
    # Entity inputs name entities that exist.
    ghost = await _run(
        client,
        org,
        "create-service",
        {"properties": {**GOOD["properties"], "depends": ["api", "ghost"]}},
    )
    assert ghost.status_code == 422
    assert ghost.json()["details"] == [
        {
            "pointer": "/properties/depends",
            "message": "entity 'ghost' of blueprint 'service' not found",
        }
    ]
    ok = await _run(
        client, org, "create-service", {"properties": {**GOOD["properties"], "depends": ["api"]}}
    )
    assert ok.status_code == 202, ok.text
    # Not an object at all.
    r = await client.post(
        "/v1/actions/create-service/runs", json={"properties": [1]}, headers=org.headers
    )
    assert r.status_code == 422 and r.json()["ok"] is False
    r = await _run(client, org, "no-such-action", GOOD)
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = await _run(client, org, "create-service", {**GOOD, "entity": "api"})
    assert r.status_code == 422


async def test_day2_runs_on_an_entity_that_meets_the_condition(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _setup(client, org)
    r = await _run(client, org, "deploy", {"properties": {"version": "v1"}})
    assert r.status_code == 422 and r.json()["details"][0]["pointer"] == "/entity"
    r = await _run(client, org, "deploy", {"properties": {}, "entity": "ghost"})
    assert r.status_code == 422 and "not found" in r.json()["message"]
    r = await _run(client, org, "deploy", {"properties": {}, "entity": "web"})
    assert r.status_code == 422 and r.json()["error"] == "condition_not_met"
    r = await _run(client, org, "deploy", {"properties": {"version": "v1"}, "entity": "api"})
    assert r.status_code == 202, r.text
    run = r.json()["run"]
    assert run["entity"] == {"identifier": "api", "title": "API", "icon": None, "deleted": False}


async def test_idempotency_key_answers_the_first_run(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _setup(client, org)
    first = await _run(client, org, "create-service", GOOD, **{"Idempotency-Key": "k-1"})
    again = await _run(client, org, "create-service", GOOD, **{"Idempotency-Key": "k-1"})
    assert first.status_code == again.status_code == 202
    assert first.json()["run"]["id"] == again.json()["run"]["id"]
    assert await _outbox(db, org, first.json()["run"]["id"]) == [1]
    other = await _run(
        client,
        org,
        "create-service",
        {"properties": {**GOOD["properties"], "name": "other"}},
        **{"Idempotency-Key": "k-1"},
    )
    assert other.status_code == 409 and other.json()["error"] == "idempotency_key_reused"
    # Concurrent requests with one key make one run.
    answers = await asyncio.gather(
        *(_run(client, org, "create-service", GOOD, **{"Idempotency-Key": "k-2"}) for _ in range(5))
    )
    assert {a.status_code for a in answers} == {202}
    assert len({a.json()["run"]["id"] for a in answers}) == 1
    listed = await client.get("/v1/actions/runs?action=create-service", headers=org.headers)
    assert len(listed.json()["runs"]) == 2


async def test_approval_queues_or_declines(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _setup(client, org)
    runs = []
    for _ in range(2):
        r = await _run(client, org, "deploy", {"properties": {}, "entity": "api"})
        assert r.status_code == 202
        assert r.json()["run"]["status"] == "WAITING_FOR_APPROVAL"
        runs.append(r.json()["run"]["id"])
        assert await _outbox(db, org, runs[-1]) == []
    # A waiting run cannot be reported on.
    r = await client.patch(
        f"/v1/actions/runs/{runs[0]}", json={"status": "SUCCESS"}, headers=org.headers
    )
    assert r.status_code == 422
    r = await client.patch(
        f"/v1/actions/runs/{runs[0]}/approval",
        json={"status": "APPROVE", "description": "ship it"},
        headers=org.headers,
    )
    assert r.status_code == 201, r.text
    approved = r.json()["run"]
    assert approved["status"] == "IN_PROGRESS"
    assert approved["approval"]["state"] == "APPROVED"
    assert approved["approval"]["description"] == "ship it"
    assert await _outbox(db, org, runs[0]) == [1]
    r = await client.patch(
        f"/v1/actions/runs/{runs[1]}/approval", json={"status": "DECLINE"}, headers=org.headers
    )
    assert r.status_code == 201
    declined = r.json()["run"]
    assert declined["status"] == "DECLINED" and declined["endedAt"] is not None
    assert await _outbox(db, org, runs[1]) == []
    # Decided once.
    r = await client.patch(
        f"/v1/actions/runs/{runs[1]}/approval", json={"status": "APPROVE"}, headers=org.headers
    )
    assert r.status_code == 422 and r.json()["error"] == "run_not_waiting"
    r = await client.patch(
        f"/v1/actions/runs/{runs[1]}/approval", json={"status": "MAYBE"}, headers=org.headers
    )
    assert r.status_code == 422
    logs = await client.get(f"/v1/actions/runs/{runs[0]}/logs", headers=org.headers)
    assert [entry["message"] for entry in logs.json()["runLogs"]][-1].startswith(
        "The run was approved by"
    )


async def test_progress_reports_and_logs(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    org = await make_org()
    await _setup(client, org)
    run_id = (await _run(client, org, "create-service", GOOD)).json()["run"]["id"]
    url = f"/v1/actions/runs/{run_id}"
    r = await client.patch(url, json={"statusLabel": "Cloning"}, headers=org.headers)
    assert r.status_code == 200
    assert r.json()["run"]["status"] == "IN_PROGRESS"
    assert r.json()["run"]["statusLabel"] == "Cloning"
    r = await client.patch(
        url,
        json={
            "link": ["https://ci.example.com/1", "https://ci.example.com/2"],
            "externalRunId": "e-9",
        },
        headers=org.headers,
    )
    assert r.json()["run"]["link"] == ["https://ci.example.com/1", "https://ci.example.com/2"]
    assert r.json()["run"]["statusLabel"] == "Cloning"  # untouched keys stay
    r = await client.patch(url, json={"link": "https://ci.example.com/3"}, headers=org.headers)
    assert r.json()["run"]["link"] == "https://ci.example.com/3"
    r = await client.patch(url, json={"status": "DONE"}, headers=org.headers)
    assert r.status_code == 422 and r.json()["ok"] is False
    r = await client.patch(url, json={"link": 5}, headers=org.headers)
    assert r.status_code == 422
    for i in range(3):
        r = await client.post(f"{url}/logs", json={"message": f"step {i}"}, headers=org.headers)
        assert r.status_code == 201, r.text
        assert r.json()["runLog"]["message"] == f"step {i}"
        assert r.json()["runLog"]["runId"] == run_id
    r = await client.post(
        f"{url}/logs",
        json={"message": "done", "terminationStatus": "SUCCESS", "statusLabel": "Created"},
        headers=org.headers,
    )
    assert r.status_code == 201
    run = (await client.get(url, headers=org.headers)).json()["run"]
    assert run["status"] == "SUCCESS" and run["statusLabel"] == "Created"
    assert run["endedAt"] is not None and run["pendingExecution"] is False
    r = await client.post(
        f"{url}/logs",
        json={"message": "again", "terminationStatus": "FAILURE"},
        headers=org.headers,
    )
    assert r.status_code == 409 and r.json()["error"] == "run_already_terminated"
    r = await client.patch(url, json={"status": "FAILURE"}, headers=org.headers)
    assert r.status_code == 422 and r.json()["error"] == "run_ended"
    page = await client.get(f"{url}/logs?limit=2&offset=1", headers=org.headers)
    assert [e["message"] for e in page.json()["runLogs"]] == ["step 1", "step 2"]
    r = await client.get(f"{url}/logs?limit=51", headers=org.headers)
    assert r.status_code == 422


async def test_list_filters(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    org = await make_org()
    await _setup(client, org)
    a = (await _run(client, org, "create-service", GOOD)).json()["run"]["id"]
    b = (await _run(client, org, "create-service", GOOD)).json()["run"]["id"]
    c = (await _run(client, org, "deploy", {"properties": {}, "entity": "api"})).json()["run"]["id"]
    await client.patch(
        f"/v1/actions/runs/{a}",
        json={"status": "FAILURE", "externalRunId": "gh-1"},
        headers=org.headers,
    )

    async def ids(query: str) -> list[str]:
        r = await client.get(f"/v1/actions/runs?{query}", headers=org.headers)
        assert r.status_code == 200, r.text
        return [run["id"] for run in r.json()["runs"]]

    assert await ids("") == [c, b, a]
    assert await ids("action=deploy") == [c]
    assert await ids("active=true") == [c, b]
    assert await ids("active=false") == [a]
    assert await ids("status=FAILURE&status=WAITING_FOR_APPROVAL") == [c, a]
    assert await ids("entity=api") == [c]
    assert await ids("blueprint=service&limit=1") == [c]
    assert await ids("external_run_id=gh-1") == [a]
    assert await ids("source=AUTOMATION") == []
    assert await ids(f"user_id={org.client_id}") == [c, b, a]
    assert await ids("user_id=someone-else") == []
    r = await client.get("/v1/actions/runs?limit=0", headers=org.headers)
    assert r.status_code == 422


async def test_entity_writes_are_tied_to_a_run_in_progress(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _setup(client, org)
    run_id = (await _run(client, org, "create-service", GOOD)).json()["run"]["id"]
    r = await client.post(
        f"/v1/blueprints/service/entities?run_id={run_id}",
        json={"identifier": "billing", "properties": {"tier": "3"}},
        headers=org.headers,
    )
    assert r.status_code == 201, r.text
    async with db.system() as tx:
        tied = await tx.fetchval(
            "SELECT run_id FROM entity_events WHERE org_id = $1 AND identifier = 'billing'",
            org.org_id,
        )
    assert tied == run_id
    await client.patch(
        f"/v1/actions/runs/{run_id}", json={"status": "SUCCESS"}, headers=org.headers
    )
    r = await client.post(
        f"/v1/blueprints/service/entities?run_id={run_id}&upsert=true",
        json={"identifier": "billing", "properties": {"tier": "4"}},
        headers=org.headers,
    )
    assert r.status_code == 422 and r.json()["error"] == "run_not_in_progress"
    r = await client.delete(
        f"/v1/blueprints/service/entities/billing?run_id={run_id}", headers=org.headers
    )
    assert r.status_code == 422
    r = await client.post(
        "/v1/blueprints/service/entities?run_id=r_nope",
        json={"identifier": "x", "properties": {}},
        headers=org.headers,
    )
    assert r.status_code == 422 and r.json()["error"] == "run_not_found"


async def test_automations_are_not_run_by_hand(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _setup(client, org)
    automation = {
        "identifier": "on-create",
        "trigger": {
            "type": "automation",
            "event": {"type": "ENTITY_CREATED", "blueprintIdentifier": "service"},
        },
        "invocationMethod": {"type": "WEBHOOK", "url": "http://127.0.0.1:9/x"},
    }
    assert (
        await client.post("/v1/actions", json=automation, headers=org.headers)
    ).status_code == 201
    r = await _run(client, org, "on-create", {"properties": {}})
    assert r.status_code == 422 and r.json()["error"] == "not_self_service"


async def test_log_stream_sends_logs_then_ends(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _setup(client, org)
    run_id = (await _run(client, org, "create-service", GOOD)).json()["run"]["id"]
    url = f"/v1/actions/runs/{run_id}/logs"
    await client.post(url, json={"message": "before the stream"}, headers=org.headers)

    async def follow() -> str:
        async with client.stream("GET", f"{url}/stream", headers=org.headers) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            return (await response.aread()).decode()

    reader = asyncio.create_task(follow())
    await asyncio.sleep(0.3)
    await client.post(url, json={"message": "during the stream"}, headers=org.headers)
    await client.post(
        url, json={"message": "finished", "terminationStatus": "SUCCESS"}, headers=org.headers
    )
    text = await asyncio.wait_for(reader, 10)
    events = [block for block in text.split("\n\n") if block.strip()]
    logs = [json.loads(e.split("data: ", 1)[1]) for e in events if e.startswith("event: log")]
    assert [entry["message"] for entry in logs] == [
        "before the stream",
        "during the stream",
        "finished",
    ]
    assert events[-1].startswith("event: end") and '"SUCCESS"' in events[-1]
    # Resume after the second log.
    async with client.stream(
        "GET", f"{url}/stream", headers={**org.headers, "Last-Event-ID": logs[1]["id"]}
    ) as response:
        resumed = (await response.aread()).decode()
    assert "during the stream" not in resumed and "finished" in resumed
    missing = await client.get("/v1/actions/runs/r_missing/logs/stream", headers=org.headers)
    assert missing.status_code == 404 and missing.json()["ok"] is False


async def test_runs_are_private_to_their_org(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    owner, other = await make_org(), await make_org()
    await _setup(client, owner)
    run_id = (await _run(client, owner, "create-service", GOOD)).json()["run"]["id"]
    waiting = (await _run(client, owner, "deploy", {"properties": {}, "entity": "api"})).json()[
        "run"
    ]["id"]
    h = other.headers
    assert (await client.get(f"/v1/actions/runs/{run_id}", headers=h)).status_code == 404
    assert (
        await client.patch(f"/v1/actions/runs/{run_id}", json={"status": "SUCCESS"}, headers=h)
    ).status_code == 404
    assert (
        await client.post(f"/v1/actions/runs/{run_id}/logs", json={"message": "x"}, headers=h)
    ).status_code == 404
    assert (await client.get(f"/v1/actions/runs/{run_id}/logs", headers=h)).status_code == 404
    assert (
        await client.get(f"/v1/actions/runs/{run_id}/logs/stream", headers=h)
    ).status_code == 404
    assert (
        await client.patch(
            f"/v1/actions/runs/{waiting}/approval", json={"status": "APPROVE"}, headers=h
        )
    ).status_code == 404
    assert (await client.get("/v1/actions/runs", headers=h)).json()["runs"] == []
    assert (await _run(client, other, "create-service", GOOD)).status_code == 404
    r = await client.post(
        f"/v1/blueprints/service/entities?run_id={run_id}",
        json={"identifier": "x", "properties": {}},
        headers=h,
    )
    assert r.status_code in (404, 422)
    # The owner's run is untouched.
    run = (await client.get(f"/v1/actions/runs/{run_id}", headers=owner.headers)).json()["run"]
    assert run["status"] == "IN_PROGRESS"
    logs = (await client.get(f"/v1/actions/runs/{run_id}/logs", headers=owner.headers)).json()
    assert logs["runLogs"] == []


async def _app_headers(
    client: httpx.AsyncClient, org: Org, name: str
) -> tuple[str, dict[str, str]]:
    """A new Admin machine credential of the org: its client id and bearer headers."""
    r = await client.post("/v1/apps", json={"name": name, "roles": ["Admin"]}, headers=org.headers)
    assert r.status_code == 201, r.text
    made = r.json()["app"]
    r = await client.post(
        "/v1/auth/access_token", json={"clientId": made["clientId"], "clientSecret": made["secret"]}
    )
    assert r.status_code == 200, r.text
    return made["clientId"], {"Authorization": f"Bearer {r.json()['accessToken']}"}


async def test_a_stream_ends_when_its_credential_is_deleted(
    client: httpx.AsyncClient, make_org: OrgFactory, live_server: LiveServer
) -> None:
    org = await make_org()
    await _setup(client, org)
    run_id = (await _run(client, org, "create-service", GOOD)).json()["run"]["id"]
    url = f"/v1/actions/runs/{run_id}/logs"
    await client.post(url, json={"message": "first"}, headers=org.headers)
    client_id, headers = await _app_headers(client, org, "watcher")
    first_seen = asyncio.Event()

    async def follow() -> str:
        text = ""
        async with (
            httpx.AsyncClient(base_url=live_server.url, timeout=30) as http,
            http.stream("GET", f"{url}/stream", headers=headers) as response,
        ):
            assert response.status_code == 200
            async for chunk in response.aiter_text():
                text += chunk
                if "first" in text:
                    first_seen.set()
        return text

    reader = asyncio.create_task(follow())
    await asyncio.wait_for(first_seen.wait(), 10)
    r = await client.delete(f"/v1/apps/{client_id}", headers=org.headers)
    assert r.status_code == 200, r.text
    # Before: the stream went on for as long as the run did.
    text = await asyncio.wait_for(reader, 10)
    events = [block for block in text.split("\n\n") if block.strip()]
    assert events[-1].startswith("event: error"), events
    body = json.loads(events[-1].split("data: ", 1)[1])
    assert body["ok"] is False and body["error"] == "invalid_token"


async def test_a_stream_ends_when_its_user_is_removed(
    app: FastAPI, client: httpx.AsyncClient, make_org: OrgFactory, live_server: LiveServer
) -> None:
    """A person's stream checks their membership every few seconds (5 by default)."""
    org = await make_org()
    await _setup(client, org)
    email = "watcher@example.com"
    r = await client.post(
        "/v1/users/invite", json={"invitee": {"email": email}}, headers=org.headers
    )
    assert r.status_code in (200, 201), r.text
    r = await client.patch(f"/v1/users/{email}", json={"roles": ["Admin"]}, headers=org.headers)
    assert r.status_code == 200, r.text
    token = app.state.tokens.issue(org_id=org.org_id, subject=email, kind="user", roles=[])
    run_id = (await _run(client, org, "create-service", GOOD)).json()["run"]["id"]
    opened = asyncio.Event()

    async def follow() -> str:
        async with (
            httpx.AsyncClient(base_url=live_server.url, timeout=30) as http,
            http.stream(
                "GET",
                f"/v1/actions/runs/{run_id}/logs/stream",
                headers={"Authorization": f"Bearer {token}"},
            ) as response,
        ):
            assert response.status_code == 200
            opened.set()
            return (await response.aread()).decode()

    reader = asyncio.create_task(follow())
    await asyncio.wait_for(opened.wait(), 10)
    r = await client.delete(f"/v1/users/{email}", headers=org.headers)
    assert r.status_code == 200, r.text
    text = await asyncio.wait_for(reader, 15)
    events = [block for block in text.split("\n\n") if block.strip()]
    assert events[-1].startswith("event: error"), events
    assert json.loads(events[-1].split("data: ", 1)[1])["error"] == "unknown_user"


class _Streams:
    """Live streams held open against the live server until let go."""

    def __init__(self, live_server: LiveServer) -> None:
        self.http = httpx.AsyncClient(base_url=live_server.url, timeout=30)
        self.tasks: list[tuple[asyncio.Event, asyncio.Event, asyncio.Task[int]]] = []

    def open(self, org: Org, run_id: str) -> int:
        opened, done = asyncio.Event(), asyncio.Event()

        async def hold() -> int:
            async with self.http.stream(
                "GET", f"/v1/actions/runs/{run_id}/logs/stream", headers=org.headers
            ) as response:
                opened.set()
                if response.status_code == 200:
                    await done.wait()
                return response.status_code

        self.tasks.append((opened, done, asyncio.create_task(hold())))
        return len(self.tasks) - 1

    async def opened(self, index: int) -> None:
        await asyncio.wait_for(self.tasks[index][0].wait(), 10)

    async def close(self, index: int) -> int:
        self.tasks[index][1].set()
        return await asyncio.wait_for(self.tasks[index][2], 10)

    async def aclose(self) -> None:
        for _, done, _ in self.tasks:
            done.set()
        await asyncio.gather(*(t for _, _, t in self.tasks), return_exceptions=True)
        await self.http.aclose()


async def test_live_streams_are_capped_per_org(
    client: httpx.AsyncClient, make_org: OrgFactory, live_server: LiveServer
) -> None:
    """B's streams beyond its cap (20 by default) are refused with 429 (Port's body,
    Retry-After); A still opens its own, and B gets a slot back when one of its ends."""
    a, b = await make_org(), await make_org()
    for org in (a, b):
        await _setup(client, org)
    run_a = (await _run(client, a, "create-service", GOOD)).json()["run"]["id"]
    run_b = (await _run(client, b, "create-service", GOOD)).json()["run"]["id"]
    held = _Streams(live_server)
    try:
        b_streams = [held.open(b, run_b) for _ in range(20)]
        for index in b_streams:
            await held.opened(index)
        async with held.http.stream(
            "GET", f"/v1/actions/runs/{run_b}/logs/stream", headers=b.headers
        ) as over:
            assert over.status_code == 429  # before: a 21st stream, and more
            body = json.loads(await over.aread())
        assert body["ok"] is False and body["error"] == "rate_limited"
        assert int(over.headers["retry-after"]) > 0
        mine = held.open(a, run_a)  # another org's cap is its own
        await held.opened(mine)
        assert await held.close(mine) == 200
        assert await held.close(b_streams[0]) == 200  # one of B's ends: its slot is free
        deadline = time.monotonic() + 10  # once the server has seen the disconnect
        while True:
            again = held.open(b, run_b)
            await held.opened(again)
            if await held.close(again) == 200:
                break
            assert time.monotonic() < deadline, "B's slot did not come back"
            await asyncio.sleep(0.2)
        assert all([await held.close(i) == 200 for i in b_streams[1:]])
    finally:
        await held.aclose()


async def test_idle_streams_hold_no_connection(
    client: httpx.AsyncClient, make_org: OrgFactory, live_server: LiveServer, db: Database
) -> None:
    org = await make_org()
    await _setup(client, org)
    run_id = (await _run(client, org, "create-service", GOOD)).json()["run"]["id"]
    held = _Streams(live_server)
    try:
        for index in [held.open(org, run_id) for _ in range(5)]:
            await held.opened(index)
        await asyncio.sleep(1.0)  # the run is quiet: the streams look less and less often
        busy = []
        for _ in range(20):
            async with db.system() as tx:
                busy.append(
                    await tx.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                        "current_database() AND pid <> pg_backend_pid() "
                        "AND state IS NOT NULL AND state <> 'idle' "
                        # The streams' looks (the rest of the suite's background work
                        # in this database is not theirs to count).
                        "AND query ILIKE '%action_run%' AND query NOT ILIKE '%dispatch_outbox%'"
                    )
                )
            await asyncio.sleep(0.05)
    finally:
        await held.aclose()
    # Five quiet streams: mostly no session busy at all, never one each.
    assert busy.count(0) >= 15 and max(busy) < 5, busy


# -- GET /v1/actions/runs/{id}/approvers --------------------------------------------------


async def _gated_run(
    client: httpx.AsyncClient, db: Database, org: Org, approval: Any = True
) -> str:
    """A run of `deploy` waiting for approval, which ann and bob (Members) may approve."""
    await _setup(client, org)
    for email in ("ann@example.com", "bob@example.com", "cid@example.com"):
        await add_user(db, org.org_id, email, roles=["Member"])
    r = await client.put(
        "/v1/actions/deploy", json={**DEPLOY, "requiredApproval": approval}, headers=org.headers
    )
    assert r.status_code == 200, r.text
    r = await client.patch(
        "/v1/actions/deploy/permissions",
        json={"approve": {"users": ["ann@example.com", "bob@example.com"], "roles": []}},
        headers=org.headers,
    )
    assert r.status_code == 200, r.text
    r = await _run(client, org, "deploy", {"properties": {}, "entity": "api"})
    assert r.json()["run"]["status"] == "WAITING_FOR_APPROVAL", r.text
    return str(r.json()["run"]["id"])


async def _approvers(
    client: httpx.AsyncClient, run_id: str, headers: dict[str, str], pending: str | None = None
) -> httpx.Response:
    params = {} if pending is None else {"include_pending_approvers": pending}
    return await client.get(f"/v1/actions/runs/{run_id}/approvers", params=params, headers=headers)


async def test_approvers_lists_who_decided_and_who_may_still(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, app: FastAPI
) -> None:
    org = await make_org()
    run_id = await _gated_run(client, db, org, {"type": "ALL"})
    ann = user_headers(app, org.org_id, "ann@example.com")
    r = await client.patch(
        f"/v1/actions/runs/{run_id}/approval",
        json={"status": "APPROVE", "description": "fine"},
        headers=ann,
    )
    assert r.status_code == 201, r.text
    r = await _approvers(client, run_id, org.headers, "true")
    assert r.status_code == 200, r.text
    assert r.json() == {
        "ok": True,
        "approvers": [
            {"userId": "ann@example.com", "state": "APPROVED", "description": "fine"},
            {"userId": "bob@example.com", "state": "PENDING", "description": None},
        ],
    }


async def test_approvers_leaves_out_pending_ones_unless_asked(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    run_id = await _gated_run(client, db, org)
    assert (await _approvers(client, run_id, org.headers)).json()["approvers"] == []
    pending = (await _approvers(client, run_id, org.headers, "true")).json()["approvers"]
    assert [a["userId"] for a in pending] == ["ann@example.com", "bob@example.com"]


async def test_a_decided_run_has_no_pending_approvers(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, app: FastAPI
) -> None:
    org = await make_org()
    run_id = await _gated_run(client, db, org)
    bob = user_headers(app, org.org_id, "bob@example.com")
    await client.patch(
        f"/v1/actions/runs/{run_id}/approval",
        json={"status": "DECLINE", "description": "not today"},
        headers=bob,
    )
    r = await _approvers(client, run_id, org.headers, "true")
    assert r.json()["approvers"] == [
        {"userId": "bob@example.com", "state": "DECLINED", "description": "not today"}
    ]


async def test_a_run_without_approval_has_no_approvers(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _setup(client, org)
    run_id = (await _run(client, org, "create-service", GOOD)).json()["run"]["id"]
    r = await _approvers(client, run_id, org.headers, "true")
    assert r.status_code == 200 and r.json()["approvers"] == []


async def test_approvers_are_read_by_whoever_reads_the_run(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, app: FastAPI
) -> None:
    org = await make_org()
    run_id = await _gated_run(client, db, org)
    ann = user_headers(app, org.org_id, "ann@example.com")  # an approver
    cid = user_headers(app, org.org_id, "cid@example.com")  # neither starter nor approver
    assert (await _approvers(client, run_id, ann)).status_code == 200
    r = await _approvers(client, run_id, cid)
    assert r.status_code == 403
    assert (r.json()["error"], r.json()["details"]["permission"]) == (
        "missing_permission",
        "runs.readAll",
    )


async def test_approvers_of_another_orgs_run_are_not_found(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org_a = await make_org()
    org_b = await make_org()
    run_id = await _gated_run(client, db, org_a)
    r = await _approvers(client, run_id, org_b.headers, "true")
    assert r.status_code == 404 and r.json()["ok"] is False


async def test_approvers_of_an_unknown_run_are_not_found(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    r = await _approvers(client, "r_nope", org.headers)
    assert r.status_code == 404 and r.json()["error"] == "not_found"


async def test_approvers_need_a_token_and_a_boolean(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    run_id = await _gated_run(client, db, org)
    assert (await _approvers(client, run_id, {})).status_code == 401
    r = await _approvers(client, run_id, org.headers, "maybe")
    assert r.status_code == 422 and r.json()["ok"] is False


async def test_the_run_list_leaves_out_the_fields_excluded(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _setup(client, org)
    assert (await _run(client, org, "create-service", GOOD)).status_code == 202
    r = await client.get(
        "/v1/actions/runs",
        params=[("exclude", "rawProperties"), ("exclude", "properties.owner"), ("exclude", "x.y")],
        headers=org.headers,
    )
    assert r.status_code == 200, r.text
    [run] = r.json()["runs"]
    assert "rawProperties" not in run
    assert run["properties"] == {"name": "billing", "language": "go", "replicas": 2}
    assert run["status"] == "IN_PROGRESS"


async def test_a_bulk_delete_is_tied_to_a_run_in_progress(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _setup(client, org)
    run_id = (await _run(client, org, "create-service", GOOD)).json()["run"]["id"]
    url = "/v1/blueprints/service/bulk/entities/delete"
    r = await client.post(
        url, params={"run_id": run_id}, json={"entities": ["api", "web"]}, headers=org.headers
    )
    assert r.status_code == 200, r.text
    async with db.system() as tx:
        tied = await tx.fetch(
            "SELECT DISTINCT run_id FROM entity_events WHERE org_id = $1 AND action = 'DELETE'",
            org.org_id,
        )
    assert [row["run_id"] for row in tied] == [run_id]
    r = await client.post(
        url, params={"run_id": "r_nope"}, json={"entities": ["x"]}, headers=org.headers
    )
    assert r.status_code == 422 and r.json()["error"] == "run_not_found"


async def test_deleting_all_entities_is_tied_to_a_run_in_progress(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await _setup(client, org)
    run_id = (await _run(client, org, "create-service", GOOD)).json()["run"]["id"]
    url = "/v1/blueprints/service/all-entities"
    r = await client.delete(url, params={"run_id": "r_nope"}, headers=org.headers)
    assert r.status_code == 422 and r.json()["error"] == "run_not_found"
    r = await client.delete(url, params={"run_id": run_id}, headers=org.headers)
    assert r.status_code == 200, r.text
    async with db.system() as tx:
        tied = await tx.fetch(
            "SELECT DISTINCT run_id FROM entity_events WHERE org_id = $1 AND action = 'DELETE'",
            org.org_id,
        )
    assert [row["run_id"] for row in tied] == [run_id]


# -- run_as ------------------------------------------------------------------------------


async def test_an_admin_starts_a_run_as_a_user_whose_permissions_decide(
    client: httpx.AsyncClient, app: FastAPI, make_org: OrgFactory, db: Database
) -> None:
    """`run_as` (Port's): the run is the user's, refused when the user may not run the
    action; the audit log records the Admin who asked."""
    org = await make_org()
    await _setup(client, org)
    await add_user(db, org.org_id, "ann@example.com", roles=["Member"])
    r = await client.post(
        "/v1/actions/create-service/runs",
        params={"run_as": "ann@example.com"},
        json=GOOD,
        headers=org.headers,
    )
    assert r.status_code == 202, r.text
    run = r.json()["run"]
    assert run["createdBy"] == "ann@example.com", run
    ann = user_headers(app, org.org_id, "ann@example.com")
    mine = await client.get("/v1/actions/runs", headers=ann)
    assert [x["id"] for x in mine.json()["runs"]] == [run["id"]], mine.text
    audit = await client.get(
        "/v1/audit-log", params={"resources": "run", "run_id": run["id"]}, headers=org.headers
    )
    assert audit.status_code == 200, audit.text
    assert {a["trigger"]["by"]["userId"] for a in audit.json()["audits"]} == {org.client_id}, (
        audit.text
    )

    r = await client.patch(
        "/v1/actions/create-service/permissions",
        json={"execute": {"roles": ["Admin"], "users": [], "teams": []}},
        headers=org.headers,
    )
    assert r.status_code == 200, r.text
    r = await client.post(
        "/v1/actions/create-service/runs",
        params={"run_as": "ann@example.com"},
        json=GOOD,
        headers=org.headers,
    )
    assert r.status_code == 403 and r.json()["ok"] is False, r.text
    # The Admin's own run is still allowed: it was ann's permission that refused.
    assert (await _run(client, org, "create-service", GOOD)).status_code == 202


async def test_a_person_who_is_admin_starts_a_run_as_a_user(
    client: httpx.AsyncClient, app: FastAPI, make_org: OrgFactory, db: Database
) -> None:
    """A person's roles come from the org, not the token (which carries none): an Admin
    signed in as a person may use run_as; the email matches whatever its case."""
    org = await make_org()
    await _setup(client, org)
    await add_user(db, org.org_id, "boss@example.com", roles=["Admin"])
    await add_user(db, org.org_id, "ann@example.com", roles=["Member"])
    boss = user_headers(app, org.org_id, "boss@example.com")
    r = await client.post(
        "/v1/actions/create-service/runs",
        params={"run_as": "Ann@Example.com"},
        json=GOOD,
        headers=boss,
    )
    assert r.status_code == 202, r.text
    run = r.json()["run"]
    assert run["createdBy"] == "ann@example.com"
    audit = await client.get(
        "/v1/audit-log", params={"resources": "run", "run_id": run["id"]}, headers=org.headers
    )
    assert {a["trigger"]["by"]["userId"] for a in audit.json()["audits"]} == {"boss@example.com"}


async def test_run_as_is_for_admins_and_names_a_user_of_the_org(
    client: httpx.AsyncClient, app: FastAPI, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    other = await make_org()
    await _setup(client, org)
    await add_user(db, org.org_id, "ann@example.com", roles=["Member"])
    await add_user(db, other.org_id, "zed@example.com", roles=["Admin"])
    ann = user_headers(app, org.org_id, "ann@example.com")

    async def start(who: dict[str, str], user: str) -> httpx.Response:
        return await client.post(
            "/v1/actions/create-service/runs", params={"run_as": user}, json=GOOD, headers=who
        )

    r = await start(ann, "ann@example.com")  # a Member may not, even as themself
    assert r.status_code == 403, r.text
    assert r.json()["details"]["permission"] == "runs.runAs"
    await add_user(db, org.org_id, "mod@example.com", roles=["service-moderator"])
    r = await start(user_headers(app, org.org_id, "mod@example.com"), "ann@example.com")
    assert r.status_code == 403, r.text
    r = await start(org.headers, "nobody@example.com")
    assert r.status_code == 404 and r.json()["error"] == "not_found", r.text
    r = await start(org.headers, "zed@example.com")  # another org's user
    assert r.status_code == 404 and "zed@example.com" in r.json()["message"], r.text
    r = await start(org.headers, org.client_id)  # a machine credential is no user
    assert r.status_code == 404, r.text
    async with db.system() as tx:
        count = await tx.fetchval("SELECT count(*) FROM action_runs WHERE org_id = $1", org.org_id)
    assert count == 0
