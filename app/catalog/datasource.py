"""The entities a datasource wrote: how Port's Ocean finds its own entities after a resync.

Every entity keeps its last writer's `User-Agent` as `datasource`; Ocean's is
`port-ocean/{type}/{version}/{identifier}/{exporter|gitops}`, and Ocean asks for the
entities whose datasource starts with `port-ocean/{type}/` and ends with
`/{identifier}/{exporter|gitops}` (any version), last written before its resync started,
to delete those the resync no longer produced.

Pages follow the index `ix_entities_datasource` (org, datasource, blueprint, identifier;
the column compares in the "C" collation, code point order): the prefix is a range of
that index and the position after a page is its cursor, so a page reads its own rows (and
those of other writers with the same prefix between them), whatever the catalog's size,
and pages neither skip nor repeat a row that keeps its datasource meanwhile. Rows written
after `before` are left out, so while a resync writes, the set being paged only shrinks.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.db.database import Tx
from app.kit.errors import Invalid

# The largest code point, and the surrogates PostgreSQL text never holds.
_MAX_CHAR = 0x10FFFF
_SURROGATES = (0xD800, 0xDFFF)


@dataclass(frozen=True, slots=True)
class Position:
    """Where a page ended: the last row's key in the index's order."""

    datasource: str
    blueprint: str
    identifier: str


def prefix_upper_bound(prefix: str) -> str | None:
    """The least string greater than every string that starts with `prefix`, in code point
    order (the "C" collation's order for UTF-8); None when there is none."""
    chars = list(prefix)
    while chars and ord(chars[-1]) == _MAX_CHAR:
        chars.pop()
    if not chars:
        return None
    point = ord(chars[-1]) + 1
    if _SURROGATES[0] <= point <= _SURROGATES[1]:
        point = _SURROGATES[1] + 1
    chars[-1] = chr(point)
    return "".join(chars)


# About the most a page's entities and relations may weigh: past it the page ends early.
PAGE_BYTES = 8 * 1024 * 1024


def encode_cursor(position: Position) -> str:
    raw = json.dumps(
        [position.datasource, position.blueprint, position.identifier], separators=(",", ":")
    ).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> Position:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        datasource, blueprint, identifier = json.loads(raw)
        if all(isinstance(part, str) for part in (datasource, blueprint, identifier)):
            return Position(datasource, blueprint, identifier)
    except (ValueError, TypeError, binascii.Error, RecursionError):
        pass
    raise Invalid(
        "from is not a cursor this API returned (pass a response's `next` unchanged)",
        details=[{"pointer": "/from", "message": "invalid cursor"}],
    )


# Each entity with its relations as Port shows them: every relation its blueprint
# declares, a list for `many`, else the one target or null.
_RELATIONS = """
    (SELECT jsonb_object_agg(
                br.relation,
                CASE WHEN br.many THEN coalesce(l.targets, '[]'::jsonb)
                     ELSE coalesce(l.targets -> 0, 'null'::jsonb) END)
       FROM blueprint_relations br
       LEFT JOIN LATERAL (
            SELECT jsonb_agg(r.target_identifier ORDER BY r.target_identifier) AS targets
              FROM entity_relations r
             WHERE r.org_id = br.org_id AND r.source_blueprint = br.blueprint
               AND r.source_identifier = e.identifier AND r.relation = br.relation
       ) l ON true
      WHERE br.org_id = e.org_id AND br.blueprint = e.blueprint) AS relations"""


def like_pattern(prefix: str, suffix: str) -> str:
    """A LIKE pattern for text that starts with `prefix` and ends with `suffix` (the two
    not overlapping), both taken literally."""

    def literal(text: str) -> str:
        return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")

    return literal(prefix) + "%" + literal(suffix)


def page_statement(*, upper: bool, before: bool, after: bool) -> str:
    """The page's statement. Parameters: $1 org, $2 prefix, $3 LIKE pattern, $4 limit, then
    the prefix's upper bound, `before`, and the cursor's three parts, each only when used.
    The range and cursor comparisons are leakproof, so under row-level security they are
    conditions of the index scan; the pattern (not leakproof) filters the range's rows."""
    conditions = ["e.org_id = $1", "e.datasource >= $2", "e.datasource LIKE $3"]
    n = 4
    if upper:
        n += 1
        conditions.append(f"e.datasource < ${n}")
    if before:
        n += 1
        conditions.append(f"e.updated_at < ${n}")
    if after:
        conditions.append(
            f"(e.datasource, e.blueprint, e.identifier) > (${n + 1}, ${n + 2}, ${n + 3})"
        )
    return (
        "SELECT p.*, pg_column_size(p.relations) AS size FROM ("  # noqa: S608 - constants
        "SELECT e.datasource, e.blueprint, e.identifier,"
        + _RELATIONS
        + "\n  FROM entities e\n WHERE "
        + "\n   AND ".join(conditions)
        + "\n ORDER BY e.datasource, e.blueprint, e.identifier\n LIMIT $4) p"
    )


def page_arguments(
    org_id: Any,
    prefix: str,
    suffix: str,
    limit: int,
    before: datetime | None,
    after: Position | None,
) -> tuple[str, list[Any]]:
    """The statement and its arguments for one page of `limit` rows (and one more, to know
    whether another page follows)."""
    upper = prefix_upper_bound(prefix)
    args: list[Any] = [org_id, prefix, like_pattern(prefix, suffix), limit + 1]
    if upper is not None:
        args.append(upper)
    if before is not None:
        args.append(before)
    if after is not None:
        args += [after.datasource, after.blueprint, after.identifier]
    sql = page_statement(
        upper=upper is not None, before=before is not None, after=after is not None
    )
    return sql, args


# Under row-level security the planner may not read a column's statistics through an
# operator that is not leakproof (LIKE), so it guesses the pattern keeps 0.5% of the
# range: a page would then look cheaper as a scan and sort of the whole range than as an
# ordered walk of the index that stops after `limit` rows. A page is always that walk
# (the settings last until the request's transaction ends; it runs nothing else).
ORDERED_WALK = (
    "SELECT set_config('enable_seqscan', 'off', true), set_config('enable_sort', 'off', true)"
)


async def page(
    tx: Tx,
    *,
    prefix: str,
    suffix: str,
    limit: int,
    before: datetime | None = None,
    after: Position | None = None,
) -> tuple[list[dict[str, Any]], Position | None]:
    """One page of the entities whose datasource starts with `prefix` and ends with
    `suffix` (the two do not overlap), last written before `before`; and the position to
    continue from, None after the last page."""
    sql, args = page_arguments(tx.org_id, prefix, suffix, limit, before, after)
    await tx.execute(ORDERED_WALK)
    entities: list[dict[str, Any]] = []
    last: Any = None
    size = 0
    more = False
    # Read as a cursor: a page ends early (its `next` says where) once its relations pass
    # PAGE_BYTES, so a page's memory stays bounded whatever its entities link to.
    async for row in tx.conn.cursor(sql, *args, prefetch=200):
        if len(entities) >= limit or (entities and size >= PAGE_BYTES):
            more = True
            break
        size += len(row["identifier"]) + len(row["blueprint"]) + (row["size"] or 0)
        entities.append(
            {
                "identifier": row["identifier"],
                "blueprint": row["blueprint"],
                "relations": row["relations"] or {},
            }
        )
        last = row
    if not more:
        return entities, None
    return entities, Position(last["datasource"], last["blueprint"], last["identifier"])
