"""Scenario: noisy neighbour. Org A's latencies alone and while org B does its worst within
its limits, in alternating rounds; printed as ratios (target: every ratio <= 2x).

One server (the API with its in-process worker, as `portolan serve` runs it). Org A has a
blueprint with a calculation property, entities, and an automation that calls a webhook
when an entity changes. A's operations, each round:
- read: GET one entity (its calculated value included);
- search: POST /v1/blueprints/svc/entities/search, a filter over A's entities;
- upsert: POST one entity (upsert);
- automation: an entity change -> the automation's webhook received.

B, in its noisy rounds, at once (each kind paced at B's sustained rate limit): reads of
entities whose calculation loops until its time limit; entity writes whose automation
condition loops, and whose other automation's receiver answers after 10 s; runs of an
action whose template loops; run-log live streams past its cap; a scorecard rewritten
every second (a whole-blueprint evaluation each time); incoming webhook events whose
mapping loops, at twice the webhook's rate limit. PORTOLAN_BENCH_NOISY_ONLY (e.g.
`write,run`) narrows B to some kinds. B's clients run in a process of their own at the
lowest CPU priority, connecting from an address of their own (they stand for B's
machines), and the rates B achieved are printed for
each round. The ceiling is A's own figure in the quiet rounds of the same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import queue
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from app.db.database import Database
from bench import dispatch as bench_dispatch
from bench.env import new_org, pin_database_backends, pin_driver, scratch_settings, served

# 10 x 100: each p99 is the 20th worst of 2,000 operations (over 6 x 50 it was the 3rd
# worst of 300, and moved by 2x from run to run).
ROUNDS = int(os.environ.get("PORTOLAN_BENCH_NOISY_ROUNDS", "10"))
OPS_PER_ROUND = int(os.environ.get("PORTOLAN_BENCH_NOISY_OPS", "100"))
TARGET_RATIO = 2.0
# A's and B's machines: each client connects from an address of its own (on loopback), as
# two tenants' clients would; the server counts a request for its client's address until
# its token is verified.
A_ADDRESS = "127.0.0.2"
B_ADDRESS = "127.0.0.3"
LOOP = "def f: f; f"


class Receiver(bench_dispatch.Receiver):
    """Notes when each delivery's `marker` arrives (the automation's body carries it)."""

    def note(self, headers: dict[str, str], body: bytes, now: float) -> None:
        with contextlib.suppress(ValueError, AttributeError):
            marker = json.loads(body or b"{}").get("marker")
            if marker is not None:
                self.arrivals.setdefault(str(marker), now)


def _blueprint(identifier: str, calculation: str) -> dict[str, Any]:
    return {
        "identifier": identifier,
        "title": identifier,
        "schema": {"properties": {"n": {"type": "number"}, "tier": {"type": "string"}}},
        "calculationProperties": {"calc": {"calculation": calculation, "type": "number"}},
    }


def _automation(identifier: str, blueprint: str, url: str, condition: str | None) -> dict[str, Any]:
    trigger: dict[str, Any] = {
        "type": "automation",
        "event": {"type": "ENTITY_UPDATED", "blueprintIdentifier": blueprint},
    }
    if condition is not None:
        trigger["condition"] = {"type": "JQ", "expressions": [condition], "combinator": "and"}
    return {
        "identifier": identifier,
        "title": identifier,
        "trigger": trigger,
        "invocationMethod": {
            "type": "WEBHOOK",
            "url": url,
            "body": {"marker": "{{ .event.diff.after.properties.tier }}"},
        },
    }


async def _setup_a(http: httpx.AsyncClient, headers: dict[str, str], url: str) -> None:
    entities = [{"identifier": f"a{i}", "properties": {"n": i, "tier": "x"}} for i in range(500)]
    r = await http.post(
        "/v1/blueprints/svc/entities/bulk?upsert=true", json={"entities": entities}, headers=headers
    )
    r.raise_for_status()
    r = await http.post(
        "/v1/actions", json=_automation("notify", "svc", url, None), headers=headers
    )
    r.raise_for_status()


async def _setup_b(
    http: httpx.AsyncClient, headers: dict[str, str], slow_url: str
) -> dict[str, Any]:
    entities = [
        {"identifier": f"b{i}", "properties": {"n": i, "tier": "gold" if i % 2 else "bronze"}}
        for i in range(5000)
    ]
    for start in range(0, len(entities), 1000):
        r = await http.post(
            "/v1/blueprints/noisy/entities/bulk?upsert=true",
            json={"entities": entities[start : start + 1000]},
            headers=headers,
        )
        r.raise_for_status()
    hold = {
        "identifier": "hold",
        "title": "hold",
        "trigger": {
            "type": "self-service",
            "operation": "CREATE",
            "blueprintIdentifier": "noisy",
            "userInputs": {"properties": {}},
        },
        "invocationMethod": {"type": "WEBHOOK", "url": slow_url},
    }
    loop_template = {
        **hold,
        "identifier": "slow-template",
        "invocationMethod": {
            "type": "WEBHOOK",
            "url": slow_url,
            "body": {"x": "{{ " + LOOP + " }}"},
        },
    }
    for action in (
        _automation("slow-condition", "noisy", slow_url, LOOP),
        _automation("slow-receiver", "noisy", slow_url, None),
        hold,
        loop_template,
    ):
        (await http.post("/v1/actions", json=action, headers=headers)).raise_for_status()
    webhook = {
        "identifier": "flood",
        "title": "flood",
        "mappings": [
            {"blueprint": "noisy", "entity": {"identifier": LOOP, "properties": {"n": ".body.n"}}}
        ],
    }
    r = await http.post("/v1/webhooks", json=webhook, headers=headers)
    r.raise_for_status()
    key = r.json()["integration"]["webhookKey"]
    # A run that stays IN_PROGRESS (its receiver never reports): B's streams watch it.
    r = await http.post("/v1/actions/hold/runs", json={"properties": {}}, headers=headers)
    r.raise_for_status()
    return {"ingest": key, "run": r.json()["run"]["id"]}


def _scorecard(threshold: int) -> dict[str, Any]:
    return {
        "identifier": "heavy",
        "title": "heavy",
        "rules": [
            {
                "identifier": f"r{i}",
                "title": f"r{i}",
                "level": "Gold",
                "query": {
                    "combinator": "and",
                    "conditions": [
                        {"property": "n", "operator": ">", "value": threshold + i},
                        {"property": "tier", "operator": "contains", "value": "ol"},
                    ],
                },
            }
            for i in range(20)
        ],
    }


# B's sustained share of its rate limits (Portolan's defaults, per second): entity writes
# 35000 and "other" requests 15000 per 5 minutes; one webhook's events 1200 per minute.
WRITES_PER_SECOND = 35000 / 300
OTHER_PER_SECOND = 15000 / 300
EVENTS_PER_SECOND = 1200 / 60
NOISE = os.environ.get("PORTOLAN_BENCH_NOISY_ONLY", "read,write,run,scorecard,ingest,stream").split(
    ","
)


async def _noise(
    http: httpx.AsyncClient, headers: dict[str, str], b: dict[str, Any], sent: dict[str, int]
) -> list[asyncio.Task[None]]:
    """B's worst within its limits, as tasks that run until cancelled: each kind of
    request paced at B's sustained rate limit (slow reads pace themselves: each waits for
    its calculation's time limit). `sent` counts the answers by kind and status class."""

    def paced(per_second: float, work: Callable[[int], Awaitable[Any]], kind: str) -> Any:
        async def forever() -> None:
            began, n = time.perf_counter(), 0
            while True:
                n += 1
                status = "error"
                with contextlib.suppress(httpx.HTTPError):
                    status = f"{(await work(n)).status_code // 100}xx"
                sent[f"{kind} {status}"] = sent.get(f"{kind} {status}", 0) + 1
                await asyncio.sleep(max(0.0, began + n / per_second - time.perf_counter()))

        return forever()

    async def read(n: int) -> Any:
        return await http.get(f"/v1/blueprints/noisy/entities/b{n % 5000}", headers=headers)

    async def write(n: int) -> Any:
        body = {"identifier": f"b{n % 5000}", "properties": {"n": n}}
        return await http.post(
            "/v1/blueprints/noisy/entities?upsert=true&merge=true", json=body, headers=headers
        )

    async def run(n: int) -> Any:
        return await http.post(
            "/v1/actions/slow-template/runs", json={"properties": {}}, headers=headers
        )

    async def scorecard(n: int) -> Any:
        return await http.put(
            "/v1/blueprints/noisy/scorecards/heavy", json=_scorecard(n % 50), headers=headers
        )

    async def ingest(n: int) -> Any:
        return await http.post(f"/v1/webhooks/ingest/{b['ingest']}", json={"n": n})

    async def stream(n: int) -> Any:
        async with http.stream(
            "GET", f"/v1/actions/runs/{b['run']}/logs/stream", headers=headers
        ) as r:
            if r.status_code == 200:
                async for _ in r.aiter_bytes():
                    pass
        return r

    work: dict[str, list[Any]] = {
        "read": [paced(1000, read, "read") for _ in range(4)],
        "write": [paced(WRITES_PER_SECOND, write, "write")],
        "run": [paced(OTHER_PER_SECOND / 2, run, "run")],
        "scorecard": [paced(1.0, scorecard, "scorecard")],
        # twice its limit: some 429s
        "ingest": [paced(EVENTS_PER_SECOND * 2, ingest, "ingest")],
        "stream": [paced(1.0, stream, "stream") for _ in range(30)],  # past its cap of streams
    }
    return [asyncio.create_task(w) for kind in NOISE for w in work[kind]]


