"""Workflow definitions in Port's shape, checked as a whole graph and normalised.

`{identifier, title?, icon?, description?, category?, allowAnyoneToViewRuns?, nodes,
  connections}`; a node is `{identifier, title?, icon?, description?, config: {type, ...},
  variables?}`, a connection `{sourceIdentifier, targetIdentifier, sourceOutletIdentifier?,
  fallback?}`.

Saving answers 422 naming every problem by JSON pointer: unknown fields and node types,
connections naming missing nodes, triggers as targets, more than one outgoing connection
per node or outlet, CONDITION and INPUT connections without `sourceOutletIdentifier` or
`fallback`, cycles, jq that does not compile (the checks action definitions get), inputs
that are not valid JSON Schema, secrets read where they could reach an output (anything but
a WEBHOOK's request), and the size caps below. Node types Portolan does not run are refused by name.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema_rs

from app.actions.definitions import INPUT_FORMATS, INPUT_TYPES, METHODS
from app.catalog.validation import Problems, check_jq, check_pattern
from app.dispatch import templates
from app.search.sql import Scope

MAX_NODES = 50  # nodes of one workflow
MAX_OUTLETS = 20  # outlets of one CONDITION node
MAX_TEMPLATE_LENGTH = 10_000  # characters of one string holding templates (or one expression)
MAX_DEFINITION_BYTES = 256 * 1024  # the definition as JSON

TRIGGERS = ("SELF_SERVE_TRIGGER", "EVENT_TRIGGER")
ACTIONS = ("WEBHOOK", "UPSERT_ENTITY", "INTEGRATION_ACTION")
FLOW = ("CONDITION", "INPUT")
SUPPORTED = (*TRIGGERS, *ACTIONS, *FLOW)
# Port's node types that Portolan does not run, and why.
REFUSED = {
    "KAFKA": "KAFKA nodes are not available in Portolan (there is no managed Kafka topic)",
    "AI": "AI nodes are not available in Portolan",
    "AI_AGENT": "AI_AGENT nodes are not available in Portolan",
    "CURSOR_AGENT": "CURSOR_AGENT nodes are not available in Portolan",
}
ON_FAILURE = ("terminate", "continue")

_IDENTIFIER = re.compile(r"^[A-Za-z0-9@_:-]{1,60}$")
_INSTALLATION = re.compile(r"^[A-Za-z0-9@_.+:=-]{1,100}$")
_NODE_IDENTIFIER = re.compile(r"^[A-Za-z0-9@_.:-]{1,100}$")
_TEMPLATE = re.compile(r"\{\{(.*?)\}\}", re.S)
# A definition's keys, in Port's order (catalog files keep these: app/catalog_code).
DEFINITION_KEYS = (
    "identifier",
    "title",
    "icon",
    "description",
    "category",
    "allowAnyoneToViewRuns",
    "nodes",
    "connections",
)
_KEYS = frozenset(DEFINITION_KEYS)
_NODE_KEYS = frozenset(("identifier", "title", "icon", "description", "config", "variables"))
_CONNECTION_KEYS = frozenset(
    ("sourceIdentifier", "targetIdentifier", "sourceOutletIdentifier", "fallback")
)
_CONFIG_KEYS: dict[str, frozenset[str]] = {
    "SELF_SERVE_TRIGGER": frozenset(
        ("type", "userInputs", "permissions", "published", "contexts", "variant")
    ),
    "EVENT_TRIGGER": frozenset(("type", "event", "condition", "published")),
    "WEBHOOK": frozenset(
        (
            "type",
            "url",
            "method",
            "headers",
            "body",
            "synchronized",
            "agent",
            "onTimeout",
            "onFailure",
        )
    ),
    "UPSERT_ENTITY": frozenset(("type", "blueprintIdentifier", "mapping", "onFailure")),
    "INTEGRATION_ACTION": frozenset(
        (
            "type",
            "installationId",
            "integrationProvider",
            "integrationInvocationType",
            "integrationActionExecutionProperties",
            "onFailure",
        )
    ),
    "CONDITION": frozenset(("type", "outlets")),
    "INPUT": frozenset(
        (
            "type",
            "description",
            "userInputs",
            "outlets",
            "responders",
            "notifications",
            "timeoutSeconds",
        )
    ),
}
_MAPPING_KEYS = frozenset(("identifier", "title", "icon", "team", "properties", "relations"))
_INPUTS_KEYS = frozenset(("properties", "required", "order", "steps", "titles"))
_PERMISSION_KEYS = frozenset(("roles", "users", "teams"))
# The events an EVENT_TRIGGER waits for: the automations' event feed's entity events.
EVENT_TYPES = ("ENTITY_CREATED", "ENTITY_UPDATED", "ENTITY_DELETED", "ANY_ENTITY_CHANGE")
# A `timer` property's time passing (app/automations/timers.py starts these runs).
TIMER_EVENT = "TIMER_EXPIRED"
_EVENT_KEYS = frozenset(("type", "blueprintIdentifier", "propertyIdentifier"))
_CONDITION_KEYS = frozenset(("type", "expressions", "combinator"))
_BUTTON_KEYS = frozenset(("identifier", "label", "variant"))
_BUTTON_VARIANTS = ("PRIMARY", "SECONDARY", "DANGER")
_INPUT_OUTLET_KEYS = frozenset(
    (
        "identifier",
        "title",
        "evaluationMethod",
        "numOfResponders",
        "statusLabel",
        "workflowStatusLabel",
    )
)
MAX_BUTTONS = 20  # buttons of one INPUT node
TIMEOUT_OUTLET = "timeout"  # the outlet an INPUT node takes when its timeoutSeconds pass
MAX_INPUT_TIMEOUT = 30 * 86400  # seconds an INPUT node may wait at most (when it has a timeout)
MAX_RESPONDERS = 100  # responders an INPUT outlet may wait for
# Keys of an input definition that are plain JSON Schema, checked against the meta-schema.
_SCHEMA_KEYS = (
    "type",
    "enum",
    "const",
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
    "items",
    "properties",
    "required",
    "additionalProperties",
)


def _escape(part: Any) -> str:
    return str(part).replace("~", "~0").replace("/", "~1")


def normalise(body: Any, scope: Scope) -> dict[str, Any]:
    """The definition as stored, or Invalid naming every problem."""
    problems = Problems()
    if not isinstance(body, dict):
        problems.add("/", "a workflow is an object")
        problems.raise_if_any("The workflow is invalid")
    try:
        size = len(json.dumps(body, separators=(",", ":"), default=str))
    except (TypeError, ValueError):
        size = 0
    if size > MAX_DEFINITION_BYTES:
        problems.add("/", f"a workflow is at most {MAX_DEFINITION_BYTES // 1024} KiB as JSON")
        problems.raise_if_any("The workflow is invalid")
    for key in sorted(set(body) - _KEYS):
        problems.add(f"/{_escape(key)}", f"unknown field {key!r}")
    identifier = body.get("identifier")
    if not isinstance(identifier, str) or not _IDENTIFIER.match(identifier):
        problems.add("/identifier", "identifier: letters, digits and @_:- (at most 60)")
    for key, limit in (("title", 200), ("icon", 200), ("description", 2000), ("category", 200)):
        value = body.get(key)
        if value is not None and (not isinstance(value, str) or len(value) > limit):
            problems.add(f"/{key}", f"{key} must be a string of at most {limit} characters")
    if "allowAnyoneToViewRuns" in body and not isinstance(body["allowAnyoneToViewRuns"], bool):
        problems.add("/allowAnyoneToViewRuns", "allowAnyoneToViewRuns must be true or false")
    nodes = _nodes(body.get("nodes"), scope, problems)
    _connections(body.get("connections"), nodes, problems)
    problems.raise_if_any("The workflow is invalid")
    out = {key: body[key] for key in _KEYS if key in body}
    out.setdefault("allowAnyoneToViewRuns", True)
    return out


# ---------------------------------------------------------------------------------------
# Nodes


def _nodes(raw: Any, scope: Scope, problems: Problems) -> dict[str, dict[str, Any]]:
    """The well-formed nodes by identifier (for the connection checks)."""
    if not isinstance(raw, list) or not raw:
        problems.add("/nodes", "nodes is a non-empty list")
        return {}
    if len(raw) > MAX_NODES:
        problems.add("/nodes", f"a workflow has at most {MAX_NODES} nodes")
        return {}
    found: dict[str, dict[str, Any]] = {}
    for index, node in enumerate(raw):
        pointer = f"/nodes/{index}"
        if not isinstance(node, dict):
            problems.add(pointer, "a node is an object with an identifier and a config")
            continue
        for key in sorted(set(node) - _NODE_KEYS):
            problems.add(f"{pointer}/{_escape(key)}", f"unknown field {key!r} of a node")
        identifier = node.get("identifier")
        if not isinstance(identifier, str) or not _NODE_IDENTIFIER.match(identifier):
            problems.add(
                f"{pointer}/identifier", "identifier: letters, digits and @_.:- (at most 100)"
            )
            identifier = None
        elif identifier in found:
            problems.add(f"{pointer}/identifier", f"node {identifier!r} is defined twice")
        for key, limit in (("title", 200), ("icon", 200), ("description", 2000)):
            value = node.get(key)
            if value is not None and (not isinstance(value, str) or len(value) > limit):
                problems.add(f"{pointer}/{key}", f"{key} must be a string of at most {limit}")
        kind = _config(node.get("config"), f"{pointer}/config", scope, problems)
        if kind is not None and kind not in TRIGGERS and identifier == "trigger":
            problems.add(
                f"{pointer}/identifier",
                "'trigger' names the trigger that fired (.outputs.trigger): only a trigger "
                "node may be called so",
            )
        if "variables" in node:
            if kind not in ACTIONS:
                problems.add(f"{pointer}/variables", "variables belong to action nodes")
            elif not isinstance(node["variables"], dict):
                problems.add(f"{pointer}/variables", "variables is an object of templates")
            else:
                _templates(node["variables"], f"{pointer}/variables", problems, secrets=False)
        if identifier is not None and identifier not in found and kind is not None:
            found[identifier] = {"pointer": pointer, "type": kind, "node": node}
    if found and not any(n["type"] in TRIGGERS for n in found.values()):
        problems.add(
            "/nodes", "a workflow needs a trigger node (SELF_SERVE_TRIGGER or EVENT_TRIGGER)"
        )
    return found


def _config(config: Any, pointer: str, scope: Scope, problems: Problems) -> str | None:
    """Check a node's config; its type when the type is one Portolan runs."""
    if not isinstance(config, dict):
        problems.add(pointer, "config is an object with a type")
        return None
    kind = config.get("type")
    if kind in REFUSED:
        problems.add(f"{pointer}/type", REFUSED[str(kind)])
        return None
    if kind not in SUPPORTED:
        names = ", ".join((*SUPPORTED, *REFUSED))
        problems.add(f"{pointer}/type", f"unknown node type {kind!r}: one of {names}")
        return None
    for key in sorted(set(config) - _CONFIG_KEYS[kind]):
        problems.add(f"{pointer}/{_escape(key)}", f"unknown field {key!r} of a {kind} node")
    on_failure = config.get("onFailure")
    if on_failure is not None and on_failure not in ON_FAILURE:
        problems.add(f"{pointer}/onFailure", "onFailure is 'terminate' or 'continue'")
    if kind == "SELF_SERVE_TRIGGER":
        _self_serve(config, pointer, scope, problems)
    elif kind == "EVENT_TRIGGER":
        _event_trigger(config, pointer, scope, problems)
    elif kind == "WEBHOOK":
        _webhook(config, pointer, problems)
    elif kind == "UPSERT_ENTITY":
        _upsert(config, pointer, scope, problems)
    elif kind == "INTEGRATION_ACTION":
        _integration(config, pointer, problems)
    elif kind == "CONDITION":
        _condition(config, pointer, problems)
    elif kind == "INPUT":
        _input(config, pointer, scope, problems)
    return str(kind)


