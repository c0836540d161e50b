"""`portolan serve` and `portolan up` as real processes: what `make run` promises."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from arq import create_pool
from arq.connections import RedisSettings

from app.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTOLAN_")}
    env.update(extra)
    return env


@contextmanager
def _process(args: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _wait_ready(port: int, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"server exited early: {proc.stdout.read() if proc.stdout else ''}"
            )
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become ready")


async def test_serve_runs_the_api_and_an_in_process_worker(settings: Settings) -> None:
    port = _free_port()
    queue = f"portolan-test:{uuid.uuid4().hex}"
    env = _clean_env(
        PORTOLAN_DATABASE_URL=settings.database_url or "",
        PORTOLAN_REDIS_URL=settings.redis_url or "",
        PORTOLAN_QUEUE_NAME=queue,
        PORTOLAN_LOG_LEVEL="WARNING",
    )
    with _process(["serve", "--port", str(port)], env) as proc:
        _wait_ready(port, proc)
        pool = await create_pool(
            RedisSettings.from_dsn(settings.redis_url or ""), default_queue_name=queue
        )
        try:
            job = await pool.enqueue_job("ping", "from-the-test")
            assert job is not None
            assert await job.result(timeout=20) == "from-the-test"
        finally:
            await pool.aclose()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_up_with_no_urls_starts_embedded_servers_and_a_demo_org_with_the_starter_catalog(
    tmp_path: Path,
) -> None:
    port = _free_port()
    env = _clean_env(PORTOLAN_DATA_DIR=str(tmp_path / "data"), PORTOLAN_LOG_LEVEL="WARNING")
    with _process(["up", "--port", str(port)], env) as proc:
        assert proc.stdout is not None
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")))
        reader.start()
        deadline = time.monotonic() + 120
        printed = ""
        while "}" not in printed.split("Created the demo organization", 1)[-1]:
            assert time.monotonic() < deadline and proc.poll() is None, printed
            time.sleep(0.2)
            printed = "".join(lines)
        start = printed.index("{", printed.index("Created the demo organization"))
        creds = json.loads(printed[start : printed.index("}", start) + 1])
        _wait_ready(port, proc)
        base = f"http://127.0.0.1:{port}"
        token = httpx.post(
            f"{base}/v1/auth/access_token",
            json={"clientId": creds["clientId"], "clientSecret": creds["clientSecret"]},
        ).json()["accessToken"]
        headers = {"Authorization": f"Bearer {token}"}
        org = httpx.get(f"{base}/v1/organization", headers=headers)
        assert org.json()["organization"]["id"] == creds["orgId"]
        while "Applied:" not in printed:
            assert time.monotonic() < deadline and proc.poll() is None, printed
            time.sleep(0.2)
            printed = "".join(lines)
        assert "Applied: 9 created" in printed, printed
        blueprints = httpx.get(f"{base}/v1/blueprints", headers=headers).json()["blueprints"]
        assert sorted(b["identifier"] for b in blueprints) == [
            "deployment",
            "environment",
            "incident",
            "service",
            "team",
        ]
        actions = httpx.get(f"{base}/v1/actions", headers=headers).json()["actions"]
        assert sorted(a["identifier"] for a in actions) == ["create-service", "deploy"]
        saved = json.loads((tmp_path / "data" / "demo-credentials.json").read_text())
        assert saved == creds
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
