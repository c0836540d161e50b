"""`portolan apply` and `portolan export` against a live server: plans, idempotency,
dependency order, prune, local validation, the org guard, tenancy."""

from __future__ import annotations

import asyncio
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from app.cli import cli
from app.remote import Client, Credentials
from tests.conftest import LiveServer, Org, OrgFactory

ROOT = Path(__file__).resolve().parent.parent
STARTER = [str(ROOT / name) for name in ("blueprints", "scorecards", "actions", "workflows")]


@dataclass
class Result:
    code: int
    output: str


def _portolan(server: LiveServer, org: Org, *args: str) -> Result:
    env = {
        "PORTOLAN_URL": server.url,
        "PORTOLAN_CLIENT_ID": org.client_id,
        "PORTOLAN_CLIENT_SECRET": org.client_secret,
    }
    result = CliRunner().invoke(cli, list(args), env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Result(result.exit_code, result.output)


async def portolan(server: LiveServer, org: Org, *args: str) -> Result:
    return await asyncio.to_thread(_portolan, server, org, *args)


def _read(server: LiveServer, org: Org, path: str) -> Any:
    creds = Credentials(url=server.url, client_id=org.client_id, client_secret=org.client_secret)
    with Client(creds) as client:
        return client.get(path)


async def read(server: LiveServer, org: Org, path: str) -> Any:
    return await asyncio.to_thread(_read, server, org, path)


async def catalog(server: LiveServer, org: Org) -> dict[str, Any]:
    """Every definition the org has, server fields included (to see that nothing moved);
    a scorecard's `state` is left out (it follows evaluation, not definitions)."""
    scorecards = (await read(server, org, "/v1/scorecards"))["scorecards"]
    return {
        "blueprints": (await read(server, org, "/v1/blueprints"))["blueprints"],
        "scorecards": [{k: v for k, v in sc.items() if k != "state"} for sc in scorecards],
        "actions": (await read(server, org, "/v1/actions"))["actions"],
        "workflows": (await read(server, org, "/v1/workflows"))["workflows"],
    }


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return root


def plan_lines(output: str) -> list[str]:
    """`op label` for each line of the printed plan."""
    out = []
    for line in output.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] in "+~-=" and len(parts[0]) == 1:
            out.append(f"{parts[1]} {parts[2]} {parts[3]}")
    return out


SERVICE = """
    identifier: svc
    title: Service
    schema:
      properties:
        language:
          type: string
          title: Language
          enum: [Python, Go]
"""


FLOW = """
    identifier: flow
    title: Flow
    nodes:
      - identifier: trigger
        config:
          type: SELF_SERVE_TRIGGER
          userInputs: {properties: {name: {type: string}}, required: [name]}
      - identifier: register
        config:
          type: UPSERT_ENTITY
          blueprintIdentifier: svc
          mapping: {identifier: "{{ .outputs.trigger.name }}", properties: {language: Go}}
    connections:
      - {sourceIdentifier: trigger, targetIdentifier: register}
"""


async def test_a_workflow_is_applied_updated_and_its_blueprints_checked(
    live_server: LiveServer, make_org: OrgFactory, tmp_path: Path
) -> None:
    org = await make_org()
    write(tmp_path, {"blueprints/svc.yaml": SERVICE, "workflows/flow.yaml": FLOW})
    first = await portolan(live_server, org, "apply", str(tmp_path))
    assert first.code == 0, first.output
    assert plan_lines(first.output) == ["create blueprint svc", "create workflow flow"]
    again = await portolan(live_server, org, "apply", str(tmp_path))
    assert "Nothing to do: 2 unchanged." in again.output, again.output
    write(tmp_path, {"workflows/flow.yaml": FLOW.replace("language: Go", "language: Python")})
    changed = await portolan(live_server, org, "apply", str(tmp_path))
    assert changed.code == 0, changed.output
    assert "~ update    workflow flow  (nodes)" in changed.output, changed.output
    flow = (await read(live_server, org, "/v1/workflows/flow"))["workflow"]
    assert flow["nodes"][1]["config"]["mapping"]["properties"] == {"language": "Python"}
    assert flow["version"] == 2
    # A workflow naming a blueprint that exists nowhere stops the apply before any write.
    write(
        tmp_path,
        {
            "workflows/flow.yaml": FLOW.replace(
                "blueprintIdentifier: svc", "blueprintIdentifier: nope"
            )
        },
    )
    refused = await portolan(live_server, org, "apply", str(tmp_path))
    assert refused.code != 0
    assert "workflow flow: /nodes/1/config/blueprintIdentifier: blueprint 'nope'" in refused.output
    assert (await read(live_server, org, "/v1/workflows/flow"))["workflow"]["version"] == 2


