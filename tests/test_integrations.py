"""Integrations (/v1/integration): Port's shapes as Ocean reads them, the resync-state
invariant its polling listener relies on, examples, logs and their ingest URL, the audit
log, and tenancy."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote_plus, urlsplit

import httpx
import pytest

from tests.conftest import Org, OrgFactory

CONFIG = {
    "createMissingRelatedEntities": True,
    "deleteDependentEntities": True,
    "resources": [
        {
            "kind": "person",
            "selector": {"query": "true"},
            "port": {"entity": {"mappings": {"identifier": ".id", "blueprint": '"person"'}}},
        }
    ],
}


async def _create(
    client: httpx.AsyncClient, org: Org, identifier: str = "ocean-1", **extra: Any
) -> dict[str, Any]:
    r = await client.post(
        "/v1/integration",
        headers=org.headers,
        json={
            "installationId": identifier,
            "installationAppType": "fake-integration",
            "version": "0.1.0",
            "changelogDestination": {},
            "config": CONFIG,
            **extra,
        },
    )
    assert r.status_code == 201, r.text
    return dict(r.json()["integration"])


def _ingest_path(integration: dict[str, Any]) -> str:
    return urlsplit(integration["logAttributes"]["ingestUrl"]).path


async def test_an_integration_has_ports_shape(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    created = await _create(client, org)
    assert created["identifier"] == created["installationId"] == "ocean-1"
    assert created["installationAppType"] == created["integrationType"] == "fake-integration"
    assert created["installationType"] == "OnPrem"
    assert created["config"] == CONFIG
    assert created["changelogDestination"] == {}
    assert set(created["resyncState"]) == {
        "status",
        "lastResyncStart",
        "lastResyncEnd",
        "nextResync",
        "intervalInMinuets",
        "updatedAt",
    }
    assert created["logAttributes"]["ingestUrl"].endswith(created["logAttributes"]["ingestId"])
    r = await client.get("/v1/integration", headers=org.headers)
    assert [i["identifier"] for i in r.json()["integrations"]] == ["ocean-1"]


async def test_a_missing_integration_is_a_json_404(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    r = await client.get("/v1/integration/nope", headers=org.headers)
    assert r.status_code == 404
    assert r.json()["error"] == "not_found"


async def test_creating_an_integration_twice_conflicts(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _create(client, org)
    r = await client.post(
        "/v1/integration", headers=org.headers, json={"installationId": "ocean-1"}
    )
    assert r.status_code == 409


async def test_a_resync_report_sets_updated_at_to_its_own_time(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _create(client, org)
    r = await client.patch(
        "/v1/integration/ocean-1/resync-state",
        headers=org.headers,
        json={
            "status": "running",
            "lastResyncStart": "2026-11-24T10:00:00+00:00",
            "lastResyncEnd": None,
            "nextResync": None,
            "intervalInMinuets": None,
        },
    )
    assert r.status_code == 200, r.text
    reported = r.json()["integration"]
    assert reported["updatedAt"] == reported["resyncState"]["updatedAt"]
    r = await client.patch(
        "/v1/integration/ocean-1/resync-state",
        headers=org.headers,
        json={"status": "completed", "lastResyncEnd": "2026-11-24T10:01:00+00:00"},
    )
    done = r.json()["integration"]
    assert done["resyncState"]["status"] == "completed"
    assert done["resyncState"]["lastResyncStart"] == "2026-11-24T10:00:00Z"  # kept
    fetched = (await client.get("/v1/integration/ocean-1", headers=org.headers)).json()
    assert fetched["integration"]["updatedAt"] == done["resyncState"]["updatedAt"]


async def test_an_empty_patch_moves_updated_at(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _create(client, org)
    r = await client.patch("/v1/integration/ocean-1/resync-state", headers=org.headers, json={})
    reported = r.json()["integration"]["updatedAt"]
    r = await client.patch("/v1/integration/ocean-1", headers=org.headers, json={})
    assert r.status_code == 200
    assert r.json()["integration"]["updatedAt"] != reported
    assert r.json()["integration"]["config"] == CONFIG


async def test_a_new_mapping_is_stored_and_moves_updated_at(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    created = await _create(client, org)
    mapping = {**CONFIG, "resources": []}
    r = await client.patch(
        "/v1/integration/ocean-1/config", headers=org.headers, json={"config": mapping}
    )
    assert r.status_code == 200, r.text
    assert r.json()["integration"]["config"] == mapping
    assert r.json()["integration"]["updatedAt"] != created["updatedAt"]


async def test_a_malformed_mapping_is_refused_with_pointers(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _create(client, org)
    r = await client.patch(
        "/v1/integration/ocean-1",
        headers=org.headers,
        json={"config": {"resources": [{"selector": {}}]}},
    )
    assert r.status_code == 422
    assert r.json()["details"] == [
        {"pointer": "/config/resources/0/kind", "message": "must be a non-empty string"}
    ]


async def test_only_the_latest_five_examples_of_a_kind_are_kept(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _create(client, org)
    kind = "team members/all"  # as Ocean sends it: quote_plus-ed
    path = f"/v1/integration/ocean-1/kinds/{quote_plus(kind)}/examples"
    r = await client.post(
        path, headers=org.headers, json={"examples": [{"n": i} for i in range(3)]}
    )
    assert r.status_code == 200, r.text
    await client.post(
        path, headers=org.headers, json={"examples": [{"n": 10}, {"n": 11}, {"n": 12}]}
    )
    r = await client.get(path, headers=org.headers)
    assert r.json()["examples"] == [{"n": 10}, {"n": 11}, {"n": 12}, {"n": 0}, {"n": 1}]
    other = await client.get("/v1/integration/ocean-1/kinds/team/examples", headers=org.headers)
    assert other.json()["examples"] == []


async def test_logs_arrive_at_the_ingest_url_and_page_newest_first(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    integration = await _create(client, org)
    lines = [
        {
            "message": f"line {i}",
            "level": "ERROR" if i % 3 == 0 else "INFO",
            "timestamp": f"2026-11-24T10:00:{i:02d}.000000Z",
            "extra": {"i": i},
        }
        for i in range(10)
    ]
    r = await client.post(_ingest_path(integration), headers=org.headers, json={"logs": lines})
    assert r.status_code == 200, r.text
    assert r.json()["ingested"] == 10
    page = (
        await client.get("/v1/integration/ocean-1/logs", headers=org.headers, params={"limit": 4})
    ).json()["logs"]
    assert [line["message"] for line in page] == ["line 9", "line 8", "line 7", "line 6"]
    older = (
        await client.get(
            "/v1/integration/ocean-1/logs",
            headers=org.headers,
            params={"limit": 4, "timestamp": page[-1]["timestamp"], "log_id": page[-1]["id"]},
        )
    ).json()["logs"]
    assert [line["message"] for line in older] == ["line 5", "line 4", "line 3", "line 2"]
    errors = (
        await client.get(
            "/v1/integration/ocean-1/logs",
            headers=org.headers,
            params=[("level", "ERROR")],
        )
    ).json()["logs"]
    assert [line["message"] for line in errors] == ["line 9", "line 6", "line 3", "line 0"]
    assert errors[0]["extra"] == {"i": 9}


async def test_logs_of_one_resync_by_event_id(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    """`eventId` (Port's): the lines Ocean logged during a resync (`extra.event_id`) or
    the events it started (`extra.event_parent_id`); another org's same event id finds
    none of them."""
    org = await make_org()
    other = await make_org()
    integration = await _create(client, org)
    await _create(client, other)
    tags = [
        {"event_id": "resync-1"},
        {"event_id": "kind-1", "event_parent_id": "resync-1"},
        {"event_id": "resync-2"},
        {},
    ]
    lines = [
        {
            "message": f"line {i}",
            "level": "INFO",
            "timestamp": f"2026-11-24T10:00:{i:02d}.000000Z",
            "extra": {**tags[i % 4], "i": i},
        }
        for i in range(8)
    ]
    r = await client.post(_ingest_path(integration), headers=org.headers, json={"logs": lines})
    assert r.status_code == 200, r.text

    async def messages(who: Org, event: str) -> list[str]:
        r = await client.get(
            "/v1/integration/ocean-1/logs", headers=who.headers, params={"eventId": event}
        )
        assert r.status_code == 200, r.text
        return [line["message"] for line in r.json()["logs"]]

    assert await messages(org, "resync-1") == ["line 5", "line 4", "line 1", "line 0"]
    assert await messages(org, "resync-2") == ["line 6", "line 2"]
    assert await messages(org, "kind-1") == ["line 5", "line 1"]
    assert await messages(org, "nope") == []
    assert await messages(other, "resync-1") == []
    r = await client.get(
        "/v1/integration/ocean-1/logs", headers=org.headers, params={"eventId": "a\x00"}
    )
    assert r.status_code == 422 and r.json()["ok"] is False, r.text


async def test_the_ingest_url_needs_the_token_and_caps_lines(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    integration = await _create(client, org)
    path = _ingest_path(integration)
    r = await client.post(path, json={"logs": [{"message": "x"}]})
    assert r.status_code == 401
    r = await client.post(path, headers=org.headers, json={"logs": [{"message": "x"}] * 1001})
    assert r.status_code == 413
    wrong = path[:-4] + ("aaaa" if not path.endswith("aaaa") else "bbbb")
    r = await client.post(wrong, headers=org.headers, json={"logs": [{"message": "x"}]})
    assert r.status_code == 404


async def test_integrations_are_audited_but_resync_reports_are_not(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _create(client, org)
    await client.patch("/v1/integration/ocean-1/resync-state", headers=org.headers, json={})
    await client.patch("/v1/integration/ocean-1", headers=org.headers, json={"version": "0.2.0"})
    r = await client.get("/v1/audit-log", headers=org.headers, params={"resources": "integration"})
    assert r.status_code == 200, r.text
    entries = r.json()["audits"]
    assert [(e["action"], e["identifier"]) for e in entries] == [
        ("UPDATE", "ocean-1"),
        ("CREATE", "ocean-1"),
    ]


async def test_deleting_an_integration_keeps_its_entities_and_takes_its_logs(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    integration = await _create(client, org)
    await client.post(
        _ingest_path(integration), headers=org.headers, json={"logs": [{"message": "a"}]}
    )
    r = await client.delete("/v1/integrations/ocean-1", headers=org.headers)
    assert r.status_code == 200, r.text
    assert (await client.get("/v1/integration/ocean-1", headers=org.headers)).status_code == 404
    await _create(client, org)
    logs = await client.get("/v1/integration/ocean-1/logs", headers=org.headers)
    assert logs.json()["logs"] == []
    r = await client.delete("/v1/integration/ocean-1", headers=org.headers)
    assert r.status_code == 200
    r = await client.delete("/v1/integration/ocean-1", headers=org.headers)
    assert r.status_code == 404


async def test_another_org_sees_and_changes_nothing_of_an_integration(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    a, b = await make_org(), await make_org()
    integration = await _create(client, a)
    examples = "/v1/integration/ocean-1/kinds/person/examples"
    await client.post(examples, headers=a.headers, json={"examples": [{"secret": 1}]})
    await client.post(
        _ingest_path(integration), headers=a.headers, json={"logs": [{"message": "a"}]}
    )
    for method, path, body in (
        ("GET", "/v1/integration/ocean-1", None),
        ("PATCH", "/v1/integration/ocean-1", {"version": "9"}),
        ("PATCH", "/v1/integration/ocean-1/config", {"config": {}}),
        ("PATCH", "/v1/integration/ocean-1/resync-state", {"status": "failed"}),
        ("GET", examples, None),
        ("POST", examples, {"examples": [{"x": 1}]}),
        ("GET", "/v1/integration/ocean-1/logs", None),
        ("DELETE", "/v1/integration/ocean-1", None),
        ("DELETE", "/v1/integrations/ocean-1", None),
    ):
        r = await client.request(method, path, headers=b.headers, json=body)
        assert r.status_code == 404, (method, path, r.text)
    assert (await client.get("/v1/integration", headers=b.headers)).json()["integrations"] == []
    # A's ingest URL with B's token writes nothing anywhere.
    r = await client.post(
        _ingest_path(integration), headers=b.headers, json={"logs": [{"message": "b"}]}
    )
    assert r.status_code == 404
    ingest_id = integration["logAttributes"]["ingestId"]
    r = await client.get(
        f"/v1/integration/{ingest_id}", headers=b.headers, params={"byField": "logIngestId"}
    )
    assert r.status_code == 404
    # ...and B's own integration's ingest URL is B's: A's token cannot write there.
    theirs = await _create(client, b, "ocean-b")
    r = await client.post(
        _ingest_path(theirs), headers=a.headers, json={"logs": [{"message": "from a"}]}
    )
    assert r.status_code == 404
    assert (await client.get("/v1/integration/ocean-b/logs", headers=b.headers)).json()[
        "logs"
    ] == []
    mine = (await client.get("/v1/integration/ocean-1", headers=a.headers)).json()["integration"]
    assert mine["version"] == "0.1.0" and mine["config"] == CONFIG
    logs = (await client.get("/v1/integration/ocean-1/logs", headers=a.headers)).json()["logs"]
    assert [line["message"] for line in logs] == ["a"]
    kept = (await client.get(examples, headers=a.headers)).json()["examples"]
    assert kept == [{"secret": 1}]


async def test_an_integration_is_found_by_its_log_ingest_id(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    integration = await _create(client, org)
    r = await client.get(
        f"/v1/integration/{integration['logAttributes']['ingestId']}",
        headers=org.headers,
        params={"byField": "logIngestId"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["integration"]["identifier"] == "ocean-1"


# ------------------------------------------------------------------------------------------
# What Ocean 0.12.9 needs of the catalog, as it sends it

OCEAN_UA = "port-ocean/fake-integration/0.1.0/ocean-1/exporter"
PERSON = {
    "identifier": "person",
    "title": "Person",
    "schema": {"properties": {"age": {"type": "number"}}},
}


async def _ocean_upsert(
    client: httpx.AsyncClient, org: Org, entity: dict[str, Any]
) -> httpx.Response:
    return await client.post(
        "/v1/blueprints/person/entities",
        headers={**org.headers, "User-Agent": OCEAN_UA},
        params={
            "upsert": "true",
            "merge": "true",
            "create_missing_related_entities": "true",
            "validation_only": "false",
        },
        json=entity,
    )


async def test_oceans_nested_batch_search_finds_its_own_entities(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    assert (
        await client.post("/v1/blueprints", headers=org.headers, json=PERSON)
    ).status_code == 201
    for name in ("ann", "bob", "cid"):
        r = await _ocean_upsert(client, org, {"identifier": name, "blueprint": "person"})
        assert r.status_code in (200, 201), r.text
    r = await client.post(
        "/v1/blueprints/person/entities", headers=org.headers, json={"identifier": "dan"}
    )
    assert r.status_code == 201
    datasource = {
        "combinator": "and",
        "rules": [
            {
                "property": "$datasource",
                "operator": "contains",
                "value": "port-ocean/fake-integration/",
            },
            {"property": "$datasource", "operator": "contains", "value": "/ocean-1/exporter"},
        ],
    }
    batch = {
        "combinator": "and",
        "rules": [
            {
                "combinator": "or",
                "rules": [
                    {
                        "combinator": "and",
                        "rules": [
                            {"property": "$identifier", "operator": "=", "value": name},
                            {"property": "$blueprint", "operator": "=", "value": "person"},
                        ],
                    }
                    for name in ("ann", "cid", "dan")
                ],
            },
            datasource,
        ],
    }
    r = await client.post(
        "/v1/entities/search",
        headers={**org.headers, "User-Agent": OCEAN_UA},
        params=[
            ("exclude_calculated_properties", "true"),
            ("include", "blueprint"),
            ("include", "identifier"),
        ],
        json=batch,
    )
    assert r.status_code == 200, r.text
    found = r.json()["entities"]
    assert sorted(e["identifier"] for e in found) == ["ann", "cid"]
    assert all(set(e) == {"identifier", "blueprint"} for e in found)


async def test_an_ocean_write_keeps_only_declared_properties(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await client.post("/v1/blueprints", headers=org.headers, json=PERSON)
    r = await _ocean_upsert(
        client,
        org,
        {"identifier": "ann", "blueprint": "person", "properties": {"age": 3, "badge": "x"}},
    )
    assert r.status_code in (200, 201), r.text
    assert r.json()["entity"]["properties"] == {"age": 3}
    r = await client.post(
        "/v1/blueprints/person/entities",
        headers=org.headers,
        json={"identifier": "bob", "properties": {"badge": "x"}},
    )
    assert r.status_code == 422


async def test_deleting_a_missing_entity_is_a_json_404(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await client.post("/v1/blueprints", headers=org.headers, json=PERSON)
    r = await client.delete(
        f"/v1/blueprints/person/entities/{quote_plus('a/b c')}",
        headers={**org.headers, "User-Agent": OCEAN_UA},
        params={"delete_dependents": "true"},
    )
    assert r.status_code == 404
    assert r.json()["ok"] is False and r.json()["error"] == "not_found"


@pytest.mark.parametrize("moment", ["9999-12-31T23:59:59-10:00", "0001-01-01T00:00:00+10:00"])
async def test_a_log_time_out_of_postgresqls_range_is_a_422(
    client: httpx.AsyncClient, make_org: OrgFactory, moment: str
) -> None:
    org = await make_org()
    await _create(client, org)
    r = await client.get(
        "/v1/integration/ocean-1/logs", params={"timestamp": moment}, headers=org.headers
    )
    assert r.status_code == 422, r.text
    assert r.json()["ok"] is False and "out of the range" in r.json()["message"]
