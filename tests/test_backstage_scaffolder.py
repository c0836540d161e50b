"""`portolan import backstage` and Scaffolder Templates: workflows the API accepts and a
worker runs (steps sent to a real runner on 127.0.0.1), the report, skeletons, catalog-only
directory reads, dry run = import, tenants."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jq
import pytest

from app.backstage import expressions
from app.backstage.importer import Report, import_catalog
from app.backstage.mapping import self_ref
from app.backstage.reader import Document
from app.backstage.scaffolder import map_template
from app.config import Settings
from tests.conftest import LiveServer, Org, OrgFactory
from tests.receivers import WebhookReceiver
from tests.test_backstage import CATALOG, _call, _cli, _client, _entities
from tests.test_backstage import _org_with_payments_team as org_with_payments_team
from tests.test_dispatch import add_secret, signing_secret
from tests.test_workflows import nodes_of, wait_done

DATA = Path(__file__).resolve().parent / "data" / "backstage-scaffolder"
TEMPLATE = DATA / "templates" / "service" / "template.yaml"
RUNNER = "http://127.0.0.1:9/scaffolder"


async def _import_with_runner(
    live_server: LiveServer,
    org: Org,
    *paths: Path,
    runner: str | None = RUNNER,
    dry_run: bool = False,
) -> Report:
    def work() -> Report:
        with _client(live_server, org) as client:
            return import_catalog(client, list(paths), dry_run=dry_run, runner_url=runner)

    return await asyncio.to_thread(work)


async def _workflow(live_server: LiveServer, org: Org, identifier: str) -> dict[str, Any]:
    body = await _call(live_server, org, "GET", f"/v1/workflows/{identifier}")
    return dict(body["workflow"])


def _node(workflow: dict[str, Any], identifier: str) -> dict[str, Any]:
    return next(n for n in workflow["nodes"] if n["identifier"] == identifier)


# ------------------------------------------------------------------------------------------
# Expressions


def _jq(expression: str, data: Any) -> Any:
    return jq.compile(expression).input(data).first()


RUN_DATA = {
    "outputs": {
        "trigger": {"name": " Ledger ", "repoUrl": "github.com?owner=acme&repo=ledger", "n": 0},
        "publish": {"remoteUrl": "https://github.com/acme/ledger"},
    },
    "workflowRun": {"identifier": "wfr_1", "trigger": {"by": {"email": "Ada@example.com"}}},
}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("parameters.name | trim | lower", "ledger"),
        ("parameters['repoUrl'] | parseRepoUrl | pick('owner')", "acme"),
        ("parameters.repoUrl | projectSlug", "acme/ledger"),
        ("steps['publish'].output.remoteUrl", "https://github.com/acme/ledger"),
        ("parameters.n or 'none'", "none"),  # 0 is false, as in JavaScript
        (
            "parameters.missing | default(parameters.repoUrl | parseRepoUrl | pick('repo'))",
            "ledger",
        ),
        ("'a' if parameters.n === 0 else 'b'", "a"),
        ("!parameters.n and parameters.name | replace(' ', '_')", "_Ledger_"),
        ("context.task.id", "wfr_1"),
        ("user.entity.spec.profile.email | lower", "ada@example.com"),
    ],
)
def test_expressions_become_jq_with_the_same_value(source: str, expected: Any) -> None:
    context = expressions.Context(earlier_steps={"publish"}, secrets=False)
    assert _jq(expressions.expression(source, context), RUN_DATA) == expected


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("user.entity.metadata.name", "user.entity.metadata.name has no counterpart"),
        ("parameters.owner | parseEntityRef", "'parseEntityRef' has no jq counterpart"),
        ("steps.later.output.url", "does not run before this one"),
        ("steps.publish.output", "the whole output"),
        ("secrets.TOKEN", "secrets are read in a step's input only"),
        ("parameters[parameters.key]", "only literal keys"),
    ],
)
def test_expressions_without_a_counterpart_are_refused_by_name(source: str, reason: str) -> None:
    context = expressions.Context(earlier_steps={"publish"}, secrets=False)
    with pytest.raises(expressions.Untranslatable, match=reason):
        expressions.expression(source, context)


def test_a_string_of_one_expression_keeps_its_type_and_text_is_interpolated() -> None:
    context = expressions.Context(earlier_steps=set(), secrets=True)
    converted = expressions.template(
        {"replicas": "${{ parameters.replicas }}", "d": "x ${{ parameters.name }} y", "k": 3},
        context,
    )
    assert converted == {
        "replicas": "{{ .outputs.trigger.replicas }}",
        "d": "x {{ .outputs.trigger.name }} y",
        "k": 3,
    }
    with pytest.raises(expressions.Untranslatable, match="outside"):
        expressions.template("{{ not a backstage expression }}", context)


def test_an_if_is_true_as_javascript_would_have_it() -> None:
    context = expressions.Context(earlier_steps=set(), secrets=False)
    check = expressions.condition("${{ parameters.flag }}", context)
    assert [_jq(check, {"outputs": {"trigger": {"flag": v}}}) for v in ("", 0, None, "y", 1)] == [
        False,
        False,
        False,
        True,
        True,
    ]
    assert expressions.condition(False, context) == "false"


# ------------------------------------------------------------------------------------------
# The workflow a template becomes


async def test_a_template_becomes_a_workflow_with_a_trigger_and_chained_steps(
    live_server: LiveServer, make_org: OrgFactory
) -> None:
    org = await make_org()
    report = await _import_with_runner(live_server, org, DATA)
    assert report.errors == [], report.render()
    assert report.workflows.as_dict() == {"created": 1, "updated": 0, "unchanged": 0, "failed": 0}
    workflow = await _workflow(live_server, org, "create-service")
    assert (workflow["title"], workflow["category"], workflow["version"]) == (
        "Create a service",
        "service",
        1,
    )
    assert [n["identifier"] for n in workflow["nodes"]] == [
        "trigger",
        "fetchBase",
        "fetchDocs:if",
        "fetchDocs",
        "publish",
        "register",
    ]
    assert [
        (
            c["sourceIdentifier"],
            c["targetIdentifier"],
            c.get("sourceOutletIdentifier"),
            c.get("fallback"),
        )
        for c in workflow["connections"]
    ] == [
        ("trigger", "fetchBase", None, None),
        ("fetchBase", "fetchDocs:if", None, None),
        ("fetchDocs:if", "fetchDocs", "run", None),
        ("fetchDocs:if", "publish", None, True),
        ("fetchDocs", "publish", None, None),
        ("publish", "register", None, None),
    ]
    for step in ("fetchBase", "fetchDocs", "publish", "register"):
        config = _node(workflow, step)["config"]
        assert (config["type"], config["url"], config["method"]) == ("WEBHOOK", RUNNER, "POST")


async def test_the_parameters_pages_become_the_triggers_user_inputs(
    live_server: LiveServer, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _import_with_runner(live_server, org, DATA)
    trigger = _node(await _workflow(live_server, org, "create-service"), "trigger")["config"]
    assert trigger["type"] == "SELF_SERVE_TRIGGER"
    assert trigger["permissions"] == {"roles": ["Member"]}
    inputs = trigger["userInputs"]
    props = inputs["properties"]
    assert props["name"] == {
        "title": "Name",
        "description": "Unique name of the component",
        "type": "string",
        "pattern": "^[a-z][a-z0-9-]*$",
        "maxLength": 40,
    }  # ui:autofocus and ui:options dropped
    assert props["owner"]["format"] == "team"  # OwnerPicker of Groups
    assert (props["system"]["format"], props["system"]["blueprint"]) == ("entity", "system")
    assert props["description"] == {
        "title": "Description",
        "type": "string",
        "format": "multi-line",
    }
    assert props["repoUrl"] == {"title": "Repository Location", "type": "string"}
    assert props["replicas"] == {"title": "Replicas", "type": "number", "default": 2, "minimum": 1}
    assert props["language"]["enum"] == ["python", "go"] and "enumNames" not in props["language"]
    assert inputs["required"] == ["name", "owner", "repoUrl"]
    assert inputs["order"] == [
        "name",
        "owner",
        "system",
        "description",  # the first page's ui:order
        "repoUrl",
        "replicas",
        "language",
        "publishDocs",
    ]
    assert [s["title"] for s in inputs["steps"]] == ["Fill in some steps", "Choose a location"]


async def test_step_inputs_are_jq_templates_and_read_outputs_become_variables(
    live_server: LiveServer, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _import_with_runner(live_server, org, DATA)
    workflow = await _workflow(live_server, org, "create-service")
    publish = _node(workflow, "publish")
    assert publish["config"]["body"] == {
        "action": "publish:github",
        "input": {
            "allowedHosts": ["github.com"],
            "description": "This is {{ .outputs.trigger.name }} "
            "({{ ((.outputs.trigger.language) | ascii_upcase) }})",
            "repoUrl": "{{ .outputs.trigger.repoUrl }}",
            "defaultBranch": "main",
            "token": '{{ .secrets["GITHUB_TOKEN"] }}',
        },
        "step": {"id": "publish", "name": "Publish"},
        "template": "template:default/create-service",
        "workflowRun": "{{ .workflowRun.identifier }}",
    }
    # Only what a later step reads; spec.output's reads are not kept (reported).
    assert publish["variables"] == {
        "repoContentsUrl": "{{ .result.response.data.output.repoContentsUrl }}"
    }
    register = _node(workflow, "register")["config"]["body"]["input"]
    assert register["repoContentsUrl"] == '{{ .outputs["publish"].repoContentsUrl }}'
    condition = _node(workflow, "fetchDocs:if")["config"]["outlets"][0]
    assert condition["identifier"] == "run"
    assert condition["expression"].startswith("((.outputs.trigger.publishDocs) |")


async def test_the_imported_workflow_runs_its_steps_through_the_runner(
    live_server: LiveServer,
    make_org: OrgFactory,
    client: httpx.AsyncClient,
    start_worker: Callable[..., Settings],
) -> None:
    org = await make_org()
    await add_secret(client, org, "GITHUB_TOKEN", "ghp-test-token-123")
    with WebhookReceiver(await signing_secret(client, org)) as runner:
        runner.respond(
            200,
            {
                "output": {
                    "remoteUrl": "https://github.com/acme/ledger-web",
                    "repoContentsUrl": "https://github.com/acme/ledger-web/blob/main",
                }
            },
        )
        report = await _import_with_runner(live_server, org, DATA, runner=runner.url + "/steps")
        assert report.workflows.created == 1, report.render()
        start_worker()
        inputs = {
            "name": "ledger-web",
            "owner": "platform",
            "system": "payments",
            "repoUrl": "github.com?owner=acme&repo=ledger-web",
        }
        r = await client.post(
            "/v1/workflows/create-service/runs", json={"inputs": inputs}, headers=org.headers
        )
        assert r.status_code == 202, r.text
        run = await wait_done(client, org, r.json()["workflowRun"]["identifier"])
        assert run["result"] == "SUCCESS", run
        nodes = nodes_of(run)
        assert nodes["trigger"]["output"] == {
            **inputs,
            "replicas": 2,
            "language": "python",
            "publishDocs": False,
        }
        assert nodes["fetchDocs:if"]["output"] == {"selectedOutlet": None}
        assert "fetchDocs" not in nodes
        assert nodes["publish"]["output"] == {
            "repoContentsUrl": "https://github.com/acme/ledger-web/blob/main"
        }
        steps = {d.body["step"]["id"]: d.body for d in runner.deliveries}
        assert list(steps) == ["fetchBase", "publish", "register"]
        assert all(d.path == "/steps" for d in runner.deliveries)
        assert steps["fetchBase"]["input"]["values"] == {
            "name": "ledger-web",
            "owner": "platform",
            "system": "payments",
            "replicas": 2,
            "destination": {"host": "github.com", "owner": "acme", "repo": "ledger-web"},
        }
        assert steps["publish"]["input"]["description"] == "This is ledger-web (PYTHON)"
        assert steps["publish"]["input"]["token"] == "ghp-test-token-123"
        assert steps["register"]["input"] == {
            "repoContentsUrl": "https://github.com/acme/ledger-web/blob/main",
            "catalogInfoPath": "/catalog-info.yaml",
        }
        assert {b["workflowRun"] for b in steps.values()} == {run["identifier"]}

        # publishDocs runs the step its if guards
        r = await client.post(
            "/v1/workflows/create-service/runs",
            json={"inputs": {**inputs, "publishDocs": True}},
            headers=org.headers,
        )
        second = await wait_done(client, org, r.json()["workflowRun"]["identifier"])
        assert second["result"] == "SUCCESS"
        assert [n["node"]["identifier"] for n in second["nodeRuns"]] == [
            "trigger",
            "fetchBase",
            "fetchDocs:if",
            "fetchDocs",
            "publish",
            "register",
        ]
        later = [d.body for d in runner.deliveries if d.body["workflowRun"] == second["identifier"]]
        assert [b["action"] for b in later] == [
            "fetch:template",
            "fetch:plain",
            "publish:github",
            "catalog:register",
        ]


# ------------------------------------------------------------------------------------------
# The report


async def test_the_report_says_what_each_input_and_step_became(
    live_server: LiveServer, make_org: OrgFactory
) -> None:
    org = await make_org()
    report = await _import_with_runner(live_server, org, DATA)
    lines = {t.ref: t for t in report.templates}
    service = lines["template:default/create-service"]
    assert (service.status, service.workflow, Path(service.file).name, service.document) == (
        "created",
        "create-service",
        "template.yaml",
        1,
    )
    assert [(s.step, s.action, s.became) for s in service.steps] == [
        ("fetchBase", "fetch:template", "WEBHOOK node fetchBase to the Scaffolder runner"),
        (
            "fetchDocs",
            "fetch:plain",
            "CONDITION node fetchDocs:if (its if), then WEBHOOK node fetchDocs to the "
            "Scaffolder runner",
        ),
        ("publish", "publish:github", "WEBHOOK node publish to the Scaffolder runner"),
        ("register", "catalog:register", "WEBHOOK node register to the Scaffolder runner"),
    ]
    assert "owner: OwnerPicker -> team (its name, not a Group ref)" in service.inputs
    assert lines["template:default/docs-site"].status == "skipped"
    rendered = report.render()
    assert "template:default/create-service -> workflow create-service: created" in rendered
    assert "    step publish (publish:github): WEBHOOK node publish to the Scaffolder runner" in (
        rendered
    )

    found = {(p.code, Path(p.file).name, p.ref) for p in report.problems}
    assert found == {
        ("skeleton", "${{ values.name }}", ""),  # the folder, once
        ("skeleton", "catalog-info.yaml", ""),  # the skeleton's own catalog-info.yaml
        ("untranslatable", "docs.yaml", "template:default/docs-site"),
        ("unmapped-field", "template.yaml", "template:default/create-service"),  # RepoUrlPicker
        ("not-kept", "template.yaml", "template:default/create-service"),
        ("dangling-ref", "system.yaml", "component:default/ledger"),
    }
    untranslatable = next(p for p in report.problems if p.code == "untranslatable")
    assert "step log (debug:log) input" in untranslatable.message
    assert "parseEntityRef" in untranslatable.message
    not_kept = sorted(p.message for p in report.problems if p.code == "not-kept")
    assert [m.split(":")[0].split(" (")[0] for m in not_kept] == [
        "spec.output",
        "spec.parameters[1].properties.language",  # enumNames
        "spec.parameters[1].properties.replicas",  # integer -> number
    ]
    # The OpenAPI file beside its API is not a catalog document: counted, not reported.
    assert report.ignored == 1
    assert (report.files, report.documents) == (4, 7)


async def test_without_a_runner_templates_are_reported_and_not_imported(
    live_server: LiveServer, make_org: OrgFactory
) -> None:
    org = await make_org()
    report = await _import_with_runner(live_server, org, TEMPLATE, runner=None)
    assert report.exit_code == 1  # nothing else to import
    (no_runner,) = [p for p in report.problems if p.code == "no-runner"]
    assert "catalog:register, fetch:plain, fetch:template, publish:github" in no_runner.message
    (line,) = report.templates
    assert line.status == "skipped"
    assert {s.became for s in line.steps} == {"not imported (no runner URL)"}
    assert (await _call(live_server, org, "GET", "/v1/workflows"))["workflows"] == []


async def test_an_openapi_definition_is_read_and_a_missing_target_kept_as_text(
    live_server: LiveServer, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _import_with_runner(live_server, org, DATA / "system.yaml")
    api = (await _entities(live_server, org, "api"))["ledger-api"]
    assert api["properties"]["definition"] == (DATA / "apis" / "ledger-openapi.yaml").read_text()
    ledger = (await _entities(live_server, org, "component"))["ledger"]
    assert ledger["relations"]["providesApis"] == ["ledger-api"]
    # No Resource in the input: no resource blueprint, no relation, the ref kept as text.
    assert "dependsOnResources" not in ledger["relations"]
    assert ledger["properties"]["backstage"] == {
        "unresolvedRefs": {"dependsOnResources": ["resource:default/ledger-db"]}
    }


async def test_a_missing_target_imported_later_becomes_a_link(
    live_server: LiveServer, make_org: OrgFactory, tmp_path: Path
) -> None:
    org = await make_org()
    shutil.copy(DATA / "system.yaml", tmp_path / "system.yaml")
    (tmp_path / "apis").mkdir()
    shutil.copy(DATA / "apis" / "ledger-openapi.yaml", tmp_path / "apis")
    await _import_with_runner(live_server, org, tmp_path)
    (tmp_path / "db.yaml").write_text(
        "apiVersion: backstage.io/v1alpha1\nkind: Resource\nmetadata: {name: ledger-db}\n"
        "spec: {type: database, owner: group:platform}\n"
    )
    report = await _import_with_runner(live_server, org, tmp_path)
    assert report.entities["component"].updated == 1
    ledger = (await _entities(live_server, org, "component"))["ledger"]
    assert ledger["relations"]["dependsOnResources"] == ["ledger-db"]
    assert ledger["properties"].get("backstage") is None  # the text went with the link


# ------------------------------------------------------------------------------------------
# Again, dry run, tenants


async def test_importing_again_changes_nothing_and_a_changed_template_is_a_new_version(
    live_server: LiveServer, make_org: OrgFactory, tmp_path: Path
) -> None:
    org = await make_org()
    shutil.copytree(DATA, tmp_path / "catalog")
    root = tmp_path / "catalog"
    await _import_with_runner(live_server, org, root)
    again = await _import_with_runner(live_server, org, root)
    assert again.workflows.as_dict() == {"created": 0, "updated": 0, "unchanged": 1, "failed": 0}
    assert (await _workflow(live_server, org, "create-service"))["version"] == 1
    template = root / "templates" / "service" / "template.yaml"
    template.write_text(template.read_text().replace("defaultBranch: main", "defaultBranch: trunk"))
    changed = await _import_with_runner(live_server, org, root)
    assert changed.workflows.updated == 1
    workflow = await _workflow(live_server, org, "create-service")
    assert workflow["version"] == 2
    assert _node(workflow, "publish")["config"]["body"]["input"]["defaultBranch"] == "trunk"


async def test_a_dry_run_reports_exactly_what_the_import_then_does(
    live_server: LiveServer, make_org: OrgFactory
) -> None:
    org = await org_with_payments_team(make_org, live_server)
    paths = (CATALOG, DATA)
    dry = await _import_with_runner(live_server, org, *paths, dry_run=True)
    assert (await _call(live_server, org, "GET", "/v1/workflows"))["workflows"] == []
    assert (await _call(live_server, org, "GET", "/v1/blueprints"))["blueprints"] == []
    done = await _import_with_runner(live_server, org, *paths)
    planned, outcome = dry.as_dict(), done.as_dict()
    assert (planned.pop("dryRun"), outcome.pop("dryRun")) == (True, False)
    assert planned == outcome
    assert outcome["workflows"]["created"] == 1 and outcome["entities"]["component"]["created"] == 4
    # And once more against what is now there: nothing to do, predicted and done.
    dry_again = await _import_with_runner(live_server, org, *paths, dry_run=True)
    again = await _import_with_runner(live_server, org, *paths)
    planned, outcome = dry_again.as_dict(), again.as_dict()
    planned.pop("dryRun"), outcome.pop("dryRun")
    assert planned == outcome
    assert outcome["workflows"] == {"created": 0, "updated": 0, "unchanged": 1, "failed": 0}


async def test_importing_into_one_org_leaves_another_untouched(
    live_server: LiveServer, make_org: OrgFactory
) -> None:
    first, second = await make_org(), await make_org()
    await _import_with_runner(live_server, first, DATA)
    assert (await _call(live_server, second, "GET", "/v1/workflows"))["workflows"] == []
    assert (await _call(live_server, second, "GET", "/v1/blueprints"))["blueprints"] == []
    before = await _workflow(live_server, first, "create-service")
    report = await _import_with_runner(live_server, second, DATA, runner="http://127.0.0.1:8/other")
    assert report.workflows.created == 1  # its own, not the first org's
    theirs = await _workflow(live_server, second, "create-service")
    assert _node(theirs, "publish")["config"]["url"] == "http://127.0.0.1:8/other"
    assert await _workflow(live_server, first, "create-service") == before


# ------------------------------------------------------------------------------------------
# --prune


async def test_prune_deletes_what_an_earlier_import_wrote_and_the_files_no_longer_hold(
    live_server: LiveServer, make_org: OrgFactory, tmp_path: Path
) -> None:
    org = await make_org()
    root = tmp_path / "catalog"
    shutil.copytree(DATA, root)
    await _import_with_runner(live_server, org, root)
    # Written by hand, not by the import: never pruned.
    await _call(
        live_server,
        org,
        "POST",
        "/v1/blueprints/component/entities",
        {"identifier": "handmade", "properties": {"type": "service"}},
    )
    system = root / "system.yaml"
    documents = system.read_text().split("---\n")
    system.write_text("---\n".join(d for d in documents if "name: ledger\n" not in d))
    shutil.rmtree(root / "templates" / "service")

    kept = await _import_with_runner(live_server, org, root)  # without --prune
    assert kept.pruned == []
    assert "ledger" in await _entities(live_server, org, "component")

    def run(dry_run: bool) -> Report:
        with _client(live_server, org) as client:
            return import_catalog(client, [root], dry_run=dry_run, runner_url=RUNNER, prune=True)

    planned = await asyncio.to_thread(run, True)
    assert planned.pruned == [
        "component:default/ledger: entity ledger of blueprint component",
        "template:default/create-service: workflow create-service",
    ]
    assert "ledger" in await _entities(live_server, org, "component")
    done = await asyncio.to_thread(run, False)
    assert done.errors == []
    plan, outcome = planned.as_dict(), done.as_dict()
    plan.pop("dryRun"), outcome.pop("dryRun")
    assert plan == outcome
    assert set(await _entities(live_server, org, "component")) == {"handmade"}
    assert (await _call(live_server, org, "GET", "/v1/workflows"))["workflows"] == []
    assert set(await _entities(live_server, org, "api")) == {"ledger-api"}
    teams = (await _call(live_server, org, "GET", "/v1/teams"))["teams"]
    assert [t["name"] for t in teams] == ["platform"]
    again = await asyncio.to_thread(run, False)
    assert again.pruned == []


async def test_a_ref_to_an_entity_being_pruned_is_kept_as_text_not_linked(
    live_server: LiveServer, make_org: OrgFactory, tmp_path: Path
) -> None:
    org = await make_org()
    (tmp_path / "a.yaml").write_text(
        "apiVersion: backstage.io/v1alpha1\nkind: Component\nmetadata: {name: web}\n"
        "spec: {type: website, owner: user:ada, dependsOn: [component:api]}\n"
    )
    (tmp_path / "b.yaml").write_text(
        "apiVersion: backstage.io/v1alpha1\nkind: Component\nmetadata: {name: api}\n"
        "spec: {type: service, owner: user:ada}\n"
    )
    await _import_with_runner(live_server, org, tmp_path)
    assert (await _entities(live_server, org, "component"))["web"]["relations"][
        "dependsOnComponents"
    ] == ["api"]
    (tmp_path / "b.yaml").unlink()
    report = await _import_with_runner(live_server, org, tmp_path)
    assert report.entities["component"].unchanged == 1  # api still on the server: linked
    with _client(live_server, org) as client:
        pruned = await asyncio.to_thread(
            import_catalog, client, [tmp_path], runner_url=RUNNER, prune=True
        )
    assert pruned.pruned == ["component:default/api: entity api of blueprint component"]
    web = (await _entities(live_server, org, "component"))["web"]
    assert web["relations"]["dependsOnComponents"] == []
    assert web["properties"]["backstage"] == {
        "unresolvedRefs": {"dependsOnComponents": ["component:default/api"]}
    }


async def test_the_command_takes_the_runner_url_and_prints_each_steps_fate(
    live_server: LiveServer, make_org: OrgFactory
) -> None:
    org = await make_org()
    done = await asyncio.to_thread(
        _cli, live_server, org, str(DATA), "--scaffolder-runner-url", RUNNER, "--prune"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Workflows (created / updated / unchanged / failed): 1 / 0 / 0 / 0" in done.stdout
    assert "  template:default/create-service -> workflow create-service: created" in done.stdout
    assert "    input owner: OwnerPicker -> team (its name, not a Group ref)" in done.stdout
    assert (
        "    step register (catalog:register): WEBHOOK node register to the Scaffolder runner"
        in done.stdout
    )
    assert "  template:default/docs-site -> workflow docs-site: skipped" in done.stdout
    assert "Ignored 1 YAML file(s) holding no catalog document" in done.stdout
    assert (
        _node(await _workflow(live_server, org, "create-service"), "publish")["config"]["url"]
        == RUNNER
    )
    without = await asyncio.to_thread(_cli, live_server, org, str(TEMPLATE))
    assert without.returncode == 1
    assert "[no-runner] template:default/create-service" in without.stdout


# ------------------------------------------------------------------------------------------
# Mapping alone (no server): the cases the fixtures do not reach


def _map(body: dict[str, Any], blueprints: set[str] | None = None) -> tuple[Any, list[Any]]:
    document = Document("t.yaml", 1, Path("t.yaml"), body)
    problems: list[Any] = []
    mapped = map_template(
        document,
        self_ref(document),
        runner_url=RUNNER,
        blueprints=blueprints or set(),
        problems=problems,
    )
    return mapped, problems


def _template(name: str, parameters: Any, steps: Any) -> dict[str, Any]:
    return {
        "apiVersion": "scaffolder.backstage.io/v1beta3",
        "kind": "Template",
        "metadata": {"name": name},
        "spec": {"type": "service", "parameters": parameters, "steps": steps},
    }


LOG = [{"id": "log", "action": "debug:log", "input": {"message": "hi"}}]


def test_pickers_map_to_the_input_of_their_kind_or_a_reported_plain_string() -> None:
    def picker(field: str, **options: Any) -> dict[str, Any]:
        return {"type": "string", "ui:field": field, "ui:options": options}

    mapped, problems = _map(
        _template(
            "pickers",
            {
                "properties": {
                    "owner": picker("OwnerPicker"),
                    "person": picker("OwnerPicker", allowedKinds=["User"]),
                    "service": picker("EntityPicker", catalogFilter=[{"kind": "Component"}]),
                    "db": picker("EntityPicker", allowedKinds=["Resource"]),
                    "any": picker("EntityPicker", allowedKinds=["Component", "API"]),
                    "apis": {"type": "array", **picker("MultiEntityPicker", allowedKinds=["API"])},
                    "tags": {"type": "array", "ui:field": "EntityTagsPicker"},
                }
            },
            LOG,
        ),
        blueprints={"component", "api"},
    )
    props = mapped.definition["nodes"][0]["config"]["userInputs"]["properties"]
    assert props["owner"]["format"] == "team"
    assert props["person"]["format"] == "user"
    assert (props["service"]["format"], props["service"]["blueprint"]) == ("entity", "component")
    assert props["db"] == {"type": "string"}  # no resource blueprint here
    assert props["any"] == {"type": "string"}  # two kinds
    assert props["apis"]["items"] == {"type": "string", "format": "entity", "blueprint": "api"}
    assert props["tags"] == {"type": "array", "items": {"type": "string"}}
    unmapped = sorted(p.message.split(":")[0] for p in problems if p.code == "unmapped-field")
    assert unmapped == ["spec.parameters.properties.any", "spec.parameters.properties.db"]


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        (
            _template("loop", {}, [{"id": "x", "action": "debug:log", "each": ["a", "b"]}]),
            "unsupported-step",
            "loops (each)",
        ),
        (
            _template("clash", {}, [{"id": "trigger", "action": "debug:log"}]),
            "invalid-template",
            "cannot name a workflow node",
        ),
        (_template("no-steps", {}, []), "invalid-template", "needs spec.steps"),
        (
            _template("who", {}, [{"id": "a", "action": "x", "input": {"o": "${{ user.ref }}"}}]),
            "untranslatable",
            "step a (x) input: user.ref has no counterpart",
        ),
        (
            _template("bad-if", {}, [{"id": "a", "action": "x", "if": "${{ secrets.T }}"}]),
            "untranslatable",
            "step a (x) if: secrets are read in a step's input only",
        ),
        (_template("dotted.name", {}, LOG), "invalid-name", "cannot be a workflow identifier"),
    ],
)
def test_templates_that_cannot_be_workflows_are_reported_whole(
    body: dict[str, Any], code: str, message: str
) -> None:
    mapped, problems = _map(body)
    assert mapped.definition is None
    assert [p.code for p in problems] == [code]
    assert message in problems[0].message


def test_a_step_without_an_id_gets_one_and_the_chain_ends_with_the_last_step() -> None:
    mapped, problems = _map(
        _template(
            "plain",
            None,
            [{"action": "debug:log"}, {"action": "debug:wait", "if": True}],
        )
    )
    assert problems == []
    definition = mapped.definition
    assert [n["identifier"] for n in definition["nodes"]] == [
        "trigger",
        "step1",
        "step2:if",
        "step2",
    ]
    assert definition["nodes"][0]["config"]["userInputs"] == {"properties": {}, "required": []}
    assert definition["nodes"][2]["config"]["outlets"][0]["expression"] == "true"
    # The condition's fallback and the last step lead nowhere: the run ends there.
    assert [c["targetIdentifier"] for c in definition["connections"]] == [
        "step1",
        "step2:if",
        "step2",
    ]


def test_a_page_shown_on_some_answers_keeps_its_inputs_but_requires_none() -> None:
    mapped, problems = _map(
        _template(
            "conditional",
            [
                {
                    "title": "Provider",
                    "required": ["cloud"],
                    "properties": {"cloud": {"type": "string", "enum": ["AWS", "GCP"]}},
                },
                {
                    "title": "AWS",
                    "when": "${{ parameters.cloud === 'AWS' }}",
                    "required": ["region"],
                    "properties": {"region": {"type": "string"}},
                },
            ],
            LOG,
        )
    )
    inputs = mapped.definition["nodes"][0]["config"]["userInputs"]
    assert list(inputs["properties"]) == ["cloud", "region"]
    assert inputs["required"] == ["cloud"]
    (when,) = problems
    assert when.code == "not-kept"
    assert when.message.startswith("spec.parameters[1].when")
    assert "(region not required)" in when.message


async def test_a_step_the_runner_refuses_ends_the_run_failed_before_the_next(
    live_server: LiveServer,
    make_org: OrgFactory,
    client: httpx.AsyncClient,
    start_worker: Callable[..., Settings],
) -> None:
    org = await make_org()
    with WebhookReceiver(await signing_secret(client, org)) as runner:
        runner.respond(422, {"error": "the skeleton is missing"})
        await _import_with_runner(live_server, org, TEMPLATE, runner=runner.url)
        start_worker()
        r = await client.post(
            "/v1/workflows/create-service/runs",
            json={
                "inputs": {"name": "x1", "owner": "ops", "repoUrl": "github.com?owner=a&repo=x1"}
            },
            headers=org.headers,
        )
        assert r.status_code == 202, r.text
        run = await wait_done(client, org, r.json()["workflowRun"]["identifier"])
    assert run["result"] == "FAILED"
    assert [(n["node"]["identifier"], n["result"]) for n in run["nodeRuns"]] == [
        ("trigger", "SUCCESS"),
        ("fetchBase", "FAILED"),
    ]
    assert [d.body["action"] for d in runner.deliveries] == ["fetch:template"]


async def test_a_workflow_the_import_did_not_make_is_left_alone(
    live_server: LiveServer, make_org: OrgFactory
) -> None:
    org = await make_org()
    mine = {
        "identifier": "create-service",
        "title": "Ours",
        "nodes": [{"identifier": "trigger", "config": {"type": "SELF_SERVE_TRIGGER"}}],
        "connections": [],
    }
    await _call(live_server, org, "POST", "/v1/workflows", mine)
    report = await _import_with_runner(live_server, org, TEMPLATE)
    (conflict,) = [p for p in report.problems if p.code == "conflict"]
    assert conflict.ref == "template:default/create-service"
    assert report.templates[0].status == "skipped"
    assert report.workflows.as_dict() == {"created": 0, "updated": 0, "unchanged": 0, "failed": 0}
    workflow = await _workflow(live_server, org, "create-service")
    assert (workflow["title"], workflow["version"]) == ("Ours", 1)
