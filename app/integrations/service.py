"""Integrations: create, read, change, delete; resync reports and requests, kind examples,
logs and sync metrics.

Every statement filters by the transaction's org (row-level security fences the tables
besides). Timestamps come from the database: `updated_at` changes on every change of the
integration's definition or mapping, and a resync report sets it to the report's own
`resyncState.updatedAt`, so Ocean's older polling listener, which resyncs whenever the two
differ, sees a change only when someone made one. Current Ocean polls the integration's
resync request instead: an Admin's request, or a new mapping, is pending until the
integration next reports a resync running (see `resync_request`).
"""

from __future__ import annotations

import hmac
import json
import secrets
from datetime import UTC, datetime
from typing import Any, Literal

import asyncpg

from app.db.database import Tx
from app.kit.errors import Conflict, Invalid, NotFound, PayloadTooLarge

MAX_EXAMPLES = 5
MAX_INTEGRATIONS = 100  # per organization
MAX_EXAMPLE_KINDS = 200  # per integration: examples of further kinds are not stored
MAX_LOG_LINES = 1000  # per request
MAX_LOG_MESSAGE = 16 * 1024  # characters; longer messages are cut
KEPT_LOGS = 10_000  # per integration; older lines are dropped as new ones arrive
KEPT_SYNCS = 50  # per integration: the latest syncs' metrics are kept (Port keeps 50)
KEPT_SYNC_KINDS = 2000  # per integration: older syncs go while their kinds exceed this
MAX_SYNC_KINDS = 200  # per sync: kinds past this are not stored
MAX_METRICS_BYTES = 16 * 1024  # one kind's metrics, as JSON
_INGEST_LOOKUP = 12  # leading characters of an ingest id used to find it
_RESYNC_KEYS = ("status", "lastResyncStart", "lastResyncEnd", "nextResync", "intervalInMinuets")
_MAX_DEPTH = 100
# Identifiers the routes under /v1/integration/ answer themselves.
RESERVED_IDENTIFIERS = frozenset({"provision-enabled", "metadata"})
# Origins of an integration's default resources Ocean may record. `Port` means Port
# provisions them, which Portolan does not do (it answers no provision-enabled types).
ORIGINS = ("Empty", "Ocean", "Default")

_SELECT = """
SELECT identifier, title, installation_app_type, version, actions_processing_enabled, config,
       changelog_destination, resync_state, resync_updated_at, ingest_id, created_at,
       created_by, updated_at, updated_by, are_port_resources_initialized,
       incremental_sync_enabled, processing_mode, create_port_resources_origin, spec,
       ocean_core_version
FROM integrations
"""


def ingest_url(public_url: str, ingest_id: str) -> str:
    return f"{public_url.rstrip('/')}/v1/integration-logs/{ingest_id}"


def metrics_url(public_url: str, ingest_id: str) -> str:
    return f"{public_url.rstrip('/')}/v1/integration-metrics/{ingest_id}"


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
        "metricAttributes": {
            "ingestId": row["ingest_id"],
            "ingestUrl": metrics_url(public_url, row["ingest_id"]),
        },
        "arePortResourcesInitialized": row["are_port_resources_initialized"],
        "incrementalSyncEnabled": row["incremental_sync_enabled"],
        "processingMode": row["processing_mode"],
        "createPortResourcesOrigin": row["create_port_resources_origin"],
        "spec": row["spec"],
        "oceanCoreVersion": row["ocean_core_version"],
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
    threshold = config.get("entityDeletionThreshold")
    if "entityDeletionThreshold" in config and (
        isinstance(threshold, bool)
        or not isinstance(threshold, int | float)
        or not 0 <= threshold <= 1
    ):
        problems.append(_problem(f"{pointer}/entityDeletionThreshold", "must be a number 0-1"))
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
    origin = body.get("createPortResourcesOrigin")
    if origin is not None and origin not in ORIGINS:
        problems.append(
            _problem(
                "/createPortResourcesOrigin",
                f"must be one of {', '.join(ORIGINS)} (Portolan does not provision an "
                "integration's resources: Ocean creates them)",
            )
        )
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
    ocean_core_version: str | None = None,
) -> dict[str, Any]:
    """One integration. `ocean_core_version`, the Ocean version a read reports, is kept
    (written only when it changes)."""
    if ocean_core_version is not None and by_field == "installationId":
        await tx.execute(
            "UPDATE integrations SET ocean_core_version = $3 "
            "WHERE org_id = $1 AND identifier = $2 AND ocean_core_version IS DISTINCT FROM $3",
            tx.org_id,
            identifier,
            ocean_core_version,
        )
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


