"""Start-up wiring: every domain's reactions to other domains' changes subscribe to the
seam (app/kit/reactions.py). Called once per process by each entry point (the API app, the
worker, the CLI commands that write), before any write."""

from __future__ import annotations

from app.history import reactions as history
from app.kit import reactions
from app.pages import reactions as pages
from app.scorecards import reactions as scorecards


def connect() -> None:
    """Subscribe every reaction (idempotent)."""
    scorecards.subscribe()
    history.subscribe()
    pages.subscribe()
    reactions.connected()
