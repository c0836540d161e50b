"""Scenario: a five-node workflow (trigger -> webhook a -> webhook b -> condition -> webhook
c) walked by a `portolan worker`, beside the single-action dispatch figure of the same run.

The API and the worker run as separate processes against a scratch database; the receiver
(bench/dispatch.py's, in this process) notes when each webhook node's request arrives, by
the run and node its body names. Figures:

- steady: runs started at PORTOLAN_BENCH_WORKFLOW_RATE (default 20/s) for
  PORTOLAN_BENCH_SECONDS x 3. End to end, POST -> the last node's webhook received, p50 /
  p99; node latency, one node moving on to the next (a's request received -> b's), p50 /
  p99; the first node, POST -> a's request received, beside an action run's POST -> its
  webhook received at the same rate on the same API and worker (bench.dispatch's figure).
  Target: the last node reached within 4 x the action run's 150 ms p99 target.
- flat out: 16 clients start runs as fast as they can; completed runs/s (the last node
  reached) and node requests/s.

Every node is checked to arrive exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from app.db.database import Database
from bench.dispatch import TARGET_P99_MS, Receiver, _percentile, _wait_all, _worker
from bench.env import new_org, scratch_settings, served

SECONDS = float(os.environ.get("PORTOLAN_BENCH_SECONDS", "3"))
RATE = float(os.environ.get("PORTOLAN_BENCH_WORKFLOW_RATE", "20"))
TARGET_END_TO_END_P99_MS = 4 * TARGET_P99_MS
FLAT_OUT_CLIENTS = 16
HOOKS = ("a", "b", "c")


class NodeReceiver(Receiver):
    """Notes each webhook node's arrival by (run, node), from the request's body."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[tuple[str, str], float] = {}
        self.repeats = 0

    def note(self, headers: dict[str, str], body: bytes, now: float) -> None:
        if headers.get("webhook-id", "").startswith("wfnr_"):
            sent = json.loads(body)
            key = (str(sent["run"]), str(sent["node"]))
            if key in self.nodes:
                self.repeats += 1
            self.nodes.setdefault(key, now)
        else:
            super().note(headers, body, now)


def _definition(url: str) -> dict[str, Any]:
    def hook(name: str) -> dict[str, Any]:
        return {
            "identifier": name,
            "config": {
                "type": "WEBHOOK",
                "url": f"{url}/{name}",
                "body": {"run": "{{ .workflowRun.identifier }}", "node": name},
            },
        }

    return {
        "identifier": "five",
        "title": "Five nodes",
        "nodes": [
            {
                "identifier": "trigger",
                "config": {
                    "type": "SELF_SERVE_TRIGGER",
                    "userInputs": {"properties": {"n": {"type": "number"}}},
                },
            },
            hook("a"),
            hook("b"),
            {
                "identifier": "check",
                "config": {
                    "type": "CONDITION",
                    "outlets": [
                        {"identifier": "ok", "expression": ".outputs.b.response.status == 200"}
                    ],
                },
            },
            hook("c"),
        ],
        "connections": [
            {"sourceIdentifier": "trigger", "targetIdentifier": "a"},
            {"sourceIdentifier": "a", "targetIdentifier": "b"},
            {"sourceIdentifier": "b", "targetIdentifier": "check"},
            {"sourceIdentifier": "check", "targetIdentifier": "c", "sourceOutletIdentifier": "ok"},
        ],
    }


async def _wait_nodes(receiver: NodeReceiver, ids: list[str], limit: float) -> None:
    deadline = time.monotonic() + limit
    while any((i, "c") not in receiver.nodes for i in ids):
        if time.monotonic() > deadline:
            missing = sum(1 for i in ids if (i, "c") not in receiver.nodes)
            raise RuntimeError(f"{missing} runs did not reach their last node in {limit:.0f} s")
        await asyncio.sleep(0.05)


async def _start(http: httpx.AsyncClient, headers: dict[str, str], n: int) -> str:
    r = await http.post("/v1/workflows/five/runs", json={"inputs": {"n": n}}, headers=headers)
    r.raise_for_status()
    return str(r.json()["workflowRun"]["identifier"])


async def _start_action(http: httpx.AsyncClient, headers: dict[str, str], n: int) -> str:
    r = await http.post("/v1/actions/hook/runs", json={"properties": {"n": n}}, headers=headers)
    r.raise_for_status()
    return str(r.json()["run"]["id"])


async def _paced(
    http: httpx.AsyncClient,
    headers: dict[str, str],
    seconds: float,
    start: Callable[[httpx.AsyncClient, dict[str, str], int], Awaitable[str]],
) -> dict[str, float]:
    """Runs started at RATE for `seconds`: each run's id and when its POST was sent."""
    sent: dict[str, float] = {}
    tasks = []

    async def one(n: int) -> None:
        started = time.perf_counter()
        sent[await start(http, headers, n)] = started

    interval = 1.0 / RATE
    begin = time.perf_counter()
    n = 0
    while time.perf_counter() - begin < seconds:
        tasks.append(asyncio.create_task(one(n)))
        n += 1
        await asyncio.sleep(max(0.0, begin + n * interval - time.perf_counter()))
    await asyncio.gather(*tasks)
    return sent


