"""Diagnosis only: a record of what the server's loop did, turn by turn.

With PORTOLAN_BENCH_TRACE=<file>, bench.server records every callback its loop runs (when,
whose: an org, a client address, upkeep or no one, and what), every wait for I/O, every jq
call, and every request's arrival and answer; callbacks running past
PORTOLAN_BENCH_TRACE_LONG seconds (default 0.004) get their stack sampled (a stack can only
be taken while the loop lets go of the GIL: lower the switch interval, in seconds, with
PORTOLAN_BENCH_TRACE_SWITCH to see short ones). PORTOLAN_BENCH_TRACE_GC_CENSUS=1 records
what the oldest generation holds before each full collection.

`python -m bench.trace <file> <path fragment> [share]` breaks the slowest `share` (default
2%) of the requests whose path holds the fragment down by where their time went: waiting
for I/O, jq calls, and each account's callbacks. Recording slows the server: figures taken
with it are not comparable with the scenarios' own."""

from __future__ import annotations

import bisect
import itertools
import os
import pickle
import sys
import threading
import time
import traceback
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from app.kit import fairloop, sandbox

CALLBACK, WAIT_BEGIN, WAIT_END, REQUEST, NAMED, JQ, STACK, GC = range(8)
LONG = float(os.environ.get("PORTOLAN_BENCH_TRACE_LONG", "0.004"))

Event = tuple[float, int, Any, str]  # (when, kind, whose / details, what)
_events: list[Event] = []
_named: set[object] = set()


def _name(handle: Any) -> str:
    callback = getattr(handle, "_callback", None)
    owner: Any = getattr(callback, "__self__", None)
    if owner is not None and hasattr(owner, "get_coro"):
        coro = owner.get_coro()
        return f"task:{getattr(coro, '__qualname__', coro)}"
    return str(getattr(callback, "__qualname__", repr(callback)))


