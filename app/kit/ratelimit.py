"""Rate limits: a token bucket per organization and route class, kept in Redis.

Classes: `entity_reads` (GET of entities), `entity_writes` (creating, changing, deleting
entities), `search` (entity searches and aggregations, dashboard widgets' data), `other`
(everything else that an organization's token calls). Incoming webhook events have two
more: `webhook_events` (one bucket per webhook) and `webhook_events_org` (one per
organization, all its webhooks), with their own period. Each bucket holds `limit` tokens
and refills at `limit / period` per second; a request takes one. The bucket lives in Redis
(one Lua call per request, atomic, Redis's clock), so every API replica shares it.

A process takes a bucket's tokens from Redis a few at a time (`lease_size`: one below a
limit of 2,000, at most ten), uses them for its next requests within LEASE_SECONDS and drops
what it did not use: one Redis round trip per lease instead of one per request. Leased
tokens are taken from the shared bucket, so an org never gets more than its limit; with
several replicas it may be refused up to (replicas - 1) x lease tokens early. A refusal is
remembered until a token is due back (no Redis round trip per refused request either).

Every limited response carries `x-ratelimit-limit`, `x-ratelimit-remaining`,
`x-ratelimit-reset` (seconds until the bucket is full again) and `x-ratelimit-period`
(seconds); over the limit the answer is 429 with `Retry-After` (seconds until a token is
back). When Redis cannot be reached the API keeps serving — the limit is not enforced
(fail open), which is logged, and Redis is left alone for a few seconds before it is tried
again, so an outage costs no request a timeout.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from app.config import Settings
from app.kit.errors import PortolanError

log = logging.getLogger("portolan.ratelimit")
STATE_KEY = "portolan_ratelimit"
_RETRY_REDIS_AFTER = 5.0
LEASE_SECONDS = 1.0
_MAX_LEASE = 10


def lease_size(limit: int) -> int:
    """Tokens taken from Redis at once for a bucket of `limit` (1 for small limits, where
    every token counts)."""
    return max(1, min(_MAX_LEASE, limit // 1000))


# KEYS[1] bucket; ARGV: capacity, refill per second, tokens wanted. Takes as many of them as
# there are whole tokens. Returns {tokens taken, tokens left (floor), ms until full, ms
# until one token}. The bucket expires once it would be full anyway.
_SCRIPT = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local wanted = tonumber(ARGV[3])
local now = redis.call('TIME')
local t = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil then
  tokens = capacity
  at = t
end
tokens = math.min(capacity, tokens + (t - at) * rate / 1000)
local allowed = math.min(wanted, math.floor(tokens))
if allowed < 0 then
  allowed = 0
end
tokens = tokens - allowed
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(t))
local full_ms = math.ceil((capacity - tokens) * 1000 / rate)
redis.call('PEXPIRE', KEYS[1], full_ms + 1000)
local next_ms = 0
if tokens < 1 then
  next_ms = math.ceil((1 - tokens) * 1000 / rate)
end
return {allowed, math.floor(tokens), full_ms, next_ms}
"""


