"""The `portolan` command, run as a real subprocess against the test database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from app.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def _run(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PORTOLAN_DATABASE_URL": settings.database_url or "",
        "PORTOLAN_REDIS_URL": settings.redis_url or "",
        "PORTOLAN_LOG_LEVEL": "WARNING",
    }
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_org_create_json_prints_credentials_that_work(
    settings: Settings, client: httpx.AsyncClient
) -> None:
    result = _run(settings, "org", "create", "Initech", "--json")
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    assert set(created) == {"orgId", "name", "clientId", "clientSecret", "signingSecret"}
    token = await client.post(
        "/v1/auth/access_token",
        json={"clientId": created["clientId"], "clientSecret": created["clientSecret"]},
    )
    assert token.status_code == 200


def test_org_create_refuses_a_blank_name(settings: Settings) -> None:
    result = _run(settings, "org", "create", "   ")
    assert result.returncode == 2 and "error" in result.stderr


def test_migrate_is_idempotent(settings: Settings) -> None:
    result = _run(settings, "migrate")
    assert result.returncode == 0, result.stderr


def test_openapi_check_passes_for_the_committed_document(settings: Settings) -> None:
    result = _run(settings, "openapi", "--check")
    assert result.returncode == 0, result.stderr


def test_openapi_check_fails_for_a_stale_document(settings: Settings, tmp_path: Path) -> None:
    stale = tmp_path / "openapi.json"
    stale.write_text("{}\n")
    result = _run(settings, "openapi", "--check", "--path", str(stale))
    assert result.returncode == 1 and "stale" in result.stderr