async def test_the_starter_set_is_accepted_and_a_second_apply_changes_nothing(
    live_server: LiveServer, make_org: OrgFactory
) -> None:
    org = await make_org()
    first = await portolan(live_server, org, "apply", *STARTER)
    assert first.code == 0, first.output
    assert plan_lines(first.output) == [
        "create blueprint deployment",
        "create blueprint environment",
        "create blueprint incident",
        "create blueprint service",
        "create blueprint team",
        "create scorecard service/production-readiness",
        "create action create-service",
        "create action deploy",
        "create workflow register-service",
    ]
    assert "Applied: 9 created, 0 updated, 0 deleted, 0 unchanged." in first.output
    service = (await read(live_server, org, "/v1/blueprints/service"))["blueprint"]
    assert service["relations"]["team"]["target"] == "team"
    assert "deploymentCount" in service["aggregationProperties"]
    before = await catalog(live_server, org)

    second = await portolan(live_server, org, "apply", *STARTER)
    assert second.code == 0, second.output
    assert all(line.startswith("unchanged ") for line in plan_lines(second.output))
    assert len(plan_lines(second.output)) == 9
    assert "Nothing to do: 9 unchanged." in second.output
    assert await catalog(live_server, org) == before


async def test_a_changed_property_is_planned_as_an_update_and_applied(
    live_server: LiveServer, make_org: OrgFactory, tmp_path: Path
) -> None:
    org = await make_org()
    write(tmp_path, {"blueprints/svc.yaml": SERVICE})
    assert (await portolan(live_server, org, "apply", str(tmp_path))).code == 0
    write(tmp_path, {"blueprints/svc.yaml": SERVICE.replace("[Python, Go]", "[Python, Go, Rust]")})

    result = await portolan(live_server, org, "apply", str(tmp_path))

    assert result.code == 0, result.output
    assert "~ update    blueprint svc  (schema)" in result.output
    assert "Applied: 0 created, 1 updated, 0 deleted, 0 unchanged." in result.output
    svc = (await read(live_server, org, "/v1/blueprints/svc"))["blueprint"]
    assert svc["schema"]["properties"]["language"]["enum"] == ["Python", "Go", "Rust"]


async def test_dry_run_prints_the_plan_and_writes_nothing(
    live_server: LiveServer, make_org: OrgFactory, tmp_path: Path
) -> None:
    org = await make_org()
    write(tmp_path, {"blueprints/svc.yaml": SERVICE})

    result = await portolan(live_server, org, "apply", "--dry-run", str(tmp_path))

    assert result.code == 0, result.output
    assert plan_lines(result.output) == ["create blueprint svc"]
    assert "Dry run: nothing was written." in result.output
    assert (await read(live_server, org, "/v1/blueprints"))["blueprints"] == []


async def test_prune_deletes_only_what_the_files_no_longer_define(
    live_server: LiveServer, make_org: OrgFactory, tmp_path: Path
) -> None:
    org = await make_org()
    files = {
        "blueprints/svc.yaml": SERVICE,
        "blueprints/old.yaml": "identifier: old\ntitle: Old\nschema: {properties: {}}\n",
        "actions/ping.yaml": """
            identifier: ping
            title: Ping
            trigger: {type: self-service, operation: CREATE, userInputs: {properties: {}}}
            invocationMethod: {type: WEBHOOK, url: "https://example.com/hook"}
        """,
        "workflows/flow.yaml": FLOW,
    }
    write(tmp_path, files)
    assert (await portolan(live_server, org, "apply", str(tmp_path))).code == 0
    (tmp_path / "blueprints/old.yaml").unlink()
    (tmp_path / "actions/ping.yaml").unlink()
    (tmp_path / "workflows/flow.yaml").unlink()

    kept = await portolan(live_server, org, "apply", str(tmp_path))
    assert kept.code == 0, kept.output
    assert plan_lines(kept.output) == ["unchanged blueprint svc"]
    assert len((await read(live_server, org, "/v1/blueprints"))["blueprints"]) == 2

    pruned = await portolan(live_server, org, "apply", "--prune", str(tmp_path))
    assert pruned.code == 0, pruned.output
    assert plan_lines(pruned.output) == [
        "unchanged blueprint svc",
        "delete workflow flow",
        "delete action ping",
        "delete blueprint old",
    ]
    left = await catalog(live_server, org)
    assert [b["identifier"] for b in left["blueprints"]] == ["svc"]
    assert left["actions"] == [] and left["workflows"] == []


