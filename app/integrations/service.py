"""Integrations: create, read, change, delete; resync reports, kind examples and logs.

Every statement filters by the transaction's org (row-level security fences the tables
besides). Timestamps come from the database: `updated_at` changes on every change of the
integration's definition or mapping, and a resync report sets it to the report's own
`resyncState.updatedAt`, so Ocean's polling listener, which resyncs whenever the two
differ, sees a change only when someone made one.
"""

from __future__ import annotations

import hmac
import secrets
from datetime import UTC, datetime
from typing import Any, Literal

import asyncpg

from app.db.database import Tx
from app.kit.errors import Conflict, Invalid, NotFound, PayloadTooLarge

MAX_EXAMPLES = 5
MAX_LOG_LINES = 1000  # per request
MAX_LOG_MESSAGE = 16 * 1024  # characters; longer messages are cut
KEPT_LOGS = 10_000  # per integration; older lines are dropped as new ones arrive
_INGEST_LOOKUP = 12  # leading characters of an ingest id used to find it
_RESYNC_KEYS = ("status", "lastResyncStart", "lastResyncEnd", "nextResync", "intervalInMinuets")
_MAX_DEPTH = 100

_SELECT = """
SELECT identifier, title, installation_app_type, version, actions_processing_enabled, config,
       changelog_destination, resync_state, resync_updated_at, ingest_id, created_at,
       created_by, updated_at, updated_by
FROM integrations
"""


def ingest_url(public_url: str, ingest_id: str) -> str:
    return f"{public_url.rstrip('/')}/v1/integration-logs/{ingest_id}"


def to_api(row: asyncpg.Record, public_url: str) -> dict[str, Any]:
    """Port's integration object."""
    state = dict(row["resync_state"])
    return {
        "identifier": row["identifier"],
        "installationId": row["identifier"],
        "installationAppType": row["installation_app_type"],
        "integrationType": row["installation_app_type"],
        "installationType": "OnPrem",
        "title": row["title"],
        "version": row["version"],
        "actionsProcessingEnabled": row["actions_processing_enabled"],
        "config": row["config"],
        "changelogDestination": row["changelog_destination"],
        "resyncState": {
            **{key: state.get(key) for key in _RESYNC_KEYS},
            "updatedAt": row["resync_updated_at"],
        },
        "logAttributes": {
            "ingestId": row["ingest_id"],
            "ingestUrl": ingest_url(public_url, row["ingest_id"]),
        },
        "createdBy": row["created_by"],
        "updatedBy": row["updated_by"],
        "createdAt": row["created_at"],
        "updatedAt": row["updated_at"],
    }


# ------------------------------------------------------------------------------------------
# Checks


