"""Pages and their widgets (Port's /v1/pages): create, read, list, change, delete; page
permissions; a blueprint's catalog page. Services never commit."""

from __future__ import annotations

from typing import Any

import asyncpg

from app.auth import permissions
from app.auth.principal import Principal
from app.catalog.validation import Problems, valid_blueprint_identifier
from app.db.database import Tx
from app.kit.errors import Conflict, Invalid, NotFound
from app.pages.widgets import DASHBOARD, TABLE, Row, assemble, flatten

PAGE_TYPES = ("dashboard", "blueprint-entities", "home", "entity")
# Port's page fields kept as given (besides identifier, type, blueprint and widgets).
_TEXT = ("title", "icon", "description", "parent", "after", "section")
_FLAGS = ("showInSidebar", "locked", "protected")
_KEYS = frozenset(("identifier", "type", "blueprint", "widgets", "requiredQueryParams"))
KEYS = _KEYS | set(_TEXT) | set(_FLAGS)
_MAX_TEXT = 10_000


def _check_page(body: Any, problems: Problems, *, partial: bool) -> dict[str, Any]:
    if not isinstance(body, dict):
        problems.add("", "a page is an object")
        problems.raise_if_any("The page is invalid")
    page: dict[str, Any] = body
    for key in body:
        if key not in KEYS:
            problems.add(f"/{key}", f"unknown page field (known: {', '.join(sorted(KEYS))})")
    if not partial or "identifier" in body:
        ident = body.get("identifier")
        if not isinstance(ident, str) or not valid_blueprint_identifier(ident):
            problems.add(
                "/identifier", "identifier: 1-100 letters, digits and @ _ . + : / = - characters"
            )
    if not partial or "type" in body:
        if body.get("type", "dashboard") not in PAGE_TYPES:
            problems.add("/type", f"type is one of {', '.join(PAGE_TYPES)}")
    for key in (*_TEXT, "blueprint"):
        value = body.get(key)
        if value is not None and (not isinstance(value, str) or len(value) > _MAX_TEXT):
            problems.add(f"/{key}", f"{key} must be a string")
    for key in _FLAGS:
        if key in body and not isinstance(body[key], bool):
            problems.add(f"/{key}", f"{key} must be true or false")
    params = body.get("requiredQueryParams", [])
    if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
        problems.add("/requiredQueryParams", "requiredQueryParams is a list of names")
    kind = body.get("type", "dashboard")
    if kind == "blueprint-entities" and not partial and not body.get("blueprint"):
        problems.add("/blueprint", "a catalog page (blueprint-entities) names its blueprint")
    return page


def _attributes(body: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in body.items()
        if k not in ("identifier", "type", "blueprint", "widgets") and v is not None
    }


def _rows(body: dict[str, Any], problems: Problems, max_widgets: int) -> list[Row]:
    rows = flatten(body.get("widgets", []), "/widgets", problems)
    if len(rows) > max_widgets:
        problems.add("/widgets", f"a page holds at most {max_widgets} widgets")
    return rows


# Widget rows per INSERT: a multi-row VALUES list naming the org (a router plan on the
# org's shard under Citus, where INSERT ... SELECT FROM unnest goes through the coordinator
# and is refused under row-level security), within PostgreSQL's 32,767 parameters.
_ROWS_PER_INSERT = 500
_INSERT = (
    "INSERT INTO page_widgets (org_id, page, id, container, position, type, definition) VALUES "
)
_UPSERT = (
    " ON CONFLICT (org_id, page, id) DO UPDATE SET container = EXCLUDED.container,"
    " position = EXCLUDED.position, type = EXCLUDED.type, definition = EXCLUDED.definition"
)


async def _write_widgets(tx: Tx, page: str, rows: list[Row]) -> None:
    """Makes the page's widget rows `rows`, touching only those that change (each change is
    an audit log entry)."""
    before = {r.id: r for r in await _widget_rows(tx, page)}
    gone = sorted(set(before) - {r.id for r in rows})
    if gone:
        await tx.execute(
            "DELETE FROM page_widgets WHERE org_id = $1 AND page = $2 AND id = ANY($3::varchar[])",
            tx.org_id,
            page,
            gone,
        )
    changed = [r for r in rows if before.get(r.id) != r]
    for first in range(0, len(changed), _ROWS_PER_INSERT):
        chunk = changed[first : first + _ROWS_PER_INSERT]
        values = ", ".join(
            f"($1, $2, ${3 + 5 * i}, ${4 + 5 * i}, ${5 + 5 * i}::int, ${6 + 5 * i},"
            f" ${7 + 5 * i}::jsonb)"
            for i in range(len(chunk))
        )
        args: list[Any] = [tx.org_id, page]
        for r in chunk:
            args.extend((r.id, r.container, r.position, r.type, r.definition))
        await tx.execute(_INSERT + values + _UPSERT, *args)  # numbered placeholders only