def _noise_process(
    base_url: str,
    headers: dict[str, str],
    b: dict[str, Any],
    stop: Any,
    report: Any,
) -> None:
    """B's clients, in a process of their own (its own event loop: A's client is never
    queued behind B's requests in the driver), below the driver's priority (B's clients
    stand for machines of B's: on a small bench machine they share a core with the database
    and A's client, and at the driver's priority they were measured as the server's cost;
    the rates B achieved are printed beside the figures)."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, 19)

    async def main() -> dict[str, int]:
        sent: dict[str, int] = {}
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(
            base_url=base_url,
            timeout=120,
            limits=limits,
            transport=httpx.AsyncHTTPTransport(limits=limits, local_address=B_ADDRESS),
        ) as http:
            tasks = await _noise(http, headers, b, sent)
            began = time.perf_counter()
            # The stop is a process-shared event: looked at, not awaited.
            while not stop.is_set():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            seconds = time.perf_counter() - began
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        sent["seconds"] = int(seconds * 1000)
        return sent

    report.put(asyncio.run(main()))


class Noise:
    """B's noise running in its own process while the `with` block runs."""

    def __init__(self, base_url: str, headers: dict[str, str], b: dict[str, Any]) -> None:
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._report: Any = context.Queue()
        self._process = context.Process(
            target=_noise_process,
            args=(base_url, headers, b, self._stop, self._report),
            daemon=True,
        )
        self.sent: dict[str, int] = {}

    def __enter__(self) -> Noise:
        self._process.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            self.sent = self._report.get(timeout=60)
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()


