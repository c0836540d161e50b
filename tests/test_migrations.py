"""Migrations: the models and the migration history agree, and the history runs both ways."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from alembic import command
from alembic.config import Config

from app.cli import _migrations_dir
from tests.conftest import Servers, _with_database


def _config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_migrations_dir()))
    cfg.attributes["sqlalchemy_url"] = url.replace("postgresql://", "postgresql+asyncpg://", 1)
    return cfg


@pytest.fixture
async def scratch_url(servers: Servers) -> AsyncIterator[str]:
    name = f"portolan_scratch_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(servers.admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    try:
        yield _with_database(servers.admin_url, name)
    finally:
        admin = await asyncpg.connect(servers.admin_url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_models_match_the_migrations(database_url: str, settings: object) -> None:
    # `alembic check` raises when autogenerate would produce a new migration.
    await asyncio.to_thread(command.check, _config(database_url))


async def test_history_upgrades_downgrades_and_upgrades_again(scratch_url: str) -> None:
    cfg = _config(scratch_url)
    await asyncio.to_thread(command.upgrade, cfg, "head")
    await asyncio.to_thread(command.downgrade, cfg, "base")
    await asyncio.to_thread(command.upgrade, cfg, "head")
    conn = await asyncpg.connect(scratch_url)
    try:
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        }
    finally:
        await conn.close()
    assert {"organizations", "credentials"} <= tables
