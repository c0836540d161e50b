"""Tenants' jq sees only its input, under a time limit, with fair turns across orgs.

A table of escapes (environment, files, modules, other inputs, stderr, halting, locations)
runs against every evaluation site: the sandbox itself, action templates, a run's
`required` query, automation conditions, incoming-webhook mappings, data migrations'
mappings and calculation properties. Then the process itself (an empty environment from
its first instruction), the time limit, and what one org's slow programs do to another's.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.automations.feed import condition_holds
from app.catalog import data_migrations
from app.catalog.validation import JQ_COMPILE_BUDGET_SECONDS, Problems, check_jq
from app.config import Settings
from app.db.database import Database
from app.dispatch.templates import TemplateError, render
from app.kit import sandbox
from app.search.calc import calculate
from app.webhooks.definitions import compile_mapping
from app.webhooks.processing import _render_alone
from app.workflows import engine as workflow_engine
from app.workflows import events as workflow_events
from tests.conftest import OrgFactory
from tests.receivers import WebhookReceiver
from tests.test_dispatch import (
    add_secret,
    catalog,
    define,
    ended,
    run_logs,
    self_service,
    signing_secret,
    start_run,
    wait_run,
)

CANARY = "portolan-canary-" + "7f3a9c"
INPUT = {"name": "api", "n": 2}
LOOP_JQ = "def f: f; f"


def calculated(calcs: dict[str, str], kind: str = "string", **schema: Any) -> dict[str, Any]:
    """A blueprint `svc` whose calculation properties are `calcs` (name: jq)."""
    return {
        "identifier": "svc",
        "title": "Service",
        "schema": {"properties": schema},
        "calculationProperties": {
            name: {"calculation": jq, "type": kind} for name, jq in calcs.items()
        },
    }


@pytest.fixture
def canary_env() -> Iterator[None]:
    """The service's environment holds a secret-looking canary; children started afresh."""
    os.environ["PORTOLAN_SECRET_KEY_CANARY"] = CANARY
    sandbox.shutdown()
    try:
        yield
    finally:
        del os.environ["PORTOLAN_SECRET_KEY_CANARY"]
        sandbox.shutdown()


# (program, what it must give: a value, or ERROR for a refusal/failure)
ERROR = object()
ESCAPES: list[tuple[str, Any]] = [
    ("$ENV", {}),
    ("env", {}),
    ("$ENV.PORTOLAN_SECRET_KEY_CANARY", None),
    ('$ENV | getpath(["PORTOLAN_SECRET_KEY_CANARY"])', None),
    ('env | to_entries | map(.value) | join(",")', ""),
    ("input_filename", None),
    ("[inputs]", []),
    ("input", ERROR),
    ('import "data" as $d; $d', ERROR),
    ('include "lib"; .', ERROR),
    ('# hidden\n  import "/etc/passwd" as $p; $p', ERROR),
    ('module {a: 1}; import "x" as $x; $x', ERROR),
    ('"data" | modulemeta', ERROR),
    ("get_search_list", []),
    ("[get_jq_origin, get_prog_origin]", []),
    ("$__loc__", {"file": "<top-level>", "line": 1}),
    ("$__prog_args", ERROR),
    ("[debug, stderr] | length", 2),
    ('"bye" | halt_error', None),
    ("input_line_number", ERROR),
]


def _expected(found: Any, wanted: Any) -> None:
    text = json.dumps(found, default=str)
    assert CANARY not in text
    if wanted is ERROR:
        assert isinstance(found, Exception), f"expected a refusal, got {found!r}"
    else:
        assert found == wanted


async def _via_sandbox(org: str, program: str) -> Any:
    [[(ok, outputs)]] = await sandbox.evaluate(
        org, [program], [json.dumps(INPUT)], outputs=1, output_limit=65536
    )
    if not ok:
        return RuntimeError(outputs)
    return outputs[0] if outputs else None


async def _via_template(org: str, program: str) -> Any:
    try:
        return await render("{{ " + program + " }}", {"inputs": INPUT}, org=org)
    except TemplateError as exc:
        return exc


async def _via_condition(org: str, program: str) -> Any:
    # An automation condition is true when its jq gives something other than null/false:
    # compared against the same program's truth in the sandbox.
    condition = {"type": "JQ", "expressions": [program], "combinator": "and"}
    automation = {"identifier": "auto", "trigger": {"condition": condition}}
    return await condition_holds(automation, {"inputs": INPUT}, org)  # type: ignore[arg-type]


async def _via_webhook_mapping(org: str, program: str) -> Any:
    mapping = compile_mapping(
        0,
        {
            "blueprint": "service",
            "entity": {"identifier": '"x"', "properties": {"value": program}},
        },
    )
    rendered = await _render_alone([mapping], {"body": INPUT}, org=org)
    if rendered.errors:
        return RuntimeError(rendered.errors)
    [(_, entity)] = rendered.found[0]
    return entity["properties"]["value"]


async def _via_migration(org: str, program: str) -> Any:
    """A data migration's mapping, over a source entity."""
    mapping = {"entity": {"identifier": '"x"', "properties": {"value": program}}}
    document = {"identifier": "src", "properties": INPUT}
    rendered = await data_migrations.render(org, mapping, [document])
    if rendered.errors:
        return RuntimeError(rendered.errors)
    [(_, written)] = rendered.writes
    return written["properties"]["value"]