def _self_serve(config: dict[str, Any], pointer: str, scope: Scope, problems: Problems) -> None:
    if "published" in config and not isinstance(config["published"], bool):
        problems.add(f"{pointer}/published", "published must be true or false")
    if config.get("variant", "DEFAULT") not in ("DEFAULT", "ALERT"):
        problems.add(f"{pointer}/variant", "variant is DEFAULT or ALERT")
    user_inputs = config.get("userInputs", {"properties": {}})
    props = _inputs(user_inputs, f"{pointer}/userInputs", scope, problems)
    _who(config.get("permissions"), f"{pointer}/permissions", "permissions", problems)
    contexts = config.get("contexts")
    if contexts is not None:
        if not isinstance(contexts, list):
            problems.add(f"{pointer}/contexts", "contexts is a list")
            return
        for index, context in enumerate(contexts):
            where = f"{pointer}/contexts/{index}"
            on = context.get("on") if isinstance(context, dict) else None
            if on == "CREATE_ENTITY":
                blueprint = context.get("blueprintIdentifier")
                if not isinstance(blueprint, str) or blueprint not in scope.blueprints:
                    problems.add(
                        f"{where}/blueprintIdentifier", f"blueprint {blueprint!r} does not exist"
                    )
            elif on == "ENTITY":
                name = context.get("userInput")
                spec = props.get(name) if isinstance(name, str) else None
                if not isinstance(spec, dict) or spec.get("format") != "entity":
                    problems.add(f"{where}/userInput", "userInput names an entity input")
            else:
                problems.add(where, "a context is {on: CREATE_ENTITY | ENTITY, ...}")


