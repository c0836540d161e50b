"""A run's inputs checked against the action's `userInputs` (Port's input shapes).

Each input is checked with JSON Schema built from its definition (type, format, enum,
bounds, pattern, items); `entity` inputs name entities of their blueprint that must exist
(an identifier, or an object with an `identifier`); `required` is a list of inputs or a
`{jqQuery}` over `{form: inputs}`; inputs the action does not declare are refused; missing
inputs with a `default` take it. Every problem is reported at once, by JSON pointer
(`/properties/<input>`), so a caller sees each bad input in one 422.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jsonschema_rs

from app.catalog.validation import Problems

# Keys of an input definition that are JSON Schema as they stand.
_SCHEMA_KEYS = (
    "type",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "uniqueItems",
)
# Formats the JSON Schema format checker knows; the others are presentation (markdown,
# multi-line, yaml...) or references checked separately (entity, user, team).
_CHECKED_FORMATS = {"date-time", "email", "ipv4", "ipv6"}
MAX_INPUTS_BYTES = 512 * 1024


@dataclass
class EntityRef:
    """An `entity` input's value: the blueprint and identifiers it names."""

    name: str
    blueprint: str
    identifiers: list[str]
    many: bool


@dataclass
class Checked:
    properties: dict[str, Any]
    entity_refs: list[EntityRef] = field(default_factory=list)


def _schema_of(spec: dict[str, Any]) -> dict[str, Any]:
    schema = {k: spec[k] for k in _SCHEMA_KEYS if k in spec}
    fmt = spec.get("format")
    if fmt in _CHECKED_FORMATS:
        schema["format"] = fmt
    elif fmt == "url":
        schema["format"] = "uri"
    elif fmt in ("entity", "user", "team"):
        # A reference: a string identifier (or an entity object with one, for `entity`).
        schema.pop("type", None)
        schema["anyOf"] = [
            {"type": "string", "minLength": 1},
            {"type": "object", "required": ["identifier"]},
        ]
    if spec.get("type") == "array" and isinstance(spec.get("items"), dict):
        schema["items"] = _schema_of(spec["items"])
    return schema


def _dynamic(default: Any) -> bool:
    """A `{jqQuery}` default is computed by the form that shows the action, not here."""
    return isinstance(default, dict) and set(default) == {"jqQuery"}


def _reference(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("identifier"), str):
        return str(value["identifier"])
    return None


def check(user_inputs: dict[str, Any], raw: Any, required_by_jq: list[str] | None) -> Checked:
    """The inputs as the run keeps them, or Invalid naming every bad input.

    `required_by_jq`: the inputs a `required: {jqQuery}` made required (evaluated by the
    caller), or None when `required` is a list."""
    problems = Problems()
    if not isinstance(raw, dict):
        problems.add("/properties", "properties is an object of inputs")
        problems.raise_if_any("The run's inputs are invalid")
    specs: dict[str, Any] = user_inputs.get("properties") or {}
    for name in sorted(set(raw) - set(specs)):
        problems.add(f"/properties/{name}", f"{name!r} is not an input of this action")
    out: dict[str, Any] = {}
    for name, spec in specs.items():
        if name in raw and raw[name] is not None:
            out[name] = raw[name]
        elif isinstance(spec, dict) and "default" in spec and not _dynamic(spec["default"]):
            out[name] = spec["default"]
    required = user_inputs.get("required")
    names = required_by_jq if required_by_jq is not None else required
    for name in names if isinstance(names, list) else []:
        if name in specs and out.get(name) in (None, ""):
            problems.add(f"/properties/{name}", f"{name!r} is required")
    refs: list[EntityRef] = []
    for name, value in out.items():
        spec = specs.get(name)
        if not isinstance(spec, dict):
            continue
        pointer = f"/properties/{name}"
        try:
            validator = jsonschema_rs.Draft202012Validator(
                _schema_of(spec),
                validate_formats=True,
                pattern_options=jsonschema_rs.RegexOptions(),
            )
        except (jsonschema_rs.ValidationError, ValueError) as exc:
            problems.add(pointer, f"the action's definition of this input is unusable: {exc}")
            continue
        for error in validator.iter_errors(value):
            where = "".join(f"/{p}" for p in error.instance_path)
            problems.add(pointer + where, error.message)
        many = spec.get("type") == "array"
        holder = (spec.get("items") or {}) if many else spec
        if holder.get("format") == "entity" and isinstance(holder.get("blueprint"), str):
            values = value if many and isinstance(value, list) else [value]
            idents = [i for i in (_reference(v) for v in values) if i is not None]
            refs.append(EntityRef(name, holder["blueprint"], idents, many))
            # The run keeps identifiers; templates see the entities (see runs.trigger_data).
            out[name] = idents if many else (idents[0] if idents else value)
    problems.raise_if_any("The run's inputs are invalid")
    return Checked(out, refs)
