"""Definitions as the server stores them, so a file and the server's copy compare equal
when applying the file would change nothing.

Each kind keeps only its definition's keys (server-owned fields such as `createdAt`,
`updatedBy` or a scorecard's `state` fall away), fills the defaults the server fills, and
leaves out empty values, so an absent key, `null` and the default compare the same.
"""

from __future__ import annotations

import json
from typing import Any

from app.actions import definitions as action_definitions
from app.catalog.blueprints import DEFINITION_KEYS
from app.catalog.blueprints import normalise as normalise_blueprint
from app.workflows import definitions as workflow_definitions

BLUEPRINT_KEYS = DEFINITION_KEYS
ACTION_KEYS = action_definitions.DEFINITION_KEYS
SCORECARD_KEYS = ("identifier", "title", "levels", "rules", "filter", "properties")
WORKFLOW_KEYS = workflow_definitions.DEFINITION_KEYS
RULE_KEYS = ("identifier", "title", "description", "level", "query")
DEFAULT_LEVELS = [
    {"title": "Basic", "color": "paleBlue"},
    {"title": "Bronze", "color": "bronze"},
    {"title": "Silver", "color": "silver"},
    {"title": "Gold", "color": "gold"},
]
# The parts of a blueprint that name other blueprints' relations or properties: left out
# of the first write of a new blueprint, so blueprints can refer to each other in cycles.
LINKED_KEYS = ("relations", "mirrorProperties", "aggregationProperties")


def blueprint(body: dict[str, Any]) -> dict[str, Any]:
    """Raises app.kit.errors.Invalid (with JSON pointers) for a definition the server
    would refuse on its own."""
    definition = normalise_blueprint({k: body.get(k) for k in BLUEPRINT_KEYS if k in body})
    if not definition["schema"]["required"]:
        del definition["schema"]["required"]
    return _compact(definition)


def action(body: dict[str, Any]) -> dict[str, Any]:
    out = {k: body[k] for k in ACTION_KEYS if body.get(k) is not None}
    out.setdefault("requiredApproval", False)
    out.setdefault("publish", True)
    return out


def scorecard(body: dict[str, Any]) -> dict[str, Any]:
    out = {k: body[k] for k in SCORECARD_KEYS if body.get(k) is not None}
    out.setdefault("levels", [dict(level) for level in DEFAULT_LEVELS])
    rules = out.get("rules")
    if isinstance(rules, list):
        out["rules"] = [
            {k: rule[k] for k in RULE_KEYS if rule.get(k) is not None}
            if isinstance(rule, dict)
            else rule
            for rule in rules
        ]
    return out


def workflow(body: dict[str, Any]) -> dict[str, Any]:
    out = {k: body[k] for k in WORKFLOW_KEYS if body.get(k) is not None}
    out.setdefault("allowAnyoneToViewRuns", False)
    out.setdefault("connections", [])
    return out


def of(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    makers = {"blueprint": blueprint, "scorecard": scorecard, "action": action}
    return {**makers, "workflow": workflow}[kind](body)


def same(a: Any, b: Any) -> bool:
    """Equal as JSON (in Python True == 1 == 1.0; in a definition they differ)."""
    return fingerprint(a) == fingerprint(b)


def fingerprint(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def changed_keys(current: dict[str, Any], desired: dict[str, Any]) -> list[str]:
    keys = sorted(set(current) | set(desired))
    return [k for k in keys if not same(current.get(k), desired.get(k))]


def bare(definition: dict[str, Any]) -> dict[str, Any]:
    """A blueprint without what refers to other blueprints (relations and what follows
    them): its first write when it is new."""
    out = {k: v for k, v in definition.items() if k not in LINKED_KEYS}
    ownership = out.get("ownership")
    if isinstance(ownership, dict) and ownership.get("type") == "Inherited":
        del out["ownership"]
    return out


def is_linked(definition: dict[str, Any]) -> bool:
    return bool(bare(definition) != definition)


def _compact(definition: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in definition.items() if v is not None and v != {}}