async def test_prune_refuses_to_delete_a_blueprint_that_has_entities(
    live_server: LiveServer, make_org: OrgFactory, tmp_path: Path
) -> None:
    org = await make_org()
    write(
        tmp_path,
        {"blueprints/svc.yaml": SERVICE, "blueprints/old.yaml": SERVICE.replace("svc", "old")},
    )
    assert (await portolan(live_server, org, "apply", str(tmp_path))).code == 0

    def add_entity() -> None:
        creds = Credentials(live_server.url, org.client_id, org.client_secret)
        with Client(creds) as client:
            client.post("/v1/blueprints/old/entities", {"identifier": "e1"})

    await asyncio.to_thread(add_entity)
    (tmp_path / "blueprints/old.yaml").unlink()

    result = await portolan(live_server, org, "apply", "--prune", str(tmp_path))

    assert result.code == 2, result.output
    assert "blueprint old: has 1 entities" in result.output
    names = [
        b["identifier"] for b in (await read(live_server, org, "/v1/blueprints"))["blueprints"]
    ]
    assert names == ["old", "svc"]


async def test_blueprints_that_relate_to_each_other_in_a_cycle_are_applied_in_order(
    live_server: LiveServer, make_org: OrgFactory, tmp_path: Path
) -> None:
    org = await make_org()
    write(
        tmp_path,
        {
            # alpha sorts first, and names beta's relation in a mirror property.
            "blueprints/alpha.yaml": """
                identifier: alpha
                title: Alpha
                schema: {properties: {name: {type: string}}}
                relations: {beta: {target: beta}}
                mirrorProperties: {betaOfAlpha: {path: beta.alpha.name}}
            """,
            "blueprints/beta.yaml": """
                identifier: beta
                title: Beta
                schema: {properties: {size: {type: number}}}
                relations: {alpha: {target: alpha, many: true}}
                mirrorProperties: {alphaName: {path: alpha.name}}
            """,
        },
    )

    result = await portolan(live_server, org, "apply", str(tmp_path))

    assert result.code == 0, result.output
    alpha = (await read(live_server, org, "/v1/blueprints/alpha"))["blueprint"]
    beta = (await read(live_server, org, "/v1/blueprints/beta"))["blueprint"]
    assert alpha["relations"]["beta"]["target"] == "beta"
    assert alpha["mirrorProperties"]["betaOfAlpha"]["path"] == "beta.alpha.name"
    assert beta["relations"]["alpha"] == {"target": "alpha", "required": False, "many": True}
    again = await portolan(live_server, org, "apply", str(tmp_path))
    assert "Nothing to do: 2 unchanged." in again.output, again.output


async def test_files_that_do_not_validate_stop_the_apply_before_any_write(
    live_server: LiveServer, make_org: OrgFactory, tmp_path: Path
) -> None:
    org = await make_org()
    cases = {
        "bad-yaml": ({"blueprints/bad.yaml": "identifier: bad\ntitle: [unclosed\n"}, "bad.yaml:"),
        "unknown-kind": (
            {"misc/thing.yaml": "kind: widget\nidentifier: w\n"},
            "unknown kind 'widget'",
        ),
        "no-kind": ({"misc/thing.yaml": "identifier: w\n"}, "cannot tell what this is"),
        "missing-blueprint": (
            {"scorecards/nowhere/sc.yaml": "identifier: sc\ntitle: S\nrules: []\n"},
            "blueprint 'nowhere' exists neither in the files nor on the server",
        ),
        "missing-target": (
            {
                "blueprints/rel.yaml": """
                    identifier: rel
                    title: Rel
                    schema: {properties: {}}
                    relations: {ghost: {target: ghost}}
                """
            },
            "rel.yaml:4: blueprint rel: /relations/ghost/target: blueprint 'ghost'",
        ),
        "bad-property": (
            {
                "blueprints/t.yaml": "identifier: t\ntitle: T\nschema:\n  properties:\n    p: {type: nope}\n"
            },
            "t.yaml:5: blueprint t: /schema/properties/p",
        ),
        "duplicate": (
            {"blueprints/a.yaml": SERVICE, "blueprints/b.yaml": SERVICE},
            "blueprint svc is defined twice",
        ),
    }
    for name, (files, message) in cases.items():
        root = write(
            tmp_path / name, {"blueprints/fine.yaml": SERVICE.replace("svc", "fine"), **files}
        )
        result = await portolan(live_server, org, "apply", str(root))
        assert result.code == 2, (name, result.output)
        assert message in result.output, (name, result.output)
        assert "nothing was written" in result.output
    assert (await read(live_server, org, "/v1/blueprints"))["blueprints"] == []


async def test_apply_refuses_credentials_of_another_org_than_the_one_named(
    live_server: LiveServer, make_org: OrgFactory, tmp_path: Path
) -> None:
    org = await make_org()
    write(tmp_path, {"blueprints/svc.yaml": SERVICE})

    wrong = await portolan(live_server, org, "apply", "--org", "production", str(tmp_path))

    assert wrong.code == 3, wrong.output
    assert f"belong to organization {org.name!r}" in wrong.output
    assert (await read(live_server, org, "/v1/blueprints"))["blueprints"] == []
    by_name = await portolan(
        live_server, org, "apply", "--org", org.name, "--dry-run", str(tmp_path)
    )
    by_id = await portolan(live_server, org, "apply", "--org", str(org.org_id), str(tmp_path))
    assert (by_name.code, by_id.code) == (0, 0), by_name.output + by_id.output


