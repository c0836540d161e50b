"""From catalog files and the server's current definitions to a plan: what to create,
update, leave alone and (with prune) delete. Everything here reads; nothing writes."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from app.catalog.validation import (
    MAX_IDENTIFIER,
    valid_action_identifier,
    valid_blueprint_identifier,
    valid_entity_identifier,
)
from app.catalog_code import canonical
from app.catalog_code.loader import Document, Problem, label_of
from app.kit.errors import Invalid
from app.remote import Client

_WORKFLOW_IDENTIFIER = re.compile(r"^[A-Za-z0-9@_:-]{1,60}$")  # app/workflows/definitions.py

Key = tuple[str, str, str]  # (kind, scorecard's blueprint or "", identifier)
KIND_ORDER = {"blueprint": 0, "scorecard": 1, "action": 2, "workflow": 3}
OPS = ("create", "update", "delete", "unchanged")


@dataclass(slots=True)
class ServerState:
    organization: dict[str, Any]
    objects: dict[Key, dict[str, Any]]  # canonical definitions

    def ids(self, kind: str) -> set[str]:
        return {key[2] for key in self.objects if key[0] == kind}


@dataclass(slots=True)
class Change:
    op: str
    kind: str
    identifier: str
    blueprint: str | None = None
    desired: dict[str, Any] | None = None
    current: dict[str, Any] | None = None
    keys: list[str] = field(default_factory=list)
    source: str | None = None  # file:line

    @property
    def key(self) -> Key:
        return (self.kind, self.blueprint or "", self.identifier)

    @property
    def label(self) -> str:
        return label_of(self.kind, self.identifier, self.blueprint)


@dataclass(slots=True)
class Plan:
    organization: dict[str, Any]
    changes: list[Change]

    def count(self, op: str) -> int:
        return sum(1 for c in self.changes if c.op == op)

    @property
    def writes(self) -> list[Change]:
        return [c for c in self.changes if c.op != "unchanged"]


def fetch_state(client: Client) -> ServerState:
    organization = client.get("/v1/organization")["organization"]
    objects: dict[Key, dict[str, Any]] = {}
    for bp in client.get("/v1/blueprints")["blueprints"]:
        objects[("blueprint", "", bp["identifier"])] = _server_canonical("blueprint", bp)
    for sc in client.get("/v1/scorecards")["scorecards"]:
        objects[("scorecard", sc["blueprint"], sc["identifier"])] = canonical.scorecard(sc)
    for action in client.get("/v1/actions")["actions"]:
        objects[("action", "", action["identifier"])] = canonical.action(action)
    for flow in client.get("/v1/workflows")["workflows"]:
        objects[("workflow", "", flow["identifier"])] = canonical.workflow(flow)
    return ServerState(organization=organization, objects=objects)


def _server_canonical(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    try:
        return canonical.of(kind, body)
    except Invalid:
        # Stored before a stricter check: compare it as it is.
        return {k: v for k, v in body.items() if k in canonical.BLUEPRINT_KEYS and v is not None}


def org_mismatch(organization: dict[str, Any], expected: str) -> str | None:
    if expected in (str(organization.get("id")), organization.get("name")):
        return None
    return (
        f"the credentials belong to organization {organization.get('name')!r} "
        f"({organization.get('id')}), not {expected!r}: nothing was applied"
    )


def validate(
    documents: list[Document], state: ServerState, *, prune: bool
) -> tuple[dict[Key, tuple[Document, dict[str, Any]]], list[Problem]]:
    """Each document checked on its own and against the others and the server: its
    identifier, duplicates, what the server would refuse of a blueprint by itself, and
    the blueprints and actions it names. Returns the canonical definitions by key."""
    problems: list[Problem] = []
    desired: dict[Key, tuple[Document, dict[str, Any]]] = {}
    first_seen: dict[Key, Document] = {}
    for doc in documents:
        problem = _identifier_problem(doc)
        if problem:
            problems.append(Problem(doc.where("/identifier"), problem))
            continue
        if doc.key in first_seen:
            problems.append(
                Problem(
                    doc.where(),
                    f"{doc.label} is defined twice (first at {first_seen[doc.key].where()})",
                )
            )
            continue
        first_seen[doc.key] = doc
        try:
            definition = _canonical(doc)
        except Invalid as exc:
            for detail in exc.details or [{"pointer": "", "message": exc.message}]:
                pointer = str(detail.get("pointer", ""))
                problems.append(
                    Problem(
                        doc.where(pointer), f"{doc.label}: {pointer or '/'}: {detail['message']}"
                    )
                )
            continue
        desired[doc.key] = (doc, definition)

    blueprints = {key[2] for key in first_seen if key[0] == "blueprint"}
    actions = {key[2] for key in first_seen if key[0] == "action"}
    if not prune:
        blueprints |= state.ids("blueprint")
        actions |= state.ids("action")
    missing = (
        "is not in the files (--prune deletes what they do not define)"
        if prune
        else "exists neither in the files nor on the server"
    )
    for doc in first_seen.values():
        for pointer, kind, name in _references(doc):
            known = blueprints if kind == "blueprint" else actions
            if name not in known:
                problems.append(
                    Problem(
                        doc.where(pointer),
                        f"{doc.label}: {pointer}: {kind} {name!r} {missing}",
                    )
                )
    return desired, problems


def _identifier_problem(doc: Document) -> str | None:
    if doc.kind == "blueprint" and not valid_blueprint_identifier(doc.identifier):
        return (
            f"invalid blueprint identifier {doc.identifier!r}: 1-100 letters, digits or @_.+:\\/-"
        )
    if doc.kind == "action" and not valid_action_identifier(doc.identifier):
        return f"invalid action identifier {doc.identifier!r}: 1-100 letters, digits or @_.+:=-"
    if doc.kind == "workflow" and not _WORKFLOW_IDENTIFIER.match(doc.identifier):
        return f"invalid workflow identifier {doc.identifier!r}: 1-60 letters, digits or @_:-"
    if doc.kind == "scorecard":
        if not valid_entity_identifier(doc.identifier) or len(doc.identifier) > MAX_IDENTIFIER:
            return f"invalid scorecard identifier {doc.identifier!r}"
        if doc.blueprint is not None and not valid_blueprint_identifier(doc.blueprint):
            return f"invalid blueprint identifier {doc.blueprint!r}"
    return None


def _canonical(doc: Document) -> dict[str, Any]:
    allowed = {
        "blueprint": canonical.BLUEPRINT_KEYS,
        "scorecard": (*canonical.SCORECARD_KEYS, "id"),
        "action": canonical.ACTION_KEYS,
        "workflow": canonical.WORKFLOW_KEYS,
    }[doc.kind]
    unknown = sorted(set(doc.body) - set(allowed))
    if unknown:
        raise Invalid(
            "unknown keys",
            details=[{"pointer": f"/{k}", "message": f"unknown key {k!r}"} for k in unknown],
        )
    return canonical.of(doc.kind, doc.body)


def _references(doc: Document) -> Iterator[tuple[str, str, str]]:
    """(pointer, kind, identifier) of every blueprint and action a document names."""
    body = doc.body
    if doc.kind == "workflow":
        yield from _workflow_references(body)
    if doc.kind == "scorecard" and doc.blueprint is not None:
        yield "/blueprint", "blueprint", doc.blueprint
    if doc.kind == "blueprint":
        for section in ("relations", "aggregationProperties"):
            items = body.get(section)
            for name, item in (items or {}).items() if isinstance(items, dict) else ():
                if isinstance(item, dict) and isinstance(item.get("target"), str):
                    yield f"/{section}/{name}/target", "blueprint", item["target"]
    if doc.kind == "action":
        trigger = body.get("trigger") if isinstance(body.get("trigger"), dict) else {}
        assert isinstance(trigger, dict)
        if isinstance(trigger.get("blueprintIdentifier"), str):
            yield "/trigger/blueprintIdentifier", "blueprint", trigger["blueprintIdentifier"]
        event = trigger.get("event")
        if isinstance(event, dict):
            if isinstance(event.get("blueprintIdentifier"), str):
                yield (
                    "/trigger/event/blueprintIdentifier",
                    "blueprint",
                    event["blueprintIdentifier"],
                )
            if isinstance(event.get("actionIdentifier"), str):
                yield "/trigger/event/actionIdentifier", "action", event["actionIdentifier"]
        inputs = (trigger.get("userInputs") or {}).get("properties")
        for name, spec in inputs.items() if isinstance(inputs, dict) else ():
            if not isinstance(spec, dict):
                continue
            for pointer, part in (("", spec), ("/items", spec.get("items"))):
                if isinstance(part, dict) and isinstance(part.get("blueprint"), str):
                    yield (
                        f"/trigger/userInputs/properties/{name}{pointer}/blueprint",
                        "blueprint",
                        part["blueprint"],
                    )
        method = body.get("invocationMethod")
        if isinstance(method, dict) and method.get("type") == "UPSERT_ENTITY":
            target = method.get("blueprintIdentifier")
            if isinstance(target, str) and "{{" not in target:
                yield "/invocationMethod/blueprintIdentifier", "blueprint", target


def _workflow_references(body: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """The blueprints a workflow's nodes name: an event trigger's, an upsert's (when not a
    template) and an entity input's."""
    nodes = body.get("nodes")
    for index, node in enumerate(nodes if isinstance(nodes, list) else []):
        config = node.get("config") if isinstance(node, dict) else None
        if not isinstance(config, dict):
            continue
        at = f"/nodes/{index}/config"
        event = config.get("event")
        if isinstance(event, dict) and isinstance(event.get("blueprintIdentifier"), str):
            yield f"{at}/event/blueprintIdentifier", "blueprint", event["blueprintIdentifier"]
        target = config.get("blueprintIdentifier")
        if isinstance(target, str) and "{{" not in target:
            yield f"{at}/blueprintIdentifier", "blueprint", target
        inputs = (config.get("userInputs") or {}).get("properties")
        for name, spec in inputs.items() if isinstance(inputs, dict) else ():
            for pointer, part in (("", spec), ("/items", (spec or {}).get("items"))):
                if isinstance(part, dict) and isinstance(part.get("blueprint"), str):
                    yield (
                        f"{at}/userInputs/properties/{name}{pointer}/blueprint",
                        "blueprint",
                        part["blueprint"],
                    )


