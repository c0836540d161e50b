"""Scenario: POST a run -> its webhook received, at steady load and flat out, beside a bare
arq enqueue -> job start on the same Redis and worker.

The API and a `portolan worker` run as separate processes against a scratch database; the
receiver is a minimal HTTP server in this process that notes when each run's delivery
arrives (by its `webhook-id`, the run id). Latency is from just before the POST is sent to
the delivery's arrival: the run's transaction, the outbox, the relay's wake-up on commit,
the queue, the worker's claim, template rendering in the jq process, signing and the call.

- steady: runs at a fixed rate (PORTOLAN_BENCH_DISPATCH_RATE, default 50/s) for
  PORTOLAN_BENCH_SECONDS x 3; p50 / p99. Target p99 <= 150 ms.
- flat out: 32 clients create runs as fast as they can; runs/s delivered.
- bare: `ping` jobs enqueued with arq at the same rate; job start - enqueue (arq's times).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx
from arq import create_pool
from arq.connections import RedisSettings

from app.db.database import Database
from bench.env import ROOT, new_org, scratch_settings, served

SECONDS = float(os.environ.get("PORTOLAN_BENCH_SECONDS", "3"))
RATE = float(os.environ.get("PORTOLAN_BENCH_DISPATCH_RATE", "50"))
TARGET_P99_MS = 150.0
FLAT_OUT_CLIENTS = 32


class Receiver:
    """The smallest HTTP server that answers 200 (after `delay` seconds) and notes each
    delivery's arrival (`note`: here, by its `webhook-id`, the run id)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.arrivals: dict[str, float] = {}
        self.deliveries = 0
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    def note(self, headers: dict[str, str], body: bytes, now: float) -> None:
        run_id = headers.get("webhook-id")
        if run_id is not None:
            self.arrivals.setdefault(run_id, now)
            self.deliveries += 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                now = time.perf_counter()
                headers = {}
                for line in head.decode("latin-1").split("\r\n")[1:]:
                    if ":" in line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0"))
                body = await reader.readexactly(length) if length else b""
                self.note(headers, body, now)
                if self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client went away, or the receiver is stopping
        finally:
            writer.close()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _wait_all(receiver: Receiver, ids: list[str], limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while any(i not in receiver.arrivals for i in ids):
        if time.monotonic() > deadline:
            missing = sum(1 for i in ids if i not in receiver.arrivals)
            raise RuntimeError(f"{missing} runs were not delivered within {limit:.0f} s")
        await asyncio.sleep(0.05)


async def _steady(
    http: httpx.AsyncClient, headers: dict[str, str], receiver: Receiver, seconds: float
) -> list[float]:
    sent: dict[str, float] = {}
    tasks = []

    async def one(n: int) -> None:
        started = time.perf_counter()
        r = await http.post("/v1/actions/hook/runs", json={"properties": {"n": n}}, headers=headers)
        r.raise_for_status()
        sent[r.json()["run"]["id"]] = started

    interval = 1.0 / RATE
    begin = time.perf_counter()
    n = 0
    while time.perf_counter() - begin < seconds:
        tasks.append(asyncio.create_task(one(n)))
        n += 1
        await asyncio.sleep(max(0.0, begin + n * interval - time.perf_counter()))
    await asyncio.gather(*tasks)
    ids = list(sent)
    await _wait_all(receiver, ids)
    return [(receiver.arrivals[i] - sent[i]) * 1000 for i in ids]


async def _flat_out(
    http: httpx.AsyncClient, headers: dict[str, str], receiver: Receiver, seconds: float
) -> tuple[int, float]:
    ids: list[str] = []
    stop = time.perf_counter() + seconds
    begin = time.perf_counter()

    async def client() -> None:
        n = 0
        while time.perf_counter() < stop:
            r = await http.post(
                "/v1/actions/hook/runs", json={"properties": {"n": n}}, headers=headers
            )
            r.raise_for_status()
            ids.append(r.json()["run"]["id"])
            n += 1

    await asyncio.gather(*(client() for _ in range(FLAT_OUT_CLIENTS)))
    await _wait_all(receiver, ids, limit=300)
    last = max(receiver.arrivals[i] for i in ids)
    return len(ids), len(ids) / (last - begin)


async def _bare(redis: RedisSettings, queue: str, seconds: float) -> list[float]:
    pool = await create_pool(redis, default_queue_name=queue)
    jobs = []
    interval = 1.0 / RATE
    begin = time.perf_counter()
    n = 0
    try:
        while time.perf_counter() - begin < seconds:
            job = await pool.enqueue_job("ping", str(n))
            assert job is not None
            jobs.append(job)
            n += 1
            await asyncio.sleep(max(0.0, begin + n * interval - time.perf_counter()))
        delays = []
        for job in jobs:
            await job.result(timeout=30)
            info = await job.result_info()
            assert info is not None
            delays.append((info.start_time - info.enqueue_time).total_seconds() * 1000)
        return delays
    finally:
        await pool.aclose()


def _worker(settings: Any) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PORTOLAN_DATABASE_URL": settings.database_url,
        "PORTOLAN_REDIS_URL": settings.redis_url,
        "PORTOLAN_QUEUE_NAME": settings.queue_name,
        "PORTOLAN_OUTBOUND_ALLOW": "127.0.0.1/32",
        "PORTOLAN_LOG_LEVEL": "WARNING",
        "PORTOLAN_ENV": "test",
    }
    portolan = os.path.join(os.path.dirname(sys.executable), "portolan")
    return subprocess.Popen([portolan, "worker"], cwd=ROOT, env=env)