async def _widget_rows(tx: Tx, page: str) -> list[Row]:
    return [
        Row(r["id"], r["container"], r["position"], r["type"], r["definition"])
        for r in await tx.fetch(
            "SELECT id, container, position, type, definition FROM page_widgets "
            "WHERE org_id = $1 AND page = $2",
            tx.org_id,
            page,
        )
    ]


def _to_api(row: asyncpg.Record, rows: list[Row] | None) -> dict[str, Any]:
    page: dict[str, Any] = {"identifier": row["identifier"], "type": row["type"]}
    if row["blueprint"] is not None:
        page["blueprint"] = row["blueprint"]
    page.update(row["attributes"])
    if rows is not None:
        page["widgets"] = assemble(rows)
    page.update(
        createdAt=row["created_at"],
        createdBy=row["created_by"],
        updatedAt=row["updated_at"],
        updatedBy=row["updated_by"],
    )
    return page


_SELECT = (
    "SELECT identifier, type, blueprint, attributes, read_access, update_access, created_at, "
    "created_by, updated_at, updated_by FROM pages WHERE org_id = $1"
)


async def stored(tx: Tx, identifier: str, *, lock: bool = False) -> asyncpg.Record:
    row = await tx.fetchrow(
        _SELECT + " AND identifier = $2" + (" FOR UPDATE" if lock else ""), tx.org_id, identifier
    )
    if row is None:
        raise NotFound(f"Page {identifier!r} was not found", code="page_not_found")
    return row


async def create(
    tx: Tx, actor: str, body: Any, *, max_pages: int, max_widgets: int
) -> dict[str, Any]:
    problems = Problems()
    page = _check_page(body, problems, partial=False)
    rows = _rows(page, problems, max_widgets)
    problems.raise_if_any("The page is invalid")
    # Serialises creations in the org, so two at once cannot both pass the cap.
    await tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('pages:' || $1::uuid::text))", tx.org_id
    )
    count = await tx.fetchval("SELECT count(*) FROM pages WHERE org_id = $1", tx.org_id)
    if count >= max_pages:
        raise Invalid(
            f"The organization has {count} pages, the most it may have "
            "(PORTOLAN_PAGES_MAX_PER_ORG); delete one first",
            code="limit_reached",
        )
    inserted = await tx.fetchval(
        "INSERT INTO pages (org_id, identifier, type, blueprint, attributes, read_access, "
        "update_access, created_by, updated_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8) "
        "ON CONFLICT DO NOTHING RETURNING identifier",
        tx.org_id,
        page["identifier"],
        page.get("type", "dashboard"),
        page.get("blueprint"),
        _attributes(page),
        permissions.default_page_access("read"),
        permissions.default_page_access("update"),
        actor,
    )
    if inserted is None:
        raise Conflict(f"A page {page['identifier']!r} already exists", code="page_exists")
    await _write_widgets(tx, page["identifier"], rows)
    return _to_api(await stored(tx, page["identifier"]), rows)


async def get(tx: Tx, row: asyncpg.Record) -> dict[str, Any]:
    return _to_api(row, await _widget_rows(tx, row["identifier"]))


async def list_readable(tx: Tx, principal: Principal, *, compact: bool) -> list[dict[str, Any]]:
    """The pages the principal may read, by identifier; `compact` leaves widgets out."""
    rows = [
        r
        for r in await tx.fetch(_SELECT + " ORDER BY identifier", tx.org_id)
        if permissions.page_allows(principal, r["update_access"], "update")
        or permissions.page_allows(principal, r["read_access"], "read")
    ]
    if compact or not rows:
        return [_to_api(r, None) for r in rows]
    widgets: dict[str, list[Row]] = {r["identifier"]: [] for r in rows}
    for w in await tx.fetch(
        "SELECT page, id, container, position, type, definition FROM page_widgets "
        "WHERE org_id = $1 AND page = ANY($2::varchar[])",
        tx.org_id,
        list(widgets),
    ):
        widgets[w["page"]].append(
            Row(w["id"], w["container"], w["position"], w["type"], w["definition"])
        )
    return [_to_api(r, widgets[r["identifier"]]) for r in rows]


