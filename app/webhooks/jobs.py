"""The worker's webhook jobs (registered in app/worker.py)."""

from __future__ import annotations

import uuid
from typing import Any

from app.config import Settings
from app.webhooks import processing


async def process_webhook_events(ctx: dict[str, Any], org_id: str, webhook: str) -> int:
    """Queued by ingest once an event is stored: the webhook's pending events, in order."""
    return await processing.process_webhook(ctx["db"], uuid.UUID(org_id), webhook)


async def process_pending_webhook_events(ctx: dict[str, Any]) -> int:
    """Every webhook's pending events, whether or not their job reached a worker."""
    return await processing.process_pending(ctx["db"])


async def prune_webhook_events(ctx: dict[str, Any]) -> int:
    """Processed events older than PORTOLAN_WEBHOOK_EVENT_RETENTION_DAYS are deleted."""
    settings: Settings = ctx["settings"]
    return await processing.prune(ctx["db"], settings.webhook_event_retention_days)