async def test_applying_an_export_changes_nothing(
    live_server: LiveServer, make_org: OrgFactory, tmp_path: Path
) -> None:
    org = await make_org()
    assert (await portolan(live_server, org, "apply", *STARTER)).code == 0
    before = await catalog(live_server, org)

    for fmt in ("yaml", "json"):
        out = tmp_path / fmt
        exported = await portolan(live_server, org, "export", str(out), "--format", fmt)
        assert exported.code == 0, exported.output
        assert (out / "scorecards" / "service" / f"production-readiness.{fmt}").is_file()
        result = await portolan(live_server, org, "apply", "--prune", str(out))
        assert result.code == 0, result.output
        assert "Nothing to do: 9 unchanged." in result.output, result.output

    assert await catalog(live_server, org) == before
    service = (tmp_path / "yaml" / "blueprints" / "service.yaml").read_text()
    assert "createdAt" not in service and "updatedBy" not in service
    again = tmp_path / "again"
    assert (await portolan(live_server, org, "export", str(again))).code == 0
    for path in (tmp_path / "yaml").rglob("*.yaml"):
        assert (again / path.relative_to(tmp_path / "yaml")).read_text() == path.read_text()


async def test_export_removes_stale_catalog_files_and_keeps_others(
    live_server: LiveServer, make_org: OrgFactory, tmp_path: Path
) -> None:
    org = await make_org()
    write(tmp_path, {"blueprints/svc.yaml": SERVICE})
    assert (await portolan(live_server, org, "apply", str(tmp_path))).code == 0
    write(tmp_path, {"blueprints/gone.yaml": "identifier: gone\n", "blueprints/README.md": "hi"})

    result = await portolan(live_server, org, "export", str(tmp_path))

    assert result.code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "blueprints").iterdir()) == ["README.md", "svc.yaml"]


async def test_applying_with_one_orgs_credentials_never_touches_another_org(
    live_server: LiveServer, make_org: OrgFactory, tmp_path: Path
) -> None:
    org_a, org_b = await make_org(), await make_org()
    write(
        tmp_path / "a",
        {
            "blueprints/svc.yaml": SERVICE,
            "blueprints/only-a.yaml": SERVICE.replace("svc", "only-a"),
        },
    )
    assert (await portolan(live_server, org_a, "apply", str(tmp_path / "a"))).code == 0
    a_before = await catalog(live_server, org_a)
    changed = SERVICE.replace("[Python, Go]", "[Java]")
    write(tmp_path / "b", {"blueprints/svc.yaml": changed})

    result = await portolan(live_server, org_b, "apply", "--prune", str(tmp_path / "b"))

    assert result.code == 0, result.output
    assert plan_lines(result.output) == ["create blueprint svc"]
    assert await catalog(live_server, org_a) == a_before
    b = await catalog(live_server, org_b)
    assert [bp["identifier"] for bp in b["blueprints"]] == ["svc"]
    assert b["blueprints"][0]["schema"]["properties"]["language"]["enum"] == ["Java"]


async def test_a_write_the_server_refuses_names_the_object_and_exits_non_zero(
    live_server: LiveServer, make_org: OrgFactory, tmp_path: Path
) -> None:
    org = await make_org()
    write(tmp_path, {"blueprints/svc.yaml": SERVICE})
    assert (await portolan(live_server, org, "apply", str(tmp_path))).code == 0
    write(
        tmp_path,
        {
            "blueprints/svc.yaml": SERVICE.replace("type: string", "type: number").replace(
                "enum: [Python, Go]", ""
            )
        },
    )

    result = await portolan(live_server, org, "apply", str(tmp_path))

    assert result.code == 1, result.output
    assert "error: update blueprint svc: the server answered 422" in result.output
    assert "/schema/properties/language/type" in result.output


def test_files_carry_json_and_multi_document_yaml(tmp_path: Path) -> None:
    from app.catalog_code.loader import load

    write(
        tmp_path,
        {
            "catalog.yaml": """
                kind: blueprint
                identifier: one
                title: One
                schema: {properties: {}}
                ---
                kind: scorecard
                blueprint: one
                identifier: sc
                title: SC
                rules: []
            """,
            "actions/a.json": json.dumps({"identifier": "a", "trigger": {}}),
        },
    )
    documents, problems = load([tmp_path])
    assert problems == []
    assert sorted(d.label for d in documents) == ["action a", "blueprint one", "scorecard one/sc"]
    scorecard = next(d for d in documents if d.kind == "scorecard")
    assert scorecard.where() == f"{tmp_path / 'catalog.yaml'}:6"
