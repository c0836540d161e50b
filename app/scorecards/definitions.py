"""Scorecard definitions in Port's shape: checked, normalised, and turned into search rules.

`{identifier, title, levels?: [{title, color}], filter?: {combinator, conditions},
  rules: [{identifier, title, description?, level, query: {combinator, conditions}}]}`

Conditions are Port's: `{property | relation, operator, value?, not?}`. They become rules of
the search language (a relation is a property there) and are compiled by the search
compiler against the blueprint, so a condition names a real property, an operator its type
takes and a value of that type, or the definition is a 422 naming it.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from app.catalog.validation import (
    COLORS,
    MAX_IDENTIFIER,
    Problems,
    valid_entity_identifier,
    valid_key,
)
from app.kit.errors import Invalid
from app.search.compiler import Compiler
from app.search.sql import Scope

DEFAULT_LEVELS = [
    {"title": "Basic", "color": "paleBlue"},
    {"title": "Bronze", "color": "bronze"},
    {"title": "Silver", "color": "silver"},
    {"title": "Gold", "color": "gold"},
]
MAX_LEVELS = 10
MAX_RULES = 100
MAX_CONDITIONS = 50
_KEYS = {"identifier", "title", "levels", "filter", "rules", "id", "blueprint", "properties"}
_PROPERTY_NAME = re.compile(r"^[A-Za-z0-9@_=\\-]{1,100}$")  # Port's propertyNames pattern
MAX_PROPERTIES_BYTES = 16 * 1024  # a scorecard's `properties` as JSON
_RULE_KEYS = {"identifier", "title", "description", "level", "query"}


def _text(value: Any, limit: int) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit


async def normalise(body: Any, blueprint: str, scope: Scope) -> dict[str, Any]:
    """The definition as stored, or Invalid naming every problem by JSON pointer. Its
    conditions are compiled one per turn of the event loop (a scorecard of many rules does
    not hold every org's requests for the whole of it)."""
    problems = Problems()
    if not isinstance(body, dict):
        problems.add("/", "a scorecard is an object")
        problems.raise_if_any("The scorecard is invalid")
    unknown = sorted(set(body) - _KEYS)
    if unknown:
        problems.add("/", f"unknown field(s) {', '.join(unknown)}")
    identifier = body.get("identifier")
    if not isinstance(identifier, str) or not valid_entity_identifier(identifier):
        problems.add(
            "/identifier",
            f"identifier is required: letters, digits, @_.+:\\/=- (at most {MAX_IDENTIFIER})",
        )
    elif len(identifier) > MAX_IDENTIFIER:
        problems.add("/identifier", f"at most {MAX_IDENTIFIER} characters")
    if body.get("blueprint") not in (None, blueprint):
        problems.add("/blueprint", f"the scorecard belongs to blueprint {blueprint!r}")
    title = body.get("title")
    if not _text(title, 200):
        problems.add("/title", "title is required (at most 200 characters)")
    levels = _levels(body.get("levels"), problems)
    names = [level["title"] for level in levels]
    rules = _rules(body.get("rules"), names, problems)
    flt = body.get("filter")
    if flt is not None:
        _query(flt, "/filter", problems)
    properties = _properties(body.get("properties"), problems)
    problems.raise_if_any("The scorecard is invalid")
    # Every condition compiles against the blueprint (types, operators, values).
    checked = Scope(scope.org_id, scope.blueprints, [blueprint], now=scope.now)
    for index, rule in enumerate(rules):
        _compile(checked, rule["query"], f"/rules/{index}/query", problems)
        await asyncio.sleep(0)
    if flt is not None:
        _compile(checked, flt, "/filter", problems)
    problems.raise_if_any("The scorecard is invalid")
    out: dict[str, Any] = {
        "identifier": identifier,
        "title": title,
        "levels": levels,
        "rules": rules,
        "filter": flt,
        "properties": properties,
    }
    return out


def _properties(raw: Any, problems: Problems) -> dict[str, Any]:
    """Port's `properties`: `{"key": value}` pairs (any JSON value) the scorecard keeps."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.add("/properties", "properties is an object of key-value pairs")
        return {}
    for key in raw:
        if not _PROPERTY_NAME.match(key):
            problems.add(
                f"/properties/{key.replace('~', '~0').replace('/', '~1')}",
                "a property's key: letters, digits and @_=- (at most 100)",
            )
    if len(json.dumps(raw, separators=(",", ":"))) > MAX_PROPERTIES_BYTES:
        problems.add("/properties", f"properties take at most {MAX_PROPERTIES_BYTES // 1024} KiB")
    return dict(raw)


def _levels(raw: Any, problems: Problems) -> list[dict[str, str]]:
    if raw is None:
        return [dict(level) for level in DEFAULT_LEVELS]
    if not isinstance(raw, list) or not raw or len(raw) > MAX_LEVELS:
        problems.add("/levels", f"levels is a list of 1..{MAX_LEVELS} {{title, color}}")
        return []
    levels: list[dict[str, str]] = []
    for index, level in enumerate(raw):
        pointer = f"/levels/{index}"
        if not isinstance(level, dict) or set(level) - {"title", "color"}:
            problems.add(pointer, "a level is {title, color}")
            continue
        if not _text(level.get("title"), 100):
            problems.add(f"{pointer}/title", "title is required (at most 100 characters)")
            continue
        if level.get("color") not in COLORS:
            problems.add(f"{pointer}/color", f"color must be one of {', '.join(COLORS)}")
            continue
        if any(seen["title"] == level["title"] for seen in levels):
            problems.add(f"{pointer}/title", f"level {level['title']!r} appears twice")
            continue
        levels.append({"title": level["title"], "color": level["color"]})
    return levels


def _rules(raw: Any, levels: list[str], problems: Problems) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or len(raw) > MAX_RULES:
        problems.add("/rules", f"rules is a list of at most {MAX_RULES} rules")
        return []
    rules: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, rule in enumerate(raw):
        pointer = f"/rules/{index}"
        if not isinstance(rule, dict):
            problems.add(pointer, "a rule is {identifier, title, level, query}")
            continue
        unknown = sorted(set(rule) - _RULE_KEYS)
        if unknown:
            problems.add(pointer, f"unknown field(s) {', '.join(unknown)}")
        identifier = rule.get("identifier")
        if not isinstance(identifier, str) or not valid_key(identifier):
            problems.add(f"{pointer}/identifier", "identifier matches ^[A-Za-z0-9@_=\\-]+$")
        elif identifier in seen:
            problems.add(f"{pointer}/identifier", f"rule {identifier!r} appears twice")
        else:
            seen.add(identifier)
        if not _text(rule.get("title"), 200):
            problems.add(f"{pointer}/title", "title is required (at most 200 characters)")
        description = rule.get("description")
        if description is not None and not isinstance(description, str):
            problems.add(f"{pointer}/description", "description must be a string")
        level = rule.get("level")
        if level not in levels:
            problems.add(f"{pointer}/level", f"level must be one of {', '.join(levels)}")
        elif levels and level == levels[0]:
            problems.add(
                f"{pointer}/level",
                f"{level!r} is the base level (every entity has it): it owns no rules",
            )
        _query(rule.get("query"), f"{pointer}/query", problems)
        out = {
            "identifier": identifier,
            "title": rule.get("title"),
            "level": level,
            "query": rule.get("query"),
        }
        if description is not None:
            out["description"] = description
        rules.append(out)
    return rules


def _query(query: Any, pointer: str, problems: Problems) -> None:
    if not isinstance(query, dict) or set(query) - {"combinator", "conditions"}:
        problems.add(pointer, "a query is {combinator, conditions}")
        return
    if query.get("combinator") not in ("and", "or"):
        problems.add(f"{pointer}/combinator", "combinator must be 'and' or 'or'")
    conditions = query.get("conditions")
    if not isinstance(conditions, list) or not conditions or len(conditions) > MAX_CONDITIONS:
        problems.add(f"{pointer}/conditions", f"conditions is a list of 1..{MAX_CONDITIONS}")


def to_rules(query: dict[str, Any]) -> dict[str, Any]:
    """A scorecard query as a search query: `relation` is a property there, and `not` on
    an emptiness condition is the other emptiness operator."""
    rules = []
    for condition in query["conditions"]:
        rule = dict(condition) if isinstance(condition, dict) else condition
        if isinstance(rule, dict):
            if "relation" in rule and "property" not in rule:
                rule["property"] = rule.pop("relation")
            if "not" in rule:
                negated = rule.pop("not")
                if negated is True and rule.get("operator") in ("isEmpty", "isNotEmpty"):
                    rule["operator"] = "isNotEmpty" if rule["operator"] == "isEmpty" else "isEmpty"
                elif negated not in (False, None):
                    rule["not"] = negated  # refused by the compiler, by name
        rules.append(rule)
    return {"combinator": query["combinator"], "rules": rules}


_RULES_SEGMENT = re.compile(r"^(?P<base>.*?/(?:query|filter))/rules/")


def _compile(scope: Scope, query: dict[str, Any], pointer: str, problems: Problems) -> None:
    try:
        Compiler(scope).compile(to_rules(query), pointer)
    except Invalid as exc:
        for detail in exc.details or []:
            where = _RULES_SEGMENT.sub(r"\g<base>/conditions/", str(detail.get("pointer", "")))
            problems.add(where, str(detail.get("message", "")))
