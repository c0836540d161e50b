"""Current Port Ocean (port-ocean 0.56.2, unchanged) against a live Portolan.

`ocean sail` runs the suite's integration for it (tests/ocean_current: clusters and the
workloads on them, read from a JSON file each test writes, and a `scale_workload` integration
action) as a subprocess against a `portolan serve` of this module's own, whose access log
(one JSON line per request) shows every answer Ocean got. Ocean 0.56 needs Python >= 3.12 and
has a virtualenv of its own (`.venv-ocean-current`, made by `make install-ocean-current`);
PORTOLAN_TEST_OCEAN_CURRENT names another `ocean` executable.

The module's own requests carry an `X-Request-Id` starting with `suite-`: the access log
tells them from Ocean's. The last test reads every answer Ocean got during the module.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from tests.conftest import PLATFORM_TOKEN, served

ROOT = Path(__file__).resolve().parent.parent
INTEGRATION = Path(__file__).resolve().parent / "ocean_current"
INTEGRATION_TYPE = "portolan-current-integration"
INTEGRATION_VERSION = "0.2.0"  # tests/ocean_current/pyproject.toml
OCEAN = Path(
    os.environ.get("PORTOLAN_TEST_OCEAN_CURRENT") or ROOT / ".venv-ocean-current" / "bin" / "ocean"
)
SUITE = "suite-"  # the X-Request-Id prefix of the module's own requests
POLL_INTERVAL = 2  # seconds between a polling Ocean's looks at its resync request
VISIBILITY_TIMEOUT_MS = 3000  # how long a claimed run stays invisible to other claims

CLUSTERS = [
    {"id": "eu-1", "name": "EU 1", "region": "eu-west-1"},
    {"id": "us-1", "name": "US 1", "region": "us-east-1"},
    {"id": "ap-1", "name": "AP 1", "region": "ap-south-1"},
]
WORKLOADS = [
    {"id": "api", "name": "API", "replicas": 3, "cluster": "eu-1"},
    {"id": "web", "name": "Web", "replicas": 2, "cluster": "eu-1"},
    {"id": "jobs", "name": "Jobs", "replicas": 1, "cluster": "us-1"},
    {"id": "cache", "name": "Cache", "replicas": 2, "cluster": "us-1"},
    {"id": "edge", "name": "Edge", "replicas": 4, "cluster": "ap-1"},
]
BLUEPRINTS = ("cluster", "workload")  # .port/resources/blueprints.json

# Non-2xx answers Ocean asks for and takes in its stride, whatever the integration.
EXPECTED_ERRORS = {
    # Workflow node runs are claimed beside action runs, also before the integration exists.
    ("POST", "/v1/workflows/runs/claim-pending", 404),
    # Ocean looks its blueprints up before creating them.
    *(("GET", f"/v1/blueprints/{bp}", 404) for bp in BLUEPRINTS),
}


# --- the server and its access log --------------------------------------------------------


@dataclass
class Portolan:
    url: str
    log: Path
    expected: set[tuple[str, str, int]] = field(default_factory=lambda: set(EXPECTED_ERRORS))
    integrations: set[str] = field(default_factory=set)  # the paths of the module's ones

    def requests(self) -> list[dict[str, Any]]:
        """Every request the server has answered so far, from its access log."""
        lines = []
        for raw in self.log.read_text(errors="replace").splitlines():
            if raw.startswith("{"):
                line = json.loads(raw)
                if line.get("msg") == "request":
                    lines.append(line)
        return lines

    def oceans(self, since: int = 0) -> list[dict[str, Any]]:
        """Ocean's requests (every one but the module's own), from the `since`-th on."""
        return [
            r
            for r in self.requests()[since:]
            if not str(r.get("request_id", "")).startswith(SUITE) and r["path"] != "/readyz"
        ]

    def unexpected_errors(self, since: int = 0) -> list[str]:
        """Ocean's requests answered with anything but a 2xx, bar the expected ones: those
        of EXPECTED_ERRORS, and a 404 for an integration until it has been read."""
        read: set[str] = set()  # the integrations Ocean has read so far
        errors = []
        for r in self.oceans(since):
            method, path, status = r["method"], r["path"], r["status"]
            if 200 <= status < 300:
                if method == "GET":
                    read.add(path)
                continue
            # Ocean reads its integration before creating it.
            before_creation = path in self.integrations and path not in read
            if (method, path, status) in self.expected or (
                method == "GET" and status == 404 and before_creation
            ):
                continue
            errors.append(f"{status} {method} {path}")
        return errors

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def portolan(settings: Settings) -> Iterator[Portolan]:
    """`portolan serve` for this module: at INFO it logs one line per request."""
    with served(settings, PORTOLAN_LOG_LEVEL="INFO", PORTOLAN_DB_POOL_SIZE="4") as (port, log):
        yield Portolan(url=f"http://127.0.0.1:{port}", log=log)


def _mark(request: httpx.Request) -> None:
    request.headers["X-Request-Id"] = SUITE + uuid.uuid4().hex


async def _amark(request: httpx.Request) -> None:
    _mark(request)


@pytest.fixture
async def api(portolan: Portolan) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=portolan.url, timeout=30, event_hooks={"request": [_amark]}
    ) as http:
        yield http


@dataclass
class Tenant:
    client_id: str
    client_secret: str
    headers: dict[str, str]


def _new_tenant(portolan: Portolan) -> Tenant:
    """A new organization and its first (Admin) machine credential."""
    with httpx.Client(base_url=portolan.url, timeout=30, event_hooks={"request": [_mark]}) as http:
        created = http.post(
            "/v1/platform/orgs",
            json={"name": f"ocean-current-{uuid.uuid4().hex[:8]}"},
            headers={"Authorization": f"Bearer {PLATFORM_TOKEN}"},
        )
        assert created.status_code == 201, created.text
        body = created.json()
        token = http.post(
            "/v1/auth/access_token",
            json={"clientId": body["clientId"], "clientSecret": body["clientSecret"]},
        )
        assert token.status_code == 200, token.text
    return Tenant(
        client_id=body["clientId"],
        client_secret=body["clientSecret"],
        headers={"Authorization": f"Bearer {token.json()['accessToken']}"},
    )


# --- Ocean ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _require_ocean() -> None:
    if not OCEAN.exists():
        pytest.fail(
            f"{OCEAN} is missing: `make install-ocean-current` makes .venv-ocean-current "
            "(it needs Python >= 3.12), or set PORTOLAN_TEST_OCEAN_CURRENT"
        )


@dataclass
class Integration:
    """One installation of the suite's integration: its organization, the data it exports,
    the journal it keeps, and the output of each Ocean run."""

    portolan: Portolan
    tenant: Tenant
    identifier: str
    directory: Path
    outputs: list[Path] = field(default_factory=list)

    @property
    def data_file(self) -> Path:
        return self.directory / "data.json"

    @property
    def journal_file(self) -> Path:
        return self.directory / "journal.jsonl"

    def export(
        self,
        clusters: list[dict[str, Any]],
        workloads: list[dict[str, Any]],
        *,
        hold_resync_seconds: float = 0,
    ) -> None:
        self.data_file.write_text(
            json.dumps(
                {
                    "clusters": clusters,
                    "workloads": workloads,
                    "holdResyncSeconds": hold_resync_seconds,
                }
            )
        )

    def journal(self, **match: Any) -> list[dict[str, Any]]:
        """The journal's lines that have the given values."""
        if not self.journal_file.exists():
            return []
        lines = [json.loads(x) for x in self.journal_file.read_text().splitlines() if x]
        return [x for x in lines if all(x.get(k) == v for k, v in match.items())]

    def env(self, listener: dict[str, Any], *, actions: bool) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("OCEAN__", "PORTOLAN_", "APPLICATION__", "VIRTUAL_ENV", "PYTHON"))
        }
        env.update(
            OCEAN__PORT__BASE_URL=self.portolan.url,
            OCEAN__PORT__CLIENT_ID=self.tenant.client_id,
            OCEAN__PORT__CLIENT_SECRET=self.tenant.client_secret,
            # The mapping is read afresh at every resync (Ocean keeps it 60 s by default).
            OCEAN__PORT__PORT_APP_CONFIG_CACHE_TTL="0",
            OCEAN__INTEGRATION__TYPE=INTEGRATION_TYPE,
            OCEAN__INTEGRATION__IDENTIFIER=self.identifier,
            OCEAN__INTEGRATION__CONFIG__DATA_FILE=str(self.data_file),
            OCEAN__INTEGRATION__CONFIG__JOURNAL=str(self.journal_file),
            OCEAN__EVENT_LISTENER=json.dumps(listener),
            OCEAN__CACHING_STORAGE_MODE="memory",
            OCEAN__STATUS_HEARTBEAT_INTERVAL_SECONDS="1",
            OCEAN__MAX_WAIT_SECONDS_BEFORE_SHUTDOWN="2",
            APPLICATION__LOG_LEVEL="INFO",
            PYTHONUNBUFFERED="1",
        )
        if actions:
            env.update(
                OCEAN__ACTIONS_PROCESSOR__ENABLED="true",
                OCEAN__ACTIONS_PROCESSOR__POLL_CHECK_INTERVAL_SECONDS="1",
                OCEAN__ACTIONS_PROCESSOR__VISIBILITY_TIMEOUT_MS=str(VISIBILITY_TIMEOUT_MS),
            )
        return env

    def _new_output(self) -> Path:
        path = self.directory / f"ocean-{len(self.outputs)}.log"
        self.outputs.append(path)
        return path

    def report(self) -> str:
        """For a failing assertion: Ocean's latest output, Portolan's unexpected answers to
        Ocean, the end of Portolan's log."""
        last = self.outputs[-1].read_text(errors="replace")[-6000:] if self.outputs else ""
        return (
            f"--- ocean ---\n{last}\n--- unexpected answers to Ocean ---\n"
            f"{self.portolan.unexpected_errors()}\n--- portolan ---\n{self.portolan.tail()}"
        )

    def sail_once(self) -> None:
        """`ocean sail -O` (the ONCE listener), to its end."""
        _require_ocean()
        path = self._new_output()
        with path.open("w") as out:
            try:
                done = subprocess.run(
                    [str(OCEAN), "sail", "-O", "-p", str(_free_port())],
                    cwd=INTEGRATION,
                    env=self.env({"type": "ONCE"}, actions=False),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=60,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise AssertionError("`ocean sail -O` ran over 60 s\n" + self.report()) from None
        assert done.returncode == 0, self.report()
        assert "Resync finished successfully" in path.read_text(errors="replace"), self.report()

    @contextmanager
    def sailing(
        self, *, actions: bool = False, resync_on_start: bool = True
    ) -> Iterator[subprocess.Popen[bytes]]:
        """`ocean sail` with the POLLING listener for the block's length (then interrupted,
        and killed if it does not stop)."""
        _require_ocean()
        listener = {
            "type": "POLLING",
            "interval": POLL_INTERVAL,
            "resync_on_start": resync_on_start,
        }
        with self._new_output().open("w") as out:
            proc = subprocess.Popen(
                [str(OCEAN), "sail", "-p", str(_free_port())],
                cwd=INTEGRATION,
                env=self.env(listener, actions=actions),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            try:
                yield proc
            finally:
                _stop(proc, signal.SIGINT)


def _stop(proc: subprocess.Popen[bytes], sig: signal.Signals) -> int:
    """Signals the process and waits for it (20 s, then kills it): its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


@pytest.fixture
def installation(portolan: Portolan, tmp_path: Path) -> Callable[[str], Integration]:
    """A new installation (identifier) in a new organization."""

    def _make(identifier: str) -> Integration:
        portolan.integrations.add(f"/v1/integration/{identifier}")
        return Integration(
            portolan=portolan,
            tenant=_new_tenant(portolan),
            identifier=identifier,
            directory=tmp_path,
        )

    return _make


async def _wait(
    what: str,
    check: Callable[[], Any] | Callable[[], Awaitable[Any]],
    *,
    within: float,
    report: Callable[[], str] = str,
) -> Any:
    """Polls `check` until it answers something truthy, and answers that; fails saying
    what did not happen when `within` seconds pass first."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within} s\n{report()}")
        await asyncio.sleep(0.2)


async def _get(api: httpx.AsyncClient, tenant: Tenant, path: str, **params: Any) -> Any:
    r = await api.get(path, headers=tenant.headers, params=params)
    assert r.status_code == 200, f"GET {path}: {r.status_code} {r.text}"
    return r.json()


async def _entities(api: httpx.AsyncClient, it: Integration, blueprint: str) -> dict[str, Any]:
    body = await _get(api, it.tenant, f"/v1/blueprints/{blueprint}/entities")
    return {e["identifier"]: e for e in body["entities"]}


async def _integration(api: httpx.AsyncClient, it: Integration) -> dict[str, Any]:
    body = await _get(api, it.tenant, f"/v1/integration/{it.identifier}")
    integration: dict[str, Any] = body["integration"]
    return integration


async def _resync_status(api: httpx.AsyncClient, it: Integration) -> str | None:
    status: str | None = (await _integration(api, it))["resyncState"]["status"]
    return status


def _at(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(line["ts"]).timestamp()


# --- (a), (b): the ONCE listener ------------------------------------------------------------


async def test_a_once_sync_creates_both_kinds_with_their_relations(
    installation: Callable[[str], Integration], api: httpx.AsyncClient
) -> None:
    it = installation("clusters-once")
    it.export(CLUSTERS, WORKLOADS)
    it.sail_once()

    blueprints = {
        b["identifier"]: b for b in (await _get(api, it.tenant, "/v1/blueprints"))["blueprints"]
    }
    assert set(BLUEPRINTS) <= set(blueprints), it.report()
    assert blueprints["workload"]["relations"]["cluster"]["target"] == "cluster"

    clusters = await _entities(api, it, "cluster")
    workloads = await _entities(api, it, "workload")
    assert set(clusters) == {c["id"] for c in CLUSTERS}, it.report()
    assert clusters["ap-1"]["title"] == "AP 1"
    assert clusters["ap-1"]["properties"]["region"] == "ap-south-1"
    assert {w: e["relations"]["cluster"] for w, e in workloads.items()} == {
        w["id"]: w["cluster"] for w in WORKLOADS
    }, it.report()
    assert workloads["edge"]["properties"]["replicas"] == 4

    integration = await _integration(api, it)
    assert integration["installationAppType"] == INTEGRATION_TYPE
    assert integration["version"] == INTEGRATION_VERSION
    assert integration["resyncState"]["status"] == "completed"
    assert integration["resyncState"]["lastResyncEnd"] is not None


async def test_b_a_second_once_run_deletes_exactly_the_stale_entities(
    installation: Callable[[str], Integration], api: httpx.AsyncClient, portolan: Portolan
) -> None:
    it = installation("clusters-shrinking")
    it.export(CLUSTERS, WORKLOADS)
    it.sail_once()
    # Someone else's workload: not the integration's to delete.
    manual = await api.post(
        "/v1/blueprints/workload/entities",
        headers=it.tenant.headers,
        json={"identifier": "manual", "title": "Manual", "relations": {"cluster": "eu-1"}},
    )
    assert manual.status_code == 201, manual.text

    since = len(portolan.requests())
    it.export(CLUSTERS[:2], [w for w in WORKLOADS if w["id"] in ("api", "jobs", "cache")])
    it.sail_once()

    assert set(await _entities(api, it, "cluster")) == {"eu-1", "us-1"}, it.report()
    assert set(await _entities(api, it, "workload")) == {"api", "jobs", "cache", "manual"}
    # Ocean found its own entities through Portolan's datasource lookup.
    lookups = [
        r["status"]
        for r in portolan.oceans(since)
        if r["path"] == "/v1/blueprints/entities/datasource-entities"
    ]
    assert lookups and set(lookups) == {200}, lookups
    assert (await _integration(api, it))["resyncState"]["status"] == "completed"


# --- (c), (d): the POLLING listener ---------------------------------------------------------


async def _first_resync(api: httpx.AsyncClient, it: Integration) -> None:
    """A polling Ocean's resync on start, to its end."""
    await _wait(
        "the first resync",
        lambda: it.journal(event="resync", kind="workload"),
        within=45,
        report=it.report,
    )
    await _wait("the first resync's end", lambda: _is_completed(api, it), within=30)


async def _resync_after(it: Integration, asked: float, cause: str) -> None:
    """A resync begins within two polling intervals of `asked`."""
    started = await _wait(
        f"a resync after {cause}",
        lambda: [x for x in it.journal(event="resync", kind="cluster") if x["at"] > asked],
        within=30,
        report=it.report,
    )
    assert started[0]["at"] - asked <= 2 * POLL_INTERVAL, (
        f"the resync began {started[0]['at'] - asked:.1f} s after it was asked for "
        f"(polling every {POLL_INTERVAL} s)\n{it.report()}"
    )


async def _no_more_resyncs(api: httpx.AsyncClient, it: Integration, resyncs: int) -> None:
    """Once the resync under way ends, two more polls bring no other."""
    await _wait("the resync's end", lambda: _is_completed(api, it), within=30)
    settled = len(it.portolan.requests())
    await _wait(
        "two more polls",
        lambda: (
            len(
                [
                    x
                    for x in it.portolan.oceans(settled)
                    if x["path"] == f"/v1/integration/{it.identifier}/resync-request"
                ]
            )
            >= 2
        ),
        within=4 * POLL_INTERVAL + 5,
        report=it.report,
    )
    assert len(it.journal(event="resync", kind="cluster")) == resyncs, it.report()


async def test_c_polling_ocean_resyncs_with_a_new_mapping_within_two_intervals(
    installation: Callable[[str], Integration], api: httpx.AsyncClient
) -> None:
    it = installation("clusters-remapped")
    it.export(CLUSTERS, WORKLOADS)
    with it.sailing():
        await _first_resync(api, it)
        # Workloads' titles name their cluster.
        config = (await _integration(api, it))["config"]
        workload = next(r for r in config["resources"] if r["kind"] == "workload")
        workload["port"]["entity"]["mappings"]["title"] = '.name + " on " + .cluster'
        asked = time.time()
        r = await api.patch(
            f"/v1/integration/{it.identifier}/config",
            headers=it.tenant.headers,
            json={"config": config},
        )
        assert r.status_code == 200, r.text
        await _resync_after(it, asked, "the new mapping")
        await _wait(
            "the new mapping's titles",
            lambda: _title_of(api, it, "edge", "Edge on ap-1"),
            within=30,
            report=it.report,
        )
        await _no_more_resyncs(api, it, 2)


async def test_c_polling_ocean_resyncs_when_an_admin_asks(
    installation: Callable[[str], Integration], api: httpx.AsyncClient
) -> None:
    it = installation("clusters-requested")
    it.export(CLUSTERS, WORKLOADS)
    with it.sailing():
        await _first_resync(api, it)
        # The source has a new workload: an Admin asks for a resync.
        batch = {"id": "batch", "name": "Batch", "replicas": 1, "cluster": "ap-1"}
        it.export(CLUSTERS, [*WORKLOADS, batch])
        asked = time.time()
        r = await api.post(
            f"/v1/integration/{it.identifier}/resync-request", headers=it.tenant.headers
        )
        assert r.status_code == 202, r.text
        await _resync_after(it, asked, "the Admin's request")
        await _wait(
            "the new workload",
            lambda: _title_of(api, it, "batch", "Batch"),
            within=30,
            report=it.report,
        )
        await _no_more_resyncs(api, it, 2)


async def _is_completed(api: httpx.AsyncClient, it: Integration) -> bool:
    return await _resync_status(api, it) == "completed"


async def _title_of(api: httpx.AsyncClient, it: Integration, workload: str, title: str) -> bool:
    found = (await _entities(api, it, "workload")).get(workload)
    return bool(found and found["title"] == title)


async def test_d_stopping_ocean_mid_resync_records_the_resync_aborted(
    installation: Callable[[str], Integration], api: httpx.AsyncClient
) -> None:
    it = installation("clusters-aborted")
    it.export(CLUSTERS, WORKLOADS, hold_resync_seconds=300)
    with it.sailing() as ocean:
        await _wait(
            "the slow workload resync",
            lambda: it.journal(event="holding"),
            within=45,
            report=it.report,
        )
        assert await _resync_status(api, it) == "running"
        code = _stop(ocean, signal.SIGTERM)
    assert code != -signal.SIGKILL, "Ocean did not stop within 20 s of SIGTERM\n" + it.report()
    state = (await _integration(api, it))["resyncState"]
    assert state["status"] == "aborted", it.report()
    assert state["lastResyncEnd"] is not None


# --- (e): metrics ---------------------------------------------------------------------------


async def test_e_a_syncs_metrics_are_readable_after_it(
    installation: Callable[[str], Integration], api: httpx.AsyncClient
) -> None:
    it = installation("clusters-metrics")
    it.export(CLUSTERS, WORKLOADS)
    it.sail_once()

    integration = await _integration(api, it)
    assert integration["metricAttributes"]["ingestUrl"].startswith(it.portolan.url + "/")
    syncs = await _get(api, it.tenant, f"/v1/integration/{it.identifier}/syncsMetadata")
    assert [s["syncState"] for s in syncs["data"]] == ["completed"], syncs
    event_id = syncs["data"][0]["eventId"]
    kinds = (await _get(api, it.tenant, f"/v1/integration/{it.identifier}/syncMetrics"))["data"]
    by_kind = {k["kindIdentifier"]: k for k in kinds}
    assert {"cluster-0", "workload-1"} <= set(by_kind), kinds
    assert {k["eventId"] for k in kinds} == {event_id}
    for kind, count in (("cluster-0", len(CLUSTERS)), ("workload-1", len(WORKLOADS))):
        phases = by_kind[kind]["metrics"]["phase"]
        assert by_kind[kind]["syncState"] == "completed", by_kind[kind]
        assert _count(phases, "extract", "raw_extracted") == count, phases
        assert _count(phases, "load", "loaded") == count, phases
        assert _count(phases, "load", "failed") == 0, phases


def _count(phases: dict[str, Any], phase: str, outcome: str) -> float:
    count: float = phases[phase]["object_count_type"][outcome]["object_count"]
    return count


# --- (f): INTEGRATION_ACTION runs -----------------------------------------------------------

SCALE = {
    "identifier": "scale",
    "title": "Scale",
    "trigger": {
        "type": "self-service",
        "operation": "DAY-2",
        "blueprintIdentifier": "workload",
        "userInputs": {
            "properties": {
                "replicas": {"type": "number"},
                "hangFirstClaim": {"type": "boolean", "default": False},
            },
            "required": ["replicas"],
        },
    },
    "invocationMethod": {
        "type": "INTEGRATION_ACTION",
        "installationId": "",  # the test's installation
        "integrationActionType": "scale_workload",
        "integrationActionExecutionProperties": {
            "workload": "{{ .entity.identifier }}",
            "replicas": "{{ .inputs.replicas }}",
            "hangFirstClaim": "{{ .inputs.hangFirstClaim }}",
        },
    },
}


async def _scale_action(api: httpx.AsyncClient, it: Integration) -> None:
    """The integration's blueprints are in (Ocean made them), then the action on them."""
    await _wait(
        "the integration's first resync",
        lambda: it.journal(event="resync", kind="workload"),
        within=45,
        report=it.report,
    )
    await _wait("the first resync's end", lambda: _is_completed(api, it), within=30)
    action = json.loads(json.dumps(SCALE))
    action["invocationMethod"]["installationId"] = it.identifier
    r = await api.post("/v1/actions", headers=it.tenant.headers, json=action)
    assert r.status_code == 201, r.text


async def _run(api: httpx.AsyncClient, it: Integration, **inputs: Any) -> str:
    r = await api.post(
        "/v1/actions/scale/runs",
        headers=it.tenant.headers,
        json={"entity": "api", "properties": inputs},
    )
    assert r.status_code == 202, r.text
    run_id: str = r.json()["run"]["id"]
    return run_id


async def _run_status(api: httpx.AsyncClient, it: Integration, run_id: str) -> str:
    status: str = (await _get(api, it.tenant, f"/v1/actions/runs/{run_id}"))["run"]["status"]
    return status


async def _run_ended(api: httpx.AsyncClient, it: Integration, run_id: str) -> bool:
    return await _run_status(api, it, run_id) != "IN_PROGRESS"


async def test_f_an_integration_action_run_is_claimed_run_and_reported_by_ocean(
    installation: Callable[[str], Integration], api: httpx.AsyncClient
) -> None:
    it = installation("clusters-actions")
    it.export(CLUSTERS, WORKLOADS)
    with it.sailing(actions=True):
        await _scale_action(api, it)
        run_id = await _run(api, it, replicas=5)
        await _wait(
            "the run's end",
            lambda: _run_ended(api, it, run_id),
            within=30,
            report=it.report,
        )
    run = (await _get(api, it.tenant, f"/v1/actions/runs/{run_id}"))["run"]
    assert run["status"] == "SUCCESS", it.report()
    started = it.journal(event="start", run=run_id)
    assert [x["properties"] for x in started] == [
        {"workload": "api", "replicas": 5, "hangFirstClaim": False}
    ]
    assert len(it.journal(event="done", run=run_id)) == 1
    logs = [
        x["message"]
        for x in (await _get(api, it.tenant, f"/v1/actions/runs/{run_id}/logs"))["runLogs"]
    ]
    assert "scaling api to 5 replicas" in logs, logs
    assert "api scaled to 5" in logs, logs


def _scale_workflow(installation: str) -> dict[str, Any]:
    """A workflow whose one node is the integration's `scale_workload`, run by Ocean."""
    return {
        "identifier": "scale-flow",
        "title": "Scale",
        "nodes": [
            {
                "identifier": "trigger",
                "config": {
                    "type": "SELF_SERVE_TRIGGER",
                    "userInputs": {
                        "properties": {"replicas": {"type": "number"}},
                        "required": ["replicas"],
                    },
                },
            },
            {
                "identifier": "scale",
                "config": {
                    "type": "INTEGRATION_ACTION",
                    "installationId": installation,
                    "integrationProvider": "clusters",
                    "integrationInvocationType": "scale_workload",
                    "integrationActionExecutionProperties": {
                        "workload": "api",
                        "replicas": "{{ .outputs.trigger.replicas }}",
                        "hangFirstClaim": False,
                    },
                },
            },
        ],
        "connections": [{"sourceIdentifier": "trigger", "targetIdentifier": "scale"}],
    }


async def test_f_a_workflow_node_is_claimed_run_and_reported_by_ocean(
    installation: Callable[[str], Integration],
    api: httpx.AsyncClient,
    start_worker: Callable[..., Settings],
) -> None:
    """Ocean's actions processor claims workflow node runs beside action runs: the same
    executor runs an INTEGRATION_ACTION node and reports it, and the run ends."""
    it = installation("clusters-workflows")
    it.export(CLUSTERS, WORKLOADS)
    start_worker()  # renders the node for its integration (the served API has no worker)
    with it.sailing(actions=True):
        await _wait(
            "the integration's first resync",
            lambda: it.journal(event="resync", kind="workload"),
            within=45,
            report=it.report,
        )
        r = await api.post(
            "/v1/workflows", headers=it.tenant.headers, json=_scale_workflow(it.identifier)
        )
        assert r.status_code == 201, r.text
        r = await api.post(
            "/v1/workflows/scale-flow/runs",
            headers=it.tenant.headers,
            json={"inputs": {"replicas": 7}},
        )
        assert r.status_code == 202, r.text
        run_id = r.json()["workflowRun"]["identifier"]

        async def ended() -> bool:
            run = await _get(api, it.tenant, f"/v1/workflows/runs/{run_id}")
            return bool(run["workflowRun"]["status"] == "COMPLETED")

        await _wait("the workflow run's end", ended, within=45, report=it.report)
    run = (await _get(api, it.tenant, f"/v1/workflows/runs/{run_id}"))["workflowRun"]
    assert run["result"] == "SUCCESS", it.report()
    (node,) = [n for n in run["nodeRuns"] if n["node"]["identifier"] == "scale"]
    assert node["result"] == "SUCCESS", node
    started = it.journal(event="start", run=node["identifier"])
    assert [x["properties"] for x in started] == [
        {"workload": "api", "replicas": 7, "hangFirstClaim": False}
    ]
    assert len(it.journal(event="done", run=node["identifier"])) == 1
    logs = [line["message"] for line in node["nodeRunLogs"]]
    assert "scaling api to 7 replicas" in logs, logs
    assert "api scaled to 7" in logs, logs


async def test_f_a_run_whose_ocean_dies_holding_it_is_claimed_again_and_runs_once(
    installation: Callable[[str], Integration], api: httpx.AsyncClient, portolan: Portolan
) -> None:
    it = installation("clusters-reclaimed")
    it.export(CLUSTERS, WORKLOADS)
    with it.sailing(actions=True) as first:
        await _scale_action(api, it)
        run_id = await _run(api, it, replicas=7, hangFirstClaim=True)
        await _wait(
            "the first claim of the run",
            lambda: it.journal(event="claimed", run=run_id),
            within=30,
            report=it.report,
        )
        # Claimed and not acknowledged: nobody else can claim it meanwhile.
        r = await api.post(
            "/v1/actions/runs/claim-pending",
            headers=it.tenant.headers,
            json={"installationId": it.identifier, "limit": 10, "visibilityTimeoutMs": 1000},
        )
        assert r.status_code == 200, r.text
        assert r.json()["runs"] == [], r.json()
        first.kill()
        first.wait(10)
    killed = time.time()

    with it.sailing(actions=True, resync_on_start=False):
        await _wait(
            "the run's end",
            lambda: _run_ended(api, it, run_id),
            within=30,
            report=it.report,
        )
        ended = len(portolan.requests())
        # Two claims after the run ended and after a visibility timeout: neither took it.
        await _wait(
            "two claims past the visibility timeout",
            lambda: (
                len(
                    [
                        x
                        for x in portolan.oceans(ended)
                        if x["path"] == "/v1/actions/runs/claim-pending"
                        and _at(x) > killed + VISIBILITY_TIMEOUT_MS / 1000
                    ]
                )
                >= 2
            ),
            within=15,
            report=it.report,
        )
    assert await _run_status(api, it, run_id) == "SUCCESS", it.report()
    claims = it.journal(event="claimed", run=run_id)
    assert [c["attempt"] for c in claims] == [1, 2], claims
    assert claims[1]["at"] - claims[0]["at"] >= VISIBILITY_TIMEOUT_MS / 1000 - 0.5
    assert len(it.journal(event="start", run=run_id)) == 1
    assert len(it.journal(event="done", run=run_id)) == 1


# --- (g): what Portolan answered Ocean ------------------------------------------------------


def test_g_portolan_answered_ocean_only_with_2xx_and_expected_404s(portolan: Portolan) -> None:
    """Every request Ocean made during this module's runs (run it after them)."""
    oceans = portolan.oceans()
    assert oceans, "no request from Ocean: this test reads the runs of the tests before it"
    errors = portolan.unexpected_errors()
    assert errors == [], "Portolan answered Ocean:\n" + "\n".join(errors)