def install(path: str) -> None:
    """Record the loop's turns (patching FairReady, FairLoop and the jq pool), written to
    `path` every 5 s."""
    state: dict[str, Any] = {"since": 0.0, "seen": 0.0, "name": "", "thread": None}
    popleft = fairloop.FairReady.popleft
    length = fairloop.FairReady.__len__
    run_once = fairloop.FairLoop._run_once  # type: ignore[attr-defined]
    call = sandbox._Pool.call

    def traced_popleft(self: fairloop.FairReady) -> Any:
        handle = popleft(self)
        if not handle.cancelled():
            now, name = time.perf_counter(), _name(handle)
            _events.append((now, CALLBACK, fairloop._org_of(handle), name))
            state.update(since=now, name=name, thread=threading.get_ident())
        return handle

    def traced_len(self: fairloop.FairReady) -> int:
        _events.append((time.perf_counter(), WAIT_END, None, ""))
        return length(self)

    def traced_run_once(self: Any) -> None:
        state["since"] = 0.0
        _events.append((time.perf_counter(), WAIT_BEGIN, None, ""))
        run_once(self)

    async def traced_call(self: Any, org: str, payload: bytes) -> Any:
        started = time.perf_counter()
        try:
            return await call(self, org, payload)
        finally:
            _events.append((time.perf_counter(), JQ, (started, org), ""))

    acall = sandbox._Child.acall
    turn = sandbox._Pool.turn

    async def traced_acall(self: Any, payload: bytes, limit: float) -> Any:
        started = time.perf_counter()
        try:
            return await acall(self, payload, limit)
        finally:
            _events.append((time.perf_counter(), JQ, (started, "child"), ""))

    async def traced_turn(self: Any, org: str) -> Any:
        started = time.perf_counter()
        try:
            return await turn(self, org)
        finally:
            _events.append((time.perf_counter(), JQ, (started, "turn"), ""))

    sandbox._Child.acall = traced_acall  # type: ignore[method-assign]
    sandbox._Pool.turn = traced_turn  # type: ignore[method-assign]
    fairloop.FairReady.popleft = traced_popleft  # type: ignore[method-assign]
    fairloop.FairReady.__len__ = traced_len  # type: ignore[method-assign]
    fairloop.FairLoop._run_once = traced_run_once  # type: ignore[attr-defined]
    sandbox._Pool.call = traced_call  # type: ignore[method-assign]

    if os.environ.get("PORTOLAN_BENCH_TRACE_SWITCH"):
        sys.setswitchinterval(float(os.environ["PORTOLAN_BENCH_TRACE_SWITCH"]))

    def watch() -> None:
        while True:
            time.sleep(0.0002)
            since = state["since"]
            if since and since != state["seen"] and time.perf_counter() - since > LONG:
                frame = sys._current_frames().get(state["thread"])
                if frame is not None:
                    stack = traceback.extract_stack(frame)[-14:]
                    text = " <- ".join(
                        f"{f.name}({f.filename.rsplit('/', 2)[-1]}:{f.lineno})"
                        for f in reversed(stack)
                    )
                    _events.append((time.perf_counter(), STACK, state["name"], text))
                    state["seen"] = since

    def dump() -> None:
        global _events
        while True:
            time.sleep(5)
            taken, _events = _events, []
            with open(path, "ab") as out:
                pickle.dump(taken, out)

    import gc

    collecting: dict[str, float] = {}

    census = bool(os.environ.get("PORTOLAN_BENCH_TRACE_GC_CENSUS"))

    def collected(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            if census and info.get("generation") == 2:
                kinds = Counter(type(o).__qualname__ for o in gc.get_objects(2))
                top = ", ".join(f"{k} {n}" for k, n in kinds.most_common(12))
                _events.append((time.perf_counter(), GC, "census", f"{sum(kinds.values())}: {top}"))
            collecting["since"] = time.perf_counter()
        else:
            took = time.perf_counter() - collecting.get("since", time.perf_counter())
            _events.append((time.perf_counter(), GC, info.get("generation"), f"{took:.6f}"))

    gc.callbacks.append(collected)
    threading.Thread(target=watch, daemon=True).start()
    threading.Thread(target=dump, daemon=True).start()


Asgi = Callable[..., Awaitable[None]]


def wrap(app: Asgi) -> Asgi:
    """The app, recording each request's arrival and answer (and naming its org by the
    blueprint in its path, the first time)."""

    async def traced(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        started = time.perf_counter()
        path = str(scope.get("path", ""))

        async def sending(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                details = (started, scope.get("method", ""), path, message["status"])
                _events.append((time.perf_counter(), REQUEST, details, ""))
                slot = fairloop.TENANT.get()
                parts = path.split("/")
                if slot is not None and slot.org is not None and slot.org not in _named:
                    if len(parts) > 3 and parts[2] == "blueprints":
                        _named.add(slot.org)
                        _events.append((time.perf_counter(), NAMED, slot.org, parts[3]))
            await send(message)

        await app(scope, receive, sending)

    return traced


def _load(path: str) -> list[Event]:
    events: list[Event] = []
    with open(path, "rb") as f:
        while True:
            try:
                events.extend(pickle.load(f))  # noqa: S301 - the server's own record
            except EOFError:
                break
    events.sort(key=lambda e: e[0])
    return events


def report(path: str, fragment: str, share: float = 0.02) -> None:
    events = _load(path)
    names = {e[2]: e[3] for e in events if e[1] == NAMED}

    def label(who: object) -> str:
        if who is None:
            return "none"
        if who == fairloop.UPKEEP:
            return "upkeep"
        if isinstance(who, tuple):
            return f"caller {who[1]}"
        return names.get(who, str(who)[:8])

    def org_label(text: str) -> str:
        try:
            return label(uuid.UUID(text))
        except ValueError:
            return text

    collections_by_generation: dict[Any, list[float]] = defaultdict(list)
    for e in events:
        if e[1] == GC and e[2] == "census":
            print(f"generation 2 before a full collection: {e[3]}")
        elif e[1] == GC:
            collections_by_generation[e[2]].append(float(e[3]))
    for generation, took in sorted(collections_by_generation.items()):
        print(
            f"garbage collections of generation {generation}: {len(took)}, "
            f"{sum(took) * 1000:.0f} ms in all, longest {max(took) * 1000:.1f} ms, "
            f"{sum(t > 0.005 for t in took)} past 5 ms: "
            + ", ".join(f"{t * 1000:.0f}" for t in took if t > 0.005)
        )
    print("stacks of long callbacks:")
    for text, n in Counter(f"{e[2]}: {e[3]}" for e in events if e[1] == STACK).most_common(20):
        print(f"  {n:4d} {text[:600]}")
    spans: dict[str, list[float]] = defaultdict(list)
    for this, after in itertools.pairwise(events):
        if this[1] == CALLBACK:
            spans[f"{label(this[2])} {this[3]}"].append(after[0] - this[0])
    print("callbacks: total ms, count, > 1 ms, > 5 ms, longest ms")
    for name, ds in sorted(spans.items(), key=lambda kv: -sum(kv[1]))[:25]:
        print(
            f"  {sum(ds) * 1000:8.0f} {len(ds):7d} {sum(d > 0.001 for d in ds):6d} "
            f"{sum(d > 0.005 for d in ds):5d} {max(ds) * 1000:7.1f}  {name}"
        )
    times = [e[0] for e in events]
    jq = sorted((e[2][0], e[0], e[2][1]) for e in events if e[1] == JQ)
    jq_starts = [j[0] for j in jq]
    requests = [e for e in events if e[1] == REQUEST and fragment in e[2][2]]
    requests.sort(key=lambda e: e[0] - e[2][0])
    slow = requests[-max(1, int(len(requests) * share)) :]
    print(f"{len(requests)} requests matching {fragment!r}; the slowest {len(slow)} (ms):")
    totals: dict[str, float] = defaultdict(float)
    for end, _, details, _ in slow:
        start = details[0]
        spent: dict[str, float] = defaultdict(float)
        longest: list[tuple[float, str]] = []
        i = bisect.bisect_left(times, start)
        while i < len(events) - 1 and events[i][0] < end:
            when, kind, who, what = events[i]
            d = min(events[i + 1][0], end) - max(when, start)
            if kind == WAIT_BEGIN:
                spent["waiting for I/O"] += d
            elif kind == WAIT_END:
                spent["loop"] += d
            elif kind == CALLBACK:
                spent[label(who)] += d
                longest.append((d, f"{label(who)} {what}"))
            i += 1
        k = bisect.bisect_left(jq_starts, start)
        while k < len(jq) and jq[k][0] < end:
            if jq[k][1] <= end:
                spent[f"(in a jq call of {org_label(jq[k][2])})"] += jq[k][1] - jq[k][0]
            k += 1
        for key, value in spent.items():
            totals[key] += value
        ordered = sorted(spent.items(), key=lambda x: -x[1])
        parts = ", ".join(f"{k} {v * 1000:.1f}" for k, v in ordered)
        top = "; ".join(f"{d * 1000:.1f} {n}" for d, n in sorted(longest, reverse=True)[:3])
        print(f"  {(end - start) * 1000:6.1f} {details[2][:40]}: {parts} | longest: {top}")
    print("in all:", {k: round(v * 1000) for k, v in sorted(totals.items(), key=lambda x: -x[1])})


if __name__ == "__main__":
    report(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0.02)
