"""Benchmark environment: a scratch database and Redis, a served app, a raw HTTP load driver."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx

from app.cli import run_migrations
from app.config import Settings
from app.db.database import Database
from app.kit.crypto import cipher_for
from app.orgs import service as org_service

ROOT = Path(__file__).resolve().parent.parent
ADMIN_URL = os.environ.get(
    "PORTOLAN_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
LOG_PATH = Path(os.environ.get("PORTOLAN_BENCH_LOG", str(ROOT / ".portolan" / "bench-server.log")))
REDIS_URL = os.environ.get("PORTOLAN_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def _with_database(url: str, database: str) -> str:
    head, _, tail = url.partition("?")
    return f"{head.rsplit('/', 1)[0]}/{database}" + (f"?{tail}" if tail else "")


@asynccontextmanager
async def scratch_settings() -> AsyncIterator[Settings]:
    """A freshly migrated database for one bench run, dropped afterwards (kept, and named,
    when PORTOLAN_BENCH_KEEP is set: for looking at plans after a run)."""
    name = f"portolan_bench_{uuid.uuid4().hex[:10]}"
    keep = bool(os.environ.get("PORTOLAN_BENCH_KEEP"))
    admin = await asyncpg.connect(ADMIN_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        env="test",
        database_url=_with_database(ADMIN_URL, name),
        redis_url=REDIS_URL,
        log_level="WARNING",
        queue_name=f"portolan-bench:{name}",
    )
    try:
        await asyncio.to_thread(run_migrations, settings)
        yield settings
    finally:
        if keep:
            print(f"kept database {name}")
        else:
            admin = await asyncpg.connect(ADMIN_URL)
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()


async def new_org(
    db: Database, http: httpx.AsyncClient, name: str, blueprints: Sequence[dict[str, Any]] = ()
) -> tuple[uuid.UUID, dict[str, str]]:
    """An org with its blueprints, and headers carrying its access token."""
    async with db.system() as tx:
        created = await org_service.create_org(
            tx,
            name=name,
            cipher=cipher_for(Settings(_env_file=None)),  # type: ignore[call-arg]
        )
    token = (
        await http.post(
            "/v1/auth/access_token",
            json={"clientId": created.client_id, "clientSecret": created.client_secret},
        )
    ).json()["accessToken"]
    headers = {"Authorization": f"Bearer {token}", "content-type": "application/json"}
    for body in blueprints:
        (await http.post("/v1/blueprints", json=body, headers=headers)).raise_for_status()
    return created.org_id, headers


def _pinned(cpu: int) -> list[str]:
    """Pin the server and the load driver to different cores (when there are two and
    taskset exists), so the driver never steals the server's core mid-measurement."""
    if (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
        return ["taskset", "-c", str(cpu)]
    return []


def pin_driver(cpu: int = 1) -> None:
    """Run this process (a scenario's own clients) on the driver's core, off the server's."""
    if _pinned(cpu) and hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {cpu})


async def pin_database_backends(settings: Settings, cpu: int = 1) -> int:
    """Move the PostgreSQL backends serving the bench server (and the local Redis) onto the
    driver's core.

    In production the database has its own machine; on a 2-core bench box its backends
    would otherwise share the server's core and the figure would mostly measure that.
    Returns how many backends were pinned (0 where taskset or permissions are missing)."""
    if not _pinned(cpu):
        return 0
    conn = await asyncpg.connect(settings.database_url)
    try:
        pids = [
            r["pid"]
            for r in await conn.fetch(
                "SELECT pid FROM pg_stat_activity "
                "WHERE (application_name = 'portolan' OR application_name LIKE 'portolan/org/%') "
                "AND datname = current_database()"
            )
        ]
    finally:
        await conn.close()
    pids += _redis_servers(settings.redis_url or "")
    pinned = 0
    for pid in pids:
        done = subprocess.run(  # noqa: ASYNC221 - a few instant calls, bench only
            ["taskset", "-p", "-c", str(cpu), str(pid)], capture_output=True, check=False
        )
        pinned += done.returncode == 0
    return pinned


