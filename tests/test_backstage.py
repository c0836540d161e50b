"""`portolan import backstage`: a Backstage catalog imported into a live server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app.backstage.importer import Report, import_catalog
from app.backstage.mapping import parse_ref
from app.remote import Client, Credentials
from tests.conftest import LiveServer, Org, OrgFactory

DATA = Path(__file__).resolve().parent / "data" / "backstage"
CATALOG = DATA / "catalog-info.yaml"
REPO = Path(__file__).resolve().parent.parent


def _client(live_server: LiveServer, org: Org) -> Client:
    return Client(Credentials(live_server.url, org.client_id, org.client_secret))


async def _import(live_server: LiveServer, org: Org, *paths: Path, dry_run: bool = False) -> Report:
    def work() -> Report:
        with _client(live_server, org) as client:
            return import_catalog(client, list(paths) or [CATALOG], dry_run=dry_run)

    return await asyncio.to_thread(work)


async def _call(live_server: LiveServer, org: Org, method: str, path: str, body: Any = None) -> Any:
    def work() -> Any:
        with _client(live_server, org) as client:
            return client.request(method, path, json=body)

    return await asyncio.to_thread(work)


async def _entities(live_server: LiveServer, org: Org, bp: str) -> dict[str, dict[str, Any]]:
    body = await _call(live_server, org, "GET", f"/v1/blueprints/{bp}/entities")
    return {e["identifier"]: e for e in body["entities"]}


async def _org_with_payments_team(make_org: OrgFactory, live_server: LiveServer) -> Org:
    """The sample's payments API is owned by a group that only the server knows."""
    org = await make_org()
    await _call(live_server, org, "POST", "/v1/teams", {"name": "payments-team"})
    return org


def test_refs_take_the_defaults_of_their_field() -> None:
    assert str(parse_ref("web", default_kind="group", default_namespace="ops")) == "group:ops/web"
    ref = parse_ref("Component:default/Api", default_kind=None, default_namespace="x")
    assert (str(ref), ref.identifier) == ("component:default/Api", "Api")
    assert parse_ref(
        "resource:ops/db", default_kind=None, default_namespace="default"
    ).identifier == ("ops:db")
    with pytest.raises(ValueError, match="needs a kind"):
        parse_ref("db", default_kind=None, default_namespace="default")


async def test_import_creates_blueprints_with_their_relations(
    live_server: LiveServer, make_org: OrgFactory
) -> None:
    org = await _org_with_payments_team(make_org, live_server)
    report = await _import(live_server, org)
    assert report.exit_code == 0, report.render()
    assert report.blueprints == dict.fromkeys(
        ["group", "domain", "system", "api", "resource", "component"], "created"
    )
    blueprints = {
        b["identifier"]: b
        for b in (await _call(live_server, org, "GET", "/v1/blueprints"))["blueprints"]
    }
    component = blueprints["component"]
    assert {n: (r["target"], r["many"]) for n, r in component["relations"].items()} == {
        "system": ("system", False),
        "subcomponentOf": ("component", False),
        "providesApis": ("api", True),
        "consumesApis": ("api", True),
        "dependsOnComponents": ("component", True),
        "dependsOnResources": ("resource", True),
    }
    assert set(blueprints["resource"]["relations"]) == {
        "system",
        "dependsOnComponents",
        "dependsOnResources",
    }
    assert blueprints["api"]["schema"]["properties"]["definition"]["type"] == "string"
    assert blueprints["component"]["schema"]["properties"]["annotations"]["type"] == "object"


