"""ASGI plumbing: request ids, body-size limit, metrics and access logs, JSON error bodies."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import Counter, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.kit import fairloop
from app.kit.errors import PortolanError, error_body
from app.kit.logging import request_id_var
from app.kit.ratelimit import STATE_KEY as RATE_LIMIT_STATE

log = logging.getLogger("portolan.http")

REQUESTS = Counter(
    "portolan_http_requests_total", "HTTP requests handled", ["method", "route", "status"]
)
LATENCY = Histogram(
    "portolan_http_request_duration_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)

REQUEST_ID_HEADER = "x-request-id"
# On every response: no MIME sniffing, no framing, no referrer, nothing cached (answers
# carry tenant data). The API's JSON also gets a CSP that allows nothing; the interactive
# docs pages load their scripts and styles, so they go without it.
_SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
)
_API_CSP = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")
_DOC_PAGES = ("/docs", "/redoc")
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _json_bytes(status: int, body: dict[str, Any]) -> tuple[list[tuple[bytes, bytes]], bytes]:
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    return headers, payload


class RequestContextMiddleware:
    """Outermost app middleware: one pass does request id, size limit, metrics and logs.

    Written as raw ASGI (not BaseHTTPMiddleware) because it runs on every request.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        incoming = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        request_id = (
            incoming if incoming and _SAFE_REQUEST_ID.match(incoming) else os.urandom(16).hex()
        )
        token = request_id_var.set(request_id)
        # The loop's turns count for the org the request names, and until its token is
        # verified for its client's address (one account per address, in turns with the
        # orgs: a flood of requests, whether their tokens are good or not, does not go
        # before every org's work).
        client = scope.get("client")
        fairloop.open_slot(client[0] if client else "unknown")
        started = time.perf_counter()
        status_holder = [500]
        response_started = [False]
        overflowed = [False]
        swallowing = [False]
        rid_header = (REQUEST_ID_HEADER.encode(), request_id.encode())

        async def send_wrapper(message: Message) -> None:
            if swallowing[0]:
                return
            if message["type"] == "http.response.start":
                if overflowed[0]:
                    # The app answered a truncated body; the client gets the real reason.
                    swallowing[0] = True
                    await send_error(413, _too_large_body(self.max_body_bytes))
                    return
                response_started[0] = True
                status_holder[0] = message["status"]
                extra = [rid_header, *_SECURITY_HEADERS]
                if not scope["path"].startswith(_DOC_PAGES):
                    extra.append(_API_CSP)
                verdict = scope.get("state", {}).get(RATE_LIMIT_STATE)
                if verdict is not None:
                    extra += verdict.headers()
                present = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [
                    *message.get("headers", []),
                    *(h for h in extra if h[0] not in present),
                ]
            await send(message)

        async def send_error(status: int, body: dict[str, Any]) -> None:
            headers, payload = _json_bytes(status, body)
            response_started[0] = True
            status_holder[0] = status
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [*headers, rid_header, *_SECURITY_HEADERS, _API_CSP],
                }
            )
            await send({"type": "http.response.body", "body": payload})

        limit = self.max_body_bytes
        try:
            declared = _content_length(scope)
            if declared is not None and declared > limit:
                await send_error(413, _too_large_body(limit))
                return
            received = 0

            async def receive_limited() -> Message:
                nonlocal received
                if overflowed[0]:
                    return {"type": "http.request", "body": b"", "more_body": False}
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        # Raising keeps the endpoint from ever running on a truncated body;
                        # send_wrapper makes sure whatever is answered becomes our 413.
                        overflowed[0] = True
                        raise StarletteHTTPException(413, _too_large_body(limit)["message"])
                return message

            await self.app(scope, receive_limited, send_wrapper)
        except Exception:
            log.exception("unhandled error", extra={"path": scope.get("path")})
            if not response_started[0]:
                await send_error(500, error_body("internal_error", "Internal server error"))
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            route_path = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            REQUESTS.labels(method, route_path, str(status_holder[0])).inc()
            LATENCY.labels(method, route_path).observe(elapsed)
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "request",
                    extra={
                        "method": method,
                        "path": scope.get("path"),
                        "route": route_path,
                        "status": status_holder[0],
                        "duration_ms": round(elapsed * 1000, 2),
                    },
                )
            request_id_var.reset(token)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _too_large_body(limit: int) -> dict[str, Any]:
    return error_body(
        "payload_too_large", f"Request body is too large (limit is {limit // 1024} KiB)"
    )


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def iter_routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    """Every route, looking inside included routers."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from iter_routes(inner.routes)
        else:
            yield route


def allowed_methods(routes: Iterable[BaseRoute], path: str) -> list[str]:
    """Methods of the most literal route template matching `path` (so `/entities/bulk`
    answers for its own template, not for `/entities/{identifier:path}`)."""
    by_template: dict[str, set[str]] = {}
    for route in iter_routes(routes):
        regex = getattr(route, "path_regex", None)
        route_methods = getattr(route, "methods", None)
        if regex is not None and route_methods and regex.match(path):
            by_template.setdefault(getattr(route, "path", ""), set()).update(route_methods)
    if not by_template:
        return []
    best = min(by_template, key=lambda template: (template.count("{"), -len(template)))
    return sorted(by_template[best])


def _unstorable_text(exc: asyncpg.DataError) -> bool:
    """A NUL character (22021 in text, 22P05 in jsonb) or an unpaired surrogate (asyncpg
    cannot encode the argument) in what a statement was given."""
    if isinstance(
        exc, asyncpg.CharacterNotInRepertoireError | asyncpg.UntranslatableCharacterError
    ):
        return True
    cause = exc.__cause__
    return isinstance(cause, UnicodeEncodeError) or (
        isinstance(cause, ValueError) and "surrogates not allowed" in str(cause)
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PortolanError)
    async def _domain_error(request: Request, exc: PortolanError) -> JSONResponse:
        retry_after = exc.retry_after
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=headers)

    @app.exception_handler(asyncpg.IntegrityConstraintViolationError)
    async def _integrity_error(
        request: Request, exc: asyncpg.IntegrityConstraintViolationError
    ) -> JSONResponse:
        # The services check first and answer precisely; this is the database's second
        # wall (e.g. a concurrent writer got there first). Still a client-facing 409.
        log.warning(
            "constraint violation", extra={"constraint": getattr(exc, "constraint_name", None)}
        )
        return JSONResponse(
            error_body("conflict", "The change conflicts with data that exists"), status_code=409
        )

    @app.exception_handler(asyncpg.DataError)
    async def _data_error(request: Request, exc: asyncpg.DataError) -> JSONResponse:
        # Text PostgreSQL cannot store that got past the services' own checks (a path
        # parameter, say): the client's to fix, so a 422 rather than a 500.
        if _unstorable_text(exc):
            return JSONResponse(
                error_body(
                    "invalid_request",
                    "The request holds text with a NUL character or an unpaired surrogate, "
                    "which cannot be stored",
                ),
                status_code=422,
            )
        if isinstance(exc.__cause__, OverflowError):
            # A value asyncpg cannot encode for PostgreSQL (a date past year 9999 once
            # converted to UTC, a number too large for its column): the client's too.
            return JSONResponse(
                error_body(
                    "invalid_request",
                    "The request holds a value out of the range PostgreSQL stores "
                    "(a date beyond year 1-9999 in UTC, a number too large)",
                ),
                status_code=422,
            )
        log.error("unhandled data error", exc_info=exc, extra={"path": request.url.path})
        return JSONResponse(error_body("internal_error", "Internal server error"), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        if exc.status_code == 404:
            message = f"Route {request.method} {request.url.path} was not found"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the methods of the first route that matched the path;
            # the Allow header must list every method the path supports.
            allowed = allowed_methods(request.app.routes, request.url.path)
            if allowed:
                headers["Allow"] = ", ".join(allowed)
        return JSONResponse(error_body(code, message), status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            return JSONResponse(
                error_body("invalid_json", "The request body is not valid JSON"), status_code=400
            )
        details = [
            {
                "loc": list(err.get("loc", ())),
                "message": err.get("msg", ""),
                "type": err.get("type"),
            }
            for err in errors
        ]
        summary = "; ".join(
            f"{'.'.join(str(p) for p in d['loc'])}: {d['message']}" for d in details[:5]
        )
        return JSONResponse(
            error_body(
                "invalid_request",
                f"The json provided does not match the route's schema: {summary}",
                details,
            ),
            status_code=422,
        )