async def patch(
    tx: Tx, actor: str, row: asyncpg.Record, body: Any, *, max_widgets: int
) -> dict[str, Any]:
    """Port's PATCH: the fields given replace the stored ones (`widgets` all of them)."""
    identifier = row["identifier"]
    problems = Problems()
    change = _check_page(body, problems, partial=True)
    if change.get("identifier") not in (None, identifier):
        problems.add("/identifier", "a page's identifier does not change")
    rows = _rows(change, problems, max_widgets) if "widgets" in change else None
    problems.raise_if_any("The page is invalid")
    attributes = dict(row["attributes"])
    for key in KEYS - {"identifier", "type", "blueprint", "widgets"}:
        if key in change:
            if change[key] is None:
                attributes.pop(key, None)
            else:
                attributes[key] = change[key]
    kind = change.get("type", row["type"])
    blueprint = change["blueprint"] if "blueprint" in change else row["blueprint"]
    if kind == "blueprint-entities" and not blueprint:
        raise Invalid(
            "A catalog page (blueprint-entities) names its blueprint",
            details=[{"pointer": "/blueprint", "message": "required for this type"}],
        )
    await tx.execute(
        "UPDATE pages SET type = $3, blueprint = $4, attributes = $5, updated_at = now(), "
        "updated_by = $6 WHERE org_id = $1 AND identifier = $2",
        tx.org_id,
        identifier,
        kind,
        blueprint,
        attributes,
        actor,
    )
    if rows is not None:
        await _write_widgets(tx, identifier, rows)
    return await get(tx, await stored(tx, identifier))


async def delete(tx: Tx, identifier: str) -> None:
    deleted = await tx.fetchval(
        "DELETE FROM pages WHERE org_id = $1 AND identifier = $2 RETURNING identifier",
        tx.org_id,
        identifier,
    )
    if deleted is None:
        raise NotFound(f"Page {identifier!r} was not found", code="page_not_found")


def access(row: asyncpg.Record) -> dict[str, Any]:
    return {"read": row["read_access"], "update": row["update_access"]}


async def update_access(tx: Tx, actor: str, row: asyncpg.Record, body: Any) -> dict[str, Any]:
    merged = await permissions.merged_page_access(tx, access(row), body)
    await tx.execute(
        "UPDATE pages SET read_access = $3, update_access = $4, updated_at = now(), "
        "updated_by = $5 WHERE org_id = $1 AND identifier = $2",
        tx.org_id,
        row["identifier"],
        merged["read"],
        merged["update"],
        actor,
    )
    return merged


# ------------------------------------------------------------------------------------------
# Widgets: each change rewrites the page's widgets from its locked row (a page holds at
# most PORTOLAN_PAGE_WIDGETS_MAX), so every check of a whole page holds after it.


async def _rewrite(
    tx: Tx, actor: str, identifier: str, widgets: list[dict[str, Any]], max_widgets: int
) -> list[Row]:
    problems = Problems()
    rows = flatten(widgets, "/widgets", problems)
    if len(rows) > max_widgets:
        problems.add("/widgets", f"a page holds at most {max_widgets} widgets")
    problems.raise_if_any("The widget is invalid")
    await _write_widgets(tx, identifier, rows)
    await tx.execute(
        "UPDATE pages SET updated_at = now(), updated_by = $3 "
        "WHERE org_id = $1 AND identifier = $2",
        tx.org_id,
        identifier,
        actor,
    )
    return rows


def _find(widgets: list[dict[str, Any]], widget_id: str) -> tuple[list[dict[str, Any]], int]:
    """The list holding the widget and its place in it."""
    for i, widget in enumerate(widgets):
        if widget.get("id") == widget_id:
            return widgets, i
        for j, child in enumerate(widget.get("widgets", []) if widget["type"] == DASHBOARD else []):
            if child.get("id") == widget_id:
                return widget["widgets"], j
    raise NotFound(f"The page has no widget {widget_id!r}", code="widget_not_found")


def _single(widget: Any) -> dict[str, Any]:
    if not isinstance(widget, dict):
        raise Invalid("A widget is an object", details=[{"pointer": "", "message": "an object"}])
    return widget


