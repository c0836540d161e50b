"""Workflow INPUT nodes: a run waits in PostgreSQL for people to respond (approve, decline,
provide values), who may respond, outlets counted by button, the fallback, cancelling a
waiting run, a restart while waiting, other orgs, and every refusal in Port's error body."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.db.database import Database
from app.worker import InProcessWorker
from tests.conftest import Org, OrgFactory, dispatch_settings
from tests.receivers import WebhookReceiver
from tests.test_dispatch import signing_secret
from tests.test_permissions import add_user, user_headers
from tests.test_workflows import (
    create,
    link,
    nodes_of,
    pointers,
    run_of,
    start,
    wait_done,
    webhook,
    workflow,
)


def approval(**config: Any) -> dict[str, Any]:
    """Two approvals continue, one decline stops; a `reason` may be given."""
    return {
        "identifier": "approval",
        "title": "Approve",
        "config": {
            "type": "INPUT",
            "description": "Approve the deployment",
            "userInputs": {
                "properties": {"reason": {"type": "string", "maxLength": 50}},
                "buttons": [
                    {"identifier": "approve", "label": "Approve", "variant": "PRIMARY"},
                    {"identifier": "decline", "label": "Decline", "variant": "DANGER"},
                    {"identifier": "skip", "label": "Skip"},
                ],
            },
            "outlets": [
                {"evaluationMethod": "button", "identifier": "approve", "numOfResponders": 2},
                {"evaluationMethod": "button", "identifier": "decline", "numOfResponders": 1},
            ],
            **config,
        },
    }


def gated(url: str, **config: Any) -> dict[str, Any]:
    return workflow(
        "gated",
        [
            approval(**config),
            webhook(
                "deploy",
                url + "/deploy",
                body={
                    "name": "{{ .outputs.trigger.name }}",
                    "reasons": "{{ [.outputs.approval.responses[].inputs.reason] }}",
                    "by": "{{ .outputs.approval.responses[0].submitterInfo.submittedBy }}",
                },
            ),
            webhook("declined", url + "/declined"),
            webhook("skipped", url + "/skipped"),
        ],
        [
            link("trigger", "approval"),
            link("approval", "deploy", sourceOutletIdentifier="approve"),
            link("approval", "declined", sourceOutletIdentifier="decline"),
            link("approval", "skipped", fallback=True),
        ],
    )


async def waiting_node(client: httpx.AsyncClient, org: Org, run_id: str) -> dict[str, Any]:
    for _ in range(400):
        run = await run_of(client, org, run_id)
        node = nodes_of(run).get("approval")
        if node is not None:
            return node
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} never reached its INPUT node")


async def respond(
    client: httpx.AsyncClient, headers: dict[str, str], node_run_id: str, **body: Any
) -> httpx.Response:
    return await client.post(
        f"/v1/workflows/nodes/runs/{node_run_id}/responses", json=body, headers=headers
    )


def refused(r: httpx.Response, status: int, error: str) -> None:
    assert r.status_code == status, r.text
    found = r.json()
    assert found["ok"] is False and found["error"] == error, found
    assert isinstance(found["message"], str) and found["message"]


async def people(db: Database, app: FastAPI, org: Org) -> dict[str, dict[str, str]]:
    found = {}
    for name, teams in (("alice", []), ("bob", ["platform"]), ("carol", [])):
        email = f"{name}@example.com"
        await add_user(db, org.org_id, email, roles=["Member"], teams=teams)
        found[name] = user_headers(app, org.org_id, email)
    return found


# ---------------------------------------------------------------------------------------
# Definitions


def _invalid() -> list[tuple[str, dict[str, Any], str, str]]:
    base = approval()["config"]
    cases: list[tuple[str, dict[str, Any], str, str]] = [
        ("no buttons", {**base, "userInputs": {"properties": {}}}, "/userInputs/buttons", ""),
        (
            "an outlet without its button",
            {**base, "outlets": [{"identifier": "ship"}]},
            "/outlets/0/identifier",
            "no button",
        ),
        (
            "no responders counted",
            {**base, "outlets": [{"identifier": "approve", "numOfResponders": 0}]},
            "/outlets/0/numOfResponders",
            "whole number",
        ),
        (
            "another evaluation method",
            {**base, "outlets": [{"identifier": "approve", "evaluationMethod": "jq"}]},
            "/outlets/0/evaluationMethod",
            "button",
        ),
        ("notifications", {**base, "notifications": []}, "/notifications", "not available"),
        (
            "templates in the description",
            {**base, "description": "{{ .outputs.trigger.name }}"},
            "/description",
            "not available",
        ),
        (
            "responders that are not names",
            {**base, "responders": {"users": "alice"}},
            "/responders/users",
            "list of names",
        ),
        (
            "a button's unknown field",
            {
                **base,
                "userInputs": {**base["userInputs"], "buttons": [{"identifier": "a", "x": 1}]},
            },
            "/userInputs/buttons/0/x",
            "unknown field",
        ),
        (
            "an input that is not JSON Schema",
            {
                **base,
                "userInputs": {
                    **base["userInputs"],
                    "properties": {"n": {"type": "string", "minLength": -1}},
                },
            },
            "/userInputs/properties/n",
            "JSON Schema",
        ),
        ("a timeout of no time", {**base, "timeoutSeconds": 0}, "/timeoutSeconds", "from 1"),
        ("a timeout as text", {**base, "timeoutSeconds": "1h"}, "/timeoutSeconds", "whole"),
        (
            "a button named as the timeout outlet",
            {
                **base,
                "timeoutSeconds": 60,
                "userInputs": {"buttons": [{"identifier": "timeout"}]},
                "outlets": [{"identifier": "timeout"}],
            },
            "/userInputs/buttons/0/identifier",
            "timeout",
        ),
    ]
    return cases


@pytest.mark.parametrize("case", _invalid(), ids=lambda c: c[0])
async def test_an_invalid_input_node_is_a_422_naming_the_problem(
    client: httpx.AsyncClient, make_org: OrgFactory, case: tuple[str, Any, str, str]
) -> None:
    _, config, pointer, words = case
    org = await make_org()
    body = workflow("w", [{"identifier": "approval", "config": config}], [])
    r = await client.post("/v1/workflows", json=body, headers=org.headers)
    refused(r, 422, "invalid_request")
    details = {d["pointer"]: d["message"] for d in r.json()["details"]}
    assert f"/nodes/1/config{pointer}" in details, details
    assert words in details[f"/nodes/1/config{pointer}"]


async def test_an_input_nodes_connections_name_an_outlet_or_the_fallback(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    hook = webhook("hook", "http://127.0.0.1:9/h")
    for connection, pointer in (
        (link("approval", "hook"), "/connections/1"),
        (link("approval", "hook", sourceOutletIdentifier="skip"), "/connections/1/"),
    ):
        body = workflow("w", [approval(), hook], [link("trigger", "approval"), connection])
        r = await client.post("/v1/workflows", json=body, headers=org.headers)
        refused(r, 422, "invalid_request")
        assert any(p.startswith(pointer) for p in pointers(r)), r.text


# ---------------------------------------------------------------------------------------
# Responding


async def test_an_approval_waits_for_its_responders_and_their_values_flow_on(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    db: Database,
    app: FastAPI,
    start_worker: Callable[..., Settings],
) -> None:
    org = await make_org()
    who = await people(db, app, org)
    with WebhookReceiver(await signing_secret(client, org)) as receiver:
        body = gated(
            receiver.url, responders={"users": ["Alice@example.com"], "teams": ["platform"]}
        )
        await create(client, org, body)
        start_worker()
        run_id = (await start(client, org, "gated", {"name": "api"})).json()["workflowRun"][
            "identifier"
        ]
        node = await waiting_node(client, org, run_id)
        assert node["status"] == "IN_PROGRESS" and node["waitingForInput"] is True
        assert node["output"] == {"responses": []}
        assert (await run_of(client, org, run_id))["waitingForInput"] is True

        # carol is not a responder; alice answers once.
        r = await respond(client, who["carol"], node["identifier"], button="approve")
        refused(r, 403, "missing_permission")
        assert r.json()["details"]["permission"] == "workflowRuns.respond"
        r = await respond(
            client, who["alice"], node["identifier"], button="approve", inputs={"reason": "ok"}
        )
        assert r.status_code == 200, r.text
        still = nodes_of(r.json()["workflowRun"])["approval"]
        assert still["waitingForInput"] is True and len(still["output"]["responses"]) == 1
        r = await respond(client, who["alice"], node["identifier"], button="approve")
        refused(r, 409, "already_responded")

        # bob (through his team) is the second approval: the run moves on.
        r = await respond(
            client, who["bob"], node["identifier"], button="approve", inputs={"reason": "lgtm"}
        )
        assert r.status_code == 200, r.text
        run = await wait_done(client, org, run_id)
        assert run["result"] == "SUCCESS" and run["waitingForInput"] is False
        assert [n["node"]["identifier"] for n in run["nodeRuns"]] == [
            "trigger",
            "approval",
            "deploy",
        ]
        done = nodes_of(run)["approval"]
        assert done["selectedOutlet"] == {"identifier": "approve"}
        assert done["output"]["selectedOutlet"] == {"identifier": "approve"}
        assert [x["submitterInfo"]["submittedBy"] for x in done["output"]["responses"]] == [
            "alice@example.com",
            "bob@example.com",
        ]
        [delivery] = receiver.deliveries
        assert delivery.path == "/deploy"
        assert delivery.body == {
            "name": "api",
            "reasons": ["ok", "lgtm"],
            "by": "alice@example.com",
        }
        r = await respond(client, who["carol"], node["identifier"], button="approve")
        refused(r, 409, "node_run_ended")


async def test_one_decline_or_a_button_without_an_outlet_takes_its_path(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    with WebhookReceiver(await signing_secret(client, org)) as receiver:
        await create(client, org, gated(receiver.url))
        start_worker()
        ends = {}
        for button in ("decline", "skip"):
            run_id = (await start(client, org, "gated", {"name": button})).json()["workflowRun"][
                "identifier"
            ]
            node = await waiting_node(client, org, run_id)
            r = await respond(client, org.headers, node["identifier"], button=button)
            assert r.status_code == 200, r.text
            ends[button] = await wait_done(client, org, run_id)
    assert [n["node"]["identifier"] for n in ends["decline"]["nodeRuns"]][-1] == "declined"
    skipped = ends["skip"]
    assert [n["node"]["identifier"] for n in skipped["nodeRuns"]][-1] == "skipped"
    assert nodes_of(skipped)["approval"]["output"]["selectedOutlet"] is None
    assert sorted(d.path for d in receiver.deliveries) == ["/declined", "/skipped"]


async def test_by_default_the_starter_and_admins_respond(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, app: FastAPI
) -> None:
    org = await make_org()
    who = await people(db, app, org)
    body = workflow(
        "values",
        [
            {
                "identifier": "approval",
                "config": {
                    "type": "INPUT",
                    "userInputs": {
                        "properties": {"replicas": {"type": "number", "minimum": 1}},
                        "required": ["replicas"],
                        "buttons": [{"identifier": "submit", "label": "Submit"}],
                    },
                    "outlets": [{"identifier": "submit"}],
                },
            }
        ],
        [link("trigger", "approval")],
    )
    await create(client, org, body)
    runs = []
    for _ in range(2):
        r = await start(client, who["alice"], "values", {"name": "api"})
        runs.append(r.json()["workflowRun"])
    first = nodes_of(runs[0])["approval"]["identifier"]
    second = nodes_of(runs[1])["approval"]["identifier"]
    refused(
        await respond(client, who["bob"], first, inputs={"replicas": 2}), 403, "missing_permission"
    )
    # The one button is pressed when none is named; values are checked as a trigger's.
    r = await respond(client, who["alice"], first, inputs={"replicas": 0})
    refused(r, 422, "invalid_request")
    assert pointers(r) == {"/inputs/replicas"}
    r = await respond(client, who["alice"], first, inputs={"replicas": 3})
    assert r.status_code == 200, r.text
    run = r.json()["workflowRun"]
    assert (run["status"], run["result"]) == ("COMPLETED", "SUCCESS")
    assert nodes_of(run)["approval"]["output"]["responses"][0]["inputs"] == {"replicas": 3}
    r = await respond(client, org.headers, second, inputs={"replicas": 1})  # an Admin
    assert r.status_code == 200, r.text


async def test_a_response_is_refused_in_ports_error_body(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await create(client, org, gated("http://127.0.0.1:9"))
    run = (await start(client, org, "gated", {"name": "api"})).json()["workflowRun"]
    node = nodes_of(run)["approval"]["identifier"]
    trigger = nodes_of(run)["trigger"]["identifier"]
    refused(await respond(client, org.headers, "wfnr_nope", button="approve"), 404, "not_found")
    refused(await respond(client, org.headers, trigger, button="approve"), 422, "not_an_input_node")
    r = await respond(client, org.headers, node)  # three buttons: one must be named
    refused(r, 422, "invalid_request")
    assert pointers(r) == {"/button"}
    r = await respond(client, org.headers, node, button="ship")
    refused(r, 422, "invalid_request")
    assert pointers(r) == {"/button"}
    r = await respond(client, org.headers, node, button="approve", inputs={"colour": "red"})
    refused(r, 422, "invalid_request")
    refused(
        await respond(client, org.headers, node, button="approve", extra=1), 422, "invalid_request"
    )
    r = await client.post(
        f"/v1/workflows/nodes/runs/{node}/responses", content=b"[1", headers=org.headers
    )
    assert r.status_code in (400, 422) and r.json()["ok"] is False
    # None of these was recorded.
    after = nodes_of(await run_of(client, org, run["identifier"]))["approval"]
    assert after["output"] == {"responses": []}


async def test_cancelling_a_waiting_run_ends_its_input_node(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await create(client, org, gated("http://127.0.0.1:9"))
    run = (await start(client, org, "gated", {"name": "api"})).json()["workflowRun"]
    node = nodes_of(run)["approval"]["identifier"]
    r = await client.post(f"/v1/workflows/runs/{run['identifier']}/cancel", headers=org.headers)
    assert r.status_code == 200, r.text
    cancelled = nodes_of(r.json()["workflowRun"])["approval"]
    assert cancelled["result"] == "CANCELLED" and cancelled["waitingForInput"] is False
    refused(await respond(client, org.headers, node, button="approve"), 409, "node_run_ended")


async def test_a_waiting_run_holds_nothing_and_survives_a_restart(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    db: Database,
    settings: Settings,
    start_worker: Callable[..., Settings],
) -> None:
    org = await make_org()
    with WebhookReceiver(await signing_secret(client, org)) as receiver:
        body = gated(receiver.url)
        body["nodes"][1]["config"]["outlets"][0]["numOfResponders"] = 1
        await create(client, org, body)
        first = InProcessWorker(dispatch_settings(settings))
        first.start()
        try:
            run_id = (await start(client, org, "gated", {"name": "api"})).json()["workflowRun"][
                "identifier"
            ]
            node = await waiting_node(client, org, run_id)
        finally:
            await first.stop()
        async with db.tenant(org.org_id) as tx:
            held = await tx.fetchrow(
                "SELECT n.state, n.claim, n.lease_until, (SELECT count(*) FROM workflow_outbox o "
                "WHERE o.org_id = n.org_id AND o.node_run_id = n.id) AS queued "
                "FROM workflow_node_runs n WHERE n.org_id = $1 AND n.id = $2",
                org.org_id,
                node["identifier"],
            )
        assert dict(held) == {"state": "waiting", "claim": None, "lease_until": None, "queued": 0}
        # Another worker process takes over; the answer moves the run on through it.
        start_worker()
        r = await respond(client, org.headers, node["identifier"], button="approve")
        assert r.status_code == 200, r.text
        run = await wait_done(client, org, run_id)
    assert run["result"] == "SUCCESS"
    assert [d.path for d in receiver.deliveries] == ["/deploy"]


async def test_another_org_can_neither_see_nor_answer_a_waiting_node(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    mine, theirs = await make_org(), await make_org()
    await create(client, mine, gated("http://127.0.0.1:9"))
    await create(client, theirs, copy.deepcopy(gated("http://127.0.0.1:9")))
    run = (await start(client, mine, "gated", {"name": "api"})).json()["workflowRun"]
    node = nodes_of(run)["approval"]["identifier"]
    refused(await respond(client, theirs.headers, node, button="decline"), 404, "not_found")
    r = await client.get(f"/v1/workflows/runs/{run['identifier']}", headers=theirs.headers)
    refused(r, 404, "not_found")
    assert nodes_of(await run_of(client, mine, run["identifier"]))["approval"]["output"] == {
        "responses": []
    }


async def test_a_private_runs_input_node_is_not_found_by_who_may_not_read_the_run(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, app: FastAPI
) -> None:
    org = await make_org()
    who = await people(db, app, org)
    body = {**gated("http://127.0.0.1:9"), "allowAnyoneToViewRuns": False}
    await create(client, org, body)
    run = (await start(client, who["alice"], "gated", {"name": "api"})).json()["workflowRun"]
    node = nodes_of(run)["approval"]["identifier"]
    refused(await respond(client, who["carol"], node, button="approve"), 404, "not_found")


async def _expire_until_done(
    client: httpx.AsyncClient, org: Org, db: Database, run_id: str
) -> dict[str, Any]:
    """The worker's sweep also expires inputs (every few seconds): this one now."""
    from app.workflows import engine

    await engine.expire_inputs(db)
    return await wait_done(client, org, run_id)