def _event_trigger(config: dict[str, Any], pointer: str, scope: Scope, problems: Problems) -> None:
    """`event: {type, blueprintIdentifier}` and a jq `condition` over the event's data
    (`{type: JQ, expressions, combinator}`), as automations' triggers."""
    if "published" in config and not isinstance(config["published"], bool):
        problems.add(f"{pointer}/published", "published must be true or false")
    event = config.get("event")
    where = f"{pointer}/event"
    if not isinstance(event, dict):
        problems.add(where, "event is {type, blueprintIdentifier}")
    else:
        for key in sorted(set(event) - _EVENT_KEYS):
            problems.add(f"{where}/{_escape(key)}", f"unknown field {key!r} of an event")
        kind = event.get("type")
        blueprint = event.get("blueprintIdentifier")
        if not isinstance(blueprint, str) or blueprint not in scope.blueprints:
            problems.add(f"{where}/blueprintIdentifier", f"blueprint {blueprint!r} does not exist")
        elif kind == TIMER_EVENT:
            prop = event.get("propertyIdentifier")
            found = scope.blueprints[blueprint]["schema"]["properties"].get(prop)
            if not isinstance(found, dict) or found.get("format") != "timer":
                problems.add(
                    f"{where}/propertyIdentifier",
                    f"a TIMER_EXPIRED event names a timer property of {blueprint!r}",
                )
        if kind not in (*EVENT_TYPES, TIMER_EVENT):
            problems.add(
                f"{where}/type", f"type is one of {', '.join((*EVENT_TYPES, TIMER_EVENT))}"
            )
        elif kind != TIMER_EVENT and "propertyIdentifier" in event:
            problems.add(f"{where}/propertyIdentifier", "propertyIdentifier is for timers")
    condition = config.get("condition")
    if condition is None:
        return
    where = f"{pointer}/condition"
    if not isinstance(condition, dict):
        problems.add(where, "condition is {type: JQ, expressions, combinator}")
        return
    for key in sorted(set(condition) - _CONDITION_KEYS):
        problems.add(f"{where}/{_escape(key)}", f"unknown field {key!r} of a condition")
    if condition.get("type", "JQ") != "JQ":
        problems.add(f"{where}/type", "a condition's type is JQ")
    if condition.get("combinator", "and") not in ("and", "or"):
        problems.add(f"{where}/combinator", "combinator is 'and' or 'or'")
    expressions = condition.get("expressions")
    if not isinstance(expressions, list) or not expressions:
        problems.add(f"{where}/expressions", "expressions is a non-empty list of jq")
        return
    if len(expressions) > MAX_OUTLETS:
        problems.add(f"{where}/expressions", f"a condition has at most {MAX_OUTLETS} expressions")
        return
    for index, expression in enumerate(expressions):
        at = f"{where}/expressions/{index}"
        _jq(expression, at, problems)
        if isinstance(expression, str) and templates.referenced_secrets("{{ " + expression + " }}"):
            problems.add(at, _NO_SECRETS)


