"""create_app(): routers, middleware, error handlers and the lifespan that owns connections."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from redis.asyncio import Redis

from app import __version__, wiring
from app.actions.router import router as action_router
from app.actions.run_router import router as run_router
from app.audit.router import router as audit_router
from app.auth import jwks
from app.auth.apps import router as apps_router
from app.auth.oidc_router import router as oidc_router
from app.auth.router import router as auth_router
from app.auth.tokens import TokenService
from app.auth.verifier import Verifier
from app.catalog.datasource_router import router as datasource_router
from app.catalog.entity_router import router as entity_router
from app.catalog.router import router as catalog_router
from app.config import Settings, get_settings
from app.db.database import Database
from app.history.router import router as history_router
from app.integrations.router import router as integration_router
from app.kit import sandbox
from app.kit.client import Client
from app.kit.http import RequestContextMiddleware, install_error_handlers
from app.kit.ratelimit import Limiter
from app.ops.router import router as ops_router
from app.orgs.router import router as orgs_router
from app.pages.router import router as pages_router
from app.people.router import teams_router, users_router
from app.scorecards.router import router as scorecard_router
from app.search.router import router as search_router
from app.secrets.router import router as secrets_router
from app.webhooks.router import router as webhook_router
from app.worker import InProcessWorker
from app.workflows.router import router as workflow_router

DESCRIPTION = (
    "Portolan is a multi-tenant internal developer portal backend. Its `/v1` API follows "
    'Port\'s public API shapes. Errors answer `{"ok": false, "error", "message"}`.'
)


def create_app(settings: Settings | None = None, *, with_worker: bool = False) -> FastAPI:
    """Build the ASGI app. Nothing connects until the lifespan starts, so the app can be
    built offline (OpenAPI export)."""
    settings = settings or get_settings()
    wiring.connect()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Read from app.state at start-up, so a test can point a built app elsewhere.
        settings: Settings = app.state.settings
        sandbox.configure(settings)
        app.state.tokens = TokenService(settings)
        db = await Database.connect(settings)
        app.state.verifier = Verifier(
            settings, app.state.tokens, db, Client(read_limit=jwks.READ_LIMIT_BYTES)
        )
        redis = Redis.from_url(settings.redis_url or "redis://127.0.0.1:6379")
        app.state.db = db
        app.state.redis = redis
        app.state.limiter = Limiter(settings)
        worker = InProcessWorker(settings) if with_worker else None
        if worker is not None:
            worker.start()
        try:
            yield
        finally:
            if worker is not None:
                await worker.stop()
            await app.state.limiter.close()
            await app.state.verifier.aclose()
            await redis.aclose()
            await db.close()
            sandbox.shutdown()

    app = FastAPI(
        title="Portolan",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_url="/openapi.json",
        # The API's only scheme is a bearer token: Swagger UI needs no OAuth2 redirect page
        # (an undocumented route that would run its script without the API's CSP).
        swagger_ui_oauth2_redirect_url=None,
    )
    app.state.settings = settings

    install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=True,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "X-Request-Id",
                "Idempotency-Key",
                "X-Portolan-Org",  # the org an identity provider's token signs in to
            ],
            expose_headers=[
                "X-Request-Id",
                "X-RateLimit-Limit",
                "X-RateLimit-Remaining",
                "X-RateLimit-Reset",
                "X-RateLimit-Period",
                "Retry-After",
            ],
        )
    # Added last, so outermost: every response (CORS preflights too) carries a request id.
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes)

    app.include_router(ops_router)
    app.include_router(auth_router)
    app.include_router(apps_router)
    app.include_router(orgs_router)
    app.include_router(oidc_router)
    app.include_router(users_router)
    app.include_router(teams_router)
    app.include_router(datasource_router)  # before /v1/blueprints/{identifier}/...
    app.include_router(catalog_router)
    app.include_router(search_router)
    app.include_router(entity_router)
    app.include_router(history_router)
    app.include_router(scorecard_router)
    app.include_router(secrets_router)
    app.include_router(run_router)  # before the action routes: /v1/actions/runs
    app.include_router(action_router)
    app.include_router(audit_router)
    app.include_router(webhook_router)
    app.include_router(integration_router)
    app.include_router(workflow_router)
    app.include_router(pages_router)
    return app
