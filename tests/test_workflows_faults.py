"""Faults in workflow runs: a worker killed with SIGKILL mid-run, and started again, leaves
no node skipped and sends no node twice under different ids (a node in flight at the kill is
sent again with its node run id as `webhook-id`, which the receiver dedupes)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Callable

import httpx

from app.db.database import Database
from tests import test_dispatch_faults
from tests.conftest import OrgFactory
from tests.receivers import WebhookReceiver
from tests.test_dispatch import SERVICE, signing_secret
from tests.test_workflows import condition, create, link, run_of, start, upsert, webhook, workflow

worker_process = test_dispatch_faults.worker_process
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
        runs = {}
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
