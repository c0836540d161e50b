"""A workflow run's live stream (server-sent events): the order of its events, its end with
the run's, its end with its caller's credential, the org's cap on open streams (shared with
action runs' log streams), other orgs, and every refusal in Port's error body."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from typing import Any

import httpx

from app.config import Settings
from app.db.database import Database
from tests.conftest import LiveServer, Org, OrgFactory
from tests.receivers import WebhookReceiver
from tests.test_dispatch import signing_secret
from tests.test_permissions import app_headers
from tests.test_runs import GOOD, _app_headers, _run, _setup
from tests.test_workflows import condition, create, link, run_of, start, webhook, workflow


def gate(identifier: str = "gate") -> dict[str, Any]:
    """An INPUT node that one press of `approve` moves on."""
    return {
        "identifier": identifier,
        "config": {
            "type": "INPUT",
            "userInputs": {"buttons": [{"identifier": "approve", "label": "Approve"}]},
            "outlets": [{"identifier": "approve", "evaluationMethod": "button"}],
        },
    }


WAITING = workflow("waiting", [gate()], [link("trigger", "gate")])


def stream_url(run_id: str) -> str:
    return f"/v1/workflows/runs/{run_id}/stream"


def parse(text: str) -> list[tuple[str, Any, str | None]]:
    """(event, data, id) of each event; comments (keep-alives) left out."""
    out = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
        if "event" in fields:
            out.append((fields["event"], json.loads(fields["data"]), fields.get("id")))
    return out


async def _started(client: httpx.AsyncClient, org: Org, identifier: str) -> str:
    r = await start(client, org, identifier, {"name": "api"})
    assert r.status_code == 202, r.text
    return str(r.json()["workflowRun"]["identifier"])


async def _read(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> str:
    async with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        return (await response.aread()).decode()


async def test_a_runs_progress_streams_in_order_and_ends_with_the_run(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    start_worker: Callable[..., Settings],
    live_server: LiveServer,
) -> None:
    org = await make_org()
    path = ["trigger", "first", "check", "gate", "second"]
    with WebhookReceiver(await signing_secret(client, org), delay=0.2) as receiver:
        body = workflow(
            "streamed",
            [
                webhook("first", receiver.url + "/first"),
                condition("check", yes=".outputs.first.response.status == 200"),
                gate(),
                webhook("second", receiver.url + "/second"),
            ],
            [
                link("trigger", "first"),
                link("first", "check"),
                link("check", "gate", sourceOutletIdentifier="yes"),
                link("gate", "second", sourceOutletIdentifier="approve"),
            ],
        )
        await create(client, org, body)
        run_id = await _started(client, org, "streamed")
        waiting_seen = asyncio.Event()

        async def follow() -> str:
            text = ""
            async with (
                httpx.AsyncClient(base_url=live_server.url, timeout=60) as http,
                http.stream("GET", stream_url(run_id), headers=org.headers) as response,
            ):
                assert response.status_code == 200
                async for chunk in response.aiter_text():
                    text += chunk
                    if any(n == "run" and d["waitingForInput"] for n, d, _ in parse(text)):
                        waiting_seen.set()
            return text

        reader = asyncio.create_task(follow())
        await asyncio.sleep(0.3)
        start_worker()
        await asyncio.wait_for(waiting_seen.wait(), 30)
        node_runs = (await run_of(client, org, run_id))["nodeRuns"]
        waiting = next(n["identifier"] for n in node_runs if n["node"]["identifier"] == "gate")
        r = await client.post(
            f"/v1/workflows/nodes/runs/{waiting}/responses",
            json={"button": "approve"},
            headers=org.headers,
        )
        assert r.status_code == 200, r.text
        events = parse(await asyncio.wait_for(reader, 30))

    names = [name for name, _, _ in events]
    assert names[0] == "run" and events[0][1]["status"] == "IN_PROGRESS"
    assert names[-2:] == ["run", "end"]
    assert events[-2][1]["status"] == "COMPLETED" and events[-2][1]["result"] == "SUCCESS"
    assert events[-1][1] == {"status": "COMPLETED", "result": "SUCCESS"}
    assert names.count("end") == 1
    # Node runs appear in the order of the run's path, each once it has a place on it.
    first_seen: dict[str, int] = {}
    last_seen: dict[str, int] = {}
    by_id: dict[str, str] = {}
    for index, (name, data, _) in enumerate(events):
        if name == "nodeRun":
            node = data["node"]["identifier"]
            first_seen.setdefault(node, index)
            last_seen[node] = index
            by_id[data["identifier"]] = node
            assert data["identifier"].startswith("wfnr_") and "nodeRunLogs" not in data
    assert sorted(first_seen, key=first_seen.__getitem__) == path
    final = {events[i][1]["node"]["identifier"]: events[i][1] for i in last_seen.values()}
    assert all(n["status"] == "COMPLETED" and n["result"] == "SUCCESS" for n in final.values())
    # A node's completion is sent before the next node appears.
    for before, after in itertools.pairwise(path):
        assert last_seen[before] < first_seen[after], (before, after, names)
    # The run was seen waiting for input, before the INPUT node completed.
    waited = [i for i, (n, d, _) in enumerate(events) if n == "run" and d["waitingForInput"]]
    assert waited and waited[0] < last_seen["gate"]
    assert any(n == "nodeRun" and d["waitingForInput"] for n, d, _ in events)
    # Each log follows its node run's first event, in the order written, under its id.
    logs = [(i, d, event_id) for i, (n, d, event_id) in enumerate(events) if n == "log"]
    assert logs
    for index, data, event_id in logs:
        assert event_id == data["id"]
        node = by_id[data["nodeRunIdentifier"]]
        assert data["node"]["identifier"] == node and first_seen[node] < index
    assert [int(d["id"]) for _, d, _ in logs] == sorted(int(d["id"]) for _, d, _ in logs)
    messages = [d["message"] for _, d, _ in logs]
    assert any("pressed 'approve'" in m for m in messages)

    # Last-Event-ID: resumed after a log, only the later logs come again.
    middle = logs[len(logs) // 2][1]["id"]
    text = await _read(client, stream_url(run_id), {**org.headers, "Last-Event-ID": middle})
    resumed = [d["id"] for n, d, _ in parse(text) if n == "log"]
    assert resumed == [d["id"] for _, d, _ in logs if int(d["id"]) > int(middle)]
    assert parse(text)[-1][0] == "end"


async def test_a_stream_ends_when_its_run_is_cancelled(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await create(client, org, WAITING)
    run_id = await _started(client, org, "waiting")
    reader = asyncio.create_task(_read(client, stream_url(run_id), org.headers))
    await asyncio.sleep(0.5)
    assert not reader.done()  # a waiting run: the stream goes on
    r = await client.post(f"/v1/workflows/runs/{run_id}/cancel", headers=org.headers)
    assert r.status_code == 200, r.text
    events = parse(await asyncio.wait_for(reader, 10))
    assert events[-1] == ("end", {"status": "COMPLETED", "result": "CANCELLED"}, None)
    gate_events = [d for n, d, _ in events if n == "nodeRun" and d["node"]["identifier"] == "gate"]
    assert gate_events[0]["waitingForInput"] is True
    assert gate_events[-1]["result"] == "CANCELLED"


async def test_a_stream_of_an_ended_run_sends_it_and_ends(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await create(client, org, WAITING)
    run_id = await _started(client, org, "waiting")
    await client.post(f"/v1/workflows/runs/{run_id}/cancel", headers=org.headers)
    events = parse(await asyncio.wait_for(_read(client, stream_url(run_id), org.headers), 10))
    assert events[0][0] == "run" and events[-1][0] == "end"
    assert [d["node"]["identifier"] for n, d, _ in events if n == "nodeRun"] == [
        "trigger",
        "gate",
    ]


async def test_a_workflow_stream_ends_when_its_credential_is_deleted(
    client: httpx.AsyncClient, make_org: OrgFactory, live_server: LiveServer
) -> None:
    org = await make_org()
    await create(client, org, WAITING)
    run_id = await _started(client, org, "waiting")
    client_id, headers = await _app_headers(client, org, "watcher")
    opened = asyncio.Event()

    async def follow() -> str:
        text = ""
        async with (
            httpx.AsyncClient(base_url=live_server.url, timeout=30) as http,
            http.stream("GET", stream_url(run_id), headers=headers) as response,
        ):
            assert response.status_code == 200
            async for chunk in response.aiter_text():
                text += chunk
                if "event: nodeRun" in text:
                    opened.set()
        return text

    reader = asyncio.create_task(follow())
    await asyncio.wait_for(opened.wait(), 10)
    r = await client.delete(f"/v1/apps/{client_id}", headers=org.headers)
    assert r.status_code == 200, r.text
    events = parse(await asyncio.wait_for(reader, 10))
    assert events[-1][0] == "error", events
    assert events[-1][1]["ok"] is False and events[-1][1]["error"] == "invalid_token"
    assert (await run_of(client, org, run_id))["status"] == "IN_PROGRESS"  # the run goes on


class _Held:
    """Streams held open against the live server until let go."""

    def __init__(self, live_server: LiveServer) -> None:
        self.http = httpx.AsyncClient(base_url=live_server.url, timeout=30)
        self.tasks: list[tuple[asyncio.Event, asyncio.Event, asyncio.Task[int]]] = []

    def open(self, org: Org, url: str) -> int:
        opened, done = asyncio.Event(), asyncio.Event()

        async def hold() -> int:
            async with self.http.stream("GET", url, headers=org.headers) as response:
                opened.set()
                if response.status_code == 200:
                    await done.wait()
                return response.status_code

        self.tasks.append((opened, done, asyncio.create_task(hold())))
        return len(self.tasks) - 1

    async def status(self, index: int) -> int:
        await asyncio.wait_for(self.tasks[index][0].wait(), 10)
        self.tasks[index][1].set()
        return await asyncio.wait_for(self.tasks[index][2], 10)

    async def opened(self, index: int) -> None:
        await asyncio.wait_for(self.tasks[index][0].wait(), 10)

    async def aclose(self) -> None:
        for _, done, _ in self.tasks:
            done.set()
        await asyncio.gather(*(t for _, _, t in self.tasks), return_exceptions=True)
        await self.http.aclose()


async def test_workflow_streams_count_against_the_orgs_cap_of_live_streams(
    client: httpx.AsyncClient, make_org: OrgFactory, live_server: LiveServer
) -> None:
    """B's streams beyond its cap (20 by default, every kind of live stream together) are
    refused with 429 in Port's body with Retry-After; A's are its own."""
    a, b = await make_org(), await make_org()
    for org in (a, b):
        await create(client, org, WAITING)
    run_a, run_b = await _started(client, a, "waiting"), await _started(client, b, "waiting")
    await _setup(client, b)
    action_run = (await _run(client, b, "create-service", GOOD)).json()["run"]["id"]
    held = _Held(live_server)
    try:
        b_streams = [held.open(b, stream_url(run_b)) for _ in range(19)]
        b_streams.append(held.open(b, f"/v1/actions/runs/{action_run}/logs/stream"))
        for index in b_streams:
            await held.opened(index)
        async with held.http.stream("GET", stream_url(run_b), headers=b.headers) as over:
            assert over.status_code == 429
            body = json.loads(await over.aread())
        assert body["ok"] is False and body["error"] == "rate_limited" and body["message"]
        assert int(over.headers["retry-after"]) > 0
        assert await held.status(held.open(a, stream_url(run_a))) == 200
        assert await held.status(b_streams[0]) == 200  # one of B's ends: its slot comes back
        deadline = time.monotonic() + 10
        while await held.status(held.open(b, stream_url(run_b))) != 200:
            assert time.monotonic() < deadline, "B's slot did not come back"
            await asyncio.sleep(0.2)
    finally:
        await held.aclose()


async def test_another_org_and_other_refusals_get_ports_error_body(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    mine, theirs = await make_org(), await make_org()
    private = {**WAITING, "identifier": "private", "allowAnyoneToViewRuns": False}
    await create(client, mine, private)
    run_id = await _started(client, mine, "private")
    member = await app_headers(client, db, mine.org_id, ["Member"])
    cases = [
        (theirs.headers, stream_url(run_id), 404),  # another org's run
        (mine.headers, stream_url("wfr_missing"), 404),
        (member, stream_url(run_id), 404),  # a run the caller may not read
        ({}, stream_url(run_id), 401),
        ({"Authorization": "Bearer nonsense"}, stream_url(run_id), 401),
        (mine.headers, stream_url("x" * 41), 422),
        (mine.headers, stream_url(run_id) + "?follow=1", 422),
    ]
    for headers, url, status in cases:
        r = await client.get(url, headers=headers)
        assert r.status_code == status, (url, r.text)
        body = r.json()
        assert body["ok"] is False and body["error"] and body["message"], (url, body)
    # The owner follows it.
    await client.post(f"/v1/workflows/runs/{run_id}/cancel", headers=mine.headers)
    events = parse(await _read(client, stream_url(run_id), mine.headers))
    assert events[-1][0] == "end"
