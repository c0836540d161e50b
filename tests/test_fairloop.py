"""The event loop's fair turns by org (app/kit/fairloop.py): a quiet org's work is not paced
by a busy org's backlog of ready callbacks, nothing is lost or reordered within an org, busy
orgs share the loop, and an idle org banks no time. What the turns cost is measured by
bench (org_read, noisy), not timed here."""

from __future__ import annotations

import asyncio
import contextvars
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from app.db.database import Database
from app.kit import fairloop
from tests.conftest import OrgFactory


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def _busy_org(stop: asyncio.Event, org: str, steps: dict[str, int] | None = None) -> None:
    """One of a busy org's tasks: short steps of CPU, yielding between them."""
    fairloop.charge_to(org)
    while not stop.is_set():
        _spin(0.0004)
        if steps is not None:
            steps[org] += 1
        await asyncio.sleep(0)


async def _busy_caller(stop: asyncio.Event, org: str, steps: dict[str, int]) -> None:
    """One of a flood of requests from one address whose org is not known yet (their token
    not verified yet, or not good): short steps of CPU, yielding between them."""
    fairloop.open_slot("10.0.0.9")
    while not stop.is_set():
        _spin(0.0004)
        steps[org] += 1
        await asyncio.sleep(0)


async def _quiet_round_trips(org: str, port: int, n: int, steps: dict[str, int]) -> list[int]:
    """A quiet org's requests: each four round trips through a connection (I/O, as a read's
    queries are) with a little CPU around them; for each, how many steps of the busy org
    ran while it was in flight (what it waited for, counted rather than timed)."""
    fairloop.charge_to(org)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    took = []
    try:
        for _ in range(n):
            before = steps["busy"]
            for _ in range(4):
                writer.write(b"x")
                await reader.readexactly(1)
                _spin(0.0002)
            took.append(steps["busy"] - before)
    finally:
        writer.close()
    return took


_ECHO = """
import socket, sys
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
while data := conn.recv(64):
    conn.sendall(data)
"""


def _echo_server() -> tuple[int, Callable[[], None]]:
    """A TCP echo server in a process of its own (outside the loop under test and its GIL)."""
    proc = subprocess.Popen([sys.executable, "-c", _ECHO], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())

    def stop() -> None:
        proc.kill()
        proc.wait()

    return port, stop


STARVED = 10**9


async def _quiet_under_busy(busy_tasks: int, busy: Any = _busy_org) -> int:
    """The median number of the busy side's steps a quiet org's request waits through."""
    port, close = _echo_server()
    steps = {"busy": 0}
    try:
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(busy(stop, "busy", steps), context=contextvars.Context())
            for _ in range(busy_tasks)
        ]
        await asyncio.sleep(0.05)
        quiet = asyncio.create_task(
            _quiet_round_trips("quiet", port, 10, steps), context=contextvars.Context()
        )
        await asyncio.wait({quiet}, timeout=30)
        stop.set()
        await asyncio.gather(*tasks)
        # Not done by then: the quiet org's requests never got a turn.
        noisy = quiet.result() if quiet.done() else [STARVED]
        quiet.cancel()
        await asyncio.gather(quiet, return_exceptions=True)
    finally:
        close()
    return sorted(noisy)[len(noisy) // 2]


def _run(factory: Callable[[], asyncio.AbstractEventLoop], coro_fn: Any, *args: Any) -> Any:
    loop = factory()
    try:
        return loop.run_until_complete(coro_fn(*args))
    finally:
        loop.close()


def test_a_quiet_org_is_not_paced_by_a_busy_orgs_backlog() -> None:
    # 20 busy tasks of 0.4 ms steps. A plain loop runs every one of them between two of the
    # quiet org's awaits (4 awaits: ~80 steps per request); the fair loop runs the quiet
    # org's callbacks first and looks for its I/O after each slice (0.5 ms, about two
    # steps), so a request waits through a few steps per await.
    plain = _run(asyncio.SelectorEventLoop, _quiet_under_busy, 20)
    fair = _run(fairloop.new_loop, _quiet_under_busy, 20)
    assert plain >= 4 * 15, plain  # the defect, as a plain loop shows it
    assert fair <= 4 * 4, fair


def test_requests_whose_org_is_not_known_yet_take_turns_with_the_orgs() -> None:
    """Until its token is verified a request counts for its client's address, an account
    in turns with the orgs: a flood from one address (good tokens or not) does not go
    before an org's work, as work of no org does. It went first: under one org's load at
    its rate limits, about a fifth of the loop was its requests' steps before their org
    was known, and every other org's callbacks waited behind them."""
    fair = _run(fairloop.new_loop, _quiet_under_busy, 20, _busy_caller)
    assert fair <= 4 * 4, fair


def test_callbacks_keep_their_order_within_an_org_and_none_is_lost() -> None:
    async def main() -> dict[str, list[int]]:
        seen: dict[str, list[int]] = {"a": [], "b": [], "none": []}
        loop = asyncio.get_running_loop()
        for i in range(2000):
            for org in ("a", "b", "none"):
                context = contextvars.Context()
                if org != "none":
                    context.run(fairloop.charge_to, org)
                loop.call_soon(seen[org].append, i, context=context)
        # Callbacks from another thread arrive too.
        threading.Thread(
            target=lambda: [
                loop.call_soon_threadsafe(seen["none"].append, 2000 + k) for k in range(500)
            ]
        ).start()
        while len(seen["none"]) < 2500 or len(seen["a"]) < 2000 or len(seen["b"]) < 2000:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        return seen

    seen = _run(fairloop.new_loop, main)
    assert seen["a"] == list(range(2000))
    assert seen["b"] == list(range(2000))
    assert seen["none"][:2000] == list(range(2000))
    assert sorted(seen["none"][2000:]) == list(range(2000, 2500))


def test_orgs_busy_together_share_the_loop() -> None:
    async def main() -> dict[str, int]:
        stop = asyncio.Event()
        steps: dict[str, int] = {"x": 0, "y": 0}
        tasks = [
            asyncio.create_task(_busy_org(stop, org, steps), context=contextvars.Context())
            for org in ("x", "y")
            for _ in range(1 if org == "x" else 10)
        ]
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*tasks)
        return steps

    steps = _run(fairloop.new_loop, main)
    # One task of x against ten of y: each org has had about the same time (on a plain
    # loop x would have about a tenth of y's).
    assert 0.7 < steps["x"] / steps["y"] < 1.4, steps