def _storable_text(text: str) -> bool:
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def storable(value: Any) -> bool:
    """Whether PostgreSQL can keep the value as text or jsonb: no NUL character, no lone
    surrogate, nesting within limits."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > _MAX_DEPTH:
            return False
        if isinstance(item, str):
            if not _storable_text(item):
                return False
        elif isinstance(item, dict):
            for key, child in item.items():
                if not _storable_text(str(key)):
                    return False
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return True


def _problem(pointer: str, message: str) -> dict[str, str]:
    return {"pointer": pointer, "message": message}


def _check_config(config: Any, pointer: str) -> list[dict[str, str]]:
    """The mapping (Port's PortAppConfig): an object; `resources`, when given, a list of
    `{kind, selector?, port: {entity: {mappings}}}`. Ocean reads the rest itself."""
    if not isinstance(config, dict):
        return [_problem(pointer, "must be an object")]
    problems = []
    for flag in ("deleteDependentEntities", "createMissingRelatedEntities", "enableMergeEntity"):
        if flag in config and not isinstance(config[flag], bool):
            problems.append(_problem(f"{pointer}/{flag}", "must be a boolean"))
    resources = config.get("resources")
    if resources is None:
        return problems
    if not isinstance(resources, list):
        return [*problems, _problem(f"{pointer}/resources", "must be an array")]
    for index, resource in enumerate(resources):
        at = f"{pointer}/resources/{index}"
        if not isinstance(resource, dict):
            problems.append(_problem(at, "must be an object"))
            continue
        kind = resource.get("kind")
        if not isinstance(kind, str) or not kind:
            problems.append(_problem(f"{at}/kind", "must be a non-empty string"))
        for part in ("selector", "port"):
            if part in resource and not isinstance(resource[part], dict):
                problems.append(_problem(f"{at}/{part}", "must be an object"))
    return problems


def _check_destination(destination: Any, pointer: str) -> list[dict[str, str]]:
    if destination is None:
        return []
    if not isinstance(destination, dict):
        return [_problem(pointer, "must be an object or null")]
    kind = destination.get("type")
    if kind is None:
        return []
    if kind == "KAFKA":
        return []
    if kind == "WEBHOOK":
        url = destination.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            return [_problem(f"{pointer}/url", "must be an http(s) URL")]
        return []
    return [_problem(f"{pointer}/type", 'must be "WEBHOOK" or "KAFKA"')]


def _checked(body: dict[str, Any]) -> dict[str, Any]:
    problems: list[dict[str, str]] = []
    if "config" in body and body["config"] is not None:
        problems += _check_config(body["config"], "/config")
    if "changelogDestination" in body:
        problems += _check_destination(body["changelogDestination"], "/changelogDestination")
    if not storable(body):
        problems.append(_problem("", "holds a NUL character or an unpaired surrogate"))
    if problems:
        raise Invalid(
            "Invalid integration: "
            + "; ".join(f"{p['pointer'] or '/'}: {p['message']}" for p in problems[:5]),
            details=problems,
        )
    return body


# ------------------------------------------------------------------------------------------
# Integrations


async def _row(tx: Tx, identifier: str) -> asyncpg.Record:
    row = await tx.fetchrow(
        _SELECT + "WHERE org_id = $1 AND identifier = $2", tx.org_id, identifier
    )
    if row is None:
        raise _missing(identifier)
    return row


def _missing(identifier: str) -> NotFound:
    return NotFound(f"Integration {identifier!r} was not found")


async def _by_ingest_id(tx: Tx, ingest_id: str) -> asyncpg.Record | None:
    """The integration whose ingest id this is, compared in constant time."""
    rows = await tx.fetch(
        _SELECT + "WHERE org_id = $1 AND left(ingest_id, $2) = $3",
        tx.org_id,
        _INGEST_LOOKUP,
        ingest_id[:_INGEST_LOOKUP],
    )
    found = None
    for row in rows:
        if hmac.compare_digest(row["ingest_id"].encode(), ingest_id.encode("utf-8", "replace")):
            found = row
    return found


async def get(
    tx: Tx,
    identifier: str,
    public_url: str,
    by_field: Literal["installationId", "logIngestId"] = "installationId",
) -> dict[str, Any]:
    if by_field == "logIngestId":
        row = await _by_ingest_id(tx, identifier)
        if row is None:
            raise NotFound("No integration has this log ingest id")
    else:
        row = await _row(tx, identifier)
    return to_api(row, public_url)


async def list_all(
    tx: Tx, public_url: str, actions_processing_enabled: bool | None = None
) -> list[dict[str, Any]]:
    if actions_processing_enabled is None:
        rows = await tx.fetch(_SELECT + "WHERE org_id = $1 ORDER BY identifier", tx.org_id)
    else:
        rows = await tx.fetch(
            _SELECT + "WHERE org_id = $1 AND actions_processing_enabled = $2 ORDER BY identifier",
            tx.org_id,
            actions_processing_enabled,
        )
    return [to_api(row, public_url) for row in rows]


async def create(tx: Tx, actor: str, body: dict[str, Any], public_url: str) -> dict[str, Any]:
    body = _checked(body)
    identifier = body["installationId"]
    row = await tx.fetchrow(
        "INSERT INTO integrations (org_id, identifier, title, installation_app_type, version, "
        "actions_processing_enabled, config, changelog_destination, resync_state, ingest_id, "
        "created_by, updated_by) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, '{}'::jsonb, $9, $10, $10) "
        "ON CONFLICT (org_id, identifier) DO NOTHING RETURNING identifier",
        tx.org_id,
        identifier,
        body.get("title"),
        body.get("installationAppType"),
        body.get("version"),
        bool(body.get("actionsProcessingEnabled") or False),
        body.get("config") or {},
        body.get("changelogDestination"),
        secrets.token_urlsafe(32),
        actor,
    )
    if row is None:
        raise Conflict(f"Integration {identifier!r} exists", code="integration_exists")
    return await get(tx, identifier, public_url)


_PATCHABLE = {
    "title": "title",
    "installationAppType": "installation_app_type",
    "version": "version",
    "actionsProcessingEnabled": "actions_processing_enabled",
    "config": "config",
    "changelogDestination": "changelog_destination",
}


async def patch(
    tx: Tx, actor: str, identifier: str, body: dict[str, Any], public_url: str
) -> dict[str, Any]:
    """Change the keys given. Any PATCH, an empty one too, moves `updatedAt`: that is how a
    resync is asked of a polling integration."""
    body = _checked(body)
    values: list[Any] = [tx.org_id, identifier, actor]
    sets = ["updated_at = now()", "updated_by = $3"]
    for key, column in _PATCHABLE.items():
        if key not in body:
            continue
        value = body[key]
        if key == "config" and value is None:
            value = {}
        if key == "actionsProcessingEnabled":
            value = bool(value)
        values.append(value)
        sets.append(f"{column} = ${len(values)}")
    updated = await tx.fetchval(
        f"UPDATE integrations SET {', '.join(sets)} "  # noqa: S608 - fixed column names
        "WHERE org_id = $1 AND identifier = $2 RETURNING identifier",
        *values,
    )
    if updated is None:
        raise _missing(identifier)
    return await get(tx, identifier, public_url)


async def report_resync(
    tx: Tx, identifier: str, state: dict[str, Any], public_url: str
) -> dict[str, Any]:
    """Merge the keys given into the resync state; `updatedAt` and
    `resyncState.updatedAt` become the same instant."""
    kept = {key: state[key] for key in _RESYNC_KEYS if key in state}
    updated = await tx.fetchval(
        "UPDATE integrations SET resync_state = resync_state || $3::jsonb, "
        "resync_updated_at = now(), updated_at = now() "
        "WHERE org_id = $1 AND identifier = $2 RETURNING identifier",
        tx.org_id,
        identifier,
        kept,
    )
    if updated is None:
        raise _missing(identifier)
    return await get(tx, identifier, public_url)


async def delete(tx: Tx, identifier: str) -> None:
    deleted = await tx.fetchval(
        "DELETE FROM integrations WHERE org_id = $1 AND identifier = $2 RETURNING identifier",
        tx.org_id,
        identifier,
    )
    if deleted is None:
        raise _missing(identifier)


# ------------------------------------------------------------------------------------------
# Examples


async def store_examples(tx: Tx, identifier: str, kind: str, examples: list[Any]) -> None:
    """Keep the latest examples of the kind: the new ones first, then the ones kept
    before, at most MAX_EXAMPLES."""
    if not storable(examples) or not storable(kind):
        raise Invalid("The examples hold a NUL character or an unpaired surrogate")
    await _row(tx, identifier)
    previous = await tx.fetchval(
        "SELECT examples FROM integration_kind_examples "
        "WHERE org_id = $1 AND integration = $2 AND kind = $3 FOR UPDATE",
        tx.org_id,
        identifier,
        kind,
    )
    kept = (list(examples) + list(previous or []))[:MAX_EXAMPLES]
    await tx.execute(
        "INSERT INTO integration_kind_examples (org_id, integration, kind, examples) "
        "VALUES ($1, $2, $3, $4) ON CONFLICT (org_id, integration, kind) "
        "DO UPDATE SET examples = EXCLUDED.examples, updated_at = now()",
        tx.org_id,
        identifier,
        kind,
        kept,
    )


async def get_examples(tx: Tx, identifier: str, kind: str) -> list[Any]:
    await _row(tx, identifier)
    examples = await tx.fetchval(
        "SELECT examples FROM integration_kind_examples "
        "WHERE org_id = $1 AND integration = $2 AND kind = $3",
        tx.org_id,
        identifier,
        kind,
    )
    return list(examples or [])


# ------------------------------------------------------------------------------------------
# Logs


def _log_time(value: Any, received: datetime) -> datetime:
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return received
        return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
    return received


def _clean(text: str) -> str:
    return text.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


def log_rows(logs: Any, received: datetime) -> list[tuple[datetime, str, str, dict[str, Any]]]:
    """Ocean's `{"logs": [{message, level, timestamp, extra}]}` lines as rows. A line is
    kept as well as it can be: a message that is not text is written as JSON text, a long
    one is cut, an unreadable timestamp is the time it arrived, extras that cannot be
    stored are left out."""
    if not isinstance(logs, list):
        raise Invalid("`logs` must be an array", details=[_problem("/logs", "must be an array")])
    if len(logs) > MAX_LOG_LINES:
        raise PayloadTooLarge(f"At most {MAX_LOG_LINES} log lines are accepted per request")
    rows = []
    for line in logs:
        if not isinstance(line, dict):
            line = {"message": line}
        message = line.get("message")
        text = message if isinstance(message, str) else str(message)
        level = line.get("level")
        extra = line.get("extra")
        rows.append(
            (
                _log_time(line.get("timestamp"), received),
                _clean(str(level) if level is not None else "INFO").upper()[:20],
                _clean(text)[:MAX_LOG_MESSAGE],
                extra if isinstance(extra, dict) and storable(extra) else {},
            )
        )
    return rows


async def ingest_logs(tx: Tx, ingest_id: str, logs: Any) -> int:
    """Store the lines for the integration whose ingest id this is; older lines past
    KEPT_LOGS go."""
    row = await _by_ingest_id(tx, ingest_id)
    if row is None:
        raise NotFound("No integration has this log ingest id")
    identifier = row["identifier"]
    rows = log_rows(logs, datetime.now(UTC))
    if not rows:
        return 0
    await tx.execute(
        "INSERT INTO integration_logs (org_id, integration, logged_at, level, message, extra) "
        "SELECT $1, $2, l.at, l.level, l.message, l.extra "
        "FROM unnest($3::timestamptz[], $4::text[], $5::text[], $6::jsonb[]) "
        "AS l(at, level, message, extra)",
        tx.org_id,
        identifier,
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        [r[3] for r in rows],
    )
    await tx.execute(
        "DELETE FROM integration_logs WHERE org_id = $1 AND integration = $2 AND id <= ("
        " SELECT id FROM integration_logs WHERE org_id = $1 AND integration = $2"
        " ORDER BY id DESC OFFSET $3 LIMIT 1)",
        tx.org_id,
        identifier,
        KEPT_LOGS,
    )
    return len(rows)


def log_to_api(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "level": row["level"],
        "message": row["message"],
        "timestamp": row["logged_at"],
        "extra": row["extra"],
    }


async def list_logs(
    tx: Tx,
    identifier: str,
    *,
    limit: int,
    timestamp: datetime | None,
    log_id: int | None,
    direction: Literal["up", "down"],
    levels: list[str] | None,
) -> list[dict[str, Any]]:
    """A page of the integration's logs, newest first. Without `timestamp`: the latest.
    `down`: the lines before `timestamp` (and, at that very instant, before `log_id`);
    `up`: the lines after it."""
    await _row(tx, identifier)
    values: list[Any] = [tx.org_id, identifier]
    where = ["org_id = $1", "integration = $2"]
    if levels:
        values.append([level.upper() for level in levels])
        where.append(f"level = ANY(${len(values)}::text[])")
    newer = direction == "up"
    if timestamp is not None:
        values.append(timestamp)
        at = f"${len(values)}"
        values.append(log_id if log_id is not None else (-1 if newer else 2**63 - 1))
        where.append(f"(logged_at, id) {'>' if newer else '<'} ({at}, ${len(values)})")
    values.append(limit)
    order = "ASC" if newer else "DESC"
    rows = await tx.fetch(
        "SELECT id, level, message, logged_at, extra FROM integration_logs "  # noqa: S608
        f"WHERE {' AND '.join(where)} ORDER BY logged_at {order}, id {order} "
        f"LIMIT ${len(values)}",
        *values,
    )
    if newer:
        rows = list(reversed(rows))
    return [log_to_api(row) for row in rows]
