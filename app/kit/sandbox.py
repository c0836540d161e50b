"""Where tenants' jq runs: confined child processes, a time limit, fair turns across orgs.

Every place that evaluates a tenant's jq (calculation properties, automation conditions,
action and webhook templates, a run's `required` query) calls `evaluate`, which:

- runs the programs in a child process (app/kit/jq_child.py) started with an empty
  environment in an empty directory, holding no secret, with no module system: `$ENV`,
  `env`, files, `input`/`inputs` beyond the document give nothing;
- gives each call `time_limit` seconds of the child's CPU time (waiting for a turn is not
  counted; a child the machine's load kept from running gets more wall time, up to
  BACKSTOP limits); a child past its limit is killed and the call raises `TimeLimit`; the
  outputs of one call are capped in all (REPLY_LIMIT_BYTES), a large reply parsed off the
  loop;
- hands out the children fairly: an org holds at most `per_org` children at once, and a
  freed child goes to the org that has waited longest for a turn (round robin over orgs, in
  order of arrival within an org), so one org's slow programs delay another org's by at most
  one call per child; a call that waits longer than `max_wait`, or arrives while its org
  already has `max_queued` calls waiting, raises `Busy` (a 503 for a request);
- never holds anything of the caller's but the call: callers must not hold a database
  connection while they await it.

Children are plain processes behind non-blocking pipes. A call is written and read on the
caller's event loop (any loop; the pool is thread-safe); only what would block the loop
runs in the pool's threads: starting a child, ending one and starting its successor, and
parsing a large reply.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from app.kit.errors import Unavailable
from app.kit.jq_child import module_directive

if TYPE_CHECKING:
    from app.config import Settings

__all__ = [
    "Busy",
    "Crashed",
    "Limits",
    "SandboxError",
    "TimeLimit",
    "configure",
    "evaluate",
    "module_directive",
    "shutdown",
]

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jq_child.py")
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
BACKSTOP = 5  # wall time a starved call may take, in time limits
NICE = 10  # a child's priority, above the service's own (jq_child sets it)
NICE_DEMOTED = 19  # a call past DEMOTE_AFTER: the lowest priority
DEMOTE_AFTER = 0.02  # CPU seconds of a call before its child is demoted
# A call's first PROMPT_SECONDS of CPU run at the service's own priority, where the
# service may raise a child's priority back (`_MAY_RAISE_PRIORITY`): most calls (a
# calculation, a condition, a template) end within them, and at nice 10 a quick call waited
# for a core the service kept busy, several milliseconds at a time. (CPU time, not wall
# time: a call still waiting for a core keeps the priority it waits at.) Then nice 10, and
# past DEMOTE_AFTER of CPU the idle policy.
PROMPT_SECONDS = 0.002
# A demoted child runs only on CPU nothing else wants (Linux SCHED_IDLE): the service's
# threads and the database never wait for it, not even a scheduler tick. Elsewhere, nice 19.
_IDLE = getattr(os, "SCHED_IDLE", None)
REPLY_LIMIT_BYTES = 16 * 1024 * 1024  # the outputs of one call, in all
_PARSE_IN_THREAD_BYTES = 64 * 1024  # a larger reply is parsed off the loop


def _may_raise_priority() -> bool:
    """Whether this process may give a demoted child its priority back (root, or a nice
    limit that allows it); elsewhere a demoted child is replaced after its call."""
    try:
        import resource

        return os.geteuid() == 0 or resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20 - NICE
    except (ImportError, AttributeError, OSError, ValueError):
        return False


_MAY_RAISE_PRIORITY = _may_raise_priority()

Result = tuple[bool, Any]  # (True, [outputs]) or (False, "jq's message")
_WARM_UP = b'{"p":["."],"n":1,"o":64,"t":1024,"c":10}\nnull'


class SandboxError(Exception):
    """A call that gave no results: past its time limit, a crashed child, or no turn."""


class TimeLimit(SandboxError):
    pass


class Crashed(SandboxError):
    pass


class Busy(SandboxError, Unavailable):
    """No turn came in time: for a request, a 503 with Retry-After."""

    code = "evaluation_busy"

    def __init__(self, message: str) -> None:
        Unavailable.__init__(self, message)


@dataclass(frozen=True)
class Limits:
    processes: int = 2  # children in all
    per_org: int = 1  # children one org may hold at once
    time_limit: float = 2.0  # seconds of a child per call
    max_wait: float = 10.0  # seconds a call may wait for its turn
    max_queued: int = 200  # calls one org may have waiting


class _Child:
    """One confined process; a call is one frame out and one frame back."""

    def __init__(self, workdir: str, *, idle: bool = False) -> None:
        self._service = os.getpriority(os.PRIO_PROCESS, 0)
        self._nice = min(NICE_DEMOTED, self._service + NICE)
        self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and script
            [sys.executable, "-I", "-B", _CHILD, str(self._nice)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={},
            cwd=workdir,
            close_fds=True,
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        # Both pipes non-blocking: a call is written and read on the caller's event loop
        # (`acall`), or with select in a thread (`call`).
        self._in = self.process.stdin.fileno()
        self._out = self.process.stdout.fileno()
        os.set_blocking(self._in, False)
        os.set_blocking(self._out, False)
        self._clock: tuple[float, float | None, float] = (0.0, None, 0.0)
        self.retire = False  # its priority could not be restored: not to be used again
        # Starting the interpreter and jq takes ~40 ms of CPU, which ran at the service's own
        # priority until the child lowered its own. A child starts at its priority (nice 10)
        # at once; one started ahead of any call (`idle`, the pool's top-up) at the lowest,
        # kept until its first call (where priorities can be raised back).
        self.demoted = False
        if idle and _MAY_RAISE_PRIORITY:
            self.demoted = self._demote()
        else:
            try:
                os.setpriority(os.PRIO_PROCESS, self.process.pid, self._nice)
            except OSError:
                pass  # the child lowers its own priority once started (jq_child)

    def cpu_seconds(self) -> float | None:
        """The CPU time the child has used (Linux: in nanoseconds from schedstat where the
        kernel keeps it, else in clock ticks), or None where that cannot be read."""
        try:
            with open(f"/proc/{self.process.pid}/schedstat", "rb") as schedstat:
                return int(schedstat.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            pass
        try:
            with open(f"/proc/{self.process.pid}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / _TICKS
        except (OSError, ValueError, IndexError):
            return None

    def call(self, payload: bytes, time_limit: float, *, restore: bool = True) -> bytes:
        """One request and its reply. The time limit is the child's CPU time: a child that
        the machine's load kept from running gets more wall time, up to BACKSTOP times the
        limit. `restore=False` (warming up): the child stays at the priority it has."""
        started = time.monotonic()
        self._clock = (started, self.cpu_seconds(), time_limit)
        if restore and self.demoted and self._restore():
            self.demoted = False
        frame = memoryview(len(payload).to_bytes(4, "big") + payload)
        while frame:
            select.select([], [self._in], [])
            frame = frame[self._write(frame) :]
        size = int.from_bytes(self._read(4), "big")
        return self._read(size)

    async def acall(self, payload: bytes, time_limit: float) -> bytes:
        """`call` on the running event loop, with no thread: the frame is written and the
        reply read as the loop finds the pipes ready, and the child's CPU time is looked at
        on the loop's timers. (A thread waited for the interpreter's lock twice per call, up
        to its 5 ms switch interval each time while the loop was busy.)"""
        loop = asyncio.get_running_loop()
        self._clock = (time.monotonic(), self.cpu_seconds(), time_limit)
        prompt = self._prompt()
        if not prompt and self.demoted and self._restore():
            self.demoted = False
        reply: asyncio.Future[bytes] = loop.create_future()
        frame = memoryview(len(payload).to_bytes(4, "big") + payload)
        got = bytearray()
        timer: asyncio.TimerHandle | None = None

        def fail(exc: SandboxError) -> None:
            if not reply.done():
                reply.set_exception(exc)

        def writable() -> None:
            nonlocal frame
            try:
                frame = frame[self._write(frame) :]
            except Crashed as exc:
                fail(exc)
                return
            if not frame:
                loop.remove_writer(self._in)

        def readable() -> None:
            try:
                chunk = os.read(self._out, 1 << 20)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                fail(Crashed("the evaluation stopped (out of memory or a crash)"))
                return
            got.extend(chunk)
            if len(got) >= 4 and len(got) >= 4 + int.from_bytes(got[:4], "big"):
                if not reply.done():
                    reply.set_result(bytes(got[4:]))

        def look() -> None:
            nonlocal timer
            left = self._wait()
            if left <= 0:
                fail(TimeLimit())
            else:
                timer = loop.call_later(left, look)

        lowering: asyncio.TimerHandle | None = None

        def settle() -> None:
            nonlocal lowering
            cpu_then, cpu_now = self._clock[1], self.cpu_seconds()
            used = None if cpu_then is None or cpu_now is None else cpu_now - cpu_then
            if used is None or used >= PROMPT_SECONDS:
                self._lower()
            else:
                lowering = loop.call_later(max(0.001, PROMPT_SECONDS - used), settle)

        if prompt:
            lowering = loop.call_later(PROMPT_SECONDS, settle)
        try:
            frame = frame[self._write(frame) :]
            if frame:
                loop.add_writer(self._in, writable)
            loop.add_reader(self._out, readable)
            look()
            return await reply
        finally:
            if lowering is not None:
                lowering.cancel()
                self._lower()  # between calls a child waits at the children's priority
            if timer is not None:
                timer.cancel()
            loop.remove_writer(self._in)
            loop.remove_reader(self._out)

    def _write(self, data: memoryview) -> int:
        """What of `data` the pipe took now (0 when it is full)."""
        try:
            return os.write(self._in, data)
        except BlockingIOError:
            return 0
        except OSError as exc:  # a closed pipe: the child ended
            raise Crashed("the evaluation stopped (out of memory or a crash)") from exc

    def _demote(self) -> bool:
        try:
            if _IDLE is not None:
                os.sched_setscheduler(self.process.pid, _IDLE, os.sched_param(0))
            else:
                os.setpriority(os.PRIO_PROCESS, self.process.pid, NICE_DEMOTED)
            return True
        except OSError:
            return False

    def _prompt(self) -> bool:
        """A call starts at the service's own priority (for PROMPT_SECONDS), where the
        service may raise a child's priority back; False elsewhere."""
        if not _MAY_RAISE_PRIORITY:
            return False
        try:
            if self.demoted and _IDLE is not None:
                os.sched_setscheduler(self.process.pid, os.SCHED_OTHER, os.sched_param(0))
            os.setpriority(os.PRIO_PROCESS, self.process.pid, self._service)
        except OSError:
            return False
        self.demoted = False
        return True

    def _lower(self) -> None:
        """A call past PROMPT_SECONDS of CPU, or ended: the children's priority (nice 10)."""
        if not self.demoted:
            try:
                os.setpriority(os.PRIO_PROCESS, self.process.pid, self._nice)
            except OSError:
                pass

    def _restore(self) -> bool:
        try:
            if _IDLE is not None:
                os.sched_setscheduler(self.process.pid, os.SCHED_OTHER, os.sched_param(0))
            os.setpriority(os.PRIO_PROCESS, self.process.pid, self._nice)
            return True
        except OSError:  # raising a priority may need a privilege this process lacks
            self.retire = True
            return False

    def _wait(self) -> float:
        """Seconds the child may still take, by its CPU time (0: its time is up).

        A call that has used DEMOTE_AFTER of CPU drops its child to the lowest priority: short
        calls (most of them) go before long ones, whichever org they belong to, so a
        tenant's slow programs take the CPU that others' quick ones leave."""
        started, cpu_then, limit = self._clock
        elapsed = time.monotonic() - started
        if not self.demoted and elapsed < limit:
            cpu_now = self.cpu_seconds()
            spent = 0.0 if cpu_then is None or cpu_now is None else cpu_now - cpu_then
            if spent < DEMOTE_AFTER:
                return max(0.02, min(DEMOTE_AFTER - spent, limit - elapsed))
            self.demoted = self._demote()
        if elapsed < limit:
            return limit - elapsed
        cpu_now = self.cpu_seconds()
        if cpu_then is None or cpu_now is None or elapsed >= limit * BACKSTOP:
            return 0.0
        spent = cpu_now - cpu_then
        return 0.0 if spent >= limit else max(0.05, min(limit - spent, limit * BACKSTOP - elapsed))

    def _read(self, size: int) -> bytes:
        chunks: list[bytes] = []
        while size:
            left = self._wait()
            if left <= 0:
                raise TimeLimit
            if not select.select([self._out], [], [], left)[0]:
                continue  # look at the child's CPU time again
            try:
                chunk = os.read(self._out, min(size, 1 << 20))
            except BlockingIOError:
                continue
            if not chunk:
                raise Crashed("the evaluation stopped (out of memory or a crash)")
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        try:
            self.process.kill()
        except OSError:
            pass
        self.process.wait(timeout=5)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


