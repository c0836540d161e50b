"""Backstage Scaffolder `Template` documents (scaffolder.backstage.io/v1beta3) -> Portolan
workflows in Port's shape: the parameters' pages become one SELF_SERVE_TRIGGER's `userInputs`,
the steps a chain of nodes (a step's `if` a CONDITION before it), `${{ }}` expressions jq
templates. Portolan runs none of Backstage's actions itself (fetch:template, publish:github,
catalog:register ... write files, repositories and Backstage's catalog), so each step is a
WEBHOOK node to a Scaffolder runner named on the command line; without one the template is
reported and not imported (a form whose steps do nothing would mislead)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from app.backstage import expressions
from app.backstage.mapping import KIND_BLUEPRINTS, Origin, Ref
from app.backstage.reader import Document

TRIGGER = "trigger"
CATEGORY_DEFAULT = "Backstage templates"
# Backstage templates are offered to everyone who can see the catalog.
PERMISSIONS: dict[str, list[str]] = {"roles": ["Member"]}

_WORKFLOW_ID = re.compile(r"^[A-Za-z0-9@_:-]{1,60}$")
_NODE_ID = re.compile(r"^[A-Za-z0-9@_.:-]{1,90}$")
# Input keys kept as they are (Port's input shape; the rest of JSON Schema is not checked
# when a run starts, so it is reported rather than kept and ignored).
_INPUT_KEYS = (
    "title",
    "description",
    "default",
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
_ITEM_KEYS = ("type", "enum", "format", "pattern", "minLength", "maxLength", "minimum", "maximum")
_FORMATS = {
    "uri": "url",
    "url": "url",
    "email": "email",
    "date-time": "date-time",
    "ipv4": "ipv4",
    "ipv6": "ipv6",
}
_TYPES = ("string", "number", "boolean", "array", "object")
_PAGE_KEYS = {"title", "description", "type", "required", "properties"}
_STEP_KEYS = {"id", "name", "action", "input", "if"}
_SPEC_KEYS = {"type", "owner", "parameters", "steps", "output", "lifecycle"}


@dataclass(frozen=True, slots=True)
class StepLine:
    """What one step of a template became."""

    step: str
    action: str
    became: str

    def as_dict(self) -> dict[str, str]:
        return {"step": self.step, "action": self.action, "became": self.became}


@dataclass(slots=True)
class MappedTemplate:
    ref: Ref
    origin: Origin
    identifier: str
    definition: dict[str, Any] | None  # None: not imported (the problems say why)
    inputs: list[str] = field(default_factory=list)  # what each input became
    steps: list[StepLine] = field(default_factory=list)


class _Skip(Exception):
    """The template cannot be imported as a whole: `code` is the report's."""

    def __init__(self, message: str, code: str = "invalid-template") -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class _Mapper:
    document: Document
    ref: Ref
    origin: Origin
    runner_url: str | None
    blueprints: set[str]
    problems: list[Any]
    inputs: list[str] = field(default_factory=list)

    def report(self, code: str, message: str) -> None:
        self.problems.append(self.origin.problem(code, message))

    # -- parameters ----------------------------------------------------------------------

    def user_inputs(self, parameters: Any) -> dict[str, Any]:
        if parameters is None:
            pages: list[Any] = []
        elif isinstance(parameters, list):
            pages = parameters
        elif isinstance(parameters, dict):
            pages = [parameters]
        else:
            raise _Skip("spec.parameters is a JSON Schema object or a list of them")
        properties: dict[str, Any] = {}
        required: list[str] = []
        order: list[str] = []
        steps: list[dict[str, Any]] = []
        for number, page in enumerate(pages, start=1):
            where = (
                f"spec.parameters[{number - 1}]"
                if isinstance(parameters, list)
                else ("spec.parameters")
            )
            if not isinstance(page, dict):
                raise _Skip(f"{where} is not a JSON Schema object")
            for key in sorted(set(page) - _PAGE_KEYS - {"when"}):
                if not key.startswith("ui:"):
                    self.report("not-kept", f"{where}.{key} has no counterpart in userInputs")
            raw = page.get("properties") or {}
            if not isinstance(raw, dict):
                raise _Skip(f"{where}.properties is not a mapping")
            names: list[str] = []
            for name, spec in raw.items():
                name = str(name)
                if name in properties:
                    self.report(
                        "not-kept", f"{where}.properties.{name} is declared on an earlier page"
                    )
                    continue
                converted = self.input(name, spec, f"{where}.properties.{name}")
                if converted is not None:
                    properties[name] = converted
                    names.append(name)
            wanted = page.get("required") or []
            if not isinstance(wanted, list):
                raise _Skip(f"{where}.required is not a list")
            if "when" in page:
                # A page Backstage shows only on some answers: Portolan's form shows every
                # input, so requiring this page's would make the form impossible otherwise.
                self.report(
                    "not-kept",
                    f"{where}.when: the page is shown only when {page['when']!r} in "
                    "Backstage; Portolan's form shows its inputs always, as optional"
                    + (f" ({', '.join(map(str, wanted))} not required)" if wanted else ""),
                )
                wanted = []
            for name in wanted:
                if name in names and name not in required:
                    required.append(name)
                elif name not in names:
                    self.report("not-kept", f"{where}.required names {name!r}, not an input")
            names = _ordered(names, page.get("ui:order"))
            order.extend(names)
            if isinstance(page.get("title"), str) and names:
                steps.append({"title": page["title"], "order": names})
        out: dict[str, Any] = {"properties": properties, "required": required}
        if order:
            out["order"] = order
        if len(steps) > 1:  # Port's multi-step form: one step per Backstage page
            out["steps"] = steps
        return out

    def input(self, name: str, spec: Any, where: str) -> dict[str, Any] | None:
        if not isinstance(spec, dict):
            self.report("not-kept", f"{where} is not a JSON Schema object: left out")
            return None
        out: dict[str, Any] = {k: _jsonable(spec[k]) for k in _INPUT_KEYS if k in spec}
        kind = spec.get("type", "string" if "enum" not in spec else None)
        if isinstance(kind, list):
            kinds = [k for k in kind if k != "null"]
            kind = kinds[0] if len(kinds) == 1 else None
        if kind == "integer":
            self.report("not-kept", f"{where}: integer becomes number (fractions are accepted)")
            kind = "number"
        if kind is None and "enum" in spec:
            kind = "string"
        if kind not in _TYPES:
            self.report("not-kept", f"{where}: type {spec.get('type')!r} has no input type")
            return None
        out["type"] = kind
        fmt = spec.get("format")
        if fmt is not None:
            if fmt in _FORMATS:
                out["format"] = _FORMATS[fmt]
            else:
                self.report("not-kept", f"{where}: format {fmt!r} has no input format")
        if kind == "array" and isinstance(spec.get("items"), dict):
            items = spec["items"]
            out["items"] = {k: _jsonable(items[k]) for k in _ITEM_KEYS if k in items}
            if "format" in out["items"]:
                fmt = out["items"]["format"]
                if fmt in _FORMATS:
                    out["items"]["format"] = _FORMATS[fmt]
                else:
                    del out["items"]["format"]
            out["items"].setdefault("type", "string")
        became = self.widget(spec, out, where)
        dropped = sorted(
            k
            for k in spec
            if not k.startswith("ui:")
            and k not in (*_INPUT_KEYS, "type", "format", "items", "properties", "required")
        )
        if dropped:
            self.report("not-kept", f"{where}: {', '.join(dropped)} not kept")
        if kind == "object" and isinstance(spec.get("properties"), dict):
            self.report("not-kept", f"{where}: the object's own properties are not checked")
        self.inputs.append(f"{name}: {became}")
        return out

    def widget(self, spec: dict[str, Any], out: dict[str, Any], where: str) -> str:
        """`ui:field` / `ui:widget` mapped where Portolan has the same kind of input; what
        the input became, for the report."""
        field_name = spec.get("ui:field")
        widget = spec.get("ui:widget")
        options = _mapping(spec.get("ui:options"))
        plain = str(out["type"]) + (f" ({out['format']})" if "format" in out else "")
        if field_name is None:
            if widget == "textarea" and out["type"] == "string":
                out["format"] = "multi-line"
                return "string (multi-line)"
            if widget == "password":
                self.report(
                    "unmapped-field",
                    f"{where}: ui:widget password becomes a plain string input (the value is "
                    "seen on the run; an organization secret is the place for it)",
                )
            return plain
        kinds = _kinds(options)
        if field_name in ("OwnerPicker", "EntityPicker", "OwnedEntityPicker", "MultiEntityPicker"):
            if field_name == "OwnerPicker" and not kinds:
                kinds = ["group", "user"]
            target = self.target(field_name, kinds)
            if target is not None:
                holder: dict[str, Any] = {"type": "string", **target}
                if field_name == "MultiEntityPicker":
                    out["type"] = "array"
                    out["items"] = holder
                    return f"{field_name} -> array of {_describe(target)}"
                out.update(holder)
                return f"{field_name} -> {_describe(target)}"
            if field_name == "MultiEntityPicker":
                out["type"] = "array"
                out["items"] = {"type": "string"}
                plain = "array of strings"
            self.report(
                "unmapped-field",
                f"{where}: ui:field {field_name} (kinds {', '.join(kinds) or 'any'}) has no "
                f"Portolan input of the same kind: a plain {plain} input, entity refs as typed",
            )
            return f"{field_name} -> {plain}"
        if field_name == "EntityTagsPicker":
            out["type"] = "array"
            out["items"] = {"type": "string"}
            return "EntityTagsPicker -> array of strings"
        self.report(
            "unmapped-field",
            f"{where}: ui:field {field_name} has no Portolan counterpart: a plain {plain} input",
        )
        return f"{field_name} -> {plain}"

    def target(self, field_name: str, kinds: list[str]) -> dict[str, Any] | None:
        """The input format for a picker of these kinds: a team, a user (email), or an
        entity of the kind's blueprint when it exists."""
        if field_name == "OwnerPicker" and "group" in kinds:
            return {"format": "team"}  # Portolan's owners are teams; Users own nothing there
        if len(kinds) != 1:
            return None
        (kind,) = kinds
        if kind == "group":
            return {"format": "team"}
        if kind == "user":
            return {"format": "user"}
        blueprint = KIND_BLUEPRINTS.get(kind)
        if blueprint is not None and blueprint in self.blueprints:
            return {"format": "entity", "blueprint": blueprint}
        return None

    # -- steps ---------------------------------------------------------------------------

    def nodes(
        self, steps: Any, lines: list[StepLine]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        if not isinstance(steps, list) or not steps:
            raise _Skip("a Template needs spec.steps (a non-empty list)")
        nodes: list[dict[str, Any]] = []
        connections: list[dict[str, Any]] = []
        # Where the next node is reached from: (source, outlet or None, fallback?)
        pending: list[tuple[str, str | None, bool]] = [(TRIGGER, None, False)]
        earlier: set[str] = set()
        used: set[str] = {TRIGGER}
        outputs_read: dict[str, set[str]] = {}
        webhooks: dict[str, dict[str, Any]] = {}
        untranslatable: list[str] = []
        for index, step in enumerate(steps):
            if not isinstance(step, dict):
                raise _Skip(f"spec.steps[{index}] is not a mapping")
            action = step.get("action")
            if not isinstance(action, str) or not action:
                raise _Skip(f"spec.steps[{index}] has no action")
            step_id = str(step.get("id") or f"step{index + 1}")
            label = f"step {step_id} ({action})"
            if not _NODE_ID.match(step_id) or step_id in used or f"{step_id}:if" in used:
                raise _Skip(f"spec.steps[{index}].id {step_id!r} cannot name a workflow node")
            if "each" in step:
                raise _Skip(
                    f"{label} loops (each): a workflow has no loop over a list",
                    "unsupported-step",
                )
            for key in sorted(set(step) - _STEP_KEYS):
                self.report("not-kept", f"{label}: {key} has no counterpart")
            used.update({step_id, f"{step_id}:if"})
            context = expressions.Context(earlier_steps=set(earlier), secrets=True)
            try:
                body = {
                    "action": action,
                    "input": expressions.template(_jsonable(step.get("input") or {}), context),
                    "step": {"id": step_id, "name": str(step.get("name") or step_id)},
                    "template": str(self.ref),
                    "workflowRun": "{{ .workflowRun.identifier }}",
                }
            except expressions.Untranslatable as exc:
                untranslatable.append(f"{label} input: {exc}")
                body = {}
            condition_node: dict[str, Any] | None = None
            if "if" in step:
                if_context = expressions.Context(earlier_steps=set(earlier), secrets=False)
                try:
                    condition_node = {
                        "identifier": f"{step_id}:if",
                        "title": f"If: {step.get('name') or step_id}",
                        "config": {
                            "type": "CONDITION",
                            "outlets": [
                                {
                                    "identifier": "run",
                                    "title": "Run the step",
                                    "expression": expressions.condition(step["if"], if_context),
                                }
                            ],
                        },
                    }
                except expressions.Untranslatable as exc:
                    untranslatable.append(f"{label} if: {exc}")
                for source, reads in if_context.outputs_read.items():
                    outputs_read.setdefault(source, set()).update(reads)
            for source, reads in context.outputs_read.items():
                outputs_read.setdefault(source, set()).update(reads)
            node = {
                "identifier": step_id,
                "title": str(step.get("name") or step_id)[:200],
                "config": {
                    "type": "WEBHOOK",
                    "url": self.runner_url or "",
                    "method": "POST",
                    "body": body,
                },
            }
            webhooks[step_id] = node
            entry = step_id
            if condition_node is not None:
                nodes.append(condition_node)
                entry = condition_node["identifier"]
            nodes.append(node)
            for source, outlet, fallback in pending:
                connections.append(_connection(source, entry, outlet, fallback))
            if condition_node is not None:
                connections.append(_connection(entry, step_id, "run", False))
                pending = [(entry, None, True), (step_id, None, False)]
                lines.append(
                    StepLine(
                        step_id,
                        action,
                        f"CONDITION node {entry} (its if), then WEBHOOK node {step_id} to the "
                        "Scaffolder runner",
                    )
                )
            else:
                pending = [(step_id, None, False)]
                lines.append(
                    StepLine(step_id, action, f"WEBHOOK node {step_id} to the Scaffolder runner")
                )
            earlier.add(step_id)
        if untranslatable:
            raise _Skip("; ".join(untranslatable), "untranslatable")
        # A step's output is what the runner answers as `output`; the fields later steps
        # read become the node's output (variables), so `steps.x.output.y` reads
        # `.outputs["x"].y`.
        for step_id, reads in outputs_read.items():
            webhooks[step_id]["variables"] = {
                name: "{{ .result.response.data.output" + expressions.keys([name]) + " }}"
                for name in sorted(reads)
            }
        return nodes, connections

    def definition(self, lines: list[StepLine]) -> dict[str, Any]:
        body = self.document.body
        metadata: dict[str, Any] = _mapping(body.get("metadata"))
        spec: dict[str, Any] = _mapping(body.get("spec"))
        for key in sorted(set(spec) - _SPEC_KEYS):
            self.report("not-kept", f"spec.{key} has no counterpart in a workflow")
        if spec.get("output") is not None:
            self.report(
                "not-kept",
                "spec.output (links and text shown once a task ends) has no counterpart: the "
                "run shows each node's output",
            )
        user_inputs = self.user_inputs(spec.get("parameters"))
        nodes, connections = self.nodes(spec.get("steps"), lines)
        title = metadata.get("title") if isinstance(metadata.get("title"), str) else None
        trigger = {
            "identifier": TRIGGER,
            "title": (title or self.ref.name)[:200],
            "config": {
                "type": "SELF_SERVE_TRIGGER",
                "userInputs": user_inputs,
                "permissions": {"roles": list(PERMISSIONS["roles"])},
            },
        }
        definition: dict[str, Any] = {
            "identifier": self.ref.identifier,
            "title": (title or self.ref.name)[:200],
            "category": str(spec["type"])[:200] if spec.get("type") else CATEGORY_DEFAULT,
            "nodes": [trigger, *nodes],
            "connections": connections,
        }
        description = metadata.get("description")
        if isinstance(description, str) and description.strip():
            definition["description"] = description.strip()[:2000]
        return definition


def map_template(
    document: Document,
    ref: Ref,
    *,
    runner_url: str | None,
    blueprints: set[str],
    problems: list[Any],
) -> MappedTemplate:
    """The workflow a template becomes (or None, with the problems saying why), with what
    each input and step became."""
    origin = Origin(document.file, document.index, str(ref))
    mapped = MappedTemplate(ref, origin, ref.identifier, None)
    mapper = _Mapper(document, ref, origin, runner_url, blueprints, problems)
    if not _WORKFLOW_ID.match(ref.identifier):
        problems.append(
            origin.problem(
                "invalid-name",
                f"{ref.identifier!r} cannot be a workflow identifier (letters, digits and @_:-, "
                "at most 60)",
            )
        )
        return mapped
    lines: list[StepLine] = []
    try:
        definition = mapper.definition(lines)
    except _Skip as exc:
        problems.append(origin.problem(exc.code, f"not imported: {exc}"))
        mapped.steps = [StepLine(s.step, s.action, "not imported") for s in lines]
        return mapped
    mapped.inputs = mapper.inputs
    if not runner_url:
        problems.append(
            origin.problem(
                "no-runner",
                "not imported: its steps run Backstage actions ("
                + ", ".join(sorted({s.action for s in lines}))
                + "), which only a Scaffolder runner can run: name one with "
                "--scaffolder-runner-url",
            )
        )
        mapped.steps = [StepLine(s.step, s.action, "not imported (no runner URL)") for s in lines]
        return mapped
    mapped.steps = lines
    mapped.definition = definition
    return mapped


def _connection(source: str, target: str, outlet: str | None, fallback: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"sourceIdentifier": source, "targetIdentifier": target}
    if outlet is not None:
        out["sourceOutletIdentifier"] = outlet
    if fallback:
        out["fallback"] = True
    return out


def _kinds(options: dict[str, Any]) -> list[str]:
    """The kinds a picker offers: `allowedKinds`, or `catalogFilter`'s kind(s)."""
    found: list[Any] = []
    allowed = options.get("allowedKinds")
    if isinstance(allowed, list):
        found.extend(allowed)
    filters = options.get("catalogFilter")
    for item in filters if isinstance(filters, list) else [filters]:
        if isinstance(item, dict):
            kind = item.get("kind")
            found.extend(kind if isinstance(kind, list) else [kind])
    return sorted({str(k).lower() for k in found if isinstance(k, str)})


def _describe(target: dict[str, Any]) -> str:
    if target.get("format") == "entity":
        return f"entity of blueprint {target['blueprint']} (its identifier, not an entity ref)"
    if target.get("format") == "team":
        return "team (its name, not a Group ref)"
    return "user (an email, not a User ref)"


def _ordered(names: list[str], ui_order: Any) -> list[str]:
    """A page's inputs in its `ui:order` (`*` standing for the others)."""
    if not isinstance(ui_order, list):
        return names
    listed = [n for n in ui_order if n in names]
    rest = [n for n in names if n not in listed]
    out: list[str] = []
    for item in ui_order:
        if item == "*":
            out.extend(rest)
            rest = []
        elif item in names and item not in out:
            out.append(item)
    return out + rest


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _jsonable(value: Any) -> Any:
    result: Any = json.loads(json.dumps(value, default=str))
    return result


_BODY_KEYS = frozenset(("action", "input", "step", "template", "workflowRun"))


def template_of(workflow: dict[str, Any]) -> str | None:
    """The Template ref a workflow was imported from, when it has the shape this module
    writes (a self-serve trigger, CONDITION nodes, and WEBHOOK nodes whose bodies name one
    template): what `--prune` reads to find the workflows an earlier import wrote."""
    refs: set[Any] = set()
    for node in workflow.get("nodes") or []:
        config = node.get("config") if isinstance(node, dict) else None
        kind = config.get("type") if isinstance(config, dict) else None
        if kind == "WEBHOOK" and isinstance(config, dict):
            body = config.get("body")
            if not isinstance(body, dict) or set(body) != _BODY_KEYS:
                return None
            refs.add(body.get("template"))
        elif kind not in ("SELF_SERVE_TRIGGER", "CONDITION"):
            return None
    if len(refs) != 1:
        return None
    (ref,) = refs
    return ref if isinstance(ref, str) and ref.startswith("template:") else None