async def create_widget(
    tx: Tx, actor: str, row: asyncpg.Record, body: Any, *, max_widgets: int
) -> dict[str, Any]:
    """Adds a widget: into the page's dashboard (a dashboard-widget holding the others) as
    a new full-width row, else at the end of the page."""
    widget = _single(body)
    identifier = row["identifier"]
    widgets = assemble(await _widget_rows(tx, identifier))
    wrappers = [w for w in widgets if w["type"] == DASHBOARD]
    if wrappers and widget.get("type") != DASHBOARD:
        wrapper = wrappers[0]
        wrapper["widgets"].append(widget)
        if isinstance(wrapper.get("layout"), list) and isinstance(widget.get("id"), str):
            wrapper["layout"].append({"height": 400, "columns": [{"id": widget["id"], "size": 12}]})
    else:
        widgets.append(widget)
    await _rewrite(tx, actor, identifier, widgets, max_widgets)
    return widget


async def update_widget(
    tx: Tx, actor: str, row: asyncpg.Record, widget_id: str, body: Any, *, max_widgets: int
) -> dict[str, Any]:
    """The fields given replace the widget's (`null` removes one); its id stays."""
    change = _single(body)
    if change.get("id") not in (None, widget_id):
        raise Invalid(
            "A widget's id does not change",
            details=[{"pointer": "/id", "message": "must be the widget's id"}],
        )
    identifier = row["identifier"]
    widgets = assemble(await _widget_rows(tx, identifier))
    holder, i = _find(widgets, widget_id)
    merged = {**holder[i], **change}
    holder[i] = {k: v for k, v in merged.items() if v is not None}
    await _rewrite(tx, actor, identifier, widgets, max_widgets)
    return holder[i]


async def delete_widget(tx: Tx, actor: str, row: asyncpg.Record, widget_id: str) -> None:
    """Removes the widget (a dashboard-widget with the widgets it holds) and its place in
    its dashboard's layout."""
    identifier = row["identifier"]
    widgets = assemble(await _widget_rows(tx, identifier))
    holder, i = _find(widgets, widget_id)
    del holder[i]
    for wrapper in widgets:
        layout = wrapper.get("layout") if wrapper["type"] == DASHBOARD else None
        if isinstance(layout, list):
            for line in layout:
                if isinstance(line, dict) and isinstance(line.get("columns"), list):
                    line["columns"] = [
                        c
                        for c in line["columns"]
                        if not (isinstance(c, dict) and c.get("id") == widget_id)
                    ]
            wrapper["layout"] = [
                line for line in layout if not isinstance(line, dict) or line.get("columns")
            ]
    await _rewrite(tx, actor, identifier, widgets, 10**9)


async def widget(tx: Tx, page: str, widget_id: str) -> Row:
    found = await tx.fetchrow(
        "SELECT id, container, position, type, definition FROM page_widgets "
        "WHERE org_id = $1 AND page = $2 AND id = $3",
        tx.org_id,
        page,
        widget_id,
    )
    if found is None:
        raise NotFound(f"The page has no widget {widget_id!r}", code="widget_not_found")
    return Row(
        found["id"], found["container"], found["position"], found["type"], found["definition"]
    )


# ------------------------------------------------------------------------------------------
# A blueprint's catalog page (POST /v1/blueprints?create_catalog_page=true)


async def create_catalog_page(
    tx: Tx, actor: str, blueprint: dict[str, Any], *, max_pages: int, max_widgets: int
) -> dict[str, Any]:
    """Port's catalog page of a blueprint: its identifier, title and icon, and a table of
    its entities."""
    identifier = blueprint["identifier"]
    page: dict[str, Any] = {
        "identifier": identifier,
        "type": "blueprint-entities",
        "blueprint": identifier,
        "title": blueprint.get("title") or identifier,
        "showInSidebar": True,
        "widgets": [
            {
                "id": f"{identifier}-table",
                "type": TABLE,
                "blueprint": identifier,
                "dataset": {
                    "combinator": "and",
                    "rules": [{"property": "$blueprint", "operator": "=", "value": identifier}],
                },
            }
        ],
    }
    if blueprint.get("icon"):
        page["icon"] = blueprint["icon"]
    try:
        return await create(tx, actor, page, max_pages=max_pages, max_widgets=max_widgets)
    except Conflict as exc:
        raise Conflict(
            f"A page {identifier!r} already exists, so the blueprint's catalog page cannot be "
            "made; the blueprint was not created (delete the page, or send "
            "create_catalog_page=false)",
            code="page_exists",
        ) from exc