def _redis_servers(url: str) -> list[int]:
    """The local Redis serving `url` (it has no machine of its own here either)."""
    port = str(urlsplit(url).port or 6379)
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    words = cmdline.read().split(b"\0")
            except OSError:
                continue
            name = words[0].split(b" ")[0] if words else b""
            if name.endswith(b"redis-server") and f":{port}".encode() in b" ".join(words):
                found.append(int(entry))
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def served(
    settings: Settings, *, worker: bool = True, env: dict[str, str] | None = None
) -> Iterator[int]:
    """Runs bench.server (the real app + a bare route) in its own process (with its
    in-process worker unless `worker=False`; `env`: settings of the scenario's own)."""
    port = free_port()
    env = {
        **os.environ,
        **({} if worker else {"PORTOLAN_BENCH_NO_WORKER": "1"}),
        "PORTOLAN_DATABASE_URL": settings.database_url or "",
        "PORTOLAN_REDIS_URL": settings.redis_url or "",
        "PORTOLAN_QUEUE_NAME": settings.queue_name,
        "PORTOLAN_LOG_LEVEL": "WARNING",
        "PORTOLAN_ENV": "test",
        # Limits on, so their cost is in every figure, but far above what a scenario sends.
        **{
            f"PORTOLAN_RATE_LIMIT_{kind}": "1000000000"
            for kind in ("ENTITY_READS", "ENTITY_WRITES", "SEARCH", "OTHER")
        },
        **(env or {}),
    }
    LOG_PATH.parent.mkdir(parents=True, exist_ok=True)
    log = LOG_PATH.open("ab")
    proc = subprocess.Popen(
        [*_pinned(0), sys.executable, "-m", "bench.server", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("bench server did not start")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # still draining streams or jobs: stop it
            proc.kill()
            proc.wait(10)
        log.close()


@dataclass
class LoadResult:
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def load(
    port: int,
    path: str,
    *,
    headers: dict[str, str],
    seconds: float,
    connections: int,
    method: str = "GET",
    bodies: list[str] | None = None,
) -> LoadResult:
    """Drives `path` from a separate process (bench.load), so the server keeps a core: GETs,
    or POSTs cycling through `bodies`."""
    spec = json.dumps(
        {
            "port": port,
            "path": path,
            "headers": headers,
            "seconds": seconds,
            "connections": connections,
            "method": method,
            "bodies": bodies,
        }
    )
    out = subprocess.run(
        [*_pinned(1), sys.executable, "-m", "bench.load"],
        cwd=ROOT,
        input=spec,
        capture_output=True,
        text=True,
        check=True,
    )
    data = json.loads(out.stdout)
    return LoadResult(**data)


async def settle_range_indexes(url: str) -> int:
    """Runs a range-index reconcile pass (the worker's job, app/search/indexes.py) to the
    end, waiting while the served worker holds the maintenance lock; returns how many range
    indexes exist."""
    from app.search import indexes

    for _ in range(600):
        if not (await indexes.reconcile(url, min_entities=10_000)).skipped:
            break
        await asyncio.sleep(0.5)
    conn = await asyncpg.connect(url)
    try:
        return int(
            await conn.fetchval("SELECT count(*) FROM pg_indexes WHERE indexname LIKE 'ixr%'")
        )
    finally:
        await conn.close()


# The columns of an `entities` row as the benches COPY them, in this order.
ENTITY_COLUMNS = [
    "org_id",
    "blueprint",
    "identifier",
    "title",
    "team",
    "properties",
    "datasource",
    "created_at",
    "created_by",
    "updated_at",
    "updated_by",
]


async def copy_connection(url: str) -> asyncpg.Connection:
    """A connection for loading rows with binary COPY (jsonb's binary form is a version
    byte and the text)."""
    conn = await asyncpg.connect(url)
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda value: b"\x01" + json.dumps(value).encode(),
        decoder=lambda data: json.loads(data[1:]),
        schema="pg_catalog",
        format="binary",
    )
    return conn