async def metadata(tx: Tx) -> list[dict[str, Any]]:
    """Port's member view of the org's integrations: what they are, not how they are set up
    (no config, no ingest URLs)."""
    rows = await tx.fetch(
        "SELECT identifier, title, installation_app_type, version, updated_at "
        "FROM integrations WHERE org_id = $1 ORDER BY identifier",
        tx.org_id,
    )
    return [
        {
            "identifier": r["identifier"],
            "installationId": r["identifier"],
            "integrationType": r["installation_app_type"],
            "title": r["title"],
            "version": r["version"],
            "updatedAt": r["updated_at"],
        }
        for r in rows
    ]


async def create(tx: Tx, actor: str, body: dict[str, Any], public_url: str) -> dict[str, Any]:
    body = _checked(body)
    identifier = body["installationId"]
    if identifier in RESERVED_IDENTIFIERS:
        raise Invalid(
            f"{identifier!r} is a route of /v1/integration, not an integration identifier",
            details=[_problem("/installationId", "is reserved")],
        )
    # One org's integrations are counted under its own lock: concurrent creations do not
    # pass the cap together.
    await tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1::uuid::text, 17))", tx.org_id
    )
    count = await tx.fetchval("SELECT count(*) FROM integrations WHERE org_id = $1", tx.org_id)
    if count >= MAX_INTEGRATIONS:
        raise Invalid(
            f"An organization has at most {MAX_INTEGRATIONS} integrations: delete one first",
            code="too_many_integrations",
        )
    row = await tx.fetchrow(
        "INSERT INTO integrations (org_id, identifier, title, installation_app_type, version, "
        "actions_processing_enabled, config, changelog_destination, resync_state, ingest_id, "
        "created_by, updated_by, are_port_resources_initialized, incremental_sync_enabled, "
        "processing_mode, create_port_resources_origin, spec) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, '{}'::jsonb, $9, $10, $10, $11, $12, $13, "
        "$14, $15) "
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
        bool(body.get("arePortResourcesInitialized") or False),
        bool(body.get("incrementalSyncEnabled") or False),
        body.get("processingMode"),
        body.get("createPortResourcesOrigin"),
        body.get("spec"),
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
    "arePortResourcesInitialized": "are_port_resources_initialized",
    "incrementalSyncEnabled": "incremental_sync_enabled",
    "processingMode": "processing_mode",
    "createPortResourcesOrigin": "create_port_resources_origin",
    "spec": "spec",
}
_FLAGS = ("actionsProcessingEnabled", "arePortResourcesInitialized", "incrementalSyncEnabled")
# A resync request's time is the statement's clock, not its transaction's start: a request
# written after a resync started is later than that start (see `resync_request`).
_REQUEST_RESYNC = "resync_requested_at = clock_timestamp(), resync_requested_by = $3"