def _who(block: Any, where: str, name: str, problems: Problems) -> None:
    """A `{roles?, users?, teams?}` block (a trigger's permissions, an INPUT's responders)."""
    if block is None:
        return
    if not isinstance(block, dict):
        problems.add(where, f"{name} is {{roles?, users?, teams?}}")
        return
    if "policy" in block:
        problems.add(f"{where}/policy", f"dynamic {name} (policy) are not available")
    for key in sorted(set(block) - _PERMISSION_KEYS - {"policy"}):
        problems.add(f"{where}/{_escape(key)}", f"unknown field {key!r} of {name}")
    for key in sorted(_PERMISSION_KEYS & set(block)):
        value = block[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            problems.add(f"{where}/{key}", f"{key} is a list of names")


def _inputs(
    inputs: Any,
    pointer: str,
    scope: Scope,
    problems: Problems,
    keys: frozenset[str] = _INPUTS_KEYS,
) -> dict[str, Any]:
    """Check a form's inputs; its properties (empty when unusable)."""
    if not isinstance(inputs, dict) or not isinstance(inputs.get("properties", {}), dict):
        problems.add(pointer, "userInputs is {properties: {...}, required?, order?}")
        return {}
    for key in sorted(set(inputs) - keys):
        problems.add(f"{pointer}/{_escape(key)}", f"unknown field {key!r} of userInputs")
    props: dict[str, Any] = inputs.get("properties", {})
    for name, spec in props.items():
        where = f"{pointer}/properties/{_escape(name)}"
        if not isinstance(spec, dict):
            problems.add(where, "an input is an object with a type")
            continue
        if spec.get("type") not in INPUT_TYPES:
            problems.add(f"{where}/type", f"type must be one of {', '.join(INPUT_TYPES)}")
        fmt = spec.get("format")
        if fmt is not None and fmt not in INPUT_FORMATS:
            problems.add(f"{where}/format", f"unknown format {fmt!r}")
        holder = spec if fmt == "entity" else spec.get("items")
        if isinstance(holder, dict) and holder.get("format") == "entity":
            blueprint = holder.get("blueprint")
            if not isinstance(blueprint, str) or blueprint not in scope.blueprints:
                problems.add(f"{where}/blueprint", f"blueprint {blueprint!r} does not exist")
        if "pattern" in spec:
            check_pattern(spec["pattern"], f"{where}/pattern", problems)
        schema = {key: spec[key] for key in _SCHEMA_KEYS if key in spec}
        try:
            valid = jsonschema_rs.meta.is_valid(schema)
        except (jsonschema_rs.ValidationError, ValueError, TypeError):
            valid = False
        if not valid:
            problems.add(where, "the input is not valid JSON Schema")
        enum = spec.get("enum")
        if enum is not None and (not isinstance(enum, list) or not enum):
            problems.add(f"{where}/enum", "enum must be a non-empty list")
    for key in ("required", "order"):
        names = inputs.get(key)
        if names is None:
            continue
        if not isinstance(names, list):
            problems.add(f"{pointer}/{key}", f"{key} is a list of inputs")
            continue
        for index, name in enumerate(names):
            if name not in props:
                problems.add(f"{pointer}/{key}/{index}", f"{name!r} is not an input")
    return props


def _webhook(config: dict[str, Any], pointer: str, problems: Problems) -> None:
    url = config.get("url")
    if not isinstance(url, str) or not url.strip():
        problems.add(f"{pointer}/url", "url is required")
    elif "{{" not in url and not re.match(r"^https?://", url):
        problems.add(f"{pointer}/url", "url must be an http(s) URL (or a {{ }} template)")
    if config.get("method", "POST") not in METHODS:
        problems.add(f"{pointer}/method", f"method must be one of {', '.join(METHODS)}")
    headers = config.get("headers")
    if headers is not None and (
        not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values())
    ):
        problems.add(f"{pointer}/headers", "headers map names to strings")
    if config.get("agent") not in (None, False):
        problems.add(f"{pointer}/agent", "execution agents are not available in Portolan")
    if config.get("synchronized", True) is not True:
        problems.add(
            f"{pointer}/synchronized",
            "asynchronous webhook nodes are not available in Portolan yet: the node waits for "
            "the answer (synchronized: true)",
        )
    if config.get("onTimeout", "fail") != "fail":
        problems.add(
            f"{pointer}/onTimeout", "onTimeout is 'fail' (a timeout is retried, then fails)"
        )
    request = {k: config[k] for k in ("url", "headers", "body") if k in config}
    _templates(request, pointer, problems, secrets=True)


