"""Integrations as current Ocean (0.56) uses them: provision-enabled types, resync requests
and the comparison its polling listener makes, the `aborted` resync state, the fields it
keeps on an integration, its sync metrics and their ingest URL; tenancy and roles."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote_plus, urlsplit

import httpx
from fastapi import FastAPI

from app.auth.service import create_credential
from app.db.database import Database
from app.integrations import service
from tests.conftest import Org, OrgFactory

CONFIG = {
    "createMissingRelatedEntities": True,
    "deleteDependentEntities": True,
    "enableMergeEntity": True,
    "entityDeletionThreshold": 0.5,
    "resources": [
        {
            "kind": "person",
            "selector": {"query": "true"},
            "port": {"entity": {"mappings": {"identifier": ".id", "blueprint": '"person"'}}},
        }
    ],
}
BASE = "/v1/integration/ocean-1"


async def _create(client: httpx.AsyncClient, org: Org, identifier: str = "ocean-1") -> Any:
    """The integration as Ocean 0.56 creates it."""
    r = await client.post(
        "/v1/integration",
        headers=org.headers,
        json={
            "installationId": identifier,
            "installationAppType": "fake-integration",
            "version": "0.1.0",
            "changelogDestination": {},
            "config": CONFIG,
            "actionsProcessingEnabled": False,
            "incrementalSyncEnabled": False,
            "createPortResourcesOrigin": "Default",
        },
    )
    assert r.status_code == 201, r.text
    return r.json()["integration"]


async def _request(client: httpx.AsyncClient, org: Org, path: str = BASE) -> Any:
    r = await client.get(f"{path}/resync-request", headers=org.headers)
    assert r.status_code == 200, r.text
    return r.json()["request"]


async def _report(client: httpx.AsyncClient, org: Org, status: str) -> Any:
    r = await client.patch(f"{BASE}/resync-state", headers=org.headers, json={"status": status})
    assert r.status_code == 200, r.text
    return r.json()["integration"]


async def _member_headers(client: httpx.AsyncClient, db: Database, org: Org) -> dict[str, str]:
    async with db.tenant(org.org_id) as tx:
        cred = await create_credential(tx, org_id=org.org_id, name="member", roles=["Member"])
    r = await client.post(
        "/v1/auth/access_token",
        json={"clientId": cred.client_id, "clientSecret": cred.client_secret},
    )
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['accessToken']}"}


def _metrics_path(integration: dict[str, Any]) -> str:
    return urlsplit(integration["metricAttributes"]["ingestUrl"]).path


# ------------------------------------------------------------------------------------------
# provision-enabled, the integration's own fields


async def test_provision_enabled_answers_no_types_and_is_no_integration(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    r = await client.get("/v1/integration/provision-enabled", headers=org.headers)
    assert r.status_code == 200, r.text
    assert r.json() == {"ok": True, "integrations": []}
    r = await client.post(
        "/v1/integration", headers=org.headers, json={"installationId": "provision-enabled"}
    )
    assert r.status_code == 422
    assert r.json()["ok"] is False and "route" in r.json()["message"]


async def test_the_fields_ocean_patches_are_kept_and_read_back(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    created = await _create(client, org)
    assert created["createPortResourcesOrigin"] == "Default"
    assert created["arePortResourcesInitialized"] is False
    assert created["config"]["entityDeletionThreshold"] == 0.5
    r = await client.patch(
        BASE,
        headers=org.headers,
        json={
            "installationAppType": "github",
            "arePortResourcesInitialized": True,
            "processingMode": "ocean-core",
            "incrementalSyncEnabled": True,
            "spec": {"features": [{"type": "exporter"}]},
            "version": "0.2.0",
        },
    )
    assert r.status_code == 200, r.text
    got = (await client.get(BASE, headers=org.headers)).json()["integration"]
    assert {
        key: got[key]
        for key in (
            "installationAppType",
            "arePortResourcesInitialized",
            "processingMode",
            "incrementalSyncEnabled",
            "spec",
            "createPortResourcesOrigin",
            "version",
        )
    } == {
        "installationAppType": "github",
        "arePortResourcesInitialized": True,
        "processingMode": "ocean-core",
        "incrementalSyncEnabled": True,
        "spec": {"features": [{"type": "exporter"}]},
        "createPortResourcesOrigin": "Default",
        "version": "0.2.0",
    }


async def test_fields_portolan_cannot_honour_are_refused(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _create(client, org)
    for body, pointer in (
        ({"createPortResourcesOrigin": "Port"}, "/createPortResourcesOrigin"),
        ({"config": {**CONFIG, "entityDeletionThreshold": 1.5}}, "/config/entityDeletionThreshold"),
        (
            {"config": {**CONFIG, "entityDeletionThreshold": True}},
            "/config/entityDeletionThreshold",
        ),
    ):
        r = await client.patch(BASE, headers=org.headers, json=body)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["details"][0]["pointer"] == pointer
    r = await client.patch(BASE, headers=org.headers, json={"processingMode": "lake"})
    assert r.status_code == 422 and r.json()["ok"] is False


async def test_a_read_records_the_ocean_version_without_an_audit_entry(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _create(client, org)
    for _ in range(2):
        r = await client.get(
            BASE,
            headers=org.headers,
            params={"oceanCoreVersion": "0.56.2", "isPolling": "false"},
        )
        assert r.status_code == 200, r.text
    assert r.json()["integration"]["oceanCoreVersion"] == "0.56.2"
    plain = (await client.get(BASE, headers=org.headers)).json()["integration"]
    assert plain["oceanCoreVersion"] == "0.56.2"
    r = await client.get(BASE, headers=org.headers, params={"oceanCoreVersion": "0.56 2"})
    assert r.status_code == 422 and r.json()["ok"] is False
    audit = await client.get(
        "/v1/audit-log", headers=org.headers, params={"resources": "integration"}
    )
    assert [e["action"] for e in audit.json()["audits"]] == ["CREATE"]


async def test_aborted_is_a_resync_state(client: httpx.AsyncClient, make_org: OrgFactory) -> None:
    org = await make_org()
    await _create(client, org)
    await _report(client, org, "running")
    r = await client.patch(
        f"{BASE}/resync-state",
        headers=org.headers,
        json={"status": "aborted", "lastResyncEnd": "2026-12-07T10:00:00+00:00"},
    )
    assert r.status_code == 200, r.text
    state = r.json()["integration"]["resyncState"]
    assert state["status"] == "aborted"
    assert state["updatedAt"] == r.json()["integration"]["updatedAt"]
    r = await client.patch(f"{BASE}/resync-state", headers=org.headers, json={"status": "gone"})
    assert r.status_code == 422


# ------------------------------------------------------------------------------------------
# Resync requests


async def test_no_resync_request_is_pending_at_first(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _create(client, org)
    r = await client.get(f"{BASE}/resync-request", headers=org.headers)
    assert r.json() == {"ok": True, "request": None}
    r = await client.get("/v1/integration/nope/resync-request", headers=org.headers)
    assert r.status_code == 404


async def test_a_request_is_pending_until_the_integration_starts_a_resync(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _create(client, org)
    r = await client.post(f"{BASE}/resync-request", headers=org.headers)
    assert r.status_code == 202, r.text
    asked = r.json()["request"]
    assert (await _request(client, org))["updatedAt"] == asked["updatedAt"]
    await _report(client, org, "completed")  # a report of no new resync answers nothing
    assert (await _request(client, org))["updatedAt"] == asked["updatedAt"]
    await _report(client, org, "running")
    assert await _request(client, org) is None
    again = (await client.post(f"{BASE}/resync-request", headers=org.headers)).json()["request"]
    assert datetime.fromisoformat(again["updatedAt"]) > datetime.fromisoformat(asked["updatedAt"])


async def test_a_new_mapping_asks_for_a_resync_unless_told_not_to(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _create(client, org)
    assert await _request(client, org) is None
    r = await client.patch(f"{BASE}/config", headers=org.headers, json={"config": CONFIG})
    assert r.status_code == 200, r.text
    assert await _request(client, org) is not None
    await _report(client, org, "running")
    r = await client.patch(
        f"{BASE}/config",
        headers={**org.headers, "x-skip-resync": "true"},
        json={"config": CONFIG},
    )
    assert r.status_code == 200, r.text
    assert await _request(client, org) is None
    await client.patch(BASE, headers=org.headers, json={"version": "0.3.0"})
    assert await _request(client, org) is None
    await client.patch(BASE, headers=org.headers, json={"config": CONFIG})
    assert await _request(client, org) is not None


class PollingOcean:
    """The decision Ocean 0.56's polling listener makes each poll: resync on start, then
    whenever the resync request's `updatedAt` is later than the last one it acted on (the
    start's watermark first). A resync reports `running`, then `completed`."""

    def __init__(self, client: httpx.AsyncClient, org: Org) -> None:
        self.client, self.org = client, org
        self.started = False
        self.last_request: str | None = None
        self.resyncs = 0

    @staticmethod
    def _utc(value: str) -> datetime:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)

    async def resync(self) -> None:
        self.resyncs += 1
        await _report(self.client, self.org, "running")
        await _report(self.client, self.org, "completed")

    async def poll(self) -> None:
        if not self.started:
            self.started = True
            await self.resync()
            return
        request = await _request(self.client, self.org) or {}
        updated = request.get("updatedAt", "")
        if not updated:
            return
        if self.last_request is None or self._utc(self.last_request) < self._utc(updated):
            self.last_request = updated
            await self.resync()