async def test_an_input_past_its_timeout_takes_the_timeout_outlet(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    db: Database,
    start_worker: Callable[..., Settings],
) -> None:
    from app.workflows import engine

    org = await make_org()
    with WebhookReceiver(await signing_secret(client, org)) as receiver:
        body = gated(receiver.url, timeoutSeconds=1)
        late = webhook("late", receiver.url + "/late", body={"t": "{{ .outputs.approval }}"})
        body["nodes"].append(late)
        body["connections"].append(link("approval", "late", sourceOutletIdentifier="timeout"))
        await create(client, org, body)
        start_worker()
        run_id = (await start(client, org, "gated", {"name": "api"})).json()["workflowRun"][
            "identifier"
        ]
        node = await waiting_node(client, org, run_id)
        assert await engine.expire_inputs(db) == 0  # not yet
        r = await respond(client, org.headers, node["identifier"], button="approve")
        assert r.status_code == 200, r.text  # one of the two approvals it waits for
        await asyncio.sleep(1.1)
        run = await _expire_until_done(client, org, db, run_id)
        delivered = await receiver.wait_for(1)
        r = await respond(client, org.headers, node["identifier"], button="approve")
    refused(r, 409, "node_run_ended")
    assert run["result"] == "SUCCESS"
    output = nodes_of(run)["approval"]["output"]
    assert output["selectedOutlet"] == {"identifier": "timeout"} and output["timedOut"] is True
    assert [x["button"] for x in output["responses"]] == ["approve"]
    assert [d.path for d in delivered] == ["/late"]
    assert delivered[0].body["t"]["timedOut"] is True


