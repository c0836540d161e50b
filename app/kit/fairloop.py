"""The event loop's turns, shared fairly between orgs.

All of a server's orgs share one event loop. asyncio runs the callbacks that are ready in
the order they became ready, so an org whose requests and background work keep many
callbacks ready (a tenant at its rate limits) sets the pace for every other org's: each
of their awaits waits behind the whole backlog. `FairLoop` orders the ready callbacks by
org instead, as a fair-share scheduler does:

- each callback belongs to the org of the work it runs for: a request is marked by
  `open_slot()` when it arrives and counted for its org once `charge_to(org)` names it
  (the tenant transaction does, for requests and background work alike), and every
  callback of that work and of the tasks it starts carries the mark (its context);
- the loop times each callback and adds the time to its org's account; among the orgs
  with callbacks ready, the one with the least time runs first, and within an org
  callbacks keep their order. An org that was idle comes back with at most
  `GRACE_SECONDS` of credit, so quiet orgs go first but none can bank time;
- until its org is named, a request counts for its client's address (`open_slot`), an
  account like an org's;
- callbacks of no org that are not a task's (reading sockets, parsing replies, timers)
  run first, in their order: they are short, and they are what wakes every org's work;
- tasks of no org (the in-process worker's loops, the server's own upkeep) count for
  one account, `UPKEEP`, in turns with the orgs: a busy worker does not go before them;
- one pass over the ready callbacks lasts at most `SLICE_SECONDS` (plus the callback
  running when it ends): the rest waits for the next pass, which first looks for I/O
  that completed meanwhile. So a quiet org's reply is picked up within about one slice
  of arriving; the callback it wakes (its task's next step) joins the pass at once, and
  goes before the backlog of a busy org.

Nothing is dropped or starved: a busy org gets every turn the others leave, and at least
its share when all are busy. `tests/test_fairloop.py` measures the effect; bench `noisy`
measures it through the whole server.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import time
from contextvars import ContextVar
from typing import Any

SLICE_SECONDS = 0.0005
GRACE_SECONDS = 0.005
UPKEEP = ("upkeep",)  # the account of tasks of no org


class _Slot:
    """Whose work this is: shared by a request's task and the tasks it starts. `caller`:
    whose it counts as until an org is named (a request's client address)."""

    __slots__ = ("caller", "org")

    def __init__(self, org: object = None, caller: object = None) -> None:
        self.org = org
        self.caller = caller


TENANT: ContextVar[_Slot | None] = ContextVar("portolan_tenant", default=None)


def open_slot(caller: object = None) -> None:
    """Mark the current task's work (a request whose org is not known yet): its callbacks,
    and those of tasks it starts from here on, count for the org `charge_to` names, and
    until then for `caller` (a request's client address; None: work of no org)."""
    TENANT.set(_Slot(caller=None if caller is None else ("caller", caller)))


def caller_context(caller: object) -> contextvars.Context:
    """A copy of the current context whose work counts for `caller` (a request's client
    address) until an org is named: for a request's task from its very first step."""
    context = contextvars.copy_context()
    context.run(open_slot, caller)
    return context


def current() -> _Slot | None:
    """The current work's mark, to give back with `restore` when a unit of an org's work
    ends (a background loop goes back to being work of no org)."""
    return TENANT.get()


def restore(mark: _Slot | None) -> None:
    if TENANT.get() is not mark:
        TENANT.set(mark)


def charge_to(org: object) -> None:
    """The current work is the org's from here on (its callbacks count for it).

    A request's slot, still without an org, is claimed (with the tasks it started); work
    that belonged to another org (a background loop going from org to org) takes a slot of
    its own, so tasks it started earlier keep counting for their own org."""
    slot = TENANT.get()
    if slot is None or (slot.org is not None and slot.org != org):
        TENANT.set(_Slot(org))
    elif slot.org is None:
        slot.org = org


def _org_of(handle: asyncio.Handle) -> object:
    context = getattr(handle, "_context", None)
    slot = None if context is None else context.get(TENANT)
    if slot is not None:
        key = slot.caller if slot.org is None else slot.org
        if key is not None:
            return key
    # A task's step (its callback is a method of the task) that is no org's: upkeep.
    if isinstance(getattr(getattr(handle, "_callback", None), "__self__", None), asyncio.Task):
        return UPKEEP
    return None


class FairReady:
    """Stands in for the loop's queue of ready callbacks (a deque it appends to, and pops
    from in `_run_once`): appends go to an inbox (thread-safe: one deque append), pops
    pick by org. Only the loop's thread takes from it."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        slice_seconds: float = SLICE_SECONDS,
        grace_seconds: float = GRACE_SECONDS,
    ) -> None:
        self._inbox: collections.deque[asyncio.Handle] = collections.deque()
        self.append = self._inbox.append
        self._system: collections.deque[asyncio.Handle] = collections.deque()
        self._system_next: collections.deque[asyncio.Handle] = collections.deque()
        self._queues: dict[object, collections.deque[asyncio.Handle]] = {}
        self._spent: dict[object, float] = {}  # seconds of the loop each org has had
        self._floor = 0.0  # the least account among orgs recently served
        self._queued = 0
        self._running: object = None  # the org charged for the callback running now
        self._since = 0.0
        self._pass_began = 0.0
        self._slice = slice_seconds
        self._grace = grace_seconds
        self._later = asyncio.Handle(_nothing, (), loop)
        self._later.cancel()  # a pass skips cancelled handles: "the rest waits"

    # The loop asks `bool(ready)` before it polls for I/O (the last pass has ended) and
    # `len(ready)` right after (a pass begins), then pops that many.
    def __bool__(self) -> bool:
        self._close(time.perf_counter())
        return bool(self._inbox) or self._queued > 0

    def __len__(self) -> int:
        now = time.perf_counter()
        self._close(now)
        self._pass_began = now
        if self._system_next:
            self._system.extend(self._system_next)
            self._system_next.clear()
        self._drain(self._system)
        return self._queued

    def popleft(self) -> asyncio.Handle:
        now = time.perf_counter()
        self._close(now)
        if now - self._pass_began > self._slice:
            return self._later
        # What became ready during the pass joins it: an org's task woken by a reply that
        # was read in this pass goes before the backlog of a busier org. Callbacks of no
        # org scheduled during the pass wait for the next one (as in asyncio's own pass),
        # or one that keeps scheduling another would go first in every pop.
        if self._inbox:
            self._drain(self._system_next)
        if self._system:
            self._queued -= 1
            return self._system.popleft()
        if not self._queues:
            return self._later
        org, least = None, 0.0
        for key in self._queues:
            spent = self._spent[key]
            if org is None or spent < least:
                org, least = key, spent
        queue = self._queues[org]
        handle = queue.popleft()
        if not queue:
            del self._queues[org]
        self._queued -= 1
        if least > self._floor:
            self._floor = least
        self._running, self._since = org, now
        return handle

    def settle(self) -> None:
        """Charge the callback that ran last (the loop stops: the time until it runs
        again is no org's)."""
        self._close(time.perf_counter())

    def clear(self) -> None:
        self._inbox.clear()
        self._system.clear()
        self._system_next.clear()
        self._queues.clear()
        self._queued = 0
        self._running = None

    def _close(self, now: float) -> None:
        if self._running is not None:
            self._spent[self._running] += now - self._since
            self._running = None

    def _drain(self, system: collections.deque[asyncio.Handle]) -> None:
        inbox = self._inbox
        while inbox:
            handle = inbox.popleft()
            org = _org_of(handle)
            if org is None:
                system.append(handle)
            else:
                queue = self._queues.get(org)
                if queue is None:
                    queue = self._queues[org] = collections.deque()
                    floor = self._floor - self._grace
                    spent = self._spent.get(org)
                    if spent is None or spent < floor:
                        self._spent[org] = floor
                queue.append(handle)
            self._queued += 1
        if len(self._spent) > 4 * len(self._queues) + 64:
            self._forget()

    def _forget(self) -> None:
        """Drop the accounts of idle orgs that would come back at the floor anyway."""
        floor = self._floor - self._grace
        for org in [o for o, s in self._spent.items() if s <= floor and o not in self._queues]:
            if org != self._running:
                del self._spent[org]


def _nothing() -> None:
    return None


class FairLoop(asyncio.SelectorEventLoop):
    """asyncio's selector loop with its ready callbacks taken in fair turns by org."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self._ready: FairReady = FairReady(self, **kwargs)

    def run_forever(self) -> None:
        try:
            super().run_forever()
        finally:
            self._ready.settle()

    # A socket's reader and writer callbacks keep the context they were registered in, and
    # a socket is often opened by an org's work and then serves every org (a pooled
    # database or Redis connection): its reads and writes are work of no org, whoever
    # opened it, or every org's replies on it would wait in (and be charged to) the
    # opener's turn.
    def _add_reader(self, fd: Any, callback: Any, *args: Any) -> Any:
        add = super()._add_reader  # type: ignore[misc]
        return (
            add(fd, callback, *args)
            if TENANT.get() is None
            else _no_org().run(add, fd, callback, *args)
        )

    def _add_writer(self, fd: Any, callback: Any, *args: Any) -> Any:
        add = super()._add_writer  # type: ignore[misc]
        return (
            add(fd, callback, *args)
            if TENANT.get() is None
            else _no_org().run(add, fd, callback, *args)
        )


def context_for(org: object) -> contextvars.Context:
    """A copy of the current context whose work counts for `org` (None: for no org), for a
    task started on another org's behalf (e.g. a connection opened for a waiting org)."""
    context = contextvars.copy_context()
    context.run(TENANT.set, None if org is None else _Slot(org))
    return context


def _no_org() -> contextvars.Context:
    return context_for(None)


def new_loop() -> asyncio.AbstractEventLoop:
    """The server's event loop (uvicorn's `loop` setting names this factory)."""
    return FairLoop()


class FairLoopPolicy(asyncio.DefaultEventLoopPolicy):
    """Makes FairLoops (the test suite runs on the server's loop)."""

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return new_loop()