async def _via_calculation(org: str, program: str) -> Any:
    entity: dict[str, Any] = {"identifier": "x", "blueprint": "service", "properties": INPUT}
    blueprint = {"calculationProperties": {"value": {"calculation": program, "type": "object"}}}
    # The type is not checked for the escape table: read the raw outcome.
    blueprint["calculationProperties"]["value"]["type"] = ""
    await calculate(blueprint, [entity], org=org)
    if "calculationErrors" in entity:
        return RuntimeError(entity["calculationErrors"])
    return entity["properties"]["value"]


async def _via_workflow_template(org: str, program: str) -> Any:
    # A workflow node's templates: a WEBHOOK's request, a mapping, variables.
    try:
        return await workflow_engine.render(
            "{{ " + program + " }}", {"outputs": {"trigger": INPUT}}, "/variables", org=org
        )
    except TemplateError as exc:
        return exc


async def _via_workflow_condition(org: str, program: str) -> Any:
    """A CONDITION node's outlet: taken when its jq gives something other than null/false;
    a failing expression fails the node (an error)."""
    outlets = [{"identifier": "x", "expression": program}]
    step = await workflow_engine.take_outlet(org, outlets, {"outputs": {"trigger": INPUT}})
    if step.result == "FAILED":
        return RuntimeError(step.output)
    return step.outlet == "x"


async def _via_workflow_event_condition(org: str, program: str) -> Any:
    """An EVENT_TRIGGER's condition, as the event feed evaluates it for a workflow."""
    node = {
        "identifier": "trigger",
        "config": {
            "type": "EVENT_TRIGGER",
            "event": {"type": "ENTITY_CREATED", "blueprintIdentifier": "service"},
            "condition": {"type": "JQ", "expressions": [program], "combinator": "and"},
        },
    }
    trigger = workflow_events.trigger_of("wf", "wfv_x", {"nodes": [node]}, node)
    return await condition_holds(trigger, {"inputs": INPUT}, org)


SITES: dict[str, Callable[[str, str], Any]] = {
    "sandbox": _via_sandbox,
    "action-template": _via_template,
    "workflow-template": _via_workflow_template,
    "webhook-mapping": _via_webhook_mapping,
    "migration-mapping": _via_migration,
    "calculation": _via_calculation,
}


@pytest.mark.parametrize("site", sorted(SITES))
async def test_every_site_sees_only_its_input(site: str, canary_env: None) -> None:
    for program, wanted in ESCAPES:
        found = await SITES[site]("org-escapes", program)
        try:
            _expected(found, wanted)
        except AssertionError as exc:
            raise AssertionError(f"{site}: {program!r} gave {found!r}") from exc


async def test_automation_conditions_see_only_their_input(canary_env: None) -> None:
    for program, _ in ESCAPES:
        truth = await _via_condition("org-escapes", program)
        reference = await _via_sandbox("org-escapes", program)
        expected = False if isinstance(reference, Exception) else reference not in (None, False)
        assert truth is expected, program
    # The canary would make this true if conditions could read the environment.
    assert await _via_condition("org-escapes", f'$ENV | tostring | test("{CANARY}")') is False


async def test_workflow_event_conditions_see_only_their_input(canary_env: None) -> None:
    for program, _ in ESCAPES:
        truth = await _via_workflow_event_condition("org-escapes", program)
        reference = await _via_sandbox("org-escapes", program)
        expected = False if isinstance(reference, Exception) else reference not in (None, False)
        assert truth is expected, program
    leak = f'$ENV | tostring | test("{CANARY}")'
    assert await _via_workflow_event_condition("org-escapes", leak) is False


async def test_workflow_conditions_see_only_their_input(canary_env: None) -> None:
    for program, _ in ESCAPES:
        taken = await _via_workflow_condition("org-escapes", program)
        reference = await _via_sandbox("org-escapes", program)
        if isinstance(reference, Exception):
            assert isinstance(taken, Exception), program
        else:
            assert taken is (reference not in (None, False)), program
    leak = f'$ENV | tostring | test("{CANARY}")'
    assert await _via_workflow_condition("org-escapes", leak) is False


async def test_a_workflow_condition_past_its_time_limit_fails_its_node() -> None:
    step = await workflow_engine.take_outlet(
        "org-slow", [{"identifier": "x", "expression": LOOP_JQ}], {}
    )
    assert step.result == "FAILED" and "longer than" in step.message


async def test_one_orgs_slow_workflow_conditions_do_not_hold_up_another_org() -> None:
    slow = [{"identifier": "x", "expression": LOOP_JQ}]
    quick = [{"identifier": "x", "expression": ".outputs.trigger.n == 2"}]
    data = {"outputs": {"trigger": INPUT}}
    stuck = [
        asyncio.create_task(workflow_engine.take_outlet("org-noisy-wf", slow, data))
        for _ in range(6)
    ]
    await asyncio.sleep(0.2)  # the noisy org holds its share of the children
    for _ in range(5):
        step = await workflow_engine.take_outlet("org-quiet-wf", quick, data)
        assert step.outlet == "x"
    assert not all(task.done() for task in stuck)  # the noisy org is still waiting or running
    results = await asyncio.gather(*stuck, return_exceptions=True)
    assert all(
        isinstance(found, sandbox.Busy) or found.result == "FAILED"  # type: ignore[union-attr]
        for found in results
    )