def _upsert(config: dict[str, Any], pointer: str, scope: Scope, problems: Problems) -> None:
    blueprint = config.get("blueprintIdentifier")
    if not isinstance(blueprint, str) or blueprint not in scope.blueprints:
        problems.add(f"{pointer}/blueprintIdentifier", f"blueprint {blueprint!r} does not exist")
    mapping = config.get("mapping")
    if not isinstance(mapping, dict):
        problems.add(f"{pointer}/mapping", "mapping is {identifier, title, properties, ...}")
        return
    for key in sorted(set(mapping) - _MAPPING_KEYS):
        problems.add(f"{pointer}/mapping/{_escape(key)}", f"unknown field {key!r} of a mapping")
    _templates(mapping, f"{pointer}/mapping", problems, secrets=False)


def _integration(config: dict[str, Any], pointer: str, problems: Problems) -> None:
    """An action an installed integration runs (Ocean's actions processor claims it): what
    it is handed is rendered from the run's data, with no secret (the integration holds the
    credentials of the tool it drives; what it is handed is shown on the node run)."""
    installation = config.get("installationId")
    if not isinstance(installation, str) or not _INSTALLATION.match(installation):
        problems.add(
            f"{pointer}/installationId",
            "installationId names the integration installation that runs the node",
        )
    for key in ("integrationProvider", "integrationInvocationType"):
        value = config.get(key)
        if not isinstance(value, str) or not value.strip() or len(value) > 100:
            problems.add(f"{pointer}/{key}", f"{key} is a non-empty string")
    properties = config.get("integrationActionExecutionProperties", {})
    if not isinstance(properties, dict):
        problems.add(
            f"{pointer}/integrationActionExecutionProperties",
            "integrationActionExecutionProperties is an object",
        )
        return
    _templates(
        properties, f"{pointer}/integrationActionExecutionProperties", problems, secrets=False
    )