async def _steady_runs(
    http: httpx.AsyncClient, headers: dict[str, str], receiver: NodeReceiver, seconds: float
) -> dict[str, float]:
    sent = await _paced(http, headers, seconds, _start)
    await _wait_nodes(receiver, list(sent), limit=120)
    return sent


async def _steady_actions(
    http: httpx.AsyncClient, headers: dict[str, str], receiver: NodeReceiver, seconds: float
) -> list[float]:
    sent = await _paced(http, headers, seconds, _start_action)
    await _wait_all(receiver, list(sent))
    return [(receiver.arrivals[i] - t) * 1000 for i, t in sent.items()]


async def _flat_out(
    http: httpx.AsyncClient, headers: dict[str, str], receiver: NodeReceiver, seconds: float
) -> tuple[int, float, float]:
    ids: list[str] = []
    stop = time.perf_counter() + seconds
    begin = time.perf_counter()

    async def client() -> None:
        n = 0
        while time.perf_counter() < stop:
            ids.append(await _start(http, headers, n))
            n += 1

    await asyncio.gather(*(client() for _ in range(FLAT_OUT_CLIENTS)))
    await _wait_nodes(receiver, ids, limit=300)
    elapsed = max(receiver.nodes[(i, "c")] for i in ids) - begin
    return len(ids), len(ids) / elapsed, len(ids) * len(HOOKS) / elapsed


async def run() -> bool:
    async with scratch_settings() as settings:
        receiver = NodeReceiver()
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
                    _, headers = await new_org(db, http, "workflows-bench")
                    url = f"http://127.0.0.1:{receiver.port}"
                    r = await http.post("/v1/workflows", json=_definition(url), headers=headers)
                    r.raise_for_status()
                    action = {
                        "identifier": "hook",
                        "trigger": {
                            "type": "self-service",
                            "operation": "CREATE",
                            "userInputs": {"properties": {"n": {"type": "number"}}},
                        },
                        "invocationMethod": {
                            "type": "WEBHOOK",
                            "url": f"{url}/hook",
                            "body": {"n": "{{ .inputs.n }}", "run": "{{ .run.id }}"},
                        },
                    }
                    r = await http.post("/v1/actions", json=action, headers=headers)
                    r.raise_for_status()
                    await _steady_runs(http, headers, receiver, 1.0)  # warm-up
                    await _steady_actions(http, headers, receiver, 1.0)
                    sent = await _steady_runs(http, headers, receiver, SECONDS * 3)
                    # The action runs' figure at the same rate, on the same API and worker.
                    actions = await _steady_actions(http, headers, receiver, SECONDS * 3)
                    count, runs_per_second, nodes_per_second = await _flat_out(
                        http, headers, receiver, SECONDS * 2
                    )
        finally:
            worker.terminate()
            worker.wait(10)
            await db.close()
            await receiver.stop()
    nodes = receiver.nodes
    end_to_end = [(nodes[(i, "c")] - t) * 1000 for i, t in sent.items()]
    first = [(nodes[(i, "a")] - t) * 1000 for i, t in sent.items()]
    hop = [(nodes[(i, "b")] - nodes[(i, "a")]) * 1000 for i in sent]
    e50, e99 = statistics.median(end_to_end), _percentile(end_to_end, 0.99)
    met = e99 <= TARGET_END_TO_END_P99_MS
    ok = met and receiver.repeats == 0
    print(
        f"  steady {RATE:.0f} runs/s, {len(sent)} runs of 5 nodes: POST -> last node's "
        f"webhook received p50 {e50:.1f} ms, p99 {e99:.1f} ms (target p99 <= "
        f"{TARGET_END_TO_END_P99_MS:.0f} ms: {'PASS' if met else 'FAIL'})"
    )
    print(
        f"  node latency (webhook a received -> webhook b received): "
        f"p50 {statistics.median(hop):.1f} ms, p99 {_percentile(hop, 0.99):.1f} ms"
    )
    print(
        f"  first node, POST -> webhook a received: p50 {statistics.median(first):.1f} ms, "
        f"p99 {_percentile(first, 0.99):.1f} ms"
    )
    print(
        f"  action run at {RATE:.0f} runs/s, same API and worker (bench.dispatch's figure): "
        "POST -> webhook received "
        f"p50 {statistics.median(actions):.1f} ms, p99 {_percentile(actions, 0.99):.1f} ms"
    )
    print(
        f"  flat out, {FLAT_OUT_CLIENTS} clients: {count} runs, {runs_per_second:.1f} runs/s "
        f"completed ({nodes_per_second:.0f} webhook nodes/s); node requests received twice: "
        f"{receiver.repeats}"
    )
    return ok
