"""Faults in dispatch: every run the API acknowledged reaches the receiver, which dedupes by
run id (`webhook-id`), whatever happens to the queue or the workers in between.

- Redis stops while 200 runs are being created, and comes back empty.
- The worker process is killed with SIGKILL while deliveries are in flight, then started again.
- (The receiver answering 503 for a while: tests/test_dispatch.py.)
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from arq import create_pool
from arq.connections import RedisSettings
from redis.asyncio import Redis

from app.config import Settings
from app.db.database import Database
from app.dispatch.relay import relay_once
from tests.conftest import Org, OrgFactory
from tests.receivers import WebhookReceiver
from tests.test_dispatch import catalog, define, self_service, signing_secret, start_run

REDIS_SERVER = "redis-server"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisProcess:
    """A redis-server of the test's own, which the test can stop and start again."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def _spawn(self) -> None:
        self._process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def start(self) -> None:
        self._spawn()
        client = Redis.from_url(self.url)
        try:
            for _ in range(100):
                try:
                    if await client.ping():
                        return
                except Exception:
                    await asyncio.sleep(0.05)
            raise AssertionError("redis-server did not start")
        finally:
            await client.aclose()

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait(10)
            self._process = None


@pytest.fixture
async def own_redis() -> AsyncIterator[RedisProcess]:
    if shutil.which(REDIS_SERVER) is None:
        pytest.fail("redis-server is required for the dispatch fault tests")
    redis = RedisProcess(_free_port())
    await redis.start()
    try:
        yield redis
    finally:
        redis.stop()


async def _states(db: Database, org: Org) -> dict[str, int]:
    async with db.system() as tx:
        rows = await tx.fetch(
            "SELECT dispatch_state, count(*) AS n FROM action_runs WHERE org_id = $1 GROUP BY 1",
            org.org_id,
        )
    return {r["dispatch_state"]: r["n"] for r in rows}


async def test_runs_created_while_redis_is_down_are_all_delivered(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    start_worker: Callable[..., Settings],
    own_redis: RedisProcess,
    db: Database,
) -> None:
    org = await make_org()
    await catalog(client, org)
    with WebhookReceiver(await signing_secret(client, org)) as receiver:
        await define(client, org, self_service("hook", {"type": "WEBHOOK", "url": receiver.url}))
        start_worker(redis_url=own_redis.url, dispatch_requeue_seconds=2.0)
        ids: list[str] = []
        for batch in range(10):
            if batch == 3:
                own_redis.stop()  # mid-way: jobs already queued in it are lost with it
            ids += await asyncio.gather(
                *(start_run(client, org, "hook", {"name": f"r{batch}-{i}"}) for i in range(20))
            )
        assert len(set(ids)) == 200
        await asyncio.sleep(1.0)
        await own_redis.start()  # empty: nothing it held before survives
        await receiver.wait_unique(200, timeout=90)
        assert receiver.unique_run_ids() == set(ids)
        deadline = time.monotonic() + 30
        while (states := await _states(db, org)) != {"delivered": 200}:
            assert time.monotonic() < deadline, states
            await asyncio.sleep(0.1)
        # (Every run id above came from a correctly signed delivery. A request cut off when
        # Redis went away — arq cancels the jobs in flight as its loop stops — reaches the
        # receiver short of its body and fails its signature check; its run was
        # dispatched again.)


