"""Engines and sessions. Tenant sessions run as `portolan_app` with `app.org_id` bound."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from app.config import Settings
from app.db.rls import APP_ROLE, ORG_SETTING

# One round trip binds both the role and the tenant, transaction-locally: pooled
# connections come back clean and a transaction-mode pooler keeps working.
_BIND_TENANT = text(
    f"SELECT set_config('role', '{APP_ROLE}', true), set_config('{ORG_SETTING}', :org_id, true)"
)
_BIND_ORG_ONLY = text(f"SELECT set_config('{ORG_SETTING}', :org_id, true)")


def create_engine(settings: Settings) -> AsyncEngine:
    return create_async_engine(
        settings.sqlalchemy_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_pre_ping=False,
        pool_recycle=1800,
        connect_args={"server_settings": {"application_name": "portolan"}},
    )


class Database:
    """Owns the engine; hands out sessions already bound to a tenant or to the system."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.sessionmaker = async_sessionmaker(engine, expire_on_commit=False, autoflush=False)

    async def dispose(self) -> None:
        await self.engine.dispose()

    async def open_tenant_session(self, org_id: uuid.UUID) -> AsyncSession:
        """A session whose transaction runs as the app role with `org_id` bound."""
        session = self.sessionmaker()
        await bind_tenant(session, org_id)
        return session

    @asynccontextmanager
    async def tenant(self, org_id: uuid.UUID) -> AsyncIterator[AsyncSession]:
        """Tenant-bound unit of work: commits on success, rolls back on error."""
        session = await self.open_tenant_session(org_id)
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise
        finally:
            await session.close()

    @asynccontextmanager
    async def system(self) -> AsyncIterator[AsyncSession]:
        """Operator work as the login role (org creation, maintenance)."""
        session = self.sessionmaker()
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise
        finally:
            await session.close()


async def bind_tenant(session: AsyncSession, org_id: uuid.UUID) -> None:
    # org_id is a parsed UUID and travels as a bound parameter: never interpolated.
    await session.execute(_BIND_TENANT, {"org_id": str(uuid.UUID(str(org_id)))})


async def bind_org_setting(session: AsyncSession, org_id: uuid.UUID) -> None:
    """Bind app.org_id without switching role (system work that writes one org's rows)."""
    await session.execute(_BIND_ORG_ONLY, {"org_id": str(uuid.UUID(str(org_id)))})
