"""Live run-log streams' slots: at most `run_log_streams_per_org` of an organization's
streams are open at once, across every API process.

Each open stream holds a slot: a member of the org's sorted set in Redis, scored with the
time its lease ends. A stream renews its lease while it runs and gives the slot back when
it ends; a process that died leaves slots that lapse with their lease. Taking a slot is one
Lua call that first drops lapsed slots, then adds the new one only while the org has fewer
than its cap. With Redis unreachable, each process counts its own streams against the same
cap (logged), so a stream is never refused for Redis's sake alone and never uncapped.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from redis.asyncio import Redis

from app.kit.ratelimit import RateLimited

log = logging.getLogger("portolan.streams")

LEASE_SECONDS = 60
RETRY_AFTER_SECONDS = 10
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
                f"The organization has {self.cap} live run-log streams open, its limit; "
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
