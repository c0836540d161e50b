"""Live streams (server-sent events) of a run's progress: an action run's logs, a workflow
run's node runs and logs. `follow` serves one; the caller supplies how to look.

At most `run_log_streams_per_org` of an organization's streams (of every kind) are open at
once, across every API process.

Each open stream holds a slot: a member of the org's sorted set in Redis, scored with the
time its lease ends. A stream renews its lease while it runs and gives the slot back when
it ends; a process that died leaves slots that lapse with their lease. Taking a slot is one
Lua call that first drops lapsed slots, then adds the new one only while the org has fewer
than its cap. With Redis unreachable, each process counts its own streams against the same
cap (logged), so a stream is never refused for Redis's sake alone and never uncapped.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from redis.asyncio import Redis
from starlette.requests import Request
from starlette.responses import StreamingResponse

from app.auth.principal import Principal, principal_of
from app.config import Settings
from app.db.database import Database, Tx
from app.kit.errors import PortolanError, Unauthorized
from app.kit.ratelimit import RateLimited
from app.kit.responses import to_json

log = logging.getLogger("portolan.streams")

LEASE_SECONDS = 60
RETRY_AFTER_SECONDS = 10
POLL_SECONDS = 0.25
MAX_POLL_SECONDS = 2.0
HEARTBEAT_SECONDS = 15.0
_KEY = "portolan:run-log-streams:{org}"

# KEYS[1]: the org's set; ARGV: cap, lease (ms), member. 1 when the slot was taken.
_TAKE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + 1000)
return 1
"""
# KEYS[1]: the org's set; ARGV: lease (ms), member. Only a slot still held is renewed.
_RENEW = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local held = redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[1]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) + 1000)
return held
"""

_local: dict[uuid.UUID, set[str]] = {}


class TooManyStreams(RateLimited):
    """429 `rate_limited` with Retry-After: the org has its cap of live streams open."""


class Slot:
    """One stream's slot (see the module's docstring)."""

    def __init__(self, redis: Redis, org_id: uuid.UUID, cap: int) -> None:
        self._redis = redis
        self.org_id = org_id
        self.cap = cap
        self.member = uuid.uuid4().hex
        self._key = _KEY.format(org=org_id)
        self._in_redis = False

    async def take(self) -> None:
        """Takes the slot, or raises TooManyStreams."""
        try:
            taken = await self._call(_TAKE, self.cap, LEASE_SECONDS * 1000, self.member)
            self._in_redis = True
        except Exception as exc:
            log.warning("stream slots: Redis unreachable (%s); counted per process", exc)
            mine = _local.setdefault(self.org_id, set())
            taken = len(mine) < self.cap
            if taken:
                mine.add(self.member)
        if not taken:
            raise TooManyStreams(
                f"The organization has {self.cap} live streams open, its limit; "
                "close one or try again later",
                retry_after=RETRY_AFTER_SECONDS,
            )

    async def renew(self) -> None:
        if not self._in_redis:
            return
        try:
            await self._call(_RENEW, LEASE_SECONDS * 1000, self.member)
        except Exception as exc:
            log.warning("stream slots: could not renew a lease (%s)", exc)

    async def release(self) -> None:
        mine = _local.get(self.org_id)
        if mine is not None:
            mine.discard(self.member)
            if not mine:
                _local.pop(self.org_id, None)
        if self._in_redis:
            try:
                await self._redis.zrem(self._key, self.member)
            except Exception as exc:
                log.warning("stream slots: could not give a slot back (%s); it lapses", exc)

    async def _call(self, script: str, *args: Any) -> int:
        result: Any = self._redis.eval(script, 1, self._key, *args)
        return int(await result)


# -- Serving a stream ---------------------------------------------------------------------


@dataclass
class Look:
    """What one look at the run found: the events to send (in order), whether the stream
    is over (the run ended and everything about it was sent), and whether there may be
    more to send at once (a page was full)."""

    events: list[bytes] = field(default_factory=list)
    ended: bool = False
    more: bool = False


def event(name: str, data: Any, event_id: str | int | None = None) -> bytes:
    """One server-sent event; `data` is made JSON. `event_id` is what `Last-Event-ID`
    names when the client resumes."""
    head = f"event: {name}\n" + (f"id: {event_id}\n" if event_id is not None else "")
    return head.encode() + b"data: " + to_json(data) + b"\n\n"


def ended_by(error: PortolanError) -> bytes:
    """The `error` event that ends a stream, in Port's error shape."""
    return event("error", error.body())