async def test_a_polling_ocean_resyncs_once_per_request(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _create(client, org)
    # Ocean's first start writes its default mapping: the start's resync answers it.
    await client.patch(f"{BASE}/config", headers=org.headers, json={"config": CONFIG})
    ocean = PollingOcean(client, org)
    for _ in range(4):
        await ocean.poll()
    assert ocean.resyncs == 1
    await client.post(f"{BASE}/resync-request", headers=org.headers)
    for _ in range(3):
        await ocean.poll()
    assert ocean.resyncs == 2
    # A mapping changed while a resync runs brings one more.
    await _report(client, org, "running")
    await client.patch(f"{BASE}/config", headers=org.headers, json={"config": CONFIG})
    await _report(client, org, "completed")
    for _ in range(3):
        await ocean.poll()
    assert ocean.resyncs == 3
    # A restarted Ocean resyncs on start and replays nothing.
    restarted = PollingOcean(client, org)
    for _ in range(3):
        await restarted.poll()
    assert restarted.resyncs == 1


async def test_a_resync_request_is_in_the_audit_log(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    await _create(client, org)
    await client.post(f"{BASE}/resync-request", headers=org.headers)
    await _report(client, org, "running")
    r = await client.get("/v1/audit-log", headers=org.headers, params={"resources": "integration"})
    assert [e["action"] for e in r.json()["audits"]] == ["UPDATE", "CREATE"]


# ------------------------------------------------------------------------------------------
# Sync metrics


def _kind_metrics(
    event_id: str, kind_identifier: str, state: str, loaded: int = 0, failed: int = 0
) -> dict[str, Any]:
    """One kind's report, as Ocean's Metrics.generate_metrics builds it."""
    kind, _, index = kind_identifier.rpartition("-")
    return {
        "integrationType": "fake-integration",
        "installationType": "OnPrem",
        "executionMode": "Unknown",
        "integrationIdentifier": "ocean-1",
        "integrationVersion": "0.1.0",
        "oceanVersion": "0.56.2",
        "kindIdentifier": kind_identifier,
        "kind": kind or kind_identifier,
        "kindIndex": int(index) if index.isdigit() else 0,
        "eventId": event_id,
        "syncState": state,
        "blueprint": "person" if kind else "",
        "metrics": {
            "phase": {
                "resync": {"duration_seconds": 1.5, "success": 1.0 if state == "completed" else 0},
                "load": {
                    "object_count_type": {
                        "loaded": {"object_count": float(loaded)},
                        "failed": {"object_count": float(failed)},
                    }
                },
            }
        },
    }


async def test_oceans_metric_posts_are_kept_per_sync_and_kind(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    integration = await _create(client, org)
    ingest = _metrics_path(integration)
    assert integration["metricAttributes"]["ingestId"] == integration["logAttributes"]["ingestId"]
    event = "resync-1"
    kind = "team members/all-0"  # Ocean quote_pluses it into the path
    r = await client.post(
        f"{ingest}/syncMetrics",
        headers=org.headers,
        json={
            "syncKindsMetrics": [
                _kind_metrics(event, kind, "pending"),
                _kind_metrics(event, "__runtime__", "syncing"),
            ]
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["stored"] == 2
    r = await client.post(f"{ingest}/heartbeat", headers=org.headers, json={"eventId": event})
    assert r.status_code == 200, r.text
    r = await client.put(
        f"{ingest}/syncMetrics/resync/{quote_plus(event)}/kind/{quote_plus(kind)}",
        headers=org.headers,
        json={"syncKindMetrics": _kind_metrics(event, kind, "completed", loaded=7, failed=2)},
    )
    assert r.status_code == 200, r.text
    syncs = (await client.get(f"{BASE}/syncsMetadata", headers=org.headers)).json()
    assert syncs["count"] == 1
    assert syncs["data"][0]["eventId"] == event
    assert syncs["data"][0]["syncState"] == "syncing"  # the run goes on: __runtime__ says so
    assert syncs["data"][0]["lastHeartbeatAt"] is not None
    await client.post(
        f"{ingest}/syncMetrics",
        headers=org.headers,
        json={"syncKindsMetrics": [_kind_metrics(event, "__runtime__", "completed")]},
    )
    syncs = (await client.get(f"{BASE}/syncsMetadata", headers=org.headers)).json()
    assert syncs["data"][0]["syncState"] == "completed"
    latest = (await client.get(f"{BASE}/syncMetrics", headers=org.headers)).json()
    named = (
        await client.get(f"{BASE}/syncMetrics", headers=org.headers, params={"resyncId": event})
    ).json()
    assert latest == named
    assert latest["count"] == 2
    by_kind = {item["kindIdentifier"]: item for item in latest["data"]}
    counts = by_kind[kind]["metrics"]["phase"]["load"]["object_count_type"]
    assert (counts["loaded"]["object_count"], counts["failed"]["object_count"]) == (7, 2)
    assert by_kind[kind]["kind"] == "team members/all"
    assert by_kind[kind]["syncState"] == "completed"
    assert by_kind[kind]["integrationIdentifier"] == "ocean-1"
    r = await client.get(f"{BASE}/syncMetrics", headers=org.headers, params={"resyncId": "x"})
    assert r.status_code == 404 and r.json()["error"] == "not_found"


async def test_the_latest_syncs_are_served_by_default(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    ingest = _metrics_path(await _create(client, org))
    assert (await client.get(f"{BASE}/syncMetrics", headers=org.headers)).json() == {
        "ok": True,
        "count": 0,
        "data": [],
    }
    for event in ("first", "second"):
        await client.post(
            f"{ingest}/syncMetrics",
            headers=org.headers,
            json={"syncKindsMetrics": [_kind_metrics(event, "person-0", "completed")]},
        )
    latest = (await client.get(f"{BASE}/syncMetrics", headers=org.headers)).json()
    assert [item["eventId"] for item in latest["data"]] == ["second"]
    syncs = (await client.get(f"{BASE}/syncsMetadata", headers=org.headers)).json()
    assert [s["eventId"] for s in syncs["data"]] == ["second", "first"]


async def test_an_integrations_metrics_are_bounded_oldest_syncs_first(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    ingest = _metrics_path(await _create(client, org))
    for n in range(service.KEPT_SYNCS + 2):
        r = await client.post(
            f"{ingest}/heartbeat", headers=org.headers, json={"eventId": f"sync-{n:03d}"}
        )
        assert r.status_code == 200, r.text
    syncs = (await client.get(f"{BASE}/syncsMetadata", headers=org.headers)).json()["data"]
    assert len(syncs) == service.KEPT_SYNCS
    assert syncs[-1]["eventId"] == "sync-002"
    # A sync keeps at most MAX_SYNC_KINDS kinds; past KEPT_SYNC_KINDS kinds in all, the
    # oldest syncs go.
    per_sync = service.MAX_SYNC_KINDS
    full = service.KEPT_SYNC_KINDS // per_sync
    for n in range(full + 1):
        r = await client.post(
            f"{ingest}/syncMetrics",
            headers=org.headers,
            json={
                "syncKindsMetrics": [
                    _kind_metrics(f"big-{n}", f"k{i}-{i}", "completed") for i in range(per_sync)
                ]
            },
        )
        assert r.status_code == 200 and r.json()["stored"] == per_sync, r.text
    r = await client.put(
        f"{ingest}/syncMetrics/resync/big-{full}/kind/one-more-0",
        headers=org.headers,
        json={"syncKindMetrics": _kind_metrics(f"big-{full}", "one-more-0", "completed")},
    )
    assert r.status_code == 200 and r.json()["stored"] == 0
    syncs = (await client.get(f"{BASE}/syncsMetadata", headers=org.headers)).json()["data"]
    assert [s["eventId"] for s in syncs] == [f"big-{n}" for n in range(full, 0, -1)]


async def test_malformed_metrics_are_refused_in_ports_error_shape(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    integration = await _create(client, org)
    ingest = _metrics_path(integration)
    good = _kind_metrics("e", "person-0", "syncing")
    for body in (
        {"syncKindsMetrics": [{**good, "metrics": [1, 2]}]},
        {"syncKindsMetrics": [{key: v for key, v in good.items() if key != "kindIdentifier"}]},
        {"syncKindsMetrics": [{**good, "blueprint": "a\u0000b"}]},
        {"syncKindsMetrics": [{**good, "metrics": {"x": "y" * (service.MAX_METRICS_BYTES + 1)}}]},
        {"syncKindsMetrics": [good] * (service.MAX_SYNC_KINDS + 1)},
        {"syncKindsMetrics": "no"},
    ):
        r = await client.post(f"{ingest}/syncMetrics", headers=org.headers, json=body)
        assert r.status_code == 422, r.text
        assert r.json()["ok"] is False and r.json()["message"]
    r = await client.post(
        f"{ingest}/syncMetrics",
        headers={**org.headers, "content-type": "application/json"},
        content=b'{"syncKindsMetrics": [{"eventId": "e", "kindIdentifier": "k", '
        b'"metrics": {"cpu": NaN}}]}',
    )
    assert r.status_code == 400 and r.json()["ok"] is False
    deep: dict[str, Any] = {}
    for _ in range(150):
        deep = {"d": deep}
    r = await client.post(
        f"{ingest}/syncMetrics",
        headers=org.headers,
        json={"syncKindsMetrics": [{**good, "metrics": deep}]},
    )
    assert r.status_code == 422, r.text
    for path in (
        "e/person-0",
        "e/kind/",
        f"e/kind/{'k' * 201}",
        f"{'e' * 201}/kind/k",
        "e/kind/%00",
    ):
        r = await client.put(
            f"{ingest}/syncMetrics/resync/{path}",
            headers=org.headers,
            json={"syncKindMetrics": good},
        )
        assert r.status_code == 422, (path, r.text)
    r = await client.post(f"{ingest}/heartbeat", headers=org.headers, json={"eventId": ""})
    assert r.status_code == 422
    r = await client.post(f"{ingest}/heartbeat", json={"eventId": "e"})
    assert r.status_code == 401
    wrong = ingest[:-4] + ("aaaa" if not ingest.endswith("aaaa") else "bbbb")
    r = await client.post(f"{wrong}/heartbeat", headers=org.headers, json={"eventId": "e"})
    assert r.status_code == 404
    # A report of no sync is taken and not kept.
    r = await client.post(
        f"{ingest}/syncMetrics",
        headers=org.headers,
        json={"syncKindsMetrics": [{**good, "eventId": ""}]},
    )
    assert r.status_code == 200 and r.json()["stored"] == 0
    r = await client.put(
        f"{ingest}/syncMetrics/resync//kind/person-0",
        headers=org.headers,
        json={"syncKindMetrics": good},
    )
    assert r.status_code == 200 and r.json()["stored"] == 0
    assert (await client.get(f"{BASE}/syncsMetadata", headers=org.headers)).json()["count"] == 0


async def test_deleting_an_integration_takes_its_metrics(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    org = await make_org()
    ingest = _metrics_path(await _create(client, org))
    await client.post(f"{ingest}/heartbeat", headers=org.headers, json={"eventId": "e"})
    assert (await client.delete(BASE, headers=org.headers)).status_code == 200
    await _create(client, org)
    assert (await client.get(f"{BASE}/syncsMetadata", headers=org.headers)).json()["count"] == 0


# ------------------------------------------------------------------------------------------
# Roles and tenancy


async def test_members_can_neither_ask_for_resyncs_nor_read_metrics(
    client: httpx.AsyncClient, make_org: OrgFactory, db: Database, app: FastAPI
) -> None:
    org = await make_org()
    integration = await _create(client, org)
    member = await _member_headers(client, db, org)
    for method, path, body in (
        ("GET", "/v1/integration/provision-enabled", None),
        ("GET", f"{BASE}/resync-request", None),
        ("POST", f"{BASE}/resync-request", None),
        ("GET", f"{BASE}/syncMetrics", None),
        ("GET", f"{BASE}/syncsMetadata", None),
        ("POST", f"{_metrics_path(integration)}/heartbeat", {"eventId": "e"}),
    ):
        r = await client.request(method, path, headers=member, json=body)
        assert r.status_code == 403, (method, path, r.text)
        assert r.json()["ok"] is False
    assert await _request(client, org) is None


async def test_another_org_cannot_see_or_trigger_anything_of_an_integration(
    client: httpx.AsyncClient, make_org: OrgFactory
) -> None:
    a, b = await make_org(), await make_org()
    integration = await _create(client, a)
    ingest = _metrics_path(integration)
    await client.post(
        f"{ingest}/syncMetrics",
        headers=a.headers,
        json={"syncKindsMetrics": [_kind_metrics("a-sync", "person-0", "completed", loaded=3)]},
    )
    kind_path = f"{ingest}/syncMetrics/resync/a-sync/kind/person-0"
    for method, path, body in (
        ("GET", f"{BASE}/resync-request", None),
        ("POST", f"{BASE}/resync-request", None),
        ("GET", f"{BASE}/syncMetrics", None),
        ("GET", f"{BASE}/syncsMetadata", None),
        ("PATCH", f"{BASE}/resync-state", {"status": "aborted"}),
        ("POST", f"{ingest}/syncMetrics", {"syncKindsMetrics": [_kind_metrics("b", "x-0", "x")]}),
        ("PUT", kind_path, {"syncKindMetrics": _kind_metrics("a-sync", "person-0", "failed")}),
        ("POST", f"{ingest}/heartbeat", {"eventId": "a-sync"}),
    ):
        r = await client.request(method, path, headers=b.headers, json=body)
        assert r.status_code == 404, (method, path, r.text)
    r = await client.get(BASE, headers=b.headers, params={"oceanCoreVersion": "9.9.9"})
    assert r.status_code == 404
    # B's own integration of the same name sees none of A's.
    await _create(client, b)
    assert await _request(client, b) is None
    assert (await client.get(f"{BASE}/syncsMetadata", headers=b.headers)).json()["count"] == 0
    # A's is as A left it.
    assert await _request(client, a) is None
    mine = (await client.get(BASE, headers=a.headers)).json()["integration"]
    assert mine["oceanCoreVersion"] is None and mine["resyncState"]["status"] is None
    syncs = (await client.get(f"{BASE}/syncsMetadata", headers=a.headers)).json()["data"]
    assert [(s["eventId"], s["syncState"], s["lastHeartbeatAt"]) for s in syncs] == [
        ("a-sync", "completed", None)
    ]
    data = (await client.get(f"{BASE}/syncMetrics", headers=a.headers)).json()["data"]
    assert data[0]["metrics"]["phase"]["load"]["object_count_type"]["loaded"] == {
        "object_count": 3.0
    }


async def test_an_organization_holds_a_bounded_number_of_integrations_and_kinds(
    client: httpx.AsyncClient, make_org: OrgFactory, monkeypatch: Any
) -> None:
    """What one org may store through integrations is bounded by their count, and each
    integration's examples by their kinds (logs and metrics are bounded per integration)."""
    monkeypatch.setattr(service, "MAX_INTEGRATIONS", 2)
    monkeypatch.setattr(service, "MAX_EXAMPLE_KINDS", 2)
    org, other = await make_org(), await make_org()
    await _create(client, org, "one")
    await _create(client, org, "two")
    r = await client.post("/v1/integration", json={"installationId": "three"}, headers=org.headers)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "too_many_integrations"
    await _create(client, other, "one")  # the cap is each org's own
    for kind in ("a", "b", "c"):
        r = await client.post(
            f"/v1/integration/one/kinds/{kind}/examples",
            json={"examples": [{"kind": kind}]},
            headers=org.headers,
        )
        assert r.status_code in (200, 201), r.text
    kept = {}
    for kind in ("a", "b", "c"):
        r = await client.get(f"/v1/integration/one/kinds/{kind}/examples", headers=org.headers)
        kept[kind] = r.json()["examples"]
    assert kept == {"a": [{"kind": "a"}], "b": [{"kind": "b"}], "c": []}
    # A kind already kept still takes new examples.
    r = await client.post(
        "/v1/integration/one/kinds/a/examples", json={"examples": [{"n": 2}]}, headers=org.headers
    )
    assert r.status_code in (200, 201), r.text
    r = await client.get("/v1/integration/one/kinds/a/examples", headers=org.headers)
    assert r.json()["examples"][0] == {"n": 2}