def _condition(config: dict[str, Any], pointer: str, problems: Problems) -> None:
    outlets = config.get("outlets")
    if not isinstance(outlets, list) or not outlets:
        problems.add(f"{pointer}/outlets", "outlets is a non-empty list")
        return
    if len(outlets) > MAX_OUTLETS:
        problems.add(f"{pointer}/outlets", f"a condition has at most {MAX_OUTLETS} outlets")
        return
    seen: set[str] = set()
    for index, outlet in enumerate(outlets):
        where = f"{pointer}/outlets/{index}"
        if not isinstance(outlet, dict):
            problems.add(where, "an outlet is {identifier, title?, expression}")
            continue
        for key in sorted(
            set(outlet)
            - {"identifier", "title", "expression", "statusLabel", "workflowStatusLabel"}
        ):
            problems.add(f"{where}/{_escape(key)}", f"unknown field {key!r} of an outlet")
        identifier = outlet.get("identifier")
        if not isinstance(identifier, str) or not _NODE_IDENTIFIER.match(identifier):
            problems.add(f"{where}/identifier", "identifier: letters, digits and @_.:-")
        elif identifier in seen:
            problems.add(f"{where}/identifier", f"outlet {identifier!r} is defined twice")
        else:
            seen.add(identifier)
        expression = outlet.get("expression")
        _jq(expression, f"{where}/expression", problems)
        if isinstance(expression, str) and templates.referenced_secrets("{{ " + expression + " }}"):
            problems.add(f"{where}/expression", _NO_SECRETS)


def _input(config: dict[str, Any], pointer: str, scope: Scope, problems: Problems) -> None:
    """An INPUT node: a form (`userInputs` with `buttons`), outlets counting the responders
    who pressed each button, and who may respond."""
    description = config.get("description")
    if description is not None:
        if not isinstance(description, str) or len(description) > 2000:
            problems.add(f"{pointer}/description", "description is a string of at most 2000")
        elif "{{" in description:
            problems.add(
                f"{pointer}/description",
                "templates in an INPUT node's description are not available in Portolan yet",
            )
    if "notifications" in config:
        problems.add(
            f"{pointer}/notifications",
            "notifications are not available in Portolan yet: responders find the waiting "
            "node on the run (GET /v1/workflows/runs/{id})",
        )
    timeout = config.get("timeoutSeconds")
    if timeout is not None and (
        not isinstance(timeout, int)
        or isinstance(timeout, bool)
        or not 1 <= timeout <= MAX_INPUT_TIMEOUT
    ):
        problems.add(
            f"{pointer}/timeoutSeconds",
            f"timeoutSeconds is a whole number of seconds from 1 to {MAX_INPUT_TIMEOUT}",
        )
    user_inputs = config.get("userInputs", {"properties": {}})
    where = f"{pointer}/userInputs"
    _inputs(user_inputs, where, scope, problems, _INPUTS_KEYS | {"buttons"})
    buttons = user_inputs.get("buttons") if isinstance(user_inputs, dict) else None
    names: set[str] = set()
    if not isinstance(buttons, list) or not buttons:
        problems.add(f"{where}/buttons", "buttons is a non-empty list of {identifier, label}")
    elif len(buttons) > MAX_BUTTONS:
        problems.add(f"{where}/buttons", f"an INPUT node has at most {MAX_BUTTONS} buttons")
    else:
        for index, button in enumerate(buttons):
            at = f"{where}/buttons/{index}"
            if not isinstance(button, dict):
                problems.add(at, "a button is {identifier, label, variant?}")
                continue
            for key in sorted(set(button) - _BUTTON_KEYS):
                problems.add(f"{at}/{_escape(key)}", f"unknown field {key!r} of a button")
            identifier = button.get("identifier")
            if not isinstance(identifier, str) or not _NODE_IDENTIFIER.match(identifier):
                problems.add(f"{at}/identifier", "identifier: letters, digits and @_.:-")
            elif identifier in names:
                problems.add(f"{at}/identifier", f"button {identifier!r} is defined twice")
            elif identifier == TIMEOUT_OUTLET and "timeoutSeconds" in config:
                problems.add(
                    f"{at}/identifier",
                    f"{TIMEOUT_OUTLET!r} is the outlet a node with timeoutSeconds takes when "
                    "they pass: name the button otherwise",
                )
            else:
                names.add(identifier)
            label = button.get("label")
            if label is not None and (not isinstance(label, str) or len(label) > 200):
                problems.add(f"{at}/label", "label is a string of at most 200 characters")
            if button.get("variant", "PRIMARY") not in _BUTTON_VARIANTS:
                problems.add(f"{at}/variant", f"variant is one of {', '.join(_BUTTON_VARIANTS)}")
    outlets = config.get("outlets")
    if not isinstance(outlets, list) or not outlets:
        problems.add(f"{pointer}/outlets", "outlets is a non-empty list")
    elif len(outlets) > MAX_OUTLETS:
        problems.add(f"{pointer}/outlets", f"an INPUT node has at most {MAX_OUTLETS} outlets")
    else:
        seen: set[str] = set()
        for index, outlet in enumerate(outlets):
            at = f"{pointer}/outlets/{index}"
            if not isinstance(outlet, dict):
                problems.add(at, "an outlet is {identifier, evaluationMethod, numOfResponders}")
                continue
            for key in sorted(set(outlet) - _INPUT_OUTLET_KEYS):
                problems.add(f"{at}/{_escape(key)}", f"unknown field {key!r} of an outlet")
            identifier = outlet.get("identifier")
            if not isinstance(identifier, str) or identifier in seen:
                problems.add(f"{at}/identifier", "each outlet names a button, once")
            else:
                seen.add(identifier)
                if names and identifier not in names:
                    problems.add(f"{at}/identifier", f"there is no button {identifier!r}")
            if outlet.get("evaluationMethod", "button") != "button":
                problems.add(f"{at}/evaluationMethod", "evaluationMethod is 'button'")
            count = outlet.get("numOfResponders", 1)
            if (
                not isinstance(count, int)
                or isinstance(count, bool)
                or not 1 <= count <= MAX_RESPONDERS
            ):
                problems.add(
                    f"{at}/numOfResponders",
                    f"numOfResponders is a whole number from 1 to {MAX_RESPONDERS}",
                )
    _who(config.get("responders"), f"{pointer}/responders", "responders", problems)


