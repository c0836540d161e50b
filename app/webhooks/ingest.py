"""Ingest: one incoming request checked, stored as an event, and answered 202.

The webhook key in the URL names the org (its first characters, see
service.new_webhook_key) and the webhook; no bearer token is involved. In order:

1. The body is read up to the webhook body limit (413 past it, whatever Content-Length
   says or when it is absent).
2. The webhook is looked up by its key in the org's own transaction (404 for an unknown
   key), the signature is checked over the raw bytes in constant time (401), and a
   disabled webhook refuses the event (409). Then the event takes a token of its webhook's
   and of its organization's rate limit (429 with Retry-After, nothing stored: limits.py).
3. The body must be a JSON document (400); the headers kept for the mappings leave out
   credentials (Authorization, Cookie, the signature header).
4. `requestIdentifierPath` (jq) names the request: a request whose identifier the
   webhook has seen already is answered 202 with `replayed: true` and not stored again.
5. The event is inserted in a second short transaction (no database connection is held
   while the body arrives or jq runs); once it is committed, a job is queued for it (best
   effort: when the queue is unreachable the worker's periodic pass finds the event).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import math
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
from arq.connections import ArqRedis
from starlette.requests import Request

from app.config import Settings
from app.db.database import Database
from app.dispatch import templates
from app.kit.crypto import Cipher
from app.kit.errors import BadRequest, Conflict, NotFound, PayloadTooLarge, Unauthorized
from app.webhooks.definitions import template_of
from app.webhooks.limits import take_event_tokens
from app.webhooks.service import org_of_webhook_key

log = logging.getLogger("portolan.webhooks")

MAX_DEPTH = 100  # nesting of the JSON body
MAX_REQUEST_ID = 1000
_DROPPED_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
_ENQUEUE_TIMEOUT = 1.0


@dataclass(frozen=True, slots=True)
class Accepted:
    event_id: str
    replayed: bool
    org_id: uuid.UUID
    webhook: str


def new_event_id() -> str:
    return "whe_" + secrets.token_hex(12)


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 once it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"Request body is too large (the limit of a webhook event is {limit // 1024} KiB)"
    )


def verify_signature(
    security: Mapping[str, Any], secret: str | None, headers: Mapping[str, str], raw: bytes
) -> None:
    """Raises Unauthorized unless the request carries the signature the webhook expects.

    sha1 / sha256: the header (after `signaturePrefix`) is the HMAC of the raw body keyed
    by the secret, in hex (any case) or base64. plain: the header is the secret itself."""
    algorithm = security.get("signatureAlgorithm")
    if algorithm is None or secret is None:
        return
    header_name = str(security.get("signatureHeaderName", ""))
    presented = headers.get(header_name)
    if presented is None:
        raise Unauthorized(
            f"The request is not signed: the {header_name} header is missing",
            code="invalid_signature",
        )
    # Header values arrive decoded as latin-1: these are the bytes as sent.
    value = presented.strip().encode("latin-1")
    prefix = str(security.get("signaturePrefix") or "").encode("utf-8")
    matched = False
    if value.startswith(prefix):
        value = value[len(prefix) :].strip()
        key = secret.encode("utf-8")
        if algorithm == "plain":
            matched = hmac.compare_digest(value, key)
        else:
            digest = hmac.new(key, raw, hashlib.sha1 if algorithm == "sha1" else hashlib.sha256)
            expected = digest.digest()
            as_hex = hmac.compare_digest(value.lower(), expected.hex().encode())
            as_base64 = hmac.compare_digest(value, base64.b64encode(expected))
            matched = as_hex or as_base64
    if not matched:
        raise Unauthorized(
            f"The request's {header_name} signature does not match", code="invalid_signature"
        )


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_body(raw: bytes) -> Any:
    """The body as JSON, refused (400) when it is not JSON or cannot be stored as jsonb."""
    if not raw.strip():
        raise BadRequest(
            "The request body is empty: a webhook event is a JSON document", code="invalid_json"
        )
    try:
        value = json.loads(raw, parse_float=_finite, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise BadRequest(
            f"The request body is nested more than {MAX_DEPTH} levels deep", code="invalid_json"
        ) from exc
    except ValueError as exc:
        raise BadRequest(
            "The request body is not valid JSON (a webhook event is a JSON document)",
            code="invalid_json",
        ) from exc
    check_storable(value, "The request body")
    return value


def _bad_text(text: str) -> bool:
    if "\x00" in text:
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return True
    return False


def check_storable(value: Any, what: str) -> None:
    """PostgreSQL's jsonb takes no NUL character, no lone surrogate, and nesting has a
    limit: such a value is refused with 400 instead of failing the insert."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise BadRequest(f"{what} is nested more than {MAX_DEPTH} levels deep")
        if isinstance(item, str):
            if _bad_text(item):
                raise BadRequest(f"{what} holds a NUL character or an unpaired surrogate")
        elif isinstance(item, dict):
            for key, child in item.items():
                if _bad_text(key):
                    raise BadRequest(f"{what} holds a NUL character or an unpaired surrogate")
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)