async def test_import_writes_entities_with_links_and_teams(
    live_server: LiveServer, make_org: OrgFactory
) -> None:
    org = await _org_with_payments_team(make_org, live_server)
    report = await _import(live_server, org)
    assert {bp: c.created for bp, c in report.entities.items()} == {
        "group": 2,
        "domain": 1,
        "system": 1,
        "api": 2,
        "resource": 3,
        "component": 3,
    }
    components = await _entities(live_server, org, "component")
    web = components["checkout-web"]
    assert web["title"] == "Checkout (web)"
    assert web["team"] == ["web-team"]
    assert web["relations"] == {
        "system": "checkout",
        "subcomponentOf": None,
        "providesApis": [],
        "consumesApis": ["payments-api"],
        "dependsOnComponents": ["checkout-api"],  # ghost-service is reported, not linked
        "dependsOnResources": ["checkout-db"],
    }
    assert web["properties"]["tags"] == ["web", "typescript"]
    assert web["properties"]["annotations"]["github.com/project-slug"] == "acme/checkout-web"
    assert web["properties"]["links"] == [
        {"url": "https://checkout.example.com", "title": "Production"}
    ]
    assert web["properties"]["owner"] == "group:default/web-team"
    assert (web["properties"]["type"], web["properties"]["lifecycle"]) == ("website", "production")
    worker = components["checkout-worker"]
    assert worker["relations"]["subcomponentOf"] == "checkout-api"
    assert worker["team"] == []  # owned by a user: kept as the owner ref only
    assert worker["properties"]["owner"] == "user:default/ada"
    assert worker["properties"]["backstage"] == {"spec": {"costCenter": "42"}}
    assert components["checkout-api"]["relations"]["providesApis"] == ["checkout-api-v1"]

    resources = await _entities(live_server, org, "resource")
    assert resources["checkout-db"]["relations"]["dependsOnResources"] == ["ops:shared-postgres"]
    assert resources["checkout-cache"]["relations"]["dependsOnComponents"] == ["checkout-api"]
    assert resources["ops:shared-postgres"]["team"] == ["platform"]

    apis = await _entities(live_server, org, "api")
    assert apis["payments-api"]["team"] == ["payments-team"]
    assert (
        json.loads(apis["payments-api"]["properties"]["definition"])["info"]["version"] == "2.1.0"
    )
    assert apis["checkout-api-v1"]["properties"]["definition"].startswith("openapi: 3.0.0")
    assert (await _entities(live_server, org, "system"))["checkout"]["relations"] == {
        "domain": "commerce"
    }
    assert (await _entities(live_server, org, "domain"))["commerce"]["title"] == "Commerce"


async def test_groups_become_teams_and_users_are_invited_into_them(
    live_server: LiveServer, make_org: OrgFactory
) -> None:
    org = await _org_with_payments_team(make_org, live_server)
    report = await _import(live_server, org)
    assert (report.teams.created, report.users.created) == (2, 2)
    teams = {t["name"]: t for t in (await _call(live_server, org, "GET", "/v1/teams"))["teams"]}
    assert teams["platform"]["description"] == "Platform Team"
    assert [u["email"] for u in teams["platform"]["users"]] == ["ada@example.com"]
    assert [u["email"] for u in teams["web-team"]["users"]] == ["grace@example.com"]
    grace = await _call(live_server, org, "GET", "/v1/users/grace@example.com")
    assert grace["user"]["status"] == "Invited"
    assert grace["user"]["teams"] == ["web-team"]


async def test_the_report_lists_exactly_what_could_not_be_imported(
    live_server: LiveServer, make_org: OrgFactory
) -> None:
    org = await _org_with_payments_team(make_org, live_server)
    report = await _import(live_server, org)
    found = {(p.code, Path(p.file).name, p.document, p.ref) for p in report.problems}
    assert found == {
        ("dangling-ref", "catalog-info.yaml", 3, "component:default/checkout-web"),
        ("unsupported-kind", "catalog-info.yaml", 14, "location:default/more-apis"),
        ("invalid-template", "catalog-info.yaml", 15, "template:default/new-service"),
    }
    dangling = next(p for p in report.problems if p.code == "dangling-ref")
    assert "component:default/ghost-service" in dangling.message
    template = next(p for p in report.problems if p.code == "invalid-template")
    assert "needs spec.steps" in template.message
    assert report.errors == []
    assert report.exit_code == 0


async def test_the_group_hierarchy_is_a_parent_relation_between_the_groups_entities(
    live_server: LiveServer, make_org: OrgFactory
) -> None:
    org = await _org_with_payments_team(make_org, live_server)
    await _import(live_server, org)
    bp = (await _call(live_server, org, "GET", "/v1/blueprints/group"))["blueprint"]
    assert {n: (r["target"], r["many"]) for n, r in bp["relations"].items()} == {
        "parent": ("group", False)
    }
    groups = await _entities(live_server, org, "group")
    assert set(groups) == {"platform", "web-team"}
    platform, web = groups["platform"], groups["web-team"]
    # web-team names its parent; platform names web-team among its children: one link.
    assert web["relations"] == {"parent": "platform"}
    assert platform["relations"] == {"parent": None}
    assert (platform["title"], platform["team"]) == ("Platform Team", ["platform"])
    assert platform["properties"]["email"] == "platform@example.com"
    assert platform["properties"]["type"] == "team"
    assert web["team"] == ["web-team"]


