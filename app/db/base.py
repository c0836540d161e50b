"""Declarative base with a naming convention, so every constraint has a stable name."""

from __future__ import annotations

from sqlalchemy import MetaData
from sqlalchemy.orm import DeclarativeBase

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def import_models() -> None:
    """Import every domain's models so Base.metadata is complete (alembic, tests)."""
    from app.actions import models as action_models  # noqa: F401
    from app.auth import models as auth_models  # noqa: F401
    from app.catalog import models as catalog_models  # noqa: F401
    from app.orgs import models as org_models  # noqa: F401
    from app.scorecards import models as scorecard_models  # noqa: F401
    from app.secrets import models as secret_models  # noqa: F401
