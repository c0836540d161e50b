"""Dispatch end to end: API -> outbox -> relay -> arq -> worker -> a real HTTP receiver on
127.0.0.1 speaking GitHub's, GitLab's or a webhook's contract -> the run's status and logs.

The worker (the `start_worker` fixture) runs on its own queue with the receivers' addresses
allowed (PORTOLAN_OUTBOUND_ALLOW) and short retry delays."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
from redis.asyncio import Redis

from app.config import Settings
from app.db.database import Database
from tests.conftest import Org, OrgFactory
from tests.receivers import GitHubReceiver, GitLabReceiver, WebhookReceiver

SERVICE = {
    "identifier": "service",
    "title": "Service",
    "schema": {"properties": {"tier": {"type": "string"}, "replicas": {"type": "number"}}},
}


async def signing_secret(client: httpx.AsyncClient, org: Org) -> str:
    r = await client.get("/v1/organization/signing-secret", headers=org.headers)
    assert r.status_code == 200, r.text
    return str(r.json()["signingSecret"])


async def add_secret(client: httpx.AsyncClient, org: Org, name: str, value: str) -> None:
    r = await client.post(
        "/v1/organization/secrets",
        json={"secretName": name, "secretValue": value},
        headers=org.headers,
    )
    assert r.status_code == 201, r.text


async def define(client: httpx.AsyncClient, org: Org, action: dict[str, Any]) -> None:
    r = await client.post("/v1/actions", json=action, headers=org.headers)
    assert r.status_code == 201, r.text


def self_service(identifier: str, method: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "identifier": identifier,
        "title": identifier.title(),
        "trigger": {
            "type": "self-service",
            "operation": "CREATE",
            "blueprintIdentifier": "service",
            "userInputs": {
                "properties": {
                    "name": {"type": "string"},
                    "config": {"type": "object"},
                    "count": {"type": "number"},
                }
            },
        },
        "invocationMethod": method,
        **extra,
    }


async def start_run(
    client: httpx.AsyncClient, org: Org, action: str, properties: dict[str, Any]
) -> str:
    r = await client.post(
        f"/v1/actions/{action}/runs", json={"properties": properties}, headers=org.headers
    )
    assert r.status_code == 202, r.text
    return str(r.json()["run"]["id"])


async def wait_run(
    client: httpx.AsyncClient,
    org: Org,
    run_id: str,
    done: Callable[[dict[str, Any]], bool],
    within: float = 20.0,
) -> dict[str, Any]:
    deadline = time.monotonic() + within
    run: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = await client.get(f"/v1/actions/runs/{run_id}", headers=org.headers)
        run = r.json()["run"]
        if done(run):
            return run
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} did not get there: {run}")


def ended(run: dict[str, Any]) -> bool:
    return run["status"] in ("SUCCESS", "FAILURE")


def delivered(run: dict[str, Any]) -> bool:
    return run["pendingExecution"] is False and run.get("claimedUntil") is None


async def run_logs(client: httpx.AsyncClient, org: Org, run_id: str) -> list[str]:
    r = await client.get(f"/v1/actions/runs/{run_id}/logs", headers=org.headers)
    return [entry["message"] for entry in r.json()["runLogs"]]


async def catalog(client: httpx.AsyncClient, org: Org) -> None:
    r = await client.post("/v1/blueprints", json=SERVICE, headers=org.headers)
    assert r.status_code == 201, r.text


async def test_webhook_is_signed_rendered_and_the_backend_reports(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    await catalog(client, org)
    await add_secret(client, org, "API_KEY", "s3cr3t-value-123")
    with WebhookReceiver(await signing_secret(client, org)) as receiver:
        await define(
            client,
            org,
            self_service(
                "create",
                {
                    "type": "WEBHOOK",
                    "url": receiver.url + "/hooks/{{ .inputs.name }}",
                    "headers": {"X-Api-Key": "{{ .secrets.API_KEY }}", "X-Run": "{{ .run.id }}"},
                    "body": {
                        "name": "{{ .inputs.name }}",
                        "config": "{{ .inputs.config }}",
                        "runId": "{{ .run.id }}",
                        "by": "{{ .trigger.by.userId }}",
                        "text": "run {{ .run.id }} for {{ .inputs.name }}",
                    },
                },
            ),
        )
        start_worker()
        run_id = await start_run(client, org, "create", {"name": "billing", "config": {"a": 1}})
        await receiver.wait_for(1, timeout=15)
        delivery = receiver.deliveries[0]
        assert delivery.path == "/hooks/billing"
        assert delivery.headers["x-api-key"] == "s3cr3t-value-123"
        assert delivery.headers["x-run"] == run_id
        assert delivery.headers["webhook-id"] == run_id
        assert delivery.body == {
            "name": "billing",
            "config": {"a": 1},
            "runId": run_id,
            "by": org.client_id,
            "text": f"run {run_id} for billing",
        }
        run = await wait_run(client, org, run_id, delivered)
        assert run["status"] == "IN_PROGRESS"  # not synchronized: the backend reports
        # The stored payload never shows a secret.
        assert "s3cr3t-value-123" not in json.dumps(run)
        assert run["payload"]["headers"]["X-Api-Key"] == "***"
        r = await client.patch(
            f"/v1/actions/runs/{run_id}",
            json={"status": "SUCCESS", "summary": "created"},
            headers=org.headers,
        )
        assert r.status_code == 200
        assert receiver.signature_failures == 0


async def test_synchronized_webhook_sets_the_status(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    await catalog(client, org)
    with (
        WebhookReceiver(await signing_secret(client, org)) as ok,
        WebhookReceiver(await signing_secret(client, org), status=400) as refusing,
    ):
        for name, url in (("sync-ok", ok.url), ("sync-bad", refusing.url)):
            await define(
                client,
                org,
                self_service(name, {"type": "WEBHOOK", "url": url, "synchronized": True}),
            )
        start_worker()
        good = await start_run(client, org, "sync-ok", {"name": "a"})
        bad = await start_run(client, org, "sync-bad", {"name": "b"})
        run = await wait_run(client, org, good, ended)
        assert run["status"] == "SUCCESS" and run["endedAt"] is not None
        assert run["response"] == {"ok": True}
        # Without a body, the webhook gets the trigger data (no secrets).
        body = ok.deliveries[0].body
        assert body["run"] == {"id": good} and body["inputs"] == {"name": "a"}
        assert "secrets" not in body
        run = await wait_run(client, org, bad, ended)
        assert run["status"] == "FAILURE"
        assert any("400" in line for line in await run_logs(client, org, bad))
        assert len(refusing.deliveries) == 1  # a 4xx is not retried


async def test_receiver_errors_are_retried_until_delivered(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    await catalog(client, org)
    with WebhookReceiver(await signing_secret(client, org)) as receiver:
        await define(client, org, self_service("flaky", {"type": "WEBHOOK", "url": receiver.url}))
        receiver.fail_until(time.monotonic() + 1.5, status=503)
        start_worker()
        ids = [await start_run(client, org, "flaky", {"name": f"n{i}"}) for i in range(20)]
        await receiver.wait_unique(20, timeout=30)
        assert receiver.unique_run_ids() == set(ids)
        for run_id in ids:
            run = await wait_run(client, org, run_id, delivered)
            assert run["status"] == "IN_PROGRESS"
        assert receiver.refused >= 20  # each failed at least once
        logs = await run_logs(client, org, ids[0])
        assert any("503" in line and "next in" in line for line in logs)


async def test_a_receiver_that_never_recovers_fails_the_run(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    await catalog(client, org)
    with WebhookReceiver(await signing_secret(client, org), status=502) as receiver:
        await define(client, org, self_service("down", {"type": "WEBHOOK", "url": receiver.url}))
        start_worker(dispatch_max_attempts=3)
        run_id = await start_run(client, org, "down", {"name": "x"})
        run = await wait_run(client, org, run_id, ended)
        assert run["status"] == "FAILURE"
        assert len(receiver.deliveries) == 3
        assert "gave up after 3 attempts" in (await run_logs(client, org, run_id))[-1]


async def test_private_addresses_are_refused(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    await catalog(client, org)
    with WebhookReceiver(await signing_secret(client, org)) as receiver:
        await define(
            client,
            org,
            self_service("metadata", {"type": "WEBHOOK", "url": "http://169.254.169.254/latest"}),
        )
        await define(client, org, self_service("local", {"type": "WEBHOOK", "url": receiver.url}))
        start_worker(outbound_allow=[])  # nothing allowed: 127.0.0.1 is loopback
        for action in ("metadata", "local"):
            run_id = await start_run(client, org, action, {"name": "x"})
            run = await wait_run(client, org, run_id, ended)
            assert run["status"] == "FAILURE"
            assert any(
                "PORTOLAN_OUTBOUND_ALLOW" in line for line in await run_logs(client, org, run_id)
            )
        assert receiver.deliveries == []


async def test_template_errors_and_missing_secrets_fail_the_run(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    await catalog(client, org)
    with WebhookReceiver(await signing_secret(client, org)) as receiver:
        await define(
            client,
            org,
            self_service(
                "bad-jq",
                {
                    "type": "WEBHOOK",
                    "url": receiver.url,
                    "body": {"n": "{{ .inputs.name | tonumber }}"},
                },
            ),
        )
        await define(
            client,
            org,
            self_service(
                "no-secret",
                {"type": "WEBHOOK", "url": receiver.url, "headers": {"A": "{{ .secrets.NOPE }}"}},
            ),
        )
        start_worker()
        jq_run = await start_run(client, org, "bad-jq", {"name": "not-a-number"})
        secret_run = await start_run(client, org, "no-secret", {"name": "x"})
        assert (await wait_run(client, org, jq_run, ended))["status"] == "FAILURE"
        assert any("/body/n" in line for line in await run_logs(client, org, jq_run))
        assert (await wait_run(client, org, secret_run, ended))["status"] == "FAILURE"
        assert any("NOPE" in line for line in await run_logs(client, org, secret_run))
        assert receiver.deliveries == []


async def test_github_workflow_dispatch(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    await catalog(client, org)
    await add_secret(client, org, "GITHUB_TOKEN", "ghp_test_token_1234")
    await add_secret(client, org, "OTHER_TOKEN", "ghp_wrong_token_9999")
    with GitHubReceiver(
        tokens={"ghp_test_token_1234"}, workflows={("acme", "infra", "create.yml")}
    ) as github:
        method = {
            "type": "GITHUB",
            "org": "acme",
            "repo": "infra",
            "workflow": "create.yml",
            "workflowInputs": {
                "name": "{{ .inputs.name }}",
                "port_context": {"runId": "{{ .run.id }}", "entity": "{{ .entity }}"},
                "count": "{{ .inputs.count }}",
            },
        }
        await define(client, org, self_service("gh", method))
        await define(
            client, org, self_service("gh-wrong-token", {**method, "tokenSecret": "OTHER_TOKEN"})
        )
        many = {f"i{n}": "x" for n in range(26)}
        await define(client, org, self_service("gh-many", {**method, "workflowInputs": many}))
        await define(client, org, self_service("gh-missing", {**method, "workflow": "missing.yml"}))
        start_worker(github_api_url=github.url)
        run_id = await start_run(client, org, "gh", {"name": "billing", "count": 3})
        run = await wait_run(client, org, run_id, delivered)
        assert run["status"] == "IN_PROGRESS"  # the workflow reports through the API
        sent = github.dispatches[0]
        assert sent.path == "/repos/acme/infra/actions/workflows/create.yml/dispatches"
        assert sent.body["ref"] == "main"
        inputs = sent.body["inputs"]
        assert inputs["name"] == "billing" and inputs["count"] == 3
        assert json.loads(inputs["port_context"]) == {"runId": run_id, "entity": {}}
        wrong = await start_run(client, org, "gh-wrong-token", {"name": "x"})
        run = await wait_run(client, org, wrong, ended)
        assert run["status"] == "FAILURE"
        lines = await run_logs(client, org, wrong)
        assert any("Bad credentials" in line for line in lines)
        assert "ghp_wrong_token_9999" not in json.dumps(lines) + json.dumps(run)
        too_many = await start_run(client, org, "gh-many", {"name": "x"})
        assert (await wait_run(client, org, too_many, ended))["status"] == "FAILURE"
        assert any("25" in line for line in await run_logs(client, org, too_many))
        missing = await start_run(client, org, "gh-missing", {"name": "x"})
        assert (await wait_run(client, org, missing, ended))["status"] == "FAILURE"
        assert len(github.dispatches) == 1


async def test_gitlab_pipeline_trigger(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    await catalog(client, org)
    await add_secret(client, org, "GITLAB_TRIGGER_TOKEN", "glptt-abc123")
    with GitLabReceiver(tokens={"platform/infra": "glptt-abc123"}) as gitlab:
        await define(
            client,
            org,
            self_service(
                "gl",
                {
                    "type": "GITLAB",
                    "groupName": "platform",
                    "projectName": "infra",
                    "defaultRef": "release",
                    "pipelineVariables": {"NAME": "{{ .inputs.name }}", "RUN_ID": "{{ .run.id }}"},
                },
            ),
        )
        start_worker(gitlab_api_url=gitlab.url)
        run_id = await start_run(client, org, "gl", {"name": "billing"})
        run = await wait_run(client, org, run_id, delivered)
        trigger = gitlab.triggers[0]
        assert trigger.ref == "release"
        assert trigger.variables == {"NAME": "billing", "RUN_ID": run_id}
        assert run["link"] == trigger.pipeline["web_url"]
        assert run["externalRunId"] == str(trigger.pipeline["id"])


async def test_upsert_entity_writes_and_ends_the_run(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    start_worker: Callable[..., Settings],
    db: Database,
) -> None:
    org = await make_org()
    await catalog(client, org)
    mapping = {
        "identifier": "{{ .inputs.name }}",
        "title": "{{ .inputs.name | ascii_upcase }}",
        "properties": {"tier": "gold", "replicas": "{{ .inputs.count }}"},
    }
    await define(
        client,
        org,
        self_service(
            "register",
            {"type": "UPSERT_ENTITY", "blueprintIdentifier": "service", "mapping": mapping},
        ),
    )
    start_worker()
    run_id = await start_run(client, org, "register", {"name": "billing", "count": 2})
    run = await wait_run(client, org, run_id, ended)
    assert run["status"] == "SUCCESS"
    r = await client.get("/v1/blueprints/service/entities/billing", headers=org.headers)
    entity = r.json()["entity"]
    assert entity["title"] == "BILLING"
    assert entity["properties"] == {"tier": "gold", "replicas": 2}
    async with db.system() as tx:
        tied = await tx.fetchval(
            "SELECT run_id FROM entity_events WHERE org_id = $1 AND identifier = 'billing'",
            org.org_id,
        )
    assert tied == run_id
    await define(
        client,
        org,
        self_service(
            "register-bad",
            {
                "type": "UPSERT_ENTITY",
                "blueprintIdentifier": "service",
                "mapping": {**mapping, "properties": {"replicas": "{{ .inputs.name }}"}},
            },
        ),
    )
    bad = await start_run(client, org, "register-bad", {"name": "x", "count": 1})
    run = await wait_run(client, org, bad, ended)
    assert run["status"] == "FAILURE"
    assert any("replicas" in line for line in await run_logs(client, org, bad))


async def test_dispatch_stays_within_the_org(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    """Each org's webhook is signed with its own secret and sees only its own secrets."""
    first, second = await make_org(), await make_org()
    receivers = []
    with (
        WebhookReceiver(await signing_secret(client, first)) as one,
        WebhookReceiver(await signing_secret(client, second)) as two,
    ):
        for org, receiver, value in ((first, one, "first-secret"), (second, two, "second-secret")):
            await catalog(client, org)
            await add_secret(client, org, "TOKEN", value)
            await define(
                client,
                org,
                self_service(
                    "hook",
                    {
                        "type": "WEBHOOK",
                        "url": receiver.url,
                        "body": {"token": "{{ .secrets.TOKEN }}", "run": "{{ .run.id }}"},
                    },
                ),
            )
            receivers.append(receiver)
        start_worker()
        a = await start_run(client, first, "hook", {"name": "a"})
        b = await start_run(client, second, "hook", {"name": "b"})
        await one.wait_for(1, timeout=15)
        await two.wait_for(1, timeout=15)
        assert one.deliveries[0].body == {"token": "first-secret", "run": a}
        assert two.deliveries[0].body == {"token": "second-secret", "run": b}
        # Each receiver verified its own org's signature.
        assert one.signature_failures == two.signature_failures == 0
        r = await client.get(f"/v1/actions/runs/{a}", headers=second.headers)
        assert r.status_code == 404