def test_a_jq_process_starts_with_an_empty_environment(canary_env: None) -> None:
    async def start_one() -> int:
        await _via_sandbox("org-env", "1")
        pool = sandbox._get_pool()
        return pool._idle[0].process.pid

    pid = asyncio.run(start_one())
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert environ == b""  # not cleared later: never given one
    assert Path(f"/proc/{pid}/cwd").resolve() != Path.cwd().resolve()
    assert list(Path(f"/proc/{pid}/cwd").iterdir()) == []
    sandbox.shutdown()


async def test_definitions_refuse_jq_modules(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    blueprint = calculated({"leak": 'import "openapi/openapi" as $d; $d'}, "object")
    r = await client.post("/v1/blueprints", json=blueprint, headers=org.headers)
    assert r.status_code == 422, r.text
    assert "modules are not available" in r.text


async def test_a_calculation_cannot_read_the_service_keys(
    client: httpx.AsyncClient, make_org: OrgFactory, settings: Settings
) -> None:
    org = await make_org()
    blueprint = calculated({"env": "$ENV | tostring", "env2": "env | tostring"})
    r = await client.post("/v1/blueprints", json=blueprint, headers=org.headers)
    assert r.status_code == 201, r.text
    r = await client.post(
        "/v1/blueprints/svc/entities", json={"identifier": "a"}, headers=org.headers
    )
    assert r.status_code == 201, r.text
    r = await client.get("/v1/blueprints/svc/entities/a", headers=org.headers)
    props = r.json()["entity"]["properties"]
    assert props == {"env": "{}", "env2": "{}"}
    assert settings.secret_key.get_secret_value() not in r.text


# ---------------------------------------------------------------------------------------
# Secrets in runs


async def test_upsert_entity_runs_cannot_write_secrets_into_entities(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    org = await make_org()
    await catalog(client, org)
    await add_secret(client, org, "DB_PASSWORD", "hunter2-very-secret")
    for identifier, title in (
        ("direct", "{{ .secrets.DB_PASSWORD }}"),
        ("encoded", "{{ .secrets.DB_PASSWORD | @base64 }}"),
        ("whole", "{{ .secrets | tostring }}"),
        ("path", '{{ getpath(["secrets"]) | tostring }}'),
    ):
        await define(
            client,
            org,
            self_service(
                identifier,
                {
                    "type": "UPSERT_ENTITY",
                    "blueprintIdentifier": "service",
                    "mapping": {"identifier": identifier, "title": title},
                },
            ),
        )
    start_worker()
    for identifier in ("direct", "encoded", "whole", "path"):
        run_id = await start_run(client, org, identifier, {"name": "x"})
        run = await wait_run(client, org, run_id, ended)
        r = await client.get(f"/v1/blueprints/service/entities/{identifier}", headers=org.headers)
        text = r.text + json.dumps(run) + json.dumps(await run_logs(client, org, run_id))
        assert "hunter2" not in text and "aHVudGVyM" not in text, identifier
    # Named secrets fail the run; reached indirectly, there are none to reach.
    r = await client.get("/v1/blueprints/service/entities/whole", headers=org.headers)
    assert r.json()["entity"]["title"] == "{}"


async def test_upsert_entity_runs_write_only_where_their_starter_may(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    db: Database,
    app: Any,
    start_worker: Callable[..., Settings],
) -> None:
    from tests.test_permissions import add_user, user_headers

    org = await make_org()
    await catalog(client, org)
    r = await client.post(
        "/v1/blueprints",
        json={"identifier": "secretstore", "title": "Locked", "schema": {"properties": {}}},
        headers=org.headers,
    )
    assert r.status_code == 201, r.text
    await add_user(db, org.org_id, "mod@example.com", roles=["Member", "service-moderator"])
    moderator = user_headers(app, org.org_id, "mod@example.com")
    # The moderator is refused a direct write into the other blueprint...
    r = await client.post(
        "/v1/blueprints/secretstore/entities", json={"identifier": "x"}, headers=moderator
    )
    assert r.status_code == 403, r.text
    # ...and an action of its own blueprint cannot write there either.
    action = self_service(
        "sneak",
        {
            "type": "UPSERT_ENTITY",
            "blueprintIdentifier": "secretstore",
            "mapping": {"identifier": "planted"},
        },
    )
    r = await client.post("/v1/actions", json=action, headers=moderator)
    assert r.status_code == 201, r.text
    start_worker()
    r = await client.post(
        "/v1/actions/sneak/runs", json={"properties": {"name": "x"}}, headers=moderator
    )
    assert r.status_code == 202, r.text
    run = await wait_run(client, org, r.json()["run"]["id"], ended)
    assert run["status"] == "FAILURE"
    r = await client.get("/v1/blueprints/secretstore/entities/planted", headers=org.headers)
    assert r.status_code == 404
    # The same run started by an Admin writes.
    run_id = await start_run(client, org, "sneak", {"name": "x"})
    assert (await wait_run(client, org, run_id, ended))["status"] == "SUCCESS"


async def test_run_payloads_and_logs_carry_no_transformed_secret(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    import base64

    org = await make_org()
    await catalog(client, org)
    await add_secret(client, org, "PASSWORD", "pa55-word-value")
    basic = base64.b64encode(b"bot:pa55-word-value").decode()
    with WebhookReceiver(await signing_secret(client, org)) as receiver:
        await define(
            client,
            org,
            self_service(
                "basic",
                {
                    "type": "WEBHOOK",
                    "url": receiver.url + "/hook",
                    "synchronized": True,
                    "headers": {
                        "Authorization": 'Basic {{ "bot:" + .secrets.PASSWORD | @base64 }}',
                    },
                    "body": {"cut": "{{ .secrets.PASSWORD[2:] }}", "name": "{{ .inputs.name }}"},
                },
            ),
        )
        await define(
            client,
            org,
            self_service(
                "failing",
                {
                    "type": "WEBHOOK",
                    "url": receiver.url + "/hook",
                    "body": {"x": "{{ .secrets.PASSWORD | @base64 | error }}"},
                },
            ),
        )
        start_worker()
        run_id = await start_run(client, org, "basic", {"name": "svc"})
        await receiver.wait_for(1, timeout=15)
        assert receiver.deliveries[0].headers["authorization"] == f"Basic {basic}"
        run = await wait_run(client, org, run_id, ended)
        shown = json.dumps(run) + json.dumps(await run_logs(client, org, run_id))
        assert basic not in shown and "55-word-value" not in shown
        assert (
            run["payload"]["headers"]["Authorization"]
            == "Basic " + base64.b64encode(b"bot:***").decode()
        )
        assert run["payload"]["body"]["name"] == "svc"
        failing = await start_run(client, org, "failing", {"name": "svc"})
        run = await wait_run(client, org, failing, ended)
        logs = await run_logs(client, org, failing)
        assert run["status"] == "FAILURE"
        encoded = base64.b64encode(b"pa55-word-value").decode()
        assert encoded not in json.dumps(run) + json.dumps(logs)


# ---------------------------------------------------------------------------------------
# Time, connections and fairness


async def _idle_in_transaction(db: Database, work: Any) -> tuple[list[int], Any]:
    """Counts of connections idle inside a transaction, sampled while `work` runs."""
    started = asyncio.create_task(work)
    async with db.system() as tx:
        database = await tx.fetchval("SELECT current_database()")
    seen: list[int] = []
    deadline = time.monotonic() + sandbox.limits().time_limit * 0.8
    await asyncio.sleep(0.3)
    while time.monotonic() < deadline and not started.done():
        async with db.system() as tx:
            seen.append(
                await tx.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 "
                    "AND state = 'idle in transaction'",
                    database,
                )
            )
        await asyncio.sleep(0.1)
    return seen, await started


async def test_a_runs_required_jq_holds_no_connection_while_it_runs(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    await catalog(client, org)
    action = self_service("slow", {"type": "WEBHOOK", "url": "https://example.test/x"})
    action["trigger"]["userInputs"]["required"] = {
        "jqQuery": "[limit(1; repeat(1))] | until(false; .) | []"
    }
    await define(client, org, action)
    waiting, r = await _idle_in_transaction(
        db, client.post("/v1/actions/slow/runs", json={"properties": {}}, headers=org.headers)
    )
    assert waiting, "the evaluation ended before it could be watched"
    assert max(waiting) == 0, waiting
    assert r.status_code == 422 and "longer than" in r.json()["message"]


async def test_reads_hold_no_connection_while_calculations_run(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    org = await make_org()
    blueprint = calculated({"slow": "def f: f; f"}, "number")
    r = await client.post("/v1/blueprints", json=blueprint, headers=org.headers)
    assert r.status_code == 201, r.text
    r = await client.post(
        "/v1/blueprints/svc/entities", json={"identifier": "a"}, headers=org.headers
    )
    assert r.status_code == 201, r.text
    search = {
        "combinator": "and",
        "rules": [{"property": "$blueprint", "operator": "=", "value": "svc"}],
    }
    reads: list[Callable[[], Awaitable[httpx.Response]]] = [
        lambda: client.get("/v1/blueprints/svc/entities/a", headers=org.headers),
        lambda: client.post("/v1/blueprints/svc/entities/search", json={}, headers=org.headers),
        lambda: client.get("/v1/blueprints/svc/entities", headers=org.headers),
        lambda: client.post("/v1/entities/search", json=search, headers=org.headers),
    ]
    for read in reads:
        seen, r = await _idle_in_transaction(db, read())
        assert seen, "the read ended before it could be watched"
        assert max(seen) == 0, seen
        assert r.status_code == 200, r.text
        assert "longer than" in r.text  # the calculation's error, beside its null


async def test_one_orgs_slow_jq_does_not_hold_up_another_org() -> None:
    slow = "def f: f; f"
    stuck = [asyncio.create_task(_via_template("org-noisy", slow)) for _ in range(6)]
    await asyncio.sleep(0.2)  # the noisy org holds its share of the children
    started = time.monotonic()
    for _ in range(5):
        assert await _via_template("org-quiet", ".inputs.n") == 2
    quiet = time.monotonic() - started
    assert not all(task.done() for task in stuck)  # the noisy org is still waiting or running
    assert quiet < sandbox.limits().time_limit  # never waited for a noisy call to end
    # Each noisy call ends at its time limit (or, queued too long, is told to come back).
    results = await asyncio.gather(*stuck, return_exceptions=True)
    assert all(isinstance(found, TemplateError | sandbox.Busy) for found in results)


async def test_one_orgs_slow_calculations_do_not_null_another_orgs_values() -> None:
    noisy_bp = {"calculationProperties": {"v": {"calculation": "def f: f; f", "type": "number"}}}
    quiet_bp = {
        "calculationProperties": {"v": {"calculation": ".properties.n * 2", "type": "number"}}
    }
    noisy = [
        asyncio.create_task(
            calculate(noisy_bp, [{"properties": {"n": 1}} for _ in range(5)], org="org-b")
        )
        for _ in range(4)
    ]
    await asyncio.sleep(0.2)
    for _ in range(5):
        entities: list[dict[str, Any]] = [{"properties": {"n": i}} for i in range(50)]
        await calculate(quiet_bp, entities, org="org-a")
        assert [e["properties"]["v"] for e in entities] == [i * 2 for i in range(50)]
        assert not any("calculationErrors" in e for e in entities)
    # The noisy org's own calls end at their time limit, or (queued behind its own slow
    # calls longer than the wait allowed, its loops running at the lowest priority) are
    # told to come back.
    results = await asyncio.gather(*noisy, return_exceptions=True)
    assert all(found is None or isinstance(found, sandbox.Busy) for found in results), results


async def test_a_calculation_past_its_time_limit_is_an_error_the_caller_sees() -> None:
    bp = {"calculationProperties": {"v": {"calculation": "def f: f; f", "type": "number"}}}
    entities: list[dict[str, Any]] = [{"properties": {}}]
    await calculate(bp, entities, org="org-slow")
    assert entities[0]["properties"]["v"] is None
    assert "longer than" in entities[0]["calculationErrors"]["v"]


async def test_an_org_over_its_queue_cap_is_told_to_come_back() -> None:
    sandbox.configure(
        Settings(jq_processes=1, jq_per_org=1, jq_max_queued_per_org=2, jq_time_limit_seconds=1)
    )
    try:
        slow = [asyncio.create_task(_via_template("org-flood", "def f: f; f")) for _ in range(3)]
        await asyncio.sleep(0.2)
        with pytest.raises(sandbox.Busy) as info:
            await render("{{ 1 }}", {}, org="org-flood")
        assert info.value.status_code == 503
        await asyncio.gather(*slow)
    finally:
        sandbox.configure(Settings())


async def test_a_runs_templates_see_its_entities_calculated_properties(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    """Calculated at dispatch, in the worker, with no transaction open."""
    org = await make_org()
    blueprint = {
        "identifier": "service",
        "title": "Service",
        "schema": {"properties": {"replicas": {"type": "number"}}},
        "calculationProperties": {
            "double": {"calculation": ".properties.replicas * 2", "type": "number"}
        },
    }
    r = await client.post("/v1/blueprints", json=blueprint, headers=org.headers)
    assert r.status_code == 201, r.text
    for name, replicas in (("api", 3), ("db", 5)):
        r = await client.post(
            "/v1/blueprints/service/entities",
            json={"identifier": name, "properties": {"replicas": replicas}},
            headers=org.headers,
        )
        assert r.status_code == 201, r.text
    with WebhookReceiver(await signing_secret(client, org)) as receiver:
        action = {
            "identifier": "scale",
            "title": "Scale",
            "trigger": {
                "type": "self-service",
                "operation": "DAY-2",
                "blueprintIdentifier": "service",
                "userInputs": {
                    "properties": {
                        "peer": {"type": "string", "format": "entity", "blueprint": "service"}
                    }
                },
            },
            "invocationMethod": {
                "type": "WEBHOOK",
                "url": receiver.url,
                "body": {
                    "mine": "{{ .entity.properties.double }}",
                    "peer": "{{ .inputs.peer.properties.double }}",
                },
            },
        }
        await define(client, org, action)
        start_worker()
        r = await client.post(
            "/v1/actions/scale/runs",
            json={"entity": "api", "properties": {"peer": "db"}},
            headers=org.headers,
        )
        assert r.status_code == 202, r.text
        await receiver.wait_for(1, timeout=15)
        assert receiver.deliveries[0].body == {"mine": 6, "peer": 10}


async def test_webhook_processing_holds_no_connection_while_mappings_run(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database
) -> None:
    from app.webhooks import processing
    from tests.test_webhooks import _catalog, _create, event_rows, post_events

    org = await make_org()
    await _catalog(client, org)
    webhook = await _create(
        client,
        org,
        {
            "identifier": "slow",
            "title": "Slow",
            "mappings": [
                {"blueprint": "label", "entity": {"identifier": LOOP_JQ, "properties": {}}}
            ],
        },
    )
    ids = await post_events(client, webhook, [{"n": 1}])
    seen, done = await _idle_in_transaction(db, processing.process_webhook(db, org.org_id, "slow"))
    assert seen, "the pass ended before it could be watched"
    assert max(seen) == 0, seen
    assert done == 1
    [row] = await event_rows(db, org, ids)
    assert row["status"] == "failed"
    assert "longer than" in str(row["outcome"])


def test_a_jq_process_ends_with_the_service_that_started_it() -> None:
    """A service killed mid-evaluation leaves no tenant loop running."""
    import signal
    import subprocess
    import sys

    script = (
        "import asyncio, json\n"
        "from app.kit import sandbox\n"
        "async def main():\n"
        "    await sandbox.evaluate('o', ['1'], ['{}'], outputs=1, output_limit=100)\n"
        "    print(sandbox._get_pool()._idle[0].process.pid, flush=True)\n"
        "    await sandbox.evaluate('o', ['def f: f; f'], ['{}'], outputs=1, output_limit=100)\n"
        "asyncio.run(main())\n"
    )
    service = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent
    )
    assert service.stdout is not None
    child = int(service.stdout.readline())
    time.sleep(0.3)  # the child is in its endless loop
    service.send_signal(signal.SIGKILL)
    service.wait()
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":  # ended, not yet reaped
            break
        time.sleep(0.05)
    alive = Path(f"/proc/{child}").exists() and (
        Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    )
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive, "the jq process outlived the service"


async def test_what_secrets_became_is_masked_where_it_comes_back(
    client: httpx.AsyncClient, make_org: OrgFactory, start_worker: Callable[..., Settings]
) -> None:
    """A message quoting a rendered header name or host, and a receiver echoing a header,
    show the mask, not the encoded secret."""
    import base64

    org = await make_org()
    await catalog(client, org)
    await add_secret(client, org, "PASSWORD", "pa55-word-value")
    encoded = base64.b64encode(b"pa55-word-value").decode()
    codes = "-".join(str(ord(c)) for c in "pa55-word-value")
    with WebhookReceiver(await signing_secret(client, org)) as receiver:
        receiver.respond(400, {"echo": f"Basic {encoded}"})
        for identifier, method in (
            (
                "header-name",
                {"headers": {"{{ .secrets.PASSWORD | @base64 }} x": "v"}},
            ),
            (
                "host",
                {
                    "url": "http://h{{ .secrets.PASSWORD | explode | map(tostring) "
                    '| join("-") }}.invalid/x'
                },
            ),
            (
                "echo",
                {
                    "synchronized": True,
                    "headers": {"Authorization": "Basic {{ .secrets.PASSWORD | @base64 }}"},
                },
            ),
        ):
            await define(
                client,
                org,
                self_service(identifier, {"type": "WEBHOOK", "url": receiver.url, **method}),
            )
        start_worker()
        for identifier in ("header-name", "host", "echo"):
            run_id = await start_run(client, org, identifier, {"name": "x"})
            run = await wait_run(client, org, run_id, ended)
            shown = json.dumps(run) + json.dumps(await run_logs(client, org, run_id))
            assert encoded not in shown and codes not in shown, (identifier, shown)
            assert run["status"] == "FAILURE", (identifier, run)


async def test_definitions_bound_the_jq_they_ask_the_server_to_compile(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    """jq is compiled on the server's event loop when a definition is saved: shapes that
    compile slowly are refused, and one definition's compiling is bounded in all."""
    org = await make_org()

    interpolations = '"' + "\\(1)" * 2000 + '"'
    r = await client.post(
        "/v1/blueprints", json=calculated({"x": interpolations}), headers=org.headers
    )
    assert r.status_code == 422 and "string interpolations" in r.text, r.text
    alternatives = " // ".join([".a"] * 1200)
    many = {f"p{i}": alternatives for i in range(60)}
    r = await client.post("/v1/blueprints", json=calculated(many), headers=org.headers)
    assert r.status_code == 422 and "too long to check" in r.text, r.text


def test_a_definitions_compile_budget_counts_cpu_time_not_the_wall() -> None:
    """Whether a definition is valid does not depend on how loaded the machine is: its
    compiling budget counts the compiler's CPU time. The process is held off the CPU for
    longer than the budget (SIGSTOP, as a loaded machine would) while it compiles a
    definition that needs a fraction of it; measured by the wall, the rest of the
    definition was refused as taking too long to check."""
    problems = Problems()
    expressions = [" // ".join([".a"] * 600)] * 4  # ~20 ms of CPU each
    pid = os.getpid()
    stopped = 3 * JQ_COMPILE_BUDGET_SECONDS
    helper = subprocess.Popen(
        ["sh", "-c", f"sleep 0.01; kill -STOP {pid}; sleep {stopped}; kill -CONT {pid}"]
    )
    started, started_cpu = time.perf_counter(), time.thread_time()
    try:
        for index, expression in enumerate(expressions):
            check_jq(expression, f"/{index}", problems)
    finally:
        helper.wait()
    wall, cpu = time.perf_counter() - started, time.thread_time() - started_cpu
    assert wall >= stopped, "the process was not stopped while it compiled: nothing was tried"
    assert cpu < JQ_COMPILE_BUDGET_SECONDS * 0.8, cpu
    assert problems.items == [], problems.items
    assert problems.jq_seconds <= cpu, (problems.jq_seconds, cpu)


# How a demoted child shows in _jq_children: the idle policy (Linux), or nice 19 elsewhere.
DEMOTED: int | str = "idle" if hasattr(os, "SCHED_IDLE") else sandbox.NICE_DEMOTED


def _jq_children(cpu: bool = False) -> dict[int, Any]:
    """This process's jq children: pid -> nice, or "idle" under the idle policy (with `cpu`:
    pid -> CPU seconds used)."""
    found: dict[int, Any] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and b"jq_child" in command:
            idle = hasattr(os, "SCHED_IDLE") and int(fields[38]) == os.SCHED_IDLE
            if cpu:
                found[int(entry)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            else:
                found[int(entry)] = "idle" if idle else int(fields[16])
    return found


async def test_a_long_call_drops_below_short_ones() -> None:
    """A call that runs past DEMOTE_AFTER goes to the lowest priority (the idle policy: it
    runs only on CPU nothing else wants), whichever org it is of: short calls are served
    first on a loaded machine."""
    sandbox.configure(Settings(jq_processes=2, jq_per_org=2, jq_time_limit_seconds=1))
    base = min(sandbox.NICE_DEMOTED, os.getpriority(os.PRIO_PROCESS, 0) + sandbox.NICE)
    try:
        assert await _via_template("org-quiet", ".inputs.n") == 2
        for _ in range(100):  # the pool starts its second child in the background
            if len(_jq_children()) == 2:
                break
            await asyncio.sleep(0.05)
        # The child that served the call has the usual priority; a warm child waiting for
        # its first call has the lowest (where priorities can be raised back) or the usual.
        assert base in _jq_children().values()
        assert set(_jq_children().values()) <= {base, DEMOTED}
        before = _jq_children(cpu=True)
        looping = asyncio.create_task(_via_template("org-noisy", LOOP_JQ))
        busy = None
        for _ in range(200):  # until the loop has used DEMOTE_AFTER of CPU (load may delay it)
            await asyncio.sleep(0.05)
            used = _jq_children(cpu=True)
            busy = next((pid for pid, s in used.items() if s - before.get(pid, 0) > 0.15), None)
            if busy is not None:
                break
        assert busy is not None
        assert _jq_children()[busy] == DEMOTED
        assert await _via_template("org-quiet", ".inputs.n") == 2  # on the other child
        states = _jq_children()
        assert states[busy] == DEMOTED
        assert [v for pid, v in states.items() if pid != busy] == [base]
        assert isinstance(await looping, TemplateError)  # its time limit
    finally:
        sandbox.configure(Settings())


async def test_a_call_starts_at_the_services_priority_then_drops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A call's first PROMPT_SECONDS run at the service's own priority (a quick call does
    not wait for a core the service keeps busy), then at the children's (nice 10), and past
    DEMOTE_AFTER of CPU under the idle policy. Stretched here to be seen: 0.3 s, 0.6 s.
    Where priorities cannot be raised back, calls run at the children's priority."""
    monkeypatch.setattr(sandbox, "PROMPT_SECONDS", 0.3)
    monkeypatch.setattr(sandbox, "DEMOTE_AFTER", 0.6)
    sandbox.configure(Settings(jq_processes=1, jq_per_org=1, jq_time_limit_seconds=2))
    service = os.getpriority(os.PRIO_PROCESS, 0)
    base = min(sandbox.NICE_DEMOTED, service + sandbox.NICE)
    try:
        assert await _via_template("org-quiet", ".inputs.n") == 2
        [pid] = _jq_children()
        assert _jq_children()[pid] == base  # between calls
        looping = asyncio.create_task(_via_template("org-noisy", LOOP_JQ))
        seen: list[Any] = []
        while not looping.done():
            state = _jq_children().get(pid)
            if state is not None and (not seen or seen[-1] != state):
                seen.append(state)
            await asyncio.sleep(0.01)
        assert isinstance(looping.result(), TemplateError)  # its time limit
        if sandbox._MAY_RAISE_PRIORITY:
            if seen[:1] == [base]:  # looked at before the call began
                seen = seen[1:]
            assert seen == [service, base, DEMOTED]
        else:
            assert seen == [base, DEMOTED]
    finally:
        sandbox.configure(Settings())


async def test_a_call_is_not_held_up_by_a_busy_loop() -> None:
    """A call is written and read on the caller's loop. In a thread it waited for the
    interpreter's lock twice, and a loop busy with Python code gives it up only every 5 ms
    (the switch interval): counted in steps of a busy task (0.4 ms each), quick calls took
    from 3 to 15,000 of them (the median about 800), and 5 each now."""
    sandbox.configure(Settings(jq_processes=2, jq_per_org=2))
    try:
        assert await _via_template("org-quiet", ".inputs.n") == 2
        for _ in range(100):  # both children started and warm: no call waits for a start
            if len(sandbox._get_pool()._idle) == 2:
                break
            await asyncio.sleep(0.05)
        steps = 0
        stop = False

        async def busy() -> None:
            nonlocal steps
            while not stop:
                end = time.perf_counter() + 0.0004
                while time.perf_counter() < end:
                    pass
                steps += 1
                await asyncio.sleep(0)

        spinning = asyncio.create_task(busy())
        took = []
        try:
            for _ in range(15):
                before = steps
                assert await _via_template("org-quiet", ".inputs.n") == 2
                took.append(steps - before)
        finally:
            stop = True
            await spinning
        assert sorted(took)[len(took) // 2] <= 10, took
    finally:
        sandbox.configure(Settings())


def test_a_child_waits_for_its_first_call_at_the_lowest_priority(tmp_path: Path) -> None:
    """A child started ahead of any call (the interpreter, jq: ~40 ms of CPU) and warmed up
    waits at the lowest priority, then its calls run at the usual one; one started for a
    call starts at the usual one."""
    base = min(sandbox.NICE_DEMOTED, os.getpriority(os.PRIO_PROCESS, 0) + sandbox.NICE)
    child = sandbox._Child(str(tmp_path), idle=True)  # as the pool starts one ahead of calls
    try:
        pid = child.process.pid
        for _ in range(100):  # its command line shows once the kernel has set it up
            if pid in _jq_children():
                break
            time.sleep(0.01)
        assert _jq_children()[pid] == (DEMOTED if sandbox._MAY_RAISE_PRIORITY else base)
        assert json.loads(child.call(sandbox._WARM_UP, 5.0, restore=False))
        assert _jq_children()[pid] == (DEMOTED if sandbox._MAY_RAISE_PRIORITY else base)
        frame = sandbox.request(["1 + 1"], ["{}"], outputs=1, output_limit=1 << 20)
        assert json.loads(child.call(frame, 5.0)) == [[[True, [2]]]]
        assert _jq_children()[pid] == base
    finally:
        child.kill()
    child = sandbox._Child(str(tmp_path))
    try:
        for _ in range(100):
            if child.process.pid in _jq_children():
                break
            time.sleep(0.01)
        assert _jq_children()[child.process.pid] == base
    finally:
        child.kill()


def test_a_demoted_child_serves_its_next_call_at_the_usual_priority(tmp_path: Path) -> None:
    base = min(sandbox.NICE_DEMOTED, os.getpriority(os.PRIO_PROCESS, 0) + sandbox.NICE)
    child = sandbox._Child(str(tmp_path))

    def call(program: str) -> Any:
        frame = sandbox.request([program], ["{}"], outputs=1, output_limit=1 << 20)
        [[(ok, outputs)]] = json.loads(child.call(frame, 5.0))
        assert ok, outputs
        return outputs[0]

    try:
        assert call("[range(1500000)] | length") == 1500000  # well past DEMOTE_AFTER
        assert _jq_children()[child.process.pid] == DEMOTED
        assert call("1 + 1") == 2
        assert _jq_children()[child.process.pid] == base
    finally:
        child.kill()


async def test_the_pool_keeps_its_children_started_and_replaces_an_ended_one() -> None:
    """Children are started and warmed up ahead of the calls (a call, whichever org's, does
    not pay for a start), and a child ended at its time limit is replaced the same way."""
    sandbox.configure(Settings(jq_processes=2, jq_per_org=1, jq_time_limit_seconds=0.3))
    try:
        pool = sandbox._get_pool()

        async def settled(count: int) -> list[int]:
            for _ in range(200):  # the top-up runs in the background
                live = [c.process.pid for c in pool._idle if c.alive()]
                if len(live) == count:
                    return live
                await asyncio.sleep(0.05)
            raise AssertionError(f"{count} ready children expected, found {len(live)}")

        assert await _via_template("org-quiet", ".inputs.n") == 2
        first = await settled(2)  # the one that served, and one more started meanwhile
        assert isinstance(await _via_template("org-noisy", LOOP_JQ), TemplateError)
        after = await settled(2)  # the ended child's successor is ready too
        assert len(set(after) - set(first)) == 1
        assert sorted(_jq_children()) == sorted(after)
        assert await _via_template("org-quiet", ".inputs.n") == 2
        assert sorted(_jq_children()) == sorted(after)  # no start on the way
    finally:
        sandbox.configure(Settings())


async def test_one_orgs_definition_checks_are_paced_and_not_anothers(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    """Definitions' jq is compiled on the server's loop: an org that saves them faster than
    its share is told to come back (503, Retry-After); another org saves at once."""
    sandbox.configure(Settings(jq_compile_share=0.001, jq_compile_burst_seconds=0.05))
    try:
        a, b = await make_org(), await make_org()
        heavy = '"' + "\\(1)" * 250 + '"'  # 250 interpolations: milliseconds to compile
        answers = []
        for i in range(40):
            body = {**calculated({"c": heavy}), "identifier": f"b{i}"}
            r = await client.post("/v1/blueprints", json=body, headers=b.headers)
            answers.append(r)
            if r.status_code != 201:
                break
        refused = answers[-1]
        assert refused.status_code == 503, [r.status_code for r in answers]
        assert refused.json()["error"] == "evaluation_busy"
        assert int(refused.headers["Retry-After"]) >= 1
        assert len(answers) > 1  # the burst was served first
        r = await client.post("/v1/blueprints", json=calculated({"c": heavy}), headers=a.headers)
        assert r.status_code == 201, r.text
        # Nothing of the refused definition was written.
        r = await client.get(f"/v1/blueprints/b{len(answers) - 1}", headers=b.headers)
        assert r.status_code == 404
    finally:
        sandbox.configure(Settings())
