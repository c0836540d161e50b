"""The SQL vocabulary shared by the search compiler and derived properties: the scope a
query runs over, meta-properties, and stored values as numbers and timestamps (written as
the range indexes are keyed, app/search/indexes.py)."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.sql.elements import ColumnElement

from app.db.database import Tx, compile_query
from app.kit.errors import Invalid

META_TEXT = {
    "$identifier": "identifier",
    "$title": "title",
    "$icon": "icon",
    "$blueprint": "blueprint",
    "$datasource": "datasource",
    "$createdBy": "created_by",
    "$updatedBy": "updated_by",
}


META_TIME = {"$createdAt": "created_at", "$updatedAt": "updated_at"}

# `averageOf` units, in seconds.
TIME_UNITS = {"hour": 3600, "day": 86400, "week": 604800, "month": 2629800}


def as_number(value: ColumnElement[Any]) -> ColumnElement[Any]:
    """A jsonb value as a number, null where it holds anything else (never a cast error)."""
    return sa.func.portolan_number(value, type_=sa.Numeric)


def as_time(value: ColumnElement[Any]) -> ColumnElement[Any]:
    """A jsonb date-time string as a timestamp (UTC when it carries no offset), null where
    it holds anything else (never a cast error)."""
    return sa.func.portolan_time(value, type_=sa.DateTime(timezone=True))


def number_value(entity: Any, name: str) -> ColumnElement[Any]:
    """A stored property as a number (null where it holds anything else), written as the
    range indexes are keyed (app/search/indexes.py): the planner matches index expressions
    exactly."""
    return sa.func.portolan_number(
        entity.c.properties, sa.bindparam(None, name, type_=sa.Text), type_=sa.Numeric
    )


def stored_time(entity: Any, name: str) -> ColumnElement[Any]:
    """A stored date-time property as a timestamp, keyed as the range indexes are."""
    return sa.func.portolan_time(
        entity.c.properties,
        sa.bindparam(None, name, type_=sa.Text),
        type_=sa.DateTime(timezone=True),
    )


def number_aggregate(func: str, value: ColumnElement[Any]) -> ColumnElement[Any] | None:
    """sum / average / min / max / median of a number expression (None: not one of them)."""
    if func == "median":
        return sa.func.percentile_cont(0.5).within_group(value)
    if func == "sum":
        return sa.func.sum(value)
    if func == "average":
        return sa.func.avg(value)
    if func == "min":
        return sa.func.min(value)
    if func == "max":
        return sa.func.max(value)
    return None


def time_value(
    blueprints: list[dict[str, Any]], entity: Any, name: str
) -> ColumnElement[Any] | None:
    """A meta date (`$createdAt`, `$updatedAt`) or a date-time property that every given
    blueprint declares, as a timestamp; None otherwise."""
    if name in META_TIME:
        column: ColumnElement[Any] = entity.c[META_TIME[name]]
        return column
    declared = [bp["schema"]["properties"].get(name) for bp in blueprints]
    if not declared or any(
        not p or p.get("format") not in ("date-time", "timer") for p in declared
    ):
        return None
    return stored_time(entity, name)


@dataclass
class Scope:
    """What a query runs over: the org's blueprints (by identifier, in the API's shape) and
    the blueprints searched (one, for the blueprint route; all, for the global one)."""

    org_id: uuid.UUID
    blueprints: dict[str, dict[str, Any]]
    searched: list[str]
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    # The blueprints' fingerprint when they were read (see search.service): a statement
    # built from a remembered scope checks it and matches nothing if it is stale.
    fingerprint: str | None = None
    # The blueprint of the URL (blueprint routes), or None (searches across blueprints).
    fixed: str | None = None
    # Numbers the queries compiled inside derived properties (an aggregation's `query`), so
    # their walks' CTEs and parameters are named apart from the statement's own and from
    # each other's: one statement holds them all. Shared with the scopes made from this one.
    nested: itertools.count[int] = field(
        default_factory=lambda: itertools.count(1), compare=False, repr=False
    )


async def run_bounded(
    tx: Tx,
    stmt: sa.ClauseElement | str,
    values: dict[str, Any] | None = None,
    positional: Sequence[Any] = (),
) -> list[asyncpg.Record]:
    """Runs a search statement (with `values` for its named parameters, or SQL text with
    its `positional` ones); the connection's statement_timeout (a setting) bounds it."""
    sql, args = compile_query(stmt, positional, values)
    try:
        return await tx.fetch(sql, *args)
    except asyncpg.QueryCanceledError as exc:
        raise Invalid(
            "The search ran longer than the statement time limit and was stopped; "
            "narrow the query (fewer hops, more selective rules)"
        ) from exc
    except asyncpg.DataError as exc:
        raise Invalid(
            "Stored values of a property in this query do not all fit its type "
            f"({exc.__class__.__name__}); fix the data or compare it differently"
        ) from exc