async def run() -> bool:
    async with scratch_settings() as settings:
        receiver = Receiver()
        await receiver.start()
        db = await Database.connect(settings)
        worker = _worker(settings)
        try:
            with served(settings, worker=False) as port:
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{port}",
                    timeout=30,
                    limits=httpx.Limits(max_connections=64),
                ) as http:
                    _, headers = await new_org(db, http, "dispatch-bench")
                    action = {
                        "identifier": "hook",
                        "trigger": {
                            "type": "self-service",
                            "operation": "CREATE",
                            "userInputs": {"properties": {"n": {"type": "number"}}},
                        },
                        "invocationMethod": {
                            "type": "WEBHOOK",
                            "url": f"http://127.0.0.1:{receiver.port}/hook",
                            "body": {"n": "{{ .inputs.n }}", "run": "{{ .run.id }}"},
                        },
                    }
                    r = await http.post("/v1/actions", json=action, headers=headers)
                    r.raise_for_status()
                    await _steady(http, headers, receiver, 1.0)  # warm-up
                    latencies = await _steady(http, headers, receiver, SECONDS * 3)
                    bare = await _bare(
                        RedisSettings.from_dsn(settings.redis_url or ""),
                        settings.queue_name,
                        SECONDS * 3,
                    )
                    count, per_second = await _flat_out(http, headers, receiver, SECONDS * 2)
        finally:
            worker.terminate()
            worker.wait(10)
            await db.close()
            await receiver.stop()
    p50, p99 = statistics.median(latencies), _percentile(latencies, 0.99)
    b50, b99 = statistics.median(bare), _percentile(bare, 0.99)
    ok = p99 <= TARGET_P99_MS
    print(
        f"  steady {RATE:.0f} runs/s, {len(latencies)} runs: POST -> webhook received "
        f"p50 {p50:.1f} ms, p99 {p99:.1f} ms (target p99 <= {TARGET_P99_MS:.0f} ms: "
        f"{'PASS' if ok else 'FAIL'})"
    )
    print(
        f"  bare arq enqueue -> job start, same rate: p50 {b50:.1f} ms, p99 {b99:.1f} ms "
        f"(arq's clock, ms resolution)"
    )
    print(
        f"  flat out, {FLAT_OUT_CLIENTS} clients: {count} runs, {per_second:.0f} runs/s "
        f"created and delivered; {receiver.deliveries} deliveries for "
        f"{len(receiver.arrivals)} runs"
    )
    return ok