async def test_a_timeout_without_its_connection_takes_the_fallback(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    db: Database,
    start_worker: Callable[..., Settings],
) -> None:
    org = await make_org()
    with WebhookReceiver(await signing_secret(client, org)) as receiver:
        await create(client, org, gated(receiver.url, timeoutSeconds=1))
        start_worker()
        run_id = (await start(client, org, "gated", {"name": "api"})).json()["workflowRun"][
            "identifier"
        ]
        await waiting_node(client, org, run_id)
        await asyncio.sleep(1.1)
        run = await _expire_until_done(client, org, db, run_id)
        delivered = await receiver.wait_for(1)
    assert run["result"] == "SUCCESS"
    assert [d.path for d in delivered] == ["/skipped"]


async def test_an_input_answered_in_time_never_times_out_and_others_wait_on(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    db: Database,
    start_worker: Callable[..., Settings],
) -> None:
    from app.workflows import engine

    org, other = await make_org(), await make_org()
    with WebhookReceiver(await signing_secret(client, org)) as receiver:
        await create(client, org, gated(receiver.url, timeoutSeconds=1))
        await create(client, other, gated(receiver.url))  # no timeout: it waits on
        start_worker()
        run_id = (await start(client, org, "gated", {"name": "api"})).json()["workflowRun"][
            "identifier"
        ]
        other_id = (await start(client, other, "gated", {"name": "api"})).json()["workflowRun"][
            "identifier"
        ]
        node = await waiting_node(client, org, run_id)
        r = await respond(client, org.headers, node["identifier"], button="decline")
        assert r.status_code == 200, r.text
        await asyncio.sleep(1.1)
        await engine.expire_inputs(db)
        run = await wait_done(client, org, run_id)
        delivered = await receiver.wait_for(1)
        waiting = await waiting_node(client, other, other_id)
    assert [d.path for d in delivered] == ["/declined"]
    assert nodes_of(run)["approval"]["output"]["selectedOutlet"] == {"identifier": "decline"}
    assert waiting["status"] == "IN_PROGRESS" and waiting["waitingForInput"] is True