class RateLimited(PortolanError):
    status_code = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    reset: int
    period: int
    retry_after: int

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The response headers that tell the caller where its bucket stands."""
        return [
            (b"x-ratelimit-limit", str(self.limit).encode()),
            (b"x-ratelimit-remaining", str(self.remaining).encode()),
            (b"x-ratelimit-reset", str(self.reset).encode()),
            (b"x-ratelimit-period", str(self.period).encode()),
        ]


def route_class(method: str, path: str) -> str:
    """The class of a route, from its method and path template."""
    if path.endswith(
        (
            "/entities/search",
            "/entities/aggregate",
            "/datasource-entities",
            "/entities/properties-history",
            "/entities/aggregate-over-time",
            "/widgets/{widget_id}/data",
        )
    ):
        return "search"
    if path.startswith("/v1/blueprints/{blueprint}/") and (
        "/entities" in path or path.endswith("/all-entities")
    ):
        return "entity_reads" if method in ("GET", "HEAD") else "entity_writes"
    return "other"


@dataclass(slots=True)
class _Lease:
    """A bucket's tokens this process holds (`left`), and where the bucket stood when they
    were taken; or, with `denied_until`, a refusal remembered until a token is due back."""

    left: int
    remaining: int
    full_at: float
    until: float
    denied_until: float = 0.0


class Limiter:
    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.rate_limit_enabled
        self.period = settings.rate_limit_period_seconds
        self.limits = {
            "entity_reads": settings.rate_limit_entity_reads,
            "entity_writes": settings.rate_limit_entity_writes,
            "search": settings.rate_limit_search,
            "other": settings.rate_limit_other,
            "webhook_events": settings.webhook_rate_limit_per_webhook,
            "webhook_events_org": settings.webhook_rate_limit_per_org,
        }
        self.periods = {
            "webhook_events": settings.webhook_rate_limit_period_seconds,
            "webhook_events_org": settings.webhook_rate_limit_period_seconds,
        }
        self._redis = Redis.from_url(
            settings.redis_url or "redis://127.0.0.1:6379",
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
        )
        self._script: Any = self._redis.register_script(_SCRIPT)
        self._down_until = 0.0
        self._leases: dict[str, _Lease] = {}

    async def close(self) -> None:
        await self._redis.aclose()

    async def take(self, org_id: uuid.UUID, kind: str, part: str | None = None) -> Verdict | None:
        """One token of the org's bucket for the class (the verdict says whether there was
        one); None when limits are off or Redis is unreachable (fail open). `part` names
        one of the org's buckets of the class (a webhook's, for `webhook_events`)."""
        now = time.monotonic()
        if not self.enabled or now < self._down_until:
            return None
        limit = self.limits[kind]
        period = self.periods.get(kind, self.period)
        key = f"portolan:rl:{org_id}:{kind}" + ("" if part is None else f":{part}")
        lease = self._leases.get(key)
        if lease is not None:
            if now < lease.denied_until:
                return Verdict(
                    allowed=False,
                    limit=limit,
                    remaining=0,
                    reset=math.ceil(max(0.0, lease.full_at - now)),
                    period=period,
                    retry_after=max(1, math.ceil(lease.denied_until - now)),
                )
            if lease.left > 0 and now < lease.until:
                lease.left -= 1
                return Verdict(
                    allowed=True,
                    limit=limit,
                    remaining=lease.remaining + lease.left,
                    reset=math.ceil(max(0.0, lease.full_at - now)),
                    period=period,
                    retry_after=1,
                )
        wanted = lease_size(limit)
        try:
            taken, remaining, full_ms, next_ms = await self._script(
                keys=[key], args=[limit, limit / period, wanted]
            )
        except Exception as exc:  # any Redis failure: serve, and say so
            self._down_until = time.monotonic() + _RETRY_REDIS_AFTER
            log.warning(
                "rate limits not enforced for %.0f s: Redis unreachable (%s)",
                _RETRY_REDIS_AFTER,
                type(exc).__name__,
            )
            return None
        now = time.monotonic()
        taken, remaining = int(taken), int(remaining)
        full_at = now + int(full_ms) / 1000
        lease = self._leases.get(key)
        if taken == 0:
            denied_until = now + int(next_ms) / 1000
            self._keep(key, _Lease(0, 0, full_at, now, denied_until=denied_until))
        elif lease is not None and lease.left > 0 and now < lease.until:
            lease.left += taken - 1  # tokens leased by a request that ran alongside
            lease.remaining, lease.full_at = remaining, full_at
        elif taken > 1:
            self._keep(key, _Lease(taken - 1, remaining, full_at, now + LEASE_SECONDS))
        else:
            self._leases.pop(key, None)
        left = self._leases[key].left if key in self._leases else 0
        return Verdict(
            allowed=taken > 0,
            limit=limit,
            remaining=remaining + left,
            reset=math.ceil(int(full_ms) / 1000),
            period=period,
            retry_after=max(1, math.ceil(int(next_ms) / 1000)),
        )

    def _keep(self, key: str, lease: _Lease) -> None:
        self._leases[key] = lease
        if len(self._leases) > 10_000:  # forget the ended ones
            now = time.monotonic()
            for k in [k for k, v in self._leases.items() if v.until < now and v.denied_until < now]:
                del self._leases[k]


async def enforce(
    scope: MutableMapping[str, Any], limiter: Limiter, org_id: uuid.UUID, method: str
) -> None:
    """Take a token for the request (its class from the matched route), note the verdict
    for the response headers, and raise RateLimited when there was none."""
    route = scope.get("route")
    kind = route_class(method, getattr(route, "path", "") or scope.get("path", ""))
    verdict = await limiter.take(org_id, kind)
    if verdict is None:
        return
    scope.setdefault("state", {})[STATE_KEY] = verdict
    if not verdict.allowed:
        raise RateLimited(
            f"Rate limit of {verdict.limit} {kind.replace('_', ' ')} requests per "
            f"{verdict.period} s reached for this organization",
            retry_after=verdict.retry_after,
        )