def kept_headers(request: Request, signature_header: str | None) -> dict[str, str]:
    """The request's headers for the mappings (`.headers`, lower-case names; repeated
    headers joined with ", "), without credentials and the signature."""
    dropped = set(_DROPPED_HEADERS)
    if signature_header:
        dropped.add(signature_header.lower())
    out: dict[str, str] = {}
    for name, value in request.headers.items():
        if name in dropped:
            continue
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def query_params(request: Request) -> dict[str, Any]:
    """`.queryParams`: a parameter given once is a string, one given more often a list."""
    out: dict[str, Any] = {}
    for name, value in request.query_params.multi_items():
        if name in out:
            current = out[name]
            out[name] = [*current, value] if isinstance(current, list) else [current, value]
        else:
            out[name] = value
    return out


async def request_identifier(
    path: str, data: dict[str, Any], *, org: object
) -> tuple[str | None, dict[str, Any] | None]:
    """(the request's identifier or None, the error when the jq failed)."""
    try:
        value = await templates.render(
            template_of(path), data, pointer="/security/requestIdentifierPath", org=org
        )
    except templates.TemplateError as exc:
        return None, {"mapping": None, "item": None, "pointer": exc.pointer, "message": exc.message}
    if value is None:
        return None, None
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    if len(text) > MAX_REQUEST_ID or _bad_text(text):
        text = "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return text, None


async def accept(
    request: Request, db: Database, cipher: Cipher, settings: Settings, webhook_key: str
) -> Accepted:
    raw = await read_body(request, settings.webhook_max_body_bytes)
    org_id = org_of_webhook_key(webhook_key)
    if org_id is None:
        raise NotFound("No webhook has this key")
    async with db.tenant(org_id) as tx:
        row = await tx.fetchrow(
            "SELECT identifier, enabled, security, secret_encrypted FROM webhooks "
            "WHERE org_id = $1 AND webhook_key = $2",
            org_id,
            webhook_key,
        )
    if row is None:
        raise NotFound("No webhook has this key")
    security: dict[str, Any] = row["security"]
    stored = row["secret_encrypted"]
    secret = cipher.decrypt(stored) if stored is not None else None
    verify_signature(security, secret, request.headers, raw)
    identifier: str = row["identifier"]
    if not row["enabled"]:
        raise Conflict(
            f"Webhook {identifier!r} is disabled: the event was dropped", code="webhook_disabled"
        )
    await take_event_tokens(request.scope, request.app.state.limiter, org_id, identifier)
    body = parse_body(raw)
    signature_header = security.get("signatureHeaderName") if secret is not None else None
    headers = kept_headers(request, signature_header)
    params = query_params(request)
    check_storable(params, "The query string")
    check_storable(headers, "The headers")
    request_id: str | None = None
    errors: list[dict[str, Any]] = []
    path = security.get("requestIdentifierPath")
    if path:
        data = {"body": body, "headers": headers, "queryParams": params}
        request_id, error = await request_identifier(path, data, org=org_id)
        if error is not None:
            errors.append(error)
    outcome = {"entities": [], "errors": errors} if errors else None
    for _ in range(3):
        async with db.tenant(org_id) as tx:
            try:
                event_id = await tx.fetchval(
                    "INSERT INTO webhook_events (org_id, id, webhook, request_id, body, headers, "
                    "query_params, outcome) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
                    "ON CONFLICT (org_id, webhook, request_id) DO NOTHING RETURNING id",
                    org_id,
                    new_event_id(),
                    identifier,
                    request_id,
                    body,
                    headers,
                    params,
                    outcome,
                )
            except asyncpg.ForeignKeyViolationError as exc:
                raise NotFound("No webhook has this key") from exc
            if event_id is not None:
                return Accepted(event_id, False, org_id, identifier)
            seen = await tx.fetchval(
                "SELECT id FROM webhook_events WHERE org_id = $1 AND webhook = $2 "
                "AND request_id = $3",
                org_id,
                identifier,
                request_id,
            )
        if seen is not None:
            return Accepted(seen, True, org_id, identifier)
    # The stored event went away (retention) between the insert and the look: three times.
    raise Conflict("The event could not be stored; send it again", code="webhook_busy")


async def enqueue(request: Request, settings: Settings, accepted: Accepted) -> None:
    """Queue a job for the webhook's pending events; a queue that is down is logged and
    left to the worker's periodic pass."""
    state = request.app.state
    queue: ArqRedis | None = getattr(state, "webhook_queue", None)
    if queue is None:
        queue = ArqRedis(
            pool_or_conn=state.redis.connection_pool, default_queue_name=settings.queue_name
        )
        state.webhook_queue = queue
    try:
        async with asyncio.timeout(_ENQUEUE_TIMEOUT):
            await queue.enqueue_job(
                "process_webhook_events",
                str(accepted.org_id),
                accepted.webhook,
                _job_id=f"webhook-event:{accepted.event_id}",
            )
    except Exception as exc:
        log.warning(
            "webhook event not queued; the periodic pass will take it",
            extra={"event": accepted.event_id, "error": type(exc).__name__},
        )