def test_an_idle_org_banks_no_time() -> None:
    """An org that was idle while another ran comes back with a few milliseconds of credit,
    not with all the time it did not use: the busy org keeps about half the loop."""

    async def main() -> dict[str, int]:
        stop = asyncio.Event()
        steps: dict[str, int] = {"busy": 0, "late": 0}
        busy = asyncio.create_task(_busy_org(stop, "busy", steps), context=contextvars.Context())
        await asyncio.sleep(0.3)
        steps["busy"] = 0
        late = asyncio.create_task(_busy_org(stop, "late", steps), context=contextvars.Context())
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(busy, late)
        return steps

    steps = _run(fairloop.new_loop, main)
    assert 0.6 < steps["busy"] / steps["late"] < 1.6, steps


def test_a_loop_going_from_org_to_org_does_not_recount_the_tasks_it_started() -> None:
    async def main() -> list[object]:
        fairloop.charge_to("x")
        seen: list[object] = []

        async def child() -> None:
            await asyncio.sleep(0.01)
            slot = fairloop.TENANT.get()
            seen.append(None if slot is None else slot.org)

        task = asyncio.create_task(child())
        fairloop.charge_to("y")  # the parent moves on to another org's work
        await task
        slot = fairloop.TENANT.get()
        seen.append(None if slot is None else slot.org)
        return seen

    assert _run(fairloop.new_loop, main) == ["x", "y"]


def test_a_request_slot_is_claimed_with_the_tasks_it_started() -> None:
    async def main() -> list[object]:
        fairloop.open_slot()
        seen: list[object] = []

        async def child() -> None:
            await asyncio.sleep(0.01)
            slot = fairloop.TENANT.get()
            seen.append(None if slot is None else slot.org)

        task = asyncio.create_task(child())
        fairloop.charge_to("a")  # the request's token names its org
        await task
        return seen

    assert _run(fairloop.new_loop, main) == ["a"]


async def test_a_background_loop_is_no_orgs_work_again_after_a_unit_of_an_orgs(
    db: Database, make_org: OrgFactory
) -> None:
    """A loop that goes from org to org (the event feed, the relay) counts for an org while
    its unit of work runs, then for no org again: its own work between units is not charged
    to (or queued behind) the org it served last."""
    org = await make_org()

    async def background() -> list[object]:
        seen: list[object] = []
        async with db.tenant(org.org_id) as tx:
            await tx.fetchval("SELECT 1")
            slot = fairloop.TENANT.get()
            seen.append(None if slot is None else slot.org)
        seen.append(fairloop.TENANT.get())
        return seen

    # A task of its own with no mark, as the worker's loops are.
    seen = await asyncio.create_task(background(), context=contextvars.Context())
    assert seen == [org.org_id, None]


async def test_a_requests_task_counts_for_its_client_address_from_its_first_step() -> None:
    """The server's connection starts each request's task counting for the client's
    address: its first step (middleware, routing, often the token's verification) is no
    longer work of no org, which goes before every org's."""
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from app.config import Settings
    from app.kit.serving import protocol_for

    seen: list[object] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        slot = fairloop.TENANT.get()
        seen.append(None if slot is None else (slot.org, slot.caller))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    config = Config(app=app, lifespan="off", log_config=None)
    config.load()
    protocol = protocol_for(Settings(_env_file=None))  # type: ignore[call-arg]
    state = ServerState()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: protocol(config=config, server_state=state, app_state={}), "127.0.0.1", 0
    )
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(2):  # and the next request on the same connection
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 204")
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    assert seen == [(None, ("caller", "127.0.0.1"))] * 2


async def _busy_upkeep(stop: asyncio.Event, org: str, steps: dict[str, int]) -> None:
    """One of the server's own busy tasks (a worker's loop between units of an org's work):
    work of no org, short steps of CPU, yielding between them."""
    while not stop.is_set():
        _spin(0.0004)
        steps[org] += 1
        await asyncio.sleep(0)


def test_tasks_of_no_org_take_turns_with_the_orgs() -> None:
    """The server's own tasks (the in-process worker's loops) count for one account in
    turns with the orgs. They went first, as a socket's reads do: busy, they took every
    pass whole and an org's work waited for them to rest."""
    fair = _run(fairloop.new_loop, _quiet_under_busy, 20, _busy_upkeep)
    assert fair <= 4 * 4, fair


def test_a_task_woken_during_a_pass_joins_it() -> None:
    """A quiet org's task woken by a reply read in this pass runs in this pass, before the
    busy org's backlog: about one busy step per await (the one running when the reply came,
    and the slice's end). It waited for the next pass, a slice more per await."""
    fair = [_run(fairloop.new_loop, _quiet_under_busy, 20) for _ in range(3)]
    assert min(fair) <= 4 * 2, fair