def _rates(sent: dict[str, int]) -> str:
    seconds = max(0.001, sent.get("seconds", 0) / 1000)
    return ", ".join(
        f"{kind} {count / seconds:.0f}/s"
        for kind, count in sorted(sent.items())
        if kind != "seconds"
    )


ERRORS: dict[str, int] = {}


def _count(name: str, response: httpx.Response) -> None:
    """A's answers that were not 2xx, by operation (printed beside the figures)."""
    if response.status_code >= 300:
        ERRORS[name] = ERRORS.get(name, 0) + 1


async def _measure_a(
    http: httpx.AsyncClient, headers: dict[str, str], receiver: Receiver, tag: str
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"read": [], "search": [], "upsert": [], "automation": []}
    search = {
        "query": {"combinator": "and", "rules": [{"property": "n", "operator": "<", "value": 50}]},
        "limit": 20,
    }
    upsert = "/v1/blueprints/svc/entities?upsert=true&merge=true"
    for i in range(OPS_PER_ROUND):
        started = time.perf_counter()
        _count("read", await http.get(f"/v1/blueprints/svc/entities/a{i}", headers=headers))
        out["read"].append(time.perf_counter() - started)
        started = time.perf_counter()
        r = await http.post("/v1/blueprints/svc/entities/search", json=search, headers=headers)
        _count("search", r)
        out["search"].append(time.perf_counter() - started)
        started = time.perf_counter()
        body = {"identifier": f"a{i}", "properties": {"n": i + 1000}}
        _count("upsert", await http.post(upsert, json=body, headers=headers))
        out["upsert"].append(time.perf_counter() - started)
        if i % 4 == 0:
            marker = f"{tag}-{i}"
            started = time.perf_counter()
            body = {"identifier": f"a{i}", "properties": {"tier": marker}}
            _count("automation", await http.post(upsert, json=body, headers=headers))
            deadline = time.monotonic() + 30
            while marker not in receiver.arrivals and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            if marker not in receiver.arrivals:
                ERRORS["automation"] = ERRORS.get("automation", 0) + 1
            out["automation"].append(receiver.arrivals.get(marker, time.perf_counter()) - started)
    return {k: [v * 1000 for v in values] for k, values in out.items()}


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run() -> bool:
    pin_driver()
    async with scratch_settings() as settings:
        fast, slow = Receiver(), Receiver(delay=10.0)
        await fast.start()
        await slow.start()
        db = await Database.connect(settings)
        os.environ["PORTOLAN_OUTBOUND_ALLOW"] = "127.0.0.1/32"
        try:
            with served(settings) as port:
                limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
                async with (
                    httpx.AsyncClient(
                        base_url=f"http://127.0.0.1:{port}",
                        timeout=120,
                        transport=httpx.AsyncHTTPTransport(local_address=A_ADDRESS),
                    ) as a_http,
                    httpx.AsyncClient(
                        base_url=f"http://127.0.0.1:{port}", timeout=120, limits=limits
                    ) as b_http,
                ):
                    _, a = await new_org(
                        db, a_http, "quiet", [_blueprint("svc", ".properties.n * 2")]
                    )
                    _, b = await new_org(db, b_http, "noisy", [_blueprint("noisy", LOOP)])
                    await _setup_a(a_http, a, f"http://127.0.0.1:{fast.port}/a")
                    b_state = await _setup_b(b_http, b, f"http://127.0.0.1:{slow.port}/b")
                    r = await b_http.post(
                        "/v1/blueprints/noisy/scorecards", json=_scorecard(0), headers=b
                    )
                    r.raise_for_status()
                    await _measure_a(a_http, a, fast, "warm")
                    await pin_database_backends(settings)
                    quiet: dict[str, list[float]] = {}
                    noisy: dict[str, list[float]] = {}
                    for round_ in range(ROUNDS):
                        for name, values in (
                            await _measure_a(a_http, a, fast, f"q{round_}")
                        ).items():
                            quiet.setdefault(name, []).extend(values)
                        with Noise(f"http://127.0.0.1:{port}", b, b_state) as noise:
                            await asyncio.sleep(3.0)  # B's load is up before A measures
                            # B's load opened backends of its own: they go with the others.
                            await pin_database_backends(settings)
                            found = await _measure_a(a_http, a, fast, f"n{round_}")
                        for name, values in found.items():
                            noisy.setdefault(name, []).extend(values)
                        print(
                            f"  round {round_ + 1} of {ROUNDS} measured; B's answers: "
                            + _rates(noise.sent),
                            flush=True,
                        )
                        await asyncio.sleep(1.0)
        finally:
            os.environ.pop("PORTOLAN_OUTBOUND_ALLOW", None)
            await db.close()
            await fast.stop()
            await slow.stop()
    ok = True
    for name in ("read", "search", "upsert", "automation"):
        q50, q99 = statistics.median(quiet[name]), _p(quiet[name], 0.99)
        n50, n99 = statistics.median(noisy[name]), _p(noisy[name], 0.99)
        r50, r99 = n50 / q50, n99 / q99
        good = r50 <= TARGET_RATIO and r99 <= TARGET_RATIO
        ok = ok and good
        print(
            f"  A {name:10s} alone p50 {q50:7.1f} ms p99 {q99:7.1f} ms | B noisy p50 "
            f"{n50:7.1f} ms p99 {n99:7.1f} ms | ratio p50 {r50:4.2f}x p99 {r99:4.2f}x "
            f"(target <= {TARGET_RATIO:g}x: {'PASS' if good else 'FAIL'})"
            + (f"; {ERRORS[name]} not 2xx / not delivered" if name in ERRORS else "")
        )
    return ok
