"""Alembic environment: async (asyncpg), one linear history, metadata from every domain."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import pool
from sqlalchemy.dialects.postgresql.base import ischema_names
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

# The model registry: every domain's tables, so the metadata compared with the database is
# complete (a domain with tables adds its models here).
from app.actions import models as action_models  # noqa: F401
from app.audit import models as audit_models  # noqa: F401
from app.auth import models as auth_models  # noqa: F401
from app.automations import models as automation_models  # noqa: F401
from app.catalog import models as catalog_models  # noqa: F401
from app.db.base import XID8, Base
from app.history import models as history_models  # noqa: F401
from app.integrations import models as integration_models  # noqa: F401
from app.orgs import models as org_models  # noqa: F401
from app.pages import models as page_models  # noqa: F401
from app.scorecards import models as scorecard_models  # noqa: F401
from app.secrets import models as secret_models  # noqa: F401
from app.webhooks import models as webhook_models  # noqa: F401
from app.workflows import models as workflow_models  # noqa: F401

ischema_names["xid8"] = XID8  # so the reflected event columns compare with the models
target_metadata = Base.metadata
config = context.config


def _url() -> str:
    url = config.attributes.get("sqlalchemy_url")
    if url:
        return str(url)
    from app.config import get_settings

    return get_settings().sqlalchemy_url


def _include_name(name: str | None, type_: str, parent_names: object) -> bool:
    # Property range indexes (`ixr_*`) are created and dropped by the service at run time
    # (app/search/indexes.py), not by migrations.
    return not (type_ == "index" and name is not None and name.startswith("ixr_"))


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        include_name=_include_name,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    engine = create_async_engine(_url(), poolclass=pool.NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


def run_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    asyncio.run(_run_async())