async def test_runs_held_by_a_slow_receiver_cost_the_worker_no_redis_round_trips(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    """arq keeps a running job in its queue; a worker that checked each one against Redis
    at every look for jobs (three round trips per job, fifty looks a second) spent its
    process's CPU on a slow receiver's runs, which every org's requests pay for."""
    org = await make_org()
    await catalog(client, org)
    with WebhookReceiver(await signing_secret(client, org), delay=4.0) as receiver:
        await define(client, org, self_service("slow", {"type": "WEBHOOK", "url": receiver.url}))
        settings = start_worker()
        for i in range(6):
            await start_run(client, org, "slow", {"name": f"n{i}"})
        deadline = time.monotonic() + 20
        while len(receiver.requests) < 4:  # the deliveries are held by the receiver
            assert time.monotonic() < deadline, "the receiver got no deliveries"
            await asyncio.sleep(0.05)
        redis = Redis.from_url(settings.redis_url or "")
        try:

            async def watches() -> int:
                stats = await redis.info("commandstats")
                return int(stats.get("cmdstat_watch", {}).get("calls", 0))

            before = await watches()
            await asyncio.sleep(1.0)
            during = await watches() - before
        finally:
            await redis.aclose()
        # Looks for jobs go on (every 20 ms) but none re-checks a job running here.
        assert during < 20, f"{during} WATCHes in a second while the runs were held"
