"""Rate limits of incoming webhook events: one bucket per webhook and one per organization.

An event takes a token from its webhook's bucket first and then from its organization's,
once the webhook is known, its signature verified and it is enabled (so requests that are
refused anyway, e.g. forged or unsigned floods, spend nobody's tokens), and before anything
is stored or any jq runs. A flood on one webhook is refused by that webhook's bucket and
spends no token of the organization's, so the organization's other webhooks keep taking
events; every organization has its own buckets. Over either limit the answer is 429
`rate_limited` with `Retry-After` and nothing is stored: an event is stored (and then
processed) only once it had both tokens, so an accepted event is never dropped by a limit.
The buckets are those of app/kit/ratelimit.py (Redis, shared by every replica, fail open).
"""

from __future__ import annotations

import uuid
from collections.abc import MutableMapping
from typing import Any

from app.kit.ratelimit import STATE_KEY, Limiter, RateLimited


async def take_event_tokens(
    scope: MutableMapping[str, Any], limiter: Limiter, org_id: uuid.UUID, webhook: str
) -> None:
    """Take the event's tokens (its webhook's, then its org's); RateLimited without one.
    The response's x-ratelimit headers tell the tighter of the two buckets."""
    buckets = (
        ("webhook_events", webhook, f"webhook {webhook!r}"),
        ("webhook_events_org", None, "this organization's webhooks"),
    )
    state = scope.setdefault("state", {})
    for kind, part, whose in buckets:
        verdict = await limiter.take(org_id, kind, part)
        if verdict is None:
            continue
        noted = state.get(STATE_KEY)
        if noted is None or not verdict.allowed or verdict.remaining < noted.remaining:
            state[STATE_KEY] = verdict
        if not verdict.allowed:
            raise RateLimited(
                f"Rate limit of {verdict.limit} events per {verdict.period} s reached for "
                f"{whose}: the event was not stored; send it again after Retry-After seconds",
                retry_after=verdict.retry_after,
            )