def make_plan(
    desired: dict[Key, tuple[Document, dict[str, Any]]], state: ServerState, *, prune: bool
) -> Plan:
    changes: list[Change] = []
    for key, (doc, definition) in desired.items():
        current = state.objects.get(key)
        change = Change(
            op="create",
            kind=key[0],
            identifier=key[2],
            blueprint=key[1] or None,
            desired=definition,
            current=current,
            source=doc.where(),
        )
        if current is not None:
            change.keys = canonical.changed_keys(current, definition)
            change.op = "update" if change.keys else "unchanged"
        changes.append(change)
    if prune:
        for key, current in state.objects.items():
            if key in desired or (key[0] == "blueprint" and key[2].startswith("_")):
                continue  # system blueprints (`_user`, `_team`) are only ever extended
            changes.append(
                Change(
                    op="delete",
                    kind=key[0],
                    identifier=key[2],
                    blueprint=key[1] or None,
                    current=current,
                )
            )
    # Listed in the order they are carried out: deletions last, actions first among them.
    changes.sort(
        key=lambda c: (
            c.op == "delete",
            -KIND_ORDER[c.kind] if c.op == "delete" else KIND_ORDER[c.kind],
            c.key,
        )
    )
    return Plan(organization=state.organization, changes=changes)


def refusals(plan: Plan, client: Client) -> list[Problem]:
    """Deletions prune does not make: blueprints that still have entities."""
    problems = []
    for change in plan.changes:
        if change.op == "delete" and change.kind == "blueprint":
            count = client.get(f"/v1/blueprints/{_quote(change.identifier)}/entities-count")
            held = int(count.get("count", 0))
            if held:
                problems.append(
                    Problem(
                        change.label,
                        f"has {held} entities: --prune does not delete a blueprint with "
                        "entities; delete them first (DELETE /v1/blueprints/"
                        f"{change.identifier}/all-entities) or keep its file",
                    )
                )
    return problems


def _quote(identifier: str) -> str:
    from urllib.parse import quote

    return quote(identifier, safe="")
