"""Workflow runs under load and faults: 100 runs at once each run every node exactly once; a
worker killed with SIGKILL mid-run, and started again, leaves no node skipped and sends no
node twice under different ids (a node in flight at the kill is sent again with its node run
id as `webhook-id`, which the receiver dedupes); Redis gone for a moment loses no run and
runs no node twice, while the API goes on taking runs (only /readyz, which reports Redis,
answers 503 with Retry-After)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx

from app.config import Settings
from app.db.database import Database
from app.main import create_app
from tests import test_dispatch_faults
from tests.conftest import Org, OrgFactory
from tests.receivers import WebhookReceiver
from tests.test_dispatch import SERVICE, signing_secret
from tests.test_dispatch_faults import RedisProcess
from tests.test_workflows import condition, create, link, run_of, start, upsert, webhook, workflow

worker_process = test_dispatch_faults.worker_process
own_redis = test_dispatch_faults.own_redis
PATH = ["trigger", "first", "check", "second", "register"]


async def test_a_worker_killed_mid_run_resumes_without_skipping_or_resending_a_node(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    worker_process: Callable[..., subprocess.Popen[bytes]],
    db: Database,
) -> None:
    org = await make_org()
    await client.post("/v1/blueprints", json=SERVICE, headers=org.headers)
    queue = f"portolan-test:wf-kill-{os.getpid()}-{time.monotonic_ns()}"
    with WebhookReceiver(await signing_secret(client, org), delay=0.5) as receiver:
        body = workflow(
            "five",
            [
                webhook(
                    "first", receiver.url + "/first", body={"n": "{{ .outputs.trigger.name }}"}
                ),
                condition("check", yes=".outputs.first.response.status == 200"),
                webhook("second", receiver.url + "/second"),
                upsert("register", {"identifier": "{{ .outputs.trigger.name }}"}),
            ],
            [
                link("trigger", "first"),
                link("first", "check"),
                link("check", "second", sourceOutletIdentifier="yes"),
                link("second", "register"),
            ],
        )
        await create(client, org, body)
        ids = []
        for i in range(20):
            r = await start(client, org, "five", {"name": f"svc{i}"})
            assert r.status_code == 202, r.text
            ids.append(r.json()["workflowRun"]["identifier"])
        first = worker_process(PORTOLAN_QUEUE_NAME=queue)
        await receiver.wait_requests(6, timeout=30)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        worker_process(PORTOLAN_QUEUE_NAME=queue)
        deadline = time.monotonic() + 120
        runs: dict[str, dict[str, Any]] = {}
        while len(runs) < len(ids):
            assert time.monotonic() < deadline, f"{len(runs)} of {len(ids)} runs completed"
            for run_id in ids:
                if run_id not in runs:
                    run = await run_of(client, org, run_id)
                    if run["status"] == "COMPLETED":
                        runs[run_id] = run
            await asyncio.sleep(0.2)

    for run in runs.values():
        assert run["result"] == "SUCCESS", run
        assert [n["node"]["identifier"] for n in run["nodeRuns"]] == PATH  # none skipped
    sent = {
        n["identifier"]
        for run in runs.values()
        for n in run["nodeRuns"]
        if n["node"]["identifier"] in ("first", "second")
    }
    # Every webhook node reached the receiver, under its own node run id only.
    assert receiver.unique_run_ids() == sent
    assert len(receiver.unique_run_ids()) == 40
    r = await client.get("/v1/blueprints/service/entities", headers=org.headers)
    assert sorted(e["identifier"] for e in r.json()["entities"]) == sorted(
        f"svc{i}" for i in range(20)
    )
    # Some node was held by the killed worker and ran again under a new attempt.
    async with db.system() as tx:
        swept = await tx.fetchval(
            "SELECT count(*) FROM workflow_node_run_logs WHERE org_id = $1 "
            "AND message LIKE 'attempt % did not finish%'",
            org.org_id,
        )
    assert swept >= 1


def four_nodes(url: str) -> Any:
    """trigger -> webhook -> condition -> webhook -> upsert."""
    return workflow(
        "four",
        [
            webhook("first", url + "/first", body={"n": "{{ .outputs.trigger.name }}"}),
            condition("check", yes=".outputs.first.response.status == 200"),
            webhook("second", url + "/second"),
            upsert("register", {"identifier": "{{ .outputs.trigger.name }}"}),
        ],
        [
            link("trigger", "first"),
            link("first", "check"),
            link("check", "second", sourceOutletIdentifier="yes"),
            link("second", "register"),
        ],
    )


async def _all_completed(
    client: httpx.AsyncClient, org: Org, ids: list[str], within: float
) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + within
    done: dict[str, dict[str, Any]] = {}
    while len(done) < len(ids):
        assert time.monotonic() < deadline, f"{len(done)} of {len(ids)} runs completed"
        for run_id in ids:
            if run_id not in done:
                run = await run_of(client, org, run_id)
                if run["status"] == "COMPLETED":
                    done[run_id] = run
        await asyncio.sleep(0.25)
    return done


async def _node_runs(db: Database, org: Org) -> list[Any]:
    async with db.system() as tx:
        return await tx.fetch(
            "SELECT run_id, seq, node, attempts FROM workflow_node_runs WHERE org_id = $1",
            org.org_id,
        )


def _webhook_node_runs(runs: dict[str, dict[str, Any]]) -> set[str]:
    return {
        n["identifier"]
        for run in runs.values()
        for n in run["nodeRuns"]
        if n["node"]["identifier"] in ("first", "second")
    }


async def test_a_hundred_concurrent_runs_each_run_every_node_exactly_once(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    start_worker: Callable[..., Settings],
    db: Database,
) -> None:
    org = await make_org()
    await client.post("/v1/blueprints", json=SERVICE, headers=org.headers)
    with WebhookReceiver(await signing_secret(client, org)) as receiver:
        await create(client, org, four_nodes(receiver.url))
        start_worker()
        answers = await asyncio.gather(
            *(start(client, org, "four", {"name": f"c{i}"}) for i in range(100))
        )
        assert [r.status_code for r in answers] == [202] * 100
        ids = [r.json()["workflowRun"]["identifier"] for r in answers]
        runs = await _all_completed(client, org, ids, within=240)
        deliveries = Counter(d.run_id for d in receiver.deliveries)

    for run in runs.values():
        assert run["result"] == "SUCCESS", run
        assert [n["node"]["identifier"] for n in run["nodeRuns"]] == PATH
    # Each webhook node reached the receiver once, under its own node run id.
    assert set(deliveries) == _webhook_node_runs(runs)
    assert len(deliveries) == 200 and set(deliveries.values()) == {1}
    # Every node ran in one attempt, one node run per place on each run's path.
    rows = await _node_runs(db, org)
    assert len(rows) == 100 * len(PATH)
    assert len({(r["run_id"], r["seq"]) for r in rows}) == len(rows)
    assert {r["attempts"] for r in rows if r["seq"] > 0} == {1}
    r = await client.get("/v1/blueprints/service/entities", headers=org.headers)
    assert sorted(e["identifier"] for e in r.json()["entities"]) == sorted(
        f"c{i}" for i in range(100)
    )


async def test_redis_gone_for_a_moment_loses_no_run_and_runs_no_node_twice(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    start_worker: Callable[..., Settings],
    own_redis: RedisProcess,
    settings: Settings,
    db: Database,
) -> None:
    """The API and the worker share a Redis that stops while runs are started and walked,
    and comes back empty."""
    org = await make_org()
    await client.post("/v1/blueprints", json=SERVICE, headers=org.headers)
    api = create_app(settings.model_copy(update={"redis_url": own_redis.url}))
    async with (
        api.router.lifespan_context(api),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=api), base_url="http://portolan.test", timeout=30
        ) as http,
    ):
        with WebhookReceiver(await signing_secret(client, org), delay=0.05) as receiver:
            await create(http, org, four_nodes(receiver.url))
            start_worker(redis_url=own_redis.url, dispatch_requeue_seconds=2.0)
            ended = (await start(http, org, "four", {"name": "ended"})).json()["workflowRun"]
            await http.post(f"/v1/workflows/runs/{ended['identifier']}/cancel", headers=org.headers)
            ids: list[str] = []
            for batch in range(6):
                if batch == 2:
                    await receiver.wait_requests(5, timeout=30)  # nodes are in flight
                    own_redis.stop()
                answers = await asyncio.gather(
                    *(start(http, org, "four", {"name": f"b{batch}-{i}"}) for i in range(10))
                )
                # Starting a run needs no Redis: its first node waits in the outbox.
                assert [r.status_code for r in answers] == [202] * 10, answers[0].text
                ids += [r.json()["workflowRun"]["identifier"] for r in answers]
                if batch == 3:
                    # What reports Redis says it is gone: 503, Port's body, Retry-After.
                    r = await http.get("/readyz")
                    assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
                    assert r.json()["ok"] is False and r.json()["error"] == "not_ready"
                    assert r.json()["details"]["checks"]["redis"] == "unreachable"
                    # Reads go on; a live stream counts its slot in the process meanwhile.
                    assert (await run_of(http, org, ids[0]))["identifier"] == ids[0]
                    url = f"/v1/workflows/runs/{ended['identifier']}/stream"
                    async with http.stream("GET", url, headers=org.headers) as response:
                        assert response.status_code == 200
                        assert (await response.aread()).rstrip().startswith(b"event: run")
            await asyncio.sleep(1.0)
            # The outage held the runs up: those started during it have not moved on.
            waiting = [(await run_of(http, org, run_id))["status"] for run_id in ids[20:]]
            assert waiting == ["IN_PROGRESS"] * 40
            await own_redis.start()  # empty: the jobs it held are gone
            runs = await _all_completed(http, org, ids, within=180)
            assert (await http.get("/readyz")).status_code == 200
            deliveries = [d for d in receiver.deliveries if 200 <= d.status < 300]

    for run in runs.values():
        assert run["result"] == "SUCCESS", run
        assert [n["node"]["identifier"] for n in run["nodeRuns"]] == PATH
    # Nothing lost: every webhook node reached the receiver, under its own id only.
    sent = _webhook_node_runs(runs)
    assert {d.run_id for d in deliveries} == sent and len(sent) == 120
    rows = [r for r in await _node_runs(db, org) if r["run_id"] in runs]
    assert len(rows) == 60 * len(PATH)
    assert len({(r["run_id"], r["seq"]) for r in rows}) == len(rows)
    # Nothing run twice: the jobs in flight when Redis went were let finish (not cut off
    # and sent again once it came back).
    again = {run_id for run_id, n in Counter(d.run_id for d in deliveries).items() if n > 1}
    assert again == set(), again
    r = await client.get("/v1/blueprints/service/entities", headers=org.headers)
    assert sorted(e["identifier"] for e in r.json()["entities"]) == sorted(
        f"b{b}-{i}" for b in range(6) for i in range(10)
    )
