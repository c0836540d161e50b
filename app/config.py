"""Portolan's settings: the one place that reads the environment (prefix PORTOLAN_)."""

from __future__ import annotations

import base64
import binascii
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Development defaults; production refuses to start with any of these.
DEV_SECRET_KEY = "dev-only-secret-key-change-me-0123456789abcdef"  # noqa: S105
DEV_ENCRYPTION_KEY = "ZGV2LW9ubHktZW5jcnlwdGlvbi1rZXktY2hhbmdlLW0="
DEV_PLATFORM_TOKEN = "dev-only-platform-token"  # noqa: S105


class ConfigError(RuntimeError):
    """Raised when the settings cannot be used (e.g. default secrets in production)."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PORTOLAN_", env_file=".env", extra="ignore", case_sensitive=False
    )

    env: Literal["development", "test", "production"] = "development"
    database_url: str | None = Field(
        default=None,
        description="Plain postgresql:// URL. Unset: an embedded PostgreSQL under data_dir.",
    )
    redis_url: str | None = Field(
        default=None, description="redis:// URL. Unset: an embedded Redis under data_dir."
    )
    data_dir: Path = Path(".portolan")
    # Citus (docs/scaling.md): `auto` uses it when the database has the extension, `on`
    # requires it, `off` treats the database as a single PostgreSQL even when it has it.
    citus: Literal["auto", "on", "off"] = "auto"
    # Shards per distributed table when `portolan migrate` distributes the schema.
    citus_shard_count: int = Field(default=32, ge=1, le=4096)
    secret_key: SecretStr = SecretStr(DEV_SECRET_KEY)
    encryption_key: SecretStr = SecretStr(DEV_ENCRYPTION_KEY)
    platform_token: SecretStr | None = SecretStr(DEV_PLATFORM_TOKEN)
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Hosts or CIDRs outbound calls may reach although they are private or loopback
    # (app/kit/outbound.py), comma-separated: `127.0.0.1/32,hooks.internal`.
    outbound_allow: Annotated[list[str], NoDecode] = Field(default_factory=list)

    token_ttl_seconds: int = Field(default=3600, ge=60, le=86400)
    token_issuer: str = "portolan"  # noqa: S105 - a name, not a secret
    token_audience: str = "portolan-api"  # noqa: S105
    public_url: str = "http://127.0.0.1:8000"

    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    # The HTTP server (app/kit/serving.py), before any authentication: the largest request
    # head (request line and headers; 431 past it), how long a request's head may take to
    # arrive (from the connection's opening or the request's first byte; 408 and closed),
    # how long a request body still being sent may pause, and how long an idle keep-alive
    # connection stays open.
    http_max_header_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    http_header_timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    http_body_idle_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    http_keep_alive_seconds: int = Field(default=5, ge=1, le=3600)
    # The server's event loop: "fair" takes ready callbacks in fair turns by org
    # (app/kit/fairloop.py); "uvloop" is uvicorn's fastest loop, first come first served.
    event_loop: Literal["fair", "uvloop"] = "fair"
    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=20, ge=0)
    # One org holds at most this share of the pool's connections; a freed connection goes
    # to the waiting org that holds the fewest (app/db/pool.py).
    db_org_share: float = Field(default=0.5, gt=0, le=1)
    # Any one statement (a search, an aggregation, a bulk write) is stopped after this.
    statement_timeout_ms: int = Field(default=15_000, ge=100)
    # A request whose transaction PostgreSQL aborts for a deadlock or a serialization
    # failure is run again from the start, up to this many attempts in all; then 503 with
    # Retry-After (app/db/routing.py).
    db_retry_attempts: int = Field(default=4, ge=1, le=20)
    # Tenants' jq (app/kit/sandbox.py): child processes in all, children one org may hold
    # at once, seconds of a child per evaluation, seconds a call may wait for its turn,
    # calls one org may have waiting.
    jq_processes: int = Field(default=2, ge=1, le=64)
    jq_per_org: int = Field(default=1, ge=1, le=64)
    jq_time_limit_seconds: float = Field(default=2.0, gt=0, le=60)
    jq_max_wait_seconds: float = Field(default=10.0, gt=0, le=300)
    jq_max_queued_per_org: int = Field(default=200, ge=1)
    # Definitions' jq is compiled on the server's event loop to check it: one org may spend
    # this share of one process's time on it, over bursts of up to this many seconds.
    jq_compile_share: float = Field(default=0.05, gt=0, le=1)
    jq_compile_burst_seconds: float = Field(default=1.0, gt=0, le=60)
    # Number and date-time properties get a range index, and titles, identifiers and string
    # properties a text (trigram) index (app/search/indexes.py), once their blueprint holds
    # this many entities, unless their schema says `"indexed": false`.
    range_index_min_entities: int = Field(default=10_000, ge=1)
    # At most this many range and text indexes per organization, together: every index on
    # the shared entities table is weighed when any tenant's statement is planned. Beyond
    # it, properties are not indexed (logged; flagged and timer properties first).
    range_index_max_per_org: int = Field(default=30, ge=0)
    log_level: str = "INFO"
    queue_name: str = Field(default="portolan:queue", min_length=1)

    # Dispatch of action runs (app/dispatch): where GitHub's and GitLab's APIs are (GitHub
    # Enterprise / self-managed GitLab), how long one call may take, how transient failures
    # are retried (exponential backoff from the base, with jitter, capped), and how long a
    # worker's claim on a run lasts before the sweeper hands the run to another worker.
    github_api_url: str = "https://api.github.com"
    gitlab_api_url: str = "https://gitlab.com/api/v4"
    dispatch_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    dispatch_retry_base_seconds: float = Field(default=2.0, gt=0, le=3600)
    dispatch_retry_max_seconds: float = Field(default=300.0, gt=0, le=86400)
    dispatch_max_attempts: int = Field(default=8, ge=1, le=100)
    dispatch_lease_seconds: float = Field(default=60.0, gt=0, le=3600)
    # A run handed to the queue but not claimed by a worker within this is handed again
    # (the queue lost it: Redis restarted empty, or its worker died before claiming it).
    dispatch_requeue_seconds: float = Field(default=30.0, gt=0, le=3600)
    # Runs of one organization handed to the workers at once (queued or being dispatched);
    # the rest wait in the outbox, so one org's slow receivers or templates never fill the
    # workers' job slots (app/dispatch/relay.py).
    dispatch_org_concurrency: int = Field(default=8, ge=1, le=1000)
    # Changelog deliveries (app/automations/changelog.py) in flight at once per worker
    # process: in all, and of one organization (a slow receiver holds only its org's).
    changelog_concurrency: int = Field(default=50, ge=1, le=1000)
    changelog_org_concurrency: int = Field(default=4, ge=1, le=1000)
    # The event feed (app/automations/feed.py): organizations' passes at once per worker
    # process, and conditions of one organization evaluated at once.
    automation_concurrency: int = Field(default=8, ge=1, le=1000)
    automation_org_concurrency: int = Field(default=2, ge=1, le=100)
    # Scorecard evaluation (app/scorecards/evaluate.py): organizations evaluated at once by
    # one pass, and the backoff of a failing evaluation (doubling from the base per failure
    # in a row, up to the max).
    scorecard_concurrency: int = Field(default=4, ge=1, le=100)
    scorecard_retry_base_seconds: float = Field(default=30.0, gt=0, le=86400)
    scorecard_retry_max_seconds: float = Field(default=3600.0, gt=0, le=86400)
    # Live run-log streams (app/actions/streams.py): at most this many of an organization's
    # open at once (429 beyond), and how often a stream checks its caller's token and
    # membership (a machine credential is checked on every look at the run).
    run_log_streams_per_org: int = Field(default=20, ge=1, le=10_000)
    # Pages and dashboards (docs/dashboards.md): at most this many pages per organization,
    # and this many widgets on one page (a dashboard's wrapper and the widgets it holds
    # counted together); one more is a 422.
    pages_max_per_org: int = Field(default=500, ge=1, le=100_000)
    # Data migrations (docs/migrations.md): at most this many of one organization's are
    # pending or running (one more is a 409), and a worker process has at most this many
    # organizations' batches in work at once.
    migrations_max_active_per_org: int = Field(default=3, ge=1, le=1000)
    migrations_concurrency: int = Field(default=4, ge=1, le=256)
    page_widgets_max: int = Field(default=100, ge=1, le=10_000)
    run_log_stream_recheck_seconds: float = Field(default=5.0, gt=0, le=3600)
    # Entity history (docs/history.md): events older than this many days are pruned daily,
    # each entity's last one before the horizon kept. Unset: history is kept for ever.
    history_retention_days: int | None = Field(default=None, ge=1, le=36500)
    # `$history` reads of aggregate-over-time (the route and line-chart widgets): at most
    # this many of one organization's at once per server process (429 beyond).
    history_reads_per_org: int = Field(default=2, ge=1, le=1000)

    # Incoming webhooks (app/webhooks): the largest event body one takes (Port's limit is
    # 512 KiB; a body over max_body_bytes is refused before it), and how many days events
    # are kept once they were processed.
    webhook_max_body_bytes: int = Field(default=512 * 1024, ge=1024)
    webhook_event_retention_days: int = Field(default=7, ge=1, le=3650)
    # Events one webhook, and all of an organization's webhooks together, may hand in per
    # period (token buckets in Redis, app/kit/ratelimit.py); past either: 429 with
    # Retry-After, the event not stored.
    webhook_rate_limit_per_webhook: int = Field(default=1200, ge=1)
    webhook_rate_limit_per_org: int = Field(default=3000, ge=1)
    webhook_rate_limit_period_seconds: int = Field(default=60, ge=1, le=86400)

    # Sign-in with OpenID Connect (app/auth/verifier.py, docs/identity.md): how long each
    # process keeps an org's identity-provider settings and a JWKS, the least time between
    # two fetches of one JWKS (an unknown `kid` fetches it again, at most this often, so a
    # flood of made-up key ids cannot hammer the provider), the clock skew allowed on
    # `exp` / `nbf` / `iat`, and how long one JWKS fetch may take.
    oidc_config_cache_seconds: float = Field(default=30.0, ge=0, le=3600)
    oidc_jwks_cache_seconds: float = Field(default=600.0, ge=1, le=86400)
    oidc_jwks_refetch_seconds: float = Field(default=5.0, ge=0, le=3600)
    oidc_leeway_seconds: int = Field(default=10, ge=0, le=60)
    oidc_timeout_seconds: float = Field(default=5.0, gt=0, le=60)

    # Rate limits (app/kit/ratelimit.py): requests per organization and route class per
    # period, token buckets in Redis. Defaults: Port's published per-org figures.
    rate_limit_enabled: bool = True
    rate_limit_period_seconds: int = Field(default=300, ge=1, le=86400)
    rate_limit_entity_reads: int = Field(default=35_000, ge=1)
    rate_limit_entity_writes: int = Field(default=35_000, ge=1)
    rate_limit_search: int = Field(default=15_000, ge=1)
    rate_limit_other: int = Field(default=15_000, ge=1)

    @field_validator("cors_origins", "outbound_allow", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, value: list[str]) -> list[str]:
        # Credentials are allowed cross-origin, so a wildcard would hand every site the
        # caller's session: origins are named one by one.
        for origin in value:
            if "*" in origin or not origin.startswith(("http://", "https://")):
                raise ValueError(f"PORTOLAN_CORS_ORIGINS: {origin!r} is not an http(s) origin")
        return value

    @field_validator("encryption_key")
    @classmethod
    def _check_fernet_key(cls, value: SecretStr) -> SecretStr:
        raw = value.get_secret_value()
        if raw:
            try:
                decoded = base64.urlsafe_b64decode(raw.encode())
            except (ValueError, binascii.Error) as exc:
                raise ValueError("PORTOLAN_ENCRYPTION_KEY must be a Fernet key") from exc
            if len(decoded) != 32:
                raise ValueError(
                    "PORTOLAN_ENCRYPTION_KEY must be a Fernet key (32 url-safe base64 bytes); "
                    'make one with: python -c "from cryptography.fernet import Fernet; '
                    'print(Fernet.generate_key().decode())"'
                )
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("PORTOLAN_DATABASE_URL must be a plain postgresql:// URL")
        return value

    @model_validator(mode="after")
    def _refuse_default_secrets_in_production(self) -> Settings:
        if self.env != "production":
            return self
        problems = []
        if self.secret_key.get_secret_value() in ("", DEV_SECRET_KEY):
            problems.append("PORTOLAN_SECRET_KEY is missing or the development default")
        elif len(self.secret_key.get_secret_value()) < 32:
            problems.append("PORTOLAN_SECRET_KEY must be at least 32 characters")
        if self.encryption_key.get_secret_value() in ("", DEV_ENCRYPTION_KEY):
            problems.append("PORTOLAN_ENCRYPTION_KEY is missing or the development default")
        token = self.platform_token.get_secret_value() if self.platform_token else ""
        if token == DEV_PLATFORM_TOKEN:
            problems.append(
                "PORTOLAN_PLATFORM_TOKEN is the development default (unset it or set a new one)"
            )
        if self.database_url is None:
            problems.append("PORTOLAN_DATABASE_URL is required in production")
        if self.redis_url is None:
            problems.append("PORTOLAN_REDIS_URL is required in production")
        if problems:
            raise ValueError("refusing to start in production: " + "; ".join(problems))
        return self

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL for SQLAlchemy's asyncpg dialect."""
        if self.database_url is None:
            raise ConfigError("no database URL: start the embedded services first")
        rest = self.database_url.split("://", 1)[1]
        return f"postgresql+asyncpg://{rest}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