async def patch(
    tx: Tx,
    actor: str,
    identifier: str,
    body: dict[str, Any],
    public_url: str,
    *,
    request_resync: bool = True,
) -> dict[str, Any]:
    """Change the keys given. Any PATCH, an empty one too, moves `updatedAt` (Ocean's older
    polling listener resyncs then). A new mapping (`config` given) also asks for a resync,
    unless `request_resync` is False (Ocean's `x-skip-resync`)."""
    body = _checked(body)
    values: list[Any] = [tx.org_id, identifier, actor]
    sets = ["updated_at = now()", "updated_by = $3"]
    if "config" in body and request_resync:
        sets.append(_REQUEST_RESYNC)
    for key, column in _PATCHABLE.items():
        if key not in body:
            continue
        value = body[key]
        if key == "config" and value is None:
            value = {}
        if key in _FLAGS:
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
    `resyncState.updatedAt` become the same instant. A `running` report is a resync
    starting: the requests made before it are answered by it."""
    kept = {key: state[key] for key in _RESYNC_KEYS if key in state}
    updated = await tx.fetchval(
        "UPDATE integrations SET resync_state = resync_state || $3::jsonb, "
        "resync_updated_at = now(), updated_at = now(), "
        "resync_started_at = CASE WHEN $4 THEN now() ELSE resync_started_at END "
        "WHERE org_id = $1 AND identifier = $2 RETURNING identifier",
        tx.org_id,
        identifier,
        kept,
        kept.get("status") == "running",
    )
    if updated is None:
        raise _missing(identifier)
    return await get(tx, identifier, public_url)


# ------------------------------------------------------------------------------------------
# Resync requests


def _pending(row: asyncpg.Record) -> dict[str, Any] | None:
    requested = row["resync_requested_at"]
    started = row["resync_started_at"]
    if requested is None or (started is not None and started >= requested):
        return None
    return {"updatedAt": requested, "requestedBy": row["resync_requested_by"]}


async def resync_request(tx: Tx, identifier: str) -> dict[str, Any] | None:
    """The pending resync request, or None. A request is pending until the integration
    reports a resync running after it; Ocean's polling listener resyncs when the request's
    `updatedAt` is later than the last one it acted on, so a request it has acted on (or
    that a resync since answered) never brings another resync."""
    row = await tx.fetchrow(
        "SELECT resync_requested_at, resync_requested_by, resync_started_at FROM integrations "
        "WHERE org_id = $1 AND identifier = $2",
        tx.org_id,
        identifier,
    )
    if row is None:
        raise _missing(identifier)
    return _pending(row)


async def request_resync(tx: Tx, actor: str, identifier: str) -> dict[str, Any]:
    """Ask the integration to resync: a pending request (current Ocean), and `updatedAt`
    moved (Ocean's older polling listener)."""
    row = await tx.fetchrow(
        f"UPDATE integrations SET {_REQUEST_RESYNC}, updated_at = now() "  # noqa: S608
        "WHERE org_id = $1 AND identifier = $2 "
        "RETURNING resync_requested_at, resync_requested_by, resync_started_at",
        tx.org_id,
        identifier,
        actor,
    )
    if row is None:
        raise _missing(identifier)
    return {"updatedAt": row["resync_requested_at"], "requestedBy": row["resync_requested_by"]}


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
    if previous is None:
        kinds = await tx.fetchval(
            "SELECT count(*) FROM integration_kind_examples WHERE org_id = $1 AND integration = $2",
            tx.org_id,
            identifier,
        )
        if kinds >= MAX_EXAMPLE_KINDS:
            return  # the integration's first kinds keep theirs; further kinds are not stored
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
    event_id: str | None = None,
) -> list[dict[str, Any]]:
    """A page of the integration's logs, newest first. Without `timestamp`: the latest.
    `down`: the lines before `timestamp` (and, at that very instant, before `log_id`);
    `up`: the lines after it. `event_id`: the lines Ocean logged during that event or the
    events it started."""
    await _row(tx, identifier)
    values: list[Any] = [tx.org_id, identifier]
    where = ["org_id = $1", "integration = $2"]
    if levels:
        values.append([level.upper() for level in levels])
        where.append(f"level = ANY(${len(values)}::text[])")
    if event_id is not None:
        values.append(event_id)
        n = len(values)
        where.append(f"(extra->>'event_id' = ${n} OR extra->>'event_parent_id' = ${n})")
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


# ------------------------------------------------------------------------------------------
# Sync metrics


def _metric_row(item: dict[str, Any], pointer: str) -> tuple[Any, ...]:
    """One kind's report as a row: (event id, kind identifier, kind, index, blueprint, state,
    integration type, integration version, ocean version, metrics)."""
    metrics = item.get("metrics") or {}
    if not storable(item):
        raise Invalid(
            "Metrics hold a NUL character, an unpaired surrogate or too deep a nesting",
            details=[_problem(pointer, "cannot be stored")],
        )
    if len(json.dumps(metrics, separators=(",", ":"))) > MAX_METRICS_BYTES:
        raise Invalid(
            f"One kind's metrics are at most {MAX_METRICS_BYTES} bytes of JSON",
            details=[_problem(f"{pointer}/metrics", "too large")],
        )
    kind_identifier = item["kindIdentifier"]
    return (
        item["eventId"],
        kind_identifier,
        item.get("kind") or kind_identifier,
        item.get("kindIndex") or 0,
        item.get("blueprint") or None,
        item.get("syncState"),
        item.get("integrationType"),
        item.get("integrationVersion"),
        item.get("oceanVersion"),
        metrics,
    )


async def _ingest_integration(tx: Tx, ingest_id: str) -> str:
    row = await _by_ingest_id(tx, ingest_id)
    if row is None:
        raise NotFound("No integration has this metrics ingest id")
    return str(row["identifier"])