def outlets_of(node: dict[str, Any]) -> list[str]:
    config = node.get("config") or {}
    found = [
        o["identifier"]
        for o in config.get("outlets") or []
        if isinstance(o, dict) and isinstance(o.get("identifier"), str)
    ]
    if config.get("type") == "INPUT" and "timeoutSeconds" in config:
        found.append(TIMEOUT_OUTLET)
    return found


# ---------------------------------------------------------------------------------------
# Templates


_NO_SECRETS = (
    "secrets go into a WEBHOOK node's request only (url, headers, body), never into an "
    "output, an entity, a condition or what an integration is handed"
)


def _templates(value: Any, pointer: str, problems: Problems, *, secrets: bool) -> None:
    """Every `{{ jq }}` inside a value compiles and is within the length cap; secrets are
    read only where `secrets` allows."""
    if isinstance(value, str):
        if "{{" not in value:
            return
        if len(value) > MAX_TEMPLATE_LENGTH:
            problems.add(pointer, f"a template is at most {MAX_TEMPLATE_LENGTH} characters")
            return
        for match in _TEMPLATE.finditer(value):
            _jq(match.group(1).strip(), pointer, problems)
        if not secrets and templates.referenced_secrets(value):
            problems.add(pointer, _NO_SECRETS)
    elif isinstance(value, dict):
        for key, item in value.items():
            at = f"{pointer}/{_escape(key)}"
            _templates(key, at, problems, secrets=secrets)
            _templates(item, at, problems, secrets=secrets)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _templates(item, f"{pointer}/{index}", problems, secrets=secrets)


def _jq(expression: Any, pointer: str, problems: Problems) -> None:
    if not isinstance(expression, str) or not expression.strip():
        problems.add(pointer, "a jq expression is required")
        return
    if len(expression) > MAX_TEMPLATE_LENGTH:
        problems.add(pointer, f"a jq expression is at most {MAX_TEMPLATE_LENGTH} characters")
        return
    check_jq(expression, pointer, problems)


# ---------------------------------------------------------------------------------------
# Connections