async def follow(
    request: Request, principal: Principal, look: Callable[[Tx], Awaitable[Look]]
) -> StreamingResponse:
    """Serve a live stream: `look` is called in a short tenant transaction of its own,
    again and again, and what it finds is sent, until it says the stream is over.

    The caller has already checked the run exists and may be read. Here: the org's slot is
    taken (TooManyStreams, a 429, before any byte is sent) and given back however the
    stream ends; no database connection is held between looks, which grow rarer while
    nothing happens (and spread, so streams opened together do not look together); a
    machine credential is checked by every look's opening statement (deleted or rotated:
    an `error` event ends the stream), the token and a person's membership every
    `run_log_stream_recheck_seconds`."""
    settings: Settings = request.app.state.settings
    db: Database = request.app.state.db
    token = request.headers.get("authorization", "").partition(" ")[2].strip()
    identity = await request.app.state.verifier.verify(token)
    credential = (principal.subject, identity.issued_at) if principal.kind == "app" else None
    slot = Slot(request.app.state.redis, principal.org_id, settings.run_log_streams_per_org)
    await slot.take()
    recheck = settings.run_log_stream_recheck_seconds

    async def still_allowed() -> PortolanError | None:
        """Why the caller may no longer follow the stream, if so."""
        try:
            await request.app.state.verifier.verify(token)
        except PortolanError as exc:
            return exc
        if principal.kind == "user":
            async with db.tenant(principal.org_id) as tx:
                if await principal_of(tx, principal.subject) is None:
                    return Unauthorized(
                        "The user is not a member of the organization", code="unknown_user"
                    )
        return None

    async def one_look() -> Look:
        # A machine credential is checked by the transaction's opening statement
        # (Unauthorized when deleted or rotated).
        tx, conn = await db.begin_tenant(principal.org_id, credential=credential)
        ok = False
        try:
            found = await look(tx)
            ok = True
        finally:
            await db.finish(conn, commit=ok)
        return found

    async def events() -> AsyncIterator[bytes]:
        idle = 0.0
        wait = POLL_SECONDS
        clock = asyncio.get_running_loop().time
        next_check = clock() + recheck
        try:
            while True:
                if clock() >= next_check:
                    gone = await still_allowed()
                    if gone is not None:
                        yield ended_by(gone)
                        return
                    await slot.renew()
                    next_check = clock() + recheck
                try:
                    found = await one_look()
                except PortolanError as exc:
                    yield ended_by(exc)
                    return
                for chunk in found.events:
                    yield chunk
                if found.ended:
                    return
                if found.more:
                    idle, wait = 0.0, POLL_SECONDS
                    continue
                if found.events:
                    idle, wait = 0.0, POLL_SECONDS
                if await request.is_disconnected():
                    return
                await asyncio.sleep(wait)
                idle += wait
                wait = min(MAX_POLL_SECONDS, wait * 2) * random.uniform(0.75, 1.0)  # noqa: S311
                if idle >= HEARTBEAT_SECONDS:
                    idle = 0.0
                    yield b": keep-alive\n\n"
        finally:
            # Also when the client went away and the response is being cancelled (anyio
            # cancels every await in its scope): the slot is given back all the same.
            with anyio.CancelScope(shield=True):
                await slot.release()

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