@dataclass(eq=False)
class _Ticket:
    org: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    arrived: float


class _Pool:
    """The children and whose turn it is. Thread-safe: callers may live on any loop."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._idle: list[_Child] = []
        self._children = 0  # started and not ended: idle or in a call
        self._warmer: threading.Thread | None = None
        self._wake = threading.Event()
        self._busy: dict[str, int] = collections.defaultdict(int)  # org -> children held
        self._held = 0
        self._waiting: collections.OrderedDict[str, collections.deque[_Ticket]] = (
            collections.OrderedDict()
        )
        self._workdir = tempfile.mkdtemp(prefix="portolan-jq-")
        self._executor = ThreadPoolExecutor(
            max_workers=limits.processes, thread_name_prefix="portolan-jq"
        )
        self._closed = False

    # -- turns ----------------------------------------------------------------------------

    def _may_start(self, org: str) -> bool:
        return self._held < self.limits.processes and self._busy[org] < self.limits.per_org

    def _grant(self, org: str) -> None:
        self._held += 1
        self._busy[org] += 1

    async def turn(self, org: str) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._closed:
                raise Busy("the evaluation service is stopping")
            queue = self._waiting.get(org)
            if not queue and self._may_start(org):
                self._grant(org)
                return
            if queue is not None and len(queue) >= self.limits.max_queued:
                raise Busy("too many evaluations are waiting for this organization")
            ticket = _Ticket(org, loop, loop.create_future(), time.monotonic())
            self._waiting.setdefault(org, collections.deque()).append(ticket)
        try:
            async with asyncio.timeout(self.limits.max_wait):
                await ticket.future
        except BaseException as exc:
            with self._lock:
                queue = self._waiting.get(org)
                queued = queue is not None and ticket in queue
                if queue is not None and queued:
                    queue.remove(ticket)
                    if not queue:
                        del self._waiting[org]
            if not queued:  # the turn came as the caller gave up: hand it on
                self.done(org)
            if isinstance(exc, TimeoutError):
                raise Busy("no evaluation turn came within the time allowed") from None
            raise

    def done(self, org: str) -> None:
        """Give the turn back, and hand it to the org that waited longest."""
        with self._lock:
            self._held -= 1
            self._busy[org] -= 1
            if not self._busy[org]:
                del self._busy[org]
            self._hand_on()

    def _hand_on(self) -> None:
        for waiting_org in list(self._waiting):
            if self._held >= self.limits.processes:
                return
            if self._busy[waiting_org] >= self.limits.per_org:
                continue
            queue = self._waiting[waiting_org]
            ticket = queue.popleft()
            if not queue:
                del self._waiting[waiting_org]
            else:  # the org goes to the back of the line
                self._waiting.move_to_end(waiting_org)
            self._grant(waiting_org)
            try:
                ticket.loop.call_soon_threadsafe(_set, ticket.future)
            except RuntimeError:  # its loop is gone: nobody waits for this turn
                self._held -= 1
                self._busy[waiting_org] -= 1

    # -- children -------------------------------------------------------------------------
    # The pool keeps `processes` children started and warmed up (interpreter up, jq
    # imported, one tiny call made), topped up by a background thread: a call, whichever
    # org's, finds one ready instead of paying for a start, and a child ended at its time
    # limit is replaced the same way.

    def _take_idle(self) -> _Child | None:
        """A started child to call, or None: then one is to be started for the call
        (`_started_now`; it is counted already)."""
        found: _Child | None = None
        dead: list[_Child] = []
        with self._lock:
            while self._idle and found is None:
                child = self._idle.pop()
                if child.alive():
                    found = child
                else:
                    self._children -= 1
                    dead.append(child)
            if found is None:
                self._children += 1  # started for this call, on demand
        for child in dead:
            child.kill()
        self._top_up()
        return found

    def _started_now(self) -> _Child:
        """A child started for a call that waits for it: at the children's priority (the call
        waits on its start), warmed up before the call, so the start's CPU time is not
        counted against the call's (nor demotes it). Blocking: in one of the pool's threads."""
        child = self._started()
        if child is None:
            with self._lock:
                self._children -= 1
            raise Crashed("the evaluation could not start")
        return child

    def _give_back(self, child: _Child) -> bool:
        """A child whose call went well goes back to the idle ones; False when it may not."""
        with self._lock:
            if self._closed or child.retire:
                return False
            self._idle.append(child)
            return True

    def _replace(self, child: _Child) -> None:
        """Blocking, in one of the pool's threads (it lives as long as the pool): a child
        that failed or may not be used again is ended, and its successor started, still on
        the ended call's turn: the next call, maybe another org's, finds a child ready and
        the ended call's org pays for the start (at the children's priority: at the lowest,
        a busy machine could keep the turn for seconds)."""
        child.kill()
        successor = None if self._closed else self._started()
        with self._lock:
            if successor is not None and not self._closed:
                self._idle.append(successor)
                successor = None
            else:
                self._children -= 1
        if successor is not None:
            successor.kill()

    async def _run(self, payload: bytes) -> Any:
        """One call on one child, on the running loop; a large reply is parsed in one of
        the pool's threads (it does not hold up the loop)."""
        loop = asyncio.get_running_loop()
        child = self._take_idle()
        if child is None:
            try:
                child = await loop.run_in_executor(self._executor, self._started_now)
            except RuntimeError:  # the pool closed meanwhile: no start
                with self._lock:
                    self._children -= 1
                raise Busy("the evaluation service is stopping") from None
        healthy = False
        try:
            raw = await child.acall(payload, self.limits.time_limit)
            if len(raw) < _PARSE_IN_THREAD_BYTES:
                reply = json.loads(raw)
            else:
                reply = await loop.run_in_executor(self._executor, json.loads, raw)
            healthy = True
            return reply
        finally:
            if not (healthy and self._give_back(child)):
                try:
                    await loop.run_in_executor(self._executor, self._replace, child)
                except RuntimeError:  # the pool closed meanwhile: no successor
                    child.kill()
                    with self._lock:
                        self._children -= 1

    def _top_up(self) -> None:
        """Bring the children up to `processes`, warmed up, in the pool's warming thread.

        The thread lives as long as the pool: a child is ended with the thread that started
        it (PDEATHSIG is per thread), so no short-lived thread starts one."""
        with self._lock:
            if self._closed or self._children >= self.limits.processes:
                return
            if self._warmer is None:
                self._warmer = threading.Thread(
                    target=self._warm, name="portolan-jq-warm", daemon=True
                )
                self._warmer.start()
        self._wake.set()

    def _warm(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while True:
                with self._lock:
                    if self._closed:
                        return
                    if self._children >= self.limits.processes:
                        break
                    self._children += 1
                child = self._started(idle=True)
                with self._lock:
                    if child is not None and not self._closed:
                        self._idle.insert(0, child)  # taken after the children in use
                        continue
                    self._children -= 1
                if child is not None:
                    child.kill()
                break

    def _started(self, *, idle: bool = False) -> _Child | None:
        """A child started and warmed up (`idle`: at the lowest priority, taking only CPU
        nothing else wants), or None."""
        try:
            child = _Child(self._workdir, idle=idle)
        except OSError:
            return None  # started on demand instead
        try:
            json.loads(child.call(_WARM_UP, self.limits.time_limit, restore=False))
        except (OSError, SandboxError, ValueError):
            child.kill()
            return None
        return child

    async def call(self, org: str, payload: bytes) -> Any:
        await self.turn(org)
        try:
            work = asyncio.ensure_future(self._run(payload))
        except BaseException:
            self.done(org)
            raise

        # The turn is the org's until its child is free again, even if the caller gives up
        # first (a cancelled request): the call runs on to its end or its time limit.
        def finished(done: asyncio.Future[Any]) -> None:
            self.done(org)
            if not done.cancelled():
                done.exception()  # retrieved: a caller that gave up leaves no warning

        work.add_done_callback(finished)
        return await asyncio.shield(work)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        self._wake.set()  # the warming thread sees the pool closed and ends
        for child in idle:
            child.kill()
        self._executor.shutdown(wait=False)
        try:
            os.rmdir(self._workdir)
        except OSError:
            pass


def _set(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


_limits = Limits()
_pool: _Pool | None = None
_pool_lock = threading.Lock()


def configure(settings: Settings) -> None:
    """Set the limits from the settings (at start-up); a change stops running children."""
    global _limits
    wanted = Limits(
        processes=settings.jq_processes,
        per_org=min(settings.jq_per_org, settings.jq_processes),
        time_limit=settings.jq_time_limit_seconds,
        max_wait=settings.jq_max_wait_seconds,
        max_queued=settings.jq_max_queued_per_org,
    )
    global _compile_rate, _compile_burst
    _compile_rate = settings.jq_compile_share
    _compile_burst = settings.jq_compile_burst_seconds
    if wanted != _limits:
        _limits = wanted
        shutdown()


def limits() -> Limits:
    return _limits


# -- checking definitions ---------------------------------------------------------------------
# A definition's jq is compiled in this process, on its event loop, to answer its author at
# once (app/catalog/validation.py `check_jq`). Each org's compiling is paced by a bucket of
# seconds: it fills at `jq_compile_share` seconds per second up to `jq_compile_burst_seconds`,
# and an org whose bucket is empty is told to come back (Busy: 503 with Retry-After), so one
# org's definitions take at most that share of the loop from the others.

_compiling_org: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "portolan_compiling_org", default=None
)
_compile_rate = 0.05
_compile_burst = 1.0
_compile_buckets: dict[str, tuple[float, float]] = {}  # org -> (seconds left, when)


def compiling_for(org: object) -> None:
    """The org whose definitions this request (task) checks."""
    _compiling_org.set(str(org))


def _bucket(org: str, now: float) -> float:
    left, when = _compile_buckets.get(org, (_compile_burst, now))
    return min(_compile_burst, left + (now - when) * _compile_rate)


def before_compile() -> None:
    """Raise Busy when the current org has spent its share of compiling."""
    org = _compiling_org.get()
    if org is None:
        return
    left = _bucket(org, time.monotonic())
    if left <= 0:
        busy = Busy("this organization's definitions are being checked too fast: retry shortly")
        busy.retry_after = max(1, int(-left / _compile_rate) + 1)
        raise busy


def after_compile(seconds: float) -> None:
    org = _compiling_org.get()
    if org is None:
        return
    now = time.monotonic()
    _compile_buckets[org] = (_bucket(org, now) - seconds, now)
    if len(_compile_buckets) > 10_000:  # forget the orgs whose buckets are full again
        for key, (left, when) in list(_compile_buckets.items()):
            if left + (now - when) * _compile_rate >= _compile_burst:
                del _compile_buckets[key]


def _get_pool() -> _Pool:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = _Pool(_limits)
        return _pool


def shutdown() -> None:
    """Stop the children (started again on demand)."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.close()


def request(
    programs: Sequence[str], documents: Sequence[str], *, outputs: int, output_limit: int
) -> bytes:
    """One call's frame for a child (app/kit/jq_child.py)."""
    documents = [d.replace("\n", " ") if "\n" in d else d for d in documents]
    header = json.dumps(
        {
            "p": list(programs),
            "n": outputs,
            "o": output_limit,
            "t": REPLY_LIMIT_BYTES,
            "c": _limits.time_limit * BACKSTOP,
        }
    )
    return "\n".join([header, *documents]).encode()


async def evaluate(
    org: object,
    programs: Sequence[str],
    documents: Sequence[str],
    *,
    outputs: int,
    output_limit: int,
) -> list[list[Result]]:
    """For each document (compact JSON text), for each program: (True, its first `outputs`
    outputs) or (False, jq's message). `org` is the tenant the programs belong to. Raises
    TimeLimit, Crashed or Busy when the call as a whole gave nothing."""
    if not programs or not documents:
        return [[] for _ in documents]
    payload = request(programs, documents, outputs=outputs, output_limit=output_limit)
    decoded: list[list[list[Any]]] = await _get_pool().call(str(org), payload)
    return [[(bool(ok), value) for ok, value in row] for row in decoded]
