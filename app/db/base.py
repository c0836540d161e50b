"""Declarative base with a naming convention, so every constraint has a stable name."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, MetaData, func, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import UserDefinedType

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class XID8(UserDefinedType[str]):
    """PostgreSQL's 64-bit transaction id (`xid8`), as the event feed stamps events."""

    cache_ok = True

    def get_col_spec(self, **kw: object) -> str:
        return "xid8"


def current_xid() -> Mapped[str]:
    """An `xid8 NOT NULL DEFAULT pg_current_xact_id()` column: the writing transaction."""
    return mapped_column(XID8(), nullable=False, server_default=text("pg_current_xact_id()"))


def timestamp() -> Mapped[datetime]:
    """A `timestamptz NOT NULL DEFAULT now()` column (created_at, updated_at...)."""
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