async def _touch_sync(tx: Tx, identifier: str, event_id: str) -> None:
    await tx.execute(
        "INSERT INTO integration_syncs (org_id, integration, event_id) VALUES ($1, $2, $3) "
        "ON CONFLICT (org_id, integration, event_id) DO UPDATE SET updated_at = now()",
        tx.org_id,
        identifier,
        event_id,
    )


async def _store_kinds(tx: Tx, identifier: str, event_id: str, rows: list[tuple[Any, ...]]) -> int:
    """Upsert the kinds of one sync (new kinds past MAX_SYNC_KINDS are left out); the sync
    takes its `__runtime__` kind's state, else the last state reported."""
    await _touch_sync(tx, identifier, event_id)
    known = {
        r["kind_identifier"]
        for r in await tx.fetch(
            "SELECT kind_identifier FROM integration_sync_kinds "
            "WHERE org_id = $1 AND integration = $2 AND event_id = $3",
            tx.org_id,
            identifier,
            event_id,
        )
    }
    latest: dict[str, tuple[Any, ...]] = {}
    for row in rows:
        if row[1] in known or row[1] in latest or len(known) + len(latest) < MAX_SYNC_KINDS:
            latest[row[1]] = row
    kept = list(latest.values())
    if not kept:
        return 0
    await tx.execute(
        "INSERT INTO integration_sync_kinds (org_id, integration, event_id, kind_identifier, "
        "kind, kind_index, blueprint, sync_state, integration_type, integration_version, "
        "ocean_version, metrics) "
        "SELECT $1, $2, $3, k.* FROM unnest($4::text[], $5::text[], $6::int[], $7::text[], "
        "$8::text[], $9::text[], $10::text[], $11::text[], $12::jsonb[]) AS k "
        "ON CONFLICT (org_id, integration, event_id, kind_identifier) DO UPDATE SET "
        "kind = EXCLUDED.kind, kind_index = EXCLUDED.kind_index, blueprint = EXCLUDED.blueprint, "
        "sync_state = EXCLUDED.sync_state, integration_type = EXCLUDED.integration_type, "
        "integration_version = EXCLUDED.integration_version, "
        "ocean_version = EXCLUDED.ocean_version, metrics = EXCLUDED.metrics, updated_at = now()",
        tx.org_id,
        identifier,
        event_id,
        *([row[i] for row in kept] for i in range(1, 10)),
    )
    await tx.execute(
        "UPDATE integration_syncs s SET sync_state = coalesce(("
        " SELECT k.sync_state FROM integration_sync_kinds k WHERE k.org_id = s.org_id"
        " AND k.integration = s.integration AND k.event_id = s.event_id"
        " AND k.kind_identifier = '__runtime__'), $4, s.sync_state) "
        "WHERE org_id = $1 AND integration = $2 AND event_id = $3",
        tx.org_id,
        identifier,
        event_id,
        kept[-1][5],
    )
    return len(kept)


async def _prune_syncs(tx: Tx, identifier: str) -> None:
    """Drop the oldest syncs past KEPT_SYNCS, or while the kinds kept exceed
    KEPT_SYNC_KINDS (the newest sync always stays)."""
    await tx.execute(
        "DELETE FROM integration_syncs d WHERE d.org_id = $1 AND d.integration = $2 "
        "AND d.event_id IN (SELECT event_id FROM ("
        " SELECT s.event_id, row_number() OVER w AS n, sum(k.kinds) OVER w AS total"
        " FROM integration_syncs s CROSS JOIN LATERAL ("
        "  SELECT count(*) AS kinds FROM integration_sync_kinds k WHERE k.org_id = s.org_id"
        "  AND k.integration = s.integration AND k.event_id = s.event_id) k"
        " WHERE s.org_id = $1 AND s.integration = $2"
        " WINDOW w AS (ORDER BY s.seq DESC ROWS UNBOUNDED PRECEDING)) ranked"
        " WHERE n > $3 OR (n > 1 AND total > $4))",
        tx.org_id,
        identifier,
        KEPT_SYNCS,
        KEPT_SYNC_KINDS,
    )


async def ingest_sync_metrics(tx: Tx, ingest_id: str, items: list[dict[str, Any]]) -> int:
    """Store kinds' metrics (Ocean's `syncKindsMetrics`) for the integration whose ingest
    id this is; a report with no event id belongs to no sync and is not kept. Returns how
    many kinds were stored."""
    identifier = await _ingest_integration(tx, ingest_id)
    by_event: dict[str, list[tuple[Any, ...]]] = {}
    for index, item in enumerate(items):
        row = _metric_row(item, f"/syncKindsMetrics/{index}")
        if row[0]:
            by_event.setdefault(row[0], []).append(row)
    stored = 0
    for event_id, rows in by_event.items():
        stored += await _store_kinds(tx, identifier, event_id, rows)
    if by_event:
        await _prune_syncs(tx, identifier)
    return stored


