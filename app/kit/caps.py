"""Per-org caps on work that is heavy for the database: at most `limit` of one org's at
once in this process; the next is refused at once (429 with Retry-After) rather than
queued, so it holds no connection while it waits and other orgs' work is not behind it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from app.kit.ratelimit import RateLimited

RETRY_AFTER_SECONDS = 1


class OrgCap:
    def __init__(self, what: str) -> None:
        self.what = what  # "history reads": named in the refusal
        self._held: dict[object, int] = {}

    def held(self, org: object) -> int:
        return self._held.get(org, 0)

    @contextmanager
    def hold(self, org: object, limit: int) -> Iterator[None]:
        """One of the org's `limit` places for the duration of the block, or RateLimited."""
        taken = self._held.get(org, 0)
        if taken >= limit:
            raise RateLimited(
                f"This organization already has {taken} {self.what} running, its limit in "
                "this process; try again when one ends",
                retry_after=RETRY_AFTER_SECONDS,
            )
        self._held[org] = taken + 1
        try:
            yield
        finally:
            left = self._held[org] - 1
            if left:
                self._held[org] = left
            else:
                del self._held[org]