async def test_a_group_with_two_parents_keeps_the_first_and_reports_the_other(
    live_server: LiveServer, make_org: OrgFactory, tmp_path: Path
) -> None:
    org = await make_org()
    groups = tmp_path / "groups.yaml"
    groups.write_text(
        "\n---\n".join(
            "apiVersion: backstage.io/v1alpha1\nkind: Group\n" + body
            for body in (
                "metadata: {name: sre}\nspec: {type: team, parent: infra}",
                "metadata: {name: infra}\nspec: {type: department}",
                "metadata: {name: data}\nspec: {type: department, children: [sre]}",
                "metadata: {name: ml}\nspec: {type: team, parent: research}",
            )
        )
    )
    report = await _import(live_server, org, groups)
    found = sorted((p.code, p.ref) for p in report.problems)
    assert found == [
        ("dangling-ref", "group:default/ml"),  # research: neither in the input nor a team
        ("invalid-field", "group:default/sre"),
    ]
    two = next(p for p in report.problems if p.code == "invalid-field")
    assert "two parents, group:default/infra and group:default/data" in two.message
    entities = await _entities(live_server, org, "group")
    assert entities["sre"]["relations"] == {"parent": "infra"}
    assert entities["ml"]["relations"] == {"parent": None}
    assert entities["ml"]["properties"]["backstage"] == {
        "unresolvedRefs": {"parent": ["group:default/research"]}
    }


async def test_a_second_import_changes_nothing(
    live_server: LiveServer, make_org: OrgFactory
) -> None:
    org = await _org_with_payments_team(make_org, live_server)
    await _import(live_server, org)
    before = await _entities(live_server, org, "component")
    again = await _import(live_server, org)
    assert set(again.blueprints.values()) == {"unchanged"}
    assert all(c.created == c.updated == c.failed == 0 for c in again.entities.values())
    assert sum(c.unchanged for c in again.entities.values()) == 12
    assert (again.teams.unchanged, again.users.unchanged) == (2, 2)
    after = await _entities(live_server, org, "component")
    assert {k: v["updatedAt"] for k, v in after.items()} == {
        k: v["updatedAt"] for k, v in before.items()
    }


async def test_dry_run_reports_and_writes_nothing(
    live_server: LiveServer, make_org: OrgFactory
) -> None:
    org = await _org_with_payments_team(make_org, live_server)
    report = await _import(live_server, org, dry_run=True)
    assert report.exit_code == 0
    assert report.blueprints == dict.fromkeys(
        ["group", "domain", "system", "api", "resource", "component"], "created"
    )
    assert report.entities["component"].created == 3
    assert (report.teams.created, report.users.created) == (2, 2)
    assert (await _call(live_server, org, "GET", "/v1/blueprints"))["blueprints"] == []
    teams = (await _call(live_server, org, "GET", "/v1/teams"))["teams"]
    assert [t["name"] for t in teams] == ["payments-team"]
    assert (await _call(live_server, org, "GET", "/v1/users"))["users"] == []


async def test_an_existing_blueprint_is_extended_not_replaced(
    live_server: LiveServer, make_org: OrgFactory
) -> None:
    org = await _org_with_payments_team(make_org, live_server)
    await _call(
        live_server,
        org,
        "POST",
        "/v1/blueprints",
        {
            "identifier": "component",
            "title": "Service",
            "schema": {"properties": {"tier": {"type": "number"}}},
            "relations": {},
        },
    )
    await _call(
        live_server,
        org,
        "POST",
        "/v1/blueprints/component/entities",
        {"identifier": "checkout-api", "properties": {"tier": 1}},
    )
    report = await _import(live_server, org)
    assert report.blueprints["component"] == "extended"
    assert report.entities["component"].updated == 1
    bp = (await _call(live_server, org, "GET", "/v1/blueprints/component"))["blueprint"]
    assert bp["title"] == "Service"
    assert {"tier", "type", "lifecycle", "tags"} <= set(bp["schema"]["properties"])
    assert "dependsOnResources" in bp["relations"]
    api = (await _entities(live_server, org, "component"))["checkout-api"]
    assert api["properties"]["tier"] == 1
    assert api["properties"]["type"] == "service"


async def test_an_existing_user_keeps_their_other_teams(
    live_server: LiveServer, make_org: OrgFactory
) -> None:
    org = await _org_with_payments_team(make_org, live_server)
    await _call(
        live_server,
        org,
        "POST",
        "/v1/users/invite",
        {"invitee": {"email": "ada@example.com", "teams": ["payments-team"]}},
    )
    report = await _import(live_server, org)
    assert (report.users.created, report.users.updated) == (1, 1)
    ada = await _call(live_server, org, "GET", "/v1/users/ada@example.com")
    assert sorted(ada["user"]["teams"]) == ["payments-team", "platform"]


async def test_a_directory_is_read_recursively_once_per_file(
    live_server: LiveServer, make_org: OrgFactory
) -> None:
    org = await _org_with_payments_team(make_org, live_server)
    report = await _import(live_server, org, DATA, dry_run=True)
    assert (report.files, report.documents) == (2, 16)
    assert report.entities["api"].created == 2


