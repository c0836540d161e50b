"""Port's Ocean framework (port-ocean 0.12.9, unchanged) syncs into a live Portolan.

`ocean sail` runs the suite's own integration (tests/ocean_integration: departments and the
people in them) as a subprocess against `portolan serve`. Ocean lives in its own virtualenv
(`.venv-ocean`, made by `make install`; it needs pydantic 1): PORTOLAN_TEST_OCEAN names
another `ocean` executable.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from tests.conftest import LiveServer, Org, OrgFactory

ROOT = Path(__file__).resolve().parent.parent
INTEGRATION = Path(__file__).resolve().parent / "ocean_integration"
INTEGRATION_TYPE = "portolan-test-integration"
OCEAN_VERSION_OF_INTEGRATION = "0.3.1"  # tests/ocean_integration/pyproject.toml
OCEAN = Path(os.environ.get("PORTOLAN_TEST_OCEAN") or ROOT / ".venv-ocean" / "bin" / "ocean")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ocean_env(
    server: LiveServer, org: Org, identifier: str, people: int, listener: str
) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OCEAN__", "PORTOLAN_", "APPLICATION__", "VIRTUAL_ENV", "PYTHON"))
    }
    env.update(
        OCEAN__PORT__BASE_URL=server.url,
        OCEAN__PORT__CLIENT_ID=org.client_id,
        OCEAN__PORT__CLIENT_SECRET=org.client_secret,
        OCEAN__INTEGRATION__TYPE=INTEGRATION_TYPE,
        OCEAN__INTEGRATION__IDENTIFIER=identifier,
        OCEAN__INTEGRATION__CONFIG__PERSON_COUNT=str(people),
        OCEAN__EVENT_LISTENER=listener,
        APPLICATION__LOG_LEVEL="INFO",
    )
    return env


def _require_ocean() -> None:
    if not OCEAN.exists():
        pytest.fail(
            f"{OCEAN} is missing: `make install` makes .venv-ocean (or set PORTOLAN_TEST_OCEAN)"
        )


def _sail(server: LiveServer, org: Org, identifier: str, people: int) -> str:
    """One `ocean sail -O` run to its end; its output."""
    _require_ocean()
    done = subprocess.run(
        [str(OCEAN), "sail", "-O", "-p", str(_free_port())],
        cwd=INTEGRATION,
        env=_ocean_env(server, org, identifier, people, '{"type":"ONCE"}'),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, (
        output[-5000:] + "\n--- portolan serve ---\n" + server.log.read_text()[-5000:]
    )
    return output


async def _get(client: httpx.AsyncClient, org: Org, path: str, **params: Any) -> Any:
    r = await client.get(path, headers=org.headers, params=params)
    assert r.status_code == 200, r.text
    return r.json()


async def _entities(client: httpx.AsyncClient, org: Org, blueprint: str) -> dict[str, Any]:
    body = await _get(client, org, f"/v1/blueprints/{blueprint}/entities")
    return {e["identifier"]: e for e in body["entities"]}


async def _wait_for_logs(client: httpx.AsyncClient, org: Org, identifier: str) -> list[Any]:
    deadline = time.monotonic() + 15
    while True:
        logs = (await _get(client, org, f"/v1/integration/{identifier}/logs"))["logs"]
        if logs or time.monotonic() > deadline:
            return list(logs)
        await asyncio.sleep(0.3)


@pytest.fixture
async def org(make_org: OrgFactory) -> Org:
    return await make_org()


@pytest.fixture
async def live(live_server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    """The live server itself (its public URL is the one in the integration's ingest URL)."""
    async with httpx.AsyncClient(base_url=live_server.url, timeout=30) as http:
        yield http


async def test_ocean_syncs_and_then_deletes_only_its_stale_entities(
    live_server: LiveServer, org: Org, live: httpx.AsyncClient
) -> None:
    identifier = "people-sync"
    output = _sail(live_server, org, identifier, people=7)

    blueprints = {
        b["identifier"]: b for b in (await _get(live, org, "/v1/blueprints"))["blueprints"]
    }
    assert {"department", "person"} <= set(blueprints), output[-3000:]
    assert blueprints["person"]["relations"]["department"]["target"] == "department"

    departments = await _entities(live, org, "department")
    people = await _entities(live, org, "person")
    assert set(departments) == {"engineering", "finance", "legal"}
    assert departments["finance"]["properties"]["budget"] == 2000
    assert set(people) == {f"person-{i}" for i in range(7)}, output[-6000:]
    assert people["person-4"]["title"] == "Person 4"
    assert people["person-4"]["properties"]["age"] == 24
    assert people["person-4"]["relations"]["department"] == "finance"
    # `badge` is mapped but the blueprint does not declare it: dropped, as Port does.
    assert "badge" not in people["person-4"]["properties"]

    search = await live.post(
        "/v1/entities/search",
        headers=org.headers,
        params=[("include", "identifier"), ("include", "blueprint")],
        json={
            "combinator": "and",
            "rules": [
                {
                    "property": "$datasource",
                    "operator": "contains",
                    "value": f"port-ocean/{INTEGRATION_TYPE}/",
                },
                {
                    "property": "$datasource",
                    "operator": "contains",
                    "value": f"/{identifier}/exporter",
                },
            ],
        },
    )
    assert search.status_code == 200, search.text
    assert len(search.json()["entities"]) == 10

    integration = (await _get(live, org, f"/v1/integration/{identifier}"))["integration"]
    assert integration["installationAppType"] == INTEGRATION_TYPE
    assert integration["version"] == OCEAN_VERSION_OF_INTEGRATION
    assert integration["resyncState"]["status"] == "completed"
    assert integration["resyncState"]["lastResyncEnd"] is not None
    assert integration["updatedAt"] == integration["resyncState"]["updatedAt"]
    assert [r["kind"] for r in integration["config"]["resources"]] == ["department", "person"]
    assert integration["logAttributes"]["ingestUrl"].startswith(live_server.url + "/")

    examples = (await _get(live, org, f"/v1/integration/{identifier}/kinds/person/examples"))[
        "examples"
    ]
    assert 1 <= len(examples) <= 5
    assert {"id", "name", "department"} <= set(examples[0])

    logs = await _wait_for_logs(live, org, identifier)
    assert logs, "no log line arrived at the ingest URL"
    assert all(line["level"] for line in logs)

    # The integration's default page (.port/resources/pages.json), made by Ocean's
    # POST /v1/pages, draws from the synced catalog.
    page = (await _get(live, org, "/v1/pages/people-dashboard"))["page"]
    board = page["widgets"][0]
    assert [w["id"] for w in board["widgets"]] == ["peopleReadme", "peopleCount", "peopleTable"]
    count = await live.post(
        "/v1/pages/people-dashboard/widgets/peopleCount/data", headers=org.headers
    )
    assert count.status_code == 200 and count.json()["value"] == 7, count.text

    # Someone else's entity in the integration's blueprint: not the integration's to delete.
    manual = await live.post(
        "/v1/blueprints/person/entities",
        headers=org.headers,
        json={"identifier": "manual", "title": "Manual", "relations": {"department": "legal"}},
    )
    assert manual.status_code == 201, manual.text

    _sail(live_server, org, identifier, people=4)
    people = await _entities(live, org, "person")
    assert set(people) == {"manual", "person-0", "person-1", "person-2", "person-3"}
    assert set(await _entities(live, org, "department")) == {"engineering", "finance", "legal"}
    integration = (await _get(live, org, f"/v1/integration/{identifier}"))["integration"]
    assert integration["resyncState"]["status"] == "completed"


async def test_a_polling_integration_resyncs_once_when_nothing_changes(
    live_server: LiveServer, org: Org, live: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Ocean's polling listener resyncs whenever the integration's `updatedAt` differs from
    the last `resyncState.updatedAt` it saw: Portolan keeps them equal after a report, so
    polling every second for several seconds syncs once; a PATCH asks for one more."""
    identifier = "people-poll"
    env = _ocean_env(live_server, org, identifier, 2, '{"type":"POLLING","interval":1}')
    env["PYTHONUNBUFFERED"] = "1"
    log_path = tmp_path / "ocean.log"
    with log_path.open("w") as log:
        proc = _start_sailing(env, log)
        try:
            _wait_for(log_path, RESYNC_DONE, 1, timeout=120)
            await asyncio.sleep(6)  # six polls of an unchanged integration
            assert _count(log_path, RESYNC_START) == 1, log_path.read_text()[-4000:]
            r = await live.patch(f"/v1/integration/{identifier}", headers=org.headers, json={})
            assert r.status_code == 200, r.text
            _wait_for(log_path, RESYNC_DONE, 2, timeout=60)
            await asyncio.sleep(3)
            assert _count(log_path, RESYNC_START) == 2, log_path.read_text()[-4000:]
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _start_sailing(env: dict[str, str], log: IO[str]) -> subprocess.Popen[bytes]:
    _require_ocean()
    return subprocess.Popen(
        [str(OCEAN), "sail", "-p", str(_free_port())],
        cwd=INTEGRATION,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


RESYNC_START = "Detected change in integration, resyncing"
RESYNC_DONE = "Resync finished successfully"


def _count(path: Path, line: str) -> int:
    return path.read_text(errors="replace").count(line)


def _wait_for(path: Path, line: str, count: int, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _count(path, line) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} x {line!r} not seen: {path.read_text()[-4000:]}")
        time.sleep(0.2)
