"""Request transactions: opened by the `tenant_tx` dependency, committed by the route.

`TransactionRoute` wraps each endpoint's handler: once the endpoint has returned and its
response is rendered, the transaction commits, and only then is the response sent; any
error rolls it back. A read route's (GET, HEAD) transaction is opened READ ONLY (PostgreSQL
refuses a write in it; a read route that writes says so with `writes`), so there is nothing
a COMMIT could lose: a small answer (up to `SEND_BEFORE_COMMIT_BYTES`, which the socket
takes at once) is sent first and the COMMIT follows, one database round trip fewer before
the client has its answer. A larger one commits first, so a slow reader never holds a
database connection. Doing this in the route (instead of a yield dependency) avoids the
dependency exit-stack machinery on every request, which cost ~20% of a simple read.

Each route also refuses query parameters it does not declare (422
`unknown_query_parameter` naming them): a parameter a route would silently ignore (one of
Port's that Portolan does not support, a misspelt filter) would otherwise answer 2xx with
unfiltered data. `HABITUAL_QUERY` lists what clients add by habit and any route takes;
`any_query` marks a route that reads whatever it is sent (an incoming webhook's).

A transaction PostgreSQL aborts only for its timing with others (a deadlock, a
serialization failure) is rolled back and the whole request runs again, dependencies
included, from the same request object (its body is read once): everything a request
changes is in its transaction, so an aborted attempt leaves nothing behind. After
`db_retry_attempts` attempts the answer is 503 with Retry-After, never a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import asyncpg
from fastapi import APIRouter, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic import BaseModel

from app.db.database import Database, Tx
from app.kit.errors import Invalid, Unavailable

log = logging.getLogger("portolan.db")

_STATE_KEY = "portolan_tx"


_GENERIC_PLANS = "__portolan_generic_plans__"
_WRITES = "__portolan_writes__"
READ_METHODS = frozenset({"GET", "HEAD"})
SEND_BEFORE_COMMIT_BYTES = 64 * 1024

# PostgreSQL aborted the transaction only because of its timing with others (SQLSTATE
# 40P01, 40001): the same request run again from the start may well succeed.
RETRYABLE = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
# Seconds a client is told to wait when the retries are spent (Retry-After).
RETRY_AFTER_SECONDS = 1


def _not_a_json_number(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not a JSON number", name, 0)


class StrictJSONRequest(Request):
    """Request bodies are parsed as JSON exactly: Python's parser would also take `NaN`
    and `Infinity`, which JSON (and PostgreSQL's jsonb) do not have."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), parse_constant=_not_a_json_number)
        return self._json


_ANY_QUERY = "__portolan_any_query__"
# Query parameters every route takes without declaring them, because clients add them by
# habit and they ask for nothing: `_` (a cache-busting timestamp, as jQuery and some HTTP
# clients append), and Port's Ocean's `ocean_info_*` (which of its events a request belongs
# to, e.g. `ocean_info_event_type`, `ocean_info_resync_id`: its own bookkeeping; Portolan
# tells an integration's requests by their User-Agent). docs/port-compatibility.md lists them.
HABITUAL_QUERY = frozenset({"_"})
HABITUAL_PREFIXES = ("ocean_info_",)


def any_query(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """Marks an endpoint that reads whatever query parameters it is sent (an incoming
    webhook keeps them with the event): no parameter is refused as unknown. Apply it below
    the route decorator."""
    setattr(endpoint, _ANY_QUERY, True)
    return endpoint


def declared_query(dependant: Dependant) -> frozenset[str]:
    """The query parameters a route declares: its own and its dependencies', by the name
    a client sends (the alias); a pydantic model's fields for a model of query parameters."""
    names: set[str] = set()
    pending = [dependant]
    while pending:
        current = pending.pop()
        pending.extend(current.dependencies)
        for param in current.query_params:
            model = param.field_info.annotation
            if isinstance(model, type) and issubclass(model, BaseModel):
                names.update(f.alias or n for n, f in model.model_fields.items())
            else:
                names.add(param.alias)
    return frozenset(names)


def _refuse_unknown_query(request: Request, declared: frozenset[str]) -> None:
    unknown = sorted(
        name
        for name in set(request.query_params.keys()) - declared - HABITUAL_QUERY
        if not name.startswith(HABITUAL_PREFIXES)
    )
    if unknown:
        names = ", ".join(repr(n) for n in unknown)
        raise Invalid(
            f"Query parameter(s) {names} not supported by this route (see "
            "docs/port-compatibility.md for Port's parameters Portolan does not support)",
            code="unknown_query_parameter",
            details=[{"parameter": n, "message": "not supported by this route"} for n in unknown],
        )


def key_lookups(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """Marks an endpoint whose statements reach a handful of rows through their keys (one
    entity, say): its transaction runs with generic plans (see Database.begin_tenant).
    Apply it below the route decorator."""
    setattr(endpoint, _GENERIC_PLANS, True)
    return endpoint


def writes(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """Marks a read route (GET) that writes (records what a client reported, say): its
    transaction is an ordinary one, committed before the answer. Apply it below the route
    decorator."""
    setattr(endpoint, _WRITES, True)
    return endpoint


class _SentThenCommitted(Response):
    """A read-only transaction's answer, sent before its COMMIT (which then gives the
    connection back, whatever happened to the sending)."""

    def __init__(self, inner: Response, request: Request) -> None:
        self.__dict__.update(inner.__dict__)
        self._inner = inner
        self._request = request

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self._inner(scope, receive, send)
        finally:
            await _finish(self._request, commit=True)


class AfterCommit(Response):
    """What a read endpoint returns when part of its answer needs no database but may take
    a while (tenants' jq: calculation properties): the route commits the transaction,
    which gives its connection back, and only then awaits `complete` for the response. No
    connection waits on a child process. Only for endpoints that have written nothing
    that `complete` depends on."""

    def __init__(self, complete: Callable[[], Awaitable[Response]]) -> None:
        super().__init__()
        self.complete = complete


class TransactionRoute(APIRoute):
    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        self.generic_plans = bool(getattr(endpoint, _GENERIC_PLANS, False))
        methods = self.methods or set()
        self.read_only = bool(methods) and methods <= READ_METHODS
        self.read_only = self.read_only and not getattr(endpoint, _WRITES, False)
        self.query_names: frozenset[str] | None = (
            None if getattr(endpoint, _ANY_QUERY, False) else declared_query(self.dependant)
        )

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            if self.query_names is not None and request.scope.get("query_string"):
                _refuse_unknown_query(request, self.query_names)
            # One request object for every attempt: its body is read once and kept.
            request = StrictJSONRequest(request.scope, request.receive)
            attempt = 1
            while True:
                try:
                    response = await handler(request)
                    if (
                        self.read_only
                        and _STATE_KEY in request.scope
                        and not isinstance(response, AfterCommit)
                        and isinstance(getattr(response, "body", None), bytes)
                        and len(response.body) <= SEND_BEFORE_COMMIT_BYTES
                    ):
                        return _SentThenCommitted(response, request)
                    await _finish(request, commit=True)
                    if isinstance(response, AfterCommit):
                        return await response.complete()
                    return response
                except RETRYABLE as exc:
                    # The transaction is rolled back whole; nothing of this attempt stays.
                    await _finish(request, commit=False)
                    if attempt >= _attempts(request):
                        log.warning(
                            "transaction aborted, retries spent",
                            extra={"sqlstate": exc.sqlstate, "attempts": attempt},
                        )
                        raise Unavailable(
                            "The change collided with concurrent changes and was not made; "
                            "try again",
                            code="transaction_conflict",
                            retry_after=RETRY_AFTER_SECONDS,
                        ) from exc
                    log.info(
                        "transaction aborted, run again",
                        extra={"sqlstate": exc.sqlstate, "attempt": attempt},
                    )
                    # Writers that collided start again apart: 10-40 ms, then twice that.
                    await asyncio.sleep(random.uniform(0.01, 0.04) * 2 ** (attempt - 1))  # noqa: S311
                    attempt += 1
                except BaseException:
                    await _finish(request, commit=False)
                    raise

        return handle


def _attempts(request: Request) -> int:
    settings = getattr(request.app.state, "settings", None)
    return int(getattr(settings, "db_retry_attempts", 4))


async def _finish(request: Request, *, commit: bool) -> None:
    opened = request.scope.pop(_STATE_KEY, None)
    if opened is not None:
        db, conn = opened
        await db.finish(conn, commit=commit)


async def open_request_tx(
    request: Request,
    db: Database,
    org_id: Any,
    actor: str | None = None,
    credential: tuple[str, int] | None = None,
    origin: str | None = None,
) -> Tx:
    """Open the request's tenant transaction (once per request)."""
    if _STATE_KEY in request.scope:
        raise RuntimeError("the request transaction is already open")
    route = request.scope.get("route")
    if not isinstance(route, TransactionRoute):
        raise RuntimeError("tenant routes must use TransactionRoute (see api_router)")
    tx, conn = await db.begin_tenant(
        org_id,
        generic_plans=route.generic_plans,
        read_only=route.read_only,
        actor=actor,
        origin=origin or request_origin(request),
        credential=credential,
    )
    request.scope[_STATE_KEY] = (db, conn)
    return tx


def request_origin(request: Request) -> str:
    """Where a request comes from, for the audit log: Port's Ocean integrations say so in
    their User-Agent; everything else is the API."""
    agent = request.headers.get("user-agent", "")
    return "INTEGRATION" if agent.startswith("port-ocean/") else "API"


def api_router(**kwargs: Any) -> APIRouter:
    """Every router is made here, so every route commits its transaction the same way."""
    return APIRouter(route_class=TransactionRoute, **kwargs)