async def test_importing_into_another_org_leaves_the_first_alone(
    live_server: LiveServer, make_org: OrgFactory
) -> None:
    first = await _org_with_payments_team(make_org, live_server)
    await _import(live_server, first)
    before = await _entities(live_server, first, "component")
    second = await _org_with_payments_team(make_org, live_server)
    report = await _import(live_server, second)
    assert set(report.blueprints.values()) == {"created"}
    assert report.entities["component"].created == 3
    assert (report.teams.created, report.users.created) == (2, 2)
    after = await _entities(live_server, first, "component")
    assert after == before


def _cli(live_server: LiveServer, org: Org, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTOLAN_")}
    env.update(
        PORTOLAN_URL=live_server.url,
        PORTOLAN_CLIENT_ID=org.client_id,
        PORTOLAN_CLIENT_SECRET=org.client_secret,
    )
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "import", "backstage", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_the_command_prints_a_summary_and_exits_zero(
    live_server: LiveServer, make_org: OrgFactory
) -> None:
    org = await _org_with_payments_team(make_org, live_server)
    done = await asyncio.to_thread(_cli, live_server, org, str(CATALOG))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "component    3 / 0 / 0 / 0" in done.stdout
    assert "[invalid-template] template:default/new-service" in done.stdout
    dry = await asyncio.to_thread(_cli, live_server, org, str(CATALOG), "--dry-run", "--json")
    assert dry.returncode == 0
    assert json.loads(dry.stdout)["entities"]["component"]["unchanged"] == 3


async def test_the_command_fails_when_nothing_is_importable(
    live_server: LiveServer, make_org: OrgFactory, tmp_path: Path
) -> None:
    org = await make_org()
    only = tmp_path / "catalog-info.yaml"
    only.write_text(
        "apiVersion: scaffolder.backstage.io/v1beta3\nkind: Template\nmetadata:\n  name: t\n"
    )
    done = await asyncio.to_thread(_cli, live_server, org, str(only))
    assert done.returncode == 1
    assert "Nothing to import." in done.stdout
    assert (await _call(live_server, org, "GET", "/v1/blueprints"))["blueprints"] == []


async def test_a_property_of_another_type_is_reported_and_left_alone(
    live_server: LiveServer, make_org: OrgFactory
) -> None:
    org = await _org_with_payments_team(make_org, live_server)
    await _call(
        live_server,
        org,
        "POST",
        "/v1/blueprints",
        {
            "identifier": "domain",
            "title": "Domain",
            "schema": {"properties": {"tags": {"type": "string"}}},
        },
    )
    report = await _import(live_server, org)
    conflicts = [p for p in report.problems if p.code == "conflict"]
    assert [p.message.split(":")[0] for p in conflicts] == ["blueprint domain"]
    assert report.exit_code == 0
    bp = (await _call(live_server, org, "GET", "/v1/blueprints/domain"))["blueprint"]
    assert bp["schema"]["properties"]["tags"] == {"type": "string"}
    assert (await _entities(live_server, org, "domain"))["commerce"]["relations"] == {
        "subdomainOf": None
    }


async def test_entities_the_api_refuses_fail_the_import(
    live_server: LiveServer, make_org: OrgFactory
) -> None:
    org = await _org_with_payments_team(make_org, live_server)
    await _call(
        live_server,
        org,
        "POST",
        "/v1/blueprints",
        {
            "identifier": "domain",
            "title": "Domain",
            "schema": {"properties": {"budget": {"type": "number"}}, "required": ["budget"]},
        },
    )
    report = await _import(live_server, org)
    assert report.entities["domain"].failed == 1
    assert len(report.errors) == 1 and "domain:default/commerce" in report.errors[0]
    assert report.exit_code == 1
    assert report.entities["component"].created == 3  # the rest went in
    unlinked = [p for p in report.problems if p.code == "unlinked"]
    assert [p.ref for p in unlinked] == ["system:default/checkout"]
    assert (await _entities(live_server, org, "system"))["checkout"]["relations"] == {
        "domain": None
    }


def test_location_globs_are_followed_and_urls_reported(tmp_path: Path) -> None:
    from app.backstage.reader import read

    (tmp_path / "teams" / "web").mkdir(parents=True)
    (tmp_path / "teams" / "web" / "catalog-info.yaml").write_text(
        "apiVersion: backstage.io/v1alpha1\nkind: Group\nmetadata: {name: web}\nspec: {type: team}\n"
    )
    location = tmp_path / "all.yaml"
    location.write_text(
        "apiVersion: backstage.io/v1alpha1\nkind: Location\nmetadata: {name: all}\n"
        "spec:\n  targets: ['./teams/**/catalog-info.yaml', 'https://example.com/c.yaml']\n"
    )
    reading = read([location, tmp_path / "teams"])
    assert [d.kind for d in reading.documents] == ["Location", "Group"]
    assert [(p.code, p.document) for p in reading.problems] == [("location-not-followed", 1)]