async def ingest_kind_metrics(
    tx: Tx, ingest_id: str, event_id: str, kind_identifier: str, item: dict[str, Any]
) -> int:
    """Store one kind's metrics (Ocean's PUT .../resync/{eventId}/kind/{kindIdentifier}):
    the path names the sync and the kind."""
    identifier = await _ingest_integration(tx, ingest_id)
    if not storable(event_id) or not storable(kind_identifier):
        raise Invalid("The event id and kind are text")
    if not event_id:
        return 0
    row = _metric_row(
        {**item, "eventId": event_id, "kindIdentifier": kind_identifier}, "/syncKindMetrics"
    )
    stored = await _store_kinds(tx, identifier, event_id, [row])
    await _prune_syncs(tx, identifier)
    return stored


async def heartbeat(tx: Tx, ingest_id: str, event_id: str) -> None:
    """A running sync's liveness (Ocean posts one every few seconds while it syncs)."""
    identifier = await _ingest_integration(tx, ingest_id)
    if not storable(event_id):
        raise Invalid("The event id is text")
    inserted = await tx.fetchval(
        "INSERT INTO integration_syncs (org_id, integration, event_id, sync_state, heartbeat_at) "
        "VALUES ($1, $2, $3, 'syncing', now()) ON CONFLICT (org_id, integration, event_id) "
        "DO UPDATE SET heartbeat_at = now() RETURNING xmax = 0",
        tx.org_id,
        identifier,
        event_id,
    )
    if inserted:
        await _prune_syncs(tx, identifier)


def _sync_to_api(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "eventId": row["event_id"],
        "syncState": row["sync_state"] or "syncing",
        "createdAt": row["created_at"],
        "updatedAt": row["updated_at"],
        "lastHeartbeatAt": row["heartbeat_at"],
    }


async def list_syncs(tx: Tx, identifier: str) -> list[dict[str, Any]]:
    """The integration's syncs with metrics kept, newest first."""
    await _row(tx, identifier)
    rows = await tx.fetch(
        "SELECT event_id, sync_state, created_at, updated_at, heartbeat_at "
        "FROM integration_syncs WHERE org_id = $1 AND integration = $2 ORDER BY seq DESC",
        tx.org_id,
        identifier,
    )
    return [_sync_to_api(row) for row in rows]


async def sync_metrics(tx: Tx, identifier: str, resync_id: str | None) -> list[dict[str, Any]]:
    """Each kind's metrics of one sync: `resync_id`'s, or the latest sync's."""
    await _row(tx, identifier)
    if resync_id is None:
        resync_id = await tx.fetchval(
            "SELECT event_id FROM integration_syncs WHERE org_id = $1 AND integration = $2 "
            "ORDER BY seq DESC LIMIT 1",
            tx.org_id,
            identifier,
        )
        if resync_id is None:
            return []
    else:
        found = await tx.fetchval(
            "SELECT event_id FROM integration_syncs "
            "WHERE org_id = $1 AND integration = $2 AND event_id = $3",
            tx.org_id,
            identifier,
            resync_id,
        )
        if found is None:
            raise NotFound(f"No metrics are kept for resync {resync_id!r}")
    rows = await tx.fetch(
        "SELECT * FROM integration_sync_kinds "
        "WHERE org_id = $1 AND integration = $2 AND event_id = $3 "
        "ORDER BY kind_index, kind_identifier",
        tx.org_id,
        identifier,
        resync_id,
    )
    return [
        {
            "integrationType": row["integration_type"] or "",
            "integrationIdentifier": identifier,
            "integrationVersion": row["integration_version"] or "",
            "oceanVersion": row["ocean_version"] or "",
            "kindIdentifier": row["kind_identifier"],
            "kind": row["kind"],
            "kindIndex": row["kind_index"],
            "eventId": row["event_id"],
            "syncState": row["sync_state"] or "",
            "blueprint": row["blueprint"] or "",
            "metrics": row["metrics"],
            "createdAt": row["created_at"],
            "updatedAt": row["updated_at"],
        }
        for row in rows
    ]