@pytest.fixture
def worker_process(settings: Settings) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    portolan = Path(sys.executable).with_name("portolan")

    def _start(**env: str) -> subprocess.Popen[bytes]:
        assert settings.database_url is not None and settings.redis_url is not None
        environment = {
            **os.environ,
            "PORTOLAN_ENV": "test",
            "PORTOLAN_DATABASE_URL": settings.database_url,
            "PORTOLAN_REDIS_URL": settings.redis_url,
            "PORTOLAN_ENCRYPTION_KEY": settings.encryption_key.get_secret_value(),
            "PORTOLAN_OUTBOUND_ALLOW": "127.0.0.1/32",
            "PORTOLAN_DISPATCH_LEASE_SECONDS": "2",
            "PORTOLAN_DISPATCH_REQUEUE_SECONDS": "2",
            "PORTOLAN_DISPATCH_RETRY_BASE_SECONDS": "0.05",
            "PORTOLAN_LOG_LEVEL": "WARNING",
            **env,
        }
        process = subprocess.Popen(
            [str(portolan), "worker"],
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(process)
        return process

    yield _start
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(10)


async def test_a_worker_killed_mid_dispatch_loses_nothing(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    worker_process: Callable[..., subprocess.Popen[bytes]],
    settings: Settings,
    db: Database,
) -> None:
    org = await make_org()
    await catalog(client, org)
    queue = f"portolan-test:kill-{os.getpid()}-{time.monotonic_ns()}"
    with WebhookReceiver(await signing_secret(client, org), delay=0.8) as receiver:
        await define(client, org, self_service("slow", {"type": "WEBHOOK", "url": receiver.url}))
        ids = list(
            await asyncio.gather(
                *(start_run(client, org, "slow", {"name": f"k{i}"}) for i in range(80))
            )
        )
        first = worker_process(PORTOLAN_QUEUE_NAME=queue)
        # Wait until requests are in flight at the receiver, then kill the worker outright.
        await receiver.wait_requests(10, timeout=30)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        seen_before = len(receiver.unique_run_ids())
        assert seen_before < 80, "the worker finished before it could be killed"
        worker_process(PORTOLAN_QUEUE_NAME=queue)
        await receiver.wait_unique(80, timeout=90)
        assert receiver.unique_run_ids() == set(ids)
        deadline = time.monotonic() + 30
        while (states := await _states(db, org)) != {"delivered": 80}:
            assert time.monotonic() < deadline, states
            await asyncio.sleep(0.1)
        # Some runs were claimed by the killed worker and went to a second attempt.
        async with db.system() as tx:
            swept = await tx.fetchval(
                "SELECT count(DISTINCT run_id) FROM action_run_logs WHERE org_id = $1 "
                "AND message LIKE 'attempt 1 did not finish%'",
                org.org_id,
            )
        assert swept >= 1


async def test_jobs_lost_by_redis_are_handed_to_the_queue_again(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    start_worker: Callable[..., Settings],
    own_redis: RedisProcess,
    db: Database,
) -> None:
    """The relay handed the runs to Redis, which then restarted empty before any worker took
    them: no claim ever comes, so the relay hands them again."""
    org = await make_org()
    await catalog(client, org)
    with WebhookReceiver(await signing_secret(client, org)) as receiver:
        await define(client, org, self_service("hook", {"type": "WEBHOOK", "url": receiver.url}))
        ids = [await start_run(client, org, "hook", {"name": f"l{i}"}) for i in range(10)]
        queue = f"portolan-test:lost-{time.monotonic_ns()}"
        pool = await create_pool(RedisSettings.from_dsn(own_redis.url), default_queue_name=queue)
        try:
            assert await relay_once(db, pool, requeue_seconds=1.0) >= 10
            assert await pool.zcard(queue) >= 10
        finally:
            await pool.aclose()
        own_redis.stop()
        await own_redis.start()  # empty
        start_worker(redis_url=own_redis.url, queue_name=queue, dispatch_requeue_seconds=1.0)
        await receiver.wait_unique(10, timeout=30)
        assert receiver.unique_run_ids() == set(ids)


async def test_one_orgs_backlog_does_not_hold_up_another_orgs_runs(
    client: httpx.AsyncClient, make_org: OrgFactory, settings: Settings, db: Database
) -> None:
    """An org with its share of runs in flight waits in the outbox; another org's run is
    handed to the workers in the same pass."""
    noisy, quiet = await make_org(), await make_org()
    for org in (noisy, quiet):
        await catalog(client, org)
        await define(
            client, org, self_service("hook", {"type": "WEBHOOK", "url": "https://hooks.test/x"})
        )
    for i in range(6):
        await start_run(client, noisy, "hook", {"name": f"n{i}"})
    await start_run(client, quiet, "hook", {"name": "q"})

    async def relayed(org: Org) -> int:
        async with db.system() as tx:
            return int(
                await tx.fetchval(
                    "SELECT count(*) FROM dispatch_outbox WHERE org_id = $1 "
                    "AND relayed_at IS NOT NULL",
                    org.org_id,
                )
            )

    queue = f"portolan-test:fair-{time.monotonic_ns()}"
    pool = await create_pool(
        RedisSettings.from_dsn(settings.redis_url or ""), default_queue_name=queue
    )
    try:
        await relay_once(db, pool, requeue_seconds=60, org_cap=2)
        assert (await relayed(noisy), await relayed(quiet)) == (2, 1)
        await relay_once(db, pool, requeue_seconds=60, org_cap=2)
        assert await relayed(noisy) == 2  # its two are still in flight
    finally:
        await pool.delete(queue)
        await pool.aclose()


async def test_the_relay_does_not_spin_on_runs_held_back_by_their_orgs_cap(
    client: httpx.AsyncClient,
    make_org: OrgFactory,
    settings: Settings,
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from app.dispatch import relay as relay_module

    org = await make_org()
    await catalog(client, org)
    await define(
        client, org, self_service("hook", {"type": "WEBHOOK", "url": "https://hooks.test/x"})
    )
    for i in range(3):
        await start_run(client, org, "hook", {"name": f"n{i}"})
    looks = 0
    real = relay_module._seconds_to_next

    async def counted(*args: object) -> float | None:
        nonlocal looks
        looks += 1
        return await real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(relay_module, "_seconds_to_next", counted)
    queue = f"portolan-test:spin-{time.monotonic_ns()}"
    relay = relay_module.Relay(
        settings.model_copy(update={"queue_name": queue, "dispatch_org_concurrency": 1}), db
    )
    relay.start()
    try:
        await asyncio.sleep(1.5)
    finally:
        await relay.stop()
        pool = await create_pool(RedisSettings.from_dsn(settings.redis_url or ""))
        await pool.delete(queue)
        await pool.aclose()
    assert looks <= 15, looks  # a few looks a second, not a busy loop