def _connections(raw: Any, nodes: dict[str, dict[str, Any]], problems: Problems) -> None:
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        problems.add("/connections", "connections is a list")
        return
    if len(raw) > MAX_NODES * MAX_OUTLETS:
        problems.add("/connections", "too many connections")
        return
    outgoing: dict[tuple[str, str], str] = {}
    edges: list[tuple[str, str, str]] = []
    for index, connection in enumerate(raw):
        pointer = f"/connections/{index}"
        if not isinstance(connection, dict):
            problems.add(pointer, "a connection is {sourceIdentifier, targetIdentifier, ...}")
            continue
        for key in sorted(set(connection) - _CONNECTION_KEYS):
            problems.add(f"{pointer}/{_escape(key)}", f"unknown field {key!r} of a connection")
        source = connection.get("sourceIdentifier")
        target = connection.get("targetIdentifier")
        ok = True
        if source not in nodes:
            problems.add(f"{pointer}/sourceIdentifier", f"node {source!r} does not exist")
            ok = False
        if target not in nodes:
            problems.add(f"{pointer}/targetIdentifier", f"node {target!r} does not exist")
            ok = False
        elif nodes[target]["type"] in TRIGGERS:
            problems.add(
                f"{pointer}/targetIdentifier", f"node {target!r} is a trigger: never a target"
            )
            ok = False
        outlet = connection.get("sourceOutletIdentifier")
        fallback = connection.get("fallback")
        if fallback is not None and not isinstance(fallback, bool):
            problems.add(f"{pointer}/fallback", "fallback is true or false")
            fallback = None
        if outlet is not None and not isinstance(outlet, str):
            problems.add(f"{pointer}/sourceOutletIdentifier", "an outlet's identifier")
            outlet = None
        if source not in nodes:
            continue
        kind = nodes[source]["type"]
        if kind in FLOW:
            if outlet is None and not fallback:
                problems.add(
                    pointer,
                    f"a connection from {kind} node {source!r} needs sourceOutletIdentifier "
                    "or fallback: true",
                )
                continue
            if outlet is not None and fallback:
                problems.add(pointer, "a connection takes an outlet or the fallback, not both")
                continue
            if outlet is not None and outlet not in outlets_of(nodes[source]["node"]):
                problems.add(
                    f"{pointer}/sourceOutletIdentifier",
                    f"node {source!r} has no outlet {outlet!r}",
                )
                continue
            slot = outlet if outlet is not None else "<fallback>"
        else:
            if outlet is not None or fallback:
                problems.add(pointer, f"a {kind} node has no outlets: connect it without an outlet")
                continue
            slot = ""
        key = (str(source), slot)
        if key in outgoing:
            where = f"outlet {slot!r} of node {source!r}" if slot else f"node {source!r}"
            problems.add(
                pointer,
                f"{where} already has an outgoing connection ({outgoing[key]}): one at most",
            )
            continue
        outgoing[key] = pointer
        if ok:
            edges.append((str(source), str(target), pointer))
    _cycles(edges, problems)


def _cycles(edges: list[tuple[str, str, str]], problems: Problems) -> None:
    """Each connection that closes a cycle is named."""
    after: dict[str, list[tuple[str, str]]] = {}
    for source, target, pointer in edges:
        after.setdefault(source, []).append((target, pointer))
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(after):
        if state.get(start):
            continue
        stack: list[tuple[str, int]] = [(start, 0)]
        state[start] = 1
        while stack:
            node, index = stack[-1]
            successors = after.get(node, [])
            if index >= len(successors):
                state[node] = 2
                stack.pop()
                continue
            stack[-1] = (node, index + 1)
            target, pointer = successors[index]
            if state.get(target) == 1:
                problems.add(pointer, f"this connection closes a cycle through node {target!r}")
            elif not state.get(target):
                state[target] = 1
                stack.append((target, 0))


def next_node(
    definition: dict[str, Any], source: str, outlet: str | None = None, *, fallback: bool = False
) -> str | None:
    """The node a run goes to from `source` (through `outlet`, or the fallback), if any."""
    for connection in definition.get("connections") or []:
        if connection.get("sourceIdentifier") != source:
            continue
        if fallback:
            if connection.get("fallback") is True:
                return str(connection["targetIdentifier"])
        elif connection.get("sourceOutletIdentifier") == outlet and not connection.get("fallback"):
            return str(connection["targetIdentifier"])
    return None


def node_of(definition: dict[str, Any], identifier: str) -> dict[str, Any] | None:
    for node in definition.get("nodes") or []:
        if node.get("identifier") == identifier:
            return dict(node)
    return None
